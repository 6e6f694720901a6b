//! The built-in service load balancer (what k3s's ServiceLB does on machines without a cloud):
//! a Service of `type: LoadBalancer` (with no `loadBalancerClass`, which names another
//! implementation) gets the addresses of the Ready nodes as its `status.loadBalancer.ingress`,
//! and every node's service proxy sends traffic for those addresses and the Service's ports to
//! its endpoints, as for external IPs. `kubectl get svc` shows them as EXTERNAL-IP.

use std::collections::BTreeSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Service};
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::sync::Notify;

use super::{Hub, wait};
use crate::nodelifecycle::is_node_ready;

/// The addresses a LoadBalancer Service is given: each Ready node's internal (else external)
/// address.
pub fn node_addresses(nodes: &[Arc<Node>]) -> BTreeSet<String> {
    nodes
        .iter()
        .filter(|n| is_node_ready(n) && n.metadata.deletion_timestamp.is_none())
        .filter_map(|n| {
            let addresses = n.status.as_ref()?.addresses.as_ref()?;
            let pick = |kind: &str| addresses.iter().find(|a| a.type_ == kind).map(|a| a.address.clone());
            pick("InternalIP").or_else(|| pick("ExternalIP"))
        })
        .collect()
}

/// The ingress a Service should show (None: not ours to set).
pub fn wanted(service: &Service, addresses: &BTreeSet<String>) -> Option<Vec<String>> {
    let spec = service.spec.as_ref()?;
    if spec.load_balancer_class.is_some() {
        return None;
    }
    Some(if spec.type_.as_deref() == Some("LoadBalancer") { addresses.iter().cloned().collect() } else { Vec::new() })
}

fn shown(service: &Service) -> Vec<String> {
    service
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|l| l.ingress.as_ref())
        .map(|i| i.iter().filter_map(|i| i.ip.clone()).collect())
        .unwrap_or_default()
}

pub(super) async fn run_service_lb(client: kube::Client, hub: Arc<Hub>) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let services = hub.watch::<Service>(&changed);
    let nodes = hub.watch::<Node>(&changed);
    services.wait_until_ready().await;
    nodes.wait_until_ready().await;
    tracing::info!("service load balancer started");
    loop {
        let addresses = node_addresses(&nodes.state());
        for service in services.state() {
            let Some(wanted) = wanted(&service, &addresses) else { continue };
            if shown(&service) == wanted {
                continue;
            }
            let namespace = service.metadata.namespace.as_deref().unwrap_or("default");
            let name = service.metadata.name.as_deref().unwrap_or_default();
            let ingress: Vec<_> = wanted.iter().map(|ip| json!({"ip": ip, "ipMode": "VIP"})).collect();
            let patch = json!({"status": {"loadBalancer": {"ingress": ingress}}});
            let api: Api<Service> = Api::namespaced(client.clone(), namespace);
            if let Err(error) = api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                tracing::debug!(%error, service = name, "service load balancer");
            }
        }
        wait(&changed).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_balancers_get_the_ready_nodes_addresses() {
        let nodes: Vec<Arc<Node>> = serde_json::from_value::<Vec<Node>>(json!([
            {"metadata": {"name": "a"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.2"}],
             "conditions": [{"type": "Ready", "status": "True"}]}},
            {"metadata": {"name": "b"}, "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.3"}],
             "conditions": [{"type": "Ready", "status": "False"}]}},
        ]))
        .unwrap()
        .into_iter()
        .map(Arc::new)
        .collect();
        let addresses = node_addresses(&nodes);
        assert_eq!(addresses.iter().collect::<Vec<_>>(), ["10.0.0.2"], "ready nodes only");
        let service = |spec: serde_json::Value| -> Service { serde_json::from_value(json!({"spec": spec})).unwrap() };
        assert_eq!(wanted(&service(json!({"type": "LoadBalancer"})), &addresses), Some(vec!["10.0.0.2".to_string()]));
        assert_eq!(
            wanted(&service(json!({"type": "ClusterIP"})), &addresses),
            Some(vec![]),
            "cleared when no longer one"
        );
        assert_eq!(wanted(&service(json!({"type": "LoadBalancer", "loadBalancerClass": "x.io/lb"})), &addresses), None);
    }
}
