//! SPDY/3.1, the other transport of `kubectl exec` (the only one of kubectl ≤ 1.29): after
//! `Upgrade: SPDY/3.1` the client opens one stream per channel with SYN_STREAM frames whose
//! `streamType` header says which (error, stdin, stdout, stderr, resize); the server answers
//! each with SYN_REPLY, then data flows in DATA frames (FIN closes a direction). Header blocks
//! are zlib-compressed with one context per direction per connection; the client's use the
//! SPDY/3 dictionary (spec §2.6.10.1), ours are compressed without one (allowed: a zlib stream
//! without FDICT needs no dictionary to read).

use std::collections::HashMap;
use std::sync::LazyLock;

use axum::body::Body;
use axum::http::{HeaderMap, Response, StatusCode, header};
use bytes::Bytes;
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress, Status};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

const SYN_STREAM: u16 = 1;
const SYN_REPLY: u16 = 2;
const RST_STREAM: u16 = 3;
const PING: u16 = 6;
const GOAWAY: u16 = 7;
const FLAG_FIN: u8 = 1;

/// The SPDY/3 header compression dictionary, built as the spec lays it out: length-prefixed
/// header names and values, then a run of common text.
pub static DICTIONARY: LazyLock<Vec<u8>> = LazyLock::new(|| {
    const WORDS: &[&str] = &[
        "options",
        "head",
        "post",
        "put",
        "delete",
        "trace",
        "accept",
        "accept-charset",
        "accept-encoding",
        "accept-language",
        "accept-ranges",
        "age",
        "allow",
        "authorization",
        "cache-control",
        "connection",
        "content-base",
        "content-encoding",
        "content-language",
        "content-length",
        "content-location",
        "content-md5",
        "content-range",
        "content-type",
        "date",
        "etag",
        "expect",
        "expires",
        "from",
        "host",
        "if-match",
        "if-modified-since",
        "if-none-match",
        "if-range",
        "if-unmodified-since",
        "last-modified",
        "location",
        "max-forwards",
        "pragma",
        "proxy-authenticate",
        "proxy-authorization",
        "range",
        "referer",
        "retry-after",
        "server",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "user-agent",
        "vary",
        "via",
        "warning",
        "www-authenticate",
        "method",
        "get",
        "status",
        "200 OK",
        "version",
        "HTTP/1.1",
        "url",
        "public",
        "set-cookie",
        "keep-alive",
        "origin",
    ];
    const TEXT: &str = "100101201202205206300302303304305306307402405406407408409410411412413414415416417502504505\
203 Non-Authoritative Information204 No Content301 Moved Permanently400 Bad Request401 Unauthorized\
403 Forbidden404 Not Found500 Internal Server Error501 Not Implemented503 Service Unavailable\
Jan Feb Mar Apr May Jun Jul Aug Sept Oct Nov Dec 00:00:00 Mon, Tue, Wed, Thu, Fri, Sat, Sun, GMT\
chunked,text/html,image/png,image/jpg,image/gif,application/xml,application/xhtml+xml,text/plain,\
text/javascript,publicprivatemax-age=gzip,deflate,sdchcharset=utf-8charset=iso-8859-1,utf-,*,enq=0.";
    let mut dictionary = Vec::with_capacity(1423);
    for word in WORDS {
        dictionary.extend_from_slice(&(word.len() as u32).to_be_bytes());
        dictionary.extend_from_slice(word.as_bytes());
    }
    dictionary.extend_from_slice(TEXT.as_bytes());
    dictionary
});

/// Whether a request asks to switch to SPDY/3.1.
pub fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.get(header::UPGRADE).and_then(|v| v.to_str().ok()).is_some_and(|v| v.eq_ignore_ascii_case("SPDY/3.1"))
}

/// The 101 answer that switches to SPDY/3.1 with `protocol` as the stream protocol.
pub fn switching(protocol: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "SPDY/3.1")
        .header("X-Stream-Protocol-Version", protocol)
        .body(Body::empty())
        .expect("a valid response")
}

/// A frame as read.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// A new stream from the peer, with its headers (names lowercased).
    SynStream {
        id: u32,
        headers: HashMap<String, String>,
        fin: bool,
    },
    Data {
        id: u32,
        data: Bytes,
        fin: bool,
    },
    Ping(u32),
    Reset(u32),
    GoAway,
    /// SETTINGS, WINDOW_UPDATE, HEADERS, …: nothing to do.
    Other,
}

/// Reads frames, inflating header blocks with the connection's context.
#[allow(missing_debug_implementations)]
pub struct Reader<R> {
    io: R,
    inflate: Decompress,
}

impl<R: AsyncRead + Unpin> Reader<R> {
    pub fn new(io: R) -> Reader<R> {
        Reader { io, inflate: Decompress::new(true) }
    }

