//! The blob store: content-addressed blobs, whole or in part, in memory or on disk.
//!
//! A blob enters the store either whole ([`BlobStore::import_reader`]: hashed as it is
//! written, named by its id; [`BlobStore::import_shared`]: hashed, served from its producer's
//! memory at once and written to disk behind) or chunk by chunk from the network
//! ([`BlobStore::begin`] with a verified manifest, then [`BlobStore::put_chunk`]). `put_chunk` checks every chunk against
//! the manifest before writing it, so the store never holds a byte that does not belong to
//! the blob it is filed under.
//!
//! # On disk (`--data-dir`)
//! ```text
//! DIR/blobs/<id>.manifest   b"flare-manifest/1" len:u64le chunk_size:u32le hashes (32 B each)
//! DIR/blobs/<id>.data       the blob, pre-sized; chunks are written in place
//! DIR/blobs/<id>.have       one byte per chunk, 1 = present; only while the blob is partial
//! ```
//! A partial blob survives a restart of the process: reopening the store reads the `.have`
//! file, and a fetch asks only for the chunks still missing. The data is written before its
//! `.have` byte, so a killed process never marks a chunk it did not write. (Neither file is
//! fsynced per chunk: after a power loss, a partial blob's marks may be ahead of its data.)

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock, Weak};

use flare_protocols::blob_id::{BlobIdError, chunk_count, hashes_from_bytes};
use flare_protocols::{BlobId, BlobRef, Manifest, ManifestBuilder};

use crate::lock;

const MANIFEST_MAGIC: &[u8] = b"flare-manifest/1";

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

enum Data {
    Memory(RwLock<Vec<u8>>),
    /// A whole blob whose bytes its producer shares ([`BlobStore::import_shared`]): in a disk
    /// store only until the background write has put it on disk.
    Shared(Arc<Vec<u8>>),
    /// A whole blob the store serves but does not keep ([`BlobStore::import_transient`]):
    /// there while its producer holds the bytes, gone after.
    Transient(Weak<Vec<u8>>),
    Disk {
        file: File,
        path: PathBuf,
        /// The same file opened with `O_DIRECT`, for arriving chunks whose buffer and offset
        /// are block-aligned (see [`aligned_buffer`]); `None` where the file system refuses it.
        direct: Option<File>,
    },
}

/// A chunk read to be sent: its own bytes, or a view into a blob the store holds in memory.
#[derive(Debug)]
pub enum ChunkBytes {
    /// Read from disk (or copied).
    Owned(Vec<u8>),
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
            Self::Held { bytes, range } => bytes[range].to_vec(),
        }
    }
}

impl std::ops::Deref for ChunkBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            Self::Owned(v) => v,
            Self::Held { bytes, range } => &bytes[range.clone()],
        }
    }
}

/// Alignment that `O_DIRECT` writes need (buffer address, file offset and length).
pub const DIRECT_ALIGN: usize = 4096;

/// A buffer of `len` bytes whose start is [`DIRECT_ALIGN`]-aligned: `(storage, offset)`;
/// the bytes are `storage[offset..offset + len]`. Chunks received into such buffers are
/// written to disk with `O_DIRECT`, bypassing the page cache.
pub fn aligned_buffer(len: usize) -> (Vec<u8>, usize) {
    let storage = vec![0u8; len + DIRECT_ALIGN];
    let offset = storage.as_ptr().align_offset(DIRECT_ALIGN);
    (storage, offset)
}

/// Opens `path` for direct (page-cache-bypassing) writes, when the file system allows it.
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

struct Have {
    bits: Vec<u8>,
    present: u64,
    /// The `.have` file while the blob is partial on disk.
    file: Option<(File, PathBuf)>,
}

struct Entry {
    manifest: Arc<Manifest>,
    data: Data,
    have: Mutex<Have>,
    /// The blob's bytes in memory while their producer still holds them (a shared import
    /// written to disk, or a blob [`BlobStore::lend`] was called for): reads come from there
    /// rather than the disk.
    hot: Mutex<Weak<Vec<u8>>>,
}

