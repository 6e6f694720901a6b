//! Tugboat's certificates: a cluster CA kept in the data dir, serving and client certificates
//! it signs, and kubeconfig files. Created on first start, reused on restarts.
//!
//! Files (keys are mode 0600): `<dir>/ca.crt`, `<dir>/ca.key`, and `<dir>/<name>.crt|.key` for
//! each issued certificate.
//!
//! It imports no other Tugboat crate.

pub mod bootstrap;
pub mod tls;

use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

/// What can go wrong with certificates and their files.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{}: {message}", path.display())]
    Invalid { path: PathBuf, message: String },
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
}

pub type Result<T, E = PkiError> = std::result::Result<T, E>;

/// The CA's lifetime; certificates it issues live [`CertSpec::validity`].
const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The cluster's certificate authority.
#[derive(Debug)]
pub struct ClusterCa {
    cert_pem: String,
    key: KeyPair,
    dir: PathBuf,
}

/// What a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Usage {
    Server,
    Client,
    /// Both (a member's certificate in etcd's way: kubeadm's etcd `server.crt`).
    ServerAndClient,
}

/// The extended key usages of `usage`.
fn key_usages(usage: Usage) -> Vec<ExtendedKeyUsagePurpose> {
    match usage {
        Usage::Server => vec![ExtendedKeyUsagePurpose::ServerAuth],
        Usage::Client => vec![ExtendedKeyUsagePurpose::ClientAuth],
        Usage::ServerAndClient => vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth],
    }
}

/// A certificate to issue.
#[derive(Debug, Clone)]
pub struct CertSpec {
    /// Subject CN: the user name for client certificates.
    pub common_name: String,
    /// Subject O: the groups for client certificates.
    pub organizations: Vec<String>,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<IpAddr>,
    pub usage: Usage,
    pub validity: Duration,
}

/// A certificate and its private key, PEM.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io { path: path.to_path_buf(), source })
}

/// Writes a file atomically (temp file, fsync, rename) with the given mode.
pub fn write_file(path: &Path, contents: &[u8], mode: u32) -> Result<()> {
    let io = |source| PkiError::Io { path: path.to_path_buf(), source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let temp = path.with_file_name(format!(".{name}.tmp"));
    let mut file =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&temp).map_err(io)?;
    file.write_all(contents).map_err(io)?;
    file.sync_all().map_err(io)?;
    std::fs::rename(&temp, path).map_err(io)
}

fn not_before() -> time::OffsetDateTime {
    // A little slack for clocks of other machines that run slightly behind.
    time::OffsetDateTime::now_utc() - time::Duration::minutes(5)
}

fn ca_params(common_name: &str) -> Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params.not_before = not_before();
    params.not_after = params.not_before + CA_VALIDITY;
    Ok(params)
}

impl ClusterCa {
    /// Loads the CA from `dir`, creating it on first use.
    pub fn load_or_create(dir: &Path) -> Result<ClusterCa> {
        ClusterCa::load_or_create_named(dir, "tugboat-ca")
    }

