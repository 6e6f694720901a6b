//! The horizontal pod autoscaler: every 15 s (and when an autoscaler changes), each
//! HorizontalPodAutoscaler's target (a Deployment, ReplicaSet or StatefulSet, or any resource
//! with a `/scale` subresource — a custom resource's — whose Scale names its pods by
//! `status.selector`) is scaled to what its pods' usage asks for (`metrics.k8s.io`, as upstream
//! reads it from metrics-server), and kept within the autoscaler's bounds; its status says
//! what was seen.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, ReplicaSet, StatefulSet};
use k8s_openapi::api::autoscaling::v2::{CrossVersionObjectReference, HorizontalPodAutoscaler, MetricSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::{Value, json};
use tokio::sync::Notify;

use super::{Hub};
use crate::autoscaler;
use crate::pods::{is_ready, selector_matches};
use tugboat_objects::labels::Selector;

/// `--horizontal-pod-autoscaler-sync-period`.
const SYNC: Duration = Duration::from_secs(15);
/// `--horizontal-pod-autoscaler-downscale-stabilization` (a spec's behavior may say otherwise).
const DOWNSCALE_WINDOW: Duration = Duration::from_secs(300);

type Recommendations = HashMap<(String, String), Vec<(Instant, i32)>>;

pub(super) async fn run_autoscalers(client: kube::Client, hub: Arc<Hub>) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let autoscalers = hub.watch::<HorizontalPodAutoscaler>(&changed);
    // Pods change all the time: read on the autoscalers' schedule, not woken by them.
    let pods = hub.watch::<Pod>(&Arc::new(Notify::new()));
    autoscalers.wait_until_ready().await;
    pods.wait_until_ready().await;
    tracing::info!("horizontal pod autoscaler started");
    let mut history = Recommendations::new();
    loop {
        let all_pods = pods.state();
        // PodMetrics per namespace, read once per pass however many autoscalers it has.
        let mut metrics = HashMap::new();
        for hpa in autoscalers.state() {
            if let Err(error) = reconcile(&client, &hpa, &all_pods, &mut metrics, &mut history).await {
                tracing::debug!(error = %format!("{error:#}"), "horizontal pod autoscaler");
            }
        }
        let _ = tokio::time::timeout(SYNC, changed.notified()).await;
    }
}

/// What one metric came to: its status entry and the replicas it asks for.
struct Reading {
    status: Value,
    replicas: i32,
}

/// A quantity of `resource` as the autoscaler adds them up: millicores for cpu, else units.
fn amount(resource: &str, quantity: &str) -> i64 {
    if resource == "cpu" {
        tugboat_objects::quantity::millicores(quantity)
    } else {
        tugboat_objects::quantity::units(quantity)
    }
}

/// The summed container requests of `resource`.
fn requests(pod: &Pod, resource: &str) -> i64 {
    pod.spec
        .iter()
        .flat_map(|s| s.containers.iter())
        .filter_map(|c| c.resources.as_ref()?.requests.as_ref()?.get(resource))
        .map(|q| amount(resource, &q.0))
        .sum()
}

/// A pod's usage of `resource` from its PodMetrics (millicores, or bytes).
fn usage(metrics: &DynamicObject, resource: &str) -> i64 {
    metrics.data["containers"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|c| c["usage"][resource].as_str())
        .map(|q| amount(resource, q))
        .sum()
}

