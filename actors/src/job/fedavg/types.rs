//! FedAvg's configuration, what it reports and how it fails, and the one rule on
//! `min_clients`: the types around the workflow in `mod.rs`, so that file reads as the rounds.

use crate::aggregate::AggregateError;
use crate::job::checkpoint::{CheckpointError, CheckpointPolicy};
use crate::job::communicator::CommError;
use flare_protocols::model::{Model, ModelError};
use libp2p::PeerId;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
    /// Which checkpoints stay in `checkpoint_dir`.
    pub checkpoint_policy: CheckpointPolicy,
    /// Which clients each round asks (none: all of them).
    pub sample: Option<Sampling>,
    /// Measures each round's global model (none: no global metrics).
    pub evaluate: Option<Evaluator>,
    /// The clients of a round share the upload of its global model: each pulls its share
    /// from the controller and the rest from the others ([`crate::job::Task::input_shares`]),
    /// so the controller sends about one model a round instead of one per client.
    pub share_upload: bool,
}

/// A seeded sample of the clients each round, as Flower's `fraction_fit` and NVIDIA FLARE's
/// `num_clients` do: a round of 100 of 1,000 members costs a tenth of one of all of them.
/// The same seed picks the same members in every run.
#[derive(Clone, Debug, PartialEq)]
pub struct Sampling {
    /// Clients asked each round (at least `min_clients`, at most all).
    pub clients_per_round: usize,
    /// Seed of the picks; round `r` draws from `(seed, r)`.
    pub seed: u64,
}

impl Sampling {
    /// How many of `clients` clients a round asks.
    pub fn per_round(&self, clients: usize) -> usize {
        self.clients_per_round.min(clients)
    }

    /// The clients round `round` asks, in the order `clients` lists them.
    pub fn pick(&self, clients: &[PeerId], round: u32) -> Vec<PeerId> {
        use rand::SeedableRng;
        let k = self.per_round(clients.len());
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(self.seed ^ (u64::from(round) << 32 | u64::from(round)));
        let mut picked = rand::seq::index::sample(&mut rng, clients.len(), k).into_vec();
        picked.sort_unstable();
        picked.into_iter().map(|i| clients[i]).collect()
    }
}

/// A global model: in memory, or a blob of the job in this node's store (a model too large
/// for memory, see [`crate::BlobStore::streams`], which is never read into memory whole).
#[derive(Clone, Debug)]
pub enum GlobalModel {
    /// In memory.
    Memory(Model),
    /// In the store, held by the job.
    Stored(flare_protocols::BlobRef),
}

/// The end of a FedAvg job whose model may live on disk ([`super::run_global`]).
#[derive(Clone, Debug)]
pub struct GlobalOutcome {
    /// The final global model.
    pub model: GlobalModel,
    /// One report per round.
    pub rounds: Vec<RoundReport>,
}

/// Where a FedAvg run starts (see [`run_from`](super::run_from)).
#[derive(Clone, Debug)]
pub struct Start {
    /// The global model it starts from.
    pub model: Model,
    /// The first round it runs (0 for a new job).
    pub next_round: u32,
    /// The reports of the rounds before it (from the checkpoint).
    pub reports: Vec<RoundReport>,
}

/// What one round did.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
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
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
}

fn fmt_missing(m: &[(String, String)]) -> String {
    m.iter()
        .map(|(n, why)| format!("{n} ({why})"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The one rule on `min_clients`, for FedAvg, swarm rounds and the topology file alike: a
/// round needs at least one result and cannot wait for more than there are clients.
pub fn check_min_clients(min_clients: usize, clients: usize) -> Result<(), String> {
    if min_clients == 0 || min_clients > clients {
        return Err(format!("{min_clients} is not between 1 and the {clients} clients"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_is_seeded_distinct_in_order_and_new_each_round() {
        let clients: Vec<PeerId> = (0..50).map(|_| PeerId::random()).collect();
        let s = Sampling {
            clients_per_round: 10,
            seed: 4,
        };
        let r0 = s.pick(&clients, 0);
        assert_eq!(r0, s.pick(&clients, 0), "the same seed and round pick the same");
        assert_eq!(r0.len(), 10);
        let at: Vec<usize> = r0
            .iter()
            .map(|p| clients.iter().position(|c| c == p).expect("a client"))
            .collect();
        assert!(at.windows(2).all(|w| w[0] < w[1]), "distinct, in the clients' order");
        assert_ne!(r0, s.pick(&clients, 1), "another round, another sample");
        let other = Sampling { seed: 5, ..s.clone() };
        assert_ne!(r0, other.pick(&clients, 0), "another seed, another sample");
        let all = Sampling {
            clients_per_round: 80,
            seed: 1,
        };
        assert_eq!(all.pick(&clients, 3), clients, "more than there are: all of them");
    }
}
