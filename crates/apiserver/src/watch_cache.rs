//! The watch cache: per resource, the current objects and the recent changes, kept by one store
//! watch, so that watches and `resourceVersion=0` lists are served from memory, each change is
//! decoded once however many clients watch, and the store sees one watch per resource rather
//! than one per client (upstream's cacher does the same over etcd).
//!
//! A cache is made the first time its resource is watched or listed from the cache, from a list
//! of the store and a watch from that list's revision. Current objects are kept encoded as the
//! API serves them (the stored JSON with its `resourceVersion`: a decoded tree is several times
//! larger), made once when a change arrives and shared by every list and watch event that sends
//! them, which copy the bytes rather than encode the object again; changes are decoded once,
//! when they arrive, for what needs the tree (selectors, tables, conversions). Everything after `history_start` is in
//! `history` (the last `HISTORY` changes), so a watch from a revision at least that recent replays
//! what it missed and goes on live; an older one is served by the store (which may answer 410).
//! If the store watch fails, the cache is dropped (its watchers' streams end, as upstream closes
//! them, and clients watch again) and the next request builds a new one.
//!
//! Live changes reach each watcher through a queue of its own ([`Live`]), so a cache holds only
//! what its watchers have yet to read (a ring allocated up front, as tokio's broadcast channel
//! has, cost ~0.5 MiB a cache: half a GiB once an operator watched its thousand custom
//! resources).

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use serde_json::{Value, json};
pub use tokio::sync::broadcast::error::RecvError;
use tugboat_store::{Event, EventKind, ListOptions, Revision, Store, StoreError};

/// Changes kept for watches that resume from an earlier revision.
const HISTORY: usize = 2_000;
/// Changes a watcher may fall behind by before it is cut off (with 410, to list again).
const LAG: usize = 10_000;

/// One change of an object, decoded once and shared by every watcher.
#[derive(Debug, Clone)]
pub struct Change {
    pub kind: EventKind,
    pub key: String,
    pub revision: Revision,
    /// The object after the change; for a delete, its last state (with the delete's revision).
    pub object: Arc<Value>,
    /// The object before the change (`None` for a create).
    pub previous: Option<Arc<Value>>,
    /// `object` encoded as JSON, when the cache has it (a put): what a watch event sends.
    pub encoded: Option<bytes::Bytes>,
}

/// A stored object as the API serves it: decoded, with its resourceVersion.
pub fn decode(value: &[u8], revision: Revision) -> Option<Value> {
    let mut object: Value = serde_json::from_slice(value).ok()?;
    object.get_mut("metadata")?.as_object_mut()?.insert("resourceVersion".into(), json!(revision.to_string()));
    Some(object)
}

impl Change {
    /// A store event as a change (the path of watches the cache cannot serve).
    pub fn from_event(event: &Event) -> Option<Change> {
        let previous = event.prev.as_ref().and_then(|kv| decode(&kv.value, kv.mod_revision)).map(Arc::new);
        let object = match event.kind {
            EventKind::Put => Arc::new(decode(&event.kv.value, event.kv.mod_revision)?),
            EventKind::Delete => {
                let mut gone = previous.as_deref()?.clone();
                gone["metadata"]["resourceVersion"] = json!(event.kv.mod_revision.to_string());
                Arc::new(gone)
            }
        };
        Some(Change {
            kind: event.kind,
            key: event.kv.key.clone(),
            revision: event.revision(),
            object,
            previous,
            encoded: None,
        })
    }
}

/// A stored object as the API serves it, encoded: the store's JSON with its resourceVersion.
/// Decoded to insert it; `None` for bytes that are not a JSON object with metadata.
fn served(value: &[u8], revision: Revision) -> Option<(Value, bytes::Bytes)> {
    let object = decode(value, revision)?;
    // Sized to the stored bytes and then exactly: a vector grown by doubling keeps up to half
    // of itself unused, and the cache holds one per object.
    let mut encoded = Vec::with_capacity(value.len() + 64);
    serde_json::to_writer(&mut encoded, &object).ok()?;
    encoded.shrink_to_fit();
    Some((object, bytes::Bytes::from(encoded)))
}

/// The live watchers of a cache, each with its queue.
#[derive(Debug, Default)]
struct Fanout {
    queues: Vec<Arc<Queue>>,
}

