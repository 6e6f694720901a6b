//! What a CustomResourceDefinition says of one served version of its resource ([`Custom`]),
//! and what its structural schema does to objects: pruning of unknown fields, defaulting and
//! validation (with upstream's wording and field paths, `x-kubernetes-validations` CEL rules
//! and ratcheting of unchanged values), printer columns and JSON paths. Plain functions of
//! values: no store, no state.

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::{Value, json};

use crate::registry::Custom;
use crate::status::Cause;

/// A `JSONSchemaProps` in k8s-rs-pb's serde form (from a protobuf body) as its JSON: field
/// names as JSON Schema spells them (`$ref`, `x-kubernetes-…`), `JSON` values (`default`,
/// `example`, `enum`) parsed from their raw bytes, the either-or messages (`items`,
/// `additionalProperties`, `dependencies`) as the one they hold, and the zero values Go's
/// protobuf writes for its non-pointer fields dropped as its JSON omits them.
pub fn schema_from_protobuf(value: Value) -> Value {
    let Value::Object(map) = value else { return Value::Null };
    let mut out = serde_json::Map::new();
    let raw_json = |field: &Value| -> Option<Value> {
        let bytes: Vec<u8> = field["raw"].as_array()?.iter().filter_map(Value::as_u64).map(|b| b as u8).collect();
        serde_json::from_slice(&bytes).ok()
    };
    let schemas = |field: Value| -> Vec<Value> {
        match field {
            Value::Array(items) => items.into_iter().map(schema_from_protobuf).collect(),
            _ => Vec::new(),
        }
    };
    let schema_map = |field: Value| -> serde_json::Map<String, Value> {
        match field {
            Value::Object(map) => map.into_iter().map(|(k, v)| (k, schema_from_protobuf(v))).collect(),
            _ => serde_json::Map::new(),
        }
    };
    let or_bool = |field: Value| -> Value {
        if field["schema"].is_object() {
            schema_from_protobuf(field["schema"].clone())
        } else {
            json!(field["allows"].as_bool().unwrap_or(false))
        }
    };
    for (key, field) in map {
        if field.is_null() {
            continue;
        }
        let non_empty_string = |f: &Value| f.as_str().is_some_and(|s| !s.is_empty());
        match key.as_str() {
            "ref_" | "schema" | "type_" | "id" | "description" | "format" | "title" | "pattern"
                if non_empty_string(&field) =>
            {
                let name = match key.as_str() {
                    "ref_" => "$ref",
                    "schema" => "$schema",
                    "type_" => "type",
                    other => other,
                };
                out.insert(name.into(), field);
            }
            "default" | "example" => {
                if let Some(value) = raw_json(&field) {
                    out.insert(key, value);
                }
            }
            "enum_" => {
                let values: Vec<Value> = field.as_array().into_iter().flatten().filter_map(raw_json).collect();
                if !values.is_empty() {
                    out.insert("enum".into(), Value::Array(values));
                }
            }
            "items" => {
                if field["schema"].is_object() {
                    out.insert(key, schema_from_protobuf(field["schema"].clone()));
                } else {
                    let all = schemas(field["jSONSchemas"].clone());
                    if !all.is_empty() {
                        out.insert(key, Value::Array(all));
                    }
                }
            }
            "allOf" | "oneOf" | "anyOf" => {
                let all = schemas(field);
                if !all.is_empty() {
                    out.insert(key, Value::Array(all));
                }
            }
            "not" => {
                out.insert(key, schema_from_protobuf(field));
            }
            "properties" | "patternProperties" | "definitions" => {
                let all = schema_map(field);
                if !all.is_empty() {
                    out.insert(key, Value::Object(all));
                }
            }
            "additionalProperties" | "additionalItems" => {
                out.insert(key, or_bool(field));
            }
            "dependencies" => {
                let all: serde_json::Map<String, Value> = field
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|(name, dependency)| {
                        let value = if dependency["schema"].is_object() {
                            schema_from_protobuf(dependency["schema"].clone())
                        } else {
                            dependency["property"].clone()
                        };
                        (name.clone(), value)
                    })
                    .collect();
                if !all.is_empty() {
                    out.insert(key, Value::Object(all));
                }
            }
            "externalDocs" => {
                let docs: serde_json::Map<String, Value> = field
                    .as_object()
                    .into_iter()
                    .flatten()
                    .filter(|(_, v)| non_empty_string(v))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect();
                if !docs.is_empty() {
                    out.insert(key, Value::Object(docs));
                }
            }
            "required" | "xKubernetesListMapKeys" if field.as_array().is_some_and(|a| !a.is_empty()) => {
                let name = if key == "required" { "required" } else { "x-kubernetes-list-map-keys" };
                out.insert(name.into(), field);
            }
            "xKubernetesValidations" => {
                let rules: Vec<Value> = field
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|rule| {
                        let kept: serde_json::Map<String, Value> = rule
                            .as_object()
                            .into_iter()
                            .flatten()
                            .filter(|(k, v)| {
                                !v.is_null()
                                    && (v.as_str() != Some(""))
                                    && !(k.as_str() == "optionalOldSelf" && **v == json!(false))
                            })
                            .map(|(k, v)| (k.clone(), v.clone()))
                            .collect();
                        Value::Object(kept)
                    })
                    .collect();
                if !rules.is_empty() {
                    out.insert("x-kubernetes-validations".into(), Value::Array(rules));
                }
            }
            // Go's pointer fields: set means set, whatever the value.
            "maximum" | "minimum" | "maxLength" | "minLength" | "maxItems" | "minItems" | "maxProperties"
            | "minProperties" | "multipleOf" => {
                out.insert(key, field);
            }
            "xKubernetesPreserveUnknownFields" => {
                out.insert("x-kubernetes-preserve-unknown-fields".into(), field);
            }
            "xKubernetesListType" | "xKubernetesMapType" => {
                let name =
                    if key == "xKubernetesListType" { "x-kubernetes-list-type" } else { "x-kubernetes-map-type" };
                out.insert(name.into(), field);
            }
            // Plain bools: only `true` is written in JSON.
            "nullable"
            | "uniqueItems"
            | "exclusiveMaximum"
            | "exclusiveMinimum"
            | "xKubernetesEmbeddedResource"
            | "xKubernetesIntOrString"
                if field == json!(true) =>
            {
                let name = match key.as_str() {
                    "xKubernetesEmbeddedResource" => "x-kubernetes-embedded-resource",
                    "xKubernetesIntOrString" => "x-kubernetes-int-or-string",
                    other => other,
                };
                out.insert(name.into(), field);
            }
            _ => {}
        }
    }
    Value::Object(out)
}

