//! A type checker for the CEL expressions of ValidatingAdmissionPolicies: what upstream's
//! policy status controller reports as `status.typeChecking.expressionWarnings` (a field the
//! matched kind's schema does not declare, an operator applied to types it has no overload
//! for, a name nothing declares), in cel-go's wording.
//!
//! The `cel` crate parses and evaluates but has no checker, so this is one for the part of
//! cel-go's that finds what policies get wrong: types come from OpenAPI schemas (upstream's
//! `SchemaDeclType`: objects of declared properties, maps of `additionalProperties`, lists,
//! strings as bytes, durations or timestamps by their format, int-or-string as `dyn`), the
//! operators have cel-go's overloads (with cross-type numeric comparisons, as Kubernetes
//! enables them), and what it cannot know (a function's result, an object without declared
//! properties) is `dyn`, which matches anything — so it warns less than cel-go may, never of
//! what cel-go accepts. The parser keeps no source positions, so a warning names the
//! position only where the operator or field occurs once in the expression.

use std::sync::Arc;

use cel::common::ast::{EntryExpr, Expr, IdedExpr};
use cel::common::value::CelVal;
use serde_json::Value;

/// A CEL type, as far as the checker knows it.
#[derive(Debug, Clone, PartialEq)]
pub enum Type<'s> {
    Int,
    Uint,
    Double,
    Bool,
    String,
    Bytes,
    Null,
    Duration,
    Timestamp,
    /// A type itself (`int`, `type(x)`).
    Type,
    /// Anything: what the checker does not know.
    Dyn,
    /// What an expression that did not check has (matches anything, so one mistake is
    /// reported once).
    Error,
    List(Box<Type<'s>>),
    Map(Box<Type<'s>>, Box<Type<'s>>),
    /// An object of the properties a schema declares; `root`: a kind's (or an embedded
    /// resource's) root, which always has `apiVersion`, `kind` and `metadata`.
    Schema { schema: &'s Value, root: bool },
    /// An object of the fields given here.
    Record(Arc<Vec<(String, Type<'s>)>>),
}

impl Type<'_> {
    /// cel-go's name of the type.
    fn name(&self) -> String {
        match self {
            Type::Int => "int".into(),
            Type::Uint => "uint".into(),
            Type::Double => "double".into(),
            Type::Bool => "bool".into(),
            Type::String => "string".into(),
            Type::Bytes => "bytes".into(),
            Type::Null => "null_type".into(),
            Type::Duration => "google.protobuf.Duration".into(),
            Type::Timestamp => "google.protobuf.Timestamp".into(),
            Type::Type => "type".into(),
            Type::Dyn => "dyn".into(),
            Type::Error => "*error*".into(),
            Type::List(item) => format!("list({})", item.name()),
            Type::Map(key, value) => format!("map({}, {})", key.name(), value.name()),
            Type::Schema { .. } | Type::Record(_) => "object".into(),
        }
    }

    fn is_open(&self) -> bool {
        matches!(self, Type::Dyn | Type::Error)
    }

    fn is_number(&self) -> bool {
        matches!(self, Type::Int | Type::Uint | Type::Double)
    }

    fn is_object(&self) -> bool {
        matches!(self, Type::Schema { .. } | Type::Record(_))
    }
}

/// Whether a value of `a` can be used where `b` is expected (and the other way round: the
/// checker's type parameters unify).
fn unify(a: &Type<'_>, b: &Type<'_>) -> bool {
    match (a, b) {
        _ if a.is_open() || b.is_open() => true,
        (Type::List(x), Type::List(y)) => unify(x, y),
        (Type::Map(k, v), Type::Map(l, w)) => unify(k, l) && unify(v, w),
        // Null is an object's (and a wrapper's) absent value; objects of different schemas
        // are told apart by name upstream, which generated names make useless to compare.
        (Type::Null, _) | (_, Type::Null) => true,
        _ if a.is_object() && b.is_object() => true,
        _ => std::mem::discriminant(a) == std::mem::discriminant(b),
    }
}

/// The more precise of two unifying types (a list of `dyn` and a list of ints: the latter).
fn join<'s>(a: Type<'s>, b: Type<'s>) -> Type<'s> {
    match (a, b) {
        (Type::List(x), Type::List(y)) => Type::List(Box::new(join(*x, *y))),
        (a, b) if a.is_open() => b,
        (a, _) => a,
    }
}

/// The definitions schemas refer to (`$ref`): the built-in kinds'.
fn resolve(schema: &Value) -> &Value {
    crate::schema::schemas().resolve(schema)
}

fn embedded(schema: &Value) -> bool {
    schema.get("x-kubernetes-embedded-resource") == Some(&Value::Bool(true))
}

/// The type of values of `schema` (upstream's `SchemaDeclType`).
pub fn of_schema(schema: &Value, root: bool) -> Type<'_> {
    let schema = resolve(schema);
    if schema.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true)) {
        return Type::Dyn;
    }
    let declared = match schema.get("type") {
        Some(Value::String(name)) => Some(name.as_str()),
        Some(Value::Array(names)) => names.iter().filter_map(Value::as_str).find(|n| *n != "null"),
        _ => None,
    };
    let has_properties = schema.get("properties").and_then(Value::as_object).is_some_and(|p| !p.is_empty());
    match declared {
        Some("array") => match schema.get("items") {
            Some(items) if items.is_object() => Type::List(Box::new(of_schema(items, embedded(items)))),
            _ => Type::Dyn,
        },
        Some("object") | None => {
            if let Some(values) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                return Type::Map(Box::new(Type::String), Box::new(of_schema(values, embedded(values))));
            }
            if has_properties || root {
                Type::Schema { schema, root }
            } else {
                // An object nothing is declared of (preserving unknown fields, or a free-form
                // built-in such as FieldsV1): upstream has an object without fields; `dyn`
                // here, so that such objects warn of nothing.
                Type::Dyn
            }
        }
        Some("string") => match schema.get("format").and_then(Value::as_str) {
            Some("byte") => Type::Bytes,
            Some("duration") => Type::Duration,
            Some("date" | "date-time") => Type::Timestamp,
            Some("int-or-string") => Type::Dyn,
            _ => Type::String,
        },
        Some("integer") => Type::Int,
        Some("number") => Type::Double,
        Some("boolean") => Type::Bool,
        Some(_) => Type::Dyn,
    }
}

