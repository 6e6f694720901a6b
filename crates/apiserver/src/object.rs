//! Objects as generic JSON: decoding request bodies, the metadata the server owns (uid,
//! creationTimestamp, resourceVersion, generation), and validation with field paths.

use std::sync::atomic::{AtomicI64, Ordering};

use serde_json::{Value, json};

use crate::registry::{Resource, Strategy};
use crate::status::{ApiError, Cause};

/// Decodes a request body: JSON, or YAML when the content type says so.
pub fn decode_body(content_type: &str, body: &[u8]) -> Result<Value, ApiError> {
    let media = content_type.split(';').next().unwrap_or("").trim();
    let value: Value = match media {
        "" | "application/json" | "*/*" => serde_json::from_slice(body)
            .map_err(|e| ApiError::bad_request(format!("the body of the request is not valid JSON: {e}")))?,
        "application/yaml" | "application/x-yaml" | "text/yaml" => {
            let text = std::str::from_utf8(body)
                .map_err(|_| ApiError::bad_request("the body of the request is not valid UTF-8 YAML"))?;
            serde_saphyr::from_str(text).map_err(|e| yaml_error(&e.to_string()))?
        }
        "application/vnd.kubernetes.protobuf" => crate::protobuf::decode(body)?,
        other => return Err(ApiError::unsupported_media_type(other)),
    };
    if !value.is_object() {
        return Err(ApiError::bad_request("the body of the request must be a JSON or YAML object"));
    }
    Ok(value)
}

/// A YAML body that does not decode; a key given twice in a mapping is worded as upstream's
/// decoder words it (`yaml: unmarshal errors: line 9: key "foo" already set in map`).
fn yaml_error(message: &str) -> ApiError {
    let duplicate = message.split_once(": duplicate mapping key: ").and_then(|(at, rest)| {
        let line = at.rsplit("line ").next()?.split_whitespace().next()?.parse::<u64>().ok()?;
        let key = rest.split([',', '\n']).next()?.trim();
        Some((line, key.to_string()))
    });
    match duplicate {
        Some((line, key)) => ApiError::bad_request(format!(
            "error decoding YAML: yaml: unmarshal errors:\n  line {line}: key {key:?} already set in map"
        )),
        None => ApiError::bad_request(format!("the body of the request is not valid YAML: {message}")),
    }
}

/// The fields a JSON body names twice in one object (`spec.replicas`, `a.b[0].c`), which
/// upstream's strict decoding reports (the last one wins when decoding). Empty for anything
/// that is not JSON.
pub fn duplicate_fields(content_type: &str, body: &[u8]) -> Vec<String> {
    use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
    use std::cell::RefCell;
    struct Walk<'a> {
        path: String,
        found: &'a RefCell<Vec<String>>,
    }
    impl<'de> DeserializeSeed<'de> for Walk<'_> {
        type Value = ();
        fn deserialize<D: serde::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
            deserializer.deserialize_any(self)
        }
    }
    impl<'de> Visitor<'de> for Walk<'_> {
        type Value = ();
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }
        fn visit_bool<E>(self, _: bool) -> Result<(), E> {
            Ok(())
        }
        fn visit_i64<E>(self, _: i64) -> Result<(), E> {
            Ok(())
        }
        fn visit_u64<E>(self, _: u64) -> Result<(), E> {
            Ok(())
        }
        fn visit_f64<E>(self, _: f64) -> Result<(), E> {
            Ok(())
        }
        fn visit_str<E>(self, _: &str) -> Result<(), E> {
            Ok(())
        }
        fn visit_unit<E>(self) -> Result<(), E> {
            Ok(())
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<std::borrow::Cow<str>>()? {
                let path = if self.path.is_empty() { key.to_string() } else { format!("{}.{key}", self.path) };
                if !seen.insert(key.into_owned()) {
                    self.found.borrow_mut().push(path.clone());
                }
                map.next_value_seed(Walk { path, found: self.found })?;
            }
            Ok(())
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
            let mut index = 0;
            while seq.next_element_seed(Walk { path: format!("{}[{index}]", self.path), found: self.found })?.is_some()
            {
                index += 1;
            }
            Ok(())
        }
    }
    let media = content_type.split(';').next().unwrap_or("").trim();
    if !matches!(media, "" | "application/json" | "*/*") {
        return Vec::new();
    }
    let found = RefCell::new(Vec::new());
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    let _ = Walk { path: String::new(), found: &found }.deserialize(&mut deserializer);
    found.into_inner()
}

/// RFC 3339 in UTC with seconds, as Kubernetes writes timestamps.
pub fn now_rfc3339() -> String {
    let now = time::OffsetDateTime::now_utc();
    let format = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    now.format(&format).unwrap_or_default()
}

/// `a-b.c`: a DNS-1123 subdomain (most object names).
fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253
        && !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                && !label.starts_with('-')
                && !label.ends_with('-')
        })
}

/// `a-b`: a DNS-1123 label (namespace, service names).
pub fn is_dns_label(name: &str) -> bool {
    name.len() <= 63 && !name.contains('.') && is_dns_subdomain(name)
}

/// Any name that can be one segment of a path (RBAC objects, as upstream: `system:node`).
fn is_path_segment(name: &str) -> bool {
    !name.is_empty() && name != "." && name != ".." && !name.contains('/') && !name.contains('%')
}

fn name_rule(resource: &Resource) -> (fn(&str) -> bool, &'static str) {
    match resource.builtin() {
        "roles" | "rolebindings" | "clusterroles" | "clusterrolebindings" | "certificatesigningrequests" => {
            (is_path_segment, "may not be '.' or '..' and may not contain '/' or '%'")
        }
        "namespaces" | "services" => (
            is_dns_label,
            "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
        ),
        _ => (
            is_dns_subdomain,
            "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
        ),
    }
}

fn check_string_map(object: &Value, path: &str, causes: &mut Vec<Cause>) {
    let value = &object["metadata"][path];
    match value {
        Value::Null => {}
        Value::Object(map) => {
            for (key, v) in map {
                if !v.is_string() {
                    causes.push(Cause {
                        reason: "FieldValueInvalid",
                        message: "Invalid value: values must be strings".into(),
                        field: format!("metadata.{path}.{key}"),
                    });
                }
                let name = key.rsplit('/').next().unwrap_or(key);
                let valid_name = !name.is_empty()
                    && name.len() <= 63
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                    && name.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && name.ends_with(|c: char| c.is_ascii_alphanumeric());
                if !valid_name || key.matches('/').count() > 1 {
                    causes.push(Cause {
                        reason: "FieldValueInvalid",
                        message: format!("Invalid value: {key:?}: name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"),
                        field: format!("metadata.{path}"),
                    });
                }
            }
            if path == "labels" {
                for (key, v) in map {
                    let Some(v) = v.as_str() else { continue };
                    let valid = v.len() <= 63
                        && v.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                        && (v.is_empty()
                            || (v.starts_with(|c: char| c.is_ascii_alphanumeric())
                                && v.ends_with(|c: char| c.is_ascii_alphanumeric())));
                    if !valid {
                        causes.push(Cause {
                            reason: "FieldValueInvalid",
                            message: format!("Invalid value: {v:?}: a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"),
                            field: format!("metadata.labels.{key}"),
                        });
                    }
                }
            }
        }
        _ => causes.push(Cause {
            reason: "FieldValueInvalid",
            message: "Invalid value: must be a map of strings".into(),
            field: format!("metadata.{path}"),
        }),
    }
}

