//! The receiver side of `/flare/blob/1`: pull a blob from one or more sources. This file is
//! the scheduler (which source is asked for what, retries, distrust); each stream it opens
//! is run by `receiver`, the per-stream state machine of `flare_protocols::blob`.
//!
//! 1. **Manifest**: unless the store already holds the blob's manifest (a resumed transfer),
//!    ask the sources in turn for the hash list and keep the first one that hashes to the id.
//! 2. **Plan**: the chunks still missing, cut into units of contiguous chunks, small enough
//!    that every source gets several.
//! 3. **Workers**: one per source; each takes a unit (the first unit of each source is fixed
//!    in source order, so a test can tell which source serves what), pulls it over one stream
//!    with a bounded window (`receiver::Source::chunks`), and hands each verified chunk to
//!    the store. A unit that fails goes back to the queue minus the chunks already stored,
//!    and the others pick it up.
//! 4. **Faults**: a source that is gone is retried (reconnecting) a few times; one that sends
//!    a chunk that does not match its hash, or breaks the protocol, is reported and not
//!    trusted for that blob again, by this fetch or any later one on this node.

mod in_order;
mod receiver;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flare_protocols::blob::DEFAULT_WINDOW;
use flare_protocols::blob_id::{BlobIdError, ChunkHash};
use flare_protocols::{BlobId, BlobRef, Manifest};
use libp2p::PeerId;
use tokio::sync::Notify;

use self::receiver::{ReceiveError, Source};
use crate::lock;
use crate::network::NetworkHandle;
use crate::store::{BlobStore, StoreError};

/// Called once with every chunk of the blob (index, verified bytes), on a blocking thread, so
/// work on the bytes (streaming aggregation) overlaps the transfer and needs no re-read.
/// Chunks that arrive are handed over as they are stored; chunks the store already held
/// (a resumed transfer, a blob held whole) are read from it and handed over at the end of a
/// successful fetch, with no network for them. A failed fetch may have handed over only some.
pub type ChunkFn = Arc<dyn Fn(u64, &[u8]) + Send + Sync>;

/// Awaited after each chunk is stored and handed to `on_chunk`, before the source is granted
/// the credit to send one more: lets a caller that consumes several fetches at once keep
/// them in step (an aggregator folding results into a window of the mean, see
/// `job::fold`). A source waits for its credits up to [`crate::blob::serve::SERVE_IDLE_TIMEOUT`].
pub type CreditGate = Arc<dyn Fn() -> futures::future::BoxFuture<'static, ()> + Send + Sync>;

/// Called as chunks are stored, for progress bars and logs.
pub type ProgressFn = Arc<dyn Fn(Progress) + Send + Sync>;

/// How far a fetch has come.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Chunks held now.
    pub present: u64,
    /// Chunks in the blob.
    pub total: u64,
}

/// Which chunks of a blob one pull takes ([`FetchOptions::only`]): the pulls of
/// [`Fetcher::fetch_shared`] deal the blob round its owners a few chunks at a time, so that
/// every owner's share arrives from the first chunks to the last at once, and the chunks of
/// the blob land about in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Part {
    /// No chunk: the manifest only.
    Manifest,
    /// Blocks of `block` chunks are dealt round `of` owners in turn; those dealt to owner
    /// `owner` (from 0).
    Dealt {
        /// The owner, from 0.
        owner: u64,
        /// How many owners.
        of: u64,
        /// Chunks a block.
        block: u64,
    },
    /// Every chunk but those marked: what a shared pull's consumer has not got yet (the
    /// chunks it got from the other owners went to it, not into the store).
    Except(Arc<[bool]>),
}

impl Part {
    /// Whether chunk `index` is in the part.
    pub fn contains(&self, index: u64) -> bool {
        match self {
            Part::Manifest => false,
            &Part::Dealt { owner, of, block } => (index / block.max(1)) % of.max(1) == owner,
            Part::Except(done) => !usize::try_from(index)
                .ok()
                .and_then(|i| done.get(i))
                .is_some_and(|&d| d),
        }
    }
}

/// Knobs of a fetch.
#[derive(Clone)]
pub struct FetchOptions {
    /// Chunks a source may send ahead of our credits (memory per source ≈ window × chunk).
    pub window: u32,
    /// Tries per source when the connection fails (the first try included).
    pub attempts: u32,
    /// A source that sends nothing for this long is treated as gone.
    pub stall_timeout: Duration,
    /// How long to keep asking a source that answers `Busy` (at its stream limit): a busy
    /// source is waited for, never counted as gone.
    pub busy_patience: Duration,
    /// Largest unit of work handed to one source at a time, in chunks.
    pub max_unit_chunks: u64,
    /// Largest blob this fetch accepts, in bytes: a blob reference can come from a peer, and
    /// a memory store would try to hold whatever it names.
    pub max_len: u64,
    /// Progress callback.
    pub progress: Option<ProgressFn>,
    /// Every chunk's bytes (see [`ChunkFn`]).
    pub on_chunk: Option<ChunkFn>,
    /// Whether verified chunks go into the store. When false they go only to `on_chunk`,
    /// for a caller that consumes them as they come (an aggregator folding a result it will
    /// not serve again): no disk write per chunk, and the blob is not in the store after.
    /// A blob the store already holds whole is still read from there (nothing is fetched).
    pub keep: bool,
    /// How long a source may wait for chunks it is still receiving itself before it answers
    /// absent ([`flare_protocols::blob::BlobRequest::wait_ms`]): set when pulling from peers
    /// that pull the same blob (see [`Fetcher::fetch_shared`]). 0: sources answer at once.
    pub wait_ms: u32,
    /// Only these chunks; `None`: the whole blob. `on_chunk` then gets every chunk of the
    /// part.
    pub only: Option<Part>,
    /// Paces the credits (see [`CreditGate`]).
    pub before_credit: Option<CreditGate>,
}

