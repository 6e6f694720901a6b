//! ResourceQuota admission, as upstream's plugin: an object created (or a pod, Service or
//! claim updated) in a namespace with quotas is refused when what it adds to a quota's
//! `status.used` would pass `status.hard` (`exceeded quota: …`), and otherwise charged to
//! `status.used` at once, with the quota's resourceVersion as a precondition, so that the
//! next request sees it before the quota controller has recounted. Quotas the controller has
//! not yet given a `status.hard` restrict nothing (as upstream). The counting is
//! `tugboat_objects::quota`'s, the controller's own.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod, ResourceQuotaSpec, Service};
use serde_json::{Value, json};
use tugboat_objects::quantity::parse_milli;
use tugboat_objects::quota::{self, Namespace};
use tugboat_store::{ListOptions, StoreError};

use crate::object;
use crate::registry::{self, Resource};
use crate::state::ApiState;
use crate::status::ApiError;

/// Writes of a quota's usage that lost a race retry this often before giving up.
const RETRIES: usize = 8;

/// Checks `object` (and `old`, for an update) of `resource` against the quotas of its
/// namespace and charges them; a dry run only checks.
pub async fn admit(
    state: &ApiState,
    resource: &Resource,
    object: &Value,
    old: Option<&Value>,
    dry_run: bool,
) -> Result<(), ApiError> {
    let Some(namespace) = object["metadata"]["namespace"].as_str().filter(|_| resource.namespaced) else {
        return Ok(());
    };
    if resource.is_review() {
        return Ok(());
    }
    let quotas = registry::find("", "v1", "resourcequotas").expect("resource quotas are served");
    let prefix = quotas.prefix(Some(namespace));
    let cached = state
        .caches
        .get(&quotas.prefix(None))
        .await
        .map_err(|e| ApiError::from_store(e, "", "resourcequotas", ""))?
        .list(&prefix)
        .0;
    if cached.is_empty() {
        return Ok(());
    }
    let counted = if resource.group.is_empty() {
        resource.plural.to_string()
    } else {
        format!("{}.{}", resource.plural, resource.group)
    };
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    let refuse = |why: String| ApiError::forbidden(resource.group, resource.plural, name, &why);
    for attempt in 0.. {
        let listed = state
            .store
            .list(&prefix, ListOptions::default())
            .await
            .map_err(|e| ApiError::from_store(e, "", "resourcequotas", ""))?;
        // Every quota is checked before any is charged.
        let mut charges = Vec::new();
        for kv in &listed.kvs {
            let stored = object::from_store(quotas, &kv.value, kv.mod_revision)?;
            if let Some(used) = charge(&stored, &counted, object, old).map_err(refuse)? {
                charges.push((kv.key.clone(), kv.mod_revision, stored, used));
            }
        }
        if dry_run || charges.is_empty() {
            return Ok(());
        }
        let mut raced = false;
        for (key, revision, mut stored, used) in charges {
            stored["status"]["used"] = json!(used);
            match state.store.update(&key, object::to_store(quotas, &stored), revision).await {
                Ok(_) => {}
                Err(StoreError::Conflict { .. }) => raced = true,
                Err(error) => return Err(ApiError::from_store(error, "", "resourcequotas", "")),
            }
        }
        if !raced {
            return Ok(());
        }
        if attempt >= RETRIES {
            let mut error = ApiError::conflict("", "resourcequotas", "");
            error.message =
                "Operation cannot be fulfilled on resourcequotas: their usage changed too often; try again".into();
            return Err(error);
        }
    }
    Ok(())
}

