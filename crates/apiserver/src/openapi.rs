//! OpenAPI v3: `/openapi/v3` lists a document per group version, each with the operations of
//! its resources (each PATCH naming its group-version-kind and the `fieldValidation` parameter:
//! what kubectl 1.29+ checks before it lets the server validate an `apply`) and the schemas of
//! its kinds with every definition they reach (what `kubectl explain` reads).
//!
//! PATCH operations declare no request body on purpose: kubectl then computes a strategic
//! merge patch from its own compiled-in types, whose merge keys are the ones the server's
//! `smp` module applies, rather than from schemas that do not carry merge keys.

use std::sync::OnceLock;

use serde_json::{Value, json};

use crate::registry::{RESOURCES, Resource};

/// `api/v1`, `apis/apps/v1`
fn group_version_path(resource: &Resource) -> String {
    if resource.group.is_empty() {
        format!("api/{}", resource.version)
    } else {
        format!("apis/{}/{}", resource.group, resource.version)
    }
}

fn query_parameter(name: &str) -> Value {
    json!({"name": name, "in": "query", "schema": {"type": "string", "uniqueItems": true}})
}

fn operation(resource: &Resource, action: &str, verb: &str, parameters: &[&str]) -> Value {
    let scope = if resource.namespaced { "Namespaced" } else { "" };
    let group = resource.group.split('.').next().unwrap_or("core");
    let group = if group.is_empty() { "core" } else { group };
    let capitalize = |s: &str| {
        let mut chars = s.chars();
        chars.next().map(|c| c.to_ascii_uppercase().to_string() + chars.as_str()).unwrap_or_default()
    };
    json!({
        "operationId": format!("{verb}{}{}{scope}{}", capitalize(group), capitalize(resource.version), resource.kind),
        "parameters": parameters.iter().map(|p| query_parameter(p)).collect::<Vec<_>>(),
        "responses": {"200": {"description": "OK"}},
        "x-kubernetes-action": action,
        "x-kubernetes-group-version-kind": {"group": resource.group, "version": resource.version, "kind": resource.kind},
    })
}

fn add_paths(paths: &mut serde_json::Map<String, Value>, path: &str, resource: &Resource) {
    let base = format!("/{path}");
    let (collection, item) = if resource.namespaced {
        (
            format!("{base}/namespaces/{{namespace}}/{}", resource.plural),
            format!("{base}/namespaces/{{namespace}}/{}/{{name}}", resource.plural),
        )
    } else {
        (format!("{base}/{}", resource.plural), format!("{base}/{}/{{name}}", resource.plural))
    };
    let writes = ["dryRun", "fieldManager", "fieldValidation", "pretty"];
    paths.insert(
            collection,
            json!({
                "get": operation(resource, "list", "list", &["labelSelector", "fieldSelector", "limit", "continue", "resourceVersion", "watch"]),
                "post": operation(resource, "post", "create", &writes),
            }),
        );
    paths.insert(
            item,
            json!({
                "get": operation(resource, "get", "read", &["pretty"]),
                "put": operation(resource, "put", "replace", &writes),
                "patch": operation(resource, "patch", "patch", &["dryRun", "fieldManager", "fieldValidation", "force", "pretty"]),
                "delete": operation(resource, "delete", "delete", &["dryRun", "gracePeriodSeconds", "propagationPolicy"]),
            }),
        );
}

fn document(path: &str) -> Value {
    let mut paths = serde_json::Map::new();
    let schemas = crate::schema::schemas();
    let mut roots = Vec::new();
    for resource in RESOURCES.iter().filter(|r| group_version_path(r) == path) {
        roots.push(schemas.root(resource).to_string());
        add_paths(&mut paths, path, resource);
    }
    let components: serde_json::Map<String, Value> = schemas
        .reachable(roots)
        .into_iter()
        .filter_map(|name| schemas.definitions.get(&name).map(|schema| (name, schema.clone())))
        .collect();
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": crate::state::version()["gitVersion"]},
        "paths": paths,
        "components": {"schemas": components},
    })
}

struct Documents {
    index: Value,
    /// (path, document)
    documents: Vec<(String, Value)>,
}

fn documents() -> &'static Documents {
    static DOCUMENTS: OnceLock<Documents> = OnceLock::new();
    DOCUMENTS.get_or_init(|| {
        let mut paths: Vec<String> = RESOURCES.iter().map(group_version_path).collect();
        paths.dedup();
        let documents: Vec<(String, Value)> = paths.iter().map(|p| (p.clone(), document(p))).collect();
        let mut index = serde_json::Map::new();
        for (path, document) in &documents {
            // The hash lets clients cache a document until it changes, as upstream's does.
            let hash = hash_of(document);
            index.insert(path.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={hash}")}));
        }
        Documents { index: json!({"paths": index}), documents }
    })
}

const OBJECT_META: &str = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta";

/// The definition name upstream publishes a custom kind under (`com.example.v1.Widget`).
pub fn custom_definition_name(resource: &Resource) -> String {
    let group: Vec<&str> = resource.group.split('.').rev().collect();
    format!("{}.{}.{}", group.join("."), resource.version, resource.kind)
}

