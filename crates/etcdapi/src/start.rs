//! Starting the etcd API as `tugboat server` does (`--etcd-api-listen`): its certificates in
//! kubeadm's layout (`<pki>/{ca,server,healthcheck-client}.{crt,key}`, `<pki>` being
//! `<data-dir>/pki/etcd`; the server certificate allows client auth too, as kubeadm's does,
//! so etcdctl may present it) and its mutual-TLS listener.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use tugboat_pki::{CertSpec, ClusterCa, Usage};
use tugboat_store::Store;

/// How long the etcd API's certificates live (renewed at start when near their end).
const VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

/// Serves the etcd API of `store` on `listen` as member `name`, with the certificates in
/// `pki` (made there if missing) and leases kept in `lease_file`; returns the bound address
/// and the serving task.
pub async fn start(
    listen: SocketAddr,
    pki: &Path,
    name: &str,
    store: Arc<dyn Store>,
    db_files: Vec<std::path::PathBuf>,
    lease_file: Option<std::path::PathBuf>,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let ca = ClusterCa::load_or_create_named(pki, "etcd-ca").context("the etcd API's CA")?;
    let name = name.to_string();
    let mut ips: Vec<IpAddr> = vec![IpAddr::from([127, 0, 0, 1]), IpAddr::from(std::net::Ipv6Addr::LOCALHOST)];
    if !listen.ip().is_unspecified() && !ips.contains(&listen.ip()) {
        ips.push(listen.ip());
    }
    let server = ca.load_or_issue(
        "server",
        &CertSpec {
            common_name: name.clone(),
            organizations: Vec::new(),
            dns_names: vec!["localhost".to_string(), name.clone()],
            ip_addresses: ips,
            usage: Usage::ServerAndClient,
            validity: VALIDITY,
        },
    )?;
    ca.load_or_issue(
        "healthcheck-client",
        &CertSpec {
            common_name: "kube-etcd-healthcheck-client".to_string(),
            organizations: Vec::new(),
            dns_names: Vec::new(),
            ip_addresses: Vec::new(),
            usage: Usage::Client,
            validity: VALIDITY,
        },
    )?;
    let tls = tls_config(ca.cert_pem(), &server.cert_pem, &server.key_pem)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("--etcd-api-listen {listen}: the etcd API's address"))?;
    let address = listener.local_addr()?;
    let identity = crate::Identity {
        cluster_id: fnv(ca.cert_pem().as_bytes()),
        member_id: fnv(format!("{name}/{}", ca.cert_pem()).as_bytes()),
        name,
        client_urls: vec![format!("https://{address}")],
        db_files,
        lease_file,
    };
    let api = crate::EtcdApi::new(store, identity).context("the etcd API's lease file")?;
    Ok((address, tokio::spawn(crate::serve(listener, tls, api))))
}

/// TLS 1.2+ with a client certificate of the etcd CA required, ALPN h2 (gRPC).
pub fn tls_config(ca_pem: &str, cert_pem: &str, key_pem: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(cert.context("the etcd CA's certificate")?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .context("the etcd API's client verifier")?;
    let certs = CertificateDer::pem_slice_iter(cert_pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).context("the etcd API's server key")?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// FNV-1a: stable IDs from names (etcd derives its member and cluster IDs by hashing too).
fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(0x0100_0000_01b3))
}
