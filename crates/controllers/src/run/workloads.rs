//! The workload controllers' loops: ReplicaSets (and ReplicationControllers), Deployments, DaemonSets, Jobs and CronJobs.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod, ReplicationController};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use serde_json::json;
use tokio::sync::Notify;

use super::{Hub, PARALLEL, create_if_missing, delete_if_there, event, pods_by_namespace, wait, wait_until};
use crate::{cronjob, daemonset, deployment, job, replicaset, statefulset};

/// What the ReplicaSet controller keeps: ReplicaSets, and ReplicationControllers (their
/// older form, with a plain map for a selector), each seen as a ReplicaSet for planning.
pub(super) trait Replicated:
    kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
    + Clone
    + serde::de::DeserializeOwned
    + std::fmt::Debug
    + Send
    + Sync
    + 'static
{
    /// The component its events are from.
    const COMPONENT: &'static str;
    /// Its status (the same fields as a ReplicaSet's).
    type Status: serde::Serialize + serde::de::DeserializeOwned + PartialEq + Default + Clone + Send + Sync;
    /// This object as a ReplicaSet; `None` when it selects nothing (no selector).
    fn as_replica_set(&self) -> Option<ReplicaSet>;
    fn status(&self) -> Option<&Self::Status>;
}

impl Replicated for ReplicaSet {
    const COMPONENT: &'static str = "replicaset-controller";
    type Status = k8s_openapi::api::apps::v1::ReplicaSetStatus;
    fn as_replica_set(&self) -> Option<ReplicaSet> {
        Some(self.clone())
    }
    fn status(&self) -> Option<&Self::Status> {
        self.status.as_ref()
    }
}

impl Replicated for ReplicationController {
    const COMPONENT: &'static str = "replication-controller";
    type Status = k8s_openapi::api::core::v1::ReplicationControllerStatus;
    fn as_replica_set(&self) -> Option<ReplicaSet> {
        use k8s_openapi::api::apps::v1::ReplicaSetSpec;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
        let spec = self.spec.as_ref()?;
        let selector = spec.selector.clone().filter(|s| !s.is_empty())?;
        Some(ReplicaSet {
            metadata: self.metadata.clone(),
            spec: Some(ReplicaSetSpec {
                replicas: spec.replicas,
                min_ready_seconds: spec.min_ready_seconds,
                selector: LabelSelector { match_labels: Some(selector), match_expressions: None },
                template: spec.template.clone(),
            }),
            status: None,
        })
    }
    fn status(&self) -> Option<&Self::Status> {
        self.status.as_ref()
    }
}

/// The ReplicaSet controller, for ReplicaSets or ReplicationControllers.
pub(super) async fn run_replicasets<K: Replicated>(client: kube::Client, hub: Arc<Hub>) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let sets = hub.watch::<K>(&changed);
    let pods = hub.watch::<Pod>(&changed);
    sets.wait_until_ready().await;
    pods.wait_until_ready().await;
    tracing::info!(kind = %K::kind(&()), "replicaset controller started");
    let mut in_flight = InFlight::default();
    loop {
        if sets.is_empty() {
            wait(&changed).await;
            continue;
        }
        let sets_now = sets.state();
        // The pods of the sets' namespaces only (the sets' pods are there).
        let by_namespace = pods_by_namespace(
            &pods,
            sets_now.iter().map(|s| s.meta().namespace.as_deref().unwrap_or_default()),
        );
        let seen: std::collections::HashSet<&str> =
            by_namespace.values().flatten().filter_map(|p| p.metadata.name.as_deref()).collect();
        in_flight.settle(&seen);
        let now = jiff::Timestamp::now();
        let mut work = Vec::new();
        for set in &sets_now {
            let Some(view) = set.as_replica_set() else { continue };
            let namespace = view.metadata.namespace.as_deref().unwrap_or_default();
            let uid = view.metadata.uid.clone().unwrap_or_default();
            let pending = in_flight.count(&uid);
            let empty = Vec::new();
            let plan = replicaset::plan(&view, by_namespace.get(namespace).unwrap_or(&empty), pending, now);
            work.push((set.clone(), view, plan));
        }
        let client = &client;
        let created: Vec<(String, Vec<String>)> = futures::stream::iter(work)
            .map(|(set, view, plan)| async move {
                (view.metadata.uid.clone().unwrap_or_default(), apply(client, &*set, &view, plan).await)
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        for (uid, names) in created {
            in_flight.add(uid, names);
        }
        wait(&changed).await;
    }
}

/// The controller reference to `owner` that its dependents carry.
pub(super) fn owner_reference<K: kube::Resource<DynamicType = ()>>(owner: &K) -> OwnerReference {
    OwnerReference {
        api_version: K::api_version(&()).into_owned(),
        kind: K::kind(&()).into_owned(),
        name: owner.meta().name.clone().unwrap_or_default(),
        uid: owner.meta().uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// The uid of the controller of `object`, if it has one of `kind`.
pub(super) fn controller_uid<'a>(meta: &'a ObjectMeta, kind: &str) -> Option<&'a str> {
    meta.owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true) && r.kind == kind)
        .map(|r| r.uid.as_str())
}

