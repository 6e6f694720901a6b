//! The controller manager's loops. Each controller keeps reflectors of what it reads; a burst of
//! changes triggers one pass over every object it controls (level-driven: a pass converges from
//! whatever it observes, so restarts and missed events do not matter).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::json;
use tokio::sync::Notify;

use crate::{deployment, gc, nodelifecycle, replicaset};

/// What the controllers are told by flags.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// A node silent this long is Ready=Unknown (`--node-monitor-grace-period`, 40 s).
    pub node_monitor_grace_period: Duration,
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig { node_monitor_grace_period: Duration::from_secs(40) }
    }
}

/// How long a pass waits after a change for the changes that come with it.
const COALESCE: Duration = Duration::from_millis(5);
/// Writes in flight at once per controller.
const PARALLEL: usize = 32;
/// A pass also runs this often without changes (time-based conditions such as minReadySeconds).
const RESYNC: Duration = Duration::from_secs(30);

/// A reflector whose changes wake `changed`.
fn reflect<K>(api: Api<K>, changed: &Arc<Notify>) -> Store<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone,
{
    reflect_with(api, K::DynamicType::default(), changed)
}

/// The same for a kind known at run time (`DynamicObject` with its `ApiResource`).
fn reflect_with<K>(api: Api<K>, dyntype: K::DynamicType, changed: &Arc<Notify>) -> Store<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone,
{
    let writer = reflector::store::Writer::<K>::new(dyntype);
    let reader = writer.as_reader();
    let events = reflector(writer, watcher(api, watcher::Config::default())).default_backoff().touched_objects();
    let changed = changed.clone();
    tokio::spawn(async move {
        let mut events = events.map_ok(|_| ()).boxed();
        while let Some(event) = events.next().await {
            if let Err(error) = event {
                tracing::debug!(%error, "controller watch");
            }
            changed.notify_one();
        }
    });
    reader
}

async fn wait(changed: &Notify) {
    let _ = tokio::time::timeout(RESYNC, changed.notified()).await;
    tokio::time::sleep(COALESCE).await;
}

/// Runs every controller until the server goes away for good.
pub async fn run(client: kube::Client, config: ControllerConfig) -> anyhow::Result<()> {
    let nodes = tokio::spawn(run_node_lifecycle(client.clone(), config.clone()));
    let replicasets = tokio::spawn(run_replicasets(client.clone()));
    let deployments = tokio::spawn(run_deployments(client.clone()));
    let collector = tokio::spawn(run_garbage_collector(client.clone()));
    tokio::select! {
        result = replicasets => result?,
        result = deployments => result?,
        result = collector => result?,
        result = nodes => result?,
    }
}

/// The node lifecycle controller: heartbeats, NotReady/unreachable taints, NoExecute eviction.
pub async fn run_node_lifecycle(client: kube::Client, config: ControllerConfig) -> anyhow::Result<()> {
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::Node;
    let changed = Arc::new(Notify::new());
    let nodes = reflect(Api::<Node>::all(client.clone()), &changed);
    let leases = reflect(Api::<Lease>::namespaced(client.clone(), "kube-node-lease"), &changed);
    let pods = reflect(Api::<Pod>::all(client.clone()), &changed);
    nodes.wait_until_ready().await?;
    leases.wait_until_ready().await?;
    pods.wait_until_ready().await?;
    tracing::info!("node lifecycle controller started");
    let grace = config.node_monitor_grace_period.as_secs() as i64;
    loop {
        let renewed: HashMap<String, k8s_openapi::jiff::Timestamp> = leases
            .state()
            .iter()
            .filter_map(|l| Some((l.metadata.name.clone()?, l.spec.as_ref()?.renew_time.as_ref()?.0)))
            .collect();
        let all_pods = pods.state();
        let mut by_node: HashMap<&str, Vec<&Pod>> = HashMap::new();
        for pod in &all_pods {
            if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).filter(|n| !n.is_empty()) {
                by_node.entry(node).or_default().push(pod);
            }
        }
        let now = k8s_openapi::jiff::Timestamp::now();
        let mut actions = Vec::new();
        for node in nodes.state() {
            let name = node.metadata.name.clone().unwrap_or_default();
            let on_node = by_node.get(name.as_str()).cloned().unwrap_or_default();
            actions.extend(
                nodelifecycle::plan(&node, renewed.get(&name).copied(), &on_node, now, grace)
                    .into_iter()
                    .map(|a| (a, node.clone())),
            );
        }
        let client = &client;
        futures::stream::iter(actions)
            .for_each_concurrent(PARALLEL, |(action, node)| async move {
                if let Err(error) = apply_node_action(client, &action, &node).await {
                    tracing::debug!(%error, ?action, "node lifecycle action failed");
                }
            })
            .await;
        // Time passing is a change here: look at least every second.
        let _ = tokio::time::timeout(Duration::from_secs(1), changed.notified()).await;
        tokio::time::sleep(COALESCE).await;
    }
}

