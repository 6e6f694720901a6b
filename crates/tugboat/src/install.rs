//! `tugboat install server|agent [flags]` and `tugboat uninstall [--purge]`: Tugboat as a
//! systemd service.
//!
//! Install copies this binary to `/usr/local/bin/tugboat` stripped of its debug info (which
//! `--debug-info` installs apart, under `/usr/lib/debug`), writes `tugboat.service` (server)
//! or `tugboat-agent.service` (agent) running it with the given flags — a join token goes
//! into an environment file only root can read, not onto the command line — records what it
//! wrote in `/etc/tugboat/install.json`, and enables and starts the unit where systemd runs.
//! Running it again rewrites the same files. Uninstall removes what the record names; with
//! `--purge` also the data dirs, the node's bridge and the nftables tables the node made.
//! `--root DIR` puts every path under DIR (and leaves systemd alone): packaging and tests.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Server,
    Agent,
}

impl Role {
    fn unit(self) -> &'static str {
        match self {
            Role::Server => "tugboat.service",
            Role::Agent => "tugboat-agent.service",
        }
    }

    fn subcommand(self) -> &'static str {
        match self {
            Role::Server => "server",
            Role::Agent => "agent",
        }
    }

    fn default_data_dir(self) -> &'static str {
        match self {
            Role::Server => "/var/lib/tugboat",
            Role::Agent => "/var/lib/tugboat/agent",
        }
    }
}

#[derive(Debug, clap::Args)]
pub struct InstallArgs {
    /// What this host runs.
    role: Role,
    /// Install under this directory instead of / (systemd is then left alone).
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Write the files but do not enable or start the unit.
    #[arg(long)]
    no_start: bool,
    /// Also install the debug info (for debuggers and symbolized backtraces) as
    /// /usr/lib/debug/usr/local/bin/tugboat.debug; the binary itself is always stripped.
    #[arg(long)]
    debug_info: bool,
    /// The flags of `tugboat server` / `tugboat agent`, as you would give them.
    #[arg(last = true, allow_hyphen_values = true)]
    flags: Vec<String>,
}

#[derive(Debug, clap::Args)]
pub struct UninstallArgs {
    /// The --root given to install.
    #[arg(long, default_value = "/")]
    root: PathBuf,
    /// Also delete the data dirs, the node bridge and the node's nftables tables.
    #[arg(long)]
    purge: bool,
}

/// What install wrote, so uninstall removes exactly that.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Record {
    /// Absolute paths (without the root) of the files written.
    files: Vec<String>,
    /// Installed units and their data dirs.
    units: Vec<(Role, String)>,
}

const BINARY: &str = "/usr/local/bin/tugboat";
/// Where gdb and Rust's backtraces look for the debug info that the stripped binary's
/// `.gnu_debuglink` names (the global debug directory, then the binary's path).
const DEBUG_FILE: &str = "/usr/lib/debug/usr/local/bin/tugboat.debug";
const UNIT_DIR: &str = "/etc/systemd/system";
const CONFIG_DIR: &str = "/etc/tugboat";
const RECORD: &str = "/etc/tugboat/install.json";

/// `root` + an absolute path.
fn under(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

fn systemd_runs(root: &Path) -> bool {
    root == Path::new("/") && Path::new("/run/systemd/system").is_dir()
}

fn systemctl(args: &[&str]) -> anyhow::Result<()> {
    let status = Command::new("systemctl").args(args).status().context("running systemctl")?;
    if !status.success() {
        bail!("systemctl {} failed: {status}", args.join(" "));
    }
    Ok(())
}

/// Writes `contents` to `path` (mode `mode`, atomically) unless the file already holds
/// exactly that; says whether it wrote.
fn write_if_changed(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<bool> {
    use std::os::unix::fs::PermissionsExt;
    if std::fs::read(path).is_ok_and(|old| old == contents) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))?;
        return Ok(false);
    }
    tugboat_pki::write_file(path, contents, mode)?;
    Ok(true)
}

