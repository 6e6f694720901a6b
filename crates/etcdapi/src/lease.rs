//! The Lease service: leases kept in memory, each with the keys put with it; an expired or
//! revoked lease deletes its keys through the store. With a lease file (`tugboat server`:
//! `<data-dir>/db/etcd-leases.json`) every grant, revocation and attachment is written there
//! (fsync'd, renamed into place) before it is acknowledged, and a restart takes the leases back
//! with their full TTL, as etcd does after a leader change — so a key put with a lease still
//! goes when its lease does. An attachment is written before the key itself: a crash between
//! leaves a lease naming a key that does not exist, which its expiry ignores.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use etcd_client::proto::{
    PbLeaseGrantRequest, PbLeaseGrantResponse, PbLeaseKeepAliveRequest, PbLeaseKeepAliveResponse, PbLeaseLeasesRequest,
    PbLeaseLeasesResponse, PbLeaseRevokeRequest, PbLeaseRevokeResponse, PbLeaseService, PbLeaseStatus,
    PbLeaseTimeToLiveRequest, PbLeaseTimeToLiveResponse,
};
use futures::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::EtcdApi;

/// etcd's minimum TTL (its default `--election-timeout` × 3 / heartbeat, rounded): shorter
/// grants are raised to it.
const MIN_TTL: i64 = 5;

#[derive(Debug)]
struct Lease {
    ttl: i64,
    deadline: Instant,
    keys: BTreeSet<String>,
}

/// The leases, and which lease each key was put with.
#[derive(Debug, Default)]
pub(crate) struct Leases {
    inner: Mutex<Inner>,
    /// Where they are kept across restarts.
    file: Option<PathBuf>,
}

/// The lease file's content.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Saved {
    next: i64,
    leases: Vec<SavedLease>,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SavedLease {
    id: i64,
    ttl: i64,
    keys: Vec<String>,
}

#[derive(Debug, Default)]
struct Inner {
    leases: HashMap<i64, Lease>,
    by_key: HashMap<String, i64>,
    next: i64,
}