/// Validation of what every object shares, and its kind's (`Strategy::validate_fields`).
pub fn validate(resource: &Resource, object: &Value) -> Result<(), ApiError> {
    let mut causes = Vec::new();
    let name = object["metadata"]["name"].as_str().unwrap_or("");
    let (rule, explanation) = name_rule(resource);
    if name.is_empty() {
        causes.push(Cause {
            reason: "FieldValueRequired",
            message: "Required value: name or generateName is required".into(),
            field: "metadata.name".into(),
        });
    } else if !rule(name) {
        causes.push(Cause {
            reason: "FieldValueInvalid",
            message: format!("Invalid value: {name:?}: {explanation}"),
            field: "metadata.name".into(),
        });
    }
    check_string_map(object, "labels", &mut causes);
    check_string_map(object, "annotations", &mut causes);
    resource.strategy().validate_fields(object, &mut causes);
    if causes.is_empty() { Ok(()) } else { Err(ApiError::invalid(resource.group, resource.kind, name, causes)) }
}

/// An HPA's target and replica bounds, as upstream validates them.
fn validate_autoscaler(object: &Value, causes: &mut Vec<Cause>) {
    let spec = &object["spec"];
    let mut cause = |reason: &'static str, field: &str, message: String| {
        causes.push(Cause { reason, message, field: field.into() });
    };
    for key in ["kind", "name"] {
        if spec["scaleTargetRef"][key].as_str().is_none_or(str::is_empty) {
            cause("FieldValueRequired", &format!("spec.scaleTargetRef.{key}"), "Required value".into());
        }
    }
    let (min, max) = (spec["minReplicas"].as_i64().unwrap_or(1), spec["maxReplicas"].as_i64().unwrap_or(0));
    if min < 1 {
        cause(
            "FieldValueInvalid",
            "spec.minReplicas",
            format!("Invalid value: {min}: must be greater than or equal to 1"),
        );
    }
    if max < min.max(1) {
        cause(
            "FieldValueInvalid",
            "spec.maxReplicas",
            format!("Invalid value: {max}: must be greater than or equal to `minReplicas`"),
        );
    }
}

/// The per-kind steps of `prepare_create`, `prepare_update` and `validate` (upstream's
/// strategies' PrepareForCreate, PrepareForUpdate and Validate); the write path's other
/// per-kind steps are in `strategy.rs`.
impl Strategy {
    /// Kind-specific fields of an object the server sets on create (after defaults).
    fn prepare_create(self, object: &mut Value) {
        match self {
            Strategy::Namespaces => {
                object["spec"] = json!({"finalizers": ["kubernetes"]});
                object["status"] = json!({"phase": "Active"});
            }
            Strategy::PersistentVolumes | Strategy::PersistentVolumeClaims => {
                object["status"] = json!({"phase": "Pending"});
            }
            Strategy::Pods if object["spec"].is_object() => {
                add_default_tolerations(&mut object["spec"]);
                let qos = qos_class(&object["spec"]);
                object["status"] = json!({"phase": "Pending", "qosClass": qos});
            }
            _ => {}
        }
    }

    /// Kind-specific rules of an update (after defaults): what may not change.
    fn prepare_update(self, resource: &Resource, old: &Value, object: &Value) -> Result<(), ApiError> {
        let name = old["metadata"]["name"].as_str().unwrap_or_default();
        let mut causes = Vec::new();
        match self {
            // An immutable ConfigMap or Secret keeps its data and stays immutable.
            Strategy::KeyedData if old["immutable"] == json!(true) => {
                let forbidden = |field: &str| Cause {
                    reason: "FieldValueForbidden",
                    message: "Forbidden: field is immutable when `immutable` is set".into(),
                    field: field.into(),
                };
                if object["immutable"] != json!(true) {
                    causes.push(forbidden("immutable"));
                }
                for field in ["data", "binaryData"] {
                    let empty = |v: &Value| v.is_null() || v.as_object().is_some_and(|m| m.is_empty());
                    let (before, after) = (&old[field], &object[field]);
                    if before != after && !(empty(before) && empty(after)) {
                        causes.push(forbidden(field));
                    }
                }
            }
            // A PriorityClass's value and preemption policy are fixed once made (upstream's words).
            Strategy::PriorityClasses => {
                if object["value"] != old["value"] {
                    causes.push(Cause {
                        reason: "FieldValueForbidden",
                        message: "Forbidden: may not be changed in an update.".into(),
                        field: "value".into(),
                    });
                }
                if object["preemptionPolicy"] != old["preemptionPolicy"] {
                    causes.push(Cause {
                        reason: "FieldValueInvalid",
                        message: format!("Invalid value: {}: field is immutable", object["preemptionPolicy"]),
                        field: "preemptionPolicy".into(),
                    });
                }
            }
            _ => {}
        }
        if causes.is_empty() { Ok(()) } else { Err(ApiError::invalid(resource.group, resource.kind, name, causes)) }
    }

    /// Kind-specific validation of an object's fields.
    fn validate_fields(self, object: &Value, causes: &mut Vec<Cause>) {
        match self {
            Strategy::Pods => validate_pod_spec(&object["spec"], "spec", causes),
            Strategy::NetworkPolicies => validate_network_policy(&object["spec"], causes),
            Strategy::KeyedData => validate_config_keys(object, causes),
            Strategy::HorizontalPodAutoscalers => validate_autoscaler(object, causes),
            _ => {}
        }
    }
}

/// A ConfigMap's or Secret's keys (`data`, `binaryData`, `stringData`), as upstream's
/// `IsConfigMapKey`: `[-._a-zA-Z0-9]+`, at most 253 characters, not `.` or `..`; a ConfigMap key
/// in both `data` and `binaryData` is a duplicate.
fn validate_config_keys(object: &Value, causes: &mut Vec<Cause>) {
    for field in ["data", "binaryData", "stringData"] {
        for key in object[field].as_object().into_iter().flatten().map(|(k, _)| k) {
            let mut invalid = |message: String| {
                causes.push(Cause {
                    reason: "FieldValueInvalid",
                    message: format!("Invalid value: {key:?}: {message}"),
                    field: format!("{field}[{key}]"),
                });
            };
            if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')) {
                invalid("a valid config key must consist of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')".into());
            } else if key.len() > 253 {
                invalid("must be no more than 253 characters".into());
            } else if key == "." || key == ".." {
                invalid(format!("must not be '{key}'"));
            } else if field == "binaryData" && object["data"].get(key).is_some() {
                invalid(format!("duplicate of key {key:?}"));
            }
        }
    }
}

fn validate_network_policy(spec: &Value, causes: &mut Vec<Cause>) {
    let mut invalid = |field: String, message: String| {
        causes.push(Cause { reason: "FieldValueInvalid", message, field });
    };
    for (i, kind) in spec["policyTypes"].as_array().into_iter().flatten().enumerate() {
        if !matches!(kind.as_str(), Some("Ingress" | "Egress")) {
            invalid(
                format!("spec.policyTypes[{i}]"),
                format!("Unsupported value: {kind}: supported values: \"Ingress\", \"Egress\""),
            );
        }
    }
    for (direction, peers) in [("ingress", "from"), ("egress", "to")] {
        for (i, rule) in spec[direction].as_array().into_iter().flatten().enumerate() {
            for (j, port) in rule["ports"].as_array().into_iter().flatten().enumerate() {
                let field = format!("spec.{direction}[{i}].ports[{j}]");
                if !matches!(port["protocol"].as_str(), None | Some("TCP" | "UDP" | "SCTP")) {
                    invalid(
                        format!("{field}.protocol"),
                        format!(
                            "Unsupported value: {}: supported values: \"TCP\", \"UDP\", \"SCTP\"",
                            port["protocol"]
                        ),
                    );
                }
                if let (Some(start), Some(end)) = (port["port"].as_i64(), port["endPort"].as_i64())
                    && end < start
                {
                    invalid(
                        format!("{field}.endPort"),
                        format!("Invalid value: {end}: must be greater than or equal to `port`"),
                    );
                }
            }
            for (j, peer) in rule[peers].as_array().into_iter().flatten().enumerate() {
                let Some(cidr) = peer["ipBlock"]["cidr"].as_str() else { continue };
                if !is_cidr(cidr) {
                    invalid(
                        format!("spec.{direction}[{i}].{peers}[{j}].ipBlock.cidr"),
                        format!(
                            "Invalid value: {cidr:?}: must be a valid CIDR value, (e.g. 10.9.8.0/24 or 2001:db8::/64)"
                        ),
                    );
                }
            }
        }
    }
}

