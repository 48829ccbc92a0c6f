//! The bulk channel of `/flare/blob/1`: a blob stream's chunks over a TCP connection of their
//! own, sealed with AES-256-GCM under a key the source hands the receiver inside the libp2p
//! stream, while the request, header and credits stay on that stream.
//!
//! Why: on a libp2p stream every chunk is copied four times in user space on its way in
//! (the socket's read buffer, rustls's plaintext buffer, yamux's frame, the reader's buffer)
//! and twice on its way out, and those copies, not the cipher, bound a transfer between
//! processes on two cores (profiles in docs/benchmarks.md). Here the receiver reads each
//! chunk straight from the socket into the buffer the store writes from and decrypts it in
//! place; the source encrypts in the buffer it read from disk.
//!
//! # Wire format
//! ```text
//! R -> S  (libp2p stream) request with `bulk: true`: R can take a bulk connection
//! S -> R  (libp2p stream) header BlobHeader::FoundBulk(BulkOffer { port, token, key })
//! R -> S  (new TCP connection to the source's address, that port) token[16]
//! R -> S  (libp2p stream) bulk answer: u8, 1 = connected (the token is sent), 0 = not
//!         (chunks then come over the libp2p stream, as after `Found`)
//!         then, for each chunk of the range, in order, on the TCP connection:
//! S -> R  head:    tag:u8 index:u64be len:u32be   (as on the libp2p stream)
//!         mac:     16 bytes, AES-256-GCM tag over the body, with the head as associated data
//!         body:    len bytes of ciphertext
//! R -> S  (libp2p stream) credits, as without the bulk channel
//! ```
//! The nonce of the n-th frame (n = 0, 1, ...) of a connection is 4 zero bytes then `n` as
//! u64be, so a frame dropped, replayed or moved fails to open. Each offer has a fresh random
//! key and token, so no nonce repeats under a key.
//!
//! # Trust
//! The key and the token travel only inside the libp2p stream, which is encrypted and
//! authenticated by both peers' libp2p keys: only the member the source is talking to can
//! present the token or open the frames, and only the source can seal them. A connection
//! that presents an unknown token is closed unread.

use aws_lc_rs::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, Tag, UnboundKey};
use serde::{Deserialize, Serialize};

use crate::blob::{ChunkFrame, TAG_ABSENT, TAG_DATA, chunk_head, parse_chunk_head};
use crate::frame::FrameError;

/// Bytes of a connection's token.
pub const TOKEN_LEN: usize = 16;
/// Bytes of a key (AES-256).
pub const KEY_LEN: usize = 32;
/// Bytes of a frame's authentication tag.
pub const MAC_LEN: usize = 16;
/// Bytes before a frame's body: the chunk head, then the tag.
pub const BULK_HEAD_LEN: usize = 13 + MAC_LEN;

/// The receiver's answer after a [`BulkOffer`]: it connected and sent the token.
pub const BULK_CONNECTED: u8 = 1;
/// The receiver's answer after a [`BulkOffer`]: it could not connect; chunks come over the
/// libp2p stream.
pub const BULK_DECLINED: u8 = 0;

/// Where and how to take a stream's chunks over a bulk connection.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkOffer {
    /// The source's TCP port for bulk connections, on the address its libp2p connection
    /// comes from.
    pub port: u16,
    /// What the receiver sends first on the connection, so the source knows which stream it
    /// is for.
    pub token: [u8; TOKEN_LEN],
    /// The AES-256-GCM key the frames are sealed with.
    pub key: [u8; KEY_LEN],
}

impl std::fmt::Debug for BulkOffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key or the token: they end up in logs.
        f.debug_struct("BulkOffer")
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

impl BulkOffer {
    /// A fresh offer for `port`: random token and key from the system's generator.
    pub fn new(port: u16) -> Result<Self, FrameError> {
        let mut token = [0u8; TOKEN_LEN];
        let mut key = [0u8; KEY_LEN];
        aws_lc_rs::rand::fill(&mut token)
            .and_then(|()| aws_lc_rs::rand::fill(&mut key))
            .map_err(|_| FrameError::Malformed("no randomness for a bulk key".into()))?;
        Ok(Self { port, token, key })
    }
}

fn nonce(n: u64) -> Nonce {
    let mut b = [0u8; NONCE_LEN];
    b[NONCE_LEN - 8..].copy_from_slice(&n.to_be_bytes());
    Nonce::assume_unique_for_key(b)
}

fn key(bytes: &[u8; KEY_LEN]) -> LessSafeKey {
    // A 32-byte key is always valid for AES-256-GCM.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).unwrap_or_else(|_| unreachable!("AES-256 key of 32 bytes")))
}

fn auth_failed() -> FrameError {
    FrameError::Malformed("bulk frame failed authentication".into())
}

/// Seals the frames of one bulk connection, in order.
pub struct BulkSealer {
    key: LessSafeKey,
    sent: u64,
}

impl BulkSealer {
    /// The sealer for `offer`'s connection.
    pub fn new(offer: &BulkOffer) -> Self {
        Self {
            key: key(&offer.key),
            sent: 0,
        }
    }

