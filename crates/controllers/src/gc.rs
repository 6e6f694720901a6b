//! The garbage collector's decision, without I/O: from every object of the kinds it watches,
//! which dependents lost all their owners (to delete, once the owner's absence is confirmed
//! against the API), which lost some (to drop the dangling references), and what owners being
//! deleted in the foreground (`foregroundDeletion`: dependents first) or with orphaning
//! (`orphan`: dependents released) still wait for.

use std::collections::{HashMap, HashSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;

pub const FOREGROUND: &str = "foregroundDeletion";
pub const ORPHAN: &str = "orphan";

/// What the collector knows of one object.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    /// Index of the object's kind in the collector's list of kinds.
    pub kind: usize,
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub owners: Vec<OwnerReference>,
    pub deleting: bool,
    pub finalizers: Vec<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Delete `dependent` if its owners really are gone (`owners` to look up first).
    DeleteOrphaned { dependent: Object, owners: Vec<OwnerReference> },
    /// Delete a dependent of an owner deleted in the foreground.
    DeleteDependent { dependent: Object },
    /// Replace the dependent's owner references with `keep`.
    SetOwners { dependent: Object, keep: Vec<OwnerReference> },
    /// Remove `finalizer` from `owner`: what it waited for is done.
    RemoveFinalizer { owner: Object, finalizer: &'static str },
}

/// Plans a pass. `known_kinds` says, for an owner reference's (apiVersion group, kind), whether
/// the collector watches that kind (only then can it tell an owner is missing).
pub fn plan(objects: &[Object], known_kind: impl Fn(&OwnerReference) -> bool) -> Vec<Action> {
    let present: HashSet<&str> = objects.iter().map(|o| o.uid.as_str()).collect();
    let by_uid: HashMap<&str, &Object> = objects.iter().map(|o| (o.uid.as_str(), o)).collect();
    let mut dependents: HashMap<&str, Vec<&Object>> = HashMap::new();
    for object in objects {
        for owner in &object.owners {
            dependents.entry(owner.uid.as_str()).or_default().push(object);
        }
    }
    let mut actions = Vec::new();
    for object in objects {
        // Owners being deleted.
        if object.deleting {
            let mine = dependents.get(object.uid.as_str()).cloned().unwrap_or_default();
            if object.finalizers.iter().any(|f| f == ORPHAN) {
                for dependent in &mine {
                    let keep: Vec<OwnerReference> =
                        dependent.owners.iter().filter(|o| o.uid != object.uid).cloned().collect();
                    actions.push(Action::SetOwners { dependent: (*dependent).clone(), keep });
                }
                if mine.is_empty() {
                    actions.push(Action::RemoveFinalizer { owner: object.clone(), finalizer: ORPHAN });
                }
                continue;
            }
            if object.finalizers.iter().any(|f| f == FOREGROUND) {
                for dependent in mine.iter().filter(|d| !d.deleting) {
                    // A dependent that also has a solid owner (there, and not itself waiting
                    // for its dependents) stays, only without the references to owners on
                    // their way out (upstream's attemptToDeleteItem).
                    let solid = |o: &OwnerReference| {
                        by_uid
                            .get(o.uid.as_str())
                            .is_some_and(|owner| !(owner.deleting && owner.finalizers.iter().any(|f| f == FOREGROUND)))
                    };
                    if dependent.owners.iter().any(solid) {
                        let keep = dependent.owners.iter().filter(|o| solid(o)).cloned().collect();
                        actions.push(Action::SetOwners { dependent: (*dependent).clone(), keep });
                        continue;
                    }
                    // A dependent of its own waits for its dependents too: in a circle, it
                    // first stops blocking its owners, so that they need not wait for it.
                    let waiting = |d: &&Object| d.deleting && d.finalizers.iter().any(|f| f == FOREGROUND);
                    let in_circle = dependents.get(dependent.uid.as_str()).is_some_and(|own| own.iter().any(waiting));
                    if in_circle && dependent.owners.iter().any(|o| o.block_owner_deletion == Some(true)) {
                        let keep = dependent
                            .owners
                            .iter()
                            .map(|o| OwnerReference { block_owner_deletion: Some(false), ..o.clone() })
                            .collect();
                        actions.push(Action::SetOwners { dependent: (*dependent).clone(), keep });
                    }
                    actions.push(Action::DeleteDependent { dependent: (*dependent).clone() });
                }
                // The owner waits only for the dependents that block its deletion.
                let blocking = mine
                    .iter()
                    .any(|d| d.owners.iter().any(|o| o.uid == object.uid && o.block_owner_deletion == Some(true)));
                if !blocking {
                    actions.push(Action::RemoveFinalizer { owner: object.clone(), finalizer: FOREGROUND });
                }
                continue;
            }
        }
        if object.owners.is_empty() || object.deleting {
            continue;
        }
        let dangling: Vec<&OwnerReference> =
            object.owners.iter().filter(|o| known_kind(o) && !present.contains(o.uid.as_str())).collect();
        if dangling.is_empty() {
            continue;
        }
        if dangling.len() == object.owners.len() {
            actions.push(Action::DeleteOrphaned {
                dependent: object.clone(),
                owners: dangling.into_iter().cloned().collect(),
            });
        } else {
            let keep = object.owners.iter().filter(|o| !dangling.iter().any(|d| d.uid == o.uid)).cloned().collect();
            actions.push(Action::SetOwners { dependent: object.clone(), keep });
        }
    }
    actions
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(kind: &str, uid: &str) -> OwnerReference {
        OwnerReference {
            api_version: "apps/v1".into(),
            kind: kind.into(),
            name: format!("{kind}-{uid}").to_lowercase(),
            uid: uid.into(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }
    }

    fn object(name: &str, uid: &str, owners: Vec<OwnerReference>) -> Object {
        Object {
            kind: 0,
            namespace: "default".into(),
            name: name.into(),
            uid: uid.into(),
            owners,
            deleting: false,
            finalizers: Vec::new(),
        }
    }

    fn known(o: &OwnerReference) -> bool {
        o.kind != "Unknown"
    }

    #[test]
    fn dependents_of_missing_owners_go_and_dangling_references_are_dropped() {
        let objects = vec![
            object("rs", "rs-1", vec![owner("Deployment", "gone")]),
            object("pod-a", "p-a", vec![owner("ReplicaSet", "rs-1")]),
            object("pod-b", "p-b", vec![owner("ReplicaSet", "rs-1"), owner("Deployment", "gone")]),
            object("pod-c", "p-c", vec![owner("Unknown", "who")]),
        ];
        let actions = plan(&objects, known);
        assert_eq!(actions.len(), 2, "{actions:?}");
        assert!(matches!(&actions[0], Action::DeleteOrphaned { dependent, .. } if dependent.name == "rs"));
        assert!(
            matches!(&actions[1], Action::SetOwners { dependent, keep } if dependent.name == "pod-b" && keep.len() == 1)
        );
    }

    #[test]
    fn a_dependency_circle_does_not_block_foreground_deletion() {
        // pod1 <- pod2 <- pod3 <- pod1 (each owned by the one before), pod1 and pod2 being
        // deleted in the foreground.
        let waiting = |mut o: Object| {
            o.deleting = true;
            o.finalizers = vec![FOREGROUND.into()];
            o
        };
        let pod1 = waiting(object("pod1", "p1", vec![owner("Pod", "p3")]));
        let pod2 = waiting(object("pod2", "p2", vec![owner("Pod", "p1")]));
        let pod3 = object("pod3", "p3", vec![owner("Pod", "p2")]);
        let actions = plan(&[pod1.clone(), pod2.clone(), pod3.clone()], known);
        let unblocked = vec![OwnerReference { block_owner_deletion: Some(false), ..owner("Pod", "p2") }];
        assert!(
            actions.contains(&Action::SetOwners { dependent: pod3.clone(), keep: unblocked.clone() }),
            "{actions:?}"
        );
        assert!(actions.contains(&Action::DeleteDependent { dependent: pod3.clone() }));
        // Once pod3 no longer blocks it, pod2 stops waiting.
        let pod3 = waiting(object("pod3", "p3", unblocked));
        let actions = plan(&[pod1, pod2.clone(), pod3], known);
        assert!(actions.contains(&Action::RemoveFinalizer { owner: pod2, finalizer: FOREGROUND }), "{actions:?}");
    }

    #[test]
    fn foreground_deletion_waits_for_dependents_and_orphaning_releases_them() {
        let mut deployment = object("web", "d-1", vec![]);
        deployment.deleting = true;
        deployment.finalizers = vec![FOREGROUND.into()];
        let rs = object("rs", "rs-1", vec![owner("Deployment", "d-1")]);
        let actions = plan(&[deployment.clone(), rs.clone()], known);
        assert_eq!(actions, [Action::DeleteDependent { dependent: rs }]);
        // A dependent with another owner that stays is kept, released from the one going.
        let other = object("other", "rc-2", vec![]);
        let shared = object("pod", "p-1", vec![owner("Deployment", "d-1"), owner("Deployment", "rc-2")]);
        let actions = plan(&[deployment.clone(), other, shared.clone()], known);
        assert_eq!(actions, [Action::SetOwners { dependent: shared, keep: vec![owner("Deployment", "rc-2")] }]);
        let actions = plan(std::slice::from_ref(&deployment), known);
        assert_eq!(actions, [Action::RemoveFinalizer { owner: deployment.clone(), finalizer: FOREGROUND }]);

        deployment.finalizers = vec![ORPHAN.into()];
        let rs = object("rs", "rs-1", vec![owner("Deployment", "d-1")]);
        let actions = plan(&[deployment.clone(), rs.clone()], known);
        assert_eq!(actions, [Action::SetOwners { dependent: rs, keep: vec![] }]);
    }
}
