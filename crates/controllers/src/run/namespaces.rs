//! The namespace controller (a deleted namespace is emptied through the API, then finalized)
//! and the service account controller (a `default` ServiceAccount in every namespace).

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, ServiceAccount};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, PostParams};
use kube::discovery::{Discovery, Scope, verbs};
use tokio::sync::Notify;

use super::{COALESCE, Hub, PARALLEL, create_if_missing, wait};
use crate::namespaces::{self, Remaining};
use crate::serviceaccounts;

/// The finalizer in `spec.finalizers` that this controller removes once a namespace is empty.
const FINALIZER: &str = "kubernetes";

pub(super) async fn run_namespaces(client: kube::Client, hub: Arc<Hub>) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let namespaces = hub.watch::<Namespace>(&changed);
    namespaces.wait_until_ready().await;
    tracing::info!("namespace controller started");
    loop {
        let terminating: Vec<Arc<Namespace>> = namespaces
            .state()
            .into_iter()
            .filter(|n| n.metadata.deletion_timestamp.is_some())
            .filter(|n| {
                n.spec.as_ref().and_then(|s| s.finalizers.as_ref()).is_some_and(|f| f.iter().any(|f| f == FINALIZER))
            })
            .collect();
        let mut waiting = false;
        if !terminating.is_empty() {
            match namespaced_resources(&client).await {
                Ok(resources) => {
                    for namespace in terminating {
                        let name = namespace.metadata.name.clone().unwrap_or_default();
                        let remaining = empty(&client, &name, &resources).await;
                        if remaining.resources.is_empty() && remaining.failures.is_empty() {
                            if let Err(error) = finalize(&client, &name).await {
                                tracing::debug!(%error, namespace = name, "could not finalize");
                                waiting = true;
                            } else {
                                tracing::info!(namespace = name, "namespace emptied and finalized");
                            }
                        } else {
                            tracing::debug!(namespace = name, ?remaining, "namespace still has content");
                            report(&client, &namespace, &namespaces::conditions(None, &remaining)).await;
                            waiting = true;
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "discovery failed; namespaces wait");
                    let failed = error.to_string();
                    for namespace in terminating {
                        report(&client, &namespace, &namespaces::conditions(Some(&failed), &Remaining::default()))
                            .await;
                    }
                    waiting = true;
                }
            }
        }
        if waiting {
            // Pods finishing their grace periods and finalizers being removed show up as
            // changes elsewhere: look again soon.
            let _ = tokio::time::timeout(Duration::from_secs(1), changed.notified()).await;
            tokio::time::sleep(COALESCE).await;
        } else {
            wait(&changed).await;
        }
    }
}

/// Every namespaced resource that can be listed and deleted.
async fn namespaced_resources(client: &kube::Client) -> kube::Result<Vec<ApiResource>> {
    let discovery = Discovery::new(client.clone()).run().await?;
    let mut resources = Vec::new();
    for group in discovery.groups() {
        for (resource, capabilities) in group.recommended_resources() {
            if capabilities.scope == Scope::Namespaced
                && capabilities.supports_operation(verbs::LIST)
                && capabilities.supports_operation(verbs::DELETE)
            {
                resources.push(resource);
            }
        }
    }
    Ok(resources)
}

/// Deletes what is in the namespace; returns what is still there (by resource, and held by
/// which finalizers) and what could not be listed or deleted.
async fn empty(client: &kube::Client, namespace: &str, resources: &[ApiResource]) -> Remaining {
    // Per resource: its label, and how many objects are left with the finalizers holding them.
    type Left = (String, kube::Result<(usize, Vec<String>)>);
    let results: Vec<Left> = futures::stream::iter(resources.to_vec())
        .map(|resource| {
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
            let label = format!("{}.{}", resource.plural, resource.group);
            async move {
                let result = async {
                    let list = api.list(&ListParams::default()).await?;
                    let (mut left, mut finalizers) = (0, Vec::new());
                    for object in &list.items {
                        if object.metadata.deletion_timestamp.is_some() {
                            left += 1;
                            finalizers.extend(object.metadata.finalizers.iter().flatten().cloned());
                            continue;
                        }
                        let name = object.metadata.name.clone().unwrap_or_default();
                        match api.delete(&name, &DeleteParams::background()).await {
                            Ok(either) => left += usize::from(either.is_left()),
                            Err(kube::Error::Api(status)) if status.code == 404 => {}
                            Err(error) => return Err(error),
                        }
                    }
                    Ok((left, finalizers))
                }
                .await;
                (label, result)
            }
        })
        .buffer_unordered(PARALLEL)
        .collect()
        .await;
    let mut remaining = Remaining::default();
    for (label, result) in results {
        match result {
            Ok((left, finalizers)) => {
                if left > 0 {
                    remaining.resources.insert(label, left);
                }
                for finalizer in finalizers {
                    *remaining.finalizers.entry(finalizer).or_default() += 1;
                }
            }
            Err(error) => remaining.failures.push(format!("{label}: {error}")),
        }
    }
    remaining.failures.sort();
    remaining
}

