//! Request bodies in `application/vnd.kubernetes.protobuf`, as kubectl 1.32+ sends its typed
//! writes (`create deployment`, `create secret`, `auth can-i`...): the `k8s\0` magic, then a
//! `runtime.Unknown` whose `typeMeta` names the kind and whose `raw` is the object. The object is
//! decoded into the kind's message type generated from Kubernetes' own .proto files (the
//! k8s-rs-pb crate; each registry entry names it), serialized with the serde form that crate
//! gives it, and that is turned into Kubernetes' JSON guided by the kind's OpenAPI schema.
//!
//! Not reflection: k8s-rs-pb 0.5's file descriptors name themselves as their own dependencies,
//! so asking for one deadlocks.

use base64::Engine;
use serde_json::{Map, Value};

use crate::registry::{RESOURCES, Resource, to_serde_json};
use crate::status::ApiError;

const MAGIC: &[u8] = b"k8s\0";

fn unsupported(message: impl std::fmt::Display) -> ApiError {
    let mut error = ApiError::bad_request(format!("the protobuf body cannot be decoded: {message}"));
    error.code = 415;
    error.reason = "UnsupportedMediaType";
    error
}

/// Decodes a protobuf request body to the object's JSON (apiVersion and kind included).
pub fn decode(body: &[u8]) -> Result<Value, ApiError> {
    use k8s_rs_pb::apimachinery::pkg::runtime::Unknown;
    let Some(envelope) = body.strip_prefix(MAGIC) else {
        return Err(ApiError::bad_request("a protobuf body must start with the k8s\\0 magic"));
    };
    let unknown = <Unknown as protobuf::Message>::parse_from_bytes(envelope)
        .map_err(|e| ApiError::bad_request(format!("the protobuf envelope is malformed: {e}")))?;
    let type_meta = unknown.typeMeta.as_ref().cloned().unwrap_or_default();
    let api_version = type_meta.apiVersion.clone().unwrap_or_default();
    let kind = type_meta.kind.clone().unwrap_or_default();
    if unknown.contentEncoding.as_deref().is_some_and(|e| !e.is_empty()) {
        return Err(unsupported(format!("content encoding {:?}", unknown.contentEncoding)));
    }
    let raw = unknown.raw.as_deref().unwrap_or_default();
    if let Some(plain) = plain_kind(&api_version, &kind) {
        // Options and subresources' kinds, with no schema of their own here: their fields are
        // plain.
        let decoded = plain(raw)
            .map_err(|e| ApiError::bad_request(format!("the {kind} in the protobuf body is malformed: {e}")))?;
        let mut object = prune(decoded).unwrap_or_else(|| Value::Object(Map::new()));
        object["apiVersion"] = Value::String(api_version);
        object["kind"] = Value::String(kind);
        return Ok(object);
    }
    let resource = RESOURCES
        .iter()
        .find(|r| r.api_version() == api_version && r.kind == kind)
        .ok_or_else(|| unsupported(format!("no protobuf schema for {kind} in {api_version:?}")))?;
    // Go writes an IntOrString's three fields; k8s-rs-pb's serde form then picks the (zero)
    // number over the string. Kinds whose data is arbitrary bytes are left alone.
    let fixed;
    let raw = if matches!(resource.builtin(), "secrets" | "configmaps" | "customresourcedefinitions") {
        raw
    } else {
        fixed = string_int_or_strings(raw, 0).unwrap_or_else(|| raw.to_vec());
        &fixed[..]
    };
    // k8s-rs-pb's serde code unwraps (a timestamp out of range panics): contain it.
    let decoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (resource.protobuf)(raw)))
        .unwrap_or_else(|_| Err("a value is out of range".into()));
    let mut serialized =
        decoded.map_err(|e| ApiError::bad_request(format!("the {kind} in the protobuf body is malformed: {e}")))?;
    // A definition's schemas are JSON Schema, not messages the kind's schema describes: they
    // are converted on their own and put back after the walk.
    let mut schemas = Vec::new();
    if resource.builtin() == "customresourcedefinitions" {
        for (i, version) in serialized["spec"]["versions"].as_array_mut().into_iter().flatten().enumerate() {
            let schema = version["schema"]["openAPIV3Schema"].take();
            if !schema.is_null() {
                schemas.push((i, crate::custom::schema_from_protobuf(schema)));
            }
        }
    }
    let mut object = fix_up(resource, serialized);
    for (i, schema) in schemas {
        if let Some(version) = object["spec"]["versions"].get_mut(i) {
            version["schema"]["openAPIV3Schema"] = schema;
        }
    }
    object["apiVersion"] = Value::String(api_version);
    object["kind"] = Value::String(kind);
    Ok(object)
}

fn read_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

