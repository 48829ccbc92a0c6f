//! Outputs served while they are produced ([`flare_protocols::blob::BlobRequest::pending`]).
//!
//! A FedAvg client that trains a large model as it arrives used to write its whole result to
//! disk, report it, and only then have the controller read it back from that disk to pull
//! it: at 8 GiB the pulls began when the training ended, and half of every round's disk
//! traffic was the results going out and coming back. A [`PendingOutput`] holds each chunk
//! the learner finishes (a copy; the result is still written to disk, for a pull that has to
//! start over) until the controller's pull takes it, so the controller folds the result
//! while it is made.
//!
//! Memory is bounded: a producer that is [`PENDING_CHUNKS`] chunks ahead of the pull waits
//! for it, up to [`PENDING_PATIENCE`]; past that it stops streaming (drops what it holds and
//! goes on), and the controller, which then misses chunks, pulls the stored result instead.
//! A chunk is sent once: one the pull took and lost (a broken stream) is answered absent.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use flare_protocols::blob_id::ChunkHash;
use flare_protocols::{BlobId, BlobRef, Manifest};
use libp2p::PeerId;
use tokio::sync::Notify;

use super::{FetchError, FetchOptions, ServeFaults, SourceError};
use crate::lock;

/// Chunks produced and not yet pulled that an output holds before its producer waits.
pub const PENDING_CHUNKS: usize = 8;

/// How long a producer waits for its puller to make room before it stops streaming.
pub const PENDING_PATIENCE: Duration = Duration::from_secs(30);

/// The longest a source waits for a chunk of a pending output to be produced.
pub const PENDING_WAIT_MS: u32 = 120_000;

/// One output being produced (see the module doc).
pub struct PendingOutput {
    blob: BlobRef,
    state: Mutex<State>,
    /// Signalled when the pull takes a chunk or the output ends (producers wait on it).
    room: Condvar,
    /// Notified when a chunk is produced or the output ends (pulls wait on it).
    changed: Notify,
    patience: Duration,
    /// Buffers of chunks sent, for the next copies: the copies are made on the learner's
    /// thread and freed where they were sent, and glibc kept such memory per thread.
    spare: Mutex<Vec<Vec<u8>>>,
}

#[derive(Default)]
struct State {
    /// Produced and not taken yet.
    held: BTreeMap<u64, Vec<u8>>,
    /// Chunks produced so far, in order.
    produced: u64,
    /// Every chunk produced ([`PendingOutput::finish`]) or none more will be
    /// ([`PendingOutput::abandon`]).
    ended: bool,
}

impl PendingOutput {
    /// An output to be produced as `blob` (its handle, length and chunk size).
    pub fn new(blob: BlobRef) -> Arc<Self> {
        Self::with_patience(blob, PENDING_PATIENCE)
    }

    fn with_patience(blob: BlobRef, patience: Duration) -> Arc<Self> {
        Arc::new(Self {
            blob,
            state: Mutex::default(),
            room: Condvar::new(),
            changed: Notify::new(),
            patience,
            spare: Mutex::default(),
        })
    }

    /// Its handle, length and chunk size.
    pub fn blob(&self) -> BlobRef {
        self.blob
    }

    /// Chunk `index`, the next in order, is produced (on a blocking thread: this waits while
    /// [`PENDING_CHUNKS`] are held). Whether the output still streams: `false` once it was
    /// abandoned, by its producer or for want of a puller.
    pub fn put(&self, index: u64, bytes: Vec<u8>) -> bool {
        let mut st = lock(&self.state);
        if st.ended || index != st.produced {
            return false;
        }
        let give_up = std::time::Instant::now() + self.patience;
        while st.held.len() >= PENDING_CHUNKS && !st.ended {
            let left = give_up.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                tracing::warn!(
                    blob = %self.blob.id,
                    chunk = index,
                    "the output's puller fell {PENDING_CHUNKS} chunks behind for {:?}: it pulls the stored result instead",
                    self.patience
                );
                drop(st);
                self.abandon();
                return false;
            }
            st = self
                .room
                .wait_timeout(st, left)
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
        if st.ended {
            return false;
        }
        st.held.insert(index, bytes);
        st.produced = index + 1;
        drop(st);
        self.changed.notify_waiters();
        true
    }

    /// [`Self::put`] of a copy of `bytes`, made in a buffer sent before when there is one.
    pub fn put_copy(&self, index: u64, bytes: &[u8]) -> bool {
        let mut buf = lock(&self.spare).pop().unwrap_or_default();
        buf.clear();
        buf.extend_from_slice(bytes);
        self.put(index, buf)
    }

    /// Keeps the buffer of a chunk sent for a later copy.
    pub fn recycle(&self, buf: Vec<u8>) {
        let mut spare = lock(&self.spare);
        if spare.len() < PENDING_CHUNKS {
            spare.push(buf);
        }
    }

    /// Every chunk is produced.
    pub fn finish(&self) {
        lock(&self.state).ended = true;
        self.changed.notify_waiters();
    }

