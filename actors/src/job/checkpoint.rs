//! FedAvg's checkpoints: after each round the global model and a JSON record of the job so
//! far go to the checkpoint directory, each file replaced atomically, in the background once
//! the model is on disk (hard-linked from the blob store when it is on disk, so no copy).
//! One checkpoint is written at a time, in round order; an error surfaces at the next round
//! or at the end of the job.
//!
//! The directory holds the last [`CheckpointPolicy::keep`] rounds' models
//! (`round-NNNNNN.safetensors`), `global.safetensors` (the newest of them, linked),
//! `best.safetensors` (linked to the best round's model, when a metric names the best) and
//! `checkpoint.json`; older rounds' files are removed, so the directory does not grow with
//! the rounds.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use flare_protocols::BlobRef;
use serde::Serialize;
use tokio::task::JoinHandle;

use super::communicator::Communicator;
use crate::store::{BlobStore, Written};

/// Which checkpoints stay.
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointPolicy {
    /// The last this many rounds' models stay (at least 1).
    pub keep: usize,
    /// Also keep the best round's model by this metric.
    pub best: Option<Best>,
}

impl Default for CheckpointPolicy {
    fn default() -> Self {
        Self {
            keep: DEFAULT_KEEP,
            best: None,
        }
    }
}

/// Rounds' models a checkpoint directory keeps unless told otherwise.
pub const DEFAULT_KEEP: usize = 3;

/// The metric that names the best round: the global model's (from the job's evaluation)
/// when it has one by that name, else the clients' weighted mean.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Best {
    /// The metric's name (e.g. `accuracy`, `loss`).
    pub metric: String,
    /// Whether higher is better (`accuracy`) or lower (`loss`).
    pub higher_is_better: bool,
}

/// The best round so far.
#[derive(Clone, Debug, Serialize)]
struct BestSoFar {
    round: u32,
    metric: String,
    value: f64,
}

/// Why a checkpoint was not written.
#[derive(Debug, thiserror::Error)]
#[error("checkpoint {path}: {reason}")]
pub struct CheckpointError {
    /// The file.
    pub path: PathBuf,
    /// Why.
    pub reason: String,
}

/// The background writes of a job's checkpoints, one after the other.
pub(crate) struct Checkpoints {
    dir: Option<PathBuf>,
    store: BlobStore,
    policy: CheckpointPolicy,
    best: Option<BestSoFar>,
    saving: Option<JoinHandle<Result<(), CheckpointError>>>,
}

impl Checkpoints {
    /// Checkpoints into `dir`, kept by `policy`; none when `dir` is `None`.
    pub(crate) fn new(comm: &Communicator, dir: Option<PathBuf>, policy: CheckpointPolicy) -> Self {
        Self {
            dir,
            store: comm.node().store().clone(),
            policy,
            best: None,
            saving: None,
        }
    }

    /// Saves round `round`'s model `blob` and `reports` once `written` (the model's disk
    /// write) is done, after the checkpoint before it; passes on an earlier one's error.
    /// `metrics` are the round's (global first, see [`Best`]).
    pub(crate) async fn save<R: Serialize + Clone + Send + Sync + 'static>(
        &mut self,
        round: u32,
        blob: BlobRef,
        reports: &[R],
        written: &Written,
        metrics: &BTreeMap<String, f64>,
    ) -> Result<(), CheckpointError> {
        if self.saving.as_ref().is_some_and(|s| s.is_finished()) {
            finish_saving(self.saving.take()).await?;
        }
        let Some(dir) = self.dir.clone() else { return Ok(()) };
        let is_best = self.note_best(round, metrics);
        let record = Record {
            keep: self.policy.keep.max(1),
            best: self.best.clone(),
            is_best,
        };
        let (store, reports, written, before) = (
            self.store.clone(),
            reports.to_vec(),
            written.clone(),
            self.saving.take(),
        );
        // The checkpoint's own hold: the workflow may let go of the model before it is written.
        store.retain(&blob.id);
        self.saving = Some(tokio::spawn(async move {
            let before = finish_saving(before).await;
            written.wait().await;
            let s = store.clone();
            let r = tokio::task::spawn_blocking(move || checkpoint(&dir, round, &s, blob, &reports, &record))
                .await
                .map_err(|e| CheckpointError {
                    path: PathBuf::new(),
                    reason: format!("the checkpoint task failed: {e}"),
                });
            store.release(&blob.id);
            before?;
            r?
        }));
        Ok(())
    }

    /// Whether round `round` is the best so far by the policy's metric (a round without the
    /// metric, or with a NaN, is not).
    fn note_best(&mut self, round: u32, metrics: &BTreeMap<String, f64>) -> bool {
        let Some(best) = &self.policy.best else { return false };
        let Some(&value) = metrics.get(&best.metric).filter(|v| !v.is_nan()) else {
            return false;
        };
        let better = self.best.as_ref().is_none_or(|b| {
            if best.higher_is_better {
                value > b.value
            } else {
                value < b.value
            }
        });
        if better {
            self.best = Some(BestSoFar {
                round,
                metric: best.metric.clone(),
                value,
            });
        }
        better
    }

    /// Waits for the last checkpoint and passes on its error.
    pub(crate) async fn finish(self) -> Result<(), CheckpointError> {
        finish_saving(self.saving).await
    }
}