#[derive(Debug, Default)]
struct Queue {
    state: std::sync::Mutex<Pending>,
    ready: tokio::sync::Notify,
}

#[derive(Debug, Default)]
struct Pending {
    changes: VecDeque<Arc<Change>>,
    /// Changes dropped because the watcher fell `LAG` behind (reported once, then it goes on).
    missed: u64,
    closed: bool,
}

impl Queue {
    fn pending(&self) -> std::sync::MutexGuard<'_, Pending> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Fanout {
    fn subscribe(&mut self) -> Live {
        let queue = Arc::new(Queue::default());
        self.queues.push(queue.clone());
        Live { queue }
    }

    fn send(&mut self, change: Arc<Change>) {
        // A queue only the fan-out holds is one whose watcher has gone.
        self.queues.retain(|queue| Arc::strong_count(queue) > 1);
        for queue in &self.queues {
            {
                let mut pending = queue.pending();
                if pending.changes.len() >= LAG {
                    pending.missed += pending.changes.len() as u64 + 1;
                    pending.changes = VecDeque::new();
                } else {
                    pending.changes.push_back(change.clone());
                }
            }
            queue.ready.notify_one();
        }
    }

    fn close(self) {
        for queue in self.queues {
            queue.pending().closed = true;
            queue.ready.notify_one();
        }
    }
}

/// A watcher's end of a cache's live changes.
#[derive(Debug)]
pub struct Live {
    queue: Arc<Queue>,
}

impl Live {
    /// The next change; `Lagged` once when the watcher fell too far behind (changes were
    /// dropped), `Closed` when the cache has died and every change was read.
    pub async fn recv(&mut self) -> Result<Arc<Change>, RecvError> {
        loop {
            {
                let mut pending = self.queue.pending();
                if pending.missed > 0 {
                    return Err(RecvError::Lagged(std::mem::take(&mut pending.missed)));
                }
                if let Some(change) = pending.changes.pop_front() {
                    return Ok(change);
                }
                if pending.closed {
                    return Err(RecvError::Closed);
                }
            }
            // A change sent since the lock was released left a permit: this returns at once.
            self.queue.ready.notified().await;
        }
    }
}

/// One change as the history keeps it.
#[derive(Debug, Clone)]
struct Recorded {
    kind: EventKind,
    key: String,
    revision: Revision,
    /// The object after a put (served bytes, and its revision); `None` for a delete.
    object: Option<Stored>,
    previous: Option<Stored>,
}

/// Served bytes decoded (their resourceVersion is in them).
pub fn decode_served(bytes: &[u8]) -> Option<Value> {
    serde_json::from_slice(bytes).ok().filter(Value::is_object)
}

impl Recorded {
    /// The change, decoded (`object`: the put's tree when the caller has it already).
    fn change_with(&self, object: Option<Value>) -> Option<Change> {
        let previous = self.previous.as_ref().and_then(|(bytes, _)| decode_served(bytes)).map(Arc::new);
        let (object, encoded) = match &self.object {
            Some((bytes, _)) => {
                let object = match object {
                    Some(object) => object,
                    None => decode_served(bytes)?,
                };
                (Arc::new(object), Some(bytes.clone()))
            }
            None => {
                let mut gone = previous.as_deref()?.clone();
                gone["metadata"]["resourceVersion"] = json!(self.revision.to_string());
                (Arc::new(gone), None)
            }
        };
        Some(Change { kind: self.kind, key: self.key.clone(), revision: self.revision, object, previous, encoded })
    }

    fn change(&self) -> Option<Change> {
        self.change_with(None)
    }
}

#[derive(Debug)]
struct Inner {
    /// Every change up to this revision is reflected.
    revision: Revision,
    /// Each object as served (see [`served`]) and its revision.
    objects: BTreeMap<String, Stored>,
    /// The last changes, as served bytes (shared with `objects`): decoded only when a watch
    /// replays them, so the history costs little more than the objects do.
    history: VecDeque<Recorded>,
    /// Every change after this revision is in `history`.
    history_start: Revision,
    /// Dropped when the cache dies, which ends its watchers' streams.
    fanout: Option<Fanout>,
}

