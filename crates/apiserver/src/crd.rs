//! CustomResourceDefinitions (`apiextensions.k8s.io/v1`), the definitions themselves: their
//! validation, defaults and status (`NamesAccepted`, `Established`), as upstream's
//! apiextensions-apiserver sets them. What a definition serves is [`crate::custom_kinds`] (the
//! served set, below the server's state), what its schema does to objects [`crate::custom`],
//! and the controller that keeps the served set and finishes deletions
//! [`crate::crd_controller`].
//!
//! Every server keeps the set of served custom resources from a watch of the definitions (so a
//! definition written through another server of an HA pair is served here too), and answers a
//! write of its own once the set has seen it (a client that creates a definition and waits for
//! `Established` can use it right away).

use std::sync::Arc;

use serde_json::{Value, json};

use crate::custom::cause;
use crate::custom_kinds::{condition_true, is_terminating, storage_version};
use crate::registry::{self, Resource};
use crate::state::ApiState;
use crate::status::{ApiError, Cause};

/// The finalizer upstream gives every definition: its objects go before it does.
pub const CLEANUP_FINALIZER: &str = "customresourcecleanup.apiextensions.k8s.io";

pub(crate) fn crds() -> &'static Resource {
    registry::find("apiextensions.k8s.io", "v1", "customresourcedefinitions").expect("CRDs are served")
}

/// Reads every definition from the store and serves what they define.
pub async fn refresh(state: &ApiState) -> Result<(), ApiError> {
    let prefix = crds().prefix(None);
    let page = state
        .store
        .list(&prefix, tugboat_store::ListOptions::default())
        .await
        .map_err(|e| ApiError::from_store(e, crds().group, crds().plural, ""))?;
    let definitions =
        page.kvs.into_iter().filter_map(|kv| Some((kv.key, crate::watch_cache::decode(&kv.value, kv.mod_revision)?)));
    state.custom.replace(definitions, page.revision);
    Ok(())
}

/// A conversion webhook's settings: a client config (URL or Service, as admission webhooks
/// have) and the review versions it speaks.
fn validate_conversion_webhook(webhook: &mut Value, causes: &mut Vec<Cause>) {
    if !webhook.is_object() {
        causes.push(cause(
            "FieldValueRequired",
            "spec.conversion.webhook",
            "Required value: required when strategy is set to Webhook",
        ));
        return;
    }
    let config = &mut webhook["clientConfig"];
    if !config.is_object() {
        causes.push(cause(
            "FieldValueRequired",
            "spec.conversion.webhook.clientConfig",
            "Required value: required when strategy is set to Webhook",
        ));
    } else {
        if let Some(service) = config.get_mut("service").and_then(Value::as_object_mut) {
            service.entry("port").or_insert(json!(443));
        }
        let (url, service) = (config["url"].is_string(), config["service"].is_object());
        if url == service {
            causes.push(cause(
                "FieldValueRequired",
                "spec.conversion.webhook.clientConfig",
                "Required value: exactly one of url or service is required",
            ));
        }
        if url && !config["url"].as_str().unwrap_or_default().starts_with("https://") {
            causes.push(cause(
                "FieldValueInvalid",
                "spec.conversion.webhook.clientConfig.url",
                format!("Invalid value: {}: 'https' is the only allowed URL scheme", config["url"]),
            ));
        }
        for field in ["name", "namespace"] {
            if service && config["service"][field].as_str().is_none_or(str::is_empty) {
                causes.push(cause(
                    "FieldValueRequired",
                    &format!("spec.conversion.webhook.clientConfig.service.{field}"),
                    format!("Required value: service {field} is required"),
                ));
            }
        }
    }
    let versions = webhook["conversionReviewVersions"].as_array().cloned().unwrap_or_default();
    if !versions.iter().any(|v| v == "v1" || v == "v1beta1") {
        causes.push(cause(
            "FieldValueRequired",
            "spec.conversion.webhook.conversionReviewVersions",
            "Required value: must include at least one of v1, v1beta1",
        ));
    }
}

