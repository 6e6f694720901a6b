//! What a container is made of ([`ContainerConfig`], the runtime's own description, stored
//! beside it) and the OCI runtime spec (`config.json`) made from it.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// A bind mount into the container.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct BindMount {
    pub source: PathBuf,
    pub destination: String,
    pub readonly: bool,
}

/// The namespaces a container joins (paths of bind-mounted namespace files); `None` = new one.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct SharedNamespaces {
    /// `None` here means the host's network (hostNetwork), not a new one.
    pub network: Option<PathBuf>,
    pub ipc: Option<PathBuf>,
    pub uts: Option<PathBuf>,
    pub host_network: bool,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Resources {
    /// Bytes.
    pub memory_limit: Option<i64>,
    /// CFS quota in µs per `cpu_period` (100,000 µs).
    pub cpu_quota: Option<i64>,
    pub cpu_shares: Option<u64>,
}

/// Everything needed to create one container; stored in its directory so a restarted kubelet
/// knows what each container is (labels) without asking anyone.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ContainerConfig {
    pub id: String,
    /// Who the container belongs to (pod uid, namespace, name, container name, attempt).
    pub labels: BTreeMap<String, String>,
    pub image: String,
    pub image_id: String,
    /// Image layers, bottom first: the overlayfs lower dirs.
    pub layers: Vec<PathBuf>,
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub hostname: String,
    pub namespaces: SharedNamespaces,
    pub mounts: Vec<BindMount>,
    /// Relative cgroup path (`tugboat/<node>/pod<uid>/<id>`).
    pub cgroups_path: String,
    pub resources: Resources,
    pub readonly_rootfs: bool,
    pub privileged: bool,
    pub capabilities_add: Vec<String>,
    pub capabilities_drop: Vec<String>,
    /// The CRI log file the shim writes.
    pub log_path: PathBuf,
    /// Keep stdin open for attaching clients (`stdin: true`), close it after the first one
    /// (`stdinOnce`), run on a terminal (`tty`).
    #[serde(default)]
    pub stdin: bool,
    #[serde(default)]
    pub stdin_once: bool,
    #[serde(default)]
    pub tty: bool,
    /// Rotate the log once it reaches this many bytes (0: never), keeping this many files in
    /// all (`--container-log-max-size`, `--container-log-max-files`).
    #[serde(default)]
    pub log_max_size: u64,
    #[serde(default)]
    pub log_max_files: u32,
    /// Kernel parameters set in the container's (the pod's) namespaces (`linux.sysctl`).
    #[serde(default)]
    pub sysctls: BTreeMap<String, String>,
    /// `no_new_privs`: setuid programs and file capabilities grant nothing (a container's
    /// `allowPrivilegeEscalation: false`; never for a privileged one).
    #[serde(default)]
    pub no_new_privileges: bool,
}

/// Docker's and containerd's default capability set.
pub const DEFAULT_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_FSETID",
    "CAP_FOWNER",
    "CAP_MKNOD",
    "CAP_NET_RAW",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETFCAP",
    "CAP_SETPCAP",
    "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT",
    "CAP_KILL",
    "CAP_AUDIT_WRITE",
];

/// Every capability, for privileged containers.
const ALL_CAPABILITIES: &[&str] = &[
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_KILL",
    "CAP_SETGID",
    "CAP_SETUID",
    "CAP_SETPCAP",
    "CAP_LINUX_IMMUTABLE",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_ADMIN",
    "CAP_NET_RAW",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_SYS_MODULE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_CHROOT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_PACCT",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_NICE",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_MKNOD",
    "CAP_LEASE",
    "CAP_AUDIT_WRITE",
    "CAP_AUDIT_CONTROL",
    "CAP_SETFCAP",
    "CAP_MAC_OVERRIDE",
    "CAP_MAC_ADMIN",
    "CAP_SYSLOG",
    "CAP_WAKE_ALARM",
    "CAP_BLOCK_SUSPEND",
    "CAP_AUDIT_READ",
    "CAP_PERFMON",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
];

/// This process's capability bounding set (`CapBnd` of /proc/self/status), if readable.
fn current_bounding_set() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let hex = status.lines().find_map(|l| l.strip_prefix("CapBnd:"))?.trim();
    u64::from_str_radix(hex, 16).ok()
}

/// Kubernetes names capabilities without the prefix (`NET_ADMIN`); OCI with it.
fn cap_name(name: &str) -> String {
    let upper = name.to_ascii_uppercase();
    if upper.starts_with("CAP_") { upper } else { format!("CAP_{upper}") }
}

impl ContainerConfig {
    /// The capability set the process gets.
    pub fn capabilities(&self) -> Vec<String> {
        if self.privileged {
            // Every capability this process may hand on (containerd's WithAllCurrentCapabilities):
            // one missing from our own bounding set cannot be given, and asking for it fails
            // the container's start.
            let bounding = current_bounding_set();
            return ALL_CAPABILITIES
                .iter()
                .enumerate()
                .filter(|(bit, _)| bounding.is_none_or(|set| set & (1u64 << bit) != 0))
                .map(|(_, c)| c.to_string())
                .collect();
        }
        let drop: Vec<String> = self.capabilities_drop.iter().map(|c| cap_name(c)).collect();
        let all = drop.iter().any(|c| c == "CAP_ALL");
        let mut caps: Vec<String> = if all {
            Vec::new()
        } else {
            DEFAULT_CAPABILITIES.iter().map(|c| c.to_string()).filter(|c| !drop.contains(c)).collect()
        };
        for add in &self.capabilities_add {
            let add = cap_name(add);
            if add == "CAP_ALL" {
                return ALL_CAPABILITIES.iter().map(|c| c.to_string()).collect();
            }
            if !caps.contains(&add) {
                caps.push(add);
            }
        }
        caps
    }

