//! NetworkPolicy, enforced on each node for the pods it runs (what a CNI plugin does upstream).
//!
//! A pod that some policy of its namespace selects for `Ingress` (or `Egress`) is isolated in
//! that direction: only what one of those policies' rules allows gets through — from (to) the
//! pods their `podSelector`/`namespaceSelector` peers pick, or the `ipBlock`s (less their
//! `except`s), on the ports listed (named ports looked up on the pod that owns them;
//! `endPort` ranges). Replies of allowed connections always pass.
//!
//! Rules live in the table `ip tugboat-netpol`, rewritten whole (one `nft -f` transaction)
//! whenever a policy, a pod or a namespace changes what it should be: chain `forward` (hook
//! forward, so traffic between pods of the node — bridged, with bridge netfilter — and from
//! other nodes — routed) checks the source pod's egress chain, then the destination pod's
//! ingress chain. Service traffic is matched after its DNAT, on the endpoint's address, as
//! upstream. Traffic from the node itself (probes) is not filtered, as most plugins allow it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Pod};
use k8s_openapi::api::networking::v1::{NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Api;
use tugboat_objects::labels::selector_matches;

/// The nftables table the policies are enforced in.
pub const TABLE: &str = "tugboat-netpol";

/// A pod that may be a peer or a target: where it is and what it is.
struct PodInfo<'a> {
    pod: &'a Pod,
    namespace: &'a str,
    ip: Ipv4Addr,
}

fn pod_ip(pod: &Pod) -> Option<Ipv4Addr> {
    let status = pod.status.as_ref()?;
    if matches!(status.phase.as_deref(), Some("Succeeded" | "Failed")) {
        return None;
    }
    if pod.spec.as_ref().and_then(|s| s.host_network) == Some(true) {
        return None;
    }
    status.pod_ip.as_deref()?.parse().ok()
}

/// The pods with an IPv4 address (host-network pods are the node's address: not pods here).
fn addressed(pods: &[Pod]) -> Vec<PodInfo<'_>> {
    pods.iter()
        .filter_map(|pod| {
            Some(PodInfo { pod, namespace: pod.metadata.namespace.as_deref().unwrap_or("default"), ip: pod_ip(pod)? })
        })
        .collect()
}

/// Ports of a rule, per protocol: `None` for every port of that protocol.
type PortMatch = BTreeMap<String, Option<BTreeSet<(u16, u16)>>>;

/// The nft match for one protocol's ports (`meta l4proto tcp th dport { 80, 8000-8080 }`).
fn port_match(protocol: &str, ranges: &Option<BTreeSet<(u16, u16)>>) -> String {
    let protocol = protocol.to_ascii_lowercase();
    match ranges {
        None => format!("meta l4proto {protocol} "),
        Some(ranges) => {
            let items: Vec<String> = ranges
                .iter()
                .map(|(start, end)| if start == end { start.to_string() } else { format!("{start}-{end}") })
                .collect();
            format!("meta l4proto {protocol} th dport {{ {} }} ", items.join(", "))
        }
    }
}

/// A rule's ports: numbers and ranges as given, names looked up among `owners`' container
/// ports (the target pod for ingress, the peers for egress). `None`: all ports.
fn ports_of(ports: Option<&Vec<NetworkPolicyPort>>, owners: &[&Pod]) -> Option<PortMatch> {
    let ports = ports.filter(|p| !p.is_empty())?;
    let mut by_protocol = PortMatch::new();
    for port in ports {
        let protocol = port.protocol.clone().unwrap_or_else(|| "TCP".into());
        let numbers: Vec<(u16, u16)> = match &port.port {
            None => {
                by_protocol.insert(protocol, None);
                continue;
            }
            Some(IntOrString::Int(n)) => {
                let Ok(start) = u16::try_from(*n) else { continue };
                let end = port.end_port.and_then(|e| u16::try_from(e).ok()).filter(|e| *e >= start).unwrap_or(start);
                vec![(start, end)]
            }
            Some(IntOrString::String(name)) => owners
                .iter()
                .flat_map(|pod| pod.spec.iter().flat_map(|s| s.containers.iter()))
                .flat_map(|c| c.ports.iter().flatten())
                .filter(|p| p.name.as_deref() == Some(name.as_str()))
                .filter(|p| p.protocol.as_deref().unwrap_or("TCP") == protocol)
                .filter_map(|p| u16::try_from(p.container_port).ok())
                .map(|n| (n, n))
                .collect(),
        };
        // (A protocol already allowed on every port stays so.)
        if let Some(set) = by_protocol.entry(protocol).or_insert_with(|| Some(BTreeSet::new())) {
            set.extend(numbers);
        }
    }
    // A named port no pod has matches nothing: the protocol's empty set stays out.
    by_protocol.retain(|_, ranges| ranges.as_ref().is_none_or(|r| !r.is_empty()));
    Some(by_protocol)
}

