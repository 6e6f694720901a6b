//! The API server: the Kubernetes REST API over HTTPS, on top of the store. The only component
//! that touches the store.
//!
//! `start` creates (or reuses) the cluster CA, the serving certificate and the admin client
//! certificate under `<data-dir>/pki`, writes `<data-dir>/admin.kubeconfig`, makes sure the
//! system namespaces exist, and serves until the returned handle is dropped or stopped.
//!
//! Of Tugboat's crates it imports the store, `tugboat-pki` and `tugboat-objects`, never a node or
//! controller crate: the API server is the only component that touches the store.
//!
//! Inside, the modules form layers (ARCHITECTURE.md lists them): values and wire (`registry`,
//! `object`, `custom`, …), served sets and outgoing clients (`custom_kinds`, `aggregated`,
//! `outbound`), the shared state and request (`state`, `request`), the features on them
//! (admission, RBAC, quota, …), writes (`write`), the server's own writers (`crd_controller`,
//! `aggregator`), and the router (`handlers`) on top. A module imports only from below it:
//! `layer_tests.rs` fails on an import cycle, and on any module that uses the router.

// ApiError is returned by value on the cold path; boxing it would buy nothing measurable.
#![allow(clippy::result_large_err)]

mod admission;
mod aggregated;
mod aggregator;
mod auth;
mod autoscaling;
pub mod bootstrap;
mod cel_check;
mod cel_cost;
mod conversion;
mod crd;
mod crd_controller;
mod custom;
mod custom_kinds;
mod discovery;
mod events;
mod fields;
#[cfg(test)]
mod fuzz_tests;
mod handlers;
mod kubelet;
#[cfg(test)]
mod layer_tests;
mod limit_range;
mod matching;
mod metrics;
mod node;
mod object;
mod openapi;
mod openapi_v2;
mod outbound;
mod pod_subresources;
mod policy;
mod priority;
mod protobuf;
mod proxy;
mod quota;
mod rbac;
mod registry;
mod request;
mod resource_metrics;
mod rules;
mod runtime_class;
mod schema;
mod selector;
mod service_accounts;
mod services;
mod shared_keys;
mod smp;
mod state;
mod status;
mod strategy;
mod storage;
mod table;
mod tls;
mod watch_cache;
mod write;

use std::convert::Infallible;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use futures::FutureExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::server::WebPkiClientVerifier;
use tokio::net::TcpListener;
use tugboat_pki::{CertSpec, ClusterCa, Usage};
use tugboat_store::Store;

pub use auth::{TokenFile, UserInfo};
pub use registry::{RESOURCES, Resource};
pub use services::ServiceCidr;
pub use state::{MAX_BODY, version};
pub use status::ApiError;

/// How to serve.
#[derive(Debug, Clone)]
pub struct ApiServerConfig {
    /// Certificates live in `<data_dir>/pki`; the admin kubeconfig is `<data_dir>/admin.kubeconfig`.
    pub data_dir: PathBuf,
    pub bind_address: IpAddr,
    /// 0 picks a free port (tests).
    pub https_port: u16,
    /// Static bearer tokens (`token,user,uid,"groups"` per line).
    pub token_auth_file: Option<PathBuf>,
    /// Where ClusterIPs come from (`--service-cidr`).
    pub service_cidr: ServiceCidr,
    /// The NoExecute tolerations new pods get for not-ready and unreachable nodes, in seconds.
    pub default_not_ready_toleration_seconds: i64,
    pub default_unreachable_toleration_seconds: i64,
    /// The address other members of the cluster reach this server at (`--advertise-address`),
    /// the endpoint of the `kubernetes` Service. None: the bind address unless unspecified
    /// (`tugboat server` then passes the default route's interface address).
    pub advertise_address: Option<IpAddr>,
    /// How long the join token made at first start is valid, seconds (0: for ever).
    pub join_token_ttl: u64,
}