impl Default for FetchOptions {
    fn default() -> Self {
        Self {
            window: DEFAULT_WINDOW,
            attempts: 4,
            stall_timeout: Duration::from_secs(30),
            busy_patience: crate::busy::BUSY_PATIENCE,
            max_unit_chunks: 64,
            max_len: u64::MAX,
            progress: None,
            on_chunk: None,
            keep: true,
            wait_ms: 0,
            only: None,
            before_credit: None,
        }
    }
}

impl std::fmt::Debug for FetchOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchOptions")
            .field("window", &self.window)
            .field("attempts", &self.attempts)
            .field("stall_timeout", &self.stall_timeout)
            .field("busy_patience", &self.busy_patience)
            .field("max_unit_chunks", &self.max_unit_chunks)
            .field("max_len", &self.max_len)
            .field("keep", &self.keep)
            .field("wait_ms", &self.wait_ms)
            .field("only", &self.only)
            .finish()
    }
}

/// Something one source did wrong; the fetch may still succeed from others.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    /// The source does not hold the blob.
    #[error("{peer} does not have the blob")]
    NotFound {
        /// The source.
        peer: PeerId,
    },
    /// The source sent a chunk that does not match its hash; nothing of it was stored.
    #[error("{peer} sent chunk {chunk} with the wrong hash")]
    HashMismatch {
        /// The chunk index.
        chunk: u64,
        /// The source.
        peer: PeerId,
    },
    /// The connection failed or stalled.
    #[error("{peer} is gone: {reason}")]
    PeerGone {
        /// The source.
        peer: PeerId,
        /// Why.
        reason: String,
    },
    /// The source refused the request.
    #[error("{peer} refused: {reason}")]
    Refused {
        /// The source.
        peer: PeerId,
        /// Its reason.
        reason: String,
    },
    /// The source stayed busy (at its stream limit) for the whole busy patience.
    #[error("{peer} stayed busy through {tries} tries")]
    Busy {
        /// The source.
        peer: PeerId,
        /// Tries made.
        tries: u32,
    },
    /// The source sent a hash list that does not hash to the blob id.
    #[error("{peer} sent a hash list that does not match the blob id")]
    BadManifest {
        /// The source.
        peer: PeerId,
    },
    /// The source broke the wire protocol.
    #[error("{peer} broke the protocol: {reason}")]
    Protocol {
        /// The source.
        peer: PeerId,
        /// What it did.
        reason: String,
    },
}

impl SourceError {
    /// The source at fault.
    pub fn peer(&self) -> PeerId {
        match self {
            SourceError::NotFound { peer }
            | SourceError::HashMismatch { peer, .. }
            | SourceError::PeerGone { peer, .. }
            | SourceError::Refused { peer, .. }
            | SourceError::Busy { peer, .. }
            | SourceError::BadManifest { peer }
            | SourceError::Protocol { peer, .. } => *peer,
        }
    }

    /// Whether the source lied or broke the protocol (as opposed to being absent).
    pub fn is_misbehaviour(&self) -> bool {
        matches!(
            self,
            SourceError::HashMismatch { .. } | SourceError::BadManifest { .. } | SourceError::Protocol { .. }
        )
    }
}

/// Why a fetch did not complete.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// No source was given, or every source given is distrusted for this blob.
    #[error("no usable source for blob {0}")]
    NoSources(BlobId),
    /// The blob's shape is out of the protocol's limits.
    #[error("blob too large: {0}")]
    TooLarge(BlobIdError),
    /// The blob is larger than [`FetchOptions::max_len`].
    #[error("blob of {len} bytes exceeds this fetch's limit of {max} bytes")]
    OverLimit {
        /// The blob's length.
        len: u64,
        /// The limit.
        max: u64,
    },
    /// No source holds the blob.
    #[error("blob {blob} not found on any source ({} asked)", tried.len())]
    NotFound {
        /// The blob.
        blob: BlobId,
        /// Sources asked.
        tried: Vec<PeerId>,
    },
    /// Sources failed before every chunk arrived; what did arrive is kept for a later resume.
    #[error("blob {blob} incomplete: {missing} chunks missing after {} source errors{}", errors.len(), first_error(errors))]
    Incomplete {
        /// The blob.
        blob: BlobId,
        /// Chunks still missing.
        missing: u64,
        /// What went wrong, per source.
        errors: Vec<SourceError>,
    },
    /// The local store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The store let go of the blob between the start of the fetch and the reading of its
    /// chunks, before any was handed over (a transient blob whose producer let go, or one the
    /// last job holding it released): [`Fetcher::fetch`] pulls it from the sources instead.
    #[error("blob {0} left the local store during the fetch")]
    LeftTheStore(BlobId),
}

