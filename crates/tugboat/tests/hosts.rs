//! Several hosts on one machine (`tugboat_testkit::hosts`): a server and agents joined with
//! the token it prints, each host a network namespace of its own on a switch.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use tugboat_testkit::hosts::{Host, Hosts};

const TUGBOAT: &str = env!("CARGO_BIN_EXE_tugboat");

/// The real kubectl, from outside every host (through the switch), as the server's admin.
/// (The admin kubeconfig names loopback; from outside, `--server` names the server's host.)
struct Kubectl {
    kubeconfig: PathBuf,
    server: String,
    home: PathBuf,
}

impl Kubectl {
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, String> {
        use std::io::Write;
        let mut child = Command::new("/usr/bin/kubectl")
            .arg("--server")
            .arg(&self.server)
            .args(args)
            .env("KUBECONFIG", &self.kubeconfig)
            .env("HOME", &self.home)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        child.stdin.take().unwrap().write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(format!("kubectl {args:?}: {}", String::from_utf8_lossy(&out.stderr)))
        }
    }

    fn ok(&self, args: &[&str]) -> String {
        self.run(args, None).unwrap_or_else(|e| panic!("{e}"))
    }

    /// Waits until `check` holds of `kubectl args` (tolerating failures meanwhile).
    fn until(&self, args: &[&str], timeout: Duration, what: &str, check: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.run(args, None).unwrap_or_else(|e| e);
            if check(&out) {
                return out;
            }
            assert!(Instant::now() < deadline, "{what}: after {timeout:?}, kubectl {args:?} says {out}");
            std::thread::sleep(Duration::from_millis(500));
        }
    }

    fn node_ready(&self, node: &str) -> String {
        let path = "jsonpath={.status.conditions[?(@.type==\"Ready\")].status}";
        self.run(&["get", "node", node, "-o", path], None).unwrap_or_else(|e| e)
    }
}

/// `tugboat <args>` on `host`, with the host's data dir, pod logs and node name.
fn tugboat(host: &Host, args: &[&str]) -> Command {
    let data = host.dir().join("data");
    let mut command = host.command(TUGBOAT);
    command.args(args).arg("--data-dir").arg(&data).arg("--pod-log-dir").arg(data.join("pods"));
    command.args(["--node-name", host.name()]);
    command
}

/// Inside `test`'s own namespaces: `count` hosts, the first `nodes` of them with the busybox
/// image in their data dirs. None in the outer run (which only waits for the inner one).
fn nodes(test: &str, count: usize, nodes: usize) -> Option<Hosts> {
    if !tugboat_testkit::isolated(test) {
        return None;
    }
    let hosts = Hosts::new(count).unwrap();
    for i in 0..nodes {
        tugboat_testkit::image::import_busybox(Path::new(TUGBOAT), &hosts.get(i).dir().join("data")).unwrap();
    }
    Some(hosts)
}

/// The `tugboat agent --server … --token …` line `tugboat server` printed.
fn printed_join_command(server: &Host) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = server.log("server");
        if let Some(line) = log.lines().find(|l| l.trim_start().starts_with("tugboat agent --server")) {
            return line.split_whitespace().map(str::to_string).collect();
        }
        assert!(Instant::now() < deadline, "the server printed no join command: {log}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

const SPREAD: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: spread}
spec:
  replicas: 6
  selector: {matchLabels: {app: spread}}
  template:
    metadata: {labels: {app: spread}}
    spec:
      terminationGracePeriodSeconds: 1
      topologySpreadConstraints:
      - {maxSkew: 1, topologyKey: kubernetes.io/hostname, whenUnsatisfiable: ScheduleAnyway,
         labelSelector: {matchLabels: {app: spread}}}
      containers:
      - {name: main, image: "busybox:1.35", command: [sh, -c, "sleep 3600"]}
"#;

/// Two pods on two nodes: `far` serves HTTP on host-2, `near` on host-1 asks it.
const PAIR: &str = r#"
apiVersion: v1
kind: Pod
metadata: {name: far, labels: {app: far}}
spec:
  nodeName: host-2
  terminationGracePeriodSeconds: 1
  containers:
  - {name: main, image: "busybox:1.35",
     command: [sh, -c, "mkdir -p /www && echo far > /www/index.html && echo '<a href=\"/index.html\">far</a>' > /www/links.html && exec httpd -f -p 8080 -h /www"]}
---
apiVersion: v1
kind: Pod
metadata: {name: near}
spec:
  nodeName: host-1
  terminationGracePeriodSeconds: 1
  containers:
  - {name: main, image: "busybox:1.35", command: [sleep, "3600"]}
"#;

/// (pod, node, phase, terminating) of the Deployment's pods.
fn spread_pods(kubectl: &Kubectl) -> Vec<(String, String, String, bool)> {
    let out = kubectl
        .run(&["get", "pods", "-l", "app=spread", "-o", "json"], None)
        .map(|o| serde_json::from_str::<serde_json::Value>(&o).unwrap())
        .unwrap_or_default();
    out["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["metadata"]["name"].as_str().unwrap_or_default().to_string(),
                p["spec"]["nodeName"].as_str().unwrap_or_default().to_string(),
                p["status"]["phase"].as_str().unwrap_or_default().to_string(),
                p["metadata"]["deletionTimestamp"].is_string(),
            )
        })
        .collect()
}

