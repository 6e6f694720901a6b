//! The scheduler's loop: reflectors of pods and nodes (kube-rs), and a scheduling pass each
//! time either changes. A pass takes every pending pod, decides with `plan::schedule` against
//! the nodes as the reflectors see them plus the pods this scheduler has bound but not yet seen
//! come back ("assumed", so one pass does not overfill a node), then binds in parallel. Pods
//! that fit nowhere get PodScheduled=False/Unschedulable and a FailedScheduling event, once per
//! message; they are tried again on the next change of any pod or node, never in a busy loop.

use std::collections::HashMap;
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Binding, Node, ObjectReference, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use serde_json::json;
use tokio::sync::Notify;

use crate::plan::{self, Decision, NodeInfo};

/// The `spec.schedulerName` this scheduler serves.
pub const SCHEDULER_NAME: &str = "default-scheduler";
/// How long a pass waits after a change for the changes that come with it.
const COALESCE: std::time::Duration = std::time::Duration::from_millis(20);
/// Bindings in flight at once.
const PARALLEL_BINDINGS: usize = 32;
/// How long a pod that preempted waits for its victims before it may preempt again.
const PREEMPTION_PAUSE: std::time::Duration = std::time::Duration::from_secs(15);

/// Runs the scheduler until the client's server goes away for good.
pub async fn run(client: kube::Client) -> anyhow::Result<()> {
    let (pods, pod_writer) = reflector::store::<Pod>();
    let (nodes, node_writer) = reflector::store::<Node>();
    let changed = Arc::new(Notify::new());
    let pod_events = reflector(pod_writer, watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    let node_events = reflector(node_writer, watcher(Api::<Node>::all(client.clone()), watcher::Config::default()))
        .default_backoff()
        .touched_objects();
    for events in [pod_events.map_ok(|_| ()).boxed(), node_events.map_ok(|_| ()).boxed()] {
        let changed = changed.clone();
        tokio::spawn(async move {
            let mut events = events;
            while let Some(event) = events.next().await {
                if let Err(error) = event {
                    tracing::debug!(%error, "scheduler watch");
                }
                changed.notify_one();
            }
        });
    }
    pods.wait_until_ready().await?;
    nodes.wait_until_ready().await?;
    tracing::info!("scheduler started");
    let mut scheduler = Scheduler {
        client,
        assumed: HashMap::new(),
        reported: HashMap::new(),
        next_start: 0,
        preempted: HashMap::new(),
        node_cache: HashMap::new(),
        pod_cache: HashMap::new(),
        permits: Arc::new(tokio::sync::Semaphore::new(PARALLEL_BINDINGS)),
        failed: tokio::sync::mpsc::unbounded_channel(),
    };
    loop {
        let started = std::time::Instant::now();
        scheduler.pass(&pods.state(), &nodes.state(), &changed).await;
        let took = started.elapsed();
        changed.notified().await;
        // Changes come in bursts (a deployment's pods, a node's heartbeat with many pods'):
        // one pass for the burst — at least as long as the last pass took, so that under load
        // passes grow larger rather than more frequent.
        tokio::time::sleep(COALESCE.max(took)).await;
    }
}

struct Scheduler {
    client: kube::Client,
    /// Pods bound by this scheduler that the reflector has not shown bound yet: uid → (node, pod).
    assumed: HashMap<String, (String, Arc<Pod>)>,
    /// The last Unschedulable message reported per pod uid.
    reported: HashMap<String, String>,
    /// Where the next pod starts looking at nodes.
    next_start: usize,
    /// Nodes as parsed, by name: (resourceVersion, info without pods).
    node_cache: HashMap<String, (String, NodeInfo)>,
    /// Pods' costs as parsed, by uid: (resourceVersion, cost).
    pod_cache: HashMap<String, (String, Arc<plan::PodCost>)>,
    /// Pods that preempted others, and when (they wait for their victims to go).
    preempted: HashMap<String, std::time::Instant>,
    /// Bindings in flight at once.
    permits: Arc<tokio::sync::Semaphore>,
    /// Pods whose binding failed (uids), to forget as assumed.
    failed: (tokio::sync::mpsc::UnboundedSender<String>, tokio::sync::mpsc::UnboundedReceiver<String>),
}

fn uid_of(pod: &Pod) -> &str {
    pod.metadata.uid.as_deref().unwrap_or_default()
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

fn is_pending(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    spec.is_some_and(|s| s.node_name.as_deref().is_none_or(str::is_empty))
        && spec.and_then(|s| s.scheduler_name.as_deref()).is_none_or(|n| n == SCHEDULER_NAME)
        && pod.metadata.deletion_timestamp.is_none()
        && !matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

impl Scheduler {
    async fn pass(&mut self, pods: &[Arc<Pod>], nodes: &[Arc<Node>], changed: &Arc<Notify>) {
        // Node infos from the nodes as parsed before (unless they changed), plus the pods'
        // costs as parsed before: a pass costs hash lookups, not quantity parsing.
        let version = |meta: &ObjectMeta| meta.resource_version.clone().unwrap_or_default();
        let same = |cached: &str, meta: &ObjectMeta| meta.resource_version.as_deref().unwrap_or_default() == cached;
        let mut infos: Vec<NodeInfo> = nodes
            .iter()
            .map(|n| {
                let name = n.metadata.name.as_deref().unwrap_or_default();
                match self.node_cache.get(name) {
                    Some((v, info)) if same(v, &n.metadata) => info.clone(),
                    _ => {
                        let info = NodeInfo::new(n.clone());
                        self.node_cache.insert(name.to_string(), (version(&n.metadata), info.clone()));
                        info
                    }
                }
            })
            .collect();
        if self.node_cache.len() > nodes.len() {
            let names: std::collections::HashSet<&str> =
                nodes.iter().filter_map(|n| n.metadata.name.as_deref()).collect();
            self.node_cache.retain(|name, _| names.contains(name.as_str()));
        }
        let index: HashMap<&str, usize> =
            nodes.iter().enumerate().map(|(i, n)| (n.metadata.name.as_deref().unwrap_or_default(), i)).collect();
        let mut by_uid: HashMap<&str, &Pod> = HashMap::with_capacity(pods.len());
        for pod in pods {
            by_uid.insert(uid_of(pod), &**pod);
            let node = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).filter(|n| !n.is_empty());
            if let Some(&i) = node.and_then(|n| index.get(n))
                && !is_terminal(pod)
            {
                let cost = match self.pod_cache.get(uid_of(pod)) {
                    Some((v, cost)) if same(v, &pod.metadata) => cost.clone(),
                    _ => {
                        let cost = Arc::new(plan::PodCost::of(pod));
                        self.pod_cache.insert(uid(pod), (version(&pod.metadata), cost.clone()));
                        cost
                    }
                };
                infos[i].add_pod_with(pod, &cost);
            }
        }
        if self.pod_cache.len() > pods.len() {
            self.pod_cache.retain(|uid, _| by_uid.contains_key(uid.as_str()));
        }
        while let Ok(uid) = self.failed.1.try_recv() {
            self.assumed.remove(&uid);
        }
        // Assumed pods count until the reflector shows them bound (or gone).
        self.assumed.retain(|uid, _| by_uid.get(uid.as_str()).is_some_and(|p| is_pending(p)));
        for (node, pod) in self.assumed.values() {
            if let Some(&i) = index.get(node.as_str()) {
                infos[i].add_pod(pod);
            }
        }
        self.reported.retain(|uid, _| by_uid.get(uid.as_str()).is_some_and(|p| is_pending(p)));
        self.preempted.retain(|uid, _| by_uid.get(uid.as_str()).is_some_and(|p| is_pending(p)));

        let mut pending: Vec<&Arc<Pod>> =
            pods.iter().filter(|p| is_pending(p) && !self.assumed.contains_key(uid_of(p))).collect();
        // Higher priority first, then older first.
        pending.sort_by_key(|p| {
            let priority = p.spec.as_ref().and_then(|s| s.priority).unwrap_or(0);
            (std::cmp::Reverse(priority), p.metadata.creation_timestamp.clone().map(|t| t.0))
        });
        let mut bindings = Vec::new();
        let mut failures = Vec::new();
        let mut preemptions = Vec::new();
        for pod in pending {
            let (decision, next) = plan::schedule_from(pod, &infos, self.next_start);
            self.next_start = next;
            match decision {
                Decision::Bind(i) => {
                    infos[i].add_pod(pod);
                    let node = infos[i].name().to_string();
                    self.assumed.insert(uid(pod), (node.clone(), pod.clone()));
                    bindings.push((pod.clone(), node));
                }
                Decision::Unschedulable(message) => {
                    let may_preempt = pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0) > 0
                        && self.preempted.get(uid_of(pod)).is_none_or(|at| at.elapsed() > PREEMPTION_PAUSE);
                    if may_preempt && let Some((i, victims)) = plan::preempt(pod, &infos) {
                        self.preempted.insert(uid(pod), std::time::Instant::now());
                        preemptions.push((pod.clone(), infos[i].name().to_string(), victims));
                    }
                    if self.reported.get(uid_of(pod)) != Some(&message) {
                        self.reported.insert(uid(pod), message.clone());
                        failures.push((pod.clone(), message));
                    }
                }
            }
        }
        // Bindings go out in the background (at most PARALLEL_BINDINGS at once), so the next
        // pass need not wait for them: its pods count them as assumed. A failed binding comes
        // back through `failed` and the pod is looked at again.
        for (pod, node) in bindings {
            let (client, permits, failed, changed) =
                (self.client.clone(), self.permits.clone(), self.failed.0.clone(), changed.clone());
            tokio::spawn(async move {
                let Ok(_permit) = permits.acquire_owned().await else { return };
                match bind(&client, &pod, &node).await {
                    Ok(()) => {
                        let message = format!(
                            "Successfully assigned {}/{} to {node}",
                            pod.metadata.namespace.as_deref().unwrap_or_default(),
                            pod.metadata.name.as_deref().unwrap_or_default()
                        );
                        record(&client, &pod, "Normal", "Scheduled", &message).await;
                    }
                    Err(error) => {
                        // Bound meanwhile, deleted, or the server is away.
                        tracing::debug!(%error, "binding failed");
                        let _ = failed.send(uid(&pod));
                        changed.notify_one();
                    }
                }
            });
        }
        let client = &self.client;
        futures::stream::iter(failures)
            .for_each_concurrent(PARALLEL_BINDINGS, |(pod, message)| async move {
                report_unschedulable(client, &pod, &message).await;
            })
            .await;
        for (pod, node, victims) in preemptions {
            preempt(client, &pod, &node, &victims).await;
        }
    }
}

async fn bind(client: &kube::Client, pod: &Pod, node: &str) -> Result<(), kube::Error> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let binding = Binding {
        metadata: ObjectMeta { name: Some(name.into()), uid: pod.metadata.uid.clone(), ..Default::default() },
        target: ObjectReference { kind: Some("Node".into()), name: Some(node.into()), ..Default::default() },
    };
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    pods.create_subresource::<_, serde_json::Value>("binding", name, &PostParams::default(), &binding).await?;
    Ok(())
}