/// The chunks of `blob`, after checking its shape and that it is no longer than `max_len`
/// ([`FetchOptions::max_len`]): a blob reference can come from a peer.
pub(crate) fn chunks_within(blob: BlobRef, max_len: u64) -> Result<u64, FetchError> {
    let n = blob.chunk_count().map_err(FetchError::TooLarge)?;
    if blob.len > max_len {
        return Err(FetchError::OverLimit {
            len: blob.len,
            max: max_len,
        });
    }
    Ok(n)
}

/// A blocking task of the store (filing or reading chunks) that panicked or was cancelled,
/// as the store error a fetch reports.
fn store_task_failed(e: tokio::task::JoinError) -> StoreError {
    StoreError::Io {
        path: "<store task>".into(),
        source: std::io::Error::other(e.to_string()),
    }
}

fn first_error(errors: &[SourceError]) -> String {
    errors.first().map(|e| format!(" (first: {e})")).unwrap_or_default()
}

/// What a completed fetch did.
#[derive(Clone, Debug)]
pub struct FetchReport {
    /// The blob, now whole in the store (unless [`FetchOptions::keep`] was false).
    pub blob: BlobRef,
    /// Chunks that were already held when the fetch started.
    pub already_present: u64,
    /// Chunks stored by this fetch.
    pub fetched: u64,
    /// Chunks stored per source.
    pub per_source: BTreeMap<PeerId, u64>,
    /// Source failures along the way (the fetch worked around them).
    pub source_errors: Vec<SourceError>,
}

impl FetchReport {
    /// Adds what another fetch of the same blob stored.
    fn merge(&mut self, other: FetchReport) {
        self.fetched += other.fetched;
        for (peer, n) in other.per_source {
            *self.per_source.entry(peer).or_default() += n;
        }
        self.source_errors.extend(other.source_errors);
    }
}

/// How long a peer relaying a blob it is still receiving waits for each chunk (or the
/// manifest) before it answers absent: long enough for a share to come through a capped
/// origin, short of the receiver's stall timeout.
pub const RELAY_WAIT_MS: u32 = 20_000;

/// Pulls blobs into a store; cheap to clone. Remembers sources that lied about a blob.
#[derive(Clone)]
pub struct Fetcher {
    control: libp2p_stream::Control,
    net: NetworkHandle,
    store: BlobStore,
    distrust: Arc<Mutex<HashSet<(BlobId, PeerId)>>>,
    /// Whether to ask sources for bulk connections ([`crate::NodeConfig::bulk_channel`]).
    bulk: bool,
    /// Sources whose bulk port could not be reached, and when: not asked again for
    /// [`crate::blob::bulk::BULK_RETRY_AFTER`], so a firewall costs one connection timeout,
    /// not one per range.
    unreachable: Arc<Mutex<HashMap<PeerId, tokio::time::Instant>>>,
}

/// The blob one fetch pulls, and where the chunks it verified go.
struct Target {
    manifest: Arc<Manifest>,
    kind: TargetKind,
    /// The chunks handed to `on_chunk` so far: each is handed over once per fetch, whether it
    /// came over the network or from the store.
    handed: Mutex<Vec<bool>>,
    /// Chunk buffers its streams are done with, for its next streams: a fresh buffer per
    /// stream made and freed on whichever threads ran it, which glibc kept as per-thread
    /// free memory (see [`SPARE_BUFFERS`]).
    spare: Mutex<Vec<Vec<u8>>>,
}

/// Chunk buffers one fetch keeps for its next streams.
const SPARE_BUFFERS: usize = 32;

enum TargetKind {
    /// Into the store (and to `on_chunk`).
    Store(BlobStore),
    /// Only to `on_chunk`; which chunks arrived is kept here.
    Pass(Mutex<Vec<bool>>),
    /// An output still being produced, `blob` its producer's handle: nothing to verify
    /// against (the target's manifest only gives the chunks' lengths); each chunk that
    /// arrives is hashed here, for the caller to check the whole against the output's id
    /// once it is known. Only to `on_chunk`.
    Pending {
        blob: BlobRef,
        hashes: Mutex<Vec<Option<ChunkHash>>>,
    },
}

impl Target {
    fn new(manifest: Arc<Manifest>, kind: TargetKind, handed: Vec<bool>) -> Self {
        Self {
            manifest,
            kind,
            handed: Mutex::new(handed),
            spare: Mutex::default(),
        }
    }

    /// A buffer a stream of this fetch is done with.
    fn spare_buffer(&self) -> Option<Vec<u8>> {
        lock(&self.spare).pop()
    }

    /// Keeps `buf` for the fetch's next chunk.
    fn give_back(&self, buf: Vec<u8>) {
        let mut spare = lock(&self.spare);
        if spare.len() < SPARE_BUFFERS {
            spare.push(buf);
        }
    }

