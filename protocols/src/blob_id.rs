//! Blob naming: a blob is an immutable byte string cut into fixed-size chunks.
//!
//! - chunk hash `h_i = blake3(chunk_i)`; every chunk is `chunk_size` bytes except the last,
//!   which holds the remainder (a blob of 0 bytes has no chunks);
//! - blob id `= blake3(b"flare-blob/1" || len as u64 LE || chunk_size as u32 LE || h_0 || … || h_{n-1})`.
//!
//! So the id commits to the length, the chunking and every chunk: once a receiver holds a hash
//! list whose hash is the id it asked for, it can verify each chunk on its own, in any order,
//! from any source.

use std::fmt;

use serde::{Deserialize, Serialize};

/// Chunk size used unless a caller picks another: 1 MiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;
/// Largest chunk size a peer accepts: bounds the memory of one chunk in flight.
pub const MAX_CHUNK_SIZE: u32 = 16 << 20;
/// Largest number of chunks in one blob (4 Ti chunks of 1 MiB = 4 TiB): bounds the hash list
/// (128 MiB) that a receiver must hold.
pub const MAX_CHUNKS: u64 = 1 << 22;

const DOMAIN: &[u8] = b"flare-blob/1";

/// The blake3 hash of one chunk.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    /// Hashes one chunk's bytes.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }
}

impl fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", hex::encode(&self.0[..8]))
    }
}

/// Content address of a blob; see the module doc for how it is computed.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlobId(pub [u8; 32]);

impl BlobId {
    /// Full lowercase hex, used for file names and logs.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses 64 hex digits.
    pub fn from_hex(s: &str) -> Result<Self, BlobIdError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| BlobIdError::BadHex(s.to_owned()))?;
        Ok(Self(out))
    }
}

impl fmt::Display for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for BlobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "BlobId({})", &self.to_hex()[..16])
    }
}

/// Errors of blob naming and manifest checks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobIdError {
    /// Not 64 hex digits.
    #[error("not a blob id (64 hex digits): {0:?}")]
    BadHex(String),
    /// Chunk size is zero or above [`MAX_CHUNK_SIZE`].
    #[error("chunk size {0} is outside 1..={MAX_CHUNK_SIZE}")]
    BadChunkSize(u32),
    /// More chunks than [`MAX_CHUNKS`].
    #[error("blob of {len} bytes in chunks of {chunk_size} has more than {MAX_CHUNKS} chunks")]
    TooLarge {
        /// Blob length in bytes.
        len: u64,
        /// Chunk size in bytes.
        chunk_size: u32,
    },
    /// The hash list does not have one hash per chunk.
    #[error("hash list has {got} entries, expected {expected}")]
    WrongHashCount {
        /// Hashes received.
        got: u64,
        /// Chunks in the blob.
        expected: u64,
    },
    /// The hash list does not hash to the expected id.
    #[error("hash list does not match blob id {0}")]
    IdMismatch(BlobId),
}

/// What a peer needs to ask for a blob: its id and the shape that the id commits to.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug, Serialize, Deserialize)]
pub struct BlobRef {
    /// Content address.
    pub id: BlobId,
    /// Length in bytes.
    pub len: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
}

impl BlobRef {
    /// Number of chunks, after checking the shape against the limits.
    pub fn chunk_count(&self) -> Result<u64, BlobIdError> {
        chunk_count(self.len, self.chunk_size)
    }
}

/// Number of chunks of a blob of `len` bytes, or an error when the shape is out of limits.
pub fn chunk_count(len: u64, chunk_size: u32) -> Result<u64, BlobIdError> {
    if chunk_size == 0 || chunk_size > MAX_CHUNK_SIZE {
        return Err(BlobIdError::BadChunkSize(chunk_size));
    }
    let n = len.div_ceil(u64::from(chunk_size));
    if n > MAX_CHUNKS {
        return Err(BlobIdError::TooLarge { len, chunk_size });
    }
    Ok(n)
}

/// A blob's full description: shape plus every chunk hash. Enough to verify any chunk.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Manifest {
    /// Length in bytes.
    pub len: u64,
    /// Chunk size in bytes.
    pub chunk_size: u32,
    /// One hash per chunk, in order.
    pub hashes: Vec<ChunkHash>,
    id: BlobId,
}

