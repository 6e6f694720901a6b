//! Real containers end to end: `tugboat server` with its node agent, driven by the real
//! kubectl. Each test runs in network, mount and pid namespaces of its own
//! (`tugboat_testkit::isolated`): the node bridge, the pods' veths and mounts never touch the
//! host, and every process dies with the test.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::Value;
use tugboat_testkit::TugboatServer;

const TUGBOAT: &str = env!("CARGO_BIN_EXE_tugboat");

struct Node {
    server: TugboatServer,
    logs: PathBuf,
}

/// A server with its agent (node `box`) and `busybox:latest` imported with `tugboat images import`.
fn node() -> Node {
    let logs = tempfile::Builder::new().prefix("tugboat-pod-logs-").tempdir().unwrap().keep();
    let server = TugboatServer::start_with_agent(
        Path::new(TUGBOAT),
        &["--node-name", "box", "--pod-log-dir", logs.to_str().unwrap()],
    )
    .expect("the server starts");
    let archive = server.scratch("images").join("busybox.tar");
    tugboat_testkit::image::busybox_archive(&archive).unwrap();
    let out = Command::new(TUGBOAT)
        .args(["images", "import"])
        .arg(&archive)
        .arg("--data-dir")
        .arg(server.data_dir())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // The node is Ready with a pod CIDR.
    wait(
        &server,
        &["get", "node", "box", "-o", "jsonpath={.spec.podCIDR} {.status.conditions[?(@.type==\"Ready\")].status}"],
        "node ready",
        |o| o.contains('/') && o.ends_with("True"),
    );
    Node { server, logs }
}

