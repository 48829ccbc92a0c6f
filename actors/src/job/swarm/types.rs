//! Swarm learning's configuration, what it reports and how it fails: the types around the
//! workflow in `mod.rs`, so that file reads as the rotation and its failover.

use crate::job::communicator::CommError;
use crate::job::fedavg::{Evaluator, FedAvgError};
use libp2p::PeerId;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// Parameters of a swarm job, the same on every member.
#[derive(Clone)]
pub struct SwarmConfig {
    /// Rounds to run.
    pub rounds: u32,
    /// Fewest results a round may finish with.
    pub min_clients: usize,
    /// How long a round waits for results.
    pub round_timeout: Duration,
    /// Every member, in the job's order (the rotation).
    pub members: Vec<PeerId>,
    /// This member's name.
    pub name: String,
    /// Hash of the job's specification, checked when members join each other.
    pub spec_hash: [u8; 32],
    /// How often a waiting member checks that the aggregator is alive.
    pub heartbeat: Duration,
    /// Measures each new model (the aggregator runs it and announces the metrics).
    pub evaluate: Option<Evaluator>,
    /// Fault injection for demonstrations and tests: if this member is the first choice to
    /// aggregate this round, it drops off the network right after sending the round's
    /// tasks, like a crash (its successor then runs the round normally).
    pub crash_in_round: Option<u32>,
    /// The members pulling a round's new model share the upload: each pulls its share from
    /// the aggregator and the rest from the others, so the aggregator sends about one model
    /// a round instead of one per member (as FedAvg's [`crate::job::FedAvgConfig::share_upload`]).
    pub share_upload: bool,
}

/// One round, as this member saw it.
#[derive(Clone, Debug, Serialize)]
pub struct SwarmRound {
    /// Round number, from 0.
    pub round: u32,
    /// The member that aggregated it.
    pub aggregator: PeerId,
    /// Members whose results it averaged.
    pub contributors: Vec<PeerId>,
    /// Members due to aggregate this round that did not answer (dead or gone), so
    /// `aggregator` took over.
    pub passed_over: Vec<PeerId>,
    /// Seconds from this member starting the round to it learning the result.
    pub secs: f64,
    /// The new model's metrics.
    pub global: BTreeMap<String, f64>,
}

/// The end of a swarm job on one member.
#[derive(Clone, Debug)]
pub struct SwarmOutcome {
    /// The final model (the same on every member), on disk when too large for memory.
    pub model: crate::job::fedavg::GlobalModel,
    /// The rounds this member saw completed (a member that came back misses some).
    pub rounds: Vec<SwarmRound>,
    /// Rounds behind the final model (all of them, also for a member that came back).
    pub completed: u32,
}

/// Why a member's swarm job stopped.
#[derive(Debug, thiserror::Error)]
pub enum SwarmError {
    /// The configuration cannot work.
    #[error("bad swarm configuration: {0}")]
    Config(String),
    /// No member answered: nobody can aggregate.
    #[error("round {0}: no member is alive to aggregate")]
    NoAggregator(u32),
    /// Communicating failed.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// A round this member aggregated failed.
    #[error(transparent)]
    Round(#[from] FedAvgError),
    /// Fault injection: this member played a crash.
    #[error("round {0}: crashed on purpose (fault injection)")]
    Crashed(u32),
}
