//! The per-Service part of the proxy's nftables table as data: the few rule shapes, map keys
//! and commands the proxy writes. Each has its `nft -f` text ([`std::fmt::Display`]) and its
//! netlink form ([`super::netlink`]), so a change can be written either way.

use std::fmt;
use std::net::Ipv4Addr;

use super::TABLE;

/// An IP protocol by its number (`meta l4proto`, the `inet_proto` of map keys).
pub fn protocol_number(name: &str) -> u8 {
    match name {
        "udp" => 17,
        "sctp" => 132,
        _ => 6,
    }
}

fn protocol_name(number: u8) -> &'static str {
    match number {
        17 => "udp",
        132 => "sctp",
        _ => "tcp",
    }
}

/// `numgen random mod <n> == 0 `: taken with probability 1/n (nothing for n ≤ 1).
fn pick(n: u32) -> String {
    if n > 1 { format!("numgen random mod {n} == 0 ") } else { String::new() }
}

/// One rule of a Service's chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rule {
    /// `update @<set> { ip saddr }`: the client is remembered (session affinity).
    Remember { set: String },
    /// `[numgen random mod <pick> == 0 ]meta l4proto <proto> dnat to <ip>:<port>`
    Dnat { pick: u32, protocol: u8, ip: Ipv4Addr, port: u16 },
    /// `ip saddr @<set> goto <chain>`: a remembered client goes back to its endpoint.
    Sticky { set: String, chain: String },
    /// `[numgen random mod <pick> == 0 ]goto <chain>`
    Goto { pick: u32, chain: String },
    /// `jump <chain>`
    Jump { chain: String },
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Rule::Remember { set } => write!(f, "update @{set} {{ ip saddr }}"),
            Rule::Dnat { pick: n, protocol, ip, port } => {
                write!(f, "{}meta l4proto {} dnat to {ip}:{port}", pick(*n), protocol_name(*protocol))
            }
            Rule::Sticky { set, chain } => write!(f, "ip saddr @{set} goto {chain}"),
            Rule::Goto { pick: n, chain } => write!(f, "{}goto {chain}", pick(*n)),
            Rule::Jump { chain } => write!(f, "jump {chain}"),
        }
    }
}

/// A key of one of the table's maps or sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Key {
    /// `<address> . <proto> . <port>` (`service-ips`, `no-endpoint-services`).
    Service(Ipv4Addr, u8, u16),
    /// `<proto> . <port>` (`service-nodeports`, `no-endpoint-nodeports`).
    NodePort(u8, u16),
    /// `<address> . <address>` (`hairpin`).
    Hairpin(Ipv4Addr),
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Key::Service(ip, protocol, port) => write!(f, "{ip} . {} . {port}", protocol_name(*protocol)),
            Key::NodePort(protocol, port) => write!(f, "{} . {port}", protocol_name(*protocol)),
            Key::Hairpin(ip) => write!(f, "{ip} . {ip}"),
        }
    }
}

impl Key {
    /// The key as the kernel holds it: each field of a concatenation in 4 bytes, network order.
    pub fn bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12);
        let mut field = |bytes: &[u8]| {
            out.extend_from_slice(bytes);
            out.resize(out.len().next_multiple_of(4), 0);
        };
        match self {
            Key::Service(ip, protocol, port) => {
                field(&ip.octets());
                field(&[*protocol]);
                field(&port.to_be_bytes());
            }
            Key::NodePort(protocol, port) => {
                field(&[*protocol]);
                field(&port.to_be_bytes());
            }
            Key::Hairpin(ip) => {
                field(&ip.octets());
                field(&ip.octets());
            }
        }
        out
    }
}

/// One command of a transaction on the proxy's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// An affinity set: addresses remembered for `timeout` seconds.
    AddSet {
        name: String,
        timeout: i32,
    },
    DeleteSet {
        name: String,
    },
    AddChain {
        name: String,
    },
    FlushChain {
        name: String,
    },
    DeleteChain {
        name: String,
    },
    AddRule {
        chain: String,
        rule: Rule,
    },
    /// Elements of a map (with the chain its verdict goes to) or of a set (none).
    AddElements {
        set: &'static str,
        elements: Vec<(Key, Option<String>)>,
    },
    DeleteElements {
        set: &'static str,
        keys: Vec<Key>,
    },
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Command::AddSet { name, timeout } => {
                write!(f, "add set ip {TABLE} {name} {{ type ipv4_addr; flags dynamic,timeout; timeout {timeout}s; }}")
            }
            Command::DeleteSet { name } => write!(f, "delete set ip {TABLE} {name}"),
            Command::AddChain { name } => write!(f, "add chain ip {TABLE} {name}"),
            Command::FlushChain { name } => write!(f, "flush chain ip {TABLE} {name}"),
            Command::DeleteChain { name } => write!(f, "delete chain ip {TABLE} {name}"),
            Command::AddRule { chain, rule } => write!(f, "add rule ip {TABLE} {chain} {rule}"),
            Command::AddElements { set, elements } => {
                let elements: Vec<String> = elements
                    .iter()
                    .map(|(key, chain)| match chain {
                        Some(chain) => format!("{key} : goto {chain}"),
                        None => key.to_string(),
                    })
                    .collect();
                write!(f, "add element ip {TABLE} {set} {{ {} }}", elements.join(", "))
            }
            Command::DeleteElements { set, keys } => {
                let keys: Vec<String> = keys.iter().map(Key::to_string).collect();
                write!(f, "delete element ip {TABLE} {set} {{ {} }}", keys.join(", "))
            }
        }
    }
}

/// The `nft -f` text of `commands`, a line each.
pub fn text(commands: &[Command]) -> String {
    let mut out = String::new();
    for command in commands {
        use fmt::Write;
        let _ = writeln!(out, "{command}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_fields_of_four_bytes_in_network_order() {
        let ip = Ipv4Addr::new(10, 96, 0, 1);
        assert_eq!(Key::Service(ip, 6, 80).bytes(), [10, 96, 0, 1, 6, 0, 0, 0, 0, 80, 0, 0]);
        assert_eq!(Key::NodePort(17, 30080).bytes(), [17, 0, 0, 0, 0x75, 0x80, 0, 0]);
        assert_eq!(Key::Hairpin(ip).bytes(), [10, 96, 0, 1, 10, 96, 0, 1]);
        assert_eq!(Key::Service(ip, 132, 80).to_string(), "10.96.0.1 . sctp . 80");
    }
}
