//! Swarm learning: no fixed controller. Every member trains, and each round one of them
//! aggregates; every member runs this same loop.
//!
//! **Who aggregates round r**: the first member, in the job's member order rotated to start
//! at `r mod n`, that answers a heartbeat. Every member applies the same rule, so all agree
//! without a vote, and the work moves round the members.
//!
//! **A round**: the aggregator pulls the current model (from whoever holds it), sends the
//! train task to every member that answers, folds the results as they stream in (as FedAvg
//! does), stores the new model and announces it ([`Progress`]); members pull it peer to
//! peer when their next task names it.
//!
//! **Failover**: members waiting for round r watch its aggregator with heartbeats; when it
//! misses [`MISSES`] in a row they apply the rule again, and the member it now names runs
//! round r afresh from the last announced model. Results sent to the dead aggregator are
//! lost with it, so the round's model is the weighted mean of the results the successor
//! collects (for add-one: still exactly the previous model plus one).
//!
//! **Coming back**: a member that (re)starts asks the others where the job stands
//! ([`Communicator::join`]) and picks up at the current round; since aggregators send tasks
//! to every member that answers, it trains again from the next broadcast.
//!
//! **The end**: the last round's aggregator announces the final model and stays until every
//! member it told has pulled it (or a round timeout passes).

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::fedavg::GlobalModel;
use flare_protocols::ctl::Progress;
use libp2p::PeerId;
use tokio::time::Instant;

use super::communicator::Communicator;
use super::faults;
use super::fedavg::{self, FedAvgConfig};

/// Missed heartbeats after which a member treats an aggregator as gone.
pub const MISSES: u32 = 2;

mod failover;
mod types;

use failover::{Watched, aggregator, watch_round};
pub use types::*;

/// Runs this member's part of a swarm job from `initial` (the same model on every member;
/// one too large for memory stays on disk, see [`fedavg::GlobalModel`]).
pub async fn run(comm: &Communicator, cfg: &SwarmConfig, initial: GlobalModel) -> Result<SwarmOutcome, SwarmError> {
    let me = comm.me();
    if !cfg.members.contains(&me) {
        return Err(SwarmError::Config("this node is not a member of the job".into()));
    }
    fedavg::check_min_clients(cfg.min_clients, cfg.members.len())
        .map_err(|why| SwarmError::Config(format!("min_clients {why}")))?;
    let (layout, start) = match initial {
        GlobalModel::Memory(m) => (m.layout(), comm.publish(Arc::new(m)).await?),
        GlobalModel::Stored(blob) => (comm.layout_of(blob).await?, blob),
    };
    let mut state = Progress {
        round: 0,
        model: start,
        holders: vec![me],
        aggregator: me,
        contributors: vec![],
        metrics: BTreeMap::new(),
        passed_over: vec![],
    };
    let others: Vec<PeerId> = cfg.members.iter().copied().filter(|p| *p != me).collect();
    let met = meet(comm, cfg, &others, state.clone()).await;
    advance(comm, &mut state, met);
    comm.set_progress(state.clone());
    // A member that came back watches one round complete before it aggregates, so it does
    // not start a round the others already gave to someone else while it was away. One whose
    // result went into the last round was not away, only slower to get here than that round
    // (its executor runs from the start): it takes its turn, or the round would wait on it.
    let was_away = !state.contributors.contains(&me) || state.passed_over.contains(&me);
    let mut observing = state.round > 0 && was_away;
    let mut reports = Vec::new();
    let mut round_started = Instant::now();
    while state.round < cfg.rounds {
        let round = state.round;
        let (agg, passed_over) = aggregator(comm, cfg, round).await?;
        if agg == me && !observing {
            for dead in &passed_over {
                tracing::warn!(
                    job = %comm.job(),
                    round,
                    dead = %comm.name_of(dead),
                    successor = %comm.name_of(&me),
                    "aggregator is gone; its successor takes over the round"
                );
            }
            let (next, report) = aggregate(comm, cfg, &state, layout.clone(), passed_over).await?;
            advance(comm, &mut state, next);
            comm.set_progress(state.clone());
            let targets: Vec<PeerId> = others.clone();
            let failed = comm.announce(&targets, &state).await;
            for (peer, why) in &failed {
                tracing::debug!(job = %comm.job(), round, %peer, %why, "could not announce the round");
            }
            reports.push(SwarmRound {
                secs: round_started.elapsed().as_secs_f64(),
                ..report
            });
            round_started = Instant::now();
            if state.round == cfg.rounds {
                let told: Vec<PeerId> = targets
                    .into_iter()
                    .filter(|p| !failed.iter().any(|(f, _)| f == p))
                    .collect();
                wait_for_pulls(comm, cfg, &told).await;
            }
            continue;
        }
        // Wait for round `round`'s result, watching its aggregator.
        match watch_round(comm, cfg, agg, &state).await? {
            Watched::Announced(p) => {
                // Pull the new model now (the next task needs it anyway): should its
                // aggregator die before anyone else has it, a successor finds it here.
                let pulled = match cfg.share_upload {
                    // Every member but the aggregator pulls it now: they share the upload.
                    true => {
                        let owners: Vec<PeerId> = cfg.members.iter().copied().filter(|m| *m != p.aggregator).collect();
                        comm.hold_shared(p.model, &p.holders, &owners).await
                    }
                    false => comm.hold(p.model, &p.holders).await,
                };
                if let Err(e) = pulled {
                    tracing::debug!(job = %comm.job(), round = p.round, error = %e, "could not pull the announced model yet");
                }
                reports.push(SwarmRound {
                    round: p.round - 1,
                    aggregator: p.aggregator,
                    contributors: p.contributors.clone(),
                    passed_over: p.passed_over.clone(),
                    secs: round_started.elapsed().as_secs_f64(),
                    global: p.metrics.clone(),
                });
                round_started = Instant::now();
                advance(comm, &mut state, *p);
                comm.set_progress(state.clone());
                observing = false;
            }
            Watched::WaitedLongEnough => observing = false,
            Watched::Failover => {}
        }
    }
    // Everyone ends with the final model; tell its holder we have it.
    let holders = state.holders.clone();
    let model = match comm.node().store().streams(state.model.len) {
        true => {
            comm.hold(state.model, &holders).await?;
            GlobalModel::Stored(state.model)
        }
        false => GlobalModel::Memory(comm.pull_model(state.model, &holders).await?),
    };
    if !holders.contains(&me) {
        let mut got = state.clone();
        got.holders = vec![me];
        comm.announce(&holders, &got).await;
    }
    Ok(SwarmOutcome {
        model,
        rounds: reports,
        completed: state.round,
    })
}

