//! Authorization: RBAC, as upstream's authorizer evaluates it. Members of `system:masters`
//! may do anything (the admin certificate, and the components `tugboat server` runs); everyone
//! else may do what the ClusterRoles and Roles bound to them (as User, Group or
//! ServiceAccount) allow. The server keeps upstream's default roles and bindings
//! (`cluster-admin`, `admin`, `edit`, `view`, `system:discovery`, `system:basic-user`,
//! `system:public-info-viewer`) in the store, made if missing at start.

use serde_json::{Value, json};

use crate::auth::{Attributes, ResourceAttributes, UserInfo};
use crate::registry;
use crate::state::ApiState;
use crate::status::ApiError;

fn strings(value: &Value) -> impl Iterator<Item = &str> {
    value.as_array().into_iter().flatten().filter_map(Value::as_str)
}

fn contains(list: &Value, wanted: &str) -> bool {
    strings(list).any(|s| s == "*" || s == wanted)
}

/// Whether one PolicyRule allows the request (upstream's `RuleAllows`).
pub fn rule_allows(rule: &Value, attributes: &Attributes) -> bool {
    if !contains(&rule["verbs"], &attributes.verb) {
        return false;
    }
    match &attributes.resource {
        Some(r) => {
            if !contains(&rule["apiGroups"], &r.group) {
                return false;
            }
            let combined =
                if r.subresource.is_empty() { r.resource.clone() } else { format!("{}/{}", r.resource, r.subresource) };
            let resource_matches = strings(&rule["resources"]).any(|s| {
                s == "*"
                    || s == combined
                    || (!r.subresource.is_empty() && s.strip_prefix("*/") == Some(r.subresource.as_str()))
            });
            let names = rule["resourceNames"].as_array().map(Vec::len).unwrap_or(0);
            resource_matches && (names == 0 || strings(&rule["resourceNames"]).any(|n| n == r.name))
        }
        None => strings(&rule["nonResourceURLs"]).any(|url| {
            url == "*"
                || url == attributes.path
                || url.strip_suffix('*').is_some_and(|prefix| attributes.path.starts_with(prefix))
        }),
    }
}

/// Whether a binding's subject is this user.
fn subject_matches(subject: &Value, user: &UserInfo) -> bool {
    let name = subject["name"].as_str().unwrap_or_default();
    match subject["kind"].as_str().unwrap_or_default() {
        "User" => user.name == name,
        "Group" => user.groups.iter().any(|g| g == name),
        "ServiceAccount" => {
            let namespace = subject["namespace"].as_str().unwrap_or_default();
            user.name == format!("system:serviceaccount:{namespace}:{name}")
        }
        _ => false,
    }
}

async fn cached(state: &ApiState, group: &str, plural: &str, namespace: Option<&str>) -> Result<Vec<Value>, ApiError> {
    let resource = registry::find(group, "v1", plural).expect("RBAC resources are served");
    crate::state::cached_list(state, resource, namespace).await
}

const RBAC: &str = "rbac.authorization.k8s.io";

/// The rules that apply to `user` in `namespace` (cluster-wide ones, and the namespace's).
pub async fn rules_for(state: &ApiState, user: &UserInfo, namespace: Option<&str>) -> Result<Vec<Value>, ApiError> {
    let cluster_roles = cached(state, RBAC, "clusterroles", None).await?;
    let cluster_role = |name: &str| cluster_roles.iter().find(|r| r["metadata"]["name"] == name);
    let mut rules = Vec::new();
    let mut add = |role: Option<&Value>| {
        if let Some(role) = role {
            rules.extend(role["rules"].as_array().into_iter().flatten().cloned());
        }
    };
    for binding in cached(state, RBAC, "clusterrolebindings", None).await? {
        if binding["roleRef"]["kind"] == "ClusterRole"
            && binding["subjects"].as_array().into_iter().flatten().any(|s| subject_matches(s, user))
        {
            add(cluster_role(binding["roleRef"]["name"].as_str().unwrap_or_default()));
        }
    }
    if let Some(namespace) = namespace.filter(|n| !n.is_empty()) {
        let roles = cached(state, RBAC, "roles", Some(namespace)).await?;
        for binding in cached(state, RBAC, "rolebindings", Some(namespace)).await? {
            if !binding["subjects"].as_array().into_iter().flatten().any(|s| subject_matches(s, user)) {
                continue;
            }
            let name = binding["roleRef"]["name"].as_str().unwrap_or_default();
            match binding["roleRef"]["kind"].as_str() {
                Some("ClusterRole") => add(cluster_role(name)),
                Some("Role") => add(roles.iter().find(|r| r["metadata"]["name"] == name)),
                _ => {}
            }
        }
    }
    Ok(rules)
}