    /// The next frame; None at the end of the connection.
    pub async fn next(&mut self) -> std::io::Result<Option<Frame>> {
        let mut head = [0u8; 8];
        match self.io.read_exact(&mut head).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
            Err(e) => return Err(e),
        }
        let flags = head[4];
        let length = u32::from_be_bytes([0, head[5], head[6], head[7]]) as usize;
        let mut body = vec![0u8; length];
        self.io.read_exact(&mut body).await?;
        if head[0] & 0x80 == 0 {
            let id = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) & 0x7fff_ffff;
            return Ok(Some(Frame::Data { id, data: Bytes::from(body), fin: flags & FLAG_FIN != 0 }));
        }
        let kind = u16::from_be_bytes([head[2], head[3]]);
        let word = |at: usize| body.get(at..at + 4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) & 0x7fff_ffff);
        Ok(Some(match kind {
            SYN_STREAM => {
                let id = word(0).ok_or_else(|| bad("short SYN_STREAM"))?;
                let headers = decode_headers(&self.inflate_block(body.get(10..).unwrap_or_default())?)?;
                Frame::SynStream { id, headers, fin: flags & FLAG_FIN != 0 }
            }
            PING => Frame::Ping(word(0).ok_or_else(|| bad("short PING"))?),
            RST_STREAM => Frame::Reset(word(0).ok_or_else(|| bad("short RST_STREAM"))?),
            GOAWAY => Frame::GoAway,
            _ => Frame::Other,
        }))
    }

    fn inflate_block(&mut self, input: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(input.len() * 4 + 256);
        let mut consumed = 0;
        loop {
            let (in_before, out_before) = (self.inflate.total_in(), self.inflate.total_out());
            let result = self.inflate.decompress_vec(&input[consumed..], &mut out, FlushDecompress::Sync);
            consumed += (self.inflate.total_in() - in_before) as usize;
            let produced = self.inflate.total_out() - out_before;
            match result {
                Ok(Status::Ok | Status::BufError | Status::StreamEnd) => {
                    if consumed >= input.len() && (produced == 0 || out.len() < out.capacity()) {
                        break;
                    }
                    out.reserve(4096);
                }
                Err(e) if e.needs_dictionary().is_some() => {
                    self.inflate.set_dictionary(&DICTIONARY).map_err(|e| bad(&format!("SPDY dictionary: {e}")))?;
                }
                Err(e) => return Err(bad(&format!("SPDY header block: {e}"))),
            }
        }
        Ok(out)
    }
}

fn bad(message: &str) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, message.to_string())
}

fn read_u32(block: &[u8], at: &mut usize) -> std::io::Result<usize> {
    let b = block.get(*at..*at + 4).ok_or_else(|| bad("short header block"))?;
    *at += 4;
    Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize)
}

fn read_bytes<'a>(block: &'a [u8], at: &mut usize) -> std::io::Result<&'a [u8]> {
    let len = read_u32(block, at)?;
    let bytes = block.get(*at..*at + len).ok_or_else(|| bad("short header block"))?;
    *at += len;
    Ok(bytes)
}

/// A name/value block: u32 count, then (u32 length, name, u32 length, value) per pair.
pub fn decode_headers(block: &[u8]) -> std::io::Result<HashMap<String, String>> {
    let mut at = 0;
    let count = read_u32(block, &mut at)?;
    let mut headers = HashMap::new();
    for _ in 0..count {
        let name = read_bytes(block, &mut at)?;
        let value = read_bytes(block, &mut at)?;
        headers.insert(String::from_utf8_lossy(name).to_lowercase(), String::from_utf8_lossy(value).into_owned());
    }
    Ok(headers)
}

/// Writes frames, deflating header blocks with the connection's context.
#[allow(missing_debug_implementations)]
pub struct Writer<W> {
    io: W,
    deflate: Compress,
}

impl<W: AsyncWrite + Unpin> Writer<W> {
    pub fn new(io: W) -> Writer<W> {
        Writer { io, deflate: Compress::new(Compression::default(), true) }
    }

