//! The server's outgoing connections: where a Service, pod or node is reached (from the store),
//! TCP dials, the kubelet client (logs, exec, attach, port-forward, node proxy) and the client
//! of webhooks (admission and conversion: `clientConfig` by URL or Service, TLS with its
//! `caBundle`). Below the server's state: nothing here needs more than the store.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::Response;
use base64::Engine;
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::Value;

use crate::object::read_stored;
use crate::registry;
use crate::status::ApiError;

/// Connects to kubelets.
#[derive(Clone)]
pub struct KubeletClient {
    tls: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for KubeletClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeletClient").finish_non_exhaustive()
    }
}

impl KubeletClient {
    /// Presents `cert_pem`/`key_pem`; trusts kubelets whose serving certificate the cluster
    /// CA (`ca_pem`) signed for the address dialled.
    pub fn new(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<KubeletClient, String> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls_pemfile::certs(&mut ca_pem.as_bytes()) {
            roots.add(cert.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?;
        }
        let certs: Vec<CertificateDer<'static>> =
            rustls_pemfile::certs(&mut cert_pem.as_bytes()).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
        let key: PrivateKeyDer<'static> =
            rustls_pemfile::private_key(&mut key_pem.as_bytes()).map_err(|e| e.to_string())?.ok_or("no private key")?;
        let mut config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(|e| e.to_string())?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(KubeletClient { tls: tokio_rustls::TlsConnector::from(Arc::new(config)) })
    }

    /// Sends `request` to the kubelet at `address` (host:port) over a connection of its own.
    pub async fn send(
        &self,
        address: &str,
        request: hyper::Request<Body>,
    ) -> Result<Response<hyper::body::Incoming>, String> {
        let tcp = dial(address).await?;
        let name = server_name(address)?;
        let tls = self.tls.connect(name, tcp).await.map_err(|e| format!("TLS with the kubelet at {address}: {e}"))?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = connection.with_upgrades().await;
        });
        sender.send_request(request).await.map_err(|e| e.to_string())
    }
}

/// A TCP connection to `address` (`host:port`), given up after 10 s, in Go's words.
pub(crate) async fn dial(address: &str) -> Result<tokio::net::TcpStream, String> {
    let tcp = tokio::time::timeout(Duration::from_secs(10), tokio::net::TcpStream::connect(address))
        .await
        .map_err(|_| format!("dial tcp {address}: i/o timeout"))?
        .map_err(|e| format!("dial tcp {address}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    Ok(tcp)
}

/// The TLS server name of `address`: its host, without an IPv6 address's brackets.
pub(crate) fn server_name(address: &str) -> Result<ServerName<'static>, String> {
    let host = address.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']'])).unwrap_or(address);
    ServerName::try_from(host.to_string()).map_err(|e| e.to_string())
}

/// The kubelet address (`host:port`) of a node object.
pub fn node_address(node: &Value) -> Option<String> {
    let addresses = node["status"]["addresses"].as_array()?;
    let pick = |kind: &str| addresses.iter().find(|a| a["type"] == kind).and_then(|a| a["address"].as_str());
    let host = pick("InternalIP").or_else(|| pick("ExternalIP")).or_else(|| pick("Hostname"))?;
    let port = node["status"]["daemonEndpoints"]["kubeletEndpoint"]["Port"].as_u64().unwrap_or(10250);
    Some(if host.contains(':') { format!("[{host}]:{port}") } else { format!("{host}:{port}") })
}

/// What a proxied request is for: the resource (`pods`, `services`, `nodes`), its namespace
/// and the name segment as given (`https:web:8443`).
#[derive(Debug)]
pub struct Target<'a> {
    pub plural: &'a str,
    pub namespace: Option<&'a str>,
    pub id: &'a str,
}

/// Upstream's `SplitSchemeNamePort`: `name`, `name:port` or `scheme:name:port`.
pub(crate) fn split_id(id: &str) -> Result<(&str, &str, &str), ApiError> {
    let parts: Vec<&str> = id.split(':').collect();
    let (scheme, name, port) = match parts.as_slice() {
        [name] => ("", *name, ""),
        [name, port] => ("", *name, *port),
        [scheme, name, port] => (*scheme, *name, *port),
        _ => return Err(ApiError::bad_request(format!("invalid request {id:?}"))),
    };
    if name.is_empty() || !matches!(scheme, "" | "http" | "https") {
        return Err(ApiError::bad_request(format!("invalid request {id:?}")));
    }
    Ok((scheme, name, port))
}

