//! Field sets and `metadata.managedFields`: which manager owns which fields, in upstream's
//! FieldsV1 format (`{"f:spec":{"f:replicas":{}},"f:containers":{"k:{\"name\":\"web\"}":{".":{},...}}}`).
//! Used by server-side apply (ownership, conflicts, removal of fields an applier dropped) and
//! recorded for every other write as an `Update` operation.

use std::collections::BTreeSet;

use serde_json::{Map, Value, json};

use crate::smp::{ListStrategy, strategy};

/// One step of a path into an object.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// A map field: `f:name`.
    Field(String),
    /// A list element by its merge key: `k:{"name":"web"}` (canonical JSON).
    Key(String),
    /// A set element: `v:"value"`.
    Value(String),
}

/// A path to an owned field; a path ending in `Key` means the list element itself.
pub type Path = Vec<Step>;
pub type FieldSet = BTreeSet<Path>;

/// Fields that belong to the server, never to a manager.
fn ignored(path: &[Step]) -> bool {
    match path {
        [Step::Field(f)] => matches!(f.as_str(), "apiVersion" | "kind"),
        [Step::Field(m), Step::Field(f)] if m == "metadata" => {
            !matches!(f.as_str(), "labels" | "annotations" | "finalizers" | "ownerReferences")
        }
        _ => false,
    }
}

/// The leaf fields `value` sets.
pub fn field_set(value: &Value) -> FieldSet {
    let mut set = FieldSet::new();
    walk(value, &mut Vec::new(), &mut set);
    set
}

fn walk(value: &Value, path: &mut Path, set: &mut FieldSet) {
    match value {
        Value::Object(map) if !map.is_empty() => {
            for (key, child) in map {
                path.push(Step::Field(key.clone()));
                if !ignored(path) {
                    walk_field(key, child, path, set);
                }
                path.pop();
            }
        }
        _ => {
            if !path.is_empty() {
                set.insert(path.clone());
            }
        }
    }
}

fn walk_field(key: &str, value: &Value, path: &mut Path, set: &mut FieldSet) {
    let Value::Array(items) = value else {
        return walk(value, path, set);
    };
    match list_merge_key(key, items) {
        Some(ListKind::Keyed(merge_key)) => {
            for item in items {
                let Some(id) = item.get(merge_key) else {
                    continue;
                };
                path.push(Step::Key(json!({merge_key: id}).to_string()));
                set.insert(path.clone());
                walk(item, path, set);
                path.pop();
            }
        }
        Some(ListKind::Set) => {
            for item in items {
                path.push(Step::Value(item.to_string()));
                set.insert(path.clone());
                path.pop();
            }
        }
        None => {
            set.insert(path.clone());
        }
    }
}

/// How a list's elements are identified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListKind {
    Keyed(&'static str),
    Set,
}

/// The value at `path`, if present.
pub fn get<'a>(value: &'a Value, path: &[Step]) -> Option<&'a Value> {
    let mut current = value;
    for step in path {
        current = match step {
            Step::Field(name) => current.get(name)?,
            Step::Key(key) => {
                let key: Map<String, Value> = serde_json::from_str(key).ok()?;
                let (k, v) = key.iter().next()?;
                current.as_array()?.iter().find(|item| item.get(k) == Some(v))?
            }
            Step::Value(item) => {
                let item: Value = serde_json::from_str(item).ok()?;
                current.as_array()?.iter().find(|v| **v == item)?
            }
        };
    }
    Some(current)
}

/// Removes the field or element at `path`, if present.
pub fn remove(value: &mut Value, path: &[Step]) {
    let Some((last, parent_path)) = path.split_last() else {
        return;
    };
    let mut parent = value;
    for step in parent_path {
        let next = match step {
            Step::Field(name) => parent.get_mut(name),
            Step::Key(key) => {
                let Ok(key) = serde_json::from_str::<Map<String, Value>>(key) else {
                    return;
                };
                let Some((k, v)) = key.into_iter().next() else {
                    return;
                };
                parent.as_array_mut().and_then(|items| items.iter_mut().find(|item| item.get(&k) == Some(&v)))
            }
            Step::Value(_) => None,
        };
        match next {
            Some(next) => parent = next,
            None => return,
        }
    }
    match last {
        Step::Field(name) => {
            if let Some(map) = parent.as_object_mut() {
                map.remove(name);
            }
        }
        Step::Key(key) => {
            let Ok(key) = serde_json::from_str::<Map<String, Value>>(key) else {
                return;
            };
            let Some((k, v)) = key.into_iter().next() else {
                return;
            };
            if let Some(items) = parent.as_array_mut() {
                items.retain(|item| item.get(&k) != Some(&v));
            }
        }
        Step::Value(item) => {
            let Ok(item) = serde_json::from_str::<Value>(item) else {
                return;
            };
            if let Some(items) = parent.as_array_mut() {
                items.retain(|v| *v != item);
            }
        }
    }
}

