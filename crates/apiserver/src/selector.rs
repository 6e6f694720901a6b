//! Label selectors (`a=b,c!=d,e in (f,g),h notin (i),j,!k`: `tugboat_objects::labels`, as every
//! component parses and matches them) and field selectors (`metadata.name=x,spec.nodeName!=y`),
//! as `?labelSelector=` and `?fieldSelector=` carry them, matched against stored objects.

use serde_json::Value;

/// A parsed label selector (`?labelSelector=`); the empty selector matches everything.
pub use tugboat_objects::labels::Selector as LabelSelector;

/// Whether `selector` selects an object by its `metadata.labels`.
pub fn matches_object(selector: &LabelSelector, object: &Value) -> bool {
    let labels = &object["metadata"]["labels"];
    selector.matches_with(|key| labels.get(key).and_then(Value::as_str))
}

/// A parsed field selector: equality and inequality on dotted paths.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldSelector(Vec<(String, bool, String)>);

impl FieldSelector {
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("invalid field selector {part:?}: expected field=value or field!=value"));
            };
            terms.push((field.trim().to_string(), equal, value.trim().to_string()));
        }
        Ok(FieldSelector(terms))
    }

    /// The fields this selector reads, to check them against what a resource supports.
    pub fn fields(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(field, _, _)| field.as_str())
    }

    /// Whether an object of `plural` is selected, its fields read as upstream's
    /// `ToSelectableFields` of that kind sets them (see [`field_value`]).
    pub fn matches(&self, plural: &str, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| (field_value(plural, field, object) == *value) == *equal)
    }
}

/// The value a field selector compares for `field` of an object of `plural`: what upstream's
/// registry puts in the object's selectable field set — defaults included (an absent
/// `spec.unschedulable` is `false`, an absent count `0`), the fields kept for backward
/// compatibility (`name`), and the computed ones (an Event's `source`); else the field at that
/// path, absent being the empty string.
pub fn field_value(plural: &str, field: &str, object: &Value) -> String {
    let at = |path: &str| path.split('.').fold(object, |current, segment| &current[segment]);
    let text = |value: &Value| match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    let flag = |path: &str| at(path).as_bool().unwrap_or(false).to_string();
    let count = |path: &str| at(path).as_i64().unwrap_or(0).to_string();
    match (plural, field) {
        ("nodes", "spec.unschedulable") => flag("spec.unschedulable"),
        ("pods", "spec.hostNetwork") => flag("spec.hostNetwork"),
        ("pods", "status.podIP") => {
            let first = &at("status.podIPs")[0]["ip"];
            text(if first.is_string() { first } else { at("status.podIP") })
        }
        ("replicasets" | "replicationcontrollers", "status.replicas") => count("status.replicas"),
        ("jobs", "status.successful") => count("status.succeeded"),
        ("events", "source") => match text(at("source.component")) {
            component if component.is_empty() => text(at("reportingComponent")),
            component => component,
        },
        // events.k8s.io's names of the same fields, on either form of an Event.
        ("events", "reportingController") => match text(at("reportingController")) {
            controller if controller.is_empty() => text(at("reportingComponent")),
            controller => controller,
        },
        ("events", regarding) if regarding.starts_with("regarding.") => match text(at(regarding)) {
            value if value.is_empty() => text(at(&regarding.replacen("regarding.", "involvedObject.", 1))),
            value => value,
        },
        ("namespaces" | "persistentvolumes" | "persistentvolumeclaims", "name") => text(at("metadata.name")),
        _ => text(at(field)),
    }
}

/// The fields each resource can be selected by: `metadata.name` (and `metadata.namespace` when
/// namespaced), plus what upstream adds per resource.
pub fn supported_fields(plural: &str) -> &'static [&'static str] {
    match plural {
        "pods" => &[
            "metadata.name",
            "metadata.namespace",
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ],
        "events" => &[
            "metadata.name",
            "metadata.namespace",
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "source",
            "type",
            "reportingController",
            "regarding.kind",
            "regarding.namespace",
            "regarding.name",
            "regarding.uid",
            "regarding.apiVersion",
            "regarding.resourceVersion",
            "regarding.fieldPath",
        ],
        "secrets" => &["metadata.name", "metadata.namespace", "type"],
        "services" => &["metadata.name", "metadata.namespace", "spec.clusterIP", "spec.type"],
        "namespaces" => &["metadata.name", "name", "status.phase"],
        "nodes" => &["metadata.name", "spec.unschedulable"],
        "persistentvolumes" => &["metadata.name", "name"],
        "persistentvolumeclaims" => &["metadata.name", "metadata.namespace", "name"],
        "replicasets" | "replicationcontrollers" => &["metadata.name", "metadata.namespace", "status.replicas"],
        "jobs" => &["metadata.name", "metadata.namespace", "status.successful"],
        "certificatesigningrequests" => &["metadata.name", "spec.signerName"],
        _ => &["metadata.name", "metadata.namespace"],
    }
}

