//! `x-kubernetes-validations`: CEL rules in a CustomResourceDefinition's structural schema. A
//! rule on a schema node sees the node's value as `self` and, on an update, its value before as
//! `oldSelf` (a rule that names `oldSelf` is a transition rule: it runs only when there is an
//! old value to compare with, unless `optionalOldSelf`). Old values are found by property name
//! and, in lists of `x-kubernetes-list-type: map`, by their map keys; other list items have
//! none. On an update, a rule that does not name `oldSelf` is skipped on a value left as it
//! was (upstream's ratcheting, as `custom::validate` does for the schema). A rule that does not hold is a 422 cause at the node's path (plus its `fieldPath`),
//! worded by its `reason`, with its `messageExpression`, `message` or `failed rule: <rule>`.
//! Rules run once the object fits its schema; they are compiled when the definition is
//! written (`compile_errors`), with the `cel` crate, and their cost estimated as upstream
//! does (`cel_cost`: a rule too dear for its schema's bounds is refused then). Each run is
//! costed too, by the same model over the value's own sizes: over upstream's 1,000,000 a run
//! is refused (`call cost exceeds limit for rule`), and once an object's runs add up to over
//! 10,000,000 no further rule runs (`running out of cost budget`).

use std::collections::HashMap;
use std::sync::Arc;

use serde_json::Value;

use crate::status::Cause;

/// The causes of the rules `object` breaks (`old`: the object before an update).
pub fn check(schema: &Value, object: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mut budget = Some(crate::cel_cost::OBJECT_BUDGET);
    walk(schema, object, old, "", &mut causes, &mut budget, 0);
    causes
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_string() } else { format!("{path}.{key}") }
}

fn schema_type(schema: &Value, value: &Value) -> String {
    match schema["type"].as_str() {
        Some(kind) => kind.to_string(),
        None => match value {
            Value::Object(_) => "object".into(),
            Value::Array(_) => "array".into(),
            Value::String(_) => "string".into(),
            Value::Number(_) => "number".into(),
            Value::Bool(_) => "boolean".into(),
            Value::Null => "null".into(),
        },
    }
}

/// `budget`: what is left of the object's runtime cost budget (`None` once it ran out: no
/// further rule runs).
fn walk(
    schema: &Value,
    value: &Value,
    old: Option<&Value>,
    path: &str,
    causes: &mut Vec<Cause>,
    budget: &mut Option<u64>,
    depth: usize,
) {
    if depth > 64 || value.is_null() || budget.is_none() {
        return;
    }
    if let Some(rules) = schema["x-kubernetes-validations"].as_array() {
        for rule in rules {
            run(rule, schema, value, old, path, causes, budget);
        }
    }
    match value {
        Value::Object(map) => {
            let properties = schema["properties"].as_object();
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (key, child) in map {
                if let Some(child_schema) = properties.and_then(|p| p.get(key)).or(additional) {
                    let old_child = old.and_then(|o| o.get(key));
                    walk(child_schema, child, old_child, &join(path, key), causes, budget, depth + 1);
                }
            }
        }
        Value::Array(items) => {
            let Some(item_schema) = schema.get("items").filter(|i| i.is_object()) else { return };
            let old_items = old.and_then(Value::as_array);
            for (i, item) in items.iter().enumerate() {
                let old_item = old_items.and_then(|olds| correlated(schema, item, olds));
                walk(item_schema, item, old_item, &format!("{path}[{i}]"), causes, budget, depth + 1);
            }
        }
        _ => {}
    }
}

