//! The blob store: content-addressed blobs, whole or in part, in memory or on disk.
//!
//! A blob enters the store either whole ([`BlobStore::import_reader`]: hashed as it is
//! written, named by its id; [`BlobStore::import_shared`]: hashed, served from its producer's
//! memory at once and written to disk behind) or chunk by chunk from the network
//! ([`BlobStore::begin`] with a verified manifest, then [`BlobStore::put_chunk`]). `put_chunk` checks every chunk against
//! the manifest before writing it, so the store never holds a byte that does not belong to
//! the blob it is filed under.
//!
//! - `disk`: the on-disk format (`--data-dir`): `<id>.manifest`, the pre-sized `<id>.data`,
//!   the `<id>.have` of a partial blob, and `O_DIRECT` writes from aligned buffers.
//! - `holds`: counted holds on the blobs a job still needs; the last release removes a blob.
//! - `scratch`: model-sized files written in place, then filed as blobs; positioned reads
//!   of whole blobs (models larger than memory).
//! - `residency`: where a held blob's bytes live, and the memory policy on top of the
//!   files: lending, shared imports written behind, transient results, in-memory views.
//!
//! A partial blob survives a restart of the process: reopening the store reads the `.have`
//! file, and a fetch asks only for the chunks still missing. The data is written before its
//! `.have` byte, so a killed process never marks a chunk it did not write. (Neither file is
//! fsynced per chunk: after a power loss, a partial blob's marks may be ahead of its data.)

mod disk;
mod holds;
mod residency;
mod scratch;
mod writer;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};

use flare_protocols::blob_id::{BlobIdError, chunk_count};
use flare_protocols::{BlobId, BlobRef, Manifest, ManifestBuilder};

pub use self::disk::{DIRECT_ALIGN, aligned_buffer};
use self::disk::{DataFile, Have, finish_if_complete, load_entry, read_full, write_manifest};
pub use self::residency::Written;
use self::residency::{Data, Entry, file};
pub(crate) use self::scratch::read_layout;
pub use self::scratch::{DEFAULT_STREAM_ABOVE, Scratch};
pub use self::writer::ChunkWriter;
use crate::lock;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Disk I/O failed.
    #[error("blob store i/o at {path}: {source}")]
    Io {
        /// The file involved.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// A chunk does not match its manifest hash; nothing was written.
    #[error("chunk {index} of blob {id} does not match its hash")]
    HashMismatch {
        /// The blob.
        id: BlobId,
        /// The chunk.
        index: u64,
    },
    /// The store has no manifest for this blob.
    #[error("blob {0} is not in the store")]
    NotFound(BlobId),
    /// The chunk index is past the end of the blob.
    #[error("chunk {index} is out of range for blob {id}")]
    OutOfRange {
        /// The blob.
        id: BlobId,
        /// The chunk.
        index: u64,
    },
    /// A file in the data dir is not what the store wrote.
    #[error("corrupt store file {path}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The blob's shape is out of limits.
    #[error(transparent)]
    Shape(#[from] BlobIdError),
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_owned(),
        source,
    }
}

/// How much of a blob the store holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Presence {
    /// Chunks present.
    pub present: u64,
    /// Chunks in the blob.
    pub total: u64,
}

impl Presence {
    /// Whether every chunk is present.
    pub fn is_complete(&self) -> bool {
        self.present == self.total
    }
}

/// A chunk read to be sent: its own bytes, or a view into a blob the store holds in memory.
#[derive(Debug)]
pub enum ChunkBytes {
    /// Copied.
    Owned(Vec<u8>),
    /// Read from disk into the block-aligned part `buf[start..start + len]`, so that the read
    /// could bypass the page cache ([`disk::DIRECT_ALIGN`]).
    Read {
        /// The buffer, handed back for the next read.
        buf: Vec<u8>,
        /// Where the chunk starts in it.
        start: usize,
        /// The chunk's length.
        len: usize,
    },
    /// Part of a blob held in memory.
    Held {
        /// The blob's bytes.
        bytes: Arc<Vec<u8>>,
        /// The chunk's place in them.
        range: std::ops::Range<usize>,
    },
}

