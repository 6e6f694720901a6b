//! The etcd v3 API over the embedded store, driven by Debian's `etcdctl` (3.4) as the seed
//! documents use it: `--cacert/--cert/--key` from `<data-dir>/pki/etcd`, keys under
//! `/registry`, writes that the API server sees, watches, transactions, leases, status.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use tugboat_testkit::TugboatServer;

struct Etcdctl {
    address: SocketAddr,
    pki: PathBuf,
}

impl Etcdctl {
    fn command(&self, cert: &str, args: &[&str]) -> Command {
        let mut command = Command::new("etcdctl");
        command
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints=https://{}", self.address))
            .arg("--cacert")
            .arg(self.pki.join("ca.crt"))
            .arg("--cert")
            .arg(self.pki.join(format!("{cert}.crt")))
            .arg("--key")
            .arg(self.pki.join(format!("{cert}.key")))
            .args(["--dial-timeout=3s", "--command-timeout=5s"])
            .args(args)
            .stdin(Stdio::null());
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command("server", args).output().expect("etcdctl runs")
    }

    /// Runs with the seeds' certificate (`server.crt`) and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "etcdctl {args:?}: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Runs with `input` on stdin.
    fn with_input(&self, args: &[&str], input: &str) -> String {
        use std::io::Write;
        let mut child = self.command("server", args).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "etcdctl {args:?} < {input:?}");
        String::from_utf8(output.stdout).unwrap()
    }
}

fn server() -> (TugboatServer, Etcdctl) {
    let mut server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).expect("the server starts");
    let address = server.etcd_api_address().expect("the etcd API is served");
    let pki = server.data_dir().join("pki/etcd");
    (server, Etcdctl { address, pki })
}

