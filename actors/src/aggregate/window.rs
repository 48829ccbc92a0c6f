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
//! Chunks leave through a writer thread that hashes and writes them while the folds go on:
//! a write past the page cache waits for the disk, which the pulls' senders share on one
//! machine, and it would otherwise hold up every fold behind the mean's lock.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use flare_protocols::blob_id::ChunkHash;

use crate::lock;
use crate::store::{DIRECT_ALIGN, Scratch, StoreError, aligned_buffer};

/// Memory the window may hold, in bytes (at least [`MIN_WINDOW_CHUNKS`] chunks): enough for
/// the chunks in flight of the pulls folded at once, each allowed a few chunks ahead of the
/// slowest by the round's lockstep (`job/lockstep.rs`).
pub const WINDOW_BYTES: usize = 32 << 20;

/// The fewest chunks a window holds, whatever the chunk size.
const MIN_WINDOW_CHUNKS: usize = 4;

/// A mean on disk with a window of chunks in memory (see the module doc).
#[derive(Debug)]
pub(super) struct DiskMean {
    file: Arc<Scratch>,
    chunk_size: usize,
    /// Chunks in memory: aligned storage, the chunk's bytes at its aligned offset.
    slots: BTreeMap<u64, Vec<u8>>,
    /// Per chunk: whether it was ever sent out of the window (the file holds it, or will).
    sent: Vec<bool>,
    capacity: usize,
    out: Arc<Outbox>,
    to_writer: Option<SyncSender<(u64, Vec<u8>)>>,
    writer: Option<JoinHandle<()>>,
}

/// What the writer thread and the window share.
#[derive(Debug)]
struct Outbox {
    state: Mutex<Written>,
    /// Signalled each time the writer is done with a chunk.
    wrote: Condvar,
}

#[derive(Debug)]
struct Written {
    /// Chunks handed to the writer and not written yet, with how many times.
    queued: BTreeMap<u64, usize>,
    /// Per chunk: the hash of what the file holds of it.
    hashes: Vec<Option<ChunkHash>>,
    /// Storage of chunks written, for the next ones.
    spare: Vec<Vec<u8>>,
    /// The first write that failed.
    error: Option<StoreError>,
}

