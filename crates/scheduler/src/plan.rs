//! The scheduling decision, without I/O: for one pod and the nodes as they are (each with the
//! pods already on it), which nodes pass every filter, how each scores, and which wins; or why
//! none fits, worded as upstream words it (`0/3 nodes are available: 3 Insufficient cpu.`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Node, Pod};

use tugboat_objects::labels::selector_matches;
use tugboat_objects::quantity::{millicores, units};
use tugboat_objects::scheduling::{
    affinity_allows, constraint_failure, host_ports, host_ports_conflict, term_matches, tolerates,
};

/// What pods ask of a node, added up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Resources {
    pub milli_cpu: i64,
    pub memory: i64,
    pub ephemeral_storage: i64,
    /// Extended resources (`example.com/gpu`, `hugepages-2Mi`, …) by name, in whole units;
    /// empty (no allocation) for the pods and nodes that have none.
    pub scalars: Vec<(String, i64)>,
}

/// The resources that are not counted as scalars.
const NAMED: [&str; 5] = ["cpu", "memory", "ephemeral-storage", "pods", "storage"];

impl Resources {
    fn scalar(&self, name: &str) -> i64 {
        self.scalars.iter().find(|(n, _)| n == name).map(|(_, v)| *v).unwrap_or(0)
    }

    fn scalar_mut(&mut self, name: &str) -> &mut i64 {
        let at = match self.scalars.iter().position(|(n, _)| n == name) {
            Some(at) => at,
            None => {
                self.scalars.push((name.to_string(), 0));
                self.scalars.len() - 1
            }
        };
        &mut self.scalars[at].1
    }

    fn add(&mut self, other: &Resources) {
        self.milli_cpu += other.milli_cpu;
        self.memory += other.memory;
        self.ephemeral_storage += other.ephemeral_storage;
        for (name, value) in &other.scalars {
            *self.scalar_mut(name) += value;
        }
    }

    fn subtract(&mut self, other: &Resources) {
        self.milli_cpu -= other.milli_cpu;
        self.memory -= other.memory;
        self.ephemeral_storage -= other.ephemeral_storage;
        for (name, value) in &other.scalars {
            *self.scalar_mut(name) -= value;
        }
    }

    fn max(mut self, other: &Resources) -> Resources {
        self.milli_cpu = self.milli_cpu.max(other.milli_cpu);
        self.memory = self.memory.max(other.memory);
        self.ephemeral_storage = self.ephemeral_storage.max(other.ephemeral_storage);
        for (name, value) in &other.scalars {
            let mine = self.scalar_mut(name);
            *mine = (*mine).max(*value);
        }
        self
    }
}

fn container_requests(resources: Option<&k8s_openapi::api::core::v1::ResourceRequirements>) -> Resources {
    let get = |name: &str| {
        let resources = resources?;
        // A limit without a request requests the limit (upstream defaults it so).
        resources.requests.as_ref().and_then(|r| r.get(name)).or_else(|| resources.limits.as_ref()?.get(name))
    };
    let mut scalars = Vec::new();
    if let Some(resources) = resources {
        let names = resources.requests.iter().chain(resources.limits.iter()).flat_map(|list| list.keys());
        for name in names {
            if !NAMED.contains(&name.as_str()) && !scalars.iter().any(|(n, _)| n == name) {
                scalars.push((name.clone(), get(name).map(|q| units(&q.0)).unwrap_or(0)));
            }
        }
    }
    Resources {
        milli_cpu: get("cpu").map(|q| millicores(&q.0)).unwrap_or(0),
        memory: get("memory").map(|q| units(&q.0)).unwrap_or(0),
        ephemeral_storage: get("ephemeral-storage").map(|q| units(&q.0)).unwrap_or(0),
        scalars,
    }
}

/// A pod's effective requests: its containers' sum, or its largest init container if larger,
/// plus its overhead.
pub fn pod_requests(pod: &Pod) -> Resources {
    let Some(spec) = &pod.spec else { return Resources::default() };
    let mut sum = Resources::default();
    for container in &spec.containers {
        sum.add(&container_requests(container.resources.as_ref()));
    }
    let mut init = Resources::default();
    for container in spec.init_containers.iter().flatten() {
        init = init.max(&container_requests(container.resources.as_ref()));
    }
    let mut total = sum.max(&init);
    if let Some(overhead) = &spec.overhead {
        total.milli_cpu += overhead.get("cpu").map(|q| millicores(&q.0)).unwrap_or(0);
        total.memory += overhead.get("memory").map(|q| units(&q.0)).unwrap_or(0);
    }
    total
}

/// Requests for scoring: a container that requests nothing counts as 100m and 200Mi, so empty
/// pods still spread (upstream's non-zero defaults).
fn scoring_requests(pod: &Pod) -> Resources {
    let mut total = Resources::default();
    for container in pod.spec.iter().flat_map(|s| &s.containers) {
        let mut requests = container_requests(container.resources.as_ref());
        if requests.milli_cpu == 0 {
            requests.milli_cpu = 100;
        }
        if requests.memory == 0 {
            requests.memory = 200 * 1024 * 1024;
        }
        total.add(&requests);
    }
    total
}

/// What a pod takes of a node, parsed once: its requests (for fitting and for scoring) and
/// host ports.
#[derive(Debug, Clone, Default)]
pub struct PodCost {
    requests: Resources,
    scoring: Resources,
    host_ports: Vec<(String, String, i32)>,
}

impl PodCost {
    pub fn of(pod: &Pod) -> PodCost {
        PodCost { requests: pod_requests(pod), scoring: scoring_requests(pod), host_ports: host_ports(pod) }
    }
}

