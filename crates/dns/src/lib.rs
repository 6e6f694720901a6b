//! Cluster DNS, as CoreDNS's `kubernetes` plugin answers in a kubeadm cluster, from watches of
//! Services and Endpoints:
//!
//! - `<svc>.<ns>.svc.<domain>`: A/AAAA with the ClusterIP(s); for headless Services one record
//!   per ready endpoint (NXDOMAIN without any); CNAME for ExternalName Services;
//! - `<hostname>.<svc>.<ns>.svc.<domain>`: a headless Service's endpoint by its hostname (or
//!   its dashed IP);
//! - `_<port>._<proto>.<svc>.<ns>.svc.<domain>` (and `<svc>.<ns>.svc.<domain>` asked for SRV):
//!   SRV records, to the Service's name or, headless, to each endpoint's name;
//! - `<a-b-c-d>.<ns>.pod.<domain>`: A with that address (CoreDNS's `pods insecure`);
//! - PTR for ClusterIPs and headless endpoints; any other name (and reverse lookups of other
//!   addresses) is forwarded to the host's resolvers.
//!
//! Names under the domain that match nothing are NXDOMAIN; names that exist without records of
//! the asked type are answered empty (NODATA), with the zone's SOA.
//!
//! [`serve`] answers on UDP and TCP port 53; [`publish`] keeps the `kube-dns` Service and its
//! endpoints (every live DNS server) in kube-system.
//!
//! Of Tugboat's crates it imports `tugboat-objects` alone: Services and Endpoints come through
//! the API.

pub mod publish;
pub mod serve;

use std::net::{IpAddr, Ipv4Addr};
use std::str::FromStr;

use hickory_proto::op::{Message, MessageType, OpCode, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, PTR, SOA, SRV};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::runtime::reflector::{ObjectRef, Store};

/// Where and for what the DNS server answers.
#[derive(Debug, Clone)]
pub struct DnsConfig {
    /// The address it listens on (UDP and TCP) and publishes as the `kube-dns` endpoint.
    pub address: IpAddr,
    pub port: u16,
    /// The `kube-dns` Service's ClusterIP.
    pub cluster_ip: IpAddr,
    /// `cluster.local`.
    pub domain: String,
    /// Where other names are asked.
    pub upstreams: Vec<std::net::SocketAddr>,
}

fn reflect<K>(api: kube::Api<K>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + for<'de> k8s_openapi::serde::Deserialize<'de>
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    tugboat_objects::informer::reflect(api, (), "cluster DNS", |_| {})
}

/// Runs the cluster DNS server (and keeps `kube-dns` published) until the process ends.
pub async fn run(client: kube::Client, config: DnsConfig) {
    let services = reflect(kube::Api::<Service>::all(client.clone()));
    let endpoints = reflect(kube::Api::<Endpoints>::all(client.clone()));
    if services.wait_until_ready().await.is_err() || endpoints.wait_until_ready().await.is_err() {
        return;
    }
    let resolver = Resolver::new(services, endpoints, &config.domain);
    let listen = std::net::SocketAddr::new(config.address, config.port);
    let mut warned = false;
    let (udp, tcp) = loop {
        match (tokio::net::UdpSocket::bind(listen).await, tokio::net::TcpListener::bind(listen).await) {
            (Ok(udp), Ok(tcp)) => break (udp, tcp),
            (Err(error), _) | (_, Err(error)) => {
                if !warned {
                    tracing::warn!(%listen, %error, "cluster DNS: cannot listen; trying again every 10 s");
                    warned = true;
                }
                tokio::time::sleep(std::time::Duration::from_secs(10)).await;
            }
        }
    };
    tracing::info!(%listen, upstreams = ?config.upstreams, "cluster DNS serving");
    let publication =
        publish::Publication { cluster_ip: config.cluster_ip, address: config.address, port: config.port };
    tokio::spawn(publish::keep(client, publication));
    serve::serve(resolver, config.upstreams, udp, tcp).await
}

