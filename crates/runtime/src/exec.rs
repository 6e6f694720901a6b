//! `tugboat exec-in DIR -- COMMAND...`: runs a process inside a running container (its
//! namespaces, cgroup, user and environment) with libcontainer's tenant builder, on this
//! helper's own stdin/stdout/stderr, and exits with the process's exit code (128 + signal when
//! killed). The kubelet runs one per `kubectl exec` and per exec probe, so a process it starts
//! is reaped by a process of its own, never by the kubelet.

use std::path::Path;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::wait::{WaitStatus, waitpid};

use crate::shim::Paths;
use crate::spec::ContainerConfig;

/// Exit code when the process could not be started at all (as runc's `exec` gives 255; kubectl
/// shows the message on stderr).
pub const START_FAILED: i32 = 126;

pub fn main(dir: &Path, args: Vec<String>) -> i32 {
    let paths = Paths { dir: dir.to_path_buf() };
    match start(&paths, args) {
        Ok(pid) => wait(pid),
        Err(error) => {
            eprintln!("{error:#}");
            START_FAILED
        }
    }
}

fn start(paths: &Paths, args: Vec<String>) -> anyhow::Result<i32> {
    anyhow::ensure!(!args.is_empty(), "no command to run");
    nix::sys::prctl::set_child_subreaper(true)?;
    let config: ContainerConfig = serde_json::from_slice(&std::fs::read(paths.config())?)?;
    let pid = ContainerBuilder::new(config.id.clone(), SyscallType::default())
        .with_root_path(paths.libcontainer_root())?
        .as_tenant()
        .with_container_args(args)
        .with_detach(true)
        .build()
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    Ok(pid.as_raw())
}

fn wait(pid: i32) -> i32 {
    let mut code = None;
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(p, c)) if p.as_raw() == pid => code = Some(c),
            Ok(WaitStatus::Signaled(p, s, _)) if p.as_raw() == pid => code = Some(128 + s as i32),
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
        if code.is_some() {
            break;
        }
    }
    code.unwrap_or(255)
}