/// `address/prefix`, IPv4 or IPv6.
fn is_cidr(text: &str) -> bool {
    let Some((address, prefix)) = text.split_once('/') else { return false };
    match (address.parse::<std::net::IpAddr>(), prefix.parse::<u8>()) {
        (Ok(address), Ok(prefix)) => prefix <= if address.is_ipv4() { 32 } else { 128 },
        _ => false,
    }
}

fn validate_pod_spec(spec: &Value, path: &str, causes: &mut Vec<Cause>) {
    validate_sysctls(spec, path, causes);
    let containers = spec["containers"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    if containers.is_empty() {
        causes.push(Cause {
            reason: "FieldValueRequired",
            message: "Required value".into(),
            field: format!("{path}.containers"),
        });
    }
    let mut seen = std::collections::BTreeSet::new();
    for (list, items) in
        [("initContainers", spec["initContainers"].as_array()), ("containers", Some(&containers.to_vec()))]
    {
        for (i, container) in items.map(Vec::as_slice).unwrap_or(&[]).iter().enumerate() {
            let field = format!("{path}.{list}[{i}]");
            match container["name"].as_str() {
                None | Some("") => causes.push(Cause {
                    reason: "FieldValueRequired",
                    message: "Required value".into(),
                    field: format!("{field}.name"),
                }),
                Some(name) if !is_dns_label(name) => causes.push(Cause {
                    reason: "FieldValueInvalid",
                    message: format!("Invalid value: {name:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"),
                    field: format!("{field}.name"),
                }),
                Some(name) => {
                    if !seen.insert(name.to_string()) {
                        causes.push(Cause {
                            reason: "FieldValueDuplicate",
                            message: format!("Duplicate value: {name:?}"),
                            field: format!("{field}.name"),
                        });
                    }
                }
            }
            if container["image"].as_str().is_none_or(str::is_empty) {
                causes.push(Cause {
                    reason: "FieldValueRequired",
                    message: "Required value".into(),
                    field: format!("{field}.image"),
                });
            }
        }
    }
}

/// Upstream's sysctl name rule (`IsValidSysctlName`): dot- or slash-separated segments of
/// lower case alphanumerics, `-` and `_`, each starting and ending alphanumeric; at most 253.
fn is_sysctl_name(name: &str) -> bool {
    name.len() <= 253
        && name.split(['.', '/']).all(|segment| {
            !segment.is_empty()
                && segment.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
                && segment.starts_with(|c: char| c.is_ascii_alphanumeric())
                && segment.ends_with(|c: char| c.is_ascii_alphanumeric())
        })
}

/// `spec.securityContext.sysctls`: valid names, each once.
fn validate_sysctls(spec: &Value, path: &str, causes: &mut Vec<Cause>) {
    let mut seen = std::collections::BTreeSet::new();
    for (i, sysctl) in spec["securityContext"]["sysctls"].as_array().into_iter().flatten().enumerate() {
        let field = format!("{path}.securityContext.sysctls[{i}].name");
        let name = sysctl["name"].as_str().unwrap_or_default();
        if name.is_empty() {
            causes.push(Cause { reason: "FieldValueRequired", message: "Required value".into(), field });
        } else if !is_sysctl_name(name) {
            causes.push(Cause {
                reason: "FieldValueInvalid",
                message: format!(
                    "Invalid value: {name:?}: must have at most 253 characters and match regex \
                     ^([a-z0-9]([-_a-z0-9]*[a-z0-9])?[\\./])*[a-z0-9]([-_a-z0-9]*[a-z0-9])?$"
                ),
                field,
            });
        } else if !seen.insert(name.replace('/', ".")) {
            causes.push(Cause { reason: "FieldValueDuplicate", message: format!("Duplicate value: {name:?}"), field });
        }
    }
}

/// A random suffix for `generateName`, from upstream's alphabet (no vowels, no look-alikes).
pub(crate) fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    let bytes = uuid::Uuid::new_v4().into_bytes();
    bytes[..5].iter().map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char).collect()
}

/// Prepares a new object: kind/apiVersion, namespace, name from generateName, uid,
/// creationTimestamp, generation; drops what clients may not set.
pub fn prepare_create(resource: &Resource, namespace: Option<&str>, object: &mut Value) -> Result<(), ApiError> {
    check_kind(resource, object)?;
    let metadata =
        object.as_object_mut().expect("decoded bodies are objects").entry("metadata").or_insert_with(|| json!({}));
    if !metadata.is_object() {
        return Err(ApiError::bad_request("metadata must be an object"));
    }
    if resource.namespaced {
        let namespace = namespace.unwrap_or("default");
        match metadata["namespace"].as_str() {
            None | Some("") => metadata["namespace"] = json!(namespace),
            Some(given) if given != namespace => {
                return Err(ApiError::bad_request(format!(
                    "the namespace of the provided object ({given}) does not match the namespace sent on the request ({namespace})"
                )));
            }
            Some(_) => {}
        }
    } else if let Some(map) = metadata.as_object_mut() {
        map.remove("namespace");
    }
    if metadata["name"].as_str().is_none_or(str::is_empty)
        && let Some(prefix) = metadata["generateName"].as_str().filter(|p| !p.is_empty())
    {
        metadata["name"] = json!(format!("{prefix}{}", random_suffix()));
    }
    let map = metadata.as_object_mut().expect("checked above");
    for owned in [
        "uid",
        "resourceVersion",
        "creationTimestamp",
        "deletionTimestamp",
        "deletionGracePeriodSeconds",
        "selfLink",
        "managedFields",
    ] {
        map.remove(owned);
    }
    map.insert("uid".into(), json!(uuid::Uuid::new_v4().to_string()));
    map.insert("creationTimestamp".into(), json!(now_rfc3339()));
    if resource.has_generation() {
        map.insert("generation".into(), json!(1));
    } else {
        map.remove("generation");
    }
    if resource.clears_status_on_create()
        && let Some(map) = object.as_object_mut()
    {
        map.remove("status");
    }
    apply_defaults(resource, object);
    resource.strategy().prepare_create(object);
    Ok(())
}

