//! Jobs: a Controller runs a workflow (plain async code) against a [`Communicator`];
//! Executors on the members run its tasks through a [`Learner`].
//!
//! - [`host`]: one per node; routes the node's inbound control requests to its executor
//!   (tasks) and to the controllers it hosts (task results), and refuses other jobs.
//! - [`communicator`]: the only way a workflow talks to peers.
//! - [`controller`]: the ractor actor that runs a job's workflow and ends the job on every
//!   member when it is aborted or fails.
//! - [`executor`]: the ractor actor that runs tasks through a [`Learner`] (the trait lives in
//!   [`crate::learner`], re-exported here).
//! - `supervisor`: the ractor actor every executor is linked to; ends a member's part of a
//!   job when its executor stops.
//! - [`fedavg`]: the FedAvg workflow with streaming aggregation.
//! - [`cyclic`]: cyclic weight transfer, the model handed from member to member.
//! - [`swarm`]: swarm learning, a rotating aggregator with failover.
//! - [`split`]: split learning, activations and gradients across a vertical data split.
//! - [`cross_site`]: cross-site evaluation, every model on every site's validation data.
//! - [`initial`]: the initial model asked of one member's learner (`[model] from`).

mod checkpoint;
pub mod communicator;
pub mod controller;
pub mod cross_site;
pub mod cyclic;
pub mod embed;
pub mod executor;
pub mod faults;
pub mod fedavg;
mod fold;
pub mod host;
pub mod initial;
mod routes;
pub mod split;
mod supervisor;
pub mod swarm;

use std::collections::BTreeMap;

use flare_protocols::BlobRef;
use flare_protocols::ctl::{TaskStatus, Value};
use libp2p::PeerId;

pub use crate::learner::{AddOne, Learner, TaskContext, TaskReply, TrainOutput};
pub use checkpoint::{Best, CheckpointPolicy, DEFAULT_KEEP, round_file};
pub use communicator::{CommError, Communicator, Link, RelayOutcome};
pub use controller::{ControllerError, ControllerHandle};
pub use cross_site::{BestModel, CrossSiteConfig, CrossSiteError, CrossSiteOutcome, KeepLastModel};
pub use fedavg::{Evaluator, FedAvgConfig, FedAvgError, FedAvgOutcome, RoundReport, Sampling};
pub use flare_protocols::ctl::{Task, TaskKind};
pub use host::JobHost;
pub use routes::{SiteDesk, SiteRequest};

/// How a job ended for a member: what `flare-node run` reports, and whether it exits with an
/// error (a job stopped early, or a member cut off from it, did not finish).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ending {
    /// Why, in words.
    pub reason: String,
    /// The job did not finish.
    pub failed: bool,
}

impl Ending {
    /// A job that ran to its end.
    pub fn finished(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            failed: false,
        }
    }

    /// A job that stopped before its end.
    pub fn failed(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            failed: true,
        }
    }
}

impl std::fmt::Display for Ending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.reason)
    }
}

/// A finished task, as its controller receives it.
#[derive(Clone, Debug, PartialEq)]
pub struct TaskOutcome {
    /// The executor's peer.
    pub peer: PeerId,
    /// Its member name.
    pub member: String,
    /// The task it answers.
    pub task_id: u64,
    /// How it ended.
    pub status: TaskStatus,
    /// Output model, on the executor's node.
    pub output: Option<BlobRef>,
    /// Metrics the executor reported.
    pub metrics: BTreeMap<String, f64>,
    /// Samples behind the output (the aggregation weight).
    pub num_samples: u64,
    /// Small named outputs that are not a model.
    pub values: BTreeMap<String, Value>,
}

/// An executor's word that a task's output is being produced and may be pulled now
/// ([`flare_protocols::ctl::Request::TaskStreaming`]).
#[derive(Clone, Debug, PartialEq)]
pub struct StreamingOutput {
    /// The executor's peer.
    pub peer: PeerId,
    /// Its member name.
    pub member: String,
    /// The task.
    pub task_id: u64,
    /// The output's handle, length and chunk size.
    pub output: BlobRef,
    /// The weight the result will report.
    pub num_samples: u64,
}

impl StreamingOutput {
    /// The result this output will make if it comes whole, as far as it is known now.
    pub fn into_outcome(self) -> TaskOutcome {
        TaskOutcome {
            peer: self.peer,
            member: self.member,
            task_id: self.task_id,
            status: TaskStatus::Ok,
            output: Some(self.output),
            metrics: BTreeMap::new(),
            num_samples: self.num_samples,
            values: BTreeMap::new(),
        }
    }
}

/// What a controller hears of the tasks it is owed.
#[derive(Debug)]
pub enum TaskEvent {
    /// A task ended.
    Result(TaskOutcome),
    /// A task's output is being produced and may be pulled now.
    Streaming(StreamingOutput),
}

impl TaskOutcome {
    /// Why this task did not give what was asked, in words: the executor's own `error` when
    /// it sent one, else how the task ended. The one wording every workflow reports.
    pub fn failure(&self) -> String {
        match self.values.get("error") {
            Some(Value::Str(e)) => e.clone(),
            _ if self.status == TaskStatus::Ok => "task returned no model".into(),
            _ => format!("task ended {:?}", self.status),
        }
    }
}