impl Entry {
    fn new(data: Data, have: Have, manifest: Manifest) -> Self {
        Self {
            manifest: Arc::new(manifest),
            data,
            have: Mutex::new(have),
            hot: Mutex::new(Weak::new()),
        }
    }

    fn complete(manifest: Manifest, data: Data) -> Self {
        let n = manifest.chunk_count() as usize;
        let have = Have {
            bits: vec![1; n],
            present: n as u64,
            file: None,
        };
        Self::new(data, have, manifest)
    }
}

impl Entry {
    /// A transient blob whose producer has let go of its bytes: no longer held.
    fn is_gone(&self) -> bool {
        matches!(&self.data, Data::Transient(w) if w.strong_count() == 0)
    }

    /// Held by the store itself (in memory or on disk, or being written), not only lent to it
    /// for a while.
    fn is_kept(&self) -> bool {
        !matches!(self.data, Data::Transient(_))
    }

    /// Held whole by the store itself: importing the same bytes again is a no-op.
    fn is_kept_whole(&self) -> bool {
        self.is_kept() && lock(&self.have).present == self.manifest.chunk_count()
    }

    /// Chunk `index` as a view of the blob's bytes in memory (shared, transient, or lent to
    /// a disk blob), if they are there. The caller has checked that the chunk is held.
    fn view(&self, index: u64) -> Option<ChunkBytes> {
        let bytes = match &self.data {
            Data::Shared(bytes) => bytes.clone(),
            Data::Transient(w) => w.upgrade()?,
            Data::Disk { .. } => lock(&self.hot).upgrade()?,
            Data::Memory(_) => return None,
        };
        let off = index as usize * self.manifest.chunk_size as usize;
        Some(ChunkBytes::Held {
            bytes,
            range: off..off + self.manifest.chunk_len(index),
        })
    }

    fn has_chunk(&self, index: u64) -> bool {
        usize::try_from(index)
            .ok()
            .and_then(|i| lock(&self.have).bits.get(i).copied())
            .is_some_and(|b| b != 0)
    }
}

struct Inner {
    dir: Option<PathBuf>,
    blobs: Mutex<HashMap<BlobId, Arc<Entry>>>,
}

/// Resolves when a [`BlobStore::import_shared`] no longer needs its bytes in memory.
///
/// The FedAvg controller waits for it before it fills the next accumulator, so that the
/// previous global model and the new mean are never both in memory while the disk catches up.
#[derive(Clone, Debug)]
pub struct Written(tokio::sync::watch::Receiver<bool>);

impl Written {
    /// Already resolved: nothing is being written.
    pub fn done() -> Self {
        Self(tokio::sync::watch::channel(true).1)
    }

