//! Certificates as rustls serves them, swappable while serving: a renewed certificate is used
//! from the next handshake on, without a restart.

use std::sync::{Arc, RwLock};

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// A PEM certificate (chain) and key as rustls signs with them.
pub fn certified_key(cert_pem: &str, key_pem: &str) -> Result<Arc<CertifiedKey>, String> {
    let certs: Vec<CertificateDer<'static>> =
        rustls_pemfile::certs(&mut cert_pem.as_bytes()).collect::<Result<_, _>>().map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no certificate".into());
    }
    let key: PrivateKeyDer<'static> =
        rustls_pemfile::private_key(&mut key_pem.as_bytes()).map_err(|e| e.to_string())?.ok_or("no private key")?;
    let key = rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| e.to_string())?;
    Ok(Arc::new(CertifiedKey::new(certs, key)))
}

/// A server's certificate of the moment.
#[derive(Debug)]
pub struct RotatingCert {
    current: RwLock<(Arc<CertifiedKey>, String)>,
}

impl RotatingCert {
    pub fn new(cert_pem: &str, key_pem: &str) -> Result<Arc<RotatingCert>, String> {
        Ok(Arc::new(RotatingCert { current: RwLock::new((certified_key(cert_pem, key_pem)?, cert_pem.to_string())) }))
    }

    /// The certificate served now (PEM).
    pub fn pem(&self) -> String {
        self.current.read().unwrap_or_else(|e| e.into_inner()).1.clone()
    }

    /// Serves `cert_pem` from the next handshake on.
    pub fn set(&self, cert_pem: &str, key_pem: &str) -> Result<(), String> {
        let key = certified_key(cert_pem, key_pem)?;
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = (key, cert_pem.to_string());
        Ok(())
    }
}

impl rustls::server::ResolvesServerCert for RotatingCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().unwrap_or_else(|e| e.into_inner()).0.clone())
    }
}
