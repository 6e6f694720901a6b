//! Helpers shared by Tugboat's tests and benchmarks. Everything here runs on loopback and in
//! temporary directories, and cleans up on drop. It drives Tugboat from outside (the `tugboat`
//! binary, kubectl, the API) and imports none of Tugboat's crates, so what a test proves holds
//! for the product as users run it.

pub mod hosts;
pub mod image;

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Waits until `check` holds (polling every 100 ms), panicking with `what` after 30 s.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A loopback TCP port that was free a moment ago.
pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .expect("binding an ephemeral loopback port")
}

/// The `etcd` binary: `$TUGBOAT_ETCD`, else `etcd` on PATH (Debian's `etcd-server`).
pub fn etcd_binary() -> PathBuf {
    std::env::var_os("TUGBOAT_ETCD").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("etcd"))
}

/// A real single-member etcd on loopback, in its own temporary data dir, stopped on drop.
#[derive(Debug)]
pub struct EtcdServer {
    child: Child,
    client_url: String,
    dir: tempfile::TempDir,
}

impl EtcdServer {
    /// Starts etcd and waits until it reports healthy.
    pub fn start() -> anyhow::Result<EtcdServer> {
        let mut last_error = None;
        // Ports are picked free but could be taken before etcd binds them: retry a few times.
        for _ in 0..3 {
            match Self::try_start() {
                Ok(server) => return Ok(server),
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.expect("at least one attempt"))
    }

    fn try_start() -> anyhow::Result<EtcdServer> {
        let dir = tempfile::Builder::new().prefix("tugboat-etcd-").tempdir()?;
        let (client_port, peer_port) = (free_port(), free_port());
        let client_url = format!("http://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let log = std::fs::File::create(dir.path().join("etcd.log"))?;
        let child = Command::new(etcd_binary())
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.path().join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .arg("--logger=zap")
            .arg("--log-level=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {} (install Debian's etcd-server)", etcd_binary().display()))?;
        let mut server = EtcdServer { child, client_url, dir };
        server.wait_healthy(Duration::from_secs(20))?;
        Ok(server)
    }

    fn wait_healthy(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let addr: SocketAddr = self.client_url.trim_start_matches("http://").parse()?;
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait()? {
                bail!("etcd exited with {status}: {}", self.log());
            }
            if health(addr).unwrap_or(false) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("etcd did not become healthy within {timeout:?}: {}", self.log())
    }

    /// `http://127.0.0.1:PORT`
    pub fn client_url(&self) -> &str {
        &self.client_url
    }

    /// The data dir etcd writes to.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// What etcd logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("etcd.log")).unwrap_or_default()
    }

    /// The temporary directory everything of this server lives in.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real etcd cluster on loopback made from an etcd snapshot, as an operator moves a cluster:
/// `etcdctl snapshot restore` once per member, then every member started. Stopped on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    children: Vec<Child>,
    client_urls: Vec<String>,
    dir: tempfile::TempDir,
}

