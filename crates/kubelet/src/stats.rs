//! Resource usage for `/stats/summary` (upstream's `stats/v1alpha1` Summary), read from the
//! containers' cgroups (v1 `cpuacct`/`memory`, or v2) and, for the node, from `/proc`.
//!
//! CPU is cumulative in the kernel; a rate (`usageNanoCores`) needs two readings. A
//! [`Sampler`] keeps a few recent readings per cgroup (a background pass records one every
//! [`SAMPLE_PERIOD`]); a summary's rate is taken against the newest reading at least a second
//! old, as cAdvisor's housekeeping does.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::pods::{LABEL_CONTAINER, LABEL_INIT, LABEL_POD_NAME, LABEL_POD_NAMESPACE, LABEL_POD_UID, Shared};

pub const SAMPLE_PERIOD: Duration = Duration::from_secs(5);
const MIN_INTERVAL: Duration = Duration::from_secs(1);
const KEPT: usize = 4;

/// Recent cumulative CPU readings per cgroup (or `""` for the node).
#[derive(Debug, Default)]
pub struct Sampler {
    samples: Mutex<HashMap<String, VecDeque<(Instant, u64)>>>,
}

impl Sampler {
    /// Records a reading of `key`'s cumulative CPU time (ns) at `now` and returns the usage rate
    /// in nanocores against the newest earlier reading at least a second old, if any.
    pub fn observe(&self, key: &str, cpu_ns: u64, now: Instant) -> Option<u64> {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        let history = samples.entry(key.to_string()).or_default();
        let rate = history.iter().rev().find(|(at, _)| now.duration_since(*at) >= MIN_INTERVAL).map(|(at, used)| {
            let elapsed = now.duration_since(*at).as_nanos().max(1);
            (u128::from(cpu_ns.saturating_sub(*used)) * 1_000_000_000 / elapsed) as u64
        });
        if history.back().is_none_or(|(at, _)| now.duration_since(*at) >= MIN_INTERVAL) {
            history.push_back((now, cpu_ns));
            while history.len() > KEPT {
                history.pop_front();
            }
        }
        rate
    }

    /// Forgets the cgroups not in `live`.
    pub fn retain(&self, live: &std::collections::HashSet<String>) {
        let mut samples = self.samples.lock().unwrap_or_else(|e| e.into_inner());
        samples.retain(|key, _| key.is_empty() || live.contains(key));
    }
}

/// Memory figures of a cgroup or the node, bytes.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Memory {
    pub usage: u64,
    pub working_set: u64,
    pub rss: u64,
    pub available: Option<u64>,
}

fn read_u64(path: impl AsRef<Path>) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A `key value` line of a `memory.stat` or `cpu.stat` file.
pub fn stat_field(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|line| line.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

/// Cumulative CPU time (ns) of a cgroup (`rel` as in the OCI spec's `cgroupsPath`).
pub fn cgroup_cpu(rel: &str) -> Option<u64> {
    let rel = rel.trim_start_matches('/');
    read_u64(format!("/sys/fs/cgroup/cpuacct/{rel}/cpuacct.usage"))
        .or_else(|| read_u64(format!("/sys/fs/cgroup/cpu,cpuacct/{rel}/cpuacct.usage")))
        .or_else(|| {
            let text = std::fs::read_to_string(format!("/sys/fs/cgroup/{rel}/cpu.stat")).ok()?;
            stat_field(&text, "usage_usec").map(|us| us * 1000)
        })
}

/// Memory of a cgroup; the working set is usage less inactive file pages, as cAdvisor counts.
pub fn cgroup_memory(rel: &str) -> Option<Memory> {
    let rel = rel.trim_start_matches('/');
    let v1 = format!("/sys/fs/cgroup/memory/{rel}");
    if let Some(usage) = read_u64(format!("{v1}/memory.usage_in_bytes")) {
        let stat = std::fs::read_to_string(format!("{v1}/memory.stat")).unwrap_or_default();
        let inactive = stat_field(&stat, "total_inactive_file").unwrap_or(0);
        let limit = read_u64(format!("{v1}/memory.limit_in_bytes")).filter(|l| *l < 1 << 62);
        return Some(memory(usage, inactive, stat_field(&stat, "total_rss").unwrap_or(0), limit));
    }
    let v2 = format!("/sys/fs/cgroup/{rel}");
    let usage = read_u64(format!("{v2}/memory.current"))?;
    let stat = std::fs::read_to_string(format!("{v2}/memory.stat")).unwrap_or_default();
    let limit = read_u64(format!("{v2}/memory.max"));
    Some(memory(usage, stat_field(&stat, "inactive_file").unwrap_or(0), stat_field(&stat, "anon").unwrap_or(0), limit))
}

fn memory(usage: u64, inactive_file: u64, rss: u64, limit: Option<u64>) -> Memory {
    let working_set = usage.saturating_sub(inactive_file);
    Memory { usage, working_set, rss, available: limit.map(|l| l.saturating_sub(working_set)) }
}

/// The node's cumulative busy CPU time (ns) from `/proc/stat`'s `cpu` line (USER_HZ = 100).
pub fn node_cpu(proc_stat: &str) -> Option<u64> {
    let line = proc_stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    // user nice system idle iowait irq softirq steal (guest time is already in user).
    let busy: u64 = ticks.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, t)| t).sum();
    Some(busy * 10_000_000)
}

