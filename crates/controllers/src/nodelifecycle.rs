//! The node lifecycle controller's decision, without I/O: a node whose heartbeat (its Lease's
//! renewTime, or its Ready condition's lastHeartbeatTime) is older than the grace period gets
//! its conditions set to Unknown; nodes not Ready carry the `not-ready` / `unreachable` NoExecute
//! (and NoSchedule) taints, which go when the node is Ready again; pods on a NoExecute-tainted
//! node are evicted when they do not tolerate the taint, or once their tolerationSeconds since
//! the taint was added have passed.

use jiff::Timestamp;
use k8s_openapi::api::core::v1::{Node, Pod, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

pub const UNREACHABLE: &str = "node.kubernetes.io/unreachable";
pub const NOT_READY: &str = "node.kubernetes.io/not-ready";

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Set every condition of the node to Unknown (the kubelet stopped reporting).
    MarkUnknown { node: String },
    /// Replace the node's taints.
    SetTaints { node: String, taints: Vec<Taint> },
    /// Evict (delete) a pod.
    Evict { namespace: String, name: String, node: String },
}

fn ready_status(node: &Node) -> Option<&str> {
    let conditions = node.status.as_ref()?.conditions.as_ref()?;
    conditions.iter().find(|c| c.type_ == "Ready").map(|c| c.status.as_str())
}

/// Whether the node reports Ready=True.
pub fn is_node_ready(node: &Node) -> bool {
    ready_status(node) == Some("True")
}

