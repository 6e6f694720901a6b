//! The router, at the top of the crate: authorize a request, route its Kubernetes API path, and
//! serve reads (get, list, watch, Tables) and reviews here; writes are [`crate::write`]'s, the
//! shared state and object access [`crate::state`]'s. Every failure becomes a `Status` (see
//! `status.rs`). Nothing in the crate uses this module but the crate root.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderMap, Method, Response, StatusCode, header};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::{Value, json};
use tugboat_store::{EventKind, ListOptions, Store, StoreError};

use crate::admission;
use crate::auth::UserInfo;
use crate::discovery;
use crate::object::{self, decode_body};
use crate::registry::{self, Resource};
use crate::request::{FieldValidation, Filters, Query, Write, field_manager};
use crate::state::{
    ApiState, MAX_BODY, cached_list, drain_in_background, json_response, read_body, read_object, text_response, version,
};
use crate::status::ApiError;
use crate::table;
use crate::write::{
    View, create, create_object, delete, delete_collection, patch, put_system_object, server_side_apply, update,
};

/// Upstream's limit for a request body (3 MiB).
/// How often an optimistic update is retried when the object changes underneath.

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
        Ok(Some(t)) if t.resource.group.is_empty() && t.resource.builtin() == "pods" => {
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
            let target = crate::outbound::Target { plural: &plural, namespace: namespace.as_deref(), id: &id };
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
) -> crate::auth::Attributes {
    use crate::auth::{Attributes, ResourceAttributes};
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
        use crate::auth::{Attributes, ResourceAttributes};
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
            let mut response = Response::new(Body::from(crate::openapi_v2::protobuf_with(&state.custom.all())));
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
        (&Method::POST, None) if target.resource.builtin() == "certificatesigningrequests" => {
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
    // From the watch cache: `resourceVersion=0` (what informers list with: any recent state
    // will do, and upstream's cache ignores limit then too), and a whole consistent list (no
    // resourceVersion, no limit: the cache once it has every change up to the store's
    // current revision, as upstream's ConsistentListFromCache).
    let any_recent = query.get("resourceVersion").is_some_and(|rv| rv == "0");
    let consistent = query.get("resourceVersion").is_none_or(|rv| rv.is_empty())
        && options.revision.is_none()
        && options.limit.is_none_or(|l| l <= 0);
    if (any_recent || consistent) && options.continue_token.is_none() {
        let cache = state
            .caches
            .get(&resource.prefix(None))
            .await
            .map_err(|e| ApiError::from_store(e, resource.group, resource.plural, ""))?;
        let at = match consistent && !any_recent {
            true => state.caches.current(&cache, &resource.prefix(None)).await,
            false => Some(cache.revision()),
        };
        if let Some(at) = at {
            // As stored, selecting nothing out, as JSON: the cache's bytes as they are.
            if object::shown_as_stored(resource)
                && filters.select_all()
                && !table::wants_table(accept)
                && !table::wants_metadata(accept)
            {
                let (items, revision) = cache.list_encoded(&prefix);
                return Ok(encoded_list(resource, &items, list_metadata(&revision.max(at).to_string(), None, None)));
            }
            let (objects, revision) = cache.list(&prefix);
            let items: Vec<Value> = if crate::conversion::by_webhook(resource) {
                // Selected by the fields of this version: converted first.
                let items = crate::conversion::convert(state.store.as_ref(), resource, objects).await?;
                items.into_iter().filter(|o| filters.matches(o)).collect()
            } else {
                objects.into_iter().filter(|o| filters.matches(o)).map(|o| object::from_storage(resource, o)).collect()
            };
            return Ok(list_response(resource, items, revision.max(at), None, None, accept, query));
        }
    }
    if let Some(limit) = options.limit.filter(|l| *l > 0)
        && let Some(response) = list_page_from_cache(state, resource, namespace, &filters, limit, query, accept).await?
    {
        return Ok(response);
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

/// A page of a paged list (`limit`, maybe `continue`) from the watch cache, as upstream's
/// cache serves them since 1.33: a first page without a resourceVersion once the cache is as
/// current as the store, and the later pages (or an `Exact` resourceVersion) at the revision
/// of the token while the cache's history reaches back to it and the store has not compacted
/// it away (then the store answers, with 410 Gone for a compacted token). Pages are filled up
/// to `limit` matching objects, as from etcd. `None`: read the store.
async fn list_page_from_cache(
    state: &ApiState,
    resource: &Resource,
    namespace: Option<&str>,
    filters: &Filters,
    limit: i64,
    query: &Query,
    accept: &str,
) -> Result<Option<Response<Body>>, ApiError> {
    if crate::conversion::by_webhook(resource) {
        return Ok(None);
    }
    let prefix = resource.prefix(namespace);
    let cache_prefix = resource.prefix(None);
    let store_error = |e| ApiError::from_store(e, resource.group, resource.plural, "");
    let version = query.get("resourceVersion").filter(|rv| !rv.is_empty());
    let exact = query.get("resourceVersionMatch").is_some_and(|m| m == "Exact");
    let token = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) if version.is_none() => Some(tugboat_store::ContinueToken::decode(token).map_err(store_error)?),
        Some(_) => return Ok(None),
        None => None,
    };
    // The revision to read at; `None`: the latest (a consistent read).
    let wanted = match (&token, version) {
        (Some(token), _) => Some(token.revision).filter(|r| *r > 0),
        (None, None) => None,
        (None, Some(version)) if exact => match parse_revision(Some(version))? {
            Some(revision) => Some(revision),
            None => return Ok(None),
        },
        (None, Some(_)) => return Ok(None),
    };
    let cache = state.caches.get(&cache_prefix).await.map_err(store_error)?;
    let floor = match wanted {
        Some(revision) => {
            if state.store.compacted_revision().is_none_or(|compacted| revision < compacted) {
                return Ok(None);
            }
            if cache.revision() < revision
                && state.caches.current(&cache, &cache_prefix).await.is_none_or(|current| current < revision)
            {
                return Ok(None);
            }
            revision
        }
        None => match state.caches.current(&cache, &cache_prefix).await {
            Some(current) => current,
            None => return Ok(None),
        },
    };
    let start = token.as_ref().map_or_else(|| prefix.clone(), |token| token.start_key(&prefix));
    let limit = usize::try_from(limit).unwrap_or(usize::MAX);
    let select_all = filters.select_all();
    // Served bytes of the objects listed, with their decoded trees when filters read them.
    let mut items: Vec<(String, Bytes, Option<Value>)> = Vec::new();
    let (mut at, mut cursor) = (wanted, start);
    // Whether objects follow the last one listed, and the revision the pages were read at.
    let (more, read_at) = 'pages: loop {
        let batch = if select_all { limit } else { limit.clamp(256, 4096) };
        let Some(page) = cache.page(&prefix, &cursor, at, batch) else { return Ok(None) };
        at = Some(page.revision);
        for (key, bytes) in page.items {
            if items.len() == limit {
                break 'pages (true, page.revision);
            }
            cursor = format!("{key}\0");
            if select_all {
                items.push((key, bytes, None));
            } else if let Some(object) = crate::watch_cache::decode_served(&bytes)
                && filters.matches(&object)
            {
                items.push((key, bytes, Some(object)));
            }
        }
        if !page.more || items.len() == limit {
            break (page.more, page.revision);
        }
    };
    let revision = read_at.max(floor);
    let (mut continue_token, mut remaining) = (None, None);
    if more && let Some((last, ..)) = items.last() {
        continue_token = Some(tugboat_store::ContinueToken::after(&prefix, last, revision).encode());
        if select_all {
            remaining = cache.count(&prefix, &format!("{last}\0"), read_at);
        }
    }
    if object::shown_as_stored(resource) && select_all && !table::wants_table(accept) && !table::wants_metadata(accept)
    {
        let encoded: Vec<Bytes> = items.into_iter().map(|(_, bytes, _)| bytes).collect();
        let metadata = list_metadata(&revision.to_string(), continue_token.as_deref(), remaining);
        return Ok(Some(encoded_list(resource, &encoded, metadata)));
    }
    let objects: Vec<Value> = items
        .into_iter()
        .filter_map(|(_, bytes, object)| object.or_else(|| crate::watch_cache::decode_served(&bytes)))
        .map(|object| object::from_storage(resource, object))
        .collect();
    Ok(Some(list_response(resource, objects, revision, continue_token, remaining, accept, query)))
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
    let metadata = list_metadata(&revision, continue_token.as_deref(), remaining);
    let write = |item: &Value, body: &mut Vec<u8>| serde_json::to_writer(body, item).expect("a JSON value serializes");
    if table::wants_metadata(accept) {
        let head = ("PartialObjectMetadataList", "meta.k8s.io/v1".to_string(), metadata);
        list_body(head, &items, |item, body| write(&table::partial(item), body))
    } else {
        list_body((&format!("{}List", resource.kind), resource.api_version(), metadata), &items, write)
    }
}