/// A pod from a template, owned by `owner`, with a generated name.
fn pod_from_template(
    owner: &OwnerReference,
    namespace: &str,
    template: &k8s_openapi::api::core::v1::PodTemplateSpec,
    extra_labels: &[(&str, String)],
    spec: Option<k8s_openapi::api::core::v1::PodSpec>,
) -> Pod {
    let metadata = template.metadata.clone().unwrap_or_default();
    let mut labels = metadata.labels.unwrap_or_default();
    for (key, value) in extra_labels {
        labels.insert(key.to_string(), value.clone());
    }
    Pod {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", owner.name)),
            namespace: Some(namespace.into()),
            labels: Some(labels).filter(|l| !l.is_empty()),
            annotations: metadata.annotations,
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        spec: spec.or_else(|| template.spec.clone()),
        status: None,
    }
}

/// Creates `count` pods like `pod`, a bounded number at a time; returns the names made.
async fn create_pods(pods: &Api<Pod>, pod: &Pod, count: usize) -> (Vec<String>, Option<String>) {
    let results: Vec<Result<String, String>> = futures::stream::iter(0..count)
        .map(|_| async move {
            match pods.create(&PostParams::default(), pod).await {
                Ok(pod) => Ok(pod.metadata.name.unwrap_or_default()),
                Err(error) => {
                    tracing::debug!(%error, owner = ?pod.metadata.generate_name, "could not create a pod");
                    Err(match error {
                        kube::Error::Api(response) => response.message,
                        other => other.to_string(),
                    })
                }
            }
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let mut created = Vec::new();
    let mut failure = None;
    for result in results {
        match result {
            Ok(name) => created.push(name),
            Err(message) => failure = failure.or(Some(message)),
        }
    }
    (created, failure)
}

/// A ReplicaSet's (or ReplicationController's) conditions after a pass: `ReplicaFailure`
/// (reason `FailedCreate`, the API's refusal as message — an exceeded quota) while creating
/// its pods fails, gone once a pass goes through; kept from before while it stays the same.
fn replica_failure(
    before: Option<&Vec<k8s_openapi::api::apps::v1::ReplicaSetCondition>>,
    failure: Option<String>,
) -> Option<Vec<k8s_openapi::api::apps::v1::ReplicaSetCondition>> {
    let mut conditions: Vec<_> = before.cloned().unwrap_or_default();
    let old = conditions.iter().position(|c| c.type_ == "ReplicaFailure");
    match (failure, old) {
        (Some(message), Some(i)) if conditions[i].message.as_deref() == Some(&message) => {}
        (Some(message), old) => {
            if let Some(i) = old {
                conditions.remove(i);
            }
            conditions.push(k8s_openapi::api::apps::v1::ReplicaSetCondition {
                type_: "ReplicaFailure".into(),
                status: "True".into(),
                reason: Some("FailedCreate".into()),
                message: Some(message),
                last_transition_time: Some(
                    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now()),
                ),
            });
        }
        (None, Some(i)) => {
            conditions.remove(i);
        }
        (None, None) => {}
    }
    (!conditions.is_empty()).then_some(conditions)
}

/// Pods created per owner uid that the pod watch has not shown yet (upstream's expectations):
/// a lagging watch must not double the pods.
#[derive(Default)]
struct InFlight(HashMap<String, (Vec<String>, std::time::Instant)>);

impl InFlight {
    /// Forgets creations that have shown up, or that never will (a minute on).
    fn settle(&mut self, seen: &std::collections::HashSet<&str>) {
        self.0.retain(|_, (names, since)| {
            names.retain(|n| !seen.contains(n.as_str()));
            !names.is_empty() && since.elapsed() < Duration::from_secs(60)
        });
    }

    fn count(&self, uid: &str) -> usize {
        self.0.get(uid).map(|(n, _)| n.len()).unwrap_or(0)
    }

    fn add(&mut self, uid: String, names: Vec<String>) {
        if !names.is_empty() {
            let entry = self.0.entry(uid).or_insert_with(|| (Vec::new(), std::time::Instant::now()));
            entry.0.extend(names);
        }
    }
}

/// Carries out a plan; returns the names of the pods it created.
async fn apply<K: Replicated>(
    client: &kube::Client,
    set: &K,
    view: &ReplicaSet,
    plan: replicaset::Plan,
) -> Vec<String> {
    let namespace = view.metadata.namespace.as_deref().unwrap_or("default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let owner = owner_reference(set);
    for orphan in &plan.adopt {
        let patch = json!({"metadata": {"ownerReferences": [owner]}});
        if let Err(error) = pods.patch(orphan, &PatchParams::default(), &Patch::Merge(&patch)).await {
            tracing::debug!(%error, pod = orphan, "could not adopt");
        }
    }
    for released in &plan.release {
        let patch = json!({"metadata": {"ownerReferences": null}});
        if let Err(error) = pods.patch(released, &PatchParams::default(), &Patch::Merge(&patch)).await {
            tracing::debug!(%error, pod = released, "could not release");
        }
    }
    let mut created = Vec::new();
    let mut failed = None;
    if plan.create > 0 {
        let template = view.spec.as_ref().and_then(|s| s.template.clone()).unwrap_or_default();
        let pod = pod_from_template(&owner, namespace, &template, &[], None);
        let failure;
        (created, failure) = create_pods(&pods, &pod, plan.create).await;
        pod_events(client, set, "SuccessfulCreate", "Created", &created, K::COMPONENT).await;
        if let Some(message) = &failure {
            event(client, set, "Warning", "FailedCreate", &format!("Error creating: {message}"), K::COMPONENT).await;
        }
        failed = failure;
    }
    delete_pods(client, set, &pods, &plan.delete, &DeleteParams::default(), K::COMPONENT).await;
    let mut status = plan.status.clone();
    status.conditions = replica_failure(view.status.as_ref().and_then(|s| s.conditions.as_ref()), failed);
    // The same fields under another type name for ReplicationControllers.
    match serde_json::to_value(&status).and_then(serde_json::from_value::<K::Status>) {
        Ok(status) => update_status(client, set, Some(&set.status().cloned().unwrap_or_default()), &status).await,
        Err(error) => tracing::warn!(%error, "a ReplicaSet status that does not convert"),
    }
    created
}

/// Upstream's ownership rule for a Deployment's ReplicaSets: one its selector matches that
/// has no controller (made before the Deployment, or orphaned) becomes its own; one it
/// controls that its selector no longer matches is let go. The next pass plans with them.
async fn adopt_and_release(client: &kube::Client, deployments: &[Arc<Deployment>], sets: &[Arc<ReplicaSet>]) {
    for d in deployments.iter().filter(|d| d.metadata.deletion_timestamp.is_none()) {
        let namespace = d.metadata.namespace.as_deref().unwrap_or("default");
        let uid = d.metadata.uid.as_deref().unwrap_or_default();
        let Some(selector) = d.spec.as_ref().map(|s| &s.selector) else { continue };
        // An empty selector selects nothing here (upstream refuses it).
        if selector.match_labels.as_ref().is_none_or(|l| l.is_empty())
            && selector.match_expressions.as_ref().is_none_or(|e| e.is_empty())
        {
            continue;
        }
        let api: Api<ReplicaSet> = Api::namespaced(client.clone(), namespace);
        for rs in sets.iter().filter(|rs| rs.metadata.namespace.as_deref() == Some(namespace)) {
            let owners = rs.metadata.owner_references.clone().unwrap_or_default();
            let controller = owners.iter().find(|o| o.controller == Some(true));
            let selected = tugboat_objects::labels::selector_matches(selector, rs.metadata.labels.as_ref());
            let owners = match controller {
                None if selected && rs.metadata.deletion_timestamp.is_none() => {
                    let mut owners = owners.clone();
                    owners.push(owner_reference(d.as_ref()));
                    owners
                }
                Some(c) if c.uid == uid && !selected => owners.iter().filter(|o| o.uid != uid).cloned().collect(),
                _ => continue,
            };
            let name = rs.metadata.name.as_deref().unwrap_or_default();
            let patch = json!({"metadata": {"ownerReferences": owners}});
            match api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Ok(_) => tracing::info!(
                    deployment = d.metadata.name.as_deref().unwrap_or_default(),
                    replicaset = name,
                    adopted = controller.is_none(),
                    "replica set ownership changed"
                ),
                Err(error) => tracing::debug!(%error, replicaset = name, "could not adopt or release"),
            }
        }
    }
}

/// The Deployment controller.
pub(super) async fn run_deployments(client: kube::Client, hub: Arc<Hub>) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let deployments = hub.watch::<Deployment>(&changed);
    let sets = hub.watch::<ReplicaSet>(&changed);
    deployments.wait_until_ready().await;
    sets.wait_until_ready().await;
    tracing::info!("deployment controller started");
    loop {
        let all_sets = sets.state();
        let mut by_owner: HashMap<String, Vec<&ReplicaSet>> = HashMap::new();
        for rs in &all_sets {
            if let Some(owner) = rs
                .metadata
                .owner_references
                .iter()
                .flatten()
                .find(|r| r.controller == Some(true) && r.kind == "Deployment")
            {
                by_owner.entry(owner.uid.clone()).or_default().push(rs);
            }
        }
        let all_deployments = deployments.state();
        adopt_and_release(&client, &all_deployments, &all_sets).await;
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(jiff::Timestamp::now());
        let mut work = Vec::new();
        for d in all_deployments {
            if d.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let owned = by_owner.get(d.metadata.uid.as_deref().unwrap_or_default()).cloned().unwrap_or_default();
            let plan = deployment::plan(&d, &owned, now.clone());
            let sizes: HashMap<String, i32> = owned
                .iter()
                .map(|rs| {
                    (
                        rs.metadata.name.clone().unwrap_or_default(),
                        rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0),
                    )
                })
                .collect();
            work.push((d, plan, sizes));
        }
        let client = &client;
        futures::stream::iter(work)
            .for_each_concurrent(PARALLEL, |(d, plan, sizes)| async move {
                apply_deployment(client, &d, plan, &sizes).await
            })
            .await;
        wait(&changed).await;
    }
}

