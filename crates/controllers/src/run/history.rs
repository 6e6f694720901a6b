//! Controller history: every pod template a DaemonSet or StatefulSet has had is kept as a
//! ControllerRevision (`<set>-<hash>`, numbered in the order the templates were current; a
//! template that comes back is renumbered last), so `kubectl rollout history` lists them and
//! `kubectl rollout undo` patches one back. `revisionHistoryLimit` (10) old ones are kept. The
//! current revision is, as upstream's controllers find it, one whose data is the template's
//! (a revision a client made counts), else the one named for the template's hash.

use std::sync::Arc;

use k8s_openapi::api::apps::v1::{ControllerRevision, DaemonSet, StatefulSet};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::runtime::RawExtension;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use tokio::sync::Notify;

use super::workloads::{controller_uid, owner_reference};
use super::{Hub, create_if_missing, delete_if_there, wait};
use crate::deployment::template_hash;

pub(super) async fn run_history(client: kube::Client, hub: Arc<Hub>) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let daemonsets = hub.watch::<DaemonSet>(&changed);
    let statefulsets = hub.watch::<StatefulSet>(&changed);
    let revisions = hub.watch::<ControllerRevision>(&changed);
    daemonsets.wait_until_ready().await;
    statefulsets.wait_until_ready().await;
    revisions.wait_until_ready().await;
    tracing::info!("controller history started");
    loop {
        let all = revisions.state();
        // (set, its kind, its owner reference, its template, its history limit)
        let daemon = daemonsets.state().into_iter().map(|set| {
            let spec = set.spec.as_ref();
            let template = spec.map(|s| s.template.clone()).unwrap_or_default();
            let limit = spec.and_then(|s| s.revision_history_limit);
            (set.metadata.clone(), "DaemonSet", owner_reference(&*set), template, limit)
        });
        let stateful = statefulsets.state().into_iter().map(|set| {
            let spec = set.spec.as_ref();
            let template = spec.map(|s| s.template.clone()).unwrap_or_default();
            let limit = spec.and_then(|s| s.revision_history_limit);
            (set.metadata.clone(), "StatefulSet", owner_reference(&*set), template, limit)
        });
        for (meta, kind, owner, template, limit) in daemon.chain(stateful) {
            sync(&client, &meta, kind, owner, &template, limit.unwrap_or(10), &all).await;
        }
        wait(&changed).await;
    }
}

/// A revision's data: what `kubectl rollout undo` patches back, the template replacing the
/// set's (`{"spec":{"template":{…,"$patch":"replace"}}}`). Upstream's controllers (and clients
/// that find a set's current revision, as the conformance suite does) compare it byte for byte
/// with Go's encoding of the set's template: keys sorted (serde_json's maps are), the template's
/// `metadata.creationTimestamp` as `null` and every container's `resources`, fields Go's structs
/// always write.
pub(super) fn revision_data(template: &PodTemplateSpec) -> serde_json::Value {
    let mut template = serde_json::to_value(template).unwrap_or_default();
    let metadata = template.as_object_mut().map(|t| t.entry("metadata").or_insert_with(|| json!({})));
    if let Some(metadata) = metadata.and_then(serde_json::Value::as_object_mut) {
        metadata.entry("creationTimestamp").or_insert(serde_json::Value::Null);
    }
    for list in ["initContainers", "containers", "ephemeralContainers"] {
        let containers = template.pointer_mut(&format!("/spec/{list}")).and_then(serde_json::Value::as_array_mut);
        let containers = containers.into_iter().flatten();
        for container in containers.filter_map(serde_json::Value::as_object_mut) {
            container.entry("resources").or_insert_with(|| json!({}));
        }
    }
    template["$patch"] = json!("replace");
    json!({"spec": {"template": template}})
}

async fn sync(
    client: &kube::Client,
    set: &ObjectMeta,
    kind: &str,
    owner: k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
    template: &PodTemplateSpec,
    limit: i32,
    all: &[Arc<ControllerRevision>],
) {
    if set.deletion_timestamp.is_some() {
        return;
    }
    let (Some(namespace), Some(name), Some(uid)) = (&set.namespace, &set.name, &set.uid) else { return };
    let api: Api<ControllerRevision> = Api::namespaced(client.clone(), namespace);
    let mut mine: Vec<&ControllerRevision> = all
        .iter()
        .map(|r| &**r)
        .filter(|r| {
            r.metadata.namespace.as_deref() == Some(namespace) && controller_uid(&r.metadata, kind) == Some(uid)
        })
        .collect();
    mine.sort_by_key(|r| r.revision);
    let hash = template_hash(template);
    let data = revision_data(template);
    let (current, duplicates) = current_of(&mine, &data, &format!("{name}-{hash}"));
    // Revisions of the current template beyond the newest one go, as upstream's dedup does.
    for duplicate in &duplicates {
        if let Some(name) = duplicate.metadata.name.as_deref() {
            let _ = delete_if_there(&api, name, &DeleteParams::default()).await;
        }
    }
    // What is left once they go.
    let kept: Vec<&ControllerRevision> =
        mine.iter().copied().filter(|r| !duplicates.iter().any(|d| std::ptr::eq(*d, *r))).collect();
    let highest = kept.iter().map(|r| r.revision).max().unwrap_or(0);
    let current_name = match current {
        None => {
            let current_name = format!("{name}-{hash}");
            let mut labels = template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
            labels.insert(crate::daemonset::HASH_LABEL.into(), hash.clone());
            let revision = ControllerRevision {
                metadata: ObjectMeta {
                    name: Some(current_name.clone()),
                    namespace: Some(namespace.clone()),
                    labels: Some(labels),
                    owner_references: Some(vec![owner]),
                    ..ObjectMeta::default()
                },
                data: Some(RawExtension(data)),
                revision: highest + 1,
            };
            match create_if_missing(&api, &revision).await {
                Ok(()) => {
                    tracing::info!(set = %name, revision = %current_name, number = highest + 1, "recorded a revision")
                }
                Err(error) => tracing::warn!(%error, set = %name, "could not record a revision"),
            }
            current_name
        }
        Some(current) => {
            let current_name = current.metadata.name.clone().unwrap_or_default();
            if current.revision < highest {
                let patch = json!({"revision": highest + 1});
                if let Err(error) = api.patch(&current_name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                    tracing::warn!(%error, set = %name, "could not renumber a revision");
                }
            }
            current_name
        }
    };
    // The oldest beyond the limit go (never the current one).
    let old: Vec<&ControllerRevision> =
        kept.into_iter().filter(|r| r.metadata.name.as_deref() != Some(current_name.as_str())).collect();
    let excess = old.len().saturating_sub(usize::try_from(limit).unwrap_or(0));
    for revision in old.into_iter().take(excess) {
        let Some(name) = revision.metadata.name.as_deref() else { continue };
        let _ = delete_if_there(&api, name, &DeleteParams::default()).await;
    }
}

