//! Admission webhooks (`admissionregistration.k8s.io/v1`): the Mutating and Validating webhook
//! configurations are validated and defaulted as upstream's, and every write the API serves is
//! sent, as an `AdmissionReview`, to the webhooks whose rules, scope, namespace and object
//! selectors and CEL match conditions take it.
//!
//! Mutating webhooks are called one by one, in the order of their configurations' names, and
//! their JSON patches applied; the ones that ask for it (`reinvocationPolicy: IfNeeded`) are
//! called again once when a later webhook changed the object. Validating webhooks are called
//! together, after the object is validated. A webhook is reached over HTTPS at its URL or
//! through its Service (the Service's ready endpoints, as upstream's API server reaches it with
//! aggregator routing, so the API server need not run a service proxy), verified with the
//! configuration's `caBundle` as `<service>.<namespace>.svc`. A call that fails is a refusal
//! under `failurePolicy: Fail` and skipped under `Ignore`; a refusal carries the webhook's
//! message; warnings go back to the client. The configurations themselves are never sent to
//! webhooks, so a webhook cannot lock its own configuration.

use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

use crate::auth::UserInfo;
use crate::matching::{
    Attributes, GROUP, Matched, Operation, convert_between, reviewed_kind, rules_take_request, selectors_match,
    versioned_request,
};
use crate::outbound::post;
use crate::registry::{self, Resource};
use crate::request::Write;
use crate::state::{ApiState, cached_list};
use crate::status::{ApiError, Cause};

/// Whether requests for `resource` are never sent to webhooks: the admission configurations
/// themselves (so no webhook can keep them from being fixed or deleted).
fn exempt(resource: &Resource) -> bool {
    resource.group == GROUP
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Mutating,
    Validating,
}

impl Kind {
    fn plural(self) -> &'static str {
        match self {
            Kind::Mutating => "mutatingwebhookconfigurations",
            Kind::Validating => "validatingwebhookconfigurations",
        }
    }
}

/// One webhook of a configuration, as it is called.
struct Hook {
    name: String,
    webhook: Value,
    /// Under `matchPolicy: Equivalent`, the other version of the requested resource its rules
    /// take (the webhook then reviews the object in that version).
    equivalent: Option<&'static Resource>,
}

impl Hook {
    fn ignores_failures(&self) -> bool {
        self.webhook["failurePolicy"] == "Ignore"
    }

    fn reinvoked(&self) -> bool {
        self.webhook["reinvocationPolicy"] == "IfNeeded"
    }

    fn timeout(&self) -> Duration {
        Duration::from_secs(self.webhook["timeoutSeconds"].as_u64().unwrap_or(10).clamp(1, 30))
    }
}

/// The webhooks of every configuration of `kind`: configurations in name order, their webhooks
/// in the order given.
async fn hooks(state: &ApiState, kind: Kind) -> Result<Vec<Hook>, ApiError> {
    let resource = registry::find(GROUP, "v1", kind.plural()).expect("webhook configurations are served");
    let mut configurations = cached_list(state, resource, None).await?;
    if configurations.is_empty() {
        return Ok(Vec::new());
    }
    configurations.sort_by(|a, b| a["metadata"]["name"].as_str().cmp(&b["metadata"]["name"].as_str()));
    let mut hooks = Vec::new();
    for mut configuration in configurations {
        let webhooks = configuration["webhooks"].take();
        for mut webhook in webhooks.as_array().cloned().unwrap_or_default() {
            // Defaults written since: the configuration as served.
            default_webhook(kind, &mut webhook);
            let name = webhook["name"].as_str().unwrap_or_default().to_string();
            hooks.push(Hook { name, webhook, equivalent: None });
        }
    }
    Ok(hooks)
}

