//! Container logs as `kubectl logs` wants them, read from the CRI log files the shims write
//! (`<RFC 3339 nano> <stdout|stderr> <F|P> <text>` per line): tailLines, sinceSeconds/sinceTime,
//! timestamps, limitBytes, and follow until the container has ended.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use k8s_openapi::jiff::Timestamp;

/// `PodLogOptions`, as the API server passes them on.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LogOptions {
    pub follow: bool,
    pub tail_lines: Option<usize>,
    pub timestamps: bool,
    pub since: Option<Timestamp>,
    pub limit_bytes: Option<usize>,
}

impl LogOptions {
    /// From the query string (`follow=true&tailLines=10&sinceSeconds=5&timestamps=true&...`).
    pub fn from_query(query: &std::collections::HashMap<String, String>) -> Result<LogOptions, String> {
        let flag = |name: &str| query.get(name).is_some_and(|v| v == "true" || v == "1" || v == "True");
        let number = |name: &str| -> Result<Option<i64>, String> {
            query.get(name).map(|v| v.parse::<i64>().map_err(|_| format!("{name}: not a number: {v:?}"))).transpose()
        };
        let tail_lines = number("tailLines")?;
        if tail_lines.is_some_and(|n| n < 0) {
            return Err("tailLines: must be greater than or equal to 0".into());
        }
        let limit_bytes = number("limitBytes")?;
        if limit_bytes.is_some_and(|n| n < 1) {
            return Err("limitBytes: must be greater than 0".into());
        }
        let since_seconds = number("sinceSeconds")?;
        if since_seconds.is_some_and(|n| n < 1) {
            return Err("sinceSeconds: must be greater than 0".into());
        }
        let since_time = query.get("sinceTime");
        if since_seconds.is_some() && since_time.is_some() {
            return Err("at most one of sinceTime or sinceSeconds may be specified".into());
        }
        let since = match (since_seconds, since_time) {
            (Some(s), _) => Some(Timestamp::now() - Duration::from_secs(s as u64)),
            (None, Some(t)) => Some(t.parse::<Timestamp>().map_err(|e| format!("sinceTime: {e}"))?),
            (None, None) => None,
        };
        Ok(LogOptions {
            follow: flag("follow"),
            tail_lines: tail_lines.map(|n| n as usize),
            timestamps: flag("timestamps"),
            since,
            limit_bytes: limit_bytes.map(|n| n as usize),
        })
    }
}

/// One record of a CRI log file.
#[derive(Debug, PartialEq)]
pub struct Record<'a> {
    pub time: &'a str,
    pub stream: &'a str,
    pub partial: bool,
    pub text: &'a [u8],
}

pub fn parse(line: &[u8]) -> Option<Record<'_>> {
    let mut parts = line.splitn(4, |&b| b == b' ');
    let time = std::str::from_utf8(parts.next()?).ok()?;
    let stream = std::str::from_utf8(parts.next()?).ok()?;
    let tag = parts.next()?;
    let text = parts.next().unwrap_or_default();
    Some(Record { time, stream, partial: tag == b"P", text })
}

/// What a record shows to the user: its text (a newline unless partial), after its timestamp
/// when asked; nothing when before `since`.
pub fn render(record: &Record<'_>, options: &LogOptions, out: &mut Vec<u8>) {
    if let Some(since) = options.since
        && record.time.parse::<Timestamp>().is_ok_and(|t| t < since)
    {
        return;
    }
    if options.timestamps {
        out.extend_from_slice(record.time.as_bytes());
        out.push(b' ');
    }
    out.extend_from_slice(record.text);
    if !record.partial {
        out.push(b'\n');
    }
}

/// The whole lines of `bytes` (a CRI log), the last `tail` of them when given.
fn lines(bytes: &[u8], tail: Option<usize>) -> Vec<&[u8]> {
    let mut lines: Vec<&[u8]> = bytes.split(|&b| b == b'\n').filter(|l| !l.is_empty()).collect();
    if let Some(tail) = tail {
        let skip = lines.len().saturating_sub(tail);
        lines.drain(..skip);
    }
    lines
}

/// Renders what is in the file now; returns the rendered bytes and the offset read up to (the
/// end of the last whole line).
pub fn read_existing(path: &Path, options: &LogOptions) -> std::io::Result<(Vec<u8>, u64)> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e),
    };
    let whole = bytes.iter().rposition(|&b| b == b'\n').map(|i| i + 1).unwrap_or(0);
    let mut out = Vec::new();
    for line in lines(&bytes[..whole], options.tail_lines) {
        if let Some(record) = parse(line) {
            render(&record, options, &mut out);
        }
    }
    Ok((out, whole as u64))
}

