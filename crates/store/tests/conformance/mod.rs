//! The store conformance suite: the semantics every backend must show. Each backend's test file
//! calls `conformance_suite!(open)` with a function that opens a fresh, empty store.

#![allow(dead_code)]

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tugboat_store::{Event, EventKind, ListOptions, Revision, Store, StoreError, WatchStream};

/// A fresh store and whatever keeps it alive (temp dirs, an etcd process).
pub struct Fixture {
    pub store: Arc<dyn Store>,
    pub guard: Box<dyn std::any::Any + Send>,
}

/// Generates one `#[tokio::test]` per case for a backend.
macro_rules! conformance_suite {
    ($open:path) => {
        conformance_suite!(@cases $open;
            create_fails_if_the_key_exists,
            update_requires_the_current_revision,
            delete_requires_the_current_revision,
            get_reads_the_latest_or_a_given_revision,
            list_returns_exactly_the_prefix_in_key_order,
            list_reads_at_a_given_revision,
            list_pages_with_limit_and_continue_on_one_snapshot,
            revisions_are_global_and_strictly_increasing,
            watch_delivers_every_change_once_in_order,
            watch_from_the_past_replays_then_follows,
            compaction_fails_old_reads_and_watches,
            slow_watchers_lose_nothing,
            count_counts_live_keys,
            put_creates_or_replaces_whatever_is_there,
            defragment_keeps_every_key,
            versions_count_the_writes_of_a_keys_life,
            snapshot_writes_a_file
        );
    };
    (@cases $open:path; $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let fixture = $open().await;
                conformance::$case(fixture.store.clone()).await;
                drop(fixture);
            }
        )*
    };
}
pub(crate) use conformance_suite;

const TIMEOUT: Duration = Duration::from_secs(20);

/// Takes the next `n` events, failing the test if they do not come in time.
pub async fn take_events(stream: &mut WatchStream, n: usize) -> Vec<Event> {
    let mut events = Vec::with_capacity(n);
    while events.len() < n {
        match tokio::time::timeout(TIMEOUT, stream.next()).await {
            Ok(Some(Ok(event))) => events.push(event),
            Ok(Some(Err(error))) => panic!("watch failed after {} events: {error}", events.len()),
            Ok(None) => panic!("watch ended after {} of {n} events", events.len()),
            Err(_) => panic!("only {} of {n} events within {TIMEOUT:?}", events.len()),
        }
    }
    events
}

/// Asserts that nothing more arrives for a short while.
pub async fn assert_quiet(stream: &mut WatchStream) {
    if let Ok(Some(item)) = tokio::time::timeout(Duration::from_millis(300), stream.next()).await {
        panic!("unexpected extra watch item: {item:?}");
    }
}

fn v(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

pub async fn create_fails_if_the_key_exists(store: Arc<dyn Store>) {
    let r1 = store.create("/registry/pods/default/web", v("one")).await.unwrap();
    assert!(r1 > 0);
    let again = store.create("/registry/pods/default/web", v("two")).await;
    assert!(
        matches!(again, Err(StoreError::AlreadyExists { ref key }) if key == "/registry/pods/default/web"),
        "{again:?}"
    );
    let kv = store.get("/registry/pods/default/web", None).await.unwrap().unwrap();
    assert_eq!((kv.value, kv.create_revision, kv.mod_revision), (v("one"), r1, r1));
    assert_eq!(store.current_revision().await.unwrap(), r1, "a refused create writes nothing");
}

pub async fn update_requires_the_current_revision(store: Arc<dyn Store>) {
    let r1 = store.create("/k", v("one")).await.unwrap();
    let r2 = store.update("/k", v("two"), r1).await.unwrap();
    assert!(r2 > r1);
    match store.update("/k", v("stale"), r1).await {
        Err(StoreError::Conflict { key, expected, current }) => {
            assert_eq!((key.as_str(), expected, current), ("/k", r1, r2));
        }
        other => panic!("expected a conflict, got {other:?}"),
    }
    assert!(matches!(store.update("/missing", v("x"), r2).await, Err(StoreError::NotFound { .. })));
    let kv = store.get("/k", None).await.unwrap().unwrap();
    assert_eq!((kv.value, kv.create_revision, kv.mod_revision), (v("two"), r1, r2));
}

pub async fn delete_requires_the_current_revision(store: Arc<dyn Store>) {
    let r1 = store.create("/k", v("one")).await.unwrap();
    let r2 = store.update("/k", v("two"), r1).await.unwrap();
    assert!(matches!(store.delete("/k", Some(r1)).await, Err(StoreError::Conflict { current, .. }) if current == r2));
    let (r3, prev) = store.delete("/k", Some(r2)).await.unwrap();
    assert!(r3 > r2);
    assert_eq!((prev.value, prev.create_revision, prev.mod_revision), (v("two"), r1, r2));
    assert_eq!(store.get("/k", None).await.unwrap(), None);
    assert!(matches!(store.delete("/k", None).await, Err(StoreError::NotFound { .. })));
    assert!(matches!(store.delete("/k", Some(r3)).await, Err(StoreError::NotFound { .. })));

    // A deleted key can be created again, as a new incarnation.
    let r4 = store.create("/k", v("again")).await.unwrap();
    let kv = store.get("/k", None).await.unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision), (r4, r4));
    let (r5, prev) = store.delete("/k", None).await.unwrap();
    assert!(r5 > r4);
    assert_eq!(prev.value, v("again"));
}