/// A node and what is already bound to it.
#[derive(Debug, Clone)]
pub struct NodeInfo {
    pub node: Arc<Node>,
    /// What the node offers (parsed once).
    allocatable: Resources,
    max_pods: i64,
    pub requested: Resources,
    /// The same with non-zero defaults, for scoring.
    pub scoring_requested: Resources,
    pub pod_count: i64,
    /// (protocol, hostIP, hostPort) in use (once per pod using it).
    pub host_ports: Vec<(String, String, i32)>,
    /// The pods on the node (for spreading by namespace and labels).
    pub pods: Vec<Arc<Pod>>,
    /// The same pods counted by namespace and labels: a node's pods are mostly a few sets of
    /// replicas, so finding a pod's siblings looks at a few sets rather than every pod.
    label_sets: Vec<LabelSet>,
}

#[derive(Debug, Clone)]
struct LabelSet {
    namespace: String,
    labels: BTreeMap<String, String>,
    pods: usize,
}

fn namespace_and_labels(pod: &Pod) -> (&str, Option<&BTreeMap<String, String>>) {
    (pod.metadata.namespace.as_deref().unwrap_or_default(), pod.metadata.labels.as_ref())
}

impl NodeInfo {
    pub fn new(node: Arc<Node>) -> NodeInfo {
        let (allocatable, max_pods) = offered(&node);
        NodeInfo {
            node,
            allocatable,
            max_pods,
            requested: Resources::default(),
            scoring_requested: Resources::default(),
            pod_count: 0,
            host_ports: Vec::new(),
            pods: Vec::new(),
            label_sets: Vec::new(),
        }
    }

    /// The node changed (labels, taints, allocatable…); the pods on it stay counted.
    pub fn set_node(&mut self, node: Arc<Node>) {
        (self.allocatable, self.max_pods) = offered(&node);
        self.node = node;
    }

    pub fn name(&self) -> &str {
        self.node.metadata.name.as_deref().unwrap_or_default()
    }

    /// Counts a pod bound (or about to be bound) to this node.
    pub fn add_pod(&mut self, pod: &Arc<Pod>) {
        self.add_pod_with(pod, &PodCost::of(pod));
    }

    /// The same, with the pod's cost worked out before (the scheduler keeps them per pod).
    pub fn add_pod_with(&mut self, pod: &Arc<Pod>, cost: &PodCost) {
        self.requested.add(&cost.requests);
        self.scoring_requested.add(&cost.scoring);
        self.pod_count += 1;
        self.host_ports.extend(cost.host_ports.iter().cloned());
        self.pods.push(pod.clone());
        let (namespace, labels) = namespace_and_labels(pod);
        let empty = BTreeMap::new();
        let labels = labels.unwrap_or(&empty);
        match self.label_sets.iter_mut().find(|s| s.namespace == namespace && s.labels == *labels) {
            Some(set) => set.pods += 1,
            None => self.label_sets.push(LabelSet { namespace: namespace.to_string(), labels: labels.clone(), pods: 1 }),
        }
    }

    /// Stops counting the pod with this uid, added before with `cost`; false if it was not here.
    pub fn remove_pod(&mut self, uid: &str, cost: &PodCost) -> bool {
        let Some(at) = self.pods.iter().position(|p| p.metadata.uid.as_deref() == Some(uid)) else { return false };
        let pod = self.pods.swap_remove(at);
        let (namespace, labels) = namespace_and_labels(&pod);
        let empty = BTreeMap::new();
        let labels = labels.unwrap_or(&empty);
        if let Some(i) = self.label_sets.iter().position(|s| s.namespace == namespace && s.labels == *labels) {
            self.label_sets[i].pods -= 1;
            if self.label_sets[i].pods == 0 {
                self.label_sets.swap_remove(i);
            }
        }
        self.requested.subtract(&cost.requests);
        self.scoring_requested.subtract(&cost.scoring);
        self.pod_count -= 1;
        for port in &cost.host_ports {
            if let Some(at) = self.host_ports.iter().position(|p| p == port) {
                self.host_ports.swap_remove(at);
            }
        }
        true
    }

    fn allocatable_resources(&self) -> (&Resources, i64) {
        (&self.allocatable, self.max_pods)
    }
}

/// What a node offers pods: its allocatable (else capacity) cpu, memory and ephemeral storage,
/// and how many pods (110 if it does not say).
fn offered(node: &Node) -> (Resources, i64) {
    let offered = |name: &str| {
        let status = node.status.as_ref()?;
        let resources = status.allocatable.as_ref().or(status.capacity.as_ref())?;
        resources.get(name).map(|q| q.0.clone())
    };
    let scalars = node
        .status
        .as_ref()
        .and_then(|status| status.allocatable.as_ref().or(status.capacity.as_ref()))
        .into_iter()
        .flatten()
        .filter(|(name, _)| !NAMED.contains(&name.as_str()))
        .map(|(name, quantity)| (name.clone(), units(&quantity.0)))
        .collect();
    let allocatable = Resources {
        milli_cpu: offered("cpu").map(|q| millicores(&q)).unwrap_or(0),
        memory: offered("memory").map(|q| units(&q)).unwrap_or(0),
        ephemeral_storage: offered("ephemeral-storage").map(|q| units(&q)).unwrap_or(0),
        scalars,
    };
    (allocatable, offered("pods").map(|q| units(&q)).unwrap_or(110))
}

/// What the filters and scores need of the pod, worked out once per pod rather than per node.
struct PodFacts<'a> {
    pod: &'a Pod,
    requests: Resources,
    scoring_requests: Resources,
    host_ports: Vec<(String, String, i32)>,
    /// The pod's topology spread constraints, with the matching pods counted per domain.
    spread: Vec<Spread>,
}

/// One topology spread constraint of a pod, measured over the nodes.
#[derive(Debug)]
struct Spread {
    key: String,
    max_skew: i64,
    /// `DoNotSchedule` (a filter) rather than `ScheduleAnyway` (a score).
    hard: bool,
    /// Matching pods per value of `key`, over the nodes the pod could go to.
    counts: HashMap<String, i64>,
    /// The fewest in any domain.
    min: i64,
    /// The most in any domain.
    max: i64,
    /// 1 if the pod matches its own selector (it will count once placed).
    self_match: i64,
}

