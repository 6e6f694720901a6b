//! The service proxy: Services reach their ready endpoints through nftables on every node (run
//! with the kubelet, so in `tugboat server` and `tugboat agent`, and alone as `tugboat proxy`).
//!
//! Everything lives in one table, `ip tugboat-proxy`, which the proxy makes at start and
//! `tugboat uninstall --purge` (or [`remove`]) deletes. Its layout follows upstream's nftables
//! proxy, so the cost per packet does not grow with the number of Services:
//!
//! - verdict map `service-ips`: (ClusterIP or external IP, protocol, port) → the service port's
//!   chain; `service-nodeports`: (protocol, nodePort) → its external chain, matched for traffic
//!   to any of the node's own addresses (`fib daddr type local`, not loopback);
//! - `svc-<ns>/<name>/<proto>/<port>`: picks a ready endpoint at random (`numgen random mod k
//!   == 0` rules, no anonymous sets), after the session-affinity sets (`sessionAffinity:
//!   ClientIP`) have had their say; `ext-…`: NodePort and external traffic, masqueraded and sent on to `svc-…`, or with
//!   `externalTrafficPolicy: Local` kept on this node's endpoints and not masqueraded;
//! - `ep-…/<ip>/<port>` (with session affinity): records the client, and DNATs;
//! - set `hairpin` of (address . address) for this node's endpoints: a pod DNATed to itself
//!   (reaching its own Service) is masqueraded, or its reply would skip the DNAT's undoing;
//! - sets `no-endpoint-services`/`no-endpoint-nodeports`: ports without endpoints are rejected
//!   (ICMP host unreachable) in filter chains, as `reject` cannot live in NAT chains.
//!
//! The proxy watches Services and Endpoints and turns each change into the smallest
//! transaction that makes the table what it should be ([`Ruleset::changes`]): new chains added,
//! changed ones flushed and refilled, map elements added and deleted, stale chains removed,
//! written over netlink ([`netlink`]; `nft -f` if that is refused). The whole table is written
//! with `nft -f`, only at start and after a failure. The time from a change seen to
//! rules live is recorded in `/metrics` (`--proxy-metrics-address`, 127.0.0.1:10249 as upstream).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::api::Api;
use kube::runtime::reflector::{ObjectRef, Store};
use tokio::sync::Notify;

pub mod iptables;
pub mod netlink;
pub mod nft;

use nft::{Command, Key, Rule};

/// The nftables table the proxy owns.
pub const TABLE: &str = "tugboat-proxy";
/// The packet mark asking for masquerading on the way out (upstream's 0x4000).
pub(crate) const MASQUERADE_MARK: &str = "0x4000";

/// How the proxy runs.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// This node's name: endpoints on it are the local ones (`externalTrafficPolicy: Local`).
    pub node_name: String,
    /// Where `/metrics` is served (none: not served).
    pub metrics_address: Option<SocketAddr>,
    pub mode: ProxyMode,
}

/// How the rules are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum ProxyMode {
    /// One nftables table with verdict maps (the default).
    #[default]
    Nftables,
    /// iptables chains, for hosts without nftables.
    Iptables,
}

impl std::str::FromStr for ProxyMode {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "nftables" => Ok(ProxyMode::Nftables),
            "iptables" => Ok(ProxyMode::Iptables),
            _ => Err(format!("{text:?}: the proxy mode is nftables or iptables")),
        }
    }
}

/// What was last written, in either mode.
#[derive(Debug)]
enum Applied {
    Nftables(Parts),
    Iptables(iptables::Tables),
}

/// What will have been written once a transaction is applied.
#[derive(Debug)]
enum Next {
    Whole(Applied),
    Parts(Parts, Update),
}

impl Next {
    fn done(self) -> Applied {
        match self {
            Next::Whole(applied) => applied,
            Next::Parts(mut parts, updates) => {
                parts.commit(updates);
                Applied::Nftables(parts)
            }
        }
    }
}

/// One sync's writing.
enum Write {
    /// `nft -f` text (the whole table).
    Nft(String),
    /// A change of the nftables table, written over netlink.
    Commands(Vec<Command>),
    /// `iptables-restore --noflush` text.
    Iptables(String),
}

impl Write {
    fn is_empty(&self) -> bool {
        match self {
            Write::Nft(text) | Write::Iptables(text) => text.is_empty(),
            Write::Commands(commands) => commands.is_empty(),
        }
    }

    /// Writes (blocking); `first`: the iptables hooks are put in place too. `socket`: the
    /// netlink socket changes go through (opened when there is none, dropped after a failure).
    fn apply(self, first: bool, socket: &Mutex<Option<netlink::Socket>>) -> anyhow::Result<()> {
        match self {
            Write::Nft(text) => crate::pod_network::nft(&text),
            Write::Commands(commands) => {
                let mut socket = socket.lock().unwrap_or_else(|e| e.into_inner());
                let written = match socket.as_mut() {
                    Some(open) => open.write(&commands),
                    None => netlink::Socket::open().and_then(|open| socket.insert(open).write(&commands)),
                };
                written.or_else(|error| {
                    *socket = None;
                    // `nft` takes the same commands (slower): a kernel or sandbox without our
                    // netlink path still gets its rules.
                    static WARNED: std::sync::Once = std::sync::Once::new();
                    WARNED.call_once(|| {
                    tracing::warn!(error = %format!("{error:#}"), "service proxy: netlink refused a change; using nft");
                });
                    crate::pod_network::nft(&nft::text(&commands))
                })
            }
            Write::Iptables(text) => {
                if !text.is_empty() {
                    iptables::restore(&text)?;
                }
                if first { iptables::hook() } else { Ok(()) }
            }
        }
    }
}