impl Manifest {
    /// Builds a manifest from a hash list, checking limits and the hash count.
    pub fn new(len: u64, chunk_size: u32, hashes: Vec<ChunkHash>) -> Result<Self, BlobIdError> {
        let expected = chunk_count(len, chunk_size)?;
        if hashes.len() as u64 != expected {
            return Err(BlobIdError::WrongHashCount {
                got: hashes.len() as u64,
                expected,
            });
        }
        let id = compute_id(len, chunk_size, &hashes);
        Ok(Self {
            len,
            chunk_size,
            hashes,
            id,
        })
    }

    /// Builds a manifest from a hash list received for `want`, and checks that it is the one
    /// `want` names.
    pub fn verified(want: &BlobRef, hashes: Vec<ChunkHash>) -> Result<Self, BlobIdError> {
        let m = Self::new(want.len, want.chunk_size, hashes)?;
        if m.id != want.id {
            return Err(BlobIdError::IdMismatch(want.id));
        }
        Ok(m)
    }

    /// Hashes a whole in-memory blob, its chunks spread over the machine's cores: a model is
    /// hashed before it can be offered to anyone (a new global model ends its round with
    /// this), and one core hashes about 4 GiB/s.
    pub fn of_bytes(bytes: &[u8], chunk_size: u32) -> Result<Self, BlobIdError> {
        chunk_count(bytes.len() as u64, chunk_size)?;
        let chunks: Vec<&[u8]> = bytes.chunks(chunk_size as usize).collect();
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let threads = cores.min(chunks.len() / MIN_CHUNKS_PER_THREAD).max(1);
        let per_thread = chunks.len().div_ceil(threads);
        let hash_all = |part: &[&[u8]]| part.iter().map(|c| ChunkHash::of(c)).collect::<Vec<_>>();
        let mut parts = chunks.chunks(per_thread.max(1));
        let first = parts.next().unwrap_or_default();
        let hashes = std::thread::scope(|scope| {
            // The other parts on threads of their own, the first one here.
            let others: Vec<_> = parts
                .map(|part| {
                    (
                        part,
                        std::thread::Builder::new().spawn_scoped(scope, move || hash_all(part)),
                    )
                })
                .collect();
            let mut hashes = hash_all(first);
            for (part, spawned) in others {
                match spawned.map(|h| h.join()) {
                    Ok(Ok(h)) => hashes.extend(h),
                    // A thread the system refused (or one that died) leaves its part to be
                    // hashed here.
                    _ => hashes.extend(hash_all(part)),
                }
            }
            hashes
        });
        Self::new(bytes.len() as u64, chunk_size, hashes)
    }

    /// The blob id.
    pub fn id(&self) -> BlobId {
        self.id
    }

    /// The reference peers exchange for this blob.
    pub fn blob_ref(&self) -> BlobRef {
        BlobRef {
            id: self.id,
            len: self.len,
            chunk_size: self.chunk_size,
        }
    }

    /// Number of chunks.
    pub fn chunk_count(&self) -> u64 {
        self.hashes.len() as u64
    }

    /// Byte length of chunk `index` (the last one may be short); 0 when out of range.
    pub fn chunk_len(&self, index: u64) -> usize {
        let start = index.saturating_mul(u64::from(self.chunk_size));
        if index >= self.chunk_count() {
            return 0;
        }
        (self.len - start).min(u64::from(self.chunk_size)) as usize
    }

    /// Whether `bytes` are exactly chunk `index`.
    pub fn verify_chunk(&self, index: u64, bytes: &[u8]) -> bool {
        usize::try_from(index)
            .ok()
            .and_then(|i| self.hashes.get(i))
            .is_some_and(|h| bytes.len() == self.chunk_len(index) && ChunkHash::of(bytes) == *h)
    }

    /// The hash list as one byte string (32 bytes per chunk), as sent on the wire.
    pub fn hash_bytes(&self) -> Vec<u8> {
        self.hashes.iter().flat_map(|h| h.0).collect()
    }
}

/// Splits a byte string of concatenated 32-byte hashes.
pub fn hashes_from_bytes(bytes: &[u8]) -> Option<Vec<ChunkHash>> {
    if !bytes.len().is_multiple_of(32) {
        return None;
    }
    Some(
        bytes
            .chunks_exact(32)
            .map(|c| {
                let mut h = [0u8; 32];
                h.copy_from_slice(c);
                ChunkHash(h)
            })
            .collect(),
    )
}

fn compute_id(len: u64, chunk_size: u32, hashes: &[ChunkHash]) -> BlobId {
    let mut h = blake3::Hasher::new();
    h.update(DOMAIN);
    h.update(&len.to_le_bytes());
    h.update(&chunk_size.to_le_bytes());
    for c in hashes {
        h.update(&c.0);
    }
    BlobId(*h.finalize().as_bytes())
}

