//! The Deployment controller's decision, without I/O: from a Deployment and the ReplicaSets it
//! owns (as observed), which ReplicaSet carries the current template (made if missing, with the
//! next `deployment.kubernetes.io/revision`), how far each ReplicaSet is scaled this step of a
//! RollingUpdate (maxSurge / maxUnavailable) or a Recreate, which old ReplicaSets go beyond
//! `revisionHistoryLimit`, and the status and conditions `kubectl rollout status` reads.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentCondition, DeploymentStatus, ReplicaSet, ReplicaSetSpec};
use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

pub const REVISION: &str = "deployment.kubernetes.io/revision";
pub const HASH_LABEL: &str = "pod-template-hash";

/// One write the plan asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    Create(Box<ReplicaSet>),
    /// A ReplicaSet's size, with the Deployment's size it was judged for
    /// (`deployment.kubernetes.io/desired-replicas`, and `max-replicas` with the surge).
    Scale {
        name: String,
        replicas: i32,
        desired: i32,
        max: i32,
    },
    /// Give a ReplicaSet (whose template is current again, after an undo) the newest revision.
    Revise {
        name: String,
        revision: i64,
    },
    Delete {
        name: String,
    },
    /// The Deployment's own revision annotation.
    AnnotateDeployment {
        revision: i64,
    },
}

#[derive(Debug, Default, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    pub status: DeploymentStatus,
}

/// A stable, short name for a pod template, from the letters upstream uses.
pub fn template_hash(template: &PodTemplateSpec) -> String {
    // An empty `resources` is no resources: Go's structs cannot tell them apart, and a rollback
    // patches back Go's encoding of a template (a ControllerRevision's), which writes one for
    // every container. Templates without one hash as they always did.
    let empty = |c: &k8s_openapi::api::core::v1::Container| {
        c.resources.as_ref().is_some_and(|r| *r == k8s_openapi::api::core::v1::ResourceRequirements::default())
    };
    let spec = template.spec.as_ref();
    let containers = spec.into_iter().flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()));
    let normalized;
    let template = if containers.clone().any(empty) {
        let mut copy = template.clone();
        if let Some(spec) = copy.spec.as_mut() {
            for container in spec.containers.iter_mut().chain(spec.init_containers.iter_mut().flatten()) {
                if empty(container) {
                    container.resources = None;
                }
            }
        }
        normalized = copy;
        &normalized
    } else {
        template
    };
    let text = serde_json::to_string(template).unwrap_or_default();
    let hash = text.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193));
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    hash.to_string().bytes().map(|d| ALPHABET[usize::from(d) % ALPHABET.len()] as char).collect()
}

fn revision(rs: &ReplicaSet) -> i64 {
    rs.metadata.annotations.as_ref().and_then(|a| a.get(REVISION)).and_then(|r| r.parse().ok()).unwrap_or(0)
}

fn spec_replicas(rs: &ReplicaSet) -> i32 {
    rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0)
}

fn annotation(rs: &ReplicaSet, name: &str) -> Option<i32> {
    rs.metadata.annotations.as_ref().and_then(|a| a.get(name)).and_then(|v| v.parse().ok())
}

const DESIRED: &str = "deployment.kubernetes.io/desired-replicas";
const MAX: &str = "deployment.kubernetes.io/max-replicas";