/// Whether the rules are still in the kernel (someone may have flushed them).
fn present(mode: ProxyMode) -> bool {
    match mode {
        ProxyMode::Nftables => table_exists(),
        ProxyMode::Iptables => iptables::present(),
    }
}

/// Removes what either mode wrote (`tugboat proxy --cleanup`, and a mode switch).
pub fn cleanup() -> anyhow::Result<()> {
    let nft = remove();
    iptables::remove()?;
    nft
}

/// One endpoint of a service port.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Endpoint {
    pub ip: Ipv4Addr,
    pub port: u16,
    /// On this node.
    pub local: bool,
}

/// One port of a Service, as the proxy programs it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct ServicePort {
    /// `<namespace>/<name>/<protocol>/<port>`: names its chains.
    pub id: String,
    pub cluster_ip: Ipv4Addr,
    pub external_ips: Vec<Ipv4Addr>,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: String,
    pub port: u16,
    pub node_port: Option<u16>,
    /// Ready endpoints.
    pub endpoints: Vec<Endpoint>,
    /// `sessionAffinity: ClientIP`: how long a client sticks to its endpoint (seconds).
    pub affinity: Option<i32>,
    /// `externalTrafficPolicy: Local`: NodePort and external traffic only to this node's
    /// endpoints, keeping the client's address.
    pub external_local: bool,
}

fn key_of(meta: &kube::api::ObjectMeta) -> (String, String) {
    (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default())
}

/// The service ports of `services` with their ready `endpoints` (headless, IPv6 and
/// ExternalName services are left alone).
pub fn service_ports<'a>(
    services: impl IntoIterator<Item = &'a Service>,
    endpoints: &HashMap<(String, String), Arc<Endpoints>>,
    node_name: &str,
) -> Vec<ServicePort> {
    let mut ports: Vec<ServicePort> = services
        .into_iter()
        .flat_map(|s| ports_of(s, endpoints.get(&key_of(&s.metadata)).map(|e| &**e), node_name))
        .collect();
    ports.sort();
    ports
}

/// The ports of one Service with its ready `endpoints`.
pub fn ports_of(service: &Service, endpoints: Option<&Endpoints>, node_name: &str) -> Vec<ServicePort> {
    let mut ports = Vec::new();
    let Some(spec) = &service.spec else { return ports };
    let Some(cluster_ip) = spec.cluster_ip.as_deref().and_then(|ip| ip.parse::<Ipv4Addr>().ok()) else {
        return ports;
    };
    let key = key_of(&service.metadata);
    let subsets = endpoints.and_then(|e| e.subsets.as_deref()).unwrap_or_default();
    // External IPs, and a LoadBalancer's ingress addresses (the built-in service load
    // balancer gives it the nodes' own), reached alike.
    let load_balancer = service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .filter(|_| spec.type_.as_deref() == Some("LoadBalancer"));
    let mut external_ips: Vec<Ipv4Addr> = spec
        .external_ips
        .iter()
        .flatten()
        .chain(load_balancer.into_iter().flatten().filter_map(|i| i.ip.as_ref()))
        .filter_map(|ip| ip.parse().ok())
        .collect();
    external_ips.sort();
    external_ips.dedup();
    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .unwrap_or(10800)
    });
    let external_local = spec.external_traffic_policy.as_deref() == Some("Local");
    for port in spec.ports.iter().flatten() {
        let protocol = port.protocol.as_deref().unwrap_or("TCP").to_lowercase();
        if !matches!(protocol.as_str(), "tcp" | "udp" | "sctp") {
            continue;
        }
        let Ok(number) = u16::try_from(port.port) else { continue };
        let mut targets = BTreeSet::new();
        for subset in subsets {
            let Some(target) = subset.ports.iter().flatten().find(|p| p.name == port.name) else { continue };
            let Ok(target_port) = u16::try_from(target.port) else { continue };
            for address in subset.addresses.iter().flatten() {
                let Ok(ip) = address.ip.parse::<Ipv4Addr>() else { continue };
                let local = address.node_name.as_deref() == Some(node_name);
                targets.insert(Endpoint { ip, port: target_port, local });
            }
        }
        ports.push(ServicePort {
            id: format!("{}/{}/{protocol}/{number}", key.0, key.1),
            cluster_ip,
            external_ips: external_ips.clone(),
            protocol,
            port: number,
            node_port: port.node_port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0),
            endpoints: targets.into_iter().collect(),
            affinity,
            external_local,
        });
    }
    ports.sort();
    ports
}

/// A Service's namespace and name.
pub type ServiceKey = (String, String);

/// The nftables rules kept per Service, so that a change costs only the Services it touches
/// (the rules of one never name another's chains or map keys; the hairpin addresses, which
/// several Services may share, are counted).
#[derive(Debug, Default, Clone)]
pub struct Parts {
    parts: HashMap<ServiceKey, (Vec<ServicePort>, Ruleset)>,
    hairpin: BTreeMap<Ipv4Addr, usize>,
}

/// What [`Parts::changes`] would change, for [`Parts::commit`] once it is written.
#[derive(Debug)]
pub struct Update {
    services: Vec<(ServiceKey, Vec<ServicePort>, Ruleset)>,
    hairpin: BTreeMap<Ipv4Addr, usize>,
}