/// Upstream's defaulting (`SetDefaults_*`), which it applies to every object it decodes: on
/// creates, updates and patches alike. Also what its decoding drops: the metadata lists and
/// maps left empty (`ownerReferences: []` after the last owner went), which Go omits.
pub(crate) fn apply_defaults(resource: &Resource, object: &mut Value) {
    if let Some(metadata) = object.get_mut("metadata").and_then(Value::as_object_mut) {
        for field in ["ownerReferences", "finalizers", "labels", "annotations", "managedFields"] {
            let empty = match metadata.get(field) {
                Some(Value::Array(list)) => list.is_empty(),
                Some(Value::Object(map)) => map.is_empty(),
                Some(Value::Null) => true,
                _ => false,
            };
            if empty {
                metadata.remove(field);
            }
        }
    }
    if resource.builtin() == "persistentvolumes" && object["spec"].is_object() {
        set_default(&mut object["spec"], "persistentVolumeReclaimPolicy", json!("Retain"));
        set_default(&mut object["spec"], "volumeMode", json!("Filesystem"));
    }
    if resource.builtin() == "persistentvolumeclaims" && object["spec"].is_object() {
        set_default(&mut object["spec"], "volumeMode", json!("Filesystem"));
    }
    if resource.builtin() == "storageclasses" {
        set_default(object, "reclaimPolicy", json!("Delete"));
        set_default(object, "volumeBindingMode", json!("Immediate"));
    }
    default_workload(resource, object);
    if resource.builtin() == "pods" && object["spec"].is_object() {
        default_pod_spec(&mut object["spec"]);
    }
    if resource.group.is_empty() && resource.builtin() == "pods" {
        default_requests_from_limits(&mut object["spec"]);
    }
    if resource.group.is_empty() && resource.builtin() == "limitranges" {
        default_limit_range(object);
    }
    micro_times(resource, object);
}

/// `SetDefaults_Pod`: a container's limits are its requests where it gives none (pods only,
/// not templates).
fn default_requests_from_limits(spec: &mut Value) {
    for list in ["initContainers", "containers"] {
        for container in spec.get_mut(list).and_then(Value::as_array_mut).into_iter().flatten() {
            let Some(limits) = container["resources"]["limits"].as_object().filter(|l| !l.is_empty()).cloned() else {
                continue;
            };
            if !container["resources"]["requests"].is_object() {
                container["resources"]["requests"] = json!({});
            }
            let requests = container["resources"]["requests"].as_object_mut().expect("made an object above");
            for (key, value) in limits {
                requests.entry(key).or_insert(value);
            }
        }
    }
}

/// Go writes a `MicroTime` with exactly six fractional digits (RFC3339Micro), and Go clients
/// read only that: one decoded from protobuf, or sent with another precision, is written so.
fn micro_times(resource: &Resource, object: &mut Value) {
    let paths: &[&[&str]] = match (resource.group, resource.builtin()) {
        ("coordination.k8s.io", "leases") => &[&["spec", "acquireTime"], &["spec", "renewTime"]],
        ("" | "events.k8s.io", "events") => &[&["eventTime"], &["series", "lastObservedTime"]],
        _ => return,
    };
    for path in paths {
        let Some(value) = path.iter().try_fold(&mut *object, |at, key| at.get_mut(*key)) else { continue };
        if let Some(time) = value.as_str().and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok())
            && let Ok(text) = k8s_openapi::jiff::fmt::strtime::format("%Y-%m-%dT%H:%M:%S%.6fZ", time)
        {
            *value = Value::String(text);
        }
    }
}

