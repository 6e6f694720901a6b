use std::path::PathBuf;

use crate::Revision;

/// A store result.
pub type Result<T, E = StoreError> = std::result::Result<T, E>;

/// Everything a store operation can fail with. The API server maps the first group to
/// Kubernetes statuses (409, 404, 410, 504...) and the rest to 500/503 with the message.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {key} already exists")]
    AlreadyExists { key: String },

    #[error("key {key} not found")]
    NotFound { key: String },

    #[error("conflict on key {key}: expected revision {expected}, current revision {current}")]
    Conflict { key: String, expected: Revision, current: Revision },

    #[error("revision {requested} has been compacted (history kept from revision {compacted})")]
    Compacted { requested: Revision, compacted: Revision },

    #[error("revision {requested} is newer than the current revision {current}")]
    FutureRevision { requested: Revision, current: Revision },

    #[error("invalid continue token: {reason}")]
    InvalidContinue { reason: String },

    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },

    #[error("sqlite store {}: {source}", path.display())]
    Sqlite { path: PathBuf, source: rusqlite::Error },

    #[error("sqlite store {} is corrupt or not a database: {source}", path.display())]
    Corrupt { path: PathBuf, source: rusqlite::Error },

    #[error("sqlite store {} is damaged: {reason}", path.display())]
    Damaged { path: PathBuf, reason: String },

    #[error("{} is not a tugboat store: {reason}", path.display())]
    Foreign { path: PathBuf, reason: String },

    #[error("sqlite store {} is in use by another process", path.display())]
    Locked { path: PathBuf },

    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },

    #[error("etcd at {endpoints}: {source}")]
    Etcd { endpoints: String, source: etcd_client::Error },

    #[error("etcd at {endpoints}: {message}")]
    EtcdProtocol { endpoints: String, message: String },

    #[error("the store is closed")]
    Closed,
}

impl StoreError {
    /// Whether this error is about the request (a conflict, a missing key...) rather than the
    /// store being unable to serve it.
    pub fn is_request_error(&self) -> bool {
        matches!(
            self,
            StoreError::AlreadyExists { .. }
                | StoreError::NotFound { .. }
                | StoreError::Conflict { .. }
                | StoreError::Compacted { .. }
                | StoreError::FutureRevision { .. }
                | StoreError::InvalidContinue { .. }
                | StoreError::InvalidKey { .. }
        )
    }
}