/// Makes room for `pod` on `node`: nominates the node in the pod's status and deletes the
/// victims (gracefully), each with a Preempted event.
async fn preempt(client: &kube::Client, pod: &Pod, node: &str, victims: &[Arc<Pod>]) {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    tracing::info!(pod = name, namespace, node, victims = victims.len(), "preempting lower-priority pods");
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let status = json!({"status": {"nominatedNodeName": node}});
    if let Err(error) = pods.patch_status(name, &PatchParams::default(), &Patch::Merge(status)).await {
        tracing::debug!(%error, pod = name, "could not nominate a node");
    }
    for victim in victims {
        let victim_namespace = victim.metadata.namespace.as_deref().unwrap_or("default");
        let victim_name = victim.metadata.name.as_deref().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(client.clone(), victim_namespace);
        let params = kube::api::DeleteParams {
            preconditions: Some(kube::api::Preconditions { uid: victim.metadata.uid.clone(), resource_version: None }),
            ..Default::default()
        };
        match api.delete(victim_name, &params).await {
            Ok(_) => {
                let message =
                    format!("Preempted by pod {} on node {node}", pod.metadata.uid.as_deref().unwrap_or_default());
                record(client, victim, "Normal", "Preempted", &message).await;
            }
            Err(error) => tracing::debug!(%error, pod = victim_name, "could not preempt"),
        }
    }
}

async fn report_unschedulable(client: &kube::Client, pod: &Pod, message: &str) {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let now = Time(jiff::Timestamp::now());
    let status = json!({"status": {"conditions": [{
        "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
        "lastProbeTime": null, "lastTransitionTime": now,
    }]}});
    if let Err(error) = pods.patch_status(name, &PatchParams::default(), &Patch::Strategic(status)).await {
        tracing::debug!(%error, pod = name, "could not mark the pod unschedulable");
    }
    record(client, pod, "Warning", "FailedScheduling", message).await;
}

/// Posts a core Event about `pod`, as the scheduler (what `kubectl describe pod` lists).
async fn record(client: &kube::Client, pod: &Pod, kind: &str, reason: &str, message: &str) {
    let action = match reason {
        "Scheduled" => "Binding",
        "Preempted" => "Preempting",
        _ => "Scheduling",
    };
    crate::events::record(client, &crate::events::reference(pod), kind, reason, message, action, SCHEDULER_NAME).await;
}
