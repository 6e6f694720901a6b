//! Bad input to the SQLite store: corrupt, foreign, truncated files and a full disk. Each gives
//! a clear error naming the file; none panics or silently loses history.

use std::path::{Path, PathBuf};
use std::process::Command;

use tugboat_store::{SqliteConfig, SqliteStore, Store, StoreError};

fn db_path(dir: &Path) -> PathBuf {
    SqliteConfig::in_data_dir(dir).path
}

fn open_err(dir: &Path) -> StoreError {
    SqliteStore::open(SqliteConfig::in_data_dir(dir)).expect_err("the store must refuse this file")
}

#[test]
fn a_file_of_garbage_is_reported_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(dir.path());
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    let garbage: Vec<u8> = (0..64 * 1024u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    std::fs::write(&path, &garbage).unwrap();
    let error = open_err(dir.path());
    assert!(matches!(error, StoreError::Corrupt { .. }), "{error:?}");
    let message = error.to_string();
    assert!(message.contains(path.to_str().unwrap()), "names the file: {message}");
    assert_eq!(std::fs::read(&path).unwrap(), garbage, "the file is left as it was");
}

#[test]
fn another_programs_database_is_refused_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(dir.path());
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch("CREATE TABLE accounts (id INTEGER, owner TEXT); INSERT INTO accounts VALUES (1, 'x');")
            .unwrap();
    }
    let before = std::fs::read(&path).unwrap();
    let error = open_err(dir.path());
    assert!(matches!(error, StoreError::Foreign { .. }), "{error:?}");
    assert!(error.to_string().contains(path.to_str().unwrap()), "{error}");
    assert!(error.to_string().contains("not a tugboat store"), "{error}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = db_path(dir.path());
    {
        let store = SqliteStore::open(SqliteConfig::in_data_dir(dir.path())).unwrap();
        for i in 0..2000 {
            store.create(&format!("/t/{i}"), vec![b'x'; 512]).await.unwrap();
        }
        // Move everything from the WAL into the main file, as a clean shutdown eventually does.
        let current = store.current_revision().await.unwrap();
        store.compact(current).await.unwrap();
    }
    let length = std::fs::metadata(&path).unwrap().len();
    assert!(length > 1_000_000, "{length}");
    let _ = std::fs::remove_file(path.with_extension("db-wal"));
    let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
    file.set_len(length / 2).unwrap();
    drop(file);
    let error = open_err(dir.path());
    assert!(matches!(error, StoreError::Damaged { .. } | StoreError::Corrupt { .. }), "{error:?}");
    assert!(error.to_string().contains(path.to_str().unwrap()), "{error}");
}

#[test]
fn a_directory_in_place_of_the_file_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(db_path(dir.path())).unwrap();
    let error = open_err(dir.path());
    assert!(error.to_string().contains("state.db"), "{error}");
}

/// A small tmpfs mounted on a temp dir, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tugboat-test", dir.path().to_str().unwrap()])
            .status();
        match status {
            Ok(s) if s.success() => Some(Tmpfs { dir }),
            _ => None,
        }
    }

    fn resize(&self, size: &str) {
        let ok = Command::new("mount")
            .args(["-o", &format!("remount,size={size}"), self.dir.path().to_str().unwrap()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "remount");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.dir.path()).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_disk_fails_writes_clearly_and_loses_nothing_acknowledged() {
    let Some(fs) = Tmpfs::mount("3m") else {
        eprintln!("skipped: mounting a tmpfs needs root (CI runs as root)");
        return;
    };
    let path = db_path(fs.dir.path());
    let mut acknowledged = Vec::new();
    let failure = {
        let store = SqliteStore::open(SqliteConfig::in_data_dir(fs.dir.path())).unwrap();
        let mut failure = None;
        for i in 0..20_000 {
            let key = format!("/full/{i:05}");
            match store.create(&key, vec![b'x'; 1024]).await {
                Ok(revision) => acknowledged.push((key, revision)),
                Err(error) => {
                    failure = Some(error);
                    break;
                }
            }
        }
        let failure = failure.expect("a 3 MiB file system fills up");
        // The store still serves reads of everything it acknowledged.
        for (key, revision) in &acknowledged {
            assert_eq!(store.get(key, None).await.unwrap().unwrap().mod_revision, *revision);
        }
        // And keeps refusing writes cleanly rather than dying.
        assert!(store.create("/full/more", vec![b'x'; 4096]).await.is_err());
        failure
    };
    let message = failure.to_string();
    assert!(matches!(failure, StoreError::Sqlite { .. }), "{failure:?}");
    assert!(message.contains(path.to_str().unwrap()), "names the file: {message}");
    assert!(message.contains("full"), "says the disk is full: {message}");
    assert!(acknowledged.len() > 100, "{}", acknowledged.len());

    // With room again, the same file opens with every acknowledged write, and takes new ones.
    fs.resize("64m");
    let store = SqliteStore::open(SqliteConfig::in_data_dir(fs.dir.path())).unwrap();
    for (key, revision) in &acknowledged {
        let kv = store.get(key, None).await.unwrap().unwrap_or_else(|| panic!("{key} lost"));
        assert_eq!(kv.mod_revision, *revision);
    }
    let next = store.create("/full/after", b"ok".to_vec()).await.unwrap();
    assert!(next > acknowledged.last().unwrap().1);
}
