//! Label selectors, parsed and matched one way by every component: the text form of
//! `?labelSelector=` (`a=b,c!=d,e in (f,g),h notin (i),j,!k`) and a `metav1.LabelSelector`'s
//! `matchLabels` and `matchExpressions` are both lists of [`Requirement`]s.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// One requirement on one label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl Requirement {
    /// The label it is about.
    pub fn key(&self) -> &str {
        match self {
            Requirement::Equals(k, _)
            | Requirement::NotEquals(k, _)
            | Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::NotExists(k) => k,
        }
    }

    /// Whether it holds for the label's `value` (`None`: the object has no such label).
    pub fn holds(&self, value: Option<&str>) -> bool {
        match self {
            Requirement::Equals(_, v) => value == Some(v.as_str()),
            Requirement::NotEquals(_, v) => value != Some(v.as_str()),
            Requirement::In(_, values) => value.is_some_and(|v| values.iter().any(|x| x == v)),
            Requirement::NotIn(_, values) => value.is_none_or(|v| !values.iter().any(|x| x == v)),
            Requirement::Exists(_) => value.is_some(),
            Requirement::NotExists(_) => value.is_none(),
        }
    }
}

/// Whether a match expression (`In`, `NotIn`, `Exists`, `DoesNotExist`) holds for the label's
/// `value`; an unknown operator holds for nothing.
pub fn expression_holds(operator: &str, values: &[&str], value: Option<&str>) -> bool {
    match operator {
        "In" => value.is_some_and(|v| values.contains(&v)),
        "NotIn" => value.is_none_or(|v| !values.contains(&v)),
        "Exists" => value.is_some(),
        "DoesNotExist" => value.is_none(),
        _ => false,
    }
}

/// A parsed selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector(Vec<Requirement>);

/// Splits on commas that are not inside parentheses.
fn split_top_level(text: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts.into_iter().map(str::trim).filter(|p| !p.is_empty()).collect()
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 317
        && key.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn valid_value(value: &str) -> bool {
    value.len() <= 63 && value.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn parse_set(key: &str, rest: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected a parenthesised set of values for {key:?}, got {rest:?}"))?;
    Ok(inner.split(',').map(|v| v.trim().to_string()).filter(|v| !v.is_empty()).collect())
}

impl Selector {
    /// The text form, as `?labelSelector=` carries it.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        for part in split_top_level(text) {
            let requirement = if let Some(key) = part.strip_prefix('!') {
                Requirement::NotExists(key.trim().to_string())
            } else if let Some((key, value)) = part.split_once("!=") {
                Requirement::NotEquals(key.trim().to_string(), value.trim().to_string())
            } else if let Some((key, value)) = part.split_once("==") {
                Requirement::Equals(key.trim().to_string(), value.trim().to_string())
            } else if let Some((key, value)) = part.split_once('=') {
                Requirement::Equals(key.trim().to_string(), value.trim().to_string())
            } else if let Some((key, rest)) = part.split_once(" notin ") {
                Requirement::NotIn(key.trim().to_string(), parse_set(key, rest)?)
            } else if let Some((key, rest)) = part.split_once(" in ") {
                Requirement::In(key.trim().to_string(), parse_set(key, rest)?)
            } else {
                Requirement::Exists(part.to_string())
            };
            let key = requirement.key();
            if !valid_key(key) {
                return Err(format!("invalid label key {key:?} in selector {text:?}"));
            }
            let values: Vec<&String> = match &requirement {
                Requirement::Equals(_, v) | Requirement::NotEquals(_, v) => vec![v],
                Requirement::In(_, vs) | Requirement::NotIn(_, vs) => vs.iter().collect(),
                Requirement::Exists(_) | Requirement::NotExists(_) => vec![],
            };
            if let Some(bad) = values.into_iter().find(|v| !valid_value(v)) {
                return Err(format!("invalid label value {bad:?} in selector {text:?}"));
            }
            requirements.push(requirement);
        }
        Ok(Selector(requirements))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn requirements(&self) -> &[Requirement] {
        &self.0
    }

    /// Whether every requirement holds for the labels `label` looks up.
    pub fn matches_with<'a>(&self, label: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.0.iter().all(|requirement| requirement.holds(label(requirement.key())))
    }

    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.matches_with(|key| labels.get(key).map(String::as_str))
    }
}

/// Whether a label selector selects `labels`. An empty selector selects everything.
pub fn selector_matches(selector: &LabelSelector, labels: Option<&BTreeMap<String, String>>) -> bool {
    let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
    selector.match_labels.iter().flatten().all(|(k, v)| label(k) == Some(v.as_str()))
        && selector.match_expressions.iter().flatten().all(|e| {
            let values: Vec<&str> = e.values.iter().flatten().map(String::as_str).collect();
            expression_holds(&e.operator, &values, label(&e.key))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn selectors_match_labels_and_expressions() {
        let selector: LabelSelector = serde_json::from_value(json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["front", "back"]},
                                 {"key": "canary", "operator": "DoesNotExist"}]}))
        .unwrap();
        assert!(selector_matches(&selector, Some(&labels(&[("app", "web"), ("tier", "front")]))));
        assert!(!selector_matches(&selector, Some(&labels(&[("app", "web"), ("tier", "db")]))));
        assert!(!selector_matches(&selector, Some(&labels(&[("app", "web"), ("tier", "front"), ("canary", "1")]))));
        assert!(!selector_matches(&selector, None));
        assert!(selector_matches(&LabelSelector::default(), None));
    }

    #[test]
    fn text_selectors_cover_every_operator() {
        let l = labels(&[("app", "web"), ("tier", "front"), ("env", "prod")]);
        for (selector, expected) in [
            ("", true),
            ("app=web", true),
            ("app==web", true),
            ("app!=web", false),
            ("app!=db", true),
            ("tier in (front, back)", true),
            ("tier in (back)", false),
            ("tier notin (back)", true),
            ("missing notin (x)", true),
            ("env", true),
            ("!env", false),
            ("!missing", true),
            ("app=web,tier in (front),!missing", true),
            ("app=web,tier=back", false),
        ] {
            let parsed = Selector::parse(selector).unwrap();
            assert_eq!(parsed.matches(&l), expected, "{selector}");
        }
    }

    #[test]
    fn bad_text_selectors_are_refused() {
        for bad in ["app in web", "a b", "x=(", "tier in (a"] {
            assert!(Selector::parse(bad).is_err(), "{bad}");
        }
    }
}
