//! ValidatingAdmissionPolicies (`admissionregistration.k8s.io/v1`): a policy's CEL validations
//! run inside the API server on the requests its match constraints take, for every binding
//! that puts it in force (the binding's own match resources, its params, its validation
//! actions: Deny refuses, Warn warns, Audit is accepted and, with no audit log here, dropped).
//!
//! Expressions see `object`, `oldObject`, `request` (the AdmissionRequest), `params` (the
//! binding's parameter object, when the policy has a `paramKind`), `namespaceObject` and
//! `variables` (the policy's variables, in order, each seeing those before it). A validation
//! that evaluates to false refuses with its `messageExpression`, its `message` or
//! `failed expression: <expression>`, and its reason (Invalid, 422, unless it names another);
//! one that cannot be evaluated fails the policy, which refuses under `failurePolicy: Fail`.
//! Expressions are parsed and run with the `cel` crate, within upstream's cost limits (the
//! crate counts nothing, so each expression's cost is estimated from the sizes of the values
//! it sees before it runs). The crate has no type checker: `cel_check` is one, and a policy's
//! `status.typeChecking` (what upstream's policy status controller writes) is set from it
//! each time the policy is written.

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::{Value, json};

use crate::matching::GROUP;
use crate::cel_cost::{Named, Sizes};
use crate::cel_check::{self, Type};
use crate::rules::to_cel;

use crate::matching::{Attributes, Matched};
use crate::registry;
use crate::request::Write;
use crate::state::{ApiState, cached_get, cached_list};
use crate::status::{ApiError, Cause};

/// Upstream's wording when a policy's expressions together cost more than their budget.
const OUT_OF_BUDGET: &str = "validation failed due to running out of cost budget, no further validation rules will be run";

/// Evaluates expressions within upstream's cost limits (`PerCallLimit` for one expression,
/// `RuntimeCELCostBudget` for all of one policy's on one request), each expression's cost
/// estimated from the sizes of the values it sees (`cel_cost::runtime_named`).
struct Evaluator {
    sizes: Sizes,
    variables: HashMap<cel::objects::Key, cel::Value>,
    budget: u64,
}

/// Why an expression gave no value.
enum Failure {
    Error(String),
    /// The policy's budget is spent: nothing more is evaluated.
    OutOfBudget,
}

impl Evaluator {
    fn evaluate(&mut self, expression: &str, context: &cel::Context<'_>) -> Result<cel::Value, Failure> {
        let program =
            cel::Program::compile(expression).map_err(|e| Failure::Error(format!("compilation failed: {e}")))?;
        let cost = crate::cel_cost::runtime_named(program.expression(), &self.sizes);
        if cost > crate::cel_cost::CALL_LIMIT {
            return Err(Failure::Error("operation cancelled: actual cost limit exceeded".into()));
        }
        self.budget = self.budget.checked_sub(cost).ok_or(Failure::OutOfBudget)?;
        program.execute(context).map_err(|e| Failure::Error(e.to_string()))
    }
}

/// Why a policy refuses, or could not decide.
enum Outcome {
    Pass,
    /// A validation that did not hold: its message and reason.
    Fail {
        message: String,
        reason: String,
    },
    /// The policy could not be evaluated.
    Error(String),
}

