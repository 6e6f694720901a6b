//! What a kubelet's credentials reach, as upstream's Node authorizer and NodeRestriction
//! admission plugin decide it. A node (user `system:node:<name>` in group `system:nodes`):
//!
//! - reads a Secret, ConfigMap, PersistentVolumeClaim, PersistentVolume or ServiceAccount, and
//!   asks for a ServiceAccount's token, only when a pod bound to it uses that object — by name,
//!   never by listing ([`authorize`]); everything else is left to RBAC (`system:node`);
//! - writes only its own Node and Lease, creates only mirror pods bound to itself, and deletes,
//!   updates the status of, or evicts only pods bound to itself ([`admit`]).
//!
//! So the credentials on one machine do not open the cluster's secrets or its other nodes.

use axum::body::Body;
use axum::http::Method;
use serde_json::Value;

use crate::auth::Attributes;
use crate::auth::UserInfo;
use crate::registry;
use crate::state::ApiState;
use crate::status::ApiError;

/// The node a user is, if its credentials are a kubelet's.
pub fn node_of(user: &UserInfo) -> Option<&str> {
    if !user.groups.iter().any(|g| g == "system:nodes") {
        return None;
    }
    user.name.strip_prefix("system:node:").filter(|name| !name.is_empty())
}

/// Whether the resource is one a node reaches only through its pods.
fn through_pods(attributes: &Attributes) -> bool {
    attributes.resource.as_ref().is_some_and(|r| {
        r.group.is_empty()
            && matches!(
                (r.resource.as_str(), r.subresource.as_str()),
                ("secrets" | "configmaps" | "persistentvolumeclaims" | "persistentvolumes" | "serviceaccounts", "")
                    | ("serviceaccounts", "token")
            )
    })
}

/// The Node authorizer: `Some(decision)` for what a node reaches through its pods, `None`
/// (RBAC decides) for the rest and for users that are not nodes.
pub async fn authorize(state: &ApiState, user: &UserInfo, attributes: &Attributes) -> Result<Option<bool>, ApiError> {
    let Some(node) = node_of(user) else { return Ok(None) };
    if !through_pods(attributes) {
        return Ok(None);
    }
    let Some(r) = &attributes.resource else { return Ok(None) };
    let verb = if r.subresource == "token" { "create" } else { "get" };
    if attributes.verb != verb || r.name.is_empty() {
        return Ok(Some(false));
    }
    Ok(Some(related(state, node, &r.resource, &r.namespace, &r.name).await?))
}

/// Why [`authorize`] refused (upstream's words), for the Forbidden message.
pub fn refusal(user: &UserInfo, attributes: &Attributes) -> Option<String> {
    let node = node_of(user)?;
    through_pods(attributes).then(|| format!("no relationship found between node '{node}' and this object"))
}

async fn list(state: &ApiState, plural: &str, namespace: Option<&str>) -> Result<Vec<Value>, ApiError> {
    let resource = registry::find("", "v1", plural).expect("core resources are served");
    crate::state::cached_list(state, resource, namespace).await
}

/// Whether a pod bound to `node` uses the object.
async fn related(state: &ApiState, node: &str, resource: &str, namespace: &str, name: &str) -> Result<bool, ApiError> {
    let scope = if resource == "persistentvolumes" { None } else { Some(namespace).filter(|n| !n.is_empty()) };
    let pods = list(state, "pods", scope).await?;
    let on_node = pods.iter().filter(|p| p["spec"]["nodeName"] == node);
    if resource != "persistentvolumes" {
        return Ok(on_node.into_iter().any(|pod| uses(pod, resource).iter().any(|used| used == name)));
    }
    // A volume through the claims of the node's pods.
    for pod in on_node {
        let used = uses(pod, "persistentvolumeclaims");
        if used.is_empty() {
            continue;
        }
        let namespace = pod["metadata"]["namespace"].as_str().unwrap_or_default();
        let claims = list(state, "persistentvolumeclaims", Some(namespace)).await?;
        if claims
            .iter()
            .any(|c| c["spec"]["volumeName"] == name && used.iter().any(|u| c["metadata"]["name"] == u.as_str()))
        {
            return Ok(true);
        }
    }
    Ok(false)
}