/// Drops the fields `object` has that its schema does not declare (upstream's pruning) and
/// returns their paths, for `fieldValidation`.
pub fn prune(custom: &Custom, object: &mut Value) -> Vec<String> {
    let mut unknown = Vec::new();
    let Some(map) = object.as_object_mut() else { return unknown };
    if let Some(metadata) = map.get_mut("metadata").filter(|m| m.is_object()) {
        unknown.extend(crate::schema::schemas().prune_metadata(metadata, "metadata"));
    }
    let Some(schema) = custom.schema.as_ref().map(|s| s.decoded()) else { return unknown };
    let properties = schema["properties"].as_object();
    let preserve = schema["x-kubernetes-preserve-unknown-fields"] == json!(true);
    let keys: Vec<String> = map.keys().cloned().collect();
    for key in keys {
        if matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
            continue;
        }
        match properties.and_then(|p| p.get(&key)) {
            Some(property) => prune_value(property, map.get_mut(&key).expect("listed"), &key, &mut unknown),
            None if preserve => {}
            None => {
                map.remove(&key);
                unknown.push(key);
            }
        }
    }
    unknown
}

fn prune_value(schema: &Value, value: &mut Value, path: &str, unknown: &mut Vec<String>) {
    if schema["x-kubernetes-int-or-string"] == json!(true) {
        return;
    }
    match value {
        Value::Object(map) => {
            let embedded = schema["x-kubernetes-embedded-resource"] == json!(true);
            let preserve = schema["x-kubernetes-preserve-unknown-fields"] == json!(true);
            let properties = schema["properties"].as_object();
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            if properties.is_none() && additional.is_none() && (preserve || schema["type"] != "object") {
                return;
            }
            let keys: Vec<String> = map.keys().cloned().collect();
            for key in keys {
                let child_path = format!("{path}.{key}");
                if embedded && matches!(key.as_str(), "apiVersion" | "kind") {
                    continue;
                }
                if embedded && key == "metadata" {
                    if let Some(metadata) = map.get_mut("metadata").filter(|m| m.is_object()) {
                        unknown.extend(crate::schema::schemas().prune_metadata(metadata, &child_path));
                    }
                    continue;
                }
                let child_schema = properties.and_then(|p| p.get(&key)).or(additional);
                match child_schema {
                    Some(child) => prune_value(child, map.get_mut(&key).expect("listed"), &child_path, unknown),
                    None if preserve || schema.get("additionalProperties") == Some(&json!(true)) => {}
                    None => {
                        map.remove(&key);
                        unknown.push(child_path);
                    }
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items").filter(|i| i.is_object()) {
                for (i, item) in items.iter_mut().enumerate() {
                    prune_value(item_schema, item, &format!("{path}[{i}]"), unknown);
                }
            }
        }
        _ => {}
    }
}

/// Fills in the schema's `default`s where a field is absent.
pub fn default(custom: &Custom, object: &mut Value) {
    if let Some(schema) = &custom.schema {
        default_value(&schema.decoded(), object, true);
    }
}

fn default_value(schema: &Value, value: &mut Value, root: bool) {
    match value {
        Value::Object(map) => {
            if let Some(properties) = schema["properties"].as_object() {
                for (key, property) in properties {
                    if root && matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                        continue;
                    }
                    if !map.contains_key(key)
                        && let Some(default) = property.get("default")
                    {
                        map.insert(key.clone(), default.clone());
                    }
                    if let Some(child) = map.get_mut(key) {
                        default_value(property, child, false);
                    }
                }
            }
            if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                for child in map.values_mut() {
                    default_value(additional, child, false);
                }
            }
        }
        Value::Array(items) => {
            if let Some(item_schema) = schema.get("items").filter(|i| i.is_object()) {
                for item in items {
                    default_value(item_schema, item, false);
                }
            }
        }
        _ => {}
    }
}