/// Upstream's defaults for the workload kinds (`pkg/apis/{apps,batch}/v1/defaults.go`),
/// including their pod templates.
fn default_workload(resource: &Resource, object: &mut Value) {
    if resource.builtin() == "podtemplates" {
        if object["template"]["spec"].is_object() {
            default_pod_spec(&mut object["template"]["spec"]);
        }
        return;
    }
    if resource.builtin() == "replicationcontrollers" {
        // `SetDefaults_ReplicationController`: the selector and the labels are the template's
        // labels when not given.
        let labels = object["spec"]["template"]["metadata"]["labels"].clone();
        if labels.as_object().is_some_and(|l| !l.is_empty()) {
            if object["spec"]["selector"].as_object().is_none_or(|s| s.is_empty()) {
                object["spec"]["selector"] = labels.clone();
            }
            if object["metadata"]["labels"].as_object().is_none_or(|l| l.is_empty()) {
                object["metadata"]["labels"] = labels;
            }
        }
    }
    // `get_mut`: indexing would add `spec: null` to kinds without a spec.
    let Some(spec) = object.get_mut("spec").filter(|s| s.is_object()) else {
        return;
    };
    match resource.builtin() {
        "deployments" => {
            set_default(spec, "replicas", json!(1));
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(spec, "progressDeadlineSeconds", json!(600));
            // `strategy: {}` (what kubectl create deployment sends) is defaulted inside.
            set_default(spec, "strategy", json!({}));
            set_default(&mut spec["strategy"], "type", json!("RollingUpdate"));
            if spec["strategy"]["type"] == "RollingUpdate" {
                set_default(
                    &mut spec["strategy"],
                    "rollingUpdate",
                    json!({"maxUnavailable": "25%", "maxSurge": "25%"}),
                );
            }
        }
        "replicasets" | "replicationcontrollers" => set_default(spec, "replicas", json!(1)),
        "statefulsets" => {
            set_default(spec, "replicas", json!(1));
            set_default(spec, "podManagementPolicy", json!("OrderedReady"));
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(spec, "updateStrategy", json!({}));
            set_default(&mut spec["updateStrategy"], "type", json!("RollingUpdate"));
            if spec["updateStrategy"]["type"] == "RollingUpdate" {
                set_default(&mut spec["updateStrategy"], "rollingUpdate", json!({}));
                set_default(&mut spec["updateStrategy"]["rollingUpdate"], "partition", json!(0));
            }
        }
        "daemonsets" => {
            set_default(spec, "revisionHistoryLimit", json!(10));
            set_default(spec, "updateStrategy", json!({}));
            set_default(&mut spec["updateStrategy"], "type", json!("RollingUpdate"));
            if spec["updateStrategy"]["type"] == "RollingUpdate" {
                set_default(&mut spec["updateStrategy"], "rollingUpdate", json!({"maxUnavailable": 1, "maxSurge": 0}));
            }
        }
        "jobs" => default_job_spec(spec),
        // `pkg/apis/autoscaling/v2/defaults.go`: one replica at least, 80% CPU when no metric.
        "horizontalpodautoscalers" => {
            set_default(spec, "minReplicas", json!(1));
            // A v1 object has no metrics: its conversion to v2 adds the default.
            if resource.version == "v2" && spec["metrics"].as_array().is_none_or(Vec::is_empty) {
                spec["metrics"] = json!([{"type": "Resource", "resource": {"name": "cpu",
                    "target": {"type": "Utilization", "averageUtilization": 80}}}]);
            }
        }
        // `pkg/apis/networking/v1/defaults.go`: Ingress always, Egress when there are egress
        // rules; ports are TCP unless said.
        "networkpolicies" => {
            if spec["policyTypes"].as_array().is_none_or(Vec::is_empty) {
                let mut types = vec![json!("Ingress")];
                if spec["egress"].as_array().is_some_and(|e| !e.is_empty()) {
                    types.push(json!("Egress"));
                }
                spec["policyTypes"] = Value::Array(types);
            }
            for direction in ["ingress", "egress"] {
                for rule in spec[direction].as_array_mut().into_iter().flatten() {
                    for port in rule["ports"].as_array_mut().into_iter().flatten() {
                        set_default(port, "protocol", json!("TCP"));
                    }
                }
            }
        }
        "cronjobs" => {
            set_default(spec, "concurrencyPolicy", json!("Allow"));
            set_default(spec, "suspend", json!(false));
            set_default(spec, "successfulJobsHistoryLimit", json!(3));
            set_default(spec, "failedJobsHistoryLimit", json!(1));
            if spec["jobTemplate"]["spec"].is_object() {
                default_job_spec(&mut spec["jobTemplate"]["spec"]);
            }
        }
        _ => return,
    }
    if resource.builtin() == "jobs" {
        label_job_pods(object);
    }
    let template = if resource.builtin() == "cronjobs" {
        &mut object["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    } else {
        &mut object["spec"]["template"]["spec"]
    };
    if template.is_object() {
        default_pod_spec(template);
    }
}

/// A Job's pods carry its uid and name, and its selector is that uid (upstream's defaulting,
/// unless the user chose `manualSelector`).
fn label_job_pods(job: &mut Value) {
    if job["spec"]["manualSelector"] == json!(true) {
        return;
    }
    let uid = job["metadata"]["uid"].clone();
    let name = job["metadata"]["name"].clone();
    let labels = &mut job["spec"]["template"]["metadata"]["labels"];
    if !labels.is_object() {
        *labels = json!({});
    }
    for (key, value) in [
        ("batch.kubernetes.io/controller-uid", &uid),
        ("batch.kubernetes.io/job-name", &name),
        ("controller-uid", &uid),
        ("job-name", &name),
    ] {
        labels[key] = value.clone();
    }
    job["spec"]["selector"] = json!({"matchLabels": {"batch.kubernetes.io/controller-uid": uid}});
}

fn default_job_spec(spec: &mut Value) {
    if spec["completions"].is_null() && spec["parallelism"].is_null() {
        spec["completions"] = json!(1);
    }
    set_default(spec, "parallelism", json!(1));
    set_default(spec, "backoffLimit", json!(6));
    set_default(spec, "completionMode", json!("NonIndexed"));
    set_default(spec, "suspend", json!(false));
}

fn set_default(map: &mut Value, key: &str, value: Value) {
    if let Some(map) = map.as_object_mut() {
        map.entry(key).or_insert(value);
    }
}

/// Seconds a pod stays bound to a node that is not ready / unreachable before the node
/// lifecycle controller evicts it (`--default-not-ready-toleration-seconds`,
/// `--default-unreachable-toleration-seconds`; upstream's DefaultTolerationSeconds admission).
static NOT_READY_TOLERATION: AtomicI64 = AtomicI64::new(300);
static UNREACHABLE_TOLERATION: AtomicI64 = AtomicI64::new(300);

/// Sets the default toleration seconds new pods get (process-wide: one API server per process).
pub fn set_default_toleration_seconds(not_ready: i64, unreachable: i64) {
    NOT_READY_TOLERATION.store(not_ready, Ordering::Relaxed);
    UNREACHABLE_TOLERATION.store(unreachable, Ordering::Relaxed);
}

/// Adds the not-ready and unreachable NoExecute tolerations a pod does not already have.
fn add_default_tolerations(spec: &mut Value) {
    let Some(map) = spec.as_object_mut() else { return };
    let tolerations = map.entry("tolerations").or_insert_with(|| json!([]));
    let Some(list) = tolerations.as_array_mut() else { return };
    for (key, seconds) in [
        ("node.kubernetes.io/not-ready", NOT_READY_TOLERATION.load(Ordering::Relaxed)),
        ("node.kubernetes.io/unreachable", UNREACHABLE_TOLERATION.load(Ordering::Relaxed)),
    ] {
        let tolerated = list.iter().any(|t| {
            let effect_ok = t["effect"].as_str().is_none_or(|e| e.is_empty() || e == "NoExecute");
            let key_ok = t["key"].as_str() == Some(key)
                || (t["key"].as_str().is_none_or(str::is_empty) && t["operator"] == "Exists");
            effect_ok && key_ok
        });
        if !tolerated {
            list.push(json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": seconds}));
        }
    }
}

/// Upstream's defaults for a pod spec (`pkg/apis/core/v1/defaults.go`).
pub fn default_pod_spec(spec: &mut Value) {
    set_default(spec, "restartPolicy", json!("Always"));
    set_default(spec, "dnsPolicy", json!("ClusterFirst"));
    set_default(spec, "terminationGracePeriodSeconds", json!(30));
    set_default(spec, "schedulerName", json!("default-scheduler"));
    set_default(spec, "securityContext", json!({}));
    set_default(spec, "enableServiceLinks", json!(true));
    for list in ["initContainers", "containers"] {
        // `get_mut`, not `spec[list]`: indexing a missing key would insert a null.
        let Some(containers) = spec.get_mut(list).and_then(Value::as_array_mut) else {
            continue;
        };
        for container in containers {
            let image = container["image"].as_str().unwrap_or("").to_string();
            // No tag (or :latest) and no digest: always pull; else only when missing.
            let last = image.rsplit('/').next().unwrap_or("");
            let policy = if image.contains('@') || (last.contains(':') && !last.ends_with(":latest")) {
                "IfNotPresent"
            } else {
                "Always"
            };
            set_default(container, "imagePullPolicy", json!(policy));
            set_default(container, "terminationMessagePath", json!("/dev/termination-log"));
            set_default(container, "terminationMessagePolicy", json!("File"));
            set_default(container, "resources", json!({}));
            for port in container.get_mut("ports").and_then(Value::as_array_mut).into_iter().flatten() {
                set_default(port, "protocol", json!("TCP"));
            }
        }
    }
}

/// Guaranteed when every container limits cpu and memory with requests equal to limits;
/// BestEffort when none requests or limits anything; Burstable otherwise.
fn qos_class(spec: &Value) -> &'static str {
    let containers: Vec<&Value> = ["initContainers", "containers"]
        .iter()
        .flat_map(|list| spec[*list].as_array().map(|a| a.iter().collect::<Vec<_>>()).unwrap_or_default())
        .collect();
    let resources = |c: &Value, kind: &str| c["resources"][kind].as_object().cloned().unwrap_or_default();
    if containers.iter().all(|c| resources(c, "requests").is_empty() && resources(c, "limits").is_empty()) {
        return "BestEffort";
    }
    let guaranteed = containers.iter().all(|c| {
        let (requests, limits) = (resources(c, "requests"), resources(c, "limits"));
        ["cpu", "memory"]
            .iter()
            .all(|r| limits.contains_key(*r) && requests.get(*r).is_none_or(|v| Some(v) == limits.get(*r)))
    });
    if guaranteed { "Guaranteed" } else { "Burstable" }
}

/// Prepares a replacement of `old`: the server-owned metadata carries over; generation is
/// bumped when the spec changed.
pub fn prepare_update(resource: &Resource, old: &Value, object: &mut Value) -> Result<(), ApiError> {
    check_kind(resource, object)?;
    if !object["metadata"].is_object() {
        return Err(ApiError::bad_request("metadata must be an object"));
    }
    for owned in ["uid", "creationTimestamp", "deletionTimestamp", "deletionGracePeriodSeconds"] {
        match old["metadata"].get(owned) {
            Some(value) => object["metadata"][owned] = value.clone(),
            None => {
                object["metadata"].as_object_mut().expect("checked").remove(owned);
            }
        }
    }
    if let Some(namespace) = old["metadata"].get("namespace") {
        object["metadata"]["namespace"] = namespace.clone();
    }
    object["metadata"].as_object_mut().expect("checked").remove("resourceVersion");
    apply_defaults(resource, object);
    resource.strategy().prepare_update(resource, old, object)?;
    if resource.has_generation() {
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        // A custom object's generation follows everything but its metadata and status.
        let changed = match resource.custom {
            Some(_) => {
                let content = |o: &Value| -> Vec<(String, Value)> {
                    o.as_object()
                        .into_iter()
                        .flatten()
                        .filter(|(k, _)| !matches!(k.as_str(), "metadata" | "status"))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect()
                };
                content(old) != content(object)
            }
            None => old.get("spec") != object.get("spec"),
        };
        object["metadata"]["generation"] = json!(if changed { generation + 1 } else { generation });
    }
    Ok(())
}

/// Upstream's `ValidatePodUpdate`: of a pod's spec, an update may change only the images of its
/// (init) containers, `activeDeadlineSeconds` (set, or lowered), `tolerations` (additions
/// only), `terminationGracePeriodSeconds` and `schedulingGates` (removals); anything else is
/// 422 Forbidden on `spec` (a pod is bound through `pods/binding`, resized by recreation).
pub fn check_pod_update(old: &Value, new: &Value) -> Result<(), ApiError> {
    let name = new["metadata"]["name"].as_str().unwrap_or_default();
    let forbidden = |field: &str, message: &str| {
        let cause =
            Cause { reason: "FieldValueForbidden", message: format!("Forbidden: {message}"), field: field.into() };
        ApiError::invalid("", "Pod", name, vec![cause])
    };
    let (old_spec, new_spec) = (&old["spec"], &new["spec"]);
    let kept = |t: &Value| new_spec["tolerations"].as_array().is_some_and(|n| n.contains(t));
    if !old_spec["tolerations"].as_array().into_iter().flatten().all(kept) {
        return Err(forbidden(
            "spec.tolerations",
            "existing toleration can not be modified except its tolerationSeconds",
        ));
    }
    match (old_spec["activeDeadlineSeconds"].as_i64(), new_spec["activeDeadlineSeconds"].as_i64()) {
        (Some(_), None) => {
            return Err(forbidden(
                "spec.activeDeadlineSeconds",
                "must not update from a positive integer to nil value",
            ));
        }
        (Some(before), Some(after)) if after > before => {
            return Err(forbidden("spec.activeDeadlineSeconds", "must be less than or equal to previous value"));
        }
        _ => {}
    }
    let comparable = |spec: &Value| {
        let mut spec = without_empties(spec);
        if let Some(map) = spec.as_object_mut() {
            for free in ["activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds", "schedulingGates"] {
                map.remove(free);
            }
        }
        for list in ["containers", "initContainers"] {
            for container in spec[list].as_array_mut().into_iter().flatten() {
                container["image"] = Value::Null;
            }
        }
        spec
    };
    let (before, after) = (comparable(old_spec), comparable(new_spec));
    if before != after {
        // Upstream appends a diff of the specs; this names the first field that differs.
        let changed = first_difference(&before, &after, "spec");
        return Err(forbidden(
            "spec",
            &format!(
                "pod updates may not change fields other than `spec.containers[*].image`,`spec.initContainers[*].image`,\
                 `spec.activeDeadlineSeconds`,`spec.tolerations` (only additions to existing tolerations),\
                 `spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative) \
                 (changed: {changed})"
            ),
        ));
    }
    Ok(())
}

/// The path of the first place `a` and `b` differ (`spec.containers[0].ports`).
fn first_difference(a: &Value, b: &Value, path: &str) -> String {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for key in x.keys().chain(y.keys()) {
                if x.get(key) != y.get(key) {
                    let (p, q) = (x.get(key).unwrap_or(&Value::Null), y.get(key).unwrap_or(&Value::Null));
                    return first_difference(p, q, &format!("{path}.{key}"));
                }
            }
            path.to_string()
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => match x.iter().zip(y).position(|(p, q)| p != q) {
            Some(i) => first_difference(&x[i], &y[i], &format!("{path}[{i}]")),
            None => path.to_string(),
        },
        _ => path.to_string(),
    }
}