pub fn is_master(user: &UserInfo) -> bool {
    user.groups.iter().any(|g| g == "system:masters")
}

/// Whether `user` may do what `attributes` say.
pub async fn allowed(state: &ApiState, user: &UserInfo, attributes: &Attributes) -> Result<bool, ApiError> {
    if is_master(user) {
        return Ok(true);
    }
    if let Some(decision) = crate::node::authorize(state, user, attributes).await? {
        return Ok(decision);
    }
    let namespace = attributes.resource.as_ref().map(|r| r.namespace.as_str());
    Ok(rules_for(state, user, namespace).await?.iter().any(|rule| rule_allows(rule, attributes)))
}

/// Upstream's refusal: `pods "x" is forbidden: User "alice" cannot get resource "pods" in API
/// group "" in the namespace "default"`.
pub fn forbidden(user: &UserInfo, attributes: &Attributes) -> ApiError {
    let who = format!("User {:?}", user.name);
    let message = match &attributes.resource {
        Some(r) => {
            let combined =
                if r.subresource.is_empty() { r.resource.clone() } else { format!("{}/{}", r.resource, r.subresource) };
            let qualified = if r.group.is_empty() { r.resource.clone() } else { format!("{}.{}", r.resource, r.group) };
            let subject = if r.name.is_empty() { qualified } else { format!("{qualified} {:?}", r.name) };
            let scope = if r.namespace.is_empty() {
                "at the cluster scope".to_string()
            } else {
                format!("in the namespace {:?}", r.namespace)
            };
            format!(
                "{subject} is forbidden: {who} cannot {} resource {combined:?} in API group {:?} {scope}",
                attributes.verb, r.group
            )
        }
        None => format!("forbidden: {who} cannot {} path {:?}", attributes.verb, attributes.path),
    };
    let message = match crate::node::refusal(user, attributes) {
        Some(why) => format!("{message}: {why}"),
        None => message,
    };
    let mut error = ApiError::new(403, "Forbidden", message);
    if let Some(r) = &attributes.resource {
        error.group = Some(r.group.clone()).filter(|g| !g.is_empty());
        error.kind = Some(r.resource.clone());
        error.name = Some(r.name.clone()).filter(|n| !n.is_empty());
    }
    error
}

/// `SelfSubjectAccessReview`: whether the asking user may do what `spec` describes.
pub async fn review(state: &ApiState, user: &UserInfo, spec: &Value) -> Result<Value, ApiError> {
    let attributes = if let Some(r) = spec["resourceAttributes"].as_object() {
        let field = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or_default().to_string();
        Attributes {
            verb: field("verb"),
            resource: Some(ResourceAttributes {
                group: field("group"),
                resource: field("resource"),
                subresource: field("subresource"),
                namespace: field("namespace"),
                name: field("name"),
            }),
            path: String::new(),
        }
    } else {
        let n = &spec["nonResourceAttributes"];
        Attributes {
            verb: n["verb"].as_str().unwrap_or_default().to_string(),
            resource: None,
            path: n["path"].as_str().unwrap_or_default().to_string(),
        }
    };
    let allowed = allowed(state, user, &attributes).await?;
    let mut status = json!({"allowed": allowed});
    if allowed {
        status["reason"] = json!(if is_master(user) { "the user is in system:masters" } else { "allowed by RBAC" });
    }
    Ok(status)
}

