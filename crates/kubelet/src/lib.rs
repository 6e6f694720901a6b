//! Tugboat's kubelet (node agent): it registers its Node from the host's facts (`host.rs`:
//! capacity, addresses, nodeInfo), renews the node's Lease in `kube-node-lease` every 10 s,
//! reports the node's conditions, and runs the pods bound to it (`pods.rs`) in sandboxes
//! (`sandbox.rs`) with the built-in runtime (`tugboat-runtime`).
//!
//! State under the data dir: `content/` (image store), `images/*.tar` (imported at start),
//! `containers/` (one dir per container, adopted after a restart), `pods/<uid>/` (sandbox
//! namespaces, volumes, /etc files), `ipam/`; container logs under `log_dir`.
//!
//! It imports the node's crates (`tugboat-runtime`, `tugboat-network`) and the shared ones
//! (`tugboat-objects`, `tugboat-pki`), never a control-plane crate (apiserver, scheduler,
//! controllers): it meets them through the API.

pub mod certificates;
pub mod exec;
pub mod host;
pub mod image_gc;
pub mod logs;
pub mod pods;
pub mod portforward;
pub mod probes;
pub mod sandbox;
pub mod server;
pub mod spdy;
pub mod static_pods;
pub mod stats;
pub mod volumes;

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use tugboat_runtime::Builtin;
use tugboat_runtime::images::ImageStore;

use crate::host::Host;

/// The kubelet version reported in nodeInfo (the API server's minor).
pub const KUBELET_VERSION: &str = "v1.33.0-tugboat";
/// How long the node's Lease holds without renewal (upstream's default).
const LEASE_SECONDS: i32 = 40;
/// How often the Lease is renewed and the status reported (upstream: nodeStatusUpdateFrequency).
const HEARTBEAT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct KubeletConfig {
    /// `--node-name` (default: the host name).
    pub node_name: Option<String>,
    /// `--node-ip` (default: the address of the default route's interface).
    pub node_ip: Option<IpAddr>,
    /// Where the kubelet keeps its state; its filesystem is the node's ephemeral storage.
    pub data_dir: PathBuf,
    /// Where container logs go (`<ns>_<pod>_<uid>/<container>/<attempt>.log`).
    pub log_dir: PathBuf,
    /// The port of the kubelet's HTTPS API (logs, exec, …), 10250 upstream.
    pub port: u16,
    /// The cluster CA (PEM) that the API server's client certificate must chain to; without
    /// it the kubelet API is not served.
    pub client_ca: Option<String>,
    /// Registries (`host:port`) pulled from over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Static pod manifests (default `<data-dir>/manifests`).
    pub manifest_dir: Option<PathBuf>,
    /// Container logs are rotated at this size (bytes; 0: never), keeping this many files.
    pub log_max_size: u64,
    pub log_max_files: u32,
    pub image_gc: image_gc::Policy,
    /// The kubeconfig the kubelet's client came from: a node client certificate in it is
    /// renewed in place.
    pub kubeconfig: Option<PathBuf>,
    /// Run the service proxy with the kubelet (its node name is the kubelet's).
    pub proxy: Option<tugboat_network::proxy::ProxyConfig>,
    /// The cluster DNS that pods' resolv.conf names.
    pub dns: pods::ClusterDns,
}

/// Upstream's allocatable is capacity less reservations and the hard eviction thresholds;
/// without reservations: memory less 100Mi, ephemeral storage less 10%.
fn node_resources(host: &Host) -> (Value, Value) {
    let capacity = json!({
        "cpu": host.cpus.to_string(),
        "memory": format!("{}Ki", host.memory / 1024),
        "ephemeral-storage": format!("{}Ki", host.disk / 1024),
        "pods": "110",
    });
    let allocatable = json!({
        "cpu": host.cpus.to_string(),
        "memory": format!("{}Ki", host.memory.saturating_sub(100 << 20) / 1024),
        "ephemeral-storage": (host.disk - host.disk / 10).to_string(),
        "pods": "110",
    });
    (capacity, allocatable)
}

