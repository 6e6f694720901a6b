//! API aggregation (`apiregistration.k8s.io/v1` APIServices). Every built-in group version
//! (and `metrics.k8s.io`, which this server answers itself) has a local APIService, made at
//! start. An APIService that names a Service puts its group version behind that Service:
//! requests under `/apis/<group>/<version>` go there (`forward`), over TLS verified with the
//! APIService's `caBundle` (or not, with `insecureSkipTLSVerify`) as `<svc>.<ns>.svc`, with
//! the front-proxy client certificate and the caller's identity in `X-Remote-User`,
//! `X-Remote-Group` and `X-Remote-Extra-*` (upstream's request-header authentication, whose CA
//! and header names are published in `kube-system/extension-apiserver-authentication`).
//!
//! `register_custom` keeps a local APIService for every group version custom resources are
//! served in, as upstream's crdregistration controller does.
//!
//! `run` keeps the served remotes: on every APIService change and every 10 s it asks each
//! remote for its discovery document (`/apis/<group>/<version>`), keeps it for discovery
//! (legacy and aggregated, merged with this server's own) and writes the `Available`
//! condition (local ones are always available). A remote's document is listed before its
//! condition is written. As upstream, a remote is proxied to only while its last check passed
//! (else 503, and `run` checks again at once); one whose check fails stays in discovery with its
//! last document, `Stale`.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Response, header};
use http_body_util::BodyExt;
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};

use crate::aggregated::{FrontProxy, GROUP, Remote, name_of};
use crate::auth::UserInfo;
use crate::registry::{self, Resource};
use crate::request::Write;
use crate::state::{ApiState, cached_list};
use crate::status::ApiError;
use crate::write::{View, modify};

fn api_services() -> &'static Resource {
    registry::find(GROUP, "v1", "apiservices").expect("APIServices are served")
}

/// The local APIServices: one per built-in group version, and `metrics.k8s.io`'s.
pub fn local_api_services() -> Vec<Value> {
    let mut seen: Vec<(&str, &str)> = Vec::new();
    for resource in registry::RESOURCES {
        if !seen.contains(&(resource.group, resource.version)) {
            seen.push((resource.group, resource.version));
        }
    }
    seen.push((crate::resource_metrics::GROUP, crate::resource_metrics::VERSION));
    seen.into_iter()
        .map(|(group, version)| {
            let priority = if group.is_empty() { 18000 } else { 17000 };
            json!({
                "apiVersion": "apiregistration.k8s.io/v1",
                "kind": "APIService",
                "metadata": {"name": name_of(group, version), "labels": {AUTOMANAGED: "onstart"}},
                "spec": {"group": group, "version": version, "groupPriorityMinimum": priority, "versionPriority": 15},
            })
        })
        .collect()
}

/// The label of the APIServices the server keeps itself; `true` on those of custom resources.
const AUTOMANAGED: &str = "kube-aggregator.kubernetes.io/automanaged";