fn read(metric: &MetricSpec, current: i32, pods: &[&Pod], metrics: &HashMap<String, DynamicObject>) -> Option<Reading> {
    let spec = metric.resource.as_ref().filter(|_| metric.type_ == "Resource")?;
    let resource = spec.name.as_str();
    // Ready pods with a reading count (upstream also leaves out the not-yet-ready ones).
    let counted: Vec<(&Pod, &DynamicObject)> = pods
        .iter()
        .filter(|p| is_ready(p))
        .filter_map(|p| Some((*p, metrics.get(p.metadata.name.as_deref()?)?)))
        .collect();
    let ready = i32::try_from(counted.len()).ok()?;
    let used: i64 = counted.iter().map(|(_, m)| usage(m, resource)).sum();
    let format = |value: i64| if resource == "cpu" { format!("{value}m") } else { value.to_string() };
    if let Some(percent) = spec.target.average_utilization {
        let requested: i64 = counted.iter().map(|(p, _)| requests(p, resource)).sum();
        let (replicas, utilization) =
            autoscaler::replicas_for(current, ready, used, Some(requested), i64::from(percent))?;
        let average = used / i64::from(ready.max(1));
        let status = json!({"type": "Resource", "resource": {"name": resource,
            "current": {"averageUtilization": utilization, "averageValue": format(average)}}});
        return Some(Reading { status, replicas });
    }
    let target = spec.target.average_value.as_ref()?;
    let target = amount(resource, &target.0);
    let (replicas, average) = autoscaler::replicas_for(current, ready, used, None, target)?;
    let status =
        json!({"type": "Resource", "resource": {"name": resource, "current": {"averageValue": format(average)}}});
    Some(Reading { status, replicas })
}

/// Which pods a target's replicas are: its spec's selector, or the text of its Scale's.
enum PodSelector {
    Spec(LabelSelector),
    Scale(Selector),
}

impl PodSelector {
    fn matches(&self, pod: &Pod) -> bool {
        match self {
            PodSelector::Spec(selector) => selector_matches(selector, pod.metadata.labels.as_ref()),
            PodSelector::Scale(selector) => {
                let labels = pod.metadata.labels.as_ref();
                selector.matches_with(|key| labels.and_then(|l| l.get(key)).map(String::as_str))
            }
        }
    }
}

/// The target's replicas and selector, and an API for its scale.
async fn target(
    client: &kube::Client,
    namespace: &str,
    reference: &CrossVersionObjectReference,
) -> anyhow::Result<(
    i32,
    PodSelector,
    Box<dyn Fn(i32) -> futures::future::BoxFuture<'static, kube::Result<()>> + Send>,
)> {
    fn scaler<K>(
        api: Api<K>,
        name: String,
    ) -> Box<dyn Fn(i32) -> futures::future::BoxFuture<'static, kube::Result<()>> + Send>
    where
        K: Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
    {
        Box::new(move |replicas| {
            let (api, name) = (api.clone(), name.clone());
            Box::pin(async move {
                let patch = json!({"spec": {"replicas": replicas}});
                api.patch_scale(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
            })
        })
    }
    let name = reference.name.clone();
    let api_version = reference.api_version.as_deref().unwrap_or("v1");
    let (group, version) = api_version.rsplit_once('/').unwrap_or(("", api_version));
    match (group, reference.kind.as_str()) {
        ("apps", "Deployment") => {
            let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
            let d = api.get(&name).await?;
            let spec = d.spec.unwrap_or_default();
            Ok((spec.replicas.unwrap_or(1), PodSelector::Spec(spec.selector), scaler(api, name)))
        }
        ("apps", "ReplicaSet") => {
            let api: Api<ReplicaSet> = Api::namespaced(client.clone(), namespace);
            let r = api.get(&name).await?;
            let spec = r.spec.unwrap_or_default();
            Ok((spec.replicas.unwrap_or(1), PodSelector::Spec(spec.selector), scaler(api, name)))
        }
        ("apps", "StatefulSet") => {
            let api: Api<StatefulSet> = Api::namespaced(client.clone(), namespace);
            let s = api.get(&name).await?;
            let spec = s.spec.unwrap_or_default();
            Ok((spec.replicas.unwrap_or(1), PodSelector::Spec(spec.selector), scaler(api, name)))
        }
        // Anything else through its `/scale` (upstream reads every target so): the resource
        // found by discovery, the pods by the Scale's selector.
        (group, kind) => {
            let gvk = GroupVersionKind::gvk(group, version, kind);
            let (resource, _) = kube::discovery::pinned_kind(client, &gvk).await?;
            let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), namespace, &resource);
            let scale = api.get_scale(&name).await?;
            let replicas = scale.spec.and_then(|s| s.replicas).unwrap_or(0);
            let text = scale.status.and_then(|s| s.selector).unwrap_or_default();
            if text.is_empty() {
                anyhow::bail!("the {kind} {name:?} has no selector in its scale (its labelSelectorPath)");
            }
            let selector = Selector::parse(&text).map_err(anyhow::Error::msg)?;
            Ok((replicas, PodSelector::Scale(selector), scaler(api, name)))
        }
    }
}

