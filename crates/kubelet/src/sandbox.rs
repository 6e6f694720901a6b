//! A pod's sandbox: the network, IPC and UTS namespaces its containers share, kept alive by
//! bind mounts in the pod's directory (no pause process), with loopback up and, when the node
//! has a podCIDR, `eth0` on the node bridge with an address from it.
//!
//! Interfaces and addresses are set with iproute2's `ip` (a process per step; netlink from Rust
//! is the planned replacement).

use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context, bail};
use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use tugboat_network::pod_network::{BRIDGE, PodNetwork, ip_batch};

/// What a pod's sandbox is, once made.
#[derive(Debug, Clone, PartialEq)]
pub struct Sandbox {
    pub dir: PathBuf,
    /// `None` for hostNetwork pods.
    pub net: Option<PathBuf>,
    pub ipc: PathBuf,
    pub uts: PathBuf,
    pub ip: Option<Ipv4Addr>,
}

impl Sandbox {
    fn at(dir: &Path, host_network: bool, ip: Option<Ipv4Addr>) -> Sandbox {
        Sandbox {
            dir: dir.to_path_buf(),
            net: (!host_network).then(|| dir.join("ns/net")),
            ipc: dir.join("ns/ipc"),
            uts: dir.join("ns/uts"),
            ip,
        }
    }

    /// The sandbox recorded in `dir`, if it was completely made.
    pub fn load(dir: &Path) -> Option<Sandbox> {
        let record: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("sandbox.json")).ok()?).ok()?;
        let ip = record["ip"].as_str().and_then(|s| s.parse().ok());
        Some(Sandbox::at(dir, record["hostNetwork"].as_bool().unwrap_or(false), ip))
    }
}

/// The IP address book: one file per address in use, holding the pod's uid.
#[derive(Debug, Clone)]
pub struct Ipam {
    dir: PathBuf,
}

impl Ipam {
    pub fn new(dir: PathBuf) -> std::io::Result<Ipam> {
        std::fs::create_dir_all(&dir)?;
        Ok(Ipam { dir })
    }

    /// The address held by `owner`, or the lowest free one.
    pub fn allocate(&self, network: &PodNetwork, owner: &str) -> anyhow::Result<Ipv4Addr> {
        for ip in network.hosts() {
            let file = self.dir.join(ip.to_string());
            match std::fs::OpenOptions::new().write(true).create_new(true).open(&file) {
                Ok(mut f) => {
                    f.write_all(owner.as_bytes())?;
                    return Ok(ip);
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    if std::fs::read_to_string(&file).unwrap_or_default() == owner {
                        return Ok(ip);
                    }
                }
                Err(e) => return Err(e.into()),
            }
        }
        bail!("no free address left in {}/{}", network.base, network.prefix)
    }

