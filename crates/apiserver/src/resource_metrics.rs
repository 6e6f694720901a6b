//! `metrics.k8s.io/v1beta1`, which `kubectl top` reads: NodeMetrics and PodMetrics made on
//! request from the kubelets' `/stats/summary` (what metrics-server serves upstream, without
//! its scrape loop: each kubelet keeps the recent CPU readings a rate needs). CPU is the rate
//! in nanocores, memory the working set, as metrics-server reports them.

use std::time::Duration;

use axum::body::Body;
use axum::http::{Method, Response, StatusCode, header};
use http_body_util::BodyExt;
use serde_json::{Value, json};

use crate::state::{ApiState, json_response};

use crate::registry;
use crate::request::Query;
use crate::selector::LabelSelector;
use crate::status::ApiError;

pub const GROUP: &str = "metrics.k8s.io";
pub const VERSION: &str = "v1beta1";
/// The served resources: plural, kind, namespaced.
pub const RESOURCES: &[(&str, &str, bool)] = &[("nodes", "NodeMetrics", false), ("pods", "PodMetrics", true)];
/// What `window` says: the kubelet's sampling period.
const WINDOW: &str = "5s";

/// Serves `/apis/metrics.k8s.io/v1beta1/<rest>`.
pub async fn serve(
    state: &ApiState,
    method: &Method,
    rest: &[&str],
    query: &Query,
) -> Result<Response<Body>, ApiError> {
    let (plural, namespace, name) = match rest {
        ["nodes"] => ("nodes", None, None),
        ["nodes", name] => ("nodes", None, Some(*name)),
        ["pods"] => ("pods", None, None),
        ["namespaces", namespace, "pods"] => ("pods", Some(*namespace), None),
        ["namespaces", namespace, "pods", name] => ("pods", Some(*namespace), Some(*name)),
        _ => return Err(ApiError::not_found_path(&format!("/apis/{GROUP}/{VERSION}/{}", rest.join("/")))),
    };
    if method != Method::GET {
        return Err(ApiError::method_not_allowed(method.as_str()));
    }
    if query.get("watch").is_some_and(|w| w == "true" || w == "1") {
        return Err(ApiError::method_not_allowed("watch"));
    }
    let selector = LabelSelector::parse(query.get("labelSelector").map(String::as_str).unwrap_or(""))
        .map_err(ApiError::bad_request)?;
    let nodes = cached(state, "nodes").await?;
    let items = if plural == "nodes" {
        let wanted: Vec<&Value> = nodes
            .iter()
            .filter(|n| name.is_none_or(|name| n["metadata"]["name"] == name))
            .filter(|n| crate::selector::matches_object(&selector, n))
            .collect();
        let summaries = summaries(state, &wanted).await;
        wanted.iter().zip(summaries).filter_map(|(node, summary)| node_metrics(node, &summary?)).collect::<Vec<_>>()
    } else {
        let pods: Vec<Value> = cached(state, "pods")
            .await?
            .into_iter()
            .filter(|p| namespace.is_none_or(|ns| p["metadata"]["namespace"] == ns))
            .filter(|p| name.is_none_or(|name| p["metadata"]["name"] == name))
            .filter(|p| crate::selector::matches_object(&selector, p))
            .collect();
        let hosts: Vec<&Value> =
            nodes.iter().filter(|n| pods.iter().any(|p| p["spec"]["nodeName"] == n["metadata"]["name"])).collect();
        let summaries: Vec<Value> = summaries(state, &hosts).await.into_iter().flatten().collect();
        pods.iter()
            .filter_map(|pod| {
                let uid = &pod["metadata"]["uid"];
                let stats = summaries
                    .iter()
                    .flat_map(|s| s["pods"].as_array().into_iter().flatten())
                    .find(|s| &s["podRef"]["uid"] == uid)?;
                pod_metrics(pod, stats)
            })
            .collect()
    };
    let kind = RESOURCES.iter().find(|(p, ..)| *p == plural).map(|(_, k, _)| *k).unwrap_or_default();
    match name {
        Some(name) => {
            items.into_iter().next().map(|item| json_response(StatusCode::OK, &item)).ok_or_else(|| {
                // Upstream's message when the object or its metrics are missing.
                ApiError::not_found(GROUP, plural, name)
            })
        }
        None => Ok(json_response(
            StatusCode::OK,
            &json!({"kind": format!("{kind}List"), "apiVersion": format!("{GROUP}/{VERSION}"), "metadata": {}, "items": items}),
        )),
    }
}

async fn cached(state: &ApiState, plural: &str) -> Result<Vec<Value>, ApiError> {
    let resource = registry::find("", "v1", plural).expect("core resources are served");
    crate::state::cached_list(state, resource, None).await
}

