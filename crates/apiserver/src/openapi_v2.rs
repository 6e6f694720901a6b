//! `/openapi/v2` as kubectl 1.27/1.28 read it: a gnostic `openapi.v2.Document` in protobuf. They
//! need it for `apply` (is `fieldValidation` a parameter of the kind's PATCH?) and `explain`
//! (the definitions, found by their `x-kubernetes-group-version-kind`; later kubectls' too,
//! with `--output=plaintext-openapiv2`). The custom kinds served now are appended. The messages below are
//! the subset of gnostic's OpenAPIv2.proto the document uses, with its field numbers.

use std::sync::OnceLock;

use prost::Message;
use serde_json::Value;

use crate::registry::{RESOURCES, Resource};

#[derive(Clone, PartialEq, Message)]
struct Document {
    #[prost(string, tag = "1")]
    swagger: String,
    #[prost(message, optional, tag = "2")]
    info: Option<Info>,
    #[prost(message, optional, tag = "8")]
    paths: Option<Paths>,
    #[prost(message, optional, tag = "9")]
    definitions: Option<Definitions>,
}

#[derive(Clone, PartialEq, Message)]
struct Info {
    #[prost(string, tag = "1")]
    title: String,
    #[prost(string, tag = "2")]
    version: String,
}

#[derive(Clone, PartialEq, Message)]
struct Paths {
    #[prost(message, repeated, tag = "2")]
    path: Vec<NamedPathItem>,
}

#[derive(Clone, PartialEq, Message)]
struct NamedPathItem {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "2")]
    value: Option<PathItem>,
}

#[derive(Clone, PartialEq, Message)]
struct PathItem {
    #[prost(message, optional, tag = "2")]
    get: Option<Operation>,
    #[prost(message, optional, tag = "3")]
    put: Option<Operation>,
    #[prost(message, optional, tag = "4")]
    post: Option<Operation>,
    #[prost(message, optional, tag = "5")]
    delete: Option<Operation>,
    #[prost(message, optional, tag = "8")]
    patch: Option<Operation>,
}

#[derive(Clone, PartialEq, Message)]
struct Operation {
    #[prost(string, tag = "5")]
    operation_id: String,
    #[prost(message, repeated, tag = "8")]
    parameters: Vec<ParametersItem>,
    #[prost(message, optional, tag = "9")]
    responses: Option<Responses>,
    #[prost(message, repeated, tag = "13")]
    vendor_extension: Vec<NamedAny>,
}

#[derive(Clone, PartialEq, Message)]
struct ParametersItem {
    /// `oneof { Parameter parameter = 1; }`
    #[prost(message, optional, tag = "1")]
    parameter: Option<Parameter>,
}

#[derive(Clone, PartialEq, Message)]
struct Parameter {
    /// `oneof { NonBodyParameter non_body_parameter = 2; }`
    #[prost(message, optional, tag = "2")]
    non_body_parameter: Option<NonBodyParameter>,
}

#[derive(Clone, PartialEq, Message)]
struct NonBodyParameter {
    /// `oneof { QueryParameterSubSchema query_parameter_sub_schema = 3; }`
    #[prost(message, optional, tag = "3")]
    query_parameter_sub_schema: Option<QueryParameterSubSchema>,
}

#[derive(Clone, PartialEq, Message)]
struct QueryParameterSubSchema {
    #[prost(string, tag = "2")]
    r#in: String,
    #[prost(string, tag = "4")]
    name: String,
    #[prost(string, tag = "6")]
    r#type: String,
    #[prost(bool, tag = "20")]
    unique_items: bool,
}

#[derive(Clone, PartialEq, Message)]
struct Responses {
    #[prost(message, repeated, tag = "1")]
    response_code: Vec<NamedResponseValue>,
}

#[derive(Clone, PartialEq, Message)]
struct NamedResponseValue {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "2")]
    value: Option<ResponseValue>,
}

#[derive(Clone, PartialEq, Message)]
struct ResponseValue {
    /// `oneof { Response response = 1; }`
    #[prost(message, optional, tag = "1")]
    response: Option<Response>,
}

#[derive(Clone, PartialEq, Message)]
struct Response {
    #[prost(string, tag = "1")]
    description: String,
}

