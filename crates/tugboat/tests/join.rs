//! Joining nodes, the server's side: the join token made at first start, bootstrap-token
//! authentication, the signed cluster-info anyone may read, and `tugboat token`.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tugboat_pki::bootstrap;
use tugboat_testkit::TugboatServer;

const TUGBOAT: &str = env!("CARGO_BIN_EXE_tugboat");

/// curl as the bearer of `token` (or no one): (HTTP code, body).
fn curl(server: &TugboatServer, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, String) {
    let mut command = Command::new("curl");
    command.args(["-sS", "-o", "-", "-w", "\n%{http_code}", "-X", method]);
    command.arg("--cacert").arg(server.data_dir().join("pki/ca.crt"));
    if let Some(token) = token {
        command.args(["-H", &format!("Authorization: Bearer {token}")]);
    }
    if let Some(body) = body {
        command.args(["-H", "Content-Type: application/json", "-d", body]);
    }
    let out = command.arg(format!("{}{path}", server.url())).output().unwrap();
    assert!(out.status.success(), "curl: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.trim().parse().unwrap(), body.to_string())
}

fn tugboat_token(server: &TugboatServer, args: &[&str]) -> std::process::Output {
    Command::new(TUGBOAT).arg("token").args(args).arg("--data-dir").arg(server.data_dir()).output().unwrap()
}

fn whoami(server: &TugboatServer, token: &str) -> (u16, Value) {
    let review = r#"{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}"#;
    let (code, body) =
        curl(server, "POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", Some(token), Some(review));
    (code, serde_json::from_str(&body).unwrap_or(Value::Null))
}

#[test]
fn join_tokens_authenticate_bootstrappers_and_sign_cluster_info() {
    let server = TugboatServer::start(Path::new(TUGBOAT), &[]).unwrap();
    // The join token, kept for the admin in <data-dir>/token (0600) and as a Secret.
    let path = server.data_dir().join("token");
    let token = std::fs::read_to_string(&path).unwrap().trim().to_string();
    let (id, _) = bootstrap::parse(&token).expect("a well-formed token");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
    let secret =
        server.kubectl(&["get", "secret", "-n", "kube-system", &format!("bootstrap-token-{id}"), "-o", "json"], None);
    let secret: Value = serde_json::from_str(&secret).unwrap();
    assert_eq!(secret["type"], "bootstrap.kubernetes.io/token");
    assert!(bootstrap::field(&secret, "expiration").is_some(), "24 h by default");

    // The token authenticates as a bootstrapper, who may ask for certificates and no more.
    let (code, review) = whoami(&server, &token);
    assert_eq!(code, 201, "{review}");
    assert_eq!(review["status"]["userInfo"]["username"], format!("system:bootstrap:{id}"));
    let groups = review["status"]["userInfo"]["groups"].to_string();
    assert!(groups.contains("system:bootstrappers") && groups.contains(bootstrap::NODE_TOKEN_GROUP), "{groups}");
    assert_eq!(
        curl(&server, "GET", "/apis/certificates.k8s.io/v1/certificatesigningrequests", Some(&token), None).0,
        200
    );
    assert_eq!(curl(&server, "GET", "/api/v1/secrets", Some(&token), None).0, 403);
    assert_eq!(whoami(&server, &format!("{id}.0000000000000000")).0, 401, "a wrong secret");

    // cluster-info: anyone may read it (nobody may write it without credentials), and once
    // the signer has run it carries a signature of its kubeconfig for the token.
    assert_eq!(curl(&server, "PUT", bootstrap::CLUSTER_INFO_PATH, None, Some("{}")).0, 401);
    let deadline = Instant::now() + Duration::from_secs(30);
    let info = loop {
        let (code, body) = curl(&server, "GET", bootstrap::CLUSTER_INFO_PATH, None, None);
        assert_eq!(code, 200, "{body}");
        let info: Value = serde_json::from_str(&body).unwrap();
        if info["data"][format!("jws-kubeconfig-{id}")].is_string() {
            break info;
        }
        assert!(Instant::now() < deadline, "no signature: {info}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let kubeconfig = info["data"]["kubeconfig"].as_str().unwrap();
    assert!(kubeconfig.contains(&format!("server: {}", server.url())), "{kubeconfig}");
    let jws = info["data"][format!("jws-kubeconfig-{id}")].as_str().unwrap();
    assert!(bootstrap::verify_jws(kubeconfig, jws, &token));
    assert!(!bootstrap::verify_jws(kubeconfig, jws, &format!("{id}.0000000000000000")));

    // tugboat token create | list | delete.
    let out = tugboat_token(&server, &["create", "--ttl", "1h", "--description", "for node 2"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let second = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(bootstrap::parse(&second).is_some(), "{second}");
    assert_eq!(whoami(&server, &second).0, 201);
    let out = tugboat_token(&server, &["create", "--print-join-command"]);
    let command = String::from_utf8(out.stdout).unwrap();
    assert!(command.starts_with(&format!("tugboat agent --server {} --token ", server.url())), "{command}");
    let listed = String::from_utf8(tugboat_token(&server, &["list"]).stdout).unwrap();
    assert!(listed.contains(&token) && listed.contains(&second) && listed.contains("for node 2"), "{listed}");
    assert!(listed.contains("authentication,signing"), "{listed}");
    let out = tugboat_token(&server, &["delete", &second]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(whoami(&server, &second).0, 401, "deleted");
    let out = tugboat_token(&server, &["delete", &second]);
    assert!(!out.status.success() && String::from_utf8_lossy(&out.stderr).contains("not found"));

    // An expired token no longer authenticates, and the token cleaner removes it.
    let out = tugboat_token(&server, &["create", "--ttl", "1s"]);
    let short = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let (short_id, _) = bootstrap::parse(&short).unwrap();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(whoami(&server, &short).0, 401, "expired");
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.kubectl(&["get", "secrets", "-n", "kube-system", "-o", "name"], None).contains(short_id) {
        assert!(Instant::now() < deadline, "the expired token's Secret stays");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// `tugboat agent` with the node flags of a test host; `extra` first.
fn agent(server: &TugboatServer, token: &str, data: &Path, extra: &[&str]) -> Command {
    let mut command = Command::new(TUGBOAT);
    command
        .arg("agent")
        .args(extra)
        .args(["--server", &server.url(), "--token", token, "--node-name", "joined", "--node-ip", "127.0.0.1"])
        .args(["--kubelet-port", &tugboat_testkit::free_port().to_string()])
        .arg("--pod-log-dir")
        .arg(data.join("logs"))
        .arg("--data-dir")
        .arg(data);
    command
}

#[test]
fn an_agent_joins_with_the_token_and_runs_pods() {
    if !tugboat_testkit::isolated("an_agent_joins_with_the_token_and_runs_pods") {
        return;
    }
    let server = TugboatServer::start(Path::new(TUGBOAT), &[]).unwrap();
    let token = std::fs::read_to_string(server.data_dir().join("token")).unwrap().trim().to_string();
    let (id, _) = bootstrap::parse(&token).unwrap();
    let data = server.scratch("agent");
    // Once the signer has signed cluster-info for the token, join errors say what is wrong.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !server
        .kubectl(&["get", "configmap", "-n", "kube-public", "cluster-info", "-o", "yaml"], None)
        .contains(&format!("jws-kubeconfig-{id}"))
    {
        assert!(Instant::now() < deadline, "cluster-info is not signed");
        std::thread::sleep(Duration::from_millis(200));
    }
    for (bad, says) in [
        ("nonsense".to_string(), "not a bootstrap token"),
        ("zzzzzz.0123456789abcdef".to_string(), "unknown or has expired"),
        (format!("{id}.0123456789abcdef"), "does not match"),
    ] {
        let out = agent(&server, &bad, &data, &["--discovery-timeout", "2s"]).output().unwrap();
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && said.contains(says), "{bad}: {said}");
        // Said once, at WARN, with what to do; the unverified first request is explained, not
        // warned about at every handshake; no colour codes in a pipe.
        if bad != "nonsense" {
            let refusals: Vec<&str> = said.lines().filter(|l| l.contains("asking again")).collect();
            assert!(
                refusals.len() == 1 && refusals[0].contains("WARN") && refusals[0].contains("tugboat token list"),
                "{bad}: {said}"
            );
            assert!(said.contains("the expected discovery before the cluster CA is known"), "{said}");
        }
        assert!(!said.contains("Server cert bypassed") && !said.contains('\x1b'), "{bad}: {said}");
    }
    let out = agent(&server, &token, &data, &["--ca-cert-hash", "sha256:00"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("not the --ca-cert-hash given"));
    assert!(!data.join("kubelet.kubeconfig").exists(), "nothing kept from failed joins");

    // The right CA hash and token: the node joins, with a certificate the cluster signed.
    let hash =
        tugboat_pki::ca_cert_hash(&std::fs::read_to_string(server.data_dir().join("pki/ca.crt")).unwrap()).unwrap();
    tugboat_testkit::image::import_busybox(Path::new(TUGBOAT), &data).unwrap();
    let _agent = tugboat_testkit::KillOnDrop(
        agent(&server, &token, &data, &["--ca-cert-hash", &hash])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let ready = server.kubectl(
            &[
                "get",
                "nodes",
                "-o",
                "jsonpath={.items[?(@.metadata.name==\"joined\")].status.conditions[?(@.type==\"Ready\")].status}",
            ],
            None,
        );
        if ready == "True" {
            break;
        }
        assert!(Instant::now() < deadline, "the joined node is not Ready: {ready:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    let csrs = server.kubectl(&["get", "csr"], None);
    assert!(csrs.contains("Approved,Issued") && csrs.contains(&format!("system:bootstrap:{id}")), "{csrs}");
    use std::os::unix::fs::PermissionsExt;
    let credentials = data.join("kubelet.kubeconfig");
    assert_eq!(std::fs::metadata(&credentials).unwrap().permissions().mode() & 0o777, 0o600);

    // Pods land on it and run; logs and exec go through its kubelet.
    server.kubectl(
        &["run", "hello", "--image=busybox:1.35", "--", "sh", "-c", "echo hello from $(hostname); sleep 3600"],
        None,
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.kubectl(&["get", "pod", "hello", "-o", "jsonpath={.status.phase}"], None) != "Running" {
        assert!(Instant::now() < deadline, "hello does not run");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(server.kubectl(&["get", "pod", "hello", "-o", "jsonpath={.spec.nodeName}"], None), "joined");
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.kubectl(&["logs", "hello"], None) != "hello from hello\n" {
        assert!(Instant::now() < deadline, "no logs");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(server.kubectl(&["exec", "hello", "--", "cat", "/etc/hostname"], None).trim(), "hello");

    // The kubelet API asks the API server who may use it (SubjectAccessReview): the node's own
    // credentials may not (RBAC gives nodes no nodes/proxy or nodes/stats), the admin may.
    let port = server
        .kubectl(&["get", "node", "joined", "-o", "jsonpath={.status.daemonEndpoints.kubeletEndpoint.Port}"], None);
    let kubeconfig = std::fs::read_to_string(&credentials).unwrap();
    for (field, file) in [("client-certificate-data", "node.crt"), ("client-key-data", "node.key")] {
        use base64::Engine;
        let prefix = format!("{field}: ");
        let b64 = kubeconfig.lines().find_map(|l| l.trim().strip_prefix(prefix.as_str())).unwrap();
        std::fs::write(data.join(file), base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap();
    }
    let kubelet = |cert: &Path, key: &Path, path: &str| -> (String, String) {
        let out = Command::new("curl")
            .args(["-sk", "-w", "\n%{http_code}", "--cert"])
            .arg(cert)
            .arg("--key")
            .arg(key)
            .arg(format!("https://127.0.0.1:{port}{path}"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or_default();
        (code.to_string(), body.to_string())
    };
    let (node_cert, node_key) = (data.join("node.crt"), data.join("node.key"));
    let (code, body) = kubelet(&node_cert, &node_key, "/stats/summary");
    assert_eq!(code, "403", "{body}");
    assert_eq!(body, "Forbidden (user=system:node:joined, verb=get, resource=nodes, subresource(s)=[stats])");
    let (code, body) = kubelet(&node_cert, &node_key, "/containerLogs/default/hello/hello");
    assert!(code == "403" && body.contains("subresource(s)=[proxy]"), "{code} {body}");
    let pki = server.data_dir().join("pki");
    let (code, body) = kubelet(&pki.join("admin.crt"), &pki.join("admin.key"), "/containerLogs/default/hello/hello");
    assert_eq!((code.as_str(), body.as_str()), ("200", "hello from hello\n"), "the admin may");
    // `/pods` (the e2e framework's view of the kubelet), through the API server's node proxy.
    let pods = server.kubectl(&["get", "--raw", "/api/v1/nodes/joined/proxy/pods"], None);
    let pods: Value = serde_json::from_str(&pods).unwrap();
    assert_eq!(pods["kind"], "PodList");
    assert!(pods["items"].as_array().unwrap().iter().any(|p| p["metadata"]["name"] == "hello"), "{pods}");
    assert_eq!(kubelet(&node_cert, &node_key, "/healthz").0, "200", "health needs only the CA");
    server.kubectl(&["delete", "pod", "hello", "--grace-period=1", "--wait=true"], None);
}

/// The node's certificates come from the cluster and renew themselves before they expire,
/// without a restart: with a signing duration of a minute, after two minutes the agent holds
/// new client and serving certificates, the node is Ready, and logs still come through its
/// kubelet (whose serving certificate the API server checks on every connection).
#[test]
fn node_certificates_renew_before_they_expire() {
    if !tugboat_testkit::isolated("node_certificates_renew_before_they_expire") {
        return;
    }
    let server = TugboatServer::start(Path::new(TUGBOAT), &["--cluster-signing-duration", "60s"]).unwrap();
    let token = std::fs::read_to_string(server.data_dir().join("token")).unwrap().trim().to_string();
    let data = server.scratch("agent");
    tugboat_testkit::image::import_busybox(Path::new(TUGBOAT), &data).unwrap();
    let _agent = tugboat_testkit::KillOnDrop(
        agent(&server, &token, &data, &[])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let ready = || {
        server.kubectl(
            &["get", "node", "joined", "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}"],
            None,
        )
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    while server.kubectl(&["get", "nodes", "-o", "name"], None).lines().all(|l| l != "node/joined") || ready() != "True"
    {
        assert!(Instant::now() < deadline, "the node does not join");
        std::thread::sleep(Duration::from_millis(300));
    }
    let client_cert = || {
        let kubeconfig = std::fs::read_to_string(data.join("kubelet.kubeconfig")).unwrap();
        let b64 =
            kubeconfig.lines().find_map(|l| l.trim().strip_prefix("client-certificate-data: ")).unwrap().to_string();
        use base64::Engine;
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).unwrap()).unwrap()
    };
    let serving_cert = || std::fs::read_to_string(data.join("pki/kubelet-server.crt")).unwrap_or_default();
    let (first_client, first_serving) = (client_cert(), serving_cert());
    let ca = std::fs::read_to_string(server.data_dir().join("pki/ca.crt")).unwrap();
    assert!(tugboat_pki::issued_by(&first_serving, &ca), "the serving certificate is the cluster's");
    let (_, first_expiry) = tugboat_pki::validity(&first_client).unwrap();
    server.kubectl(&["run", "talker", "--image=busybox:1.35", "--", "sh", "-c", "echo hi; sleep 3600"], None);

    // Past the first certificates' expiry.
    let until = std::time::UNIX_EPOCH + Duration::from_secs(first_expiry as u64 + 15);
    while std::time::SystemTime::now() < until {
        std::thread::sleep(Duration::from_secs(1));
    }
    let (client, serving) = (client_cert(), serving_cert());
    assert_ne!(client, first_client, "the client certificate was renewed");
    assert_ne!(serving, first_serving, "the serving certificate was renewed");
    let now = bootstrap::unix_now();
    for cert in [&client, &serving] {
        assert!(tugboat_pki::issued_by(cert, &ca));
        assert!(tugboat_pki::validity(cert).unwrap().1 > now, "valid now");
    }
    assert_eq!(tugboat_pki::certificate_subject(&client).unwrap().0, "system:node:joined");
    let csrs = server.kubectl(&["get", "csr"], None);
    assert!(csrs.contains("kubernetes.io/kubelet-serving") && csrs.contains("system:node:joined"), "{csrs}");
    assert_eq!(ready(), "True");
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.kubectl(&["get", "pod", "talker", "-o", "jsonpath={.status.phase}"], None) != "Running" {
        assert!(Instant::now() < deadline, "talker does not run");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(server.kubectl(&["logs", "talker"], None), "hi\n");
}