/// The cache of one resource (one store prefix).
#[derive(Debug)]
pub struct Cache {
    inner: RwLock<Inner>,
    alive: AtomicBool,
    /// Told each time the cache's revision moves.
    advanced: tokio::sync::Notify,
    /// How far the store's log has been looked at for this resource's changes (see
    /// [`WatchCaches::current`]).
    checked: std::sync::Mutex<Checked>,
}

/// The store's log has been searched up to `until`: no change of the cache's resource up to
/// there is later than `last`. The next search starts at `until`, so a list pays for the
/// writes since the previous list, not for every write since the resource last changed.
#[derive(Debug, Clone, Copy)]
struct Checked {
    until: Revision,
    last: Revision,
}

/// What a watch served by the cache starts with.
#[derive(Debug)]
pub struct Subscription {
    /// The current objects (for a watch without a revision), or the changes it missed.
    pub initial: Vec<Value>,
    pub replay: Vec<Arc<Change>>,
    /// The revision the live changes follow; live changes at or before it are skipped.
    pub revision: Revision,
    pub live: Live,
}

/// What [`Cache::subscribe_keyed`] starts with: the current objects by store key.
#[derive(Debug)]
pub struct KeyedSubscription {
    pub initial: Vec<(String, Value)>,
    /// The revision the live changes follow; live changes at or before it are skipped.
    pub revision: Revision,
    pub live: Live,
}

impl Cache {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(&self, event: &Event) {
        self.record(event);
        // After the lock is released: those waiting read the revision at once.
        self.advanced.notify_waiters();
    }

    fn record(&self, event: &Event) {
        let revision = event.revision();
        let key = &event.kv.key;
        // Decoded and encoded once (outside the lock), for every list and live watcher.
        let decoded = match event.kind {
            EventKind::Put => match served(&event.kv.value, event.kv.mod_revision) {
                Some(decoded) => Some(decoded),
                None => {
                    tracing::warn!(key = %event.kv.key, revision, "the watch cache skipped an object that does not decode");
                    let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
                    inner.objects.remove(key);
                    inner.revision = inner.revision.max(revision);
                    return;
                }
            },
            EventKind::Delete => None,
        };
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let (recorded, object) = match decoded {
            Some((object, encoded)) => {
                let stored = (encoded, event.kv.mod_revision);
                let previous = inner.objects.insert(key.clone(), stored.clone());
                (
                    Recorded { kind: EventKind::Put, key: key.clone(), revision, object: Some(stored), previous },
                    Some(object),
                )
            }
            None => {
                let previous = inner.objects.remove(key);
                (Recorded { kind: EventKind::Delete, key: key.clone(), revision, object: None, previous }, None)
            }
        };
        inner.revision = inner.revision.max(revision);
        let Some(change) = recorded.change_with(object) else {
            return;
        };
        inner.history.push_back(recorded);
        if inner.history.len() > HISTORY
            && let Some(dropped) = inner.history.pop_front()
        {
            inner.history_start = dropped.revision;
        }
        if let Some(fanout) = &mut inner.fanout {
            fanout.send(Arc::new(change));
        }
    }

    fn die(&self) {
        self.alive.store(false, Ordering::SeqCst);
        self.advanced.notify_waiters();
        if let Some(fanout) = self.inner.write().unwrap_or_else(|e| e.into_inner()).fanout.take() {
            fanout.close();
        }
    }

    /// The objects under `prefix` and the revision they are current at (a `resourceVersion=0`
    /// list).
    pub fn list(&self, prefix: &str) -> (Vec<Value>, Revision) {
        let (stored, revision) = {
            let inner = self.read();
            (Self::under(&inner, prefix), inner.revision)
        };
        (Self::decode_all(stored), revision)
    }

    /// The stored objects under `prefix` (cheap clones; decoded after the lock is released).
    fn under(inner: &Inner, prefix: &str) -> Vec<Stored> {
        inner
            .objects
            .range(prefix.to_string()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(_, o)| o.clone())
            .collect()
    }

    fn decode_all(stored: Vec<Stored>) -> Vec<Value> {
        stored.iter().filter_map(|(bytes, _)| decode_served(bytes)).collect()
    }

