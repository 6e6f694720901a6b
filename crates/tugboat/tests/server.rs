//! `tugboat server` as a user runs it: a real process, its data dir, signals, bad input.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use tugboat_testkit::TugboatServer;

fn tugboat() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tugboat"))
}

fn start(extra: &[&str]) -> TugboatServer {
    TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), extra).expect("the server starts")
}

fn terminate(server: &mut TugboatServer) -> std::process::ExitStatus {
    let ok = Command::new("kill").args(["-TERM", &server.pid().to_string()]).status().unwrap().success();
    assert!(ok);
    let status = server.wait().unwrap();
    if !status.success() {
        // The reader thread has seen the whole stderr once the process is gone.
        std::thread::sleep(Duration::from_millis(100));
        eprintln!("the server exited with {status}; its log:\n{}", server.log_lines().join("\n"));
    }
    status
}

#[test]
fn a_host_without_a_usable_network_says_so_once() {
    // As a user starts it: bound to every address, with its node agent.
    let data = tempfile::tempdir().unwrap();
    let port = tugboat_testkit::free_port().to_string();
    // In a network namespace of the test's own, as one starts: loopback down, nothing else.
    let child = Command::new("unshare")
        .args(["--net", "--", env!("CARGO_BIN_EXE_tugboat"), "server", "--https-port", &port, "--data-dir"])
        .arg(data.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(5));
    assert!(Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap().success());
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{said}");
    let log: Vec<&str> = said.lines().collect();
    let count = |needle: &str| log.iter().filter(|l| l.contains(needle)).count();
    // What is missing, said once and plainly; then the kubelet retries quietly.
    assert_eq!(count("no usable loopback"), 1, "{said}");
    assert!(count("ip link set lo up") == 1 && count("no usable address") == 1, "{said}");
    assert!(count("--advertise-address (and --node-ip)") == 1, "{said}");
    assert_eq!(count("failed; restarting"), 1, "{said}");
    // Logs into a pipe carry no colour codes.
    assert!(!said.contains('\x1b'), "{said}");
}

