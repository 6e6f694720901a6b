//! LimitRanger admission, as upstream's plugin: the LimitRanges of a pod's namespace give its
//! containers the default limits and requests they lack (`Container` items: `default`,
//! `defaultRequest`; recorded in the `kubernetes.io/limit-ranger` annotation), then bound what
//! each container and the whole pod ask (`min`, `max`, `maxLimitRequestRatio`); a claim's
//! storage request is bounded by `PersistentVolumeClaim` items. A pod or claim out of bounds
//! is refused (403) with upstream's words. LimitRange items are defaulted as upstream's
//! (`SetDefaults_LimitRangeItem`).

use serde_json::{Map, Value, json};
use tugboat_objects::quantity::parse_milli;

use crate::registry;
use crate::state::{ApiState, cached_list};
use crate::status::ApiError;

const ANNOTATION: &str = "kubernetes.io/limit-ranger";

async fn limit_ranges(state: &ApiState, namespace: &str) -> Result<Vec<Value>, ApiError> {
    let resource = registry::find("", "v1", "limitranges").expect("limit ranges are served");
    let mut ranges = cached_list(state, resource, Some(namespace)).await?;
    for range in &mut ranges {
        crate::object::default_limit_range(range);
    }
    Ok(ranges)
}

fn items<'a>(ranges: &'a [Value], kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    ranges.iter().flat_map(|r| r["spec"]["limits"].as_array().into_iter().flatten()).filter(move |i| i["type"] == kind)
}

/// Admits a new pod: defaults, then bounds.
pub async fn admit_pod(state: &ApiState, pod: &mut Value) -> Result<(), ApiError> {
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
    let ranges = limit_ranges(state, &namespace).await?;
    if ranges.is_empty() {
        return Ok(());
    }
    set_defaults(&ranges, pod);
    let errors = pod_errors(&ranges, pod);
    if errors.is_empty() {
        return Ok(());
    }
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    Err(ApiError::forbidden("", "pods", name, &aggregate(&errors)))
}

/// Admits a new claim: its storage request within the `PersistentVolumeClaim` items' bounds.
pub async fn admit_claim(state: &ApiState, claim: &Value) -> Result<(), ApiError> {
    let namespace = claim["metadata"]["namespace"].as_str().unwrap_or("default");
    let ranges = limit_ranges(state, namespace).await?;
    let mut errors = Vec::new();
    let resources = &claim["spec"]["resources"];
    for item in items(&ranges, "PersistentVolumeClaim") {
        bound(item, "PersistentVolumeClaim", &resources["requests"], &resources["limits"], &mut errors);
    }
    if errors.is_empty() {
        return Ok(());
    }
    let name = claim["metadata"]["name"].as_str().unwrap_or_default();
    Err(ApiError::forbidden("", "persistentvolumeclaims", name, &aggregate(&errors)))
}

/// Go's aggregate of errors: one alone, several in brackets.
fn aggregate(errors: &[String]) -> String {
    if errors.len() == 1 { errors[0].clone() } else { format!("[{}]", errors.join(", ")) }
}

/// The containers' missing limits and requests from the `Container` items' defaults, and the
/// annotation that says what was set.
fn set_defaults(ranges: &[Value], pod: &mut Value) {
    let mut limits = Map::new();
    let mut requests = Map::new();
    for item in items(ranges, "Container") {
        for (key, value) in item["default"].as_object().into_iter().flatten() {
            limits.entry(key.clone()).or_insert_with(|| value.clone());
        }
        for (key, value) in item["defaultRequest"].as_object().into_iter().flatten() {
            requests.entry(key.clone()).or_insert_with(|| value.clone());
        }
    }
    if limits.is_empty() && requests.is_empty() {
        return;
    }
    let mut notes = Vec::new();
    for (list, what) in [("containers", "container"), ("initContainers", "init container")] {
        for container in pod["spec"].get_mut(list).and_then(Value::as_array_mut).into_iter().flatten() {
            let name = container["name"].as_str().unwrap_or_default().to_string();
            let mut set = |field: &str, defaults: &Map<String, Value>| -> Vec<String> {
                let resources = &mut container["resources"];
                if !resources[field].is_object() {
                    resources[field] = json!({});
                }
                let given = resources[field].as_object_mut().expect("made an object above");
                let mut set: Vec<String> = Vec::new();
                for (key, value) in defaults {
                    if !given.contains_key(key) {
                        given.insert(key.clone(), value.clone());
                        set.push(key.clone());
                    }
                }
                if given.is_empty() {
                    resources.as_object_mut().expect("an object").remove(field);
                }
                set.sort();
                set
            };
            let set_requests = set("requests", &requests);
            let set_limits = set("limits", &limits);
            if !set_requests.is_empty() {
                notes.push(format!("{} request for {what} {name}", set_requests.join(", ")));
            }
            if !set_limits.is_empty() {
                notes.push(format!("{} limit for {what} {name}", set_limits.join(", ")));
            }
        }
    }
    if !notes.is_empty() {
        if !pod["metadata"]["annotations"].is_object() {
            pod["metadata"]["annotations"] = json!({});
        }
        pod["metadata"]["annotations"][ANNOTATION] = json!(format!("LimitRanger plugin set: {}", notes.join("; ")));
    }
}

