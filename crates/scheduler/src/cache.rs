//! The scheduler's picture of the cluster, kept up to date from watch events rather than
//! rebuilt for each pass (upstream's scheduler cache): every node with the pods counted on it
//! — bound there, or assumed there by this scheduler until the watch shows the binding — and
//! the queue of pods waiting for a node, highest priority then oldest first. Without I/O.

use std::cmp::Reverse;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};

use crate::plan::{NodeInfo, PodCost};

/// The `spec.schedulerName` this scheduler serves.
pub const SCHEDULER_NAME: &str = "default-scheduler";

/// A pod's place in the queue: higher priority first, then older, then by uid.
type QueueKey = (Reverse<i32>, Option<jiff::Timestamp>, String);

#[derive(Debug, Default)]
pub struct Cache {
    nodes: Vec<NodeInfo>,
    /// Node name → position in `nodes`.
    index: HashMap<String, usize>,
    /// Every pod seen, by uid.
    pods: HashMap<String, Entry>,
    /// Pods counted on a node the cache does not know (yet, or any more): node → uids.
    waiting: HashMap<String, HashSet<String>>,
    queue: BTreeMap<QueueKey, Arc<Pod>>,
}

#[derive(Debug)]
struct Entry {
    pod: Arc<Pod>,
    cost: Arc<PodCost>,
    /// The node the pod is counted on.
    node: Option<String>,
    /// Counted there because this scheduler bound it, before the watch showed it bound.
    assumed: bool,
    queued: Option<QueueKey>,
}

fn uid(pod: &Pod) -> &str {
    pod.metadata.uid.as_deref().unwrap_or_default()
}

/// Waiting for this scheduler to give it a node.
pub fn is_pending(pod: &Pod) -> bool {
    let spec = pod.spec.as_ref();
    spec.is_some_and(|s| s.node_name.as_deref().is_none_or(str::is_empty))
        && spec.and_then(|s| s.scheduler_name.as_deref()).is_none_or(|n| n == SCHEDULER_NAME)
        && pod.metadata.deletion_timestamp.is_none()
        && !is_terminal(pod)
}

fn is_terminal(pod: &Pod) -> bool {
    matches!(pod.status.as_ref().and_then(|s| s.phase.as_deref()), Some("Succeeded" | "Failed"))
}

fn bound_node(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref().and_then(|s| s.node_name.as_deref()).filter(|n| !n.is_empty())
}

impl Cache {
    /// The nodes, each with the pods counted on it.
    pub fn nodes(&self) -> &[NodeInfo] {
        &self.nodes
    }

