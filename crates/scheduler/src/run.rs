//! The scheduler's loop: watches of pods and nodes (kube-rs) feed the cache (`cache.rs`), and
//! a scheduling pass runs shortly after each burst of changes. A pass tries the queued pods in
//! order with `plan::schedule_from` against the cache's nodes; each pod placed is assumed on its
//! node at once (so one pass does not overfill a node) and bound in the background. Pods that
//! fit nowhere get PodScheduled=False/Unschedulable and a FailedScheduling event, once per
//! message; they are tried again on the next change of any pod or node, never in a busy loop.

use std::collections::HashMap;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{
    Binding, Node, NodeSelectorTerm, ObjectReference, PersistentVolume, PersistentVolumeClaim, Pod,
};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use tugboat_objects::informer::{self, Informers};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use serde_json::json;
use tokio::time::Instant;

use crate::cache::Cache;
pub use crate::cache::SCHEDULER_NAME;
use crate::plan::{self, Decision};

/// How long a pass waits after a change for the changes that come with it.
const COALESCE: std::time::Duration = std::time::Duration::from_millis(20);
/// Bindings in flight at once.
const PARALLEL_BINDINGS: usize = 32;
/// How long a pod that preempted waits for its victims before it may preempt again.
const PREEMPTION_PAUSE: std::time::Duration = std::time::Duration::from_secs(15);

/// One event of the watches.
enum Change {
    Pod(informer::Change<Pod>),
    Node(informer::Change<Node>),
    Budget(informer::Change<PodDisruptionBudget>),
    Claim(informer::Change<PersistentVolumeClaim>),
    Volume(informer::Change<PersistentVolume>),
}

/// Runs the scheduler until the client's server goes away for good.
pub async fn run(client: kube::Client) -> anyhow::Result<()> {
    run_with(client.clone(), Arc::new(Informers::new(client))).await
}

/// [`run`] with pods and nodes from `informers`, which may be shared with other components of
/// the process (in `tugboat server`, the controller manager's: one decoded copy of each pod).
pub async fn run_with(client: kube::Client, informers: Arc<Informers>) -> anyhow::Result<()> {
    let pods = changes(informers.of::<Pod>()).map(Change::Pod);
    let nodes = changes(informers.of::<Node>()).map(Change::Node);
    let budgets = changes(informers.of::<PodDisruptionBudget>()).map(Change::Budget);
    let claims = changes(informers.of::<PersistentVolumeClaim>()).map(Change::Claim);
    let volumes = changes(informers.of::<PersistentVolume>()).map(Change::Volume);
    let mut changes =
        futures::stream::select_all([pods.boxed(), nodes.boxed(), budgets.boxed(), claims.boxed(), volumes.boxed()]);
    let (failed_sender, mut failed) = tokio::sync::mpsc::unbounded_channel();
    let mut scheduler = Scheduler {
        client,
        cache: Cache::default(),
        relisted_pods: None,
        relisted_nodes: None,
        listed: (false, false),
        budgets: HashMap::new(),
        relisted_budgets: None,
        claims: HashMap::new(),
        volume_terms: HashMap::new(),
        reported: HashMap::new(),
        next_start: 0,
        preempted: HashMap::new(),
        permits: Arc::new(tokio::sync::Semaphore::new(PARALLEL_BINDINGS)),
        failed: failed_sender,
    };
    // When the next pass is due: a while after the first change since the last one — at least
    // as long as the last pass took, so that under load passes grow larger rather than more
    // frequent.
    let mut due: Option<Instant> = None;
    let mut took = std::time::Duration::ZERO;
    loop {
        tokio::select! {
            change = changes.next() => {
                match change {
                    Some(change) => scheduler.apply(change),
                    None => anyhow::bail!("the scheduler's watches ended"),
                }
                due.get_or_insert_with(|| Instant::now() + COALESCE.max(took));
            }
            Some(uid) = failed.recv() => {
                scheduler.cache.forget(&uid);
                due.get_or_insert_with(|| Instant::now() + COALESCE);
            }
            () = tokio::time::sleep_until(due.unwrap_or_else(Instant::now)), if due.is_some() && scheduler.ready() => {
                due = None;
                let started = Instant::now();
                scheduler.pass();
                took = started.elapsed();
            }
        }
    }
}

