//! The SQLite backend: the conformance suite, and what only an embedded file can show
//! (reopening, disk space, locking, snapshots that open as stores).

mod conformance;

use std::sync::Arc;

use conformance::{Fixture, conformance_suite};
use tugboat_store::{ListOptions, SqliteConfig, SqliteStore, Store, StoreError};

async fn open_sqlite() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(SqliteConfig::in_data_dir(dir.path())).unwrap();
    Fixture { store: Arc::new(store), guard: Box::new(dir) }
}

conformance_suite!(open_sqlite);

fn open(dir: &std::path::Path) -> SqliteStore {
    SqliteStore::open(SqliteConfig::in_data_dir(dir)).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn data_and_revisions_survive_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let r1 = store.create("/a", b"1".to_vec()).await.unwrap();
    let r2 = store.update("/a", b"2".to_vec(), r1).await.unwrap();
    let (r3, _) = store.delete("/a", None).await.unwrap();
    store.compact(r2).await.unwrap();
    drop(store);

    let store = open(dir.path());
    assert_eq!(store.current_revision().await.unwrap(), r3);
    assert_eq!(store.get("/a", Some(r2)).await.unwrap().unwrap().value, b"2");
    assert!(matches!(store.get("/a", Some(r1)).await, Err(StoreError::Compacted { .. })), "compaction is durable");
    let r4 = store.create("/a", b"3".to_vec()).await.unwrap();
    assert_eq!(r4, r3 + 1, "revisions continue where they stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_cannot_open_a_store_in_use() {
    let dir = tempfile::tempdir().unwrap();
    let _store = open(dir.path());
    match SqliteStore::open(SqliteConfig::in_data_dir(dir.path())) {
        Err(error @ StoreError::Locked { .. }) => {
            assert!(error.to_string().contains("state.db"), "the error names the file: {error}");
        }
        other => panic!("expected Locked, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compaction_keeps_the_window_and_reclaims_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let db = dir.path().join("db/state.db");
    let big = vec![b'v'; 16 * 1024];
    let mut revisions = Vec::new();
    for key in 0..10 {
        revisions.push(store.create(&format!("/big/{key}"), big.clone()).await.unwrap());
    }
    for round in 0..60 {
        for (key, revision) in revisions.iter_mut().enumerate() {
            *revision = store.update(&format!("/big/{key}"), big.clone(), *revision).await.unwrap();
        }
        if round == 40 {
            store.snapshot(&dir.path().join("probe.db")).await.unwrap();
        }
    }
    let size_of = |path: &std::path::Path| std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
    let wal = dir.path().join("db/state.db-wal");
    let before = size_of(&db) + size_of(&wal);
    assert!(before > 8 * 1024 * 1024, "610 values of 16 KiB: {before}");

    let current = store.current_revision().await.unwrap();
    let keep_from = current - 20;
    store.compact(keep_from).await.unwrap();
    let after = size_of(&db) + size_of(&wal);
    assert!(after < before / 4, "compaction gives the space back: {before} -> {after}");

    // The window is intact: every event from keep_from on, with previous values.
    let mut watch = store.watch("/big/", keep_from - 1).await.unwrap();
    let events = conformance::take_events(&mut watch, 21).await;
    assert_eq!(events.first().unwrap().revision(), keep_from);
    assert!(events.iter().all(|e| e.prev.as_ref().is_some_and(|p| p.value == big)));
    let list = store.list("/big/", ListOptions::default()).await.unwrap();
    assert_eq!(list.kvs.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_snapshot_opens_as_a_store_with_the_same_data() {
    let dir = tempfile::tempdir().unwrap();
    let store = Arc::new(open(dir.path()));
    for i in 0..500 {
        store.create(&format!("/s/{i:04}"), format!("value {i}").into_bytes()).await.unwrap();
    }
    // Writers keep going while the snapshot is taken.
    let writer = {
        let store = store.clone();
        tokio::spawn(async move {
            for i in 0..500 {
                store.create(&format!("/during/{i}"), b"x".to_vec()).await.unwrap();
            }
        })
    };
    let snapshot_dir = tempfile::tempdir().unwrap();
    let info = store.snapshot(&snapshot_dir.path().join("db/state.db")).await;
    // The destination directory must exist; the store does not create it.
    assert!(matches!(info, Err(StoreError::Sqlite { .. } | StoreError::Io { .. })), "{info:?}");
    std::fs::create_dir_all(snapshot_dir.path().join("db")).unwrap();
    let info = store.snapshot(&snapshot_dir.path().join("db/state.db")).await.unwrap();
    writer.await.unwrap();

    let copy = open(snapshot_dir.path());
    let copied_revision = copy.current_revision().await.unwrap();
    assert!(copied_revision >= info.revision, "{copied_revision} >= {}", info.revision);
    let list = copy.list("/s/", ListOptions::default()).await.unwrap();
    assert_eq!(list.kvs.len(), 500);
    assert_eq!(list.kvs[42].value, b"value 42");
    // The copy is a consistent prefix of the history.
    let during = copy.count("/during/").await.unwrap();
    assert_eq!(copied_revision, 500 + during);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn last_change_names_the_latest_put_or_delete_under_a_prefix_in_a_range() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let r1 = store.create("/a/x", b"1".to_vec()).await.unwrap();
    let r2 = store.create("/b/y", b"1".to_vec()).await.unwrap();
    let (r3, _) = store.delete("/a/x", None).await.unwrap();
    let r4 = store.create("/b/z", b"1".to_vec()).await.unwrap();
    assert_eq!(store.last_change("/a/", 0, r4).await.unwrap(), Some(r3), "a deletion is a change");
    assert_eq!(store.last_change("/a/", r1, r2).await.unwrap(), None);
    assert_eq!(store.last_change("/a/", r3, r4).await.unwrap(), None);
    assert_eq!(store.last_change("/b/", r2, r4).await.unwrap(), Some(r4));
    assert_eq!(store.last_change("/b/", r2, r3).await.unwrap(), None, "nothing after `until` counts");
    assert_eq!(store.last_change("/", 0, r4).await.unwrap(), Some(r4));
    // Compacted history may have lost tombstones: unknown.
    store.compact(r4).await.unwrap();
    assert_eq!(store.last_change("/a/", r1, r4).await.unwrap(), Some(tugboat_store::Revision::MAX));
}

/// A store of schema 1 (before `log.version`) is migrated when opened: each live row gets the
/// count of its key's writes so far, and later writes count on from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schema_1_store_gets_versions_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let path = SqliteConfig::in_data_dir(dir.path()).path;
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let conn = rusqlite::Connection::open(path).unwrap();
        conn.execute_batch(
            "PRAGMA auto_vacuum = INCREMENTAL;
             PRAGMA journal_mode = WAL;
             CREATE TABLE log (revision INTEGER PRIMARY KEY, key BLOB NOT NULL, created INTEGER NOT NULL,
                               prev INTEGER NOT NULL, deleted INTEGER NOT NULL, value BLOB NOT NULL);
             CREATE INDEX log_key_revision ON log (key, revision);
             CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
             INSERT INTO meta (name, value) VALUES ('compact_revision', 0);
             INSERT INTO log VALUES (1, CAST('/a' AS BLOB), 1, 0, 0, CAST('1' AS BLOB));
             INSERT INTO log VALUES (2, CAST('/a' AS BLOB), 1, 1, 0, CAST('2' AS BLOB));
             INSERT INTO log VALUES (3, CAST('/b' AS BLOB), 3, 0, 0, CAST('x' AS BLOB));
             INSERT INTO log VALUES (4, CAST('/a' AS BLOB), 1, 2, 0, CAST('3' AS BLOB));
             INSERT INTO log VALUES (5, CAST('/b' AS BLOB), 3, 3, 1, CAST('' AS BLOB));
             INSERT INTO log VALUES (6, CAST('/b' AS BLOB), 6, 0, 0, CAST('y' AS BLOB));
             PRAGMA application_id = 1413956180;
             PRAGMA user_version = 1;",
        )
        .unwrap();
    }
    let store = open(dir.path());
    let a = store.get("/a", None).await.unwrap().unwrap();
    assert_eq!((a.value.as_slice(), a.version), (&b"3"[..], 3));
    assert_eq!(store.get("/a", Some(2)).await.unwrap().unwrap().version, 2);
    assert_eq!(store.get("/b", None).await.unwrap().unwrap().version, 1, "a new life after the deletion");
    store.update("/a", b"4".to_vec(), 4).await.unwrap();
    assert_eq!(store.get("/a", None).await.unwrap().unwrap().version, 4);
    drop(store);
    // Reopened: schema 2 now, nothing migrated twice.
    let store = open(dir.path());
    assert_eq!(store.get("/a", None).await.unwrap().unwrap().version, 4);
}