fn invalid_crd(name: &str, causes: Vec<Cause>) -> ApiError {
    ApiError::invalid("apiextensions.k8s.io", "CustomResourceDefinition", name, causes)
}

fn is_dns1035_label(name: &str) -> bool {
    let bytes = name.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_lowercase()
        && bytes.iter().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
        && bytes[bytes.len() - 1] != b'-'
}

/// Validates a definition and fills in what upstream defaults and what its controllers would
/// report (`acceptedNames`, `NamesAccepted`, `Established`, `storedVersions`); `others` are
/// the other definitions there are, `old` the definition before an update.
pub fn prepare(object: &mut Value, others: &[Arc<Value>], old: Option<&Value>) -> Result<(), ApiError> {
    let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let mut causes = Vec::new();
    let spec = object["spec"].as_object_mut().map(std::mem::take).unwrap_or_default();
    let mut spec = Value::Object(spec);
    let group = spec["group"].as_str().unwrap_or_default().to_string();
    if group.is_empty() {
        causes.push(cause("FieldValueRequired", "spec.group", "Required value"));
    } else if !group.contains('.') {
        causes.push(cause(
            "FieldValueInvalid",
            "spec.group",
            format!("Invalid value: {group:?}: should be a domain with at least one dot"),
        ));
    }
    let names = &mut spec["names"];
    let plural = names["plural"].as_str().unwrap_or_default().to_string();
    let kind = names["kind"].as_str().unwrap_or_default().to_string();
    if plural.is_empty() {
        causes.push(cause("FieldValueRequired", "spec.names.plural", "Required value"));
    } else if !crate::object::is_dns_label(&plural) {
        causes.push(cause(
            "FieldValueInvalid",
            "spec.names.plural",
            format!("Invalid value: {plural:?}: a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character"),
        ));
    }
    if kind.is_empty() {
        causes.push(cause("FieldValueRequired", "spec.names.kind", "Required value"));
    }
    if names["singular"].as_str().is_none_or(str::is_empty) && !kind.is_empty() {
        names["singular"] = json!(kind.to_lowercase());
    }
    if names["listKind"].as_str().is_none_or(str::is_empty) && !kind.is_empty() {
        names["listKind"] = json!(format!("{kind}List"));
    }
    if !plural.is_empty() && !group.is_empty() && name != format!("{plural}.{group}") {
        causes.push(cause(
            "FieldValueInvalid",
            "metadata.name",
            format!("Invalid value: {name:?}: must be spec.names.plural+\".\"+spec.group"),
        ));
    }
    match spec["scope"].as_str() {
        Some("Namespaced" | "Cluster") => {}
        Some(other) => causes.push(cause(
            "FieldValueNotSupported",
            "spec.scope",
            format!("Unsupported value: {other:?}: supported values: \"Cluster\", \"Namespaced\""),
        )),
        None => causes.push(cause("FieldValueRequired", "spec.scope", "Required value")),
    }
    let versions = spec["versions"].as_array_mut().map(std::mem::take).unwrap_or_default();
    if versions.is_empty() {
        causes.push(cause(
            "FieldValueInvalid",
            "spec.versions",
            "Invalid value: must have exactly one version marked as storage version",
        ));
    }
    let storage = versions.iter().filter(|v| v["storage"] == json!(true)).count();
    if !versions.is_empty() && storage != 1 {
        causes.push(cause(
            "FieldValueInvalid",
            "spec.versions",
            format!("Invalid value: {storage}: must have exactly one version marked as storage version"),
        ));
    }
    for (i, version) in versions.iter().enumerate() {
        let field = format!("spec.versions[{i}]");
        let version_name = version["name"].as_str().unwrap_or_default();
        if version_name.is_empty() {
            causes.push(cause("FieldValueRequired", &format!("{field}.name"), "Required value"));
        } else if !is_dns1035_label(version_name) {
            causes.push(cause(
                "FieldValueInvalid",
                &format!("{field}.name"),
                format!("Invalid value: {version_name:?}: a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character"),
            ));
        }
        if versions[..i].iter().any(|v| v["name"] == version["name"]) {
            causes.push(cause(
                "FieldValueDuplicate",
                &format!("{field}.name"),
                format!("Duplicate value: {:?}", version_name),
            ));
        }
        if !version["served"].is_boolean() {
            causes.push(cause("FieldValueRequired", &format!("{field}.served"), "Required value"));
        }
        if !version["storage"].is_boolean() {
            causes.push(cause("FieldValueRequired", &format!("{field}.storage"), "Required value"));
        }
        let schema = &version["schema"]["openAPIV3Schema"];
        if !schema.is_object() {
            causes.push(cause(
                "FieldValueRequired",
                &format!("{field}.schema.openAPIV3Schema"),
                "Required value: schemas are required",
            ));
        } else if schema["type"] != "object" && schema["x-kubernetes-preserve-unknown-fields"] != json!(true) {
            causes.push(cause(
                "FieldValueInvalid",
                &format!("{field}.schema.openAPIV3Schema.type"),
                format!("Invalid value: {:?}: must be object at the root", schema["type"].as_str().unwrap_or("")),
            ));
        } else {
            causes.extend(crate::rules::compile_errors(schema, &format!("{field}.schema.openAPIV3Schema")));
        }
        if let Some(columns) = version["additionalPrinterColumns"].as_array() {
            for (j, column) in columns.iter().enumerate() {
                for required in ["name", "type", "jsonPath"] {
                    if column[required].as_str().is_none_or(str::is_empty) {
                        causes.push(cause(
                            "FieldValueRequired",
                            &format!("{field}.additionalPrinterColumns[{j}].{required}"),
                            "Required value",
                        ));
                    }
                }
            }
        }
    }
    spec["versions"] = Value::Array(versions);
    if spec["conversion"].is_null() {
        spec["conversion"] = json!({"strategy": "None"});
    }
    match spec["conversion"]["strategy"].as_str() {
        Some("None") => {
            if spec["conversion"]["webhook"].is_object() {
                causes.push(cause(
                    "FieldValueForbidden",
                    "spec.conversion.webhook",
                    "Forbidden: should not be set when strategy is not set to Webhook",
                ));
            }
        }
        Some("Webhook") => validate_conversion_webhook(&mut spec["conversion"]["webhook"], &mut causes),
        other => causes.push(cause(
            "FieldValueNotSupported",
            "spec.conversion.strategy",
            format!("Unsupported value: {:?}: supported values: \"None\", \"Webhook\"", other.unwrap_or("")),
        )),
    }
    object["spec"] = spec;
    if let Some(old) = old {
        for field in ["group", "scope"] {
            if old["spec"][field] != object["spec"][field] && !(field == "scope" && old["spec"][field].is_null()) {
                causes.push(cause(
                    "FieldValueInvalid",
                    &format!("spec.{field}"),
                    format!("Invalid value: {}: field is immutable", object["spec"][field]),
                ));
            }
        }
    }
    if !causes.is_empty() {
        return Err(invalid_crd(&name, causes));
    }
    // Every definition keeps its objects until they are gone.
    let finalizers = object["metadata"]["finalizers"].as_array().cloned().unwrap_or_default();
    if old.is_none() && !finalizers.iter().any(|f| f == CLEANUP_FINALIZER) {
        let mut finalizers = finalizers;
        finalizers.push(json!(CLEANUP_FINALIZER));
        object["metadata"]["finalizers"] = Value::Array(finalizers);
    }
    set_status(object, others, old);
    Ok(())
}

