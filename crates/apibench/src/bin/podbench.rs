//! `podbench`: pod startup on a real node. Starts `tugboat server` (with its kubelet) in
//! network, mount and pid namespaces of its own (the kubelet makes a bridge and veths; nothing
//! leaves them, and everything dies with the benchmark), imports a busybox image, creates N
//! pods (`--clients` at a time) and measures, for each, the time from its create request to
//! the watch event that shows it Running, and containers started per second. Prints JSON.
//! The upstream SLO is p99 ≤ 5 s; Tugboat's goal is p50 < 100 ms and p99 < 300 ms.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use clap::Parser;
use hyper::Method;
use serde_json::{Value, json};
use tugboat_apibench::{load_target, percentile};

#[derive(Debug, Parser)]
#[command(about = "Benchmark pod startup on a tugboat node; prints JSON")]
struct Args {
    /// The `tugboat` binary to start as `tugboat server`.
    #[arg(long)]
    start: std::path::PathBuf,
    #[arg(long, default_value_t = 100)]
    pods: usize,
    /// Pods created at a time.
    #[arg(long, default_value_t = 1)]
    clients: usize,
}


async fn run(args: Args) -> anyhow::Result<Value> {
    let logs = tempfile_dir()?;
    let server = tugboat_testkit::TugboatServer::start_with_agent(
        &args.start,
        &["--node-name", "bench", "--node-ip", "127.0.0.1", "--pod-log-dir", &logs],
    )?;
    tugboat_testkit::image::import_busybox(&args.start, &server.data_dir())?;
    let target = Arc::new(load_target(&server.kubeconfig())?);
    // The node is ready with a pod CIDR before the clock starts.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let node: Value =
            serde_json::from_slice(&target.expect(Method::GET, "/api/v1/nodes/bench", None, &[200, 404]).await?)
                .unwrap_or_default();
        let ready = node["status"]["conditions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        if ready && node["spec"]["podCIDR"].is_string() {
            break;
        }
        if Instant::now() > deadline {
            bail!("the node never got ready");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // So is what every pod mounts: the default service account and the root CA's configMap
    // (their controllers make them moments after the namespace).
    for path in
        ["/api/v1/namespaces/default/serviceaccounts/default", "/api/v1/namespaces/default/configmaps/kube-root-ca.crt"]
    {
        while target.expect(Method::GET, path, None, &[200]).await.is_err() {
            if Instant::now() > deadline {
                bail!("{path} never appeared");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let collection = "/api/v1/namespaces/default/pods";
    let watch = tugboat_apibench::watch(&target, collection).await?;
    let created: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let wanted = args.pods;
    let watched = created.clone();
    let running = tokio::spawn(async move {
        let mut latencies = HashMap::new();
        watch
            .until(|event| {
                if event["object"]["status"]["phase"] == "Running" {
                    let name = event["object"]["metadata"]["name"].as_str().unwrap_or_default().to_string();
                    if let Some(at) = watched.lock().unwrap().get(&name) {
                        latencies.entry(name).or_insert_with(|| at.elapsed());
                    }
                }
                latencies.len() >= wanted
            })
            .await?;
        anyhow::Ok((latencies, Instant::now()))
    });
    let started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..args.clients.max(1) {
        let (target, created) = (target.clone(), created.clone());
        let (pods, clients) = (args.pods, args.clients.max(1));
        tasks.push(tokio::spawn(async move {
            for i in (client..pods).step_by(clients) {
                let name = format!("p{i}");
                let pod = json!({"metadata": {"name": name},
                                 "spec": {"terminationGracePeriodSeconds": 0,
                                          "containers": [{"name": "c", "image": "busybox:1.35", "command": ["sleep", "3600"]}]}});
                created.lock().unwrap().insert(name.clone(), Instant::now());
                target.expect(Method::POST, collection, Some(&pod), &[201]).await?;
                // One at a time per client: wait until this one runs before the next.
                loop {
                    let pod: Value =
                        serde_json::from_slice(&target.expect(Method::GET, &format!("{collection}/{name}"), None, &[200]).await?)?;
                    if pod["status"]["phase"] == "Running" {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    let (latencies, finished) = tokio::time::timeout(Duration::from_secs(300), running).await???;
    let total = finished.duration_since(started).as_secs_f64();
    // Whatever went wrong on the way (failed syncs retried a second later show as outliers).
    for line in server.log_lines().iter().filter(|l| l.contains("WARN") || l.contains("ERROR")) {
        eprintln!("server: {line}");
    }
    drop(server);
    let _ = std::fs::remove_dir_all(&logs);
    let mut slowest: Vec<(&String, &Duration)> = latencies.iter().collect();
    slowest.sort_by(|a, b| b.1.cmp(a.1));
    for (name, took) in slowest.iter().take(5) {
        eprintln!("slow: {name} {:.1} ms", took.as_secs_f64() * 1000.0);
    }
    let mut ms: Vec<f64> = latencies.values().map(|d| d.as_secs_f64() * 1000.0).collect();
    ms.sort_by(f64::total_cmp);
    Ok(json!({
        "benchmark": "podbench",
        "pods": args.pods,
        "clients": args.clients,
        "startup_ms_p50": (percentile(&ms, 0.50) * 10.0).round() / 10.0,
        "startup_ms_p90": (percentile(&ms, 0.90) * 10.0).round() / 10.0,
        "startup_ms_p99": (percentile(&ms, 0.99) * 10.0).round() / 10.0,
        "startup_ms_max": (ms.last().copied().unwrap_or(0.0) * 10.0).round() / 10.0,
        "containers_per_second": ((args.pods as f64 / total) * 10.0).round() / 10.0,
        "total_seconds": (total * 100.0).round() / 100.0,
    }))
}

fn tempfile_dir() -> anyhow::Result<String> {
    let dir = std::env::temp_dir().join(format!("podbench-logs-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir.display().to_string())
}

fn main() -> std::process::ExitCode {
    // The kubelet makes interfaces: run in namespaces of our own.
    if let Some(code) = tugboat_apibench::isolate() {
        return code;
    }
    tugboat_apibench::report(run(Args::parse()))
}