/// Moves this member on to `next`: the model of the round before is needed no more here (a
/// round's model is what its aggregator and the holders serve; once the next is known, no
/// failover goes back to it), so the job's hold on it ends.
fn advance(comm: &Communicator, state: &mut Progress, next: Progress) {
    let old = std::mem::replace(state, next);
    if old.model.id != state.model.id {
        comm.release(&old.model);
    }
}

/// Meets the other members (bounded by a round timeout); a member that comes back learns
/// from them where the job stands, and returns that instead of `state`. So does a member whose
/// executor trained while this part was still meeting: the rounds it missed were announced
/// to it meanwhile, and a member it never met may have finished the job and left.
async fn meet(comm: &Communicator, cfg: &SwarmConfig, others: &[PeerId], mut state: Progress) -> Progress {
    let deadline = Instant::now() + cfg.round_timeout;
    let mut met = HashSet::new();
    while met.len() < others.len() && Instant::now() < deadline {
        let unmet: Vec<PeerId> = others.iter().copied().filter(|p| !met.contains(p)).collect();
        for peer in unmet {
            match comm.join(peer, &cfg.name, cfg.spec_hash).await {
                Ok(progress) => {
                    met.insert(peer);
                    if let Some(p) = progress {
                        pick_up(comm, cfg, &mut state, p, &peer);
                    }
                }
                Err(e) => tracing::debug!(job = %comm.job(), %peer, error = %e, "member not there yet"),
            }
        }
        // The job is under way: this member came back and need not wait for everyone.
        if state.round > 0 {
            break;
        }
        if met.len() < others.len() {
            let mut until = Instant::now() + Duration::from_millis(200);
            while let Some((from, p)) = comm.next_progress(until).await {
                pick_up(comm, cfg, &mut state, p, &from);
                // What else came meanwhile, without waiting.
                until = Instant::now();
            }
        }
    }
    state
}

