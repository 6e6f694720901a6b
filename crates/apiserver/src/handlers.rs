//! Request handling: route a Kubernetes API path, then get, list, watch, create, update, patch
//! or delete objects in the store. Every failure becomes a `Status` (see `status.rs`).

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Response, StatusCode, header};
use bytes::Bytes;
use futures::StreamExt;
use http_body_util::BodyExt;
use serde_json::{Value, json};
use tugboat_store::{EventKind, ListOptions, Store, StoreError};

use crate::admission;
use crate::auth::UserInfo;
use crate::discovery;
use crate::fields;
use crate::object::{self, decode_body};
use crate::registry::{self, Resource};
use crate::selector::{FieldSelector, LabelSelector, supported_fields};
use crate::status::ApiError;
use crate::table;

/// Upstream's limit for a request body (3 MiB).
pub const MAX_BODY: usize = 3 * 1024 * 1024;
/// How often an optimistic update is retried when the object changes underneath.
const UPDATE_RETRIES: usize = 5;

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
    pub kubelets: crate::kubelet::KubeletClient,
    /// Signs and verifies service account tokens.
    pub signer: crate::service_accounts::TokenSigner,
    /// The static bearer tokens of `--token-auth-file`.
    pub tokens: Arc<crate::auth::TokenFile>,
    /// The resources CustomResourceDefinitions add.
    pub custom: crate::crd::CustomResources,
    /// The group versions APIServices put behind Services.
    pub aggregated: crate::aggregator::Aggregated,
    /// How this server proves itself to aggregated API servers.
    pub front_proxy: crate::aggregator::FrontProxy,
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

pub(crate) type Query = HashMap<String, String>;

pub(crate) fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let mut response = Response::new(Body::from(value.to_string()));
    *response.status_mut() = code;
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

