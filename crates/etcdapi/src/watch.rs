//! The Watch service: one bidirectional stream carries many watches, each a store watch of
//! its span's prefix from its start revision.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;

use etcd_client::proto::{PbEvent, PbWatchRequest, PbWatchRequestUnion, PbWatchResponse, PbWatchService};
use futures::{Stream, StreamExt};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};
use tugboat_store::{EventKind, StoreError};

use crate::kv::Span;
use crate::{EtcdApi, pb_kv};

/// etcd's `clientv3.InvalidWatchID`: a progress response not tied to one watch.
const ANY_WATCH: i64 = -1;
/// WatchCreateRequest.FilterType: NOPUT, NODELETE.
const NO_PUT: i32 = 0;
const NO_DELETE: i32 = 1;

type Responses = Pin<Box<dyn Stream<Item = Result<PbWatchResponse, Status>> + Send>>;

/// The Watch service of one [`EtcdApi`].
#[derive(Debug, Clone)]
pub(crate) struct WatchService(pub Arc<EtcdApi>);

#[tonic::async_trait]
impl PbWatchService for WatchService {
    type WatchStream = Responses;

    async fn watch(&self, request: Request<Streaming<PbWatchRequest>>) -> Result<Response<Responses>, Status> {
        let (tx, rx) = mpsc::channel(256);
        let (api, mut incoming) = (self.0.clone(), request.into_inner());
        tokio::spawn(async move {
            let mut watchers: HashMap<i64, tokio::task::JoinHandle<()>> = HashMap::new();
            let mut next_id = 0;
            while let Some(Ok(request)) = incoming.next().await {
                watchers.retain(|_, task| !task.is_finished());
                match request.request_union {
                    Some(PbWatchRequestUnion::CreateRequest(create)) => {
                        let id = match create.watch_id {
                            0 => {
                                while watchers.contains_key(&next_id) {
                                    next_id += 1;
                                }
                                next_id
                            }
                            id => id,
                        };
                        if watchers.contains_key(&id) {
                            let refused = PbWatchResponse {
                                header: api.header(api.current().await.unwrap_or(0)),
                                watch_id: id,
                                created: true,
                                canceled: true,
                                cancel_reason: "etcdserver: duplicate watch ID".to_string(),
                                ..Default::default()
                            };
                            if tx.send(Ok(refused)).await.is_err() {
                                break;
                            }
                            continue;
                        }
                        let watcher = Watcher {
                            api: api.clone(),
                            id,
                            span: Span::new(create.key, create.range_end),
                            start: create.start_revision,
                            prev_kv: create.prev_kv,
                            no_put: create.filters.contains(&NO_PUT),
                            no_delete: create.filters.contains(&NO_DELETE),
                            tx: tx.clone(),
                        };
                        watchers.insert(id, tokio::spawn(watcher.run()));
                    }
                    Some(PbWatchRequestUnion::CancelRequest(cancel)) => {
                        if let Some(task) = watchers.remove(&cancel.watch_id) {
                            task.abort();
                        }
                        let canceled = PbWatchResponse {
                            header: api.header(api.current().await.unwrap_or(0)),
                            watch_id: cancel.watch_id,
                            canceled: true,
                            ..Default::default()
                        };
                        if tx.send(Ok(canceled)).await.is_err() {
                            break;
                        }
                    }
                    Some(PbWatchRequestUnion::ProgressRequest(_)) => {
                        let progress = PbWatchResponse {
                            header: api.header(api.current().await.unwrap_or(0)),
                            watch_id: ANY_WATCH,
                            ..Default::default()
                        };
                        if tx.send(Ok(progress)).await.is_err() {
                            break;
                        }
                    }
                    None => {}
                }
            }
            for (_, task) in watchers {
                task.abort();
            }
        });
        Ok(Response::new(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))))
    }
}

/// One watch of a stream.
struct Watcher {
    api: Arc<EtcdApi>,
    id: i64,
    span: Result<Span, Status>,
    start: i64,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    tx: mpsc::Sender<Result<PbWatchResponse, Status>>,
}

impl Watcher {
    fn response(&self, revision: i64) -> PbWatchResponse {
        PbWatchResponse { header: self.api.header(revision), watch_id: self.id, ..Default::default() }
    }

    fn canceled(&self, revision: i64, reason: String, compacted: i64) -> PbWatchResponse {
        PbWatchResponse {
            canceled: true,
            cancel_reason: reason,
            compact_revision: compacted,
            ..self.response(revision)
        }
    }

    /// The response that ends the watch on a store error: etcd's compacted cancel names the
    /// compact revision.
    fn ended(&self, revision: i64, error: StoreError) -> PbWatchResponse {
        match error {
            StoreError::Compacted { compacted, .. } => {
                let reason = "etcdserver: mvcc: required revision has been compacted".to_string();
                self.canceled(revision, reason, compacted)
            }
            other => self.canceled(revision, other.to_string(), 0),
        }
    }

    async fn run(self) {
        let current = self.api.current().await.unwrap_or(0);
        let span = match &self.span {
            Ok(span) => span.clone(),
            Err(error) => {
                let _ = self.tx.send(Ok(self.canceled(current, error.message().to_string(), 0))).await;
                return;
            }
        };
        if self.tx.send(Ok(PbWatchResponse { created: true, ..self.response(current) })).await.is_err() {
            return;
        }
        let after = if self.start > 0 { self.start - 1 } else { current };
        let mut stream = match self.api.store.watch(&span.prefix(), after).await {
            Ok(stream) => stream,
            Err(error) => {
                let _ = self.tx.send(Ok(self.ended(current, error))).await;
                return;
            }
        };
        while let Some(event) = stream.next().await {
            let event = match event {
                Ok(event) => event,
                Err(error) => {
                    let _ = self.tx.send(Ok(self.ended(current, error))).await;
                    return;
                }
            };
            if !span.contains(&event.kv.key)
                || (event.kind == EventKind::Put && self.no_put)
                || (event.kind == EventKind::Delete && self.no_delete)
            {
                continue;
            }
            let revision = event.revision();
            let (r#type, kv) = match event.kind {
                EventKind::Put => {
                    let lease = self.api.leases.of(&event.kv.key);
                    (0, pb_kv(event.kv, false, lease))
                }
                // etcd's delete event: the key and the deletion's revision.
                EventKind::Delete => (
                    1,
                    etcd_client::proto::PbKeyValue {
                        key: event.kv.key.into_bytes(),
                        mod_revision: revision,
                        ..Default::default()
                    },
                ),
            };
            let prev_kv = event.prev.filter(|_| self.prev_kv).map(|kv| pb_kv(kv, false, 0));
            let events = vec![PbEvent { r#type, kv: Some(kv), prev_kv }];
            if self.tx.send(Ok(PbWatchResponse { events, ..self.response(revision) })).await.is_err() {
                return;
            }
        }
    }
}
