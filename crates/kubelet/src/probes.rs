//! Liveness, readiness and startup probes (exec, httpGet, tcpSocket), as upstream's prober:
//! a probe runs every `periodSeconds` once `initialDelaySeconds` have passed since the
//! container started, times out after `timeoutSeconds`, and its result flips only after
//! `successThreshold` successes or `failureThreshold` failures in a row.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container as ContainerSpec, LifecycleHandler, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Kind {
    Startup,
    Liveness,
    Readiness,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Startup => "Startup",
            Kind::Liveness => "Liveness",
            Kind::Readiness => "Readiness",
        }
    }
    pub fn probe(self, c: &ContainerSpec) -> Option<&Probe> {
        match self {
            Kind::Startup => c.startup_probe.as_ref(),
            Kind::Liveness => c.liveness_probe.as_ref(),
            Kind::Readiness => c.readiness_probe.as_ref(),
        }
    }
}

/// One probe's running state for one container instance.
#[derive(Debug, Clone)]
pub struct ProbeState {
    /// The current result: readiness starts false, liveness and startup "true until failed"
    /// (startup: not passed until it succeeds).
    pub ok: bool,
    successes: i32,
    failures: i32,
    last: Option<Instant>,
}

impl ProbeState {
    pub fn new(kind: Kind) -> ProbeState {
        ProbeState { ok: kind == Kind::Liveness, successes: 0, failures: 0, last: None }
    }

    /// Whether the probe should run now, for a container started at `started`.
    pub fn due(&self, probe: &Probe, started: Instant, now: Instant) -> bool {
        let delay = Duration::from_secs(probe.initial_delay_seconds.unwrap_or(0).max(0) as u64);
        if now < started + delay {
            return false;
        }
        let period = Duration::from_secs(probe.period_seconds.unwrap_or(10).max(1) as u64);
        self.last.is_none_or(|last| now >= last + period)
    }

    /// Records a result; returns true when the state flipped.
    pub fn record(&mut self, probe: &Probe, success: bool, now: Instant) -> bool {
        self.last = Some(now);
        let before = self.ok;
        if success {
            self.failures = 0;
            self.successes += 1;
            if self.successes >= probe.success_threshold.unwrap_or(1).max(1) {
                self.ok = true;
            }
        } else {
            self.successes = 0;
            self.failures += 1;
            if self.failures >= probe.failure_threshold.unwrap_or(3).max(1) {
                self.ok = false;
            }
        }
        before != self.ok
    }

    pub fn failures(&self) -> i32 {
        self.failures
    }
}

/// How a probe reaches the container.
#[derive(Debug)]
pub struct Target {
    pub ip: Option<IpAddr>,
    /// Runs the exec probe's command in the container; returns its exit code and output.
    pub exec: Option<tokio::process::Command>,
}

fn port(port: &IntOrString, c: &ContainerSpec) -> Result<u16, String> {
    match port {
        IntOrString::Int(p) => u16::try_from(*p).map_err(|_| format!("invalid port {p}")),
        IntOrString::String(name) => c
            .ports
            .iter()
            .flatten()
            .find(|p| p.name.as_deref() == Some(name.as_str()))
            .and_then(|p| u16::try_from(p.container_port).ok())
            .ok_or_else(|| format!("port {name:?} is not a named port of container {}", c.name)),
    }
}

/// Runs a lifecycle hook (postStart, preStop: exec, httpGet, tcpSocket or sleep) for at most
/// `limit`: Ok(()) on success, Err(why) on failure.
pub async fn hook(
    handler: &LifecycleHandler,
    c: &ContainerSpec,
    target: Target,
    limit: Duration,
) -> Result<(), String> {
    if let Some(sleep) = &handler.sleep {
        tokio::time::sleep(Duration::from_secs(sleep.seconds.max(0) as u64).min(limit)).await;
        return Ok(());
    }
    let probe = Probe {
        exec: handler.exec.clone(),
        http_get: handler.http_get.clone(),
        tcp_socket: handler.tcp_socket.clone(),
        timeout_seconds: Some(limit.as_secs().clamp(1, i32::MAX as u64) as i32),
        ..Probe::default()
    };
    run(&probe, c, target).await
}

