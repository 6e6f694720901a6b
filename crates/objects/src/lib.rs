//! What every Tugboat component knows of Kubernetes objects, without I/O beyond the API
//! client: resource quantities (`quantity`), what objects use of a ResourceQuota's resources
//! (`quota`: the quota controller sums a namespace, the API server's quota admission one
//! object), label selectors as every component matches them (`labels`), a pod's node-level
//! constraints (`scheduling`: taints, node affinity, as the scheduler and the DaemonSet
//! controller judge nodes), Events about objects (`events`, posted through the client), and
//! the reflectors every component keeps its caches with and the informers the components of
//! one process share (`informer`).
//!
//! It must never import a component crate (apiserver, scheduler, controllers, kubelet): they
//! all import it.

pub mod events;
pub mod informer;
pub mod labels;
pub mod quantity;
pub mod quota;
pub mod scheduling;