pub async fn get_reads_the_latest_or_a_given_revision(store: Arc<dyn Store>) {
    let r1 = store.create("/k", v("one")).await.unwrap();
    let r2 = store.update("/k", v("two"), r1).await.unwrap();
    let other = store.create("/other", v("x")).await.unwrap();
    let (r3, _) = store.delete("/k", None).await.unwrap();
    assert_eq!(store.get("/k", Some(r1)).await.unwrap().unwrap().value, v("one"));
    assert_eq!(store.get("/k", Some(r2)).await.unwrap().unwrap().value, v("two"));
    assert_eq!(store.get("/k", Some(other)).await.unwrap().unwrap().value, v("two"));
    assert_eq!(store.get("/k", Some(r3)).await.unwrap(), None);
    assert_eq!(store.get("/k", None).await.unwrap(), None);
    assert_eq!(store.get("/other", Some(r1)).await.unwrap(), None, "not yet created at r1");
    match store.get("/k", Some(r3 + 1000)).await {
        Err(StoreError::FutureRevision { requested, current }) => {
            assert_eq!((requested, current), (r3 + 1000, r3))
        }
        other => panic!("expected FutureRevision, got {other:?}"),
    }
}

pub async fn list_returns_exactly_the_prefix_in_key_order(store: Arc<dyn Store>) {
    for key in [
        "/registry/pods/kube-system/dns",
        "/registry/pods/default/web",
        "/registry/pods/default/db",
        "/registry/podsecuritypolicy/x",
        "/registry/pod",
        "/registry/services/specs/default/web",
    ] {
        store.create(key, v(key)).await.unwrap();
    }
    let gone = store.create("/registry/pods/default/gone", v("x")).await.unwrap();
    store.delete("/registry/pods/default/gone", Some(gone)).await.unwrap();
    let list = store.list("/registry/pods/", ListOptions::default()).await.unwrap();
    let keys: Vec<_> = list.kvs.iter().map(|kv| kv.key.as_str()).collect();
    assert_eq!(keys, ["/registry/pods/default/db", "/registry/pods/default/web", "/registry/pods/kube-system/dns"]);
    assert!(list.kvs.iter().all(|kv| kv.value == v(&kv.key)));
    assert_eq!(list.revision, store.current_revision().await.unwrap());
    assert_eq!(list.continue_token, None);
    let all = store.list("", ListOptions::default()).await.unwrap();
    assert_eq!(all.kvs.len(), 6);
}

pub async fn list_reads_at_a_given_revision(store: Arc<dyn Store>) {
    let a = store.create("/p/a", v("a1")).await.unwrap();
    let b = store.create("/p/b", v("b1")).await.unwrap();
    let then = store.current_revision().await.unwrap();
    store.update("/p/a", v("a2"), a).await.unwrap();
    store.delete("/p/b", Some(b)).await.unwrap();
    store.create("/p/c", v("c1")).await.unwrap();

    let old = store.list("/p/", ListOptions { revision: Some(then), ..Default::default() }).await.unwrap();
    let seen: Vec<_> = old.kvs.iter().map(|kv| (kv.key.as_str(), kv.value.clone())).collect();
    assert_eq!(seen, [("/p/a", v("a1")), ("/p/b", v("b1"))]);
    assert_eq!(old.revision, then);
    let now = store.list("/p/", ListOptions::default()).await.unwrap();
    let seen: Vec<_> = now.kvs.iter().map(|kv| (kv.key.as_str(), kv.value.clone())).collect();
    assert_eq!(seen, [("/p/a", v("a2")), ("/p/c", v("c1"))]);
}

