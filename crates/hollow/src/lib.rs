//! Hollow nodes: many simulated nodes in one process, for testing and benchmarking the control
//! plane without containers (upstream's kubemark does the same). Each node registers itself,
//! renews its Lease in `kube-node-lease` (the heartbeat the node lifecycle controller watches),
//! reports its status now and then, and "runs" the pods bound to it: a pod becomes Running and
//! Ready with an IP at once, and a pod being deleted is finished at once (deleted with grace 0,
//! as a kubelet does when its containers have stopped). Pods that are not restarted
//! (`restartPolicy` Never or OnFailure: Jobs' pods) finish after `pod_exit_after`, Succeeded, or
//! Failed when their `hollow.tugboat.dev/exit-code` annotation says so. One pod watch serves
//! every node.
//!
//! It imports the kubelet (registration, status) and nothing of the control plane.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};

/// What the simulated nodes look like.
#[derive(Debug, Clone)]
pub struct HollowConfig {
    pub count: usize,
    /// Nodes are named `<prefix>-0`, `<prefix>-1`, ...
    pub name_prefix: String,
    pub cpu: String,
    pub memory: String,
    pub max_pods: u32,
    /// How often each node renews its Lease.
    pub lease_renew: Duration,
    /// How often each node reports its status (upstream: 5 minutes when Leases are used).
    pub status_report: Duration,
    /// How long a pod that is not restarted "runs" before it exits (None: forever).
    pub pod_exit_after: Option<Duration>,
    /// How long a deleted pod takes to stop (at most its grace period), as a real kubelet's
    /// containers take to exit on SIGTERM. Not zero by default: clients such as `kubectl
    /// delete` look for the pod just after deleting it and, were it gone and replaced by a
    /// controller's new pod of the same name within those milliseconds, would wait for ever.
    pub pod_stop_time: Duration,
}

/// The annotation that gives a hollow pod's exit code (default 0).
pub const EXIT_CODE: &str = "hollow.tugboat.dev/exit-code";

impl Default for HollowConfig {
    fn default() -> Self {
        HollowConfig {
            count: 1,
            name_prefix: "hollow".into(),
            cpu: "4".into(),
            memory: "16Gi".into(),
            max_pods: 110,
            lease_renew: Duration::from_secs(10),
            status_report: Duration::from_secs(300),
            pod_exit_after: Some(Duration::from_secs(1)),
            pod_stop_time: Duration::from_millis(200),
        }
    }
}

/// Status writes in flight at once.
const PARALLEL: usize = 32;

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

fn node_name(config: &HollowConfig, index: usize) -> String {
    format!("{}-{index}", config.name_prefix)
}

/// Node `index`'s address: 10.250.0.1 onwards.
fn host_ip(index: usize) -> String {
    let n = index + 1;
    format!("10.{}.{}.{}", 250 + n / 65536 % 5, n / 256 % 256, n % 256)
}

/// The `n`th pod address on node `index`: each node has its own /24 under 10.128.0.0/9.
fn pod_ip(index: usize, n: u32) -> String {
    format!("10.{}.{}.{}", 128 + index / 256 % 128, index % 256, n % 254 + 1)
}

/// A node's status as a kubelet reports it: resources, Ready, addresses, version.
fn node_status(config: &HollowConfig, index: usize) -> Value {
    let resources = json!({"cpu": config.cpu, "memory": config.memory, "pods": config.max_pods.to_string(),
                           "ephemeral-storage": "100Gi"});
    let now = now();
    let condition = |kind: &str, status: &str, reason: &str, message: &str| {
        json!({"type": kind, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
    };
    json!({
        "capacity": resources,
        "allocatable": resources,
        "conditions": [
            condition("MemoryPressure", "False", "KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
            condition("DiskPressure", "False", "KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
            condition("PIDPressure", "False", "KubeletHasSufficientPID", "kubelet has sufficient PID available"),
            condition("Ready", "True", "KubeletReady", "kubelet is posting ready status (hollow node)"),
        ],
        "addresses": [
            {"type": "InternalIP", "address": host_ip(index)},
            {"type": "Hostname", "address": node_name(config, index)},
        ],
        "nodeInfo": {
            "kubeletVersion": "v1.33.0-tugboat-hollow", "kubeProxyVersion": "", "containerRuntimeVersion": "hollow://0",
            "osImage": "Tugboat hollow node", "operatingSystem": "linux", "architecture": "amd64",
            "kernelVersion": "", "machineID": "", "systemUUID": "", "bootID": "",
        },
    })
}

/// Registers node `index` (or takes it over if it exists) and reports its status.
async fn register(client: &kube::Client, config: &HollowConfig, index: usize) -> kube::Result<()> {
    let name = node_name(config, index);
    let nodes: Api<Node> = Api::all(client.clone());
    let node: Node = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64",
            "tugboat.dev/hollow": "true"}},
    }))
    .expect("a valid node");
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {}
        Err(error) => return Err(error),
    }
    report_status(client, config, index).await
}

