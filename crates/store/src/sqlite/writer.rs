//! The single writer: one thread owns the write connection and commits requests in groups, so
//! concurrent writers share one fsync (group commit). Compaction runs on the same thread, one
//! chunk between two groups, so it never stalls writes for long.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{broadcast, oneshot};

use super::Shared;
use super::schema::{copy_error, sqlite_error};
use crate::{Event, EventKind, KeyValue, Revision, StoreError};

/// Most requests committed in one transaction.
const MAX_GROUP: usize = 4096;
/// Longest a group waits for more writers to join it.
const LINGER: Duration = Duration::from_micros(300);
/// Revisions of history examined by one compaction chunk.
const COMPACTION_CHUNK: Revision = 10_000;

#[derive(Debug)]
pub(crate) enum Op {
    Create { key: String, value: Vec<u8> },
    Update { key: String, value: Vec<u8>, expected: Revision },
    Delete { key: String, expected: Option<Revision> },
    /// Create or update, whatever the key holds (etcd's Put).
    Put { key: String, value: Vec<u8> },
}

#[derive(Debug)]
pub(crate) enum Outcome {
    Put(Revision),
    Deleted(Revision, KeyValue),
    /// An `Op::Put`: its revision and what the key held before.
    Replaced(Revision, Option<KeyValue>),
}

#[derive(Debug)]
pub(crate) enum Request {
    Write(Op, oneshot::Sender<Result<Outcome, StoreError>>),
    Compact(Revision, oneshot::Sender<Result<(), StoreError>>),
    /// Give free pages back to the file system and trim the WAL (etcd's defragment).
    Defragment(oneshot::Sender<Result<(), StoreError>>),
}

/// The latest row of a key.
struct Latest {
    revision: Revision,
    created: Revision,
    deleted: bool,
    value: Vec<u8>,
    version: i64,
}

#[derive(Debug)]
struct Compaction {
    target: Revision,
    /// Next revision window to examine.
    cursor: Revision,
    /// 1: drop superseded values; 2: drop tombstones (only after phase 1 is complete, else a
    /// dropped tombstone could resurrect the value it deleted).
    phase: u8,
    waiters: Vec<oneshot::Sender<Result<(), StoreError>>>,
}

pub(crate) struct Writer {
    pub conn: Connection,
    pub path: PathBuf,
    pub shared: Arc<Shared>,
    pub events: broadcast::Sender<Arc<Vec<Event>>>,
}

impl Writer {
    pub fn run(mut self, requests: Receiver<Request>) {
        let mut compaction: Option<Compaction> = None;
        let mut last_group_size = 1;
        loop {
            let first = if compaction.is_some() {
                match requests.try_recv() {
                    Ok(request) => Some(request),
                    Err(TryRecvError::Empty) => None,
                    Err(TryRecvError::Disconnected) => break,
                }
            } else {
                match requests.recv() {
                    Ok(request) => Some(request),
                    Err(_) => break,
                }
            };
            if let Some(first) = first {
                let mut group = Vec::with_capacity(16);
                let mut next = Some(first);
                let mut linger_until: Option<Instant> = None;
                while let Some(request) = next.take() {
                    match request {
                        Request::Write(op, reply) => group.push((op, reply)),
                        Request::Compact(target, reply) => self.start_compaction(target, reply, &mut compaction),
                        Request::Defragment(reply) => {
                            let reclaimed = self.reclaim().map_err(|e| sqlite_error(&self.path, e));
                            let _ = reply.send(reclaimed);
                        }
                    }
                    if group.len() < MAX_GROUP {
                        next = requests.try_recv().ok();
                        // With many concurrent writers, the tasks just answered are still
                        // preparing their next write: wait a moment for as many as came last
                        // time, so they share this fsync instead of paying for the next one.
                        // A lone writer (last group of 1) never waits.
                        if next.is_none() && group.len() < last_group_size {
                            let deadline = linger_until.get_or_insert_with(|| Instant::now() + LINGER);
                            let left = deadline.saturating_duration_since(Instant::now());
                            next = requests.recv_timeout(left).ok();
                        }
                    }
                }
                last_group_size = group.len().min(MAX_GROUP);
                if !group.is_empty() {
                    self.commit_group(group);
                }
            }
            if let Some(mut running) = compaction.take() {
                match self.compaction_step(&mut running) {
                    Ok(true) => {
                        self.reclaim_space();
                        for waiter in running.waiters {
                            let _ = waiter.send(Ok(()));
                        }
                    }
                    Ok(false) => compaction = Some(running),
                    Err(error) => {
                        tracing::warn!(%error, "compaction failed");
                        for waiter in running.waiters {
                            let _ = waiter.send(Err(self.error(copy_error(&error))));
                        }
                    }
                }
            }
        }
        if let Some(running) = compaction {
            for waiter in running.waiters {
                let _ = waiter.send(Err(StoreError::Closed));
            }
        }
    }