impl Leases {
    /// The leases of `file` (none if it does not exist), each with its full TTL from now.
    pub(crate) fn load(file: Option<PathBuf>) -> std::io::Result<Leases> {
        let mut inner = Inner::default();
        if let Some(path) = &file {
            match std::fs::read(path) {
                Ok(bytes) => {
                    let saved: Saved = serde_json::from_slice(&bytes).map_err(std::io::Error::other)?;
                    inner.next = saved.next;
                    let now = Instant::now();
                    for lease in saved.leases {
                        for key in &lease.keys {
                            inner.by_key.insert(key.clone(), lease.id);
                        }
                        let deadline = now + Duration::from_secs(lease.ttl.max(0) as u64);
                        let keys = lease.keys.into_iter().collect();
                        inner.leases.insert(lease.id, Lease { ttl: lease.ttl, deadline, keys });
                    }
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(error),
            }
        }
        Ok(Leases { inner: Mutex::new(inner), file })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes the leases to the lease file (if any), durably; called with the lock held, so
    /// writes follow the order of the changes.
    fn save(&self, inner: &Inner) -> Result<(), Status> {
        let Some(path) = &self.file else { return Ok(()) };
        let mut leases: Vec<SavedLease> = inner
            .leases
            .iter()
            .map(|(id, lease)| SavedLease { id: *id, ttl: lease.ttl, keys: lease.keys.iter().cloned().collect() })
            .collect();
        leases.sort_by_key(|l| l.id);
        let bytes =
            serde_json::to_vec(&Saved { next: inner.next, leases }).map_err(|e| Status::internal(e.to_string()))?;
        tugboat_pki::write_file(path, &bytes, 0o600).map_err(|e| Status::unavailable(format!("saving the leases: {e}")))
    }

    pub(crate) fn exists(&self, id: i64) -> bool {
        self.lock().leases.contains_key(&id)
    }

    /// The lease `key` was put with (0: none).
    pub(crate) fn of(&self, key: &str) -> i64 {
        self.lock().by_key.get(key).copied().unwrap_or(0)
    }

    /// Records (durably) that `key` is put with `lease` (0: without one, which detaches it).
    pub(crate) fn attach(&self, key: &str, lease: i64) -> Result<(), Status> {
        let mut inner = self.lock();
        let old = inner.by_key.get(key).copied().unwrap_or(0);
        if old == lease {
            return Ok(());
        }
        if old != 0 {
            inner.by_key.remove(key);
            if let Some(held) = inner.leases.get_mut(&old) {
                held.keys.remove(key);
            }
        }
        if lease != 0
            && let Some(held) = inner.leases.get_mut(&lease)
        {
            held.keys.insert(key.to_string());
            inner.by_key.insert(key.to_string(), lease);
        }
        self.save(&inner)
    }

    pub(crate) fn detach(&self, key: &str) -> Result<(), Status> {
        self.attach(key, 0)
    }

    /// Removes lease `id`; returns its keys (`None`: no such lease).
    fn remove(&self, id: i64) -> Result<Option<BTreeSet<String>>, Status> {
        let mut inner = self.lock();
        let Some(lease) = inner.leases.remove(&id) else { return Ok(None) };
        for key in &lease.keys {
            inner.by_key.remove(key);
        }
        self.save(&inner)?;
        Ok(Some(lease.keys))
    }
}

impl EtcdApi {
    fn grant(&self, request: PbLeaseGrantRequest) -> Result<PbLeaseGrantResponse, Status> {
        let ttl = request.ttl.max(MIN_TTL);
        let mut inner = self.leases.lock();
        let id = match request.id {
            0 => loop {
                inner.next += 1;
                // Like etcd's: positive, not sequential-looking, never reused while held.
                let candidate = (inner.next.wrapping_mul(0x5DEE_CE66D) ^ self.identity.member_id as i64) & i64::MAX;
                if candidate != 0 && !inner.leases.contains_key(&candidate) {
                    break candidate;
                }
            },
            id if inner.leases.contains_key(&id) => {
                return Err(Status::failed_precondition("etcdserver: lease already exists"));
            }
            id if id < 0 => return Err(Status::invalid_argument("a lease ID is positive")),
            id => id,
        };
        let deadline = Instant::now() + Duration::from_secs(ttl as u64);
        inner.leases.insert(id, Lease { ttl, deadline, keys: BTreeSet::new() });
        if let Err(error) = self.leases.save(&inner) {
            inner.leases.remove(&id);
            return Err(error);
        }
        Ok(PbLeaseGrantResponse { header: None, id, ttl, error: String::new() })
    }

    /// Revokes lease `id`: its keys are deleted.
    pub(crate) async fn revoke(&self, id: i64) -> Result<(), Status> {
        let keys = self.leases.remove(id)?.ok_or_else(|| Status::not_found("etcdserver: requested lease not found"))?;
        for key in keys {
            match self.store.delete(&key, None).await {
                Ok(_) | Err(tugboat_store::StoreError::NotFound { .. }) => {}
                Err(error) => return Err(crate::status(error)),
            }
        }
        Ok(())
    }

    fn keep_alive(&self, id: i64) -> i64 {
        let mut inner = self.leases.lock();
        match inner.leases.get_mut(&id) {
            Some(lease) => {
                lease.deadline = Instant::now() + Duration::from_secs(lease.ttl as u64);
                lease.ttl
            }
            None => 0,
        }
    }

    fn time_to_live(&self, request: &PbLeaseTimeToLiveRequest) -> PbLeaseTimeToLiveResponse {
        let inner = self.leases.lock();
        match inner.leases.get(&request.id) {
            Some(lease) => PbLeaseTimeToLiveResponse {
                header: None,
                id: request.id,
                ttl: lease.deadline.saturating_duration_since(Instant::now()).as_secs() as i64,
                granted_ttl: lease.ttl,
                keys: match request.keys {
                    true => lease.keys.iter().map(|k| k.clone().into_bytes()).collect(),
                    false => Vec::new(),
                },
            },
            None => {
                PbLeaseTimeToLiveResponse { header: None, id: request.id, ttl: -1, granted_ttl: 0, keys: Vec::new() }
            }
        }
    }

    fn expired(&self) -> Vec<i64> {
        let now = Instant::now();
        self.leases.lock().leases.iter().filter(|(_, lease)| lease.deadline <= now).map(|(id, _)| *id).collect()
    }
}

/// Revokes expired leases every half second while the API lives.
pub(crate) fn spawn_expiry(api: &Arc<EtcdApi>) {
    let api: Weak<EtcdApi> = Arc::downgrade(api);
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_millis(500));
        loop {
            ticks.tick().await;
            let Some(api) = api.upgrade() else { return };
            for id in api.expired() {
                if let Err(error) = api.revoke(id).await {
                    tracing::warn!(lease = id, %error, "an expired lease's keys were not all deleted");
                }
            }
        }
    });
}

/// The Lease service of one [`EtcdApi`].
#[derive(Debug, Clone)]
pub(crate) struct LeaseService(pub Arc<EtcdApi>);

type KeepAlives = Pin<Box<dyn Stream<Item = Result<PbLeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl PbLeaseService for LeaseService {
    async fn lease_grant(
        &self,
        request: Request<PbLeaseGrantRequest>,
    ) -> Result<Response<PbLeaseGrantResponse>, Status> {
        let mut response = self.0.grant(request.into_inner())?;
        response.header = self.0.header(self.0.current().await?);
        Ok(Response::new(response))
    }

    async fn lease_revoke(
        &self,
        request: Request<PbLeaseRevokeRequest>,
    ) -> Result<Response<PbLeaseRevokeResponse>, Status> {
        self.0.revoke(request.into_inner().id).await?;
        Ok(Response::new(PbLeaseRevokeResponse { header: self.0.header(self.0.current().await?) }))
    }

    type LeaseKeepAliveStream = KeepAlives;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<PbLeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        let api = self.0.clone();
        let replies = request.into_inner().then(move |request| {
            let api = api.clone();
            async move {
                let request = request?;
                let ttl = api.keep_alive(request.id);
                Ok(PbLeaseKeepAliveResponse { header: api.header(api.current().await?), id: request.id, ttl })
            }
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<PbLeaseTimeToLiveRequest>,
    ) -> Result<Response<PbLeaseTimeToLiveResponse>, Status> {
        let mut response = self.0.time_to_live(request.get_ref());
        response.header = self.0.header(self.0.current().await?);
        Ok(Response::new(response))
    }

    async fn lease_leases(&self, _: Request<PbLeaseLeasesRequest>) -> Result<Response<PbLeaseLeasesResponse>, Status> {
        let leases = self.0.leases.lock().leases.keys().map(|id| PbLeaseStatus { id: *id }).collect();
        Ok(Response::new(PbLeaseLeasesResponse { header: self.0.header(self.0.current().await?), leases }))
    }
}