fn last_heartbeat(node: &Node, lease_renewed: Option<Timestamp>) -> Option<Timestamp> {
    let condition = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .and_then(|c| c.last_heartbeat_time.as_ref())
        .map(|t| t.0);
    match (condition, lease_renewed) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

/// Plans for one node. `lease_renewed` is its Lease's renewTime; `pods` the pods bound to it.
pub fn plan(
    node: &Node,
    lease_renewed: Option<Timestamp>,
    pods: &[&Pod],
    now: Timestamp,
    grace_seconds: i64,
) -> Vec<Action> {
    let name = node.metadata.name.clone().unwrap_or_default();
    let mut actions = Vec::new();
    // No Ready condition yet (a node that has not reported): no taints until it is overdue.
    let mut ready = ready_status(node).unwrap_or("True").to_string();
    // A node that registered and never reported is judged by its age.
    let heartbeat = last_heartbeat(node, lease_renewed).or(node.metadata.creation_timestamp.as_ref().map(|t| t.0));
    let silent = heartbeat.is_none_or(|h| now.as_second() - h.as_second() > grace_seconds);
    if silent && ready != "Unknown" {
        actions.push(Action::MarkUnknown { node: name.clone() });
        ready = "Unknown".into();
    }
    // Taints follow the Ready condition.
    let current: Vec<Taint> = node.spec.as_ref().and_then(|s| s.taints.clone()).unwrap_or_default();
    let wanted_key = match ready.as_str() {
        "True" => None,
        "False" => Some(NOT_READY),
        _ => Some(UNREACHABLE),
    };
    let mut taints: Vec<Taint> =
        current.iter().filter(|t| t.key != NOT_READY && t.key != UNREACHABLE).cloned().collect();
    if let Some(key) = wanted_key {
        for effect in ["NoSchedule", "NoExecute"] {
            // Keep the time a taint was first added: evictions count from it.
            let existing = current.iter().find(|t| t.key == key && t.effect == effect);
            taints.push(Taint {
                key: key.into(),
                effect: effect.into(),
                value: None,
                time_added: existing.and_then(|t| t.time_added.clone()).or(Some(Time(now))),
            });
        }
    }
    if taints != current {
        actions.push(Action::SetTaints { node: name.clone(), taints: taints.clone() });
    }
    // NoExecute: evict what does not tolerate it (for long enough).
    for taint in taints.iter().filter(|t| t.effect == "NoExecute") {
        let added = taint.time_added.as_ref().map(|t| t.0).unwrap_or(now);
        for pod in pods {
            if pod.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let tolerations = pod.spec.as_ref().and_then(|s| s.tolerations.as_deref()).unwrap_or_default();
            let matching = tolerations.iter().find(|t| {
                let key_ok = match t.key.as_deref() {
                    None | Some("") => t.operator.as_deref() == Some("Exists"),
                    Some(k) => k == taint.key,
                };
                let effect_ok = t.effect.as_deref().is_none_or(|e| e.is_empty() || e == "NoExecute");
                let value_ok = t.operator.as_deref() == Some("Exists")
                    || t.value.as_deref().unwrap_or_default() == taint.value.as_deref().unwrap_or_default();
                key_ok && effect_ok && value_ok
            });
            let evict = match matching {
                None => true,
                Some(toleration) => {
                    toleration.toleration_seconds.is_some_and(|s| now.as_second() - added.as_second() >= s.max(0))
                }
            };
            if evict {
                actions.push(Action::Evict {
                    namespace: pod.metadata.namespace.clone().unwrap_or_default(),
                    name: pod.metadata.name.clone().unwrap_or_default(),
                    node: name.clone(),
                });
            }
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(ready: &str, heartbeat: &str, taints: serde_json::Value) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": "n1", "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"taints": taints},
            "status": {"conditions": [{"type": "Ready", "status": ready, "lastHeartbeatTime": heartbeat}]},
        }))
        .unwrap()
    }

    fn pod(name: &str, toleration_seconds: Option<i64>) -> Pod {
        let tolerations = match toleration_seconds {
            Some(s) => {
                json!([{"key": UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": s}])
            }
            None => json!([]),
        };
        serde_json::from_value(json!({"metadata": {"name": name, "namespace": "default"},
                                      "spec": {"containers": [], "nodeName": "n1", "tolerations": tolerations}}))
        .unwrap()
    }

    fn at(t: &str) -> Timestamp {
        t.parse().unwrap()
    }

    #[test]
    fn a_silent_node_goes_unknown_and_gets_the_unreachable_taints() {
        let n = node("True", "2026-01-01T00:00:00Z", json!([]));
        let lease = Some(at("2026-01-01T00:00:30Z"));
        assert!(plan(&n, lease, &[], at("2026-01-01T00:01:00Z"), 40).is_empty(), "the lease is fresh enough");
        let actions = plan(&n, lease, &[], at("2026-01-01T00:01:30Z"), 40);
        assert_eq!(actions[0], Action::MarkUnknown { node: "n1".into() });
        let Action::SetTaints { taints, .. } = &actions[1] else { panic!("{actions:?}") };
        assert_eq!(
            taints.iter().map(|t| (t.key.as_str(), t.effect.as_str())).collect::<Vec<_>>(),
            [(UNREACHABLE, "NoSchedule"), (UNREACHABLE, "NoExecute")]
        );
    }

    #[test]
    fn a_node_that_never_reported_is_left_alone_until_overdue() {
        let n: Node =
            serde_json::from_value(json!({"metadata": {"name": "n1", "creationTimestamp": "2026-01-01T00:00:00Z"}}))
                .unwrap();
        assert!(plan(&n, None, &[], at("2026-01-01T00:00:10Z"), 40).is_empty());
        let actions = plan(&n, None, &[], at("2026-01-01T00:01:00Z"), 40);
        assert_eq!(actions[0], Action::MarkUnknown { node: "n1".into() });
        assert!(matches!(&actions[1], Action::SetTaints { taints, .. } if taints.len() == 2));
    }

    #[test]
    fn pods_are_evicted_after_their_toleration_and_a_returning_node_is_restored() {
        let taints = json!([{"key": UNREACHABLE, "effect": "NoSchedule", "timeAdded": "2026-01-01T00:01:00Z"},
                            {"key": UNREACHABLE, "effect": "NoExecute", "timeAdded": "2026-01-01T00:01:00Z"},
                            {"key": "dedicated", "value": "db", "effect": "NoSchedule"}]);
        let n = node("Unknown", "2026-01-01T00:00:00Z", taints);
        let (patient, impatient, intolerant) =
            (pod("patient", Some(300)), pod("impatient", Some(10)), pod("intolerant", None));
        let actions = plan(&n, None, &[&patient, &impatient, &intolerant], at("2026-01-01T00:01:30Z"), 40);
        let evicted: Vec<&str> = actions
            .iter()
            .filter_map(|a| match a {
                Action::Evict { name, .. } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(evicted, ["impatient", "intolerant"]);

        let back = node(
            "True",
            "2026-01-01T00:02:00Z",
            json!([{"key": UNREACHABLE, "effect": "NoExecute"},
                                                                {"key": "dedicated", "value": "db", "effect": "NoSchedule"}]),
        );
        let actions = plan(&back, None, &[&patient], at("2026-01-01T00:02:01Z"), 40);
        assert_eq!(actions.len(), 1);
        let Action::SetTaints { taints, .. } = &actions[0] else { panic!() };
        assert_eq!(taints.len(), 1, "only the node's own taint stays");
    }
}
