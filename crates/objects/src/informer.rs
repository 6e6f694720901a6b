//! Reflectors: a kind's objects kept in a local cache from a list and a watch (kube's
//! reflector, with its backoff), as every component that follows the API keeps them. No
//! component reads `managedFields`, so they are dropped (that halves what a cache holds).
//!
//! [`Shared`] and [`Informers`]: one watch and one decoded copy of a kind for every component
//! of a process that reads it (the scheduler and the controller manager in `tugboat server`),
//! a store by namespace, wakes, and change streams of the store's own objects.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::runtime::reflector::{self, reflector};
use kube::runtime::{WatchStreamExt, watcher};
use tokio::sync::Notify;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};

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
) -> reflector::Store<K>
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
) -> reflector::Store<K>
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
        let mut failing = Failing::new(kind);
        while let Some(event) = events.next().await {
            match &event {
                Err(error) => failing.failed(error),
                Ok(_) => failing.recovered(),
            }
            on_event(event.as_ref().ok());
        }
    });
    reader
}

/// A kind's objects as one process follows them: one watch, one decoded copy of each object
/// (`Arc`, managedFields dropped) shared by every reader — the store ([`Shared::store`]), the
/// controllers it wakes ([`Shared::wake_on_change`]) and the components that want every change
/// ([`Shared::subscribe`], as the scheduler's cache). In `tugboat server` the scheduler and the
/// controller manager share their pods and nodes this way ([`Informers`]), where each used to
/// decode and keep a copy of its own.
pub struct Shared<K> {
    inner: Arc<Inner<K>>,
}

impl<K> std::fmt::Debug for Shared<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Shared")
    }
}

impl<K> Clone for Shared<K> {
    fn clone(&self) -> Self {
        Shared { inner: self.inner.clone() }
    }
}

struct Inner<K> {
    state: RwLock<State<K>>,
    /// Whether the first full list is in.
    listed: tokio::sync::watch::Sender<bool>,
}

struct State<K> {
    objects: Objects<K>,
    /// The objects of a list in progress, which replace `objects` when it is complete.
    relist: Option<Objects<K>>,
    subscribers: Vec<UnboundedSender<watcher::Event<Arc<K>>>>,
    wakes: Vec<Arc<Notify>>,
}

/// What no reader of a shared informer uses, dropped from each object: managedFields (a good
/// part of any object), and of a pod what only its kubelet reads (a decoded pod is ~15 KiB, and
/// half of it is volumes: a `Volume` is 3,280 bytes before it holds anything). A pod keeps the
/// volumes that name claims (`persistentVolumeClaim`, `ephemeral`: the scheduler places pods
/// by them, the claim protection waits for them) and of its containers what the control plane
/// reads (names, images, ports, resources, securityContext, ...), not env, command, args,
/// volumeMounts, probes or lifecycle hooks. Nothing writes back an informer's objects (writes
/// are patches of what a controller decided), so nothing dropped is ever lost.
fn slim<K: kube::Resource + 'static>(object: &mut K) {
    object.meta_mut().managed_fields = None;
    let object: &mut dyn Any = object;
    if let Some(pod) = object.downcast_mut::<Pod>() {
        slim_pod(pod);
    }
}

fn slim_pod(pod: &mut Pod) {
    let Some(spec) = pod.spec.as_mut() else { return };
    if let Some(volumes) = spec.volumes.as_mut() {
        volumes.retain(|v| v.persistent_volume_claim.is_some() || v.ephemeral.is_some());
        volumes.shrink_to_fit();
    }
    for container in spec.containers.iter_mut().chain(spec.init_containers.iter_mut().flatten()) {
        container.env = None;
        container.env_from = None;
        container.command = None;
        container.args = None;
        container.volume_mounts = None;
        container.liveness_probe = None;
        container.readiness_probe = None;
        container.startup_probe = None;
        container.lifecycle = None;
    }
}

/// A change as a subscriber receives it: the objects are the store's own.
pub type Change<K> = watcher::Event<Arc<K>>;

/// Objects by namespace (`""` for cluster-scoped kinds), then name: a namespace's objects are
/// found without looking at the others' (the endpoints controller reads the pods of the
/// namespaces that have Services, not all 150,000).
struct Objects<K> {
    by_namespace: HashMap<String, HashMap<String, Arc<K>>>,
    len: usize,
}

impl<K> Default for Objects<K> {
    fn default() -> Self {
        Objects { by_namespace: HashMap::new(), len: 0 }
    }
}

fn names(meta: &ObjectMeta) -> (&str, &str) {
    (meta.namespace.as_deref().unwrap_or_default(), meta.name.as_deref().unwrap_or_default())
}

