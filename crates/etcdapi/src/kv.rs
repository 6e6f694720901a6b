//! The KV service: Range, Put, DeleteRange, Txn, Compact.

use std::sync::Arc;

use etcd_client::proto::{
    PbCompactionRequest, PbCompactionResponse, PbCompare, PbDeleteRequest, PbDeleteResponse, PbKvService, PbPutRequest,
    PbPutResponse, PbRangeRequest, PbRangeResponse, PbRangeStreamResponse, PbResponseOp, PbTargetUnion, PbTxnOpRequest,
    PbTxnOpResponse, PbTxnRequest, PbTxnResponse,
};
use tonic::{Request, Response, Status};
use tugboat_store::{KeyValue, ListOptions, Revision, StoreError};

use crate::{EtcdApi, key_text, pb_kv, status};

/// The keys a request names: etcd's `key` and `range_end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Span {
    /// `range_end` empty: this key.
    One(String),
    /// Every key in `[start, end)`; `end` `None`: every key from `start` on (`range_end` "\0").
    Range { start: String, end: Option<Vec<u8>> },
}

impl Span {
    pub(crate) fn new(key: Vec<u8>, range_end: Vec<u8>) -> Result<Span, Status> {
        if range_end.is_empty() {
            return Ok(Span::One(key_text(key)?));
        }
        // `--from-key` with an empty key is key "\0"; the whole keyspace.
        let start = if key == [0] { String::new() } else { key_text(key)? };
        let end = (range_end != [0]).then_some(range_end);
        Ok(Span::Range { start, end })
    }

    pub(crate) fn contains(&self, key: &str) -> bool {
        match self {
            Span::One(one) => key == one,
            Span::Range { start, end } => {
                key >= start.as_str() && end.as_ref().is_none_or(|end| key.as_bytes() < end.as_slice())
            }
        }
    }

    /// The longest prefix every key of the span has (what the store lists by).
    pub(crate) fn prefix(&self) -> String {
        match self {
            Span::One(key) => key.clone(),
            Span::Range { end: None, .. } => String::new(),
            Span::Range { start, end: Some(end) } => {
                let common = start.bytes().zip(end.iter()).take_while(|(a, b)| a == *b).count();
                // On a character boundary: the store's keys are text.
                let mut at = common.min(start.len());
                while !start.is_char_boundary(at) {
                    at -= 1;
                }
                start[..at].to_string()
            }
        }
    }

    /// Whether the span is exactly the keys under a prefix (`etcdctl --prefix`), which the
    /// store lists page by page.
    fn whole_prefix(&self) -> Option<&str> {
        match self {
            Span::Range { start, end: Some(end) } if prefix_end(start.as_bytes()) == *end => Some(start),
            Span::Range { start, end: None } if start.is_empty() => Some(start),
            _ => None,
        }
    }
}

