//! `tugboat server` as a user runs it: a real process, its data dir, signals, bad input.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

fn tugboat() -> Command {
    Command::new(env!("CARGO_BIN_EXE_tugboat"))
}

/// A server process, killed if the test fails before stopping it.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts the server and waits for its ready line; returns the child and its stderr lines.
fn start(args: &[&str]) -> (Server, mpsc::Receiver<String>) {
    let mut child = tugboat()
        .arg("server")
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (Server(child), rx)
}

fn wait_for(lines: &mpsc::Receiver<String>, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match lines.recv_timeout(left) {
            Ok(line) if line.contains(needle) => return line,
            Ok(line) => seen.push(line),
            Err(_) => break,
        }
    }
    panic!("no line with {needle:?}; saw: {seen:#?}");
}

fn terminate(server: &mut Server) -> std::process::ExitStatus {
    let ok = Command::new("kill")
        .args(["-TERM", &server.0.id().to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok);
    server.0.wait().unwrap()
}

#[test]
fn the_server_keeps_its_store_in_the_data_dir_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    let (mut child, lines) = start(&["--data-dir", data_dir.to_str().unwrap()]);
    let ready = wait_for(&lines, "tugboat server ready");
    assert!(ready.contains("state.db"), "{ready}");
    let db = data_dir.join("db/state.db");
    assert!(db.is_file());

    // A second server on the same data dir is refused, naming the file.
    let second = tugboat()
        .args(["server", "--data-dir", data_dir.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!second.status.success());
    let message = String::from_utf8_lossy(&second.stderr);
    assert!(
        message.contains("in use by another process") && message.contains("state.db"),
        "{message}"
    );

    assert!(terminate(&mut child).success(), "a clean exit on SIGTERM");
    // After a clean stop the file is a SQLite database that says it is ours (application_id
    // "TGBT"), with the WAL folded in.
    let header = std::fs::read(&db).unwrap();
    assert_eq!(&header[..16], b"SQLite format 3\0");
    assert_eq!(&header[68..72], b"TGBT");

    // Restarting reuses the same store.
    let (mut child, lines) = start(&["--data-dir", data_dir.to_str().unwrap()]);
    wait_for(&lines, "tugboat server ready");
    assert!(terminate(&mut child).success());
}

#[test]
fn a_corrupt_store_stops_the_server_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("db")).unwrap();
    std::fs::write(dir.path().join("db/state.db"), vec![0x5a; 8192]).unwrap();
    let output = tugboat()
        .args(["server", "--data-dir", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains("corrupt") && message.contains("state.db"),
        "{message}"
    );
    assert!(!message.contains("panicked"), "{message}");
}

#[test]
fn an_unreachable_etcd_stops_the_server_naming_the_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let endpoint = format!("http://127.0.0.1:{port}");
    let output = tugboat()
        .args([
            "server",
            "--data-dir",
            dir.path().to_str().unwrap(),
            "--datastore-endpoint",
            &endpoint,
        ])
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    let message = String::from_utf8_lossy(&output.stderr);
    assert!(
        message.contains(&endpoint) && message.contains("unreachable"),
        "{message}"
    );
}

#[test]
fn the_server_runs_on_a_real_etcd() {
    let etcd = tugboat_testkit::EtcdServer::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (mut child, lines) = start(&[
        "--data-dir",
        dir.path().to_str().unwrap(),
        "--datastore-endpoint",
        etcd.client_url(),
    ]);
    let ready = wait_for(&lines, "tugboat server ready");
    assert!(ready.contains(etcd.client_url()), "{ready}");
    assert!(
        !dir.path().join("db").exists(),
        "no embedded store when etcd is used"
    );
    assert!(terminate(&mut child).success());
}
