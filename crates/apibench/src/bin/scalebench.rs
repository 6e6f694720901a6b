//! `scalebench`: the control plane at a cluster's size on one machine (upstream's density test,
//! kubemark's way). Starts `tugboat server --disable-agent` and `tugboat hollow-nodes --count N`
//! (simulated kubelets in one process: a Lease each every `--lease-renew-interval`, bound pods
//! Running at once), creates P pods with 16 clients, and measures through one watch of every
//! pod (as upstream's density test does through informers): nodes Ready, each pod's startup
//! (create request → Running), scheduling throughput, API create latency; then, with every pod
//! Running, the server's steady CPU (the Leases), RSS, store size, LIST of all pods,
//! `kubectl get pods -A`; then latency pods created at a low rate (upstream's density test's
//! second phase: the pod startup SLO without the flood); last, a node that stops (a second hollow process killed): the time
//! until it is NotReady and until its pods are evicted. Prints JSON.
//!
//! Upstream's SLOs: API calls p99 ≤ 1 s, LIST p99 ≤ 30 s, pod startup p99 ≤ 5 s.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use hyper::Method;
use serde_json::{Value, json};
use tugboat_apibench::{KillOnDrop, Target, in_parallel, load_target, percentile};

#[derive(Debug, Parser)]
#[command(about = "Benchmark the control plane at a cluster's size (hollow nodes); prints JSON")]
struct Args {
    /// The `tugboat` binary: it runs the server and the hollow nodes.
    #[arg(long)]
    start: std::path::PathBuf,
    #[arg(long, default_value_t = 1000)]
    nodes: usize,
    #[arg(long, default_value_t = 10_000)]
    pods: usize,
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// How often each hollow node renews its Lease.
    #[arg(long, default_value = "10s")]
    lease_renew_interval: String,
    /// Pods put on the node that stops (they tolerate its NotReady taints for 0 s).
    #[arg(long, default_value_t = 30)]
    evicted_pods: usize,
    /// Latency pods (upstream's density test): once every pod runs, this many more pods are
    /// created at `--latency-qps`, each one's startup measured (the pod startup SLO's figure,
    /// apart from the creation flood of the first phase).
    #[arg(long, default_value_t = 100)]
    latency_pods: usize,
    #[arg(long, default_value_t = 10.0)]
    latency_qps: f64,
    /// A flag for `tugboat server` (repeat it): `--server-flag=--node-monitor-grace-period=10s`.
    #[arg(long = "server-flag", allow_hyphen_values = true)]
    server_flags: Vec<String>,
}


fn round(value: f64, places: i32) -> f64 {
    let scale = 10f64.powi(places);
    (value * scale).round() / scale
}


fn hollow_nodes(binary: &std::path::Path, kubeconfig: &std::path::Path, args: &[&str]) -> anyhow::Result<KillOnDrop> {
    let child = std::process::Command::new(binary)
        .arg("hollow-nodes")
        .arg("--kubeconfig")
        .arg(kubeconfig)
        .args(args)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    Ok(KillOnDrop(child))
}