/// The new `status.used` of `quota` with `object` in it, `None` when the object does not
/// change what the quota has counted, or why it may not be admitted.
fn charge(
    quota: &Value,
    counted: &str,
    object: &Value,
    old: Option<&Value>,
) -> Result<Option<BTreeMap<String, String>>, String> {
    let quota_name = quota["metadata"]["name"].as_str().unwrap_or_default();
    let quantities = |field: &Value| -> BTreeMap<String, String> {
        field
            .as_object()
            .into_iter()
            .flatten()
            .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
            .collect()
    };
    let hard = quantities(&quota["status"]["hard"]);
    let used = quantities(&quota["status"]["used"]);
    let restricted: Vec<String> = hard.keys().filter(|name| quota::counts_toward(counted, name)).cloned().collect();
    if restricted.is_empty() {
        return Ok(None);
    }
    let mut spec: ResourceQuotaSpec = serde_json::from_value(quota["spec"].clone()).unwrap_or_default();
    spec.hard = Some(
        restricted
            .iter()
            .map(|n| (n.clone(), k8s_openapi::apimachinery::pkg::api::resource::Quantity(hard[n].clone())))
            .collect(),
    );
    if counted == "pods" {
        let pod: Pod = serde_json::from_value(object.clone()).unwrap_or_default();
        if !quota::covers(&spec, &pod) {
            return Ok(None);
        }
        let missing = quota::missing_requests(&restricted, &pod);
        match missing.len() {
            0 => {}
            1 => return Err(format!("failed quota: {quota_name}: {}", missing[0])),
            _ => return Err(format!("failed quota: {quota_name}: [{}]", missing.join(", "))),
        }
    }
    let unknown: Vec<&str> = restricted.iter().filter(|n| !used.contains_key(*n)).map(String::as_str).collect();
    if !unknown.is_empty() {
        return Err(format!("status unknown for quota: {quota_name}, resources: {}", unknown.join(",")));
    }
    let usage = |object: &Value| -> BTreeMap<String, i128> {
        let (pod, service, claim);
        let mut namespace = Namespace::default();
        match counted {
            "pods" => {
                pod = serde_json::from_value::<Pod>(object.clone()).unwrap_or_default();
                namespace.pods.push(&pod);
            }
            "services" => {
                service = serde_json::from_value::<Service>(object.clone()).unwrap_or_default();
                namespace.services.push(&service);
            }
            "persistentvolumeclaims" => {
                claim = serde_json::from_value::<PersistentVolumeClaim>(object.clone()).unwrap_or_default();
                namespace.claims.push(&claim);
            }
            _ => {}
        }
        namespace.counts.insert(counted.to_string(), 1);
        quota::used_milli(&spec, &namespace)
    };
    let mut delta = usage(object);
    if let Some(old) = old {
        for (name, before) in usage(old) {
            if let Some(after) = delta.get_mut(&name) {
                *after = (*after - before).max(0);
            }
        }
    }
    delta.retain(|_, milli| *milli > 0);
    if delta.is_empty() {
        return Ok(None);
    }
    let milli = |q: Option<&String>| q.and_then(|q| parse_milli(q)).unwrap_or(0);
    let exceeded: Vec<&String> = delta
        .iter()
        .filter(|(name, d)| milli(used.get(*name)) + **d > milli(hard.get(*name)))
        .map(|(n, _)| n)
        .collect();
    if !exceeded.is_empty() {
        let print = |of: &dyn Fn(&String) -> i128| {
            exceeded.iter().map(|n| format!("{n}={}", quota::format_quantity(n, of(n)))).collect::<Vec<_>>().join(",")
        };
        return Err(format!(
            "exceeded quota: {quota_name}, requested: {}, used: {}, limited: {}",
            print(&|n| delta[n]),
            print(&|n| milli(used.get(n))),
            print(&|n| milli(hard.get(n))),
        ));
    }
    let mut charged = used;
    for (name, d) in delta {
        let now = milli(charged.get(&name)) + d;
        charged.insert(name.clone(), quota::format_quantity(&name, now));
    }
    Ok(Some(charged))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(hard: Value, used: Value) -> Value {
        json!({"metadata": {"name": "q", "namespace": "ns"}, "spec": {"hard": hard.clone()},
               "status": {"hard": hard, "used": used}})
    }

    #[test]
    fn charges_what_fits_and_refuses_what_does_not_with_upstreams_words() {
        let q = quota(
            json!({"services": "10", "services.nodeports": "1", "services.loadbalancers": "1", "configmaps": "2"}),
            json!({"services": "1", "services.nodeports": "1", "services.loadbalancers": "0", "configmaps": "0"}),
        );
        let cluster_ip = json!({"metadata": {"name": "a"}, "spec": {"ports": [{"port": 80}]}});
        let used = charge(&q, "services", &cluster_ip, None).unwrap().unwrap();
        assert_eq!(used["services"], "2");
        assert_eq!(used["services.nodeports"], "1");
        let balancer = json!({"metadata": {"name": "b"}, "spec": {"type": "LoadBalancer", "ports": [{"port": 80}]}});
        assert_eq!(
            charge(&q, "services", &balancer, None).unwrap_err(),
            "exceeded quota: q, requested: services.nodeports=1, used: services.nodeports=1, limited: services.nodeports=1"
        );
        assert_eq!(charge(&q, "secrets", &json!({}), None).unwrap(), None, "a kind the quota does not limit");
        // An update charges only what it adds.
        let node_port = json!({"spec": {"type": "NodePort", "ports": [{"port": 80}]}});
        assert_eq!(charge(&q, "services", &node_port, Some(&node_port)).unwrap(), None);
    }

    #[test]
    fn pods_must_ask_for_what_the_quota_limits_and_an_unknown_status_refuses() {
        let q = quota(json!({"pods": "2", "requests.cpu": "1"}), json!({"pods": "0", "requests.cpu": "0"}));
        let bare = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}, {"name": "b"}]}});
        assert_eq!(charge(&q, "pods", &bare, None).unwrap_err(), "failed quota: q: must specify requests.cpu for: a,b");
        let big = json!({"spec": {"containers": [{"name": "a", "resources": {"limits": {"cpu": "1500m"}}}]}});
        assert_eq!(
            charge(&q, "pods", &big, None).unwrap_err(),
            "exceeded quota: q, requested: requests.cpu=1500m, used: requests.cpu=0, limited: requests.cpu=1"
        );
        let fresh = quota(json!({"pods": "2"}), json!({}));
        assert_eq!(charge(&fresh, "pods", &bare, None).unwrap_err(), "status unknown for quota: q, resources: pods");
        let counted = json!({"metadata": {"name": "q"}, "spec": {"hard": {"count/widgets.example.com": "1"}},
                             "status": {"hard": {"count/widgets.example.com": "1"},
                                        "used": {"count/widgets.example.com": "1"}}});
        assert!(charge(&counted, "widgets.example.com", &json!({}), None).unwrap_err().starts_with("exceeded quota"));
    }
}
