//! The embedded backend: a log of revisions in one SQLite file. See `crates/store/DESIGN.md`.

mod schema;
mod writer;

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{broadcast, mpsc, oneshot};

use self::schema::sqlite_error;
use self::writer::{Op, Outcome, Request, Writer};
use crate::continue_token::{ContinueToken, ListPlan};
use crate::{
    Event, EventKind, KeyValue, ListOptions, ListResult, Result, Revision, SnapshotInfo, Store, StoreError,
    WatchStream, prefix_end,
};

/// Where and how to keep the embedded store.
#[derive(Debug, Clone)]
pub struct SqliteConfig {
    /// The database file; its directory is created if missing. A `<file>.lock` beside it keeps
    /// a second process from opening the same store.
    pub path: PathBuf,
    /// Events kept in memory for watchers that fall behind before they re-read the log.
    pub watch_buffer: usize,
}

impl SqliteConfig {
    /// The store of a Tugboat data dir: `<data-dir>/db/state.db`.
    pub fn in_data_dir(data_dir: &Path) -> Self {
        SqliteConfig { path: data_dir.join("db").join("state.db"), watch_buffer: 1024 }
    }
}

/// A key's value at a revision (the latest at or before `?2`).
const GET: &str = "SELECT created, revision, deleted, value, version FROM log
                   WHERE key = ?1 AND revision <= ?2 ORDER BY revision DESC LIMIT 1";

/// Events read from the log per query while a watcher catches up.
const CATCH_UP_BATCH: i64 = 1000;

/// State shared by the writer thread, readers and watchers.
#[derive(Debug)]
pub(crate) struct Shared {
    path: PathBuf,
    /// The latest committed revision.
    current: AtomicI64,
    /// History before this revision is gone.
    compacted: AtomicI64,
    readers: Mutex<Vec<Connection>>,
}

impl Shared {
    /// Runs `f` on a pooled read connection (blocking).
    fn read<T>(&self, f: impl FnOnce(&Connection) -> rusqlite::Result<T>) -> Result<T> {
        let pooled = self.readers.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let conn = match pooled {
            Some(conn) => conn,
            None => schema::open_reader(&self.path)?,
        };
        let result = f(&conn).map_err(|e| sqlite_error(&self.path, e));
        self.readers.lock().unwrap_or_else(|e| e.into_inner()).push(conn);
        result
    }

    /// Checks a requested read revision against the compacted range and the current revision.
    /// `compacted` must come from the same read transaction as the read itself.
    fn check_revision(&self, requested: Revision, compacted: Revision) -> Result<()> {
        if requested < compacted {
            return Err(StoreError::Compacted { requested, compacted });
        }
        let current = self.current.load(Ordering::SeqCst);
        if requested > current {
            return Err(StoreError::FutureRevision { requested, current });
        }
        Ok(())
    }
}

/// The embedded store. Cheap to share behind an `Arc`; dropping the last handle stops the
/// writer after its current group and releases the file.
#[derive(Debug)]
pub struct SqliteStore {
    shared: Arc<Shared>,
    requests: Option<std::sync::mpsc::Sender<Request>>,
    events: broadcast::Sender<Arc<Vec<Event>>>,
    writer: Option<std::thread::JoinHandle<()>>,
    _lock: File,
}

