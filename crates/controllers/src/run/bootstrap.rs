//! The bootstrap signer and token cleaner (upstream's `bootstrapsigner` and `tokencleaner`):
//! `cluster-info` in kube-public carries a signature (`jws-kubeconfig-<id>`) of its kubeconfig
//! for every valid bootstrap token meant for signing, and nothing else; expired token Secrets
//! are deleted. Looked at every few seconds (kube-system holds few Secrets).

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use tugboat_pki::bootstrap::{self as tokens, CLUSTER_INFO, JWS_PREFIX, NAMESPACE, PUBLIC_NAMESPACE, SECRET_TYPE};

const PERIOD: Duration = Duration::from_secs(2);

/// The signatures `cluster-info`'s `kubeconfig` should carry, by data key, for these token
/// Secrets at `now`.
pub fn signatures(kubeconfig: &str, secrets: &[serde_json::Value], now: i64) -> BTreeMap<String, String> {
    secrets
        .iter()
        .filter(|s| s["type"] == SECRET_TYPE && !tokens::expired(s, now))
        .filter(|s| tokens::field(s, "usage-bootstrap-signing").as_deref() == Some("true"))
        .filter_map(|s| {
            let (id, secret) = (tokens::field(s, "token-id")?, tokens::field(s, "token-secret")?);
            Some((format!("{JWS_PREFIX}{id}"), tokens::detached_jws(kubeconfig, &id, &secret)))
        })
        .collect()
}

pub(super) async fn run_bootstrap_signer(client: kube::Client) -> anyhow::Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), NAMESPACE);
    let maps: Api<ConfigMap> = Api::namespaced(client, PUBLIC_NAMESPACE);
    tracing::info!("bootstrap signer and token cleaner started");
    loop {
        if let Err(error) = pass(&secrets, &maps).await {
            tracing::debug!(%error, "bootstrap signer");
        }
        tokio::time::sleep(PERIOD).await;
    }
}

async fn pass(secrets: &Api<Secret>, maps: &Api<ConfigMap>) -> anyhow::Result<()> {
    let now = tokens::unix_now();
    let mut valid = Vec::new();
    for secret in secrets.list(&ListParams::default()).await? {
        let value = serde_json::to_value(&secret)?;
        if value["type"] != SECRET_TYPE {
            continue;
        }
        if tokens::expired(&value, now) {
            let name = secret.metadata.name.clone().unwrap_or_default();
            tracing::info!(secret = %name, "deleting an expired bootstrap token");
            let _ = secrets.delete(&name, &DeleteParams::default()).await;
            continue;
        }
        valid.push(value);
    }
    let Some(mut map) = maps.get_opt(CLUSTER_INFO).await? else { return Ok(()) };
    let mut data = map.data.clone().unwrap_or_default();
    let Some(kubeconfig) = data.get("kubeconfig").cloned() else { return Ok(()) };
    let wanted = signatures(&kubeconfig, &valid, now);
    let before = data.clone();
    data.retain(|key, _| !key.starts_with(JWS_PREFIX));
    data.extend(wanted);
    if data != before {
        map.data = Some(data);
        maps.replace(CLUSTER_INFO, &PostParams::default(), &map).await?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn valid_signing_tokens_get_a_signature() {
        let now = 1_700_000_000;
        let good = tokens::secret("abcdef.0123456789abcdef", 3600, now, "", &[]).unwrap();
        let old = tokens::secret("zzzzzz.0123456789abcdef", 10, now - 100, "", &[]).unwrap();
        let mut auth_only = tokens::secret("yyyyyy.0123456789abcdef", 0, now, "", &[]).unwrap();
        auth_only["data"].as_object_mut().unwrap().remove("usage-bootstrap-signing");
        let wanted = signatures("config", &[good, old, auth_only], now);
        assert_eq!(wanted.keys().collect::<Vec<_>>(), ["jws-kubeconfig-abcdef"]);
        assert!(tokens::verify_jws("config", &wanted["jws-kubeconfig-abcdef"], "abcdef.0123456789abcdef"));
    }
}