/// How long answers may be cached (CoreDNS's default for the kubernetes plugin).
pub const TTL: u32 = 5;

/// What a query gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// This wire message.
    Answer(Vec<u8>),
    /// Ask the host's resolvers.
    Forward,
    /// Nothing (not a DNS message).
    Drop,
}

/// What a name under the cluster domain holds for a type.
#[derive(Debug)]
enum Found {
    Records(Vec<Record>),
    /// The name exists, without records of the type.
    NoData,
    NxDomain,
    /// Not the cluster's to answer.
    NotOurs,
}

/// The cluster's names, answered from the reflectors' stores.
#[derive(Debug, Clone)]
pub struct Resolver {
    services: Store<Service>,
    endpoints: Store<Endpoints>,
    /// `cluster.local`, lower case, without dots at either end.
    domain: String,
    zone: Name,
}

fn name(text: &str) -> Option<Name> {
    Name::from_str(&format!("{}.", text.trim_end_matches('.'))).ok()
}

impl Resolver {
    pub fn new(services: Store<Service>, endpoints: Store<Endpoints>, domain: &str) -> Resolver {
        let domain = domain.trim_matches('.').to_ascii_lowercase();
        let zone = name(&domain).unwrap_or_else(Name::root);
        Resolver { services, endpoints, domain, zone }
    }

    /// The reply to one wire message.
    pub fn answer(&self, query: &[u8]) -> Reply {
        let Ok(request) = Message::from_vec(query) else {
            // A header at least: say it was malformed.
            if query.len() >= 12 {
                let mut reply = Message::new();
                reply
                    .set_id(u16::from_be_bytes([query[0], query[1]]))
                    .set_message_type(MessageType::Response)
                    .set_response_code(ResponseCode::FormErr);
                return reply.to_vec().map_or(Reply::Drop, Reply::Answer);
            }
            return Reply::Drop;
        };
        if request.message_type() != MessageType::Query {
            return Reply::Drop;
        }
        let mut reply = response_to(&request);
        let [question] = request.queries() else {
            reply.set_response_code(ResponseCode::FormErr);
            return reply.to_vec().map_or(Reply::Drop, Reply::Answer);
        };
        if request.op_code() != OpCode::Query {
            reply.add_query(question.clone()).set_response_code(ResponseCode::NotImp);
            return reply.to_vec().map_or(Reply::Drop, Reply::Answer);
        }
        reply.add_query(question.clone());
        let asked = question.name().to_lowercase();
        match self.lookup(&asked, question.query_type()) {
            Found::NotOurs => return Reply::Forward,
            Found::Records(records) => {
                reply.set_authoritative(true);
                for record in records {
                    reply.add_answer(record);
                }
            }
            Found::NoData => {
                reply.set_authoritative(true).add_name_server(self.soa());
            }
            Found::NxDomain => {
                reply.set_authoritative(true).set_response_code(ResponseCode::NXDomain).add_name_server(self.soa());
            }
        }
        let Ok(mut bytes) = reply.to_vec() else { return Reply::Drop };
        // Over UDP the answer must fit what the client takes: else it is truncated, and the
        // client asks again over TCP.
        let limit = request.extensions().as_ref().map_or(512, |e| e.max_payload().max(512)) as usize;
        if bytes.len() > limit {
            let mut short = reply.clone();
            short.take_answers();
            short.set_truncated(true);
            match short.to_vec() {
                Ok(b) => bytes = b,
                Err(_) => return Reply::Drop,
            }
        }
        Reply::Answer(bytes)
    }

    /// The full answer, untruncated (for TCP).
    pub fn answer_whole(&self, query: &[u8]) -> Reply {
        // A TCP client allows 64 KiB: ask as if it had said so with EDNS.
        let Ok(mut request) = Message::from_vec(query) else { return self.answer(query) };
        let mut edns = request.extensions().clone().unwrap_or_default();
        edns.set_max_payload(u16::MAX);
        request.set_edns(edns);
        match request.to_vec() {
            Ok(bytes) => self.answer(&bytes),
            Err(_) => self.answer(query),
        }
    }