    /// The objects under `prefix` as served bytes (JSON, each with its resourceVersion), and
    /// the revision they are current at: a list that sends them as they are.
    pub fn list_encoded(&self, prefix: &str) -> (Vec<bytes::Bytes>, Revision) {
        let inner = self.read();
        let encoded = Self::under(&inner, prefix).into_iter().map(|(bytes, _)| bytes).collect();
        (encoded, inner.revision)
    }

    /// A page of a paged list: up to `max` objects under `prefix` from key `start` on
    /// (inclusive), in key order, as they were at revision `at` (`None`: now), each with its
    /// key; the revision read at; and whether objects follow the last one. `None` when the
    /// history no longer reaches back to `at`. The caller makes sure the cache holds every
    /// change up to `at` (see [`WatchCaches::current`]).
    ///
    /// The state at `at` is the current one with the changes after `at` undone, so a list's
    /// later pages read the snapshot its first page read, as from the store.
    pub fn page(&self, prefix: &str, start: &str, at: Option<Revision>, max: usize) -> Option<Page> {
        let inner = self.read();
        let at = at.unwrap_or(inner.revision);
        if at < inner.history_start {
            return None;
        }
        let before = Self::undone(&inner, prefix, start, at);
        let mut objects = Self::at_revision(&inner, prefix, start, &before);
        let items: Vec<(String, bytes::Bytes)> =
            objects.by_ref().take(max).map(|(key, (bytes, _))| (key.to_string(), bytes.clone())).collect();
        let more = objects.next().is_some();
        Some(Page { items, revision: at, more })
    }

    /// How many objects under `prefix` from key `start` on there were at revision `at` (what
    /// a page's `remainingItemCount` counts); `None` as for [`Cache::page`].
    pub fn count(&self, prefix: &str, start: &str, at: Revision) -> Option<i64> {
        let inner = self.read();
        if at < inner.history_start {
            return None;
        }
        let before = Self::undone(&inner, prefix, start, at);
        Some(Self::at_revision(&inner, prefix, start, &before).count() as i64)
    }

    /// The keys under `prefix` from `start` on that changed after `at`, each with what it held
    /// at `at` (the previous object of its first change after `at`).
    fn undone<'a>(inner: &'a Inner, prefix: &str, start: &str, at: Revision) -> BTreeMap<&'a str, Option<&'a Stored>> {
        let mut before = BTreeMap::new();
        // Newest first: the earliest change after `at` is inserted last.
        for change in inner.history.iter().rev().take_while(|c| c.revision > at) {
            if change.key.as_str() >= start && change.key.starts_with(prefix) {
                before.insert(change.key.as_str(), change.previous.as_ref());
            }
        }
        before
    }

    /// The objects under `prefix` from `start` on, with those of `before` as they were.
    fn at_revision<'a>(
        inner: &'a Inner,
        prefix: &'a str,
        start: &str,
        before: &'a BTreeMap<&'a str, Option<&'a Stored>>,
    ) -> impl Iterator<Item = (&'a str, &'a Stored)> + 'a {
        let now = inner
            .objects
            .range::<str, _>((std::ops::Bound::Included(start), std::ops::Bound::Unbounded))
            .take_while(move |(key, _)| key.starts_with(prefix))
            .map(|(key, stored)| (key.as_str(), Some(stored)))
            .peekable();
        let then = before.iter().map(|(key, stored)| (*key, *stored)).peekable();
        Merged { now, then }.filter_map(|(key, stored)| Some((key, stored?)))
    }

    /// The object at store key `key`, decoded.
    pub fn object(&self, key: &str) -> Option<Value> {
        let bytes = self.read().objects.get(key).map(|(bytes, _)| bytes.clone())?;
        decode_served(&bytes)
    }

    /// The revision every change of the cache's resource up to which is reflected.
    pub fn revision(&self) -> Revision {
        self.read().revision
    }

    /// A watch of `prefix` from the current state, each object of it with its store key.
    pub fn subscribe_keyed(&self, prefix: &str) -> Option<KeyedSubscription> {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let live = inner.fanout.as_mut()?.subscribe();
        let stored: Vec<(String, bytes::Bytes, Revision)> = inner
            .objects
            .range(prefix.to_string()..)
            .take_while(|(key, _)| key.starts_with(prefix))
            .map(|(key, (bytes, revision))| (key.clone(), bytes.clone(), *revision))
            .collect();
        let revision = inner.revision;
        drop(inner);
        let initial = stored.into_iter().filter_map(|(key, bytes, _)| Some((key, decode_served(&bytes)?))).collect();
        Some(KeyedSubscription { initial, revision, live })
    }

    /// A watch of `prefix`: from the current state (`after: None`) or from a revision. `None`
    /// when the cache no longer holds every change after that revision.
    pub fn subscribe(&self, prefix: &str, after: Option<Revision>) -> Option<Subscription> {
        let mut inner = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let live = inner.fanout.as_mut()?.subscribe();
        match after {
            None => {
                let stored = Self::under(&inner, prefix);
                let revision = inner.revision;
                drop(inner);
                Some(Subscription { initial: Self::decode_all(stored), replay: Vec::new(), revision, live })
            }
            Some(after) if after >= inner.history_start => {
                let recorded: Vec<Recorded> =
                    inner.history.iter().filter(|c| c.revision > after && c.key.starts_with(prefix)).cloned().collect();
                // Changes up to `after` that have not reached the cache yet are skipped live.
                let revision = inner.revision.max(after);
                drop(inner);
                let replay = recorded.iter().filter_map(Recorded::change).map(Arc::new).collect();
                Some(Subscription { initial: Vec::new(), replay, revision, live })
            }
            Some(_) => None,
        }
    }
}