/// The webhook's CEL match conditions: all must hold for it to be called. An expression that
/// cannot be evaluated is a failure of the call (the failure policy decides).
fn conditions_match(webhook: &Value, request: &Value) -> Result<bool, String> {
    let Some(conditions) = webhook["matchConditions"].as_array().filter(|c| !c.is_empty()) else {
        return Ok(true);
    };
    let mut context = cel::Context::default();
    for variable in ["object", "oldObject"] {
        context.add_variable_from_value(variable, crate::rules::to_cel(&request[variable]));
    }
    context.add_variable_from_value("request", crate::rules::to_cel(request));
    for condition in conditions {
        let name = condition["name"].as_str().unwrap_or_default();
        let expression = condition["expression"].as_str().unwrap_or_default();
        let program = cel::Program::compile(expression)
            .map_err(|e| format!("compilation failed for match condition {name:?}: {e}"))?;
        match program.execute(&context) {
            Ok(cel::Value::Bool(true)) => {}
            Ok(cel::Value::Bool(false)) => return Ok(false),
            Ok(other) => {
                return Err(format!("match condition {name:?} evaluated to {other:?}, not a bool"));
            }
            Err(error) => return Err(format!("match condition {name:?} failed: {error}")),
        }
    }
    Ok(true)
}

/// What a webhook answered.
struct Answer {
    allowed: bool,
    status: Value,
    patch: Option<Vec<u8>>,
    warnings: Vec<String>,
}

/// A call that did not get an answer, or got one that is not an AdmissionReview.
struct CallError(String);

