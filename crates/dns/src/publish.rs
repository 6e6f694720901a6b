//! Keeps the `kube-dns` Service (at the cluster DNS address) and its Endpoints in kube-system:
//! every DNS server holds a Lease (`tugboat-dns-<address>`, renewed every 10 s) and the
//! Endpoints list the servers whose Lease is fresh, so a server that died leaves them within
//! [`LEASE_SECONDS`].

use std::net::IpAddr;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Endpoints, Service};
use kube::api::{Api, ListParams, PostParams};
use serde_json::json;

/// A DNS server's Lease lasts this long unrenewed.
pub const LEASE_SECONDS: i64 = 30;
const RENEW: Duration = Duration::from_secs(10);
const LABEL: &str = "tugboat.dev/dns-server";
const NAMESPACE: &str = "kube-system";
const NAME: &str = "kube-dns";

/// What this server publishes.
#[derive(Debug, Clone)]
pub struct Publication {
    /// The Service's ClusterIP (`--cluster-dns`).
    pub cluster_ip: IpAddr,
    /// Where this server answers.
    pub address: IpAddr,
    pub port: u16,
}

fn ports(port: u16) -> serde_json::Value {
    json!([{"name": "dns", "port": port, "protocol": "UDP"}, {"name": "dns-tcp", "port": port, "protocol": "TCP"}])
}

/// The `kube-dns` Service as kubeadm makes it (without a selector: its endpoints are ours).
pub fn service(cluster_ip: IpAddr) -> serde_json::Value {
    json!({
        "metadata": {"name": NAME, "namespace": NAMESPACE,
                     "labels": {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS", "kubernetes.io/cluster-service": "true"}},
        "spec": {"clusterIP": cluster_ip.to_string(),
                 "ports": [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53},
                           {"name": "dns-tcp", "port": 53, "protocol": "TCP", "targetPort": 53}]},
    })
}

/// Keeps the Service, this server's Lease and the Endpoints until the process ends.
pub async fn keep(client: kube::Client, publication: Publication) {
    let services: Api<Service> = Api::namespaced(client.clone(), NAMESPACE);
    let leases: Api<Lease> = Api::namespaced(client.clone(), NAMESPACE);
    let endpoints: Api<Endpoints> = Api::namespaced(client, NAMESPACE);
    let mut warned = false;
    loop {
        if let Err(error) = once(&services, &leases, &endpoints, &publication).await {
            if !warned {
                tracing::warn!(error = %format!("{error:#}"), "cluster DNS: cannot publish kube-dns");
            }
            warned = true;
        } else {
            warned = false;
        }
        tokio::time::sleep(RENEW).await;
    }
}

async fn once(
    services: &Api<Service>,
    leases: &Api<Lease>,
    endpoints: &Api<Endpoints>,
    publication: &Publication,
) -> anyhow::Result<()> {
    let create = PostParams::default();
    if services.get_opt(NAME).await?.is_none() {
        match services.create(&create, &serde_json::from_value(service(publication.cluster_ip))?).await {
            Ok(_) => tracing::info!(ip = %publication.cluster_ip, "cluster DNS: Service kube-dns made"),
            Err(kube::Error::Api(status)) if status.code == 409 => {}
            Err(error) => return Err(error.into()),
        }
    }
    let now = k8s_openapi::jiff::Timestamp::now();
    let lease_name = format!("tugboat-dns-{}", publication.address.to_string().replace(['.', ':'], "-"));
    let lease: Lease = serde_json::from_value(json!({
        "metadata": {"name": lease_name, "namespace": NAMESPACE, "labels": {LABEL: "true"}},
        "spec": {"holderIdentity": publication.address.to_string(), "leaseDurationSeconds": LEASE_SECONDS,
                 "renewTime": now.to_string()},
    }))?;
    match leases.get_opt(&lease_name).await? {
        None => {
            leases.create(&create, &lease).await?;
        }
        Some(old) => {
            let mut renewed = lease;
            renewed.metadata.resource_version = old.metadata.resource_version;
            leases.replace(&lease_name, &create, &renewed).await?;
        }
    }
    let cutoff = now.as_second() - LEASE_SECONDS;
    let mut live: Vec<String> = leases
        .list(&ListParams::default().labels(LABEL))
        .await?
        .items
        .into_iter()
        .filter(|l| l.spec.as_ref().and_then(|s| s.renew_time.as_ref()).is_some_and(|t| t.0.as_second() >= cutoff))
        .filter_map(|l| l.spec?.holder_identity)
        .collect();
    if !live.contains(&publication.address.to_string()) {
        live.push(publication.address.to_string());
    }
    live.sort();
    live.dedup();
    let addresses: Vec<serde_json::Value> = live.iter().map(|ip| json!({"ip": ip})).collect();
    let subsets = json!([{"addresses": addresses, "ports": ports(publication.port)}]);
    let mut desired: Endpoints = serde_json::from_value(json!({
        "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": {"k8s-app": "kube-dns"}},
        "subsets": subsets,
    }))?;
    match endpoints.get_opt(NAME).await? {
        None => {
            endpoints.create(&create, &desired).await?;
        }
        Some(old) if old.subsets != desired.subsets => {
            desired.metadata.resource_version = old.metadata.resource_version;
            endpoints.replace(NAME, &create, &desired).await?;
        }
        Some(_) => {}
    }
    Ok(())
}
