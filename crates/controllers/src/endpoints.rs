//! The endpoints and endpoint slice controllers' decision: for a Service with a selector, which
//! pods back it, on which ports, and whether each is ready. Gives the `Endpoints` subsets
//! (ready and not-ready addresses, grouped by their resolved ports as upstream repacks them) and
//! the EndpointSlices (per address type and port set, at most 100 endpoints each; terminating
//! pods included with `terminating: true`).

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{EndpointAddress, EndpointPort, EndpointSubset, ObjectReference, Pod, Service};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort as SlicePort};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::pods::is_ready;

/// Endpoints per slice (upstream's `--max-endpoints-per-slice` default).
pub const MAX_PER_SLICE: usize = 100;

/// The label that ties a slice to its Service, and the one that says who manages it.
pub const SERVICE_NAME: &str = "kubernetes.io/service-name";
pub const MANAGED_BY: &str = "endpointslice.kubernetes.io/managed-by";
pub const CONTROLLER: &str = "endpointslice-controller.k8s.io";

/// One port of the service, resolved for one pod: (name, port, protocol, appProtocol).
type Port = (String, i32, String, Option<String>);

/// One desired EndpointSlice.
#[derive(Debug, Clone, PartialEq)]
pub struct Slice {
    pub address_type: String,
    pub ports: Vec<SlicePort>,
    pub endpoints: Vec<Endpoint>,
}

/// Everything the Service's selector says, or None for a Service without one (its endpoints
/// are the user's).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Desired {
    pub subsets: Vec<EndpointSubset>,
    pub slices: Vec<Slice>,
}

/// The service's ports resolved against a pod (a named targetPort is looked up among the pod's
/// container ports; a port the pod does not have is left out for that pod).
fn resolve_ports(service: &Service, pod: &Pod) -> Vec<Port> {
    let spec = service.spec.as_ref();
    let container_port = |name: &str, protocol: &str| {
        pod.spec.iter().flat_map(|s| &s.containers).flat_map(|c| c.ports.iter().flatten()).find_map(|p| {
            (p.name.as_deref() == Some(name) && p.protocol.as_deref().unwrap_or("TCP") == protocol)
                .then_some(p.container_port)
        })
    };
    spec.and_then(|s| s.ports.as_ref())
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let protocol = p.protocol.clone().unwrap_or_else(|| "TCP".into());
            let port = match &p.target_port {
                None => p.port,
                Some(IntOrString::Int(0)) => p.port,
                Some(IntOrString::Int(port)) => *port,
                Some(IntOrString::String(name)) => match name.parse::<i32>() {
                    Ok(port) => port,
                    Err(_) => container_port(name, &protocol)?,
                },
            };
            Some((p.name.clone().unwrap_or_default(), port, protocol, p.app_protocol.clone()))
        })
        .collect()
}

fn target_ref(pod: &Pod) -> ObjectReference {
    ObjectReference {
        kind: Some("Pod".into()),
        namespace: pod.metadata.namespace.clone(),
        name: pod.metadata.name.clone(),
        uid: pod.metadata.uid.clone(),
        ..Default::default()
    }
}

/// The pod's hostname in the service's DNS, when the pod asks for one under this service.
fn hostname(service: &Service, pod: &Pod) -> Option<String> {
    let spec = pod.spec.as_ref()?;
    (spec.subdomain.is_some() && spec.subdomain == service.metadata.name).then(|| spec.hostname.clone()).flatten()
}

