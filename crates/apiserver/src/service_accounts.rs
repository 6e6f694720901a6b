//! Service account tokens, as upstream's TokenRequest API and ServiceAccount admission make
//! them:
//!
//! - `POST /api/v1/namespaces/<ns>/serviceaccounts/<name>/token` (`kubectl create token`, the
//!   kubelet's projected `serviceAccountToken` volumes) signs a JWT (ES256, key
//!   `<data-dir>/pki/sa.key`, made once) for the account, bound to a pod or secret if asked.
//! - A bearer token that is such a JWT authenticates as `system:serviceaccount:<ns>:<name>`
//!   (groups `system:serviceaccounts`, `system:serviceaccounts:<ns>`) while it has not
//!   expired, its audience includes the API's, and the account and the object it is bound to
//!   still exist with the uids it names.
//! - New pods get `serviceAccountName: default` and, unless automounting is off (pod or
//!   account), the `kube-api-access-<random>` projected volume (token, `kube-root-ca.crt`,
//!   namespace) mounted at `/var/run/secrets/kubernetes.io/serviceaccount` in every container.

use serde_json::{Value, json};

use crate::auth::UserInfo;
use crate::registry;
use crate::state::ApiState;
use crate::status::{ApiError, Cause};

/// The issuer (and default API audience), as kubeadm configures it.
pub const ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const DEFAULT_EXPIRATION: i64 = 3600;
const MIN_EXPIRATION: i64 = 600;
/// Upstream's `--service-account-max-token-expiration` is unset by default; a bound is kinder.
const MAX_EXPIRATION: i64 = 48 * 3600;
/// What kubelets ask for, and how long such tokens are valid (see `token_request`).
const KUBELET_EXPIRATION: i64 = 3607;
const EXTENDED_EXPIRATION: i64 = 365 * 24 * 3600;
pub const MOUNT_PATH: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

fn timestamp(seconds: i64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(seconds).map(|t| t.to_string()).unwrap_or_default()
}

fn invalid(name: &str, field: &str, message: String) -> ApiError {
    ApiError::invalid(
        "authentication.k8s.io",
        "TokenRequest",
        name,
        vec![Cause { reason: "FieldValueInvalid", message, field: field.into() }],
    )
}

async fn cached(state: &ApiState, plural: &str, namespace: &str, name: &str) -> Result<Option<Value>, ApiError> {
    let resource = registry::find("", "v1", plural).expect("core resources are served");
    crate::state::cached_get(state, resource, Some(namespace), name).await
}