/// The node's status as this kubelet reports it, at `now` (RFC 3339).
pub fn node_status(host: &Host, name: &str, ip: Option<IpAddr>, now: &str) -> Value {
    let (capacity, allocatable) = node_resources(host);
    let condition =
        |kind: &str, bad: bool, (good_reason, good_message): (&str, &str), (bad_reason, bad_message): (&str, &str)| {
            let (status, reason, message) =
                if bad { ("True", bad_reason, bad_message) } else { ("False", good_reason, good_message) };
            json!({"type": kind, "status": status, "reason": reason, "message": message,
               "lastHeartbeatTime": now, "lastTransitionTime": now})
        };
    let mut addresses = Vec::new();
    if let Some(ip) = ip {
        addresses.push(json!({"type": "InternalIP", "address": ip.to_string()}));
    }
    addresses.push(json!({"type": "Hostname", "address": name}));
    json!({
        "capacity": capacity,
        "allocatable": allocatable,
        "conditions": [
            condition("MemoryPressure", host.memory_pressure(),
                ("KubeletHasSufficientMemory", "kubelet has sufficient memory available"),
                ("KubeletHasInsufficientMemory", "kubelet has insufficient memory available")),
            condition("DiskPressure", host.disk_pressure(),
                ("KubeletHasNoDiskPressure", "kubelet has no disk pressure"),
                ("KubeletHasDiskPressure", "kubelet has disk pressure")),
            condition("PIDPressure", host.pid_pressure(),
                ("KubeletHasSufficientPID", "kubelet has sufficient PID available"),
                ("KubeletHasInsufficientPID", "kubelet has insufficient PID available")),
            {
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "kubelet is posting ready status",
                "lastHeartbeatTime": now, "lastTransitionTime": now,
            },
        ],
        "addresses": addresses,
        "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
        "nodeInfo": {
            "kubeletVersion": KUBELET_VERSION,
            "kubeProxyVersion": "",
            "containerRuntimeVersion": concat!("tugboat://", env!("CARGO_PKG_VERSION")),
            "osImage": host.os_image,
            "operatingSystem": "linux",
            "architecture": architecture(),
            "kernelVersion": host.kernel,
            "machineID": host.machine_id,
            "systemUUID": host.system_uuid,
            "bootID": host.boot_id,
        },
    })
}

/// GOARCH spelling of this machine's architecture, as nodes report it.
pub fn architecture() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

/// Keeps each condition's lastTransitionTime from the last report unless its status changed
/// (`seen`: type → (status, since), updated). Returns the event reasons of the conditions that
/// changed (all of them the first time), as upstream's kubelet records them.
pub fn keep_transitions(
    status: &mut Value,
    seen: &mut std::collections::HashMap<String, (String, String)>,
) -> Vec<&'static str> {
    let mut changed = Vec::new();
    for condition in status["conditions"].as_array_mut().into_iter().flatten() {
        let kind = condition["type"].as_str().unwrap_or_default().to_string();
        let state = condition["status"].as_str().unwrap_or_default().to_string();
        match seen.get(&kind) {
            Some((before, since)) if *before == state => condition["lastTransitionTime"] = json!(since),
            _ => {
                changed.extend(event_reason(&kind, state == "True"));
                seen.insert(kind, (state, condition["lastTransitionTime"].as_str().unwrap_or_default().to_string()));
            }
        }
    }
    changed
}

/// The reason of the event upstream's kubelet records when a condition becomes `status`.
fn event_reason(kind: &str, status: bool) -> Option<&'static str> {
    Some(match (kind, status) {
        ("MemoryPressure", false) => "NodeHasSufficientMemory",
        ("MemoryPressure", true) => "NodeHasInsufficientMemory",
        ("DiskPressure", false) => "NodeHasNoDiskPressure",
        ("DiskPressure", true) => "NodeHasDiskPressure",
        ("PIDPressure", false) => "NodeHasSufficientPID",
        ("PIDPressure", true) => "NodeHasInsufficientPID",
        ("Ready", false) => "NodeNotReady",
        ("Ready", true) => "NodeReady",
        _ => return None,
    })
}

/// Posts an event about the node, as upstream's kubelet does (namespace `default`, the node's
/// name as its uid).
async fn node_event(client: &kube::Client, name: &str, reason: &str, message: &str) {
    let regarding = k8s_openapi::api::core::v1::ObjectReference {
        kind: Some("Node".into()),
        name: Some(name.into()),
        uid: Some(name.into()),
        ..Default::default()
    };
    // Upstream records every node status event as Normal.
    tugboat_objects::events::record(client, &regarding, "Normal", reason, message, "", "kubelet").await;
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().to_string()
}

