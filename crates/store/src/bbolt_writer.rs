//! Writes a bbolt database file in etcd's layout, what etcd's snapshot API streams: bucket
//! `key` (every kept revision: key main u64 BE, `_`, sub u64 BE, `t` after a deletion; value
//! an `mvccpb.KeyValue`) and bucket `meta` (the compaction revisions), so that `etcdctl
//! snapshot status/restore` and etcd itself take a snapshot of the embedded store.
//!
//! The file is bulk-loaded in one pass, bbolt's layout (go.etcd.io/bbolt, page.go, db.go):
//! pages of 4,096 bytes with a 16-byte header (id, flags, count, overflow); meta pages 0 and 1
//! (magic, version 2, page size, root bucket, freelist page, page count, txid, FNV-1a
//! checksum); page 2 an empty freelist; then each bucket's leaves (elements: flags, pos,
//! ksize, vsize, each `pos` bytes before its key) in key order, a value too big for one page
//! on overflow pages of its own, and branch levels (pos, ksize, child page id) above them;
//! last the root bucket's leaf naming each bucket's root page.

use std::io::{Seek, SeekFrom, Write};
use std::path::Path;

const PAGE: usize = 4096;
const HEADER: usize = 16;
const ELEMENT: usize = 16;
const BRANCH: u16 = 0x01;
const LEAF: u16 = 0x02;
const META: u16 = 0x04;
const FREELIST: u16 = 0x10;
const BUCKET_LEAF: u32 = 0x01;
const MAGIC: u32 = 0xED0C_DAED;
const VERSION: u32 = 2;
/// Pages 0 and 1 (meta) and 2 (freelist) come first.
const FIRST_DATA_PAGE: u64 = 3;

/// A bbolt file being written: pages are appended as buckets are loaded.
pub struct DbWriter<W: Write + Seek> {
    out: W,
    next: u64,
    buckets: Vec<(Vec<u8>, u64)>,
}

impl<W: Write + Seek> std::fmt::Debug for DbWriter<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DbWriter").field("next", &self.next).finish_non_exhaustive()
    }
}

impl<W: Write + Seek> DbWriter<W> {
    pub fn new(mut out: W) -> std::io::Result<DbWriter<W>> {
        out.write_all(&[0; PAGE * FIRST_DATA_PAGE as usize])?;
        Ok(DbWriter { out, next: FIRST_DATA_PAGE, buckets: Vec::new() })
    }

    /// Appends a page (with overflow pages when `body` needs them); returns its id.
    fn page(&mut self, flags: u16, count: usize, body: &[u8]) -> std::io::Result<u64> {
        let id = self.next;
        let pages = (HEADER + body.len()).div_ceil(PAGE).max(1);
        let mut bytes = Vec::with_capacity(pages * PAGE);
        bytes.extend_from_slice(&id.to_le_bytes());
        bytes.extend_from_slice(&flags.to_le_bytes());
        bytes.extend_from_slice(&(count as u16).to_le_bytes());
        bytes.extend_from_slice(&((pages - 1) as u32).to_le_bytes());
        bytes.extend_from_slice(body);
        bytes.resize(pages * PAGE, 0);
        self.out.write_all(&bytes)?;
        self.next += pages as u64;
        Ok(id)
    }

    /// A leaf page of `entries` (flags, key, value).
    fn leaf(&mut self, entries: &[(u32, Vec<u8>, Vec<u8>)]) -> std::io::Result<u64> {
        let mut body = Vec::with_capacity(entries.iter().map(|(_, k, v)| ELEMENT + k.len() + v.len()).sum());
        let mut data = entries.len() * ELEMENT;
        for (i, (flags, key, value)) in entries.iter().enumerate() {
            let pos = data - i * ELEMENT;
            body.extend_from_slice(&flags.to_le_bytes());
            body.extend_from_slice(&(pos as u32).to_le_bytes());
            body.extend_from_slice(&(key.len() as u32).to_le_bytes());
            body.extend_from_slice(&(value.len() as u32).to_le_bytes());
            data += key.len() + value.len();
        }
        for (_, key, value) in entries {
            body.extend_from_slice(key);
            body.extend_from_slice(value);
        }
        self.page(LEAF, entries.len(), &body)
    }