/// Runs a policy's variables, conditions and validations on one request (with one params
/// object, or none).
fn run(policy: &Value, inputs: &HashMap<&str, Value>) -> Outcome {
    let spec = &policy["spec"];
    let mut context = cel::Context::default();
    for (name, value) in inputs {
        context.add_variable_from_value(*name, to_cel(value));
    }
    let mut sizes = Sizes::default();
    for (name, value) in inputs {
        sizes.set(name, Named::Json(value));
    }
    let mut evaluator = Evaluator { sizes, variables: HashMap::new(), budget: crate::cel_cost::OBJECT_BUDGET };
    context.add_variable_from_value("variables", cel::Value::Map(cel::objects::Map { map: Arc::new(HashMap::new()) }));
    for variable in spec["variables"].as_array().into_iter().flatten() {
        let name = variable["name"].as_str().unwrap_or_default();
        let expression = variable["expression"].as_str().unwrap_or_default();
        match evaluator.evaluate(expression, &context) {
            Ok(value) => {
                evaluator.variables.insert(cel::objects::Key::String(Arc::new(name.to_string())), value);
                let variables = cel::Value::Map(cel::objects::Map { map: Arc::new(evaluator.variables.clone()) });
                evaluator.sizes.set("variables", Named::Cel(&variables));
                context.add_variable_from_value("variables", variables);
            }
            Err(Failure::OutOfBudget) => return Outcome::Error(OUT_OF_BUDGET.into()),
            Err(Failure::Error(error)) => {
                return Outcome::Error(format!("variable {name:?} resulted in error: {error}"));
            }
        }
    }
    for condition in spec["matchConditions"].as_array().into_iter().flatten() {
        let expression = condition["expression"].as_str().unwrap_or_default();
        match evaluator.evaluate(expression, &context) {
            Ok(cel::Value::Bool(true)) => {}
            Ok(cel::Value::Bool(false)) => return Outcome::Pass,
            Ok(other) => {
                return Outcome::Error(format!(
                    "match condition {:?} evaluated to {other:?}, not a bool",
                    condition["name"]
                ));
            }
            Err(Failure::OutOfBudget) => return Outcome::Error(OUT_OF_BUDGET.into()),
            Err(Failure::Error(error)) => {
                return Outcome::Error(format!("match condition {:?} failed: {error}", condition["name"]));
            }
        }
    }
    for validation in spec["validations"].as_array().into_iter().flatten() {
        let expression = validation["expression"].as_str().unwrap_or_default();
        match evaluator.evaluate(expression, &context) {
            Ok(cel::Value::Bool(true)) => {}
            Ok(cel::Value::Bool(false)) => {
                let from_expression = validation["messageExpression"].as_str().and_then(|e| {
                    match evaluator.evaluate(e, &context) {
                        Ok(cel::Value::String(text)) if !text.trim().is_empty() && !text.contains('\n') => {
                            Some(text.to_string())
                        }
                        _ => None,
                    }
                });
                let message = from_expression
                    .or_else(|| validation["message"].as_str().filter(|m| !m.is_empty()).map(String::from))
                    .unwrap_or_else(|| format!("failed expression: {expression}"));
                let reason = validation["reason"].as_str().unwrap_or("Invalid").to_string();
                return Outcome::Fail { message, reason };
            }
            Ok(other) => {
                return Outcome::Error(format!("expression '{expression}' resulted in a {other:?}, not a bool"));
            }
            Err(Failure::OutOfBudget) => return Outcome::Error(OUT_OF_BUDGET.into()),
            Err(Failure::Error(error)) => {
                return Outcome::Error(format!("expression '{expression}' resulted in error: {error}"));
            }
        }
    }
    Outcome::Pass
}

/// How `match_resources` (a policy's `matchConstraints` or a binding's `matchResources`)
/// takes the request, if it does: as it is, or as an equivalent version (`matchPolicy`);
/// `rules_required`: a policy's resource rules must match, a binding's constrain only when
/// given.
async fn resources_match(
    state: &ApiState,
    match_resources: &Value,
    attributes: &Attributes<'_>,
    object: Option<&Value>,
    rules_required: bool,
) -> Result<Option<Matched>, ApiError> {
    let policy = match_resources["matchPolicy"].as_str().unwrap_or("Equivalent");
    let named = |rules: &Value| {
        let mut equivalent = None;
        for rule in rules.as_array().into_iter().flatten() {
            let names = rule["resourceNames"].as_array().filter(|n| !n.is_empty());
            if !names.is_none_or(|names| names.iter().any(|n| n == attributes.name)) {
                continue;
            }
            match crate::matching::rules_take_request(
                state,
                &json!({"rules": [rule], "matchPolicy": policy}),
                attributes,
            ) {
                Some(Matched::Exactly) => return Some(Matched::Exactly),
                Some(matched) => equivalent = equivalent.or(Some(matched)),
                None => {}
            }
        }
        equivalent
    };
    let rules = &match_resources["resourceRules"];
    let given = rules.as_array().is_some_and(|r| !r.is_empty());
    let matched = if given || rules_required {
        match named(rules) {
            Some(matched) => matched,
            None => return Ok(None),
        }
    } else {
        Matched::Exactly
    };
    if named(&match_resources["excludeResourceRules"]).is_some() {
        return Ok(None);
    }
    Ok(crate::matching::selectors_match(state, match_resources, attributes, object).await?.then_some(matched))
}