/// The first key after every key with `prefix` (etcd's `GetPrefixRangeEnd`).
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl EtcdApi {
    /// The values in `span` at `revision` (latest when `None`) and the revision read at.
    pub(crate) async fn read(
        &self,
        span: &Span,
        revision: Option<Revision>,
    ) -> Result<(Vec<KeyValue>, Revision), Status> {
        match span {
            Span::One(key) => {
                let kv = self.store.get(key, revision).await.map_err(status)?;
                let at = match revision {
                    Some(revision) => revision,
                    None => self.current().await?,
                };
                Ok((kv.into_iter().collect(), at))
            }
            Span::Range { .. } => {
                let options = ListOptions { revision, ..Default::default() };
                let page = self.store.list(&span.prefix(), options).await.map_err(status)?;
                let kvs = page.kvs.into_iter().filter(|kv| span.contains(&kv.key)).collect();
                Ok((kvs, page.revision))
            }
        }
    }

    pub(crate) async fn range(&self, request: PbRangeRequest) -> Result<PbRangeResponse, Status> {
        let span = Span::new(request.key, request.range_end)?;
        let revision = Some(request.revision).filter(|r| *r > 0);
        let filtered = request.min_mod_revision > 0
            || request.max_mod_revision > 0
            || request.min_create_revision > 0
            || request.max_create_revision > 0;
        let sorted = request.sort_order != 0;
        // A plain limited read of a prefix: one page from the store, which counts the rest.
        if let (Some(prefix), false, false, limit @ 1..) = (span.whole_prefix(), filtered, sorted, request.limit) {
            let options = ListOptions { revision, limit: Some(limit), continue_token: None };
            let page = self.store.list(prefix, options).await.map_err(status)?;
            let remaining = page.remaining.unwrap_or(0);
            let count = page.kvs.len() as i64 + remaining;
            let kvs = match request.count_only {
                true => Vec::new(),
                false => page.kvs.into_iter().map(|kv| self.pb_kv(kv, request.keys_only)).collect(),
            };
            return Ok(PbRangeResponse { header: self.header(page.revision), kvs, more: remaining > 0, count });
        }
        let (mut kvs, at) = self.read(&span, revision).await?;
        kvs.retain(|kv| {
            (request.min_mod_revision <= 0 || kv.mod_revision >= request.min_mod_revision)
                && (request.max_mod_revision <= 0 || kv.mod_revision <= request.max_mod_revision)
                && (request.min_create_revision <= 0 || kv.create_revision >= request.min_create_revision)
                && (request.max_create_revision <= 0 || kv.create_revision <= request.max_create_revision)
        });
        if sorted {
            // SortTarget: KEY, VERSION, CREATE, MOD, VALUE.
            match request.sort_target {
                1 => kvs.sort_by_key(|kv| kv.version),
                2 => kvs.sort_by_key(|kv| kv.create_revision),
                3 => kvs.sort_by_key(|kv| kv.mod_revision),
                4 => kvs.sort_by(|a, b| a.value.cmp(&b.value)),
                _ => kvs.sort_by(|a, b| a.key.cmp(&b.key)),
            }
            // SortOrder: NONE, ASCEND, DESCEND.
            if request.sort_order == 2 {
                kvs.reverse();
            }
        }
        let count = kvs.len() as i64;
        let more = request.limit > 0 && count > request.limit;
        if more {
            kvs.truncate(request.limit as usize);
        }
        let kvs = match request.count_only {
            true => Vec::new(),
            false => kvs.into_iter().map(|kv| self.pb_kv(kv, request.keys_only)).collect(),
        };
        Ok(PbRangeResponse { header: self.header(at), kvs, more, count })
    }

    fn pb_kv(&self, kv: KeyValue, keys_only: bool) -> etcd_client::proto::PbKeyValue {
        let lease = self.leases.of(&kv.key);
        pb_kv(kv, keys_only, lease)
    }

    /// Writes `value` at `key` whatever is there; `expected`: only if the key's mod revision
    /// is that (0: only if it does not exist). Returns the write's revision and what the key
    /// held before; `Ok(None)` when `expected` did not hold.
    pub(crate) async fn put_value(
        &self,
        key: &str,
        value: Vec<u8>,
        expected: Option<Revision>,
    ) -> Result<Option<(Revision, Option<KeyValue>)>, Status> {
        let Some(expected) = expected else {
            return self.store.put(key, value).await.map(Some).map_err(status);
        };
        let previous = self.store.get(key, None).await.map_err(status)?;
        if previous.as_ref().map_or(0, |kv| kv.mod_revision) != expected {
            return Ok(None);
        }
        // Conditional on the revision read: a change meanwhile means `expected` no longer holds.
        let written = match &previous {
            Some(kv) => self.store.update(key, value, kv.mod_revision).await,
            None => self.store.create(key, value).await,
        };
        match written {
            Ok(revision) => Ok(Some((revision, previous))),
            Err(StoreError::Conflict { .. } | StoreError::AlreadyExists { .. } | StoreError::NotFound { .. }) => {
                Ok(None)
            }
            Err(error) => Err(status(error)),
        }
    }

    pub(crate) async fn put(&self, request: PbPutRequest) -> Result<PbPutResponse, Status> {
        let key = key_text(request.key)?;
        if request.ignore_value || request.ignore_lease {
            return Err(Status::unimplemented("ignore_value and ignore_lease are not supported"));
        }
        if request.lease != 0 && !self.leases.exists(request.lease) {
            return Err(Status::not_found("etcdserver: requested lease not found"));
        }
        // The lease first (durably): a crash before the put leaves a lease naming a missing key.
        self.leases.attach(&key, request.lease)?;
        let Some((revision, previous)) = self.put_value(&key, request.value, None).await? else {
            return Err(Status::internal("an unconditional put was refused"));
        };
        let prev_kv = previous.filter(|_| request.prev_kv).map(|kv| pb_kv(kv, false, 0));
        Ok(PbPutResponse { header: self.header(revision), prev_kv })
    }

    /// Deletes the keys of `span`; `expected`: a single key only at that mod revision.
    /// Returns the last deletion's revision (`None`: nothing deleted) and what was deleted.
    async fn delete_span(
        &self,
        span: &Span,
        expected: Option<Revision>,
    ) -> Result<(Option<Revision>, Vec<KeyValue>), Status> {
        let keys: Vec<(String, Revision)> = match span {
            Span::One(key) => vec![(key.clone(), expected.unwrap_or(0))],
            Span::Range { .. } => {
                self.read(span, None).await?.0.into_iter().map(|kv| (kv.key, kv.mod_revision)).collect()
            }
        };
        let (mut last, mut deleted) = (None, Vec::new());
        for (key, at) in keys {
            let guard = if matches!(span, Span::One(_)) { expected } else { Some(at) };
            match self.store.delete(&key, guard).await {
                Ok((revision, kv)) => {
                    self.leases.detach(&key)?;
                    last = Some(revision);
                    deleted.push(kv);
                }
                // Gone or changed meanwhile: a range deletes what it saw.
                Err(StoreError::NotFound { .. } | StoreError::Conflict { .. }) => {}
                Err(error) => return Err(status(error)),
            }
        }
        Ok((last, deleted))
    }

    pub(crate) async fn delete_range(&self, request: PbDeleteRequest) -> Result<PbDeleteResponse, Status> {
        let span = Span::new(request.key, request.range_end)?;
        let (last, deleted) = self.delete_span(&span, None).await?;
        let revision = match last {
            Some(revision) => revision,
            None => self.current().await?,
        };
        Ok(PbDeleteResponse {
            header: self.header(revision),
            deleted: deleted.len() as i64,
            prev_kvs: match request.prev_kv {
                true => deleted.into_iter().map(|kv| pb_kv(kv, false, 0)).collect(),
                false => Vec::new(),
            },
        })
    }

    /// Whether `compare` holds now.
    async fn holds(&self, compare: &PbCompare) -> Result<bool, Status> {
        let span = Span::new(compare.key.clone(), compare.range_end.clone())?;
        let (kvs, _) = self.read(&span, None).await?;
        // CompareResult: EQUAL, GREATER, LESS, NOT_EQUAL.
        let test = |ordering: std::cmp::Ordering| match compare.result {
            0 => ordering.is_eq(),
            1 => ordering.is_gt(),
            2 => ordering.is_lt(),
            _ => ordering.is_ne(),
        };
        // A compare of a key that does not exist compares its zero values (etcd's way).
        let absent = kvs.is_empty() && matches!(span, Span::One(_));
        let compared = |kv: Option<&KeyValue>| -> Result<bool, Status> {
            Ok(match &compare.target_union {
                Some(PbTargetUnion::Version(version)) => test(kv.map_or(0, |kv| kv.version).cmp(version)),
                Some(PbTargetUnion::CreateRevision(revision)) => {
                    test(kv.map_or(0, |kv| kv.create_revision).cmp(revision))
                }
                Some(PbTargetUnion::ModRevision(revision)) => test(kv.map_or(0, |kv| kv.mod_revision).cmp(revision)),
                Some(PbTargetUnion::Value(value)) => match kv {
                    Some(kv) => test(kv.value.as_slice().cmp(value.as_slice())),
                    None => false,
                },
                Some(PbTargetUnion::Lease(lease)) => test(kv.map_or(0, |kv| self.leases.of(&kv.key)).cmp(lease)),
                None => return Err(Status::invalid_argument("a compare without a target value")),
            })
        };
        if absent {
            return compared(None);
        }
        for kv in &kvs {
            if !compared(Some(kv))? {
                return Ok(false);
            }
        }
        Ok(true)
    }

    pub(crate) async fn txn(&self, request: PbTxnRequest) -> Result<PbTxnResponse, Status> {
        'attempt: loop {
            let mut succeeded = true;
            for compare in &request.compare {
                if !self.holds(compare).await? {
                    succeeded = false;
                    break;
                }
            }
            let ops = if succeeded { &request.success } else { &request.failure };
            // A write to a key whose mod revision the compares pin is conditional on it: if
            // the key changed since the compares were read, the whole txn is evaluated again.
            let pinned = |key: &[u8]| -> Option<Revision> {
                if !succeeded {
                    return None;
                }
                request.compare.iter().find_map(|c| match (&c.target_union, c.result, c.range_end.is_empty()) {
                    (Some(PbTargetUnion::ModRevision(revision)), 0, true) if c.key == key => Some(*revision),
                    _ => None,
                })
            };
            let mut responses = Vec::with_capacity(ops.len());
            let mut last = None;
            for op in ops {
                let response = match &op.request {
                    Some(PbTxnOpRequest::RequestRange(range)) => {
                        PbTxnOpResponse::ResponseRange(self.range(range.clone()).await?)
                    }
                    Some(PbTxnOpRequest::RequestPut(put)) => {
                        let key = key_text(put.key.clone())?;
                        if put.lease != 0 && !self.leases.exists(put.lease) {
                            return Err(Status::not_found("etcdserver: requested lease not found"));
                        }
                        let Some((revision, previous)) =
                            self.put_value(&key, put.value.clone(), pinned(&put.key)).await?
                        else {
                            continue 'attempt;
                        };
                        // After the conditional write (which may send the txn round again).
                        self.leases.attach(&key, put.lease)?;
                        last = Some(revision);
                        let prev_kv = previous.filter(|_| put.prev_kv).map(|kv| pb_kv(kv, false, 0));
                        PbTxnOpResponse::ResponsePut(PbPutResponse { header: self.header(revision), prev_kv })
                    }
                    Some(PbTxnOpRequest::RequestDeleteRange(delete)) => {
                        let span = Span::new(delete.key.clone(), delete.range_end.clone())?;
                        let expected = pinned(&delete.key).filter(|_| matches!(span, Span::One(_)));
                        let (revision, deleted) = self.delete_span(&span, expected).await?;
                        if expected.is_some_and(|e| e != 0) && deleted.is_empty() {
                            continue 'attempt;
                        }
                        last = last.max(revision);
                        PbTxnOpResponse::ResponseDeleteRange(PbDeleteResponse {
                            header: self.header(revision.unwrap_or(0)),
                            deleted: deleted.len() as i64,
                            prev_kvs: match delete.prev_kv {
                                true => deleted.into_iter().map(|kv| pb_kv(kv, false, 0)).collect(),
                                false => Vec::new(),
                            },
                        })
                    }
                    Some(PbTxnOpRequest::RequestTxn(_)) => {
                        return Err(Status::unimplemented("nested transactions are not supported"));
                    }
                    None => return Err(Status::invalid_argument("an empty request op")),
                };
                responses.push(PbResponseOp { response: Some(response) });
            }
            let revision = match last {
                Some(revision) => revision,
                None => self.current().await?,
            };
            // Every response of the txn carries the txn's header.
            let header = self.header(revision);
            for response in &mut responses {
                match &mut response.response {
                    Some(PbTxnOpResponse::ResponsePut(r)) => r.header = header,
                    Some(PbTxnOpResponse::ResponseDeleteRange(r)) => r.header = header,
                    Some(PbTxnOpResponse::ResponseRange(r)) => r.header = header,
                    _ => {}
                }
            }
            return Ok(PbTxnResponse { header, succeeded, responses });
        }
    }

    pub(crate) async fn compact(&self, request: PbCompactionRequest) -> Result<PbCompactionResponse, Status> {
        let current = self.current().await?;
        if request.revision > current {
            return Err(Status::out_of_range("etcdserver: mvcc: required revision is a future revision"));
        }
        if self.store.compacted_revision().is_some_and(|compacted| request.revision <= compacted) {
            return Err(Status::out_of_range("etcdserver: mvcc: required revision has been compacted"));
        }
        self.store.compact(request.revision).await.map_err(status)?;
        Ok(PbCompactionResponse { header: self.header(current) })
    }
}