impl Parts {
    /// Every Service's ports, programmed from nothing: the whole table's text and the parts.
    pub fn full(services: impl IntoIterator<Item = (ServiceKey, Vec<ServicePort>)>) -> (String, Parts) {
        let mut parts = Parts::default();
        let mut commands = Vec::new();
        let empty = Ruleset::default();
        for (key, ports) in services {
            let rules = Ruleset::new(&ports);
            // A Service's rules name only its own chains: each is written after the other.
            empty.changes_into(&rules, &mut commands);
            for ip in &rules.hairpin {
                *parts.hairpin.entry(*ip).or_default() += 1;
            }
            parts.parts.insert(key, (ports, rules));
        }
        let hairpin: BTreeSet<Ipv4Addr> = parts.hairpin.keys().copied().collect();
        hairpin_changes(&BTreeSet::new(), &hairpin, &mut commands);
        (fresh_table() + &nft::text(&commands), parts)
    }

    /// The transaction replacing the Services in `changed` (their ports now; none: gone).
    /// Services whose ports are unchanged cost nothing.
    pub fn changes(&self, changed: Vec<(ServiceKey, Vec<ServicePort>)>) -> (Vec<Command>, Update) {
        let empty = (Vec::new(), Ruleset::default());
        let mut services = Vec::new();
        for (key, ports) in changed {
            let (old_ports, _) = self.parts.get(&key).unwrap_or(&empty);
            if *old_ports != ports {
                let rules = Ruleset::new(&ports);
                services.push((key, ports, rules));
            }
        }
        // Services going away first: a new one may take over an address a gone one held.
        services.sort_by_key(|(_, ports, _)| !ports.is_empty());
        let mut commands = Vec::new();
        let mut hairpin = self.hairpin.clone();
        for (key, _, rules) in &services {
            let (_, old) = self.parts.get(key).unwrap_or(&empty);
            old.changes_into(rules, &mut commands);
            for ip in &old.hairpin {
                if let Some(count) = hairpin.get_mut(ip) {
                    *count -= 1;
                }
            }
            for ip in &rules.hairpin {
                *hairpin.entry(*ip).or_default() += 1;
            }
        }
        hairpin.retain(|_, count| *count > 0);
        let before: BTreeSet<Ipv4Addr> = self.hairpin.keys().copied().collect();
        let after: BTreeSet<Ipv4Addr> = hairpin.keys().copied().collect();
        hairpin_changes(&before, &after, &mut commands);
        (commands, Update { services, hairpin })
    }

    pub fn commit(&mut self, update: Update) {
        for (key, ports, rules) in update.services {
            if ports.is_empty() {
                self.parts.remove(&key);
            } else {
                self.parts.insert(key, (ports, rules));
            }
        }
        self.hairpin = update.hairpin;
    }

    pub fn keys(&self) -> impl Iterator<Item = &ServiceKey> {
        self.parts.keys()
    }
}

/// The per-service part of the proxy's table: chains with their rules, map and set elements,
/// affinity sets. The fixed part (hooks, maps' declarations) is [`base`].
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub chains: BTreeMap<String, Vec<Rule>>,
    /// (map or set, key) → the chain a map's verdict goes to (none for sets).
    pub elements: BTreeMap<(&'static str, Key), Option<String>>,
    /// Affinity sets and their timeouts (seconds).
    pub affinity_sets: BTreeMap<String, i32>,
    /// This node's endpoints: a pod DNATed to itself (reaching its own Service) is
    /// masqueraded, or its reply would skip the DNAT's undoing. One set for the table
    /// (`hairpin`, of (address . address) pairs) rather than a rule per endpoint.
    pub hairpin: BTreeSet<Ipv4Addr>,
}

const SERVICE_IPS: &str = "service-ips";
const NODEPORTS: &str = "service-nodeports";
const NO_ENDPOINT_SERVICES: &str = "no-endpoint-services";
const NO_ENDPOINT_NODEPORTS: &str = "no-endpoint-nodeports";
const HAIRPIN: &str = "hairpin";

/// The `nft -f` text deleting the table (if there) and making it anew with its fixed part.
fn fresh_table() -> String {
    format!("table ip {TABLE}\ndelete table ip {TABLE}\n{}", base())
}

/// The table's fixed part, made with the table.
pub fn base() -> String {
    let mark = MASQUERADE_MARK;
    format!(
        "table ip {TABLE} {{\n\
         \tmap {SERVICE_IPS} {{ type ipv4_addr . inet_proto . inet_service : verdict; }}\n\
         \tmap {NODEPORTS} {{ type inet_proto . inet_service : verdict; }}\n\
         \tset {NO_ENDPOINT_SERVICES} {{ type ipv4_addr . inet_proto . inet_service; }}\n\
         \tset {NO_ENDPOINT_NODEPORTS} {{ type inet_proto . inet_service; }}\n\
         \tset {HAIRPIN} {{ type ipv4_addr . ipv4_addr; }}\n\
         \tchain services {{\n\
         \t\tip daddr . meta l4proto . th dport vmap @{SERVICE_IPS}\n\
         \t\tfib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport vmap @{NODEPORTS}\n\
         \t}}\n\
         \tchain nat-prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services\n\t}}\n\
         \tchain nat-output {{\n\t\ttype nat hook output priority -100; policy accept;\n\t\tjump services\n\t}}\n\
         \tchain nat-postrouting {{\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr . ip daddr @{HAIRPIN} masquerade fully-random\n\
         \t\tmeta mark & {mark} == 0 return\n\
         \t\tmeta mark set meta mark ^ {mark}\n\
         \t\tmasquerade fully-random\n\t}}\n\
         \tchain mark-for-masquerade {{\n\t\tmeta mark set meta mark | {mark}\n\t}}\n\
         \tchain reject-services {{\n\
         \t\tip daddr . meta l4proto . th dport @{NO_ENDPOINT_SERVICES} reject with icmp type host-unreachable\n\t}}\n\
         \tchain reject-nodeports {{\n\
         \t\tfib daddr type local ip daddr != 127.0.0.0/8 meta l4proto . th dport @{NO_ENDPOINT_NODEPORTS} reject with icmp type host-unreachable\n\t}}\n\
         \tchain filter-forward {{\n\t\ttype filter hook forward priority -5; policy accept;\n\t\tjump reject-services\n\t}}\n\
         \tchain filter-output {{\n\t\ttype filter hook output priority -5; policy accept;\n\t\tjump reject-services\n\t\tjump reject-nodeports\n\t}}\n\
         \tchain filter-input {{\n\t\ttype filter hook input priority -5; policy accept;\n\t\tjump reject-nodeports\n\t}}\n\
         }}\n"
    )
}