fn now() -> String {
    crate::object::now_rfc3339()
}

/// The status upstream's naming and establishing controllers give a definition.
fn set_status(object: &mut Value, others: &[Arc<Value>], old: Option<&Value>) {
    let spec = object["spec"].clone();
    let group = spec["group"].as_str().unwrap_or_default();
    let names = &spec["names"];
    // Names another definition of the group has taken first: the plural (the name) cannot be,
    // the kind, singular and short names can.
    let mut conflict = None;
    for other in
        others.iter().filter(|o| o["spec"]["group"] == group && o["metadata"]["name"] != object["metadata"]["name"])
    {
        let taken = if other["status"]["acceptedNames"]["kind"].is_string() {
            &other["status"]["acceptedNames"]
        } else {
            &other["spec"]["names"]
        };
        let taken_names: Vec<&str> = ["plural", "singular"]
            .iter()
            .filter_map(|f| taken[*f].as_str())
            .chain(taken["shortNames"].as_array().into_iter().flatten().filter_map(Value::as_str))
            .collect();
        // Upstream names the taken name: `"widget" is already in use`.
        let ours = [&names["plural"], &names["singular"]].into_iter().filter_map(Value::as_str);
        let ours = ours.chain(names["shortNames"].as_array().into_iter().flatten().filter_map(Value::as_str));
        for name in ours {
            if taken_names.contains(&name) {
                conflict = Some(format!("{name:?} is already in use"));
            }
        }
        if taken["kind"] == names["kind"] {
            conflict = Some(format!("{:?} is already in use", names["kind"].as_str().unwrap_or("")));
        }
        if conflict.is_some() {
            break;
        }
    }
    let old_status = old.map(|o| &o["status"]);
    let transition = |kind: &str, status: &str| -> String {
        old_status
            .and_then(|s| s["conditions"].as_array())
            .and_then(|c| c.iter().find(|c| c["type"] == kind && c["status"] == status))
            .and_then(|c| c["lastTransitionTime"].as_str())
            .map(str::to_string)
            .unwrap_or_else(now)
    };
    let mut conditions = Vec::new();
    let mut status = json!({});
    match &conflict {
        None => {
            status["acceptedNames"] = names.clone();
            conditions.push(json!({"type": "NamesAccepted", "status": "True", "reason": "NoConflicts",
                "message": "no conflicts found", "lastTransitionTime": transition("NamesAccepted", "True")}));
            conditions.push(json!({"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                "message": "the initial names have been accepted", "lastTransitionTime": transition("Established", "True")}));
        }
        Some(message) => {
            // What was accepted before stays accepted.
            status["acceptedNames"] = old_status
                .map(|s| s["acceptedNames"].clone())
                .filter(|n| n.is_object())
                .unwrap_or_else(|| json!({"plural": "", "kind": ""}));
            conditions.push(json!({"type": "NamesAccepted", "status": "False", "reason": "NameConflict",
                "message": message, "lastTransitionTime": transition("NamesAccepted", "False")}));
            let established = old.is_some_and(|o| condition_true(o, "Established"));
            conditions.push(if established {
                json!({"type": "Established", "status": "True", "reason": "InitialNamesAccepted",
                    "message": "the initial names have been accepted", "lastTransitionTime": transition("Established", "True")})
            } else {
                json!({"type": "Established", "status": "False", "reason": "NotAccepted",
                    "message": "not all names are accepted", "lastTransitionTime": transition("Established", "False")})
            });
        }
    }
    if is_terminating(object) {
        conditions.push(json!({"type": "Terminating", "status": "True", "reason": "InstanceDeletionInProgress",
            "message": "CustomResource deletion is in progress", "lastTransitionTime": transition("Terminating", "True")}));
    }
    status["conditions"] = Value::Array(conditions);
    let mut stored: Vec<Value> = old_status.and_then(|s| s["storedVersions"].as_array()).cloned().unwrap_or_default();
    if let Some(storage) = storage_version(object)
        && !stored.iter().any(|v| v == &json!(storage))
    {
        stored.push(json!(storage));
    }
    status["storedVersions"] = Value::Array(stored);
    object["status"] = status;
}

// ---- custom resources: pruning, defaulting and validation by the structural schema ----

#[cfg(test)]
mod tests {
    use super::*;
    use crate::custom::{default, json_path, prune, validate, version_priority};
    use crate::custom_kinds::resources_of;

    fn crd() -> Value {
        json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.com"},
            "spec": {
                "group": "example.com",
                "scope": "Namespaced",
                "names": {"plural": "widgets", "kind": "Widget", "shortNames": ["wg"]},
                "versions": [{
                    "name": "v1", "served": true, "storage": true,
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                        "spec": {"type": "object", "required": ["size"], "properties": {
                            "size": {"type": "integer", "minimum": 1, "maximum": 10},
                            "color": {"type": "string", "enum": ["red", "blue"], "default": "red"},
                        }},
                    }}},
                }],
            },
        })
    }

    #[test]
    fn a_valid_definition_is_established_with_defaults_and_the_cleanup_finalizer() {
        let mut object = crd();
        prepare(&mut object, &[], None).unwrap();
        assert_eq!(object["spec"]["names"]["singular"], "widget");
        assert_eq!(object["spec"]["names"]["listKind"], "WidgetList");
        assert_eq!(object["spec"]["conversion"]["strategy"], "None");
        assert_eq!(object["metadata"]["finalizers"], json!([CLEANUP_FINALIZER]));
        assert!(condition_true(&object, "Established"));
        assert_eq!(object["status"]["storedVersions"], json!(["v1"]));
        let resources = resources_of(&object);
        assert_eq!(resources.len(), 1);
        assert_eq!(resources[0].storage, "example.com/widgets");
        assert_eq!(resources[0].short_names, ["wg"]);
        // Interned: the same definition makes the same resource.
        assert!(std::ptr::eq(resources[0], resources_of(&object)[0]));
    }

    #[test]
    fn a_definition_whose_name_does_not_match_is_refused_with_the_field() {
        let mut object = crd();
        object["metadata"]["name"] = json!("gadgets.example.com");
        object["spec"]["versions"][0]["storage"] = json!(false);
        let error = prepare(&mut object, &[], None).unwrap_err();
        assert_eq!(error.code, 422);
        let fields: Vec<&str> = error.causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(fields, ["metadata.name", "spec.versions"]);
    }

    #[test]
    fn a_kind_taken_in_the_group_is_not_accepted() {
        let mut first = crd();
        prepare(&mut first, &[], None).unwrap();
        let mut second = crd();
        second["metadata"]["name"] = json!("gizmos.example.com");
        second["spec"]["names"] = json!({"plural": "gizmos", "kind": "Widget"});
        prepare(&mut second, &[Arc::new(first)], None).unwrap();
        assert!(!condition_true(&second, "Established"));
        assert!(resources_of(&second).is_empty());
    }

    #[test]
    fn objects_are_pruned_defaulted_and_validated_by_the_schema() {
        let mut object = crd();
        prepare(&mut object, &[], None).unwrap();
        let custom = resources_of(&object)[0].custom.unwrap();
        let mut widget = json!({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"},
            "spec": {"size": 11, "extra": true}, "other": 1});
        let unknown = prune(custom, &mut widget);
        assert_eq!(unknown, ["other", "spec.extra"]);
        default(custom, &mut widget);
        assert_eq!(widget["spec"]["color"], "red");
        let causes = validate(custom, &widget, None);
        assert_eq!(causes.len(), 1);
        assert_eq!(causes[0].field, "spec.size");
        assert_eq!(causes[0].message, "Invalid value: 11: spec.size in body should be less than or equal to 10");
        let causes = validate(custom, &json!({"spec": {"size": "big", "color": "green"}}), None);
        let messages: Vec<&str> = causes.iter().map(|c| c.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "Unsupported value: \"green\": supported values: \"red\", \"blue\"",
                "Invalid value: \"string\": spec.size in body must be of type integer: \"string\"",
            ]
        );
        assert_eq!(validate(custom, &json!({"spec": {}}), None)[0].field, "spec.size");
    }

    #[test]
    fn versions_sort_as_upstream_prefers_them() {
        let mut versions = vec!["v1alpha1", "v2beta1", "v1", "v1beta2", "v2", "foo"];
        versions.sort_by(|a, b| version_priority(a, b));
        assert_eq!(versions, ["v2", "v1", "v2beta1", "v1beta2", "v1alpha1", "foo"]);
    }

    #[test]
    fn printer_columns_follow_json_paths() {
        let object = json!({"spec": {"items": [{"name": "a"}], "size": 3}});
        assert_eq!(json_path(&object, ".spec.items[0].name"), Some(&json!("a")));
        assert_eq!(json_path(&object, "{.spec.size}"), Some(&json!(3)));
        assert_eq!(json_path(&object, ".spec.missing"), None);
    }
}