/// `SelfSubjectRulesReview`: what the user may do in a namespace.
pub async fn rules_review(state: &ApiState, user: &UserInfo, namespace: &str) -> Result<Value, ApiError> {
    let rules = if is_master(user) {
        vec![
            json!({"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]}),
            json!({"verbs": ["*"], "nonResourceURLs": ["*"]}),
        ]
    } else {
        rules_for(state, user, Some(namespace)).await?
    };
    let (resource, non_resource): (Vec<Value>, Vec<Value>) =
        rules.into_iter().partition(|r| r["nonResourceURLs"].as_array().is_none_or(Vec::is_empty));
    Ok(json!({"resourceRules": resource, "nonResourceRules": non_resource, "incomplete": false}))
}

/// Upstream's default ClusterRoles and ClusterRoleBindings (the ones this server needs),
/// as `(kind, object)`.
pub fn defaults() -> Vec<(&'static str, Value)> {
    let meta = |name: &str| {
        json!({"name": name, "labels": {"kubernetes.io/bootstrapping": "rbac-defaults"},
               "annotations": {"rbac.authorization.kubernetes.io/autoupdate": "true"}})
    };
    let role = |name: &str, rules: Value| json!({"metadata": meta(name), "rules": rules});
    let binding = |name: &str, role: &str, groups: &[&str]| {
        let subjects: Vec<Value> =
            groups.iter().map(|g| json!({"kind": "Group", "apiGroup": RBAC, "name": g})).collect();
        json!({"metadata": meta(name), "roleRef": {"apiGroup": RBAC, "kind": "ClusterRole", "name": role},
               "subjects": subjects})
    };
    let read = json!(["get", "list", "watch"]);
    let write = json!(["create", "delete", "deletecollection", "patch", "update"]);
    let workloads = json!([
        [
            "",
            [
                "pods",
                "pods/log",
                "pods/status",
                "services",
                "services/status",
                "endpoints",
                "configmaps",
                "persistentvolumeclaims",
                "persistentvolumeclaims/status",
                "replicationcontrollers",
                "replicationcontrollers/scale",
                "replicationcontrollers/status",
                "serviceaccounts",
                "events",
                "limitranges",
                "resourcequotas",
                "resourcequotas/status",
                "namespaces",
                "namespaces/status",
                "bindings",
                "pods/ephemeralcontainers"
            ]
        ],
        [
            "apps",
            [
                "deployments",
                "deployments/scale",
                "deployments/status",
                "replicasets",
                "replicasets/scale",
                "replicasets/status",
                "daemonsets",
                "daemonsets/status",
                "statefulsets",
                "statefulsets/scale",
                "statefulsets/status",
                "controllerrevisions"
            ]
        ],
        ["batch", ["jobs", "jobs/status", "cronjobs", "cronjobs/status"]],
        ["autoscaling", ["horizontalpodautoscalers", "horizontalpodautoscalers/status"]],
        ["policy", ["poddisruptionbudgets", "poddisruptionbudgets/status"]],
        ["networking.k8s.io", ["ingresses", "ingresses/status", "networkpolicies"]],
        ["discovery.k8s.io", ["endpointslices"]],
        ["events.k8s.io", ["events"]],
        ["metrics.k8s.io", ["pods", "nodes"]],
    ]);
    let rules_for_groups = |verbs: &Value, extra: Vec<Value>| -> Value {
        let mut rules: Vec<Value> = workloads
            .as_array()
            .expect("a list")
            .iter()
            .map(|entry| json!({"apiGroups": [entry[0]], "resources": entry[1], "verbs": verbs}))
            .collect();
        rules.extend(extra);
        Value::Array(rules)
    };
    let view = rules_for_groups(&read, vec![]);
    let edit_extra = vec![
        json!({"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list", "watch", "create", "delete", "deletecollection", "patch", "update"]}),
        json!({"apiGroups": [""], "resources": ["pods/exec", "pods/attach", "pods/portforward", "pods/proxy", "services/proxy"], "verbs": ["get", "create"]}),
        json!({"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]}),
        json!({"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]}),
    ];
    let mut edit = rules_for_groups(&read, edit_extra.clone());
    edit.as_array_mut().expect("a list").extend(rules_for_groups(&write, vec![]).as_array().expect("a list").clone());
    let mut admin = edit.clone();
    admin.as_array_mut().expect("a list").push(json!({"apiGroups": [RBAC], "resources": ["roles", "rolebindings"],
        "verbs": ["get", "list", "watch", "create", "delete", "deletecollection", "patch", "update"]}));
    admin.as_array_mut().expect("a list").push(json!({"apiGroups": ["authorization.k8s.io"],
        "resources": ["localsubjectaccessreviews"], "verbs": ["create"]}));
    vec![
        (
            "ClusterRole",
            role(
                "cluster-admin",
                json!([
                    {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                    {"nonResourceURLs": ["*"], "verbs": ["*"]},
                ]),
            ),
        ),
        ("ClusterRole", role("admin", admin)),
        ("ClusterRole", role("edit", edit)),
        ("ClusterRole", role("view", view)),
        (
            "ClusterRole",
            role(
                "system:discovery",
                json!([{"nonResourceURLs": [
            "/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi", "/openapi/*", "/readyz",
            "/version", "/version/"], "verbs": ["get"]}]),
            ),
        ),
        (
            "ClusterRole",
            role(
                "system:basic-user",
                json!([
                    {"apiGroups": ["authorization.k8s.io"], "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"], "verbs": ["create"]},
                    {"apiGroups": ["authentication.k8s.io"], "resources": ["selfsubjectreviews"], "verbs": ["create"]},
                ]),
            ),
        ),
        (
            "ClusterRole",
            role(
                "system:public-info-viewer",
                json!([{"nonResourceURLs": [
            "/healthz", "/livez", "/readyz", "/version", "/version/"], "verbs": ["get"]}]),
            ),
        ),
        (
            "ClusterRole",
            role(
                "system:service-account-issuer-discovery",
                json!([{"nonResourceURLs": [
            "/.well-known/openid-configuration", "/.well-known/openid-configuration/", "/openid/v1/jwks",
            "/openid/v1/jwks/"], "verbs": ["get"]}]),
            ),
        ),
        // What an extension API server (or metrics-server) binds to delegate the checking of
        // its callers to this server.
        (
            "ClusterRole",
            role(
                "system:auth-delegator",
                json!([
                    {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
                    {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
                ]),
            ),
        ),
        (
            "ClusterRole",
            role(
                "system:kubelet-api-admin",
                json!([
                    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch", "proxy"]},
                    {"apiGroups": [""], "resources": ["nodes/log", "nodes/metrics", "nodes/proxy", "nodes/stats"], "verbs": ["*"]},
                ]),
            ),
        ),
        (
            "ClusterRole",
            role(
                "system:monitoring",
                json!([{"nonResourceURLs": ["/healthz", "/healthz/*", "/livez", "/livez/*", "/metrics",
                    "/metrics/slis", "/readyz", "/readyz/*"], "verbs": ["get"]}]),
            ),
        ),
        ("ClusterRoleBinding", binding("system:monitoring", "system:monitoring", &["system:monitoring"])),
        (
            "ClusterRole",
            role(
                "system:node-bootstrapper",
                json!([{"apiGroups": ["certificates.k8s.io"],
            "resources": ["certificatesigningrequests"], "verbs": ["create", "get", "list", "watch"]}]),
            ),
        ),
        // Joining nodes look up their name first (taken by a live node?), as kubeadm's do.
        (
            "ClusterRole",
            role("kubeadm:get-nodes", json!([{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]}])),
        ),
        // What kubelets need beyond the Node authorizer (node.rs), which also keeps each node
        // to its own Node, Lease and pods.
        (
            "ClusterRole",
            role(
                "system:node",
                json!([
                    {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
                    {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["get", "patch", "update"]},
                    {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch", "create", "delete"]},
                    {"apiGroups": [""], "resources": ["pods/status"], "verbs": ["get", "patch", "update"]},
                    {"apiGroups": [""], "resources": ["pods/eviction"], "verbs": ["create"]},
                    {"apiGroups": ["", "events.k8s.io"], "resources": ["events"], "verbs": ["create", "patch", "update"]},
                    // Secrets, ConfigMaps, claims, volumes, service accounts and their tokens:
                    // the Node authorizer's (node.rs), only what the node's pods use.
                    {"apiGroups": [""], "resources": ["services", "endpoints"], "verbs": ["get", "list", "watch"]},
                    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]},
                    {"apiGroups": ["certificates.k8s.io"], "resources": ["certificatesigningrequests"], "verbs": ["create", "get", "list", "watch"]},
                    {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
                    // NetworkPolicy enforcement picks peers by namespace labels.
                    {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["get", "list", "watch"]},
                    {"apiGroups": [""], "resources": ["namespaces"], "verbs": ["get", "list", "watch"]},
                    // Delegated authentication and authorization of the kubelet API's callers.
                    {"apiGroups": ["authentication.k8s.io"], "resources": ["tokenreviews"], "verbs": ["create"]},
                    {"apiGroups": ["authorization.k8s.io"], "resources": ["subjectaccessreviews"], "verbs": ["create"]},
                ]),
            ),
        ),
        ("ClusterRoleBinding", binding("system:node", "system:node", &["system:nodes"])),
        ("ClusterRoleBinding", binding("cluster-admin", "cluster-admin", &["system:masters"])),
        (
            "ClusterRoleBinding",
            binding(
                "kubeadm:kubelet-bootstrap",
                "system:node-bootstrapper",
                &[tugboat_pki::bootstrap::NODE_TOKEN_GROUP],
            ),
        ),
        (
            "ClusterRoleBinding",
            binding("kubeadm:get-nodes", "kubeadm:get-nodes", &[tugboat_pki::bootstrap::NODE_TOKEN_GROUP]),
        ),
        ("ClusterRoleBinding", binding("system:discovery", "system:discovery", &["system:authenticated"])),
        ("ClusterRoleBinding", binding("system:basic-user", "system:basic-user", &["system:authenticated"])),
        (
            "ClusterRoleBinding",
            binding(
                "system:service-account-issuer-discovery",
                "system:service-account-issuer-discovery",
                &["system:serviceaccounts"],
            ),
        ),
        (
            "ClusterRoleBinding",
            binding(
                "system:public-info-viewer",
                "system:public-info-viewer",
                &["system:authenticated", "system:unauthenticated"],
            ),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(verb: &str, group: &str, resource: &str, sub: &str, ns: &str, name: &str) -> Attributes {
        Attributes {
            verb: verb.into(),
            resource: Some(ResourceAttributes {
                group: group.into(),
                resource: resource.into(),
                subresource: sub.into(),
                namespace: ns.into(),
                name: name.into(),
            }),
            path: String::new(),
        }
    }

    #[test]
    fn rules_match_as_upstream() {
        let rule = json!({"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get", "list"]});
        assert!(rule_allows(&rule, &attrs("get", "", "pods", "", "default", "x")));
        assert!(rule_allows(&rule, &attrs("get", "", "pods", "log", "default", "x")));
        assert!(!rule_allows(&rule, &attrs("get", "", "pods", "exec", "default", "x")), "a subresource is its own");
        assert!(!rule_allows(&rule, &attrs("delete", "", "pods", "", "default", "x")));
        assert!(!rule_allows(&rule, &attrs("get", "apps", "pods", "", "default", "x")));
        let any_scale = json!({"apiGroups": ["*"], "resources": ["*/scale"], "verbs": ["*"]});
        assert!(rule_allows(&any_scale, &attrs("update", "apps", "deployments", "scale", "d", "web")));
        assert!(!rule_allows(&any_scale, &attrs("update", "apps", "deployments", "", "d", "web")));
        let named = json!({"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["one"], "verbs": ["get"]});
        assert!(rule_allows(&named, &attrs("get", "", "configmaps", "", "d", "one")));
        assert!(!rule_allows(&named, &attrs("get", "", "configmaps", "", "d", "two")));
        let paths = json!({"nonResourceURLs": ["/apis/*", "/version"], "verbs": ["get"]});
        let path = |p: &str| Attributes { verb: "get".into(), resource: None, path: p.into() };
        assert!(rule_allows(&paths, &path("/apis/apps/v1")) && rule_allows(&paths, &path("/version")));
        assert!(!rule_allows(&paths, &path("/metrics")));
    }

    #[test]
    fn subjects_and_refusals_read_as_upstream() {
        let alice = UserInfo { name: "alice".into(), groups: vec!["dev".into()], ..Default::default() };
        assert!(subject_matches(&json!({"kind": "User", "name": "alice"}), &alice));
        assert!(subject_matches(&json!({"kind": "Group", "name": "dev"}), &alice));
        let sa = UserInfo { name: "system:serviceaccount:ns:robot".into(), ..Default::default() };
        assert!(subject_matches(&json!({"kind": "ServiceAccount", "name": "robot", "namespace": "ns"}), &sa));
        assert!(!subject_matches(&json!({"kind": "ServiceAccount", "name": "robot", "namespace": "other"}), &sa));
        let error = forbidden(&alice, &attrs("list", "", "pods", "", "default", ""));
        assert_eq!(
            error.message,
            "pods is forbidden: User \"alice\" cannot list resource \"pods\" in API group \"\" in the namespace \"default\""
        );
        let error = forbidden(&alice, &attrs("get", "apps", "deployments", "", "", "web"));
        assert_eq!(
            error.message,
            "deployments.apps \"web\" is forbidden: User \"alice\" cannot get resource \"deployments\" in API group \"apps\" at the cluster scope"
        );
        assert_eq!(error.code, 403);
    }
}
