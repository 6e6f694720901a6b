//! Maintenance and Cluster, and the gRPC server: HTTP/2 over mutual TLS, each request routed
//! to its service by path.

use std::convert::Infallible;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use etcd_client::proto::{
    PbAlarmRequest, PbAlarmResponse, PbClusterServer, PbClusterService, PbDefragmentRequest, PbDefragmentResponse,
    PbDowngradeRequest, PbDowngradeResponse, PbHashKvRequest, PbHashKvResponse, PbHashRequest, PbHashResponse,
    PbKvServer, PbLeaseServer, PbMaintenanceServer, PbMaintenanceService, PbMember, PbMemberAddRequest,
    PbMemberAddResponse, PbMemberListRequest, PbMemberListResponse, PbMemberPromoteRequest, PbMemberPromoteResponse,
    PbMemberRemoveRequest, PbMemberRemoveResponse, PbMemberUpdateRequest, PbMemberUpdateResponse, PbMoveLeaderRequest,
    PbMoveLeaderResponse, PbSnapshotRequest, PbSnapshotResponse, PbStatusRequest, PbStatusResponse, PbWatchServer,
};
use futures::Stream;
use tonic::{Request, Response, Status};
use tower::ServiceExt as _;

use crate::EtcdApi;
use crate::kv::Kv;
use crate::lease::LeaseService;
use crate::watch::WatchService;

/// The etcd API version Status reports: the API this server speaks (etcd 3.5's).
const VERSION: &str = "3.5.0";

#[derive(Debug, Clone)]
struct Maintenance(Arc<EtcdApi>);

type Snapshots = Pin<Box<dyn Stream<Item = Result<PbSnapshotResponse, Status>> + Send>>;

/// Sends the snapshot file at `path` (`size` bytes) in chunks, then its SHA-256 as the last
/// chunk, as etcd does (`etcdctl snapshot restore` checks it).
async fn stream_snapshot(
    path: &Path,
    size: u64,
    header: Option<etcd_client::proto::PbResponseHeader>,
    tx: &tokio::sync::mpsc::Sender<Result<PbSnapshotResponse, Status>>,
) -> std::io::Result<()> {
    use tokio::io::AsyncReadExt as _;
    const CHUNK: usize = 32 * 1024;
    let mut file = tokio::fs::File::open(path).await?;
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut left = size;
    loop {
        let mut blob = vec![0; CHUNK.min(left as usize)];
        if blob.is_empty() {
            break;
        }
        file.read_exact(&mut blob).await?;
        digest.update(&blob);
        left -= blob.len() as u64;
        // `remaining_bytes`: what follows this message, the hash included.
        let message = PbSnapshotResponse { header, remaining_bytes: left + 32, blob, version: VERSION.to_string() };
        if tx.send(Ok(message)).await.is_err() {
            return Ok(());
        }
    }
    let hash = digest.finish().as_ref().to_vec();
    let _ =
        tx.send(Ok(PbSnapshotResponse { header, remaining_bytes: 0, blob: hash, version: VERSION.to_string() })).await;
    Ok(())
}

#[tonic::async_trait]
impl PbMaintenanceService for Maintenance {
    async fn alarm(&self, _: Request<PbAlarmRequest>) -> Result<Response<PbAlarmResponse>, Status> {
        // No alarms are raised (the store has no space quota).
        Ok(Response::new(PbAlarmResponse { header: self.0.header(self.0.current().await?), alarms: Vec::new() }))
    }

    async fn status(&self, _: Request<PbStatusRequest>) -> Result<Response<PbStatusResponse>, Status> {
        let revision = self.0.current().await?;
        let size: u64 =
            self.0.identity.db_files.iter().filter_map(|f| std::fs::metadata(f).ok()).map(|m| m.len()).sum();
        Ok(Response::new(PbStatusResponse {
            header: self.0.header(revision),
            version: VERSION.to_string(),
            db_size: size as i64,
            db_size_in_use: size as i64,
            leader: self.0.identity.member_id,
            raft_index: revision as u64,
            raft_term: 1,
            raft_applied_index: revision as u64,
            ..Default::default()
        }))
    }

    async fn defragment(&self, _: Request<PbDefragmentRequest>) -> Result<Response<PbDefragmentResponse>, Status> {
        self.0.store.defragment().await.map_err(crate::status)?;
        Ok(Response::new(PbDefragmentResponse { header: self.0.header(self.0.current().await?) }))
    }

    async fn hash(&self, _: Request<PbHashRequest>) -> Result<Response<PbHashResponse>, Status> {
        Err(Status::unimplemented("hash is not served by the embedded store yet"))
    }

    async fn hash_kv(&self, _: Request<PbHashKvRequest>) -> Result<Response<PbHashKvResponse>, Status> {
        Err(Status::unimplemented("hashkv is not served by the embedded store yet"))
    }

    type SnapshotStream = Snapshots;

