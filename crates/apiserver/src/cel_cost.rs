//! Static cost estimates of a definition's CEL rules (`x-kubernetes-validations`), as upstream
//! makes them when a CustomResourceDefinition is written: cel-go's cost model (an identifier
//! or a field 1, a constant 0, an O(1) function 1, a string traversed a tenth of its length, a
//! regular expression a quarter of its pattern's length per tenth of the string, a
//! comprehension its body times the size of what it ranges over, a new list 10, a new map
//! 30) over the sizes Kubernetes derives from the schema — `maxLength` (in bytes: four per
//! character), `maxItems` and `maxProperties`, or, where the schema sets no bound, as many as
//! a request of at most 3 MiB could hold given the smallest item the schema allows. A rule's
//! cost is counted once for each time it can run (the product of the bounds of the lists and
//! maps above it, or again what 3 MiB could hold). A rule over 10,000,000 or a schema whose
//! rules add up to over 100,000,000 is refused, with upstream's wording.

use cel::common::ast::{EntryExpr, Expr, IdedExpr};
use cel::common::value::CelVal;
use serde_json::Value;

use crate::status::Cause;

/// Upstream's `StaticEstimatedCostLimit`: one rule, times the number of times it can run.
pub const RULE_LIMIT: u64 = 10_000_000;
/// Upstream's `StaticEstimatedCRDCostLimit`: every rule of a version's schema.
pub const SCHEMA_LIMIT: u64 = 100_000_000;
/// The largest request the API server takes (what unbounded sizes are derived from).
const MAX_REQUEST_BYTES: u64 = 3 * 1024 * 1024;

/// What kind of sized value a node holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sized {
    Text,
    List,
    Map,
}

/// What the estimator knows of a value.
#[derive(Debug, Clone, PartialEq)]
enum Ty {
    /// A number, boolean, duration, timestamp: of a fixed size.
    Scalar,
    /// A string (bytes), list or map of at most `max` elements; `item`: a list's items, a
    /// map's values.
    Sized { kind: Sized, max: u64, item: Option<Box<Ty>> },
    /// An object of known fields.
    Object(Vec<(String, Ty)>),
    /// An object seen without a schema (a struct or a map: its size is its number of fields).
    Held(Vec<(String, Ty)>),
    /// Nothing known.
    Unknown,
}