/// The equality part of a workload's `spec.selector` as a map of labels: a LabelSelector's
/// `matchLabels`, or a ReplicationController's selector, which is that map itself.
pub fn selector_labels(selector: &Value) -> &Value {
    if selector.get("matchLabels").is_some() || selector.get("matchExpressions").is_some() {
        &selector["matchLabels"]
    } else {
        selector
    }
}

/// Whether a `metav1.LabelSelector` object (`matchLabels`, `matchExpressions`) selects an
/// object with `labels`. An empty selector selects everything; a missing one nothing.
pub fn label_selector_matches(selector: &Value, labels: &Value) -> bool {
    let Some(selector) = selector.as_object() else { return false };
    let label = |key: &str| labels.get(key).and_then(Value::as_str);
    let match_labels = selector.get("matchLabels").and_then(Value::as_object);
    if !match_labels.into_iter().flatten().all(|(k, v)| label(k) == v.as_str()) {
        return false;
    }
    let expressions = selector.get("matchExpressions").and_then(Value::as_array);
    expressions.into_iter().flatten().all(|expression| {
        let key = expression["key"].as_str().unwrap_or_default();
        let values: Vec<&str> =
            expression["values"].as_array().map(|v| v.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        tugboat_objects::labels::expression_holds(
            expression["operator"].as_str().unwrap_or_default(),
            &values,
            label(key),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn field_selectors_read_dotted_paths() {
        let pod = json!({"metadata": {"name": "web", "namespace": "default"}, "spec": {"nodeName": "n1"}, "status": {"phase": "Running"}});
        let yes = FieldSelector::parse("metadata.name=web,spec.nodeName!=n2,status.phase==Running").unwrap();
        assert!(yes.matches("pods", &pod));
        let no = FieldSelector::parse("spec.nodeName=").unwrap();
        assert!(!no.matches("pods", &pod));
        let unscheduled = json!({"metadata": {"name": "x"}, "spec": {}});
        assert!(no.matches("pods", &unscheduled), "an absent field equals the empty string");
        assert!(FieldSelector::parse("nonsense").is_err());
    }

    #[test]
    fn selectable_fields_have_upstreams_defaults() {
        // The conformance suite's first request: schedulable nodes, most of which never set it.
        let schedulable = FieldSelector::parse("spec.unschedulable=false").unwrap();
        assert!(schedulable.matches("nodes", &json!({"metadata": {"name": "n1"}, "spec": {}})));
        assert!(schedulable.matches("nodes", &json!({"metadata": {"name": "n1"}})));
        assert!(!schedulable.matches("nodes", &json!({"spec": {"unschedulable": true}})));
        let host = FieldSelector::parse("spec.hostNetwork=false").unwrap();
        assert!(host.matches("pods", &json!({"spec": {}})));
        let ip = FieldSelector::parse("status.podIP=10.0.0.2").unwrap();
        assert!(ip.matches("pods", &json!({"status": {"podIP": "10.0.0.2"}})));
        assert!(ip.matches("pods", &json!({"status": {"podIPs": [{"ip": "10.0.0.2"}]}})));
        let none = FieldSelector::parse("status.replicas=0").unwrap();
        assert!(none.matches("replicasets", &json!({"status": {}})));
        assert!(FieldSelector::parse("status.successful=0").unwrap().matches("jobs", &json!({})));
        let source = FieldSelector::parse("source=kubelet").unwrap();
        assert!(source.matches("events", &json!({"source": {"component": "kubelet"}})));
        assert!(source.matches("events", &json!({"source": {}, "reportingComponent": "kubelet"})));
        let controller = FieldSelector::parse("reportingController=test-controller,regarding.name=p").unwrap();
        assert!(
            controller
                .matches("events", &json!({"reportingComponent": "test-controller", "involvedObject": {"name": "p"}}))
        );
        assert!(
            controller
                .matches("events", &json!({"reportingController": "test-controller", "regarding": {"name": "p"}}))
        );
        assert!(supported_fields("events").contains(&"reportingController"));
        assert!(FieldSelector::parse("name=ns1").unwrap().matches("namespaces", &json!({"metadata": {"name": "ns1"}})));
    }
}