/// An object as the cache keeps it: served bytes and the object's revision.
type Stored = (bytes::Bytes, Revision);

/// What [`Cache::page`] read.
#[derive(Debug)]
pub struct Page {
    /// Store key and served bytes of each object, in key order.
    pub items: Vec<(String, bytes::Bytes)>,
    /// The revision the objects are as of.
    pub revision: Revision,
    /// Whether objects follow the last item.
    pub more: bool,
}

/// Two key-ordered sequences of (key, object or none) merged; on equal keys `then`'s wins.
struct Merged<'a, A: Iterator<Item = (&'a str, Option<&'a Stored>)>, B: Iterator<Item = (&'a str, Option<&'a Stored>)>> {
    now: std::iter::Peekable<A>,
    then: std::iter::Peekable<B>,
}

impl<'a, A, B> Iterator for Merged<'a, A, B>
where
    A: Iterator<Item = (&'a str, Option<&'a Stored>)>,
    B: Iterator<Item = (&'a str, Option<&'a Stored>)>,
{
    type Item = (&'a str, Option<&'a Stored>);

    fn next(&mut self) -> Option<Self::Item> {
        match (self.now.peek(), self.then.peek()) {
            (Some(now), Some(then)) => match now.0.cmp(then.0) {
                std::cmp::Ordering::Less => self.now.next(),
                std::cmp::Ordering::Greater => self.then.next(),
                std::cmp::Ordering::Equal => {
                    self.now.next();
                    self.then.next()
                }
            },
            (Some(_), None) => self.now.next(),
            (None, _) => self.then.next(),
        }
    }
}

/// The caches of every resource used so far, by store prefix.
#[derive(Debug)]
pub struct WatchCaches {
    store: Arc<dyn Store>,
    caches: tokio::sync::Mutex<HashMap<String, Arc<Cache>>>,
}

impl WatchCaches {
    pub fn new(store: Arc<dyn Store>) -> WatchCaches {
        WatchCaches { store, caches: Default::default() }
    }

    /// The store's current revision once `cache` (of the resource under `prefix`) reflects
    /// every change up to it, so that a list from the cache is as current as one from the
    /// store; `None` when the store cannot tell or the cache does not catch up within a second
    /// (read the store then).
    pub async fn current(&self, cache: &Cache, prefix: &str) -> Option<Revision> {
        let current = self.store.current_revision().await.ok()?;
        let seen = cache.revision();
        if seen >= current {
            return Some(current);
        }
        // Later revisions may all be other resources' changes: the last of ours is what the
        // cache must reach. The log up to `checked.until` was searched before (changes of ours
        // up to there are at most `checked.last`; those up to `seen` the cache has).
        let checked = *cache.checked.lock().unwrap_or_else(|e| e.into_inner());
        let from = checked.until.max(seen);
        let mut last = checked.last;
        if from < current {
            if let Some(found) = self.store.last_change(prefix, from, current).await.ok()? {
                if found > current {
                    return None;
                }
                last = last.max(found);
            }
            let mut checked = cache.checked.lock().unwrap_or_else(|e| e.into_inner());
            checked.last = checked.last.max(last);
            checked.until = checked.until.max(current);
        }
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        loop {
            let advanced = cache.advanced.notified();
            tokio::pin!(advanced);
            advanced.as_mut().enable();
            if cache.revision() >= last {
                return Some(current);
            }
            if !cache.alive.load(Ordering::SeqCst) || tokio::time::timeout_at(deadline, advanced).await.is_err() {
                return None;
            }
        }
    }

