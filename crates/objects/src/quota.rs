//! The resource quota controller's decision, without I/O: what a ResourceQuota's namespace
//! uses of each resource its `spec.hard` names (upstream's evaluators): object counts
//! (`pods`, `services`, `configmaps`, …, and `count/<resource>[.<group>]`), the compute
//! requests and limits of its non-terminal pods (`cpu` = `requests.cpu`, `limits.memory`,
//! `requests.<extended resource>` …), Services' node ports and load balancers, claims' storage
//! (also per storage class). Scopes (Terminating, NotTerminating, BestEffort, NotBestEffort,
//! PriorityClass by `scopeSelector`) narrow the pods counted. Resources it does not know of
//! are left out of `status.used`, as upstream leaves resources without an evaluator.

use std::collections::BTreeMap;

use crate::quantity::parse_milli;
use k8s_openapi::api::core::v1::{
    PersistentVolumeClaim, Pod, ResourceQuota, ResourceQuotaSpec, ResourceRequirements, Service,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

/// What a namespace holds, as the quota counts it.
#[derive(Debug, Default)]
pub struct Namespace<'a> {
    pub pods: Vec<&'a Pod>,
    pub services: Vec<&'a Service>,
    pub claims: Vec<&'a PersistentVolumeClaim>,
    /// Objects of other kinds by resource (`configmaps`, `replicasets.apps`): how many.
    pub counts: BTreeMap<String, i64>,
}

const STORAGE_CLASS_SUFFIX: &str = ".storageclass.storage.k8s.io/";

/// `status.used` for `quota` over `namespace` (values in thousandths of their unit, formatted).
pub fn used(quota: &ResourceQuota, namespace: &Namespace) -> BTreeMap<String, Quantity> {
    let spec = quota.spec.clone().unwrap_or_default();
    used_milli(&spec, namespace)
        .into_iter()
        .map(|(name, milli)| {
            let quantity = Quantity(format(&name, milli));
            (name, quantity)
        })
        .collect()
}

/// What `namespace` uses of each resource `spec.hard` names that an evaluator knows, in
/// thousandths of the resource's unit.
pub fn used_milli(spec: &ResourceQuotaSpec, namespace: &Namespace) -> BTreeMap<String, i128> {
    let pods: Vec<&Pod> = namespace.pods.iter().copied().filter(|p| counted(p) && in_scope(spec, p)).collect();
    let mut used = BTreeMap::new();
    for name in spec.hard.iter().flat_map(|h| h.keys()) {
        let milli = match name.as_str() {
            "pods" | "count/pods" => Some(pods.len() as i128 * 1000),
            "cpu" | "requests.cpu" => Some(sum(&pods, |r| requests(r, "cpu"))),
            "memory" | "requests.memory" => Some(sum(&pods, |r| requests(r, "memory"))),
            "ephemeral-storage" | "requests.ephemeral-storage" => {
                Some(sum(&pods, |r| requests(r, "ephemeral-storage")))
            }
            "limits.cpu" | "limits.memory" | "limits.ephemeral-storage" => {
                let resource = &name["limits.".len()..];
                Some(sum(&pods, |r| limits(r, resource)))
            }
            other if other.starts_with("requests.") && other.contains('/') => {
                Some(sum(&pods, |r| requests(r, &other["requests.".len()..])))
            }
            other if other.starts_with("limits.") && other.contains('/') => {
                Some(sum(&pods, |r| limits(r, &other["limits.".len()..])))
            }
            _ if scoped(spec) => None,
            "services" | "count/services" => Some(namespace.services.len() as i128 * 1000),
            "services.loadbalancers" => {
                Some(namespace.services.iter().filter(|s| service_type(s) == "LoadBalancer").count() as i128 * 1000)
            }
            "services.nodeports" => Some(namespace.services.iter().map(|s| node_ports(s)).sum::<i128>() * 1000),
            "persistentvolumeclaims" | "count/persistentvolumeclaims" => Some(namespace.claims.len() as i128 * 1000),
            "requests.storage" => Some(namespace.claims.iter().map(|c| storage(c)).sum()),
            other if other.contains(STORAGE_CLASS_SUFFIX) => {
                let (class, resource) = other.split_once(STORAGE_CLASS_SUFFIX).unwrap_or_default();
                let claims = namespace.claims.iter().filter(|c| class_of(c) == class);
                match resource {
                    "persistentvolumeclaims" => Some(claims.count() as i128 * 1000),
                    "requests.storage" => Some(claims.map(|c| storage(c)).sum()),
                    _ => None,
                }
            }
            other => {
                let resource = other.strip_prefix("count/").unwrap_or(other);
                namespace.counts.get(resource).map(|n| *n as i128 * 1000)
            }
        };
        if let Some(milli) = milli {
            used.insert(name.clone(), milli);
        }
    }
    used
}

