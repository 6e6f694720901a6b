//! The ReplicaSet controller's decision, without I/O: given a ReplicaSet and the pods of its
//! namespace, which pods it owns (adopting orphans its selector matches, releasing pods it no
//! longer selects), how many to create or which to delete to reach `spec.replicas`, and the
//! status to report.

use std::cmp::Reverse;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{ReplicaSet, ReplicaSetStatus};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::pods::{is_active, is_available, is_ready, selector_matches};

/// What to do for one ReplicaSet.
#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Pods to create from the template.
    pub create: usize,
    /// Pods to delete (names), the least useful first.
    pub delete: Vec<String>,
    /// Orphans to take over (names).
    pub adopt: Vec<String>,
    /// Owned pods the selector no longer matches (names).
    pub release: Vec<String>,
    pub status: ReplicaSetStatus,
}

fn owned_by(pod: &Pod, uid: &str) -> bool {
    pod.metadata.owner_references.iter().flatten().any(|r| r.controller == Some(true) && r.uid == uid)
}

fn has_controller(pod: &Pod) -> bool {
    pod.metadata.owner_references.iter().flatten().any(|r| r.controller == Some(true))
}

/// Which pod to delete first: unscheduled before scheduled, pending before running, not ready
/// before ready, then the youngest (upstream's ActivePods ordering, in short).
fn deletion_rank(pod: &Pod) -> (bool, bool, bool, Reverse<Option<jiff::Timestamp>>) {
    let scheduled = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).is_some_and(|n| !n.is_empty());
    let running = pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
    (scheduled, running, is_ready(pod), Reverse(pod.metadata.creation_timestamp.as_ref().map(|t| t.0)))
}

