//! Conversion webhooks of CustomResourceDefinitions (`spec.conversion.strategy: Webhook`): a
//! custom object read in another version than it is stored in, or written in another version
//! than the storage version, is sent to the definition's webhook in a `ConversionReview`
//! (`apiextensions.k8s.io/v1`, or v1beta1 if that is all the webhook speaks); a list sends its
//! objects in one review. The webhook is reached as admission webhooks are
//! (`admission::post`: URL or Service, TLS with the `caBundle`), with upstream's 30 s limit.
//! Definitions with `strategy: None` convert by rewriting `apiVersion` (`Resource::from_storage`).

use std::time::Duration;

use serde_json::{Value, json};
use tugboat_store::Store;

use crate::registry::Resource;
use crate::status::ApiError;

/// Upstream's limit for one conversion call.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Whether `resource`'s objects are converted by a webhook.
pub fn by_webhook(resource: &Resource) -> bool {
    resource.custom.is_some_and(|custom| custom.webhook.is_some())
}

/// `objects` (as stored) in `resource`'s version.
pub async fn convert(store: &dyn Store, resource: &Resource, objects: Vec<Value>) -> Result<Vec<Value>, ApiError> {
    convert_to(store, resource, objects, &resource.api_version()).await
}

/// One object (as stored) in `resource`'s version.
pub async fn convert_one(store: &dyn Store, resource: &Resource, object: Value) -> Result<Value, ApiError> {
    if !by_webhook(resource) {
        return Ok(object);
    }
    Ok(convert(store, resource, vec![object]).await?.pop().unwrap_or_default())
}

/// What the store keeps of an object written in `resource`'s version (`object::to_store`, after
/// the definition's webhook converted it to the storage version when one converts).
pub async fn stored(store: &dyn Store, resource: &Resource, object: &Value) -> Result<Vec<u8>, ApiError> {
    if !by_webhook(resource) {
        return Ok(crate::object::to_store(resource, object));
    }
    let converted = to_storage(store, resource, object.clone()).await?;
    Ok(crate::object::to_store(resource, &converted))
}

/// An object written in `resource`'s version, in the version it is stored in.
async fn to_storage(store: &dyn Store, resource: &Resource, object: Value) -> Result<Value, ApiError> {
    let Some(custom) = resource.custom.filter(|_| by_webhook(resource)) else { return Ok(object) };
    let desired = format!("{}/{}", resource.group, custom.storage_version);
    Ok(convert_to(store, resource, vec![object], &desired).await?.pop().unwrap_or_default())
}

/// `objects` in `desired` (`group/version`): those in another version go to the webhook, in
/// one review; the others are left as they are. Defaults of `resource`'s schema are applied to
/// what comes back in its version.
async fn convert_to(
    store: &dyn Store,
    resource: &Resource,
    mut objects: Vec<Value>,
    desired: &str,
) -> Result<Vec<Value>, ApiError> {
    let Some(custom) = resource.custom else { return Ok(objects) };
    let Some(webhook) = &custom.webhook else { return Ok(objects) };
    let pending: Vec<usize> = (0..objects.len()).filter(|&i| objects[i]["apiVersion"] != desired).collect();
    if pending.is_empty() {
        return Ok(objects);
    }
    let failed = |why: String| {
        ApiError::internal(format!("conversion webhook for {}, Kind={} failed: {why}", desired, resource.kind))
    };
    let uid = uuid::Uuid::new_v4().to_string();
    let versions: Vec<&str> =
        webhook["conversionReviewVersions"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let version = if versions.contains(&"v1") || !versions.contains(&"v1beta1") { "v1" } else { "v1beta1" };
    let sent: Vec<Value> = pending.iter().map(|&i| objects[i].clone()).collect();
    let review = json!({
        "apiVersion": format!("apiextensions.k8s.io/{version}"),
        "kind": "ConversionReview",
        "request": {"uid": uid, "desiredAPIVersion": desired, "objects": sent},
    });
    let answer = crate::outbound::post(store, &webhook["clientConfig"], TIMEOUT, &review).await.map_err(failed)?;
    let response = &answer["response"];
    if response["uid"] != uid.as_str() {
        return Err(failed(format!("expected response.uid={uid:?}, got {}", response["uid"])));
    }
    if response["result"]["status"] != "Success" {
        let message = response["result"]["message"].as_str().unwrap_or("the webhook did not succeed");
        return Err(failed(message.to_string()));
    }
    let converted = response["convertedObjects"].as_array().cloned().unwrap_or_default();
    if converted.len() != pending.len() {
        return Err(failed(format!("returned {} objects, expected {}", converted.len(), pending.len())));
    }
    for (&i, mut object) in pending.iter().zip(converted) {
        let original = &objects[i];
        if object["apiVersion"] != desired {
            return Err(failed(format!(
                "invalid apiVersion {} in a converted object, expected {desired:?}",
                object["apiVersion"]
            )));
        }
        if object["kind"] != original["kind"] {
            return Err(failed(format!(
                "invalid kind {} in a converted object, expected {}",
                object["kind"], original["kind"]
            )));
        }
        // As upstream: the webhook may change labels and annotations only; the rest of the
        // metadata is the stored object's.
        let mut metadata = original["metadata"].clone();
        for field in ["labels", "annotations"] {
            match object["metadata"].get(field) {
                Some(value) => metadata[field] = value.clone(),
                None => {
                    if let Some(map) = metadata.as_object_mut() {
                        map.remove(field);
                    }
                }
            }
        }
        object["metadata"] = metadata;
        if desired == resource.api_version() {
            crate::custom::default(custom, &mut object);
        }
        objects[i] = object;
    }
    Ok(objects)
}
