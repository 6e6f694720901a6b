//! What a node is, read from the host: CPUs, memory, disk, kernel, OS, identity, the address of
//! the default route's interface, and whether memory, disk or process IDs run short. The
//! parsers are pure (tested on sample text); `Host::read` does the reading.

use std::net::IpAddr;
use std::path::Path;

/// The host's facts as the kubelet reports them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Host {
    pub hostname: String,
    pub cpus: usize,
    /// MemTotal, bytes.
    pub memory: u64,
    /// MemAvailable, bytes.
    pub memory_available: u64,
    /// Size and free space of the filesystem holding the data dir, bytes.
    pub disk: u64,
    pub disk_available: u64,
    pub kernel: String,
    pub os_image: String,
    pub machine_id: String,
    pub boot_id: String,
    pub system_uuid: String,
    /// Processes running now, and the most there may be.
    pub processes: u64,
    pub pid_max: u64,
}

impl Host {
    /// Reads the facts; `data_dir` names the filesystem whose space counts as ephemeral storage.
    pub fn read(data_dir: &Path) -> anyhow::Result<Host> {
        let text = |path: &str| std::fs::read_to_string(path).unwrap_or_default().trim().to_string();
        let meminfo = std::fs::read_to_string("/proc/meminfo")?;
        let fs = filesystem(data_dir)?;
        Ok(Host {
            hostname: hostname(),
            cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            memory: meminfo_bytes(&meminfo, "MemTotal").unwrap_or(0),
            memory_available: meminfo_bytes(&meminfo, "MemAvailable").unwrap_or(0),
            disk: fs.capacity,
            disk_available: fs.available,
            kernel: text("/proc/sys/kernel/osrelease"),
            os_image: os_image(&std::fs::read_to_string("/etc/os-release").unwrap_or_default()),
            machine_id: text("/etc/machine-id"),
            boot_id: text("/proc/sys/kernel/random/boot_id"),
            system_uuid: text("/sys/class/dmi/id/product_uuid"),
            processes: running_processes(&text("/proc/loadavg")).unwrap_or(0),
            pid_max: text("/proc/sys/kernel/pid_max").parse().unwrap_or(32768),
        })
    }

    /// Upstream's hard eviction thresholds: memory.available < 100Mi.
    pub fn memory_pressure(&self) -> bool {
        self.memory_available < 100 * 1024 * 1024
    }

    /// nodefs.available < 10%.
    pub fn disk_pressure(&self) -> bool {
        self.disk > 0 && self.disk_available * 10 < self.disk
    }

    /// More than 90% of the process IDs in use.
    pub fn pid_pressure(&self) -> bool {
        self.pid_max > 0 && self.processes * 10 > self.pid_max * 9
    }
}

/// Size and space of a filesystem, bytes.
#[derive(Debug, Clone, Copy)]
pub struct Filesystem {
    pub capacity: u64,
    /// Free for unprivileged users.
    pub available: u64,
    pub free: u64,
}

/// The filesystem holding `path`.
#[allow(clippy::unnecessary_cast)] // statvfs's field types differ between targets.
pub fn filesystem(path: &Path) -> std::io::Result<Filesystem> {
    let stat = nix::sys::statvfs::statvfs(path)?;
    let fragment = stat.fragment_size() as u64;
    Ok(Filesystem {
        capacity: stat.blocks() as u64 * fragment,
        available: stat.blocks_available() as u64 * fragment,
        free: stat.blocks_free() as u64 * fragment,
    })
}

/// The host's name, lower case, as the node is named by default.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_lowercase()
}

/// A `/proc/meminfo` field (given in kB) in bytes.
pub fn meminfo_bytes(meminfo: &str, field: &str) -> Option<u64> {
    meminfo.lines().find_map(|line| {
        let rest = line.strip_prefix(field)?.strip_prefix(':')?;
        let kib: u64 = rest.split_whitespace().next()?.parse().ok()?;
        Some(kib * 1024)
    })
}

/// `PRETTY_NAME` of `/etc/os-release`, unquoted.
pub fn os_image(os_release: &str) -> String {
    os_release
        .lines()
        .find_map(|line| line.strip_prefix("PRETTY_NAME="))
        .map(|value| value.trim().trim_matches('"').to_string())
        .unwrap_or_else(|| "Linux".into())
}