/// A server and two agents joined with the token it printed; pods land on every node; a wrong
/// token says so; a host whose link is cut goes NotReady and its pods are replaced on the
/// others; restored, it is Ready again and its old pods are gone.
#[test]
fn a_server_and_two_agents_run_pods_and_survive_a_cut_link() {
    let Some(mut hosts) = nodes("a_server_and_two_agents_run_pods_and_survive_a_cut_link", 3, 3) else { return };
    let server = hosts.get_mut(0);
    let command = tugboat(
        server,
        &[
            "server",
            "--node-monitor-grace-period",
            "20s",
            "--default-unreachable-toleration-seconds",
            "5",
            "--default-not-ready-toleration-seconds",
            "5",
        ],
    );
    server.spawn("server", command).unwrap();
    let join = printed_join_command(hosts.get(0));
    assert_eq!(join[3], format!("https://{}:6443", hosts.get(0).address()), "{join:?}");
    let kubectl = Kubectl {
        kubeconfig: hosts.get(0).dir().join("data/admin.kubeconfig"),
        server: join[3].clone(),
        home: hosts.get(0).dir().join("home"),
    };

    // A wrong token: the agent says what is wrong and leaves nothing behind.
    let out = tugboat(hosts.get(2), &["agent", "--server", &join[3], "--token", "abcdef.0123456789abcdef"])
        .args(["--discovery-timeout", "2s"])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && said.contains("unknown or has expired"), "{said}");
    assert!(!hosts.get(2).dir().join("data/kubelet.kubeconfig").exists());

    // The printed command, as a user would paste it on each host.
    for i in [1, 2] {
        let host = hosts.get_mut(i);
        let command = tugboat(host, &join[1..].iter().map(String::as_str).collect::<Vec<_>>());
        host.spawn("agent", command).unwrap();
    }
    for i in 0..3 {
        let name = hosts.get(i).name().to_string();
        let deadline = Instant::now() + Duration::from_secs(90);
        while kubectl.node_ready(&name) != "True" {
            assert!(
                Instant::now() < deadline,
                "{name} is not Ready ({}): {}",
                kubectl.node_ready(&name),
                hosts.get(i).log(if i == 0 { "server" } else { "agent" })
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // host-1's name is held by a live node: a second host cannot join under it.
    let other = hosts.get(2).dir().join("other");
    let out = hosts
        .get(2)
        .command(TUGBOAT)
        .args(["agent", "--server", &join[3], "--token", &join[5], "--node-name", "host-1"])
        .arg("--data-dir")
        .arg(&other)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && said.contains(r#"a node named "host-1" is already in the cluster and Ready"#),
        "{said}"
    );
    assert!(!other.join("kubelet.kubeconfig").exists());
    let internal =
        kubectl.ok(&["get", "node", "host-1", "-o", "jsonpath={.status.addresses[?(@.type==\"InternalIP\")].address}"]);
    assert_eq!(internal, hosts.get(1).address().to_string(), "the node IP is the host's");

    // Pods land on every node and run there; logs come through each node's kubelet.
    kubectl.run(&["apply", "-f", "-"], Some(SPREAD)).unwrap();
    let running = |pods: &[(String, String, String, bool)]| {
        pods.iter().filter(|(_, _, phase, terminating)| phase == "Running" && !terminating).count()
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while running(&spread_pods(&kubectl)) < 6 {
        assert!(Instant::now() < deadline, "not all running: {:?}", spread_pods(&kubectl));
        std::thread::sleep(Duration::from_millis(500));
    }
    let pods = spread_pods(&kubectl);
    for i in 0..3 {
        let name = hosts.get(i).name();
        assert!(pods.iter().any(|(_, node, _, _)| node == name), "no pod on {name}: {pods:?}");
    }
    let on_2: Vec<String> = pods.iter().filter(|p| p.1 == "host-2").map(|p| p.0.clone()).collect();
    kubectl.ok(&["exec", &on_2[0], "--", "true"]);

    // Pods reach pods on other nodes by their IPs (routes to each node's podCIDR), and what
    // they send out of the pod networks leaves with their node's address.
    kubectl.run(&["apply", "-f", "-"], Some(PAIR)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while kubectl.ok(&["get", "pods", "far", "near", "-o", "jsonpath={.items[*].status.phase}"]) != "Running Running" {
        assert!(Instant::now() < deadline, "far and near do not run");
        std::thread::sleep(Duration::from_millis(300));
    }
    let far_ip = kubectl.ok(&["get", "pod", "far", "-o", "jsonpath={.status.podIP}"]);
    let url = format!("http://{far_ip}:8080/");
    kubectl.until(
        &["exec", "near", "--", "wget", "-q", "-O", "-", &url],
        Duration::from_secs(30),
        "far from near",
        |o| o == "far\n",
    );
    // A ClusterIP Service in front of `far` (kubectl expose) reaches it from `near`'s node.
    kubectl.ok(&["expose", "pod", "far", "--port=80", "--target-port=8080"]);
    let cluster_ip = kubectl.ok(&["get", "service", "far", "-o", "jsonpath={.spec.clusterIP}"]);
    let url = format!("http://{cluster_ip}/");
    // Once near's node has the Service's rules (a connection begun before would keep its
    // un-NATed conntrack entry through its retries).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let rules = hosts.get(1).command("nft").args(["list", "table", "ip", "tugboat-proxy"]).output().unwrap();
        if String::from_utf8_lossy(&rules.stdout).contains(&format!("{cluster_ip} . tcp . 80")) {
            break;
        }
        assert!(Instant::now() < deadline, "host-1 has no rules for {cluster_ip}");
        std::thread::sleep(Duration::from_millis(200));
    }
    kubectl.until(
        &["exec", "near", "--", "wget", "-q", "-O", "-", &url],
        Duration::from_secs(30),
        "far's Service",
        |o| o == "far\n",
    );
    // The API server's proxy reaches the pod on the other node, directly and through the
    // Service (port by number and by scheme:name:port), and says why when it cannot.
    assert_eq!(kubectl.ok(&["get", "--raw", "/api/v1/namespaces/default/pods/far:8080/proxy/index.html"]), "far\n");
    // Links of an HTML page to the pod's own paths go through the proxy (upstream rewrites them).
    assert_eq!(
        kubectl.ok(&["get", "--raw", "/api/v1/namespaces/default/pods/far:8080/proxy/links.html"]),
        "<a href=\"/api/v1/namespaces/default/pods/far:8080/proxy/index.html\">far</a>\n"
    );
    assert_eq!(kubectl.ok(&["get", "--raw", "/api/v1/namespaces/default/services/far:80/proxy/"]), "far\n");
    assert_eq!(kubectl.ok(&["get", "--raw", "/api/v1/namespaces/default/services/http:far:80/proxy/"]), "far\n");
    // Without a path, GET is sent on to `…/proxy/` (kubectl follows the 301).
    assert_eq!(kubectl.ok(&["get", "--raw", "/api/v1/namespaces/default/pods/far:8080/proxy"]), "far\n");
    let refused = kubectl.run(&["get", "--raw", "/api/v1/namespaces/default/services/far:81/proxy/"], None);
    assert!(refused.is_err_and(|e| e.contains("no service port 81 found for service")), "a port the Service has not");
    let outside = std::net::TcpListener::bind("10.77.0.1:0").unwrap();
    let port = outside.local_addr().unwrap().port();
    // Accepted (and closed, so nc ends) while kubectl waits for nc; given up after 30 s.
    outside.set_nonblocking(true).unwrap();
    let seen = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok((_, peer)) = outside.accept() {
                return Some(peer.ip());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    });
    let dial = format!("echo hi | nc -w 5 10.77.0.1 {port}");
    let _ = kubectl.run(&["exec", "near", "--", "sh", "-c", &dial], None);
    let peer = seen.join().unwrap().expect("the pod's connection reaches a host outside the pod networks");
    assert_eq!(peer.to_string(), hosts.get(1).address().to_string(), "masqueraded behind the node");

    // Cut host-2 off: NotReady (Unknown) after the grace period, its pods replaced elsewhere.
    hosts.get(2).cut().unwrap();
    kubectl.until(
        &["get", "node", "host-2", "-o", "jsonpath={.spec.taints}"],
        Duration::from_secs(60),
        "unreachable",
        |t| t.contains("node.kubernetes.io/unreachable"),
    );
    assert_eq!(kubectl.node_ready("host-2"), "Unknown");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pods = spread_pods(&kubectl);
        let elsewhere = pods
            .iter()
            .filter(|(_, node, phase, terminating)| node != "host-2" && phase == "Running" && !terminating)
            .count();
        if elsewhere == 6 {
            break;
        }
        assert!(Instant::now() < deadline, "host-2's pods are not replaced: {pods:?}");
        std::thread::sleep(Duration::from_millis(500));
    }

    // Restored: Ready again, and its kubelet finishes the evicted pods.
    hosts.get(2).restore().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while kubectl.node_ready("host-2") != "True" {
        assert!(Instant::now() < deadline, "host-2 is not Ready again: {}", hosts.get(2).log("agent"));
        std::thread::sleep(Duration::from_millis(500));
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pods = spread_pods(&kubectl);
        if pods.len() == 6 && running(&pods) == 6 && !pods.iter().any(|p| on_2.contains(&p.0)) {
            break;
        }
        assert!(Instant::now() < deadline, "the evicted pods stay: {pods:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A 3-member etcd (one member per host) under two servers; an agent given both servers.
/// Killing the first server's host — its server and its etcd member — under a stream of
/// writes: the API keeps answering through the second server, no acknowledged write is lost,
/// the scheduler's and controller manager's Leases move to the survivor, and the node fails
/// over and keeps running new pods.
#[test]
fn two_servers_on_a_three_member_etcd_survive_losing_one() {
    if !tugboat_testkit::isolated("two_servers_on_a_three_member_etcd_survive_losing_one") {
        return;
    }
    let mut hosts = Hosts::new(3).unwrap();
    let peers: Vec<String> = (0..3).map(|i| format!("host-{i}=http://{}:2380", hosts.get(i).address())).collect();
    let clients: Vec<String> = (0..3).map(|i| format!("http://{}:2379", hosts.get(i).address())).collect();
    for i in 0..3 {
        let host = hosts.get_mut(i);
        let address = host.address();
        let mut etcd = host.command(tugboat_testkit::etcd_binary());
        etcd.arg(format!("--name=host-{i}"))
            .arg(format!("--data-dir={}", host.dir().join("etcd").display()))
            .arg(format!("--listen-client-urls=http://{address}:2379"))
            .arg(format!("--advertise-client-urls=http://{address}:2379"))
            .arg(format!("--listen-peer-urls=http://{address}:2380"))
            .arg(format!("--initial-advertise-peer-urls=http://{address}:2380"))
            .arg(format!("--initial-cluster={}", peers.join(",")))
            .args(["--initial-cluster-state=new", "--logger=zap", "--log-level=warn"]);
        host.spawn("etcd", etcd).unwrap();
    }
    let endpoints = clients.join(",");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let health = Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &endpoints, "endpoint", "health"])
            .output()
            .unwrap();
        if health.status.success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "etcd: {}{}",
            String::from_utf8_lossy(&health.stderr),
            hosts.get(0).log("etcd")
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // Two servers on it; the second takes the cluster's keys from the datastore.
    for i in [0, 1] {
        let host = hosts.get_mut(i);
        let command = tugboat(host, &["server", "--datastore-endpoint", &endpoints, "--disable-agent"]);
        host.spawn("server", command).unwrap();
        printed_join_command(hosts.get(i));
    }
    let pki = |i: usize, file: &str| std::fs::read(hosts.get(i).dir().join("data/pki").join(file)).unwrap();
    assert_eq!(pki(0, "ca.crt"), pki(1, "ca.crt"), "one cluster CA");
    assert_eq!(pki(0, "sa.key"), pki(1, "sa.key"), "one service-account key");
    assert_eq!(pki(0, "front-proxy/ca.crt"), pki(1, "front-proxy/ca.crt"), "one front-proxy CA");
    let servers: Vec<String> = (0..2).map(|i| format!("https://{}:6443", hosts.get(i).address())).collect();
    let dirs: Vec<PathBuf> = (0..3).map(|i| hosts.get(i).dir().to_path_buf()).collect();
    let kubectl = |i: usize| Kubectl {
        kubeconfig: dirs[i].join("data/admin.kubeconfig"),
        server: servers[i].clone(),
        home: dirs[i].join("home"),
    };
    let (first, second) = (kubectl(0), kubectl(1));
    let identity = |i: usize| std::fs::read_to_string(dirs[i].join("data/identity")).unwrap();
    let holder = |lease: &str| {
        second
            .run(&["get", "lease", lease, "-n", "kube-system", "-o", "jsonpath={.spec.holderIdentity}"], None)
            .unwrap_or_default()
    };
    let endpoints = || {
        second
            .run(&["get", "endpoints", "kubernetes", "-o", "jsonpath={.subsets[*].addresses[*].ip}"], None)
            .unwrap_or_default()
    };
    let both = format!("{} {}", hosts.get(0).address(), hosts.get(1).address());
    let deadline = Instant::now() + Duration::from_secs(30);
    while endpoints() != both {
        assert!(Instant::now() < deadline, "the kubernetes Service lists {:?}, not both servers", endpoints());
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(holder("kube-scheduler"), identity(0), "the first server leads");
    assert_eq!(holder("kube-controller-manager"), identity(0));

    // An agent given both servers.
    let token = std::fs::read_to_string(hosts.get(0).dir().join("data/token")).unwrap();
    let agent = hosts.get_mut(2);
    tugboat_testkit::image::import_busybox(Path::new(TUGBOAT), &agent.dir().join("data")).unwrap();
    let command = tugboat(agent, &["agent", "--server", &servers.join(","), "--token", token.trim()]);
    agent.spawn("agent", command).unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while first.node_ready("host-2") != "True" {
        assert!(Instant::now() < deadline, "host-2 is not Ready: {}", hosts.get(2).log("agent"));
        std::thread::sleep(Duration::from_millis(500));
    }

    // A stream of writes, each through the first server that answers.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let clients = [kubectl(0), kubectl(1)];
        std::thread::spawn(move || {
            let mut acknowledged = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let name = format!("write-{n}");
                for client in &clients {
                    match client.run(&["create", "configmap", &name, "--request-timeout=5s"], None) {
                        Ok(_) => {
                            acknowledged.push((name.clone(), Instant::now()));
                            break;
                        }
                        // A retry of a write the other server had made.
                        Err(e) if e.contains("already exists") => {
                            acknowledged.push((name.clone(), Instant::now()));
                            break;
                        }
                        Err(_) => {}
                    }
                }
                n += 1;
            }
            (n, acknowledged)
        })
    };
    std::thread::sleep(Duration::from_secs(3));
    // host-0 dies: its server and its etcd member.
    hosts.get_mut(0).kill();
    let killed = Instant::now();
    std::thread::sleep(Duration::from_secs(8));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (tried, acknowledged) = writer.join().unwrap();
    assert!(acknowledged.len() > 10, "only {} of {tried} writes went through", acknowledged.len());
    let names = second.ok(&["get", "configmaps", "-o", "name"]);
    let lost: Vec<&String> =
        acknowledged.iter().map(|(n, _)| n).filter(|n| !names.contains(&format!("configmap/{n}\n"))).collect();
    assert!(lost.is_empty(), "acknowledged but lost: {lost:?}");
    let after_kill = acknowledged.iter().filter(|(_, at)| *at > killed).count();
    assert!(after_kill > 5, "the API stopped answering: {after_kill} writes after the kill");

    // The survivor takes the Leases over and the cluster keeps working: a Deployment gets
    // pods (controller manager), they are scheduled (scheduler) and run on the agent, which
    // failed over to the second server.
    let deadline = Instant::now() + Duration::from_secs(60);
    while holder("kube-scheduler") != identity(1) || holder("kube-controller-manager") != identity(1) {
        assert!(Instant::now() < deadline, "the Leases stay with the dead server: {}", hosts.get(1).log("server"));
        std::thread::sleep(Duration::from_millis(500));
    }
    // The dead server drops out of the kubernetes Service.
    let deadline = Instant::now() + Duration::from_secs(60);
    while endpoints() != hosts.get(1).address().to_string() {
        assert!(Instant::now() < deadline, "the kubernetes Service still lists {:?}", endpoints());
        std::thread::sleep(Duration::from_millis(500));
    }
    second.ok(&["create", "deployment", "after", "--image=busybox:1.35", "--replicas=2", "--", "sleep", "3600"]);
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let phases = second.ok(&["get", "pods", "-l", "app=after", "-o", "jsonpath={.items[*].status.phase}"]);
        if phases == "Running Running" {
            break;
        }
        assert!(Instant::now() < deadline, "the new pods do not run: {phases:?}; agent: {}", hosts.get(2).log("agent"));
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(second.node_ready("host-2"), "True");
}

/// The users' example: `db` on one node, `web` on another, reached by name.
const DB: &str = r#"
apiVersion: apps/v1
kind: Deployment
metadata: {name: db}
spec:
  replicas: 1
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}}
    spec:
      nodeSelector: {kubernetes.io/hostname: host-2}
      terminationGracePeriodSeconds: 8
      containers:
      - name: main
        image: "busybox:1.35"
        command: [sh, -c, "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"]
        readinessProbe: {httpGet: {path: /, port: 8080}, periodSeconds: 1}
