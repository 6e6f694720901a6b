//! The persistent volume controller's loop: binds claims, provisions `local-path` volumes and
//! reclaims volumes whose claim is gone ([`crate::volumes::plan`]).

use std::sync::Arc;

use k8s_openapi::api::core::v1::{PersistentVolume, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;
use tokio::sync::Notify;

use super::{Hub, event, wait};
use crate::volumes::{Action, plan};

pub(super) async fn run_volumes(client: kube::Client, hub: Arc<Hub>) -> anyhow::Result<()> {
    let changed = Arc::new(Notify::new());
    let claims = hub.watch::<PersistentVolumeClaim>(&changed);
    let volumes = hub.watch::<PersistentVolume>(&changed);
    let classes = hub.watch::<StorageClass>(&changed);
    let pods = hub.watch::<Pod>(&changed);
    claims.wait_until_ready().await;
    volumes.wait_until_ready().await;
    classes.wait_until_ready().await;
    pods.wait_until_ready().await;
    tracing::info!("persistent volume controller started");
    // Claims already told they wait (an event once, not every pass).
    let mut told: std::collections::HashSet<(String, String)> = Default::default();
    loop {
        let (c, v, s, p) = (claims.state(), volumes.state(), classes.state(), pods.state());
        let actions = plan(&refs(&c), &refs(&v), &refs(&s), &refs(&p));
        let claim = |namespace: &str, name: &str| {
            c.iter()
                .find(|c| {
                    c.metadata.namespace.as_deref() == Some(namespace) && c.metadata.name.as_deref() == Some(name)
                })
                .cloned()
        };
        for action in actions {
            // Upstream's events, which `kubectl describe pvc` shows.
            match &action {
                Action::Waiting { namespace, claim: name } => {
                    if told.insert((namespace.clone(), name.clone()))
                        && let Some(claim) = claim(namespace, name)
                    {
                        let message = "waiting for first consumer to be created before binding";
                        event(
                            &client,
                            &*claim,
                            "Normal",
                            "WaitForFirstConsumer",
                            message,
                            "persistentvolume-controller",
                        )
                        .await;
                    }
                    continue;
                }
                Action::Provision(volume) => {
                    let (namespace, name) =
                        (volume["spec"]["claimRef"]["namespace"].as_str(), volume["spec"]["claimRef"]["name"].as_str());
                    if let (Some(namespace), Some(name)) = (namespace, name)
                        && let Some(claim) = claim(namespace, name)
                        && apply(&client, &action).await.is_ok()
                    {
                        let message = format!(
                            "Successfully provisioned volume {} using {}",
                            volume["metadata"]["name"].as_str().unwrap_or_default(),
                            crate::volumes::LOCAL_PATH
                        );
                        event(
                            &client,
                            &*claim,
                            "Normal",
                            "ProvisioningSucceeded",
                            &message,
                            crate::volumes::LOCAL_PATH,
                        )
                        .await;
                    }
                    continue;
                }
                _ => {}
            }
            if let Err(error) = apply(&client, &action).await {
                tracing::debug!(?action, %error, "persistent volume controller");
            }
        }
        wait(&changed).await;
    }
}

fn refs<K>(all: &[Arc<K>]) -> Vec<&K> {
    all.iter().map(|o| &**o).collect()
}

async fn apply(client: &kube::Client, action: &Action) -> kube::Result<()> {
    let volumes: Api<PersistentVolume> = Api::all(client.clone());
    let status = |phase: &str| json!({"status": {"phase": phase}});
    match action {
        Action::Provision(volume) => {
            let volume: PersistentVolume = serde_json::from_value(volume.clone()).map_err(kube::Error::SerdeError)?;
            volumes.create(&PostParams::default(), &volume).await.map(|_| ())
        }
        Action::Available(name) => {
            volumes.patch_status(name, &PatchParams::default(), &Patch::Merge(&status("Available"))).await.map(|_| ())
        }
        Action::Release(name) => {
            volumes.patch_status(name, &PatchParams::default(), &Patch::Merge(&status("Released"))).await.map(|_| ())
        }
        Action::Delete(name) => volumes.delete(name, &DeleteParams::default()).await.map(|_| ()),
        Action::Waiting { .. } => Ok(()),
        Action::Bind { namespace, claim, uid, volume } => {
            let claim_ref = json!({"spec": {"claimRef": {"apiVersion": "v1", "kind": "PersistentVolumeClaim",
                                                          "namespace": namespace, "name": claim, "uid": uid}}});
            let bound = volumes.patch(volume, &PatchParams::default(), &Patch::Merge(&claim_ref)).await?;
            volumes.patch_status(volume, &PatchParams::default(), &Patch::Merge(&status("Bound"))).await?;
            let spec = bound.spec.unwrap_or_default();
            let claims: Api<PersistentVolumeClaim> = Api::namespaced(client.clone(), namespace);
            let named = json!({"metadata": {"annotations": {"pv.kubernetes.io/bind-completed": "yes"}},
                               "spec": {"volumeName": volume}});
            claims.patch(claim, &PatchParams::default(), &Patch::Merge(&named)).await?;
            let phase =
                json!({"status": {"phase": "Bound", "accessModes": spec.access_modes, "capacity": spec.capacity}});
            claims.patch_status(claim, &PatchParams::default(), &Patch::Merge(&phase)).await.map(|_| ())
        }
    }
}