/// A custom kind's schema as published: the definition's, with apiVersion, kind and metadata
/// declared and the group-version-kind marked (what `kubectl explain` looks for).
fn custom_schema(resource: &Resource, reference_prefix: &str) -> Value {
    let mut schema = resource
        .custom
        .and_then(|c| c.schema.as_ref())
        .map(|schema| (*schema.decoded()).clone())
        .unwrap_or_else(|| json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}));
    if !schema["properties"].is_object() {
        schema["properties"] = json!({});
    }
    schema["properties"]["apiVersion"] = json!({"type": "string", "description": "APIVersion defines the versioned schema of this representation of an object. Servers should convert recognized schemas to the latest internal value, and may reject unrecognized values. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#resources"});
    schema["properties"]["kind"] = json!({"type": "string", "description": "Kind is a string value representing the REST resource this object represents. Servers may infer this from the endpoint the client submits requests to. Cannot be updated. In CamelCase. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#types-kinds"});
    schema["properties"]["metadata"] = json!({"allOf": [{"$ref": format!("{reference_prefix}{OBJECT_META}")}], "description": "Standard object's metadata. More info: https://git.k8s.io/community/contributors/devel/sig-architecture/api-conventions.md#metadata"});
    schema["x-kubernetes-group-version-kind"] =
        json!([{"group": resource.group, "version": resource.version, "kind": resource.kind}]);
    schema
}

/// A custom kind's schema as OpenAPI v2 clients can take it (upstream's
/// `ToStructuralOpenAPIV2`): no allOf/oneOf/anyOf/not; a nullable or unknown-field-preserving
/// node loses its type constraints (properties, items; a nullable one its type too), an array
/// left without items its type, and nullable properties are not required.
fn to_v2(schema: &mut Value) {
    let Some(map) = schema.as_object_mut() else { return };
    for key in ["allOf", "oneOf", "anyOf", "not"] {
        map.remove(key);
    }
    if map.remove("nullable") == Some(json!(true)) {
        map.remove("type");
        map.remove("items");
        map.remove("properties");
    }
    if map.remove("x-kubernetes-preserve-unknown-fields") == Some(json!(true)) {
        map.remove("items");
        map.remove("properties");
    }
    if !map.contains_key("items") && map.get("type") == Some(&json!("array")) {
        map.remove("type");
    }
    let nullable: Vec<String> = map
        .get("properties")
        .and_then(Value::as_object)
        .map(|p| p.iter().filter(|(_, v)| v["nullable"] == json!(true)).map(|(k, _)| k.clone()).collect())
        .unwrap_or_default();
    if let Some(required) = map.get_mut("required").and_then(Value::as_array_mut) {
        required.retain(|r| !r.as_str().is_some_and(|r| nullable.iter().any(|n| n == r)));
        if required.is_empty() {
            map.remove("required");
        }
    }
    if let Some(properties) = map.get_mut("properties").and_then(Value::as_object_mut) {
        properties.values_mut().for_each(to_v2);
    }
    if let Some(items) = map.get_mut("items") {
        to_v2(items);
    }
    if let Some(additional) = map.get_mut("additionalProperties").filter(|a| a.is_object()) {
        to_v2(additional);
    }
}

/// The document of a group version custom resources serve.
fn custom_document(path: &str, custom: &[&'static Resource]) -> Option<Value> {
    let resources: Vec<&Resource> = custom.iter().copied().filter(|r| group_version_path(r) == path).collect();
    if resources.is_empty() {
        return None;
    }
    let mut paths = serde_json::Map::new();
    let schemas = crate::schema::schemas();
    let mut components: serde_json::Map<String, Value> = schemas
        .reachable([OBJECT_META.to_string()])
        .into_iter()
        .filter_map(|name| schemas.definitions.get(&name).map(|schema| (name, schema.clone())))
        .collect();
    for resource in resources {
        add_paths(&mut paths, path, resource);
        components.insert(custom_definition_name(resource), custom_schema(resource, "#/components/schemas/"));
    }
    Some(json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes CRD Swagger", "version": "v0.1.0"},
        "paths": paths,
        "components": {"schemas": components},
    }))
}

fn hash_of(document: &Value) -> String {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    document.to_string().hash(&mut hasher);
    format!("{:016X}", hasher.finish())
}

