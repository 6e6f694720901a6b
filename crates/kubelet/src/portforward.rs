//! `kubectl port-forward` on the kubelet's side, over SPDY/3.1 (`portforward.k8s.io`): for each
//! local connection the client opens two streams sharing a `requestID` — `error` and `data`,
//! each with the `port` header — and the kubelet connects to that port of the pod (its IP on
//! the node bridge, or the node's own address for hostNetwork pods) and copies both ways.
//! (kubectl 1.31+ first tries a websocket tunnel; the kubelet refuses it and kubectl falls
//! back to SPDY.)

use std::collections::HashMap;
use std::net::IpAddr;

use axum::body::Body;
use axum::extract::{Path as UrlPath, State};
use axum::http::{Response, StatusCode};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::pods::Shared;
use crate::spdy::{Frame, Reader, Writer};

fn text(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    Response::builder().status(status).body(Body::from(message.into())).expect("a valid response")
}

/// `POST /portForward/{namespace}/{pod}` with `Upgrade: SPDY/3.1`.
pub async fn port_forward(
    State(node): State<Shared>,
    UrlPath((namespace, pod_name)): UrlPath<(String, String)>,
    mut request: axum::extract::Request,
) -> Response<Body> {
    if !crate::spdy::wants_upgrade(request.headers()) {
        return text(StatusCode::BAD_REQUEST, "port-forward needs an SPDY/3.1 upgrade");
    }
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(node.client.clone(), &namespace);
    let pod = match pods.get_opt(&pod_name).await {
        Ok(Some(pod)) => pod,
        Ok(None) => return text(StatusCode::NOT_FOUND, format!("pod {namespace}/{pod_name} not found")),
        Err(error) => return text(StatusCode::SERVICE_UNAVAILABLE, error.to_string()),
    };
    let ip: Option<IpAddr> = pod.status.as_ref().and_then(|s| s.pod_ip.as_deref()).and_then(|ip| ip.parse().ok());
    let Some(ip) = ip else {
        return text(StatusCode::BAD_REQUEST, format!("pod {pod_name} has no IP address yet"));
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(io) => {
                if let Err(error) = session(hyper_util::rt::TokioIo::new(io), ip).await {
                    tracing::debug!(%error, "port-forward session");
                }
            }
            Err(error) => tracing::debug!(%error, "port-forward upgrade"),
        }
    });
    crate::spdy::switching("portforward.k8s.io")
}

/// What connection tasks ask of the one writer.
enum Out {
    Data(u32, Bytes, bool),
}

/// The two streams of one forwarded connection.
#[derive(Default)]
struct Pair {
    port: u16,
    error: Option<u32>,
    data: Option<u32>,
    /// Data for the pod, once its connection is up.
    to_pod: Option<tokio::sync::mpsc::Sender<Option<Bytes>>>,
    /// What arrived before the connection was up.
    pending: Vec<Option<Bytes>>,
}

async fn session<IO>(io: IO, ip: IpAddr) -> anyhow::Result<()>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (read, write) = tokio::io::split(io);
    let mut reader = Reader::new(read);
    let mut writer = Writer::new(write);
    let (out_tx, mut out_rx) = tokio::sync::mpsc::channel::<Out>(64);
    let (frames_tx, mut frames) = tokio::sync::mpsc::channel::<Frame>(64);
    tokio::spawn(async move {
        while let Ok(Some(frame)) = reader.next().await {
            if frames_tx.send(frame).await.is_err() {
                break;
            }
        }
    });
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut stream_to_request: HashMap<u32, String> = HashMap::new();
    loop {
        tokio::select! {
            frame = frames.recv() => match frame {
                Some(Frame::SynStream { id, headers, .. }) => {
                    writer.reply(id).await?;
                    let request = headers.get("requestid").cloned().unwrap_or_default();
                    let port: u16 = headers.get("port").and_then(|p| p.parse().ok()).unwrap_or(0);
                    let pair = pairs.entry(request.clone()).or_default();
                    pair.port = port;
                    match headers.get("streamtype").map(String::as_str) {
                        Some("error") => pair.error = Some(id),
                        Some("data") => pair.data = Some(id),
                        _ => {}
                    }
                    stream_to_request.insert(id, request.clone());
                    if let (Some(error), Some(data), None) = (pair.error, pair.data, &pair.to_pod) {
                        let (tx, rx) = tokio::sync::mpsc::channel::<Option<Bytes>>(64);
                        for chunk in pair.pending.drain(..) {
                            let _ = tx.try_send(chunk);
                        }
                        pair.to_pod = Some(tx);
                        tokio::spawn(forward(ip, pair.port, error, data, rx, out_tx.clone()));
                    }
                }
                Some(Frame::Data { id, data, fin }) => {
                    let Some(pair) = stream_to_request.get(&id).and_then(|r| pairs.get_mut(r)) else { continue };
                    if pair.data != Some(id) {
                        continue;
                    }
                    let mut chunks = Vec::new();
                    if !data.is_empty() {
                        chunks.push(Some(data));
                    }
                    if fin {
                        chunks.push(None);
                    }
                    for chunk in chunks {
                        match &pair.to_pod {
                            Some(tx) => {
                                let _ = tx.send(chunk).await;
                            }
                            None => pair.pending.push(chunk),
                        }
                    }
                }
                Some(Frame::Ping(id)) => writer.ping(id).await?,
                Some(Frame::Reset(id)) => {
                    if let Some(pair) = stream_to_request.get(&id).and_then(|r| pairs.get_mut(r))
                        && let Some(tx) = &pair.to_pod {
                            let _ = tx.send(None).await;
                        }
                }
                Some(Frame::GoAway) | None => break,
                Some(Frame::Other) => {}
            },
            out = out_rx.recv() => match out {
                Some(Out::Data(id, data, fin)) => writer.data(id, &data, fin).await?,
                None => break,
            },
        }
    }
    Ok(())
}

/// One forwarded connection: pod port ⇄ the data stream; failures go to the error stream.
async fn forward(
    ip: IpAddr,
    port: u16,
    error: u32,
    data: u32,
    mut from_client: tokio::sync::mpsc::Receiver<Option<Bytes>>,
    out: tokio::sync::mpsc::Sender<Out>,
) {
    let stream = match tokio::net::TcpStream::connect((ip, port)).await {
        Ok(stream) => stream,
        Err(e) => {
            let message =
                format!("error forwarding port {port} to pod {ip}: failed to connect to localhost:{port}: {e}");
            let _ = out.send(Out::Data(error, Bytes::from(message), true)).await;
            let _ = out.send(Out::Data(data, Bytes::new(), true)).await;
            return;
        }
    };
    let (mut pod_read, mut pod_write) = stream.into_split();
    let upstream = tokio::spawn(async move {
        while let Some(Some(chunk)) = from_client.recv().await {
            if pod_write.write_all(&chunk).await.is_err() {
                break;
            }
        }
        let _ = pod_write.shutdown().await;
    });
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        match pod_read.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if out.send(Out::Data(data, Bytes::copy_from_slice(&buf[..n]), false)).await.is_err() {
                    break;
                }
            }
        }
    }
    let _ = out.send(Out::Data(data, Bytes::new(), true)).await;
    let _ = out.send(Out::Data(error, Bytes::new(), true)).await;
    upstream.abort();
}
