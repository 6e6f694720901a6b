//! Core Events about objects, as components post them (what `kubectl describe` lists).

use k8s_openapi::api::core::v1::{Event, EventSource, ObjectReference};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, Time};
use kube::api::{Api, PostParams};

/// A reference to `object` for an event's `involvedObject`.
pub fn reference<K: kube::Resource<DynamicType = ()>>(object: &K) -> ObjectReference {
    let meta = object.meta();
    ObjectReference {
        api_version: Some(K::api_version(&()).into_owned()),
        kind: Some(K::kind(&()).into_owned()),
        name: meta.name.clone(),
        namespace: meta.namespace.clone(),
        uid: meta.uid.clone(),
        resource_version: meta.resource_version.clone(),
        ..Default::default()
    }
}

/// Posts an event (`kind` Normal or Warning) about `regarding`, from `component`. Failures are
/// logged, never returned: an event is worth a try, not a retry.
pub async fn record(
    client: &kube::Client,
    regarding: &ObjectReference,
    kind: &str,
    reason: &str,
    message: &str,
    action: &str,
    component: &str,
) {
    let namespace = regarding.namespace.clone().filter(|n| !n.is_empty()).unwrap_or_else(|| "default".into());
    let name = regarding.name.clone().unwrap_or_default();
    let now = jiff::Timestamp::now();
    let event = Event {
        metadata: ObjectMeta {
            name: Some(format!("{name}.{:x}", now.as_nanosecond() as u64)),
            namespace: Some(namespace.clone()),
            ..Default::default()
        },
        involved_object: regarding.clone(),
        reason: Some(reason.into()),
        message: Some(message.into()),
        type_: Some(kind.into()),
        source: Some(EventSource { component: Some(component.into()), host: None }),
        first_timestamp: Some(Time(now)),
        last_timestamp: Some(Time(now)),
        event_time: Some(MicroTime(now)),
        count: Some(1),
        action: Some(action.into()),
        reporting_component: Some(component.into()),
        reporting_instance: Some(component.into()),
        ..Default::default()
    };
    let events: Api<Event> = Api::namespaced(client.clone(), &namespace);
    if let Err(error) = events.create(&PostParams::default(), &event).await {
        tracing::debug!(%error, reason, "could not record an event");
    }
}
