//! Host ports (`containers[].ports[].hostPort`), as CNI's portmap plugin makes them upstream:
//! traffic to one of the node's own addresses on a host port (or to the one address a port's
//! `hostIP` names) goes to the pod's address and container port, whether it comes from outside
//! the node, from a pod, or from the node itself (127.0.0.1 included).
//!
//! Rules live in the table `ip tugboat-hostports`, rewritten whole (one `nft -f` transaction)
//! when this node's pods change: chains on the prerouting and output hooks (priority -110,
//! before the service proxy's DNAT) send traffic to a local address into `ports`, which DNATs
//! it (ports bound to one address before those bound to all); `postrouting` masquerades what came from loopback (with `route_localnet` on the pod
//! bridge, so it may leave it) and a pod reaching itself through its own host port (hairpin).
//! Only the kubelet's own pods are watched (`spec.nodeName`). Which pods may hold which host
//! ports is the scheduler's and the kubelet's admission's concern
//! (`tugboat_objects::scheduling::host_ports_conflict`), not this module's.

use std::fmt::Write;
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::watcher;

use crate::pod_network::BRIDGE;

/// The nftables table of the host ports.
pub const TABLE: &str = "tugboat-hostports";

/// One host port: where traffic arrives and where it goes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Mapping {
    /// The one address the port is bound to (`hostIP`); `None` for all of the node's.
    pub host_ip: Option<Ipv4Addr>,
    /// `tcp`, `udp` or `sctp`.
    pub protocol: &'static str,
    pub host_port: u16,
    pub pod_ip: Ipv4Addr,
    pub container_port: u16,
}

/// The host ports of `node`'s running pods that have an address (host-network pods hold the
/// node's ports themselves: nothing to map). Ports bound to one address come first.
pub fn mappings(node: &str, pods: &[Pod]) -> Vec<Mapping> {
    let mut mappings = Vec::new();
    for pod in pods {
        let Some(spec) = pod.spec.as_ref() else { continue };
        let status = pod.status.as_ref();
        if spec.node_name.as_deref() != Some(node)
            || spec.host_network == Some(true)
            || matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
        {
            continue;
        }
        let Some(pod_ip) = status.and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse::<Ipv4Addr>().ok()) else {
            continue;
        };
        for port in spec.containers.iter().flat_map(|c| c.ports.iter().flatten()) {
            let Some(host_port) = port.host_port.and_then(|p| u16::try_from(p).ok()).filter(|p| *p > 0) else {
                continue;
            };
            let Ok(container_port) = u16::try_from(port.container_port) else { continue };
            let protocol = match port.protocol.as_deref() {
                Some("UDP") => "udp",
                Some("SCTP") => "sctp",
                _ => "tcp",
            };
            let host_ip =
                port.host_ip.as_deref().and_then(|ip| ip.parse::<Ipv4Addr>().ok()).filter(|ip| !ip.is_unspecified());
            mappings.push(Mapping { host_ip, protocol, host_port, pod_ip, container_port });
        }
    }
    // `None` sorts first: reversed on that key, so that bound ports are matched first.
    mappings.sort_by(|a, b| b.host_ip.is_some().cmp(&a.host_ip.is_some()).then_with(|| a.cmp(b)));
    mappings.dedup();
    mappings
}

/// The table's ruleset for `mappings` (`None`: no table).
pub fn ruleset(mappings: &[Mapping]) -> Option<String> {
    if mappings.is_empty() {
        return None;
    }
    let mut text = format!("table ip {TABLE} {{\n");
    let mut hairpins: Vec<String> = mappings.iter().map(|m| format!("{0} . {0}", m.pod_ip)).collect();
    hairpins.sort();
    hairpins.dedup();
    let _ = writeln!(text, "\tset hairpin {{ type ipv4_addr . ipv4_addr; elements = {{ {} }} }}", hairpins.join(", "));
    for (chain, hook) in [("prerouting", "prerouting"), ("output", "output")] {
        let _ = writeln!(
            text,
            "\tchain {chain} {{\n\t\ttype nat hook {hook} priority -110; policy accept;\n\t\tfib daddr type local jump ports\n\t}}"
        );
    }
    text.push_str("\tchain ports {\n");
    for m in mappings {
        let address = m.host_ip.map(|ip| format!("ip daddr {ip} ")).unwrap_or_default();
        let _ = writeln!(
            text,
            "\t\t{address}{} dport {} dnat to {}:{}",
            m.protocol, m.host_port, m.pod_ip, m.container_port
        );
    }
    text.push_str("\t}\n");
    text.push_str(
        "\tchain postrouting {\n\t\ttype nat hook postrouting priority 90; policy accept;\n\
         \t\tct status dnat ip saddr 127.0.0.0/8 masquerade\n\
         \t\tct status dnat ip saddr . ip daddr @hairpin masquerade\n\t}\n}\n",
    );
    Some(text)
}

