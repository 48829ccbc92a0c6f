//! Cyclic weight transfer: each round the model visits the clients one after another, each
//! training it and handing it to the next *directly* (the next member pulls it from the
//! previous one; the controller only sends tasks and, when it measures rounds, pulls a copy).
//!
//! A member that refuses, fails or exceeds the task timeout is skipped: the next member starts
//! from the last good model, and the round's report names the skipped member and why. If a
//! member dies holding the newest model before the next one pulled it, that step is lost: the
//! relay goes back to the previous copy (held by a live member, ultimately the controller's
//! initial model) and the report says so. The final model's `steps` counts the training
//! steps actually behind it.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use flare_protocols::ctl::Value;
use flare_protocols::model::Model;
use libp2p::PeerId;
use rand::SeedableRng;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use tokio::time::Instant;

use super::communicator::{CommError, Communicator, Link};
use super::fedavg::Evaluator;
use super::{Task, TaskKind};

/// Parameters of a cyclic job.
#[derive(Clone)]
pub struct CyclicConfig {
    /// Rounds to run (each visits every client once).
    pub rounds: u32,
    /// The clients, in visiting order.
    pub order: Vec<PeerId>,
    /// Shuffle the order afresh each round with this seed (and the round number).
    pub shuffle_seed: Option<u64>,
    /// How long one member's turn may take before it is skipped.
    pub task_timeout: Duration,
    /// Measures the model after each round (pulls a copy to the controller).
    pub evaluate: Option<Evaluator>,
}

/// What one round did.
#[derive(Clone, Debug, Serialize)]
pub struct CyclicRound {
    /// Round number, from 0.
    pub round: u32,
    /// Members that trained the model, in order.
    pub visited: Vec<String>,
    /// Members skipped, with why.
    pub skipped: Vec<(String, String)>,
    /// Members that died holding the newest model (the step they trained is lost).
    pub lost: Vec<String>,
    /// Wall-clock seconds of the round.
    pub secs: f64,
    /// The round's model's metrics, from [`CyclicConfig::evaluate`].
    pub global: BTreeMap<String, f64>,
}

/// The end of a cyclic job.
#[derive(Clone, Debug)]
pub struct CyclicOutcome {
    /// The final model.
    pub model: Model,
    /// One report per round.
    pub rounds: Vec<CyclicRound>,
    /// Training steps behind the final model.
    pub steps: u32,
}

/// Why a cyclic job stopped.
#[derive(Debug, thiserror::Error)]
pub enum CyclicError {
    /// The configuration cannot work.
    #[error("bad cyclic configuration: {0}")]
    Config(String),
    /// Publishing or pulling failed.
    #[error(transparent)]
    Comm(#[from] CommError),
    /// The model could not be measured.
    #[error("evaluating the model: {0}")]
    Evaluate(String),
}

/// The visiting order of `round`.
pub fn round_order(cfg: &CyclicConfig, round: u32) -> Vec<PeerId> {
    let mut order = cfg.order.clone();
    if let Some(seed) = cfg.shuffle_seed {
        order.shuffle(&mut ChaCha8Rng::seed_from_u64(
            seed ^ u64::from(round).wrapping_mul(0x9e37_79b9),
        ));
    }
    order
}

/// Runs cyclic weight transfer from `initial` for `cfg.rounds` rounds.
pub async fn run(comm: &Communicator, cfg: &CyclicConfig, initial: Model) -> Result<CyclicOutcome, CyclicError> {
    if cfg.order.is_empty() {
        return Err(CyclicError::Config("no member to visit".into()));
    }
    let me = comm.me();
    let mut chain = vec![Link {
        model: comm.publish(Arc::new(initial)).await?,
        holder: me,
        steps: 0,
    }];
    let mut reports = Vec::new();
    for round in 0..cfg.rounds {
        let started = Instant::now();
        let order = round_order(cfg, round);
        let task = Task {
            transient_output: false,
            input_shares: vec![],
            stream_output: false,
            kind: TaskKind::Train,
            round,
            input: None,
            input_from: vec![],
            props: BTreeMap::from([("total_rounds".to_owned(), Value::Int(i64::from(cfg.rounds)))]),
        };
        let relay = comm.relay_and_wait(&task, &order, cfg.task_timeout, &mut chain).await?;
        let newest = *chain
            .last()
            .ok_or(CyclicError::Config("the relay lost every model".into()))?;
        let global = match &cfg.evaluate {
            Some(f) => {
                let model = comm.pull_model(newest.model, &[newest.holder]).await?;
                let f = f.clone();
                tokio::task::spawn_blocking(move || f(&model))
                    .await
                    .map_err(|e| CyclicError::Evaluate(e.to_string()))?
                    .map_err(CyclicError::Evaluate)?
            }
            None => BTreeMap::new(),
        };
        let report = CyclicRound {
            round,
            visited: relay.visits.into_iter().map(|o| o.member).collect(),
            skipped: relay.skipped,
            lost: relay.lost,
            secs: started.elapsed().as_secs_f64(),
            global,
        };
        tracing::info!(
            job = %comm.job(),
            round,
            visited = ?report.visited,
            skipped = report.skipped.len(),
            secs = report.secs,
            global = ?report.global,
            "round done"
        );
        reports.push(report);
    }
    let newest = *chain
        .last()
        .ok_or(CyclicError::Config("the relay lost every model".into()))?;
    let model = comm.pull_model(newest.model, &[newest.holder]).await?;
    Ok(CyclicOutcome {
        model,
        rounds: reports,
        steps: newest.steps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(seed: Option<u64>) -> CyclicConfig {
        CyclicConfig {
            rounds: 10,
            order: (0..6).map(|_| PeerId::random()).collect(),
            shuffle_seed: seed,
            task_timeout: Duration::from_secs(1),
            evaluate: None,
        }
    }

    #[test]
    fn a_seeded_order_is_a_fresh_permutation_each_round_and_reproducible() {
        let c = cfg(Some(7));
        let orders: Vec<Vec<PeerId>> = (0..10).map(|r| round_order(&c, r)).collect();
        for o in &orders {
            let mut sorted = o.clone();
            sorted.sort();
            let mut all = c.order.clone();
            all.sort();
            assert_eq!(sorted, all, "every member once");
        }
        assert!(
            orders.windows(2).any(|w| w[0] != w[1]),
            "the order changes between rounds"
        );
        assert_eq!(orders[3], round_order(&c, 3), "same seed and round, same order");
        let fixed = cfg(None);
        assert!(
            (0..10).all(|r| round_order(&fixed, r) == fixed.order),
            "no seed: the given order"
        );
    }
}
