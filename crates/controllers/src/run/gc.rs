//! The garbage collector's loop: dependents of owners that are gone, foreground deletion and
//! orphaning, over the kinds it reflects.

use std::collections::HashSet;
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use tugboat_objects::informer::Store;
use serde_json::json;
use tokio::sync::Notify;

use super::{Hub, PARALLEL, Watched, wait};
use crate::gc;

/// How long the collector lets changes gather before a pass (at least).
const GC_COALESCE: std::time::Duration = std::time::Duration::from_millis(100);
/// A pass looks at every object: between passes the collector waits this many times as long
/// as its last pass took, so that it takes at most a tenth of a core however many objects
/// there are (cascades wait longer in a huge cluster, as upstream's queue makes them).
const GC_IDLE_PER_BUSY: u32 = 9;

/// Runs a CPU-bound `f` without holding up the tasks queued on this worker (they move to
/// another: the watch events the API server is sending, say).
fn off_the_worker<T>(f: impl FnOnce() -> T) -> T {
    match tokio::runtime::Handle::try_current().map(|h| h.runtime_flavor()) {
        Ok(tokio::runtime::RuntimeFlavor::MultiThread) => tokio::task::block_in_place(f),
        _ => f(),
    }
}

/// One kind the collector judges: how to reach it through the API, and how to visit the
/// metadata of every object of it in the shared informers.
struct Kind {
    resource: ApiResource,
    /// Cluster-scoped kinds (only custom ones are judged) are looked up without a namespace.
    namespaced: bool,
    visit: Visit,
}

/// Calls its argument with the metadata of every object of a kind.
type Visit = Box<dyn Fn(&mut dyn FnMut(&ObjectMeta)) + Send + Sync>;

impl Kind {
    /// A kind the controllers reflect anyway (its informer is shared), or, for a kind only the
    /// collector needs, its metadata alone (`PartialObjectMeta`).
    fn of<K>(hub: &Hub, changed: &Arc<Notify>) -> (Kind, Store<K>)
    where
        K: Watched,
    {
        let store = hub.watch::<K>(changed);
        let visited = store.clone();
        let visit = Box::new(move |f: &mut dyn FnMut(&ObjectMeta)| {
            for object in visited.state() {
                f(object.meta());
            }
        });
        (Kind { resource: ApiResource::erase::<K>(&()), namespaced: true, visit }, store)
    }

    /// A custom kind, known from its definition: its objects' metadata, reflected from now on.
    fn custom(client: &kube::Client, resource: ApiResource, namespaced: bool, changed: &Arc<Notify>) -> Kind {
        let api = Api::<PartialObjectMeta<DynamicObject>>::all_with(client.clone(), &resource);
        let store = super::reflect(api, changed);
        let visit = Box::new(move |f: &mut dyn FnMut(&ObjectMeta)| {
            for object in store.state() {
                f(&object.metadata);
            }
        });
        Kind { resource, namespaced, visit }
    }
}

/// What the collector reads of a CustomResourceDefinition: its group, names, scope, versions
/// and conditions. Not its schemas: decoded as k8s-openapi's types, a definition of 4 KiB
/// takes ~150 KiB, and a cluster may have a thousand (crdbench).
#[derive(Clone, Debug, serde::Deserialize)]
struct Definition {
    #[serde(deserialize_with = "names_only")]
    metadata: ObjectMeta,
    spec: DefinitionSpec,
    #[serde(default)]
    status: DefinitionStatus,
}

#[derive(Clone, Debug, serde::Deserialize)]
struct DefinitionSpec {
    group: String,
    names: DefinitionNames,
    scope: String,
    versions: Vec<DefinitionVersion>,
}

#[derive(Clone, Debug, serde::Deserialize)]
struct DefinitionNames {
    kind: String,
    plural: String,
}