/// `value` without null, zero values, empty objects and empty lists at any depth: upstream
/// compares specs as Go values, where a nil list equals an empty one and an absent number is
/// 0 (and a protobuf body, client-go's, cannot tell them apart).
fn without_empties(value: &Value) -> Value {
    let empty = |v: &Value| match v {
        Value::Null => true,
        Value::Object(map) => map.is_empty(),
        Value::Array(list) => list.is_empty(),
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
    };
    match value {
        Value::Object(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), without_empties(v))).filter(|(_, v)| !empty(v)).collect())
        }
        Value::Array(list) => Value::Array(list.iter().map(without_empties).collect()),
        other => other.clone(),
    }
}

/// A Secret's `stringData` is write-only: its entries go into `data` (base64), replacing
/// the same keys there, as upstream's conversion does on every write.
fn merge_string_data(resource: &Resource, object: &mut Value) -> Result<(), ApiError> {
    use base64::Engine;
    if !resource.group.is_empty() || resource.builtin() != "secrets" {
        return Ok(());
    }
    let Some(map) = object.as_object_mut() else { return Ok(()) };
    let strings = match map.remove("stringData") {
        None | Some(Value::Null) => return Ok(()),
        Some(Value::Object(strings)) => strings,
        Some(_) => return Err(ApiError::bad_request("stringData must be a map of strings")),
    };
    let data = map.entry("data").or_insert_with(|| json!({}));
    if !data.is_object() {
        *data = json!({});
    }
    for (key, value) in strings {
        let Value::String(text) = value else {
            return Err(ApiError::bad_request(format!("stringData[{key}] must be a string")));
        };
        data[key.as_str()] = json!(base64::engine::general_purpose::STANDARD.encode(text));
    }
    Ok(())
}

fn check_kind(resource: &Resource, object: &mut Value) -> Result<(), ApiError> {
    merge_string_data(resource, object)?;
    let api_version = resource.api_version();
    match object["kind"].as_str() {
        None | Some("") => object["kind"] = json!(resource.kind),
        Some(kind) if kind == resource.kind => {}
        Some(kind) => {
            return Err(ApiError::bad_request(format!(
                "the kind of the object ({kind}) does not match the resource ({}, kind {})",
                resource.plural, resource.kind
            )));
        }
    }
    match object["apiVersion"].as_str() {
        None | Some("") => object["apiVersion"] = json!(api_version),
        Some(given) if given == api_version => {}
        Some(given) => {
            return Err(ApiError::bad_request(format!(
                "the API version of the object ({given}) does not match the resource ({api_version})"
            )));
        }
    }
    Ok(())
}

/// A stored object as `resource` serves it: converted from the kind it is stored as, or, for a
/// custom resource, in this version and with its schema's defaults.
pub fn from_storage(resource: &Resource, object: Value) -> Value {
    match (&resource.conversion, resource.custom) {
        (Some(conversion), _) => (conversion.from_storage)(object),
        // A webhook converts: the object stays as stored until `conversion::convert`.
        (None, Some(custom)) if custom.webhook.is_some() => object,
        (None, Some(custom)) => {
            let mut object = object;
            if object.get("apiVersion").is_some_and(|v| *v != *resource.api_version()) {
                object["apiVersion"] = Value::String(resource.api_version());
            }
            // Defaults added to the schema since the object was written apply on read too.
            crate::custom::default(custom, &mut object);
            object
        }
        (None, None) => object,
    }
}

/// Whether [`from_storage`] leaves this resource's objects as they are stored (no conversion,
/// no custom defaults): then the watch cache's encoded objects can be sent as they are.
pub fn shown_as_stored(resource: &Resource) -> bool {
    resource.conversion.is_none() && resource.custom.is_none()
}