pub async fn list_pages_with_limit_and_continue_on_one_snapshot(store: Arc<dyn Store>) {
    for i in 0..25 {
        store.create(&format!("/items/{i:02}"), v(&i.to_string())).await.unwrap();
    }
    let first = store.list("/items/", ListOptions { limit: Some(10), ..Default::default() }).await.unwrap();
    assert_eq!(first.kvs.len(), 10);
    assert_eq!(first.remaining, Some(15));
    let token = first.continue_token.clone().expect("more pages follow");

    // Writes between pages do not show: every page reads the first page's revision.
    store.create("/items/12a", v("late")).await.unwrap();
    let doomed = store.get("/items/20", None).await.unwrap().unwrap();
    store.delete("/items/20", Some(doomed.mod_revision)).await.unwrap();

    let second = store
        .list("/items/", ListOptions { limit: Some(10), continue_token: Some(token), ..Default::default() })
        .await
        .unwrap();
    assert_eq!(second.revision, first.revision);
    assert_eq!(second.remaining, Some(5));
    let third = store
        .list(
            "/items/",
            ListOptions { limit: Some(10), continue_token: second.continue_token.clone(), ..Default::default() },
        )
        .await
        .unwrap();
    assert_eq!(third.continue_token, None);
    let keys: Vec<String> = first.kvs.iter().chain(&second.kvs).chain(&third.kvs).map(|kv| kv.key.clone()).collect();
    let expected: Vec<String> = (0..25).map(|i| format!("/items/{i:02}")).collect();
    assert_eq!(keys, expected);

    let bad =
        store.list("/items/", ListOptions { continue_token: Some("garbage!".into()), ..Default::default() }).await;
    assert!(matches!(bad, Err(StoreError::InvalidContinue { .. })), "{bad:?}");
}

pub async fn revisions_are_global_and_strictly_increasing(store: Arc<dyn Store>) {
    let mut tasks = Vec::new();
    for task in 0..16 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut revisions = Vec::new();
            for i in 0..40 {
                revisions.push(store.create(&format!("/c/{task}/{i}"), v("x")).await.unwrap());
            }
            revisions
        }));
    }
    let mut all = BTreeSet::new();
    for task in tasks {
        let revisions = task.await.unwrap();
        assert!(revisions.windows(2).all(|w| w[0] < w[1]), "one writer's revisions increase: {revisions:?}");
        for r in revisions {
            assert!(all.insert(r), "revision {r} given twice");
        }
    }
    assert_eq!(all.len(), 640);
    assert_eq!(*all.last().unwrap(), store.current_revision().await.unwrap());
    let list = store.list("/c/", ListOptions::default()).await.unwrap();
    let listed: BTreeSet<Revision> = list.kvs.iter().map(|kv| kv.mod_revision).collect();
    assert_eq!(listed, all);
}

pub async fn watch_delivers_every_change_once_in_order(store: Arc<dyn Store>) {
    let start = store.current_revision().await.unwrap();
    let mut watch = store.watch("/w/", start).await.unwrap();
    let mut tasks = Vec::new();
    for task in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            let mut written = Vec::new();
            for i in 0..20 {
                let key = format!("/w/{task}/{i}");
                let r1 = store.create(&key, v("1")).await.unwrap();
                let r2 = store.update(&key, v("2"), r1).await.unwrap();
                store.create(&format!("/elsewhere/{task}/{i}"), v("x")).await.unwrap();
                let (r3, _) = store.delete(&key, Some(r2)).await.unwrap();
                written.extend([
                    (key.clone(), r1, EventKind::Put),
                    (key.clone(), r2, EventKind::Put),
                    (key, r3, EventKind::Delete),
                ]);
            }
            written
        }));
    }
    let mut written = Vec::new();
    for task in tasks {
        written.extend(task.await.unwrap());
    }
    written.sort_by_key(|(_, revision, _)| *revision);

    let events = take_events(&mut watch, written.len()).await;
    let seen: Vec<_> = events.iter().map(|e| (e.kv.key.clone(), e.revision(), e.kind)).collect();
    assert_eq!(seen, written, "exactly the writes under the prefix, in revision order");
    for event in &events {
        match (event.kind, event.kv.value.as_slice()) {
            (EventKind::Put, b"1") => {
                assert_eq!(event.prev, None);
                assert_eq!(event.kv.create_revision, event.kv.mod_revision);
            }
            (EventKind::Put, b"2") => assert_eq!(event.prev.as_ref().unwrap().value, v("1")),
            (EventKind::Delete, b"") => {
                let prev = event.prev.as_ref().expect("a delete carries the deleted value");
                assert_eq!((prev.key.as_str(), prev.value.as_slice()), (event.kv.key.as_str(), b"2".as_slice()));
            }
            other => panic!("unexpected event {other:?}"),
        }
    }
    assert_quiet(&mut watch).await;
}