impl ChunkBytes {
    /// The chunk as a vector of its own (a copy when it is a view).
    pub fn into_vec(self) -> Vec<u8> {
        match self {
            Self::Owned(v) => v,
            Self::Read { mut buf, start, len } => {
                buf.copy_within(start..start + len, 0);
                buf.truncate(len);
                buf
            }
            Self::Held { bytes, range } => bytes[range].to_vec(),
        }
    }

    /// The buffer a chunk read from disk was read into, for the next read; `None` for a view.
    pub fn into_buffer(self) -> Option<Vec<u8>> {
        match self {
            Self::Owned(buf) | Self::Read { buf, .. } => Some(buf),
            Self::Held { .. } => None,
        }
    }
}

impl std::ops::Deref for ChunkBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Owned(v) => v,
            Self::Read { buf, start, len } => &buf[*start..*start + *len],
            Self::Held { bytes, range } => &bytes[range.clone()],
        }
    }
}

struct Inner {
    dir: Option<PathBuf>,
    blobs: Mutex<HashMap<BlobId, Arc<Entry>>>,
    /// Counted holds (see `holds`).
    holds: Mutex<HashMap<BlobId, usize>>,
    /// Woken whenever a chunk or a manifest arrives: a source relaying a blob it is still
    /// receiving waits on it for the chunks it has not got yet.
    arrivals: tokio::sync::Notify,
    /// See [`BlobStore::streams`].
    stream_above: std::sync::atomic::AtomicU64,
}

/// A content-addressed blob store; cheap to clone, safe to share between tasks.
///
/// Methods do blocking I/O: call them from `spawn_blocking` on hot paths.
#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for BlobStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlobStore").field("dir", &self.inner.dir).finish()
    }
}

impl BlobStore {
    /// A store that keeps everything in memory (tests, simulations, small models).
    pub fn memory() -> Self {
        Self {
            inner: Arc::new(Inner {
                dir: None,
                blobs: Mutex::new(HashMap::new()),
                holds: Mutex::default(),
                arrivals: tokio::sync::Notify::new(),
                stream_above: DEFAULT_STREAM_ABOVE.into(),
            }),
        }
    }