impl<K: kube::Resource> Objects<K> {
    fn insert(&mut self, object: Arc<K>) {
        let (namespace, name) = names(object.meta());
        let namespace = match self.by_namespace.get_mut(namespace) {
            Some(objects) => objects,
            None => self.by_namespace.entry(namespace.to_string()).or_default(),
        };
        if namespace.insert(name.to_string(), object).is_none() {
            self.len += 1;
        }
    }

    fn remove(&mut self, meta: &ObjectMeta) -> Option<Arc<K>> {
        let (namespace, name) = names(meta);
        let objects = self.by_namespace.get_mut(namespace)?;
        let removed = objects.remove(name)?;
        if objects.is_empty() {
            self.by_namespace.remove(namespace);
        }
        self.len -= 1;
        Some(removed)
    }

    fn values(&self) -> impl Iterator<Item = &Arc<K>> {
        self.by_namespace.values().flat_map(HashMap::values)
    }
}

impl<K> Shared<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    /// Starts following `api`'s objects (those `config` selects), logged as `kind`.
    pub fn start(api: kube::Api<K>, config: watcher::Config, kind: &'static str) -> Shared<K> {
        let inner = Inner::new();
        let events = watcher(api, config).modify(slim).default_backoff();
        let weak = Arc::downgrade(&inner);
        tokio::spawn(async move {
            let mut events = std::pin::pin!(events);
            let mut failing = Failing::new(kind);
            while let Some(event) = events.next().await {
                let Some(inner) = weak.upgrade() else { return };
                match event {
                    Ok(event) => {
                        failing.recovered();
                        inner.apply(event);
                    }
                    Err(error) => failing.failed(&error),
                }
            }
        });
        Shared { inner }
    }
}

impl<K: kube::Resource> Shared<K> {
    /// The objects, to read.
    pub fn store(&self) -> Store<K> {
        Store { inner: self.inner.clone() }
    }

    /// Every change (and the first list) wakes `wake`.
    pub fn wake_on_change(&self, wake: Arc<Notify>) {
        self.inner.write().wakes.push(wake);
    }

    /// Every change from now on, after the objects held now (as a list would bring them:
    /// `Init`, an `InitApply` each, then `InitDone` once the first list is complete). The
    /// receiver must keep up or be dropped: what it has not read is held for it.
    pub fn subscribe(&self) -> UnboundedReceiver<Change<K>> {
        let (sender, receiver) = tokio::sync::mpsc::unbounded_channel();
        let mut state = self.inner.write();
        let listed = *self.inner.listed.borrow();
        let _ = sender.send(watcher::Event::Init);
        let held = if listed { &state.objects } else { state.relist.as_ref().unwrap_or(&state.objects) };
        for object in held.values() {
            let _ = sender.send(watcher::Event::InitApply(object.clone()));
        }
        if listed {
            let _ = sender.send(watcher::Event::InitDone);
        }
        state.subscribers.push(sender);
        receiver
    }
}

impl<K: kube::Resource> Inner<K> {
    fn new() -> Arc<Inner<K>> {
        Arc::new(Inner {
            state: RwLock::new(State {
                objects: Objects::default(),
                relist: None,
                subscribers: Vec::new(),
                wakes: Vec::new(),
            }),
            listed: tokio::sync::watch::Sender::new(false),
        })
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, State<K>> {
        self.state.write().unwrap_or_else(|e| e.into_inner())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, State<K>> {
        self.state.read().unwrap_or_else(|e| e.into_inner())
    }

    fn apply(&self, event: watcher::Event<K>) {
        let mut state = self.write();
        let (change, wake) = match event {
            watcher::Event::Apply(object) => {
                let object = Arc::new(object);
                state.objects.insert(object.clone());
                (watcher::Event::Apply(object), true)
            }
            watcher::Event::Delete(object) => {
                let object = state.objects.remove(object.meta()).unwrap_or_else(|| Arc::new(object));
                (watcher::Event::Delete(object), true)
            }
            watcher::Event::Init => {
                state.relist = Some(Objects::default());
                (watcher::Event::Init, false)
            }
            watcher::Event::InitApply(object) => {
                let object = Arc::new(object);
                state.relist.get_or_insert_default().insert(object.clone());
                (watcher::Event::InitApply(object), false)
            }
            watcher::Event::InitDone => {
                state.objects = state.relist.take().unwrap_or_default();
                (watcher::Event::InitDone, true)
            }
        };
        let done = matches!(change, watcher::Event::InitDone);
        state.subscribers.retain(|subscriber| subscriber.send(change.clone()).is_ok());
        if wake {
            for wake in &state.wakes {
                wake.notify_one();
            }
        }
        drop(state);
        if done {
            self.listed.send_replace(true);
        }
    }
}

/// A [`Shared`] kind's objects, to read.
pub struct Store<K> {
    inner: Arc<Inner<K>>,
}

impl<K> std::fmt::Debug for Store<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Store")
    }
}