/// A field of an object type: `None` when the type declares no such field.
fn field<'s>(object: &Type<'s>, name: &str) -> Option<Type<'s>> {
    match object {
        Type::Schema { schema, root } => {
            if let Some(property) = schema.get("properties").and_then(|p| p.get(name)) {
                return Some(of_schema(property, embedded(property)));
            }
            if !root {
                return None;
            }
            match name {
                "apiVersion" | "kind" => Some(Type::String),
                "metadata" => Some(
                    crate::schema::schemas()
                        .definitions
                        .get("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta")
                        .map(|meta| of_schema(meta, false))
                        .unwrap_or(Type::Dyn),
                ),
                _ => None,
            }
        }
        Type::Record(fields) => fields.iter().find(|(n, _)| n == name).map(|(_, t)| t.clone()),
        _ => None,
    }
}

/// One problem found, at the node it concerns.
#[derive(Debug, Clone, PartialEq)]
struct Issue {
    message: String,
    /// What to look for in the source to place it: an operator's symbol, `.field`.
    token: Option<String>,
}

/// The declared variables of an expression.
pub struct Env<'s> {
    pub variables: Vec<(String, Type<'s>)>,
}

struct Checker<'e, 's> {
    env: &'e Env<'s>,
    /// Comprehension variables, innermost last.
    scopes: Vec<(String, Type<'s>)>,
    issues: Vec<Issue>,
}

const TYPE_NAMES: &[&str] = &["int", "uint", "double", "bool", "string", "bytes", "list", "map", "null_type", "type", "dyn"];

impl<'s> Checker<'_, 's> {
    fn issue(&mut self, message: String, token: Option<String>) -> Type<'s> {
        self.issues.push(Issue { message, token });
        Type::Error
    }

    fn no_overload(&mut self, function: &str, args: &[&Type<'s>]) -> Type<'s> {
        let names: Vec<String> = args.iter().map(|t| t.name()).collect();
        let token = symbol(function).map(str::to_string);
        self.issue(format!("found no matching overload for '{function}' applied to '({})'", names.join(", ")), token)
    }

    fn check(&mut self, e: &IdedExpr, depth: usize) -> Type<'s> {
        if depth > 200 {
            return Type::Dyn;
        }
        match &e.expr {
            Expr::Literal(literal) => match literal {
                CelVal::Int(_) => Type::Int,
                CelVal::UInt(_) => Type::Uint,
                CelVal::Double(_) => Type::Double,
                CelVal::Boolean(_) => Type::Bool,
                CelVal::String(_) => Type::String,
                CelVal::Bytes(_) => Type::Bytes,
                CelVal::Null => Type::Null,
                _ => Type::Dyn,
            },
            Expr::Ident(name) => {
                if let Some((_, t)) = self.scopes.iter().rev().find(|(n, _)| n == name) {
                    return t.clone();
                }
                if let Some((_, t)) = self.env.variables.iter().find(|(n, _)| n == name) {
                    return t.clone();
                }
                if TYPE_NAMES.contains(&name.as_str()) {
                    return Type::Type;
                }
                self.issue(format!("undeclared reference to '{name}' (in container '')"), Some(name.clone()))
            }
            Expr::Select(select) => {
                let operand = self.check(&select.operand, depth + 1);
                let found = match &operand {
                    t if t.is_open() => Type::Dyn,
                    Type::Map(_, value) => (**value).clone(),
                    t if t.is_object() => match field(t, &select.field) {
                        Some(found) => found,
                        // An escaped property name (`x__dash__y`) is not looked up.
                        None if select.field.contains("__") => Type::Dyn,
                        None => self.issue(
                            format!("undefined field '{}'", select.field),
                            Some(format!(".{}", select.field)),
                        ),
                    },
                    other => {
                        let message = format!("type '{}' does not support field selection", other.name());
                        self.issue(message, Some(format!(".{}", select.field)))
                    }
                };
                if select.test { Type::Bool } else { found }
            }
            Expr::List(list) => {
                let mut item: Option<Type<'s>> = None;
                for element in &list.elements {
                    let t = self.check(element, depth + 1);
                    item = Some(match item {
                        None => t,
                        Some(seen) if seen == t => seen,
                        Some(_) => Type::Dyn,
                    });
                }
                Type::List(Box::new(item.unwrap_or(Type::Dyn)))
            }
            Expr::Map(map) => {
                let (mut key, mut value): (Option<Type<'s>>, Option<Type<'s>>) = (None, None);
                for entry in &map.entries {
                    if let EntryExpr::MapEntry(entry) = &entry.expr {
                        let k = self.check(&entry.key, depth + 1);
                        let v = self.check(&entry.value, depth + 1);
                        key = Some(match key {
                            Some(seen) if seen != k => Type::Dyn,
                            _ => k,
                        });
                        value = Some(match value {
                            Some(seen) if seen != v => Type::Dyn,
                            _ => v,
                        });
                    }
                }
                Type::Map(Box::new(key.unwrap_or(Type::Dyn)), Box::new(value.unwrap_or(Type::Dyn)))
            }
            Expr::Struct(object) => {
                for entry in &object.entries {
                    if let EntryExpr::StructField(field) = &entry.expr {
                        self.check(&field.value, depth + 1);
                    }
                }
                Type::Dyn
            }
            Expr::Comprehension(comprehension) => {
                let range = self.check(&comprehension.iter_range, depth + 1);
                let item = match &range {
                    Type::List(item) => (**item).clone(),
                    Type::Map(key, _) => (**key).clone(),
                    t if t.is_open() => Type::Dyn,
                    other => {
                        let message = format!(
                            "expression of type '{}' cannot be range of a comprehension (must be list, map, or dynamic)",
                            other.name()
                        );
                        self.issue(message, None);
                        Type::Dyn
                    }
                };
                let init = self.check(&comprehension.accu_init, depth + 1);
                self.scopes.push((comprehension.accu_var.clone(), init.clone()));
                self.scopes.push((comprehension.iter_var.clone(), item));
                self.check(&comprehension.loop_cond, depth + 1);
                let step = self.check(&comprehension.loop_step, depth + 1);
                self.scopes.pop();
                self.scopes.pop();
                self.scopes.push((comprehension.accu_var.clone(), join(init, step)));
                let result = self.check(&comprehension.result, depth + 1);
                self.scopes.pop();
                result
            }
            Expr::Call(call) => {
                let target = call.target.as_deref().map(|t| self.check(t, depth + 1));
                let args: Vec<Type<'s>> = call.args.iter().map(|a| self.check(a, depth + 1)).collect();
                self.call(&call.func_name, target, args)
            }
            Expr::Unspecified => Type::Dyn,
        }
    }

    fn call(&mut self, function: &str, target: Option<Type<'s>>, args: Vec<Type<'s>>) -> Type<'s> {
        if let Some(target) = target {
            return member(function, &target);
        }
        match (function, args.as_slice()) {
            ("_&&_" | "_||_", [a, b]) => {
                if unify(a, &Type::Bool) && unify(b, &Type::Bool) {
                    Type::Bool
                } else {
                    self.no_overload(function, &[a, b])
                }
            }
            ("!_", [a]) => {
                if unify(a, &Type::Bool) {
                    Type::Bool
                } else {
                    self.no_overload(function, &[a])
                }
            }
            ("@not_strictly_false", _) => Type::Bool,
            ("-_", [a]) => match a {
                Type::Int | Type::Double | Type::Duration => a.clone(),
                t if t.is_open() => Type::Dyn,
                _ => self.no_overload(function, &[a]),
            },
            ("_?_:_", [condition, yes, no]) => {
                if unify(condition, &Type::Bool) && unify(yes, no) {
                    if yes.is_open() { no.clone() } else { yes.clone() }
                } else {
                    self.no_overload(function, &[condition, yes, no])
                }
            }
            ("_==_" | "_!=_", [a, b]) => {
                // Numbers of different types compare equal at run time; only kinds that can
                // never be equal are refused here.
                if unify(a, b) || (a.is_number() && b.is_number()) {
                    Type::Bool
                } else {
                    self.no_overload(function, &[a, b])
                }
            }
            ("_<_" | "_<=_" | "_>_" | "_>=_", [a, b]) => {
                let ordered = |t: &Type<'_>| {
                    matches!(t, Type::Int | Type::Uint | Type::Double | Type::String | Type::Bytes | Type::Bool | Type::Timestamp | Type::Duration)
                };
                let fits = a.is_open() && (b.is_open() || ordered(b))
                    || b.is_open() && ordered(a)
                    || a.is_number() && b.is_number()
                    || ordered(a) && std::mem::discriminant(a) == std::mem::discriminant(b);
                if fits { Type::Bool } else { self.no_overload(function, &[a, b]) }
            }
            ("_+_" | "_-_" | "_*_" | "_/_" | "_%_", [a, b]) => match arithmetic(function, a, b) {
                Some(t) => t,
                None => self.no_overload(function, &[a, b]),
            },
            ("_[_]" | "_[?_]", [container, index]) => match container {
                Type::List(item) if unify(index, &Type::Int) || matches!(index, Type::Uint) => (**item).clone(),
                Type::Map(key, value) if unify(index, key) => (**value).clone(),
                t if t.is_open() => Type::Dyn,
                _ => self.no_overload(function, &[container, index]),
            },
            ("@in", [_, _]) => Type::Bool,
            ("size", [_]) => Type::Int,
            ("int", [_]) => Type::Int,
            ("uint", [_]) => Type::Uint,
            ("double", [_]) => Type::Double,
            ("string", [_]) => Type::String,
            ("bytes", [_]) => Type::Bytes,
            ("bool", [_]) => Type::Bool,
            ("duration", [_]) => Type::Duration,
            ("timestamp", [_]) => Type::Timestamp,
            ("type", [_]) => Type::Type,
            ("has" | "matches", _) => Type::Bool,
            _ => Type::Dyn,
        }
    }
}