/// Upstream's `scale` for a scaling event (the Deployment's replicas changed while several
/// ReplicaSets have pods) or a paused Deployment: the only active ReplicaSet (or the newest)
/// takes the new size; a saturated new one leaves the old ones nothing; otherwise, in a
/// RollingUpdate, what is to be added (or removed) to reach `replicas + surge` is shared in
/// proportion to each ReplicaSet's size against the size it was judged for (`max-replicas`),
/// rounded, the rounding's leftover to the largest. Returns each ReplicaSet's new size.
fn proportional(
    replicas: i32,
    surge: i32,
    rolling: bool,
    new: Option<&ReplicaSet>,
    olds: &[&ReplicaSet],
    status_replicas: i32,
) -> Vec<(String, i32)> {
    let name = |rs: &ReplicaSet| rs.metadata.name.clone().unwrap_or_default();
    let all: Vec<&ReplicaSet> = new.into_iter().chain(olds.iter().copied()).collect();
    let active: Vec<&ReplicaSet> = all.iter().copied().filter(|rs| spec_replicas(rs) > 0).collect();
    if active.len() <= 1 {
        // The active one, or else the new one, or else the newest old one.
        let newest_old = olds.iter().copied().max_by_key(|rs| (rs.metadata.creation_timestamp.clone(), revision(rs)));
        let Some(target) = active.first().copied().or(new).or(newest_old) else { return Vec::new() };
        return vec![(name(target), replicas)];
    }
    if let Some(new) = new
        && spec_replicas(new) == replicas
        && annotation(new, DESIRED) == Some(replicas)
        && available(new) == replicas
    {
        return olds.iter().map(|rs| (name(rs), 0)).collect();
    }
    if !rolling {
        return Vec::new();
    }
    let allowed = if replicas > 0 { replicas + surge } else { 0 };
    let to_add = allowed - active.iter().map(|rs| spec_replicas(rs)).sum::<i32>();
    // Largest first; on a tie the newer when growing, the older when shrinking.
    let mut ordered = active.clone();
    ordered.sort_by(|a, b| {
        let age = |rs: &ReplicaSet| (rs.metadata.creation_timestamp.clone(), revision(rs));
        spec_replicas(b)
            .cmp(&spec_replicas(a))
            .then_with(|| if to_add > 0 { age(b).cmp(&age(a)) } else { age(a).cmp(&age(b)) })
    });
    let mut added = 0;
    let mut sizes: Vec<(String, i32)> = Vec::new();
    for rs in &ordered {
        let size = spec_replicas(rs);
        let mut proportion = 0;
        if to_add != 0 && to_add != added {
            let fraction = if replicas == 0 {
                -size
            } else {
                let judged = annotation(rs, MAX).unwrap_or(status_replicas);
                if judged > 0 {
                    let scaled = f64::from(size) * f64::from(replicas + surge) / f64::from(judged);
                    (scaled + 0.5).floor() as i32 - size
                } else {
                    0
                }
            };
            let allowed = to_add - added;
            proportion = if to_add > 0 { fraction.min(allowed) } else { fraction.max(allowed) };
        }
        added += proportion;
        sizes.push((name(rs), size + proportion));
    }
    if let Some((_, first)) = sizes.first_mut() {
        *first = (*first + to_add - added).max(0);
    }
    // The inactive ones keep their size (none), their annotations brought up to date.
    sizes.extend(all.iter().filter(|rs| spec_replicas(rs) == 0).map(|rs| (name(rs), 0)));
    sizes
}

fn available(rs: &ReplicaSet) -> i32 {
    rs.status.as_ref().and_then(|s| s.available_replicas).unwrap_or(0)
}

/// `25%` of `total`, rounded up (surge) or down (unavailable); plain numbers as they are.
pub(crate) fn resolve(value: Option<&IntOrString>, total: i32, default: &str, round_up: bool) -> i32 {
    let text = match value {
        Some(IntOrString::Int(n)) => return (*n).max(0),
        Some(IntOrString::String(s)) => s.clone(),
        None => default.to_string(),
    };
    match text.strip_suffix('%').and_then(|p| p.parse::<i64>().ok()) {
        Some(percent) => {
            let scaled = i64::from(total) * percent;
            (if round_up { (scaled + 99) / 100 } else { scaled / 100 }) as i32
        }
        None => text.parse().unwrap_or(0),
    }
}

