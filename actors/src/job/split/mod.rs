//! Split learning, run by the label party: it holds the labels and the top of the network and
//! hosts this workflow; each data party is an executor whose learner
//! ([`crate::learner::split::SplitDataParty`]) holds a band of feature columns and the bottom.
//!
//! The exchange (each training batch a forward to every data party, then a backward to each
//! with the gradient of its own activations; after each epoch, forwards over the test rows)
//! and what crosses the wire are specified in [`flare_protocols::split`].
//!
//! The central baseline ([`SplitConfig::baseline`]) trains the same network in one process on
//! the same batches, alongside, when the caller holds all the data (sim and tests).

use std::collections::HashMap;
use std::sync::Arc;

use flare_protocols::ctl::{TaskStatus, Value};
use flare_protocols::model::Model;
use flare_protocols::split::{self as wire, Backward, Forward};
use libp2p::PeerId;
use tokio::time::Instant;

use super::communicator::{Communicator, Pending};
use super::{Task, TaskKind, TaskOutcome};
use crate::learner::split::{LabelData, Top, central_baseline};

mod types;

pub use types::*;

/// Payload counters.
#[derive(Default)]
struct Traffic {
    activations: u64,
    gradients: u64,
    blobs: u64,
}

/// Runs split learning for `cfg.spec.epochs` epochs with the label party's `labels`.
pub async fn run(comm: &Communicator, cfg: &SplitConfig, labels: &LabelData) -> Result<SplitOutcome, SplitError> {
    cfg.validate()?;
    let spec = &cfg.spec;
    let mut top = spec.top_net()?;
    let baseline = cfg.baseline.clone().map(|data| {
        let (spec, eval_batch) = (spec.clone(), cfg.eval_batch);
        tokio::task::spawn_blocking(move || central_baseline(&spec, &data, eval_batch))
    });
    let mut traffic = Traffic::default();
    let mut epochs = Vec::new();
    let mut step = 0u64;
    for epoch in 0..spec.epochs {
        let started = Instant::now();
        let mut loss = 0.0;
        for ids in spec.epoch_batches(&labels.train, epoch) {
            let y = labels
                .labels_of(&ids)
                .ok_or_else(|| SplitError::Config("a training id has no label".into()))?;
            let acts = forward(comm, cfg, epoch, step, &ids, true, &mut traffic).await?;
            // The top is small next to a round trip: it runs here, between the two exchanges.
            let (score, grads) = top.train_batch(&acts, &y, spec.lr)?;
            backward(comm, cfg, epoch, step, grads, &mut traffic).await?;
            loss += score.loss;
            step += 1;
        }
        let (test_loss, correct) = evaluate(comm, cfg, &top, labels, epoch, &mut step, &mut traffic).await?;
        let n = labels.test.len().max(1) as f64;
        let report = EpochReport {
            epoch,
            train_loss: loss / labels.train.len().max(1) as f64,
            test_accuracy: correct as f64 / n,
            test_loss: test_loss / n,
            secs: started.elapsed().as_secs_f64(),
        };
        tracing::info!(
            job = %comm.job(),
            round = epoch,
            train_loss = report.train_loss,
            test_accuracy = report.test_accuracy,
            test_loss = report.test_loss,
            secs = report.secs,
            "split epoch done"
        );
        epochs.push(report);
    }
    let central = match baseline {
        Some(h) => h
            .await
            .map_err(|e| SplitError::Baseline(e.to_string()))?
            .map_err(|e| SplitError::Baseline(e.to_string()))?,
        None => Vec::new(),
    };
    if let (Some(split), Some(c)) = (epochs.last(), central.last()) {
        tracing::info!(
            job = %comm.job(),
            split = split.test_accuracy,
            central = c.test_accuracy,
            activation_bytes = traffic.activations,
            gradient_bytes = traffic.gradients,
            "split learning done"
        );
    }
    Ok(SplitOutcome {
        epochs,
        central,
        activation_bytes: traffic.activations,
        gradient_bytes: traffic.gradients,
        blob_payloads: traffic.blobs,
        top: top.net().clone(),
    })
}

/// Loss sum and hits of the top on the test samples, batch by batch.
async fn evaluate(
    comm: &Communicator,
    cfg: &SplitConfig,
    top: &Top,
    labels: &LabelData,
    epoch: u32,
    step: &mut u64,
    traffic: &mut Traffic,
) -> Result<(f64, usize), SplitError> {
    let (mut loss, mut correct) = (0.0, 0);
    for ids in labels.test.chunks(cfg.eval_batch) {
        let y = labels
            .labels_of(ids)
            .ok_or_else(|| SplitError::Config("a test id has no label".into()))?;
        let acts = forward(comm, cfg, epoch, *step, ids, false, traffic).await?;
        let s = top.score(&acts, &y)?;
        loss += s.loss;
        correct += s.correct;
        *step += 1;
    }
    Ok((loss, correct))
}

