//! The endpoints and endpoint slice controllers' loop: Endpoints and EndpointSlices of every
//! Service with a selector follow its ready pods.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams};
use tokio::sync::Notify;

use super::{Hub, PARALLEL, delete_if_there, pods_by_namespace, wait};
use crate::endpoints::{self, CONTROLLER, Desired, MANAGED_BY, SERVICE_NAME};

/// The label upstream's endpoints controller puts on the Endpoints it manages (so the mirroring
/// controller leaves them alone); it also tells which Endpoints are ours to delete.
const SKIP_MIRROR: &str = "endpointslice.kubernetes.io/skip-mirror";

pub(super) async fn run_endpoints(client: kube::Client, hub: Arc<Hub>) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let services = hub.watch::<Service>(&changed);
    let pods = hub.watch::<Pod>(&changed);
    let endpoints = hub.watch::<Endpoints>(&changed);
    let slices = hub.watch::<EndpointSlice>(&changed);
    services.wait_until_ready().await;
    pods.wait_until_ready().await;
    endpoints.wait_until_ready().await;
    slices.wait_until_ready().await;
    tracing::info!("endpoints and endpointslice controllers started");
    loop {
        let selecting = |s: &Service| s.spec.as_ref().and_then(|s| s.selector.as_ref()).is_some_and(|s| !s.is_empty());
        let managed = |e: &Endpoints| {
            e.metadata.labels.as_ref().and_then(|l| l.get(SKIP_MIRROR)).map(String::as_str) == Some("true")
        };
        let all_services = services.state();
        let all_endpoints = endpoints.state();
        if !all_services.iter().any(|s| selecting(s)) && !all_endpoints.iter().any(|e| managed(e)) {
            wait(&changed).await;
            continue;
        }
        let by_namespace = pods_by_namespace(
            &pods,
            all_services.iter().filter(|s| selecting(s)).map(|s| s.metadata.namespace.as_deref().unwrap_or_default()),
        );
        let key =
            |meta: &ObjectMeta| (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default());
        let existing: HashMap<(String, String), Arc<Endpoints>> =
            all_endpoints.into_iter().map(|e| (key(&e.metadata), e)).collect();
        let mut slices_of: HashMap<(String, String), Vec<Arc<EndpointSlice>>> = HashMap::new();
        for slice in slices.state() {
            let labels = slice.metadata.labels.clone().unwrap_or_default();
            if labels.get(MANAGED_BY).map(String::as_str) == Some(CONTROLLER)
                && let Some(service) = labels.get(SERVICE_NAME)
            {
                let namespace = slice.metadata.namespace.clone().unwrap_or_default();
                slices_of.entry((namespace, service.clone())).or_default().push(slice);
            }
        }
        let mut work = Vec::new();
        for service in &all_services {
            let id = key(&service.metadata);
            let empty = Vec::new();
            let Some(desired) = endpoints::desired(service, by_namespace.get(id.0.as_str()).unwrap_or(&empty)) else {
                continue;
            };
            let mut current = slices_of.remove(&id).unwrap_or_default();
            current.sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
            work.push((service.clone(), desired, existing.get(&id).cloned(), current));
        }
        // Endpoints we made whose Service is gone.
        let services_by_key: std::collections::HashSet<(String, String)> =
            all_services.iter().map(|s| key(&s.metadata)).collect();
        let orphans: Vec<Arc<Endpoints>> = existing
            .values()
            .filter(|e| e.metadata.labels.as_ref().and_then(|l| l.get(SKIP_MIRROR)).map(String::as_str) == Some("true"))
            .filter(|e| !services_by_key.contains(&key(&e.metadata)))
            .cloned()
            .collect();
        let client = &client;
        futures::stream::iter(work)
            .for_each_concurrent(PARALLEL, |(service, desired, current, slices)| async move {
                if let Err(error) = apply(client, &service, desired, current, slices).await {
                    tracing::debug!(%error, service = ?service.metadata.name, "could not update endpoints");
                }
            })
            .await;
        for orphan in orphans {
            let api: Api<Endpoints> =
                Api::namespaced(client.clone(), orphan.metadata.namespace.as_deref().unwrap_or_default());
            let name = orphan.metadata.name.clone().unwrap_or_default();
            if let Err(error) = delete_if_there(&api, &name, &DeleteParams::default()).await {
                tracing::debug!(%error, endpoints = name, "could not delete endpoints");
            }
        }
        wait(&changed).await;
    }
}

fn labels_for(service: &Service, extra: &[(&str, &str)]) -> BTreeMap<String, String> {
    let mut labels = service.metadata.labels.clone().unwrap_or_default();
    for (k, v) in extra {
        labels.insert(k.to_string(), v.to_string());
    }
    labels
}