/// The ReplicaSet for the deployment's current template.
fn new_replica_set(deployment: &Deployment, hash: &str, revision: i64, replicas: i32) -> ReplicaSet {
    let name = deployment.metadata.name.clone().unwrap_or_default();
    let spec = deployment.spec.clone().unwrap_or_default();
    let mut template = spec.template.clone();
    let metadata = template.metadata.get_or_insert_with(Default::default);
    metadata.labels.get_or_insert_with(BTreeMap::new).insert(HASH_LABEL.into(), hash.into());
    let mut selector = spec.selector.clone();
    selector.match_labels.get_or_insert_with(BTreeMap::new).insert(HASH_LABEL.into(), hash.into());
    let surge = resolve(
        spec.strategy.as_ref().and_then(|s| s.rolling_update.as_ref()).and_then(|r| r.max_surge.as_ref()),
        spec.replicas.unwrap_or(1),
        "25%",
        true,
    );
    let desired = spec.replicas.unwrap_or(1);
    ReplicaSet {
        metadata: ObjectMeta {
            name: Some(format!("{name}-{hash}")),
            namespace: deployment.metadata.namespace.clone(),
            labels: template.metadata.as_ref().and_then(|m| m.labels.clone()),
            annotations: Some(BTreeMap::from([
                (REVISION.into(), revision.to_string()),
                ("deployment.kubernetes.io/desired-replicas".into(), desired.to_string()),
                ("deployment.kubernetes.io/max-replicas".into(), (desired + surge).to_string()),
            ])),
            owner_references: Some(vec![OwnerReference {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                name,
                uid: deployment.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            }]),
            ..Default::default()
        },
        spec: Some(ReplicaSetSpec {
            replicas: Some(replicas),
            min_ready_seconds: spec.min_ready_seconds,
            selector,
            template: Some(template),
        }),
        status: None,
    }
}

fn condition(
    previous: Option<&Vec<DeploymentCondition>>,
    kind: &str,
    status: &str,
    reason: &str,
    message: String,
    now: &Time,
) -> DeploymentCondition {
    let old = previous.and_then(|c| c.iter().find(|c| c.type_ == kind));
    let same = old.is_some_and(|o| o.status == status && o.reason.as_deref() == Some(reason));
    let transition = match old {
        Some(o) if o.status == status => o.last_transition_time.clone(),
        _ => Some(now.clone()),
    };
    DeploymentCondition {
        type_: kind.into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: Some(message),
        last_update_time: if same { old.and_then(|o| o.last_update_time.clone()) } else { Some(now.clone()) },
        last_transition_time: transition,
    }
}

