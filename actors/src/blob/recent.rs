//! Chunks a source read from disk lately, for the other streams that serve the same blob, and
//! those streams kept in step so that the chunks are still there when the others want them.
//!
//! A controller whose clients pull the global model from it (without relaying) serves every
//! chunk once per client, and a model on disk is read past the page cache: left alone, each
//! client's stream reads each chunk from disk again (measured: its streams ran 30-40 chunks
//! apart), so the disk reads the model once per client in every round while the clients
//! write their results to the same disk. Here, while two or more streams serve one blob, a
//! chunk read for one of them is kept among the last [`RECENT_CHUNKS`] read, and a stream more
//! than [`LEAD`] chunks ahead of the slowest other one waits before it reads on, so the others
//! find their chunks in memory ([`Lockstep`]: a stream that has not moved for [`PATIENCE`]
//! stops counting until it moves again, so a stalled receiver, or a peer that grants no
//! credits, holds the others up once, not once per chunk). A blob served by one stream alone
//! is read as before, into recycled buffers, and a blob's chunks leave once no stream has
//! served it for the patience (a peer between two of its ranges still counts, see `ended`).

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flare_protocols::BlobId;
use libp2p::PeerId;
use tokio::time::Instant;

use crate::lock;
use crate::lockstep::{Lockstep, Member};
use crate::store::ChunkBytes;

/// Chunks kept, over all blobs (1 MiB each at the default chunk size): enough for a stream
/// [`LEAD`] chunks behind with a few read ahead (24 and 32 read a 2 GiB model once a round
/// alike; 24 is 8 MiB less).
pub const RECENT_CHUNKS: usize = 24;

/// How far (in chunks) a stream may read ahead of the slowest other stream of its blob.
pub const LEAD: u64 = 16;

/// How long a stream waits for a slowest one that does not move.
pub const PATIENCE: Duration = Duration::from_millis(500);

/// Spare buffers kept for the next reads (those of chunks that left, once no view holds
/// them any more).
const SPARE_BUFFERS: usize = 8;

/// See the module doc. Shared behind an `Arc`.
#[derive(Default)]
pub(crate) struct RecentChunks {
    inner: Mutex<Recent>,
}

#[derive(Default)]
struct Recent {
    /// Each blob's streams, by the next chunk each will read.
    serving: HashMap<BlobId, Arc<Lockstep>>,
    /// Each peer's stream that ended lately, still counted where it stopped until its next
    /// stream of the blob begins or [`PATIENCE`] passes: a fetch cuts a blob into ranges and
    /// opens a stream for each, so without this a peer between two ranges counted for
    /// nothing, the others ran ahead alone keeping nothing, and its next range read every
    /// chunk from disk again (measured: the slower of two clients read 70 % of the model
    /// from disk).
    ended: HashMap<(BlobId, PeerId), (Member, Instant)>,
    chunks: HashMap<(BlobId, u64), Kept>,
    /// Oldest first.
    order: VecDeque<(BlobId, u64)>,
    spare: Vec<Vec<u8>>,
}

/// A chunk's bytes, shared with the views sent.
struct Kept {
    bytes: Arc<Vec<u8>>,
    range: std::ops::Range<usize>,
}

impl Kept {
    fn view(&self) -> ChunkBytes {
        ChunkBytes::Held {
            bytes: self.bytes.clone(),
            range: self.range.clone(),
        }
    }
}

/// One stream serving a blob, counted while it lives (and for a while after, see `ended`).
pub(crate) struct Serving {
    recent: Arc<RecentChunks>,
    blob: BlobId,
    peer: PeerId,
    /// `None` only once dropped.
    member: Option<Member>,
}

impl RecentChunks {
    /// Counts a stream serving `blob` to `peer` from chunk `first` until the returned guard
    /// is dropped (and where it stopped for a while after, unless `peer` opens another).
    pub fn serving(self: &Arc<Self>, blob: BlobId, peer: PeerId, first: u64) -> Serving {
        let mut r = lock(&self.inner);
        r.purge();
        // Its next range: the place held since its last one ends.
        drop(r.ended.remove(&(blob, peer)));
        let member = r
            .serving
            .entry(blob)
            .or_insert_with(|| Arc::new(Lockstep::new(LEAD, PATIENCE)))
            .join(first);
        Serving {
            recent: self.clone(),
            blob,
            peer,
            member: Some(member),
        }
    }

    /// Lets go of the places of streams that ended more than [`PATIENCE`] ago, and of the
    /// chunks of blobs nothing serves any more.
    pub fn purge(&self) {
        lock(&self.inner).purge();
    }