/// A list's metadata: its revision, and where a paged list goes on (with what is left when
/// that is known).
fn list_metadata(revision: &str, continue_token: Option<&str>, remaining: Option<i64>) -> Value {
    let mut metadata = json!({"resourceVersion": revision});
    if let Some(token) = continue_token {
        metadata["continue"] = json!(token);
        if let Some(remaining) = remaining {
            metadata["remainingItemCount"] = json!(remaining);
        }
    }
    metadata
}

/// A JSON list of objects already encoded (each a JSON object), written around them.
fn encoded_list(resource: &Resource, items: &[Bytes], metadata: Value) -> Response<Body> {
    let head = (&*format!("{}List", resource.kind), resource.api_version(), metadata);
    list_body(head, items, |item, body| body.extend_from_slice(item))
}

/// A JSON list (`kind`, `apiVersion`, `metadata` of `head`) whose items `write` writes in
/// place, one after the other: neither copied into one tree first nor encoded twice.
fn list_body<T>(
    (kind, api_version, metadata): (&str, String, Value),
    items: &[T],
    mut write: impl FnMut(&T, &mut Vec<u8>),
) -> Response<Body> {
    let head = json!({"kind": kind, "apiVersion": api_version, "metadata": metadata}).to_string();
    let mut body = Vec::with_capacity(head.len() + 16 + items.len() * 256);
    // `{"apiVersion":…,"kind":…,"metadata":{…}` then `,"items":[…]}`.
    body.extend_from_slice(&head.as_bytes()[..head.len() - 1]);
    body.extend_from_slice(b",\"items\":[");
    for (i, item) in items.iter().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        write(item, &mut body);
    }
    body.extend_from_slice(b"]}");
    let mut response = Response::new(Body::from(body));
    response.headers_mut().insert(header::CONTENT_TYPE, header::HeaderValue::from_static("application/json"));
    response
}