fn text_response(text: &'static str) -> Response<Body> {
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

/// Paths served without credentials, as upstream's `system:public-info-viewer` allows.
pub fn is_public(path: &str) -> bool {
    matches!(path, "/version" | "/healthz" | "/livez" | "/readyz" | crate::bootstrap::CLUSTER_INFO_PATH)
        || path.starts_with("/healthz/")
        || path.starts_with("/livez/")
        || path.starts_with("/readyz/")
}

/// Serves one request from an authenticated `user` (or a public path).
pub async fn handle(state: Arc<ApiState>, user: Option<UserInfo>, request: hyper::Request<Body>) -> Response<Body> {
    let (parts, body) = request.into_parts();
    let path = parts.uri.path().to_string();
    let query: Query =
        parts.uri.query().map(|q| url::form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default();
    // Without credentials: the public paths, and cluster-info only to read.
    let public = is_public(&path) && (path != crate::bootstrap::CLUSTER_INFO_PATH || parts.method == Method::GET);
    if !public && user.is_none() {
        // Read what the client sends anyway: a body left unread resets an HTTP/2 stream, and
        // the client then sees a protocol error instead of the 401.
        drain_in_background(body);
        return ApiError::unauthorized().into_response();
    }
    let started = std::time::Instant::now();
    // Parsed once: for routing and for the metrics labels.
    let target = parse_target(&path, |g, v, p| state.find_resource(g, v, p));
    let (verb, group, resource) = request_labels(&parts.method, target.as_ref().ok().and_then(Option::as_ref), &query);
    // Who acts (the caller, or whom it impersonates) and whether RBAC lets them.
    let user = match authorize(&state, user, &parts, &path, target.as_ref().ok().and_then(Option::as_ref), &verb).await
    {
        Ok(user) => user,
        Err(error) => {
            drain_in_background(body);
            let response = error.into_response();
            state.metrics.record(&verb, group, resource, response.status().as_u16(), started.elapsed());
            return response;
        }
    };
    // exec, attach and port-forward: the connection is upgraded and spliced to the kubelet's.
    let streaming = match &target {
        Ok(Some(t)) if t.resource.group.is_empty() && t.resource.plural == "pods" => {
            match (t.subresource.as_deref(), &t.name) {
                (Some(sub @ ("exec" | "attach" | "portforward")), Some(name)) => {
                    Some((sub.to_string(), name.clone(), t.namespace.clone().unwrap_or_else(|| "default".into())))
                }
                // Logs over a websocket (binary.k8s.io), as upstream's streamer serves them.
                (Some("log"), Some(name))
                    if parts.method == Method::GET
                        && parts
                            .headers
                            .get(header::UPGRADE)
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|v| v.eq_ignore_ascii_case("websocket")) =>
                {
                    Some(("log".to_string(), name.clone(), t.namespace.clone().unwrap_or_else(|| "default".into())))
                }
                _ => None,
            }
        }
        _ => None,
    };
    let proxied = match &target {
        Ok(Some(t)) if t.subresource.as_deref() == Some("proxy") => crate::proxy::parse(parts.uri.path()),
        _ => None,
    };
    // A group version an APIService puts behind a Service: the request goes there.
    if let Some(remote) = state.aggregated.target(&path) {
        let request = hyper::Request::from_parts(parts, body);
        let response = match crate::aggregator::forward(&state, &remote, user.as_ref(), request).await {
            Ok(response) => response,
            Err(error) => error.into_response(),
        };
        state.metrics.record(&verb, group, resource, response.status().as_u16(), started.elapsed());
        return response;
    }
    let result = match (streaming, proxied) {
        (_, Some((plural, namespace, id, rest))) => {
            let (plural, namespace, id, rest) =
                (plural.to_string(), namespace.map(str::to_string), id.to_string(), rest.to_string());
            let target = crate::proxy::Target { plural: &plural, namespace: namespace.as_deref(), id: &id };
            crate::proxy::forward(&state, target, &rest, hyper::Request::from_parts(parts, body)).await
        }
        (Some((subresource, name, namespace)), None) if subresource == "log" => {
            crate::kubelet::pod_log_websocket(&state, &namespace, &name, parts, &query).await
        }
        (Some((subresource, name, namespace)), None) => {
            let raw_query = parts.uri.query().unwrap_or_default().to_string();
            match admission::connect(&state, user.as_ref(), &subresource, &namespace, &name, &raw_query).await {
                Ok(()) => {
                    let request = hyper::Request::from_parts(parts, body);
                    crate::kubelet::proxy_stream(&state, &namespace, &name, &subresource, request, &query).await
                }
                Err(error) => {
                    drain_in_background(body);
                    Err(error)
                }
            }
        }
        (None, None) => route(&state, user.as_ref(), &parts.method, &path, target, &query, &parts.headers, body).await,
    };
    let response = match result {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    state.metrics.record(&verb, group, resource, response.status().as_u16(), started.elapsed());
    response
}

/// The one name a field selector requires (`metadata.name=x` or `metadata.name==x` among its
/// terms), as upstream's `RequiresExactMatch`.
fn selected_name(query: &str) -> Option<String> {
    let (_, selector) = url::form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == "fieldSelector")?;
    selector.split(',').find_map(|term| {
        let value = term.trim().strip_prefix("metadata.name")?;
        let value = value.strip_prefix("==").or_else(|| value.strip_prefix('='))?;
        (!value.is_empty() && !value.starts_with('=')).then(|| value.to_string())
    })
}

/// What a request asks, as RBAC sees it.
fn attributes(
    method: &Method,
    path: &str,
    target: Option<&Target>,
    verb: &str,
    watching: bool,
) -> crate::rbac::Attributes {
    use crate::rbac::{Attributes, ResourceAttributes};
    if let Some(t) = target {
        // exec, attach and port-forward: `create` for POST (SPDY), `get` for GET (websocket).
        let verb = match t.subresource.as_deref() {
            Some("exec" | "attach" | "portforward") if method == Method::GET => "get",
            Some("exec" | "attach" | "portforward") => "create",
            _ => verb,
        };
        return Attributes {
            verb: verb.to_string(),
            resource: Some(ResourceAttributes {
                group: t.resource.group.to_string(),
                resource: t.resource.plural.to_string(),
                subresource: t.subresource.clone().unwrap_or_default(),
                namespace: t.namespace.clone().unwrap_or_default(),
                name: t.name.clone().unwrap_or_default(),
            }),
            path: path.to_string(),
        };
    }
    // A group version served elsewhere (an APIService's, or metrics.k8s.io): its resource
    // requests are authorized as such, read from the path as upstream's RequestInfo does.
    if let Some(rest) = path.strip_prefix("/apis/") {
        let mut segments: Vec<&str> = rest.trim_matches('/').split('/').filter(|s| !s.is_empty()).collect();
        if segments.len() > 2 {
            let group = segments[0];
            segments.drain(..2);
            let mut namespace = "";
            if segments[0] == "namespaces" && segments.len() > 2 {
                namespace = segments[1];
                segments.drain(..2);
            }
            let (resource, name, subresource) = (segments[0], segments.get(1).copied(), segments.get(2).copied());
            let verb = match (method, name.is_some()) {
                (&Method::GET | &Method::HEAD, true) => "get",
                (&Method::GET | &Method::HEAD, false) if watching => "watch",
                (&Method::GET | &Method::HEAD, false) => "list",
                (&Method::POST, _) => "create",
                (&Method::PUT, _) => "update",
                (&Method::PATCH, _) => "patch",
                (&Method::DELETE, true) => "delete",
                (&Method::DELETE, false) => "deletecollection",
                _ => verb,
            };
            return Attributes {
                verb: verb.into(),
                resource: Some(ResourceAttributes {
                    group: group.into(),
                    resource: resource.into(),
                    subresource: subresource.unwrap_or_default().into(),
                    namespace: namespace.into(),
                    name: name.unwrap_or_default().into(),
                }),
                path: path.to_string(),
            };
        }
    }
    Attributes { verb: method.as_str().to_ascii_lowercase(), resource: None, path: path.to_string() }
}

/// Authorizes the request: public paths need no one; impersonation (`Impersonate-User`,
/// `Impersonate-Group`) must itself be allowed; then RBAC decides. Returns who acts.
async fn authorize(
    state: &ApiState,
    user: Option<UserInfo>,
    parts: &hyper::http::request::Parts,
    path: &str,
    target: Option<&Target>,
    verb: &str,
) -> Result<Option<UserInfo>, ApiError> {
    let Some(mut user) = user else { return Ok(None) };
    let header = |name: &str| -> Vec<String> {
        parts.headers.get_all(name).iter().filter_map(|v| v.to_str().ok().map(str::to_string)).collect()
    };
    if let Some(impersonated) = header("impersonate-user").into_iter().next() {
        use crate::rbac::{Attributes, ResourceAttributes};
        let groups = header("impersonate-group");
        let sa = impersonated.strip_prefix("system:serviceaccount:").and_then(|rest| rest.split_once(':'));
        let mut asks = vec![match sa {
            Some((namespace, name)) => ("serviceaccounts", namespace.to_string(), name.to_string()),
            None => ("users", String::new(), impersonated.clone()),
        }];
        asks.extend(groups.iter().map(|g| ("groups", String::new(), g.clone())));
        for (resource, namespace, name) in asks {
            let attributes = Attributes {
                verb: "impersonate".into(),
                resource: Some(ResourceAttributes {
                    group: String::new(),
                    resource: resource.into(),
                    subresource: String::new(),
                    namespace,
                    name,
                }),
                path: path.to_string(),
            };
            if !crate::rbac::allowed(state, &user, &attributes).await? {
                return Err(crate::rbac::forbidden(&user, &attributes));
            }
        }
        let asker = user.clone();
        let mut groups = groups;
        if let Some((namespace, _)) = sa {
            groups.push("system:serviceaccounts".into());
            groups.push(format!("system:serviceaccounts:{namespace}"));
        }
        user = UserInfo::new(impersonated, String::new(), groups);
        // `Impersonate-Uid`: allowed by `impersonate` on `uids` of authentication.k8s.io.
        if let Some(uid) = header("impersonate-uid").into_iter().next() {
            let attributes = Attributes {
                verb: "impersonate".into(),
                resource: Some(ResourceAttributes {
                    group: "authentication.k8s.io".into(),
                    resource: "uids".into(),
                    subresource: String::new(),
                    namespace: String::new(),
                    name: uid.clone(),
                }),
                path: path.to_string(),
            };
            if !crate::rbac::allowed(state, &asker, &attributes).await? {
                return Err(crate::rbac::forbidden(&asker, &attributes));
            }
            user.uid = uid;
        }
        // `Impersonate-Extra-<key>` (the key URL-escaped): each must be allowed too, as
        // upstream asks `impersonate` on `userextras/<key>`.
        for (name, value) in &parts.headers {
            let Some(key) = name.as_str().strip_prefix("impersonate-extra-") else { continue };
            let key = url::form_urlencoded::parse(format!("k={key}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            let value = value.to_str().unwrap_or_default().to_string();
            let attributes = Attributes {
                verb: "impersonate".into(),
                resource: Some(ResourceAttributes {
                    group: "authentication.k8s.io".into(),
                    resource: "userextras".into(),
                    subresource: key.clone(),
                    namespace: String::new(),
                    name: value.clone(),
                }),
                path: path.to_string(),
            };
            if !crate::rbac::allowed(state, &asker, &attributes).await? {
                return Err(crate::rbac::forbidden(&asker, &attributes));
            }
            user.extra.entry(key).or_default().push(value);
        }
    }
    let watching = parts.uri.query().is_some_and(|q| {
        url::form_urlencoded::parse(q.as_bytes()).any(|(k, v)| k == "watch" && (v == "true" || v == "1"))
    });
    let mut attributes = attributes(&parts.method, path, target, verb, watching);
    // A list or watch of one name (`fieldSelector=metadata.name=x`) is judged as of that name,
    // as upstream's RequestInfo does: a Role naming the object lets its informer run.
    if let Some(resource) = attributes.resource.as_mut()
        && resource.name.is_empty()
        && matches!(attributes.verb.as_str(), "list" | "watch")
        && let Some(name) = parts.uri.query().and_then(selected_name)
    {
        resource.name = name;
    }
    if crate::rbac::allowed(state, &user, &attributes).await? {
        Ok(Some(user))
    } else {
        Err(crate::rbac::forbidden(&user, &attributes))
    }
}

/// The verb (upstream's: get, list, watch, create, update, patch, delete, deletecollection) and
/// the resource of a request, for metrics; non-resource paths count under their method.
fn request_labels(method: &Method, target: Option<&Target>, query: &Query) -> (String, &'static str, &'static str) {
    let Some(target) = target else {
        return (method.as_str().to_ascii_lowercase(), "", "");
    };
    let watching = query.get("watch").is_some_and(|w| w == "true" || w == "1");
    let verb = match (method, target.name.is_some()) {
        (&Method::GET, true) => "get",
        (&Method::GET, false) if watching => "watch",
        (&Method::GET, false) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, true) => "delete",
        (&Method::DELETE, false) => "deletecollection",
        _ => {
            return (method.as_str().to_ascii_lowercase(), target.resource.group, target.resource.plural);
        }
    };
    (verb.to_string(), target.resource.group, target.resource.plural)
}

/// A parsed resource path.
#[derive(Debug)]
struct Target {
    resource: &'static Resource,
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

fn parse_target(
    path: &str,
    lookup: impl Fn(&str, &str, &str) -> Option<&'static Resource>,
) -> Result<Option<Target>, ApiError> {
    let segments: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(|s| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned())
        .collect();
    let (group, version, rest) = match segments.first().map(String::as_str) {
        Some("api") if segments.len() >= 3 => ("", segments[1].as_str(), &segments[2..]),
        Some("apis") if segments.len() >= 4 => (segments[1].as_str(), segments[2].as_str(), &segments[3..]),
        _ => return Ok(None),
    };
    let find = |plural: &str| lookup(group, version, plural);
    let not_found = || ApiError::not_found_path(path);
    // namespaces/<ns>/<plural>[/<name>[/<sub>]] for namespaced resources...
    if rest.len() >= 3
        && rest[0] == "namespaces"
        && let Some(resource) = find(&rest[2]).filter(|r| r.namespaced)
    {
        if rest.len() > 5 && rest[4] != "proxy" {
            return Err(not_found());
        }
        return Ok(Some(Target {
            resource,
            namespace: Some(rest[1].clone()),
            name: rest.get(3).cloned(),
            subresource: rest.get(4).cloned(),
        }));
    }
    // ...else <plural>[/<name>[/<sub>]], which lists namespaced resources across namespaces.
    let resource = find(&rest[0]).ok_or_else(not_found)?;
    if (rest.len() > 3 && rest[2] != "proxy") || (resource.namespaced && rest.len() > 1) {
        return Err(not_found());
    }
    Ok(Some(Target { resource, namespace: None, name: rest.get(1).cloned(), subresource: rest.get(2).cloned() }))
}

#[allow(clippy::too_many_arguments)]
async fn route(
    state: &ApiState,
    user: Option<&UserInfo>,
    method: &Method,
    path: &str,
    target: Result<Option<Target>, ApiError>,
    query: &Query,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response<Body>, ApiError> {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("");
    if matches!(path, "/api" | "/api/" | "/apis" | "/apis/")
        && let Some(version) = discovery::aggregated_version(accept)
    {
        let core = path.trim_end_matches('/') == "/api";
        let mut document = discovery::aggregated(&state.resources(), core, version);
        if !core {
            crate::aggregator::merge_aggregated(state, &mut document);
        }
        let mut response = json_response(StatusCode::OK, &document);
        let content_type = format!("application/json;g=apidiscovery.k8s.io;v={version};as=APIGroupDiscoveryList");
        response
            .headers_mut()
            .insert(header::CONTENT_TYPE, header::HeaderValue::from_str(&content_type).expect("a valid header value"));
        return Ok(response);
    }
    match path {
        "/version" | "/version/" => return Ok(json_response(StatusCode::OK, &version())),
        "/healthz" | "/livez" | "/readyz" => return Ok(text_response("ok")),
        "/.well-known/openid-configuration" | "/.well-known/openid-configuration/" => {
            return Ok(json_response(StatusCode::OK, &crate::service_accounts::openid_configuration()));
        }
        "/openid/v1/jwks" | "/openid/v1/jwks/" => {
            let mut response = json_response(StatusCode::OK, &state.signer.jwks());
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/jwk-set+json"));
            return Ok(response);
        }
        "/metrics" => {
            let mut response = Response::new(Body::from(state.metrics.render()));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/openmetrics-text; version=1.0.0; charset=utf-8"),
            );
            return Ok(response);
        }
        "/api" | "/api/" => {
            return Ok(json_response(StatusCode::OK, &discovery::api_versions(&state.server_address)));
        }
        "/apis" | "/apis/" => {
            let mut list = discovery::api_group_list(&state.resources());
            crate::aggregator::merge_group_list(state, &mut list);
            return Ok(json_response(StatusCode::OK, &list));
        }
        _ => {}
    }
    if path == "/openapi/v2" || path == "/openapi/v2/" {
        if accept.contains("protobuf") {
            let mut response = Response::new(Body::from(crate::openapi_v2::protobuf()));
            response
                .headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(crate::openapi_v2::PROTOBUF_MEDIA_TYPE));
            return Ok(response);
        }
        return Ok(json_response(StatusCode::OK, &crate::openapi::swagger_with(&state.custom.all())));
    }
    if path == "/openapi/v3" || path == "/openapi/v3/" {
        return Ok(json_response(StatusCode::OK, &crate::openapi::index(&state.custom.all())));
    }
    if let Some(group_version) = path.strip_prefix("/openapi/v3/") {
        return crate::openapi::group_version(group_version, &state.custom.all())
            .map(|document| json_response(StatusCode::OK, &document))
            .ok_or_else(|| ApiError::not_found_path(path));
    }
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    match segments.as_slice() {
        ["api", version] => {
            return discovery::api_resource_list(&state.resources(), "", version)
                .map(|list| json_response(StatusCode::OK, &list))
                .ok_or_else(|| ApiError::not_found_path(path));
        }
        ["apis", group] => {
            return discovery::api_group(&state.resources(), group)
                .or_else(|| crate::aggregator::group(state, group))
                .map(|g| json_response(StatusCode::OK, &g))
                .ok_or_else(|| ApiError::not_found_path(path));
        }
        ["apis", crate::resource_metrics::GROUP, crate::resource_metrics::VERSION, rest @ ..] if !rest.is_empty() => {
            return crate::resource_metrics::serve(state, method, rest, query).await;
        }
        ["apis", group, version] => {
            return discovery::api_resource_list(&state.resources(), group, version)
                .map(|list| json_response(StatusCode::OK, &list))
                .ok_or_else(|| ApiError::not_found_path(path));
        }
        _ => {}
    }
    // Refuse an oversized body by its declared length, before reading any of it (a client
    // that sent `Expect: 100-continue` then never sends it).
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|length| length > MAX_BODY) {
        drain_in_background(body);
        return Err(ApiError::too_large(MAX_BODY));
    }
    let target = target?.ok_or_else(|| ApiError::not_found_path(path))?;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("application/json");
    let write = Write {
        manager: field_manager(query, headers),
        dry_run: query.get("dryRun").is_some_and(|v| v == "All"),
        apply: false,
        validation: FieldValidation::from_query(query)?,
        warnings: Default::default(),
        duplicates: Default::default(),
        user: user.cloned(),
        admit: true,
    };
    // NodeRestriction: a kubelet's credentials write only its own Node, Lease and pods.
    let body = match user.and_then(crate::node::node_of) {
        Some(node) if method != Method::GET => {
            let parts =
                (target.resource, target.namespace.as_deref(), target.name.as_deref(), target.subresource.as_deref());
            crate::node::admit(state, node, method, parts, content_type, body).await?
        }
        _ => body,
    };
    if let (Some(subresource @ ("binding" | "eviction")), Some(name), "pods", "") =
        (target.subresource.as_deref(), target.name.as_deref(), target.resource.plural, target.resource.group)
    {
        if method != Method::POST {
            return Err(ApiError::method_not_allowed(method.as_str()));
        }
        let request = decode_body(content_type, &read_body(body).await?)?;
        let namespace = target.namespace.as_deref();
        return match subresource {
            "binding" => crate::pod_subresources::bind(state, namespace, name, &request, &write).await,
            _ => crate::pod_subresources::evict(state, namespace, name, &request, &write).await,
        };
    }
    if let (Some("token"), Some(name), "serviceaccounts", "") =
        (target.subresource.as_deref(), target.name.as_deref(), target.resource.plural, target.resource.group)
    {
        if method != Method::POST {
            return Err(ApiError::method_not_allowed(method.as_str()));
        }
        let request = decode_body(content_type, &read_body(body).await?)?;
        let namespace = target.namespace.as_deref().unwrap_or("default");
        let answer = crate::service_accounts::token_request(state, namespace, name, request).await?;
        return Ok(json_response(StatusCode::CREATED, &answer));
    }
    if let (Some("log"), Some(name), "pods", "") =
        (target.subresource.as_deref(), target.name.as_deref(), target.resource.plural, target.resource.group)
    {
        if method != Method::GET {
            return Err(ApiError::method_not_allowed(method.as_str()));
        }
        return crate::kubelet::pod_log(state, target.namespace.as_deref().unwrap_or("default"), name, query).await;
    }
    let view = View::from_subresource(target.resource, target.subresource.as_deref())
        .map_err(|_| ApiError::not_found_path(path))?;
    let result = dispatch(state, user, method, target, view, query, accept, content_type, body, &write).await;
    // Upstream's warning format: `299 - "unknown field \"spec.foo\""`; kubectl prints each.
    let warnings = std::mem::take(&mut *write.warnings.lock().unwrap_or_else(|e| e.into_inner()));
    result.map(|mut response| {
        for warning in warnings {
            let text = format!("299 - {}", Value::String(warning));
            if let Ok(value) = header::HeaderValue::from_str(&text) {
                response.headers_mut().append(header::WARNING, value);
            }
        }
        response
    })
}

/// Sends a request for a resource to its handler.
#[allow(clippy::too_many_arguments)]
async fn dispatch(
    state: &ApiState,
    user: Option<&UserInfo>,
    method: &Method,
    target: Target,
    view: View,
    query: &Query,
    accept: &str,
    content_type: &str,
    body: Body,
    write: &Write,
) -> Result<Response<Body>, ApiError> {
    if target.resource.is_review() {
        if method != Method::POST || target.name.is_some() {
            return Err(ApiError::method_not_allowed(method.as_str()));
        }
        // A review has no metadata to make a Table of: a client that accepts only Tables gets 406.
        let tables_only = accept.split(',').all(|media| media.contains("as=Table"));
        if !accept.trim().is_empty() && tables_only {
            return Err(ApiError::not_acceptable(accept));
        }
        let body = read_body(body).await?;
        let mut review = decode_body(content_type, &body)?;
        if let Some(namespace) = target.namespace.as_deref().filter(|_| target.resource.namespaced) {
            match review["metadata"]["namespace"].as_str() {
                None | Some("") => review["metadata"]["namespace"] = json!(namespace),
                Some(given) if given != namespace => {
                    return Err(ApiError::bad_request(
                        "the namespace of the provided object does not match the namespace sent on the request",
                    ));
                }
                Some(_) => {}
            }
        }
        return Ok(json_response(StatusCode::CREATED, &answer_review(state, target.resource, user, review).await?));
    }
    let namespace = target.namespace.as_deref();
    match (method, target.name.as_deref()) {
        (&Method::GET, Some(name)) if view != View::Main => {
            let (object, _) = read_object(state, target.resource, namespace, name).await?;
            Ok(json_response(StatusCode::OK, &view.project(target.resource, &object)))
        }
        (&Method::GET, Some(name)) => get(state, target.resource, namespace, name, accept, query).await,
        (&Method::GET, None) => {
            if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
                watch(state, target.resource, namespace, query, accept).await
            } else {
                list(state, target.resource, namespace, query, accept).await
            }
        }
        (&Method::POST, None) if target.resource.plural == "certificatesigningrequests" => {
            // Who asks is recorded by the server, not claimed by the client.
            let mut object = decode_body(content_type, &read_body(body).await?)?;
            if !object["spec"].is_object() {
                return Err(ApiError::bad_request("spec: Required value"));
            }
            let user = user.cloned().unwrap_or_default();
            object["spec"]["username"] = json!(user.name);
            object["spec"]["uid"] = json!(user.uid);
            object["spec"]["groups"] = json!(user.groups);
            if !user.extra.is_empty() {
                object["spec"]["extra"] = json!(user.extra);
            }
            create_object(state, target.resource, namespace, object, write, None).await
        }
        (&Method::POST, None) => {
            let body = read_body(body).await?;
            create(state, target.resource, namespace, content_type, &body, write).await
        }
        (&Method::PUT, Some(name)) => {
            let body = read_body(body).await?;
            update(state, (target.resource, namespace, name), view, content_type, &body, write).await
        }
        (&Method::PATCH, Some(name))
            if content_type.split(';').next().is_some_and(|m| m.trim() == "application/apply-patch+yaml") =>
        {
            if !matches!(view, View::Main | View::Status) {
                return Err(ApiError::method_not_allowed("apply on a subresource"));
            }
            let body = read_body(body).await?;
            server_side_apply(state, (target.resource, namespace, name), view, query, &body, write).await
        }
        (&Method::PATCH, Some(name)) => {
            let body = read_body(body).await?;
            patch(state, (target.resource, namespace, name), view, content_type, &body, write).await
        }
        (_, _) if view != View::Main => Err(ApiError::method_not_allowed(method.as_str())),
        (&Method::DELETE, Some(name)) => {
            let body = read_body(body).await?;
            delete(state, target.resource, namespace, name, query, (content_type, &body), write).await
        }
        (&Method::DELETE, None) => {
            let body = read_body(body).await?;
            delete_collection(state, target.resource, namespace, query, (content_type, &body), write).await
        }
        (method, _) => Err(ApiError::method_not_allowed(method.as_str())),
    }
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
fn drain_in_background(mut body: Body) {
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

/// Checks the namespace a namespaced request names: it must exist and not be terminating.
async fn check_namespace(
    state: &ApiState,
    resource: &Resource,
    namespace: Option<&str>,
    creating: bool,
) -> Result<(), ApiError> {
    if !resource.namespaced {
        return Ok(());
    }
    let Some(namespace) = namespace else {
        return Err(ApiError::bad_request("a namespace is required"));
    };
    let namespaces = registry::find("", "v1", "namespaces").expect("namespaces are served");
    let key = namespaces.key(None, namespace);
    let found = state.store.get(&key, None).await.map_err(|e| ApiError::from_store(e, "", "namespaces", namespace))?;
    let Some(found) = found else {
        return Err(ApiError::not_found("", "namespaces", namespace));
    };
    if creating {
        let object = object::from_store(namespaces, &found.value, found.mod_revision)?;
        if object["status"]["phase"] == "Terminating" {
            let mut error = ApiError::bad_request(format!(
                "{} \"{}\" is forbidden: unable to create new content in namespace {namespace} because it is being terminated",
                resource.plural, ""
            ));
            error.code = 403;
            error.reason = "Forbidden";
            return Err(error);
        }
    }
    Ok(())
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

/// One object as stored (a custom one in its stored version when a webhook converts it).
pub(crate) async fn read_stored(
    store: &dyn Store,
    resource: &Resource,
    namespace: Option<&str>,
    name: &str,
) -> Result<(Value, i64), ApiError> {
    let key = resource.key(namespace, name);
    match store.get(&key, None).await {
        Ok(Some(kv)) => Ok((object::from_store(resource, &kv.value, kv.mod_revision)?, kv.mod_revision)),
        Ok(None) => Err(ApiError::not_found(resource.group, resource.plural, name)),
        Err(error) => Err(ApiError::from_store(error, resource.group, resource.plural, name)),
    }
}

fn include_object(query: &Query) -> String {
    query.get("includeObject").cloned().unwrap_or_else(|| "Metadata".into())
}

async fn get(
    state: &ApiState,
    resource: &Resource,
    namespace: Option<&str>,
    name: &str,
    accept: &str,
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let (object, revision) = read_object(state, resource, namespace, name).await?;
    if table::wants_table(accept) {
        let table = table::table(resource, &[object], &revision.to_string(), None, &include_object(query), true);
        return Ok(json_response(StatusCode::OK, &table));
    }
    if table::wants_metadata(accept) {
        return Ok(json_response(StatusCode::OK, &table::partial(&object)));
    }
    Ok(json_response(StatusCode::OK, &object))
}

struct Filters {
    plural: &'static str,
    labels: LabelSelector,
    fields: FieldSelector,
}

impl Filters {
    fn from_query(resource: &Resource, query: &Query) -> Result<Filters, ApiError> {
        let labels = LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))
            .map_err(ApiError::bad_request)?;
        let fields = FieldSelector::parse(query.get("fieldSelector").map(String::as_str).unwrap_or(""))
            .map_err(ApiError::bad_request)?;
        let mut supported: Vec<&str> = supported_fields(resource.plural).to_vec();
        if let Some(custom) = resource.custom {
            supported = vec!["metadata.name", "metadata.namespace"];
            supported.extend(custom.selectable.iter().map(String::as_str));
        }
        if let Some(field) = fields.fields().find(|f| !supported.contains(f)) {
            return Err(ApiError::bad_request(format!(
                "field label not supported: {field} (for {}: {})",
                resource.plural,
                supported.join(", ")
            )));
        }
        Ok(Filters { plural: resource.plural, labels, fields })
    }

    fn matches(&self, object: &Value) -> bool {
        crate::selector::matches_object(&self.labels, object) && self.fields.matches(self.plural, object)
    }
}

fn parse_revision(text: Option<&String>) -> Result<Option<i64>, ApiError> {
    match text.map(String::as_str) {
        None | Some("") | Some("0") => Ok(None),
        Some(text) => text
            .parse::<i64>()
            .map(Some)
            .map_err(|_| ApiError::bad_request(format!("invalid resource version {text:?}"))),
    }
}

async fn list(
    state: &ApiState,
    resource: &Resource,
    namespace: Option<&str>,
    query: &Query,
    accept: &str,
) -> Result<Response<Body>, ApiError> {
    let filters = Filters::from_query(resource, query)?;
    let limit = match query.get("limit") {
        Some(limit) => {
            Some(limit.parse::<i64>().map_err(|_| ApiError::bad_request(format!("invalid limit {limit:?}")))?)
        }
        None => None,
    };
    let revision = match query.get("resourceVersionMatch").map(String::as_str) {
        Some("Exact") => parse_revision(query.get("resourceVersion"))?,
        _ => None,
    };
    let options =
        ListOptions { revision, limit, continue_token: query.get("continue").cloned().filter(|c| !c.is_empty()) };
    let prefix = resource.prefix(namespace);
    // `resourceVersion=0` (what informers list with): any recent state will do, so the watch
    // cache answers, whole (upstream's cache ignores limit then too).
    if query.get("resourceVersion").is_some_and(|rv| rv == "0") && options.continue_token.is_none() {
        let cache = state
            .caches
            .get(&resource.prefix(None))
            .await
            .map_err(|e| ApiError::from_store(e, resource.group, resource.plural, ""))?;
        let (objects, revision) = cache.list(&prefix);
        let items: Vec<Value> = if crate::conversion::by_webhook(resource) {
            // Selected by the fields of this version: converted first.
            let items = crate::conversion::convert(state.store.as_ref(), resource, objects).await?;
            items.into_iter().filter(|o| filters.matches(o)).collect()
        } else {
            objects.into_iter().filter(|o| filters.matches(o)).map(|o| resource.from_storage(o)).collect()
        };
        return Ok(list_response(resource, items, revision, None, None, accept, query));
    }
    let page = state.store.list(&prefix, options).await.map_err(|e| match e {
        StoreError::Compacted { .. } if query.contains_key("continue") => {
            let mut error = ApiError::expired(
                "The provided continue parameter is too old to display a consistent list result. You can start a \
                 new list without the continue parameter, or use the continue token in this response to retrieve \
                 the remainder of the results. Continuing with the provided token results in an inconsistent list \
                 - objects that were created, modified, or deleted between the time the first chunk was returned \
                 and now may show up in the list.",
            );
            error.continue_token = query
                .get("continue")
                .and_then(|token| tugboat_store::ContinueToken::decode(token).ok())
                .map(|token| token.inconsistent().encode());
            error
        }
        other => ApiError::from_store(other, resource.group, resource.plural, ""),
    })?;
    let mut items = Vec::with_capacity(page.kvs.len());
    for kv in &page.kvs {
        items.push(object::from_store(resource, &kv.value, kv.mod_revision)?);
    }
    let mut items = crate::conversion::convert(state.store.as_ref(), resource, items).await?;
    items.retain(|object| filters.matches(object));
    Ok(list_response(resource, items, page.revision, page.continue_token, page.remaining, accept, query))
}

/// A list (or its Table) of `items` at `revision`.
fn list_response(
    resource: &Resource,
    items: Vec<Value>,
    revision: i64,
    continue_token: Option<String>,
    remaining: Option<i64>,
    accept: &str,
    query: &Query,
) -> Response<Body> {
    let revision = revision.to_string();
    if table::wants_table(accept) {
        let table = table::table(resource, &items, &revision, continue_token.as_deref(), &include_object(query), true);
        return json_response(StatusCode::OK, &table);
    }
    let mut metadata = json!({"resourceVersion": revision});
    if let Some(token) = &continue_token {
        metadata["continue"] = json!(token);
        if let Some(remaining) = remaining {
            metadata["remainingItemCount"] = json!(remaining);
        }
    }
    let list = if table::wants_metadata(accept) {
        json!({
            "kind": "PartialObjectMetadataList",
            "apiVersion": "meta.k8s.io/v1",
            "metadata": metadata,
            "items": items.iter().map(table::partial).collect::<Vec<_>>(),
        })
    } else {
        json!({
            "kind": format!("{}List", resource.kind),
            "apiVersion": resource.api_version(),
            "metadata": metadata,
            "items": items,
        })
    };
    json_response(StatusCode::OK, &list)
}

/// One watch event line.
fn event_line(kind: &str, object: &Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

async fn watch(
    state: &ApiState,
    resource: &'static Resource,
    namespace: Option<&str>,
    query: &Query,
    accept: &str,
) -> Result<Response<Body>, ApiError> {
    use crate::watch_cache::Change;
    let filters = Filters::from_query(resource, query)?;
    let prefix = resource.prefix(namespace);
    let as_table = table::wants_table(accept);
    let as_metadata = table::wants_metadata(accept);
    let include = include_object(query);
    let timeout = query.get("timeoutSeconds").and_then(|t| t.parse::<u64>().ok()).map(Duration::from_secs);
    let bookmarks = query.get("allowWatchBookmarks").is_some_and(|b| b == "true") && !as_table;
    // A watch list (`sendInitialEvents=true`, client-go's WatchList): the current state first,
    // then a bookmark that says so.
    let send_initial = query.get("sendInitialEvents").is_some_and(|s| s == "true");
    // No resourceVersion (or "0"): start with the current state as ADDED events.
    let after = match parse_revision(query.get("resourceVersion"))? {
        Some(revision) if !send_initial => Some(revision),
        _ => None,
    };
    let store_error = |e| ApiError::from_store(e, resource.group, resource.plural, "");
    let expired = |requested: i64, compacted: i64| {
        ApiError::expired(format!("too old resource version: {requested} ({compacted})")).to_status()
    };

    // A revision the store has compacted away is too old, whether or not the watch cache
    // still holds its changes: 410 depends on compaction alone (a point read at that revision
    // says). As upstream: a 200 whose only event is an ERROR carrying 410 Expired.
    if let Some(after) = after
        && let Err(StoreError::Compacted { requested, compacted }) =
            state.store.get(&resource.prefix(None), Some(after)).await
    {
        let status = expired(requested, compacted);
        return Ok(streaming_response(futures::stream::iter([event_line("ERROR", &status)]).boxed()));
    }
    // From the watch cache when it holds what the watch needs; else from the store.
    let cache = state.caches.get(&resource.prefix(None)).await.map_err(store_error)?;
    let (initial, replay, start, changes): (Vec<Value>, Vec<Arc<Change>>, i64, ChangeStream) =
        match cache.subscribe(&prefix, after) {
            Some(subscription) => {
                let skip_through = subscription.revision;
                let live = futures::stream::unfold(Some(subscription.live), move |receiver| async move {
                    let mut receiver = receiver?;
                    loop {
                        match receiver.recv().await {
                            Ok(change) if change.revision <= skip_through => continue,
                            Ok(change) => return Some((Ok(change), Some(receiver))),
                            // Too slow to keep up: told to list again, as upstream does.
                            Err(crate::watch_cache::RecvError::Lagged(_)) => {
                                let status = ApiError::expired("the watch fell too far behind; list again").to_status();
                                return Some((Err(status), None));
                            }
                            Err(crate::watch_cache::RecvError::Closed) => return None,
                        }
                    }
                });
                let prefix = prefix.clone();
                let live = live
                    .filter(move |c| futures::future::ready(c.as_ref().map_or(true, |c| c.key.starts_with(&prefix))));
                (subscription.initial, subscription.replay, skip_through, live.boxed())
            }
            None => {
                let after = after.unwrap_or_default();
                let stream = match state.store.watch(&prefix, after).await {
                    Ok(stream) => stream,
                    Err(StoreError::Compacted { requested, compacted }) => {
                        // As upstream: a 200 whose only event is an ERROR carrying 410 Expired.
                        let status = expired(requested, compacted);
                        return Ok(streaming_response(futures::stream::iter([event_line("ERROR", &status)]).boxed()));
                    }
                    Err(error) => return Err(store_error(error)),
                };
                let changes = stream.filter_map(move |item| {
                    futures::future::ready(match item {
                        Ok(event) => Change::from_event(&event).map(|c| Ok(Arc::new(c))),
                        Err(StoreError::Compacted { requested, compacted }) => Some(Err(expired(requested, compacted))),
                        Err(error) => {
                            tracing::warn!(%error, "watch ended by a store error");
                            Some(Err(ApiError::unavailable(error.to_string()).to_status()))
                        }
                    })
                });
                (Vec::new(), Vec::new(), after, changes.boxed())
            }
        };

    // Objects as this resource shows them (events.k8s.io Events are stored as core Events).
    let view = move |object: &Value| -> Value { resource.from_storage(object.clone()) };
    let render = {
        let include = include.clone();
        move |kind: &str, object: &Value, first: bool| -> Bytes {
            let object = view(object);
            if as_table {
                let revision = object["metadata"]["resourceVersion"].as_str().unwrap_or("").to_string();
                event_line(kind, &table::table(resource, &[object], &revision, None, &include, first))
            } else if as_metadata {
                event_line(kind, &table::partial(&object))
            } else {
                event_line(kind, &object)
            }
        }
    };
    // Objects a webhook converts: converted before they are shown (the initial ones in one
    // review, each change as it comes).
    let initial = if crate::conversion::by_webhook(resource) {
        let shown: Vec<Value> = initial.into_iter().map(|o| resource.from_storage(o)).collect();
        crate::conversion::convert(state.store.as_ref(), resource, shown).await?
    } else {
        initial
    };
    let mut first = true;
    let mut initial_lines = Vec::with_capacity(initial.len() + 1);
    for object in initial.iter().filter(|o| filters.matches(o)) {
        initial_lines.push(render("ADDED", object, first));
        first = false;
    }
    let bookmark = move |revision: i64, annotations: Value| -> Bytes {
        let mut metadata = json!({"resourceVersion": revision.to_string()});
        if !annotations.is_null() {
            metadata["annotations"] = annotations;
        }
        event_line(
            "BOOKMARK",
            &json!({"kind": resource.kind, "apiVersion": resource.api_version(), "metadata": metadata}),
        )
    };
    if send_initial && bookmarks {
        initial_lines.push(bookmark(start, json!({"k8s.io/initial-events-end": "true"})));
    }
    // Bookmarks carry the revision of the last change the watch has passed on (or filtered
    // out): everything up to it has been seen, so a client may resume there. Sent every
    // BOOKMARK_PERIOD, and once just before a timeoutSeconds ends the watch.
    let ticks: futures::stream::BoxStream<'static, ()> = if bookmarks {
        let periodic = futures::stream::unfold((), |_| async {
            tokio::time::sleep(BOOKMARK_PERIOD).await;
            Some(((), ()))
        });
        match timeout.and_then(|t| t.checked_sub(Duration::from_secs(1))).filter(|t| !t.is_zero()) {
            Some(before_end) => {
                futures::stream::select(periodic, futures::stream::once(tokio::time::sleep(before_end))).boxed()
            }
            None => periodic.boxed(),
        }
    } else {
        futures::stream::pending().boxed()
    };
    let mut last_revision = start;
    let changes: ChangeStream = futures::stream::iter(replay.into_iter().map(Ok)).chain(changes).boxed();
    let changes = if crate::conversion::by_webhook(resource) {
        let store = state.store.clone();
        changes
            .then(move |item| {
                let store = store.clone();
                async move {
                    let change = item?;
                    // The object and the one before it, in one review (selectors read both).
                    let mut objects = vec![(*change.object).clone()];
                    objects.extend(change.previous.as_deref().cloned());
                    let mut converted = crate::conversion::convert(store.as_ref(), resource, objects)
                        .await
                        .map_err(|e| e.to_status())?
                        .into_iter();
                    let object = Arc::new(converted.next().unwrap_or_default());
                    let previous = converted.next().map(Arc::new);
                    Ok(Arc::new(Change { object, previous, ..(*change).clone() }))
                }
            })
            .boxed()
    } else {
        changes
    };
    let merged = futures::stream::select(changes.map(Some), ticks.map(|()| None));
    // An ERROR ends the watch.
    let events = merged
        .scan(false, move |ended, item| {
            if *ended {
                return futures::future::ready(None);
            }
            let line = match item {
                None => Some(bookmark(last_revision, Value::Null)),
                Some(Err(status)) => {
                    *ended = true;
                    Some(event_line("ERROR", &status))
                }
                Some(Ok(change)) => {
                    last_revision = last_revision.max(change.revision);
                    let previous = change.previous.as_deref().filter(|o| filters.matches(o));
                    match change.kind {
                        EventKind::Put => match (previous.is_some(), filters.matches(&change.object)) {
                            (false, true) => Some(render("ADDED", &change.object, std::mem::take(&mut first))),
                            (true, true) => Some(render("MODIFIED", &change.object, std::mem::take(&mut first))),
                            (true, false) => Some(render("DELETED", &change.object, std::mem::take(&mut first))),
                            (false, false) => None,
                        },
                        EventKind::Delete => {
                            previous.is_some().then(|| render("DELETED", &change.object, std::mem::take(&mut first)))
                        }
                    }
                }
            };
            futures::future::ready(Some(line))
        })
        .filter_map(futures::future::ready);
    let all = futures::stream::iter(initial_lines).chain(events);
    let body = match timeout {
        Some(timeout) => all.take_until(tokio::time::sleep(timeout)).boxed(),
        None => all.boxed(),
    };
    Ok(streaming_response(body))
}

/// The changes a watch passes on; an `Err` is the Status of an ERROR event that ends it.
type ChangeStream = futures::stream::BoxStream<'static, Result<Arc<crate::watch_cache::Change>, Value>>;

/// How often a watch that allows bookmarks gets one (upstream: about a minute).
const BOOKMARK_PERIOD: Duration = Duration::from_secs(60);

fn streaming_response(lines: futures::stream::BoxStream<'static, Bytes>) -> Response<Body> {
    let body = Body::from_stream(lines.map(Ok::<_, Infallible>));
    let mut response = Response::new(body);
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

async fn create(
    state: &ApiState,
    resource: &Resource,
    namespace: Option<&str>,
    content_type: &str,
    body: &[u8],
    write: &Write,
) -> Result<Response<Body>, ApiError> {
    let object = decode_body(content_type, body)?;
    write.note_duplicates(content_type, body);
    create_object(state, resource, namespace, object, write, None).await
}

/// Creates `object`; `applied` is the field set of a server-side apply that creates it.
async fn create_object(
    state: &ApiState,
    resource: &Resource,
    namespace: Option<&str>,
    mut object: Value,
    write: &Write,
    applied: Option<fields::FieldSet>,
) -> Result<Response<Body>, ApiError> {
    write.check_fields(resource, &mut object)?;
    object::prepare_create(resource, namespace, &mut object)?;
    match applied {
        Some(set) => fields::write_managed(
            &mut object,
            &[fields::Managed {
                manager: write.manager.clone(),
                operation: "Apply".into(),
                api_version: resource.api_version(),
                subresource: String::new(),
                fields: set,
            }],
        ),
        None => fields::record_update(&write.manager, &resource.api_version(), "", None, &mut object),
    }
    object::validate(resource, &object)?;
    if resource.group == admission::GROUP {
        check_configuration(resource, &mut object)?;
    }
    if resource.group == crate::aggregator::GROUP {
        check_api_service(resource, &mut object)?;
    }
    if resource.plural == "services" {
        crate::services::default_and_validate(&mut object)?;
    }
    if let Some(custom) = resource.custom {
        if custom.terminating {
            let mut error = ApiError::method_not_allowed("create");
            error.message =
                format!("create not allowed while custom resource definition is terminating: {}", custom.crd);
            return Err(error);
        }
        validate_custom(resource, custom, &mut object, None)?;
    }
    if is_crds(resource) {
        crate::crd::prepare(&mut object, &state.custom.definitions(), None)?;
    }
    let namespace =
        if resource.namespaced { object["metadata"]["namespace"].as_str().map(str::to_string) } else { None };
    let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
    check_namespace(state, resource, namespace.as_deref(), true).await?;
    if resource.plural == "pods" {
        crate::priority::admit(state.store.as_ref(), &state.caches, &mut object).await?;
        crate::service_accounts::admit(state, &mut object).await?;
        crate::runtime_class::admit(state, &mut object).await?;
        crate::limit_range::admit_pod(state, &mut object).await?;
    }
    if resource.plural == "persistentvolumeclaims" {
        crate::storage::admit(state, &mut object).await?;
        crate::limit_range::admit_claim(state, &object).await?;
    }
    if write.admit {
        let attributes = admission::Attributes {
            resource,
            subresource: "",
            operation: admission::Operation::Create,
            namespace: namespace.as_deref(),
            name: &name,
            old: None,
            options: write.options("CreateOptions"),
            dry_run: write.dry_run,
            user: write.user.as_ref(),
        };
        if admission::mutate(state, &attributes, &mut object, write).await? {
            after_mutation(resource, &mut object, None)?;
        }
        admission::validate(state, &attributes, Some(&object), write).await?;
    }
    crate::quota::admit(state, resource, &object, None, write.dry_run).await?;
    if write.dry_run {
        return Ok(json_response(StatusCode::CREATED, &object));
    }
    let claims = if resource.plural == "services" {
        crate::services::allocate(state.store.as_ref(), state.service_cidr, &mut object).await?
    } else {
        Vec::new()
    };
    let key = resource.key(namespace.as_deref(), &name);
    let stored = crate::conversion::stored(state.store.as_ref(), resource, &object).await?;
    let created = state.store.create(&key, stored).await;
    if created.is_err() && !claims.is_empty() {
        crate::services::release(state.store.as_ref(), &object).await;
    }
    let revision = created.map_err(|e| ApiError::from_store(e, resource.group, resource.plural, &name))?;
    object["metadata"]["resourceVersion"] = json!(revision.to_string());
    if is_crds(resource) {
        served_after_write(state, revision).await;
    }
    Ok(json_response(StatusCode::CREATED, &object))
}

/// After a mutating webhook changed an object: what its kind does not declare is dropped, its
/// defaults are applied again (to what the webhook added) and it is validated again.
fn after_mutation(resource: &Resource, object: &mut Value, old: Option<&Value>) -> Result<(), ApiError> {
    match resource.custom {
        Some(custom) => {
            crate::crd::prune(custom, object);
        }
        None => {
            crate::schema::schemas().prune_unknown(resource, object);
        }
    }
    object::apply_defaults(resource, object);
    object::validate(resource, object)?;
    if let Some(custom) = resource.custom {
        validate_custom(resource, custom, object, old)?;
    }
    if resource.group == admission::GROUP {
        check_configuration(resource, object)?;
    }
    if resource.plural == "services" && resource.group.is_empty() {
        crate::services::default_and_validate(object)?;
    }
    Ok(())
}

/// Defaults and validates an APIService.
fn check_api_service(resource: &Resource, object: &mut Value) -> Result<(), ApiError> {
    crate::aggregator::default(object);
    let causes = crate::aggregator::validate(object);
    if causes.is_empty() {
        return Ok(());
    }
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    Err(ApiError::invalid(resource.group, resource.kind, name, causes))
}

/// Defaults and validates an admission webhook configuration.
fn check_configuration(resource: &Resource, object: &mut Value) -> Result<(), ApiError> {
    let causes = admission::prepare_configuration(resource, object);
    if causes.is_empty() {
        return Ok(());
    }
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    Err(ApiError::invalid(resource.group, resource.kind, name, causes))
}

fn is_crds(resource: &Resource) -> bool {
    resource.plural == "customresourcedefinitions" && resource.group == "apiextensions.k8s.io"
}

/// Defaults and validates a custom object by its definition's schema.
fn validate_custom(
    resource: &Resource,
    custom: &crate::crd::Custom,
    object: &mut Value,
    old: Option<&Value>,
) -> Result<(), ApiError> {
    crate::crd::default(custom, object);
    let causes = crate::crd::validate(custom, object, old);
    if causes.is_empty() {
        return Ok(());
    }
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    Err(ApiError::invalid(resource.group, resource.kind, name, causes))
}

/// After a write of a definition: serve what it defines now, from a watch cache that has seen
/// the write (so the writer's next request finds the resource).
async fn served_after_write(state: &ApiState, revision: i64) {
    if state.custom.reflect(revision, Duration::from_secs(1)).await {
        return;
    }
    if let Err(error) = crate::crd::refresh(state).await {
        tracing::warn!(error = %error.message, "cannot read the CustomResourceDefinitions");
    }
}

/// Who writes (the field manager, for managedFields) and whether for real.
#[derive(Debug, Clone)]
pub(crate) struct Write {
    manager: String,
    pub(crate) dry_run: bool,
    /// A server-side apply, which records its own managedFields.
    apply: bool,
    validation: FieldValidation,
    /// Warnings for the client (`Warning` headers of the response).
    warnings: Arc<std::sync::Mutex<Vec<String>>>,
    /// Fields the body named twice (found as it is decoded), reported with the unknown ones.
    duplicates: Arc<std::sync::Mutex<Vec<String>>>,
    /// Who asks (for admission webhooks).
    pub(crate) user: Option<UserInfo>,
    /// Whether admission webhooks see the write: a client's, not the server's own.
    pub(crate) admit: bool,
}

impl Write {
    /// A write the server makes on its own behalf (a controller of its own), as `manager`.
    pub(crate) fn internal(manager: &str) -> Write {
        Write {
            manager: manager.to_string(),
            dry_run: false,
            apply: false,
            validation: FieldValidation::Ignore,
            warnings: Default::default(),
            duplicates: Default::default(),
            user: None,
            admit: false,
        }
    }

    /// The options object of the write, as an AdmissionReview carries it.
    pub(crate) fn options(&self, kind: &str) -> Value {
        let mut options = json!({"kind": kind, "apiVersion": "meta.k8s.io/v1", "fieldManager": self.manager});
        if self.dry_run {
            options["dryRun"] = json!(["All"]);
        }
        options
    }

    /// Adds warnings for the client.
    pub(crate) fn warn(&self, warnings: impl IntoIterator<Item = String>) {
        self.warnings.lock().unwrap_or_else(|e| e.into_inner()).extend(warnings);
    }

    /// Looks for fields a JSON body names twice, unless they are to be ignored.
    fn note_duplicates(&self, content_type: &str, body: &[u8]) {
        if self.validation != FieldValidation::Ignore {
            *self.duplicates.lock().unwrap_or_else(|e| e.into_inner()) = object::duplicate_fields(content_type, body);
        }
    }

    /// As [`Write::check_fields`], for a server-side apply: an unknown field under Strict is
    /// upstream's typed-patch error (`.spec.foo: field not declared in schema`).
    fn check_applied_fields(
        &self,
        resource: &Resource,
        object: &mut Value,
        namespace: Option<&str>,
        name: &str,
    ) -> Result<(), ApiError> {
        if self.validation != FieldValidation::Strict {
            return self.check_fields(resource, object);
        }
        let unknown = match resource.custom {
            Some(custom) => crate::crd::prune(custom, object),
            None => crate::schema::schemas().prune_unknown(resource, object),
        };
        if unknown.is_empty() {
            return Ok(());
        }
        let fields: Vec<String> = unknown.iter().map(|f| format!(".{f}: field not declared in schema")).collect();
        let group_version = resource.api_version();
        Err(ApiError::bad_request(format!(
            "failed to create typed patch object ({}/{name}; {group_version}, Kind={}): {}",
            namespace.unwrap_or_default(),
            resource.kind,
            fields.join(", ")
        )))
    }

    /// Drops the fields of `object` its kind does not declare, as upstream's decoder does; under
    /// `fieldValidation=Strict` they are an error, under Warn (the default) a warning each.
    fn check_fields(&self, resource: &Resource, object: &mut Value) -> Result<(), ApiError> {
        let unknown = match resource.custom {
            Some(custom) => crate::crd::prune(custom, object),
            None => crate::schema::schemas().prune_unknown(resource, object),
        };
        let duplicates = std::mem::take(&mut *self.duplicates.lock().unwrap_or_else(|e| e.into_inner()));
        if unknown.is_empty() && duplicates.is_empty() {
            return Ok(());
        }
        let fields: Vec<String> = unknown
            .iter()
            .map(|f| format!("unknown field {f:?}"))
            .chain(duplicates.iter().map(|f| format!("duplicate field {f:?}")))
            .collect();
        match self.validation {
            FieldValidation::Strict => {
                let mut error = ApiError::bad_request(format!(
                    "{kind} in version {version:?} cannot be handled as a {kind}: strict decoding error: {}",
                    fields.join(", "),
                    kind = resource.kind,
                    version = resource.version,
                ));
                error.causes = unknown
                    .iter()
                    .chain(&duplicates)
                    .zip(&fields)
                    .map(|(f, message)| crate::status::Cause {
                        reason: if message.starts_with("duplicate") {
                            "FieldValueDuplicate"
                        } else {
                            "FieldValueInvalid"
                        },
                        message: message.clone(),
                        field: f.clone(),
                    })
                    .collect();
                Err(error)
            }
            FieldValidation::Warn => {
                let mut warnings = self.warnings.lock().unwrap_or_else(|e| e.into_inner());
                warnings.extend(fields);
                Ok(())
            }
            FieldValidation::Ignore => Ok(()),
        }
    }
}

/// `?fieldValidation=`: what to do with fields the schema does not declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FieldValidation {
    Strict,
    Warn,
    Ignore,
}

impl FieldValidation {
    fn from_query(query: &Query) -> Result<FieldValidation, ApiError> {
        match query.get("fieldValidation").map(String::as_str) {
            None | Some("") | Some("Warn") => Ok(FieldValidation::Warn),
            Some("Strict") => Ok(FieldValidation::Strict),
            Some("Ignore") => Ok(FieldValidation::Ignore),
            Some(other) => Err(ApiError::bad_request(format!(
                "fieldValidation must be one of Ignore, Warn or Strict, not {other:?}"
            ))),
        }
    }
}

/// The field manager: `?fieldManager=`, else the client's name from its User-Agent
/// (`kubectl/v1.31.9 (linux/amd64) ...` gives `kubectl`), as upstream derives it.
fn field_manager(query: &Query, headers: &HeaderMap) -> String {
    if let Some(manager) = query.get("fieldManager").filter(|m| !m.is_empty()) {
        return manager.chars().take(128).collect();
    }
    let agent = headers.get(header::USER_AGENT).and_then(|v| v.to_str().ok()).unwrap_or("unknown");
    agent.split('/').next().unwrap_or("unknown").chars().take(128).collect()
}

/// Server-side apply (`PATCH application/apply-patch+yaml`): the applied configuration becomes
/// the fields its manager owns. A field another manager owns with a different value is a
/// conflict (409) unless `force=true`, which takes it over; fields the manager applied before
/// and no longer applies are removed unless someone else owns them; a missing object is created.
/// A server-side apply to an object (`View::Main`) or its status (`View::Status`: what is
/// applied outside the status, labels and annotations is not the status writer's to own).
async fn server_side_apply(
    state: &ApiState,
    target: (&Resource, Option<&str>, &str),
    view: View,
    query: &Query,
    body: &[u8],
    write: &Write,
) -> Result<Response<Body>, ApiError> {
    let (resource, namespace, name) = target;
    let Some(manager) = query.get("fieldManager").filter(|m| !m.is_empty()) else {
        return Err(ApiError::bad_request("fieldManager is required for apply requests"));
    };
    let force = query.get("force").is_some_and(|f| f == "true");
    let mut applied = decode_body("application/yaml", body)?;
    write.check_applied_fields(resource, &mut applied, namespace, name)?;
    if applied["apiVersion"].as_str().is_none_or(str::is_empty) || applied["kind"].as_str().is_none_or(str::is_empty) {
        return Err(ApiError::bad_request("an applied configuration needs apiVersion and kind"));
    }
    if let Some(given) = applied["metadata"]["name"].as_str()
        && given != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({given}) does not match the name on the URL ({name})"
        )));
    }
    let mut applied_set = fields::field_set(&applied);
    let subresource = if view == View::Status { "status" } else { "" };
    // What the write cannot change is not the applier's to own (upstream's reset fields): the
    // status of a resource with a status subresource, or on /status all but it, labels and
    // annotations.
    let field =
        |path: &fields::Path, i: usize, name: &str| matches!(path.get(i), Some(fields::Step::Field(f)) if f == name);
    match view {
        View::Status => applied_set.retain(|path| {
            field(path, 0, "status")
                || (field(path, 0, "metadata") && (field(path, 1, "labels") || field(path, 1, "annotations")))
        }),
        _ if resource.has_status() => applied_set.retain(|path| !field(path, 0, "status")),
        _ => {}
    }
    let write = Write { manager: manager.clone(), apply: true, ..write.clone() };
    let api_version = resource.api_version();
    // Apply to the object as it is; a missing object is created from the applied configuration.
    let merge = |current: &Value, _: i64| {
        let mut managed = fields::read_managed(current);
        let mine =
            |m: &fields::Managed| m.manager == *manager && m.operation == "Apply" && m.subresource == subresource;
        let mut conflicts = Vec::new();
        for entry in managed.iter().filter(|m| !mine(m)) {
            for path in entry.fields.intersection(&applied_set) {
                // A list element's own entry (`k:{"name":"web"}`) is its existence, not a
                // value: owners of the same element share it; their leaves may conflict.
                let element = matches!(path.last(), Some(fields::Step::Key(_)));
                if !element && fields::get(current, path) != fields::get(&applied, path) {
                    conflicts.push((entry.manager.clone(), entry.api_version.clone(), path.clone()));
                }
            }
        }
        if !conflicts.is_empty() && !force {
            return Err(apply_conflict(resource, name, &conflicts));
        }
        for (owner, _, path) in &conflicts {
            for entry in managed.iter_mut().filter(|m| m.manager == *owner) {
                entry.fields.remove(path);
            }
        }
        let previous = managed.iter().find(|m| mine(m)).map(|m| m.fields.clone()).unwrap_or_default();
        let mut merged = current.clone();
        for path in previous.difference(&applied_set) {
            let owned_by_others = managed.iter().any(|m| !mine(m) && m.fields.contains(path));
            if !owned_by_others {
                fields::remove(&mut merged, path);
            }
        }
        let mut merged = crate::smp::apply(&merged, &applied).map_err(|e| patch_error("applied configuration", e))?;
        managed.retain(|m| !mine(m));
        managed.push(fields::Managed {
            manager: manager.clone(),
            operation: "Apply".into(),
            api_version: api_version.clone(),
            subresource: subresource.into(),
            fields: applied_set.clone(),
        });
        fields::write_managed(&mut merged, &managed);
        Ok(merged)
    };
    loop {
        match modify(state, (resource, namespace, name), view, &write, merge).await {
            Err(error) if error.code == 404 && error.reason == "NotFound" && view == View::Main => {
                let mut object = applied.clone();
                object["metadata"]["name"] = json!(name);
                match create_object(state, resource, namespace, object, &write, Some(applied_set.clone())).await {
                    // Created meanwhile by someone else: apply to that.
                    Err(error) if error.reason == "AlreadyExists" => continue,
                    other => return other,
                }
            }
            other => return other,
        }
    }
}