/// The node's memory from `/proc/meminfo`.
pub fn node_memory(meminfo: &str) -> Memory {
    let field = |name| crate::host::meminfo_bytes(meminfo, name).unwrap_or(0);
    let (total, free, available) = (field("MemTotal"), field("MemFree"), field("MemAvailable"));
    let rss = field("AnonPages");
    Memory {
        usage: total - free.min(total),
        working_set: total - available.min(total),
        rss,
        available: Some(available),
    }
}

fn cpu_json(time: &str, cumulative: u64, rate: Option<u64>) -> Value {
    let mut cpu = json!({"time": time, "usageCoreNanoSeconds": cumulative});
    if let Some(rate) = rate {
        cpu["usageNanoCores"] = json!(rate);
    }
    cpu
}

fn memory_json(time: &str, m: Memory) -> Value {
    let mut memory = json!({"time": time, "usageBytes": m.usage, "workingSetBytes": m.working_set,
        "rssBytes": m.rss, "pageFaults": 0, "majorPageFaults": 0});
    if let Some(available) = m.available {
        memory["availableBytes"] = json!(available);
    }
    memory
}

/// The Summary: the node, then every pod with running containers and their usage.
pub async fn summary(node: &Shared) -> Value {
    let containers = node.runtime.list().await.unwrap_or_default();
    let data_dir = node.pods_dir.parent().unwrap_or(Path::new("/")).to_path_buf();
    let sampler = &node.stats;
    let now = Instant::now();
    let time = k8s_openapi::jiff::Timestamp::now().to_string();
    let node_cpu_ns = node_cpu(&std::fs::read_to_string("/proc/stat").unwrap_or_default()).unwrap_or(0);
    let mut node_json = json!({
        "nodeName": node.name,
        "startTime": boot_time().unwrap_or_else(|| time.clone()),
        "cpu": cpu_json(&time, node_cpu_ns, sampler.observe("", node_cpu_ns, now)),
        "memory": memory_json(&time, node_memory(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default())),
    });
    if let Ok(f) = crate::host::filesystem(&data_dir) {
        let fs = json!({"time": time, "availableBytes": f.available, "capacityBytes": f.capacity,
            "usedBytes": f.capacity.saturating_sub(f.free)});
        node_json["fs"] = fs.clone();
        node_json["runtime"] = json!({"imageFs": fs});
    }
    let mut pods: Vec<(String, Value, u64, Option<u64>, Memory)> = Vec::new();
    let mut live = std::collections::HashSet::new();
    for container in containers.iter().filter(|c| c.state == tugboat_runtime::State::Running) {
        if container.label(LABEL_INIT).is_some() {
            continue;
        }
        let Some(uid) = container.label(LABEL_POD_UID) else { continue };
        let cgroup = &container.config.cgroups_path;
        let Some(cpu) = cgroup_cpu(cgroup) else { continue };
        let mem = cgroup_memory(cgroup).unwrap_or_default();
        live.insert(cgroup.clone());
        let rate = sampler.observe(cgroup, cpu, now);
        let started = container.started.as_ref().map(|s| s.started_at.clone()).unwrap_or_else(|| time.clone());
        let entry = json!({"name": container.label(LABEL_CONTAINER).unwrap_or_default(), "startTime": started,
            "cpu": cpu_json(&time, cpu, rate), "memory": memory_json(&time, mem)});
        let index = match pods.iter().position(|(u, ..)| u == uid) {
            Some(index) => index,
            None => {
                let pod = json!({
                    "podRef": {"name": container.label(LABEL_POD_NAME).unwrap_or_default(),
                               "namespace": container.label(LABEL_POD_NAMESPACE).unwrap_or_default(), "uid": uid},
                    "startTime": started, "containers": []});
                pods.push((uid.to_string(), pod, 0, Some(0), Memory::default()));
                pods.len() - 1
            }
        };
        let (_, pod, pod_cpu, pod_rate, pod_mem) = &mut pods[index];
        pod["containers"].as_array_mut().expect("an array").push(entry);
        *pod_cpu += cpu;
        *pod_rate = pod_rate.zip(rate).map(|(a, b)| a + b);
        pod_mem.usage += mem.usage;
        pod_mem.working_set += mem.working_set;
        pod_mem.rss += mem.rss;
    }
    sampler.retain(&live);
    let pods: Vec<Value> = pods
        .into_iter()
        .map(|(_, mut pod, cpu, rate, mem)| {
            pod["cpu"] = cpu_json(&time, cpu, rate);
            pod["memory"] = memory_json(&time, mem);
            pod
        })
        .collect();
    json!({"node": node_json, "pods": pods})
}