    fn soa(&self) -> Record {
        let (ns, mailbox) = (
            name(&format!("ns.dns.{}", self.domain)).unwrap_or_else(Name::root),
            name(&format!("hostmaster.{}", self.domain)).unwrap_or_else(Name::root),
        );
        let serial = (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_secs()
            & 0xffff_ffff) as u32;
        Record::from_rdata(self.zone.clone(), TTL, RData::SOA(SOA::new(ns, mailbox, serial, 7200, 1800, 86400, TTL)))
    }

    fn service(&self, namespace: &str, service: &str) -> Option<std::sync::Arc<Service>> {
        self.services.get(&ObjectRef::new(service).within(namespace))
    }

    /// Ready endpoint addresses of a Service: (ip, hostname).
    fn ready(&self, namespace: &str, service: &str) -> Vec<(IpAddr, Option<String>)> {
        let Some(endpoints) = self.endpoints.get(&ObjectRef::new(service).within(namespace)) else { return Vec::new() };
        let mut ready = Vec::new();
        for subset in endpoints.subsets.iter().flatten() {
            for address in subset.addresses.iter().flatten() {
                if let Ok(ip) = address.ip.parse() {
                    ready.push((ip, address.hostname.clone()));
                }
            }
        }
        ready.sort();
        ready.dedup();
        ready
    }

    fn lookup(&self, asked: &Name, kind: RecordType) -> Found {
        let text = asked.to_ascii();
        let text = text.trim_end_matches('.');
        if let Some(reverse) = text.strip_suffix(".in-addr.arpa") {
            return self.reverse(asked, reverse, kind);
        }
        let labels: Vec<&str> = if text == self.domain {
            Vec::new()
        } else if let Some(rest) = text.strip_suffix(&format!(".{}", self.domain)) {
            rest.split('.').collect()
        } else {
            return Found::NotOurs;
        };
        match labels.as_slice() {
            [] | ["svc"] | ["pod"] | [_, "pod"] => Found::NoData,
            // A namespace exists for DNS while it holds Services (else a search-path miss
            // like `db.svc.<domain>` would look like a name).
            [namespace, "svc"] => {
                if self.services.state().iter().any(|s| s.metadata.namespace.as_deref() == Some(*namespace)) {
                    Found::NoData
                } else {
                    Found::NxDomain
                }
            }
            [dashed, _namespace, "pod"] => {
                let Ok(ip) = dashed.replace('-', ".").parse::<Ipv4Addr>() else { return Found::NxDomain };
                self.addresses(asked, &[IpAddr::V4(ip)], kind)
            }
            [service, namespace, "svc"] => self.service_records(asked, namespace, service, kind),
            [port, protocol, service, namespace, "svc"] if port.starts_with('_') && protocol.starts_with('_') => {
                self.srv(namespace, service, Some((&port[1..], &protocol[1..])), kind)
            }
            [host, service, namespace, "svc"] => {
                let Some(svc) = self.service(namespace, service) else { return Found::NxDomain };
                if !headless(&svc) {
                    return Found::NxDomain;
                }
                let ips: Vec<IpAddr> = self
                    .ready(namespace, service)
                    .into_iter()
                    .filter(|(ip, hostname)| hostname.as_deref() == Some(*host) || dashed(ip) == *host)
                    .map(|(ip, _)| ip)
                    .collect();
                if ips.is_empty() { Found::NxDomain } else { self.addresses(asked, &ips, kind) }
            }
            _ => Found::NxDomain,
        }
    }

    /// A, AAAA (or nothing of another type) for a name with these addresses.
    fn addresses(&self, asked: &Name, ips: &[IpAddr], kind: RecordType) -> Found {
        let records: Vec<Record> = ips
            .iter()
            .filter_map(|ip| match (ip, kind) {
                (IpAddr::V4(v4), RecordType::A | RecordType::ANY) => Some(RData::A(A(*v4))),
                (IpAddr::V6(v6), RecordType::AAAA | RecordType::ANY) => Some(RData::AAAA(AAAA(*v6))),
                _ => None,
            })
            .map(|data| Record::from_rdata(asked.clone(), TTL, data))
            .collect();
        if records.is_empty() { Found::NoData } else { Found::Records(records) }
    }