/// 409 as upstream words it: `Apply failed with 1 conflict: conflict with "kubectl-scale" using apps/v1: .spec.replicas`.
fn apply_conflict(resource: &Resource, name: &str, conflicts: &[(String, String, fields::Path)]) -> ApiError {
    let lines: Vec<String> = conflicts
        .iter()
        .map(|(manager, version, path)| {
            format!("conflict with \"{manager}\" using {version}: {}", fields::display(path))
        })
        .collect();
    let count = conflicts.len();
    let plural = if count == 1 { "" } else { "s" };
    let mut error = ApiError::conflict(resource.group, resource.plural, name);
    error.message = if count == 1 {
        format!("Apply failed with 1 conflict: {}", lines[0])
    } else {
        format!("Apply failed with {count} conflict{plural}: {}", lines.join("\n"))
    };
    error.causes = conflicts
        .iter()
        .zip(&lines)
        .map(|((_, _, path), line)| crate::status::Cause {
            reason: "FieldManagerConflict",
            message: line.clone(),
            field: fields::display(path),
        })
        .collect();
    error
}

/// Which part of an object a write addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum View {
    /// The object; its status is kept as it was when the resource has a status subresource.
    Main,
    /// `/status`: only the status (and labels) change.
    Status,
    /// `/scale`: an autoscaling/v1 Scale whose `spec.replicas` is the object's.
    Scale,
    /// A namespace's `spec.finalizers` (`namespaces/{name}/finalize`): how the namespace
    /// controller lets a Terminating namespace go.
    Finalize,
    /// Spec and status at once: the server's own writes (a binding sets the node and the
    /// PodScheduled condition).
    Whole,
    /// A pod's `spec.ephemeralContainers` (`pods/{name}/ephemeralcontainers`, what `kubectl
    /// debug` writes): containers may be added, never changed or removed.
    Ephemeral,
}