/// The KV service of one [`EtcdApi`].
#[derive(Debug, Clone)]
pub(crate) struct Kv(pub Arc<EtcdApi>);

#[tonic::async_trait]
impl PbKvService for Kv {
    async fn range(&self, request: Request<PbRangeRequest>) -> Result<Response<PbRangeResponse>, Status> {
        Ok(Response::new(self.0.range(request.into_inner()).await?))
    }

    type RangeStreamStream = futures::stream::Empty<Result<PbRangeStreamResponse, Status>>;

    async fn range_stream(&self, _: Request<PbRangeRequest>) -> Result<Response<Self::RangeStreamStream>, Status> {
        Err(Status::unimplemented("RangeStream is not served: use Range"))
    }

    async fn put(&self, request: Request<PbPutRequest>) -> Result<Response<PbPutResponse>, Status> {
        Ok(Response::new(self.0.put(request.into_inner()).await?))
    }

    async fn delete_range(&self, request: Request<PbDeleteRequest>) -> Result<Response<PbDeleteResponse>, Status> {
        Ok(Response::new(self.0.delete_range(request.into_inner()).await?))
    }

    async fn txn(&self, request: Request<PbTxnRequest>) -> Result<Response<PbTxnResponse>, Status> {
        Ok(Response::new(self.0.txn(request.into_inner()).await?))
    }

