//! `tugboat snapshot save|restore` and scheduled snapshots: save while the server runs, wipe,
//! restore onto an empty data dir, and the same cluster comes back.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use tugboat_testkit::TugboatServer;

const TUGBOAT: &str = env!("CARGO_BIN_EXE_tugboat");

fn snapshot(args: &[&str]) -> (bool, String) {
    let out = Command::new(TUGBOAT).arg("snapshot").args(args).output().unwrap();
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

const OBJECTS: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: shop}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: settings, namespace: shop}
data: {color: blue}
---
apiVersion: v1
kind: Secret
metadata: {name: password, namespace: shop}
stringData: {password: hunter2}
---
apiVersion: v1
kind: ServiceAccount
metadata: {name: robot, namespace: shop}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: "busybox:1.35"}]
"#;

#[test]
fn a_snapshot_restored_onto_an_empty_data_dir_brings_the_cluster_back() {
    let server =
        TugboatServer::start(Path::new(TUGBOAT), &["--snapshot-interval", "1s", "--snapshot-retention", "2"]).unwrap();
    server.kubectl(&["apply", "-f", "-"], Some(OBJECTS));
    let token = server.kubectl(&["create", "token", "robot", "-n", "shop", "--duration=1h"], None).trim().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.kubectl(&["get", "rs", "-n", "shop", "-o", "name"], None).is_empty() {
        assert!(Instant::now() < deadline, "no ReplicaSet");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Saved while the server runs.
    let file = server.scratch("backup").join("cluster.db");
    let data = server.data_dir();
    let (ok, said) = snapshot(&["save", file.to_str().unwrap(), "--data-dir", data.to_str().unwrap()]);
    assert!(ok && said.contains("snapshot saved: revision"), "{said}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).unwrap().permissions().mode() & 0o777, 0o600);
    server.kubectl(&["create", "configmap", "later", "-n", "shop"], None);

    // Restoring under a running server is refused, and changes nothing.
    let (ok, said) = snapshot(&["restore", file.to_str().unwrap(), "--data-dir", data.to_str().unwrap()]);
    assert!(!ok && said.contains("in use: stop the server"), "{said}");
    assert!(server.kubectl(&["get", "configmap", "later", "-n", "shop"], None).contains("later"));

    // Scheduled snapshots: one a second, the newest two kept.
    let scheduled = data.join("snapshots");
    let count = || std::fs::read_dir(&scheduled).map(|d| d.count()).unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(20);
    while count() < 2 {
        assert!(Instant::now() < deadline, "no scheduled snapshots");
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(3));
    // A snapshot being written is a third file until the oldest is pruned right after it.
    let deadline = Instant::now() + Duration::from_secs(5);
    while count() != 2 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(count(), 2, "retention keeps two");

    // Bad files are refused with the reason, before anything changes.
    let junk = server.scratch("backup").join("junk.db");
    std::fs::write(&junk, b"not a snapshot at all").unwrap();
    let empty = server.scratch("empty");
    let (ok, said) = snapshot(&["restore", junk.to_str().unwrap(), "--data-dir", empty.to_str().unwrap()]);
    assert!(!ok && said.contains("cannot restore"), "{said}");
    assert!(!empty.join("db/state.db").exists());

    // The old machine is gone: restore onto an empty data dir and start a server there.
    let kept = tempfile::tempdir().unwrap();
    let kept_kubeconfig = kept.path().join("admin.kubeconfig");
    std::fs::copy(server.kubeconfig(), &kept_kubeconfig).unwrap();
    let backup = kept.path().join("cluster.db");
    std::fs::copy(&file, &backup).unwrap();
    drop(server);
    let restored = TugboatServer::start_prepared(Path::new(TUGBOAT), &[], |data| {
        let (ok, said) = snapshot(&["restore", backup.to_str().unwrap(), "--data-dir", data.to_str().unwrap()]);
        anyhow::ensure!(ok && said.contains("restored revision"), "{said}");
        Ok(())
    })
    .unwrap();

    // Every object is back (and what came after the snapshot is not).
    assert_eq!(
        restored.kubectl(&["get", "configmap", "settings", "-n", "shop", "-o", "jsonpath={.data.color}"], None),
        "blue"
    );
    let password =
        restored.kubectl(&["get", "secret", "password", "-n", "shop", "-o", "jsonpath={.data.password}"], None);
    assert_eq!(password, "aHVudGVyMg==");
    assert!(restored.kubectl(&["get", "deployment", "web", "-n", "shop"], None).contains("web"));
    assert!(!restored.kubectl(&["get", "configmaps", "-n", "shop", "-o", "name"], None).contains("later"));

    // The same cluster: its CA (the old admin kubeconfig works) and its service-account key
    // (a token made before the snapshot authenticates).
    let old_admin = Command::new("/usr/bin/kubectl")
        .args(["--server", &restored.url(), "get", "namespace", "shop", "-o", "name"])
        .env("KUBECONFIG", &kept_kubeconfig)
        .env("HOME", restored.scratch("home"))
        .output()
        .unwrap();
    assert!(old_admin.status.success(), "{}", String::from_utf8_lossy(&old_admin.stderr));
    let review = r#"{"apiVersion":"authentication.k8s.io/v1","kind":"SelfSubjectReview"}"#;
    let whoami = Command::new("curl")
        .args(["-sS", "-X", "POST", "-H", "Content-Type: application/json", "-d", review])
        .args(["-H", &format!("Authorization: Bearer {token}")])
        .arg("--cacert")
        .arg(restored.data_dir().join("pki/ca.crt"))
        .arg(format!("{}/apis/authentication.k8s.io/v1/selfsubjectreviews", restored.url()))
        .output()
        .unwrap();
    let whoami: serde_json::Value = serde_json::from_slice(&whoami.stdout).unwrap();
    assert_eq!(whoami["status"]["userInfo"]["username"], "system:serviceaccount:shop:robot", "{whoami}");

    // The cluster resumes: controllers act on the restored objects.
    restored.kubectl(&["scale", "deployment", "web", "-n", "shop", "--replicas=3"], None);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let pods = restored.kubectl(&["get", "pods", "-n", "shop", "-l", "app=web", "-o", "name"], None);
        if pods.lines().count() == 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the Deployment does not scale: {pods}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// On etcd, `snapshot save --datastore-endpoint` takes etcd's own snapshot (etcdctl reads
/// it); `snapshot restore` takes it into the embedded store of an empty data dir, and a server
/// started there is the same cluster with the same objects.
#[test]
fn etcd_snapshots_restore_into_the_embedded_store() {
    let etcd = tugboat_testkit::EtcdServer::start().unwrap();
    let server = TugboatServer::start(Path::new(TUGBOAT), &["--datastore-endpoint", etcd.client_url()]).unwrap();
    server.kubectl(&["apply", "-f", "-"], Some(OBJECTS));
    server.kubectl(&["create", "configmap", "gone", "--from-literal=a=b"], None);
    server.kubectl(&["delete", "configmap", "gone"], None);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("etcd.db");
    let (ok, said) = snapshot(&["save", file.to_str().unwrap(), "--datastore-endpoint", etcd.client_url()]);
    assert!(ok && said.contains("snapshot saved"), "{said}");
    let status = Command::new("etcdctl")
        .args(["snapshot", "status", file.to_str().unwrap(), "-w", "json"])
        .env("ETCDCTL_API", "3")
        .output()
        .unwrap();
    assert!(status.status.success(), "etcdctl reads it: {}", String::from_utf8_lossy(&status.stderr));
    let ca = std::fs::read(server.data_dir().join("pki/ca.crt")).unwrap();
    drop(server);
    drop(etcd);

    let restored = TugboatServer::start_prepared(Path::new(TUGBOAT), &[], |data| {
        let (ok, said) = snapshot(&["restore", file.to_str().unwrap(), "--data-dir", data.to_str().unwrap()]);
        anyhow::ensure!(ok && said.contains("restored revision"), "{said}");
        Ok(())
    })
    .unwrap();
    assert_eq!(std::fs::read(restored.data_dir().join("pki/ca.crt")).unwrap(), ca, "the same cluster CA");
    let color = restored.kubectl(&["get", "configmap", "settings", "-n", "shop", "-o", "jsonpath={.data.color}"], None);
    assert_eq!(color, "blue");
    assert!(restored.kubectl(&["get", "deployment", "web", "-n", "shop"], None).contains("web"));
    let names = restored.kubectl(&["get", "configmaps", "-o", "name"], None);
    assert!(!names.contains("configmap/gone"), "deleted before the snapshot: {names}");

    // A truncated etcd snapshot is refused with the reason; nothing is written.
    let bytes = std::fs::read(&file).unwrap();
    let cut = dir.path().join("cut.db");
    std::fs::write(&cut, &bytes[..8192.min(bytes.len())]).unwrap();
    let empty = dir.path().join("empty");
    let (ok, said) = snapshot(&["restore", cut.to_str().unwrap(), "--data-dir", empty.to_str().unwrap()]);
    assert!(!ok && said.contains("cannot restore"), "{said}");
    assert!(!empty.join("db/state.db").exists());
}