/// The result of an arithmetic operator, if it has an overload for the operands.
fn arithmetic<'s>(function: &str, a: &Type<'s>, b: &Type<'s>) -> Option<Type<'s>> {
    if a.is_open() || b.is_open() {
        // The other operand's type, if it can take part at all.
        let known = if a.is_open() { b } else { a };
        let fits = match function {
            "_+_" => matches!(known, Type::Int | Type::Uint | Type::Double | Type::String | Type::Bytes | Type::List(_) | Type::Duration | Type::Timestamp | Type::Dyn | Type::Error),
            "_-_" => matches!(known, Type::Int | Type::Uint | Type::Double | Type::Duration | Type::Timestamp | Type::Dyn | Type::Error),
            "_%_" => matches!(known, Type::Int | Type::Uint | Type::Dyn | Type::Error),
            _ => matches!(known, Type::Int | Type::Uint | Type::Double | Type::Dyn | Type::Error),
        };
        return fits.then_some(Type::Dyn);
    }
    let same = std::mem::discriminant(a) == std::mem::discriminant(b);
    match (function, a, b) {
        (_, Type::Int | Type::Uint, _) if same => Some(a.clone()),
        ("_+_" | "_-_" | "_*_" | "_/_", Type::Double, Type::Double) => Some(Type::Double),
        ("_+_", Type::String, Type::String) => Some(Type::String),
        ("_+_", Type::Bytes, Type::Bytes) => Some(Type::Bytes),
        ("_+_", Type::List(x), Type::List(y)) if unify(x, y) => Some(join(a.clone(), b.clone())),
        ("_+_" | "_-_", Type::Duration, Type::Duration) => Some(Type::Duration),
        ("_+_", Type::Timestamp, Type::Duration) | ("_+_", Type::Duration, Type::Timestamp) | ("_-_", Type::Timestamp, Type::Duration) => Some(Type::Timestamp),
        ("_-_", Type::Timestamp, Type::Timestamp) => Some(Type::Duration),
        _ => None,
    }
}

