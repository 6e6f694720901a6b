//! `tugboat shim DIR`: one small process per container, as conmon or containerd-shim. It
//! mounts the rootfs, creates and starts the container with libcontainer, says on its stdout
//! `ok PID` or `error MESSAGE` (then lets go of stdout so the kubelet may die), writes the
//! container's stdout/stderr to the CRI log file, reaps it and records its exit in
//! `DIR/exit.json`. Nothing of a running container depends on the kubelet.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::wait::{WaitStatus, waitpid};
use serde::{Deserialize, Serialize};

use crate::attach::{self, Attachments};
use crate::images::write_durably;
use crate::spec::ContainerConfig;

/// `DIR/started.json`: written once the container runs.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Started {
    pub pid: i32,
    pub started_at: String,
    /// The shim's own pid: while it lives, an ended container is still being recorded.
    #[serde(default)]
    pub shim_pid: Option<i32>,
}

/// `DIR/exit.json`: written once the container's process was reaped.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Exited {
    pub exit_code: i32,
    #[serde(default)]
    pub signal: Option<i32>,
    pub finished_at: String,
    /// `Completed`, `Error` or `OOMKilled`.
    pub reason: String,
}

pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// The container's paths inside its directory.
pub(crate) struct Paths {
    pub dir: PathBuf,
}

impl Paths {
    pub fn config(&self) -> PathBuf {
        self.dir.join("container.json")
    }
    pub fn bundle(&self) -> PathBuf {
        self.dir.join("bundle")
    }
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("bundle/rootfs")
    }
    pub fn started(&self) -> PathBuf {
        self.dir.join("started.json")
    }
    pub fn exited(&self) -> PathBuf {
        self.dir.join("exit.json")
    }
    pub fn libcontainer_root(&self) -> PathBuf {
        self.dir.join("state")
    }
}

/// Mounts the image layers (read-only lower dirs) with a writable upper dir at the rootfs.
pub(crate) fn mount_rootfs(paths: &Paths, config: &ContainerConfig) -> anyhow::Result<()> {
    let rootfs = paths.rootfs();
    std::fs::create_dir_all(&rootfs)?;
    let upper = paths.dir.join("upper");
    let work = paths.dir.join("work");
    std::fs::create_dir_all(&upper)?;
    std::fs::create_dir_all(&work)?;
    if config.layers.is_empty() {
        anyhow::bail!("the image has no layers");
    }
    let lower: Vec<String> = config.layers.iter().rev().map(|p| p.display().to_string()).collect();
    let options = format!("lowerdir={},upperdir={},workdir={}", lower.join(":"), upper.display(), work.display());
    nix::mount::mount(Some("overlay"), &rootfs, Some("overlay"), nix::mount::MsFlags::empty(), Some(options.as_str()))
        .map_err(|e| anyhow::anyhow!("mounting the rootfs (overlay): {e}"))?;
    Ok(())
}

/// A CRI log file: `<RFC 3339 nano> <stream> <F|P> <line>` per line. Once it reaches
/// `max_size` it is renamed `<name>.<UTC time>` and a new one started, keeping `max_files` in
/// all, as the kubelet rotates containers' logs upstream (readers following the log move on
/// to the new file).
struct CriLog {
    file: File,
    path: PathBuf,
    size: u64,
    max_size: u64,
    max_files: u32,
}

impl CriLog {
    fn open(path: &Path, max_size: u64, max_files: u32) -> std::io::Result<CriLog> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(CriLog { file, path: path.to_path_buf(), size, max_size, max_files })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        // `0.log.20261130-165500.123456789`: the time, as the kubelet names rotated logs.
        let stamp: String = cri_stamp().chars().filter(|c| !matches!(c, '-' | ':' | 'Z')).collect();
        let rotated = format!("{}.{}", self.path.display(), stamp.replace('T', "-"));
        std::fs::rename(&self.path, &rotated)?;
        *self = CriLog::open(&self.path.clone(), self.max_size, self.max_files)?;
        remove_old_logs(&self.path, self.max_files.max(1) as usize - 1);
        Ok(())
    }

    fn write(&mut self, stream: &str, line: &[u8], partial: bool) {
        let stamp = cri_stamp();
        let mut record = Vec::with_capacity(line.len() + 48);
        record.extend_from_slice(stamp.as_bytes());
        record.push(b' ');
        record.extend_from_slice(stream.as_bytes());
        record.extend_from_slice(if partial { b" P " } else { b" F " });
        record.extend_from_slice(line);
        record.push(b'\n');
        if self.file.write_all(&record).is_ok() {
            self.size += record.len() as u64;
        }
        if self.max_size > 0 && self.size >= self.max_size {
            let _ = self.rotate();
        }
    }
}

/// Now, as CRI log lines start: RFC 3339 in UTC with nanoseconds.
fn cri_stamp() -> String {
    let t = time::OffsetDateTime::now_utc();
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:09}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.nanosecond()
    )
}

