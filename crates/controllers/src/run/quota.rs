//! The resource quota controller's loop: on every change of a quota or of what quotas count,
//! each ResourceQuota's `status` becomes its `spec.hard` and what its namespace uses
//! (`tugboat_objects::quota`), written only when it changed.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::batch::v1::{CronJob, Job};
use k8s_openapi::api::core::v1::{
    ConfigMap, PersistentVolumeClaim, Pod, ReplicationController, ResourceQuota, Secret, Service,
};
use kube::api::{Api, Patch, PatchParams};
use kube::core::PartialObjectMeta;
use tugboat_objects::informer::Store;
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::{Hub, wait, wait_until};
use tugboat_objects::quota;

/// The resources counted from the stores below (besides pods, services and claims).
const COUNTED: &[&str] = &[
    "configmaps",
    "secrets",
    "replicationcontrollers",
    "resourcequotas",
    "replicasets.apps",
    "deployments.apps",
    "statefulsets.apps",
    "daemonsets.apps",
    "jobs.batch",
    "cronjobs.batch",
];

/// Adds how many objects of `store` each namespace holds under `resource`, to `counts`.
fn count<K: kube::Resource<DynamicType = ()> + Clone + 'static>(
    store: &Store<K>,
    resource: &str,
    counts: &mut BTreeMap<String, BTreeMap<String, i64>>,
) {
    for object in store.state() {
        let namespace = object.meta().namespace.clone().unwrap_or_default();
        *counts.entry(namespace).or_default().entry(resource.to_string()).or_default() += 1;
    }
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
    quotas.wait_until_ready().await;
    pods.wait_until_ready().await;
    services.wait_until_ready().await;
    claims.wait_until_ready().await;
    configmaps.wait_until_ready().await;
    secrets.wait_until_ready().await;
    controllers.wait_until_ready().await;
    replicasets.wait_until_ready().await;
    deployments.wait_until_ready().await;
    statefulsets.wait_until_ready().await;
    daemonsets.wait_until_ready().await;
    jobs.wait_until_ready().await;
    cronjobs.wait_until_ready().await;
    tracing::info!("resource quota controller started");
    // When each quota's current version was first seen: admission charges a quota at once
    // (a new version), and the caches of what it counts catch up a moment later — counting
    // before they have would undo the charge, so a changed quota is recounted once settled.
    let mut seen: std::collections::HashMap<String, (String, std::time::Instant)> = Default::default();
    const SETTLE: std::time::Duration = std::time::Duration::from_millis(500);
    loop {
        let mut recount_at: Option<std::time::Instant> = None;
        let all_quotas = quotas.state();
        let live: std::collections::HashSet<String> =
            all_quotas.iter().filter_map(|q| q.metadata.uid.clone()).collect();
        seen.retain(|uid, _| live.contains(uid));
        if all_quotas.is_empty() {
            wait(&changed).await;
            continue;
        }
        let (all_pods, all_services, all_claims) = (pods.state(), services.state(), claims.state());
        // Each store read once a pass, whatever the number of quotas.
        let mut counts = BTreeMap::new();
        count(&configmaps, "configmaps", &mut counts);
        count(&secrets, "secrets", &mut counts);
        count(&controllers, "replicationcontrollers", &mut counts);
        count(&quotas, "resourcequotas", &mut counts);
        count(&replicasets, "replicasets.apps", &mut counts);
        count(&deployments, "deployments.apps", &mut counts);
        count(&statefulsets, "statefulsets.apps", &mut counts);
        count(&daemonsets, "daemonsets.apps", &mut counts);
        count(&jobs, "jobs.batch", &mut counts);
        count(&cronjobs, "cronjobs.batch", &mut counts);
        for rq in &all_quotas {
            let Some(namespace) = rq.metadata.namespace.as_deref() else { continue };
            let here = |meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
                meta.namespace.as_deref() == Some(namespace)
            };
            // Every kind counted is known here: none of a kind is a count of 0, not an unknown.
            let mut counted: BTreeMap<String, i64> = COUNTED.iter().map(|r| (r.to_string(), 0)).collect();
            counted.extend(counts.get(namespace).cloned().unwrap_or_default());
            let view = quota::Namespace {
                pods: all_pods.iter().filter(|p| here(&p.metadata)).map(|p| &**p).collect(),
                services: all_services.iter().filter(|s| here(&s.metadata)).map(|s| &**s).collect(),
                claims: all_claims.iter().filter(|c| here(&c.metadata)).map(|c| &**c).collect(),
                counts: counted,
            };
            let used = quota::used(rq, &view);
            let hard = rq.spec.as_ref().and_then(|s| s.hard.clone()).unwrap_or_default();
            let status = rq.status.clone().unwrap_or_default();
            if status.hard.clone().unwrap_or_default() == hard && status.used.clone().unwrap_or_default() == used {
                continue;
            }
            let version = rq.metadata.resource_version.clone().unwrap_or_default();
            let uid = rq.metadata.uid.clone().unwrap_or_default();
            let since = match seen.get(&uid) {
                Some((known, since)) if *known == version => *since,
                _ => {
                    let now = std::time::Instant::now();
                    seen.insert(uid, (version, now));
                    now
                }
            };
            if since.elapsed() < SETTLE {
                let at = since + SETTLE;
                recount_at = Some(recount_at.map_or(at, |r| r.min(at)));
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
            // Only over the status it computed from: admission charges a quota at once, and a
            // count from a cache that has not seen that object yet must not undo the charge
            // (a conflict; the next pass counts again).
            let patch = json!({
                "metadata": {"resourceVersion": rq.metadata.resource_version},
                "status": {
                    "hard": with_removals(&hard, status.hard.as_ref()),
                    "used": with_removals(&used, status.used.as_ref()),
                },
            });
            let api: Api<ResourceQuota> = Api::namespaced(client.clone(), namespace);
            let name = rq.metadata.name.as_deref().unwrap_or_default();
            if let Err(error) = api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
                tracing::debug!(%error, quota = name, namespace, "could not update the quota's status");
            }
        }
        let at = recount_at.map(|at| {
            let left = at.saturating_duration_since(std::time::Instant::now());
            jiff::Timestamp::now() + jiff::SignedDuration::try_from(left).unwrap_or_default()
        });
        wait_until(&changed, at).await;
    }
}
