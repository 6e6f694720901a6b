//! The node controllers: lifecycle (heartbeats, taints, eviction), IPAM (a pod CIDR per
//! node) and pod garbage collection.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use serde_json::json;
use tokio::sync::Notify;

use super::{COALESCE, ControllerConfig, Hub, PARALLEL, delete_if_there, wait};
use crate::{nodeipam, nodelifecycle, podgc};

/// The node lifecycle controller: heartbeats, NotReady/unreachable taints, NoExecute eviction.
pub(super) async fn run_node_lifecycle(
    client: kube::Client,
    hub: Arc<Hub>,
    config: ControllerConfig,
) -> anyhow::Result<()> {
    // Heartbeats and pods change all the time in a big cluster; grace periods are seconds:
    // this controller looks once a second rather than on every change.
    let unused = Arc::new(Notify::new());
    let nodes = hub.watch::<Node>(&unused);
    let leases = hub.watch::<Lease>(&unused);
    let pods = hub.watch::<Pod>(&unused);
    nodes.wait_until_ready().await;
    leases.wait_until_ready().await;
    pods.wait_until_ready().await;
    tracing::info!("node lifecycle controller started");
    let grace = config.node_monitor_grace_period.as_secs() as i64;
    loop {
        let renewed: HashMap<String, jiff::Timestamp> = leases
            .state()
            .iter()
            .filter(|l| l.metadata.namespace.as_deref() == Some("kube-node-lease"))
            .filter_map(|l| Some((l.metadata.name.clone()?, l.spec.as_ref()?.renew_time.as_ref()?.0)))
            .collect();
        let all_pods = pods.state();
        let mut by_node: HashMap<&str, Vec<&Pod>> = HashMap::new();
        for pod in &all_pods {
            if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).filter(|n| !n.is_empty()) {
                by_node.entry(node).or_default().push(pod);
            }
        }
        let now = jiff::Timestamp::now();
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
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

async fn apply_node_action(client: &kube::Client, action: &nodelifecycle::Action, node: &Node) -> kube::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let params = PatchParams::default();
    match action {
        nodelifecycle::Action::MarkUnknown { node: name } => {
            let now = jiff::Timestamp::now().to_string();
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
            delete_if_there(&pods, name, &DeleteParams::default()).await?;
            let regarding = k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                ..Default::default()
            };
            let message = format!("Marking for deletion Pod {namespace}/{name}");
            tugboat_objects::events::record(
                client,
                &regarding,
                "Normal",
                "TaintManagerEviction",
                &message,
                "Evict",
                "taint-eviction-controller",
            )
            .await;
        }
    }
    Ok(())
}

/// Node IPAM: every node gets a pod CIDR from the cluster CIDR.
pub(super) async fn run_node_ipam(client: kube::Client, hub: Arc<Hub>, config: ControllerConfig) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let nodes = hub.watch::<Node>(&changed);
    nodes.wait_until_ready().await;
    tracing::info!(cluster_cidr = %config.cluster_cidr, "node ipam controller started");
    let api: Api<Node> = Api::all(client.clone());
    let mut reported: HashSet<String> = HashSet::new();
    loop {
        let (given, left) = nodeipam::plan(&nodes.state(), config.cluster_cidr, config.node_cidr_mask_size);
        for node in left {
            if reported.insert(node.clone()) {
                tracing::warn!(%node, cluster_cidr = %config.cluster_cidr, "no pod CIDR left for the node");
            }
        }
        futures::stream::iter(given)
            .for_each_concurrent(PARALLEL, |(node, cidr)| {
                let api = api.clone();
                async move {
                    let patch = json!({"spec": {"podCIDR": cidr.to_string(), "podCIDRs": [cidr.to_string()]}});
                    match api.patch(&node, &PatchParams::default(), &Patch::Merge(&patch)).await {
                        Ok(_) => tracing::info!(%node, %cidr, "pod CIDR assigned"),
                        Err(error) => tracing::debug!(%error, %node, "could not assign a pod CIDR"),
                    }
                }
            })
            .await;
        wait(&changed).await;
    }
}

/// Pod GC: deletes pods whose node is gone (after the node has been missing for the node
/// monitor grace period and a GET confirms it), pods being deleted that no node will finish,
/// and the oldest finished pods beyond the threshold.
pub(super) async fn run_pod_gc(client: kube::Client, hub: Arc<Hub>, config: ControllerConfig) -> anyhow::Result<()> {
    // Woken by node changes (a node deleted), not by every pod's; otherwise every 20 s as
    // upstream.
    let changed = Arc::new(Notify::new());
    let nodes = hub.watch::<Node>(&changed);
    let pods = hub.watch::<Pod>(&Arc::new(Notify::new()));
    nodes.wait_until_ready().await;
    pods.wait_until_ready().await;
    tracing::info!("pod garbage collector started");
    let node_api: Api<Node> = Api::all(client.clone());
    // Nodes seen missing, and since when (upstream's quarantine).
    let mut missing_since: HashMap<String, Instant> = HashMap::new();
    loop {
        let known: HashSet<String> = nodes.state().iter().filter_map(|n| n.metadata.name.clone()).collect();
        let victims = podgc::plan(&pods.state(), &known, podgc::TERMINATED_THRESHOLD);
        missing_since.retain(|node, _| !known.contains(node));
        let mut ready = Vec::new();
        let mut next_look: Option<Duration> = None;
        for victim in victims {
            if victim.reason == podgc::Reason::Orphaned {
                let since = *missing_since.entry(victim.node.clone()).or_insert_with(Instant::now);
                let waited = since.elapsed();
                if waited < config.node_monitor_grace_period {
                    let left = config.node_monitor_grace_period - waited;
                    next_look = Some(next_look.map_or(left, |l| l.min(left)));
                    continue;
                }
                if matches!(node_api.get_opt(&victim.node).await, Ok(Some(_)) | Err(_)) {
                    continue;
                }
            }
            ready.push(victim);
        }
        let client = &client;
        futures::stream::iter(ready)
            .for_each_concurrent(PARALLEL, |victim| async move {
                tracing::info!(pod = %victim.name, namespace = %victim.namespace, reason = ?victim.reason, "garbage-collecting a pod");
                let api: Api<Pod> = Api::namespaced(client.clone(), &victim.namespace);
                let params = DeleteParams {
                    grace_period_seconds: Some(0),
                    preconditions: Some(Preconditions { uid: Some(victim.uid.clone()), resource_version: None }),
                    ..DeleteParams::default()
                };
                if let Err(error) = delete_if_there(&api, &victim.name, &params).await {
                    tracing::debug!(%error, pod = %victim.name, "pod gc could not delete");
                }
            })
            .await;
        let sleep = next_look.map_or(Duration::from_secs(20), |l| l.min(Duration::from_secs(20)));
        let _ = tokio::time::timeout(sleep, changed.notified()).await;
        tokio::time::sleep(COALESCE).await;
    }
}