/// Keeps the newest `keep` rotated files of the log at `path` (`<name>.<time>`), removes the rest.
fn remove_old_logs(path: &Path, keep: usize) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else { return };
    let prefix = format!("{name}.");
    let mut rotated: Vec<PathBuf> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.starts_with(&prefix)))
        .map(|e| e.path())
        .collect();
    // The time stamps sort as the rotations happened.
    rotated.sort();
    let excess = rotated.len().saturating_sub(keep);
    for old in &rotated[..excess] {
        let _ = std::fs::remove_file(old);
    }
}

/// Longest line kept whole; longer ones are split into partial (`P`) records, as containerd does.
const MAX_LINE: usize = 16 * 1024;

fn copy_stream(from: impl Into<File>, stream: &'static str, log: Arc<Mutex<CriLog>>, attached: Arc<Attachments>) {
    let mut from: File = from.into();
    let kind = if stream == "stderr" { attach::STDERR } else { attach::STDOUT };
    let mut pending: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        attached.broadcast(kind, &buf[..n]);
        pending.extend_from_slice(&buf[..n]);
        let mut log = log.lock().unwrap();
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            log.write(stream, &pending[..end], false);
            pending.drain(..=end);
        }
        while pending.len() >= MAX_LINE {
            log.write(stream, &pending[..MAX_LINE], true);
            pending.drain(..MAX_LINE);
        }
    }
    // What is left without a newline is a partial record, as containerd writes it: readers
    // show it without one (`echo -n DONE` logs `DONE`).
    if !pending.is_empty() {
        log.lock().unwrap().write(stream, &pending, true);
    }
}

/// The shim's whole life. Returns the process's exit code.
pub fn main(dir: &Path) -> i32 {
    let paths = Paths { dir: dir.to_path_buf() };
    let mut stdout = std::io::stdout();
    match start(&paths) {
        Ok((pid, readers, log, attached)) => {
            let _ = writeln!(stdout, "ok {pid}");
            let _ = stdout.flush();
            if let Ok(null) = File::options().read(true).write(true).open("/dev/null") {
                let _ = nix::unistd::dup2_stdout(&null);
                let _ = nix::unistd::dup2_stdin(&null);
            }
            supervise(&paths, pid, readers, log);
            attached.close();
            0
        }
        Err(e) => {
            let _ = writeln!(stdout, "error {}", format!("{e:#}").replace('\n', " "));
            let _ = stdout.flush();
            1
        }
    }
}

type Readers = Vec<std::thread::JoinHandle<()>>;

/// A started container: its pid, the threads copying its output, its log, its attachments.
type Running = (i32, Readers, Arc<Mutex<CriLog>>, Arc<Attachments>);

fn start(paths: &Paths) -> anyhow::Result<Running> {
    let _ = nix::unistd::setsid();
    nix::sys::prctl::set_child_subreaper(true)?;
    let config: ContainerConfig = serde_json::from_slice(&std::fs::read(paths.config())?)?;
    mount_rootfs(paths, &config)?;
    let spec = config.oci_spec(&paths.rootfs());
    std::fs::write(paths.bundle().join("config.json"), serde_json::to_vec(&spec)?)?;
    if let Some(parent) = config.log_path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let log = Arc::new(Mutex::new(CriLog::open(&config.log_path, config.log_max_size, config.log_max_files)?));
    let attach_listener = attach::listen(&paths.dir, attach::SOCKET)?;
    let null = || File::options().read(true).write(true).open("/dev/null");
    let builder =
        ContainerBuilder::new(config.id.clone(), SyscallType::default()).with_root_path(paths.libcontainer_root())?;
    let mut readers = Vec::new();
    let (mut container, attached) = if config.tty {
        // libcontainer makes the terminal inside the container and sends its master over the
        // console socket; stdin, stdout and stderr are all the terminal.
        const CONSOLE: &str = "console.sock";
        let console = attach::listen(&paths.dir, CONSOLE)?;
        let container = builder
            .with_console_socket(Some(paths.dir.join(CONSOLE)))
            .with_stdin(OwnedFd::from(null()?))
            .with_stdout(OwnedFd::from(null()?))
            .with_stderr(OwnedFd::from(null()?))
            .as_init(paths.bundle())
            .with_systemd(false)
            .with_detach(true)
            .build()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let master = attach::receive_terminal(&console, Duration::from_secs(10))?;
        let _ = std::fs::remove_file(paths.dir.join(CONSOLE));
        let attached =
            Arc::new(Attachments::new(Some(master.try_clone()?), Some(master.try_clone()?), config.stdin_once));
        let (log, attached_out) = (log.clone(), attached.clone());
        readers.push(std::thread::spawn(move || copy_stream(master, "stdout", log, attached_out)));
        (container, attached)
    } else {
        let (out_r, out_w) = nix::unistd::pipe()?;
        let (err_r, err_w) = nix::unistd::pipe()?;
        // With `stdin: true` the container reads a pipe the shim holds open for clients.
        let (stdin, input) = if config.stdin {
            let (r, w) = nix::unistd::pipe()?;
            (r, Some(File::from(w)))
        } else {
            (OwnedFd::from(null()?), None)
        };
        let container = builder
            .with_stdin(stdin)
            .with_stdout(out_w)
            .with_stderr(err_w)
            .as_init(paths.bundle())
            .with_systemd(false)
            .with_detach(true)
            .build()
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let attached = Arc::new(Attachments::new(input, None, config.stdin_once));
        for (from, stream) in [(out_r, "stdout"), (err_r, "stderr")] {
            let (log, attached) = (log.clone(), attached.clone());
            readers.push(std::thread::spawn(move || copy_stream(from, stream, log, attached)));
        }
        (container, attached)
    };
    {
        let attached = attached.clone();
        std::thread::spawn(move || attached.accept(attach_listener));
    }
    container.start().map_err(|e| anyhow::anyhow!("{e}"))?;
    let pid = container.pid().map(|p| p.as_raw()).ok_or_else(|| anyhow::anyhow!("the container has no pid"))?;
    let started = Started { pid, started_at: now_rfc3339(), shim_pid: Some(std::process::id() as i32) };
    write_durably(&paths.started(), &serde_json::to_vec(&started)?)?;
    Ok((pid, readers, log, attached))
}

