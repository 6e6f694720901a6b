//! Tugboat's controller manager: each controller is a pure plan (tested without I/O) and a thin
//! loop that observes through kube-rs reflectors and applies the plan through the API.

pub mod deployment;
pub mod gc;
pub mod nodelifecycle;
pub mod pods;
pub mod replicaset;
mod run;

pub use run::{ControllerConfig, run, run_deployments, run_garbage_collector, run_node_lifecycle, run_replicasets};
