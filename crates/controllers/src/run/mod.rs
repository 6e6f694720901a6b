//! The controller manager's loops. Controllers share one reflector per kind (the informers in
//! [`Hub`]), and each has its own wake-up: a burst of changes triggers one pass over every
//! object it controls (level-driven: a pass converges from whatever it observes, so restarts
//! and missed events do not matter). Passes apply their plans through the API, a bounded number
//! of writes at a time.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams};
use tugboat_objects::informer::{Informers, Shared, Store};
use tokio::sync::Notify;

use crate::nodeipam::Cidr;

mod autoscaling;
mod bootstrap;
mod certificates;
mod disruption;
mod gc;
mod history;
mod namespaces;
mod nodes;
mod quota;
mod servicelb;
mod services;
mod volumes;
mod workloads;

/// What the controllers are told by flags.
#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// A node silent this long is Ready=Unknown (`--node-monitor-grace-period`, 40 s).
    pub node_monitor_grace_period: Duration,
    /// Pod CIDRs for nodes come from here (`--cluster-cidr`, 10.244.0.0/16).
    pub cluster_cidr: Cidr,
    /// Each node's pod CIDR prefix (`--node-cidr-mask-size`, 24).
    pub node_cidr_mask_size: u8,
    /// The cluster CA (PEM), published in every namespace as ConfigMap `kube-root-ca.crt`.
    pub root_ca: Option<String>,
    /// The CA that signs approved certificate requests (`--cluster-signing-cert-file` and
    /// `-key-file`); without it nothing is signed.
    pub signing_ca: Option<Arc<tugboat_pki::ClusterCa>>,
    /// The longest validity of a signed certificate (`--cluster-signing-duration`, 1 year).
    pub signing_duration: Duration,
    /// Opens a client on a connection of its own that many watches can share (HTTP/2): the
    /// garbage collector watches every custom kind, and a thousand HTTP/1.1 watches would be a
    /// thousand TLS connections (~90 KiB each, both ends). Without it, the main client.
    pub connect: Option<Connect>,
    /// The process's informers, shared with its other components (the scheduler); without
    /// them, the controller manager's own.
    pub informers: Option<Arc<Informers>>,
}

/// See [`ControllerConfig::connect`].
#[derive(Clone)]
pub struct Connect(
    pub Arc<dyn Fn() -> futures::future::BoxFuture<'static, anyhow::Result<kube::Client>> + Send + Sync>,
);

impl std::fmt::Debug for Connect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Connect")
    }
}

impl Default for ControllerConfig {
    fn default() -> Self {
        ControllerConfig {
            node_monitor_grace_period: Duration::from_secs(40),
            cluster_cidr: "10.244.0.0/16".parse().expect("a valid CIDR"),
            node_cidr_mask_size: 24,
            root_ca: None,
            signing_ca: None,
            signing_duration: Duration::from_secs(365 * 24 * 3600),
            connect: None,
            informers: None,
        }
    }
}

/// How long a pass waits after a change for the changes that come with it.
const COALESCE: Duration = Duration::from_millis(5);
/// Writes in flight at once per controller.
const PARALLEL: usize = 32;
/// A pass also runs this often without changes (time-based conditions such as minReadySeconds).
const RESYNC: Duration = Duration::from_secs(30);

/// A kind the shared informers can hold: a typed Kubernetes object (or its metadata alone).
pub(crate) trait Watched:
    kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
}

impl<K> Watched for K where
    K: kube::Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
}

/// The pods of each of `namespaces` (what selector-driven controllers match against): only
/// those namespaces' pods are looked at, not every pod of the cluster.
fn pods_by_namespace<'a>(
    pods: &Store<Pod>,
    namespaces: impl IntoIterator<Item = &'a str>,
) -> HashMap<&'a str, Vec<Arc<Pod>>> {
    let mut by_namespace = HashMap::new();
    for namespace in namespaces {
        by_namespace.entry(namespace).or_insert_with(|| pods.in_namespace(namespace));
    }
    by_namespace
}

/// The shared informers: the first controller to ask for a kind starts its reflector (every
/// namespace), later ones share its cache and are woken by its changes too. The informers
/// may be the process's (`ControllerConfig::informers`: in `tugboat server` the scheduler reads
/// the same pods and nodes).
pub(crate) struct Hub {
    informers: Arc<Informers>,
}

impl Hub {
    fn new(informers: Arc<Informers>) -> Hub {
        Hub { informers }
    }

    /// The cache of every `K`, whose changes wake `wake` (a controller that looks on its own
    /// schedule passes a Notify nobody waits on).
    fn watch<K>(&self, wake: &Arc<Notify>) -> Store<K>
    where
        K: Watched,
    {
        let shared = self.informers.of::<K>();
        shared.wake_on_change(wake.clone());
        shared.store()
    }
}

