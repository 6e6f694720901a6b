//! Opening, creating and recognising the database file. The layout is described in
//! `crates/store/DESIGN.md`.

use std::path::Path;

use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension};

use crate::{Revision, StoreError};

/// `PRAGMA application_id` of a Tugboat store ("TGBT"): how we tell our file from any other
/// SQLite database.
pub(crate) const APPLICATION_ID: i32 = 0x5447_4254;
/// `PRAGMA user_version`: the schema version this build reads and writes.
/// 2 added `log.version` (etcd's per-key write count); a version-1 file is migrated at open.
pub(crate) const SCHEMA_VERSION: i32 = 2;

const CREATE_SCHEMA: &str = "
CREATE TABLE log (
    revision INTEGER PRIMARY KEY,   -- global, strictly increasing; one row per write
    key      BLOB    NOT NULL,      -- compared bytewise
    created  INTEGER NOT NULL,      -- revision that created this incarnation of the key
    prev     INTEGER NOT NULL,      -- revision of the previous live value of the key, 0 if none
    deleted  INTEGER NOT NULL,      -- 1 for a tombstone
    value    BLOB    NOT NULL,
    version  INTEGER NOT NULL DEFAULT 0 -- writes of this incarnation so far (etcd's version); 0: tombstone
);
CREATE INDEX log_key_revision ON log (key, revision);
CREATE TABLE meta (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;
INSERT INTO meta (name, value) VALUES ('compact_revision', 0);
";

/// Maps a SQLite error on `path` to a store error, telling corruption apart.
pub(crate) fn sqlite_error(path: &Path, source: rusqlite::Error) -> StoreError {
    match source.sqlite_error_code() {
        Some(ErrorCode::NotADatabase | ErrorCode::DatabaseCorrupt) => {
            StoreError::Corrupt { path: path.to_path_buf(), source }
        }
        _ => StoreError::Sqlite { path: path.to_path_buf(), source },
    }
}

/// A copy of a SQLite error, for answering every request of a failed group commit.
pub(crate) fn copy_error(error: &rusqlite::Error) -> rusqlite::Error {
    match error {
        rusqlite::Error::SqliteFailure(code, message) => rusqlite::Error::SqliteFailure(*code, message.clone()),
        other => rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_ERROR),
            Some(other.to_string()),
        ),
    }
}

fn configure(conn: &Connection) -> rusqlite::Result<()> {
    // WAL: readers never block the writer. synchronous=FULL: a commit returns only after the
    // WAL is fsync'd, so an acknowledged write survives kill -9 and power loss.
    // Checkpoint every 10,000 pages (~40 MiB) rather than SQLite's 1,000: hot pages (the log's
    // tail, busy index leaves) are rewritten many times between checkpoints and copied once,
    // which took 32 concurrent writers from ~17k to ~21k durable writes/s here.
    let mode: String = conn.query_row("PRAGMA journal_mode = WAL", [], |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_CANTOPEN),
            Some(format!("cannot switch to WAL mode (journal mode is {mode})")),
        ));
    }
    conn.execute_batch(
        "PRAGMA synchronous = FULL;
         PRAGMA journal_size_limit = 67108864;
         PRAGMA foreign_keys = OFF;
         PRAGMA wal_autocheckpoint = 10000;",
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(5))?;
    stable_plans(conn)
}

/// Query-planner stability: a cached statement keeps its plan whatever is bound to it. Without
/// it, SQLite (built with STAT4) marks a statement to be re-prepared whenever a parameter the
/// planner looked at is bound again: every lookup by key parsed and planned its SQL anew, 8 %
/// of the server's CPU in apibench's create phase. Our statements have one good plan each.
fn stable_plans(conn: &Connection) -> rusqlite::Result<()> {
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true).map(|_| ())
}

/// Refuses a file shorter than its own header says: a truncated copy would otherwise open and
/// quietly miss part of its history until a read hit the missing pages.
fn check_length(path: &Path) -> Result<(), StoreError> {
    use std::io::Read;
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(source) => {
            return Err(StoreError::Io { path: path.to_path_buf(), source });
        }
    };
    let length = file.metadata().map_err(|source| StoreError::Io { path: path.to_path_buf(), source })?.len();
    let mut header = [0u8; 100];
    if length == 0 {
        return Ok(());
    }
    if length < 100 || file.read_exact(&mut header).is_err() || &header[..16] != b"SQLite format 3\0" {
        // Not a SQLite file at all: SQLite itself reports that (NOTADB) below.
        return Ok(());
    }
    let page_size = match u16::from_be_bytes([header[16], header[17]]) {
        1 => 65536,
        size => u64::from(size),
    };
    let change_counter = &header[24..28];
    let valid_for = &header[92..96];
    let pages = u64::from(u32::from_be_bytes([header[28], header[29], header[30], header[31]]));
    // Pages may legitimately live only in the WAL (a checkpoint interrupted by a full disk
    // writes page 1 before the rest); SQLite reads them from there.
    let wal = path.with_file_name(format!("{}-wal", path.file_name().unwrap_or_default().to_string_lossy()));
    let wal_length = std::fs::metadata(&wal).map(|m| m.len()).unwrap_or(0);
    if wal_length == 0 && change_counter == valid_for && pages > 0 && length < pages * page_size {
        return Err(StoreError::Damaged {
            path: path.to_path_buf(),
            reason: format!(
                "the file is truncated: {length} bytes, but its header counts {pages} pages of {page_size} bytes"
            ),
        });
    }
    Ok(())
}