async fn apply_deployment(client: &kube::Client, d: &Deployment, plan: deployment::Plan, sizes: &HashMap<String, i32>) {
    let namespace = d.metadata.namespace.as_deref().unwrap_or("default");
    let name = d.metadata.name.as_deref().unwrap_or_default();
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), namespace);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let params = PatchParams::default();
    for action in plan.actions {
        let result = match &action {
            deployment::Action::Create(rs) => create_if_missing(&sets, rs).await,
            deployment::Action::Scale { name, replicas, desired, max } => {
                let annotations = json!({"deployment.kubernetes.io/desired-replicas": desired.to_string(),
                                         "deployment.kubernetes.io/max-replicas": max.to_string()});
                let patch = json!({"metadata": {"annotations": annotations}, "spec": {"replicas": replicas}});
                sets.patch(name, &params, &Patch::Merge(&patch)).await.map(|_| ())
            }
            deployment::Action::Revise { name, revision } => {
                let patch = json!({"metadata": {"annotations": {deployment::REVISION: revision.to_string()}}});
                sets.patch(name, &params, &Patch::Merge(&patch)).await.map(|_| ())
            }
            deployment::Action::Delete { name } => sets.delete(name, &DeleteParams::background()).await.map(|_| ()),
            deployment::Action::AnnotateDeployment { revision } => {
                let patch = json!({"metadata": {"annotations": {deployment::REVISION: revision.to_string()}}});
                deployments.patch(name, &params, &Patch::Merge(&patch)).await.map(|_| ())
            }
        };
        match result {
            Err(error) => tracing::debug!(%error, deployment = name, ?action, "deployment action failed"),
            Ok(()) => {
                let scaled = match &action {
                    deployment::Action::Create(rs) => Some((
                        rs.metadata.name.clone().unwrap_or_default(),
                        0,
                        rs.spec.as_ref().and_then(|s| s.replicas).unwrap_or(0),
                    )),
                    deployment::Action::Scale { name, replicas, .. } => {
                        Some((name.clone(), sizes.get(name).copied().unwrap_or(0), *replicas))
                    }
                    _ => None,
                };
                if let Some((set, from, to)) = scaled.filter(|(_, from, to)| from != to) {
                    let direction = if to > from { "up" } else { "down" };
                    let message = format!("Scaled {direction} replica set {set} from {from} to {to}");
                    event(client, d, "Normal", "ScalingReplicaSet", &message, "deployment-controller").await;
                }
            }
        }
    }
    if d.status.as_ref() != Some(&plan.status) {
        let patch = json!({"status": plan.status});
        if let Err(error) = deployments.patch_status(name, &params, &Patch::Merge(&patch)).await {
            tracing::debug!(%error, deployment = name, "could not update the status");
        }
    }
}