    pub fn release(&self, owner: &str) {
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                if std::fs::read_to_string(entry.path()).unwrap_or_default() == owner {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
    }
}

/// Makes the node bridge (idempotent): `tugboat0` with the gateway address, up.
pub fn ensure_bridge(network: &PodNetwork) -> anyhow::Result<()> {
    // One at a time: the first pods of a node all find no bridge, and a second `addr add` of
    // the gateway fails.
    static MAKING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _making = MAKING.lock().unwrap_or_else(|e| e.into_inner());
    let exists =
        Command::new("ip").args(["link", "show", BRIDGE]).stdout(Stdio::null()).stderr(Stdio::null()).status()?;
    if !exists.success() {
        let _ = ip_batch(&format!("link add {BRIDGE} type bridge\n"));
    }
    let gateway = format!("{}/{}", network.gateway(), network.prefix);
    let addresses = Command::new("ip").args(["-o", "addr", "show", "dev", BRIDGE]).output()?;
    let mut commands = String::new();
    if !String::from_utf8_lossy(&addresses.stdout).contains(&format!(" {gateway} ")) {
        commands.push_str(&format!("addr add {gateway} dev {BRIDGE}\n"));
    }
    commands.push_str(&format!("link set {BRIDGE} up\n"));
    ip_batch(&commands)
}

/// The host side of a pod's veth pair: `tb` and 12 hex digits of its uid (15 characters at most).
pub fn host_veth(uid: &str) -> String {
    let hex: String = uid.chars().filter(char::is_ascii_hexdigit).take(12).collect();
    format!("tb{hex}")
}

/// Makes a pod's sandbox in `dir` (idempotent: a complete one is returned as it is).
pub fn create(
    dir: &Path,
    uid: &str,
    hostname: &str,
    host_network: bool,
    network: Option<(&PodNetwork, Ipv4Addr)>,
) -> anyhow::Result<Sandbox> {
    if let Some(sandbox) = Sandbox::load(dir) {
        return Ok(sandbox);
    }
    // A half-made one (the kubelet died while making it) is made again.
    destroy(dir);
    std::fs::create_dir_all(dir.join("ns"))?;
    let sandbox = Sandbox::at(dir, host_network, network.map(|(_, ip)| ip));
    let (hostname, veth, sandbox_copy) = (hostname.to_string(), host_veth(uid), sandbox.clone());
    let network = network.map(|(n, ip)| (*n, ip));
    let kubelet = std::process::id();
    // Namespaces are per thread: a thread of its own enters new ones, pins them with bind
    // mounts, sets them up, and ends.
    std::thread::spawn(move || -> anyhow::Result<()> {
        let sandbox = sandbox_copy;
        let mut flags = CloneFlags::CLONE_NEWIPC | CloneFlags::CLONE_NEWUTS;
        if !host_network {
            flags |= CloneFlags::CLONE_NEWNET;
        }
        nix::sched::unshare(flags).context("unshare")?;
        nix::unistd::sethostname(&hostname).context("sethostname")?;
        let mut pins = vec![("ipc", &sandbox.ipc), ("uts", &sandbox.uts)];
        if let Some(net) = &sandbox.net {
            pins.push(("net", net));
        }
        for (kind, file) in pins {
            std::fs::File::create(file)?;
            let source = format!("/proc/thread-self/ns/{kind}");
            nix::mount::mount(Some(source.as_str()), file, None::<&str>, MsFlags::MS_BIND, None::<&str>)
                .with_context(|| format!("pinning the {kind} namespace"))?;
        }
        if host_network {
            return Ok(());
        }
        let mut commands = String::from("link set lo up\n");
        if let Some((network, ip)) = network {
            commands.push_str(&format!(
                "link add eth0 type veth peer name {veth} netns {kubelet}\n\
                 addr add {ip}/{prefix} dev eth0\n\
                 link set eth0 up\n\
                 route add default via {gateway}\n",
                prefix = network.prefix,
                gateway = network.gateway()
            ));
        }
        ip_batch(&commands)
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the sandbox thread panicked"))??;
    if network.is_some() {
        // Hairpin on the bridge port: a pod reaching its own Service is DNATed back to
        // itself, and with bridge netfilter on the frame leaves by the port it came in on.
        let veth = host_veth(uid);
        ip_batch(&format!("link set {veth} master {BRIDGE} up\nlink set {veth} type bridge_slave hairpin on\n"))?;
    }
    let record = serde_json::json!({"hostNetwork": host_network, "ip": sandbox.ip.map(|ip| ip.to_string())});
    tugboat_runtime::images::write_durably(&dir.join("sandbox.json"), record.to_string().as_bytes())?;
    Ok(sandbox)
}

/// Undoes [`create`]: the namespaces go when their last user does (the veth with the netns).
pub fn destroy(dir: &Path) {
    for kind in ["net", "ipc", "uts"] {
        let _ = nix::mount::umount2(&dir.join("ns").join(kind), MntFlags::MNT_DETACH);
    }
    let _ = std::fs::remove_file(dir.join("sandbox.json"));
    let _ = std::fs::remove_dir_all(dir.join("ns"));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_networks_hand_out_host_addresses() {
        let n = PodNetwork::parse("10.244.3.7/24").unwrap();
        assert_eq!(n.base, Ipv4Addr::new(10, 244, 3, 0));
        assert_eq!(n.gateway(), Ipv4Addr::new(10, 244, 3, 1));
        let hosts: Vec<_> = n.hosts().collect();
        assert_eq!(hosts.first(), Some(&Ipv4Addr::new(10, 244, 3, 2)));
        assert_eq!(hosts.last(), Some(&Ipv4Addr::new(10, 244, 3, 254)));
        assert_eq!(PodNetwork::parse("10.0.0.0/31"), None);
        assert_eq!(PodNetwork::parse("fd00::/64"), None);
        assert_eq!(host_veth("1b2c3d4e-5f60-7182-93a4-b5c6d7e8f901"), "tb1b2c3d4e5f60");
    }

    #[test]
    fn ipam_keeps_an_owner_s_address_and_reuses_released_ones() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::new(dir.path().to_path_buf()).unwrap();
        let n = PodNetwork::parse("10.1.0.0/29").unwrap();
        let a = ipam.allocate(&n, "a").unwrap();
        let b = ipam.allocate(&n, "b").unwrap();
        assert_eq!((a, b), (Ipv4Addr::new(10, 1, 0, 2), Ipv4Addr::new(10, 1, 0, 3)));
        assert_eq!(ipam.allocate(&n, "a").unwrap(), a);
        ipam.release("a");
        assert_eq!(ipam.allocate(&n, "c").unwrap(), a);
        for owner in ["d", "e", "f"] {
            ipam.allocate(&n, owner).unwrap();
        }
        assert!(ipam.allocate(&n, "g").is_err());
    }
}