async fn report_status(client: &kube::Client, config: &HollowConfig, index: usize) -> kube::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let status = json!({"status": node_status(config, index)});
    nodes.patch_status(&node_name(config, index), &PatchParams::default(), &Patch::Merge(status)).await?;
    Ok(())
}

/// Renews (or creates) node `index`'s Lease, as the kubelet does.
async fn renew_lease(client: &kube::Client, config: &HollowConfig, index: usize) -> kube::Result<()> {
    tugboat_kubelet::renew_lease(client, &node_name(config, index)).await
}

/// A container's status in a hollow pod, in `state` (upstream's `running` or `terminated`).
fn container_status(
    pod: &Pod,
    container: &k8s_openapi::api::core::v1::Container,
    running: bool,
    state: Value,
) -> Value {
    let image = container.image.as_deref().unwrap_or_default();
    json!({"name": container.name, "image": image, "imageID": format!("hollow://{image}"),
           "containerID": format!("hollow://{}-{}", pod.metadata.uid.as_deref().unwrap_or_default(), container.name),
           "ready": running, "started": running, "restartCount": 0, "state": state})
}

/// The status of a pod that "runs": every container started and ready.
fn running_status(pod: &Pod, host_ip: &str, pod_ip: &str) -> Value {
    let now = now();
    let containers: Vec<Value> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| container_status(pod, c, true, json!({"running": {"startedAt": now}})))
        .collect();
    let condition =
        |kind: &str| json!({"type": kind, "status": "True", "lastProbeTime": null, "lastTransitionTime": now});
    json!({"status": {
        "phase": "Running",
        "conditions": [condition("PodReadyToStartContainers"), condition("Initialized"), condition("Ready"),
                       condition("ContainersReady"), condition("PodScheduled")],
        "hostIP": host_ip, "hostIPs": [{"ip": host_ip}],
        "podIP": pod_ip, "podIPs": [{"ip": pod_ip}],
        "startTime": now,
        "containerStatuses": containers,
    }})
}

/// Whether a pod's containers are restarted when they exit (so it never finishes).
fn restarts(pod: &Pod) -> bool {
    pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()).unwrap_or("Always") == "Always"
}

/// The status of a pod whose containers all exited with the code its annotation gives.
fn finished_status(pod: &Pod, started: &str) -> Value {
    let now = now();
    let code: i32 =
        pod.metadata.annotations.as_ref().and_then(|a| a.get(EXIT_CODE)).and_then(|c| c.parse().ok()).unwrap_or(0);
    let reason = if code == 0 { "Completed" } else { "Error" };
    let containers: Vec<Value> = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .map(|c| {
            let state =
                json!({"terminated": {"exitCode": code, "reason": reason, "startedAt": started, "finishedAt": now}});
            container_status(pod, c, false, state)
        })
        .collect();
    let condition = |kind: &str, status: &str, reason: Option<&str>| json!({"type": kind, "status": status, "reason": reason, "lastProbeTime": null, "lastTransitionTime": now});
    json!({"status": {
        "phase": if code == 0 { "Succeeded" } else { "Failed" },
        "conditions": [condition("PodReadyToStartContainers", "False", None), condition("Initialized", "True", Some("PodCompleted")),
                       condition("Ready", "False", Some("PodCompleted")), condition("ContainersReady", "False", Some("PodCompleted")),
                       condition("PodScheduled", "True", None)],
        "containerStatuses": containers,
    }})
}