/// `POST serviceaccounts/<name>/token`: a TokenRequest answered with a signed token.
pub async fn token_request(state: &ApiState, namespace: &str, name: &str, request: Value) -> Result<Value, ApiError> {
    let accounts = registry::find("", "v1", "serviceaccounts").expect("service accounts are served");
    let (account, _) = crate::state::read_object(state, accounts, Some(namespace), name).await?;
    let spec = &request["spec"];
    let expiration = match &spec["expirationSeconds"] {
        Value::Null => DEFAULT_EXPIRATION,
        value => value.as_i64().ok_or_else(|| {
            invalid(name, "spec.expirationSeconds", format!("Invalid value: {value}: must be an integer"))
        })?,
    };
    if expiration < MIN_EXPIRATION {
        return Err(invalid(
            name,
            "spec.expirationSeconds",
            format!("Invalid value: {expiration}: may not specify a duration less than 10 minutes"),
        ));
    }
    let expiration = expiration.min(MAX_EXPIRATION);
    let audiences: Vec<String> = spec["audiences"]
        .as_array()
        .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
        .filter(|a: &Vec<String>| !a.is_empty())
        .unwrap_or_else(|| vec![ISSUER.to_string()]);
    let mut bound = json!({
        "namespace": namespace,
        "serviceaccount": {"name": name, "uid": account["metadata"]["uid"]},
    });
    let reference = &spec["boundObjectRef"];
    if reference.is_object() {
        let kind = reference["kind"].as_str().unwrap_or_default();
        let plural = match kind {
            "Pod" => "pods",
            "Secret" => "secrets",
            _ => {
                return Err(invalid(
                    name,
                    "spec.boundObjectRef.kind",
                    format!("Unsupported value: {:?}: supported values: \"Pod\", \"Secret\"", kind),
                ));
            }
        };
        let object_name = reference["name"].as_str().unwrap_or_default();
        let object = cached(state, plural, namespace, object_name).await?.ok_or_else(|| {
            invalid(name, "spec.boundObjectRef.name", format!("Not found: {plural} {object_name:?} not found"))
        })?;
        let uid = &object["metadata"]["uid"];
        if reference["uid"].as_str().is_some_and(|u| !u.is_empty() && uid != u) {
            return Err(ApiError::new(
                409,
                "Conflict",
                format!(
                    "the UID in the bound object reference ({}) does not match the UID in record ({uid})",
                    reference["uid"]
                ),
            ));
        }
        bound[kind.to_ascii_lowercase()] = json!({"name": object_name, "uid": uid});
        // A pod's token names its node too (upstream's ServiceAccountTokenPodNodeInfo).
        if let Some(node_name) = object["spec"]["nodeName"].as_str().filter(|n| !n.is_empty() && kind == "Pod") {
            let nodes = registry::find("", "v1", "nodes").expect("nodes are served");
            if let Some(node) = crate::state::cached_get(state, nodes, None, node_name).await? {
                bound["node"] = json!({"name": node_name, "uid": node["metadata"]["uid"]});
            }
        }
    }
    let now = unix_now();
    // Upstream's --service-account-extend-token-expiration: the kubelet's pod-bound tokens
    // (3607 s) stay valid a year and carry when they should have been refreshed.
    let mut valid_for = expiration;
    if expiration == KUBELET_EXPIRATION && bound.get("pod").is_some() {
        valid_for = EXTENDED_EXPIRATION;
        bound["warnafter"] = json!(now + expiration);
    }
    let claims = json!({
        "aud": audiences,
        "exp": now + valid_for,
        "iat": now,
        "nbf": now,
        "iss": ISSUER,
        "jti": uuid::Uuid::new_v4().to_string(),
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "kubernetes.io": bound,
    });
    let token = state.signer.sign(&claims)?;
    let mut spec = spec.clone();
    if !spec.is_object() {
        spec = json!({});
    }
    spec["audiences"] = json!(audiences);
    spec["expirationSeconds"] = json!(expiration);
    Ok(json!({
        "kind": "TokenRequest",
        "apiVersion": "authentication.k8s.io/v1",
        "metadata": {"name": name, "namespace": namespace, "creationTimestamp": null},
        "spec": spec,
        "status": {"token": token, "expirationTimestamp": timestamp(now + expiration)},
    }))
}