/// Plans for `rs`, given every pod of its namespace and how many pods it has created that the
/// pod watch has not shown yet (`in_flight`, so a lagging watch does not double the pods).
pub fn plan(rs: &ReplicaSet, pods: &[Arc<Pod>], in_flight: usize, now: jiff::Timestamp) -> Plan {
    let uid = rs.metadata.uid.as_deref().unwrap_or_default();
    let spec = rs.spec.as_ref();
    let selector: LabelSelector = spec.map(|s| s.selector.clone()).unwrap_or_default();
    let wanted = spec.and_then(|s| s.replicas).unwrap_or(1).max(0) as usize;
    let min_ready = spec.and_then(|s| s.min_ready_seconds).unwrap_or(0);
    let deleting = rs.metadata.deletion_timestamp.is_some();

    let mut plan = Plan::default();
    let mut owned: Vec<&Pod> = Vec::new();
    for pod in pods.iter().map(|p| &**p) {
        let matches = selector_matches(&selector, pod.metadata.labels.as_ref());
        if owned_by(pod, uid) {
            if matches {
                owned.push(pod);
            } else if is_active(pod) {
                plan.release.push(pod.metadata.name.clone().unwrap_or_default());
            }
        } else if matches && !has_controller(pod) && is_active(pod) && !deleting {
            plan.adopt.push(pod.metadata.name.clone().unwrap_or_default());
            owned.push(pod);
        }
    }
    let mut active: Vec<&Pod> = owned.iter().copied().filter(|p| is_active(p)).collect();
    let have = active.len() + in_flight;
    if !deleting {
        if have < wanted {
            plan.create = wanted - have;
        } else if active.len() > wanted {
            active.sort_by_key(|p| deletion_rank(p));
            plan.delete = active
                .iter()
                .take(active.len() - wanted)
                .map(|p| p.metadata.name.clone().unwrap_or_default())
                .collect();
        }
    }
    let template_labels =
        spec.and_then(|s| s.template.as_ref()).and_then(|t| t.metadata.as_ref()).and_then(|m| m.labels.as_ref());
    let fully_labeled = active
        .iter()
        .filter(|p| {
            template_labels.is_none_or(|labels| {
                labels.iter().all(|(k, v)| p.metadata.labels.as_ref().and_then(|l| l.get(k)) == Some(v))
            })
        })
        .count();
    plan.status = ReplicaSetStatus {
        replicas: active.len() as i32,
        fully_labeled_replicas: Some(fully_labeled as i32),
        ready_replicas: Some(active.iter().filter(|p| is_ready(p)).count() as i32),
        available_replicas: Some(active.iter().filter(|p| is_available(p, min_ready, now)).count() as i32),
        observed_generation: rs.metadata.generation,
        terminating_replicas: None,
        conditions: None,
    };
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn rs(replicas: i32) -> ReplicaSet {
        serde_json::from_value(json!({
            "metadata": {"name": "web-1", "namespace": "default", "uid": "rs-uid", "generation": 3},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}},
                     "template": {"metadata": {"labels": {"app": "web", "tier": "front"}}, "spec": {"containers": []}}},
        }))
        .unwrap()
    }

    fn pod(name: &str, extra: serde_json::Value) -> Arc<Pod> {
        let mut value = json!({"metadata": {"name": name, "namespace": "default", "labels": {"app": "web", "tier": "front"},
                                             "creationTimestamp": "2026-01-01T00:00:00Z",
                                             "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-1",
                                                                  "uid": "rs-uid", "controller": true}]},
                               "spec": {"containers": []}});
        if let (Some(target), serde_json::Value::Object(extra)) = (value.as_object_mut(), extra) {
            for (k, v) in extra {
                if let (Some(serde_json::Value::Object(t)), serde_json::Value::Object(v)) = (target.get_mut(&k), &v) {
                    for (k2, v2) in v {
                        t.insert(k2.clone(), v2.clone());
                    }
                } else {
                    target.insert(k, v);
                }
            }
        }
        Arc::new(serde_json::from_value(value).unwrap())
    }

    fn running_ready(since: &str) -> serde_json::Value {
        json!({"spec": {"containers": [], "nodeName": "n1"},
               "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": "True", "lastTransitionTime": since}]}})
    }

    fn now() -> jiff::Timestamp {
        "2026-01-01T00:10:00Z".parse().unwrap()
    }

    #[test]
    fn creates_what_is_missing_and_counts_what_is_in_flight() {
        let pods = vec![pod("a", running_ready("2026-01-01T00:00:00Z"))];
        assert_eq!(plan(&rs(3), &pods, 0, now()).create, 2);
        assert_eq!(plan(&rs(3), &pods, 2, now()).create, 0, "two created, not yet seen");
        let status = plan(&rs(3), &pods, 0, now()).status;
        assert_eq!((status.replicas, status.ready_replicas, status.available_replicas), (1, Some(1), Some(1)));
        assert_eq!(status.observed_generation, Some(3));
    }

    #[test]
    fn deletes_the_least_useful_pods_first() {
        let pods = vec![
            pod("ready", running_ready("2026-01-01T00:00:00Z")),
            pod("pending", json!({})),
            pod("scheduled", json!({"spec": {"containers": [], "nodeName": "n1"}})),
            pod("gone", json!({"metadata": {"deletionTimestamp": "2026-01-01T00:05:00Z"}})),
            pod("done", json!({"status": {"phase": "Succeeded"}})),
        ];
        let plan = plan(&rs(1), &pods, 0, now());
        assert_eq!(plan.delete, ["pending", "scheduled"]);
        assert_eq!(plan.create, 0);
        assert_eq!(plan.status.replicas, 3, "terminating and finished pods do not count");
    }

    #[test]
    fn adopts_orphans_and_releases_pods_it_no_longer_selects() {
        let pods = vec![
            pod("orphan", json!({"metadata": {"ownerReferences": []}})),
            pod(
                "others",
                json!({"metadata": {"ownerReferences": [{"apiVersion": "v1", "kind": "X", "name": "x", "uid": "other", "controller": true}]}}),
            ),
            pod("relabeled", json!({"metadata": {"labels": {"app": "debug"}}})),
        ];
        let plan = plan(&rs(2), &pods, 0, now());
        assert_eq!(plan.adopt, ["orphan"]);
        assert_eq!(plan.release, ["relabeled"]);
        assert_eq!(plan.create, 1, "the orphan counts, the released pod does not");
    }

    #[test]
    fn available_waits_for_min_ready_seconds() {
        let mut set = rs(1);
        set.spec.as_mut().unwrap().min_ready_seconds = Some(600);
        let fresh = vec![pod("a", running_ready("2026-01-01T00:09:00Z"))];
        assert_eq!(plan(&set, &fresh, 0, now()).status.available_replicas, Some(0));
        let old = vec![pod("a", running_ready("2026-01-01T00:00:00Z"))];
        assert_eq!(plan(&set, &old, 0, now()).status.available_replicas, Some(1));
    }
}