pub async fn watch_from_the_past_replays_then_follows(store: Arc<dyn Store>) {
    let base = store.current_revision().await.unwrap();
    let r1 = store.create("/h/a", v("1")).await.unwrap();
    let r2 = store.update("/h/a", v("2"), r1).await.unwrap();
    store.create("/x", v("outside")).await.unwrap();
    let r3 = store.create("/h/b", v("1")).await.unwrap();

    let mut from_base = store.watch("/h/", base).await.unwrap();
    let mut from_r1 = store.watch("/h/", r1).await.unwrap();
    let r4 = store.update("/h/b", v("2"), r3).await.unwrap();

    let seen: Vec<Revision> = take_events(&mut from_base, 4).await.iter().map(Event::revision).collect();
    assert_eq!(seen, [r1, r2, r3, r4]);
    let seen: Vec<Revision> = take_events(&mut from_r1, 3).await.iter().map(Event::revision).collect();
    assert_eq!(seen, [r2, r3, r4], "a watch after r1 starts with the change after r1");
    let r5 = store.create("/h/c", v("1")).await.unwrap();
    assert_eq!(take_events(&mut from_base, 1).await[0].revision(), r5);
    assert_quiet(&mut from_base).await;
}

pub async fn compaction_fails_old_reads_and_watches(store: Arc<dyn Store>) {
    let base = store.current_revision().await.unwrap();
    let mut revision = store.create("/k", v("0")).await.unwrap();
    let first = revision;
    let gone = store.create("/gone", v("x")).await.unwrap();
    let (deleted_at, _) = store.delete("/gone", Some(gone)).await.unwrap();
    for i in 1..10 {
        revision = store.update("/k", v(&i.to_string()), revision).await.unwrap();
    }
    let target = revision; // "/k" = "9"
    let after_target = store.update("/k", v("10"), revision).await.unwrap();
    store.compact(target).await.unwrap();

    let watched = store.watch("/", base).await;
    assert!(
        matches!(watched, Err(StoreError::Compacted { .. })),
        "watch from before the compaction: {:?}",
        watched.err()
    );
    let read = store.get("/k", Some(first)).await;
    assert!(matches!(read, Err(StoreError::Compacted { .. })), "get below the compaction: {read:?}");
    let listed = store.list("/", ListOptions { revision: Some(first), ..Default::default() }).await;
    assert!(matches!(listed, Err(StoreError::Compacted { .. })), "list below the compaction: {listed:?}");

    // Everything from the compact revision on is intact.
    assert_eq!(store.get("/k", Some(target)).await.unwrap().unwrap().value, v("9"));
    assert_eq!(store.get("/gone", Some(target)).await.unwrap(), None);
    assert!(deleted_at < target);
    let mut watch = store.watch("/k", target).await.unwrap();
    let event = take_events(&mut watch, 1).await.remove(0);
    assert_eq!(event.revision(), after_target);
    assert_eq!(event.prev.unwrap().value, v("9"), "the previous value of a later event survives");

    store.compact(target).await.expect("compacting again is a no-op");
    store.compact(first).await.expect("compacting to an older revision is a no-op");
    let future = store.compact(after_target + 100).await;
    assert!(matches!(future, Err(StoreError::FutureRevision { .. })), "{future:?}");
}

