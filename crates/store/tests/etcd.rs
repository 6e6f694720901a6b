//! The etcd backend against a real etcd (Debian's etcd-server) on a free loopback port: the
//! conformance suite, the kube-apiserver key layout seen through etcdctl, and clear errors.

mod conformance;

use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use conformance::{Fixture, conformance_suite};
use tugboat_store::{EtcdConfig, EtcdStore, Store, StoreError};
use tugboat_testkit::EtcdServer;

async fn connect(server: &EtcdServer) -> EtcdStore {
    EtcdStore::connect(EtcdConfig::from_endpoint_list(server.client_url()).unwrap()).await.unwrap()
}

async fn open_etcd() -> Fixture {
    let server = tokio::task::spawn_blocking(EtcdServer::start).await.unwrap().expect("etcd starts");
    let store = connect(&server).await;
    Fixture { store: Arc::new(store), guard: Box::new(server) }
}

conformance_suite!(open_etcd);

fn etcdctl(server: &EtcdServer, args: &[&str]) -> String {
    let output = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", server.client_url()))
        .args(args)
        .output()
        .expect("etcdctl runs (Debian's etcd-client)");
    assert!(output.status.success(), "etcdctl {args:?}: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcdctl_sees_the_kube_apiserver_key_layout() {
    let server = tokio::task::spawn_blocking(EtcdServer::start).await.unwrap().unwrap();
    let store = connect(&server).await;
    store.create("/registry/pods/default/web", br#"{"kind":"Pod"}"#.to_vec()).await.unwrap();
    store.create("/registry/namespaces/default", br#"{"kind":"Namespace"}"#.to_vec()).await.unwrap();
    let keys = etcdctl(&server, &["get", "/registry", "--prefix", "--keys-only"]);
    let keys: Vec<&str> = keys.lines().filter(|l| !l.is_empty()).collect();
    assert_eq!(keys, ["/registry/namespaces/default", "/registry/pods/default/web"]);
    let value = etcdctl(&server, &["get", "/registry/pods/default/web", "--print-value-only"]);
    assert_eq!(value.trim(), r#"{"kind":"Pod"}"#);

    // And the other way round: what etcdctl writes, the store reads with etcd's revisions.
    etcdctl(&server, &["put", "/registry/configmaps/default/c", "v"]);
    let kv = store.get("/registry/configmaps/default/c", None).await.unwrap().unwrap();
    assert_eq!(kv.mod_revision, store.current_revision().await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_is_one_etcdctl_accepts() {
    let server = tokio::task::spawn_blocking(EtcdServer::start).await.unwrap().unwrap();
    let store = connect(&server).await;
    for i in 0..50 {
        store.create(&format!("/registry/configmaps/default/c{i}"), vec![b'x'; 100]).await.unwrap();
    }
    let path = server.dir().join("snapshot.db");
    let info = store.snapshot(&path).await.unwrap();
    assert!(info.size > 0);
    let status = etcdctl(&server, &["snapshot", "status", path.to_str().unwrap(), "--write-out=json"]);
    assert!(status.contains("\"totalKey\""), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_etcd_is_a_clear_error_naming_the_endpoint() {
    let port = tugboat_testkit::free_port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let mut config = EtcdConfig::from_endpoint_list(&endpoint).unwrap();
    config.timeout = Duration::from_secs(2);
    let started = Instant::now();
    let error = EtcdStore::connect(config).await.expect_err("nothing listens there");
    assert!(started.elapsed() < Duration::from_secs(10), "fails promptly: {:?}", started.elapsed());
    let message = error.to_string();
    assert!(message.contains(&endpoint), "names the endpoint: {message}");
    assert!(message.contains("unreachable"), "says what is wrong: {message}");
}

#[test]
fn a_malformed_endpoint_list_is_refused() {
    for bad in ["", "127.0.0.1:2379", "etcd://x:1", " , "] {
        let error = EtcdConfig::from_endpoint_list(bad).expect_err(bad);
        assert!(matches!(error, StoreError::EtcdProtocol { .. }), "{bad}: {error}");
    }
    let ok = EtcdConfig::from_endpoint_list("https://a:2379, https://b:2379").unwrap();
    assert_eq!(ok.endpoints, ["https://a:2379", "https://b:2379"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_ends_with_an_error_when_etcd_dies() {
    let server = tokio::task::spawn_blocking(EtcdServer::start).await.unwrap().unwrap();
    let store = connect(&server).await;
    let mut watch = store.watch("/w/", store.current_revision().await.unwrap()).await.unwrap();
    drop(server);
    use futures::StreamExt;
    match tokio::time::timeout(Duration::from_secs(30), watch.next()).await {
        Ok(Some(Err(error))) => assert!(error.to_string().contains("etcd at"), "{error}"),
        Ok(None) => {}
        other => panic!("the watch must end, not hang or invent events: {other:?}"),
    }
}
