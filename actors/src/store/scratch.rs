//! Model-sized files written in place before they are blobs, and positioned reads of whole
//! blobs: what lets a node work on a model larger than its memory.
//!
//! A [`Scratch`] is a pre-sized file in the store's directory (or a buffer, in a memory
//! store) that a round's running mean, or a received model a streaming learner updates
//! tensor by tensor, is written into by position: through the page cache ([`Scratch::write_at`]),
//! which the kernel sizes and evicts and which is not the process's memory, or past it
//! ([`Scratch::write_fresh_at`]) for bytes not read again soon. Once its content is
//! final, [`BlobStore::adopt_held`] hashes it chunk by chunk and files it as a blob under its
//! id: a rename, not a copy. A scratch dropped unadopted removes its file.
//!
//! Which models go this way is the store's call ([`BlobStore::streams`]): those above a size
//! ([`DEFAULT_STREAM_ABOVE`], `run --stream-above`), and only in a disk store.

use std::path::Path;
use std::sync::{Arc, Mutex};

use flare_protocols::blob_id::ChunkHash;
use flare_protocols::model::Layout;
use flare_protocols::{BlobId, Manifest};

use super::disk::DataFile;
use super::residency::{Data, Entry};
use super::{BlobStore, StoreError};
use crate::lock;

/// Models larger than this (bytes) live on disk, not in memory, where the store is on disk:
/// below it, a model in memory costs little and its in-memory paths are faster.
pub const DEFAULT_STREAM_ABOVE: u64 = 512 << 20;

/// A blob-to-be, written and read by position (see the module doc).
pub struct Scratch {
    len: u64,
    place: Option<Place>,
}

enum Place {
    File(DataFile),
    Memory(Mutex<Vec<u8>>),
}

impl Scratch {
    /// Its length in bytes (fixed when it was made).
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn out_of_range(&self, off: u64, n: usize) -> Option<StoreError> {
        let end = off.checked_add(n as u64);
        (end.is_none_or(|e| e > self.len)).then(|| StoreError::Corrupt {
            path: self.path().to_owned(),
            reason: format!("{n} bytes at {off} run past the scratch's {} bytes", self.len),
        })
    }

    fn path(&self) -> &Path {
        match &self.place {
            Some(Place::File(f)) => f.path(),
            _ => Path::new("<memory scratch>"),
        }
    }

    /// Writes `bytes` at `off`.
    pub fn write_at(&self, bytes: &[u8], off: u64) -> Result<(), StoreError> {
        if let Some(e) = self.out_of_range(off, bytes.len()) {
            return Err(e);
        }
        match &self.place {
            Some(Place::File(f)) => f.write_buffered_at(bytes, off),
            Some(Place::Memory(m)) => {
                let at = off as usize;
                lock(m)[at..at + bytes.len()].copy_from_slice(bytes);
                Ok(())
            }
            None => Ok(()),
        }
    }

    /// Writes `bytes` at `off`, a region of a fresh scratch not written before: with
    /// `O_DIRECT`, past the page cache, where buffer, length and offset are block-aligned
    /// ([`super::aligned_buffer`]) and the file system allows it; through the page cache
    /// otherwise. A later read of the region then comes from disk, into page-cache pages the
    /// kernel fills by DMA, instead of this write copying into fresh pages, which on a VM that
    /// hands freed memory back to its host costs about as much as the rest of a transfer
    /// (see docs/benchmarks.md). For a result trained as it arrived and a mean's chunks as
    /// they leave its window, read back once or not at all; rewrites of a region cached
    /// already go through [`Self::write_at`].
    pub fn write_fresh_at(&self, bytes: &[u8], off: u64) -> Result<(), StoreError> {
        if let Some(e) = self.out_of_range(off, bytes.len()) {
            return Err(e);
        }
        match &self.place {
            Some(Place::File(f)) => f.write_at(bytes, off),
            _ => self.write_at(bytes, off),
        }
    }

    /// Fills `buf` from `off`.
    pub fn read_at(&self, buf: &mut [u8], off: u64) -> Result<(), StoreError> {
        if let Some(e) = self.out_of_range(off, buf.len()) {
            return Err(e);
        }
        match &self.place {
            Some(Place::File(f)) => f.read_at(buf, off),
            Some(Place::Memory(m)) => {
                let at = off as usize;
                buf.copy_from_slice(&lock(m)[at..at + buf.len()]);
                Ok(())
            }
            None => Ok(()),
        }
    }
}