/// A schema node's type and the smallest it can be serialized (upstream's `DeclType` and its
/// `MinSerializedSize`).
fn declared(schema: &Value, depth: usize) -> (Ty, u64) {
    if depth > 64 {
        return (Ty::Unknown, 1);
    }
    if schema["x-kubernetes-int-or-string"] == true {
        return (Ty::Sized { kind: Sized::Text, max: MAX_REQUEST_BYTES - 2, item: None }, 1);
    }
    let bound = |name: &str| schema[name].as_i64().map(|n| n.max(0) as u64);
    match schema["type"].as_str() {
        Some("array") => {
            let Some(items) = schema.get("items").filter(|i| i.is_object()) else { return (Ty::Unknown, 2) };
            let (item, min) = declared(items, depth + 1);
            let max = bound("maxItems").unwrap_or((MAX_REQUEST_BYTES - 2) / (min + 1));
            (Ty::Sized { kind: Sized::List, max, item: Some(Box::new(item)) }, 2)
        }
        Some("object") => {
            if let Some(values) = schema.get("additionalProperties").filter(|a| a.is_object()) {
                let (value, min) = declared(values, depth + 1);
                let max = bound("maxProperties").unwrap_or((MAX_REQUEST_BYTES - 2) / (min + 6));
                return (Ty::Sized { kind: Sized::Map, max, item: Some(Box::new(value)) }, 2);
            }
            let required: Vec<&str> =
                schema["required"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
            let mut fields = Vec::new();
            let mut min = 2;
            for (name, property) in schema["properties"].as_object().into_iter().flatten() {
                let (ty, field_min) = declared(property, depth + 1);
                if required.contains(&name.as_str()) && property.get("default").is_none() {
                    min += name.len() as u64 + field_min + 4;
                }
                fields.push((name.clone(), ty));
            }
            (Ty::Object(fields), min)
        }
        Some("string") => {
            let unbounded = MAX_REQUEST_BYTES - 2;
            let (max, min) = match schema["format"].as_str() {
                Some("byte") => (bound("maxLength").unwrap_or(unbounded), 2),
                Some("duration") => return (Ty::Scalar, 4),
                Some("date") => return (Ty::Scalar, 12),
                Some("date-time") => return (Ty::Scalar, 22),
                _ => match (bound("maxLength"), schema["enum"].as_array()) {
                    (Some(length), _) => (length.saturating_mul(4), 2),
                    (None, Some(values)) if !values.is_empty() => {
                        (values.iter().filter_map(Value::as_str).map(|v| v.len() as u64).max().unwrap_or(0), 2)
                    }
                    _ => (unbounded, 2),
                },
            };
            (Ty::Sized { kind: Sized::Text, max, item: None }, min)
        }
        Some("boolean") => (Ty::Scalar, 4),
        Some("number" | "integer") => (Ty::Scalar, 1),
        _ => (Ty::Unknown, 1),
    }
}

/// A node of an expression as the estimator sees it: its type and its size (of a value from
/// the schema: its bound, 0 for scalars and objects, as upstream's size estimator says).
#[derive(Debug, Clone)]
struct Node {
    ty: Ty,
    size: u64,
}

impl Node {
    fn scalar() -> Node {
        Node { ty: Ty::Scalar, size: 1 }
    }
    fn unknown() -> Node {
        Node { ty: Ty::Unknown, size: u64::MAX }
    }
    /// A value the schema declares.
    fn declared(ty: &Ty) -> Node {
        let size = match ty {
            Ty::Sized { max, .. } => *max,
            Ty::Held(fields) => fields.len() as u64,
            Ty::Unknown => u64::MAX,
            _ => 0,
        };
        Node { ty: ty.clone(), size }
    }
    fn kind(&self) -> Option<Sized> {
        match &self.ty {
            Ty::Sized { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

/// `ceil(n * factor)`, saturating.
fn factor(n: u64, factor: f64) -> u64 {
    let product = (n as f64 * factor).ceil();
    if product >= u64::MAX as f64 { u64::MAX } else { product as u64 }
}

struct Estimator<'a> {
    root: Node,
    /// The size of what nothing is known of: unbounded for a static estimate; for the cost of
    /// one run (values of known sizes), a map key or variable, taken as short.
    unknown: u64,
    /// Comprehension variables in scope, innermost last.
    scopes: Vec<(&'a str, Node)>,
    /// Variables other than `self` and `oldSelf` (a policy's `object`, `request`…).
    named: Vec<(String, Node)>,
}

impl<'a> Estimator<'a> {
    fn unknown(&self) -> Node {
        Node { ty: Ty::Unknown, size: self.unknown }
    }

    fn cost(&mut self, e: &'a IdedExpr, depth: usize) -> (u64, Node) {
        if depth > 200 {
            return (u64::MAX, self.unknown());
        }
        match &e.expr {
            Expr::Literal(CelVal::String(text)) => (
                0,
                Node {
                    ty: Ty::Sized { kind: Sized::Text, max: text.len() as u64, item: None },
                    size: text.len() as u64,
                },
            ),
            Expr::Literal(CelVal::Bytes(bytes)) => (
                0,
                Node {
                    ty: Ty::Sized { kind: Sized::Text, max: bytes.len() as u64, item: None },
                    size: bytes.len() as u64,
                },
            ),
            Expr::Literal(_) => (0, Node::scalar()),
            Expr::Ident(name) => {
                if let Some((_, node)) = self.scopes.iter().rev().find(|(n, _)| n == name) {
                    return (1, node.clone());
                }
                if let Some((_, node)) = self.named.iter().find(|(n, _)| n == name) {
                    return (1, node.clone());
                }
                match name.as_str() {
                    "self" | "oldSelf" => (1, self.root.clone()),
                    // The accumulator of a comprehension (a boolean or a count).
                    accumulator if accumulator.starts_with('@') => (1, Node::scalar()),
                    _ => (1, self.unknown()),
                }
            }
            Expr::Select(select) => {
                let (cost, operand) = self.cost(&select.operand, depth + 1);
                if select.test {
                    return (cost.saturating_add(1), Node::scalar());
                }
                let child = match &operand.ty {
                    Ty::Object(fields) | Ty::Held(fields) => fields
                        .iter()
                        .find(|(n, _)| *n == select.field)
                        .map(|(_, ty)| Node::declared(ty))
                        .unwrap_or_else(|| self.unknown()),
                    Ty::Sized { kind: Sized::Map, item: Some(value), .. } => Node::declared(value),
                    _ => self.unknown(),
                };
                (cost.saturating_add(1), child)
            }
            Expr::List(list) => {
                let mut cost = 10u64;
                let mut item = None;
                for element in &list.elements {
                    let (c, node) = self.cost(element, depth + 1);
                    cost = cost.saturating_add(c);
                    item.get_or_insert(node.ty);
                }
                let n = list.elements.len() as u64;
                (cost, Node { ty: Ty::Sized { kind: Sized::List, max: n, item: item.map(Box::new) }, size: n })
            }
            Expr::Map(map) => {
                let mut cost = 30u64;
                for entry in &map.entries {
                    if let EntryExpr::MapEntry(entry) = &entry.expr {
                        cost = cost.saturating_add(self.cost(&entry.key, depth + 1).0);
                        cost = cost.saturating_add(self.cost(&entry.value, depth + 1).0);
                    }
                }
                let n = map.entries.len() as u64;
                (cost, Node { ty: Ty::Sized { kind: Sized::Map, max: n, item: None }, size: n })
            }
            Expr::Struct(object) => {
                let mut cost = 40u64;
                for entry in &object.entries {
                    if let EntryExpr::StructField(field) = &entry.expr {
                        cost = cost.saturating_add(self.cost(&field.value, depth + 1).0);
                    }
                }
                (cost, self.unknown())
            }
            Expr::Comprehension(comprehension) => {
                let (range_cost, range) = self.cost(&comprehension.iter_range, depth + 1);
                let (init_cost, _) = self.cost(&comprehension.accu_init, depth + 1);
                // A list's items, or a map's keys (strings of unknown length).
                let item = match &range.ty {
                    Ty::Sized { kind: Sized::List, item: Some(item), .. } => Node::declared(item),
                    _ => self.unknown(),
                };
                self.scopes.push((comprehension.iter_var.as_str(), item));
                let (condition, _) = self.cost(&comprehension.loop_cond, depth + 1);
                let (step, _) = self.cost(&comprehension.loop_step, depth + 1);
                self.scopes.pop();
                let (result_cost, result) = self.cost(&comprehension.result, depth + 1);
                let cost = range_cost
                    .saturating_add(init_cost)
                    .saturating_add(result_cost)
                    .saturating_add(range.size.saturating_mul(condition.saturating_add(step)));
                let node = match result.ty {
                    Ty::Scalar => Node::scalar(),
                    _ => Node { ty: Ty::Sized { kind: Sized::List, max: range.size, item: None }, size: range.size },
                };
                (cost, node)
            }
            Expr::Call(call) => self.call(&call.func_name, call.target.as_deref(), &call.args, depth),
            Expr::Unspecified => (0, self.unknown()),
        }
    }

    fn call(
        &mut self,
        function: &str,
        target: Option<&'a IdedExpr>,
        args: &'a [IdedExpr],
        depth: usize,
    ) -> (u64, Node) {
        let mut costs = Vec::with_capacity(args.len());
        let mut nodes = Vec::with_capacity(args.len());
        for arg in args {
            let (cost, node) = self.cost(arg, depth + 1);
            costs.push(cost);
            nodes.push(node);
        }
        let (target_cost, receiver) = match target {
            Some(t) => {
                let (cost, node) = self.cost(t, depth + 1);
                (cost, Some(node))
            }
            None => (0, None),
        };
        let args_cost = costs.iter().fold(target_cost, |sum, c| sum.saturating_add(*c));
        let size = |i: usize| nodes.get(i).map(|n| n.size).unwrap_or(u64::MAX);
        let receiver_size = receiver.as_ref().map(|n| n.size);
        let (own, node) = match (function, nodes.len()) {
            // Short-circuits: at most both sides; a conditional, at most the dearer branch.
            ("_&&_" | "_||_", 2) => return (args_cost, Node::scalar()),
            ("_?_:_", 3) => {
                let cost = costs[0].saturating_add(costs[1].max(costs[2]));
                let size = nodes[1].size.max(nodes[2].size);
                return (cost, Node { ty: nodes[1].ty.clone(), size });
            }
            ("_==_" | "_!=_" | "_<_" | "_<=_" | "_>_" | "_>=_", 2) => {
                (factor(size(0).min(size(1)), 0.1), Node::scalar())
            }
            ("matches", 1) if receiver_size.is_some() => {
                let text = factor(receiver_size.unwrap_or(u64::MAX).saturating_add(1), 0.1);
                (text.saturating_mul(factor(size(0), 0.25)), Node::scalar())
            }
            ("matches", 2) => {
                (factor(size(0).saturating_add(1), 0.1).saturating_mul(factor(size(1), 0.25)), Node::scalar())
            }
            ("contains", 1) if receiver.as_ref().and_then(Node::kind) != Some(Sized::List) => {
                let text = factor(receiver_size.unwrap_or(u64::MAX), 0.1);
                (text.saturating_mul(factor(size(0), 0.1)), Node::scalar())
            }
            ("startsWith" | "endsWith", 1) => (factor(size(0), 0.1), Node::scalar()),
            ("@in", 2) => (size(1), Node::scalar()),
            ("_+_", 2) => match (nodes[0].kind(), nodes[1].kind()) {
                (Some(Sized::List), _) | (_, Some(Sized::List)) => {
                    let n = size(0).saturating_add(size(1));
                    (1, Node { ty: Ty::Sized { kind: Sized::List, max: n, item: None }, size: n })
                }
                (Some(Sized::Text), _) | (_, Some(Sized::Text)) => {
                    let n = size(0).saturating_add(size(1));
                    (factor(n, 0.1), Node { ty: Ty::Sized { kind: Sized::Text, max: n, item: None }, size: n })
                }
                _ => (1, Node::scalar()),
            },
            // Indexing: a list's item, a map's value.
            ("_[_]", 2) => {
                let item = match &nodes[0].ty {
                    Ty::Sized { kind: Sized::List | Sized::Map, item: Some(item), .. } => Node::declared(item),
                    _ => self.unknown(),
                };
                (1, item)
            }
            // Kubernetes' string library: a walk over the string.
            (
                "lowerAscii" | "upperAscii" | "trim" | "replace" | "split" | "indexOf" | "lastIndexOf" | "substring",
                _,
            ) if receiver.is_some() => {
                let n = receiver_size.unwrap_or(u64::MAX);
                (factor(n, 0.1), Node { ty: Ty::Sized { kind: Sized::Text, max: n, item: None }, size: n })
            }
            // Kubernetes' list library: a walk over the list.
            ("isSorted" | "sum" | "min" | "max" | "indexOf" | "lastIndexOf" | "join", _) if receiver.is_some() => {
                (receiver_size.unwrap_or(u64::MAX), self.unknown())
            }
            // A conversion to a string: as long as what it converts, a number's at most 32
            // bytes (so that `'…' + string(self.max)` in a message costs what it should).
            ("string", 1) => {
                let n = match nodes[0].ty {
                    Ty::Scalar => 32,
                    _ => nodes[0].size,
                };
                (1, Node { ty: Ty::Sized { kind: Sized::Text, max: n, item: None }, size: n })
            }
            ("size" | "int" | "uint" | "double" | "bool" | "duration" | "timestamp" | "!_" | "-_" | "type", _)
            | ("_-_" | "_*_" | "_/_" | "_%_", _)
            | ("@not_strictly_false", _) => (1, Node::scalar()),
            _ => (1, self.unknown()),
        };
        (own.saturating_add(args_cost), node)
    }
}

/// The estimated cost of `expression` with `self` (and `oldSelf`) of type `ty`.
fn estimate(expression: &IdedExpr, ty: &Ty) -> u64 {
    let mut estimator =
        Estimator { root: Node::declared(ty), scopes: Vec::new(), named: Vec::new(), unknown: u64::MAX };
    estimator.cost(expression, 0).0
}

/// Upstream's `PerCallLimit`: one run of a rule.
pub const CALL_LIMIT: u64 = 1_000_000;
/// Upstream's `RuntimeCELCostBudget`: every rule run while one object is validated.
pub const OBJECT_BUDGET: u64 = 10_000_000;

/// The cost of one run of `expression` with `self` (and `oldSelf`) the value `value` of
/// `schema`. Upstream counts it as the program runs; the `cel` crate counts nothing, so it is
/// the same cost model over the sizes the value has (an upper bound of what cel-go counts:
/// both sides of a short-circuit, the dearer branch of a conditional).
pub fn runtime(expression: &IdedExpr, schema: &Value, value: &Value) -> u64 {
    let ty = actual(schema, value, 0);
    let mut estimator = Estimator { root: Node::declared(&ty), scopes: Vec::new(), named: Vec::new(), unknown: 64 };
    estimator.cost(expression, 0).0
}

/// A value an expression sees by name, without a schema.
pub enum Named<'v> {
    Json(&'v Value),
    /// What an earlier expression evaluated to (a policy's variable).
    Cel(&'v cel::Value),
}

/// The sizes of values an expression sees by name, without a schema (a policy's `object`,
/// `request`, `params`, `variables`…): each value's type is what it holds, objects with the
/// fields they have.
#[derive(Default)]
pub struct Sizes {
    named: Vec<(String, Node)>,
}

impl Sizes {
    /// Sets (or replaces) what `name` holds.
    pub fn set(&mut self, name: &str, value: Named<'_>) {
        let ty = match value {
            Named::Json(value) => held(value, 0),
            Named::Cel(value) => observed(value, 0),
        };
        let node = Node::declared(&ty);
        match self.named.iter_mut().find(|(n, _)| n == name) {
            Some((_, found)) => *found = node,
            None => self.named.push((name.to_string(), node)),
        }
    }
}

/// The cost of one run of `expression` over values of the given sizes.
pub fn runtime_named(expression: &IdedExpr, sizes: &Sizes) -> u64 {
    let mut estimator =
        Estimator { root: Node::unknown(), scopes: Vec::new(), named: sizes.named.clone(), unknown: 64 };
    estimator.cost(expression, 0).0
}

/// What a JSON value is, with its own sizes; objects with the fields they have.
fn held(value: &Value, depth: usize) -> Ty {
    if depth > 64 {
        return Ty::Scalar;
    }
    match value {
        Value::String(text) => Ty::Sized { kind: Sized::Text, max: text.len() as u64, item: None },
        Value::Array(items) => {
            let item = items.iter().map(|i| held(i, depth + 1)).reduce(merge);
            Ty::Sized { kind: Sized::List, max: items.len() as u64, item: item.map(Box::new) }
        }
        Value::Object(map) => Ty::Held(map.iter().map(|(name, v)| (name.clone(), held(v, depth + 1))).collect()),
        _ => Ty::Scalar,
    }
}

/// What a CEL value is, with its own sizes.
fn observed(value: &cel::Value, depth: usize) -> Ty {
    if depth > 64 {
        return Ty::Scalar;
    }
    match value {
        cel::Value::String(text) => Ty::Sized { kind: Sized::Text, max: text.len() as u64, item: None },
        cel::Value::Bytes(bytes) => Ty::Sized { kind: Sized::Text, max: bytes.len() as u64, item: None },
        cel::Value::List(items) => {
            let item = items.iter().map(|i| observed(i, depth + 1)).reduce(merge);
            Ty::Sized { kind: Sized::List, max: items.len() as u64, item: item.map(Box::new) }
        }
        cel::Value::Map(map) => Ty::Held(
            map.map
                .iter()
                .map(|(key, v)| {
                    let name = match key {
                        cel::objects::Key::String(s) => s.to_string(),
                        other => format!("{other:?}"),
                    };
                    (name, observed(v, depth + 1))
                })
                .collect(),
        ),
        _ => Ty::Scalar,
    }
}

/// What a value of `schema` is, with its own sizes.
fn actual(schema: &Value, value: &Value, depth: usize) -> Ty {
    if depth > 64 {
        return Ty::Scalar;
    }
    match value {
        Value::String(text) => Ty::Sized { kind: Sized::Text, max: text.len() as u64, item: None },
        Value::Array(items) => {
            let item_schema = schema.get("items").unwrap_or(&Value::Null);
            let item = items.iter().map(|i| actual(item_schema, i, depth + 1)).reduce(merge);
            Ty::Sized { kind: Sized::List, max: items.len() as u64, item: item.map(Box::new) }
        }
        Value::Object(map) => match schema["properties"].as_object() {
            Some(properties) if !properties.is_empty() => Ty::Object(
                properties
                    .iter()
                    .map(|(name, property)| {
                        (name.clone(), map.get(name).map_or(Ty::Scalar, |v| actual(property, v, depth + 1)))
                    })
                    .collect(),
            ),
            _ => {
                let values = schema.get("additionalProperties").filter(|a| a.is_object()).unwrap_or(&Value::Null);
                let item = map.values().map(|v| actual(values, v, depth + 1)).reduce(merge);
                Ty::Sized { kind: Sized::Map, max: map.len() as u64, item: item.map(Box::new) }
            }
        },
        _ => Ty::Scalar,
    }
}

/// One type for the items of a list (or values of a map): the larger of each size.
fn merge(a: Ty, b: Ty) -> Ty {
    match (a, b) {
        (Ty::Sized { kind, max, item }, Ty::Sized { kind: other, max: other_max, item: other_item })
            if kind == other =>
        {
            let item = match (item, other_item) {
                (Some(a), Some(b)) => Some(Box::new(merge(*a, *b))),
                (a, b) => a.or(b),
            };
            Ty::Sized { kind, max: max.max(other_max), item }
        }
        (Ty::Object(fields), Ty::Object(others)) => Ty::Object(merge_fields(fields, others)),
        (Ty::Object(fields) | Ty::Held(fields), Ty::Object(others) | Ty::Held(others)) => {
            Ty::Held(merge_fields(fields, others))
        }
        (Ty::Scalar, other) | (other, _) => other,
    }
}

fn merge_fields(mut fields: Vec<(String, Ty)>, others: Vec<(String, Ty)>) -> Vec<(String, Ty)> {
    for (name, ty) in others {
        match fields.iter_mut().find(|(n, _)| *n == name) {
            Some((_, mine)) => *mine = merge(std::mem::replace(mine, Ty::Scalar), ty),
            None => fields.push((name, ty)),
        }
    }
    fields
}

/// Upstream's wording of a cost over its limit.
fn over_budget(what: &str, cost: u64, limit: u64) -> String {
    let exceed = cost as f64 / limit as f64;
    let by = if exceed > 100.0 {
        "more than 100x".to_string()
    } else if exceed < 1.5 {
        format!("{exceed:.6}x")
    } else {
        format!("{exceed:.1}x")
    };
    format!(
        "{what} exceeds budget by factor of {by} (try simplifying the rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, and strings are declared)"
    )
}

/// The causes of rules (and message expressions) of a version's schema whose estimated cost
/// is over the limits, at the schema paths upstream names (`at`: the schema's own path).
pub fn check(schema: &Value, at: &str) -> Vec<Cause> {
    let mut causes = Vec::new();
    let mut costs: Vec<(String, u64)> = Vec::new();
    walk(schema, at, Some(1), &mut causes, &mut costs, 0);
    let total = costs.iter().fold(0u64, |sum, (_, c)| sum.saturating_add(*c));
    if total > SCHEMA_LIMIT {
        costs.sort_by(|a, b| b.1.cmp(&a.1));
        for (field, _) in costs.iter().take(4) {
            causes.push(Cause {
                reason: "FieldValueForbidden",
                message: "Forbidden: contributed to estimated rule cost total exceeding cost limit for entire OpenAPIv3 schema".into(),
                field: field.clone(),
            });
        }
        causes.push(Cause {
            reason: "FieldValueForbidden",
            message: format!(
                "Forbidden: {}",
                over_budget(
                    "x-kubernetes-validations estimated rule cost total for entire OpenAPIv3 schema",
                    total,
                    SCHEMA_LIMIT
                )
            ),
            field: at.to_string(),
        });
    }
    causes
}

/// `cardinality`: how many times the node's rules can run (`None`: unbounded, as under a
/// list or map without a bound).
fn walk(
    schema: &Value,
    at: &str,
    cardinality: Option<u64>,
    causes: &mut Vec<Cause>,
    costs: &mut Vec<(String, u64)>,
    depth: usize,
) {
    if depth > 64 {
        return;
    }
    let (ty, min) = declared(schema, depth);
    let times = cardinality.unwrap_or(MAX_REQUEST_BYTES / (min + 1));
    for (i, rule) in schema["x-kubernetes-validations"].as_array().into_iter().flatten().enumerate() {
        let field = format!("{at}.x-kubernetes-validations[{i}]");
        if let Some(program) = rule["rule"].as_str().and_then(|text| cel::Program::compile(text).ok()) {
            let cost = estimate(program.expression(), &ty).saturating_mul(times);
            let path = format!("{field}.rule");
            if cost > RULE_LIMIT {
                causes.push(Cause {
                    reason: "FieldValueForbidden",
                    message: format!("Forbidden: {}", over_budget("estimated rule cost", cost, RULE_LIMIT)),
                    field: path.clone(),
                });
            }
            costs.push((path, cost));
        }
        if let Some(program) = rule["messageExpression"].as_str().and_then(|text| cel::Program::compile(text).ok()) {
            let cost = estimate(program.expression(), &ty);
            let path = format!("{field}.messageExpression");
            if cost > RULE_LIMIT {
                causes.push(Cause {
                    reason: "FieldValueForbidden",
                    message: format!(
                        "Forbidden: {}",
                        over_budget("estimated messageExpression cost", cost, RULE_LIMIT)
                    ),
                    field: path.clone(),
                });
            }
            costs.push((path, cost));
        }
    }
    let bound = |name: &str| schema[name].as_i64().map(|n| n.max(0) as u64);
    for (key, child) in schema["properties"].as_object().into_iter().flatten() {
        walk(child, &format!("{at}.properties[{key}]"), cardinality, causes, costs, depth + 1);
    }
    if let Some(items) = schema.get("items").filter(|i| i.is_object()) {
        let times = cardinality.zip(bound("maxItems")).map(|(c, n)| c.saturating_mul(n));
        walk(items, &format!("{at}.items"), times, causes, costs, depth + 1);
    }
    if let Some(values) = schema.get("additionalProperties").filter(|a| a.is_object()) {
        let times = cardinality.zip(bound("maxProperties")).map(|(c, n)| c.saturating_mul(n));
        walk(values, &format!("{at}.additionalProperties"), times, causes, costs, depth + 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn cost_of(rule: &str, schema: Value) -> u64 {
        let program = cel::Program::compile(rule).unwrap();
        estimate(program.expression(), &declared(&schema, 0).0)
    }

    #[test]
    fn costs_follow_cel_gos_model() {
        let names = json!({"type": "array", "maxItems": 10, "items": {"type": "string", "maxLength": 10}});
        // size() is O(1): an identifier (1) and the call (1).
        assert_eq!(cost_of("self.size() < 5", names.clone()), 3);
        // all() over 10 items of 40 bytes: the range and the result (1 each), and per item
        // the loop condition (2), the step's accumulator (1), x (1) and matches:
        // ceil(41/10) · ceil(8/4) = 10.
        let each = 2 + 1 + 1 + 5 * 2;
        assert_eq!(cost_of("self.all(x, x.matches('^[a-z]+$'))", names.clone()), 2 + 10 * each);
        // Without bounds, the sizes are what 3 MiB could hold.
        let unbounded = json!({"type": "array", "items": {"type": "string"}});
        assert!(cost_of("self.all(x, x.matches('^[a-z]+$'))", unbounded) > RULE_LIMIT * 100);
        // Fields of an object are found through the schema.
        let spec = json!({"type": "object", "properties": {
            "replicas": {"type": "integer"}, "name": {"type": "string", "maxLength": 5}}});
        assert_eq!(cost_of("self.replicas <= 3", spec.clone()), 2);
        assert_eq!(cost_of("self.name.startsWith('web')", spec.clone()), 2 + 1);
        // A message naming a number: the number's text is short.
        assert!(cost_of("'replicas (' + string(self.replicas) + ') must not exceed maxReplicas'", spec) < 100);
    }

    #[test]
    fn expensive_rules_are_refused_with_upstreams_words() {
        let schema = json!({"type": "object", "properties": {"spec": {"type": "object", "properties": {
            "names": {"type": "array", "items": {"type": "string"},
                      "x-kubernetes-validations": [{"rule": "self.all(x, x.matches('^[a-z]+$'))"}]},
            "bounded": {"type": "array", "maxItems": 10, "items": {"type": "string", "maxLength": 63},
                        "x-kubernetes-validations": [{"rule": "self.all(x, x.matches('^[a-z]+$'))"}]},
            // Each of many items: the rule runs once per item.
            "ports": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}},
                      "x-kubernetes-validations": [{"rule": "self.name.startsWith('http')"}]}},
        }}}});
        let causes = check(&schema, "spec.versions[0].schema.openAPIV3Schema");
        let found: Vec<(&str, &str)> = causes.iter().map(|c| (c.field.as_str(), c.message.as_str())).collect();
        assert_eq!(
            found[0],
            (
                "spec.versions[0].schema.openAPIV3Schema.properties[spec].properties[names].x-kubernetes-validations[0].rule",
                "Forbidden: estimated rule cost exceeds budget by factor of more than 100x (try simplifying the rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, and strings are declared)"
            ),
            "{found:#?}"
        );
        let refused =
            |name: &str| found.iter().any(|(f, m)| f.contains(name) && m.contains("estimated rule cost exceeds"));
        assert!(!refused("[bounded]"), "a bounded rule passes: {found:#?}");
        assert!(!refused("[ports]"), "a cheap rule per item passes: {found:#?}");
        // The total is over too: the dearest rules are named, and the schema.
        assert!(
            found.iter().any(|(f, m)| f.contains("[names]") && m.contains("contributed to estimated rule cost total"))
        );
        assert!(found.iter().any(|(f, m)| *f == "spec.versions[0].schema.openAPIV3Schema"
            && m.starts_with("Forbidden: x-kubernetes-validations estimated rule cost total for entire OpenAPIv3 schema exceeds budget")));
        assert_eq!(
            over_budget("x", 12_000_000, RULE_LIMIT),
            "x exceeds budget by factor of 1.200000x (try simplifying the rule, or adding maxItems, maxProperties, and maxLength where arrays, maps, and strings are declared)"
        );
        assert!(over_budget("x", 25_000_000, RULE_LIMIT).contains("factor of 2.5x"));
    }
}