async fn apply_node_action(
    client: &kube::Client,
    action: &nodelifecycle::Action,
    node: &k8s_openapi::api::core::v1::Node,
) -> kube::Result<()> {
    use k8s_openapi::api::core::v1::Node;
    let nodes: Api<Node> = Api::all(client.clone());
    let params = PatchParams::default();
    match action {
        nodelifecycle::Action::MarkUnknown { node: name } => {
            let now = k8s_openapi::jiff::Timestamp::now().to_string();
            let conditions: Vec<serde_json::Value> = node
                .status
                .as_ref()
                .and_then(|s| s.conditions.clone())
                .unwrap_or_default()
                .into_iter()
                .map(|c| {
                    json!({"type": c.type_, "status": "Unknown", "reason": "NodeStatusUnknown",
                           "message": "Kubelet stopped posting node status.",
                           "lastHeartbeatTime": c.last_heartbeat_time, "lastTransitionTime": now})
                })
                .collect();
            let conditions = if conditions.is_empty() {
                vec![json!({"type": "Ready", "status": "Unknown", "reason": "NodeStatusNeverUpdated",
                            "message": "Kubelet never posted node status.", "lastTransitionTime": now})]
            } else {
                conditions
            };
            nodes.patch_status(name, &params, &Patch::Merge(json!({"status": {"conditions": conditions}}))).await?;
        }
        nodelifecycle::Action::SetTaints { node: name, taints } => {
            let taints = if taints.is_empty() { serde_json::Value::Null } else { json!(taints) };
            nodes.patch(name, &params, &Patch::Merge(json!({"spec": {"taints": taints}}))).await?;
        }
        nodelifecycle::Action::Evict { namespace, name, node } => {
            tracing::info!(pod = %name, %namespace, %node, "evicting a pod from a node that is not ready");
            let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
            match pods.delete(name, &DeleteParams::default()).await {
                Err(kube::Error::Api(status)) if status.code == 404 => {}
                other => {
                    other?;
                }
            }
        }
    }
    Ok(())
}

/// The kinds the garbage collector watches (owners and dependents it can judge): the workload
/// kinds and what controllers make for them. ConfigMaps, Secrets and PVCs are left out for now:
/// the collector reflects whole objects, and those are many and large; with metadata-only
/// watches they can come in.
fn collected_kinds() -> Vec<kube::api::ApiResource> {
    use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
    use k8s_openapi::api::batch::v1::{CronJob, Job};
    use k8s_openapi::api::core::v1::{Endpoints, Service};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::ApiResource;
    vec![
        ApiResource::erase::<Pod>(&()),
        ApiResource::erase::<ReplicaSet>(&()),
        ApiResource::erase::<Deployment>(&()),
        ApiResource::erase::<DaemonSet>(&()),
        ApiResource::erase::<StatefulSet>(&()),
        ApiResource::erase::<Job>(&()),
        ApiResource::erase::<CronJob>(&()),
        ApiResource::erase::<Service>(&()),
        ApiResource::erase::<Endpoints>(&()),
        ApiResource::erase::<EndpointSlice>(&()),
    ]
}

/// The garbage collector: deletes dependents whose owners are gone (after looking the owner
/// up, so a dependent seen before its new owner is safe), and carries out foreground deletion
/// and orphaning.
pub async fn run_garbage_collector(client: kube::Client) -> anyhow::Result<()> {
    use kube::api::DynamicObject;
    let kinds = collected_kinds();
    let changed = Arc::new(Notify::new());
    let mut stores = Vec::new();
    for kind in &kinds {
        stores.push(reflect_with(Api::<DynamicObject>::all_with(client.clone(), kind), kind.clone(), &changed));
    }
    for store in &stores {
        store.wait_until_ready().await?;
    }
    tracing::info!("garbage collector started");
    let kind_of = |reference: &OwnerReference| {
        let group = reference.api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        kinds.iter().position(|k| k.kind == reference.kind && k.group == group)
    };
    loop {
        let mut objects = Vec::new();
        for (index, store) in stores.iter().enumerate() {
            for object in store.state() {
                let meta = &object.metadata;
                objects.push(gc::Object {
                    kind: index,
                    namespace: meta.namespace.clone().unwrap_or_default(),
                    name: meta.name.clone().unwrap_or_default(),
                    uid: meta.uid.clone().unwrap_or_default(),
                    owners: meta.owner_references.clone().unwrap_or_default(),
                    deleting: meta.deletion_timestamp.is_some(),
                    finalizers: meta.finalizers.clone().unwrap_or_default(),
                });
            }
        }
        let actions = gc::plan(&objects, |o| kind_of(o).is_some());
        let (client, kinds, kind_of) = (&client, &kinds, &kind_of);
        futures::stream::iter(actions)
            .for_each_concurrent(PARALLEL, |action| async move {
                if let Err(error) = collect(client, kinds, kind_of, &action).await {
                    tracing::debug!(%error, ?action, "garbage collection failed");
                }
            })
            .await;
        wait(&changed).await;
    }
}

