//! Federated inference: a frozen network goes once to every member, which embeds its own data
//! with it and keeps the embeddings; only row counts come back, never data or a model. A
//! later workflow (FedAvg of a small head, `inference-then-fedavg.toml`) trains on them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flare_protocols::ctl::{TaskStatus, Value};
use flare_protocols::model::Model;
use libp2p::PeerId;
use tokio::time::Instant;

use super::communicator::{CommError, Communicator};
use super::{Task, TaskKind};

/// What an embedding step asks.
#[derive(Clone, Debug)]
pub struct EmbedConfig {
    /// The members that embed their data.
    pub clients: Vec<PeerId>,
    /// The width every member's embeddings must have.
    pub embed_dim: usize,
    /// How long the members have.
    pub timeout: Duration,
}

/// What came back: row counts, and the bytes that moved.
#[derive(Clone, Debug, Default)]
pub struct EmbedOutcome {
    /// Rows each member embedded (training and validation), by member name.
    pub rows_per_member: BTreeMap<String, u64>,
    /// Size of the frozen model each member pulled.
    pub frozen_model_bytes: u64,
    /// Model bytes members sent back (none, when every member keeps to the contract).
    pub returned_bytes: u64,
}

/// Why the embedding step failed; it fails as a whole, since the next workflow needs every
/// member's embeddings.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// Talking to the members failed.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// A member refused the task.
    #[error("{member} refused the embed task: {reason}")]
    Refused {
        /// The member.
        member: String,
        /// Why.
        reason: String,
    },
    /// A member's task failed.
    #[error("{member} could not embed its data: {reason}")]
    Failed {
        /// The member.
        member: String,
        /// Why.
        reason: String,
    },
    /// A member broke the contract by sending a model back.
    #[error("{0} sent a model back from the embed task")]
    ModelReturned(String),
    /// A member's answer lacks its row counts.
    #[error("{0} answered the embed task without its row counts")]
    NoCounts(String),
    /// A member embedded in another width.
    #[error("{member} embedded in {got:?} dimensions, not {want}")]
    WrongDim {
        /// The member.
        member: String,
        /// The width it reported.
        got: Option<u64>,
        /// The width asked for.
        want: usize,
    },
    /// Members that did not answer in time.
    #[error("no embed result within {timeout:?} from {}", late.join(", "))]
    Timeout {
        /// Their names.
        late: Vec<String>,
        /// The time they had.
        timeout: Duration,
    },
}

/// Sends `frozen` to every client to embed its data, and checks what each reports.
pub async fn run(comm: &Communicator, cfg: &EmbedConfig, frozen: Model) -> Result<EmbedOutcome, EmbedError> {
    let blob = comm.publish(Arc::new(frozen)).await?;
    let task = Task {
        transient_output: false,
        input_shares: vec![],
        stream_output: false,
        kind: TaskKind::Embed,
        round: 0,
        input: Some(blob),
        input_from: vec![],
        props: BTreeMap::new(),
    };
    let deadline = Instant::now() + cfg.timeout;
    let mut pending = comm.broadcast(&task, &cfg.clients).await;
    if let Some((m, why)) = pending.refused.first() {
        return Err(EmbedError::Refused {
            member: m.name.clone(),
            reason: why.clone(),
        });
    }
    let count = |v: Option<&Value>| match v {
        Some(Value::Int(n)) => u64::try_from(*n).ok(),
        _ => None,
    };
    let mut out = EmbedOutcome {
        frozen_model_bytes: blob.len,
        ..EmbedOutcome::default()
    };
    while let Some(o) = comm.next_result(&mut pending, deadline).await {
        if o.status != TaskStatus::Ok {
            return Err(EmbedError::Failed {
                reason: o.failure(),
                member: o.member,
            });
        }
        // Only counts come back; a member that returned a model broke the contract.
        out.returned_bytes += o.output.map_or(0, |b| b.len);
        if o.output.is_some() {
            return Err(EmbedError::ModelReturned(o.member));
        }
        let (train, validation, dim) = (
            count(o.values.get("train_rows")),
            count(o.values.get("validation_rows")),
            count(o.values.get("dim")),
        );
        let (Some(train), Some(validation)) = (train, validation) else {
            return Err(EmbedError::NoCounts(o.member));
        };
        if dim != Some(cfg.embed_dim as u64) {
            return Err(EmbedError::WrongDim {
                member: o.member,
                got: dim,
                want: cfg.embed_dim,
            });
        }
        out.rows_per_member.insert(o.member, train + validation);
    }
    if !pending.waiting.is_empty() {
        return Err(EmbedError::Timeout {
            late: pending.waiting.values().map(|m| m.name.clone()).collect(),
            timeout: cfg.timeout,
        });
    }
    Ok(out)
}
