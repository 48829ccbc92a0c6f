//! The running mean of a model too large for memory: its chunks being folded sit in a small
//! window in memory, and a chunk leaves the window, hashed as it goes, by one write past the
//! page cache into the mean's scratch file.
//!
//! Why not fold in the file through the page cache: on a VM that hands freed memory back to its
//! host, every fresh page-cache page costs about as much CPU as receiving the bytes it holds
//! (docs/benchmarks.md, "Reading past the page cache"), and a mean fills a model's worth of
//! them. With the round's pulls kept in step ([`crate::job::fold`]), every contribution to a
//! chunk arrives while it is in the window: the mean is written once, never read back to be
//! folded or hashed, and the finished mean is filed under the hashes taken on the way out. A
//! contribution that comes after its chunk left (a result that started late) reads the chunk
//! back, past the page cache too, and the chunk is hashed again when it leaves once more.
//!
//! Chunks leave through a writer thread ([`ChunkWriter`]) that hashes and writes them while
//! the folds go on: a write past the page cache waits for the disk, and would otherwise hold
//! up every fold behind the mean's lock.

use std::collections::BTreeMap;

use flare_protocols::blob_id::ChunkHash;

use crate::store::{ChunkWriter, DIRECT_ALIGN, Scratch, StoreError};

/// Memory the window may hold, in bytes (at least [`MIN_WINDOW_CHUNKS`] chunks): enough for
/// the chunks in flight of the pulls folded at once, each allowed a few chunks ahead of the
/// slowest by the round's lockstep (`lockstep.rs`, `job/fold.rs`).
pub const WINDOW_BYTES: usize = 16 << 20;

/// The fewest chunks a window holds, whatever the chunk size.
const MIN_WINDOW_CHUNKS: usize = 4;

/// A mean on disk with a window of chunks in memory (see the module doc).
#[derive(Debug)]
pub(super) struct DiskMean {
    writer: ChunkWriter,
    chunk_size: usize,
    /// Chunks in memory: aligned storage, the chunk's bytes at its aligned offset.
    slots: BTreeMap<u64, Vec<u8>>,
    /// Per chunk: whether it was ever sent out of the window (the file holds it, or will).
    sent: Vec<bool>,
    capacity: usize,
}

impl DiskMean {
    /// A mean in `file`, cut in chunks of `chunk_size` bytes, at most `capacity` chunks in
    /// memory.
    pub(super) fn new(file: Scratch, chunk_size: u32, capacity: usize) -> Result<Self, StoreError> {
        let capacity = capacity.max(1);
        let chunks = file.len().div_ceil(u64::from(chunk_size.max(1))) as usize;
        Ok(Self {
            writer: ChunkWriter::new(file, chunk_size, (capacity / 4).max(1))?,
            chunk_size: chunk_size as usize,
            slots: BTreeMap::new(),
            sent: vec![false; chunks],
            capacity,
        })
    }

    /// The window's capacity in chunks for a chunk size: [`WINDOW_BYTES`]' worth.
    pub(super) fn default_capacity(chunk_size: u32) -> usize {
        (WINDOW_BYTES / (chunk_size.max(1) as usize)).max(MIN_WINDOW_CHUNKS)
    }

    /// How many chunks it holds in memory at most.
    pub(super) fn capacity(&self) -> usize {
        self.capacity
    }

    /// Chunk `index`'s first contribution: the mean's bytes of that chunk are `bytes`.
    pub(super) fn put(&mut self, index: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let mut s = match self.slots.remove(&index) {
            Some(s) => s,
            None => self.writer.storage(),
        };
        let off = s.as_ptr().align_offset(DIRECT_ALIGN);
        s[off..off + bytes.len()].copy_from_slice(bytes);
        self.slots.insert(index, s);
        self.shrink()
    }

    /// Applies `f` to chunk `index`'s bytes of the mean, read back from the file first when
    /// the chunk has left the window.
    pub(super) fn update(&mut self, index: u64, f: impl FnOnce(&mut [u8])) -> Result<(), StoreError> {
        let start = index * self.chunk_size as u64;
        let len = self
            .writer
            .file()
            .len()
            .saturating_sub(start)
            .min(self.chunk_size as u64) as usize;
        let mut s = match self.slots.remove(&index) {
            Some(s) => s,
            None => {
                let mut s = self.writer.storage();
                let off = s.as_ptr().align_offset(DIRECT_ALIGN);
                let part = &mut s[off..off + len];
                if self.sent.get(index as usize).copied().unwrap_or(false) {
                    self.writer.wait_written(Some(index))?;
                    self.writer.file().read_once_at(part, start)?;
                } else {
                    // Not folded into yet (a caller's slip): the scratch's zeros.
                    part.fill(0);
                }
                s
            }
        };
        let off = s.as_ptr().align_offset(DIRECT_ALIGN);
        f(&mut s[off..off + len]);
        self.slots.insert(index, s);
        self.shrink()
    }

    /// Sends the lowest chunks out of the window until it is within its capacity: the pulls
    /// go up the chunks in step, so the lowest are those every pull has passed.
    fn shrink(&mut self) -> Result<(), StoreError> {
        while self.slots.len() > self.capacity {
            if let Some((index, s)) = self.slots.pop_first() {
                self.sent[index as usize] = true;
                self.writer.send(index, s)?;
            }
        }
        Ok(())
    }

    /// The whole mean in its file, with every chunk's hash: the window written out.
    pub(super) fn finish(mut self) -> Result<(Scratch, Vec<ChunkHash>), StoreError> {
        while let Some((index, s)) = self.slots.pop_first() {
            self.writer.send(index, s)?;
        }
        self.writer.finish()
    }
}