impl SqliteStore {
    /// Opens the store, creating the file when missing. Fails with a clear error when the file
    /// is corrupt, is some other database, or is held by another process.
    pub fn open(config: SqliteConfig) -> Result<SqliteStore> {
        let path = config.path.clone();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| StoreError::Io { path: dir.to_path_buf(), source })?;
        }
        let lock = lock(&path)?;

        let conn = schema::open_writer(&path)?;
        let (current, compacted) = schema::load_revisions(&conn).map_err(|e| sqlite_error(&path, e))?;
        let shared = Arc::new(Shared {
            path: path.clone(),
            current: AtomicI64::new(current),
            compacted: AtomicI64::new(compacted),
            readers: Mutex::new(Vec::new()),
        });
        // Fail now, not at the first read, if readers cannot open the file.
        shared.read(|conn| conn.query_row("SELECT count(*) FROM meta", [], |_| Ok(())))?;

        let (events, _) = broadcast::channel(config.watch_buffer.max(16));
        let (requests, receiver) = std::sync::mpsc::channel();
        let writer = Writer { conn, path: path.clone(), shared: shared.clone(), events: events.clone() };
        let writer = std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer.run(receiver))
            .map_err(|source| StoreError::Io { path: path.clone(), source })?;
        tracing::debug!(path = %path.display(), revision = current, compacted, "sqlite store open");
        Ok(SqliteStore { shared, requests: Some(requests), events, writer: Some(writer), _lock: lock })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.shared.path
    }

    async fn write(&self, op: Op) -> Result<Outcome> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(Request::Write(op, reply))
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn read<T: Send + 'static>(&self, f: impl FnOnce(&Shared) -> Result<T> + Send + 'static) -> Result<T> {
        let shared = self.shared.clone();
        tokio::task::spawn_blocking(move || f(&shared)).await.map_err(|_| StoreError::Closed)?
    }
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        // Closing the channel stops the writer once it has answered what it holds; wait for it,
        // so the file lock is released only when nothing writes any more.
        self.requests.take();
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn validate_key(key: &str) -> Result<()> {
    if key.is_empty() {
        return Err(StoreError::InvalidKey { key: key.to_string(), reason: "empty" });
    }
    Ok(())
}

fn kv_from_row(key: String, created: Revision, revision: Revision, value: Vec<u8>, version: i64) -> KeyValue {
    KeyValue { key, value, create_revision: created, mod_revision: revision, version }
}

fn key_from_blob(blob: Vec<u8>) -> rusqlite::Result<String> {
    String::from_utf8(blob)
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Blob, Box::new(e)))
}

/// The keys `[start, end)` at revision `at`, live only, in key order. Walking the key index and
/// keeping the newest row of each key at `at` avoids sorting the values (8x faster at 10k keys
/// than grouping first). The `_TO_END` variants serve the empty prefix; keeping the bound out
/// of an `OR` lets SQLite use it to end the index range.
const LIST_SQL: &str = "
    SELECT l.key, l.created, l.revision, l.value, l.version FROM log AS l
    WHERE l.key >= ?1 AND l.key < ?2 AND l.deleted = 0
      AND l.revision = (SELECT max(revision) FROM log AS n WHERE n.key = l.key AND n.revision <= ?3)
    ORDER BY l.key LIMIT ?4";
const LIST_TO_END_SQL: &str = "
    SELECT l.key, l.created, l.revision, l.value, l.version FROM log AS l
    WHERE l.key >= ?1 AND ?2 IS NULL AND l.deleted = 0
      AND l.revision = (SELECT max(revision) FROM log AS n WHERE n.key = l.key AND n.revision <= ?3)
    ORDER BY l.key LIMIT ?4";
const COUNT_SQL: &str = "
    SELECT count(*) FROM log AS l
    WHERE l.key >= ?1 AND l.key < ?2 AND l.deleted = 0
      AND l.revision = (SELECT max(revision) FROM log AS n WHERE n.key = l.key AND n.revision <= ?3)";
const COUNT_TO_END_SQL: &str = "
    SELECT count(*) FROM log AS l
    WHERE l.key >= ?1 AND ?2 IS NULL AND l.deleted = 0
      AND l.revision = (SELECT max(revision) FROM log AS n WHERE n.key = l.key AND n.revision <= ?3)";

fn count_at(conn: &Connection, start: &[u8], end: Option<&[u8]>, at: Revision) -> rusqlite::Result<i64> {
    let sql = if end.is_some() { COUNT_SQL } else { COUNT_TO_END_SQL };
    conn.prepare_cached(sql)?.query_row(params![start, end, at], |row| row.get(0))
}

