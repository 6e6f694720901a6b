//! The agent's way to several servers: a TCP forwarder on loopback that the node's clients
//! use as their API server. Each connection goes to the server that last answered, else to
//! the next one that accepts; TLS passes through untouched (every server's certificate names
//! 127.0.0.1, and the client checks it against the cluster CA as usual). When a server dies
//! its connections break, the clients reconnect, and the forwarder carries them to another.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::Context;
use tokio::net::{TcpListener, TcpStream};

/// How long to wait for one server to accept before trying the next.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// `host:port` of an `https://host[:port]` server URL.
fn authority(url: &str) -> anyhow::Result<String> {
    let rest = url.strip_prefix("https://").with_context(|| format!("--server {url:?} is not an https:// URL"))?;
    let host_port = rest.split('/').next().unwrap_or_default();
    anyhow::ensure!(!host_port.is_empty(), "--server {url:?} names no host");
    let has_port = match host_port.strip_prefix('[') {
        Some(v6) => v6.contains("]:"),
        None => host_port.contains(':'),
    };
    Ok(if has_port { host_port.to_string() } else { format!("{host_port}:443") })
}

/// Starts forwarding `127.0.0.1:<free port>` to `servers`; returns the URL to use instead.
pub async fn start(servers: &[String]) -> anyhow::Result<String> {
    let targets: Vec<String> = servers.iter().map(|s| authority(s)).collect::<anyhow::Result<_>>()?;
    anyhow::ensure!(!targets.is_empty(), "give at least one --server");
    let listener = TcpListener::bind((std::net::Ipv4Addr::LOCALHOST, 0)).await.context("binding the local balancer")?;
    let local: SocketAddr = listener.local_addr()?;
    let targets = Arc::new(targets);
    let preferred = Arc::new(AtomicUsize::new(0));
    tracing::info!(%local, servers = ?targets, "forwarding the API servers through loopback");
    tokio::spawn(async move {
        loop {
            let (inbound, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "balancer: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (targets, preferred) = (targets.clone(), preferred.clone());
            tokio::spawn(async move {
                if let Some(mut outbound) = connect(&targets, &preferred).await {
                    let mut inbound = inbound;
                    let _ = inbound.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                }
            });
        }
    });
    Ok(format!("https://{local}"))
}

/// The first server, from the preferred one on, that accepts a connection.
async fn connect(targets: &[String], preferred: &AtomicUsize) -> Option<TcpStream> {
    let start = preferred.load(Ordering::Relaxed);
    for offset in 0..targets.len() {
        let i = (start + offset) % targets.len();
        match tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(&targets[i])).await {
            Ok(Ok(stream)) => {
                if i != start {
                    tracing::info!(server = %targets[i], "balancer: now using this server");
                    preferred.store(i, Ordering::Relaxed);
                }
                let _ = stream.set_nodelay(true);
                keepalive(&stream);
                return Some(stream);
            }
            Ok(Err(error)) => tracing::debug!(server = %targets[i], %error, "balancer: server refused"),
            Err(_) => tracing::debug!(server = %targets[i], "balancer: server did not answer"),
        }
    }
    tracing::warn!(servers = ?targets, "balancer: no server accepts connections");
    None
}

/// Probes an idle upstream connection, so one to a server that vanished (a cut link) ends
/// within about half a minute and its clients reconnect elsewhere.
fn keepalive(stream: &TcpStream) {
    use rustix::net::sockopt;
    let _ = sockopt::set_socket_keepalive(stream, true);
    let _ = sockopt::set_tcp_keepidle(stream, Duration::from_secs(10));
    let _ = sockopt::set_tcp_keepintvl(stream, Duration::from_secs(5));
    let _ = sockopt::set_tcp_keepcnt(stream, 3);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_become_addresses() {
        assert_eq!(authority("https://10.0.0.1:6443").unwrap(), "10.0.0.1:6443");
        assert_eq!(authority("https://api.example:6443/").unwrap(), "api.example:6443");
        assert_eq!(authority("https://10.0.0.1").unwrap(), "10.0.0.1:443");
        assert!(authority("not a url").is_err());
    }

    #[tokio::test]
    async fn connections_go_to_a_server_that_accepts() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // The first server is gone (a port nobody listens on); the second answers.
        let gone = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
        let live = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let live_addr = live.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = live.accept().await {
                let _ = s.write_all(b"hello").await;
            }
        });
        let url = start(&[format!("https://{gone}"), format!("https://{live_addr}")]).await.unwrap();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(url.trim_start_matches("https://")).await.unwrap();
            let mut got = String::new();
            stream.read_to_string(&mut got).await.unwrap();
            assert_eq!(got, "hello");
        }
    }
}
