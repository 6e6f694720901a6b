//! The proxy's iptables mode (`--proxy-mode iptables`), for hosts without nftables: upstream's
//! iptables layout in chains named `TUGBOAT-*` (in the nat and filter tables), written with
//! `iptables-restore --noflush` so that nothing else's rules are touched, and hooked into the
//! built-in chains by one jump each.
//!
//! - nat `TUGBOAT-SERVICES` (from PREROUTING and OUTPUT): a rule per ClusterIP/external IP
//!   port to its `TUGBOAT-SVC-<hash>`/`TUGBOAT-EXT-<hash>`, then node-local addresses to
//!   `TUGBOAT-NODEPORTS`; the per-packet cost grows with the number of Services, which is why
//!   nftables is the default;
//! - `TUGBOAT-SVC-…`: `statistic random` picks an endpoint chain `TUGBOAT-SEP-<hash>` (after
//!   `recent` checks for session affinity), which marks hairpin traffic and DNATs;
//! - filter `TUGBOAT-REJECT` (from FORWARD, OUTPUT) and `TUGBOAT-NODEPORT-REJECT` (from INPUT,
//!   OUTPUT): ports without endpoints are refused.
//!
//! A change rewrites only the chains whose rules changed (the services chain whenever a port
//! comes or goes), and deletes the chains no longer needed.

use std::collections::BTreeMap;
use std::process::{Command, Stdio};

use super::{Endpoint, MASQUERADE_MARK, ServicePort};

const SERVICES: &str = "TUGBOAT-SERVICES";
const NODEPORTS: &str = "TUGBOAT-NODEPORTS";
const POSTROUTING: &str = "TUGBOAT-POSTROUTING";
const MARK: &str = "TUGBOAT-MARK-MASQ";
const REJECT: &str = "TUGBOAT-REJECT";
const NODEPORT_REJECT: &str = "TUGBOAT-NODEPORT-REJECT";

/// The jumps from built-in chains: (table, chain, target).
const HOOKS: [(&str, &str, &str); 7] = [
    ("nat", "PREROUTING", SERVICES),
    ("nat", "OUTPUT", SERVICES),
    ("nat", "POSTROUTING", POSTROUTING),
    ("filter", "FORWARD", REJECT),
    ("filter", "OUTPUT", REJECT),
    ("filter", "INPUT", NODEPORT_REJECT),
    ("filter", "OUTPUT", NODEPORT_REJECT),
];

/// The proxy's chains and their rules (the arguments after `-A <chain>`), per table.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tables {
    pub nat: BTreeMap<String, Vec<String>>,
    pub filter: BTreeMap<String, Vec<String>>,
}

/// A chain name within iptables' 28 characters: the prefix and a hash of `of`.
fn chain(prefix: &str, of: &str) -> String {
    use sha2::Digest;
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let digest = sha2::Sha256::digest(of.as_bytes());
    let hash: String = digest.iter().take(16).map(|b| ALPHABET[(b & 31) as usize] as char).collect();
    format!("TUGBOAT-{prefix}-{hash}")
}