    /// The CA in `dir`, made with subject CN `common_name` if there is none (`etcd-ca` for
    /// the etcd API's, as kubeadm names it).
    pub fn load_or_create_named(dir: &Path, common_name: &str) -> Result<ClusterCa> {
        let (cert_path, key_path) = (dir.join("ca.crt"), dir.join("ca.key"));
        if cert_path.exists() && key_path.exists() {
            let cert_pem = read(&cert_path)?;
            let key = KeyPair::from_pem(&read(&key_path)?)
                .map_err(|e| PkiError::Invalid { path: key_path.clone(), message: e.to_string() })?;
            Issuer::from_ca_cert_pem(&cert_pem, &key)
                .map_err(|e| PkiError::Invalid { path: cert_path.clone(), message: e.to_string() })?;
            return Ok(ClusterCa { cert_pem, key, dir: dir.to_path_buf() });
        }
        let key = KeyPair::generate()?;
        let cert = ca_params(common_name)?.self_signed(&key)?;
        write_file(&key_path, key.serialize_pem().as_bytes(), 0o600)?;
        write_file(&cert_path, cert.pem().as_bytes(), 0o644)?;
        Ok(ClusterCa { cert_pem: cert.pem(), key, dir: dir.to_path_buf() })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// Where the CA certificate is.
    pub fn cert_path(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    /// Signs a new certificate for `spec`.
    pub fn sign(&self, spec: &CertSpec) -> Result<(String, String)> {
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key)
            .map_err(|e| PkiError::Invalid { path: self.cert_path(), message: e.to_string() })?;
        let mut params = CertificateParams::new(spec.dns_names.clone())?;
        params.subject_alt_names.extend(spec.ip_addresses.iter().map(|ip| SanType::IpAddress(*ip)));
        let mut name = DistinguishedName::new();
        for organization in &spec.organizations {
            name.push(DnType::OrganizationName, organization.as_str());
        }
        name.push(DnType::CommonName, spec.common_name.as_str());
        params.distinguished_name = name;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = key_usages(spec.usage);
        params.not_before = not_before();
        params.not_after = params.not_before + spec.validity;
        let key = KeyPair::generate()?;
        let cert = params.signed_by(&key, &issuer)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// Whether `cert_pem` still does for `spec`: issued by this CA, naming at least the
    /// spec's names, and further from expiry than [`RENEW_BEFORE`] (a third of the spec's
    /// validity for short-lived ones).
    pub fn current(&self, cert_pem: &str, spec: &CertSpec) -> bool {
        let margin = RENEW_BEFORE.min(spec.validity / 3).as_secs() as i64;
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        issued_by(cert_pem, &self.cert_pem)
            && validity(cert_pem).is_some_and(|(_, until)| until - now > margin)
            && names(cert_pem).is_some_and(|(dns, ips)| {
                spec.dns_names.iter().all(|d| dns.contains(d)) && spec.ip_addresses.iter().all(|i| ips.contains(i))
            })
    }

    /// The CA from its certificate and key files (`--cluster-signing-cert-file`, `-key-file`).
    pub fn from_files(cert: &Path, key: &Path) -> Result<ClusterCa> {
        let cert_pem = read(cert)?;
        let key = KeyPair::from_pem(&read(key)?)
            .map_err(|e| PkiError::Invalid { path: key.to_path_buf(), message: e.to_string() })?;
        Issuer::from_ca_cert_pem(&cert_pem, &key)
            .map_err(|e| PkiError::Invalid { path: cert.to_path_buf(), message: e.to_string() })?;
        Ok(ClusterCa { cert_pem, key, dir: cert.parent().unwrap_or(Path::new(".")).to_path_buf() })
    }

    /// Signs a PEM certificate signing request for `usage`, valid for `validity`; its subject
    /// and names are kept, its other wishes (a CA, other usages) are not.
    pub fn sign_request(&self, request_pem: &str, usage: Usage, validity: Duration) -> Result<String> {
        let invalid = |message: String| PkiError::Invalid { path: PathBuf::from("<request>"), message };
        let issuer = Issuer::from_ca_cert_pem(&self.cert_pem, &self.key).map_err(|e| invalid(e.to_string()))?;
        let mut request =
            rcgen::CertificateSigningRequestParams::from_pem(request_pem).map_err(|e| invalid(e.to_string()))?;
        let params = &mut request.params;
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = key_usages(usage);
        // Backdated for clocks running behind, but by no more than a tenth of a short life;
        // the validity counts from now.
        let now = time::OffsetDateTime::now_utc();
        params.not_before = now - validity.min(Duration::from_secs(3000)) / 10;
        params.not_after = now + validity;
        Ok(request.signed_by(&issuer).map_err(|e| invalid(e.to_string()))?.pem())
    }

    /// Loads `<dir>/<name>.crt|.key`, issuing them for `spec` when missing — or when what is
    /// there is due for renewal ([`ClusterCa::current`] says no): an expired or expiring
    /// certificate never stops a server.
    pub fn load_or_issue(&self, name: &str, spec: &CertSpec) -> Result<IssuedCert> {
        let (cert_path, key_path) = (self.dir.join(format!("{name}.crt")), self.dir.join(format!("{name}.key")));
        if cert_path.exists() && key_path.exists() {
            let cert_pem = read(&cert_path)?;
            if self.current(&cert_pem, spec) {
                return Ok(IssuedCert { key_pem: read(&key_path)?, cert_pem, cert_path, key_path });
            }
        }
        let (cert_pem, key_pem) = self.sign(spec)?;
        write_file(&key_path, key_pem.as_bytes(), 0o600)?;
        write_file(&cert_path, cert_pem.as_bytes(), 0o644)?;
        Ok(IssuedCert { cert_pem, key_pem, cert_path, key_path })
    }
}

/// A new key and a certificate signing request (PEM) for subject `common_name`/`organizations`.
pub fn certificate_request(common_name: &str, organizations: &[&str]) -> Result<(String, String)> {
    certificate_request_for(common_name, organizations, &[], &[])
}

/// [`certificate_request`] naming `dns_names` and `ip_addresses` too (a serving certificate).
pub fn certificate_request_for(
    common_name: &str,
    organizations: &[&str],
    dns_names: &[String],
    ip_addresses: &[IpAddr],
) -> Result<(String, String)> {
    let mut params = CertificateParams::new(dns_names.to_vec())?;
    params.subject_alt_names.extend(ip_addresses.iter().map(|ip| SanType::IpAddress(*ip)));
    let mut name = DistinguishedName::new();
    for organization in organizations {
        name.push(DnType::OrganizationName, *organization);
    }
    name.push(DnType::CommonName, common_name);
    params.distinguished_name = name;
    let key = KeyPair::generate()?;
    let request = params.serialize_request(&key)?;
    Ok((request.pem()?, key.serialize_pem()))
}

/// The subject of a PEM certificate signing request: (common name, organizations).
pub fn request_subject(request_pem: &str) -> Option<(String, Vec<String>)> {
    let request = rcgen::CertificateSigningRequestParams::from_pem(request_pem).ok()?;
    let text = |value: &rcgen::DnValue| match value {
        rcgen::DnValue::PrintableString(s) => Some(s.to_string()),
        rcgen::DnValue::Utf8String(s) => Some(s.clone()),
        _ => None,
    };
    let mut common_name = None;
    let mut organizations = Vec::new();
    for (kind, value) in request.params.distinguished_name.iter() {
        match kind {
            DnType::CommonName => common_name = text(value),
            DnType::OrganizationName => organizations.extend(text(value)),
            _ => {}
        }
    }
    Some((common_name?, organizations))
}

/// A kubeconfig whose user authenticates with a bearer `token`.
pub fn token_kubeconfig(server: &str, ca_pem: &str, token: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: tugboat\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\n\
         users:\n- name: bootstrap\n  user:\n    token: {token}\ncontexts:\n- name: tugboat\n  context:\n    cluster: tugboat\n    user: bootstrap\n\
         current-context: tugboat\n",
        STANDARD.encode(ca_pem.as_bytes())
    )
}

/// When a PEM certificate became valid and when it expires (Unix seconds).
pub fn validity(cert_pem: &str) -> Option<(i64, i64)> {
    let der = pem_der(cert_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let validity = cert.validity();
    Some((validity.not_before.timestamp(), validity.not_after.timestamp()))
}

/// Certificates closer to expiry than this are issued anew.
pub const RENEW_BEFORE: Duration = Duration::from_secs(90 * 24 * 3600);

/// The DNS names and IP addresses a PEM certificate names.
pub fn names(cert_pem: &str) -> Option<(Vec<String>, Vec<IpAddr>)> {
    use x509_parser::extensions::GeneralName;
    let der = pem_der(cert_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let (mut dns, mut ips) = (Vec::new(), Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(name) => dns.push((*name).to_string()),
                GeneralName::IPAddress(bytes) => match bytes.len() {
                    4 => ips.push(IpAddr::from(<[u8; 4]>::try_from(*bytes).ok()?)),
                    16 => ips.push(IpAddr::from(<[u8; 16]>::try_from(*bytes).ok()?)),
                    _ => {}
                },
                _ => {}
            }
        }
    }
    Some((dns, ips))
}

/// The subject of a PEM certificate: (common name, organizations).
pub fn certificate_subject(cert_pem: &str) -> Option<(String, Vec<String>)> {
    der_subject(&pem_der(cert_pem)?)
}

/// The subject of a DER certificate (as a TLS peer presents it): (common name, organizations),
/// the user and groups Kubernetes reads from a client certificate.
pub fn der_subject(der: &[u8]) -> Option<(String, Vec<String>)> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let subject = cert.subject();
    let common_name = subject.iter_common_name().next()?.as_str().ok()?.to_string();
    let organizations = subject.iter_organization().filter_map(|o| o.as_str().ok().map(str::to_string)).collect();
    Some((common_name, organizations))
}