impl DiskMean {
    /// A mean of `chunks` chunks of `chunk_size` bytes in `file`, at most `capacity` chunks
    /// in memory.
    pub(super) fn new(file: Scratch, chunk_size: u32, chunks: usize, capacity: usize) -> Result<Self, StoreError> {
        let capacity = capacity.max(1);
        let file = Arc::new(file);
        let out = Arc::new(Outbox {
            state: Mutex::new(Written {
                queued: BTreeMap::new(),
                hashes: vec![None; chunks],
                spare: Vec::new(),
                error: None,
            }),
            wrote: Condvar::new(),
        });
        let (to_writer, from_window) = sync_channel((capacity / 4).max(1));
        let writer = {
            let (file, out) = (file.clone(), out.clone());
            let cs = chunk_size as usize;
            std::thread::Builder::new()
                .name("mean-writer".into())
                .spawn(move || write_out(&file, cs, from_window, &out, capacity))
                .map_err(|e| StoreError::Io {
                    path: "<mean writer>".into(),
                    source: e,
                })?
        };
        Ok(Self {
            file,
            chunk_size: chunk_size as usize,
            slots: BTreeMap::new(),
            sent: vec![false; chunks],
            capacity,
            out,
            to_writer: Some(to_writer),
            writer: Some(writer),
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

    fn storage(&mut self) -> Vec<u8> {
        lock(&self.out.state)
            .spare
            .pop()
            .unwrap_or_else(|| aligned_buffer(self.chunk_size).0)
    }

    /// Chunk `index`'s first contribution: the mean's bytes of that chunk are `bytes`.
    pub(super) fn put(&mut self, index: u64, bytes: &[u8]) -> Result<(), StoreError> {
        let mut s = match self.slots.remove(&index) {
            Some(s) => s,
            None => self.storage(),
        };
        let off = s.as_ptr().align_offset(DIRECT_ALIGN);
        s[off..off + bytes.len()].copy_from_slice(bytes);
        self.slots.insert(index, s);
        self.shrink()
    }

    /// Applies `f` to chunk `index`'s bytes of the mean, read back from the file first when
    /// the chunk has left the window.
    pub(super) fn update(&mut self, index: u64, f: impl FnOnce(&mut [u8])) -> Result<(), StoreError> {
        let (start, len) = chunk_range(self.file.len(), self.chunk_size, index);
        let mut s = match self.slots.remove(&index) {
            Some(s) => s,
            None => {
                let mut s = self.storage();
                let off = s.as_ptr().align_offset(DIRECT_ALIGN);
                let part = &mut s[off..off + len];
                if self.sent.get(index as usize).copied().unwrap_or(false) {
                    self.wait_written(Some(index))?;
                    self.file.read_once_at(part, start)?;
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
                self.send(index, s)?;
            }
        }
        Ok(())
    }

    fn send(&mut self, index: u64, s: Vec<u8>) -> Result<(), StoreError> {
        let gone = || StoreError::Io {
            path: "<mean writer>".into(),
            source: std::io::Error::other("the mean's writer stopped"),
        };
        if let Some(e) = lock(&self.out.state).error.take() {
            return Err(e);
        }
        *lock(&self.out.state).queued.entry(index).or_default() += 1;
        self.sent[index as usize] = true;
        let tx = self.to_writer.as_ref().ok_or_else(gone)?;
        tx.send((index, s)).map_err(|_| gone())
    }

    /// Waits until the writer has written chunk `index` (every chunk handed to it, for
    /// `None`); its first error, if any.
    fn wait_written(&self, index: Option<u64>) -> Result<(), StoreError> {
        let mut st = lock(&self.out.state);
        while index.map_or(!st.queued.is_empty(), |i| st.queued.contains_key(&i)) {
            st = self.out.wrote.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.error.take().map_or(Ok(()), Err)
    }

    /// The whole mean in its file, with every chunk's hash: the window written out.
    pub(super) fn finish(mut self) -> Result<(Scratch, Vec<ChunkHash>), StoreError> {
        while let Some((index, s)) = self.slots.pop_first() {
            self.send(index, s)?;
        }
        self.wait_written(None)?;
        self.to_writer = None;
        if let Some(w) = self.writer.take() {
            let _ = w.join();
        }
        let hashes = std::mem::take(&mut lock(&self.out.state).hashes);
        let corrupt = |reason: &str| StoreError::Corrupt {
            path: "<mean>".into(),
            reason: reason.into(),
        };
        let hashes = hashes
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| corrupt("a chunk of the mean was never written"))?;
        let file = Arc::try_unwrap(self.file).map_err(|_| corrupt("the mean's file is still shared"))?;
        Ok((file, hashes))
    }
}

/// Byte offset and length of chunk `index` of a blob of `len` bytes.
fn chunk_range(len: u64, chunk_size: usize, index: u64) -> (u64, usize) {
    let start = index * chunk_size as u64;
    (start, (len.saturating_sub(start)).min(chunk_size as u64) as usize)
}

/// The writer thread: hashes each chunk that leaves the window and writes it past the page
/// cache, until the window hangs up.
fn write_out(file: &Scratch, chunk_size: usize, chunks: Receiver<(u64, Vec<u8>)>, out: &Outbox, keep: usize) {
    for (index, s) in chunks {
        let (start, len) = chunk_range(file.len(), chunk_size, index);
        let off = s.as_ptr().align_offset(DIRECT_ALIGN);
        let bytes = &s[off..off + len];
        let hash = ChunkHash::of(bytes);
        let r = file.write_fresh_at(bytes, start);
        let mut st = lock(&out.state);
        match r {
            Ok(()) => st.hashes[index as usize] = Some(hash),
            Err(e) => {
                st.error.get_or_insert(e);
            }
        }
        if let Some(n) = st.queued.get_mut(&index) {
            *n -= 1;
            if *n == 0 {
                st.queued.remove(&index);
            }
        }
        if st.spare.len() < keep {
            st.spare.push(s);
        }
        out.wrote.notify_all();
    }
}
