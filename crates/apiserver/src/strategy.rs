//! What each kind does on the write path beyond what every kind does — upstream's REST
//! strategies (prepare and validate on create and update, the subresource views, what a
//! delete waits for, what follows it) and the admission plugins of one kind — behind one
//! interface: `write.rs` calls the hooks of the resource's [`Strategy`] (chosen by its registry
//! entry, `Resource::strategy`), the same for built-in and custom kinds, and a kind's rules
//! are read here rather than as branches across the write path.
//!
//! Also the views a write addresses ([`View`]: the object, `/status`, `/scale`, a namespace's
//! `/finalize`, a pod's `/ephemeralcontainers`), since which a kind has is its strategy's.

use std::time::Duration;

use serde_json::{Value, json};

use crate::admission;
use crate::object;
use crate::registry::{self, Resource, Strategy};
use crate::state::ApiState;
use crate::status::ApiError;

/// Which part of an object a write addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum View {
    /// The object; its status is kept as it was when the resource has a status subresource.
    Main,
    /// `/status`: only the status (and labels) change.
    Status,
    /// `/scale`: an autoscaling/v1 Scale whose `spec.replicas` is the object's.
    Scale,
    /// A namespace's `spec.finalizers` (`namespaces/{name}/finalize`): how the namespace
    /// controller lets a Terminating namespace go.
    Finalize,
    /// Spec and status at once: the server's own writes (a binding sets the node and the
    /// PodScheduled condition).
    Whole,
    /// A pod's `spec.ephemeralContainers` (`pods/{name}/ephemeralcontainers`, what `kubectl
    /// debug` writes): containers may be added, never changed or removed.
    Ephemeral,
}

impl View {
    pub(crate) fn from_subresource(resource: &Resource, subresource: Option<&str>) -> Result<View, ApiError> {
        match subresource {
            None => Ok(View::Main),
            Some("status") if resource.has_status() => Ok(View::Status),
            Some("scale") if resource.has_scale() => Ok(View::Scale),
            Some(other) => resource
                .strategy()
                .view(other)
                .ok_or_else(|| ApiError::not_found_path(&format!("{}/{other}", resource.plural))),
        }
    }

    /// What a client reads and writes through this view of `object`.
    pub(crate) fn project(self, resource: &Resource, object: &Value) -> Value {
        match self {
            View::Main | View::Status | View::Whole | View::Finalize | View::Ephemeral => object.clone(),
            View::Scale if let Some(paths) = resource.custom.and_then(|c| c.scale.as_ref()) => {
                // A custom resource's scale reads the paths its definition names.
                let at = |path: &str| crate::custom::json_path(object, path).cloned().unwrap_or(Value::Null);
                let mut status = json!({"replicas": at(&paths.status_replicas).as_i64().unwrap_or(0)});
                if let Some(selector) = &paths.label_selector
                    && let Some(selector) = at(selector).as_str()
                {
                    status["selector"] = json!(selector);
                }
                scale(object, at(&paths.spec_replicas).as_i64().unwrap_or(0), status)
            }
            View::Scale => {
                let selector = crate::selector::selector_labels(&object["spec"]["selector"])
                    .as_object()
                    .map(|m| {
                        m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect::<Vec<_>>().join(",")
                    })
                    .unwrap_or_default();
                let status =
                    json!({"replicas": object["status"]["replicas"].as_i64().unwrap_or(0), "selector": selector});
                scale(object, object["spec"]["replicas"].as_i64().unwrap_or(1), status)
            }
        }
    }

