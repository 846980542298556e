//! The segment files of the id store: their format (4 KiB blocks with a
//! CRC each, a footer with the sparse index, the sequence range and the
//! bloom filter), reading them and writing them. See the parent module
//! for the layout and why.

use std::collections::VecDeque;
use std::fs::{self, File, OpenOptions};
use std::io::{BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use flowcap_engine::dedupe::IdStoreError;
use flowcap_engine::RecordId;

pub(super) const BLOCK: usize = 4096;
/// Bytes of a block available to entries (the last 4 hold its CRC32).
pub(super) const BLOCK_BODY: usize = BLOCK - 4;
/// fp u64, iccid u128, seq u64, end i64, id length u8.
pub(super) const ENTRY_HEADER: usize = 8 + 16 + 8 + 8 + 1;
pub(super) const FOOTER_MAGIC: &[u8; 8] = b"FCIDFOOT";
pub(super) const FILE_MAGIC: &[u8; 8] = b"FCIDSEG1";
pub(super) const BLOOM_HASHES: u64 = 6;

/// One stored id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct Entry {
    pub(super) fp: u64,
    pub(super) iccid: u128,
    pub(super) record_id: RecordId,
    pub(super) seq: u64,
    pub(super) end: i64,
}

impl Entry {
    pub(super) fn encoded_len(&self) -> usize {
        ENTRY_HEADER + self.record_id.as_str().len()
    }

    pub(super) fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.fp.to_le_bytes());
        out.extend_from_slice(&self.iccid.to_le_bytes());
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.end.to_le_bytes());
        let id = self.record_id.as_str().as_bytes();
        out.push(id.len() as u8);
        out.extend_from_slice(id);
    }
}

/// Decodes the entries of one verified block body.
pub(super) fn decode_block(body: &[u8], out: &mut VecDeque<Entry>) -> Result<(), IdStoreError> {
    let mut at = 0;
    while at + ENTRY_HEADER <= body.len() {
        let h = &body[at..at + ENTRY_HEADER];
        let len = usize::from(h[40]);
        if len == 0 {
            break; // padding
        }
        let id = body
            .get(at + ENTRY_HEADER..at + ENTRY_HEADER + len)
            .and_then(|b| std::str::from_utf8(b).ok())
            .and_then(RecordId::new)
            .ok_or_else(|| corrupt("bad record id in block"))?;
        out.push_back(Entry {
            fp: u64_at(h, 0),
            iccid: u128::from_le_bytes(arr(&h[8..24])),
            seq: u64_at(h, 24),
            end: u64_at(h, 32) as i64,
            record_id: id,
        });
        at += ENTRY_HEADER + len;
    }
    Ok(())
}

pub(super) fn arr<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[..N]);
    a
}

pub(super) fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(arr(&b[at..at + 8]))
}

pub(super) fn corrupt(what: impl Into<String>) -> IdStoreError {
    IdStoreError::Corrupt(what.into())
}

pub(super) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> IdStoreError {
    let context = context.into();
    move |source| IdStoreError::Io { context, source }
}

/// Bloom filter over fingerprints (double hashing).
#[derive(Debug, Clone)]
pub(super) struct Bloom {
    pub(super) words: Vec<u64>,
}

impl Bloom {
    pub(super) fn new(keys: u64, bits_per_key: u32) -> Bloom {
        let bits = keys.saturating_mul(u64::from(bits_per_key));
        let words = if bits_per_key == 0 {
            0
        } else {
            bits.div_ceil(64).max(1)
        };
        Bloom {
            words: vec![0; words as usize],
        }
    }

    pub(super) fn insert(&mut self, fp: u64) {
        if self.words.is_empty() {
            return;
        }
        // Positions from the length alone, so the words can be written
        // while they are computed (collecting them first was an
        // allocation per id written).
        for p in bloom_positions(self.words.len(), fp) {
            self.words[p / 64] |= 1 << (p % 64);
        }
    }

    pub(super) fn may_contain(&self, fp: u64) -> bool {
        self.words.is_empty()
            || bloom_positions(self.words.len(), fp)
                .all(|p| self.words[p / 64] & (1 << (p % 64)) != 0)
    }
}

