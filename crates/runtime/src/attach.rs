//! Attaching to a running container (`kubectl attach`, `kubectl run -it`): the shim listens on
//! `DIR/attach.sock` and speaks frames of `[kind: u8][length: u32 BE][payload]` with every
//! client: the container's output as it is written (also to the log), and the client's stdin,
//! stdin's end and terminal sizes. The shim holds the container's stdin (a pipe, or the
//! terminal's master), so clients may come and go.
//!
//! Socket paths may be longer than `sun_path` allows: both sides name the socket through
//! `/proc/self/fd/<dir fd>/attach.sock`.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

pub const STDIN: u8 = 0;
pub const STDOUT: u8 = 1;
pub const STDERR: u8 = 2;
/// The client's stdin ended.
pub const CLOSE_STDIN: u8 = 3;
/// A terminal size: width then height, u16 BE each.
pub const RESIZE: u8 = 4;

pub const SOCKET: &str = "attach.sock";
/// Longest payload a frame may carry.
pub const MAX_FRAME: usize = 1 << 20;

pub fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut frame = Vec::with_capacity(payload.len() + 5);
    frame.push(kind);
    frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

/// Reads one frame; None at the end of the stream (or on a malformed one).
pub fn read_frame(from: &mut impl Read) -> Option<(u8, Vec<u8>)> {
    let mut head = [0u8; 5];
    from.read_exact(&mut head).ok()?;
    let length = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if length > MAX_FRAME {
        return None;
    }
    let mut payload = vec![0u8; length];
    from.read_exact(&mut payload).ok()?;
    Some((head[0], payload))
}

/// A path to `name` in `dir` short enough for a socket address, valid while `dir_file` lives.
pub fn short_path(dir_file: &File, name: &str) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}/{name}", dir_file.as_raw_fd()))
}

/// Binds a listening socket at `dir/name`, whatever the length of `dir`.
pub fn listen(dir: &Path, name: &str) -> std::io::Result<UnixListener> {
    let _ = std::fs::remove_file(dir.join(name));
    let dir_file = File::open(dir)?;
    UnixListener::bind(short_path(&dir_file, name))
}

/// The shim's side: the container's stdin and terminal, and whoever is attached.
#[derive(Debug)]
pub struct Attachments {
    clients: Mutex<Vec<UnixStream>>,
    /// Where clients' stdin goes: a pipe to the container, or its terminal's master.
    input: Mutex<Option<File>>,
    /// The terminal's master, for sizes.
    terminal: Option<File>,
    /// Close the container's stdin once the first client's stdin ends.
    stdin_once: bool,
}

impl Attachments {
    pub fn new(input: Option<File>, terminal: Option<File>, stdin_once: bool) -> Attachments {
        Attachments { clients: Mutex::new(Vec::new()), input: Mutex::new(input), terminal, stdin_once }
    }

    /// Sends output to every client; a client that cannot take it within a second is dropped.
    pub fn broadcast(&self, kind: u8, data: &[u8]) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        if clients.is_empty() {
            return;
        }
        let frame = frame(kind, data);
        clients.retain_mut(|client| client.write_all(&frame).is_ok());
    }

    /// Drops every client (the container ended): they see the end of the stream.
    pub fn close(&self) {
        let mut clients = self.clients.lock().unwrap_or_else(|e| e.into_inner());
        for client in clients.drain(..) {
            let _ = client.shutdown(std::net::Shutdown::Both);
        }
    }

    fn close_stdin(&self) {
        if self.stdin_once && self.terminal.is_none() {
            *self.input.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }

    /// Serves one client until it goes.
    fn serve(&self, mut client: UnixStream) {
        while let Some((kind, payload)) = read_frame(&mut client) {
            match kind {
                STDIN => {
                    let mut input = self.input.lock().unwrap_or_else(|e| e.into_inner());
                    if let Some(target) = input.as_mut()
                        && target.write_all(&payload).is_err()
                    {
                        *input = None;
                    }
                }
                CLOSE_STDIN => self.close_stdin(),
                RESIZE if payload.len() == 4 => {
                    if let Some(terminal) = &self.terminal {
                        let size = rustix::termios::Winsize {
                            ws_col: u16::from_be_bytes([payload[0], payload[1]]),
                            ws_row: u16::from_be_bytes([payload[2], payload[3]]),
                            ws_xpixel: 0,
                            ws_ypixel: 0,
                        };
                        let _ = rustix::termios::tcsetwinsize(terminal, size);
                    }
                }
                _ => {}
            }
        }
    }

    /// Accepts clients for as long as the shim lives.
    pub fn accept(self: std::sync::Arc<Self>, listener: UnixListener) {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let _ = client.set_write_timeout(Some(Duration::from_secs(1)));
            let Ok(writer) = client.try_clone() else { continue };
            self.clients.lock().unwrap_or_else(|e| e.into_inner()).push(writer);
            let this = self.clone();
            std::thread::spawn(move || this.serve(client));
        }
    }
}