/// Runs `f` in one read transaction, so that several queries see one snapshot.
fn in_read_transaction<T>(conn: &Connection, f: impl FnOnce() -> rusqlite::Result<T>) -> rusqlite::Result<T> {
    conn.prepare_cached("BEGIN")?.execute([])?;
    let result = f();
    conn.prepare_cached("COMMIT")?.execute([])?;
    result
}

/// Reads the changes under `[start, end)` after revision `after`, at most `limit`, with their
/// previous values. Fails with Compacted when that history is gone.
fn read_events(
    conn: &Connection,
    start: &[u8],
    end: Option<&[u8]>,
    after: Revision,
    limit: i64,
) -> rusqlite::Result<std::result::Result<Vec<Event>, StoreError>> {
    in_read_transaction(conn, || {
        let compacted = schema::compact_revision(conn)?;
        // A watch after N needs the events from N+1 on; compaction to C keeps those from C on.
        if after + 1 < compacted {
            return Ok(Err(StoreError::Compacted { requested: after, compacted }));
        }
        let mut statement = conn.prepare_cached(
            "SELECT l.revision, l.key, l.created, l.deleted, l.value, p.created, p.revision, p.value,
                    l.version, p.version
             FROM log AS l LEFT JOIN log AS p ON p.revision = l.prev AND l.prev > 0
             WHERE l.revision > ?1 AND l.key >= ?2 AND (?3 IS NULL OR l.key < ?3)
             ORDER BY l.revision LIMIT ?4",
        )?;
        let rows = statement.query_map(params![after, start, end, limit], |row| {
            let revision: Revision = row.get(0)?;
            let key = key_from_blob(row.get(1)?)?;
            let created: Revision = row.get(2)?;
            let deleted: bool = row.get(3)?;
            let value: Vec<u8> = row.get(4)?;
            let prev_revision: Option<Revision> = row.get(6)?;
            let prev = match prev_revision {
                Some(prev_revision) => {
                    Some(kv_from_row(key.clone(), row.get(5)?, prev_revision, row.get(7)?, row.get(9)?))
                }
                None => None,
            };
            Ok(if deleted {
                Event { kind: EventKind::Delete, kv: kv_from_row(key, 0, revision, Vec::new(), 0), prev }
            } else {
                Event { kind: EventKind::Put, kv: kv_from_row(key, created, revision, value, row.get(8)?), prev }
            })
        })?;
        Ok(Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?))
    })
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        validate_key(key)?;
        match self.write(Op::Create { key: key.to_string(), value }).await? {
            Outcome::Put(revision) => Ok(revision),
            Outcome::Deleted(..) | Outcome::Replaced(..) => unreachable!("a create only creates"),
        }
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected: Revision) -> Result<Revision> {
        validate_key(key)?;
        match self.write(Op::Update { key: key.to_string(), value, expected }).await? {
            Outcome::Put(revision) => Ok(revision),
            Outcome::Deleted(..) | Outcome::Replaced(..) => unreachable!("an update only updates"),
        }
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)> {
        validate_key(key)?;
        match self.write(Op::Delete { key: key.to_string(), expected }).await? {
            Outcome::Deleted(revision, prev) => Ok((revision, prev)),
            Outcome::Put(_) | Outcome::Replaced(..) => unreachable!("a delete only deletes"),
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>) -> Result<(Revision, Option<KeyValue>)> {
        validate_key(key)?;
        match self.write(Op::Put { key: key.to_string(), value }).await? {
            Outcome::Replaced(revision, previous) => Ok((revision, previous)),
            Outcome::Put(_) | Outcome::Deleted(..) => unreachable!("a put only replaces"),
        }
    }

    async fn get(&self, key: &str, revision: Option<Revision>) -> Result<Option<KeyValue>> {
        let key = key.to_string();
        let at = revision.filter(|r| *r > 0);
        self.read(move |shared| {
            let row = shared.read(|conn| {
                let read = || {
                    let compacted = match at {
                        Some(_) => schema::compact_revision(conn)?,
                        None => 0,
                    };
                    let row = conn
                        .prepare_cached(GET)?
                        .query_row(params![key.as_bytes(), at.unwrap_or(i64::MAX)], |row| {
                            Ok((
                                row.get::<_, Revision>(0)?,
                                row.get::<_, Revision>(1)?,
                                row.get::<_, bool>(2)?,
                                row.get(3)?,
                                row.get::<_, i64>(4)?,
                            ))
                        })
                        .optional()?;
                    Ok((compacted, row))
                };
                // A read at a revision must see the compact revision of the same snapshot.
                match at {
                    Some(_) => in_read_transaction(conn, read),
                    None => read(),
                }
            })?;
            let (compacted, row) = row;
            if let Some(at) = at {
                shared.check_revision(at, compacted)?;
            }
            Ok(row
                .filter(|(_, _, deleted, _, _)| !deleted)
                .map(|(created, revision, _, value, version)| kv_from_row(key, created, revision, value, version)))
        })
        .await
    }

    async fn list(&self, prefix: &str, options: ListOptions) -> Result<ListResult> {
        let plan = ListPlan::new(prefix, &options)?;
        let prefix = prefix.to_string();
        self.read(move |shared| {
            let at = plan.revision.unwrap_or_else(|| shared.current.load(Ordering::SeqCst));
            let end = prefix_end(&prefix);
            let fetch = plan.limit.map(|l| l + 1).unwrap_or(-1);
            let (compacted, mut kvs, remaining) = shared.read(|conn| {
                in_read_transaction(conn, || {
                    let compacted = schema::compact_revision(conn)?;
                    let sql = if end.is_some() { LIST_SQL } else { LIST_TO_END_SQL };
                    let mut statement = conn.prepare_cached(sql)?;
                    let rows = statement
                        .query_map(params![plan.start_key.as_bytes(), end.as_deref(), at, fetch], |row| {
                            Ok(kv_from_row(key_from_blob(row.get(0)?)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?))
                        })?;
                    let kvs = rows.collect::<rusqlite::Result<Vec<_>>>()?;
                    let remaining = match plan.limit {
                        Some(limit) if kvs.len() as i64 > limit => {
                            let last = kvs[limit as usize - 1].key.as_bytes().to_vec();
                            let mut after = last;
                            after.push(0);
                            Some(count_at(conn, &after, end.as_deref(), at)?)
                        }
                        _ => None,
                    };
                    Ok((compacted, kvs, remaining))
                })
            })?;
            shared.check_revision(at, compacted)?;
            let continue_token = match plan.limit {
                Some(limit) if kvs.len() as i64 > limit => {
                    kvs.truncate(limit as usize);
                    let last = &kvs.last().expect("limit is positive").key;
                    Some(ContinueToken::after(&prefix, last, at).encode())
                }
                _ => None,
            };
            Ok(ListResult { kvs, revision: at, continue_token, remaining })
        })
        .await
    }

    async fn count(&self, prefix: &str) -> Result<i64> {
        let prefix = prefix.to_string();
        self.read(move |shared| {
            let at = shared.current.load(Ordering::SeqCst);
            let end = prefix_end(&prefix);
            shared.read(|conn| count_at(conn, prefix.as_bytes(), end.as_deref(), at))
        })
        .await
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        // Subscribe before reading the log: every event committed from now on is either in the
        // log read below or arrives on the subscription (duplicates are dropped by revision).
        let live = self.events.subscribe();
        let start = prefix.as_bytes().to_vec();
        let end = prefix_end(prefix);
        let shared = self.shared.clone();

        // Check the start now, so the caller gets Compacted (410) before any stream exists.
        let first = {
            let (shared, start, end) = (shared.clone(), start.clone(), end.clone());
            tokio::task::spawn_blocking(move || {
                shared.read(|conn| read_events(conn, &start, end.as_deref(), after, CATCH_UP_BATCH))
            })
            .await
            .map_err(|_| StoreError::Closed)???
        };

        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let watcher = Watcher { shared, start, end, last: after, tx };
            watcher.run(first, live).await;
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn current_revision(&self) -> Result<Revision> {
        Ok(self.shared.current.load(Ordering::SeqCst))
    }

    async fn last_change(&self, prefix: &str, after: Revision, until: Revision) -> Result<Option<Revision>> {
        // Compaction drops tombstones and superseded values before its revision: only a range
        // after it holds every change.
        if after < self.shared.compacted.load(Ordering::SeqCst) {
            return Ok(Some(Revision::MAX));
        }
        let start = prefix.as_bytes().to_vec();
        let end = prefix_end(prefix);
        self.read(move |shared| {
            shared.read(|conn| {
                // By revision (the log's rowid): the few rows after `after`, not every key.
                conn.prepare_cached(
                    "SELECT max(revision) FROM log NOT INDEXED
                     WHERE revision > ?1 AND revision <= ?2 AND key >= ?3 AND (?4 IS NULL OR key < ?4)",
                )?
                .query_row(params![after, until, start, end], |row| row.get::<_, Option<Revision>>(0))
            })
        })
        .await
    }

    fn compacted_revision(&self) -> Option<Revision> {
        Some(self.shared.compacted.load(Ordering::SeqCst))
    }

    async fn defragment(&self) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(Request::Defragment(reply))
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .as_ref()
            .ok_or(StoreError::Closed)?
            .send(Request::Compact(revision, reply))
            .map_err(|_| StoreError::Closed)?;
        answer.await.map_err(|_| StoreError::Closed)?
    }

    async fn snapshot(&self, dest: &Path) -> Result<SnapshotInfo> {
        let dest = dest.to_path_buf();
        self.read(move |shared| snapshot_file(&shared.path, &dest)).await
    }

    async fn etcd_snapshot(&self, dest: &Path) -> Result<SnapshotInfo> {
        let dest = dest.to_path_buf();
        self.read(move |shared| {
            let io = |source| StoreError::Io { path: dest.clone(), source };
            let written = shared.read(|conn| {
                // One read transaction: the compact revision and the log of the same snapshot.
                let tx = conn.unchecked_transaction()?;
                let compacted = schema::compact_revision(&tx)?;
                let mut statement =
                    tx.prepare("SELECT revision, key, created, deleted, value, version FROM log ORDER BY revision")?;
                let mut rows = statement.query([])?;
                let (mut failed, mut last) = (None, 0);
                let revisions = std::iter::from_fn(|| {
                    let row = match rows.next() {
                        Ok(Some(row)) => row,
                        Ok(None) => return None,
                        Err(error) => {
                            failed = Some(error);
                            return None;
                        }
                    };
                    let read = (|| -> rusqlite::Result<crate::bbolt_writer::Revision> {
                        let (revision, key, created, deleted): (Revision, Vec<u8>, Revision, bool) =
                            (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
                        let version: i64 = row.get(5)?;
                        Ok(crate::bbolt_writer::Revision {
                            revision,
                            key,
                            deleted,
                            create_revision: created,
                            version,
                            value: row.get(4)?,
                        })
                    })();
                    match read {
                        Ok(revision) => {
                            last = revision.revision;
                            Some(revision)
                        }
                        Err(error) => {
                            failed = Some(error);
                            None
                        }
                    }
                });
                let size = crate::bbolt_writer::write_etcd_snapshot(&dest, revisions, compacted);
                match failed {
                    Some(error) => Err(error),
                    None => Ok(size.map(|size| SnapshotInfo { revision: last, size })),
                }
            })?;
            written.map_err(io)
        })
        .await
    }
}

/// Writes a compact, consistent copy of the store file `source` to `dest` (fsync'd, renamed
/// into place) from one read transaction, whether or not a server has the store open: SQLite's
/// readers and its writer do not block each other (`tugboat snapshot save` beside a running
/// server, as well as the server's own scheduled snapshots).
pub fn snapshot_file(source: &Path, dest: &Path) -> Result<SnapshotInfo> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    let file_name = dest.file_name().ok_or_else(|| StoreError::Io {
        path: dest.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file path"),
    })?;
    if !source.exists() {
        return Err(StoreError::Io {
            path: source.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no store here"),
        });
    }
    let partial = dest.with_file_name(format!(".{}.partial", file_name.to_string_lossy()));
    let _ = std::fs::remove_file(&partial);
    // VACUUM INTO writes the copy from one read transaction while the writer goes on.
    // Pooled readers are query_only, so this takes a connection of its own.
    let conn = schema::open_reader(source)?;
    conn.execute_batch("PRAGMA query_only = 0").map_err(|e| sqlite_error(source, e))?;
    conn.execute("VACUUM INTO ?1", [partial.to_string_lossy()])
        .map_err(|source| StoreError::Sqlite { path: partial.clone(), source })?;
    drop(conn);
    File::open(&partial).and_then(|f| f.sync_all()).map_err(io(&partial))?;
    let (revision, _) = schema::verify(&partial)?;
    std::fs::rename(&partial, dest).map_err(io(dest))?;
    sync_parent(dest)?;
    let size = std::fs::metadata(dest).map_err(io(dest))?.len();
    Ok(SnapshotInfo { revision, size })
}

