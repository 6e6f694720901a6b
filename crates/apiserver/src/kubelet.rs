//! The API server's side of the kubelet API: `pods/log`, exec, attach and port-forward are
//! answered by the kubelet of the pod's node, reached at the node's InternalIP (else
//! Hostname) and `daemonEndpoints.kubeletEndpoint.Port`, with the API server's
//! `apiserver-kubelet-client` certificate. The kubelet's serving certificate must be one the
//! cluster CA signed for that address (as upstream with `--kubelet-certificate-authority`).

use axum::body::Body;
use axum::http::{Response, StatusCode, header};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::outbound::node_address;
use crate::registry;
use crate::state::{ApiState, read_object};
use crate::status::ApiError;

/// The container a `pods/log` (or exec) request means, as upstream's `LogLocation` picks it.
pub fn pick_container(pod: &Value, asked: Option<&str>) -> Result<String, ApiError> {
    let name = pod["metadata"]["name"].as_str().unwrap_or_default();
    let names = |field: &str| -> Vec<String> {
        pod["spec"][field]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|c| c["name"].as_str().map(str::to_string))
            .collect()
    };
    let (containers, init, ephemeral) = (names("containers"), names("initContainers"), names("ephemeralContainers"));
    match asked.filter(|c| !c.is_empty()) {
        Some(c) => {
            if containers.iter().chain(&init).chain(&ephemeral).any(|n| n == c) {
                Ok(c.to_string())
            } else {
                Err(ApiError::bad_request(format!("container {c} is not valid for pod {name}")))
            }
        }
        None => {
            if let Some(default) = pod["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"]
                .as_str()
                .filter(|d| containers.iter().any(|c| c == d))
            {
                return Ok(default.to_string());
            }
            if containers.len() == 1 {
                return Ok(containers[0].clone());
            }
            let mut message =
                format!("a container name must be specified for pod {name}, choose one of: [{}]", containers.join(" "));
            if !init.is_empty() {
                message.push_str(&format!(" or one of the init containers: [{}]", init.join(" ")));
            }
            Err(ApiError::bad_request(message))
        }
    }
}

/// The pod and the kubelet address of its node.
pub async fn locate(state: &ApiState, namespace: &str, name: &str) -> Result<(Value, String), ApiError> {
    let pods = registry::find("", "v1", "pods").expect("pods are served");
    let (pod, _) = read_object(state, pods, Some(namespace), name).await?;
    let node_name = pod["spec"]["nodeName"]
        .as_str()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("pod {name} does not have a host assigned")))?;
    let nodes = registry::find("", "v1", "nodes").expect("nodes are served");
    let (node, _) = read_object(state, nodes, None, node_name).await?;
    let address = node_address(&node)
        .ok_or_else(|| ApiError::bad_request(format!("node {node_name} has no address to reach its kubelet at")))?;
    Ok((pod, address))
}

fn unreachable(pod: &str, error: &str) -> ApiError {
    ApiError::new(503, "ServiceUnavailable", format!("the kubelet of pod {pod} is unreachable: {error}"))
}

/// A kubelet's refusal (its plain-text message) as the API's error: NotFound stays NotFound,
/// anything else is the client's BadRequest, as upstream's proxy reports kubelet errors.
async fn refusal(response: Response<hyper::body::Incoming>) -> ApiError {
    let status = response.status();
    let body = response.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    let message = String::from_utf8_lossy(&body[..body.len().min(64 * 1024)]).trim().to_string();
    match status {
        StatusCode::NOT_FOUND => ApiError::new(404, "NotFound", message),
        _ => ApiError::bad_request(message),
    }
}

/// `GET pods/<name>/log`: the kubelet's `containerLogs`, streamed through.
pub async fn pod_log(
    state: &ApiState,
    namespace: &str,
    name: &str,
    query: &std::collections::HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let logs = log_stream(state, namespace, name, query).await?;
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "text/plain")
        .body(logs)
        .expect("a valid response"))
}

/// `GET pods/<name>/log` with a websocket upgrade, as upstream's streamer answers it: the log
/// in binary messages (`binary.k8s.io`, or no protocol asked) or base64 text messages
/// (`base64.binary.k8s.io`), then a close. A refusal (no such pod or container) is an HTTP
/// answer before the upgrade.
pub async fn pod_log_websocket(
    state: &ApiState,
    namespace: &str,
    name: &str,
    mut parts: hyper::http::request::Parts,
    query: &std::collections::HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    use axum::extract::FromRequestParts;
    use axum::extract::ws::{Message, WebSocketUpgrade};
    use axum::response::IntoResponse;
    use base64::Engine as _;
    let upgrade = WebSocketUpgrade::from_request_parts(&mut parts, &())
        .await
        .map_err(|rejection| ApiError::bad_request(rejection.body_text()))?;
    let logs = log_stream(state, namespace, name, query).await?;
    let upgrade = upgrade.protocols(["binary.k8s.io", "base64.binary.k8s.io"]);
    let base64 = upgrade.selected_protocol().is_some_and(|p| p == "base64.binary.k8s.io");
    Ok(upgrade
        .on_upgrade(move |mut socket| async move {
            let mut stream = logs.into_data_stream();
            while let Some(chunk) = futures::StreamExt::next(&mut stream).await {
                let Ok(chunk) = chunk else { break };
                let message = if base64 {
                    Message::Text(base64::engine::general_purpose::STANDARD.encode(&chunk).into())
                } else {
                    Message::Binary(chunk)
                };
                if socket.send(message).await.is_err() {
                    return;
                }
            }
            let _ = socket.send(Message::Close(None)).await;
        })
        .into_response())
}