/// Runs the kubelet until the API server goes away for good.
pub async fn run(client: kube::Client, config: KubeletConfig) -> anyhow::Result<()> {
    std::fs::create_dir_all(&config.data_dir)?;
    let host = Host::read(&config.data_dir)?;
    let name = config.node_name.clone().unwrap_or_else(|| host.hostname.clone());
    anyhow::ensure!(!name.is_empty(), "no node name: give --node-name");
    let ip = config.node_ip.or_else(host::node_ip);
    let images = Arc::new(ImageStore::open(config.data_dir.join("content"))?);
    import_images(&images, &config.data_dir.join("images"));
    let shim = std::env::current_exe()?;
    let runtime = Arc::new(Builtin::new(config.data_dir.join("containers"), shim)?);
    register(&client, &name).await?;
    tracing::info!(node = %name, ip = ?ip, "node registered");
    node_event(&client, &name, "Starting", "Starting kubelet.").await;
    let agent = Arc::new(pods::NodeAgent {
        client: client.clone(),
        name: name.clone(),
        ip,
        runtime,
        images,
        puller: tugboat_runtime::pull::Puller::new(&config.insecure_registries),
        pods_dir: config.data_dir.join("pods"),
        log_dir: config.log_dir.clone(),
        ipam: sandbox::Ipam::new(config.data_dir.join("ipam"))?,
        network: std::sync::Mutex::new(None),
        bridge: std::sync::Mutex::new(None),
        stats: Default::default(),
        image_gc: image_gc::ImageGc::new(config.image_gc),
        log_rotation: (config.log_max_size, config.log_max_files),
        dns: config.dns.clone(),
    });
    tokio::spawn(image_gc::run(agent.clone()));
    tokio::spawn(stats::sample(agent.clone()));
    let own_network = agent.clone();
    tokio::spawn(tugboat_network::pod_network::run(client.clone(), name.clone(), move || {
        *own_network.network.lock().unwrap_or_else(|e| e.into_inner())
    }));
    tokio::spawn(tugboat_network::policy::run(client.clone(), name.clone()));
    tokio::spawn(tugboat_network::host_ports::run(client.clone(), name.clone()));
    if let Some(proxy) = config.proxy.clone() {
        let config = tugboat_network::proxy::ProxyConfig { node_name: name.clone(), ..proxy };
        tokio::spawn(tugboat_network::proxy::run(client.clone(), config));
    }
    let manifests = config.manifest_dir.clone().unwrap_or_else(|| config.data_dir.join("manifests"));
    tokio::spawn(static_pods::run(agent.clone(), manifests));
    let pods = tokio::spawn(pods::run(agent.clone()));
    if let Some(kubeconfig) = config.kubeconfig.clone() {
        tokio::spawn(certificates::keep_client(client.clone(), kubeconfig));
    }
    let api = match config.client_ca.clone() {
        Some(ca) => {
            let pki = config.data_dir.join("pki");
            let serving = certificates::load_serving(&pki, &ca, &name, ip)?;
            let keep = certificates::keep_serving(client.clone(), serving.clone(), pki, ca.clone(), name.clone(), ip);
            tokio::spawn(keep);
            // Serve with a certificate of the cluster from the start when it comes soon.
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while !tugboat_pki::issued_by(&serving.pem(), &ca) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            tokio::spawn(async move { server::serve(agent, config.port, ca, serving).await })
        }
        None => {
            tracing::warn!("no cluster CA in the kubeconfig: the kubelet API (logs, exec) is not served");
            tokio::spawn(std::future::pending())
        }
    };
    let heartbeat = heartbeat(&client, &config, &name, ip);
    tokio::select! {
        result = heartbeat => result,
        result = pods => result?,
        result = api => result?,
    }
}

/// Imports every archive in `dir` (`<data-dir>/images/*.tar`): a bad one is logged and skipped.
fn import_images(images: &ImageStore, dir: &std::path::Path) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        if !path.extension().is_some_and(|e| e == "tar" || e == "gz") {
            continue;
        }
        match images.import(&path) {
            Ok(names) => tracing::info!(archive = %path.display(), ?names, "imported images"),
            Err(error) => tracing::warn!(archive = %path.display(), %error, "could not import an image archive"),
        }
    }
}

async fn heartbeat(
    client: &kube::Client,
    config: &KubeletConfig,
    name: &str,
    ip: Option<IpAddr>,
) -> anyhow::Result<()> {
    let (client, name) = (client.clone(), name.to_string());
    let mut ticks = tokio::time::interval(HEARTBEAT);
    let mut transitions = std::collections::HashMap::new();
    loop {
        ticks.tick().await;
        let host = match Host::read(&config.data_dir) {
            Ok(host) => host,
            Err(error) => {
                tracing::warn!(%error, "could not read the host's facts");
                continue;
            }
        };
        if let Err(error) = renew_lease(&client, &name).await {
            tracing::warn!(%error, "could not renew the node's lease");
        }
        let nodes: Api<Node> = Api::all(client.clone());
        let mut status = node_status(&host, &name, ip, &now());
        status["daemonEndpoints"]["kubeletEndpoint"]["Port"] = json!(config.port);
        let changed = keep_transitions(&mut status, &mut transitions);
        for reason in changed {
            node_event(&client, &name, reason, &format!("Node {name} status is now: {reason}")).await;
        }
        let status = json!({"status": status});
        match nodes.patch_status(&name, &PatchParams::default(), &Patch::Strategic(status)).await {
            Ok(_) => {}
            // Deleted by someone: register again, as upstream's kubelet does on restart.
            Err(kube::Error::Api(status)) if status.code == 404 => register(&client, &name).await?,
            Err(error) => tracing::warn!(%error, "could not report the node's status"),
        }
    }
}