    /// The position of a node in [`Cache::nodes`].
    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.index.get(name).copied()
    }

    /// The pods waiting for a node, in the order they should be tried.
    pub fn queue(&self) -> Vec<Arc<Pod>> {
        self.queue.values().cloned().collect()
    }

    pub fn is_queued(&self, uid: &str) -> bool {
        self.pods.get(uid).is_some_and(|e| e.queued.is_some())
    }

    /// A pod as the watch shows it now.
    pub fn apply_pod(&mut self, pod: Arc<Pod>) {
        let uid = uid(&pod).to_string();
        let old = self.pods.remove(&uid);
        let (node, assumed) = match (bound_node(&pod), &old) {
            _ if is_terminal(&pod) => (None, false),
            (Some(node), _) => (Some(node.to_string()), false),
            // Bound by this scheduler; the watch has not caught up yet.
            (None, Some(old)) if old.assumed && pod.metadata.deletion_timestamp.is_none() => (old.node.clone(), true),
            (None, _) => (None, false),
        };
        if let Some(old) = &old {
            self.uncount(&uid, old);
            if let Some(key) = &old.queued {
                self.queue.remove(key);
            }
        }
        let cost = Arc::new(PodCost::of(&pod));
        let queued = (is_pending(&pod) && !assumed).then(|| {
            let priority = pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0);
            let key = (Reverse(priority), pod.metadata.creation_timestamp.as_ref().map(|t| t.0), uid.clone());
            self.queue.insert(key.clone(), pod.clone());
            key
        });
        let entry = Entry { pod, cost, node, assumed, queued };
        self.count(&uid, &entry);
        self.pods.insert(uid, entry);
    }

    pub fn delete_pod(&mut self, uid: &str) {
        if let Some(old) = self.pods.remove(uid) {
            self.uncount(uid, &old);
            if let Some(key) = &old.queued {
                self.queue.remove(key);
            }
        }
    }

    /// The pods after a (re)list: those not in it are gone.
    pub fn replace_pods(&mut self, pods: Vec<Arc<Pod>>) {
        let listed: HashSet<&str> = pods.iter().map(|p| uid(p)).collect();
        let gone: Vec<String> = self.pods.keys().filter(|u| !listed.contains(u.as_str())).cloned().collect();
        for uid in gone {
            self.delete_pod(&uid);
        }
        for pod in pods {
            self.apply_pod(pod);
        }
    }

    pub fn apply_node(&mut self, node: Arc<Node>) {
        let name = node.metadata.name.clone().unwrap_or_default();
        if let Some(&at) = self.index.get(&name) {
            self.nodes[at].set_node(node);
            return;
        }
        let mut info = NodeInfo::new(node);
        for uid in self.waiting.remove(&name).unwrap_or_default() {
            if let Some(entry) = self.pods.get(&uid) {
                info.add_pod_with(&entry.pod, &entry.cost);
            }
        }
        self.index.insert(name, self.nodes.len());
        self.nodes.push(info);
    }

    pub fn delete_node(&mut self, name: &str) {
        let Some(at) = self.index.remove(name) else { return };
        let info = self.nodes.swap_remove(at);
        if let Some(moved) = self.nodes.get(at) {
            self.index.insert(moved.name().to_string(), at);
        }
        // Its pods stay counted against the name, should the node come back.
        if !info.pods.is_empty() {
            let waiting = self.waiting.entry(name.to_string()).or_default();
            waiting.extend(info.pods.iter().map(|p| uid(p).to_string()));
        }
    }

    /// The nodes after a (re)list: those not in it are gone.
    pub fn replace_nodes(&mut self, nodes: Vec<Arc<Node>>) {
        let listed: HashSet<&str> = nodes.iter().filter_map(|n| n.metadata.name.as_deref()).collect();
        let gone: Vec<String> = self.index.keys().filter(|n| !listed.contains(n.as_str())).cloned().collect();
        for name in gone {
            self.delete_node(&name);
        }
        for node in nodes {
            self.apply_node(node);
        }
    }

    /// Counts a queued pod on the node at `at` (this scheduler is binding it there) and takes
    /// it off the queue. Returns the node's name.
    pub fn assume(&mut self, pod_uid: &str, at: usize) -> String {
        let name = self.nodes[at].name().to_string();
        let Some(mut entry) = self.pods.remove(pod_uid) else { return name };
        if let Some(key) = entry.queued.take() {
            self.queue.remove(&key);
        }
        self.uncount(pod_uid, &entry);
        entry.node = Some(name.clone());
        entry.assumed = true;
        self.count(pod_uid, &entry);
        self.pods.insert(pod_uid.to_string(), entry);
        name
    }

    /// The binding of an assumed pod failed: it counts nowhere and waits again (if it still
    /// waits for a node as the watch last showed it).
    pub fn forget(&mut self, pod_uid: &str) {
        let Some(entry) = self.pods.get_mut(pod_uid) else { return };
        if !entry.assumed {
            return;
        }
        entry.assumed = false;
        let pod = entry.pod.clone();
        self.apply_pod(pod);
    }

    fn count(&mut self, pod_uid: &str, entry: &Entry) {
        let Some(node) = &entry.node else { return };
        match self.index.get(node) {
            Some(&at) => self.nodes[at].add_pod_with(&entry.pod, &entry.cost),
            None => {
                self.waiting.entry(node.clone()).or_default().insert(pod_uid.to_string());
            }
        }
    }

    fn uncount(&mut self, pod_uid: &str, entry: &Entry) {
        let Some(node) = &entry.node else { return };
        match self.index.get(node) {
            Some(&at) => {
                self.nodes[at].remove_pod(pod_uid, &entry.cost);
            }
            None => {
                if let Some(waiting) = self.waiting.get_mut(node) {
                    waiting.remove(pod_uid);
                    if waiting.is_empty() {
                        self.waiting.remove(node);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str) -> Arc<Node> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name},
                "status": {"allocatable": {"cpu": "4", "memory": "8Gi", "pods": "110"}},
            }))
            .unwrap(),
        )
    }

    fn pod(name: &str, node: Option<&str>, extra: serde_json::Value) -> Arc<Pod> {
        let mut value = json!({
            "metadata": {"name": name, "namespace": "default", "uid": format!("uid-{name}"),
                         "creationTimestamp": "2026-01-01T00:00:00Z"},
            "spec": {"containers": [{"name": "a", "image": "x", "resources": {"requests": {"cpu": "1"}}}]},
        });
        if let Some(node) = node {
            value["spec"]["nodeName"] = json!(node);
        }
        for (key, field) in extra.as_object().cloned().unwrap_or_default() {
            for (k, v) in field.as_object().cloned().unwrap_or_default() {
                value[&key][k] = v;
            }
        }
        Arc::new(serde_json::from_value(value).unwrap())
    }

    /// (node, milli-cpu requested, pod count) for every node, sorted.
    fn usage(cache: &Cache) -> Vec<(String, i64, i64)> {
        let mut usage: Vec<_> =
            cache.nodes().iter().map(|n| (n.name().to_string(), n.requested.milli_cpu, n.pod_count)).collect();
        usage.sort();
        usage
    }

    fn queued(cache: &Cache) -> Vec<String> {
        cache.queue().iter().map(|p| p.metadata.name.clone().unwrap()).collect()
    }

    #[test]
    fn pods_count_on_their_nodes_whatever_order_the_events_come_in() {
        let mut cache = Cache::default();
        // A pod bound to a node the cache does not know yet counts once the node comes.
        cache.apply_pod(pod("early", Some("a"), json!({})));
        assert!(usage(&cache).is_empty());
        cache.apply_node(node("a"));
        cache.apply_node(node("b"));
        assert_eq!(usage(&cache), [("a".into(), 1000, 1), ("b".into(), 0, 0)]);
        // Moving between nodes (a re-created pod with the same uid) and changing requests.
        cache.apply_pod(pod(
            "early",
            Some("b"),
            json!({"spec": {"containers": [{"name": "a", "image": "x",
            "resources": {"requests": {"cpu": "2"}}}]}}),
        ));
        assert_eq!(usage(&cache), [("a".into(), 0, 0), ("b".into(), 2000, 1)]);
        // Finished pods free their node; deleted ones too.
        cache.apply_pod(pod("done", Some("a"), json!({"status": {"phase": "Succeeded"}})));
        cache.apply_pod(pod("running", Some("a"), json!({})));
        assert_eq!(usage(&cache), [("a".into(), 1000, 1), ("b".into(), 2000, 1)]);
        cache.delete_pod("uid-running");
        assert_eq!(usage(&cache), [("a".into(), 0, 0), ("b".into(), 2000, 1)]);
        // A deleted node's pods count again when it returns; a relist drops what is gone.
        cache.delete_node("b");
        assert_eq!(usage(&cache), [("a".into(), 0, 0)]);
        cache.apply_node(node("b"));
        assert_eq!(usage(&cache), [("a".into(), 0, 0), ("b".into(), 2000, 1)]);
        cache.replace_nodes(vec![node("b"), node("c")]);
        cache.replace_pods(vec![pod("new", Some("c"), json!({}))]);
        assert_eq!(usage(&cache), [("b".into(), 0, 0), ("c".into(), 1000, 1)]);
        assert!(cache.waiting.is_empty(), "{:?}", cache.waiting);
    }

    #[test]
    fn assumed_pods_count_until_the_watch_shows_them_bound_or_the_binding_fails() {
        let mut cache = Cache::default();
        cache.apply_node(node("a"));
        cache.apply_node(node("b"));
        let priority = |p: i32| json!({"spec": {"priority": p}});
        cache.apply_pod(pod("low", None, priority(0)));
        cache.apply_pod(pod("high", None, priority(100)));
        cache.apply_pod(pod("other-scheduler", None, json!({"spec": {"schedulerName": "custom"}})));
        cache.apply_pod(pod("deleting", None, json!({"metadata": {"deletionTimestamp": "2026-01-01T00:00:01Z"}})));
        assert_eq!(queued(&cache), ["high", "low"]);

        let at = cache.nodes().iter().position(|n| n.name() == "a").unwrap();
        assert_eq!(cache.assume("uid-high", at), "a");
        assert_eq!(queued(&cache), ["low"]);
        assert_eq!(usage(&cache), [("a".into(), 1000, 1), ("b".into(), 0, 0)]);
        // A status update before the binding shows keeps it assumed; the binding replaces it.
        cache.apply_pod(pod("high", None, json!({"spec": {"priority": 100}, "status": {"phase": "Pending"}})));
        assert_eq!((queued(&cache), usage(&cache)[0].2), (vec!["low".to_string()], 1));
        cache.apply_pod(pod("high", Some("a"), priority(100)));
        assert_eq!(usage(&cache), [("a".into(), 1000, 1), ("b".into(), 0, 0)]);
        cache.forget("uid-high");
        assert_eq!(usage(&cache), [("a".into(), 1000, 1), ("b".into(), 0, 0)], "bound pods are not forgotten");

        cache.assume("uid-low", at);
        cache.forget("uid-low");
        assert_eq!(queued(&cache), ["low"]);
        assert_eq!(usage(&cache), [("a".into(), 1000, 1), ("b".into(), 0, 0)]);
        assert!(cache.is_queued("uid-low") && !cache.is_queued("uid-high"));
    }
}