fn write_varint(mut value: u64, out: &mut Vec<u8>) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// `message` (wire bytes) with each IntOrString that holds a string (type 1, a zero intVal
/// as Go writes it, a non-empty UTF-8 strVal — field for field in that order) written without
/// its intVal, so that the string is what decodes. Nested messages are found by parsing every
/// length-delimited field that parses as one; `None` when `message` is not a message.
fn string_int_or_strings(message: &[u8], depth: usize) -> Option<Vec<u8>> {
    if depth > 64 {
        return None;
    }
    // The string form of an IntOrString: 08 01 10 00 1a <len> <utf-8>.
    if let [0x08, 0x01, 0x10, 0x00, 0x1a, rest @ ..] = message {
        let mut at = 0;
        let len = read_varint(rest, &mut at)? as usize;
        let text = rest.get(at..)?;
        if len > 0 && text.len() == len && std::str::from_utf8(text).is_ok() {
            let mut out = vec![0x08, 0x01, 0x1a];
            out.extend_from_slice(rest);
            return Some(out);
        }
    }
    let mut out = Vec::with_capacity(message.len());
    let mut at = 0;
    while at < message.len() {
        let key = read_varint(message, &mut at)?;
        if key >> 3 == 0 {
            return None;
        }
        write_varint(key, &mut out);
        match key & 7 {
            0 => write_varint(read_varint(message, &mut at)?, &mut out),
            1 => {
                out.extend_from_slice(message.get(at..at + 8)?);
                at += 8;
            }
            5 => {
                out.extend_from_slice(message.get(at..at + 4)?);
                at += 4;
            }
            2 => {
                let len = read_varint(message, &mut at)? as usize;
                let field = message.get(at..at.checked_add(len)?)?;
                at += len;
                let inner = string_int_or_strings(field, depth + 1).unwrap_or_else(|| field.to_vec());
                write_varint(inner.len() as u64, &mut out);
                out.extend_from_slice(&inner);
            }
            _ => return None,
        }
    }
    Some(out)
}

/// Decodes one kind's protobuf message to its JSON form.
type Decoder = fn(&[u8]) -> Result<Value, String>;

/// The decoder of a kind that has no resource (and so no schema) of its own: the options and
/// subresource bodies client-go sends as protobuf — `DeleteOptions` (in whatever group the
/// client is for: a typed client sends its own group version), `Scale`, `Eviction`, `Binding`,
/// `TokenRequest`.
fn plain_kind(api_version: &str, kind: &str) -> Option<Decoder> {
    use k8s_rs_pb::{api, apimachinery::pkg::apis::meta};
    Some(match (api_version, kind) {
        (_, "DeleteOptions") => to_serde_json::<meta::v1::DeleteOptions>,
        ("autoscaling/v1", "Scale") => to_serde_json::<api::autoscaling::v1::Scale>,
        ("policy/v1", "Eviction") => to_serde_json::<api::policy::v1::Eviction>,
        ("v1", "Binding") => to_serde_json::<api::core::v1::Binding>,
        ("authentication.k8s.io/v1", "TokenRequest") => to_serde_json::<api::authentication::v1::TokenRequest>,
        _ => return None,
    })
}

/// Drops nulls and empty lists and maps, as upstream's JSON omits them.
fn prune(value: Value) -> Option<Value> {
    match value {
        Value::Null => None,
        Value::Array(items) if items.is_empty() => None,
        Value::Array(items) => Some(Value::Array(items.into_iter().filter_map(prune).collect())),
        Value::Object(map) => {
            let map: Map<String, Value> = map.into_iter().filter_map(|(k, v)| Some((k, prune(v)?))).collect();
            (!map.is_empty()).then_some(Value::Object(map))
        }
        other => Some(other),
    }
}

/// k8s-rs-pb's serde form is not quite Kubernetes' JSON: unset fields are nulls, empty maps and
/// lists are present, `type` is `type_`, and bytes are lists of numbers. The kind's schema tells
/// messages from maps, so this walks both together: nulls and empty maps and lists go (upstream
/// omits them), an empty message stays `{}` (`emptyDir: {}`), fields the schema does not know
/// go, and bytes (`format: byte`) become base64.
fn fix_up(resource: &Resource, value: Value) -> Value {
    let schemas = crate::schema::schemas();
    let root = schemas.definitions.get(schemas.root(resource)).unwrap_or(&Value::Null);
    walk(schemas, root, value, 0).unwrap_or(Value::Object(Map::new()))
}

/// Go's zero time, which upstream writes as null (and omits).
const ZERO_TIME: &str = "1970-01-01T00:00:00Z";