/// The binding's parameter objects: `None` when the policy takes none; an empty list when none
/// is found.
async fn params(
    state: &ApiState,
    policy: &Value,
    binding: &Value,
    attributes: &Attributes<'_>,
) -> Result<Option<Vec<Value>>, String> {
    let Some(kind) = policy["spec"]["paramKind"].as_object() else { return Ok(None) };
    let api_version = kind.get("apiVersion").and_then(Value::as_str).unwrap_or_default();
    let kind_name = kind.get("kind").and_then(Value::as_str).unwrap_or_default();
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    let resource = state
        .resources()
        .into_iter()
        .find(|r| r.group == group && r.version == version && r.kind == kind_name)
        .ok_or_else(|| format!("paramKind {api_version}, Kind={kind_name} is not served"))?;
    let reference = &binding["spec"]["paramRef"];
    if !reference.is_object() {
        return Err("the binding names no paramRef for a policy with a paramKind".into());
    }
    let namespace = match reference["namespace"].as_str().filter(|n| !n.is_empty()) {
        Some(namespace) => Some(namespace),
        None if resource.namespaced => attributes.namespace,
        None => None,
    };
    if resource.namespaced && namespace.is_none() {
        return Err("cannot use a namespaced paramKind for a cluster-scoped request without paramRef.namespace".into());
    }
    let error = |e: ApiError| e.message;
    if let Some(name) = reference["name"].as_str().filter(|n| !n.is_empty()) {
        let found = cached_get(state, resource, namespace, name).await.map_err(error)?;
        return Ok(Some(found.into_iter().collect()));
    }
    let selector = &reference["selector"];
    let all = cached_list(state, resource, namespace).await.map_err(error)?;
    Ok(Some(
        all.into_iter()
            .filter(|o| {
                crate::selector::label_selector_matches(selector, o["metadata"].get("labels").unwrap_or(&json!({})))
            })
            .collect(),
    ))
}

/// Runs every bound policy that takes the request.
pub async fn validate(
    state: &ApiState,
    attributes: &Attributes<'_>,
    object: Option<&Value>,
    write: &Write,
) -> Result<(), ApiError> {
    let bindings_resource = registry::find(GROUP, "v1", "validatingadmissionpolicybindings").expect("served");
    let bindings = cached_list(state, bindings_resource, None).await?;
    if bindings.is_empty() {
        return Ok(());
    }
    let policies_resource = registry::find(GROUP, "v1", "validatingadmissionpolicies").expect("served");
    let policies = cached_list(state, policies_resource, None).await?;
    let mut namespace_object = None;
    for binding in &bindings {
        let policy_name = binding["spec"]["policyName"].as_str().unwrap_or_default();
        let binding_name = binding["metadata"]["name"].as_str().unwrap_or_default();
        let Some(mut policy) = policies.iter().find(|p| p["metadata"]["name"] == policy_name).cloned() else {
            continue;
        };
        default_policy(&mut policy);
        let constraints = &policy["spec"]["matchConstraints"];
        // The policy's constraints say in which version it sees the object.
        let Some(matched) = resources_match(state, constraints, attributes, object, true).await? else {
            continue;
        };
        let bound = &binding["spec"]["matchResources"];
        if bound.is_object() && resources_match(state, bound, attributes, object, false).await?.is_none() {
            continue;
        }
        let equivalent = match matched {
            Matched::As(resource) => Some(resource),
            Matched::Exactly => None,
        };
        let uid = uuid::Uuid::new_v4().to_string();
        let (request, reviewed) =
            crate::matching::versioned_request(state, equivalent, attributes, object, &uid).await?;
        let (object, old) = match reviewed {
            Some(reviewed) => (Some(reviewed), request["oldObject"].clone()),
            None => (object.cloned(), attributes.old.cloned().unwrap_or(Value::Null)),
        };
        if namespace_object.is_none() {
            namespace_object = Some(match attributes.namespace.filter(|_| attributes.resource.namespaced) {
                Some(namespace) => {
                    let namespaces = registry::find("", "v1", "namespaces").expect("namespaces are served");
                    cached_get(state, namespaces, None, namespace).await?.unwrap_or(Value::Null)
                }
                None => Value::Null,
            });
        }
        let denied = |message: String| {
            format!("ValidatingAdmissionPolicy '{policy_name}' with binding '{binding_name}' denied request: {message}")
        };
        let fail_open = policy["spec"]["failurePolicy"] == "Ignore";
        let params = match params(state, &policy, binding, attributes).await {
            Ok(params) => params,
            Err(_) if fail_open => continue,
            Err(error) => {
                return Err(ApiError::new(403, "Forbidden", denied(format!("failed to configure binding: {error}"))));
            }
        };
        let runs: Vec<Value> = match params {
            None => vec![Value::Null],
            Some(found) if found.is_empty() => {
                if binding["spec"]["paramRef"]["parameterNotFoundAction"] == "Allow" {
                    continue;
                }
                let message = denied("failed to configure binding: no params found for policy binding with `Deny` parameterNotFoundAction".into());
                return Err(ApiError::new(403, "Forbidden", message));
            }
            Some(found) => found,
        };
        let actions: Vec<&str> =
            binding["spec"]["validationActions"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
        for params in runs {
            let inputs: HashMap<&str, Value> = HashMap::from([
                ("object", object.clone().unwrap_or(Value::Null)),
                ("oldObject", old.clone()),
                ("request", request.clone()),
                ("params", params),
                ("namespaceObject", namespace_object.clone().unwrap_or(Value::Null)),
            ]);
            let (message, reason) = match run(&policy, &inputs) {
                Outcome::Pass => continue,
                Outcome::Fail { message, reason } => (message, reason),
                Outcome::Error(_) if fail_open => continue,
                Outcome::Error(error) => (error, "Invalid".into()),
            };
            if actions.contains(&"Warn") {
                write.warn([format!(
                    "Validation failed for ValidatingAdmissionPolicy '{policy_name}' with binding '{binding_name}': {message}"
                )]);
            }
            if actions.contains(&"Deny") {
                let (code, reason) = match reason.as_str() {
                    "Unauthorized" => (401, "Unauthorized"),
                    "Forbidden" => (403, "Forbidden"),
                    "RequestEntityTooLarge" => (413, "RequestEntityTooLarge"),
                    _ => (422, "Invalid"),
                };
                return Err(ApiError::new(code, reason, denied(message)));
            }
        }
    }
    Ok(())
}

// ---- type checking: `status.typeChecking` ----

/// Upstream's `maxTypesToCheck`.
const TYPES_TO_CHECK: usize = 10;

/// The served resources a policy's resource rules name without wildcards (upstream checks
/// no others), at most ten, sorted by group, version and kind.
fn types_to_check(state: &ApiState, policy: &Value) -> Vec<&'static registry::Resource> {
    let mut found: Vec<&'static registry::Resource> = Vec::new();
    let strings = |rule: &Value, key: &str| -> Vec<String> {
        rule[key].as_array().into_iter().flatten().filter_map(Value::as_str).map(String::from).collect()
    };
    'rules: for rule in policy["spec"]["matchConstraints"]["resourceRules"].as_array().into_iter().flatten() {
        let (groups, versions) = (strings(rule, "apiGroups"), strings(rule, "apiVersions"));
        if groups.iter().chain(&versions).any(|g| g.contains('*')) {
            continue;
        }
        let resources: Vec<String> =
            strings(rule, "resources").into_iter().filter(|r| !r.contains(['*', '/'])).collect();
        for group in &groups {
            for version in &versions {
                for plural in &resources {
                    let resource = registry::find(group, version, plural)
                        .or_else(|| state.custom.find(group, version, plural));
                    if let Some(resource) = resource
                        && !found.iter().any(|r| std::ptr::eq(*r, resource))
                    {
                        found.push(resource);
                        if found.len() == TYPES_TO_CHECK {
                            break 'rules;
                        }
                    }
                }
            }
        }
    }
    found.sort_by(|a, b| (a.group, a.version, a.kind).cmp(&(b.group, b.version, b.kind)));
    found
}