/// Measures the pod's topology spread constraints over `nodes` (those that its node selector
/// and required affinity allow and that carry the key, as upstream's default policies say).
fn spread_constraints(pod: &Pod, nodes: &[NodeInfo]) -> Vec<Spread> {
    let Some(spec) = &pod.spec else { return Vec::new() };
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let mut spreads = Vec::new();
    for constraint in spec.topology_spread_constraints.iter().flatten() {
        let selector = constraint.label_selector.clone().unwrap_or_default();
        let mut counts: HashMap<String, i64> = HashMap::new();
        for info in nodes {
            let Some(domain) = info.node.metadata.labels.as_ref().and_then(|l| l.get(&constraint.topology_key)) else {
                continue;
            };
            if !affinity_allows(spec, &info.node) {
                continue;
            }
            let matching = info
                .pods
                .iter()
                .filter(|p| p.metadata.namespace.as_deref().unwrap_or_default() == namespace)
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter(|p| selector_matches(&selector, p.metadata.labels.as_ref()))
                .count() as i64;
            *counts.entry(domain.clone()).or_default() += matching;
        }
        let min = counts.values().copied().min().unwrap_or(0);
        let max = counts.values().copied().max().unwrap_or(0);
        spreads.push(Spread {
            key: constraint.topology_key.clone(),
            max_skew: i64::from(constraint.max_skew.max(1)),
            hard: constraint.when_unsatisfiable != "ScheduleAnyway",
            counts,
            min,
            max,
            self_match: i64::from(selector_matches(&selector, pod.metadata.labels.as_ref())),
        });
    }
    spreads
}

impl<'a> PodFacts<'a> {
    fn new(pod: &'a Pod) -> Self {
        PodFacts {
            pod,
            requests: pod_requests(pod),
            scoring_requests: scoring_requests(pod),
            host_ports: host_ports(pod),
            spread: Vec::new(),
        }
    }
}

/// Why a node does not fit, as upstream's filter plugins word it, in their order (a node is
/// reported for the first plugin it fails, resources all together).
fn filter(facts: &PodFacts<'_>, info: &NodeInfo) -> Vec<String> {
    let pod = facts.pod;
    let Some(spec) = &pod.spec else { return vec!["the pod has no spec".into()] };
    if let Some(reason) = constraint_failure(spec, &info.node) {
        return vec![reason];
    }
    // PodTopologySpread (DoNotSchedule): placing the pod must keep the skew within maxSkew.
    for spread in facts.spread.iter().filter(|s| s.hard) {
        let Some(domain) = info.node.metadata.labels.as_ref().and_then(|l| l.get(&spread.key)) else {
            return vec!["node(s) didn't match pod topology spread constraints (missing required label)".into()];
        };
        let count = spread.counts.get(domain).copied().unwrap_or(0);
        if count + spread.self_match - spread.min > spread.max_skew {
            return vec!["node(s) didn't match pod topology spread constraints".into()];
        }
    }
    let mut reasons = Vec::new();
    // NodePorts
    if host_ports_conflict(&facts.host_ports, &info.host_ports) {
        reasons.push("node(s) didn't have free ports for the requested pod ports".into());
    }
    // NodeResourcesFit
    let (allocatable, max_pods) = info.allocatable_resources();
    let requests = &facts.requests;
    if info.pod_count + 1 > max_pods {
        reasons.push("Too many pods".into());
    }
    if requests.milli_cpu > 0 && info.requested.milli_cpu + requests.milli_cpu > allocatable.milli_cpu {
        reasons.push("Insufficient cpu".into());
    }
    if requests.memory > 0 && info.requested.memory + requests.memory > allocatable.memory {
        reasons.push("Insufficient memory".into());
    }
    if requests.ephemeral_storage > 0
        && info.requested.ephemeral_storage + requests.ephemeral_storage > allocatable.ephemeral_storage
    {
        reasons.push("Insufficient ephemeral-storage".into());
    }
    for (name, wanted) in &requests.scalars {
        if *wanted > 0 && info.requested.scalar(name) + wanted > allocatable.scalar(name) {
            reasons.push(format!("Insufficient {name}"));
        }
    }
    reasons
}

/// Scores 0-100 per plugin, added up: least allocated, balanced allocation, preferred node
/// affinity, untolerated PreferNoSchedule taints, and spreading of the pod's siblings (same
/// namespace and labels) across hostnames.
fn score(facts: &PodFacts<'_>, info: &NodeInfo, siblings: usize, siblings_max: usize) -> i64 {
    let pod = facts.pod;
    let (allocatable, _) = info.allocatable_resources();
    let requests = &facts.scoring_requests;
    let fraction = |used: i64, total: i64| if total <= 0 { 1.0 } else { (used as f64 / total as f64).min(1.0) };
    let cpu = fraction(info.scoring_requested.milli_cpu + requests.milli_cpu, allocatable.milli_cpu);
    let memory = fraction(info.scoring_requested.memory + requests.memory, allocatable.memory);
    let least_allocated = ((1.0 - cpu) * 50.0 + (1.0 - memory) * 50.0) as i64;
    let balanced = ((1.0 - (cpu - memory).abs()) * 100.0) as i64;

    let spec = pod.spec.as_ref();
    let preferred = spec
        .and_then(|s| s.affinity.as_ref())
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|a| a.preferred_during_scheduling_ignored_during_execution.as_deref())
        .unwrap_or_default();
    let total_weight: i64 = preferred.iter().map(|p| i64::from(p.weight)).sum();
    let matched_weight: i64 =
        preferred.iter().filter(|p| term_matches(&p.preference, &info.node)).map(|p| i64::from(p.weight)).sum();
    let affinity = if total_weight > 0 { matched_weight * 100 / total_weight } else { 0 };

    let tolerations = spec.and_then(|s| s.tolerations.as_deref()).unwrap_or_default();
    let untolerated_soft = info
        .node
        .spec
        .as_ref()
        .and_then(|s| s.taints.as_deref())
        .unwrap_or_default()
        .iter()
        .filter(|t| t.effect == "PreferNoSchedule" && !tolerates(tolerations, t))
        .count() as i64;
    let taints = 100 - (untolerated_soft * 50).min(100);

    let spread = (siblings * 100).checked_div(siblings_max).map_or(100, |share| (100 - share) as i64);

    // PodTopologySpread (ScheduleAnyway): the emptier the node's domain, the better.
    let soft: Vec<i64> = facts
        .spread
        .iter()
        .filter(|s| !s.hard)
        .map(|s| {
            let domain = info.node.metadata.labels.as_ref().and_then(|l| l.get(&s.key));
            let count = domain.and_then(|d| s.counts.get(d)).copied();
            match count {
                None => 0,
                Some(_) if s.max == s.min => 100,
                Some(count) => (s.max - count) * 100 / (s.max - s.min),
            }
        })
        .collect();
    let topology = if soft.is_empty() { 0 } else { soft.iter().sum::<i64>() / soft.len() as i64 };

    least_allocated + balanced + affinity + taints + 2 * spread + 2 * topology
}