/// What to do about a pod bound to one of our nodes.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    Run,
    Finish,
    Nothing,
}

fn action(pod: &Pod) -> Action {
    if pod.metadata.deletion_timestamp.is_some() {
        return Action::Finish;
    }
    match pod.status.as_ref().and_then(|s| s.phase.as_deref()) {
        Some("Running" | "Succeeded" | "Failed") => Action::Nothing,
        _ => Action::Run,
    }
}

/// Runs `config.count` hollow nodes until the process ends.
pub async fn run(client: kube::Client, config: HollowConfig) -> anyhow::Result<()> {
    let config = Arc::new(config);
    futures::stream::iter(0..config.count)
        .map(|index| {
            let (client, config) = (client.clone(), config.clone());
            async move {
                register(&client, &config, index).await?;
                renew_lease(&client, &config, index).await
            }
        })
        .buffer_unordered(PARALLEL)
        .try_collect::<Vec<_>>()
        .await?;
    tracing::info!(count = config.count, prefix = %config.name_prefix, "hollow nodes registered");

    // Heartbeats: every node's Lease each `lease_renew`, spread over the interval.
    let heartbeats = {
        let (client, config) = (client.clone(), config.clone());
        tokio::spawn(async move {
            let mut ticks: u64 = 0;
            let mut interval = tokio::time::interval(config.lease_renew);
            loop {
                interval.tick().await;
                ticks += 1;
                let report = config.status_report.as_secs() > 0
                    && ticks
                        .is_multiple_of((config.status_report.as_secs() / config.lease_renew.as_secs().max(1)).max(1));
                futures::stream::iter(0..config.count)
                    .for_each_concurrent(PARALLEL, |index| {
                        let (client, config) = (client.clone(), config.clone());
                        async move {
                            if let Err(error) = renew_lease(&client, &config, index).await {
                                tracing::debug!(%error, "lease renewal failed");
                            }
                            if report && let Err(error) = report_status(&client, &config, index).await {
                                tracing::debug!(%error, "status report failed");
                            }
                        }
                    })
                    .await;
            }
        })
    };

    // Pods: one watch for every node.
    let ours: HashMap<String, usize> = (0..config.count).map(|i| (node_name(&config, i), i)).collect();
    let ours = Arc::new(ours);
    let mut addresses: HashMap<usize, u32> = HashMap::new();
    let mut running: HashSet<String> = HashSet::new();
    // Pods being stopped (uids), so each is deleted once.
    let mut stopping: HashSet<String> = HashSet::new();
    let mut pods = watcher(Api::<Pod>::all(client.clone()), watcher::Config::default()).default_backoff().boxed();
    let result = loop {
        let pod = match pods.next().await {
            Some(Ok(watcher::Event::Apply(pod) | watcher::Event::InitApply(pod))) => pod,
            Some(Ok(watcher::Event::Delete(pod))) => {
                let uid = pod.metadata.uid.unwrap_or_default();
                running.remove(&uid);
                stopping.remove(&uid);
                continue;
            }
            Some(Ok(_)) => continue,
            Some(Err(error)) => {
                tracing::debug!(%error, "hollow pod watch");
                continue;
            }
            None => break Ok(()),
        };
        let Some(&index) = pod.spec.as_ref().and_then(|s| s.node_name.as_ref()).and_then(|n| ours.get(n)) else {
            continue;
        };
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let name = pod.metadata.name.clone().unwrap_or_default();
        let api: Api<Pod> = Api::namespaced(client.clone(), &namespace);
        match action(&pod) {
            Action::Run if !running.contains(&uid) => {
                running.insert(uid);
                let n = addresses.entry(index).or_insert(1);
                *n = n.wrapping_add(1);
                let status = running_status(&pod, &host_ip(index), &pod_ip(index, *n));
                let exit_after = config.pod_exit_after.filter(|_| !restarts(&pod));
                tokio::spawn(async move {
                    if let Err(error) = api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await {
                        tracing::debug!(%error, pod = name, "could not report the pod running");
                        return;
                    }
                    if let Some(after) = exit_after {
                        tokio::time::sleep(after).await;
                        let started = status["status"]["startTime"].as_str().unwrap_or_default();
                        let finished = finished_status(&pod, started);
                        if let Err(error) =
                            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(finished)).await
                        {
                            tracing::debug!(%error, pod = name, "could not report the pod finished");
                        }
                    }
                });
            }
            Action::Finish if !stopping.contains(&uid) => {
                running.remove(&uid);
                stopping.insert(uid.clone());
                let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(0).max(0);
                let stop_time = config.pod_stop_time.min(Duration::from_secs(grace.unsigned_abs()));
                tokio::spawn(async move {
                    tokio::time::sleep(stop_time).await;
                    let options = DeleteParams {
                        grace_period_seconds: Some(0),
                        preconditions: Some(Preconditions { uid: Some(uid), resource_version: None }),
                        ..DeleteParams::default()
                    };
                    if let Err(error) = api.delete(&name, &options).await {
                        tracing::debug!(%error, pod = name, "could not finish the pod");
                    }
                });
            }
            _ => {}
        }
    };
    heartbeats.abort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(value: Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn pods_run_once_and_finish_when_deleted() {
        assert_eq!(action(&pod(json!({"metadata": {"name": "p"}, "status": {"phase": "Pending"}}))), Action::Run);
        assert_eq!(action(&pod(json!({"metadata": {"name": "p"}}))), Action::Run);
        assert_eq!(action(&pod(json!({"metadata": {"name": "p"}, "status": {"phase": "Running"}}))), Action::Nothing);
        assert_eq!(
            action(&pod(json!({"metadata": {"name": "p", "deletionTimestamp": "2026-01-01T00:00:00Z"}}))),
            Action::Finish
        );
    }

    #[test]
    fn pods_that_are_not_restarted_finish_with_their_exit_code() {
        let always = pod(json!({"metadata": {"name": "p"}, "spec": {"containers": []}}));
        assert!(restarts(&always));
        let job = pod(json!({"metadata": {"name": "p", "uid": "u"},
                             "spec": {"restartPolicy": "Never", "containers": [{"name": "c", "image": "busybox"}]}}));
        assert!(!restarts(&job));
        let done = finished_status(&job, "2026-01-01T00:00:00Z");
        assert_eq!(done["status"]["phase"], "Succeeded");
        assert_eq!(done["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"], 0);
        let failing = pod(json!({"metadata": {"name": "p", "annotations": {EXIT_CODE: "3"}},
                                 "spec": {"restartPolicy": "OnFailure", "containers": [{"name": "c"}]}}));
        let failed = finished_status(&failing, "2026-01-01T00:00:00Z");
        assert_eq!(failed["status"]["phase"], "Failed");
        assert_eq!(failed["status"]["containerStatuses"][0]["state"]["terminated"]["reason"], "Error");
    }

    #[test]
    fn a_running_status_marks_every_container_ready() {
        let p = pod(json!({"metadata": {"name": "p", "uid": "u"}, "spec": {"containers": [
            {"name": "a", "image": "busybox"}, {"name": "b", "image": "nginx"}]}}));
        let status = running_status(&p, "10.250.0.1", "10.244.0.2");
        assert_eq!(status["status"]["phase"], "Running");
        assert_eq!(status["status"]["containerStatuses"].as_array().unwrap().len(), 2);
        assert!(
            status["status"]["conditions"]
                .as_array()
                .unwrap()
                .iter()
                .any(|c| c["type"] == "Ready" && c["status"] == "True")
        );
        assert_eq!(status["status"]["podIP"], "10.244.0.2");
        let config = HollowConfig { name_prefix: "h".into(), ..HollowConfig::default() };
        let node = node_status(&config, 300);
        assert_eq!(node["addresses"][0]["address"], "10.250.1.45");
        assert_ne!(pod_ip(0, 1), pod_ip(1, 1), "each node its own range");
        assert_eq!(pod_ip(300, 1), "10.129.44.2");
        assert_eq!(node["allocatable"]["cpu"], "4");
    }
}
