//! Reads an etcd snapshot (etcd's bbolt database file, as its snapshot API streams it) far
//! enough to recover the key-value state at its last revision, so that `tugboat snapshot
//! restore` takes etcd snapshots into the embedded store too.
//!
//! bbolt's layout (go.etcd.io/bbolt, page.go): pages of `pageSize` bytes, each with a 16-byte
//! header (id u64, flags u16, count u16, overflow u32); two meta pages (the valid one with the
//! higher txid names the root bucket); branch elements (pos u32, ksize u32, pgid u64) and leaf
//! elements (flags u32, pos u32, ksize u32, vsize u32), each `pos` bytes before its key. A
//! bucket is a leaf value (root pgid u64, sequence u64), inline (its page follows) when the
//! root is 0. etcd keeps every revision in bucket `key`: keys are revisions (main u64 BE, `_`,
//! sub u64 BE, and `t` for a deletion), values `mvccpb.KeyValue` protobufs.

use std::collections::BTreeMap;

const MAGIC: u32 = 0xED0C_DAED;
const BRANCH: u16 = 0x01;
const LEAF: u16 = 0x02;
const BUCKET_LEAF: u32 = 0x01;
const HEADER: usize = 16;
const ELEMENT: usize = 16;
/// Nested buckets and branch levels a sane file has; more means a loop.
const MAX_DEPTH: usize = 64;

/// Why a file is not a readable etcd snapshot.
pub type Error = String;

/// `N` bytes at `at`, or an error when the file ends before.
fn bytes_at<const N: usize>(bytes: &[u8], at: usize) -> Result<[u8; N], Error> {
    at.checked_add(N)
        .and_then(|end| bytes.get(at..end))
        .map(|b| b.try_into().expect("N bytes"))
        .ok_or_else(|| format!("truncated at byte {at}"))
}

fn u16_at(bytes: &[u8], at: usize) -> Result<u16, Error> {
    bytes_at(bytes, at).map(u16::from_le_bytes)
}

fn u32_at(bytes: &[u8], at: usize) -> Result<u32, Error> {
    bytes_at(bytes, at).map(u32::from_le_bytes)
}

fn u64_at(bytes: &[u8], at: usize) -> Result<u64, Error> {
    bytes_at(bytes, at).map(u64::from_le_bytes)
}

/// Whether `bytes` start like a bbolt file.
pub fn looks_like_bbolt(bytes: &[u8]) -> bool {
    u32_at(bytes, HEADER).is_ok_and(|m| m == MAGIC)
}

struct Db<'a> {
    bytes: &'a [u8],
    page_size: usize,
}

impl<'a> Db<'a> {
    fn open(bytes: &'a [u8]) -> Result<(Db<'a>, u64), Error> {
        // Meta pages 0 and 1; the page size is read from the first, which sits at offset 0.
        let mut best: Option<(u64, u64, usize)> = None;
        let first_size = u32_at(bytes, HEADER + 8)? as usize;
        for page in 0..2usize {
            let at = page * first_size + HEADER;
            let (Ok(magic), Ok(size)) = (u32_at(bytes, at), u32_at(bytes, at + 8)) else { continue };
            if magic != MAGIC || !(512..=65536).contains(&size) {
                continue;
            }
            let (root, txid) = (u64_at(bytes, at + 16)?, u64_at(bytes, at + 48)?);
            if best.is_none_or(|(_, t, _)| txid > t) {
                best = Some((root, txid, size as usize));
            }
        }
        let (root, _, page_size) = best.ok_or("not a bbolt database: no valid meta page")?;
        Ok((Db { bytes, page_size }, root))
    }