/// An object as read from the store: its resourceVersion is the store's mod revision.
pub fn from_store(resource: &Resource, value: &[u8], mod_revision: i64) -> Result<Value, ApiError> {
    let mut object: Value = serde_json::from_slice(value)
        .map_err(|e| ApiError::internal(format!("a stored object does not decode: {e}")))?;
    object = from_storage(resource, object);
    object["metadata"]["resourceVersion"] = json!(mod_revision.to_string());
    Ok(object)
}

/// What goes into the store: the object (in its storage version) without its resourceVersion.
pub fn to_store(resource: &Resource, object: &Value) -> Vec<u8> {
    let mut object = object.clone();
    if let Some(conversion) = &resource.conversion {
        object = (conversion.to_storage)(object);
    }
    // Custom resources are stored in their storage version (no conversion but the apiVersion;
    // a conversion webhook has converted the object before).
    if let Some(custom) = resource.custom.filter(|c| c.webhook.is_none()) {
        object["apiVersion"] = json!(format!("{}/{}", resource.group, custom.storage_version));
    }
    if let Some(metadata) = object["metadata"].as_object_mut() {
        metadata.remove("resourceVersion");
    }
    serde_json::to_vec(&object).expect("a JSON value serializes")
}

/// Applies a JSON patch (RFC 6902) as upstream does (evanphx/json-patch): a `test` that a
/// value is `null` passes where the value is absent (clients test
/// `/metadata/finalizers == null` before they add the first finalizer: kube-rs does). Applied
/// to `document` in place; on error, `document` is left partly patched (callers patch a copy).
pub(crate) fn json_patch(document: &mut Value, patch: &json_patch::Patch) -> Result<(), json_patch::PatchError> {
    for (index, operation) in patch.0.iter().enumerate() {
        if let json_patch::PatchOperation::Test(test) = operation
            && test.value.is_null()
            && document.pointer(test.path.as_str()).is_none_or(Value::is_null)
        {
            continue;
        }
        json_patch::patch(document, std::slice::from_ref(operation)).map_err(|mut error| {
            error.operation = index;
            error
        })?;
    }
    Ok(())
}

/// One object as stored (a custom one in its stored version when a webhook converts it).
pub(crate) async fn read_stored(
    store: &dyn tugboat_store::Store,
    resource: &Resource,
    namespace: Option<&str>,
    name: &str,
) -> Result<(Value, i64), ApiError> {
    let key = resource.key(namespace, name);
    match store.get(&key, None).await {
        Ok(Some(kv)) => Ok((from_store(resource, &kv.value, kv.mod_revision)?, kv.mod_revision)),
        Ok(None) => Err(ApiError::not_found(resource.group, resource.plural, name)),
        Err(error) => Err(ApiError::from_store(error, resource.group, resource.plural, name)),
    }
}