fn is_ready(node: &Value) -> Option<&str> {
    node["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == "Ready")?["status"].as_str()
}

/// Nodes whose names start with `prefix` and whose Ready condition is `status`.
async fn nodes_with(target: &Target, prefix: &str, status: &str) -> anyhow::Result<usize> {
    let list: Value =
        serde_json::from_slice(&target.expect(Method::GET, "/api/v1/nodes?resourceVersion=0", None, &[200]).await?)?;
    Ok(list["items"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["metadata"]["name"].as_str().is_some_and(|name| name.starts_with(prefix)))
        .filter(|n| is_ready(n) == Some(status))
        .count())
}

/// When each pod (by name) was seen bound and Running, from a watch of every pod.
#[derive(Debug, Default)]
struct Seen {
    bound: HashMap<String, Instant>,
    running: HashMap<String, Instant>,
}

async fn run(args: Args) -> anyhow::Result<Value> {
    let server_flags: Vec<&str> = args.server_flags.iter().map(String::as_str).collect();
    let server = tugboat_testkit::TugboatServer::start(&args.start, &server_flags)?;
    let (kubeconfig, pid) = (server.kubeconfig(), Some(server.pid()));
    let target = Arc::new(load_target(&kubeconfig)?);
    let rss_idle = tugboat_apibench::rss_kib(pid);

    // Nodes.
    let nodes_started = Instant::now();
    let count = args.nodes.to_string();
    let _hollow = hollow_nodes(
        &args.start,
        &kubeconfig,
        &["--count", &count, "--name-prefix", "hollow-", "--lease-renew-interval", &args.lease_renew_interval],
    )?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while nodes_with(&target, "hollow-", "True").await? < args.nodes {
        anyhow::ensure!(Instant::now() < deadline, "the hollow nodes are not all Ready after 10 minutes");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let nodes_ready_seconds = nodes_started.elapsed().as_secs_f64();
    eprintln!("{} nodes Ready in {nodes_ready_seconds:.1} s", args.nodes);
    // The node that will stop, started now (a hollow process lists every pod when it starts)
    // and cordoned: only the pods put on it by name run there.
    let doomed = hollow_nodes(
        &args.start,
        &kubeconfig,
        &["--count", "1", "--name-prefix", "doomed-", "--lease-renew-interval", &args.lease_renew_interval],
    )?;
    let deadline = Instant::now() + Duration::from_secs(120);
    while nodes_with(&target, "doomed-", "True").await? < 1 {
        anyhow::ensure!(Instant::now() < deadline, "the node to stop is not Ready after 2 minutes");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let doomed_name = {
        let list: Value =
            serde_json::from_slice(&target.expect(Method::GET, "/api/v1/nodes?resourceVersion=0", None, &[200]).await?)?;
        list["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|n| n["metadata"]["name"].as_str())
            .find(|n| n.starts_with("doomed-"))
            .unwrap_or_default()
            .to_string()
    };
    let (status, body) = target
        .send_as(
            Method::PATCH,
            &format!("/api/v1/nodes/{doomed_name}"),
            Some(&json!({"spec": {"unschedulable": true}})),
            "application/merge-patch+json",
            "application/json",
        )
        .await?;
    anyhow::ensure!(status.is_success(), "cordoning {doomed_name}: {status}: {}", String::from_utf8_lossy(&body));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let rss_nodes = tugboat_apibench::rss_kib(pid);

    // Pods, counted through one watch of every pod.
    target.expect(Method::POST, "/api/v1/namespaces", Some(&json!({"metadata": {"name": "scale"}})), &[201]).await?;
    let seen = Arc::new(Mutex::new(Seen::default()));
    let watch = tugboat_apibench::watch(&target, "/api/v1/namespaces/scale/pods").await?;
    let wanted = args.pods;
    let watching = {
        let seen = seen.clone();
        tokio::spawn(async move {
            watch
                .until(|event| {
                    let object = &event["object"];
                    let Some(name) = object["metadata"]["name"].as_str() else { return false };
                    let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                    let now = Instant::now();
                    if object["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty()) {
                        seen.bound.entry(name.to_string()).or_insert(now);
                    }
                    if object["status"]["phase"] == "Running" {
                        seen.running.entry(name.to_string()).or_insert(now);
                    }
                    seen.running.len() >= wanted
                })
                .await
        })
    };
    let created: Arc<Mutex<HashMap<String, (Instant, f64)>>> = Arc::default();
    let cpu_before = tugboat_apibench::cpu_seconds(pid);
    let pods_started = Instant::now();
    {
        let (target, created) = (target.clone(), created.clone());
        in_parallel(args.pods, args.clients, move |i| {
            let (target, created) = (target.clone(), created.clone());
            async move {
                let name = format!("p{i}");
                let pod = json!({"metadata": {"name": name, "labels": {"app": "scale"}},
                                 "spec": {"containers": [{"name": "c", "image": "pause",
                                          "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}});
                let begin = Instant::now();
                target.expect(Method::POST, "/api/v1/namespaces/scale/pods", Some(&pod), &[201]).await?;
                let took = begin.elapsed().as_secs_f64();
                created.lock().unwrap_or_else(|e| e.into_inner()).insert(name, (begin, took));
                Ok(())
            }
        })
        .await?;
    }
    let created_seconds = pods_started.elapsed().as_secs_f64();
    eprintln!("{} pods created in {created_seconds:.1} s; waiting until all are Running", args.pods);
    tokio::time::timeout(Duration::from_secs(1800), watching)
        .await
        .map_err(|_| anyhow::anyhow!("pods still not Running after 30 minutes"))???;
    let running_seconds = pods_started.elapsed().as_secs_f64();
    let cpu_run = tugboat_apibench::cpu_seconds(pid).zip(cpu_before).map(|(after, before)| after - before);

    let (mut startup, mut create_latency, last_bound) = {
        let (seen, created) = (seen.lock().unwrap_or_else(|e| e.into_inner()), created.lock().unwrap_or_else(|e| e.into_inner()));
        let startup: Vec<f64> = created
            .iter()
            .filter_map(|(name, (begin, _))| Some(seen.running.get(name)?.duration_since(*begin).as_secs_f64()))
            .collect();
        let latency: Vec<f64> = created.values().map(|(_, took)| *took).collect();
        (startup, latency, seen.bound.values().max().copied())
    };
    startup.sort_by(f64::total_cmp);
    create_latency.sort_by(f64::total_cmp);
    let bound_seconds = last_bound.map(|t| t.duration_since(pods_started).as_secs_f64()).unwrap_or(running_seconds);
    eprintln!("all Running after {running_seconds:.1} s");

    // Steady state: every pod Running, the nodes renewing their Leases.
    tokio::time::sleep(Duration::from_secs(10)).await;
    let cpu_a = tugboat_apibench::cpu_seconds(pid);
    tokio::time::sleep(Duration::from_secs(20)).await;
    let steady_cores = tugboat_apibench::cpu_seconds(pid).zip(cpu_a).map(|(b, a)| (b - a) / 20.0);
    let rss_pods = tugboat_apibench::rss_kib(pid);
    let store_bytes: u64 = std::fs::read_dir(server.data_dir().join("db"))
        .map(|entries| entries.flatten().filter_map(|e| e.metadata().ok()).map(|m| m.len()).sum())
        .unwrap_or(0);
    let mut list_ms = Vec::new();
    let mut list_bytes = 0;
    for _ in 0..3 {
        let begin = Instant::now();
        list_bytes = target.expect(Method::GET, "/api/v1/pods", None, &[200]).await?.len();
        list_ms.push(begin.elapsed().as_secs_f64() * 1e3);
    }
    list_ms.sort_by(f64::total_cmp);
    let kubectl_seconds = {
        let begin = Instant::now();
        let status = std::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .args(["get", "pods", "-A"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status();
        status.ok().filter(|s| s.success()).map(|_| round(begin.elapsed().as_secs_f64(), 2))
    };
    eprintln!("measured the steady state; now {} latency pods at {}/s", args.latency_pods, args.latency_qps);
    let mut latency = latency_pods(&target, args.latency_pods, args.latency_qps).await?;
    latency.sort_by(f64::total_cmp);
    eprintln!("now a node stops");

    // A node that stops: its pods tolerate NotReady for 0 s, so they go as soon as it is.
    let eviction = stop_a_node(&target, doomed, &doomed_name, args.evicted_pods).await;
    if let Err(error) = &eviction {
        eprintln!("the stopped node's figures are missing: {error:#}");
    }
    let (not_ready_seconds, evicted_seconds) = match eviction {
        Ok((a, b)) => (Some(round(a, 1)), Some(round(b, 1))),
        Err(_) => (None, None),
    };

    drop(server);
    Ok(json!({
        "nodes": args.nodes,
        "pods": args.pods,
        "lease_renew_interval": args.lease_renew_interval,
        "nodes_ready_seconds": round(nodes_ready_seconds, 1),
        "pods_created_seconds": round(created_seconds, 1),
        "pods_all_bound_seconds": round(bound_seconds, 1),
        "pods_all_running_seconds": round(running_seconds, 1),
        "scheduling_pods_per_second": (args.pods as f64 / bound_seconds).round(),
        "pod_startup_seconds_p50": round(percentile(&startup, 0.5), 3),
        "pod_startup_seconds_p99": round(percentile(&startup, 0.99), 3),
        "latency_pods": args.latency_pods,
        "latency_pods_per_second": args.latency_qps,
        "latency_pod_startup_seconds_p50": round(percentile(&latency, 0.5), 3),
        "latency_pod_startup_seconds_p99": round(percentile(&latency, 0.99), 3),
        "create_latency_ms_p50": round(percentile(&create_latency, 0.5) * 1e3, 1),
        "create_latency_ms_p99": round(percentile(&create_latency, 0.99) * 1e3, 1),
        "server_cpu_cores_while_creating": cpu_run.map(|c| round(c / running_seconds, 2)),
        "server_cpu_cores_steady": steady_cores.map(|c| round(c, 2)),
        "server_rss_mib_idle": rss_idle.map(|k| k / 1024),
        "server_rss_mib_with_nodes": rss_nodes.map(|k| k / 1024),
        "server_rss_mib_with_pods": rss_pods.map(|k| k / 1024),
        "server_rss_kib_per_pod": rss_nodes.zip(rss_pods).map(|(n, p)| round(p.saturating_sub(n) as f64 / args.pods as f64, 1)),
        "store_mib": store_bytes / (1 << 20),
        "list_all_pods_ms_p50": round(list_ms[1], 1),
        "list_all_pods_mib": list_bytes / (1 << 20),
        "kubectl_get_pods_all_namespaces_seconds": kubectl_seconds,
        "node_stopped_to_not_ready_seconds": not_ready_seconds,
        "node_not_ready_to_pods_evicted_seconds": evicted_seconds,
    }))
}

/// Upstream density test's latency pods: `count` pods created one at a time, `qps` a second,
/// into a cluster already full; returns each one's startup (create request → Running, seen
/// through a watch) in seconds.
async fn latency_pods(target: &Arc<Target>, count: usize, qps: f64) -> anyhow::Result<Vec<f64>> {
    anyhow::ensure!(qps > 0.0, "--latency-qps must be positive");
    target.expect(Method::POST, "/api/v1/namespaces", Some(&json!({"metadata": {"name": "latency"}})), &[201]).await?;
    let running: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch = tugboat_apibench::watch(target, "/api/v1/namespaces/latency/pods").await?;
    let watching = {
        let running = running.clone();
        tokio::spawn(watch.until(move |event| {
            let object = &event["object"];
            let mut running = running.lock().unwrap_or_else(|e| e.into_inner());
            if object["status"]["phase"] == "Running"
                && let Some(name) = object["metadata"]["name"].as_str()
            {
                running.entry(name.to_string()).or_insert_with(Instant::now);
            }
            running.len() >= count
        }))
    };
    let mut created = HashMap::new();
    let mut ticks = tokio::time::interval(Duration::from_secs_f64(1.0 / qps));
    for i in 0..count {
        ticks.tick().await;
        let name = format!("l{i}");
        let pod = json!({"metadata": {"name": name, "labels": {"app": "latency"}},
                         "spec": {"containers": [{"name": "c", "image": "pause",
                                  "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}});
        created.insert(name, Instant::now());
        target.expect(Method::POST, "/api/v1/namespaces/latency/pods", Some(&pod), &[201]).await?;
    }
    if count > 0 {
        tokio::time::timeout(Duration::from_secs(300), watching)
            .await
            .map_err(|_| anyhow::anyhow!("latency pods still not Running after 5 minutes"))???;
    }
    let running = running.lock().unwrap_or_else(|e| e.into_inner());
    Ok(created.iter().filter_map(|(name, begin)| Some(running.get(name)?.duration_since(*begin).as_secs_f64())).collect())
}

/// Puts `count` pods on the node `name` (run by `doomed`), kills its process once they run,
/// and returns the seconds until the node is NotReady and then until its pods are evicted.
async fn stop_a_node(target: &Target, mut doomed: KillOnDrop, name: &str, count: usize) -> anyhow::Result<(f64, f64)> {
    for i in 0..count {
        let toleration = |key: &str| json!({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 0});
        let pod = json!({"metadata": {"name": format!("e{i}")},
                         "spec": {"nodeName": name,
                                  "tolerations": [toleration("node.kubernetes.io/not-ready"), toleration("node.kubernetes.io/unreachable")],
                                  "containers": [{"name": "c", "image": "pause"}]}});
        target.expect(Method::POST, "/api/v1/namespaces/scale/pods", Some(&pod), &[201]).await?;
    }
    // Each pod read by name: a list filtered by node would decode every pod of the cluster.
    let pods = || async {
        let mut pods = Vec::new();
        for i in 0..count {
            let path = format!("/api/v1/namespaces/scale/pods/e{i}");
            let (status, body) = target.request(Method::GET, &path, None).await?;
            if status.is_success() {
                pods.push(serde_json::from_slice::<Value>(&body)?);
            }
        }
        anyhow::Ok(pods)
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let running = pods().await?.iter().filter(|p| p["status"]["phase"] == "Running").count();
        if running >= count {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the stopping node's pods are not Running after 2 minutes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let _ = doomed.0.kill();
    let _ = doomed.0.wait();
    let stopped = Instant::now();
    let deadline = stopped + Duration::from_secs(300);
    let mut not_ready = None;
    let evicted = loop {
        if not_ready.is_none() {
            let node: Value = serde_json::from_slice(
                &target.expect(Method::GET, &format!("/api/v1/nodes/{name}"), None, &[200]).await?,
            )?;
            if is_ready(&node) != Some("True") {
                not_ready = Some(Instant::now());
            }
        } else {
            let left = pods().await?.iter().filter(|p| p["metadata"]["deletionTimestamp"].is_null()).count();
            if left == 0 {
                break Instant::now();
            }
        }
        anyhow::ensure!(Instant::now() < deadline, "the stopped node's pods were not evicted in 5 minutes");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let not_ready = not_ready.unwrap_or(evicted);
    Ok((not_ready.duration_since(stopped).as_secs_f64(), evicted.duration_since(not_ready).as_secs_f64()))
}

fn main() -> std::process::ExitCode {
    tugboat_apibench::report(run(Args::parse()))
}