impl Tables {
    pub fn new(ports: &[ServicePort]) -> Tables {
        let mut t = Tables::default();
        let mark = format!("{MASQUERADE_MARK}/{MASQUERADE_MARK}");
        t.nat.insert(MARK.into(), vec![format!("-j MARK --or-mark {MASQUERADE_MARK}")]);
        t.nat.insert(
            POSTROUTING.into(),
            vec![
                format!("-m mark ! --mark {mark} -j RETURN"),
                format!("-j MARK --xor-mark {MASQUERADE_MARK}"),
                "-j MASQUERADE --random-fully".into(),
            ],
        );
        let mut services = Vec::new();
        let mut nodeports = Vec::new();
        let mut rejects = Vec::new();
        let mut nodeport_rejects = Vec::new();
        for sp in ports {
            let (proto, port) = (&sp.protocol, sp.port);
            let comment = format!("-m comment --comment \"{}\"", sp.id);
            let sep = |e: &Endpoint| chain("SEP", &format!("{}/{}/{}", sp.id, e.ip, e.port));
            for e in &sp.endpoints {
                let mut rules = vec![format!("-s {}/32 -j {MARK}", e.ip)];
                if sp.affinity.is_some() {
                    rules.push(format!("-m recent --name {} --set --mask 255.255.255.255 --rsource", sep(e)));
                }
                rules.push(format!("-p {proto} -m {proto} -j DNAT --to-destination {}:{}", e.ip, e.port));
                t.nat.insert(sep(e), rules);
            }
            let choose = |among: &[&Endpoint]| -> Vec<String> {
                let mut rules = Vec::new();
                if let Some(timeout) = sp.affinity {
                    for e in among {
                        rules.push(format!(
                            "-m recent --name {0} --rcheck --seconds {timeout} --reap --mask 255.255.255.255 --rsource -j {0}",
                            sep(e)
                        ));
                    }
                }
                for (i, e) in among.iter().enumerate() {
                    let left = among.len() - i;
                    let pick = if left > 1 {
                        format!("-m statistic --mode random --probability {:.10} ", 1.0 / left as f64)
                    } else {
                        String::new()
                    };
                    rules.push(format!("{pick}-j {}", sep(e)));
                }
                rules
            };
            let all: Vec<&Endpoint> = sp.endpoints.iter().collect();
            let svc = chain("SVC", &sp.id);
            let ext = chain("EXT", &sp.id);
            let matches = |ip: &std::net::Ipv4Addr| format!("-d {ip}/32 -p {proto} -m {proto} --dport {port}");
            if all.is_empty() {
                for ip in std::iter::once(&sp.cluster_ip).chain(&sp.external_ips) {
                    rejects.push(format!("{} {comment} -j REJECT", matches(ip)));
                }
            } else {
                t.nat.insert(svc.clone(), choose(&all));
                services.push(format!("{} {comment} -j {svc}", matches(&sp.cluster_ip)));
            }
            if sp.external_ips.is_empty() && sp.node_port.is_none() {
                continue;
            }
            let local: Vec<&Endpoint> = sp.endpoints.iter().filter(|e| e.local).collect();
            let reachable = if sp.external_local { !local.is_empty() } else { !all.is_empty() };
            if reachable {
                let rules =
                    if sp.external_local { choose(&local) } else { vec![format!("-j {MARK}"), format!("-j {svc}")] };
                t.nat.insert(ext.clone(), rules);
            }
            for ip in &sp.external_ips {
                if reachable {
                    services.push(format!("{} {comment} -j {ext}", matches(ip)));
                } else if !all.is_empty() {
                    rejects.push(format!("{} {comment} -j REJECT", matches(ip)));
                }
            }
            if let Some(node_port) = sp.node_port {
                let rule = format!("-p {proto} -m {proto} --dport {node_port} {comment}");
                if reachable {
                    nodeports.push(format!("{rule} -j {ext}"));
                } else {
                    nodeport_rejects.push(format!("-m addrtype --dst-type LOCAL {rule} -j REJECT"));
                }
            }
        }
        services.push(format!("-m addrtype --dst-type LOCAL ! -d 127.0.0.0/8 -j {NODEPORTS}"));
        t.nat.insert(SERVICES.into(), services);
        t.nat.insert(NODEPORTS.into(), nodeports);
        t.filter.insert(REJECT.into(), rejects);
        t.filter.insert(NODEPORT_REJECT.into(), nodeport_rejects);
        t
    }

    /// The `iptables-restore --noflush` input turning `self` (none: whatever is there) into
    /// `next`; empty when nothing changes.
    pub fn changes(current: Option<&Tables>, next: &Tables) -> String {
        let mut text = String::new();
        for (table, old, new) in
            [("nat", current.map(|c| &c.nat), &next.nat), ("filter", current.map(|c| &c.filter), &next.filter)]
        {
            let changed: Vec<&String> = new
                .iter()
                .filter(|(name, rules)| old.and_then(|o| o.get(*name)) != Some(rules))
                .map(|(n, _)| n)
                .collect();
            let stale: Vec<&String> =
                old.map(|o| o.keys().filter(|n| !new.contains_key(*n)).collect()).unwrap_or_default();
            if changed.is_empty() && stale.is_empty() {
                continue;
            }
            text.push_str(&format!("*{table}\n"));
            // Declaring a chain makes it, or empties it.
            for name in changed.iter().chain(&stale) {
                text.push_str(&format!(":{name} - [0:0]\n"));
            }
            for name in &changed {
                for rule in &new[*name] {
                    text.push_str(&format!("-A {name} {rule}\n"));
                }
            }
            for name in &stale {
                text.push_str(&format!("-X {name}\n"));
            }
            text.push_str("COMMIT\n");
        }
        text
    }
}

fn iptables(args: &[&str]) -> std::io::Result<std::process::Output> {
    Command::new("iptables").arg("-w").args(args).stdin(Stdio::null()).output()
}

/// Applies `text` with `iptables-restore --noflush`.
pub fn restore(text: &str) -> anyhow::Result<()> {
    crate::pod_network::feed("iptables-restore", &["-w", "--noflush"], text)
}

