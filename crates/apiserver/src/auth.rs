//! Who is asking: x509 client certificates signed by the cluster CA (CN = user, O = groups) and
//! bearer tokens from a static token file (`token,user,uid,"group1,group2"`, as upstream).

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

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
    pub fn to_json(&self) -> serde_json::Value {
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
