//! CertificateSigningRequests: the approver (upstream's `csrapproving`) approves kubelets'
//! client certificates, asked by a bootstrap token's user (joining) or by the node itself
//! (renewing), and kubelets' serving certificates asked by the node itself (or an admin: a
//! server's own kubelet), as k3s does (upstream leaves those to a person); the signer
//! (`csrsigning`) signs approved requests of the built-in signers with the cluster CA.

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

fn condition(csr: &Value, kind: &str) -> bool {
    csr["status"]["conditions"].as_array().into_iter().flatten().any(|c| c["type"] == kind && c["status"] != "False")
}

/// Whether the approver approves `csr`: pending, for node `system:node:<n>` (organization
/// `system:nodes`), and either a kubelet client certificate asked by a bootstrapper or by that
/// node, or a kubelet serving certificate asked by that node or an admin.
pub fn approves(csr: &Value) -> bool {
    if condition(csr, "Approved") || condition(csr, "Denied") {
        return false;
    }
    let (wanted, allowed): (&str, &[&str]) = match csr["spec"]["signerName"].as_str() {
        Some(KUBELET_CLIENT) => ("client auth", &["digital signature", "key encipherment", "client auth"]),
        Some(KUBELET_SERVING) => ("server auth", &["digital signature", "key encipherment", "server auth"]),
        _ => return false,
    };
    let Some(request) = csr["spec"]["request"].as_str().and_then(decode) else { return false };
    let Some((common_name, organizations)) = tugboat_pki::request_subject(&request) else { return false };
    let Some(node) = common_name.strip_prefix("system:node:").filter(|n| !n.is_empty()) else { return false };
    if organizations != ["system:nodes"] {
        return false;
    }
    let usages: Vec<&str> = csr["spec"]["usages"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    if !usages.contains(&wanted) || usages.iter().any(|u| !allowed.contains(u)) {
        return false;
    }
    let username = csr["spec"]["username"].as_str().unwrap_or_default();
    let groups: Vec<&str> = csr["spec"]["groups"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let the_node = username == format!("system:node:{node}");
    if csr["spec"]["signerName"] == KUBELET_SERVING {
        the_node || groups.contains(&"system:masters")
    } else {
        the_node || groups.contains(&"system:bootstrappers")
    }
}

fn decode(b64: &str) -> Option<String> {
    use base64::Engine;
    String::from_utf8(base64::engine::general_purpose::STANDARD.decode(b64).ok()?).ok()
}

/// The certificate (PEM) for an approved, unsigned request of a built-in signer.
pub fn sign(ca: &ClusterCa, csr: &Value, longest: Duration) -> Option<Result<String, String>> {
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
        .map(|s| Duration::from_secs(s.max(600)).min(longest))
        .unwrap_or(longest);
    let Some(request) = csr["spec"]["request"].as_str().and_then(decode) else {
        return Some(Err("the request is not base64 PEM".into()));
    };
    Some(ca.sign_request(&request, usage, validity).map_err(|e| e.to_string()))
}

pub(super) async fn run_certificates(
    client: kube::Client,
    ca: Arc<ClusterCa>,
    longest: Duration,
) -> anyhow::Result<()> {
    let api: Api<CertificateSigningRequest> = Api::all(client);
    tracing::info!("certificate approver and signer started");
    loop {
        if let Err(error) = pass(&api, &ca, longest).await {
            tracing::debug!(%error, "certificates");
        }
        tokio::time::sleep(PERIOD).await;
    }
}

async fn pass(api: &Api<CertificateSigningRequest>, ca: &ClusterCa, longest: Duration) -> anyhow::Result<()> {
    let now = jiff::Timestamp::now().to_string();
    for csr in api.list(&ListParams::default()).await? {
        let name = csr.metadata.name.clone().unwrap_or_default();
        let mut value = serde_json::to_value(&csr)?;
        if approves(&value) {
            let conditions = value["status"]["conditions"].as_array().cloned().unwrap_or_default();
            let mut conditions = conditions;
            let what = if value["spec"]["signerName"] == KUBELET_SERVING { "serving" } else { "client" };
            conditions.push(json!({"type": "Approved", "status": "True", "reason": "AutoApproved",
                "message": format!("Auto approving kubelet {what} certificate after SubjectAccessReview."),
                "lastUpdateTime": now, "lastTransitionTime": now}));
            value["status"]["conditions"] = Value::Array(conditions);
            let approved: CertificateSigningRequest = serde_json::from_value(value)?;
            value = serde_json::to_value(
                api.replace_subresource("approval", &name, &PostParams::default(), &approved).await?,
            )?;
            tracing::info!(csr = %name, kind = what, "approved a kubelet certificate");
        }
        match sign(ca, &value, longest) {
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
        assert!(sign(&ca, &joining, Duration::from_secs(3600)).is_none(), "not approved yet");
        let pem = sign(&ca, &done, Duration::from_secs(3600)).unwrap().unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let (_, valid_until) = tugboat_pki::validity(&pem).unwrap();
        assert!(valid_until - jiff::Timestamp::now().as_second() <= 3600, "no longer than --cluster-signing-duration");
        done["status"]["certificate"] = json!("x");
        assert!(sign(&ca, &done, Duration::from_secs(3600)).is_none(), "signed already");
    }

    #[test]
    fn kubelet_serving_certificates_of_their_node_or_an_admin_are_approved() {
        let serving = |username: &str, groups: &[&str], usages: &[&str]| {
            let mut csr = csr("system:node:n1", &["system:nodes"], usages, username, groups);
            csr["spec"]["signerName"] = json!(KUBELET_SERVING);
            csr
        };
        let usages = ["digital signature", "server auth"];
        assert!(approves(&serving("system:node:n1", &["system:nodes"], &usages)));
        assert!(approves(&serving("kubernetes-admin", &["system:masters"], &usages)));
        assert!(!approves(&serving("system:node:n2", &["system:nodes"], &usages)), "another node");
        assert!(!approves(&serving("system:bootstrap:abcdef", &["system:bootstrappers"], &usages)), "a bootstrapper");
        assert!(!approves(&serving("system:node:n1", &["system:nodes"], &["client auth"])), "a client usage");
    }
}