    /// Waits until the write has ended (done or failed; a failure is logged where it happens).
    pub async fn wait(mut self) {
        // An error means the writer is gone, which also ends the wait.
        let _ = self.0.wait_for(|done| *done).await;
    }
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
            let entry = load_entry(&dir, id)?;
            blobs.insert(id, Arc::new(entry));
        }
        Ok(Self {
            inner: Arc::new(Inner {
                dir: Some(dir),
                blobs: Mutex::new(blobs),
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
        // A transient blob is replaced: its bytes may go at any moment.
        if let Some(e) = blobs.get(&id).filter(|e| e.is_kept()) {
            return Ok(e.manifest.clone());
        }
        let n = manifest.chunk_count() as usize;
        let entry = match &self.inner.dir {
            None => Entry::new(
                Data::Memory(RwLock::new(vec![0u8; manifest.len as usize])),
                Have {
                    bits: vec![0; n],
                    present: 0,
                    file: None,
                },
                manifest,
            ),
            Some(dir) => {
                let data_path = dir.join(format!("{id}.data"));
                let file = create_sized(&data_path, manifest.len)?;
                let have_path = dir.join(format!("{id}.have"));
                let have_file = create_sized(&have_path, n as u64)?;
                write_manifest(dir, &manifest)?;
                Entry::new(
                    Data::Disk {
                        direct: open_direct(&data_path),
                        file,
                        path: data_path,
                    },
                    Have {
                        bits: vec![0; n],
                        present: 0,
                        file: Some((have_file, have_path)),
                    },
                    manifest,
                )
            }
        };
        let entry = Arc::new(entry);
        let m = entry.manifest.clone();
        // An empty blob is complete as soon as it exists.
        if n == 0 {
            finish_if_complete(&entry)?;
        }
        blobs.insert(id, entry);
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
            Data::Shared(_) | Data::Transient(_) => return Ok(false),
            Data::Disk { file, path, direct } => {
                let aligned = |x: usize| x.is_multiple_of(DIRECT_ALIGN);
                match direct {
                    Some(d) if aligned(bytes.as_ptr() as usize) && aligned(bytes.len()) && aligned(off as usize) => {
                        d.write_all_at(bytes, off).map_err(io_err(path))?
                    }
                    _ => file.write_all_at(bytes, off).map_err(io_err(path))?,
                }
            }
        }
        let mut have = lock(&e.have);
        if have.bits[index as usize] != 0 {
            return Ok(false);
        }
        if let Some((f, p)) = &have.file {
            f.write_all_at(&[1], index).map_err(io_err(p))?;
        }
        have.bits[index as usize] = 1;
        have.present += 1;
        drop(have);
        finish_if_complete(&e)?;
        Ok(true)
    }

    /// Reads chunk `index`, or `None` when the store does not hold it.
    pub fn read_chunk(&self, id: &BlobId, index: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.read_chunk_to_send(id, index)?.map(ChunkBytes::into_vec))
    }

    /// Reads chunk `index` like [`Self::read_chunk`], without copying it when the blob is held
    /// in memory: for a chunk about to be sent, which is copied on its way out anyway. The
    /// view keeps the blob's bytes alive until it is dropped; [`Self::end_lend`] stops
    /// further views of a lent blob.
    pub fn read_chunk_to_send(&self, id: &BlobId, index: u64) -> Result<Option<ChunkBytes>, StoreError> {
        self.read_chunk_to_send_into(id, index, Vec::new())
    }

    /// [`Self::read_chunk_to_send`], reading a chunk that comes from disk into `buf` (resized
    /// to the chunk's length). So the caller picks the thread that allocates it: glibc gives
    /// each thread that allocates an arena of its own and keeps freed memory there, and 1 MiB
    /// chunks allocated on tokio's many blocking threads (where the read itself must run)
    /// kept a controller serving 8 clients about 13 MiB larger (see docs/benchmarks.md).
    pub fn read_chunk_to_send_into(
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
            Data::Disk { file, path, .. } => {
                buf.resize(len, 0);
                file.read_exact_at(&mut buf, off).map_err(io_err(path))?;
                ChunkBytes::Owned(buf)
            }
            // A transient blob whose producer let go: gone.
            Data::Shared(_) | Data::Transient(_) => return Ok(None),
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
        let mut builder = ManifestBuilder::new(chunk_size)?;
        let (mut storage, off) = aligned_buffer(chunk_size as usize);
        let chunk = &mut storage[off..off + chunk_size as usize];
        let tmp = match &self.inner.dir {
            Some(dir) => {
                let path = dir.join(format!("import-{}.tmp", unique_suffix()));
                let file = File::create(&path).map_err(io_err(&path))?;
                let direct = open_direct(&path);
                Some((file, direct, path))
            }
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
                Some((file, direct, path)) => {
                    let aligned = n.is_multiple_of(DIRECT_ALIGN) && (at as usize).is_multiple_of(DIRECT_ALIGN);
                    match direct {
                        Some(d) if aligned => d.write_all_at(&chunk[..n], at).map_err(io_err(path))?,
                        _ => file.write_all_at(&chunk[..n], at).map_err(io_err(path))?,
                    }
                }
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
            if let Some((_, _, path)) = tmp {
                let _ = std::fs::remove_file(path);
            }
            return Ok(manifest);
        }
        let data = match (tmp, &self.inner.dir) {
            (Some((file, direct, tmp_path)), Some(dir)) => {
                drop((file, direct));
                let path = dir.join(format!("{id}.data"));
                std::fs::rename(&tmp_path, &path).map_err(io_err(&path))?;
                let _ = std::fs::remove_file(dir.join(format!("{id}.have")));
                write_manifest(dir, &manifest)?;
                let file = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .map_err(io_err(&path))?;
                Data::Disk {
                    file,
                    path,
                    direct: None,
                }
            }
            _ => Data::Memory(RwLock::new(mem)),
        };
        blobs.insert(id, Arc::new(Entry::complete(manifest.clone(), data)));
        Ok(manifest)
    }

    /// Stores a whole in-memory blob that its producer goes on holding, without waiting for
    /// the disk: it is hashed, served from `bytes` at once, and written to disk on a
    /// background thread. Once written, reads still come from memory for as long as anyone
    /// else holds `bytes`, and from disk after that.
    ///
    /// For a task's result: the member can report it (and serve it) as soon as it is hashed,
    /// not after the disk write, and its first reader does not read it back from disk. A
    /// process that ends before the write is done leaves no trace of the blob on disk (only a
    /// temporary file that the next [`BlobStore::open`] ignores).
    ///
    /// The returned [`Written`] resolves once the store holds `bytes` no more: the write is
    /// done (or failed, and the blob stays in memory for the life of the process).
    pub fn import_shared(&self, bytes: Arc<Vec<u8>>, chunk_size: u32) -> Result<(Manifest, Written), StoreError> {
        let manifest = Manifest::of_bytes(&bytes, chunk_size)?;
        let id = manifest.id();
        let entry = {
            let mut blobs = lock(&self.inner.blobs);
            if blobs.get(&id).is_some_and(|e| e.is_kept_whole()) {
                return Ok((manifest, Written::done()));
            }
            let entry = Arc::new(Entry::complete(manifest.clone(), Data::Shared(bytes.clone())));
            blobs.insert(id, entry.clone());
            entry
        };
        let Some(dir) = self.inner.dir.clone() else {
            return Ok((manifest, Written::done()));
        };
        let (done, written) = tokio::sync::watch::channel(false);
        let store = self.clone();
        let spawned = std::thread::Builder::new().name("blob-write".into()).spawn(move || {
            if let Err(e) = store.persist_shared(&dir, &entry, bytes) {
                // The blob stays served from memory for the life of the process.
                tracing::warn!(blob = %entry.manifest.id(), error = %e, "writing a shared blob to disk failed");
            }
            // This thread's hold on the bytes ends before anyone is told it has.
            drop(entry);
            let _ = done.send(true);
        });
        if let Err(e) = spawned {
            tracing::warn!(blob = %id, error = %e, "no thread to write a shared blob; it stays in memory");
            return Ok((manifest, Written::done()));
        }
        Ok((manifest, Written(written)))
    }

    /// Serves a whole in-memory blob for as long as its producer holds `bytes`, without
    /// keeping it: nothing is written, and once the producer lets go (drops or takes back its
    /// last reference) the blob is gone from the store. Returns its manifest. A blob the store
    /// already keeps stays as it is.
    ///
    /// For a result that one peer pulls once, soon (a FedAvg client's update, which the
    /// controller folds and forgets): writing it would cost the member a model's worth of
    /// copying and disk I/O in the middle of the transfer, for a copy nobody reads.
    pub fn import_transient(&self, bytes: &Arc<Vec<u8>>, chunk_size: u32) -> Result<Manifest, StoreError> {
        let manifest = Manifest::of_bytes(bytes, chunk_size)?;
        let id = manifest.id();
        let mut blobs = lock(&self.inner.blobs);
        if !blobs.get(&id).is_some_and(|e| e.is_kept_whole()) {
            let entry = Entry::complete(manifest.clone(), Data::Transient(Arc::downgrade(bytes)));
            blobs.insert(id, Arc::new(entry));
        }
        Ok(manifest)
    }

    /// Lets reads of blob `id` come from `bytes` (the blob's content, which the caller holds in
    /// memory anyway) for as long as the caller holds them, instead of from disk. For a model
    /// that is about to be pulled by many peers at once: serving it from memory saves a disk
    /// read per peer. Returns whether the store holds the blob whole and `bytes` match its
    /// length (nothing is lent otherwise).
    pub fn lend(&self, id: &BlobId, bytes: &Arc<Vec<u8>>) -> bool {
        let Some(e) = self.entry(id) else {
            return false;
        };
        if e.manifest.len != bytes.len() as u64 || lock(&e.have).present != e.manifest.chunk_count() {
            return false;
        }
        *lock(&e.hot) = Arc::downgrade(bytes);
        true
    }

    /// Ends what [`Self::lend`] (or [`Self::import_shared`], once written) started: reads of
    /// blob `id` come from disk again, even while someone still holds the bytes. So that an
    /// owner that lets go of a lent model can reuse its memory, or free it, without the
    /// chunks being sent at that moment (each holds the bytes until it is out) handing the
    /// bytes on to the next ones.
    pub fn end_lend(&self, id: &BlobId) {
        if let Some(e) = self.entry(id) {
            *lock(&e.hot) = Weak::new();
        }
    }

    /// Writes a shared blob's bytes to disk, then files it as a disk blob whose reads come
    /// from `bytes` while someone else holds them.
    fn persist_shared(&self, dir: &Path, shared: &Arc<Entry>, bytes: Arc<Vec<u8>>) -> Result<(), StoreError> {
        let manifest = &shared.manifest;
        let id = manifest.id();
        let tmp = dir.join(format!("import-{}.tmp", unique_suffix()));
        let written = (|| {
            let file = File::create(&tmp).map_err(io_err(&tmp))?;
            let direct = open_direct(&tmp);
            let cs = manifest.chunk_size as usize;
            let (mut storage, off) = aligned_buffer(cs);
            for (i, chunk) in bytes.chunks(cs).enumerate() {
                let at = (i * cs) as u64;
                match &direct {
                    Some(d) if chunk.len().is_multiple_of(DIRECT_ALIGN) => {
                        let buf = &mut storage[off..off + chunk.len()];
                        buf.copy_from_slice(chunk);
                        d.write_all_at(buf, at).map_err(io_err(&tmp))?;
                    }
                    _ => file.write_all_at(chunk, at).map_err(io_err(&tmp))?,
                }
            }
            Ok::<_, StoreError>(file)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
        let path = dir.join(format!("{id}.data"));
        std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
        write_manifest(dir, manifest)?;
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        let disk = Entry::complete(
            (**manifest).clone(),
            Data::Disk {
                file,
                path,
                direct: None,
            },
        );
        *lock(&disk.hot) = Arc::downgrade(&bytes);
        let mut blobs = lock(&self.inner.blobs);
        if blobs.get(&id).is_some_and(|e| Arc::ptr_eq(e, shared)) {
            blobs.insert(id, Arc::new(disk));
        }
        Ok(())
    }

    /// Stores a whole in-memory blob.
    pub fn import_bytes(&self, bytes: &[u8], chunk_size: u32) -> Result<Manifest, StoreError> {
        self.import_reader(&mut &bytes[..], chunk_size)
    }

    /// Stores a whole file.
    pub fn import_file(&self, path: &Path, chunk_size: u32) -> Result<Manifest, StoreError> {
        let mut f = File::open(path).map_err(io_err(path))?;
        self.import_reader(&mut f, chunk_size)
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
            Data::Disk { path, .. } => Some(path.clone()),
            Data::Memory(_) | Data::Shared(_) | Data::Transient(_) => None,
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

/// Once every chunk is present, a disk blob drops its `.have` file: complete blobs are those
/// with a manifest and no `.have`.
fn finish_if_complete(e: &Entry) -> Result<(), StoreError> {
    let mut have = lock(&e.have);
    if have.present == e.manifest.chunk_count()
        && let Some((_, path)) = have.file.take()
    {
        std::fs::remove_file(&path).map_err(io_err(&path))?;
    }
    Ok(())
}

fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match r.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn unique_suffix() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    format!("{}-{}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

fn create_sized(path: &Path, len: u64) -> Result<File, StoreError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(io_err(path))?;
    f.set_len(len).map_err(io_err(path))?;
    Ok(f)
}

fn write_manifest(dir: &Path, m: &Manifest) -> Result<(), StoreError> {
    let path = dir.join(format!("{}.manifest", m.id()));
    let tmp = dir.join(format!("{}.manifest.tmp", m.id()));
    let mut bytes = MANIFEST_MAGIC.to_vec();
    bytes.extend_from_slice(&m.len.to_le_bytes());
    bytes.extend_from_slice(&m.chunk_size.to_le_bytes());
    bytes.extend_from_slice(&m.hash_bytes());
    std::fs::write(&tmp, &bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))
}

fn load_entry(dir: &Path, id: BlobId) -> Result<Entry, StoreError> {
    let mpath = dir.join(format!("{id}.manifest"));
    let corrupt = |reason: &str| StoreError::Corrupt {
        path: mpath.clone(),
        reason: reason.to_owned(),
    };
    let bytes = std::fs::read(&mpath).map_err(io_err(&mpath))?;
    let rest = bytes.strip_prefix(MANIFEST_MAGIC).ok_or_else(|| corrupt("bad magic"))?;
    if rest.len() < 12 {
        return Err(corrupt("truncated header"));
    }
    let (len, rest) = rest.split_at(8);
    let (cs, hashes) = rest.split_at(4);
    let len = u64::from_le_bytes(len.try_into().map_err(|_| corrupt("length"))?);
    let cs = u32::from_le_bytes(cs.try_into().map_err(|_| corrupt("chunk size"))?);
    let hashes = hashes_from_bytes(hashes).ok_or_else(|| corrupt("hash list is not whole hashes"))?;
    let manifest = Manifest::verified(
        &BlobRef {
            id,
            len,
            chunk_size: cs,
        },
        hashes,
    )
    .map_err(|e| corrupt(&e.to_string()))?;
    let n = manifest.chunk_count() as usize;
    let data_path = dir.join(format!("{id}.data"));
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&data_path)
        .map_err(io_err(&data_path))?;
    let actual = file.metadata().map_err(io_err(&data_path))?.len();
    if actual != manifest.len {
        return Err(StoreError::Corrupt {
            path: data_path,
            reason: format!("{actual} bytes, manifest says {}", manifest.len),
        });
    }
    let have_path = dir.join(format!("{id}.have"));
    let have = match OpenOptions::new().read(true).write(true).open(&have_path) {
        Ok(f) => {
            let mut bits = vec![0u8; n];
            f.read_exact_at(&mut bits, 0).map_err(|e| StoreError::Corrupt {
                path: have_path.clone(),
                reason: e.to_string(),
            })?;
            let present = bits.iter().filter(|&&b| b != 0).count() as u64;
            Have {
                bits,
                present,
                file: Some((f, have_path)),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Have {
            bits: vec![1; n],
            present: n as u64,
            file: None,
        },
        Err(e) => return Err(io_err(&have_path)(e)),
    };
    let direct = have.file.as_ref().and_then(|_| open_direct(&data_path));
    Ok(Entry::new(
        Data::Disk {
            file,
            path: data_path,
            direct,
        },
        have,
        manifest,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bytes(n: usize) -> Vec<u8> {
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
    fn shared_import_is_served_at_once_then_written_and_read_from_memory_while_held() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        // 4096-byte chunks take the O_DIRECT path where the file system allows it; the short
        // last chunk takes the ordinary one.
        let data = Arc::new(bytes(3 * 4096 + 10));
        let (m, written) = store.import_shared(data.clone(), 4096).expect("import");
        assert_eq!(m, Manifest::of_bytes(&data, 4096).expect("m"));
        assert!(store.is_complete(&m.id()));
        assert_eq!(store.read_all(&m.id()).expect("read"), *data);
        futures::executor::block_on(written.wait());
        assert_eq!(
            Arc::strong_count(&data),
            1,
            "once written, the store holds the bytes no more"
        );
        let path = store.data_path(&m.id()).expect("on disk once written");
        assert_eq!(std::fs::read(&path).expect("file"), *data, "the file holds the blob");
        // While the producer holds the bytes, reads come from memory: spoil the file to tell.
        std::fs::write(&path, vec![0u8; data.len()]).expect("spoil");
        assert_eq!(
            store.read_chunk(&m.id(), 1).expect("read"),
            Some(data[4096..8192].to_vec())
        );
        drop(data);
        assert_eq!(
            store.read_chunk(&m.id(), 1).expect("read"),
            Some(vec![0u8; 4096]),
            "released: read from disk"
        );
        // A reopened store finds it whole.
        let again = BlobStore::open(dir.path()).expect("reopen");
        assert!(again.is_complete(&m.id()));
    }

    #[test]
    fn a_chunk_read_from_disk_goes_into_the_callers_buffer_and_one_held_in_memory_is_a_view() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        let data = bytes(3 * 4096);
        let m = store.import_bytes(&data, 4096).expect("import");
        // The buffer is allocated by the caller (on its thread) and comes back holding the chunk.
        let buf = vec![0u8; 4096];
        let at = buf.as_ptr();
        match store.read_chunk_to_send_into(&m.id(), 1, buf).expect("read") {
            Some(ChunkBytes::Owned(v)) => {
                assert_eq!(v.as_ptr(), at, "read into the buffer given");
                assert_eq!(v, data[4096..8192]);
            }
            other => panic!("expected an owned chunk, got {other:?}"),
        }
        assert!(store.chunk_in_memory(&m.id(), 1).is_none(), "on disk only: no view");
        let held = Arc::new(data.clone());
        assert!(store.lend(&m.id(), &held));
        match store.chunk_in_memory(&m.id(), 2) {
            Some(ChunkBytes::Held { bytes, range }) => {
                assert!(Arc::ptr_eq(&bytes, &held));
                assert_eq!(range, 8192..12288);
            }
            other => panic!("expected a view, got {other:?}"),
        }
        store.end_lend(&m.id());
        assert!(store.chunk_in_memory(&m.id(), 2).is_none());
    }

    #[test]
    fn transient_import_is_served_while_held_never_written_and_gone_once_let_go() {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        let data = Arc::new(bytes(3 * 4096 + 10));
        let m = store.import_transient(&data, 4096).expect("import");
        assert_eq!(m, Manifest::of_bytes(&data, 4096).expect("m"));
        assert!(store.is_complete(&m.id()));
        assert_eq!(store.read_all(&m.id()).expect("read"), *data);
        assert_eq!(Arc::strong_count(&data), 1, "the store keeps no reference of its own");
        assert_eq!(store.data_path(&m.id()), None, "nothing on disk");
        let on_disk: Vec<_> = std::fs::read_dir(dir.path().join("blobs")).expect("dir").collect();
        assert!(on_disk.is_empty(), "no file written: {on_disk:?}");
        // The producer takes its bytes back (e.g. to reuse the memory): the blob is gone,
        // and is not found complete where a fetch would look.
        let mine = Arc::try_unwrap(data).expect("sole owner");
        assert_eq!(store.read_chunk(&m.id(), 0).expect("read"), None);
        assert!(!store.is_complete(&m.id()));
        assert_eq!(store.missing(&m.blob_ref()).expect("missing").len(), 4);

        // Kept after all: importing it for real replaces the transient entry.
        let data = Arc::new(mine);
        store.import_transient(&data, 4096).expect("again");
        let (_, written) = store.import_shared(data.clone(), 4096).expect("shared");
        futures::executor::block_on(written.wait());
        drop(data);
        assert!(store.is_complete(&m.id()), "written, so held without its producer");
        assert!(store.data_path(&m.id()).is_some());
        // And a blob the store keeps stays kept when offered as transient.
        let copy = Arc::new(store.read_all(&m.id()).expect("read"));
        store.import_transient(&copy, 4096).expect("transient of a kept blob");
        drop(copy);
        assert!(store.is_complete(&m.id()));
    }

    /// A disk store holding a blob of three 4 KiB chunks, lent from the returned bytes, whose
    /// file is then zeroed: a read that returns the real bytes came from memory.
    fn lent_blob_on_a_spoiled_file() -> (tempfile::TempDir, BlobStore, Arc<Vec<u8>>, Manifest) {
        let dir = tempfile::tempdir().expect("tmp");
        let store = BlobStore::open(dir.path()).expect("open");
        let data = Arc::new(bytes(3 * 4096));
        let m = store.import_bytes(&data, 4096).expect("import");
        assert!(!store.lend(&m.id(), &Arc::new(bytes(10))), "not the blob's length");
        assert!(store.lend(&m.id(), &data));
        let path = store.data_path(&m.id()).expect("on disk");
        std::fs::write(&path, vec![0u8; data.len()]).expect("spoil");
        (dir, store, data, m)
    }

    #[test]
    fn a_lent_blob_is_read_from_memory_while_the_lender_holds_it() {
        let (_dir, store, data, m) = lent_blob_on_a_spoiled_file();
        assert_eq!(store.read_chunk(&m.id(), 2).expect("read"), Some(data[8192..].to_vec()));
        drop(data);
        assert_eq!(store.read_chunk(&m.id(), 2).expect("read"), Some(vec![0u8; 4096]));
    }

    #[test]
    fn a_chunk_to_send_is_a_view_of_a_lent_blob_until_the_lend_ends() {
        let (_dir, store, data, m) = lent_blob_on_a_spoiled_file();
        let view = store.read_chunk_to_send(&m.id(), 1).expect("read").expect("held");
        assert!(matches!(view, ChunkBytes::Held { .. }), "no copy of a lent blob");
        assert_eq!(*view, data[4096..8192]);
        // The lender lets go; the view being sent still holds the bytes, but the next read
        // no longer gets them from it: the lend is over.
        store.end_lend(&m.id());
        drop(data);
        assert_eq!(view[..4], bytes(3 * 4096)[4096..4100], "a view outlives its lender");
        let next = store.read_chunk_to_send(&m.id(), 2).expect("read").expect("chunk");
        assert!(matches!(next, ChunkBytes::Owned(_)), "read from disk");
        assert_eq!(*next, [0u8; 4096]);
        drop(view);
        assert_eq!(store.read_chunk(&m.id(), 1).expect("read"), Some(vec![0u8; 4096]));
    }

    #[test]
    fn shared_import_into_a_memory_store_and_of_a_blob_already_held() {
        let store = BlobStore::memory();
        let data = Arc::new(bytes(1000));
        let (m, written) = store.import_shared(data.clone(), 100).expect("import");
        futures::executor::block_on(written.wait());
        assert_eq!(store.import_shared(data.clone(), 100).expect("again").0, m);
        assert_eq!(store.import_bytes(&data, 100).expect("bytes"), m);
        assert_eq!(store.read_all(&m.id()).expect("read"), *data);
        assert!(
            !store.put_chunk(&m.id(), 0, &data[..100]).expect("put"),
            "already whole"
        );
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