    fn service_records(&self, asked: &Name, namespace: &str, service: &str, kind: RecordType) -> Found {
        let Some(svc) = self.service(namespace, service) else { return Found::NxDomain };
        let spec = svc.spec.clone().unwrap_or_default();
        if spec.type_.as_deref() == Some("ExternalName") {
            let Some(target) = spec.external_name.as_deref().and_then(name) else { return Found::NoData };
            return Found::Records(vec![Record::from_rdata(asked.clone(), TTL, RData::CNAME(CNAME(target)))]);
        }
        if kind == RecordType::SRV {
            return self.srv(namespace, service, None, kind);
        }
        if headless(&svc) {
            let ips: Vec<IpAddr> = self.ready(namespace, service).into_iter().map(|(ip, _)| ip).collect();
            if ips.is_empty() {
                return Found::NxDomain;
            }
            return self.addresses(asked, &ips, kind);
        }
        let ips: Vec<IpAddr> = spec
            .cluster_ips
            .clone()
            .unwrap_or_else(|| spec.cluster_ip.clone().into_iter().collect())
            .iter()
            .filter_map(|ip| ip.parse().ok())
            .collect();
        self.addresses(asked, &ips, kind)
    }

    /// SRV records of a Service's ports (those named `port` over `protocol` when given).
    fn srv(&self, namespace: &str, service: &str, only: Option<(&str, &str)>, kind: RecordType) -> Found {
        let Some(svc) = self.service(namespace, service) else { return Found::NxDomain };
        let base = format!("{service}.{namespace}.svc.{}", self.domain);
        let ports: Vec<(String, String, i32)> = svc
            .spec
            .iter()
            .flat_map(|s| s.ports.iter().flatten())
            .map(|p| (p.name.clone().unwrap_or_default(), p.protocol.clone().unwrap_or_else(|| "TCP".into()), p.port))
            .filter(|(n, proto, _)| {
                only.is_none_or(|(want, want_proto)| n == want && proto.eq_ignore_ascii_case(want_proto))
            })
            .collect();
        if ports.is_empty() {
            return Found::NxDomain;
        }
        if kind != RecordType::SRV && kind != RecordType::ANY {
            return Found::NoData;
        }
        let Some(owner) = name(&match only {
            Some((port, protocol)) => format!("_{port}._{protocol}.{base}"),
            None => base.clone(),
        }) else {
            return Found::NxDomain;
        };
        let headless_targets: Option<Vec<String>> = headless(&svc).then(|| {
            self.ready(namespace, service)
                .into_iter()
                .map(|(ip, hostname)| format!("{}.{base}", hostname.unwrap_or_else(|| dashed(&ip))))
                .collect()
        });
        let mut records = Vec::new();
        for (_, _, port) in ports {
            let targets = headless_targets.clone().unwrap_or_else(|| vec![base.clone()]);
            let weight = (100 / targets.len().max(1)) as u16;
            for target in targets {
                let Some(target) = name(&target) else { continue };
                let data = SRV::new(0, weight, u16::try_from(port).unwrap_or(0), target);
                records.push(Record::from_rdata(owner.clone(), TTL, RData::SRV(data)));
            }
        }
        if records.is_empty() { Found::NxDomain } else { Found::Records(records) }
    }