impl Ruleset {
    /// The chains, elements and sets for `ports`.
    pub fn new(ports: &[ServicePort]) -> Ruleset {
        let mut set = Ruleset::default();
        for sp in ports {
            let protocol = nft::protocol_number(&sp.protocol);
            let svc = format!("svc-{}", sp.id);
            let ext = format!("ext-{}", sp.id);
            let addresses = std::iter::once(sp.cluster_ip).chain(sp.external_ips.iter().copied());
            let ep_chain = |e: &Endpoint| format!("ep-{}/{}/{}", sp.id, e.ip, e.port);
            // The timeout is in the name: a set in use by rules cannot be deleted, so a new
            // timeout is a new set (the rules move to it, the old one goes last).
            let affinity_set = |e: &Endpoint| format!("aff-{}/{}/{}/{}", sp.id, e.ip, e.port, sp.affinity.unwrap_or(0));
            // With session affinity, a chain per endpoint (it records its clients); without,
            // the chooser DNATs itself (fewer chains: the kernel validates every jump).
            if let Some(timeout) = sp.affinity {
                for e in &sp.endpoints {
                    let name = affinity_set(e);
                    let rules = vec![
                        Rule::Remember { set: name.clone() },
                        Rule::Dnat { pick: 1, protocol, ip: e.ip, port: e.port },
                    ];
                    set.affinity_sets.insert(name, timeout);
                    set.chains.insert(ep_chain(e), rules);
                }
            }
            // Endpoint i of n is taken with probability 1/(n-i) once the ones before it were
            // not: 1/n each. (No anonymous vmap: the kernel names each anonymous set by
            // scanning the table's sets, which makes big tables quadratic.)
            let left = |among: &[&Endpoint], i: usize| u32::try_from(among.len() - i).unwrap_or(u32::MAX);
            let choose = |among: &[&Endpoint]| -> Vec<Rule> {
                let mut rules = Vec::new();
                if sp.affinity.is_some() {
                    for e in among {
                        rules.push(Rule::Sticky { set: affinity_set(e), chain: ep_chain(e) });
                    }
                    for (i, e) in among.iter().enumerate() {
                        rules.push(Rule::Goto { pick: left(among, i), chain: ep_chain(e) });
                    }
                    return rules;
                }
                for (i, e) in among.iter().enumerate() {
                    rules.push(Rule::Dnat { pick: left(among, i), protocol, ip: e.ip, port: e.port });
                }
                rules
            };
            set.hairpin.extend(sp.endpoints.iter().filter(|e| e.local).map(|e| e.ip));
            let all: Vec<&Endpoint> = sp.endpoints.iter().collect();
            let external = !sp.external_ips.is_empty() || sp.node_port.is_some();
            if all.is_empty() {
                for address in addresses.clone() {
                    set.elements.insert((NO_ENDPOINT_SERVICES, Key::Service(address, protocol, sp.port)), None);
                }
            } else {
                set.chains.insert(svc.clone(), choose(&all));
                set.elements.insert((SERVICE_IPS, Key::Service(sp.cluster_ip, protocol, sp.port)), Some(svc.clone()));
            }
            if !external {
                continue;
            }
            let local: Vec<&Endpoint> = sp.endpoints.iter().filter(|e| e.local).collect();
            let reachable = if sp.external_local { !local.is_empty() } else { !all.is_empty() };
            if reachable {
                let rules = if sp.external_local {
                    choose(&local)
                } else {
                    vec![Rule::Jump { chain: "mark-for-masquerade".into() }, Rule::Goto { pick: 1, chain: svc.clone() }]
                };
                set.chains.insert(ext.clone(), rules);
            }
            for ip in &sp.external_ips {
                let key = Key::Service(*ip, protocol, sp.port);
                if reachable {
                    set.elements.insert((SERVICE_IPS, key), Some(ext.clone()));
                } else if !all.is_empty() {
                    set.elements.insert((NO_ENDPOINT_SERVICES, key), None);
                }
            }
            if let Some(node_port) = sp.node_port {
                let key = Key::NodePort(protocol, node_port);
                if reachable {
                    set.elements.insert((NODEPORTS, key), Some(ext.clone()));
                } else {
                    set.elements.insert((NO_ENDPOINT_NODEPORTS, key), None);
                }
            }
        }
        set
    }

    /// The `nft -f` text making the whole table anew with this ruleset.
    pub fn full(&self) -> String {
        let mut commands = Vec::new();
        Ruleset::default().changes_into(self, &mut commands);
        hairpin_changes(&BTreeSet::new(), &self.hairpin, &mut commands);
        fresh_table() + &nft::text(&commands)
    }

    /// The commands turning the table from `self` into `next` (none: nothing to do).
    pub fn changes(&self, next: &Ruleset) -> Vec<Command> {
        let mut commands = Vec::new();
        self.changes_into(next, &mut commands);
        hairpin_changes(&self.hairpin, &next.hairpin, &mut commands);
        commands
    }

