//! Running the pods bound to this node: one worker per pod, level-driven. Each sync compares
//! the pod's spec with what the runtime has (containers carry their pod's uid and their
//! attempt in labels), makes the sandbox, starts what should run (init containers first, in
//! order), restarts per restartPolicy with upstream's back-off (10 s doubling to 5 min), stops
//! with SIGTERM → grace period → SIGKILL, and reports the pod's status as upstream does.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Container as ContainerSpec, Node, Pod};
use kube::api::{Api, DeleteParams, Patch, PatchParams, Preconditions};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::{Value, json};
use tokio::sync::Notify;
use tugboat_runtime::images::ImageStore;
use tugboat_runtime::spec::{BindMount, ContainerConfig, Resources, SharedNamespaces};
use tugboat_runtime::{Container, Runtime, State};

use crate::probes::{self, Kind, ProbeState};
use crate::sandbox::{self, Ipam};
use tugboat_network::pod_network::PodNetwork;
use tugboat_objects::scheduling::{host_ports, host_ports_conflict};

pub const LABEL_POD_UID: &str = "io.kubernetes.pod.uid";
pub const LABEL_POD_NAME: &str = "io.kubernetes.pod.name";
pub const LABEL_POD_NAMESPACE: &str = "io.kubernetes.pod.namespace";
pub const LABEL_CONTAINER: &str = "io.kubernetes.container.name";
pub const LABEL_ATTEMPT: &str = "io.kubernetes.container.attempt";
pub const LABEL_INIT: &str = "io.kubernetes.container.init";

/// Upstream's crash back-off before the next start of a container that already restarted
/// `restarts` times: the first restart is at once, then 10 s, doubling, at most 5 min.
pub fn backoff(restarts: u32) -> Duration {
    match restarts {
        0 => Duration::ZERO,
        n => Duration::from_secs(10u64.saturating_mul(1u64 << (n - 1).min(5)).min(300)),
    }
}

/// How often a worker looks at its pod's containers without being told to.
const RESYNC: Duration = Duration::from_secs(1);

/// What every pod worker shares.
pub struct NodeAgent {
    pub client: kube::Client,
    pub name: String,
    pub ip: Option<IpAddr>,
    pub runtime: Arc<dyn Runtime>,
    pub images: Arc<ImageStore>,
    pub puller: tugboat_runtime::pull::Puller,
    pub pods_dir: PathBuf,
    pub log_dir: PathBuf,
    pub ipam: Ipam,
    pub network: Mutex<Option<PodNetwork>>,
    /// The network the node bridge was last made for.
    pub bridge: Mutex<Option<PodNetwork>>,
    /// Recent CPU readings, for usage rates.
    pub stats: crate::stats::Sampler,
    pub image_gc: crate::image_gc::ImageGc,
    /// Containers' logs rotate at this size, keeping this many files.
    pub log_rotation: (u64, u32),
    /// The cluster DNS pods' resolv.conf names.
    pub dns: ClusterDns,
}

/// The cluster DNS server and domain (`--cluster-dns`, `--cluster-domain`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterDns {
    pub server: IpAddr,
    pub domain: String,
}

/// A pod's `/etc/resolv.conf` as upstream's kubelet writes it: `dnsPolicy` ClusterFirst (the
/// default; the host's file for host-network pods) names the cluster DNS with the search path
/// `<ns>.svc.<domain> svc.<domain> <domain>` (then the host's) and `ndots:5`;
/// ClusterFirstWithHostNet the same for host-network pods too; Default the host's file; None
/// only `dnsConfig`, which is otherwise merged in (nameservers and searches appended, options
/// replaced by name).
pub fn resolv_conf(pod: &Pod, dns: &ClusterDns, host: &str) -> String {
    let spec = pod.spec.as_ref();
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let policy = spec.and_then(|s| s.dns_policy.as_deref()).unwrap_or("ClusterFirst");
    let mut nameservers: Vec<String> = Vec::new();
    let mut searches: Vec<String> = Vec::new();
    let mut options: Vec<(String, Option<String>)> = Vec::new();
    let host_lines = |key: &str| -> Vec<String> {
        host.lines()
            .filter_map(|l| l.trim().strip_prefix(key))
            .filter(|rest| rest.starts_with([' ', '\t']))
            .flat_map(|rest| rest.split_whitespace().map(str::to_string).collect::<Vec<_>>())
            .collect()
    };
    let cluster = match policy {
        "ClusterFirstWithHostNet" => true,
        "ClusterFirst" => !host_network,
        _ => false,
    };
    if cluster {
        nameservers.push(dns.server.to_string());
        let domain = &dns.domain;
        searches.extend([format!("{namespace}.svc.{domain}"), format!("svc.{domain}"), domain.clone()]);
        searches.extend(host_lines("search"));
        options.push(("ndots".into(), Some("5".into())));
    } else if policy != "None" {
        nameservers = host_lines("nameserver");
        searches = host_lines("search");
        for option in host_lines("options") {
            let (name, value) =
                option.split_once(':').map_or((option.clone(), None), |(n, v)| (n.into(), Some(v.into())));
            options.push((name, value));
        }
    }
    if let Some(config) = spec.and_then(|s| s.dns_config.as_ref()) {
        nameservers.extend(config.nameservers.iter().flatten().cloned());
        searches.extend(config.searches.iter().flatten().cloned());
        for option in config.options.iter().flatten() {
            let Some(name) = option.name.clone() else { continue };
            options.retain(|(n, _)| *n != name);
            options.push((name, option.value.clone()));
        }
    }
    let mut seen = std::collections::HashSet::new();
    nameservers.retain(|n| seen.insert(n.clone()));
    nameservers.truncate(3);
    let mut seen = std::collections::HashSet::new();
    searches.retain(|s| seen.insert(s.trim_end_matches('.').to_string()));
    searches.truncate(32);
    let mut text = String::new();
    for server in &nameservers {
        text.push_str(&format!("nameserver {server}\n"));
    }
    if !searches.is_empty() {
        text.push_str(&format!("search {}\n", searches.join(" ")));
    }
    if !options.is_empty() {
        let options: Vec<String> =
            options.iter().map(|(n, v)| v.as_ref().map_or(n.clone(), |v| format!("{n}:{v}"))).collect();
        text.push_str(&format!("options {}\n", options.join(" ")));
    }
    text
}

impl std::fmt::Debug for NodeAgent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeAgent").field("name", &self.name).field("ip", &self.ip).finish_non_exhaustive()
    }
}

pub type Shared = Arc<NodeAgent>;

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

fn uid(pod: &Pod) -> String {
    pod.metadata.uid.clone().unwrap_or_default()
}

fn restart_policy(pod: &Pod) -> &str {
    pod.spec.as_ref().and_then(|s| s.restart_policy.as_deref()).unwrap_or("Always")
}

/// The latest attempt of each container of a pod (and the one before, for `--previous`).
#[derive(Debug, Default, Clone)]
pub struct Attempts {
    pub latest: Option<Container>,
    pub previous: Option<Container>,
    /// Attempts older than `previous`: to remove.
    pub older: Vec<String>,
}

pub fn attempt(c: &Container) -> u32 {
    c.label(LABEL_ATTEMPT).and_then(|a| a.parse().ok()).unwrap_or(0)
}

/// Groups a pod's containers by name, newest attempt first.
pub fn by_name(containers: &[Container]) -> HashMap<String, Attempts> {
    let mut sorted: Vec<&Container> = containers.iter().collect();
    sorted.sort_by_key(|c| std::cmp::Reverse(attempt(c)));
    let mut map: HashMap<String, Attempts> = HashMap::new();
    for c in sorted {
        let entry = map.entry(c.label(LABEL_CONTAINER).unwrap_or_default().to_string()).or_default();
        if entry.latest.is_none() {
            entry.latest = Some(c.clone());
        } else if entry.previous.is_none() {
            entry.previous = Some(c.clone());
        } else {
            entry.older.push(c.id().to_string());
        }
    }
    map
}

/// What a worker remembers between syncs about one container.
#[derive(Debug, Clone, Default)]
struct Waiting {
    reason: String,
    message: String,
}

#[derive(Debug, Default)]
struct Worker {
    /// Why a container is not running now (CrashLoopBackOff, ErrImagePull, …).
    waiting: HashMap<String, Waiting>,
    last_status: Option<Value>,
    /// Events already recorded (reason, container, attempt) so each is posted once.
    recorded: std::collections::HashSet<(String, String, u32)>,
    started_at: Option<String>,
    /// Probe states per container instance (id) and kind.
    probes: HashMap<(String, Kind), ProbeState>,
    /// Failed pulls per image: how many in a row, and when the last one failed.
    pull_failures: HashMap<String, (u32, Instant)>,
    /// When the API-backed volumes were last brought up to date.
    volumes_refreshed: Option<Instant>,
}

impl Worker {
    /// (started, ready) of a running container instance, by its probes.
    fn probed(&self, c: &ContainerSpec, id: &str) -> (bool, bool) {
        let passed =
            |kind: Kind| kind.probe(c).is_none() || self.probes.get(&(id.to_string(), kind)).is_some_and(|s| s.ok);
        let started = passed(Kind::Startup);
        (started, started && passed(Kind::Readiness))
    }
}

/// The latest version of a worker's pod (`None`: deleted).
type Slot = Arc<Mutex<Option<Pod>>>;