    fn seal(&mut self, head: [u8; 13], body: &mut [u8]) -> Result<[u8; BULK_HEAD_LEN], FrameError> {
        let tag: Tag = self
            .key
            .seal_in_place_separate_tag(nonce(self.sent), Aad::from(head), body)
            .map_err(|_| FrameError::Malformed("sealing a bulk frame failed".into()))?;
        self.sent += 1;
        let mut out = [0u8; BULK_HEAD_LEN];
        out[..13].copy_from_slice(&head);
        out[13..].copy_from_slice(tag.as_ref());
        Ok(out)
    }

    /// Encrypts chunk `index`'s bytes in place and returns the head to send before them.
    pub fn seal_data(&mut self, index: u64, bytes: &mut [u8]) -> Result<[u8; BULK_HEAD_LEN], FrameError> {
        let len = u32::try_from(bytes.len()).map_err(|_| FrameError::TooLarge {
            len: bytes.len() as u64,
            max: u32::MAX.into(),
        })?;
        self.seal(chunk_head(TAG_DATA, index, len), bytes)
    }

    /// The frame that says chunk `index` is absent (no body).
    pub fn seal_absent(&mut self, index: u64) -> Result<[u8; BULK_HEAD_LEN], FrameError> {
        self.seal(chunk_head(TAG_ABSENT, index, 0), &mut [])
    }
}

/// Opens the frames of one bulk connection, in order.
pub struct BulkOpener {
    key: LessSafeKey,
    read: u64,
}

impl BulkOpener {
    /// The opener for `offer`'s connection.
    pub fn new(offer: &BulkOffer) -> Self {
        Self {
            key: key(&offer.key),
            read: 0,
        }
    }

    /// What a head says (not yet authenticated: the caller checks index and length against
    /// what it expects before reading the body, then [`Self::open`]s it).
    pub fn frame(head: &[u8; BULK_HEAD_LEN]) -> Result<ChunkFrame, FrameError> {
        let mut h = [0u8; 13];
        h.copy_from_slice(&head[..13]);
        parse_chunk_head(&h)
    }

    /// Authenticates the frame (`head`, then `body` as read) and decrypts `body` in place.
    pub fn open(&mut self, head: &[u8; BULK_HEAD_LEN], body: &mut [u8]) -> Result<(), FrameError> {
        let n = nonce(self.read);
        self.read += 1;
        self.key
            .open_in_place_separate_tag(n, Aad::from(&head[..13]), &head[13..], body)
            .map(|_| ())
            .map_err(|_| auth_failed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frames(offer: &BulkOffer, chunks: &[(u64, Vec<u8>)]) -> Vec<([u8; BULK_HEAD_LEN], Vec<u8>)> {
        let mut s = BulkSealer::new(offer);
        chunks
            .iter()
            .map(|(i, b)| {
                let mut body = b.clone();
                let head = s.seal_data(*i, &mut body).expect("seal");
                (head, body)
            })
            .collect()
    }

    proptest! {
        #[test]
        fn sealed_frames_open_in_order_and_nothing_else_does(
            chunks in proptest::collection::vec((any::<u64>(), proptest::collection::vec(any::<u8>(), 0..200)), 1..5),
            flip in any::<usize>(),
        ) {
            let offer = BulkOffer::new(1).expect("offer");
            let sent = frames(&offer, &chunks);
            // In order: every frame opens to its chunk.
            let mut o = BulkOpener::new(&offer);
            for ((head, body), (index, bytes)) in sent.iter().zip(&chunks) {
                let f = BulkOpener::frame(head).expect("head");
                prop_assert_eq!(f, ChunkFrame::Data { index: *index, len: bytes.len() as u32 });
                let mut b = body.clone();
                o.open(head, &mut b).expect("opens");
                prop_assert_eq!(&b, bytes);
            }
            // One bit changed anywhere in the head, the tag or the body: it does not open.
            let (head, body) = &sent[0];
            let mut raw = [head.to_vec(), body.clone()].concat();
            let at = flip % (raw.len() * 8);
            raw[at / 8] ^= 1 << (at % 8);
            let mut h = [0u8; BULK_HEAD_LEN];
            h.copy_from_slice(&raw[..BULK_HEAD_LEN]);
            let mut b = raw[BULK_HEAD_LEN..].to_vec();
            prop_assert!(BulkOpener::new(&offer).open(&h, &mut b).is_err());
        }
    }

    #[test]
    fn a_frame_out_of_order_or_under_another_key_does_not_open() {
        let offer = BulkOffer::new(1).expect("offer");
        let sent = frames(&offer, &[(0, vec![1; 64]), (1, vec![2; 64])]);
        // The second frame first (a frame dropped or replayed): the nonce does not match.
        let mut o = BulkOpener::new(&offer);
        let mut b = sent[1].1.clone();
        assert!(o.open(&sent[1].0, &mut b).is_err());
        // Another offer's key.
        let other = BulkOffer::new(1).expect("offer");
        assert_ne!(other.key, offer.key);
        assert_ne!(other.token, offer.token);
        let mut b = sent[0].1.clone();
        assert!(BulkOpener::new(&other).open(&sent[0].0, &mut b).is_err());
        // Absent frames are sealed too.
        let mut s = BulkSealer::new(&offer);
        let head = s.seal_absent(7).expect("seal");
        assert_eq!(BulkOpener::frame(&head).expect("head"), ChunkFrame::Absent { index: 7 });
        BulkOpener::new(&offer).open(&head, &mut []).expect("opens");
        assert_eq!(format!("{offer:?}"), "BulkOffer { port: 1, .. }", "no key in logs");
    }
}