/// Creates the Node (or takes over one of that name), with upstream's well-known labels.
async fn register(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let labels = json!({"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                        "kubernetes.io/arch": architecture(),
                        "beta.kubernetes.io/os": "linux", "beta.kubernetes.io/arch": architecture()});
    let node: Node = serde_json::from_value(json!({"metadata": {"name": name, "labels": labels}}))?;
    match nodes.create(&PostParams::default(), &node).await {
        Ok(_) => {}
        Err(kube::Error::Api(status)) if status.code == 409 => {
            let patch = json!({"metadata": {"labels": labels}});
            nodes.patch(name, &PatchParams::default(), &Patch::Merge(patch)).await?;
        }
        Err(error) => return Err(error.into()),
    }
    Ok(())
}

/// Renews (or creates) the node's Lease in `kube-node-lease` (hollow nodes renew theirs so too).
pub async fn renew_lease(client: &kube::Client, name: &str) -> kube::Result<()> {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let renewed = json!({"spec": {"holderIdentity": name, "leaseDurationSeconds": LEASE_SECONDS, "renewTime": now()}});
    match leases.patch(name, &PatchParams::default(), &Patch::Merge(&renewed)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            let mut lease = renewed.clone();
            lease["metadata"] = json!({"name": name, "namespace": "kube-node-lease"});
            let lease: Lease = serde_json::from_value(lease).expect("a valid lease");
            leases.create(&PostParams::default(), &lease).await.map(|_| ())
        }
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host() -> Host {
        Host {
            hostname: "n1".into(),
            cpus: 4,
            memory: 8 << 30,
            memory_available: 4 << 30,
            disk: 100 << 30,
            disk_available: 50 << 30,
            kernel: "6.1.0".into(),
            os_image: "Debian GNU/Linux 13 (trixie)".into(),
            machine_id: "m".into(),
            boot_id: "b".into(),
            system_uuid: String::new(),
            processes: 100,
            pid_max: 4_194_304,
        }
    }

    #[test]
    fn the_node_status_reports_the_host_and_keeps_transition_times() {
        let ip: IpAddr = "10.0.0.7".parse().unwrap();
        let mut status = node_status(&host(), "n1", Some(ip), "2026-01-01T00:00:00Z");
        assert_eq!(
            status["capacity"],
            json!({"cpu": "4", "memory": "8388608Ki", "ephemeral-storage": "104857600Ki", "pods": "110"})
        );
        assert_eq!(status["allocatable"]["memory"], "8286208Ki");
        assert_eq!(status["allocatable"]["ephemeral-storage"], ((100u64 << 30) - (100u64 << 30) / 10).to_string());
        assert_eq!(
            status["addresses"],
            json!([{"type": "InternalIP", "address": "10.0.0.7"}, {"type": "Hostname", "address": "n1"}])
        );
        assert_eq!(status["nodeInfo"]["kernelVersion"], "6.1.0");
        let kinds: Vec<(&str, &str)> = status["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["type"].as_str().unwrap(), c["status"].as_str().unwrap()))
            .collect();
        assert_eq!(
            kinds,
            [("MemoryPressure", "False"), ("DiskPressure", "False"), ("PIDPressure", "False"), ("Ready", "True")]
        );

        let mut seen = std::collections::HashMap::new();
        keep_transitions(&mut status, &mut seen);
        let mut later =
            node_status(&Host { memory_available: 1 << 20, ..host() }, "n1", Some(ip), "2026-01-01T00:00:10Z");
        keep_transitions(&mut later, &mut seen);
        let since = |status: &Value, kind: &str| {
            status["conditions"].as_array().unwrap().iter().find(|c| c["type"] == kind).unwrap()["lastTransitionTime"]
                .clone()
        };
        assert_eq!(since(&later, "Ready"), "2026-01-01T00:00:00Z", "unchanged: the first time stays");
        assert_eq!(since(&later, "MemoryPressure"), "2026-01-01T00:00:10Z", "changed: now");
        assert_eq!(since(&later, "DiskPressure"), "2026-01-01T00:00:00Z");
    }
}