/// Running processes from `/proc/loadavg` (its fourth field, `running/total`: the total).
pub fn running_processes(loadavg: &str) -> Option<u64> {
    loadavg.split_whitespace().nth(3)?.split('/').nth(1)?.parse().ok()
}

/// The interface of the default IPv4 route in `/proc/net/route` (the lowest metric wins).
pub fn default_route_interface(route: &str) -> Option<String> {
    route
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // Iface Destination Gateway Flags RefCnt Use Metric Mask ...
            let (iface, destination, flags, metric, mask) =
                (fields.first()?, fields.get(1)?, fields.get(3)?, fields.get(6)?, fields.get(7)?);
            let up = u32::from_str_radix(flags, 16).ok()? & 1 == 1;
            (up && *destination == "00000000" && *mask == "00000000")
                .then(|| (metric.parse::<u32>().unwrap_or(0), *iface))
        })
        .min()
        .map(|(_, iface)| iface.to_string())
}

/// The node's address: the first IPv4 address of the default route's interface (upstream's
/// kubelet picks the default route's interface too), else of any interface but loopback.
pub fn node_ip() -> Option<IpAddr> {
    let route = std::fs::read_to_string("/proc/net/route").unwrap_or_default();
    let wanted = default_route_interface(&route);
    let addresses: Vec<(String, IpAddr)> = nix::ifaddrs::getifaddrs()
        .ok()?
        .filter_map(|ifaddr| {
            let ip = ifaddr.address?.as_sockaddr_in()?.ip();
            Some((ifaddr.interface_name, IpAddr::V4(ip)))
        })
        .collect();
    let on = |name: &str| addresses.iter().find(|(n, _)| n == name).map(|(_, ip)| *ip);
    wanted.as_deref().and_then(on).or_else(|| addresses.iter().map(|(_, ip)| *ip).find(|ip| !ip.is_loopback()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_files_are_read_as_the_kubelet_reads_them() {
        let meminfo = "MemTotal:       24684148 kB\nMemFree:         6283312 kB\nMemAvailable:   23990340 kB\n";
        assert_eq!(meminfo_bytes(meminfo, "MemTotal"), Some(24_684_148 * 1024));
        assert_eq!(meminfo_bytes(meminfo, "MemAvailable"), Some(23_990_340 * 1024));
        assert_eq!(meminfo_bytes(meminfo, "Mem"), None);
        assert_eq!(
            os_image("NAME=\"Debian GNU/Linux\"\nPRETTY_NAME=\"Debian GNU/Linux 13 (trixie)\"\n"),
            "Debian GNU/Linux 13 (trixie)"
        );
        assert_eq!(os_image(""), "Linux");
        assert_eq!(running_processes("0.52 0.58 0.59 2/187 12345"), Some(187));
        assert_eq!(running_processes("garbage"), None);

        let route = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth1\t00000000\t0101A8C0\t0003\t0\t0\t200\t00000000\t0\t0\t0\n\
                     eth0\t00000000\t0100000A\t0003\t0\t0\t100\t00000000\t0\t0\t0\n\
                     eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                     down0\t00000000\t0100000A\t0002\t0\t0\t0\t00000000\t0\t0\t0\n";
        assert_eq!(default_route_interface(route).as_deref(), Some("eth0"));
        assert_eq!(default_route_interface("Iface\tDestination\n"), None);
    }

    #[test]
    fn pressure_follows_upstreams_hard_eviction_thresholds() {
        let host = Host {
            hostname: "n".into(),
            cpus: 2,
            memory: 8 << 30,
            memory_available: 4 << 30,
            disk: 100,
            disk_available: 50,
            kernel: String::new(),
            os_image: String::new(),
            machine_id: String::new(),
            boot_id: String::new(),
            system_uuid: String::new(),
            processes: 100,
            pid_max: 1000,
        };
        assert!(!host.memory_pressure() && !host.disk_pressure() && !host.pid_pressure());
        let short = Host { memory_available: 99 << 20, disk_available: 9, processes: 901, ..host };
        assert!(short.memory_pressure() && short.disk_pressure() && short.pid_pressure());
    }
}