/// One watch event line.
fn event_line(kind: &str, object: &Value) -> Bytes {
    event_line_encoded(kind, &serde_json::to_vec(object).expect("a JSON value serializes"))
}

/// One watch event line around an object already encoded.
fn event_line_encoded(kind: &str, object: &[u8]) -> Bytes {
    let mut line = Vec::with_capacity(object.len() + kind.len() + 24);
    line.extend_from_slice(b"{\"type\":\"");
    line.extend_from_slice(kind.as_bytes());
    line.extend_from_slice(b"\",\"object\":");
    line.extend_from_slice(object);
    line.extend_from_slice(b"}\n");
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
    let view = move |object: &Value| -> Value { object::from_storage(resource, object.clone()) };
    // A change the cache has encoded goes out as those bytes when shown as stored, as JSON.
    let as_stored = object::shown_as_stored(resource) && !as_table && !as_metadata;
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
        let shown: Vec<Value> = initial.into_iter().map(|o| object::from_storage(resource, o)).collect();
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
                    Ok(Arc::new(Change { object, previous, encoded: None, ..(*change).clone() }))
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
                    let mut put = |kind: &str| match change.encoded.as_deref().filter(|_| as_stored) {
                        Some(encoded) => event_line_encoded(kind, encoded),
                        None => render(kind, &change.object, std::mem::take(&mut first)),
                    };
                    match change.kind {
                        EventKind::Put => match (previous.is_some(), filters.matches(&change.object)) {
                            (false, true) => Some(put("ADDED")),
                            (true, true) => Some(put("MODIFIED")),
                            (true, false) => Some(put("DELETED")),
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
    match resource.builtin() {
        "selfsubjectaccessreviews" => {
            review["status"] = crate::rbac::review(state, &user, &review["spec"]).await?;
        }
        // Whether someone else may: kubelets ask it of their callers (delegated authorization);
        // a LocalSubjectAccessReview asks it within its own namespace.
        "subjectaccessreviews" | "localsubjectaccessreviews" => {
            let spec = &review["spec"];
            if resource.builtin() == "localsubjectaccessreviews" {
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