    /// The object after a client wrote `written` through this view of `old`.
    pub(crate) fn merge_back(self, resource: &Resource, old: &Value, written: Value) -> Result<Value, ApiError> {
        let invalid_replicas = |message: String| {
            let name = old["metadata"]["name"].as_str().unwrap_or("");
            let cause = crate::status::Cause { reason: "FieldValueInvalid", message, field: "spec.replicas".into() };
            ApiError::invalid("autoscaling", "Scale", name, vec![cause])
        };
        match self {
            View::Main => {
                let mut object = written;
                if resource.has_status() {
                    match old.get("status") {
                        Some(status) => object["status"] = status.clone(),
                        None => {
                            if let Some(map) = object.as_object_mut() {
                                map.remove("status");
                            }
                        }
                    }
                }
                resource.strategy().keep_on_update(old, &mut object);
                Ok(object)
            }
            View::Ephemeral => {
                let name = old["metadata"]["name"].as_str().unwrap_or("");
                let before = old["spec"]["ephemeralContainers"].as_array().cloned().unwrap_or_default();
                let after = written["spec"]["ephemeralContainers"].as_array().cloned().unwrap_or_default();
                let forbidden = |message: &str| {
                    let cause = crate::status::Cause {
                        reason: "FieldValueForbidden",
                        message: format!("Forbidden: {message}"),
                        field: "spec.ephemeralContainers".into(),
                    };
                    ApiError::invalid("", "Pod", name, vec![cause])
                };
                // Each container there before is still there, unchanged.
                for container in &before {
                    let same = after.iter().find(|c| c["name"] == container["name"]);
                    match same {
                        None => return Err(forbidden("existing ephemeral containers may not be removed")),
                        Some(c) if c != container => {
                            return Err(forbidden("existing ephemeral containers may not be changed"));
                        }
                        Some(_) => {}
                    }
                }
                let taken: Vec<&Value> = old["spec"]["containers"]
                    .as_array()
                    .into_iter()
                    .chain(old["spec"]["initContainers"].as_array())
                    .flatten()
                    .map(|c| &c["name"])
                    .collect();
                for (i, container) in after.iter().enumerate() {
                    let field = format!("spec.ephemeralContainers[{i}]");
                    let invalid = |reason: &'static str, message: String, field: String| {
                        ApiError::invalid("", "Pod", name, vec![crate::status::Cause { reason, message, field }])
                    };
                    if container["name"].as_str().is_none_or(str::is_empty) {
                        return Err(invalid("FieldValueRequired", "Required value".into(), format!("{field}.name")));
                    }
                    if taken.contains(&&container["name"])
                        || after.iter().filter(|c| c["name"] == container["name"]).count() > 1
                    {
                        let message = format!("Duplicate value: {}", container["name"]);
                        return Err(invalid("FieldValueDuplicate", message, format!("{field}.name")));
                    }
                    if container["image"].as_str().is_none_or(str::is_empty) {
                        return Err(invalid("FieldValueRequired", "Required value".into(), format!("{field}.image")));
                    }
                }
                let mut object = old.clone();
                // Defaults, as a container of the pod gets them.
                let mut defaulted = json!({"containers": after});
                object::default_pod_spec(&mut defaulted);
                object["spec"]["ephemeralContainers"] = defaulted["containers"].take();
                Ok(object)
            }
            View::Finalize => {
                let mut object = old.clone();
                let finalizers = &written["spec"]["finalizers"];
                if !(finalizers.is_null() || finalizers.as_array().is_some_and(|f| f.iter().all(Value::is_string))) {
                    let name = old["metadata"]["name"].as_str().unwrap_or("");
                    let cause = crate::status::Cause {
                        reason: "FieldValueInvalid",
                        message: "Invalid value: a list of finalizer names".into(),
                        field: "spec.finalizers".into(),
                    };
                    return Err(ApiError::invalid("", "Namespace", name, vec![cause]));
                }
                object["spec"]["finalizers"] = finalizers.clone();
                Ok(object)
            }
            View::Whole => Ok(written),
            View::Status => {
                let mut object = old.clone();
                object["status"] = written.get("status").cloned().unwrap_or(Value::Null);
                for field in resource.strategy().status_writes_metadata() {
                    if let Some(value) = written["metadata"].get(*field) {
                        object["metadata"][*field] = value.clone();
                    }
                }
                Ok(object)
            }
            View::Scale => {
                let replicas = written["spec"]["replicas"]
                    .as_i64()
                    .ok_or_else(|| invalid_replicas("Required value: an integer".into()))?;
                if replicas < 0 {
                    return Err(invalid_replicas(format!(
                        "Invalid value: {replicas}: must be greater than or equal to 0"
                    )));
                }
                let mut object = old.clone();
                match resource.custom.and_then(|c| c.scale.as_ref()) {
                    Some(paths) => crate::custom::set_path(&mut object, &paths.spec_replicas, json!(replicas)),
                    None => object["spec"]["replicas"] = json!(replicas),
                }
                Ok(object)
            }
        }
    }
}