---
apiVersion: v1
kind: Service
metadata: {name: db}
spec:
  type: NodePort
  selector: {app: db}
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: v1
kind: Pod
metadata: {name: web}
spec:
  nodeName: host-1
  terminationGracePeriodSeconds: 1
  containers:
  - {name: main, image: "busybox:1.35", command: [sleep, "3600"]}
"#;

/// (name, IP) of the ready `db` endpoints.
fn db_endpoints(kubectl: &Kubectl) -> Vec<(String, String)> {
    let out = kubectl.run(&["get", "endpoints", "db", "-o", "json"], None).unwrap_or_default();
    let value: serde_json::Value = serde_json::from_str(&out).unwrap_or_default();
    let mut ready = Vec::new();
    for subset in value["subsets"].as_array().into_iter().flatten() {
        for address in subset["addresses"].as_array().into_iter().flatten() {
            let name = address["targetRef"]["name"].as_str().unwrap_or_default().to_string();
            ready.push((name, address["ip"].as_str().unwrap_or_default().to_string()));
        }
    }
    ready.sort();
    ready
}

/// Whether every host's proxy has programmed exactly `ips` for db (port 8080): hosts 0 and 2
/// in nftables mode, host 1 in iptables mode.
fn proxies_agree(hosts: &Hosts, ips: &[String]) -> bool {
    (0..3).all(|i| {
        let (program, args, dnat): (&str, &[&str], &str) = if i == 1 {
            ("iptables-save", &["-t", "nat"], "-j DNAT --to-destination ")
        } else {
            ("nft", &["list", "chain", "ip", "tugboat-proxy", "svc-default/db/tcp/80"], "dnat to ")
        };
        let out = hosts.get(i).command(program).args(args).output();
        let text = out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default();
        let programmed = text.lines().filter(|l| l.contains(dnat) && l.contains(":8080")).count();
        programmed == ips.len() && ips.iter().all(|ip| text.contains(&format!("{dnat}{ip}:8080")))
    })
}