impl View {
    fn from_subresource(resource: &Resource, subresource: Option<&str>) -> Result<View, ApiError> {
        match subresource {
            None => Ok(View::Main),
            Some("status") if resource.has_status() => Ok(View::Status),
            Some("scale") if resource.has_scale() => Ok(View::Scale),
            Some("finalize") if resource.plural == "namespaces" => Ok(View::Finalize),
            Some("ephemeralcontainers") if resource.plural == "pods" && resource.group.is_empty() => {
                Ok(View::Ephemeral)
            }
            // A CSR's conditions (approval) live in its status, as its certificate does.
            Some("approval") if resource.plural == "certificatesigningrequests" => Ok(View::Status),
            Some(other) => Err(ApiError::not_found_path(&format!("{}/{other}", resource.plural))),
        }
    }

    /// What a client reads and writes through this view of `object`.
    fn project(self, resource: &Resource, object: &Value) -> Value {
        match self {
            View::Main | View::Status | View::Whole | View::Finalize | View::Ephemeral => object.clone(),
            View::Scale if let Some(paths) = resource.custom.and_then(|c| c.scale.as_ref()) => {
                // A custom resource's scale reads the paths its definition names.
                let at = |path: &str| crate::crd::json_path(object, path).cloned().unwrap_or(Value::Null);
                let mut status = json!({"replicas": at(&paths.status_replicas).as_i64().unwrap_or(0)});
                if let Some(selector) = &paths.label_selector
                    && let Some(selector) = at(selector).as_str()
                {
                    status["selector"] = json!(selector);
                }
                scale(object, at(&paths.spec_replicas).as_i64().unwrap_or(0), status)
            }
            View::Scale => {
                let selector = crate::selector::selector_labels(&object["spec"]["selector"])
                    .as_object()
                    .map(|m| {
                        m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect::<Vec<_>>().join(",")
                    })
                    .unwrap_or_default();
                let status =
                    json!({"replicas": object["status"]["replicas"].as_i64().unwrap_or(0), "selector": selector});
                scale(object, object["spec"]["replicas"].as_i64().unwrap_or(1), status)
            }
        }
    }

