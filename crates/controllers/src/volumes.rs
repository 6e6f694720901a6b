//! The persistent volume controller's plan: claims bound to the smallest volume that fits
//! (class, access modes, size, selector), or — for the built-in `local-path` class — a volume
//! made for them (on the node of the first pod that uses the claim, when the class waits for
//! one); volumes whose claim is gone released, or deleted by their reclaim policy.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use serde_json::{Value, json};

use crate::pods::selector_matches;

/// The provisioner of the built-in class; its volumes are CSI volumes of this driver, which
/// the kubelet keeps under its data dir.
pub const LOCAL_PATH: &str = "tugboat.dev/local-path";

/// What the controller does next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Make this PersistentVolume (already naming its claim).
    Provision(Value),
    /// Bind claim (namespace, name) to volume `volume` both ways.
    Bind { namespace: String, claim: String, uid: String, volume: String },
    /// The volume is free: phase Available.
    Available(String),
    /// Its claim is gone and its policy keeps it: phase Released.
    Release(String),
    /// Its claim is gone and its policy deletes it.
    Delete(String),
    /// Claim (namespace, name) waits for a pod to be scheduled before it is bound.
    Waiting { namespace: String, claim: String },
}

fn bytes(quantity: Option<&k8s_openapi::apimachinery::pkg::api::resource::Quantity>) -> i64 {
    quantity.map(|q| tugboat_objects::quantity::units(&q.0)).unwrap_or(0)
}

fn requested(claim: &PersistentVolumeClaim) -> i64 {
    bytes(claim.spec.as_ref().and_then(|s| s.resources.as_ref()?.requests.as_ref()?.get("storage")))
}

fn capacity(volume: &PersistentVolume) -> i64 {
    bytes(volume.spec.as_ref().and_then(|s| s.capacity.as_ref()?.get("storage")))
}

fn class_of_claim(claim: &PersistentVolumeClaim) -> &str {
    claim.spec.as_ref().and_then(|s| s.storage_class_name.as_deref()).unwrap_or("")
}

fn phase(volume: &PersistentVolume) -> &str {
    volume.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending")
}

/// Whether `volume` can hold `claim`.
fn fits(volume: &PersistentVolume, claim: &PersistentVolumeClaim) -> bool {
    let (Some(spec), Some(wanted)) = (&volume.spec, &claim.spec) else { return false };
    let class = spec.storage_class_name.as_deref().unwrap_or("");
    let modes = spec.access_modes.clone().unwrap_or_default();
    let mode = |s: Option<&String>| s.map(String::as_str).unwrap_or("Filesystem").to_string();
    class == class_of_claim(claim)
        && wanted.access_modes.iter().flatten().all(|m| modes.contains(m))
        && capacity(volume) >= requested(claim)
        && mode(spec.volume_mode.as_ref()) == mode(wanted.volume_mode.as_ref())
        && wanted.selector.as_ref().is_none_or(|s| selector_matches(s, volume.metadata.labels.as_ref()))
        && wanted.volume_name.as_deref().is_none_or(|n| Some(n) == volume.metadata.name.as_deref())
}

/// The node of the first scheduled pod that uses the claim.
fn consumer_node<'a>(claim: &PersistentVolumeClaim, pods: &'a [&Pod]) -> Option<&'a str> {
    let namespace = claim.metadata.namespace.as_deref();
    let name = claim.metadata.name.as_deref()?;
    pods.iter()
        .filter(|p| p.metadata.namespace.as_deref() == namespace)
        .filter_map(|p| p.spec.as_ref())
        .filter(|s| {
            s.volumes.iter().flatten().any(|v| v.persistent_volume_claim.as_ref().is_some_and(|c| c.claim_name == name))
        })
        .find_map(|s| s.node_name.as_deref())
}

