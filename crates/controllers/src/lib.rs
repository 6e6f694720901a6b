//! Tugboat's controller manager: each controller is a pure plan (tested without I/O) and a thin
//! loop that observes through kube-rs reflectors and applies the plan through the API.
//!
//! Of Tugboat's crates it imports `tugboat-objects` and `tugboat-pki` (the CSR signer), never
//! the API server, the scheduler or a node crate: it meets them through the API.

pub mod autoscaler;
pub mod cron;
pub mod cronjob;
pub mod daemonset;
pub mod deployment;
pub mod disruption;
pub mod endpoints;
pub mod gc;
pub mod job;
pub mod namespaces;
pub mod nodeipam;
pub mod nodelifecycle;
pub mod podgc;
pub mod pods;
pub mod replicaset;
mod run;
pub mod serviceaccounts;
pub mod statefulset;
pub mod volumes;

pub use run::{Connect, ControllerConfig, run};
