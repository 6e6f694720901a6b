//! The node's certificates, from the cluster's CertificateSigningRequest API and renewed before
//! they expire, without a restart:
//!
//! - the **serving certificate** of the kubelet API (signer `kubernetes.io/kubelet-serving`,
//!   `<data-dir>/pki/kubelet-server.crt`), which the API server verifies against the cluster
//!   CA. Until the first is signed the kubelet serves a self-signed one. The TLS acceptor asks
//!   [`ServingCert`] on every handshake, so a renewed certificate is served at once;
//! - the **client certificate** of an agent's `kubelet.kubeconfig` (signer
//!   `kubernetes.io/kube-apiserver-client-kubelet`): renewed by rewriting the kubeconfig, whose
//!   identity [`KubeconfigIdentity`] reads again for every new connection.
//!
//! Renewal starts, as upstream's certificate manager, at a random point 70–90 % through the
//! certificate's life, and is retried every 10 s until it succeeds.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, PostParams};
use rustls::sign::CertifiedKey;
use tugboat_pki::tls::RotatingCert;

pub const KUBELET_CLIENT: &str = "kubernetes.io/kube-apiserver-client-kubelet";
pub const KUBELET_SERVING: &str = "kubernetes.io/kubelet-serving";
const RETRY: Duration = Duration::from_secs(10);

