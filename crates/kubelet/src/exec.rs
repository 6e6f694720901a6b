//! `kubectl exec` and `kubectl attach` on the kubelet's side, over websocket with the
//! `v5.channel.k8s.io` and `v4.channel.k8s.io` subprotocols: every binary message starts with
//! its channel (0 stdin, 1 stdout, 2 stderr, 3 error/status, 4 resize; v5 adds
//! `255 <channel>` = that channel is closed), or over SPDY/3.1 (a stream per channel). An exec
//! command runs through `tugboat exec-in` (libcontainer's tenant builder), on pipes, or on a
//! pseudo-terminal for `-t` from the container's devpts (made the command's controlling
//! terminal by util-linux `setsid --ctty`). An attach speaks to the container's shim over its
//! attach socket (`tugboat_runtime::attach`).

use std::process::Stdio;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use std::collections::HashMap;

use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::{Response, StatusCode};
use bytes::Bytes;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::pods::Shared;

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
const CLOSE: u8 = 255;

/// What `?command=…&stdin=…&tty=…` asks for.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecOptions {
    pub command: Vec<String>,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
    /// The container's root (`/proc/<pid>/root`): a terminal comes from its own devpts.
    pub root: Option<std::path::PathBuf>,
}

impl ExecOptions {
    pub fn parse(query: &str) -> ExecOptions {
        let mut options = ExecOptions::default();
        let truthy = |v: &str| matches!(v, "true" | "1" | "True");
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match key.as_ref() {
                "command" => options.command.push(value.into_owned()),
                "stdin" | "input" => options.stdin = truthy(&value),
                "stdout" | "output" => options.stdout = truthy(&value),
                "stderr" | "error" => options.stderr = truthy(&value),
                "tty" => options.tty = truthy(&value),
                _ => {}
            }
        }
        options
    }
}

/// The status message that ends a session (channel 3), as upstream's kubelet writes it.
pub fn exit_status(command: &[String], code: i32) -> serde_json::Value {
    if code == 0 {
        return json!({"metadata": {}, "status": "Success"});
    }
    json!({
        "metadata": {},
        "status": "Failure",
        "message": format!("command terminated with non-zero exit code: error executing command [{}], exit code {code}", command.join(" ")),
        "reason": "NonZeroExitCode",
        "details": {"causes": [{"reason": "ExitCode", "message": code.to_string()}]},
    })
}

fn text(status: StatusCode, message: impl Into<String>) -> Response<Body> {
    Response::builder().status(status).body(Body::from(message.into())).expect("a valid response")
}

/// What a session runs: a command in the container, or an attachment to its main process.
enum Launch {
    Command(tokio::process::Command),
    Attach(tokio::net::UnixStream),
}

/// Checks the request and finds the running container: what to run and what was asked.
async fn prepare(
    node: &Shared,
    namespace: &str,
    pod_name: &str,
    container: &str,
    query: Option<&str>,
    attach: bool,
) -> Result<(Launch, ExecOptions), Response<Body>> {
    let options = ExecOptions::parse(query.unwrap_or_default());
    if options.command.is_empty() && !attach {
        return Err(text(StatusCode::BAD_REQUEST, "you must specify at least one command for the container"));
    }
    if !(options.stdin || options.stdout || options.stderr) {
        return Err(text(StatusCode::BAD_REQUEST, "you must specify at least one of stdin, stdout, stderr"));
    }
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> = kube::Api::namespaced(node.client.clone(), namespace);
    let pod = match pods.get_opt(pod_name).await {
        Ok(Some(pod)) => serde_json::to_value(pod).unwrap_or_default(),
        Ok(None) => return Err(text(StatusCode::NOT_FOUND, format!("pod {namespace}/{pod_name} not found"))),
        Err(error) => return Err(text(StatusCode::SERVICE_UNAVAILABLE, error.to_string())),
    };
    let running = pod["status"]["containerStatuses"]
        .as_array()
        .into_iter()
        .chain(pod["status"]["initContainerStatuses"].as_array())
        .chain(pod["status"]["ephemeralContainerStatuses"].as_array())
        .flatten()
        .find(|s| s["name"] == container && s["state"].get("running").is_some())
        .and_then(|s| s["containerID"].as_str())
        .map(|id| id.trim_start_matches("tugboat://").to_string());
    let Some(id) = running else {
        return Err(text(StatusCode::BAD_REQUEST, format!("container {container} is not running in pod {pod_name}")));
    };
    let mut options = options;
    let pid = node
        .runtime
        .list_prefixed(&id)
        .await
        .ok()
        .and_then(|found| found.into_iter().find(|c| c.id() == id).and_then(|c| c.started).map(|s| s.pid));
    options.root = pid.map(|pid| std::path::PathBuf::from(format!("/proc/{pid}/root")));
    if attach {
        return match node.runtime.attach(&id).await {
            Ok(stream) => Ok((Launch::Attach(stream), options)),
            Err(error) => Err(text(StatusCode::NOT_FOUND, format!("attaching to container {container}: {error}"))),
        };
    }
    match node.runtime.exec_command(&id, &options.command) {
        Ok(command) => Ok((Launch::Command(command), options)),
        Err(error) => Err(text(StatusCode::NOT_FOUND, error.to_string())),
    }
}

