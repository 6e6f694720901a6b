//! Strategic merge patch (`application/strategic-merge-patch+json`), what `kubectl apply`,
//! `edit` and `set` send for built-in types. Maps merge recursively (null deletes a key); lists
//! either replace, merge by a key (containers by name, ports by containerPort...), or union
//! (finalizers). Directives: `$patch: replace|delete|merge`, `$retainKeys`,
//! `$setElementOrder/<list>`, `$deleteFromPrimitiveList/<list>`.
//!
//! Upstream reads the merge keys from Go struct tags; here they are a table of the lists of the
//! built-in types that have one. The OpenAPI schemas carry the same table
//! (`x-kubernetes-patch-merge-key`), so a client that computes its patch from them agrees.

use serde_json::{Map, Value};

/// How a list field merges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListStrategy {
    Replace,
    MergeByKey(&'static str),
    /// A list of scalars merged as a set.
    Union,
}

/// The strategy of list `field`, looking at its elements where one name has two keys.
pub fn strategy(field: &str, elements: &[&Value]) -> ListStrategy {
    use ListStrategy::*;
    match field {
        "containers"
        | "initContainers"
        | "ephemeralContainers"
        | "volumes"
        | "imagePullSecrets"
        | "env"
        | "resourceClaims"
        | "schedulingGates" => MergeByKey("name"),
        "volumeMounts" => MergeByKey("mountPath"),
        "volumeDevices" => MergeByKey("devicePath"),
        "hostAliases" => MergeByKey("ip"),
        // Node addresses and status conditions; an endpoint subset's addresses have no type.
        "conditions" | "addresses" if elements.iter().any(|e| e.get("type").is_some()) => MergeByKey("type"),
        "ownerReferences" => MergeByKey("uid"),
        "topologySpreadConstraints" => MergeByKey("topologyKey"),
        "finalizers" => Union,
        // Container ports merge by containerPort, Service ports by port.
        "ports" if elements.iter().any(|e| e.get("containerPort").is_some()) => MergeByKey("containerPort"),
        "ports" if elements.iter().any(|e| e.get("port").is_some()) => MergeByKey("port"),
        _ => Replace,
    }
}

fn is_directive(key: &str) -> bool {
    key == "$patch"
        || key == "$retainKeys"
        || key.starts_with("$setElementOrder/")
        || key.starts_with("$deleteFromPrimitiveList/")
}

/// Applies `patch` to `original`.
pub fn apply(original: &Value, patch: &Value) -> Result<Value, String> {
    let Value::Object(patch) = patch else {
        return Err("a strategic merge patch must be a JSON object".into());
    };
    let empty = Map::new();
    let original = original.as_object().unwrap_or(&empty);
    Ok(Value::Object(merge_map(original, patch)?))
}

fn merge_map(original: &Map<String, Value>, patch: &Map<String, Value>) -> Result<Map<String, Value>, String> {
    match patch.get("$patch").and_then(Value::as_str) {
        Some("replace") => return merge_map(&Map::new(), &without_directive(patch)),
        Some("delete") => return Ok(Map::new()),
        Some("merge") | None => {}
        Some(other) => return Err(format!("unknown $patch directive {other:?}")),
    }
    let mut result = original.clone();
    if let Some(retain) = patch.get("$retainKeys") {
        let keys: Vec<&str> = retain
            .as_array()
            .ok_or("$retainKeys must be a list")?
            .iter()
            .map(|k| k.as_str().ok_or("$retainKeys must list strings"))
            .collect::<Result<_, _>>()?;
        result.retain(|k, _| keys.contains(&k.as_str()));
    }
    let mut orders = Vec::new();
    for (key, value) in patch {
        if let Some(field) = key.strip_prefix("$setElementOrder/") {
            orders.push((field, value));
        } else if let Some(field) = key.strip_prefix("$deleteFromPrimitiveList/") {
            let doomed = value.as_array().ok_or("$deleteFromPrimitiveList needs a list")?;
            if let Some(Value::Array(list)) = result.get_mut(field) {
                list.retain(|item| !doomed.contains(item));
            }
        } else if is_directive(key) {
            continue;
        } else {
            match merge_value(key, result.get(key), value)? {
                Some(merged) => {
                    result.insert(key.clone(), merged);
                }
                None => {
                    result.remove(key);
                }
            }
        }
    }
    for (field, order) in orders {
        let order = order.as_array().ok_or("$setElementOrder needs a list")?;
        if let Some(Value::Array(list)) = result.get_mut(field) {
            reorder(field, list, order);
        }
    }
    Ok(result)
}