/// What the `Container` and `Pod` items refuse of `pod`.
fn pod_errors(ranges: &[Value], pod: &Value) -> Vec<String> {
    let mut errors = Vec::new();
    let containers = |list: &str| pod["spec"][list].as_array().cloned().unwrap_or_default();
    let (regular, init) = (containers("containers"), containers("initContainers"));
    for item in items(ranges, "Container") {
        for container in regular.iter().chain(&init) {
            let resources = &container["resources"];
            bound(item, "Container", &resources["requests"], &resources["limits"], &mut errors);
        }
    }
    let pod_items: Vec<&Value> = items(ranges, "Pod").collect();
    if !pod_items.is_empty() {
        // The pod's total: the sum of its containers, or its largest init container if larger.
        let total = |field: &str| -> Value {
            let mut sums: Map<String, Value> = Map::new();
            let add = |into: &mut Map<String, Value>, key: &str, milli: i128, max: bool| {
                let current = into.get(key).and_then(Value::as_str).and_then(parse_milli).unwrap_or(0);
                let next = if max { current.max(milli) } else { current + milli };
                into.insert(key.to_string(), json!(format!("{next}m")));
            };
            for container in &regular {
                for (key, value) in container["resources"][field].as_object().into_iter().flatten() {
                    add(&mut sums, key, value.as_str().and_then(parse_milli).unwrap_or(0), false);
                }
            }
            for container in &init {
                for (key, value) in container["resources"][field].as_object().into_iter().flatten() {
                    add(&mut sums, key, value.as_str().and_then(parse_milli).unwrap_or(0), true);
                }
            }
            Value::Object(sums)
        };
        let (requests, limits) = (total("requests"), total("limits"));
        for item in pod_items {
            bound(item, "Pod", &requests, &limits, &mut errors);
        }
    }
    errors
}

