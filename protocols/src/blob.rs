//! The chunked-stream protocol `/flare/blob/1`: pull a range of a blob's chunks from one source.
//!
//! # Wire format
//! One libp2p stream per request. `R` is the receiver (it pulls), `S` the source. Frames are
//! those of [`crate::frame`] (`length:u32be bytes`); messages are `version:u16be cbor` with
//! version [`BLOB_VERSION`].
//!
//! ```text
//! R -> S  request frame   BlobRequest { blob, first, end, window, want_hashes, wait_ms, bulk, pending }  (<= 4 KiB)
//! S -> R  header frame    BlobHeader::Found | NotFound | Refused { reason }       (<= 4 KiB)
//!                         | Busy { retry_after_ms }
//!         if Found and want_hashes:
//! S -> R  hash frame      32 bytes per chunk of the blob, all chunks, in order
//!         then, for index = first, first+1, ..., end-1, in order:
//! S -> R  chunk           tag:u8  index:u64be  len:u32be  bytes[len]
//!                         tag 0 = data (len = that chunk's length), tag 1 = absent (len = 0)
//! R -> S  credit          count:u32be   (any time after the request; see flow control)
//! ```
//! A receiver that asks with `bulk: true` may get `FoundBulk` instead of `Found`: the chunk
//! frames then travel sealed over a TCP connection of their own, see [`crate::bulk`].
//! A request with `pending: true` names an output its source is still producing, by the
//! handle the source gave in [`crate::ctl::Request::TaskStreaming`]: no hash list exists
//! (`want_hashes` is refused), each chunk frame comes once the chunk is produced, and the
//! receiver hashes what it gets, to check the whole against the output's id later.
//! After the last chunk, `S` closes its write half; so does `R` once it has what it needs.
//!
//! # Flow control
//! `S` may have at most `window` chunks sent but not yet credited. `R` grants one credit per
//! chunk once that chunk is *verified and stored*, so the bytes in flight per transfer never
//! exceed `window × chunk_size` whatever the blob size, a slow disk slows the sender
//! (backpressure), and after a cut at most `window` chunks are sent twice.
//!
//! # Receiver state machine
//! `Start` (send request) → `Header` (read; `NotFound`/`Refused` end here; `Busy` ends this
//! stream, and the receiver asks again after at least `retry_after_ms`, never counting it a
//! fault of the source) → `Hashes` (only when
//! asked; the list must hash to the requested id, else `IdMismatch`) → `Chunks` (each frame must
//! carry the next expected index and exactly that chunk's length, checked before reading the
//! bytes; the bytes must hash to the list's entry, else `HashMismatch`) → `Done`.
//! Lengths are never trusted from the source: the receiver derives them from the [`BlobRef`]
//! it asked for, which the id commits to.
//!
//! # Limits
//! `window` is clamped to `1..=`[`MAX_WINDOW`]; a range must lie inside the blob; chunk sizes
//! and chunk counts are those of [`crate::blob_id`].

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;
use serde::{Deserialize, Serialize};

use crate::BlobRef;
use crate::frame::{FrameError, read_message, write_message};

/// Protocol name negotiated on the stream.
pub const BLOB_PROTOCOL: StreamProtocol = StreamProtocol::new("/flare/blob/1");
/// Version field of request and header frames.
pub const BLOB_VERSION: u16 = 1;
/// Cap of the request and header frames.
pub const MAX_BLOB_MSG: u32 = 4096;
/// Largest window a source honours.
pub const MAX_WINDOW: u32 = 64;
/// Window a receiver asks for unless told otherwise: 16 chunks (16 MiB at 1 MiB chunks).
pub const DEFAULT_WINDOW: u32 = 16;

pub(crate) const TAG_DATA: u8 = 0;
pub(crate) const TAG_ABSENT: u8 = 1;

/// What the receiver asks of one source.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub struct BlobRequest {
    /// The blob.
    pub blob: BlobRef,
    /// First chunk index wanted.
    pub first: u64,
    /// One past the last chunk index wanted.
    pub end: u64,
    /// Chunks the source may send ahead of credits.
    pub window: u32,
    /// Whether the source must send the hash list first.
    pub want_hashes: bool,
    /// How long the source may wait for a chunk (or the blob's manifest) it is still
    /// receiving itself before it answers absent (not found): a peer pulling the same blob
    /// relays its share to the others as it arrives. 0 (the default): answer at once.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub wait_ms: u32,
    /// Whether the receiver can take the chunks over a bulk connection ([`crate::bulk`]).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub bulk: bool,
    /// `blob` is an output still being produced, named by the handle its producer gave in
    /// [`crate::ctl::Request::TaskStreaming`]: there is no hash list (`want_hashes` is
    /// refused), each chunk comes once it is produced (the source waits up to `wait_ms` for
    /// it), and the receiver hashes what it gets; the source holds each chunk until it is
    /// sent, and answers absent for one it no longer holds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending: bool,
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

