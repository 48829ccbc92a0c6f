//! The store's on-disk format, and the only code that touches its files.
//!
//! ```text
//! DIR/blobs/<id>.manifest   b"flare-manifest/1" len:u64le chunk_size:u32le hashes (32 B each)
//! DIR/blobs/<id>.data       the blob, pre-sized; chunks are written in place
//! DIR/blobs/<id>.have       one byte per chunk, 1 = present; only while the blob is partial
//! DIR/blobs/import-*.tmp    a whole blob being written; renamed to `<id>.data` once hashed
//! ```
//! Kept apart from the API ([`super::BlobStore`]) and from what is held in memory
//! ([`super::residency`]) so that the format, its crash-safety orderings (data before its
//! `.have` byte; `.data` renamed into place before its manifest) and the `O_DIRECT` rules
//! are read in one place.

use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use flare_protocols::blob_id::hashes_from_bytes;
use flare_protocols::{BlobId, BlobRef, Manifest};

use super::{StoreError, io_err};
use crate::lock;

const MANIFEST_MAGIC: &[u8] = b"flare-manifest/1";

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

/// Opens `path` for direct (page-cache-bypassing) reads and writes, when the file system
/// allows it.
fn open_direct(path: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
        .ok()
}

/// A blob's `.data` file (or the temporary file a whole blob is written to first).
pub(super) struct DataFile {
    file: File,
    path: PathBuf,
    /// The same file opened with `O_DIRECT`, for reads and writes whose buffer, offset and
    /// length are block-aligned (see [`aligned_buffer`]); `None` where the file system
    /// refuses it.
    direct: Option<File>,
    /// Whether any of its bytes were written through the page cache (and so may still be
    /// there); false for a file written only past it, whose chunks are then read to be sent
    /// past it too ([`Self::read_once`]).
    cached: AtomicBool,
}

impl DataFile {
    fn new(file: File, path: PathBuf, cached: bool) -> Self {
        Self {
            direct: open_direct(&path),
            file,
            path,
            cached: AtomicBool::new(cached),
        }
    }

    /// Creates (or reopens) a partial blob's `.data` file, sized to the blob.
    pub(super) fn create_sized(path: PathBuf, len: u64) -> Result<Self, StoreError> {
        Ok(Self::new(create_sized(&path, len)?, path, false))
    }

    /// Creates an empty temporary file in `dir` for a whole blob about to be written.
    pub(super) fn create_temp(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(format!("import-{}.tmp", unique_suffix()));
        let file = File::create(&path).map_err(io_err(&path))?;
        Ok(Self::new(file, path, false))
    }

    /// Creates a temporary file in `dir` of `len` zero bytes (sparse) to be written and read
    /// back in place by position, through the page cache (a [`super::Scratch`]), except for
    /// the first write of a region, which may bypass it ([`Self::write_at`]).
    pub(super) fn create_scratch(dir: &Path, len: u64) -> Result<Self, StoreError> {
        let path = dir.join(format!("import-{}.tmp", unique_suffix()));
        Ok(Self::new(create_sized(&path, len)?, path, false))
    }

    /// Renames a whole blob's file to a temporary name in `dir` and opens it as a scratch
    /// (see [`super::BlobStore::take_as_scratch`]).
    pub(super) fn take_as_scratch(&self, dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join(format!("import-{}.tmp", unique_suffix()));
        std::fs::rename(&self.path, &path).map_err(io_err(&path))?;
        Self::open_whole(path, self.cached.load(Ordering::Relaxed))
    }