/// The bits of `fp` in a filter of `words` 64-bit words (double hashing;
/// part of the segment format).
pub(super) fn bloom_positions(words: usize, fp: u64) -> impl Iterator<Item = usize> {
    let nbits = words as u64 * 64;
    let h1 = fp;
    let h2 = fp.rotate_left(29) | 1;
    (0..BLOOM_HASHES).map(move |i| (h1.wrapping_add(i.wrapping_mul(h2)) % nbits) as usize)
}

/// An open, immutable segment file and its in-memory index.
#[derive(Debug)]
pub(super) struct Segment {
    pub(super) id: u64,
    pub(super) path: PathBuf,
    pub(super) file: File,
    pub(super) count: u64,
    pub(super) min_seq: u64,
    pub(super) max_seq: u64,
    /// First fingerprint of each block.
    pub(super) first_fps: Vec<u64>,
    pub(super) bloom: Bloom,
}

impl Segment {
    pub(super) fn read_block(
        &self,
        block: usize,
        buf: &mut [u8; BLOCK],
    ) -> Result<(), IdStoreError> {
        read_at(&self.file, buf, (block * BLOCK) as u64).map_err(io("reading a segment block"))?;
        let crc = u32::from_le_bytes(arr(&buf[BLOCK_BODY..]));
        if crc32fast::hash(&buf[..BLOCK_BODY]) != crc {
            return Err(corrupt(format!(
                "block {block} of {} fails its checksum",
                self.path.display()
            )));
        }
        Ok(())
    }

    pub(super) fn open(path: &Path, id: u64) -> Result<Segment, IdStoreError> {
        let mut file = File::open(path).map_err(io(format!("opening {}", path.display())))?;
        let size = file
            .metadata()
            .map_err(io("reading segment metadata"))?
            .len();
        let bad = || corrupt(format!("{} has no valid footer", path.display()));
        if size < 16 {
            return Err(bad());
        }
        let mut tail = [0u8; 16];
        read_at(&file, &mut tail, size - 16).map_err(io("reading a segment footer"))?;
        if &tail[8..] != FILE_MAGIC {
            return Err(bad());
        }
        let footer_len = u64_at(&tail, 0);
        if footer_len < 4 || footer_len > size - 16 {
            return Err(bad());
        }
        let mut footer = vec![0u8; footer_len as usize];
        file.seek(SeekFrom::Start(size - 16 - footer_len))
            .map_err(io("seeking a segment footer"))?;
        file.read_exact(&mut footer)
            .map_err(io("reading a segment footer"))?;
        let (body, crc) = footer.split_at(footer.len() - 4);
        if crc32fast::hash(body) != u32::from_le_bytes(arr(crc)) || !body.starts_with(FOOTER_MAGIC)
        {
            return Err(bad());
        }
        let mut words = body[8..]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(arr(c)));
        let mut next = || words.next().ok_or_else(bad);
        let count = next()?;
        let min_seq = next()?;
        let max_seq = next()?;
        let n_blocks = next()?;
        let first_fps = (0..n_blocks)
            .map(|_| next())
            .collect::<Result<Vec<_>, _>>()?;
        let n_words = next()?;
        let bloom = Bloom {
            words: (0..n_words)
                .map(|_| next())
                .collect::<Result<Vec<_>, _>>()?,
        };
        if n_blocks * BLOCK as u64 + footer_len + 16 != size {
            return Err(bad());
        }
        Ok(Segment {
            id,
            path: path.to_owned(),
            file,
            count,
            min_seq,
            max_seq,
            first_fps,
            bloom,
        })
    }
}

#[cfg(unix)]
pub(super) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
}

#[cfg(not(unix))]
pub(super) fn read_at(file: &File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut f = file;
    f.seek(SeekFrom::Start(offset))?;
    f.read_exact(buf)
}

/// Reads a segment's entries in order, block by block.
pub(super) struct Cursor<'a> {
    pub(super) segment: &'a Segment,
    pub(super) block: usize,
    pub(super) pending: VecDeque<Entry>,
    pub(super) buf: Box<[u8; BLOCK]>,
}

