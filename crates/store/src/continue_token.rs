use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde::{Deserialize, Serialize};

use crate::{Revision, StoreError};

/// Where a limited list resumes: the revision the first page was read at (later pages read at
/// the same one, so a paged list is one consistent snapshot) and the last key returned.
///
/// Encoded as kube-apiserver encodes its own: base64 of `{"v":"meta.k8s.io/v1","rv":N,"start":K}`
/// with `start` relative to the listed prefix.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContinueToken {
    #[serde(rename = "v")]
    version: String,
    #[serde(rename = "rv")]
    pub revision: Revision,
    /// The key to start from (inclusive), relative to the prefix.
    pub start: String,
}

const VERSION: &str = "meta.k8s.io/v1";

/// The revision of a token that continues at whatever is latest.
const LATEST: Revision = -1;

impl ContinueToken {
    /// A token resuming at the key right after `last_key`, which lies under `prefix`.
    pub fn after(prefix: &str, last_key: &str, revision: Revision) -> Self {
        let relative = last_key.strip_prefix(prefix).unwrap_or(last_key);
        ContinueToken { version: VERSION.to_string(), revision, start: format!("{relative}\0") }
    }

    /// Upstream's "inconsistent" continuation of an expired token: the same place, at the
    /// latest revision (encoded as revision -1), which a 410 for a compacted token carries.
    pub fn inconsistent(&self) -> Self {
        ContinueToken { revision: LATEST, ..self.clone() }
    }

    pub fn encode(&self) -> String {
        STANDARD.encode(serde_json::to_vec(self).expect("a continue token serializes"))
    }

    pub fn decode(token: &str) -> Result<Self, StoreError> {
        let invalid = |reason: String| StoreError::InvalidContinue { reason };
        let bytes = STANDARD.decode(token).map_err(|e| invalid(format!("not base64: {e}")))?;
        let parsed: ContinueToken =
            serde_json::from_slice(&bytes).map_err(|e| invalid(format!("not a continue token: {e}")))?;
        if parsed.version != VERSION {
            return Err(invalid(format!("unknown version {:?}", parsed.version)));
        }
        if parsed.revision <= 0 && parsed.revision != LATEST {
            return Err(invalid(format!("bad revision {}", parsed.revision)));
        }
        if parsed.start.starts_with('/') || parsed.start.contains("/../") || parsed.start.starts_with("../") {
            return Err(invalid("start key escapes the listed prefix".to_string()));
        }
        Ok(parsed)
    }

    /// The absolute key to resume from.
    pub fn start_key(&self, prefix: &str) -> String {
        format!("{prefix}{}", self.start)
    }
}

/// What a list reads, once the options and a continue token are reconciled.
#[derive(Debug)]
pub(crate) struct ListPlan {
    pub revision: Option<Revision>,
    pub start_key: String,
    pub limit: Option<i64>,
}

impl ListPlan {
    pub fn new(prefix: &str, options: &crate::ListOptions) -> Result<Self, StoreError> {
        let limit = options.limit.filter(|l| *l > 0);
        match &options.continue_token {
            Some(token) => {
                let token = ContinueToken::decode(token)?;
                let revision = Some(token.revision).filter(|r| *r != LATEST);
                Ok(ListPlan { revision, start_key: token.start_key(prefix), limit })
            }
            None => {
                Ok(ListPlan { revision: options.revision.filter(|r| *r > 0), start_key: prefix.to_string(), limit })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let token = ContinueToken::after("/registry/pods/", "/registry/pods/default/web", 42);
        assert_eq!(token.start, "default/web\0");
        let decoded = ContinueToken::decode(&token.encode()).unwrap();
        assert_eq!(decoded, token);
        assert_eq!(decoded.start_key("/registry/pods/"), "/registry/pods/default/web\0");
        let latest = ContinueToken::decode(&token.inconsistent().encode()).unwrap();
        assert_eq!((latest.revision, latest.start), (-1, token.start));
    }

    #[test]
    fn rejects_garbage() {
        for bad in ["!!!", "bm90IGpzb24=", &STANDARD.encode(r#"{"v":"x","rv":1,"start":""}"#)] {
            assert!(matches!(ContinueToken::decode(bad), Err(StoreError::InvalidContinue { .. })), "{bad}");
        }
        let escaping = STANDARD.encode(r#"{"v":"meta.k8s.io/v1","rv":1,"start":"/secrets/"}"#);
        assert!(ContinueToken::decode(&escaping).is_err());
    }
}