    /// Opens a whole blob's file (for reading; a scratch's, for writing in place too).
    fn open_whole(path: PathBuf, cached: bool) -> Result<Self, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        Ok(Self::new(file, path, cached))
    }

    /// The file's path.
    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// Writes `bytes` at `off`: with `O_DIRECT` when buffer and offset are aligned and the
    /// file system allows it (no page-cache copy; a blob's last chunk ends in a part-block
    /// that goes through the page cache), through the page cache otherwise.
    pub(super) fn write_at(&self, bytes: &[u8], off: u64) -> Result<(), StoreError> {
        let whole_blocks = bytes.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        match &self.direct {
            Some(d) if whole_blocks > 0 && is_aligned(bytes.as_ptr() as usize) && is_aligned(off as usize) => {
                let (head, tail) = bytes.split_at(whole_blocks);
                d.write_all_at(head, off).map_err(io_err(&self.path))?;
                self.write_buffered_at(tail, off + whole_blocks as u64)
            }
            _ => self.write_buffered_at(bytes, off),
        }
    }

    /// Writes `bytes` at `off` through the page cache: for a scratch, rewritten in place and
    /// read back soon, which the page cache serves.
    pub(super) fn write_buffered_at(&self, bytes: &[u8], off: u64) -> Result<(), StoreError> {
        // A part-block (a header, a blob's last bytes) does not make the file one to read
        // through the page cache.
        if bytes.len() >= DIRECT_ALIGN {
            self.cached.store(true, Ordering::Relaxed);
        }
        self.file.write_all_at(bytes, off).map_err(io_err(&self.path))
    }

    /// Whether a write of `len` bytes at `off` may take the `O_DIRECT` path (given an aligned
    /// buffer): so a caller copies into one only when it pays.
    pub(super) fn takes_direct(&self, len: usize, off: u64) -> bool {
        self.direct.is_some() && is_aligned(len) && is_aligned(off as usize)
    }

    /// Reads `buf.len()` bytes at `off`.
    pub(super) fn read_at(&self, buf: &mut [u8], off: u64) -> Result<(), StoreError> {
        self.file.read_exact_at(buf, off).map_err(io_err(&self.path))
    }

    /// Reads `buf.len()` bytes at `off` that this node will not read again soon (a chunk
    /// about to be sent, a chunk being hashed). From a file written only past the page cache
    /// (received chunks, imports, a result trained as it arrived), the read bypasses it too
    /// (`O_DIRECT`, where buffer and offset are block-aligned): the page cache does not hold
    /// those bytes, and filling fresh page-cache pages, on a VM that hands freed memory back
    /// to its host, costs more CPU than the transfer itself (see docs/benchmarks.md). A file
    /// written through the page cache (a result updated in place) is read through it.
    pub(super) fn read_once(&self, buf: &mut [u8], off: u64) -> Result<(), StoreError> {
        let whole_blocks = buf.len() / DIRECT_ALIGN * DIRECT_ALIGN;
        match &self.direct {
            Some(d)
                if !self.cached.load(Ordering::Relaxed)
                    && whole_blocks >= DIRECT_READ_MIN
                    && is_aligned(buf.as_ptr() as usize)
                    && is_aligned(off as usize) =>
            {
                let (head, tail) = buf.split_at_mut(whole_blocks);
                d.read_exact_at(head, off).map_err(io_err(&self.path))?;
                // A last chunk's tail shorter than a block.
                self.read_at(tail, off + whole_blocks as u64)
            }
            _ => self.read_at(buf, off),
        }
    }

    /// Files a temporary file holding the whole blob `manifest` names as that blob's data:
    /// renamed into place first, then any stale `.have` removed, then the manifest written,
    /// so a process killed in between never leaves a manifest for bytes that are not there.
    pub(super) fn install_whole(self, dir: &Path, manifest: &Manifest) -> Result<Self, StoreError> {
        let id = manifest.id();
        let cached = self.cached.load(Ordering::Relaxed);
        drop((self.file, self.direct));
        let path = dir.join(format!("{id}.data"));
        std::fs::rename(&self.path, &path).map_err(io_err(&path))?;
        let _ = std::fs::remove_file(dir.join(format!("{id}.have")));
        write_manifest(dir, manifest)?;
        Self::open_whole(path, cached)
    }

    /// Removes a temporary file that is not needed after all (its blob was already held, or
    /// writing it failed).
    pub(super) fn discard(self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The smallest read worth sending past the page cache: a smaller one waits on the disk for
/// a few pages whose cost in the page cache is small (a tiny model's chunks, served many times).
const DIRECT_READ_MIN: usize = 256 << 10;

fn is_aligned(x: usize) -> bool {
    x.is_multiple_of(DIRECT_ALIGN)
}

/// Which chunks of a blob are present, and the `.have` file that records it on disk.
pub(super) struct Have {
    /// One byte per chunk, 1 = present.
    pub(super) bits: Vec<u8>,
    /// How many bytes of `bits` are 1.
    pub(super) present: u64,
    /// The `.have` file while the blob is partial on disk.
    file: Option<(File, PathBuf)>,
}

impl Have {
    /// No chunk present; recorded in `file` (a partial disk blob) or only in memory.
    pub(super) fn empty(n: usize, file: Option<(File, PathBuf)>) -> Self {
        Self {
            bits: vec![0; n],
            present: 0,
            file,
        }
    }

    /// Every chunk present: nothing to record.
    pub(super) fn whole(n: usize) -> Self {
        Self {
            bits: vec![1; n],
            present: n as u64,
            file: None,
        }
    }

    /// Creates a new partial blob's `.have` file (all zero).
    pub(super) fn create_file(dir: &Path, id: &BlobId, n: usize) -> Result<(File, PathBuf), StoreError> {
        let path = dir.join(format!("{id}.have"));
        Ok((create_sized(&path, n as u64)?, path))
    }

    /// Marks chunk `index` present, on disk first (once its data is written); `false` when it
    /// already was.
    pub(super) fn mark(&mut self, index: u64) -> Result<bool, StoreError> {
        if self.bits[index as usize] != 0 {
            return Ok(false);
        }
        if let Some((f, p)) = &self.file {
            f.write_all_at(&[1], index).map_err(io_err(p))?;
        }
        self.bits[index as usize] = 1;
        self.present += 1;
        Ok(true)
    }
}

/// Once every chunk is present, a disk blob drops its `.have` file: complete blobs are those
/// with a manifest and no `.have`.
pub(super) fn finish_if_complete(have: &Mutex<Have>, manifest: &Manifest) -> Result<(), StoreError> {
    let mut have = lock(have);
    if have.present == manifest.chunk_count()
        && let Some((_, path)) = have.file.take()
    {
        std::fs::remove_file(&path).map_err(io_err(&path))?;
    }
    Ok(())
}

/// Reads until `buf` is full or the reader ends; the count read.
pub(super) fn read_full(r: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
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

/// Removes blob `id`'s files (manifest first, so a process killed midway leaves no manifest
/// for missing bytes); files already gone are no error.
pub(super) fn remove_files(dir: &Path, id: &BlobId) -> Result<(), StoreError> {
    for ext in ["manifest", "have", "data"] {
        let path = dir.join(format!("{id}.{ext}"));
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&path)(e)),
        }
    }
    Ok(())
}

