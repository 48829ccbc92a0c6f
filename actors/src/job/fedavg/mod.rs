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

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use flare_protocols::BlobRef;
use flare_protocols::ctl::{TaskStatus, Value};
use flare_protocols::model::{Layout, Model};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use libp2p::PeerId;
use tokio::time::Instant;

use super::communicator::Communicator;
use super::fold::Pull;
use super::{Task, TaskEvent, TaskKind, TaskOutcome};
use crate::aggregate::{Accumulator, Mean};
use crate::lock;
use crate::store::Written;

use super::checkpoint::Checkpoints;
pub use super::fold::{MAX_CONCURRENT_PULLS, MAX_CONCURRENT_PULLS_ON_DISK, RESULT_WINDOW};

mod types;

pub use types::*;

/// Runs FedAvg from `initial` for `cfg.rounds` rounds.
pub async fn run(comm: &Communicator, cfg: &FedAvgConfig, initial: Model) -> Result<FedAvgOutcome, FedAvgError> {
    let start = Start {
        model: initial,
        next_round: 0,
        reports: Vec::new(),
    };
    run_from(comm, cfg, start).await
}

/// Runs FedAvg's rounds `start.next_round..cfg.rounds` from `start.model`: a controller
/// restarted mid-job goes on from its last checkpoint.
pub async fn run_from(comm: &Communicator, cfg: &FedAvgConfig, start: Start) -> Result<FedAvgOutcome, FedAvgError> {
    let o = rounds(
        comm,
        cfg,
        GlobalModel::Memory(start.model),
        start.next_round,
        start.reports,
    )
    .await?;
    let model = match o.model {
        GlobalModel::Memory(m) => m,
        // Rounds too large for memory (a disk store's choice): the caller asked for a model
        // in memory all the same.
        GlobalModel::Stored(blob) => comm.model_of(blob).await?,
    };
    Ok(FedAvgOutcome {
        model,
        rounds: o.rounds,
    })
}

/// Runs FedAvg from `initial`, which may be a model too large for memory already in the
/// store: then every round's mean is folded on disk and the final model stays there.
pub async fn run_global(
    comm: &Communicator,
    cfg: &FedAvgConfig,
    initial: GlobalModel,
) -> Result<GlobalOutcome, FedAvgError> {
    rounds(comm, cfg, initial, 0, Vec::new()).await
}

async fn rounds(
    comm: &Communicator,
    cfg: &FedAvgConfig,
    initial: GlobalModel,
    next_round: u32,
    mut reports: Vec<RoundReport>,
) -> Result<GlobalOutcome, FedAvgError> {
    let asked = cfg
        .sample
        .as_ref()
        .map_or(cfg.clients.len(), |s| s.per_round(cfg.clients.len()));
    check_min_clients(cfg.min_clients, asked).map_err(|why| FedAvgError::Config(format!("min_clients {why}")))?;
    // The global model lives in the blob store between rounds: the controller holds one
    // model-sized buffer at a time (the accumulator during a round), or none at all when
    // the model lives on disk.
    let layout = match &initial {
        GlobalModel::Memory(m) => m.layout(),
        GlobalModel::Stored(b) => comm.layout_of(*b).await?,
    };
    let (mut blob, mut lent, mut written) = publish(comm, initial).await?;
    let mut checkpoints = Checkpoints::new(comm, cfg.checkpoint_dir.clone(), cfg.checkpoint_policy.clone());
    for round in next_round..cfg.rounds {
        // A sampled round asks only its picks; the rest of the configuration is the job's.
        let sampled;
        let cfg = match &cfg.sample {
            Some(s) => {
                sampled = FedAvgConfig {
                    clients: s.pick(&cfg.clients, round),
                    ..cfg.clone()
                };
                &sampled
            }
            None => cfg,
        };
        let started = Instant::now();
        let global = Global { blob, lent, written };
        let (model, mut report) = one_round(comm, cfg, global, &[], layout.clone(), round, None).await?;
        let used = blob;
        (blob, lent, written) = publish(comm, model).await?;
        // The round's input is needed no more (its checkpoint holds it until written).
        comm.release(&used);
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
        let mut metrics = report.metrics.clone();
        metrics.extend(report.global.clone());
        reports.push(report);
        checkpoints.save(round, blob, &reports, &written, &metrics).await?;
    }
    checkpoints.finish().await?;
    // The last model published is the outcome; its bytes are still held, and the store's own
    // hold ends with its write.
    written.wait().await;
    let model = match lent {
        Some(lent) => {
            let bytes = Arc::try_unwrap(lent).unwrap_or_else(|shared| (*shared).clone());
            GlobalModel::Memory(Model::from_safetensors_vec(bytes)?)
        }
        None => GlobalModel::Stored(blob),
    };
    Ok(GlobalOutcome { model, rounds: reports })
}

