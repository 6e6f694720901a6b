//! `etcdbench`: the etcd v3 API's Put and Range throughput — Tugboat's (`tugboat server`'s
//! `--etcd-api-listen`, over the embedded store, mutual TLS) side by side with a real etcd
//! (Debian's etcd-server, plain HTTP on loopback) on the same machine, both driven by the same
//! etcd-client clients (one HTTP/2 connection, `--clients` requests in flight, as kube-apiserver
//! talks to etcd). Prints JSON.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};
use serde_json::{Value, json};
use tugboat_apibench::{in_parallel, percentile};

#[derive(Debug, Parser)]
#[command(about = "Put and Range through the etcd API: Tugboat's and a real etcd's; prints JSON")]
struct Args {
    /// The `tugboat` binary (its server serves the etcd API).
    #[arg(long)]
    start: PathBuf,
    /// Keys put, then read one by one.
    #[arg(long, default_value_t = 5000)]
    keys: usize,
    #[arg(long, default_value_t = 16)]
    clients: usize,
    #[arg(long, default_value_t = 256)]
    value_bytes: usize,
}

/// Puts `keys` keys, gets each, ranges over all of them; the figures.
async fn measure(client: Client, args: &Args) -> anyhow::Result<Value> {
    let value = vec![b'v'; args.value_bytes];
    let begin = Instant::now();
    {
        let client = client.clone();
        in_parallel(args.keys, args.clients, move |i| {
            let (mut client, value) = (client.clone(), value.clone());
            async move {
                client.put(format!("/bench/k{i:07}"), value, None).await?;
                Ok(())
            }
        })
        .await?;
    }
    let puts = args.keys as f64 / begin.elapsed().as_secs_f64();
    let begin = Instant::now();
    {
        let client = client.clone();
        in_parallel(args.keys, args.clients, move |i| {
            let mut client = client.clone();
            async move {
                let got = client.get(format!("/bench/k{i:07}"), None).await?;
                anyhow::ensure!(got.kvs().len() == 1, "key {i} missing");
                Ok(())
            }
        })
        .await?;
    }
    let gets = args.keys as f64 / begin.elapsed().as_secs_f64();
    let mut ranges = Vec::new();
    for _ in 0..5 {
        let begin = Instant::now();
        let all = client.clone().get("/bench/", Some(GetOptions::new().with_prefix())).await?;
        anyhow::ensure!(all.kvs().len() == args.keys, "the range holds {} keys", all.kvs().len());
        ranges.push(begin.elapsed().as_secs_f64() * 1e3);
    }
    ranges.sort_by(f64::total_cmp);
    Ok(json!({
        "puts_per_second": puts.round(),
        "gets_per_second": gets.round(),
        "range_all_ms_p50": (percentile(&ranges, 0.5) * 10.0).round() / 10.0,
    }))
}

async fn run(args: Args) -> anyhow::Result<Value> {
    let mut server = tugboat_testkit::TugboatServer::start(&args.start, &[])?;
    let address = server.etcd_api_address().ok_or_else(|| anyhow::anyhow!("the server serves no etcd API"))?;
    let pki = server.data_dir().join("pki/etcd");
    let read = |name: &str| std::fs::read(pki.join(name));
    let tls = TlsOptions::new()
        .ca_certificate(Certificate::from_pem(read("ca.crt")?))
        .identity(Identity::from_pem(read("server.crt")?, read("server.key")?));
    let tugboat =
        Client::connect([format!("https://{address}")], Some(ConnectOptions::new().with_tls(tls))).await?;
    let tugboat = measure(tugboat, &args).await?;
    drop(server);
    let etcd = tokio::task::spawn_blocking(tugboat_testkit::EtcdServer::start).await??;
    let client = Client::connect([etcd.client_url()], None).await?;
    let etcd_figures = measure(client, &args).await?;
    Ok(json!({
        "keys": args.keys,
        "clients": args.clients,
        "value_bytes": args.value_bytes,
        "tugboat_etcd_api": tugboat,
        "etcd": etcd_figures,
    }))
}

fn main() -> std::process::ExitCode {
    tugboat_apibench::report(run(Args::parse()))
}