    /// The object after a client wrote `written` through this view of `old`.
    fn merge_back(self, resource: &Resource, old: &Value, written: Value) -> Result<Value, ApiError> {
        let invalid_replicas = |message: String| {
            let name = old["metadata"]["name"].as_str().unwrap_or("");
            let cause = crate::status::Cause { reason: "FieldValueInvalid", message, field: "spec.replicas".into() };
            ApiError::invalid("autoscaling", "Scale", name, vec![cause])
        };
        match self {
            View::Main => {
                let mut object = written;
                if resource.has_status() {
                    match old.get("status") {
                        Some(status) => object["status"] = status.clone(),
                        None => {
                            if let Some(map) = object.as_object_mut() {
                                map.remove("status");
                            }
                        }
                    }
                }
                if resource.plural == "namespaces" {
                    // Only `finalize` changes a namespace's finalizers (upstream's strategy).
                    object["spec"]["finalizers"] = old["spec"]["finalizers"].clone();
                }
                if resource.plural == "pods" && resource.group.is_empty() {
                    // Only `ephemeralcontainers` changes them.
                    match old["spec"].get("ephemeralContainers") {
                        Some(kept) => object["spec"]["ephemeralContainers"] = kept.clone(),
                        None => {
                            if let Some(spec) = object["spec"].as_object_mut() {
                                spec.remove("ephemeralContainers");
                            }
                        }
                    }
                }
                Ok(object)
            }
            View::Ephemeral => {
                let name = old["metadata"]["name"].as_str().unwrap_or("");
                let before = old["spec"]["ephemeralContainers"].as_array().cloned().unwrap_or_default();
                let after = written["spec"]["ephemeralContainers"].as_array().cloned().unwrap_or_default();
                let forbidden = |message: &str| {
                    let cause = crate::status::Cause {
                        reason: "FieldValueForbidden",
                        message: format!("Forbidden: {message}"),
                        field: "spec.ephemeralContainers".into(),
                    };
                    ApiError::invalid("", "Pod", name, vec![cause])
                };
                // Each container there before is still there, unchanged.
                for container in &before {
                    let same = after.iter().find(|c| c["name"] == container["name"]);
                    match same {
                        None => return Err(forbidden("existing ephemeral containers may not be removed")),
                        Some(c) if c != container => {
                            return Err(forbidden("existing ephemeral containers may not be changed"));
                        }
                        Some(_) => {}
                    }
                }
                let taken: Vec<&Value> = old["spec"]["containers"]
                    .as_array()
                    .into_iter()
                    .chain(old["spec"]["initContainers"].as_array())
                    .flatten()
                    .map(|c| &c["name"])
                    .collect();
                for (i, container) in after.iter().enumerate() {
                    let field = format!("spec.ephemeralContainers[{i}]");
                    let invalid = |reason: &'static str, message: String, field: String| {
                        ApiError::invalid("", "Pod", name, vec![crate::status::Cause { reason, message, field }])
                    };
                    if container["name"].as_str().is_none_or(str::is_empty) {
                        return Err(invalid("FieldValueRequired", "Required value".into(), format!("{field}.name")));
                    }
                    if taken.contains(&&container["name"])
                        || after.iter().filter(|c| c["name"] == container["name"]).count() > 1
                    {
                        let message = format!("Duplicate value: {}", container["name"]);
                        return Err(invalid("FieldValueDuplicate", message, format!("{field}.name")));
                    }
                    if container["image"].as_str().is_none_or(str::is_empty) {
                        return Err(invalid("FieldValueRequired", "Required value".into(), format!("{field}.image")));
                    }
                }
                let mut object = old.clone();
                // Defaults, as a container of the pod gets them.
                let mut defaulted = json!({"containers": after});
                object::default_pod_spec(&mut defaulted);
                object["spec"]["ephemeralContainers"] = defaulted["containers"].take();
                Ok(object)
            }
            View::Finalize => {
                let mut object = old.clone();
                let finalizers = &written["spec"]["finalizers"];
                if !(finalizers.is_null() || finalizers.as_array().is_some_and(|f| f.iter().all(Value::is_string))) {
                    let name = old["metadata"]["name"].as_str().unwrap_or("");
                    let cause = crate::status::Cause {
                        reason: "FieldValueInvalid",
                        message: "Invalid value: a list of finalizer names".into(),
                        field: "spec.finalizers".into(),
                    };
                    return Err(ApiError::invalid("", "Namespace", name, vec![cause]));
                }
                object["spec"]["finalizers"] = finalizers.clone();
                Ok(object)
            }
            View::Whole => Ok(written),
            View::Status => {
                let mut object = old.clone();
                object["status"] = written.get("status").cloned().unwrap_or(Value::Null);
                // Upstream's status strategies reset the spec, not the labels and annotations
                // (but a Deployment's keeps its labels, and API priority and fairness objects
                // their whole metadata).
                let kept: &[&str] = match resource.plural {
                    "deployments" => &["annotations"],
                    "flowschemas" | "prioritylevelconfigurations" => &[],
                    _ => &["labels", "annotations"],
                };
                for field in kept {
                    if let Some(value) = written["metadata"].get(*field) {
                        object["metadata"][*field] = value.clone();
                    }
                }
                Ok(object)
            }
            View::Scale => {
                let replicas = written["spec"]["replicas"]
                    .as_i64()
                    .ok_or_else(|| invalid_replicas("Required value: an integer".into()))?;
                if replicas < 0 {
                    return Err(invalid_replicas(format!(
                        "Invalid value: {replicas}: must be greater than or equal to 0"
                    )));
                }
                let mut object = old.clone();
                match resource.custom.and_then(|c| c.scale.as_ref()) {
                    Some(paths) => crate::crd::set_path(&mut object, &paths.spec_replicas, json!(replicas)),
                    None => object["spec"]["replicas"] = json!(replicas),
                }
                Ok(object)
            }
        }
    }
}

