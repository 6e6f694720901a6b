//! How a pod's node-level constraints judge a node (upstream's component-helpers
//! scheduling): taints and tolerations, node selector terms and requirements, nodeSelector and
//! required node affinity, cordoning. The scheduler filters with them; the DaemonSet controller
//! asks the same of each node.

use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, NodeSelectorTerm, Pod, PodSpec, Taint, Toleration};

/// Whether one of `tolerations` tolerates `taint`.
pub fn tolerates(tolerations: &[Toleration], taint: &Taint) -> bool {
    tolerations.iter().any(|t| {
        let effect_matches = t.effect.as_deref().is_none_or(|e| e.is_empty() || e == taint.effect);
        let key_matches = match t.key.as_deref() {
            None | Some("") => t.operator.as_deref() == Some("Exists"),
            Some(key) => key == taint.key,
        };
        let value_matches = match t.operator.as_deref() {
            Some("Exists") => true,
            _ => t.value.as_deref().unwrap_or_default() == taint.value.as_deref().unwrap_or_default(),
        };
        effect_matches && key_matches && value_matches
    })
}

/// Whether a node selector requirement holds for a label (or field) `value`.
pub fn requirement_matches(requirement: &NodeSelectorRequirement, value: Option<&str>) -> bool {
    let values = requirement.values.as_deref().unwrap_or_default();
    let number = |s: &str| s.parse::<i64>().ok();
    match requirement.operator.as_str() {
        "In" => value.is_some_and(|v| values.iter().any(|x| x == v)),
        "NotIn" => value.is_none_or(|v| !values.iter().any(|x| x == v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        "Gt" => matches!((value.and_then(number), values.first().and_then(|x| number(x))), (Some(v), Some(x)) if v > x),
        "Lt" => matches!((value.and_then(number), values.first().and_then(|x| number(x))), (Some(v), Some(x)) if v < x),
        _ => false,
    }
}

/// A node selector term: every label expression and every field expression (`metadata.name`)
/// holds. An empty term matches nothing, as upstream.
pub fn term_matches(term: &NodeSelectorTerm, node: &Node) -> bool {
    let labels = node.metadata.labels.as_ref();
    let expressions = term.match_expressions.as_deref().unwrap_or_default();
    let fields = term.match_fields.as_deref().unwrap_or_default();
    if expressions.is_empty() && fields.is_empty() {
        return false;
    }
    expressions.iter().all(|r| requirement_matches(r, labels.and_then(|l| l.get(&r.key)).map(String::as_str)))
        && fields.iter().all(|r| {
            let value = if r.key == "metadata.name" { node.metadata.name.as_deref() } else { None };
            requirement_matches(r, value)
        })
}

/// The node-level constraints of a pod, as the first filters judge them: unschedulable nodes,
/// untolerated NoSchedule/NoExecute taints, nodeSelector and required node affinity. Returns
/// upstream's reason for the first that fails.
pub fn constraint_failure(spec: &PodSpec, node: &Node) -> Option<String> {
    let tolerations = spec.tolerations.as_deref().unwrap_or_default();
    // NodeUnschedulable
    if node.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false) {
        let unschedulable =
            Taint { key: "node.kubernetes.io/unschedulable".into(), effect: "NoSchedule".into(), ..Default::default() };
        if !tolerates(tolerations, &unschedulable) {
            return Some("node(s) were unschedulable".into());
        }
    }
    // TaintToleration
    let taints = node.spec.as_ref().and_then(|s| s.taints.as_deref()).unwrap_or_default();
    if let Some(taint) =
        taints.iter().find(|t| matches!(t.effect.as_str(), "NoSchedule" | "NoExecute") && !tolerates(tolerations, t))
    {
        return Some(format!(
            "node(s) had untolerated taint {{{}: {}}}",
            taint.key,
            taint.value.as_deref().unwrap_or_default()
        ));
    }
    // NodeAffinity: nodeSelector and required affinity.
    if !affinity_allows(spec, node) {
        return Some("node(s) didn't match Pod's node affinity/selector".into());
    }
    None
}

/// The pod's nodeSelector and required node affinity hold on `node`.
pub fn affinity_allows(spec: &PodSpec, node: &Node) -> bool {
    let labels = node.metadata.labels.as_ref();
    let selector_ok = spec.node_selector.iter().flatten().all(|(k, v)| labels.and_then(|l| l.get(k)) == Some(v));
    let required = spec
        .affinity
        .as_ref()
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| a.required_during_scheduling_ignored_during_execution.as_ref());
    selector_ok && required.is_none_or(|r| r.node_selector_terms.iter().any(|t| term_matches(t, node)))
}

/// Whether `node` admits `pod` as far as taints, cordoning and node affinity/selector go
/// (resources and ports aside): what the DaemonSet controller asks of each node.
pub fn fits_constraints(pod: &Pod, node: &Node) -> bool {
    pod.spec.as_ref().is_some_and(|spec| constraint_failure(spec, node).is_none())
}

/// The host ports a pod takes: (protocol, host IP, port), the IP `0.0.0.0` when not given.
pub fn host_ports(pod: &Pod) -> Vec<(String, String, i32)> {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let port = p.host_port.filter(|p| *p > 0)?;
            let ip = p.host_ip.clone().filter(|ip| !ip.is_empty()).unwrap_or_else(|| "0.0.0.0".into());
            Some((p.protocol.clone().unwrap_or_else(|| "TCP".into()), ip, port))
        })
        .collect()
}

/// Whether one of `wanted` is taken by one of `held` (upstream's NodePorts: same protocol and
/// port, and the same IP or either the wildcard).
pub fn host_ports_conflict(wanted: &[(String, String, i32)], held: &[(String, String, i32)]) -> bool {
    wanted.iter().any(|(protocol, ip, port)| {
        held.iter().any(|(p, i, n)| p == protocol && n == port && (i == ip || i == "0.0.0.0" || ip == "0.0.0.0"))
    })
}