/// Calls one webhook with the review `request`.
async fn call(state: &ApiState, hook: &Hook, request: &Value) -> Result<Answer, CallError> {
    let webhook = &hook.webhook;
    let versions: Vec<&str> =
        webhook["admissionReviewVersions"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let version = if versions.contains(&"v1") || !versions.contains(&"v1beta1") { "v1" } else { "v1beta1" };
    let review =
        json!({"apiVersion": format!("admission.k8s.io/{version}"), "kind": "AdmissionReview", "request": request});
    let review = post(state.store.as_ref(), &webhook["clientConfig"], hook.timeout(), &review)
        .await
        .map_err(|e| CallError(format!("failed to call webhook: {e}")))?;
    let response = &review["response"];
    let uid = &request["uid"];
    if response["uid"] != *uid {
        return Err(CallError(format!(
            "received invalid webhook response: expected response.uid={uid}, got {}",
            response["uid"]
        )));
    }
    let patch = match response["patch"].as_str() {
        Some(encoded) if !encoded.is_empty() => {
            if response["patchType"].as_str().is_some_and(|t| t != "JSONPatch") {
                return Err(CallError(format!(
                    "received invalid webhook response: unsupported patch type {}",
                    response["patchType"]
                )));
            }
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(encoded)
                .map_err(|e| CallError(format!("received invalid webhook response: the patch is not base64: {e}")))?;
            Some(decoded)
        }
        _ => None,
    };
    Ok(Answer {
        allowed: response["allowed"].as_bool().unwrap_or(false),
        status: response["status"].clone(),
        patch,
        warnings: response["warnings"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|w| w.as_str().map(String::from))
            .collect(),
    })
}

/// The error a refusal is: upstream's `admission webhook "<name>" denied the request: …`.
fn refusal(name: &str, status: &Value) -> ApiError {
    let denied = format!("admission webhook {name:?} denied the request");
    let message = status["message"].as_str().filter(|m| !m.is_empty());
    let reason_text = status["reason"].as_str().filter(|r| !r.is_empty());
    let message = match (message, reason_text) {
        (Some(message), _) => format!("{denied}: {message}"),
        (None, Some(reason)) => format!("{denied}: {reason}"),
        _ => format!("{denied} without explanation"),
    };
    let code = status["code"].as_u64().filter(|c| (400..600).contains(c)).unwrap_or(403) as u16;
    let reason = match code {
        400 => "BadRequest",
        401 => "Unauthorized",
        404 => "NotFound",
        409 => "Conflict",
        410 => "Gone",
        422 => "Invalid",
        429 => "TooManyRequests",
        500 => "InternalError",
        503 => "ServiceUnavailable",
        504 => "Timeout",
        _ => "Forbidden",
    };
    ApiError::new(code, reason, message)
}

fn call_failure(name: &str, error: &CallError) -> ApiError {
    ApiError::internal(format!("Internal error occurred: failed calling webhook {name:?}: {}", error.0))
}

/// Whether a hook may be called for a dry run: only one that declares no side effects.
fn dry_run_allowed(hook: &Hook, attributes: &Attributes<'_>) -> Result<(), ApiError> {
    if attributes.dry_run && !matches!(hook.webhook["sideEffects"].as_str(), Some("None" | "NoneOnDryRun")) {
        return Err(ApiError::bad_request(format!("admission webhook {:?} does not support dry run", hook.name)));
    }
    Ok(())
}

/// The hooks of `kind` that take the request, each with the review request it is sent.
async fn matching(
    state: &ApiState,
    kind: Kind,
    attributes: &Attributes<'_>,
    object: Option<&Value>,
) -> Result<Vec<Hook>, ApiError> {
    if exempt(attributes.resource) {
        return Ok(Vec::new());
    }
    let mut taken = Vec::new();
    for mut hook in hooks(state, kind).await? {
        let Some(matched) = rules_take_request(state, &hook.webhook, attributes) else { continue };
        if selectors_match(state, &hook.webhook, attributes, object).await? {
            if let Matched::As(resource) = matched {
                hook.equivalent = Some(resource);
            }
            taken.push(hook);
        }
    }
    Ok(taken)
}

/// Calls one hook; `Ok(None)` when it is skipped (its conditions do not hold, or it failed
/// under `failurePolicy: Ignore`). With the answer, the object as the hook reviewed it when
/// that was another version of it.
async fn invoke(
    state: &ApiState,
    hook: &Hook,
    attributes: &Attributes<'_>,
    object: Option<&Value>,
    write: &Write,
) -> Result<Option<(Answer, Option<Value>)>, ApiError> {
    let uid = uuid::Uuid::new_v4().to_string();
    let (request, reviewed) = versioned_request(state, hook.equivalent, attributes, object, &uid).await?;
    let outcome = match conditions_match(&hook.webhook, &request) {
        Ok(false) => return Ok(None),
        Ok(true) => {
            dry_run_allowed(hook, attributes)?;
            call(state, hook, &request).await
        }
        Err(error) => Err(CallError(error)),
    };
    match outcome {
        Ok(answer) => {
            write.warn(answer.warnings.iter().cloned());
            if !answer.allowed {
                return Err(refusal(&hook.name, &answer.status));
            }
            Ok(Some((answer, reviewed)))
        }
        Err(error) if hook.ignores_failures() => {
            tracing::warn!(webhook = %hook.name, error = %error.0, "failed calling webhook, failing open");
            Ok(None)
        }
        Err(error) => {
            tracing::warn!(webhook = %hook.name, error = %error.0, "failed calling webhook, failing closed");
            Err(call_failure(&hook.name, &error))
        }
    }
}

/// Runs the mutating webhooks on `object`; whether any changed it.
pub async fn mutate(
    state: &ApiState,
    attributes: &Attributes<'_>,
    object: &mut Value,
    write: &Write,
) -> Result<bool, ApiError> {
    let hooks = matching(state, Kind::Mutating, attributes, Some(object)).await?;
    if hooks.is_empty() {
        return Ok(false);
    }
    let mut changed = false;
    // Index of the last hook that changed the object, for reinvocation.
    let mut last_change = None;
    for (index, hook) in hooks.iter().enumerate() {
        if apply(state, hook, attributes, object, write).await? {
            changed = true;
            last_change = Some(index);
        }
    }
    // Reinvocation: the hooks that ask for it and ran before a later change run once more.
    if let Some(last) = last_change {
        for hook in hooks[..last].iter().filter(|h| h.reinvoked()) {
            apply(state, hook, attributes, object, write).await?;
        }
    }
    Ok(changed)
}

/// Calls one mutating hook and applies its patch; whether the object changed.
async fn apply(
    state: &ApiState,
    hook: &Hook,
    attributes: &Attributes<'_>,
    object: &mut Value,
    write: &Write,
) -> Result<bool, ApiError> {
    let Some((answer, reviewed)) = invoke(state, hook, attributes, Some(object), write).await? else {
        return Ok(false);
    };
    let Some(patch) = answer.patch else { return Ok(false) };
    if attributes.operation == Operation::Delete || attributes.operation == Operation::Connect {
        return Ok(false);
    }
    let failed = |why: String| {
        let error = CallError(format!("received invalid webhook response: {why}"));
        if hook.ignores_failures() { None } else { Some(call_failure(&hook.name, &error)) }
    };
    let patch: json_patch::Patch = match serde_json::from_slice(&patch) {
        Ok(patch) => patch,
        Err(error) => return failed(format!("the patch is not a JSON patch: {error}")).map_or(Ok(false), Err),
    };
    // The patch is of the object as the hook saw it (in the version its rules take).
    let mut patched = reviewed.clone().unwrap_or_else(|| object.clone());
    if let Err(error) = crate::object::json_patch(&mut patched, &patch) {
        return failed(format!("the patch does not apply: {error}")).map_or(Ok(false), Err);
    }
    if !patched.is_object() {
        return failed("the patch does not leave an object".into()).map_or(Ok(false), Err);
    }
    if let (Some(equivalent), Some(_)) = (hook.equivalent, &reviewed) {
        patched = convert_between(state, equivalent, attributes.resource, patched).await?;
    }
    if patched == *object {
        return Ok(false);
    }
    *object = patched;
    Ok(true)
}

/// Runs the validating webhooks, all at once; the first refusal is the answer.
pub async fn validate(
    state: &ApiState,
    attributes: &Attributes<'_>,
    object: Option<&Value>,
    write: &Write,
) -> Result<(), ApiError> {
    if exempt(attributes.resource) {
        return Ok(());
    }
    crate::policy::validate(state, attributes, object, write).await?;
    let hooks = matching(state, Kind::Validating, attributes, object).await?;
    if hooks.is_empty() {
        return Ok(());
    }
    let calls = hooks.iter().map(|hook| invoke(state, hook, attributes, object, write));
    for result in futures::future::join_all(calls).await {
        result?;
    }
    Ok(())
}

/// Admits a connect request (`pods/exec`, `pods/attach`, `pods/portforward`): its options,
/// read from the query as upstream's `PodExecOptions` and the like, are the reviewed object.
pub async fn connect(
    state: &ApiState,
    user: Option<&UserInfo>,
    subresource: &str,
    namespace: &str,
    name: &str,
    raw_query: &str,
) -> Result<(), ApiError> {
    let pods = registry::find("", "v1", "pods").expect("pods are served");
    let pairs: Vec<(String, String)> = url::form_urlencoded::parse(raw_query.as_bytes()).into_owned().collect();
    let flag = |key: &str| pairs.iter().any(|(k, v)| k == key && matches!(v.as_str(), "true" | "1" | "True"));
    let all = |key: &str| -> Vec<String> { pairs.iter().filter(|(k, _)| k == key).map(|(_, v)| v.clone()).collect() };
    let (_, _, kind) = reviewed_kind(pods, subresource);
    let mut options = json!({"kind": kind, "apiVersion": "v1"});
    if subresource == "portforward" {
        let ports: Vec<i64> =
            all("ports").iter().flat_map(|p| p.split(',')).filter_map(|p| p.trim().parse().ok()).collect();
        if !ports.is_empty() {
            options["ports"] = json!(ports);
        }
    } else {
        for key in ["stdin", "stdout", "stderr", "tty"] {
            if flag(key) {
                options[key] = json!(true);
            }
        }
        if let Some(container) = all("container").into_iter().next() {
            options["container"] = json!(container);
        }
        if subresource == "exec" {
            options["command"] = json!(all("command"));
        }
    }
    let mut write = Write::internal("");
    write.user = user.cloned();
    let attributes = Attributes {
        resource: pods,
        subresource,
        operation: Operation::Connect,
        namespace: Some(namespace),
        name,
        old: None,
        options: options.clone(),
        dry_run: false,
        user,
    };
    let mut object = options;
    mutate(state, &attributes, &mut object, &write).await?;
    validate(state, &attributes, Some(&object), &write).await
}

/// Upstream's defaults for one webhook of a configuration.
fn default_webhook(kind: Kind, webhook: &mut Value) {
    let Some(map) = webhook.as_object_mut() else { return };
    map.entry("failurePolicy").or_insert(json!("Fail"));
    map.entry("matchPolicy").or_insert(json!("Equivalent"));
    for selector in ["namespaceSelector", "objectSelector"] {
        if map.get(selector).is_none_or(Value::is_null) {
            map.insert(selector.into(), json!({}));
        }
    }
    map.entry("timeoutSeconds").or_insert(json!(10));
    if kind == Kind::Mutating {
        map.entry("reinvocationPolicy").or_insert(json!("Never"));
    }
    if let Some(rules) = map.get_mut("rules").and_then(Value::as_array_mut) {
        for rule in rules.iter_mut().filter_map(Value::as_object_mut) {
            rule.entry("scope").or_insert(json!("*"));
        }
    }
    if let Some(service) = map.get_mut("clientConfig").and_then(|c| c.get_mut("service")).and_then(Value::as_object_mut)
    {
        service.entry("port").or_insert(json!(443));
    }
}

/// Defaults and validates a webhook configuration, a policy or a binding;
/// the causes of what is wrong, with upstream's field paths and wording.
pub fn prepare_configuration(resource: &Resource, object: &mut Value) -> Vec<Cause> {
    match resource.builtin() {
        "validatingadmissionpolicies" => return crate::policy::prepare_policy(object),
        "validatingadmissionpolicybindings" => return crate::policy::prepare_binding(object),
        _ => {}
    }
    let kind = if resource.plural == Kind::Mutating.plural() { Kind::Mutating } else { Kind::Validating };
    let mut causes = Vec::new();
    let mut cause =
        |reason: &'static str, field: String, message: String| causes.push(Cause { reason, message, field });
    let webhooks = match object.get_mut("webhooks") {
        None | Some(Value::Null) => return Vec::new(),
        Some(Value::Array(list)) => list,
        Some(_) => {
            cause("FieldValueInvalid", "webhooks".into(), "Invalid value: must be a list".into());
            return causes;
        }
    };
    let mut names = std::collections::HashSet::new();
    for (i, webhook) in webhooks.iter_mut().enumerate() {
        default_webhook(kind, webhook);
        let at = |field: &str| format!("webhooks[{i}].{field}");
        let name = webhook["name"].as_str().unwrap_or_default();
        if name.is_empty() {
            cause("FieldValueRequired", at("name"), "Required value".into());
        } else if !qualified_name(name) {
            cause(
                "FieldValueInvalid",
                at("name"),
                format!("Invalid value: {name:?}: should be a domain with at least three segments separated by dots"),
            );
        } else if !names.insert(name.to_string()) {
            cause("FieldValueDuplicate", at("name"), format!("Duplicate value: {name:?}"));
        }
        let versions = webhook["admissionReviewVersions"].as_array().cloned().unwrap_or_default();
        if versions.is_empty() {
            cause(
                "FieldValueRequired",
                at("admissionReviewVersions"),
                "Required value: must specify one of v1, v1beta1".into(),
            );
        } else if !versions.iter().any(|v| v == "v1" || v == "v1beta1") {
            cause(
                "FieldValueInvalid",
                at("admissionReviewVersions"),
                format!("Invalid value: {}: must include at least one of v1, v1beta1", Value::Array(versions)),
            );
        }
        match webhook["sideEffects"].as_str() {
            Some("None" | "NoneOnDryRun") => {}
            None => cause(
                "FieldValueRequired",
                at("sideEffects"),
                "Required value: must specify one of None, NoneOnDryRun".into(),
            ),
            Some(other) => cause(
                "FieldValueNotSupported",
                at("sideEffects"),
                format!("Unsupported value: {other:?}: supported values: \"None\", \"NoneOnDryRun\""),
            ),
        }
        for (field, allowed) in
            [("failurePolicy", &["Fail", "Ignore"][..]), ("matchPolicy", &["Equivalent", "Exact"][..])]
        {
            if let Some(value) = webhook[field].as_str().filter(|v| !allowed.contains(v)) {
                let supported: Vec<String> = allowed.iter().map(|a| format!("{a:?}")).collect();
                cause(
                    "FieldValueNotSupported",
                    at(field),
                    format!("Unsupported value: {value:?}: supported values: {}", supported.join(", ")),
                );
            }
        }
        if kind == Kind::Mutating
            && let Some(value) = webhook["reinvocationPolicy"].as_str().filter(|v| !["Never", "IfNeeded"].contains(v))
        {
            cause(
                "FieldValueNotSupported",
                at("reinvocationPolicy"),
                format!("Unsupported value: {value:?}: supported values: \"IfNeeded\", \"Never\""),
            );
        }
        if let Some(timeout) = webhook["timeoutSeconds"].as_i64().filter(|t| !(1..=30).contains(t)) {
            cause(
                "FieldValueInvalid",
                at("timeoutSeconds"),
                format!("Invalid value: {timeout}: the timeout value must be between 1 and 30 seconds"),
            );
        }
        validate_client_config(&webhook["clientConfig"], &at("clientConfig"), &mut cause);
        validate_rules(&webhook["rules"], &at("rules"), &mut cause);
        validate_conditions(&webhook["matchConditions"], &at("matchConditions"), &mut cause);
    }
    causes
}

fn qualified_name(name: &str) -> bool {
    let segments: Vec<&str> = name.split('.').collect();
    name.len() <= 253
        && segments.len() >= 3
        && segments.iter().all(|s| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !s.starts_with('-')
                && !s.ends_with('-')
        })
}