    fn error(&self, source: rusqlite::Error) -> StoreError {
        sqlite_error(&self.path, source)
    }

    /// Applies a group of writes in one transaction and one fsync, then answers every request
    /// and publishes the events. A database error fails the whole group: nothing of it was
    /// acknowledged, so nothing is lost.
    fn commit_group(&mut self, group: Vec<(Op, oneshot::Sender<Result<Outcome, StoreError>>)>) {
        let base = self.shared.current.load(Ordering::SeqCst);
        let mut outcomes = Vec::with_capacity(group.len());
        let mut events = Vec::with_capacity(group.len());
        let conn = &self.conn;
        let result = (|| -> rusqlite::Result<()> {
            conn.prepare_cached("BEGIN IMMEDIATE")?.execute([])?;
            let mut next = base + 1;
            for (op, _) in &group {
                match apply(conn, op, next)? {
                    Ok((outcome, event)) => {
                        next += 1;
                        outcomes.push(Ok(outcome));
                        events.push(event);
                    }
                    Err(refused) => outcomes.push(Err(refused)),
                }
            }
            conn.prepare_cached("COMMIT")?.execute([])?;
            Ok(())
        })();
        if result.is_err() && !conn.is_autocommit() {
            let _ = conn.execute_batch("ROLLBACK");
        }
        match result {
            Ok(()) => {
                if let Some(last) = events.last() {
                    self.shared.current.store(last.revision(), Ordering::SeqCst);
                }
                for ((_, reply), outcome) in group.into_iter().zip(outcomes) {
                    let _ = reply.send(outcome);
                }
                if !events.is_empty() {
                    // No receiver is fine: watchers catch up from the log.
                    let _ = self.events.send(Arc::new(events));
                }
            }
            Err(error) => {
                tracing::warn!(error = %error, path = %self.path.display(), "group commit failed");
                for (_, reply) in group {
                    let _ = reply.send(Err(self.error(copy_error(&error))));
                }
            }
        }
    }

    fn start_compaction(
        &mut self,
        target: Revision,
        reply: oneshot::Sender<Result<(), StoreError>>,
        compaction: &mut Option<Compaction>,
    ) {
        let current = self.shared.current.load(Ordering::SeqCst);
        if target > current {
            let _ = reply.send(Err(StoreError::FutureRevision { requested: target, current }));
            return;
        }
        if let Some(running) = compaction
            && target <= running.target
        {
            running.waiters.push(reply);
            return;
        }
        if target <= self.shared.compacted.load(Ordering::SeqCst) && compaction.is_none() {
            let _ = reply.send(Ok(()));
            return;
        }
        // Record the new compact revision first: from here on, reads and watches below it fail
        // with Compacted instead of seeing history that is being removed.
        let recorded =
            self.conn.execute("UPDATE meta SET value = ?1 WHERE name = 'compact_revision' AND value < ?1", [target]);
        if let Err(error) = recorded {
            let _ = reply.send(Err(self.error(error)));
            return;
        }
        self.shared.compacted.fetch_max(target, Ordering::SeqCst);
        let oldest: Revision =
            self.conn.query_row("SELECT coalesce(min(revision), 0) FROM log", [], |row| row.get(0)).unwrap_or(0);
        let mut waiters = compaction.take().map(|c| c.waiters).unwrap_or_default();
        waiters.push(reply);
        *compaction = Some(Compaction { target, cursor: oldest, phase: 1, waiters });
    }

    /// Removes one window of compacted history. Returns whether compaction is complete.
    fn compaction_step(&mut self, c: &mut Compaction) -> rusqlite::Result<bool> {
        let end = (c.cursor + COMPACTION_CHUNK).min(c.target);
        if c.cursor < end {
            if c.phase == 1 {
                // A value is history once a newer write to its key, itself older than the
                // target, exists; the newest value at or before the target always stays, and so
                // does the previous value of every event at or after the target.
                self.conn.execute(
                    "DELETE FROM log WHERE revision >= ?1 AND revision < ?2 AND EXISTS (
                        SELECT 1 FROM log AS newer
                        WHERE newer.key = log.key AND newer.revision > log.revision AND newer.revision < ?3)",
                    params![c.cursor, end, c.target],
                )?;
            } else {
                self.conn.execute(
                    "DELETE FROM log WHERE revision >= ?1 AND revision < ?2 AND deleted = 1",
                    params![c.cursor, end],
                )?;
            }
        }
        c.cursor = end;
        if c.cursor < c.target {
            return Ok(false);
        }
        if c.phase == 1 {
            c.phase = 2;
            c.cursor = self.conn.query_row("SELECT coalesce(min(revision), 0) FROM log", [], |row| row.get(0))?;
            return Ok(false);
        }
        Ok(true)
    }

    /// Hands the pages freed by compaction back to the file system and trims the WAL.
    fn reclaim_space(&mut self) {
        if let Err(error) = self.reclaim() {
            tracing::warn!(%error, "reclaiming space after compaction failed");
        }
    }

    fn reclaim(&mut self) -> rusqlite::Result<()> {
        // incremental_vacuum frees one page per step: run it to the end.
        let mut vacuum = self.conn.prepare("PRAGMA incremental_vacuum")?;
        let mut rows = vacuum.query([])?;
        while rows.next()?.is_some() {}
        drop(rows);
        drop(vacuum);
        self.conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
    }
}

