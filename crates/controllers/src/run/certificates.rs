//! CertificateSigningRequests: the approver (upstream's `csrapproving`) approves kubelets'
//! client certificates, asked by a bootstrap token's user (joining) or by the node itself
//! (renewing), and the signer (`csrsigning`) signs approved requests of the built-in signers
//! with the cluster CA.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use kube::api::{Api, ListParams, PostParams};
use serde_json::{Value, json};
use tugboat_pki::{ClusterCa, Usage};

const PERIOD: Duration = Duration::from_millis(500);
pub const KUBELET_CLIENT: &str = "kubernetes.io/kube-apiserver-client-kubelet";
const CLIENT: &str = "kubernetes.io/kube-apiserver-client";
const KUBELET_SERVING: &str = "kubernetes.io/kubelet-serving";
/// Upstream's `--cluster-signing-duration`.
const MAX_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);

fn condition(csr: &Value, kind: &str) -> bool {
    csr["status"]["conditions"].as_array().into_iter().flatten().any(|c| c["type"] == kind && c["status"] != "False")
}

/// Whether the approver approves `csr` (pending, a kubelet's client certificate for the node
/// it names, asked by a bootstrapper or by that node).
pub fn approves(csr: &Value) -> bool {
    if condition(csr, "Approved") || condition(csr, "Denied") || csr["spec"]["signerName"] != KUBELET_CLIENT {
        return false;
    }
    let Some(request) = csr["spec"]["request"].as_str().and_then(decode) else { return false };
    let Some((common_name, organizations)) = tugboat_pki::request_subject(&request) else { return false };
    let Some(node) = common_name.strip_prefix("system:node:").filter(|n| !n.is_empty()) else { return false };
    if organizations != ["system:nodes"] {
        return false;
    }
    let usages: Vec<&str> = csr["spec"]["usages"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if !usages.contains(&"client auth")
        || usages.iter().any(|u| !["digital signature", "key encipherment", "client auth"].contains(u))
    {
        return false;
    }
    let username = csr["spec"]["username"].as_str().unwrap_or_default();
    let groups: Vec<&str> = csr["spec"]["groups"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    groups.contains(&"system:bootstrappers") || username == format!("system:node:{node}")
}

fn decode(b64: &str) -> Option<String> {
    use base64::Engine;
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).ok()?).ok()
}

/// The certificate (PEM) for an approved, unsigned request of a built-in signer.
pub fn sign(ca: &ClusterCa, csr: &Value) -> Option<Result<String, String>> {
    if !condition(csr, "Approved") || condition(csr, "Denied") || condition(csr, "Failed") {
        return None;
    }
    if csr["status"]["certificate"].as_str().is_some_and(|c| !c.is_empty()) {
        return None;
    }
    let usage = match csr["spec"]["signerName"].as_str()? {
        KUBELET_CLIENT | CLIENT => Usage::Client,
        KUBELET_SERVING => Usage::Server,
        _ => return None,
    };
    let validity = csr["spec"]["expirationSeconds"]
        .as_u64()
        .map(|s| Duration::from_secs(s.max(600)).min(MAX_VALIDITY))
        .unwrap_or(MAX_VALIDITY);
    let Some(request) = csr["spec"]["request"].as_str().and_then(decode) else {
        return Some(Err("the request is not base64 PEM".into()));
    };
    Some(ca.sign_request(&request, usage, validity).map_err(|e| e.to_string()))
}

pub(super) async fn run_certificates(client: kube::Client, ca: Arc<ClusterCa>) -> anyhow::Result<()> {
    let api: Api<CertificateSigningRequest> = Api::all(client);
    tracing::info!("certificate approver and signer started");
    loop {
        if let Err(error) = pass(&api, &ca).await {
            tracing::debug!(%error, "certificates");
        }
        tokio::time::sleep(PERIOD).await;
    }
}

async fn pass(api: &Api<CertificateSigningRequest>, ca: &ClusterCa) -> anyhow::Result<()> {
    let now = jiff::Timestamp::now().to_string();
    for csr in api.list(&ListParams::default()).await? {
        let name = csr.metadata.name.clone().unwrap_or_default();
        let mut value = serde_json::to_value(&csr)?;
        if approves(&value) {
            let conditions = value["status"]["conditions"].as_array().cloned().unwrap_or_default();
            let mut conditions = conditions;
            conditions.push(json!({"type": "Approved", "status": "True", "reason": "AutoApproved",
                "message": "Auto approving kubelet client certificate after SubjectAccessReview.",
                "lastUpdateTime": now, "lastTransitionTime": now}));
            value["status"]["conditions"] = Value::Array(conditions);
            let approved: CertificateSigningRequest = serde_json::from_value(value)?;
            value = serde_json::to_value(
                api.replace_subresource("approval", &name, &PostParams::default(), &approved).await?,
            )?;
            tracing::info!(csr = %name, "approved a kubelet client certificate");
        }
        match sign(ca, &value) {
            Some(Ok(pem)) => {
                use base64::Engine;
                value["status"]["certificate"] = json!(base64::engine::general_purpose::STANDARD.encode(pem));
                api.replace_status(
                    &name,
                    &PostParams::default(),
                    &serde_json::from_value::<CertificateSigningRequest>(value)?,
                )
                .await?;
                tracing::info!(csr = %name, "signed a certificate");
            }
            Some(Err(message)) => {
                let mut conditions = value["status"]["conditions"].as_array().cloned().unwrap_or_default();
                conditions.push(json!({"type": "Failed", "status": "True", "reason": "SignerValidationFailure",
                    "message": message, "lastUpdateTime": now, "lastTransitionTime": now}));
                value["status"]["conditions"] = Value::Array(conditions);
                api.replace_status(
                    &name,
                    &PostParams::default(),
                    &serde_json::from_value::<CertificateSigningRequest>(value)?,
                )
                .await?;
            }
            None => {}
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine;

    fn csr(cn: &str, orgs: &[&str], usages: &[&str], username: &str, groups: &[&str]) -> Value {
        let (request, _) = tugboat_pki::certificate_request(cn, orgs).unwrap();
        json!({"metadata": {"name": "c"}, "spec": {
            "request": base64::engine::general_purpose::STANDARD.encode(request), "signerName": KUBELET_CLIENT,
            "usages": usages, "username": username, "groups": groups}})
    }

    #[test]
    fn kubelet_client_certificates_of_bootstrappers_and_their_node_are_approved() {
        let usages = ["digital signature", "client auth"];
        let joining =
            csr("system:node:n1", &["system:nodes"], &usages, "system:bootstrap:abcdef", &["system:bootstrappers"]);
        assert!(approves(&joining));
        assert!(approves(&csr("system:node:n1", &["system:nodes"], &usages, "system:node:n1", &["system:nodes"])));
        assert!(
            !approves(&csr("system:node:n1", &["system:nodes"], &usages, "system:node:n2", &["system:nodes"])),
            "another node"
        );
        assert!(!approves(&csr("admin", &["system:masters"], &usages, "x", &["system:bootstrappers"])), "not a node");
        assert!(!approves(&csr("system:node:n1", &["system:nodes"], &["server auth"], "x", &["system:bootstrappers"])));
        let mut done = joining.clone();
        done["status"]["conditions"] = json!([{"type": "Approved", "status": "True"}]);
        assert!(!approves(&done));

        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::load_or_create(dir.path()).unwrap();
        assert!(sign(&ca, &joining).is_none(), "not approved yet");
        let pem = sign(&ca, &done).unwrap().unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        done["status"]["certificate"] = json!("x");
        assert!(sign(&ca, &done).is_none(), "signed already");
    }
}