/// Whether a PEM certificate was issued by the CA of `ca_pem` (by subject and signature).
pub fn issued_by(cert_pem: &str, ca_pem: &str) -> bool {
    let (Some(cert), Some(ca)) = (pem_der(cert_pem), pem_der(ca_pem)) else { return false };
    let (Ok((_, cert)), Ok((_, ca))) =
        (x509_parser::parse_x509_certificate(&cert), x509_parser::parse_x509_certificate(&ca))
    else {
        return false;
    };
    cert.issuer() == ca.subject() && cert.verify_signature(Some(ca.public_key())).is_ok()
}

/// kubeadm's CA hash: `sha256:` and the hex SHA-256 of the certificate's SubjectPublicKeyInfo.
pub fn ca_cert_hash(ca_pem: &str) -> Option<String> {
    let der = pem_der(ca_pem)?;
    let (_, cert) = x509_parser::parse_x509_certificate(&der).ok()?;
    let digest = ring::digest::digest(&ring::digest::SHA256, cert.tbs_certificate.subject_pki.raw);
    Some(format!("sha256:{}", digest.as_ref().iter().map(|b| format!("{b:02x}")).collect::<String>()))
}

fn pem_der(pem: &str) -> Option<Vec<u8>> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(body.trim()).ok()
}