/// `item`'s min, max and maxLimitRequestRatio applied to `requests` and `limits`.
fn bound(item: &Value, kind: &str, requests: &Value, limits: &Value, errors: &mut Vec<String>) {
    let value =
        |list: &Value, key: &str| list[key].as_str().map(|text| (text.to_string(), parse_milli(text).unwrap_or(0)));
    for (key, enforced) in item["min"].as_object().into_iter().flatten() {
        let Some(limit_text) = enforced.as_str() else { continue };
        let floor = parse_milli(limit_text).unwrap_or(0);
        match value(requests, key) {
            None => errors.push(format!("minimum {key} usage per {kind} is {}.  No request is specified", limit_text)),
            Some((text, request)) if request < floor => {
                errors.push(format!("minimum {key} usage per {kind} is {}, but request is {}", limit_text, &text))
            }
            Some(_) => {
                if let Some((text, _)) = value(limits, key).filter(|(_, l)| *l < floor) {
                    errors.push(format!("minimum {key} usage per {kind} is {}, but limit is {}", limit_text, &text));
                }
            }
        }
    }
    for (key, enforced) in item["max"].as_object().into_iter().flatten() {
        let Some(limit_text) = enforced.as_str() else { continue };
        let ceiling = parse_milli(limit_text).unwrap_or(0);
        match value(limits, key) {
            None => errors.push(format!("maximum {key} usage per {kind} is {}.  No limit is specified", limit_text)),
            Some((text, limit)) if limit > ceiling => {
                errors.push(format!("maximum {key} usage per {kind} is {}, but limit is {}", limit_text, &text))
            }
            Some(_) => {
                if let Some((text, _)) = value(requests, key).filter(|(_, r)| *r > ceiling) {
                    errors.push(format!("maximum {key} usage per {kind} is {}, but request is {}", limit_text, &text));
                }
            }
        }
    }
    for (key, enforced) in item["maxLimitRequestRatio"].as_object().into_iter().flatten() {
        let Some(ratio_text) = enforced.as_str() else { continue };
        let ratio = parse_milli(ratio_text).unwrap_or(0);
        let request = value(requests, key).map(|(_, v)| v).filter(|v| *v != 0);
        let limit = value(limits, key).map(|(_, v)| v).filter(|v| *v != 0);
        match (request, limit) {
            (None, _) => errors.push(format!(
                "{key} max limit to request ratio per {kind} is {}, but no request is specified or request is 0",
                ratio_text
            )),
            (_, None) => errors.push(format!(
                "{key} max limit to request ratio per {kind} is {}, but no limit is specified or limit is 0",
                ratio_text
            )),
            (Some(request), Some(limit)) => {
                // limit / request > ratio, in milli-units.
                if limit * 1000 > ratio * request {
                    errors.push(format!(
                        "{key} max limit to request ratio per {kind} is {}, but provided ratio is {:.6}",
                        ratio_text,
                        limit as f64 / request as f64
                    ));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ranges() -> Vec<Value> {
        let mut range = json!({"spec": {"limits": [{"type": "Container",
            "min": {"cpu": "50m", "memory": "100Mi"}, "max": {"cpu": "500m", "memory": "500Mi"},
            "default": {"cpu": "500m", "memory": "500Mi"}, "defaultRequest": {"cpu": "100m", "memory": "200Mi"}}]}});
        crate::object::default_limit_range(&mut range);
        vec![range]
    }

    fn pod(resources: Value) -> Value {
        json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "c", "resources": resources}]}})
    }

    #[test]
    fn defaults_fill_what_containers_lack_and_say_so() {
        let mut bare = pod(json!({}));
        set_defaults(&ranges(), &mut bare);
        assert_eq!(
            bare["spec"]["containers"][0]["resources"],
            json!({"requests": {"cpu": "100m", "memory": "200Mi"}, "limits": {"cpu": "500m", "memory": "500Mi"}})
        );
        assert_eq!(
            bare["metadata"]["annotations"][ANNOTATION],
            "LimitRanger plugin set: cpu, memory request for container c; cpu, memory limit for container c"
        );
        assert!(pod_errors(&ranges(), &bare).is_empty());
        // Requests given (or defaulted from limits) stay.
        let mut partial = pod(json!({"requests": {"cpu": "300m", "memory": "150Mi"}, "limits": {"cpu": "300m"}}));
        set_defaults(&ranges(), &mut partial);
        assert_eq!(
            partial["spec"]["containers"][0]["resources"],
            json!({"requests": {"cpu": "300m", "memory": "150Mi"}, "limits": {"cpu": "300m", "memory": "500Mi"}})
        );
    }

    #[test]
    fn bounds_refuse_with_upstreams_words() {
        let small =
            pod(json!({"requests": {"cpu": "10m", "memory": "200Mi"}, "limits": {"cpu": "500m", "memory": "500Mi"}}));
        assert_eq!(pod_errors(&ranges(), &small), ["minimum cpu usage per Container is 50m, but request is 10m"]);
        let big =
            pod(json!({"requests": {"cpu": "100m", "memory": "200Mi"}, "limits": {"cpu": "600m", "memory": "600Mi"}}));
        assert_eq!(
            aggregate(&pod_errors(&ranges(), &big)),
            "[maximum cpu usage per Container is 500m, but limit is 600m, maximum memory usage per Container is 500Mi, but limit is 600Mi]"
        );
        let ratio = json!({"spec": {"limits": [{"type": "Pod", "maxLimitRequestRatio": {"cpu": "2"}}]}});
        let greedy = pod(json!({"requests": {"cpu": "100m"}, "limits": {"cpu": "300m"}}));
        assert_eq!(
            pod_errors(&[ratio], &greedy),
            ["cpu max limit to request ratio per Pod is 2, but provided ratio is 3.000000"]
        );
    }

    #[test]
    fn limit_range_items_are_defaulted_as_upstream() {
        let mut range =
            json!({"spec": {"limits": [{"type": "Container", "max": {"cpu": "1"}, "min": {"memory": "1Mi"}}]}});
        crate::object::default_limit_range(&mut range);
        let item = &range["spec"]["limits"][0];
        assert_eq!(item["default"], json!({"cpu": "1"}));
        assert_eq!(item["defaultRequest"], json!({"cpu": "1", "memory": "1Mi"}));
    }
}