async fn apply(
    client: &kube::Client,
    service: &Service,
    desired: Desired,
    current: Option<Arc<Endpoints>>,
    slices: Vec<Arc<EndpointSlice>>,
) -> kube::Result<()> {
    let namespace = service.metadata.namespace.clone().unwrap_or_default();
    let name = service.metadata.name.clone().unwrap_or_default();
    // Endpoints
    let api: Api<Endpoints> = Api::namespaced(client.clone(), &namespace);
    let labels = labels_for(service, &[(SKIP_MIRROR, "true")]);
    let subsets = Some(desired.subsets).filter(|s| !s.is_empty());
    let wanted = Endpoints {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: Some(namespace.clone()),
            labels: Some(labels.clone()),
            resource_version: current.as_ref().and_then(|c| c.metadata.resource_version.clone()),
            ..Default::default()
        },
        subsets,
    };
    match &current {
        None => match api.create(&PostParams::default(), &wanted).await {
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            other => {
                other?;
            }
        },
        Some(current) if current.subsets != wanted.subsets || current.metadata.labels.as_ref() != Some(&labels) => {
            let mut updated = (**current).clone();
            updated.subsets = wanted.subsets;
            updated.metadata.labels = Some(labels);
            api.replace(&name, &PostParams::default(), &updated).await?;
        }
        Some(_) => {}
    }
    // EndpointSlices: the i-th desired slice goes into the i-th existing one.
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &namespace);
    let labels = labels_for(service, &[(SERVICE_NAME, &name), (MANAGED_BY, CONTROLLER)]);
    let owner = k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        api_version: "v1".into(),
        kind: "Service".into(),
        name: name.clone(),
        uid: service.metadata.uid.clone().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: Some(true),
    };
    let wanted = desired.slices.len();
    for (index, slice) in desired.slices.into_iter().enumerate() {
        let ports = Some(slice.ports).filter(|p| !p.is_empty());
        match slices.get(index) {
            Some(existing)
                if existing.address_type == slice.address_type
                    && existing.endpoints == slice.endpoints
                    && existing.ports == ports
                    && existing.metadata.labels.as_ref() == Some(&labels) => {}
            Some(existing) => {
                let mut updated = (**existing).clone();
                updated.address_type = slice.address_type;
                updated.endpoints = slice.endpoints;
                updated.ports = ports;
                updated.metadata.labels = Some(labels.clone());
                api.replace(existing.metadata.name.as_deref().unwrap_or_default(), &PostParams::default(), &updated)
                    .await?;
            }
            None => {
                let new = EndpointSlice {
                    metadata: ObjectMeta {
                        generate_name: Some(format!("{name}-")),
                        namespace: Some(namespace.clone()),
                        labels: Some(labels.clone()),
                        owner_references: Some(vec![owner.clone()]),
                        ..Default::default()
                    },
                    address_type: slice.address_type,
                    endpoints: slice.endpoints,
                    ports,
                };
                api.create(&PostParams::default(), &new).await?;
            }
        }
    }
    for extra in slices.iter().skip(wanted) {
        delete_if_there(&api, extra.metadata.name.as_deref().unwrap_or_default(), &DeleteParams::default()).await?;
    }
    Ok(())
}

/// The label upstream's mirroring controller puts on the EndpointSlices it makes.
const MIRRORING: &str = "endpointslicemirroring-controller.k8s.io";

