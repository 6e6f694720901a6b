//! The store: a revisioned, watchable key-value store, the single source of truth of a Tugboat
//! cluster. Only the API server talks to it.
//!
//! One trait, [`Store`], and two backends that pass one conformance suite:
//! - [`SqliteStore`] (embedded default): a log of revisions in SQLite, group commit, compaction,
//!   online snapshots. Its on-disk design is in `crates/store/DESIGN.md`.
//! - [`EtcdStore`]: a real etcd v3 cluster, with keys laid out as kube-apiserver lays them out
//!   (`/registry/<resource>/<namespace>/<name>`), so `etcdctl` works on it.
//!
//! Semantics shared by both (and asserted by `tests/conformance`):
//! - Revisions are global and strictly increasing; every write gets a new one.
//! - `create` fails if the key exists; `update` and a conditional `delete` succeed only when the
//!   caller's revision is the key's current mod revision, else [`StoreError::Conflict`] names the
//!   current one.
//! - `watch(prefix, after)` delivers every change with revision `> after`, exactly once, in
//!   revision order, with the previous value; when that history was compacted away it fails with
//!   [`StoreError::Compacted`] (the API server answers 410 Gone).
//!
//! It imports no other Tugboat crate (the test kit only for its tests).

mod bbolt;
pub mod bbolt_writer;
mod compactor;
mod continue_token;
mod error;
mod etcd;
mod sqlite;

use std::path::Path;
use std::pin::Pin;

use futures::Stream;

pub use bbolt::looks_like_bbolt;
pub use compactor::{CompactionPolicy, spawn_compactor};
pub use continue_token::ContinueToken;
pub use error::{Result, StoreError};
pub use etcd::{EtcdConfig, EtcdStore, EtcdTls};
pub use sqlite::{SqliteConfig, SqliteStore, restore_etcd_snapshot, restore_snapshot, snapshot_file};

/// A store revision: etcd's `mod_revision`, Kubernetes' `resourceVersion`.
pub type Revision = i64;

/// One stored value with its revisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    /// Revision of the write that created this incarnation of the key.
    pub create_revision: Revision,
    /// Revision of the write that produced this value.
    pub mod_revision: Revision,
    /// Writes of this incarnation of the key so far, its creation included (etcd's
    /// `version`); 0 in a deletion's key-value.
    pub version: i64,
}

/// What a change did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    /// The key was created or updated; a create has `kv.create_revision == kv.mod_revision`.
    Put,
    /// The key was deleted; `kv.value` is empty and `kv.mod_revision` is the deletion's revision.
    Delete,
}

/// One change seen by a watch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub kind: EventKind,
    pub kv: KeyValue,
    /// The value just before this change; `None` for a create.
    pub prev: Option<KeyValue>,
}

impl Event {
    /// The revision of the change.
    pub fn revision(&self) -> Revision {
        self.kv.mod_revision
    }
}

/// How to list.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    /// Read at this revision instead of the latest. A continue token carries its own.
    pub revision: Option<Revision>,
    /// At most this many items; `None` or 0 for all.
    pub limit: Option<i64>,
    /// Resume a limited list where the previous page stopped.
    pub continue_token: Option<String>,
}

/// One page of a list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListResult {
    /// Items in key order.
    pub kvs: Vec<KeyValue>,
    /// The revision the list was read at.
    pub revision: Revision,
    /// Set when more items follow; pass it back to get the next page.
    pub continue_token: Option<String>,
    /// How many items follow this page, when known.
    pub remaining: Option<i64>,
}

/// What a snapshot wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotInfo {
    /// The store's revision when the snapshot was taken (at least).
    pub revision: Revision,
    /// Bytes written.
    pub size: u64,
}

/// The changes under a prefix, in revision order. Ends after an error.
pub type WatchStream = Pin<Box<dyn Stream<Item = Result<Event>> + Send>>;