/// What a member function returns (Kubernetes' libraries), where it is known.
fn member<'s>(function: &str, target: &Type<'s>) -> Type<'s> {
    match function {
        "size" | "indexOf" | "lastIndexOf" | "getSeconds" | "getMinutes" | "getHours" | "getMilliseconds"
        | "getFullYear" | "getMonth" | "getDayOfMonth" | "getDayOfWeek" | "getDayOfYear" | "getDate" => Type::Int,
        "contains" | "startsWith" | "endsWith" | "matches" | "isSorted" | "exists" | "all" | "exists_one" => Type::Bool,
        "lowerAscii" | "upperAscii" | "trim" | "replace" | "substring" | "join" | "charAt" | "format" => Type::String,
        "split" => Type::List(Box::new(Type::String)),
        "sum" | "min" | "max" => match target {
            Type::List(item) => (**item).clone(),
            _ => Type::Dyn,
        },
        _ => Type::Dyn,
    }
}

/// An operator's symbol in the source.
fn symbol(function: &str) -> Option<&'static str> {
    Some(match function {
        "_+_" => "+",
        "_-_" => "-",
        "_*_" => "*",
        "_/_" => "/",
        "_%_" => "%",
        "_==_" => "==",
        "_!=_" => "!=",
        "_<_" => "<",
        "_<=_" => "<=",
        "_>_" => ">",
        "_>=_" => ">=",
        "_&&_" => "&&",
        "_||_" => "||",
        "!_" => "!",
        "_?_:_" => "?",
        _ => return None,
    })
}