    /// The cache of the resource stored under `prefix`, made on first use.
    pub async fn get(&self, prefix: &str) -> Result<Arc<Cache>, StoreError> {
        let mut caches = self.caches.lock().await;
        if let Some(cache) = caches.get(prefix).filter(|c| c.alive.load(Ordering::SeqCst)) {
            return Ok(cache.clone());
        }
        let page = self.store.list(prefix, ListOptions::default()).await?;
        let mut stream = self.store.watch(prefix, page.revision).await?;
        let objects = page
            .kvs
            .into_iter()
            .filter_map(|kv| {
                let (_, encoded) = served(&kv.value, kv.mod_revision)?;
                Some((kv.key, (encoded, kv.mod_revision)))
            })
            .collect();
        let cache = Arc::new(Cache {
            inner: RwLock::new(Inner {
                revision: page.revision,
                objects,
                history: VecDeque::new(),
                history_start: page.revision,
                fanout: Some(Fanout::default()),
            }),
            alive: AtomicBool::new(true),
            advanced: tokio::sync::Notify::new(),
            checked: std::sync::Mutex::new(Checked { until: page.revision, last: page.revision }),
        });
        let keeper = cache.clone();
        let name = prefix.to_string();
        tokio::spawn(async move {
            while let Some(item) = stream.next().await {
                match item {
                    Ok(event) => keeper.apply(&event),
                    Err(error) => {
                        tracing::warn!(prefix = %name, %error, "the watch cache lost its store watch; it will be rebuilt");
                        break;
                    }
                }
            }
            keeper.die();
        });
        caches.insert(prefix.to_string(), cache.clone());
        Ok(cache)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tugboat_store::{SqliteConfig, SqliteStore};

    fn store() -> (tempfile::TempDir, Arc<dyn Store>) {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(SqliteConfig { path: dir.path().join("state.db"), watch_buffer: 64 }).unwrap();
        (dir, Arc::new(store))
    }

    fn object(name: &str, n: u32) -> Vec<u8> {
        serde_json::to_vec(&json!({"metadata": {"name": name}, "data": {"n": n.to_string()}})).unwrap()
    }

    async fn next(live: &mut Live) -> Arc<Change> {
        tokio::time::timeout(std::time::Duration::from_secs(5), live.recv()).await.unwrap().unwrap()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_consistent_read_waits_for_the_cache_to_hold_every_change_up_to_the_store() {
        let (_dir, store) = store();
        let caches = WatchCaches::new(store.clone());
        let prefix = "/registry/configmaps/";
        let cache = caches.get(prefix).await.unwrap();
        for i in 0..50 {
            // Read-your-writes: what was just written is listed, at a revision at least its own.
            let written = store.create(&format!("{prefix}a/m{i}"), object(&format!("m{i}"), i)).await.unwrap();
            let at = caches.current(&cache, prefix).await.expect("the cache catches up");
            assert!(at >= written);
            let (encoded, _) = cache.list_encoded(prefix);
            assert_eq!(encoded.len(), i as usize + 1, "the list at {at} misses the write at {written}");
            // Served as stored, with the resourceVersion of the write.
            let listed: Vec<Value> = encoded.iter().map(|e| serde_json::from_slice(e).unwrap()).collect();
            let this = listed.iter().find(|o| o["metadata"]["name"] == json!(format!("m{i}"))).unwrap();
            assert_eq!(this["metadata"]["resourceVersion"], json!(written.to_string()));
        }
        // Other resources' writes move the store on: the cache is current without a change.
        let other = store.create("/registry/secrets/a/s", object("s", 1)).await.unwrap();
        assert_eq!(caches.current(&cache, prefix).await, Some(other));
        // A deletion is a change too.
        let (deleted, _) = store.delete(&format!("{prefix}a/m0"), None).await.unwrap();
        assert!(caches.current(&cache, prefix).await.unwrap() >= deleted);
        assert!(cache.object(&format!("{prefix}a/m0")).is_none());
        assert_eq!(cache.list_encoded(prefix).0.len(), 49);
        // The log is searched from where the last search stopped: a change of ours after many
        // of others', and after searches that found nothing, is still waited for.
        for round in 0..5 {
            for i in 0..20 {
                store.create(&format!("/registry/secrets/a/s{round}-{i}"), object("s", i)).await.unwrap();
                caches.current(&cache, prefix).await.expect("current");
            }
            let written = store.create(&format!("{prefix}b/late{round}"), object("late", round)).await.unwrap();
            let at = caches.current(&cache, prefix).await.expect("the cache catches up");
            assert!(at >= written);
            assert!(cache.object(&format!("{prefix}b/late{round}")).is_some(), "round {round}");
        }
    }

    /// Pages read at past revisions are what the store holds at them (the store is the
    /// oracle), across creates, updates and deletes, namespaces, and any page size.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn pages_at_a_past_revision_are_the_stores_state_at_it() {
        let (_dir, store) = store();
        let prefix = "/registry/configmaps/";
        for i in 0..20u32 {
            store.create(&format!("{prefix}ns{}/m{i:02}", i % 3), object(&format!("m{i:02}"), i)).await.unwrap();
        }
        let caches = WatchCaches::new(store.clone());
        let cache = caches.get(prefix).await.unwrap();
        let mut revisions = vec![store.current_revision().await.unwrap()];
        // A deterministic mix of writes after the cache started.
        let mut seed: u64 = 7;
        for step in 0..120u32 {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            let i = (seed >> 33) % 30;
            let key = format!("{prefix}ns{}/m{i:02}", i % 3);
            match store.get(&key, None).await.unwrap() {
                Some(_) if (seed >> 20) % 3 == 0 => drop(store.delete(&key, None).await.unwrap()),
                Some(kv) => drop(store.update(&key, object(&format!("m{i:02}"), step), kv.mod_revision).await.unwrap()),
                None => drop(store.create(&key, object(&format!("m{i:02}"), step)).await.unwrap()),
            }
            if step % 15 == 0 {
                revisions.push(store.current_revision().await.unwrap());
            }
        }
        let now = caches.current(&cache, prefix).await.expect("the cache catches up");
        revisions.push(now);
        for &at in &revisions {
            for listed in [prefix.to_string(), format!("{prefix}ns1/")] {
                let oracle = store
                    .list(&listed, ListOptions { revision: Some(at), ..Default::default() })
                    .await
                    .unwrap()
                    .kvs
                    .into_iter()
                    .map(|kv| (kv.key, decode(&kv.value, kv.mod_revision).unwrap()))
                    .collect::<Vec<_>>();
                for size in [1, 4, 7, 100] {
                    let (mut start, mut read) = (listed.clone(), Vec::new());
                    loop {
                        let page = cache.page(&listed, &start, Some(at), size).expect("within the history");
                        assert_eq!(page.revision, at);
                        read.extend(page.items.iter().map(|(key, bytes)| (key.clone(), decode_served(bytes).unwrap())));
                        let Some((last, _)) = page.items.last() else { break };
                        start = format!("{last}\0");
                        let remaining = cache.count(&listed, &start, at).unwrap();
                        assert_eq!(remaining as usize, oracle.len() - read.len(), "count after {last} at {at}");
                        assert_eq!(page.more, remaining > 0);
                        if !page.more {
                            break;
                        }
                    }
                    assert_eq!(read, oracle, "{listed} at {at} in pages of {size}");
                }
            }
        }
        // The latest state is read at the cache's revision.
        let latest = cache.page(prefix, prefix, None, usize::MAX).unwrap();
        assert_eq!(latest.items.len(), cache.list_encoded(prefix).0.len());
        // Before the history starts, the cache cannot tell.
        assert!(cache.page(prefix, prefix, Some(revisions[0] - 1), 10).is_none());
    }

    #[tokio::test]
    async fn watches_start_from_the_state_or_a_revision_and_go_on_live() {
        let (_dir, store) = store();
        let first = store.create("/registry/configmaps/a/one", object("one", 1)).await.unwrap();
        store.create("/registry/configmaps/b/two", object("two", 1)).await.unwrap();
        let caches = WatchCaches::new(store.clone());
        let cache = caches.get("/registry/configmaps/").await.unwrap();

        // The state, one namespace of it.
        let (all, revision) = cache.list("/registry/configmaps/");
        assert_eq!(all.len(), 2);
        let mut a = cache.subscribe("/registry/configmaps/a/", None).unwrap();
        assert_eq!(a.initial.len(), 1);
        assert_eq!(a.revision, revision);

        let updated = store.update("/registry/configmaps/a/one", object("one", 2), first).await.unwrap();
        let change = next(&mut a.live).await;
        assert_eq!(change.revision, updated);
        assert_eq!(change.object["data"]["n"], "2");
        assert_eq!(change.previous.as_ref().unwrap()["data"]["n"], "1");
        assert_eq!(change.object["metadata"]["resourceVersion"], updated.to_string());

        // A watch from the list's revision replays what came after it; one from before the
        // cache began is left to the store.
        let from_list = cache.subscribe("/registry/configmaps/", Some(revision)).unwrap();
        let replayed: Vec<Revision> = from_list.replay.iter().map(|c| c.revision).collect();
        assert_eq!(replayed, [updated]);
        assert!(cache.subscribe("/registry/configmaps/", Some(first)).is_none());

        // Deletes carry the last state with the delete's revision.
        let (deleted, _) = store.delete("/registry/configmaps/a/one", None).await.unwrap();
        let change = next(&mut a.live).await;
        assert_eq!(change.kind, EventKind::Delete);
        assert_eq!(change.object["data"]["n"], "2");
        assert_eq!(change.object["metadata"]["resourceVersion"], deleted.to_string());
        assert!(cache.list("/registry/configmaps/a/").0.is_empty());

        // The same cache serves everyone.
        assert!(Arc::ptr_eq(&cache, &caches.get("/registry/configmaps/").await.unwrap()));
    }

    fn change(revision: Revision) -> Arc<Change> {
        Arc::new(Change {
            kind: EventKind::Put,
            key: "/registry/configmaps/a/x".into(),
            revision,
            object: Arc::new(json!({})),
            previous: None,
            encoded: None,
        })
    }

    #[tokio::test]
    async fn a_watcher_that_falls_too_far_behind_is_told_once_and_goes_on() {
        let mut fanout = Fanout::default();
        let mut keeping_up = fanout.subscribe();
        let mut slow = fanout.subscribe();
        let gone = fanout.subscribe();
        drop(gone);
        for revision in 1..=(LAG as i64 + 1) {
            fanout.send(change(revision));
            assert_eq!(next(&mut keeping_up).await.revision, revision);
        }
        assert_eq!(fanout.queues.len(), 2, "the dropped watcher's queue went at the first send");
        assert!(matches!(slow.recv().await, Err(RecvError::Lagged(n)) if n == LAG as u64 + 1));
        fanout.send(change(LAG as i64 + 2));
        assert_eq!(next(&mut slow).await.revision, LAG as i64 + 2);
        // What was sent before the close is still read, then the end.
        fanout.send(change(LAG as i64 + 3));
        fanout.close();
        assert_eq!(next(&mut slow).await.revision, LAG as i64 + 3);
        assert!(matches!(slow.recv().await, Err(RecvError::Closed)));
    }

    #[tokio::test]
    async fn a_revision_older_than_the_history_is_left_to_the_store() {
        let (_dir, store) = store();
        let old = store.create("/registry/pods/d/p", object("p", 0)).await.unwrap();
        let caches = WatchCaches::new(store.clone());
        let cache = caches.get("/registry/pods/").await.unwrap();
        assert!(cache.subscribe("/registry/pods/", Some(old - 1)).is_none(), "before the cache began");
        assert!(cache.subscribe("/registry/pods/", Some(old)).is_some());
        // A revision from the future (another resource's list) skips nothing it should not.
        let future = cache.subscribe("/registry/pods/", Some(old + 100)).unwrap();
        assert_eq!(future.revision, old + 100);
    }
}
