//! The service account controller's decision: every active namespace has a ServiceAccount
//! named `default`.

use std::collections::HashSet;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};

/// The namespaces (names) that need their `default` ServiceAccount created.
pub fn plan(namespaces: &[Arc<Namespace>], accounts: &[Arc<ServiceAccount>]) -> Vec<String> {
    let have: HashSet<&str> = accounts
        .iter()
        .filter(|a| a.metadata.name.as_deref() == Some("default"))
        .filter_map(|a| a.metadata.namespace.as_deref())
        .collect();
    namespaces
        .iter()
        .filter(|n| n.metadata.deletion_timestamp.is_none())
        .filter_map(|n| n.metadata.name.clone())
        .filter(|n| !have.contains(n.as_str()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn active_namespaces_without_a_default_account_get_one() {
        let ns = |name: &str, deleting: bool| -> Arc<Namespace> {
            let mut value = json!({"metadata": {"name": name}});
            if deleting {
                value["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
            }
            Arc::new(serde_json::from_value(value).unwrap())
        };
        let sa = |namespace: &str, name: &str| -> Arc<ServiceAccount> {
            Arc::new(serde_json::from_value(json!({"metadata": {"name": name, "namespace": namespace}})).unwrap())
        };
        let namespaces = [ns("default", false), ns("team", false), ns("old", true), ns("other", false)];
        let accounts = [sa("default", "default"), sa("team", "builder")];
        assert_eq!(plan(&namespaces, &accounts), ["team", "other"]);
    }
}