/// Pods on the node in the pod's namespace with the pod's labels (its replicas).
fn siblings_on(pod: &Pod, info: &NodeInfo) -> usize {
    let namespace = pod.metadata.namespace.as_deref().unwrap_or_default();
    let Some(labels) = pod.metadata.labels.as_ref().filter(|l| !l.is_empty()) else { return 0 };
    info.label_sets
        .iter()
        .filter(|set| set.namespace == namespace && labels.iter().all(|(k, v)| set.labels.get(k) == Some(v)))
        .map(|set| set.pods)
        .sum()
}

/// The outcome for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Bind to this node (an index into the nodes given).
    Bind(usize),
    /// No node fits; the message for the PodScheduled condition and the event.
    Unschedulable(String),
}

/// How many feasible nodes to find before scoring: all of a small cluster; of a large one a
/// share that shrinks with its size (upstream's percentageOfNodesToScore: 50% less 1% per 125
/// nodes, at least 5%, and at least 100 nodes).
fn nodes_to_find(total: usize) -> usize {
    if total < 100 {
        return total;
    }
    let percent = (50 - (total / 125) as i64).max(5) as usize;
    (total * percent / 100).max(100).min(total)
}

/// Picks a node for `pod`. See `schedule_from`.
pub fn schedule(pod: &Pod, nodes: &[NodeInfo]) -> Decision {
    schedule_from(pod, nodes, 0).0
}

/// Picks a node for `pod`, looking at nodes from `start` on (wrapping) until enough fit, and
/// returns where the next pod should start looking, so every node gets its turn. Ties go to the
/// node the pod's name hashes to among the best, so equal nodes share the pods.
pub fn schedule_from(pod: &Pod, nodes: &[NodeInfo], start: usize) -> (Decision, usize) {
    if nodes.is_empty() {
        return (Decision::Unschedulable("0/0 nodes are available: no nodes available to schedule pods.".into()), 0);
    }
    let mut facts = PodFacts::new(pod);
    facts.spread = spread_constraints(pod, nodes);
    let wanted = nodes_to_find(nodes.len());
    let mut reasons: BTreeMap<String, usize> = BTreeMap::new();
    let mut feasible = Vec::new();
    let mut examined = 0;
    for offset in 0..nodes.len() {
        let index = (start + offset) % nodes.len();
        examined += 1;
        let failed = filter(&facts, &nodes[index]);
        if failed.is_empty() {
            feasible.push(index);
            if feasible.len() >= wanted {
                break;
            }
        }
        for reason in failed {
            *reasons.entry(reason).or_default() += 1;
        }
    }
    let next = (start + examined) % nodes.len();
    if feasible.is_empty() {
        let mut parts: Vec<String> = reasons.iter().map(|(reason, count)| format!("{count} {reason}")).collect();
        parts.sort();
        let message = format!("0/{} nodes are available: {}.", nodes.len(), parts.join(", "));
        return (Decision::Unschedulable(message), next);
    }
    let siblings: Vec<usize> = feasible.iter().map(|&i| siblings_on(pod, &nodes[i])).collect();
    let siblings_max = siblings.iter().copied().max().unwrap_or(0);
    let scored: Vec<(usize, i64)> =
        feasible.iter().zip(&siblings).map(|(&i, &s)| (i, score(&facts, &nodes[i], s, siblings_max))).collect();
    let best = scored.iter().map(|(_, s)| *s).max().unwrap_or(0);
    let top: Vec<usize> = scored.iter().filter(|(_, s)| *s == best).map(|(i, _)| *i).collect();
    let hash = pod
        .metadata
        .name
        .as_deref()
        .unwrap_or_default()
        .bytes()
        .fold(0xcbf2_9ce4_8422_2325_u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3));
    (Decision::Bind(top[(hash % top.len() as u64) as usize]), next)
}

/// The nodes as `pod` must see them while other pods wait for room they preempted
/// (`nominated`: each with the node it was nominated to, from its `status.nominatedNodeName`):
/// as upstream's scheduler does, a nominated pod of at least `pod`'s priority counts on its
/// node, so the room its victims leave is not taken by a pod that would only be preempted
/// again. `None` when no such pod changes anything.
pub fn with_nominated(pod: &Pod, nodes: &[NodeInfo], nominated: &[(Arc<Pod>, usize)]) -> Option<Vec<NodeInfo>> {
    let mine = priority(pod);
    let uid = pod.metadata.uid.as_deref();
    let counted: Vec<&(Arc<Pod>, usize)> = nominated
        .iter()
        .filter(|(other, at)| *at < nodes.len() && priority(other) >= mine && other.metadata.uid.as_deref() != uid)
        .collect();
    if counted.is_empty() {
        return None;
    }
    let mut seen = nodes.to_vec();
    for (other, at) in counted {
        seen[*at].add_pod(other);
    }
    Some(seen)
}