/// The source's answer to a [`BlobRequest`].
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum BlobHeader {
    /// Chunks follow (and the hash list first, when asked).
    Found,
    /// As `Found`, with the chunks offered over a bulk connection (only to a request with
    /// `bulk: true`): the receiver answers with [`write_bulk_answer`].
    FoundBulk(crate::bulk::BulkOffer),
    /// The source does not hold this blob.
    NotFound,
    /// The request was invalid or the source will not serve it.
    Refused {
        /// Why.
        reason: String,
    },
    /// The source serves as many streams as it allows itself: ask again later. A busy
    /// source is alive and holds the blob as far as the receiver knows; its memory stays
    /// bounded because it serves a fixed number of streams at once.
    Busy {
        /// The least time to wait before asking again.
        retry_after_ms: u32,
    },
}

/// Header of one chunk frame, as read off the wire.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum ChunkFrame {
    /// The chunk's bytes follow.
    Data {
        /// Chunk index.
        index: u64,
        /// Byte count that follows.
        len: u32,
    },
    /// The source does not hold this chunk (it holds the blob only in part).
    Absent {
        /// Chunk index.
        index: u64,
    },
}

impl ChunkFrame {
    /// The chunk index.
    pub fn index(&self) -> u64 {
        match *self {
            ChunkFrame::Data { index, .. } | ChunkFrame::Absent { index } => index,
        }
    }
}

/// Writes a request frame and flushes.
pub async fn write_request<W: AsyncWrite + Unpin>(io: &mut W, req: &BlobRequest) -> Result<(), FrameError> {
    write_message(io, BLOB_VERSION, req).await?;
    io.flush().await?;
    Ok(())
}

/// Reads a request frame.
pub async fn read_request<R: AsyncRead + Unpin>(io: &mut R) -> Result<BlobRequest, FrameError> {
    read_message(io, BLOB_VERSION, MAX_BLOB_MSG).await
}

/// Writes a header frame (does not flush).
pub async fn write_header<W: AsyncWrite + Unpin>(io: &mut W, h: &BlobHeader) -> Result<(), FrameError> {
    write_message(io, BLOB_VERSION, h).await
}

/// Reads a header frame.
pub async fn read_header<R: AsyncRead + Unpin>(io: &mut R) -> Result<BlobHeader, FrameError> {
    read_message(io, BLOB_VERSION, MAX_BLOB_MSG).await
}

/// A chunk frame's head.
pub(crate) fn chunk_head(tag: u8, index: u64, len: u32) -> [u8; 13] {
    let mut head = [0u8; 13];
    head[0] = tag;
    head[1..9].copy_from_slice(&index.to_be_bytes());
    head[9..13].copy_from_slice(&len.to_be_bytes());
    head
}

/// What a chunk frame's head says.
pub(crate) fn parse_chunk_head(head: &[u8; 13]) -> Result<ChunkFrame, FrameError> {
    let mut index = [0u8; 8];
    index.copy_from_slice(&head[1..9]);
    let index = u64::from_be_bytes(index);
    let mut len = [0u8; 4];
    len.copy_from_slice(&head[9..13]);
    let len = u32::from_be_bytes(len);
    match head[0] {
        TAG_DATA => Ok(ChunkFrame::Data { index, len }),
        TAG_ABSENT if len == 0 => Ok(ChunkFrame::Absent { index }),
        tag => Err(FrameError::Malformed(format!(
            "chunk frame with tag {tag} and length {len}"
        ))),
    }
}

/// Writes a data chunk frame (does not flush).
pub async fn write_chunk<W: AsyncWrite + Unpin>(io: &mut W, index: u64, bytes: &[u8]) -> Result<(), FrameError> {
    let len = u32::try_from(bytes.len()).map_err(|_| FrameError::TooLarge {
        len: bytes.len() as u64,
        max: u32::MAX.into(),
    })?;
    io.write_all(&chunk_head(TAG_DATA, index, len)).await?;
    io.write_all(bytes).await?;
    Ok(())
}

/// Writes an absent-chunk frame (does not flush).
pub async fn write_absent<W: AsyncWrite + Unpin>(io: &mut W, index: u64) -> Result<(), FrameError> {
    io.write_all(&chunk_head(TAG_ABSENT, index, 0)).await?;
    Ok(())
}

