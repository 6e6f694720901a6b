//! `netbench`: the service proxy's programming speed, and the cluster DNS's queries/s. In network namespaces of its own, it
//! makes the proxy's nftables table for N Services (two endpoints each, every tenth with a
//! NodePort) from nothing, then changes one Service's endpoints at a time and times each
//! change until its rules are live (nftables changes go over netlink as the proxy writes them;
//! every other one through `nft -f` for comparison); in nftables mode, then in iptables mode. Prints JSON. Goal: 10,000 Services in under 1 s, a change
//! in under 50 ms. Then the DNS server, holding the same Services, answers A queries for
//! them on loopback from `--dns-clients` clients asking one at a time for `--dns-seconds`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use k8s_openapi::api::core::v1::{Endpoints, Service};
use serde_json::{Value, json};
use tugboat_network::proxy::iptables::Tables;
use tugboat_network::proxy::nft::{Command, text};
use tugboat_network::proxy::{Parts, netlink, ports_of, service_ports};

#[derive(Debug, Parser)]
#[command(about = "Benchmark the service proxy's nftables programming; prints JSON")]
struct Args {
    /// Service counts to program, each from an empty table.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    services: Vec<usize>,
    /// Single-Service changes timed after each full programming.
    #[arg(long, default_value_t = 50)]
    changes: usize,
    /// Also time the iptables mode (`--iptables=false` to skip it).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    iptables: bool,
    /// How long the DNS server is asked (seconds).
    #[arg(long, default_value_t = 5)]
    dns_seconds: u64,
    /// DNS clients, each with one query in flight.
    #[arg(long, default_value_t = 4)]
    dns_clients: usize,
}

/// An A query for `name`, as a stub resolver sends it.
fn query(id: u16, name: &str) -> Vec<u8> {
    let mut q = Vec::with_capacity(64);
    q.extend_from_slice(&id.to_be_bytes());
    q.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.split('.').filter(|l| !l.is_empty()) {
        q.push(label.len() as u8);
        q.extend_from_slice(label.as_bytes());
    }
    q.extend_from_slice(&[0, 0, 1, 0, 1]);
    q
}

/// Queries/s and latency of the DNS server holding `services` (and their endpoints).
async fn dns(services: Vec<Service>, endpoints: EndpointsByName, args: &Args) -> anyhow::Result<Value> {
    use kube::runtime::{reflector::store::Writer, watcher::Event};
    let n = services.len();
    let (mut s, mut e) = (Writer::<Service>::default(), Writer::<Endpoints>::default());
    for service in services {
        s.apply_watcher_event(&Event::Apply(service));
    }
    for (_, endpoint) in endpoints {
        e.apply_watcher_event(&Event::Apply((*endpoint).clone()));
    }
    let resolver = tugboat_dns::Resolver::new(s.as_reader(), e.as_reader(), "cluster.local");
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = udp.local_addr()?;
    tokio::spawn(tugboat_dns::serve::serve(resolver, Vec::new(), udp, tcp));
    let until = Instant::now() + Duration::from_secs(args.dns_seconds);
    let mut clients = Vec::new();
    for c in 0..args.dns_clients {
        clients.push(tokio::spawn(async move {
            let socket = tokio::net::UdpSocket::bind("127.0.0.1:0").await?;
            socket.connect(address).await?;
            let mut latencies = Vec::new();
            let mut buf = vec![0u8; 1500];
            let mut i = c;
            while Instant::now() < until {
                let q = query(i as u16, &format!("svc-{}.bench.svc.cluster.local", i % n));
                let started = Instant::now();
                socket.send(&q).await?;
                let got = tokio::time::timeout(Duration::from_secs(1), socket.recv(&mut buf)).await??;
                anyhow::ensure!(got > q.len() && buf[..2] == q[..2] && buf[3] & 0x0f == 0, "a bad answer");
                latencies.push(started.elapsed().as_secs_f64() * 1000.0);
                i += 7;
            }
            anyhow::Ok(latencies)
        }));
    }
    let mut latencies = Vec::new();
    for client in clients {
        latencies.extend(client.await??);
    }
    latencies.sort_by(f64::total_cmp);
    Ok(json!({
        "services": n,
        "clients": args.dns_clients,
        "queries_per_second": latencies.len() as f64 / args.dns_seconds as f64,
        "p50_ms": percentile(&latencies, 0.5),
        "p99_ms": percentile(&latencies, 0.99),
    }))
}