/// Runs the pods of this node until the process ends.
pub async fn run(node: Shared) -> anyhow::Result<()> {
    let pods: Api<Pod> = Api::all(node.client.clone());
    let config = watcher::Config::default().fields(&format!("spec.nodeName={}", node.name));
    let mut events = watcher(pods, config).default_backoff().boxed();
    let mut workers: HashMap<String, (Arc<Notify>, Slot)> = HashMap::new();
    // Pods refused at admission: never run here.
    let mut rejected: std::collections::HashSet<String> = Default::default();
    let mut initial: Option<Vec<String>> = None;
    // The node's podCIDR, from the node object (assigned by the controller manager).
    tokio::spawn(watch_pod_cidr(node.clone()));
    while let Some(event) = events.next().await {
        let event = match event {
            Ok(event) => event,
            Err(error) => {
                tracing::warn!(%error, "pod watch");
                continue;
            }
        };
        let mut seen = Vec::new();
        match event {
            watcher::Event::Init => initial = Some(Vec::new()),
            watcher::Event::InitApply(pod) => {
                if let Some(list) = initial.as_mut() {
                    list.push(uid(&pod));
                }
                seen.push((pod, false));
            }
            watcher::Event::InitDone => {
                // After a (re)list: pods that are gone while we were not looking, and
                // containers of pods nobody knows.
                let known: Vec<String> = initial.take().unwrap_or_default();
                for (uid, (notify, slot)) in &workers {
                    if !known.contains(uid) {
                        *slot.lock().unwrap() = None;
                        notify.notify_one();
                    }
                }
                let orphans = node.runtime.list().await.unwrap_or_default();
                for c in orphans {
                    let owner = c.label(LABEL_POD_UID).unwrap_or_default().to_string();
                    if !known.contains(&owner) && !workers.contains_key(&owner) {
                        let slot = Arc::new(Mutex::new(None));
                        let notify = Arc::new(Notify::new());
                        workers.insert(owner.clone(), (notify.clone(), slot.clone()));
                        tokio::spawn(worker(node.clone(), owner, slot, notify));
                    }
                }
            }
            watcher::Event::Apply(pod) => seen.push((pod, false)),
            watcher::Event::Delete(pod) => seen.push((pod, true)),
        }
        for (pod, deleted) in seen {
            let uid = uid(&pod);
            if let Some((notify, slot)) = workers.get(&uid) {
                *slot.lock().unwrap() = (!deleted).then_some(pod);
                notify.notify_one();
                continue;
            }
            if deleted {
                rejected.remove(&uid);
                continue;
            }
            if rejected.contains(&uid) {
                continue;
            }
            if let Some((reason, message)) = admission_failure(&pod, &workers) {
                rejected.insert(uid);
                tokio::spawn(reject(node.clone(), pod, reason, message));
                continue;
            }
            let slot = Arc::new(Mutex::new(Some(pod)));
            let notify = Arc::new(Notify::new());
            workers.insert(uid.clone(), (notify.clone(), slot.clone()));
            tokio::spawn(worker(node.clone(), uid, slot, notify));
        }
        workers.retain(|_, (notify, _)| Arc::strong_count(notify) > 1);
    }
    Ok(())
}