pub(crate) fn unavailable(message: String) -> ApiError {
    ApiError::new(503, "ServiceUnavailable", message)
}

/// Where the request goes: scheme, `host:port`, and whether through the kubelet client.
pub(crate) async fn locate(
    store: &dyn tugboat_store::Store,
    target: &Target<'_>,
) -> Result<(String, String, bool), ApiError> {
    let (scheme, name, port) = split_id(target.id)?;
    let join = |ip: &str, port: &str| {
        let host = if ip.contains(':') { format!("[{ip}]") } else { ip.to_string() };
        if port.is_empty() { host } else { format!("{host}:{port}") }
    };
    match target.plural {
        "pods" => {
            let pods = registry::find("", "v1", "pods").expect("pods are served");
            let (pod, _) = read_stored(store, pods, target.namespace, name).await?;
            let port = if port.is_empty() {
                let first = pod["spec"]["containers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .find_map(|c| c["ports"][0]["containerPort"].as_i64());
                first.map(|p| p.to_string()).unwrap_or_default()
            } else {
                port.to_string()
            };
            let ip = pod["status"]["podIP"]
                .as_str()
                .filter(|ip| !ip.is_empty())
                .ok_or_else(|| unavailable(format!("pod {name} has no IP address yet")))?;
            let scheme = if scheme.is_empty() { "http" } else { scheme };
            let port = if port.is_empty() { if scheme == "https" { "443" } else { "80" }.to_string() } else { port };
            Ok((scheme.to_string(), join(ip, &port), false))
        }
        "services" => {
            let services = registry::find("", "v1", "services").expect("services are served");
            let (service, _) = read_stored(store, services, target.namespace, name).await?;
            // A port number means the service port of that number, named as its endpoints name it.
            let mut port_name = port.to_string();
            if let Ok(number) = port.parse::<i64>() {
                let declared = service["spec"]["ports"].as_array().into_iter().flatten().find(|p| p["port"] == number);
                let Some(declared) = declared else {
                    return Err(unavailable(format!("no service port {number} found for service {name:?}")));
                };
                port_name = declared["name"].as_str().unwrap_or_default().to_string();
            }
            let endpoints = registry::find("", "v1", "endpoints").expect("endpoints are served");
            let (endpoints, _) = read_stored(store, endpoints, target.namespace, name)
                .await
                .map_err(|_| unavailable(format!("no endpoints available for service {name:?}")))?;
            let subsets = endpoints["subsets"].as_array().cloned().unwrap_or_default();
            let start = pick(subsets.len());
            for i in 0..subsets.len() {
                let subset = &subsets[(start + i) % subsets.len()];
                let addresses = subset["addresses"].as_array().cloned().unwrap_or_default();
                if addresses.is_empty() {
                    continue;
                }
                let ports = subset["ports"].as_array().into_iter().flatten();
                if let Some(found) = ports.into_iter().find(|p| p["name"].as_str().unwrap_or_default() == port_name) {
                    let address = &addresses[pick(addresses.len())];
                    let ip = address["ip"].as_str().unwrap_or_default();
                    let port = found["port"].as_i64().unwrap_or(80).to_string();
                    let scheme = if scheme.is_empty() { "http" } else { scheme };
                    return Ok((scheme.to_string(), join(ip, &port), false));
                }
            }
            Err(unavailable(format!("no endpoints available for service {:?}", target.id)))
        }
        _ => {
            let nodes = registry::find("", "v1", "nodes").expect("nodes are served");
            let (node, _) = read_stored(store, nodes, None, name).await?;
            let kubelet =
                node_address(&node).ok_or_else(|| unavailable(format!("node {name} has no address to reach it at")))?;
            let kubelet_port = kubelet.rsplit_once(':').map(|(_, p)| p).unwrap_or("10250");
            if port.is_empty() || port == kubelet_port {
                return Ok(("https".into(), kubelet, true));
            }
            let host = kubelet.rsplit_once(':').map(|(h, _)| h).unwrap_or(&kubelet).to_string();
            let scheme = if scheme.is_empty() { "http" } else { scheme };
            Ok((scheme.to_string(), format!("{host}:{port}"), false))
        }
    }
}

/// Posts `body` as JSON to a webhook (`clientConfig`: a URL, or a Service reached through its
/// endpoints) over TLS verified with the `caBundle`, within `timeout`; its JSON answer. Errors
/// read as upstream's client words them (`Post "https://…": context deadline exceeded`).
pub(crate) async fn post(
    store: &dyn tugboat_store::Store,
    config: &Value,
    timeout: Duration,
    body: &Value,
) -> Result<Value, String> {
    let (url, address, server_name) = locate_webhook(store, config).await?;
    let url = format!("{url}?timeout={}s", timeout.as_secs());
    let exchange = async {
        let connector = connector(config)?;
        let tcp = dial(&address).await?;
        let name = ServerName::try_from(server_name.clone()).map_err(|e| e.to_string())?;
        let tls = connector.connect(name, tcp).await.map_err(|e| format!("tls: {e}"))?;
        let path = url.split_once("://").and_then(|(_, rest)| rest.find('/').map(|i| &rest[i..])).unwrap_or("/");
        let body = serde_json::to_vec(body).map_err(|e| e.to_string())?;
        let http = hyper::Request::post(path)
            .header("host", url.split("://").nth(1).and_then(|r| r.split('/').next()).unwrap_or_default())
            .header("content-type", "application/json")
            .header("accept", "application/json, */*")
            .body(Body::from(body))
            .map_err(|e| e.to_string())?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| e.to_string())?;
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let response = sender.send_request(http).await.map_err(|e| e.to_string())?;
        let status = response.status();
        let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
        Ok::<_, String>((status, body))
    };
    let (status, body) = match tokio::time::timeout(timeout, exchange).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(error)) => return Err(format!("Post {url:?}: {error}")),
        Err(_) => return Err(format!("Post {url:?}: context deadline exceeded")),
    };
    if !status.is_success() {
        let text = String::from_utf8_lossy(&body);
        return Err(format!("the server responded with the status code {} ({})", status.as_u16(), text.trim()));
    }
    serde_json::from_slice(&body).map_err(|e| format!("the answer does not decode: {e}"))
}