/// Puts the jumps from the built-in chains in place (first in each), once.
pub fn hook() -> anyhow::Result<()> {
    for (table, from, to) in HOOKS {
        let check = iptables(&["-t", table, "-C", from, "-j", to])?;
        if !check.status.success() {
            let out = iptables(&["-t", table, "-I", from, "-j", to])?;
            anyhow::ensure!(out.status.success(), "iptables: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
    }
    Ok(())
}

/// Whether the jumps and the services chain are in place.
pub fn present() -> bool {
    HOOKS
        .iter()
        .all(|(table, from, to)| iptables(&["-t", table, "-C", from, "-j", to]).is_ok_and(|o| o.status.success()))
}

/// Removes every `TUGBOAT-*` chain and the jumps to them (nothing when absent or when
/// iptables is not installed).
pub fn remove() -> anyhow::Result<()> {
    for (table, from, to) in HOOKS {
        while iptables(&["-t", table, "-D", from, "-j", to]).is_ok_and(|o| o.status.success()) {}
    }
    for table in ["nat", "filter"] {
        let Ok(saved) = Command::new("iptables-save").args(["-t", table]).output() else { return Ok(()) };
        let chains: Vec<String> = String::from_utf8_lossy(&saved.stdout)
            .lines()
            .filter_map(|l| l.strip_prefix(':')?.split_whitespace().next().map(str::to_string))
            .filter(|c| c.starts_with("TUGBOAT-"))
            .collect();
        if chains.is_empty() {
            continue;
        }
        let mut text = format!("*{table}\n");
        for c in &chains {
            text.push_str(&format!(":{c} - [0:0]\n"));
        }
        for c in &chains {
            text.push_str(&format!("-X {c}\n"));
        }
        text.push_str("COMMIT\n");
        restore(&text)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(endpoints: &[(&str, bool)], node_port: Option<u16>, local: bool) -> ServicePort {
        ServicePort {
            id: "shop/db/tcp/80".into(),
            cluster_ip: "10.96.0.20".parse().unwrap(),
            external_ips: Vec::new(),
            protocol: "tcp".into(),
            port: 80,
            node_port,
            endpoints: endpoints
                .iter()
                .map(|(ip, local)| Endpoint { ip: ip.parse().unwrap(), port: 8080, local: *local })
                .collect(),
            affinity: None,
            external_local: local,
        }
    }

    #[test]
    fn upstreams_layout_in_chains_of_our_own() {
        let t = Tables::new(&[port(&[("10.244.1.5", false), ("10.244.2.7", true)], Some(30080), false)]);
        let svc = chain("SVC", "shop/db/tcp/80");
        assert!(svc.len() <= 28, "{svc}");
        assert_eq!(
            t.nat[SERVICES][0],
            format!("-d 10.96.0.20/32 -p tcp -m tcp --dport 80 -m comment --comment \"shop/db/tcp/80\" -j {svc}")
        );
        let chooser = &t.nat[&svc];
        assert!(chooser[0].starts_with("-m statistic --mode random --probability 0.5000000000 -j TUGBOAT-SEP-"));
        assert!(chooser[1].starts_with("-j TUGBOAT-SEP-"));
        assert!(t.nat[NODEPORTS][0].starts_with("-p tcp -m tcp --dport 30080"));
        // Only what changed is rewritten.
        let after = Tables::new(&[port(&[("10.244.2.7", true)], Some(30080), false)]);
        let text = Tables::changes(Some(&t), &after);
        assert!(text.starts_with("*nat\n"), "{text}");
        assert!(text.contains(&format!(":{svc} - [0:0]\n")), "{text}");
        assert!(!text.contains(":TUGBOAT-SERVICES"), "the services chain is unchanged: {text}");
        assert_eq!(text.matches("-X TUGBOAT-SEP-").count(), 1, "{text}");
        assert!(!text.contains("*filter"), "{text}");
        assert_eq!(Tables::changes(Some(&after), &after), "");
        // No endpoints: rejected in the filter table; externalTrafficPolicy Local without a
        // local endpoint: the NodePort too.
        let none = Tables::new(&[port(&[("10.244.1.5", false)], Some(30080), true)]);
        assert!(none.filter[NODEPORT_REJECT][0].contains("--dport 30080"), "{none:?}");
        let empty = Tables::new(&[port(&[], None, false)]);
        assert!(empty.filter[REJECT][0].contains("-d 10.96.0.20/32"), "{empty:?}");
    }
}