fn priority(pod: &Pod) -> i32 {
    pod.spec.as_ref().and_then(|s| s.priority).unwrap_or(0)
}

/// A PodDisruptionBudget as preemption weighs it: the pods it covers and how many of them may
/// go now (`status.disruptionsAllowed`).
#[derive(Debug, Clone, PartialEq)]
pub struct Budget {
    pub namespace: String,
    /// None covers no pod (policy/v1: a null selector selects nothing, an empty one everything).
    pub selector: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector>,
    pub disruptions_allowed: i32,
}

impl Budget {
    pub fn of(budget: &k8s_openapi::api::policy::v1::PodDisruptionBudget) -> Budget {
        Budget {
            namespace: budget.metadata.namespace.clone().unwrap_or_default(),
            selector: budget.spec.as_ref().and_then(|s| s.selector.clone()),
            disruptions_allowed: budget.status.as_ref().map(|s| s.disruptions_allowed).unwrap_or(0),
        }
    }

    fn covers(&self, pod: &Pod) -> bool {
        pod.metadata.namespace.as_deref().unwrap_or_default() == self.namespace
            && self.selector.as_ref().is_some_and(|s| selector_matches(s, pod.metadata.labels.as_ref()))
    }
}

/// Preemption, for a pod that fits nowhere (upstream's DefaultPreemption): on each node whose
/// constraints admit the pod, remove every pod of lower priority, and if the pod then fits,
/// give back as many of them as still leave it room — first those whose eviction would break
/// a disruption budget, then the others, highest priority first; the rest are the victims.
/// Picks the node with the fewest budget violations, then whose victims have the lowest
/// highest priority, then the fewest victims, then the lowest priority sum. None if the pod
/// may not preempt (`preemptionPolicy: Never`) or no node would do.
pub fn preempt(pod: &Pod, nodes: &[NodeInfo], budgets: &[Budget]) -> Option<(usize, Vec<Arc<Pod>>)> {
    let spec = pod.spec.as_ref()?;
    if spec.preemption_policy.as_deref() == Some("Never") {
        return None;
    }
    let mine = priority(pod);
    let mut facts = PodFacts::new(pod);
    facts.spread = spread_constraints(pod, nodes);
    // (rank: budget violations, highest victim priority, victims, priority sum), node index, victims.
    type Candidate = ((usize, i32, usize, i64), usize, Vec<Arc<Pod>>);
    let mut best: Option<Candidate> = None;
    for (index, info) in nodes.iter().enumerate() {
        if constraint_failure(spec, &info.node).is_some() {
            continue;
        }
        let (mut lower, higher): (Vec<&Arc<Pod>>, Vec<&Arc<Pod>>) =
            info.pods.iter().partition(|p| priority(p) < mine && p.metadata.deletion_timestamp.is_none());
        if lower.is_empty() {
            continue;
        }
        let mut trial = NodeInfo::new(info.node.clone());
        for kept in &higher {
            trial.add_pod(kept);
        }
        if !filter(&facts, &trial).is_empty() {
            continue;
        }
        // Which of them a budget protects (each budget allowing its disruptions to the
        // highest-priority pods first, as upstream counts them).
        lower.sort_by_key(|p| std::cmp::Reverse(priority(p)));
        let mut allowed: Vec<i32> = budgets.iter().map(|b| b.disruptions_allowed).collect();
        let (violating, fine): (Vec<&Arc<Pod>>, Vec<&Arc<Pod>>) = lower.into_iter().partition(|p| {
            let mut violates = false;
            for (budget, left) in budgets.iter().zip(allowed.iter_mut()) {
                if budget.covers(p) {
                    if *left <= 0 {
                        violates = true;
                    }
                    *left -= 1;
                }
            }
            violates
        });
        let mut victims = Vec::new();
        let mut violations = 0;
        for (candidate, violates) in violating.iter().map(|p| (p, true)).chain(fine.iter().map(|p| (p, false))) {
            let mut with = trial.clone();
            with.add_pod(candidate);
            if filter(&facts, &with).is_empty() {
                trial = with;
            } else {
                victims.push((*candidate).clone());
                violations += usize::from(violates);
            }
        }
        if victims.is_empty() {
            continue;
        }
        let rank = (
            violations,
            victims.iter().map(|v| priority(v)).max().unwrap_or(0),
            victims.len(),
            victims.iter().map(|v| i64::from(priority(v))).sum::<i64>(),
        );
        if best.as_ref().is_none_or(|(r, _, _)| rank < *r) {
            best = Some((rank, index, victims));
        }
    }
    best.map(|(_, index, victims)| (index, victims))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn node(name: &str, cpu: &str, memory: &str, extra: serde_json::Value) -> NodeInfo {
        let mut value = json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
            "spec": {},
            "status": {"allocatable": {"cpu": cpu, "memory": memory, "pods": "110"}},
        });
        merge(&mut value, extra);
        NodeInfo::new(Arc::new(serde_json::from_value(value).unwrap()))
    }

    fn pod(name: &str, cpu: &str, extra: serde_json::Value) -> Pod {
        let mut value = json!({
            "metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
            "spec": {"containers": [{"name": "a", "image": "x", "resources": {"requests": {"cpu": cpu}}}]},
        });
        merge(&mut value, extra);
        serde_json::from_value(value).unwrap()
    }

    fn merge(target: &mut serde_json::Value, patch: serde_json::Value) {
        match (target, patch) {
            (serde_json::Value::Object(t), serde_json::Value::Object(p)) => {
                for (k, v) in p {
                    merge(t.entry(k).or_insert(serde_json::Value::Null), v);
                }
            }
            (t, p) => *t = p,
        }
    }

    fn chosen(decision: Decision, nodes: &[NodeInfo]) -> String {
        match decision {
            Decision::Bind(i) => nodes[i].name().to_string(),
            Decision::Unschedulable(message) => message,
        }
    }

    #[test]
    fn filters_say_why_no_node_fits() {
        let nodes = vec![
            node("small-1", "1", "1Gi", json!({})),
            node("small-2", "1", "1Gi", json!({})),
            node(
                "tainted",
                "8",
                "8Gi",
                json!({"spec": {"taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]}}),
            ),
            node("cordoned", "8", "8Gi", json!({"spec": {"unschedulable": true}})),
            node("elsewhere", "8", "8Gi", json!({"metadata": {"labels": {"zone": "b"}}})),
        ];
        let big = pod("big", "2", json!({"spec": {"nodeSelector": {"kubernetes.io/hostname": "small-1"}}}));
        assert_eq!(
            schedule(&big, &nodes),
            Decision::Unschedulable("0/5 nodes are available: 1 Insufficient cpu, 1 node(s) had untolerated taint {dedicated: db}, 1 node(s) were unschedulable, 2 node(s) didn't match Pod's node affinity/selector.".into())
        );
        let anywhere = pod("anywhere", "2", json!({"spec": {"nodeSelector": {"zone": "a"}}}));
        let table = [
            (json!({}), "elsewhere"),
            (json!({"spec": {"nodeSelector": {"zone": "b"}}}), "elsewhere"),
            (
                json!({"spec": {"tolerations": [{"key": "dedicated", "operator": "Equal", "value": "db", "effect": "NoSchedule"}],
                                "nodeSelector": {"kubernetes.io/hostname": "tainted"}}}),
                "tainted",
            ),
            (
                json!({"spec": {"tolerations": [{"key": "node.kubernetes.io/unschedulable", "operator": "Exists"}],
                                "nodeSelector": {"kubernetes.io/hostname": "cordoned"}}}),
                "cordoned",
            ),
            (
                json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["b"]}]}]}}}}}),
                "elsewhere",
            ),
            (
                json!({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
                    {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["small-2"]}]}]}}},
                    "containers": [{"name": "a", "image": "x", "resources": {"requests": {"cpu": "500m"}}}]}}),
                "small-2",
            ),
        ];
        for (extra, expected) in table {
            let candidate = pod("p", "2", extra.clone());
            assert_eq!(chosen(schedule(&candidate, &nodes), &nodes), expected, "{extra}");
        }
        let message = chosen(schedule(&anywhere, &nodes), &nodes);
        assert!(message.starts_with("0/5 nodes are available:"), "{message}");
        let tainted = pod("t", "100m", json!({"spec": {"nodeSelector": {"kubernetes.io/hostname": "tainted"}}}));
        let message = chosen(schedule(&tainted, &nodes), &nodes);
        assert!(message.contains("1 node(s) had untolerated taint {dedicated: db}"), "{message}");
        assert!(message.contains("1 node(s) were unschedulable, 3 node(s) didn't match"), "{message}");
    }

    #[test]
    fn bound_pods_use_up_nodes_and_host_ports_conflict() {
        let mut nodes = vec![node("a", "1", "1Gi", json!({"status": {"allocatable": {"pods": "2"}}}))];
        nodes[0].add_pod(&Arc::new(pod("one", "600m", json!({}))));
        let second = pod("two", "600m", json!({}));
        assert_eq!(
            schedule(&second, &nodes),
            Decision::Unschedulable("0/1 nodes are available: 1 Insufficient cpu.".into())
        );
        nodes[0].add_pod(&Arc::new(pod("small", "100m", json!({}))));
        let third = pod("three", "100m", json!({}));
        assert_eq!(
            schedule(&third, &nodes),
            Decision::Unschedulable("0/1 nodes are available: 1 Too many pods.".into())
        );

        let mut nodes = vec![node("a", "4", "4Gi", json!({}))];
        let web = |name: &str| {
            pod(
                name,
                "100m",
                json!({"spec": {"containers": [{"name": "a", "image": "x", "ports": [{"containerPort": 80, "hostPort": 8080}]}]}}),
            )
        };
        nodes[0].add_pod(&Arc::new(web("first")));
        let message = chosen(schedule(&web("second"), &nodes), &nodes);
        assert_eq!(message, "0/1 nodes are available: 1 node(s) didn't have free ports for the requested pod ports.");
        // Requests default from limits.
        let limited = pod(
            "l",
            "0",
            json!({"spec": {"containers": [{"name": "a", "image": "x", "resources": {"limits": {"cpu": "8"}}}]}}),
        );
        assert!(matches!(schedule(&limited, &nodes), Decision::Unschedulable(_)));
    }

    #[test]
    fn scores_spread_replicas_and_prefer_emptier_nodes() {
        let mut nodes =
            vec![node("a", "4", "8Gi", json!({})), node("b", "4", "8Gi", json!({})), node("c", "4", "8Gi", json!({}))];
        let mut placed = BTreeMap::new();
        for i in 0..9 {
            let replica = pod(&format!("web-{i}"), "100m", json!({}));
            let Decision::Bind(index) = schedule(&replica, &nodes) else { panic!("fits") };
            nodes[index].add_pod(&Arc::new(replica.clone()));
            *placed.entry(nodes[index].name().to_string()).or_insert(0) += 1;
        }
        assert_eq!(placed.values().copied().collect::<Vec<_>>(), [3, 3, 3], "{placed:?}");

        // A busy node loses to an idle one; a soft taint and a preference count.
        let mut nodes = vec![
            node("busy", "4", "8Gi", json!({})),
            node("idle", "4", "8Gi", json!({})),
            node("soft", "4", "8Gi", json!({"spec": {"taints": [{"key": "k", "effect": "PreferNoSchedule"}]}})),
        ];
        nodes[0].add_pod(&Arc::new(pod("hog", "3", json!({"metadata": {"labels": {"app": "other"}}}))));
        let other = pod("x", "100m", json!({"metadata": {"labels": {"app": "x"}}}));
        assert_eq!(chosen(schedule(&other, &nodes), &nodes), "idle");
        let preferring = pod(
            "y",
            "100m",
            json!({"metadata": {"labels": {"app": "y"}}, "spec": {"affinity": {"nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [{"weight": 100, "preference": {"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": ["soft"]}]}}]}}}}),
        );
        assert_eq!(chosen(schedule(&preferring, &nodes), &nodes), "soft");
    }

    #[test]
    fn siblings_are_the_pods_of_the_namespace_with_all_of_the_pods_labels() {
        let mut info = node("a", "64", "64Gi", json!({}));
        let with = |name: &str, namespace: &str, labels: serde_json::Value| {
            let mut pod = pod(name, "10m", json!({"metadata": {"namespace": namespace}}));
            pod.metadata.labels = serde_json::from_value(labels).unwrap();
            pod.metadata.uid = Some(name.to_string());
            Arc::new(pod)
        };
        let pods = [
            with("w1", "default", json!({"app": "web", "hash": "1"})),
            with("w2", "default", json!({"app": "web", "hash": "1"})),
            with("w3", "default", json!({"app": "web", "hash": "2"})),
            with("o1", "other", json!({"app": "web", "hash": "1"})),
            with("d1", "default", json!({"app": "db"})),
            with("n1", "default", json!(null)),
        ];
        for pod in &pods {
            info.add_pod(pod);
        }
        let web = with("new", "default", json!({"app": "web"}));
        let web_1 = with("new", "default", json!({"app": "web", "hash": "1"}));
        assert_eq!((siblings_on(&web, &info), siblings_on(&web_1, &info)), (3, 2));
        assert!(info.remove_pod("w2", &PodCost::of(&pods[1])));
        assert!(info.remove_pod("w3", &PodCost::of(&pods[2])));
        assert_eq!((siblings_on(&web, &info), siblings_on(&web_1, &info)), (1, 1));
        assert!(info.remove_pod("w1", &PodCost::of(&pods[0])));
        assert_eq!(siblings_on(&web, &info), 0);
        assert_eq!(info.label_sets.len(), 3, "sets without pods are dropped");
    }

    #[test]
    fn large_clusters_score_a_share_of_their_nodes_and_take_turns() {
        assert_eq!(nodes_to_find(50), 50);
        assert_eq!(nodes_to_find(500), 230);
        assert_eq!(nodes_to_find(5000), 500);
        assert_eq!(nodes_to_find(100_000), 5000);
        let nodes: Vec<NodeInfo> = (0..1000).map(|i| node(&format!("n{i}"), "4", "8Gi", json!({}))).collect();
        let (decision, next) = schedule_from(&pod("p", "100m", json!({})), &nodes, 990);
        assert!(matches!(decision, Decision::Bind(_)));
        assert_eq!(next, (990 + nodes_to_find(1000)) % 1000, "the next pod starts where this one stopped");
    }

    #[test]
    fn no_nodes_at_all() {
        assert_eq!(
            schedule(&pod("p", "1", json!({})), &[]),
            Decision::Unschedulable("0/0 nodes are available: no nodes available to schedule pods.".into())
        );
    }

    #[test]
    fn topology_spread_keeps_the_skew() {
        let zone = |name: &str, zone: &str| {
            node(name, "8", "16Gi", json!({"metadata": {"labels": {"kubernetes.io/hostname": name, "zone": zone}}}))
        };
        let mut nodes = vec![zone("a1", "a"), zone("a2", "a"), zone("b1", "b"), node("bare", "8", "16Gi", json!({}))];
        for (index, name) in [(0, "w1"), (1, "w2")] {
            let placed = Arc::new(pod(name, "100m", json!({"metadata": {"labels": {"app": "web"}}})));
            nodes[index].add_pod(&placed);
        }
        let constrained = |when: &str| {
            pod(
                "w3",
                "100m",
                json!({"metadata": {"labels": {"app": "web"}}, "spec": {"topologySpreadConstraints": [
                {"maxSkew": 1, "topologyKey": "zone", "whenUnsatisfiable": when, "labelSelector": {"matchLabels": {"app": "web"}}}]}}),
            )
        };
        // Zone a has two, b none: only b keeps the skew at most 1.
        assert_eq!(chosen(schedule(&constrained("DoNotSchedule"), &nodes), &nodes), "b1");
        assert_eq!(chosen(schedule(&constrained("ScheduleAnyway"), &nodes), &nodes), "b1");
        // With b's only node tainted, b still counts as an empty domain: zone a is too full.
        nodes[2] = node(
            "b1",
            "8",
            "16Gi",
            json!({"metadata": {"labels": {"zone": "b"}},
            "spec": {"taints": [{"key": "x", "effect": "NoSchedule"}]}}),
        );
        match schedule(&constrained("DoNotSchedule"), &nodes) {
            Decision::Unschedulable(message) => {
                assert!(message.contains("2 node(s) didn't match pod topology spread constraints."), "{message}");
                assert!(
                    message.contains("1 node(s) didn't match pod topology spread constraints (missing required label)"),
                    "{message}"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_pod_nominated_to_a_node_keeps_its_room_from_lower_priority_pods() {
        let with_priority = |name: &str, cpu: &str, priority: i32| {
            Arc::new(pod(name, cpu, json!({"metadata": {"uid": name}, "spec": {"priority": priority}})))
        };
        let mut nodes = vec![node("a", "1", "8Gi", json!({}))];
        nodes[0].add_pod(&with_priority("kept", "450m", 3));
        // The preemptor waits for its victims to go; their replacements come back meanwhile.
        let preemptor = with_priority("preemptor", "500m", 4);
        let nominated = vec![(preemptor.clone(), 0)];
        let replacement = with_priority("replacement", "200m", 1);
        assert!(matches!(schedule(&replacement, &nodes), Decision::Bind(0)), "room without the nomination");
        let seen = with_nominated(&replacement, &nodes, &nominated).expect("the nomination counts");
        assert!(matches!(schedule(&replacement, &seen), Decision::Unschedulable(_)));
        // The preemptor itself, and a pod of higher priority, see the node as it is.
        assert!(with_nominated(&preemptor, &nodes, &nominated).is_none());
        assert!(with_nominated(&with_priority("urgent", "200m", 9), &nodes, &nominated).is_none());
        assert!(matches!(schedule(&preemptor, &nodes), Decision::Bind(0)));
    }

    #[test]
    fn preemption_takes_the_fewest_lowest_priority_victims() {
        let with_priority =
            |name: &str, cpu: &str, priority: i32| Arc::new(pod(name, cpu, json!({"spec": {"priority": priority}})));
        let mut nodes = vec![node("a", "2", "8Gi", json!({})), node("b", "2", "8Gi", json!({}))];
        nodes[0].add_pod(&with_priority("a-low", "1", 1));
        nodes[0].add_pod(&with_priority("a-mid", "1", 5));
        nodes[1].add_pod(&with_priority("b-low1", "1", 1));
        nodes[1].add_pod(&with_priority("b-low2", "1", 1));
        let urgent = with_priority("urgent", "1", 10);
        assert!(matches!(schedule(&urgent, &nodes), Decision::Unschedulable(_)));
        let (node, victims) = preempt(&urgent, &nodes, &[]).unwrap();
        let names: Vec<&str> = victims.iter().map(|v| v.metadata.name.as_deref().unwrap()).collect();
        assert_eq!(names.len(), 1);
        assert_eq!(nodes[node].name(), if names[0] == "a-low" { "a" } else { "b" });
        assert!(names[0].contains("low"), "never the higher one: {names:?}");
        // Equal or higher priorities are never victims; Never does not preempt.
        assert_eq!(preempt(&with_priority("peer", "1", 1), &nodes, &[]), None);
        let polite = Arc::new(pod("polite", "1", json!({"spec": {"priority": 10, "preemptionPolicy": "Never"}})));
        assert_eq!(preempt(&polite, &nodes, &[]), None);
    }

    #[test]
    fn extended_resources_are_counted_and_preempted_for() {
        // As the conformance preemption specs: nodes offer 5 of an extended resource.
        let offering =
            |name: &str| node(name, "2", "8Gi", json!({"status": {"allocatable": {"example.com/foo": "5"}}}));
        let wanting = |name: &str, foo: &str, priority: i32| {
            let resources = json!({"requests": {"example.com/foo": foo}, "limits": {"example.com/foo": foo}});
            Arc::new(pod(
                name,
                "10m",
                json!({"metadata": {"uid": name},
                       "spec": {"priority": priority, "containers": [{"name": "a", "image": "x", "resources": resources}]}}),
            ))
        };
        let mut nodes = vec![offering("a"), node("b", "2", "8Gi", json!({}))];
        assert_eq!(chosen(schedule(&wanting("first", "3", 1), &nodes), &nodes), "a", "b has none of it");
        nodes[0].add_pod(&wanting("first", "3", 1));
        let more = wanting("more", "3", 10);
        assert_eq!(chosen(schedule(&more, &nodes), &nodes), "0/2 nodes are available: 2 Insufficient example.com/foo.",);
        let (node, victims) = preempt(&more, &nodes, &[]).unwrap();
        assert_eq!((node, victims[0].metadata.name.as_deref()), (0, Some("first")));
        // A limit alone requests as much; what a pod frees is counted back.
        let limited = Arc::new(pod(
            "limited",
            "10m",
            json!({"spec": {"containers": [{"name": "a", "image": "x", "resources": {"limits": {"example.com/foo": "2"}}}]}}),
        ));
        assert_eq!(chosen(schedule(&limited, &nodes), &nodes), "a");
        assert!(nodes[0].remove_pod("first", &PodCost::of(&wanting("first", "3", 1))));
        assert_eq!(chosen(schedule(&more, &nodes), &nodes), "a");
    }

    #[test]
    fn preemption_spares_pods_a_disruption_budget_protects() {
        let labelled = |name: &str, app: &str, priority: i32| {
            Arc::new(pod(name, "1", json!({"metadata": {"labels": {"app": app}}, "spec": {"priority": priority}})))
        };
        let mut nodes = vec![node("a", "2", "8Gi", json!({})), node("b", "2", "8Gi", json!({}))];
        nodes[0].add_pod(&labelled("db-0", "db", 1));
        nodes[0].add_pod(&labelled("db-1", "db", 1));
        nodes[1].add_pod(&labelled("web-0", "web", 3));
        nodes[1].add_pod(&labelled("web-1", "web", 3));
        let urgent = labelled("urgent", "x", 10);
        let budget = |app: &str, allowed: i32| Budget {
            namespace: "default".into(),
            selector: Some(serde_json::from_value(json!({"matchLabels": {"app": app}})).unwrap()),
            disruptions_allowed: allowed,
        };
        let chosen = |budgets: &[Budget]| {
            let (node, victims) = preempt(&urgent, &nodes, budgets).unwrap();
            let names: Vec<String> = victims.iter().map(|v| v.metadata.name.clone().unwrap()).collect();
            (nodes[node].name().to_string(), names)
        };
        // Without budgets the lowest priorities go; a budget allowing no disruption of the db
        // pods sends the preemption to the web pods instead.
        assert_eq!(chosen(&[]).0, "a");
        assert_eq!(chosen(&[budget("db", 0)]).0, "b");
        assert_eq!(chosen(&[budget("db", 1)]).0, "a", "one disruption allowed: one db pod may go");
        // Both protected: the fewest violations, then the lowest priorities.
        assert_eq!(chosen(&[budget("db", 0), budget("web", 0)]).0, "a");
        // Another namespace's budget, or one without a selector, protects nothing here.
        let elsewhere = Budget { namespace: "other".into(), ..budget("db", 0) };
        let no_selector = Budget { selector: None, ..budget("db", 0) };
        assert_eq!(chosen(&[elsewhere, no_selector]).0, "a");
    }
}