/// Deletes `victims` (pods of `owner`), with a SuccessfulDelete event for each one deleted.
async fn delete_pods<K: kube::Resource<DynamicType = ()>>(
    client: &kube::Client,
    owner: &K,
    pods: &Api<Pod>,
    victims: &[String],
    params: &DeleteParams,
    component: &str,
) {
    let mut deleted = Vec::new();
    for victim in victims {
        match delete_if_there(pods, victim, params).await {
            Ok(()) => deleted.push(victim.clone()),
            Err(error) => tracing::debug!(%error, pod = victim, component, "could not delete a pod"),
        }
    }
    pod_events(client, owner, "SuccessfulDelete", "Deleted", &deleted, component).await;
}

/// Writes `status` to `object`'s status subresource when it differs from `current`.
async fn update_status<K, S>(client: &kube::Client, object: &K, current: Option<&S>, status: &S)
where
    K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
    S: serde::Serialize + PartialEq,
{
    if current == Some(status) {
        return;
    }
    let meta = object.meta();
    let api: Api<K> = Api::namespaced(client.clone(), meta.namespace.as_deref().unwrap_or("default"));
    let name = meta.name.as_deref().unwrap_or_default();
    // A merge patch leaves what it does not name: a field the status no longer has (the
    // conditions, once none is left) is named as null.
    let mut new = serde_json::to_value(status).unwrap_or_default();
    if let (Some(old), Some(map)) = (current.and_then(|c| serde_json::to_value(c).ok()), new.as_object_mut()) {
        for key in old.as_object().into_iter().flat_map(|o| o.keys()) {
            map.entry(key.clone()).or_insert(serde_json::Value::Null);
        }
    }
    let patch = json!({"status": new});
    if let Err(error) = api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        tracing::debug!(%error, object = name, kind = %K::kind(&()), "could not update the status");
    }
}

/// One event per pod created or deleted (`Created pod: web-x7k2p`), about the owner.
async fn pod_events<K: kube::Resource<DynamicType = ()>>(
    client: &kube::Client,
    owner: &K,
    reason: &str,
    verb: &str,
    pods: &[String],
    component: &str,
) {
    for pod in pods {
        event(client, owner, "Normal", reason, &format!("{verb} pod: {pod}"), component).await;
    }
}

/// Active pods per controller uid (of `kind`), from every pod.
fn pods_by_controller<'a>(pods: &'a [Arc<Pod>], kind: &str) -> HashMap<&'a str, Vec<&'a Pod>> {
    let mut owned: HashMap<&str, Vec<&Pod>> = HashMap::new();
    for pod in pods {
        if let Some(uid) = controller_uid(&pod.metadata, kind) {
            owned.entry(uid).or_default().push(pod);
        }
    }
    owned
}