/// What one peer stands for: pod addresses, or an address block less its exceptions.
enum Peer {
    Pods(BTreeSet<Ipv4Addr>),
    Block { cidr: String, except: Vec<String> },
}

fn peers_of<'a>(
    peer: &NetworkPolicyPeer,
    policy_namespace: &str,
    pods: &'a [PodInfo<'a>],
    namespaces: &BTreeMap<String, Option<BTreeMap<String, String>>>,
) -> (Peer, Vec<&'a Pod>) {
    if let Some(block) = &peer.ip_block {
        // IPv4 blocks only: the pod network is IPv4.
        let v4 = |cidr: &String| cidr.split('/').next().is_some_and(|a| a.parse::<Ipv4Addr>().is_ok());
        let except = block.except.iter().flatten().filter(|c| v4(c)).cloned().collect();
        let cidr = if v4(&block.cidr) { block.cidr.clone() } else { String::new() };
        return (Peer::Block { cidr, except }, Vec::new());
    }
    let mut chosen = Vec::new();
    for info in pods {
        let in_namespace = match &peer.namespace_selector {
            Some(selector) => {
                namespaces.get(info.namespace).is_some_and(|labels| selector_matches(selector, labels.as_ref()))
            }
            None => info.namespace == policy_namespace,
        };
        let pod_matches = peer
            .pod_selector
            .as_ref()
            .is_none_or(|selector| selector_matches(selector, info.pod.metadata.labels.as_ref()));
        if in_namespace && pod_matches {
            chosen.push(info);
        }
    }
    (Peer::Pods(chosen.iter().map(|i| i.ip).collect()), chosen.iter().map(|i| i.pod).collect())
}

/// One rule of a policy: its peers (`from` or `to`) and its ports.
type Side<'a> = (Option<&'a Vec<NetworkPolicyPeer>>, Option<&'a Vec<NetworkPolicyPort>>);

/// The rules of one direction of one isolated pod, ending in `verdict` for what is allowed.
fn direction_rules(
    target: &PodInfo<'_>,
    policies: &[&NetworkPolicy],
    ingress: bool,
    pods: &[PodInfo<'_>],
    namespaces: &BTreeMap<String, Option<BTreeMap<String, String>>>,
    verdict: &str,
) -> Vec<String> {
    let address = if ingress { "ip saddr" } else { "ip daddr" };
    let mut rules = Vec::new();
    for policy in policies {
        let policy_namespace = policy.metadata.namespace.as_deref().unwrap_or("default");
        let Some(spec) = &policy.spec else { continue };
        let sides: Vec<Side<'_>> = if ingress {
            spec.ingress.iter().flatten().map(|r| (r.from.as_ref(), r.ports.as_ref())).collect()
        } else {
            spec.egress.iter().flatten().map(|r| (r.to.as_ref(), r.ports.as_ref())).collect()
        };
        for (peers, ports) in sides {
            let peers: Vec<(Option<Peer>, Vec<&Pod>)> = match peers.filter(|p| !p.is_empty()) {
                None => vec![(None, pods.iter().map(|i| i.pod).collect())],
                Some(peers) => peers
                    .iter()
                    .map(|p| {
                        let (peer, owners) = peers_of(p, policy_namespace, pods, namespaces);
                        (Some(peer), owners)
                    })
                    .collect(),
            };
            for (peer, owners) in peers {
                let owners: Vec<&Pod> = if ingress { vec![target.pod] } else { owners };
                let addresses = match &peer {
                    None => String::new(),
                    Some(Peer::Pods(ips)) if ips.is_empty() => continue,
                    Some(Peer::Pods(ips)) => {
                        let ips: Vec<String> = ips.iter().map(Ipv4Addr::to_string).collect();
                        format!("{address} {{ {} }} ", ips.join(", "))
                    }
                    Some(Peer::Block { cidr, .. }) if cidr.is_empty() => continue,
                    Some(Peer::Block { cidr, except }) => {
                        let mut text = format!("{address} {cidr} ");
                        if !except.is_empty() {
                            let _ = write!(text, "{address} != {{ {} }} ", except.join(", "));
                        }
                        text
                    }
                };
                match ports_of(ports, &owners) {
                    None => rules.push(format!("{addresses}{verdict}")),
                    Some(by_protocol) => {
                        for (protocol, ranges) in &by_protocol {
                            rules.push(format!("{addresses}{}{verdict}", port_match(protocol, ranges)));
                        }
                    }
                }
            }
        }
    }
    rules.push("drop".into());
    rules
}

