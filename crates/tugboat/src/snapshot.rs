//! `tugboat snapshot save|restore` and the server's scheduled snapshots.
//!
//! A snapshot of the embedded store is a compact copy of its SQLite file (taken from one read
//! transaction while the server runs); of etcd, etcd's own snapshot (its maintenance API),
//! which etcdctl restores into etcd and `snapshot restore` into an embedded store. The
//! store also holds the cluster's CA and service-account key (`/tugboat/pki/`), so a server
//! started on a restored data dir — even on a fresh machine — is the same cluster: nodes'
//! certificates and pods' tokens stay valid.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use clap::Subcommand;
use tugboat_store::{EtcdConfig, EtcdStore, SqliteConfig, Store};

#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Write a consistent copy of the cluster's store to FILE (the server may be running).
    Save {
        file: PathBuf,
        /// The server's data dir (the embedded store in <data-dir>/db).
        #[arg(long, default_value = "/var/lib/tugboat", env = "TUGBOAT_DATA_DIR")]
        data_dir: PathBuf,
        /// Take etcd's snapshot instead: the server's comma-separated http(s)://host:2379 URLs.
        #[arg(long)]
        datastore_endpoint: Option<String>,
    },
    /// Replace the embedded store of a data dir with FILE (stop the server first): a snapshot
    /// of the embedded store, or of etcd (its objects at the snapshot's last revision). The
    /// data dir may be empty: a new machine becomes the cluster's server. The replaced store is
    /// kept as <data-dir>/db/state.db.before-restore.
    Restore {
        file: PathBuf,
        #[arg(long, default_value = "/var/lib/tugboat", env = "TUGBOAT_DATA_DIR")]
        data_dir: PathBuf,
    },
}

pub async fn run(command: SnapshotCommand) -> anyhow::Result<()> {
    match command {
        SnapshotCommand::Save { file, data_dir, datastore_endpoint } => {
            let info = match datastore_endpoint {
                Some(endpoints) => {
                    let store = EtcdStore::connect(EtcdConfig::from_endpoint_list(&endpoints)?).await?;
                    store.snapshot(&file).await?
                }
                None => {
                    let source = SqliteConfig::in_data_dir(&data_dir).path;
                    let dest = file.clone();
                    tokio::task::spawn_blocking(move || tugboat_store::snapshot_file(&source, &dest))
                        .await?
                        .with_context(|| format!("no store to save in {}", data_dir.display()))?
                }
            };
            restrict(&file);
            println!("snapshot saved: revision {}, {} bytes", info.revision, info.size);
        }
        SnapshotCommand::Restore { file, data_dir } => {
            let config = SqliteConfig::in_data_dir(&data_dir);
            let restored = if is_etcd_snapshot(&file) {
                tugboat_store::restore_etcd_snapshot(&file, &config).await
            } else {
                tugboat_store::restore_snapshot(&file, &config)
            };
            let info = restored.map_err(|error| match error {
                tugboat_store::StoreError::Locked { .. } => {
                    anyhow::anyhow!("the store in {} is in use: stop the server before restoring", data_dir.display())
                }
                error => anyhow::anyhow!("cannot restore {}: {error}", file.display()),
            })?;
            println!(
                "restored revision {} into {}; start the server with --data-dir {}",
                info.revision,
                config.path.display(),
                data_dir.display()
            );
        }
    }
    Ok(())
}

/// Whether `file` is etcd's (a bbolt database) rather than a copy of the embedded store.
fn is_etcd_snapshot(file: &Path) -> bool {
    use std::io::Read;
    let mut head = [0u8; 20];
    std::fs::File::open(file).and_then(|mut f| f.read_exact(&mut head)).is_ok()
        && tugboat_store::looks_like_bbolt(&head)
}

/// Snapshots hold every Secret and the cluster's keys: owner only.
fn restrict(file: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(file, std::fs::Permissions::from_mode(0o600));
}

/// Takes a snapshot of `store` into `dir` every `interval`, keeping the newest `retention`.
pub fn schedule(store: std::sync::Arc<dyn Store>, dir: PathBuf, interval: Duration, retention: usize, etcd: bool) {
    let prefix = if etcd { "etcd-" } else { "tugboat-" };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            if let Err(error) = std::fs::create_dir_all(&dir) {
                tracing::warn!(dir = %dir.display(), %error, "cannot make the snapshot dir");
                continue;
            }
            let file = dir.join(format!("{prefix}{}.db", stamp(time::OffsetDateTime::now_utc())));
            match store.snapshot(&file).await {
                Ok(info) => {
                    restrict(&file);
                    tracing::info!(file = %file.display(), revision = info.revision, size = info.size, "snapshot saved");
                }
                Err(error) => tracing::warn!(file = %file.display(), %error, "scheduled snapshot failed"),
            }
            prune(&dir, prefix, retention);
        }
    });
}

/// `20261130T190501Z`: sorts as it ages.
fn stamp(now: time::OffsetDateTime) -> String {
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second()
    )
}

/// Deletes all but the newest `retention` snapshots named `<prefix>…db` in `dir`.
fn prune(dir: &Path, prefix: &str, retention: usize) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let mut names: Vec<String> = entries
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.starts_with(prefix) && n.ends_with(".db"))
        .collect();
    names.sort();
    let excess = names.len().saturating_sub(retention);
    for name in &names[..excess] {
        match std::fs::remove_file(dir.join(name)) {
            Ok(()) => tracing::info!(file = name, "old snapshot removed"),
            Err(error) => tracing::warn!(file = name, %error, "cannot remove an old snapshot"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_sort_by_time_and_pruning_keeps_the_newest() {
        let at = |s: i64| stamp(time::OffsetDateTime::from_unix_timestamp(1_800_000_000 + s).unwrap());
        assert_eq!(at(0), "20270115T080000Z");
        let dir = tempfile::tempdir().unwrap();
        for s in [30, 10, 20, 40] {
            std::fs::write(dir.path().join(format!("tugboat-{}.db", at(s))), b"x").unwrap();
        }
        std::fs::write(dir.path().join("mine.db"), b"x").unwrap();
        prune(dir.path(), "tugboat-", 2);
        let mut left: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        left.sort();
        assert_eq!(left, ["mine.db", &format!("tugboat-{}.db", at(30)), &format!("tugboat-{}.db", at(40))]);
    }
}