fn run(
    rule: &Value,
    schema: &Value,
    value: &Value,
    old: Option<&Value>,
    path: &str,
    causes: &mut Vec<Cause>,
    budget: &mut Option<u64>,
) {
    let Some(remaining) = *budget else { return };
    let text = rule["rule"].as_str().unwrap_or_default();
    let transition = text.contains("oldSelf");
    if transition && old.is_none() && rule["optionalOldSelf"] != true {
        return;
    }
    // Ratcheting, as upstream: a rule that does not look at `oldSelf` is not run again on a value
    // the update left as it was.
    if !transition && old == Some(value) {
        return;
    }
    let mut context = cel::Context::default();
    context.add_variable_from_value("self", to_cel(value));
    context.add_variable_from_value("oldSelf", old.map(to_cel).unwrap_or(cel::Value::Null));
    let field = match rule["fieldPath"].as_str().filter(|f| !f.is_empty()) {
        Some(relative) => join(path, relative.trim_start_matches('.')),
        None => path.to_string(),
    };
    let kind = schema_type(schema, value);
    let program = cel::Program::compile(text).map_err(|e| e.to_string());
    // The run's cost, against upstream's limits of one run and of the whole object.
    if let Ok(program) = &program {
        let cost = crate::cel_cost::runtime(program.expression(), schema, value);
        let invalid = |message: String| Cause {
            reason: "FieldValueInvalid",
            message: format!("Invalid value: {kind:?}: {message}"),
            field: path.to_string(),
        };
        if cost > crate::cel_cost::CALL_LIMIT {
            let shown = match rule["message"].as_str().map(str::trim).filter(|m| !m.is_empty()) {
                Some(message) => message.to_string(),
                None => format!("failed rule: {text}"),
            };
            causes.push(invalid(format!("call cost exceeds limit for rule: {shown}")));
            return;
        }
        if cost > remaining {
            causes.push(invalid(
                "validation failed due to running out of cost budget, no further validation rules will be run".into(),
            ));
            *budget = None;
            return;
        }
        *budget = Some(remaining - cost);
    }
    let outcome = program.and_then(|p| p.execute(&context).map_err(|e| e.to_string()));
    let message = match outcome {
        Ok(cel::Value::Bool(true)) => return,
        Ok(cel::Value::Bool(false)) => {
            let from_expression = rule["messageExpression"].as_str().and_then(|e| {
                match cel::Program::compile(e).ok()?.execute(&context).ok()? {
                    cel::Value::String(text) if !text.trim().is_empty() && !text.contains('\n') => {
                        Some(text.to_string())
                    }
                    _ => None,
                }
            });
            from_expression
                .or_else(|| rule["message"].as_str().filter(|m| !m.is_empty()).map(String::from))
                .unwrap_or_else(|| format!("failed rule: {text}"))
        }
        Ok(other) => format!("rule {text:?} evaluated to {other:?}, not a bool"),
        Err(error) => format!("rule {text:?} failed: {error}"),
    };
    let (reason, message) = match rule["reason"].as_str() {
        Some("FieldValueForbidden") => ("FieldValueForbidden", format!("Forbidden: {message}")),
        Some("FieldValueRequired") => ("FieldValueRequired", format!("Required value: {message}")),
        Some("FieldValueDuplicate") => ("FieldValueDuplicate", format!("Duplicate value: {message}")),
        _ => ("FieldValueInvalid", format!("Invalid value: {kind:?}: {message}")),
    };
    causes.push(Cause { reason, message, field });
}

/// The rules of a definition version's schema that do not compile, as causes at the schema
/// paths upstream names (`<at>.properties[spec].x-kubernetes-validations[0].rule`).
pub fn compile_errors(schema: &Value, at: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mut seen = HashMap::new();
    compile_walk(schema, at, &mut causes, &mut seen, 0);
    // Rules that compile are then costed, as upstream does.
    if causes.is_empty() {
        causes = crate::cel_cost::check(schema, at);
    }
    causes
}

fn compile_walk(schema: &Value, at: &str, causes: &mut Vec<Cause>, seen: &mut HashMap<String, ()>, depth: usize) {
    if depth > 64 {
        return;
    }
    for (i, rule) in schema["x-kubernetes-validations"].as_array().into_iter().flatten().enumerate() {
        let field = format!("{at}.x-kubernetes-validations[{i}]");
        let text = rule["rule"].as_str().unwrap_or_default();
        if text.trim().is_empty() {
            causes.push(Cause {
                reason: "FieldValueRequired",
                message: "Required value".into(),
                field: format!("{field}.rule"),
            });
            continue;
        }
        if seen.insert(format!("{field}/{text}"), ()).is_none()
            && let Err(error) = cel::Program::compile(text)
        {
            let first = error.to_string();
            causes.push(Cause {
                reason: "FieldValueInvalid",
                message: format!(
                    "Invalid value: {text:?}: compilation failed: {}",
                    first.lines().next().unwrap_or_default()
                ),
                field: format!("{field}.rule"),
            });
        }
        if let Some(expression) = rule["messageExpression"].as_str().filter(|e| !e.trim().is_empty())
            && let Err(error) = cel::Program::compile(expression)
        {
            let first = error.to_string();
            causes.push(Cause {
                reason: "FieldValueInvalid",
                message: format!(
                    "Invalid value: {expression:?}: messageExpression compilation failed: {}",
                    first.lines().next().unwrap_or_default()
                ),
                field: format!("{field}.messageExpression"),
            });
        }
        if let Some(reason) = rule["reason"].as_str().filter(|r| {
            !["FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired", "FieldValueDuplicate"].contains(r)
        }) {
            causes.push(Cause {
                reason: "FieldValueNotSupported",
                message: format!(
                    "Unsupported value: {reason:?}: supported values: \"FieldValueDuplicate\", \"FieldValueForbidden\", \"FieldValueInvalid\", \"FieldValueRequired\""
                ),
                field: format!("{field}.reason"),
            });
        }
    }
    for (key, child) in schema["properties"].as_object().into_iter().flatten() {
        compile_walk(child, &format!("{at}.properties[{key}]"), causes, seen, depth + 1);
    }
    if let Some(items) = schema.get("items").filter(|i| i.is_object()) {
        compile_walk(items, &format!("{at}.items"), causes, seen, depth + 1);
    }
    if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
        compile_walk(additional, &format!("{at}.additionalProperties"), causes, seen, depth + 1);
    }
}

