//! The built-in runtime end to end: an image archive imported into the store, containers run
//! by `tugboat shim` with libcontainer (real namespaces, cgroups, overlayfs), their output in
//! CRI log files, exit codes recorded, and the shim outliving whoever started it.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use tugboat_runtime::images::ImageStore;
use tugboat_runtime::spec::{ContainerConfig, Resources};
use tugboat_runtime::{Builtin, Runtime, State};

const TUGBOAT: &str = env!("CARGO_BIN_EXE_tugboat");

fn store(dir: &Path) -> ImageStore {
    let archive = dir.join("busybox.tar");
    tugboat_testkit::image::busybox_archive(&archive).unwrap();
    let out = std::process::Command::new(TUGBOAT)
        .args(["images", "import"])
        .arg(&archive)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "imported busybox:1.35");
    // A corrupt archive is refused with the reason, and changes nothing.
    let corrupt = dir.join("corrupt.tar");
    std::fs::write(&corrupt, b"not an image").unwrap();
    let out = std::process::Command::new(TUGBOAT)
        .args(["images", "import"])
        .arg(&corrupt)
        .arg("--data-dir")
        .arg(dir)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad image archive"), "{stderr}");
    ImageStore::open(dir.join("content")).unwrap()
}

fn config(dir: &Path, store: &ImageStore, id: &str, script: &str) -> ContainerConfig {
    let (name, image) = store.get("busybox:1.35").expect("imported");
    let mut labels = BTreeMap::new();
    labels.insert("test".to_string(), "runtime".to_string());
    ContainerConfig {
        id: id.to_string(),
        labels,
        image: name,
        image_id: image.manifest.clone(),
        layers: store.layer_dirs(&image),
        args: vec!["sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin".into(), "GREETING=hello".into()],
        hostname: "box".into(),
        cgroups_path: format!("/tugboat-test/{}/{id}", std::process::id()),
        log_path: dir.join("logs").join(format!("{id}.log")),
        ..ContainerConfig::default()
    }
}

