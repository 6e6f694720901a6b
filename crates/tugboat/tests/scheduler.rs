//! The scheduler against a real server, driven with the real kubectl: pods spread over nodes,
//! filters keep pods off nodes that do not fit, an unschedulable pod says why (condition and
//! event) and is placed as soon as a node that fits appears; `tugboat scheduler` runs alone;
//! hollow nodes register, heartbeat and "run" the pods the scheduler gives them.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tugboat_testkit::{KillOnDrop, TugboatServer};

fn add_node(server: &TugboatServer, name: &str, cpu: &str, extra_spec: &str) {
    let manifest = format!(
        "apiVersion: v1\nkind: Node\nmetadata: {{name: {name}, labels: {{kubernetes.io/hostname: {name}}}}}\nspec: {{{extra_spec}}}\nstatus:\n  allocatable: {{cpu: \"{cpu}\", memory: 8Gi, pods: \"110\"}}\n"
    );
    server.kubectl(&["apply", "-f", "-"], Some(&manifest));
}

fn add_pod(server: &TugboatServer, name: &str, cpu: &str, extra_spec: &str) {
    let manifest = format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: web}}}}\nspec:\n  {extra_spec}\n  containers:\n  - name: main\n    image: busybox\n    resources: {{requests: {{cpu: \"{cpu}\"}}}}\n"
    );
    server.kubectl(&["apply", "-f", "-"], Some(&manifest));
}

fn node_of(server: &TugboatServer, pod: &str) -> String {
    server.kubectl(&["get", "pod", pod, "-o", "jsonpath={.spec.nodeName}"], None)
}

/// Waits until `pod` is bound; returns its node.
fn wait_bound(server: &TugboatServer, pod: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let node = node_of(server, pod);
        if !node.is_empty() {
            return node;
        }
        assert!(Instant::now() < deadline, "{pod} was never scheduled");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn pods_spread_fit_and_wait_for_a_node_that_fits() {
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).unwrap();
    add_node(&server, "node-1", "2", "");
    add_node(&server, "node-2", "2", "");
    add_node(&server, "tainted", "8", "taints: [{key: dedicated, value: db, effect: NoSchedule}]");

    for i in 0..6 {
        add_pod(&server, &format!("web-{i}"), "100m", "");
    }
    let mut per_node = std::collections::BTreeMap::new();
    for i in 0..6 {
        *per_node.entry(wait_bound(&server, &format!("web-{i}"))).or_insert(0) += 1;
    }
    assert_eq!(per_node.into_iter().collect::<Vec<_>>(), [("node-1".to_string(), 3), ("node-2".to_string(), 3)]);
    let described = server.kubectl(&["describe", "pod", "web-0"], None);
    assert!(
        described.contains("Scheduled") && described.contains("Successfully assigned default/web-0"),
        "{described}"
    );
    let condition = server.kubectl(
        &["get", "pod", "web-0", "-o", "jsonpath={.status.conditions[0].type}={.status.conditions[0].status}"],
        None,
    );
    assert_eq!(condition, "PodScheduled=True");

    // Tolerating the taint opens the tainted node.
    add_pod(&server, "db", "4", "tolerations: [{key: dedicated, operator: Equal, value: db, effect: NoSchedule}]");
    assert_eq!(wait_bound(&server, "db"), "tainted");

    // Too big for anything: it says why, and waits.
    add_pod(&server, "huge", "6", "");
    let deadline = Instant::now() + Duration::from_secs(20);
    let message = loop {
        let message = server.kubectl(
            &["get", "pod", "huge", "-o", "jsonpath={.status.conditions[?(@.type==\"PodScheduled\")].message}"],
            None,
        );
        if !message.is_empty() {
            break message;
        }
        assert!(Instant::now() < deadline, "huge was never marked unschedulable");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(
        message,
        "0/3 nodes are available: 1 node(s) had untolerated taint {dedicated: db}, 2 Insufficient cpu."
    );
    let events = server.kubectl(&["get", "events", "--field-selector", "involvedObject.name=huge"], None);
    assert!(events.contains("FailedScheduling"), "{events}");
    assert_eq!(node_of(&server, "huge"), "");

    // A cordoned node takes nothing new; a new node that fits takes the waiting pod.
    server.kubectl(&["cordon", "node-1"], None);
    add_pod(&server, "after-cordon", "100m", "");
    assert_eq!(wait_bound(&server, "after-cordon"), "node-2");
    add_node(&server, "big", "16", "");
    assert_eq!(wait_bound(&server, "huge"), "big");
}

#[test]
fn the_scheduler_runs_alone_against_a_kubeconfig() {
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &["--disable-scheduler"]).unwrap();
    add_node(&server, "solo", "2", "");
    add_pod(&server, "waiting", "100m", "");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(node_of(&server, "waiting"), "", "no scheduler in the server");
    let _scheduler = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_tugboat"))
            .args(["scheduler", "--kubeconfig"])
            .arg(server.kubeconfig())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert_eq!(wait_bound(&server, "waiting"), "solo");
}

#[test]
fn hollow_nodes_register_heartbeat_and_run_their_pods() {
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).unwrap();
    let _hollow = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_tugboat"))
            .args([
                "hollow-nodes",
                "--count",
                "3",
                "--name-prefix",
                "h",
                "--lease-renew-interval",
                "1s",
                "--kubeconfig",
            ])
            .arg(server.kubeconfig())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let ready = server.kubectl(
            &["get", "nodes", "-o", "jsonpath={.items[*].status.conditions[?(@.type==\"Ready\")].status}"],
            None,
        );
        if ready == "True True True" {
            break;
        }
        assert!(Instant::now() < deadline, "the hollow nodes never became Ready: {ready:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let nodes = server.kubectl(&["get", "nodes", "-o", "wide"], None);
    assert!(
        nodes.contains("h-0") && nodes.contains("v1.33.0-tugboat-hollow") && nodes.contains("10.250.0.1"),
        "{nodes}"
    );

    // Heartbeats: each node's Lease is renewed.
    let renewed =
        || server.kubectl(&["-n", "kube-node-lease", "get", "lease", "h-1", "-o", "jsonpath={.spec.renewTime}"], None);
    let first = renewed();
    assert!(!first.is_empty());
    let deadline = Instant::now() + Duration::from_secs(10);
    while renewed() == first {
        assert!(Instant::now() < deadline, "the lease of h-1 was never renewed");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Pods the scheduler places run, with an IP of their node's range; deleted ones go.
    for i in 0..6 {
        add_pod(&server, &format!("run-{i}"), "100m", "");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let phases = server.kubectl(&["get", "pods", "-o", "jsonpath={.items[*].status.phase}"], None);
        if phases.split_whitespace().filter(|p| *p == "Running").count() == 6 {
            break;
        }
        assert!(Instant::now() < deadline, "the pods never ran: {phases}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let pods = server.kubectl(&["get", "pods", "-o", "wide"], None);
    assert!(
        pods.lines().skip(1).all(|l| l.contains("1/1") && l.contains("Running") && l.contains(" 10.128.")),
        "{pods}"
    );
    let ips = server.kubectl(&["get", "pods", "-o", "jsonpath={.items[*].status.podIP}"], None);
    let unique: std::collections::BTreeSet<&str> = ips.split_whitespace().collect();
    assert_eq!(unique.len(), 6, "one address per pod: {ips}");
    // A bound pod's deletion waits for its node to finish it: the hollow node does at once.
    let deleted = server.kubectl(&["delete", "pod", "run-0", "--timeout=20s"], None);
    assert!(deleted.contains("deleted"), "{deleted}");
    let left = server.kubectl(&["get", "pods", "-o", "name"], None);
    assert!(!left.contains("run-0"), "{left}");
}

#[test]
fn priority_classes_give_priority_and_urgent_pods_preempt() {
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).unwrap();
    let _node = KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_tugboat"))
            .args(["hollow-nodes", "--count", "1", "--name-prefix", "small", "--cpu", "2", "--kubeconfig"])
            .arg(server.kubeconfig())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let classes = server.kubectl(&["get", "priorityclasses"], None);
    assert!(classes.contains("system-node-critical") && classes.contains("2000001000"), "{classes}");
    let high = "apiVersion: scheduling.k8s.io/v1\nkind: PriorityClass\nmetadata: {name: high}\nvalue: 1000\n";
    server.kubectl(&["apply", "-f", "-"], Some(high));
    // A class's value is fixed once made (its description is not).
    let refused = server.kubectl_fails(&["patch", "priorityclass", "high", "-p", r#"{"value": 5}"#], None);
    assert!(refused.contains("value: Forbidden: may not be changed in an update."), "{refused}");
    server.kubectl(&["patch", "priorityclass", "high", "-p", r#"{"description": "urgent work"}"#], None);
    // Two fillers take the node's two cores (the hollow node must be there first).
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.kubectl(&["get", "nodes", "-o", "name"], None).trim() != "node/small-0" {
        assert!(Instant::now() < deadline, "the hollow node never registered");
        std::thread::sleep(Duration::from_millis(100));
    }
    for name in ["filler-0", "filler-1"] {
        add_pod(&server, name, "900m", "");
        wait_bound(&server, name);
    }
    // A disruption budget protects filler-0: preemption takes the other.
    server.kubectl(&["label", "pod", "filler-0", "keep=yes"], None);
    server.kubectl(&["create", "pdb", "keep", "--selector=keep=yes", "--min-available=1"], None);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let status = server.kubectl(
            &["get", "pdb", "keep", "-o", "jsonpath={.status.currentHealthy} {.status.disruptionsAllowed}"],
            None,
        );
        if status == "1 0" {
            break;
        }
        assert!(Instant::now() < deadline, "the budget's status: {status:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    add_pod(&server, "urgent", "900m", "priorityClassName: high");
    let spec =
        server.kubectl(&["get", "pod", "urgent", "-o", "jsonpath={.spec.priority} {.spec.preemptionPolicy}"], None);
    assert_eq!(spec, "1000 PreemptLowerPriority");
    assert_eq!(wait_bound(&server, "urgent"), "small-0");
    let left = server.kubectl(&["get", "pods", "-o", "name"], None);
    assert_eq!(left.lines().filter(|l| l.contains("filler")).count(), 1, "one filler made room: {left}");
    assert!(left.contains("pod/filler-0"), "the protected filler stays: {left}");
    let events = server.kubectl(
        &["get", "events", "--field-selector", "reason=Preempted", "-o", "jsonpath={.items[*].message}"],
        None,
    );
    assert!(events.contains("Preempted by pod") && events.contains("on node small-0"), "{events}");

    // A class that does not exist is refused at admission.
    let output = Command::new("/usr/bin/kubectl")
        .args(["apply", "-f", "-"])
        .env("KUBECONFIG", server.kubeconfig())
        .env("HOME", server.scratch("home"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(
                b"apiVersion: v1\nkind: Pod\nmetadata: {name: lost}\nspec: {priorityClassName: nope, containers: [{name: c, image: busybox}]}\n",
            )?;
            child.wait_with_output()
        })
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success() && stderr.contains("no PriorityClass with name nope was found"), "{stderr}");
}

/// A pod goes where its bound volume is: a volume with node affinity to node-2 (as local-path
/// makes them) draws the pods of its claim there, every time, though node-1 has more room.
#[test]
fn pods_follow_their_volumes_node_affinity() {
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).unwrap();
    add_node(&server, "node-1", "8", "");
    add_node(&server, "node-2", "1", "");
    let volume = r#"
apiVersion: v1
kind: PersistentVolume
metadata: {name: on-node-2}
spec:
  capacity: {storage: 1Gi}
  accessModes: [ReadWriteOnce]
  storageClassName: manual
  local: {path: /srv/data}
  nodeAffinity:
    required:
      nodeSelectorTerms:
      - matchExpressions: [{key: kubernetes.io/hostname, operator: In, values: [node-2]}]
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data}
spec:
  storageClassName: manual
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
"#;
    server.kubectl(&["apply", "-f", "-"], Some(volume));
    let deadline = Instant::now() + Duration::from_secs(20);
    while server.kubectl(&["get", "pvc", "data", "-o", "jsonpath={.status.phase}"], None) != "Bound" {
        assert!(Instant::now() < deadline, "the claim is not bound");
        std::thread::sleep(Duration::from_millis(100));
    }
    for i in 0..3 {
        add_pod(
            &server,
            &format!("user-{i}"),
            "100m",
            "volumes: [{name: d, persistentVolumeClaim: {claimName: data}}]",
        );
        assert_eq!(wait_bound(&server, &format!("user-{i}")), "node-2");
    }
}