/// The names of the objects of `resource` (in the pod's namespace) that a pod uses.
pub fn uses(pod: &Value, resource: &str) -> Vec<String> {
    let spec = &pod["spec"];
    let mut names = Vec::new();
    let mut add = |value: &Value| {
        if let Some(name) = value.as_str().filter(|n| !n.is_empty()) {
            names.push(name.to_string());
        }
    };
    let items = |value: &Value| value.as_array().cloned().unwrap_or_default();
    let volumes = items(&spec["volumes"]);
    let containers: Vec<Value> =
        ["containers", "initContainers", "ephemeralContainers"].iter().flat_map(|kind| items(&spec[*kind])).collect();
    let env = |key: &str, from: &str| -> Vec<Value> {
        let mut refs = Vec::new();
        for container in &containers {
            refs.extend(items(&container["env"]).iter().map(|e| e["valueFrom"][key]["name"].clone()));
            refs.extend(items(&container["envFrom"]).iter().map(|e| e[from]["name"].clone()));
        }
        refs
    };
    match resource {
        "secrets" => {
            items(&spec["imagePullSecrets"]).iter().for_each(|s| add(&s["name"]));
            for volume in &volumes {
                add(&volume["secret"]["secretName"]);
                add(&volume["csi"]["nodePublishSecretRef"]["name"]);
                items(&volume["projected"]["sources"]).iter().for_each(|s| add(&s["secret"]["name"]));
            }
            env("secretKeyRef", "secretRef").iter().for_each(&mut add);
        }
        "configmaps" => {
            for volume in &volumes {
                add(&volume["configMap"]["name"]);
                items(&volume["projected"]["sources"]).iter().for_each(|s| add(&s["configMap"]["name"]));
            }
            env("configMapKeyRef", "configMapRef").iter().for_each(&mut add);
        }
        "persistentvolumeclaims" => {
            let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default();
            for volume in &volumes {
                add(&volume["persistentVolumeClaim"]["claimName"]);
                // A generic ephemeral volume's claim is named after the pod and the volume.
                if volume["ephemeral"].is_object() {
                    add(&Value::String(format!("{pod_name}-{}", volume["name"].as_str().unwrap_or_default())));
                }
            }
        }
        "serviceaccounts" => match spec["serviceAccountName"].as_str().filter(|n| !n.is_empty()) {
            Some(name) => names.push(name.to_string()),
            None => names.push("default".into()),
        },
        _ => {}
    }
    names
}

fn forbidden(kind: &str, name: &str, why: String) -> ApiError {
    let subject = if name.is_empty() { kind.to_string() } else { format!("{kind} {name:?}") };
    ApiError::new(403, "Forbidden", format!("{subject} is forbidden: {why}"))
}

/// NodeRestriction, for a write by `node`: refused unless it touches the node's own objects.
/// Returns the body (read here when the decision needs it).
pub async fn admit(
    state: &ApiState,
    node: &str,
    method: &Method,
    target: (&registry::Resource, Option<&str>, Option<&str>, Option<&str>),
    content_type: &str,
    body: Body,
) -> Result<Body, ApiError> {
    let (resource, namespace, name, subresource) = target;
    let name = name.unwrap_or_default();
    match (resource.group, resource.builtin()) {
        ("", "nodes") => {
            let (body, object) = read(method, content_type, body).await?;
            let target = object.as_ref().and_then(|o| o["metadata"]["name"].as_str()).unwrap_or(name);
            if target != node {
                return Err(forbidden(
                    "nodes",
                    target,
                    format!("node {node:?} is not allowed to modify node {target:?}"),
                ));
            }
            Ok(body)
        }
        ("coordination.k8s.io", "leases") if namespace == Some("kube-node-lease") => {
            let (body, object) = read(method, content_type, body).await?;
            let target = object.as_ref().and_then(|o| o["metadata"]["name"].as_str()).unwrap_or(name);
            if target != node {
                let why = "can only access node lease with the same name as the requesting node".to_string();
                return Err(forbidden("leases.coordination.k8s.io", target, why));
            }
            Ok(body)
        }
        ("", "pods") => {
            let what = match (method, subresource) {
                (&Method::POST, None) => {
                    let (body, object) = read(method, content_type, body).await?;
                    let object = object.unwrap_or_default();
                    let pod = object["metadata"]["name"].as_str().unwrap_or_default();
                    if object["metadata"]["annotations"]["kubernetes.io/config.mirror"].is_null() {
                        let why = format!(
                            "pod does not have \"kubernetes.io/config.mirror\" annotation, node {node:?} can only create mirror pods"
                        );
                        return Err(forbidden("pods", pod, why));
                    }
                    if object["spec"]["nodeName"] != node {
                        let why = format!("node {node:?} can only create pods with spec.nodeName set to itself");
                        return Err(forbidden("pods", pod, why));
                    }
                    return Ok(body);
                }
                (&Method::DELETE, None) => "delete pods",
                (_, Some("status")) => "update pod status for pods",
                (_, Some("eviction")) => "evict pods",
                (_, None) => {
                    let why = format!("node {node:?} can only create and delete mirror pods");
                    return Err(forbidden("pods", name, why));
                }
                (_, Some(other)) => {
                    let why = format!("unexpected pod subresource {other:?}, only 'status' and 'eviction' are allowed");
                    return Err(forbidden("pods", name, why));
                }
            };
            let bound = match crate::state::read_object(state, resource, namespace, name).await {
                Ok((pod, _)) => pod["spec"]["nodeName"] == node,
                // Nothing to protect: the handler answers NotFound.
                Err(error) if error.code == 404 => true,
                Err(error) => return Err(error),
            };
            if !bound {
                return Err(forbidden(
                    "pods",
                    name,
                    format!("node {node:?} can only {what} with spec.nodeName set to itself"),
                ));
            }
            Ok(body)
        }
        _ => Ok(body),
    }
}

/// For a create, the decoded body (and the body to hand on); other writes name their object
/// in the path.
async fn read(method: &Method, content_type: &str, body: Body) -> Result<(Body, Option<Value>), ApiError> {
    if method != Method::POST {
        return Ok((body, None));
    }
    let bytes = crate::state::read_body(body).await?;
    let object = crate::object::decode_body(content_type, &bytes)?;
    Ok((Body::from(bytes), Some(object)))
}