#[test]
fn etcdctl_reads_and_writes_the_registry_of_the_embedded_store() {
    let (server, etcdctl) = server();
    // kubeadm's files.
    for file in ["ca.crt", "ca.key", "server.crt", "server.key", "healthcheck-client.crt", "healthcheck-client.key"] {
        assert!(etcdctl.pki.join(file).is_file(), "{file}");
    }
    let keys = etcdctl.ok(&["get", "/registry", "--prefix", "--keys-only"]);
    assert!(keys.lines().any(|k| k == "/registry/namespaces/default"), "{keys}");
    let ten = etcdctl.ok(&["get", "/", "--prefix", "--keys-only", "--limit=10"]);
    assert_eq!(ten.lines().filter(|l| !l.is_empty()).count(), 10, "{ten}");
    // A limited read counts every key of the range (etcdctl 3.4 has no --count-only).
    let limited = etcdctl.ok(&["get", "/registry/namespaces", "--prefix", "--limit=1", "-w", "json"]);
    let limited: serde_json::Value = serde_json::from_str(&limited).unwrap();
    assert!(limited["count"].as_i64().unwrap() >= 4 && limited["more"] == true, "{limited}");
    assert_eq!(limited["kvs"].as_array().unwrap().len(), 1);

    // The object as the API server stored it, at the revision it serves as resourceVersion.
    let (code, body) = server.curl("GET", "/api/v1/namespaces/default", true, &[]);
    assert_eq!(code, 200, "{body}");
    let namespace: serde_json::Value = serde_json::from_str(&body).unwrap();
    let got = etcdctl.ok(&["get", "/registry/namespaces/default", "-w", "json"]);
    let got: serde_json::Value = serde_json::from_str(&got).unwrap();
    let kv = &got["kvs"][0];
    assert_eq!(kv["mod_revision"].to_string(), namespace["metadata"]["resourceVersion"].as_str().unwrap());
    use base64::Engine as _;
    let value = base64::engine::general_purpose::STANDARD.decode(kv["value"].as_str().unwrap()).unwrap();
    let stored: serde_json::Value = serde_json::from_slice(&value).unwrap();
    assert_eq!(stored["metadata"]["uid"], namespace["metadata"]["uid"]);

    // put, get, del.
    assert_eq!(etcdctl.ok(&["put", "/test/a", "hello"]).trim(), "OK");
    assert_eq!(etcdctl.ok(&["get", "/test/a"]), "/test/a\nhello\n");
    assert_eq!(etcdctl.ok(&["put", "/test/a", "again", "--prev-kv"]), "OK\n/test/a\nhello\n");
    assert_eq!(etcdctl.ok(&["get", "/test/a", "--print-value-only"]).trim(), "again");
    assert_eq!(etcdctl.ok(&["del", "/test/a"]).trim(), "1");
    assert_eq!(etcdctl.ok(&["get", "/test/a"]), "");
    for name in ["x", "y", "z"] {
        etcdctl.ok(&["put", &format!("/test/many/{name}"), name]);
    }
    assert_eq!(etcdctl.ok(&["get", "/test/many/y", "/test/many/z", "--keys-only"]).trim(), "/test/many/y");
    assert_eq!(etcdctl.ok(&["del", "/test/many", "--prefix"]).trim(), "3");

    // A write through the etcd API is the API server's state: its watch cache sees it.
    let configmap = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"from-etcd","namespace":"default","uid":"6f1c3a52-0000-4000-8000-000000000001","creationTimestamp":"2026-01-01T00:00:00Z"},"data":{"written":"by etcdctl"}}"#;
    etcdctl.ok(&["put", "/registry/configmaps/default/from-etcd", configmap]);
    let (code, body) = server.curl("GET", "/api/v1/namespaces/default/configmaps", true, &[]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains("by etcdctl"), "{body}");

    // Compaction through the etcd API: older reads and watches get etcd's error.
    let revision = {
        let status = etcdctl.ok(&["put", "/test/compact", "x", "-w", "json"]);
        serde_json::from_str::<serde_json::Value>(&status).unwrap()["header"]["revision"].as_i64().unwrap()
    };
    assert_eq!(etcdctl.ok(&["compaction", &revision.to_string()]).trim(), format!("compacted revision {revision}"));
    let old = etcdctl.run(&["get", "/test/compact", "--rev=2"]);
    assert!(!old.status.success());
    assert!(String::from_utf8_lossy(&old.stderr).contains("required revision has been compacted"), "{old:?}");
    let watch = etcdctl.run(&["watch", "/test", "--prefix", "--rev=2"]);
    let said = format!("{}{}", String::from_utf8_lossy(&watch.stdout), String::from_utf8_lossy(&watch.stderr));
    assert!(said.contains("required revision has been compacted"), "{said}");
    // The server goes on.
    let health = etcdctl.run(&["endpoint", "health"]);
    assert!(String::from_utf8_lossy(&health.stderr).contains("is healthy"), "{health:?}");
}