/// Runs one probe: Ok(()) on success, Err(why) on failure.
pub async fn run(probe: &Probe, c: &ContainerSpec, target: Target) -> Result<(), String> {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    let work = async {
        if probe.exec.is_some() {
            let mut command = target.exec.ok_or("exec probes need a running container")?;
            command.kill_on_drop(true);
            let output = command.output().await.map_err(|e| e.to_string())?;
            if output.status.success() {
                return Ok(());
            }
            let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
            text.push_str(&String::from_utf8_lossy(&output.stderr));
            return Err(if text.trim().is_empty() {
                format!("command exited with {}", output.status.code().unwrap_or(-1))
            } else {
                text.trim().to_string()
            });
        }
        if let Some(tcp) = &probe.tcp_socket {
            let port = port(&tcp.port, c)?;
            let host = tcp.host.clone().or_else(|| target.ip.map(|i| i.to_string())).ok_or("no pod IP")?;
            tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| format!("dial tcp {host}:{port}: {e}"))?;
            return Ok(());
        }
        if let Some(http) = &probe.http_get {
            let port = port(&http.port, c)?;
            let host = http.host.clone().or_else(|| target.ip.map(|i| i.to_string())).ok_or("no pod IP")?;
            let https = http.scheme.as_deref().is_some_and(|s| s.eq_ignore_ascii_case("HTTPS"));
            let scheme = if https { "https" } else { "http" };
            let path = http.path.clone().filter(|p| !p.is_empty()).unwrap_or_else(|| "/".into());
            let mut request = format!(
                "GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nUser-Agent: kube-probe/1.33\r\nAccept: */*\r\nConnection: close\r\n"
            );
            for h in http.http_headers.iter().flatten() {
                request.push_str(&format!("{}: {}\r\n", h.name, h.value));
            }
            request.push_str("\r\n");
            let stream = tokio::net::TcpStream::connect((host.as_str(), port))
                .await
                .map_err(|e| format!("Get \"{scheme}://{host}:{port}{path}\": dial tcp {host}:{port}: {e}"))?;
            let head = if https {
                // As upstream's prober: TLS without verifying the certificate.
                let name = rustls::pki_types::ServerName::try_from(host.clone()).map_err(|e| e.to_string())?;
                let tls = tokio_rustls::TlsConnector::from(insecure_tls()).connect(name, stream).await;
                let tls = tls.map_err(|e| format!("Get \"https://{host}:{port}{path}\": {e}"))?;
                exchange(tls, &request).await?
            } else {
                exchange(stream, &request).await?
            };
            let line = String::from_utf8_lossy(&head);
            let code: u16 =
                line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or("malformed HTTP response")?;
            return if (200..400).contains(&code) {
                Ok(())
            } else {
                Err(format!("HTTP probe failed with statuscode: {code}"))
            };
        }
        if let Some(grpc) = &probe.grpc {
            let host = target.ip.map(|i| i.to_string()).ok_or("no pod IP")?;
            let port = u16::try_from(grpc.port).map_err(|_| format!("invalid port {}", grpc.port))?;
            return grpc_health(&host, port, grpc.service.as_deref().unwrap_or_default()).await;
        }
        Err("the probe has no handler".into())
    };
    match tokio::time::timeout(timeout, work).await {
        Ok(result) => result,
        Err(_) => Err(format!("probe timed out after {}s", timeout.as_secs())),
    }
}

/// A gRPC probe, as upstream's: the standard health service's `Check`
/// (`grpc.health.v1.Health/Check`, over HTTP/2 without TLS) for `service` ("" for the
/// server as a whole); only `SERVING` passes.
async fn grpc_health(host: &str, port: u16, service: &str) -> Result<(), String> {
    use http_body_util::BodyExt;
    let target = format!("{host}:{port}");
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .map_err(|e| format!("timeout: failed to connect service {target:?} within the probe's time: {e}"))?;
    let (mut sender, connection) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .map_err(|e| format!("failed to connect service {target:?}: {e}"))?;
    tokio::spawn(connection);
    // HealthCheckRequest { string service = 1; }, in a gRPC frame (uncompressed, length).
    let mut message = Vec::new();
    if !service.is_empty() {
        message.push(0x0a);
        let mut len = service.len();
        while len >= 0x80 {
            message.push((len as u8) | 0x80);
            len >>= 7;
        }
        message.push(len as u8);
        message.extend_from_slice(service.as_bytes());
    }
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let request = hyper::Request::post(format!("http://{target}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .header("user-agent", "kube-probe/1.33")
        .body(http_body_util::Full::new(bytes::Bytes::from(frame)))
        .map_err(|e| e.to_string())?;
    let response = sender.send_request(request).await.map_err(|e| format!("rpc error: {e}"))?;
    if response.status() != hyper::StatusCode::OK {
        return Err(format!("rpc error: HTTP status {}", response.status()));
    }
    let headers = response.headers().clone();
    let collected = response.into_body().collect().await.map_err(|e| format!("rpc error: {e}"))?;
    // grpc-status comes in the trailers, or in the headers of a trailers-only answer.
    let trailers = collected.trailers().cloned().unwrap_or_default();
    let status =
        |name: &str| trailers.get(name).or_else(|| headers.get(name)).and_then(|v| v.to_str().ok()).map(str::to_string);
    let code = status("grpc-status").unwrap_or_else(|| "0".into());
    if code != "0" {
        let message = status("grpc-message").unwrap_or_default();
        return Err(format!("rpc error: code = {code} desc = {message}"));
    }
    // HealthCheckResponse { ServingStatus status = 1; } after the 5-byte frame header.
    let body = collected.to_bytes();
    let serving = match body.get(5..) {
        Some([0x08, value, ..]) => *value,
        _ => 0,
    };
    match serving {
        1 => Ok(()),
        2 => Err("service unhealthy (responded with \"NOT_SERVING\")".into()),
        3 => Err("service unhealthy (responded with \"SERVICE_UNKNOWN\")".into()),
        _ => Err("service unhealthy (responded with \"UNKNOWN\")".into()),
    }
}

/// Sends `request` and reads the start of the answer (its status line).
async fn exchange<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut stream: S,
    request: &str,
) -> Result<Vec<u8>, String> {
    stream.write_all(request.as_bytes()).await.map_err(|e| e.to_string())?;
    let mut head = vec![0u8; 1024];
    let n = stream.read(&mut head).await.map_err(|e| e.to_string())?;
    head.truncate(n);
    Ok(head)
}

/// A TLS client that accepts any server certificate: what upstream's HTTPS probes and
/// lifecycle hooks use (`InsecureSkipVerify`), since a pod's certificate names nothing the
/// kubelet could check.
fn insecure_tls() -> std::sync::Arc<rustls::ClientConfig> {
    static CONFIG: std::sync::OnceLock<std::sync::Arc<rustls::ClientConfig>> = std::sync::OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
            let config = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .dangerous()
                .with_custom_certificate_verifier(std::sync::Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            std::sync::Arc::new(config)
        })
        .clone()
}