    /// A branch page over `children` (first key, page id).
    fn branch(&mut self, children: &[(Vec<u8>, u64)]) -> std::io::Result<u64> {
        let mut body = Vec::new();
        let mut data = children.len() * ELEMENT;
        for (i, (key, id)) in children.iter().enumerate() {
            body.extend_from_slice(&((data - i * ELEMENT) as u32).to_le_bytes());
            body.extend_from_slice(&(key.len() as u32).to_le_bytes());
            body.extend_from_slice(&id.to_le_bytes());
            data += key.len();
        }
        for (key, _) in children {
            body.extend_from_slice(key);
        }
        self.page(BRANCH, children.len(), &body)
    }

    /// Loads bucket `name` with `entries` (strictly increasing keys). Buckets must come in
    /// name order.
    pub fn bucket(
        &mut self,
        name: &[u8],
        entries: impl IntoIterator<Item = (Vec<u8>, Vec<u8>)>,
    ) -> std::io::Result<()> {
        if self.buckets.last().is_some_and(|(last, _)| last.as_slice() >= name) {
            return Err(std::io::Error::other("buckets are loaded in name order"));
        }
        let mut level: Vec<(Vec<u8>, u64)> = Vec::new();
        let (mut page, mut size) = (Vec::new(), HEADER);
        for (key, value) in entries {
            let grows = ELEMENT + key.len() + value.len();
            if !page.is_empty() && size + grows > PAGE {
                let first = take_first_key(&page);
                level.push((first, self.leaf(&page)?));
                page.clear();
                size = HEADER;
            }
            page.push((0, key, value));
            size += grows;
        }
        if !page.is_empty() || level.is_empty() {
            let first = take_first_key(&page);
            level.push((first, self.leaf(&page)?));
        }
        while level.len() > 1 {
            let mut above = Vec::new();
            let (mut children, mut size) = (Vec::new(), HEADER);
            for (key, id) in level {
                let grows = ELEMENT + key.len();
                if !children.is_empty() && size + grows > PAGE {
                    let first = take_first_child(&children);
                    above.push((first, self.branch(&children)?));
                    children.clear();
                    size = HEADER;
                }
                children.push((key, id));
                size += grows;
            }
            let first = take_first_child(&children);
            above.push((first, self.branch(&children)?));
            level = above;
        }
        self.buckets.push((name.to_vec(), level[0].1));
        Ok(())
    }

    /// Writes the root bucket, the freelist and the meta pages; returns the file's size.
    pub fn finish(mut self) -> std::io::Result<(W, u64)> {
        let buckets = std::mem::take(&mut self.buckets);
        let root_entries: Vec<(u32, Vec<u8>, Vec<u8>)> = buckets
            .into_iter()
            .map(|(name, root)| {
                // A bucket's value: its root page and sequence (0).
                let mut value = root.to_le_bytes().to_vec();
                value.extend_from_slice(&0u64.to_le_bytes());
                (BUCKET_LEAF, name, value)
            })
            .collect();
        let root = self.leaf(&root_entries)?;
        let pages = self.next;
        self.out.seek(SeekFrom::Start(2 * PAGE as u64))?;
        let mut freelist = vec![0; PAGE];
        freelist[..8].copy_from_slice(&2u64.to_le_bytes());
        freelist[8..10].copy_from_slice(&FREELIST.to_le_bytes());
        self.out.write_all(&freelist)?;
        for (id, txid) in [(0u64, 1u64), (1, 2)] {
            self.out.seek(SeekFrom::Start(id * PAGE as u64))?;
            self.out.write_all(&meta_page(id, root, pages, txid))?;
        }
        self.out.seek(SeekFrom::Start(pages * PAGE as u64))?;
        self.out.flush()?;
        Ok((self.out, pages * PAGE as u64))
    }
}

fn take_first_key(page: &[(u32, Vec<u8>, Vec<u8>)]) -> Vec<u8> {
    page.first().map(|(_, key, _)| key.clone()).unwrap_or_default()
}

fn take_first_child(children: &[(Vec<u8>, u64)]) -> Vec<u8> {
    children.first().map(|(key, _)| key.clone()).unwrap_or_default()
}

/// Meta page `id`: the root bucket at page `root`, `pages` pages in all, transaction `txid`.
fn meta_page(id: u64, root: u64, pages: u64, txid: u64) -> Vec<u8> {
    let mut page = vec![0; PAGE];
    page[..8].copy_from_slice(&id.to_le_bytes());
    page[8..10].copy_from_slice(&META.to_le_bytes());
    let mut meta = Vec::with_capacity(72);
    meta.extend_from_slice(&MAGIC.to_le_bytes());
    meta.extend_from_slice(&VERSION.to_le_bytes());
    meta.extend_from_slice(&(PAGE as u32).to_le_bytes());
    meta.extend_from_slice(&0u32.to_le_bytes());
    meta.extend_from_slice(&root.to_le_bytes());
    meta.extend_from_slice(&0u64.to_le_bytes());
    meta.extend_from_slice(&2u64.to_le_bytes());
    meta.extend_from_slice(&pages.to_le_bytes());
    meta.extend_from_slice(&txid.to_le_bytes());
    let checksum =
        meta.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3));
    meta.extend_from_slice(&checksum.to_le_bytes());
    page[HEADER..HEADER + meta.len()].copy_from_slice(&meta);
    page
}

