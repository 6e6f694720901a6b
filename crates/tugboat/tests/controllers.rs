//! The controller manager inside `tugboat server`, with hollow nodes running the pods, driven
//! with the real kubectl.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tugboat_testkit::{KillOnDrop, TugboatServer};

fn hollow_nodes(server: &TugboatServer, count: usize) -> KillOnDrop {
    KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_tugboat"))
            .args(["hollow-nodes", "--count", &count.to_string(), "--name-prefix", "h", "--kubeconfig"])
            .arg(server.kubeconfig())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Polls `kubectl args` until `done` holds of its output.
fn eventually(server: &TugboatServer, args: &[&str], what: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = server.kubectl(args, None);
        if done(&output) {
            return output;
        }
        assert!(Instant::now() < deadline, "{what}: last saw {output}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn running_pods(server: &TugboatServer, selector: &str) -> Vec<String> {
    let output = server.kubectl(
        &[
            "get",
            "pods",
            "-l",
            selector,
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.status.phase} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
        ],
        None,
    );
    output
        .lines()
        .filter_map(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            (fields.len() == 2 && fields[1] == "Running").then(|| fields[0].to_string())
        })
        .collect()
}

#[test]
fn replica_sets_keep_their_pods_running() {
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).unwrap();
    let _nodes = hollow_nodes(&server, 3);
    let manifest = "apiVersion: apps/v1\nkind: ReplicaSet\nmetadata: {name: web}\nspec:\n  replicas: 5\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec: {containers: [{name: c, image: busybox}]}\n";
    server.kubectl(&["apply", "-f", "-"], Some(manifest));
    let wait_running = |count: usize| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let running = running_pods(&server, "app=web");
            if running.len() == count {
                return running;
            }
            assert!(Instant::now() < deadline, "wanted {count} running pods, have {running:?}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let first = wait_running(5);
    eventually(&server, &["get", "rs", "web"], "the status counts them", |o| {
        o.lines().nth(1).is_some_and(|l| l.split_whitespace().take(4).eq(["web", "5", "5", "5"]))
    });
    let pod: serde_json::Value =
        serde_json::from_str(&server.kubectl(&["get", "pod", &first[0], "-o", "json"], None)).unwrap();
    assert_eq!(pod["metadata"]["ownerReferences"][0]["kind"], "ReplicaSet");
    assert_eq!(pod["metadata"]["ownerReferences"][0]["controller"], true);
    assert!(first[0].starts_with("web-"));

    // Scale down and up; a deleted pod is replaced.
    server.kubectl(&["scale", "rs", "web", "--replicas=2"], None);
    wait_running(2);
    server.kubectl(&["scale", "rs", "web", "--replicas=4"], None);
    let four = wait_running(4);
    server.kubectl(&["delete", "pod", &four[0]], None);
    let replaced = wait_running(4);
    assert!(!replaced.contains(&four[0]));

    // An orphan with matching labels is adopted, and counts: a ReplicaSet made after it for
    // one replica makes no pod of its own.
    let orphan = "apiVersion: v1\nkind: Pod\nmetadata: {name: stray, labels: {app: solo}}\nspec: {containers: [{name: c, image: busybox}]}\n";
    server.kubectl(&["apply", "-f", "-"], Some(orphan));
    let solo = manifest
        .replace("name: web", "name: solo")
        .replace("app: web", "app: solo")
        .replace("replicas: 5", "replicas: 1");
    server.kubectl(&["apply", "-f", "-"], Some(&solo));
    eventually(
        &server,
        &["get", "pod", "stray", "-o", "jsonpath={.metadata.ownerReferences[0].name}"],
        "adopted",
        |o| o == "solo",
    );
    eventually(&server, &["get", "rs", "solo", "-o", "jsonpath={.status.readyReplicas}"], "counted", |o| o == "1");
    assert_eq!(running_pods(&server, "app=solo"), ["stray"]);
}

