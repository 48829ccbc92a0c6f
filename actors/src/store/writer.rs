//! A thread that hashes chunks of a scratch and writes them past the page cache while their
//! producer goes on with the next ones: a mean's chunks leaving its window
//! (`aggregate/window.rs`), a result trained as it arrived (`learner/arriving.rs`).
//!
//! A write with `O_DIRECT` returns when the disk has the bytes, a millisecond or so per chunk
//! on a disk shared with the other members of a one-machine benchmark; done in line, that wait
//! held up the next chunk's fold or training, and with it the credits of the transfer feeding
//! it. The writer holds a few chunks at most ([`ChunkWriter::new`]'s `depth`): a producer that
//! outruns the disk waits for it.

use std::collections::BTreeMap;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use flare_protocols::blob_id::ChunkHash;

use super::{DIRECT_ALIGN, Scratch, StoreError, aligned_buffer};
use crate::lock;

/// Hashes and writes chunks of one scratch in the background (see the module doc).
#[derive(Debug)]
pub struct ChunkWriter {
    file: Arc<Scratch>,
    chunk_size: usize,
    shared: Arc<Shared>,
    to_thread: Option<SyncSender<(u64, Vec<u8>)>>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Debug)]
struct Shared {
    state: Mutex<State>,
    /// Signalled each time a chunk is written.
    wrote: Condvar,
}

#[derive(Debug)]
struct State {
    /// Chunks handed over and not written yet, with how many times.
    queued: BTreeMap<u64, usize>,
    /// Per chunk: the hash of what the file holds of it, once written through here.
    hashes: Vec<Option<ChunkHash>>,
    /// Storage of chunks written, for the producer's next ones.
    spare: Vec<Vec<u8>>,
    /// The first write that failed.
    error: Option<StoreError>,
}

impl ChunkWriter {
    /// A writer of `file`'s chunks of `chunk_size` bytes, holding at most `depth` chunks
    /// handed over and not yet written.
    pub fn new(file: Scratch, chunk_size: u32, depth: usize) -> Result<Self, StoreError> {
        let cs = chunk_size.max(1) as usize;
        let chunks = file.len().div_ceil(cs as u64) as usize;
        let file = Arc::new(file);
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                queued: BTreeMap::new(),
                hashes: vec![None; chunks],
                spare: Vec::new(),
                error: None,
            }),
            wrote: Condvar::new(),
        });
        let depth = depth.max(1);
        let (to_thread, from_producer) = sync_channel(depth);
        let thread = {
            let (file, shared) = (file.clone(), shared.clone());
            std::thread::Builder::new()
                .name("chunk-writer".into())
                .spawn(move || write_out(&file, cs, from_producer, &shared, depth + 1))
                .map_err(|e| StoreError::Io {
                    path: "<chunk writer>".into(),
                    source: e,
                })?
        };
        Ok(Self {
            file,
            chunk_size: cs,
            shared,
            to_thread: Some(to_thread),
            thread: Some(thread),
        })
    }

    /// The scratch, for reads (of chunks written here only after [`Self::wait_written`]) and
    /// writes of chunks this writer is not given.
    pub fn file(&self) -> &Scratch {
        &self.file
    }

    /// Block-aligned storage for one chunk (its bytes at `as_ptr().align_offset(DIRECT_ALIGN)`):
    /// one the writer is done with, else a new one.
    pub fn storage(&self) -> Vec<u8> {
        lock(&self.shared.state)
            .spare
            .pop()
            .unwrap_or_else(|| aligned_buffer(self.chunk_size).0)
    }

    /// Hands chunk `index`, held in `storage` at its aligned offset, to the thread, to be
    /// hashed and written; waits while the thread holds `depth` chunks already. A write that
    /// failed before is the error here.
    pub fn send(&self, index: u64, storage: Vec<u8>) -> Result<(), StoreError> {
        {
            let mut st = lock(&self.shared.state);
            if let Some(e) = st.error.take() {
                return Err(e);
            }
            *st.queued.entry(index).or_default() += 1;
        }
        let tx = self.to_thread.as_ref().ok_or_else(stopped)?;
        tx.send((index, storage)).map_err(|_| stopped())
    }

    /// Waits until chunk `index` (every chunk, for `None`) handed over is written; the first
    /// write that failed, if any.
    pub fn wait_written(&self, index: Option<u64>) -> Result<(), StoreError> {
        let mut st = lock(&self.shared.state);
        while index.map_or(!st.queued.is_empty(), |i| st.queued.contains_key(&i)) {
            st = self.shared.wrote.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        st.error.take().map_or(Ok(()), Err)
    }

    /// Every chunk handed over written: the scratch back, with every chunk's hash; an error
    /// if some chunk of it never came through here.
    pub fn finish(self) -> Result<(Scratch, Vec<ChunkHash>), StoreError> {
        let (file, hashes) = self.close()?;
        let hashes = hashes
            .into_iter()
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| StoreError::Corrupt {
                path: "<chunk writer>".into(),
                reason: "a chunk of the scratch was never written through its writer".into(),
            })?;
        Ok((file, hashes))
    }

    /// Every chunk handed over written: the scratch back, for a caller that wrote some of it
    /// otherwise and hashes it itself.
    pub fn into_file(self) -> Result<Scratch, StoreError> {
        self.close().map(|(file, _)| file)
    }

    fn close(mut self) -> Result<(Scratch, Vec<Option<ChunkHash>>), StoreError> {
        self.wait_written(None)?;
        self.to_thread = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let hashes = std::mem::take(&mut lock(&self.shared.state).hashes);
        let file = Arc::try_unwrap(self.file).map_err(|_| StoreError::Corrupt {
            path: "<chunk writer>".into(),
            reason: "the scratch is still shared".into(),
        })?;
        Ok((file, hashes))
    }
}