/// Why the kubelet refuses a pod newly bound to it, as upstream's admission (the
/// GeneralPredicates' NodePorts): a host port another admitted pod of the node holds. Only
/// pods that never ran are judged (a restarted kubelet keeps what it ran).
fn admission_failure(pod: &Pod, workers: &HashMap<String, (Arc<Notify>, Slot)>) -> Option<(String, String)> {
    let status = pod.status.as_ref();
    let never_ran = status.and_then(|s| s.phase.as_deref()).is_none_or(|p| p == "Pending")
        && status.and_then(|s| s.container_statuses.as_ref()).is_none_or(|c| c.is_empty());
    let wanted = host_ports(pod);
    if !never_ran || wanted.is_empty() {
        return None;
    }
    let conflict = workers.values().any(|(_, slot)| {
        let Some(other) = slot.lock().unwrap().clone() else { return false };
        let active = other.metadata.deletion_timestamp.is_none()
            && !matches!(other.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"));
        active && host_ports_conflict(&wanted, &host_ports(&other))
    });
    conflict.then(|| {
        (
            "NodePorts".to_string(),
            "Predicate NodePorts failed: node(s) didn't have free ports for the requested pod ports".to_string(),
        )
    })
}

/// Refuses a pod, as upstream's kubelet does: Failed, with the reason, and a Warning event.
async fn reject(node: Shared, pod: Pod, reason: String, message: String) {
    tracing::info!(pod = pod.metadata.name.as_deref().unwrap_or_default(), %reason, "pod rejected at admission");
    event(&node, &pod, "Warning", &reason, &message).await;
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let api: Api<Pod> = Api::namespaced(node.client.clone(), namespace);
    let status = serde_json::json!({"status": {"phase": "Failed", "reason": reason, "message": format!("Pod was rejected: {message}"),
        "qosClass": pod.spec.as_ref().map(qos_class).unwrap_or("BestEffort")}});
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    if let Err(error) = api.patch_status(name, &PatchParams::default(), &Patch::Merge(&status)).await {
        tracing::warn!(%error, pod = name, "cannot report a rejected pod");
    }
}

async fn watch_pod_cidr(node: Shared) {
    let nodes: Api<Node> = Api::all(node.client.clone());
    // Asked often: pods wait (NetworkNotReady) until it is known, and the node IPAM
    // controller assigns it moments after the node registers.
    let mut pause = Duration::from_millis(50);
    loop {
        if let Ok(n) = nodes.get(&node.name).await {
            let cidr = n.spec.and_then(|s| s.pod_cidr).and_then(|c| PodNetwork::parse(&c));
            if cidr.is_some() {
                *node.network.lock().unwrap() = cidr;
                return;
            }
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// One pod's life on this node; ends when the pod is gone and everything of it removed.
async fn worker(node: Shared, uid: String, slot: Slot, notify: Arc<Notify>) {
    let mut state = Worker::default();
    loop {
        let pod = slot.lock().unwrap().clone();
        match sync(&node, &uid, pod.as_ref(), &mut state).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(error) => {
                let message = format!("{error:#}");
                tracing::warn!(pod = %uid, error = %message, "pod sync");
                // Said on the pod once per cause, as upstream's FailedSync / sandbox events.
                if let Some(pod) = pod.as_ref()
                    && state.recorded.insert(("FailedSync".into(), message.clone(), 0))
                {
                    event(&node, pod, "Warning", "FailedSync", &format!("error syncing pod: {message}")).await;
                }
            }
        }
        let _ = tokio::time::timeout(RESYNC, notify.notified()).await;
    }
}

fn pod_dir(node: &NodeAgent, uid: &str) -> PathBuf {
    node.pods_dir.join(uid)
}

async fn containers_of(node: &NodeAgent, uid: &str) -> anyhow::Result<Vec<Container>> {
    let prefix = format!("{uid}-");
    Ok(node.runtime.list_prefixed(&prefix).await?.into_iter().filter(|c| c.label(LABEL_POD_UID) == Some(uid)).collect())
}

/// Stops every running container of the pod: SIGTERM, then SIGKILL after `grace`.
async fn stop_all(node: &NodeAgent, containers: &[Container], grace: Duration) {
    let running: Vec<&Container> = containers.iter().filter(|c| c.state == State::Running).collect();
    if running.is_empty() {
        return;
    }
    for c in &running {
        let _ = node.runtime.signal(c.id(), 15).await;
    }
    let deadline = Instant::now() + grace;
    let ids: Vec<String> = running.iter().map(|c| c.id().to_string()).collect();
    loop {
        let alive: Vec<&String> = ids.iter().filter(|id| !node.runtime.has_exited(id)).collect();
        if alive.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            for id in alive {
                let _ = node.runtime.signal(id, 9).await;
            }
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The hook command of a handler, ready to run in the container (no stdin).
fn hook_exec(
    node: &NodeAgent,
    id: &str,
    handler: &k8s_openapi::api::core::v1::LifecycleHandler,
) -> Option<tokio::process::Command> {
    exec_action(node, id, handler.exec.as_ref()?)
}

/// An exec action (probe or hook) ready to run in the container, without stdin.
fn exec_action(
    node: &NodeAgent,
    id: &str,
    action: &k8s_openapi::api::core::v1::ExecAction,
) -> Option<tokio::process::Command> {
    let mut command = node.runtime.exec_command(id, action.command.as_deref().unwrap_or_default()).ok()?;
    command.stdin(std::process::Stdio::null());
    Some(command)
}

/// Runs the preStop hooks of the pod's running containers, all at once, within `grace`.
async fn pre_stop(node: &NodeAgent, pod: &Pod, containers: &[Container], grace: Duration) {
    let specs = pod.spec.as_ref().map(|s| s.containers.as_slice()).unwrap_or_default();
    let pod_ip = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse().ok());
    let hooks = containers.iter().filter(|c| c.state == State::Running).filter_map(|c| {
        let spec = specs.iter().find(|s| Some(s.name.as_str()) == c.label(LABEL_CONTAINER))?;
        let handler = spec.lifecycle.as_ref()?.pre_stop.as_ref()?;
        let exec = hook_exec(node, c.id(), handler);
        Some(async move { (spec, probes::hook(handler, spec, probes::Target { ip: pod_ip, exec }, grace).await) })
    });
    for (spec, result) in futures::future::join_all(hooks).await {
        if let Err(why) = result {
            let message = format!("PreStopHook failed for container {}: {why}", spec.name);
            event(node, pod, "Warning", "FailedPreStopHook", &message).await;
        }
    }
}

/// Removes everything of a pod from this node.
async fn tear_down(node: &NodeAgent, uid: &str, containers: &[Container]) {
    for c in containers {
        if let Err(error) = node.runtime.remove(c.id()).await {
            tracing::warn!(container = c.id(), %error, "removing a container");
        }
    }
    let dir = pod_dir(node, uid);
    unmount_volumes(&dir);
    sandbox::destroy(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    node.ipam.release(uid);
    tugboat_runtime::remove_cgroup(&pod_cgroup(&node.name, uid));
    tugboat_runtime::remove_cgroup(&format!("/tugboat/{}", node.name));
}

fn pod_cgroup(node: &str, uid: &str) -> String {
    format!("/tugboat/{node}/pod{uid}")
}

fn unmount_volumes(dir: &std::path::Path) {
    if let Ok(entries) = std::fs::read_dir(dir.join("volumes")) {
        for entry in entries.flatten() {
            let _ = nix::mount::umount2(&entry.path(), nix::mount::MntFlags::MNT_DETACH);
        }
    }
}

/// One look at a pod. Returns true when the worker is done (pod gone, everything removed).
async fn sync(node: &Shared, uid: &str, pod: Option<&Pod>, state: &mut Worker) -> anyhow::Result<bool> {
    let containers = containers_of(node, uid).await?;
    let Some(pod) = pod else {
        stop_all(node, &containers, Duration::from_secs(2)).await;
        tear_down(node, uid, &containers).await;
        return Ok(true);
    };
    let pods: Api<Pod> = Api::namespaced(node.client.clone(), pod.metadata.namespace.as_deref().unwrap_or("default"));
    let name = pod.metadata.name.clone().unwrap_or_default();
    if pod.metadata.deletion_timestamp.is_some() {
        let grace = pod.metadata.deletion_grace_period_seconds.unwrap_or(30).max(0) as u64;
        if containers.iter().any(|c| c.state == State::Running) {
            for c in containers.iter().filter(|c| c.state == State::Running) {
                let container = c.label(LABEL_CONTAINER).unwrap_or_default();
                event(node, pod, "Normal", "Killing", &format!("Stopping container {container}")).await;
            }
        }
        let deadline = Instant::now() + Duration::from_secs(grace);
        pre_stop(node, pod, &containers, Duration::from_secs(grace)).await;
        // Upstream grants at least 2 s between SIGTERM and SIGKILL after a preStop hook.
        let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_secs(grace.min(2)));
        stop_all(node, &containers, left).await;
        let containers = containers_of(node, uid).await?;
        tear_down(node, uid, &containers).await;
        let options = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions { uid: Some(uid.to_string()), resource_version: None }),
            ..DeleteParams::default()
        };
        match pods.delete(&name, &options).await {
            Ok(_) => {}
            Err(kube::Error::Api(s)) if s.code == 404 || s.code == 409 => {}
            Err(error) => return Err(error.into()),
        }
        return Ok(true);
    }
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    if phase == "Succeeded" || phase == "Failed" {
        // Finished: nothing runs; the containers stay (logs) until the pod goes.
        stop_all(node, &containers, Duration::from_secs(2)).await;
        return Ok(false);
    }
    let spec = pod.spec.clone().unwrap_or_default();
    let host_network = spec.host_network.unwrap_or(false);
    // The sandbox.
    let dir = pod_dir(node, uid);
    let hostname = pod_hostname(pod);
    // Made once; later syncs find it (no bridge check, no address lookup).
    let sandbox = match sandbox::Sandbox::load(&dir) {
        Some(sandbox) => sandbox,
        None => {
            let network = *node.network.lock().unwrap();
            let net = match (host_network, network) {
                (true, _) => None,
                (false, Some(n)) => Some((n, node.ipam.allocate(&n, uid)?)),
                (false, None) => {
                    state.waiting.insert(
                        String::new(),
                        Waiting { reason: "NetworkNotReady".into(), message: "the node has no podCIDR yet".into() },
                    );
                    report(node, pod, &containers, None, state).await?;
                    return Ok(false);
                }
            };
            // The bridge is checked once per network, not per pod (it costs `ip` processes).
            let bridge = net.map(|(n, _)| n).filter(|n| *node.bridge.lock().unwrap() != Some(*n));
            let (dir, uid, hostname) = (dir.clone(), uid.to_string(), hostname.clone());
            let made = tokio::task::spawn_blocking(move || {
                if let Some(n) = bridge {
                    sandbox::ensure_bridge(&n)?;
                }
                sandbox::create(&dir, &uid, &hostname, host_network, net.as_ref().map(|(n, ip)| (n, *ip)))
            })
            .await??;
            if bridge.is_some() {
                *node.bridge.lock().unwrap() = bridge;
            }
            made
        }
    };
    state.waiting.remove("");
    if state.started_at.is_none() {
        state.started_at =
            Some(pod.status.as_ref().and_then(|s| s.start_time.as_ref()).map(|t| t.0.to_string()).unwrap_or_else(now));
    }
    // activeDeadlineSeconds (which an update may set or shorten): a pod active on the node
    // longer fails, its containers stopped, as upstream's activeDeadlineHandler has it.
    let started = state.started_at.as_deref().and_then(|t| t.parse::<k8s_openapi::jiff::Timestamp>().ok());
    if let (Some(deadline), Some(started)) = (spec.active_deadline_seconds, started) {
        let active = k8s_openapi::jiff::Timestamp::now().duration_since(started).as_secs();
        if active >= deadline {
            let message = "Pod was active on the node longer than the specified deadline";
            event(node, pod, "Normal", "DeadlineExceeded", message).await;
            let grace = spec.termination_grace_period_seconds.unwrap_or(30).max(0) as u64;
            stop_all(node, &containers, Duration::from_secs(grace)).await;
            let status = json!({"status": {"phase": "Failed", "reason": "DeadlineExceeded", "message": message}});
            pods.patch_status(&name, &PatchParams::default(), &Patch::Merge(&status)).await?;
            return Ok(false);
        }
    }
    let pod_ip = sandbox.ip.map(IpAddr::V4).or(if host_network { node.ip } else { None });
    let host_resolv = std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default();
    let hosts = hosts_file(pod, &hostname, pod_ip, &node.dns.domain);
    write_etc_files(&dir, &hostname, &hosts, &resolv_conf(pod, &node.dns, &host_resolv))?;

    let attempts = by_name(&containers);
    for a in attempts.values() {
        for id in &a.older {
            let _ = node.runtime.remove(id).await;
        }
    }
    let policy = restart_policy(pod).to_string();
    // Init containers, in order: each must succeed before the next starts.
    let mut initialized = true;
    for c in spec.init_containers.iter().flatten() {
        let a = attempts.get(&c.name).cloned().unwrap_or_default();
        match a.latest.as_ref().map(|l| &l.state) {
            Some(State::Exited(e)) if e.exit_code == 0 => continue,
            Some(State::Running) | Some(State::Created) => {
                initialized = false;
                break;
            }
            Some(State::Exited(_)) if policy == "Never" => {
                initialized = false;
                break;
            }
            _ => {
                initialized = false;
                maybe_start(node, pod, c, &a, &sandbox, pod_ip, true, state).await;
                break;
            }
        }
    }
    if initialized {
        for c in &spec.containers {
            let a = attempts.get(&c.name).cloned().unwrap_or_default();
            let start = match a.latest.as_ref().map(|l| &l.state) {
                None => true,
                Some(State::Running) | Some(State::Created) => false,
                Some(State::Exited(e)) => policy == "Always" || (policy == "OnFailure" && e.exit_code != 0),
            };
            if start {
                maybe_start(node, pod, c, &a, &sandbox, pod_ip, false, state).await;
            }
        }
        // Ephemeral containers (`kubectl debug`) run once each, never restarted.
        for c in ephemeral_containers(&spec) {
            let a = attempts.get(&c.name).cloned().unwrap_or_default();
            if a.latest.is_none() {
                maybe_start(node, pod, &c, &a, &sandbox, pod_ip, false, state).await;
            }
        }
    }
    if state.volumes_refreshed.is_none_or(|at| at.elapsed() >= VOLUME_REFRESH) {
        state.volumes_refreshed = Some(Instant::now());
        refresh_volumes(node, pod, &dir).await;
    }
    let containers = containers_of(node, uid).await?;
    run_probes(node, pod, &spec.containers, &containers, pod_ip, state).await;
    report(node, pod, &containers, pod_ip, state).await?;
    Ok(false)
}

/// How often mounted configMap, secret, downwardAPI and projected volumes follow their sources.
const VOLUME_REFRESH: Duration = Duration::from_secs(10);

/// Rewrites the API-backed volumes already written for the pod's containers, so running
/// containers see configMap and secret updates (atomically, as upstream). A source that is
/// gone leaves the files as they were.
async fn refresh_volumes(node: &NodeAgent, pod: &Pod, dir: &std::path::Path) {
    for volume in pod.spec.as_ref().and_then(|s| s.volumes.as_ref()).into_iter().flatten() {
        let path = dir.join("volumes").join(&volume.name);
        if !path.join("..data").exists() {
            continue;
        }
        match crate::volumes::files(&node.client, pod, volume, Some(&path)).await {
            Ok(Some(files)) => {
                if let Err(error) = crate::volumes::write(&path, &files) {
                    tracing::warn!(volume = %volume.name, %error, "refreshing a volume");
                }
            }
            Ok(None) => {}
            Err(error) => tracing::debug!(volume = %volume.name, error = format!("{error:#}"), "not refreshed"),
        }
    }
}

/// When the container instance started, as an `Instant` (from its recorded start time).
fn started_instant(c: &Container) -> Instant {
    let now = Instant::now();
    let Some(started) = c.started.as_ref().and_then(|s| s.started_at.parse::<k8s_openapi::jiff::Timestamp>().ok())
    else {
        return now;
    };
    let ago = k8s_openapi::jiff::Timestamp::now().duration_since(started).as_secs().max(0) as u64;
    now.checked_sub(Duration::from_secs(ago)).unwrap_or(now)
}

/// Runs the probes that are due for the pod's running containers; a container that fails its
/// liveness or startup probe is stopped (then restarted by its restartPolicy).
async fn run_probes(
    node: &Shared,
    pod: &Pod,
    specs: &[ContainerSpec],
    containers: &[Container],
    pod_ip: Option<IpAddr>,
    state: &mut Worker,
) {
    let live: Vec<String> =
        containers.iter().filter(|c| c.state == State::Running).map(|c| c.id().to_string()).collect();
    state.probes.retain(|(id, _), _| live.contains(id));
    let attempts = by_name(containers);
    let now = Instant::now();
    let mut due = Vec::new();
    for spec in specs {
        let Some(latest) = attempts.get(&spec.name).and_then(|a| a.latest.clone()) else { continue };
        if latest.state != State::Running {
            continue;
        }
        let id = latest.id().to_string();
        let startup_passed =
            Kind::Startup.probe(spec).is_none() || state.probes.get(&(id.clone(), Kind::Startup)).is_some_and(|s| s.ok);
        for kind in [Kind::Startup, Kind::Liveness, Kind::Readiness] {
            let Some(probe) = kind.probe(spec) else { continue };
            if (kind == Kind::Startup) == startup_passed {
                continue;
            }
            let entry = state.probes.entry((id.clone(), kind)).or_insert_with(|| ProbeState::new(kind));
            if entry.due(probe, started_instant(&latest), now) {
                due.push((spec.clone(), id.clone(), kind, probe.clone()));
            }
        }
    }
    let results = futures::future::join_all(due.into_iter().map(|(spec, id, kind, probe)| {
        let exec = probe.exec.as_ref().and_then(|e| exec_action(node, &id, e));
        async move {
            let result = probes::run(&probe, &spec, probes::Target { ip: pod_ip, exec }).await;
            (spec, id, kind, probe, result)
        }
    }))
    .await;
    for (spec, id, kind, probe, result) in results {
        let Some(entry) = state.probes.get_mut(&(id.clone(), kind)) else { continue };
        let flipped = entry.record(&probe, result.is_ok(), Instant::now());
        if let Err(why) = &result {
            event(node, pod, "Warning", "Unhealthy", &format!("{} probe failed: {why}", kind.name())).await;
        }
        let failed_hard = flipped && !entry.ok && matches!(kind, Kind::Liveness | Kind::Startup);
        let startup_gave_up =
            kind == Kind::Startup && !entry.ok && entry.failures() >= probe.failure_threshold.unwrap_or(3).max(1);
        if failed_hard || startup_gave_up {
            let message =
                format!("Container {} failed {} probe, will be restarted", spec.name, kind.name().to_lowercase());
            event(node, pod, "Normal", "Killing", &message).await;
            state.probes.retain(|(probe_id, _), _| probe_id != &id);
            let grace = pod.spec.as_ref().and_then(|s| s.termination_grace_period_seconds).unwrap_or(30).max(0) as u64;
            let (node, victim) = (node.clone(), containers.iter().find(|c| c.id() == id).cloned());
            tokio::spawn(async move {
                if let Some(victim) = victim {
                    stop_all(&node, &[victim], Duration::from_secs(grace)).await;
                }
            });
        }
    }
}

/// A pod's hostname: `spec.hostname`, or its name, cut to the 63 characters a hostname may
/// have (and no `-` or `.` at the end), as upstream's kubelet does: pod names may be longer.
pub fn pod_hostname(pod: &Pod) -> String {
    let spec = pod.spec.as_ref();
    let hostname = spec
        .and_then(|s| s.hostname.clone())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| pod.metadata.name.clone().unwrap_or_default());
    if hostname.len() <= 63 {
        return hostname;
    }
    hostname[..63].trim_end_matches(['-', '.']).to_string()
}

/// A pod's `/etc/hosts` as upstream's kubelet writes it: loopback names, the pod's address with
/// its fully qualified name when it has a `subdomain` (`<hostname>.<subdomain>.<ns>.svc.<domain>`,
/// the name a headless Service of that name gives it), then its `hostAliases`.
/// A pod on the host's network gets the host's own file under a header of its own.
pub fn hosts_file(pod: &Pod, hostname: &str, ip: Option<IpAddr>, domain: &str) -> String {
    let spec = pod.spec.as_ref();
    let host_network = spec.and_then(|s| s.host_network).unwrap_or(false);
    let mut hosts = if host_network {
        let node = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        format!("# Kubernetes-managed hosts file (host network).\n{node}")
    } else {
        String::from(
            "# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n\
             fe00::0\tip6-localnet\nfe00::0\tip6-mcastprefix\nfe00::1\tip6-allnodes\nfe00::2\tip6-allrouters\n",
        )
    };
    if let Some(ip) = ip.filter(|_| !host_network) {
        let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
        match spec.and_then(|s| s.subdomain.as_deref()).filter(|s| !s.is_empty()) {
            Some(subdomain) => {
                hosts.push_str(&format!("{ip}\t{hostname}.{subdomain}.{namespace}.svc.{domain}\t{hostname}\n"))
            }
            None => hosts.push_str(&format!("{ip}\t{hostname}\n")),
        }
    }
    let aliases = spec.and_then(|s| s.host_aliases.as_deref()).unwrap_or_default();
    if !aliases.is_empty() {
        hosts.push_str("\n# Entries added by HostAliases.\n");
        for alias in aliases {
            let names = alias.hostnames.clone().unwrap_or_default().join("\t");
            hosts.push_str(&format!("{}\t{names}\n", alias.ip));
        }
    }
    hosts
}

fn write_etc_files(dir: &std::path::Path, hostname: &str, hosts: &str, resolv: &str) -> std::io::Result<()> {
    let etc = dir.join("etc");
    std::fs::create_dir_all(&etc)?;
    write_if_changed(&etc.join("hosts"), hosts.as_bytes())?;
    write_if_changed(&etc.join("hostname"), format!("{hostname}\n").as_bytes())?;
    write_if_changed(&etc.join("resolv.conf"), resolv.as_bytes())?;
    Ok(())
}

fn write_if_changed(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    if std::fs::read(path).ok().as_deref() != Some(bytes) {
        std::fs::write(path, bytes)?;
    }
    Ok(())
}

/// A pod's ephemeral containers as containers (the fields they share; no ports, probes or
/// resources are allowed them).
fn ephemeral_containers(spec: &k8s_openapi::api::core::v1::PodSpec) -> Vec<ContainerSpec> {
    spec.ephemeral_containers
        .iter()
        .flatten()
        .filter_map(|e| serde_json::to_value(e).ok().and_then(|v| serde_json::from_value(v).ok()))
        .collect()
}

/// Upstream's safe sysctls (namespaced, isolated from the node and other pods).
const SAFE_SYSCTLS: &[&str] = &[
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
];

/// How long a postStart hook may hold up its container's start.
const POST_START_LIMIT: Duration = Duration::from_secs(120);

/// Starts the next attempt of a container unless it is backing off; remembers why not.
#[allow(clippy::too_many_arguments)]
async fn maybe_start(
    node: &NodeAgent,
    pod: &Pod,
    c: &ContainerSpec,
    a: &Attempts,
    sandbox: &sandbox::Sandbox,
    pod_ip: Option<IpAddr>,
    init: bool,
    state: &mut Worker,
) {
    let next = a.latest.as_ref().map(|l| attempt(l) + 1).unwrap_or(0);
    if let Some(State::Exited(exited)) = a.latest.as_ref().map(|l| &l.state) {
        let delay = backoff(next.saturating_sub(1));
        let finished = exited.finished_at.parse::<k8s_openapi::jiff::Timestamp>().ok();
        let elapsed =
            finished.map(|f| k8s_openapi::jiff::Timestamp::now().duration_since(f).as_secs()).unwrap_or(i64::MAX);
        if elapsed >= 0 && (elapsed as u64) < delay.as_secs() {
            let message = format!(
                "back-off {}s restarting failed container={} pod={}_{}({})",
                delay.as_secs(),
                c.name,
                pod.metadata.name.as_deref().unwrap_or_default(),
                pod.metadata.namespace.as_deref().unwrap_or_default(),
                uid(pod)
            );
            if state.recorded.insert(("BackOff".into(), c.name.clone(), next)) {
                event(
                    node,
                    pod,
                    "Warning",
                    "BackOff",
                    &format!(
                        "Back-off restarting failed container {} in pod {}",
                        c.name,
                        pod.metadata.name.as_deref().unwrap_or_default()
                    ),
                )
                .await;
            }
            state.waiting.insert(c.name.clone(), Waiting { reason: "CrashLoopBackOff".into(), message });
            return;
        }
    }
    let image_ref = c.image.clone().unwrap_or_default();
    let Some((image_name, image)) = ensure_image(node, pod, c, &image_ref, next, state).await else {
        return;
    };
    node.image_gc.touch(&image_name);
    let config = match container_config(node, pod, c, &image_name, &image, sandbox, pod_ip, init, next).await {
        Ok(config) => config,
        Err(error) => {
            let message = format!("{error:#}");
            if state.recorded.insert(("Failed".into(), c.name.clone(), next)) {
                event(node, pod, "Warning", "Failed", &format!("Error: {message}")).await;
            }
            state.waiting.insert(c.name.clone(), Waiting { reason: "CreateContainerConfigError".into(), message });
            return;
        }
    };
    match node.runtime.create_and_start(config).await {
        Ok(started) => {
            state.waiting.remove(&c.name);
            event(node, pod, "Normal", "Created", &format!("Created container {}", c.name)).await;
            event(node, pod, "Normal", "Started", &format!("Started container {}", c.name)).await;
            // postStart runs before the container counts as started; if it fails the
            // container is killed, and restarted as its policy says.
            if let Some(handler) = c.lifecycle.as_ref().and_then(|l| l.post_start.as_ref()) {
                let exec = hook_exec(node, started.id(), handler);
                let target = probes::Target { ip: pod_ip, exec };
                if let Err(why) = probes::hook(handler, c, target, POST_START_LIMIT).await {
                    let message = format!("PostStartHook failed for container {}: {why}", c.name);
                    event(node, pod, "Warning", "FailedPostStartHook", &message).await;
                    let _ = node.runtime.signal(started.id(), 9).await;
                }
            }
        }
        Err(error) => {
            let message = error.to_string();
            if state.recorded.insert(("Failed".into(), c.name.clone(), next)) {
                event(node, pod, "Warning", "Failed", &format!("Error: {message}")).await;
            }
            // Keep the failed attempt's directory out of the way of the next.
            let id = container_id(&uid(pod), &c.name, next);
            let _ = node.runtime.remove(&id).await;
            state.waiting.insert(c.name.clone(), Waiting { reason: "RunContainerError".into(), message });
        }
    }
}

/// upstream's default pull policy: Always for `:latest` (or no tag), else IfNotPresent.
pub fn pull_policy(c: &ContainerSpec) -> &str {
    if let Some(policy) = c.image_pull_policy.as_deref().filter(|p| !p.is_empty()) {
        return policy;
    }
    let image = c.image.as_deref().unwrap_or_default();
    let last = image.rsplit('/').next().unwrap_or(image);
    if image.contains('@') {
        "IfNotPresent"
    } else if !last.contains(':') || last.ends_with(":latest") {
        "Always"
    } else {
        "IfNotPresent"
    }
}

/// The image a container runs, pulled when its policy says so; None (with the reason in
/// `state.waiting`) when it cannot be had now.
async fn ensure_image(
    node: &NodeAgent,
    pod: &Pod,
    c: &ContainerSpec,
    image_ref: &str,
    attempt: u32,
    state: &mut Worker,
) -> Option<(String, tugboat_runtime::images::Image)> {
    let present = node.images.get(image_ref);
    let policy = pull_policy(c);
    let pull = match (policy, &present) {
        ("Never", None) => {
            let message = format!("Container image {image_ref:?} is not present with pull policy of Never");
            if state.recorded.insert(("ErrImageNeverPull".into(), c.name.clone(), attempt)) {
                event(node, pod, "Warning", "ErrImageNeverPull", &message).await;
            }
            state.waiting.insert(c.name.clone(), Waiting { reason: "ErrImageNeverPull".into(), message });
            return None;
        }
        ("Always", _) | (_, None) => true,
        _ => false,
    };
    if !pull {
        if state.recorded.insert(("Pulled".into(), c.name.clone(), attempt)) && attempt == 0 {
            event(
                node,
                pod,
                "Normal",
                "Pulled",
                &format!("Container image \"{image_ref}\" already present on machine"),
            )
            .await;
        }
        return present;
    }
    // Pulls that failed back off as crashes do (10 s doubling to 5 min).
    if let Some((failures, last)) = state.pull_failures.get(image_ref).copied() {
        let delay = backoff(failures);
        if last.elapsed() < delay {
            let message = format!("Back-off pulling image \"{image_ref}\"");
            if state.recorded.insert(("PullBackOff".into(), image_ref.to_string(), failures)) {
                event(node, pod, "Normal", "BackOff", &message).await;
            }
            state.waiting.insert(c.name.clone(), Waiting { reason: "ImagePullBackOff".into(), message });
            return None;
        }
    }
    event(node, pod, "Normal", "Pulling", &format!("Pulling image \"{image_ref}\"")).await;
    let started = Instant::now();
    let credentials = pull_credentials(node, pod, image_ref).await;
    match node.puller.pull(&node.images, image_ref, credentials.as_ref()).await {
        Ok((image, size)) => {
            state.pull_failures.remove(image_ref);
            let took = started.elapsed().as_secs_f64();
            let message = format!(
                "Successfully pulled image \"{image_ref}\" in {took:.3}s ({took:.3}s including waiting). Image size: {size} bytes."
            );
            event(node, pod, "Normal", "Pulled", &message).await;
            Some((tugboat_runtime::images::normalize(image_ref), image))
        }
        Err(error) => {
            let failures = state.pull_failures.get(image_ref).map(|(f, _)| f + 1).unwrap_or(1);
            state.pull_failures.insert(image_ref.to_string(), (failures, Instant::now()));
            let message = format!("Failed to pull image \"{image_ref}\": {error}");
            event(node, pod, "Warning", "Failed", &message).await;
            event(node, pod, "Warning", "Failed", "Error: ErrImagePull").await;
            state.waiting.insert(c.name.clone(), Waiting { reason: "ErrImagePull".into(), message });
            None
        }
    }
}

/// Registry credentials for an image from the pod's imagePullSecrets
/// (`kubernetes.io/dockerconfigjson` or `kubernetes.io/dockercfg`).
async fn pull_credentials(node: &NodeAgent, pod: &Pod, image_ref: &str) -> Option<tugboat_runtime::pull::Credentials> {
    use base64::Engine;
    let registry = tugboat_runtime::pull::Puller::registry_of(image_ref).ok()?;
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(node.client.clone(), namespace);
    for reference in pod.spec.as_ref()?.image_pull_secrets.iter().flatten() {
        let Ok(Some(secret)) = secrets.get_opt(&reference.name).await else { continue };
        let data = secret.data.unwrap_or_default();
        let config: Value = match (data.get(".dockerconfigjson"), data.get(".dockercfg")) {
            (Some(json), _) => serde_json::from_slice::<Value>(&json.0).ok()?["auths"].clone(),
            (None, Some(cfg)) => serde_json::from_slice(&cfg.0).ok()?,
            _ => continue,
        };
        let Some(entries) = config.as_object() else { continue };
        for (host, entry) in entries {
            let host = host.trim_start_matches("https://").trim_start_matches("http://").trim_end_matches('/');
            let host = host.split('/').next().unwrap_or(host);
            if host != registry {
                continue;
            }
            let (mut username, mut password) = (
                entry["username"].as_str().unwrap_or_default().to_string(),
                entry["password"].as_str().unwrap_or_default().to_string(),
            );
            if let Some(auth) = entry["auth"].as_str()
                && let Ok(decoded) = base64::engine::general_purpose::STANDARD.decode(auth)
                && let Some((u, p)) = String::from_utf8_lossy(&decoded).split_once(':')
            {
                (username, password) = (u.to_string(), p.to_string());
            }
            return Some(tugboat_runtime::pull::Credentials { username, password });
        }
    }
    None
}

fn container_id(uid: &str, name: &str, attempt: u32) -> String {
    format!("{uid}-{name}-{attempt}")
}

/// `$(VAR)` in command and args, as upstream expands them (`$$` escapes).
pub fn expand(text: &str, env: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(stripped) = after.strip_prefix('$') {
            out.push('$');
            rest = stripped;
        } else if let Some(inner) = after.strip_prefix('(') {
            match inner.find(')') {
                Some(end) => {
                    let name = &inner[..end];
                    match env.iter().rev().find(|(k, _)| k == name) {
                        Some((_, v)) => out.push_str(v),
                        None => out.push_str(&format!("$({name})")),
                    }
                    rest = &inner[end + 1..];
                }
                None => {
                    out.push_str("$(");
                    rest = inner;
                }
            }
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

fn field_ref(pod: &Pod, path: &str, node: &NodeAgent, pod_ip: Option<IpAddr>) -> anyhow::Result<String> {
    // Whole label and annotation maps are for volumes only, as upstream.
    if !matches!(path, "metadata.labels" | "metadata.annotations")
        && let Some(value) = crate::volumes::metadata_field(pod, path)
    {
        return Ok(value);
    }
    let spec = pod.spec.clone().unwrap_or_default();
    Ok(match path {
        "spec.nodeName" => node.name.clone(),
        "spec.serviceAccountName" => spec.service_account_name.unwrap_or_default(),
        "status.podIP" | "status.podIPs" => pod_ip.map(|i| i.to_string()).unwrap_or_default(),
        "status.hostIP" | "status.hostIPs" => node.ip.map(|i| i.to_string()).unwrap_or_default(),
        other => anyhow::bail!("unsupported fieldRef {other:?}"),
    })
}

/// The variables upstream's kubelet gives every container for the Services it may reach by
/// them: those of the pod's namespace (unless `enableServiceLinks: false`) and always the API
/// server's `kubernetes` Service — `<NAME>_SERVICE_HOST`, `<NAME>_SERVICE_PORT[_<PORT NAME>]`
/// and the Docker-link style `<NAME>_PORT…` ones. Services without a cluster IP have none.
async fn service_environment(node: &NodeAgent, pod: &Pod) -> anyhow::Result<Vec<(String, String)>> {
    use k8s_openapi::api::core::v1::Service;
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let links = pod.spec.as_ref().and_then(|s| s.enable_service_links).unwrap_or(true);
    let mut services: Vec<Service> = Vec::new();
    if links {
        let api: Api<Service> = Api::namespaced(node.client.clone(), namespace);
        services.extend(api.list(&Default::default()).await?.items);
    }
    if !(links && namespace == "default") {
        let api: Api<Service> = Api::namespaced(node.client.clone(), "default");
        services.extend(api.get_opt("kubernetes").await?);
    }
    Ok(service_variables(&services))
}

/// Upstream's `envvars.FromServices`.
pub(crate) fn service_variables(services: &[k8s_openapi::api::core::v1::Service]) -> Vec<(String, String)> {
    let mut env = Vec::new();
    let upper = |name: &str| name.to_uppercase().replace('-', "_");
    for service in services {
        let Some(spec) = &service.spec else { continue };
        let Some(ip) = spec.cluster_ip.as_deref().filter(|ip| !ip.is_empty() && *ip != "None") else { continue };
        let ports = spec.ports.as_deref().unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        let name = upper(service.metadata.name.as_deref().unwrap_or_default());
        let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_string() };
        env.push((format!("{name}_SERVICE_HOST"), ip.to_string()));
        env.push((format!("{name}_SERVICE_PORT"), first.port.to_string()));
        for port in ports {
            if let Some(port_name) = port.name.as_deref().filter(|n| !n.is_empty()) {
                env.push((format!("{name}_SERVICE_PORT_{}", upper(port_name)), port.port.to_string()));
            }
        }
        let protocol = |p: &k8s_openapi::api::core::v1::ServicePort| p.protocol.clone().unwrap_or_else(|| "TCP".into());
        env.push((format!("{name}_PORT"), format!("{}://{host}:{}", protocol(first).to_lowercase(), first.port)));
        for port in ports {
            let proto = protocol(port);
            let prefix = format!("{name}_PORT_{}_{}", port.port, proto.to_uppercase());
            env.push((prefix.clone(), format!("{}://{host}:{}", proto.to_lowercase(), port.port)));
            env.push((format!("{prefix}_PROTO"), proto.to_lowercase()));
            env.push((format!("{prefix}_PORT"), port.port.to_string()));
            env.push((format!("{prefix}_ADDR"), ip.to_string()));
        }
    }
    env
}

/// The environment of a container: image's, then envFrom, then env (later wins), as upstream.
async fn environment(
    node: &NodeAgent,
    pod: &Pod,
    c: &ContainerSpec,
    pod_ip: Option<IpAddr>,
) -> anyhow::Result<Vec<(String, String)>> {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
    let configmaps: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(node.client.clone(), namespace);
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(node.client.clone(), namespace);
    // Services' variables first, so that envFrom and env override them and `$(VAR)` sees them.
    let mut env: Vec<(String, String)> = service_environment(node, pod).await?;
    for from in c.env_from.iter().flatten() {
        let prefix = from.prefix.clone().unwrap_or_default();
        if let Some(r) = &from.config_map_ref {
            match configmaps.get_opt(&r.name).await? {
                Some(cm) => {
                    env.extend(cm.data.unwrap_or_default().into_iter().map(|(k, v)| (format!("{prefix}{k}"), v)))
                }
                None if r.optional == Some(true) => {}
                None => anyhow::bail!("configmap {:?} not found", r.name),
            }
        }
        if let Some(r) = &from.secret_ref {
            match secrets.get_opt(&r.name).await? {
                Some(s) => env.extend(
                    s.data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (format!("{prefix}{k}"), String::from_utf8_lossy(&v.0).into_owned())),
                ),
                None if r.optional == Some(true) => {}
                None => anyhow::bail!("secret {:?} not found", r.name),
            }
        }
    }
    for var in c.env.iter().flatten() {
        let value = if let Some(value) = &var.value {
            expand(value, &env)
        } else if let Some(from) = &var.value_from {
            if let Some(f) = &from.field_ref {
                field_ref(pod, &f.field_path, node, pod_ip)?
            } else if let Some(r) = &from.resource_field_ref {
                // A limit the container does not set is the node's allocatable (upstream).
                let nodes: Api<Node> = Api::all(node.client.clone());
                let allocatable = nodes.get(&node.name).await?.status.and_then(|s| s.allocatable).unwrap_or_default();
                resource_value(pod, r.container_name.as_deref(), Some(&c.name), r, Some(&allocatable))?
            } else if let Some(r) = &from.config_map_key_ref {
                let cm = configmaps.get_opt(&r.name).await?;
                match cm.and_then(|cm| cm.data.and_then(|d| d.get(&r.key).cloned())) {
                    Some(v) => v,
                    None if r.optional == Some(true) => continue,
                    None => anyhow::bail!("couldn't find key {} in ConfigMap {}/{}", r.key, namespace, r.name),
                }
            } else if let Some(r) = &from.secret_key_ref {
                let s = secrets.get_opt(&r.name).await?;
                match s.and_then(|s| s.data.and_then(|d| d.get(&r.key).cloned())) {
                    Some(v) => String::from_utf8_lossy(&v.0).into_owned(),
                    None if r.optional == Some(true) => continue,
                    None => anyhow::bail!("couldn't find key {} in Secret {}/{}", r.key, namespace, r.name),
                }
            } else {
                String::new()
            }
        } else {
            String::new()
        };
        env.push((var.name.clone(), value));
    }
    // One value per name, the last given (a process would see the first).
    let mut seen = std::collections::HashSet::new();
    let mut unique: Vec<(String, String)> = env.into_iter().rev().filter(|(k, _)| seen.insert(k.clone())).collect();
    unique.reverse();
    Ok(unique)
}

/// The downward API's value of `r` (`limits.cpu`, `requests.memory`, …) for the container
/// it names (else `default`, else the first), divided by its divisor and rounded up, as
/// upstream; a limit the container does not set is `allocatable`'s when given.
pub(crate) fn resource_value(
    pod: &Pod,
    container: Option<&str>,
    default: Option<&str>,
    r: &k8s_openapi::api::core::v1::ResourceFieldSelector,
    allocatable: Option<&BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>>,
) -> anyhow::Result<String> {
    let wanted = container.filter(|n| !n.is_empty()).or(default);
    let spec = pod.spec.as_ref();
    let containers = spec.into_iter().flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()));
    let mut containers = containers.peekable();
    let first = containers.peek().cloned();
    let found = match wanted {
        Some(name) => containers.find(|c| c.name == name),
        None => first,
    }
    .ok_or_else(|| anyhow::anyhow!("resourceFieldRef: no container {wanted:?}"))?;
    let resources = found.resources.clone().unwrap_or_default();
    let (kind, name) = r.resource.split_once('.').unwrap_or(("limits", r.resource.as_str()));
    let own = match kind {
        "limits" => resources.limits.as_ref().and_then(|l| l.get(name)),
        "requests" => resources.requests.as_ref().and_then(|l| l.get(name)),
        _ => anyhow::bail!("unsupported resource {:?}", r.resource),
    };
    let from_node = || if kind == "limits" { allocatable.and_then(|a| a.get(name)) } else { None };
    let value = own.or_else(from_node).and_then(|q| quantity(&q.0)).unwrap_or(0.0);
    let divisor = r.divisor.as_ref().and_then(|q| quantity(&q.0)).filter(|d| *d > 0.0).unwrap_or(1.0);
    Ok(format!("{}", (value / divisor).ceil() as i64))
}

