//! What an admission webhook or policy applies to: a request's [`Attributes`], the rules
//! (operations, groups, versions, resources and subresources, scope, `matchPolicy:
//! Equivalent`), the namespace and object selectors, and the AdmissionReview request a
//! webhook (or a policy's `request` variable) sees, in the version it asks for. Shared by
//! [`crate::admission`] (webhooks) and [`crate::policy`] (ValidatingAdmissionPolicies).

use serde_json::{Value, json};

use crate::auth::UserInfo;
use crate::registry::{self, Resource};
use crate::state::{ApiState, cached_get};
use crate::status::ApiError;

/// What a request does to its object, as `AdmissionRequest.operation` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Create,
    Update,
    Delete,
    Connect,
}

impl Operation {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Operation::Create => "CREATE",
            Operation::Update => "UPDATE",
            Operation::Delete => "DELETE",
            Operation::Connect => "CONNECT",
        }
    }
}

/// One request to admit.
pub struct Attributes<'a> {
    pub resource: &'a Resource,
    /// `""`, `status`, `scale`, `attach`, …
    pub subresource: &'a str,
    pub operation: Operation,
    pub namespace: Option<&'a str>,
    pub name: &'a str,
    /// The object before the request (updates and deletes).
    pub old: Option<&'a Value>,
    /// `CreateOptions`, `UpdateOptions`, `DeleteOptions`, or a connect request's options
    /// object (`PodAttachOptions`), which is then the reviewed object too.
    pub options: Value,
    pub dry_run: bool,
    pub user: Option<&'a UserInfo>,
}

/// `kind`, `resource` of the reviewed object: a subresource's own kind where it has one.
pub(crate) fn reviewed_kind(resource: &Resource, subresource: &str) -> (String, String, String) {
    match (resource.builtin(), subresource) {
        ("pods", "attach") => ("".into(), "v1".into(), "PodAttachOptions".into()),
        ("pods", "exec") => ("".into(), "v1".into(), "PodExecOptions".into()),
        ("pods", "portforward") => ("".into(), "v1".into(), "PodPortForwardOptions".into()),
        ("pods", "proxy") | ("services", "proxy") | ("nodes", "proxy") => {
            ("".into(), "v1".into(), format!("{}ProxyOptions", resource.kind))
        }
        ("pods", "binding") => ("".into(), "v1".into(), "Binding".into()),
        ("pods", "eviction") => ("policy".into(), "v1".into(), "Eviction".into()),
        ("serviceaccounts", "token") => ("authentication.k8s.io".into(), "v1".into(), "TokenRequest".into()),
        (_, "scale") if resource.custom.is_none() => ("autoscaling".into(), "v1".into(), "Scale".into()),
        _ => (resource.group.into(), resource.version.into(), resource.kind.into()),
    }
}

/// Whether one of the rules of `webhook` takes the request.
pub(crate) fn rules_match(webhook: &Value, attributes: &Attributes<'_>) -> bool {
    rules_take(webhook, attributes.resource, attributes.subresource, attributes.operation)
}