/// The volume the built-in class makes for `claim` (on `node`, when known).
pub fn local_volume(claim: &PersistentVolumeClaim, class: &StorageClass, node: Option<&str>) -> Value {
    let namespace = claim.metadata.namespace.as_deref().unwrap_or("default");
    let name = claim.metadata.name.as_deref().unwrap_or_default();
    let uid = claim.metadata.uid.as_deref().unwrap_or_default();
    let spec = claim.spec.clone().unwrap_or_default();
    let storage = spec
        .resources
        .as_ref()
        .and_then(|r| r.requests.as_ref()?.get("storage").cloned())
        .map(|q| q.0)
        .unwrap_or_else(|| "1Gi".into());
    let mut volume = json!({
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {"name": format!("pvc-{uid}"),
                     "annotations": {"pv.kubernetes.io/provisioned-by": LOCAL_PATH}},
        "spec": {
            "capacity": {"storage": storage},
            "accessModes": spec.access_modes.unwrap_or_else(|| vec!["ReadWriteOnce".into()]),
            "persistentVolumeReclaimPolicy": class.reclaim_policy.clone().unwrap_or_else(|| "Delete".into()),
            "storageClassName": class.metadata.name,
            "volumeMode": spec.volume_mode.unwrap_or_else(|| "Filesystem".into()),
            "claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "namespace": namespace,
                         "name": name, "uid": uid},
            "csi": {"driver": LOCAL_PATH, "volumeHandle": format!("pvc-{uid}_{namespace}_{name}")},
        },
    });
    if let Some(node) = node {
        volume["spec"]["nodeAffinity"] = json!({"required": {"nodeSelectorTerms": [{"matchExpressions": [
            {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}});
    }
    volume
}

pub fn plan(
    claims: &[&PersistentVolumeClaim],
    volumes: &[&PersistentVolume],
    classes: &[&StorageClass],
    pods: &[&Pod],
) -> Vec<Action> {
    let mut actions = Vec::new();
    let claim_uids: BTreeMap<(&str, &str), &str> = claims
        .iter()
        .filter_map(|c| {
            Some(((c.metadata.namespace.as_deref()?, c.metadata.name.as_deref()?), c.metadata.uid.as_deref()?))
        })
        .collect();
    let mut taken: Vec<&str> = Vec::new();
    for volume in volumes {
        let Some(name) = volume.metadata.name.as_deref() else { continue };
        let claim_ref = volume.spec.as_ref().and_then(|s| s.claim_ref.as_ref());
        match claim_ref {
            None if phase(volume) != "Available" => actions.push(Action::Available(name.into())),
            None => {}
            Some(r) => {
                let key = (r.namespace.as_deref().unwrap_or("default"), r.name.as_deref().unwrap_or_default());
                let alive = claim_uids.get(&key).is_some_and(|uid| r.uid.as_deref().is_none_or(|u| u == *uid));
                if alive {
                    taken.push(name);
                } else if phase(volume) != "Released" && phase(volume) != "Failed" {
                    let policy = volume.spec.as_ref().and_then(|s| s.persistent_volume_reclaim_policy.as_deref());
                    actions.push(if policy == Some("Delete") {
                        Action::Delete(name.into())
                    } else {
                        Action::Release(name.into())
                    });
                }
            }
        }
    }
    for claim in claims {
        let (Some(namespace), Some(name), Some(uid)) =
            (claim.metadata.namespace.as_deref(), claim.metadata.name.as_deref(), claim.metadata.uid.as_deref())
        else {
            continue;
        };
        if claim.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let bind = |volume: &str| Action::Bind {
            namespace: namespace.into(),
            claim: name.into(),
            uid: uid.into(),
            volume: volume.into(),
        };
        // A volume that names this claim (made for it, or bound half-way) completes the bind.
        let named = volumes.iter().find(|v| {
            v.spec.as_ref().and_then(|s| s.claim_ref.as_ref()).is_some_and(|r| {
                r.namespace.as_deref() == Some(namespace)
                    && r.name.as_deref() == Some(name)
                    && r.uid.as_deref().is_none_or(|u| u == uid)
            })
        });
        let bound = claim.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Bound");
        if let Some(volume) = named {
            let volume_name = volume.metadata.name.as_deref().unwrap_or_default();
            let claim_says = claim.spec.as_ref().and_then(|s| s.volume_name.as_deref());
            if !bound || claim_says != Some(volume_name) || phase(volume) != "Bound" {
                actions.push(bind(volume_name));
            }
            continue;
        }
        if bound {
            continue;
        }
        let class = classes.iter().find(|c| c.metadata.name.as_deref() == Some(class_of_claim(claim)));
        let waits = class.is_some_and(|c| c.volume_binding_mode.as_deref() == Some("WaitForFirstConsumer"));
        let node = consumer_node(claim, pods);
        if waits && node.is_none() {
            actions.push(Action::Waiting { namespace: namespace.into(), claim: name.into() });
            continue;
        }
        let free = volumes
            .iter()
            .filter(|v| v.spec.as_ref().is_some_and(|s| s.claim_ref.is_none()))
            .filter(|v| !taken.contains(&v.metadata.name.as_deref().unwrap_or_default()))
            .filter(|v| fits(v, claim))
            .min_by_key(|v| capacity(v));
        if let Some(volume) = free {
            let volume_name = volume.metadata.name.as_deref().unwrap_or_default();
            taken.push(volume_name);
            actions.push(bind(volume_name));
        } else if let Some(class) = class.filter(|c| c.provisioner == LOCAL_PATH) {
            actions.push(Action::Provision(local_volume(claim, class, node)));
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refs<T>(all: &[T]) -> Vec<&T> {
        all.iter().collect()
    }

    fn objects<T: serde::de::DeserializeOwned>(value: Value) -> Vec<T> {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn claims_get_the_smallest_fitting_volume_or_a_made_one() {
        let volumes: Vec<PersistentVolume> = objects(json!([
            {"metadata": {"name": "big"}, "spec": {"capacity": {"storage": "10Gi"}, "accessModes": ["ReadWriteOnce"],
             "storageClassName": "manual", "hostPath": {"path": "/srv/big"}}, "status": {"phase": "Available"}},
            {"metadata": {"name": "small"}, "spec": {"capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
             "storageClassName": "manual", "hostPath": {"path": "/srv/small"}}, "status": {"phase": "Available"}},
            {"metadata": {"name": "orphan"}, "spec": {"capacity": {"storage": "1Gi"}, "persistentVolumeReclaimPolicy": "Delete",
             "claimRef": {"namespace": "default", "name": "gone", "uid": "u0"}}, "status": {"phase": "Bound"}},
            {"metadata": {"name": "kept"}, "spec": {"capacity": {"storage": "1Gi"}, "persistentVolumeReclaimPolicy": "Retain",
             "claimRef": {"namespace": "default", "name": "gone", "uid": "u0"}}, "status": {"phase": "Bound"}},
            {"metadata": {"name": "fresh"}, "spec": {"capacity": {"storage": "1Gi"}}, "status": {"phase": "Pending"}},
        ]));
        let claims: Vec<PersistentVolumeClaim> = objects(json!([
            {"metadata": {"name": "data", "namespace": "default", "uid": "u1"},
             "spec": {"storageClassName": "manual", "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "500Mi"}}}},
            {"metadata": {"name": "db", "namespace": "default", "uid": "u2"},
             "spec": {"storageClassName": "local-path", "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "2Gi"}}}},
        ]));
        let classes: Vec<StorageClass> = objects(json!([
            {"metadata": {"name": "local-path"}, "provisioner": LOCAL_PATH, "reclaimPolicy": "Delete",
             "volumeBindingMode": "WaitForFirstConsumer"},
        ]));
        let pods: Vec<Pod> = objects(json!([
            {"metadata": {"name": "db-0", "namespace": "default"},
             "spec": {"nodeName": "n1", "containers": [], "volumes": [{"name": "d", "persistentVolumeClaim": {"claimName": "db"}}]}},
        ]));
        let actions = plan(&refs(&claims), &refs(&volumes), &refs(&classes), &[]);
        assert!(
            actions.contains(&Action::Bind {
                namespace: "default".into(),
                claim: "data".into(),
                uid: "u1".into(),
                volume: "small".into()
            }),
            "{actions:?}"
        );
        assert!(actions.contains(&Action::Delete("orphan".into())));
        assert!(actions.contains(&Action::Release("kept".into())));
        assert!(actions.contains(&Action::Available("fresh".into())));
        assert!(!actions.iter().any(|a| matches!(a, Action::Provision(_))), "db waits for a pod: {actions:?}");
        assert!(actions.contains(&Action::Waiting { namespace: "default".into(), claim: "db".into() }));
        // Once its pod is on n1, db gets a volume there.
        let pods = refs(&pods);
        let actions = plan(&refs(&claims), &refs(&volumes), &refs(&classes), &pods);
        let made = actions.iter().find_map(|a| if let Action::Provision(v) = a { Some(v) } else { None }).unwrap();
        assert_eq!(made["metadata"]["name"], "pvc-u2");
        assert_eq!(made["spec"]["capacity"]["storage"], "2Gi");
        assert_eq!(made["spec"]["claimRef"]["name"], "db");
        assert_eq!(
            made["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0]["matchExpressions"][0]["values"][0],
            "n1"
        );
    }
}