/// Asks the cluster for a certificate for `common_name` (organizations, names, usages) from
/// `signer` by a CertificateSigningRequest named `<prefix><random>`, and waits for it to be
/// signed: (certificate PEM, key PEM).
#[allow(clippy::too_many_arguments)]
pub async fn request(
    client: &kube::Client,
    signer: &str,
    prefix: &str,
    common_name: &str,
    organizations: &[&str],
    names: (&[String], &[IpAddr]),
    usages: &[&str],
    timeout: Duration,
) -> anyhow::Result<(String, String)> {
    use base64::Engine;
    let (request, key) = tugboat_pki::certificate_request_for(common_name, organizations, names.0, names.1)?;
    let csr: CertificateSigningRequest = serde_json::from_value(serde_json::json!({
        "metadata": {"generateName": prefix},
        "spec": {"request": base64::engine::general_purpose::STANDARD.encode(&request),
                 "signerName": signer, "usages": usages},
    }))?;
    let api: Api<CertificateSigningRequest> = Api::all(client.clone());
    let created = api.create(&PostParams::default(), &csr).await?;
    let name = created.metadata.name.unwrap_or_default();
    tracing::info!(csr = %name, signer, "asked for a certificate");
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let status = api.get(&name).await?.status.unwrap_or_default();
        if let Some(refused) = status.conditions.iter().flatten().find(|c| c.type_ == "Denied" || c.type_ == "Failed") {
            anyhow::bail!(
                "certificate request {name} was {}: {}",
                refused.type_.to_lowercase(),
                refused.message.clone().unwrap_or_default()
            );
        }
        if let Some(certificate) = status.certificate.filter(|c| !c.0.is_empty()) {
            return Ok((String::from_utf8(certificate.0)?, key));
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "certificate request {name} was not signed within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// When (Unix seconds) to renew a certificate: a random point 70–90 % through its life.
pub fn renewal_time(cert_pem: &str) -> Option<i64> {
    let (not_before, not_after) = tugboat_pki::validity(cert_pem)?;
    let share = 0.7 + 0.2 * rand_fraction();
    Some(not_before + ((not_after - not_before) as f64 * share) as i64)
}

/// A number in [0, 1) from the clock's nanoseconds (jitter, not secrecy).
fn rand_fraction() -> f64 {
    let nanos = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}

fn unix_now() -> i64 {
    SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// The kubelet API's serving certificate, swapped in place when renewed.
pub type ServingCert = RotatingCert;

/// What to serve at start: the cluster-issued certificate kept in `dir` while it is valid,
/// else a self-signed one for the node's name and address (made once).
pub fn load_serving(dir: &Path, ca_pem: &str, node: &str, ip: Option<IpAddr>) -> anyhow::Result<Arc<ServingCert>> {
    std::fs::create_dir_all(dir)?;
    let issued = (
        std::fs::read_to_string(dir.join("kubelet-server.crt")),
        std::fs::read_to_string(dir.join("kubelet-server.key")),
    );
    let (cert, key) = match issued {
        (Ok(cert), Ok(key))
            if tugboat_pki::issued_by(&cert, ca_pem)
                && tugboat_pki::validity(&cert).is_some_and(|(_, until)| until > unix_now()) =>
        {
            (cert, key)
        }
        _ => self_signed(dir, node, ip)?,
    };
    RotatingCert::new(&cert, &key).map_err(anyhow::Error::msg)
}

/// A self-signed serving certificate for the node's name and address, kept in `dir`.
fn self_signed(dir: &Path, name: &str, ip: Option<IpAddr>) -> anyhow::Result<(String, String)> {
    let (cert_path, key_path) = (dir.join("kubelet.crt"), dir.join("kubelet.key"));
    if let (Ok(cert), Ok(key)) = (std::fs::read_to_string(&cert_path), std::fs::read_to_string(&key_path)) {
        return Ok((cert, key));
    }
    let mut names = vec![name.to_string()];
    names.extend(ip.map(|ip| ip.to_string()));
    let rcgen::CertifiedKey { cert, signing_key } = rcgen::generate_simple_self_signed(names)?;
    let (cert, key) = (cert.pem(), signing_key.serialize_pem());
    tugboat_pki::write_file(&key_path, key.as_bytes(), 0o600)?;
    tugboat_pki::write_file(&cert_path, cert.as_bytes(), 0o644)?;
    Ok((cert, key))
}

/// Keeps `serving` a certificate of the cluster CA for `node` (`ip`), renewed in time.
pub async fn keep_serving(
    client: kube::Client,
    serving: Arc<ServingCert>,
    dir: PathBuf,
    ca_pem: String,
    node: String,
    ip: Option<IpAddr>,
) {
    loop {
        let current = serving.pem();
        let due = if tugboat_pki::issued_by(&current, &ca_pem) { renewal_time(&current).unwrap_or(0) } else { 0 };
        let wait = (due - unix_now()).max(0) as u64;
        tokio::time::sleep(Duration::from_secs(wait)).await;
        let names = (vec![node.clone()], ip.into_iter().collect::<Vec<_>>());
        let asked = request(
            &client,
            KUBELET_SERVING,
            "csr-",
            &format!("system:node:{node}"),
            &["system:nodes"],
            (&names.0, &names.1),
            &["digital signature", "server auth"],
            Duration::from_secs(60),
        )
        .await
        .and_then(|(cert, key)| {
            tugboat_pki::write_file(&dir.join("kubelet-server.key"), key.as_bytes(), 0o600)?;
            tugboat_pki::write_file(&dir.join("kubelet-server.crt"), cert.as_bytes(), 0o644)?;
            serving.set(&cert, &key).map_err(anyhow::Error::msg)
        });
        match asked {
            Ok(()) => tracing::info!(node = %node, "serving certificate issued by the cluster"),
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "cannot get a serving certificate; asking again");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// The client identity of a kubeconfig file, read again whenever the file changes: a client
/// built on it presents a renewed certificate on its next connection.
#[derive(Debug)]
pub struct KubeconfigIdentity {
    path: PathBuf,
    cached: Mutex<Option<(SystemTime, Arc<CertifiedKey>)>>,
}

impl KubeconfigIdentity {
    /// `Some` when the kubeconfig's user has a client certificate (inline or in files).
    pub fn new(path: &Path) -> Option<Arc<KubeconfigIdentity>> {
        let identity = KubeconfigIdentity { path: path.to_path_buf(), cached: Mutex::new(None) };
        identity.current()?;
        Some(Arc::new(identity))
    }

    fn current(&self) -> Option<Arc<CertifiedKey>> {
        let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok()?;
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, key)) = cached.as_ref()
            && *at == modified
        {
            return Some(key.clone());
        }
        let (cert, key) = client_pem(&self.path)?;
        let key = tugboat_pki::tls::certified_key(&cert, &key).ok()?;
        *cached = Some((modified, key.clone()));
        Some(key)
    }
}

impl rustls::client::ResolvesClientCert for KubeconfigIdentity {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[rustls::SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        self.current()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// (certificate PEM, key PEM) of the current user of a kubeconfig file.
fn client_pem(path: &Path) -> Option<(String, String)> {
    use base64::Engine;
    let config = kube::config::Kubeconfig::read_from(path).ok()?;
    let context = config.current_context.as_deref();
    let user = config
        .contexts
        .iter()
        .find(|c| Some(c.name.as_str()) == context)
        .and_then(|c| c.context.as_ref())
        .map(|c| c.user.clone().unwrap_or_default());
    let info = config
        .auth_infos
        .iter()
        .find(|a| user.as_deref().is_none_or(|u| a.name == u))
        .and_then(|a| a.auth_info.as_ref())?;
    let decode = |b64: &str| String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64.trim()).ok()?).ok();
    let cert = match (&info.client_certificate_data, &info.client_certificate) {
        (Some(data), _) => decode(data)?,
        (None, Some(file)) => std::fs::read_to_string(file).ok()?,
        _ => return None,
    };
    let key = match (&info.client_key_data, &info.client_key) {
        (Some(data), _) => {
            use secrecy::ExposeSecret;
            decode(data.expose_secret())?
        }
        (None, Some(file)) => std::fs::read_to_string(file).ok()?,
        _ => return None,
    };
    Some((cert, key))
}

/// Renews the node client certificate of the kubeconfig at `path` (one of `system:node:<n>`;
/// other identities are left alone) by rewriting the file in place.
pub async fn keep_client(client: kube::Client, path: PathBuf) {
    let Some((cert, _)) = client_pem(&path) else { return };
    let Some((common_name, _)) = tugboat_pki::certificate_subject(&cert) else { return };
    let Some(node) = common_name.strip_prefix("system:node:").map(str::to_string) else { return };
    loop {
        let Some((cert, _)) = client_pem(&path) else { return };
        let due = renewal_time(&cert).unwrap_or(0);
        tokio::time::sleep(Duration::from_secs((due - unix_now()).max(0) as u64)).await;
        let renewed = async {
            let (cert, key) = request(
                &client,
                KUBELET_CLIENT,
                "csr-",
                &format!("system:node:{node}"),
                &["system:nodes"],
                (&[], &[]),
                &["digital signature", "client auth"],
                Duration::from_secs(60),
            )
            .await?;
            rewrite_identity(&path, &cert, &key)
        };
        match renewed.await {
            Ok(()) => tracing::info!(node = %node, kubeconfig = %path.display(), "client certificate renewed"),
            Err(error) => {
                tracing::warn!(error = %format!("{error:#}"), "cannot renew the client certificate; asking again");
                tokio::time::sleep(RETRY).await;
            }
        }
    }
}

/// Rewrites the kubeconfig at `path` with a new client certificate (same server, CA, user).
fn rewrite_identity(path: &Path, cert: &str, key: &str) -> anyhow::Result<()> {
    use base64::Engine;
    let config = kube::config::Kubeconfig::read_from(path)?;
    let cluster =
        config.clusters.first().and_then(|c| c.cluster.as_ref()).ok_or_else(|| anyhow::anyhow!("no cluster"))?;
    let server = cluster.server.clone().unwrap_or_default();
    let ca = cluster.certificate_authority_data.clone().unwrap_or_default();
    let ca = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(ca.trim())?)?;
    let user = config.auth_infos.first().map(|a| a.name.clone()).unwrap_or_default();
    let contents = tugboat_pki::client_cert_kubeconfig(&server, &ca, cert, key, &user);
    tugboat_pki::write_file(path, contents.as_bytes(), 0o600)?;
    Ok(())
}