/// Waits for a background checkpoint and passes on its error.
async fn finish_saving(saving: Option<JoinHandle<Result<(), CheckpointError>>>) -> Result<(), CheckpointError> {
    match saving {
        Some(s) => s.await.map_err(|e| CheckpointError {
            path: PathBuf::new(),
            reason: format!("the checkpoint task failed: {e}"),
        })?,
        None => Ok(()),
    }
}

/// What a background checkpoint needs to know besides the model.
struct Record {
    keep: usize,
    best: Option<BestSoFar>,
    is_best: bool,
}

#[derive(Serialize)]
struct Checkpoint<'a, R> {
    round: u32,
    model: &'a str,
    kept: Vec<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    best: Option<&'a BestSoFar>,
    rounds: &'a [R],
}

/// The file of round `round`'s model in a checkpoint directory.
pub fn round_file(round: u32) -> String {
    format!("round-{round:06}.safetensors")
}

/// Writes round `round`'s model and links `global.safetensors` (and `best.safetensors`, when
/// it is the best) to it, writes the job's record so far, then removes the models of rounds
/// older than the last `keep`. Each file is replaced atomically.
fn checkpoint<R: Serialize>(
    dir: &Path,
    round: u32,
    store: &BlobStore,
    blob: BlobRef,
    reports: &[R],
    record: &Record,
) -> Result<(), CheckpointError> {
    let err = |path: &Path, e: &dyn std::fmt::Display| CheckpointError {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    std::fs::create_dir_all(dir).map_err(|e| err(dir, &e))?;
    // Replaces `dir/name` atomically: `fill` makes the new file at a temporary path, which
    // is then renamed over the old one.
    let replace = |name: &str, fill: &dyn Fn(&Path) -> Result<(), CheckpointError>| {
        let path = dir.join(name);
        let tmp = dir.join(format!("{name}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        fill(&tmp)?;
        std::fs::rename(&tmp, &path).map_err(|e| err(&path, &e))
    };
    // The model is already a blob in the store: link its file in when the store is on disk
    // (no copy), write it out otherwise.
    let model = dir.join(round_file(round));
    replace(&round_file(round), &|tmp| match store.data_path(&blob.id) {
        Some(src) if std::fs::hard_link(&src, tmp).is_ok() => Ok(()),
        _ => {
            let bytes = store.read_all(&blob.id).map_err(|e| err(tmp, &e))?;
            std::fs::write(tmp, bytes).map_err(|e| err(tmp, &e))
        }
    })?;
    let link = |tmp: &Path| std::fs::hard_link(&model, tmp).map_err(|e| err(tmp, &e));
    replace("global.safetensors", &link)?;
    if record.is_best {
        replace("best.safetensors", &link)?;
    }
    let mut rounds = kept_rounds(dir).map_err(|e| err(dir, &e))?;
    // Rounds after this one are an earlier run's, in the same directory: stale.
    let stale: Vec<u32> = rounds.iter().copied().filter(|&r| r > round).collect();
    rounds.retain(|&r| r <= round);
    let old = rounds.len().saturating_sub(record.keep);
    for r in rounds.drain(..old).chain(stale) {
        let path = dir.join(round_file(r));
        std::fs::remove_file(&path).map_err(|e| err(&path, &e))?;
    }
    let json = serde_json::to_vec_pretty(&Checkpoint {
        round,
        model: "global.safetensors",
        kept: rounds,
        best: record.best.as_ref(),
        rounds: reports,
    })
    .map_err(|e| err(dir, &e))?;
    replace("checkpoint.json", &|tmp| {
        std::fs::write(tmp, &json).map_err(|e| err(tmp, &e))
    })
}

/// The rounds whose models are in `dir`, oldest first.
fn kept_rounds(dir: &Path) -> std::io::Result<Vec<u32>> {
    let mut rounds = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        if let Some(r) = name
            .to_str()
            .and_then(|n| n.strip_prefix("round-"))
            .and_then(|n| n.strip_suffix(".safetensors"))
            .and_then(|n| n.parse().ok())
        {
            rounds.push(r);
        }
    }
    rounds.sort_unstable();
    Ok(rounds)
}
