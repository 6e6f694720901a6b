//! Pod garbage collection's decision (upstream's podgc): pods bound to nodes that no longer
//! exist, pods being deleted that never reached a node (no kubelet will finish them), and the
//! oldest finished pods beyond a threshold are deleted for good.

use std::collections::HashSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;

/// Finished pods kept at most (upstream's `--terminated-pod-gc-threshold`).
pub const TERMINATED_THRESHOLD: usize = 12_500;

/// Why a pod goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// Bound to a node that does not exist.
    Orphaned,
    /// Being deleted, never scheduled.
    UnscheduledTerminating,
    /// One finished pod too many.
    Terminated,
}

/// A pod to delete with a zero grace period.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Victim {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    /// The node the pod is bound to (for an orphan: the missing one).
    pub node: String,
    pub reason: Reason,
}

fn victim(pod: &Pod, reason: Reason) -> Victim {
    Victim {
        namespace: pod.metadata.namespace.clone().unwrap_or_default(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        uid: pod.metadata.uid.clone().unwrap_or_default(),
        node: pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
        reason,
    }
}

/// The pods to delete, given every pod and the names of the nodes that exist.
pub fn plan(pods: &[Arc<Pod>], nodes: &HashSet<String>, threshold: usize) -> Vec<Victim> {
    let mut victims = Vec::new();
    let mut finished = Vec::new();
    for pod in pods {
        let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).unwrap_or_default();
        let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
        if !node.is_empty() && !nodes.contains(node) {
            victims.push(victim(pod, Reason::Orphaned));
        } else if node.is_empty() && pod.metadata.deletion_timestamp.is_some() {
            victims.push(victim(pod, Reason::UnscheduledTerminating));
        } else if matches!(phase, Some("Succeeded" | "Failed")) && pod.metadata.deletion_timestamp.is_none() {
            finished.push(pod);
        }
    }
    if finished.len() > threshold {
        finished.sort_by_key(|p| p.metadata.creation_timestamp.as_ref().map(|t| t.0));
        let excess = finished.len() - threshold;
        victims.extend(finished.into_iter().take(excess).map(|p| victim(p, Reason::Terminated)));
    }
    victims
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, node: Option<&str>, phase: &str, deleting: bool, created: &str) -> Arc<Pod> {
        let mut value = json!({"metadata": {"name": name, "namespace": "default", "uid": name, "creationTimestamp": created},
                               "spec": {"containers": [], "nodeName": node}, "status": {"phase": phase}});
        if deleting {
            value["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
        }
        Arc::new(serde_json::from_value(value).unwrap())
    }

    #[test]
    fn orphans_unscheduled_terminating_and_excess_finished_pods_go() {
        let nodes: HashSet<String> = ["n1".to_string()].into();
        let pods = vec![
            pod("fine", Some("n1"), "Running", false, "2026-01-01T00:00:00Z"),
            pod("orphan", Some("gone"), "Running", false, "2026-01-01T00:00:00Z"),
            pod("pending", None, "Pending", false, "2026-01-01T00:00:00Z"),
            pod("stuck", None, "Pending", true, "2026-01-01T00:00:00Z"),
            pod("done-new", Some("n1"), "Succeeded", false, "2026-01-01T00:05:00Z"),
            pod("done-old", Some("n1"), "Failed", false, "2026-01-01T00:01:00Z"),
            pod("done-mid", Some("n1"), "Succeeded", false, "2026-01-01T00:03:00Z"),
        ];
        let victims = plan(&pods, &nodes, 1);
        let named: Vec<(&str, Reason)> = victims.iter().map(|v| (v.name.as_str(), v.reason)).collect();
        assert_eq!(
            named,
            [
                ("orphan", Reason::Orphaned),
                ("stuck", Reason::UnscheduledTerminating),
                ("done-old", Reason::Terminated),
                ("done-mid", Reason::Terminated)
            ]
        );
        assert_eq!(victims[0].node, "gone");
        assert_eq!(plan(&pods, &nodes, 10).len(), 2, "under the threshold finished pods stay");
    }
}
