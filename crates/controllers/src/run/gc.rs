//! The garbage collector's loop: dependents of owners that are gone, foreground deletion and
//! orphaning, over the kinds it reflects.

use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use serde_json::json;
use tokio::sync::Notify;

use super::{PARALLEL, ready, reflect_with, wait};
use crate::gc;

/// The kinds the garbage collector watches, metadata only (owners and dependents it can judge):
/// the namespaced workload kinds, what controllers make for them, and what users hang on them
/// (ConfigMaps, Secrets, PersistentVolumeClaims, ServiceAccounts). Cluster-scoped owners (a
/// mirror pod's Node) are not judged yet.
fn collected_kinds() -> Vec<kube::api::ApiResource> {
    use k8s_openapi::api::apps::v1::{DaemonSet, StatefulSet};
    use k8s_openapi::api::batch::v1::{CronJob, Job};
    use k8s_openapi::api::core::v1::{ConfigMap, Endpoints, PersistentVolumeClaim, Secret, Service, ServiceAccount};
    use k8s_openapi::api::discovery::v1::EndpointSlice;
    use kube::api::ApiResource;
    vec![
        ApiResource::erase::<Pod>(&()),
        ApiResource::erase::<ReplicaSet>(&()),
        ApiResource::erase::<Deployment>(&()),
        ApiResource::erase::<DaemonSet>(&()),
        ApiResource::erase::<StatefulSet>(&()),
        ApiResource::erase::<Job>(&()),
        ApiResource::erase::<CronJob>(&()),
        ApiResource::erase::<Service>(&()),
        ApiResource::erase::<Endpoints>(&()),
        ApiResource::erase::<EndpointSlice>(&()),
        ApiResource::erase::<ConfigMap>(&()),
        ApiResource::erase::<Secret>(&()),
        ApiResource::erase::<PersistentVolumeClaim>(&()),
        ApiResource::erase::<ServiceAccount>(&()),
    ]
}

/// The garbage collector: deletes dependents whose owners are gone (after looking the owner
/// up, so a dependent seen before its new owner is safe), and carries out foreground deletion
/// and orphaning.
pub(super) async fn run_garbage_collector(client: kube::Client) -> anyhow::Result<()> {
    use kube::api::DynamicObject;
    let kinds = collected_kinds();
    let changed = Arc::new(Notify::new());
    let wakes = Arc::new(Mutex::new(vec![changed.clone()]));
    let mut stores = Vec::new();
    for kind in &kinds {
        // Metadata only: the collector needs nothing else, and it watches many kinds.
        let api = Api::<PartialObjectMeta<DynamicObject>>::all_with(client.clone(), kind);
        stores.push(reflect_with(api, kind.clone(), wakes.clone()));
    }
    for store in &stores {
        ready(&store).await?;
    }
    tracing::info!("garbage collector started");
    let kind_of = |reference: &OwnerReference| {
        let group = reference.api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
        kinds.iter().position(|k| k.kind == reference.kind && k.group == group)
    };
    loop {
        let mut objects = Vec::new();
        for (index, store) in stores.iter().enumerate() {
            for object in store.state() {
                let meta = &object.metadata;
                objects.push(gc::Object {
                    kind: index,
                    namespace: meta.namespace.clone().unwrap_or_default(),
                    name: meta.name.clone().unwrap_or_default(),
                    uid: meta.uid.clone().unwrap_or_default(),
                    owners: meta.owner_references.clone().unwrap_or_default(),
                    deleting: meta.deletion_timestamp.is_some(),
                    finalizers: meta.finalizers.clone().unwrap_or_default(),
                });
            }
        }
        let actions = gc::plan(&objects, |o| kind_of(o).is_some());
        let (client, kinds, kind_of) = (&client, &kinds, &kind_of);
        futures::stream::iter(actions)
            .for_each_concurrent(PARALLEL, |action| async move {
                if let Err(error) = collect(client, kinds, kind_of, &action).await {
                    tracing::debug!(%error, ?action, "garbage collection failed");
                }
            })
            .await;
        wait(&changed).await;
    }
}

async fn collect(
    client: &kube::Client,
    kinds: &[kube::api::ApiResource],
    kind_of: &impl Fn(&OwnerReference) -> Option<usize>,
    action: &gc::Action,
) -> kube::Result<()> {
    use kube::api::DynamicObject;
    let api = |object: &gc::Object| {
        let kind = &kinds[object.kind];
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
                let owner_api = if dependent.namespace.is_empty() {
                    Api::<DynamicObject>::all_with(client.clone(), &kinds[index])
                } else {
                    Api::<DynamicObject>::namespaced_with(client.clone(), &dependent.namespace, &kinds[index])
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