    /// Whether more than one stream serves `blob` (or ended lately, its peer between two
    /// ranges): only then are its chunks kept.
    pub fn shared(&self, blob: &BlobId) -> bool {
        lock(&self.inner).serving.get(blob).is_some_and(|s| s.len() > 1)
    }

    /// Chunk `index` of `blob` if it was read lately: a view, no copy.
    pub fn get(&self, blob: &BlobId, index: u64) -> Option<ChunkBytes> {
        lock(&self.inner).chunks.get(&(*blob, index)).map(Kept::view)
    }

    /// A buffer for the next read of a shared blob, if one is spare.
    pub fn buffer(&self) -> Option<Vec<u8>> {
        lock(&self.inner).spare.pop()
    }

    /// Keeps `chunk` (chunk `index` of `blob`, just read) for the other streams, and hands
    /// back a view of it to send; the oldest chunk kept leaves when there are too many.
    pub fn keep(&self, blob: BlobId, index: u64, chunk: ChunkBytes) -> ChunkBytes {
        let kept = match chunk {
            ChunkBytes::Read { buf, start, len } => Kept {
                bytes: Arc::new(buf),
                range: start..start + len,
            },
            ChunkBytes::Owned(buf) => Kept {
                range: 0..buf.len(),
                bytes: Arc::new(buf),
            },
            ChunkBytes::Held { bytes, range } => Kept { bytes, range },
        };
        let view = kept.view();
        let mut r = lock(&self.inner);
        if r.chunks.insert((blob, index), kept).is_none() {
            r.order.push_back((blob, index));
        }
        while r.order.len() > RECENT_CHUNKS {
            if let Some(key) = r.order.pop_front() {
                r.drop_chunk(&key);
            }
        }
        view
    }
}

impl Serving {
    /// Whether chunk `index` is more than [`LEAD`] chunks ahead of the slowest other stream.
    pub fn too_far(&self, index: u64) -> bool {
        self.member.as_ref().is_some_and(|m| m.too_far(index))
    }

    /// Whether another stream of the blob has yet to send chunk `index`: only then is a chunk
    /// this stream reads kept for the others. (A stream that fell behind and reads chunks the
    /// others have sent would otherwise push out of the cache the chunks the others read for
    /// it, and stay behind: measured, the slower of two streams read 70 % of its chunks from
    /// disk.)
    pub fn others_need(&self, index: u64) -> bool {
        self.member.as_ref().is_some_and(|m| m.others_before(index))
    }

    /// Says this stream will read chunk `index` next, and waits while that is more than
    /// [`LEAD`] chunks ahead of the slowest other stream of the blob (see the module doc).
    pub async fn step_to(&self, index: u64) {
        if let Some(m) = &self.member {
            m.move_to(index);
            m.in_step().await;
        }
    }
}

impl Recent {
    fn purge(&mut self) {
        let now = Instant::now();
        let old: Vec<_> = self
            .ended
            .iter()
            .filter(|(_, (_, at))| *at + PATIENCE <= now)
            .map(|(k, _)| *k)
            .collect();
        for key in old {
            drop(self.ended.remove(&key));
        }
        let unused: Vec<_> = self
            .serving
            .iter()
            .filter(|(_, s)| s.len() == 0)
            .map(|(b, _)| *b)
            .collect();
        for blob in unused {
            self.serving.remove(&blob);
            let gone: Vec<_> = self.order.iter().filter(|(b, _)| *b == blob).copied().collect();
            self.order.retain(|(b, _)| *b != blob);
            for key in gone {
                self.drop_chunk(&key);
            }
        }
    }