/// The DaemonSet controller.
pub(super) async fn run_daemonsets(client: kube::Client, hub: Arc<Hub>) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let sets = hub.watch::<DaemonSet>(&changed);
    let nodes = hub.watch::<Node>(&changed);
    let pods = hub.watch::<Pod>(&changed);
    sets.wait_until_ready().await;
    nodes.wait_until_ready().await;
    pods.wait_until_ready().await;
    tracing::info!("daemonset controller started");
    // Pods created for (DaemonSet uid, node) that the watch has not shown yet.
    let mut in_flight: HashMap<(String, String), std::time::Instant> = HashMap::new();
    loop {
        if sets.is_empty() {
            in_flight.clear();
            wait(&changed).await;
            continue;
        }
        let all_pods = pods.state();
        let all_nodes = nodes.state();
        let owned = pods_by_controller(&all_pods, "DaemonSet");
        in_flight.retain(|(uid, node), since| {
            since.elapsed() < Duration::from_secs(60)
                && !owned
                    .get(uid.as_str())
                    .is_some_and(|pods| pods.iter().any(|p| daemonset::pod_node(p) == Some(node.as_str())))
        });
        let now = jiff::Timestamp::now();
        let mut work = Vec::new();
        for ds in sets.state() {
            let uid = ds.metadata.uid.clone().unwrap_or_default();
            let template = ds.spec.as_ref().map(|s| s.template.clone()).unwrap_or_default();
            let hash = deployment::template_hash(&template);
            let mine = owned.get(uid.as_str()).cloned().unwrap_or_default();
            let mut plan = daemonset::plan(&ds, &all_nodes, &mine, &hash, now);
            plan.create.retain(|node| !in_flight.contains_key(&(uid.clone(), node.clone())));
            for node in &plan.create {
                in_flight.insert((uid.clone(), node.clone()), std::time::Instant::now());
            }
            work.push((ds, plan, hash));
        }
        let client = &client;
        futures::stream::iter(work)
            .for_each_concurrent(
                PARALLEL,
                |(ds, plan, hash)| async move { apply_daemonset(client, &ds, plan, &hash).await },
            )
            .await;
        wait(&changed).await;
    }
}