/// The byte offset of `token` in `source`, when it occurs exactly once outside string
/// literals (as a whole operator, or a field name not followed by more of a name).
fn locate(source: &str, token: &str) -> Option<usize> {
    let bytes = source.as_bytes();
    let mut found = None;
    let mut quote: Option<u8> = None;
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if let Some(q) = quote {
            if c == b'\\' {
                i += 2;
                continue;
            }
            if c == q {
                quote = None;
            }
            i += 1;
            continue;
        }
        if c == b'\'' || c == b'"' {
            quote = Some(c);
            i += 1;
            continue;
        }
        if source[i..].starts_with(token) {
            let after = bytes.get(i + token.len()).copied();
            let before = i.checked_sub(1).map(|b| bytes[b]);
            let name_byte = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
            let whole = if token.starts_with('.') {
                !after.is_some_and(name_byte)
            } else if token.bytes().all(name_byte) {
                !after.is_some_and(name_byte) && !before.is_some_and(|b| name_byte(b) || b == b'.')
            } else if matches!(token, "<" | ">" | "!") {
                // Not the first character of `<=`, `>=`, `!=`.
                after != Some(b'=')
            } else {
                true
            };
            if whole {
                if found.is_some() {
                    return None;
                }
                found = Some(i);
            }
        }
        i += 1;
    }
    found
}