fn validate_client_config(config: &Value, at: &str, cause: &mut impl FnMut(&'static str, String, String)) {
    match (config.get("url").filter(|u| !u.is_null()), config.get("service").filter(|s| !s.is_null())) {
        (Some(_), Some(_)) | (None, None) => {
            cause("FieldValueRequired", at.into(), "Required value: exactly one of url or service is required".into())
        }
        (Some(url), None) => {
            let text = url.as_str().unwrap_or_default();
            match url::Url::parse(text) {
                Ok(parsed) if parsed.scheme() != "https" => cause(
                    "FieldValueInvalid",
                    format!("{at}.url"),
                    format!("Invalid value: {:?}: 'https' is the only allowed URL scheme", parsed.scheme()),
                ),
                Ok(parsed) if parsed.host_str().is_none_or(str::is_empty) => cause(
                    "FieldValueInvalid",
                    format!("{at}.url"),
                    format!("Invalid value: {text:?}: host must be specified"),
                ),
                Ok(parsed) if parsed.fragment().is_some() || !parsed.username().is_empty() => cause(
                    "FieldValueInvalid",
                    format!("{at}.url"),
                    format!("Invalid value: {text:?}: fragments and user information are not permitted"),
                ),
                Ok(_) => {}
                Err(error) => cause(
                    "FieldValueInvalid",
                    format!("{at}.url"),
                    format!("Invalid value: {text:?}: url must be a valid URL: {error}"),
                ),
            }
        }
        (None, Some(service)) => {
            for field in ["name", "namespace"] {
                if service[field].as_str().is_none_or(str::is_empty) {
                    cause(
                        "FieldValueRequired",
                        format!("{at}.service.{field}"),
                        "Required value: service name is required".replace("name", field),
                    );
                }
            }
            if let Some(port) = service["port"].as_i64().filter(|p| !(1..=65535).contains(p)) {
                cause(
                    "FieldValueInvalid",
                    format!("{at}.service.port"),
                    format!("Invalid value: {port}: port is not valid: must be between 1 and 65535, inclusive"),
                );
            }
            if let Some(path) = service["path"].as_str().filter(|p| !p.is_empty() && !p.starts_with('/')) {
                cause(
                    "FieldValueInvalid",
                    format!("{at}.service.path"),
                    format!("Invalid value: {path:?}: must start with a '/'"),
                );
            }
        }
    }
    if let Some(bundle) = config["caBundle"].as_str().filter(|b| !b.is_empty())
        && base64::engine::general_purpose::STANDARD.decode(bundle).is_err()
    {
        cause("FieldValueInvalid", format!("{at}.caBundle"), "Invalid value: not base64".into());
    }
}

fn validate_rules(rules: &Value, at: &str, cause: &mut impl FnMut(&'static str, String, String)) {
    for (i, rule) in rules.as_array().into_iter().flatten().enumerate() {
        let at = |field: &str| format!("{at}[{i}].{field}");
        for field in ["operations", "apiGroups", "apiVersions", "resources"] {
            if rule[field].as_array().is_none_or(Vec::is_empty) {
                cause("FieldValueRequired", at(field), "Required value".into());
            }
        }
        for (j, operation) in rule["operations"].as_array().into_iter().flatten().enumerate() {
            let operation = operation.as_str().unwrap_or_default();
            if !["*", "CREATE", "UPDATE", "DELETE", "CONNECT"].contains(&operation) {
                cause(
                    "FieldValueNotSupported",
                    format!("{}[{j}]", at("operations")),
                    format!(
                        "Unsupported value: {operation:?}: supported values: \"*\", \"CONNECT\", \"CREATE\", \"DELETE\", \"UPDATE\""
                    ),
                );
            }
        }
        for (j, pattern) in rule["resources"].as_array().into_iter().flatten().enumerate() {
            let pattern = pattern.as_str().unwrap_or_default();
            if pattern.is_empty() || pattern.matches('/').count() > 1 {
                cause(
                    "FieldValueInvalid",
                    format!("{}[{j}]", at("resources")),
                    format!("Invalid value: {pattern:?}: resource must not be empty"),
                );
            }
        }
        if let Some(scope) = rule["scope"].as_str().filter(|s| !["*", "Cluster", "Namespaced"].contains(s)) {
            cause(
                "FieldValueNotSupported",
                at("scope"),
                format!("Unsupported value: {scope:?}: supported values: \"*\", \"Cluster\", \"Namespaced\""),
            );
        }
    }
}

fn validate_conditions(conditions: &Value, at: &str, cause: &mut impl FnMut(&'static str, String, String)) {
    let list = conditions.as_array().cloned().unwrap_or_default();
    if list.len() > 64 {
        cause("TooMany", at.into(), format!("Too many: {}: must have at most 64 items", list.len()));
    }
    let mut names = std::collections::HashSet::new();
    for (i, condition) in list.iter().enumerate() {
        let name = condition["name"].as_str().unwrap_or_default();
        if name.is_empty() {
            cause("FieldValueRequired", format!("{at}[{i}].name"), "Required value".into());
        } else if !names.insert(name) {
            cause("FieldValueDuplicate", format!("{at}[{i}].name"), format!("Duplicate value: {name:?}"));
        }
        let expression = condition["expression"].as_str().unwrap_or_default();
        if expression.trim().is_empty() {
            cause("FieldValueRequired", format!("{at}[{i}].expression"), "Required value".into());
        } else if let Err(error) = cel::Program::compile(expression) {
            let first = error.to_string();
            cause(
                "FieldValueInvalid",
                format!("{at}[{i}].expression"),
                format!(
                    "Invalid value: {expression:?}: compilation failed: {}",
                    first.lines().next().unwrap_or_default()
                ),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::matching::resource_matches;
    use crate::matching::rules_match;

    fn configmaps() -> &'static Resource {
        registry::find("", "v1", "configmaps").unwrap()
    }

    fn attributes(resource: &'static Resource, subresource: &'static str, operation: Operation) -> Attributes<'static> {
        Attributes {
            resource,
            subresource,
            operation,
            namespace: Some("ns"),
            name: "x",
            old: None,
            options: json!({}),
            dry_run: false,
            user: None,
        }
    }

    #[test]
    fn resource_patterns_are_upstreams() {
        assert!(resource_matches("pods", "pods", ""));
        assert!(!resource_matches("pods", "pods", "status"));
        assert!(resource_matches("pods/status", "pods", "status"));
        assert!(resource_matches("pods/*", "pods", "attach"));
        assert!(!resource_matches("pods/*", "pods", ""));
        assert!(resource_matches("*", "configmaps", ""));
        assert!(!resource_matches("*", "pods", "attach"));
        assert!(resource_matches("*/scale", "deployments", "scale"));
        assert!(resource_matches("*/*", "pods", ""));
        assert!(resource_matches("*/*", "pods", "exec"));
    }

    #[test]
    fn rules_take_operations_groups_versions_and_scope() {
        let webhook = json!({"rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["configmaps"], "scope": "Namespaced"}]});
        assert!(rules_match(&webhook, &attributes(configmaps(), "", Operation::Create)));
        assert!(!rules_match(&webhook, &attributes(configmaps(), "", Operation::Update)));
        let deployments = registry::find("apps", "v1", "deployments").unwrap();
        assert!(!rules_match(&webhook, &attributes(deployments, "", Operation::Create)));
        let cluster = json!({"rules": [{"operations": ["*"], "apiGroups": ["*"], "apiVersions": ["*"], "resources": ["*"], "scope": "Cluster"}]});
        assert!(!rules_match(&cluster, &attributes(configmaps(), "", Operation::Create)));
        let namespaces = registry::find("", "v1", "namespaces").unwrap();
        assert!(rules_match(&cluster, &attributes(namespaces, "", Operation::Delete)));
    }

    #[test]
    fn configurations_are_defaulted_and_validated_as_upstream() {
        let resource = registry::find(GROUP, "v1", "mutatingwebhookconfigurations").unwrap();
        let mut good = json!({"webhooks": [{
            "name": "a.example.com", "sideEffects": "None", "admissionReviewVersions": ["v1"],
            "clientConfig": {"service": {"namespace": "ns", "name": "svc"}},
            "rules": [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"], "resources": ["pods"]}],
            "matchConditions": [{"name": "c", "expression": "object.metadata.name != 'skip-me'"}],
        }]});
        assert_eq!(prepare_configuration(resource, &mut good), Vec::new());
        let webhook = &good["webhooks"][0];
        assert_eq!(webhook["failurePolicy"], "Fail");
        assert_eq!(webhook["reinvocationPolicy"], "Never");
        assert_eq!(webhook["timeoutSeconds"], 10);
        assert_eq!(webhook["clientConfig"]["service"]["port"], 443);
        assert_eq!(webhook["rules"][0]["scope"], "*");

        let mut bad = json!({"webhooks": [
            {"name": "short", "clientConfig": {"url": "http://x/", "service": {"name": "s", "namespace": "n"}}, "timeoutSeconds": 31},
            {"name": "b.example.com", "sideEffects": "Some", "admissionReviewVersions": ["v1"], "clientConfig": {"url": "http://x/"},
             "matchConditions": [{"name": "bad", "expression": "... [] bad expression"}]},
        ]});
        let causes = prepare_configuration(resource, &mut bad);
        let fields: Vec<&str> = causes.iter().map(|c| c.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "webhooks[0].name",
                "webhooks[0].admissionReviewVersions",
                "webhooks[0].sideEffects",
                "webhooks[0].timeoutSeconds",
                "webhooks[0].clientConfig",
                "webhooks[1].sideEffects",
                "webhooks[1].clientConfig.url",
                "webhooks[1].matchConditions[0].expression",
            ]
        );
        assert!(causes[7].message.contains("compilation failed"), "{}", causes[7].message);
    }

    #[test]
    fn match_conditions_are_cel() {
        let webhook = json!({"matchConditions": [{"name": "skip", "expression": "object.metadata.name != 'skip-me'"}]});
        let request = |name: &str| json!({"object": {"metadata": {"name": name}}, "oldObject": null});
        assert_eq!(conditions_match(&webhook, &request("keep")).ok(), Some(true));
        assert_eq!(conditions_match(&webhook, &request("skip-me")).ok(), Some(false));
        let not_bool = json!({"matchConditions": [{"name": "n", "expression": "1 + 1"}]});
        assert!(conditions_match(&not_bool, &request("x")).is_err());
    }

    #[test]
    fn refusals_read_as_upstreams() {
        let error = refusal("deny.example.com", &json!({"message": "no pods today", "code": 400}));
        assert_eq!(error.code, 400);
        assert_eq!(error.message, "admission webhook \"deny.example.com\" denied the request: no pods today");
        let error = refusal("deny.example.com", &Value::Null);
        assert_eq!((error.code, error.reason), (403, "Forbidden"));
        assert!(error.message.ends_with("denied the request without explanation"));
    }
}
