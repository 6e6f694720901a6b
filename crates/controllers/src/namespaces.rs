//! The namespace controller's report: the conditions a Terminating namespace carries while it
//! is emptied (what `kubectl describe namespace` shows), worded as upstream's.

use std::collections::BTreeMap;

use serde_json::{Value, json};

/// What emptying a namespace found this time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Remaining {
    /// Objects still there, by `resource.group` (`pods.`, `deployments.apps`).
    pub resources: BTreeMap<String, usize>,
    /// Objects held by each finalizer.
    pub finalizers: BTreeMap<String, usize>,
    /// Resources whose listing or deletion failed, with why.
    pub failures: Vec<String>,
}

fn counted(counts: &BTreeMap<String, usize>) -> String {
    counts.iter().map(|(name, n)| format!("{name} has {n} resource instances")).collect::<Vec<_>>().join(", ")
}

/// The namespace's deletion conditions (type, status, reason, message), in upstream's order.
/// `discovery`: the error of the discovery of what can be deleted, if it failed.
pub fn conditions(discovery: Option<&str>, remaining: &Remaining) -> Vec<(&'static str, bool, &'static str, String)> {
    let mut conditions = vec![match discovery {
        Some(error) => (
            "NamespaceDeletionDiscoveryFailure",
            true,
            "DiscoveryFailed",
            format!("Discovery failed for some groups: {error}"),
        ),
        None => (
            "NamespaceDeletionDiscoveryFailure",
            false,
            "ResourcesDiscovered",
            "All resources successfully discovered".into(),
        ),
    }];
    conditions.push((
        "NamespaceDeletionGroupVersionParsingFailure",
        false,
        "ParsedGroupVersions",
        "All legacy kube types successfully parsed".into(),
    ));
    conditions.push(if remaining.failures.is_empty() {
        (
            "NamespaceDeletionContentFailure",
            false,
            "ContentDeleted",
            "All content successfully deleted, may be waiting on finalization".into(),
        )
    } else {
        (
            "NamespaceDeletionContentFailure",
            true,
            "ContentDeletionFailed",
            format!(
                "Failed to delete all resource types, {} remaining: {}",
                remaining.failures.len(),
                remaining.failures.join(", ")
            ),
        )
    });
    conditions.push(if remaining.resources.is_empty() {
        ("NamespaceContentRemaining", false, "ContentRemoved", "All content successfully removed".into())
    } else {
        (
            "NamespaceContentRemaining",
            true,
            "SomeResourcesRemain",
            format!("Some resources are remaining: {}", counted(&remaining.resources)),
        )
    });
    conditions.push(if remaining.finalizers.is_empty() {
        (
            "NamespaceFinalizersRemaining",
            false,
            "ContentHasNoFinalizers",
            "All content-preserving finalizers finished".into(),
        )
    } else {
        (
            "NamespaceFinalizersRemaining",
            true,
            "SomeFinalizersRemain",
            format!(
                "Some content in the namespace has finalizers remaining: {}",
                counted(&remaining.finalizers).replace(" has ", " in ")
            ),
        )
    });
    conditions
}

/// The conditions as the namespace's `status.conditions`, keeping the transition time of those
/// whose status did not change (`current`: the namespace's conditions now).
pub fn status_conditions(
    wanted: &[(&'static str, bool, &'static str, String)],
    current: &[Value],
    now: &str,
) -> Vec<Value> {
    wanted
        .iter()
        .map(|(kind, status, reason, message)| {
            let status = if *status { "True" } else { "False" };
            let since = current
                .iter()
                .find(|c| c["type"] == *kind && c["status"] == status)
                .and_then(|c| c["lastTransitionTime"].as_str())
                .unwrap_or(now);
            json!({"type": kind, "status": status, "reason": reason, "message": message, "lastTransitionTime": since})
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conditions_say_what_keeps_a_namespace_as_upstream_says_it() {
        let done = conditions(None, &Remaining::default());
        let kinds: Vec<(&str, bool)> = done.iter().map(|c| (c.0, c.1)).collect();
        assert_eq!(
            kinds,
            [
                ("NamespaceDeletionDiscoveryFailure", false),
                ("NamespaceDeletionGroupVersionParsingFailure", false),
                ("NamespaceDeletionContentFailure", false),
                ("NamespaceContentRemaining", false),
                ("NamespaceFinalizersRemaining", false),
            ]
        );
        let remaining = Remaining {
            resources: [("configmaps.".to_string(), 1), ("pods.".to_string(), 2)].into(),
            finalizers: [("example.com/hold".to_string(), 1)].into(),
            failures: vec!["widgets.example.com: the server is away".into()],
        };
        let waiting = conditions(Some("metrics.k8s.io/v1beta1: 503"), &remaining);
        assert_eq!(waiting[0].3, "Discovery failed for some groups: metrics.k8s.io/v1beta1: 503");
        assert_eq!(
            waiting[2].3,
            "Failed to delete all resource types, 1 remaining: widgets.example.com: the server is away"
        );
        assert_eq!(
            waiting[3].3,
            "Some resources are remaining: configmaps. has 1 resource instances, pods. has 2 resource instances"
        );
        assert_eq!(
            waiting[4].3,
            "Some content in the namespace has finalizers remaining: example.com/hold in 1 resource instances"
        );
        assert!(waiting.iter().all(|c| c.0 == "NamespaceDeletionGroupVersionParsingFailure" || c.1));

        // Transition times stay while a status holds.
        let first = status_conditions(&waiting, &[], "2026-01-01T00:00:00Z");
        let later = status_conditions(&conditions(None, &remaining), &first, "2026-01-01T00:00:09Z");
        assert_eq!(later[0]["lastTransitionTime"], "2026-01-01T00:00:09Z", "discovery recovered");
        assert_eq!(later[3]["lastTransitionTime"], "2026-01-01T00:00:00Z");
    }
}