impl Default for ApiServerConfig {
    fn default() -> Self {
        ApiServerConfig {
            data_dir: PathBuf::from("/var/lib/tugboat"),
            bind_address: IpAddr::V4(Ipv4Addr::UNSPECIFIED),
            https_port: 6443,
            token_auth_file: None,
            service_cidr: ServiceCidr::default(),
            default_not_ready_toleration_seconds: 300,
            default_unreachable_toleration_seconds: 300,
            advertise_address: None,
            join_token_ttl: 24 * 3600,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Pki(#[from] tugboat_pki::PkiError),
    #[error("TLS setup: {0}")]
    Tls(String),
    #[error("listening on {addr}: {source}")]
    Listen { addr: SocketAddr, source: std::io::Error },
    #[error("token file {0}")]
    Tokens(String),
    #[error(transparent)]
    Store(#[from] tugboat_store::StoreError),
    #[error("creating the system objects: {0}")]
    Setup(String),
}

/// A running API server.
#[derive(Debug)]
pub struct ApiServer {
    local_addr: SocketAddr,
    kubeconfig: PathBuf,
    task: tokio::task::JoinHandle<()>,
    /// Background work of this server (lease renewal, certificate renewal), stopped with it.
    background: Vec<tokio::task::JoinHandle<()>>,
    join: (String, String),
    advertise: Option<IpAddr>,
}

impl ApiServer {
    /// `(server URL, token)` for `tugboat agent --server URL --token TOKEN`.
    pub fn join(&self) -> (&str, &str) {
        (&self.join.0, &self.join.1)
    }

    /// The address the rest of the cluster reaches this server at (`--advertise-address`, else
    /// the bind address unless it is unspecified).
    pub fn advertise_address(&self) -> Option<IpAddr> {
        self.advertise
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `<data-dir>/admin.kubeconfig`.
    pub fn admin_kubeconfig(&self) -> &Path {
        &self.kubeconfig
    }

    /// Stops accepting connections.
    pub fn stop(&self) {
        self.task.abort();
        self.background.iter().for_each(|t| t.abort());
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_string()).filter(|h| !h.is_empty())
}

/// The address clients use: loopback when listening on all addresses.
fn client_address(bind: IpAddr, port: u16) -> String {
    match bind {
        IpAddr::V4(ip) if ip.is_unspecified() => format!("127.0.0.1:{port}"),
        IpAddr::V6(ip) if ip.is_unspecified() => format!("127.0.0.1:{port}"),
        IpAddr::V6(ip) => format!("[{ip}]:{port}"),
        IpAddr::V4(ip) => format!("{ip}:{port}"),
    }
}

/// Issues the serving certificate anew when it comes due ([`ClusterCa::load_or_issue`]
/// renews within 90 days of expiry), checked twice a day; served from the next handshake.
async fn renew_serving_certificate(pki_dir: PathBuf, spec: CertSpec, serving: Arc<tugboat_pki::tls::RotatingCert>) {
    let mut tick = tokio::time::interval(Duration::from_secs(12 * 3600));
    tick.tick().await;
    loop {
        tick.tick().await;
        let renewed = ClusterCa::load_or_create(&pki_dir).and_then(|ca| ca.load_or_issue("apiserver", &spec));
        match renewed {
            Ok(issued) if issued.cert_pem != serving.pem() => match serving.set(&issued.cert_pem, &issued.key_pem) {
                Ok(()) => tracing::info!("the API server's serving certificate was renewed"),
                Err(error) => tracing::warn!(%error, "cannot serve the renewed certificate"),
            },
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "cannot renew the serving certificate"),
        }
    }
}

fn tls_config(
    ca: &ClusterCa,
    serving: Arc<tugboat_pki::tls::RotatingCert>,
) -> Result<rustls::ServerConfig, StartError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = |e: &dyn std::fmt::Display| StartError::Tls(e.to_string());
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut ca.cert_pem().as_bytes()) {
        roots.add(cert.map_err(|e| tls(&e))?).map_err(|e| tls(&e))?;
    }
    // Client certificates are optional at the TLS layer (bearer tokens and anonymous public
    // paths need none), but when one is sent it must chain to the cluster CA.
    let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .allow_unauthenticated()
        .build()
        .map_err(|e| tls(&e))?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(&e))?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(serving);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Sets up certificates and the admin kubeconfig, then serves the API from `store`.
pub async fn start(config: ApiServerConfig, store: Arc<dyn Store>) -> Result<ApiServer, StartError> {
    let pki_dir = config.data_dir.join("pki");
    let sa_key = pki_dir.join("sa.key");
    // The cluster's CA and service-account key: the datastore's if it has them (another
    // server's, or a restored snapshot's), else this data dir's (made on first start).
    shared_keys::adopt(store.as_ref(), &pki_dir).await?;
    let mut ca = ClusterCa::load_or_create(&pki_dir)?;
    let mut signer = auth::TokenSigner::load_or_create(&sa_key).map_err(StartError::Tls)?;
    // Upstream's front-proxy CA: how servers prove themselves to aggregated API servers (a CA
    // of its own, so no client certificate the cluster CA signs can pass for a server).
    let mut front_proxy_ca = ClusterCa::load_or_create(&pki_dir.join("front-proxy"))?;
    if !shared_keys::publish(store.as_ref(), &pki_dir).await? {
        // Another server started the cluster at the same moment: its keys win.
        shared_keys::adopt(store.as_ref(), &pki_dir).await?;
        ca = ClusterCa::load_or_create(&pki_dir)?;
        signer = auth::TokenSigner::load_or_create(&sa_key).map_err(StartError::Tls)?;
        front_proxy_ca = ClusterCa::load_or_create(&pki_dir.join("front-proxy"))?;
    }
    let advertise = config.advertise_address.or((!config.bind_address.is_unspecified()).then_some(config.bind_address));
    // The serving certificate names every address clients use: loopback, the bind and advertise
    // addresses, and the `kubernetes` Service's ClusterIP (pods reach the API through it).
    let mut ips = vec![IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)];
    for ip in
        [Some(config.bind_address), advertise, Some(IpAddr::V4(config.service_cidr.first()))].into_iter().flatten()
    {
        if !ip.is_unspecified() && !ips.contains(&ip) {
            ips.push(ip);
        }
    }
    let mut dns: Vec<String> = [
        "localhost",
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
    ]
    .into_iter()
    .map(str::to_string)
    .collect();
    dns.extend(hostname());
    let year = Duration::from_secs(365 * 24 * 3600);
    let serving_spec = CertSpec {
        common_name: "kube-apiserver".into(),
        organizations: vec![],
        dns_names: dns,
        ip_addresses: ips,
        usage: Usage::Server,
        validity: year,
    };
    let serving = ca.load_or_issue("apiserver", &serving_spec)?;
    let admin = ca.load_or_issue(
        "admin",
        &CertSpec {
            common_name: "kubernetes-admin".into(),
            organizations: vec!["system:masters".into()],
            dns_names: vec![],
            ip_addresses: vec![],
            usage: Usage::Client,
            validity: year,
        },
    )?;
    // Upstream's apiserver-kubelet-client: how the API server proves itself to kubelets.
    let kubelet_client = ca.load_or_issue(
        "apiserver-kubelet-client",
        &CertSpec {
            common_name: "kube-apiserver-kubelet-client".into(),
            organizations: vec!["system:masters".into()],
            dns_names: vec![],
            ip_addresses: vec![],
            usage: Usage::Client,
            validity: year,
        },
    )?;
    let kubelets = outbound::KubeletClient::new(ca.cert_pem(), &kubelet_client.cert_pem, &kubelet_client.key_pem)
        .map_err(StartError::Tls)?;
    let front_proxy_client = front_proxy_ca.load_or_issue(
        "front-proxy-client",
        &CertSpec {
            common_name: "front-proxy-client".into(),
            organizations: vec![],
            dns_names: vec![],
            ip_addresses: vec![],
            usage: Usage::Client,
            validity: year,
        },
    )?;
    let front_proxy = aggregated::FrontProxy {
        ca_pem: front_proxy_ca.cert_pem().to_string(),
        cert_pem: front_proxy_client.cert_pem,
        key_pem: front_proxy_client.key_pem,
    };
    let tokens = match &config.token_auth_file {
        Some(path) => TokenFile::load(path).map_err(StartError::Tokens)?,
        None => TokenFile::default(),
    };
    let tokens = Arc::new(tokens);
    let serving = tugboat_pki::tls::RotatingCert::new(&serving.cert_pem, &serving.key_pem).map_err(StartError::Tls)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(&ca, serving.clone())?));
    let mut background = vec![tokio::spawn(renew_serving_certificate(pki_dir.clone(), serving_spec, serving))];

    let addr = SocketAddr::new(config.bind_address, config.https_port);
    let listener = TcpListener::bind(addr).await.map_err(|source| StartError::Listen { addr, source })?;
    let local_addr = listener.local_addr().map_err(|source| StartError::Listen { addr, source })?;
    let server_address = client_address(config.bind_address, local_addr.port());
    let kubeconfig = config.data_dir.join("admin.kubeconfig");
    let contents = tugboat_pki::client_cert_kubeconfig(
        &format!("https://{server_address}"),
        ca.cert_pem(),
        &admin.cert_pem,
        &admin.key_pem,
        "kubernetes-admin",
    );
    tugboat_pki::write_file(&kubeconfig, contents.as_bytes(), 0o600)?;

    object::set_default_toleration_seconds(
        config.default_not_ready_toleration_seconds,
        config.default_unreachable_toleration_seconds,
    );
    let state = Arc::new(state::ApiState {
        caches: watch_cache::WatchCaches::new(store.clone()),
        store,
        server_address,
        service_cidr: config.service_cidr,
        metrics: metrics::Metrics::default(),
        kubelets,
        signer,
        tokens,
        custom: Default::default(),
        aggregated: Default::default(),
        front_proxy,
    });
    handlers::ensure_system_objects(&state).await.map_err(|e| StartError::Setup(e.message))?;
    aggregator::ensure_objects(&state, ca.cert_pem()).await.map_err(|e| StartError::Setup(e.message))?;
    // The custom resources defined so far are served from the first request on.
    crd::refresh(&state).await.map_err(|e| StartError::Setup(e.message))?;
    background.push(tokio::spawn(crd_controller::run(state.clone())));
    background.push(tokio::spawn(aggregator::run(state.clone())));
    background.push(tokio::spawn(aggregator::register_custom(state.clone())));
    match advertise {
        Some(address) => {
            let port = local_addr.port();
            handlers::reconcile_apiserver_lease(&state, address, port)
                .await
                .map_err(|e| StartError::Setup(e.message))?;
            let state = state.clone();
            background.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(10));
                tick.tick().await;
                loop {
                    tick.tick().await;
                    if let Err(error) = handlers::reconcile_apiserver_lease(&state, address, port).await {
                        tracing::warn!(error = %error.message, "cannot renew this server's lease");
                    }
                }
            }));
        }
        None => tracing::warn!("no address to advertise: give --advertise-address"),
    }
    // What joining nodes need: cluster-info (the CA and where this server is) and a token.
    let join_server = match advertise {
        Some(address) => format!("https://{}", SocketAddr::new(address, local_addr.port())),
        None => format!("https://{}", state.server_address),
    };
    bootstrap::publish_cluster_info(&state, &join_server, ca.cert_pem())
        .await
        .map_err(|e| StartError::Setup(e.message))?;
    let token = bootstrap::ensure_join_token(&state, &config.data_dir, config.join_token_ttl)
        .await
        .map_err(|e| StartError::Setup(e.message))?;
    let task = tokio::spawn(accept_loop(listener, acceptor, state));
    tracing::info!(address = %local_addr, kubeconfig = %kubeconfig.display(), "API server listening");
    Ok(ApiServer { local_addr, kubeconfig, task, background, join: (join_server, token), advertise })
}