fn step_key(step: &Step) -> String {
    match step {
        Step::Field(name) => format!("f:{name}"),
        Step::Key(key) => format!("k:{key}"),
        Step::Value(value) => format!("v:{value}"),
    }
}

/// FieldsV1 JSON of a set.
pub fn to_fields_v1(set: &FieldSet) -> Value {
    let mut root = Map::new();
    for path in set {
        let mut node = &mut root;
        for step in path {
            let entry = node.entry(step_key(step)).or_insert_with(|| json!({}));
            node = entry.as_object_mut().expect("nodes are objects");
        }
        if matches!(path.last(), Some(Step::Key(_))) {
            node.insert(".".into(), json!({}));
        }
    }
    Value::Object(root)
}

/// The set a FieldsV1 document describes.
pub fn from_fields_v1(fields: &Value) -> FieldSet {
    let mut set = FieldSet::new();
    parse_node(fields, &mut Vec::new(), &mut set);
    set
}

fn parse_node(node: &Value, path: &mut Path, set: &mut FieldSet) {
    let Some(map) = node.as_object() else { return };
    if map.is_empty() && !path.is_empty() {
        set.insert(path.clone());
        return;
    }
    for (key, child) in map {
        if key == "." {
            set.insert(path.clone());
            continue;
        }
        let step = if let Some(name) = key.strip_prefix("f:") {
            Step::Field(name.to_string())
        } else if let Some(k) = key.strip_prefix("k:") {
            Step::Key(k.to_string())
        } else if let Some(v) = key.strip_prefix("v:") {
            Step::Value(v.to_string())
        } else {
            continue;
        };
        path.push(step);
        parse_node(child, path, set);
        path.pop();
    }
}

/// `.spec.replicas`, `.spec.template.spec.containers[name="web"].image`: how upstream names a
/// field in conflict messages.
pub fn display(path: &[Step]) -> String {
    let mut text = String::new();
    for step in path {
        match step {
            Step::Field(name) => {
                text.push('.');
                text.push_str(name);
            }
            Step::Key(key) => {
                let parsed: Map<String, Value> = serde_json::from_str(key).unwrap_or_default();
                let inner: Vec<String> = parsed.iter().map(|(k, v)| format!("{k}={v}")).collect();
                text.push_str(&format!("[{}]", inner.join(",")));
            }
            Step::Value(value) => text.push_str(&format!("[={value}]")),
        }
    }
    text
}

/// One `managedFields` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Managed {
    pub manager: String,
    /// `Apply` or `Update`.
    pub operation: String,
    pub api_version: String,
    pub subresource: String,
    pub fields: FieldSet,
}