/// The EndpointSlice mirroring controller: the Endpoints a user writes for a Service without
/// a selector (and without `endpointslice.kubernetes.io/skip-mirror`) appear as EndpointSlices
/// too — one per subset, owned by the Endpoints — so that whatever reads slices (the service
/// proxy, DNS) sees them; updated with them, gone with them.
pub(super) async fn run_mirroring(client: kube::Client, hub: Arc<Hub>) -> anyhow::Result<()> {
    use k8s_openapi::api::discovery::v1::{Endpoint, EndpointConditions, EndpointPort};
    let changed = Arc::new(Notify::new());
    let services = hub.watch::<Service>(&changed);
    let endpoints = hub.watch::<Endpoints>(&changed);
    let slices = hub.watch::<EndpointSlice>(&changed);
    services.wait_until_ready().await;
    endpoints.wait_until_ready().await;
    slices.wait_until_ready().await;
    tracing::info!("endpointslice mirroring controller started");
    loop {
        let key =
            |meta: &ObjectMeta| (meta.namespace.clone().unwrap_or_default(), meta.name.clone().unwrap_or_default());
        let selectorless: std::collections::HashSet<(String, String)> = services
            .state()
            .iter()
            .filter(|s| s.spec.as_ref().and_then(|s| s.selector.as_ref()).is_none_or(|s| s.is_empty()))
            .map(|s| key(&s.metadata))
            .collect();
        let mut mirrored: HashMap<(String, String), Vec<Arc<EndpointSlice>>> = HashMap::new();
        for slice in slices.state() {
            let labels = slice.metadata.labels.clone().unwrap_or_default();
            if labels.get(MANAGED_BY).map(String::as_str) == Some(MIRRORING)
                && let Some(service) = labels.get(SERVICE_NAME)
            {
                let namespace = slice.metadata.namespace.clone().unwrap_or_default();
                mirrored.entry((namespace, service.clone())).or_default().push(slice);
            }
        }
        for e in endpoints.state() {
            let id = key(&e.metadata);
            let skip = e.metadata.labels.as_ref().and_then(|l| l.get(SKIP_MIRROR)).map(String::as_str) == Some("true");
            if skip || !selectorless.contains(&id) || e.metadata.deletion_timestamp.is_some() {
                continue;
            }
            let (namespace, name) = id.clone();
            let mut labels = e.metadata.labels.clone().unwrap_or_default();
            labels.insert(SERVICE_NAME.into(), name.clone());
            labels.insert(MANAGED_BY.into(), MIRRORING.into());
            let owner = k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                api_version: "v1".into(),
                kind: "Endpoints".into(),
                name: name.clone(),
                uid: e.metadata.uid.clone().unwrap_or_default(),
                controller: Some(true),
                block_owner_deletion: Some(true),
            };
            let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &namespace);
            let mut existing = mirrored.remove(&id).unwrap_or_default();
            existing.sort_by_key(|s| s.metadata.name.clone());
            let subsets = e.subsets.clone().unwrap_or_default();
            for (index, subset) in subsets.iter().enumerate() {
                let endpoint = |address: &k8s_openapi::api::core::v1::EndpointAddress, ready: bool| Endpoint {
                    addresses: vec![address.ip.clone()],
                    conditions: Some(EndpointConditions {
                        ready: Some(ready),
                        serving: Some(ready),
                        terminating: None,
                    }),
                    hostname: address.hostname.clone(),
                    node_name: address.node_name.clone(),
                    target_ref: address.target_ref.clone(),
                    ..Default::default()
                };
                let endpoints: Vec<Endpoint> = subset
                    .addresses
                    .iter()
                    .flatten()
                    .map(|a| endpoint(a, true))
                    .chain(subset.not_ready_addresses.iter().flatten().map(|a| endpoint(a, false)))
                    .collect();
                let ports: Vec<EndpointPort> = subset
                    .ports
                    .iter()
                    .flatten()
                    .map(|p| EndpointPort {
                        name: Some(p.name.clone().unwrap_or_default()),
                        port: Some(p.port),
                        protocol: Some(p.protocol.clone().unwrap_or_else(|| "TCP".into())),
                        app_protocol: p.app_protocol.clone(),
                    })
                    .collect();
                let address_type = if endpoints.iter().any(|e| e.addresses[0].contains(':')) { "IPv6" } else { "IPv4" };
                let wanted = EndpointSlice {
                    metadata: ObjectMeta {
                        generate_name: Some(format!("{name}-")),
                        namespace: Some(namespace.clone()),
                        labels: Some(labels.clone()),
                        owner_references: Some(vec![owner.clone()]),
                        ..Default::default()
                    },
                    address_type: address_type.into(),
                    endpoints,
                    ports: Some(ports).filter(|p| !p.is_empty()),
                };
                let result = match existing.get(index) {
                    Some(old)
                        if old.endpoints == wanted.endpoints
                            && old.ports == wanted.ports
                            && old.address_type == wanted.address_type
                            && old.metadata.labels == wanted.metadata.labels =>
                    {
                        Ok(())
                    }
                    Some(old) => {
                        let mut updated = (**old).clone();
                        updated.endpoints = wanted.endpoints;
                        updated.ports = wanted.ports;
                        updated.address_type = wanted.address_type;
                        updated.metadata.labels = wanted.metadata.labels;
                        let name = old.metadata.name.clone().unwrap_or_default();
                        api.replace(&name, &PostParams::default(), &updated).await.map(|_| ())
                    }
                    None => api.create(&PostParams::default(), &wanted).await.map(|_| ()),
                };
                if let Err(error) = result {
                    tracing::debug!(%error, endpoints = name, "could not mirror endpoints");
                }
            }
            for extra in existing.iter().skip(subsets.len()) {
                let _ =
                    delete_if_there(&api, extra.metadata.name.as_deref().unwrap_or_default(), &DeleteParams::default())
                        .await;
            }
        }
        // Slices whose Endpoints are gone or no longer mirrored.
        for ((namespace, _), stale) in mirrored {
            let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &namespace);
            for slice in stale {
                let _ =
                    delete_if_there(&api, slice.metadata.name.as_deref().unwrap_or_default(), &DeleteParams::default())
                        .await;
            }
        }
        wait(&changed).await;
    }
}
