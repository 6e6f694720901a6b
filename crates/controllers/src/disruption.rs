//! The disruption controller's plan: how many of the pods a PodDisruptionBudget covers may be
//! disrupted now (`status.disruptionsAllowed`, which evictions and preemption respect), from
//! the pods as they are. Upstream counts the expected pods from the owners' scale; this counts
//! the covered pods that have not finished, which is the same while the owners are settled.

use std::sync::Arc;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::pods::{is_ready, selector_matches};

/// A budget's counts, as its status reports them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Health {
    pub expected: i32,
    pub desired: i32,
    pub current: i32,
    pub allowed: i32,
}

/// `value` of `total` (a count, or a percentage rounded up, as upstream rounds both fields).
fn scaled(value: &IntOrString, total: i32) -> Option<i32> {
    match value {
        IntOrString::Int(n) => Some(*n),
        IntOrString::String(text) => {
            let percent: i64 = text.strip_suffix('%')?.parse().ok()?;
            Some(((percent * i64::from(total) + 99) / 100) as i32)
        }
    }
}

/// The budget's health over `pods` (its namespace's). None for a budget that says neither
/// minAvailable nor maxUnavailable, or says them wrongly (nothing to compute).
pub fn health(budget: &PodDisruptionBudget, pods: &[Arc<Pod>]) -> Option<Health> {
    let spec = budget.spec.as_ref()?;
    let namespace = budget.metadata.namespace.as_deref().unwrap_or_default();
    let covered: Vec<&Arc<Pod>> = pods
        .iter()
        .filter(|p| p.metadata.namespace.as_deref().unwrap_or_default() == namespace)
        .filter(|p| spec.selector.as_ref().is_some_and(|s| selector_matches(s, p.metadata.labels.as_ref())))
        .filter(|p| !matches!(p.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed")))
        .collect();
    let expected = covered.len() as i32;
    let current = covered.iter().filter(|p| p.metadata.deletion_timestamp.is_none() && is_ready(p)).count() as i32;
    let desired = match (&spec.min_available, &spec.max_unavailable) {
        (Some(min), _) => scaled(min, expected)?,
        (None, Some(max)) => (expected - scaled(max, expected)?).max(0),
        (None, None) => return None,
    };
    Some(Health { expected, desired, current, allowed: (current - desired).max(0) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(name: &str, ready: bool, extra: serde_json::Value) -> Arc<Pod> {
        let mut value = json!({
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "db"}},
            "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}]},
        });
        for (key, field) in extra.as_object().cloned().unwrap_or_default() {
            for (k, v) in field.as_object().cloned().unwrap_or_default() {
                value[&key][k] = v;
            }
        }
        Arc::new(serde_json::from_value(value).unwrap())
    }

    fn budget(spec: serde_json::Value) -> PodDisruptionBudget {
        serde_json::from_value(json!({"metadata": {"name": "b", "namespace": "default"}, "spec": spec})).unwrap()
    }

    #[test]
    fn disruptions_allowed_follow_healthy_pods() {
        let pods = vec![
            pod("ready-1", true, json!({})),
            pod("ready-2", true, json!({})),
            pod("ready-3", true, json!({})),
            pod("unready", false, json!({})),
            pod("leaving", true, json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:00Z"}})),
            pod("done", true, json!({"status": {"phase": "Succeeded"}})),
            pod("other-app", true, json!({"metadata": {"labels": {"app": "web"}}})),
            pod("other-namespace", true, json!({"metadata": {"namespace": "elsewhere"}})),
        ];
        let selector = json!({"matchLabels": {"app": "db"}});
        let measure = |spec: serde_json::Value| health(&budget(spec), &pods);
        let counts = |h: Option<Health>| h.map(|h| (h.expected, h.desired, h.current, h.allowed));
        // 5 covered pods that have not finished, 3 of them healthy.
        assert_eq!(counts(measure(json!({"selector": selector, "minAvailable": 2}))), Some((5, 2, 3, 1)));
        assert_eq!(counts(measure(json!({"selector": selector, "minAvailable": 3}))), Some((5, 3, 3, 0)));
        assert_eq!(counts(measure(json!({"selector": selector, "minAvailable": 5}))), Some((5, 5, 3, 0)));
        assert_eq!(counts(measure(json!({"selector": selector, "minAvailable": "50%"}))), Some((5, 3, 3, 0)));
        assert_eq!(counts(measure(json!({"selector": selector, "maxUnavailable": 1}))), Some((5, 4, 3, 0)));
        assert_eq!(counts(measure(json!({"selector": selector, "maxUnavailable": "40%"}))), Some((5, 3, 3, 0)));
        assert_eq!(counts(measure(json!({"selector": selector, "maxUnavailable": "60%"}))), Some((5, 2, 3, 1)));
        // An empty selector covers the namespace; none covers nothing.
        assert_eq!(counts(measure(json!({"selector": {}, "minAvailable": 1}))), Some((6, 1, 4, 3)));
        assert_eq!(counts(measure(json!({"minAvailable": 0}))), Some((0, 0, 0, 0)));
        assert_eq!(measure(json!({"selector": selector})), None);
        assert_eq!(measure(json!({"selector": selector, "minAvailable": "lots"})), None);
    }
}
