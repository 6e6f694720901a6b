//! The DNS server's sockets: UDP and TCP on one address, answers from the [`Resolver`], other
//! names forwarded to the host's resolvers (each tried in turn, 2 s apiece; SERVFAIL when none
//! answers).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Message, ResponseCode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};

use crate::{Reply, Resolver};

const FORWARD_TIMEOUT: Duration = Duration::from_secs(2);

/// The resolvers a `resolv.conf` names (port 53), less any of `exclude` (the cluster DNS
/// itself, or this server's address: forwarding there would loop).
pub fn host_resolvers(resolv_conf: &str, exclude: &[IpAddr]) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|line| line.trim().strip_prefix("nameserver"))
        .filter_map(|rest| rest.trim().split('%').next()?.parse::<IpAddr>().ok())
        .filter(|ip| !exclude.contains(ip))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect()
}

/// SERVFAIL for a query (when its header can be read).
fn server_failure(query: &[u8]) -> Option<Vec<u8>> {
    let request = Message::from_vec(query).ok()?;
    let mut reply = crate::response_to(&request);
    reply.set_response_code(ResponseCode::ServFail);
    for q in request.queries() {
        reply.add_query(q.clone());
    }
    reply.to_vec().ok()
}

/// Asks the upstream resolvers over UDP; the first answer wins.
async fn forward(query: &[u8], upstreams: &[SocketAddr]) -> Option<Vec<u8>> {
    for upstream in upstreams {
        let bind: SocketAddr = if upstream.is_ipv4() { ([0, 0, 0, 0], 0).into() } else { ([0u16; 8], 0).into() };
        let Ok(socket) = UdpSocket::bind(bind).await else { continue };
        if socket.send_to(query, upstream).await.is_err() {
            continue;
        }
        let mut buf = vec![0u8; 65535];
        let deadline = tokio::time::Instant::now() + FORWARD_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, socket.recv_from(&mut buf)).await {
                // Only the asked server's answer to this query's ID counts.
                Ok(Ok((n, from))) if from == *upstream && n >= 2 && buf[..2] == query[..2] => {
                    return Some(buf[..n].to_vec());
                }
                Ok(Ok(_)) => continue,
                Ok(Err(_)) | Err(_) => break,
            }
        }
    }
    None
}

/// The reply to a query: the resolver's, else a forwarded one, else SERVFAIL.
async fn reply(resolver: &Resolver, upstreams: &[SocketAddr], query: &[u8], whole: bool) -> Option<Vec<u8>> {
    let reply = if whole { resolver.answer_whole(query) } else { resolver.answer(query) };
    match reply {
        Reply::Answer(bytes) => Some(bytes),
        Reply::Drop => None,
        Reply::Forward => match forward(query, upstreams).await {
            Some(bytes) => Some(bytes),
            None => server_failure(query),
        },
    }
}

/// Serves DNS on `udp` and `tcp` until the process ends.
pub async fn serve(resolver: Resolver, upstreams: Vec<SocketAddr>, udp: UdpSocket, tcp: TcpListener) {
    let (resolver, upstreams, udp) = (Arc::new(resolver), Arc::new(upstreams), Arc::new(udp));
    let tcp_side = tokio::spawn({
        let (resolver, upstreams) = (resolver.clone(), upstreams.clone());
        async move {
            loop {
                let Ok((stream, _)) = tcp.accept().await else {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                };
                let (resolver, upstreams) = (resolver.clone(), upstreams.clone());
                tokio::spawn(async move {
                    let _ = tcp_connection(stream, &resolver, &upstreams).await;
                });
            }
        }
    });
    let mut buf = vec![0u8; 65535];
    loop {
        let Ok((n, client)) = udp.recv_from(&mut buf).await else { continue };
        let query = &buf[..n];
        match resolver.answer(query) {
            Reply::Answer(bytes) => {
                let _ = udp.send_to(&bytes, client).await;
            }
            Reply::Drop => {}
            Reply::Forward => {
                let (query, udp, upstreams) = (query.to_vec(), udp.clone(), upstreams.clone());
                tokio::spawn(async move {
                    let bytes = match forward(&query, &upstreams).await {
                        Some(bytes) => Some(bytes),
                        None => server_failure(&query),
                    };
                    if let Some(bytes) = bytes {
                        let _ = udp.send_to(&bytes, client).await;
                    }
                });
            }
        }
        if tcp_side.is_finished() {
            return;
        }
    }
}

