//! `apibench`: measures a Kubernetes API server and prints one JSON object:
//! creates/s and gets/s with 16 concurrent clients, the latency of listing 5,000 objects, watch
//! latency p50/p99 from a create to its event, and (for a server it started itself) RSS when
//! idle and after the load.
//!
//! `apibench --kubeconfig K` measures any server; `apibench --start target/release/tugboat`
//! starts a `tugboat server` in a temp dir and measures it.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use serde_json::{Value, json};
use tugboat_apibench::{Protocol, load_target_with, rss_kib};

#[derive(Debug, Parser)]
#[command(about = "Benchmark a Kubernetes API server; prints JSON")]
struct Args {
    /// Measure the server of this kubeconfig (its current context).
    #[arg(long, conflicts_with = "start")]
    kubeconfig: Option<std::path::PathBuf>,
    /// Start this `tugboat` binary as `tugboat server` in a temp dir and measure it.
    #[arg(long)]
    start: Option<std::path::PathBuf>,
    /// Concurrent clients for the create and get phases.
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Seconds per throughput phase.
    #[arg(long, default_value_t = 5)]
    seconds: u64,
    /// Objects in the list phase.
    #[arg(long, default_value_t = 5000)]
    list_objects: usize,
    /// Create/event pairs in the watch phase.
    #[arg(long, default_value_t = 500)]
    watch_events: usize,
    /// How cost grows: fill one namespace to each of these counts in turn (e.g.
    /// `1000,10000,100000`) and print, at each, the create rate of the step, the p50 of
    /// listing them all, the server's RSS and what they add to the store's files (the
    /// database and its WAL) per object.
    #[arg(long, value_delimiter = ',')]
    growth: Vec<usize>,
    /// Talk HTTP/1.1 only, each client on a keep-alive connection of its own (the default is
    /// HTTP/2, as client-go: the clients' requests are streams of one connection).
    #[arg(long)]
    http1: bool,
    /// A flag for the server `--start` starts (repeatable), e.g.
    /// `--server-flag=--disable-controller-manager` to see what the controllers cost.
    #[arg(long = "server-flag", allow_hyphen_values = true)]
    server_flags: Vec<String>,
}

fn config_map(name: &str) -> Value {
    // About the size of a small real object.
    json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name, "labels": {"app": "apibench"}},
           "data": {"payload": "x".repeat(512)}})
}