    /// The blob as requests name it.
    fn request_ref(&self) -> BlobRef {
        match &self.kind {
            TargetKind::Pending { blob, .. } => *blob,
            _ => self.manifest.blob_ref(),
        }
    }

    /// Whether it is an output still being produced.
    fn is_pending(&self) -> bool {
        matches!(self.kind, TargetKind::Pending { .. })
    }

    /// Verifies chunk `index` and files it; whether it was new.
    fn put(&self, index: u64, bytes: &[u8]) -> Result<bool, StoreError> {
        let id = self.manifest.id();
        match &self.kind {
            TargetKind::Store(store) => store.put_chunk(&id, index, bytes),
            TargetKind::Pending { blob, hashes } => {
                let mut hashes = lock(hashes);
                let slot = hashes
                    .get_mut(index as usize)
                    .filter(|_| bytes.len() == self.manifest.chunk_len(index))
                    .ok_or(StoreError::OutOfRange { id: blob.id, index })?;
                Ok(slot.replace(ChunkHash::of(bytes)).is_none())
            }
            TargetKind::Pass(have) => {
                let slot = usize::try_from(index).map_err(|_| StoreError::OutOfRange { id, index })?;
                if index >= self.manifest.chunk_count() {
                    return Err(StoreError::OutOfRange { id, index });
                }
                if !self.manifest.verify_chunk(index, bytes) {
                    return Err(StoreError::HashMismatch { id, index });
                }
                Ok(!std::mem::replace(&mut lock(have)[slot], true))
            }
        }
    }

    /// Marks chunk `index` handed to `on_chunk`; whether it was not before.
    fn hand_over(&self, index: u64) -> bool {
        let mut handed = lock(&self.handed);
        handed
            .get_mut(index as usize)
            .is_some_and(|h| !std::mem::replace(h, true))
    }

    /// Whether every chunk has been handed to `on_chunk` (the usual end of a fetch that
    /// found nothing held).
    fn all_handed(&self) -> bool {
        lock(&self.handed).iter().all(|&h| h)
    }

    /// The chunks not filed yet.
    fn missing(&self) -> Result<Vec<u64>, StoreError> {
        match &self.kind {
            TargetKind::Store(store) => store.missing(&self.manifest.blob_ref()),
            TargetKind::Pending { hashes, .. } => Ok(lock(hashes)
                .iter()
                .enumerate()
                .filter(|(_, h)| h.is_none())
                .map(|(i, _)| i as u64)
                .collect()),
            TargetKind::Pass(have) => Ok(lock(have)
                .iter()
                .enumerate()
                .filter(|(_, h)| !**h)
                .map(|(i, _)| i as u64)
                .collect()),
        }
    }
}

/// Work shared by the workers of one fetch.
struct Plan {
    queue: Mutex<(VecDeque<Range<u64>>, usize)>,
    changed: Notify,
}

impl Plan {
    /// The next unit, waiting while other workers may still hand work back; `None` when done.
    async fn next(&self) -> Option<Range<u64>> {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut q = lock(&self.queue);
                if let Some(u) = q.0.pop_front() {
                    q.1 += 1;
                    return Some(u);
                }
                if q.1 == 0 {
                    return None;
                }
            }
            notified.await;
        }
    }

    /// Ends a unit; `rest` goes back to the front of the queue.
    fn finish(&self, rest: Vec<Range<u64>>) {
        let mut q = lock(&self.queue);
        for r in rest.into_iter().rev() {
            q.0.push_front(r);
        }
        q.1 -= 1;
        drop(q);
        self.changed.notify_waiters();
    }
}

/// Splits sorted chunk indices into contiguous runs of at most `max` chunks.
fn units(missing: &[u64], max: u64) -> VecDeque<Range<u64>> {
    let mut out = VecDeque::new();
    let mut it = missing.iter().copied();
    let Some(mut start) = it.next() else {
        return out;
    };
    let mut end = start + 1;
    for i in it {
        if i == end && end - start < max {
            end += 1;
        } else {
            out.push_back(start..end);
            start = i;
            end = i + 1;
        }
    }
    out.push_back(start..end);
    out
}

impl Fetcher {
    /// A fetcher that stores into `store`, opening streams with `control`.
    pub fn new(control: libp2p_stream::Control, net: NetworkHandle, store: BlobStore) -> Self {
        Self {
            control,
            net,
            store,
            distrust: Arc::default(),
            bulk: false,
            unreachable: Arc::default(),
        }
    }

    /// Asks sources to send large ranges over bulk connections (or not).
    pub fn with_bulk_channel(mut self, bulk: bool) -> Self {
        self.bulk = bulk;
        self
    }

    /// Whether `peer` served bad data for `blob` before.
    pub fn is_distrusted(&self, blob: &BlobId, peer: &PeerId) -> bool {
        lock(&self.distrust).contains(&(*blob, *peer))
    }