async fn apply_daemonset(client: &kube::Client, ds: &DaemonSet, plan: daemonset::Plan, hash: &str) {
    let namespace = ds.metadata.namespace.as_deref().unwrap_or("default");
    let name = ds.metadata.name.as_deref().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let owner = owner_reference(ds);
    let template = ds.spec.as_ref().map(|s| s.template.clone()).unwrap_or_default();
    let generation = ds.metadata.generation.unwrap_or(1).to_string();
    let labels = [(daemonset::HASH_LABEL, hash.to_string()), ("pod-template-generation", generation)];
    let created: Vec<Option<String>> = futures::stream::iter(plan.create.clone())
        .map(|node| {
            let spec = daemonset::pod_spec_for(&template.spec.clone().unwrap_or_default(), &node);
            let pod = pod_from_template(&owner, namespace, &template, &labels, Some(spec));
            let pods = pods.clone();
            async move {
                match pods.create(&PostParams::default(), &pod).await {
                    Ok(pod) => pod.metadata.name,
                    Err(error) => {
                        tracing::debug!(%error, daemonset = name, node, "could not create a daemon pod");
                        None
                    }
                }
            }
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let created: Vec<String> = created.into_iter().flatten().collect();
    pod_events(client, ds, "SuccessfulCreate", "Created", &created, "daemonset-controller").await;
    delete_pods(client, ds, &pods, &plan.delete, &DeleteParams::default(), "daemonset-controller").await;
    update_status(client, ds, ds.status.as_ref(), &plan.status).await;
}

/// The Job controller (and the TTL-after-finished controller).
pub(super) async fn run_jobs(client: kube::Client, hub: Arc<Hub>) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let jobs = hub.watch::<Job>(&changed);
    let pods = hub.watch::<Pod>(&changed);
    jobs.wait_until_ready().await;
    pods.wait_until_ready().await;
    tracing::info!("job controller started");
    let mut in_flight = InFlight::default();
    loop {
        if jobs.is_empty() {
            wait(&changed).await;
            continue;
        }
        let all_pods = pods.state();
        let seen: std::collections::HashSet<&str> =
            all_pods.iter().filter_map(|p| p.metadata.name.as_deref()).collect();
        in_flight.settle(&seen);
        let owned = pods_by_controller(&all_pods, "Job");
        let all_jobs = jobs.state();
        let by_namespace =
            pods_by_namespace(&pods, all_jobs.iter().map(|j| j.metadata.namespace.as_deref().unwrap_or("default")));
        let now = jiff::Timestamp::now();
        let mut work = Vec::new();
        let mut wake: Option<jiff::Timestamp> = None;
        for j in &all_jobs {
            if j.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let uid = j.metadata.uid.clone().unwrap_or_default();
            let mut mine = owned.get(uid.as_str()).cloned().unwrap_or_default();
            // Orphans the selector matches are adopted, and count at once; pods it no longer
            // matches are released (upstream's ClaimPods).
            let namespace = j.metadata.namespace.as_deref().unwrap_or("default");
            let finished = j
                .status
                .iter()
                .flat_map(|s| s.conditions.iter().flatten())
                .any(|c| matches!(c.type_.as_str(), "Complete" | "Failed") && c.status == "True");
            let (adopt, release) = match j.spec.as_ref().and_then(|s| s.selector.as_ref()).filter(|_| !finished) {
                Some(selector) => {
                    let candidates = by_namespace.get(namespace).into_iter().flatten().map(|p| &**p);
                    crate::pods::claims(&uid, selector, candidates, false)
                }
                None => (Vec::new(), Vec::new()),
            };
            mine.retain(|p| !release.iter().any(|r| std::ptr::eq(*r, *p)));
            mine.extend(adopt.iter().copied());
            let plan = job::plan(j, &mine, in_flight.count(&uid), now);
            if let Some(at) = plan.wake {
                wake = Some(wake.map_or(at, |w| w.min(at)));
            }
            let names =
                |pods: &[&Pod]| -> Vec<String> { pods.iter().filter_map(|p| p.metadata.name.clone()).collect() };
            work.push((j.clone(), plan, names(&adopt), names(&release)));
        }
        let client = &client;
        let created: Vec<(String, Vec<String>)> = futures::stream::iter(work)
            .map(|(j, plan, adopt, release)| async move {
                claim(client, &*j, &adopt, &release).await;
                (j.metadata.uid.clone().unwrap_or_default(), apply_job(client, &j, plan).await)
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        for (uid, names) in created {
            in_flight.add(uid, names);
        }
        wait_until(&changed, wake).await;
    }
}

/// Adopts the orphans `adopt` (the owner's controller reference added) and releases the pods
/// `release` (their owner references dropped), of `owner`'s namespace.
async fn claim<K: kube::Resource<DynamicType = ()>>(
    client: &kube::Client,
    owner: &K,
    adopt: &[String],
    release: &[String],
) {
    let namespace = owner.meta().namespace.as_deref().unwrap_or("default");
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let reference = owner_reference(owner);
    for name in adopt {
        let patch = json!({"metadata": {"ownerReferences": [reference]}});
        if let Err(error) = pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            tracing::debug!(%error, pod = name, "could not adopt");
        }
    }
    for name in release {
        let patch = json!({"metadata": {"ownerReferences": null}});
        if let Err(error) = pods.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            tracing::debug!(%error, pod = name, "could not release");
        }
    }
}

async fn apply_job(client: &kube::Client, j: &Job, plan: job::Plan) -> Vec<String> {
    let namespace = j.metadata.namespace.as_deref().unwrap_or("default");
    let name = j.metadata.name.as_deref().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    if plan.delete_job {
        tracing::info!(job = name, namespace, "deleting a finished job whose TTL ran out");
        let mut params = DeleteParams::foreground();
        params.preconditions = Some(Preconditions { uid: j.metadata.uid.clone(), resource_version: None });
        if let Err(error) = delete_if_there(&jobs, name, &params).await {
            tracing::debug!(%error, job = name, "could not delete the job");
        }
        return Vec::new();
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let mut created = Vec::new();
    if plan.create > 0 {
        let template = j.spec.as_ref().map(|s| s.template.clone()).unwrap_or_default();
        let pod = pod_from_template(&owner_reference(j), namespace, &template, &[], None);
        if plan.indexes.is_empty() {
            created = create_pods(&pods, &pod, plan.create).await.0;
        } else {
            // An Indexed Job's pod: its index as annotation, label and JOB_COMPLETION_INDEX,
            // and `<job>-<index>` as its hostname (upstream).
            for index in &plan.indexes {
                let mut pod = pod.clone();
                let value = index.to_string();
                pod.metadata.generate_name = Some(format!("{name}-{index}-"));
                pod.metadata.annotations.get_or_insert_with(Default::default).insert(job::INDEX.into(), value.clone());
                pod.metadata.labels.get_or_insert_with(Default::default).insert(job::INDEX.into(), value.clone());
                if let Some(spec) = pod.spec.as_mut() {
                    spec.hostname = Some(format!("{name}-{index}"));
                    for container in spec.containers.iter_mut().chain(spec.init_containers.iter_mut().flatten()) {
                        container.env.get_or_insert_with(Vec::new).push(k8s_openapi::api::core::v1::EnvVar {
                            name: "JOB_COMPLETION_INDEX".into(),
                            value: Some(value.clone()),
                            value_from: None,
                        });
                    }
                }
                created.extend(create_pods(&pods, &pod, 1).await.0);
            }
        }
        pod_events(client, j, "SuccessfulCreate", "Created", &created, "job-controller").await;
    }
    delete_pods(client, j, &pods, &plan.delete, &DeleteParams::background(), "job-controller").await;
    let finished_now = |status: Option<&k8s_openapi::api::batch::v1::JobStatus>| {
        status.and_then(|s| s.conditions.as_ref()).and_then(|c| {
            c.iter().find(|c| (c.type_ == "Complete" || c.type_ == "Failed") && c.status == "True").cloned()
        })
    };
    if finished_now(j.status.as_ref()).is_none()
        && let Some(done) = finished_now(Some(&plan.status))
    {
        let (kind, reason, message) = if done.type_ == "Complete" {
            ("Normal", "Completed".to_string(), "Job completed".to_string())
        } else {
            ("Warning", done.reason.clone().unwrap_or_default(), done.message.clone().unwrap_or_default())
        };
        event(client, j, kind, &reason, &message, "job-controller").await;
    }
    update_status(client, j, j.status.as_ref(), &plan.status).await;
    created
}

/// The CronJob controller.
pub(super) async fn run_cronjobs(client: kube::Client, hub: Arc<Hub>) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let cronjobs = hub.watch::<CronJob>(&changed);
    let jobs = hub.watch::<Job>(&changed);
    cronjobs.wait_until_ready().await;
    jobs.wait_until_ready().await;
    tracing::info!("cronjob controller started");
    let mut reported: HashMap<String, String> = HashMap::new();
    loop {
        let all_jobs = jobs.state();
        let mut owned: HashMap<&str, Vec<&Job>> = HashMap::new();
        for j in &all_jobs {
            if let Some(uid) = controller_uid(&j.metadata, "CronJob") {
                owned.entry(uid).or_default().push(j);
            }
        }
        let now = jiff::Timestamp::now();
        let mut wake: Option<jiff::Timestamp> = None;
        let mut work = Vec::new();
        for cj in cronjobs.state() {
            if cj.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let uid = cj.metadata.uid.clone().unwrap_or_default();
            let mine = owned.get(uid.as_str()).cloned().unwrap_or_default();
            let plan = cronjob::plan(&cj, &mine, now);
            if let Some(error) = &plan.error
                && reported.get(&uid) != Some(error)
            {
                tracing::warn!(cronjob = ?cj.metadata.name, %error, "cannot schedule");
                reported.insert(uid.clone(), error.clone());
            }
            if let Some(at) = plan.wake {
                wake = Some(wake.map_or(at, |w| w.min(at)));
            }
            work.push((cj, plan));
        }
        let client = &client;
        futures::stream::iter(work)
            .for_each_concurrent(PARALLEL, |(cj, plan)| async move { apply_cronjob(client, &cj, plan).await })
            .await;
        wait_until(&changed, wake).await;
    }
}

async fn apply_cronjob(client: &kube::Client, cj: &CronJob, plan: cronjob::Plan) {
    let namespace = cj.metadata.namespace.as_deref().unwrap_or("default");
    let name = cj.metadata.name.as_deref().unwrap_or_default();
    let jobs: Api<Job> = Api::namespaced(client.clone(), namespace);
    for victim in &plan.delete {
        match delete_if_there(&jobs, victim, &DeleteParams::background()).await {
            Ok(()) => {
                event(client, cj, "Normal", "SuccessfulDelete", &format!("Deleted job {victim}"), "cronjob-controller")
                    .await
            }
            Err(error) => tracing::debug!(%error, job = victim, "could not delete a job"),
        }
    }
    if let Some((job_name, at)) = &plan.create {
        let template = cj.spec.as_ref().map(|s| s.job_template.clone()).unwrap_or_default();
        let metadata = template.metadata.unwrap_or_default();
        let mut annotations = metadata.annotations.unwrap_or_default();
        annotations.insert(cronjob::SCHEDULED.into(), at.to_string());
        let job = Job {
            metadata: ObjectMeta {
                name: Some(job_name.clone()),
                namespace: Some(namespace.into()),
                labels: metadata.labels,
                annotations: Some(annotations),
                owner_references: Some(vec![owner_reference(cj)]),
                ..Default::default()
            },
            spec: template.spec,
            status: None,
        };
        tracing::info!(cronjob = name, job = %job_name, "starting a scheduled job");
        if let Err(error) = create_if_missing(&jobs, &job).await {
            tracing::debug!(%error, cronjob = name, "could not create the job");
            return;
        }
        event(client, cj, "Normal", "SuccessfulCreate", &format!("Created job {job_name}"), "cronjob-controller").await;
    }
    if cj.status.as_ref() != Some(&plan.status) {
        let cronjobs: Api<CronJob> = Api::namespaced(client.clone(), namespace);
        // `active: null` removes the list once the last job finished.
        let mut status = serde_json::to_value(&plan.status).unwrap_or_default();
        status["active"] = json!(plan.status.active);
        let patch = json!({"status": status});
        if let Err(error) = cronjobs.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            tracing::debug!(%error, cronjob = name, "could not update the status");
        }
    }
}