fn wait(server: &TugboatServer, args: &[&str], what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let out = Command::new("/usr/bin/kubectl")
            .args(args)
            .env("KUBECONFIG", server.kubeconfig())
            .env("HOME", server.scratch("home"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if out.status.success() && done(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{what}: {text} {}", String::from_utf8_lossy(&out.stderr));
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn pod_json(server: &TugboatServer, name: &str) -> Value {
    serde_json::from_str(&server.kubectl(&["get", "pod", name, "-o", "json"], None)).unwrap()
}

fn curl(url: &str) -> Option<String> {
    let out = Command::new("curl").args(["-sf", "--max-time", "2", url]).output().ok()?;
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn pods_run_in_sandboxes_with_an_ip_shared_localhost_and_volumes() {
    if !tugboat_testkit::isolated("pods_run_in_sandboxes_with_an_ip_shared_localhost_and_volumes") {
        return;
    }
    let Node { server, logs } = node();
    let manifest = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  terminationGracePeriodSeconds: 5
  volumes: [{name: www, emptyDir: {}}]
  containers:
  - name: server
    image: busybox
    command: [httpd, -f, -p, "8080", -h, /www]
    volumeMounts: [{name: www, mountPath: /www}]
  - name: writer
    image: busybox
    env:
    - {name: POD, valueFrom: {fieldRef: {fieldPath: metadata.name}}}
    - {name: GREETING, value: "hello from $(POD)"}
    command: [sh, -c]
    args:
    - |
      echo "$GREETING on $(hostname)" > /www/index.html
      until wget -q -O /www/seen http://127.0.0.1:8080/index.html; do sleep 0.2; done
      echo "writer saw: $(cat /www/seen)"
      exec sleep 3600
    volumeMounts: [{name: www, mountPath: /www}]
"#;
    server.kubectl(&["apply", "-f", "-"], Some(manifest));
    server.kubectl(&["wait", "--for=condition=Ready", "pod/web", "--timeout=60s"], None);
    let pod = pod_json(&server, "web");
    assert_eq!(pod["status"]["phase"], "Running");
    let ip = pod["status"]["podIP"].as_str().expect("a pod IP").to_string();
    assert!(ip.starts_with("10.244."), "{ip}");
    assert_eq!(pod["status"]["qosClass"], "BestEffort");
    for c in pod["status"]["containerStatuses"].as_array().unwrap() {
        assert_eq!(c["ready"], true);
        assert!(c["containerID"].as_str().unwrap().starts_with("tugboat://"), "{c}");
        assert!(c["imageID"].as_str().unwrap().starts_with("sha256:"), "{c}");
        assert!(c["state"]["running"]["startedAt"].is_string(), "{c}");
    }
    // The pod's IP is reachable from the node, and its containers share localhost and the volume.
    let deadline = Instant::now() + Duration::from_secs(30);
    let page = loop {
        if let Some(page) = curl(&format!("http://{ip}:8080/index.html")) {
            break page;
        }
        assert!(Instant::now() < deadline, "the pod's server never answered on {ip}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(page.trim(), "hello from web on web");
    let uid = pod["metadata"]["uid"].as_str().unwrap().to_string();
    let log = logs.join(format!("default_web_{uid}/writer/0.log"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("writer saw: hello from web on web") {
        assert!(Instant::now() < deadline, "writer log: {:?}", std::fs::read_to_string(&log));
        std::thread::sleep(Duration::from_millis(100));
    }
    // Events as upstream's kubelet records them.
    wait(
        &server,
        &["get", "events", "--field-selector", "involvedObject.name=web", "-o", "jsonpath={.items[*].reason}"],
        "events",
        |o| o.contains("Scheduled") && o.contains("Pulled") && o.contains("Created") && o.contains("Started"),
    );
    let wide = server.kubectl(&["get", "pod", "web", "-o", "wide"], None);
    assert!(wide.contains("2/2") && wide.contains("Running") && wide.contains(&ip) && wide.contains("box"), "{wide}");

    // Deleting stops the processes (httpd ignores nothing: SIGTERM ends it) and frees everything.
    let started = Instant::now();
    server.kubectl(&["delete", "pod", "web"], None);
    assert!(started.elapsed() < Duration::from_secs(20), "delete took {:?}", started.elapsed());
    assert!(curl(&format!("http://{ip}:8080/index.html")).is_none());
    let containers = server.data_dir().join("containers");
    let left: Vec<_> = std::fs::read_dir(&containers).unwrap().collect();
    assert!(left.is_empty(), "containers left: {left:?}");
    assert!(!server.data_dir().join("pods").join(&uid).exists());
}

#[test]
fn crashing_containers_back_off_and_bad_pods_say_why() {
    if !tugboat_testkit::isolated("crashing_containers_back_off_and_bad_pods_say_why") {
        return;
    }
    let Node { server, .. } = node();
    let manifest = r#"
apiVersion: v1
kind: Pod
metadata: {name: crasher}
spec:
  containers: [{name: c, image: busybox, command: [sh, -c, "echo crashing; exit 2"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: done}
spec:
  restartPolicy: Never
  initContainers: [{name: init, image: busybox, command: [sh, -c, "echo init > /work/init"], volumeMounts: [{name: w, mountPath: /work}]}]
  containers: [{name: c, image: busybox, command: [sh, -c, "test -f /work/init"], volumeMounts: [{name: w, mountPath: /work}]}]
  volumes: [{name: w, emptyDir: {}}]
---
apiVersion: v1
kind: Pod
metadata: {name: noimage}
spec:
  containers: [{name: c, image: nosuchimage:1.0}]
---
apiVersion: v1
kind: Pod
metadata: {name: nocommand}
spec:
  containers: [{name: c, image: busybox, command: [/no/such/command]}]
---
apiVersion: v1
kind: Pod
metadata: {name: nocm}
spec:
  containers:
  - name: c
    image: busybox
    command: [sleep, "3600"]
    env: [{name: X, valueFrom: {configMapKeyRef: {name: missing, key: k}}}]
"#;
    server.kubectl(&["apply", "-f", "-"], Some(manifest));
    // Init container first, then the main one: the pod succeeds.
    wait(&server, &["get", "pod", "done", "-o", "jsonpath={.status.phase}"], "done succeeds", |o| o == "Succeeded");
    let done = pod_json(&server, "done");
    assert_eq!(done["status"]["initContainerStatuses"][0]["state"]["terminated"]["reason"], "Completed");
    // A crashing container is restarted after upstream's back-off.
    let status = wait(
        &server,
        &[
            "get",
            "pod",
            "crasher",
            "-o",
            "jsonpath={.status.containerStatuses[0].restartCount} {.status.containerStatuses[0].state.waiting.reason}",
        ],
        "crasher restarts",
        |o| o.starts_with('1'),
    );
    assert!(status.starts_with('1'), "{status}");
    let crasher = pod_json(&server, "crasher");
    assert_eq!(crasher["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"], 2);
    wait(&server, &["get", "pod", "crasher"], "CrashLoopBackOff shown", |o| o.contains("CrashLoopBackOff"));
    // Bad pods say why, and the node keeps serving the others.
    wait(
        &server,
        &["get", "pod", "noimage", "-o", "jsonpath={.status.containerStatuses[0].state.waiting.reason}"],
        "noimage",
        |o| o == "ErrImageNeverPull",
    );
    let nocommand = wait(
        &server,
        &[
            "get",
            "pod",
            "nocommand",
            "-o",
            "jsonpath={.status.containerStatuses[0].state.waiting.reason}: {.status.containerStatuses[0].state.waiting.message}",
        ],
        "nocommand",
        |o| o.starts_with("RunContainerError"),
    );
    assert!(nocommand.contains("/no/such/command"), "{nocommand}");
    let nocm = wait(
        &server,
        &[
            "get",
            "pod",
            "nocm",
            "-o",
            "jsonpath={.status.containerStatuses[0].state.waiting.reason}: {.status.containerStatuses[0].state.waiting.message}",
        ],
        "nocm",
        |o| o.starts_with("CreateContainerConfigError"),
    );
    assert!(nocm.contains("missing"), "{nocm}");
    // Once the ConfigMap exists, the pod starts.
    server.kubectl(&["create", "configmap", "missing", "--from-literal=k=v"], None);
    server.kubectl(&["wait", "--for=condition=Ready", "pod/nocm", "--timeout=60s"], None);
    server.kubectl(&["delete", "pod", "--all", "--grace-period=1", "--wait=true"], None);
}