    /// Pulls `blob` from `sources` into the store (or only through `on_chunk`, see
    /// [`FetchOptions::keep`]). Chunks already held are not fetched again; a blob the store
    /// lets go of while this reads it (before any chunk was handed over) is pulled from the
    /// sources after all.
    pub async fn fetch(
        &self,
        blob: BlobRef,
        sources: &[PeerId],
        opts: &FetchOptions,
    ) -> Result<FetchReport, FetchError> {
        match self.fetch_once(blob, sources, opts).await {
            Err(FetchError::LeftTheStore(id)) if !sources.is_empty() => {
                tracing::debug!(blob = %id, "the blob left the store during the fetch: pulling it");
                self.fetch_once(blob, sources, opts).await
            }
            r => r,
        }
    }

    /// Pulls `blob` from `origin` and from `owners`, peers that pull it at the same moment,
    /// so that `origin` sends each chunk about once whatever their number: the chunks are
    /// dealt round the owners in blocks of a few chunks ([`Part::Dealt`]); this node pulls
    /// its own share (where it is an owner) from `origin` and every other share from its
    /// owner, which relays it as it arrives (waiting up to [`RELAY_WAIT_MS`] for each chunk).
    /// Whatever an owner does not give (it is gone, slow past the stall timeout, answers
    /// absent, or lies: a chunk that fails its hash gets the owner distrusted for this blob)
    /// is pulled from `origin` after. The blob is stored (`opts.keep` is taken as true):
    /// others pull this node's share from here. `opts.on_chunk` gets every chunk in order as
    /// the shares bring them (see `in_order`), so a learner trains beside the transfer; the
    /// chunks of the other owners' shares then go to it alone, and into the store only when
    /// they land too far ahead of it to be kept in memory (a node pulling a model as it
    /// trains on it writes its own share, not the whole model, see docs/benchmarks.md).
    pub async fn fetch_shared(
        &self,
        blob: BlobRef,
        origin: &[PeerId],
        owners: &[PeerId],
        opts: &FetchOptions,
    ) -> Result<FetchReport, FetchError> {
        let me = self.net.peer_id();
        let n = chunks_within(blob, opts.max_len)?;
        let k = owners.len() as u64;
        let held_before = self.store.presence(&blob.id).map_or(0, |p| p.present);
        let base = FetchOptions {
            keep: true,
            on_chunk: None,
            only: None,
            ..opts.clone()
        };
        // Each owner gets a few blocks at least; a stripe (a block per owner) fits the chunks
        // an in-order consumer keeps in memory where it can; a block is 4 chunks at least
        // once the blob is large enough (4 MiB at the default chunk size: a range worth a
        // bulk connection).
        let block = (n / (4 * k.max(1))).clamp(1, (in_order::WINDOW / k.max(1)).clamp(4, 8));
        if k < 2 || n.div_ceil(block) < 2 {
            return self
                .fetch(
                    blob,
                    origin,
                    &FetchOptions {
                        keep: true,
                        ..opts.clone()
                    },
                )
                .await;
        }
        // The manifest, from the origin (an owner asked for a share before it has the
        // manifest waits for it).
        let mut report = self
            .fetch_once(
                blob,
                origin,
                &FetchOptions {
                    only: Some(Part::Manifest),
                    ..base.clone()
                },
            )
            .await?;
        let order = opts.on_chunk.as_ref().map(|_| {
            let spilled = self.store.clone();
            let spill: in_order::Spill = Box::new(move |i, bytes| {
                spilled.has_chunk(&blob.id, i)
                    || spilled
                        .put_chunk(&blob.id, i, bytes)
                        .inspect_err(|e| tracing::warn!(blob = %blob.id, chunk = i, error = %e, "filing a chunk that landed ahead failed"))
                        .is_ok()
            });
            in_order::InOrder::new(n, |i| self.store.has_chunk(&blob.id, i), Some(spill))
        });
        let with_order = |o: FetchOptions| FetchOptions {
            on_chunk: order.clone().map(|order| {
                let f: ChunkFn = Arc::new(move |i: u64, b: &[u8]| order.landed(i, b));
                f
            }),
            ..o
        };
        let transfer = async {
            let shares = owners.iter().enumerate().map(|(j, &owner)| {
                let part = Part::Dealt {
                    owner: j as u64,
                    of: k,
                    block,
                };
                let (sources, wait_ms) = match owner == me {
                    true => (origin.to_vec(), 0),
                    false => (vec![owner], RELAY_WAIT_MS),
                };
                let o = with_order(FetchOptions {
                    only: Some(part),
                    wait_ms,
                    // Another owner's share, for the consumer: nobody pulls it from here.
                    keep: owner == me || order.is_none(),
                    ..base.clone()
                });
                async move { (owner, self.fetch_once(blob, &sources, &o).await) }
            });
            let mut report = FetchReport {
                blob,
                already_present: 0,
                fetched: 0,
                per_source: BTreeMap::new(),
                source_errors: Vec::new(),
            };
            for (owner, r) in futures::future::join_all(shares).await {
                match r {
                    Ok(r) => report.merge(r),
                    Err(e) => {
                        tracing::debug!(blob = %blob.id, %owner, error = %e, "a share comes from the origin instead")
                    }
                }
            }
            // The rest from the origin: what the store lacks, and what the consumer has not got.
            let rest = FetchOptions {
                only: order.as_ref().map(|o| Part::Except(o.landed_chunks())),
                ..base.clone()
            };
            report.merge(self.fetch_once(blob, origin, &with_order(rest)).await?);
            Ok::<_, FetchError>(report)
        };
        let (Some(order), Some(f)) = (order.clone(), opts.on_chunk.clone()) else {
            report.merge(transfer.await?);
            report.already_present = held_before;
            return Ok(report);
        };
        let ending = order.ending();
        let transfer = async move {
            let r = transfer.await;
            if r.is_ok() {
                ending.done();
            }
            r
        };
        let (store, gate, runtime) = (
            self.store.clone(),
            opts.before_credit.clone(),
            tokio::runtime::Handle::current(),
        );
        let consumer =
            tokio::task::spawn_blocking(move || order.hand_over(&store, &blob.id, n, &f, gate.as_ref(), &runtime));
        let (transferred, handed) = tokio::join!(transfer, consumer);
        report.merge(transferred?);
        handed.map_err(store_task_failed)??;
        report.already_present = held_before;
        Ok(report)
    }