/// A kubeconfig with one cluster, one user authenticated by a client certificate, and one
/// context, all named `tugboat`.
pub fn client_cert_kubeconfig(server: &str, ca_pem: &str, cert_pem: &str, key_pem: &str, user: &str) -> String {
    let b64 = |s: &str| STANDARD.encode(s.as_bytes());
    format!(
        "apiVersion: v1
kind: Config
clusters:
- name: tugboat
  cluster:
    server: {server}
    certificate-authority-data: {ca}
users:
- name: {user}
  user:
    client-certificate-data: {cert}
    client-key-data: {key}
contexts:
- name: tugboat
  context:
    cluster: tugboat
    user: {user}
current-context: tugboat
preferences: {{}}
",
        ca = b64(ca_pem),
        cert = b64(cert_pem),
        key = b64(key_pem),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(usage: Usage) -> CertSpec {
        CertSpec {
            common_name: "kubernetes-admin".into(),
            organizations: vec!["system:masters".into()],
            dns_names: vec!["localhost".into()],
            ip_addresses: vec!["127.0.0.1".parse().unwrap()],
            usage,
            validity: Duration::from_secs(3600),
        }
    }

    #[test]
    fn the_ca_and_issued_certificates_are_created_once_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::load_or_create(dir.path()).unwrap();
        let issued = ca.load_or_issue("admin", &spec(Usage::Client)).unwrap();
        assert!(issued.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let mode = std::fs::metadata(&issued.key_path).unwrap().permissions();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.mode() & 0o777, 0o600, "keys are private");

        let again = ClusterCa::load_or_create(dir.path()).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
        let reissued = again.load_or_issue("admin", &spec(Usage::Client)).unwrap();
        assert_eq!(reissued.cert_pem, issued.cert_pem);
    }

    #[test]
    fn certificates_due_for_renewal_or_missing_names_are_issued_anew() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::load_or_create(dir.path()).unwrap();
        let year = CertSpec { validity: Duration::from_secs(365 * 24 * 3600), ..spec(Usage::Server) };
        // Ten days left of what is on disk: a year's certificate is issued instead.
        let short = CertSpec { validity: Duration::from_secs(10 * 24 * 3600), ..spec(Usage::Server) };
        let first = ca.load_or_issue("apiserver", &short).unwrap();
        assert!(!ca.current(&first.cert_pem, &year));
        let renewed = ca.load_or_issue("apiserver", &year).unwrap();
        assert_ne!(renewed.cert_pem, first.cert_pem);
        let (_, until) = validity(&renewed.cert_pem).unwrap();
        assert!(until - time::OffsetDateTime::now_utc().unix_timestamp() > 300 * 24 * 3600);
        assert_eq!(ca.load_or_issue("apiserver", &year).unwrap().cert_pem, renewed.cert_pem, "current: kept");
        // A new address to serve on: issued again, naming it.
        let mut moved = year.clone();
        moved.ip_addresses.push("10.0.0.7".parse().unwrap());
        let named = ca.load_or_issue("apiserver", &moved).unwrap();
        assert_ne!(named.cert_pem, renewed.cert_pem);
        assert!(names(&named.cert_pem).unwrap().1.contains(&"10.0.0.7".parse().unwrap()));
        // Another CA's certificate is not kept either.
        let other = ClusterCa::load_or_create(tempfile::tempdir().unwrap().path()).unwrap();
        assert!(!other.current(&named.cert_pem, &moved));
    }

    #[test]
    fn a_damaged_ca_key_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        ClusterCa::load_or_create(dir.path()).unwrap();
        std::fs::write(dir.path().join("ca.key"), "not a key").unwrap();
        let error = ClusterCa::load_or_create(dir.path()).unwrap_err();
        assert!(error.to_string().contains("ca.key"), "{error}");
    }

    #[test]
    fn requests_are_made_read_and_signed() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::load_or_create(dir.path()).unwrap();
        let (request, key) = certificate_request("system:node:n1", &["system:nodes"]).unwrap();
        assert!(request.starts_with("-----BEGIN CERTIFICATE REQUEST-----") && key.contains("PRIVATE KEY"));
        assert_eq!(
            request_subject(&request).unwrap(),
            ("system:node:n1".to_string(), vec!["system:nodes".to_string()])
        );
        let cert = ca.sign_request(&request, Usage::Client, Duration::from_secs(3600)).unwrap();
        assert!(cert.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(ca.sign_request("not a request", Usage::Client, Duration::from_secs(1)).is_err());
        assert!(request_subject("garbage").is_none());
        let again = ClusterCa::from_files(&dir.path().join("ca.crt"), &dir.path().join("ca.key")).unwrap();
        assert_eq!(again.cert_pem(), ca.cert_pem());
    }
}
