//! `crdbench`: what installing many CustomResourceDefinitions costs (as a Crossplane-style
//! provider does, ~1,000 of them). Creates N definitions (each with a schema of a few KiB, spread
//! over 50 groups) from a few clients; for each, the time from its create until its resource is
//! served (a list of it answers 200); then discovery (aggregated, as kubectl reads it), a cold
//! `kubectl get` of one of the new kinds, and the server's RSS growth: with the definitions
//! alone, then with a watch open on every new resource (as the operator that installs them
//! has). Prints JSON.
//! `--start target/release/tugboat` starts a server; `--kubeconfig K` measures any cluster.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use hyper::Method;
use serde_json::{Value, json};
use tugboat_apibench::{load_target, rss_kib};

#[derive(Debug, Parser)]
#[command(about = "Benchmark the creation of many CustomResourceDefinitions; prints JSON")]
struct Args {
    #[arg(long, conflicts_with = "start")]
    kubeconfig: Option<std::path::PathBuf>,
    /// Start this `tugboat` binary as `tugboat server` in a temp dir and measure it.
    #[arg(long)]
    start: Option<std::path::PathBuf>,
    #[arg(long, default_value_t = 1000)]
    crds: usize,
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// The kubectl to time a cold `kubectl get` with (skipped when absent).
    #[arg(long, default_value = "kubectl")]
    kubectl: std::path::PathBuf,
}

const GROUPS: usize = 50;

fn group(run: &str, i: usize) -> String {
    format!("g{}.crdbench-{run}.example.com", i % GROUPS)
}

/// A definition shaped like a provider's: a spec of a few dozen typed fields, some nested, a
/// status with conditions, printer columns and the status subresource.
fn definition(run: &str, i: usize) -> Value {
    let mut fields = serde_json::Map::new();
    for f in 0..24 {
        let schema = match f % 6 {
            0 => {
                json!({"type": "string", "description": format!("Field {f} of the resource, a string."), "maxLength": 253})
            }
            1 => {
                json!({"type": "integer", "format": "int64", "minimum": 0, "description": format!("Field {f}, a count.")})
            }
            2 => json!({"type": "boolean", "description": format!("Field {f}, a switch."), "default": false}),
            3 => json!({"type": "array", "items": {"type": "string"}, "description": format!("Field {f}, a list.")}),
            4 => {
                json!({"type": "object", "additionalProperties": {"type": "string"}, "description": format!("Field {f}, a map.")})
            }
            _ => json!({"type": "object", "description": format!("Field {f}, nested."), "properties": {
                "name": {"type": "string"}, "namespace": {"type": "string"},
                "policy": {"type": "object", "properties": {
                    "resolution": {"type": "string", "enum": ["Required", "Optional"], "default": "Required"},
                    "resolve": {"type": "string", "enum": ["Always", "IfNotPresent"]}}}},
                "required": ["name"]}),
        };
        fields.insert(format!("field{f}"), schema);
    }
    let condition = json!({"type": "object", "required": ["type", "status"], "properties": {
        "type": {"type": "string"}, "status": {"type": "string"}, "reason": {"type": "string"},
        "message": {"type": "string"}, "lastTransitionTime": {"type": "string", "format": "date-time"}}});
    let group = group(run, i);
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": format!("widget{i}s.{group}")},
        "spec": {
            "group": group,
            "scope": if i.is_multiple_of(2) { "Cluster" } else { "Namespaced" },
            "names": {"plural": format!("widget{i}s"), "singular": format!("widget{i}"),
                      "kind": format!("Widget{i}"), "listKind": format!("Widget{i}List"),
                      "categories": ["crdbench"]},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "additionalPrinterColumns": [
                    {"name": "READY", "type": "string", "jsonPath": ".status.conditions[?(@.type=='Ready')].status"},
                    {"name": "AGE", "type": "date", "jsonPath": ".metadata.creationTimestamp"}],
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": fields},
                    "status": {"type": "object", "properties": {
                        "conditions": {"type": "array", "items": condition,
                                       "x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
                        "observedGeneration": {"type": "integer"}}}}}}
            }]
        }
    })
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    (sorted[index] * 10.0).round() / 10.0
}