/// Runs `clients` tasks doing `operation(client, i)` until `seconds` pass; returns ops/s.
async fn throughput<F, Fut>(clients: usize, seconds: u64, operation: F) -> anyhow::Result<f64>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let operation = Arc::new(operation);
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for client in 0..clients {
        let (operation, done) = (operation.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while Instant::now() < deadline {
                operation(client, i).await?;
                i += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64())
}

/// `clients` tasks creating `count` ConfigMaps `{prefix}{client}-{i}` in `collection`; returns
/// creates/s.
async fn fill(
    target: &Arc<tugboat_apibench::Target>,
    collection: &str,
    clients: usize,
    prefix: &str,
    count: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let per_client = count.div_ceil(clients);
    let mut fillers = Vec::new();
    for client in 0..clients {
        let (target, collection, prefix) = (target.clone(), collection.to_string(), prefix.to_string());
        let mine = per_client.min(count.saturating_sub(client * per_client));
        fillers.push(tokio::spawn(async move {
            for i in 0..mine {
                let name = format!("{prefix}{client}-{i}");
                target.expect(Method::POST, &collection, Some(&config_map(&name)), &[201]).await?;
            }
            anyhow::Ok(())
        }));
    }
    for filler in fillers {
        filler.await??;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// The growth phase: see `Args::growth`.
async fn growth(
    target: &Arc<tugboat_apibench::Target>,
    args: &Args,
    run_id: &str,
    pid: Option<u32>,
    data_dir: Option<&std::path::Path>,
) -> anyhow::Result<Vec<Value>> {
    let namespace = format!("apibench-growth-{run_id}");
    target.expect(Method::POST, "/api/v1/namespaces", Some(&json!({"metadata": {"name": namespace}})), &[201]).await?;
    let collection = format!("/api/v1/namespaces/{namespace}/configmaps");
    // The store's file and its WAL: what the objects of this phase add to it, per object.
    let store_bytes = || {
        data_dir.map(|dir| {
            ["state.db", "state.db-wal"]
                .iter()
                .filter_map(|f| std::fs::metadata(dir.join("db").join(f)).ok())
                .map(|m| m.len())
                .sum::<u64>()
        })
    };
    let before = store_bytes();
    let (mut have, mut steps) = (0usize, Vec::new());
    for &wanted in &args.growth {
        let step = wanted.saturating_sub(have);
        let creates = fill(target, &collection, args.clients, &format!("g{}-", steps.len()), step).await?;
        have += step;
        let mut list_ms = Vec::new();
        for _ in 0..5 {
            let begin = Instant::now();
            let bytes = target.expect(Method::GET, &collection, None, &[200]).await?;
            list_ms.push(begin.elapsed().as_secs_f64() * 1e3);
            if list_ms.len() == 1 {
                let list: Value = serde_json::from_slice(&bytes)?;
                // Ours (a namespace also holds its `kube-root-ca.crt`).
                let ours = |item: &&Value| item["metadata"]["name"].as_str().is_some_and(|n| n.starts_with('g'));
                let items = list["items"].as_array().map(|items| items.iter().filter(ours).count()).unwrap_or(0);
                if items != have {
                    bail!("listed {items} objects, expected {have}");
                }
            }
        }
        list_ms.sort_by(f64::total_cmp);
        let added = store_bytes().zip(before).map(|(now, before)| now.saturating_sub(before) / have.max(1) as u64);
        steps.push(json!({
            "objects": have,
            "creates_per_second": creates.round(),
            "list_ms_median": (list_ms[2] * 10.0).round() / 10.0,
            "server_rss_kib": rss_kib(pid),
            "store_bytes_per_object": added,
        }));
    }
    Ok(steps)
}

async fn run(args: Args) -> anyhow::Result<Value> {
    let server_flags: Vec<&str> = args.server_flags.iter().map(String::as_str).collect();
    let (kubeconfig, started) =
        tugboat_apibench::kubeconfig_or_start(args.kubeconfig.as_deref(), args.start.as_deref(), &server_flags)?;
    let pid = started.as_ref().map(|s| s.pid());
    let protocol = if args.http1 { Protocol::Http1 } else { Protocol::Http2 };
    let target = Arc::new(load_target_with(&kubeconfig, protocol)?);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_idle = rss_kib(pid);

    let run_id = format!("{:x}", Instant::now().elapsed().as_nanos() ^ u128::from(std::process::id()));
    let namespace = format!("apibench-{run_id}");
    target.expect(Method::POST, "/api/v1/namespaces", Some(&json!({"metadata": {"name": namespace}})), &[201]).await?;
    let collection = format!("/api/v1/namespaces/{namespace}/configmaps");

    let creates = {
        let (target, collection) = (target.clone(), collection.clone());
        throughput(args.clients, args.seconds, move |client, i| {
            let (target, collection) = (target.clone(), collection.clone());
            async move {
                target.expect(Method::POST, &collection, Some(&config_map(&format!("c{client}-{i}"))), &[201]).await?;
                Ok(())
            }
        })
        .await?
    };
    let gets = {
        let (target, collection) = (target.clone(), collection.clone());
        throughput(args.clients, args.seconds, move |client, i| {
            let (target, collection) = (target.clone(), collection.clone());
            async move {
                // Objects that the create phase made for sure.
                target.expect(Method::GET, &format!("{collection}/c{client}-{}", i % 10), None, &[200]).await?;
                Ok(())
            }
        })
        .await?
    };

    // List: a namespace holding `list_objects` objects of ours (and what a cluster puts in every
    // namespace, such as the `kube-root-ca.crt` ConfigMap).
    let list_namespace = format!("apibench-list-{run_id}");
    target
        .expect(Method::POST, "/api/v1/namespaces", Some(&json!({"metadata": {"name": list_namespace}})), &[201])
        .await?;
    let list_collection = format!("/api/v1/namespaces/{list_namespace}/configmaps");
    let per_client = args.list_objects.div_ceil(args.clients);
    let mut fillers = Vec::new();
    for client in 0..args.clients {
        let (target, collection) = (target.clone(), list_collection.clone());
        let count = per_client.min(args.list_objects.saturating_sub(client * per_client));
        fillers.push(tokio::spawn(async move {
            for i in 0..count {
                target.expect(Method::POST, &collection, Some(&config_map(&format!("l{client}-{i}"))), &[201]).await?;
            }
            anyhow::Ok(())
        }));
    }
    for filler in fillers {
        filler.await??;
    }
    let mut list_ms = Vec::new();
    for _ in 0..5 {
        let begin = Instant::now();
        let bytes = target.expect(Method::GET, &list_collection, None, &[200]).await?;
        list_ms.push(begin.elapsed().as_secs_f64() * 1e3);
        let list: Value = serde_json::from_slice(&bytes)?;
        let ours =
            |item: &&Value| item["metadata"]["name"].as_str().is_some_and(|n| n.starts_with('l') && n.contains('-'));
        let items = list["items"].as_array().map(|items| items.iter().filter(ours).count()).unwrap_or(0);
        if items != args.list_objects {
            bail!("listed {items} objects, expected {}", args.list_objects);
        }
    }
    list_ms.sort_by(f64::total_cmp);
    // The same list in pages of 500, as client-go's pager and kubectl read (limit, continue).
    let mut paged_ms = Vec::new();
    for _ in 0..5 {
        let begin = Instant::now();
        let (mut token, mut items) = (None::<String>, 0);
        loop {
            let path = match &token {
                Some(token) => format!("{list_collection}?limit=500&continue={}", percent_encode(token)),
                None => format!("{list_collection}?limit=500"),
            };
            let page: Value = serde_json::from_slice(&target.expect(Method::GET, &path, None, &[200]).await?)?;
            items += page["items"].as_array().map_or(0, Vec::len);
            token = page["metadata"]["continue"].as_str().filter(|t| !t.is_empty()).map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        paged_ms.push(begin.elapsed().as_secs_f64() * 1e3);
        if items < args.list_objects {
            bail!("paged through {items} objects, expected at least {}", args.list_objects);
        }
    }
    paged_ms.sort_by(f64::total_cmp);

    // Watch: from the list's resourceVersion, time each create until its event arrives.
    let watch_namespace = format!("apibench-watch-{run_id}");
    target
        .expect(Method::POST, "/api/v1/namespaces", Some(&json!({"metadata": {"name": watch_namespace}})), &[201])
        .await?;
    let watch_collection = format!("/api/v1/namespaces/{watch_namespace}/configmaps");
    let list: Value = serde_json::from_slice(&target.expect(Method::GET, &watch_collection, None, &[200]).await?)?;
    let revision = list["metadata"]["resourceVersion"].as_str().unwrap_or("0").to_string();
    let request = Request::builder()
        .uri(format!("{}{watch_collection}?watch=true&resourceVersion={revision}", target.server))
        .body(Full::new(Bytes::new()))?;
    let response = target.client.request(request).await?;
    let mut body = response.into_body();
    let base = Instant::now();
    let receiver = tokio::spawn(async move {
        let (mut buffer, mut latencies) = (Vec::<u8>::new(), Vec::new());
        while latencies.len() < args.watch_events {
            let Some(frame) = body.frame().await else { bail!("the watch ended early") };
            let Ok(data) = frame?.into_data() else {
                continue;
            };
            buffer.extend_from_slice(&data);
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                let event: Value = serde_json::from_slice(&line)?;
                if let Some(sent) = event["object"]["metadata"]["annotations"]["sent"].as_str() {
                    let sent: f64 = sent.parse()?;
                    latencies.push(base.elapsed().as_secs_f64() * 1e3 - sent);
                }
            }
        }
        anyhow::Ok(latencies)
    });
    for i in 0..args.watch_events {
        let mut object = config_map(&format!("w{i}"));
        object["metadata"]["annotations"] = json!({"sent": format!("{:.4}", base.elapsed().as_secs_f64() * 1e3)});
        target.expect(Method::POST, &watch_collection, Some(&object), &[201]).await?;
    }
    let mut latencies = tokio::time::timeout(Duration::from_secs(60), receiver).await.context("watch events")???;
    latencies.sort_by(f64::total_cmp);
    let quantile = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
    let rss_after = rss_kib(pid);
    let data_dir = started.as_ref().map(|s| s.data_dir());
    let growth = growth(&target, &args, &run_id, pid, data_dir.as_deref()).await?;
    drop(started);
    Ok(json!({
        "server": target.server,
        "clients": args.clients,
        "protocol": if args.http1 { "HTTP/1.1" } else { "HTTP/2" },
        "creates_per_second": creates.round(),
        "gets_per_second": gets.round(),
        "list_objects": args.list_objects,
        "list_ms_median": (list_ms[2] * 10.0).round() / 10.0,
        "list_paged_500_ms_median": (paged_ms[2] * 10.0).round() / 10.0,
        "watch_events": args.watch_events,
        "watch_latency_ms_p50": (quantile(0.5) * 100.0).round() / 100.0,
        "watch_latency_ms_p99": (quantile(0.99) * 100.0).round() / 100.0,
        "server_rss_kib_idle": rss_idle,
        "server_rss_kib_after_load": rss_after,
        "growth": growth,
    }))
}

fn main() -> std::process::ExitCode {
    tugboat_apibench::report(run(Args::parse()))
}

/// A continue token as a query value (base64's `+`, `/`, `=`).
fn percent_encode(token: &str) -> String {
    token.replace('+', "%2B").replace('/', "%2F").replace('=', "%3D")
}