/// An argument as systemd's ExecStart reads it: quoted when it holds spaces, quotes,
/// backslashes or specifiers.
fn quote(arg: &str) -> String {
    if !arg.is_empty() && !arg.contains(|c: char| c.is_whitespace() || matches!(c, '"' | '\'' | '\\' | '%' | '$' | ';'))
    {
        return arg.to_string();
    }
    let escaped = arg.replace('\\', "\\\\").replace('"', "\\\"").replace('%', "%%").replace('$', "$$");
    format!("\"{escaped}\"")
}

/// Splits the secret flags (`--token`) out of `flags`: (the rest, environment lines).
fn split_secrets(flags: &[String]) -> (Vec<String>, Vec<String>) {
    let (mut rest, mut env) = (Vec::new(), Vec::new());
    let mut iter = flags.iter();
    while let Some(flag) = iter.next() {
        if let Some(value) = flag.strip_prefix("--token=") {
            env.push(format!("TUGBOAT_TOKEN={value}"));
        } else if flag == "--token" {
            if let Some(value) = iter.next() {
                env.push(format!("TUGBOAT_TOKEN={value}"));
            }
        } else {
            rest.push(flag.clone());
        }
    }
    (rest, env)
}

/// The value of `--data-dir` in `flags`, else the role's default.
fn data_dir(role: Role, flags: &[String]) -> String {
    let mut iter = flags.iter();
    while let Some(flag) = iter.next() {
        if let Some(value) = flag.strip_prefix("--data-dir=") {
            return value.to_string();
        }
        if flag == "--data-dir"
            && let Some(value) = iter.next()
        {
            return value.clone();
        }
    }
    role.default_data_dir().to_string()
}

/// The unit file for `role` running `flags`, with `env_file` if secrets were split out.
fn unit_file(role: Role, flags: &[String], env_file: Option<&str>) -> String {
    let description = match role {
        Role::Server => "Tugboat server: Kubernetes control plane and node",
        Role::Agent => "Tugboat agent: Kubernetes node",
    };
    let mut exec = format!("{BINARY} {}", role.subcommand());
    for flag in flags {
        exec.push(' ');
        exec.push_str(&quote(flag));
    }
    let environment = env_file.map(|f| format!("EnvironmentFile=-{f}\n")).unwrap_or_default();
    // KillMode=process: a restart stops tugboat only; the containers' shims carry on and the
    // new kubelet adopts them. Delegate: the kubelet manages the cgroups below its own.
    format!(
        "[Unit]\n\
         Description={description}\n\
         Wants=network-online.target\n\
         After=network-online.target\n\
         \n\
         [Service]\n\
         Type=exec\n\
         {environment}\
         ExecStart={exec}\n\
         KillMode=process\n\
         Delegate=yes\n\
         LimitNOFILE=1048576\n\
         LimitNPROC=infinity\n\
         LimitCORE=infinity\n\
         TasksMax=infinity\n\
         TimeoutStartSec=0\n\
         Restart=always\n\
         RestartSec=5s\n\
         \n\
         [Install]\n\
         WantedBy=multi-user.target\n"
    )
}