/// A kind's schema: a built-in's definition, or a custom version's `openAPIV3Schema`.
enum KindSchema {
    Builtin(&'static Value),
    Custom(Arc<Value>),
}

impl KindSchema {
    fn of(resource: &registry::Resource) -> Option<KindSchema> {
        match resource.custom {
            Some(custom) => Some(KindSchema::Custom(custom.schema.as_ref()?.decoded())),
            None => {
                let schemas = crate::schema::schemas();
                schemas.definitions.get(schemas.root(resource)).map(KindSchema::Builtin)
            }
        }
    }

    fn schema(&self) -> &Value {
        match self {
            KindSchema::Builtin(schema) => schema,
            KindSchema::Custom(schema) => schema,
        }
    }
}

/// Upstream's `AdmissionRequest` type (`request` in expressions).
fn request_type() -> Type<'static> {
    let record = |fields: Vec<(&str, Type<'static>)>| {
        Type::Record(Arc::new(fields.into_iter().map(|(n, t)| (n.to_string(), t)).collect()))
    };
    let gvk = record(vec![("group", Type::String), ("version", Type::String), ("kind", Type::String)]);
    let gvr = record(vec![("group", Type::String), ("version", Type::String), ("resource", Type::String)]);
    let strings = || Type::List(Box::new(Type::String));
    let user = record(vec![
        ("username", Type::String),
        ("uid", Type::String),
        ("groups", strings()),
        ("extra", Type::Map(Box::new(Type::String), Box::new(strings()))),
    ]);
    record(vec![
        ("kind", gvk.clone()),
        ("resource", gvr.clone()),
        ("subResource", Type::String),
        ("requestKind", gvk),
        ("requestResource", gvr),
        ("requestSubResource", Type::String),
        ("name", Type::String),
        ("namespace", Type::String),
        ("operation", Type::String),
        ("userInfo", user),
        ("dryRun", Type::Bool),
        ("options", Type::Dyn),
    ])
}