    fn drop_chunk(&mut self, key: &(BlobId, u64)) {
        if let Some(buf) = self.chunks.remove(key).and_then(|k| Arc::try_unwrap(k.bytes).ok())
            && self.spare.len() < SPARE_BUFFERS
        {
            self.spare.push(buf);
        }
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        // Its place is held where it stopped until the peer's next stream of the blob, or
        // the patience, whichever first (see `Recent::ended`); then it and, if nothing
        // serves the blob any more, the blob's chunks go.
        let Some(member) = self.member.take() else {
            return;
        };
        let mut r = lock(&self.recent.inner);
        drop(r.ended.insert((self.blob, self.peer), (member, Instant::now())));
        r.purge();
        // Something to let go of later only if chunks of the blob are kept (never for a blob
        // served from memory): then once the patience has passed.
        let kept = r.order.iter().any(|(b, _)| *b == self.blob);
        drop(r);
        if kept && let Ok(rt) = tokio::runtime::Handle::try_current() {
            let recent = self.recent.clone();
            rt.spawn(async move {
                tokio::time::sleep(PATIENCE).await;
                recent.purge();
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(byte: u8) -> ChunkBytes {
        ChunkBytes::Read {
            buf: vec![byte; 8],
            start: 2,
            len: 4,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn chunks_are_kept_while_two_peers_are_served_the_blob_or_between_their_ranges() {
        let recent = Arc::new(RecentChunks::default());
        let blob = BlobId([1; 32]);
        let (a, b) = (PeerId::random(), PeerId::random());
        let one = recent.serving(blob, a, 0);
        assert!(!recent.shared(&blob));
        let two = recent.serving(blob, b, 0);
        assert!(recent.shared(&blob));
        let sent = recent.keep(blob, 0, read(7));
        assert_eq!(&*sent, &[7; 4]);
        assert_eq!(recent.get(&blob, 0).as_deref(), Some(&[7u8; 4][..]));
        assert!(recent.get(&blob, 1).is_none());
        // Between two of b's ranges its place is held: its next stream takes it over.
        drop(two);
        assert!(recent.shared(&blob), "b's place is held");
        let two = recent.serving(blob, b, 64);
        assert!(recent.shared(&blob));
        drop(two);
        // ... for the patience only.
        tokio::time::advance(PATIENCE).await;
        recent.purge();
        assert!(!recent.shared(&blob));
        assert!(recent.get(&blob, 0).is_some(), "kept while a stream still serves it");
        drop(one);
        tokio::time::advance(PATIENCE).await;
        recent.purge();
        assert!(recent.get(&blob, 0).is_none(), "gone with the last stream");
        drop(sent);
        assert!(recent.buffer().is_none(), "still held by the view sent when it left");
    }

    #[test]
    fn the_oldest_chunk_leaves_first_and_its_buffer_is_reused() {
        let recent = Arc::new(RecentChunks::default());
        let blob = BlobId([2; 32]);
        let _streams = (
            recent.serving(blob, PeerId::random(), 0),
            recent.serving(blob, PeerId::random(), 0),
        );
        for i in 0..=RECENT_CHUNKS as u64 {
            drop(recent.keep(blob, i, read(i as u8)));
        }
        assert!(recent.get(&blob, 0).is_none(), "the oldest left");
        assert!(recent.get(&blob, 1).is_some());
        assert!(recent.get(&blob, RECENT_CHUNKS as u64).is_some());
        assert_eq!(recent.buffer().map(|b| b.len()), Some(8), "its buffer is spare");
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_ahead_waits_for_the_slowest_until_it_catches_up_or_stalls() {
        let recent = Arc::new(RecentChunks::default());
        let blob = BlobId([3; 32]);
        let (fast, slow) = (
            recent.serving(blob, PeerId::random(), 0),
            recent.serving(blob, PeerId::random(), 0),
        );
        // Alone, or within the lead: no wait.
        tokio::time::timeout(Duration::from_millis(1), fast.step_to(LEAD))
            .await
            .expect("within the lead");
        assert!(fast.too_far(LEAD + 1));
        // Ahead: waits until the slowest moves up.
        let waiting = tokio::spawn(async move {
            fast.step_to(LEAD + 5).await;
            fast
        });
        tokio::time::sleep(PATIENCE / 2).await;
        assert!(!waiting.is_finished(), "waits for the slowest");
        slow.step_to(5).await;
        let fast = tokio::time::timeout(Duration::from_millis(1), waiting)
            .await
            .expect("caught up")
            .expect("task");
        // A slowest that does not move holds it up for PATIENCE at most.
        let t = tokio::time::Instant::now();
        fast.step_to(LEAD * 3).await;
        assert!(t.elapsed() >= PATIENCE && t.elapsed() < PATIENCE * 2);
        // ... once: while it stays where it is, it holds no one up again.
        assert!(!fast.too_far(LEAD * 4));
        tokio::time::timeout(Duration::from_millis(1), fast.step_to(LEAD * 4))
            .await
            .expect("not held up again by a stream that stopped");
        // Once it moves, it counts again.
        slow.step_to(6).await;
        assert!(fast.too_far(LEAD * 4));
        // A stream that ends holds its place for the patience (its peer's next range may
        // follow), then stops counting.
        drop(slow);
        assert!(fast.too_far(LEAD * 10));
        tokio::time::advance(PATIENCE).await;
        assert!(!fast.too_far(LEAD * 10));
    }
}