/// The kubelet's `containerLogs` of a pod's container, as a body to pass on.
async fn log_stream(
    state: &ApiState,
    namespace: &str,
    name: &str,
    query: &std::collections::HashMap<String, String>,
) -> Result<Body, ApiError> {
    let (pod, address) = locate(state, namespace, name).await?;
    let container = pick_container(&pod, query.get("container").map(String::as_str))?;
    let forwarded = {
        let mut forwarded = url::form_urlencoded::Serializer::new(String::new());
        for key in ["follow", "previous", "tailLines", "timestamps", "sinceSeconds", "sinceTime", "limitBytes"] {
            if let Some(value) = query.get(key) {
                forwarded.append_pair(key, value);
            }
        }
        forwarded.finish()
    };
    let path = format!("/containerLogs/{}/{}/{}?{forwarded}", encode(namespace), encode(name), encode(&container));
    let request =
        hyper::Request::get(path).header(header::HOST, &address).body(Body::empty()).expect("a valid request");
    let response = state.kubelets.send(&address, request).await.map_err(|e| unreachable(name, &e))?;
    if response.status() != StatusCode::OK {
        return Err(refusal(response).await);
    }
    Ok(Body::new(response.into_body()))
}

/// Headers of an upgrade that pass through between the client and the kubelet.
const UPGRADE_HEADERS: &[&str] = &[
    "connection",
    "upgrade",
    "sec-websocket-key",
    "sec-websocket-version",
    "sec-websocket-protocol",
    "sec-websocket-accept",
    "x-stream-protocol-version",
];

/// `pods/<name>/exec|attach|portforward`: the request goes to the kubelet as it came (its
/// upgrade headers and query), and once both sides have switched protocols the two
/// connections are spliced, so whatever the client and the kubelet speak (websocket
/// channels, SPDY) passes through untouched.
pub async fn proxy_stream(
    state: &ApiState,
    namespace: &str,
    name: &str,
    subresource: &str,
    mut request: hyper::Request<Body>,
    query: &std::collections::HashMap<String, String>,
) -> Result<Response<Body>, ApiError> {
    let upgrading = request.headers().get(header::UPGRADE).is_some();
    if !upgrading {
        return Err(ApiError::bad_request("Upgrade request required"));
    }
    let (pod, address) = locate(state, namespace, name).await?;
    let raw_query = request.uri().query().unwrap_or_default().to_string();
    let path = match subresource {
        "portforward" => format!("/portForward/{}/{}?{raw_query}", encode(namespace), encode(name)),
        _ => {
            let container = pick_container(&pod, query.get("container").map(String::as_str))?;
            let verb = if subresource == "exec" { "exec" } else { "attach" };
            format!("/{verb}/{}/{}/{}?{raw_query}", encode(namespace), encode(name), encode(&container))
        }
    };
    let mut forward =
        hyper::Request::builder().method(request.method().clone()).uri(path).header(header::HOST, &address);
    for name in UPGRADE_HEADERS {
        for value in request.headers().get_all(*name) {
            forward = forward.header(*name, value);
        }
    }
    let forward = forward.body(Body::empty()).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let mut response = state.kubelets.send(&address, forward).await.map_err(|e| unreachable(name, &e))?;
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        return Err(refusal(response).await);
    }
    let mut answer = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
    for name in UPGRADE_HEADERS {
        for value in response.headers().get_all(*name) {
            answer = answer.header(*name, value);
        }
    }
    let kubelet_side = hyper::upgrade::on(&mut response);
    let client_side = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let (client, kubelet) = match tokio::try_join!(client_side, kubelet_side) {
            Ok(both) => both,
            Err(error) => {
                tracing::debug!(%error, "a streaming upgrade failed");
                return;
            }
        };
        let (mut client, mut kubelet) = (TokioIo::new(client), TokioIo::new(kubelet));
        let _ = tokio::io::copy_bidirectional(&mut client, &mut kubelet).await;
    });
    Ok(answer.body(Body::empty()).expect("a valid response"))
}

fn encode(segment: &str) -> String {
    percent_encoding::utf8_percent_encode(segment, percent_encoding::NON_ALPHANUMERIC).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn containers_are_picked_as_upstream() {
        let pod = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}, {"name": "b"}],
                         "initContainers": [{"name": "i"}]}});
        assert_eq!(pick_container(&pod, Some("b")).unwrap(), "b");
        assert_eq!(pick_container(&pod, Some("i")).unwrap(), "i");
        let e = pick_container(&pod, None).unwrap_err();
        assert_eq!(
            e.message,
            "a container name must be specified for pod p, choose one of: [a b] or one of the init containers: [i]"
        );
        assert_eq!(pick_container(&pod, Some("z")).unwrap_err().message, "container z is not valid for pod p");
        let one = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "only"}]}});
        assert_eq!(pick_container(&one, None).unwrap(), "only");
        let defaulted = json!({"metadata": {"name": "p", "annotations": {"kubectl.kubernetes.io/default-container": "b"}},
                               "spec": {"containers": [{"name": "a"}, {"name": "b"}]}});
        assert_eq!(pick_container(&defaulted, None).unwrap(), "b");
    }

    #[test]
    fn kubelets_are_reached_at_the_internal_ip_and_their_port() {
        let node = json!({"status": {"addresses": [{"type": "Hostname", "address": "n"}, {"type": "InternalIP", "address": "10.0.0.2"}],
                          "daemonEndpoints": {"kubeletEndpoint": {"Port": 10255}}}});
        assert_eq!(node_address(&node).unwrap(), "10.0.0.2:10255");
        let v6 = json!({"status": {"addresses": [{"type": "InternalIP", "address": "fd00::2"}]}});
        assert_eq!(node_address(&v6).unwrap(), "[fd00::2]:10250");
        assert_eq!(node_address(&json!({})), None);
    }
}