pub fn read_managed(object: &Value) -> Vec<Managed> {
    object["metadata"]["managedFields"]
        .as_array()
        .map(|entries| {
            entries
                .iter()
                .map(|e| Managed {
                    manager: e["manager"].as_str().unwrap_or("").to_string(),
                    operation: e["operation"].as_str().unwrap_or("Update").to_string(),
                    api_version: e["apiVersion"].as_str().unwrap_or("").to_string(),
                    subresource: e["subresource"].as_str().unwrap_or("").to_string(),
                    fields: from_fields_v1(&e["fieldsV1"]),
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn write_managed(object: &mut Value, managed: &[Managed]) {
    let now = crate::object::now_rfc3339();
    let entries: Vec<Value> = managed
        .iter()
        .filter(|m| !m.fields.is_empty())
        .map(|m| {
            let mut entry = json!({
                "manager": m.manager,
                "operation": m.operation,
                "apiVersion": m.api_version,
                "time": now,
                "fieldsType": "FieldsV1",
                "fieldsV1": to_fields_v1(&m.fields),
            });
            if !m.subresource.is_empty() {
                entry["subresource"] = json!(m.subresource);
            }
            entry
        })
        .collect();
    if entries.is_empty() {
        if let Some(metadata) = object["metadata"].as_object_mut() {
            metadata.remove("managedFields");
        }
    } else {
        object["metadata"]["managedFields"] = Value::Array(entries);
    }
}

/// Records a non-apply write by `manager`: it takes the fields it set or changed; fields that
/// disappeared are nobody's any more.
pub fn record_update(manager: &str, api_version: &str, subresource: &str, old: Option<&Value>, new: &mut Value) {
    let mut managed = old.map(read_managed).unwrap_or_default();
    let new_fields = field_set(new);
    let changed: FieldSet = match old {
        Some(old) => {
            let old_fields = field_set(old);
            new_fields.iter().filter(|p| !old_fields.contains(*p) || get(old, p) != get(new, p)).cloned().collect()
        }
        None => new_fields.clone(),
    };
    for entry in &mut managed {
        entry.fields.retain(|p| new_fields.contains(p) && !changed.contains(p));
    }
    if !changed.is_empty() {
        match managed
            .iter_mut()
            .find(|m| m.manager == manager && m.operation == "Update" && m.subresource == subresource)
        {
            Some(entry) => entry.fields.extend(changed),
            None => managed.push(Managed {
                manager: manager.to_string(),
                operation: "Update".into(),
                api_version: api_version.to_string(),
                subresource: subresource.to_string(),
                fields: changed,
            }),
        }
    }
    write_managed(new, &managed);
}

/// How the elements of list `field` are identified, for field ownership: by a merge key, as a
/// set, or not at all (the list is one atomic value).
pub fn list_merge_key(field: &str, items: &[Value]) -> Option<ListKind> {
    let elements: Vec<&Value> = items.iter().collect();
    match strategy(field, &elements) {
        ListStrategy::MergeByKey(key) => Some(ListKind::Keyed(key)),
        ListStrategy::Union => Some(ListKind::Set),
        ListStrategy::Replace => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn field_sets_round_trip_through_fields_v1() {
        let deployment = json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "labels": {"app": "web"}, "finalizers": ["a"]},
            "spec": {"replicas": 2, "template": {"spec": {"containers": [{"name": "web", "image": "nginx", "args": ["-v"]}]}}},
            "status": {"replicas": 2},
        });
        let set = field_set(&deployment);
        let shown: Vec<String> = set.iter().map(|p| display(p)).collect();
        assert!(shown.contains(&".spec.replicas".to_string()), "{shown:?}");
        assert!(shown.contains(&".spec.template.spec.containers[name=\"web\"].image".to_string()), "{shown:?}");
        assert!(
            shown.contains(&".spec.template.spec.containers[name=\"web\"].args".to_string()),
            "atomic list: {shown:?}"
        );
        assert!(shown.contains(&".metadata.finalizers[=\"a\"]".to_string()), "{shown:?}");
        assert!(shown.contains(&".status.replicas".to_string()), "a status writer owns it: {shown:?}");
        assert!(!shown.iter().any(|s| s == ".metadata.name" || s == ".kind"), "{shown:?}");
        let fields = to_fields_v1(&set);
        assert_eq!(fields["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"web\"}"]["."], json!({}));
        assert_eq!(from_fields_v1(&fields), set);
    }

    #[test]
    fn paths_read_and_remove_values_and_elements() {
        let mut object = json!({"spec": {"containers": [{"name": "a", "image": "x"}, {"name": "b", "image": "y"}]}});
        let element =
            vec![Step::Field("spec".into()), Step::Field("containers".into()), Step::Key(r#"{"name":"b"}"#.into())];
        let mut image = element.clone();
        image.push(Step::Field("image".into()));
        assert_eq!(get(&object, &image), Some(&json!("y")));
        remove(&mut object, &image);
        assert_eq!(object["spec"]["containers"][1], json!({"name": "b"}));
        remove(&mut object, &element);
        assert_eq!(object["spec"]["containers"], json!([{"name": "a", "image": "x"}]));
    }

    #[test]
    fn updates_take_the_fields_they_change() {
        let old = json!({"metadata": {"name": "c"}, "data": {"a": "1", "b": "2"}});
        let mut created = old.clone();
        record_update("creator", "v1", "", None, &mut created);
        let mut new = created.clone();
        new["data"]["b"] = json!("3");
        record_update("editor", "v1", "", Some(&created), &mut new);
        let managed = read_managed(&new);
        let owner = |field: &str| {
            managed.iter().find(|m| m.fields.iter().any(|p| display(p) == field)).map(|m| m.manager.clone())
        };
        assert_eq!(owner(".data.a").as_deref(), Some("creator"));
        assert_eq!(owner(".data.b").as_deref(), Some("editor"));
    }
}