fn supervise(paths: &Paths, pid: i32, readers: Readers, log: Arc<Mutex<CriLog>>) {
    let mut status = None;
    loop {
        match waitpid(None, None) {
            Ok(WaitStatus::Exited(p, code)) if p.as_raw() == pid => status = Some((code, None)),
            Ok(WaitStatus::Signaled(p, signal, _)) if p.as_raw() == pid => {
                status = Some((128 + signal as i32, Some(signal as i32)))
            }
            Ok(_) => {}
            Err(nix::errno::Errno::EINTR) => {}
            Err(_) => break,
        }
    }
    let (exit_code, signal) = status.unwrap_or((255, None));
    // The pipes close when the last process holding them is gone; do not wait for ever.
    let deadline = std::time::Instant::now() + Duration::from_secs(2);
    for reader in readers {
        while !reader.is_finished() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let _ = log.lock().unwrap().file.sync_all();
    let config: Option<ContainerConfig> =
        std::fs::read(paths.config()).ok().and_then(|b| serde_json::from_slice(&b).ok());
    let oom = config.is_some_and(|c| oom_killed(&c.cgroups_path));
    let reason = if oom && signal == Some(9) {
        "OOMKilled"
    } else if exit_code == 0 {
        "Completed"
    } else {
        "Error"
    };
    let exited = Exited { exit_code, signal, finished_at: now_rfc3339(), reason: reason.to_string() };
    let _ = write_durably(&paths.exited(), &serde_json::to_vec(&exited).unwrap_or_default());
}

/// Whether the kernel's OOM killer killed something in the container's cgroup.
fn oom_killed(cgroups_path: &str) -> bool {
    let rel = cgroups_path.trim_start_matches('/');
    let candidates =
        [format!("/sys/fs/cgroup/memory/{rel}/memory.oom_control"), format!("/sys/fs/cgroup/{rel}/memory.events")];
    candidates.iter().any(|path| {
        std::fs::read_to_string(path).is_ok_and(|text| {
            text.lines().any(|l| l.strip_prefix("oom_kill ").is_some_and(|n| n.trim().parse::<u64>().unwrap_or(0) > 0))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn logs_rotate_at_their_size_and_keep_so_many_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        let mut log = CriLog::open(&path, 200, 3).unwrap();
        for i in 0..42 {
            log.write("stdout", format!("line {i}").as_bytes(), false);
        }
        let mut names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names.len(), 3, "{names:?}");
        assert_eq!(names[0], "0.log");
        assert!(names[1].starts_with("0.log.") && names[2].starts_with("0.log."), "{names:?}");
        let current = std::fs::read_to_string(&path).unwrap();
        assert!(current.len() < 200 && current.ends_with("line 41\n"), "{current}");
        // The newest rotated file holds the lines just before.
        let previous = std::fs::read_to_string(dir.path().join(&names[2])).unwrap();
        assert!(previous.len() >= 200 && previous.contains(" stdout F "), "{previous}");
        // Unlimited: never rotated.
        let mut log = CriLog::open(&dir.path().join("1.log"), 0, 0).unwrap();
        for _ in 0..100 {
            log.write("stderr", b"x", false);
        }
        assert!(
            !dir.path().read_dir().unwrap().any(|e| e.unwrap().file_name().to_string_lossy().starts_with("1.log."))
        );
    }
}
