//! Bootstrap tokens and the signed `cluster-info`, shared by the API server (authentication,
//! the join token), the controller manager (the bootstrap signer and token cleaner) and the
//! joining agent: tokens are `[a-z0-9]{6}.[a-z0-9]{16}` (ID, secret), kept as
//! `bootstrap.kubernetes.io/token` Secrets `bootstrap-token-<id>` in kube-system, and a
//! detached HS256 JWS keyed by a token's secret signs the `cluster-info` kubeconfig.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use serde_json::{Value, json};

pub const SECRET_TYPE: &str = "bootstrap.kubernetes.io/token";
pub const NAMESPACE: &str = "kube-system";
pub const SECRET_PREFIX: &str = "bootstrap-token-";
pub const CLUSTER_INFO: &str = "cluster-info";
pub const PUBLIC_NAMESPACE: &str = "kube-public";
/// The key of a token's signature in `cluster-info`: this prefix and the token ID.
pub const JWS_PREFIX: &str = "jws-kubeconfig-";
/// The group every bootstrap token's user is in, and kubeadm's extra group for node tokens.
pub const GROUP: &str = "system:bootstrappers";
pub const NODE_TOKEN_GROUP: &str = "system:bootstrappers:kubeadm:default-node-token";
/// The path joining nodes read without credentials.
pub const CLUSTER_INFO_PATH: &str = "/api/v1/namespaces/kube-public/configmaps/cluster-info";

const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";

/// A new token: six characters of ID, a dot, sixteen of secret.
pub fn generate() -> String {
    use ring::rand::SecureRandom;
    let rng = ring::rand::SystemRandom::new();
    let mut chars = String::with_capacity(22);
    while chars.len() < 22 {
        let mut byte = [0u8; 1];
        rng.fill(&mut byte).expect("the system's random source works");
        // Unbiased: 252 = 7 × 36.
        if byte[0] < 252 {
            chars.push(ALPHABET[(byte[0] % 36) as usize] as char);
        }
    }
    format!("{}.{}", &chars[..6], &chars[6..])
}

/// `(id, secret)` of a well-formed token.
pub fn parse(token: &str) -> Option<(&str, &str)> {
    let (id, secret) = token.split_once('.')?;
    let ok = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| ALPHABET.contains(&b));
    (ok(id, 6) && ok(secret, 16)).then_some((id, secret))
}

/// The Secret that stores `token`, valid for `ttl` seconds from `now` (0: for ever).
pub fn secret(token: &str, ttl: u64, now: i64, description: &str, groups: &[&str]) -> Option<Value> {
    let (id, secret) = parse(token)?;
    let b64 = |s: &str| STANDARD.encode(s);
    let mut data = json!({
        "token-id": b64(id),
        "token-secret": b64(secret),
        "usage-bootstrap-authentication": b64("true"),
        "usage-bootstrap-signing": b64("true"),
        "auth-extra-groups": b64(&groups.join(",")),
        "description": b64(description),
    });
    if ttl > 0 {
        let expires = time::OffsetDateTime::from_unix_timestamp(now + ttl as i64).ok()?;
        let expires = expires.format(&time::format_description::well_known::Rfc3339).ok()?;
        data["expiration"] = json!(b64(&expires));
    }
    Some(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": format!("{SECRET_PREFIX}{id}"), "namespace": NAMESPACE},
        "type": SECRET_TYPE,
        "data": data,
    }))
}

/// A decoded field of a bootstrap token Secret.
pub fn field(secret: &Value, key: &str) -> Option<String> {
    let encoded = secret["data"][key].as_str()?;
    String::from_utf8(STANDARD.decode(encoded).ok()?).ok()
}

/// Whether the Secret's token has expired at `now` (Unix seconds).
pub fn expired(secret: &Value, now: i64) -> bool {
    field(secret, "expiration")
        .and_then(|e| time::OffsetDateTime::parse(&e, &time::format_description::well_known::Rfc3339).ok())
        .is_some_and(|e| e.unix_timestamp() <= now)
}

pub fn unix_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// The detached JWS (`header..signature`, HS256 keyed by the token secret, `kid` the token ID)
/// of `content`, as the bootstrap signer writes it and kubeadm checks it.
pub fn detached_jws(content: &str, id: &str, secret: &str) -> String {
    let header = URL_SAFE_NO_PAD.encode(format!(r#"{{"alg":"HS256","kid":"{id}"}}"#));
    let payload = URL_SAFE_NO_PAD.encode(content);
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
    let signature = ring::hmac::sign(&key, format!("{header}.{payload}").as_bytes());
    format!("{header}..{}", URL_SAFE_NO_PAD.encode(signature.as_ref()))
}

/// Whether `jws` is `content` signed with `token`.
pub fn verify_jws(content: &str, jws: &str, token: &str) -> bool {
    parse(token).is_some_and(|(id, secret)| same(detached_jws(content, id, secret).as_bytes(), jws.as_bytes()))
}

/// The kubeconfig `cluster-info` publishes.
pub fn cluster_info_kubeconfig(server: &str, ca_pem: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: \"\"\n  cluster:\n    certificate-authority-data: {}\n    server: {server}\npreferences: {{}}\nusers: null\ncontexts: null\ncurrent-context: \"\"\n",
        STANDARD.encode(ca_pem)
    )
}

/// Equal bytes, compared in constant time.
pub fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_have_upstreams_form() {
        let token = generate();
        let (id, secret) = parse(&token).unwrap();
        assert_eq!((id.len(), secret.len()), (6, 16));
        assert!(parse("abcdef.0123456789abcdef").is_some());
        for bad in
            ["abcdef0123456789abcdef", "ABCDEF.0123456789abcdef", "abcde.0123456789abcdef", "abcdef.0123456789abcde!"]
        {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn secrets_carry_the_token_and_its_expiry() {
        let secret = secret("abcdef.0123456789abcdef", 3600, 1_700_000_000, "d", &[NODE_TOKEN_GROUP]).unwrap();
        assert_eq!(secret["metadata"]["name"], "bootstrap-token-abcdef");
        assert_eq!(field(&secret, "token-secret").unwrap(), "0123456789abcdef");
        assert_eq!(field(&secret, "expiration").unwrap(), "2023-11-14T23:13:20Z");
        assert!(!expired(&secret, 1_700_000_000 + 3599) && expired(&secret, 1_700_000_000 + 3600));
        let forever = super::secret("abcdef.0123456789abcdef", 0, 0, "", &[]).unwrap();
        assert!(field(&forever, "expiration").is_none() && !expired(&forever, i64::MAX));
    }

    #[test]
    fn signatures_verify_only_with_their_token() {
        let content = cluster_info_kubeconfig("https://10.0.0.1:6443", "-----BEGIN CERTIFICATE-----\nx\n");
        let jws = detached_jws(&content, "abcdef", "0123456789abcdef");
        assert!(jws.contains("..") && jws.starts_with("eyJ"));
        assert!(verify_jws(&content, &jws, "abcdef.0123456789abcdef"));
        assert!(!verify_jws(&content, &jws, "abcdef.0123456789abcdeg"));
        assert!(!verify_jws(&format!("{content} "), &jws, "abcdef.0123456789abcdef"));
    }
}
