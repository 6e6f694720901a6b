//! The service proxy, begun: ClusterIP Services reach their ready endpoints through nftables
//! on every node (run with the kubelet, so in `tugboat server` and `tugboat agent`).
//!
//! One table, `ip tugboat-proxy`, replaced whole in one `nft -f` transaction when the Services
//! or Endpoints change: a verdict map from (ClusterIP, protocol, port) to a chain per service
//! port, which picks one ready endpoint at random (`numgen random mod N`) and DNATs to it;
//! hooked at prerouting (pods' traffic) and output (the node's own). Ports without ready
//! endpoints are rejected. Incremental updates, NodePorts, session affinity, hairpin traffic and
//! the iptables mode come next.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::api::{Api, ListParams};

/// The nftables table the proxy owns.
pub const TABLE: &str = "tugboat-proxy";
const PERIOD: Duration = Duration::from_secs(1);

/// One service port as the proxy programs it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Rule {
    pub cluster_ip: String,
    pub protocol: String,
    pub port: i32,
    /// Ready endpoints, `ip:port`.
    pub endpoints: Vec<String>,
}

/// The rules for `services` and their `endpoints` (headless and non-IPv4 services left alone).
pub fn rules(services: &[Service], endpoints: &[Endpoints]) -> Vec<Rule> {
    let by_name: BTreeMap<(String, String), &Endpoints> = endpoints
        .iter()
        .map(|e| ((e.metadata.namespace.clone().unwrap_or_default(), e.metadata.name.clone().unwrap_or_default()), e))
        .collect();
    let mut rules = Vec::new();
    for service in services {
        let Some(spec) = &service.spec else { continue };
        let Some(ip) = spec.cluster_ip.as_deref().filter(|ip| ip.parse::<std::net::Ipv4Addr>().is_ok()) else {
            continue;
        };
        let key =
            (service.metadata.namespace.clone().unwrap_or_default(), service.metadata.name.clone().unwrap_or_default());
        let subsets = by_name.get(&key).and_then(|e| e.subsets.as_deref()).unwrap_or_default();
        for port in spec.ports.iter().flatten() {
            let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into()).to_lowercase();
            if protocol != "tcp" && protocol != "udp" {
                continue;
            }
            let mut targets = Vec::new();
            for subset in subsets {
                let Some(target) = subset.ports.iter().flatten().find(|p| p.name == port.name) else { continue };
                for address in subset.addresses.iter().flatten() {
                    targets.push(format!("{}:{}", address.ip, target.port));
                }
            }
            targets.sort();
            rules.push(Rule { cluster_ip: ip.to_string(), protocol, port: port.port, endpoints: targets });
        }
    }
    rules.sort();
    rules
}

/// The whole table for `rules`, for `nft -f -`.
pub fn ruleset(rules: &[Rule]) -> String {
    let mut map = Vec::new();
    let mut chains = String::new();
    for (i, rule) in rules.iter().enumerate() {
        let chain = format!("svc-{i}");
        map.push(format!("{} . {} . {} : goto {chain}", rule.cluster_ip, rule.protocol, rule.port));
        let protocol = &rule.protocol;
        let body = match rule.endpoints.len() {
            0 => "\t\treject with icmp type host-unreachable\n".to_string(),
            1 => format!("\t\tmeta l4proto {protocol} dnat ip to {}\n", rule.endpoints[0]),
            n => {
                let picks: Vec<String> = rule
                    .endpoints
                    .iter()
                    .enumerate()
                    .map(|(k, e)| format!("{k} : {}", e.replace(':', " . ")))
                    .collect();
                format!("\t\tmeta l4proto {protocol} dnat ip to numgen random mod {n} map {{ {} }}\n", picks.join(", "))
            }
        };
        chains.push_str(&format!("\tchain {chain} {{\n{body}\t}}\n"));
    }
    let elements = if map.is_empty() { String::new() } else { format!(" elements = {{ {} }};", map.join(", ")) };
    format!(
        "table ip {TABLE}\ndelete table ip {TABLE}\n\
         table ip {TABLE} {{\n\
         \tmap services {{ type ipv4_addr . inet_proto . inet_service : verdict;{elements} }}\n\
         \tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\
         \t\tip daddr . meta l4proto . th dport vmap @services\n\t}}\n\
         \tchain output {{\n\t\ttype nat hook output priority -100; policy accept;\n\
         \t\tip daddr . meta l4proto . th dport vmap @services\n\t}}\n\
         {chains}}}\n"
    )
}

/// Keeps the node's service rules in step with the Services and Endpoints.
pub async fn run(client: kube::Client) {
    let services: Api<Service> = Api::all(client.clone());
    let endpoints: Api<Endpoints> = Api::all(client);
    let mut applied: Option<String> = None;
    let mut warned = false;
    let all = ListParams::default();
    loop {
        tokio::time::sleep(PERIOD).await;
        let (listed, ready) = match tokio::try_join!(services.list(&all), endpoints.list(&all)) {
            Ok((s, e)) => (s.items, e.items),
            Err(error) => {
                tracing::debug!(%error, "service proxy: cannot list");
                continue;
            }
        };
        let ruleset = ruleset(&rules(&listed, &ready));
        if applied.as_ref() == Some(&ruleset) {
            continue;
        }
        match crate::network::nft(&ruleset) {
            Ok(()) => {
                applied = Some(ruleset);
                warned = false;
            }
            Err(error) if !warned => {
                warned = true;
                tracing::warn!(error = %format!("{error:#}"), "service proxy: cannot program nftables");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_map_to_their_ready_endpoints() {
        let services: Vec<Service> = serde_json::from_value(serde_json::json!([
            {"metadata": {"name": "db", "namespace": "shop"},
             "spec": {"clusterIP": "10.96.0.20", "ports": [{"name": "sql", "port": 5432, "protocol": "TCP"}]}},
            {"metadata": {"name": "none", "namespace": "shop"},
             "spec": {"clusterIP": "None", "ports": [{"port": 80}]}},
            {"metadata": {"name": "empty", "namespace": "shop"},
             "spec": {"clusterIP": "10.96.0.21", "ports": [{"port": 80}]}},
        ]))
        .unwrap();
        let endpoints: Vec<Endpoints> = serde_json::from_value(serde_json::json!([
            {"metadata": {"name": "db", "namespace": "shop"},
             "subsets": [{"addresses": [{"ip": "10.244.1.5"}, {"ip": "10.244.2.7"}],
                          "notReadyAddresses": [{"ip": "10.244.2.9"}],
                          "ports": [{"name": "sql", "port": 15432}]}]},
        ]))
        .unwrap();
        let rules = rules(&services, &endpoints);
        assert_eq!(rules.len(), 2, "headless left alone: {rules:?}");
        assert_eq!(rules[0].endpoints, ["10.244.1.5:15432", "10.244.2.7:15432"], "ready ones only");
        assert!(rules[1].endpoints.is_empty());
        let text = ruleset(&rules);
        assert!(text.contains("10.96.0.20 . tcp . 5432 : goto svc-0"), "{text}");
        let pick =
            "meta l4proto tcp dnat ip to numgen random mod 2 map { 0 : 10.244.1.5 . 15432, 1 : 10.244.2.7 . 15432 }";
        assert!(text.contains(pick), "{text}");
        assert!(text.contains("reject"), "{text}");
    }
}