/// `GET /exec/...` with a websocket upgrade.
pub async fn exec(
    State(node): State<Shared>,
    UrlPath((namespace, pod_name, container)): UrlPath<(String, String, String)>,
    RawQuery(query): RawQuery,
    upgrade: WebSocketUpgrade,
) -> Response<Body> {
    websocket(node, (namespace, pod_name, container), query, upgrade, false).await
}

/// `GET /attach/...` with a websocket upgrade.
pub async fn attach(
    State(node): State<Shared>,
    UrlPath((namespace, pod_name, container)): UrlPath<(String, String, String)>,
    RawQuery(query): RawQuery,
    upgrade: WebSocketUpgrade,
) -> Response<Body> {
    websocket(node, (namespace, pod_name, container), query, upgrade, true).await
}

async fn websocket(
    node: Shared,
    (namespace, pod_name, container): (String, String, String),
    query: Option<String>,
    upgrade: WebSocketUpgrade,
    attach: bool,
) -> Response<Body> {
    let (command, options) = match prepare(&node, &namespace, &pod_name, &container, query.as_deref(), attach).await {
        Ok(prepared) => prepared,
        Err(response) => return response,
    };
    let upgrade = upgrade.protocols([
        "v5.channel.k8s.io",
        "v4.channel.k8s.io",
        "v3.channel.k8s.io",
        "v2.channel.k8s.io",
        "channel.k8s.io",
    ]);
    let protocol = upgrade.selected_protocol().and_then(|p| p.to_str().ok()).unwrap_or("channel.k8s.io").to_string();
    let v5 = protocol == "v5.channel.k8s.io";
    // v4 and v5 end with a Status on the error channel; the older ones say only a failure,
    // as text.
    let structured = v5 || protocol == "v4.channel.k8s.io";
    upgrade.on_upgrade(move |socket| async move {
        if let Err(error) = session(socket, command, options, v5, structured).await {
            tracing::debug!(%error, "exec session");
        }
    })
}

/// `POST /exec/...` with `Upgrade: SPDY/3.1` (kubectl ≤ 1.29, and any SPDY client).
pub async fn exec_spdy(
    State(node): State<Shared>,
    UrlPath(target): UrlPath<(String, String, String)>,
    RawQuery(query): RawQuery,
    request: axum::extract::Request,
) -> Response<Body> {
    spdy(node, target, query, request, false).await
}

/// `POST /attach/...` with `Upgrade: SPDY/3.1`.
pub async fn attach_spdy(
    State(node): State<Shared>,
    UrlPath(target): UrlPath<(String, String, String)>,
    RawQuery(query): RawQuery,
    request: axum::extract::Request,
) -> Response<Body> {
    spdy(node, target, query, request, true).await
}