struct Scheduler {
    client: kube::Client,
    cache: Cache,
    /// Objects of a relist in progress (kept until it is complete).
    relisted_pods: Option<Vec<Arc<Pod>>>,
    relisted_nodes: Option<Vec<Arc<Node>>>,
    /// Whether pods and nodes have been listed once.
    listed: (bool, bool),
    /// PodDisruptionBudgets by namespace/name (preemption spares what they protect).
    budgets: HashMap<String, plan::Budget>,
    relisted_budgets: Option<HashMap<String, plan::Budget>>,
    /// Claims (namespace/name) → the volume they are bound to.
    claims: HashMap<String, String>,
    /// Volumes → their required node affinity (where a pod using them must run).
    volume_terms: HashMap<String, Vec<NodeSelectorTerm>>,
    /// The last Unschedulable message reported per pod uid.
    reported: HashMap<String, String>,
    /// Where the next pod starts looking at nodes.
    next_start: usize,
    /// Pods that preempted others, and when (they wait for their victims to go).
    preempted: HashMap<String, std::time::Instant>,
    /// Bindings in flight at once.
    permits: Arc<tokio::sync::Semaphore>,
    /// Pods whose binding failed (uids), to forget as assumed.
    failed: tokio::sync::mpsc::UnboundedSender<String>,
}

/// Every change of a shared kind, as a stream.
fn changes<K: kube::Resource>(shared: informer::Shared<K>) -> impl futures::Stream<Item = informer::Change<K>> {
    let mut receiver = shared.subscribe();
    futures::stream::poll_fn(move |cx| receiver.poll_recv(cx))
}

fn budget_key(budget: &PodDisruptionBudget) -> String {
    format!(
        "{}/{}",
        budget.metadata.namespace.as_deref().unwrap_or_default(),
        budget.metadata.name.as_deref().unwrap_or_default()
    )
}

fn claim_key(namespace: Option<&str>, name: Option<&str>) -> String {
    format!("{}/{}", namespace.unwrap_or("default"), name.unwrap_or_default())
}

/// Node selector terms that hold where both hold (terms are ORed, their expressions ANDed).
fn and_terms(a: &[NodeSelectorTerm], b: &[NodeSelectorTerm]) -> Vec<NodeSelectorTerm> {
    let mut out = Vec::new();
    for x in a {
        for y in b {
            let mut term = x.clone();
            term.match_expressions.get_or_insert_default().extend(y.match_expressions.iter().flatten().cloned());
            term.match_fields.get_or_insert_default().extend(y.match_fields.iter().flatten().cloned());
            out.push(term);
        }
    }
    out
}