async fn wait_exit(runtime: &Builtin, id: &str, timeout: Duration) -> tugboat_runtime::Exited {
    let deadline = Instant::now() + timeout;
    loop {
        let list = runtime.list().await.unwrap();
        let c = list.iter().find(|c| c.id() == id).expect("listed");
        if let State::Exited(e) = &c.state {
            return e.clone();
        }
        assert!(Instant::now() < deadline, "{id} still {:?}", c.state);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn containers_run_log_exit_and_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let runtime = Builtin::new(dir.path().join("containers"), TUGBOAT).unwrap();
    assert!(runtime.version().starts_with("tugboat://"));

    // Output goes to the CRI log; the exit code is recorded.
    let c = config(dir.path(), &store, "hello", "echo $GREETING from $(hostname); echo oops >&2; exit 3");
    let log = c.log_path.clone();
    let started = runtime.create_and_start(c).await.unwrap();
    assert!(started.started.is_some());
    let exited = wait_exit(&runtime, "hello", Duration::from_secs(10)).await;
    assert_eq!((exited.exit_code, exited.reason.as_str()), (3, "Error"));
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let stdout = lines.iter().find(|l| l.contains(" stdout ")).unwrap();
    assert!(stdout.ends_with(" stdout F hello from box"), "{stdout}");
    assert!(lines.iter().any(|l| l.ends_with(" stderr F oops")), "{text}");

    // A long-running one: signalled, it ends with 128 + the signal.
    let c = config(dir.path(), &store, "sleeper", "trap 'exit 0' TERM; echo ready; while true; do sleep 0.1; done");
    let log = c.log_path.clone();
    runtime.create_and_start(c).await.unwrap();
    // (A signal sent before the trap is set is ignored: the shell is its pid namespace's init.)
    let deadline = Instant::now() + Duration::from_secs(10);
    while !std::fs::read_to_string(&log).unwrap_or_default().contains("ready") {
        assert!(Instant::now() < deadline, "the sleeper never got ready");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let list = runtime.list().await.unwrap();
    assert_eq!(list.iter().find(|c| c.id() == "sleeper").unwrap().state, State::Running);
    runtime.signal("sleeper", 15).await.unwrap();
    let exited = wait_exit(&runtime, "sleeper", Duration::from_secs(10)).await;
    assert_eq!(exited.exit_code, 0, "{exited:?}");

    // A memory limit is a cgroup limit: going over it is an OOM kill.
    let mut c = config(dir.path(), &store, "hog", "x=$(head -c 64000000 /dev/zero | tr '\\0' a); echo survived");
    c.resources = Resources { memory_limit: Some(16 << 20), ..Resources::default() };
    runtime.create_and_start(c).await.unwrap();
    let exited = wait_exit(&runtime, "hog", Duration::from_secs(20)).await;
    assert_eq!(exited.reason, "OOMKilled", "{exited:?}");

    // no_new_privs only when asked for (a container's allowPrivilegeEscalation: false).
    for (id, refused, expected) in [("nnp-default", false, "NoNewPrivs:\t0"), ("nnp-refused", true, "NoNewPrivs:\t1")] {
        let mut c = config(dir.path(), &store, id, "grep NoNewPrivs /proc/self/status");
        c.no_new_privileges = refused;
        let log = c.log_path.clone();
        runtime.create_and_start(c).await.unwrap();
        let exited = wait_exit(&runtime, id, Duration::from_secs(10)).await;
        assert_eq!(exited.exit_code, 0, "{exited:?}");
        let text = std::fs::read_to_string(&log).unwrap();
        assert!(text.trim_end().ends_with(expected), "{id}: {text}");
    }

    // An unknown command fails to start, with the reason.
    let mut c = config(dir.path(), &store, "nosuch", "");
    c.args = vec!["/no/such/binary".into()];
    let error = runtime.create_and_start(c).await.unwrap_err().to_string();
    assert!(
        error.contains("no/such/binary") || error.contains("not found") || error.contains("No such file"),
        "{error}"
    );

    for id in ["hello", "sleeper", "hog", "nnp-default", "nnp-refused", "nosuch"] {
        runtime.remove(id).await.unwrap();
    }
    assert!(runtime.list().await.unwrap().is_empty());
    tugboat_runtime::remove_cgroup(&format!("/tugboat-test/{}", std::process::id()));
    tugboat_runtime::remove_cgroup("/tugboat-test");
}

#[tokio::test]
async fn a_running_container_outlives_a_killed_starter() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    let runtime = Builtin::new(dir.path().join("containers"), TUGBOAT).unwrap();
    let c = config(dir.path(), &store, "long", "while true; do echo tick; sleep 0.05; done");
    let log = c.log_path.clone();
    let container = runtime.create_and_start(c).await.unwrap();
    let pid = container.started.unwrap().pid;
    // A second Builtin (a restarted kubelet) finds it running and its log growing.
    let again = Builtin::new(dir.path().join("containers"), TUGBOAT).unwrap();
    let found = again.list().await.unwrap();
    assert_eq!(found.len(), 1);
    assert_eq!(found[0].state, State::Running);
    assert_eq!(found[0].label("test"), Some("runtime"));
    assert_eq!(found[0].started.as_ref().unwrap().pid, pid);
    let before = std::fs::metadata(&log).unwrap().len();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(std::fs::metadata(&log).unwrap().len() > before);
    again.remove("long").await.unwrap();
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z")
    );
    tugboat_runtime::remove_cgroup(&format!("/tugboat-test/{}", std::process::id()));
}

#[test]
fn removing_an_image_frees_only_what_no_other_image_uses() {
    let dir = tempfile::tempdir().unwrap();
    let store = store(dir.path());
    // A second image: the same busybox layer plus a file, so a layer of its own.
    let archive = dir.path().join("other.tar");
    let layer = tugboat_testkit::image::busybox_layer(&[("etc/other", b"1", 0o644)]).unwrap();
    tugboat_testkit::image::oci_archive(&archive, "other:1", &layer, &["sh"]).unwrap();
    store.import(&archive).unwrap();
    let (_, busybox) = store.get("busybox:1.35").unwrap();
    let (_, other) = store.get("other:1").unwrap();
    let layer_dir = |diff_id: &str| store.root().join("layers").join(diff_id.trim_start_matches("sha256:"));
    assert!(layer_dir(&other.layers[0]).is_dir());
    store.remove("other:1").unwrap();
    assert!(store.get("other:1").is_none());
    assert!(!layer_dir(&other.layers[0]).exists() && !store.blob_path(&other.manifest).exists());
    // The other image is whole.
    assert!(layer_dir(&busybox.layers[0]).join("bin/busybox").exists());
    assert!(store.blob_path(&busybox.config).exists() && store.get("busybox:1.35").is_some());
    // Read again from disk: the name is gone there too.
    let again = ImageStore::open(store.root()).unwrap();
    assert!(again.get("other:1").is_none() && again.get("busybox:1.35").is_some());
    assert!(matches!(store.remove("other:1"), Err(tugboat_runtime::images::ImageError::NotFound(_))));
}
