//! The OpenAPI schemas of the served kinds, from k8s-openapi's types (Kubernetes 1.33), and
//! what the server does with them: serve them (`kubectl explain`), and find the fields of a
//! request that no schema declares (`fieldValidation`: Strict refuses them, Warn and Ignore
//! drop them, as upstream's decoder does).

use std::sync::OnceLock;

use schemars::generate::SchemaSettings;
use serde_json::{Map, Value, json};

use crate::registry::{RESOURCES, Resource};

/// Every definition the served kinds reach, by upstream's names (`io.k8s.api.core.v1.Pod`).
#[derive(Debug)]
pub struct Schemas {
    pub definitions: Map<String, Value>,
    /// The definition of each kind, in the order of `RESOURCES`.
    roots: Vec<String>,
}

const REFERENCE_PREFIX: &str = "#/components/schemas/";

pub fn schemas() -> &'static Schemas {
    static SCHEMAS: OnceLock<Schemas> = OnceLock::new();
    SCHEMAS.get_or_init(|| {
        let mut generator = SchemaSettings::openapi3().into_generator();
        let mut roots = Vec::new();
        for resource in RESOURCES {
            let reference = (resource.schema)(&mut generator);
            let name = reference.get("$ref").and_then(Value::as_str).unwrap_or_default();
            roots.push((resource, name.trim_start_matches(REFERENCE_PREFIX).to_string()));
        }
        let mut definitions: Map<String, Value> = generator.take_definitions(true).into_iter().collect();
        for (resource, name) in &roots {
            if let Some(Value::Object(schema)) = definitions.get_mut(name.as_str()) {
                schema.insert(
                    "x-kubernetes-group-version-kind".into(),
                    json!([{"group": resource.group, "version": resource.version, "kind": resource.kind}]),
                );
            }
        }
        let mut schemas = Schemas { definitions, roots: roots.into_iter().map(|(_, name)| name).collect() };
        schemas.mark_patch_strategies();
        schemas
    })
}

impl Schemas {
    /// The name of the definition of a kind's schema.
    pub fn root(&self, resource: &Resource) -> &str {
        RESOURCES.iter().position(|r| r == resource).map(|i| self.roots[i].as_str()).unwrap_or_default()
    }

    /// Follows `$ref` (also the `allOf: [{$ref}]` that carries a description beside it).
    pub fn resolve<'a>(&'a self, schema: &'a Value) -> &'a Value {
        let mut schema = schema;
        for _ in 0..16 {
            let reference = schema
                .get("$ref")
                .or_else(|| schema.get("allOf").and_then(|all| all.get(0)).and_then(|first| first.get("$ref")));
            match reference.and_then(Value::as_str).and_then(|r| r.strip_prefix(REFERENCE_PREFIX)) {
                Some(name) => match self.definitions.get(name) {
                    Some(target) => schema = target,
                    None => return schema,
                },
                None => return schema,
            }
        }
        schema
    }

    /// Marks every list the server's strategic merge patch merges (by a key, or as a set) with
    /// the extensions clients read (`x-kubernetes-patch-strategy`, `-merge-key`).
    fn mark_patch_strategies(&mut self) {
        let mut marks = Vec::new();
        for (name, definition) in &self.definitions {
            let Some(Value::Object(properties)) = definition.get("properties") else { continue };
            for (field, property) in properties {
                let Some(items) = property.get("items") else { continue };
                // An element with every field the item schema declares.
                let keys = self.resolve(items).get("properties").and_then(Value::as_object);
                let element =
                    Value::Object(keys.into_iter().flatten().map(|(k, _)| (k.clone(), Value::Null)).collect());
                match crate::smp::strategy(field, &[&element]) {
                    crate::smp::ListStrategy::MergeByKey(key) => marks.push((name.clone(), field.clone(), Some(key))),
                    crate::smp::ListStrategy::Union => marks.push((name.clone(), field.clone(), None)),
                    crate::smp::ListStrategy::Replace => {}
                }
            }
        }
        for (name, field, key) in marks {
            let Some(property) = self.definitions.get_mut(&name).and_then(|d| d["properties"].get_mut(&field)) else {
                continue;
            };
            property["x-kubernetes-patch-strategy"] = json!("merge");
            if let Some(key) = key {
                property["x-kubernetes-patch-merge-key"] = json!(key);
            }
        }
    }

    /// The names of the definitions `name` reaches (itself included), sorted.
    pub fn reachable(&self, names: impl IntoIterator<Item = String>) -> Vec<String> {
        let mut seen = std::collections::BTreeSet::new();
        let mut pending: Vec<String> = names.into_iter().collect();
        while let Some(name) = pending.pop() {
            if !seen.insert(name.clone()) {
                continue;
            }
            if let Some(schema) = self.definitions.get(&name) {
                collect_references(schema, &mut pending);
            }
        }
        seen.into_iter().collect()
    }

    /// Removes from `object` every field the kind's schema does not declare and returns
    /// their paths as upstream words them (`spec.containers[0].imagePullPolice`).
    pub fn prune_unknown(&self, resource: &Resource, object: &mut Value) -> Vec<String> {
        let mut unknown = Vec::new();
        if let Some(schema) = self.definitions.get(self.root(resource)) {
            self.prune(schema, object, String::new(), &mut unknown, 0);
        }
        unknown
    }