/// Where a webhook is: the URL it is shown by, the address to dial and the TLS server name.
pub(crate) async fn locate_webhook(
    store: &dyn tugboat_store::Store,
    config: &Value,
) -> Result<(String, String, String), String> {
    if let Some(url) = config["url"].as_str() {
        let parsed = url::Url::parse(url).map_err(|e| format!("invalid url {url:?}: {e}"))?;
        let host = parsed.host_str().ok_or_else(|| format!("url {url:?} has no host"))?.to_string();
        let port = parsed.port_or_known_default().unwrap_or(443);
        let bare = host.trim_matches(['[', ']']).to_string();
        let address = if bare.contains(':') { format!("[{bare}]:{port}") } else { format!("{bare}:{port}") };
        let shown = url.split('?').next().unwrap_or(url).to_string();
        return Ok((shown, address, bare));
    }
    let service = &config["service"];
    let (Some(namespace), Some(name)) = (service["namespace"].as_str(), service["name"].as_str()) else {
        return Err("the webhook names neither a url nor a service".into());
    };
    let port = service["port"].as_i64().unwrap_or(443);
    let path = service["path"].as_str().unwrap_or("/");
    let host = format!("{name}.{namespace}.svc");
    let shown = format!("https://{host}:{port}{path}");
    let id = format!("https:{name}:{port}");
    let target = Target { plural: "services", namespace: Some(namespace), id: &id };
    let (_, address, _) = locate(store, &target)
        .await
        .map_err(|e| format!("Post {shown:?}: service \"{namespace}/{name}\" cannot be reached: {}", e.message))?;
    Ok((shown, address, host))
}

/// TLS verified with the configuration's `caBundle` (no bundle: nothing is trusted, as the
/// server has no system roots of its own).
pub(crate) fn connector(config: &Value) -> Result<tokio_rustls::TlsConnector, String> {
    let pem = match config["caBundle"].as_str().filter(|b| !b.is_empty()) {
        Some(bundle) => {
            base64::engine::general_purpose::STANDARD.decode(bundle).map_err(|e| format!("caBundle: {e}"))?
        }
        None => Vec::new(),
    };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .dangerous()
        .with_custom_certificate_verifier(crate::tls::trusting(provider, &pem)?)
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// An index below `n` (n > 0) that varies from request to request: which endpoint to try
/// first, spreading requests as upstream's random pick does.
pub(crate) fn pick(n: usize) -> usize {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().subsec_nanos();
    nanos as usize % n.max(1)
}