    /// Pulls an output from `source` while its learner produces it (`blob`: the handle,
    /// length and chunk size of [`flare_protocols::ctl::Request::TaskStreaming`]), handing
    /// each chunk to `opts.on_chunk` and storing nothing; the manifest of what came, whose id
    /// the caller checks against the output the task's result names. The source waits for
    /// each chunk up to [`crate::blob::pending::PENDING_WAIT_MS`]; a chunk it no longer
    /// holds (an earlier stream took it and broke) ends the pull with
    /// [`FetchError::Incomplete`]. Every chunk it sends is handed over, in order.
    pub async fn fetch_pending(
        &self,
        blob: BlobRef,
        source: PeerId,
        opts: &FetchOptions,
    ) -> Result<Manifest, FetchError> {
        let n = chunks_within(blob, opts.max_len)?;
        // Lengths only: no chunk is checked against these hashes.
        let shape = Manifest::new(blob.len, blob.chunk_size, vec![ChunkHash([0; 32]); n as usize])
            .map_err(FetchError::TooLarge)?;
        let target = Arc::new(Target::new(
            Arc::new(shape),
            TargetKind::Pending {
                blob,
                hashes: Mutex::new(vec![None; n as usize]),
            },
            vec![false; n as usize],
        ));
        let opts = FetchOptions {
            wait_ms: crate::blob::pending::PENDING_WAIT_MS,
            // Past the source's wait: a chunk not produced by then comes back absent.
            stall_timeout: opts
                .stall_timeout
                .max(Duration::from_millis(u64::from(crate::blob::pending::PENDING_WAIT_MS)) + Duration::from_secs(30)),
            keep: false,
            only: None,
            ..opts.clone()
        };
        let mut queue = units(&(0..n).collect::<Vec<_>>(), opts.max_unit_chunks.max(1));
        let first = queue.pop_front();
        let plan = Arc::new(Plan {
            queue: Mutex::new((queue, usize::from(first.is_some()))),
            changed: Notify::new(),
        });
        let (_, _, r) = self
            .worker(source, &target, first, plan, Arc::new(AtomicU64::new(0)), &opts)
            .await;
        let errors = r?;
        let hashes = match &target.kind {
            TargetKind::Pending { hashes, .. } => std::mem::take(&mut *lock(hashes)),
            _ => Vec::new(),
        };
        let got = hashes.iter().flatten().count() as u64;
        match hashes.into_iter().collect::<Option<Vec<_>>>() {
            Some(hashes) if got == n => Manifest::new(blob.len, blob.chunk_size, hashes).map_err(FetchError::TooLarge),
            _ => Err(FetchError::Incomplete {
                blob: blob.id,
                missing: n - got,
                errors,
            }),
        }
    }

