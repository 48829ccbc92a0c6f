//! Streaming aggregation behind the [`Communicator`]: a round's results are pulled and
//! folded into one running weighted mean ([`Accumulator`]) chunk by chunk *while they
//! arrive*, never stored, and a result counts wholly or not at all.
//!
//! A workflow asks for this with [`Communicator::fold_result`] and, in a round where a pull
//! broke off after part of it was folded in, [`Communicator::refold`]. What it takes to do it
//! (the fetch's chunk callback, pass-through pulls, taking a broken result back out of the
//! mean where the store still has its bytes, the memory of the model a round started from)
//! lives here, not in the workflows.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use flare_protocols::model::Layout;
use flare_protocols::{BlobId, BlobRef};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::time::Instant;

use super::TaskOutcome;
use super::communicator::Communicator;
use crate::aggregate::{Accumulator, AggregateError, layout_difference};
use crate::blob::FetchOptions;
use crate::lock;
use crate::lockstep::Lockstep;

/// Chunks in flight per result being pulled (see [`FetchOptions::window`]).
pub const RESULT_WINDOW: u32 = 4;

/// Chunks in flight shared by a round's streamed pulls (each gets 2 to [`RESULT_WINDOW`]):
/// their sources send each chunk as the learner makes it, so a pull needs few, and they all
/// run at once while the controller still serves the model (three at 4 each put a debug
/// controller over its test's bound; two at 2 each were 5-7 % slower than at 4 at 2 GiB;
/// docs/benchmarks.md).
const STREAMED_IN_FLIGHT: u32 = 8;

/// The window of each of `pulls` streamed pulls.
pub(crate) fn streamed_window(pulls: usize) -> u32 {
    (STREAMED_IN_FLIGHT / u32::try_from(pulls.max(1)).unwrap_or(u32::MAX)).clamp(2, RESULT_WINDOW)
}

/// Results pulled at once into a mean in memory: their transfer windows are the controller's
/// memory beyond the accumulator, so this bounds it whatever the number of clients (the
/// pulls are CPU-bound on the controller anyway, so more at once would not finish sooner).
pub const MAX_CONCURRENT_PULLS: usize = 2;

/// Results pulled at once into a mean on disk: every result pulled at once goes in step
/// through the mean's window ([`Lockstep`]), and one that waits for a later pass reads the
/// whole mean back from disk, so here more at once saves a pass over the disk for each pair.
/// Each costs its transfer window ([`RESULT_WINDOW`] chunks) of memory.
pub const MAX_CONCURRENT_PULLS_ON_DISK: usize = 8;

/// The most of the start of a result kept while it is pulled: its header, so that a result of
/// another layout can be described tensor by tensor (a header past this, some thousands of
/// tensors, gets a shorter message).
const HEADER_CAP: u64 = 256 * 1024;

/// How long a pull ahead waits for a slowest pull that does not move (see [`Lockstep`]):
/// longer than a serving stream's, as a pull's chunks are folded, not only sent.
pub const PULL_PATIENCE: Duration = Duration::from_secs(2);

/// The lockstep a mean needs: pulls (counted in chunks folded) within a quarter of its window
/// of each other, so that the chunks of the slowest are still in the window when the fastest
/// adds to them (each pull also has a few chunks in flight); `None` for a mean in memory,
/// which any order suits.
pub(crate) fn lockstep_for_mean(acc: &Accumulator) -> Option<Arc<Lockstep>> {
    acc.window_chunks()
        .map(|w| Arc::new(Lockstep::new((w as u64 / 4).max(1), PULL_PATIENCE)))
}

/// The first `cap` bytes of a result (at most [`HEADER_CAP`]), kept as its chunks arrive in
/// any order.
struct Prefix {
    cap: u64,
    chunk_size: u64,
    chunks: Mutex<Vec<Option<Vec<u8>>>>,
}

impl Prefix {
    fn new(blob: BlobRef, cap: u64) -> Self {
        let cap = cap.min(HEADER_CAP);
        let chunk_size = u64::from(blob.chunk_size.max(1));
        let n = cap.min(blob.len).div_ceil(chunk_size) as usize;
        Self {
            cap,
            chunk_size,
            chunks: Mutex::new(vec![None; n]),
        }
    }