    fn page(&self, id: u64) -> Result<&'a [u8], Error> {
        let beyond = || format!("page {id} lies beyond the file");
        let start = usize::try_from(id).ok().and_then(|id| id.checked_mul(self.page_size)).ok_or_else(beyond)?;
        let overflow = u32_at(self.bytes, start.checked_add(12).ok_or_else(beyond)?)? as usize;
        let end =
            (overflow + 1).checked_mul(self.page_size).and_then(|len| start.checked_add(len)).ok_or_else(beyond)?;
        self.bytes.get(start..end.min(self.bytes.len())).ok_or_else(beyond)
    }

    /// Calls `visit(flags, key, value)` for every leaf element of the tree under `page`.
    fn walk(
        &self,
        page: &'a [u8],
        depth: usize,
        visit: &mut dyn FnMut(u32, &'a [u8], &'a [u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        if depth > MAX_DEPTH {
            return Err("the tree is too deep (a loop?)".into());
        }
        let (flags, count) = (u16_at(page, 8)?, u16_at(page, 10)? as usize);
        for i in 0..count {
            let element = HEADER + i * ELEMENT;
            if flags & BRANCH != 0 {
                let child = u64_at(page, element + 8)?;
                self.walk(self.page(child)?, depth + 1, visit)?;
            } else if flags & LEAF != 0 {
                let (kind, pos) = (u32_at(page, element)?, u32_at(page, element + 4)? as usize);
                let (ksize, vsize) = (u32_at(page, element + 8)? as usize, u32_at(page, element + 12)? as usize);
                let key_at = element + pos;
                let key = page.get(key_at..key_at + ksize).ok_or("a key beyond its page")?;
                let value = page.get(key_at + ksize..key_at + ksize + vsize).ok_or("a value beyond its page")?;
                visit(kind, key, value)?;
            } else {
                return Err(format!("page of unexpected kind {flags:#x} in a tree"));
            }
        }
        Ok(())
    }

    /// The leaf elements of the bucket whose header is `header`.
    fn bucket(
        &self,
        header: &'a [u8],
        depth: usize,
        visit: &mut dyn FnMut(u32, &'a [u8], &'a [u8]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let root = u64_at(header, 0)?;
        let page = if root == 0 { header.get(16..).ok_or("a truncated inline bucket")? } else { self.page(root)? };
        self.walk(page, depth, visit)
    }
}

/// A protobuf varint at `*at`.
fn varint(bytes: &[u8], at: &mut usize) -> Result<u64, Error> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at).ok_or("a truncated varint")?;
        *at += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err("an overlong varint".into())
}

/// `mvccpb.KeyValue`: (key, value).
fn key_value(bytes: &[u8]) -> Result<(Vec<u8>, Vec<u8>), Error> {
    let (mut key, mut value, mut at) = (Vec::new(), Vec::new(), 0);
    while at < bytes.len() {
        let tag = varint(bytes, &mut at)?;
        match tag & 7 {
            0 => {
                varint(bytes, &mut at)?;
            }
            2 => {
                let len = varint(bytes, &mut at)? as usize;
                let field = at.checked_add(len).and_then(|end| bytes.get(at..end)).ok_or("a truncated field")?;
                at += len;
                match tag >> 3 {
                    1 => key = field.to_vec(),
                    5 => value = field.to_vec(),
                    _ => {}
                }
            }
            kind => return Err(format!("unexpected protobuf wire type {kind}")),
        }
    }
    Ok((key, value))
}

/// The live keys (and values) of an etcd snapshot at its last revision, in key order.
pub fn etcd_state(bytes: &[u8]) -> Result<BTreeMap<Vec<u8>, Vec<u8>>, Error> {
    let (db, root) = Db::open(bytes)?;
    let mut key_bucket = None;
    db.walk(db.page(root)?, 0, &mut |flags, name, value| {
        if flags & BUCKET_LEAF != 0 && name == b"key" {
            key_bucket = Some(value);
        }
        Ok(())
    })?;
    let header = key_bucket.ok_or("no `key` bucket: not an etcd (v3) snapshot")?;
    // Every revision, in revision order (bbolt keeps keys sorted; revisions sort as bytes).
    let mut state = BTreeMap::new();
    db.bucket(header, 1, &mut |_, revision, value| {
        if revision.len() < 17 {
            return Err(format!("a revision key of {} bytes", revision.len()));
        }
        let (key, value) = key_value(value)?;
        if revision.get(17) == Some(&b't') {
            state.remove(&key);
        } else {
            state.insert(key, value);
        }
        Ok(())
    })?;
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values_decode_from_protobuf() {
        // key "/a" (1), create_revision 2 (2), mod_revision 3 (3), version 1 (4), value "v" (5).
        let bytes = [0x0a, 2, b'/', b'a', 0x10, 2, 0x18, 3, 0x20, 1, 0x2a, 1, b'v'];
        assert_eq!(key_value(&bytes).unwrap(), (b"/a".to_vec(), b"v".to_vec()));
        assert!(key_value(&[0x0a, 5, b'/']).is_err(), "truncated");
        let huge = [0x0a, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01];
        assert!(key_value(&huge).is_err(), "a length past the end");
    }

    #[test]
    fn garbage_is_refused_not_panicked_on() {
        assert!(etcd_state(b"").is_err());
        assert!(etcd_state(&[0xff; 100]).is_err());
        let mut fake = vec![0u8; 8192];
        fake[16..20].copy_from_slice(&MAGIC.to_le_bytes());
        fake[24..28].copy_from_slice(&4096u32.to_le_bytes());
        fake[32..40].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(etcd_state(&fake).is_err());
    }
}
