//! The real kubectl against a real `tugboat server`: the acceptance test of the API server.
//! Each kubectl version runs with a fresh HOME (kubectl caches discovery there).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use tugboat_testkit::TugboatServer;

fn server() -> TugboatServer {
    TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).expect("the server starts")
}

/// A kubectl binary: `/usr/bin/kubectl` (the dispatcher that picks by server version) or one
/// version's binary.
struct Kubectl {
    binary: PathBuf,
    kubeconfig: PathBuf,
    home: PathBuf,
}

impl Kubectl {
    fn new(server: &TugboatServer, version: Option<&str>) -> Kubectl {
        let binary = match version {
            Some(v) => PathBuf::from(format!("/usr/lib/google-cloud-sdk/bin/kubectl.{v}")),
            None => PathBuf::from("/usr/bin/kubectl"),
        };
        assert!(binary.exists(), "{} is installed", binary.display());
        let home = server.scratch(&format!("home-{}", version.unwrap_or("dispatcher")));
        Kubectl { binary, kubeconfig: server.kubeconfig(), home }
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.binary);
        command.args(args).env("KUBECONFIG", &self.kubeconfig).env("HOME", &self.home).stdin(Stdio::null());
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("kubectl runs")
    }

    /// Runs and expects success; returns stdout.
    fn ok(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(
            output.status.success(),
            "kubectl {args:?} failed ({}):\n{}{}",
            self.binary.display(),
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        String::from_utf8(output.stdout).unwrap()
    }

    /// Runs and expects failure; returns stderr.
    fn fails(&self, args: &[&str]) -> String {
        let output = self.run(args);
        assert!(!output.status.success(), "kubectl {args:?} should fail: {}", String::from_utf8_lossy(&output.stdout));
        String::from_utf8(output.stderr).unwrap()
    }

    fn apply_stdin(&self, args: &[&str], manifest: &str) -> Output {
        use std::io::Write;
        let mut child =
            self.command(args).stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
        child.stdin.take().unwrap().write_all(manifest.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    }
}

/// Header words of a `kubectl get` table.
fn header(output: &str) -> Vec<String> {
    output.lines().next().unwrap_or("").split_whitespace().map(str::to_string).collect()
}

/// The everyday verbs, for one kubectl, in a namespace of its own.
fn everyday_verbs(kubectl: &Kubectl, ns: &str) {
    let version = kubectl.ok(&["version"]);
    assert!(version.contains("Server Version:") && version.contains("v1.33.0+tugboat"), "{version}");

    let namespaces = kubectl.ok(&["get", "namespaces"]);
    assert_eq!(header(&namespaces), ["NAME", "STATUS", "AGE"]);
    for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        assert!(namespaces.lines().any(|l| l.starts_with(name) && l.contains("Active")), "{name}: {namespaces}");
    }
    let resources = kubectl.ok(&["api-resources"]);
    assert!(
        resources.lines().any(|l| l.starts_with("deployments") && l.contains("apps/v1") && l.contains("deploy")),
        "{resources}"
    );

    assert!(kubectl.ok(&["create", "namespace", ns]).contains(&format!("namespace/{ns} created")));
    let n = ["-n", ns];
    let with_ns = |args: &[&str]| -> Vec<String> { args.iter().chain(n.iter()).map(|s| s.to_string()).collect() };
    let run = |args: &[&str]| kubectl.ok(&with_ns(args).iter().map(String::as_str).collect::<Vec<_>>());

    // ConfigMaps: create, read back, label, annotate, select.
    assert!(
        run(&["create", "configmap", "settings", "--from-literal=color=blue", "--from-literal=size=9"])
            .contains("configmap/settings created")
    );
    let table = run(&["get", "configmaps"]);
    assert_eq!(header(&table), ["NAME", "DATA", "AGE"]);
    assert!(table.lines().any(|l| l.split_whitespace().take(2).eq(["settings", "2"])), "{table}");
    let json: serde_json::Value = serde_json::from_str(&run(&["get", "configmap", "settings", "-o", "json"])).unwrap();
    assert_eq!(json["data"]["color"], "blue");
    assert_eq!(json["metadata"]["namespace"], ns);
    assert!(json["metadata"]["uid"].as_str().is_some_and(|u| u.len() == 36));
    assert!(run(&["label", "configmap", "settings", "tier=web"]).contains("labeled"));
    // kubectl 1.27 prints "annotate", later ones "annotated".
    assert!(run(&["annotate", "configmap", "settings", "owner=team-a"]).contains("configmap/settings annotate"));
    assert!(run(&["get", "configmaps", "-l", "tier=web", "-o", "name"]).contains("configmap/settings"));
    assert!(run(&["get", "configmaps", "-l", "tier in (db,cache)", "-o", "name"]).trim().is_empty());
    let yaml = run(&["get", "configmap", "settings", "-o", "yaml"]);
    assert!(yaml.contains("owner: team-a") && yaml.contains("tier: web"), "{yaml}");

    // A typed create and its table columns.
    assert!(
        run(&["create", "deployment", "web", "--image=nginx:1.25", "--replicas=2"])
            .contains("deployment.apps/web created")
    );
    let deployments = run(&["get", "deployments", "-o", "wide"]);
    assert_eq!(
        header(&deployments),
        ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE", "CONTAINERS", "IMAGES", "SELECTOR"]
    );
    assert!(
        deployments.contains("0/2") && deployments.contains("nginx:1.25") && deployments.contains("app=web"),
        "{deployments}"
    );

    // A pod from a manifest, validated by the server (kubectl found `fieldValidation` in
    // OpenAPI: v2 protobuf for 1.27/1.28, v3 after).
    let manifest = "apiVersion: v1\nkind: Pod\nmetadata:\n  name: box\n  labels: {app: box}\nspec:\n  containers:\n  - name: main\n    image: busybox:1.36\n";
    let apply = with_ns(&["apply", "-f", "-"]);
    let apply: Vec<&str> = apply.iter().map(String::as_str).collect();
    let applied = kubectl.apply_stdin(&apply, manifest);
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
    // An unknown field is refused under the Strict validation kubectl asks for...
    let typo = manifest.replace("    image: busybox:1.36\n", "    image: busybox:1.36\n    imagePullPolice: Always\n");
    let refused = kubectl.apply_stdin(&apply, &typo.replace("name: box", "name: typo"));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success()
            && stderr.contains(r#"strict decoding error: unknown field "spec.containers[0].imagePullPolice""#),
        "{stderr}"
    );
    // ...and dropped with a warning when the user asks for warnings only.
    let warn = with_ns(&["apply", "--validate=warn", "-f", "-"]);
    let warned = kubectl
        .apply_stdin(&warn.iter().map(String::as_str).collect::<Vec<_>>(), &typo.replace("name: box", "name: typo"));
    let stderr = String::from_utf8_lossy(&warned.stderr);
    assert!(
        warned.status.success() && stderr.contains(r#"unknown field "spec.containers[0].imagePullPolice""#),
        "{stderr}"
    );
    let typo: serde_json::Value = serde_json::from_str(&run(&["get", "pod", "typo", "-o", "json"])).unwrap();
    assert!(typo["spec"]["containers"][0].get("imagePullPolice").is_none(), "unknown fields are not stored");
    run(&["delete", "pod", "typo"]);

    // explain reads the schemas (v2 protobuf for 1.27/1.28, v3 after).
    let explained = kubectl.ok(&["explain", "pods.spec.containers.image"]);
    assert!(
        explained.contains("KIND:") && explained.contains("Pod") && explained.contains("Container image name"),
        "{explained}"
    );
    let explained = kubectl.ok(&["explain", "deployments.spec"]);
    assert!(explained.contains("replicas") && explained.contains("strategy"), "{explained}");
    let pods = run(&["get", "pods", "-o", "wide"]);
    assert_eq!(header(&pods)[..5], ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]);
    assert!(pods.lines().any(|l| l.split_whitespace().take(3).eq(["box", "0/1", "Pending"])), "{pods}");
    let described = run(&["describe", "pod", "box"]);
    assert!(described.contains("busybox:1.36") && described.contains("Pending"), "{described}");
    let pod: serde_json::Value = serde_json::from_str(&run(&["get", "pod", "box", "-o", "json"])).unwrap();
    assert_eq!(pod["spec"]["restartPolicy"], "Always", "defaulted");
    assert_eq!(pod["spec"]["containers"][0]["imagePullPolicy"], "IfNotPresent");

    // get -w sees a later change.
    let mut watch = kubectl
        .command(
            &with_ns(&["get", "pods", "-w", "--request-timeout=20s"]).iter().map(String::as_str).collect::<Vec<_>>(),
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    run(&["label", "pod", "box", "seen=yes"]);
    std::thread::sleep(Duration::from_millis(800));
    let _ = watch.kill();
    let watched = String::from_utf8(watch.wait_with_output().unwrap().stdout).unwrap();
    assert!(watched.lines().filter(|l| l.starts_with("box")).count() >= 2, "the initial row and the change: {watched}");

    // Errors read as upstream's.
    let missing = kubectl.fails(&with_ns(&["get", "configmap", "nope"]).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(missing.contains("Error from server (NotFound): configmaps \"nope\" not found"), "{missing}");
    let invalid = kubectl.apply_stdin(
        &with_ns(&["create", "-f", "-"]).iter().map(String::as_str).collect::<Vec<_>>(),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: empty}\nspec: {containers: []}\n",
    );
    let stderr = String::from_utf8_lossy(&invalid.stderr);
    assert!(
        !invalid.status.success() && stderr.contains("is invalid") && stderr.contains("spec.containers"),
        "{stderr}"
    );
    let exists =
        kubectl.fails(&with_ns(&["create", "configmap", "settings"]).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(exists.contains("configmaps \"settings\" already exists"), "{exists}");

    // delete waits for the object to be gone.
    assert!(run(&["delete", "pod", "box"]).contains("pod \"box\" deleted"));
    assert!(run(&["get", "pods"]).trim().is_empty() || !run(&["get", "pods"]).contains("box"));
    assert!(run(&["delete", "configmap", "settings"]).contains("deleted"));
}

#[test]
fn kubectl_through_the_dispatcher() {
    let server = server();
    everyday_verbs(&Kubectl::new(&server, None), "dispatcher");
}

#[test]
fn kubectl_1_27() {
    let server = server();
    everyday_verbs(&Kubectl::new(&server, Some("1.27")), "old");
}

#[test]
fn kubectl_1_30() {
    let server = server();
    everyday_verbs(&Kubectl::new(&server, Some("1.30")), "middle");
}

/// kubectl 1.33's typed creates send protobuf bodies; what lands must be what the JSON of the
/// same command would have made (zero values Go omits stay out; set zeros stay in).
#[test]
fn kubectl_1_33_typed_creates_in_protobuf() {
    let server = server();
    let kubectl = Kubectl::new(&server, Some("1.33"));
    let get = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["get", "-o", "json"];
        all.extend_from_slice(args);
        serde_json::from_str(&kubectl.ok(&all)).unwrap()
    };
    kubectl.ok(&["create", "namespace", "pb"]);
    // The namespace first: a job's command follows `--`.
    let n = |args: &[&str]| -> Vec<String> { ["-n", "pb"].iter().chain(args.iter()).map(|s| s.to_string()).collect() };
    let run = |args: &[&str]| kubectl.ok(&n(args).iter().map(String::as_str).collect::<Vec<_>>());
    run(&["create", "deployment", "idle", "--image=nginx:1.27", "--replicas=0", "--port=80"]);
    run(&["create", "secret", "generic", "s", "--from-literal=password=hunter2"]);
    run(&["create", "configmap", "c", "--from-literal=a=b"]);
    run(&["create", "job", "j", "--image=busybox", "--", "echo", "hi"]);
    run(&["create", "cronjob", "cj", "--image=busybox", "--schedule=*/5 * * * *"]);
    run(&["create", "service", "nodeport", "np", "--tcp=80:8080"]);
    run(&["create", "role", "reader", "--verb=get", "--resource=pods"]);
    run(&["create", "rolebinding", "reader", "--role=reader", "--user=bob"]);
    run(&["create", "quota", "q", "--hard=pods=10"]);
    run(&["create", "poddisruptionbudget", "pdb", "--selector=app=idle", "--min-available=1"]);
    assert_eq!(kubectl.ok(&["auth", "can-i", "create", "pods"]).trim(), "yes");

    let deployment = get(&["-n", "pb", "deployment", "idle"]);
    assert_eq!(deployment["spec"]["replicas"], 0, "a set zero stays");
    assert_eq!(deployment["spec"]["strategy"]["type"], "RollingUpdate", "an empty strategy is defaulted");
    let container = &deployment["spec"]["template"]["spec"]["containers"][0];
    assert_eq!(container["ports"], serde_json::json!([{"containerPort": 80, "protocol": "TCP"}]));
    assert!(deployment["spec"]["template"]["metadata"].get("name").is_none(), "empty strings are omitted");
    let secret = get(&["-n", "pb", "secret", "s"]);
    assert_eq!(secret["data"]["password"], "aHVudGVyMg==", "bytes arrive as base64");
    assert_eq!(get(&["-n", "pb", "configmap", "c"])["data"]["a"], "b");
    let job = get(&["-n", "pb", "job", "j"]);
    assert_eq!(job["spec"]["template"]["spec"]["containers"][0]["command"], serde_json::json!(["echo", "hi"]));
    assert_eq!(get(&["-n", "pb", "cronjob", "cj"])["spec"]["schedule"], "*/5 * * * *");
    let service = get(&["-n", "pb", "service", "np"]);
    assert!(
        service["spec"]["ports"][0]["nodePort"].as_u64().is_some_and(|p| p >= 30000),
        "a zero nodePort is allocated"
    );
    assert_eq!(service["spec"]["ports"][0]["targetPort"], 8080, "an IntOrString int");
    assert_eq!(get(&["-n", "pb", "role", "reader"])["rules"][0]["verbs"], serde_json::json!(["get"]));
    assert_eq!(get(&["-n", "pb", "rolebinding", "reader"])["subjects"][0]["name"], "bob");
    assert_eq!(get(&["-n", "pb", "resourcequota", "q"])["spec"]["hard"]["pods"], "10", "a Quantity");
    assert_eq!(get(&["-n", "pb", "pdb", "pdb"])["spec"]["minAvailable"], 1);

    // Their tables have upstream's columns.
    let table = |args: &[&str]| run(args);
    assert_eq!(
        header(&table(&["get", "pdb"])),
        ["NAME", "MIN", "AVAILABLE", "MAX", "UNAVAILABLE", "ALLOWED", "DISRUPTIONS", "AGE"]
    );
    let quota = table(&["get", "quota"]);
    assert_eq!(header(&quota), ["NAME", "AGE", "REQUEST", "LIMIT"]);
    // The Job's pod counts once the quota controller has seen it (tests/wire.rs checks the counting).
    assert!(quota.contains("pods: 0/10") || quota.contains("pods: 1/10"), "{quota}");
    let bindings = table(&["get", "rolebindings", "-o", "wide"]);
    assert_eq!(header(&bindings), ["NAME", "ROLE", "AGE", "USERS", "GROUPS", "SERVICEACCOUNTS"]);
    assert!(bindings.contains("Role/reader") && bindings.contains("bob"), "{bindings}");
    assert_eq!(header(&table(&["get", "roles"])), ["NAME", "CREATED", "AT"]);
}

/// Raw HTTP with curl: status codes and Status bodies for bad requests.
struct Curl<'a> {
    server: &'a TugboatServer,
}