async fn spdy(
    node: Shared,
    (namespace, pod_name, container): (String, String, String),
    query: Option<String>,
    mut request: axum::extract::Request,
    attach: bool,
) -> Response<Body> {
    if !crate::spdy::wants_upgrade(request.headers()) {
        return text(StatusCode::BAD_REQUEST, "Upgrade request required");
    }
    let offered: Vec<String> = request
        .headers()
        .get_all("x-stream-protocol-version")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(',').map(|p| p.trim().to_string()))
        .collect();
    // v5 adds nothing over SPDY (stream close is FIN already): it is served as v4.
    let Some(protocol) =
        ["v5.channel.k8s.io", "v4.channel.k8s.io", "v3.channel.k8s.io", "v2.channel.k8s.io", "channel.k8s.io"]
            .into_iter()
            .find(|p| offered.iter().any(|o| o == p))
    else {
        return text(StatusCode::FORBIDDEN, format!("no supported stream protocol in {offered:?}"));
    };
    let (command, options) = match prepare(&node, &namespace, &pod_name, &container, query.as_deref(), attach).await {
        Ok(prepared) => prepared,
        Err(response) => return response,
    };
    let on_upgrade = hyper::upgrade::on(&mut request);
    let structured = matches!(protocol, "v5.channel.k8s.io" | "v4.channel.k8s.io");
    tokio::spawn(async move {
        match on_upgrade.await {
            Ok(io) => {
                if let Err(error) = spdy_session(hyper_util::rt::TokioIo::new(io), command, options, structured).await {
                    tracing::debug!(%error, "SPDY exec session");
                }
            }
            Err(error) => tracing::debug!(%error, "SPDY upgrade"),
        }
    });
    crate::spdy::switching(protocol)
}

/// One SPDY exec session: wait for the client's streams, run the command, copy, report.
async fn spdy_session<IO>(io: IO, command: Launch, options: ExecOptions, structured: bool) -> anyhow::Result<()>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use crate::spdy::{Frame, Reader, Writer};
    let (read, write) = tokio::io::split(io);
    let mut writer = Writer::new(write);
    // Frames are read by a task of their own (a read cut short by select! would lose data).
    let (frames_tx, mut frames) = tokio::sync::mpsc::channel::<Frame>(64);
    tokio::spawn(async move {
        let mut reader = Reader::new(read);
        while let Ok(Some(frame)) = reader.next().await {
            if frames_tx.send(frame).await.is_err() {
                break;
            }
        }
    });
    let expected = 1
        + usize::from(options.stdin)
        + usize::from(options.stdout)
        + usize::from(options.stderr && !options.tty)
        + usize::from(options.tty);
    let mut streams: HashMap<String, u32> = HashMap::new();
    let mut early: Vec<(u32, Bytes, bool)> = Vec::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while streams.len() < expected {
        let frame = tokio::time::timeout_at(deadline, frames.recv()).await;
        match frame {
            Ok(Some(Frame::SynStream { id, headers, .. })) => {
                writer.reply(id).await?;
                streams.insert(headers.get("streamtype").cloned().unwrap_or_default(), id);
            }
            Ok(Some(Frame::Ping(id))) => writer.ping(id).await?,
            Ok(Some(Frame::Data { id, data, fin })) => early.push((id, data, fin)),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => anyhow::bail!("the client did not open its streams"),
        }
    }
    let id_of = |kind: &str| streams.get(kind).copied();
    let (stdin_id, stdout_id, stderr_id, error_id, resize_id) =
        (id_of("stdin"), id_of("stdout"), id_of("stderr"), id_of("error"), id_of("resize"));
    let (mut child, mut io, mut rx) = spawn(command, &options)?;
    let mut resize_buffer = Vec::new();
    let handle = async |io: &mut Io, id: u32, data: Bytes, fin: bool, resize_buffer: &mut Vec<u8>| {
        if Some(id) == stdin_id {
            write_stdin(io, &data).await;
            if fin {
                close_stdin(io).await;
            }
        } else if Some(id) == resize_id {
            resize_buffer.extend_from_slice(&data);
            // Sizes come as consecutive JSON objects.
            let mut stream = serde_json::Deserializer::from_slice(resize_buffer).into_iter::<serde_json::Value>();
            let mut last = None;
            for size in stream.by_ref().flatten() {
                last = Some(size);
            }
            let used = stream.byte_offset();
            resize_buffer.drain(..used);
            if let Some(size) = last {
                resize(io, size.to_string().as_bytes()).await;
            }
        }
    };
    for (id, data, fin) in early {
        handle(&mut io, id, data, fin, &mut resize_buffer).await;
    }
    let mut reading = true;
    let code = loop {
        tokio::select! {
            frame = frames.recv(), if reading => match frame {
                Some(Frame::Data { id, data, fin }) => handle(&mut io, id, data, fin, &mut resize_buffer).await,
                Some(Frame::Ping(id)) => writer.ping(id).await?,
                Some(Frame::GoAway) | None => {
                    reading = false;
                    close_stdin(&mut io).await;
                }
                Some(_) => {}
            },
            chunk = rx.recv() => match chunk {
                Some((channel, data)) => {
                    let id = if channel == STDOUT { stdout_id } else { stderr_id.or(stdout_id) };
                    if let Some(id) = id {
                        writer.data(id, &data, false).await?;
                    }
                }
                None => break child.code().await,
            },
        }
    };
    for id in [stdout_id, stderr_id, stdin_id, resize_id].into_iter().flatten() {
        let _ = writer.data(id, &[], true).await;
    }
    if let Some(id) = error_id {
        let message = if structured {
            exit_status(&options.command, code).to_string().into_bytes()
        } else if code != 0 {
            format!("command terminated with non-zero exit code: exit code {code}").into_bytes()
        } else {
            Vec::new()
        };
        writer.data(id, &message, true).await?;
    }
    let last = streams.values().copied().max().unwrap_or(0);
    let _ = writer.go_away(last).await;
    Ok(())
}