#[derive(Clone, Debug, serde::Deserialize)]
struct DefinitionVersion {
    name: String,
    served: bool,
    storage: bool,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
struct DefinitionStatus {
    #[serde(default)]
    conditions: Vec<DefinitionCondition>,
}

#[derive(Clone, Debug, serde::Deserialize)]
struct DefinitionCondition {
    #[serde(rename = "type")]
    type_: String,
    status: String,
}

/// A definition's metadata without its labels and annotations (a `kubectl apply`'d definition
/// carries its whole self in one).
fn names_only<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<ObjectMeta, D::Error> {
    let meta = <ObjectMeta as serde::Deserialize>::deserialize(deserializer)?;
    Ok(ObjectMeta { annotations: None, labels: None, managed_fields: None, ..meta })
}

impl k8s_openapi::Resource for Definition {
    const API_VERSION: &'static str = "apiextensions.k8s.io/v1";
    const GROUP: &'static str = "apiextensions.k8s.io";
    const KIND: &'static str = "CustomResourceDefinition";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "customresourcedefinitions";
    type Scope = k8s_openapi::ClusterResourceScope;
}

impl k8s_openapi::Metadata for Definition {
    type Ty = ObjectMeta;
    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// The clients the custom kinds' watches go through: connections of their own (HTTP/2), each
/// shared by up to [`WATCHES_PER_CONNECTION`] watches (the API server takes 200 streams on a
/// connection), or the main client when there is no way to open them.
struct WatchClients {
    connect: Option<super::Connect>,
    main: kube::Client,
    /// The connection being filled and how many watches it carries (the full ones need no
    /// keeping: their watches hold their clients).
    filling: Option<(kube::Client, usize)>,
}

const WATCHES_PER_CONNECTION: usize = 100;

impl WatchClients {
    async fn next(&mut self) -> kube::Client {
        let Some(connect) = &self.connect else { return self.main.clone() };
        if !self.filling.as_ref().is_some_and(|(_, watches)| *watches < WATCHES_PER_CONNECTION) {
            match (connect.0)().await {
                Ok(client) => self.filling = Some((client, 0)),
                Err(error) => {
                    tracing::warn!(%error, "opening a connection for the garbage collector's watches; using the main one");
                    return self.main.clone();
                }
            }
        }
        let (client, watches) = self.filling.as_mut().expect("opened");
        *watches += 1;
        client.clone()
    }
}

/// Adds a kind for each established custom resource the collector does not judge yet (by its
/// storage version: owner references match on group and kind).
async fn add_custom_kinds(
    clients: &mut WatchClients,
    definitions: &Store<Definition>,
    kinds: &mut Vec<Kind>,
    changed: &Arc<Notify>,
) {
    for definition in definitions.state() {
        let established = definition.status.conditions.iter().any(|c| c.type_ == "Established" && c.status == "True");
        let spec = &definition.spec;
        let Some(version) = spec.versions.iter().find(|v| v.storage && v.served) else { continue };
        if !established || kinds.iter().any(|k| k.resource.group == spec.group && k.resource.kind == spec.names.kind) {
            continue;
        }
        let resource = ApiResource {
            group: spec.group.clone(),
            version: version.name.clone(),
            api_version: format!("{}/{}", spec.group, version.name),
            kind: spec.names.kind.clone(),
            plural: spec.names.plural.clone(),
        };
        tracing::debug!(kind = %resource.kind, group = %resource.group, "the garbage collector judges a custom kind");
        let client = clients.next().await;
        kinds.push(Kind::custom(&client, resource, spec.scope == "Namespaced", changed));
    }
}

/// The kinds the garbage collector judges (owners and dependents): the namespaced workload
/// kinds, what controllers make for them, and what users hang on them (ConfigMaps, Secrets,
/// PersistentVolumeClaims, ServiceAccounts); custom kinds join them as their definitions are
/// established (`add_custom_kinds`). Cluster-scoped built-in owners (a mirror pod's Node) are
/// not judged yet. Returns once every informer has listed.
async fn collected_kinds(hub: &Hub, changed: &Arc<Notify>) -> anyhow::Result<Vec<Kind>> {
    use k8s_openapi::api::apps::v1::{ControllerRevision, DaemonSet, StatefulSet};
    use k8s_openapi::api::batch::v1::{CronJob, Job};
    use k8s_openapi::api::core::v1::{
        ConfigMap, Endpoints, PersistentVolumeClaim, ReplicationController, Secret, Service, ServiceAccount,
    };
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    let mut kinds = Vec::new();
    macro_rules! kinds {
        ($($kind:ty),*) => {$(
            let (kind, store) = Kind::of::<$kind>(hub, changed);
            store.wait_until_ready().await;
            kinds.push(kind);
        )*};
    }
    kinds!(Pod, ReplicaSet, Deployment, DaemonSet, StatefulSet, Job, CronJob, Service, Endpoints, EndpointSlice);
    kinds!(PersistentVolumeClaim, ServiceAccount, ReplicationController);
    kinds!(PartialObjectMeta<ControllerRevision>);
    // Many and large, and no controller reads them: metadata only.
    kinds!(PartialObjectMeta<ConfigMap>, PartialObjectMeta<Secret>);
    Ok(kinds)
}

fn object(kind: usize, meta: &ObjectMeta) -> gc::Object {
    gc::Object {
        kind,
        namespace: meta.namespace.clone().unwrap_or_default(),
        name: meta.name.clone().unwrap_or_default(),
        uid: meta.uid.clone().unwrap_or_default(),
        owners: meta.owner_references.clone().unwrap_or_default(),
        deleting: meta.deletion_timestamp.is_some(),
        finalizers: meta.finalizers.clone().unwrap_or_default(),
    }
}

/// The garbage collector: deletes dependents whose owners are gone (after looking the owner
/// up, so a dependent seen before its new owner is safe), and carries out foreground deletion
/// and orphaning.
pub(super) async fn run_garbage_collector(
    client: kube::Client,
    hub: Arc<Hub>,
    connect: Option<super::Connect>,
) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let mut kinds = collected_kinds(&hub, &changed).await?;
    // Custom kinds join as their definitions are established (and stay: a kind whose
    // definition went has no objects left to judge).
    let definitions = hub.watch::<Definition>(&changed);
    definitions.wait_until_ready().await;
    let mut watch_clients = WatchClients { connect, main: client.clone(), filling: None };
    tracing::info!("garbage collector started");
    loop {
        add_custom_kinds(&mut watch_clients, &definitions, &mut kinds, &changed).await;
        let resources: Vec<(ApiResource, bool)> = kinds.iter().map(|k| (k.resource.clone(), k.namespaced)).collect();
        let kind_of = |reference: &OwnerReference| {
            let group = reference.api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
            resources.iter().position(|(k, _)| k.kind == reference.kind && k.group == group)
        };
        let started = std::time::Instant::now();
        let actions = off_the_worker(|| {
            // Only objects with owners or being deleted can need anything, and of the rest
            // only those they name as owners matter: two scans, copying just those.
            let mut objects = Vec::new();
            let mut named: HashSet<String> = HashSet::new();
            for (index, kind) in kinds.iter().enumerate() {
                (kind.visit)(&mut |meta| {
                    let owners = meta.owner_references.as_deref().unwrap_or_default();
                    if !owners.is_empty() || meta.deletion_timestamp.is_some() {
                        named.extend(owners.iter().map(|o| o.uid.clone()));
                        objects.push(object(index, meta));
                    }
                });
            }
            let copied: HashSet<String> = objects.iter().map(|o| o.uid.clone()).collect();
            for (index, kind) in kinds.iter().enumerate() {
                (kind.visit)(&mut |meta| {
                    let uid = meta.uid.as_deref().unwrap_or_default();
                    if named.contains(uid) && !copied.contains(uid) {
                        objects.push(object(index, meta));
                    }
                });
            }
            gc::plan(&objects, |o| kind_of(o).is_some())
        });
        let pass = started.elapsed();
        let (client, resources, kind_of) = (&client, &resources, &kind_of);
        futures::stream::iter(actions)
            .for_each_concurrent(PARALLEL, |action| async move {
                if let Err(error) = collect(client, resources, kind_of, &action).await {
                    tracing::debug!(%error, ?action, "garbage collection failed");
                }
            })
            .await;
        // A pass looks at every object of every kind: in a busy cluster, once per burst of
        // 100 ms (or nine times the pass) rather than per change (deletions cascade a little
        // later, nothing is missed).
        wait(&changed).await;
        tokio::time::sleep(GC_COALESCE.max(pass * GC_IDLE_PER_BUSY)).await;
    }
}

async fn collect(
    client: &kube::Client,
    kinds: &[(ApiResource, bool)],
    kind_of: &impl Fn(&OwnerReference) -> Option<usize>,
    action: &gc::Action,
) -> kube::Result<()> {
    let api = |object: &gc::Object| {
        let (kind, _) = &kinds[object.kind];
        if object.namespace.is_empty() {
            Api::<DynamicObject>::all_with(client.clone(), kind)
        } else {
            Api::<DynamicObject>::namespaced_with(client.clone(), &object.namespace, kind)
        }
    };
    let delete = |object: &gc::Object, foreground: bool| {
        let mut params = if foreground { DeleteParams::foreground() } else { DeleteParams::background() };
        params.preconditions = Some(kube::api::Preconditions { uid: Some(object.uid.clone()), resource_version: None });
        let api = api(object);
        let name = object.name.clone();
        async move {
            match api.delete(&name, &params).await {
                Err(kube::Error::Api(status)) if status.code == 404 || status.code == 409 => Ok(()),
                other => other.map(|_| ()),
            }
        }
    };
    match action {
        gc::Action::DeleteOrphaned { dependent, owners } => {
            // Only if every owner is really gone (or replaced by another object of its name).
            for owner in owners {
                let Some(index) = kind_of(owner) else { return Ok(()) };
                let (kind, namespaced) = &kinds[index];
                let owner_api = if dependent.namespace.is_empty() || !namespaced {
                    Api::<DynamicObject>::all_with(client.clone(), kind)
                } else {
                    Api::<DynamicObject>::namespaced_with(client.clone(), &dependent.namespace, kind)
                };
                if let Some(found) = owner_api.get_opt(&owner.name).await?
                    && found.metadata.uid.as_deref() == Some(owner.uid.as_str())
                {
                    return Ok(());
                }
            }
            delete(dependent, false).await
        }
        gc::Action::DeleteDependent { dependent } => delete(dependent, true).await,
        gc::Action::SetOwners { dependent, keep } => {
            let owners = if keep.is_empty() { serde_json::Value::Null } else { json!(keep) };
            let patch = json!({"metadata": {"ownerReferences": owners}});
            api(dependent).patch(&dependent.name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
        }
        gc::Action::RemoveFinalizer { owner, finalizer } => {
            let left: Vec<&String> = owner.finalizers.iter().filter(|f| f != finalizer).collect();
            let patch = json!({"metadata": {"finalizers": left}});
            match api(owner).patch(&owner.name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
                other => other.map(|_| ()),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_definition_keeps_what_the_collector_reads_and_not_its_schema_or_annotations() {
        let crd = json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": "widgets.example.com", "resourceVersion": "7",
                         "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{…}"}},
            "spec": {
                "group": "example.com",
                "names": {"kind": "Widget", "plural": "widgets", "listKind": "WidgetList"},
                "scope": "Namespaced",
                "versions": [
                    {"name": "v1beta1", "served": true, "storage": false},
                    {"name": "v1", "served": true, "storage": true,
                     "schema": {"openAPIV3Schema": {"type": "object", "properties": {"spec": {"type": "object"}}}}},
                ],
            },
            "status": {"conditions": [{"type": "Established", "status": "True", "reason": "InitialNamesAccepted"}]},
        });
        let definition: Definition = serde_json::from_value(crd).unwrap();
        assert_eq!(definition.metadata.name.as_deref(), Some("widgets.example.com"));
        assert_eq!(definition.metadata.resource_version.as_deref(), Some("7"));
        assert_eq!(definition.metadata.annotations, None);
        assert_eq!((definition.spec.group.as_str(), definition.spec.names.kind.as_str()), ("example.com", "Widget"));
        let storage = definition.spec.versions.iter().find(|v| v.storage && v.served).unwrap();
        assert_eq!(storage.name, "v1");
        assert!(definition.status.conditions.iter().any(|c| c.type_ == "Established" && c.status == "True"));
        // A definition being created has no status yet.
        let fresh = json!({"metadata": {"name": "a.b"},
                           "spec": {"group": "b", "names": {"kind": "A", "plural": "a"}, "scope": "Cluster", "versions": []}});
        let fresh: Definition = serde_json::from_value(fresh).unwrap();
        assert!(fresh.status.conditions.is_empty());
        assert_eq!(<Definition as kube::Resource>::plural(&()), "customresourcedefinitions");
    }
}