impl Curl<'_> {
    /// Returns (HTTP code, body).
    fn request(&self, method: &str, path: &str, credentials: bool, extra: &[&str]) -> (u16, String) {
        self.server.curl(method, path, credentials, extra)
    }

    fn status(&self, method: &str, path: &str, extra: &[&str]) -> (u16, serde_json::Value) {
        let (code, body) = self.request(method, path, true, extra);
        let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|_| panic!("a JSON body: {body}"));
        (code, status)
    }
}

#[test]
fn bad_requests_get_a_status_with_reason_and_code() {
    let server = server();
    let curl = Curl { server: &server };
    let json = ["-H", "Content-Type: application/json"];

    let (code, body) = curl.request("GET", "/api/v1/namespaces", false, &[]);
    assert_eq!(code, 401, "{body}");
    assert!(body.contains("\"reason\":\"Unauthorized\""), "{body}");
    assert_eq!(curl.request("GET", "/healthz", false, &[]), (200, "ok".to_string()));
    assert_eq!(curl.request("GET", "/readyz", false, &[]).0, 200);

    let (code, status) =
        curl.status("POST", "/api/v1/namespaces/default/configmaps", &[&json[..], &["-d", "{not json"]].concat());
    assert_eq!((code, status["reason"].as_str()), (400, Some("BadRequest")), "{status}");

    let (code, status) = curl.status("GET", "/api/v1/widgets", &[]);
    assert_eq!((code, status["reason"].as_str()), (404, Some("NotFound")), "{status}");

    let big = format!("{{\"metadata\":{{\"name\":\"big\"}},\"data\":{{\"x\":\"{}\"}}}}", "a".repeat(4 * 1024 * 1024));
    let file = server.scratch("bodies").join("big.json");
    std::fs::write(&file, big).unwrap();
    let (code, status) = curl.status(
        "POST",
        "/api/v1/namespaces/default/configmaps",
        &[&json[..], &["--data-binary", &format!("@{}", file.display())]].concat(),
    );
    assert_eq!((code, status["reason"].as_str()), (413, Some("RequestEntityTooLarge")), "{status}");

    let cm = r#"{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"},"data":{"a":"1"}}"#;
    let (code, created) =
        curl.status("POST", "/api/v1/namespaces/default/configmaps", &[&json[..], &["-d", cm]].concat());
    assert_eq!(code, 201, "{created}");
    let rv = created["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    let update = |rv: &str| {
        format!(
            r#"{{"apiVersion":"v1","kind":"ConfigMap","metadata":{{"name":"c","resourceVersion":"{rv}"}},"data":{{"a":"2"}}}}"#
        )
    };
    let (code, updated) =
        curl.status("PUT", "/api/v1/namespaces/default/configmaps/c", &[&json[..], &["-d", &update(&rv)]].concat());
    assert_eq!(code, 200, "{updated}");
    let (code, status) =
        curl.status("PUT", "/api/v1/namespaces/default/configmaps/c", &[&json[..], &["-d", &update(&rv)]].concat());
    assert_eq!((code, status["reason"].as_str()), (409, Some("Conflict")), "a stale resourceVersion: {status}");

    let (code, status) =
        curl.status("POST", "/api/v1/namespaces/nowhere/configmaps", &[&json[..], &["-d", cm]].concat());
    assert_eq!((code, status["details"]["name"].as_str()), (404, Some("nowhere")), "a missing namespace: {status}");

    let (code, status) = curl.status(
        "POST",
        "/api/v1/namespaces/default/configmaps",
        &[&json[..], &["-d", r#"{"metadata":{"name":"Not_Valid","labels":{"a":"b c"}}}"#]].concat(),
    );
    assert_eq!((code, status["reason"].as_str()), (422, Some("Invalid")), "{status}");
    let fields: Vec<&str> =
        status["details"]["causes"].as_array().unwrap().iter().map(|c| c["field"].as_str().unwrap()).collect();
    assert_eq!(fields, ["metadata.name", "metadata.labels.a"]);

    let (code, status) = curl.status("GET", "/api/v1/namespaces/default/configmaps?labelSelector=a%20in%20b", &[]);
    assert_eq!(code, 400, "{status}");
    let (code, status) =
        curl.status("GET", "/api/v1/namespaces/default/configmaps?fieldSelector=spec.nodeName%3Dx", &[]);
    assert_eq!(code, 400, "an unsupported field: {status}");
    let (code, status) = curl.status(
        "PATCH",
        "/api/v1/namespaces/default/configmaps/c",
        &["-H", "Content-Type: application/apply-patch+cbor", "-d", "{}"],
    );
    assert_eq!((code, status["reason"].as_str()), (415, Some("UnsupportedMediaType")), "{status}");
}

#[test]
fn bearer_tokens_authenticate_and_rbac_authorizes() {
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.csv");
    std::fs::write(&tokens, "s3cret-token,alice,1001,\"dev\"\n").unwrap();
    let server = TugboatServer::start(
        Path::new(env!("CARGO_BIN_EXE_tugboat")),
        &["--token-auth-file", tokens.to_str().unwrap()],
    )
    .unwrap();
    let curl = Curl { server: &server };
    let alice = ["-H", "Authorization: Bearer s3cret-token"];
    let (code, _) = curl.request("GET", "/api/v1/namespaces", false, &["-H", "Authorization: Bearer wrong"]);
    assert_eq!(code, 401);
    // Authenticated, but RBAC grants alice nothing yet beyond discovery and self reviews.
    let (code, body) = curl.request("GET", "/api/v1/namespaces", false, &alice);
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!((code, status["reason"].as_str()), (403, Some("Forbidden")), "{status}");
    assert_eq!(
        status["message"],
        "namespaces is forbidden: User \"alice\" cannot list resource \"namespaces\" in API group \"\" at the cluster scope"
    );
    assert_eq!(curl.request("GET", "/apis", false, &alice).0, 200, "discovery is for everyone");
    assert_eq!(curl.request("GET", "/version", false, &alice).0, 200);

    // The real kubectl grants and checks: a ClusterRoleBinding to `view` for the user, a
    // Role and RoleBinding for her group, `auth can-i --as`.
    let kubectl = Kubectl::new(&server, None);
    kubectl.ok(&["create", "clusterrolebinding", "alice-view", "--clusterrole=view", "--user=alice"]);
    assert_eq!(curl.request("GET", "/api/v1/namespaces", false, &alice).0, 200);
    let json = ["-H", "Content-Type: application/json", "-d", r#"{"metadata":{"name":"made-by-alice"}}"#];
    let (code, _) =
        curl.request("POST", "/api/v1/namespaces/default/configmaps", false, &[&alice[..], &json[..]].concat());
    assert_eq!(code, 403, "view does not write");
    assert_eq!(kubectl.ok(&["auth", "can-i", "list", "pods", "--as", "alice"]).trim(), "yes");
    let output = kubectl.run(&["auth", "can-i", "create", "configmaps", "--as", "alice"]);
    assert_eq!((output.status.code(), String::from_utf8_lossy(&output.stdout).trim()), (Some(1), "no"));
    kubectl.ok(&["create", "role", "cm-writer", "--verb=create", "--resource=configmaps"]);
    kubectl.ok(&["create", "rolebinding", "devs-write-cms", "--role=cm-writer", "--group=dev"]);
    let (code, _) =
        curl.request("POST", "/api/v1/namespaces/default/configmaps", false, &[&alice[..], &json[..]].concat());
    assert_eq!(code, 201, "the group's Role lets her");
    assert_eq!(
        kubectl.ok(&["auth", "can-i", "create", "configmaps", "--as", "alice", "--as-group", "dev"]).trim(),
        "yes"
    );
    let output = kubectl.run(&[
        "auth",
        "can-i",
        "create",
        "configmaps",
        "-n",
        "kube-system",
        "--as",
        "alice",
        "--as-group",
        "dev",
    ]);
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "no", "another namespace");
    let rules = kubectl.ok(&["auth", "can-i", "--list", "--as", "alice", "--as-group", "dev"]);
    assert!(rules.contains("configmaps") && rules.contains("[create]"), "{rules}");
    // Service accounts are subjects too.
    kubectl.ok(&["create", "serviceaccount", "robot"]);
    let robot = ["--as", "system:serviceaccount:default:robot"];
    let output = kubectl.run(&[&["auth", "can-i", "get", "secrets"][..], &robot[..]].concat());
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "no");
    kubectl.ok(&["create", "rolebinding", "robot-edit", "--clusterrole=edit", "--serviceaccount=default:robot"]);
    assert_eq!(kubectl.ok(&[&["auth", "can-i", "get", "secrets"][..], &robot[..]].concat()).trim(), "yes");
    // Impersonation is itself authorized: alice may not act as someone else.
    let (code, _) =
        curl.request("GET", "/api/v1/namespaces", false, &[&alice[..], &["-H", "Impersonate-User: bob"][..]].concat());
    assert_eq!(code, 403);
}

#[test]
fn watches_from_a_compacted_revision_get_410_gone() {
    let server =
        TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &["--compaction-interval", "1s"]).unwrap();
    let curl = Curl { server: &server };
    let json = ["-H", "Content-Type: application/json"];
    let mut first_rv = String::new();
    let mut first_page = serde_json::Value::Null;
    for i in 0..1100 {
        let cm = format!(r#"{{"metadata":{{"name":"c{i}"}}}}"#);
        let (code, created) =
            curl.status("POST", "/api/v1/namespaces/default/configmaps", &[&json[..], &["-d", &cm]].concat());
        assert_eq!(code, 201);
        if i == 0 {
            first_rv = created["metadata"]["resourceVersion"].as_str().unwrap().to_string();
        }
        if i == 20 {
            first_page = curl.status("GET", "/api/v1/namespaces/default/configmaps?limit=5", &[]).1;
        }
        if i == 1050 {
            // Two compaction ticks: the second compacts to the revision the first one saw.
            std::thread::sleep(Duration::from_millis(2500));
        }
    }
    let (code, body) = curl.request(
        "GET",
        &format!("/api/v1/namespaces/default/configmaps?watch=true&resourceVersion={first_rv}&timeoutSeconds=2"),
        true,
        &[],
    );
    assert_eq!(code, 200, "{body}");
    let event: serde_json::Value = serde_json::from_str(body.lines().next().unwrap()).unwrap();
    assert_eq!(event["type"], "ERROR", "{body}");
    assert_eq!(event["object"]["code"], 410);
    assert_eq!(event["object"]["reason"], "Expired");
    // A list's continue token compacted away: 410, with the token that continues from the same
    // place at the latest revision (upstream's inconsistent continuation), which works.
    let token = first_page["metadata"]["continue"].as_str().unwrap();
    let path = |token: &str| {
        let token = token.replace('+', "%2B").replace('/', "%2F").replace('=', "%3D");
        format!("/api/v1/namespaces/default/configmaps?limit=5&continue={token}")
    };
    let (code, expired) = curl.status("GET", &path(token), &[]);
    assert_eq!((code, expired["reason"].as_str()), (410, Some("Expired")), "{expired}");
    let inconsistent = expired["metadata"]["continue"].as_str().expect("an inconsistent continue token");
    let (code, rest) = curl.status("GET", &path(inconsistent), &[]);
    assert_eq!(code, 200, "{rest}");
    let last_of_first = first_page["items"][4]["metadata"]["name"].as_str().unwrap();
    let first_of_rest = rest["items"][0]["metadata"]["name"].as_str().unwrap();
    assert!(first_of_rest > last_of_first, "{first_of_rest} follows {last_of_first}");
    assert_ne!(rest["metadata"]["resourceVersion"], first_page["metadata"]["resourceVersion"]);
}

/// A paged list (`limit`, `continue`) is one snapshot: later pages read the revision of the
/// first (from the watch cache) whatever was written since; pages are filled to the limit with
/// objects that match the selectors; `remainingItemCount` counts what follows; kubectl's
/// chunked reads (`--chunk-size`) list everything, as a table too.
#[test]
fn paged_lists_are_one_snapshot_filled_to_the_limit() {
    let server = server();
    let curl = Curl { server: &server };
    let kubectl = Kubectl::new(&server, None);
    let json = ["-H", "Content-Type: application/json"];
    let create = |name: &str, tier: &str| {
        let cm = format!(r#"{{"metadata":{{"name":"{name}","labels":{{"tier":"{tier}"}}}},"data":{{"v":"1"}}}}"#);
        let (code, body) =
            curl.status("POST", "/api/v1/namespaces/default/configmaps", &[&json[..], &["-d", &cm]].concat());
        assert_eq!(code, 201, "{body}");
    };
    for i in 0..30 {
        create(&format!("c{i:02}"), if i % 3 == 0 { "front" } else { "back" });
    }
    let path = |query: &str, token: Option<&str>| {
        let token = token.map(|t| t.replace('+', "%2B").replace('/', "%2F").replace('=', "%3D"));
        let token = token.map(|t| format!("&continue={t}")).unwrap_or_default();
        format!("/api/v1/namespaces/default/configmaps?{query}{token}")
    };
    let names = |list: &serde_json::Value| -> Vec<String> {
        list["items"].as_array().unwrap().iter().map(|o| o["metadata"]["name"].as_str().unwrap().to_string()).collect()
    };
    // The namespace's own objects (its root CA's ConfigMap) follow ours.
    let (_, all) = curl.status("GET", &path("", None), &[]);
    let ours = |names: Vec<String>| names.into_iter().filter(|n| n.starts_with('c')).collect::<Vec<_>>();
    let total = names(&all).len();
    let (code, first) = curl.status("GET", &path("limit=10", None), &[]);
    assert_eq!(code, 200, "{first}");
    assert_eq!(names(&first), (0..10).map(|i| format!("c{i:02}")).collect::<Vec<_>>());
    assert_eq!(first["metadata"]["remainingItemCount"], total - 10);
    // Writes after the first page: a later object deleted, one changed, one added.
    assert_eq!(curl.request("DELETE", "/api/v1/namespaces/default/configmaps/c15", true, &[]).0, 200);
    let patch = ["-H", "Content-Type: application/merge-patch+json", "-d", r#"{"data":{"v":"2"}}"#];
    assert_eq!(curl.request("PATCH", "/api/v1/namespaces/default/configmaps/c20", true, &patch).0, 200);
    create("c25a", "back");
    let mut listed = names(&first);
    let mut token = first["metadata"]["continue"].as_str().map(str::to_string);
    while let Some(t) = token {
        let (code, page) = curl.status("GET", &path("limit=10", Some(&t)), &[]);
        assert_eq!(code, 200, "{page}");
        assert_eq!(page["metadata"]["resourceVersion"], first["metadata"]["resourceVersion"], "one snapshot");
        for item in page["items"].as_array().unwrap().iter().filter(|o| o["data"].get("v").is_some()) {
            assert_eq!(item["data"]["v"], "1", "{item} as of the first page");
        }
        listed.extend(names(&page));
        token = page["metadata"]["continue"].as_str().map(str::to_string);
    }
    assert_eq!(listed.len(), total);
    assert_eq!(ours(listed), (0..30).map(|i| format!("c{i:02}")).collect::<Vec<_>>(), "the snapshot of the first page");
    // A new list sees the writes.
    let (_, now) = curl.status("GET", &path("limit=100", None), &[]);
    assert!(names(&now).contains(&"c25a".to_string()) && !names(&now).contains(&"c15".to_string()));
    assert!(now["metadata"].get("continue").is_none(), "{}", now["metadata"]);
    // With a selector, each page holds `limit` matches (while there are that many).
    let (_, fronts) = curl.status("GET", &path("limit=4&labelSelector=tier%3Dfront", None), &[]);
    assert_eq!(names(&fronts), ["c00", "c03", "c06", "c09"]);
    assert!(fronts["metadata"].get("remainingItemCount").is_none(), "not counted under a selector");
    let t = fronts["metadata"]["continue"].as_str().unwrap();
    let (_, rest) = curl.status("GET", &path("limit=4&labelSelector=tier%3Dfront", Some(t)), &[]);
    assert_eq!(names(&rest), ["c12", "c18", "c21", "c24"], "c15 was deleted");
    // kubectl reads in chunks (a Table per chunk) and shows every object once.
    let table = kubectl.ok(&["get", "configmaps", "--chunk-size=7", "-o", "name"]);
    let shown: Vec<&str> = table.lines().filter(|l| l.starts_with("configmap/c")).collect();
    assert_eq!(shown.len(), 30, "{table}");
    let wide = kubectl.ok(&["get", "configmaps", "--chunk-size=7", "-l", "tier=back"]);
    assert_eq!(wide.lines().filter(|l| l.starts_with('c')).count(), 21, "{wide}");
    // A token that does not decode is a 400 Status.
    let (code, bad) = curl.status("GET", &path("limit=10&continue=bm90IGpzb24%3D", None), &[]);
    assert_eq!((code, bad["reason"].as_str()), (400, Some("BadRequest")), "{bad}");
}

/// Bookmarks: a watch list (`sendInitialEvents`) ends its initial events with one marked
/// `k8s.io/initial-events-end`; a watch with a timeout gets one before it ends, carrying the
/// revision of the last change it passed on.
#[test]
fn watches_send_bookmarks() {
    let server = server();
    let curl = Curl { server: &server };
    let json = ["-H", "Content-Type: application/json"];
    for name in ["a", "b"] {
        let body = format!(r#"{{"metadata":{{"name":"{name}","labels":{{"test":"watch"}}}}}}"#);
        let (code, _) =
            curl.status("POST", "/api/v1/namespaces/default/configmaps", &[&json[..], &["-d", &body]].concat());
        assert_eq!(code, 201);
    }
    let (code, body) = curl.request(
        "GET",
        "/api/v1/namespaces/default/configmaps?labelSelector=test%3Dwatch&watch=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&allowWatchBookmarks=true&timeoutSeconds=3",
        true,
        &[],
    );
    assert_eq!(code, 200, "{body}");
    let events: Vec<serde_json::Value> = body.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    let kinds: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["ADDED", "ADDED", "BOOKMARK", "BOOKMARK"], "{body}");
    let end = &events[2]["object"];
    assert_eq!(end["kind"], "ConfigMap");
    assert_eq!(end["metadata"]["annotations"]["k8s.io/initial-events-end"], "true");
    let latest: i64 = events[1]["object"]["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
    let marked: i64 = end["metadata"]["resourceVersion"].as_str().unwrap().parse().unwrap();
    assert!(marked >= latest, "the bookmark covers the initial state");

    // Without allowWatchBookmarks, none.
    let (_, body) = curl.request(
        "GET",
        "/api/v1/namespaces/default/configmaps?labelSelector=test%3Dwatch&watch=true&timeoutSeconds=2",
        true,
        &[],
    );
    assert!(!body.contains("BOOKMARK"), "{body}");
}

/// pods/binding (the scheduler's write) and pods/eviction (which honours disruption budgets).
#[test]
fn pods_are_bound_and_evicted_through_their_subresources() {
    let server = server();
    let curl = Curl { server: &server };
    let json = ["-H", "Content-Type: application/json"];
    let post = |path: &str, body: &str| curl.status("POST", path, &[&json[..], &["-d", body]].concat());
    for name in ["web", "spare"] {
        let pod = format!(
            r#"{{"metadata":{{"name":"{name}","labels":{{"app":"web"}}}},"spec":{{"containers":[{{"name":"a","image":"nginx"}}]}}}}"#
        );
        assert_eq!(post("/api/v1/namespaces/default/pods", &pod).0, 201);
    }
    let binding =
        r#"{"apiVersion":"v1","kind":"Binding","metadata":{"name":"web"},"target":{"kind":"Node","name":"node-1"}}"#;
    let (code, status) = post("/api/v1/namespaces/default/pods/web/binding", binding);
    assert_eq!((code, status["status"].as_str()), (201, Some("Success")), "{status}");
    let (_, pod) = curl.status("GET", "/api/v1/namespaces/default/pods/web", &[]);
    assert_eq!(pod["spec"]["nodeName"], "node-1");
    let scheduled = pod["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "PodScheduled");
    assert_eq!(scheduled.unwrap()["status"], "True");
    let (code, again) = post("/api/v1/namespaces/default/pods/web/binding", binding);
    assert_eq!(code, 409, "{again}");
    assert!(again["message"].as_str().unwrap().contains(r#"already assigned to node "node-1""#), "{again}");
    let (code, invalid) =
        post("/api/v1/namespaces/default/pods/spare/binding", r#"{"metadata":{"name":"spare"},"target":{}}"#);
    assert_eq!((code, invalid["details"]["causes"][0]["field"].as_str()), (422, Some("target.name")), "{invalid}");

    // The pods are ready (as a kubelet would report); the disruption controller counts them.
    let kubectl = Kubectl::new(&server, None);
    for name in ["web", "spare"] {
        let ready = r#"{"status":{"phase":"Running","conditions":[{"type":"Ready","status":"True"}]}}"#;
        kubectl.ok(&["patch", "pod", name, "--subresource=status", "--type=merge", "-p", ready]);
    }
    let budget_says = |expected: &str| {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let status = kubectl.ok(&[
                "get",
                "pdb",
                "keep",
                "-o",
                "jsonpath={.status.currentHealthy}/{.status.desiredHealthy} {.status.disruptionsAllowed}",
            ]);
            if status == expected {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the budget's status is {status:?}, not {expected:?}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // A budget that allows no disruption refuses the eviction with 429...
    kubectl.ok(&["create", "poddisruptionbudget", "keep", "--selector=app=web", "--min-available=2"]);
    budget_says("2/2 0");
    let eviction = r#"{"apiVersion":"policy/v1","kind":"Eviction","metadata":{"name":"spare"}}"#;
    let (code, refused) = post("/api/v1/namespaces/default/pods/spare/eviction", eviction);
    assert_eq!((code, refused["reason"].as_str()), (429, Some("TooManyRequests")), "{refused}");
    // ...one that allows it lets it go, and counts it.
    kubectl.ok(&["patch", "pdb", "keep", "--type=merge", "-p", r#"{"spec":{"minAvailable":1}}"#]);
    budget_says("2/1 1");
    let (code, done) = post("/api/v1/namespaces/default/pods/spare/eviction", eviction);
    assert_eq!(code, 201, "{done}");
    assert_eq!(curl.status("GET", "/api/v1/namespaces/default/pods/spare", &[]).0, 404);
    budget_says("1/1 0");
    let resources = kubectl.ok(&["get", "--raw", "/api/v1"]);
    assert!(resources.contains("pods/binding") && resources.contains("pods/eviction"), "{resources}");
}

/// The watch cache: `resourceVersion=0` lists come from it, and many watchers, from the
/// current state or from a list's revision, all see the same change once.
#[test]
fn many_watchers_are_served_from_the_watch_cache() {
    let server = server();
    let curl = Curl { server: &server };
    let json = ["-H", "Content-Type: application/json"];
    let create = |name: &str| {
        let body = format!(r#"{{"metadata":{{"name":"{name}","labels":{{"test":"watch"}}}}}}"#);
        let (code, created) =
            curl.status("POST", "/api/v1/namespaces/default/configmaps", &[&json[..], &["-d", &body]].concat());
        assert_eq!(code, 201, "{created}");
        created
    };
    create("before");
    let (code, list) =
        curl.status("GET", "/api/v1/namespaces/default/configmaps?labelSelector=test%3Dwatch&resourceVersion=0", &[]);
    assert_eq!(code, 200);
    assert!(list["items"].as_array().unwrap().iter().any(|i| i["metadata"]["name"] == "before"), "{list}");
    let revision = list["metadata"]["resourceVersion"].as_str().unwrap().to_string();

    let watchers: Vec<_> = (0..20)
        .map(|i| {
            let path = if i % 2 == 0 {
                format!("/api/v1/namespaces/default/configmaps?labelSelector=test%3Dwatch&watch=true&resourceVersion={revision}&timeoutSeconds=4")
            } else {
                "/api/v1/namespaces/default/configmaps?labelSelector=test%3Dwatch&watch=true&timeoutSeconds=4".to_string()
            };
            let mut watch = server.admin_curl(&path);
            std::thread::spawn(move || {
                let output = watch.output().unwrap();
                (i, String::from_utf8(output.stdout).unwrap())
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let after = create("after");
    let after_revision = after["metadata"]["resourceVersion"].as_str().unwrap().to_string();
    for watcher in watchers {
        let (i, body) = watcher.join().unwrap();
        let events: Vec<serde_json::Value> = body.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        let names: Vec<(&str, &str)> = events
            .iter()
            .map(|e| (e["type"].as_str().unwrap(), e["object"]["metadata"]["name"].as_str().unwrap()))
            .collect();
        if i % 2 == 0 {
            assert_eq!(names, [("ADDED", "after")], "watcher {i} from the list's revision: {body}");
        } else {
            assert_eq!(names, [("ADDED", "before"), ("ADDED", "after")], "watcher {i} from the state: {body}");
        }
        assert_eq!(events.last().unwrap()["object"]["metadata"]["resourceVersion"], after_revision.as_str());
    }
}

/// apply with validation and a changed re-apply (strategic merge), scale, status, expose,
/// services, auth: through the dispatcher, which picks kubectl 1.33 for this server (its typed
/// `create` commands and `auth can-i` send protobuf bodies).
#[test]
fn kubectl_apply_scale_expose_and_auth() {
    // The API server's own semantics: no controller may rewrite the status this test writes.
    let server =
        TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &["--disable-controller-manager"]).unwrap();
    let kubectl = Kubectl::new(&server, None);
    let dir = server.scratch("manifests");
    let manifest = dir.join("web.yaml");
    let write = |image: &str, extra_label: &str| {
        std::fs::write(
            &manifest,
            format!(
                "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n  labels: {{app: web{extra_label}}}\nspec:\n  replicas: 2\n  selector:\n    matchLabels: {{app: web}}\n  template:\n    metadata:\n      labels: {{app: web}}\n    spec:\n      containers:\n      - name: nginx\n        image: {image}\n        ports: [{{containerPort: 80}}]\n        env: [{{name: MODE, value: fast}}]\n      - name: sidecar\n        image: busybox:1.36\n"
            ),
        )
        .unwrap();
    };
    write("nginx:1.25", "");
    let path = manifest.to_str().unwrap();
    assert!(kubectl.ok(&["apply", "-f", path]).contains("deployment.apps/web created"));
    write("nginx:1.27", ", tier: front");
    assert!(kubectl.ok(&["apply", "-f", path]).contains("deployment.apps/web configured"));
    let deployment: serde_json::Value =
        serde_json::from_str(&kubectl.ok(&["get", "deployment", "web", "-o", "json"])).unwrap();
    let containers = &deployment["spec"]["template"]["spec"]["containers"];
    assert_eq!(containers[0]["image"], "nginx:1.27", "the changed image");
    assert_eq!(containers[0]["ports"][0]["containerPort"], 80, "the rest of the container is kept");
    assert_eq!(containers[0]["env"][0]["value"], "fast");
    assert_eq!(containers[1]["name"], "sidecar");
    assert_eq!(deployment["metadata"]["labels"]["tier"], "front");
    assert_eq!(deployment["metadata"]["generation"], 2, "a spec change bumps the generation");
    let last_applied =
        deployment["metadata"]["annotations"]["kubectl.kubernetes.io/last-applied-configuration"].as_str().unwrap();
    assert!(last_applied.contains("nginx:1.27"));

    // Server-side field validation: kubectl asked for it, having found it in OpenAPI v3.
    let unknown = kubectl
        .apply_stdin(&["apply", "-f", "-"], "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\ndata: {a: b}\n");
    assert!(unknown.status.success(), "{}", String::from_utf8_lossy(&unknown.stderr));

    // scale goes through the discovered autoscaling/v1 Scale subresource.
    assert!(kubectl.ok(&["scale", "deployment", "web", "--replicas=5"]).contains("deployment.apps/web scaled"));
    assert_eq!(kubectl.ok(&["get", "deployment", "web", "-o", "jsonpath={.spec.replicas}"]), "5");
    // Status only changes through /status.
    kubectl.ok(&[
        "patch",
        "deployment",
        "web",
        "--subresource=status",
        "--type=merge",
        "-p",
        r#"{"status":{"replicas":5,"readyReplicas":5}}"#,
    ]);
    kubectl.ok(&["patch", "deployment", "web", "--type=merge", "-p", r#"{"status":{"readyReplicas":0}}"#]);
    assert!(kubectl.ok(&["get", "deployment", "web"]).contains("5/5"));

    // Services: expose allocates a ClusterIP from 10.96.0.0/16; NodePorts from 30000-32767.
    assert!(
        kubectl.ok(&["expose", "deployment", "web", "--port=80", "--target-port=8080"]).contains("service/web exposed")
    );
    assert!(kubectl.ok(&["create", "service", "nodeport", "np", "--tcp=80:8080"]).contains("service/np created"));
    let services = kubectl.ok(&["get", "services"]);
    assert_eq!(header(&services), ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]);
    assert!(services.lines().any(|l| l.starts_with("kubernetes") && l.contains("10.96.0.1 ")), "{services}");
    let web: serde_json::Value = serde_json::from_str(&kubectl.ok(&["get", "service", "web", "-o", "json"])).unwrap();
    let ip: std::net::Ipv4Addr = web["spec"]["clusterIP"].as_str().unwrap().parse().unwrap();
    assert_eq!(&ip.octets()[..2], [10, 96]);
    assert_eq!(web["spec"]["selector"]["app"], "web");
    assert_eq!(web["spec"]["ports"][0]["targetPort"], 8080);
    let node_port =
        kubectl.ok(&["get", "service", "np", "-o", "jsonpath={.spec.ports[0].nodePort}"]).parse::<u16>().unwrap();
    assert!((30000..=32767).contains(&node_port));
    let taken = kubectl.fails(&["create", "service", "clusterip", "dup", "--tcp=80", &format!("--clusterip={ip}")]);
    assert!(taken.contains("provided IP is already allocated"), "{taken}");
    let immutable = kubectl.fails(&["patch", "service", "web", "-p", r#"{"spec":{"clusterIP":"10.96.9.9"}}"#]);
    assert!(immutable.contains("field is immutable"), "{immutable}");
    kubectl.ok(&["delete", "service", "web"]);
    assert!(
        kubectl
            .ok(&["create", "service", "clusterip", "reuse", "--tcp=80", &format!("--clusterip={ip}")])
            .contains("created"),
        "a deleted Service's IP is free again"
    );

    // auth
    assert_eq!(kubectl.ok(&["auth", "can-i", "create", "pods"]).trim(), "yes");
    let whoami = kubectl.ok(&["auth", "whoami"]);
    assert!(whoami.contains("kubernetes-admin") && whoami.contains("system:masters"), "{whoami}");

    // delete -f waits until the object is gone.
    assert!(kubectl.ok(&["delete", "-f", path]).contains("deployment.apps \"web\" deleted"));
    assert!(kubectl.fails(&["get", "deployment", "web"]).contains("NotFound"));
}

/// The official Python client: CRUD, conflicts, selectors, watch and scale. `scripts/test`
/// installs it in a venv (`target/python`); TUGBOAT_PYTHON names that interpreter.
#[test]
fn the_python_client_works() {
    let python = std::env::var("TUGBOAT_PYTHON").unwrap_or_else(|_| "python3".into());
    let has_client = Command::new(&python).args(["-c", "import kubernetes"]).status().is_ok_and(|s| s.success());
    assert!(has_client, "{python} has no `kubernetes` module: run scripts/test, which installs it");
    let server = server();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/client_crud.py");
    let output = Command::new(&python).arg(&script).env("KUBECONFIG", server.kubeconfig()).output().unwrap();
    assert!(
        output.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Server-side apply: create, managedFields, a conflict with another manager, forcing it, and
/// removal of what an applier stops applying.
#[test]
fn kubectl_apply_server_side() {
    let server = server();
    let kubectl = Kubectl::new(&server, None);
    let manifest = server.scratch("ssa").join("web.yaml");
    let write = |containers: &str| {
        std::fs::write(
            &manifest,
            format!("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\nspec:\n  replicas: 2\n  selector: {{matchLabels: {{app: web}}}}\n  template:\n    metadata: {{labels: {{app: web}}}}\n    spec:\n      containers:\n{containers}"),
        )
        .unwrap();
    };
    write("      - {name: nginx, image: \"nginx:1.25\"}\n      - {name: side, image: busybox}\n");
    let path = manifest.to_str().unwrap();
    assert!(kubectl.ok(&["apply", "--server-side", "-f", path]).contains("deployment.apps/web serverside-applied"));
    let object: serde_json::Value =
        serde_json::from_str(&kubectl.ok(&["get", "deployment", "web", "-o", "json", "--show-managed-fields"]))
            .unwrap();
    let managed = &object["metadata"]["managedFields"][0];
    assert_eq!((managed["manager"].as_str(), managed["operation"].as_str()), (Some("kubectl"), Some("Apply")));
    assert!(managed["fieldsV1"]["f:spec"]["f:template"]["f:spec"]["f:containers"]["k:{\"name\":\"side\"}"].is_object());

    kubectl.ok(&["scale", "deployment", "web", "--replicas=4"]);
    let conflict = kubectl.fails(&["apply", "--server-side", "-f", path]);
    assert!(conflict.contains("Apply failed with 1 conflict") && conflict.contains(".spec.replicas"), "{conflict}");
    kubectl.ok(&["apply", "--server-side", "--force-conflicts", "-f", path]);
    assert_eq!(kubectl.ok(&["get", "deployment", "web", "-o", "jsonpath={.spec.replicas}"]), "2");

    write("      - {name: nginx, image: \"nginx:1.27\"}\n");
    kubectl.ok(&["apply", "--server-side", "-f", path]);
    let containers =
        kubectl.ok(&["get", "deployment", "web", "-o", "jsonpath={.spec.template.spec.containers[*].image}"]);
    assert_eq!(containers, "nginx:1.27", "the dropped container is gone, the image updated");
}

/// Deletion as upstream: finalizers hold an object until the last one is removed, pods bound to
/// a node terminate gracefully, propagation policies become the garbage collector's finalizers,
/// collections are deleted by selector, namespaces take their contents with them.
#[test]
fn deletion_follows_finalizers_grace_and_namespaces() {
    // What the API server records for the garbage collector; the collector itself (which would
    // finish the foreground deletion at once) is tested in controllers.rs.
    let server =
        TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &["--disable-controller-manager"]).unwrap();
    let kubectl = Kubectl::new(&server, None);
    kubectl.ok(&["create", "configmap", "held"]);
    kubectl.ok(&["patch", "configmap", "held", "-p", r#"{"metadata":{"finalizers":["example.com/hold"]}}"#]);
    kubectl.ok(&["delete", "configmap", "held", "--wait=false"]);
    let held = kubectl.ok(&["get", "configmap", "held", "-o", "jsonpath={.metadata.deletionTimestamp}"]);
    assert!(!held.is_empty(), "marked, not deleted");
    kubectl.ok(&[
        "patch",
        "configmap",
        "held",
        "--type=json",
        "-p",
        r#"[{"op":"remove","path":"/metadata/finalizers"}]"#,
    ]);
    assert!(kubectl.fails(&["get", "configmap", "held"]).contains("NotFound"), "gone with its last finalizer");

    kubectl.ok(&["create", "deployment", "fg", "--image=nginx"]);
    kubectl.ok(&["delete", "deployment", "fg", "--cascade=foreground", "--wait=false"]);
    let finalizers = kubectl.ok(&["get", "deployment", "fg", "-o", "jsonpath={.metadata.finalizers}"]);
    assert!(finalizers.contains("foregroundDeletion"), "{finalizers}");

    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: bound}\nspec: {nodeName: node-1, containers: [{name: a, image: busybox}]}\n";
    assert!(kubectl.apply_stdin(&["create", "-f", "-"], pod).status.success());
    kubectl.ok(&["delete", "pod", "bound", "--wait=false"]);
    assert!(kubectl.ok(&["get", "pod", "bound"]).contains("Terminating"));
    assert_eq!(kubectl.ok(&["get", "pod", "bound", "-o", "jsonpath={.metadata.deletionGracePeriodSeconds}"]), "30");
    kubectl.ok(&["delete", "pod", "bound", "--grace-period=0", "--force"]);
    assert!(kubectl.fails(&["get", "pod", "bound"]).contains("NotFound"));

    for name in ["a", "b", "c"] {
        kubectl.ok(&["create", "configmap", name]);
    }
    kubectl.ok(&["label", "configmap", "a", "b", "doomed=yes"]);
    let curl = Curl { server: &server };
    let (code, body) =
        curl.request("DELETE", "/api/v1/namespaces/default/configmaps?labelSelector=doomed%3Dyes", true, &[]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(kubectl.ok(&["get", "configmaps", "-o", "name"]).trim(), "configmap/c");

    // Without the namespace controller a deleted namespace stays Terminating (its
    // `kubernetes` finalizer is the controller's to remove) and refuses new content.
    kubectl.ok(&["create", "namespace", "scratch"]);
    kubectl.ok(&["delete", "namespace", "scratch", "--wait=false"]);
    assert!(kubectl.ok(&["get", "namespace", "scratch"]).contains("Terminating"));
    let refused = kubectl.fails(&["create", "configmap", "late", "-n", "scratch"]);
    assert!(refused.contains("because it is being terminated"), "{refused}");
    // A plain update cannot drop the finalizer; `finalize` can, and then the namespace goes.
    let mut namespace: serde_json::Value =
        serde_json::from_str(&kubectl.ok(&["get", "namespace", "scratch", "-o", "json"])).unwrap();
    namespace["spec"]["finalizers"] = serde_json::json!([]);
    namespace["metadata"].as_object_mut().unwrap().remove("resourceVersion");
    let body = namespace.to_string();
    let put =
        |path: &str| curl.request("PUT", path, true, &["-H", "Content-Type: application/json", "--data-binary", &body]);
    let (code, kept) = put("/api/v1/namespaces/scratch");
    assert_eq!(code, 200, "{kept}");
    assert!(kept.contains("\"kubernetes\""), "{kept}");
    let (code, body) = put("/api/v1/namespaces/scratch/finalize");
    assert_eq!(code, 200, "{body}");
    assert!(kubectl.fails(&["get", "namespace", "scratch"]).contains("NotFound"));
    let refused = kubectl.fails(&["delete", "namespace", "kube-system"]);
    assert!(refused.contains("Forbidden") && refused.contains("may not be deleted"), "{refused}");
}

#[test]
fn metrics_count_requests_by_verb_and_resource() {
    let server = server();
    let kubectl = Kubectl::new(&server, None);
    // Secrets: no controller writes any (ConfigMaps get a kube-root-ca.crt in each namespace).
    kubectl.ok(&["create", "secret", "generic", "counted", "--from-literal=a=b"]);
    kubectl.ok(&["get", "secret", "counted"]);
    let curl = Curl { server: &server };
    let (code, metrics) = curl.request("GET", "/metrics", true, &[]);
    assert_eq!(code, 200);
    assert!(
        metrics.contains(r#"apiserver_request_total{verb="create",group="",resource="secrets",code="201"} 1"#),
        "{metrics}"
    );
    assert!(
        metrics.contains(r#"apiserver_request_duration_seconds_count{verb="get",group="",resource="secrets"}"#),
        "{metrics}"
    );
    assert_eq!(curl.request("GET", "/metrics", false, &[]).0, 401, "metrics need credentials");
}

/// Events are objects: `get events` prints upstream's columns and `describe` shows the events
/// of the object. Workloads are defaulted as upstream defaults them.
#[test]
fn events_show_in_describe_and_workloads_print_their_columns() {
    let server = server();
    let kubectl = Kubectl::new(&server, None);
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: web}\nspec: {containers: [{name: a, image: nginx}]}\n";
    assert!(kubectl.apply_stdin(&["create", "-f", "-"], pod).status.success());
    let uid = kubectl.ok(&["get", "pod", "web", "-o", "jsonpath={.metadata.uid}"]);
    let event = format!(
        "apiVersion: v1\nkind: Event\nmetadata: {{name: web.1}}\ninvolvedObject: {{kind: Pod, name: web, namespace: default, uid: \"{uid}\"}}\nreason: Scheduled\nmessage: Successfully assigned default/web to node-1\ntype: Normal\nsource: {{component: default-scheduler}}\ncount: 1\n"
    );
    let created = kubectl.apply_stdin(&["create", "-f", "-"], &event);
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let events = kubectl.ok(&["get", "events"]);
    assert_eq!(header(&events), ["LAST", "SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]);
    assert!(events.contains("pod/web") && events.contains("Scheduled"), "{events}");
    let described = kubectl.ok(&["describe", "pod", "web"]);
    assert!(described.contains("Successfully assigned default/web to node-1"), "{described}");
    // An events.k8s.io/v1 Event (what kube-rs controllers post) is a core Event too.
    let event = format!(
        "apiVersion: events.k8s.io/v1\nkind: Event\nmetadata: {{name: web.2}}\nregarding: {{kind: Pod, name: web, namespace: default, uid: \"{uid}\"}}\nreason: Pulling\nnote: Pulling image nginx\ntype: Normal\naction: Pull\nreportingController: tugboat/kubelet\nreportingInstance: node-1\neventTime: \"2026-11-22T07:00:00.000000Z\"\n"
    );
    let created = kubectl.apply_stdin(&["create", "-f", "-"], &event);
    assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    let described = kubectl.ok(&["describe", "pod", "web"]);
    assert!(described.contains("Pulling image nginx"), "{described}");
    let core: serde_json::Value = serde_json::from_str(&kubectl.ok(&["get", "events", "web.2", "-o", "json"])).unwrap();
    assert_eq!(core["message"], "Pulling image nginx");
    assert_eq!(core["reportingComponent"], "tugboat/kubelet");
    let new: serde_json::Value =
        serde_json::from_str(&kubectl.ok(&["get", "events.v1.events.k8s.io", "web.1", "-o", "json"])).unwrap();
    assert_eq!(new["note"], "Successfully assigned default/web to node-1", "a core Event read as events.k8s.io");
    assert_eq!(new["regarding"]["name"], "web");
    let table = kubectl.ok(&["get", "events.v1.events.k8s.io"]);
    assert!(table.contains("pod/web") && table.contains("Pulling image nginx"), "{table}");

    kubectl.ok(&["create", "job", "once", "--image=busybox"]);
    let jobs = kubectl.ok(&["get", "jobs"]);
    assert_eq!(header(&jobs), ["NAME", "STATUS", "COMPLETIONS", "DURATION", "AGE"]);
    assert!(jobs.lines().any(|l| l.starts_with("once") && l.contains("0/1")), "{jobs}");
    assert_eq!(kubectl.ok(&["get", "job", "once", "-o", "jsonpath={.spec.backoffLimit}"]), "6");
    kubectl.ok(&["create", "cronjob", "tick", "--image=busybox", "--schedule=*/5 * * * *"]);
    let cronjobs = kubectl.ok(&["get", "cronjobs"]);
    assert_eq!(header(&cronjobs)[..2], ["NAME", "SCHEDULE"]);
    assert!(cronjobs.contains("*/5 * * * *"), "{cronjobs}");
}

/// Hostile bodies: deep nesting (a stack overflow would kill the whole server) and a YAML alias
/// bomb (memory) are refused with 400, and the server goes on.
#[test]
fn hostile_bodies_are_refused_and_the_server_survives() {
    let server = server();
    let curl = Curl { server: &server };
    let dir = server.scratch("hostile");
    let deep_yaml = format!("a: {}{}\n", "[".repeat(100_000), "]".repeat(100_000));
    let deep_json = format!("{{\"a\":{}{}}}", "[".repeat(100_000), "]".repeat(100_000));
    let mut bomb = String::from("a: &a [\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\",\"x\"]\n");
    for level in 1..12u8 {
        let (name, previous) = ((b'a' + level) as char, (b'a' + level - 1) as char);
        bomb.push_str(&format!("{name}: &{name} [{}]\n", vec![format!("*{previous}"); 9].join(",")));
    }
    for (file, content_type, body) in [
        ("deep.yaml", "application/yaml", deep_yaml),
        ("bomb.yaml", "application/yaml", bomb),
        ("deep.json", "application/json", deep_json),
    ] {
        let path = dir.join(file);
        std::fs::write(&path, body).unwrap();
        let (code, status) = curl.status(
            "POST",
            "/api/v1/namespaces/default/configmaps",
            &["-H", &format!("Content-Type: {content_type}"), "--data-binary", &format!("@{}", path.display())],
        );
        assert_eq!((code, status["reason"].as_str()), (400, Some("BadRequest")), "{file}: {status}");
    }
    assert_eq!(curl.request("GET", "/healthz", false, &[]), (200, "ok".to_string()), "the server is still up");
}

#[test]
fn a_nodes_credentials_reach_only_its_own_pods_objects() {
    let server = server();
    let kubectl = Kubectl::new(&server, None);
    for (kind, name) in [("secret", "used"), ("secret", "unused"), ("secret", "elsewhere"), ("configmap", "settings")] {
        let mut args = vec!["create", kind];
        if kind == "secret" {
            args.push("generic");
        }
        args.extend([name, "--from-literal=a=1"]);
        kubectl.ok(&args);
    }
    kubectl.ok(&["create", "serviceaccount", "builder"]);
    let pods = r#"
apiVersion: v1
kind: Pod
metadata: {name: on-n1}
spec:
  nodeName: n1
  containers:
  - name: app
    image: busybox
    env: [{name: A, valueFrom: {secretKeyRef: {name: used, key: a}}}]
    volumeMounts: [{name: settings, mountPath: /etc/settings}]
  volumes: [{name: settings, configMap: {name: settings}}]
---
apiVersion: v1
kind: Pod
metadata: {name: on-n2}
spec:
  nodeName: n2
  serviceAccountName: builder
  containers: [{name: app, image: busybox}]
  volumes: [{name: s, secret: {secretName: elsewhere}}]
---
apiVersion: v1
kind: Node
metadata: {name: n2}
"#;
    let applied = kubectl.apply_stdin(&["apply", "-f", "-"], pods);
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));
    // As node n1's kubelet would be: user system:node:n1 in group system:nodes.
    let as_n1 = |args: &[&str]| -> Vec<String> {
        let mut all: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        all.extend(["--as", "system:node:n1", "--as-group", "system:nodes"].map(String::from));
        all
    };
    let ok = |args: &[&str]| kubectl.ok(&as_n1(args).iter().map(String::as_str).collect::<Vec<_>>());
    let fails = |args: &[&str]| kubectl.fails(&as_n1(args).iter().map(String::as_str).collect::<Vec<_>>());

    // The Node authorizer: what n1's pods use, by name, and nothing else. (It reads the pods
    // from the watch cache, a moment behind the store.)
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !kubectl
        .run(&as_n1(&["get", "secret", "used"]).iter().map(String::as_str).collect::<Vec<_>>())
        .status
        .success()
    {
        assert!(std::time::Instant::now() < deadline, "n1 cannot read its pod's secret");
        std::thread::sleep(Duration::from_millis(100));
    }
    ok(&["get", "configmap", "settings"]);
    ok(&["get", "serviceaccount", "default"]);
    ok(&["create", "token", "default"]);
    let refused = fails(&["get", "secret", "unused"]);
    assert!(
        refused.contains(
            "secrets \"unused\" is forbidden: User \"system:node:n1\" cannot get resource \"secrets\" in API group \"\" \
             in the namespace \"default\": no relationship found between node 'n1' and this object"
        ),
        "{refused}"
    );
    assert!(fails(&["get", "secret", "elsewhere"]).contains("no relationship"), "n2's pod's secret");
    assert!(fails(&["get", "secrets"]).contains("Forbidden"), "no listing");
    assert!(fails(&["create", "token", "builder"]).contains("no relationship"), "n2's pod's service account");
    assert_eq!(ok(&["auth", "can-i", "get", "secret/used"]).trim(), "yes");
    let output =
        kubectl.run(&as_n1(&["auth", "can-i", "get", "secret/unused"]).iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(String::from_utf8_lossy(&output.stdout).trim(), "no");
    // The same answers to anyone asking for it (SubjectAccessReview, as kubelets do).
    let review = |name: &str| {
        let spec = format!(
            r#"{{"user":"system:node:n1","groups":["system:nodes"],"resourceAttributes":{{"verb":"get","resource":"secrets","namespace":"default","name":"{name}"}}}}"#
        );
        let manifest =
            format!(r#"{{"apiVersion":"authorization.k8s.io/v1","kind":"SubjectAccessReview","spec":{spec}}}"#);
        let out = kubectl.apply_stdin(&["create", "-f", "-", "-o", "jsonpath={.status.allowed}"], &manifest);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!((review("used").as_str(), review("unused").as_str()), ("true", "false"));
    // RBAC's system:node still lets it read pods and services.
    ok(&["get", "pods"]);
    ok(&["get", "services"]);

    // NodeRestriction: its own Node, Lease and pods only.
    let node = kubectl.apply_stdin(
        &as_n1(&["apply", "-f", "-"]).iter().map(String::as_str).collect::<Vec<_>>(),
        "apiVersion: v1\nkind: Node\nmetadata: {name: n1}\n",
    );
    assert!(node.status.success(), "a node registers itself: {}", String::from_utf8_lossy(&node.stderr));
    ok(&["label", "node", "n1", "disk=ssd"]);
    let refused = fails(&["label", "node", "n2", "disk=ssd"]);
    assert!(refused.contains("node \"n1\" is not allowed to modify node \"n2\""), "{refused}");
    let refused = fails(&["delete", "pod", "on-n2"]);
    assert!(refused.contains("node \"n1\" can only delete pods with spec.nodeName set to itself"), "{refused}");
    let refused = fails(&["run", "plain", "--image=busybox", "--overrides={\"spec\":{\"nodeName\":\"n1\"}}"]);
    assert!(refused.contains("can only create mirror pods"), "{refused}");
    let lease = |name: &str| {
        format!(
            "apiVersion: coordination.k8s.io/v1\nkind: Lease\nmetadata: {{name: {name}, namespace: kube-node-lease}}\nspec: {{holderIdentity: {name}}}\n"
        )
    };
    let apply_as_n1 = |manifest: &str| {
        kubectl.apply_stdin(&as_n1(&["apply", "-f", "-"]).iter().map(String::as_str).collect::<Vec<_>>(), manifest)
    };
    assert!(apply_as_n1(&lease("n1")).status.success(), "its own lease");
    let refused = apply_as_n1(&lease("n2"));
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("can only access node lease with the same name"),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    ok(&["delete", "pod", "on-n1", "--wait=false"]);
    kubectl.ok(&["get", "pod", "on-n2"]);
}

#[test]
fn network_policies_are_served_defaulted_and_validated() {
    let server = server();
    let kubectl = Kubectl::new(&server, None);
    let policy = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress: [{from: [{podSelector: {matchLabels: {app: web}}}], ports: [{port: 5432}]}]
  egress: [{to: [{ipBlock: {cidr: 10.0.0.0/8}}]}]
"#;
    let out = kubectl.apply_stdin(&["apply", "-f", "-"], policy);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Upstream's defaults: both directions (there are egress rules), TCP.
    assert_eq!(kubectl.ok(&["get", "netpol", "db", "-o", "jsonpath={.spec.policyTypes}"]), r#"["Ingress","Egress"]"#);
    assert_eq!(kubectl.ok(&["get", "netpol", "db", "-o", "jsonpath={.spec.ingress[0].ports[0].protocol}"]), "TCP");
    let table = kubectl.ok(&["get", "networkpolicies"]);
    assert!(table.starts_with("NAME") && table.contains("POD-SELECTOR") && table.contains("app=db"), "{table}");
    let bad = policy.replace("10.0.0.0/8", "10.0.0.0/33").replace("{port: 5432}", "{port: 5432, protocol: ICMP}");
    let out = kubectl.apply_stdin(&["apply", "-f", "-"], &bad.replace("name: db", "name: bad"));
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("spec.ingress[0].ports[0].protocol: Unsupported value: \"ICMP\""), "{said}");
    assert!(said.contains("spec.egress[0].to[0].ipBlock.cidr: Invalid value: \"10.0.0.0/33\""), "{said}");
}

#[test]
fn ingresses_and_ingress_classes_are_served() {
    let server = server();
    let kubectl = Kubectl::new(&server, None);
    let class = "apiVersion: networking.k8s.io/v1\nkind: IngressClass\nmetadata: {name: edge}\nspec: {controller: example.com/edge}\n";
    let out = kubectl.apply_stdin(&["apply", "-f", "-"], class);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    kubectl.ok(&[
        "create",
        "ingress",
        "web",
        "--class=edge",
        "--rule=shop.example.com/=web:80",
        "--rule=shop.example.com/api*=api:8080",
    ]);
    let table = kubectl.ok(&["get", "ingress"]);
    let header = header(&table);
    assert_eq!(header, ["NAME", "CLASS", "HOSTS", "ADDRESS", "PORTS", "AGE"], "{table}");
    assert!(table.contains("web") && table.contains("edge") && table.contains("shop.example.com"), "{table}");
    let path_types = kubectl.ok(&["get", "ing", "web", "-o", "jsonpath={.spec.rules[*].http.paths[*].pathType}"]);
    assert_eq!(path_types, "Exact Prefix");
    assert!(kubectl.ok(&["get", "ingressclasses"]).contains("example.com/edge"));
    let described = kubectl.ok(&["describe", "ingress", "web"]);
    assert!(described.contains("shop.example.com") && described.contains("api:8080"), "{described}");
}