#[derive(Clone, PartialEq, Message)]
struct NamedAny {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "2")]
    value: Option<Any>,
}

#[derive(Clone, PartialEq, Message)]
struct Any {
    /// The value as YAML (JSON is YAML).
    #[prost(string, tag = "2")]
    yaml: String,
}

#[derive(Clone, PartialEq, Message)]
struct Definitions {
    #[prost(message, repeated, tag = "1")]
    additional_properties: Vec<NamedSchema>,
}

#[derive(Clone, PartialEq, Message)]
struct NamedSchema {
    #[prost(string, tag = "1")]
    name: String,
    #[prost(message, optional, tag = "2")]
    value: Option<Schema>,
}

#[derive(Clone, PartialEq, Message)]
struct Schema {
    #[prost(string, tag = "1")]
    reference: String,
    #[prost(string, tag = "2")]
    format: String,
    #[prost(string, tag = "4")]
    description: String,
    #[prost(string, repeated, tag = "19")]
    required: Vec<String>,
    #[prost(message, optional, tag = "21")]
    additional_properties: Option<AdditionalPropertiesItem>,
    #[prost(message, optional, tag = "22")]
    r#type: Option<TypeItem>,
    #[prost(message, optional, tag = "23")]
    items: Option<ItemsItem>,
    #[prost(message, optional, tag = "25")]
    properties: Option<Properties>,
    #[prost(message, repeated, tag = "31")]
    vendor_extension: Vec<NamedAny>,
}

#[derive(Clone, PartialEq, Message)]
struct AdditionalPropertiesItem {
    /// `oneof { Schema schema = 1; }`
    #[prost(message, optional, boxed, tag = "1")]
    schema: Option<Box<Schema>>,
}

#[derive(Clone, PartialEq, Message)]
struct TypeItem {
    #[prost(string, repeated, tag = "1")]
    value: Vec<String>,
}

#[derive(Clone, PartialEq, Message)]
struct ItemsItem {
    #[prost(message, repeated, tag = "1")]
    schema: Vec<Schema>,
}

#[derive(Clone, PartialEq, Message)]
struct Properties {
    #[prost(message, repeated, tag = "1")]
    additional_properties: Vec<NamedSchema>,
}

fn extension(name: &str, value: &Value) -> NamedAny {
    NamedAny { name: name.into(), value: Some(Any { yaml: value.to_string() }) }
}

/// An OpenAPI 3 schema (as the v3 documents serve it) in Swagger 2.0's terms.
fn schema(v3: &Value) -> Schema {
    // `allOf: [{$ref}]` beside a description is a plain `$ref` in Swagger 2.0.
    let reference = v3
        .get("$ref")
        .or_else(|| v3.get("allOf").and_then(|all| all.get(0)).and_then(|first| first.get("$ref")))
        .and_then(Value::as_str)
        .map(|r| r.replace("#/components/schemas/", "#/definitions/"))
        .unwrap_or_default();
    let text = |key: &str| v3.get(key).and_then(Value::as_str).unwrap_or_default().to_string();
    let int_or_string = v3.get("x-kubernetes-int-or-string").and_then(Value::as_bool) == Some(true);
    let mut kind = text("type");
    let mut format = text("format");
    if int_or_string && kind.is_empty() {
        kind = "string".into();
        format = "int-or-string".into();
    }
    let properties = v3.get("properties").and_then(Value::as_object).map(|properties| Properties {
        additional_properties: properties
            .iter()
            .map(|(name, value)| NamedSchema { name: name.clone(), value: Some(schema(value)) })
            .collect(),
    });
    let vendor_extension = v3
        .as_object()
        .into_iter()
        .flatten()
        .filter(|(key, _)| key.starts_with("x-kubernetes-"))
        .map(|(key, value)| extension(key, value))
        .collect();
    Schema {
        reference,
        format,
        description: text("description"),
        required: v3
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).map(str::to_string).collect())
            .unwrap_or_default(),
        additional_properties: v3
            .get("additionalProperties")
            .filter(|a| a.is_object())
            .map(|a| AdditionalPropertiesItem { schema: Some(Box::new(schema(a))) }),
        r#type: (!kind.is_empty()).then(|| TypeItem { value: vec![kind] }),
        items: v3.get("items").map(|items| ItemsItem { schema: vec![schema(items)] }),
        properties,
        vendor_extension,
    }
}

