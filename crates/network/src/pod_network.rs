//! The pod network across nodes, host-gw style: a route to every other node's podCIDR through
//! that node's address, kept from the Node objects (watched), with IPv4 forwarding on. Pod
//! traffic to anything but a pod network is masqueraded behind the node's address (nftables table
//! `ip tugboat-nat`, made and replaced whole by this module; skipped with a warning when `nft`
//! is missing).
//!
//! The routes this module makes carry protocol number [`PROTO`], so it finds and removes its
//! own (a node that left) and never touches anyone else's.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::Node;
use kube::api::Api;

/// The routing protocol number marking Tugboat's routes (`ip route … proto 252`).
pub const PROTO: &str = "252";
/// The nftables table of the pod network's masquerading.
pub const NAT_TABLE: &str = "tugboat-nat";
const PERIOD: Duration = Duration::from_secs(2);

/// The node bridge pods are attached to.
pub const BRIDGE: &str = "tugboat0";

/// A node's pod network: its podCIDR (IPv4), the bridge's address is the first host in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodNetwork {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl PodNetwork {
    pub fn parse(cidr: &str) -> Option<PodNetwork> {
        let (ip, prefix) = cidr.split_once('/')?;
        let ip: Ipv4Addr = ip.parse().ok()?;
        let prefix: u8 = prefix.parse().ok().filter(|p| (8..=30).contains(p))?;
        let mask = u32::MAX << (32 - prefix);
        Some(PodNetwork { base: Ipv4Addr::from(u32::from(ip) & mask), prefix })
    }
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.base) + 1)
    }
    /// Host addresses a pod may get (the gateway and broadcast excluded).
    pub fn hosts(&self) -> impl Iterator<Item = Ipv4Addr> + use<> {
        let base = u32::from(self.base);
        let size = 1u32 << (32 - self.prefix);
        (2..size - 1).map(move |i| Ipv4Addr::from(base + i))
    }
}