/// Validates a custom object against its schema: the causes of a 422, with upstream's wording.
/// Once it fits, its CEL rules (`x-kubernetes-validations`) run, `old` being the object before
/// an update. On an update, values left as they were are not judged again (ratcheting).
pub fn validate(custom: &Custom, object: &Value, old: Option<&Value>) -> Vec<Cause> {
    let mut causes = Vec::new();
    if let Some(schema) = &custom.schema {
        let schema = schema.decoded();
        let mut top = (*schema).clone();
        // The server validates metadata itself.
        if let Some(properties) = top["properties"].as_object_mut() {
            properties.remove("metadata");
            properties.remove("apiVersion");
            properties.remove("kind");
        }
        validate_value(&top, object, old, "", &mut causes);
        if causes.is_empty() {
            causes = crate::rules::check(&schema, object, old);
        }
    }
    causes
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

fn short(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

/// `maxItems` / `maxProperties`: more than the schema allows.
fn too_many(schema: &Value, limit: &str, count: usize, field: &str, causes: &mut Vec<Cause>) {
    if let Some(max) = schema[limit].as_u64()
        && count as u64 > max
    {
        causes.push(cause("FieldValueTooMany", field, format!("Too many: {count}: must have at most {max} items")));
    }
}

/// A schema's `pattern`, compiled once per process (None if it is not a valid expression).
fn compiled(pattern: &str) -> Option<regex::Regex> {
    static CACHE: Mutex<Option<HashMap<String, Option<regex::Regex>>>> = Mutex::new(None);
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    let cache = cache.get_or_insert_with(Default::default);
    cache.entry(pattern.to_string()).or_insert_with(|| regex::Regex::new(pattern).ok()).clone()
}

/// Validates `value` against `schema`. `old` is the value at the same place before an update,
/// where one can be found (by property name, and by the keys of a `map` list's items): as
/// upstream's validation ratcheting, a value an update leaves as it was is not judged again,
/// so tightening a schema does not lock its existing objects.
fn validate_value(schema: &Value, value: &Value, old: Option<&Value>, path: &str, causes: &mut Vec<Cause>) {
    if old == Some(value) {
        return;
    }
    let field = if path.is_empty() { "<root>".to_string() } else { path.to_string() };
    let actual = type_name(value);
    if value.is_null() {
        if schema["nullable"] != json!(true) && schema["type"].is_string() {
            let expected = schema["type"].as_str().unwrap_or_default();
            causes.push(cause(
                "FieldValueTypeInvalid",
                &field,
                format!("Invalid value: \"null\": {field} in body must be of type {expected}: \"null\""),
            ));
        }
        return;
    }
    if schema["x-kubernetes-int-or-string"] == json!(true) {
        if !matches!(actual, "integer" | "string") {
            causes.push(cause(
                "FieldValueTypeInvalid",
                &field,
                format!("Invalid value: {actual:?}: {field} in body must be of type integer-or-string: {actual:?}"),
            ));
        }
        return;
    }
    if let Some(expected) = schema["type"].as_str() {
        let fits = expected == actual || (expected == "number" && actual == "integer");
        if !fits {
            causes.push(cause(
                "FieldValueTypeInvalid",
                &field,
                format!("Invalid value: {actual:?}: {field} in body must be of type {expected}: {actual:?}"),
            ));
            return;
        }
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(short).collect();
        causes.push(cause(
            "FieldValueNotSupported",
            &field,
            format!("Unsupported value: {}: supported values: {}", short(value), list.join(", ")),
        ));
    }
    match value {
        Value::Number(n) => {
            let n = n.as_f64().unwrap_or_default();
            if let Some(max) = schema["maximum"].as_f64() {
                let exclusive = schema["exclusiveMaximum"] == json!(true);
                if n > max || (exclusive && n == max) {
                    let word = if exclusive { "less than" } else { "less than or equal to" };
                    causes.push(cause(
                        "FieldValueInvalid",
                        &field,
                        format!("Invalid value: {value}: {field} in body should be {word} {}", schema["maximum"]),
                    ));
                }
            }
            if let Some(min) = schema["minimum"].as_f64() {
                let exclusive = schema["exclusiveMinimum"] == json!(true);
                if n < min || (exclusive && n == min) {
                    let word = if exclusive { "greater than" } else { "greater than or equal to" };
                    causes.push(cause(
                        "FieldValueInvalid",
                        &field,
                        format!("Invalid value: {value}: {field} in body should be {word} {}", schema["minimum"]),
                    ));
                }
            }
        }
        Value::String(s) => {
            let length = s.chars().count() as u64;
            if let Some(max) = schema["maxLength"].as_u64()
                && length > max
            {
                causes.push(cause("FieldValueTooLong", &field, format!("Too long: may not be more than {max} bytes")));
            }
            if let Some(min) = schema["minLength"].as_u64()
                && length < min
            {
                causes.push(cause(
                    "FieldValueInvalid",
                    &field,
                    format!("Invalid value: {s:?}: {field} in body should be at least {min} chars long"),
                ));
            }
            if let Some(pattern) = schema["pattern"].as_str()
                && compiled(pattern).is_some_and(|regex| !regex.is_match(s))
            {
                causes.push(cause(
                    "FieldValueInvalid",
                    &field,
                    format!("Invalid value: {s:?}: {field} in body should match '{pattern}'"),
                ));
            }
        }
        Value::Array(items) => {
            too_many(schema, "maxItems", items.len(), &field, causes);
            if let Some(min) = schema["minItems"].as_u64()
                && (items.len() as u64) < min
            {
                causes.push(cause(
                    "FieldValueInvalid",
                    &field,
                    format!("Invalid value: {}: {field} in body should have at least {min} items", items.len()),
                ));
            }
            if let Some(item_schema) = schema.get("items").filter(|i| i.is_object()) {
                let old_items = old.and_then(Value::as_array);
                for (i, item) in items.iter().enumerate() {
                    let old_item = old_items.and_then(|olds| crate::rules::correlated(schema, item, olds));
                    validate_value(item_schema, item, old_item, &format!("{path}[{i}]"), causes);
                }
            }
        }
        Value::Object(map) => {
            let join = |key: &str| if path.is_empty() { key.to_string() } else { format!("{path}.{key}") };
            for required in schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str) {
                if !map.contains_key(required) {
                    causes.push(cause("FieldValueRequired", &join(required), "Required value"));
                }
            }
            too_many(schema, "maxProperties", map.len(), &field, causes);
            let properties = schema["properties"].as_object();
            let additional = schema.get("additionalProperties").filter(|a| a.is_object());
            for (key, child) in map {
                if let Some(child_schema) = properties.and_then(|p| p.get(key)).or(additional) {
                    validate_value(child_schema, child, old.and_then(|o| o.get(key)), &join(key), causes);
                }
            }
        }
        _ => {}
    }
}

/// Sets the field a simple dotted path (`.spec.replicas`) names, making the objects on the way.
pub fn set_path(object: &mut Value, path: &str, value: Value) {
    let mut current = object;
    let parts: Vec<&str> = path.trim_start_matches('.').split('.').filter(|p| !p.is_empty()).collect();
    for (i, part) in parts.iter().enumerate() {
        if !current.is_object() {
            *current = json!({});
        }
        if i == parts.len() - 1 {
            current[*part] = value;
            return;
        }
        current = &mut current[*part];
    }
}

/// Follows a simple JSONPath (`.a.b[0].c`, with or without the braces kubectl allows).
pub fn json_path<'a>(object: &'a Value, path: &str) -> Option<&'a Value> {
    let path = path.trim().trim_start_matches('{').trim_end_matches('}').trim_start_matches('$');
    let mut current = object;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        let (key, indices) = match part.find('[') {
            Some(at) => (&part[..at], &part[at..]),
            None => (part, ""),
        };
        if !key.is_empty() {
            current = current.get(key)?;
        }
        for index in indices.split('[').filter(|i| !i.is_empty()) {
            let index: usize = index.trim_end_matches(']').parse().ok()?;
            current = current.get(index)?;
        }
    }
    Some(current)
}

