//! The controller manager inside `tugboat server`, with hollow nodes running the pods, driven
//! with the real kubectl.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tugboat_testkit::{KillOnDrop, TugboatServer};

fn hollow_nodes(server: &TugboatServer, count: usize) -> KillOnDrop {
    hollow_nodes_named(server, "h", count)
}

fn hollow_nodes_named(server: &TugboatServer, prefix: &str, count: usize) -> KillOnDrop {
    KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_tugboat"))
            .args(["hollow-nodes", "--count", &count.to_string(), "--name-prefix", prefix, "--kubeconfig"])
            .arg(server.kubeconfig())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// Polls `kubectl args` until `done` holds of its output.
fn eventually(server: &TugboatServer, args: &[&str], what: &str, done: impl Fn(&str) -> bool) -> String {
    eventually_within(Duration::from_secs(30), server, args, what, done)
}

fn eventually_within(
    limit: Duration,
    server: &TugboatServer,
    args: &[&str],
    what: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = Instant::now() + limit;
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
    let described = server.kubectl(&["describe", "deployment", "web"], None);
    assert!(
        described.contains("ScalingReplicaSet") && described.contains("Scaled down replica set web-"),
        "{described}"
    );
    let rs_events =
        server.kubectl(&["get", "events", "--field-selector", "reason=SuccessfulCreate", "-o", "name"], None);
    assert!(rs_events.lines().count() >= 6, "the ReplicaSets report the pods they create: {rs_events}");

    // Paused, a new template waits; resumed, it rolls out.
    server.kubectl(&["rollout", "pause", "deployment/web"], None);
    server.kubectl(&["set", "image", "deployment/web", "busybox=busybox:1.38"], None);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(images(&server), vec!["busybox:1.36".to_string(); 2], "nothing rolls while paused");
    server.kubectl(&["rollout", "resume", "deployment/web"], None);
    server.kubectl(&["rollout", "status", "deployment/web", "--timeout=60s"], None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while images(&server) != vec!["busybox:1.38".to_string(); 2] {
        assert!(Instant::now() < deadline, "pods: {:?}", images(&server));
        std::thread::sleep(Duration::from_millis(200));
    }
    // A restart replaces every pod.
    let names = |server: &TugboatServer| {
        let output = server.kubectl(&["get", "pods", "-l", "app=web", "-o", "name"], None);
        output.lines().map(str::to_string).collect::<std::collections::BTreeSet<String>>()
    };
    let before = names(&server);
    server.kubectl(&["rollout", "restart", "deployment/web"], None);
    server.kubectl(&["rollout", "status", "deployment/web", "--timeout=60s"], None);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let now = names(&server);
        if now.len() == 2 && now.is_disjoint(&before) {
            break;
        }
        assert!(Instant::now() < deadline, "before {before:?}, now {now:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
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
    // A ConfigMap can hang on a Deployment too.
    let uid = server.kubectl(&["get", "deployment", "bg", "-o", "jsonpath={.metadata.uid}"], None);
    let settings = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: bg-settings\n  ownerReferences: [{{apiVersion: apps/v1, kind: Deployment, name: bg, uid: {uid}}}]\ndata: {{a: b}}\n"
    );
    server.kubectl(&["apply", "-f", "-"], Some(&settings));
    // Background (kubectl's default): the Deployment goes at once, its ReplicaSet and pods after.
    server.kubectl(&["delete", "deployment", "bg"], None);
    eventually(&server, &["get", "rs,pods", "-l", "app=bg", "-o", "name"], "bg's dependents gone", |o| {
        o.trim().is_empty()
    });
    eventually(&server, &["get", "configmap", "bg-settings", "--ignore-not-found"], "its ConfigMap gone", |o| {
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

    // The evicted pods wait, Terminating, for a kubelet that is gone; once the dead nodes are
    // deleted, pod GC removes them (after the grace period, here 3 s).
    let stuck = server.kubectl(&["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].spec.nodeName}"], None);
    assert!(stuck.contains("doomed-"), "{stuck}");
    server.kubectl(&["delete", "node", "doomed-0", "doomed-1"], None);
    eventually(&server, &["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].spec.nodeName}"], "pod GC", |o| {
        !o.contains("doomed-") && o.split_whitespace().count() == 4
    });
}

/// Each daemon pod's image and phase, a line each.
const IMAGES: &[&str] = &[
    "get",
    "pods",
    "-l",
    "app=agent",
    "-o",
    "jsonpath={range .items[*]}{.spec.containers[0].image} {.status.phase}{\"\\n\"}{end}",
];

#[test]
fn daemon_sets_cover_every_node_and_roll() {
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).unwrap();
    let _nodes = hollow_nodes(&server, 2);
    // Node IPAM: each node gets its own /24 of the cluster CIDR.
    let cidrs = eventually(&server, &["get", "nodes", "-o", "jsonpath={.items[*].spec.podCIDR}"], "pod CIDRs", |o| {
        o.split_whitespace().count() == 2
    });
    let cidrs: std::collections::BTreeSet<&str> = cidrs.split_whitespace().collect();
    assert_eq!(cidrs.len(), 2, "{cidrs:?}");
    assert!(cidrs.iter().all(|c| c.starts_with("10.244.") && c.ends_with(".0/24")), "{cidrs:?}");

    let manifest = "apiVersion: apps/v1\nkind: DaemonSet\nmetadata: {name: agent}\nspec:\n  selector: {matchLabels: {app: agent}}\n  template:\n    metadata: {labels: {app: agent}}\n    spec: {containers: [{name: c, image: busybox:1.36}]}\n";
    server.kubectl(&["apply", "-f", "-"], Some(manifest));
    let status = server.kubectl(&["rollout", "status", "daemonset/agent", "--timeout=60s"], None);
    assert!(status.contains("successfully rolled out"), "{status}");
    let placed = |server: &TugboatServer| {
        let nodes =
            server.kubectl(&["get", "pods", "-l", "app=agent", "-o", "jsonpath={.items[*].spec.nodeName}"], None);
        let mut nodes: Vec<String> = nodes.split_whitespace().map(str::to_string).collect();
        nodes.sort();
        nodes
    };
    assert_eq!(placed(&server), ["h-0", "h-1"]);
    // A cordoned node keeps its daemon (daemons tolerate cordoning), and a node added later
    // gets one.
    server.kubectl(&["cordon", "h-1"], None);
    let _late = hollow_nodes_named(&server, "late", 1);
    eventually(&server, &["get", "ds", "agent", "-o", "jsonpath={.status.numberReady}"], "three ready", |o| o == "3");
    assert_eq!(placed(&server), ["h-0", "h-1", "late-0"]);

    // A new image rolls over every node.
    server.kubectl(&["set", "image", "daemonset/agent", "c=busybox:1.37"], None);
    let status = server.kubectl(&["rollout", "status", "daemonset/agent", "--timeout=60s"], None);
    assert!(status.contains("successfully rolled out"), "{status}");
    eventually(&server, IMAGES, "every daemon on the new image", |o| {
        o.lines().count() == 3 && o.lines().all(|l| l == "busybox:1.37 Running")
    });
    let shown = server.kubectl(&["get", "ds", "agent"], None);
    let row: Vec<&str> = shown.lines().nth(1).unwrap_or_default().split_whitespace().collect();
    assert_eq!(row[..6], ["agent", "3", "3", "3", "3", "3"], "{shown}");

    // Its history: one ControllerRevision per template; undo brings the old image back, as
    // revision 3.
    let history = eventually(&server, &["rollout", "history", "daemonset/agent"], "two revisions", |o| {
        o.lines().filter(|l| l.starts_with(|c: char| c.is_ascii_digit())).count() == 2
    });
    assert!(history.contains("REVISION"), "{history}");
    let first = server.kubectl(&["rollout", "history", "daemonset/agent", "--revision=1"], None);
    assert!(first.contains("busybox:1.36"), "{first}");
    let revisions = server.kubectl(&["get", "controllerrevisions"], None);
    assert!(revisions.contains("daemonset.apps/agent"), "{revisions}");
    server.kubectl(&["rollout", "undo", "daemonset/agent"], None);
    eventually(&server, IMAGES, "every daemon back on the old image", |o| {
        o.lines().count() == 3 && o.lines().all(|l| l == "busybox:1.36 Running")
    });
    let history = eventually(&server, &["rollout", "history", "daemonset/agent"], "renumbered", |o| {
        let numbers: Vec<&str> = o.lines().filter_map(|l| l.split_whitespace().next()).collect();
        numbers.contains(&"2") && numbers.contains(&"3") && !numbers.contains(&"1")
    });
    assert!(history.contains('3'), "{history}");
}

#[test]
fn jobs_complete_or_fail_and_cronjobs_start_them() {
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).unwrap();
    let _nodes = hollow_nodes(&server, 2);
    eventually(&server, &["get", "nodes", "-o", "name"], "two nodes", |o| o.lines().count() == 2);
    // The schedule fires on the next minute: started first, checked last.
    server.kubectl(&["create", "cronjob", "tick", "--image=busybox", "--schedule=* * * * *", "--", "date"], None);

    server.kubectl(&["create", "job", "pi", "--image=busybox", "--", "echo", "hi"], None);
    let waited = server.kubectl(&["wait", "--for=condition=complete", "job/pi", "--timeout=30s"], None);
    assert!(waited.contains("condition met"), "{waited}");
    let pods = server.kubectl(&["get", "pods", "-l", "job-name=pi"], None);
    assert!(pods.contains("Completed"), "{pods}");
    let described = server.kubectl(&["describe", "job", "pi"], None);
    assert!(described.contains("SuccessfulCreate") && described.contains("Job completed"), "{described}");

    // A pod orphaned from its running Job is adopted again (and counts: no second pod); one
    // relabelled out of the Job's selector is released, and replaced.
    let waiting = "apiVersion: batch/v1\nkind: Job\nmetadata: {name: waiting}\nspec:\n  template:\n    spec: {restartPolicy: Never, nodeSelector: {nowhere: \"true\"}, containers: [{name: c, image: busybox}]}\n";
    server.kubectl(&["apply", "-f", "-"], Some(waiting));
    let pod = eventually(
        &server,
        &["get", "pods", "-l", "job-name=waiting", "-o", "jsonpath={.items[*].metadata.name}"],
        "the waiting job's pod",
        |o| !o.is_empty(),
    );
    let owner = ["get", "pod", pod.as_str(), "-o", "jsonpath={.metadata.ownerReferences[*].name}"];
    server.kubectl(
        &["patch", "pod", &pod, "--type=json", "-p", r#"[{"op":"remove","path":"/metadata/ownerReferences"}]"#],
        None,
    );
    eventually(&server, &owner, "the orphan adopted again", |o| o == "waiting");
    let pods = server.kubectl(&["get", "pods", "-l", "job-name=waiting", "-o", "name"], None);
    assert_eq!(pods.lines().count(), 1, "the adopted pod counts: {pods}");
    server.kubectl(&["label", "pod", &pod, "--overwrite", "batch.kubernetes.io/controller-uid=someone-else"], None);
    eventually(&server, &owner, "the relabelled pod released", |o| o.is_empty());
    eventually(&server, &["get", "pods", "-l", "job-name=waiting", "-o", "name"], "a replacement", |o| {
        o.lines().count() == 2
    });

    let parallel = "apiVersion: batch/v1\nkind: Job\nmetadata: {name: batch}\nspec:\n  completions: 4\n  parallelism: 2\n  template:\n    spec: {restartPolicy: Never, containers: [{name: c, image: busybox}]}\n";
    server.kubectl(&["apply", "-f", "-"], Some(parallel));
    let waited = server.kubectl(&["wait", "--for=condition=complete", "job/batch", "--timeout=30s"], None);
    assert!(waited.contains("condition met"), "{waited}");
    let job = server.kubectl(&["get", "job", "batch"], None);
    assert!(job.contains("Complete") && job.contains("4/4"), "{job}");
    assert_eq!(server.kubectl(&["get", "pods", "-l", "job-name=batch", "-o", "name"], None).lines().count(), 4);

    // Pods that fail are retried after a backoff (10 s) until backoffLimit.
    let failing = "apiVersion: batch/v1\nkind: Job\nmetadata: {name: broken}\nspec:\n  backoffLimit: 1\n  template:\n    metadata: {annotations: {hollow.tugboat.dev/exit-code: \"2\"}}\n    spec: {restartPolicy: Never, containers: [{name: c, image: busybox}]}\n";
    server.kubectl(&["apply", "-f", "-"], Some(failing));
    let waited = server.kubectl(&["wait", "--for=condition=failed", "job/broken", "--timeout=45s"], None);
    assert!(waited.contains("condition met"), "{waited}");
    let reason = server.kubectl(
        &["get", "job", "broken", "-o", "jsonpath={.status.conditions[?(@.type==\"Failed\")].reason} {.status.failed}"],
        None,
    );
    assert_eq!(reason, "BackoffLimitExceeded 2");

    // A finished Job with ttlSecondsAfterFinished goes, with its pods.
    let ttl = parallel
        .replace("name: batch", "name: brief")
        .replace("completions: 4", "completions: 1\n  ttlSecondsAfterFinished: 0");
    server.kubectl(&["apply", "-f", "-"], Some(&ttl));
    eventually(&server, &["get", "jobs", "-o", "name"], "the TTL removes it", |o| !o.contains("brief"));
    eventually(&server, &["get", "pods", "-l", "job-name=brief", "-o", "name"], "its pods too", |o| {
        o.trim().is_empty()
    });

    // The CronJob started a Job on the minute; it completed.
    let jobs = eventually_within(
        Duration::from_secs(75),
        &server,
        &[
            "get",
            "jobs",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.metadata.ownerReferences[0].kind} {.status.succeeded}{\"\\n\"}{end}",
        ],
        "a scheduled job",
        |o| o.lines().any(|l| l.starts_with("tick-") && l.ends_with("CronJob 1")),
    );
    assert!(jobs.contains("tick-"), "{jobs}");
    let cronjob = server.kubectl(&["get", "cronjob", "tick", "-o", "jsonpath={.status.lastScheduleTime}"], None);
    assert!(cronjob.ends_with(":00Z"), "scheduled on the minute: {cronjob}");
    server.kubectl(&["create", "job", "manual", "--from=cronjob/tick"], None);
    server.kubectl(&["wait", "--for=condition=complete", "job/manual", "--timeout=30s"], None);
}

#[test]
fn services_get_the_endpoints_of_their_ready_pods() {
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).unwrap();
    let _nodes = hollow_nodes(&server, 2);
    server.kubectl(&["create", "deployment", "web", "--image=busybox", "--replicas=3", "--port=8080"], None);
    server.kubectl(&["expose", "deployment", "web", "--port=80", "--target-port=8080"], None);
    server.kubectl(&["rollout", "status", "deployment/web", "--timeout=60s"], None);
    let ips = |server: &TugboatServer| {
        let pods = server.kubectl(&["get", "pods", "-l", "app=web", "-o", "jsonpath={.items[*].status.podIP}"], None);
        let mut ips: Vec<String> = pods.split_whitespace().map(str::to_string).collect();
        ips.sort();
        ips
    };
    let sorted = |text: &str| {
        let mut ips: Vec<String> = text.split_whitespace().map(str::to_string).collect();
        ips.sort();
        ips
    };
    let want = ips(&server);
    assert_eq!(want.len(), 3);
    let got = eventually(
        &server,
        &["get", "endpoints", "web", "-o", "jsonpath={.subsets[*].addresses[*].ip}"],
        "endpoints",
        |o| o.split_whitespace().count() == 3,
    );
    assert_eq!(sorted(&got), want);
    assert_eq!(
        server.kubectl(&["get", "endpoints", "web", "-o", "jsonpath={.subsets[0].ports[0].port}"], None),
        "8080"
    );
    let slice = |path: &str| {
        let query = format!("jsonpath={path}");
        server.kubectl(&["get", "endpointslices", "-l", "kubernetes.io/service-name=web", "-o", &query], None)
    };
    assert_eq!(sorted(&slice("{.items[*].endpoints[*].addresses[0]}")), want);
    assert_eq!(slice("{.items[0].metadata.ownerReferences[0].kind}"), "Service");
    assert_eq!(slice("{.items[0].ports[0].port}"), "8080");
    let described = server.kubectl(&["describe", "service", "web"], None);
    assert!(described.contains(&format!("{}:8080", want[0])), "{described}");

    server.kubectl(&["scale", "deployment", "web", "--replicas=1"], None);
    eventually(
        &server,
        &["get", "endpoints", "web", "-o", "jsonpath={.subsets[*].addresses[*].ip}"],
        "one endpoint",
        |o| o.split_whitespace().count() == 1,
    );
    eventually(
        &server,
        &[
            "get",
            "endpointslices",
            "-l",
            "kubernetes.io/service-name=web",
            "-o",
            "jsonpath={.items[*].endpoints[*].addresses[0]}",
        ],
        "one in the slice",
        |o| o.split_whitespace().count() == 1,
    );

    server.kubectl(&["delete", "service", "web"], None);
    eventually(&server, &["get", "endpoints,endpointslices", "-o", "name"], "gone with the service", |o| {
        !o.contains("web")
    });
}

#[test]
fn namespaces_get_a_service_account_and_are_emptied_before_they_go() {
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).unwrap();
    let _nodes = hollow_nodes(&server, 1);
    server.kubectl(&["create", "namespace", "team"], None);
    eventually(&server, &["get", "serviceaccounts", "-n", "team", "-o", "name"], "a default account", |o| {
        o.trim() == "serviceaccount/default"
    });
    // The cluster CA is published in every namespace, and put back when deleted.
    let ca = |server: &TugboatServer| {
        let query = [
            "get",
            "configmap",
            "kube-root-ca.crt",
            "-n",
            "team",
            "--ignore-not-found",
            "-o",
            "jsonpath={.data.ca\\.crt}",
        ];
        server.kubectl(&query, None)
    };
    let pem = std::fs::read_to_string(server.data_dir().join("pki/ca.crt")).unwrap();
    eventually(&server, &["get", "configmaps", "-n", "team", "-o", "name"], "the root CA map", |o| {
        o.contains("kube-root-ca.crt")
    });
    assert_eq!(ca(&server).trim(), pem.trim());
    server.kubectl(&["delete", "configmap", "kube-root-ca.crt", "-n", "team"], None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while ca(&server).trim() != pem.trim() {
        assert!(Instant::now() < deadline, "the root CA map was not put back");
        std::thread::sleep(Duration::from_millis(200));
    }
    server.kubectl(&["create", "deployment", "api", "-n", "team", "--image=busybox", "--replicas=2"], None);
    server.kubectl(&["create", "configmap", "settings", "-n", "team", "--from-literal=a=b"], None);
    server.kubectl(&["rollout", "status", "deployment/api", "-n", "team", "--timeout=60s"], None);
    // kubectl waits until the namespace is gone.
    server.kubectl(&["delete", "namespace", "team", "--timeout=60s"], None);
    let left = server.kubectl(&["get", "namespace", "team", "--ignore-not-found"], None);
    assert!(left.trim().is_empty(), "{left}");
    let everything = server.kubectl(
        &[
            "get",
            "pods,rs,deployments,configmaps,serviceaccounts",
            "-A",
            "-o",
            "jsonpath={.items[*].metadata.namespace}",
        ],
        None,
    );
    assert!(!everything.contains("team"), "{everything}");

    // Content held by a finalizer keeps the namespace Terminating, and its conditions say why
    // (as `kubectl describe namespace` shows them); once released, the namespace goes.
    server.kubectl(&["create", "namespace", "held"], None);
    let held = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: precious, namespace: held, finalizers: [example.com/hold]}\n";
    server.kubectl(&["apply", "-f", "-"], Some(held));
    server.kubectl(&["delete", "namespace", "held", "--wait=false"], None);
    let described = eventually(&server, &["describe", "namespace", "held"], "the deletion conditions", |o| {
        o.contains("NamespaceFinalizersRemaining") && o.contains("example.com/hold in 1 resource instances")
    });
    assert!(
        described.contains("Terminating") && described.contains("configmaps. has 1 resource instances"),
        "{described}"
    );
    server.kubectl(
        &["patch", "configmap", "precious", "-n", "held", "--type=merge", "-p", r#"{"metadata":{"finalizers":[]}}"#],
        None,
    );
    eventually(&server, &["get", "namespace", "held", "--ignore-not-found", "-o", "name"], "the namespace gone", |o| {
        o.trim().is_empty()
    });
}

#[test]
fn stateful_sets_keep_ordered_pods_with_stable_names_and_claims() {
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).unwrap();
    let _nodes = hollow_nodes(&server, 2);
    let manifest = "apiVersion: v1\nkind: Service\nmetadata: {name: db}\nspec: {clusterIP: None, selector: {app: db}, ports: [{port: 5432}]}\n---\napiVersion: apps/v1\nkind: StatefulSet\nmetadata: {name: db}\nspec:\n  serviceName: db\n  replicas: 3\n  selector: {matchLabels: {app: db}}\n  template:\n    metadata: {labels: {app: db}}\n    spec: {containers: [{name: c, image: postgres:16}]}\n  volumeClaimTemplates:\n  - metadata: {name: data}\n    spec: {accessModes: [ReadWriteOnce], resources: {requests: {storage: 1Gi}}}\n";
    server.kubectl(&["apply", "-f", "-"], Some(manifest));
    let status = server.kubectl(&["rollout", "status", "statefulset/db", "--timeout=60s"], None);
    assert!(status.contains("roll out complete") || status.contains("rolling update complete"), "{status}");
    let pods = |server: &TugboatServer| {
        let output = server.kubectl(&["get", "pods", "-l", "app=db", "-o", "jsonpath={.items[*].metadata.name}"], None);
        let mut names: Vec<String> = output.split_whitespace().map(str::to_string).collect();
        names.sort();
        names
    };
    assert_eq!(pods(&server), ["db-0", "db-1", "db-2"]);
    let claims = server.kubectl(&["get", "pvc", "-o", "jsonpath={.items[*].metadata.name}"], None);
    assert_eq!(claims, "data-db-0 data-db-1 data-db-2");
    let identity = server.kubectl(
        &["get", "pod", "db-1", "-o", "jsonpath={.spec.hostname}.{.spec.subdomain} {.spec.volumes[?(@.name==\"data\")].persistentVolumeClaim.claimName}"],
        None,
    );
    assert_eq!(identity, "db-1.db data-db-1");
    // The endpoints of the headless service name the pods by hostname.
    eventually(
        &server,
        &["get", "endpoints", "db", "-o", "jsonpath={.subsets[*].addresses[*].hostname}"],
        "hostnames",
        |o| o.split_whitespace().count() == 3,
    );

    // A deleted pod comes back under its name.
    let uid = server.kubectl(&["get", "pod", "db-1", "-o", "jsonpath={.metadata.uid}"], None);
    server.kubectl(&["delete", "pod", "db-1"], None);
    eventually(
        &server,
        &["get", "pod", "db-1", "--ignore-not-found", "-o", "jsonpath={.metadata.uid} {.status.phase}"],
        "db-1 again",
        |o| !o.is_empty() && !o.starts_with(&uid) && o.ends_with("Running"),
    );
    // A new image rolls from the highest ordinal down; scaling down removes from the top.
    server.kubectl(&["set", "image", "statefulset/db", "c=postgres:17"], None);
    server.kubectl(&["rollout", "status", "statefulset/db", "--timeout=60s"], None);
    eventually(
        &server,
        &["get", "pods", "-l", "app=db", "-o", "jsonpath={.items[*].spec.containers[0].image}"],
        "new image",
        |o| o.split_whitespace().count() == 3 && o.split_whitespace().all(|i| i == "postgres:17"),
    );
    server.kubectl(&["scale", "statefulset", "db", "--replicas=1"], None);
    let deadline = Instant::now() + Duration::from_secs(30);
    while pods(&server) != ["db-0"] {
        assert!(Instant::now() < deadline, "{:?}", pods(&server));
        std::thread::sleep(Duration::from_millis(200));
    }
    let claims = server.kubectl(&["get", "pvc", "-o", "name"], None);
    assert_eq!(claims.lines().count(), 3, "claims outlive the pods: {claims}");
}

/// The TCP connections to `server`'s port (each counted once: both ends are on this host).
fn connections(server: &TugboatServer) -> usize {
    let port = server.url().rsplit(':').next().unwrap().to_string();
    let output = Command::new("ss").args(["-Htn", "state", "established"]).output().expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&output.stdout);
    let ends = text
        .lines()
        .filter(|line| line.split_whitespace().any(|address| address.ends_with(&format!(":{port}"))))
        .count();
    ends / 2
}