/// Parses a CPU or memory quantity (`100m`, `1.5`, `64Mi`, `1G`).
pub fn quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let suffixes: [(&str, f64); 13] = [
        ("Ki", 1024f64),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("m", 1e-3),
        ("k", 1e3),
        ("K", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("Pi", 1024f64.powi(5)),
        ("P", 1e15),
        ("E", 1e18),
    ];
    for (suffix, factor) in suffixes {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<f64>().ok().map(|n| n * factor);
        }
    }
    q.parse().ok()
}

#[allow(clippy::too_many_arguments)]
async fn container_config(
    node: &NodeAgent,
    pod: &Pod,
    c: &ContainerSpec,
    image_name: &str,
    image: &tugboat_runtime::images::Image,
    sandbox: &sandbox::Sandbox,
    pod_ip: Option<IpAddr>,
    init: bool,
    attempt: u32,
) -> anyhow::Result<ContainerConfig> {
    let uid = uid(pod);
    let spec = pod.spec.clone().unwrap_or_default();
    let image_config = node.images.config(image)?;
    let env = environment(node, pod, c, pod_ip).await?;
    let mut all_env: Vec<(String, String)> = image_config
        .env
        .iter()
        .filter_map(|e| e.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    all_env.push(("HOSTNAME".into(), pod_hostname(pod)));
    all_env.extend(env);
    let expand_all = |v: &[String]| v.iter().map(|s| expand(s, &all_env)).collect::<Vec<_>>();
    let args = match (&c.command, &c.args) {
        (Some(command), Some(args)) => [expand_all(command), expand_all(args)].concat(),
        (Some(command), None) => expand_all(command),
        (None, Some(args)) => [image_config.entrypoint.clone(), expand_all(args)].concat(),
        (None, None) => [image_config.entrypoint.clone(), image_config.cmd.clone()].concat(),
    };
    anyhow::ensure!(!args.is_empty(), "no command specified");
    // Later values win: keep the last of each name.
    let mut env_list: Vec<String> = Vec::new();
    let mut seen = std::collections::HashSet::new();
    for (k, v) in all_env.iter().rev() {
        if seen.insert(k.clone()) {
            env_list.push(format!("{k}={v}"));
        }
    }
    env_list.reverse();
    let security = c.security_context.clone().unwrap_or_default();
    let pod_security = spec.security_context.clone().unwrap_or_default();
    let uid_ = security.run_as_user.or(pod_security.run_as_user).unwrap_or(0);
    let gid = security.run_as_group.or(pod_security.run_as_group).unwrap_or(0);
    let caps = security.capabilities.clone().unwrap_or_default();
    let dir = pod_dir(node, &uid);
    let mut mounts = vec![
        BindMount { source: dir.join("etc/hosts"), destination: "/etc/hosts".into(), readonly: false },
        BindMount { source: dir.join("etc/hostname"), destination: "/etc/hostname".into(), readonly: false },
        BindMount { source: dir.join("etc/resolv.conf"), destination: "/etc/resolv.conf".into(), readonly: false },
    ];
    // The termination message file: made here, writable by whatever user the container runs
    // as, read back when it ends (`terminated.message`).
    let termination = dir.join("termination").join(format!("{}-{attempt}", c.name));
    std::fs::create_dir_all(termination.parent().expect("a file in a directory"))?;
    std::fs::write(&termination, b"")?;
    std::fs::set_permissions(&termination, std::os::unix::fs::PermissionsExt::from_mode(0o666))?;
    let message_path =
        c.termination_message_path.clone().filter(|p| !p.is_empty()).unwrap_or_else(|| "/dev/termination-log".into());
    mounts.push(BindMount { source: termination, destination: message_path, readonly: false });
    // A container that mounts a volume of its own at one of these gets that instead.
    mounts.retain(|m| !c.volume_mounts.iter().flatten().any(|v| v.mount_path.trim_end_matches('/') == m.destination));
    for m in c.volume_mounts.iter().flatten() {
        let volume = spec
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == m.name)
            .ok_or_else(|| anyhow::anyhow!("volume {:?} is not in the pod", m.name))?;
        let (mut source, api_backed) = match crate::volumes::files(&node.client, pod, volume, None).await? {
            Some(files) => {
                let path = dir.join("volumes").join(&volume.name);
                crate::volumes::write(&path, &files)?;
                (path, true)
            }
            None => match &volume.persistent_volume_claim {
                Some(claim) => {
                    let namespace = pod.metadata.namespace.as_deref().unwrap_or("default");
                    (
                        crate::volumes::claim_path(node, namespace, &claim.claim_name).await?,
                        claim.read_only == Some(true),
                    )
                }
                None => (volume_path(&dir, volume)?, false),
            },
        };
        // subPathExpr: the subPath with the container's `$(VAR)`s expanded.
        let expanded = m.sub_path_expr.as_deref().filter(|s| !s.is_empty()).map(|e| expand(e, &all_env));
        if let Some(sub) = expanded.as_deref().or(m.sub_path.as_deref()).filter(|s| !s.is_empty()) {
            anyhow::ensure!(
                !sub.starts_with('/') && !sub.split('/').any(|p| p == ".."),
                "failed to prepare subPath for volumeMount {:?} of container {:?}: {sub:?} must be a relative path without '..'",
                m.name,
                c.name
            );
            source = source.join(sub);
            if std::fs::symlink_metadata(&source).is_err() {
                std::fs::create_dir_all(&source)?;
            }
        }
        let readonly = m.read_only.unwrap_or(false) || api_backed;
        mounts.push(BindMount { source, destination: m.mount_path.clone(), readonly });
    }
    let limits = c.resources.as_ref().and_then(|r| r.limits.clone()).unwrap_or_default();
    let requests = c.resources.as_ref().and_then(|r| r.requests.clone()).unwrap_or_default();
    let resources = Resources {
        memory_limit: limits.get("memory").and_then(|q| quantity(&q.0)).map(|b| b as i64),
        cpu_quota: limits.get("cpu").and_then(|q| quantity(&q.0)).map(|cores| ((cores * 100_000.0) as i64).max(1000)),
        cpu_shares: requests.get("cpu").and_then(|q| quantity(&q.0)).map(|cores| ((cores * 1024.0) as u64).max(2)),
    };
    // The pod's sysctls: the namespaced ones upstream deems safe (others would need
    // `--allowed-unsafe-sysctls`, not built: refused).
    let mut sysctls = BTreeMap::new();
    for sysctl in pod_security.sysctls.iter().flatten() {
        let name = sysctl.name.replace('/', ".");
        anyhow::ensure!(SAFE_SYSCTLS.contains(&name.as_str()), "forbidden sysctl: {name:?} not allowlisted");
        sysctls.insert(name, sysctl.value.clone());
    }
    let mut labels = BTreeMap::new();
    labels.insert(LABEL_POD_UID.to_string(), uid.clone());
    labels.insert(LABEL_POD_NAME.to_string(), pod.metadata.name.clone().unwrap_or_default());
    labels.insert(LABEL_POD_NAMESPACE.to_string(), pod.metadata.namespace.clone().unwrap_or_default());
    labels.insert(LABEL_CONTAINER.to_string(), c.name.clone());
    labels.insert(LABEL_ATTEMPT.to_string(), attempt.to_string());
    if init {
        labels.insert(LABEL_INIT.to_string(), "true".into());
    }
    let id = container_id(&uid, &c.name, attempt);
    let log_path = node
        .log_dir
        .join(format!(
            "{}_{}_{}",
            pod.metadata.namespace.as_deref().unwrap_or_default(),
            pod.metadata.name.as_deref().unwrap_or_default(),
            uid
        ))
        .join(&c.name)
        .join(format!("{attempt}.log"));
    Ok(ContainerConfig {
        id: id.clone(),
        labels,
        image: image_name.to_string(),
        image_id: image.manifest.clone(),
        layers: node.images.layer_dirs(image),
        args,
        env: env_list,
        cwd: c.working_dir.clone().filter(|w| !w.is_empty()).unwrap_or(image_config.working_dir),
        uid: uid_ as u32,
        gid: gid as u32,
        additional_gids: pod_security.supplemental_groups.unwrap_or_default().into_iter().map(|g| g as u32).collect(),
        hostname: pod_hostname(pod),
        namespaces: SharedNamespaces {
            network: sandbox.net.clone(),
            ipc: Some(sandbox.ipc.clone()),
            uts: Some(sandbox.uts.clone()),
            host_network: sandbox.net.is_none(),
        },
        mounts,
        cgroups_path: format!("{}/{id}", pod_cgroup(&node.name, &uid)),
        resources,
        readonly_rootfs: security.read_only_root_filesystem.unwrap_or(false),
        privileged: security.privileged.unwrap_or(false),
        // Upstream's AddNoNewPrivileges: only when escalation is explicitly refused.
        no_new_privileges: security.allow_privilege_escalation == Some(false),
        capabilities_add: caps.add.unwrap_or_default(),
        capabilities_drop: caps.drop.unwrap_or_default(),
        log_path,
        stdin: c.stdin.unwrap_or(false),
        stdin_once: c.stdin_once.unwrap_or(false),
        tty: c.tty.unwrap_or(false),
        log_max_size: node.log_rotation.0,
        log_max_files: node.log_rotation.1,
        sysctls,
    })
}