/// The autoscaling/v1 Scale of `object`.
fn scale(object: &Value, replicas: i64, status: Value) -> Value {
    let metadata = &object["metadata"];
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": metadata["name"],
            "namespace": metadata["namespace"],
            "uid": metadata["uid"],
            "resourceVersion": metadata["resourceVersion"],
            "creationTimestamp": metadata["creationTimestamp"],
        },
        "spec": {"replicas": replicas},
        "status": status,
    })
}

/// The read-modify-write loop every update and patch goes through: read the object, let
/// `change` produce the new view from the current one, merge it back, validate, and write if
/// the object did not change meanwhile (else read again). A `change` that fails (a stale
/// resourceVersion named by the client, a patch that does not apply) ends the loop.
pub(crate) async fn modify(
    state: &ApiState,
    target: (&Resource, Option<&str>, &str),
    view: View,
    write: &Write,
    change: impl Fn(&Value, i64) -> Result<Value, ApiError>,
) -> Result<Response<Body>, ApiError> {
    let (resource, namespace, name) = target;
    for _ in 0..UPDATE_RETRIES {
        let (old, revision) = read_object(state, resource, namespace, name).await?;
        let mut written = change(&view.project(resource, &old), revision)?;
        if !written.is_object() {
            return Err(ApiError::bad_request("the request does not leave an object"));
        }
        // The server's own writes (View::Whole) change an object it stored: nothing to prune.
        if !matches!(view, View::Scale | View::Whole) {
            write.check_fields(resource, &mut written)?;
        }
        // A server-side apply's managedFields are its own, whatever part of the object it wrote.
        let applied_managed = write.apply.then(|| written["metadata"]["managedFields"].clone());
        let mut object = view.merge_back(resource, &old, written)?;
        if let Some(managed) = applied_managed
            && let Some(metadata) = object["metadata"].as_object_mut()
        {
            match managed {
                Value::Null => metadata.remove("managedFields"),
                managed => metadata.insert("managedFields".into(), managed),
            };
        }
        object["metadata"]["name"] = json!(name);
        object::prepare_update(resource, &old, &mut object)?;
        let subresource = match view {
            View::Main | View::Whole => "",
            View::Status => "status",
            View::Ephemeral => "ephemeralcontainers",
            View::Scale => "scale",
            View::Finalize => "finalize",
        };
        // A server-side apply has written its own managedFields; every other write is an
        // Update, except the server's own (a binding, as upstream, records no manager).
        if !write.apply && view != View::Whole {
            fields::record_update(&write.manager, &resource.api_version(), subresource, Some(&old), &mut object);
        }
        object::validate(resource, &object)?;
        if let Some(custom) = resource.custom
            && view != View::Whole
        {
            validate_custom(resource, custom, &mut object, Some(&old))?;
        }
        if is_crds(resource) && matches!(view, View::Main | View::Whole) {
            crate::crd::prepare(&mut object, &state.custom.definitions(), Some(&old))?;
        }
        if resource.plural == "pods" && view == View::Main {
            object::check_pod_update(&old, &object)?;
        }
        if resource.plural == "services" && view == View::Main {
            crate::services::drop_type_dependent_fields(&old, &mut object);
            crate::services::default_and_validate(&mut object)?;
            if !write.dry_run {
                crate::services::carry_over(state.store.as_ref(), state.service_cidr, &old, &mut object).await?;
            }
        }
        if resource.group == admission::GROUP && view == View::Main {
            check_configuration(resource, &mut object)?;
        }
        if resource.group == crate::aggregator::GROUP && view == View::Main {
            check_api_service(resource, &mut object)?;
        }
        if write.admit && view != View::Whole {
            let attributes = admission::Attributes {
                resource,
                subresource,
                operation: admission::Operation::Update,
                namespace,
                name,
                old: Some(&old),
                options: write.options("UpdateOptions"),
                dry_run: write.dry_run,
                user: write.user.as_ref(),
            };
            if matches!(view, View::Main | View::Status) {
                if admission::mutate(state, &attributes, &mut object, write).await? {
                    after_mutation(resource, &mut object, Some(&old))?;
                }
                admission::validate(state, &attributes, Some(&object), write).await?;
            } else {
                // A subresource's own object (a Scale) is what is reviewed.
                let (old, new) = (view.project(resource, &old), view.project(resource, &object));
                let attributes = admission::Attributes { old: Some(&old), ..attributes };
                admission::validate(state, &attributes, Some(&new), write).await?;
            }
        }
        if view == View::Main && matches!(resource.plural, "pods" | "services" | "persistentvolumeclaims") {
            crate::quota::admit(state, resource, &object, Some(&old), write.dry_run).await?;
        }
        if write.dry_run {
            object["metadata"]["resourceVersion"] = json!(revision.to_string());
            return Ok(json_response(StatusCode::OK, &view.project(resource, &object)));
        }
        let key = resource.key(namespace, name);
        // An object being deleted goes once its last finalizer is removed (a pod only once its
        // kubelet has finished it: it deletes with a zero grace period).
        let finalized = object["metadata"]["deletionTimestamp"].is_string()
            && object["metadata"]["finalizers"].as_array().is_none_or(Vec::is_empty)
            && object["spec"]["finalizers"].as_array().is_none_or(Vec::is_empty)
            && object["metadata"]["deletionGracePeriodSeconds"].as_i64().unwrap_or(0) == 0;
        if finalized {
            return match state.store.delete(&key, Some(revision)).await {
                Ok((deleted, _)) => {
                    if is_crds(resource) {
                        served_after_write(state, deleted).await;
                    }
                    Ok(json_response(StatusCode::OK, &view.project(resource, &object)))
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(error) => Err(ApiError::from_store(error, resource.group, resource.plural, name)),
            };
        }
        let stored = crate::conversion::stored(state.store.as_ref(), resource, &object).await?;
        match state.store.update(&key, stored, revision).await {
            Ok(new_revision) => {
                object["metadata"]["resourceVersion"] = json!(new_revision.to_string());
                if is_crds(resource) {
                    served_after_write(state, new_revision).await;
                }
                return Ok(json_response(StatusCode::OK, &view.project(resource, &object)));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(error) => {
                return Err(ApiError::from_store(error, resource.group, resource.plural, name));
            }
        }
    }
    Err(ApiError::conflict(resource.group, resource.plural, name))
}

/// A client that names a resourceVersion must name the current one.
fn check_precondition(given: Option<&str>, revision: i64, resource: &Resource, name: &str) -> Result<(), ApiError> {
    match given.filter(|g| !g.is_empty()) {
        Some(given) if given != revision.to_string() => Err(ApiError::conflict(resource.group, resource.plural, name)),
        _ => Ok(()),
    }
}

async fn update(
    state: &ApiState,
    (resource, namespace, name): (&Resource, Option<&str>, &str),
    view: View,
    content_type: &str,
    body: &[u8],
    write: &Write,
) -> Result<Response<Body>, ApiError> {
    let object = decode_body(content_type, body)?;
    write.note_duplicates(content_type, body);
    if let Some(given) = object["metadata"]["name"].as_str()
        && given != name
    {
        return Err(ApiError::bad_request(format!(
            "the name of the object ({given}) does not match the name on the URL ({name})"
        )));
    }
    modify(state, (resource, namespace, name), view, write, |_, revision| {
        check_precondition(object["metadata"]["resourceVersion"].as_str(), revision, resource, name)?;
        Ok(object.clone())
    })
    .await
}

fn patch_error(kind: &str, error: impl std::fmt::Display) -> ApiError {
    let mut error = ApiError::bad_request(format!("the {kind} cannot be applied: {error}"));
    error.code = 422;
    error.reason = "Invalid";
    error
}

/// Applies a patch document of the given media type to `current`.
fn apply_patch(media: &str, current: &Value, patch: &Value) -> Result<Value, ApiError> {
    let mut patched = current.clone();
    match media {
        "application/merge-patch+json" => json_patch::merge(&mut patched, patch),
        "application/json-patch+json" => {
            let operations: json_patch::Patch = serde_json::from_value(patch.clone())
                .map_err(|e| ApiError::bad_request(format!("the JSON patch is malformed: {e}")))?;
            object::json_patch(&mut patched, &operations).map_err(|e| patch_error("JSON patch", e))?;
        }
        "application/strategic-merge-patch+json" => {
            patched = crate::smp::apply(current, patch).map_err(|e| patch_error("strategic merge patch", e))?;
        }
        other => return Err(ApiError::unsupported_media_type(other)),
    }
    Ok(patched)
}

async fn patch(
    state: &ApiState,
    (resource, namespace, name): (&Resource, Option<&str>, &str),
    view: View,
    content_type: &str,
    body: &[u8],
    write: &Write,
) -> Result<Response<Body>, ApiError> {
    let media = content_type.split(';').next().unwrap_or("").trim().to_string();
    if !matches!(
        media.as_str(),
        "application/merge-patch+json" | "application/json-patch+json" | "application/strategic-merge-patch+json"
    ) {
        return Err(ApiError::unsupported_media_type(&media));
    }
    if resource.custom.is_some() && media == "application/strategic-merge-patch+json" {
        // Custom objects have no patch strategies: upstream refuses such patches.
        let mut error = ApiError::unsupported_media_type(&media);
        error.message = "the body of the request was in an unknown format - accepted media types include: \
                         application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml"
            .into();
        return Err(error);
    }
    let patch: Value =
        serde_json::from_slice(body).map_err(|e| ApiError::bad_request(format!("the patch is not valid JSON: {e}")))?;
    modify(state, (resource, namespace, name), view, write, |current, revision| {
        if media != "application/json-patch+json" {
            check_precondition(patch["metadata"]["resourceVersion"].as_str(), revision, resource, name)?;
        }
        apply_patch(&media, current, &patch)
    })
    .await
}

/// Upstream's finalizers for the propagation policies the garbage collector acts on.
const FOREGROUND: &str = "foregroundDeletion";
const ORPHAN: &str = "orphan";
/// Namespaces that may never be deleted.
const PROTECTED_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public"];

/// The DeleteOptions of a DELETE: none, JSON, or protobuf (client-go's typed clients send
/// their options in the content type they were made for).
/// A DELETE's options: from its query (`?gracePeriodSeconds=30&propagationPolicy=Foreground`,
/// as a REST client may send them), then from its body, whose fields win, as upstream reads them.
fn delete_options(query: &Query, content_type: &str, body: &[u8]) -> Result<Value, ApiError> {
    let mut options = json!({});
    for (name, value) in query {
        match name.as_str() {
            "gracePeriodSeconds" => {
                let seconds = value.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!("gracePeriodSeconds: invalid value {value:?}: not an integer"))
                })?;
                options[name] = json!(seconds);
            }
            "orphanDependents" | "ignoreStoreReadErrorWithClusterBreakingPotential" => {
                let flag = value.parse::<bool>().map_err(|_| {
                    ApiError::bad_request(format!("{name}: invalid value {value:?}: not true or false"))
                })?;
                options[name] = json!(flag);
            }
            "propagationPolicy" => options[name] = json!(value),
            _ => {}
        }
    }
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(options);
    }
    let protobuf = body.starts_with(b"k8s\0") || content_type.starts_with("application/vnd.kubernetes.protobuf");
    let from_body =
        decode_body(if protobuf { "application/vnd.kubernetes.protobuf" } else { "application/json" }, body)?;
    if let (Some(options), Some(fields)) = (options.as_object_mut(), from_body.as_object()) {
        options.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
    }
    Ok(options)
}

