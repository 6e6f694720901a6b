//! `schedbench`: scheduling throughput through the API. Creates N nodes and then M pods (with
//! 16 clients), and measures pods/s from the first pod created until every pod is bound.
//! Prints JSON. `--start target/release/tugboat` starts a server (with its scheduler);
//! `--kubeconfig K` measures any cluster's scheduler the same way (it creates Node objects).
//! `--backlog` (with `--start`) measures the scheduler alone: the server runs without one, the
//! pods are created first, then `tugboat scheduler` starts and the clock runs from its start
//! (its first lists included) until every pod is bound.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hyper::Method;
use serde_json::{Value, json};
use tugboat_apibench::{KillOnDrop, in_parallel, load_target};

#[derive(Debug, Parser)]
#[command(about = "Benchmark a scheduler through the API; prints JSON")]
struct Args {
    #[arg(long, conflicts_with = "start")]
    kubeconfig: Option<std::path::PathBuf>,
    /// Start this `tugboat` binary as `tugboat server` in a temp dir and measure it.
    #[arg(long)]
    start: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 500)]
    nodes: usize,
    #[arg(long, default_value_t = 1000)]
    pods: usize,
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Start the scheduler only once every pod exists (needs --start).
    #[arg(long, requires = "start")]
    backlog: bool,
}

async fn run(args: Args) -> anyhow::Result<Value> {
    let (kubeconfig, started) = tugboat_apibench::kubeconfig_or_start(
        args.kubeconfig.as_deref(),
        args.start.as_deref(),
        if args.backlog { &["--disable-scheduler"] } else { &[] },
    )?;
    let target = Arc::new(load_target(&kubeconfig)?);
    let run_id = format!("{:x}", std::process::id());

    let nodes_started = Instant::now();
    {
        let (target, run_id) = (target.clone(), run_id.clone());
        in_parallel(args.nodes, args.clients, move |i| {
            let (target, run_id) = (target.clone(), run_id.clone());
            async move {
                let name = format!("bench-{run_id}-{i}");
                let node = json!({"metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
                                  "status": {"allocatable": {"cpu": "32", "memory": "64Gi", "pods": "110"},
                                             "capacity": {"cpu": "32", "memory": "64Gi", "pods": "110"}}});
                target.expect(Method::POST, "/api/v1/nodes", Some(&node), &[201]).await?;
                Ok(())
            }
        })
        .await?;
    }
    let nodes_seconds = nodes_started.elapsed().as_secs_f64();
    // Let the cluster settle before the clock starts: the scheduler's node watch catches up and
    // the controller manager gives each new node its pod CIDR. Settled = no write for a second.
    let mut last = String::new();
    let settle_deadline = Instant::now() + Duration::from_secs(120);
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let list: Value =
            serde_json::from_slice(&target.expect(Method::GET, "/api/v1/nodes?limit=1", None, &[200]).await?)?;
        let revision = list["metadata"]["resourceVersion"].as_str().unwrap_or_default().to_string();
        if revision == last || Instant::now() > settle_deadline {
            break;
        }
        last = revision;
    }

    let namespace = format!("schedbench-{run_id}");
    target.expect(Method::POST, "/api/v1/namespaces", Some(&json!({"metadata": {"name": namespace}})), &[201]).await?;
    let collection = format!("/api/v1/namespaces/{namespace}/pods");
    // Bindings are counted from a watch of the namespace's pods (as upstream's scheduler_perf
    // counts through informers), not by listing: the benchmark must not load the server.
    let watch = tugboat_apibench::watch(&target, &collection).await?;
    let wanted = args.pods;
    let bound = tokio::spawn(async move {
        let mut names = std::collections::HashSet::new();
        watch
            .until(|event| {
                if event["object"]["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty()) {
                    names.insert(event["object"]["metadata"]["name"].as_str().unwrap_or_default().to_string());
                }
                names.len() >= wanted
            })
            .await?;
        anyhow::Ok(Instant::now())
    });
    let pid = started.as_ref().map(|s| s.pid());
    let rss_before = tugboat_apibench::rss_kib(pid);
    let pods_started = Instant::now();
    {
        let (target, collection) = (target.clone(), collection.clone());
        in_parallel(args.pods, args.clients, move |i| {
            let (target, collection) = (target.clone(), collection.clone());
            async move {
                let pod = json!({"metadata": {"name": format!("p{i}"), "labels": {"app": "bench"}},
                                 "spec": {"containers": [{"name": "c", "image": "pause",
                                          "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}});
                target.expect(Method::POST, &collection, Some(&pod), &[201]).await?;
                Ok(())
            }
        })
        .await?;
    }
    let created_seconds = pods_started.elapsed().as_secs_f64();
    eprintln!("{} pods created in {created_seconds:.2} s; waiting until all are bound", args.pods);
    let (clock_started, scheduler) = match (&args.start, args.backlog) {
        (Some(binary), true) => {
            let scheduler = std::process::Command::new(binary)
                .args(["scheduler", "--kubeconfig"])
                .arg(&kubeconfig)
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()?;
            (Instant::now(), Some(KillOnDrop(scheduler)))
        }
        _ => (pods_started, None),
    };
    let all_bound = tokio::time::timeout(Duration::from_secs(600), bound)
        .await
        .map_err(|_| anyhow::anyhow!("pods still unbound after 10 minutes"))???;
    let bound_seconds = all_bound.duration_since(clock_started).as_secs_f64();
    // What the pods cost the server (its caches, informers, scheduler and controllers), once
    // the writes that follow binding have settled; and listing them all.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let rss_after = tugboat_apibench::rss_kib(pid);
    let mut list_ms = Vec::new();
    for _ in 0..5 {
        let begin = Instant::now();
        target.expect(Method::GET, &collection, None, &[200]).await?;
        list_ms.push(begin.elapsed().as_secs_f64() * 1e3);
    }
    list_ms.sort_by(f64::total_cmp);
    drop(scheduler);
    drop(started);
    Ok(json!({
        "server": target.server,
        "nodes": args.nodes,
        "pods": args.pods,
        "mode": if args.backlog { "backlog: scheduler started after the pods were created" } else { "pods created while the scheduler runs" },
        "nodes_created_seconds": (nodes_seconds * 100.0).round() / 100.0,
        "pods_created_seconds": (created_seconds * 100.0).round() / 100.0,
        "all_bound_seconds": (bound_seconds * 100.0).round() / 100.0,
        "pods_per_second": (args.pods as f64 / bound_seconds).round(),
        "list_pods_ms_median": (list_ms[2] * 10.0).round() / 10.0,
        "server_rss_kib_before_pods": rss_before,
        "server_rss_kib_after_pods": rss_after,
        "server_rss_kib_per_pod": rss_before.zip(rss_after).map(|(b, a)| (a.saturating_sub(b) as f64 / args.pods as f64 * 10.0).round() / 10.0),
    }))
}


fn main() -> std::process::ExitCode {
    tugboat_apibench::report(run(Args::parse()))
}