fn without_directive(map: &Map<String, Value>) -> Map<String, Value> {
    map.iter().filter(|(k, _)| k.as_str() != "$patch").map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// The merged value of `field`, or `None` to delete it.
fn merge_value(field: &str, original: Option<&Value>, patch: &Value) -> Result<Option<Value>, String> {
    Ok(match patch {
        Value::Null => None,
        Value::Object(patch_map) => {
            if patch_map.get("$patch").and_then(Value::as_str) == Some("delete") {
                return Ok(None);
            }
            let empty = Map::new();
            let original_map = original.and_then(Value::as_object).unwrap_or(&empty);
            Some(Value::Object(merge_map(original_map, patch_map)?))
        }
        Value::Array(patch_list) => {
            Some(Value::Array(merge_list(field, original.and_then(Value::as_array), patch_list)?))
        }
        scalar => Some(scalar.clone()),
    })
}

fn merge_list(field: &str, original: Option<&Vec<Value>>, patch: &[Value]) -> Result<Vec<Value>, String> {
    let replace = patch.iter().any(|e| e.get("$patch").and_then(Value::as_str) == Some("replace"));
    let patch: Vec<&Value> =
        patch.iter().filter(|e| e.get("$patch").and_then(Value::as_str) != Some("replace")).collect();
    let fresh = |value: &Value| -> Result<Value, String> {
        Ok(match value {
            Value::Object(map) => Value::Object(merge_map(&Map::new(), map)?),
            other => other.clone(),
        })
    };
    let original: Vec<Value> = if replace { Vec::new() } else { original.cloned().unwrap_or_default() };
    let elements: Vec<&Value> = original.iter().chain(patch.iter().copied()).collect();
    match strategy(field, &elements) {
        _ if replace => patch.into_iter().map(fresh).collect(),
        ListStrategy::Replace => patch.into_iter().map(fresh).collect(),
        ListStrategy::Union => {
            let mut result = original.clone();
            for item in patch.iter().copied() {
                if !result.contains(item) {
                    result.push(item.clone());
                }
            }
            let patch_ids: Vec<Value> = patch.iter().map(|v| (*v).clone()).collect();
            Ok(interleave(result, &patch_ids, &original, |v| v.clone()))
        }
        ListStrategy::MergeByKey(key) => {
            let id = |v: &Value| v.get(key).cloned().unwrap_or(Value::Null);
            let patch_ids: Vec<Value> = patch.iter().map(|v| id(v)).collect();
            let original_ids: Vec<Value> = original.iter().map(id).collect();
            let mut result = original;
            for item in patch {
                let Some(item_map) = item.as_object() else {
                    return Err(format!("{field}: expected objects with a {key:?} in a merging list"));
                };
                let Some(id) = item_map.get(key) else {
                    return Err(format!("{field}: an element has no merge key {key:?}"));
                };
                let position = result.iter().position(|e| e.get(key) == Some(id));
                let delete = item_map.get("$patch").and_then(Value::as_str) == Some("delete");
                match (position, delete) {
                    (Some(i), true) => {
                        result.remove(i);
                    }
                    (None, true) => {}
                    (Some(i), false) => {
                        let empty = Map::new();
                        let current = result[i].as_object().unwrap_or(&empty).clone();
                        result[i] = Value::Object(merge_map(&current, item_map)?);
                    }
                    (None, false) => result.push(fresh(item)?),
                }
            }
            Ok(interleave(result, &patch_ids, &original_ids, id))
        }
    }
}

/// The order upstream gives a merged list (its `normalizeElementOrder`): the elements the
/// patch names in the patch's order, the others in the original's order, and the two
/// interleaved where the original orders an element of each; an element new to the list goes
/// before the original's elements that follow it in the patch.
fn interleave(merged: Vec<Value>, patch: &[Value], original: &[Value], id: impl Fn(&Value) -> Value) -> Vec<Value> {
    let (mut named, server_only): (Vec<Value>, Vec<Value>) = merged.into_iter().partition(|v| patch.contains(&id(v)));
    named.sort_by_key(|v| patch.iter().position(|p| *p == id(v)));
    let place = |v: &Value| original.iter().position(|o| *o == id(v));
    let mut result = Vec::with_capacity(named.len() + server_only.len());
    let (mut left, mut right) = (server_only.into_iter().peekable(), named.into_iter().peekable());
    loop {
        let take_left = match (left.peek(), right.peek()) {
            (Some(l), Some(r)) => matches!((place(l), place(r)), (Some(a), Some(b)) if a < b),
            (Some(_), None) => true,
            (None, Some(_)) => false,
            (None, None) => break,
        };
        result.extend(if take_left { left.next() } else { right.next() });
    }
    result
}

/// Orders `list` as `order` says (by merge key, or by value for scalars); elements the order
/// does not name keep their relative order after the named ones.
fn reorder(field: &str, list: &mut Vec<Value>, order: &[Value]) {
    let elements: Vec<&Value> = list.iter().collect();
    let identity = |value: &Value| -> Value {
        match strategy(field, &elements) {
            ListStrategy::MergeByKey(key) => value.get(key).cloned().unwrap_or(Value::Null),
            _ => value.clone(),
        }
    };
    let ids: Vec<Value> = list.iter().map(identity).collect();
    let wanted: Vec<Value> = order.iter().map(identity).collect();
    let mut indexed: Vec<(usize, Value)> = std::mem::take(list).into_iter().enumerate().collect();
    indexed.sort_by_key(|(i, _)| wanted.iter().position(|w| *w == ids[*i]).unwrap_or(usize::MAX));
    *list = indexed.into_iter().map(|(_, v)| v).collect();
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(original: Value, patch: Value, expected: Value) {
        assert_eq!(apply(&original, &patch).unwrap(), expected, "patch {patch}");
    }

    #[test]
    fn maps_merge_and_null_deletes() {
        check(
            json!({"metadata": {"labels": {"a": "1", "b": "2"}}, "data": {"x": "y"}}),
            json!({"metadata": {"labels": {"a": null, "c": "3"}}}),
            json!({"metadata": {"labels": {"b": "2", "c": "3"}}, "data": {"x": "y"}}),
        );
    }

    #[test]
    fn a_reapply_with_a_new_image_keeps_the_rest_of_the_container() {
        let original = json!({"spec": {"containers": [
            {"name": "web", "image": "nginx:1.25", "ports": [{"containerPort": 80}], "env": [{"name": "A", "value": "1"}]},
            {"name": "side", "image": "busybox"}]}});
        // What kubectl apply sends after the image and one env var changed.
        let patch = json!({"spec": {
            "$setElementOrder/containers": [{"name": "web"}, {"name": "side"}],
            "containers": [{"name": "web", "image": "nginx:1.27", "$setElementOrder/env": [{"name": "A"}, {"name": "B"}],
                            "env": [{"name": "B", "value": "2"}]}]}});
        check(
            original,
            patch,
            json!({"spec": {"containers": [
                {"name": "web", "image": "nginx:1.27", "ports": [{"containerPort": 80}],
                 "env": [{"name": "A", "value": "1"}, {"name": "B", "value": "2"}]},
                {"name": "side", "image": "busybox"}]}}),
        );
    }

    #[test]
    fn list_elements_are_deleted_by_key_and_lists_replaced_on_request() {
        let original = json!({"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}});
        check(
            original.clone(),
            json!({"spec": {"containers": [{"name": "a", "$patch": "delete"}]}}),
            json!({"spec": {"containers": [{"name": "b", "image": "y"}]}}),
        );
        check(
            original,
            json!({"spec": {"containers": [{"$patch": "replace"}, {"name": "c", "image": "z"}]}}),
            json!({"spec": {"containers": [{"name": "c", "image": "z"}]}}),
        );
    }

    #[test]
    fn lists_without_a_merge_key_are_replaced() {
        check(
            json!({"spec": {"tolerations": [{"key": "a"}], "containers": [{"name": "c", "args": ["1", "2"]}]}}),
            json!({"spec": {"tolerations": [{"key": "b"}], "containers": [{"name": "c", "args": ["3"]}]}}),
            json!({"spec": {"tolerations": [{"key": "b"}], "containers": [{"name": "c", "args": ["3"]}]}}),
        );
    }

    #[test]
    fn service_ports_merge_by_port_and_container_ports_by_container_port() {
        check(
            json!({"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https"}]}}),
            json!({"spec": {"ports": [{"port": 443, "targetPort": 8443}]}}),
            json!({"spec": {"ports": [{"port": 80, "name": "http"}, {"port": 443, "name": "https", "targetPort": 8443}]}}),
        );
    }

    #[test]
    fn finalizers_merge_as_a_set_and_can_be_removed() {
        check(
            json!({"metadata": {"finalizers": ["a", "b"]}}),
            json!({"metadata": {"finalizers": ["b", "c"], "$deleteFromPrimitiveList/finalizers": ["a"]}}),
            json!({"metadata": {"finalizers": ["b", "c"]}}),
        );
    }

    #[test]
    fn retain_keys_and_map_replace() {
        check(
            json!({"spec": {"strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}}}}),
            json!({"spec": {"strategy": {"$retainKeys": ["type"], "type": "Recreate"}}}),
            json!({"spec": {"strategy": {"type": "Recreate"}}}),
        );
        check(
            json!({"data": {"a": "1", "b": "2"}}),
            json!({"data": {"$patch": "replace", "c": "3"}}),
            json!({"data": {"c": "3"}}),
        );
    }

    #[test]
    fn merged_lists_are_ordered_as_upstream_orders_them() {
        // A container new to the list goes first (the e2e ReplicaSet patch spec reads [0]).
        check(
            json!({"containers": [{"name": "httpd", "image": "httpd"}]}),
            json!({"containers": [{"name": "test-rs", "image": "pause"}]}),
            json!({"containers": [{"name": "test-rs", "image": "pause"}, {"name": "httpd", "image": "httpd"}]}),
        );
        check(
            json!({"containers": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}),
            json!({"containers": [{"name": "c", "image": "x"}, {"name": "new"}]}),
            json!({"containers": [{"name": "a"}, {"name": "b"}, {"name": "c", "image": "x"}, {"name": "new"}]}),
        );
        check(
            json!({"finalizers": ["a", "b"]}),
            json!({"finalizers": ["c", "a"]}),
            json!({"finalizers": ["c", "a", "b"]}),
        );
    }

    #[test]
    fn element_order_follows_set_element_order() {
        check(
            json!({"spec": {"containers": [{"name": "a"}, {"name": "b"}]}}),
            json!({"spec": {"$setElementOrder/containers": [{"name": "b"}, {"name": "a"}]}}),
            json!({"spec": {"containers": [{"name": "b"}, {"name": "a"}]}}),
        );
    }

    #[test]
    fn malformed_patches_are_errors_not_panics() {
        assert!(apply(&json!({}), &json!([1])).is_err());
        assert!(
            apply(&json!({"spec": {"containers": []}}), &json!({"spec": {"containers": [{"image": "x"}]}})).is_err()
        );
        assert!(apply(&json!({}), &json!({"$patch": "explode"})).is_err());
        assert!(apply(&json!({}), &json!({"a": {"$retainKeys": "x"}})).is_err());
    }
}