/// Applies one write at revision `revision` inside the group's transaction. The outer `Result`
/// is a database failure (fails the group); the inner one a refusal (conflict, missing key...).
#[allow(clippy::type_complexity)]
fn apply(tx: &Connection, op: &Op, revision: Revision) -> rusqlite::Result<Result<(Outcome, Event), StoreError>> {
    let key = match op {
        Op::Create { key, .. } | Op::Update { key, .. } | Op::Delete { key, .. } | Op::Put { key, .. } => key,
    };
    let latest = latest(tx, key)?.filter(|l| !l.deleted);
    let insert = |created: Revision, prev: Revision, deleted: bool, value: &[u8], version: i64| {
        tx.prepare_cached(
            "INSERT INTO log (revision, key, created, prev, deleted, value, version)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![revision, key.as_bytes(), created, prev, deleted, value, version])
    };
    let kv = |value: Vec<u8>, create_revision: Revision, mod_revision: Revision, version: i64| KeyValue {
        key: key.clone(),
        value,
        create_revision,
        mod_revision,
        version,
    };
    Ok(match (op, latest) {
        (Op::Put { value, .. }, None) => {
            insert(revision, 0, false, value, 1)?;
            let event = Event { kind: EventKind::Put, kv: kv(value.clone(), revision, revision, 1), prev: None };
            Ok((Outcome::Replaced(revision, None), event))
        }
        (Op::Put { value, .. }, Some(current)) => {
            let version = current.version + 1;
            insert(current.created, current.revision, false, value, version)?;
            let prev = kv(current.value, current.created, current.revision, current.version);
            let kv = kv(value.clone(), current.created, revision, version);
            let event = Event { kind: EventKind::Put, kv, prev: Some(prev.clone()) };
            Ok((Outcome::Replaced(revision, Some(prev)), event))
        }
        (Op::Create { .. }, Some(_)) => Err(StoreError::AlreadyExists { key: key.clone() }),
        (Op::Create { value, .. }, None) => {
            insert(revision, 0, false, value, 1)?;
            let event = Event { kind: EventKind::Put, kv: kv(value.clone(), revision, revision, 1), prev: None };
            Ok((Outcome::Put(revision), event))
        }
        (Op::Update { .. } | Op::Delete { .. }, None) => Err(StoreError::NotFound { key: key.clone() }),
        (Op::Update { expected, .. } | Op::Delete { expected: Some(expected), .. }, Some(current))
            if current.revision != *expected =>
        {
            Err(StoreError::Conflict { key: key.clone(), expected: *expected, current: current.revision })
        }
        (Op::Update { value, .. }, Some(current)) => {
            let version = current.version + 1;
            insert(current.created, current.revision, false, value, version)?;
            let prev = kv(current.value, current.created, current.revision, current.version);
            let event =
                Event { kind: EventKind::Put, kv: kv(value.clone(), current.created, revision, version), prev: Some(prev) };
            Ok((Outcome::Put(revision), event))
        }
        (Op::Delete { .. }, Some(current)) => {
            insert(current.created, current.revision, true, &[], 0)?;
            let prev = kv(current.value, current.created, current.revision, current.version);
            let event =
                Event { kind: EventKind::Delete, kv: kv(Vec::new(), 0, revision, 0), prev: Some(prev.clone()) };
            Ok((Outcome::Deleted(revision, prev), event))
        }
    })
}

fn latest(conn: &Connection, key: &str) -> rusqlite::Result<Option<Latest>> {
    conn.prepare_cached(
        "SELECT revision, created, deleted, value, version FROM log WHERE key = ?1 ORDER BY revision DESC LIMIT 1",
    )?
    .query_row([key.as_bytes()], |row| {
        Ok(Latest {
            revision: row.get(0)?,
            created: row.get(1)?,
            deleted: row.get(2)?,
            value: row.get(3)?,
            version: row.get(4)?,
        })
    })
    .optional()
}