/// Replaces the store of `config` with the snapshot `source` (made by [`snapshot_file`] or a
/// store's `snapshot`). The snapshot is checked whole before anything changes; no process may
/// have the store open; the files it replaces are kept beside it as `<file>.before-restore`
/// (with their `-wal`). Works on an empty or missing data dir (a fresh machine).
pub fn restore_snapshot(source: &Path, config: &SqliteConfig) -> Result<SnapshotInfo> {
    let path = &config.path;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    schema::verify(source)?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
    }
    let _lock = lock(path)?;
    let partial = path.with_extension("restoring");
    std::fs::copy(source, &partial).map_err(io(&partial))?;
    File::open(&partial).and_then(|f| f.sync_all()).map_err(io(&partial))?;
    let (revision, _) = schema::verify(&partial)?;
    let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
    for suffix in ["", "-wal", "-shm"] {
        let old = path.with_file_name(format!("{name}{suffix}"));
        if old.exists() {
            let kept = path.with_file_name(format!("{name}.before-restore{suffix}"));
            std::fs::rename(&old, &kept).map_err(io(&kept))?;
        }
    }
    std::fs::rename(&partial, path).map_err(io(path))?;
    sync_parent(path)?;
    let size = std::fs::metadata(path).map_err(io(path))?.len();
    Ok(SnapshotInfo { revision, size })
}