/// Reads a chunk frame's header; the caller checks index and length, then reads the bytes.
pub async fn read_chunk_header<R: AsyncRead + Unpin>(io: &mut R) -> Result<ChunkFrame, FrameError> {
    let mut head = [0u8; 13];
    io.read_exact(&mut head).await?;
    parse_chunk_head(&head)
}

/// The receiver's answer to a `FoundBulk` header ([`crate::bulk::BULK_CONNECTED`] or
/// [`crate::bulk::BULK_DECLINED`]), flushed.
pub async fn write_bulk_answer<W: AsyncWrite + Unpin>(io: &mut W, answer: u8) -> Result<(), FrameError> {
    io.write_all(&[answer]).await?;
    io.flush().await?;
    Ok(())
}

/// Reads the receiver's answer to a `FoundBulk` header: whether it connected.
pub async fn read_bulk_answer<R: AsyncRead + Unpin>(io: &mut R) -> Result<bool, FrameError> {
    let mut b = [0u8; 1];
    io.read_exact(&mut b).await?;
    match b[0] {
        crate::bulk::BULK_CONNECTED => Ok(true),
        crate::bulk::BULK_DECLINED => Ok(false),
        other => Err(FrameError::Malformed(format!("bulk answer {other}"))),
    }
}

/// Grants the source `count` more chunks, and flushes.
pub async fn write_credit<W: AsyncWrite + Unpin>(io: &mut W, count: u32) -> Result<(), FrameError> {
    io.write_all(&count.to_be_bytes()).await?;
    io.flush().await?;
    Ok(())
}

/// Reads one credit frame.
pub async fn read_credit<R: AsyncRead + Unpin>(io: &mut R) -> Result<u32, FrameError> {
    let mut b = [0u8; 4];
    io.read_exact(&mut b).await?;
    Ok(u32::from_be_bytes(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BlobId, Manifest};
    use futures::executor::block_on;
    use proptest::prelude::*;

    fn any_ref() -> impl Strategy<Value = BlobRef> {
        (any::<[u8; 32]>(), any::<u64>(), any::<u32>()).prop_map(|(id, len, chunk_size)| BlobRef {
            id: BlobId(id),
            len,
            chunk_size,
        })
    }

    proptest! {
        #[test]
        fn request_round_trips(blob in any_ref(), first: u64, end: u64, window: u32, want_hashes: bool, wait_ms: u32) {
            let req = BlobRequest { blob, first, end, window, want_hashes, wait_ms, bulk: wait_ms % 2 == 0, pending: wait_ms % 3 == 0 };
            let mut buf = Vec::new();
            block_on(write_request(&mut buf, &req)).expect("write");
            let back = block_on(read_request(&mut buf.as_slice())).expect("read");
            prop_assert_eq!(back, req);
        }

        #[test]
        fn chunk_frames_round_trip(index: u64, bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = Vec::new();
            block_on(write_chunk(&mut buf, index, &bytes)).expect("write");
            block_on(write_absent(&mut buf, index ^ 1)).expect("write");
            let mut rd = buf.as_slice();
            let h = block_on(read_chunk_header(&mut rd)).expect("header");
            prop_assert_eq!(h, ChunkFrame::Data { index, len: bytes.len() as u32 });
            prop_assert_eq!(&rd[..bytes.len()], &bytes[..]);
            rd = &rd[bytes.len()..];
            prop_assert_eq!(block_on(read_chunk_header(&mut rd)).expect("absent"), ChunkFrame::Absent { index: index ^ 1 });
        }

        #[test]
        fn garbage_is_a_typed_error(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            // Whatever the bytes, decoding ends in a value or an error, never a panic.
            let _ = block_on(read_request(&mut bytes.as_slice()));
            let _ = block_on(read_header(&mut bytes.as_slice()));
            let _ = block_on(read_chunk_header(&mut bytes.as_slice()));
        }
    }

    #[test]
    fn header_round_trips_and_truncation_fails() {
        for h in [
            BlobHeader::Found,
            BlobHeader::NotFound,
            BlobHeader::Refused { reason: "x".into() },
            BlobHeader::Busy { retry_after_ms: 250 },
        ] {
            let mut buf = Vec::new();
            block_on(write_header(&mut buf, &h)).expect("write");
            assert_eq!(block_on(read_header(&mut buf.as_slice())).expect("read"), h);
            let cut = &buf[..buf.len() - 1];
            assert!(matches!(block_on(read_header(&mut &cut[..])), Err(FrameError::Io(_))));
        }
        let m = Manifest::of_bytes(b"abc", 2).expect("m");
        assert_eq!(m.hash_bytes().len(), 64);
    }
}