#[test]
fn the_server_keeps_its_state_in_the_data_dir_and_stops_on_sigterm() {
    let mut server = start(&[]);
    let data_dir = server.data_dir();
    let db = data_dir.join("db/state.db");
    assert!(db.is_file());
    for file in ["admin.kubeconfig", "pki/ca.crt", "pki/ca.key", "pki/apiserver.crt", "pki/admin.crt"] {
        assert!(data_dir.join(file).is_file(), "{file}");
    }
    let kubeconfig = std::fs::read_to_string(data_dir.join("admin.kubeconfig")).unwrap();
    assert!(kubeconfig.contains(&format!("server: {}", server.url())), "{kubeconfig}");

    // A second server on the same data dir is refused, naming the file.
    let second = tugboat()
        .args(["server", "--disable-agent", "--https-port", "0", "--data-dir", data_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!second.status.success());
    let message = String::from_utf8_lossy(&second.stderr);
    assert!(message.contains("in use by another process") && message.contains("state.db"), "{message}");

    assert!(terminate(&mut server).success(), "a clean exit on SIGTERM");
    // After a clean stop the file is a SQLite database that says it is ours (application_id
    // "TGBT"), with the WAL folded in.
    let header = std::fs::read(&db).unwrap();
    assert_eq!(&header[..16], b"SQLite format 3\0");
    assert_eq!(&header[68..72], b"TGBT");

    // Restarting reuses the same store and certificates.
    let ca = std::fs::read(data_dir.join("pki/ca.crt")).unwrap();
    let mut again = tugboat()
        .args(["server", "--disable-agent", "--bind-address", "127.0.0.1", "--https-port", "0"])
        .args(["--data-dir", data_dir.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(std::fs::read(data_dir.join("pki/ca.crt")).unwrap(), ca, "the CA is kept");
    let _ = again.kill();
    let _ = again.wait();
}

#[test]
fn a_corrupt_store_stops_the_server_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("db")).unwrap();
    std::fs::write(dir.path().join("db/state.db"), vec![0x5a; 8192]).unwrap();
    let output = tugboat()
        .args(["server", "--disable-agent", "--https-port", "0", "--data-dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains("corrupt") && message.contains("state.db"), "{message}");
    assert!(!message.contains("panicked"), "{message}");
}

#[test]
fn an_unreachable_etcd_stops_the_server_naming_the_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let endpoint = format!("http://127.0.0.1:{}", tugboat_testkit::free_port());
    let output = tugboat()
        .args([
            "server",
            "--disable-agent",
            "--https-port",
            "0",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--datastore-endpoint",
            &endpoint,
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains(&endpoint) && message.contains("unreachable"), "{message}");
}

#[test]
fn the_server_runs_on_a_real_etcd_with_the_kube_apiserver_key_layout() {
    let etcd = tugboat_testkit::EtcdServer::start().unwrap();
    let mut server = start(&["--datastore-endpoint", etcd.client_url()]);
    assert!(!server.data_dir().join("db").exists(), "no embedded store when etcd is used");
    let keys = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", etcd.client_url()))
        .args(["get", "/registry", "--prefix", "--keys-only"])
        .output()
        .unwrap();
    let keys = String::from_utf8(keys.stdout).unwrap();
    assert!(keys.lines().any(|k| k == "/registry/namespaces/default"), "{keys}");
    assert!(keys.lines().any(|k| k == "/registry/namespaces/kube-system"), "{keys}");
    assert!(terminate(&mut server).success());
}

#[test]
fn a_taken_port_is_a_clear_error() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();
    let dir = tempfile::tempdir().unwrap();
    let output = tugboat()
        .args([
            "server",
            "--disable-agent",
            "--bind-address",
            "127.0.0.1",
            "--https-port",
            &port,
            "--data-dir",
            dir.path().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(message.contains(&format!("127.0.0.1:{port}")) && message.contains("in use"), "{message}");
}

/// The `kubernetes` Service leads to the API server: Endpoints and an EndpointSlice with the
/// advertised address (the bind address by default) and the port it listens on; the serving
/// certificate names the Service's ClusterIP and the advertised address.
#[test]
fn the_kubernetes_service_points_at_the_advertised_address() {
    let server = start(&[]);
    let port = server.url().rsplit(':').next().unwrap().to_string();
    let endpoints = server.kubectl(
        &["get", "endpoints", "kubernetes", "-o", "jsonpath={.subsets[0].addresses[0].ip}:{.subsets[0].ports[0].port}"],
        None,
    );
    assert_eq!(endpoints, format!("127.0.0.1:{port}"));
    let slice = server.kubectl(
        &[
            "get",
            "endpointslice",
            "kubernetes",
            "-o",
            "jsonpath={.endpoints[0].addresses[0]} {.ports[0].port} {.metadata.labels.kubernetes\\.io/service-name}",
        ],
        None,
    );
    assert_eq!(slice, format!("127.0.0.1 {port} kubernetes"));
    let described = server.kubectl(&["describe", "service", "kubernetes"], None);
    assert!(described.contains(&format!("127.0.0.1:{port}")), "{described}");

    let advertised = start(&["--advertise-address", "10.9.8.7"]);
    let port = advertised.url().rsplit(':').next().unwrap().to_string();
    let endpoints = advertised.kubectl(
        &["get", "endpoints", "kubernetes", "-o", "jsonpath={.subsets[0].addresses[0].ip}:{.subsets[0].ports[0].port}"],
        None,
    );
    assert_eq!(endpoints, format!("10.9.8.7:{port}"));
    let certificate = Command::new("openssl")
        .args(["x509", "-noout", "-ext", "subjectAltName", "-in"])
        .arg(advertised.data_dir().join("pki/apiserver.crt"))
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&certificate.stdout);
    assert!(names.contains("IP Address:10.96.0.1") && names.contains("IP Address:10.9.8.7"), "{names}");
}

/// Certificates that expired (or soon will) while the server was down are issued anew at
/// start: the server comes up serving a fresh one, and the admin kubeconfig works.
#[test]
fn expiring_certificates_are_renewed_at_start() {
    let now = || time::OffsetDateTime::now_utc().unix_timestamp();
    let server = TugboatServer::start_prepared(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[], |data| {
        let pki = data.join("pki");
        let ca = tugboat_pki::ClusterCa::load_or_create(&pki)?;
        for (name, usage) in [("apiserver", tugboat_pki::Usage::Server), ("admin", tugboat_pki::Usage::Client)] {
            let spec = tugboat_pki::CertSpec {
                common_name: "old".into(),
                organizations: vec!["system:masters".into()],
                dns_names: vec!["localhost".into()],
                ip_addresses: vec!["127.0.0.1".parse()?],
                usage,
                validity: Duration::from_secs(2 * 24 * 3600),
            };
            let (cert, key) = ca.sign(&spec)?;
            std::fs::write(pki.join(format!("{name}.crt")), cert)?;
            std::fs::write(pki.join(format!("{name}.key")), key)?;
        }
        Ok(())
    })
    .unwrap();
    for name in ["apiserver", "admin"] {
        let cert = std::fs::read_to_string(server.data_dir().join(format!("pki/{name}.crt"))).unwrap();
        let (_, until) = tugboat_pki::validity(&cert).unwrap();
        assert!(until - now() > 300 * 24 * 3600, "{name} was not renewed");
    }
    assert!(server.kubectl(&["get", "namespaces", "-o", "name"], None).contains("namespace/default"));
}

/// Default ClusterRoles get the rules a newer server adds at its start (upstream's RBAC
/// reconciliation), unless their `rbac.authorization.kubernetes.io/autoupdate` is "false".
#[test]
fn default_cluster_roles_get_missing_rules_back_at_start() {
    let mut server = start(&[]);
    let rules = |server: &TugboatServer, role: &str| -> Vec<serde_json::Value> {
        let json = server.kubectl(&["get", "clusterrole", role, "-o", "json"], None);
        serde_json::from_str::<serde_json::Value>(&json).unwrap()["rules"].as_array().unwrap().clone()
    };
    let node_rules = rules(&server, "system:node");
    let last = node_rules.len() - 1;
    let remove_last = format!("[{{\"op\":\"remove\",\"path\":\"/rules/{last}\"}}]");
    server.kubectl(&["patch", "clusterrole", "system:node", "--type=json", "-p", &remove_last], None);
    let view_rules = rules(&server, "view");
    let remove_first = r#"[{"op":"remove","path":"/rules/0"}]"#;
    server.kubectl(&["patch", "clusterrole", "view", "--type=json", "-p", remove_first], None);
    server.kubectl(
        &["annotate", "clusterrole", "view", "rbac.authorization.kubernetes.io/autoupdate=false", "--overwrite"],
        None,
    );
    assert_eq!(rules(&server, "system:node").len(), last);
    assert!(terminate(&mut server).success());

    // The same store under a newer server.
    let old = server.data_dir();
    let again = TugboatServer::start_prepared(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[], |dir| {
        let status = Command::new("cp").arg("-a").arg(&old).arg(dir).status()?;
        anyhow::ensure!(status.success(), "cp -a");
        Ok(())
    })
    .unwrap();
    assert_eq!(rules(&again, "system:node"), node_rules, "the missing rule is back, in its place");
    assert_eq!(rules(&again, "view"), view_rules[1..], "autoupdate false: left as edited");
}