type EndpointsByName = HashMap<(String, String), Arc<Endpoints>>;

fn cluster(n: usize, generation: usize, changed: Option<usize>) -> (Vec<Service>, EndpointsByName) {
    let mut services = Vec::with_capacity(n);
    let mut endpoints = HashMap::with_capacity(n);
    for i in 0..n {
        let name = format!("svc-{i}");
        let mut spec = json!({
            "clusterIP": format!("10.96.{}.{}", i / 250, 1 + i % 250),
            "ports": [{"name": "http", "port": 80, "protocol": "TCP"}],
        });
        if i % 10 == 0 {
            spec["type"] = "NodePort".into();
            spec["ports"][0]["nodePort"] = (30000 + i / 10).into();
        }
        services.push(
            serde_json::from_value(json!({"metadata": {"name": name, "namespace": "bench"}, "spec": spec})).unwrap(),
        );
        let shift = if changed == Some(i) { generation } else { 0 };
        let addresses: Vec<Value> = (0..2)
            .map(|k| json!({"ip": format!("10.{}.{}.{}", 100 + (i * 2 + k + shift) / 62500 % 100, (i * 2 + k + shift) / 250 % 250, 1 + (i * 2 + k + shift) % 250), "nodeName": format!("n{}", (i * 2 + k) % 10)}))
            .collect();
        let e: Endpoints = serde_json::from_value(json!({
            "metadata": {"name": name, "namespace": "bench"},
            "subsets": [{"addresses": addresses, "ports": [{"name": "http", "port": 8080}]}],
        }))
        .unwrap();
        endpoints.insert(("bench".to_string(), name), Arc::new(e));
    }
    (services, endpoints)
}