async fn accept_loop(listener: TcpListener, acceptor: tokio_rustls::TlsAcceptor, state: Arc<state::ApiState>) {
    loop {
        let (tcp, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) => {
                // Out of file descriptors and the like: back off rather than spin.
                tracing::warn!(%error, "accepting a connection failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        // As Go's servers do: a response written in pieces (TLS records, headers then body)
        // must not wait for the client's delayed ACK (Nagle), which costs 40 ms a request.
        if let Err(error) = tcp.set_nodelay(true) {
            tracing::debug!(%peer, %error, "could not set TCP_NODELAY");
        }
        let (acceptor, state) = (acceptor.clone(), state.clone());
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::debug!(%peer, %error, "TLS handshake failed");
                    return;
                }
                Err(_) => return,
            };
            let cert_user = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|cert| auth::from_certificate(cert.as_ref()));
            let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let (state, cert_user) = (state.clone(), cert_user.clone());
                async move {
                    let user = match cert_user {
                        Some(user) => Some(user),
                        None => bearer_user(&state, &request).await,
                    };
                    let request = request.map(Body::new);
                    let response = AssertUnwindSafe(handlers::handle(state, user, request)).catch_unwind().await;
                    Ok::<_, Infallible>(response.unwrap_or_else(|_| {
                        tracing::error!("a request handler panicked");
                        ApiError::internal("the server hit a bug serving this request").into_response()
                    }))
                }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(error) = builder.serve_connection_with_upgrades(TokioIo::new(tls), service).await {
                tracing::debug!(%peer, %error, "connection ended with an error");
            }
        });
    }
}

async fn bearer_user(state: &state::ApiState, request: &hyper::Request<hyper::body::Incoming>) -> Option<UserInfo> {
    let value = request.headers().get(hyper::header::AUTHORIZATION)?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ").or_else(|| value.strip_prefix("bearer "))?.trim();
    authenticate_token(state, token).await
}

/// Who a bearer token is: a static token (`--token-auth-file`), a service account's JWT or a
/// bootstrap token; what requests and TokenReviews both ask.
pub(crate) async fn authenticate_token(state: &state::ApiState, token: &str) -> Option<UserInfo> {
    if let Some(user) = state.tokens.user(token) {
        return Some(user.clone());
    }
    if service_accounts::looks_like_jwt(token) {
        return service_accounts::authenticate(state, token).await;
    }
    bootstrap::authenticate(state, token).await
}