/// Whether an object of `resource` (its plural, with `.<group>` outside the core group:
/// `pods`, `replicasets.apps`) counts toward the quota resource `name`: upstream's
/// evaluators' matching resources.
pub fn counts_toward(resource: &str, name: &str) -> bool {
    if name == format!("count/{resource}") {
        return true;
    }
    match resource {
        "pods" => {
            name == "pods"
                || ["cpu", "memory", "ephemeral-storage"].contains(&name)
                || name.starts_with("requests.") && !name.ends_with("storage") && !name.contains(STORAGE_CLASS_SUFFIX)
                || name.starts_with("requests.ephemeral-storage")
                || name.starts_with("limits.")
                || name.starts_with("hugepages-")
        }
        "services" => ["services", "services.loadbalancers", "services.nodeports"].contains(&name),
        "persistentvolumeclaims" => {
            ["persistentvolumeclaims", "requests.storage"].contains(&name) || name.contains(STORAGE_CLASS_SUFFIX)
        }
        // The legacy names of object counts.
        "configmaps" | "secrets" | "replicationcontrollers" | "resourcequotas" => name == resource,
        _ => false,
    }
}

/// Whether a quota with these scopes counts `pod` at all (an unscoped quota counts every pod).
pub fn covers(spec: &ResourceQuotaSpec, pod: &Pod) -> bool {
    in_scope(spec, pod)
}

/// Upstream's pod constraint (kept, as it says, for backward compatibility): when a quota
/// limits CPU or memory, every container must ask for it. One message per resource
/// (`must specify cpu for: a,b`), empty when nothing is missing.
pub fn missing_requests(restricted: &[String], pod: &Pod) -> Vec<String> {
    const VALIDATED: [&str; 6] = ["cpu", "memory", "requests.cpu", "requests.memory", "limits.cpu", "limits.memory"];
    let mut missing: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let spec = pod.spec.as_ref();
    let containers = spec.into_iter().flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()));
    for container in containers {
        let r = container.resources.as_ref();
        let has = |list: Option<&BTreeMap<String, Quantity>>, key: &str| list.is_some_and(|l| l.contains_key(key));
        let limits = r.and_then(|r| r.limits.as_ref());
        // A request the API's defaulting takes from the limit counts as made.
        let requests = |key: &str| has(r.and_then(|r| r.requests.as_ref()), key) || has(limits, key);
        for name in restricted.iter().map(String::as_str).filter(|n| VALIDATED.contains(n)) {
            let made = match name {
                "cpu" | "requests.cpu" => requests("cpu"),
                "memory" | "requests.memory" => requests("memory"),
                "limits.cpu" => has(limits, "cpu"),
                _ => has(limits, "memory"),
            };
            if !made {
                missing.entry(name).or_default().push(&container.name);
            }
        }
    }
    missing.into_iter().map(|(name, containers)| format!("must specify {name} for: {}", containers.join(","))).collect()
}

/// A quantity in thousandths of `name`'s unit as upstream prints it.
pub fn format_quantity(name: &str, milli: i128) -> String {
    format(name, milli)
}