/// Runs `ip -batch` with `commands`.
pub fn ip_batch(commands: &str) -> anyhow::Result<()> {
    let mut child = Command::new("ip")
        .args(["-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("running ip (iproute2)")?;
    child.stdin.take().expect("piped").write_all(commands.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("ip: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Other nodes' pod networks and addresses: podCIDR → the node's InternalIP.
pub fn desired_routes(nodes: &[Node], me: &str) -> BTreeMap<String, IpAddr> {
    let mut routes = BTreeMap::new();
    for node in nodes {
        if node.metadata.name.as_deref() == Some(me) {
            continue;
        }
        let spec = node.spec.as_ref();
        let Some(cidr) = spec.and_then(|s| s.pod_cidr.as_deref()).and_then(PodNetwork::parse) else { continue };
        let address = node
            .status
            .as_ref()
            .and_then(|s| s.addresses.as_ref())
            .and_then(|a| a.iter().find(|a| a.type_ == "InternalIP"))
            .and_then(|a| a.address.parse::<IpAddr>().ok());
        if let Some(address) = address.filter(IpAddr::is_ipv4) {
            routes.insert(format!("{}/{}", cidr.base, cidr.prefix), address);
        }
    }
    routes
}

/// Tugboat's routes now in the kernel: destination → gateway (`ip -o route show proto 252`).
fn current_routes() -> anyhow::Result<BTreeMap<String, IpAddr>> {
    let out = Command::new("ip").args(["-4", "-o", "route", "show", "proto", PROTO]).output()?;
    anyhow::ensure!(out.status.success(), "ip route: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(parse_routes(&String::from_utf8_lossy(&out.stdout)))
}

/// `10.244.1.0/24 via 10.77.0.11 dev eth0 proto 252` lines → destination → gateway.
pub fn parse_routes(text: &str) -> BTreeMap<String, IpAddr> {
    text.lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let via = words.iter().position(|w| *w == "via")?;
            Some((words.first()?.to_string(), words.get(via + 1)?.parse().ok()?))
        })
        .collect()
}

/// The `ip -batch` commands turning `current` into `desired`.
pub fn route_commands(current: &BTreeMap<String, IpAddr>, desired: &BTreeMap<String, IpAddr>) -> String {
    let mut commands = String::new();
    for (cidr, via) in desired {
        if current.get(cidr) != Some(via) {
            commands.push_str(&format!("route replace {cidr} via {via} proto {PROTO}\n"));
        }
    }
    for cidr in current.keys().filter(|c| !desired.contains_key(*c)) {
        commands.push_str(&format!("route del {cidr} proto {PROTO}\n"));
    }
    commands
}

/// The nftables ruleset (for `nft -f -`) masquerading what pods of `own` send to anything but
/// the pod networks `all`; the table is deleted and made again in one transaction.
pub fn nat_ruleset(own: &PodNetwork, all: &[String]) -> String {
    let own = format!("{}/{}", own.base, own.prefix);
    let networks = if all.is_empty() { own.clone() } else { all.join(", ") };
    format!(
        "table ip {NAT_TABLE}\ndelete table ip {NAT_TABLE}\n\
         table ip {NAT_TABLE} {{\n\
         \tset pod-networks {{ type ipv4_addr; flags interval; elements = {{ {networks} }} }}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {own} ip daddr != @pod-networks oifname != \"{BRIDGE}\" masquerade\n\
         \t}}\n\
         }}\n"
    )
}

/// Bridged traffic through the IPv4 hooks (kubeadm's `net.bridge.bridge-nf-call-iptables=1`):
/// Services and NetworkPolicies between pods of one node need it. Loads `br_netfilter` if its
/// switch is missing; a warning if neither works.
fn bridge_netfilter() {
    const SWITCH: &str = "/proc/sys/net/bridge/bridge-nf-call-iptables";
    if !Path::new(SWITCH).exists() {
        let _ = Command::new("modprobe").arg("br_netfilter").status();
    }
    if let Err(error) = std::fs::write(SWITCH, "1") {
        tracing::warn!(%error, "cannot turn on bridge netfilter: Services and NetworkPolicies between pods of this node may not apply");
    }
}

/// Keeps the routes (and masquerading) of the node's pod network until the process ends;
/// `own` tells the node's own pod network once it has one.
pub async fn run(client: kube::Client, node_name: String, own: impl Fn() -> Option<PodNetwork> + Send + 'static) {
    // The Node objects, from a watch: a node's change wakes the loop at once; the period
    // only catches this node's own pod network appearing.
    let wake = Arc::new(tokio::sync::Notify::new());
    let nodes = crate::proxy::reflect(Api::<Node>::all(client), wake.clone(), None);
    if nodes.wait_until_ready().await.is_err() {
        return;
    }
    let mut applied: Option<(BTreeMap<String, IpAddr>, String)> = None;
    let mut forwarding = false;
    let mut warned_nft = false;
    loop {
        let _ = tokio::time::timeout(PERIOD, wake.notified()).await;
        let listed: Vec<Node> = nodes.state().iter().map(|n| (**n).clone()).collect();
        let desired = desired_routes(&listed, &node_name);
        let Some(own) = own() else { continue };
        if !forwarding {
            match std::fs::write("/proc/sys/net/ipv4/ip_forward", "1") {
                Ok(()) => forwarding = true,
                Err(error) => tracing::warn!(%error, "cannot turn on IPv4 forwarding"),
            }
            bridge_netfilter();
        }
        let mut all: Vec<String> = desired.keys().cloned().collect();
        all.push(format!("{}/{}", own.base, own.prefix));
        all.sort();
        let ruleset = nat_ruleset(&own, &all);
        if applied.as_ref().is_some_and(|(routes, rules)| *routes == desired && *rules == ruleset) {
            continue;
        }
        let routes = tokio::task::spawn_blocking({
            let desired = desired.clone();
            move || -> anyhow::Result<()> {
                let commands = route_commands(&current_routes()?, &desired);
                if !commands.is_empty() {
                    ip_batch(&commands)?;
                }
                Ok(())
            }
        })
        .await;
        if let Ok(Err(error)) | Err(error) = routes.map_err(anyhow::Error::from) {
            tracing::warn!(error = %format!("{error:#}"), "pod network: cannot program routes");
            continue;
        }
        match nft(&ruleset) {
            Ok(()) => {}
            Err(error) if !warned_nft => {
                warned_nft = true;
                tracing::warn!(error = %format!("{error:#}"), "pod network: no masquerading (install nftables)");
            }
            Err(_) => {}
        }
        tracing::info!(routes = desired.len(), "pod network programmed");
        applied = Some((desired, ruleset));
    }
}

/// Applies an nftables ruleset atomically.
pub fn nft(ruleset: &str) -> anyhow::Result<()> {
    feed("nft", &["-f", "-"], ruleset)
}

/// Runs `program` with `text` as its input; its error output is the error.
pub fn feed(program: &str, args: &[&str], text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child =
        Command::new(program).args(args).stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::piped()).spawn()?;
    child.stdin.take().expect("piped").write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "{program}: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, cidr: Option<&str>, ip: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {"podCIDR": cidr},
            "status": {"addresses": [{"type": "Hostname", "address": name}, {"type": "InternalIP", "address": ip}]},
        }))
        .unwrap()
    }

    #[test]
    fn routes_go_to_the_other_nodes_and_stale_ones_are_removed() {
        let nodes = [
            node("a", Some("10.244.0.0/24"), "10.0.0.1"),
            node("b", Some("10.244.1.0/24"), "10.0.0.2"),
            node("c", None, "10.0.0.3"),
            node("d", Some("10.244.3.0/24"), "fd00::4"),
        ];
        let desired = desired_routes(&nodes, "a");
        assert_eq!(desired.len(), 1, "not itself, not without a CIDR, not over IPv6: {desired:?}");
        let current = parse_routes(
            "10.244.1.0/24 via 10.0.0.9 dev eth0 proto 252 \n10.244.7.0/24 via 10.0.0.7 dev eth0 proto 252 \n",
        );
        assert_eq!(
            route_commands(&current, &desired),
            "route replace 10.244.1.0/24 via 10.0.0.2 proto 252\nroute del 10.244.7.0/24 proto 252\n"
        );
        assert_eq!(route_commands(&desired, &desired), "", "nothing to do");
    }

    #[test]
    fn the_nat_table_is_replaced_whole() {
        let own = PodNetwork::parse("10.244.0.0/24").unwrap();
        let rules = nat_ruleset(&own, &["10.244.0.0/24".into(), "10.244.1.0/24".into()]);
        assert!(rules.starts_with("table ip tugboat-nat\ndelete table ip tugboat-nat\n"), "{rules}");
        assert!(rules.contains("elements = { 10.244.0.0/24, 10.244.1.0/24 }"), "{rules}");
        assert!(rules.contains("ip saddr 10.244.0.0/24 ip daddr != @pod-networks"), "{rules}");
    }
}
