//! FedAvg, server-centric: each round, send the global model to the clients, fold each
//! result into one running weighted mean *while it is being pulled* (chunk by chunk, see
//! [`crate::aggregate`]), and finish the round when every client has answered, or at the
//! round timeout if at least `min_clients` have.
//!
//! Results are folded as they stream in and never stored: the controller writes no client's
//! result to disk, whatever the number of clients. A result counts wholly or not at all: when
//! a pull fails midway, after part of it was folded in, the round folds the other results
//! again from their clients into a fresh mean (see [`refold`]). After each
//! round the global model and a JSON record are written to the checkpoint directory, in the
//! background once the model is on disk (hard-linked from the blob store when it is on disk).
//! Between rounds the global model lives only in the blob store, so the controller holds one
//! model-sized buffer at a time.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use flare_protocols::BlobRef;
use flare_protocols::ctl::{TaskStatus, Value};
use flare_protocols::model::{Layout, Model, ModelError};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::PeerId;
use serde::Serialize;
use tokio::time::Instant;

use super::communicator::{CommError, Communicator};
use super::{Task, TaskKind, TaskOutcome};
use crate::aggregate::{Accumulator, AggregateError};
use crate::blob::FetchOptions;
use crate::lock;
use crate::store::{BlobStore, Written};

/// Chunks in flight per result being pulled (see [`FetchOptions::window`]).
pub const RESULT_WINDOW: u32 = 4;

/// Results pulled at once: their transfer windows are the controller's memory beyond the
/// accumulator, so this bounds it whatever the number of clients (the pulls are CPU-bound
/// on the controller anyway, so more at once would not finish sooner).
pub const MAX_CONCURRENT_PULLS: usize = 2;

/// Measures a global model (e.g. on a held-out test set) after each round; runs on a
/// blocking thread.
pub type Evaluator = Arc<dyn Fn(&Model) -> Result<BTreeMap<String, f64>, String> + Send + Sync>;

/// Parameters of a FedAvg job.
#[derive(Clone)]
pub struct FedAvgConfig {
    /// Rounds to run.
    pub rounds: u32,
    /// Fewest results a round may finish with (at its timeout).
    pub min_clients: usize,
    /// How long a round waits for results.
    pub round_timeout: Duration,
    /// The clients, in the order they are asked.
    pub clients: Vec<PeerId>,
    /// Where each round's checkpoint goes (none: no checkpoints).
    pub checkpoint_dir: Option<PathBuf>,
    /// Measures each round's global model (none: no global metrics).
    pub evaluate: Option<Evaluator>,
}

/// What one round did.
#[derive(Clone, Debug, Serialize)]
pub struct RoundReport {
    /// Round number, from 0.
    pub round: u32,
    /// Members whose results were averaged.
    pub contributors: Vec<String>,
    /// Members that did not contribute, with why.
    pub missing: Vec<(String, String)>,
    /// Wall-clock seconds of the round, from sending the tasks to the new global model being
    /// stored (checkpoint excluded).
    pub secs: f64,
    /// Clients' metrics, weighted by their sample counts.
    pub metrics: BTreeMap<String, f64>,
    /// The new global model's metrics, from [`FedAvgConfig::evaluate`].
    pub global: BTreeMap<String, f64>,
}

/// The end of a FedAvg job.
#[derive(Clone, Debug)]
pub struct FedAvgOutcome {
    /// The final global model.
    pub model: Model,
    /// One report per round.
    pub rounds: Vec<RoundReport>,
}