/// The host directory behind a volume (made on first use).
fn volume_path(pod_dir: &std::path::Path, volume: &k8s_openapi::api::core::v1::Volume) -> anyhow::Result<PathBuf> {
    if let Some(host) = &volume.host_path {
        let path = PathBuf::from(&host.path);
        match host.type_.as_deref().unwrap_or("") {
            "DirectoryOrCreate" => std::fs::create_dir_all(&path)?,
            "FileOrCreate" if !path.exists() => {
                std::fs::File::create(&path)?;
            }
            "Directory" => anyhow::ensure!(path.is_dir(), "hostPath {} is not a directory", path.display()),
            "File" => anyhow::ensure!(path.is_file(), "hostPath {} is not a file", path.display()),
            _ => {}
        }
        return Ok(path);
    }
    if let Some(empty) = &volume.empty_dir {
        let path = pod_dir.join("volumes").join(&volume.name);
        if !path.exists() {
            std::fs::create_dir_all(&path)?;
            if empty.medium.as_deref() == Some("Memory") {
                let size =
                    empty.size_limit.as_ref().and_then(|q| quantity(&q.0)).map(|b| format!(",size={}", b as u64));
                let options = format!("mode=1777{}", size.unwrap_or_default());
                nix::mount::mount(
                    Some("tmpfs"),
                    &path,
                    Some("tmpfs"),
                    nix::mount::MsFlags::empty(),
                    Some(options.as_str()),
                )?;
            } else {
                std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o777))?;
            }
        }
        return Ok(path);
    }
    anyhow::bail!(
        "volume {:?}: only emptyDir, hostPath, configMap, secret, downwardAPI and projected volumes are supported so far",
        volume.name
    )
}