/// `apps/v1, Kind=Deployment` (`/v1, Kind=Pod`), as upstream prints a group-version-kind.
fn gvk_name(resource: &registry::Resource) -> String {
    format!("{}/{}, Kind={}", resource.group, resource.version, resource.kind)
}

/// What upstream's policy status controller writes: the generation checked and the warnings
/// of each validation's expression and message expression that does not type-check against
/// one of the kinds the policy matches.
pub fn type_check(state: &ApiState, policy: &Value) -> Value {
    let spec = &policy["spec"];
    let kinds: Vec<(String, KindSchema)> = types_to_check(state, policy)
        .into_iter()
        .filter_map(|resource| Some((gvk_name(resource), KindSchema::of(resource)?)))
        .collect();
    let params_kind = spec["paramKind"]["kind"].as_str().and_then(|kind| {
        let api_version = spec["paramKind"]["apiVersion"].as_str()?;
        let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
        registry::RESOURCES
            .iter()
            .find(|r| r.group == group && r.version == version && r.kind == kind)
            .or_else(|| {
                state.custom.all().iter().copied().find(|r| r.group == group && r.version == version && r.kind == kind)
            })
            .and_then(KindSchema::of)
    });
    let namespaces = registry::find("", "v1", "namespaces").and_then(KindSchema::of);
    let mut warnings: Vec<Value> = Vec::new();
    let expressions = spec["validations"].as_array().into_iter().flatten().enumerate().flat_map(|(i, v)| {
        [("expression", &v["expression"]), ("messageExpression", &v["messageExpression"])]
            .into_iter()
            .filter_map(move |(key, e)| Some((format!("spec.validations[{i}].{key}"), e.as_str()?)))
            .filter(|(_, e)| !e.trim().is_empty())
    });
    // One environment per kind, its variables typed once (each sees those before it).
    let envs: Vec<(&str, cel_check::Env<'_>)> = kinds
        .iter()
        .map(|(gvk, schema)| {
            let object = cel_check::of_schema(schema.schema(), true);
            let mut env = cel_check::Env {
                variables: vec![
                    ("object".into(), object.clone()),
                    ("oldObject".into(), object),
                    ("request".into(), request_type()),
                    (
                        "namespaceObject".into(),
                        namespaces.as_ref().map_or(Type::Dyn, |n| cel_check::of_schema(n.schema(), true)),
                    ),
                    ("authorizer".into(), Type::Dyn),
                ],
            };
            if let Some(params) = &params_kind {
                env.variables.push(("params".into(), cel_check::of_schema(params.schema(), true)));
            }
            let mut variables: Vec<(String, Type<'_>)> = Vec::new();
            for variable in spec["variables"].as_array().into_iter().flatten() {
                env.variables.retain(|(n, _)| n != "variables");
                env.variables.push(("variables".into(), Type::Record(Arc::new(variables.clone()))));
                let name = variable["name"].as_str().unwrap_or_default();
                let (ty, _) = cel_check::check(variable["expression"].as_str().unwrap_or_default(), &env);
                variables.push((name.to_string(), ty));
            }
            env.variables.retain(|(n, _)| n != "variables");
            env.variables.push(("variables".into(), Type::Record(Arc::new(variables))));
            (gvk.as_str(), env)
        })
        .collect();
    for (field_ref, expression) in expressions {
        let mut found = Vec::new();
        for (gvk, env) in &envs {
            let (_, issues) = cel_check::check(expression, env);
            if !issues.is_empty() {
                found.push(format!("{gvk}: {issues}\n"));
            }
        }
        if !found.is_empty() {
            warnings.push(json!({"fieldRef": field_ref, "warning": found.join("\n")}));
        }
    }
    let mut type_checking = json!({});
    if !warnings.is_empty() {
        type_checking["expressionWarnings"] = Value::Array(warnings);
    }
    let mut status = json!({"typeChecking": type_checking});
    if let Some(generation) = policy["metadata"]["generation"].as_i64() {
        status["observedGeneration"] = json!(generation);
    }
    if let Some(conditions) = policy["status"].get("conditions") {
        status["conditions"] = conditions.clone();
    }
    status
}

/// Upstream's defaults for a policy.
fn default_policy(policy: &mut Value) {
    let Some(spec) = policy.get_mut("spec").and_then(Value::as_object_mut) else { return };
    spec.entry("failurePolicy").or_insert(json!("Fail"));
    if let Some(constraints) = spec.get_mut("matchConstraints") {
        default_match_resources(constraints);
    }
}

fn default_match_resources(match_resources: &mut Value) {
    let Some(map) = match_resources.as_object_mut() else { return };
    map.entry("matchPolicy").or_insert(json!("Equivalent"));
    for selector in ["namespaceSelector", "objectSelector"] {
        if map.get(selector).is_none_or(Value::is_null) {
            map.insert(selector.into(), json!({}));
        }
    }
    for rules in ["resourceRules", "excludeResourceRules"] {
        if let Some(rules) = map.get_mut(rules).and_then(Value::as_array_mut) {
            for rule in rules.iter_mut().filter_map(Value::as_object_mut) {
                rule.entry("scope").or_insert(json!("*"));
            }
        }
    }
}

fn compile_cause(field: String, expression: &str) -> Option<Cause> {
    let error = cel::Program::compile(expression).err()?;
    let first = error.to_string();
    Some(Cause {
        reason: "FieldValueInvalid",
        message: format!(
            "Invalid value: {expression:?}: compilation failed: {}",
            first.lines().next().unwrap_or_default()
        ),
        field,
    })
}

/// Defaults and validates a policy; what is wrong, as upstream words it.
pub fn prepare_policy(policy: &mut Value) -> Vec<Cause> {
    default_policy(policy);
    let spec = &policy["spec"];
    let mut causes = Vec::new();
    let cause = |causes: &mut Vec<Cause>, reason: &'static str, field: &str, message: String| {
        causes.push(Cause { reason, message, field: field.into() })
    };
    if !spec["matchConstraints"].is_object() {
        cause(&mut causes, "FieldValueRequired", "spec.matchConstraints", "Required value".into());
    } else if spec["matchConstraints"]["resourceRules"].as_array().is_none_or(Vec::is_empty) {
        cause(&mut causes, "FieldValueRequired", "spec.matchConstraints.resourceRules", "Required value".into());
    }
    let validations = spec["validations"].as_array().cloned().unwrap_or_default();
    if validations.is_empty() && spec["auditAnnotations"].as_array().is_none_or(Vec::is_empty) {
        cause(
            &mut causes,
            "FieldValueRequired",
            "spec.validations",
            "Required value: validations or auditAnnotations must contain at least one item".into(),
        );
    }
    if let Some(policy) = spec["failurePolicy"].as_str().filter(|p| !["Fail", "Ignore"].contains(p)) {
        cause(
            &mut causes,
            "FieldValueNotSupported",
            "spec.failurePolicy",
            format!("Unsupported value: {policy:?}: supported values: \"Fail\", \"Ignore\""),
        );
    }
    for (i, validation) in validations.iter().enumerate() {
        let expression = validation["expression"].as_str().unwrap_or_default();
        let at = format!("spec.validations[{i}].expression");
        if expression.trim().is_empty() {
            causes.push(Cause {
                reason: "FieldValueRequired",
                field: at,
                message: "Required value: expression is not specified".into(),
            });
        } else if let Some(found) = compile_cause(at, expression) {
            causes.push(found);
        }
        if let Some(message) = validation["messageExpression"].as_str().filter(|m| !m.trim().is_empty())
            && let Some(found) = compile_cause(format!("spec.validations[{i}].messageExpression"), message)
        {
            causes.push(found);
        }
        if let Some(reason) = validation["reason"]
            .as_str()
            .filter(|r| !["Unauthorized", "Forbidden", "Invalid", "RequestEntityTooLarge"].contains(r))
        {
            causes.push(Cause {
                reason: "FieldValueNotSupported",
                field: format!("spec.validations[{i}].reason"),
                message: format!(
                    "Unsupported value: {reason:?}: supported values: \"Forbidden\", \"Invalid\", \"RequestEntityTooLarge\", \"Unauthorized\""
                ),
            });
        }
    }
    for (list, what) in [("variables", "variables"), ("matchConditions", "matchConditions")] {
        for (i, item) in spec[list].as_array().into_iter().flatten().enumerate() {
            if item["name"].as_str().is_none_or(str::is_empty) {
                causes.push(Cause {
                    reason: "FieldValueRequired",
                    field: format!("spec.{what}[{i}].name"),
                    message: "Required value".into(),
                });
            }
            let expression = item["expression"].as_str().unwrap_or_default();
            if let Some(found) = compile_cause(format!("spec.{what}[{i}].expression"), expression) {
                causes.push(found);
            }
        }
    }
    causes
}

/// Defaults and validates a binding.
pub fn prepare_binding(binding: &mut Value) -> Vec<Cause> {
    if let Some(match_resources) = binding.get_mut("spec").and_then(|s| s.get_mut("matchResources")) {
        default_match_resources(match_resources);
    }
    let spec = &binding["spec"];
    let mut causes = Vec::new();
    if spec["policyName"].as_str().is_none_or(str::is_empty) {
        causes.push(Cause {
            reason: "FieldValueRequired",
            field: "spec.policyName".into(),
            message: "Required value".into(),
        });
    }
    let actions: Vec<&str> =
        spec["validationActions"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if actions.is_empty() {
        causes.push(Cause {
            reason: "FieldValueRequired",
            field: "spec.validationActions".into(),
            message: "Required value: at least one validation action is required".into(),
        });
    }
    for (i, action) in actions.iter().enumerate() {
        if !["Deny", "Warn", "Audit"].contains(action) {
            causes.push(Cause {
                reason: "FieldValueNotSupported",
                field: format!("spec.validationActions[{i}]"),
                message: format!("Unsupported value: {action:?}: supported values: \"Audit\", \"Deny\", \"Warn\""),
            });
        } else if actions[..i].contains(action) {
            causes.push(Cause {
                reason: "FieldValueDuplicate",
                field: format!("spec.validationActions[{i}]"),
                message: format!("Duplicate value: {action:?}"),
            });
        }
    }
    if actions.contains(&"Deny") && actions.contains(&"Warn") {
        causes.push(Cause {
            reason: "FieldValueInvalid",
            field: "spec.validationActions".into(),
            message: format!(
                "Invalid value: {}: must not contain both Deny and Warn (repeating the same validation failure information in the API response and headers serves no purpose)",
                json!(actions)
            ),
        });
    }
    let reference = &spec["paramRef"];
    if reference.is_object() {
        let named = reference["name"].as_str().is_some_and(|n| !n.is_empty());
        if named == reference["selector"].is_object() {
            causes.push(Cause {
                reason: "FieldValueRequired",
                field: "spec.paramRef".into(),
                message: "Required value: one of name or selector must be specified".into(),
            });
        }
        if let Some(action) = reference["parameterNotFoundAction"].as_str().filter(|a| !["Allow", "Deny"].contains(a)) {
            causes.push(Cause {
                reason: "FieldValueNotSupported",
                field: "spec.paramRef.parameterNotFoundAction".into(),
                message: format!("Unsupported value: {action:?}: supported values: \"Allow\", \"Deny\""),
            });
        }
    }
    causes
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(validations: Value, variables: Value) -> Value {
        json!({"spec": {"validations": validations, "variables": variables,
            "matchConstraints": {"resourceRules": [{"operations": ["CREATE"], "apiGroups": ["apps"], "apiVersions": ["v1"], "resources": ["deployments"]}]}}})
    }

    fn inputs(replicas: i64) -> HashMap<&'static str, Value> {
        HashMap::from([
            ("object", json!({"metadata": {"name": "web"}, "spec": {"replicas": replicas}})),
            ("oldObject", Value::Null),
            ("request", json!({"operation": "CREATE"})),
            ("params", Value::Null),
            ("namespaceObject", json!({"metadata": {"name": "ns"}})),
        ])
    }

    #[test]
    fn validations_variables_and_messages() {
        let checked = policy(
            json!([
                {"expression": "variables.replicas > 1", "messageExpression": "'wants replicas > 1, got ' + string(object.spec.replicas)"},
                {"expression": "variables.odd", "message": "must be odd", "reason": "Forbidden"},
                {"expression": "namespaceObject.metadata.name == 'ns'"},
            ]),
            json!([{"name": "replicas", "expression": "object.spec.replicas"}, {"name": "odd", "expression": "variables.replicas % 2 == 1"}]),
        );
        assert!(matches!(run(&checked, &inputs(3)), Outcome::Pass));
        match run(&checked, &inputs(1)) {
            Outcome::Fail { message, reason } => {
                assert_eq!((message.as_str(), reason.as_str()), ("wants replicas > 1, got 1", "Invalid"))
            }
            _ => panic!("one replica fails the first validation"),
        }
        match run(&checked, &inputs(4)) {
            Outcome::Fail { message, reason } => {
                assert_eq!((message.as_str(), reason.as_str()), ("must be odd", "Forbidden"))
            }
            _ => panic!("four replicas fail the second validation"),
        }
        // A message expression that cannot be evaluated (string + int) falls back.
        let confused = policy(
            json!([{"expression": "object.spec.replicas > 1", "messageExpression": "'got ' + object.spec.replicas"}]),
            json!([]),
        );
        match run(&confused, &inputs(1)) {
            Outcome::Fail { message, .. } => assert_eq!(message, "failed expression: object.spec.replicas > 1"),
            _ => panic!("fails"),
        }
        let broken = policy(json!([{"expression": "object.spec.missing.deeper > 1"}]), json!([]));
        assert!(matches!(run(&broken, &inputs(1)), Outcome::Error(_)));
    }

    #[test]
    fn expressions_run_within_upstreams_cost_limits() {
        let mut inputs = inputs(1);
        let keys: serde_json::Map<String, Value> = (0..500).map(|i| (format!("k{i}"), json!("v"))).collect();
        inputs.insert("object", json!({"metadata": {"name": "web"}, "data": keys}));
        // One expression over the per-call limit: 500 × 500 comparisons.
        let quadratic = "object.data.all(k, object.data.all(j, k == j || k != j))";
        match run(&policy(json!([{"expression": quadratic}]), json!([])), &inputs) {
            Outcome::Error(error) => assert_eq!(
                error,
                format!("expression '{quadratic}' resulted in error: operation cancelled: actual cost limit exceeded")
            ),
            _ => panic!("the quadratic expression is over the per-call limit"),
        }
        // A variable's size counts in the expressions that use it.
        let through_variable = "variables.keys.all(k, variables.keys.all(j, k == j || k != j))";
        let variables = json!([{"name": "keys", "expression": "object.data.map(k, k)"}]);
        assert!(matches!(
            run(&policy(json!([{"expression": through_variable}]), variables), &inputs),
            Outcome::Error(error) if error.ends_with("actual cost limit exceeded")
        ));
        // Each under the per-call limit, together over the policy's budget (the estimate
        // counts both sides of `||`, so these are dear to estimate and cheap to run).
        let keys: serde_json::Map<String, Value> = (0..250).map(|i| (format!("k{i}"), json!("v"))).collect();
        inputs.insert("object", json!({"metadata": {"name": "web"}, "data": keys}));
        let dear = "true || object.data.all(k, object.data.all(j, k == j))";
        let mut sizes = Sizes::default();
        sizes.set("object", Named::Json(&inputs["object"]));
        let one = crate::cel_cost::runtime_named(cel::Program::compile(dear).unwrap().expression(), &sizes);
        assert!((100_000..crate::cel_cost::CALL_LIMIT).contains(&one), "{one}");
        let within = (crate::cel_cost::OBJECT_BUDGET / one) as usize;
        let validations = |n: usize| policy(json!(vec![json!({"expression": dear}); n]), json!([]));
        assert!(matches!(run(&validations(within), &inputs), Outcome::Pass));
        match run(&validations(within + 1), &inputs) {
            Outcome::Error(error) => assert_eq!(error, OUT_OF_BUDGET),
            _ => panic!("{} runs of a {one} expression are over the budget", within + 1),
        }
    }

    #[test]
    fn policies_and_bindings_are_validated_as_upstream() {
        let mut bad = json!({"spec": {"validations": [{"expression": "... [] bad", "reason": "Teapot"}], "failurePolicy": "Maybe"}});
        let fields: Vec<String> = prepare_policy(&mut bad).into_iter().map(|c| c.field).collect();
        assert_eq!(
            fields,
            [
                "spec.matchConstraints",
                "spec.failurePolicy",
                "spec.validations[0].expression",
                "spec.validations[0].reason"
            ]
        );
        let mut good = policy(json!([{"expression": "object.spec.replicas > 1"}]), json!([]));
        assert!(prepare_policy(&mut good).is_empty());
        assert_eq!(good["spec"]["failurePolicy"], "Fail");
        assert_eq!(good["spec"]["matchConstraints"]["resourceRules"][0]["scope"], "*");

        let mut binding = json!({"spec": {"policyName": "p", "validationActions": ["Deny", "Warn", "Deny"]}});
        let messages: Vec<String> = prepare_binding(&mut binding).into_iter().map(|c| c.message).collect();
        assert!(messages[0].starts_with("Duplicate value: \"Deny\""), "{messages:?}");
        assert!(messages[1].contains("must not contain both Deny and Warn"), "{messages:?}");
        let mut empty = json!({"spec": {}});
        assert_eq!(prepare_binding(&mut empty).len(), 2);
    }

    #[test]
    fn json_numbers_are_cel_ints() {
        assert_eq!(to_cel(&json!(3)), cel::Value::Int(3));
        assert_eq!(to_cel(&json!(1.5)), cel::Value::Float(1.5));
    }
}
