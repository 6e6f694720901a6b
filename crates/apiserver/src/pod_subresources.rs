//! `pods/binding` (how a scheduler assigns a pod to a node) and `pods/eviction` (a deletion
//! that respects PodDisruptionBudgets), as upstream's pod storage answers them.

use axum::body::Body;
use axum::http::{Response, StatusCode};
use serde_json::{Value, json};
use tugboat_store::ListOptions;

use crate::state::{ApiState, json_response, read_object};

use crate::write::{View, delete_one, modify};

use crate::object;
use crate::registry::{self, Resource};
use crate::request::Write;
use crate::status::{ApiError, Cause};

fn pods() -> &'static Resource {
    registry::find("", "v1", "pods").expect("pods are served")
}

fn success(code: u16) -> Response<Body> {
    let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "code": code});
    json_response(StatusCode::from_u16(code).unwrap_or(StatusCode::CREATED), &status)
}

/// `POST pods/<name>/binding`: sets `spec.nodeName` of an unassigned pod and marks it
/// PodScheduled. A pod already on a node is a 409; a pod being deleted cannot be bound.
pub async fn bind(
    state: &ApiState,
    namespace: Option<&str>,
    name: &str,
    binding: &Value,
    write: &Write,
) -> Result<Response<Body>, ApiError> {
    let node = binding["target"]["name"].as_str().filter(|n| !n.is_empty()).ok_or_else(|| {
        let cause =
            Cause { reason: "FieldValueRequired", message: "Required value".into(), field: "target.name".into() };
        ApiError::invalid("", "Binding", name, vec![cause])
    })?;
    if binding["metadata"]["name"].as_str().is_some_and(|given| given != name) {
        return Err(ApiError::bad_request(format!(
            "the name of the binding ({}) does not match the pod's ({name})",
            binding["metadata"]["name"].as_str().unwrap_or_default()
        )));
    }
    modify(state, (pods(), namespace, name), View::Whole, write, |current, _| {
        if let Some(assigned) = current["spec"]["nodeName"].as_str().filter(|n| !n.is_empty()) {
            let mut error = ApiError::conflict("", "pods", name);
            error.message = format!("Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is already assigned to node \"{assigned}\"");
            return Err(error);
        }
        if current["metadata"]["deletionTimestamp"].is_string() {
            let mut error = ApiError::conflict("", "pods", name);
            error.message = format!("Operation cannot be fulfilled on pods/binding \"{name}\": pod {name} is being deleted, cannot be assigned to a host");
            return Err(error);
        }
        let mut pod = current.clone();
        pod["spec"]["nodeName"] = json!(node);
        let scheduled = json!({"type": "PodScheduled", "status": "True", "lastProbeTime": null,
                               "lastTransitionTime": object::now_rfc3339()});
        if !pod["status"].is_object() {
            pod["status"] = json!({});
        }
        match pod["status"]["conditions"].as_array_mut() {
            Some(conditions) => {
                conditions.retain(|c| c["type"] != "PodScheduled");
                conditions.push(scheduled);
            }
            None => pod["status"]["conditions"] = json!([scheduled]),
        }
        Ok(pod)
    })
    .await?;
    Ok(success(201))
}

/// `POST pods/<name>/eviction`: deletes the pod (with the eviction's delete options) unless a
/// PodDisruptionBudget that selects it allows no disruption now (429, as upstream). Each
/// eviction a budget allows takes one from its `status.disruptionsAllowed`; the disruption
/// controller recomputes it from the pods.
pub async fn evict(
    state: &ApiState,
    namespace: Option<&str>,
    name: &str,
    eviction: &Value,
    write: &Write,
) -> Result<Response<Body>, ApiError> {
    let (pod, _) = read_object(state, pods(), namespace, name).await?;
    let options = eviction.get("deleteOptions").cloned().unwrap_or_else(|| json!({}));
    // A pod that is done, or already going, needs no budget.
    let phase = pod["status"]["phase"].as_str().unwrap_or_default();
    let finished = matches!(phase, "Succeeded" | "Failed") || pod["metadata"]["deletionTimestamp"].is_string();
    if !finished {
        let budgets = registry::find("policy", "v1", "poddisruptionbudgets").expect("PDBs are served");
        let listed = state
            .store
            .list(&budgets.prefix(namespace), ListOptions::default())
            .await
            .map_err(|e| ApiError::from_store(e, "policy", "poddisruptionbudgets", ""))?;
        let mut matching = Vec::new();
        for kv in &listed.kvs {
            let budget = object::from_store(budgets, &kv.value, kv.mod_revision)?;
            if crate::selector::label_selector_matches(&budget["spec"]["selector"], &pod["metadata"]["labels"]) {
                matching.push(budget["metadata"]["name"].as_str().unwrap_or_default().to_string());
            }
        }
        if matching.len() > 1 {
            let mut error = ApiError::bad_request(
                "This pod has more than one PodDisruptionBudget, which the eviction subresource does not support.",
            );
            error.code = 500;
            error.reason = "InternalError";
            return Err(error);
        }
        if let Some(budget) = matching.first() {
            modify(state, (budgets, namespace, budget), View::Status, write, |current, _| {
                let allowed = current["status"]["disruptionsAllowed"].as_i64().unwrap_or(0);
                if allowed <= 0 {
                    let mut error =
                        ApiError::bad_request("Cannot evict pod as it would violate the pod's disruption budget.");
                    error.code = 429;
                    error.reason = "TooManyRequests";
                    error.causes = vec![Cause {
                        reason: "DisruptionBudget",
                        message: format!(
                            "The disruption budget {budget} needs {} healthy pods and has {} currently",
                            current["status"]["desiredHealthy"].as_i64().unwrap_or(0),
                            current["status"]["currentHealthy"].as_i64().unwrap_or(0)
                        ),
                        field: String::new(),
                    }];
                    return Err(error);
                }
                let mut updated = current.clone();
                updated["status"]["disruptionsAllowed"] = json!(allowed - 1);
                Ok(updated)
            })
            .await?;
        }
    }
    delete_one(state, pods(), namespace, name, &options, write).await?;
    Ok(success(201))
}