    /// PTR for ClusterIPs and headless endpoints; other addresses go to the host's resolvers.
    fn reverse(&self, asked: &Name, reverse: &str, kind: RecordType) -> Found {
        let mut octets: Vec<&str> = reverse.split('.').collect();
        octets.reverse();
        let Ok(ip) = octets.join(".").parse::<Ipv4Addr>() else { return Found::NotOurs };
        let ip = ip.to_string();
        let mut names = Vec::new();
        for svc in self.services.state() {
            let (namespace, service) =
                (svc.metadata.namespace.clone().unwrap_or_default(), svc.metadata.name.clone().unwrap_or_default());
            let spec = svc.spec.clone().unwrap_or_default();
            let base = format!("{service}.{namespace}.svc.{}", self.domain);
            if spec.cluster_ips.iter().flatten().chain(spec.cluster_ip.iter()).any(|c| *c == ip) {
                names.push(base);
            } else if headless(&svc) {
                for (address, hostname) in self.ready(&namespace, &service) {
                    if address.to_string() == ip {
                        names.push(format!("{}.{base}", hostname.unwrap_or_else(|| dashed(&address))));
                    }
                }
            }
        }
        names.sort();
        names.dedup();
        if names.is_empty() {
            return Found::NotOurs;
        }
        if kind != RecordType::PTR && kind != RecordType::ANY {
            return Found::NoData;
        }
        Found::Records(
            names
                .iter()
                .filter_map(|n| name(n))
                .map(|n| Record::from_rdata(asked.clone(), TTL, RData::PTR(PTR(n))))
                .collect(),
        )
    }
}

/// A response to `request`: its ID, opcode and recursion flag; recursion available.
pub(crate) fn response_to(request: &Message) -> Message {
    let mut reply = Message::new();
    reply
        .set_id(request.id())
        .set_message_type(MessageType::Response)
        .set_op_code(request.op_code())
        .set_recursion_desired(request.recursion_desired())
        .set_recursion_available(true);
    reply
}

fn headless(service: &Service) -> bool {
    service.spec.as_ref().and_then(|s| s.cluster_ip.as_deref()) == Some("None")
}