/// One revision as etcd's `key` bucket keeps it.
#[derive(Debug, Clone)]
pub struct Revision {
    pub revision: i64,
    pub key: Vec<u8>,
    pub deleted: bool,
    pub create_revision: i64,
    pub version: i64,
    pub value: Vec<u8>,
}

impl Revision {
    /// The bucket key: main revision, `_`, sub revision 0, and `t` for a deletion.
    fn bucket_key(&self) -> Vec<u8> {
        let mut key = revision_bytes(self.revision);
        if self.deleted {
            key.push(b't');
        }
        key
    }

    /// `mvccpb.KeyValue` (a deletion's has its key only, as etcd writes it).
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.key.len() + self.value.len() + 32);
        bytes_field(&mut out, 1, &self.key);
        if !self.deleted {
            int_field(&mut out, 2, self.create_revision);
            int_field(&mut out, 3, self.revision);
            int_field(&mut out, 4, self.version);
            bytes_field(&mut out, 5, &self.value);
        }
        out
    }
}

/// etcd's revision bytes: main u64 BE, `_`, sub u64 BE (0).
fn revision_bytes(main: i64) -> Vec<u8> {
    let mut key = Vec::with_capacity(18);
    key.extend_from_slice(&(main as u64).to_be_bytes());
    key.push(b'_');
    key.extend_from_slice(&0u64.to_be_bytes());
    key
}

fn varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn int_field(out: &mut Vec<u8>, field: u64, value: i64) {
    if value != 0 {
        varint(out, field << 3);
        varint(out, value as u64);
    }
}

fn bytes_field(out: &mut Vec<u8>, field: u64, value: &[u8]) {
    if !value.is_empty() {
        varint(out, (field << 3) | 2);
        varint(out, value.len() as u64);
        out.extend_from_slice(value);
    }
}

/// Writes an etcd snapshot of `revisions` (in revision order) with history compacted at
/// `compacted` to `dest`; returns its size.
pub fn write_etcd_snapshot(
    dest: &Path,
    revisions: impl IntoIterator<Item = Revision>,
    compacted: i64,
) -> std::io::Result<u64> {
    let file = std::fs::File::create(dest)?;
    let mut db = DbWriter::new(std::io::BufWriter::with_capacity(1 << 20, file))?;
    db.bucket(b"key", revisions.into_iter().map(|r| (r.bucket_key(), r.encode())))?;
    let mut meta = Vec::new();
    if compacted > 0 {
        // Sorted by key: finishedCompactRev < scheduledCompactRev.
        meta.push((b"finishedCompactRev".to_vec(), revision_bytes(compacted)));
        meta.push((b"scheduledCompactRev".to_vec(), revision_bytes(compacted)));
    }
    db.bucket(b"meta", meta)?;
    let (out, size) = db.finish()?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.sync_all()?;
    Ok(size)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What the writer writes, the reader (that restores etcd snapshots) reads back.
    #[test]
    fn a_written_snapshot_reads_back_at_its_last_revision() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("snapshot.db");
        let mut revisions = Vec::new();
        for i in 1..=3000i64 {
            // Values from tiny to several pages, so leaves, overflow pages and branches appear.
            let size = if i % 500 == 0 { 20_000 } else { (i % 7) as usize * 40 };
            let key = format!("/registry/things/k{:05}", i % 1200).into_bytes();
            revisions.push(Revision {
                revision: i,
                key,
                deleted: i % 11 == 0,
                create_revision: i,
                version: 1,
                value: vec![b'a' + (i % 26) as u8; size],
            });
        }
        let size = write_etcd_snapshot(&path, revisions.clone(), 100).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(bytes.len() as u64, size);
        assert!(crate::bbolt::looks_like_bbolt(&bytes));
        let state = crate::bbolt::etcd_state(&bytes).unwrap();
        let mut expected = std::collections::BTreeMap::new();
        for r in &revisions {
            match r.deleted {
                true => expected.remove(&r.key),
                false => expected.insert(r.key.clone(), r.value.clone()),
            };
        }
        assert_eq!(state, expected);
    }
}
