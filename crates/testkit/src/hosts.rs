//! Several hosts on one machine: each host is a network namespace with an `eth0` on a bridge
//! (the "switch"), an address of its own and a default route through the switch, and a
//! temporary directory for its data dirs and logs. Programs run in a host through `nsenter
//! --net` (not `ip netns exec`, which remounts `/sys` and hides the cgroup mounts from the
//! kubelet). A host's processes can be killed, its link cut and restored.
//!
//! Use it only inside [`crate::isolated`]: the switch, the namespaces and the tmpfs on
//! `/run/netns` then live in namespaces the test made, so no packet leaves them and nothing is
//! left behind, even when the test fails.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, bail};

/// The switch's name and address; host `i` is `10.77.0.(10+i)/24`.
const SWITCH: &str = "tbswitch";
const SWITCH_ADDRESS: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

/// Runs `program args…`, failing with its stderr.
fn run(program: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(program).args(args).output().with_context(|| format!("running {program}"))?;
    if !out.status.success() {
        bail!("{program} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The hosts on one switch; dropping it kills every host's processes and removes the hosts.
#[derive(Debug)]
pub struct Hosts {
    hosts: Vec<Host>,
}

/// One host: a network namespace `/run/netns/<name>` and a directory.
#[derive(Debug)]
pub struct Host {
    name: String,
    address: Ipv4Addr,
    dir: tempfile::TempDir,
    processes: Vec<(String, Child)>,
}

impl Hosts {
    /// Makes `count` hosts named `host-0`, `host-1`, ….
    pub fn new(count: usize) -> anyhow::Result<Hosts> {
        if std::env::var_os("TUGBOAT_ISOLATED").is_none() {
            bail!("several hosts are made only inside tugboat_testkit::isolated");
        }
        // A private /run/netns: the namespaces' names are the test's own.
        std::fs::create_dir_all("/run/netns")?;
        run("mount", &["-t", "tmpfs", "-o", "mode=0755", "tugboat-netns", "/run/netns"])?;
        run("ip", &["link", "add", SWITCH, "type", "bridge"])?;
        run("ip", &["addr", "add", &format!("{SWITCH_ADDRESS}/24"), "dev", SWITCH])?;
        run("ip", &["link", "set", SWITCH, "up"])?;
        let mut hosts = Hosts { hosts: Vec::new() };
        for i in 0..count {
            let name = format!("host-{i}");
            let address = Ipv4Addr::new(10, 77, 0, 10 + i as u8);
            let dir = tempfile::Builder::new().prefix(&format!("tugboat-{name}-")).tempdir()?;
            let host = Host { name, address, dir, processes: Vec::new() };
            let link = host.link();
            run("ip", &["netns", "add", &host.name])?;
            run("ip", &["link", "add", &link, "type", "veth", "peer", "name", "eth0", "netns", &host.name])?;
            run("ip", &["link", "set", &link, "master", SWITCH, "up"])?;
            for args in [
                vec!["link", "set", "lo", "up"],
                vec!["addr", "add", &format!("{address}/24"), "dev", "eth0"],
                vec!["link", "set", "eth0", "up"],
                vec!["route", "add", "default", "via", &SWITCH_ADDRESS.to_string()],
            ] {
                run("ip", &[&["-n", &host.name][..], &args].concat())?;
            }
            hosts.hosts.push(host);
        }
        Ok(hosts)
    }

    /// How many hosts there are.
    pub fn len(&self) -> usize {
        self.hosts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.hosts.is_empty()
    }

    pub fn get(&self, i: usize) -> &Host {
        &self.hosts[i]
    }

    pub fn get_mut(&mut self, i: usize) -> &mut Host {
        &mut self.hosts[i]
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for host in &mut self.hosts {
            host.kill();
            let _ = run("ip", &["netns", "del", &host.name]);
        }
        let _ = run("ip", &["link", "del", SWITCH]);
        let _ = run("umount", &["-l", "/run/netns"]);
    }
}

impl Host {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The host's address on the switch.
    pub fn address(&self) -> Ipv4Addr {
        self.address
    }

    /// A directory of the host's own (data dirs, logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The switch's end of the host's link.
    fn link(&self) -> String {
        format!("sw-{}", self.name)
    }

    /// `program` to run inside the host's network namespace.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut command = Command::new("nsenter");
        command.arg(format!("--net=/run/netns/{}", self.name)).arg("--").arg(program);
        command
    }

    /// Starts `command` (from [`Host::command`]) in the background, its output appended to
    /// `<dir>/<label>.log`; it is killed with the host.
    pub fn spawn(&mut self, label: &str, mut command: Command) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.log_path(label))?;
        let child = command
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("starting {label} on {}", self.name))?;
        self.processes.push((label.to_string(), child));
        Ok(())
    }

    pub fn log_path(&self, label: &str) -> PathBuf {
        self.dir().join(format!("{label}.log"))
    }

    /// What `label` logged so far.
    pub fn log(&self, label: &str) -> String {
        std::fs::read_to_string(self.log_path(label)).unwrap_or_default()
    }

    /// Kills (SIGKILL) every process of the host: those in its network namespace and their
    /// descendants (containers live in namespaces of their own), as a power cut would.
    pub fn kill(&mut self) {
        let mut doomed: Vec<i32> = self.processes.iter().map(|(_, c)| c.id() as i32).collect();
        if let Ok(out) = Command::new("ip").args(["netns", "pids", &self.name]).output() {
            doomed
                .extend(String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<i32>().ok()));
        }
        // Descendants, found by parent pid; repeated until nothing new turns up.
        let parents = parent_pids();
        loop {
            let more: Vec<i32> = parents
                .iter()
                .filter(|(pid, parent)| doomed.contains(parent) && !doomed.contains(pid))
                .map(|(pid, _)| *pid)
                .collect();
            if more.is_empty() {
                break;
            }
            doomed.extend(more);
        }
        if !doomed.is_empty() {
            let pids: Vec<String> = doomed.iter().map(i32::to_string).collect();
            let _ = Command::new("kill").arg("-9").args(&pids).stderr(Stdio::null()).status();
        }
        for (_, child) in &mut self.processes {
            let _ = child.wait();
        }
        self.processes.clear();
    }

    /// Cuts the host's link to the switch: nothing goes in or out until [`Host::restore`].
    pub fn cut(&self) -> anyhow::Result<()> {
        run("ip", &["link", "set", &self.link(), "down"])
    }

    /// Plugs the host's link back in.
    pub fn restore(&self) -> anyhow::Result<()> {
        run("ip", &["link", "set", &self.link(), "up"])
    }
}

/// (pid, parent pid) of every process this pid namespace shows.
fn parent_pids() -> Vec<(i32, i32)> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = std::fs::read_to_string(entry.path().join("stat")).ok()?;
            // `pid (comm) state ppid …`: comm may hold spaces and parentheses.
            let parent = stat.rsplit_once(')')?.1.split_whitespace().nth(1)?.parse().ok()?;
            Some((pid, parent))
        })
        .collect()
}
