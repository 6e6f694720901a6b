//! Pod priority admission, as upstream's Priority plugin: a pod's `priorityClassName` (or the
//! global default class) gives its `spec.priority` and `preemptionPolicy`; a class that does
//! not exist is refused. The two system classes always exist.

use serde_json::{Value, json};

use crate::registry;
use crate::status::ApiError;
use crate::watch_cache::WatchCaches;
use tugboat_store::Store;

/// Upstream's built-in classes: (name, value).
pub const SYSTEM_CLASSES: [(&str, i64); 2] =
    [("system-node-critical", 2_000_001_000), ("system-cluster-critical", 2_000_000_000)];

/// Sets `spec.priority` (and `preemptionPolicy`) of a new pod from its class. Classes are read
/// from the watch cache (as upstream's admission reads its informer); a named class the cache
/// does not have yet is looked up in the store.
pub async fn admit(store: &dyn Store, caches: &WatchCaches, pod: &mut Value) -> Result<(), ApiError> {
    let classes = registry::find("scheduling.k8s.io", "v1", "priorityclasses").expect("priority classes are served");
    let prefix = classes.prefix(None);
    let cached = caches
        .get(&prefix)
        .await
        .map_err(|e| ApiError::from_store(e, "scheduling.k8s.io", "priorityclasses", ""))?
        .list(&prefix)
        .0;
    let wanted = pod["spec"]["priorityClassName"].as_str().filter(|n| !n.is_empty()).map(str::to_string);
    let class: Option<Value> = match &wanted {
        Some(name) => match cached.iter().find(|c| c["metadata"]["name"].as_str() == Some(name)) {
            Some(class) => Some(class.clone()),
            None => {
                let found = store
                    .get(&classes.key(None, name), None)
                    .await
                    .map_err(|e| ApiError::from_store(e, "scheduling.k8s.io", "priorityclasses", name))?;
                match found {
                    Some(kv) => Some(serde_json::from_slice(&kv.value).unwrap_or_default()),
                    None => {
                        let pod_name = pod["metadata"]["name"].as_str().unwrap_or_default();
                        let mut error = ApiError::bad_request(format!(
                            "pods \"{pod_name}\" is forbidden: no PriorityClass with name {name} was found"
                        ));
                        error.code = 403;
                        error.reason = "Forbidden";
                        return Err(error);
                    }
                }
            }
        },
        None => cached.into_iter().find(|c| c["globalDefault"] == json!(true)),
    };
    let Some(class) = class else {
        if pod["spec"]["priority"].is_null() {
            pod["spec"]["priority"] = json!(0);
        }
        return Ok(());
    };
    let value = class["value"].as_i64().unwrap_or(0);
    if let Some(given) = pod["spec"]["priority"].as_i64()
        && given != value
    {
        return Err(ApiError::bad_request(format!(
            "the integer value of priority ({given}) must not be provided in pod spec; priority admission controller computed {value} from the given PriorityClass name"
        )));
    }
    pod["spec"]["priority"] = json!(value);
    if wanted.is_none() {
        pod["spec"]["priorityClassName"] = class["metadata"]["name"].clone();
    }
    let policy = class["preemptionPolicy"].as_str().unwrap_or("PreemptLowerPriority");
    pod["spec"]["preemptionPolicy"] = json!(policy);
    Ok(())
}