impl EtcdCluster {
    /// Restores `snapshot` into `members` members and starts them; waits until each is healthy.
    pub fn restore(snapshot: &Path, members: usize) -> anyhow::Result<EtcdCluster> {
        let dir = tempfile::Builder::new().prefix("tugboat-etcd-cluster-").tempdir()?;
        let ports: Vec<(u16, u16)> = (0..members).map(|_| (free_port(), free_port())).collect();
        let peer = |i: usize| format!("http://127.0.0.1:{}", ports[i].1);
        let initial: Vec<String> = (0..members).map(|i| format!("m{i}={}", peer(i))).collect();
        let initial = initial.join(",");
        let mut cluster = EtcdCluster { children: Vec::new(), client_urls: Vec::new(), dir };
        for i in 0..members {
            let data = cluster.dir.path().join(format!("m{i}"));
            let restored = Command::new("etcdctl")
                .env("ETCDCTL_API", "3")
                .args(["snapshot", "restore"])
                .arg(snapshot)
                .arg(format!("--name=m{i}"))
                .arg(format!("--data-dir={}", data.display()))
                .arg(format!("--initial-cluster={initial}"))
                .arg(format!("--initial-advertise-peer-urls={}", peer(i)))
                .output()?;
            if !restored.status.success() {
                bail!("etcdctl snapshot restore: {}", String::from_utf8_lossy(&restored.stderr));
            }
        }
        for (i, (client_port, _)) in ports.iter().enumerate() {
            let client_url = format!("http://127.0.0.1:{client_port}");
            let log = std::fs::File::create(cluster.dir.path().join(format!("m{i}.log")))?;
            let child = Command::new(etcd_binary())
                .arg(format!("--name=m{i}"))
                .arg(format!("--data-dir={}", cluster.dir.path().join(format!("m{i}")).display()))
                .arg(format!("--listen-client-urls={client_url}"))
                .arg(format!("--advertise-client-urls={client_url}"))
                .arg(format!("--listen-peer-urls={}", peer(i)))
                .arg("--logger=zap")
                .arg("--log-level=warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?;
            cluster.children.push(child);
            cluster.client_urls.push(client_url);
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        for url in &cluster.client_urls {
            let addr: SocketAddr = url.trim_start_matches("http://").parse()?;
            while !health(addr).unwrap_or(false) {
                if Instant::now() > deadline {
                    let logs: Vec<String> = (0..members)
                        .map(|i| {
                            std::fs::read_to_string(cluster.dir.path().join(format!("m{i}.log"))).unwrap_or_default()
                        })
                        .collect();
                    bail!("the restored etcd cluster is not healthy: {logs:#?}");
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        Ok(cluster)
    }

    /// The members' client URLs, comma-separated (what `--datastore-endpoint` takes).
    pub fn endpoints(&self) -> String {
        self.client_urls.join(",")
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn health(addr: SocketAddr) -> std::io::Result<bool> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(200))?;
    stream.set_read_timeout(Some(Duration::from_secs(1)))?;
    stream.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer)?;
    Ok(answer.contains("\"health\":\"true\""))
}

/// A `tugboat server` process with its own data dir on a free loopback port, killed on drop.
#[derive(Debug)]
pub struct TugboatServer {
    child: Child,
    dir: tempfile::TempDir,
    port: u16,
    lines: std::sync::mpsc::Receiver<String>,
    /// The lines [`TugboatServer::wait_for_line`] went past.
    passed: Vec<String>,
}

impl TugboatServer {
    /// Starts `binary server --data-dir <temp> --bind-address 127.0.0.1 --https-port <free>
    /// <extra>` and waits for its ready line.
    /// `tugboat server` without its node agent (control plane tests use hollow nodes).
    pub fn start(binary: &Path, extra: &[&str]) -> anyhow::Result<TugboatServer> {
        Self::start_inner(binary, extra, false, |_| Ok(()))
    }

    /// `tugboat server` with its node agent: run it inside a network namespace of the test's
    /// own ([`crate::isolate`]), since the agent makes a bridge and veths.
    pub fn start_with_agent(binary: &Path, extra: &[&str]) -> anyhow::Result<TugboatServer> {
        Self::start_inner(binary, extra, true, |_| Ok(()))
    }

    /// `tugboat server` (no agent) on a data dir that `prepare` fills first (e.g. restores a
    /// snapshot into).
    pub fn start_prepared(
        binary: &Path,
        extra: &[&str],
        prepare: impl FnOnce(&Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<TugboatServer> {
        Self::start_inner(binary, extra, false, prepare)
    }

    fn start_inner(
        binary: &Path,
        extra: &[&str],
        agent: bool,
        prepare: impl FnOnce(&Path) -> anyhow::Result<()>,
    ) -> anyhow::Result<TugboatServer> {
        let dir = tempfile::Builder::new().prefix("tugboat-server-").tempdir()?;
        prepare(&dir.path().join("data"))?;
        let port = free_port();
        let mut child = Command::new(binary)
            .arg("server")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--bind-address", "127.0.0.1", "--https-port", &port.to_string()])
            .args(if agent { &[][..] } else { &["--disable-agent"][..] })
            // The etcd API on a port of its own (tests run side by side), unless a test says.
            .args(match extra.iter().any(|a| a.starts_with("--etcd-api-listen")) {
                true => &[][..],
                false => &["--etcd-api-listen", "127.0.0.1:0"][..],
            })
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let stderr = child.stderr.take().expect("piped");
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        let mut server = TugboatServer { child, dir, port, lines, passed: Vec::new() };
        server.wait_for_line("tugboat server ready", Duration::from_secs(30))?;
        Ok(server)
    }

    /// Waits for a log line containing `needle`; returns it.
    pub fn wait_for_line(&mut self, needle: &str, timeout: Duration) -> anyhow::Result<String> {
        let deadline = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(needle) => {
                    self.passed.extend(seen);
                    self.passed.push(line.clone());
                    return Ok(line);
                }
                Ok(line) => seen.push(line),
                Err(_) => break,
            }
        }
        bail!("no log line with {needle:?} within {timeout:?}; saw: {seen:#?}")
    }

    /// Every log line the server wrote so far, those `wait_for_line` went past included.
    pub fn all_log_lines(&mut self) -> Vec<String> {
        let new: Vec<String> = self.lines.try_iter().collect();
        self.passed.extend(new);
        self.passed.clone()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Where the server serves the etcd API (from its log), if it does.
    pub fn etcd_api_address(&mut self) -> Option<SocketAddr> {
        self.all_log_lines().iter().filter(|l| l.contains("etcd API serving")).find_map(|line| {
            let at = line.find("address=")? + "address=".len();
            line[at..].split_whitespace().next()?.parse().ok()
        })
    }

    /// The log lines the server wrote since the last look.
    pub fn log_lines(&self) -> Vec<String> {
        self.lines.try_iter().collect()
    }

    pub fn kubeconfig(&self) -> PathBuf {
        self.data_dir().join("admin.kubeconfig")
    }

    /// `https://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.port)
    }

    /// A scratch directory that lives as long as the server (e.g. a fresh HOME for kubectl).
    pub fn scratch(&self, name: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::create_dir_all(&path).expect("creating a scratch dir");
        path
    }

    /// The process, to signal it.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self) -> std::io::Result<std::process::ExitStatus> {
        self.child.wait()
    }
}

impl TugboatServer {
    /// Runs the real kubectl (`/usr/bin/kubectl`, the dispatcher) against this server with a
    /// HOME of its own, feeding `stdin`; panics with kubectl's output unless it succeeds, and
    /// returns its stdout.
    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> String {
        let output = self.kubectl_output(args, stdin);
        assert!(
            output.status.success(),
            "kubectl {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).expect("UTF-8 output")
    }

    /// Runs kubectl as [`TugboatServer::kubectl`] does; its stdout if it succeeds (for checks
    /// that wait until something is so).
    pub fn kubectl_ok(&self, args: &[&str]) -> Option<String> {
        let output = self.kubectl_output(args, None);
        output.status.success().then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// Runs kubectl as [`TugboatServer::kubectl`] does, expecting it to fail; panics if it
    /// succeeds, and returns what it printed on stderr.
    pub fn kubectl_fails(&self, args: &[&str], stdin: Option<&str>) -> String {
        let output = self.kubectl_output(args, stdin);
        assert!(!output.status.success(), "kubectl {args:?} succeeded: {}", String::from_utf8_lossy(&output.stdout));
        String::from_utf8_lossy(&output.stderr).into_owned()
    }

    /// Runs kubectl as [`TugboatServer::kubectl`] does; returns its stdout and stderr (where
    /// it prints the server's warnings).
    pub fn kubectl_with_stderr(&self, args: &[&str], stdin: Option<&str>) -> (String, String) {
        let output = self.kubectl_output(args, stdin);
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        assert!(output.status.success(), "kubectl {args:?}: {}{stderr}", String::from_utf8_lossy(&output.stdout));
        (String::from_utf8(output.stdout).expect("UTF-8 output"), stderr)
    }

    fn kubectl_output(&self, args: &[&str], stdin: Option<&str>) -> std::process::Output {
        let mut child = Command::new("/usr/bin/kubectl")
            .args(args)
            .env("KUBECONFIG", self.kubeconfig())
            .env("HOME", self.scratch("home"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        child.stdin.take().expect("piped").write_all(stdin.unwrap_or_default().as_bytes()).expect("kubectl reads");
        child.wait_with_output().expect("kubectl ends")
    }

    /// curl with the admin's credentials, for `path` (a watch to stream, say): run it as the
    /// caller needs (`-s -N`; add arguments before spawning).
    pub fn admin_curl(&self, path: &str) -> Command {
        let pki = self.data_dir().join("pki");
        let mut command = Command::new("curl");
        command.args(["-s", "-N", "--cacert"]).arg(pki.join("ca.crt"));
        command.arg("--cert").arg(pki.join("admin.crt")).arg("--key").arg(pki.join("admin.key"));
        command.arg(format!("{}{path}", self.url()));
        command
    }

    /// Sends one request with curl (as the admin when `credentials`, else anonymously), `extra`
    /// being curl's own arguments (headers, `--data-binary @file`…); returns (HTTP code, body).
    pub fn curl(&self, method: &str, path: &str, credentials: bool, extra: &[&str]) -> (u16, String) {
        let pki = self.data_dir().join("pki");
        let mut command = Command::new("curl");
        command.args(["-s", "-o", "-", "-w", "\n%{http_code}", "-X", method]).arg("--cacert").arg(pki.join("ca.crt"));
        if credentials {
            command.arg("--cert").arg(pki.join("admin.crt")).arg("--key").arg(pki.join("admin.key"));
        }
        let output = command.args(extra).arg(format!("{}{path}", self.url())).output().expect("curl runs");
        let text = String::from_utf8_lossy(&output.stdout);
        let (body, code) = text.rsplit_once('\n').expect("curl's status line");
        (code.trim().parse().expect("an HTTP code"), body.to_string())
    }
}

/// A child process killed (and reaped) on drop: a component a test runs beside the server.
#[derive(Debug)]
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl Drop for TugboatServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the calling test again inside new network, mount and pid namespaces (`unshare --net
/// --mount --pid --fork --mount-proc`, loopback up), so the bridges, veths, routes and mounts it
/// makes never touch the host and vanish with it, and every process it started dies with it.
/// Returns true in the isolated run (go on with the test), false in the outer one, after
/// asserting that the isolated run passed.
pub fn isolated(test: &str) -> bool {
    if std::env::var_os("TUGBOAT_ISOLATED").is_some() {
        return true;
    }
    let exe = std::env::current_exe().expect("the test binary");
    let status = Command::new("unshare")
        .args(["--net", "--mount", "--pid", "--fork", "--mount-proc", "--propagation", "private", "sh", "-c"])
        .arg("ip link set lo up && exec \"$0\" \"$@\"")
        .arg(exe)
        .args([test, "--exact", "--nocapture", "--test-threads=1"])
        .env("TUGBOAT_ISOLATED", "1")
        .status()
        .expect("running unshare (util-linux)");
    assert!(status.success(), "the isolated run of {test} failed: {status}");
    false
}