/// The set's current revision among `mine` (sorted by number): as upstream's controllers find
/// it, one whose data is the template's (whatever its name: a revision a client made, or one
/// kept from before, counts), the newest of them, else the one named for the template's hash;
/// and the other revisions of the current template, which go.
fn current_of<'a>(
    mine: &[&'a ControllerRevision],
    data: &serde_json::Value,
    name: &str,
) -> (Option<&'a ControllerRevision>, Vec<&'a ControllerRevision>) {
    let equal: Vec<&ControllerRevision> =
        mine.iter().copied().filter(|r| r.data.as_ref().is_some_and(|d| d.0 == *data)).collect();
    match equal.split_last() {
        Some((newest, others)) => (Some(*newest), others.to_vec()),
        None => (mine.iter().copied().find(|r| r.metadata.name.as_deref() == Some(name)), Vec::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn revision(name: &str, number: i64, data: serde_json::Value) -> ControllerRevision {
        ControllerRevision {
            metadata: ObjectMeta { name: Some(name.into()), ..ObjectMeta::default() },
            data: Some(RawExtension(data)),
            revision: number,
        }
    }

    #[test]
    fn the_current_revision_is_found_by_its_data_as_upstream_does() {
        let (now, before) = (json!({"spec": {"template": {"a": 1}}}), json!({"spec": {"template": {"a": 0}}}));
        // The revision named for the template's hash was deleted; one a client made with the
        // same data (under another name) is current: nothing is made again.
        let made = revision("ds-other", 2, now.clone());
        let old = revision("ds-old", 1, before.clone());
        let (current, duplicates) = current_of(&[&old, &made], &now, "ds-hash");
        assert_eq!(current.and_then(|r| r.metadata.name.as_deref()), Some("ds-other"));
        assert!(duplicates.is_empty());
        // Several of the current template: the newest is current, the others go.
        let named = revision("ds-hash", 3, now.clone());
        let (current, duplicates) = current_of(&[&old, &made, &named], &now, "ds-hash");
        assert_eq!(current.and_then(|r| r.metadata.name.as_deref()), Some("ds-hash"));
        assert_eq!(duplicates.iter().map(|r| r.revision).collect::<Vec<_>>(), [2]);
        // Data written otherwise (by an older build): the name still finds it.
        let older = revision("ds-hash", 4, json!({"spec": {"template": {"a": 1, "x": null}}}));
        let (current, _) = current_of(&[&old, &older], &now, "ds-hash");
        assert_eq!(current.map(|r| r.revision), Some(4));
        // None: a new one is made.
        assert!(current_of(&[&old], &now, "ds-hash").0.is_none());
    }

    #[test]
    fn revision_data_is_what_go_writes_for_the_template() {
        let template: PodTemplateSpec = serde_json::from_value(json!({
            "metadata": {"labels": {"app": "x"}},
            "spec": {"containers": [{"name": "app", "image": "img", "ports": [{"containerPort": 80, "protocol": "TCP"}]}]},
        }))
        .unwrap();
        // What client-go's `daemon.Match` compares with: json.Marshal of the typed template,
        // re-marshalled through a map (sorted keys).
        let go = r#"{"spec":{"template":{"$patch":"replace","metadata":{"creationTimestamp":null,"labels":{"app":"x"}},"spec":{"containers":[{"image":"img","name":"app","ports":[{"containerPort":80,"protocol":"TCP"}],"resources":{}}]}}}}"#;
        assert_eq!(revision_data(&template).to_string(), go);
        let restored: PodTemplateSpec =
            serde_json::from_value(revision_data(&template)["spec"]["template"].clone()).unwrap();
        assert_eq!(restored.metadata, template.metadata.map(|m| ObjectMeta { creation_timestamp: None, ..m }));
    }
}
