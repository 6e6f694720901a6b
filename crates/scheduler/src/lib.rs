//! Tugboat's scheduler: watches pods no node has yet and the nodes, picks a node for each pod
//! (`plan`, pure), and binds it through the API (`pods/<name>/binding`).
//!
//! It meets the other components only through the API: of Tugboat's crates it imports
//! `tugboat-objects` alone.

mod cache;
pub mod plan;
mod run;

pub use run::{SCHEDULER_NAME, run, run_with};