async fn event(node: &NodeAgent, pod: &Pod, kind: &str, reason: &str, message: &str) {
    let regarding = tugboat_objects::events::reference(pod);
    tugboat_objects::events::record(&node.client, &regarding, kind, reason, message, "", "kubelet").await;
}

/// What an ended container left in its termination message file (at most 4096 bytes), or
/// with `FallbackToLogsOnError` and a failure, the end of its log (80 lines, 2048 bytes).
fn termination_message(c: &ContainerSpec, run: &Container, exit_code: i32) -> Option<String> {
    let path =
        c.termination_message_path.clone().filter(|p| !p.is_empty()).unwrap_or_else(|| "/dev/termination-log".into());
    let file = run.config.mounts.iter().find(|m| m.destination == path).map(|m| m.source.clone());
    let mut message = file.and_then(|f| std::fs::read(f).ok()).unwrap_or_default();
    message.truncate(4096);
    if message.is_empty() && exit_code != 0 && c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError")
    {
        let options = crate::logs::LogOptions { tail_lines: Some(80), ..Default::default() };
        if let Ok((log, _)) = crate::logs::read_existing(&run.config.log_path, &options) {
            message = log[log.len().saturating_sub(2048)..].to_vec();
        }
    }
    (!message.is_empty()).then(|| String::from_utf8_lossy(&message).into_owned())
}