fn operation(id: String, parameters: &[&str], gvk: &Value) -> Operation {
    Operation {
        operation_id: id,
        parameters: parameters
            .iter()
            .map(|name| ParametersItem {
                parameter: Some(Parameter {
                    non_body_parameter: Some(NonBodyParameter {
                        query_parameter_sub_schema: Some(QueryParameterSubSchema {
                            r#in: "query".into(),
                            name: name.to_string(),
                            r#type: "string".into(),
                            unique_items: true,
                        }),
                    }),
                }),
            })
            .collect(),
        responses: Some(Responses {
            response_code: vec![NamedResponseValue {
                name: "200".into(),
                value: Some(ResponseValue { response: Some(Response { description: "OK".into() }) }),
            }],
        }),
        vendor_extension: vec![extension("x-kubernetes-group-version-kind", gvk)],
    }
}

/// The paths of resources: each object's, with the operations kubectl looks at.
fn paths(resources: &[&Resource]) -> Vec<NamedPathItem> {
    let mut paths = Vec::new();
    for resource in resources.iter().filter(|r| !r.is_review()) {
        let base = if resource.group.is_empty() {
            format!("/api/{}", resource.version)
        } else {
            format!("/apis/{}/{}", resource.group, resource.version)
        };
        let item = if resource.namespaced {
            format!("{base}/namespaces/{{namespace}}/{}/{{name}}", resource.plural)
        } else {
            format!("{base}/{}/{{name}}", resource.plural)
        };
        let gvk = serde_json::json!({"group": resource.group, "version": resource.version, "kind": resource.kind});
        let writes = ["dryRun", "fieldManager", "fieldValidation", "pretty"];
        let id = |verb: &str| format!("{verb}{}", resource.kind);
        paths.push(NamedPathItem {
            name: item,
            value: Some(PathItem {
                get: Some(operation(id("read"), &["pretty"], &gvk)),
                put: Some(operation(id("replace"), &writes, &gvk)),
                post: None,
                delete: Some(operation(id("delete"), &["dryRun", "gracePeriodSeconds", "propagationPolicy"], &gvk)),
                patch: Some(operation(
                    id("patch"),
                    &["dryRun", "fieldManager", "fieldValidation", "force", "pretty"],
                    &gvk,
                )),
            }),
        });
    }
    paths
}

fn document() -> Document {
    let builtin: Vec<&Resource> = RESOURCES.iter().collect();
    let definitions = crate::schema::schemas()
        .definitions
        .iter()
        .map(|(name, value)| NamedSchema { name: name.clone(), value: Some(schema(value)) })
        .collect();
    Document {
        swagger: "2.0".into(),
        info: Some(Info {
            title: "Kubernetes".into(),
            version: crate::state::version()["gitVersion"].as_str().unwrap_or_default().into(),
        }),
        paths: Some(Paths { path: paths(&builtin) }),
        definitions: Some(Definitions { additional_properties: definitions }),
    }
}

/// The document, encoded once.
pub fn protobuf() -> &'static [u8] {
    static ENCODED: OnceLock<Vec<u8>> = OnceLock::new();
    ENCODED.get_or_init(|| document().encode_to_vec())
}

