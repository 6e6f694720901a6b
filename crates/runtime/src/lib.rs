//! Images and containers for the kubelet.
//!
//! - [`images`]: the OCI content store, archive import, layers unpacked once for overlayfs.
//! - [`spec`]: a container's description and the OCI runtime spec made from it.
//! - [`shim`]: `tugboat shim DIR`, the per-container monitor that owns stdio and reaps.
//! - [`Runtime`]: what the kubelet asks of a container runtime; [`Builtin`] implements it with
//!   libcontainer through the shim. Every container lives in `<root>/<id>/`: its
//!   `container.json` (what it is, whose it is), `started.json`, `exit.json`, the bundle and
//!   the overlay dirs. A restarted kubelet lists these and adopts what it finds.
//!
//! It imports no other Tugboat crate and knows nothing of the Kubernetes API.

pub mod attach;
pub mod exec;
pub mod images;
pub mod pull;
pub mod shim;
pub mod spec;

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::AsyncBufReadExt;

pub use shim::{Exited, Started};
pub use spec::ContainerConfig;

/// The Go name of this machine's architecture, as images and `kubernetes.io/arch` spell it.
pub fn goarch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum State {
    /// Created, not started (or a shim that died before saying so).
    Created,
    Running,
    Exited(Exited),
}

/// What the runtime knows of one container.
#[derive(Debug, Clone)]
pub struct Container {
    pub config: ContainerConfig,
    pub started: Option<Started>,
    pub state: State,
}