/// `/.well-known/openid-configuration`: the issuer's OpenID discovery document, as upstream's
/// (service account issuer discovery): relying parties verify tokens with the keys at
/// `jwks_uri`, reached at the issuer's address (the `kubernetes` Service, inside the cluster).
pub fn openid_configuration() -> Value {
    json!({
        "issuer": ISSUER,
        "jwks_uri": format!("{ISSUER}/openid/v1/jwks"),
        "response_types_supported": ["id_token"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["ES256"],
    })
}

/// The user a service account token stands for, if it is valid now.
pub async fn authenticate(state: &ApiState, token: &str) -> Option<UserInfo> {
    let claims = state.signer.verify(token)?;
    let now = unix_now();
    // A minute of clock skew, as upstream allows.
    if claims["iss"] != ISSUER
        || claims["exp"].as_i64().is_none_or(|exp| exp + 60 < now)
        || claims["nbf"].as_i64().is_some_and(|nbf| nbf - 60 > now)
    {
        return None;
    }
    let audiences = match &claims["aud"] {
        Value::String(one) => vec![one.as_str()],
        Value::Array(many) => many.iter().filter_map(Value::as_str).collect(),
        _ => Vec::new(),
    };
    if !audiences.contains(&ISSUER) {
        return None;
    }
    let bound = &claims["kubernetes.io"];
    let namespace = bound["namespace"].as_str()?;
    let account = &bound["serviceaccount"];
    let name = account["name"].as_str()?;
    let found = cached(state, "serviceaccounts", namespace, name).await.ok()??;
    if found["metadata"]["uid"] != account["uid"] {
        return None;
    }
    for (key, plural) in [("pod", "pods"), ("secret", "secrets")] {
        if let Some(object) = bound.get(key) {
            let object_name = object["name"].as_str()?;
            let found = cached(state, plural, namespace, object_name).await.ok()??;
            if found["metadata"]["uid"] != object["uid"] || found["metadata"]["deletionTimestamp"].is_string() {
                return None;
            }
        }
    }
    let mut user = UserInfo::new(
        format!("system:serviceaccount:{namespace}:{name}"),
        account["uid"].as_str().unwrap_or_default().to_string(),
        vec!["system:serviceaccounts".into(), format!("system:serviceaccounts:{namespace}")],
    );
    // What upstream's authenticator says of a bound token: its pod, node and credential id.
    for (key, field) in [("pod", "pod"), ("node", "node")] {
        if let (Some(object_name), Some(uid)) = (bound[key]["name"].as_str(), bound[key]["uid"].as_str()) {
            user.extra.insert(format!("authentication.kubernetes.io/{field}-name"), vec![object_name.to_string()]);
            user.extra.insert(format!("authentication.kubernetes.io/{field}-uid"), vec![uid.to_string()]);
        }
    }
    if let Some(jti) = claims["jti"].as_str() {
        user.extra.insert("authentication.kubernetes.io/credential-id".into(), vec![format!("JTI={jti}")]);
    }
    Some(user)
}

/// Whether a bearer token looks like a JWT (three base64url parts), so not a static token.
pub fn looks_like_jwt(token: &str) -> bool {
    token.starts_with("eyJ") && token.matches('.').count() == 2
}

/// ServiceAccount admission for a new pod: the default account and the API access volume.
pub async fn admit(state: &ApiState, pod: &mut Value) -> Result<(), ApiError> {
    // Mirror pods (of static pods) may not use service accounts.
    if pod["metadata"]["annotations"]["kubernetes.io/config.mirror"].is_string() {
        return Ok(());
    }
    let spec = &mut pod["spec"];
    if spec["serviceAccountName"].as_str().is_none_or(str::is_empty) {
        let name = spec["serviceAccount"].as_str().filter(|s| !s.is_empty()).unwrap_or("default").to_string();
        spec["serviceAccountName"] = json!(name);
    }
    let account_name = spec["serviceAccountName"].as_str().unwrap_or("default").to_string();
    spec["serviceAccount"] = json!(account_name);
    let namespace = pod["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
    let account = cached(state, "serviceaccounts", &namespace, &account_name).await?;
    // Upstream refuses a pod whose account does not exist; `default` is let through, as the
    // service account controller makes it moments after its namespace.
    if account.is_none() && account_name != "default" {
        let name = pod["metadata"]["name"].as_str().unwrap_or_default();
        let mut error = ApiError::new(
            403,
            "Forbidden",
            format!(
                "pods \"{name}\" is forbidden: error looking up service account {namespace}/{account_name}: serviceaccount \"{account_name}\" not found"
            ),
        );
        error.kind = Some("pods".into());
        error.name = Some(name.to_string()).filter(|n| !n.is_empty());
        return Err(error);
    }
    let automount = match pod["spec"]["automountServiceAccountToken"].as_bool() {
        Some(pod_says) => pod_says,
        None => account.as_ref().and_then(|a| a["automountServiceAccountToken"].as_bool()).unwrap_or(true),
    };
    if automount {
        mount_api_access(&mut pod["spec"]);
    }
    Ok(())
}

/// Adds the `kube-api-access-<random>` volume and its mount, unless a container already
/// mounts something at the service account path.
pub fn mount_api_access(spec: &mut Value) {
    let mounted_already = ["initContainers", "containers"].iter().any(|list| {
        spec[*list]
            .as_array()
            .into_iter()
            .flatten()
            .any(|c| c["volumeMounts"].as_array().into_iter().flatten().any(|m| m["mountPath"] == MOUNT_PATH))
    });
    if mounted_already || !spec["containers"].is_array() {
        return;
    }
    let name = format!("kube-api-access-{}", crate::object::random_suffix());
    let volume = json!({
        "name": name,
        "projected": {
            "defaultMode": 0o644,
            "sources": [
                {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                {"configMap": {"name": "kube-root-ca.crt", "items": [{"key": "ca.crt", "path": "ca.crt"}]}},
                {"downwardAPI": {"items": [{"path": "namespace",
                    "fieldRef": {"apiVersion": "v1", "fieldPath": "metadata.namespace"}}]}},
            ],
        },
    });
    if !spec["volumes"].is_array() {
        spec["volumes"] = json!([]);
    }
    spec["volumes"].as_array_mut().expect("an array").push(volume);
    for list in ["initContainers", "containers"] {
        for container in spec.get_mut(list).and_then(Value::as_array_mut).into_iter().flatten() {
            if !container["volumeMounts"].is_array() {
                container["volumeMounts"] = json!([]);
            }
            container["volumeMounts"]
                .as_array_mut()
                .expect("an array")
                .push(json!({"name": name, "readOnly": true, "mountPath": MOUNT_PATH}));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::TokenSigner;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use ring::signature;

    #[test]
    fn the_published_key_set_verifies_tokens() {
        let dir = tempfile::tempdir().unwrap();
        let signer = TokenSigner::load_or_create(&dir.path().join("sa.key")).unwrap();
        let token = signer.sign(&json!({"sub": "x", "iss": ISSUER})).unwrap();
        // As a relying party would: the key from the JWKS by the token's kid, then the signature.
        let jwks = signer.jwks();
        let key = &jwks["keys"][0];
        let header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap()).unwrap();
        assert_eq!(
            (key["kid"].clone(), key["alg"].as_str(), key["crv"].as_str()),
            (header["kid"].clone(), Some("ES256"), Some("P-256"))
        );
        let mut point = vec![4u8];
        point.extend(URL_SAFE_NO_PAD.decode(key["x"].as_str().unwrap()).unwrap());
        point.extend(URL_SAFE_NO_PAD.decode(key["y"].as_str().unwrap()).unwrap());
        let (input, signature) = token.rsplit_once('.').unwrap();
        signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, &point)
            .verify(input.as_bytes(), &URL_SAFE_NO_PAD.decode(signature).unwrap())
            .expect("the published key verifies the token");
        let configuration = openid_configuration();
        assert_eq!(configuration["issuer"], ISSUER);
        assert_eq!(configuration["jwks_uri"], format!("{ISSUER}/openid/v1/jwks"));
    }

    #[test]
    fn tokens_verify_only_with_their_signature() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sa.key");
        let signer = TokenSigner::load_or_create(&path).unwrap();
        let token = signer.sign(&json!({"sub": "x"})).unwrap();
        assert!(looks_like_jwt(&token));
        assert_eq!(signer.verify(&token).unwrap()["sub"], "x");
        // The same key again from disk.
        let again = TokenSigner::load_or_create(&path).unwrap();
        assert_eq!(again.verify(&token).unwrap()["sub"], "x");
        // Tampered claims, or another key: refused.
        let parts: Vec<&str> = token.split('.').collect();
        let forged = format!("{}.{}.{}", parts[0], URL_SAFE_NO_PAD.encode(r#"{"sub":"admin"}"#), parts[2]);
        assert!(signer.verify(&forged).is_none());
        let other = TokenSigner::load_or_create(&dir.path().join("other.key")).unwrap();
        assert!(other.verify(&token).is_none());
        assert!(signer.verify("a.b").is_none() && signer.verify("").is_none());
    }

    #[test]
    fn pods_get_the_api_access_volume_once() {
        let mut spec = json!({"containers": [{"name": "a"}], "initContainers": [{"name": "i"}]});
        mount_api_access(&mut spec);
        let volume = &spec["volumes"][0];
        assert!(volume["name"].as_str().unwrap().starts_with("kube-api-access-"));
        assert_eq!(volume["projected"]["sources"].as_array().unwrap().len(), 3);
        assert_eq!(spec["containers"][0]["volumeMounts"][0]["mountPath"], MOUNT_PATH);
        assert_eq!(spec["initContainers"][0]["volumeMounts"][0]["readOnly"], true);
        mount_api_access(&mut spec);
        assert_eq!(spec["volumes"].as_array().unwrap().len(), 1, "already mounted");
    }
}