/// Receives the terminal master libcontainer sends on its console socket.
pub fn receive_terminal(listener: &UnixListener, timeout: Duration) -> std::io::Result<File> {
    use std::mem::MaybeUninit;

    use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
    listener.set_nonblocking(true)?;
    let deadline = std::time::Instant::now() + timeout;
    let stream = loop {
        match listener.accept() {
            Ok((stream, _)) => break stream,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err(e) => return Err(e),
        }
    };
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(timeout))?;
    let mut name = [0u8; 256];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    rustix::net::recvmsg(&stream, &mut [std::io::IoSliceMut::new(&mut name)], &mut control, RecvFlags::CMSG_CLOEXEC)?;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(mut fds) = message
            && let Some(fd) = fds.next()
        {
            return Ok(File::from(fd));
        }
    }
    Err(std::io::Error::other("no terminal came on the console socket"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_oversized_ones_end_the_stream() {
        let mut bytes = frame(STDOUT, b"hello");
        bytes.extend(frame(RESIZE, &[0, 80, 0, 24]));
        let mut reader = bytes.as_slice();
        assert_eq!(read_frame(&mut reader), Some((STDOUT, b"hello".to_vec())));
        assert_eq!(read_frame(&mut reader), Some((RESIZE, vec![0, 80, 0, 24])));
        assert_eq!(read_frame(&mut reader), None);
        let mut huge = vec![STDIN];
        huge.extend_from_slice(&u32::MAX.to_be_bytes());
        assert_eq!(read_frame(&mut huge.as_slice()), None);
    }

    #[test]
    fn clients_get_output_and_their_stdin_reaches_the_container() {
        let dir = tempfile::tempdir().unwrap();
        // A directory path longer than a socket address may be.
        let deep = dir.path().join("d".repeat(100)).join("e".repeat(40));
        std::fs::create_dir_all(&deep).unwrap();
        let listener = listen(&deep, SOCKET).unwrap();
        let (pipe_r, pipe_w) = std::io::pipe().unwrap();
        let attachments =
            std::sync::Arc::new(Attachments::new(Some(File::from(std::os::fd::OwnedFd::from(pipe_w))), None, true));
        std::thread::spawn({
            let a = attachments.clone();
            move || a.accept(listener)
        });
        let dir_file = File::open(&deep).unwrap();
        let mut client = UnixStream::connect(short_path(&dir_file, SOCKET)).unwrap();
        client.write_all(&frame(STDIN, b"typed\n")).unwrap();
        client.write_all(&frame(CLOSE_STDIN, b"")).unwrap();
        let mut got = String::new();
        let mut pipe_r = pipe_r;
        pipe_r.read_to_string(&mut got).unwrap();
        assert_eq!(got, "typed\n", "stdin arrived, then its end (stdinOnce)");
        // Output reaches the client once it is registered.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while attachments.clients.lock().unwrap().is_empty() {
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
        attachments.broadcast(STDERR, b"oops");
        assert_eq!(read_frame(&mut client), Some((STDERR, b"oops".to_vec())));
        attachments.close();
        assert_eq!(read_frame(&mut client), None);
    }
}