/// The StatefulSet controller.
pub(super) async fn run_statefulsets(client: kube::Client, hub: Arc<Hub>) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let sets = hub.watch::<StatefulSet>(&changed);
    let pods = hub.watch::<Pod>(&changed);
    let claims = hub.watch::<PersistentVolumeClaim>(&changed);
    sets.wait_until_ready().await;
    pods.wait_until_ready().await;
    claims.wait_until_ready().await;
    tracing::info!("statefulset controller started");
    loop {
        if sets.is_empty() {
            wait(&changed).await;
            continue;
        }
        let all_pods = pods.state();
        let owned = pods_by_controller(&all_pods, "StatefulSet");
        let all_claims = claims.state();
        let now = jiff::Timestamp::now();
        let mut work = Vec::new();
        for set in sets.state() {
            let namespace = set.metadata.namespace.clone().unwrap_or_default();
            let uid = set.metadata.uid.clone().unwrap_or_default();
            let template = set.spec.as_ref().map(|s| s.template.clone()).unwrap_or_default();
            let hash = deployment::template_hash(&template);
            let mine = owned.get(uid.as_str()).cloned().unwrap_or_default();
            let existing: Vec<String> = all_claims
                .iter()
                .filter(|c| c.metadata.namespace.as_deref() == Some(namespace.as_str()))
                .filter_map(|c| c.metadata.name.clone())
                .collect();
            let plan = statefulset::plan(&set, &mine, &existing, &hash, now);
            work.push((set, plan, hash));
        }
        let client = &client;
        futures::stream::iter(work)
            .for_each_concurrent(PARALLEL, |(set, plan, hash)| async move {
                apply_statefulset(client, &set, plan, &hash).await
            })
            .await;
        wait(&changed).await;
    }
}