/// Whether one of the rules of `webhook` takes `operation` on `resource` (and `subresource`).
fn rules_take(webhook: &Value, resource: &Resource, subresource: &str, operation: Operation) -> bool {
    let listed = |list: &Value, value: &str| {
        list.as_array().is_some_and(|items| items.iter().any(|item| item == "*" || item == value))
    };
    webhook["rules"].as_array().into_iter().flatten().any(|rule| {
        listed(&rule["operations"], operation.as_str())
            && listed(&rule["apiGroups"], resource.group)
            && listed(&rule["apiVersions"], resource.version)
            && rule["resources"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .any(|pattern| resource_matches(pattern, resource.plural, subresource))
            && match rule["scope"].as_str().unwrap_or("*") {
                "Cluster" => !resource.namespaced,
                "Namespaced" => resource.namespaced,
                _ => true,
            }
    })
}

/// How the rules of `webhook` (a webhook, or a policy's `{"rules": …, "matchPolicy": …}`) take
/// the request: as it is, or — under `matchPolicy: Equivalent`, upstream's default — as another
/// version of the same objects (the resources stored alike: autoscaling/v1 and v2
/// HorizontalPodAutoscalers, core and events.k8s.io Events, the versions of a custom resource).
pub(crate) enum Matched {
    Exactly,
    As(&'static Resource),
}

pub(crate) fn rules_take_request(state: &ApiState, webhook: &Value, attributes: &Attributes<'_>) -> Option<Matched> {
    if rules_match(webhook, attributes) {
        return Some(Matched::Exactly);
    }
    if webhook["matchPolicy"] == "Exact" {
        return None;
    }
    let requested = attributes.resource;
    state
        .resources()
        .into_iter()
        .filter(|r| r.storage == requested.storage && *r != requested && !r.is_review())
        .find(|r| rules_take(webhook, r, attributes.subresource, attributes.operation))
        .map(Matched::As)
}

/// `object`, an object of `from`, as an object of `to` (another version of the same stored
/// objects): through the stored form for built-in kinds, by the definition's conversion for
/// custom ones.
pub(crate) async fn convert_between(
    state: &ApiState,
    from: &Resource,
    to: &Resource,
    object: Value,
) -> Result<Value, ApiError> {
    if from == to || !object.is_object() {
        return Ok(object);
    }
    let stored = match from.conversion {
        Some(conversion) => (conversion.to_storage)(object),
        None => object,
    };
    crate::conversion::convert_one(state.store.as_ref(), to, crate::object::from_storage(to, stored)).await
}

/// Whether a request for `subresource` carries the resource's own kind (so an equivalent
/// version reviews it converted); a scale carries `autoscaling/v1` Scale in every version.
pub(crate) fn carries_own_kind(subresource: &str) -> bool {
    matches!(subresource, "" | "status")
}

/// Upstream's resource patterns: `pods` (the resource, no subresource), `pods/status`,
/// `pods/*`, `*` (every resource, no subresource), `*/status`, `*/*` (everything).
pub(crate) fn resource_matches(pattern: &str, plural: &str, subresource: &str) -> bool {
    match pattern.split_once('/') {
        None => (pattern == "*" || pattern == plural) && subresource.is_empty(),
        Some((resource, sub)) => {
            (resource == "*" || resource == plural) && (sub == "*" || sub == subresource) && !subresource.is_empty()
                || pattern == "*/*"
        }
    }
}

/// Whether the webhook's namespace and object selectors take the request.
pub(crate) async fn selectors_match(
    state: &ApiState,
    webhook: &Value,
    attributes: &Attributes<'_>,
    object: Option<&Value>,
) -> Result<bool, ApiError> {
    let objects = [object, attributes.old];
    let labels_of = |o: &Value| o["metadata"].get("labels").cloned().unwrap_or_else(|| json!({}));
    let selector = &webhook["objectSelector"];
    // A connect request's options have no labels: only an empty selector takes them.
    if !is_empty_selector(selector)
        && (attributes.operation == Operation::Connect
            || !objects.iter().flatten().any(|o| crate::selector::label_selector_matches(selector, &labels_of(o))))
    {
        return Ok(false);
    }
    let selector = &webhook["namespaceSelector"];
    if is_empty_selector(selector) {
        return Ok(true);
    }
    let resource = attributes.resource;
    if resource.builtin() == "namespaces" && resource.group.is_empty() && attributes.subresource.is_empty() {
        // A namespace is matched by its own labels.
        let labels = objects.iter().flatten().find(|o| o.is_object()).map(|o| labels_of(o)).unwrap_or_default();
        return Ok(crate::selector::label_selector_matches(selector, &labels));
    }
    let Some(namespace) = attributes.namespace.filter(|_| resource.namespaced) else {
        // Cluster-scoped objects are not in a namespace: the selector does not apply.
        return Ok(true);
    };
    let namespaces = registry::find("", "v1", "namespaces").expect("namespaces are served");
    let labels = match cached_get(state, namespaces, None, namespace).await? {
        Some(found) => labels_of(&found),
        None => json!({}),
    };
    Ok(crate::selector::label_selector_matches(selector, &labels))
}

fn is_empty_selector(selector: &Value) -> bool {
    match selector {
        Value::Null => true,
        Value::Object(map) => map.values().all(|v| match v {
            Value::Null => true,
            Value::Array(list) => list.is_empty(),
            Value::Object(map) => map.is_empty(),
            _ => false,
        }),
        _ => false,
    }
}

/// The AdmissionReview request for `attributes` and `object`.
pub(crate) fn review_request(attributes: &Attributes<'_>, object: Option<&Value>, uid: &str) -> Value {
    let resource = attributes.resource;
    let (group, version, kind) = reviewed_kind(resource, attributes.subresource);
    let kind = json!({"group": group, "version": version, "kind": kind});
    let gvr = json!({"group": resource.group, "version": resource.version, "resource": resource.plural});
    let mut request = json!({
        "uid": uid,
        "kind": kind,
        "resource": gvr,
        "requestKind": kind,
        "requestResource": gvr,
        "operation": attributes.operation.as_str(),
        "userInfo": match attributes.user {
            Some(user) => user.to_json(),
            None => json!({}),
        },
        "object": object.cloned().unwrap_or(Value::Null),
        "oldObject": attributes.old.cloned().unwrap_or(Value::Null),
        "dryRun": attributes.dry_run,
        "options": attributes.options,
    });
    if !attributes.subresource.is_empty() {
        request["subResource"] = json!(attributes.subresource);
        request["requestSubResource"] = json!(attributes.subresource);
    }
    if !attributes.name.is_empty() {
        request["name"] = json!(attributes.name);
    }
    if let Some(namespace) = attributes.namespace.filter(|_| resource.namespaced || resource.builtin() == "namespaces")
    {
        request["namespace"] = json!(namespace);
    }
    if resource.builtin() == "namespaces" && resource.group.is_empty() && !attributes.name.is_empty() {
        request["namespace"] = json!(attributes.name);
    }
    request
}

/// The review request of `attributes` for `hook`, and the object it reviews when that is the
/// object converted to the equivalent version the hook's rules take.
pub(crate) async fn versioned_request(
    state: &ApiState,
    equivalent: Option<&'static Resource>,
    attributes: &Attributes<'_>,
    object: Option<&Value>,
    uid: &str,
) -> Result<(Value, Option<Value>), ApiError> {
    let Some(resource) = equivalent else { return Ok((review_request(attributes, object, uid), None)) };
    let converts = carries_own_kind(attributes.subresource);
    let convert = |object: Option<&Value>| {
        let object = object.cloned();
        async move {
            match object {
                Some(object) if converts => {
                    convert_between(state, attributes.resource, resource, object).await.map(Some)
                }
                other => Ok(other),
            }
        }
    };
    let converted = convert(object).await?;
    let old = convert(attributes.old).await?;
    let as_equivalent = Attributes { resource, old: old.as_ref(), options: attributes.options.clone(), ..*attributes };
    let mut request = review_request(&as_equivalent, converted.as_ref(), uid);
    // What was asked for stays in `requestKind`, `requestResource` (and the subresource).
    let asked = review_request(attributes, None, uid);
    for field in ["requestKind", "requestResource"] {
        request[field] = asked[field].clone();
    }
    Ok((request, converted.filter(|_| converts)))
}

pub const GROUP: &str = "admissionregistration.k8s.io";