/// What the service's selector makes of the pods of its namespace.
pub fn desired(service: &Service, pods: &[Arc<Pod>]) -> Option<Desired> {
    let spec = service.spec.as_ref()?;
    let selector = spec.selector.as_ref().filter(|s| !s.is_empty())?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let publish_not_ready = spec.publish_not_ready_addresses.unwrap_or(false);
    let mut subsets: BTreeMap<Vec<Port>, (Vec<EndpointAddress>, Vec<EndpointAddress>)> = BTreeMap::new();
    let mut slices: BTreeMap<(String, Vec<Port>), Vec<Endpoint>> = BTreeMap::new();
    let mut selected: Vec<&Pod> = pods
        .iter()
        .map(|p| &**p)
        .filter(|p| {
            let labels = p.metadata.labels.as_ref();
            selector.iter().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v))
        })
        .collect();
    selected.sort_by(|a, b| (&a.metadata.name, &a.metadata.uid).cmp(&(&b.metadata.name, &b.metadata.uid)));
    for pod in selected {
        let status = pod.status.as_ref();
        let Some(ip) = status.and_then(|s| s.pod_ip.clone()).filter(|ip| !ip.is_empty()) else { continue };
        if matches!(status.and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")) {
            continue;
        }
        let ports = resolve_ports(service, pod);
        let terminating = pod.metadata.deletion_timestamp.is_some();
        let ready = (is_ready(pod) || publish_not_ready) && !terminating;
        let node_name = pod.spec.as_ref().and_then(|s| s.node_name.clone());
        if !terminating || publish_not_ready {
            let address = EndpointAddress {
                ip: ip.clone(),
                hostname: hostname(service, pod),
                node_name: node_name.clone(),
                target_ref: Some(target_ref(pod)),
            };
            let entry = subsets.entry(ports.clone()).or_default();
            if ready || publish_not_ready { entry.0.push(address) } else { entry.1.push(address) }
        }
        let address_type = if ip.contains(':') { "IPv6" } else { "IPv4" };
        slices.entry((address_type.to_string(), ports)).or_default().push(Endpoint {
            addresses: vec![ip],
            conditions: Some(EndpointConditions {
                ready: Some(ready),
                serving: Some(is_ready(pod) || publish_not_ready),
                terminating: Some(terminating),
            }),
            hostname: hostname(service, pod),
            node_name,
            target_ref: Some(target_ref(pod)),
            ..Default::default()
        });
    }
    let subsets = subsets
        .into_iter()
        .filter(|(ports, _)| !ports.is_empty() || spec.cluster_ip.as_deref() == Some("None"))
        .map(|(ports, (ready, not_ready))| EndpointSubset {
            addresses: Some(ready).filter(|a| !a.is_empty()),
            not_ready_addresses: Some(not_ready).filter(|a| !a.is_empty()),
            ports: Some(
                ports
                    .into_iter()
                    .map(|(name, port, protocol, app_protocol)| EndpointPort {
                        name: Some(name).filter(|n| !n.is_empty()),
                        port,
                        protocol: Some(protocol),
                        app_protocol,
                    })
                    .collect::<Vec<_>>(),
            )
            .filter(|p| !p.is_empty()),
        })
        .collect();
    let mut chunks = Vec::new();
    for ((address_type, ports), endpoints) in slices {
        let ports: Vec<SlicePort> = ports
            .into_iter()
            .map(|(name, port, protocol, app_protocol)| SlicePort {
                name: Some(name),
                port: Some(port),
                protocol: Some(protocol),
                app_protocol,
            })
            .collect();
        for chunk in endpoints.chunks(MAX_PER_SLICE) {
            chunks.push(Slice { address_type: address_type.clone(), ports: ports.clone(), endpoints: chunk.to_vec() });
        }
    }
    if chunks.is_empty() {
        // Upstream keeps one empty slice per service, so watchers see "no endpoints".
        let address_type = if spec.ip_families.iter().flatten().any(|f| f == "IPv6")
            && !spec.ip_families.iter().flatten().any(|f| f == "IPv4")
        {
            "IPv6"
        } else {
            "IPv4"
        };
        chunks.push(Slice { address_type: address_type.into(), ports: Vec::new(), endpoints: Vec::new() });
    }
    Some(Desired { subsets, slices: chunks })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn service(extra: serde_json::Value) -> Service {
        let mut value = json!({"metadata": {"name": "web", "namespace": "default"},
                               "spec": {"selector": {"app": "web"}, "clusterIP": "10.96.0.5",
                                        "ports": [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"},
                                                  {"name": "admin", "port": 9000, "protocol": "TCP"}]}});
        for (k, v) in extra.as_object().unwrap() {
            value["spec"][k] = v.clone();
        }
        serde_json::from_value(value).unwrap()
    }

    fn pod(name: &str, ip: Option<&str>, ready: bool, extra: serde_json::Value) -> Arc<Pod> {
        let mut value = json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"), "labels": {"app": "web"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": {"phase": "Running", "podIP": ip,
                       "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}});
        for (k, v) in extra.as_object().unwrap() {
            value["metadata"][k] = v.clone();
        }
        Arc::new(serde_json::from_value(value).unwrap())
    }

    #[test]
    fn ready_pods_are_addresses_on_resolved_ports() {
        let pods = vec![
            pod("b", Some("10.244.0.3"), true, json!({})),
            pod("a", Some("10.244.0.2"), true, json!({})),
            pod("slow", Some("10.244.0.4"), false, json!({})),
            pod("no-ip", None, true, json!({})),
            pod("leaving", Some("10.244.0.5"), true, json!({"deletionTimestamp": "2026-01-01T00:00:00Z"})),
            pod("other", Some("10.244.0.6"), true, json!({"labels": {"app": "db"}})),
        ];
        let desired = desired(&service(json!({})), &pods).unwrap();
        assert_eq!(desired.subsets.len(), 1);
        let subset = &desired.subsets[0];
        let ips = |a: &Option<Vec<EndpointAddress>>| a.iter().flatten().map(|a| a.ip.clone()).collect::<Vec<_>>();
        assert_eq!(ips(&subset.addresses), ["10.244.0.2", "10.244.0.3"]);
        assert_eq!(ips(&subset.not_ready_addresses), ["10.244.0.4"]);
        let ports: Vec<(Option<String>, i32)> =
            subset.ports.iter().flatten().map(|p| (p.name.clone(), p.port)).collect();
        assert_eq!(ports, [(Some("http".into()), 8080), (Some("admin".into()), 9000)]);
        assert_eq!(subset.addresses.as_ref().unwrap()[0].target_ref.as_ref().unwrap().name.as_deref(), Some("a"));

        assert_eq!(desired.slices.len(), 1);
        let slice = &desired.slices[0];
        assert_eq!(slice.address_type, "IPv4");
        let states: Vec<(String, bool, bool)> = slice
            .endpoints
            .iter()
            .map(|e| {
                let c = e.conditions.as_ref().unwrap();
                (e.addresses[0].clone(), c.ready.unwrap(), c.terminating.unwrap())
            })
            .collect();
        assert_eq!(
            states,
            [
                ("10.244.0.2".into(), true, false),
                ("10.244.0.3".into(), true, false),
                ("10.244.0.5".into(), false, true),
                ("10.244.0.4".into(), false, false)
            ]
        );
    }

    #[test]
    fn services_without_selectors_are_left_alone_and_empty_ones_get_an_empty_slice() {
        assert_eq!(desired(&service(json!({"selector": null})), &[]), None);
        let empty = desired(&service(json!({})), &[]).unwrap();
        assert!(empty.subsets.is_empty());
        assert_eq!(empty.slices.len(), 1);
        assert!(empty.slices[0].endpoints.is_empty());
    }

    #[test]
    fn a_pod_without_the_named_port_gets_a_subset_of_its_own_and_slices_hold_a_hundred() {
        let mut pods: Vec<Arc<Pod>> =
            (0..150).map(|i| pod(&format!("p{i:03}"), Some(&format!("10.244.1.{i}")), true, json!({}))).collect();
        let mut bare: Pod = (*pod("bare", Some("10.244.2.1"), true, json!({}))).clone();
        bare.spec.as_mut().unwrap().containers[0].ports = None;
        pods.push(Arc::new(bare));
        let desired = desired(&service(json!({})), &pods).unwrap();
        assert_eq!(desired.subsets.len(), 2, "{:?}", desired.subsets);
        let sizes: Vec<usize> = desired.slices.iter().map(|s| s.endpoints.len()).collect();
        assert_eq!(sizes.iter().sum::<usize>(), 151);
        assert!(sizes.iter().all(|s| *s <= MAX_PER_SLICE));
        assert!(desired.slices.iter().any(|s| s.ports.len() == 1), "the bare pod only has the numeric port");
    }
}