async fn delete(
    state: &ApiState,
    resource: &Resource,
    namespace: Option<&str>,
    name: &str,
    query: &Query,
    (content_type, body): (&str, &[u8]),
    write: &Write,
) -> Result<Response<Body>, ApiError> {
    let options = delete_options(query, content_type, body)?;
    let (code, object) = delete_one(state, resource, namespace, name, &options, write).await?;
    Ok(json_response(code, &object))
}

/// Deletes one object as upstream does: with finalizers (the object's own, or those the
/// propagation policy asks for) it is only marked with a deletionTimestamp; a pod bound to a
/// node is marked for graceful termination (its kubelet finishes the deletion); anything else is
/// removed at once. Returns the status code and the object as it is after the request.
pub(crate) async fn delete_one(
    state: &ApiState,
    resource: &Resource,
    namespace: Option<&str>,
    name: &str,
    options: &Value,
    write: &Write,
) -> Result<(StatusCode, Value), ApiError> {
    let dry_run = write.dry_run;
    if resource.plural == "namespaces" && PROTECTED_NAMESPACES.contains(&name) {
        let mut error =
            ApiError::bad_request(format!("namespaces \"{name}\" is forbidden: this namespace may not be deleted"));
        error.code = 403;
        error.reason = "Forbidden";
        return Err(error);
    }
    for _ in 0..UPDATE_RETRIES {
        let (mut object, revision) = read_object(state, resource, namespace, name).await?;
        let preconditions = &options["preconditions"];
        if preconditions["uid"].as_str().is_some_and(|uid| object["metadata"]["uid"].as_str() != Some(uid))
            || preconditions["resourceVersion"].as_str().is_some_and(|rv| rv != revision.to_string())
        {
            return Err(ApiError::conflict(resource.group, resource.plural, name));
        }
        if write.admit {
            let mut delete_options = options.clone();
            if let Some(map) = delete_options.as_object_mut() {
                map.insert("kind".into(), json!("DeleteOptions"));
                map.insert("apiVersion".into(), json!("meta.k8s.io/v1"));
            }
            let attributes = admission::Attributes {
                resource,
                subresource: "",
                operation: admission::Operation::Delete,
                namespace,
                name,
                old: Some(&object),
                options: delete_options,
                dry_run,
                user: write.user.as_ref(),
            };
            admission::mutate(state, &attributes, &mut Value::Null, write).await?;
            admission::validate(state, &attributes, None, write).await?;
        }
        let grace = options["gracePeriodSeconds"].as_i64();
        let mut finalizers: Vec<Value> = object["metadata"]["finalizers"].as_array().cloned().unwrap_or_default();
        let mut add = |f: &str| {
            if !finalizers.iter().any(|v| v == f) {
                finalizers.push(json!(f));
            }
        };
        // The deprecated `orphanDependents` stands for a policy when none is given.
        let policy = options["propagationPolicy"].as_str().or(match options["orphanDependents"].as_bool() {
            Some(true) => Some("Orphan"),
            Some(false) => Some("Background"),
            None => None,
        });
        match policy {
            Some("Foreground") => add(FOREGROUND),
            Some("Orphan") => add(ORPHAN),
            Some("Background") | None => {}
            Some(other) => {
                return Err(ApiError::bad_request(format!(
                    "propagationPolicy {other:?} is not one of Orphan, Background, Foreground"
                )));
            }
        }
        // A pod goes at once when no node runs it: unscheduled, or ended (upstream's
        // CheckGracefulDelete), so no kubelet need confirm it.
        let graceful_pod = resource.plural == "pods"
            && object["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty())
            && !matches!(object["status"]["phase"].as_str(), Some("Succeeded" | "Failed"))
            && grace.unwrap_or_else(|| object["spec"]["terminationGracePeriodSeconds"].as_i64().unwrap_or(30)) > 0;
        let key = resource.key(namespace, name);
        // A namespace waits for the namespace controller to empty it (`spec.finalizers`).
        let namespace_content =
            resource.plural == "namespaces" && object["spec"]["finalizers"].as_array().is_some_and(|f| !f.is_empty());
        if !finalizers.is_empty() || graceful_pod || namespace_content {
            if object["metadata"]["deletionTimestamp"].is_string() && !graceful_pod {
                return Ok((StatusCode::OK, object));
            }
            let now = object::now_rfc3339();
            if object["metadata"]["deletionTimestamp"].is_null() {
                object["metadata"]["deletionTimestamp"] = json!(now);
            }
            let grace_seconds = if graceful_pod {
                grace.unwrap_or_else(|| object["spec"]["terminationGracePeriodSeconds"].as_i64().unwrap_or(30))
            } else {
                0
            };
            object["metadata"]["deletionGracePeriodSeconds"] = json!(grace_seconds);
            object["metadata"]["finalizers"] = Value::Array(finalizers);
            if resource.plural == "namespaces" {
                object["status"]["phase"] = json!("Terminating");
            }
            if dry_run {
                return Ok((StatusCode::OK, object));
            }
            match state.store.update(&key, object::to_store(resource, &object), revision).await {
                Ok(new_revision) => {
                    object["metadata"]["resourceVersion"] = json!(new_revision.to_string());
                    return Ok((StatusCode::OK, object));
                }
                Err(StoreError::Conflict { .. }) => continue,
                Err(error) => {
                    return Err(ApiError::from_store(error, resource.group, resource.plural, name));
                }
            }
        }
        if dry_run {
            return Ok((StatusCode::OK, object));
        }
        match state.store.delete(&key, Some(revision)).await {
            Ok(_) => {
                if resource.plural == "services" {
                    crate::services::release(state.store.as_ref(), &object).await;
                }
                return Ok((StatusCode::OK, object));
            }
            Err(StoreError::Conflict { .. }) => continue,
            Err(error) => {
                return Err(ApiError::from_store(error, resource.group, resource.plural, name));
            }
        }
    }
    Err(ApiError::conflict(resource.group, resource.plural, name))
}

/// `DELETE` on a collection: every object the selectors match, each as a single delete would.
async fn delete_collection(
    state: &ApiState,
    resource: &Resource,
    namespace: Option<&str>,
    query: &Query,
    (content_type, body): (&str, &[u8]),
    write: &Write,
) -> Result<Response<Body>, ApiError> {
    let options = delete_options(query, content_type, body)?;
    let filters = Filters::from_query(resource, query)?;
    let page = state
        .store
        .list(&resource.prefix(namespace), ListOptions::default())
        .await
        .map_err(|e| ApiError::from_store(e, resource.group, resource.plural, ""))?;
    let mut stored = Vec::with_capacity(page.kvs.len());
    for kv in &page.kvs {
        stored.push(object::from_store(resource, &kv.value, kv.mod_revision)?);
    }
    // Selected by the fields of the version asked for.
    let objects = crate::conversion::convert(state.store.as_ref(), resource, stored).await?;
    let mut deleted = Vec::new();
    for object in objects {
        if !filters.matches(&object) {
            continue;
        }
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let object_namespace = object["metadata"]["namespace"].as_str().map(str::to_string);
        match delete_one(state, resource, object_namespace.as_deref(), &name, &options, write).await {
            Ok((_, object)) => deleted.push(object),
            Err(error) if error.code == 404 => {}
            Err(error) => return Err(error),
        }
    }
    let list = json!({
        "kind": format!("{}List", resource.kind),
        "apiVersion": resource.api_version(),
        "metadata": {"resourceVersion": page.revision.to_string()},
        "items": deleted,
    });
    Ok(json_response(StatusCode::OK, &list))
}

/// Answers a review. Authorization is "every authenticated user may do everything" until RBAC
/// is enforced, and the answers say so.
async fn answer_review(
    state: &ApiState,
    resource: &Resource,
    user: Option<&UserInfo>,
    mut review: Value,
) -> Result<Value, ApiError> {
    review["kind"] = json!(resource.kind);
    review["apiVersion"] = json!(resource.api_version());
    if !review["metadata"].is_object() {
        review["metadata"] = json!({});
    }
    review["metadata"]["creationTimestamp"] = Value::Null;
    let user = user.cloned().unwrap_or_default();
    match resource.plural {
        "selfsubjectaccessreviews" => {
            review["status"] = crate::rbac::review(state, &user, &review["spec"]).await?;
        }
        // Whether someone else may: kubelets ask it of their callers (delegated authorization);
        // a LocalSubjectAccessReview asks it within its own namespace.
        "subjectaccessreviews" | "localsubjectaccessreviews" => {
            let spec = &review["spec"];
            if resource.plural == "localsubjectaccessreviews" {
                let namespace = review["metadata"]["namespace"].as_str().unwrap_or_default();
                let mut causes = Vec::new();
                if spec["resourceAttributes"].is_object()
                    && spec["resourceAttributes"]["namespace"].as_str().unwrap_or_default() != namespace
                {
                    causes.push(crate::status::Cause {
                        reason: "FieldValueInvalid",
                        message: format!(
                            "Invalid value: {:?}: must match metadata.namespace",
                            spec["resourceAttributes"]["namespace"].as_str().unwrap_or_default()
                        ),
                        field: "spec.resourceAttributes.namespace".into(),
                    });
                }
                if spec["nonResourceAttributes"].is_object() {
                    causes.push(crate::status::Cause {
                        reason: "FieldValueInvalid",
                        message: "Invalid value: \"null\": disallowed on this kind of request".into(),
                        field: "spec.nonResourceAttributes".into(),
                    });
                }
                if !causes.is_empty() {
                    return Err(ApiError::invalid("authorization.k8s.io", "LocalSubjectAccessReview", "", causes));
                }
            }
            let strings = |v: &Value| -> Vec<String> {
                v.as_array().into_iter().flatten().filter_map(|s| s.as_str().map(str::to_string)).collect()
            };
            let subject = UserInfo {
                name: spec["user"].as_str().unwrap_or_default().to_string(),
                uid: spec["uid"].as_str().unwrap_or_default().to_string(),
                groups: strings(&spec["groups"]),
                extra: spec["extra"]
                    .as_object()
                    .map(|extra| extra.iter().map(|(k, v)| (k.clone(), strings(v))).collect())
                    .unwrap_or_default(),
            };
            if subject.name.is_empty() && subject.groups.is_empty() {
                let cause = crate::status::Cause {
                    reason: "FieldValueRequired",
                    message: "at least one of user or group must be specified".into(),
                    field: "spec.user".into(),
                };
                return Err(ApiError::invalid("authorization.k8s.io", "SubjectAccessReview", "", vec![cause]));
            }
            review["status"] = crate::rbac::review(state, &subject, spec).await?;
        }
        // Who a token is (webhook token authentication): any authenticated caller may ask,
        // as upstream's `system:auth-delegator` role lets components.
        "tokenreviews" => {
            let token = review["spec"]["token"].as_str().unwrap_or_default().to_string();
            review["status"] = match crate::authenticate_token(state, &token).await {
                Some(found) if !token.is_empty() => json!({
                    "authenticated": true,
                    "user": found.to_json(),
                    "audiences": review["spec"]["audiences"].as_array().cloned().unwrap_or_default(),
                }),
                _ => json!({"user": {}, "error": "invalid bearer token"}),
            };
        }
        "selfsubjectrulesreviews" => {
            let namespace = review["spec"]["namespace"].as_str().unwrap_or("default").to_string();
            review["status"] = crate::rbac::rules_review(state, &user, &namespace).await?;
        }
        _ => {
            review["status"] = json!({"userInfo": user.to_json()});
        }
    }
    Ok(review)
}

/// Creates the namespaces every cluster has, and the `kubernetes` Service, if missing.
pub async fn ensure_system_objects(state: &ApiState) -> Result<(), ApiError> {
    ensure_system_namespaces(state.store.as_ref()).await.map_err(|e| ApiError::from_store(e, "", "namespaces", ""))?;
    let classes = registry::find("scheduling.k8s.io", "v1", "priorityclasses").expect("priority classes are served");
    for (name, value) in crate::priority::SYSTEM_CLASSES {
        let key = classes.key(None, name);
        let mut class = json!({"metadata": {"name": name}, "value": value, "globalDefault": false,
                               "preemptionPolicy": "PreemptLowerPriority",
                               "description": "Used for system critical pods that must not be moved from their current node."});
        object::prepare_create(classes, None, &mut class)?;
        match state.store.create(&key, object::to_store(classes, &class)).await {
            Ok(_) | Err(StoreError::AlreadyExists { .. }) => {}
            Err(error) => return Err(ApiError::from_store(error, "scheduling.k8s.io", "priorityclasses", name)),
        }
    }
    // The default storage class, made once (a user may delete or change it).
    let storage_classes = registry::find("storage.k8s.io", "v1", "storageclasses").expect("storage classes are served");
    let marker = "/tugboat/made/default-storage-class";
    if state.store.get(marker, None).await.map_err(|e| ApiError::from_store(e, "", "", ""))?.is_none() {
        let mut class = crate::storage::default_class();
        object::prepare_create(storage_classes, None, &mut class)?;
        match state
            .store
            .create(&storage_classes.key(None, "local-path"), object::to_store(storage_classes, &class))
            .await
        {
            Ok(_) | Err(StoreError::AlreadyExists { .. }) => {}
            Err(error) => return Err(ApiError::from_store(error, "storage.k8s.io", "storageclasses", "local-path")),
        }
        match state.store.create(marker, b"1".to_vec()).await {
            Ok(_) | Err(StoreError::AlreadyExists { .. }) => {}
            Err(error) => return Err(ApiError::from_store(error, "", "", "")),
        }
    }
    // Upstream's default RBAC roles and bindings, made if missing; a default ClusterRole gets
    // the rules a newer server adds, unless annotated `autoupdate: "false"` (other edits kept).
    for (kind, mut object) in crate::rbac::defaults() {
        let plural = if kind == "ClusterRole" { "clusterroles" } else { "clusterrolebindings" };
        let resource = registry::find("rbac.authorization.k8s.io", "v1", plural).expect("RBAC is served");
        let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
        let store_error = |error| ApiError::from_store(error, "rbac.authorization.k8s.io", plural, &name);
        object::prepare_create(resource, None, &mut object)?;
        let key = resource.key(None, &name);
        match state.store.create(&key, object::to_store(resource, &object)).await {
            Ok(_) => {}
            Err(StoreError::AlreadyExists { .. }) if kind == "ClusterRole" => {
                let Some(kv) = state.store.get(&key, None).await.map_err(store_error)? else { continue };
                let mut stored = object::from_store(resource, &kv.value, kv.mod_revision)?;
                if stored["metadata"]["annotations"]["rbac.authorization.kubernetes.io/autoupdate"] == "false" {
                    continue;
                }
                let have = stored["rules"].as_array().cloned().unwrap_or_default();
                let missing: Vec<Value> =
                    object["rules"].as_array().into_iter().flatten().filter(|r| !have.contains(r)).cloned().collect();
                if missing.is_empty() {
                    continue;
                }
                stored["rules"] = Value::Array(have.into_iter().chain(missing).collect());
                match state.store.update(&key, object::to_store(resource, &stored), kv.mod_revision).await {
                    // Another server reconciled it first.
                    Ok(_) | Err(StoreError::Conflict { .. }) => {}
                    Err(error) => return Err(store_error(error)),
                }
            }
            Err(StoreError::AlreadyExists { .. }) => {}
            Err(error) => return Err(store_error(error)),
        }
    }
    let services = registry::find("", "v1", "services").expect("services are served");
    let key = services.key(Some("default"), "kubernetes");
    if state.store.get(&key, None).await.map_err(|e| ApiError::from_store(e, "", "services", "kubernetes"))?.is_some() {
        return Ok(());
    }
    let mut service = json!({
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"component": "apiserver", "provider": "kubernetes"}},
        "spec": {"clusterIP": state.service_cidr.first().to_string(),
                 "ports": [{"name": "https", "port": 443, "protocol": "TCP", "targetPort": 6443}]},
    });
    object::prepare_create(services, Some("default"), &mut service)?;
    crate::services::default_and_validate(&mut service)?;
    crate::services::allocate(state.store.as_ref(), state.service_cidr, &mut service).await?;
    match state.store.create(&key, object::to_store(services, &service)).await {
        Ok(_) | Err(StoreError::AlreadyExists { .. }) => Ok(()),
        Err(error) => Err(ApiError::from_store(error, "", "services", "kubernetes")),
    }
}