    async fn fetch_once(
        &self,
        blob: BlobRef,
        sources: &[PeerId],
        opts: &FetchOptions,
    ) -> Result<FetchReport, FetchError> {
        let n = chunks_within(blob, opts.max_len)?;
        let mut errors = Vec::new();
        let mut trusted: Vec<PeerId> = Vec::new();
        for p in sources {
            if !self.is_distrusted(&blob.id, p) && !trusted.contains(p) {
                trusted.push(*p);
            }
        }
        // This node as a source is its own store: never dialled. When it is the only source,
        // what the store lacks is on its way in through another fetch (a member pulling the
        // model its own controller published while another job's pull of the same content
        // fills the store): that is waited for, a stall timeout at most.
        let wanted = |i: &u64| opts.only.as_ref().is_none_or(|p| p.contains(*i));
        let me = self.net.peer_id();
        if trusted.contains(&me) {
            trusted.retain(|p| *p != me);
            if trusted.is_empty() {
                let deadline = tokio::time::Instant::now() + opts.stall_timeout;
                if self.store.wait_for_manifest(&blob.id, deadline).await.is_some() {
                    for i in (0..n).filter(wanted) {
                        if !self.store.wait_for_chunk(&blob.id, i, deadline).await {
                            break;
                        }
                    }
                }
            }
        }
        // Held only as another job's transient result: kept from now on, or it would leave
        // with that result while this job counts on it.
        if opts.keep {
            self.store.make_kept(&blob.id);
        }
        let held = self.store.manifest(&blob.id);
        let keep = opts.keep || self.store.is_complete(&blob.id);
        let manifest = match held {
            Some(m) => m,
            None => {
                let m = self.find_manifest(blob, n, &trusted, opts, &mut errors).await?;
                if keep { self.store.begin(m)? } else { Arc::new(m) }
            }
        };
        let target = Arc::new(Target::new(
            manifest,
            if keep {
                TargetKind::Store(self.store.clone())
            } else {
                TargetKind::Pass(Mutex::new(vec![false; n as usize]))
            },
            if opts.on_chunk.is_some() {
                // Chunks outside the part count as handed over already.
                (0..n).map(|i| !wanted(&i)).collect()
            } else {
                Vec::new()
            },
        ));
        let mut missing = target.missing()?;
        missing.retain(wanted);
        let already_present = match &opts.only {
            None => n - missing.len() as u64,
            Some(_) => ((0..n).filter(wanted).count() - missing.len()) as u64,
        };
        let mut report = FetchReport {
            blob,
            already_present,
            fetched: 0,
            per_source: BTreeMap::new(),
            source_errors: Vec::new(),
        };
        trusted.retain(|p| !self.is_distrusted(&blob.id, p));
        if missing.is_empty() {
            self.hand_over_held(&target, opts).await?;
            report.source_errors = errors;
            return Ok(report);
        }
        if trusted.is_empty() {
            return Err(FetchError::NoSources(blob.id));
        }
        let unit = (missing.len() as u64)
            .div_ceil(4 * trusted.len() as u64)
            .clamp(1, opts.max_unit_chunks.max(1));
        let mut queue = units(&missing, unit);
        // Fix each source's first unit in source order.
        let first: Vec<Option<Range<u64>>> = trusted.iter().map(|_| queue.pop_front()).collect();
        let active = first.iter().filter(|u| u.is_some()).count();
        let plan = Arc::new(Plan {
            queue: Mutex::new((queue, active)),
            changed: Notify::new(),
        });
        let present = Arc::new(AtomicU64::new(already_present));
        let results = futures::future::join_all(
            trusted
                .iter()
                .zip(first)
                .map(|(&peer, unit)| self.worker(peer, &target, unit, plan.clone(), present.clone(), opts)),
        )
        .await;
        errors.extend(results.iter().flat_map(|(_, _, e)| e.iter().flatten().cloned()));
        for (peer, count, _) in &results {
            report.fetched += count;
            if *count > 0 {
                report.per_source.insert(*peer, *count);
            }
        }
        if let Some(e) = results.into_iter().find_map(|(_, _, r)| r.err()) {
            return Err(e);
        }
        let left = target.missing()?.into_iter().filter(wanted).count() as u64;
        if left > 0 {
            return Err(FetchError::Incomplete {
                blob: blob.id,
                missing: left,
                errors,
            });
        }
        self.hand_over_held(&target, opts).await?;
        report.source_errors = errors;
        Ok(report)
    }

    /// Step 1, for a blob whose manifest is not held: asks the sources in turn for the hash
    /// list and returns the first that hashes to the id.
    async fn find_manifest(
        &self,
        blob: BlobRef,
        n: u64,
        trusted: &[PeerId],
        opts: &FetchOptions,
        errors: &mut Vec<SourceError>,
    ) -> Result<Manifest, FetchError> {
        for &peer in trusted {
            match self
                .with_retries(peer, opts, || self.source(peer, opts).hashes(blob, n))
                .await
            {
                Ok(m) => return Ok(m),
                Err(e) => self.note(&blob.id, e, errors),
            }
        }
        if trusted.is_empty() {
            return Err(FetchError::NoSources(blob.id));
        }
        if errors.iter().all(|e| matches!(e, SourceError::NotFound { .. })) {
            return Err(FetchError::NotFound {
                blob: blob.id,
                tried: trusted.to_vec(),
            });
        }
        Err(FetchError::Incomplete {
            blob: blob.id,
            missing: n,
            errors: std::mem::take(errors),
        })
    }