/// `busybox wget` of `url` from `host` (outside the cluster): the body, or why not.
fn fetch_from(host: &Host, url: &str) -> Result<String, String> {
    let out = host.command("busybox").args(["wget", "-q", "-O", "-", url]).output().unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// A web pod on one node reaches a db Deployment on another by the Service's name, by its
/// ClusterIP and, from a host outside the cluster, by its NodePort on any node; requests spread
/// over every replica; a pod being deleted gets none once it is not ready; a pod reaches its
/// own Service; cluster DNS answers with the search path pods are given.
#[test]
fn services_reach_pods_by_name_across_nodes() {
    let Some(mut hosts) = nodes("services_reach_pods_by_name_across_nodes", 4, 3) else { return };
    let command = tugboat(hosts.get(0), &["server"]);
    hosts.get_mut(0).spawn("server", command).unwrap();
    let join = printed_join_command(hosts.get(0));
    let kubectl = Kubectl {
        kubeconfig: hosts.get(0).dir().join("data/admin.kubeconfig"),
        server: join[3].clone(),
        home: hosts.get(0).dir().join("home"),
    };
    for i in [1, 2] {
        let host = hosts.get_mut(i);
        let mut command = tugboat(host, &join[1..].iter().map(String::as_str).collect::<Vec<_>>());
        if i == 1 {
            // One node in the proxy's other mode: both route the same cluster.
            command.args(["--proxy-mode", "iptables"]);
        }
        host.spawn("agent", command).unwrap();
    }
    for i in 0..3 {
        let name = hosts.get(i).name().to_string();
        kubectl.until(&["get", "node", &name, "-o", "name"], Duration::from_secs(90), "node", |o| o.contains(&name));
        let deadline = Instant::now() + Duration::from_secs(90);
        while kubectl.node_ready(&name) != "True" {
            assert!(Instant::now() < deadline, "{name} is not Ready");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // The cluster DNS is published as kube-dns at 10.96.0.10, served from the server's host.
    kubectl.until(
        &["get", "endpoints", "kube-dns", "-n", "kube-system", "-o", "jsonpath={.subsets[0].addresses[*].ip}"],
        Duration::from_secs(30),
        "kube-dns endpoints",
        |o| o == hosts.get(0).address().to_string(),
    );
    assert_eq!(
        kubectl.ok(&["get", "service", "kube-dns", "-n", "kube-system", "-o", "jsonpath={.spec.clusterIP}"]),
        "10.96.0.10"
    );

    kubectl.run(&["apply", "-f", "-"], Some(DB)).unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while db_endpoints(&kubectl).len() != 1
        || kubectl.ok(&["get", "pod", "web", "-o", "jsonpath={.status.phase}"]) != "Running"
    {
        assert!(Instant::now() < deadline, "db and web do not run: {}", kubectl.ok(&["get", "pods", "-o", "wide"]));
        std::thread::sleep(Duration::from_millis(300));
    }
    let first = db_endpoints(&kubectl);
    let (db_pod, db_ip) = first[0].clone();
    assert_eq!(kubectl.ok(&["get", "pod", &db_pod, "-o", "jsonpath={.spec.nodeName}"]), "host-2");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !proxies_agree(&hosts, std::slice::from_ref(&db_ip)) {
        assert!(Instant::now() < deadline, "the proxies do not route db to {db_ip}");
        std::thread::sleep(Duration::from_millis(100));
    }

    // The pod's resolver: the cluster DNS, upstream's search path, ndots:5.
    let resolv = kubectl.ok(&["exec", "web", "--", "cat", "/etc/resolv.conf"]);
    assert!(resolv.contains("nameserver 10.96.0.10\n"), "{resolv}");
    assert!(resolv.contains("search default.svc.cluster.local svc.cluster.local cluster.local"), "{resolv}");
    assert!(resolv.contains("options ndots:5"), "{resolv}");
    // By name (through the search path), by full name, by ClusterIP.
    let cluster_ip = kubectl.ok(&["get", "service", "db", "-o", "jsonpath={.spec.clusterIP}"]);
    for url in ["http://db/", "http://db.default.svc.cluster.local/", &format!("http://{cluster_ip}/")] {
        kubectl.until(&["exec", "web", "--", "wget", "-q", "-O", "-", url], Duration::from_secs(30), url, |o| {
            o.trim() == db_pod
        });
    }
    let lookup = kubectl.ok(&["exec", "web", "--", "nslookup", "db.default.svc.cluster.local"]);
    assert!(lookup.contains(&cluster_ip), "{lookup}");
    let srv = kubectl.ok(&["exec", "web", "--", "nslookup", "-type=srv", "_http._tcp.db.default.svc.cluster.local"]);
    assert!(srv.contains("0 100 80 db.default.svc.cluster.local"), "{srv}");
    let pod_name = format!("{}.default.pod.cluster.local", db_ip.replace('.', "-"));
    assert!(kubectl.ok(&["exec", "web", "--", "nslookup", &pod_name]).contains(&db_ip));
    let missing = kubectl.run(&["exec", "web", "--", "nslookup", "nope.default.svc.cluster.local"], None);
    assert!(missing.as_ref().is_err_and(|e| e.contains("exit code 1")), "not found: {missing:?}");

    // A headless Service: its name is its ready pods, each pod by its hostname, whose
    // /etc/hosts names it so too.
    let headless = r#"
apiVersion: v1
kind: Service
metadata: {name: peers}
spec: {clusterIP: None, selector: {app: peer}, ports: [{name: gossip, port: 7000}]}
---
apiVersion: v1
kind: Pod
metadata: {name: peer-0, labels: {app: peer}}
spec:
  hostname: peer-0
  subdomain: peers
  nodeName: host-2
  terminationGracePeriodSeconds: 1
  containers:
  - {name: main, image: "busybox:1.35", command: [sleep, "3600"]}
"#;
    kubectl.run(&["apply", "-f", "-"], Some(headless)).unwrap();
    let peer_ip = kubectl.until(
        &["get", "pod", "peer-0", "-o", "jsonpath={.status.podIP}"],
        Duration::from_secs(60),
        "peer-0's IP",
        |o| !o.is_empty() && !o.contains("kubectl"),
    );
    for name in ["peers.default.svc.cluster.local", "peer-0.peers.default.svc.cluster.local"] {
        kubectl
            .until(&["exec", "web", "--", "nslookup", name], Duration::from_secs(30), name, |o| o.contains(&peer_ip));
    }
    let etc_hosts = kubectl.ok(&["exec", "peer-0", "--", "cat", "/etc/hosts"]);
    assert!(etc_hosts.contains(&format!("{peer_ip}\tpeer-0.peers.default.svc.cluster.local\tpeer-0")), "{etc_hosts}");

    // A pod reaching its own Service (hairpin).
    kubectl.until(
        &["exec", &db_pod, "--", "wget", "-q", "-O", "-", "http://db/"],
        Duration::from_secs(10),
        "hairpin",
        |o| o.trim() == db_pod,
    );

    // NodePort from a host outside the cluster, on every node's address (host-0 and host-1
    // have no db pod: the traffic is forwarded and masqueraded).
    for i in 0..3 {
        let url = format!("http://{}:30080/", hosts.get(i).address());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = fetch_from(hosts.get(3), &url);
            if got.as_deref() == Ok(db_pod.as_str()) {
                break;
            }
            assert!(Instant::now() < deadline, "NodePort {url}: {got:?}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    // `type: LoadBalancer` without a cloud: the built-in service load balancer gives it the
    // nodes' addresses (EXTERNAL-IP), and each serves the Service's own port from outside.
    kubectl.ok(&[
        "expose",
        "deployment",
        "db",
        "--name=db-lb",
        "--type=LoadBalancer",
        "--port=8081",
        "--target-port=8080",
    ]);
    let external = kubectl.until(
        &["get", "service", "db-lb", "-o", "jsonpath={.status.loadBalancer.ingress[*].ip}"],
        Duration::from_secs(30),
        "db-lb's external IPs",
        |o| o.split_whitespace().count() == 3,
    );
    let table = kubectl.ok(&["get", "service", "db-lb"]);
    assert!(table.contains(&hosts.get(1).address().to_string()), "EXTERNAL-IP: {table}");
    for ip in external.split_whitespace() {
        let url = format!("http://{ip}:8081/");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let got = fetch_from(hosts.get(3), &url);
            if got.as_deref() == Ok(db_pod.as_str()) {
                break;
            }
            assert!(Instant::now() < deadline, "LoadBalancer {url}: {got:?}");
            std::thread::sleep(Duration::from_millis(300));
        }
    }
    kubectl.ok(&["delete", "service", "db-lb"]);

    // Host ports: a pod's hostPort is its node's port, from outside the cluster and from
    // the node itself (127.0.0.1); one bound to a hostIP answers on that address only.
    let host_ported = r#"
apiVersion: v1
kind: Pod
metadata: {name: ported}
spec:
  nodeName: host-1
  terminationGracePeriodSeconds: 1
  containers:
  - name: main
    image: "busybox:1.35"
    command: [sh, -c, "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"]
    ports: [{containerPort: 8080, hostPort: 31999}, {containerPort: 8080, hostPort: 31998, hostIP: 127.0.0.1}]
"#;
    kubectl.run(&["apply", "-f", "-"], Some(host_ported)).unwrap();
    let url = format!("http://{}:31999/", hosts.get(1).address());
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let got = fetch_from(hosts.get(3), &url);
        if got.as_deref() == Ok("ported") {
            break;
        }
        assert!(Instant::now() < deadline, "host port {url}: {got:?}");
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(fetch_from(hosts.get(1), "http://127.0.0.1:31999/").as_deref(), Ok("ported"));
    assert_eq!(fetch_from(hosts.get(1), "http://127.0.0.1:31998/").as_deref(), Ok("ported"));
    let bound_elsewhere = format!("http://{}:31998/", hosts.get(1).address());
    assert!(fetch_from(hosts.get(3), &bound_elsewhere).is_err(), "a port bound to 127.0.0.1 answers outside");
    kubectl.ok(&["delete", "pod", "ported"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while fetch_from(hosts.get(3), &url).is_ok() {
        assert!(Instant::now() < deadline, "host port {url} stays after its pod went");
        std::thread::sleep(Duration::from_millis(300));
    }

    // Three replicas: requests spread over all of them.
    kubectl.ok(&["scale", "deployment", "db", "--replicas=3"]);
    let deadline = Instant::now() + Duration::from_secs(60);
    while db_endpoints(&kubectl).len() != 3 {
        assert!(Instant::now() < deadline, "db has not 3 ready endpoints: {:?}", db_endpoints(&kubectl));
        std::thread::sleep(Duration::from_millis(300));
    }
    let three = db_endpoints(&kubectl);
    let ips: Vec<String> = three.iter().map(|(_, ip)| ip.clone()).collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !proxies_agree(&hosts, &ips) {
        assert!(Instant::now() < deadline, "the proxies do not route db to {ips:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let many = "for i in $(seq 40); do wget -q -O - http://db/; done";
    let answers = kubectl.ok(&["exec", "web", "--", "sh", "-c", many]);
    let seen: std::collections::BTreeSet<&str> = answers.lines().collect();
    let names: std::collections::BTreeSet<&str> = three.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(seen, names, "40 requests over 3 replicas: {answers}");

    // A pod being deleted (it keeps serving through its grace period) gets no request once it
    // is not ready; every node's rules follow the change.
    let (victim, victim_ip) = three[0].clone();
    let deleted = Instant::now();
    kubectl.ok(&["delete", "pod", &victim, "--wait=false"]);
    let remaining: Vec<String> = ips.iter().filter(|ip| **ip != victim_ip).cloned().collect();
    while !proxies_agree(&hosts, &remaining) {
        assert!(deleted.elapsed() < Duration::from_secs(20), "the proxies still route to {victim_ip}");
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("delete → every node's rules without the pod: {:?}", deleted.elapsed());
    let answers = kubectl.ok(&["exec", "web", "--", "sh", "-c", many]);
    assert!(!answers.contains(&victim), "a request reached {victim} while it was terminating: {answers}");
    assert!(answers.lines().count() == 40, "{answers}");
    assert!(
        kubectl.run(&["get", "pod", &victim], None).is_ok_and(|o| o.contains("Terminating")),
        "the check ran while the pod was still terminating"
    );
    // The proxy reports how long changes took to program.
    let metrics = hosts
        .get(1)
        .command("busybox")
        .args(["wget", "-q", "-O", "-", "http://127.0.0.1:10249/metrics"])
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    let count = metrics
        .lines()
        .find_map(|l| l.strip_prefix("tugboat_proxy_network_programming_duration_seconds_count "))
        .and_then(|c| c.trim().parse::<u64>().ok());
    assert!(count.is_some_and(|c| c >= 3), "{metrics}");

    // sessionAffinity ClientIP: every request of a client goes to one pod.
    kubectl.ok(&["patch", "service", "db", "-p", r#"{"spec":{"sessionAffinity":"ClientIP"}}"#]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let table = hosts.get(1).command("iptables-save").args(["-t", "nat"]).output().unwrap();
        if String::from_utf8_lossy(&table.stdout).contains("--rcheck --seconds 10800") {
            break;
        }
        assert!(Instant::now() < deadline, "no affinity rules on host-1");
        std::thread::sleep(Duration::from_millis(100));
    }
    let answers =
        kubectl.ok(&["exec", "web", "--", "sh", "-c", "for i in $(seq 20); do wget -q -O - http://db/; done"]);
    let seen: std::collections::BTreeSet<&str> = answers.lines().collect();
    assert_eq!((seen.len(), answers.lines().count()), (1, 20), "one pod for one client: {answers}");

    // externalTrafficPolicy Local: a NodePort answers only on nodes with a db pod (host-2),
    // and is refused on the others (host-1, in iptables mode).
    kubectl.ok(&[
        "patch",
        "service",
        "db",
        "-p",
        r#"{"spec":{"externalTrafficPolicy":"Local","sessionAffinity":"None"}}"#,
    ]);
    let url_1 = format!("http://{}:30080/", hosts.get(1).address());
    let deadline = Instant::now() + Duration::from_secs(20);
    while fetch_from(hosts.get(3), &url_1).is_ok() {
        assert!(Instant::now() < deadline, "host-1 still forwards NodePort traffic elsewhere");
        std::thread::sleep(Duration::from_millis(200));
    }
    let url_2 = format!("http://{}:30080/", hosts.get(2).address());
    let got = fetch_from(hosts.get(3), &url_2);
    assert!(got.as_ref().is_ok_and(|name| db_endpoints(&kubectl).iter().any(|(n, _)| n == name)), "{got:?}");

    // The proxy's rules go cleanly: `tugboat proxy --cleanup` on host-1 (iptables) after its
    // agent has stopped.
    hosts.get_mut(1).kill();
    let out = hosts.get(1).command(TUGBOAT).args(["proxy", "--cleanup", "--kubeconfig", "/dev/null"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let saved = hosts.get(1).command("iptables-save").output().unwrap();
    assert!(!String::from_utf8_lossy(&saved.stdout).contains("TUGBOAT"), "{}", String::from_utf8_lossy(&saved.stdout));
}

/// Pods of the NetworkPolicy test: `db` (host-1) and `probe` (namespace ops, host-0) serve
/// their name on 8080; `web` and `other` (host-0) and `local` (host-1) ask.
const POLICY_PODS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: ops, labels: {team: ops}}
---
apiVersion: v1
kind: Pod
metadata: {name: db, labels: {app: db}}
spec:
  nodeName: host-1
  terminationGracePeriodSeconds: 1
  containers:
  - {name: main, image: "busybox:1.35", ports: [{name: http, containerPort: 8080}],
     command: [sh, -c, "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"]}
---
apiVersion: v1
kind: Pod
metadata: {name: probe, namespace: ops, labels: {app: probe}}
spec:
  nodeName: host-0
  terminationGracePeriodSeconds: 1
  containers:
  - {name: main, image: "busybox:1.35",
     command: [sh, -c, "mkdir -p /www && hostname > /www/index.html && exec httpd -f -p 8080 -h /www"]}
---
apiVersion: v1
kind: Pod
metadata: {name: web, labels: {app: web}}
spec:
  nodeName: host-0
  terminationGracePeriodSeconds: 1
  containers:
  - {name: main, image: "busybox:1.35", command: [sleep, "3600"]}
---
apiVersion: v1
kind: Pod
metadata: {name: other, labels: {app: other}}
spec:
  nodeName: host-0
  terminationGracePeriodSeconds: 1
  containers:
  - {name: main, image: "busybox:1.35", command: [sleep, "3600"]}
---
apiVersion: v1
kind: Pod
metadata: {name: local, labels: {app: other}}
spec:
  nodeName: host-1
  terminationGracePeriodSeconds: 1
  containers:
  - {name: main, image: "busybox:1.35", command: [sleep, "3600"]}
"#;

/// db takes HTTP only from app=web pods and from namespaces labelled team=ops, on its named
/// port; web may only reach db.
const POLICIES: &str = r#"
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-web}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
  - from: [{podSelector: {matchLabels: {app: web}}}, {namespaceSelector: {matchLabels: {team: ops}}}]
    ports: [{port: http}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-to-db-only}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
  - to: [{podSelector: {matchLabels: {app: db}}}]
    ports: [{protocol: TCP, port: 8080}]
"#;

/// NetworkPolicies, with the real kubectl on two nodes: once a policy selects db, only what it
/// allows reaches db — across nodes and on db's own node; an egress policy keeps web to db; a
/// namespace selector lets another namespace's pod in; deleting the policies opens all again.
#[test]
fn network_policies_decide_who_reaches_a_pod() {
    let Some(mut hosts) = nodes("network_policies_decide_who_reaches_a_pod", 2, 2) else { return };
    let command = tugboat(hosts.get(0), &["server"]);
    hosts.get_mut(0).spawn("server", command).unwrap();
    let join = printed_join_command(hosts.get(0));
    let kubectl = Kubectl {
        kubeconfig: hosts.get(0).dir().join("data/admin.kubeconfig"),
        server: join[3].clone(),
        home: hosts.get(0).dir().join("home"),
    };
    let host = hosts.get_mut(1);
    let command = tugboat(host, &join[1..].iter().map(String::as_str).collect::<Vec<_>>());
    host.spawn("agent", command).unwrap();
    for name in ["host-0", "host-1"] {
        let deadline = Instant::now() + Duration::from_secs(90);
        while kubectl.node_ready(name) != "True" {
            assert!(Instant::now() < deadline, "{name} is not Ready");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    kubectl.run(&["apply", "-f", "-"], Some(POLICY_PODS)).unwrap();
    let running = |ns: &str, pod: &str| {
        kubectl.until(
            &["get", "pod", "-n", ns, pod, "-o", "jsonpath={.status.phase}"],
            Duration::from_secs(90),
            pod,
            |o| o == "Running",
        );
        kubectl.ok(&["get", "pod", "-n", ns, pod, "-o", "jsonpath={.status.podIP}"])
    };
    let db = running("default", "db");
    let probe = running("ops", "probe");
    for pod in ["web", "other", "local"] {
        running("default", pod);
    }
    // From `pod` (in `ns`) to `ip`:8080: the name served, or an error (timed out or refused).
    let ask = |ns: &str, pod: &str, ip: &str| -> Result<String, String> {
        let url = format!("http://{ip}:8080/");
        kubectl
            .run(&["exec", "-n", ns, pod, "--", "timeout", "3", "wget", "-q", "-O", "-", &url], None)
            .map(|o| o.trim().to_string())
    };
    // No policy: everyone reaches everyone.
    for (ns, pod) in [("default", "web"), ("default", "other"), ("default", "local"), ("ops", "probe")] {
        let deadline = Instant::now() + Duration::from_secs(30);
        while ask(ns, pod, &db).as_deref() != Ok("db") {
            assert!(Instant::now() < deadline, "{pod} does not reach db: {:?}", ask(ns, pod, &db));
        }
    }
    assert_eq!(ask("default", "web", &probe).as_deref(), Ok("probe"));

    kubectl.run(&["apply", "-f", "-"], Some(POLICIES)).unwrap();
    let listed = kubectl.ok(&["get", "networkpolicies"]);
    assert!(listed.contains("db-from-web") && listed.contains("app=db"), "{listed}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while ask("default", "other", &db).is_ok() {
        assert!(Instant::now() < deadline, "other still reaches db");
    }
    assert!(ask("default", "local", &db).is_err(), "db's own node: local is not app=web");
    assert_eq!(ask("default", "web", &db).as_deref(), Ok("db"), "web is let in (its egress allows db)");
    assert_eq!(ask("ops", "probe", &db).as_deref(), Ok("db"), "ops is let in by its namespace");
    // (web's egress is host-0's table: it may be written a moment after host-1's.)
    let deadline = Instant::now() + Duration::from_secs(30);
    while ask("default", "web", &probe).is_ok() {
        assert!(Instant::now() < deadline, "web's egress should allow db only");
    }
    assert_eq!(ask("default", "other", &probe).as_deref(), Ok("probe"), "probe is not isolated");

    kubectl.ok(&["delete", "networkpolicy", "db-from-web", "web-to-db-only"]);
    let deadline = Instant::now() + Duration::from_secs(30);
    while ask("default", "other", &db).as_deref() != Ok("db") {
        assert!(Instant::now() < deadline, "other still cannot reach db");
    }
    while ask("default", "web", &probe).as_deref() != Ok("probe") {
        assert!(Instant::now() < deadline, "web still cannot reach probe");
    }
}