/// Opens (creating if needed) the writer connection and checks that the file is ours.
pub(crate) fn open_writer(path: &Path) -> Result<Connection, StoreError> {
    check_length(path)?;
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_CREATE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| sqlite_error(path, e))?;
    let err = |e| sqlite_error(path, e);

    let application_id: i32 = conn.query_row("PRAGMA application_id", [], |row| row.get(0)).map_err(err)?;
    let tables: i64 = conn.query_row("SELECT count(*) FROM sqlite_master", [], |row| row.get(0)).map_err(err)?;

    if application_id == 0 && tables == 0 {
        // A new (or empty) file: lay out the schema. auto_vacuum must be set before the first
        // table exists; INCREMENTAL lets compaction hand freed pages back to the file system.
        conn.execute_batch("PRAGMA auto_vacuum = INCREMENTAL").map_err(err)?;
        configure(&conn).map_err(err)?;
        conn.execute_batch(&format!(
            "BEGIN IMMEDIATE;
             {CREATE_SCHEMA}
             PRAGMA application_id = {APPLICATION_ID};
             PRAGMA user_version = {SCHEMA_VERSION};
             COMMIT;"
        ))
        .map_err(err)?;
        return Ok(conn);
    }
    if application_id != APPLICATION_ID {
        return Err(StoreError::Foreign {
            path: path.to_path_buf(),
            reason: format!(
                "it is a SQLite database with {tables} schema objects and application_id {application_id:#x}, \
                 not {APPLICATION_ID:#x}; refusing to touch it"
            ),
        });
    }
    let version: i32 = conn.query_row("PRAGMA user_version", [], |row| row.get(0)).map_err(err)?;
    if !(1..=SCHEMA_VERSION).contains(&version) {
        return Err(StoreError::Foreign {
            path: path.to_path_buf(),
            reason: format!("schema version {version} is not supported by this build (it reads {SCHEMA_VERSION})"),
        });
    }
    configure(&conn).map_err(err)?;
    if version == 1 {
        migrate_to_versions(&conn).map_err(err)?;
    }
    Ok(conn)
}

/// Schema 1 → 2: `log.version`, filled from the log as it is: each live row counts the live
/// rows of its key's incarnation up to it (history compacted away before is not counted, so
/// a key's version may start lower than etcd's would; it grows from there as etcd's does).
fn migrate_to_versions(conn: &Connection) -> rusqlite::Result<()> {
    conn.execute_batch(
        "BEGIN IMMEDIATE;
         ALTER TABLE log ADD COLUMN version INTEGER NOT NULL DEFAULT 0;
         UPDATE log SET version = (
             SELECT count(*) FROM log AS o
             WHERE o.key = log.key AND o.created = log.created AND o.deleted = 0 AND o.revision <= log.revision
         ) WHERE deleted = 0;
         PRAGMA user_version = 2;
         COMMIT;",
    )
}

/// Checks, without changing it, that the file at `path` is a whole store of this schema (a
/// snapshot about to be restored): its header, identity, integrity and revisions. Returns its
/// (latest, compacted) revisions.
pub(crate) fn verify(path: &Path) -> Result<(Revision, Revision), StoreError> {
    check_length(path)?;
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| sqlite_error(path, e))?;
    let err = |e| sqlite_error(path, e);
    let application_id: i32 = conn.query_row("PRAGMA application_id", [], |row| row.get(0)).map_err(err)?;
    let version: i32 = conn.query_row("PRAGMA user_version", [], |row| row.get(0)).map_err(err)?;
    // An older schema is migrated when the restored file is opened.
    if application_id != APPLICATION_ID || !(1..=SCHEMA_VERSION).contains(&version) {
        return Err(StoreError::Foreign {
            path: path.to_path_buf(),
            reason: format!(
                "application_id {application_id:#x} and schema version {version}: not a Tugboat store \
                 snapshot this build reads ({APPLICATION_ID:#x}, {SCHEMA_VERSION})"
            ),
        });
    }
    let check: String = conn.query_row("PRAGMA quick_check", [], |row| row.get(0)).map_err(err)?;
    if check != "ok" {
        return Err(StoreError::Damaged { path: path.to_path_buf(), reason: check });
    }
    load_revisions(&conn).map_err(err)
}

/// Opens a connection for the read pool.
pub(crate) fn open_reader(path: &Path) -> Result<Connection, StoreError> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags).map_err(|e| sqlite_error(path, e))?;
    conn.execute_batch("PRAGMA query_only = 1").map_err(|e| sqlite_error(path, e))?;
    stable_plans(&conn).map_err(|e| sqlite_error(path, e))?;
    conn.busy_timeout(std::time::Duration::from_secs(5)).map_err(|e| sqlite_error(path, e))?;
    Ok(conn)
}

/// The latest revision and the compact revision recorded in the file. Reading the whole log
/// index here also makes a damaged file fail at open rather than at the first request.
pub(crate) fn load_revisions(conn: &Connection) -> rusqlite::Result<(Revision, Revision)> {
    let compacted = compact_revision(conn)?;
    let latest: Option<Revision> =
        conn.query_row("SELECT max(revision) FROM log", [], |row| row.get(0)).optional()?.flatten();
    Ok((latest.unwrap_or(0).max(compacted), compacted))
}

/// The compact revision as the connection's current transaction sees it.
pub(crate) fn compact_revision(conn: &Connection) -> rusqlite::Result<Revision> {
    conn.prepare_cached("SELECT value FROM meta WHERE name = 'compact_revision'")?.query_row([], |row| row.get(0))
}
