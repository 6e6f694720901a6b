//! Reflectors: a kind's objects kept in a local cache from a list and a watch (kube's
//! reflector, with its backoff), as every component that follows the API keeps them. No
//! component reads `managedFields`, so they are dropped (that halves what a cache holds).

use futures::StreamExt;
use kube::runtime::reflector::{self, Store, reflector};
use kube::runtime::{WatchStreamExt, watcher};

/// A cache of `api`'s objects (`dyntype`: `()` for typed kinds; a kind known at run time, a
/// `DynamicObject` or `PartialObjectMeta<DynamicObject>`, passes its `ApiResource`), kept until
/// the process ends. `on_event` hears each change (the object it touched), and each failure of
/// the watch (`None`: the cache is unchanged, and stale until the watch recovers). A watch that
/// keeps failing is said once when it starts failing and once when it recovers, as `kind`.
pub fn reflect<K>(
    api: kube::Api<K>,
    dyntype: K::DynamicType,
    kind: &'static str,
    on_event: impl FnMut(Option<&K>) + Send + 'static,
) -> Store<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    reflect_with(api, watcher::Config::default(), dyntype, kind, on_event)
}

/// [`reflect`] of the objects `config` selects (`fields("spec.nodeName=n1")`: one node's pods).
pub fn reflect_with<K>(
    api: kube::Api<K>,
    config: watcher::Config,
    dyntype: K::DynamicType,
    kind: &'static str,
    mut on_event: impl FnMut(Option<&K>) + Send + 'static,
) -> Store<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    let writer = reflector::store::Writer::<K>::new(dyntype);
    let reader = writer.as_reader();
    let events =
        reflector(writer, watcher(api, config).modify(|object: &mut K| object.meta_mut().managed_fields = None))
            .default_backoff()
            .touched_objects();
    tokio::spawn(async move {
        let mut events = events.boxed();
        let mut failing = false;
        while let Some(event) = events.next().await {
            match &event {
                Err(error) if !failing => {
                    tracing::warn!(%error, kind, "a watch fails; its cache is stale until it recovers");
                    failing = true;
                }
                Err(error) => tracing::debug!(%error, kind, "watch"),
                Ok(_) if failing => {
                    tracing::info!(kind, "a watch recovered");
                    failing = false;
                }
                Ok(_) => {}
            }
            on_event(event.as_ref().ok());
        }
    });
    reader
}
