//! The DaemonSet controller's decision: one pod per eligible node (node selector, required node
//! affinity and taints judged as the scheduler judges them, with the tolerations upstream gives
//! every daemon pod), surplus and misplaced pods deleted, failed ones replaced, a rolling update
//! bounded by maxUnavailable, and the status `kubectl rollout status` reads.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{DaemonSet, DaemonSetStatus};
use k8s_openapi::api::core::v1::{
    Affinity, Node, NodeAffinity, NodeSelector, NodeSelectorRequirement, NodeSelectorTerm, Pod, PodSpec, Toleration,
};

use crate::deployment::resolve;
use crate::pods::{is_active, is_available, is_ready};

/// The label that tells a daemon pod's template revision.
pub const HASH_LABEL: &str = "controller-revision-hash";

/// What to do for one DaemonSet.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Nodes that need a daemon pod.
    pub create: Vec<String>,
    /// Pods (names) to delete.
    pub delete: Vec<String>,
    pub status: DaemonSetStatus,
}

/// The tolerations every daemon pod gets (upstream's `AddOrUpdateDaemonPodTolerations`):
/// daemons stay on nodes that are not ready, unreachable, under pressure or cordoned.
pub fn daemon_tolerations(spec: &PodSpec) -> Vec<Toleration> {
    let mut tolerations = spec.tolerations.clone().unwrap_or_default();
    let mut add = |key: &str, effect: &str| {
        if !tolerations.iter().any(|t| t.key.as_deref() == Some(key) && t.effect.as_deref() == Some(effect)) {
            tolerations.push(Toleration {
                key: Some(key.into()),
                operator: Some("Exists".into()),
                effect: Some(effect.into()),
                ..Default::default()
            });
        }
    };
    add("node.kubernetes.io/not-ready", "NoExecute");
    add("node.kubernetes.io/unreachable", "NoExecute");
    add("node.kubernetes.io/disk-pressure", "NoSchedule");
    add("node.kubernetes.io/memory-pressure", "NoSchedule");
    add("node.kubernetes.io/pid-pressure", "NoSchedule");
    add("node.kubernetes.io/unschedulable", "NoSchedule");
    if spec.host_network == Some(true) {
        add("node.kubernetes.io/network-unavailable", "NoSchedule");
    }
    tolerations
}

/// The daemon pod's spec for `node`: the template's, with the daemon tolerations and a
/// required node affinity for that node's name (the scheduler then binds it there).
pub fn pod_spec_for(template: &PodSpec, node: &str) -> PodSpec {
    let mut spec = template.clone();
    spec.tolerations = Some(daemon_tolerations(template));
    let field =
        NodeSelectorRequirement { key: "metadata.name".into(), operator: "In".into(), values: Some(vec![node.into()]) };
    let affinity = spec.affinity.get_or_insert_with(Affinity::default);
    let node_affinity = affinity.node_affinity.get_or_insert_with(NodeAffinity::default);
    let required = node_affinity
        .required_during_scheduling_ignored_during_execution
        .get_or_insert_with(|| NodeSelector { node_selector_terms: Vec::new() });
    if required.node_selector_terms.is_empty() {
        required.node_selector_terms.push(NodeSelectorTerm::default());
    }
    for term in &mut required.node_selector_terms {
        let mut fields: Vec<NodeSelectorRequirement> =
            term.match_fields.take().unwrap_or_default().into_iter().filter(|f| f.key != "metadata.name").collect();
        fields.push(field.clone());
        term.match_fields = Some(fields);
    }
    spec
}

/// Whether a daemon pod should run on `node`, and whether one already there may stay (a
/// NoSchedule taint or cordon added later does not evict it).
fn should_run(probe: &Pod, node: &Node) -> (bool, bool) {
    let run = tugboat_objects::scheduling::fits_constraints(probe, node);
    if run {
        return (true, true);
    }
    let mut lenient = node.clone();
    if let Some(spec) = lenient.spec.as_mut() {
        spec.unschedulable = None;
        if let Some(taints) = spec.taints.as_mut() {
            taints.retain(|t| t.effect == "NoExecute");
        }
    }
    (false, tugboat_objects::scheduling::fits_constraints(probe, &lenient))
}

/// The node a daemon pod is for: the name its node affinity pins, else where it is bound.
pub fn pod_node(pod: &Pod) -> Option<&str> {
    pod.spec
        .as_ref()
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| a.required_during_scheduling_ignored_during_execution.as_ref())
        .and_then(|r| r.node_selector_terms.first())
        .and_then(|t| t.match_fields.as_ref())
        .and_then(|f| f.iter().find(|f| f.key == "metadata.name"))
        .and_then(|f| f.values.as_ref()?.first().map(String::as_str))
        .or(pod.spec.as_ref().and_then(|s| s.node_name.as_deref()))
}