    fn deflate_block(&mut self, block: &[u8]) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::with_capacity(block.len() + 128);
        let mut consumed = 0;
        loop {
            let before = self.deflate.total_in();
            self.deflate
                .compress_vec(&block[consumed..], &mut out, FlushCompress::Sync)
                .map_err(|e| bad(&format!("deflate: {e}")))?;
            consumed += (self.deflate.total_in() - before) as usize;
            if consumed >= block.len() && out.len() < out.capacity() {
                break;
            }
            out.reserve(256);
        }
        Ok(out)
    }

    async fn control(&mut self, kind: u16, flags: u8, body: &[u8]) -> std::io::Result<()> {
        let mut frame = Vec::with_capacity(body.len() + 8);
        frame.extend_from_slice(&(0x8000u16 | 3).to_be_bytes());
        frame.extend_from_slice(&kind.to_be_bytes());
        frame.push(flags);
        frame.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        frame.extend_from_slice(body);
        self.io.write_all(&frame).await?;
        self.io.flush().await
    }

    /// SYN_REPLY (no headers) accepting a stream.
    pub async fn reply(&mut self, id: u32) -> std::io::Result<()> {
        let block = self.deflate_block(&0u32.to_be_bytes())?;
        let mut body = id.to_be_bytes().to_vec();
        body.extend_from_slice(&block);
        self.control(SYN_REPLY, 0, &body).await
    }

    pub async fn ping(&mut self, id: u32) -> std::io::Result<()> {
        self.control(PING, 0, &id.to_be_bytes()).await
    }

    pub async fn go_away(&mut self, last: u32) -> std::io::Result<()> {
        let mut body = last.to_be_bytes().to_vec();
        body.extend_from_slice(&0u32.to_be_bytes());
        self.control(GOAWAY, 0, &body).await
    }

    pub async fn data(&mut self, id: u32, data: &[u8], fin: bool) -> std::io::Result<()> {
        for (i, chunk) in data.chunks(64 * 1024).enumerate() {
            let last = (i + 1) * 64 * 1024 >= data.len();
            self.data_frame(id, chunk, fin && last).await?;
        }
        if data.is_empty() {
            self.data_frame(id, &[], fin).await?;
        }
        Ok(())
    }

    async fn data_frame(&mut self, id: u32, data: &[u8], fin: bool) -> std::io::Result<()> {
        let mut frame = Vec::with_capacity(data.len() + 8);
        frame.extend_from_slice(&(id & 0x7fff_ffff).to_be_bytes());
        frame.push(if fin { FLAG_FIN } else { 0 });
        frame.extend_from_slice(&(data.len() as u32).to_be_bytes()[1..]);
        frame.extend_from_slice(data);
        self.io.write_all(&frame).await?;
        self.io.flush().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_dictionary_is_the_specs() {
        assert_eq!(DICTIONARY.len(), 1423);
        assert!(DICTIONARY.starts_with(b"\0\0\0\x07options\0\0\0\x04head"));
        assert!(DICTIONARY.ends_with(b"utf-,*,enq=0."));
    }

    fn block(pairs: &[(&str, &str)]) -> Vec<u8> {
        let mut b = (pairs.len() as u32).to_be_bytes().to_vec();
        for (n, v) in pairs {
            b.extend_from_slice(&(n.len() as u32).to_be_bytes());
            b.extend_from_slice(n.as_bytes());
            b.extend_from_slice(&(v.len() as u32).to_be_bytes());
            b.extend_from_slice(v.as_bytes());
        }
        b
    }

    #[tokio::test]
    async fn frames_round_trip_with_dictionary_compressed_headers() {
        // A client's SYN_STREAM, compressed with the dictionary as Go's spdystream does.
        let mut deflate = Compress::new_with_window_bits(Compression::default(), true, 15);
        deflate.set_dictionary(&DICTIONARY).unwrap();
        let mut wire = Vec::new();
        for (id, kind) in [(1u32, "error"), (3, "stdin")] {
            let mut compressed = Vec::with_capacity(512);
            deflate.compress_vec(&block(&[("streamtype", kind)]), &mut compressed, FlushCompress::Sync).unwrap();
            let mut body = id.to_be_bytes().to_vec();
            body.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
            body.extend_from_slice(&compressed);
            wire.extend_from_slice(&[0x80, 3, 0, 1, 0]);
            wire.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
            wire.extend_from_slice(&body);
        }
        wire.extend_from_slice(&[0, 0, 0, 3, 1, 0, 0, 2, b'h', b'i']);
        let mut reader = Reader::new(&wire[..]);
        let Some(Frame::SynStream { id, headers, .. }) = reader.next().await.unwrap() else { panic!() };
        assert_eq!((id, headers["streamtype"].as_str()), (1, "error"));
        let Some(Frame::SynStream { id, headers, .. }) = reader.next().await.unwrap() else { panic!() };
        assert_eq!((id, headers["streamtype"].as_str()), (3, "stdin"));
        assert_eq!(
            reader.next().await.unwrap(),
            Some(Frame::Data { id: 3, data: Bytes::from_static(b"hi"), fin: true })
        );
        assert_eq!(reader.next().await.unwrap(), None);

        // Our SYN_REPLY reads back (inflated without a dictionary).
        let mut out = Vec::new();
        {
            let mut writer = Writer::new(&mut out);
            writer.reply(5).await.unwrap();
            writer.data(5, b"out", true).await.unwrap();
        }
        assert_eq!(&out[..4], &[0x80, 3, 0, 2]);
        let mut inflate = Decompress::new(true);
        let mut headers = Vec::with_capacity(64);
        inflate.decompress_vec(&out[12..out.len() - 11], &mut headers, FlushDecompress::Sync).unwrap();
        assert_eq!(headers, 0u32.to_be_bytes());
        assert_eq!(&out[out.len() - 11..], &[0, 0, 0, 5, 1, 0, 0, 3, b'o', b'u', b't']);
    }
}
