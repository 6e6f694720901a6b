//! What the benchmark binaries share: a client for the API server of a kubeconfig. The
//! benchmarks reach a server only through its API (so `--kubeconfig` measures any Kubernetes
//! API server alike) and import no control-plane crate; netbench imports the node crates it
//! measures (`tugboat-network`, `tugboat-dns`), and `testkit` its hosts.

use std::sync::Arc;

use anyhow::{Context, bail};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

pub type HttpClient = Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Just enough of a kubeconfig: the current context's server and credentials.
pub struct Target {
    pub server: String,
    pub client: HttpClient,
    pub token: Option<String>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target").field("server", &self.server).finish_non_exhaustive()
    }
}

fn decode_field(entry: &Value, data: &str, file: &str) -> anyhow::Result<Option<Vec<u8>>> {
    if let Some(data) = entry[data].as_str() {
        return Ok(Some(STANDARD.decode(data).with_context(|| format!("{data}: not base64"))?));
    }
    if let Some(path) = entry[file].as_str() {
        return Ok(Some(std::fs::read(path).with_context(|| format!("reading {path}"))?));
    }
    Ok(None)
}

/// How a benchmark's client talks to the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Protocol {
    /// HTTP/2 (offered by ALPN, as client-go's default transport does), with Go's HTTP/2
    /// transport's flow-control windows (4 MiB a stream, 1 GiB the connection): concurrent
    /// requests are streams of one connection.
    #[default]
    Http2,
    /// HTTP/1.1 only: each concurrent request on a keep-alive connection of its own, one
    /// request at a time on each (a Go client with HTTP/2 off, as load generators often are).
    Http1,
}

pub fn load_target(path: &std::path::Path) -> anyhow::Result<Target> {
    load_target_with(path, Protocol::Http2)
}

pub fn load_target_with(path: &std::path::Path, protocol: Protocol) -> anyhow::Result<Target> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let config: Value = serde_saphyr::from_str(&text).with_context(|| format!("{} is not YAML", path.display()))?;
    let named = |list: &str, name: &str| -> anyhow::Result<Value> {
        config[list]
            .as_array()
            .and_then(|items| items.iter().find(|i| i["name"] == name))
            .cloned()
            .with_context(|| format!("no {list} entry named {name:?}"))
    };
    let context_name = config["current-context"].as_str().context("no current-context")?;
    let context = named("contexts", context_name)?;
    let cluster = named("clusters", context["context"]["cluster"].as_str().context("context without cluster")?)?;
    let user = named("users", context["context"]["user"].as_str().context("context without user")?)?;
    let (cluster, user) = (&cluster["cluster"], &user["user"]);
    let server = cluster["server"].as_str().context("cluster without server")?.trim_end_matches('/').to_string();

    let mut roots = rustls::RootCertStore::empty();
    if let Some(ca) = decode_field(cluster, "certificate-authority-data", "certificate-authority")? {
        for cert in rustls_pemfile::certs(&mut ca.as_slice()) {
            roots.add(cert?)?;
        }
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let cert = decode_field(user, "client-certificate-data", "client-certificate")?;
    let key = decode_field(user, "client-key-data", "client-key")?;
    let tls = match (cert, key) {
        (Some(cert), Some(key)) => {
            let chain = rustls_pemfile::certs(&mut cert.as_slice()).collect::<Result<Vec<_>, _>>()?;
            let key = rustls_pemfile::private_key(&mut key.as_slice())?.context("no private key in the kubeconfig")?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    // TCP_NODELAY, as Go's clients: a body in a second TLS record must not wait 40 ms for
    // the server's delayed ACK.
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    let connector = hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1();
    let client = match protocol {
        Protocol::Http2 => Client::builder(TokioExecutor::new())
            .http2_initial_stream_window_size(4 << 20)
            .http2_initial_connection_window_size(1 << 30)
            .build(connector.enable_http2().wrap_connector(http)),
        Protocol::Http1 => Client::builder(TokioExecutor::new()).build(connector.wrap_connector(http)),
    };
    Ok(Target { server, client, token: user["token"].as_str().map(str::to_string) })
}

impl Target {
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        self.send(method, path, body, "application/json").await
    }

    /// A GET asking for the representations `accept` names.
    pub async fn request_with(&self, method: Method, path: &str, accept: &str) -> anyhow::Result<(StatusCode, Bytes)> {
        self.send(method, path, None, accept).await
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        accept: &str,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        self.send_as(method, path, body, "application/json", accept).await
    }

    /// A request whose body is `content_type` (`application/merge-patch+json` for a patch).
    pub async fn send_as(
        &self,
        method: Method,
        path: &str,
        body: Option<&Value>,
        content_type: &str,
        accept: &str,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let mut request = Request::builder().method(method).uri(format!("{}{path}", self.server));
        if let Some(token) = &self.token {
            request = request.header("Authorization", format!("Bearer {token}"));
        }
        let body = body.map(|b| Bytes::from(b.to_string())).unwrap_or_default();
        let request =
            request.header("Content-Type", content_type).header("Accept", accept).body(Full::new(body))?;
        let response = self.client.request(request).await?;
        let status = response.status();
        Ok((status, response.into_body().collect().await?.to_bytes()))
    }

    pub async fn expect(&self, method: Method, path: &str, body: Option<&Value>, ok: &[u16]) -> anyhow::Result<Bytes> {
        let (status, bytes) = self.request(method.clone(), path, body).await?;
        if !ok.contains(&status.as_u16()) {
            bail!("{method} {path}: {status}: {}", String::from_utf8_lossy(&bytes));
        }
        Ok(bytes)
    }
}

/// A watch of a collection, opened at its current revision.
#[derive(Debug)]
pub struct Watch {
    body: hyper::body::Incoming,
}

/// Lists `collection` for its revision and watches it from there, so the watch sees every
/// change made after this returns (benchmarks count through watches, as upstream's
/// scheduler_perf counts through informers, not by listing).
pub async fn watch(target: &Target, collection: &str) -> anyhow::Result<Watch> {
    let list: Value = serde_json::from_slice(&target.expect(Method::GET, collection, None, &[200]).await?)?;
    let revision = list["metadata"]["resourceVersion"].as_str().unwrap_or("0").to_string();
    let request = Request::builder()
        .uri(format!("{}{collection}?watch=true&resourceVersion={revision}", target.server))
        .body(Full::new(Bytes::new()))?;
    Ok(Watch { body: target.client.request(request).await?.into_body() })
}

impl Watch {
    /// Hands each event to `done` until it says so.
    pub async fn until(mut self, mut done: impl FnMut(&Value) -> bool) -> anyhow::Result<()> {
        let mut buffer = Vec::<u8>::new();
        loop {
            let Some(frame) = self.body.frame().await else { bail!("the watch ended early") };
            let Ok(data) = frame?.into_data() else { continue };
            buffer.extend_from_slice(&data);
            while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buffer.drain(..=end).collect();
                if done(&serde_json::from_slice(&line)?) {
                    return Ok(());
                }
            }
        }
    }
}

