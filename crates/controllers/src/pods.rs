//! Facts about pods and selectors that several controllers need.

use k8s_openapi::api::core::v1::Pod;

/// A pod that counts: not finished and not being deleted.
pub fn is_active(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_none()
        && !matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

fn ready_since(pod: &Pod) -> Option<Option<jiff::Timestamp>> {
    let conditions = pod.status.as_ref()?.conditions.as_ref()?;
    let ready = conditions.iter().find(|c| c.type_ == "Ready" && c.status == "True")?;
    Some(ready.last_transition_time.as_ref().map(|t| t.0))
}

pub fn is_ready(pod: &Pod) -> bool {
    ready_since(pod).is_some()
}

/// Ready for at least `min_ready_seconds`.
pub fn is_available(pod: &Pod, min_ready_seconds: i32, now: jiff::Timestamp) -> bool {
    match ready_since(pod) {
        None => false,
        Some(_) if min_ready_seconds <= 0 => true,
        Some(None) => false,
        Some(Some(since)) => now.as_second() - since.as_second() >= i64::from(min_ready_seconds),
    }
}

pub use tugboat_objects::labels::selector_matches;

/// Upstream's ControllerRefManager claim, for the owner `uid` and its `selector` over the pods
/// of its namespace: the orphans it matches (to adopt; not while the owner or the pod is being
/// deleted) and the pods it controls that it no longer matches (to release).
pub fn claims<'a>(
    uid: &str,
    selector: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
    pods: impl IntoIterator<Item = &'a Pod>,
    owner_deleting: bool,
) -> (Vec<&'a Pod>, Vec<&'a Pod>) {
    let (mut adopt, mut release) = (Vec::new(), Vec::new());
    for pod in pods {
        if pod.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let controller = pod.metadata.owner_references.iter().flatten().find(|r| r.controller == Some(true));
        let matches = selector_matches(selector, pod.metadata.labels.as_ref());
        match controller {
            None if matches && !owner_deleting => adopt.push(pod),
            Some(owner) if owner.uid == uid && !matches => release.push(pod),
            _ => {}
        }
    }
    (adopt, release)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_adopt_matching_orphans_and_release_what_no_longer_matches() {
        let pod = |name: &str, labels: serde_json::Value, owner: Option<&str>| -> Pod {
            let owners = owner.map(|uid| serde_json::json!([{"apiVersion": "batch/v1", "kind": "Job", "name": "j", "uid": uid, "controller": true}]));
            serde_json::from_value(
                serde_json::json!({"metadata": {"name": name, "labels": labels, "ownerReferences": owners}}),
            )
            .unwrap()
        };
        let selector = serde_json::from_value(serde_json::json!({"matchLabels": {"app": "a"}})).unwrap();
        let pods = [
            pod("orphan", serde_json::json!({"app": "a"}), None),
            pod("mine", serde_json::json!({"app": "a"}), Some("u1")),
            pod("relabelled", serde_json::json!({"app": "b"}), Some("u1")),
            pod("theirs", serde_json::json!({"app": "a"}), Some("u2")),
            pod("stranger", serde_json::json!({"app": "b"}), None),
        ];
        let (adopt, release) = claims("u1", &selector, pods.iter(), false);
        let names = |pods: Vec<&Pod>| -> Vec<String> { pods.iter().filter_map(|p| p.metadata.name.clone()).collect() };
        assert_eq!((names(adopt), names(release)), (vec!["orphan".to_string()], vec!["relabelled".to_string()]));
        let (adopt, _) = claims("u1", &selector, pods.iter(), true);
        assert!(adopt.is_empty(), "an owner being deleted adopts nothing");
    }
}