/// Takes `p`, where `from` says the job stands, as this member's `state` when it is further on.
fn pick_up(comm: &Communicator, cfg: &SwarmConfig, state: &mut Progress, p: Progress, from: &PeerId) {
    if p.round > state.round && p.round <= cfg.rounds {
        tracing::info!(
            job = %comm.job(),
            round = p.round,
            from = %comm.name_of(from),
            "picking up where the job stands"
        );
        *state = p;
    }
}

/// Runs round `state.round` as its aggregator; returns the new progress and the round.
async fn aggregate(
    comm: &Communicator,
    cfg: &SwarmConfig,
    state: &Progress,
    layout: flare_protocols::model::Layout,
    passed_over: Vec<PeerId>,
) -> Result<(Progress, SwarmRound), SwarmError> {
    let me = comm.me();
    let round = state.round;
    tracing::info!(job = %comm.job(), round, "aggregating this round");
    // Hold the round's input first, so members can pull it from here too: from its holders,
    // else from any member that pulled it when it was announced.
    let mut sources = state.holders.clone();
    sources.extend(
        cfg.members
            .iter()
            .copied()
            .filter(|p| *p != me && !state.holders.contains(p)),
    );
    comm.hold(state.model, &sources).await?;
    let mut input_from = vec![me];
    input_from.extend(state.holders.iter().copied().filter(|p| *p != me));
    let fcfg = FedAvgConfig {
        rounds: cfg.rounds,
        min_clients: cfg.min_clients,
        round_timeout: cfg.round_timeout,
        clients: cfg.members.clone(),
        checkpoint_dir: None,
        checkpoint_policy: Default::default(),
        sample: None,
        evaluate: cfg.evaluate.clone(),
        share_upload: false,
    };
    let sent = tokio::sync::Notify::new();
    let work = fedavg::one_round(
        comm,
        &fcfg,
        fedavg::Global {
            blob: state.model,
            lent: None,
            written: crate::store::Written::done(),
        },
        &input_from,
        layout,
        round,
        Some(&sent),
    );
    let first_choice = cfg.members.get(round as usize % cfg.members.len().max(1)) == Some(&me);
    let crash = cfg.crash_in_round == Some(round) && first_choice;
    let Some(result) = faults::run_or_crash(comm, round, crash, &sent, work).await else {
        return Err(SwarmError::Crashed(round));
    };
    let (model, report) = result?;
    let blob = match model {
        GlobalModel::Memory(m) => comm.publish(Arc::new(m)).await?,
        // Folded on disk: filed in the store already.
        GlobalModel::Stored(b) => b,
    };
    let contributors: Vec<PeerId> = cfg
        .members
        .iter()
        .copied()
        .filter(|p| {
            comm.peers()
                .iter()
                .any(|m| m.peer_id == *p && report.contributors.contains(&m.name))
        })
        .collect();
    let next = Progress {
        round: round + 1,
        model: blob,
        holders: vec![me],
        aggregator: me,
        contributors: contributors.clone(),
        metrics: report.global.clone(),
        passed_over: passed_over.clone(),
    };
    tracing::info!(job = %comm.job(), round, contributors = report.contributors.len(), global = ?report.global, "round aggregated");
    Ok((
        next,
        SwarmRound {
            round,
            aggregator: me,
            contributors,
            passed_over,
            secs: 0.0,
            global: report.global,
        },
    ))
}

/// The last aggregator stays until every member it told has pulled the final model (each
/// says so with a [`Progress`] naming itself a holder), or a round timeout passes.
async fn wait_for_pulls(comm: &Communicator, cfg: &SwarmConfig, told: &[PeerId]) {
    let mut waiting: HashSet<PeerId> = told.iter().copied().collect();
    let deadline = Instant::now() + cfg.round_timeout;
    while !waiting.is_empty() {
        match comm.next_progress(deadline).await {
            Some((from, p)) if p.round == cfg.rounds && p.holders.contains(&from) => {
                waiting.remove(&from);
            }
            Some(_) => {}
            None => {
                tracing::warn!(job = %comm.job(), missing = waiting.len(), "members did not confirm the final model");
                return;
            }
        }
    }
}
