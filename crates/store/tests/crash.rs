//! Acknowledged writes survive `kill -9`: a child process writes with many concurrent writers
//! and reports each write the store acknowledged; the test kills it at a random moment, reopens
//! the file and checks every acknowledged write. Repeated, on the same file, so each round also
//! recovers from the previous crash.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::Rng;
use tugboat_store::{SqliteConfig, SqliteStore, Store};

const CHILD_ENV: &str = "TUGBOAT_CRASH_CHILD_DIR";
const ROUNDS: usize = 25;
const WRITERS: usize = 16;

/// The child's side: runs only when the parent re-executes this test binary.
#[test]
fn crash_child_writer() {
    let Some(dir) = std::env::var_os(CHILD_ENV) else {
        return;
    };
    let round: usize = std::env::var("TUGBOAT_CRASH_ROUND").unwrap().parse().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    runtime.block_on(async move {
        let store = Arc::new(SqliteStore::open(SqliteConfig::in_data_dir(dir.as_ref())).unwrap());
        let stdout = Arc::new(Mutex::new(std::io::stdout()));
        let mut tasks = Vec::new();
        for writer in 0..WRITERS {
            let (store, stdout) = (store.clone(), stdout.clone());
            tasks.push(tokio::spawn(async move {
                // Each writer creates fresh keys and keeps rewriting one key of its own.
                let counter = format!("/counter/{writer}");
                let mut counter_revision = match store.get(&counter, None).await.unwrap() {
                    Some(kv) => kv.mod_revision,
                    None => store.create(&counter, b"0".to_vec()).await.unwrap(),
                };
                for i in 0.. {
                    let key = format!("/crash/{round}/{writer}/{i}");
                    let value = format!("{round}-{writer}-{i}");
                    let revision = store.create(&key, value.clone().into_bytes()).await.unwrap();
                    counter_revision =
                        store.update(&counter, value.clone().into_bytes(), counter_revision).await.unwrap();
                    let mut out = stdout.lock().unwrap();
                    writeln!(out, "ack {key} {revision} {value}").unwrap();
                    writeln!(out, "ack {counter} {counter_revision} {value}").unwrap();
                    out.flush().unwrap();
                }
            }));
        }
        for task in tasks {
            task.await.unwrap();
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_sigkill() {
    if std::env::var_os(CHILD_ENV).is_some() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let exe = std::env::current_exe().unwrap();
    let mut total = 0;
    for round in 0..ROUNDS {
        let mut child = Command::new(&exe)
            .args(["crash_child_writer", "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, dir.path())
            .env("TUGBOAT_CRASH_ROUND", round.to_string())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (sender, received) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok).filter(|l| l.starts_with("ack ")) {
                let _ = sender.send(line);
            }
        });
        // Killed at a random point once it writes (however long a busy machine takes to start
        // it), so that the kill lands in the middle of writes.
        let first = received.recv_timeout(Duration::from_secs(120));
        let delay = rand::rng().random_range(0..300);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        child.kill().unwrap(); // SIGKILL
        child.wait().unwrap();
        reader.join().unwrap();
        let acks: Vec<String> = first.into_iter().chain(received.try_iter()).collect();
        assert!(!acks.is_empty(), "round {round}: the child acknowledged nothing in 120 s");

        // Per key, the last acknowledged write (revision and value).
        let mut expected: BTreeMap<String, (i64, String)> = BTreeMap::new();
        for ack in &acks {
            let mut parts = ack.splitn(4, ' ').skip(1);
            let (key, revision, value) = (parts.next().unwrap(), parts.next().unwrap(), parts.next().unwrap());
            let revision: i64 = revision.parse().unwrap();
            let entry = expected.entry(key.to_string()).or_insert((0, String::new()));
            if revision > entry.0 {
                *entry = (revision, value.to_string());
            }
        }
        let store = SqliteStore::open(SqliteConfig::in_data_dir(dir.path())).unwrap();
        let current = store.current_revision().await.unwrap();
        for (key, (revision, value)) in &expected {
            assert!(current >= *revision, "round {round}: revision {revision} acknowledged, store is at {current}");
            let at = store.get(key, Some(*revision)).await.unwrap();
            let at = at.unwrap_or_else(|| panic!("round {round}: acknowledged {key}@{revision} is lost"));
            assert_eq!(at.mod_revision, *revision, "round {round}: {key}");
            assert_eq!(String::from_utf8(at.value).unwrap(), *value, "round {round}: {key}");
        }
        total += acks.len();
        drop(store);
    }
    eprintln!("{ROUNDS} kill -9 rounds, {total} acknowledged writes checked");
}