/// The table for the pods of `node`: `None` when no policy isolates any of them.
pub fn ruleset(node: &str, policies: &[NetworkPolicy], pods: &[Pod], namespaces: &[Namespace]) -> Option<String> {
    let namespaces: BTreeMap<String, Option<BTreeMap<String, String>>> =
        namespaces.iter().map(|n| (n.metadata.name.clone().unwrap_or_default(), n.metadata.labels.clone())).collect();
    let infos = addressed(pods);
    let mut chains = String::new();
    // Address → chain, per direction (egress, ingress); one chain per address, the first pod's
    // (an address is one pod's, but a pod on its way out may still show its old one).
    let mut dispatch: (BTreeMap<Ipv4Addr, String>, BTreeMap<Ipv4Addr, String>) = Default::default();
    for target in infos.iter().filter(|i| i.pod.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node)) {
        let selecting = |kind: &str| -> Vec<&NetworkPolicy> {
            policies
                .iter()
                .filter(|p| p.metadata.namespace.as_deref().unwrap_or("default") == target.namespace)
                .filter(|p| {
                    p.spec.as_ref().is_some_and(|s| {
                        selector_matches(
                            &s.pod_selector.clone().unwrap_or_default(),
                            target.pod.metadata.labels.as_ref(),
                        ) && s.policy_types.iter().flatten().any(|t| t == kind)
                    })
                })
                .collect()
        };
        let name = format!("{}/{}", target.namespace, target.pod.metadata.name.as_deref().unwrap_or_default());
        for (kind, ingress, list) in [("Ingress", true, &mut dispatch.1), ("Egress", false, &mut dispatch.0)] {
            let selected = selecting(kind);
            if selected.is_empty() || list.contains_key(&target.ip) {
                continue;
            }
            // Allowed egress goes on to the destination's ingress check; allowed ingress is in.
            let verdict = if ingress { "accept" } else { "return" };
            let chain = format!("{}-{name}", if ingress { "ingress" } else { "egress" });
            let _ = writeln!(chains, "\tchain {chain} {{");
            for rule in direction_rules(target, &selected, ingress, &infos, &namespaces, verdict) {
                let _ = writeln!(chains, "\t\t{rule}");
            }
            let _ = writeln!(chains, "\t}}");
            list.insert(target.ip, chain);
        }
    }
    if dispatch.0.is_empty() && dispatch.1.is_empty() {
        return None;
    }
    let mut text = format!("table ip {TABLE} {{\n{chains}");
    text.push_str("\tchain forward {\n\t\ttype filter hook forward priority -10; policy accept;\n");
    text.push_str("\t\tct state established,related accept\n");
    for (address, list) in [("ip saddr", &dispatch.0), ("ip daddr", &dispatch.1)] {
        if !list.is_empty() {
            let entries: Vec<String> = list.iter().map(|(ip, chain)| format!("{ip} : jump {chain}")).collect();
            let _ = writeln!(text, "\t\t{address} vmap {{ {} }}", entries.join(", "));
        }
    }
    text.push_str("\t}\n}\n");
    Some(text)
}

/// The whole `nft -f` transaction: the table anew (or gone).
fn transaction(ruleset: Option<&str>) -> String {
    format!("table ip {TABLE}\ndelete table ip {TABLE}\n{}", ruleset.unwrap_or_default())
}

fn listed<K: kube::Resource<DynamicType = ()> + Clone>(store: &kube::runtime::reflector::Store<K>) -> Vec<K> {
    store.state().iter().map(|o| (**o).clone()).collect()
}

/// Deletes the table (nothing when it is not there).
pub fn remove() -> anyhow::Result<()> {
    crate::pod_network::nft(&transaction(None))
}