    /// No more chunks will be produced or served: what is held goes.
    pub fn abandon(&self) {
        let mut st = lock(&self.state);
        st.ended = true;
        st.held.clear();
        drop(st);
        lock(&self.spare).clear();
        self.room.notify_all();
        self.changed.notify_waiters();
    }

    /// Whether its producer streams it: waits for the first chunk (`true`) or the end
    /// before any chunk (`false`: the learner could not go chunk by chunk, say).
    pub async fn started(&self) -> bool {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let st = lock(&self.state);
                if st.produced > 0 {
                    return true;
                }
                if st.ended {
                    return false;
                }
            }
            notified.await;
        }
    }

    /// Chunk `index` once produced, no longer held after; `None` when it was taken before,
    /// the output was abandoned or ended without it, or `deadline` passed first.
    pub async fn take(&self, index: u64, deadline: tokio::time::Instant) -> Option<Vec<u8>> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = lock(&self.state);
                if let Some(bytes) = st.held.remove(&index) {
                    drop(st);
                    self.room.notify_all();
                    return Some(bytes);
                }
                if index < st.produced || st.ended {
                    return None;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return None;
            }
        }
    }
}

/// Pulls an output that this node produces itself (a swarm's aggregator trains too) as
/// its learner makes it: each chunk goes from [`PendingOutput::take`] to `opts.on_chunk`
/// without a stream. A remote pull goes the same way, so the round treats both alike: the
/// chunks are named (hashed) as they come, and the manifest returned lets the fold check
/// them against the result the producer reports; `opts.before_credit` paces the pull.
/// `me` names this node in errors; `sent` counts the chunks taken, for
/// `faults.drop_pending_after` (tests) and [`super::ServeStats::pending_chunks_here`].
pub(crate) async fn pull_here(
    output: Arc<PendingOutput>,
    opts: &FetchOptions,
    me: PeerId,
    sent: &AtomicU64,
    faults: &ServeFaults,
) -> Result<Manifest, FetchError> {
    let blob = output.blob();
    let n = super::fetch::chunks_within(blob, opts.max_len)?;
    let gone = |i: u64, reason: String| {
        output.abandon();
        FetchError::Incomplete {
            blob: blob.id,
            missing: n - i,
            errors: vec![SourceError::PeerGone { peer: me, reason }],
        }
    };
    let mut hashes = Vec::with_capacity(usize::try_from(n).unwrap_or(0));
    for i in 0..n {
        let deadline = tokio::time::Instant::now() + Duration::from_millis(u64::from(PENDING_WAIT_MS));
        let Some(bytes) = output.take(i, deadline).await else {
            return Err(gone(i, format!("its producer stopped streaming it before chunk {i}")));
        };
        let want = (blob.len - i * u64::from(blob.chunk_size)).min(u64::from(blob.chunk_size));
        if bytes.len() as u64 != want {
            return Err(gone(
                i,
                format!("chunk {i} came with {} bytes, not {want}", bytes.len()),
            ));
        }
        let on_chunk = opts.on_chunk.clone();
        let named = tokio::task::spawn_blocking(move || {
            let hash = ChunkHash::of(&bytes);
            if let Some(f) = on_chunk {
                f(i, &bytes);
            }
            (hash, bytes)
        })
        .await;
        let Ok((hash, bytes)) = named else {
            return Err(gone(i, "the fold of a chunk panicked".into()));
        };
        hashes.push(hash);
        output.recycle(bytes);
        let taken = sent.fetch_add(1, Ordering::Relaxed) + 1;
        if faults.plan().drop_pending_after.is_some_and(|d| taken >= d) {
            tracing::warn!(index = i, "fault injection: the output stops streaming");
            output.abandon();
        }
        if let Some(gate) = &opts.before_credit {
            gate().await;
        }
    }
    Manifest::new(blob.len, blob.chunk_size, hashes).map_err(FetchError::TooLarge)
}

/// The outputs a node serves while they are produced, by handle.
#[derive(Default)]
pub struct PendingOutputs {
    map: Mutex<HashMap<BlobId, Arc<PendingOutput>>>,
}

impl PendingOutputs {
    /// Serves `output` until the guard is dropped (which abandons it).
    pub fn register(self: &Arc<Self>, output: Arc<PendingOutput>) -> PendingGuard {
        lock(&self.map).insert(output.blob.id, output.clone());
        PendingGuard {
            outputs: self.clone(),
            output,
        }
    }

    /// The output served under `id`, if any.
    pub fn get(&self, id: &BlobId) -> Option<Arc<PendingOutput>> {
        lock(&self.map).get(id).cloned()
    }
}

/// Keeps a [`PendingOutput`] served; dropping it ends that and frees what it holds.
pub struct PendingGuard {
    outputs: Arc<PendingOutputs>,
    output: Arc<PendingOutput>,
}