#[test]
fn deployments_roll_out_roll_back_and_scale() {
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).unwrap();
    let _nodes = hollow_nodes(&server, 3);
    eventually(&server, &["get", "nodes", "-o", "name"], "three nodes", |o| o.lines().count() == 3);
    server.kubectl(&["create", "deployment", "web", "--image=busybox:1.36", "--replicas=6"], None);
    let status = server.kubectl(&["rollout", "status", "deployment/web", "--timeout=60s"], None);
    assert!(status.contains("successfully rolled out"), "{status}");
    let nodes = server.kubectl(&["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].spec.nodeName}"], None);
    let spread: std::collections::BTreeSet<&str> = nodes.split_whitespace().collect();
    assert_eq!(spread.len(), 3, "the replicas spread over the nodes: {nodes}");
    let rs = server.kubectl(&["get", "rs", "-l", "app=web", "-o", "name"], None);
    assert_eq!(rs.lines().count(), 1, "{rs}");
    let revision = server.kubectl(
        &["get", "deployment", "web", "-o", "jsonpath={.metadata.annotations.deployment\\.kubernetes\\.io/revision}"],
        None,
    );
    assert_eq!(revision, "1");

    let images = |server: &TugboatServer| {
        let output = server.kubectl(
            &[
                "get",
                "pods",
                "-l",
                "app=web",
                "-o",
                "jsonpath={range .items[*]}{.spec.containers[0].image} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
            ],
            None,
        );
        output.lines().filter(|l| l.split_whitespace().count() == 1).map(|l| l.trim().to_string()).collect::<Vec<_>>()
    };
    // A new image rolls out; the old ReplicaSet is kept, empty, for undo.
    server.kubectl(&["set", "image", "deployment/web", "busybox=busybox:1.37"], None);
    let status = server.kubectl(&["rollout", "status", "deployment/web", "--timeout=60s"], None);
    assert!(status.contains("successfully rolled out"), "{status}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while images(&server) != vec!["busybox:1.37".to_string(); 6] {
        assert!(Instant::now() < deadline, "pods: {:?}", images(&server));
        std::thread::sleep(Duration::from_millis(200));
    }
    let history = server.kubectl(&["rollout", "history", "deployment/web"], None);
    assert!(history.contains("1 ") && history.contains("2 "), "{history}");
    // Undo goes back to the first template, as revision 3.
    server.kubectl(&["rollout", "undo", "deployment/web"], None);
    let status = server.kubectl(&["rollout", "status", "deployment/web", "--timeout=60s"], None);
    assert!(status.contains("successfully rolled out"), "{status}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while images(&server) != vec!["busybox:1.36".to_string(); 6] {
        assert!(Instant::now() < deadline, "pods: {:?}", images(&server));
        std::thread::sleep(Duration::from_millis(200));
    }
    let rs = server.kubectl(&["get", "rs", "-l", "app=web", "-o", "name"], None);
    assert_eq!(rs.lines().count(), 2, "the first ReplicaSet is reused: {rs}");
    eventually(
        &server,
        &["get", "deployment", "web", "-o", "jsonpath={.metadata.annotations.deployment\\.kubernetes\\.io/revision}"],
        "revision 3",
        |o| o == "3",
    );

    // Scale down: the deployment's ReplicaSet follows.
    server.kubectl(&["scale", "deployment", "web", "--replicas=2"], None);
    eventually(&server, &["get", "deployment", "web"], "two ready", |o| {
        o.lines().nth(1).is_some_and(|l| l.split_whitespace().take(4).eq(["web", "2/2", "2", "2"]))
    });
}