/// Replaces the store of `config` with the state at the last revision of an etcd snapshot
/// (etcd's own file, as `tugboat snapshot save --datastore-endpoint` or `etcdctl snapshot
/// save` write it): every live key, written into a new store file that is then restored as
/// [`restore_snapshot`] does. Revisions start afresh (clients list again).
pub async fn restore_etcd_snapshot(source: &Path, config: &SqliteConfig) -> Result<SnapshotInfo> {
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| StoreError::Io { path, source }
    };
    let bytes = std::fs::read(source).map_err(io(source))?;
    let state = crate::bbolt::etcd_state(&bytes)
        .map_err(|reason| StoreError::Damaged { path: source.to_path_buf(), reason })?;
    // (Its lock file is the store's own: a running server makes this fail as "in use".)
    let staging = config.path.with_extension("from-etcd");
    let copy = config.path.with_extension("from-etcd.snapshot");
    let clean = || {
        for path in [staging.clone(), copy.clone()] {
            let name = path.file_name().unwrap_or_default().to_string_lossy().into_owned();
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(path.with_file_name(format!("{name}{suffix}")));
            }
        }
    };
    clean();
    let result = async {
        let store = SqliteStore::open(SqliteConfig { path: staging.clone(), watch_buffer: 16 })?;
        let entries: Vec<(String, Vec<u8>)> =
            state.into_iter().filter_map(|(key, value)| String::from_utf8(key).ok().map(|key| (key, value))).collect();
        // Many writes in flight, so the writer commits them in groups.
        for chunk in entries.chunks(256) {
            let writes = chunk.iter().map(|(key, value)| store.create(key, value.clone()));
            for written in futures::future::join_all(writes).await {
                written?;
            }
        }
        drop(store);
        let (from, to) = (staging.clone(), copy.clone());
        tokio::task::spawn_blocking(move || snapshot_file(&from, &to)).await.map_err(|_| StoreError::Closed)??;
        restore_snapshot(&copy, config)
    }
    .await;
    clean();
    result
}