/// Pods in a terminal phase use nothing.
fn counted(pod: &Pod) -> bool {
    !matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

/// Whether the quota has scopes (then it tracks pods and their compute resources only).
fn scoped(spec: &ResourceQuotaSpec) -> bool {
    spec.scopes.as_ref().is_some_and(|s| !s.is_empty())
        || spec.scope_selector.as_ref().and_then(|s| s.match_expressions.as_ref()).is_some_and(|e| !e.is_empty())
}

fn in_scope(spec: &ResourceQuotaSpec, pod: &Pod) -> bool {
    let terminating = pod.spec.as_ref().and_then(|s| s.active_deadline_seconds).is_some();
    let best_effort = best_effort(pod);
    let by_scope = |scope: &str, operator: &str, values: &[String]| match scope {
        "Terminating" => terminating,
        "NotTerminating" => !terminating,
        "BestEffort" => best_effort,
        "NotBestEffort" => !best_effort,
        "PriorityClass" => {
            let class = pod.spec.as_ref().and_then(|s| s.priority_class_name.as_deref()).unwrap_or_default();
            match operator {
                "In" => values.iter().any(|v| v == class),
                "NotIn" => !values.iter().any(|v| v == class),
                "Exists" => !class.is_empty(),
                "DoesNotExist" => class.is_empty(),
                _ => false,
            }
        }
        // CrossNamespacePodAffinity and scopes of newer releases: not matched.
        _ => false,
    };
    spec.scopes.iter().flatten().all(|scope| by_scope(scope, "Exists", &[]))
        && spec
            .scope_selector
            .iter()
            .flat_map(|s| s.match_expressions.iter().flatten())
            .all(|e| by_scope(&e.scope_name, &e.operator, e.values.as_deref().unwrap_or_default()))
}

/// A pod that requests and limits no CPU or memory at all (QoS class BestEffort).
fn best_effort(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    let containers = spec.into_iter().flat_map(|s| s.containers.iter().chain(s.init_containers.iter().flatten()));
    containers.into_iter().all(|c| {
        let r = c.resources.as_ref();
        let none = |list: Option<&BTreeMap<String, Quantity>>| {
            list.is_none_or(|l| !l.contains_key("cpu") && !l.contains_key("memory"))
        };
        none(r.and_then(|r| r.requests.as_ref())) && none(r.and_then(|r| r.limits.as_ref()))
    })
}

fn milli(q: Option<&Quantity>) -> i128 {
    q.and_then(|q| parse_milli(&q.0)).unwrap_or(0).max(0)
}

/// A container's request of `resource` (its limit when it names no request, as upstream
/// defaults requests).
fn requests(r: &ResourceRequirements, resource: &str) -> i128 {
    let request = r.requests.as_ref().and_then(|l| l.get(resource));
    milli(request.or_else(|| r.limits.as_ref().and_then(|l| l.get(resource))))
}

fn limits(r: &ResourceRequirements, resource: &str) -> i128 {
    milli(r.limits.as_ref().and_then(|l| l.get(resource)))
}

/// What pods take of a resource: per pod the containers' sum or the largest init container,
/// whichever is more, plus the pod's overhead for requests.
fn sum(pods: &[&Pod], of: impl Fn(&ResourceRequirements) -> i128) -> i128 {
    let none = ResourceRequirements::default();
    pods.iter()
        .filter_map(|p| p.spec.as_ref())
        .map(|spec| {
            let containers: i128 = spec.containers.iter().map(|c| of(c.resources.as_ref().unwrap_or(&none))).sum();
            let init = spec.init_containers.iter().flatten().map(|c| of(c.resources.as_ref().unwrap_or(&none))).max();
            containers.max(init.unwrap_or(0))
        })
        .sum()
}

fn service_type(service: &Service) -> &str {
    service.spec.as_ref().and_then(|s| s.type_.as_deref()).unwrap_or("ClusterIP")
}

fn node_ports(service: &Service) -> i128 {
    match service_type(service) {
        "NodePort" | "LoadBalancer" => {
            service.spec.as_ref().and_then(|s| s.ports.as_ref()).map_or(0, |p| p.len() as i128)
        }
        _ => 0,
    }
}

fn storage(claim: &PersistentVolumeClaim) -> i128 {
    milli(
        claim
            .spec
            .as_ref()
            .and_then(|s| s.resources.as_ref())
            .and_then(|r| r.requests.as_ref())
            .and_then(|r| r.get("storage")),
    )
}

fn class_of(claim: &PersistentVolumeClaim) -> &str {
    claim.spec.as_ref().and_then(|s| s.storage_class_name.as_deref()).unwrap_or_default()
}

/// A quantity in thousandths of its unit as upstream would print it: CPU in whole cores or
/// millicores, bytes with the largest binary suffix that divides them, counts as integers.
fn format(name: &str, milli: i128) -> String {
    if milli % 1000 != 0 {
        return format!("{milli}m");
    }
    let whole = milli / 1000;
    let bytes = ["memory", "storage", "ephemeral-storage"].iter().any(|r| name.ends_with(r));
    if bytes && whole != 0 {
        for (suffix, size) in [("Ti", 1i128 << 40), ("Gi", 1 << 30), ("Mi", 1 << 20), ("Ki", 1 << 10)] {
            if whole % size == 0 {
                return format!("{}{suffix}", whole / size);
            }
        }
    }
    whole.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn quota(spec: serde_json::Value) -> ResourceQuota {
        serde_json::from_value(json!({"metadata": {"name": "q", "namespace": "ns"}, "spec": spec})).unwrap()
    }

    fn pod(spec: serde_json::Value, phase: &str) -> Pod {
        serde_json::from_value(json!({"metadata": {"name": "p", "namespace": "ns"}, "spec": spec,
                                      "status": {"phase": phase}}))
        .unwrap()
    }

    fn quantities(used: &BTreeMap<String, Quantity>) -> BTreeMap<&str, &str> {
        used.iter().map(|(k, v)| (k.as_str(), v.0.as_str())).collect()
    }

    #[test]
    fn counts_requests_and_limits_as_upstreams_evaluators() {
        let q = quota(json!({"hard": {"pods": "5", "cpu": "1", "requests.memory": "1Gi", "limits.cpu": "2",
                                      "ephemeral-storage": "50Gi", "requests.example.com/dongle": "3",
                                      "services": "10", "services.nodeports": "2", "services.loadbalancers": "1",
                                      "configmaps": "10", "count/replicasets.apps": "5", "requests.storage": "10Gi",
                                      "gold.storageclass.storage.k8s.io/persistentvolumeclaims": "3",
                                      "count/widgets.example.com": "1"}}));
        let web = pod(
            json!({"containers": [
                {"name": "a", "resources": {"requests": {"cpu": "500m", "memory": "252Mi", "ephemeral-storage": "30Gi",
                                                         "example.com/dongle": "2"},
                                            "limits": {"cpu": "1", "example.com/dongle": "2"}}},
                {"name": "b", "resources": {"limits": {"cpu": "250m", "memory": "4Mi"}}}],
                   "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "2"}}}]}),
            "Running",
        );
        let done = pod(json!({"containers": [{"name": "a", "resources": {"requests": {"cpu": "8"}}}]}), "Succeeded");
        let services: Vec<Service> = vec![
            serde_json::from_value(json!({"spec": {"type": "NodePort", "ports": [{"port": 80}, {"port": 81}]}}))
                .unwrap(),
            serde_json::from_value(json!({"spec": {"type": "LoadBalancer", "ports": [{"port": 443}]}})).unwrap(),
            serde_json::from_value(json!({"spec": {}})).unwrap(),
        ];
        let claims: Vec<PersistentVolumeClaim> = vec![
            serde_json::from_value(
                json!({"spec": {"storageClassName": "gold", "resources": {"requests": {"storage": "1Gi"}}}}),
            )
            .unwrap(),
            serde_json::from_value(json!({"spec": {"resources": {"requests": {"storage": "512Mi"}}}})).unwrap(),
        ];
        let namespace = Namespace {
            pods: vec![&web, &done],
            services: services.iter().collect(),
            claims: claims.iter().collect(),
            counts: [("configmaps".to_string(), 2), ("replicasets.apps".to_string(), 1)].into(),
        };
        let used = used(&q, &namespace);
        let expected: BTreeMap<&str, &str> = [
            ("pods", "1"),
            // max(500m + 250m, 2 of the init container)
            ("cpu", "2"),
            ("requests.memory", "256Mi"),
            ("limits.cpu", "1250m"),
            ("ephemeral-storage", "30Gi"),
            ("requests.example.com/dongle", "2"),
            ("services", "3"),
            ("services.nodeports", "3"),
            ("services.loadbalancers", "1"),
            ("configmaps", "2"),
            ("count/replicasets.apps", "1"),
            ("requests.storage", "1536Mi"),
            ("gold.storageclass.storage.k8s.io/persistentvolumeclaims", "1"),
        ]
        .into();
        assert_eq!(quantities(&used), expected, "a kind it cannot count is left out");
    }

    #[test]
    fn scopes_narrow_the_pods_and_keep_to_pod_resources() {
        let terminating = pod(json!({"activeDeadlineSeconds": 60, "containers": [{"name": "a"}]}), "Running");
        let burstable = pod(
            json!({"containers": [{"name": "a", "resources": {"requests": {"cpu": "100m"}}}], "priorityClassName": "high"}),
            "Pending",
        );
        let namespace = Namespace { pods: vec![&terminating, &burstable], ..Namespace::default() };
        let count = |spec| quantities(&used(&quota(spec), &namespace)).get("pods").map(|s| s.to_string());
        assert_eq!(count(json!({"hard": {"pods": "9"}, "scopes": ["Terminating"]})).as_deref(), Some("1"));
        assert_eq!(count(json!({"hard": {"pods": "9"}, "scopes": ["NotTerminating"]})).as_deref(), Some("1"));
        assert_eq!(count(json!({"hard": {"pods": "9"}, "scopes": ["BestEffort"]})).as_deref(), Some("1"));
        assert_eq!(
            count(json!({"hard": {"pods": "9"}, "scopes": ["NotBestEffort", "NotTerminating"]})).as_deref(),
            Some("1")
        );
        let selector = json!({"hard": {"pods": "9", "configmaps": "1"},
                              "scopeSelector": {"matchExpressions": [{"scopeName": "PriorityClass", "operator": "In",
                                                                      "values": ["high"]}]}});
        let used = used(&quota(selector), &namespace);
        assert_eq!(quantities(&used), [("pods", "1")].into(), "a scoped quota counts pods only");
    }
}