/// cel-go's display of one error: position, the source line and a caret under the column.
fn display(source: &str, issue: &Issue) -> String {
    let Some(offset) = issue.token.as_deref().and_then(|t| locate(source, t)) else {
        return format!("ERROR: <input>: {}", issue.message);
    };
    let line_start = source[..offset].rfind('\n').map_or(0, |n| n + 1);
    let line_number = source[..offset].matches('\n').count() + 1;
    let line = source[line_start..].lines().next().unwrap_or_default();
    let column = source[line_start..offset].chars().count();
    let dots: String = source[line_start..offset].chars().map(|c| if c.len_utf8() > 1 { '\u{FF0E}' } else { '.' }).collect();
    format!(
        "ERROR: <input>:{line_number}:{}: {}\n | {}\n | {dots}^",
        column + 1,
        issue.message,
        line.replace('\t', " ")
    )
}

/// The type of `expression` in `env`, and cel-go's display of what is wrong with it (empty
/// when nothing is). An expression that does not parse is the policy validation's to report.
pub fn check<'s>(expression: &str, env: &Env<'s>) -> (Type<'s>, String) {
    let Ok(program) = cel::Program::compile(expression) else {
        return (Type::Dyn, String::new());
    };
    let mut checker = Checker { env, scopes: Vec::new(), issues: Vec::new() };
    let result = checker.check(program.expression(), 0);
    // The parser trims what it parses: positions are in the trimmed source.
    let source = expression.trim();
    let shown: Vec<String> = checker.issues.iter().map(|issue| display(source, issue)).collect();
    (result, shown.join("\n"))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn deployment() -> &'static Value {
        let schemas = crate::schema::schemas();
        let resource = crate::registry::find("apps", "v1", "deployments").unwrap();
        schemas.definitions.get(schemas.root(resource)).unwrap()
    }

    fn env(object: Type<'_>) -> Env<'_> {
        Env { variables: vec![("object".into(), object.clone()), ("oldObject".into(), object)] }
    }

    #[test]
    fn operators_on_mismatched_types_are_reported_as_cel_go_does() {
        let env = env(of_schema(deployment(), true));
        assert_eq!(check("object.spec.replicas > 1", &env), (Type::Bool, String::new()));
        let (_, found) = check("object.spec.replicas > '1'", &env);
        assert_eq!(
            found,
            "ERROR: <input>:1:22: found no matching overload for '_>_' applied to '(int, string)'\n | object.spec.replicas > '1'\n | .....................^"
        );
        let (_, found) = check("'wants replicas > 1, got ' + object.spec.replicas", &env);
        assert!(found.contains("found no matching overload for '_+_' applied to '(string, int)'"), "{found}");
        // Numbers compare across types; an unknown field is reported, with its position.
        assert_eq!(check("object.spec.replicas < 2.5 && object.spec.replicas >= 0u", &env).1, "");
        let (_, found) = check("object.spec.maxRetries < 10", &env);
        assert_eq!(found, "ERROR: <input>:1:12: undefined field 'maxRetries'\n | object.spec.maxRetries < 10\n | ...........^");
    }

    #[test]
    fn what_is_declared_checks_and_what_is_not_known_matches_anything() {
        let env = env(of_schema(deployment(), true));
        for fine in [
            "object.metadata.name.startsWith('a') && object.metadata.labels['app'] == 'x'",
            "object.spec.template.spec.containers.all(c, c.image.contains(':') && size(c.name) < 64)",
            "object.spec.template.spec.containers.map(c, c.name).exists(n, n == 'web')",
            "has(object.spec.strategy) ? object.spec.strategy.type == 'Recreate' : true",
            "object.metadata.creationTimestamp < timestamp('2030-01-01T00:00:00Z')",
            "object.spec.strategy.rollingUpdate.maxSurge == '25%' || object.spec.strategy.rollingUpdate.maxSurge == 1",
            "type(object.spec.replicas) == int",
            "oldObject == null || object.spec.replicas >= oldObject.spec.replicas",
            "object.apiVersion + '/' + object.kind != ''",
        ] {
            assert_eq!(check(fine, &env).1, "", "{fine}");
        }
        for (wrong, message) in [
            ("object.spec.template.spec.containers.all(c, c.imag == 'x')", "undefined field 'imag'"),
            ("has(object.spec.nope)", "undefined field 'nope'"),
            ("params.max > 1", "undeclared reference to 'params' (in container '')"),
            ("object.spec.replicas.foo", "type 'int' does not support field selection"),
            ("object.metadata.name == 1", "found no matching overload for '_==_' applied to '(string, int)'"),
            ("object.spec.paused && 1", "found no matching overload for '_&&_' applied to '(bool, int)'"),
        ] {
            let (_, found) = check(wrong, &env);
            assert!(found.contains(message), "{wrong}: {found}");
        }
    }

    #[test]
    fn custom_schemas_declare_their_fields_and_the_roots_metadata() {
        let schema = json!({"type": "object", "properties": {
            "spec": {"type": "object", "properties": {
                "replicas": {"type": "integer"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                "port": {"x-kubernetes-int-or-string": true},
                "timeout": {"type": "string", "format": "duration"},
            }}}});
        let env = env(of_schema(&schema, true));
        for fine in [
            "object.spec.replicas > 1 && object.metadata.name != '' && object.kind == 'CronTab'",
            "object.spec.labels.team == 'a' && object.spec.free.anything.goes",
            "object.spec.port == 80 || object.spec.port == 'http'",
            "object.spec.timeout > duration('1s')",
        ] {
            assert_eq!(check(fine, &env).1, "", "{fine}");
        }
        assert!(check("object.spec.maxRetries < 10", &env).1.contains("undefined field 'maxRetries'"));
        assert!(check("object.spec.timeout > 1", &env).1.contains("'(google.protobuf.Duration, int)'"));
    }

    #[test]
    fn positions_are_given_only_where_the_token_is_unambiguous() {
        assert_eq!(locate("a > '>' ", ">"), Some(2));
        assert_eq!(locate("a >= 1 && b > 2", ">"), Some(12));
        assert_eq!(locate("a > 1 && b > 2", ">"), None);
        assert_eq!(locate("x.maxRetries < x.maxRetriesB", ".maxRetries"), Some(1));
    }
}