fn uid_of(pod: &Pod) -> &str {
    pod.metadata.uid.as_deref().unwrap_or_default()
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

impl Scheduler {
    /// The pod as the filters should see it: its required node affinity ANDed with that of
    /// the volumes its claims are bound to (None when it has none).
    fn with_volume_affinity(&self, pod: &Arc<Pod>) -> Option<Arc<Pod>> {
        let spec = pod.spec.as_ref()?;
        let namespace = pod.metadata.namespace.as_deref();
        let mut terms: Option<Vec<NodeSelectorTerm>> = None;
        for volume in spec.volumes.iter().flatten() {
            let Some(claim) = &volume.persistent_volume_claim else { continue };
            let Some(bound) = self.claims.get(&claim_key(namespace, Some(&claim.claim_name))) else { continue };
            let Some(required) = self.volume_terms.get(bound) else { continue };
            terms = Some(match terms {
                Some(so_far) => and_terms(&so_far, required),
                None => required.clone(),
            });
        }
        let terms = terms?;
        let mut placed = (**pod).clone();
        let affinity = placed.spec.get_or_insert_default().affinity.get_or_insert_default();
        let node_affinity = affinity.node_affinity.get_or_insert_default();
        let required = node_affinity.required_during_scheduling_ignored_during_execution.get_or_insert_default();
        required.node_selector_terms = if required.node_selector_terms.is_empty() {
            terms
        } else {
            and_terms(&required.node_selector_terms, &terms)
        };
        Some(Arc::new(placed))
    }

    fn ready(&self) -> bool {
        self.listed == (true, true)
    }

    fn apply(&mut self, change: Change) {
        use watcher::Event;
        match change {
            Change::Pod(Event::Apply(pod)) => self.cache.apply_pod(pod),
            Change::Pod(Event::Delete(pod)) => self.cache.delete_pod(uid_of(&pod)),
            Change::Pod(Event::Init) => self.relisted_pods = Some(Vec::new()),
            Change::Pod(Event::InitApply(pod)) => self.relisted_pods.get_or_insert_default().push(pod),
            Change::Pod(Event::InitDone) => {
                self.cache.replace_pods(self.relisted_pods.take().unwrap_or_default());
                self.listed.0 = true;
            }
            Change::Node(Event::Apply(node)) => self.cache.apply_node(node),
            Change::Node(Event::Delete(node)) => {
                self.cache.delete_node(node.metadata.name.as_deref().unwrap_or_default())
            }
            Change::Node(Event::Init) => self.relisted_nodes = Some(Vec::new()),
            Change::Node(Event::InitApply(node)) => self.relisted_nodes.get_or_insert_default().push(node),
            Change::Node(Event::InitDone) => {
                self.cache.replace_nodes(self.relisted_nodes.take().unwrap_or_default());
                self.listed.1 = true;
            }
            Change::Budget(Event::Apply(budget)) => {
                self.budgets.insert(budget_key(&budget), plan::Budget::of(&budget));
            }
            Change::Budget(Event::Delete(budget)) => {
                self.budgets.remove(&budget_key(&budget));
            }
            Change::Budget(Event::Init) => self.relisted_budgets = Some(HashMap::new()),
            Change::Claim(Event::Apply(claim) | Event::InitApply(claim)) => {
                let key = claim_key(claim.metadata.namespace.as_deref(), claim.metadata.name.as_deref());
                match claim.spec.as_ref().and_then(|s| s.volume_name.clone()) {
                    Some(volume) => self.claims.insert(key, volume),
                    None => self.claims.remove(&key),
                };
            }
            Change::Claim(Event::Delete(claim)) => {
                self.claims.remove(&claim_key(claim.metadata.namespace.as_deref(), claim.metadata.name.as_deref()));
            }
            Change::Volume(Event::Apply(volume) | Event::InitApply(volume)) => {
                let name = volume.metadata.name.clone().unwrap_or_default();
                let terms = volume
                    .spec
                    .as_ref()
                    .and_then(|s| s.node_affinity.as_ref())
                    .and_then(|a| a.required.as_ref())
                    .map(|r| r.node_selector_terms.clone())
                    .filter(|t| !t.is_empty());
                match terms {
                    Some(terms) => self.volume_terms.insert(name, terms),
                    None => self.volume_terms.remove(&name),
                };
            }
            Change::Volume(Event::Delete(volume)) => {
                self.volume_terms.remove(volume.metadata.name.as_deref().unwrap_or_default());
            }
            Change::Claim(Event::Init | Event::InitDone) | Change::Volume(Event::Init | Event::InitDone) => {}
            Change::Budget(Event::InitApply(budget)) => {
                self.relisted_budgets.get_or_insert_default().insert(budget_key(&budget), plan::Budget::of(&budget));
            }
            Change::Budget(Event::InitDone) => self.budgets = self.relisted_budgets.take().unwrap_or_default(),
        }
    }

    /// Tries every queued pod; binds, reports and preempts in the background.
    fn pass(&mut self) {
        let cache = &self.cache;
        self.reported.retain(|uid, _| cache.is_queued(uid));
        self.preempted.retain(|uid, _| cache.is_queued(uid));
        let mut bindings = Vec::new();
        let mut failures = Vec::new();
        let mut preemptions = Vec::new();
        // The disruption budgets, gathered once per pass and only if some pod may preempt.
        let mut budgets: Option<Vec<plan::Budget>> = None;
        let queue = self.cache.queue();
        // Pods waiting for the room their victims leave, and the node each was nominated to.
        let nominated: Vec<(Arc<Pod>, usize)> = queue
            .iter()
            .filter_map(|pod| {
                let node = pod.status.as_ref()?.nominated_node_name.as_deref()?;
                Some((pod.clone(), self.cache.node_index(node)?))
            })
            .collect();
        for pod in queue {
            // VolumeBinding: a pod goes where its bound volumes are.
            let placed = self.with_volume_affinity(&pod);
            let seen = plan::with_nominated(&pod, self.cache.nodes(), &nominated);
            let nodes = seen.as_deref().unwrap_or(self.cache.nodes());
            let (decision, next) = plan::schedule_from(placed.as_ref().unwrap_or(&pod), nodes, self.next_start);
            self.next_start = next;
            match decision {
                Decision::Bind(i) => {
                    let node = self.cache.assume(uid_of(&pod), i);
                    bindings.push((pod, node));
                }
                Decision::Unschedulable(message) => {
                    let may_preempt = pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0) > 0
                        && self.preempted.get(uid_of(&pod)).is_none_or(|at| at.elapsed() > PREEMPTION_PAUSE);
                    let budgets: &[plan::Budget] = if may_preempt {
                        budgets.get_or_insert_with(|| self.budgets.values().cloned().collect())
                    } else {
                        &[]
                    };
                    if may_preempt && let Some((i, victims)) = plan::preempt(&pod, self.cache.nodes(), budgets) {
                        self.preempted.insert(uid(&pod), std::time::Instant::now());
                        preemptions.push((pod.clone(), self.cache.nodes()[i].name().to_string(), victims));
                    }
                    if self.reported.get(uid_of(&pod)) != Some(&message) {
                        self.reported.insert(uid(&pod), message.clone());
                        failures.push((pod, message));
                    }
                }
            }
        }
        // Bindings go out in the background (at most PARALLEL_BINDINGS at once), so the next
        // pass need not wait for them: their pods count as assumed. A failed binding comes
        // back through `failed` and the pod is looked at again.
        for (pod, node) in bindings {
            let (client, permits, failed) = (self.client.clone(), self.permits.clone(), self.failed.clone());
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
                    }
                }
            });
        }
        if failures.is_empty() && preemptions.is_empty() {
            return;
        }
        let client = self.client.clone();
        tokio::spawn(async move {
            let client = &client;
            futures::stream::iter(failures)
                .for_each_concurrent(PARALLEL_BINDINGS, |(pod, message)| async move {
                    report_unschedulable(client, &pod, &message).await;
                })
                .await;
            for (pod, node, victims) in preemptions {
                preempt(client, &pod, &node, &victims).await;
            }
        });
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
/// victims (gracefully), each marked `DisruptionTarget` first and given a Preempted event.
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
        // As upstream, the victim learns why before it goes (the DisruptionTarget condition).
        let scheduler = pod.spec.as_ref().and_then(|s| s.scheduler_name.as_deref()).unwrap_or("default-scheduler");
        let condition = json!({"status": {"conditions": [{
            "type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler",
            "message": format!("{scheduler}: preempting to accommodate a higher priority pod"),
            "lastTransitionTime": Time(jiff::Timestamp::now()),
        }]}});
        if let Err(error) = api.patch_status(victim_name, &PatchParams::default(), &Patch::Strategic(condition)).await {
            tracing::debug!(%error, pod = victim_name, "could not mark a victim");
        }
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
    // Conditional on the version looked at: a pod bound meanwhile (by another scheduler, or a
    // client's pods/binding) must not be marked unschedulable afterwards. On a conflict the pod
    // is read again and, while still unbound, marked at its new version.
    let mut version = pod.metadata.resource_version.clone();
    for _ in 0..3 {
        let status = json!({
            "metadata": {"resourceVersion": version},
            "status": {"conditions": [{
                "type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": message,
                "lastProbeTime": null, "lastTransitionTime": now,
            }]},
        });
        match pods.patch_status(name, &PatchParams::default(), &Patch::Strategic(status)).await {
            Err(kube::Error::Api(status)) if status.code == 409 => match pods.get_opt(name).await {
                Ok(Some(current)) if current.spec.as_ref().is_some_and(|s| s.node_name.is_none()) => {
                    version = current.metadata.resource_version;
                }
                _ => return,
            },
            Err(error) => {
                tracing::debug!(%error, pod = name, "could not mark the pod unschedulable");
                break;
            }
            Ok(_) => break,
        }
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
    tugboat_objects::events::record(
        client,
        &tugboat_objects::events::reference(pod),
        kind,
        reason,
        message,
        action,
        SCHEDULER_NAME,
    )
    .await;
}