/// A revisioned, watchable key-value store. See the crate docs for the semantics.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Creates `key`; fails with [`StoreError::AlreadyExists`] if it exists. Returns the new revision.
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision>;

    /// Replaces `key`'s value if its current mod revision is `expected`. Returns the new revision.
    async fn update(&self, key: &str, value: Vec<u8>, expected: Revision) -> Result<Revision>;

    /// Deletes `key`, if `expected` is given only when it is the current mod revision. Returns the
    /// deletion's revision and the value that was deleted.
    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)>;

    /// Writes `value` at `key` whatever it holds (etcd's Put): the write's revision and what
    /// the key held before. The default reads, then creates or updates at the revision read,
    /// again until neither conflicts.
    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(Revision, Option<KeyValue>)> {
        loop {
            let previous = self.get(key, None).await?;
            let written = match &previous {
                Some(kv) => self.update(key, value.clone(), kv.mod_revision).await,
                None => self.create(key, value.clone()).await,
            };
            match written {
                Ok(revision) => return Ok((revision, previous)),
                Err(StoreError::Conflict { .. } | StoreError::AlreadyExists { .. } | StoreError::NotFound { .. }) => {}
                Err(error) => return Err(error),
            }
        }
    }

    /// Reads `key` at the latest revision or at `revision`.
    async fn get(&self, key: &str, revision: Option<Revision>) -> Result<Option<KeyValue>>;

    /// Lists the keys under `prefix` in key order.
    async fn list(&self, prefix: &str, options: ListOptions) -> Result<ListResult>;

    /// Counts the keys under `prefix` at the latest revision.
    async fn count(&self, prefix: &str) -> Result<i64>;

    /// Streams the changes under `prefix` with revision greater than `after`.
    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream>;

    /// The latest revision.
    async fn current_revision(&self) -> Result<Revision>;
    /// The revision of the last change (put or delete) under `prefix` in `(after, until]`, or
    /// `None` if there was none: what a cache that has every change up to `after` lacks to be
    /// current at `until`. A store that cannot tell answers `Some(Revision::MAX)`.
    async fn last_change(&self, prefix: &str, after: Revision, until: Revision) -> Result<Option<Revision>> {
        let _ = (prefix, after, until);
        Ok(Some(Revision::MAX))
    }

    /// The revision history was last compacted to (reads before it fail), when the store
    /// knows it without asking: `None` when it cannot tell cheaply.
    fn compacted_revision(&self) -> Option<Revision> {
        None
    }

    /// Drops history before `revision`: reads at older revisions and watches from before it then
    /// fail with [`StoreError::Compacted`]. Compacting to an already compacted revision is a no-op.
    async fn compact(&self, revision: Revision) -> Result<()>;

    /// Gives space freed by compaction back to the file system (etcd's defragment).
    async fn defragment(&self) -> Result<()>;

    /// Writes a consistent copy of the whole store to `dest` while the store keeps serving.
    async fn snapshot(&self, dest: &Path) -> Result<SnapshotInfo>;

    /// Writes the whole store to `dest` as etcd's snapshot API streams one (a bbolt file in
    /// etcd's layout, every kept revision), which `etcdctl snapshot status/restore` and etcd
    /// take, while the store keeps serving.
    async fn etcd_snapshot(&self, dest: &Path) -> Result<SnapshotInfo>;
}

/// Where the cluster's state lives: `--datastore-endpoint` picks etcd, else SQLite in the data
/// dir.
#[derive(Debug, Clone)]
pub enum DatastoreConfig {
    Sqlite(SqliteConfig),
    Etcd(EtcdConfig),
}

impl DatastoreConfig {
    /// From the server's flags: an endpoint list means etcd, none the embedded store.
    pub fn from_flags(data_dir: &Path, datastore_endpoint: Option<&str>) -> Result<DatastoreConfig> {
        match datastore_endpoint {
            Some(endpoints) => Ok(DatastoreConfig::Etcd(EtcdConfig::from_endpoint_list(endpoints)?)),
            None => Ok(DatastoreConfig::Sqlite(SqliteConfig::in_data_dir(data_dir))),
        }
    }
}

/// Opens the configured store.
pub async fn open_datastore(config: DatastoreConfig) -> Result<std::sync::Arc<dyn Store>> {
    Ok(match config {
        DatastoreConfig::Sqlite(config) => std::sync::Arc::new(
            tokio::task::spawn_blocking(move || SqliteStore::open(config)).await.map_err(|_| StoreError::Closed)??,
        ),
        DatastoreConfig::Etcd(config) => std::sync::Arc::new(EtcdStore::connect(config).await?),
    })
}

/// The end of the key range that holds every key starting with `prefix` (etcd's `prefix_end`):
/// the prefix with its last byte incremented, or `None` for "to the end of the key space".
pub(crate) fn prefix_end(prefix: &str) -> Option<Vec<u8>> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::prefix_end;

    #[test]
    fn prefix_end_increments_the_last_byte() {
        assert_eq!(prefix_end("/registry/pods/"), Some(b"/registry/pods0".to_vec()));
        assert_eq!(prefix_end("a"), Some(b"b".to_vec()));
        assert_eq!(prefix_end(""), None);
    }
}
