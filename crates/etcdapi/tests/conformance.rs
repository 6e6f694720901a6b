//! The store conformance suite through Tugboat's etcd API: an `EtcdStore` (the etcd backend,
//! as `--datastore-endpoint` uses it) pointed at the etcd API served over a SQLite store. One
//! suite, three backends: SQLite, a real etcd, and SQLite behind this API.

#[path = "../../store/tests/conformance/mod.rs"]
mod conformance;

use std::sync::Arc;
use std::time::Duration;

use conformance::{Fixture, conformance_suite};
use tugboat_store::{EtcdConfig, EtcdStore, EtcdTls, SqliteConfig, SqliteStore, Store};

async fn open_through_the_etcd_api() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.db");
    let sqlite: Arc<dyn Store> = Arc::new(SqliteStore::open(SqliteConfig { path: path.clone(), watch_buffer: 64 }).unwrap());
    let pki = dir.path().join("pki");
    let listen = "127.0.0.1:0".parse().unwrap();
    let (address, server) = tugboat_etcdapi::start(listen, &pki, "test", sqlite, vec![path], None).await.unwrap();
    let config = EtcdConfig {
        endpoints: vec![format!("https://{address}")],
        tls: Some(EtcdTls {
            ca_file: pki.join("ca.crt"),
            cert_file: Some(pki.join("healthcheck-client.crt")),
            key_file: Some(pki.join("healthcheck-client.key")),
        }),
        timeout: Duration::from_secs(10),
    };
    let store = EtcdStore::connect(config).await.expect("the etcd store connects to the etcd API");
    Fixture { store: Arc::new(store), guard: Box::new((dir, AbortOnDrop(server))) }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

conformance_suite!(open_through_the_etcd_api);
