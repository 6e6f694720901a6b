//! The etcd backend: a real etcd v3 cluster. Keys are stored as given, so with the API server's
//! layout (`/registry/<resource>/<namespace>/<name>`) `etcdctl get /registry --prefix
//! --keys-only` lists the cluster's objects. Optimistic concurrency is etcd's own: transactions
//! that compare mod revisions.

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{
    Certificate, Client, CompactionOptions, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions,
    Identity, KvClient, TlsOptions, Txn, TxnOp, TxnOpResponse, WatchClient, WatchOptions,
};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use crate::continue_token::{ContinueToken, ListPlan};
use crate::{
    Event, EventKind, KeyValue, ListOptions, ListResult, Result, Revision, SnapshotInfo, Store, StoreError,
    WatchStream, prefix_end,
};

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// `http://host:2379` or `https://host:2379`, one per member.
    pub endpoints: Vec<String>,
    /// Client TLS for `https` endpoints.
    pub tls: Option<EtcdTls>,
    /// How long to wait for a connection and for each request.
    pub timeout: Duration,
}

/// Client TLS material for etcd, as PEM files.
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca_file: PathBuf,
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
}

impl EtcdConfig {
    /// Parses `--datastore-endpoint`: comma-separated `http(s)://host:port` URLs.
    pub fn from_endpoint_list(list: &str) -> Result<EtcdConfig> {
        let endpoints: Vec<String> =
            list.split(',').map(str::trim).filter(|e| !e.is_empty()).map(str::to_string).collect();
        if endpoints.is_empty() {
            return Err(StoreError::EtcdProtocol { endpoints: list.to_string(), message: "no endpoint given".into() });
        }
        for endpoint in &endpoints {
            if !(endpoint.starts_with("http://") || endpoint.starts_with("https://")) {
                return Err(StoreError::EtcdProtocol {
                    endpoints: endpoint.clone(),
                    message: "an etcd endpoint must be an http:// or https:// URL".into(),
                });
            }
        }
        Ok(EtcdConfig { endpoints, tls: None, timeout: Duration::from_secs(5) })
    }
}

/// A store on a real etcd cluster.
///
/// One connection per member: requests go to the member that last answered, and on to the
/// next while a member cannot be connected to (such a request never left, so it is safe to
/// send again). A single balanced channel over all members would keep sending a share of the
/// requests to a dead member.
#[derive(Clone)]
pub struct EtcdStore {
    members: std::sync::Arc<Vec<Member>>,
    /// The member that last answered.
    active: std::sync::Arc<std::sync::atomic::AtomicUsize>,
    endpoints: String,
    timeout: Duration,
}

/// The clients of one member's connection.
#[derive(Clone)]
struct Member {
    /// For maintenance (snapshots).
    client: Client,
    /// Reads and writes, with no limit on the size of an answer: a list of 10k objects is
    /// larger than gRPC's default 4 MiB (kube-apiserver lifts the limit too).
    kv: KvClient,
    watcher: WatchClient,
}

/// One transaction on `member`.
async fn txn_on(mut member: Member, txn: Txn) -> std::result::Result<etcd_client::TxnResponse, etcd_client::Error> {
    member.kv.txn(txn).await
}

/// Whether `error` says the member could not be connected to at all.
fn unreachable(error: &etcd_client::Error) -> bool {
    match error {
        etcd_client::Error::TransportError(_) => true,
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == tonic::Code::Unavailable && status.message().contains("connect")
        }
        _ => false,
    }
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("endpoints", &self.endpoints).finish_non_exhaustive()
    }
}

/// Whether an etcd error says the revision was compacted, or is in the future.
fn revision_error(error: &etcd_client::Error) -> Option<&'static str> {
    let etcd_client::Error::GRpcStatus(status) = error else {
        return None;
    };
    let message = status.message();
    if message.contains("required revision has been compacted") {
        Some("compacted")
    } else if message.contains("required revision is a future revision") {
        Some("future")
    } else {
        None
    }
}

