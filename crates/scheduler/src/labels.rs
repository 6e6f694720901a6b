//! Label selectors, as every component matches them.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// Whether a label selector selects `labels`. An empty selector selects everything.
pub fn selector_matches(selector: &LabelSelector, labels: Option<&BTreeMap<String, String>>) -> bool {
    let label = |key: &str| labels.and_then(|l| l.get(key)).map(String::as_str);
    selector.match_labels.iter().flatten().all(|(k, v)| label(k) == Some(v.as_str()))
        && selector.match_expressions.iter().flatten().all(|e| {
            let values = e.values.as_deref().unwrap_or_default();
            match e.operator.as_str() {
                "In" => label(&e.key).is_some_and(|v| values.iter().any(|x| x == v)),
                "NotIn" => label(&e.key).is_none_or(|v| !values.iter().any(|x| x == v)),
                "Exists" => label(&e.key).is_some(),
                "DoesNotExist" => label(&e.key).is_none(),
                _ => false,
            }
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn selectors_match_labels_and_expressions() {
        let selector: LabelSelector = serde_json::from_value(json!({
            "matchLabels": {"app": "web"},
            "matchExpressions": [{"key": "tier", "operator": "In", "values": ["front", "back"]},
                                 {"key": "canary", "operator": "DoesNotExist"}]}))
        .unwrap();
        let labels = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
            pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
        };
        assert!(selector_matches(&selector, Some(&labels(&[("app", "web"), ("tier", "front")]))));
        assert!(!selector_matches(&selector, Some(&labels(&[("app", "web"), ("tier", "db")]))));
        assert!(!selector_matches(&selector, Some(&labels(&[("app", "web"), ("tier", "front"), ("canary", "1")]))));
        assert!(!selector_matches(&selector, None));
        assert!(selector_matches(&LabelSelector::default(), None));
    }
}
