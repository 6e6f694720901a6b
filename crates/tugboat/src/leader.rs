//! Lease-based leader election, as upstream's client-go leaderelection: components of which
//! one instance may act at a time (the scheduler, the controller manager) run only while
//! their process holds a `coordination.k8s.io/v1` Lease in kube-system (`kube-scheduler`,
//! `kube-controller-manager`).
//!
//! A candidate takes a Lease that is free, its own, or not renewed for `leaseDurationSeconds`
//! *as observed locally* (clocks of different hosts are never compared); the holder renews it
//! every retry period and steps down — stopping the component — when it has not renewed for
//! the renew deadline or sees another holder. Every write carries the resourceVersion read, so
//! two candidates never both win.

use std::future::Future;
use std::path::Path;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::{Api, PostParams};

/// Upstream's defaults (kube-scheduler, kube-controller-manager).
const LEASE_DURATION: Duration = Duration::from_secs(15);
const RENEW_DEADLINE: Duration = Duration::from_secs(10);
const RETRY_PERIOD: Duration = Duration::from_secs(2);

#[derive(Clone)]
pub struct Election {
    client: kube::Client,
    lease: String,
    identity: String,
}

/// This process's identity in elections: kept in `<data-dir>/identity` when there is a data
/// dir (a restarted server takes its own lease back at once), else new per process.
pub fn identity(data_dir: Option<&Path>) -> String {
    let host = tugboat_kubelet::host::hostname();
    let fresh = || format!("{host}_{}", uuid::Uuid::new_v4());
    let Some(dir) = data_dir else { return fresh() };
    let path = dir.join("identity");
    if let Ok(kept) = std::fs::read_to_string(&path)
        && !kept.trim().is_empty()
    {
        return kept.trim().to_string();
    }
    let made = fresh();
    if let Err(error) = tugboat_pki::write_file(&path, made.as_bytes(), 0o644) {
        tracing::warn!(%error, "cannot keep the election identity");
    }
    made
}

impl Election {
    pub fn new(client: kube::Client, lease: &str, identity: &str) -> Election {
        Election { client, lease: lease.to_string(), identity: identity.to_string() }
    }

    fn api(&self) -> Api<Lease> {
        Api::namespaced(self.client.clone(), "kube-system")
    }

    /// Runs `start()` whenever this process holds the lease, stopping it when the lease is
    /// lost; never returns (but for `start`'s own errors, logged, then started again).
    pub async fn run<F, Fut>(self, name: &'static str, start: F) -> anyhow::Result<()>
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        loop {
            self.acquire().await;
            tracing::info!(component = name, lease = %self.lease, identity = %self.identity, "became the leader");
            let mut task = tokio::spawn(start());
            tokio::select! {
                () = self.keep() => {
                    task.abort();
                    tracing::warn!(component = name, lease = %self.lease, "lost the lease; stopped");
                }
                result = &mut task => {
                    match result {
                        Ok(Ok(())) => tracing::warn!(component = name, "stopped; restarting"),
                        Ok(Err(error)) => tracing::warn!(component = name, error = %format!("{error:#}"), "failed; restarting"),
                        Err(error) => tracing::warn!(component = name, %error, "panicked; restarting"),
                    }
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    /// Waits until this process holds the lease.
    async fn acquire(&self) {
        // The holder's last renewal as this process saw it change: (renewTime, seen at).
        let mut observed: Option<(Option<MicroTime>, Instant)> = None;
        loop {
            match self.try_acquire(&mut observed).await {
                Ok(true) => return,
                Ok(false) => {}
                Err(error) => tracing::debug!(lease = %self.lease, %error, "cannot take the lease yet"),
            }
            tokio::time::sleep(RETRY_PERIOD).await;
        }
    }

    async fn try_acquire(&self, observed: &mut Option<(Option<MicroTime>, Instant)>) -> Result<bool, kube::Error> {
        let api = self.api();
        let now = MicroTime(jiff::Timestamp::now());
        let Some(mut lease) = api.get_opt(&self.lease).await? else {
            let lease = Lease {
                metadata: ObjectMeta { name: Some(self.lease.clone()), ..Default::default() },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(LEASE_DURATION.as_secs() as i32),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
                Err(error) => Err(error),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.identity.as_str());
        if holder.is_some() && !mine {
            let duration = Duration::from_secs(spec.lease_duration_seconds.unwrap_or(15).max(1) as u64);
            let renewed = spec.renew_time.clone();
            match observed {
                Some((seen, at)) if *seen == renewed => {
                    if at.elapsed() < duration {
                        return Ok(false);
                    }
                }
                _ => {
                    *observed = Some((renewed, Instant::now()));
                    return Ok(false);
                }
            }
        }
        if !mine {
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + i32::from(holder.is_some()));
            spec.acquire_time = Some(now.clone());
        }
        spec.holder_identity = Some(self.identity.clone());
        spec.lease_duration_seconds = Some(LEASE_DURATION.as_secs() as i32);
        spec.renew_time = Some(now);
        // The resourceVersion read makes this a compare-and-swap.
        match api.replace(&self.lease, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(status)) if status.code == 409 => Ok(false),
            Err(error) => Err(error),
        }
    }

    /// Renews the lease every retry period; returns once it is lost.
    async fn keep(&self) {
        let mut renewed = Instant::now();
        loop {
            tokio::time::sleep(RETRY_PERIOD).await;
            match self.renew().await {
                Ok(true) => renewed = Instant::now(),
                Ok(false) => return,
                Err(error) => {
                    tracing::debug!(lease = %self.lease, %error, "renewal failed");
                    if renewed.elapsed() >= RENEW_DEADLINE {
                        return;
                    }
                }
            }
        }
    }

    /// Ok(false): someone else holds the lease now.
    async fn renew(&self) -> Result<bool, kube::Error> {
        let api = self.api();
        let Some(mut lease) = api.get_opt(&self.lease).await? else { return Ok(false) };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(false);
        }
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        // A conflict (changed meanwhile) is an error like any: read again next period.
        api.replace(&self.lease, &PostParams::default(), &lease).await.map(|_| true)
    }
}