#[test]
fn the_garbage_collector_judges_many_custom_kinds_over_few_connections() {
    let mut server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).unwrap();
    server.wait_for_line("garbage collector started", Duration::from_secs(30)).unwrap();
    std::thread::sleep(Duration::from_secs(1));
    let before = connections(&server);
    const KINDS: usize = 150;
    let definitions: String = (0..KINDS)
        .map(|i| {
            format!(
                "apiVersion: apiextensions.k8s.io/v1\nkind: CustomResourceDefinition\nmetadata: {{name: thing{i}s.many.example.com}}\n\
                 spec:\n  group: many.example.com\n  scope: Namespaced\n  names: {{kind: Thing{i}, plural: thing{i}s}}\n  \
                 versions: [{{name: v1, served: true, storage: true, schema: {{openAPIV3Schema: {{type: object, \
                 x-kubernetes-preserve-unknown-fields: true}}}}}}]\n---\n"
            )
        })
        .collect();
    server.kubectl(&["apply", "-f", "-"], Some(&definitions));
    server.kubectl(&["wait", "--for=condition=established", "crd", "--all", "--timeout=60s"], None);
    // The collector judges the first kind and the last (it adds them in turn).
    for i in [0, KINDS - 1] {
        let owner = format!("apiVersion: many.example.com/v1\nkind: Thing{i}\nmetadata: {{name: owner}}\n");
        server.kubectl(&["apply", "-f", "-"], Some(&owner));
        let uid = server.kubectl(&["get", &format!("thing{i}s"), "owner", "-o", "jsonpath={.metadata.uid}"], None);
        let dependent = format!(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: of-thing{i}\n  ownerReferences: \
             [{{apiVersion: many.example.com/v1, kind: Thing{i}, name: owner, uid: {uid}}}]\ndata: {{a: b}}\n"
        );
        server.kubectl(&["apply", "-f", "-"], Some(&dependent));
        server.kubectl(&["delete", &format!("thing{i}s"), "owner"], None);
        eventually_within(
            Duration::from_secs(60),
            &server,
            &["get", "configmap", &format!("of-thing{i}"), "--ignore-not-found"],
            "the dependent of a custom owner collected",
            |o| o.trim().is_empty(),
        );
    }
    // A watch of each kind, and not a connection each (HTTP/2 streams on a few).
    let after = connections(&server);
    assert!(after < before + 20, "{before} connections before the {KINDS} kinds, {after} after");
}