/// Accepts every certificate, checking only that the handshake's signatures are sound.
#[derive(Debug)]
struct AnyCertificate(std::sync::Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &rustls::pki_types::CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(json: serde_json::Value) -> Probe {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn thresholds_flip_the_result() {
        let p = probe(serde_json::json!({"failureThreshold": 2, "successThreshold": 2}));
        let now = Instant::now();
        let mut s = ProbeState::new(Kind::Readiness);
        assert!(!s.ok);
        assert!(!s.record(&p, true, now));
        assert!(s.record(&p, true, now) && s.ok);
        assert!(!s.record(&p, false, now) && s.ok);
        assert!(s.record(&p, false, now) && !s.ok);
        let mut l = ProbeState::new(Kind::Liveness);
        assert!(l.ok);
        let p = probe(serde_json::json!({}));
        l.record(&p, false, now);
        l.record(&p, false, now);
        assert!(l.ok, "three failures by default");
        assert!(l.record(&p, false, now) && !l.ok);
    }

    #[test]
    fn probes_wait_for_the_initial_delay_and_the_period() {
        let p = probe(serde_json::json!({"initialDelaySeconds": 5, "periodSeconds": 2}));
        let start = Instant::now();
        let mut s = ProbeState::new(Kind::Liveness);
        assert!(!s.due(&p, start, start + Duration::from_secs(4)));
        assert!(s.due(&p, start, start + Duration::from_secs(5)));
        s.record(&p, true, start + Duration::from_secs(5));
        assert!(!s.due(&p, start, start + Duration::from_secs(6)));
        assert!(s.due(&p, start, start + Duration::from_secs(7)));
    }

    #[tokio::test]
    async fn https_probes_skip_certificate_checks_as_upstream() {
        // A server with a self-signed certificate naming nothing the prober dials.
        let key = rcgen::KeyPair::generate().unwrap();
        let cert =
            rcgen::CertificateParams::new(vec!["webhook.example".to_string()]).unwrap().self_signed(&key).unwrap();
        let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(std::sync::Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let Ok(mut tls) = acceptor.accept(tcp).await else { continue };
                let mut buf = [0u8; 1024];
                let n = tls.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).to_string();
                let code = if request.starts_with("GET /readyz ") { 200 } else { 503 };
                let _ = tls.write_all(format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n").as_bytes()).await;
                let _ = tls.shutdown().await;
            }
        });
        let c: ContainerSpec = serde_json::from_value(serde_json::json!({"name": "c"})).unwrap();
        let target = || Target { ip: Some("127.0.0.1".parse().unwrap()), exec: None };
        let ready = probe(serde_json::json!({"httpGet": {"port": port, "path": "/readyz", "scheme": "HTTPS"}}));
        assert_eq!(run(&ready, &c, target()).await, Ok(()));
        let not = probe(serde_json::json!({"httpGet": {"port": port, "path": "/other", "scheme": "HTTPS"}}));
        assert_eq!(run(&not, &c, target()).await, Err("HTTP probe failed with statuscode: 503".into()));
        // Plain HTTP to a TLS port fails (the answer is not HTTP), as upstream's would.
        let plain = probe(serde_json::json!({"httpGet": {"port": port, "path": "/readyz"}}));
        assert!(run(&plain, &c, target()).await.is_err());
    }

    /// A gRPC health server over HTTP/2 (hyper): "" and "db" are SERVING, "cache" is
    /// NOT_SERVING, anything else is unknown (grpc-status 5, trailers only).
    async fn grpc_health_server() -> u16 {
        use http_body_util::{BodyExt, StreamBody};
        use hyper::body::Frame;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let service = hyper::service::service_fn(|request: hyper::Request<hyper::body::Incoming>| async move {
                    assert_eq!(request.uri().path(), "/grpc.health.v1.Health/Check");
                    let body = request.into_body().collect().await.unwrap().to_bytes();
                    let service = String::from_utf8_lossy(body.get(7..).unwrap_or_default()).to_string();
                    let mut trailers = hyper::HeaderMap::new();
                    let frames: Vec<Result<Frame<bytes::Bytes>, std::convert::Infallible>> = match service.as_str() {
                        "" | "db" | "cache" => {
                            let serving = if service == "cache" { 2 } else { 1 };
                            trailers.insert("grpc-status", "0".parse().unwrap());
                            vec![
                                Ok(Frame::data(bytes::Bytes::from(vec![0, 0, 0, 0, 2, 0x08, serving]))),
                                Ok(Frame::trailers(trailers)),
                            ]
                        }
                        _ => {
                            trailers.insert("grpc-status", "5".parse().unwrap());
                            trailers.insert("grpc-message", "unknown service".parse().unwrap());
                            vec![Ok(Frame::trailers(trailers))]
                        }
                    };
                    let response = hyper::Response::builder()
                        .header("content-type", "application/grpc")
                        .body(StreamBody::new(futures::stream::iter(frames)))
                        .unwrap();
                    Ok::<_, std::convert::Infallible>(response)
                });
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service),
                );
            }
        });
        port
    }

    #[tokio::test]
    async fn grpc_probes_ask_the_health_service() {
        let port = grpc_health_server().await;
        let c: ContainerSpec = serde_json::from_value(serde_json::json!({"name": "c"})).unwrap();
        let target = || Target { ip: Some("127.0.0.1".parse().unwrap()), exec: None };
        let grpc = |service: Option<&str>| probe(serde_json::json!({"grpc": {"port": port, "service": service}}));
        assert_eq!(run(&grpc(None), &c, target()).await, Ok(()));
        assert_eq!(run(&grpc(Some("db")), &c, target()).await, Ok(()));
        assert_eq!(
            run(&grpc(Some("cache")), &c, target()).await,
            Err("service unhealthy (responded with \"NOT_SERVING\")".into())
        );
        assert_eq!(
            run(&grpc(Some("queue")), &c, target()).await,
            Err("rpc error: code = 5 desc = unknown service".into())
        );
        // Nothing listening: a failure, not a hang.
        let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap().port();
        let nothing = probe(serde_json::json!({"grpc": {"port": closed}}));
        assert!(run(&nothing, &c, target()).await.is_err());
    }

    #[tokio::test]
    async fn tcp_and_http_probes_reach_a_server() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            let mut served = 0;
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let request = String::from_utf8_lossy(&buf[..n]).to_string();
                let code = if request.starts_with("GET /bad ") { 500 } else { 200 };
                let _ = s.write_all(format!("HTTP/1.1 {code} X\r\nContent-Length: 0\r\n\r\n").as_bytes()).await;
                served += 1;
                if served == 3 {
                    break;
                }
            }
        });
        let c: ContainerSpec =
            serde_json::from_value(serde_json::json!({"name": "c", "ports": [{"name": "web", "containerPort": port}]}))
                .unwrap();
        let target = || Target { ip: Some("127.0.0.1".parse().unwrap()), exec: None };
        let tcp = probe(serde_json::json!({"tcpSocket": {"port": "web"}}));
        assert_eq!(run(&tcp, &c, target()).await, Ok(()));
        let good = probe(serde_json::json!({"httpGet": {"port": port, "path": "/ok"}}));
        assert_eq!(run(&good, &c, target()).await, Ok(()));
        let bad = probe(serde_json::json!({"httpGet": {"port": port, "path": "/bad"}}));
        assert_eq!(run(&bad, &c, target()).await, Err("HTTP probe failed with statuscode: 500".into()));
        let unnamed = probe(serde_json::json!({"tcpSocket": {"port": "nope"}}));
        assert!(run(&unnamed, &c, target()).await.unwrap_err().contains("not a named port"));
    }
}