async fn collect(
    client: &kube::Client,
    kinds: &[kube::api::ApiResource],
    kind_of: &impl Fn(&OwnerReference) -> Option<usize>,
    action: &gc::Action,
) -> kube::Result<()> {
    use kube::api::DynamicObject;
    let api = |object: &gc::Object| {
        let kind = &kinds[object.kind];
        if object.namespace.is_empty() {
            Api::<DynamicObject>::all_with(client.clone(), kind)
        } else {
            Api::<DynamicObject>::namespaced_with(client.clone(), &object.namespace, kind)
        }
    };
    let delete = |object: &gc::Object, foreground: bool| {
        let mut params = if foreground { DeleteParams::foreground() } else { DeleteParams::background() };
        params.preconditions = Some(kube::api::Preconditions { uid: Some(object.uid.clone()), resource_version: None });
        let api = api(object);
        let name = object.name.clone();
        async move {
            match api.delete(&name, &params).await {
                Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
                other => other.map(|_| ()),
            }
        }
    };
    match action {
        gc::Action::DeleteOrphaned { dependent, owners } => {
            // Only if every owner is really gone (or replaced by another object of its name).
            for owner in owners {
                let Some(index) = kind_of(owner) else { return Ok(()) };
                let owner_api = if dependent.namespace.is_empty() {
                    Api::<DynamicObject>::all_with(client.clone(), &kinds[index])
                } else {
                    Api::<DynamicObject>::namespaced_with(client.clone(), &dependent.namespace, &kinds[index])
                };
                if let Some(found) = owner_api.get_opt(&owner.name).await?
                    && found.metadata.uid.as_deref() == Some(owner.uid.as_str())
                {
                    return Ok(());
                }
            }
            delete(dependent, false).await
        }
        gc::Action::DeleteDependent { dependent } => delete(dependent, true).await,
        gc::Action::SetOwners { dependent, keep } => {
            let owners = if keep.is_empty() { serde_json::Value::Null } else { json!(keep) };
            let patch = json!({"metadata": {"ownerReferences": owners}});
            api(dependent).patch(&dependent.name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
        }
        gc::Action::RemoveFinalizer { owner, finalizer } => {
            let left: Vec<&String> = owner.finalizers.iter().filter(|f| f != finalizer).collect();
            let patch = json!({"metadata": {"finalizers": left}});
            match api(owner).patch(&owner.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                other => other.map(|_| ()),
            }
        }
    }
}

/// The Deployment controller.
pub async fn run_deployments(client: kube::Client) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let deployments = reflect(Api::<Deployment>::all(client.clone()), &changed);
    let sets = reflect(Api::<ReplicaSet>::all(client.clone()), &changed);
    deployments.wait_until_ready().await?;
    sets.wait_until_ready().await?;
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
        let now = k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(k8s_openapi::jiff::Timestamp::now());
        let mut work = Vec::new();
        for d in deployments.state() {
            if d.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let owned = by_owner.get(d.metadata.uid.as_deref().unwrap_or_default()).cloned().unwrap_or_default();
            let plan = deployment::plan(&d, &owned, now.clone());
            work.push((d, plan));
        }
        let client = &client;
        futures::stream::iter(work)
            .for_each_concurrent(PARALLEL, |(d, plan)| async move { apply_deployment(client, &d, plan).await })
            .await;
        wait(&changed).await;
    }
}

