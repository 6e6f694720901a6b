//! Joining nodes, as kubeadm sets it up (the token and JWS helpers are
//! `tugboat_pki::bootstrap`): bootstrap tokens authenticate as `system:bootstrap:<id>` in group
//! `system:bootstrappers`; `cluster-info` in kube-public (readable without credentials) holds a
//! kubeconfig with the cluster CA and this server's address, which the controller manager's
//! bootstrap signer signs per token; `tugboat server` makes a join token at first start.

use std::path::Path;

use serde_json::{Value, json};
pub use tugboat_pki::bootstrap::*;

use crate::auth::UserInfo;
use crate::registry;
use crate::state::ApiState;
use crate::status::ApiError;

/// The user a bootstrap token stands for, if its Secret exists, matches and is usable now.
pub async fn authenticate(state: &ApiState, token: &str) -> Option<UserInfo> {
    let (id, given) = parse(token)?;
    let secrets = registry::find("", "v1", "secrets").expect("secrets are served");
    let name = format!("{SECRET_PREFIX}{id}");
    let secret = crate::state::cached_get(state, secrets, Some(NAMESPACE), &name).await.ok()??;
    let stored = field(&secret, "token-secret")?;
    if secret["type"] != SECRET_TYPE
        || !same(stored.as_bytes(), given.as_bytes())
        || field(&secret, "usage-bootstrap-authentication").as_deref() != Some("true")
        || expired(&secret, unix_now())
        || secret["metadata"]["deletionTimestamp"].is_string()
    {
        return None;
    }
    let mut groups = vec![GROUP.to_string()];
    for group in field(&secret, "auth-extra-groups").unwrap_or_default().split(',').map(str::trim) {
        if group.starts_with("system:bootstrappers:") && !groups.iter().any(|g| g == group) {
            groups.push(group.to_string());
        }
    }
    Some(UserInfo::new(format!("system:bootstrap:{id}"), String::new(), groups))
}

/// Creates an object directly in the store (a server-made object; an existing one is kept).
async fn create(state: &ApiState, plural: &str, namespace: &str, mut object: Value) -> Result<(), ApiError> {
    let resource = registry::find("", "v1", plural).expect("core resources are served");
    let name = object["metadata"]["name"].as_str().unwrap_or_default().to_string();
    crate::object::prepare_create(resource, Some(namespace), &mut object)?;
    match state.store.create(&resource.key(Some(namespace), &name), crate::object::to_store(resource, &object)).await {
        Ok(_) | Err(tugboat_store::StoreError::AlreadyExists { .. }) => Ok(()),
        Err(error) => Err(ApiError::from_store(error, "", plural, &name)),
    }
}

/// Makes or updates `cluster-info` (its kubeconfig; signatures are the signer's).
pub async fn publish_cluster_info(state: &ApiState, server: &str, ca_pem: &str) -> Result<(), ApiError> {
    let maps = registry::find("", "v1", "configmaps").expect("configmaps are served");
    let kubeconfig = cluster_info_kubeconfig(server, ca_pem);
    match crate::state::read_object(state, maps, Some(PUBLIC_NAMESPACE), CLUSTER_INFO).await {
        Ok((map, _)) if map["data"]["kubeconfig"] == kubeconfig.as_str() => Ok(()),
        // Another server of the same cluster (same CA) published it: several servers must
        // not take turns rewriting it, which would void the signatures joins check.
        Ok((map, _)) if same_ca(map["data"]["kubeconfig"].as_str().unwrap_or_default(), &kubeconfig) => Ok(()),
        Ok((old, revision)) => {
            let mut map = old.clone();
            map["data"]["kubeconfig"] = json!(kubeconfig);
            crate::object::prepare_update(maps, &old, &mut map)?;
            let key = maps.key(Some(PUBLIC_NAMESPACE), CLUSTER_INFO);
            state
                .store
                .update(&key, crate::object::to_store(maps, &map), revision)
                .await
                .map(|_| ())
                .map_err(|e| ApiError::from_store(e, "", "configmaps", CLUSTER_INFO))
        }
        Err(error) if error.code == 404 => {
            let map = json!({"apiVersion": "v1", "kind": "ConfigMap",
                "metadata": {"name": CLUSTER_INFO, "namespace": PUBLIC_NAMESPACE},
                "data": {"kubeconfig": kubeconfig}});
            create(state, "configmaps", PUBLIC_NAMESPACE, map).await
        }
        Err(error) => Err(error),
    }
}

/// Whether two cluster-info kubeconfigs carry the same CA.
fn same_ca(a: &str, b: &str) -> bool {
    let ca = |k: &str| {
        k.lines().find(|l| l.trim_start().starts_with("certificate-authority-data:")).map(str::trim).map(str::to_string)
    };
    ca(a).is_some() && ca(a) == ca(b)
}

/// The join token in `<data-dir>/token`, made (valid `ttl` seconds) if there is none or the
/// one there no longer works.
pub async fn ensure_join_token(state: &ApiState, data_dir: &Path, ttl: u64) -> Result<String, ApiError> {
    let path = data_dir.join("token");
    let secrets = registry::find("", "v1", "secrets").expect("secrets are served");
    if let Some(token) = std::fs::read_to_string(&path).ok().map(|t| t.trim().to_string())
        && let Some((id, _)) = parse(&token)
        && let Ok((secret, _)) =
            crate::state::read_object(state, secrets, Some(NAMESPACE), &format!("{SECRET_PREFIX}{id}")).await
        && !expired(&secret, unix_now())
    {
        return Ok(token);
    }
    let token = generate();
    let secret = secret(&token, ttl, unix_now(), "The join token made by tugboat server.", &[NODE_TOKEN_GROUP])
        .expect("a generated token is well formed");
    create(state, "secrets", NAMESPACE, secret).await?;
    tugboat_pki::write_file(&path, format!("{token}\n").as_bytes(), 0o600)
        .map_err(|e| ApiError::internal(format!("writing {}: {e}", path.display())))?;
    Ok(token)
}