impl<'a> Cursor<'a> {
    pub(super) fn new(segment: &'a Segment) -> Self {
        Cursor {
            segment,
            block: 0,
            pending: VecDeque::new(),
            buf: Box::new([0u8; BLOCK]),
        }
    }

    pub(super) fn next_entry(&mut self) -> Result<Option<Entry>, IdStoreError> {
        while self.pending.is_empty() {
            if self.block >= self.segment.first_fps.len() {
                return Ok(None);
            }
            self.segment.read_block(self.block, &mut self.buf)?;
            decode_block(&self.buf[..BLOCK_BODY], &mut self.pending)?;
            self.block += 1;
        }
        Ok(self.pending.pop_front())
    }
}

pub(super) fn segment_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("seg-{id:016x}.fcid"))
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), IdStoreError> {
    #[cfg(unix)]
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io(format!("syncing directory {}", dir.display())))?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// Writes sorted, distinct entries as segment `id`, atomically.
pub(super) fn write_segment(
    dir: &Path,
    id: u64,
    expected: u64,
    bloom_bits_per_key: u32,
    mut entries: impl FnMut() -> Result<Option<Entry>, IdStoreError>,
) -> Result<Option<Segment>, IdStoreError> {
    let path = segment_path(dir, id);
    let tmp = path.with_extension("tmp");
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(&tmp)
        .map_err(io(format!("creating {}", tmp.display())))?;
    let mut out = BufWriter::with_capacity(1 << 16, file);
    let mut block: Vec<u8> = Vec::with_capacity(BLOCK);
    let mut first_fps = Vec::new();
    let mut bloom = Bloom::new(expected.max(1), bloom_bits_per_key);
    let (mut count, mut min_seq, mut max_seq) = (0u64, u64::MAX, 0u64);
    let finish = |block: &mut Vec<u8>, out: &mut BufWriter<File>| -> Result<(), IdStoreError> {
        block.resize(BLOCK_BODY, 0);
        let crc = crc32fast::hash(block);
        block.extend_from_slice(&crc.to_le_bytes());
        out.write_all(block)
            .map_err(io("writing a segment block"))?;
        block.clear();
        Ok(())
    };
    while let Some(e) = entries()? {
        if !block.is_empty() && block.len() + e.encoded_len() > BLOCK_BODY {
            finish(&mut block, &mut out)?;
        }
        if block.is_empty() {
            first_fps.push(e.fp);
        }
        e.encode(&mut block);
        bloom.insert(e.fp);
        count += 1;
        min_seq = min_seq.min(e.seq);
        max_seq = max_seq.max(e.seq);
    }
    if count == 0 {
        drop(out);
        fs::remove_file(&tmp).map_err(io("removing an empty temp segment"))?;
        return Ok(None);
    }
    if !block.is_empty() {
        finish(&mut block, &mut out)?;
    }
    let mut footer = Vec::new();
    footer.extend_from_slice(FOOTER_MAGIC);
    for w in [count, min_seq, max_seq, first_fps.len() as u64] {
        footer.extend_from_slice(&w.to_le_bytes());
    }
    for f in &first_fps {
        footer.extend_from_slice(&f.to_le_bytes());
    }
    footer.extend_from_slice(&(bloom.words.len() as u64).to_le_bytes());
    for w in &bloom.words {
        footer.extend_from_slice(&w.to_le_bytes());
    }
    let crc = crc32fast::hash(&footer);
    footer.extend_from_slice(&crc.to_le_bytes());
    footer.extend_from_slice(&(footer.len() as u64).to_le_bytes());
    footer.extend_from_slice(FILE_MAGIC);
    out.write_all(&footer)
        .map_err(io("writing a segment footer"))?;
    let file = out.into_inner().map_err(|e| IdStoreError::Io {
        context: "flushing a segment".into(),
        source: e.into_error(),
    })?;
    file.sync_all().map_err(io("syncing a segment"))?;
    drop(file);
    fs::rename(&tmp, &path).map_err(io(format!("renaming {}", tmp.display())))?;
    sync_dir(dir)?;
    Segment::open(&path, id).map(Some)
}
