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
    // Versions count a key's writes, as etcd's do; a txn compares them.
    let json: serde_json::Value = serde_json::from_str(&etcdctl.ok(&["get", "/test/a", "-w", "json"])).unwrap();
    assert_eq!(json["kvs"][0]["version"], 2, "{json}");
    let txn = "ver(\"/test/a\") = \"2\"\n\nput /test/a third\n\n\n";
    assert_eq!(etcdctl.with_input(&["txn"], txn), "SUCCESS\n\nOK\n");
    assert_eq!(etcdctl.with_input(&["txn"], txn), "FAILURE\n");
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

    // Defragment gives the compacted space back.
    let defrag = etcdctl.ok(&["defrag"]);
    assert!(defrag.contains("Finished defragmenting etcd member"), "{defrag}");
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

/// The way out of one machine: `etcdctl snapshot save` of the embedded store through the etcd
/// API, `etcdctl snapshot status` and `restore` into a 3-member etcd cluster, `tugboat server
/// --datastore-endpoint` on it with the same data dir: every object is there at its
/// resourceVersion and the old kubeconfig works.
#[test]
fn a_snapshot_through_the_etcd_api_moves_the_cluster_to_a_real_etcd_cluster() {
    let (mut server, etcdctl) = server();
    let json = ["-H", "Content-Type: application/json"];
    for i in 0..20 {
        let body = format!(r#"{{"metadata":{{"name":"moved-{i}"}},"data":{{"i":"{i}"}}}}"#);
        let (code, _) =
            server.curl("POST", "/api/v1/namespaces/default/configmaps", true, &[&json[..], &["-d", &body]].concat());
        assert_eq!(code, 201);
    }
    assert_eq!(server.curl("DELETE", "/api/v1/namespaces/default/configmaps/moved-3", true, &[]).0, 200);
    let (_, before) = server.curl("GET", "/api/v1/namespaces/default/configmaps/moved-7", true, &[]);
    let before: serde_json::Value = serde_json::from_str(&before).unwrap();
    let snapshot = server.scratch("snapshots").join("cluster.db");
    let saved = etcdctl.run(&["snapshot", "save", snapshot.to_str().unwrap()]);
    assert!(saved.status.success(), "{}", String::from_utf8_lossy(&saved.stderr));
    let status = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["snapshot", "status", snapshot.to_str().unwrap(), "-w", "json"])
        .output()
        .unwrap();
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap();
    assert!(status["totalKey"].as_i64().unwrap() > 20, "{status}");
    // The server stops; its data dir (the certificates, the kubeconfig) goes on.
    assert!(Command::new("kill").args(["-TERM", &server.pid().to_string()]).status().unwrap().success());
    server.wait().unwrap();
    let cluster = tugboat_testkit::EtcdCluster::restore(&snapshot, 3).expect("the snapshot restores into etcd");
    let data_dir = server.data_dir();
    // On the port the kubeconfig names.
    let port = server.url().rsplit(':').next().unwrap().to_string();
    let mut moved = Command::new(env!("CARGO_BIN_EXE_tugboat"))
        .args(["server", "--disable-agent", "--bind-address", "127.0.0.1", "--https-port", &port])
        .arg("--data-dir")
        .arg(&data_dir)
        .args(["--datastore-endpoint", &cluster.endpoints()])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let kubectl = |args: &[&str]| {
        Command::new("kubectl")
            .env("KUBECONFIG", data_dir.join("admin.kubeconfig"))
            .env("HOME", &data_dir)
            .args(args)
            .output()
            .unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let listed = loop {
        let output = kubectl(&["get", "configmaps", "-o", "json"]);
        if output.status.success() {
            break output;
        }
        assert!(
            Instant::now() < deadline,
            "the server on etcd does not answer: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        std::thread::sleep(Duration::from_millis(300));
    };
    let _ = moved.kill();
    let _ = moved.wait();
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    let names: Vec<&str> =
        listed["items"].as_array().unwrap().iter().filter_map(|o| o["metadata"]["name"].as_str()).collect();
    for i in (0..20).filter(|i| *i != 3) {
        assert!(names.contains(&format!("moved-{i}").as_str()), "moved-{i} in {names:?}");
    }
    assert!(!names.contains(&"moved-3"), "deleted before the snapshot");
    let after = listed["items"].as_array().unwrap().iter().find(|o| o["metadata"]["name"] == "moved-7").unwrap();
    assert_eq!(after["metadata"]["resourceVersion"], before["metadata"]["resourceVersion"]);
    assert_eq!(after["metadata"]["uid"], before["metadata"]["uid"]);

    // `tugboat snapshot restore` takes the same file into a new embedded store.
    let restored = TugboatServer::start_prepared(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[], |data_dir| {
        let output = Command::new(env!("CARGO_BIN_EXE_tugboat"))
            .args(["snapshot", "restore"])
            .arg(&snapshot)
            .arg("--data-dir")
            .arg(data_dir)
            .output()?;
        anyhow::ensure!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        Ok(())
    })
    .unwrap();
    let (code, body) = restored.curl("GET", "/api/v1/namespaces/default/configmaps/moved-7", true, &[]);
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(before["metadata"]["uid"].as_str().unwrap()), "{body}");
}

/// Leases outlive the server: granted and attached durably (a `kill -9` right after loses
/// nothing), taken back at start with their full TTL; an expired one then still deletes its key.
#[test]
fn leases_and_their_keys_survive_a_kill_and_restart() {
    let (mut server, etcdctl) = server();
    let grant = |ttl: &str| etcdctl.ok(&["lease", "grant", ttl]).split_whitespace().nth(1).unwrap().to_string();
    let (short, long) = (grant("5"), grant("120"));
    etcdctl.ok(&["put", "/l/short", "v", &format!("--lease={short}")]);
    etcdctl.ok(&["put", "/l/long", "v", &format!("--lease={long}")]);
    assert!(Command::new("kill").args(["-KILL", &server.pid().to_string()]).status().unwrap().success());
    server.wait().unwrap();

    let data_dir = server.data_dir();
    let port = tugboat_testkit::free_port().to_string();
    let etcd_port = tugboat_testkit::free_port();
    let mut again = Command::new(env!("CARGO_BIN_EXE_tugboat"))
        .args(["server", "--disable-agent", "--bind-address", "127.0.0.1", "--https-port", &port])
        .args(["--etcd-api-listen", &format!("127.0.0.1:{etcd_port}")])
        .arg("--data-dir")
        .arg(&data_dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let etcdctl = Etcdctl { address: format!("127.0.0.1:{etcd_port}").parse().unwrap(), pki: etcdctl.pki.clone() };
    let deadline = Instant::now() + Duration::from_secs(30);
    while !etcdctl.run(&["endpoint", "health"]).status.success() {
        assert!(Instant::now() < deadline, "the restarted server's etcd API does not answer");
        std::thread::sleep(Duration::from_millis(300));
    }
    let alive = etcdctl.ok(&["lease", "timetolive", &long, "--keys"]);
    assert!(alive.contains("/l/long") && alive.contains("granted with TTL(120s)"), "{alive}");
    // The short lease runs out after the restart and takes its key with it.
    let deadline = Instant::now() + Duration::from_secs(20);
    while !etcdctl.ok(&["get", "/l/short"]).is_empty() {
        assert!(Instant::now() < deadline, "the restored lease never expired");
        std::thread::sleep(Duration::from_millis(300));
    }
    etcdctl.ok(&["lease", "revoke", &long]);
    assert_eq!(etcdctl.ok(&["get", "/l/long"]), "");
    let _ = again.kill();
    let _ = again.wait();
}