/// Plans for `ds`, given every node, the active and finished pods it owns, its template hash and
/// the time.
pub fn plan(ds: &DaemonSet, nodes: &[Arc<Node>], owned: &[&Pod], hash: &str, now: jiff::Timestamp) -> Plan {
    let mut plan = Plan::default();
    let spec = ds.spec.as_ref();
    let template = spec.and_then(|s| s.template.spec.clone()).unwrap_or_default();
    let min_ready = spec.and_then(|s| s.min_ready_seconds).unwrap_or(0);
    let probe =
        Pod { spec: Some(PodSpec { tolerations: Some(daemon_tolerations(&template)), ..template }), ..Pod::default() };
    let mut by_node: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
    for pod in owned {
        let node = pod_node(pod).unwrap_or_default();
        by_node.entry(node).or_default().push(pod);
    }
    let deleting = ds.metadata.deletion_timestamp.is_some();
    let current =
        |pod: &Pod| pod.metadata.labels.as_ref().and_then(|l| l.get(HASH_LABEL)).map(String::as_str) == Some(hash);
    let name = |pod: &Pod| pod.metadata.name.clone().unwrap_or_default();
    let (mut desired, mut scheduled, mut misscheduled, mut ready, mut available, mut updated) = (0, 0, 0, 0, 0, 0);
    let mut unavailable_nodes = 0;
    // Old pods on eligible nodes, for the rolling update: (available, name).
    let mut old = Vec::new();
    let known: HashMap<&str, ()> = nodes.iter().filter_map(|n| n.metadata.name.as_deref()).map(|n| (n, ())).collect();
    for node in nodes {
        let node_name = node.metadata.name.as_deref().unwrap_or_default();
        let (run, keep) = should_run(&probe, node);
        let pods = by_node.get(node_name).cloned().unwrap_or_default();
        let failed: Vec<&Pod> = pods
            .iter()
            .copied()
            .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed"))
            .collect();
        let mut active: Vec<&Pod> = pods.iter().copied().filter(|p| is_active(p)).collect();
        if run {
            desired += 1;
        }
        if !active.is_empty() {
            if run { scheduled += 1 } else { misscheduled += 1 }
        }
        if deleting {
            continue;
        }
        plan.delete.extend(failed.iter().map(|p| name(p)));
        if !(run || keep) {
            plan.delete.extend(active.iter().map(|p| name(p)));
            continue;
        }
        if active.is_empty() {
            if run {
                unavailable_nodes += 1;
                if failed.is_empty() && !pods.iter().any(|p| p.metadata.deletion_timestamp.is_some()) {
                    plan.create.push(node_name.to_string());
                }
            }
            continue;
        }
        // Keep one: the current revision first, then the oldest.
        active.sort_by_key(|p| (!current(p), p.metadata.creation_timestamp.as_ref().map(|t| t.0)));
        plan.delete.extend(active.iter().skip(1).map(|p| name(p)));
        let pod = active[0];
        if is_ready(pod) {
            ready += 1;
        }
        let is_up = is_available(pod, min_ready, now);
        if is_up {
            available += 1;
        } else if run {
            unavailable_nodes += 1;
        }
        if current(pod) {
            updated += 1;
        } else if run {
            old.push((is_up, name(pod)));
        }
    }
    // Pods for nodes that are gone.
    for (node, pods) in &by_node {
        if !known.contains_key(node) && !deleting {
            plan.delete.extend(pods.iter().filter(|p| is_active(p)).map(|p| name(p)));
        }
    }
    let strategy = spec.and_then(|s| s.update_strategy.as_ref());
    if !deleting && strategy.and_then(|s| s.type_.as_deref()).unwrap_or("RollingUpdate") == "RollingUpdate" {
        let rolling = strategy.and_then(|s| s.rolling_update.as_ref());
        let max_unavailable = resolve(rolling.and_then(|r| r.max_unavailable.as_ref()), desired, "1", true)
            .max(if resolve(rolling.and_then(|r| r.max_surge.as_ref()), desired, "0", true) == 0 { 1 } else { 0 });
        // Unavailable old pods go at once (they cost nothing); available ones within the budget.
        old.sort();
        let mut budget = (max_unavailable - unavailable_nodes).max(0);
        for (up, pod) in old {
            if !up {
                plan.delete.push(pod);
            } else if budget > 0 {
                budget -= 1;
                plan.delete.push(pod);
            }
        }
    }
    plan.status = DaemonSetStatus {
        current_number_scheduled: scheduled,
        desired_number_scheduled: desired,
        number_misscheduled: misscheduled,
        number_ready: ready,
        number_available: Some(available),
        number_unavailable: Some((desired - available).max(0)),
        updated_number_scheduled: Some(updated),
        observed_generation: ds.metadata.generation,
        collision_count: ds.status.as_ref().and_then(|s| s.collision_count),
        conditions: None,
    };
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ds(extra: serde_json::Value) -> DaemonSet {
        let mut value = json!({
            "metadata": {"name": "agent", "namespace": "kube-system", "uid": "ds-uid", "generation": 2},
            "spec": {"selector": {"matchLabels": {"app": "agent"}},
                     "template": {"metadata": {"labels": {"app": "agent"}}, "spec": {"containers": [{"name": "c"}]}}}});
        for (k, v) in extra.as_object().unwrap() {
            value["spec"][k] = v.clone();
        }
        serde_json::from_value(value).unwrap()
    }

    fn node(name: &str, spec: serde_json::Value, labels: serde_json::Value) -> Arc<Node> {
        Arc::new(serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}, "spec": spec})).unwrap())
    }

    fn pod(name: &str, node: &str, hash: &str, phase: &str, ready: bool) -> Pod {
        let spec = pod_spec_for(&PodSpec::default(), node);
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": "agent", HASH_LABEL: hash}, "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": spec,
            "status": {"phase": phase, "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}}))
        .unwrap()
    }

    fn now() -> jiff::Timestamp {
        "2026-01-01T00:10:00Z".parse().unwrap()
    }

    #[test]
    fn one_pod_per_eligible_node() {
        let nodes = vec![
            node("a", json!({}), json!({})),
            node("cordoned", json!({"unschedulable": true}), json!({})),
            node(
                "tainted",
                json!({"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}),
                json!({}),
            ),
            node("c", json!({}), json!({})),
        ];
        let pods = [pod("p-a", "a", "h1", "Running", true), pod("p-a2", "a", "h1", "Running", true)];
        let owned: Vec<&Pod> = pods.iter().collect();
        let plan = plan(&ds(json!({})), &nodes, &owned, "h1", now());
        assert_eq!(plan.create, ["cordoned", "c"], "daemons tolerate cordoning, not other taints");
        assert_eq!(plan.delete, ["p-a2"]);
        assert_eq!(plan.status.desired_number_scheduled, 3);
        assert_eq!(plan.status.current_number_scheduled, 1);
        assert_eq!(plan.status.number_ready, 1);
        assert_eq!(plan.status.number_unavailable, Some(2));
    }

    #[test]
    fn node_selectors_limit_nodes_and_misplaced_or_failed_pods_go() {
        let nodes =
            vec![node("ssd", json!({}), json!({"disk": "ssd"})), node("hdd", json!({}), json!({"disk": "hdd"}))];
        let set = ds(json!({"template": {"metadata": {"labels": {"app": "agent"}},
                                          "spec": {"nodeSelector": {"disk": "ssd"}, "containers": [{"name": "c"}]}}}));
        let pods = [
            pod("on-hdd", "hdd", "h1", "Running", true),
            pod("failed", "ssd", "h1", "Failed", false),
            pod("gone", "old-node", "h1", "Running", true),
        ];
        let owned: Vec<&Pod> = pods.iter().collect();
        let plan = plan(&set, &nodes, &owned, "h1", now());
        assert_eq!(plan.create, Vec::<String>::new(), "the failed pod is deleted first, then replaced");
        assert_eq!(plan.delete, ["failed", "on-hdd", "gone"]);
        assert_eq!(plan.status.number_misscheduled, 1);
    }

    #[test]
    fn rolling_updates_replace_one_available_pod_at_a_time() {
        let nodes: Vec<Arc<Node>> = ["a", "b", "c"].iter().map(|n| node(n, json!({}), json!({}))).collect();
        let pods = [
            pod("pa", "a", "old", "Running", true),
            pod("pb", "b", "old", "Running", true),
            pod("pc", "c", "old", "Pending", false),
        ];
        let owned: Vec<&Pod> = pods.iter().collect();
        let plan1 = plan(&ds(json!({})), &nodes, &owned, "new", now());
        assert_eq!(plan1.delete, ["pc"], "the unavailable old pod uses up the budget of one");
        let pods = [
            pod("pa", "a", "old", "Running", true),
            pod("pb", "b", "old", "Running", true),
            pod("pc", "c", "new", "Running", true),
        ];
        let owned: Vec<&Pod> = pods.iter().collect();
        let plan2 = plan(
            &ds(json!({"updateStrategy": {"rollingUpdate": {"maxUnavailable": 2}}})),
            &nodes,
            &owned,
            "new",
            now(),
        );
        assert_eq!(plan2.delete, ["pa", "pb"]);
        assert_eq!(plan2.status.updated_number_scheduled, Some(1));
        let on_delete = plan(&ds(json!({"updateStrategy": {"type": "OnDelete"}})), &nodes, &owned, "new", now());
        assert!(on_delete.delete.is_empty());
    }

    #[test]
    fn daemon_pods_are_pinned_to_their_node_and_tolerate_node_trouble() {
        let spec = pod_spec_for(&PodSpec::default(), "n7");
        let term = &spec
            .affinity
            .unwrap()
            .node_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap()
            .node_selector_terms[0];
        assert_eq!(term.match_fields.as_ref().unwrap()[0].values.as_deref(), Some(&["n7".to_string()][..]));
        let keys: Vec<String> = spec.tolerations.unwrap().into_iter().filter_map(|t| t.key).collect();
        assert!(keys.contains(&"node.kubernetes.io/unreachable".to_string()));
    }
}
