//! The StatefulSet controller's decision: pods with stable names (`<set>-0`, `<set>-1`, ...)
//! and, per ordinal, claims from the volumeClaimTemplates; OrderedReady creates one ordinal at
//! a time once those before it are Running and Ready and removes from the highest down,
//! Parallel does not wait; a RollingUpdate replaces, from the highest ordinal down to
//! `partition`, one pod at a time whose revision is old.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{StatefulSet, StatefulSetStatus};
use k8s_openapi::api::core::v1::Pod;

use crate::pods::{is_available, is_ready};

/// The label with a pod's template revision, and the ones naming its place in the set.
pub const HASH_LABEL: &str = "controller-revision-hash";
pub const POD_NAME_LABEL: &str = "statefulset.kubernetes.io/pod-name";
pub const POD_INDEX_LABEL: &str = "apps.kubernetes.io/pod-index";

#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    /// Ordinals to create pods for.
    pub create: Vec<i32>,
    /// Pods (names) to delete.
    pub delete: Vec<String>,
    /// Claims (names, with their template's name) to create before the pods that use them.
    pub claims: Vec<(String, String)>,
    /// During a rolling update with a partition, the ordinals below it (the first number) are
    /// made at the current revision (the second), not the template's: upstream's
    /// `newVersionedStatefulSetPod`.
    pub below_partition: Option<(i32, String)>,
    pub status: StatefulSetStatus,
}

/// `<set>-<ordinal>`.
pub fn pod_name(set: &str, ordinal: i32) -> String {
    format!("{set}-{ordinal}")
}

/// A pod's ordinal in `set`, from its name.
pub fn ordinal(set: &str, pod: &Pod) -> Option<i32> {
    pod.metadata.name.as_deref()?.strip_prefix(set)?.strip_prefix('-')?.parse().ok().filter(|o: &i32| *o >= 0)
}

/// The claim a pod of `set` at `ordinal` uses for the template named `template`.
pub fn claim_name(template: &str, set: &str, ordinal: i32) -> String {
    format!("{template}-{set}-{ordinal}")
}

fn running_and_ready(pod: &Pod) -> bool {
    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running") && is_ready(pod)
}