/// Asks every data party for its activations on `ids`; returns them in party order.
async fn forward(
    comm: &Communicator,
    cfg: &SplitConfig,
    epoch: u32,
    step: u64,
    ids: &[usize],
    train: bool,
    traffic: &mut Traffic,
) -> Result<Vec<Vec<f32>>, SplitError> {
    let rows = wire::row_ids(ids).ok_or_else(|| SplitError::Config("a sample id does not fit a u32".into()))?;
    let forward = Forward {
        rows,
        step,
        train,
        inline_max: cfg.inline_max as u64,
    };
    let task = Task::new(TaskKind::SplitForward(forward), epoch);
    let pending = comm.broadcast(&task, &cfg.parties).await;
    let outcomes = collect(comm, cfg, pending, step).await?;
    let (n, cut) = (ids.len(), cfg.spec.cut_width());
    let mut acts = vec![Vec::new(); cfg.parties.len()];
    for (party, o) in outcomes {
        let pulled = match o.output {
            Some(blob) => Some(pull(comm, &o, blob, n * cut * 4, step).await?),
            None => None,
        };
        if let Some(audit) = &cfg.audit {
            audit(&Received {
                party,
                member: o.member.clone(),
                step,
                rows: ids.to_vec(),
                values: o.values.clone(),
                pulled: pulled.clone(),
            });
        }
        let bad = |reason: String| SplitError::Party {
            member: o.member.clone(),
            step,
            reason,
        };
        let a = match (pulled, o.values.get(wire::ACTIVATIONS), o.values.len()) {
            (None, Some(Value::Bytes(b)), 1) => {
                wire::f32s(b).ok_or_else(|| bad("activations are not whole f32s".into()))?
            }
            (Some(m), None, 0) => {
                traffic.blobs += 1;
                wire::matrix_of(&m, wire::ACTIVATIONS, n, cut).map_err(bad)?
            }
            _ => {
                return Err(bad(
                    "a forward result holds exactly the activations, inline or as a blob".into(),
                ));
            }
        };
        if a.len() != n * cut {
            return Err(bad(format!("{} activations for {n} rows of {cut}", a.len())));
        }
        if a.iter().any(|v| !v.is_finite()) {
            return Err(bad("activations hold a value that is not finite".into()));
        }
        traffic.activations += a.len() as u64 * 4;
        acts[party] = a;
    }
    tracing::debug!(job = %comm.job(), round = epoch, step, rows = n, train, "forward done");
    Ok(acts)
}

/// Sends each data party the gradient of its activations and waits until every bottom stepped.
async fn backward(
    comm: &Communicator,
    cfg: &SplitConfig,
    epoch: u32,
    step: u64,
    grads: Vec<Vec<f32>>,
    traffic: &mut Traffic,
) -> Result<(), SplitError> {
    let (cut, lr) = (cfg.spec.cut_width(), f64::from(cfg.spec.lr));
    let mut tasks = Vec::with_capacity(grads.len());
    for g in grads {
        let bytes = g.len() * 4;
        traffic.gradients += bytes as u64;
        let (gradient, input) = if bytes <= cfg.inline_max {
            (Some(g), None)
        } else {
            let model =
                wire::matrix_model(wire::GRADIENT, g.len() / cut.max(1), cut, &g).map_err(SplitError::Config)?;
            traffic.blobs += 1;
            (None, Some(comm.publish(Arc::new(model)).await?))
        };
        let mut task = Task::new(TaskKind::SplitBackward(Backward { step, lr, gradient }), epoch);
        task.input = input;
        tasks.push(task);
    }
    let sends = tasks
        .iter()
        .zip(&cfg.parties)
        .map(|(task, peer)| comm.broadcast(task, std::slice::from_ref(peer)));
    let mut pending = Pending::default();
    for p in futures::future::join_all(sends).await {
        pending.waiting.extend(p.waiting);
        pending.refused.extend(p.refused);
    }
    let done = collect(comm, cfg, pending, step).await;
    // The step's gradients have been pulled (or the job ends).
    for blob in tasks.iter().filter_map(|t| t.input) {
        comm.release(&blob);
    }
    done?;
    tracing::debug!(job = %comm.job(), round = epoch, step, "backward done");
    Ok(())
}

/// Waits for every result of `pending`; returns them with their party index. A refusal, a
/// failed task or a missing result ends the job.
async fn collect(
    comm: &Communicator,
    cfg: &SplitConfig,
    mut pending: Pending,
    step: u64,
) -> Result<Vec<(usize, TaskOutcome)>, SplitError> {
    if let Some((m, reason)) = pending.refused.pop() {
        return Err(SplitError::Party {
            member: m.name,
            step,
            reason,
        });
    }
    let index: HashMap<PeerId, usize> = cfg.parties.iter().enumerate().map(|(i, p)| (*p, i)).collect();
    let deadline = Instant::now() + cfg.step_timeout;
    let mut out = Vec::with_capacity(pending.waiting.len());
    while !pending.waiting.is_empty() {
        let Some(o) = comm.next_result(&mut pending, deadline).await else {
            let mut missing: Vec<String> = pending.waiting.values().map(|m| m.name.clone()).collect();
            missing.sort();
            return Err(SplitError::Timeout { step, missing });
        };
        if o.status != TaskStatus::Ok {
            let reason = o.failure();
            return Err(SplitError::Party {
                member: o.member,
                step,
                reason,
            });
        }
        let party = *index.get(&o.peer).ok_or_else(|| SplitError::Party {
            member: o.member.clone(),
            step,
            reason: "answered but is not a data party".into(),
        })?;
        out.push((party, o));
    }
    Ok(out)
}

/// Pulls a payload blob from the data party that produced it and decodes it as a model; the
/// blob may be no larger than the payload expected plus room for its header.
async fn pull(
    comm: &Communicator,
    o: &TaskOutcome,
    blob: flare_protocols::BlobRef,
    payload: usize,
    step: u64,
) -> Result<Model, SplitError> {
    let bad = |reason: String| SplitError::Party {
        member: o.member.clone(),
        step,
        reason,
    };
    let bytes = comm.pull_bytes(blob, &[o.peer], payload as u64 + 4096).await?;
    // One step's activations: read once, needed no more.
    comm.release(&blob);
    Model::from_safetensors_vec(bytes).map_err(|e| bad(format!("activations blob: {e}")))
}