pub async fn slow_watchers_lose_nothing(store: Arc<dyn Store>) {
    let start = store.current_revision().await.unwrap();
    let mut watch = store.watch("/s/", start).await.unwrap();
    let mut revisions = Vec::new();
    // One write at a time: many more commits than any in-memory buffer holds, while the
    // watcher reads nothing.
    for i in 0..3000 {
        revisions.push(store.create(&format!("/s/{i:05}"), v("x")).await.unwrap());
    }
    let seen: Vec<Revision> = take_events(&mut watch, revisions.len()).await.iter().map(Event::revision).collect();
    assert_eq!(seen, revisions);
}

pub async fn count_counts_live_keys(store: Arc<dyn Store>) {
    for i in 0..7 {
        store.create(&format!("/n/{i}"), v("x")).await.unwrap();
    }
    store.create("/nx", v("x")).await.unwrap();
    store.delete("/n/3", None).await.unwrap();
    assert_eq!(store.count("/n/").await.unwrap(), 6);
    assert_eq!(store.count("/none/").await.unwrap(), 0);
}

pub async fn put_creates_or_replaces_whatever_is_there(store: Arc<dyn Store>) {
    let (created, previous) = store.put("/p/a", v("one")).await.unwrap();
    assert!(previous.is_none());
    let (replaced, previous) = store.put("/p/a", v("two")).await.unwrap();
    assert!(replaced > created);
    let previous = previous.expect("what the key held");
    assert_eq!((previous.value, previous.mod_revision, previous.create_revision), (v("one"), created, created));
    let now = store.get("/p/a", None).await.unwrap().unwrap();
    assert_eq!((now.value, now.mod_revision, now.create_revision), (v("two"), replaced, created));
    // After a delete, a put creates the key anew.
    store.delete("/p/a", None).await.unwrap();
    let (again, previous) = store.put("/p/a", v("three")).await.unwrap();
    assert!(previous.is_none());
    assert_eq!(store.get("/p/a", None).await.unwrap().unwrap().create_revision, again);
}

pub async fn defragment_keeps_every_key(store: Arc<dyn Store>) {
    for i in 0..50 {
        store.create(&format!("/d/{i}"), vec![b'x'; 2000]).await.unwrap();
    }
    for i in 0..40 {
        store.delete(&format!("/d/{i}"), None).await.unwrap();
    }
    let current = store.current_revision().await.unwrap();
    store.compact(current).await.unwrap();
    store.defragment().await.unwrap();
    assert_eq!(store.count("/d/").await.unwrap(), 10);
    assert_eq!(store.get("/d/45", None).await.unwrap().unwrap().value, vec![b'x'; 2000]);
    store.create("/d/after", v("x")).await.unwrap();
}

pub async fn versions_count_the_writes_of_a_keys_life(store: Arc<dyn Store>) {
    let version = |store: Arc<dyn Store>| async move { store.get("/ver/k", None).await.unwrap().map(|kv| kv.version) };
    let created = store.create("/ver/k", v("1")).await.unwrap();
    assert_eq!(version(store.clone()).await, Some(1));
    let updated = store.update("/ver/k", v("2"), created).await.unwrap();
    assert_eq!(version(store.clone()).await, Some(2));
    store.put("/ver/k", v("3")).await.unwrap();
    assert_eq!(version(store.clone()).await, Some(3));
    // As read at a past revision, in lists and in watch events.
    assert_eq!(store.get("/ver/k", Some(updated)).await.unwrap().unwrap().version, 2);
    let listed = store.list("/ver/", ListOptions::default()).await.unwrap();
    assert_eq!(listed.kvs[0].version, 3);
    let mut watch = store.watch("/ver/", created - 1).await.unwrap();
    let events = take_events(&mut watch, 3).await;
    assert_eq!(events.iter().map(|e| e.kv.version).collect::<Vec<_>>(), [1, 2, 3]);
    assert_eq!(events[2].prev.as_ref().map(|p| p.version), Some(2));
    // A deletion ends the key's life; a new one starts at 1.
    store.delete("/ver/k", None).await.unwrap();
    store.create("/ver/k", v("again")).await.unwrap();
    assert_eq!(version(store.clone()).await, Some(1));
}

pub async fn snapshot_writes_a_file(store: Arc<dyn Store>) {
    for i in 0..100 {
        store.create(&format!("/snap/{i}"), vec![b'x'; 1000]).await.unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snapshot.db");
    let info = store.snapshot(&path).await.unwrap();
    assert_eq!(info.revision, store.current_revision().await.unwrap());
    assert!(info.size > 100_000, "the snapshot holds the data: {info:?}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), info.size);
}