/// A reflector whose changes wake `wake` (for a kind known at run time, a `DynamicObject` —
/// or only its metadata, `PartialObjectMeta<DynamicObject>`).
pub(super) fn reflect<K>(api: Api<K>, wake: &Arc<Notify>) -> Store<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    let shared = Shared::start(api, kube::runtime::watcher::Config::default(), std::any::type_name::<K>());
    shared.wake_on_change(wake.clone());
    shared.store()
}

/// Waits for a change (or the resync), then for the changes that come with it.
async fn wait(changed: &Notify) {
    wait_until(changed, None).await
}

/// The same, but also wakes at `at` (a backoff, deadline or schedule ending) if that is sooner.
async fn wait_until(changed: &Notify, at: Option<jiff::Timestamp>) {
    let mut timeout = RESYNC;
    if let Some(at) = at {
        let left = at.duration_since(jiff::Timestamp::now());
        let left = Duration::try_from(left).unwrap_or(Duration::ZERO);
        timeout = timeout.min(left + Duration::from_millis(10));
    }
    let _ = tokio::time::timeout(timeout, changed.notified()).await;
    tokio::time::sleep(COALESCE).await;
}

/// Posts an event about `object` (see `kubectl describe`).
async fn event<K: kube::Resource<DynamicType = ()>>(
    client: &kube::Client,
    object: &K,
    kind: &str,
    reason: &str,
    message: &str,
    component: &str,
) {
    let regarding = tugboat_objects::events::reference(object);
    tugboat_objects::events::record(client, &regarding, kind, reason, message, reason, component).await;
}

/// A delete that is done when the object is already gone.
async fn delete_if_there<K>(api: &Api<K>, name: &str, params: &DeleteParams) -> kube::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, params).await {
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        other => other.map(|_| ()),
    }
}

/// A create that is done when the object already exists.
async fn create_if_missing<K>(api: &Api<K>, object: &K) -> kube::Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    match api.create(&kube::api::PostParams::default(), object).await {
        Err(kube::Error::Api(status)) if status.code == 409 => Ok(()),
        other => other.map(|_| ()),
    }
}

/// Runs every controller until one of them fails for good.
pub async fn run(client: kube::Client, config: ControllerConfig) -> anyhow::Result<()> {
    let informers = config.informers.clone().unwrap_or_else(|| Arc::new(Informers::new(client.clone())));
    let hub = Arc::new(Hub::new(informers));
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(nodes::run_node_lifecycle(client.clone(), hub.clone(), config.clone()));
    tasks.spawn(nodes::run_node_ipam(client.clone(), hub.clone(), config.clone()));
    tasks.spawn(nodes::run_pod_gc(client.clone(), hub.clone(), config.clone()));
    tasks.spawn(workloads::run_replicasets::<k8s_openapi::api::apps::v1::ReplicaSet>(client.clone(), hub.clone()));
    tasks.spawn(workloads::run_replicasets::<k8s_openapi::api::core::v1::ReplicationController>(
        client.clone(),
        hub.clone(),
    ));
    tasks.spawn(workloads::run_deployments(client.clone(), hub.clone()));
    tasks.spawn(workloads::run_daemonsets(client.clone(), hub.clone()));
    tasks.spawn(workloads::run_statefulsets(client.clone(), hub.clone()));
    tasks.spawn(history::run_history(client.clone(), hub.clone()));
    tasks.spawn(workloads::run_jobs(client.clone(), hub.clone()));
    tasks.spawn(workloads::run_cronjobs(client.clone(), hub.clone()));
    tasks.spawn(services::run_endpoints(client.clone(), hub.clone()));
    tasks.spawn(services::run_mirroring(client.clone(), hub.clone()));
    tasks.spawn(namespaces::run_namespaces(client.clone(), hub.clone()));
    tasks.spawn(namespaces::run_service_accounts(client.clone(), hub.clone()));
    if let Some(ca) = config.root_ca.clone() {
        tasks.spawn(namespaces::run_root_ca_publisher(client.clone(), hub.clone(), ca));
    }
    tasks.spawn(disruption::run_disruption(client.clone(), hub.clone()));
    tasks.spawn(quota::run_quotas(client.clone(), hub.clone()));
    tasks.spawn(autoscaling::run_autoscalers(client.clone(), hub.clone()));
    tasks.spawn(volumes::run_volumes(client.clone(), hub.clone()));
    tasks.spawn(servicelb::run_service_lb(client.clone(), hub.clone()));
    tasks.spawn(bootstrap::run_bootstrap_signer(client.clone()));
    if let Some(ca) = config.signing_ca.clone() {
        tasks.spawn(certificates::run_certificates(client.clone(), ca, config.signing_duration));
    }
    tasks.spawn(gc::run_garbage_collector(client.clone(), hub.clone(), config.connect.clone()));
    match tasks.join_next().await {
        Some(result) => result?,
        None => Ok(()),
    }
}