/// Writes `<id>.manifest` (through a temporary file and a rename: never half-written).
pub(super) fn write_manifest(dir: &Path, m: &Manifest) -> Result<(), StoreError> {
    let path = dir.join(format!("{}.manifest", m.id()));
    let tmp = dir.join(format!("{}.manifest.tmp", m.id()));
    let mut bytes = MANIFEST_MAGIC.to_vec();
    bytes.extend_from_slice(&m.len.to_le_bytes());
    bytes.extend_from_slice(&m.chunk_size.to_le_bytes());
    bytes.extend_from_slice(&m.hash_bytes());
    std::fs::write(&tmp, &bytes).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io_err(&path))
}

/// Reads blob `id` back from its files: whole (no `.have`) or partial.
/// A blob's files, read back: its data file, which chunks it has, and its manifest.
pub(super) fn load_entry(dir: &Path, id: BlobId) -> Result<(DataFile, Have, Manifest), StoreError> {
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
    // Whatever the page cache holds of it after a restart, reads past it are right.
    let data = DataFile::open_whole(dir.join(format!("{id}.data")), false)?;
    let actual = data.file.metadata().map_err(io_err(&data.path))?.len();
    if actual != manifest.len {
        return Err(StoreError::Corrupt {
            path: data.path,
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
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Have::whole(n),
        Err(e) => return Err(io_err(&have_path)(e)),
    };
    Ok((data, have, manifest))
}