impl<K> Clone for Store<K> {
    fn clone(&self) -> Self {
        Store { inner: self.inner.clone() }
    }
}

impl<K: kube::Resource> Store<K> {
    /// Every object (as of the last complete list and the changes since).
    pub fn state(&self) -> Vec<Arc<K>> {
        self.inner.read().objects.values().cloned().collect()
    }

    /// The object `name` in `namespace` (None for cluster-scoped kinds).
    pub fn get(&self, namespace: Option<&str>, name: &str) -> Option<Arc<K>> {
        self.inner.read().objects.by_namespace.get(namespace.unwrap_or_default())?.get(name).cloned()
    }

    /// The objects of `namespace`.
    pub fn in_namespace(&self, namespace: &str) -> Vec<Arc<K>> {
        let state = self.inner.read();
        state.objects.by_namespace.get(namespace).map(|objects| objects.values().cloned().collect()).unwrap_or_default()
    }

    /// How many objects there are.
    pub fn len(&self) -> usize {
        self.inner.read().objects.len
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Waits until the first full list is in.
    pub async fn wait_until_ready(&self) {
        let mut listed = self.inner.listed.subscribe();
        // The sender lives as long as `self`: this cannot fail.
        let _ = listed.wait_for(|listed| *listed).await;
    }
}

/// The process's [`Shared`] kinds (typed kinds, every namespace), each started by its first
/// reader.
pub struct Informers {
    client: kube::Client,
    kinds: Mutex<HashMap<TypeId, Box<dyn Any + Send + Sync>>>,
}

impl std::fmt::Debug for Informers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Informers")
    }
}

impl Informers {
    /// Informers that watch through `client`.
    pub fn new(client: kube::Client) -> Informers {
        Informers { client, kinds: Mutex::new(HashMap::new()) }
    }

    /// Every `K` of the cluster, followed from the first call on.
    pub fn of<K>(&self) -> Shared<K>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + std::fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let mut kinds = self.kinds.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(shared) = kinds.get(&TypeId::of::<K>()).and_then(|s| s.downcast_ref::<Shared<K>>()) {
            return shared.clone();
        }
        let shared =
            Shared::start(kube::Api::<K>::all(self.client.clone()), watcher::Config::default(), std::any::type_name::<K>());
        kinds.insert(TypeId::of::<K>(), Box::new(shared.clone()));
        shared
    }
}

/// Says once when a watch starts failing and once when it recovers.
struct Failing {
    kind: &'static str,
    failing: bool,
}

impl Failing {
    fn new(kind: &'static str) -> Failing {
        Failing { kind, failing: false }
    }

    fn failed(&mut self, error: &watcher::Error) {
        let kind = self.kind;
        if self.failing {
            tracing::debug!(%error, kind, "watch");
        } else {
            tracing::warn!(%error, kind, "a watch fails; its cache is stale until it recovers");
            self.failing = true;
        }
    }