    fn keep(&self, i: u64, bytes: &[u8]) {
        let mut chunks = lock(&self.chunks);
        if let Some(slot @ None) = chunks.get_mut(i as usize) {
            let room = self.cap.saturating_sub(i * self.chunk_size) as usize;
            *slot = Some(bytes[..bytes.len().min(room)].to_vec());
        }
    }

    /// The bytes kept from the start on, up to the first chunk not received.
    fn bytes(&self) -> Vec<u8> {
        lock(&self.chunks)
            .iter()
            .map_while(|c| c.as_deref())
            .flatten()
            .copied()
            .collect()
    }
}

/// Why a result of another layout than the global model's was left out, naming the tensors
/// that differ when its header is known.
fn other_layout(expected: &flare_protocols::model::Layout, prefix: &[u8], out: BlobRef) -> String {
    match layout_difference(expected, prefix) {
        Some(diff) => format!("its result does not fit the global model: {diff}"),
        None => format!(
            "returned a model of another architecture ({} bytes, the global model has {})",
            out.len, expected.len
        ),
    }
}

/// Where a result is pulled from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Pull {
    /// Its client stored it and named it in its result.
    Stored,
    /// Its client is making it (`Request::TaskStreaming`); `window` chunks in flight (see
    /// [`streamed_window`]).
    Streamed { window: u32 },
}

/// A result that was not folded in.
pub(crate) struct FoldFailure {
    /// The result.
    pub outcome: TaskOutcome,
    /// Why it was left out.
    pub why: String,
    /// Part of it is in the mean and could not be taken back out.
    pub tainted: bool,
}