/// The command's side: pipes, or a terminal; or the shim's attach socket.
enum Io {
    Pipes { stdin: Option<tokio::process::ChildStdin> },
    Tty { master: tokio::fs::File },
    Attached { socket: Option<tokio::net::unix::OwnedWriteHalf> },
}

/// What the session waits for: the command, or (attached) the container's output to end.
enum Proc {
    Child(tokio::process::Child),
    Attached,
}

impl Proc {
    fn kill(&mut self) {
        if let Proc::Child(child) = self {
            let _ = child.start_kill();
        }
    }

    /// The exit code (attached: the container's end is no command's failure).
    async fn code(&mut self) -> i32 {
        match self {
            Proc::Child(child) => child.wait().await.ok().and_then(|s| s.code()).unwrap_or(137),
            Proc::Attached => 0,
        }
    }
}

/// An attachment: the shim's frames become output channels; stdin and sizes go back as frames.
fn attached(stream: tokio::net::UnixStream, options: &ExecOptions) -> (Proc, Io, Output) {
    use tugboat_runtime::attach;
    let (mut read, write) = stream.into_split();
    let (tx, rx) = tokio::sync::mpsc::channel::<(u8, Bytes)>(16);
    let (stdout, stderr) = (options.stdout, options.stderr || options.tty);
    tokio::spawn(async move {
        while let Ok(kind) = read.read_u8().await {
            let Ok(length) = read.read_u32().await else { break };
            if length as usize > attach::MAX_FRAME {
                break;
            }
            let mut payload = vec![0u8; length as usize];
            if read.read_exact(&mut payload).await.is_err() {
                break;
            }
            let channel = match kind {
                attach::STDOUT if stdout => STDOUT,
                attach::STDERR if stderr => STDERR,
                _ => continue,
            };
            if tx.send((channel, Bytes::from(payload))).await.is_err() {
                break;
            }
        }
    });
    let socket = Some(write);
    (Proc::Attached, Io::Attached { socket }, rx)
}

/// Sends one frame to the shim; a shim that has gone ends the input.
async fn to_shim(socket: &mut Option<tokio::net::unix::OwnedWriteHalf>, kind: u8, payload: &[u8]) {
    if let Some(writer) = socket
        && writer.write_all(&tugboat_runtime::attach::frame(kind, payload)).await.is_err()
    {
        *socket = None;
    }
}