/// The autoscaling/v1 Scale of `object`.
fn scale(object: &Value, replicas: i64, status: Value) -> Value {
    let metadata = &object["metadata"];
    json!({
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": metadata["name"],
            "namespace": metadata["namespace"],
            "uid": metadata["uid"],
            "resourceVersion": metadata["resourceVersion"],
            "creationTimestamp": metadata["creationTimestamp"],
        },
        "spec": {"replicas": replicas},
        "status": status,
    })
}


/// Namespaces that may never be deleted.
const PROTECTED_NAMESPACES: &[&str] = &["default", "kube-system", "kube-public"];

impl Strategy {
    /// The view a subresource of this kind addresses, beyond `/status` and `/scale`.
    fn view(self, subresource: &str) -> Option<View> {
        match (self, subresource) {
            (Strategy::Namespaces, "finalize") => Some(View::Finalize),
            (Strategy::Pods, "ephemeralcontainers") => Some(View::Ephemeral),
            // A CSR's conditions (approval) live in its status, as its certificate does.
            (Strategy::CertificateSigningRequests, "approval") => Some(View::Status),
            _ => None,
        }
    }

    /// What an update of the object (the main view) cannot change: only `/finalize` changes a
    /// namespace's finalizers, only `/ephemeralcontainers` a pod's ephemeral containers.
    fn keep_on_update(self, old: &Value, object: &mut Value) {
        match self {
            Strategy::Namespaces => object["spec"]["finalizers"] = old["spec"]["finalizers"].clone(),
            Strategy::Pods => match old["spec"].get("ephemeralContainers") {
                Some(kept) => object["spec"]["ephemeralContainers"] = kept.clone(),
                None => {
                    if let Some(spec) = object["spec"].as_object_mut() {
                        spec.remove("ephemeralContainers");
                    }
                }
            },
            _ => {}
        }
    }

