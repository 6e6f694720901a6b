//! The server's own controller of CustomResourceDefinitions: it keeps the served set
//! ([`crate::custom_kinds`]) in step with the stored definitions, one change at a time, and
//! finishes the deletion of a definition: its objects go first (the `customresourcecleanup`
//! finalizer every definition gets), then the definition, and then the resource leaves
//! discovery.

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};

use crate::crd::{CLEANUP_FINALIZER, crds};
use crate::custom_kinds::{is_terminating, storage_version};
use crate::state::ApiState;
use crate::status::ApiError;

/// Keeps the served set in step with the stored definitions, and finishes the deletion of
/// definitions being deleted; runs for the life of the server.
pub async fn run(state: Arc<ApiState>) {
    let prefix = crds().prefix(None);
    loop {
        let cache = match state.caches.get(&prefix).await {
            Ok(cache) => cache,
            Err(error) => {
                tracing::warn!(%error, "cannot watch the CustomResourceDefinitions");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Some(subscription) = cache.subscribe_keyed(&prefix) else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        state.custom.replace(subscription.initial, subscription.revision);
        let mut live = subscription.live;
        loop {
            let terminating: Vec<Arc<Value>> =
                state.custom.definitions().into_iter().filter(|crd| is_terminating(crd)).collect();
            for crd in &terminating {
                if let Err(error) = clean_up(&state, crd).await {
                    tracing::warn!(error = %error.message, crd = %crd["metadata"]["name"], "cannot finish deleting a CustomResourceDefinition");
                }
            }
            // While a definition waits for its objects to go (finalizers of theirs), look again
            // now and then as well as on every change.
            let wait = if terminating.is_empty() { Duration::from_secs(3600) } else { Duration::from_secs(1) };
            match tokio::time::timeout(wait, live.recv()).await {
                Ok(Ok(change)) => {
                    if change.revision > subscription.revision {
                        state.custom.apply(&change);
                    }
                }
                Err(_) => {}
                // Changes were missed: start again from the state.
                Ok(Err(crate::watch_cache::RecvError::Lagged(_))) => break,
                Ok(Err(crate::watch_cache::RecvError::Closed)) => break,
            }
        }
    }
}

/// Deletes the objects of a definition being deleted; once none is left, lets the definition go.
async fn clean_up(state: &ApiState, crd: &Value) -> Result<(), ApiError> {
    let name = crd["metadata"]["name"].as_str().unwrap_or_default();
    let finalizers = crd["metadata"]["finalizers"].as_array().cloned().unwrap_or_default();
    if !finalizers.iter().any(|f| f == CLEANUP_FINALIZER) {
        return Ok(());
    }
    let (group, plural) = (crd["spec"]["group"].as_str().unwrap_or(""), crd["spec"]["names"]["plural"].as_str());
    let storage = storage_version(crd);
    let resource = match (plural, storage) {
        (Some(plural), Some(version)) => state.custom.find(group, &version, plural),
        _ => None,
    };
    if let Some(resource) = resource {
        let objects = crate::state::cached_list(state, resource, None).await?;
        if !objects.is_empty() {
            for object in &objects {
                let namespace = object["metadata"]["namespace"].as_str();
                let object_name = object["metadata"]["name"].as_str().unwrap_or_default();
                if object["metadata"]["deletionTimestamp"].is_string() {
                    continue;
                }
                match crate::write::delete_one(
                    state,
                    resource,
                    namespace,
                    object_name,
                    &json!({}),
                    &crate::request::Write::internal("customresourcecleanup"),
                )
                .await
                {
                    Ok(_) => {}
                    Err(error) if error.code == 404 => {}
                    Err(error) => return Err(error),
                }
            }
            return Ok(());
        }
    }
    // No object left: remove the finalizer (the definition goes with its last one).
    let write = crate::request::Write::internal("apiextensions-apiserver");
    let removed = crate::write::modify(state, (crds(), None, name), crate::write::View::Whole, &write, |current, _| {
        let mut object = current.clone();
        if let Some(finalizers) = object["metadata"]["finalizers"].as_array_mut() {
            finalizers.retain(|f| f != CLEANUP_FINALIZER);
        }
        Ok(object)
    })
    .await;
    match removed {
        Ok(_) => Ok(()),
        Err(error) if error.code == 404 => Ok(()),
        Err(error) => Err(error),
    }
}
