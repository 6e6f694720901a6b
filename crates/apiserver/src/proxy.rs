//! The `proxy` subresources of pods, services and nodes, as upstream's: a request to
//! `…/pods/[scheme:]name[:port]/proxy/<path>` goes to the pod's IP (the port named, else its
//! first container port), one to a service to a ready endpoint of the service port named (by
//! name or number, as upstream's `ResourceLocation` picks it), one to a node to its kubelet (with
//! the API server's kubelet client certificate) or, for another port, to that port of the node.
//! Method, query, body and the end-to-end headers pass through; the answer comes back as the
//! backend gave it, streamed.

use axum::body::Body;
#[cfg(test)]
use axum::http::HeaderMap;
use axum::http::{Response, header};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;

use crate::outbound::{Target, locate, unavailable};
use crate::state::ApiState;

use crate::status::ApiError;

/// Headers that belong to one connection, not to the request (RFC 9110 §7.6.1), and the
/// caller's credentials, which are the API server's business only.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "host",
    "authorization",
];

/// Forwards `request` (its path already cut to what follows `/proxy`) to the target.
pub async fn forward(
    state: &ApiState,
    target: Target<'_>,
    rest: &str,
    request: hyper::Request<Body>,
) -> Result<Response<Body>, ApiError> {
    // `…/proxy` without a path: GET and HEAD are sent on to `…/proxy/` (upstream's 301).
    if rest.is_empty() && matches!(*request.method(), axum::http::Method::GET | axum::http::Method::HEAD) {
        let uri = request.uri();
        let location = match uri.query() {
            Some(query) => format!("{}/?{query}", uri.path()),
            None => format!("{}/", uri.path()),
        };
        return Ok(Response::builder()
            .status(axum::http::StatusCode::MOVED_PERMANENTLY)
            .header(header::LOCATION, location)
            .body(Body::empty())
            .expect("a valid response"));
    }
    let (scheme, address, kubelet) = locate(state.store.as_ref(), &target).await?;
    let (parts, body) = request.into_parts();
    let path = if rest.is_empty() { "/" } else { rest };
    let uri = match parts.uri.query() {
        Some(query) => format!("{path}?{query}"),
        None => path.to_string(),
    };
    let mut forward = hyper::Request::builder().method(parts.method.clone()).uri(&uri).header(header::HOST, &address);
    for (name, value) in &parts.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            forward = forward.header(name, value);
        }
    }
    let forward = forward.body(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let failed = |error: String| {
        unavailable(format!("error trying to reach {} {:?}: {error}", target.plural.trim_end_matches('s'), target.id))
    };
    let response = if kubelet {
        state.kubelets.send(&address, forward).await.map_err(failed)?
    } else {
        send(&scheme, &address, forward).await.map_err(failed)?
    };
    let (response_parts, body) = response.into_parts();
    let mut answer = Response::builder().status(response_parts.status);
    // HTML links to the backend's own paths are rewritten to go through the proxy, as
    // upstream's proxy transport does (uncompressed pages only).
    let html = response_parts
        .headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("text/html"))
        && response_parts.headers.get(header::CONTENT_ENCODING).is_none();
    for (name, value) in &response_parts.headers {
        if !(HOP_BY_HOP.contains(&name.as_str()) || html && name == header::CONTENT_LENGTH) {
            answer = answer.header(name, value);
        }
    }
    if html {
        let prefix = parts.uri.path().strip_suffix(rest).unwrap_or(parts.uri.path()).trim_end_matches('/').to_string();
        let page = http_body_util::Limited::new(body, MAX_REWRITTEN)
            .collect()
            .await
            .map_err(|e| unavailable(format!("reading the proxied page: {e}")))?
            .to_bytes();
        let page = rewrite_links(&String::from_utf8_lossy(&page), &prefix);
        return Ok(answer.body(Body::from(page)).unwrap_or_else(|_| Response::new(Body::empty())));
    }
    Ok(answer.body(Body::new(body)).unwrap_or_else(|_| Response::new(Body::empty())))
}

/// The largest HTML page the proxy reads whole to rewrite its links.
const MAX_REWRITTEN: usize = 16 * 1024 * 1024;

/// The attributes that hold URLs (upstream's `atomsToAttrs`, by attribute name).
const URL_ATTRIBUTES: &[&str] = &[
    "href",
    "src",
    "action",
    "formaction",
    "cite",
    "background",
    "longdesc",
    "usemap",
    "codebase",
    "data",
    "poster",
    "manifest",
    "profile",
    "icon",
    "classid",
];

/// `page` with every URL attribute that names an absolute path of the backend (`/x`, not
/// `//host/x` or `http://…`) prefixed with `prefix` (the proxy path), unless it already is.
fn rewrite_links(page: &str, prefix: &str) -> String {
    let mut out = String::with_capacity(page.len() + 64);
    let bytes = page.as_bytes();
    let mut i = 0;
    let mut copied = 0;
    while i < bytes.len() {
        // An attribute name after whitespace, then `=` and a quote.
        if bytes[i].is_ascii_whitespace() {
            let start = i + 1;
            let mut end = start;
            while end < bytes.len() && bytes[end].is_ascii_alphabetic() {
                end += 1;
            }
            let name = &page[start..end];
            if end + 1 < bytes.len()
                && bytes[end] == b'='
                && matches!(bytes[end + 1], b'"' | b'\'')
                && URL_ATTRIBUTES.iter().any(|a| a.eq_ignore_ascii_case(name))
            {
                let quote = bytes[end + 1];
                let value_start = end + 2;
                if let Some(length) = bytes[value_start..].iter().position(|b| *b == quote) {
                    let value = &page[value_start..value_start + length];
                    if value.starts_with('/') && !value.starts_with("//") && !value.starts_with(prefix) {
                        out.push_str(&page[copied..value_start]);
                        out.push_str(prefix);
                        out.push_str(value);
                        copied = value_start + length;
                    }
                    i = value_start + length;
                    continue;
                }
            }
        }
        i += 1;
    }
    out.push_str(&page[copied..]);
    out
}

