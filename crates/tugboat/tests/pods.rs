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
    _logs_dir: tempfile::TempDir,
}

/// A server with its agent (node `box`) and `busybox:1.35` imported with `tugboat images import`.
fn node() -> Node {
    let logs_dir = tempfile::Builder::new().prefix("tugboat-pod-logs-").tempdir().unwrap();
    let logs = logs_dir.path().to_path_buf();
    let server = TugboatServer::start_with_agent(
        Path::new(TUGBOAT),
        // The isolated network has no default route: the node is reached on loopback.
        &["--node-name", "box", "--node-ip", "127.0.0.1", "--pod-log-dir", logs.to_str().unwrap()],
    )
    .expect("the server starts");
    tugboat_testkit::image::import_busybox(Path::new(TUGBOAT), &server.data_dir()).unwrap();
    // The node is Ready with a pod CIDR.
    wait(
        &server,
        &["get", "node", "box", "-o", "jsonpath={.spec.podCIDR} {.status.conditions[?(@.type==\"Ready\")].status}"],
        "node ready",
        |o| o.contains('/') && o.ends_with("True"),
    );
    Node { server, logs, _logs_dir: logs_dir }
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

/// kubectl that may fail: (success, stdout, stderr).
fn try_kubectl(server: &TugboatServer, args: &[&str]) -> (bool, String, String) {
    let out = Command::new("/usr/bin/kubectl")
        .args(args)
        .env("KUBECONFIG", server.kubeconfig())
        .env("HOME", server.scratch("home"))
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
    let Node { server, logs, _logs_dir } = node();
    let manifest = r#"
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  terminationGracePeriodSeconds: 5
  volumes: [{name: www, emptyDir: {}}]
  containers:
  - name: server
    image: busybox:1.35
    command: [httpd, -f, -p, "8080", -h, /www]
    volumeMounts: [{name: www, mountPath: /www}]
  - name: writer
    image: busybox:1.35
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
    // A static pod: a manifest in <data-dir>/manifests runs as mirror pod `<name>-<node>`.
    let manifests = server.data_dir().join("manifests");
    std::fs::write(
        manifests.join("static.yaml"),
        "apiVersion: v1\nkind: Pod\nmetadata: {name: static}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers: [{name: c, image: \"busybox:1.35\", command: [sleep, \"3600\"]}]\n",
    )
    .unwrap();
    wait(&server, &["get", "pods", "-o", "name"], "the mirror pod appears", |o| o.contains("pod/static-box"));
    server.kubectl(&["wait", "--for=condition=Ready", "pod/static-box", "--timeout=60s"], None);
    let mirror = pod_json(&server, "static-box");
    assert_eq!(mirror["metadata"]["annotations"]["kubernetes.io/config.source"], "file");
    assert_eq!(mirror["metadata"]["ownerReferences"][0]["kind"], "Node");
    std::fs::remove_file(manifests.join("static.yaml")).unwrap();
    wait(&server, &["get", "pods", "-o", "name"], "the static pod goes", |o| !o.contains("static-box"));
    // kubectl logs, through the API server and the kubelet's API.
    let logged = server.kubectl(&["logs", "web", "-c", "writer"], None);
    assert_eq!(logged, "writer saw: hello from web on web\n");
    let stamped = server.kubectl(&["logs", "web", "-c", "writer", "--timestamps", "--tail", "1"], None);
    assert!(stamped.ends_with("Z writer saw: hello from web on web\n") && stamped.starts_with("20"), "{stamped}");
    let (ok, _, err) = try_kubectl(&server, &["logs", "web", "-c", "nope"]);
    assert!(!ok && err.contains("container nope is not valid for pod web"), "{err}");
    let (ok, _, err) = try_kubectl(&server, &["logs", "web", "-c", "writer", "--previous"]);
    assert!(!ok && err.contains("previous terminated container \"writer\" in pod \"web\" not found"), "{err}");
    // kubectl exec (websocket v5 through the API server to the kubelet): output, stdin, exit
    // codes, and a terminal.
    assert_eq!(
        server.kubectl(&["exec", "web", "-c", "writer", "--", "cat", "/www/index.html"], None),
        "hello from web on web\n"
    );
    assert_eq!(server.kubectl(&["exec", "-i", "web", "-c", "writer", "--", "cat"], Some("piped\n")), "piped\n");
    let out = Command::new("/usr/bin/kubectl")
        .args(["exec", "web", "-c", "writer", "--", "sh", "-c", "echo out; echo err >&2; exit 3"])
        .env("KUBECONFIG", server.kubeconfig())
        .env("HOME", server.scratch("home"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(3));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "out\n");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("err\n") && stderr.contains("command terminated with exit code 3"), "{stderr}");
    let script = format!(
        "stty rows 30 cols 100; KUBECONFIG={} HOME={} /usr/bin/kubectl exec -it web -c writer -- sh -c 'test -t 0 && test -t 1 && echo on a terminal; tty; sleep 0.5; stty size'",
        server.kubeconfig().display(),
        server.scratch("home").display()
    );
    let out = Command::new("script")
        .args(["-qec", &script, "/dev/null"])
        .env("COLUMNS", "100")
        .env("LINES", "30")
        .output()
        .unwrap();
    let shown = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(out.status.success() && shown.contains("on a terminal"), "{shown}");
    // The terminal is the container's own (its devpts), sized as the client's.
    assert!(shown.contains("\n/dev/pts/") && shown.contains("\n30 100\n"), "{shown}");
    // kubectl 1.27 speaks SPDY/3.1 for exec: the same through the other transport.
    let kubectl_127 = "/usr/lib/google-cloud-sdk/bin/kubectl.1.27";
    let old = |args: &[&str], stdin: Option<&str>| {
        let mut child = Command::new(kubectl_127)
            .args(args)
            .env("KUBECONFIG", server.kubeconfig())
            .env("HOME", server.scratch("home-1.27"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    let out =
        old(&["exec", "web", "-c", "writer", "--", "sh", "-c", "cat /www/index.html; echo err >&2; exit 4"], None);
    assert_eq!(out.status.code(), Some(4), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "hello from web on web\n");
    assert!(String::from_utf8_lossy(&out.stderr).starts_with("err\n"));
    let out = old(&["exec", "-i", "web", "-c", "writer", "--", "cat"], Some("over spdy\n"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "over spdy\n");
    let script = format!(
        "KUBECONFIG={} HOME={} {kubectl_127} exec -it web -c writer -- sh -c 'test -t 0 && echo on a terminal'",
        server.kubeconfig().display(),
        server.scratch("home-1.27").display()
    );
    let out = Command::new("script").args(["-qec", &script, "/dev/null"]).output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(out.status.success() && shown.contains("on a terminal"), "{shown}");
    // kubectl port-forward (SPDY; kubectl 1.33 first tries a websocket tunnel, then falls back).
    for (kubectl, port) in ["/usr/bin/kubectl", kubectl_127].into_iter().zip([18080u16, 18081]) {
        let mut forward = tugboat_testkit::KillOnDrop(
            Command::new(kubectl)
                .args(["port-forward", "pod/web", &format!("{port}:8080")])
                .env("KUBECONFIG", server.kubeconfig())
                .env("HOME", server.scratch("home-pf"))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        // Kept open: kubectl writes a line per connection, and a closed pipe would end it.
        let mut printed = std::io::BufReader::new(forward.0.stdout.take().unwrap());
        let mut line = String::new();
        std::io::BufRead::read_line(&mut printed, &mut line).unwrap();
        assert!(line.contains(&format!("127.0.0.1:{port}")), "{line}");
        for _ in 0..2 {
            assert_eq!(
                curl(&format!("http://127.0.0.1:{port}/index.html")).as_deref(),
                Some("hello from web on web\n")
            );
        }
    }
    // The official Python client's exec (websocket v4).
    let python = std::env::var("TUGBOAT_PYTHON").unwrap_or_else(|_| "python3".into());
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/exec.py");
    let out = Command::new(&python)
        .arg(&script)
        .args(["web", "writer", "sh", "-c", "cat /www/index.html; exit 5"])
        .env("KUBECONFIG", server.kubeconfig())
        .output()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "hello from web on web\nexit=5\n",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The oldest websocket subprotocol (upstream's e2e suite): output, and no status on
    // the error channel when the command succeeds; a failure said there as text.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/exec_v1.py");
    let v1 = |command: &[&str]| {
        let out = Command::new(&python)
            .arg(&script)
            .args(["web", "writer"])
            .args(command)
            .env("KUBECONFIG", server.kubeconfig())
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr)
    };
    let said = v1(&["echo", "remote execution test"]);
    assert_eq!(
        said.lines().filter(|l| !l.trim().is_empty() && l.trim() != "1" && l.trim() != "2").collect::<Vec<_>>(),
        ["1 remote execution test"],
        "{said}"
    );
    let said = v1(&["sh", "-c", "exit 3"]);
    assert!(said.contains("3 command terminated with non-zero exit code: exit code 3"), "{said}");
    // Logs over a websocket (upstream's e2e suite): binary messages, or base64 text.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/logs_ws.py");
    let logs = server.kubectl(&["logs", "web", "-c", "writer"], None);
    assert!(!logs.is_empty());
    for protocol in ["binary.k8s.io", "base64.binary.k8s.io"] {
        let out = Command::new(&python)
            .arg(&script)
            .args(["web", "writer", protocol])
            .env("KUBECONFIG", server.kubeconfig())
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            format!("{logs}closed\n"),
            "{protocol}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // kubectl cp, both ways (tar through exec).
    let local = server.scratch("cp");
    std::fs::write(local.join("up.txt"), "uploaded\n").unwrap();
    server.kubectl(&["cp", local.join("up.txt").to_str().unwrap(), "web:/www/up.txt", "-c", "writer"], None);
    assert_eq!(curl(&format!("http://{ip}:8080/up.txt")).as_deref(), Some("uploaded\n"));
    server.kubectl(&["cp", "web:/www/index.html", local.join("down.html").to_str().unwrap(), "-c", "writer"], None);
    assert_eq!(std::fs::read_to_string(local.join("down.html")).unwrap(), "hello from web on web\n");
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
  containers: [{name: c, image: busybox:1.35, command: [sh, -c, "echo crashing; exit 2"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: done}
spec:
  restartPolicy: Never
  initContainers: [{name: init, image: busybox:1.35, command: [sh, -c, "echo init > /work/init; echo init done"], volumeMounts: [{name: w, mountPath: /work}]}]
  containers: [{name: c, image: busybox:1.35, command: [sh, -c, "test -f /work/init"], volumeMounts: [{name: w, mountPath: /work}]}]
  volumes: [{name: w, emptyDir: {}}]
---
apiVersion: v1
kind: Pod
metadata: {name: a-pod-whose-name-is-longer-than-a-hostname-may-be-0123456789-abcdefghij}
spec:
  restartPolicy: Never
  containers: [{name: c, image: busybox:1.35, command: [hostname]}]
---
apiVersion: v1
kind: Pod
metadata: {name: deadline}
spec:
  terminationGracePeriodSeconds: 1
  containers: [{name: c, image: busybox:1.35, command: [sleep, "3600"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: initfails}
spec:
  initContainers:
  - {name: init1, image: busybox:1.35, command: [sh, -c, "exit 1"]}
  - {name: init2, image: busybox:1.35, command: [sh, -c, "exit 0"]}
  containers: [{name: c, image: busybox:1.35, command: [sleep, "3600"]}]
---
apiVersion: v1
kind: Pod
metadata: {name: noimage}
spec:
  containers: [{name: c, image: nosuchimage:1.0, imagePullPolicy: Never}]
---
apiVersion: v1
kind: Pod
metadata: {name: nocommand}
spec:
  containers: [{name: c, image: busybox:1.35, command: [/no/such/command]}]
---
apiVersion: v1
kind: Pod
metadata: {name: nocm}
spec:
  containers:
  - name: c
    image: busybox:1.35
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
    assert_eq!(server.kubectl(&["logs", "done", "-c", "init"], None), "init done\n");
    assert_eq!(server.kubectl(&["logs", "crasher", "--previous"], None), "crashing\n");
    let crasher = pod_json(&server, "crasher");
    assert_eq!(crasher["status"]["containerStatuses"][0]["lastState"]["terminated"]["exitCode"], 2);
    wait(&server, &["get", "pod", "crasher"], "CrashLoopBackOff shown", |o| o.contains("CrashLoopBackOff"));
    // activeDeadlineSeconds set on a running pod: it fails once active that long.
    wait(&server, &["get", "pod", "deadline", "-o", "jsonpath={.status.phase}"], "deadline runs", |o| o == "Running");
    server.kubectl(&["patch", "pod", "deadline", "-p", r#"{"spec":{"activeDeadlineSeconds":2}}"#], None);
    let ended = wait(
        &server,
        &["get", "pod", "deadline", "-o", "jsonpath={.status.phase} {.status.reason}"],
        "deadline fails",
        |o| o.starts_with("Failed"),
    );
    assert_eq!(ended, "Failed DeadlineExceeded");
    // A pod name longer than a hostname may be: the hostname is cut to 63 characters.
    let long = "a-pod-whose-name-is-longer-than-a-hostname-may-be-0123456789-abcdefghij";
    wait(&server, &["get", "pod", long, "-o", "jsonpath={.status.phase}"], "the long-named pod runs", |o| {
        o == "Succeeded"
    });
    assert_eq!(server.kubectl(&["logs", long], None).trim(), &long[..63]);
    // A failing init container is restarted; what comes after it waits, PodInitializing.
    wait(
        &server,
        &["get", "pod", "initfails", "-o", "jsonpath={.status.initContainerStatuses[0].restartCount}"],
        "init1 restarts",
        |o| o.parse::<i32>().is_ok_and(|n| n >= 1),
    );
    let initfails = pod_json(&server, "initfails");
    assert_eq!(initfails["status"]["phase"], "Pending");
    assert_eq!(initfails["status"]["initContainerStatuses"][1]["state"]["waiting"]["reason"], "PodInitializing");
    assert_eq!(initfails["status"]["containerStatuses"][0]["state"]["waiting"]["reason"], "PodInitializing");
    let condition = |kind: &str| -> Value {
        initfails["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == kind).unwrap().clone()
    };
    let initialized = condition("Initialized");
    assert_eq!(
        (&initialized["status"], &initialized["reason"], &initialized["message"]),
        (
            &Value::from("False"),
            &Value::from("ContainersNotInitialized"),
            &Value::from("containers with incomplete status: [init1 init2]")
        )
    );
    assert_eq!(condition("Ready")["message"], "containers with unready status: [c]");
    // Bad pods say why, and the node keeps serving the others.
    let (ok, _, err) = try_kubectl(&server, &["logs", "noimage"]);
    assert!(!ok && err.contains("is waiting to start"), "{err}");
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
    // A memory limit is a cgroup limit: going over it is OOMKilled.
    let hog = "apiVersion: v1\nkind: Pod\nmetadata: {name: hog}\nspec:\n  restartPolicy: Never\n  containers: [{name: c, image: busybox:1.35, resources: {limits: {memory: 16Mi}}, command: [sh, -c, 'x=$(head -c 64000000 /dev/zero | tr \"\\\\0\" a); echo survived']}]\n";
    server.kubectl(&["apply", "-f", "-"], Some(hog));
    let reason = wait(
        &server,
        &["get", "pod", "hog", "-o", "jsonpath={.status.phase} {.status.containerStatuses[0].state.terminated.reason}"],
        "hog is killed",
        |o| o.starts_with("Failed"),
    );
    assert_eq!(reason, "Failed OOMKilled");
    assert_eq!(pod_json(&server, "hog")["status"]["qosClass"], "Burstable");
    // configMap, secret and downwardAPI volumes, and env from them.
    let configured = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {greeting: hi, app.conf: "x=1"}
---
apiVersion: v1
kind: Secret
metadata: {name: creds}
data: {password: czNjcmV0}
---
apiVersion: v1
kind: Pod
metadata: {name: configured, labels: {app: demo}}
spec:
  restartPolicy: Never
  containers:
  - name: c
    image: busybox:1.35
    command: [sh, -c, 'cat /etc/settings/greeting; echo; cat /etc/creds/password; echo; echo $GREETING $PASSWORD; cat /etc/info/name; echo; cat /etc/info/labels; echo; cat /etc/app.conf; echo; touch /etc/settings/x 2>/dev/null || echo read-only']
    env:
    - {name: GREETING, valueFrom: {configMapKeyRef: {name: settings, key: greeting}}}
    - {name: PASSWORD, valueFrom: {secretKeyRef: {name: creds, key: password}}}
    volumeMounts:
    - {name: settings, mountPath: /etc/settings}
    - {name: creds, mountPath: /etc/creds}
    - {name: info, mountPath: /etc/info}
    - {name: settings, mountPath: /etc/app.conf, subPath: app.conf}
  volumes:
  - {name: settings, configMap: {name: settings}}
  - {name: creds, secret: {secretName: creds}}
  - name: info
    downwardAPI: {items: [{path: name, fieldRef: {fieldPath: metadata.name}}, {path: labels, fieldRef: {fieldPath: metadata.labels}}]}
"#;
    server.kubectl(&["apply", "-f", "-"], Some(configured));
    wait(&server, &["get", "pod", "configured", "-o", "jsonpath={.status.phase}"], "configured succeeds", |o| {
        o == "Succeeded"
    });
    assert_eq!(
        server.kubectl(&["logs", "configured"], None),
        "hi\ns3cret\nhi s3cret\nconfigured\napp=\"demo\"\nx=1\nread-only\n"
    );
    // `logs -f` follows a running container until it ends.
    let counter = "apiVersion: v1\nkind: Pod\nmetadata: {name: counter}\nspec:\n  restartPolicy: Never\n  containers: [{name: c, image: busybox:1.35, command: [sh, -c, 'sleep 1; for i in 1 2 3; do echo $i; sleep 0.3; done']}]\n";
    server.kubectl(&["apply", "-f", "-"], Some(counter));
    wait(&server, &["get", "pod", "counter", "-o", "jsonpath={.status.phase}"], "counter runs", |o| o == "Running");
    assert_eq!(server.kubectl(&["logs", "-f", "counter"], None), "1\n2\n3\n");
    // A pod bound straight to the node (no scheduler) whose host port another pod holds is
    // refused by the kubelet's admission, as upstream's: Failed, reason NodePorts.
    let holder = "apiVersion: v1\nkind: Pod\nmetadata: {name: holder}\nspec:\n  containers: [{name: c, image: busybox:1.35, command: [sleep, '300'], ports: [{containerPort: 8080, hostPort: 18080}]}]\n";
    server.kubectl(&["apply", "-f", "-"], Some(holder));
    wait(&server, &["get", "pod", "holder", "-o", "jsonpath={.status.phase}"], "holder runs", |o| o == "Running");
    let clash = holder.replace("name: holder", "name: clash").replace("spec:\n", "spec:\n  nodeName: box\n");
    server.kubectl(&["apply", "-f", "-"], Some(&clash));
    let status = wait(
        &server,
        &["get", "pod", "clash", "-o", "jsonpath={.status.phase} {.status.reason}: {.status.message}"],
        "the clash is refused",
        |o| o.starts_with("Failed"),
    );
    assert_eq!(
        status,
        "Failed NodePorts: Pod was rejected: Predicate NodePorts failed: node(s) didn't have free ports for the requested pod ports"
    );
    server.kubectl(&["delete", "pod", "--all", "--grace-period=1", "--wait=true"], None);
}

#[test]
fn probes_gate_readiness_and_restart_unhealthy_containers() {
    if !tugboat_testkit::isolated("probes_gate_readiness_and_restart_unhealthy_containers") {
        return;
    }
    let Node { server, .. } = node();
    let manifest = r#"
apiVersion: v1
kind: Pod
metadata: {name: slow}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: busybox:1.35
    command: [sh, -c, "sleep 6; touch /tmp/ready; exec sleep 3600"]
    readinessProbe: {exec: {command: [cat, /tmp/ready]}, periodSeconds: 1}
---
apiVersion: v1
kind: Pod
metadata: {name: sick}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: busybox:1.35
    ports: [{name: http, containerPort: 8080}]
    command: [sh, -c, "echo ok > /tmp/index.html; httpd -p 8080 -h /tmp; sleep 4; killall httpd; exec sleep 3600"]
    livenessProbe: {httpGet: {path: /index.html, port: http}, periodSeconds: 1, failureThreshold: 2}
    readinessProbe: {tcpSocket: {port: 8080}, periodSeconds: 1}
"#;
    server.kubectl(&["apply", "-f", "-"], Some(manifest));
    // Running but not ready until the readiness probe passes.
    wait(&server, &["get", "pod", "slow", "-o", "jsonpath={.status.phase}"], "slow runs", |o| o == "Running");
    let ready = server
        .kubectl(&["get", "pod", "slow", "-o", "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}"], None);
    assert_eq!(ready, "False");
    server.kubectl(&["wait", "--for=condition=Ready", "pod/slow", "--timeout=60s"], None);
    // The liveness probe fails once httpd is gone: the container is restarted.
    server.kubectl(&["wait", "--for=condition=Ready", "pod/sick", "--timeout=60s"], None);
    wait(
        &server,
        &["get", "pod", "sick", "-o", "jsonpath={.status.containerStatuses[0].restartCount}"],
        "sick restarts",
        |o| o == "1",
    );
    let events = server.kubectl(
        &["get", "events", "--field-selector", "involvedObject.name=sick", "-o", "jsonpath={.items[*].message}"],
        None,
    );
    assert!(
        events.contains("Liveness probe failed") && events.contains("failed liveness probe, will be restarted"),
        "{events}"
    );
    server.kubectl(&["delete", "pod", "--all", "--wait=true"], None);
}

#[test]
fn lifecycle_hooks_run_and_kubectl_top_shows_usage() {
    if !tugboat_testkit::isolated("lifecycle_hooks_run_and_kubectl_top_shows_usage") {
        return;
    }
    let Node { server, .. } = node();
    let shared = server.scratch("hooks");
    let manifest = format!(
        r#"
apiVersion: v1
kind: Pod
metadata: {{name: busy, labels: {{app: busy}}}}
spec:
  terminationGracePeriodSeconds: 10
  volumes: [{{name: shared, hostPath: {{path: {shared}}}}}]
  containers:
  - name: burn
    image: busybox:1.35
    command: [sh, -c, "while true; do :; done"]
    volumeMounts: [{{name: shared, mountPath: /shared}}]
    lifecycle:
      postStart: {{exec: {{command: [sh, -c, "echo started > /shared/post-start"]}}}}
      preStop: {{exec: {{command: [sh, -c, "echo stopping > /shared/pre-stop"]}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: hookfail}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
  - name: c
    image: busybox:1.35
    command: [sleep, "3600"]
    lifecycle:
      postStart: {{exec: {{command: [sh, -c, "echo no >&2; exit 3"]}}}}
"#,
        shared = shared.display()
    );
    server.kubectl(&["apply", "-f", "-"], Some(&manifest));
    wait(&server, &["get", "pod", "busy", "-o", "jsonpath={.status.phase}"], "busy runs", |o| o == "Running");
    assert_eq!(std::fs::read_to_string(shared.join("post-start")).unwrap(), "started\n");
    // A failing postStart hook kills the container, with an event saying why.
    wait(
        &server,
        &["get", "events", "--field-selector", "involvedObject.name=hookfail,reason=FailedPostStartHook", "-o", "name"],
        "FailedPostStartHook",
        |o| !o.is_empty(),
    );
    wait(
        &server,
        &["get", "pod", "hookfail", "-o", "jsonpath={.status.containerStatuses[0].restartCount}"],
        "hookfail restarts",
        |o| o.parse::<u32>().is_ok_and(|n| n >= 1),
    );

    // kubectl top: the busy loop uses a good part of a core; the node shows up too.
    let top = wait(&server, &["top", "pod", "busy", "--no-headers"], "top pod", |o| o.starts_with("busy"));
    let millicores: u64 = top.split_whitespace().nth(1).unwrap().trim_end_matches('m').parse().unwrap();
    assert!(millicores >= 100, "a busy loop uses CPU: {top}");
    let containers = server.kubectl(&["top", "pod", "-l", "app=busy", "--containers", "--no-headers"], None);
    assert!(containers.starts_with("busy") && containers.contains("burn"), "{containers}");
    let nodes = wait(&server, &["top", "node", "--no-headers"], "top node", |o| o.starts_with("box"));
    assert!(nodes.contains('%'), "{nodes}");
    let raw = server.kubectl(&["get", "--raw", "/apis/metrics.k8s.io/v1beta1/namespaces/default/pods/busy"], None);
    let metrics: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(metrics["kind"], "PodMetrics");
    assert!(metrics["containers"][0]["usage"]["memory"].as_str().unwrap().ends_with("Ki"), "{metrics}");
    let (ok, _, err) = try_kubectl(&server, &["top", "pod", "nope"]);
    assert!(!ok && err.contains("not found"), "{err}");

    // preStop runs before the container is told to stop.
    server.kubectl(&["delete", "pod", "busy", "--wait=true"], None);
    assert_eq!(std::fs::read_to_string(shared.join("pre-stop")).unwrap(), "stopping\n");
    server.kubectl(&["delete", "pod", "--all", "--wait=true"], None);
}

#[test]
fn kubectl_run_and_attach_reach_the_containers_stdio() {
    if !tugboat_testkit::isolated("kubectl_run_and_attach_reach_the_containers_stdio") {
        return;
    }
    let Node { server, .. } = node();
    let kubectl = |args: &[&str], stdin: &str| {
        let mut child = Command::new("/usr/bin/kubectl")
            .args(args)
            .env("KUBECONFIG", server.kubeconfig())
            .env("HOME", server.scratch("home"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        child.stdin.take().unwrap().write_all(stdin.as_bytes()).unwrap();
        child.wait_with_output().unwrap()
    };
    // kubectl run -i: stdin reaches the container (stdinOnce), its output comes back, --rm
    // deletes the pod after.
    let out = kubectl(
        &[
            "run",
            "-i",
            "--rm",
            "--restart=Never",
            "echo",
            "--image=busybox:1.35",
            "--",
            "sh",
            "-c",
            "read line; echo got $line; cat",
        ],
        "hello\nmore\n",
    );
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{shown} {}", String::from_utf8_lossy(&out.stderr));
    assert!(shown.contains("got hello\nmore\n"), "{shown}");
    wait(&server, &["get", "pods", "-o", "name"], "echo deleted", |o| !o.contains("pod/echo"));

    // kubectl run -it: a terminal in the container, sized as the client's.
    let script = format!(
        "stty rows 20 cols 90; KUBECONFIG={} HOME={} /usr/bin/kubectl run -it --rm --restart=Never term --image=busybox:1.35 -- sh -c 'sleep 1; tty; stty size; read x; echo got $x'",
        server.kubeconfig().display(),
        server.scratch("home").display()
    );
    let mut child = Command::new("script")
        .args(["-qec", &script, "/dev/null"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    std::thread::spawn(move || {
        use std::io::Write;
        // Typed once the shell waits for it.
        std::thread::sleep(Duration::from_secs(4));
        let _ = stdin.write_all(b"typed\n");
        std::thread::sleep(Duration::from_secs(30));
    });
    let out = child.wait_with_output().unwrap();
    let shown = String::from_utf8_lossy(&out.stdout).replace('\r', "");
    assert!(shown.contains("/dev/pts/0\n20 90\n") && shown.contains("got typed"), "{shown}");

    // kubectl attach (no stdin): the output of a running container as it comes.
    server.kubectl(
        &[
            "run",
            "ticker",
            "--image=busybox:1.35",
            "--",
            "sh",
            "-c",
            "i=0; while true; do i=$((i+1)); echo tick $i; sleep 0.3; done",
        ],
        None,
    );
    server.kubectl(&["wait", "--for=condition=Ready", "pod/ticker", "--timeout=60s"], None);
    // Over websocket (kubectl 1.33) and SPDY (1.27).
    for kubectl in ["/usr/bin/kubectl", "/usr/lib/google-cloud-sdk/bin/kubectl.1.27"] {
        let mut attach = tugboat_testkit::KillOnDrop(
            Command::new(kubectl)
                .args(["attach", "ticker"])
                .env("KUBECONFIG", server.kubeconfig())
                .env("HOME", server.scratch("home"))
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        );
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(attach.0.stdout.take().unwrap()));
        let first = lines.next().unwrap().unwrap();
        let second = lines.next().unwrap().unwrap();
        let n = |line: &str| line.trim_start_matches("tick ").parse::<u32>().unwrap();
        assert!(first.starts_with("tick ") && n(&second) == n(&first) + 1, "{kubectl}: {first} {second}");
    }
    // A container that does not run cannot be attached to.
    let (ok, _, err) = try_kubectl(&server, &["attach", "nope"]);
    assert!(!ok && err.contains("not found"), "{err}");
    server.kubectl(&["delete", "pod", "--all", "--wait=true", "--grace-period=1"], None);
}

/// A kubeconfig for `server` that authenticates with `token` alone.
fn token_kubeconfig(server: &TugboatServer, token: &str) -> PathBuf {
    let path = server.scratch("token-auth").join("kubeconfig");
    let ca = server.data_dir().join("pki/ca.crt");
    let config = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: '{}', certificate-authority: '{}'}}\n\
         users:\n- name: u\n  user: {{token: '{token}'}}\ncontexts:\n- name: x\n  context: {{cluster: c, user: u}}\n\
         current-context: x\n",
        server.url(),
        ca.display()
    );
    std::fs::write(&path, config).unwrap();
    path
}

/// `kubectl auth whoami` as the bearer of `token`: (success, stdout + stderr).
fn whoami(server: &TugboatServer, token: &str) -> (bool, String) {
    let out = Command::new("/usr/bin/kubectl")
        .args(["auth", "whoami", "-o", "jsonpath={.status.userInfo.username}"])
        .env("KUBECONFIG", token_kubeconfig(server, token))
        .env("HOME", server.scratch("home"))
        .output()
        .unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn service_account_tokens_are_mounted_and_volumes_follow_their_sources() {
    if !tugboat_testkit::isolated("service_account_tokens_are_mounted_and_volumes_follow_their_sources") {
        return;
    }
    let Node { server, .. } = node();
    // The default service account comes from the controller; pods wait for it.
    wait(&server, &["get", "serviceaccount", "default", "-o", "name"], "default SA", |o| !o.is_empty());
    let manifest = r#"
apiVersion: v1
kind: ConfigMap
metadata: {name: settings}
data: {mode: one}
---
apiVersion: v1
kind: Pod
metadata: {name: api-user}
spec:
  terminationGracePeriodSeconds: 1
  volumes: [{name: settings, configMap: {name: settings}}]
  containers:
  - name: c
    image: busybox:1.35
    command: [sleep, "3600"]
    volumeMounts: [{name: settings, mountPath: /settings}]
---
apiVersion: v1
kind: Pod
metadata: {name: no-token}
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers: [{name: c, image: busybox:1.35, command: [sleep, "3600"]}]
"#;
    server.kubectl(&["apply", "-f", "-"], Some(manifest));
    server.kubectl(&["wait", "--for=condition=Ready", "pod/api-user", "pod/no-token", "--timeout=60s"], None);
    // ServiceAccount admission: the account and the kube-api-access volume.
    let pod = pod_json(&server, "api-user");
    assert_eq!(pod["spec"]["serviceAccountName"], "default");
    let volume = pod["spec"]["volumes"].as_array().unwrap().iter().find(|v| v["projected"].is_object()).unwrap();
    assert!(volume["name"].as_str().unwrap().starts_with("kube-api-access-"), "{volume}");
    let no_token = pod_json(&server, "no-token");
    assert!(no_token["spec"]["volumes"].is_null(), "{no_token}");
    let dir = "/var/run/secrets/kubernetes.io/serviceaccount";
    let namespace = server.kubectl(&["exec", "api-user", "--", "cat", &format!("{dir}/namespace")], None);
    assert_eq!(namespace, "default");
    let ca = server.kubectl(&["exec", "api-user", "--", "cat", &format!("{dir}/ca.crt")], None);
    assert_eq!(ca.trim(), std::fs::read_to_string(server.data_dir().join("pki/ca.crt")).unwrap().trim());
    let token = server.kubectl(&["exec", "api-user", "--", "cat", &format!("{dir}/token")], None);
    // The pod's token is the pod's service account to the API.
    let (ok, user) = whoami(&server, &token);
    assert!(ok && user == "system:serviceaccount:default:default", "{user}");
    // ...with no rights beyond what RBAC grants it: none to read secrets.
    let out = Command::new("/usr/bin/kubectl")
        .args(["get", "secrets"])
        .env("KUBECONFIG", token_kubeconfig(&server, &token))
        .env("HOME", server.scratch("home"))
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains("forbidden") && said.contains("system:serviceaccount:default:default"),
        "{said}"
    );
    // kubectl create token: a token for an account; a bad expiry is refused with the field.
    server.kubectl(&["create", "serviceaccount", "robot"], None);
    let robot = server.kubectl(&["create", "token", "robot", "--duration=20m"], None);
    assert_eq!(whoami(&server, &robot), (true, "system:serviceaccount:default:robot".to_string()));
    let (ok, _, err) = try_kubectl(&server, &["create", "token", "robot", "--duration=1m"]);
    assert!(!ok && err.contains("spec.expirationSeconds") && err.contains("10 minutes"), "{err}");
    let (ok, _, err) = try_kubectl(&server, &["create", "token", "nobody"]);
    assert!(!ok && err.contains("not found"), "{err}");
    // A pod of an account that does not exist is refused, as upstream's admission does.
    let (ok, _, err) = try_kubectl(
        &server,
        &["run", "ghost", "--image=busybox:1.35", "--overrides", r#"{"spec":{"serviceAccountName":"ghost"}}"#],
    );
    assert!(!ok && err.contains("forbidden") && err.contains("serviceaccount \"ghost\" not found"), "{err}");
    // A forged token and a deleted account's token are refused.
    let (ok, said) = whoami(&server, &format!("{}x", &robot[..robot.len() - 1]));
    assert!(!ok && said.contains("Unauthorized"), "{said}");
    server.kubectl(&["delete", "serviceaccount", "robot"], None);
    let (ok, said) = whoami(&server, &robot);
    assert!(!ok && said.contains("Unauthorized"), "{said}");

    // A configMap change reaches the running container's volume.
    assert_eq!(server.kubectl(&["exec", "api-user", "--", "cat", "/settings/mode"], None), "one");
    server.kubectl(&["patch", "configmap", "settings", "-p", r#"{"data":{"mode":"two"}}"#], None);
    wait(&server, &["exec", "api-user", "--", "cat", "/settings/mode"], "configMap update", |o| o == "two");

    // The token is bound to its pod: once the pod is gone, so is the token's validity.
    server.kubectl(&["delete", "pod", "api-user", "--wait=true"], None);
    let (ok, said) = whoami(&server, &token);
    assert!(!ok && said.contains("Unauthorized"), "{said}");
    server.kubectl(&["delete", "pod", "--all", "--wait=true"], None);
}

#[test]
fn a_restarted_kubelet_adopts_running_containers() {
    if !tugboat_testkit::isolated("a_restarted_kubelet_adopts_running_containers") {
        return;
    }
    // The control plane alone, and `tugboat kubelet` as a process of its own.
    let server = TugboatServer::start(Path::new(TUGBOAT), &[]).expect("the server starts");
    let data = server.scratch("agent");
    let logs = server.scratch("pod-logs");
    let archive = server.scratch("images").join("busybox.tar");
    tugboat_testkit::image::busybox_archive(&archive).unwrap();
    std::fs::create_dir_all(data.join("images")).unwrap();
    std::fs::copy(&archive, data.join("images/busybox.tar")).unwrap();
    // A corrupt archive beside it is skipped (and logged); the node serves on.
    std::fs::write(data.join("images/corrupt.tar"), b"this is not a tar archive at all").unwrap();
    let start_kubelet = || {
        tugboat_testkit::KillOnDrop(
            Command::new(TUGBOAT)
                .arg("kubelet")
                .arg("--kubeconfig")
                .arg(server.kubeconfig())
                .arg("--data-dir")
                .arg(&data)
                .arg("--pod-log-dir")
                .arg(&logs)
                .args(["--node-name", "solo", "--node-ip", "127.0.0.1"])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let mut kubelet = start_kubelet();
    wait(&server, &["get", "node", "solo", "-o", "jsonpath={.spec.podCIDR}"], "pod CIDR", |o| o.contains('/'));
    let manifest = r#"
apiVersion: v1
kind: Pod
metadata: {name: survivor}
spec:
  terminationGracePeriodSeconds: 1
  containers: [{name: c, image: busybox:1.35, command: [sh, -c, "echo ok > /tmp/index.html; exec httpd -f -p 8080 -h /tmp"]}]
"#;
    server.kubectl(&["apply", "-f", "-"], Some(manifest));
    server.kubectl(&["wait", "--for=condition=Ready", "pod/survivor", "--timeout=60s"], None);
    let before = pod_json(&server, "survivor");
    let ip = before["status"]["podIP"].as_str().unwrap().to_string();
    let id = before["status"]["containerStatuses"][0]["containerID"].clone();
    assert!(curl(&format!("http://{ip}:8080/index.html")).is_some());

    // kill -9 the kubelet: the container goes on serving.
    kubelet.0.kill().unwrap();
    kubelet.0.wait().unwrap();
    assert_eq!(curl(&format!("http://{ip}:8080/index.html")).as_deref(), Some("ok\n"));
    // A new kubelet adopts it: same container, no restart, still Ready.
    let _kubelet = start_kubelet();
    std::thread::sleep(Duration::from_secs(3));
    let after = pod_json(&server, "survivor");
    assert_eq!(after["status"]["containerStatuses"][0]["containerID"], id);
    assert_eq!(after["status"]["containerStatuses"][0]["restartCount"], 0);
    assert_eq!(after["status"]["podIP"], ip.as_str());
    assert_eq!(
        server.kubectl(&["get", "pod", "survivor", "-o", "jsonpath={.status.containerStatuses[0].ready}"], None),
        "true"
    );
    assert_eq!(curl(&format!("http://{ip}:8080/index.html")).as_deref(), Some("ok\n"));
    let listed: Vec<_> = std::fs::read_dir(data.join("containers")).unwrap().collect();
    assert_eq!(listed.len(), 1, "no second container: {listed:?}");
    server.kubectl(&["delete", "pod", "survivor"], None);
    assert!(curl(&format!("http://{ip}:8080/index.html")).is_none());
}

#[test]
fn images_are_pulled_from_a_registry_with_back_off_on_failure() {
    if !tugboat_testkit::isolated("images_are_pulled_from_a_registry_with_back_off_on_failure") {
        return;
    }
    let registry = tugboat_testkit::image::Registry::start().expect("docker-registry starts");
    let layer = tugboat_testkit::image::busybox_layer(&[("etc/motd", b"pulled\n", 0o644)]).unwrap();
    registry.push("tools/busybox", "1.35", &layer, &["sh"]).unwrap();
    let logs = tempfile::Builder::new().prefix("tugboat-pod-logs-").tempdir().unwrap();
    let logs_path = logs.path().display().to_string();
    let server = TugboatServer::start_with_agent(
        Path::new(TUGBOAT),
        &[
            "--node-name",
            "box",
            "--node-ip",
            "127.0.0.1",
            "--pod-log-dir",
            &logs_path,
            "--insecure-registry",
            &registry.address,
            // Image GC whenever an image is unused (any disk is fuller than 1%), and logs
            // rotated at 2 KiB.
            "--image-gc-high-threshold",
            "1",
            "--image-gc-low-threshold",
            "0",
            "--image-minimum-gc-age",
            "0s",
            "--container-log-max-size",
            "2Ki",
            "--container-log-max-files",
            "2",
        ],
    )
    .expect("the server starts");
    wait(&server, &["get", "node", "box", "-o", "jsonpath={.spec.podCIDR}"], "pod CIDR", |o| o.contains('/'));
    // An imported image is pinned: never collected.
    tugboat_testkit::image::import_busybox(Path::new(TUGBOAT), &server.data_dir()).unwrap();
    let image = format!("{}/tools/busybox:1.35", registry.address);
    let missing = format!("{}/tools/nothing:1", registry.address);
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: pulled}}\nspec:\n  restartPolicy: Never\n  containers: [{{name: c, image: \"{image}\", command: [cat, /etc/motd]}}]\n---\n\
         apiVersion: v1\nkind: Pod\nmetadata: {{name: missing}}\nspec:\n  containers: [{{name: c, image: \"{missing}\"}}]\n"
    );
    server.kubectl(&["apply", "-f", "-"], Some(&manifest));
    wait(&server, &["get", "pod", "pulled", "-o", "jsonpath={.status.phase}"], "pulled runs", |o| o == "Succeeded");
    assert_eq!(server.kubectl(&["logs", "pulled"], None), "pulled\n");
    let pulled = pod_json(&server, "pulled");
    assert!(pulled["status"]["containerStatuses"][0]["imageID"].as_str().unwrap().starts_with("sha256:"));
    let events = server.kubectl(
        &["get", "events", "--field-selector", "involvedObject.name=pulled", "-o", "jsonpath={.items[*].message}"],
        None,
    );
    assert!(
        events.contains(&format!("Pulling image \"{image}\"")) && events.contains("Successfully pulled image"),
        "{events}"
    );
    // A missing image: ErrImagePull with the registry's answer, then ImagePullBackOff.
    let first = wait(
        &server,
        &["get", "pod", "missing", "-o", "jsonpath={.status.containerStatuses[0].state.waiting.reason}"],
        "pull fails",
        |o| o == "ErrImagePull" || o == "ImagePullBackOff",
    );
    assert!(first == "ErrImagePull" || first == "ImagePullBackOff");
    wait(&server, &["get", "pod", "missing"], "back-off shown", |o| o.contains("ImagePullBackOff"));
    let events = server.kubectl(
        &["get", "events", "--field-selector", "involvedObject.name=missing", "-o", "jsonpath={.items[*].reason}"],
        None,
    );
    assert!(events.contains("Failed") && events.contains("BackOff"), "{events}");
    // The image is in the node's store now: `tugboat images list` shows it.
    let images = || {
        let out = Command::new(TUGBOAT).args(["images", "list", "--data-dir"]).arg(server.data_dir()).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert!(images().contains(&image), "{}", images());

    // Logs rotate at their size: two files at most, the newest lines kept and shown.
    let chatty = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: chatty}}\nspec:\n  terminationGracePeriodSeconds: 1\n  containers: [{{name: c, image: \"{image}\", command: [sh, -c, \"i=0; while [ $i -lt 300 ]; do echo line $i; i=$((i+1)); done; exec sleep 3600\"]}}]\n"
    );
    server.kubectl(&["apply", "-f", "-"], Some(&chatty));
    wait(&server, &["logs", "chatty", "--tail=1"], "chatty logs", |o| o == "line 299");
    let uid = pod_json(&server, "chatty")["metadata"]["uid"].as_str().unwrap().to_string();
    let dir = logs.path().join(format!("default_chatty_{uid}/c"));
    let files: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    assert!(files.len() == 2 && files.contains(&"0.log".to_string()), "{files:?}");
    let shown = server.kubectl(&["logs", "chatty"], None);
    assert!(!shown.starts_with("line 0\n") && shown.ends_with("line 299\n"), "{shown}");

    // Unused pulled images are collected once no container uses them; the pinned one stays.
    server.kubectl(&["delete", "pod", "--all", "--grace-period=1", "--wait=true"], None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while images().contains(&image) {
        assert!(Instant::now() < deadline, "the unused image stays: {}", images());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(images().contains("busybox:1.35"), "{}", images());
}

/// `kubectl autoscale`: a Deployment whose pod burns twice its CPU request is scaled up to the
/// autoscaler's maximum; with a target far above the usage (and no stabilization window) it
/// comes back down to one; `kubectl get hpa` shows the utilization against the target.
#[test]
fn the_autoscaler_scales_a_deployment_by_its_cpu() {
    if !tugboat_testkit::isolated("the_autoscaler_scales_a_deployment_by_its_cpu") {
        return;
    }
    let Node { server, .. } = node();
    let deployment = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: burn}
spec:
  replicas: 1
  selector: {matchLabels: {app: burn}}
  template:
    metadata: {labels: {app: burn}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
      - name: burn
        image: busybox:1.35
        command: [sh, -c, "while true; do :; done"]
        resources: {requests: {cpu: 100m}, limits: {cpu: 200m}}
"#;
    server.kubectl(&["apply", "-f", "-"], Some(deployment));
    server.kubectl(&["autoscale", "deployment", "burn", "--min=1", "--max=3", "--cpu-percent=50"], None);
    let until = |args: &[&str], what: &str, done: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(150);
        loop {
            let (ok, out, _) = try_kubectl(&server, args);
            if ok && done(out.trim()) {
                return out;
            }
            assert!(Instant::now() < deadline, "{what}: {out}\n{}", server.kubectl(&["describe", "hpa", "burn"], None));
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    until(&["get", "deployment", "burn", "-o", "jsonpath={.spec.replicas}"], "scaled up to the maximum", &|o| o == "3");
    let hpa = until(&["get", "hpa", "burn", "--no-headers"], "the HPA's status", &|o| o.contains("Deployment/burn"));
    let fields: Vec<&str> = hpa.split_whitespace().collect();
    assert!(hpa.contains("cpu: ") && hpa.contains("%/50%"), "{hpa}");
    assert_eq!(&fields[fields.len() - 4..fields.len() - 1], ["1", "3", "3"], "MINPODS MAXPODS REPLICAS: {hpa}");
    let reason = server.kubectl(
        &["get", "hpa", "burn", "-o", "jsonpath={.status.conditions[?(@.type==\"ScalingActive\")].reason}"],
        None,
    );
    assert_eq!(reason, "ValidMetricFound");
    let described = server.kubectl(&["describe", "hpa", "burn"], None);
    assert!(described.contains("SuccessfulRescale") && described.contains("New size: 3"), "{described}");

    // The usage is far below a 1000% target: down to the minimum, at once without a window.
    let patch = r#"[{"op": "replace", "path": "/spec/metrics/0/resource/target/averageUtilization", "value": 1000},
                   {"op": "add", "path": "/spec/behavior", "value": {"scaleDown": {"stabilizationWindowSeconds": 0}}}]"#;
    server.kubectl(&["patch", "hpa", "burn", "--type=json", "-p", patch], None);
    until(&["get", "deployment", "burn", "-o", "jsonpath={.spec.replicas}"], "scaled down", &|o| o == "1");
}

/// PersistentVolumes as kubectl users meet them: a hostPath volume and a claim of its class are
/// bound and the pod writes into the host directory; a claim without a class gets the default
/// `local-path` class, waits for its first pod, then gets a volume on that pod's node whose
/// data outlives the pod; deleting the claim deletes its volume.
#[test]
fn claims_bind_to_volumes_and_local_path_provisions_them() {
    if !tugboat_testkit::isolated("claims_bind_to_volumes_and_local_path_provisions_them") {
        return;
    }
    let Node { server, .. } = node();
    let classes = server.kubectl(&["get", "storageclass"], None);
    assert!(classes.contains("local-path (default)") && classes.contains("tugboat.dev/local-path"), "{classes}");
    assert!(classes.contains("WaitForFirstConsumer"), "{classes}");
    let host_dir = server.scratch("hostpath-volume");
    let manual = format!(
        r#"
apiVersion: v1
kind: PersistentVolume
metadata: {{name: manual-pv}}
spec:
  capacity: {{storage: 1Gi}}
  accessModes: [ReadWriteOnce]
  storageClassName: manual
  hostPath: {{path: {dir}}}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {{name: manual}}
spec:
  storageClassName: manual
  accessModes: [ReadWriteOnce]
  resources: {{requests: {{storage: 500Mi}}}}
---
apiVersion: v1
kind: Pod
metadata: {{name: writer}}
spec:
  terminationGracePeriodSeconds: 1
  volumes: [{{name: data, persistentVolumeClaim: {{claimName: manual}}}}]
  containers:
  - {{name: c, image: "busybox:1.35", command: [sh, -c, "echo hello > /data/greeting; sleep 3600"],
     volumeMounts: [{{name: data, mountPath: /data}}]}}
"#,
        dir = host_dir.display()
    );
    server.kubectl(&["apply", "-f", "-"], Some(&manual));
    wait(&server, &["get", "pvc", "manual", "-o", "jsonpath={.status.phase} {.spec.volumeName}"], "bound", |o| {
        o == "Bound manual-pv"
    });
    wait(&server, &["get", "pv", "manual-pv", "-o", "jsonpath={.status.phase}"], "pv bound", |o| o == "Bound");
    wait(&server, &["get", "pod", "writer", "-o", "jsonpath={.status.phase}"], "writer runs", |o| o == "Running");
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::fs::read_to_string(host_dir.join("greeting")).ok().as_deref() != Some("hello\n") {
        assert!(Instant::now() < deadline, "the pod's write is not in the host directory");
        std::thread::sleep(Duration::from_millis(200));
    }

    // The default class: provisioned for the first pod, on its node.
    let claim = r#"
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: auto}
spec:
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
"#;
    server.kubectl(&["apply", "-f", "-"], Some(claim));
    assert_eq!(server.kubectl(&["get", "pvc", "auto", "-o", "jsonpath={.spec.storageClassName}"], None), "local-path");
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        server.kubectl(&["get", "pvc", "auto", "-o", "jsonpath={.status.phase}"], None),
        "Pending",
        "no pod yet"
    );
    wait(&server, &["describe", "pvc", "auto"], "the claim says it waits", |o| {
        o.contains("WaitForFirstConsumer") && o.contains("waiting for first consumer to be created before binding")
    });
    let pod = |name: &str, script: &str| {
        format!(
            r#"
apiVersion: v1
kind: Pod
metadata: {{name: {name}}}
spec:
  terminationGracePeriodSeconds: 1
  volumes: [{{name: data, persistentVolumeClaim: {{claimName: auto}}}}]
  containers:
  - {{name: c, image: "busybox:1.35", command: [sh, -c, "{script}"], volumeMounts: [{{name: data, mountPath: /data}}]}}
"#
        )
    };
    server.kubectl(&["apply", "-f", "-"], Some(&pod("keeper", "echo kept > /data/note; sleep 3600")));
    let volume = wait(
        &server,
        &["get", "pvc", "auto", "-o", "jsonpath={.status.phase} {.spec.volumeName}"],
        "auto bound",
        |o| o.starts_with("Bound pvc-"),
    );
    let volume = volume.split_whitespace().nth(1).unwrap().to_string();
    let affinity = server.kubectl(
        &["get", "pv", &volume, "-o", "jsonpath={.spec.nodeAffinity.required.nodeSelectorTerms[0].matchExpressions[0].values[0]} {.spec.persistentVolumeReclaimPolicy}"],
        None,
    );
    assert_eq!(affinity, "box Delete");
    wait(&server, &["exec", "keeper", "--", "cat", "/data/note"], "keeper wrote", |o| o == "kept");
    let described = server.kubectl(&["describe", "pvc", "auto"], None);
    assert!(described.contains("ProvisioningSucceeded") && described.contains(&volume), "{described}");
    server.kubectl(&["delete", "pod", "keeper", "--wait=true"], None);
    server.kubectl(&["apply", "-f", "-"], Some(&pod("reader", "sleep 3600")));
    wait(&server, &["exec", "reader", "--", "cat", "/data/note"], "the data outlives its pod", |o| o == "kept");
    server.kubectl(&["delete", "pod", "reader", "--wait=true"], None);
    server.kubectl(&["delete", "pvc", "auto"], None);
    wait(&server, &["get", "pv", "-o", "name"], "the volume goes with its claim", |o| !o.contains(&volume));
}

/// A container's environment: the Services' variables (the namespace's and the API server's),
/// then what envFrom and env give, `$(VAR)` expanded over all of them.
#[test]
fn containers_get_the_variables_of_services_secrets_and_config_maps() {
    if !tugboat_testkit::isolated("containers_get_the_variables_of_services_secrets_and_config_maps") {
        return;
    }
    let Node { server, logs: _logs, _logs_dir } = node();
    server.kubectl(&["create", "secret", "generic", "s", "--from-literal=data-1=value-1"], None);
    server.kubectl(&["create", "configmap", "c", "--from-literal=k=v"], None);
    server.kubectl(&["create", "service", "clusterip", "web-svc", "--tcp=80:8080"], None);
    let manifest = r#"
apiVersion: v1
kind: Pod
metadata: {name: env}
spec:
  restartPolicy: Never
  containers:
  - name: c
    image: busybox:1.35
    # Not through sh: busybox 1.35's ash drops variables whose names are not identifiers.
    command: [env]
    envFrom:
    - secretRef: {name: s}
    - {prefix: p-, secretRef: {name: s}}
    - configMapRef: {name: c}
    resources: {requests: {memory: 32Mi}}
    env:
    - {name: WHERE, value: "$(WEB_SVC_SERVICE_HOST):$(WEB_SVC_SERVICE_PORT)"}
    - {name: CPU_LIMIT, valueFrom: {resourceFieldRef: {resource: limits.cpu}}}
    - {name: MEMORY_REQUEST, valueFrom: {resourceFieldRef: {resource: requests.memory, divisor: 1Mi}}}
"#;
    server.kubectl(&["apply", "-f", "-"], Some(manifest));
    wait(&server, &["get", "pod", "env", "-o", "jsonpath={.status.phase}"], "the pod done", |p| p == "Succeeded");
    let env = server.kubectl(&["logs", "env"], None);
    let ip = server.kubectl(&["get", "service", "web-svc", "-o", "jsonpath={.spec.clusterIP}"], None);
    let api = server.kubectl(&["get", "service", "kubernetes", "-o", "jsonpath={.spec.clusterIP}"], None);
    for expected in [
        "data-1=value-1".to_string(),
        "p-data-1=value-1".into(),
        "k=v".into(),
        format!("WEB_SVC_SERVICE_HOST={ip}"),
        "WEB_SVC_SERVICE_PORT=80".into(),
        "WEB_SVC_SERVICE_PORT_80_8080=80".into(),
        format!("WEB_SVC_PORT=tcp://{ip}:80"),
        format!("WEB_SVC_PORT_80_TCP_ADDR={ip}"),
        format!("WHERE={ip}:80"),
        format!("KUBERNETES_SERVICE_HOST={api}"),
        "KUBERNETES_SERVICE_PORT=443".into(),
        "MEMORY_REQUEST=32".into(),
    ] {
        assert!(env.lines().any(|l| l == expected), "{expected} in:\n{env}");
    }
    // subPathExpr: expanded with the container's variables; one leading out is refused.
    let subpath = |name: &str, dir: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  restartPolicy: Never\n  \
             volumes: [{{name: work, emptyDir: {{}}}}]\n  containers:\n  - name: c\n    image: busybox:1.35\n    \
             command: [sh, -c, \"test -d /all/$DIR && echo made\"]\n    env: [{{name: DIR, value: \"{dir}\"}}]\n    \
             volumeMounts: [{{name: work, mountPath: /sub, subPathExpr: $(DIR)}}, {{name: work, mountPath: /all}}]\n"
        )
    };
    server.kubectl(&["apply", "-f", "-"], Some(&subpath("expands", "logs-1")));
    wait(&server, &["get", "pod", "expands", "-o", "jsonpath={.status.phase}"], "the pod done", |p| p == "Succeeded");
    assert_eq!(server.kubectl(&["logs", "expands"], None), "made\n");
    server.kubectl(&["apply", "-f", "-"], Some(&subpath("escapes", "..")));
    wait(
        &server,
        &["get", "pod", "escapes", "-o", "jsonpath={.status.containerStatuses[0].state.waiting.reason}"],
        "the container refused",
        |r| r == "CreateContainerConfigError",
    );
    // No CPU limit: the node's allocatable CPUs.
    let cpus = server.kubectl(&["get", "node", "box", "-o", "jsonpath={.status.allocatable.cpu}"], None);
    assert!(env.lines().any(|l| l == format!("CPU_LIMIT={cpus}")), "CPU_LIMIT={cpus} in:\n{env}");
}

/// `kubectl debug` adds an ephemeral container to a running pod: it runs in the pod (its
/// logs, exec), is reported in `ephemeralContainerStatuses`, and may not be changed after.
#[test]
fn kubectl_debug_runs_an_ephemeral_container_in_the_pod() {
    if !tugboat_testkit::isolated("kubectl_debug_runs_an_ephemeral_container_in_the_pod") {
        return;
    }
    let Node { server, logs: _logs, _logs_dir } = node();
    server.kubectl(&["run", "target", "--image=busybox:1.35", "--", "sleep", "3600"], None);
    wait(&server, &["get", "pod", "target", "-o", "jsonpath={.status.phase}"], "the pod running", |p| p == "Running");
    server.kubectl(
        &["debug", "target", "--image=busybox:1.35", "--container=dbg", "--", "sh", "-c", "echo polo; sleep 3600"],
        None,
    );
    wait(
        &server,
        &["get", "pod", "target", "-o", "jsonpath={.status.ephemeralContainerStatuses[0].state.running.startedAt}"],
        "the ephemeral container running",
        |s| !s.is_empty(),
    );
    wait(&server, &["logs", "target", "-c", "dbg"], "its log", |l| l == "polo");
    assert_eq!(server.kubectl(&["exec", "target", "-c", "dbg", "--", "echo", "marco"], None), "marco\n");
    // The same network as the pod's own container: one hostname, one address.
    assert_eq!(
        server.kubectl(&["exec", "target", "-c", "dbg", "--", "hostname"], None),
        server.kubectl(&["exec", "target", "--", "hostname"], None)
    );
    let (ok, _, said) = try_kubectl(
        &server,
        &[
            "patch",
            "pod",
            "target",
            "--subresource=ephemeralcontainers",
            "--type=json",
            "-p",
            r#"[{"op":"remove","path":"/spec/ephemeralContainers/0"}]"#,
        ],
    );
    assert!(!ok && said.contains("existing ephemeral containers may not be removed"), "{said}");
}

/// Termination messages: what a container writes to its terminationMessagePath (as any user,
/// at any path), else with FallbackToLogsOnError the end of its log when it failed.
#[test]
fn ended_containers_report_their_termination_messages() {
    if !tugboat_testkit::isolated("ended_containers_report_their_termination_messages") {
        return;
    }
    let Node { server, logs: _logs, _logs_dir } = node();
    let manifest = r#"
apiVersion: v1
kind: Pod
metadata: {name: ends}
spec:
  restartPolicy: Never
  containers:
  - {name: writes, image: busybox:1.35, command: [sh, -c, "printf DONE > /dev/termination-log"]}
  - name: elsewhere
    image: busybox:1.35
    command: [sh, -c, "printf 'as 1000' > /dev/custom-log"]
    terminationMessagePath: /dev/custom-log
    securityContext: {runAsUser: 1000}
  - name: fails
    image: busybox:1.35
    command: [sh, -c, "echo last words; exit 2"]
    terminationMessagePolicy: FallbackToLogsOnError
  - name: quiet
    image: busybox:1.35
    command: [sh, -c, "echo not a message"]
    terminationMessagePolicy: FallbackToLogsOnError
  - name: unfinished
    image: busybox:1.35
    command: [sh, -c, "printf DONE; exit 1"]
    terminationMessagePolicy: FallbackToLogsOnError
"#;
    server.kubectl(&["apply", "-f", "-"], Some(manifest));
    wait(&server, &["get", "pod", "ends", "-o", "jsonpath={.status.phase}"], "the pod ended", |p| p == "Failed");
    let message = |name: &str| {
        let path = format!("jsonpath={{.status.containerStatuses[?(@.name==\"{name}\")].state.terminated.message}}");
        server.kubectl(&["get", "pod", "ends", "-o", &path], None)
    };
    assert_eq!(message("writes"), "DONE");
    assert_eq!(message("elsewhere"), "as 1000");
    assert_eq!(message("fails"), "last words\n");
    assert_eq!(message("quiet"), "", "a success falls back to nothing");
    // A last line without its newline is logged as it was written (a partial record).
    assert_eq!(message("unfinished"), "DONE");
    assert_eq!(server.kubectl(&["logs", "ends", "-c", "unfinished"], None), "DONE");
}

/// A pod's safe sysctls are set in its namespaces; an unsafe one keeps its containers from
/// starting.
#[test]
fn pods_set_their_safe_sysctls() {
    if !tugboat_testkit::isolated("pods_set_their_safe_sysctls") {
        return;
    }
    let Node { server, logs: _logs, _logs_dir } = node();
    let pod = |name: &str, sysctl: &str, value: &str, read: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  restartPolicy: Never\n  \
             securityContext: {{sysctls: [{{name: {sysctl}, value: \"{value}\"}}]}}\n  containers:\n  \
             - {{name: c, image: busybox:1.35, command: [sysctl, {read}]}}\n"
        )
    };
    server.kubectl(&["apply", "-f", "-"], Some(&pod("safe", "kernel.shm_rmid_forced", "1", "kernel.shm_rmid_forced")));
    wait(&server, &["get", "pod", "safe", "-o", "jsonpath={.status.phase}"], "the pod done", |p| p == "Succeeded");
    assert_eq!(server.kubectl(&["logs", "safe"], None), "kernel.shm_rmid_forced = 1\n");
    server.kubectl(&["apply", "-f", "-"], Some(&pod("unsafe", "kernel.msgmax", "10000000000", "kernel.msgmax")));
    let waiting = wait(
        &server,
        &["get", "pod", "unsafe", "-o", "jsonpath={.status.containerStatuses[0].state.waiting.message}"],
        "the pod refused",
        |m| m.contains("forbidden sysctl"),
    );
    assert!(waiting.contains("kernel.msgmax"), "{waiting}");
}

/// A partitioned rolling update of a StatefulSet: the pods at or above the partition take the
/// new template, the ones below keep the current revision even when recreated (from its
/// ControllerRevision); with the partition gone every pod is updated and the revisions agree.
#[test]
fn stateful_sets_keep_the_current_revision_below_the_partition() {
    if !tugboat_testkit::isolated("stateful_sets_keep_the_current_revision_below_the_partition") {
        return;
    }
    let Node { server, logs: _logs, _logs_dir } = node();
    let set = |version: &str, partition: i32| {
        format!(
            "apiVersion: apps/v1\nkind: StatefulSet\nmetadata: {{name: web}}\nspec:\n  replicas: 3\n  serviceName: web\n  \
             selector: {{matchLabels: {{app: web}}}}\n  updateStrategy: {{rollingUpdate: {{partition: {partition}}}}}\n  \
             template:\n    metadata: {{labels: {{app: web}}}}\n    spec:\n      terminationGracePeriodSeconds: 1\n      \
             containers: [{{name: c, image: busybox:1.35, command: [sleep, \"3600\"], env: [{{name: V, value: \"{version}\"}}]}}]\n"
        )
    };
    let versions = || {
        server.kubectl(
            &[
                "get",
                "pods",
                "-l",
                "app=web",
                "-o",
                "jsonpath={range .items[*]}{.metadata.name}={.spec.containers[0].env[0].value} {end}",
            ],
            None,
        )
    };
    server.kubectl(&["apply", "-f", "-"], Some(&set("one", 2)));
    wait(&server, &["get", "statefulset", "web", "-o", "jsonpath={.status.readyReplicas}"], "3 ready", |r| r == "3");
    server.kubectl(&["apply", "-f", "-"], Some(&set("two", 2)));
    wait(&server, &["get", "pods", "-l", "app=web"], "web-2 updated", |_| {
        versions().trim() == "web-0=one web-1=one web-2=two"
    });
    let revisions = server.kubectl(
        &["get", "statefulset", "web", "-o", "jsonpath={.status.currentRevision} {.status.updateRevision}"],
        None,
    );
    let (current, update) = revisions.split_once(' ').unwrap();
    assert_ne!(current, update, "{revisions}");
    let listed = server.kubectl(&["get", "controllerrevisions", "-o", "name"], None);
    assert!(listed.contains(&format!("web-{current}")) && listed.contains(&format!("web-{update}")), "{listed}");
    // Recreated below the partition: the current revision, not the template.
    server.kubectl(&["delete", "pod", "web-0"], None);
    wait(&server, &["get", "pods", "-l", "app=web"], "web-0 back", |_| {
        versions().trim() == "web-0=one web-1=one web-2=two"
    });
    let label =
        server.kubectl(&["get", "pod", "web-0", "-o", "jsonpath={.metadata.labels.controller-revision-hash}"], None);
    assert_eq!(label, current);
    server.kubectl(
        &["patch", "statefulset", "web", "-p", r#"{"spec":{"updateStrategy":{"rollingUpdate":{"partition":0}}}}"#],
        None,
    );
    wait(&server, &["get", "pods", "-l", "app=web"], "all updated", |_| {
        versions().trim() == "web-0=two web-1=two web-2=two"
    });
    wait(
        &server,
        &["get", "statefulset", "web", "-o", "jsonpath={.status.currentRevision}"],
        "the revisions agree",
        |r| r == update,
    );
}

/// An Indexed Job runs one pod per completion index, each told its index (annotation, label,
/// JOB_COMPLETION_INDEX) and named `<job>-<index>`; it completes when every index has.
#[test]
fn indexed_jobs_complete_every_index() {
    if !tugboat_testkit::isolated("indexed_jobs_complete_every_index") {
        return;
    }
    let Node { server, logs: _logs, _logs_dir } = node();
    let job = r#"
apiVersion: batch/v1
kind: Job
metadata: {name: idx}
spec:
  completions: 3
  parallelism: 2
  completionMode: Indexed
  template:
    spec:
      restartPolicy: Never
      containers: [{name: c, image: busybox:1.35, command: [sh, -c, 'echo "$JOB_COMPLETION_INDEX $(hostname)"']}]
"#;
    server.kubectl(&["apply", "-f", "-"], Some(job));
    wait(&server, &["get", "job", "idx", "-o", "jsonpath={.status.completedIndexes}"], "every index done", |c| {
        c == "0-2"
    });
    wait(
        &server,
        &["get", "job", "idx", "-o", "jsonpath={.status.conditions[?(@.type==\"Complete\")].status}"],
        "the job complete",
        |c| c == "True",
    );
    for index in 0..3 {
        let selector = format!("batch.kubernetes.io/job-completion-index={index}");
        let name = server.kubectl(&["get", "pods", "-l", &selector, "-o", "jsonpath={.items[0].metadata.name}"], None);
        assert_eq!(server.kubectl(&["logs", &name], None), format!("{index} idx-{index}\n"));
    }
}

/// A privileged container gets every capability the node may hand on (this machine's own
/// bounding set lacks CAP_SYS_RESOURCE: asking for it failed every privileged container).
#[test]
fn privileged_containers_run() {
    if !tugboat_testkit::isolated("privileged_containers_run") {
        return;
    }
    let Node { server, .. } = node();
    let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: root}\nspec:\n  restartPolicy: Never\n  containers:\n  - name: c\n    image: busybox:1.35\n    command: [/bin/sh, -c, 'echo ok; ls /dev | grep -c . >/dev/null']\n    securityContext: {privileged: true}\n";
    server.kubectl(&["apply", "-f", "-"], Some(pod));
    let phase = wait(
        &server,
        &["get", "pod", "root", "-o", "jsonpath={.status.phase}{.status.containerStatuses[0].state.waiting.reason}"],
        "the privileged pod ends",
        |o| o == "Succeeded" || o == "Failed" || o.contains("Error"),
    );
    let described = server.kubectl(&["describe", "pod", "root"], None);
    assert_eq!(phase, "Succeeded", "{described}");
    assert_eq!(server.kubectl(&["logs", "root"], None), "ok\n");
}
