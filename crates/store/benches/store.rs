//! Store benchmark: prints, for each backend, durable writes/s with 1 and 32 concurrent writers,
//! point reads/s, the time to list 10k keys, and watch delivery latency p50/p99.
//!
//! `cargo bench -p tugboat-store --bench store [-- sqlite|etcd] [--quick]`
//!
//! The SQLite store lives in a temp dir (on the same disk as the data dir would); etcd is
//! Debian's etcd-server started on a free loopback port. Goal for SQLite: ≥ 20,000 durable
//! writes/s with 32 writers and watch p99 under 5 ms.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use tugboat_store::{EtcdConfig, EtcdStore, ListOptions, SqliteConfig, SqliteStore, Store};
use tugboat_testkit::EtcdServer;

struct Settings {
    run_for: Duration,
    watch_events: usize,
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let only: Vec<&str> = args.iter().map(String::as_str).filter(|a| matches!(*a, "sqlite" | "etcd")).collect();
    let settings = if quick {
        Settings { run_for: Duration::from_millis(500), watch_events: 200 }
    } else {
        Settings { run_for: Duration::from_secs(3), watch_events: 2000 }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    runtime.block_on(async {
        if only.is_empty() || only.contains(&"sqlite") {
            let dir = tempfile::tempdir().expect("a temp dir");
            let store: Arc<dyn Store> =
                Arc::new(SqliteStore::open(SqliteConfig::in_data_dir(dir.path())).expect("open sqlite"));
            run("sqlite", store, &settings).await;
        }
        if only.is_empty() || only.contains(&"etcd") {
            match EtcdServer::start() {
                Ok(server) => {
                    let config = EtcdConfig::from_endpoint_list(server.client_url()).expect("endpoint");
                    let store: Arc<dyn Store> = Arc::new(EtcdStore::connect(config).await.expect("connect etcd"));
                    run("etcd", store, &settings).await;
                }
                Err(error) => println!("etcd    skipped: {error:#}"),
            }
        }
    });
}

async fn run(name: &str, store: Arc<dyn Store>, settings: &Settings) {
    let value = vec![b'x'; 1024];
    for writers in [1, 32] {
        let rate = write_rate(&store, writers, &value, settings.run_for).await;
        println!("{name:<7} durable writes/s, {writers:>2} writers: {rate:>10.0}");
    }

    // 10k keys of 1 KiB, about the size of a Pod object.
    fill(&store, "/bench/list/", 10_000, &value).await;
    let rate = read_rate(&store, settings.run_for).await;
    println!("{name:<7} point reads/s, 8 readers:    {rate:>10.0}");
    let mut times = Vec::new();
    for _ in 0..5 {
        let started = Instant::now();
        let list = store.list("/bench/list/", ListOptions::default()).await.expect("list");
        times.push(started.elapsed());
        assert_eq!(list.kvs.len(), 10_000);
    }
    times.sort();
    println!("{name:<7} list of 10k keys (median):   {:>10.1} ms", times[2].as_secs_f64() * 1e3);

    let (p50, p99) = watch_latency(&store, settings.watch_events).await;
    println!("{name:<7} watch delivery p50 / p99:    {p50:>6.2} / {p99:.2} ms");
}

/// Creates as many keys as `writers` concurrent tasks manage in `run_for`; each create is
/// acknowledged only once durable.
async fn write_rate(store: &Arc<dyn Store>, writers: usize, value: &[u8], run_for: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for writer in 0..writers {
        let (store, done, value) = (store.clone(), done.clone(), value.to_vec());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while started.elapsed() < run_for {
                store.create(&format!("/bench/w{writers}/{writer}/{i}"), value.clone()).await.expect("create");
                i += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.expect("writer");
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

async fn fill(store: &Arc<dyn Store>, prefix: &str, count: usize, value: &[u8]) {
    let mut tasks = Vec::new();
    for writer in 0..32 {
        let (store, prefix, value) = (store.clone(), prefix.to_string(), value.to_vec());
        tasks.push(tokio::spawn(async move {
            for i in (writer..count).step_by(32) {
                store.create(&format!("{prefix}{i:06}"), value.clone()).await.expect("fill");
            }
        }));
    }
    for task in tasks {
        task.await.expect("filler");
    }
}

async fn read_rate(store: &Arc<dyn Store>, run_for: Duration) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for reader in 0..8u64 {
        let (store, done) = (store.clone(), done.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = reader;
            while started.elapsed() < run_for {
                let key = format!("/bench/list/{:06}", (i * 7919) % 10_000);
                store.get(&key, None).await.expect("get").expect("present");
                i += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for task in tasks {
        task.await.expect("reader");
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// From the moment a write is issued to the moment a watcher holds the event, for writes
/// issued one after another (so each includes a commit and its fsync).
async fn watch_latency(store: &Arc<dyn Store>, events: usize) -> (f64, f64) {
    let base = Instant::now();
    let mut watch =
        store.watch("/bench/watch/", store.current_revision().await.expect("revision")).await.expect("watch");
    let watcher = tokio::spawn(async move {
        let mut latencies = Vec::with_capacity(events);
        while latencies.len() < events {
            let event = watch.next().await.expect("an event").expect("no error");
            let sent = u64::from_le_bytes(event.kv.value[..8].try_into().expect("8 bytes"));
            latencies.push(base.elapsed().as_nanos() as u64 - sent);
        }
        latencies
    });
    for i in 0..events {
        let sent = base.elapsed().as_nanos() as u64;
        let mut value = sent.to_le_bytes().to_vec();
        value.resize(512, b'x');
        store.create(&format!("/bench/watch/{i}"), value).await.expect("create");
    }
    let mut latencies = watcher.await.expect("watcher");
    latencies.sort_unstable();
    let at = |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)] as f64 / 1e6;
    (at(0.50), at(0.99))
}