impl Scratch {
    /// Fills `buf` from `off` with bytes not read again soon (hashing a finished scratch):
    /// past the page cache where the scratch was written past it, given a block-aligned
    /// `buf` (see [`super::aligned_buffer`]).
    pub fn read_once_at(&self, buf: &mut [u8], off: u64) -> Result<(), StoreError> {
        match &self.place {
            Some(Place::File(f)) if self.out_of_range(off, buf.len()).is_none() => f.read_once(buf, off),
            _ => self.read_at(buf, off),
        }
    }
}

impl std::fmt::Debug for Scratch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Scratch")
            .field("len", &self.len)
            .field("path", &self.path())
            .finish()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(Place::File(f)) = self.place.take() {
            f.discard();
        }
    }
}

impl BlobStore {
    /// Whether a model of `len` bytes should live on disk rather than in memory here.
    pub fn streams(&self, len: u64) -> bool {
        self.inner.dir.is_some() && len > self.stream_above()
    }

    /// The size above which models live on disk ([`Self::streams`]).
    pub fn stream_above(&self) -> u64 {
        self.inner.stream_above.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Sets the size above which models live on disk (`run --stream-above`; 0: every model).
    pub fn set_stream_above(&self, bytes: u64) {
        self.inner
            .stream_above
            .store(bytes, std::sync::atomic::Ordering::Relaxed);
    }

    /// A zero-filled scratch of `len` bytes: a sparse file in a disk store, a buffer in a
    /// memory store.
    pub fn scratch(&self, len: u64) -> Result<Scratch, StoreError> {
        let place = match &self.inner.dir {
            Some(dir) => Place::File(DataFile::create_scratch(dir, len)?),
            None => {
                let n = usize::try_from(len).map_err(|_| StoreError::Corrupt {
                    path: "<memory scratch>".into(),
                    reason: format!("{len} bytes do not fit in memory"),
                })?;
                Place::Memory(Mutex::new(vec![0; n]))
            }
        };
        Ok(Scratch {
            len,
            place: Some(place),
        })
    }

    /// Files `scratch` as a whole blob cut into chunks of `chunk_size`, hashed as it is read
    /// back chunk by chunk (one chunk in memory), and takes a hold on it under the lock that
    /// finds or inserts it (see [`Self::import_bytes_held`]). Content the store already holds
    /// whole is held, and the scratch removed.
    pub fn adopt_held(&self, scratch: Scratch, chunk_size: u32) -> Result<Manifest, StoreError> {
        let manifest = hash_in_parallel(&scratch, chunk_size)?;
        self.adopt_manifest(scratch, manifest)
    }

    /// [`Self::adopt_held`] for a scratch whose chunk hashes the caller computed as it wrote
    /// them (a streaming learner's result, [`crate::learner::arriving`]): no pass over the file.
    pub fn adopt_hashed(
        &self,
        scratch: Scratch,
        chunk_size: u32,
        hashes: Vec<ChunkHash>,
    ) -> Result<Manifest, StoreError> {
        let manifest = Manifest::new(scratch.len, chunk_size, hashes)?;
        self.adopt_manifest(scratch, manifest)
    }

    fn adopt_manifest(&self, mut scratch: Scratch, manifest: Manifest) -> Result<Manifest, StoreError> {
        let id = manifest.id();
        let mut blobs = lock(&self.inner.blobs);
        self.retain(&id);
        if blobs.get(&id).is_some_and(|e| e.is_kept_whole()) {
            return Ok(manifest);
        }
        let data = match (scratch.place.take(), &self.inner.dir) {
            (Some(Place::File(f)), Some(dir)) => Data::Disk(f.install_whole(dir, &manifest)?),
            (Some(Place::Memory(m)), _) => Data::Memory(std::sync::RwLock::new(
                m.into_inner().unwrap_or_else(|p| p.into_inner()),
            )),
            _ => {
                return Err(StoreError::Corrupt {
                    path: "<scratch>".into(),
                    reason: "a scratch without its bytes".into(),
                });
            }
        };
        super::residency::file(&mut blobs, id, Entry::complete(manifest.clone(), data));
        Ok(manifest)
    }

    /// Takes whole blob `id` out of the store as a scratch holding its bytes (its file renamed,
    /// nothing copied), when the caller's hold is its only one and nobody is reading it: for
    /// a model that is updated in place into the next one (a member's last result that is
    /// also its next input, as every add-one result is). `None` (and the blob left as it
    /// is) otherwise.
    pub fn take_as_scratch(&self, id: &BlobId) -> Option<Scratch> {
        let mut blobs = lock(&self.inner.blobs);
        let mut holds = lock(&self.inner.holds);
        let entry = blobs.get(id)?;
        if holds.get(id) != Some(&1) || Arc::strong_count(entry) != 1 || !entry.is_kept_whole() {
            return None;
        }
        let len = entry.manifest.len;
        let place = match (&entry.data, &self.inner.dir) {
            (Data::Disk(file), Some(dir)) => {
                let taken = file.take_as_scratch(dir).ok()?;
                let _ = std::fs::remove_file(dir.join(format!("{id}.manifest")));
                Place::File(taken)
            }
            (Data::Memory(mem), None) => Place::Memory(Mutex::new(std::mem::take(
                &mut *mem.write().unwrap_or_else(|p| p.into_inner()),
            ))),
            _ => return None,
        };
        super::residency::unfile(&mut blobs, id);
        holds.remove(id);
        Some(Scratch {
            len,
            place: Some(place),
        })
    }

    /// Fills `buf` with the bytes of whole blob `id` from `off`: for streaming a stored model
    /// tensor by tensor, whatever its chunks.
    pub fn read_at(&self, id: &BlobId, buf: &mut [u8], off: u64) -> Result<(), StoreError> {
        self.read_whole_at(id, buf, off, false)
    }

    /// [`Self::read_at`] for bytes not read again soon (checking a final model): past the page
    /// cache where the blob was written past it, given a block-aligned `buf` and `off` (see
    /// [`super::aligned_buffer`]), so a pass over a model larger than memory fills none.
    pub fn read_once_at(&self, id: &BlobId, buf: &mut [u8], off: u64) -> Result<(), StoreError> {
        self.read_whole_at(id, buf, off, true)
    }

    fn read_whole_at(&self, id: &BlobId, buf: &mut [u8], off: u64, once: bool) -> Result<(), StoreError> {
        let e = self.entry(id).ok_or(StoreError::NotFound(*id))?;
        let end = off.checked_add(buf.len() as u64);
        if end.is_none_or(|end| end > e.manifest.len) {
            return Err(StoreError::OutOfRange {
                id: *id,
                index: off / u64::from(e.manifest.chunk_size.max(1)),
            });
        }
        if lock(&e.have).present != e.manifest.chunk_count() {
            return Err(StoreError::NotFound(*id));
        }
        let at = off as usize;
        match &e.data {
            Data::Disk(file) if once => file.read_once(buf, off),
            Data::Disk(file) => file.read_at(buf, off),
            Data::Memory(mem) => {
                buf.copy_from_slice(&mem.read().unwrap_or_else(|p| p.into_inner())[at..at + buf.len()]);
                Ok(())
            }
            Data::Shared(bytes) => {
                buf.copy_from_slice(&bytes[at..at + buf.len()]);
                Ok(())
            }
            Data::Transient => match e.offered_bytes() {
                Some(bytes) => {
                    buf.copy_from_slice(&bytes[at..at + buf.len()]);
                    Ok(())
                }
                None => Err(StoreError::NotFound(*id)),
            },
        }
    }
}

/// The layout of a model of `len` bytes that `read` fills buffers from (from the model's
/// start: a scratch, a stored blob), read from its header alone, never its data, and checked
/// to describe `len` bytes.
pub(crate) fn read_layout(len: u64, read: impl Fn(&mut [u8]) -> Result<(), StoreError>) -> Result<Layout, String> {
    let mut prefix = [0u8; 8];
    read(&mut prefix).map_err(|e| e.to_string())?;
    let n = Layout::header_len(prefix).map_err(|e| e.to_string())?;
    let mut header = vec![0u8; usize::try_from(n).map_err(|e| e.to_string())?];
    read(&mut header).map_err(|e| e.to_string())?;
    let layout = Layout::parse(&header).map_err(|e| e.to_string())?;
    if layout.len != len {
        return Err(format!("its header describes {} bytes, the blob has {len}", layout.len));
    }
    Ok(layout)
}

/// The manifest of `scratch` cut into chunks of `chunk_size`: the chunks read back and hashed
/// on every core, a run of them each, one chunk of memory per core. A model's hashing is the
/// last step of its round, which the machine's other work has finished by then.
fn hash_in_parallel(scratch: &Scratch, chunk_size: u32) -> Result<Manifest, StoreError> {
    let n = flare_protocols::blob_id::chunk_count(scratch.len, chunk_size)?;
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as u64;
    let per = n.div_ceil(cores.max(1)).max(1);
    let cs = u64::from(chunk_size);
    let runs: Vec<Result<Vec<ChunkHash>, StoreError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..n)
            .step_by(per as usize)
            .map(|first| {
                scope.spawn(move || {
                    let (mut storage, start) = super::aligned_buffer(chunk_size as usize);
                    let buf = &mut storage[start..];
                    (first..(first + per).min(n))
                        .map(|i| {
                            let at = i * cs;
                            let len = (scratch.len - at).min(cs) as usize;
                            scratch.read_once_at(&mut buf[..len], at)?;
                            Ok(ChunkHash::of(&buf[..len]))
                        })
                        .collect()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(StoreError::Corrupt {
                        path: scratch.path().to_owned(),
                        reason: "a hashing thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    let mut hashes = Vec::with_capacity(n as usize);
    for run in runs {
        hashes.extend(run?);
    }
    Ok(Manifest::new(scratch.len, chunk_size, hashes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::bytes;

    fn adopt_round_trip(store: &BlobStore) {
        let data = bytes(1050);
        let s = store.scratch(data.len() as u64).expect("scratch");
        // Written out of order, in pieces that do not follow the chunks.
        s.write_at(&data[700..], 700).expect("write");
        s.write_at(&data[..700], 0).expect("write");
        let mut back = vec![0; 50];
        s.read_at(&mut back, 1000).expect("read");
        assert_eq!(back, data[1000..]);
        assert!(s.write_at(&[1, 2], 1049).is_err(), "past the end");
        let m = store.adopt_held(s, 100).expect("adopt");
        assert_eq!(m, Manifest::of_bytes(&data, 100).expect("m"));
        assert_eq!(store.holds_on(&m.id()), 1);
        assert_eq!(store.read_all(&m.id()).expect("read"), data);
        let mut part = vec![0; 333];
        store.read_at(&m.id(), &mut part, 555).expect("read_at");
        assert_eq!(part, data[555..888]);
        assert!(store.read_at(&m.id(), &mut part, 800).is_err(), "past the end");
        // The same content again: held twice, one copy.
        let again = store.scratch(data.len() as u64).expect("scratch");
        again.write_at(&data, 0).expect("write");
        assert_eq!(store.adopt_held(again, 100).expect("adopt").id(), m.id());
        assert_eq!(store.holds_on(&m.id()), 2);
    }

    #[test]
    fn a_scratch_becomes_a_blob_in_either_store() {
        adopt_round_trip(&BlobStore::memory());
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        adopt_round_trip(&store);
        // Only the blob's own files are left: no temporary file.
        let names: Vec<String> = std::fs::read_dir(dir.path().join("blobs"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.ends_with(".tmp")), "{names:?}");
        let reopened = BlobStore::open(dir.path()).expect("reopen");
        let id = Manifest::of_bytes(&bytes(1050), 100).expect("m").id();
        assert_eq!(reopened.read_all(&id).expect("read"), bytes(1050));
    }

    #[test]
    fn a_blob_held_once_becomes_a_scratch_without_a_copy() {
        let dir = tempfile::tempdir().expect("tmp");
        for store in [BlobStore::memory(), BlobStore::open(dir.path()).expect("open")] {
            let data = bytes(1050);
            let m = store.import_bytes_held(&data, 100).expect("import");
            store.retain(&m.id());
            assert!(store.take_as_scratch(&m.id()).is_none(), "held twice");
            store.release(&m.id());
            let s = store.take_as_scratch(&m.id()).expect("held once");
            assert!(store.manifest(&m.id()).is_none(), "gone from the store");
            assert_eq!(store.holds_on(&m.id()), 0);
            let mut back = vec![0; 1050];
            s.read_at(&mut back, 0).expect("read");
            assert_eq!(back, data);
            s.write_at(&[9], 0).expect("write");
            let changed = store.adopt_held(s, 100).expect("adopt");
            assert_ne!(changed.id(), m.id());
        }
        let left: Vec<String> = std::fs::read_dir(dir.path().join("blobs"))
            .expect("ls")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left.len(), 2, "the changed blob's data and manifest only: {left:?}");
    }

    #[test]
    fn a_dropped_scratch_leaves_no_file_and_the_threshold_needs_a_disk() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        drop(store.scratch(4096).expect("scratch"));
        assert_eq!(std::fs::read_dir(dir.path().join("blobs")).expect("ls").count(), 0);
        assert!(!store.streams(DEFAULT_STREAM_ABOVE));
        assert!(store.streams(DEFAULT_STREAM_ABOVE + 1));
        store.set_stream_above(0);
        assert!(store.streams(1));
        let mem = BlobStore::memory();
        mem.set_stream_above(0);
        assert!(!mem.streams(1 << 40), "a memory store has nowhere to stream to");
    }
}