impl Container {
    pub fn id(&self) -> &str {
        &self.config.id
    }
    pub fn label(&self, key: &str) -> Option<&str> {
        self.config.labels.get(key).map(String::as_str)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The container could not be created or started (CreateContainerError / RunContainerError).
    #[error("{0}")]
    Start(String),
    #[error("no container {0}")]
    NotFound(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

/// What the kubelet needs of a container runtime.
#[async_trait::async_trait]
pub trait Runtime: Send + Sync + std::fmt::Debug {
    /// The runtime's name and version, as `containerRuntimeVersion` shows it.
    fn version(&self) -> String;
    async fn create_and_start(&self, config: ContainerConfig) -> Result<Container, RuntimeError>;
    async fn list(&self) -> Result<Vec<Container>, RuntimeError>;
    /// The containers whose id starts with `prefix` (the kubelet names them `<pod uid>-…`).
    async fn list_prefixed(&self, prefix: &str) -> Result<Vec<Container>, RuntimeError> {
        Ok(self.list().await?.into_iter().filter(|c| c.id().starts_with(prefix)).collect())
    }
    /// Sends a signal to the container's main process (nothing if it has exited).
    async fn signal(&self, id: &str, signal: i32) -> Result<(), RuntimeError>;
    /// Kills (if needed) and removes a container and everything it left.
    async fn remove(&self, id: &str) -> Result<(), RuntimeError>;
    /// Whether the container has ended (or is unknown): cheap, for log followers.
    fn has_exited(&self, id: &str) -> bool;
    /// A command that runs `args` inside the running container on its own stdio and exits
    /// with the process's code (the caller sets stdio, timeouts, and runs it).
    fn exec_command(&self, id: &str, args: &[String]) -> Result<tokio::process::Command, RuntimeError>;
    /// Connects to the running container's attach socket (see [`attach`]).
    async fn attach(&self, id: &str) -> Result<tokio::net::UnixStream, RuntimeError>;
}

/// The built-in runtime: libcontainer, one `tugboat shim` per container.
#[derive(Debug, Clone)]
pub struct Builtin {
    root: PathBuf,
    shim: PathBuf,
}

impl Builtin {
    /// Containers under `root`; `shim` is the binary that runs as `<shim> shim DIR`.
    pub fn new(root: impl Into<PathBuf>, shim: impl Into<PathBuf>) -> std::io::Result<Builtin> {
        let root = root.into();
        std::fs::create_dir_all(&root)?;
        Ok(Builtin { root, shim: shim.into() })
    }

    fn dir(&self, id: &str) -> Result<PathBuf, RuntimeError> {
        if id.is_empty() || id.contains('/') || id.starts_with('.') {
            return Err(RuntimeError::NotFound(id.to_string()));
        }
        Ok(self.root.join(id))
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

fn load(dir: &Path) -> Option<Container> {
    let paths = shim::Paths { dir: dir.to_path_buf() };
    let config: ContainerConfig = read_json(&paths.config())?;
    let started: Option<Started> = read_json(&paths.started());
    let exited: Option<Exited> = read_json(&paths.exited());
    let state = match (&started, exited) {
        (_, Some(exited)) => State::Exited(exited),
        (Some(started), None) => {
            if alive(started.pid) || started.shim_pid.is_some_and(alive) {
                // Running, or ended and its shim is writing down how.
                State::Running
            } else {
                match read_json::<Exited>(&paths.exited()) {
                    Some(exited) => State::Exited(exited),
                    // Its shim was killed and the process is gone: nobody saw how it ended.
                    None => State::Exited(Exited {
                        exit_code: 255,
                        signal: None,
                        finished_at: shim::now_rfc3339(),
                        reason: "Unknown".into(),
                    }),
                }
            }
        }
        (None, None) => State::Created,
    };
    Some(Container { config, started, state })
}

/// Whether a process exists and is not a zombie.
fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

#[async_trait::async_trait]
impl Runtime for Builtin {
    fn version(&self) -> String {
        format!("tugboat://{}", env!("CARGO_PKG_VERSION"))
    }

    async fn create_and_start(&self, config: ContainerConfig) -> Result<Container, RuntimeError> {
        let dir = self.dir(&config.id)?;
        std::fs::create_dir(&dir)?;
        std::fs::create_dir_all(dir.join("bundle"))?;
        let paths = shim::Paths { dir: dir.clone() };
        images::write_durably(&paths.config(), &serde_json::to_vec(&config).unwrap())?;
        let shim_log = std::fs::File::create(dir.join("shim.log"))?;
        let mut child = tokio::process::Command::new(&self.shim)
            .arg("shim")
            .arg(&dir)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(shim_log)
            .spawn()?;
        let stdout = child.stdout.take().expect("piped stdout");
        let mut line = String::new();
        tokio::io::BufReader::new(stdout).read_line(&mut line).await?;
        // The shim lives on alone; tokio reaps it when it ends.
        drop(child);
        let line = line.trim_end();
        if let Some(message) = line.strip_prefix("error ") {
            return Err(RuntimeError::Start(message.to_string()));
        }
        if !line.starts_with("ok ") {
            let log = std::fs::read_to_string(dir.join("shim.log")).unwrap_or_default();
            return Err(RuntimeError::Start(format!("the shim ended without starting the container: {log}")));
        }
        load(&dir).ok_or_else(|| RuntimeError::NotFound(config.id.clone()))
    }

    async fn list(&self) -> Result<Vec<Container>, RuntimeError> {
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let mut containers = Vec::new();
            for entry in std::fs::read_dir(&root)? {
                let entry = entry?;
                if let Some(container) = load(&entry.path()) {
                    containers.push(container);
                }
            }
            Ok(containers)
        })
        .await
        .map_err(|e| RuntimeError::Io(std::io::Error::other(e)))?
    }

    async fn list_prefixed(&self, prefix: &str) -> Result<Vec<Container>, RuntimeError> {
        let (root, prefix) = (self.root.clone(), prefix.to_string());
        tokio::task::spawn_blocking(move || {
            let mut containers = Vec::new();
            for entry in std::fs::read_dir(&root)? {
                let entry = entry?;
                if entry.file_name().to_string_lossy().starts_with(&prefix)
                    && let Some(container) = load(&entry.path())
                {
                    containers.push(container);
                }
            }
            Ok(containers)
        })
        .await
        .map_err(|e| RuntimeError::Io(std::io::Error::other(e)))?
    }

    async fn signal(&self, id: &str, signal: i32) -> Result<(), RuntimeError> {
        let dir = self.dir(id)?;
        let container = load(&dir).ok_or_else(|| RuntimeError::NotFound(id.to_string()))?;
        if let (State::Running, Some(started)) = (&container.state, &container.started) {
            let signal = nix::sys::signal::Signal::try_from(signal).map_err(std::io::Error::from)?;
            match nix::sys::signal::kill(nix::unistd::Pid::from_raw(started.pid), signal) {
                Ok(()) | Err(nix::errno::Errno::ESRCH) => {}
                Err(e) => return Err(std::io::Error::from(e).into()),
            }
        }
        Ok(())
    }

    fn exec_command(&self, id: &str, args: &[String]) -> Result<tokio::process::Command, RuntimeError> {
        let dir = self.dir(id)?;
        let mut command = tokio::process::Command::new(&self.shim);
        command.arg("exec-in").arg(dir).arg("--").args(args);
        Ok(command)
    }

    async fn attach(&self, id: &str) -> Result<tokio::net::UnixStream, RuntimeError> {
        let dir = self.dir(id)?;
        let dir_file = std::fs::File::open(&dir).map_err(|_| RuntimeError::NotFound(id.to_string()))?;
        let stream = tokio::net::UnixStream::connect(attach::short_path(&dir_file, attach::SOCKET)).await?;
        Ok(stream)
    }

    fn has_exited(&self, id: &str) -> bool {
        let Ok(dir) = self.dir(id) else { return true };
        !matches!(load(&dir).map(|c| c.state), Some(State::Running | State::Created))
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let dir = self.dir(id)?;
        let Some(container) = load(&dir) else {
            if dir.exists() {
                let _ = nix::mount::umount2(&dir.join("bundle/rootfs"), nix::mount::MntFlags::MNT_DETACH);
                std::fs::remove_dir_all(&dir)?;
            }
            return Ok(());
        };
        if container.state == State::Running {
            self.signal(id, libc_sigkill()).await?;
            for _ in 0..500 {
                if !matches!(load(&dir).map(|c| c.state), Some(State::Running)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
        let id = id.to_string();
        tokio::task::spawn_blocking(move || -> Result<(), RuntimeError> {
            let paths = shim::Paths { dir: dir.clone() };
            if let Ok(mut state) = libcontainer::container::Container::load(paths.libcontainer_root().join(&id))
                && let Err(e) = state.delete(true)
            {
                tracing::debug!(container = %id, error = %e, "libcontainer delete");
            }
            remove_cgroup(&container.config.cgroups_path);
            let _ = nix::mount::umount2(&paths.rootfs(), nix::mount::MntFlags::MNT_DETACH);
            std::fs::remove_dir_all(&dir)?;
            Ok(())
        })
        .await
        .map_err(|e| RuntimeError::Io(std::io::Error::other(e)))?
    }
}

fn libc_sigkill() -> i32 {
    nix::sys::signal::Signal::SIGKILL as i32
}

/// Removes a cgroup (an empty one) from every hierarchy it is in, cgroup v1 or v2.
pub fn remove_cgroup(path: &str) {
    let rel = path.trim_start_matches('/');
    if rel.is_empty() {
        return;
    }
    let mut roots = vec![PathBuf::from("/sys/fs/cgroup")];
    if let Ok(entries) = std::fs::read_dir("/sys/fs/cgroup") {
        roots.extend(entries.flatten().map(|e| e.path()).filter(|p| p.is_dir()));
    }
    for root in roots {
        let dir = root.join(rel);
        if dir.is_dir() {
            let _ = std::fs::remove_dir(&dir);
        }
    }
}