/// `/openapi/v2` in JSON: the definitions (clients that ask for protobuf get `openapi_v2`'s),
/// with those of the custom resources served now.
pub fn swagger_with(custom: &[&'static Resource]) -> std::borrow::Cow<'static, Value> {
    if custom.is_empty() {
        return std::borrow::Cow::Borrowed(swagger());
    }
    let mut document = swagger().clone();
    for resource in custom {
        document["definitions"][custom_definition_name(resource)] = custom_v2_schema(resource);
    }
    std::borrow::Cow::Owned(document)
}

/// A custom kind's definition as `/openapi/v2` publishes it (references to `#/definitions/`).
pub fn custom_v2_schema(resource: &Resource) -> Value {
    let mut schema = custom_schema(resource, "#/definitions/");
    // apiVersion, kind and metadata are the server's own, kept whatever the conversion drops.
    let own: Vec<(&str, Value)> =
        ["apiVersion", "kind", "metadata"].into_iter().map(|field| (field, schema["properties"][field].take())).collect();
    to_v2(&mut schema);
    for (field, property) in own {
        if !schema["properties"].is_object() {
            schema["properties"] = json!({});
        }
        schema["properties"][field] = property;
    }
    schema
}

/// `/openapi/v2` in JSON: the definitions (clients that ask for protobuf get `openapi_v2`'s).
fn swagger() -> &'static Value {
    static SWAGGER: OnceLock<Value> = OnceLock::new();
    SWAGGER.get_or_init(|| {
        let definitions = serde_json::to_string(&crate::schema::schemas().definitions)
            .unwrap_or_default()
            .replace("\"#/components/schemas/", "\"#/definitions/");
        json!({
            "swagger": "2.0",
            "info": {"title": "Kubernetes", "version": crate::state::version()["gitVersion"]},
            "paths": {},
            "definitions": serde_json::from_str::<Value>(&definitions).unwrap_or_default(),
        })
    })
}

/// `/openapi/v3`, with the group versions of the custom resources served now.
pub fn index(custom: &[&'static Resource]) -> std::borrow::Cow<'static, Value> {
    if custom.is_empty() {
        return std::borrow::Cow::Borrowed(&documents().index);
    }
    let mut index = documents().index.clone();
    // What each document is made from, not the document: the index is asked for often.
    let mut digests: std::collections::BTreeMap<String, Vec<u64>> = Default::default();
    for resource in custom {
        digests.entry(group_version_path(resource)).or_default().push(resource.custom.map_or(0, |c| c.digest));
    }
    for (path, digests) in digests {
        use std::hash::{Hash, Hasher};
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        digests.hash(&mut hasher);
        let hash = format!("{:016X}", hasher.finish());
        index["paths"][&path] = json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={hash}")});
    }
    std::borrow::Cow::Owned(index)
}

/// `/openapi/v3/<path>`
pub fn group_version(path: &str, custom: &[&'static Resource]) -> Option<std::borrow::Cow<'static, Value>> {
    match documents().documents.iter().find(|(p, _)| p == path) {
        Some((_, document)) => Some(std::borrow::Cow::Borrowed(document)),
        None => custom_document(path, custom).map(std::borrow::Cow::Owned),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_schemas_are_published_in_v2_as_upstream_converts_them() {
        let mut schema = json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true,
            "properties": {"spec": {"type": "object"}}});
        to_v2(&mut schema);
        assert_eq!(schema, json!({"type": "object"}));
        let mut schema = json!({"type": "object", "required": ["a", "b"], "properties": {
            "a": {"type": "string", "nullable": true},
            "b": {"type": "array", "items": {"type": "object", "x-kubernetes-preserve-unknown-fields": true,
                "properties": {"c": {"type": "string"}}}, "allOf": [{"required": ["x"]}]},
        }});
        to_v2(&mut schema);
        assert_eq!(
            schema,
            json!({"type": "object", "required": ["b"], "properties": {"a": {}, "b": {"type": "array", "items": {"type": "object"}}}})
        );
    }

    #[test]
    fn every_group_version_has_a_document_with_patch_operations_kubectl_recognises() {
        let index = index(&[]);
        let url = index["paths"]["apis/apps/v1"]["serverRelativeURL"].as_str().unwrap();
        assert!(url.starts_with("/openapi/v3/apis/apps/v1?hash="));
        let apps = group_version("apis/apps/v1", &[]).unwrap();
        let patch = &apps["paths"]["/apis/apps/v1/namespaces/{namespace}/deployments/{name}"]["patch"];
        assert_eq!(
            patch["x-kubernetes-group-version-kind"],
            json!({"group": "apps", "version": "v1", "kind": "Deployment"})
        );
        assert!(
            patch["parameters"]
                .as_array()
                .unwrap()
                .iter()
                .any(|p| p["name"] == "fieldValidation" && p["in"] == "query")
        );
        let core = group_version("api/v1", &[]).unwrap();
        assert!(core["paths"]["/api/v1/namespaces/{name}"]["patch"].is_object());
        assert!(group_version("apis/nope/v1", &[]).is_none());
        // Schemas for `kubectl explain`: the kinds, marked with their GVK, and what they reach.
        let deployment = &apps["components"]["schemas"]["io.k8s.api.apps.v1.Deployment"];
        assert_eq!(deployment["x-kubernetes-group-version-kind"][0]["kind"], "Deployment");
        assert!(apps["components"]["schemas"]["io.k8s.api.core.v1.Container"]["properties"]["image"].is_object());
        assert!(apps["components"]["schemas"]["io.k8s.api.core.v1.Node"].is_null());
    }
}