#[test]
fn the_garbage_collector_follows_owner_references() {
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).unwrap();
    let _nodes = hollow_nodes(&server, 2);
    eventually(&server, &["get", "nodes", "-o", "name"], "two nodes", |o| o.lines().count() == 2);
    let count =
        |selector: &str| server.kubectl(&["get", "rs,pods", "-l", selector, "-o", "name"], None).lines().count();
    for name in ["bg", "fg", "keep"] {
        server.kubectl(&["create", "deployment", name, "--image=busybox", "--replicas=2"], None);
        server.kubectl(&["rollout", "status", &format!("deployment/{name}"), "--timeout=60s"], None);
        assert_eq!(count(&format!("app={name}")), 3, "a ReplicaSet and two pods");
    }
    // Background (kubectl's default): the Deployment goes at once, its ReplicaSet and pods after.
    server.kubectl(&["delete", "deployment", "bg"], None);
    eventually(&server, &["get", "rs,pods", "-l", "app=bg", "-o", "name"], "bg's dependents gone", |o| {
        o.trim().is_empty()
    });
    // Foreground: the Deployment waits for its dependents (kubectl waits for it).
    server.kubectl(&["delete", "deployment", "fg", "--cascade=foreground", "--timeout=30s"], None);
    assert_eq!(count("app=fg"), 0);
    // Orphan: the ReplicaSet and pods stay, released.
    server.kubectl(&["delete", "deployment", "keep", "--cascade=orphan"], None);
    eventually(
        &server,
        &["get", "rs", "-l", "app=keep", "-o", "jsonpath={.items[*].metadata.ownerReferences}"],
        "released",
        |o| o.trim().is_empty(),
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(count("app=keep"), 3);
}

#[test]
fn pods_leave_a_node_that_stops_heartbeating() {
    let server = TugboatServer::start(
        Path::new(env!("CARGO_BIN_EXE_tugboat")),
        &["--node-monitor-grace-period", "3s", "--default-unreachable-toleration-seconds", "2"],
    )
    .unwrap();
    let start = |prefix: &str| {
        KillOnDrop(
            Command::new(env!("CARGO_BIN_EXE_tugboat"))
                .args([
                    "hollow-nodes",
                    "--count",
                    "2",
                    "--name-prefix",
                    prefix,
                    "--lease-renew-interval",
                    "1s",
                    "--kubeconfig",
                ])
                .arg(server.kubeconfig())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let doomed = start("doomed");
    let _healthy = start("healthy");
    eventually(&server, &["get", "nodes", "-o", "name"], "four nodes", |o| o.lines().count() == 4);
    server.kubectl(&["create", "deployment", "web", "--image=busybox", "--replicas=4"], None);
    server.kubectl(&["rollout", "status", "deployment/web", "--timeout=60s"], None);
    let tolerations =
        server.kubectl(&["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[0].spec.tolerations}"], None);
    assert!(
        tolerations.contains("node.kubernetes.io/unreachable") && tolerations.contains("\"tolerationSeconds\":2"),
        "{tolerations}"
    );
    let placed = server.kubectl(&["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].spec.nodeName}"], None);
    assert!(placed.contains("doomed-"), "some replicas on the nodes that will die: {placed}");

    drop(doomed);
    eventually(&server, &["get", "nodes", "doomed-0"], "NotReady", |o| o.contains("NotReady"));
    let taints = server.kubectl(&["get", "node", "doomed-0", "-o", "jsonpath={.spec.taints[*].key}"], None);
    assert!(taints.contains("node.kubernetes.io/unreachable"), "{taints}");
    // Evicted after their toleration; the Deployment's pods run on the healthy nodes again.
    eventually(
        &server,
        &[
            "get",
            "pods",
            "-l",
            "app=web",
            "-o",
            "jsonpath={range .items[*]}{.spec.nodeName} {.status.phase} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
        ],
        "replacements on healthy nodes",
        |o| {
            let live: Vec<&str> = o.lines().filter(|l| l.split_whitespace().count() == 2).collect();
            live.len() == 4 && live.iter().all(|l| l.starts_with("healthy-") && l.trim_end().ends_with("Running"))
        },
    );
    assert_eq!(server.kubectl(&["get", "nodes", "healthy-0", "-o", "jsonpath={.spec.taints}"], None), "");
}