    /// Hands `on_chunk` the chunks this fetch has not handed over: those the store held
    /// before it started (or got from another fetch meanwhile), read from the store on a
    /// blocking thread (a view, not a copy, of a blob held in memory). So a caller gets every
    /// chunk through `on_chunk` and fills in nothing itself.
    async fn hand_over_held(&self, target: &Arc<Target>, opts: &FetchOptions) -> Result<(), FetchError> {
        let Some(f) = opts.on_chunk.clone() else {
            return Ok(());
        };
        // Nothing held: no blocking task (a hop per fetch, and a thread whose allocations
        // glibc would keep in an arena of its own).
        if target.all_handed() {
            return Ok(());
        }
        let (store, target) = (self.store.clone(), target.clone());
        // Paced like chunks from a source (several results of one content, folded from the
        // store, go in step as pulls do).
        let (gate, runtime) = (opts.before_credit.clone(), tokio::runtime::Handle::current());
        tokio::task::spawn_blocking(move || {
            let id = target.manifest.id();
            let mut buf = Vec::new();
            // Whether any chunk of this fetch reached `on_chunk` yet: until one has, a blob
            // the store lost can still be pulled whole instead.
            let mut none_handed = lock(&target.handed).iter().all(|h| !h);
            for i in 0..target.manifest.chunk_count() {
                if lock(&target.handed).get(i as usize).copied().unwrap_or(true) {
                    continue;
                }
                let chunk = match store.read_chunk_to_send(&id, i, buf) {
                    Ok(Some(c)) => c,
                    Ok(None) | Err(StoreError::NotFound(_)) if none_handed => {
                        return Err(FetchError::LeftTheStore(id));
                    }
                    Ok(None) => return Err(StoreError::NotFound(id).into()),
                    Err(e) => return Err(e.into()),
                };
                target.hand_over(i);
                none_handed = false;
                f(i, &chunk);
                buf = chunk.into_buffer().unwrap_or_default();
                if let Some(gate) = &gate {
                    runtime.block_on(gate());
                }
            }
            Ok::<(), FetchError>(())
        })
        .await
        .map_err(store_task_failed)?
    }

    fn note(&self, blob: &BlobId, e: SourceError, errors: &mut Vec<SourceError>) {
        tracing::warn!(blob = %blob, peer = %e.peer(), error = %e, "blob source failed");
        if e.is_misbehaviour() {
            lock(&self.distrust).insert((*blob, e.peer()));
        }
        errors.push(e);
    }

    async fn with_retries<T, F: Future<Output = Result<T, SourceError>>>(
        &self,
        peer: PeerId,
        opts: &FetchOptions,
        mut f: impl FnMut() -> F,
    ) -> Result<T, SourceError> {
        let mut attempt = 1;
        loop {
            match f().await {
                Err(SourceError::PeerGone { reason, .. }) if attempt < opts.attempts => {
                    tracing::debug!(%peer, attempt, %reason, "source gone, retrying");
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
                other => return other,
            }
        }
    }

    /// One source's worker. Returns (peer, chunks stored, errors met or a fatal store error).
    async fn worker(
        &self,
        peer: PeerId,
        target: &Arc<Target>,
        first: Option<Range<u64>>,
        plan: Arc<Plan>,
        present: Arc<AtomicU64>,
        opts: &FetchOptions,
    ) -> (PeerId, u64, Result<Vec<SourceError>, FetchError>) {
        let stored = AtomicU64::new(0);
        let total = target.manifest.chunk_count();
        let mut errors = Vec::new();
        let mut attempt = 1;
        let mut next = first;
        loop {
            let unit = match next.take() {
                Some(u) => u,
                None => match plan.next().await {
                    Some(u) => u,
                    None => break,
                },
            };
            let on_new = || {
                stored.fetch_add(1, Ordering::Relaxed);
                let p = present.fetch_add(1, Ordering::Relaxed) + 1;
                if let Some(cb) = &opts.progress {
                    cb(Progress { present: p, total });
                }
            };
            let r = self.source(peer, opts).chunks(target, unit.clone(), opts, on_new).await;
            let rest = match &r {
                Ok(()) => Vec::new(),
                Err(_) => match target.missing() {
                    Ok(m) => units(
                        &m.into_iter().filter(|i| unit.contains(i)).collect::<Vec<_>>(),
                        u64::MAX,
                    )
                    .into(),
                    Err(e) => {
                        plan.finish(vec![unit]);
                        return (peer, stored.into_inner(), Err(e.into()));
                    }
                },
            };
            plan.finish(rest);
            match r {
                Ok(()) => attempt = 1,
                Err(ReceiveError::Absent) => break,
                Err(ReceiveError::Store(e)) => return (peer, stored.into_inner(), Err(e.into())),
                Err(ReceiveError::Source(e)) => {
                    let retry = matches!(e, SourceError::PeerGone { .. }) && attempt < opts.attempts;
                    self.note(&target.manifest.id(), e, &mut errors);
                    if !retry {
                        break;
                    }
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                }
            }
        }
        (peer, stored.into_inner(), Ok(errors))
    }

    /// The receiver side of one source, for one stream at a time.
    fn source(&self, peer: PeerId, opts: &FetchOptions) -> Source<'_> {
        Source {
            peer,
            control: &self.control,
            net: &self.net,
            stall_timeout: opts.stall_timeout,
            busy_patience: opts.busy_patience,
            wait_ms: opts.wait_ms,
            bulk: self.bulk,
            unreachable: &self.unreachable,
        }
    }
}

fn backoff(attempt: u32) -> Duration {
    Duration::from_millis(50u64 << attempt.min(5))
}

#[cfg(test)]
mod tests {
    use super::units;

    #[test]
    fn units_split_runs_and_respect_the_cap() {
        let u: Vec<_> = units(&[0, 1, 2, 3, 4, 7, 8, 10], 2).into_iter().collect();
        assert_eq!(u, vec![0..2, 2..4, 4..5, 7..9, 10..11]);
        assert!(units(&[], 4).is_empty());
    }
}