    /// The metadata a `/status` write changes besides the status: upstream's status strategies
    /// reset the spec, not the labels and annotations (but a Deployment's keeps its labels,
    /// and API priority and fairness objects their whole metadata).
    fn status_writes_metadata(self) -> &'static [&'static str] {
        match self {
            Strategy::Deployments => &["annotations"],
            Strategy::FlowControl => &[],
            _ => &["labels", "annotations"],
        }
    }

    /// Defaults and validates what is particular to the kind in an object about to be created
    /// (after the schema's defaults and validation).
    pub(crate) fn validate_create(self, state: &ApiState, resource: &Resource, object: &mut Value) -> Result<(), ApiError> {
        if let Some(custom) = resource.custom
            && custom.terminating
        {
            let mut error = ApiError::method_not_allowed("create");
            error.message = format!("create not allowed while custom resource definition is terminating: {}", custom.crd);
            return Err(error);
        }
        self.validate(state, resource, object, None)
    }

    /// Defaults and validates what is particular to the kind in an update through `view`.
    pub(crate) fn validate_update(
        self,
        state: &ApiState,
        resource: &Resource,
        view: View,
        old: &Value,
        object: &mut Value,
    ) -> Result<(), ApiError> {
        match (self, view) {
            (_, View::Main) => self.validate(state, resource, object, Some(old)),
            // The server's own writes of a custom object are not judged by its schema again.
            (Strategy::Custom, View::Whole) => Ok(()),
            (Strategy::Custom, _) => match resource.custom {
                Some(custom) => validate_custom(resource, custom, object, Some(old)),
                None => Ok(()),
            },
            (Strategy::Definitions, View::Whole) => {
                crate::crd::prepare(object, &state.custom.definitions(), Some(old))
            }
            _ => Ok(()),
        }
    }

    /// Upstream's PrepareForCreate/Update and Validate of the object as a whole (`old` on an
    /// update); run again after a mutating webhook changed the object.
    fn validate(self, state: &ApiState, resource: &Resource, object: &mut Value, old: Option<&Value>) -> Result<(), ApiError> {
        match self {
            Strategy::Custom => match resource.custom {
                Some(custom) => validate_custom(resource, custom, object, old),
                None => Ok(()),
            },
            Strategy::AdmissionConfigurations => check_configuration(resource, object),
            Strategy::Policies => {
                check_configuration(resource, object)?;
                // What upstream's policy status controller writes soon after.
                object["status"] = crate::policy::type_check(state, object);
                Ok(())
            }
            Strategy::ApiServices => check_api_service(resource, object),
            Strategy::Services => {
                if let Some(old) = old {
                    crate::services::drop_type_dependent_fields(old, object);
                }
                crate::services::default_and_validate(object)
            }
            Strategy::Definitions => crate::crd::prepare(object, &state.custom.definitions(), old),
            Strategy::Pods => match old {
                Some(old) => object::check_pod_update(old, object),
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// Upstream's admission plugins of the kind, on create: a pod's priority, service account,
    /// runtime class and limit ranges; a claim's default storage class and limit ranges.
    pub(crate) async fn admit_create(self, state: &ApiState, object: &mut Value) -> Result<(), ApiError> {
        match self {
            Strategy::Pods => {
                crate::priority::admit(state.store.as_ref(), &state.caches, object).await?;
                crate::service_accounts::admit(state, object).await?;
                crate::runtime_class::admit(state, object).await?;
                crate::limit_range::admit_pod(state, object).await
            }
            Strategy::PersistentVolumeClaims => {
                crate::storage::admit(state, object).await?;
                crate::limit_range::admit_claim(state, object).await
            }
            _ => Ok(()),
        }
    }

    /// What a new object takes before it is stored (a Service's cluster IPs and node ports);
    /// `true` when something was taken, to be given back with [`Strategy::after_delete`] if
    /// the store refuses the object.
    pub(crate) async fn allocate(self, state: &ApiState, object: &mut Value) -> Result<bool, ApiError> {
        match self {
            Strategy::Services => {
                let claims = crate::services::allocate(state.store.as_ref(), state.service_cidr, object).await?;
                Ok(!claims.is_empty())
            }
            _ => Ok(false),
        }
    }

    /// What an update of the object (not a dry run) takes or keeps (a Service's IPs and ports
    /// as its type changes).
    pub(crate) async fn allocate_update(self, state: &ApiState, old: &Value, object: &mut Value) -> Result<(), ApiError> {
        match self {
            Strategy::Services => crate::services::carry_over(state.store.as_ref(), state.service_cidr, old, object).await,
            _ => Ok(()),
        }
    }

    /// Whether quota is charged again when the object changes (what it counts can change).
    pub(crate) fn quota_on_update(self) -> bool {
        matches!(self, Strategy::Pods | Strategy::Services | Strategy::PersistentVolumeClaims)
    }

    /// After a write was stored at `revision`: a definition's resources are served once the
    /// server's set of custom resources has seen it (so the writer's next request finds them).
    pub(crate) async fn after_write(self, state: &ApiState, revision: i64) {
        if self == Strategy::Definitions {
            served_after_write(state, revision).await;
        }
    }

    /// Whether an object of the kind may be deleted at all.
    pub(crate) fn check_delete(self, name: &str) -> Result<(), ApiError> {
        if self == Strategy::Namespaces && PROTECTED_NAMESPACES.contains(&name) {
            let mut error =
                ApiError::bad_request(format!("namespaces \"{name}\" is forbidden: this namespace may not be deleted"));
            error.code = 403;
            error.reason = "Forbidden";
            return Err(error);
        }
        Ok(())
    }

    /// What a delete of `object` waits for besides its finalizers: a pod some node runs is
    /// given its grace period (`Some(seconds)`; upstream's CheckGracefulDelete: one no node
    /// runs — unscheduled or ended — goes at once), a namespace its content's removal
    /// (`spec.finalizers`, emptied by the namespace controller).
    pub(crate) fn delete_waits(self, object: &Value, grace: Option<i64>) -> DeleteWaits {
        match self {
            Strategy::Pods => {
                let seconds =
                    grace.unwrap_or_else(|| object["spec"]["terminationGracePeriodSeconds"].as_i64().unwrap_or(30));
                let running = object["spec"]["nodeName"].as_str().is_some_and(|n| !n.is_empty())
                    && !matches!(object["status"]["phase"].as_str(), Some("Succeeded" | "Failed"));
                if running && seconds > 0 { DeleteWaits::Grace(seconds) } else { DeleteWaits::Nothing }
            }
            Strategy::Namespaces if object["spec"]["finalizers"].as_array().is_some_and(|f| !f.is_empty()) => {
                DeleteWaits::Content
            }
            _ => DeleteWaits::Nothing,
        }
    }

    /// An object whose deletion begins (it has finalizers, or waits): a namespace is
    /// Terminating.
    pub(crate) fn deleting(self, object: &mut Value) {
        if self == Strategy::Namespaces {
            object["status"]["phase"] = json!("Terminating");
        }
    }

    /// After the object left the store (or a create of it was refused): what it held is given
    /// back (a Service's IPs and node ports).
    pub(crate) async fn after_delete(self, state: &ApiState, object: &Value) {
        if self == Strategy::Services {
            crate::services::release(state.store.as_ref(), object).await;
        }
    }
}

/// What a delete waits for besides finalizers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeleteWaits {
    Nothing,
    /// A running pod's grace period, in seconds.
    Grace(i64),
    /// A namespace's content.
    Content,
}

/// Defaults and validates an APIService.
fn check_api_service(resource: &Resource, object: &mut Value) -> Result<(), ApiError> {
    crate::aggregated::default(object);
    let causes = crate::aggregated::validate(object);
    if causes.is_empty() {
        return Ok(());
    }
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    Err(ApiError::invalid(resource.group, resource.kind, name, causes))
}

/// Defaults and validates an admission webhook configuration.
fn check_configuration(resource: &Resource, object: &mut Value) -> Result<(), ApiError> {
    let causes = admission::prepare_configuration(resource, object);
    if causes.is_empty() {
        return Ok(());
    }
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    Err(ApiError::invalid(resource.group, resource.kind, name, causes))
}

/// Defaults and validates a custom object by its definition's schema.
fn validate_custom(
    resource: &Resource,
    custom: &registry::Custom,
    object: &mut Value,
    old: Option<&Value>,
) -> Result<(), ApiError> {
    crate::custom::default(custom, object);
    let causes = crate::custom::validate(custom, object, old);
    if causes.is_empty() {
        return Ok(());
    }
    let name = object["metadata"]["name"].as_str().unwrap_or_default();
    Err(ApiError::invalid(resource.group, resource.kind, name, causes))
}

/// After a write of a definition: serve what it defines now, from a watch cache that has seen
/// the write (so the writer's next request finds the resource).
async fn served_after_write(state: &ApiState, revision: i64) {
    if state.custom.reflect(revision, Duration::from_secs(1)).await {
        return;
    }
    if let Err(error) = crate::crd::refresh(state).await {
        tracing::warn!(error = %error.message, "cannot read the CustomResourceDefinitions");
    }
}


#[cfg(test)]
mod tests {
    use super::*;

    fn strategy(group: &str, plural: &str) -> Strategy {
        let version = registry::RESOURCES.iter().find(|r| r.group == group && r.plural == plural).unwrap().version;
        registry::find(group, version, plural).unwrap().strategy()
    }

    #[test]
    fn each_kind_has_its_strategy_and_subresource_views() {
        assert_eq!(strategy("", "pods"), Strategy::Pods);
        assert_eq!(strategy("", "configmaps"), Strategy::KeyedData);
        assert_eq!(strategy("", "serviceaccounts"), Strategy::Plain);
        assert_eq!(strategy("autoscaling", "horizontalpodautoscalers"), Strategy::HorizontalPodAutoscalers);
        assert_eq!(strategy("apps", "deployments"), Strategy::Deployments);
        assert_eq!(strategy("admissionregistration.k8s.io", "validatingadmissionpolicies"), Strategy::Policies);
        assert_eq!(strategy("admissionregistration.k8s.io", "mutatingwebhookconfigurations"), Strategy::AdmissionConfigurations);
        assert_eq!(strategy("apiextensions.k8s.io", "customresourcedefinitions"), Strategy::Definitions);
        let pods = registry::find("", "v1", "pods").unwrap();
        assert_eq!(View::from_subresource(pods, Some("ephemeralcontainers")).unwrap(), View::Ephemeral);
        assert_eq!(View::from_subresource(pods, Some("status")).unwrap(), View::Status);
        assert_eq!(View::from_subresource(pods, Some("finalize")).unwrap_err().code, 404);
        let namespaces = registry::find("", "v1", "namespaces").unwrap();
        assert_eq!(View::from_subresource(namespaces, Some("finalize")).unwrap(), View::Finalize);
        let csrs = registry::find("certificates.k8s.io", "v1", "certificatesigningrequests").unwrap();
        assert_eq!(View::from_subresource(csrs, Some("approval")).unwrap(), View::Status);
        let configmaps = registry::find("", "v1", "configmaps").unwrap();
        assert_eq!(View::from_subresource(configmaps, Some("approval")).unwrap_err().code, 404);
    }

    #[test]
    fn what_deletes_wait_for() {
        let pod = |node: &str, phase: &str| json!({"spec": {"nodeName": node}, "status": {"phase": phase}});
        assert_eq!(Strategy::Pods.delete_waits(&pod("", "Pending"), None), DeleteWaits::Nothing);
        assert_eq!(Strategy::Pods.delete_waits(&pod("n1", "Running"), None), DeleteWaits::Grace(30));
        assert_eq!(Strategy::Pods.delete_waits(&pod("n1", "Running"), Some(0)), DeleteWaits::Nothing);
        assert_eq!(Strategy::Pods.delete_waits(&pod("n1", "Succeeded"), Some(5)), DeleteWaits::Nothing);
        let namespace = json!({"spec": {"finalizers": ["kubernetes"]}});
        assert_eq!(Strategy::Namespaces.delete_waits(&namespace, None), DeleteWaits::Content);
        assert_eq!(Strategy::Plain.delete_waits(&namespace, None), DeleteWaits::Nothing);
        assert_eq!(Strategy::Namespaces.check_delete("default").unwrap_err().code, 403);
        assert!(Strategy::Namespaces.check_delete("team-a").is_ok());
        assert!(Strategy::Plain.check_delete("default").is_ok());
    }

    #[test]
    fn updates_keep_what_only_a_subresource_changes() {
        let old = json!({"spec": {"finalizers": ["kubernetes"], "ephemeralContainers": [{"name": "debug"}]}});
        let mut namespace = json!({"spec": {"finalizers": []}});
        Strategy::Namespaces.keep_on_update(&old, &mut namespace);
        assert_eq!(namespace["spec"]["finalizers"], json!(["kubernetes"]));
        let mut pod = json!({"spec": {"containers": []}});
        Strategy::Pods.keep_on_update(&old, &mut pod);
        assert_eq!(pod["spec"]["ephemeralContainers"], json!([{"name": "debug"}]));
        let mut pod = json!({"spec": {"ephemeralContainers": [{"name": "sneaky"}]}});
        Strategy::Pods.keep_on_update(&json!({"spec": {}}), &mut pod);
        assert_eq!(pod["spec"], json!({}));
        assert_eq!(Strategy::Deployments.status_writes_metadata(), ["annotations"]);
        assert_eq!(Strategy::Plain.status_writes_metadata(), ["labels", "annotations"]);
    }
}