/// Keeps an APIService for every group version that custom resources are served in (upstream's
/// crdregistration controller: local, `groupPriorityMinimum` 1000, `versionPriority` 100,
/// automanaged `true`), and deletes those no definition serves any more; runs for the life of
/// the server, a pass after every change of the served set.
pub async fn register_custom(state: Arc<ApiState>) {
    let mut changes = state.custom.changes();
    loop {
        if let Err(error) = register_custom_once(&state).await {
            tracing::warn!(error = %error.message, "cannot keep the APIServices of custom resources");
        }
        // A burst of definitions (an operator's install) is one pass.
        tokio::time::sleep(Duration::from_millis(200)).await;
        changes.borrow_and_update();
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// One pass of [`register_custom`].
pub async fn register_custom_once(state: &ApiState) -> Result<(), ApiError> {
    let built_in: HashSet<(&str, &str)> = registry::RESOURCES.iter().map(|r| (r.group, r.version)).collect();
    let custom = state.custom.all();
    let desired: BTreeSet<(&str, &str)> =
        custom.iter().map(|r| (r.group, r.version)).filter(|gv| !built_in.contains(gv)).collect();
    let mut present = HashSet::new();
    for service in cached_list(state, api_services(), None).await? {
        let spec = &service["spec"];
        let group_version = (spec["group"].as_str().unwrap_or_default(), spec["version"].as_str().unwrap_or_default());
        if desired.contains(&group_version) {
            present.insert(name_of(group_version.0, group_version.1));
        } else if service["metadata"]["labels"][AUTOMANAGED] == "true" {
            let name = service["metadata"]["name"].as_str().unwrap_or_default();
            let revision = service["metadata"]["resourceVersion"].as_str().and_then(|v| v.parse().ok());
            match state.store.delete(&api_services().key(None, name), revision).await {
                Ok(_)
                | Err(tugboat_store::StoreError::NotFound { .. } | tugboat_store::StoreError::Conflict { .. }) => {}
                Err(error) => return Err(ApiError::from_store(error, GROUP, "apiservices", name)),
            }
        }
    }
    for (group, version) in desired {
        let name = name_of(group, version);
        if present.contains(&name) {
            continue;
        }
        let service = json!({
            "apiVersion": "apiregistration.k8s.io/v1",
            "kind": "APIService",
            "metadata": {"name": name, "labels": {AUTOMANAGED: "true"}},
            "spec": {"group": group, "version": version, "groupPriorityMinimum": 1000, "versionPriority": 100},
        });
        // Made if absent; one of another owner under the name is left as it is.
        crate::write::put_system_object(state, api_services(), service, &[]).await?;
    }
    Ok(())
}

/// The ConfigMap aggregated servers read to trust the front proxy (and the cluster's clients).
pub fn authentication_config_map(cluster_ca: &str, front_proxy: &FrontProxy) -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "extension-apiserver-authentication", "namespace": "kube-system"},
        "data": {
            "client-ca-file": cluster_ca,
            "requestheader-client-ca-file": front_proxy.ca_pem,
            "requestheader-allowed-names": "[\"front-proxy-client\"]",
            "requestheader-username-headers": "[\"X-Remote-User\"]",
            "requestheader-group-headers": "[\"X-Remote-Group\"]",
            "requestheader-extra-headers-prefix": "[\"X-Remote-Extra-\"]",
            "requestheader-uid-headers": "[\"X-Remote-Uid\"]",
        },
    })
}

/// Made at start: the local APIServices (kept as they are if they exist), the front-proxy
/// ConfigMap and the Role that lets aggregated servers read it (as upstream's
/// `extension-apiserver-authentication-reader`).
pub async fn ensure_objects(state: &ApiState, cluster_ca: &str) -> Result<(), ApiError> {
    for service in local_api_services() {
        crate::write::put_system_object(state, api_services(), service, &[]).await?;
    }
    let config_maps = registry::find("", "v1", "configmaps").expect("config maps are served");
    let config_map = authentication_config_map(cluster_ca, &state.front_proxy);
    crate::write::put_system_object(state, config_maps, config_map, &["data"]).await?;
    let roles = registry::find("rbac.authorization.k8s.io", "v1", "roles").expect("roles are served");
    let role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "extension-apiserver-authentication-reader", "namespace": "kube-system",
                     "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"}},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["extension-apiserver-authentication"],
                   "verbs": ["get", "list", "watch"]}],
    });
    crate::write::put_system_object(state, roles, role, &["rules"]).await
}

