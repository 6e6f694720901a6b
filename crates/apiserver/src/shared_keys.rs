//! The keys every server of a cluster must share — the cluster CA (`ca.crt`, `ca.key`), the
//! service-account signing key (`sa.key`) and the front-proxy CA (`front-proxy/ca.*`: aggregated
//! API servers trust one CA for the requests of every server) — kept in the datastore beside the objects, under
//! `/tugboat/pki/` (outside `/registry/`, so no API request reaches them). A second server
//! on the same etcd, or a data dir whose store was restored from a snapshot, takes the
//! cluster's keys from there instead of making new ones; the first server publishes its own.
//! (They are secrets: the datastore and its snapshots need the same care as the data dir.)

use std::path::Path;

use tugboat_store::{Store, StoreError};

use crate::StartError;

const PREFIX: &str = "/tugboat/pki/";

/// The shared files of `<data-dir>/pki` and their modes.
const SHARED: [(&str, u32); 5] = [
    ("ca.crt", 0o644),
    ("ca.key", 0o600),
    ("sa.key", 0o600),
    ("front-proxy/ca.crt", 0o644),
    ("front-proxy/ca.key", 0o600),
];

/// Certificates this server issues itself from each CA (by the CA's directory): made again
/// when the CA changes.
const ISSUED: [(&str, &[&str]); 2] =
    [("", &["apiserver", "admin", "apiserver-kubelet-client"]), ("front-proxy/", &["front-proxy/front-proxy-client"])];

/// Writes the datastore's shared keys into `dir` where they differ (dropping the certificates
/// the old CA issued). Returns whether anything changed.
pub(crate) async fn adopt(store: &dyn Store, dir: &Path) -> Result<bool, StartError> {
    let mut changed = false;
    for (name, mode) in SHARED {
        let Some(kept) = store.get(&format!("{PREFIX}{name}"), None).await? else { continue };
        let path = dir.join(name);
        if std::fs::read(&path).ok().as_deref() == Some(kept.value.as_slice()) {
            continue;
        }
        let parent = path.parent().unwrap_or(dir);
        std::fs::create_dir_all(parent).map_err(|e| StartError::Tls(format!("{}: {e}", parent.display())))?;
        tugboat_pki::write_file(&path, &kept.value, mode)?;
        tracing::info!(file = %path.display(), "took the cluster's shared key from the datastore");
        changed = true;
        for (ca_dir, issued) in ISSUED {
            if name.strip_prefix(ca_dir).is_some_and(|file| file.starts_with("ca.")) {
                for issued in issued {
                    let _ = std::fs::remove_file(dir.join(format!("{issued}.crt")));
                    let _ = std::fs::remove_file(dir.join(format!("{issued}.key")));
                }
            }
        }
    }
    Ok(changed)
}

/// Publishes the shared keys of `dir` that the datastore lacks. Returns false when another
/// server published different ones first (then [`adopt`] them and load again).
pub(crate) async fn publish(store: &dyn Store, dir: &Path) -> Result<bool, StartError> {
    for (name, _) in SHARED {
        let key = format!("{PREFIX}{name}");
        let local = std::fs::read(dir.join(name)).map_err(|e| StartError::Tls(format!("{name}: {e}")))?;
        match store.create(&key, local.clone()).await {
            Ok(_) => {}
            Err(StoreError::AlreadyExists { .. }) => {
                if store.get(&key, None).await?.is_none_or(|kept| kept.value != local) {
                    return Ok(false);
                }
            }
            Err(error) => return Err(error.into()),
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tugboat_pki::ClusterCa;
    use tugboat_store::{SqliteConfig, SqliteStore};

    fn cas(dir: &Path) {
        ClusterCa::load_or_create(dir).unwrap();
        ClusterCa::load_or_create(&dir.join("front-proxy")).unwrap();
        std::fs::write(dir.join("sa.key"), b"key").unwrap();
    }

    #[tokio::test]
    async fn a_second_server_takes_both_cas_and_drops_what_its_own_ones_issued() {
        let scratch = tempfile::tempdir().unwrap();
        let store =
            SqliteStore::open(SqliteConfig { path: scratch.path().join("state.db"), watch_buffer: 64 }).unwrap();
        let (first, second) = (scratch.path().join("first"), scratch.path().join("second"));
        cas(&first);
        assert!(publish(&store, &first).await.unwrap());
        cas(&second);
        std::fs::write(second.join("front-proxy/front-proxy-client.crt"), b"issued by the old CA").unwrap();
        assert!(!publish(&store, &second).await.unwrap(), "the first server's keys are there");
        assert!(adopt(&store, &second).await.unwrap());
        for file in ["ca.crt", "ca.key", "front-proxy/ca.crt", "front-proxy/ca.key"] {
            assert_eq!(std::fs::read(first.join(file)).unwrap(), std::fs::read(second.join(file)).unwrap(), "{file}");
        }
        assert!(!second.join("front-proxy/front-proxy-client.crt").exists());
        assert!(!adopt(&store, &second).await.unwrap(), "nothing more to take");
    }
}
