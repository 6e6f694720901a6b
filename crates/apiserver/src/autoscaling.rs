//! `autoscaling/v1` HorizontalPodAutoscalers are `autoscaling/v2` ones seen through a smaller
//! spec (a CPU utilization target), stored as v2 — as upstream serves both versions from one
//! storage. What v1 cannot say (other metrics, scaling behaviour, conditions, other current
//! metrics) travels in upstream's `autoscaling.alpha.kubernetes.io/*` annotations, so a
//! v1 client's update keeps it.

use serde_json::{Map, Value, json};

const METRICS: &str = "autoscaling.alpha.kubernetes.io/metrics";
const BEHAVIOR: &str = "autoscaling.alpha.kubernetes.io/behavior";
const CONDITIONS: &str = "autoscaling.alpha.kubernetes.io/conditions";
const CURRENT_METRICS: &str = "autoscaling.alpha.kubernetes.io/current-metrics";

fn is_cpu_utilization(metric: &Value) -> bool {
    metric["type"] == "Resource"
        && metric["resource"]["name"] == "cpu"
        && metric["resource"]["target"]["type"] == "Utilization"
}

fn annotations(object: &mut Value) -> &mut Map<String, Value> {
    if !object["metadata"]["annotations"].is_object() {
        object["metadata"]["annotations"] = json!({});
    }
    object["metadata"]["annotations"].as_object_mut().expect("made an object above")
}

/// Takes an annotation that holds JSON.
fn take_json(object: &mut Value, key: &str) -> Option<Value> {
    let text = object["metadata"]["annotations"].as_object_mut()?.remove(key)?;
    serde_json::from_str(text.as_str()?).ok()
}

fn drop_empty_annotations(object: &mut Value) {
    if object["metadata"]["annotations"].as_object().is_some_and(Map::is_empty)
        && let Some(metadata) = object["metadata"].as_object_mut()
    {
        metadata.remove("annotations");
    }
}

/// A stored v2 HorizontalPodAutoscaler as v1.
pub fn from_v2(mut object: Value) -> Value {
    object["apiVersion"] = json!("autoscaling/v1");
    let mut spec = object["spec"].take();
    let metrics = spec.as_object_mut().and_then(|s| s.remove("metrics")).and_then(|m| m.as_array().cloned());
    let behavior = spec.as_object_mut().and_then(|s| s.remove("behavior"));
    let (cpu, others): (Vec<Value>, Vec<Value>) = metrics.unwrap_or_default().into_iter().partition(is_cpu_utilization);
    if let Some(percent) = cpu.first().and_then(|m| m["resource"]["target"]["averageUtilization"].as_i64()) {
        spec["targetCPUUtilizationPercentage"] = json!(percent);
    }
    if !others.is_empty() {
        annotations(&mut object).insert(METRICS.into(), json!(Value::Array(others).to_string()));
    }
    if let Some(behavior) = behavior.filter(|b| !b.is_null()) {
        annotations(&mut object).insert(BEHAVIOR.into(), json!(behavior.to_string()));
    }
    object["spec"] = spec;
    if let Some(mut status) = object.get_mut("status").map(Value::take).filter(Value::is_object) {
        let current =
            status.as_object_mut().and_then(|s| s.remove("currentMetrics")).and_then(|m| m.as_array().cloned());
        let conditions = status.as_object_mut().and_then(|s| s.remove("conditions"));
        let (cpu, others): (Vec<Value>, Vec<Value>) = current
            .unwrap_or_default()
            .into_iter()
            .partition(|m| m["type"] == "Resource" && m["resource"]["name"] == "cpu");
        if let Some(percent) = cpu.first().and_then(|m| m["resource"]["current"]["averageUtilization"].as_i64()) {
            status["currentCPUUtilizationPercentage"] = json!(percent);
        }
        if !others.is_empty() {
            annotations(&mut object).insert(CURRENT_METRICS.into(), json!(Value::Array(others).to_string()));
        }
        if let Some(conditions) = conditions.filter(|c| c.as_array().is_some_and(|c| !c.is_empty())) {
            annotations(&mut object).insert(CONDITIONS.into(), json!(conditions.to_string()));
        }
        object["status"] = status;
    }
    object
}

/// A v1 HorizontalPodAutoscaler as the v2 one it is stored as.
pub fn to_v2(mut object: Value) -> Value {
    object["apiVersion"] = json!("autoscaling/v2");
    let mut metrics: Vec<Value> =
        take_json(&mut object, METRICS).and_then(|m| m.as_array().cloned()).unwrap_or_default();
    let behavior = take_json(&mut object, BEHAVIOR);
    let conditions = take_json(&mut object, CONDITIONS);
    let current_others =
        take_json(&mut object, CURRENT_METRICS).and_then(|m| m.as_array().cloned()).unwrap_or_default();
    drop_empty_annotations(&mut object);
    let mut spec = object["spec"].take();
    if let Some(percent) = spec.as_object_mut().and_then(|s| s.remove("targetCPUUtilizationPercentage")) {
        metrics.insert(
            0,
            json!({"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": percent}}}),
        );
    }
    if metrics.is_empty() {
        // v2's default: 80% of the requested CPU.
        metrics.push(json!({"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 80}}}));
    }
    spec["metrics"] = Value::Array(metrics);
    if let Some(behavior) = behavior {
        spec["behavior"] = behavior;
    }
    object["spec"] = spec;
    if let Some(mut status) = object.get_mut("status").map(Value::take).filter(Value::is_object) {
        let mut current = Vec::new();
        if let Some(percent) = status.as_object_mut().and_then(|s| s.remove("currentCPUUtilizationPercentage")) {
            current.push(
                json!({"type": "Resource", "resource": {"name": "cpu", "current": {"averageUtilization": percent}}}),
            );
        }
        current.extend(current_others);
        if !current.is_empty() {
            status["currentMetrics"] = Value::Array(current);
        }
        if let Some(conditions) = conditions {
            status["conditions"] = conditions;
        }
        object["status"] = status;
    }
    object
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v1_and_v2_round_trip() {
        let v2 = json!({"apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": {"name": "web"},
            "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "web"}, "minReplicas": 1, "maxReplicas": 5,
                "metrics": [
                    {"type": "Resource", "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": 50}}},
                    {"type": "Resource", "resource": {"name": "memory", "target": {"type": "AverageValue", "averageValue": "100Mi"}}},
                ],
                "behavior": {"scaleDown": {"stabilizationWindowSeconds": 60}}},
            "status": {"currentReplicas": 2, "desiredReplicas": 2,
                "currentMetrics": [{"type": "Resource", "resource": {"name": "cpu", "current": {"averageUtilization": 40}}}],
                "conditions": [{"type": "AbleToScale", "status": "True"}]}});
        let v1 = from_v2(v2.clone());
        assert_eq!(v1["apiVersion"], "autoscaling/v1");
        assert_eq!(v1["spec"]["targetCPUUtilizationPercentage"], 50);
        assert!(v1["spec"]["metrics"].is_null());
        assert_eq!(v1["status"]["currentCPUUtilizationPercentage"], 40);
        assert!(v1["metadata"]["annotations"][METRICS].as_str().unwrap().contains("memory"));
        assert_eq!(to_v2(v1), v2, "what v1 cannot say comes back from the annotations");

        let plain = json!({"apiVersion": "autoscaling/v1", "metadata": {"name": "x"}, "spec": {"maxReplicas": 3}});
        assert_eq!(to_v2(plain)["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"], 80);
    }
}
