//! The node's network, run by the kubelet (`tugboat server`, `tugboat agent`) and, for the
//! service proxy alone, by `tugboat proxy`: the service proxy (`proxy`: Services and NodePorts
//! reach ready endpoints through nftables, an iptables fallback), the pod network across nodes
//! (`pod_network`: the node bridge's network, host-gw routes to the other nodes' podCIDRs,
//! masquerading), host ports (`host_ports`: a pod's `hostPort` reached on the node's
//! addresses, as CNI's portmap plugin does), and NetworkPolicies (`policy`: nftables filter
//! rules per pod).
//!
//! It talks to the cluster only through the API client and to the host through netlink, `ip`
//! and `nft`. It must never import the kubelet or any control-plane crate: the kubelet imports
//! it (and netbench measures it directly).

pub mod host_ports;
pub mod pod_network;
pub mod policy;
pub mod proxy;