fn condition(kind: &str, status: bool, reason: &str, message: &str) -> Value {
    json!({"type": kind, "status": if status { "True" } else { "False" }, "reason": reason, "message": message,
           "lastTransitionTime": jiff::Timestamp::now().to_string()})
}

async fn reconcile(
    client: &kube::Client,
    hpa: &HorizontalPodAutoscaler,
    all_pods: &[Arc<Pod>],
    metrics_by_namespace: &mut HashMap<String, HashMap<String, DynamicObject>>,
    history: &mut Recommendations,
) -> anyhow::Result<()> {
    let namespace = hpa.metadata.namespace.clone().unwrap_or_else(|| "default".into());
    let name = hpa.metadata.name.clone().unwrap_or_default();
    let Some(spec) = &hpa.spec else { return Ok(()) };
    let api: Api<HorizontalPodAutoscaler> = Api::namespaced(client.clone(), &namespace);
    let existing = serde_json::to_value(&hpa.status).unwrap_or(Value::Null);
    let status_patch = |mut status: Value| {
        // A condition keeps its transition time while its status holds; a status that says
        // what it said is not written again.
        for condition in status["conditions"].as_array_mut().into_iter().flatten() {
            let before = existing["conditions"].as_array().into_iter().flatten();
            if let Some(old) =
                before.into_iter().find(|o| o["type"] == condition["type"] && o["status"] == condition["status"])
            {
                condition["lastTransitionTime"] = old["lastTransitionTime"].clone();
            }
        }
        let unchanged = status.as_object().is_some_and(|m| m.iter().all(|(k, v)| existing[k] == *v));
        let api = api.clone();
        let name = name.clone();
        async move {
            if unchanged {
                return Ok(());
            }
            let patch = json!({"status": status});
            api.patch_status(&name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(|_| ())
        }
    };
    let reference = &spec.scale_target_ref;
    let (current, selector, scale) = match target(client, &namespace, reference).await {
        Ok(found) => found,
        Err(error) => {
            let message = format!("the HPA controller was unable to get the target's current scale: {error:#}");
            status_patch(json!({"conditions": [condition("AbleToScale", false, "FailedGetScale", &message)]})).await?;
            return Ok(());
        }
    };
    let pods: Vec<&Pod> = all_pods
        .iter()
        .map(|p| &**p)
        .filter(|p| p.metadata.namespace.as_deref() == Some(namespace.as_str()))
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .filter(|p| selector.matches(p))
        .collect();
    let resource =
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk("metrics.k8s.io", "v1beta1", "PodMetrics"), "pods");
    if !metrics_by_namespace.contains_key(&namespace) {
        let listed = match Api::<DynamicObject>::namespaced_with(client.clone(), &namespace, &resource)
            .list(&Default::default())
            .await
        {
            Ok(list) => list.items.into_iter().filter_map(|m| Some((m.metadata.name.clone()?, m))).collect(),
            Err(_) => HashMap::new(),
        };
        metrics_by_namespace.insert(namespace.clone(), listed);
    }
    let metrics = &metrics_by_namespace[&namespace];
    let (min, max) = (spec.min_replicas.unwrap_or(1), spec.max_replicas);
    let readings: Vec<Reading> =
        spec.metrics.iter().flatten().filter_map(|m| read(m, current, &pods, metrics)).collect();
    let key = (namespace.clone(), name.clone());
    if current == 0 {
        // Scaled to zero by hand: autoscaling is off until it is scaled up again.
        let off = condition(
            "ScalingActive",
            false,
            "ScalingDisabled",
            "scaling is disabled since the replica count of the target is zero",
        );
        status_patch(json!({"currentReplicas": 0, "desiredReplicas": 0, "conditions": [off]})).await?;
        return Ok(());
    }
    if readings.is_empty() && (current < min || current > max) {
        // Out of the autoscaler's bounds: brought back whatever the metrics (upstream's
        // "Current number of replicas below Spec.MinReplicas").
        let (desired, reason, why) = if current < min {
            (min, "TooFewReplicas", "Current number of replicas below Spec.MinReplicas")
        } else {
            (max, "TooManyReplicas", "Current number of replicas above Spec.MaxReplicas")
        };
        scale(desired).await?;
        tracing::info!(hpa = %name, namespace = %namespace, from = current, to = desired, "autoscaled to its bounds");
        let message = format!("New size: {desired}; reason: {why}");
        super::event(client, hpa, "Normal", "SuccessfulRescale", &message, "horizontal-pod-autoscaler").await;
        let conditions = [
            condition("AbleToScale", true, "SucceededRescale", "the HPA controller was able to update the target scale"),
            condition("ScalingLimited", true, reason, "the desired replica count is out of the autoscaler's bounds"),
        ];
        let status = json!({"observedGeneration": hpa.metadata.generation, "currentReplicas": current,
                            "desiredReplicas": desired, "lastScaleTime": jiff::Timestamp::now().to_string(),
                            "conditions": conditions});
        status_patch(status).await?;
        return Ok(());
    }
    let Some(recommended) = readings.iter().map(|r| r.replicas).max() else {
        let message = "the HPA was unable to compute the replica count: no ready pod has metrics or requests yet";
        let conditions = [
            condition(
                "AbleToScale",
                true,
                "SucceededGetScale",
                "the HPA controller was able to get the target's current scale",
            ),
            condition("ScalingActive", false, "FailedGetResourceMetric", message),
        ];
        let status = json!({"observedGeneration": hpa.metadata.generation, "currentReplicas": current,
                            "desiredReplicas": current, "conditions": conditions});
        status_patch(status).await?;
        return Ok(());
    };
    // Recommendations of the stabilization window, this one included.
    let window = spec
        .behavior
        .as_ref()
        .and_then(|b| b.scale_down.as_ref())
        .and_then(|d| d.stabilization_window_seconds)
        .map(|s| Duration::from_secs(u64::try_from(s).unwrap_or(0)))
        .unwrap_or(DOWNSCALE_WINDOW);
    let now = Instant::now();
    let kept = history.entry(key).or_default();
    kept.retain(|(at, _)| now.duration_since(*at) <= window);
    kept.push((now, recommended.clamp(min, max.max(min))));
    let highest = kept.iter().map(|(_, r)| *r).max().unwrap_or(recommended);
    let desired = autoscaler::bounded(current, recommended, highest, min, max);
    let mut status = json!({
        "observedGeneration": hpa.metadata.generation,
        "currentReplicas": current,
        "desiredReplicas": desired,
        "currentMetrics": readings.iter().map(|r| r.status.clone()).collect::<Vec<_>>(),
    });
    if desired != current {
        scale(desired).await?;
        status["lastScaleTime"] = json!(jiff::Timestamp::now().to_string());
        tracing::info!(hpa = %name, namespace = %namespace, from = current, to = desired, "autoscaled");
        // Upstream's words, which `kubectl describe hpa` shows.
        let why = if desired > current { "above target" } else { "All metrics below target" };
        let resource =
            spec.metrics.iter().flatten().find_map(|m| m.resource.as_ref()).map_or("cpu", |r| r.name.as_str());
        let message = if desired > current {
            format!("New size: {desired}; reason: {resource} resource utilization (percentage of request) {why}")
        } else {
            format!("New size: {desired}; reason: {why}")
        };
        super::event(client, hpa, "Normal", "SuccessfulRescale", &message, "horizontal-pod-autoscaler").await;
    }
    let limited = recommended != desired && (desired == min || desired == max);
    status["conditions"] = json!([
        condition("AbleToScale", true, "SucceededRescale", "the HPA controller was able to update the target scale"),
        condition(
            "ScalingActive",
            true,
            "ValidMetricFound",
            "the HPA was able to successfully calculate a replica count"
        ),
        condition(
            "ScalingLimited",
            limited,
            if limited { "TooManyReplicas" } else { "DesiredWithinRange" },
            "the desired count is within the acceptable range",
        ),
    ]);
    status_patch(status).await?;
    Ok(())
}