/// Streams a container's log into `tx`: what is there, then (with follow) what comes, until
/// `finished()` says the container has ended and everything is read, or the reader goes away.
pub async fn stream(
    path: PathBuf,
    options: LogOptions,
    finished: impl Fn() -> bool + Send + 'static,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    let mut budget = options.limit_bytes.unwrap_or(usize::MAX);
    let send = async |mut chunk: Vec<u8>, budget: &mut usize| -> bool {
        if chunk.is_empty() {
            return true;
        }
        chunk.truncate(*budget);
        *budget -= chunk.len();
        tx.send(Ok(Bytes::from(chunk))).await.is_ok() && *budget > 0
    };
    let (first, offset) = match read_existing(&path, &options) {
        Ok(read) => read,
        Err(e) => {
            let _ = tx.send(Err(e)).await;
            return;
        }
    };
    if !send(first, &mut budget).await || !options.follow {
        return;
    }
    let follow = LogOptions { tail_lines: None, ..options };
    // The file stays open: once the log is rotated (the path names a new file) and the old
    // one is read to its end, the new one is followed from its start.
    let open_at = |offset: u64| {
        let mut file = std::fs::File::open(&path).ok()?;
        file.seek(SeekFrom::Start(offset)).ok()?;
        let inode = std::os::unix::fs::MetadataExt::ino(&file.metadata().ok()?);
        Some((file, inode))
    };
    let mut current = open_at(offset);
    let mut fresh = Vec::new();
    loop {
        let done = finished();
        let got = match current.as_mut() {
            Some((file, _)) => file.read_to_end(&mut fresh).unwrap_or(0),
            None => 0,
        };
        if got == 0 {
            let now = std::fs::metadata(&path).ok().map(|m| std::os::unix::fs::MetadataExt::ino(&m));
            if now.is_some() && now != current.as_ref().map(|(_, inode)| *inode) {
                current = open_at(0);
                continue;
            }
        }
        let whole = fresh.iter().rposition(|&b| b == b'\n').map(|i| i + 1).unwrap_or(0);
        if whole > 0 {
            let mut out = Vec::new();
            for line in lines(&fresh[..whole], None) {
                if let Some(record) = parse(line) {
                    render(&record, &follow, &mut out);
                }
            }
            fresh.drain(..whole);
            if !send(out, &mut budget).await {
                return;
            }
        }
        if done && got == 0 {
            return;
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LOG: &[u8] = b"2026-01-01T00:00:00.000000001Z stdout F one\n\
2026-01-01T00:00:01.000000000Z stderr P tw\n\
2026-01-01T00:00:01.000000001Z stderr F o\n\
2026-01-01T00:00:02.000000000Z stdout F three\n\
2026-01-01T00:00:03.000000000Z stdout F parti";

    fn render_all(options: &LogOptions) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        std::fs::write(&path, LOG).unwrap();
        let (out, offset) = read_existing(&path, options).unwrap();
        assert_eq!(offset as usize, LOG.iter().rposition(|&b| b == b'\n').unwrap() + 1);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn records_render_as_kubectl_logs_shows_them() {
        assert_eq!(render_all(&LogOptions::default()), "one\ntwo\nthree\n");
        assert_eq!(render_all(&LogOptions { tail_lines: Some(1), ..Default::default() }), "three\n");
        assert_eq!(render_all(&LogOptions { tail_lines: Some(0), ..Default::default() }), "");
        let stamped = render_all(&LogOptions { timestamps: true, tail_lines: Some(1), ..Default::default() });
        assert_eq!(stamped, "2026-01-01T00:00:02.000000000Z three\n");
        let since = "2026-01-01T00:00:01Z".parse().ok();
        assert_eq!(render_all(&LogOptions { since, ..Default::default() }), "two\nthree\n");
    }

    #[test]
    fn options_are_validated_as_upstream() {
        let q = |pairs: &[(&str, &str)]| {
            LogOptions::from_query(&pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
        };
        assert!(q(&[("tailLines", "-1")]).unwrap_err().contains("tailLines"));
        assert!(q(&[("limitBytes", "0")]).unwrap_err().contains("limitBytes"));
        assert!(q(&[("sinceSeconds", "5"), ("sinceTime", "2026-01-01T00:00:00Z")]).is_err());
        let o = q(&[("follow", "true"), ("tailLines", "3"), ("timestamps", "true")]).unwrap();
        assert!(o.follow && o.timestamps && o.tail_lines == Some(3));
    }

    #[tokio::test]
    async fn follow_ends_when_the_container_has_and_honours_limit_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        std::fs::write(&path, b"2026-01-01T00:00:00Z stdout F a\n").unwrap();
        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        let task = tokio::spawn(stream(
            path.clone(),
            LogOptions { follow: true, ..Default::default() },
            move || flag.load(std::sync::atomic::Ordering::SeqCst),
            tx,
        ));
        assert_eq!(rx.recv().await.unwrap().unwrap(), "a\n");
        std::fs::write(&path, b"2026-01-01T00:00:00Z stdout F a\n2026-01-01T00:00:01Z stdout F b\n").unwrap();
        assert_eq!(rx.recv().await.unwrap().unwrap(), "b\n");
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        task.await.unwrap();
        assert!(rx.recv().await.is_none());

        let (tx, mut rx) = tokio::sync::mpsc::channel(8);
        stream(path, LogOptions { limit_bytes: Some(3), ..Default::default() }, || true, tx).await;
        assert_eq!(rx.recv().await.unwrap().unwrap(), "a\nb");
    }

    #[tokio::test]
    async fn followers_move_on_to_the_new_file_after_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("0.log");
        std::fs::write(&path, "2026-01-01T00:00:00Z stdout F before\n").unwrap();
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let finished = {
            let done = done.clone();
            move || done.load(std::sync::atomic::Ordering::SeqCst)
        };
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let options = LogOptions { follow: true, ..Default::default() };
        let task = tokio::spawn(stream(path.clone(), options, finished, tx));
        assert_eq!(rx.recv().await.unwrap().unwrap(), "before\n");
        // The old file gets one more line, then is rotated; the new one has the next.
        use std::io::Write;
        let mut old = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        old.write_all(b"2026-01-01T00:00:01Z stdout F last of the old\n").unwrap();
        std::fs::rename(&path, dir.path().join("0.log.20260101-000001")).unwrap();
        std::fs::write(&path, "2026-01-01T00:00:02Z stdout F first of the new\n").unwrap();
        let mut seen = String::new();
        while !seen.contains("first of the new") {
            let chunk = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await.unwrap().unwrap().unwrap();
            seen.push_str(std::str::from_utf8(&chunk).unwrap());
        }
        assert_eq!(seen, "last of the old\nfirst of the new\n");
        done.store(true, std::sync::atomic::Ordering::SeqCst);
        task.await.unwrap();
    }
}