/// TLS that takes whatever certificate the pod or service shows.
fn insecure_connector() -> tokio_rustls::TlsConnector {
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("the ring provider supports the default versions")
        .dangerous()
        .with_custom_certificate_verifier(crate::tls::any_certificate(provider))
        .with_no_client_auth();
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// Sends one request over a connection of its own (TLS without verification for `https`,
/// as upstream's proxy transport does for pods and services).
async fn send(
    scheme: &str,
    address: &str,
    request: hyper::Request<Body>,
) -> Result<Response<hyper::body::Incoming>, String> {
    let tcp = crate::outbound::dial(address).await?;
    if scheme == "https" {
        let name = crate::outbound::server_name(address)?;
        let tls = insecure_connector().connect(name, tcp).await.map_err(|e| e.to_string())?;
        exchange(TokioIo::new(tls), request).await
    } else {
        exchange(TokioIo::new(tcp), request).await
    }
}

async fn exchange<T>(io: T, request: hyper::Request<Body>) -> Result<Response<hyper::body::Incoming>, String>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await.map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender.send_request(request).await.map_err(|e| e.to_string())
}

/// The proxy target of a path, if it is one: (resource plural, namespace, name segment, the
/// raw rest after `/proxy`). Paths: `/api/v1/namespaces/<ns>/{pods,services}/<id>/proxy…`
/// and `/api/v1/nodes/<id>/proxy…`.
pub fn parse(path: &str) -> Option<(&str, Option<&str>, &str, &str)> {
    let rest = path.strip_prefix("/api/v1/")?;
    let (plural, namespace, after) = if let Some(namespaced) = rest.strip_prefix("namespaces/") {
        let (namespace, after) = namespaced.split_once('/')?;
        let (plural, after) = after.split_once('/')?;
        if !matches!(plural, "pods" | "services") {
            return None;
        }
        (plural, Some(namespace), after)
    } else {
        let after = rest.strip_prefix("nodes/")?;
        ("nodes", None, after)
    };
    let (id, after) = after.split_once('/')?;
    let tail = after.strip_prefix("proxy")?;
    if !(tail.is_empty() || tail.starts_with('/')) {
        return None;
    }
    Some((plural, namespace, id, tail))
}

/// Whether the response headers a backend sent would be dropped (for tests).
#[cfg(test)]
fn passes(headers: &HeaderMap) -> Vec<String> {
    headers.keys().map(|k| k.as_str().to_string()).filter(|k| !HOP_BY_HOP.contains(&k.as_str())).collect()
}

#[cfg(test)]
mod tests {
    use crate::outbound::split_id;

    #[test]
    fn html_links_to_the_backend_go_through_the_proxy() {
        let prefix = "/api/v1/namespaces/ns/pods/web:1080/proxy";
        let page = r#"<a href="/rewriteme">test</a> <img src='/i.png'> <a href="//other/x">o</a> <a href="http://h/x">h</a> <a href="rel">r</a> <a HREF="/api/v1/namespaces/ns/pods/web:1080/proxy/done">d</a>"#;
        assert_eq!(
            rewrite_links(page, prefix),
            r#"<a href="/api/v1/namespaces/ns/pods/web:1080/proxy/rewriteme">test</a> <img src='/api/v1/namespaces/ns/pods/web:1080/proxy/i.png'> <a href="//other/x">o</a> <a href="http://h/x">h</a> <a href="rel">r</a> <a HREF="/api/v1/namespaces/ns/pods/web:1080/proxy/done">d</a>"#
        );
    }

    use super::*;

    #[test]
    fn proxy_paths_and_ids_parse_as_upstreams() {
        assert_eq!(
            parse("/api/v1/namespaces/ns/pods/https:web:8443/proxy/a/b/"),
            Some(("pods", Some("ns"), "https:web:8443", "/a/b/"))
        );
        assert_eq!(parse("/api/v1/namespaces/ns/services/web/proxy"), Some(("services", Some("ns"), "web", "")));
        assert_eq!(parse("/api/v1/nodes/n1:10250/proxy/logs/"), Some(("nodes", None, "n1:10250", "/logs/")));
        assert_eq!(parse("/api/v1/namespaces/ns/pods/web/log"), None);
        assert_eq!(parse("/api/v1/namespaces/ns/configmaps/web/proxy"), None);
        assert_eq!(parse("/api/v1/namespaces/ns/pods/web/proxyx"), None);
        assert_eq!(split_id("web").unwrap(), ("", "web", ""));
        assert_eq!(split_id("web:http").unwrap(), ("", "web", "http"));
        assert_eq!(split_id("https:web:443").unwrap(), ("https", "web", "443"));
        assert!(split_id("ftp:web:21").is_err() && split_id("a:b:c:d").is_err());
        let mut headers = HeaderMap::new();
        headers.insert("authorization", "Bearer x".parse().unwrap());
        headers.insert("content-type", "text/plain".parse().unwrap());
        assert_eq!(passes(&headers), ["content-type"]);
    }
}
