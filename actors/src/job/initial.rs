//! `[model] from = "MEMBER"`: the job's initial model asked of one member's learner before
//! round 0, as Flower asks one client for its parameters. A network that exists only in a
//! member's own code (a Python script) then defines the model every workflow starts from.

use std::collections::BTreeMap;
use std::time::Duration;

use flare_protocols::ctl::TaskStatus;
use flare_protocols::model::{DType, Model};
use libp2p::PeerId;
use tokio::time::Instant;

use super::communicator::{CommError, Communicator};
use super::{Task, TaskKind};

/// Why the initial model could not be had; the job cannot start without it.
#[derive(Debug, thiserror::Error)]
pub enum InitialError {
    /// The member never took the task (not joined, or not reachable) within the wait.
    #[error("{member} (named by [model] from) did not take the init_model task within {waited:?}: {reason}")]
    NotThere {
        /// The member.
        member: String,
        /// How long it was asked for.
        waited: Duration,
        /// Its last refusal.
        reason: String,
    },
    /// Its learner failed the task (the script's own words).
    #[error("{member} (named by [model] from) could not give the initial model: {reason}")]
    Failed {
        /// The member.
        member: String,
        /// Why.
        reason: String,
    },
    /// Its model is not one the runtime can average.
    #[error("the initial model from {member} {reason}")]
    Unusable {
        /// The member.
        member: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Pulling its model failed.
    #[error(transparent)]
    Comm(#[from] CommError),
}

/// Asks `member`'s learner for its starting parameters and pulls them. A member that has not
/// joined yet (a process started a moment later) is asked again until `wait` has passed; the
/// learner then has `timeout` to answer. Every caller gets the same model: the executor keeps
/// the first answer for the job.
pub async fn initial_from(
    comm: &Communicator,
    member: PeerId,
    wait: Duration,
    timeout: Duration,
) -> Result<Model, InitialError> {
    let task = Task {
        kind: TaskKind::InitModel,
        round: 0,
        input: None,
        input_from: vec![],
        props: BTreeMap::new(),
        transient_output: false,
        input_shares: vec![],
        stream_output: false,
    };
    let name = comm.name_of(&member);
    let asked_until = Instant::now() + wait;
    let mut pause = Duration::from_millis(10);
    let mut pending = loop {
        let mut pending = comm.broadcast(&task, &[member]).await;
        match pending.refused.pop() {
            None => break pending,
            Some((_, reason)) if Instant::now() >= asked_until => {
                return Err(InitialError::NotThere {
                    member: name,
                    waited: wait,
                    reason,
                });
            }
            Some((_, reason)) => {
                tracing::debug!(job = %comm.job(), member = %name, %reason, "init_model not taken yet");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
            }
        }
    };
    let Some(outcome) = comm.next_result(&mut pending, Instant::now() + timeout).await else {
        return Err(InitialError::Failed {
            member: name,
            reason: format!("no answer within {timeout:?}"),
        });
    };
    let blob = match (outcome.status, outcome.output) {
        (TaskStatus::Ok, Some(blob)) => blob,
        _ => {
            return Err(InitialError::Failed {
                reason: outcome.failure(),
                member: name,
            });
        }
    };
    let model = comm.pull_model(blob, &[member]).await?;
    averageable(&model).map_err(|reason| InitialError::Unusable { member: name, reason })?;
    tracing::info!(job = %comm.job(), member = %comm.name_of(&member), tensors = model.len(), bytes = blob.len, "initial model received");
    Ok(model)
}

/// Whether the runtime can average `model`: some tensors, all of them F32 or F64. The words
/// complete "the initial model ... ".
pub fn averageable(model: &Model) -> Result<(), String> {
    if model.is_empty() {
        return Err("holds no tensors".into());
    }
    match model
        .iter()
        .find(|(_, t)| !matches!(t.dtype(), DType::F32 | DType::F64))
    {
        Some((name, t)) => Err(format!(
            "has tensor {name:?} of {:?}: flare-node averages F32 and F64 tensors only (a buffer such as BatchNorm's num_batches_tracked is I64: leave it out of the state_dict or register it with persistent=False)",
            t.dtype()
        )),
        None => Ok(()),
    }
}