    /// Opens (or creates) a store under `data_dir/blobs`, picking up whole and partial blobs.
    pub fn open(data_dir: &Path) -> Result<Self, StoreError> {
        let dir = data_dir.join("blobs");
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        let mut blobs = HashMap::new();
        for ent in std::fs::read_dir(&dir).map_err(io_err(&dir))? {
            let path = ent.map_err(io_err(&dir))?.path();
            let Some(stem) = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".manifest"))
            else {
                continue;
            };
            let Ok(id) = BlobId::from_hex(stem) else {
                continue;
            };
            let (data, have, manifest) = load_entry(&dir, id)?;
            let entry = Entry::new(Data::Disk(data), have, manifest);
            blobs.insert(id, Arc::new(entry));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                dir: Some(dir),
                blobs: Mutex::new(blobs),
                holds: Mutex::default(),
                arrivals: tokio::sync::Notify::new(),
                stream_above: DEFAULT_STREAM_ABOVE.into(),
            }),
        })
    }

    /// The directory blobs live in, for a disk store.
    pub fn dir(&self) -> Option<&Path> {
        self.inner.dir.as_deref()
    }

    fn entry(&self, id: &BlobId) -> Option<Arc<Entry>> {
        let mut blobs = lock(&self.inner.blobs);
        match blobs.get(id) {
            Some(e) if e.is_gone() => {
                blobs.remove(id);
                None
            }
            e => e.cloned(),
        }
    }

    /// The manifest of a blob held whole or in part.
    pub fn manifest(&self, id: &BlobId) -> Option<Arc<Manifest>> {
        self.entry(id).map(|e| e.manifest.clone())
    }

    /// How much of a blob is held, if any of it is.
    pub fn presence(&self, id: &BlobId) -> Option<Presence> {
        self.entry(id).map(|e| Presence {
            present: lock(&e.have).present,
            total: e.manifest.chunk_count(),
        })
    }

    /// Whether the whole blob is held.
    pub fn is_complete(&self, id: &BlobId) -> bool {
        self.presence(id).is_some_and(|p| p.is_complete())
    }

    /// Indices of the chunks not held yet (all of them when the blob is unknown).
    pub fn missing(&self, blob: &BlobRef) -> Result<Vec<u64>, StoreError> {
        match self.entry(&blob.id) {
            Some(e) => {
                let have = lock(&e.have);
                Ok((0..e.manifest.chunk_count())
                    .filter(|&i| have.bits[i as usize] == 0)
                    .collect())
            }
            None => Ok((0..chunk_count(blob.len, blob.chunk_size)?).collect()),
        }
    }

    /// Whether chunk `index` of blob `id` is held.
    pub fn has_chunk(&self, id: &BlobId, index: u64) -> bool {
        self.entry(id).is_some_and(|e| e.has_chunk(index))
    }

    /// Makes room for a blob about to arrive chunk by chunk. The manifest must already be
    /// verified against the id asked for ([`Manifest::verified`]). Idempotent.
    pub fn begin(&self, manifest: Manifest) -> Result<Arc<Manifest>, StoreError> {
        let id = manifest.id();
        let mut blobs = lock(&self.inner.blobs);
        if let Some(e) = blobs.get(&id).filter(|e| e.is_kept()) {
            return Ok(e.manifest.clone());
        }
        // Offered meanwhile as a producer's transient result: kept from its bytes, whole at
        // once (a blob only offered may go at any moment).
        if blobs.get(&id).is_some_and(|e| !e.is_gone()) {
            drop(blobs);
            if self.make_kept(&id)
                && let Some(m) = self.manifest(&id)
            {
                return Ok(m);
            }
            blobs = lock(&self.inner.blobs);
        }
        let n = manifest.chunk_count() as usize;
        let entry = match &self.inner.dir {
            None => Entry::new(
                Data::Memory(RwLock::new(vec![0u8; manifest.len as usize])),
                Have::empty(n, None),
                manifest,
            ),
            Some(dir) => {
                let data = DataFile::create_sized(dir.join(format!("{id}.data")), manifest.len)?;
                let have_file = Have::create_file(dir, &id, n)?;
                write_manifest(dir, &manifest)?;
                Entry::new(Data::Disk(data), Have::empty(n, Some(have_file)), manifest)
            }
        };
        // An empty blob is complete as soon as it exists.
        if n == 0 {
            finish_if_complete(&entry.have, &entry.manifest)?;
        }
        let m = file(&mut blobs, id, entry).manifest.clone();
        self.inner.arrivals.notify_waiters();
        Ok(m)
    }

    /// Verifies chunk `index` against the manifest and stores it. Returns whether it was new.
    /// A chunk that does not match is refused with [`StoreError::HashMismatch`] and not written.
    pub fn put_chunk(&self, id: &BlobId, index: u64, bytes: &[u8]) -> Result<bool, StoreError> {
        let e = self.entry(id).ok_or(StoreError::NotFound(*id))?;
        if index >= e.manifest.chunk_count() {
            return Err(StoreError::OutOfRange { id: *id, index });
        }
        if !e.manifest.verify_chunk(index, bytes) {
            return Err(StoreError::HashMismatch { id: *id, index });
        }
        if lock(&e.have).bits[index as usize] != 0 {
            return Ok(false);
        }
        let off = index * u64::from(e.manifest.chunk_size);
        match &e.data {
            Data::Memory(buf) => {
                let mut buf = buf.write().unwrap_or_else(|p| p.into_inner());
                buf[off as usize..off as usize + bytes.len()].copy_from_slice(bytes);
            }
            // A shared or transient blob is whole: its chunks were all present above.
            Data::Shared(_) | Data::Transient => return Ok(false),
            Data::Disk(file) => file.write_at(bytes, off)?,
        }
        if !lock(&e.have).mark(index)? {
            return Ok(false);
        }
        finish_if_complete(&e.have, &e.manifest)?;
        self.inner.arrivals.notify_waiters();
        Ok(true)
    }

    /// Waits until chunk `index` of blob `id` is held (its manifest first, if the store has
    /// none yet), at most until `deadline`; returns whether it is. For a source that relays a
    /// blob while it is still receiving it.
    pub async fn wait_for_chunk(&self, id: &BlobId, index: u64, deadline: tokio::time::Instant) -> bool {
        loop {
            // Registered before the check: an arrival between the two still wakes it.
            let arrived = self.inner.arrivals.notified();
            if self.has_chunk(id, index) {
                return true;
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return self.has_chunk(id, index);
            }
        }
    }

    /// Waits until the store knows blob `id`'s manifest, at most until `deadline`.
    pub async fn wait_for_manifest(&self, id: &BlobId, deadline: tokio::time::Instant) -> Option<Arc<Manifest>> {
        loop {
            let arrived = self.inner.arrivals.notified();
            if let Some(m) = self.manifest(id) {
                return Some(m);
            }
            if tokio::time::timeout_at(deadline, arrived).await.is_err() {
                return self.manifest(id);
            }
        }
    }

    /// Reads chunk `index`, or `None` when the store does not hold it.
    pub fn read_chunk(&self, id: &BlobId, index: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .read_chunk_to_send(id, index, Vec::new())?
            .map(ChunkBytes::into_vec))
    }

    /// Reads chunk `index` like [`Self::read_chunk`], without copying it when the blob is held
    /// in memory: for a chunk about to be sent, which is copied on its way out anyway. The
    /// view keeps the blob's bytes alive until it is dropped; [`Self::end_lend`] stops
    /// further views of a lent blob.
    ///
    /// A chunk that comes from disk is read into `buf` (resized to the chunk's length). So the
    /// caller picks the thread that allocates it: glibc gives each thread that allocates an
    /// arena of its own and keeps freed memory there, and 1 MiB chunks allocated on tokio's
    /// many blocking threads (where the read itself must run) kept a controller serving 8
    /// clients about 13 MiB larger (see docs/benchmarks.md).
    pub fn read_chunk_to_send(
        &self,
        id: &BlobId,
        index: u64,
        mut buf: Vec<u8>,
    ) -> Result<Option<ChunkBytes>, StoreError> {
        let Some(e) = self.entry(id) else {
            return Ok(None);
        };
        if !e.has_chunk(index) {
            return Ok(None);
        }
        if let Some(view) = e.view(index) {
            return Ok(Some(view));
        }
        let len = e.manifest.chunk_len(index);
        let off = index * u64::from(e.manifest.chunk_size);
        let out = match &e.data {
            Data::Memory(mem) => {
                buf.clear();
                buf.extend_from_slice(&mem.read().unwrap_or_else(|p| p.into_inner())[off as usize..off as usize + len]);
                ChunkBytes::Owned(buf)
            }
            Data::Disk(file) => {
                // Room to start the chunk at an aligned address: a reused buffer has it already.
                buf.resize(len + DIRECT_ALIGN, 0);
                let start = buf.as_ptr().align_offset(DIRECT_ALIGN);
                file.read_once(&mut buf[start..start + len], off)?;
                ChunkBytes::Read { buf, start, len }
            }
            // A transient blob whose producer let go: gone.
            Data::Shared(_) | Data::Transient => return Ok(None),
        };
        Ok(Some(out))
    }

    /// Chunk `index` as a view of bytes held in memory (shared, transient or lent), without
    /// any I/O: so a sender can skip the blocking read. `None` when it must be read (from
    /// disk, or copied out of a memory store) or is not held.
    pub fn chunk_in_memory(&self, id: &BlobId, index: u64) -> Option<ChunkBytes> {
        self.entry(id).filter(|e| e.has_chunk(index))?.view(index)
    }

    /// Stores a whole blob read from `reader`, hashing it as it goes, and returns its manifest.
    /// Memory use is one chunk, whatever the size. Storing bytes already held is a no-op.
    ///
    /// On disk, whole chunks are written with `O_DIRECT` from an aligned buffer where the file
    /// system allows it: a large import then costs no page-cache copy (see docs/benchmarks.md).
    pub fn import_reader(&self, reader: &mut impl Read, chunk_size: u32) -> Result<Manifest, StoreError> {
        self.import_reader_held(reader, chunk_size, false)
    }

    /// [`Self::import_bytes`], taking a hold on the blob ([`Self::retain`]) under the same lock
    /// that finds or inserts it: a hold taken after the import could come too late, when the
    /// last release of the same content (another job's) removed it in between.
    pub fn import_bytes_held(&self, bytes: &[u8], chunk_size: u32) -> Result<Manifest, StoreError> {
        self.import_reader_held(&mut &bytes[..], chunk_size, true)
    }

    fn import_reader_held(&self, reader: &mut impl Read, chunk_size: u32, hold: bool) -> Result<Manifest, StoreError> {
        let mut builder = ManifestBuilder::new(chunk_size)?;
        let (mut storage, off) = aligned_buffer(chunk_size as usize);
        let chunk = &mut storage[off..off + chunk_size as usize];
        let tmp = match &self.inner.dir {
            Some(dir) => Some(DataFile::create_temp(dir)?),
            None => None,
        };
        let mut mem = Vec::new();
        let mut at = 0u64;
        loop {
            let n = read_full(reader, chunk).map_err(io_err(Path::new("<import>")))?;
            if n == 0 {
                break;
            }
            builder.push_chunk(&chunk[..n]);
            match &tmp {
                Some(file) => file.write_at(&chunk[..n], at)?,
                None => mem.extend_from_slice(&chunk[..n]),
            }
            at += n as u64;
            if n < chunk.len() {
                break;
            }
        }
        let manifest = builder.finish()?;
        let id = manifest.id();
        let mut blobs = lock(&self.inner.blobs);
        if blobs.get(&id).is_some_and(|e| e.is_kept_whole()) {
            if let Some(tmp) = tmp {
                tmp.discard();
            }
            if hold {
                self.retain(&id);
            }
            return Ok(manifest);
        }
        let data = match (tmp, &self.inner.dir) {
            (Some(tmp), Some(dir)) => Data::Disk(tmp.install_whole(dir, &manifest)?),
            _ => Data::Memory(RwLock::new(mem)),
        };
        file(&mut blobs, id, Entry::complete(manifest.clone(), data));
        if hold {
            self.retain(&id);
        }
        Ok(manifest)
    }

    /// Stores a whole in-memory blob.
    pub fn import_bytes(&self, bytes: &[u8], chunk_size: u32) -> Result<Manifest, StoreError> {
        self.import_reader(&mut &bytes[..], chunk_size)
    }

    /// Writes a whole blob to `out`, chunk by chunk.
    pub fn export(&self, id: &BlobId, out: &mut impl Write) -> Result<u64, StoreError> {
        let e = self.entry(id).ok_or(StoreError::NotFound(*id))?;
        let mut written = 0;
        for i in 0..e.manifest.chunk_count() {
            let chunk = self.read_chunk(id, i)?.ok_or(StoreError::NotFound(*id))?;
            out.write_all(&chunk).map_err(io_err(Path::new("<export>")))?;
            written += chunk.len() as u64;
        }
        Ok(written)
    }

    /// Reads a whole blob into memory (small blobs, tests).
    pub fn read_all(&self, id: &BlobId) -> Result<Vec<u8>, StoreError> {
        let mut out = Vec::new();
        self.export(id, &mut out)?;
        Ok(out)
    }

    /// The file holding a whole blob in a disk store (immutable: it is named by its content);
    /// `None` for a memory store or a partial blob.
    pub fn data_path(&self, id: &BlobId) -> Option<PathBuf> {
        let e = self.entry(id)?;
        if lock(&e.have).present != e.manifest.chunk_count() {
            return None;
        }
        match &e.data {
            Data::Disk(file) => Some(file.path().to_owned()),
            Data::Memory(_) | Data::Shared(_) | Data::Transient => None,
        }
    }

    /// Re-hashes every held chunk and returns the indices that do not match (a scrub).
    pub fn verify(&self, id: &BlobId) -> Result<Vec<u64>, StoreError> {
        let e = self.entry(id).ok_or(StoreError::NotFound(*id))?;
        let mut bad = Vec::new();
        for i in 0..e.manifest.chunk_count() {
            if let Some(c) = self.read_chunk(id, i)?
                && !e.manifest.verify_chunk(i, &c)
            {
                bad.push(i);
            }
        }
        Ok(bad)
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;

    /// `n` bytes of a fixed pattern.
    pub(crate) fn bytes(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 % 253) as u8).collect()
    }

    fn round_trip(store: &BlobStore) {
        for n in [0usize, 1, 99, 100, 101, 1000] {
            let data = bytes(n);
            let m = Manifest::of_bytes(&data, 100).expect("m");
            store.begin(m.clone()).expect("begin");
            // Out of order, with a duplicate and a corrupt chunk.
            let chunks: Vec<&[u8]> = data.chunks(100).collect();
            for i in (0..chunks.len()).rev() {
                assert!(store.put_chunk(&m.id(), i as u64, chunks[i]).expect("put"));
            }
            if let Some(c) = chunks.first() {
                assert!(!store.put_chunk(&m.id(), 0, c).expect("dup"));
                let mut bad = c.to_vec();
                bad[0] ^= 1;
                assert!(matches!(
                    store.put_chunk(&m.id(), 0, &bad),
                    Err(StoreError::HashMismatch { index: 0, .. })
                ));
            }
            assert!(store.is_complete(&m.id()));
            assert_eq!(store.read_all(&m.id()).expect("read"), data);
            let again = store.import_bytes(&data, 100).expect("import");
            assert_eq!(again.id(), m.id());
        }
    }

    #[test]
    fn memory_store_round_trips() {
        round_trip(&BlobStore::memory());
    }

    #[test]
    fn disk_store_round_trips_and_partial_blobs_survive_reopen() {
        let dir = tempfile::tempdir().expect("tmp");
        round_trip(&BlobStore::open(dir.path()).expect("open"));

        let data = bytes(1050);
        let m = Manifest::of_bytes(&data, 100).expect("m");
        {
            let s = BlobStore::open(dir.path()).expect("open");
            s.begin(m.clone()).expect("begin");
            s.put_chunk(&m.id(), 3, &data[300..400]).expect("put");
            s.put_chunk(&m.id(), 10, &data[1000..]).expect("put");
        }
        let s = BlobStore::open(dir.path()).expect("reopen");
        assert_eq!(s.presence(&m.id()), Some(Presence { present: 2, total: 11 }));
        let missing = s.missing(&m.blob_ref()).expect("missing");
        assert_eq!(missing.len(), 9);
        assert!(!missing.contains(&3) && !missing.contains(&10));
        for i in missing {
            let r = i as usize * 100..(i as usize * 100 + 100).min(data.len());
            s.put_chunk(&m.id(), i, &data[r]).expect("put");
        }
        assert!(s.is_complete(&m.id()));
        assert!(!dir.path().join(format!("blobs/{}.have", m.id())).exists());
        let s = BlobStore::open(dir.path()).expect("reopen");
        assert_eq!(s.read_all(&m.id()).expect("read"), data);
        assert!(s.verify(&m.id()).expect("verify").is_empty());
    }

    #[test]
    fn chunks_written_and_read_past_the_page_cache_end_in_part_blocks_that_are_not() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = BlobStore::open(dir.path()).expect("open");
        // Chunks of 512 KiB (read past the page cache); the last is one block and 77 bytes.
        let cs = 128 * DIRECT_ALIGN;
        let data = bytes(2 * cs + DIRECT_ALIGN + 77);
        let m = Manifest::of_bytes(&data, cs as u32).expect("m");
        s.begin(m.clone()).expect("begin");
        let (mut storage, start) = aligned_buffer(cs);
        for (i, c) in data.chunks(cs).enumerate() {
            let buf = &mut storage[start..start + c.len()];
            buf.copy_from_slice(c);
            assert!(s.put_chunk(&m.id(), i as u64, buf).expect("put"));
        }
        for (i, c) in data.chunks(cs).enumerate() {
            let chunk = s
                .read_chunk_to_send(&m.id(), i as u64, Vec::new())
                .expect("read")
                .expect("held");
            assert_eq!(&chunk[..], c, "chunk {i}");
        }
        assert!(s.verify(&m.id()).expect("verify").is_empty());
    }

    #[test]
    fn corrupt_manifest_is_a_clear_error() {
        let dir = tempfile::tempdir().expect("tmp");
        let s = BlobStore::open(dir.path()).expect("open");
        let m = s.import_bytes(&bytes(500), 100).expect("import");
        let mpath = dir.path().join(format!("blobs/{}.manifest", m.id()));
        let mut b = std::fs::read(&mpath).expect("read");
        let last = b.len() - 1;
        b[last] ^= 1;
        std::fs::write(&mpath, b).expect("write");
        let e = BlobStore::open(dir.path()).expect_err("corrupt");
        assert!(matches!(e, StoreError::Corrupt { .. }), "{e}");
    }
}