/// Plans for `set`, given the pods it owns, the claims that exist (names), its template hash and
/// the time.
pub fn plan(set: &StatefulSet, owned: &[&Pod], claims: &[String], hash: &str, now: jiff::Timestamp) -> Plan {
    let mut plan = Plan::default();
    let name = set.metadata.name.clone().unwrap_or_default();
    let spec = set.spec.clone().unwrap_or_default();
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let parallel = spec.pod_management_policy.as_deref() == Some("Parallel");
    let start = spec.ordinals.as_ref().and_then(|o| o.start).unwrap_or(0).max(0);
    let min_ready = spec.min_ready_seconds.unwrap_or(0);
    let deleting = set.metadata.deletion_timestamp.is_some();
    let revision = |p: &Pod| p.metadata.labels.as_ref().and_then(|l| l.get(HASH_LABEL)).cloned();
    let current = |p: &Pod| revision(p).as_deref() == Some(hash);

    let mut by_ordinal: BTreeMap<i32, &Pod> = BTreeMap::new();
    for pod in owned {
        if let Some(ordinal) = ordinal(&name, pod) {
            by_ordinal.insert(ordinal, pod);
        }
    }
    let wanted = start..start + replicas;
    let templates: Vec<String> =
        spec.volume_claim_templates.iter().flatten().filter_map(|t| t.metadata.name.clone()).collect();

    if !deleting {
        // Failed pods are replaced.
        for pod in by_ordinal.values() {
            if pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Failed")
                && pod.metadata.deletion_timestamp.is_none()
            {
                plan.delete.push(pod.metadata.name.clone().unwrap_or_default());
            }
        }
        // Create missing ordinals, in order (one at a time unless Parallel).
        let mut blocked = false;
        for ordinal in wanted.clone() {
            match by_ordinal.get(&ordinal) {
                None => {
                    if blocked {
                        break;
                    }
                    for template in &templates {
                        let claim = claim_name(template, &name, ordinal);
                        if !claims.contains(&claim) {
                            plan.claims.push((claim, template.clone()));
                        }
                    }
                    plan.create.push(ordinal);
                    if !parallel {
                        blocked = true;
                    }
                }
                Some(pod) => {
                    let settled = running_and_ready(pod) && pod.metadata.deletion_timestamp.is_none();
                    if !parallel && !settled {
                        blocked = true;
                    }
                }
            }
        }
        // Remove ordinals beyond the wanted range, highest first (one at a time unless Parallel,
        // and only when every pod is healthy).
        let all_healthy = by_ordinal.values().all(|p| running_and_ready(p) || p.metadata.deletion_timestamp.is_some());
        let extra: Vec<&Pod> = by_ordinal.iter().rev().filter(|(o, _)| !wanted.contains(o)).map(|(_, p)| *p).collect();
        let terminating = extra.iter().any(|p| p.metadata.deletion_timestamp.is_some());
        for pod in extra.iter().filter(|p| p.metadata.deletion_timestamp.is_none()) {
            if parallel || (all_healthy && !terminating && plan.create.is_empty()) {
                plan.delete.push(pod.metadata.name.clone().unwrap_or_default());
                if !parallel {
                    break;
                }
            }
        }
        // Rolling update: the highest old pod at or above the partition, when all are ready.
        let strategy = spec.update_strategy.as_ref();
        let rolling = strategy.and_then(|s| s.type_.as_deref()).unwrap_or("RollingUpdate") == "RollingUpdate";
        let partition = strategy.and_then(|s| s.rolling_update.as_ref()).and_then(|r| r.partition).unwrap_or(0);
        let in_range: Vec<&Pod> = by_ordinal.iter().filter(|(o, _)| wanted.contains(o)).map(|(_, p)| *p).collect();
        if rolling
            && plan.create.is_empty()
            && plan.delete.is_empty()
            && in_range.len() == replicas as usize
            && in_range.iter().all(|p| running_and_ready(p) && p.metadata.deletion_timestamp.is_none())
            && let Some(old) = by_ordinal
                .iter()
                .rev()
                .filter(|(o, _)| wanted.contains(o) && **o >= start + partition)
                .map(|(_, p)| *p)
                .find(|p| !current(p))
        {
            plan.delete.push(old.metadata.name.clone().unwrap_or_default());
        }
    }

    let live: Vec<&Pod> = by_ordinal.values().copied().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
    let updated = live.iter().filter(|p| current(p)).count() as i32;
    // The current revision stays what it was until every replica runs the update (upstream);
    // pods deleted meanwhile do not lose it.
    let before = set
        .status
        .as_ref()
        .and_then(|s| s.current_revision.clone())
        .filter(|r| !r.is_empty())
        .or_else(|| live.iter().find(|p| !current(p)).and_then(|p| revision(p)));
    let done = updated == replicas && live.len() as i32 == replicas;
    let current_revision = match before {
        Some(old) if !done && old != hash => old,
        _ => hash.to_string(),
    };
    let rolling_update = spec.update_strategy.as_ref().and_then(|s| s.rolling_update.as_ref());
    let partition = rolling_update.and_then(|r| r.partition).unwrap_or(0);
    let rolling =
        spec.update_strategy.as_ref().and_then(|s| s.type_.as_deref()).unwrap_or("RollingUpdate") == "RollingUpdate";
    if rolling && partition > 0 && current_revision != hash {
        plan.below_partition = Some((start + partition, current_revision.clone()));
    }
    plan.status = StatefulSetStatus {
        replicas: live.len() as i32,
        ready_replicas: Some(live.iter().filter(|p| is_ready(p)).count() as i32),
        available_replicas: Some(live.iter().filter(|p| is_available(p, min_ready, now)).count() as i32),
        current_replicas: Some(if current_revision != hash { live.len() as i32 - updated } else { updated }),
        updated_replicas: Some(updated),
        current_revision: Some(current_revision),
        update_revision: Some(hash.to_string()),
        observed_generation: set.metadata.generation,
        collision_count: set.status.as_ref().and_then(|s| s.collision_count),
        conditions: None,
    };
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn set(spec: serde_json::Value) -> StatefulSet {
        let mut value = json!({"metadata": {"name": "db", "namespace": "default", "uid": "s", "generation": 1},
                               "spec": {"replicas": 3, "serviceName": "db", "selector": {"matchLabels": {"app": "db"}},
                                        "template": {"metadata": {"labels": {"app": "db"}}, "spec": {"containers": []}}}});
        for (k, v) in spec.as_object().unwrap() {
            value["spec"][k] = v.clone();
        }
        serde_json::from_value(value).unwrap()
    }

    fn pod(name: &str, hash: &str, ready: bool) -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": "db", HASH_LABEL: hash}},
            "spec": {"containers": []},
            "status": {"phase": if ready { "Running" } else { "Pending" },
                       "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]}}))
        .unwrap()
    }

    fn now() -> jiff::Timestamp {
        "2026-01-01T00:10:00Z".parse().unwrap()
    }

    #[test]
    fn ordered_ready_creates_one_ordinal_at_a_time() {
        assert_eq!(plan(&set(json!({})), &[], &[], "h", now()).create, [0]);
        let pods = [pod("db-0", "h", false)];
        let refs: Vec<&Pod> = pods.iter().collect();
        assert!(plan(&set(json!({})), &refs, &[], "h", now()).create.is_empty(), "db-0 is not ready yet");
        let pods = [pod("db-0", "h", true)];
        let refs: Vec<&Pod> = pods.iter().collect();
        assert_eq!(plan(&set(json!({})), &refs, &[], "h", now()).create, [1]);
        let parallel = plan(&set(json!({"podManagementPolicy": "Parallel"})), &[], &[], "h", now());
        assert_eq!(parallel.create, [0, 1, 2]);
    }

    #[test]
    fn claims_come_per_ordinal_and_scale_down_goes_from_the_top() {
        let templates = json!({"volumeClaimTemplates": [{"metadata": {"name": "data"}, "spec": {"accessModes": ["ReadWriteOnce"]}}]});
        let fresh = plan(&set(templates.clone()), &[], &["data-db-0".to_string()], "h", now());
        assert!(fresh.claims.is_empty(), "the claim exists already");
        let pods = [pod("db-0", "h", true)];
        let refs: Vec<&Pod> = pods.iter().collect();
        assert_eq!(
            plan(&set(templates), &refs, &[], "h", now()).claims,
            [("data-db-1".to_string(), "data".to_string())]
        );

        let pods = [pod("db-0", "h", true), pod("db-1", "h", true), pod("db-2", "h", true), pod("db-3", "h", true)];
        let refs: Vec<&Pod> = pods.iter().collect();
        let down = plan(&set(json!({"replicas": 2})), &refs, &[], "h", now());
        assert_eq!(down.delete, ["db-3"], "one at a time, highest first");
        assert_eq!(down.status.replicas, 4);
    }

    #[test]
    fn rolling_updates_go_down_from_the_highest_ordinal_to_the_partition() {
        let pods = [pod("db-0", "old", true), pod("db-1", "old", true), pod("db-2", "new", true)];
        let refs: Vec<&Pod> = pods.iter().collect();
        let step = plan(&set(json!({})), &refs, &[], "new", now());
        assert_eq!(step.delete, ["db-1"]);
        assert_eq!(step.status.updated_replicas, Some(1));
        assert_eq!(step.status.current_revision.as_deref(), Some("old"));
        assert_eq!(step.status.update_revision.as_deref(), Some("new"));
        let held = plan(&set(json!({"updateStrategy": {"rollingUpdate": {"partition": 2}}})), &refs, &[], "new", now());
        assert!(held.delete.is_empty(), "ordinals below the partition keep the old revision");
        let pods = [pod("db-0", "old", true), pod("db-1", "old", false), pod("db-2", "new", true)];
        let refs: Vec<&Pod> = pods.iter().collect();
        assert!(plan(&set(json!({})), &refs, &[], "new", now()).delete.is_empty(), "waits for db-1 to be ready");
    }
}
