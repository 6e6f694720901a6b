//! How the API server verifies the servers it calls (admission and conversion webhooks,
//! aggregated APIs, the cluster's own workloads through the proxy).

use std::sync::Arc;

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};

/// A verifier that takes whatever certificate a server shows (upstream's proxy transport does
/// not verify the cluster's own workloads either; an APIService may say to skip verification).
pub(crate) fn any_certificate(provider: Arc<CryptoProvider>) -> Arc<dyn ServerCertVerifier> {
    Arc::new(Verifier { provider, bundle: None })
}

/// A verifier for a `caBundle` (PEM, as configurations give it; none: nothing is trusted, as the
/// server has no system roots of its own). As Go's crypto/tls (what upstream's API server calls
/// with): a server may show a certificate of the bundle itself, even one marked as a CA (kopf's
/// self-signed certificates are; webpki alone refuses those with `CaUsedAsEndEntity`), when it
/// is valid now and for the name asked for.
pub(crate) fn trusting(provider: Arc<CryptoProvider>, pem: &[u8]) -> Result<Arc<dyn ServerCertVerifier>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let mut certificates = Vec::new();
    for cert in rustls_pemfile::certs(&mut &pem[..]) {
        let cert = cert.map_err(|e| format!("caBundle: {e}"))?;
        roots.add(cert.clone()).map_err(|e| format!("caBundle: {e}"))?;
        certificates.push(cert);
    }
    let webpki = if roots.is_empty() {
        None
    } else {
        Some(
            WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider.clone())
                .build()
                .map_err(|e| format!("caBundle: {e}"))?,
        )
    };
    Ok(Arc::new(Verifier { provider, bundle: Some(Bundle { webpki, certificates }) }))
}

#[derive(Debug)]
struct Bundle {
    webpki: Option<Arc<WebPkiServerVerifier>>,
    certificates: Vec<CertificateDer<'static>>,
}

#[derive(Debug)]
struct Verifier {
    provider: Arc<CryptoProvider>,
    /// `None`: anything goes.
    bundle: Option<Bundle>,
}

impl Bundle {
    fn verify(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let refused = match &self.webpki {
            Some(webpki) => match webpki.verify_server_cert(end_entity, intermediates, name, ocsp, now) {
                Ok(verified) => return Ok(verified),
                Err(error) => error,
            },
            None => rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        };
        if !self.certificates.iter().any(|trusted| trusted.as_ref() == end_entity.as_ref()) {
            return Err(refused);
        }
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_name(&parsed, name)?;
        let (_, certificate) = x509_parser::parse_x509_certificate(end_entity.as_ref())
            .map_err(|_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding))?;
        let now = now.as_secs() as i64;
        let validity = certificate.validity();
        if now < validity.not_before.timestamp() {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::NotValidYet));
        }
        if now > validity.not_after.timestamp() {
            return Err(rustls::Error::InvalidCertificate(rustls::CertificateError::Expired));
        }
        Ok(ServerCertVerified::assertion())
    }
}

impl ServerCertVerifier for Verifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match &self.bundle {
            None => Ok(ServerCertVerified::assertion()),
            Some(bundle) => bundle.verify(end_entity, intermediates, name, ocsp, now),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn self_signed(name: &str, ca: bool) -> (CertificateDer<'static>, String) {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
        if ca {
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        }
        let cert = params.self_signed(&key).unwrap();
        (cert.der().clone(), cert.pem())
    }

    fn verify(verifier: &dyn ServerCertVerifier, cert: &CertificateDer<'_>, name: &str) -> Result<(), rustls::Error> {
        let name = ServerName::try_from(name.to_string()).unwrap();
        verifier.verify_server_cert(cert, &[], &name, &[], UnixTime::now()).map(|_| ())
    }

    #[test]
    fn a_bundles_own_certificate_is_trusted_for_its_names_even_as_a_ca() {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // kopf's kind: self-signed, marked as a CA, shown by the server itself.
        let (kopf, pem) = self_signed("127.0.0.1", true);
        let verifier = trusting(provider.clone(), pem.as_bytes()).unwrap();
        verify(verifier.as_ref(), &kopf, "127.0.0.1").unwrap();
        assert!(verify(verifier.as_ref(), &kopf, "webhook.default.svc").is_err(), "another name");
        // A certificate the bundle does not hold, CA or not, is refused.
        let (other, _) = self_signed("127.0.0.1", true);
        assert!(verify(verifier.as_ref(), &other, "127.0.0.1").is_err());
        let (leaf, leaf_pem) = self_signed("webhook.default.svc", false);
        assert!(verify(verifier.as_ref(), &leaf, "webhook.default.svc").is_err());
        // Nothing trusted without a bundle; anything without verification.
        assert!(verify(trusting(provider.clone(), b"").unwrap().as_ref(), &kopf, "127.0.0.1").is_err());
        verify(any_certificate(provider.clone()).as_ref(), &other, "anything.example").unwrap();
        // An ordinary self-signed leaf in the bundle: webpki's own path.
        let verifier = trusting(provider, leaf_pem.as_bytes()).unwrap();
        verify(verifier.as_ref(), &leaf, "webhook.default.svc").unwrap();
    }
}