async fn session(
    mut socket: WebSocket,
    command: Launch,
    options: ExecOptions,
    v5: bool,
    structured: bool,
) -> anyhow::Result<()> {
    let (mut child, mut io, mut rx) = spawn(command, &options)?;
    let mut stdin_open = options.stdin;
    let code = loop {
        tokio::select! {
            message = socket.recv() => {
                match message {
                    Some(Ok(Message::Binary(data))) if !data.is_empty() => match data[0] {
                        STDIN if stdin_open => write_stdin(&mut io, &data[1..]).await,
                        RESIZE => resize(&mut io, &data[1..]).await,
                        CLOSE if v5 && data.get(1) == Some(&STDIN) => {
                            close_stdin(&mut io).await;
                            stdin_open = false;
                        }
                        _ => {}
                    },
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => {
                        // The client went away: end the command.
                        child.kill();
                        break child.code().await;
                    }
                    _ => {}
                }
            }
            chunk = rx.recv() => match chunk {
                Some((channel, data)) => {
                    let mut frame = Vec::with_capacity(data.len() + 1);
                    frame.push(channel);
                    frame.extend_from_slice(&data);
                    socket.send(Message::Binary(frame.into())).await?;
                }
                // Output is done once the command (and whatever held its output) has gone.
                None => break child.code().await,
            },
        }
    };
    // Whatever output is left.
    while let Ok(Some((channel, data))) = tokio::time::timeout(std::time::Duration::from_millis(200), rx.recv()).await {
        let mut frame = vec![channel];
        frame.extend_from_slice(&data);
        socket.send(Message::Binary(frame.into())).await?;
    }
    let mut status = vec![ERROR];
    if structured {
        status.extend_from_slice(exit_status(&options.command, code).to_string().as_bytes());
    } else if code != 0 {
        status.extend_from_slice(format!("command terminated with non-zero exit code: exit code {code}").as_bytes());
    }
    if status.len() > 1 {
        socket.send(Message::Binary(status.into())).await?;
    }
    // A normal closure (1000): client-go reads it as the end of every stream; a close without
    // a code is an error to it.
    let close = axum::extract::ws::CloseFrame { code: axum::extract::ws::close_code::NORMAL, reason: "".into() };
    let _ = socket.send(Message::Close(Some(close))).await;
    Ok(())
}

type Reader = Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>;

/// The command's output: (channel, bytes) from stdout and stderr.
type Output = tokio::sync::mpsc::Receiver<(u8, Bytes)>;

/// Starts the command; its stdout and stderr arrive on the returned channel as
/// (channel, bytes), which closes once both have ended.
fn spawn(command: Launch, options: &ExecOptions) -> anyhow::Result<(Proc, Io, Output)> {
    let command = match command {
        Launch::Command(command) => command,
        Launch::Attach(stream) => return Ok(attached(stream, options)),
    };
    let (child, io, out, err) = start(command, options)?;
    let child = Proc::Child(child);
    let (tx, rx) = tokio::sync::mpsc::channel::<(u8, Bytes)>(16);
    for (reader, channel) in [(out, STDOUT), (err, STDERR)] {
        let Some(mut reader) = reader else { continue };
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 32 * 1024];
            while let Ok(n) = reader.read(&mut buf).await {
                if n == 0 || tx.send((channel, Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                    break;
                }
            }
        });
    }
    Ok((child, io, rx))
}

/// A terminal (master, slave) for a command in the container at `root`: from the container's
/// own devpts instance, so the command can name it (`tty` prints `/dev/pts/0`), as runc's
/// console socket gives; else (no root, an odd /dev) from the host's.
fn terminal(root: Option<&std::path::Path>) -> std::io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    use rustix::pty::OpenptFlags;
    if let Some(root) = root {
        // Resolved inside the container's root: a symlink the container made cannot lead out.
        let flags = OFlags::RDWR | OFlags::NOCTTY | OFlags::CLOEXEC;
        let resolve = ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS;
        let opened = rustix::fs::open(root, OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC, Mode::empty())
            .and_then(|root| rustix::fs::openat2(&root, "dev/pts/ptmx", flags, Mode::empty(), resolve))
            .and_then(|master| {
                rustix::pty::unlockpt(&master)?;
                let slave = rustix::pty::ioctl_tiocgptpeer(&master, OpenptFlags::RDWR | OpenptFlags::NOCTTY)?;
                Ok((master, slave))
            });
        match opened {
            Ok(pair) => return Ok(pair),
            Err(error) => tracing::debug!(root = %root.display(), %error, "no terminal in the container's devpts"),
        }
    }
    let pty = nix::pty::openpty(None, None)?;
    Ok((pty.master, pty.slave))
}