/// A result taken while its client made it, until its `TaskResult` comes.
enum Streamed {
    /// Being pulled; its result, if it came already.
    Folding(Option<TaskOutcome>),
    /// All of it folded: the outcome as folded (its `output` what the chunks made).
    Folded(TaskOutcome),
    /// The pull broke off (`tainted`: after part of it was folded in).
    Failed { tainted: bool },
}

/// A streamed-in result `f` meets its client's result `o`: it counts when `o` names what was
/// folded, with the weight it was folded with; otherwise the mean holds something the client
/// does not stand by, and the round folds again (pulling `o`'s output, when it has one).
fn settle(
    f: TaskOutcome,
    o: TaskOutcome,
    contributors: &mut Vec<TaskOutcome>,
    missing: &mut Vec<(String, String)>,
    tainted: &mut bool,
) {
    if o.status == TaskStatus::Ok && o.output.is_some() && o.output == f.output && o.num_samples == f.num_samples {
        tracing::debug!(member = %o.member, "result folded as it was made");
        contributors.push(o);
        return;
    }
    tracing::warn!(member = %o.member, "a result differs from what it streamed: the round folds again");
    *tainted = true;
    match (o.status, o.output) {
        (TaskStatus::Ok, Some(_)) => contributors.push(o),
        _ => missing.push((o.member.clone(), o.failure())),
    }
}

