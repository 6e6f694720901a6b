//! What every Tugboat component knows of Kubernetes objects, without I/O: resource
//! quantities (`quantity`) and what objects use of a ResourceQuota's resources (`quota`: the
//! quota controller sums a namespace, the API server's quota admission one object).
//!
//! It must never import a component crate (apiserver, scheduler, controllers, kubelet): they
//! all import it.

pub mod quantity;
pub mod quota;