/// Runs `operation(i)` for every i below `count`, `clients` at a time (each client takes every
/// `clients`-th i, one after the other, as a client with one connection would).
pub async fn in_parallel<F, Fut>(count: usize, clients: usize, operation: F) -> anyhow::Result<()>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send,
{
    let operation = Arc::new(operation);
    let mut tasks = Vec::new();
    for client in 0..clients {
        let operation = operation.clone();
        tasks.push(tokio::spawn(async move {
            for i in (client..count).step_by(clients) {
                operation(i).await?;
            }
            anyhow::Ok(())
        }));
    }
    for task in tasks {
        task.await??;
    }
    Ok(())
}

/// The value below which a share `p` of the sorted values fall (nearest rank; 0 when empty).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index]
}

/// A child process killed when the benchmark is done with it.
#[derive(Debug)]
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The CPU time a process has used so far (user and system), in seconds.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", pid?)).ok()?;
    // After the command's name (in parentheses, which may hold spaces): fields 14 and 15.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    // In USER_HZ, which Linux fixes at 100 for every architecture's user ABI.
    Some(ticks / 100.0)
}

/// The resident set of a process, in KiB.
pub fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", pid?)).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// The kubeconfig to measure: the one given, or that of a `tugboat server` started from the
/// binary `start` with `server_flags` (returned too: the server lives as long as it does).
pub fn kubeconfig_or_start(
    kubeconfig: Option<&std::path::Path>,
    start: Option<&std::path::Path>,
    server_flags: &[&str],
) -> anyhow::Result<(std::path::PathBuf, Option<tugboat_testkit::TugboatServer>)> {
    match (kubeconfig, start) {
        (Some(path), _) => Ok((path.to_path_buf(), None)),
        (None, Some(binary)) => {
            let server = tugboat_testkit::TugboatServer::start(binary, server_flags)?;
            Ok((server.kubeconfig(), Some(server)))
        }
        (None, None) => bail!("give --kubeconfig or --start"),
    }
}

/// Re-runs this benchmark in network, mount and pid namespaces of its own (for benchmarks that
/// make interfaces or rules: nothing leaves them, everything dies with the benchmark). Returns
/// the exit code to end with in the outer process, `None` inside.
pub fn isolate() -> Option<std::process::ExitCode> {
    if std::env::var_os("TUGBOAT_ISOLATED").is_some() {
        return None;
    }
    let exe = std::env::current_exe().expect("the benchmark binary");
    let status = std::process::Command::new("unshare")
        .args(["--net", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private", "sh", "-c"])
        .arg("ip link set lo up && exec \"$0\" \"$@\"")
        .arg(exe)
        .args(std::env::args_os().skip(1))
        .env("TUGBOAT_ISOLATED", "1")
        .status();
    Some(match status {
        Ok(s) if s.success() => std::process::ExitCode::SUCCESS,
        Ok(_) => std::process::ExitCode::FAILURE,
        Err(error) => {
            eprintln!("error: running unshare (util-linux): {error}");
            std::process::ExitCode::FAILURE
        }
    })
}

/// Runs a benchmark and prints its report as JSON; the exit code says whether it worked.
pub fn report(benchmark: impl Future<Output = anyhow::Result<Value>>) -> std::process::ExitCode {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("a tokio runtime");
    match runtime.block_on(benchmark) {
        Ok(report) => {
            println!("{}", serde_json::to_string_pretty(&report).expect("JSON"));
            std::process::ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