#[test]
fn etcdctl_watches_transactions_leases_and_status() {
    let (_server, etcdctl) = server();
    // A watch sees puts and deletes with their values, and the previous value when asked.
    let mut watch = etcdctl
        .command("server", &["watch", "/watched", "--prefix", "--prev-kv"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    etcdctl.ok(&["put", "/watched/a", "one"]);
    etcdctl.ok(&["put", "/watched/a", "two"]);
    etcdctl.ok(&["del", "/watched/a"]);
    etcdctl.ok(&["put", "/unwatched", "x"]);
    std::thread::sleep(Duration::from_millis(700));
    let _ = watch.kill();
    let output = watch.wait_with_output().unwrap();
    let seen = String::from_utf8_lossy(&output.stdout);
    assert_eq!(
        seen,
        "PUT\n/watched/a\none\nPUT\n/watched/a\none\n/watched/a\ntwo\nDELETE\n/watched/a\ntwo\n/watched/a\n\n"
    );

    // A watch from a past revision replays what followed it.
    let revision: i64 = {
        let status = etcdctl.ok(&["put", "/replayed", "first", "-w", "json"]);
        serde_json::from_str::<serde_json::Value>(&status).unwrap()["header"]["revision"].as_i64().unwrap()
    };
    etcdctl.ok(&["put", "/replayed", "second"]);
    let mut replay = etcdctl
        .command("server", &["watch", "/replayed", &format!("--rev={revision}")])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let _ = replay.kill();
    let seen = String::from_utf8(replay.wait_with_output().unwrap().stdout).unwrap();
    assert_eq!(seen, "PUT\n/replayed\nfirst\nPUT\n/replayed\nsecond\n");

    // Transactions: create if absent (kube-apiserver's create), else the failure branch.
    let txn = "create(\"/txn/k\") = \"0\"\n\nput /txn/k created\n\nput /txn/other fallback\n\n";
    assert_eq!(etcdctl.with_input(&["txn"], txn), "SUCCESS\n\nOK\n");
    assert_eq!(etcdctl.with_input(&["txn"], txn), "FAILURE\n\nOK\n");
    assert_eq!(etcdctl.ok(&["get", "/txn/k", "--print-value-only"]).trim(), "created");
    let value = "value(\"/txn/k\") = \"created\"\n\nput /txn/k updated\n\n\n";
    assert_eq!(etcdctl.with_input(&["txn"], value), "SUCCESS\n\nOK\n");
    assert_eq!(etcdctl.ok(&["get", "/txn/k", "--print-value-only"]).trim(), "updated");

    // Leases: keys put with one go when it is revoked (or expires).
    let granted = etcdctl.ok(&["lease", "grant", "30"]);
    let id = granted.split_whitespace().nth(1).unwrap().to_string();
    assert!(granted.contains("granted with TTL(30s)"), "{granted}");
    etcdctl.ok(&["put", "/leased/k", "v", &format!("--lease={id}")]);
    let alive = etcdctl.ok(&["lease", "timetolive", &id, "--keys"]);
    assert!(alive.contains("/leased/k"), "{alive}");
    assert!(etcdctl.ok(&["lease", "list"]).contains(&id));
    assert!(etcdctl.ok(&["lease", "keep-alive", "--once", &id]).contains("TTL(30)"));
    etcdctl.ok(&["lease", "revoke", &id]);
    assert_eq!(etcdctl.ok(&["get", "/leased/k"]), "");
    let short = etcdctl.ok(&["lease", "grant", "1"]);
    let id = short.split_whitespace().nth(1).unwrap().to_string();
    etcdctl.ok(&["put", "/leased/short", "v", &format!("--lease={id}")]);
    let deadline = Instant::now() + Duration::from_secs(15);
    while !etcdctl.ok(&["get", "/leased/short"]).is_empty() {
        assert!(Instant::now() < deadline, "the expired lease's key stays");
        std::thread::sleep(Duration::from_millis(300));
    }
    let missing = etcdctl.run(&["put", "/leased/none", "v", "--lease=1234"]);
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("requested lease not found"));

    // Status, members, health with kubeadm's health-check certificate.
    let status = etcdctl.ok(&["endpoint", "status", "-w", "json"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(status[0]["Status"]["version"], "3.5.0");
    assert!(status[0]["Status"]["dbSize"].as_i64().unwrap() > 0);
    let members = etcdctl.ok(&["member", "list"]);
    assert!(members.contains("started") && members.contains(&format!("https://{}", etcdctl.address)), "{members}");
    let health = etcdctl.command("healthcheck-client", &["endpoint", "health"]).output().unwrap();
    assert!(String::from_utf8_lossy(&health.stderr).contains("is healthy"), "{health:?}");
}

#[test]
fn the_etcd_api_wants_tls_and_a_client_certificate() {
    let (_server, etcdctl) = server();
    let plain = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args([&format!("--endpoints=http://{}", etcdctl.address), "--dial-timeout=2s", "--command-timeout=3s"])
        .args(["get", "/registry/namespaces/default"])
        .output()
        .unwrap();
    assert!(!plain.status.success(), "plain TCP is refused");
    let anonymous = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints=https://{}", etcdctl.address))
        .arg("--cacert")
        .arg(etcdctl.pki.join("ca.crt"))
        .args(["--dial-timeout=2s", "--command-timeout=3s", "get", "/registry/namespaces/default"])
        .output()
        .unwrap();
    assert!(!anonymous.status.success(), "no client certificate, no access");
    // Still serving the next one.
    assert!(etcdctl.ok(&["get", "/registry/namespaces/default", "--keys-only"]).contains("default"));
    // Off with "".
    let mut off = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &["--etcd-api-listen", ""]).unwrap();
    assert!(off.etcd_api_address().is_none());
}