/// Each node's summary (None where its kubelet did not answer), asked of all at once.
async fn summaries(state: &ApiState, nodes: &[&Value]) -> Vec<Option<Value>> {
    let asks = nodes.iter().map(|node| async move {
        let name = node["metadata"]["name"].as_str().unwrap_or_default();
        let address = crate::outbound::node_address(node)?;
        let request = hyper::Request::get("/stats/summary")
            .header(header::HOST, &address)
            .body(Body::empty())
            .expect("a valid request");
        let ask = async {
            let response = state.kubelets.send(&address, request).await?;
            if response.status() != StatusCode::OK {
                return Err(format!("status {}", response.status()));
            }
            let body = response.into_body().collect().await.map_err(|e| e.to_string())?.to_bytes();
            serde_json::from_slice::<Value>(&body).map_err(|e| e.to_string())
        };
        match tokio::time::timeout(Duration::from_secs(10), ask).await {
            Ok(Ok(summary)) => Some(summary),
            Ok(Err(error)) => {
                tracing::debug!(node = name, %error, "no stats from the kubelet");
                None
            }
            Err(_) => {
                tracing::debug!(node = name, "the kubelet's stats timed out");
                None
            }
        }
    });
    futures::future::join_all(asks).await
}

/// `cpu` in nanocores and `memory` (working set) in Ki, as metrics-server formats them; None
/// without a CPU rate yet.
fn usage(stats: &Value) -> Option<Value> {
    let cpu = stats["cpu"]["usageNanoCores"].as_u64()?;
    let memory = stats["memory"]["workingSetBytes"].as_u64().unwrap_or(0);
    Some(json!({"cpu": format!("{cpu}n"), "memory": format!("{}Ki", memory / 1024)}))
}

fn metadata(object: &Value) -> Value {
    let mut metadata = json!({
        "name": object["metadata"]["name"],
        "creationTimestamp": crate::object::now_rfc3339(),
    });
    if let Some(namespace) = object["metadata"]["namespace"].as_str() {
        metadata["namespace"] = json!(namespace);
    }
    if let Some(labels) = object["metadata"]["labels"].as_object() {
        metadata["labels"] = json!(labels);
    }
    metadata
}

pub fn node_metrics(node: &Value, summary: &Value) -> Option<Value> {
    let stats = &summary["node"];
    Some(json!({
        "kind": "NodeMetrics",
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "metadata": metadata(node),
        "timestamp": stats["cpu"]["time"],
        "window": WINDOW,
        "usage": usage(stats)?,
    }))
}

pub fn pod_metrics(pod: &Value, stats: &Value) -> Option<Value> {
    let containers = stats["containers"]
        .as_array()?
        .iter()
        .map(|c| Some(json!({"name": c["name"], "usage": usage(c)?})))
        .collect::<Option<Vec<Value>>>()?;
    Some(json!({
        "kind": "PodMetrics",
        "apiVersion": format!("{GROUP}/{VERSION}"),
        "metadata": metadata(pod),
        "timestamp": stats["cpu"]["time"],
        "window": WINDOW,
        "containers": containers,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_shaped_as_metrics_server_serves_them() {
        let node = json!({"metadata": {"name": "n1", "labels": {"a": "b"}}});
        let summary = json!({"node": {"cpu": {"time": "2026-01-01T00:00:00Z", "usageNanoCores": 250_000_000u64},
                                      "memory": {"workingSetBytes": 2048 * 1024}}});
        let metrics = node_metrics(&node, &summary).unwrap();
        assert_eq!(metrics["usage"], json!({"cpu": "250000000n", "memory": "2048Ki"}));
        assert_eq!(metrics["metadata"]["labels"]["a"], "b");
        assert_eq!(metrics["timestamp"], "2026-01-01T00:00:00Z");
        let no_rate = json!({"node": {"cpu": {"usageCoreNanoSeconds": 5}}});
        assert_eq!(node_metrics(&node, &no_rate), None, "no rate yet: no metrics, as metrics-server");

        let pod = json!({"metadata": {"name": "p", "namespace": "ns", "uid": "u"}});
        let stats = json!({"cpu": {"time": "t"}, "containers": [
            {"name": "a", "cpu": {"usageNanoCores": 1}, "memory": {"workingSetBytes": 4096}},
            {"name": "b", "cpu": {"usageNanoCores": 2}, "memory": {}}]});
        let metrics = pod_metrics(&pod, &stats).unwrap();
        assert_eq!(metrics["metadata"]["namespace"], "ns");
        assert_eq!(metrics["containers"][0], json!({"name": "a", "usage": {"cpu": "1n", "memory": "4Ki"}}));
        assert_eq!(metrics["containers"][1]["usage"]["memory"], "0Ki");
    }
}