/// JSON as CEL sees it: integers as `int` (CEL does not compare `uint` with `int` literals),
/// objects as maps with string keys.
pub fn to_cel(value: &Value) -> cel::Value {
    match value {
        Value::Null => cel::Value::Null,
        Value::Bool(b) => cel::Value::Bool(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => cel::Value::Int(i),
            (None, Some(u)) => cel::Value::UInt(u),
            _ => cel::Value::Float(n.as_f64().unwrap_or_default()),
        },
        Value::String(s) => cel::Value::String(Arc::new(s.clone())),
        Value::Array(items) => cel::Value::List(Arc::new(items.iter().map(to_cel).collect())),
        Value::Object(map) => {
            let map: HashMap<cel::objects::Key, cel::Value> =
                map.iter().map(|(k, v)| (cel::objects::Key::String(Arc::new(k.clone())), to_cel(v))).collect();
            cel::Value::Map(cel::objects::Map { map: Arc::new(map) })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({"type": "object", "properties": {"spec": {
        "type": "object",
        "x-kubernetes-validations": [
            {"rule": "self.replicas <= self.maxReplicas", "message": "replicas must not exceed maxReplicas"},
            {"rule": "self.mode == oldSelf.mode", "message": "mode is immutable", "fieldPath": ".mode"},
        ],
        "properties": {
            "replicas": {"type": "integer"},
            "maxReplicas": {"type": "integer"},
            "mode": {"type": "string"},
            "ports": {"type": "array", "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"],
                "items": {"type": "object", "properties": {"name": {"type": "string"}, "port": {"type": "integer",
                    "x-kubernetes-validations": [{"rule": "self >= oldSelf", "messageExpression": "'port may only grow from ' + string(oldSelf)", "reason": "FieldValueForbidden"}]}}}},
        }}}})
    }

    /// A list of `n` lists of `m` distinct names, each inner list under `rules`.
    fn grid(rules: Value, n: usize, m: usize) -> (Value, Value) {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "groups": {"type": "array", "maxItems": 10, "items": {
                "type": "array", "maxItems": 300, "items": {"type": "string", "maxLength": 5},
                "x-kubernetes-validations": rules}}}}}});
        let groups: Vec<Vec<String>> = (0..n).map(|g| (0..m).map(|i| format!("{g}-{i}")).collect()).collect();
        (schema, json!({"spec": {"groups": groups}}))
    }

    #[test]
    fn each_run_is_costed_against_upstreams_limits() {
        let unique = json!([{"rule": "self.all(x, self.exists_one(y, x == y))", "message": "names are unique"}]);
        // Small lists are cheap: the rule runs and holds.
        let (schema, object) = grid(unique.clone(), 3, 20);
        assert!(check(&schema, &object, None).is_empty());
        let cost = |rule: &str, value: &Value, schema: &Value| {
            crate::cel_cost::runtime(cel::Program::compile(rule).unwrap().expression(), schema, value)
        };
        let inner = &schema["properties"]["spec"]["properties"]["groups"]["items"];
        let small = cost("self.all(x, self.exists_one(y, x == y))", &object["spec"]["groups"][0], inner);
        let (_, big) = grid(unique.clone(), 1, 300);
        let large = cost("self.all(x, self.exists_one(y, x == y))", &big["spec"]["groups"][0], inner);
        // Quadratic in the list's length, as cel-go counts it.
        assert!(large > small * 150 && large < small * 300, "{small} {large}");

        // One run over 1,000,000 is refused, with the rule's message.
        let (schema, object) =
            grid(json!([{"rule": "self.all(x, self.all(y, self.exists(z, x + y == z)))", "message": "odd"}]), 1, 100);
        let causes = check(&schema, &object, None);
        assert_eq!(causes.len(), 1, "{causes:?}");
        assert_eq!(causes[0].field, "spec.groups[0]");
        assert_eq!(causes[0].message, "Invalid value: \"array\": call cost exceeds limit for rule: odd");

        // Runs that fit one by one but not together: the budget runs out, and no further rule
        // runs (the last groups are not judged: their duplicates are not found).
        let two = json!([
            {"rule": "self.all(x, self.exists_one(y, x == y))", "message": "names are unique"},
            {"rule": "self.all(x, self.all(y, x == y || x != y))"},
        ]);
        let (schema, mut object) = grid(two, 10, 300);
        object["spec"]["groups"][9][1] = object["spec"]["groups"][9][0].clone();
        let causes = check(&schema, &object, None);
        assert_eq!(causes.len(), 1, "{causes:?}");
        assert_eq!(
            causes[0].message,
            "Invalid value: \"array\": validation failed due to running out of cost budget, no further validation rules will be run"
        );
        assert!(causes[0].field.starts_with("spec.groups["), "{causes:?}");
        // The same rules over less data run to the end and find the duplicate.
        let (schema, mut object) =
            grid(json!([{"rule": "self.all(x, self.exists_one(y, x == y))", "message": "names are unique"}]), 10, 30);
        object["spec"]["groups"][9][1] = object["spec"]["groups"][9][0].clone();
        let causes = check(&schema, &object, None);
        assert_eq!(causes.len(), 1, "{causes:?}");
        assert_eq!(causes[0].field, "spec.groups[9]");
    }

    #[test]
    fn rules_transition_rules_and_their_messages() {
        let object = |replicas: i64, mode: &str, port: i64| json!({"spec": {"replicas": replicas, "maxReplicas": 3, "mode": mode, "ports": [{"name": "web", "port": port}]}});
        assert!(check(&schema(), &object(2, "a", 80), None).is_empty());
        let causes = check(&schema(), &object(5, "a", 80), None);
        assert_eq!(causes.len(), 1);
        assert_eq!(causes[0].field, "spec");
        assert_eq!(causes[0].message, "Invalid value: \"object\": replicas must not exceed maxReplicas");
        // Transition rules need the old object: not on create, and they compare with it.
        let causes = check(&schema(), &object(2, "b", 70), Some(&object(2, "a", 80)));
        let found: Vec<(&str, &str)> = causes.iter().map(|c| (c.field.as_str(), c.message.as_str())).collect();
        assert_eq!(
            found,
            [
                ("spec.mode", "Invalid value: \"object\": mode is immutable"),
                ("spec.ports[0].port", "Forbidden: port may only grow from 80"),
            ]
        );
    }

    #[test]
    fn rules_that_do_not_compile_are_named_by_their_schema_path() {
        let mut broken = schema();
        broken["properties"]["spec"]["x-kubernetes-validations"][0]["rule"] = json!("self.replicas <=");
        let causes = compile_errors(&broken, "spec.versions[0].schema.openAPIV3Schema");
        assert_eq!(causes.len(), 1);
        assert_eq!(
            causes[0].field,
            "spec.versions[0].schema.openAPIV3Schema.properties[spec].x-kubernetes-validations[0].rule"
        );
        assert!(causes[0].message.contains("compilation failed"), "{}", causes[0].message);
    }
}

/// The item of `olds` (the list before an update) that `item` stands for: in a list of
/// `x-kubernetes-list-type: map`, the one with the same map keys; items of other lists have none.
pub fn correlated<'a>(list_schema: &Value, item: &Value, olds: &'a [Value]) -> Option<&'a Value> {
    if list_schema["x-kubernetes-list-type"] != "map" {
        return None;
    }
    let keys: Vec<&str> =
        list_schema["x-kubernetes-list-map-keys"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if keys.is_empty() {
        return None;
    }
    olds.iter().find(|o| keys.iter().all(|k| o.get(*k) == item.get(*k)))
}