/// Why a FedAvg job stopped.
#[derive(Debug, thiserror::Error)]
pub enum FedAvgError {
    /// The configuration cannot work.
    #[error("bad FedAvg configuration: {0}")]
    Config(String),
    /// A round ended with fewer results than `min_clients`.
    #[error(
        "round {round}: {got} of the {need} required results; missing: {}",
        fmt_missing(missing)
    )]
    TooFewClients {
        /// The round.
        round: u32,
        /// Results averaged.
        got: usize,
        /// `min_clients`.
        need: usize,
        /// Who did not contribute, with why.
        missing: Vec<(String, String)>,
    },
    /// Publishing or pulling failed locally.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// The results could not be averaged.
    #[error(transparent)]
    Aggregate(#[from] AggregateError),
    /// The averaged model is not a valid model.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The global model could not be measured.
    #[error("evaluating the global model: {0}")]
    Evaluate(String),
    /// A bug: the accumulator was still shared when the round ended.
    #[error("internal error: {0}")]
    Internal(&'static str),
    /// The checkpoint could not be written.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint {
        /// The file.
        path: PathBuf,
        /// Why.
        reason: String,
    },
}

fn fmt_missing(m: &[(String, String)]) -> String {
    m.iter()
        .map(|(n, why)| format!("{n} ({why})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Runs FedAvg from `initial` for `cfg.rounds` rounds.
pub async fn run(comm: &Communicator, cfg: &FedAvgConfig, initial: Model) -> Result<FedAvgOutcome, FedAvgError> {
    if cfg.min_clients == 0 || cfg.min_clients > cfg.clients.len() {
        return Err(FedAvgError::Config(format!(
            "min_clients is {} with {} clients",
            cfg.min_clients,
            cfg.clients.len()
        )));
    }
    // The global model lives in the blob store between rounds: the controller holds one
    // model-sized buffer at a time (the accumulator during a round).
    let layout = initial.layout();
    let (mut blob, mut lent, mut written) = comm.publish_lent(initial).await?;
    let mut reports = Vec::new();
    // Checkpoints are written in the background, one after the other, as each round's model
    // reaches the disk; an error surfaces at the next round or at the end.
    let mut saving: Option<tokio::task::JoinHandle<Result<(), FedAvgError>>> = None;
    for round in 0..cfg.rounds {
        let started = Instant::now();
        let global = Global {
            blob,
            lent: Some(lent),
            written,
        };
        let (model, mut report) = one_round(comm, cfg, global, &[], layout.clone(), round, None).await?;
        (blob, lent, written) = comm.publish_lent(model).await?;
        // A round's time covers publishing its result (what the next round starts from).
        report.secs = started.elapsed().as_secs_f64();
        tracing::info!(
            job = %comm.job(),
            round,
            contributors = report.contributors.len(),
            secs = report.secs,
            global = ?report.global,
            "round done"
        );
        reports.push(report);
        if saving.as_ref().is_some_and(|s| s.is_finished()) {
            finish_saving(saving.take()).await?;
        }
        if let Some(dir) = &cfg.checkpoint_dir {
            let (dir, store, reports, written, before) = (
                dir.clone(),
                comm.node().store().clone(),
                reports.clone(),
                written.clone(),
                saving.take(),
            );
            saving = Some(tokio::spawn(async move {
                finish_saving(before).await?;
                written.wait().await;
                tokio::task::spawn_blocking(move || checkpoint(&dir, round, &store, blob, &reports))
                    .await
                    .map_err(|_| FedAvgError::Internal("checkpoint task failed"))?
            }));
        }
    }
    finish_saving(saving).await?;
    // The last model published is the outcome; its bytes are still held, and the store's own
    // hold ends with its write.
    written.wait().await;
    let bytes = Arc::try_unwrap(lent).unwrap_or_else(|shared| (*shared).clone());
    Ok(FedAvgOutcome {
        model: Model::from_safetensors_vec(bytes)?,
        rounds: reports,
    })
}

/// Waits for a background checkpoint and passes on its error.
async fn finish_saving(saving: Option<tokio::task::JoinHandle<Result<(), FedAvgError>>>) -> Result<(), FedAvgError> {
    match saving {
        Some(s) => s.await.map_err(|_| FedAvgError::Internal("checkpoint task failed"))?,
        None => Ok(()),
    }
}

/// The model a round starts from.
pub(crate) struct Global {
    /// Its blob.
    pub blob: BlobRef,
    /// Its bytes, when this node holds them: the clients' pulls read them from memory.
    pub lent: Option<Arc<Vec<u8>>>,
    /// Resolves when its disk write is done ([`Written::done`] when there is none): results
    /// are not folded before.
    pub written: Written,
}

/// One round: send `blob` (pulled from `input_from`, or from this node when empty) to the
/// clients, fold their results as they stream in, and return the new model. `sent` is
/// notified once the tasks are out.
///
/// The model's bytes, when given with the blob, are held (so the clients' pulls read them
/// from memory, see [`Communicator::publish_lent`]) until the first result comes in: then
/// they become the accumulator's memory, and the controller holds one model-sized buffer
/// again. So that the store does not still hold them for its disk write, the folds wait for
/// that write first (it overlaps the clients' work, and is usually long done).
pub(crate) async fn one_round(
    comm: &Communicator,
    cfg: &FedAvgConfig,
    Global {
        blob,
        mut lent,
        written,
    }: Global,
    input_from: &[PeerId],
    layout: Layout,
    round: u32,
    sent: Option<&tokio::sync::Notify>,
) -> Result<(Model, RoundReport), FedAvgError> {
    let start = Instant::now();
    let deadline = start + cfg.round_timeout;
    let acc = Arc::new(Mutex::new(Accumulator::new(layout.clone(), blob.chunk_size)?));
    let task = Task {
        kind: TaskKind::Train,
        round,
        input: Some(blob),
        input_from: input_from.to_vec(),
        props: BTreeMap::from([("total_rounds".to_owned(), Value::Int(i64::from(cfg.rounds)))]),
        // The controller folds each result as it arrives and forgets it.
        transient_output: true,
    };
    let mut pending = comm.broadcast(&task, &cfg.clients).await;
    if let Some(n) = sent {
        n.notify_one();
    }
    let mut missing: Vec<(String, String)> = std::mem::take(&mut pending.refused)
        .into_iter()
        .map(|(m, why)| (m.name, why))
        .collect();
    let mut contributors: Vec<TaskOutcome> = Vec::new();
    let pulls = tokio::sync::Semaphore::new(MAX_CONCURRENT_PULLS);
    // The model's bytes, once the first result is in: the first fold makes them the
    // accumulator's memory when no one else holds them any more.
    let spare: Mutex<Option<Arc<Vec<u8>>>> = Mutex::new(None);
    let mut folds = FuturesUnordered::new();
    let mut tainted = false;
    loop {
        tokio::select! {
            r = comm.next_result(&mut pending, deadline), if !pending.waiting.is_empty() => match r {
                Some(o) => {
                    tracing::debug!(job = %comm.job(), round, member = %o.member, secs = start.elapsed().as_secs_f64(), "result announced");
                    // The accumulator starts filling: the model goes back to being read
                    // from disk by any client still pulling it, or becomes the accumulator.
                    if let Some(l) = lent.take() {
                        *lock(&spare) = Some(l);
                    }
                    match (o.status, o.output) {
                        (TaskStatus::Ok, Some(out)) => {
                            let (written, acc, pulls, spare) = (written.clone(), acc.clone(), &pulls, &spare);
                            folds.push(async move {
                                written.wait().await;
                                let taken = lock(spare).take();
                                if let Some(b) = taken {
                                    // No more chunks are sent from memory; those being sent
                                    // hold the bytes until they are out.
                                    comm.node().store().end_lend(&blob.id);
                                    match sole_owner(b).await {
                                        Some(b) => {
                                            lock(&acc).reuse(b);
                                            tracing::debug!(job = %comm.job(), round, "the mean reuses the model's memory");
                                        }
                                        None => {
                                            tracing::debug!(job = %comm.job(), round, "the model's memory is still being sent from");
                                        }
                                    }
                                }
                                fold(comm, acc, o, out, blob, pulls).await
                            });
                        }
                        _ => missing.push((o.member.clone(), super::communicator::task_failure(&o))),
                    }
                }
                None => {
                    for (_, m) in pending.waiting.drain() {
                        missing.push((m.name, format!("no result within {:?}", cfg.round_timeout)));
                    }
                }
            },
            Some(r) = folds.next(), if !folds.is_empty() => match r {
                Ok(o) => {
                    tracing::debug!(job = %comm.job(), round, member = %o.member, secs = start.elapsed().as_secs_f64(), "result folded");
                    contributors.push(o);
                }
                Err(f) => {
                    tainted |= f.tainted;
                    missing.push((f.outcome.member, f.why));
                }
            },
            else => break,
        }
    }
    drop(folds);
    let acc = if tainted {
        drop(acc);
        refold(comm, round, &mut contributors, &mut missing, &layout, blob, &pulls).await?
    } else {
        acc
    };
    if contributors.len() < cfg.min_clients {
        return Err(FedAvgError::TooFewClients {
            round,
            got: contributors.len(),
            need: cfg.min_clients,
            missing,
        });
    }
    let acc = Arc::try_unwrap(acc)
        .map_err(|_| FedAvgError::Internal("accumulator still shared at the end of the round"))?
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    let bytes = tokio::task::spawn_blocking(move || acc.finish())
        .await
        .map_err(|_| FedAvgError::Internal("aggregation task failed"))??;
    let model = Model::from_safetensors_vec(bytes)?;
    tracing::debug!(job = %comm.job(), round, secs = start.elapsed().as_secs_f64(), "mean taken");
    let global = match &cfg.evaluate {
        Some(f) => {
            let (f, m) = (f.clone(), model.clone());
            tokio::task::spawn_blocking(move || f(&m))
                .await
                .map_err(|_| FedAvgError::Internal("evaluation task failed"))?
                .map_err(FedAvgError::Evaluate)?
        }
        None => BTreeMap::new(),
    };
    let total: f64 = contributors.iter().map(|o| o.num_samples as f64).sum();
    let mut metrics = BTreeMap::new();
    for o in &contributors {
        for (k, v) in &o.metrics {
            *metrics.entry(k.clone()).or_insert(0.0) += v * o.num_samples as f64 / total;
        }
    }
    let mut names: Vec<String> = contributors.into_iter().map(|o| o.member).collect();
    names.sort();
    missing.sort();
    for (member, why) in &missing {
        tracing::warn!(job = %comm.job(), round, member = %member, reason = %why, "left out of the round");
    }
    Ok((
        model,
        RoundReport {
            round,
            contributors: names,
            missing,
            secs: start.elapsed().as_secs_f64(),
            metrics,
            global,
        },
    ))
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

/// Folds the contributors' results again into a fresh mean, after a pull that failed midway
/// left part of a result in the old one (results are not stored, so it cannot be taken back
/// out): each result is pulled again from its client. One that fails now is left out too, and
/// if it, in turn, left a part behind, the refold starts over without it; every pass leaves
/// out at least one more client, so this ends. Costs a second pull of the surviving results,
/// only in a round where a pull broke.
async fn refold(
    comm: &Communicator,
    round: u32,
    contributors: &mut Vec<TaskOutcome>,
    missing: &mut Vec<(String, String)>,
    layout: &Layout,
    global: BlobRef,
    pulls: &tokio::sync::Semaphore,
) -> Result<Arc<Mutex<Accumulator>>, FedAvgError> {
    loop {
        tracing::warn!(
            job = %comm.job(),
            round,
            results = contributors.len(),
            "a result broke off midway; folding the others again"
        );
        let acc = Arc::new(Mutex::new(Accumulator::new(layout.clone(), global.chunk_size)?));
        let mut folds: FuturesUnordered<_> = std::mem::take(contributors)
            .into_iter()
            .filter_map(|o| {
                let out = o.output?;
                Some(fold(comm, acc.clone(), o, out, global, pulls))
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

/// A result that was not folded in.
struct FoldFailure {
    outcome: TaskOutcome,
    why: String,
    /// Part of it is in the mean and could not be taken back out.
    tainted: bool,
}

/// Pulls one client's result and folds it into the mean as its chunks arrive, without
/// storing them; on failure, takes what was folded back out where the store holds those
/// chunks, and says so where it does not.
async fn fold(
    comm: &Communicator,
    acc: Arc<Mutex<Accumulator>>,
    o: TaskOutcome,
    out: BlobRef,
    global: BlobRef,
    pulls: &tokio::sync::Semaphore,
) -> Result<TaskOutcome, FoldFailure> {
    let fail = |outcome, why: &str| FoldFailure {
        outcome,
        why: why.to_owned(),
        tainted: false,
    };
    if o.num_samples == 0 {
        return Err(fail(o, "reported 0 samples"));
    }
    if out.len != global.len || out.chunk_size != global.chunk_size {
        return Err(fail(o, "returned a model of another architecture"));
    }
    let weight = o.num_samples as f64;
    let n = lock(&acc).chunk_count() as usize;
    let folded = Arc::new(Mutex::new(vec![false; n]));
    let failure: Arc<Mutex<Option<AggregateError>>> = Arc::default();
    let on_chunk = {
        let (acc, folded, failure) = (acc.clone(), folded.clone(), failure.clone());
        move |i: u64, bytes: &[u8]| {
            if lock(&failure).is_some() {
                return; // refused already: fold no more of it
            }
            let r = lock(&acc).add_chunk(i, bytes, weight);
            match r {
                Ok(()) => lock(&folded)[i as usize] = true,
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
        window: RESULT_WINDOW,
        // Folded and forgotten: no disk write per result.
        keep: false,
        ..FetchOptions::default()
    };
    let Ok(_permit) = pulls.acquire().await else {
        return Err(fail(o, "internal error: the pull limit was closed"));
    };
    let fetched = comm.fetch(out, o.peer, &opts).await;
    let store = comm.node().store().clone();
    let done = tokio::task::spawn_blocking(move || {
        let folded = lock(&folded);
        let mut acc = lock(&acc);
        let failed = lock(&failure).take();
        let result = match (fetched, failed) {
            (Err(e), _) => Err(e.to_string()),
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
        Ok((Ok(()), _)) => Ok(o),
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

#[derive(Serialize)]
struct Checkpoint<'a> {
    round: u32,
    model: &'a str,
    rounds: &'a [RoundReport],
}

/// Writes the global model and the job's record so far; each file is replaced atomically.
fn checkpoint(
    dir: &std::path::Path,
    round: u32,
    store: &BlobStore,
    blob: BlobRef,
    reports: &[RoundReport],
) -> Result<(), FedAvgError> {
    let err = |path: &std::path::Path, e: &dyn std::fmt::Display| FedAvgError::Checkpoint {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| err(dir, &e))?;
    let write = |name: &str, bytes: &[u8]| {
        let path = dir.join(name);
        let tmp = dir.join(format!("{name}.tmp"));
        std::fs::write(&tmp, bytes).map_err(|e| err(&tmp, &e))?;
        std::fs::rename(&tmp, &path).map_err(|e| err(&path, &e))
    };
    // The model is already a blob in the store: link its file in when the store is on disk
    // (no copy), write it out otherwise.
    let model = dir.join("global.safetensors");
    let tmp = dir.join("global.safetensors.tmp");
    let _ = std::fs::remove_file(&tmp);
    match store.data_path(&blob.id) {
        Some(src) if std::fs::hard_link(&src, &tmp).is_ok() => {}
        _ => {
            let bytes = store.read_all(&blob.id).map_err(|e| err(&tmp, &e))?;
            std::fs::write(&tmp, bytes).map_err(|e| err(&tmp, &e))?;
        }
    }
    std::fs::rename(&tmp, &model).map_err(|e| err(&model, &e))?;
    let record = Checkpoint {
        round,
        model: "global.safetensors",
        rounds: reports,
    };
    let json = serde_json::to_vec_pretty(&record).map_err(|e| err(dir, &e))?;
    write("checkpoint.json", &json)
}