    /// The OCI runtime spec (`config.json`) for this container, its rootfs at `rootfs`.
    pub fn oci_spec(&self, rootfs: &std::path::Path) -> Value {
        let caps = self.capabilities();
        let mut namespaces = vec![json!({"type": "pid"}), json!({"type": "mount"})];
        let ns = |kind: &str, path: &Option<PathBuf>| match path {
            Some(p) => json!({"type": kind, "path": p}),
            None => json!({"type": kind}),
        };
        if !self.namespaces.host_network {
            namespaces.push(ns("network", &self.namespaces.network));
        }
        namespaces.push(ns("ipc", &self.namespaces.ipc));
        namespaces.push(ns("uts", &self.namespaces.uts));
        let mut mounts = vec![
            json!({"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]}),
            json!({"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
                   "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]}),
            json!({"destination": "/dev/pts", "type": "devpts", "source": "devpts",
                   "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"]}),
            json!({"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
                   "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]}),
            json!({"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]}),
            json!({"destination": "/sys", "type": "sysfs", "source": "sysfs",
                   "options": ["nosuid", "noexec", "nodev", if self.privileged { "rw" } else { "ro" }]}),
        ];
        for m in &self.mounts {
            let mut options = vec!["rbind", "rprivate"];
            options.push(if m.readonly { "ro" } else { "rw" });
            mounts.push(json!({"destination": m.destination, "type": "bind", "source": m.source, "options": options}));
        }
        let mut resources = json!({"devices": [{"allow": false, "access": "rwm"}]});
        if let Some(limit) = self.resources.memory_limit {
            resources["memory"] = json!({"limit": limit, "swap": limit});
        }
        let mut cpu = json!({});
        if let Some(quota) = self.resources.cpu_quota {
            cpu["quota"] = json!(quota);
            cpu["period"] = json!(100_000);
        }
        if let Some(shares) = self.resources.cpu_shares {
            cpu["shares"] = json!(shares);
        }
        if cpu != json!({}) {
            resources["cpu"] = cpu;
        }
        let mut linux = json!({
            "namespaces": namespaces,
            "cgroupsPath": self.cgroups_path,
            "resources": resources,
        });
        if !self.sysctls.is_empty() {
            linux["sysctl"] = json!(self.sysctls);
        }
        if self.privileged {
            resources_allow_all(&mut linux);
        } else {
            linux["maskedPaths"] = json!([
                "/proc/acpi",
                "/proc/asound",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/timer_stats",
                "/proc/sched_debug",
                "/sys/firmware",
                "/proc/scsi"
            ]);
            linux["readonlyPaths"] = json!(["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]);
        }
        json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": self.tty,
                "user": {"uid": self.uid, "gid": self.gid, "additionalGids": self.additional_gids},
                "args": self.args,
                "env": self.env,
                "cwd": if self.cwd.is_empty() { "/" } else { &self.cwd },
                "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
                "noNewPrivileges": self.no_new_privileges && !self.privileged,
            },
            "root": {"path": rootfs, "readonly": self.readonly_rootfs},
            "hostname": self.hostname,
            "mounts": mounts,
            "linux": linux,
        })
    }
}

fn resources_allow_all(linux: &mut Value) {
    linux["resources"]["devices"] = json!([{"allow": true, "access": "rwm"}]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_capability_is_listed_at_its_number() {
        let at = |name: &str| ALL_CAPABILITIES.iter().position(|c| *c == name);
        assert_eq!((at("CAP_CHOWN"), at("CAP_SYS_ADMIN"), at("CAP_SYS_RESOURCE")), (Some(0), Some(21), Some(24)));
        assert_eq!((at("CAP_AUDIT_READ"), at("CAP_CHECKPOINT_RESTORE")), (Some(37), Some(40)));
    }

    #[test]
    fn capabilities_follow_add_drop_and_privileged() {
        let mut c = ContainerConfig { capabilities_add: vec!["NET_ADMIN".into()], ..Default::default() };
        c.capabilities_drop = vec!["KILL".into()];
        let caps = c.capabilities();
        assert!(caps.contains(&"CAP_NET_ADMIN".to_string()));
        assert!(!caps.contains(&"CAP_KILL".to_string()));
        assert!(caps.contains(&"CAP_CHOWN".to_string()));
        c.capabilities_drop = vec!["ALL".into()];
        assert_eq!(c.capabilities(), vec!["CAP_NET_ADMIN".to_string()]);
        c.privileged = true;
        assert!(c.capabilities().contains(&"CAP_SYS_ADMIN".to_string()));
    }

    #[test]
    fn the_spec_joins_the_pod_namespaces_and_limits_memory() {
        let c = ContainerConfig {
            args: vec!["sh".into()],
            namespaces: SharedNamespaces { network: Some("/ns/net".into()), ..Default::default() },
            resources: Resources { memory_limit: Some(1 << 20), ..Default::default() },
            cgroups_path: "tugboat/n/pod1/c".into(),
            ..Default::default()
        };
        let spec = c.oci_spec(std::path::Path::new("/r"));
        assert_eq!(spec["linux"]["namespaces"][2], json!({"type": "network", "path": "/ns/net"}));
        assert_eq!(spec["linux"]["resources"]["memory"]["limit"], json!(1 << 20));
        assert_eq!(spec["linux"]["cgroupsPath"], "tugboat/n/pod1/c");
        let host = ContainerConfig { namespaces: SharedNamespaces { host_network: true, ..Default::default() }, ..c };
        let spec = host.oci_spec(std::path::Path::new("/r"));
        assert!(!spec["linux"]["namespaces"].as_array().unwrap().iter().any(|n| n["type"] == "network"));
    }
}
