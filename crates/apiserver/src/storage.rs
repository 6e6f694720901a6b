//! Storage classes: the default one every cluster gets (`local-path`, volumes in a directory of
//! the node that first runs a pod of the claim, as k3s's local-path provisioner does), and
//! upstream's DefaultStorageClass admission, which gives a claim without a class the default.

use serde_json::{Value, json};

use crate::registry;
use crate::state::ApiState;
use crate::status::ApiError;

/// The provisioner of the built-in class (the controller manager provisions, kubelets mount).
pub const LOCAL_PATH: &str = "tugboat.dev/local-path";
const DEFAULT_ANNOTATION: &str = "storageclass.kubernetes.io/is-default-class";

/// The class made at start (kept if edited or deleted later? made again if missing).
pub fn default_class() -> Value {
    json!({
        "metadata": {"name": "local-path", "annotations": {DEFAULT_ANNOTATION: "true"}},
        "provisioner": LOCAL_PATH,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "WaitForFirstConsumer",
    })
}

/// DefaultStorageClass: a claim that names no class gets the default one, if there is one.
pub async fn admit(state: &ApiState, claim: &mut Value) -> Result<(), ApiError> {
    if !claim["spec"].is_object() || !claim["spec"]["storageClassName"].is_null() {
        return Ok(());
    }
    let classes = registry::find("storage.k8s.io", "v1", "storageclasses").expect("storage classes are served");
    let listed = crate::state::cached_list(state, classes, None).await?;
    // Upstream takes the newest of several defaults.
    let default = listed
        .iter()
        .filter(|c| c["metadata"]["annotations"][DEFAULT_ANNOTATION] == "true")
        .max_by_key(|c| c["metadata"]["creationTimestamp"].as_str().unwrap_or_default().to_string());
    if let Some(class) = default {
        claim["spec"]["storageClassName"] = class["metadata"]["name"].clone();
    }
    Ok(())
}
