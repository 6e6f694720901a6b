//! The keys every server of a cluster must share — the cluster CA (`ca.crt`, `ca.key`) and
//! the service-account signing key (`sa.key`) — kept in the datastore beside the objects, under
//! `/tugboat/pki/` (outside `/registry/`, so no API request reaches them). A second server
//! on the same etcd, or a data dir whose store was restored from a snapshot, takes the
//! cluster's keys from there instead of making new ones; the first server publishes its own.
//! (They are secrets: the datastore and its snapshots need the same care as the data dir.)

use std::path::Path;

use tugboat_store::{Store, StoreError};

use crate::StartError;

const PREFIX: &str = "/tugboat/pki/";

/// The shared files of `<data-dir>/pki` and their modes.
const SHARED: [(&str, u32); 3] = [("ca.crt", 0o644), ("ca.key", 0o600), ("sa.key", 0o600)];

/// Certificates this server issues itself from the CA: made again when the CA changes.
const ISSUED: [&str; 3] = ["apiserver", "admin", "apiserver-kubelet-client"];

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
        std::fs::create_dir_all(dir).map_err(|e| StartError::Tls(format!("{}: {e}", dir.display())))?;
        tugboat_pki::write_file(&path, &kept.value, mode)?;
        tracing::info!(file = %path.display(), "took the cluster's shared key from the datastore");
        changed = true;
        if name.starts_with("ca.") {
            for issued in ISSUED {
                let _ = std::fs::remove_file(dir.join(format!("{issued}.crt")));
                let _ = std::fs::remove_file(dir.join(format!("{issued}.key")));
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