/// Points the `kubernetes` Service at this API server, as upstream's endpoint reconciler does:
/// Endpoints `default/kubernetes` (marked not to be mirrored) and the EndpointSlice
/// `kubernetes`, with `address` and the port the server listens on. Written only if they
/// differ, so restarts do not churn.
pub async fn reconcile_kubernetes_endpoints(
    state: &ApiState,
    addresses: &[std::net::IpAddr],
    port: u16,
) -> Result<(), ApiError> {
    let endpoints = registry::find("", "v1", "endpoints").expect("endpoints are served");
    let listed: Vec<Value> = addresses.iter().map(|a| json!({"ip": a.to_string()})).collect();
    let desired = json!({
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"endpointslice.kubernetes.io/skip-mirror": "true"}},
        "subsets": [{"addresses": listed,
                     "ports": [{"name": "https", "port": port, "protocol": "TCP"}]}],
    });
    put_system_object(state, endpoints, desired, &["subsets"]).await?;
    let slices = registry::find("discovery.k8s.io", "v1", "endpointslices").expect("endpoint slices are served");
    let ready: Vec<Value> =
        addresses.iter().map(|a| json!({"addresses": [a.to_string()], "conditions": {"ready": true}})).collect();
    let desired = json!({
        "metadata": {"name": "kubernetes", "namespace": "default",
                     "labels": {"kubernetes.io/service-name": "kubernetes"}},
        "addressType": if addresses.first().is_none_or(|a| a.is_ipv4()) { "IPv4" } else { "IPv6" },
        "endpoints": ready,
        "ports": [{"name": "https", "port": port, "protocol": "TCP"}],
    });
    put_system_object(state, slices, desired, &["addressType", "endpoints", "ports"]).await
}

/// The label of the Leases by which API servers say they are alive (upstream's identity
/// leases), and how long one counts without renewal.
const APISERVER_LEASE_LABEL: &str = "apiserver.kubernetes.io/identity";
const APISERVER_LEASE_SECONDS: i64 = 30;

/// Renews this server's Lease in kube-system and points the `kubernetes` Service at every
/// server whose Lease is fresh (upstream's lease endpoint reconciler): several servers share
/// it, and one that stops drops out within half a minute.
pub async fn reconcile_apiserver_lease(state: &ApiState, address: std::net::IpAddr, port: u16) -> Result<(), ApiError> {
    let leases = registry::find("coordination.k8s.io", "v1", "leases").expect("leases are served");
    let now = object::now_rfc3339();
    let name = format!("kube-apiserver-{}", address.to_string().replace(['.', ':'], "-"));
    let lease = json!({
        "metadata": {"name": name, "namespace": "kube-system", "labels": {APISERVER_LEASE_LABEL: "kube-apiserver"}},
        "spec": {"holderIdentity": address.to_string(), "leaseDurationSeconds": APISERVER_LEASE_SECONDS,
                 "renewTime": now},
    });
    put_system_object(state, leases, lease, &["spec"]).await?;
    let cutoff = time::OffsetDateTime::now_utc().unix_timestamp() - APISERVER_LEASE_SECONDS;
    let mut live: Vec<std::net::IpAddr> = cached_list(state, leases, Some("kube-system"))
        .await?
        .iter()
        .filter(|l| l["metadata"]["labels"][APISERVER_LEASE_LABEL] == "kube-apiserver")
        .filter(|l| {
            l["spec"]["renewTime"]
                .as_str()
                .and_then(|t| time::OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok())
                .is_some_and(|t| t.unix_timestamp() >= cutoff)
        })
        .filter_map(|l| l["spec"]["holderIdentity"].as_str()?.parse().ok())
        .collect();
    if !live.contains(&address) {
        live.push(address);
    }
    live.sort();
    reconcile_kubernetes_endpoints(state, &live, port).await
}

/// Creates `desired`, or replaces the stored object's `fields` with its own if they differ.
pub(crate) async fn put_system_object(
    state: &ApiState,
    resource: &Resource,
    mut desired: Value,
    fields: &[&str],
) -> Result<(), ApiError> {
    let namespace = desired["metadata"]["namespace"].as_str().map(str::to_string);
    let name = desired["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let key = resource.key(namespace.as_deref(), &name);
    let failed = |error| ApiError::from_store(error, resource.group, resource.plural, &name);
    for _ in 0..UPDATE_RETRIES {
        match state.store.get(&key, None).await.map_err(failed)? {
            None => {
                object::prepare_create(resource, namespace.as_deref(), &mut desired)?;
                match state.store.create(&key, object::to_store(resource, &desired)).await {
                    Ok(_) => return Ok(()),
                    Err(StoreError::AlreadyExists { .. }) => continue,
                    Err(error) => return Err(failed(error)),
                }
            }
            Some(stored) => {
                let old = object::from_store(resource, &stored.value, stored.mod_revision)?;
                if fields.iter().all(|f| old[*f] == desired[*f]) {
                    return Ok(());
                }
                let mut object = old.clone();
                for field in fields {
                    object[*field] = desired[*field].clone();
                }
                object::prepare_update(resource, &old, &mut object)?;
                match state.store.update(&key, object::to_store(resource, &object), stored.mod_revision).await {
                    Ok(_) => return Ok(()),
                    Err(StoreError::Conflict { .. }) => continue,
                    Err(error) => return Err(failed(error)),
                }
            }
        }
    }
    Err(ApiError::conflict(resource.group, resource.plural, &name))
}

/// Creates the namespaces every cluster has, if missing.
async fn ensure_system_namespaces(store: &dyn Store) -> Result<(), StoreError> {
    let namespaces = registry::find("", "v1", "namespaces").expect("namespaces are served");
    for name in ["default", "kube-system", "kube-public", "kube-node-lease"] {
        let key = namespaces.key(None, name);
        if store.get(&key, None).await?.is_some() {
            continue;
        }
        let mut object = json!({"metadata": {"name": name, "labels": {"kubernetes.io/metadata.name": name}}});
        object::prepare_create(namespaces, None, &mut object).expect("a valid namespace");
        match store.create(&key, object::to_store(namespaces, &object)).await {
            Ok(_) | Err(StoreError::AlreadyExists { .. }) => {}
            Err(error) => return Err(error),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_route_to_resources() {
        let t = parse_target("/api/v1/namespaces/default/pods/web", registry::find).unwrap().unwrap();
        assert_eq!(
            (t.resource.plural, t.namespace.as_deref(), t.name.as_deref()),
            ("pods", Some("default"), Some("web"))
        );
        let t = parse_target("/api/v1/namespaces/kube-system", registry::find).unwrap().unwrap();
        assert_eq!(
            (t.resource.plural, t.namespace.as_deref(), t.name.as_deref()),
            ("namespaces", None, Some("kube-system"))
        );
        let t = parse_target("/api/v1/pods", registry::find).unwrap().unwrap();
        assert_eq!((t.resource.plural, t.namespace, t.name), ("pods", None, None));
        let t = parse_target("/apis/apps/v1/namespaces/x/deployments/web/scale", registry::find).unwrap().unwrap();
        assert_eq!(t.subresource.as_deref(), Some("scale"));
        let t = parse_target("/api/v1/nodes/n1/status", registry::find).unwrap().unwrap();
        assert_eq!(
            (t.resource.plural, t.name.as_deref(), t.subresource.as_deref()),
            ("nodes", Some("n1"), Some("status"))
        );
        assert!(parse_target("/api/v1/widgets", registry::find).is_err());
        assert!(parse_target("/api/v1/pods/web", registry::find).is_err(), "a namespaced object needs its namespace");
        assert!(parse_target("/metrics", registry::find).unwrap().is_none());
    }
}
