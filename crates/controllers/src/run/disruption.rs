//! The disruption controller's loop: every PodDisruptionBudget's status follows its pods.

use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, Patch, PatchParams};
use serde_json::json;
use tokio::sync::Notify;

use super::{Hub, PARALLEL, pods_by_namespace, wait};
use crate::disruption::{self, Health};

pub(super) async fn run_disruption(client: kube::Client, hub: Arc<Hub>) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let budgets = hub.watch::<PodDisruptionBudget>(&changed);
    let pods = hub.watch::<Pod>(&changed);
    budgets.wait_until_ready().await;
    pods.wait_until_ready().await;
    tracing::info!("disruption controller started");
    loop {
        let all_budgets = budgets.state();
        if all_budgets.is_empty() {
            wait(&changed).await;
            continue;
        }
        let by_namespace =
            pods_by_namespace(&pods, all_budgets.iter().map(|b| b.metadata.namespace.as_deref().unwrap_or_default()));
        let empty = Vec::new();
        let work: Vec<(Arc<PodDisruptionBudget>, Health)> = all_budgets
            .iter()
            .filter_map(|budget| {
                let namespace = budget.metadata.namespace.as_deref().unwrap_or_default();
                let health = disruption::health(budget, by_namespace.get(namespace).unwrap_or(&empty))?;
                (!reported(budget, health)).then_some((budget.clone(), health))
            })
            .collect();
        let client = &client;
        futures::stream::iter(work)
            .for_each_concurrent(PARALLEL, |(budget, health)| async move {
                update(client, &budget, health).await;
            })
            .await;
        wait(&changed).await;
    }
}

/// Whether the budget's status already says `health` for its current generation.
fn reported(budget: &PodDisruptionBudget, health: Health) -> bool {
    budget.status.as_ref().is_some_and(|s| {
        s.observed_generation == budget.metadata.generation
            && (s.expected_pods, s.desired_healthy, s.current_healthy, s.disruptions_allowed)
                == (health.expected, health.desired, health.current, health.allowed)
    })
}

async fn update(client: &kube::Client, budget: &PodDisruptionBudget, health: Health) {
    let namespace = budget.metadata.namespace.as_deref().unwrap_or("default");
    let name = budget.metadata.name.as_deref().unwrap_or_default();
    let (status, reason) = if health.allowed > 0 { ("True", "SufficientPods") } else { ("False", "InsufficientPods") };
    let since = budget
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "DisruptionAllowed" && c.status == status))
        .map(|c| c.last_transition_time.0)
        .unwrap_or_else(jiff::Timestamp::now);
    let patch = json!({"status": {
        "observedGeneration": budget.metadata.generation,
        "expectedPods": health.expected,
        "desiredHealthy": health.desired,
        "currentHealthy": health.current,
        "disruptionsAllowed": health.allowed,
        "conditions": [{"type": "DisruptionAllowed", "status": status, "reason": reason, "message": "",
                        "observedGeneration": budget.metadata.generation, "lastTransitionTime": since}],
    }});
    let api: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), namespace);
    if let Err(error) = api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)).await {
        tracing::debug!(%error, budget = name, "could not update the disruption budget's status");
    }
}
