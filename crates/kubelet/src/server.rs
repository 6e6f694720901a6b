//! The kubelet's HTTPS API (`:10250` by default), which the API server proxies `pods/log`,
//! exec, attach and port-forward to. Clients must present a certificate of the cluster CA (the
//! API server's `apiserver-kubelet-client`), and are authorized as upstream's kubelet does with
//! `--authorization-mode Webhook`: a SubjectAccessReview asks the API server whether the
//! certificate's user may `<verb>` `nodes/<proxy|log|stats|metrics>` of this node (answers
//! cached, 5 min allowed, 30 s refused) — another node's credentials may not. The serving
//! certificate is one the cluster signed for the node ([`crate::certificates`]), which the API
//! server verifies.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{Response, StatusCode, header};
use axum::routing::get;
use hyper_util::rt::{TokioExecutor, TokioIo};
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use serde_json::Value;

use crate::certificates::ServingCert;
use crate::logs::{self, LogOptions};
use crate::pods::Shared;

fn tls_config(ca_pem: &str, serving: Arc<ServingCert>) -> anyhow::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
        roots.add(cert?)?;
    }
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone()).build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(serving);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves the kubelet API on `port` (all addresses) until the process ends, with `serving`'s
/// certificate of the moment.
pub async fn serve(node: Shared, port: u16, ca_pem: String, serving: Arc<ServingCert>) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(&ca_pem, serving)?));
    let listener = tokio::net::TcpListener::bind(SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), port)).await?;
    tracing::info!(port, "kubelet API listening");
    let app = router(node);
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "kubelet API: accept");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                _ => return,
            };
            // The verifier took only certificates of the cluster CA: its subject is the caller.
            let caller = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|certs| certs.first())
                .and_then(|cert| tugboat_pki::der_subject(cert))
                .map(|(user, groups)| Caller { user, groups });
            let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let (app, caller) = (app.clone(), caller.clone());
                async move {
                    use tower::ServiceExt;
                    let mut request = request.map(Body::new);
                    if let Some(caller) = caller {
                        request.extensions_mut().insert(caller);
                    }
                    let response = app.oneshot(request).await;
                    Ok::<_, Infallible>(response.unwrap_or_else(|e| match e {}))
                }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(error) = builder.serve_connection_with_upgrades(TokioIo::new(tls), service).await {
                tracing::debug!(%peer, %error, "kubelet API connection");
            }
        });
    }
}

pub fn router(node: Shared) -> Router {
    let decisions = Arc::new(Decisions::default());
    Router::new()
        .route("/containerLogs/{namespace}/{pod}/{container}", get(container_logs))
        .route("/exec/{namespace}/{pod}/{container}", get(crate::exec::exec).post(crate::exec::exec_spdy))
        .route("/attach/{namespace}/{pod}/{container}", get(crate::exec::attach).post(crate::exec::attach_spdy))
        .route("/stats/summary", get(stats_summary))
        .route("/pods", get(pods))
        .route("/portForward/{namespace}/{pod}", axum::routing::post(crate::portforward::port_forward))
        .layer(axum::middleware::from_fn_with_state((node.clone(), decisions), authorize))
        // Health is for anyone the CA vouches for, as the readiness of the node's API.
        .route("/healthz", get(|| async { "ok" }))
        .with_state(node)
}

/// Who called, from the client certificate.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Caller {
    pub user: String,
    pub groups: Vec<String>,
}

/// The API server's recent answers: (caller, verb, subresource) → (allowed, until).
type Decisions = std::sync::Mutex<HashMap<(Caller, &'static str, &'static str), (bool, std::time::Instant)>>;

/// Upstream's mapping of kubelet paths to the `nodes` subresource a caller needs.
pub fn subresource(path: &str) -> &'static str {
    let first = path.trim_start_matches('/').split('/').next().unwrap_or_default();
    match first {
        "stats" => "stats",
        "metrics" => "metrics",
        "logs" => "log",
        "spec" => "spec",
        _ => "proxy",
    }
}