/// Takes `<file>.lock` beside the store file `path` (held while the returned file is open);
/// fails with [`StoreError::Locked`] when another process holds it.
fn lock(path: &Path) -> Result<File> {
    let lock_path = path.with_extension("lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|source| StoreError::Io { path: lock_path.clone(), source })?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(StoreError::Locked { path: path.to_path_buf() }),
        Err(std::fs::TryLockError::Error(source)) => Err(StoreError::Io { path: lock_path, source }),
    }
}

/// fsyncs the directory holding `path`, so a rename into it is durable.
fn sync_parent(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(|source| StoreError::Io { path: dir.to_path_buf(), source })?;
    }
    Ok(())
}

/// One watch: catches up from the log, then follows the live events; falls back to the log
/// whenever it lags behind the in-memory buffer.
struct Watcher {
    shared: Arc<Shared>,
    start: Vec<u8>,
    end: Option<Vec<u8>>,
    /// The revision of the last event delivered (or the watch's start).
    last: Revision,
    tx: mpsc::Sender<Result<Event>>,
}

impl Watcher {
    async fn run(mut self, first: Vec<Event>, mut live: broadcast::Receiver<Arc<Vec<Event>>>) {
        let mut backlog = Some(first);
        loop {
            // Catch up from the log.
            loop {
                let events = match backlog.take() {
                    Some(events) => events,
                    None => match self.read_log().await {
                        Ok(events) => events,
                        Err(error) => {
                            let _ = self.tx.send(Err(error)).await;
                            return;
                        }
                    },
                };
                let full = events.len() as i64 >= CATCH_UP_BATCH;
                for event in events {
                    if !self.deliver(event).await {
                        return;
                    }
                }
                if !full {
                    break;
                }
            }
            // Follow live events until we lag.
            loop {
                let received = tokio::select! {
                    received = live.recv() => received,
                    _ = self.tx.closed() => return,
                };
                match received {
                    Ok(events) => {
                        for event in events.iter() {
                            if event.revision() > self.last
                                && self.matches(&event.kv.key)
                                && !self.deliver(event.clone()).await
                            {
                                return;
                            }
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(_)) => {
                        live = live.resubscribe();
                        break;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        let _ = self.tx.send(Err(StoreError::Closed)).await;
                        return;
                    }
                }
            }
        }
    }

    fn matches(&self, key: &str) -> bool {
        let key = key.as_bytes();
        key >= self.start.as_slice() && self.end.as_deref().is_none_or(|end| key < end)
    }

    async fn deliver(&mut self, event: Event) -> bool {
        if event.revision() <= self.last {
            return true;
        }
        self.last = event.revision();
        self.tx.send(Ok(event)).await.is_ok()
    }

    async fn read_log(&self) -> Result<Vec<Event>> {
        let (shared, start, end, after) = (self.shared.clone(), self.start.clone(), self.end.clone(), self.last);
        tokio::task::spawn_blocking(move || {
            shared.read(|conn| read_events(conn, &start, end.as_deref(), after, CATCH_UP_BATCH))
        })
        .await
        .map_err(|_| StoreError::Closed)??
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn cached_statements_are_not_prepared_again_for_each_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(SqliteConfig::in_data_dir(dir.path())).unwrap();
        for i in 0..20 {
            store.create(&format!("/k{i}"), b"v".to_vec()).await.unwrap();
            assert!(store.get(&format!("/k{i}"), None).await.unwrap().is_some());
        }
        let reprepared = store
            .shared
            .read(|conn| Ok(conn.prepare_cached(GET)?.get_status(rusqlite::StatementStatus::RePrepare)))
            .unwrap();
        assert_eq!(reprepared, 0, "a lookup by key re-planned its statement");
    }
}