impl PendingGuard {
    /// The output.
    pub fn output(&self) -> &Arc<PendingOutput> {
        &self.output
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.output.abandon();
        let mut map = lock(&self.outputs.map);
        if map
            .get(&self.output.blob.id)
            .is_some_and(|o| Arc::ptr_eq(o, &self.output))
        {
            map.remove(&self.output.blob.id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob() -> BlobRef {
        BlobRef {
            id: BlobId([7; 32]),
            len: 10,
            chunk_size: 4,
        }
    }

    fn soon() -> tokio::time::Instant {
        tokio::time::Instant::now() + Duration::from_secs(5)
    }

    #[tokio::test]
    async fn chunks_are_taken_once_in_any_order_of_put_and_take() {
        let out = PendingOutput::new(blob());
        let producer = {
            let out = out.clone();
            tokio::task::spawn_blocking(move || {
                for i in 0..3u64 {
                    assert!(out.put(i, vec![i as u8; 4]));
                }
                out.finish();
            })
        };
        assert!(out.started().await);
        for i in 0..3u64 {
            assert_eq!(out.take(i, soon()).await, Some(vec![i as u8; 4]));
        }
        producer.await.expect("producer");
        // Taken already, and past the end: absent at once.
        assert_eq!(out.take(1, soon()).await, None);
        assert_eq!(out.take(3, soon()).await, None);
    }

    #[tokio::test]
    async fn a_pull_here_hands_every_chunk_over_in_order_and_names_them() {
        let out = PendingOutput::new(blob());
        let data: Vec<u8> = (0..10).collect();
        let producer = {
            let (out, data) = (out.clone(), data.clone());
            tokio::task::spawn_blocking(move || {
                for (i, c) in data.chunks(4).enumerate() {
                    assert!(out.put_copy(i as u64, c));
                }
                out.finish();
            })
        };
        let got = Arc::new(Mutex::new(Vec::new()));
        let sink = got.clone();
        let opts = FetchOptions {
            on_chunk: Some(Arc::new(move |i: u64, b: &[u8]| lock(&sink).push((i, b.to_vec())))),
            ..FetchOptions::default()
        };
        let sent = AtomicU64::new(0);
        let faults = ServeFaults::default();
        let m = pull_here(out, &opts, PeerId::random(), &sent, &faults)
            .await
            .expect("pulled");
        producer.await.expect("producer");
        let want = Manifest::new(10, 4, data.chunks(4).map(ChunkHash::of).collect()).expect("manifest");
        assert_eq!(m.id(), want.id(), "named as the producer's result");
        let want: Vec<_> = data
            .chunks(4)
            .enumerate()
            .map(|(i, c)| (i as u64, c.to_vec()))
            .collect();
        assert_eq!(*lock(&got), want, "each chunk once, in order");
        assert_eq!(sent.load(Ordering::Relaxed), 3);
    }

    #[tokio::test]
    async fn a_pull_here_whose_producer_stops_says_what_is_missing() {
        let out = PendingOutput::new(blob());
        assert!(out.put(0, vec![0; 4]));
        out.abandon();
        let sent = AtomicU64::new(0);
        let faults = ServeFaults::default();
        let e = pull_here(out, &FetchOptions::default(), PeerId::random(), &sent, &faults)
            .await
            .expect_err("incomplete");
        assert!(
            matches!(e, FetchError::Incomplete { missing: 3, .. }),
            "abandoned with its chunk held: nothing handed over: {e}"
        );
    }

    #[tokio::test]
    async fn an_output_abandoned_before_its_first_chunk_never_started() {
        let out = PendingOutput::new(blob());
        let waiting = tokio::spawn({
            let out = out.clone();
            async move { out.started().await }
        });
        out.abandon();
        assert!(!waiting.await.expect("task"));
        assert!(!out.put(0, vec![0; 4]));
        assert_eq!(out.take(0, soon()).await, None);
    }

    #[tokio::test]
    async fn a_producer_without_a_puller_gives_up_after_its_patience() {
        let out = PendingOutput::with_patience(blob(), Duration::from_millis(50));
        let o = out.clone();
        let streamed =
            tokio::task::spawn_blocking(move || (0..PENDING_CHUNKS as u64 + 1).all(|i| o.put(i, vec![0; 4])))
                .await
                .expect("producer");
        assert!(
            !streamed,
            "the chunk past the bound waits, then the output is abandoned"
        );
        // What it held went with it.
        assert_eq!(out.take(0, soon()).await, None);
    }

    #[tokio::test]
    async fn a_take_makes_room_for_a_waiting_producer() {
        let out = PendingOutput::with_patience(blob(), Duration::from_secs(10));
        let o = out.clone();
        let producer =
            tokio::task::spawn_blocking(move || (0..PENDING_CHUNKS as u64 + 4).all(|i| o.put(i, vec![1; 4])));
        for i in 0..PENDING_CHUNKS as u64 + 4 {
            assert!(out.take(i, soon()).await.is_some(), "chunk {i}");
        }
        assert!(producer.await.expect("producer"));
    }

    #[test]
    fn dropping_the_guard_stops_serving() {
        let outputs = Arc::new(PendingOutputs::default());
        let out = PendingOutput::new(blob());
        let guard = outputs.register(out.clone());
        assert!(outputs.get(&blob().id).is_some());
        drop(guard);
        assert!(outputs.get(&blob().id).is_none());
        assert!(!out.put(0, vec![0; 4]), "abandoned with its guard");
    }
}
