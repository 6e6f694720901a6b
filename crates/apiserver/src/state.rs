//! What every request handler shares ([`ApiState`]: the store, the watch caches, the served
//! resources, the clients of kubelets and aggregated servers) and the object access everything
//! above builds on: reading a request's body, one object or a list from the watch caches or
//! the store. This module sits below every feature of the server: nothing here knows the
//! router or a feature that uses it.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Response, StatusCode, header};
use bytes::Bytes;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tugboat_store::Store;

use crate::object::read_stored;
use crate::registry::{self, Resource};
use crate::status::ApiError;

pub const MAX_BODY: usize = 3 * 1024 * 1024;

/// What every request handler shares.
#[derive(Debug)]
pub struct ApiState {
    pub store: Arc<dyn Store>,
    /// `host:port` clients reach this server at (for `/api`).
    pub server_address: String,
    /// Where ClusterIPs come from.
    pub service_cidr: crate::services::ServiceCidr,
    pub metrics: crate::metrics::Metrics,
    /// Watches and `resourceVersion=0` lists are served from here.
    pub caches: crate::watch_cache::WatchCaches,
    /// How `pods/log` (and exec, attach, port-forward) reach kubelets.
    pub kubelets: crate::outbound::KubeletClient,
    /// Signs and verifies service account tokens.
    pub signer: crate::auth::TokenSigner,
    /// The static bearer tokens of `--token-auth-file`.
    pub tokens: Arc<crate::auth::TokenFile>,
    /// The resources CustomResourceDefinitions add.
    pub custom: crate::custom_kinds::CustomResources,
    /// The group versions APIServices put behind Services.
    pub aggregated: crate::aggregated::Aggregated,
    /// How this server proves itself to aggregated API servers.
    pub front_proxy: crate::aggregated::FrontProxy,
}

impl ApiState {
    /// Every served resource: the built-in ones, then the custom ones.
    pub fn resources(&self) -> Vec<&'static Resource> {
        registry::RESOURCES.iter().chain(self.custom.all().iter().copied()).collect()
    }

    /// A served resource by group, version and plural.
    pub fn find_resource(&self, group: &str, version: &str, plural: &str) -> Option<&'static Resource> {
        registry::find(group, version, plural).or_else(|| self.custom.find(group, version, plural))
    }
}

pub(crate) fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Body::from(value.to_string()));
    *response.status_mut() = code;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

pub(crate) fn text_response(text: &'static str) -> Response<Body> {
    let mut response = Response::new(Body::from(text));
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// The server's version, as `/version` and `kubectl version` show it. kubectl's dispatcher picks
/// its client by the minor version. Tugboat serves the Kubernetes 1.33 API (its schemas are
/// k8s-openapi's v1_33; kubectl 1.32+'s protobuf bodies are decoded).
pub fn version() -> Value {
    json!({
        "major": "1",
        "minor": "33",
        "gitVersion": format!("v1.33.0+tugboat-{}", env!("CARGO_PKG_VERSION")),
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "rust",
        "compiler": "rustc",
        "platform": format!("{}/{}", std::env::consts::OS, if std::env::consts::ARCH == "x86_64" { "amd64" } else { std::env::consts::ARCH }),
    })
}

pub(crate) async fn read_body(mut body: Body) -> Result<Bytes, ApiError> {
    let mut buffer = bytes::BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::bad_request(format!("reading the request body: {e}")))?;
        if let Ok(data) = frame.into_data() {
            if buffer.len() + data.len() > MAX_BODY {
                drain_in_background(body);
                return Err(ApiError::too_large(MAX_BODY));
            }
            buffer.extend_from_slice(&data);
        }
    }
    Ok(buffer.freeze())
}

/// Reads and discards the rest of a refused body (at most 64 MiB, for at most 30 s). Over
/// HTTP/2, dropping an unread body resets the stream and the client never sees the answer.
pub(crate) fn drain_in_background(mut body: Body) {
    tokio::spawn(async move {
        let drain = async {
            let mut total = 0usize;
            while let Some(Ok(frame)) = body.frame().await {
                total += frame.data_ref().map(|d| d.len()).unwrap_or(0);
                if total > 64 * 1024 * 1024 {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(30), drain).await;
    });
}

/// The objects of `resource` in `namespace` (every one with `None`), from its watch cache.
pub(crate) async fn cached_list(
    state: &ApiState,
    resource: &Resource,
    namespace: Option<&str>,
) -> Result<Vec<Value>, ApiError> {
    let cache = state
        .caches
        .get(&resource.prefix(None))
        .await
        .map_err(|e| ApiError::from_store(e, resource.group, resource.plural, ""))?;
    Ok(cache.list(&resource.prefix(namespace)).0)
}

/// One object from the watch cache (its key as the prefix: only it, and names it begins, are
/// decoded).
pub(crate) async fn cached_get(
    state: &ApiState,
    resource: &Resource,
    namespace: Option<&str>,
    name: &str,
) -> Result<Option<Value>, ApiError> {
    let cache = state
        .caches
        .get(&resource.prefix(None))
        .await
        .map_err(|e| ApiError::from_store(e, resource.group, resource.plural, name))?;
    Ok(cache.list(&resource.key(namespace, name)).0.into_iter().find(|o| o["metadata"]["name"] == name))
}

pub(crate) async fn read_object(
    state: &ApiState,
    resource: &Resource,
    namespace: Option<&str>,
    name: &str,
) -> Result<(Value, i64), ApiError> {
    let (object, revision) = read_stored(state.store.as_ref(), resource, namespace, name).await?;
    Ok((crate::conversion::convert_one(state.store.as_ref(), resource, object).await?, revision))
}
