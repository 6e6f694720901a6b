//! RuntimeClass admission, as upstream's plugin: a pod naming a `runtimeClassName` that does
//! not exist is refused (403), and the class's `overhead.podFixed` becomes the pod's
//! `spec.overhead` (a pod that says another overhead is refused), its
//! `scheduling.nodeSelector` joins the pod's and its `scheduling.tolerations` are added.

use serde_json::{Value, json};

use crate::registry;
use crate::state::{ApiState, read_object};
use crate::status::ApiError;

pub async fn admit(state: &ApiState, pod: &mut Value) -> Result<(), ApiError> {
    let Some(class_name) = pod["spec"]["runtimeClassName"].as_str().filter(|n| !n.is_empty()).map(str::to_string)
    else {
        return Ok(());
    };
    let name = pod["metadata"]["name"].as_str().unwrap_or_default().to_string();
    let refuse = |why: String| ApiError::forbidden("", "pods", &name, &why);
    let classes = registry::find("node.k8s.io", "v1", "runtimeclasses").expect("runtime classes are served");
    let class = match read_object(state, classes, None, &class_name).await {
        Ok((class, _)) => class,
        Err(error) if error.code == 404 => {
            return Err(refuse(format!("pod rejected: RuntimeClass {class_name:?} not found")));
        }
        Err(error) => return Err(error),
    };
    if let Some(fixed) = class["overhead"]["podFixed"].as_object().filter(|f| !f.is_empty()) {
        let fixed = Value::Object(fixed.clone());
        match &pod["spec"]["overhead"] {
            Value::Null => pod["spec"]["overhead"] = fixed,
            given if *given == fixed => {}
            _ => {
                return Err(refuse(
                    "pod rejected: Pod's Overhead doesn't match RuntimeClass's defined Overhead".into(),
                ));
            }
        }
    }
    if let Some(selector) = class["scheduling"]["nodeSelector"].as_object() {
        for (key, value) in selector {
            match pod["spec"]["nodeSelector"].get(key) {
                Some(own) if own != value => {
                    return Err(refuse(
                        "pod rejected: conflict in RuntimeClass nodeSelector and pod nodeSelector".to_string(),
                    ));
                }
                Some(_) => {}
                None => pod["spec"]["nodeSelector"][key] = value.clone(),
            }
        }
    }
    for toleration in class["scheduling"]["tolerations"].as_array().into_iter().flatten() {
        if !pod["spec"]["tolerations"].as_array().is_some_and(|t| t.contains(toleration)) {
            if !pod["spec"]["tolerations"].is_array() {
                pod["spec"]["tolerations"] = json!([]);
            }
            pod["spec"]["tolerations"].as_array_mut().expect("made a list").push(toleration.clone());
        }
    }
    Ok(())
}