    async fn snapshot(&self, _: Request<PbSnapshotRequest>) -> Result<Response<Snapshots>, Status> {
        // Written beside the store (the same file system's room), streamed, then removed.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = self.0.identity.db_files.first().and_then(|f| f.parent()).map(Path::to_path_buf);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path =
            dir.unwrap_or_else(std::env::temp_dir).join(format!(".etcd-snapshot-{}-{n}.tmp", std::process::id()));
        let info = match self.0.store.etcd_snapshot(&path).await {
            Ok(info) => info,
            Err(error) => {
                let _ = std::fs::remove_file(&path);
                return Err(crate::status(error));
            }
        };
        let header = self.0.header(info.revision);
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tokio::spawn(async move {
            let sent = stream_snapshot(&path, info.size, header, &tx).await;
            let _ = std::fs::remove_file(&path);
            if let Err(error) = sent {
                let _ = tx.send(Err(Status::internal(format!("reading the snapshot: {error}")))).await;
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }

    async fn move_leader(&self, _: Request<PbMoveLeaderRequest>) -> Result<Response<PbMoveLeaderResponse>, Status> {
        Err(Status::failed_precondition("a single-member cluster has no other leader"))
    }

    async fn downgrade(&self, _: Request<PbDowngradeRequest>) -> Result<Response<PbDowngradeResponse>, Status> {
        Err(Status::unimplemented("downgrade is not served"))
    }
}

#[derive(Debug, Clone)]
struct Cluster(Arc<EtcdApi>);

impl Cluster {
    fn single() -> Status {
        Status::failed_precondition("the embedded store is a single-member cluster: move to etcd to add members")
    }
}

#[tonic::async_trait]
impl PbClusterService for Cluster {
    async fn member_add(&self, _: Request<PbMemberAddRequest>) -> Result<Response<PbMemberAddResponse>, Status> {
        Err(Cluster::single())
    }

    async fn member_remove(
        &self,
        _: Request<PbMemberRemoveRequest>,
    ) -> Result<Response<PbMemberRemoveResponse>, Status> {
        Err(Cluster::single())
    }

    async fn member_update(
        &self,
        _: Request<PbMemberUpdateRequest>,
    ) -> Result<Response<PbMemberUpdateResponse>, Status> {
        Err(Cluster::single())
    }

    async fn member_list(&self, _: Request<PbMemberListRequest>) -> Result<Response<PbMemberListResponse>, Status> {
        let identity = &self.0.identity;
        let member = PbMember {
            id: identity.member_id,
            name: identity.name.clone(),
            peer_ur_ls: Vec::new(),
            client_ur_ls: identity.client_urls.clone(),
            is_learner: false,
        };
        Ok(Response::new(PbMemberListResponse {
            header: self.0.header(self.0.current().await?),
            members: vec![member],
        }))
    }

    async fn member_promote(
        &self,
        _: Request<PbMemberPromoteRequest>,
    ) -> Result<Response<PbMemberPromoteResponse>, Status> {
        Err(Cluster::single())
    }
}

type Body = tonic::body::Body;

/// Serves the etcd API of `api` on `listener`: TLS with `tls` (which should require client
/// certificates and offer ALPN `h2`), then gRPC over HTTP/2. Runs until the task is dropped;
/// a connection's failure ends only that connection.
pub async fn serve(listener: tokio::net::TcpListener, tls: Arc<rustls::ServerConfig>, api: Arc<EtcdApi>) {
    let acceptor = tokio_rustls::TlsAcceptor::from(tls);
    let kv = PbKvServer::new(Kv(api.clone()));
    let watch = PbWatchServer::new(WatchService(api.clone()));
    let lease = PbLeaseServer::new(LeaseService(api.clone()));
    let maintenance = PbMaintenanceServer::new(Maintenance(api.clone()));
    let cluster = PbClusterServer::new(Cluster(api.clone()));
    let route = move |request: http::Request<hyper::body::Incoming>| {
        let (kv, watch, lease, maintenance, cluster) =
            (kv.clone(), watch.clone(), lease.clone(), maintenance.clone(), cluster.clone());
        async move {
            let path = request.uri().path().to_string();
            let service = path.trim_start_matches('/').split('/').next().unwrap_or_default();
            let response: http::Response<Body> = match service {
                "etcdserverpb.KV" => kv.oneshot(request).await.unwrap_or_else(|e| match e {}),
                "etcdserverpb.Watch" => watch.oneshot(request).await.unwrap_or_else(|e| match e {}),
                "etcdserverpb.Lease" => lease.oneshot(request).await.unwrap_or_else(|e| match e {}),
                "etcdserverpb.Maintenance" => maintenance.oneshot(request).await.unwrap_or_else(|e| match e {}),
                "etcdserverpb.Cluster" => cluster.oneshot(request).await.unwrap_or_else(|e| match e {}),
                _ => Status::unimplemented(format!("{path} is not served")).into_http(),
            };
            Ok::<_, Infallible>(response)
        }
    };
    loop {
        let (socket, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "etcd API: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        let (acceptor, route) = (acceptor.clone(), route.clone());
        tokio::spawn(async move {
            // A bounded handshake, as the kubelet API's: a client that never sends one does not
            // hold a task for ever.
            let stream = match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(socket)).await {
                Ok(Ok(stream)) => stream,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "etcd API: TLS handshake refused");
                    return;
                }
                Err(_) => {
                    tracing::debug!(%peer, "etcd API: no TLS handshake within 10 s");
                    return;
                }
            };
            let service = hyper::service::service_fn(route);
            let served = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
            if let Err(error) = served {
                tracing::debug!(%peer, %error, "etcd API: connection ended");
            }
        });
    }
}