impl EtcdStore {
    /// Connects and checks that the cluster answers; fails naming the endpoints otherwise.
    pub async fn connect(config: EtcdConfig) -> Result<EtcdStore> {
        let endpoints = config.endpoints.join(",");
        let mut options = ConnectOptions::new()
            .with_connect_timeout(config.timeout)
            .with_keep_alive(Duration::from_secs(10), config.timeout);
        if let Some(tls) = &config.tls {
            let read =
                |path: &Path| std::fs::read(path).map_err(|source| StoreError::Io { path: path.to_path_buf(), source });
            let mut tls_options = TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca_file)?));
            if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
                tls_options = tls_options.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            options = options.with_tls(tls_options);
        }
        let mut members = Vec::new();
        for endpoint in &config.endpoints {
            let connect = Client::connect([endpoint], Some(options.clone()));
            let client = tokio::time::timeout(config.timeout, connect)
                .await
                .map_err(|_| StoreError::EtcdProtocol {
                    endpoints: endpoints.clone(),
                    message: format!("unreachable: no connection within {:?}", config.timeout),
                })?
                .map_err(|source| StoreError::Etcd { endpoints: endpoints.clone(), source })?;
            let kv = client.kv_client().max_decoding_message_size(usize::MAX);
            let watcher = client.watch_client().max_decoding_message_size(usize::MAX);
            members.push(Member { client, kv, watcher });
        }
        let store = EtcdStore {
            members: std::sync::Arc::new(members),
            active: Default::default(),
            endpoints,
            timeout: config.timeout,
        };
        // The channel connects lazily: ask something now so a bad endpoint fails here.
        store.current_revision().await.map_err(|e| match e {
            StoreError::Etcd { endpoints, source } => {
                StoreError::EtcdProtocol { endpoints, message: format!("unreachable: {source}") }
            }
            other => other,
        })?;
        Ok(store)
    }

    fn error(&self, source: etcd_client::Error) -> StoreError {
        StoreError::Etcd { endpoints: self.endpoints.clone(), source }
    }

    fn protocol(&self, message: impl Into<String>) -> StoreError {
        StoreError::EtcdProtocol { endpoints: self.endpoints.clone(), message: message.into() }
    }

    /// Runs `op` on the active member, then on the next ones while they cannot be reached.
    async fn on_member<T, F, Fut>(&self, op: F) -> std::result::Result<T, etcd_client::Error>
    where
        F: Fn(Member) -> Fut,
        Fut: Future<Output = std::result::Result<T, etcd_client::Error>>,
    {
        use std::sync::atomic::Ordering;
        let count = self.members.len();
        let start = self.active.load(Ordering::Relaxed);
        let mut last = None;
        for attempt in 0..count {
            let i = (start + attempt) % count;
            match op(self.members[i].clone()).await {
                Err(error) if unreachable(&error) => {
                    tracing::debug!(member = i, %error, "etcd member unreachable; trying the next");
                    last = Some(error);
                }
                result => {
                    if attempt > 0 {
                        self.active.store(i, Ordering::Relaxed);
                    }
                    return result;
                }
            }
        }
        Err(last.expect("at least one member"))
    }

    /// Runs one request with the configured timeout.
    async fn call<T>(&self, request: impl Future<Output = std::result::Result<T, etcd_client::Error>>) -> Result<T> {
        match tokio::time::timeout(self.timeout, request).await {
            Ok(result) => result.map_err(|e| self.error(e)),
            Err(_) => Err(self.protocol(format!("no answer within {:?}", self.timeout))),
        }
    }

    fn key_value(&self, kv: &etcd_client::KeyValue) -> Result<KeyValue> {
        let key = kv.key_str().map_err(|_| self.protocol(format!("non-UTF-8 key {:?}", kv.key())))?;
        Ok(KeyValue {
            key: key.to_string(),
            value: kv.value().to_vec(),
            create_revision: kv.create_revision(),
            mod_revision: kv.mod_revision(),
            version: kv.version(),
        })
    }

    /// The revision history starts at: found with a watch from revision 1, which etcd cancels
    /// naming the compact revision (etcd has no direct query for it).
    async fn compact_revision(&self) -> Result<Revision> {
        let options = WatchOptions::new().with_start_revision(1);
        let mut stream = self
            .call(self.on_member(|mut m| {
                let options = options.clone();
                async move { m.watcher.watch("\0tugboat-compaction-probe", Some(options)).await }
            }))
            .await?;
        for _ in 0..2 {
            match tokio::time::timeout(self.timeout, stream.message()).await {
                Ok(Ok(Some(response))) if response.compact_revision() > 0 => {
                    return Ok(response.compact_revision());
                }
                Ok(Ok(Some(response))) if response.created() => continue,
                _ => break,
            }
        }
        Ok(0)
    }

    /// Turns etcd's "compacted"/"future revision" answers into the store's errors.
    async fn read_error(&self, requested: Revision, source: etcd_client::Error) -> StoreError {
        match revision_error(&source) {
            Some("compacted") => match self.compact_revision().await {
                Ok(compacted) => StoreError::Compacted { requested, compacted },
                Err(e) => e,
            },
            Some(_) => match self.current_revision().await {
                Ok(current) => StoreError::FutureRevision { requested, current },
                Err(e) => e,
            },
            None => self.error(source),
        }
    }

    /// Reads the current value of `key` from the else-branch of a failed transaction.
    fn current_from(&self, responses: Vec<TxnOpResponse>) -> Result<Option<KeyValue>> {
        match responses.into_iter().next() {
            Some(TxnOpResponse::Get(get)) => get.kvs().first().map(|kv| self.key_value(kv)).transpose(),
            _ => Err(self.protocol("transaction answered without the expected read")),
        }
    }
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn create(&self, key: &str, value: Vec<u8>) -> Result<Revision> {
        let txn = Txn::new()
            .when([Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then([TxnOp::put(key, value, None)])
            .or_else([TxnOp::get(key, None)]);
        let response = self.call(self.on_member(|m| txn_on(m, txn.clone()))).await?;
        if response.succeeded() {
            let header = response.header().ok_or_else(|| self.protocol("transaction answered without a header"))?;
            return Ok(header.revision());
        }
        Err(StoreError::AlreadyExists { key: key.to_string() })
    }

    async fn update(&self, key: &str, value: Vec<u8>, expected: Revision) -> Result<Revision> {
        let txn = Txn::new()
            .when([Compare::mod_revision(key, CompareOp::Equal, expected)])
            .and_then([TxnOp::put(key, value, None)])
            .or_else([TxnOp::get(key, None)]);
        let response = self.call(self.on_member(|m| txn_on(m, txn.clone()))).await?;
        if response.succeeded() {
            let header = response.header().ok_or_else(|| self.protocol("transaction answered without a header"))?;
            return Ok(header.revision());
        }
        match self.current_from(response.op_responses())? {
            None => Err(StoreError::NotFound { key: key.to_string() }),
            Some(current) => {
                Err(StoreError::Conflict { key: key.to_string(), expected, current: current.mod_revision })
            }
        }
    }

    async fn delete(&self, key: &str, expected: Option<Revision>) -> Result<(Revision, KeyValue)> {
        let compare = match expected {
            Some(expected) => Compare::mod_revision(key, CompareOp::Equal, expected),
            None => Compare::create_revision(key, CompareOp::Greater, 0),
        };
        let txn = Txn::new()
            .when([compare])
            .and_then([TxnOp::delete(key, Some(DeleteOptions::new().with_prev_key()))])
            .or_else([TxnOp::get(key, None)]);
        let response = self.call(self.on_member(|m| txn_on(m, txn.clone()))).await?;
        if response.succeeded() {
            let revision =
                response.header().ok_or_else(|| self.protocol("transaction answered without a header"))?.revision();
            let prev = match response.op_responses().into_iter().next() {
                Some(TxnOpResponse::Delete(delete)) => {
                    delete.prev_kvs().first().map(|kv| self.key_value(kv)).transpose()?
                }
                _ => None,
            };
            let prev = prev.ok_or_else(|| self.protocol("delete answered without the deleted value"))?;
            return Ok((revision, prev));
        }
        match (self.current_from(response.op_responses())?, expected) {
            (Some(current), Some(expected)) => {
                Err(StoreError::Conflict { key: key.to_string(), expected, current: current.mod_revision })
            }
            _ => Err(StoreError::NotFound { key: key.to_string() }),
        }
    }

    async fn get(&self, key: &str, revision: Option<Revision>) -> Result<Option<KeyValue>> {
        let mut options = GetOptions::new();
        if let Some(revision) = revision.filter(|r| *r > 0) {
            options = options.with_revision(revision);
        }
        let response = match tokio::time::timeout(
            self.timeout,
            self.on_member(|mut m| {
                let options = options.clone();
                async move { m.kv.get(key, Some(options)).await }
            }),
        )
        .await
        {
            Ok(Ok(response)) => response,
            Ok(Err(source)) => return Err(self.read_error(revision.unwrap_or(0), source).await),
            Err(_) => return Err(self.protocol(format!("no answer within {:?}", self.timeout))),
        };
        response.kvs().first().map(|kv| self.key_value(kv)).transpose()
    }

    async fn list(&self, prefix: &str, options: ListOptions) -> Result<ListResult> {
        let plan = ListPlan::new(prefix, &options)?;
        let mut get = match prefix_end(prefix) {
            Some(end) => GetOptions::new().with_range(end),
            None => GetOptions::new().with_from_key(),
        };
        if let Some(revision) = plan.revision {
            get = get.with_revision(revision);
        }
        if let Some(limit) = plan.limit {
            get = get.with_limit(limit);
        }
        let start = plan.start_key.as_bytes();
        let response = match tokio::time::timeout(
            self.timeout,
            self.on_member(|mut m| {
                let get = get.clone();
                async move { m.kv.get(start, Some(get)).await }
            }),
        )
        .await
        {
            Ok(Ok(response)) => response,
            Ok(Err(source)) => {
                return Err(self.read_error(plan.revision.unwrap_or(0), source).await);
            }
            Err(_) => return Err(self.protocol(format!("no answer within {:?}", self.timeout))),
        };
        let header = response.header().ok_or_else(|| self.protocol("range answered without a header"))?;
        let at = plan.revision.unwrap_or(header.revision());
        let kvs = response.kvs().iter().map(|kv| self.key_value(kv)).collect::<Result<Vec<_>>>()?;
        let (continue_token, remaining) = match kvs.last() {
            Some(last) if response.more() => {
                let remaining = response.count() - kvs.len() as i64;
                (Some(ContinueToken::after(prefix, &last.key, at).encode()), Some(remaining))
            }
            _ => (None, None),
        };
        Ok(ListResult { kvs, revision: at, continue_token, remaining })
    }

    async fn count(&self, prefix: &str) -> Result<i64> {
        let get = match prefix_end(prefix) {
            Some(end) => GetOptions::new().with_range(end),
            None => GetOptions::new().with_from_key(),
        };
        let get = get.with_count_only();
        let response = self
            .call(self.on_member(|mut m| {
                let get = get.clone();
                async move { m.kv.get(prefix, Some(get)).await }
            }))
            .await?;
        Ok(response.count())
    }

    async fn watch(&self, prefix: &str, after: Revision) -> Result<WatchStream> {
        // etcd reports a compacted start only inside the stream; check first so the caller gets
        // Compacted (410) before any stream exists.
        let current = self.current_revision().await?;
        if after < current {
            let probe = GetOptions::new().with_revision(after + 1).with_count_only();
            let probed = self.on_member(|mut m| {
                let probe = probe.clone();
                async move { m.kv.get("\0", Some(probe)).await }
            });
            if let Err(source) = probed.await {
                return Err(self.read_error(after + 1, source).await.with_requested(after));
            }
        }
        let options = match prefix_end(prefix) {
            Some(end) => WatchOptions::new().with_range(end),
            None => WatchOptions::new().with_from_key(),
        }
        .with_start_revision(after + 1)
        .with_prev_key()
        .with_progress_notify();
        let mut stream = self
            .call(self.on_member(|mut m| {
                let options = options.clone();
                async move { m.watcher.watch(prefix, Some(options)).await }
            }))
            .await?;
        let (tx, rx) = mpsc::channel(256);
        let store = self.clone();
        tokio::spawn(async move {
            let mut last = after;
            loop {
                let message = tokio::select! {
                    message = stream.message() => message,
                    _ = tx.closed() => return,
                };
                let response = match message {
                    Ok(Some(response)) => response,
                    Ok(None) => {
                        let _ = tx.send(Err(store.protocol("watch stream ended"))).await;
                        return;
                    }
                    Err(source) => {
                        let _ = tx.send(Err(store.error(source))).await;
                        return;
                    }
                };
                if response.compact_revision() > 0 {
                    let compacted = response.compact_revision();
                    let _ = tx.send(Err(StoreError::Compacted { requested: last, compacted })).await;
                    return;
                }
                if response.canceled() {
                    let reason = format!("watch canceled: {}", response.cancel_reason());
                    let _ = tx.send(Err(store.protocol(reason))).await;
                    return;
                }
                for event in response.events() {
                    let mapped = (|| {
                        let kv = event.kv().ok_or_else(|| store.protocol("watch event without a key"))?;
                        let kind = match event.event_type() {
                            EventType::Put => EventKind::Put,
                            EventType::Delete => EventKind::Delete,
                        };
                        let prev = event.prev_kv().map(|kv| store.key_value(kv)).transpose()?;
                        Ok(Event { kind, kv: store.key_value(kv)?, prev })
                    })();
                    if let Ok(event) = &mapped {
                        last = event.revision();
                    }
                    let failed = mapped.is_err();
                    if tx.send(mapped).await.is_err() || failed {
                        return;
                    }
                }
            }
        });
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn current_revision(&self) -> Result<Revision> {
        let response = self
            .call(
                self.on_member(|mut m| async move { m.kv.get("\0", Some(GetOptions::new().with_count_only())).await }),
            )
            .await?;
        Ok(response.header().ok_or_else(|| self.protocol("range answered without a header"))?.revision())
    }

    async fn compact(&self, revision: Revision) -> Result<()> {
        let compacted = self.on_member(|mut m| async move {
            m.kv.compact(revision, Some(CompactionOptions::new().with_physical())).await
        });
        match tokio::time::timeout(self.timeout, compacted).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(source)) => match revision_error(&source) {
                Some("compacted") => Ok(()),
                Some(_) => {
                    Err(StoreError::FutureRevision { requested: revision, current: self.current_revision().await? })
                }
                None => Err(self.error(source)),
            },
            Err(_) => Err(self.protocol(format!("no answer within {:?}", self.timeout))),
        }
    }

    async fn defragment(&self) -> Result<()> {
        let defragmented = self.on_member(|m| async move { m.client.maintenance_client().defragment().await });
        self.call(defragmented).await.map(|_| ())
    }

    async fn etcd_snapshot(&self, dest: &Path) -> Result<SnapshotInfo> {
        // etcd's own snapshot is one.
        self.snapshot(dest).await
    }

    async fn snapshot(&self, dest: &Path) -> Result<SnapshotInfo> {
        let revision = self.current_revision().await?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StoreError::Io { path, source }
        };
        let name = dest.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
        let partial = dest.with_file_name(format!(".{name}.partial"));
        let mut file = tokio::fs::File::create(&partial).await.map_err(io(&partial))?;
        let mut stream =
            self.call(self.on_member(|m| async move { m.client.maintenance_client().snapshot().await })).await?;
        let mut size = 0u64;
        while let Some(chunk) = stream.message().await.map_err(|e| self.error(e))? {
            file.write_all(chunk.blob()).await.map_err(io(&partial))?;
            size += chunk.blob().len() as u64;
        }
        file.sync_all().await.map_err(io(&partial))?;
        drop(file);
        tokio::fs::rename(&partial, dest).await.map_err(io(dest))?;
        if let Some(dir) = dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::File::open(dir).and_then(|f| f.sync_all()).map_err(io(dir))?;
        }
        Ok(SnapshotInfo { revision, size })
    }
}

impl StoreError {
    /// For a Compacted error found while probing revision `after + 1`: report the watch's own
    /// starting point.
    fn with_requested(self, requested: Revision) -> StoreError {
        match self {
            StoreError::Compacted { compacted, .. } => StoreError::Compacted { requested, compacted },
            other => other,
        }
    }
}