/// Makes a round's model the job's blob: a model in memory is lent to the store (the pulls
/// read it from memory, see [`Communicator::publish_lent`]); a stored one is there already.
async fn publish(
    comm: &Communicator,
    model: GlobalModel,
) -> Result<(BlobRef, Option<Arc<Vec<u8>>>, Written), FedAvgError> {
    Ok(match model {
        GlobalModel::Memory(m) => {
            let (blob, lent, written) = comm.publish_lent(m).await?;
            (blob, Some(lent), written)
        }
        GlobalModel::Stored(blob) => (blob, None, Written::done()),
    })
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
) -> Result<(GlobalModel, RoundReport), FedAvgError> {
    let start = Instant::now();
    let deadline = start + cfg.round_timeout;
    let acc = comm.accumulator(&layout, blob.chunk_size).await?;
    // The pulls go in step, so a mean on disk takes every contribution to a chunk in memory.
    let step = super::fold::lockstep_for_mean(&acc);
    let acc = Arc::new(Mutex::new(acc));
    let task = Task {
        kind: TaskKind::Train,
        round,
        input: Some(blob),
        input_from: input_from.to_vec(),
        props: BTreeMap::from([("total_rounds".to_owned(), Value::Int(i64::from(cfg.rounds)))]),
        // The controller folds each result as it arrives and forgets it.
        transient_output: true,
        input_shares: match cfg.share_upload && cfg.clients.len() > 1 {
            true => cfg.clients.clone(),
            false => vec![],
        },
        stream_output: false,
    };
    let max_pulls = match step {
        Some(_) => MAX_CONCURRENT_PULLS_ON_DISK,
        None => MAX_CONCURRENT_PULLS,
    };
    // As many clients as the round pulls from at once hand their results over while they
    // make them (a pull each, held from their first chunk to their last); the others' are
    // pulled once stored. Into a mean on disk that is every client up to 8: a result pulled
    // once stored comes after the streamed ones have left the mean's window, so each chunk
    // of the mean is read back and written again (1 GiB, 4 clients: round 0 took 9.2-11.2 s
    // with two streamed, 7.4-7.7 s with all four; docs/benchmarks.md). Each streamed pull
    // adds its transfer window to the controller's memory while it still serves the model.
    // This node's own executor (a swarm's aggregator trains too) streams first: its chunks
    // come from its learner with no transfer window, and its result pulled once stored came
    // after the others had left the mean's window (2 GiB, 3 members: the round took 13 s,
    // the others' pulls held in step behind the read-back of this one; docs/benchmarks.md).
    let me = comm.node().peer_id();
    let (mut streamers, mut others) = (Vec::new(), Vec::new());
    let mine = cfg.clients.iter().filter(|&&c| c == me);
    for &c in mine.chain(cfg.clients.iter().filter(|&&c| c != me)) {
        match streamers.len() < max_pulls {
            true => streamers.push(c),
            false => others.push(c),
        }
    }
    let window = super::fold::streamed_window(streamers.iter().filter(|&&c| c != me).count());
    let streaming = Task {
        stream_output: true,
        ..task.clone()
    };
    let (mut pending, rest) = futures::join!(comm.broadcast(&streaming, &streamers), comm.broadcast(&task, &others));
    pending.waiting.extend(rest.waiting);
    pending.refused.extend(rest.refused);
    if let Some(n) = sent {
        n.notify_one();
    }
    let mut missing: Vec<(String, String)> = std::mem::take(&mut pending.refused)
        .into_iter()
        .map(|(m, why)| (m.name, why))
        .collect();
    let mut contributors: Vec<TaskOutcome> = Vec::new();
    let pulls = tokio::sync::Semaphore::new(max_pulls);
    // The model's bytes, once the first result is in: the first fold makes them the
    // accumulator's memory when no one else holds them any more.
    let spare: Mutex<Option<Arc<Vec<u8>>>> = Mutex::new(None);
    let mut folds = FuturesUnordered::new();
    let mut tainted = false;
    // Results taken while their clients made them, by task, until the result confirms them.
    let mut streams: HashMap<u64, Streamed> = HashMap::new();
    let fold = |o: TaskOutcome, out: BlobRef, how: Pull| {
        let (written, acc, pulls, spare, step) = (written.clone(), acc.clone(), &pulls, &spare, step.as_ref());
        async move {
            written.wait().await;
            let taken = lock(spare).take();
            if let Some(b) = taken {
                comm.reuse_for_mean(&acc, &blob.id, b, round).await;
            }
            let task = o.task_id;
            (task, how, comm.fold_result(acc, o, (out, how), blob, pulls, step).await)
        }
    };
    loop {
        tokio::select! {
            r = comm.next_event(&mut pending, deadline), if !pending.waiting.is_empty() => {
                // The accumulator starts filling: the model goes back to being read from disk
                // by any client still pulling it, or becomes the accumulator.
                if r.is_some() && let Some(l) = lent.take() {
                    *lock(&spare) = Some(l);
                }
                match r {
                    Some(TaskEvent::Streaming(s)) => {
                        tracing::debug!(job = %comm.job(), round, member = %s.member, secs = start.elapsed().as_secs_f64(), "result streaming");
                        if let std::collections::hash_map::Entry::Vacant(e) = streams.entry(s.task_id) {
                            e.insert(Streamed::Folding(None));
                            let out = s.output;
                            folds.push(fold(s.into_outcome(), out, Pull::Streamed { window }));
                        }
                    }
                    Some(TaskEvent::Result(o)) => {
                        tracing::debug!(job = %comm.job(), round, member = %o.member, secs = start.elapsed().as_secs_f64(), "result announced");
                        match streams.remove(&o.task_id) {
                            Some(Streamed::Folding(_)) => {
                                streams.insert(o.task_id, Streamed::Folding(Some(o)));
                            }
                            Some(Streamed::Folded(f)) => settle(f, o, &mut contributors, &mut missing, &mut tainted),
                            Some(Streamed::Failed { tainted: t }) => {
                                if let Some((o, out)) = unstreamed(o, t, &mut contributors, &mut missing) {
                                    folds.push(fold(o, out, Pull::Stored));
                                }
                            }
                            None => {
                                if let Some((o, out)) = unstreamed(o, false, &mut contributors, &mut missing) {
                                    folds.push(fold(o, out, Pull::Stored));
                                }
                            }
                        }
                    }
                    None => {
                        for (_, m) in pending.waiting.drain() {
                            missing.push((m.name, format!("no result within {:?}", cfg.round_timeout)));
                        }
                    }
                }
            },
            Some((task, how, r)) = folds.next(), if !folds.is_empty() => match (how, r) {
                (Pull::Stored, Ok(o)) => {
                    tracing::debug!(job = %comm.job(), round, member = %o.member, secs = start.elapsed().as_secs_f64(), "result folded");
                    contributors.push(o);
                }
                (Pull::Stored, Err(f)) => {
                    tainted |= f.tainted;
                    missing.push((f.outcome.member, f.why));
                }
                (Pull::Streamed { .. }, r) => {
                    let result = match streams.remove(&task) {
                        Some(Streamed::Folding(result)) => result,
                        _ => None,
                    };
                    match (r, result) {
                        (Ok(f), Some(o)) => settle(f, o, &mut contributors, &mut missing, &mut tainted),
                        (Ok(f), None) => {
                            streams.insert(task, Streamed::Folded(f));
                        }
                        (Err(f), result) => {
                            tracing::debug!(job = %comm.job(), round, member = %f.outcome.member, why = %f.why, "a result streamed in broke off; its stored copy is pulled");
                            tainted |= f.tainted;
                            match result {
                                Some(o) => {
                                    if let Some((o, out)) = unstreamed(o, f.tainted, &mut contributors, &mut missing) {
                                        folds.push(fold(o, out, Pull::Stored));
                                    }
                                }
                                None => {
                                    streams.insert(task, Streamed::Failed { tainted: f.tainted });
                                }
                            }
                        }
                    }
                }
            },
            else => break,
        }
    }
    // A result streamed in whose client never confirmed it is part of the mean: refold.
    tainted |= streams.values().any(|s| matches!(s, Streamed::Folded(_)));
    drop(folds);
    let acc = if tainted {
        drop(acc);
        comm.refold(round, &mut contributors, &mut missing, &layout, blob, &pulls)
            .await?
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
    close_round(comm, cfg, acc, contributors, missing, round, start).await
}

/// What becomes of a client's result when no streamed pull of it stands (there was none, or
/// it broke off): pulled from the client's store (returned), left to the refold when part of
/// it is in the mean already (`partly_folded`: the refold pulls it whole), or counted missing
/// when the client failed.
fn unstreamed(
    o: TaskOutcome,
    partly_folded: bool,
    contributors: &mut Vec<TaskOutcome>,
    missing: &mut Vec<(String, String)>,
) -> Option<(TaskOutcome, BlobRef)> {
    match (o.status, o.output) {
        (TaskStatus::Ok, Some(_)) if partly_folded => contributors.push(o),
        (TaskStatus::Ok, Some(out)) => return Some((o, out)),
        _ => missing.push((o.member.clone(), o.failure())),
    }
    None
}

/// The end of a round: the mean taken, the global model measured, the contributors' metrics
/// weighted by their samples, and who was left out, and why, logged.
async fn close_round(
    comm: &Communicator,
    cfg: &FedAvgConfig,
    acc: Arc<Mutex<Accumulator>>,
    contributors: Vec<TaskOutcome>,
    mut missing: Vec<(String, String)>,
    round: u32,
    start: Instant,
) -> Result<(GlobalModel, RoundReport), FedAvgError> {
    let acc = Arc::try_unwrap(acc)
        .map_err(|_| FedAvgError::Internal("accumulator still shared at the end of the round"))?
        .into_inner()
        .unwrap_or_else(|e| e.into_inner());
    let chunk_size = acc.chunk_size();
    let mean = tokio::task::spawn_blocking(move || acc.finish_mean())
        .await
        .map_err(|_| FedAvgError::Internal("aggregation task failed"))??;
    let model = match mean {
        Mean::Bytes(bytes) => GlobalModel::Memory(Model::from_safetensors_vec(bytes)?),
        Mean::Scratch(file, hashes) => GlobalModel::Stored(comm.publish_hashed(file, chunk_size, hashes).await?),
    };
    tracing::debug!(job = %comm.job(), round, secs = start.elapsed().as_secs_f64(), "mean taken");
    let global = match (&cfg.evaluate, &model) {
        // A model on disk is not read into memory to be measured.
        (Some(_), GlobalModel::Stored(_)) => {
            tracing::warn!(job = %comm.job(), round, "the global model lives on disk: not evaluated");
            BTreeMap::new()
        }
        (Some(f), GlobalModel::Memory(model)) => {
            let (f, m) = (f.clone(), model.clone());
            tokio::task::spawn_blocking(move || f(&m))
                .await
                .map_err(|_| FedAvgError::Internal("evaluation task failed"))?
                .map_err(FedAvgError::Evaluate)?
        }
        (None, _) => BTreeMap::new(),
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