/// Upstream's defaults of a LimitRange's `Container` items: the default limit is the max when
/// not given, the default request the default limit, else the min.
pub fn default_limit_range(limit_range: &mut Value) {
    for item in limit_range["spec"]["limits"].as_array_mut().into_iter().flatten() {
        if item["type"] != "Container" {
            continue;
        }
        let mut defaults = item["default"].as_object().cloned().unwrap_or_default();
        let mut requests = item["defaultRequest"].as_object().cloned().unwrap_or_default();
        for (key, value) in item["max"].as_object().into_iter().flatten() {
            defaults.entry(key.clone()).or_insert_with(|| value.clone());
        }
        for (key, value) in defaults.iter().chain(item["min"].as_object().into_iter().flatten()) {
            requests.entry(key.clone()).or_insert_with(|| value.clone());
        }
        if !defaults.is_empty() {
            item["default"] = Value::Object(defaults);
        }
        if !requests.is_empty() {
            item["defaultRequest"] = Value::Object(requests);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn config_keys_are_upstreams() {
        let secrets = find("", "v1", "secrets").unwrap();
        let error = validate(secrets, &json!({"metadata": {"name": "s"}, "data": {"": "dmFsdWU="}})).unwrap_err();
        assert!(
            error.message.contains("a valid config key must consist of alphanumeric characters"),
            "{}",
            error.message
        );
        let configmaps = find("", "v1", "configmaps").unwrap();
        assert!(validate(configmaps, &json!({"metadata": {"name": "c"}, "data": {"a.b_C-1": "x"}})).is_ok());
        let twice = json!({"metadata": {"name": "c"}, "data": {"k": "x"}, "binaryData": {"k": "eA=="}});
        assert!(validate(configmaps, &twice).unwrap_err().message.contains("duplicate of key"));
        assert!(validate(configmaps, &json!({"metadata": {"name": "c"}, "data": {"..": "x"}})).is_err());
    }

    #[test]
    fn micro_times_have_six_digits() {
        let leases = find("coordination.k8s.io", "v1", "leases").unwrap();
        let mut lease = json!({"metadata": {"name": "l"}, "spec": {"acquireTime": "0001-01-01T00:00:02Z", "renewTime": "2026-12-06T01:02:03.5Z"}});
        apply_defaults(leases, &mut lease);
        assert_eq!(lease["spec"]["acquireTime"], "0001-01-01T00:00:02.000000Z");
        assert_eq!(lease["spec"]["renewTime"], "2026-12-06T01:02:03.500000Z");
        let events = find("events.k8s.io", "v1", "events").unwrap();
        let mut event = json!({"metadata": {"name": "e"}, "eventTime": "2017-09-19T13:49:16Z", "series": {"count": 2, "lastObservedTime": "2017-09-19T13:49:16.000000Z"}});
        apply_defaults(events, &mut event);
        assert_eq!(event["eventTime"], "2017-09-19T13:49:16.000000Z");
        assert_eq!(event["series"]["lastObservedTime"], "2017-09-19T13:49:16.000000Z");
    }

    use super::*;
    use crate::registry::find;

    #[test]
    fn a_json_patch_test_of_null_passes_where_the_value_is_absent() {
        let patch = |ops: Value| -> json_patch::Patch { serde_json::from_value(ops).unwrap() };
        let mut object = json!({"metadata": {"name": "a"}});
        let add_first = patch(json!([
            {"op": "test", "path": "/metadata/finalizers", "value": null},
            {"op": "add", "path": "/metadata/finalizers", "value": ["f"]}]));
        json_patch(&mut object, &add_first).unwrap();
        assert_eq!(object["metadata"]["finalizers"], json!(["f"]));
        // Present now: the same test fails, and names the operation that did.
        let error = json_patch(&mut object, &add_first).unwrap_err();
        assert_eq!(error.operation, 0);
        let error = json_patch(
            &mut object,
            &patch(json!([
            {"op": "add", "path": "/metadata/labels", "value": {}},
            {"op": "test", "path": "/metadata/name", "value": "b"}])),
        )
        .unwrap_err();
        assert_eq!(error.operation, 1);
    }

    #[test]
    fn a_yaml_key_given_twice_is_worded_as_upstream() {
        let error = decode_body("application/yaml", b"a: 1\nspec:\n  foo: 1\n  foo: 2\n").unwrap_err();
        assert_eq!(
            error.message,
            "error decoding YAML: yaml: unmarshal errors:\n  line 4: key \"foo\" already set in map"
        );
    }

    #[test]
    fn names_follow_rfc_1123() {
        assert!(is_dns_subdomain("web-1.example"));
        assert!(!is_dns_subdomain("Web"));
        assert!(!is_dns_subdomain("-web"));
        assert!(!is_dns_subdomain("a..b"));
        assert!(is_dns_label("kube-system"));
        assert!(!is_dns_label("a.b"));
    }

    #[test]
    fn a_pod_without_containers_or_with_duplicates_is_invalid_with_field_paths() {
        let pods = find("", "v1", "pods").unwrap();
        let error = validate(pods, &json!({"metadata": {"name": "p"}, "spec": {}})).unwrap_err();
        assert_eq!(error.code, 422);
        assert_eq!(error.causes[0].field, "spec.containers");
        let duplicate = json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "a", "image": "x"}, {"name": "a", "image": "y"}]}});
        let error = validate(pods, &duplicate).unwrap_err();
        assert_eq!(error.causes[0].field, "spec.containers[1].name");
        assert_eq!(error.causes[0].reason, "FieldValueDuplicate");
    }

    #[test]
    fn create_fills_server_metadata_and_generate_name() {
        let deployments = find("apps", "v1", "deployments").unwrap();
        let mut object = json!({"metadata": {"generateName": "web-", "uid": "forged"}, "spec": {}});
        prepare_create(deployments, Some("default"), &mut object).unwrap();
        let name = object["metadata"]["name"].as_str().unwrap();
        assert!(name.starts_with("web-") && name.len() == 9, "{name}");
        assert_ne!(object["metadata"]["uid"], "forged");
        assert_eq!(object["metadata"]["generation"], 1);
        assert_eq!(object["kind"], "Deployment");
        assert_eq!(object["apiVersion"], "apps/v1");
        let mut wrong = json!({"metadata": {"name": "x", "namespace": "other"}});
        assert_eq!(prepare_create(deployments, Some("default"), &mut wrong).unwrap_err().code, 400);
    }

    #[test]
    fn pods_get_upstream_defaults_and_a_pending_status() {
        let pods = find("", "v1", "pods").unwrap();
        let mut pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [
            {"name": "a", "image": "nginx"}, {"name": "b", "image": "registry:5000/x/y:1.2"}]}});
        prepare_create(pods, Some("default"), &mut pod).unwrap();
        assert_eq!(pod["spec"]["restartPolicy"], "Always");
        assert_eq!(pod["spec"]["terminationGracePeriodSeconds"], 30);
        assert_eq!(pod["spec"]["containers"][0]["imagePullPolicy"], "Always");
        assert_eq!(pod["spec"]["containers"][1]["imagePullPolicy"], "IfNotPresent");
        assert!(pod["spec"].get("initContainers").is_none(), "no null left behind");
        assert_eq!(pod["status"], json!({"phase": "Pending", "qosClass": "BestEffort"}));
        let limited = json!({"containers": [{"resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]});
        assert_eq!(qos_class(&limited), "Guaranteed");
        let requested = json!({"containers": [{"resources": {"requests": {"cpu": "1"}}}]});
        assert_eq!(qos_class(&requested), "Burstable");
    }

    #[test]
    fn workloads_get_upstream_defaults() {
        let jobs = find("batch", "v1", "jobs").unwrap();
        let mut job = json!({"metadata": {"name": "j"}, "spec": {"template": {"spec": {"restartPolicy": "Never",
            "containers": [{"name": "c", "image": "busybox"}]}}}});
        prepare_create(jobs, Some("default"), &mut job).unwrap();
        assert_eq!((job["spec"]["completions"].as_i64(), job["spec"]["parallelism"].as_i64()), (Some(1), Some(1)));
        assert_eq!(job["spec"]["backoffLimit"], 6);
        assert_eq!(job["spec"]["template"]["spec"]["restartPolicy"], "Never", "a given value stays");
        assert_eq!(job["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"], "Always");
        let deployments = find("apps", "v1", "deployments").unwrap();
        let mut deployment = json!({"metadata": {"name": "d"}, "spec": {"template": {"spec": {"containers": []}}}});
        prepare_create(deployments, Some("default"), &mut deployment).unwrap();
        assert_eq!(deployment["spec"]["replicas"], 1);
        assert_eq!(deployment["spec"]["strategy"]["rollingUpdate"]["maxSurge"], "25%");
        // A StatefulSet's rolling update says its partition, even when the client sent an empty
        // rollingUpdate (a zero partition that protobuf could not carry).
        let sets = find("apps", "v1", "statefulsets").unwrap();
        let mut set = json!({"metadata": {"name": "s"}, "spec": {"updateStrategy": {"type": "RollingUpdate", "rollingUpdate": {}},
                              "template": {"spec": {"containers": []}}}});
        prepare_create(sets, Some("default"), &mut set).unwrap();
        assert_eq!(set["spec"]["updateStrategy"]["rollingUpdate"]["partition"], 0);
        let mut parallel_only = json!({"metadata": {"name": "p"}, "spec": {"parallelism": 3}});
        prepare_create(jobs, Some("default"), &mut parallel_only).unwrap();
        assert!(parallel_only["spec"]["completions"].is_null(), "a work-queue job keeps no completions");
    }

    #[test]
    fn updates_keep_server_metadata_and_bump_generation_on_spec_changes() {
        let deployments = find("apps", "v1", "deployments").unwrap();
        let mut old = json!({"metadata": {"name": "w", "namespace": "default", "uid": "u1", "generation": 3,
                             "creationTimestamp": "2026-01-01T00:00:00Z"}, "spec": {"replicas": 1}});
        // What is stored has its defaults; so does every update once decoded.
        apply_defaults(deployments, &mut old);
        let mut new = json!({"metadata": {"name": "w", "uid": "other"}, "spec": {"replicas": 2}});
        prepare_update(deployments, &old, &mut new).unwrap();
        assert_eq!(new["metadata"]["uid"], "u1");
        assert_eq!(new["metadata"]["generation"], 4);
        let mut same = json!({"metadata": {"name": "w", "labels": {"a": "b"}}, "spec": {"replicas": 1}});
        prepare_update(deployments, &old, &mut same).unwrap();
        assert_eq!(same["metadata"]["generation"], 3);
    }

    #[test]
    fn sysctl_names_follow_upstreams_rule() {
        for good in ["kernel.shmmax", "net.ipv4.ip_local_port_range", "safe-and-unsafe", "net/ipv4/conf/eth0/rp_filter"]
        {
            assert!(is_sysctl_name(good), "{good}");
        }
        for bad in ["foo-", "bar..", "", "Kernel.x", "a._b"] {
            assert!(!is_sysctl_name(bad), "{bad}");
        }
    }

    #[test]
    fn duplicate_fields_are_found_with_their_paths() {
        let body = br#"{"spec": {"replicas": 2, "replicas": 3, "list": [{"a": 1, "a": 2}], "s": "x\"y"}, "k": null}"#;
        assert_eq!(duplicate_fields("application/json", body), ["spec.replicas", "spec.list[0].a"]);
        assert!(duplicate_fields("application/yaml", body).is_empty());
        assert!(duplicate_fields("application/json", br#"{"a": {"b": 1}, "b": 2}"#).is_empty());
    }

    #[test]
    fn bodies_decode_from_json_and_yaml_and_garbage_is_a_bad_request() {
        assert_eq!(decode_body("application/json", br#"{"a":1}"#).unwrap(), json!({"a": 1}));
        assert_eq!(decode_body("application/yaml", b"a: 1\nb: [x]\n").unwrap(), json!({"a": 1, "b": ["x"]}));
        assert_eq!(decode_body("application/json", b"{not json").unwrap_err().code, 400);
        assert_eq!(decode_body("application/yaml", b"a: [unclosed").unwrap_err().code, 400);
        assert_eq!(decode_body("application/json", b"[1]").unwrap_err().code, 400);
        assert_eq!(decode_body("text/plain", b"x").unwrap_err().code, 415);
    }
}