impl Communicator {
    /// Pulls one client's result and folds it into the mean as its chunks arrive, without
    /// storing them; on failure, takes what was folded back out where the store holds those
    /// chunks, and says so where it does not.
    ///
    /// `how` says whether `out` is a stored result or one its client is still making
    /// ([`Pull::Streamed`], see [`crate::blob::pending`]): then what comes is hashed as it
    /// comes, nothing of it is held to take back out, and the outcome comes back with the
    /// output its chunks make (`output`), for the round to check against the one the
    /// client's result names.
    pub(crate) async fn fold_result(
        &self,
        acc: Arc<Mutex<Accumulator>>,
        mut o: TaskOutcome,
        (out, how): (BlobRef, Pull),
        global: BlobRef,
        pulls: &tokio::sync::Semaphore,
        step: Option<&Arc<Lockstep>>,
    ) -> Result<TaskOutcome, FoldFailure> {
        let fail = |outcome, why: &str| FoldFailure {
            outcome,
            why: why.to_owned(),
            tainted: false,
        };
        if o.num_samples == 0 {
            return Err(fail(o, "reported 0 samples"));
        }
        if out.chunk_size != global.chunk_size {
            return Err(fail(o, "returned a model cut in chunks of another size"));
        }
        if out.len != global.len {
            let why = self.describe_other_layout(&acc, &o, out, pulls).await;
            return Err(fail(o, &why));
        }
        let weight = o.num_samples as f64;
        let n = lock(&acc).chunk_count() as usize;
        let folded = Arc::new(Mutex::new(vec![false; n]));
        let failure: Arc<Mutex<Option<AggregateError>>> = Arc::default();
        // A result of the same length differs, if at all, in a header of about the same size:
        // keep that much of each (a copy of a few KiB), to describe it if it does not fit.
        let header = lock(&acc).layout().header.len() as u64;
        let prefix = Arc::new(Prefix::new(out, header.saturating_mul(2).saturating_add(4096)));
        let Ok(_permit) = pulls.acquire().await else {
            return Err(fail(o, "internal error: the pull limit was closed"));
        };
        let pull = step.map(|s| Arc::new(s.join(0)));
        let on_chunk = {
            let (acc, folded, failure, prefix, pull) = (
                acc.clone(),
                folded.clone(),
                failure.clone(),
                prefix.clone(),
                pull.clone(),
            );
            move |i: u64, bytes: &[u8]| {
                prefix.keep(i, bytes);
                if lock(&failure).is_some() {
                    return; // refused already: fold no more of it
                }
                let r = lock(&acc).add_chunk(i, bytes, weight);
                match r {
                    Ok(()) => {
                        lock(&folded)[i as usize] = true;
                        if let Some(p) = &pull {
                            p.advance();
                        }
                    }
                    Err(e) => {
                        lock(&failure).get_or_insert(e);
                    }
                }
            }
        };
        let opts = FetchOptions {
            on_chunk: Some(Arc::new(on_chunk)),
            max_len: global.len,
            // Every client's result is pulled at once: a smaller window per pull keeps the
            // controller's buffers from growing with the number of clients.
            window: match how {
                Pull::Streamed { window } => window,
                Pull::Stored => RESULT_WINDOW,
            },
            // Folded and forgotten: no disk write per result.
            keep: false,
            before_credit: pull.map(|pull| -> crate::blob::CreditGate {
                Arc::new(move || {
                    let pull = pull.clone();
                    Box::pin(async move { pull.in_step().await })
                })
            }),
            ..FetchOptions::default()
        };
        let fetched = match how {
            Pull::Stored => self.fetch(out, o.peer, &opts).await.map(|_| None),
            Pull::Streamed { .. } => self
                .node()
                .fetch_pending(out, o.peer, &opts)
                .await
                .map(|m| Some(m.blob_ref()))
                .map_err(Into::into),
        };
        drop(opts); // this pull stops counting in the lockstep, if any
        let made = fetched.as_ref().ok().copied().flatten();
        let store = self.node().store().clone();
        let done = tokio::task::spawn_blocking(move || {
            let folded = lock(&folded);
            let mut acc = lock(&acc);
            let failed = lock(&failure).take();
            let result = match (fetched, failed) {
                (Err(e), _) => Err(e.to_string()),
                (Ok(_), Some(AggregateError::LayoutMismatch(_))) => {
                    Err(other_layout(acc.layout(), &prefix.bytes(), out))
                }
                (Ok(_), Some(e)) => Err(e.to_string()),
                // Every chunk went through `on_chunk`, those the store already held included.
                (Ok(_), None) => Ok(()),
            };
            let mut tainted = false;
            if result.is_err() {
                // All or nothing: take back whatever of this client was folded in, where the
                // store has the bytes (a result it held whole); otherwise the round refolds.
                for i in (0..folded.len()).filter(|&i| folded[i]) {
                    let removed = match store.read_chunk(&out.id, i as u64) {
                        Ok(Some(bytes)) => acc.remove_chunk(i as u64, &bytes, weight).is_ok(),
                        _ => false,
                    };
                    tainted |= !removed;
                }
            }
            (result, tainted)
        })
        .await;
        match done {
            Ok((Ok(()), _)) => {
                if made.is_some() {
                    o.output = made;
                }
                Ok(o)
            }
            Ok((Err(why), tainted)) => Err(FoldFailure {
                outcome: o,
                why,
                tainted,
            }),
            Err(e) => Err(FoldFailure {
                outcome: o,
                why: e.to_string(),
                // The fold task died: nothing tells what it left in the mean.
                tainted: true,
            }),
        }
    }

    /// Pulls the start of a result whose length differs from the global model's, folding
    /// nothing, to say which tensors differ. A result far larger than the global model is not
    /// pulled: its length says enough.
    async fn describe_other_layout(
        &self,
        acc: &Mutex<Accumulator>,
        o: &TaskOutcome,
        out: BlobRef,
        pulls: &tokio::sync::Semaphore,
    ) -> String {
        let expected = lock(acc).layout().clone();
        if out.len > expected.len.saturating_mul(2).saturating_add(HEADER_CAP) {
            return other_layout(&expected, &[], out);
        }
        let prefix = Arc::new(Prefix::new(out, HEADER_CAP));
        let keep = prefix.clone();
        let opts = FetchOptions {
            on_chunk: Some(Arc::new(move |i: u64, bytes: &[u8]| keep.keep(i, bytes))),
            max_len: out.len,
            window: RESULT_WINDOW,
            keep: false,
            ..FetchOptions::default()
        };
        let Ok(_permit) = pulls.acquire().await else {
            return other_layout(&expected, &[], out);
        };
        if let Err(e) = self.fetch(out, o.peer, &opts).await {
            tracing::debug!(job = %self.job(), member = %o.member, error = %e, "pulling a result of another layout");
        }
        other_layout(&expected, &prefix.bytes(), out)
    }