/// Go's protobuf encoder writes every plain (non-pointer) field, zero or not, where its JSON
/// encoder omits zero values (`omitempty`); a pointer field is written only when set, and then
/// a zero means something (`replicas: 0`, `backoffLimit: 0`, `automountServiceAccountToken:
/// false`). A message does not say which is which, so zero values are dropped unless the
/// schema requires the field or it is one of these pointer fields of the built-in kinds.
const POINTER_FIELDS: &[&str] = &[
    "activeDeadlineSeconds",
    "allowPrivilegeEscalation",
    "automountServiceAccountToken",
    "backoffLimit",
    "backoffLimitPerIndex",
    "completions",
    "defaultMode",
    "enableServiceLinks",
    "expirationSeconds",
    "failedJobsHistoryLimit",
    "fsGroup",
    "hostUsers",
    "immutable",
    "leaseDurationSeconds",
    "leaseTransitions",
    "maxFailedIndexes",
    "mode",
    "optional",
    "parallelism",
    "partition",
    "priority",
    "privileged",
    "progressDeadlineSeconds",
    "readOnlyRootFilesystem",
    // An EndpointSlice endpoint's conditions.
    "ready",
    "replicas",
    "revisionHistoryLimit",
    "runAsGroup",
    "runAsNonRoot",
    "runAsUser",
    "serving",
    "setHostnameAsFQDN",
    "shareProcessNamespace",
    "startingDeadlineSeconds",
    "successfulJobsHistoryLimit",
    "suspend",
    "terminationGracePeriodSeconds",
    "terminating",
    "tolerationSeconds",
    "ttlSecondsAfterFinished",
];

fn is_zero(value: &Value) -> bool {
    match value {
        Value::String(s) => s.is_empty(),
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Bool(b) => !b,
        _ => false,
    }
}

fn walk(schemas: &crate::schema::Schemas, schema: &Value, value: Value, depth: usize) -> Option<Value> {
    if depth > 100 {
        return None;
    }
    let schema = schemas.resolve(schema);
    match value {
        Value::Null => None,
        Value::Object(map) => {
            if let Some(Value::Object(properties)) = schema.get("properties") {
                // A message: its keys are struct fields. A field the schema does not know but
                // that holds a message is an embedded one, whose fields JSON inlines
                // (`IngressRule.ingressRuleValue`, `Volume.volumeSource`, ...).
                let mut object = Map::new();
                let mut fields: Vec<(String, Value)> = map.into_iter().collect();
                while let Some((key, field)) = fields.pop() {
                    // rust-protobuf names `type` `type_`.
                    let mut name = key.strip_suffix('_').unwrap_or(&key).to_string();
                    // A few generated fields keep Go's capital (`ValidatingWebhookConfiguration.Webhooks`).
                    if !properties.contains_key(&name)
                        && let Some(first) = name.chars().next().filter(char::is_ascii_uppercase)
                    {
                        name.replace_range(..1, &first.to_ascii_lowercase().to_string());
                    }
                    let Some(property) = properties.get(&name) else {
                        if let Value::Object(inner) = field {
                            fields.extend(inner);
                        }
                        continue;
                    };
                    let Some(field) = walk(schemas, property, field, depth + 1) else { continue };
                    let required = schema
                        .get("required")
                        .and_then(Value::as_array)
                        .is_some_and(|r| r.iter().any(|n| n.as_str() == Some(&name)));
                    if is_zero(&field) && !required && !POINTER_FIELDS.contains(&name.as_str()) {
                        continue;
                    }
                    if field.as_str() == Some(ZERO_TIME) {
                        continue;
                    }
                    object.insert(name, field);
                }
                Some(Value::Object(object))
            } else if map.is_empty() {
                // An empty map (a set message always has its keys, if only with nulls).
                None
            } else if let Some(bytes) = raw_bytes(&map) {
                // A RawExtension (`ControllerRevision.data`) or FieldsV1 (`managedFields`): the
                // message's one field holds JSON, which is what the object holds there.
                serde_json::from_slice(&bytes).ok()
            } else {
                let values = schema.get("additionalProperties").unwrap_or(&Value::Null);
                let object: Map<String, Value> = map
                    .into_iter()
                    .filter_map(|(key, field)| walk(schemas, values, field, depth + 1).map(|field| (key, field)))
                    .collect();
                Some(Value::Object(object))
            }
        }
        Value::Array(items) if schema.get("format").and_then(Value::as_str) == Some("byte") => {
            let bytes: Vec<u8> = items.iter().filter_map(Value::as_u64).map(|b| b as u8).collect();
            Some(Value::String(base64::engine::general_purpose::STANDARD.encode(bytes)))
        }
        Value::Array(items) if items.is_empty() => None,
        Value::Array(items) => {
            let item_schema = schema.get("items").unwrap_or(&Value::Null);
            Some(Value::Array(
                items.into_iter().filter_map(|item| walk(schemas, item_schema, item, depth + 1)).collect(),
            ))
        }
        other => Some(other),
    }
}