/// TLS to an aggregated server: its `caBundle` (or any certificate when told to skip
/// verification), the front-proxy client certificate.
fn connector(remote: &Remote, front_proxy: &FrontProxy) -> Result<tokio_rustls::TlsConnector, String> {
    let (certs, key) = front_proxy.identity()?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let verifier = match &remote.ca_bundle {
        _ if remote.insecure => crate::tls::any_certificate(provider),
        Some(bundle) => {
            use base64::Engine;
            let pem = base64::engine::general_purpose::STANDARD.decode(bundle).map_err(|e| format!("caBundle: {e}"))?;
            crate::tls::trusting(provider, &pem)?
        }
        None => crate::tls::trusting(provider, &[])?,
    };
    let config = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_auth_cert(certs, key)
        .map_err(|e| e.to_string())?;
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// Sends `request` to the remote; its answer, streamed.
async fn send(
    state: &ApiState,
    remote: &Remote,
    mut request: hyper::Request<Body>,
) -> Result<Response<hyper::body::Incoming>, ApiError> {
    let unavailable = |why: String| ApiError::unavailable(format!("error trying to reach service: {why}"));
    let namespace = remote.service["namespace"].as_str().unwrap_or_default();
    let name = remote.service["name"].as_str().unwrap_or_default();
    // HTTP/1.1 requires a Host: Go's servers (as aggregated servers are) answer 400 without one.
    let host = header::HeaderValue::from_str(&format!("{name}.{namespace}.svc"))
        .map_err(|e| ApiError::bad_request(format!("spec.service: {e}")))?;
    request.headers_mut().insert(header::HOST, host);
    let port = remote.service["port"].as_i64().unwrap_or(443);
    let id = format!("https:{name}:{port}");
    let target = crate::outbound::Target { plural: "services", namespace: Some(namespace), id: &id };
    let (_, address, _) =
        crate::outbound::locate(state.store.as_ref(), &target).await.map_err(|e| unavailable(e.message))?;
    let connector = connector(remote, &state.front_proxy).map_err(unavailable)?;
    let tcp = crate::outbound::dial(&address).await.map_err(unavailable)?;
    let server_name = rustls::pki_types::ServerName::try_from(format!("{name}.{namespace}.svc"))
        .map_err(|e| unavailable(e.to_string()))?;
    let tls = connector.connect(server_name, tcp).await.map_err(|e| unavailable(format!("tls: {e}")))?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.map_err(|e| unavailable(e.to_string()))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    sender.send_request(request).await.map_err(|e| unavailable(e.to_string()))
}

/// Headers that are not passed on: the connection's own, and the caller's credentials and
/// impersonation (the remote learns who asks from the front-proxy headers).
fn passed_on(name: &str) -> bool {
    !matches!(
        name,
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "authorization"
    ) && !name.starts_with("impersonate-")
        && !name.starts_with("x-remote-")
}

/// Forwards a request for an aggregated group version to its remote.
pub async fn forward(
    state: &ApiState,
    remote: &Remote,
    user: Option<&UserInfo>,
    request: hyper::Request<Body>,
) -> Result<Response<Body>, ApiError> {
    if !remote.fresh {
        // As upstream's proxy: only an available APIService is proxied to, so what discovery
        // lists and what answers agree. The checker looks again at once.
        state.aggregated.recheck.notify_one();
        return Err(ApiError::unavailable("service unavailable".to_string()));
    }
    let (parts, body) = request.into_parts();
    let uri = parts.uri.path_and_query().map(|p| p.as_str().to_string()).unwrap_or_else(|| "/".into());
    let mut forward = hyper::Request::builder().method(parts.method.clone()).uri(&uri);
    for (name, value) in &parts.headers {
        if passed_on(name.as_str()) {
            forward = forward.header(name, value);
        }
    }
    if let Some(user) = user {
        forward = forward.header("X-Remote-User", &user.name);
        if !user.uid.is_empty() {
            forward = forward.header("X-Remote-Uid", &user.uid);
        }
        for group in &user.groups {
            forward = forward.header("X-Remote-Group", group);
        }
        for (key, values) in &user.extra {
            // Header names are case-insensitive: the key goes URL-escaped, as upstream sends it.
            let key: String = url::form_urlencoded::byte_serialize(key.as_bytes()).collect();
            for value in values {
                forward = forward.header(format!("X-Remote-Extra-{key}"), value);
            }
        }
    }
    let request = forward.body(body).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let response = send(state, remote, request).await?;
    let (parts, body) = response.into_parts();
    let mut answer = Response::builder().status(parts.status);
    for (name, value) in &parts.headers {
        if passed_on(name.as_str()) {
            answer = answer.header(name, value);
        }
    }
    answer.body(Body::new(body)).map_err(|e| ApiError::internal(e.to_string()))
}

/// GETs `path` from the remote; its JSON answer, or why not (as the `Available` condition's
/// reason and message).
async fn check(state: &ApiState, remote: &Remote) -> Result<Value, (&'static str, String)> {
    let path = format!("/apis/{}/{}", remote.group, remote.version);
    let request = hyper::Request::get(&path)
        .header(header::ACCEPT, "application/json")
        .header("X-Remote-User", "system:kube-aggregator")
        .header("X-Remote-Group", "system:masters")
        .body(Body::empty())
        .map_err(|e| ("FailedDiscoveryCheck", e.to_string()))?;
    let response = tokio::time::timeout(Duration::from_secs(5), send(state, remote, request))
        .await
        .map_err(|_| ("FailedDiscoveryCheck", format!("failing or missing response from {path}: timed out")))?
        .map_err(|e| {
            let reason = if e.message.contains("no endpoints") { "MissingEndpoints" } else { "FailedDiscoveryCheck" };
            let reason = if e.message.contains("not found") { "ServiceNotFound" } else { reason };
            (reason, e.message)
        })?;
    let status = response.status();
    let body = tokio::time::timeout(Duration::from_secs(5), response.into_body().collect())
        .await
        .map_err(|_| ("FailedDiscoveryCheck", "timed out reading the discovery document".to_string()))?
        .map_err(|e| ("FailedDiscoveryCheck", e.to_string()))?
        .to_bytes();
    if !status.is_success() {
        return Err((
            "FailedDiscoveryCheck",
            format!("failing or missing response from {path}: bad status from {path}: {}", status.as_u16()),
        ));
    }
    serde_json::from_slice(&body)
        .map_err(|e| ("FailedDiscoveryCheck", format!("the discovery document does not decode: {e}")))
}

fn remote_of(service: &Value) -> Option<Remote> {
    let spec = &service["spec"];
    if !spec["service"].is_object() {
        return None;
    }
    Some(Remote {
        name: service["metadata"]["name"].as_str().unwrap_or_default().to_string(),
        group: spec["group"].as_str().unwrap_or_default().to_string(),
        version: spec["version"].as_str().unwrap_or_default().to_string(),
        service: spec["service"].clone(),
        ca_bundle: spec["caBundle"].as_str().filter(|b| !b.is_empty()).map(str::to_string),
        insecure: spec["insecureSkipTLSVerify"] == true,
        priority: (spec["groupPriorityMinimum"].as_i64().unwrap_or(0), spec["versionPriority"].as_i64().unwrap_or(0)),
        resources: None,
        fresh: false,
    })
}

/// Writes the `Available` condition when it changes.
async fn set_available(state: &ApiState, service: &Value, available: bool, reason: &str, message: &str) {
    let current = service["status"]["conditions"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["type"] == "Available")
        .cloned()
        .unwrap_or_default();
    let status = if available { "True" } else { "False" };
    if current["status"] == status && current["reason"] == reason && current["message"] == message {
        return;
    }
    let name = service["metadata"]["name"].as_str().unwrap_or_default();
    let condition = json!({"type": "Available", "status": status, "reason": reason, "message": message,
        "lastTransitionTime": if current["status"] == status { current["lastTransitionTime"].clone() } else { json!(crate::object::now_rfc3339()) }});
    let result =
        modify(state, (api_services(), None, name), View::Status, &Write::internal("kube-apiserver"), |old, _| {
            let mut object = old.clone();
            object["status"] = json!({"conditions": [condition.clone()]});
            Ok(object)
        })
        .await;
    if let Err(error) = result {
        tracing::debug!(error = %error.message, apiservice = name, "cannot write an APIService's status");
    }
}

/// Keeps the remotes and the `Available` conditions (see the module's documentation).
pub async fn run(state: Arc<ApiState>) {
    let prefix = api_services().prefix(None);
    loop {
        let Ok(cache) = state.caches.get(&prefix).await else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let Some(subscription) = cache.subscribe(&prefix, None) else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        let mut live = subscription.live;
        loop {
            refresh(&state).await;
            tokio::select! {
                changed = tokio::time::timeout(Duration::from_secs(10), live.recv()) => {
                    if let Ok(Err(crate::watch_cache::RecvError::Closed)) = changed {
                        break;
                    }
                }
                () = state.aggregated.recheck.notified() => {}
            }
        }
    }
}

/// Checks every APIService once: the served remotes and their conditions.
pub async fn refresh(state: &ApiState) {
    let Ok(services) = cached_list(state, api_services(), None).await else { return };
    let previous = state.aggregated.all();
    let mut remotes = HashMap::new();
    for service in &services {
        let Some(mut remote) = remote_of(service) else {
            set_available(state, service, true, "Local", "Local APIServices are always available").await;
            continue;
        };
        let key = format!("{}/{}", remote.group, remote.version);
        match check(state, &remote).await {
            Ok(document) => {
                remote.resources = Some(document);
                remote.fresh = true;
                // Discovery lists the group version before its APIService says Available: a
                // client that waited for the condition finds the resources (client-go's
                // discovery drops a `Stale` group version as failed).
                state.aggregated.publish(&key, remote.clone());
                set_available(state, service, true, "Passed", "all checks passed").await;
            }
            Err((reason, message)) => {
                // The last document the remote gave stays listed, marked `Stale` (as upstream).
                remote.resources = previous.get(&key).and_then(|r| r.resources.clone());
                set_available(state, service, false, reason, &message).await;
            }
        }
        // Kept whether or not it answers now: its requests get 503 until it does.
        remotes.insert(key, remote);
    }
    *state.aggregated.remotes.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(remotes);
}

/// Adds the remote groups to `/apis` (legacy APIGroupList).
pub fn merge_group_list(state: &ApiState, list: &mut Value) {
    let remotes = state.aggregated.all();
    if remotes.is_empty() {
        return;
    }
    let Some(groups) = list["groups"].as_array_mut() else { return };
    let mut sorted: Vec<&Remote> = remotes.values().collect();
    sorted.sort_by(|a, b| b.priority.1.cmp(&a.priority.1).then(a.version.cmp(&b.version)));
    for remote in sorted {
        let entry = json!({"groupVersion": format!("{}/{}", remote.group, remote.version), "version": remote.version});
        match groups.iter_mut().find(|g| g["name"] == remote.group.as_str()) {
            Some(group) => {
                let versions = group["versions"].as_array_mut();
                if let Some(versions) = versions
                    && !versions.iter().any(|v| v["version"] == remote.version.as_str())
                {
                    versions.push(entry);
                }
            }
            None => groups.push(json!({"name": remote.group, "versions": [entry.clone()], "preferredVersion": entry})),
        }
    }
}

/// `/apis/<group>` for a group only remotes serve.
pub fn group(state: &ApiState, group: &str) -> Option<Value> {
    let mut list = json!({"groups": []});
    merge_group_list(state, &mut list);
    let found = list["groups"].as_array()?.iter().find(|g| g["name"] == group)?.clone();
    let mut found = found;
    found["kind"] = json!("APIGroup");
    found["apiVersion"] = json!("v1");
    Some(found)
}

/// Adds the remote group versions to aggregated discovery (`apidiscovery.k8s.io`), from the
/// discovery documents the remotes gave; a remote that has not answered is listed `Stale`.
pub fn merge_aggregated(state: &ApiState, document: &mut Value) {
    let remotes = state.aggregated.all();
    if remotes.is_empty() {
        return;
    }
    let Some(items) = document["items"].as_array_mut() else { return };
    for remote in remotes.values() {
        let resources = remote.resources.as_ref().map(discovery_resources).unwrap_or_default();
        let freshness = if remote.fresh { "Current" } else { "Stale" };
        let version = json!({"version": remote.version, "resources": resources, "freshness": freshness});
        match items.iter_mut().find(|g| g["metadata"]["name"] == remote.group.as_str()) {
            Some(group) => {
                if let Some(versions) = group["versions"].as_array_mut() {
                    versions.retain(|v| v["version"] != remote.version.as_str());
                    versions.insert(0, version);
                }
            }
            None => items
                .push(json!({"metadata": {"name": remote.group, "creationTimestamp": null}, "versions": [version]})),
        }
    }
}

/// An APIResourceList's resources as aggregated discovery lists them.
fn discovery_resources(list: &Value) -> Vec<Value> {
    let (group, version) = match list["groupVersion"].as_str().unwrap_or_default().split_once('/') {
        Some((g, v)) => (g.to_string(), v.to_string()),
        None => (String::new(), list["groupVersion"].as_str().unwrap_or_default().to_string()),
    };
    let all = list["resources"].as_array().cloned().unwrap_or_default();
    let mut resources: Vec<Value> = Vec::new();
    for item in all.iter().filter(|r| !r["name"].as_str().unwrap_or_default().contains('/')) {
        let name = item["name"].as_str().unwrap_or_default();
        let subresources: Vec<Value> = all
            .iter()
            .filter_map(|r| {
                let (parent, sub) = r["name"].as_str()?.split_once('/')?;
                (parent == name).then(|| {
                    json!({"subresource": sub, "verbs": r["verbs"],
                        "responseKind": {"group": group, "version": version, "kind": r["kind"]}})
                })
            })
            .collect();
        let mut entry = json!({
            "resource": name,
            "responseKind": {"group": group, "version": version, "kind": item["kind"]},
            "scope": if item["namespaced"] == true { "Namespaced" } else { "Cluster" },
            "singularResource": item["singularName"],
            "verbs": item["verbs"],
        });
        for field in ["shortNames", "categories"] {
            if item[field].as_array().is_some_and(|l| !l.is_empty()) {
                entry[field] = item[field].clone();
            }
        }
        if !subresources.is_empty() {
            entry["subresources"] = json!(subresources);
        }
        resources.push(entry);
    }
    resources
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregated::validate;

    #[test]
    fn api_services_are_validated_as_upstream() {
        let good = json!({"metadata": {"name": "v1alpha1.wardle.example.com"},
            "spec": {"group": "wardle.example.com", "version": "v1alpha1", "groupPriorityMinimum": 2000, "versionPriority": 200,
                     "service": {"namespace": "ns", "name": "api"}, "caBundle": "UEVN"}});
        assert!(validate(&good).is_empty());
        let mut bad = good.clone();
        bad["metadata"]["name"] = json!("wrong");
        bad["spec"]["insecureSkipTLSVerify"] = json!(true);
        bad["spec"]["groupPriorityMinimum"] = json!(0);
        let fields: Vec<String> = validate(&bad).into_iter().map(|c| c.field).collect();
        assert_eq!(fields, ["metadata.name", "spec.groupPriorityMinimum", "spec.insecureSkipTLSVerify"]);
    }

    #[test]
    fn every_built_in_group_version_has_a_local_api_service() {
        let local = local_api_services();
        let names: Vec<&str> = local.iter().filter_map(|s| s["metadata"]["name"].as_str()).collect();
        for expected in ["v1.", "v1.apps", "v1.admissionregistration.k8s.io", "v1beta1.metrics.k8s.io"] {
            assert!(names.contains(&expected), "{expected} in {names:?}");
        }
        assert!(local.iter().all(|s| validate(s).is_empty()));
    }

    #[test]
    fn resource_lists_become_aggregated_discovery() {
        let list = json!({"groupVersion": "wardle.example.com/v1alpha1", "resources": [
            {"name": "flunders", "singularName": "flunder", "namespaced": true, "kind": "Flunder", "verbs": ["get", "list"], "shortNames": ["fl"]},
            {"name": "flunders/status", "namespaced": true, "kind": "Flunder", "verbs": ["get", "patch"]},
        ]});
        let resources = discovery_resources(&list);
        assert_eq!(resources.len(), 1);
        assert_eq!(resources[0]["scope"], "Namespaced");
        assert_eq!(resources[0]["responseKind"]["kind"], "Flunder");
        assert_eq!(resources[0]["subresources"][0]["subresource"], "status");
        assert_eq!(resources[0]["shortNames"], json!(["fl"]));
    }
}