async fn apply_deployment(client: &kube::Client, d: &Deployment, plan: deployment::Plan) {
    let namespace = d.metadata.namespace.as_deref().unwrap_or("default");
    let name = d.metadata.name.as_deref().unwrap_or_default();
    let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), namespace);
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let params = PatchParams::default();
    for action in plan.actions {
        let result = match &action {
            deployment::Action::Create(rs) => match sets.create(&PostParams::default(), rs).await {
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
                other => other.map(|_| ()),
            },
            deployment::Action::Scale { name, replicas } => {
                let patch = json!({"spec": {"replicas": replicas}});
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
        if let Err(error) = result {
            tracing::debug!(%error, deployment = name, ?action, "deployment action failed");
        }
    }
    if d.status.as_ref() != Some(&plan.status) {
        let patch = json!({"status": plan.status});
        if let Err(error) = deployments.patch_status(name, &params, &Patch::Merge(&patch)).await {
            tracing::debug!(%error, deployment = name, "could not update the status");
        }
    }
}

/// The ReplicaSet controller.
pub async fn run_replicasets(client: kube::Client) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let sets = reflect(Api::<ReplicaSet>::all(client.clone()), &changed);
    let pods = reflect(Api::<Pod>::all(client.clone()), &changed);
    sets.wait_until_ready().await?;
    pods.wait_until_ready().await?;
    tracing::info!("replicaset controller started");
    // Pods created per ReplicaSet uid that the pod watch has not shown yet: (names, when).
    let mut in_flight: HashMap<String, (Vec<String>, std::time::Instant)> = HashMap::new();
    loop {
        let all_pods = pods.state();
        let mut by_namespace: HashMap<&str, Vec<Arc<Pod>>> = HashMap::new();
        for pod in &all_pods {
            by_namespace.entry(pod.metadata.namespace.as_deref().unwrap_or_default()).or_default().push(pod.clone());
        }
        let seen: std::collections::HashSet<&str> =
            all_pods.iter().filter_map(|p| p.metadata.name.as_deref()).collect();
        let sets_now = sets.state();
        // Forget creations that have shown up, or that never will (a minute on).
        in_flight.retain(|_, (names, since)| {
            names.retain(|n| !seen.contains(n.as_str()));
            !names.is_empty() && since.elapsed() < Duration::from_secs(60)
        });
        let now = k8s_openapi::jiff::Timestamp::now();
        let mut work = Vec::new();
        for set in &sets_now {
            let namespace = set.metadata.namespace.as_deref().unwrap_or_default();
            let uid = set.metadata.uid.clone().unwrap_or_default();
            let pending = in_flight.get(&uid).map(|(n, _)| n.len()).unwrap_or(0);
            let empty = Vec::new();
            let plan = replicaset::plan(set, by_namespace.get(namespace).unwrap_or(&empty), pending, now);
            work.push((set.clone(), plan));
        }
        let client = &client;
        let created: Vec<(String, Vec<String>)> = futures::stream::iter(work)
            .map(|(set, plan)| async move {
                (set.metadata.uid.clone().unwrap_or_default(), apply(client, &set, plan).await)
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        for (uid, names) in created {
            if !names.is_empty() {
                let entry = in_flight.entry(uid).or_insert_with(|| (Vec::new(), std::time::Instant::now()));
                entry.0.extend(names);
            }
        }
        wait(&changed).await;
    }
}

fn owner_reference(set: &ReplicaSet) -> OwnerReference {
    OwnerReference {
        api_version: "apps/v1".into(),
        kind: "ReplicaSet".into(),
        name: set.metadata.name.clone().unwrap_or_default(),
        uid: set.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    }
}

/// Carries out a plan; returns the names of the pods it created.
async fn apply(client: &kube::Client, set: &ReplicaSet, plan: replicaset::Plan) -> Vec<String> {
    let namespace = set.metadata.namespace.as_deref().unwrap_or("default");
    let name = set.metadata.name.as_deref().unwrap_or_default();
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
    if plan.create > 0 {
        let template = set.spec.as_ref().and_then(|s| s.template.clone()).unwrap_or_default();
        let metadata = template.metadata.unwrap_or_default();
        let results: Vec<Option<String>> = futures::stream::iter(0..plan.create)
            .map(|_| {
                let pod = Pod {
                    metadata: ObjectMeta {
                        generate_name: Some(format!("{name}-")),
                        namespace: Some(namespace.into()),
                        labels: metadata.labels.clone(),
                        annotations: metadata.annotations.clone(),
                        owner_references: Some(vec![owner.clone()]),
                        ..Default::default()
                    },
                    spec: template.spec.clone(),
                    status: None,
                };
                let pods = pods.clone();
                async move {
                    match pods.create(&PostParams::default(), &pod).await {
                        Ok(pod) => pod.metadata.name,
                        Err(error) => {
                            tracing::debug!(%error, replicaset = name, "could not create a pod");
                            None
                        }
                    }
                }
            })
            .buffer_unordered(PARALLEL)
            .collect()
            .await;
        created = results.into_iter().flatten().collect();
    }
    for victim in &plan.delete {
        if let Err(error) = pods.delete(victim, &DeleteParams::default()).await {
            tracing::debug!(%error, pod = victim, "could not delete");
        }
    }
    let current = set.status.clone().unwrap_or_default();
    if current != plan.status {
        let sets: Api<ReplicaSet> = Api::namespaced(client.clone(), namespace);
        let patch = json!({"status": plan.status});
        if let Err(error) = sets.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
            tracing::debug!(%error, replicaset = name, "could not update the status");
        }
    }
    created
}