fn start(
    mut command: tokio::process::Command,
    options: &ExecOptions,
) -> anyhow::Result<(tokio::process::Child, Io, Reader, Reader)> {
    if options.tty {
        let (master, slave) = terminal(options.root.as_deref())?;
        let slave = std::fs::File::from(slave);
        // `setsid --ctty`: a session of its own whose controlling terminal is its stdin.
        let program = command.as_std().get_program().to_owned();
        let args: Vec<_> = command.as_std().get_args().map(|a| a.to_owned()).collect();
        let mut wrapped = tokio::process::Command::new("setsid");
        wrapped.arg("--ctty").arg(program).args(args);
        wrapped.stdin(slave.try_clone()?).stdout(slave.try_clone()?).stderr(slave);
        let child = wrapped.spawn()?;
        let master = std::fs::File::from(master);
        let reader = tokio::fs::File::from_std(master.try_clone()?);
        let master = tokio::fs::File::from_std(master);
        let out: Reader = Some(Box::new(reader));
        return Ok((child, Io::Tty { master }, out, None));
    }
    command
        .stdin(if options.stdin { Stdio::piped() } else { Stdio::null() })
        .stdout(if options.stdout { Stdio::piped() } else { Stdio::null() })
        .stderr(if options.stderr { Stdio::piped() } else { Stdio::null() });
    let mut child = command.spawn()?;
    let stdin = child.stdin.take();
    let out: Reader = child.stdout.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>);
    let err: Reader = child.stderr.take().map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>);
    Ok((child, Io::Pipes { stdin }, out, err))
}

async fn write_stdin(io: &mut Io, data: &[u8]) {
    match io {
        Io::Pipes { stdin: Some(stdin) } => {
            let _ = stdin.write_all(data).await;
        }
        Io::Tty { master, .. } => {
            let _ = master.write_all(data).await;
            let _ = master.flush().await;
        }
        Io::Pipes { stdin: None } => {}
        Io::Attached { socket } => to_shim(socket, tugboat_runtime::attach::STDIN, data).await,
    }
}

async fn close_stdin(io: &mut Io) {
    match io {
        Io::Pipes { stdin } => *stdin = None,
        Io::Attached { socket } => to_shim(socket, tugboat_runtime::attach::CLOSE_STDIN, &[]).await,
        Io::Tty { .. } => {}
    }
}

async fn resize(io: &mut Io, data: &[u8]) {
    let Ok(size) = serde_json::from_slice::<serde_json::Value>(data) else { return };
    let (Some(width), Some(height)) = (size["Width"].as_u64(), size["Height"].as_u64()) else { return };
    let (width, height) = (width.min(u16::MAX.into()) as u16, height.min(u16::MAX.into()) as u16);
    match io {
        Io::Tty { master } => {
            let size = rustix::termios::Winsize { ws_row: height, ws_col: width, ws_xpixel: 0, ws_ypixel: 0 };
            if let Err(error) = rustix::termios::tcsetwinsize(&*master, size) {
                tracing::debug!(%error, "resizing a terminal");
            }
        }
        Io::Attached { socket } => {
            let mut payload = width.to_be_bytes().to_vec();
            payload.extend_from_slice(&height.to_be_bytes());
            to_shim(socket, tugboat_runtime::attach::RESIZE, &payload).await;
        }
        Io::Pipes { .. } => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_and_statuses_are_upstream_s() {
        let o = ExecOptions::parse("command=sh&command=-c&command=exit+3&stdin=true&stdout=true&tty=false");
        assert_eq!(o.command, vec!["sh", "-c", "exit 3"]);
        assert!(o.stdin && o.stdout && !o.stderr && !o.tty);
        assert_eq!(exit_status(&o.command, 0)["status"], "Success");
        let failed = exit_status(&o.command, 3);
        assert_eq!(failed["reason"], "NonZeroExitCode");
        assert_eq!(failed["details"]["causes"][0], json!({"reason": "ExitCode", "message": "3"}));
    }
}
