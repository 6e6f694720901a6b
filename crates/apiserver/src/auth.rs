//! Who is asking: x509 client certificates signed by the cluster CA (CN = user, O = groups) and
//! bearer tokens from a static token file (`token,user,uid,"group1,group2"`, as upstream); the
//! signer of service account tokens ([`TokenSigner`], ES256), and what an authorizer is asked
//! ([`Attributes`]).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature::{self, EcdsaKeyPair, KeyPair};
use serde_json::{Value, json};

use crate::status::ApiError;

/// An authenticated user.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserInfo {
    pub name: String,
    pub uid: String,
    pub groups: Vec<String>,
    /// What the authenticator adds (a service account token's pod, node and credential id,
    /// as `authentication.kubernetes.io/pod-name` and the like).
    pub extra: BTreeMap<String, Vec<String>>,
}

impl UserInfo {
    pub(crate) fn new(name: String, uid: String, mut groups: Vec<String>) -> Self {
        if !groups.iter().any(|g| g == "system:authenticated") {
            groups.push("system:authenticated".into());
        }
        UserInfo { name, uid, groups, extra: BTreeMap::new() }
    }

    /// The user as `TokenReview`, `SelfSubjectReview` and `AdmissionReview` show it.
    pub fn to_json(&self) -> Value {
        let mut user = serde_json::json!({"username": self.name, "uid": self.uid, "groups": self.groups});
        if !self.extra.is_empty() {
            user["extra"] = serde_json::json!(self.extra);
        }
        user
    }
}

/// The identity in a verified client certificate.
pub fn from_certificate(der: &[u8]) -> Option<UserInfo> {
    let (name, groups) = tugboat_pki::der_subject(der)?;
    Some(UserInfo::new(name, String::new(), groups))
}

/// Bearer tokens from `--token-auth-file`.
#[derive(Debug, Clone, Default)]
pub struct TokenFile(HashMap<String, UserInfo>);

impl TokenFile {
    pub fn load(path: &Path) -> Result<TokenFile, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<TokenFile, String> {
        let mut tokens = HashMap::new();
        for (number, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields = split_csv(line);
            if fields.len() < 3 || fields[0].is_empty() || fields[1].is_empty() {
                return Err(format!("line {}: expected token,user,uid[,\"group1,group2\"]", number + 1));
            }
            let groups = fields
                .get(3)
                .map(|g| g.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
                .unwrap_or_default();
            tokens.insert(fields[0].clone(), UserInfo::new(fields[1].clone(), fields[2].clone(), groups));
        }
        Ok(TokenFile(tokens))
    }

    pub fn user(&self, token: &str) -> Option<&UserInfo> {
        self.0.get(token)
    }
}

/// Splits one CSV line, honouring double quotes.
fn split_csv(line: &str) -> Vec<String> {
    let (mut fields, mut current, mut quoted) = (Vec::new(), String::new(), false);
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(std::mem::take(&mut current)),
            c => current.push(c),
        }
    }
    fields.push(current);
    fields.into_iter().map(|f| f.trim().to_string()).collect()
}

/// Signs and verifies service account tokens.
pub struct TokenSigner {
    key: EcdsaKeyPair,
    rng: ring::rand::SystemRandom,
    kid: String,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner").field("kid", &self.kid).finish_non_exhaustive()
    }
}

impl TokenSigner {
    /// The key at `path` (PKCS#8 PEM), made on first use.
    pub fn load_or_create(path: &Path) -> Result<TokenSigner, String> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = match std::fs::read(path) {
            Ok(pem) => match rustls_pemfile::private_key(&mut pem.as_slice()) {
                Ok(Some(rustls::pki_types::PrivateKeyDer::Pkcs8(der))) => der.secret_pkcs8_der().to_vec(),
                _ => return Err(format!("{}: not a PKCS#8 private key", path.display())),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let der = EcdsaKeyPair::generate_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map_err(|e| format!("making a service account key: {e}"))?;
                let body = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
                let lines: Vec<&str> =
                    body.as_bytes().chunks(64).map(|c| std::str::from_utf8(c).expect("base64 is ASCII")).collect();
                let pem = format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", lines.join("\n"));
                tugboat_pki::write_file(path, pem.as_bytes(), 0o600).map_err(|e| e.to_string())?;
                der.as_ref().to_vec()
            }
            Err(e) => return Err(format!("{}: {e}", path.display())),
        };
        let key = EcdsaKeyPair::from_pkcs8(&signature::ECDSA_P256_SHA256_FIXED_SIGNING, &pkcs8, &rng)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        let kid = URL_SAFE_NO_PAD.encode(ring::digest::digest(&ring::digest::SHA256, key.public_key().as_ref()));
        Ok(TokenSigner { key, rng, kid })
    }

    /// A signed JWT of `claims`.
    pub fn sign(&self, claims: &Value) -> Result<String, ApiError> {
        let header = json!({"alg": "ES256", "kid": self.kid});
        let input =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(claims.to_string()));
        let signature =
            self.key.sign(&self.rng, input.as_bytes()).map_err(|_| ApiError::internal("signing a token failed"))?;
        Ok(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature.as_ref())))
    }

    /// The public key as a JSON Web Key Set (`/openid/v1/jwks`).
    pub fn jwks(&self) -> Value {
        // An uncompressed P-256 point: 0x04, then x and y (32 bytes each).
        let point = self.key.public_key().as_ref();
        let (x, y) = point[1..].split_at(32);
        json!({"keys": [{"use": "sig", "kty": "EC", "kid": self.kid, "crv": "P-256", "alg": "ES256",
                         "x": URL_SAFE_NO_PAD.encode(x), "y": URL_SAFE_NO_PAD.encode(y)}]})
    }

    /// The claims of a token this signer signed, if its signature holds.
    pub fn verify(&self, token: &str) -> Option<Value> {
        let mut parts = token.split('.');
        let (header, claims, signature) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).ok()?).ok()?;
        if header["alg"] != "ES256" {
            return None;
        }
        let public =
            signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, self.key.public_key().as_ref());
        let input = &token[..header_and_claims_len(token)?];
        public.verify(input.as_bytes(), &URL_SAFE_NO_PAD.decode(signature).ok()?).ok()?;
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(claims).ok()?).ok()
    }
}

fn header_and_claims_len(token: &str) -> Option<usize> {
    token.rfind('.')
}

/// What a request asks to do.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Attributes {
    pub verb: String,
    /// A resource request (`Some`), or a non-resource path.
    pub resource: Option<ResourceAttributes>,
    pub path: String,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ResourceAttributes {
    pub group: String,
    pub resource: String,
    pub subresource: String,
    pub namespace: String,
    pub name: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_files_read_like_upstream() {
        let file = TokenFile::parse("# comment\nsecret1,alice,1001,\"dev,ops\"\nsecret2,bob,1002\n").unwrap();
        let alice = file.user("secret1").unwrap();
        assert_eq!(alice.name, "alice");
        assert_eq!(alice.groups, ["dev", "ops", "system:authenticated"]);
        assert_eq!(file.user("secret2").unwrap().groups, ["system:authenticated"]);
        assert!(file.user("nope").is_none());
        assert!(TokenFile::parse("only-a-token\n").is_err());
    }
}
