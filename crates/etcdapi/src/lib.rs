//! The etcd v3 API (gRPC, as `etcdctl` and `etcd-client` speak it) served over Tugboat's
//! store, so that etcd's tools work on the embedded store as on a real etcd: keys are the
//! `/registry/...` keys the API server writes, revisions are the store's. Every write goes
//! through the [`Store`] trait, the API server's own write path, so its watch cache sees it.
//!
//! What is served: KV (Range with prefix, limit, keys-only, count-only, revision, sorting and
//! revision filters; Put with prev_kv and lease; DeleteRange; Txn with compares on value,
//! version, create/mod revision and lease; Compact), Watch (ranges, start revision, prev_kv,
//! filters, cancel, progress requests, the compacted error), Lease (grant, revoke,
//! keep-alive, time-to-live, list; expiry deletes the keys attached), Maintenance (Status,
//! Alarm, Defragment, Snapshot in etcd's format) and Cluster (MemberList: the one member).
//! Leases outlive restarts when a lease file is given (see `lease.rs`). Not yet: hashes. Where etcd applies a request at one revision, the store may
//! take several (a DeleteRange of many keys, a Txn of several writes); a Txn whose writes
//! are guarded by a mod-revision compare of their own key (how kube-apiserver writes) is
//! atomic: the write itself is conditional on that revision.

mod kv;
mod lease;
mod serve;
mod start;
mod watch;

use std::sync::Arc;

use etcd_client::proto::PbResponseHeader;
use tonic::Status;
use tugboat_store::{KeyValue, Revision, Store, StoreError};

pub use serve::serve;
pub use start::{start, tls_config};

/// Who the server says it is, in every response header and in the member list.
#[derive(Debug, Clone)]
pub struct Identity {
    pub cluster_id: u64,
    pub member_id: u64,
    /// The member's name (etcd's `--name`): the host's name.
    pub name: String,
    /// Where clients reach it: `https://127.0.0.1:2379`.
    pub client_urls: Vec<String>,
    /// The store's files, whose size Status reports as the database's.
    pub db_files: Vec<std::path::PathBuf>,
    /// Where leases are kept across restarts (`None`: in memory only).
    pub lease_file: Option<std::path::PathBuf>,
}

/// The etcd API over one store: what every service shares.
#[derive(Debug)]
pub struct EtcdApi {
    store: Arc<dyn Store>,
    identity: Identity,
    leases: lease::Leases,
}

impl EtcdApi {
    /// The API over `store`; fails when the lease file cannot be read.
    pub fn new(store: Arc<dyn Store>, identity: Identity) -> std::io::Result<Arc<EtcdApi>> {
        let leases = lease::Leases::load(identity.lease_file.clone())?;
        let api = Arc::new(EtcdApi { store, identity, leases });
        lease::spawn_expiry(&api);
        Ok(api)
    }

    fn header(&self, revision: Revision) -> Option<PbResponseHeader> {
        Some(PbResponseHeader {
            cluster_id: self.identity.cluster_id,
            member_id: self.identity.member_id,
            revision,
            raft_term: 1,
        })
    }

    async fn current(&self) -> Result<Revision, Status> {
        self.store.current_revision().await.map_err(status)
    }
}

/// A store error as etcd's gRPC status (the messages etcd's clients match on).
fn status(error: StoreError) -> Status {
    match error {
        StoreError::Compacted { .. } => Status::out_of_range("etcdserver: mvcc: required revision has been compacted"),
        StoreError::FutureRevision { .. } => {
            Status::out_of_range("etcdserver: mvcc: required revision is a future revision")
        }
        StoreError::InvalidKey { key, reason } => Status::invalid_argument(format!("invalid key {key:?}: {reason}")),
        other if other.is_request_error() => Status::failed_precondition(other.to_string()),
        other => Status::unavailable(other.to_string()),
    }
}

/// A key as the store keeps it (UTF-8).
fn key_text(key: Vec<u8>) -> Result<String, Status> {
    if key.is_empty() {
        return Err(Status::invalid_argument("etcdserver: key is not provided"));
    }
    String::from_utf8(key).map_err(|_| Status::invalid_argument("keys of the embedded store are UTF-8"))
}

/// A stored value as etcd's `mvccpb.KeyValue`.
fn pb_kv(kv: KeyValue, keys_only: bool, lease: i64) -> etcd_client::proto::PbKeyValue {
    etcd_client::proto::PbKeyValue {
        key: kv.key.into_bytes(),
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value: if keys_only { Vec::new() } else { kv.value },
        lease,
    }
}