/// A container's status as upstream reports it.
fn container_status(c: &ContainerSpec, a: &Attempts, waiting: Option<&Waiting>, probes: &Worker) -> Value {
    let terminated = |e: &tugboat_runtime::Exited, run: &Container| {
        let mut state = json!({"exitCode": e.exit_code, "signal": e.signal, "reason": e.reason,
                               "startedAt": run.started.as_ref().map(|s| s.started_at.clone()),
                               "finishedAt": e.finished_at, "containerID": format!("tugboat://{}", run.id())});
        if let Some(message) = termination_message(c, run, e.exit_code) {
            state["message"] = json!(message);
        }
        json!({"terminated": state})
    };
    let (state, last_state) = match &a.latest {
        Some(latest) => {
            let current = match &latest.state {
                State::Running => {
                    json!({"running": {"startedAt": latest.started.as_ref().map(|s| s.started_at.clone())}})
                }
                State::Created => json!({"waiting": {"reason": "ContainerCreating"}}),
                State::Exited(e) => terminated(e, latest),
            };
            let previous = a.previous.as_ref().and_then(|p| match &p.state {
                State::Exited(e) => Some(terminated(e, p)),
                _ => None,
            });
            match (waiting, &latest.state) {
                // Backing off (or failing to start): waiting now, the exit is the last state.
                (Some(w), State::Exited(_)) => {
                    (json!({"waiting": {"reason": w.reason, "message": w.message}}), Some(current))
                }
                _ => (current, previous),
            }
        }
        None => {
            let (reason, message) = waiting
                .map(|w| (w.reason.clone(), w.message.clone()))
                .unwrap_or(("ContainerCreating".into(), String::new()));
            let mut waiting = json!({"reason": reason});
            if !message.is_empty() {
                waiting["message"] = json!(message);
            }
            (json!({"waiting": waiting}), None)
        }
    };
    let running = a.latest.as_ref().filter(|l| l.state == State::Running);
    let (started, ready) = running.map(|l| probes.probed(c, l.id())).unwrap_or((false, false));
    let restarts = a.latest.as_ref().map(attempt).unwrap_or(0);
    let mut status = json!({
        "name": c.name,
        "image": c.image.clone().unwrap_or_default(),
        "imageID": a.latest.as_ref().map(|l| l.config.image_id.clone()).unwrap_or_default(),
        "ready": ready,
        "started": started,
        "restartCount": restarts,
        "state": state,
        "lastState": last_state.unwrap_or(json!({})),
    });
    if let Some(latest) = &a.latest {
        status["containerID"] = json!(format!("tugboat://{}", latest.id()));
    }
    status
}

/// The pod's phase from its containers (upstream's getPhase).
pub fn phase(policy: &str, init_done: bool, statuses: &[&Value]) -> &'static str {
    if !init_done {
        return "Pending";
    }
    let (mut running, mut waiting, mut succeeded, mut failed, mut unknown) = (0, 0, 0, 0, 0);
    for s in statuses {
        let state = &s["state"];
        if state.get("running").is_some() {
            running += 1;
        } else if let Some(t) = state.get("terminated") {
            if t["exitCode"] == 0 { succeeded += 1 } else { failed += 1 }
        } else if state.get("waiting").is_some() {
            if s["lastState"].get("terminated").is_some() {
                // Restarting: counts as having run.
                running += 1;
            } else {
                waiting += 1;
            }
        } else {
            unknown += 1;
        }
    }
    if waiting > 0 || unknown > 0 {
        return "Pending";
    }
    if running > 0 {
        return "Running";
    }
    if failed == 0 && succeeded > 0 {
        return if policy == "Always" { "Running" } else { "Succeeded" };
    }
    if failed > 0 {
        return if policy == "Never" { "Failed" } else { "Running" };
    }
    "Pending"
}

/// Reports the pod's status when it changed.
async fn report(
    node: &NodeAgent,
    pod: &Pod,
    containers: &[Container],
    pod_ip: Option<IpAddr>,
    state: &mut Worker,
) -> anyhow::Result<()> {
    let spec = pod.spec.clone().unwrap_or_default();
    let attempts = by_name(containers);
    let policy = restart_policy(pod);
    let status_of = |c: &ContainerSpec| {
        container_status(c, &attempts.get(&c.name).cloned().unwrap_or_default(), state.waiting.get(&c.name), state)
    };
    let mut init_statuses: Vec<Value> = spec.init_containers.iter().flatten().map(status_of).collect();
    let ephemeral_statuses: Vec<Value> = ephemeral_containers(&spec).iter().map(status_of).collect();
    let mut statuses: Vec<Value> = spec.containers.iter().map(status_of).collect();
    // An init container that completed is ready (upstream).
    for s in &mut init_statuses {
        if s["state"]["terminated"]["exitCode"] == 0 {
            s["ready"] = json!(true);
        }
    }
    let init_done = init_statuses.iter().all(|s| s["state"]["terminated"]["exitCode"] == 0);
    // In a pod with init containers, a container not made yet waits for them, and says so
    // (upstream's default waiting state there): the app containers until the init containers
    // are done, the later init containers until their turn.
    if !init_statuses.is_empty() {
        let not_made =
            |s: &Value| s["state"]["waiting"]["reason"] == "ContainerCreating" && s.get("containerID").is_none();
        for s in init_statuses.iter_mut().filter(|s| not_made(s)) {
            s["state"]["waiting"]["reason"] = json!("PodInitializing");
        }
        if !init_done {
            for s in statuses.iter_mut().filter(|s| not_made(s)) {
                s["state"]["waiting"]["reason"] = json!("PodInitializing");
            }
        }
    }
    let init_failed = policy == "Never"
        && init_statuses.iter().any(|s| s["state"]["terminated"]["exitCode"].as_i64().is_some_and(|c| c != 0));
    let phase = if init_failed { "Failed" } else { phase(policy, init_done, &statuses.iter().collect::<Vec<_>>()) };
    let ready = phase == "Running" && statuses.iter().all(|s| s["ready"] == true);
    let sandbox_ready = !state.waiting.contains_key("");
    let previous: Vec<Value> = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|c| serde_json::to_value(c).unwrap_or_default())
        .collect();
    let now = now();
    // Which containers hold a condition back, as upstream names them in its message.
    let names = |list: &[Value], holding: &dyn Fn(&Value) -> bool| -> String {
        let held: Vec<&str> = list.iter().filter(|s| holding(s)).filter_map(|s| s["name"].as_str()).collect();
        format!("[{}]", held.join(" "))
    };
    let incomplete = format!(
        "containers with incomplete status: {}",
        names(&init_statuses, &|s| s["state"]["terminated"]["exitCode"] != 0)
    );
    let unready = format!("containers with unready status: {}", names(&statuses, &|s| s["ready"] != true));
    let condition = |kind: &str, ok: bool, reason: Option<&str>, message: Option<&str>| {
        let status = if ok { "True" } else { "False" };
        let since = previous
            .iter()
            .find(|p| p["type"] == kind && p["status"] == status)
            .and_then(|p| p["lastTransitionTime"].as_str().map(str::to_string))
            .unwrap_or_else(|| now.clone());
        let mut c = json!({"type": kind, "status": status, "lastProbeTime": null, "lastTransitionTime": since});
        if let Some(reason) = reason.filter(|_| !ok) {
            c["reason"] = json!(reason);
            if let Some(message) = message {
                c["message"] = json!(message);
            }
        }
        c
    };
    let completed = phase == "Succeeded" || phase == "Failed";
    let (not_ready_reason, not_ready_message) =
        if completed { ("PodCompleted", None) } else { ("ContainersNotReady", Some(unready.as_str())) };
    let conditions = vec![
        condition("PodReadyToStartContainers", sandbox_ready, None, None),
        condition("Initialized", init_done, Some("ContainersNotInitialized"), Some(&incomplete)),
        condition("Ready", ready, Some(not_ready_reason), not_ready_message),
        condition("ContainersReady", ready, Some(not_ready_reason), not_ready_message),
        condition("PodScheduled", true, None, None),
    ];
    let mut status = json!({
        "phase": phase,
        "conditions": conditions,
        "hostIP": node.ip.map(|i| i.to_string()),
        "hostIPs": node.ip.map(|i| vec![json!({"ip": i.to_string()})]).unwrap_or_default(),
        "startTime": state.started_at,
        "containerStatuses": statuses,
        "qosClass": qos_class(&spec),
    });
    if !ephemeral_statuses.is_empty() {
        status["ephemeralContainerStatuses"] = json!(ephemeral_statuses);
    }
    if !init_statuses.is_empty() {
        status["initContainerStatuses"] = json!(init_statuses);
    }
    if let Some(ip) = pod_ip {
        status["podIP"] = json!(ip.to_string());
        status["podIPs"] = json!([{"ip": ip.to_string()}]);
    }
    if state.last_status.as_ref() == Some(&status) {
        return Ok(());
    }
    let pods: Api<Pod> = Api::namespaced(node.client.clone(), pod.metadata.namespace.as_deref().unwrap_or("default"));
    let patch = json!({"status": status});
    match pods
        .patch_status(pod.metadata.name.as_deref().unwrap_or_default(), &PatchParams::default(), &Patch::Merge(&patch))
        .await
    {
        Ok(_) => state.last_status = Some(status),
        Err(kube::Error::Api(s)) if s.code == 404 => {}
        Err(error) => return Err(error.into()),
    }
    Ok(())
}