    async fn compact(&self, request: Request<PbCompactionRequest>) -> Result<Response<PbCompactionResponse>, Status> {
        Ok(Response::new(self.0.compact(request.into_inner()).await?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_name_keys_as_etcd_does() {
        let prefix = Span::new(b"/registry/pods/".to_vec(), b"/registry/pods0".to_vec()).unwrap();
        assert_eq!(prefix.prefix(), "/registry/pods");
        assert_eq!(prefix.whole_prefix(), Some("/registry/pods/"));
        assert!(prefix.contains("/registry/pods/default/a"));
        assert!(!prefix.contains("/registry/podsecuritypolicies/x"));
        let all = Span::new(vec![0], vec![0]).unwrap();
        assert_eq!((all.prefix().as_str(), all.whole_prefix()), ("", Some("")));
        let from = Span::new(b"/registry/b".to_vec(), vec![0]).unwrap();
        assert!(from.contains("/registry/z") && !from.contains("/registry/a"));
        let range = Span::new(b"/a/b".to_vec(), b"/a/d".to_vec()).unwrap();
        assert_eq!(range.prefix(), "/a/");
        assert!(range.contains("/a/c") && !range.contains("/a/d") && range.whole_prefix().is_none());
        assert_eq!(prefix_end(b"/"), b"0");
        assert_eq!(prefix_end(&[b'a', 0xff]), b"b");
        assert!(Span::new(Vec::new(), Vec::new()).is_err());
    }
}