async fn run(args: Args) -> anyhow::Result<Value> {
    let (kubeconfig, started) =
        tugboat_apibench::kubeconfig_or_start(args.kubeconfig.as_deref(), args.start.as_deref(), &[])?;
    let target = Arc::new(load_target(&kubeconfig)?);
    let pid = started.as_ref().map(|s| s.pid());
    let run_id = format!("{:x}", std::process::id());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = rss_kib(pid);
    let definition_bytes = serde_json::to_vec(&definition(&run_id, 0))?.len();

    let all_started = Instant::now();
    let mut tasks = Vec::new();
    for client in 0..args.clients {
        let (target, run_id, count, clients) = (target.clone(), run_id.clone(), args.crds, args.clients);
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            for i in (client..count).step_by(clients) {
                let crd = definition(&run_id, i);
                let started = Instant::now();
                target
                    .expect(Method::POST, "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", Some(&crd), &[201])
                    .await?;
                let list = format!("/apis/{}/v1/widget{i}s?limit=1", group(&run_id, i));
                let deadline = started + Duration::from_secs(60);
                loop {
                    let (status, _) = target.request(Method::GET, &list, None).await?;
                    if status == 200 {
                        break;
                    }
                    anyhow::ensure!(
                        Instant::now() < deadline,
                        "widget{i}s not served 60 s after its definition was created"
                    );
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                latencies.push(started.elapsed().as_secs_f64() * 1000.0);
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for task in tasks {
        latencies.extend(task.await??);
    }
    let all_seconds = all_started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);

    // Discovery as kubectl 1.30+ reads it: the aggregated documents of /api and /apis.
    let mut discovery_ms = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let (status, body) = target
            .request_with(
                Method::GET,
                "/apis",
                "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,application/json",
            )
            .await?;
        anyhow::ensure!(status == 200, "GET /apis answered {status}");
        anyhow::ensure!(body.len() > 1000 * args.crds / 10, "GET /apis is too short to name every new resource");
        discovery_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    discovery_ms.sort_by(f64::total_cmp);

    // A cold kubectl: no discovery cache, so it reads discovery (and the kind's resource) afresh.
    let kubectl_ms = {
        let cache = tempdir()?;
        let started = Instant::now();
        let output = std::process::Command::new(&args.kubectl)
            .arg("--kubeconfig")
            .arg(&kubeconfig)
            .arg("--cache-dir")
            .arg(&cache)
            .args(["get", &format!("widget{}s", args.crds - 1)])
            .output();
        let elapsed = started.elapsed().as_secs_f64() * 1000.0;
        let _ = std::fs::remove_dir_all(&cache);
        match output {
            Ok(output) if output.status.success() => Some(elapsed.round()),
            Ok(output) => anyhow::bail!("kubectl get failed: {}", String::from_utf8_lossy(&output.stderr)),
            Err(error) => {
                eprintln!("kubectl not run ({error}); its figure is left out");
                None
            }
        }
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_after = rss_kib(pid);

    // Then a watch of every new resource, as the operator that installed them opens through its
    // informers (100 to a connection: servers allow a few hundred HTTP/2 streams to one).
    let watches_started = Instant::now();
    let mut watches = Vec::new();
    let mut connection = load_target(&kubeconfig)?;
    for i in 0..args.crds {
        if i.is_multiple_of(100) {
            connection = load_target(&kubeconfig)?;
        }
        let collection = format!("/apis/{}/v1/widget{i}s", group(&run_id, i));
        watches.push(tugboat_apibench::watch(&connection, &collection).await?);
    }
    let watches_seconds = watches_started.elapsed().as_secs_f64();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_watched = rss_kib(pid);
    drop(watches);
    drop(started);
    Ok(json!({
        "server": target.server,
        "crds": args.crds,
        "groups": GROUPS.min(args.crds),
        "clients": args.clients,
        "definition_bytes": definition_bytes,
        "all_served_seconds": (all_seconds * 100.0).round() / 100.0,
        "served_after_create_ms": {"p50": percentile(&latencies, 0.5), "p99": percentile(&latencies, 0.99),
                                   "max": percentile(&latencies, 1.0)},
        "aggregated_discovery_ms_p50": percentile(&discovery_ms, 0.5),
        "kubectl_get_cold_ms": kubectl_ms,
        "server_rss_kib_before": rss_before,
        "server_rss_kib_after": rss_after,
        "server_rss_growth_mib": growth_mib(rss_before, rss_after),
        "watch_every_resource_seconds": (watches_seconds * 100.0).round() / 100.0,
        "server_rss_kib_watched": rss_watched,
        "server_rss_growth_mib_watched": growth_mib(rss_before, rss_watched),
    }))
}

fn growth_mib(before: Option<u64>, after: Option<u64>) -> Value {
    match (before, after) {
        (Some(before), Some(after)) => json!(((after as f64 - before as f64) / 1024.0).round()),
        _ => Value::Null,
    }
}

fn tempdir() -> anyhow::Result<std::path::PathBuf> {
    let path = std::env::temp_dir().join(format!("crdbench-cache-{}", std::process::id()));
    std::fs::create_dir_all(&path)?;
    Ok(path)
}

fn main() -> std::process::ExitCode {
    tugboat_apibench::report(run(Args::parse()))
}