    /// Folds the contributors' results again into a fresh mean, after a pull that failed midway
    /// left part of a result in the old one (results are not stored, so it cannot be taken back
    /// out): each result is pulled again from its client. One that fails now is left out too, and
    /// if it, in turn, left a part behind, the refold starts over without it; every pass leaves
    /// out at least one more client, so this ends. Costs a second pull of the surviving results,
    /// only in a round where a pull broke.
    pub(crate) async fn refold(
        &self,
        round: u32,
        contributors: &mut Vec<TaskOutcome>,
        missing: &mut Vec<(String, String)>,
        layout: &Layout,
        global: BlobRef,
        pulls: &tokio::sync::Semaphore,
    ) -> Result<Arc<Mutex<Accumulator>>, AggregateError> {
        loop {
            tracing::warn!(
                job = %self.job(),
                round,
                results = contributors.len(),
                "a result broke off midway; folding the others again"
            );
            let acc = self.accumulator(layout, global.chunk_size).await?;
            let step = lockstep_for_mean(&acc);
            let acc = Arc::new(Mutex::new(acc));
            let mut folds: FuturesUnordered<_> = std::mem::take(contributors)
                .into_iter()
                .filter_map(|o| {
                    let out = o.output?;
                    Some(self.fold_result(acc.clone(), o, (out, Pull::Stored), global, pulls, step.as_ref()))
                })
                .collect();
            let mut tainted = false;
            while let Some(r) = folds.next().await {
                match r {
                    Ok(o) => contributors.push(o),
                    Err(f) => {
                        tainted |= f.tainted;
                        missing.push((f.outcome.member, f.why));
                    }
                }
            }
            if !tainted {
                return Ok(acc);
            }
        }
    }

    /// An empty mean of models of `layout`: in memory, or, for a model too large for memory
    /// ([`crate::BlobStore::streams`]), in a scratch file on disk.
    pub(crate) async fn accumulator(&self, layout: &Layout, chunk_size: u32) -> Result<Accumulator, AggregateError> {
        let store = self.node().store().clone();
        if !store.streams(layout.len) {
            return Accumulator::new(layout.clone(), chunk_size);
        }
        let layout = layout.clone();
        tokio::task::spawn_blocking(move || {
            let file = store.scratch(layout.len)?;
            Accumulator::on_disk(layout, chunk_size, file)
        })
        .await
        .map_err(|e| AggregateError::Disk(e.to_string()))?
    }

    /// Makes `bytes`, the model this node lent to its store for the round's pulls (see
    /// [`Communicator::publish_lent`]), the memory of the mean `acc`: on a VM that hands freed
    /// memory back to its host, filling fresh pages costs several times a copy. The lend ends
    /// first, so no new send reads from the bytes; sends under way hold them for a few
    /// milliseconds more, and past [`REUSE_WAIT`] the mean takes fresh memory instead.
    pub(crate) async fn reuse_for_mean(
        &self,
        acc: &Mutex<Accumulator>,
        blob: &BlobId,
        bytes: Arc<Vec<u8>>,
        round: u32,
    ) {
        self.node().store().end_lend(blob);
        // A store in memory keeps the model's bytes as the blob itself: they are never the
        // mean's alone, so waiting for that would only cost the round its wait.
        if self.node().store().dir().is_none() {
            return;
        }
        match sole_owner(bytes).await {
            Some(b) => {
                lock(acc).reuse(b);
                tracing::debug!(job = %self.job(), round, "the mean reuses the model's memory");
            }
            None => tracing::debug!(job = %self.job(), round, "the model's memory is still being sent from"),
        }
    }
}

/// How long the first fold waits for the chunks still being sent from the round's model
/// before it gives up reusing its memory (they take a few milliseconds; a client that stopped
/// reading may hold one for much longer).
const REUSE_WAIT: Duration = Duration::from_millis(50);

/// `bytes` alone, once whoever else holds them lets go within [`REUSE_WAIT`]; `None` after.
async fn sole_owner(mut bytes: Arc<Vec<u8>>) -> Option<Vec<u8>> {
    let deadline = Instant::now() + REUSE_WAIT;
    loop {
        match Arc::try_unwrap(bytes) {
            Ok(v) => return Some(v),
            Err(shared) if Instant::now() < deadline => {
                bytes = shared;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(_) => return None,
        }
    }
}