/// Plans one step for `deployment`, given the ReplicaSets it owns.
pub fn plan(deployment: &Deployment, owned: &[&ReplicaSet], now: Time) -> Plan {
    let spec = deployment.spec.clone().unwrap_or_default();
    let replicas = spec.replicas.unwrap_or(1).max(0);
    let hash = template_hash(&spec.template);
    let strategy = spec.strategy.clone().unwrap_or_default();
    let recreate = strategy.type_.as_deref() == Some("Recreate");
    let rolling = strategy.rolling_update.clone().unwrap_or_default();
    let mut surge = resolve(rolling.max_surge.as_ref(), replicas, "25%", true);
    let mut unavailable = resolve(rolling.max_unavailable.as_ref(), replicas, "25%", false);
    if surge == 0 && unavailable == 0 {
        unavailable = 1;
    }
    if recreate {
        surge = 0;
    }
    let mut plan = Plan::default();
    let is_new = |rs: &ReplicaSet| rs.metadata.labels.as_ref().and_then(|l| l.get(HASH_LABEL)) == Some(&hash);
    let max_revision = owned.iter().map(|rs| revision(rs)).max().unwrap_or(0);
    let existing_new = owned.iter().find(|rs| is_new(rs)).copied();
    let mut olds: Vec<&ReplicaSet> = owned.iter().copied().filter(|rs| !is_new(rs)).collect();
    olds.sort_by_key(|rs| revision(rs));
    let old_total: i32 = olds.iter().map(|rs| spec_replicas(rs)).sum();
    let old_running: i32 = olds.iter().map(|rs| rs.status.as_ref().map(|s| s.replicas).unwrap_or(0)).sum();
    let paused = spec.paused == Some(true);
    // A scaling event: an active ReplicaSet was judged for another size of the Deployment.
    // Then (and while paused) the ReplicaSets are only resized, in proportion.
    let scaling_event = owned
        .iter()
        .any(|rs| spec_replicas(rs) > 0 && annotation(rs, DESIRED).is_some_and(|desired| desired != replicas));
    let sync_only = paused || scaling_event;
    let scale = |name: String, replicas_now: i32| Action::Scale {
        name,
        replicas: replicas_now,
        desired: replicas,
        max: replicas + surge,
    };

    // The current template's ReplicaSet, and how many replicas it should have now.
    let (new_name, new_spec, new_revision) = match existing_new {
        Some(rs) => {
            let mut rev = revision(rs);
            if rev < max_revision || rev == 0 {
                rev = max_revision.max(rev) + if rev < max_revision || rev == 0 { 1 } else { 0 };
                plan.actions.push(Action::Revise { name: rs.metadata.name.clone().unwrap_or_default(), revision: rev });
            }
            (rs.metadata.name.clone().unwrap_or_default(), spec_replicas(rs), rev)
        }
        None if sync_only => (String::new(), 0, max_revision),
        None => {
            let rev = max_revision + 1;
            let initial = if recreate {
                if old_total == 0 && old_running == 0 { replicas } else { 0 }
            } else {
                (replicas + surge - old_total).clamp(0, replicas)
            };
            let rs = new_replica_set(deployment, &hash, rev, initial);
            let name = rs.metadata.name.clone().unwrap_or_default();
            plan.actions.push(Action::Create(Box::new(rs)));
            (name, initial, rev)
        }
    };
    let deployment_revision =
        deployment.metadata.annotations.as_ref().and_then(|a| a.get(REVISION)).and_then(|r| r.parse::<i64>().ok());
    if !new_name.is_empty() && deployment_revision != Some(new_revision) {
        plan.actions.push(Action::AnnotateDeployment { revision: new_revision });
    }

    if sync_only {
        let status_replicas = deployment.status.as_ref().and_then(|s| s.replicas).unwrap_or(0);
        for (name, size) in proportional(replicas, surge, !recreate, existing_new, &olds, status_replicas) {
            let Some(rs) = owned.iter().find(|rs| rs.metadata.name.as_deref() == Some(name.as_str())) else {
                continue;
            };
            let judged = annotation(rs, DESIRED) == Some(replicas) && annotation(rs, MAX) == Some(replicas + surge);
            if size != spec_replicas(rs) || !judged {
                plan.actions.push(scale(name, size));
            }
        }
    }
    let new_available = existing_new.map(available).unwrap_or(0);
    if !new_name.is_empty() && existing_new.is_some() && !sync_only {
        let target = if recreate {
            if old_total == 0 && old_running == 0 { replicas } else { new_spec.min(replicas) }
        } else if old_total == 0 {
            replicas
        } else {
            let room = replicas + surge - (old_total + new_spec);
            if room > 0 { (new_spec + room).min(replicas) } else { new_spec.min(replicas.max(new_spec)) }
        };
        if target != new_spec {
            plan.actions.push(scale(new_name.clone(), target));
        }
    }
    // Old ReplicaSets: all at once for Recreate; for RollingUpdate as far as availability allows,
    // their unavailable pods first.
    if !sync_only && existing_new.is_some() {
        if recreate {
            for rs in olds.iter().filter(|rs| spec_replicas(rs) > 0) {
                plan.actions.push(scale(rs.metadata.name.clone().unwrap_or_default(), 0));
            }
        } else {
            let min_available = replicas - unavailable;
            let all_total = old_total + new_spec;
            let new_unavailable = (new_spec - new_available).max(0);
            let mut budget = all_total - min_available - new_unavailable;
            let mut scaled: BTreeMap<String, i32> = BTreeMap::new();
            for rs in &olds {
                if budget <= 0 {
                    break;
                }
                let unhealthy = (spec_replicas(rs) - available(rs)).max(0).min(budget);
                if unhealthy > 0 {
                    scaled.insert(rs.metadata.name.clone().unwrap_or_default(), spec_replicas(rs) - unhealthy);
                    budget -= unhealthy;
                }
            }
            // What availability allows, and never more than the spec counts allow (`budget`,
            // upstream's maxScaledDown): a ReplicaSet's status lags its spec, and scaling down
            // again on a stale count would take the Deployment below maxUnavailable.
            let available_total: i32 = olds.iter().map(|rs| available(rs)).sum::<i32>() + new_available;
            let mut removable = (available_total - min_available).max(0).min(budget.max(0));
            for rs in &olds {
                let name = rs.metadata.name.clone().unwrap_or_default();
                let current = *scaled.get(&name).unwrap_or(&spec_replicas(rs));
                let down = current.min(removable);
                if down > 0 {
                    scaled.insert(name.clone(), current - down);
                    removable -= down;
                }
            }
            for rs in &olds {
                let name = rs.metadata.name.clone().unwrap_or_default();
                if let Some(&target) = scaled.get(&name)
                    && target != spec_replicas(rs)
                {
                    plan.actions.push(scale(name, target));
                }
            }
        }
    }
    // History beyond revisionHistoryLimit: the oldest empty ReplicaSets go.
    let limit = spec.revision_history_limit.unwrap_or(10).max(0) as usize;
    let empty: Vec<&&ReplicaSet> = olds
        .iter()
        .filter(|rs| spec_replicas(rs) == 0 && rs.status.as_ref().map(|s| s.replicas).unwrap_or(0) == 0)
        .collect();
    if empty.len() > limit {
        for rs in &empty[..empty.len() - limit] {
            plan.actions.push(Action::Delete { name: rs.metadata.name.clone().unwrap_or_default() });
        }
    }

    // Status, from what is observed.
    let sum = |f: &dyn Fn(&ReplicaSet) -> i32| owned.iter().map(|rs| f(rs)).sum::<i32>();
    let observed = sum(&|rs| rs.status.as_ref().map(|s| s.replicas).unwrap_or(0));
    let ready = sum(&|rs| rs.status.as_ref().and_then(|s| s.ready_replicas).unwrap_or(0));
    let available_all = sum(&available);
    let updated = existing_new.and_then(|rs| rs.status.as_ref()).map(|s| s.replicas).unwrap_or(0);
    let spec_total = sum(&spec_replicas);
    let previous = deployment.status.as_ref().and_then(|s| s.conditions.as_ref());
    let available_condition = if available_all >= replicas - unavailable {
        condition(
            previous,
            "Available",
            "True",
            "MinimumReplicasAvailable",
            "Deployment has minimum availability.".into(),
            &now,
        )
    } else {
        condition(
            previous,
            "Available",
            "False",
            "MinimumReplicasUnavailable",
            "Deployment does not have minimum availability.".into(),
            &now,
        )
    };
    let complete = updated == replicas && available_all >= replicas && observed == replicas && old_running == 0;
    let progressing = if complete {
        condition(
            previous,
            "Progressing",
            "True",
            "NewReplicaSetAvailable",
            format!("ReplicaSet \"{new_name}\" has successfully progressed."),
            &now,
        )
    } else {
        condition(
            previous,
            "Progressing",
            "True",
            "ReplicaSetUpdated",
            format!("ReplicaSet \"{new_name}\" is progressing."),
            &now,
        )
    };
    plan.status = DeploymentStatus {
        observed_generation: deployment.metadata.generation,
        replicas: Some(observed),
        updated_replicas: Some(updated),
        ready_replicas: Some(ready),
        available_replicas: Some(available_all),
        unavailable_replicas: Some((spec_total.max(replicas) - available_all).max(0)),
        conditions: Some(vec![available_condition, progressing]),
        collision_count: None,
        terminating_replicas: None,
    };
    plan
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn deployment(replicas: i32, image: &str, strategy: serde_json::Value) -> Deployment {
        serde_json::from_value(json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "d-uid", "generation": 2},
            "spec": {"replicas": replicas, "selector": {"matchLabels": {"app": "web"}}, "strategy": strategy,
                     "template": {"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [{"name": "c", "image": image}]}}},
        }))
        .unwrap()
    }

    /// A ReplicaSet as the controller would have made it, observed with `available` pods.
    fn observed(d: &Deployment, revision: i64, spec: i32, available: i32) -> ReplicaSet {
        let hash = template_hash(&d.spec.as_ref().unwrap().template);
        let mut rs = new_replica_set(d, &hash, revision, spec);
        rs.status = Some(k8s_openapi::api::apps::v1::ReplicaSetStatus {
            replicas: available,
            ready_replicas: Some(available),
            available_replicas: Some(available),
            ..Default::default()
        });
        rs
    }

    fn now() -> Time {
        Time("2026-01-01T00:00:00Z".parse().unwrap())
    }

    fn scales(plan: &Plan) -> Vec<(String, i32)> {
        plan.actions
            .iter()
            .filter_map(|a| match a {
                Action::Scale { name, replicas, .. } => Some((name.clone(), *replicas)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn an_empty_resources_hashes_as_none() {
        let template = |resources: serde_json::Value| -> PodTemplateSpec {
            let mut container = json!({"name": "c", "image": "nginx:1"});
            if !resources.is_null() {
                container["resources"] = resources;
            }
            serde_json::from_value(json!({"metadata": {"labels": {"app": "web"}}, "spec": {"containers": [container]}}))
                .unwrap()
        };
        let plain = template_hash(&template(serde_json::Value::Null));
        assert_eq!(template_hash(&template(json!({}))), plain, "as a rollback writes it back");
        assert_ne!(template_hash(&template(json!({"requests": {"cpu": "1"}}))), plain);
    }

    #[test]
    fn a_new_deployment_gets_a_replica_set_with_every_replica() {
        let d = deployment(3, "nginx:1", json!({}));
        let plan = plan(&d, &[], now());
        let Some(Action::Create(rs)) = plan.actions.first() else { panic!("{:?}", plan.actions) };
        assert_eq!(rs.spec.as_ref().unwrap().replicas, Some(3));
        let hash = template_hash(&d.spec.as_ref().unwrap().template);
        assert_eq!(rs.metadata.name.as_deref(), Some(format!("web-{hash}").as_str()));
        assert_eq!(rs.spec.as_ref().unwrap().selector.match_labels.as_ref().unwrap()[HASH_LABEL], hash);
        assert_eq!(rs.metadata.annotations.as_ref().unwrap()[REVISION], "1");
        assert!(plan.actions.contains(&Action::AnnotateDeployment { revision: 1 }));
    }

    #[test]
    fn a_stale_status_never_takes_a_rollout_below_max_unavailable() {
        // 10 replicas, maxSurge 3, maxUnavailable 2; the new pods never become available. The
        // old ReplicaSet was just scaled to 8 and its status still says 10 available: no more
        // goes (upstream's maxScaledDown = 8 + 5 - 8 - 5 = 0).
        let strategy = json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 3, "maxUnavailable": 2}});
        let old_d = deployment(10, "webserver:1", strategy.clone());
        let mut old = observed(&old_d, 1, 10, 10);
        old.spec.as_mut().unwrap().replicas = Some(8);
        let d = deployment(10, "webserver:404", strategy);
        let new = observed(&d, 2, 5, 0);
        let planned = plan(&d, &[&old, &new], now());
        let old_name = old.metadata.name.clone().unwrap();
        assert!(scales(&planned).iter().all(|(name, _)| *name != old_name), "{:?}", scales(&planned));
    }

    #[test]
    fn a_rolling_update_surges_then_scales_old_down_as_new_pods_become_available() {
        let old_d = deployment(
            4,
            "nginx:1",
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
        );
        let old = observed(&old_d, 1, 4, 4);
        let d = deployment(
            4,
            "nginx:2",
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}),
        );
        // Step 1: the new ReplicaSet starts with the surge.
        let first = plan(&d, &[&old], now());
        let Some(Action::Create(new)) = first.actions.first() else { panic!("{:?}", first.actions) };
        assert_eq!(new.spec.as_ref().unwrap().replicas, Some(1));
        assert_eq!(new.metadata.annotations.as_ref().unwrap()[REVISION], "2");
        assert!(scales(&first).is_empty(), "nothing old goes before something new is available");
        // Step 2: the new pod is available: one old pod may go, and then one more new comes.
        let new_up = observed(&d, 2, 1, 1);
        let second = plan(&d, &[&old, &new_up], now());
        let old_name = old.metadata.name.clone().unwrap();
        assert_eq!(scales(&second), [(old_name.clone(), 3)]);
        let old_down = observed(&old_d, 1, 3, 3);
        let third = plan(&d, &[&old_down, &new_up], now());
        assert_eq!(scales(&third), [(new_up.metadata.name.clone().unwrap(), 2)]);
        // Done: everything new and available.
        let old_gone = observed(&old_d, 1, 0, 0);
        let new_done = observed(&d, 2, 4, 4);
        let done = plan(&d, &[&old_gone, &new_done], now());
        assert!(scales(&done).is_empty());
        let progressing = done.status.conditions.as_ref().unwrap().iter().find(|c| c.type_ == "Progressing").unwrap();
        assert_eq!(progressing.reason.as_deref(), Some("NewReplicaSetAvailable"));
        assert_eq!(done.status.updated_replicas, Some(4));
        assert_eq!(done.status.available_replicas, Some(4));
    }

    #[test]
    fn recreate_empties_the_old_replica_set_first() {
        let old_d = deployment(2, "nginx:1", json!({"type": "Recreate"}));
        let old = observed(&old_d, 1, 2, 2);
        let d = deployment(2, "nginx:2", json!({"type": "Recreate"}));
        let first = plan(&d, &[&old], now());
        let Some(Action::Create(new)) = first.actions.first() else { panic!() };
        assert_eq!(new.spec.as_ref().unwrap().replicas, Some(0));
        let new_rs = observed(&d, 2, 0, 0);
        let second = plan(&d, &[&old, &new_rs], now());
        assert_eq!(scales(&second), [(old.metadata.name.clone().unwrap(), 0)]);
        let old_gone = observed(&old_d, 1, 0, 0);
        let third = plan(&d, &[&old_gone, &new_rs], now());
        assert_eq!(scales(&third), [(new_rs.metadata.name.clone().unwrap(), 2)]);
    }

    #[test]
    fn undo_revives_the_old_replica_set_with_a_new_revision_and_history_is_trimmed() {
        let v1 = deployment(2, "nginx:1", json!({}));
        let v2 = deployment(2, "nginx:2", json!({}));
        let rs1 = observed(&v1, 1, 0, 0);
        let rs2 = observed(&v2, 2, 2, 2);
        let back = plan(&v1, &[&rs1, &rs2], now());
        assert!(back.actions.contains(&Action::Revise { name: rs1.metadata.name.clone().unwrap(), revision: 3 }));
        assert!(back.actions.contains(&Action::AnnotateDeployment { revision: 3 }));
        assert!(scales(&back).contains(&(rs1.metadata.name.clone().unwrap(), 1)), "{:?}", back.actions);

        let mut limited = v2.clone();
        limited.spec.as_mut().unwrap().revision_history_limit = Some(0);
        let trimmed = plan(&limited, &[&rs1, &rs2], now());
        assert!(trimmed.actions.contains(&Action::Delete { name: rs1.metadata.name.clone().unwrap() }));
    }

    #[test]
    fn scaling_in_the_middle_of_a_rollout_is_shared_in_proportion() {
        // Upstream's proportional scaling spec: 10 replicas, maxSurge 3, maxUnavailable 2, a
        // rollout stuck at 8 old (available) and 5 new (never available); then 30 replicas.
        let strategy = json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 3, "maxUnavailable": 2}});
        let old_d = deployment(10, "webserver:1", strategy.clone());
        let old = observed(&old_d, 1, 8, 8);
        let stuck = deployment(10, "webserver:404", strategy.clone());
        let new = observed(&stuck, 2, 5, 0);
        let d = deployment(30, "webserver:404", strategy);
        let planned = plan(&d, &[&old, &new], now());
        let mut sizes = scales(&planned);
        sizes.sort();
        let mut expected = vec![(old.metadata.name.clone().unwrap(), 20), (new.metadata.name.clone().unwrap(), 13)];
        expected.sort();
        assert_eq!(sizes, expected, "8 + 20·8/13 and 5 + 20·5/13, rounded");
        assert!(
            planned
                .actions
                .iter()
                .all(|a| !matches!(a, Action::Scale { desired, max, .. } if (*desired, *max) != (30, 33)))
        );
        // Judged for 30 now: no longer a scaling event, and nothing more is resized at once.
        let old_d = deployment(
            30,
            "webserver:1",
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 3, "maxUnavailable": 2}}),
        );
        let old = observed(&old_d, 1, 20, 20);
        let new = observed(&d, 2, 13, 0);
        assert!(scales(&plan(&d, &[&old, &new], now())).is_empty());
        // Scaling down to zero empties both.
        let zero = deployment(
            0,
            "webserver:404",
            json!({"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 3, "maxUnavailable": 2}}),
        );
        let mut sizes = scales(&plan(&zero, &[&old, &new], now()));
        sizes.sort();
        assert!(sizes.iter().all(|(_, n)| *n == 0) && sizes.len() == 2, "{sizes:?}");
    }

    #[test]
    fn scaling_a_settled_deployment_scales_its_replica_set() {
        let d = deployment(5, "nginx:1", json!({}));
        let rs = observed(&d, 1, 3, 3);
        assert_eq!(scales(&plan(&d, &[&rs], now())), [(rs.metadata.name.clone().unwrap(), 5)]);
        assert!(template_hash(&d.spec.as_ref().unwrap().template).chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