fn nft(text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = std::process::Command::new("nft")
        .args(["-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child.stdin.take().expect("piped").write_all(text.as_bytes())?;
    let out = child.wait_with_output()?;
    anyhow::ensure!(out.status.success(), "nft: {}", String::from_utf8_lossy(&out.stderr).trim());
    Ok(())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

/// One mode's rules: from nothing, and for one changed Service.
trait Mode {
    type State;
    type Change;
    /// The text programming every Service from nothing.
    fn full(services: &[Service], endpoints: &EndpointsByName) -> (String, Self::State);
    /// Service `victim`'s change (the whole cluster given, as the proxy holds it).
    fn change(
        state: &mut Self::State,
        services: &[Service],
        endpoints: &EndpointsByName,
        victim: usize,
    ) -> Self::Change;
    fn is_empty(change: &Self::Change) -> bool;
    fn apply(text: &str) -> anyhow::Result<()>;
    /// Writes change number `k`; says how ("netlink", "nft", "iptables-restore").
    fn apply_change(change: &Self::Change, k: usize) -> anyhow::Result<&'static str>;
}

struct Nft;
impl Mode for Nft {
    type State = Parts;
    type Change = Vec<Command>;
    fn full(services: &[Service], endpoints: &EndpointsByName) -> (String, Parts) {
        Parts::full(services.iter().map(|s| {
            let key = (s.metadata.namespace.clone().unwrap(), s.metadata.name.clone().unwrap());
            let ports = ports_of(s, endpoints.get(&key).map(|e| &**e), "n1");
            (key, ports)
        }))
    }
    fn change(parts: &mut Parts, services: &[Service], endpoints: &EndpointsByName, victim: usize) -> Vec<Command> {
        // The proxy re-models only the Services its watches reported.
        let s = &services[victim];
        let key = (s.metadata.namespace.clone().unwrap(), s.metadata.name.clone().unwrap());
        let ports = ports_of(s, endpoints.get(&key).map(|e| &**e), "n1");
        let (commands, updates) = parts.changes(vec![(key, ports)]);
        parts.commit(updates);
        commands
    }
    fn is_empty(change: &Vec<Command>) -> bool {
        change.is_empty()
    }
    fn apply(text: &str) -> anyhow::Result<()> {
        nft(text)
    }
    fn apply_change(change: &Vec<Command>, k: usize) -> anyhow::Result<&'static str> {
        if k % 2 == 1 {
            // One socket for the run, as the proxy keeps one.
            thread_local!(static SOCKET: std::cell::RefCell<Option<netlink::Socket>> = const { std::cell::RefCell::new(None) });
            SOCKET.with_borrow_mut(|socket| match socket {
                Some(socket) => socket.write(change),
                None => netlink::Socket::open().and_then(|open| socket.insert(open).write(change)),
            })?;
            Ok("netlink")
        } else {
            nft(&text(change))?;
            Ok("nft")
        }
    }
}

struct Ipt;
impl Mode for Ipt {
    type State = Tables;
    type Change = String;
    fn full(services: &[Service], endpoints: &EndpointsByName) -> (String, Tables) {
        let tables = Tables::new(&service_ports(services, endpoints, "n1"));
        (Tables::changes(None, &tables), tables)
    }
    fn change(tables: &mut Tables, services: &[Service], endpoints: &EndpointsByName, _: usize) -> String {
        // iptables mode models the whole cluster on every change.
        let next = Tables::new(&service_ports(services, endpoints, "n1"));
        let text = Tables::changes(Some(tables), &next);
        *tables = next;
        text
    }
    fn is_empty(change: &String) -> bool {
        change.is_empty()
    }
    fn apply(text: &str) -> anyhow::Result<()> {
        tugboat_network::proxy::iptables::restore(text)
    }
    fn apply_change(change: &String, _: usize) -> anyhow::Result<&'static str> {
        Self::apply(change)?;
        Ok("iptables-restore")
    }
}

/// Programs `n` Services from nothing, then `changes` single-Service endpoint changes.
fn program<M: Mode>(n: usize, changes: usize) -> anyhow::Result<Value> {
    let (services, endpoints) = cluster(n, 0, None);
    let started = Instant::now();
    let (text, mut state) = M::full(&services, &endpoints);
    let computed = started.elapsed();
    M::apply(&text)?;
    let full = started.elapsed();
    // Per way of writing: (whole change, writing only), in ms.
    let mut times: std::collections::BTreeMap<&str, (Vec<f64>, Vec<f64>)> = Default::default();
    for k in 1..=changes {
        let victim = (k * 7919) % n;
        let (services, endpoints) = cluster(n, k * 2, Some(victim));
        let started = Instant::now();
        let change = M::change(&mut state, &services, &endpoints, victim);
        let planned = started.elapsed();
        anyhow::ensure!(!M::is_empty(&change), "change {k} changed nothing");
        let how = M::apply_change(&change, k)?;
        let done = started.elapsed();
        let (whole, writing) = times.entry(how).or_default();
        whole.push(done.as_secs_f64() * 1000.0);
        writing.push((done - planned).as_secs_f64() * 1000.0);
    }
    let mut report = json!({
        "services": n,
        "rules_computed_ms": computed.as_secs_f64() * 1000.0,
        "programmed_from_nothing_ms": full.as_secs_f64() * 1000.0,
    });
    for (how, (mut whole, mut writing)) in times {
        whole.sort_by(f64::total_cmp);
        writing.sort_by(f64::total_cmp);
        // The proxy's own way is the figure; `nft -f` is there to compare.
        let prefix = if how == "nft" { "change_by_nft_cli" } else { "change" };
        report[format!("{prefix}_p50_ms")] = json!(percentile(&whole, 0.5));
        report[format!("{prefix}_p99_ms")] = json!(percentile(&whole, 0.99));
        report[format!("{prefix}_p50_writing_ms")] = json!(percentile(&writing, 0.5));
    }
    Ok(report)
}

async fn run(args: Args) -> anyhow::Result<Value> {
    let mut nftables = Vec::new();
    let mut iptables = Vec::new();
    for &n in &args.services {
        let _ = tugboat_network::proxy::cleanup();
        nftables.push(program::<Nft>(n, args.changes)?);
        let _ = tugboat_network::proxy::cleanup();
        if args.iptables {
            iptables.push(program::<Ipt>(n, args.changes)?);
        }
    }
    let results = json!({"nftables": nftables, "iptables": iptables});
    let _ = tugboat_network::proxy::cleanup();
    let largest = args.services.iter().copied().max().unwrap_or(1000);
    let (services, endpoints) = cluster(largest, 0, None);
    let dns = dns(services, endpoints, &args).await?;
    Ok(json!({"benchmark": "service proxy (nftables) and cluster DNS", "proxy": results, "dns": dns}))
}

fn main() -> std::process::ExitCode {
    // The benchmark writes nftables rules: in namespaces of its own.
    if let Some(code) = tugboat_apibench::isolate() {
        return code;
    }
    tugboat_apibench::report(run(Args::parse()))
}