    fn changes_into(&self, next: &Ruleset, out: &mut Vec<Command>) {
        // (Set names carry their timeout: a set is never changed, only made or deleted.)
        for (name, timeout) in &next.affinity_sets {
            if !self.affinity_sets.contains_key(name) {
                out.push(Command::AddSet { name: name.clone(), timeout: *timeout });
            }
        }
        for name in next.chains.keys().filter(|c| !self.chains.contains_key(*c)) {
            out.push(Command::AddChain { name: name.clone() });
        }
        for (name, rules) in &next.chains {
            match self.chains.get(name) {
                Some(old) if old == rules => continue,
                Some(_) => out.push(Command::FlushChain { name: name.clone() }),
                None => {}
            }
            for rule in rules {
                out.push(Command::AddRule { chain: name.clone(), rule: rule.clone() });
            }
        }
        for ((set, key), value) in &self.elements {
            if next.elements.get(&(*set, *key)) != Some(value) {
                out.push(Command::DeleteElements { set, keys: vec![*key] });
            }
        }
        for ((set, key), value) in &next.elements {
            if self.elements.get(&(*set, *key)) != Some(value) {
                out.push(Command::AddElements { set, elements: vec![(*key, value.clone())] });
            }
        }
        let stale: Vec<&String> = self.chains.keys().filter(|c| !next.chains.contains_key(*c)).collect();
        for name in &stale {
            out.push(Command::FlushChain { name: (*name).clone() });
        }
        for name in &stale {
            out.push(Command::DeleteChain { name: (*name).clone() });
        }
        for name in self.affinity_sets.keys().filter(|s| !next.affinity_sets.contains_key(*s)) {
            out.push(Command::DeleteSet { name: name.clone() });
        }
    }
}

/// The elements of the `hairpin` set going from `old` to `new` addresses.
fn hairpin_changes(old: &BTreeSet<Ipv4Addr>, new: &BTreeSet<Ipv4Addr>, out: &mut Vec<Command>) {
    let gone: Vec<Key> = old.difference(new).map(|ip| Key::Hairpin(*ip)).collect();
    let came: Vec<(Key, Option<String>)> = new.difference(old).map(|ip| (Key::Hairpin(*ip), None)).collect();
    if !gone.is_empty() {
        out.push(Command::DeleteElements { set: HAIRPIN, keys: gone });
    }
    if !came.is_empty() {
        out.push(Command::AddElements { set: HAIRPIN, elements: came });
    }
}

/// Deletes the proxy's table (nothing when it is not there).
pub fn remove() -> anyhow::Result<()> {
    crate::pod_network::nft(&format!("table ip {TABLE}\ndelete table ip {TABLE}\n"))
}

/// The proxy's figures, served as Prometheus text.
#[derive(Debug)]
pub struct Metrics {
    registry: prometheus_client::registry::Registry,
    /// One sync: rules computed and written.
    sync_duration: prometheus_client::metrics::histogram::Histogram,
    /// From a Service or Endpoints change seen to the rules for it live.
    programming_duration: prometheus_client::metrics::histogram::Histogram,
    /// Syncs `nft` refused.
    failures: prometheus_client::metrics::counter::Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
        let mut registry = prometheus_client::registry::Registry::default();
        let sync_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let programming_duration = Histogram::new(exponential_buckets(0.001, 2.0, 15));
        let failures = prometheus_client::metrics::counter::Counter::default();
        registry.register(
            "tugboat_proxy_sync_proxy_rules_duration_seconds",
            "How long one sync of the service rules took",
            sync_duration.clone(),
        );
        registry.register(
            "tugboat_proxy_network_programming_duration_seconds",
            "From a Service or Endpoints change seen to its rules live",
            programming_duration.clone(),
        );
        registry.register("tugboat_proxy_sync_proxy_rules_failures", "Syncs nftables refused", failures.clone());
        Metrics { registry, sync_duration, programming_duration, failures }
    }
}

impl Metrics {
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// What the watches saw since the last sync: when the first change came, and which objects
/// (namespace, name) changed.
#[derive(Debug, Default)]
pub(crate) struct Changes {
    since: Option<Instant>,
    keys: HashSet<ServiceKey>,
}

/// A reflector of `api` whose every event wakes `wake`, and is recorded in `changes` if given.
pub(crate) fn reflect<K>(api: Api<K>, wake: Arc<Notify>, changes: Option<Arc<Mutex<Changes>>>) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + for<'de> k8s_openapi::serde::Deserialize<'de>
        + std::fmt::Debug
        + Send
        + Sync
        + 'static,
{
    tugboat_objects::informer::reflect(api, (), "service proxy", move |object: Option<&K>| {
        if let Some(changes) = &changes {
            let mut changes = changes.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(object) = object {
                changes.keys.insert(key_of(object.meta()));
            }
            changes.since.get_or_insert_with(Instant::now);
        }
        wake.notify_one();
    })
}

/// Serves `/metrics` on `address` (a failure to bind is logged: the proxy runs without).
async fn serve_metrics(address: SocketAddr, metrics: Arc<Metrics>) {
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let metrics = metrics.clone();
            async move { metrics.encode() }
        }),
    );
    match tokio::net::TcpListener::bind(address).await {
        Ok(listener) => {
            if let Err(error) = axum::serve(listener, app).await {
                tracing::warn!(%error, "service proxy: metrics server stopped");
            }
        }
        Err(error) => tracing::warn!(%address, %error, "service proxy: cannot serve metrics"),
    }
}

