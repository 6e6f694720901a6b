//! The node agent against a real server, checked with the real kubectl: `tugboat kubelet`
//! registers this host as a Node with its own facts and heartbeats through a Lease.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tugboat_testkit::{KillOnDrop, TugboatServer};

fn kubelet(server: &TugboatServer, extra: &[&str]) -> KillOnDrop {
    KillOnDrop(
        Command::new(env!("CARGO_BIN_EXE_tugboat"))
            .arg("kubelet")
            .arg("--kubeconfig")
            .arg(server.kubeconfig())
            .arg("--data-dir")
            .arg(server.scratch("agent"))
            .args(["--kubelet-port", &tugboat_testkit::free_port().to_string()])
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

fn node_json(server: &TugboatServer, name: &str) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let output = Command::new("/usr/bin/kubectl")
            .args(["get", "node", name, "-o", "json"])
            .env("KUBECONFIG", server.kubeconfig())
            .env("HOME", server.scratch("home"))
            .output()
            .unwrap();
        if output.status.success() {
            let node: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
            if node["status"]["nodeInfo"]["kernelVersion"].is_string() {
                return node;
            }
        }
        assert!(Instant::now() < deadline, "node {name} never registered");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn the_kubelet_registers_the_host_as_a_node_and_heartbeats() {
    // The kubelet programs the pod network (forwarding, routes, nftables): only in namespaces
    // of the test's own.
    if !tugboat_testkit::isolated("the_kubelet_registers_the_host_as_a_node_and_heartbeats") {
        return;
    }
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).unwrap();
    let _kubelet = kubelet(&server, &["--node-name", "worker-1", "--node-ip", "10.20.30.40"]);
    let node = node_json(&server, "worker-1");

    // Capacity is the host's.
    let cpus = std::thread::available_parallelism().unwrap().get().to_string();
    assert_eq!(node["status"]["capacity"]["cpu"], cpus.as_str(), "{node}");
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total_kib = meminfo.lines().find(|l| l.starts_with("MemTotal:")).unwrap().split_whitespace().nth(1).unwrap();
    assert_eq!(node["status"]["capacity"]["memory"], format!("{total_kib}Ki").as_str());
    assert_eq!(node["status"]["capacity"]["pods"], "110");
    assert!(node["status"]["capacity"]["ephemeral-storage"].as_str().unwrap().ends_with("Ki"));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(node["status"]["nodeInfo"]["kernelVersion"], kernel.trim());
    assert_eq!(node["status"]["nodeInfo"]["operatingSystem"], "linux");
    assert_eq!(node["metadata"]["labels"]["kubernetes.io/hostname"], "worker-1");
    assert_eq!(
        node["status"]["addresses"],
        serde_json::json!([{"type": "InternalIP", "address": "10.20.30.40"}, {"type": "Hostname", "address": "worker-1"}])
    );
    let ready = node["status"]["conditions"].as_array().unwrap().iter().find(|c| c["type"] == "Ready").unwrap().clone();
    assert_eq!((ready["status"].as_str(), ready["reason"].as_str()), (Some("True"), Some("KubeletReady")));
    assert_eq!(node["status"]["nodeInfo"]["containerRuntimeVersion"], "tugboat://0.1.0");
    let nodes = server.kubectl(&["get", "nodes", "-o", "wide"], None);
    assert!(nodes.contains("worker-1") && nodes.contains(" Ready") && nodes.contains("10.20.30.40"), "{nodes}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // Events as upstream's kubelet records them: its start, then each condition's state.
        let described = server.kubectl(&["describe", "node", "worker-1"], None);
        assert!(described.contains("Kernel Version:") && described.contains("KubeletReady"), "{described}");
        if ["Starting kubelet.", "NodeHasSufficientMemory", "NodeHasSufficientPID", "NodeReady"]
            .iter()
            .all(|e| described.contains(e))
        {
            break;
        }
        assert!(Instant::now() < deadline, "events missing: {described}");
        std::thread::sleep(Duration::from_millis(300));
    }

    // The Lease in kube-node-lease is renewed.
    let renewed = |server: &TugboatServer| {
        server.kubectl(
            &[
                "get",
                "lease",
                "worker-1",
                "-n",
                "kube-node-lease",
                "-o",
                "jsonpath={.spec.holderIdentity} {.spec.renewTime}",
            ],
            None,
        )
    };
    let first = renewed(&server);
    assert!(first.starts_with("worker-1 "), "{first}");
    let deadline = Instant::now() + Duration::from_secs(25);
    while renewed(&server) == first {
        assert!(Instant::now() < deadline, "the lease was not renewed: {first}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // Without --node-name and --node-ip: the host's name, and the address of the default
    // route's interface (one the test gives its own network namespace).
    for args in [
        &["link", "add", "uplink0", "type", "veth", "peer", "name", "uplink1"][..],
        &["addr", "add", "10.99.0.2/24", "dev", "uplink0"],
        &["link", "set", "uplink1", "up"],
        &["link", "set", "uplink0", "up"],
        &["route", "add", "default", "via", "10.99.0.1", "dev", "uplink0"],
    ] {
        assert!(Command::new("ip").args(args).status().unwrap().success(), "ip {args:?}");
    }
    let _second = kubelet(&server, &[]);
    let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap().trim().to_lowercase();
    let node = node_json(&server, &hostname);
    let addresses = node["status"]["addresses"].as_array().unwrap();
    let internal = addresses.iter().find(|a| a["type"] == "InternalIP").expect("an InternalIP");
    assert_eq!(internal["address"], "10.99.0.2", "{node}");
}

/// `tugboat proxy` alone (as upstream's kube-proxy beside a kubelet): it programs this host's
/// nftables from the cluster's Services and Endpoints, reports its programming latency, and
/// `--cleanup` removes its rules.
#[test]
fn the_service_proxy_runs_alone() {
    if !tugboat_testkit::isolated("the_service_proxy_runs_alone") {
        return;
    }
    let server = TugboatServer::start(Path::new(env!("CARGO_BIN_EXE_tugboat")), &[]).unwrap();
    let metrics = format!("127.0.0.1:{}", tugboat_testkit::free_port());
    let tugboat = env!("CARGO_BIN_EXE_tugboat");
    let proxy = KillOnDrop(
        Command::new(tugboat)
            .args(["proxy", "--node-name", "worker-1", "--proxy-metrics-address", &metrics])
            .arg("--kubeconfig")
            .arg(server.kubeconfig())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let table = || {
        let out = Command::new("nft").args(["list", "table", "ip", "tugboat-proxy"]).output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let until = |what: &str, check: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let text = table();
            if check(&text) {
                return text;
            }
            assert!(Instant::now() < deadline, "{what}: {text}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    // The kubernetes Service, from the start.
    let kubernetes = server.kubectl(&["get", "service", "kubernetes", "-o", "jsonpath={.spec.clusterIP}"], None);
    until("the kubernetes Service", &|t| t.contains(&format!("{kubernetes} . tcp . 443")));
    // A Service with endpoints of its own (no selector): a ClusterIP and a NodePort.
    let manifest = r#"
apiVersion: v1
kind: Service
metadata: {name: outside}
spec:
  type: NodePort
  ports: [{name: web, port: 80, nodePort: 30099}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: outside}
subsets: [{addresses: [{ip: 192.0.2.10, nodeName: worker-1}], ports: [{name: web, port: 8080}]}]
"#;
    server.kubectl(&["apply", "-f", "-"], Some(manifest));
    let ip = server.kubectl(&["get", "service", "outside", "-o", "jsonpath={.spec.clusterIP}"], None);
    let text = until("the outside Service", &|t| t.contains("dnat to 192.0.2.10:8080"));
    assert!(text.contains(&format!("{ip} . tcp . 80 : goto svc-default/outside/tcp/80")), "{text}");
    assert!(text.contains("tcp . 30099 : goto ext-default/outside/tcp/80"), "{text}");
    assert!(text.contains("192.0.2.10 . 192.0.2.10"), "a local endpoint is in the hairpin set: {text}");
    // Deleted: its rules go, nothing else's.
    server.kubectl(&["delete", "service", "outside"], None);
    let text = until("the outside Service gone", &|t| !t.contains("outside"));
    assert!(text.contains(&format!("{kubernetes} . tcp . 443")), "{text}");
    let out = Command::new("curl").args(["-s", &format!("http://{metrics}/metrics")]).output().unwrap();
    let scraped = String::from_utf8_lossy(&out.stdout);
    assert!(scraped.contains("tugboat_proxy_network_programming_duration_seconds_count"), "{scraped}");
    // `--cleanup` removes the proxy's rules.
    drop(proxy);
    let out = Command::new(tugboat).args(["proxy", "--cleanup", "--kubeconfig", "/dev/null"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tables = Command::new("nft").args(["list", "tables"]).output().unwrap();
    assert!(!String::from_utf8_lossy(&tables.stdout).contains("tugboat-proxy"));
}