fn dashed(ip: &IpAddr) -> String {
    ip.to_string().replace(['.', ':'], "-")
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::Query;
    use kube::runtime::watcher;

    pub(crate) fn resolver() -> Resolver {
        let mut services = kube::runtime::reflector::store::Writer::<Service>::default();
        let mut endpoints = kube::runtime::reflector::store::Writer::<Endpoints>::default();
        let list: Vec<Service> = serde_json::from_value(serde_json::json!([
            {"metadata": {"name": "db", "namespace": "shop"},
             "spec": {"clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                      "ports": [{"name": "sql", "port": 5432, "protocol": "TCP"}]}},
            {"metadata": {"name": "peers", "namespace": "shop"},
             "spec": {"clusterIP": "None", "ports": [{"name": "gossip", "port": 7000, "protocol": "UDP"}]}},
            {"metadata": {"name": "empty", "namespace": "shop"}, "spec": {"clusterIP": "None"}},
            {"metadata": {"name": "away", "namespace": "shop"},
             "spec": {"type": "ExternalName", "externalName": "db.example.org"}},
        ]))
        .unwrap();
        for s in list {
            services.apply_watcher_event(&watcher::Event::Apply(s));
        }
        let e: Endpoints = serde_json::from_value(serde_json::json!(
            {"metadata": {"name": "peers", "namespace": "shop"},
             "subsets": [{"addresses": [{"ip": "10.244.1.5", "hostname": "peer-0"}, {"ip": "10.244.2.7"}],
                          "notReadyAddresses": [{"ip": "10.244.2.9"}],
                          "ports": [{"name": "gossip", "port": 7000, "protocol": "UDP"}]}]}))
        .unwrap();
        endpoints.apply_watcher_event(&watcher::Event::Apply(e));
        Resolver::new(services.as_reader(), endpoints.as_reader(), "cluster.local")
    }

    fn ask(resolver: &Resolver, name: &str, kind: RecordType) -> Option<Message> {
        let mut query = Message::new();
        query.set_id(77).set_recursion_desired(true).add_query(Query::query(Name::from_str(name).unwrap(), kind));
        match resolver.answer(&query.to_vec().unwrap()) {
            Reply::Answer(bytes) => Some(Message::from_vec(&bytes).unwrap()),
            Reply::Forward => None,
            Reply::Drop => panic!("dropped"),
        }
    }

    fn data(reply: &Message) -> Vec<String> {
        reply.answers().iter().map(|r| r.data().to_string()).collect()
    }

    #[test]
    fn services_pods_and_reverse_names_are_answered() {
        let r = resolver();
        let db = ask(&r, "db.shop.svc.cluster.local.", RecordType::A).unwrap();
        assert_eq!((db.id(), db.response_code(), db.authoritative()), (77, ResponseCode::NoError, true));
        assert_eq!(data(&db), ["10.96.0.20"]);
        let upper = ask(&r, "DB.Shop.SVC.cluster.local.", RecordType::A).unwrap();
        assert_eq!(data(&upper), ["10.96.0.20"], "names are case-insensitive");
        let v6 = ask(&r, "db.shop.svc.cluster.local.", RecordType::AAAA).unwrap();
        assert_eq!((v6.response_code(), v6.answers().len(), v6.name_servers().len()), (ResponseCode::NoError, 0, 1));
        let missing = ask(&r, "nope.shop.svc.cluster.local.", RecordType::A).unwrap();
        assert_eq!(missing.response_code(), ResponseCode::NXDomain);
        let search = ask(&r, "db.svc.cluster.local.", RecordType::A).unwrap();
        assert_eq!(search.response_code(), ResponseCode::NXDomain, "a search-path miss");
        // Headless: every ready endpoint, by service name and by hostname or dashed IP.
        let peers = ask(&r, "peers.shop.svc.cluster.local.", RecordType::A).unwrap();
        assert_eq!(data(&peers), ["10.244.1.5", "10.244.2.7"]);
        assert_eq!(data(&ask(&r, "peer-0.peers.shop.svc.cluster.local.", RecordType::A).unwrap()), ["10.244.1.5"]);
        assert_eq!(data(&ask(&r, "10-244-2-7.peers.shop.svc.cluster.local.", RecordType::A).unwrap()), ["10.244.2.7"]);
        let none = ask(&r, "empty.shop.svc.cluster.local.", RecordType::A).unwrap();
        assert_eq!(none.response_code(), ResponseCode::NXDomain, "headless without endpoints");
        // SRV.
        let srv = ask(&r, "_sql._tcp.db.shop.svc.cluster.local.", RecordType::SRV).unwrap();
        assert_eq!(data(&srv), ["0 100 5432 db.shop.svc.cluster.local."]);
        let srv = ask(&r, "_gossip._udp.peers.shop.svc.cluster.local.", RecordType::SRV).unwrap();
        assert_eq!(
            data(&srv),
            ["0 50 7000 peer-0.peers.shop.svc.cluster.local.", "0 50 7000 10-244-2-7.peers.shop.svc.cluster.local."]
        );
        // ExternalName, pods, reverse.
        assert_eq!(data(&ask(&r, "away.shop.svc.cluster.local.", RecordType::A).unwrap()), ["db.example.org."]);
        assert_eq!(data(&ask(&r, "10-244-3-4.shop.pod.cluster.local.", RecordType::A).unwrap()), ["10.244.3.4"]);
        assert_eq!(
            data(&ask(&r, "20.0.96.10.in-addr.arpa.", RecordType::PTR).unwrap()),
            ["db.shop.svc.cluster.local."]
        );
        // Other names go to the host's resolvers.
        assert!(ask(&r, "example.org.", RecordType::A).is_none());
        assert!(ask(&r, "8.8.8.10.in-addr.arpa.", RecordType::PTR).is_none());
        // Garbage gets FORMERR, or nothing.
        assert_eq!(r.answer(b"\x00\x01tiny"), Reply::Drop);
        let Reply::Answer(bad) = r.answer(b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xff") else { panic!() };
        assert_eq!(Message::from_vec(&bad).unwrap().response_code(), ResponseCode::FormErr);
    }
}