/// One TCP client: length-prefixed queries until it closes (or idles for 10 s).
async fn tcp_connection(mut stream: TcpStream, resolver: &Resolver, upstreams: &[SocketAddr]) -> std::io::Result<()> {
    loop {
        let mut length = [0u8; 2];
        match tokio::time::timeout(Duration::from_secs(10), stream.read_exact(&mut length)).await {
            Ok(Ok(_)) => {}
            _ => return Ok(()),
        }
        let mut query = vec![0u8; u16::from_be_bytes(length) as usize];
        stream.read_exact(&mut query).await?;
        if let Some(bytes) = reply(resolver, upstreams, &query, true).await {
            let Ok(length) = u16::try_from(bytes.len()) else { continue };
            stream.write_all(&length.to_be_bytes()).await?;
            stream.write_all(&bytes).await?;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::{MessageType, Query};
    use hickory_proto::rr::{Name, RecordType};
    use std::str::FromStr;

    #[test]
    fn the_hosts_resolvers_less_the_cluster_dns() {
        let conf = "# comment\nnameserver 10.96.0.10\nnameserver 192.168.1.1\nnameserver fe80::1%eth0\nsearch lan\n";
        let exclude: [IpAddr; 1] = ["10.96.0.10".parse().unwrap()];
        assert_eq!(
            host_resolvers(conf, &exclude),
            ["192.168.1.1:53".parse().unwrap(), "[fe80::1]:53".parse().unwrap()]
        );
    }

    fn query(name: &str, kind: RecordType) -> Vec<u8> {
        let mut query = Message::new();
        query.set_id(4242).set_recursion_desired(true).add_query(Query::query(Name::from_str(name).unwrap(), kind));
        query.to_vec().unwrap()
    }

    #[tokio::test]
    async fn answers_over_udp_and_tcp_and_forwards_the_rest() {
        // An "upstream" on loopback that answers every query with one fixed address.
        let upstream = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let upstream_address = upstream.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 1500];
            while let Ok((n, from)) = upstream.recv_from(&mut buf).await {
                let request = Message::from_vec(&buf[..n]).unwrap();
                let mut reply = request.clone();
                reply.set_message_type(MessageType::Response);
                let name = request.queries()[0].name().clone();
                let a = hickory_proto::rr::RData::A(hickory_proto::rr::rdata::A([192, 0, 2, 1].into()));
                reply.add_answer(hickory_proto::rr::Record::from_rdata(name, 60, a));
                upstream.send_to(&reply.to_vec().unwrap(), from).await.unwrap();
            }
        });
        let udp = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (udp_address, tcp_address) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
        tokio::spawn(serve(crate::tests::resolver(), vec![upstream_address], udp, tcp));
        let client = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let mut buf = vec![0u8; 1500];
        for (name, expected) in [("db.shop.svc.cluster.local.", "10.96.0.20"), ("example.org.", "192.0.2.1")] {
            client.send_to(&query(name, RecordType::A), udp_address).await.unwrap();
            let n = tokio::time::timeout(Duration::from_secs(5), client.recv(&mut buf)).await.unwrap().unwrap();
            let reply = Message::from_vec(&buf[..n]).unwrap();
            assert_eq!(reply.id(), 4242);
            assert_eq!(reply.answers()[0].data().to_string(), expected, "{name}");
        }
        let mut stream = TcpStream::connect(tcp_address).await.unwrap();
        let q = query("peers.shop.svc.cluster.local.", RecordType::A);
        stream.write_all(&(q.len() as u16).to_be_bytes()).await.unwrap();
        stream.write_all(&q).await.unwrap();
        let mut length = [0u8; 2];
        stream.read_exact(&mut length).await.unwrap();
        let mut body = vec![0u8; u16::from_be_bytes(length) as usize];
        stream.read_exact(&mut body).await.unwrap();
        assert_eq!(Message::from_vec(&body).unwrap().answers().len(), 2);
    }
}
