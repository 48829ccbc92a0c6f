//! FedAvg's checkpoints: after each round the global model and a JSON record of the job so
//! far go to the checkpoint directory, each file replaced atomically, in the background once
//! the model is on disk (hard-linked from the blob store when it is on disk, so no copy).
//! One checkpoint is written at a time, in round order; an error surfaces at the next round
//! or at the end of the job.

use std::path::{Path, PathBuf};

use flare_protocols::BlobRef;
use serde::Serialize;
use tokio::task::JoinHandle;

use super::communicator::Communicator;
use crate::store::{BlobStore, Written};

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
    saving: Option<JoinHandle<Result<(), CheckpointError>>>,
}

impl Checkpoints {
    /// Checkpoints into `dir`; none when it is `None`.
    pub(crate) fn new(comm: &Communicator, dir: Option<PathBuf>) -> Self {
        Self {
            dir,
            store: comm.node().store().clone(),
            saving: None,
        }
    }

    /// Saves round `round`'s model `blob` and `reports` once `written` (the model's disk
    /// write) is done, after the checkpoint before it; passes on an earlier one's error.
    pub(crate) async fn save<R: Serialize + Clone + Send + Sync + 'static>(
        &mut self,
        round: u32,
        blob: BlobRef,
        reports: &[R],
        written: &Written,
    ) -> Result<(), CheckpointError> {
        if self.saving.as_ref().is_some_and(|s| s.is_finished()) {
            finish_saving(self.saving.take()).await?;
        }
        let Some(dir) = &self.dir else { return Ok(()) };
        let (dir, store, reports, written, before) = (
            dir.clone(),
            self.store.clone(),
            reports.to_vec(),
            written.clone(),
            self.saving.take(),
        );
        self.saving = Some(tokio::spawn(async move {
            finish_saving(before).await?;
            written.wait().await;
            tokio::task::spawn_blocking(move || checkpoint(&dir, round, &store, blob, &reports))
                .await
                .map_err(|e| CheckpointError {
                    path: PathBuf::new(),
                    reason: format!("the checkpoint task failed: {e}"),
                })?
        }));
        Ok(())
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

#[derive(Serialize)]
struct Checkpoint<'a, R> {
    round: u32,
    model: &'a str,
    rounds: &'a [R],
}

/// Writes the global model and the job's record so far; each file is replaced atomically.
fn checkpoint<R: Serialize>(
    dir: &Path,
    round: u32,
    store: &BlobStore,
    blob: BlobRef,
    reports: &[R],
) -> Result<(), CheckpointError> {
    let err = |path: &Path, e: &dyn std::fmt::Display| CheckpointError {
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
