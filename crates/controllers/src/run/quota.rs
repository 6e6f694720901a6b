//! The resource quota controller's loop: on every change of a quota or of what quotas count,
//! each ResourceQuota's `status` becomes its `spec.hard` and what its namespace uses
//! (`crate::quota`), written only when it changed.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolumeClaim, Pod, ReplicationController, ResourceQuota, Secret, Service,
};
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::Store;
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::{Hub, ready, wait};
use crate::quota;

/// How many objects of a store are in `namespace`.
fn count<K: kube::Resource<DynamicType = ()> + Clone + 'static>(store: &Store<K>, namespace: &str) -> i64 {
    store.state().iter().filter(|o| o.meta().namespace.as_deref() == Some(namespace)).count() as i64
}

pub(super) async fn run_quotas(client: kube::Client, hub: Arc<Hub>) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let quotas = hub.watch::<ResourceQuota>(&changed);
    let pods = hub.watch::<Pod>(&changed);
    let services = hub.watch::<Service>(&changed);
    let claims = hub.watch::<PersistentVolumeClaim>(&changed);
    let configmaps = hub.watch::<PartialObjectMeta<ConfigMap>>(&changed);
    let secrets = hub.watch::<PartialObjectMeta<Secret>>(&changed);
    let controllers = hub.watch::<ReplicationController>(&changed);
    let replicasets = hub.watch::<ReplicaSet>(&changed);
    let deployments = hub.watch::<Deployment>(&changed);
    let statefulsets = hub.watch::<StatefulSet>(&changed);
    let daemonsets = hub.watch::<DaemonSet>(&changed);
    let jobs = hub.watch::<Job>(&changed);
    let cronjobs = hub.watch::<CronJob>(&changed);
    ready(&quotas).await?;
    ready(&pods).await?;
    ready(&services).await?;
    ready(&claims).await?;
    ready(&configmaps).await?;
    ready(&secrets).await?;
    ready(&controllers).await?;
    ready(&replicasets).await?;
    ready(&deployments).await?;
    ready(&statefulsets).await?;
    ready(&daemonsets).await?;
    ready(&jobs).await?;
    ready(&cronjobs).await?;
    tracing::info!("resource quota controller started");
    loop {
        let all_quotas = quotas.state();
        if all_quotas.is_empty() {
            wait(&changed).await;
            continue;
        }
        let (all_pods, all_services, all_claims) = (pods.state(), services.state(), claims.state());
        for rq in &all_quotas {
            let Some(namespace) = rq.metadata.namespace.as_deref() else { continue };
            let here = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
                meta.namespace.as_deref() == Some(namespace)
            };
            let counts: BTreeMap<String, i64> = [
                ("configmaps", count(&configmaps, namespace)),
                ("secrets", count(&secrets, namespace)),
                ("replicationcontrollers", count(&controllers, namespace)),
                ("resourcequotas", count(&quotas, namespace)),
                ("replicasets.apps", count(&replicasets, namespace)),
                ("deployments.apps", count(&deployments, namespace)),
                ("statefulsets.apps", count(&statefulsets, namespace)),
                ("daemonsets.apps", count(&daemonsets, namespace)),
                ("jobs.batch", count(&jobs, namespace)),
                ("cronjobs.batch", count(&cronjobs, namespace)),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect();
            let view = quota::Namespace {
                pods: all_pods.iter().filter(|p| here(&p.metadata)).map(|p| &**p).collect(),
                services: all_services.iter().filter(|s| here(&s.metadata)).map(|s| &**s).collect(),
                claims: all_claims.iter().filter(|c| here(&c.metadata)).map(|c| &**c).collect(),
                counts,
            };
            let used = quota::used(rq, &view);
            let hard = rq.spec.as_ref().and_then(|s| s.hard.clone()).unwrap_or_default();
            let status = rq.status.clone().unwrap_or_default();
            if status.hard.clone().unwrap_or_default() == hard && status.used.clone().unwrap_or_default() == used {
                continue;
            }
            // A merge patch keeps keys it does not name: those no longer in the spec go as nulls.
            let with_removals = |new: &BTreeMap<String, _>, old: Option<&BTreeMap<String, _>>| -> Value {
                let mut map = serde_json::to_value(new).unwrap_or_else(|_| json!({}));
                for key in old.into_iter().flat_map(|o| o.keys()).filter(|k| !new.contains_key(*k)) {
                    map[key] = Value::Null;
                }
                map
            };
            let patch = json!({"status": {
                "hard": with_removals(&hard, status.hard.as_ref()),
                "used": with_removals(&used, status.used.as_ref()),
            }});
            let api: Api<ResourceQuota> = Api::namespaced(client.clone(), namespace);
            let name = rq.metadata.name.as_deref().unwrap_or_default();
            if let Err(error) = api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                tracing::debug!(%error, quota = name, namespace, "could not update the quota's status");
            }
        }
        wait(&changed).await;
    }
}