/// Upstream's verbs for kubelet requests, by method.
pub fn verb(method: &http::Method) -> &'static str {
    match *method {
        http::Method::POST => "create",
        http::Method::PUT => "update",
        http::Method::PATCH => "patch",
        http::Method::DELETE => "delete",
        _ => "get",
    }
}

async fn authorize(
    State((node, decisions)): State<(Shared, Arc<Decisions>)>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response<Body> {
    let Some(caller) = request.extensions().get::<Caller>().cloned() else {
        return text(StatusCode::UNAUTHORIZED, "Unauthorized");
    };
    let (verb, subresource) = (verb(request.method()), subresource(request.uri().path()));
    let key = (caller, verb, subresource);
    let now = std::time::Instant::now();
    let cached =
        decisions.lock().unwrap_or_else(|e| e.into_inner()).get(&key).filter(|(_, until)| *until > now).map(|d| d.0);
    let allowed = match cached {
        Some(allowed) => allowed,
        None => match review(&node, &key.0, verb, subresource).await {
            Ok(allowed) => {
                let ttl = std::time::Duration::from_secs(if allowed { 300 } else { 30 });
                decisions.lock().unwrap_or_else(|e| e.into_inner()).insert(key.clone(), (allowed, now + ttl));
                allowed
            }
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "kubelet API: cannot authorize a request");
                return text(StatusCode::INTERNAL_SERVER_ERROR, "Authorization error (the API server did not answer)");
            }
        },
    };
    if !allowed {
        let (caller, verb, subresource) = key;
        return text(
            StatusCode::FORBIDDEN,
            format!("Forbidden (user={}, verb={verb}, resource=nodes, subresource(s)=[{subresource}])", caller.user),
        );
    }
    next.run(request).await
}

/// Asks the API server whether `caller` may `verb` this node's `subresource`.
async fn review(node: &Shared, caller: &Caller, verb: &str, subresource: &str) -> anyhow::Result<bool> {
    use k8s_openapi::api::authorization::v1::{ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec};
    let review = SubjectAccessReview {
        spec: SubjectAccessReviewSpec {
            user: Some(caller.user.clone()),
            groups: Some(caller.groups.clone()),
            resource_attributes: Some(ResourceAttributes {
                verb: Some(verb.into()),
                resource: Some("nodes".into()),
                subresource: Some(subresource.into()),
                name: Some(node.name.clone()),
                ..ResourceAttributes::default()
            }),
            ..SubjectAccessReviewSpec::default()
        },
        ..SubjectAccessReview::default()
    };
    let api: Api<SubjectAccessReview> = Api::all(node.client.clone());
    let answer = api.create(&kube::api::PostParams::default(), &review).await?;
    Ok(answer.status.is_some_and(|s| s.allowed))
}

fn text(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .body(Body::from(message.into()))
        .expect("a valid response")
}

/// `/stats/summary`: the node's and its pods' resource usage.
/// `/pods`: the pods bound to this node, as a PodList (what `nodes/<node>/proxy/pods` shows:
/// the e2e framework's view of the kubelet's pods).
async fn pods(State(node): State<Shared>) -> Response<Body> {
    let api: Api<Pod> = Api::all(node.client.clone());
    let params = kube::api::ListParams::default().fields(&format!("spec.nodeName={}", node.name));
    let (status, body) = match api.list(&params).await {
        Ok(list) => {
            let items: Vec<Value> = list.items.iter().filter_map(|pod| serde_json::to_value(pod).ok()).collect();
            let list = serde_json::json!({"kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items});
            (StatusCode::OK, list.to_string())
        }
        Err(error) => (StatusCode::INTERNAL_SERVER_ERROR, format!("listing the node's pods: {error}")),
    };
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(body))
        .expect("a valid response")
}

async fn stats_summary(State(node): State<Shared>) -> Response<Body> {
    let summary = crate::stats::summary(&node).await;
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(summary.to_string()))
        .expect("a valid response")
}