/// The bytes of a message whose only field is `raw` (k8s-rs-pb's serde form of RawExtension
/// and JSON, `{"raw": [123, 34, …]}`; FieldsV1's is `Raw`).
fn raw_bytes(map: &Map<String, Value>) -> Option<Vec<u8>> {
    if map.len() != 1 {
        return None;
    }
    let items = map.get("raw").or_else(|| map.get("Raw"))?.as_array()?;
    items.iter().map(|item| item.as_u64().and_then(|b| u8::try_from(b).ok())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use protobuf::Message;

    #[test]
    fn raw_extensions_and_managed_fields_decode_to_the_json_they_hold() {
        use k8s_rs_pb::api::apps::v1::ControllerRevision;
        use k8s_rs_pb::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry, ObjectMeta};
        use k8s_rs_pb::apimachinery::pkg::runtime::RawExtension;
        let data = r#"{"spec":{"template":{"$patch":"replace","spec":{"terminationGracePeriodSeconds":30}}}}"#;
        let mut revision = ControllerRevision::new();
        let mut meta = ObjectMeta::new();
        meta.name = Some("web-1".into());
        let mut entry = ManagedFieldsEntry::new();
        entry.manager = Some("e2e".into());
        entry.fieldsType = Some("FieldsV1".into());
        let mut fields = FieldsV1::new();
        fields.Raw = Some(br#"{"f:data":{},"f:revision":{}}"#.to_vec());
        entry.fieldsV1 = protobuf::MessageField::some(fields);
        meta.managedFields = vec![entry];
        revision.metadata = protobuf::MessageField::some(meta);
        let mut raw = RawExtension::new();
        raw.raw = Some(data.as_bytes().to_vec());
        revision.data = protobuf::MessageField::some(raw);
        revision.revision = Some(2);
        let object = decode(&envelope("apps/v1", "ControllerRevision", &revision)).unwrap();
        assert_eq!(object["data"], serde_json::from_str::<Value>(data).unwrap());
        assert_eq!(object["revision"], 2);
        assert_eq!(
            object["metadata"]["managedFields"][0]["fieldsV1"],
            serde_json::json!({"f:data": {}, "f:revision": {}})
        );
    }

    /// An envelope like kubectl's for `message`.
    fn envelope(api_version: &str, kind: &str, message: &impl Message) -> Vec<u8> {
        use k8s_rs_pb::apimachinery::pkg::runtime::{TypeMeta, Unknown};
        let mut unknown = Unknown::new();
        let mut type_meta = TypeMeta::new();
        type_meta.apiVersion = Some(api_version.into());
        type_meta.kind = Some(kind.into());
        unknown.typeMeta = protobuf::MessageField::some(type_meta);
        unknown.raw = Some(message.write_to_bytes().unwrap());
        let mut body = MAGIC.to_vec();
        body.extend(unknown.write_to_bytes().unwrap());
        body
    }

    #[test]
    fn a_definitions_schema_decodes_to_json_schema() {
        use k8s_rs_pb::apiextensions_apiserver::pkg::apis::apiextensions::v1 as ext;
        let json = |text: &str| {
            let mut value = ext::JSON::new();
            value.raw = Some(text.as_bytes().to_vec());
            value
        };
        let mut name = ext::JSONSchemaProps::new();
        name.type_ = Some("string".into());
        name.enum_ = vec![json("\"a\""), json("\"b\"")];
        name.default = protobuf::MessageField::some(json("\"a\""));
        name.nullable = Some(false);
        let mut item = ext::JSONSchemaProps::new();
        item.type_ = Some("object".into());
        item.properties.insert("name".into(), name);
        item.required = vec!["name".into()];
        item.xKubernetesEmbeddedResource = Some(false);
        let mut items = ext::JSONSchemaPropsOrArray::new();
        items.schema = protobuf::MessageField::some(item);
        let mut list = ext::JSONSchemaProps::new();
        list.type_ = Some("array".into());
        list.items = protobuf::MessageField::some(items);
        list.maxItems = Some(0);
        list.xKubernetesListType = Some("map".into());
        list.xKubernetesListMapKeys = vec!["name".into()];
        let mut free = ext::JSONSchemaProps::new();
        free.type_ = Some("object".into());
        free.xKubernetesPreserveUnknownFields = Some(true);
        let mut root = ext::JSONSchemaProps::new();
        root.type_ = Some("object".into());
        root.properties.insert("list".into(), list);
        root.properties.insert("free".into(), free);
        let mut validation = ext::CustomResourceValidation::new();
        validation.openAPIV3Schema = protobuf::MessageField::some(root);
        let mut version = ext::CustomResourceDefinitionVersion::new();
        version.name = Some("v1".into());
        version.served = Some(true);
        version.storage = Some(true);
        version.schema = protobuf::MessageField::some(validation);
        let mut spec = ext::CustomResourceDefinitionSpec::new();
        spec.group = Some("example.com".into());
        spec.versions.push(version);
        let mut crd = ext::CustomResourceDefinition::new();
        crd.spec = protobuf::MessageField::some(spec);
        let decoded = decode(&envelope("apiextensions.k8s.io/v1", "CustomResourceDefinition", &crd)).unwrap();
        let schema = &decoded["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        assert_eq!(
            *schema,
            serde_json::json!({"type": "object", "properties": {
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "list": {"type": "array", "maxItems": 0, "x-kubernetes-list-type": "map",
                    "x-kubernetes-list-map-keys": ["name"], "items": {"type": "object", "required": ["name"],
                    "properties": {"name": {"type": "string", "enum": ["a", "b"], "default": "a"}}}},
            }})
        );
        assert_eq!(decoded["spec"]["versions"][0]["served"], true);
    }

    #[test]
    fn options_and_subresource_bodies_decode_in_any_group() {
        use k8s_rs_pb::apimachinery::pkg::apis::meta::v1::{DeleteOptions, Preconditions};
        let mut options = DeleteOptions::new();
        options.gracePeriodSeconds = Some(0);
        options.propagationPolicy = Some("Foreground".into());
        let mut preconditions = Preconditions::new();
        preconditions.uid = Some("u-1".into());
        options.preconditions = protobuf::MessageField::some(preconditions);
        // A typed client sends its options in its own group version.
        for api_version in ["v1", "apps/v1", "batch/v1"] {
            let decoded = decode(&envelope(api_version, "DeleteOptions", &options)).unwrap();
            assert_eq!(decoded["gracePeriodSeconds"], 0, "a zero grace period is a force delete: kept");
            assert_eq!(decoded["propagationPolicy"], "Foreground");
            assert_eq!(decoded["preconditions"]["uid"], "u-1");
            assert!(decoded.get("dryRun").is_none() && decoded.get("orphanDependents").is_none(), "{decoded}");
        }
        let mut eviction = k8s_rs_pb::api::policy::v1::Eviction::new();
        eviction.deleteOptions = protobuf::MessageField::some(options);
        let decoded = decode(&envelope("policy/v1", "Eviction", &eviction)).unwrap();
        assert_eq!(
            (decoded["kind"].as_str(), decoded["deleteOptions"]["gracePeriodSeconds"].as_i64()),
            (Some("Eviction"), Some(0))
        );
    }

    #[test]
    fn a_pods_env_from_keeps_its_references() {
        use k8s_rs_pb::api::core::v1::{Container, EnvFromSource, LocalObjectReference, Pod, PodSpec, SecretEnvSource};
        let mut secret = SecretEnvSource::new();
        let mut reference = LocalObjectReference::new();
        reference.name = Some("s".into());
        secret.localObjectReference = Some(reference).into();
        let mut from = EnvFromSource::new();
        from.secretRef = Some(secret).into();
        from.prefix = Some("p-".into());
        let mut container = Container::new();
        container.name = Some("c".into());
        container.envFrom.push(from);
        let mut spec = PodSpec::new();
        spec.containers.push(container);
        let mut pod = Pod::new();
        pod.spec = Some(spec).into();
        let json = decode(&envelope("v1", "Pod", &pod)).unwrap();
        assert_eq!(
            json["spec"]["containers"][0]["envFrom"],
            serde_json::json!([{"prefix": "p-", "secretRef": {"name": "s"}}])
        );
    }

    #[test]
    fn a_budget_keeps_its_int_or_string_percentages() {
        use k8s_rs_pb::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
        use k8s_rs_pb::apimachinery::pkg::apis::meta::v1::ObjectMeta;
        use k8s_rs_pb::apimachinery::pkg::util::intstr::IntOrString;
        let mut budget = PodDisruptionBudget::new();
        let mut metadata = ObjectMeta::new();
        metadata.name = Some("foo2".into());
        budget.metadata = Some(metadata).into();
        let mut spec = PodDisruptionBudgetSpec::new();
        let mut min = IntOrString::new();
        min.type_ = Some(1);
        min.strVal = Some("1%".into());
        // Go writes every plain field, a zero intVal too.
        min.intVal = Some(0);
        spec.minAvailable = Some(min).into();
        budget.spec = Some(spec).into();
        let json = decode(&envelope("policy/v1", "PodDisruptionBudget", &budget)).unwrap();
        assert_eq!(json["spec"]["minAvailable"], "1%", "{json}");
    }

    #[test]
    fn a_deployment_decodes_to_the_json_kubectl_would_have_sent() {
        use k8s_rs_pb::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment};
        use k8s_rs_pb::api::core::v1::{Container, ContainerPort, PodSpec, PodTemplateSpec, ResourceRequirements};
        use k8s_rs_pb::apimachinery::pkg::api::resource::Quantity;
        use k8s_rs_pb::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
        use k8s_rs_pb::apimachinery::pkg::util::intstr::IntOrString;

        let mut deployment = Deployment::new();
        let mut metadata = ObjectMeta::new();
        metadata.name = Some("web".into());
        metadata.labels.insert("app".into(), "web".into());
        deployment.metadata = Some(metadata).into();
        let mut spec = DeploymentSpec::new();
        spec.replicas = Some(3);
        let mut selector = LabelSelector::new();
        selector.matchLabels.insert("app".into(), "web".into());
        spec.selector = Some(selector).into();
        let mut strategy = DeploymentStrategy::new();
        let mut rolling = RollingUpdateDeployment::new();
        let mut surge = IntOrString::new();
        surge.type_ = Some(1);
        surge.strVal = Some("25%".into());
        rolling.maxSurge = Some(surge).into();
        let mut unavailable = IntOrString::new();
        unavailable.type_ = Some(0);
        unavailable.intVal = Some(1);
        rolling.maxUnavailable = Some(unavailable).into();
        strategy.rollingUpdate = Some(rolling).into();
        spec.strategy = Some(strategy).into();
        let mut template = PodTemplateSpec::new();
        let mut pod_spec = PodSpec::new();
        let mut container = Container::new();
        container.name = Some("nginx".into());
        container.image = Some("nginx:1.27".into());
        let mut port = ContainerPort::new();
        port.containerPort = Some(80);
        container.ports.push(port);
        let mut resources = ResourceRequirements::new();
        let mut cpu = Quantity::new();
        cpu.string = Some("100m".into());
        resources.limits.insert("cpu".into(), cpu);
        container.resources = Some(resources).into();
        pod_spec.containers.push(container);
        template.spec = Some(pod_spec).into();
        template.metadata = Some(ObjectMeta::new()).into();
        spec.template = Some(template).into();
        deployment.spec = Some(spec).into();

        let json = decode(&envelope("apps/v1", "Deployment", &deployment)).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "apiVersion": "apps/v1", "kind": "Deployment",
                "metadata": {"name": "web", "labels": {"app": "web"}},
                "spec": {
                    "replicas": 3,
                    "selector": {"matchLabels": {"app": "web"}},
                    "strategy": {"rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 1}},
                    "template": {"metadata": {}, "spec": {"containers": [{
                        "name": "nginx", "image": "nginx:1.27", "ports": [{"containerPort": 80}],
                        "resources": {"limits": {"cpu": "100m"}}}]}},
                },
            })
        );
    }

    #[test]
    fn zero_values_go_as_go_would_omit_them_but_zero_replicas_stay() {
        use k8s_rs_pb::api::apps::v1::{Deployment, DeploymentSpec, DeploymentStrategy};
        use k8s_rs_pb::api::core::v1::{Container, ContainerPort, PodSpec, PodTemplateSpec};
        use k8s_rs_pb::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
        let mut deployment = Deployment::new();
        let mut metadata = ObjectMeta::new();
        metadata.name = Some("web".into());
        metadata.generateName = Some(String::new());
        metadata.creationTimestamp = Some(Time::new()).into();
        deployment.metadata = Some(metadata).into();
        let mut spec = DeploymentSpec::new();
        spec.replicas = Some(0);
        spec.paused = Some(false);
        let mut strategy = DeploymentStrategy::new();
        strategy.type_ = Some(String::new());
        spec.strategy = Some(strategy).into();
        let mut template = PodTemplateSpec::new();
        let mut pod_spec = PodSpec::new();
        let mut container = Container::new();
        container.name = Some("nginx".into());
        container.tty = Some(false);
        let mut port = ContainerPort::new();
        port.containerPort = Some(80);
        port.hostPort = Some(0);
        port.protocol = Some(String::new());
        container.ports.push(port);
        pod_spec.containers.push(container);
        template.spec = Some(pod_spec).into();
        spec.template = Some(template).into();
        deployment.spec = Some(spec).into();
        let json = decode(&envelope("apps/v1", "Deployment", &deployment)).unwrap();
        assert_eq!(json["metadata"], serde_json::json!({"name": "web"}));
        assert_eq!(json["spec"]["replicas"], 0);
        assert!(json["spec"].get("paused").is_none());
        assert_eq!(json["spec"]["strategy"], serde_json::json!({}));
        assert_eq!(
            json["spec"]["template"]["spec"]["containers"][0],
            serde_json::json!({"name": "nginx", "ports": [{"containerPort": 80}]})
        );
    }

    #[test]
    fn a_leases_zero_transitions_and_an_endpoints_false_conditions_stay() {
        use k8s_rs_pb::api::coordination::v1::{Lease, LeaseSpec};
        use k8s_rs_pb::api::discovery::v1::{Endpoint, EndpointConditions, EndpointSlice};
        use k8s_rs_pb::apimachinery::pkg::apis::meta::v1::ObjectMeta;
        let mut lease = Lease::new();
        let mut metadata = ObjectMeta::new();
        metadata.name = Some("lock".into());
        lease.metadata = Some(metadata.clone()).into();
        let mut spec = LeaseSpec::new();
        spec.holderIdentity = Some("me".into());
        spec.leaseTransitions = Some(0);
        spec.leaseDurationSeconds = Some(0);
        lease.spec = Some(spec).into();
        let json = decode(&envelope("coordination.k8s.io/v1", "Lease", &lease)).unwrap();
        assert_eq!(
            json["spec"],
            serde_json::json!({"holderIdentity": "me", "leaseTransitions": 0, "leaseDurationSeconds": 0})
        );
        let mut slice = EndpointSlice::new();
        slice.metadata = Some(metadata).into();
        slice.addressType = Some("IPv4".into());
        let mut endpoint = Endpoint::new();
        endpoint.addresses.push("10.0.0.1".into());
        let mut conditions = EndpointConditions::new();
        conditions.ready = Some(false);
        conditions.serving = Some(true);
        conditions.terminating = Some(false);
        endpoint.conditions = Some(conditions).into();
        slice.endpoints.push(endpoint);
        let json = decode(&envelope("discovery.k8s.io/v1", "EndpointSlice", &slice)).unwrap();
        assert_eq!(
            json["endpoints"][0]["conditions"],
            serde_json::json!({"ready": false, "serving": true, "terminating": false})
        );
    }

    #[test]
    fn secrets_keep_their_bytes_as_base64_and_reviews_decode() {
        use k8s_rs_pb::api::core::v1::Secret;
        let mut secret = Secret::new();
        secret.data.insert("password".into(), b"hunter2".to_vec());
        secret.type_ = Some("Opaque".into());
        let json = decode(&envelope("v1", "Secret", &secret)).unwrap();
        assert_eq!(json["data"]["password"], "aHVudGVyMg==");
        assert_eq!(json["type"], "Opaque");

        use k8s_rs_pb::api::authorization::v1::{
            ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
        };
        let mut review = SelfSubjectAccessReview::new();
        let mut spec = SelfSubjectAccessReviewSpec::new();
        let mut attributes = ResourceAttributes::new();
        attributes.verb = Some("create".into());
        attributes.resource = Some("pods".into());
        spec.resourceAttributes = Some(attributes).into();
        review.spec = Some(spec).into();
        let json = decode(&envelope("authorization.k8s.io/v1", "SelfSubjectAccessReview", &review)).unwrap();
        assert_eq!(json["spec"]["resourceAttributes"]["verb"], "create");
    }

    #[test]
    fn webhook_configurations_decode_as_their_json() {
        use k8s_rs_pb::api::admissionregistration::v1::{
            Rule, RuleWithOperations, ServiceReference, ValidatingWebhook, ValidatingWebhookConfiguration,
            WebhookClientConfig,
        };
        use k8s_rs_pb::apimachinery::pkg::apis::meta::v1::LabelSelector;
        let mut configuration = ValidatingWebhookConfiguration::new();
        let mut webhook = ValidatingWebhook::new();
        webhook.name = Some("deny.example.com".into());
        let mut rule = RuleWithOperations::new();
        rule.operations = vec!["CREATE".into()];
        let mut inner = Rule::new();
        inner.apiGroups = vec!["".into()];
        inner.apiVersions = vec!["v1".into()];
        inner.resources = vec!["configmaps".into()];
        rule.rule = Some(inner).into();
        webhook.rules.push(rule);
        let mut config = WebhookClientConfig::new();
        let mut service = ServiceReference::new();
        service.namespace = Some("ns".into());
        service.name = Some("svc".into());
        service.port = Some(8443);
        config.service = Some(service).into();
        config.caBundle = Some(b"PEM".to_vec());
        webhook.clientConfig = Some(config).into();
        let mut selector = LabelSelector::new();
        selector.matchLabels.insert("a".into(), "true".into());
        webhook.namespaceSelector = Some(selector).into();
        webhook.objectSelector = Some(LabelSelector::new()).into();
        webhook.timeoutSeconds = Some(5);
        webhook.failurePolicy = Some("Ignore".into());
        webhook.sideEffects = Some("None".into());
        webhook.admissionReviewVersions = vec!["v1".into()];
        configuration.Webhooks.push(webhook);
        let json =
            decode(&envelope("admissionregistration.k8s.io/v1", "ValidatingWebhookConfiguration", &configuration))
                .unwrap();
        let webhook = &json["webhooks"][0];
        assert_eq!(
            webhook["rules"][0],
            serde_json::json!({"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["configmaps"]})
        );
        assert_eq!(webhook["clientConfig"]["service"]["port"], 8443);
        assert_eq!(webhook["clientConfig"]["caBundle"], "UEVN");
        assert_eq!(webhook["namespaceSelector"], serde_json::json!({"matchLabels": {"a": "true"}}));
        assert_eq!(webhook["objectSelector"], serde_json::json!({}));
    }

    #[test]
    fn embedded_messages_are_inlined_as_json_has_them() {
        use k8s_rs_pb::api::core::v1::{EmptyDirVolumeSource, Pod, PodSpec, Volume, VolumeSource};
        let mut pod = Pod::new();
        let mut spec = PodSpec::new();
        let mut volume = Volume::new();
        volume.name = Some("scratch".into());
        let mut source = VolumeSource::new();
        source.emptyDir = Some(EmptyDirVolumeSource::new()).into();
        volume.volumeSource = Some(source).into();
        spec.volumes.push(volume);
        pod.spec = Some(spec).into();
        let json = decode(&envelope("v1", "Pod", &pod)).unwrap();
        assert_eq!(json["spec"]["volumes"][0], serde_json::json!({"name": "scratch", "emptyDir": {}}));

        use k8s_rs_pb::api::networking::v1::{
            HTTPIngressPath, HTTPIngressRuleValue, Ingress, IngressRule, IngressRuleValue, IngressSpec,
        };
        let mut ingress = Ingress::new();
        let mut spec = IngressSpec::new();
        let mut rule = IngressRule::new();
        rule.host = Some("shop.example.com".into());
        let mut http = HTTPIngressRuleValue::new();
        let mut path = HTTPIngressPath::new();
        path.path = Some("/".into());
        path.pathType = Some("Prefix".into());
        http.paths.push(path);
        let mut value = IngressRuleValue::new();
        value.http = Some(http).into();
        rule.ingressRuleValue = Some(value).into();
        spec.rules.push(rule);
        ingress.spec = Some(spec).into();
        let json = decode(&envelope("networking.k8s.io/v1", "Ingress", &ingress)).unwrap();
        assert_eq!(json["spec"]["rules"][0]["http"]["paths"][0]["pathType"], "Prefix");
        assert_eq!(json["spec"]["rules"][0]["host"], "shop.example.com");
    }

    #[test]
    fn a_timestamp_out_of_range_is_refused_not_a_panic() {
        use k8s_rs_pb::api::core::v1::ConfigMap;
        use k8s_rs_pb::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
        let mut config_map = ConfigMap::new();
        let mut metadata = ObjectMeta::new();
        let mut time = Time::new();
        time.seconds = Some(i64::MAX);
        metadata.creationTimestamp = Some(time).into();
        config_map.metadata = Some(metadata).into();
        assert_eq!(decode(&envelope("v1", "ConfigMap", &config_map)).unwrap_err().code, 400);
    }

    #[test]
    fn mangled_envelopes_never_panic() {
        use k8s_rs_pb::api::core::v1::{Container, Pod, PodSpec};
        let mut pod = Pod::new();
        let mut spec = PodSpec::new();
        let mut container = Container::new();
        container.name = Some("web".into());
        container.image = Some("nginx".into());
        spec.containers.push(container);
        pod.spec = Some(spec).into();
        let valid = envelope("v1", "Pod", &pod);
        let mut state = 0x5eed_0004_u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..5000 {
            let mut body = valid.clone();
            for _ in 0..1 + next() % 4 {
                let at = 4 + (next() as usize) % (body.len() - 4);
                body[at] = next() as u8;
            }
            body.truncate(4 + (next() as usize) % (body.len() - 3));
            let _ = decode(&body);
        }
    }

    #[test]
    fn bad_envelopes_are_refused_with_a_status() {
        assert_eq!(decode(b"{}").unwrap_err().code, 400);
        assert_eq!(decode(b"k8s\0\xff\xff\xff").unwrap_err().code, 400);
        let secret = k8s_rs_pb::api::core::v1::Secret::new();
        assert_eq!(decode(&envelope("nope/v9", "Secret", &secret)).unwrap_err().code, 415);
        assert_eq!(decode(&envelope("v1", "NoSuchKind", &secret)).unwrap_err().code, 415);
    }
}