/// Keeps the node's policy rules in step with the cluster's NetworkPolicies, pods and
/// namespaces until the process ends.
pub async fn run(client: kube::Client, node_name: String) {
    let wake = Arc::new(tokio::sync::Notify::new());
    let policies = crate::proxy::reflect(Api::<NetworkPolicy>::all(client.clone()), wake.clone(), None);
    let pods = crate::proxy::reflect(Api::<Pod>::all(client.clone()), wake.clone(), None);
    let namespaces = crate::proxy::reflect(Api::<Namespace>::all(client), wake.clone(), None);
    for store in [policies.wait_until_ready().await.is_ok(), pods.wait_until_ready().await.is_ok()] {
        if !store {
            return;
        }
    }
    if namespaces.wait_until_ready().await.is_err() {
        return;
    }
    let mut applied: Option<Option<String>> = None;
    let mut warned = false;
    loop {
        let next = ruleset(&node_name, &listed(&policies), &listed(&pods), &listed(&namespaces));
        if applied.as_ref() != Some(&next) {
            let text = transaction(next.as_deref());
            match tokio::task::spawn_blocking(move || crate::pod_network::nft(&text)).await {
                Ok(Ok(())) => {
                    applied = Some(next);
                    warned = false;
                }
                Ok(Err(error)) if !warned => {
                    warned = true;
                    tracing::warn!(error = %format!("{error:#}"), "network policies: cannot program the rules");
                }
                _ => {}
            }
        }
        // Changes come in bursts (a Deployment's pods): one rewrite for a burst.
        let _ = tokio::time::timeout(Duration::from_secs(30), wake.notified()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objects<T: k8s_openapi::serde::de::DeserializeOwned>(value: serde_json::Value) -> Vec<T> {
        serde_json::from_value(value).unwrap()
    }

    fn pods() -> Vec<Pod> {
        objects(serde_json::json!([
            {"metadata": {"name": "db", "namespace": "shop", "labels": {"app": "db"}},
             "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i", "ports": [{"name": "sql", "containerPort": 5432}]}]},
             "status": {"podIP": "10.244.1.5", "phase": "Running"}},
            {"metadata": {"name": "web", "namespace": "shop", "labels": {"app": "web"}},
             "spec": {"nodeName": "n2", "containers": [{"name": "c", "image": "i"}]},
             "status": {"podIP": "10.244.2.7", "phase": "Running"}},
            {"metadata": {"name": "probe", "namespace": "ops", "labels": {"app": "probe"}},
             "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i"}]},
             "status": {"podIP": "10.244.1.9", "phase": "Running"}},
        ]))
    }

    fn namespaces() -> Vec<Namespace> {
        objects(serde_json::json!([
            {"metadata": {"name": "shop", "labels": {"kubernetes.io/metadata.name": "shop"}}},
            {"metadata": {"name": "ops", "labels": {"kubernetes.io/metadata.name": "ops", "team": "ops"}}},
        ]))
    }

    #[test]
    fn selected_pods_get_only_what_their_policies_allow() {
        let policies: Vec<NetworkPolicy> = objects(serde_json::json!([
            {"metadata": {"name": "db", "namespace": "shop"},
             "spec": {"podSelector": {"matchLabels": {"app": "db"}}, "policyTypes": ["Ingress"],
                      "ingress": [{"from": [{"podSelector": {"matchLabels": {"app": "web"}}},
                                            {"namespaceSelector": {"matchLabels": {"team": "ops"}}}],
                                   "ports": [{"protocol": "TCP", "port": "sql"}]},
                                  {"from": [{"ipBlock": {"cidr": "192.168.0.0/16", "except": ["192.168.1.0/24"]}}],
                                   "ports": [{"protocol": "TCP", "port": 9000, "endPort": 9100}]}]}},
            {"metadata": {"name": "deny-egress", "namespace": "ops"},
             "spec": {"podSelector": {}, "policyTypes": ["Egress"]}},
        ]));
        let on_n1 = ruleset("n1", &policies, &pods(), &namespaces()).unwrap();
        assert!(on_n1.contains("chain ingress-shop/db {"), "{on_n1}");
        assert!(on_n1.contains("ip saddr { 10.244.2.7 } meta l4proto tcp th dport { 5432 } accept"), "{on_n1}");
        assert!(on_n1.contains("ip saddr { 10.244.1.9 } meta l4proto tcp th dport { 5432 } accept"), "{on_n1}");
        assert!(
            on_n1.contains(
                "ip saddr 192.168.0.0/16 ip saddr != { 192.168.1.0/24 } meta l4proto tcp th dport { 9000-9100 } accept"
            ),
            "{on_n1}"
        );
        // Egress denied: the chain is only its drop.
        assert!(on_n1.contains("chain egress-ops/probe {\n\t\tdrop\n\t}"), "{on_n1}");
        assert!(on_n1.contains("ip saddr vmap { 10.244.1.9 : jump egress-ops/probe }"), "{on_n1}");
        assert!(on_n1.contains("ip daddr vmap { 10.244.1.5 : jump ingress-shop/db }"), "{on_n1}");
        // n2's only pod is selected by nothing: no table there.
        assert_eq!(ruleset("n2", &policies, &pods(), &namespaces()), None);
        // The kernel takes it (checked only).
        let text = transaction(Some(&on_n1));
        crate::pod_network::feed("nft", &["--check", "-f", "-"], &text).unwrap_or_else(|e| panic!("{e:#}\n{text}"));
    }
}