/// Hashes a blob chunk by chunk as it is produced, so a blob of any size is named in one pass
/// without holding it.
#[derive(Debug)]
pub struct ManifestBuilder {
    chunk_size: u32,
    len: u64,
    hashes: Vec<ChunkHash>,
    short_seen: bool,
}

/// Fewest chunks worth a thread of their own in [`Manifest::of_bytes`] (hashing 1 MiB chunks
/// takes about a quarter of a millisecond each; a thread costs tens of microseconds).
const MIN_CHUNKS_PER_THREAD: usize = 8;

impl ManifestBuilder {
    /// Starts a blob cut into chunks of `chunk_size`.
    pub fn new(chunk_size: u32) -> Result<Self, BlobIdError> {
        chunk_count(0, chunk_size)?;
        Ok(Self {
            chunk_size,
            len: 0,
            hashes: Vec::new(),
            short_seen: false,
        })
    }

    /// Adds the next chunk. Every chunk but the last must be exactly `chunk_size` long.
    ///
    /// # Panics
    /// Never on data; a caller that pushes a chunk after a short one gets a debug assertion,
    /// and the resulting manifest will not verify.
    pub fn push_chunk(&mut self, chunk: &[u8]) {
        debug_assert!(!self.short_seen, "chunk pushed after a short chunk");
        debug_assert!(chunk.len() <= self.chunk_size as usize);
        if chunk.len() < self.chunk_size as usize {
            self.short_seen = true;
        }
        self.len += chunk.len() as u64;
        self.hashes.push(ChunkHash::of(chunk));
    }

    /// Bytes hashed so far.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// Whether no byte was hashed yet.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Completes the manifest.
    pub fn finish(self) -> Result<Manifest, BlobIdError> {
        Manifest::new(self.len, self.chunk_size, self.hashes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashing_on_several_threads_gives_the_manifest_of_hashing_in_order() {
        let cs = 64u32;
        // Enough chunks for one thread, for several, and parts of unequal length.
        for len in [0usize, 1, 64, 7 * 64 + 5, 8 * 64, 16 * 64, 16 * 64 + 1, 101 * 64 + 63] {
            let data: Vec<u8> = (0..len).map(|i| (i * 31 % 253) as u8).collect();
            let mut b = ManifestBuilder::new(cs).expect("builder");
            for c in data.chunks(cs as usize) {
                b.push_chunk(c);
            }
            assert_eq!(
                Manifest::of_bytes(&data, cs).expect("manifest"),
                b.finish().expect("in order"),
                "{len}"
            );
        }
        assert!(
            Manifest::of_bytes(&[1, 2, 3], 0).is_err(),
            "a zero chunk size is an error"
        );
    }

    #[test]
    fn chunk_boundaries() {
        let cs = 1024u32;
        for len in [0usize, 1, 1023, 1024, 1025, 4096 + 3] {
            let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let m = Manifest::of_bytes(&data, cs).expect("manifest");
            assert_eq!(m.chunk_count(), (len as u64).div_ceil(1024));
            let total: usize = (0..m.chunk_count()).map(|i| m.chunk_len(i)).sum();
            assert_eq!(total, len);
            for (i, c) in data.chunks(cs as usize).enumerate() {
                assert!(m.verify_chunk(i as u64, c));
            }
        }
    }

    #[test]
    fn id_commits_to_shape_and_content() {
        let a = Manifest::of_bytes(b"hello world", 4).expect("a");
        let b = Manifest::of_bytes(b"hello world", 8).expect("b");
        let c = Manifest::of_bytes(b"hello worle", 4).expect("c");
        assert_ne!(a.id(), b.id());
        assert_ne!(a.id(), c.id());
        let r = a.blob_ref();
        assert!(Manifest::verified(&r, a.hashes.clone()).is_ok());
        assert_eq!(
            Manifest::verified(&r, c.hashes.clone()),
            Err(BlobIdError::IdMismatch(r.id))
        );
        assert!(!a.verify_chunk(0, b"hellx"));
        assert!(!a.verify_chunk(9, b"hell"));
    }

    #[test]
    fn limits() {
        assert_eq!(chunk_count(1, 0), Err(BlobIdError::BadChunkSize(0)));
        assert!(chunk_count(u64::MAX, 1).is_err());
        assert_eq!(chunk_count(0, 1), Ok(0));
        assert_eq!(BlobId::from_hex(&"ab".repeat(32)).map(|b| b.0[0]), Ok(0xab));
        assert!(BlobId::from_hex("zz").is_err());
    }
}