/// Keeps the node's service rules in step with the Services and Endpoints until the process
/// ends.
pub async fn run(client: kube::Client, config: ProxyConfig) {
    let metrics = Arc::new(Metrics::default());
    if let Some(address) = config.metrics_address {
        tokio::spawn(serve_metrics(address, metrics.clone()));
    }
    let wake = Arc::new(Notify::new());
    let changes = Arc::new(Mutex::new(Changes::default()));
    let services = reflect(Api::<Service>::all(client.clone()), wake.clone(), Some(changes.clone()));
    let endpoints = reflect(Api::<Endpoints>::all(client), wake.clone(), Some(changes.clone()));
    // The first rules wait for both full lists: a table made from half the picture would
    // cut connections that work.
    for ready in [services.wait_until_ready().await.is_ok(), endpoints.wait_until_ready().await.is_ok()] {
        if !ready {
            return;
        }
    }
    // The other mode's rules would shadow or double this one's.
    let _ = match config.mode {
        ProxyMode::Nftables => iptables::remove(),
        ProxyMode::Iptables => remove(),
    };
    let node = config.node_name.clone();
    let ports_for = |key: &ServiceKey| -> Vec<ServicePort> {
        match services.get(&ObjectRef::new(&key.1).within(&key.0)) {
            Some(service) => {
                let endpoints = endpoints.get(&ObjectRef::new(&key.1).within(&key.0));
                ports_of(&service, endpoints.as_deref(), &node)
            }
            None => Vec::new(),
        }
    };
    let mut applied: Option<Applied> = None;
    let socket = Arc::new(Mutex::new(None));
    let mut warned = false;
    let mut resync = false;
    loop {
        let (since, keys) = {
            let mut changes = changes.lock().unwrap_or_else(|e| e.into_inner());
            (changes.since.take(), std::mem::take(&mut changes.keys))
        };
        let started = Instant::now();
        let all_keys = || services.state().iter().map(|s| key_of(&s.metadata)).collect::<HashSet<_>>();
        let first = applied.is_none();
        let (write, next) = match (config.mode, applied.take()) {
            (ProxyMode::Nftables, Some(Applied::Nftables(parts))) => {
                // Only the Services that changed (all of them on a resync).
                let mut keys = keys;
                if resync {
                    keys.extend(all_keys());
                    keys.extend(parts.keys().cloned());
                }
                let changed = keys.into_iter().map(|k| {
                    let ports = ports_for(&k);
                    (k, ports)
                });
                let (commands, updates) = parts.changes(changed.collect());
                (Write::Commands(commands), Next::Parts(parts, updates))
            }
            (ProxyMode::Nftables, _) => {
                let (text, parts) = Parts::full(all_keys().into_iter().map(|k| {
                    let ports = ports_for(&k);
                    (k, ports)
                }));
                (Write::Nft(text), Next::Whole(Applied::Nftables(parts)))
            }
            (ProxyMode::Iptables, current) => {
                let by_name: HashMap<ServiceKey, Arc<Endpoints>> =
                    endpoints.state().into_iter().map(|e| (key_of(&e.metadata), e)).collect();
                let listed = services.state();
                let next = iptables::Tables::new(&service_ports(listed.iter().map(|s| &**s), &by_name, &node));
                let current = match &current {
                    Some(Applied::Iptables(tables)) => Some(tables),
                    _ => None,
                };
                (Write::Iptables(iptables::Tables::changes(current, &next)), Next::Whole(Applied::Iptables(next)))
            }
        };
        resync = false;
        if !write.is_empty() || first {
            let socket = socket.clone();
            let result = tokio::task::spawn_blocking(move || write.apply(first, &socket)).await;
            match result.map_err(anyhow::Error::from).and_then(|r| r) {
                Ok(()) => {
                    applied = Some(next.done());
                    warned = false;
                    let now = Instant::now();
                    metrics.sync_duration.observe((now - started).as_secs_f64());
                    if let Some(since) = since {
                        metrics.programming_duration.observe((now - since).as_secs_f64());
                    }
                }
                Err(error) => {
                    metrics.failures.inc();
                    // Write everything next time (`applied` is none), after a pause.
                    if !warned {
                        warned = true;
                        tracing::warn!(error = %format!("{error:#}"), mode = ?config.mode, "service proxy: cannot program the rules");
                    }
                    changes.lock().unwrap_or_else(|e| e.into_inner()).since.get_or_insert(since.unwrap_or(started));
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        } else {
            applied = Some(next.done());
        }
        // A resync now and then puts back what someone else removed, and catches what a
        // watch that started over did not report.
        if tokio::time::timeout(Duration::from_secs(30), wake.notified()).await.is_err() {
            let mode = config.mode;
            let there = tokio::task::spawn_blocking(move || present(mode)).await.unwrap_or(false);
            applied = applied.filter(|_| there);
            resync = true;
        }
    }
}

/// Whether the proxy's table is in the kernel.
fn table_exists() -> bool {
    // The list of tables, not the table: that would print every rule.
    std::process::Command::new("nft")
        .args(["list", "tables", "ip"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).lines().any(|l| l.trim() == format!("table ip {TABLE}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services() -> Vec<Service> {
        serde_json::from_value(serde_json::json!([
            {"metadata": {"name": "db", "namespace": "shop"},
             "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "sql", "port": 5432, "protocol": "TCP"}]}},
            {"metadata": {"name": "none", "namespace": "shop"},
             "spec": {"clusterIP": "None", "ports": [{"port": 80}]}},
            {"metadata": {"name": "empty", "namespace": "shop"},
             "spec": {"clusterIP": "10.96.0.21", "type": "NodePort", "ports": [{"port": 80, "nodePort": 30080}]}},
            {"metadata": {"name": "web", "namespace": "shop"},
             "spec": {"clusterIP": "10.96.0.22", "type": "NodePort", "externalTrafficPolicy": "Local",
                      "sessionAffinity": "ClientIP",
                      "ports": [{"port": 80, "nodePort": 30081, "protocol": "TCP"}]}},
        ]))
        .unwrap()
    }

    fn endpoints(db: &[&str]) -> HashMap<(String, String), Arc<Endpoints>> {
        let db: Vec<_> = db.iter().map(|ip| serde_json::json!({"ip": ip, "nodeName": "n2"})).collect();
        let list: Vec<Endpoints> = serde_json::from_value(serde_json::json!([
            {"metadata": {"name": "db", "namespace": "shop"},
             "subsets": [{"addresses": db, "notReadyAddresses": [{"ip": "10.244.2.9"}],
                          "ports": [{"name": "sql", "port": 15432}]}]},
            {"metadata": {"name": "web", "namespace": "shop"},
             "subsets": [{"addresses": [{"ip": "10.244.1.3", "nodeName": "n1"}, {"ip": "10.244.2.3", "nodeName": "n2"}],
                          "ports": [{"port": 8080}]}]},
        ]))
        .unwrap();
        list.into_iter().map(|e| (key_of(&e.metadata), Arc::new(e))).collect()
    }

    #[test]
    fn services_map_to_their_ready_endpoints() {
        let ports = service_ports(&services(), &endpoints(&["10.244.1.5", "10.244.2.7"]), "n1");
        assert_eq!(ports.len(), 3, "headless left alone: {ports:?}");
        let db = &ports[0];
        assert_eq!(db.id, "shop/db/tcp/5432");
        let ready: Vec<String> = db.endpoints.iter().map(|e| format!("{}:{}", e.ip, e.port)).collect();
        assert_eq!(ready, ["10.244.1.5:15432", "10.244.2.7:15432"], "ready ones only");
        let rules = Ruleset::new(&ports);
        let text = |rules: &[Rule]| rules.iter().map(Rule::to_string).collect::<Vec<_>>();
        let chooser = text(&rules.chains["svc-shop/db/tcp/5432"]);
        assert_eq!(
            chooser,
            [
                "numgen random mod 2 == 0 meta l4proto tcp dnat to 10.244.1.5:15432",
                "meta l4proto tcp dnat to 10.244.2.7:15432"
            ],
            "one endpoint at random"
        );
        let ip = |text: &str| text.parse::<Ipv4Addr>().unwrap();
        assert_eq!(
            rules.elements[&(SERVICE_IPS, Key::Service(ip("10.96.0.20"), 6, 5432))].as_deref(),
            Some("svc-shop/db/tcp/5432")
        );
        // No endpoints: rejected, on its ClusterIP and its NodePort.
        assert!(rules.elements.contains_key(&(NO_ENDPOINT_SERVICES, Key::Service(ip("10.96.0.21"), 6, 80))));
        assert!(rules.elements.contains_key(&(NO_ENDPOINT_NODEPORTS, Key::NodePort(6, 30080))));
        // externalTrafficPolicy Local: NodePort traffic to the local endpoint only, not
        // masqueraded; session affinity checked before the random pick.
        let ext = text(&rules.chains["ext-shop/web/tcp/80"]);
        assert_eq!(
            ext[0],
            "ip saddr @aff-shop/web/tcp/80/10.244.1.3/8080/10800 goto ep-shop/web/tcp/80/10.244.1.3/8080"
        );
        assert_eq!(ext[1], "goto ep-shop/web/tcp/80/10.244.1.3/8080");
        let endpoint = text(&rules.chains["ep-shop/web/tcp/80/10.244.1.3/8080"]);
        assert_eq!(endpoint[1], "meta l4proto tcp dnat to 10.244.1.3:8080");
        assert_eq!(rules.hairpin.iter().map(|ip| ip.to_string()).collect::<Vec<_>>(), ["10.244.1.3"], "n1's endpoints");
        assert!(rules.full().contains("add element ip tugboat-proxy hairpin { 10.244.1.3 . 10.244.1.3 }"));
        assert_eq!(rules.elements[&(NODEPORTS, Key::NodePort(6, 30081))].as_deref(), Some("ext-shop/web/tcp/80"));
        assert_eq!(rules.affinity_sets.len(), 2);
        assert!(
            text(&rules.chains["ep-shop/web/tcp/80/10.244.2.3/8080"])
                .contains(&"update @aff-shop/web/tcp/80/10.244.2.3/8080/10800 { ip saddr }".to_string())
        );
        // On another node the same NodePort has no local endpoint there... (n3 has none).
        let elsewhere = Ruleset::new(&service_ports(&services(), &endpoints(&[]), "n3"));
        assert!(elsewhere.elements.contains_key(&(NO_ENDPOINT_NODEPORTS, Key::NodePort(6, 30081))));
        assert!(
            elsewhere.elements.contains_key(&(SERVICE_IPS, Key::Service(ip("10.96.0.22"), 6, 80))),
            "ClusterIP still"
        );
    }

    #[test]
    fn a_change_touches_only_what_changed() {
        let before = Ruleset::new(&service_ports(&services(), &endpoints(&["10.244.1.5", "10.244.2.7"]), "n1"));
        let after = Ruleset::new(&service_ports(&services(), &endpoints(&["10.244.2.7"]), "n1"));
        let text = nft::text(&before.changes(&after));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines,
            [
                "flush chain ip tugboat-proxy svc-shop/db/tcp/5432",
                "add rule ip tugboat-proxy svc-shop/db/tcp/5432 meta l4proto tcp dnat to 10.244.2.7:15432",
            ],
            "{text}"
        );
        assert_eq!(after.changes(&after), [], "nothing to do");
        let gone = Ruleset::new(&service_ports(&services(), &endpoints(&[]), "n1"));
        let text = nft::text(&after.changes(&gone));
        assert!(text.contains("delete element ip tugboat-proxy service-ips { 10.96.0.20 . tcp . 5432 }"), "{text}");
        assert!(
            text.contains("add element ip tugboat-proxy no-endpoint-services { 10.96.0.20 . tcp . 5432 }"),
            "{text}"
        );
        // Kept per Service: a change of one writes only its own rules.
        let key = |name: &str| ("shop".to_string(), name.to_string());
        let by_service = |ep: &[&str]| -> Vec<(ServiceKey, Vec<ServicePort>)> {
            let endpoints = endpoints(ep);
            services()
                .iter()
                .map(|s| (key_of(&s.metadata), ports_of(s, endpoints.get(&key_of(&s.metadata)).map(|e| &**e), "n1")))
                .collect()
        };
        let (whole, mut parts) = Parts::full(by_service(&["10.244.1.5", "10.244.2.7"]));
        let sorted = |text: &str| {
            let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
            lines.sort();
            lines
        };
        assert_eq!(sorted(&whole), sorted(&before.full()), "the parts make the same table, Service by Service");
        let db = by_service(&["10.244.2.7"]).into_iter().find(|(k, _)| *k == key("db")).unwrap();
        let web = by_service(&["10.244.2.7"]).into_iter().find(|(k, _)| *k == key("web")).unwrap();
        let (commands, updates) = parts.changes(vec![db, web]);
        assert_eq!(commands, before.changes(&after), "web did not change: only db's rules");
        parts.commit(updates);
        let (commands, updates) = parts.changes(vec![(key("db"), Vec::new())]);
        let text = nft::text(&commands);
        assert!(text.contains("delete element ip tugboat-proxy service-ips { 10.96.0.20 . tcp . 5432 }"), "{text}");
        assert!(text.contains("delete chain ip tugboat-proxy svc-shop/db/tcp/5432"), "{text}");
        parts.commit(updates);
        assert!(!parts.keys().any(|k| *k == key("db")));
        // The kernel takes every form (checked only: `nft --check` changes nothing).
        for text in [before.full(), format!("{}{}", before.full(), nft::text(&before.changes(&gone)))] {
            crate::pod_network::feed("nft", &["--check", "-f", "-"], &text).unwrap_or_else(|e| panic!("{e:#}\n{text}"));
        }
        let full = after.full();
        assert!(full.starts_with("table ip tugboat-proxy\ndelete table ip tugboat-proxy\ntable ip tugboat-proxy {"));
    }

    /// Runs `check` on a thread of its own in a network namespace of its own (made with
    /// `unshare(CLONE_NEWNET)`, which moves that thread alone; the `nft` it runs inherits it), so
    /// no table it writes reaches the host; the namespace goes with the thread.
    fn in_own_netns(check: impl FnOnce() + Send + 'static) {
        std::thread::spawn(move || {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).expect("unshare(CLONE_NEWNET): run as root");
            check();
        })
        .join()
        .expect("the check passes");
    }

    fn list_table() -> String {
        let out = std::process::Command::new("nft").args(["list", "table", "ip", TABLE]).output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn netlink_writes_what_nft_writes() {
        in_own_netns(|| {
            let on_n1 = |db: &[&str]| service_ports(&services(), &endpoints(db), "n1");
            let a = on_n1(&["10.244.1.5", "10.244.2.7"]);
            // Every rule shape: web masqueraded and sent on (`jump`), its affinity timeout changed.
            let mut d = on_n1(&[]);
            for port in &mut d {
                port.external_local = false;
                port.affinity = port.affinity.map(|_| 600);
            }
            let states = [
                Ruleset::default(),
                Ruleset::new(&a),
                Ruleset::new(&on_n1(&["10.244.2.7"])),
                Ruleset::new(&on_n1(&[])),
                Ruleset::new(&d),
                Ruleset::new(&a),
                Ruleset::default(),
            ];
            let mut socket = netlink::Socket::open().unwrap();
            for pair in states.windows(2) {
                let (from, to) = (&pair[0], &pair[1]);
                let commands = from.changes(to);
                crate::pod_network::nft(&from.full()).unwrap();
                socket.write(&commands).unwrap_or_else(|e| panic!("{e:#}\n{}", nft::text(&commands)));
                let by_netlink = list_table();
                crate::pod_network::nft(&from.full()).unwrap();
                crate::pod_network::nft(&nft::text(&commands)).unwrap();
                let by_nft = list_table();
                assert_eq!(by_netlink, by_nft, "{}", nft::text(&commands));
                // And the change makes the table that `to` makes from nothing.
                crate::pod_network::nft(&to.full()).unwrap();
                let sorted = |text: &str| {
                    let mut lines: Vec<String> = text.lines().map(|l| l.trim().to_string()).collect();
                    lines.sort();
                    lines
                };
                assert_eq!(sorted(&by_netlink), sorted(&list_table()));
            }
            // A refused command names itself, and the batch leaves nothing behind.
            let bad = [
                Command::AddChain { name: "fresh".into() },
                Command::AddRule { chain: "missing".into(), rule: Rule::Jump { chain: "fresh".into() } },
            ];
            let error = socket.write(&bad).unwrap_err().to_string();
            assert!(error.contains("add rule ip tugboat-proxy missing jump fresh"), "{error}");
            assert!(!list_table().contains("fresh"), "all or nothing");
        });
    }
}