    /// Drops the fields of an object's `metadata` that ObjectMeta does not declare (for custom
    /// objects, whose schemas leave metadata to the server); `path` names the metadata.
    pub fn prune_metadata(&self, metadata: &mut Value, path: &str) -> Vec<String> {
        let mut unknown = Vec::new();
        if let Some(schema) = self.definitions.get("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta") {
            self.prune(schema, metadata, path.to_string(), &mut unknown, 0);
        }
        unknown
    }

    fn prune(&self, schema: &Value, value: &mut Value, path: String, unknown: &mut Vec<String>, depth: usize) {
        if depth > 64 {
            return;
        }
        let schema = self.resolve(schema);
        match value {
            Value::Object(map) => {
                if let Some(Value::Object(properties)) = schema.get("properties") {
                    let mut unknown_keys = Vec::new();
                    // A null is an unset field (Go decodes it to the zero value and omits it),
                    // except the `creationTimestamp: null` upstream itself writes.
                    map.retain(|key, field| !field.is_null() || key == "creationTimestamp");
                    for (key, field) in map.iter_mut() {
                        let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                        match properties.get(key) {
                            Some(property) => self.prune(property, field, child, unknown, depth + 1),
                            None => {
                                unknown.push(child);
                                unknown_keys.push(key.clone());
                            }
                        }
                    }
                    for key in unknown_keys {
                        map.remove(&key);
                    }
                } else if let Some(values) = schema.get("additionalProperties").filter(|v| v.is_object()) {
                    for (key, field) in map.iter_mut() {
                        let child = if path.is_empty() { key.clone() } else { format!("{path}.{key}") };
                        self.prune(values, field, child, unknown, depth + 1);
                    }
                }
                // Neither: free-form (RawExtension, FieldsV1, JSON): anything goes.
            }
            Value::Array(items) => {
                if let Some(item_schema) = schema.get("items") {
                    for (index, item) in items.iter_mut().enumerate() {
                        self.prune(item_schema, item, format!("{path}[{index}]"), unknown, depth + 1);
                    }
                }
            }
            _ => {}
        }
    }
}

fn collect_references(schema: &Value, names: &mut Vec<String>) {
    match schema {
        Value::Object(map) => {
            for (key, value) in map {
                if key == "$ref" {
                    if let Some(name) = value.as_str().and_then(|r| r.strip_prefix(REFERENCE_PREFIX)) {
                        names.push(name.to_string());
                    }
                } else {
                    collect_references(value, names);
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_references(item, names)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::find;

    #[test]
    fn every_kind_has_a_schema_marked_with_its_group_version_kind() {
        let schemas = schemas();
        for resource in RESOURCES {
            let name = schemas.root(resource);
            let schema = &schemas.definitions[name];
            assert_eq!(schema["x-kubernetes-group-version-kind"][0]["kind"], resource.kind, "{name}");
            assert!(schema["properties"]["metadata"].is_object(), "{name} has metadata");
        }
        let pod = &schemas.definitions["io.k8s.api.core.v1.Pod"];
        assert!(pod["description"].as_str().unwrap().contains("Pod is a collection of containers"));
        // Lists carry the merge keys of the server's strategic merge patch.
        let spec = &schemas.definitions["io.k8s.api.core.v1.PodSpec"]["properties"];
        assert_eq!(spec["containers"]["x-kubernetes-patch-merge-key"], "name");
        let container = &schemas.definitions["io.k8s.api.core.v1.Container"]["properties"];
        assert_eq!(container["ports"]["x-kubernetes-patch-merge-key"], "containerPort");
        let service = &schemas.definitions["io.k8s.api.core.v1.ServiceSpec"]["properties"];
        assert_eq!(service["ports"]["x-kubernetes-patch-merge-key"], "port");
        let meta = &schemas.definitions["io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"]["properties"];
        assert_eq!(meta["finalizers"]["x-kubernetes-patch-strategy"], "merge");
        assert!(spec["tolerations"].get("x-kubernetes-patch-strategy").is_none());
        // References carry their description beside an allOf, as upstream's documents do.
        assert_eq!(pod["properties"]["spec"]["allOf"][0]["$ref"], "#/components/schemas/io.k8s.api.core.v1.PodSpec");
    }

    #[test]
    fn unknown_fields_are_found_at_any_depth_and_removed() {
        let pods = find("", "v1", "pods").unwrap();
        let mut pod = json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "p", "labels": {"any": "label"}, "bogus": 1, "generateName": null},
            "spec": {"containers": [{"name": "a", "image": "x", "imagePullPolice": "Always",
                                     "resources": {"limits": {"cpu": "1"}}}],
                     "nodeSelector": {"disk": "ssd"}},
        });
        let unknown = schemas().prune_unknown(pods, &mut pod);
        assert_eq!(unknown, ["metadata.bogus", "spec.containers[0].imagePullPolice"]);
        assert!(pod["metadata"].get("bogus").is_none());
        assert!(pod["metadata"].get("generateName").is_none());
        assert_eq!(pod["spec"]["containers"][0]["resources"]["limits"]["cpu"], "1");
        assert_eq!(pod["metadata"]["labels"]["any"], "label");
        // Nothing more to find the second time.
        assert!(schemas().prune_unknown(pods, &mut pod).is_empty());
    }

    #[test]
    fn free_form_fields_keep_anything() {
        let nodes = find("", "v1", "nodes").unwrap();
        let mut node = json!({"metadata": {"name": "n", "managedFields": [
            {"manager": "m", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {"f:labels": {}}}}]}});
        assert!(schemas().prune_unknown(nodes, &mut node).is_empty());
    }
}