/// The group versions the served custom resources add, each group's versions in upstream's
/// priority order (GA before beta before alpha, higher numbers first).
pub fn version_priority(a: &str, b: &str) -> std::cmp::Ordering {
    fn parse(v: &str) -> Option<(u64, u8, u64)> {
        let rest = v.strip_prefix('v')?;
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let major: u64 = digits.parse().ok()?;
        let tail = &rest[digits.len()..];
        if tail.is_empty() {
            return Some((major, 3, 0));
        }
        let (stage, number) = if let Some(n) = tail.strip_prefix("beta") {
            (2, n)
        } else if let Some(n) = tail.strip_prefix("alpha") {
            (1, n)
        } else {
            return None;
        };
        Some((major, stage, number.parse().ok()?))
    }
    match (parse(a), parse(b)) {
        (Some((ma, sa, na)), Some((mb, sb, nb))) => sb.cmp(&sa).then(mb.cmp(&ma)).then(nb.cmp(&na)),
        (Some(_), None) => std::cmp::Ordering::Less,
        (None, Some(_)) => std::cmp::Ordering::Greater,
        (None, None) => a.cmp(b),
    }
}

pub(crate) fn cause(reason: &'static str, field: &str, message: impl Into<String>) -> Cause {
    Cause { reason, message: message.into(), field: field.into() }
}