fn boot_time() -> Option<String> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: i64 = stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
    Some(k8s_openapi::jiff::Timestamp::from_second(btime).ok()?.to_string())
}

/// Takes a reading of everything every [`SAMPLE_PERIOD`], so rates are ready when asked for.
pub async fn sample(node: Shared) {
    let mut tick = tokio::time::interval(SAMPLE_PERIOD);
    loop {
        tick.tick().await;
        let _ = summary(&node).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_come_from_a_reading_at_least_a_second_old() {
        let sampler = Sampler::default();
        let t0 = Instant::now();
        assert_eq!(sampler.observe("a", 1_000, t0), None);
        // Too soon: no rate, and the reading is not kept.
        assert_eq!(sampler.observe("a", 2_000, t0 + Duration::from_millis(200)), None);
        // Two seconds and one core-second later: half a core.
        assert_eq!(sampler.observe("a", 1_000_001_000, t0 + Duration::from_secs(2)), Some(500_000_000));
        // Half a second after the last kept reading: the rate is against t0 still.
        assert_eq!(sampler.observe("a", 1_000_001_000, t0 + Duration::from_millis(2500)), Some(400_000_000));
        sampler.retain(&Default::default());
        assert_eq!(sampler.observe("a", 5, t0 + Duration::from_secs(3)), None, "forgotten");
    }

    #[test]
    fn proc_and_cgroup_files_are_read_as_cadvisor_reads_them() {
        let stat = "cpu  100 5 50 1000 7 1 2 3 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\nbtime 1700000000\n";
        assert_eq!(node_cpu(stat), Some((100 + 5 + 50 + 1 + 2 + 3) * 10_000_000));
        let meminfo =
            "MemTotal:       1000 kB\nMemFree:         200 kB\nMemAvailable:    600 kB\nAnonPages:        50 kB\n";
        assert_eq!(
            node_memory(meminfo),
            Memory { usage: 800 * 1024, working_set: 400 * 1024, rss: 50 * 1024, available: Some(600 * 1024) }
        );
        let memory_stat = "cache 10\nrss 20\ntotal_rss 300\ntotal_inactive_file 4096\n";
        assert_eq!(stat_field(memory_stat, "total_rss"), Some(300));
        assert_eq!(stat_field(memory_stat, "rss"), Some(20));
        assert_eq!(memory(10_000, 4096, 300, Some(8192)).available, Some(8192 - 5904));
        assert_eq!(memory(100, 4096, 0, None).working_set, 0);
    }
}