fn stopped() -> StoreError {
    StoreError::Io {
        path: "<chunk writer>".into(),
        source: std::io::Error::other("the chunk writer stopped"),
    }
}

/// The thread: hashes and writes each chunk handed over, until the producer hangs up.
fn write_out(file: &Scratch, chunk_size: usize, chunks: Receiver<(u64, Vec<u8>)>, shared: &Shared, keep: usize) {
    for (index, s) in chunks {
        let start = index * chunk_size as u64;
        let len = file.len().saturating_sub(start).min(chunk_size as u64) as usize;
        let off = s.as_ptr().align_offset(DIRECT_ALIGN);
        let r = match s.get(off..off + len) {
            Some(bytes) => file.write_fresh_at(bytes, start).map(|()| ChunkHash::of(bytes)),
            None => Err(StoreError::Corrupt {
                path: "<chunk writer>".into(),
                reason: format!("chunk {index} handed over in storage too short"),
            }),
        };
        let mut st = lock(&shared.state);
        match r {
            Ok(hash) => {
                if let Some(h) = st.hashes.get_mut(index as usize) {
                    *h = Some(hash);
                }
            }
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
        shared.wrote.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::BlobStore;

    #[test]
    fn chunks_handed_over_are_written_and_hashed_in_any_order() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("store");
        let cs = 2 * DIRECT_ALIGN;
        let len = 3 * cs + 100;
        let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let w = ChunkWriter::new(store.scratch(len as u64).expect("scratch"), cs as u32, 2).expect("writer");
        for i in [2u64, 0, 3, 1, 0] {
            let mut s = w.storage();
            let off = s.as_ptr().align_offset(DIRECT_ALIGN);
            let start = i as usize * cs;
            let end = (start + cs).min(len);
            s[off..off + end - start].copy_from_slice(&bytes[start..end]);
            w.send(i, s).expect("send");
        }
        w.wait_written(Some(1)).expect("written");
        let (file, hashes) = w.finish().expect("finish");
        let want: Vec<_> = bytes.chunks(cs).map(ChunkHash::of).collect();
        assert_eq!(hashes, want);
        let mut got = vec![0; len];
        file.read_at(&mut got, 0).expect("read");
        assert_eq!(got, bytes);
    }
}
