//! Node IPAM: a pod CIDR for every node, carved out of the cluster CIDR (`--cluster-cidr`,
//! default 10.244.0.0/16, a /24 per node as upstream's `--node-cidr-mask-size`).

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Node;

/// An IPv4 network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    pub address: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(text: &str) -> Result<Cidr, String> {
        let (address, prefix) = text.split_once('/').ok_or_else(|| format!("{text:?} is not a CIDR (a.b.c.d/n)"))?;
        let address: Ipv4Addr = address.parse().map_err(|_| format!("{text:?}: {address:?} is not an IPv4 address"))?;
        let prefix: u8 = prefix.parse().ok().filter(|p| *p <= 32).ok_or_else(|| format!("{text:?}: bad prefix"))?;
        let mask = if prefix == 0 { 0 } else { u32::MAX << (32 - prefix) };
        Ok(Cidr { address: Ipv4Addr::from(u32::from(address) & mask), prefix })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.address, self.prefix)
    }
}

impl Cidr {
    /// The `index`th subnet of prefix `prefix` inside this network, if there is one.
    pub fn subnet(&self, prefix: u8, index: u32) -> Option<Cidr> {
        if prefix < self.prefix || prefix > 32 {
            return None;
        }
        let bits = u32::from(prefix - self.prefix);
        if bits < 32 && index >= (1u32 << bits) {
            return None;
        }
        let step = if prefix == 32 { 1 } else { 1u32 << (32 - prefix) };
        Some(Cidr { address: Ipv4Addr::from(u32::from(self.address) + index * step), prefix })
    }
}

/// Which nodes get which CIDR: every node without `spec.podCIDR` gets the lowest subnet no
/// other node holds, in name order. Nodes beyond the range get none (and are reported).
pub fn plan(nodes: &[Arc<Node>], cluster: Cidr, node_prefix: u8) -> (Vec<(String, Cidr)>, Vec<String>) {
    let mut taken: HashSet<String> = nodes.iter().filter_map(|n| n.spec.as_ref()?.pod_cidr.clone()).collect();
    let mut wanting: Vec<String> = nodes
        .iter()
        .filter(|n| n.spec.as_ref().and_then(|s| s.pod_cidr.as_deref()).is_none_or(str::is_empty))
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .filter_map(|n| n.metadata.name.clone())
        .collect();
    wanting.sort();
    let (mut given, mut left) = (Vec::new(), Vec::new());
    let mut index = 0;
    for node in wanting {
        let cidr = loop {
            match cluster.subnet(node_prefix, index) {
                Some(cidr) if taken.contains(&cidr.to_string()) => index += 1,
                other => break other,
            }
        };
        match cidr {
            Some(cidr) => {
                taken.insert(cidr.to_string());
                given.push((node, cidr));
            }
            None => left.push(node),
        }
    }
    (given, left)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, cidr: Option<&str>) -> Arc<Node> {
        Arc::new(serde_json::from_value(json!({"metadata": {"name": name}, "spec": {"podCIDR": cidr}})).unwrap())
    }

    #[test]
    fn cidrs_parse_and_split() {
        let cluster: Cidr = "10.244.7.9/16".parse().unwrap();
        assert_eq!(cluster.to_string(), "10.244.0.0/16");
        assert_eq!(cluster.subnet(24, 3).unwrap().to_string(), "10.244.3.0/24");
        assert_eq!(cluster.subnet(24, 255).unwrap().to_string(), "10.244.255.0/24");
        assert_eq!(cluster.subnet(24, 256), None);
        assert!("10.244.0.0".parse::<Cidr>().is_err());
        assert!("10.244.0.0/33".parse::<Cidr>().is_err());
        assert!("fd00::/64".parse::<Cidr>().is_err());
    }

    #[test]
    fn nodes_get_the_free_subnets_in_order() {
        let cluster: Cidr = "10.244.0.0/22".parse().unwrap();
        let nodes =
            [node("b", None), node("a", Some("10.244.1.0/24")), node("c", None), node("d", None), node("e", None)];
        let (given, left) = plan(&nodes, cluster, 24);
        let given: Vec<(String, String)> = given.into_iter().map(|(n, c)| (n, c.to_string())).collect();
        assert_eq!(
            given,
            [
                ("b".into(), "10.244.0.0/24".into()),
                ("c".into(), "10.244.2.0/24".into()),
                ("d".into(), "10.244.3.0/24".into())
            ]
        );
        assert_eq!(left, ["e"], "the /22 holds four /24s");
    }
}