/// The document with the paths and definitions of the custom resources served now. Protobuf
/// merges a message encoded twice (its repeated fields appended), so the built-in kinds'
/// encoding is reused as it is, followed by a document of the custom kinds alone.
pub fn protobuf_with(custom: &[&'static Resource]) -> std::borrow::Cow<'static, [u8]> {
    if custom.is_empty() {
        return std::borrow::Cow::Borrowed(protobuf());
    }
    let definitions = custom
        .iter()
        .map(|resource| NamedSchema {
            name: crate::openapi::custom_definition_name(resource),
            value: Some(schema(&crate::openapi::custom_v2_schema(resource))),
        })
        .collect();
    let custom_kinds = Document {
        swagger: String::new(),
        info: None,
        paths: Some(Paths { path: paths(custom) }),
        definitions: Some(Definitions { additional_properties: definitions }),
    };
    let mut encoded = protobuf().to_vec();
    custom_kinds.encode(&mut encoded).expect("a Vec grows as needed");
    std::borrow::Cow::Owned(encoded)
}

/// The media type kubectl asks for and checks (with dots, as upstream names it).
pub const PROTOBUF_MEDIA_TYPE: &str = "application/com.github.proto-openapi.spec.v2.v1.0+protobuf";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_decodes_and_names_the_patch_parameters_of_each_kind() {
        let document = Document::decode(protobuf()).unwrap();
        assert_eq!(document.swagger, "2.0");
        let paths = document.paths.unwrap().path;
        let deployment = paths.iter().find(|p| p.name == "/apis/apps/v1/namespaces/{namespace}/deployments/{name}");
        let patch = deployment.unwrap().value.as_ref().unwrap().patch.as_ref().unwrap();
        let gvk: Value = serde_json::from_str(&patch.vendor_extension[0].value.as_ref().unwrap().yaml).unwrap();
        assert_eq!(gvk["kind"], "Deployment");
        assert!(patch.parameters.iter().any(|p| {
            let query = p.parameter.as_ref().and_then(|p| p.non_body_parameter.as_ref());
            query.and_then(|q| q.query_parameter_sub_schema.as_ref()).is_some_and(|q| q.name == "fieldValidation")
        }));
        let definitions = document.definitions.unwrap().additional_properties;
        let pod = definitions.iter().find(|d| d.name == "io.k8s.api.core.v1.Pod").unwrap().value.as_ref().unwrap();
        let spec = pod.properties.as_ref().unwrap().additional_properties.iter().find(|p| p.name == "spec").unwrap();
        assert_eq!(spec.value.as_ref().unwrap().reference, "#/definitions/io.k8s.api.core.v1.PodSpec");
        assert!(pod.vendor_extension.iter().any(|e| e.name == "x-kubernetes-group-version-kind"));
    }

    #[test]
    fn custom_kinds_are_appended_to_the_built_in_document() {
        let crd = serde_json::json!({
            "spec": {"group": "example.com", "scope": "Namespaced",
                "names": {"plural": "widgets", "singular": "widget", "kind": "Widget", "listKind": "WidgetList"},
                "versions": [{"name": "v1", "served": true, "storage": true, "schema": {"openAPIV3Schema": {
                    "type": "object", "properties": {"spec": {"type": "object", "properties": {"size": {"type": "integer"}}}}}}}]},
            "status": {"conditions": [{"type": "Established", "status": "True"}]},
        });
        let custom = crate::custom_kinds::resources_of(&crd);
        assert_eq!(custom.len(), 1);
        let document = Document::decode(protobuf_with(&custom).as_ref()).unwrap();
        // The built-in document's fields are kept, the custom kind's added to its lists.
        assert_eq!(document.swagger, "2.0");
        let paths = document.paths.unwrap().path;
        assert!(paths.iter().any(|p| p.name == "/api/v1/namespaces/{namespace}/pods/{name}"));
        assert!(paths.iter().any(|p| p.name == "/apis/example.com/v1/namespaces/{namespace}/widgets/{name}"));
        let definitions = document.definitions.unwrap().additional_properties;
        assert!(definitions.iter().any(|d| d.name == "io.k8s.api.core.v1.Pod"));
        let widget = definitions.iter().find(|d| d.name == "com.example.v1.Widget").unwrap().value.as_ref().unwrap();
        let properties = &widget.properties.as_ref().unwrap().additional_properties;
        let spec = properties.iter().find(|p| p.name == "spec").unwrap().value.as_ref().unwrap();
        let size = &spec.properties.as_ref().unwrap().additional_properties[0];
        assert_eq!((size.name.as_str(), size.value.as_ref().unwrap().r#type.as_ref().unwrap().value[0].as_str()), ("size", "integer"));
        let metadata = properties.iter().find(|p| p.name == "metadata").unwrap().value.as_ref().unwrap();
        assert_eq!(metadata.reference, "#/definitions/io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta");
        assert!(protobuf_with(&[]).len() == protobuf().len());
    }
}