/// Which container instance (`tugboat://<id>`) `kubectl logs [--previous]` means, from the
/// pod's status, as upstream's kubelet decides (validateContainerLogStatus).
pub fn log_target(pod: &Value, container: &str, previous: bool) -> Result<String, String> {
    let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let statuses = pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .chain(pod["status"]["initContainerStatuses"].as_array())
        .chain(pod["status"]["ephemeralContainerStatuses"].as_array())
        .flatten();
    let Some(status) = statuses.into_iter().find(|s| s["name"] == container) else {
        return Err(format!("container {container:?} in pod {pod_name:?} is not available"));
    };
    let last = status["lastState"]["terminated"]["containerID"].as_str();
    let id = if previous {
        last.ok_or_else(|| format!("previous terminated container {container:?} in pod {pod_name:?} not found"))?
    } else if let Some(waiting) = status["state"].get("waiting") {
        match last {
            Some(id) => id,
            None => {
                let reason = waiting["reason"].as_str().unwrap_or("ContainerCreating");
                return Err(format!("container {container:?} in pod {pod_name:?} is waiting to start: {reason}"));
            }
        }
    } else {
        status["containerID"]
            .as_str()
            .or_else(|| status["state"]["terminated"]["containerID"].as_str())
            .ok_or_else(|| format!("container {container:?} in pod {pod_name:?} is not available"))?
    };
    Ok(id.trim_start_matches("tugboat://").to_string())
}

async fn container_logs(
    State(node): State<Shared>,
    UrlPath((namespace, pod_name, container)): UrlPath<(String, String, String)>,
    Query(query): Query<HashMap<String, String>>,
) -> Response<Body> {
    let options = match LogOptions::from_query(&query) {
        Ok(options) => options,
        Err(message) => return text(StatusCode::BAD_REQUEST, message),
    };
    let previous = query.get("previous").is_some_and(|v| v == "true" || v == "1" || v == "True");
    let pods: Api<Pod> = Api::namespaced(node.client.clone(), &namespace);
    let pod = match pods.get_opt(&pod_name).await {
        Ok(Some(pod)) => serde_json::to_value(pod).unwrap_or_default(),
        Ok(None) => return text(StatusCode::NOT_FOUND, format!("pod {namespace}/{pod_name} not found")),
        Err(error) => return text(StatusCode::SERVICE_UNAVAILABLE, error.to_string()),
    };
    let id = match log_target(&pod, &container, previous) {
        Ok(id) => id,
        Err(message) => return text(StatusCode::BAD_REQUEST, message),
    };
    let containers = node.runtime.list_prefixed(&id).await.unwrap_or_default();
    let Some(found) = containers.into_iter().find(|c| c.id() == id) else {
        return text(StatusCode::NOT_FOUND, format!("container {container:?} in pod {pod_name:?}: its logs are gone"));
    };
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let runtime = node.runtime.clone();
    let finished = move || runtime.has_exited(&id);
    tokio::spawn(logs::stream(found.config.log_path.clone(), options, finished, tx));
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .expect("a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn logs_follow_the_container_status_as_upstream() {
        let pod = json!({"metadata": {"name": "p"}, "status": {"containerStatuses": [
            {"name": "run", "containerID": "tugboat://r1", "state": {"running": {}}, "lastState": {"terminated": {"containerID": "tugboat://r0"}}},
            {"name": "crash", "containerID": "tugboat://c3", "state": {"waiting": {"reason": "CrashLoopBackOff"}}, "lastState": {"terminated": {"containerID": "tugboat://c3"}}},
            {"name": "new", "state": {"waiting": {"reason": "ContainerCreating"}}, "lastState": {}},
        ]}});
        assert_eq!(log_target(&pod, "run", false), Ok("r1".into()));
        assert_eq!(log_target(&pod, "run", true), Ok("r0".into()));
        assert_eq!(log_target(&pod, "crash", false), Ok("c3".into()));
        assert_eq!(log_target(&pod, "crash", true), Ok("c3".into()));
        assert_eq!(
            log_target(&pod, "new", false),
            Err("container \"new\" in pod \"p\" is waiting to start: ContainerCreating".into())
        );
        assert_eq!(
            log_target(&pod, "new", true),
            Err("previous terminated container \"new\" in pod \"p\" not found".into())
        );
        assert!(log_target(&pod, "nope", false).unwrap_err().contains("not available"));
    }
}