/// The whole `nft -f` transaction: the table anew (or gone).
fn transaction(ruleset: Option<&str>) -> String {
    format!("table ip {TABLE}\ndelete table ip {TABLE}\n{}", ruleset.unwrap_or_default())
}

/// Traffic from 127.0.0.1 to a host port, once DNATed to a pod, leaves through the pod
/// bridge: the kernel drops it as martian unless the bridge allows loopback sources.
fn route_localnet() -> std::io::Result<()> {
    std::fs::write(format!("/proc/sys/net/ipv4/conf/{BRIDGE}/route_localnet"), "1")
}

/// Keeps the node's host-port rules in step with its pods until the process ends.
pub async fn run(client: kube::Client, node_name: String) {
    let wake = Arc::new(tokio::sync::Notify::new());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={node_name}"));
    let pods = tugboat_objects::informer::reflect_with(Api::<Pod>::all(client), config, (), "host ports", {
        let wake = wake.clone();
        move |_: Option<&Pod>| wake.notify_one()
    });
    if pods.wait_until_ready().await.is_err() {
        return;
    }
    let mut applied: Option<Option<String>> = None;
    let mut warned = false;
    loop {
        let listed: Vec<Pod> = pods.state().iter().map(|p| (**p).clone()).collect();
        let next = ruleset(&mappings(&node_name, &listed));
        if applied.as_ref() != Some(&next) {
            let text = transaction(next.as_deref());
            let loopback = next.is_some();
            let done = tokio::task::spawn_blocking(move || {
                if loopback && let Err(error) = route_localnet() {
                    tracing::debug!(%error, "host ports: cannot let loopback traffic reach pods");
                }
                crate::pod_network::nft(&text)
            })
            .await;
            match done {
                Ok(Ok(())) => {
                    applied = Some(next);
                    warned = false;
                }
                Ok(Err(error)) if !warned => {
                    warned = true;
                    tracing::warn!(error = %format!("{error:#}"), "host ports: cannot program the rules");
                }
                _ => {}
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(30), wake.notified()).await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Deletes the table (nothing when it is not there).
pub fn remove() -> anyhow::Result<()> {
    crate::pod_network::nft(&transaction(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ports_go_to_their_pods_bound_ones_first() {
        let pods: Vec<Pod> = serde_json::from_value(serde_json::json!([
            {"metadata": {"name": "any", "namespace": "d"},
             "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i",
                 "ports": [{"containerPort": 8080, "hostPort": 54323, "protocol": "UDP"}]}]},
             "status": {"podIP": "10.244.0.7", "phase": "Running"}},
            {"metadata": {"name": "local", "namespace": "d"},
             "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i",
                 "ports": [{"containerPort": 8080, "hostPort": 54323, "hostIP": "127.0.0.1"}, {"containerPort": 9090}]}]},
             "status": {"podIP": "10.244.0.5", "phase": "Running"}},
            {"metadata": {"name": "elsewhere", "namespace": "d"},
             "spec": {"nodeName": "n2", "containers": [{"name": "c", "image": "i",
                 "ports": [{"containerPort": 80, "hostPort": 80}]}]},
             "status": {"podIP": "10.244.1.5", "phase": "Running"}},
            {"metadata": {"name": "done", "namespace": "d"},
             "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "i",
                 "ports": [{"containerPort": 80, "hostPort": 81}]}]},
             "status": {"podIP": "10.244.0.9", "phase": "Succeeded"}},
            {"metadata": {"name": "host", "namespace": "d"},
             "spec": {"nodeName": "n1", "hostNetwork": true, "containers": [{"name": "c", "image": "i",
                 "ports": [{"containerPort": 82, "hostPort": 82}]}]},
             "status": {"podIP": "10.77.0.10", "phase": "Running"}},
        ]))
        .unwrap();
        let mappings = mappings("n1", &pods);
        assert_eq!(mappings.len(), 2, "{mappings:?}");
        let rules = ruleset(&mappings).unwrap();
        let bound = rules.find("ip daddr 127.0.0.1 tcp dport 54323 dnat to 10.244.0.5:8080").expect(&rules);
        let any = rules.find("\t\tudp dport 54323 dnat to 10.244.0.7:8080").expect(&rules);
        assert!(bound < any, "a port bound to an address is matched before one bound to all: {rules}");
        assert!(rules.contains("elements = { 10.244.0.5 . 10.244.0.5, 10.244.0.7 . 10.244.0.7 }"), "{rules}");
        assert_eq!(ruleset(&[]), None, "no host ports, no table");
        // The kernel takes it (checked only).
        let text = transaction(Some(&rules));
        crate::pod_network::feed("nft", &["--check", "-f", "-"], &text).unwrap_or_else(|e| panic!("{e:#}\n{text}"));
    }
}