    fn recovered(&mut self) {
        if std::mem::take(&mut self.failing) {
            tracing::info!(kind = self.kind, "a watch recovered");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use watcher::Event;

    fn map(name: &str, value: &str) -> ConfigMap {
        let mut map = ConfigMap::default();
        map.metadata.name = Some(name.to_string());
        map.metadata.namespace = Some("ns".to_string());
        map.data = Some([("v".to_string(), value.to_string())].into());
        map
    }

    fn names(store: &Store<ConfigMap>) -> Vec<String> {
        let mut names: Vec<String> = store.state().iter().map(|m| m.metadata.name.clone().unwrap()).collect();
        names.sort();
        names
    }

    fn drain(receiver: &mut UnboundedReceiver<Change<ConfigMap>>) -> Vec<String> {
        let mut seen = Vec::new();
        while let Ok(change) = receiver.try_recv() {
            seen.push(match change {
                Event::Init => "init".to_string(),
                Event::InitApply(m) => format!("list {}", m.metadata.name.as_deref().unwrap()),
                Event::InitDone => "listed".to_string(),
                Event::Apply(m) => format!("apply {}", m.metadata.name.as_deref().unwrap()),
                Event::Delete(m) => format!("delete {}", m.metadata.name.as_deref().unwrap()),
            });
        }
        seen
    }

    #[test]
    fn pods_keep_what_the_control_plane_reads() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "ns", "managedFields": [{"manager": "kubectl"}]},
            "spec": {
                "containers": [{"name": "c", "image": "i", "env": [{"name": "A", "value": "1"}],
                                "ports": [{"name": "http", "containerPort": 80}],
                                "resources": {"requests": {"cpu": "100m"}},
                                "readinessProbe": {"exec": {"command": ["true"]}},
                                "volumeMounts": [{"name": "token", "mountPath": "/t"}]}],
                "initContainers": [{"name": "i", "image": "i", "args": ["x"]}],
                "volumes": [{"name": "token", "projected": {"sources": []}},
                            {"name": "data", "persistentVolumeClaim": {"claimName": "data"}},
                            {"name": "scratch", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}}],
                "tolerations": [{"key": "k", "operator": "Exists"}]
            }
        }))
        .unwrap();
        let mut slimmed = pod.clone();
        slim(&mut slimmed);
        assert_eq!(slimmed.metadata.managed_fields, None);
        let spec = slimmed.spec.as_ref().unwrap();
        let volumes: Vec<&str> = spec.volumes.iter().flatten().map(|v| v.name.as_str()).collect();
        assert_eq!(volumes, ["data", "scratch"]);
        let container = &spec.containers[0];
        assert_eq!((container.env.as_ref(), container.volume_mounts.as_ref()), (None, None));
        assert!(container.readiness_probe.is_none());
        assert_eq!(container.ports, pod.spec.as_ref().unwrap().containers[0].ports);
        assert_eq!(container.resources, pod.spec.as_ref().unwrap().containers[0].resources);
        assert_eq!(spec.init_containers.as_ref().unwrap()[0].args, None);
        assert_eq!(spec.tolerations, pod.spec.as_ref().unwrap().tolerations);
        // Other kinds lose their managedFields only.
        let mut map = map("m", "v");
        map.metadata.managed_fields = Some(Vec::new());
        let before = map.clone();
        slim(&mut map);
        assert_eq!((map.data, map.metadata.managed_fields), (before.data, None));
    }

    #[tokio::test]
    async fn readers_share_one_copy_and_late_subscribers_start_from_a_list() {
        let shared = Shared { inner: Inner::<ConfigMap>::new() };
        let store = shared.store();
        let wake = Arc::new(Notify::new());
        shared.wake_on_change(wake.clone());
        let mut early = shared.subscribe();
        shared.inner.apply(Event::Init);
        shared.inner.apply(Event::InitApply(map("a", "1")));
        // A subscriber that comes during the first list gets what it has so far.
        let mut during = shared.subscribe();
        shared.inner.apply(Event::InitApply(map("b", "1")));
        assert!(names(&store).is_empty(), "a list in progress is not shown");
        shared.inner.apply(Event::InitDone);
        store.wait_until_ready().await;
        wake.notified().await;
        assert_eq!(names(&store), ["a", "b"]);
        assert_eq!(drain(&mut early), ["init", "init", "list a", "list b", "listed"]);
        assert_eq!(drain(&mut during), ["init", "list a", "list b", "listed"]);

        let mut late = shared.subscribe();
        let mut listed = drain(&mut late);
        listed[1..3].sort();
        assert_eq!(listed, ["init", "list a", "list b", "listed"]);

        shared.inner.apply(Event::Apply(map("c", "1")));
        shared.inner.apply(Event::Apply(map("a", "2")));
        let Ok(Event::Apply(c)) = late.try_recv() else { panic!("c was not sent") };
        assert!(Arc::ptr_eq(&c, &store.get(Some("ns"), "c").unwrap()), "subscribers get the store's copy");
        assert_eq!(store.get(Some("ns"), "a").unwrap().data.as_ref().unwrap()["v"], "2");
        shared.inner.apply(Event::Delete(map("b", "1")));
        assert_eq!(names(&store), ["a", "c"]);
        assert_eq!(drain(&mut late), ["apply a", "delete b"]);
        let mut elsewhere = map("x", "1");
        elsewhere.metadata.namespace = Some("other".to_string());
        shared.inner.apply(Event::Apply(elsewhere.clone()));
        assert_eq!((store.len(), store.in_namespace("ns").len(), store.in_namespace("other").len()), (3, 2, 1));
        shared.inner.apply(Event::Delete(elsewhere));
        assert!(store.in_namespace("other").is_empty());
        drain(&mut late);

        // A relist replaces the objects when it is complete.
        shared.inner.apply(Event::Init);
        shared.inner.apply(Event::InitApply(map("c", "2")));
        assert_eq!(names(&store), ["a", "c"]);
        shared.inner.apply(Event::InitDone);
        assert_eq!(names(&store), ["c"]);
        assert_eq!(drain(&mut late), ["init", "list c", "listed"]);

        // A dropped subscriber is forgotten.
        drop(early);
        shared.inner.apply(Event::Apply(map("d", "1")));
        assert_eq!(shared.inner.read().subscribers.len(), 2);
    }
}