/// Puts the deletion conditions on the namespace's status, unless they say that already.
async fn report(client: &kube::Client, namespace: &Namespace, wanted: &[(&'static str, bool, &'static str, String)]) {
    let current: Vec<serde_json::Value> = namespace
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .map(|c| c.iter().filter_map(|c| serde_json::to_value(c).ok()).collect())
        .unwrap_or_default();
    let conditions = namespaces::status_conditions(wanted, &current, &jiff::Timestamp::now().to_string());
    let same = conditions.len() == current.len()
        && conditions
            .iter()
            .zip(&current)
            .all(|(a, b)| ["type", "status", "reason", "message"].iter().all(|field| a[*field] == b[*field]));
    if same {
        return;
    }
    let name = namespace.metadata.name.as_deref().unwrap_or_default();
    let api: Api<Namespace> = Api::all(client.clone());
    let patch = serde_json::json!({"status": {"conditions": conditions}});
    if let Err(error) =
        api.patch_status(name, &kube::api::PatchParams::default(), &kube::api::Patch::Merge(&patch)).await
    {
        tracing::debug!(%error, namespace = name, "could not report the namespace's conditions");
    }
}

/// Removes this controller's finalizer through `namespaces/{name}/finalize`.
async fn finalize(client: &kube::Client, name: &str) -> anyhow::Result<()> {
    let api: Api<Namespace> = Api::all(client.clone());
    let mut namespace = api.get(name).await?;
    if let Some(finalizers) = namespace.spec.as_mut().and_then(|s| s.finalizers.as_mut()) {
        finalizers.retain(|f| f != FINALIZER);
    }
    api.replace_subresource("finalize", name, &PostParams::default(), &namespace).await?;
    Ok(())
}

pub(super) async fn run_service_accounts(client: kube::Client, hub: Arc<Hub>) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let namespaces = hub.watch::<Namespace>(&changed);
    let accounts = hub.watch::<ServiceAccount>(&changed);
    namespaces.wait_until_ready().await;
    accounts.wait_until_ready().await;
    tracing::info!("service account controller started");
    loop {
        let wanted = serviceaccounts::plan(&namespaces.state(), &accounts.state());
        futures::stream::iter(wanted)
            .for_each_concurrent(PARALLEL, |namespace| {
                let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &namespace);
                async move {
                    let account = ServiceAccount {
                        metadata: ObjectMeta { name: Some("default".into()), ..Default::default() },
                        ..Default::default()
                    };
                    if let Err(error) = create_if_missing(&api, &account).await {
                        tracing::debug!(%error, namespace, "could not create the default service account");
                    }
                }
            })
            .await;
        wait(&changed).await;
    }
}

/// The name of the ConfigMap with the cluster CA in every namespace (what pods' projected
/// service-account volumes mount as `ca.crt`).
const ROOT_CA: &str = "kube-root-ca.crt";

/// The root CA publisher: ConfigMap `kube-root-ca.crt` with `ca.crt` in every active namespace,
/// put back when deleted or changed.
pub(super) async fn run_root_ca_publisher(client: kube::Client, hub: Arc<Hub>, ca: String) -> anyhow::Result<()> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::core::PartialObjectMeta;
    let changed = Arc::new(Notify::new());
    let namespaces = hub.watch::<Namespace>(&changed);
    // Metadata only (shared with the garbage collector); a map's content is checked on GET
    // only when it is created or its resourceVersion changes.
    let maps = hub.watch::<PartialObjectMeta<ConfigMap>>(&changed);
    namespaces.wait_until_ready().await;
    maps.wait_until_ready().await;
    tracing::info!("root CA publisher started");
    let mut checked: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    loop {
        for namespace in namespaces.state() {
            if namespace.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let name = namespace.metadata.name.clone().unwrap_or_default();
            // Looked up by name: each change of any ConfigMap wakes this loop, and a scan of
            // them all each time grew with the square of their number.
            let found = maps.get(Some(&name), ROOT_CA);
            let version = found.as_ref().and_then(|m| m.metadata.resource_version.as_ref());
            if version.is_some() && checked.get(&name) == version {
                continue;
            }
            let api: Api<ConfigMap> = Api::namespaced(client.clone(), &name);
            let wanted = std::collections::BTreeMap::from([("ca.crt".to_string(), ca.clone())]);
            let result = match api.get_opt(ROOT_CA).await {
                Ok(Some(map)) if map.data.as_ref() == Some(&wanted) => Ok(map),
                Ok(Some(mut map)) => {
                    map.data = Some(wanted);
                    api.replace(ROOT_CA, &PostParams::default(), &map).await
                }
                Ok(None) => {
                    let map = ConfigMap {
                        metadata: ObjectMeta {
                            name: Some(ROOT_CA.into()),
                            annotations: Some(std::collections::BTreeMap::from([(
                                "kubernetes.io/description".to_string(),
                                "Contains a CA bundle that can be used to verify the kube-apiserver when using internal endpoints such as the internal service IP or kubernetes.default.svc. No other usage is guaranteed across distributions of Kubernetes clusters.".to_string(),
                            )])),
                            ..Default::default()
                        },
                        data: Some(wanted),
                        ..Default::default()
                    };
                    api.create(&PostParams::default(), &map).await
                }
                Err(error) => Err(error),
            };
            match result {
                Ok(map) => {
                    checked.insert(name, map.metadata.resource_version.unwrap_or_default());
                }
                Err(error) => tracing::debug!(%error, namespace = name, "could not publish the root CA"),
            }
        }
        wait(&changed).await;
    }
}