async fn apply_statefulset(client: &kube::Client, set: &StatefulSet, plan: statefulset::Plan, hash: &str) {
    use k8s_openapi::api::core::v1::{PersistentVolumeClaimVolumeSource, Volume};
    let namespace = set.metadata.namespace.as_deref().unwrap_or("default");
    let name = set.metadata.name.as_deref().unwrap_or_default();
    let spec = set.spec.clone().unwrap_or_default();
    let claim_api: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
    for (claim, template) in &plan.claims {
        let Some(template) =
            spec.volume_claim_templates.iter().flatten().find(|t| t.metadata.name.as_deref() == Some(template))
        else {
            continue;
        };
        let mut labels = template.metadata.labels.clone().unwrap_or_default();
        labels.extend(spec.selector.match_labels.clone().unwrap_or_default());
        let object = PersistentVolumeClaim {
            metadata: ObjectMeta {
                name: Some(claim.clone()),
                namespace: Some(namespace.into()),
                labels: Some(labels),
                annotations: template.metadata.annotations.clone(),
                ..Default::default()
            },
            spec: template.spec.clone(),
            status: None,
        };
        match create_if_missing(&claim_api, &object).await {
            Ok(()) => {
                event(
                    client,
                    set,
                    "Normal",
                    "SuccessfulCreate",
                    &format!("create Claim {claim} Pod {name} in StatefulSet {name} success"),
                    "statefulset-controller",
                )
                .await
            }
            Err(error) => tracing::debug!(%error, claim, "could not create a claim"),
        }
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let owner = owner_reference(set);
    // The template's ControllerRevision (`<set>-<hash>`), as upstream keeps one per revision:
    // a partitioned rollout makes the pods below the partition from the current one.
    let revisions: Api<k8s_openapi::api::apps::v1::ControllerRevision> = Api::namespaced(client.clone(), namespace);
    let mut revision_labels = spec.template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
    revision_labels.insert(statefulset::HASH_LABEL.into(), hash.to_string());
    let revision = k8s_openapi::api::apps::v1::ControllerRevision {
        metadata: ObjectMeta {
            name: Some(format!("{name}-{hash}")),
            namespace: Some(namespace.to_string()),
            labels: Some(revision_labels),
            owner_references: Some(vec![owner.clone()]),
            ..Default::default()
        },
        data: Some(k8s_openapi::apimachinery::pkg::runtime::RawExtension(super::history::revision_data(
            &spec.template,
        ))),
        revision: set.metadata.generation.unwrap_or(1),
    };
    if let Err(error) = create_if_missing(&revisions, &revision).await {
        tracing::debug!(%error, set = name, "could not record the controller revision");
    }
    let mut older: Option<(String, k8s_openapi::api::core::v1::PodTemplateSpec)> = None;
    if let Some((_, revision)) = &plan.below_partition
        && plan.create.iter().any(|o| plan.below_partition.as_ref().is_some_and(|(below, _)| o < below))
        && let Ok(Some(found)) = revisions.get_opt(&format!("{name}-{revision}")).await
        && let Some(template) = found.data.and_then(|d| serde_json::from_value(d.0["spec"]["template"].clone()).ok())
    {
        older = Some((revision.clone(), template));
    }
    for ordinal in &plan.create {
        let pod_name = statefulset::pod_name(name, *ordinal);
        let below = plan.below_partition.as_ref().is_some_and(|(below, _)| ordinal < below);
        let (revision, template) = match &older {
            Some((revision, template)) if below => (revision.clone(), template),
            _ => (hash.to_string(), &spec.template),
        };
        let labels = [
            (statefulset::HASH_LABEL, revision),
            (statefulset::POD_NAME_LABEL, pod_name.clone()),
            (statefulset::POD_INDEX_LABEL, ordinal.to_string()),
        ];
        let mut pod_spec = template.spec.clone().unwrap_or_default();
        pod_spec.hostname = Some(pod_name.clone());
        if !spec.service_name.as_deref().unwrap_or_default().is_empty() {
            pod_spec.subdomain = spec.service_name.clone();
        }
        for template in spec.volume_claim_templates.iter().flatten() {
            let Some(volume) = template.metadata.name.clone() else { continue };
            let volumes = pod_spec.volumes.get_or_insert_with(Vec::new);
            volumes.retain(|v| v.name != volume);
            volumes.push(Volume {
                name: volume.clone(),
                persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                    claim_name: statefulset::claim_name(&volume, name, *ordinal),
                    read_only: None,
                }),
                ..Default::default()
            });
        }
        let mut pod = pod_from_template(&owner, namespace, template, &labels, Some(pod_spec));
        pod.metadata.generate_name = None;
        pod.metadata.name = Some(pod_name.clone());
        match create_if_missing(&pods, &pod).await {
            Ok(()) => {
                let message = format!("create Pod {pod_name} in StatefulSet {name} successful");
                event(client, set, "Normal", "SuccessfulCreate", &message, "statefulset-controller").await;
            }
            Err(error) => tracing::debug!(%error, pod = pod_name, "could not create a stateful pod"),
        }
    }
    for victim in &plan.delete {
        match delete_if_there(&pods, victim, &DeleteParams::default()).await {
            Ok(()) => {
                let message = format!("delete Pod {victim} in StatefulSet {name} successful");
                event(client, set, "Normal", "SuccessfulDelete", &message, "statefulset-controller").await;
            }
            Err(error) => tracing::debug!(%error, pod = victim, "could not delete a stateful pod"),
        }
    }
    update_status(client, set, set.status.as_ref(), &plan.status).await;
}