/// Runs `objcopy` (binutils) with `args`.
fn objcopy(args: &[&std::ffi::OsStr]) -> anyhow::Result<()> {
    let out = Command::new("objcopy").args(args).output().context("running objcopy (binutils)")?;
    if !out.status.success() {
        bail!("objcopy failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// `binary` without its debug info and symbol table, with a `.gnu_debuglink` to
/// `tugboat.debug` — the build keeps line tables for backtraces, 400 MiB of them; the stripped
/// binary is about a tenth of that — and that debug info (`objcopy --only-keep-debug`), made in
/// `scratch`. Without objcopy: the binary whole, with a warning, and no debug file.
fn split_debug_info(binary: &Path, scratch: &Path) -> anyhow::Result<(Vec<u8>, Option<PathBuf>)> {
    let debug = scratch.join("tugboat.debug");
    let stripped = scratch.join("tugboat");
    let debuglink = std::ffi::OsString::from(format!("--add-gnu-debuglink={}", debug.display()));
    let split = objcopy(&["--only-keep-debug".as_ref(), binary.as_os_str(), debug.as_os_str()]).and_then(|()| {
        // The link names the file by its name only, with its CRC: a debugger finds it under
        // /usr/lib/debug.
        objcopy(&["--strip-all".as_ref(), &debuglink, binary.as_os_str(), stripped.as_os_str()])
    });
    match split {
        Ok(()) => {
            Ok((std::fs::read(&stripped).with_context(|| format!("reading {}", stripped.display()))?, Some(debug)))
        }
        Err(error) => {
            eprintln!("warning: installing the binary unstripped (with its debug info): {error:#}");
            Ok((std::fs::read(binary).with_context(|| format!("reading {}", binary.display()))?, None))
        }
    }
}

/// Installs `binary` stripped at `target`, and its debug info at `debug_file` if given;
/// rewrites each only when it differs.
fn install_binary(binary: &Path, target: &Path, debug_file: Option<&Path>) -> anyhow::Result<()> {
    let scratch = std::env::temp_dir().join(format!("tugboat-install-{}", std::process::id()));
    std::fs::create_dir_all(&scratch).with_context(|| format!("creating {}", scratch.display()))?;
    let result = (|| {
        let (bytes, debug) = split_debug_info(binary, &scratch)?;
        let mib = |n: usize| n as f64 / (1 << 20) as f64;
        if write_if_changed(target, &bytes, 0o755)? {
            println!("installed {} ({:.1} MiB)", target.display(), mib(bytes.len()));
        }
        if let Some(debug_file) = debug_file {
            let debug = debug.context("no debug info to install without objcopy (binutils)")?;
            let bytes = std::fs::read(&debug)?;
            if write_if_changed(debug_file, &bytes, 0o644)? {
                println!("installed {} ({:.1} MiB)", debug_file.display(), mib(bytes.len()));
            }
        }
        anyhow::Ok(())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

fn load_record(root: &Path) -> anyhow::Result<Record> {
    let path = under(root, RECORD);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Record::default()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

pub fn install(args: InstallArgs) -> anyhow::Result<()> {
    let root = &args.root;
    let mut record = load_record(root)?;
    let remember = |record: &mut Record, path: &str| {
        if !record.files.iter().any(|f| f == path) {
            record.files.push(path.to_string());
        }
    };
    // The binary: this one, without its debug info (kept apart with --debug-info).
    let me = std::env::current_exe().context("finding this binary")?;
    let target = under(root, BINARY);
    let debug_file = under(root, DEBUG_FILE);
    if std::fs::canonicalize(&me).ok() != std::fs::canonicalize(&target).ok() {
        install_binary(&me, &target, args.debug_info.then_some(debug_file.as_path()))?;
    }
    remember(&mut record, BINARY);
    if args.debug_info {
        remember(&mut record, DEBUG_FILE);
    } else if std::fs::remove_file(&debug_file).is_ok() {
        println!("removed {}", debug_file.display());
    }

    let (flags, env) = split_secrets(&args.flags);
    let env_file = format!("{CONFIG_DIR}/{}.env", args.role.unit().trim_end_matches(".service"));
    let env_path = under(root, &env_file);
    if env.is_empty() {
        let _ = std::fs::remove_file(&env_path);
    } else {
        write_if_changed(&env_path, format!("{}\n", env.join("\n")).as_bytes(), 0o600)?;
        remember(&mut record, &env_file);
    }
    let unit = format!("{UNIT_DIR}/{}", args.role.unit());
    let contents = unit_file(args.role, &flags, (!env.is_empty()).then_some(env_file.as_str()));
    let changed = write_if_changed(&under(root, &unit), contents.as_bytes(), 0o644)?;
    println!("{} {}", if changed { "wrote" } else { "unchanged" }, under(root, &unit).display());
    remember(&mut record, &unit);
    let data = data_dir(args.role, &flags);
    record.units.retain(|(role, _)| *role != args.role);
    record.units.push((args.role, data));
    write_if_changed(&under(root, RECORD), serde_json::to_string_pretty(&record)?.as_bytes(), 0o644)?;

    if systemd_runs(root) {
        systemctl(&["daemon-reload"])?;
        if !args.no_start {
            systemctl(&["enable", args.role.unit()])?;
            // A changed unit takes effect by a restart; an unchanged running one is left alone.
            systemctl(&[if changed { "restart" } else { "start" }, args.role.unit()])?;
            println!("{} enabled and started", args.role.unit());
        }
    } else {
        println!(
            "systemd is not running here: start it with `{BINARY} {} …` or your init system",
            args.role.subcommand()
        );
    }
    Ok(())
}

pub fn uninstall(args: UninstallArgs) -> anyhow::Result<()> {
    let root = &args.root;
    let record = load_record(root)?;
    if record.files.is_empty() {
        bail!("nothing to uninstall: {} records no installation", under(root, RECORD).display());
    }
    if systemd_runs(root) {
        for (role, _) in &record.units {
            let _ = systemctl(&["disable", "--now", role.unit()]);
        }
    }
    for file in &record.files {
        let path = under(root, file);
        match std::fs::remove_file(&path) {
            Ok(()) => println!("removed {}", path.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }
    if systemd_runs(root) {
        let _ = systemctl(&["daemon-reload"]);
    }
    if args.purge {
        for (_, data) in &record.units {
            let path = under(root, data);
            if path.exists() {
                std::fs::remove_dir_all(&path).with_context(|| format!("removing {}", path.display()))?;
                println!("removed {}", path.display());
            }
        }
        // What the node made in the host's network: its bridge, its routes to other nodes'
        // pods, its nftables tables (all named tugboat…) and the proxy's iptables chains.
        let bridge = tugboat_network::pod_network::BRIDGE;
        if Command::new("ip").args(["link", "del", bridge]).output().is_ok_and(|o| o.status.success()) {
            println!("removed the bridge {bridge}");
        }
        let proto = tugboat_network::pod_network::PROTO;
        if Command::new("ip").args(["route", "flush", "proto", proto]).output().is_ok_and(|o| o.status.success()) {
            println!("removed the pod network's routes");
        }
        let tables = Command::new("nft").args(["list", "tables"]).output().map(|o| o.stdout).unwrap_or_default();
        for line in String::from_utf8_lossy(&tables).lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["table", family, name] = words[..]
                && name.starts_with("tugboat")
                && Command::new("nft").args(["delete", "table", family, name]).status().is_ok_and(|s| s.success())
            {
                println!("removed the nftables table {family} {name}");
            }
        }
        // The proxy's chains of iptables mode, if it ran so.
        if let Err(error) = tugboat_network::proxy::iptables::remove() {
            eprintln!("warning: the service proxy's iptables chains: {error:#}");
        }
    }
    let record_path = under(root, RECORD);
    let _ = std::fs::remove_file(&record_path);
    let _ = std::fs::remove_dir(under(root, CONFIG_DIR));
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_arguments_are_quoted_for_systemd() {
        assert_eq!(quote("--node-name"), "--node-name");
        assert_eq!(quote("a b"), "\"a b\"");
        assert_eq!(quote("50%"), "\"50%%\"");
        assert_eq!(quote(""), "\"\"");
        assert_eq!(quote(r#"say "hi""#), r#""say \"hi\"""#);
    }

    #[test]
    fn tokens_leave_the_command_line() {
        let flags: Vec<String> =
            ["--server", "https://a:6443", "--token", "abcdef.0123456789abcdef", "--node-name", "n1"]
                .map(String::from)
                .to_vec();
        let (rest, env) = split_secrets(&flags);
        assert_eq!(rest, ["--server", "https://a:6443", "--node-name", "n1"]);
        assert_eq!(env, ["TUGBOAT_TOKEN=abcdef.0123456789abcdef"]);
        assert_eq!(data_dir(Role::Agent, &rest), "/var/lib/tugboat/agent");
        assert_eq!(data_dir(Role::Server, &["--data-dir=/srv/t".to_string()]), "/srv/t");
    }
}