/// Upstream's QoS classes: Guaranteed (limits = requests for cpu and memory everywhere),
/// BestEffort (nothing set), Burstable otherwise.
pub fn qos_class(spec: &k8s_openapi::api::core::v1::PodSpec) -> &'static str {
    let all: Vec<&ContainerSpec> = spec.containers.iter().chain(spec.init_containers.iter().flatten()).collect();
    let mut any = false;
    let mut guaranteed = true;
    for c in all {
        let r = c.resources.clone().unwrap_or_default();
        let limits = r.limits.unwrap_or_default();
        let requests = r.requests.unwrap_or_default();
        if !limits.is_empty() || !requests.is_empty() {
            any = true;
        }
        for resource in ["cpu", "memory"] {
            let limit = limits.get(resource).and_then(|q| quantity(&q.0));
            let request = requests.get(resource).and_then(|q| quantity(&q.0)).or(limit);
            if limit.is_none() || limit != request {
                guaranteed = false;
            }
        }
    }
    if !any {
        "BestEffort"
    } else if guaranteed {
        "Guaranteed"
    } else {
        "Burstable"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hostnames_are_cut_to_63_characters() {
        let pod = |name: &str, hostname: Option<&str>| -> Pod {
            serde_json::from_value(
                json!({"metadata": {"name": name}, "spec": {"containers": [], "hostname": hostname}}),
            )
            .unwrap()
        };
        assert_eq!(pod_hostname(&pod("web", None)), "web");
        assert_eq!(pod_hostname(&pod("web", Some("db-0"))), "db-0");
        // 62 characters, then a dash at the cut: it goes too.
        let long = format!("{}-{}", "a".repeat(62), "b".repeat(10));
        assert_eq!(pod_hostname(&pod(&long, None)), "a".repeat(62));
    }

    #[test]
    fn hosts_files_name_the_pod_and_its_aliases() {
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": "web-0", "namespace": "shop"},
            "spec": {"containers": [], "hostname": "web-0", "subdomain": "web",
                     "hostAliases": [{"ip": "10.1.2.3", "hostnames": ["foo.local", "bar.local"]}]},
        }))
        .unwrap();
        let hosts = hosts_file(&pod, "web-0", Some("10.244.1.5".parse().unwrap()), "cluster.local");
        assert!(hosts.starts_with("# Kubernetes-managed hosts file.\n127.0.0.1\tlocalhost\n"), "{hosts}");
        assert!(hosts.contains("\n10.244.1.5\tweb-0.web.shop.svc.cluster.local\tweb-0\n"), "{hosts}");
        assert!(hosts.ends_with("\n# Entries added by HostAliases.\n10.1.2.3\tfoo.local\tbar.local\n"), "{hosts}");
        let plain: Pod =
            serde_json::from_value(json!({"metadata": {"name": "p"}, "spec": {"containers": []}})).unwrap();
        assert!(
            hosts_file(&plain, "p", Some("10.244.1.6".parse().unwrap()), "cluster.local")
                .ends_with("\n10.244.1.6\tp\n")
        );
        // On the host's network: the host's own file, under a header of its own.
        let host: Pod =
            serde_json::from_value(json!({"metadata": {"name": "h"}, "spec": {"containers": [], "hostNetwork": true}}))
                .unwrap();
        let hosts = hosts_file(&host, "h", Some("10.77.0.2".parse().unwrap()), "cluster.local");
        let node = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
        assert_eq!(hosts, format!("# Kubernetes-managed hosts file (host network).\n{node}"));
    }

    #[test]
    fn resolv_conf_follows_the_dns_policy() {
        let dns = ClusterDns { server: "10.96.0.10".parse().unwrap(), domain: "cluster.local".into() };
        let host = "nameserver 192.168.1.1\nsearch lan\noptions edns0\n";
        let pod = |spec: Value| -> Pod {
            serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "shop"}, "spec": spec})).unwrap()
        };
        assert_eq!(
            resolv_conf(&pod(json!({"containers": []})), &dns, host),
            "nameserver 10.96.0.10\nsearch shop.svc.cluster.local svc.cluster.local cluster.local lan\noptions ndots:5\n"
        );
        assert_eq!(resolv_conf(&pod(json!({"containers": [], "hostNetwork": true})), &dns, host), host.to_string());
        assert_eq!(resolv_conf(&pod(json!({"containers": [], "dnsPolicy": "Default"})), &dns, host), host.to_string());
        let with_host_net = pod(json!({"containers": [], "hostNetwork": true, "dnsPolicy": "ClusterFirstWithHostNet"}));
        assert!(resolv_conf(&with_host_net, &dns, host).starts_with("nameserver 10.96.0.10\n"));
        let none = pod(json!({"containers": [], "dnsPolicy": "None",
            "dnsConfig": {"nameservers": ["1.1.1.1"], "searches": ["a.b"], "options": [{"name": "ndots", "value": "2"}]}}));
        assert_eq!(resolv_conf(&none, &dns, host), "nameserver 1.1.1.1\nsearch a.b\noptions ndots:2\n");
        let merged = pod(
            json!({"containers": [], "dnsConfig": {"options": [{"name": "ndots", "value": "1"}, {"name": "edns0"}]}}),
        );
        assert!(resolv_conf(&merged, &dns, host).ends_with("options ndots:1 edns0\n"));
    }

    #[test]
    fn backoff_is_none_then_doubles_from_ten_seconds_to_five_minutes() {
        let delays: Vec<u64> = (0..9).map(|r| backoff(r).as_secs()).collect();
        assert_eq!(delays, vec![0, 10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn dollar_references_expand_as_upstream() {
        let env = vec![("A".to_string(), "1".to_string()), ("B".to_string(), "two".to_string())];
        assert_eq!(expand("x$(A)y$(B)", &env), "x1ytwo");
        assert_eq!(expand("$(C) $$(A) $", &env), "$(C) $(A) $");
        assert_eq!(expand("$(A", &env), "$(A");
    }

    #[test]
    fn quantities_and_qos() {
        assert_eq!(quantity("100m"), Some(0.1));
        assert_eq!(quantity("64Mi"), Some(67108864.0));
        assert_eq!(quantity("1G"), Some(1e9));
        assert_eq!(quantity("2"), Some(2.0));
        let spec: k8s_openapi::api::core::v1::PodSpec = serde_json::from_value(json!({"containers": [
            {"name": "a", "resources": {"limits": {"cpu": "1", "memory": "1Gi"}}}]}))
        .unwrap();
        assert_eq!(qos_class(&spec), "Guaranteed");
        let spec: k8s_openapi::api::core::v1::PodSpec = serde_json::from_value(json!({"containers": [
            {"name": "a", "resources": {"requests": {"cpu": "1"}}}]}))
        .unwrap();
        assert_eq!(qos_class(&spec), "Burstable");
        let spec: k8s_openapi::api::core::v1::PodSpec =
            serde_json::from_value(json!({"containers": [{"name": "a"}]})).unwrap();
        assert_eq!(qos_class(&spec), "BestEffort");
    }

    #[test]
    fn phases_follow_the_restart_policy() {
        let running = json!({"state": {"running": {}}, "lastState": {}});
        let ok = json!({"state": {"terminated": {"exitCode": 0}}, "lastState": {}});
        let failed = json!({"state": {"terminated": {"exitCode": 1}}, "lastState": {}});
        let new = json!({"state": {"waiting": {"reason": "ContainerCreating"}}, "lastState": {}});
        let backing_off =
            json!({"state": {"waiting": {"reason": "CrashLoopBackOff"}}, "lastState": {"terminated": {"exitCode": 1}}});
        assert_eq!(phase("Always", false, &[&running]), "Pending");
        assert_eq!(phase("Always", true, &[&running, &new]), "Pending");
        assert_eq!(phase("Always", true, &[&running, &ok]), "Running");
        assert_eq!(phase("Always", true, &[&backing_off]), "Running");
        assert_eq!(phase("Never", true, &[&ok, &ok]), "Succeeded");
        assert_eq!(phase("Never", true, &[&ok, &failed]), "Failed");
        assert_eq!(phase("OnFailure", true, &[&ok]), "Succeeded");
    }
}
