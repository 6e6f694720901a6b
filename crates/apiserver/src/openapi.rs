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

fn document(path: &str) -> Value {
    let mut paths = serde_json::Map::new();
    let schemas = crate::schema::schemas();
    let mut roots = Vec::new();
    for resource in RESOURCES.iter().filter(|r| group_version_path(r) == path) {
        roots.push(schemas.root(resource).to_string());
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
    let components: serde_json::Map<String, Value> = schemas
        .reachable(roots)
        .into_iter()
        .filter_map(|name| schemas.definitions.get(&name).map(|schema| (name, schema.clone())))
        .collect();
    json!({
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": crate::handlers::version()["gitVersion"]},
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
            let hash = {
                use std::hash::{Hash, Hasher};
                let mut hasher = std::collections::hash_map::DefaultHasher::new();
                document.to_string().hash(&mut hasher);
                format!("{:016X}", hasher.finish())
            };
            index.insert(path.clone(), json!({"serverRelativeURL": format!("/openapi/v3/{path}?hash={hash}")}));
        }
        Documents { index: json!({"paths": index}), documents }
    })
}

/// `/openapi/v2` in JSON: the definitions (clients that ask for protobuf get `openapi_v2`'s).
pub fn swagger() -> &'static Value {
    static SWAGGER: OnceLock<Value> = OnceLock::new();
    SWAGGER.get_or_init(|| {
        let definitions = serde_json::to_string(&crate::schema::schemas().definitions)
            .unwrap_or_default()
            .replace("\"#/components/schemas/", "\"#/definitions/");
        json!({
            "swagger": "2.0",
            "info": {"title": "Kubernetes", "version": crate::handlers::version()["gitVersion"]},
            "paths": {},
            "definitions": serde_json::from_str::<Value>(&definitions).unwrap_or_default(),
        })
    })
}

/// `/openapi/v3`
pub fn index() -> &'static Value {
    &documents().index
}

/// `/openapi/v3/<path>`
pub fn group_version(path: &str) -> Option<&'static Value> {
    documents().documents.iter().find(|(p, _)| p == path).map(|(_, d)| d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_group_version_has_a_document_with_patch_operations_kubectl_recognises() {
        let index = index();
        let url = index["paths"]["apis/apps/v1"]["serverRelativeURL"].as_str().unwrap();
        assert!(url.starts_with("/openapi/v3/apis/apps/v1?hash="));
        let apps = group_version("apis/apps/v1").unwrap();
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
        let core = group_version("api/v1").unwrap();
        assert!(core["paths"]["/api/v1/namespaces/{name}"]["patch"].is_object());
        assert!(group_version("apis/nope/v1").is_none());
        // Schemas for `kubectl explain`: the kinds, marked with their GVK, and what they reach.
        let deployment = &apps["components"]["schemas"]["io.k8s.api.apps.v1.Deployment"];
        assert_eq!(deployment["x-kubernetes-group-version-kind"][0]["kind"], "Deployment");
        assert!(apps["components"]["schemas"]["io.k8s.api.core.v1.Container"]["properties"]["image"].is_object());
        assert!(apps["components"]["schemas"]["io.k8s.api.core.v1.Node"].is_null());
    }
}
