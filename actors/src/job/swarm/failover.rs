//! Who aggregates a swarm round, and how a member that does not watches the one who does:
//! the rule every member applies alone (the first live member of the rotation), and failover
//! when the aggregator stops answering heartbeats.

use flare_protocols::ctl::Progress;
use libp2p::PeerId;
use tokio::time::Instant;

use super::{MISSES, SwarmConfig, SwarmError};
use crate::job::communicator::Communicator;

/// The aggregator of `round` by the rule in the swarm module's doc, probing from the rotation start;
/// also the members passed over because they did not answer.
pub(super) async fn aggregator(
    comm: &Communicator,
    cfg: &SwarmConfig,
    round: u32,
) -> Result<(PeerId, Vec<PeerId>), SwarmError> {
    let n = cfg.members.len();
    let me = comm.me();
    let mut passed_over = Vec::new();
    for k in 0..n {
        let peer = cfg.members[(round as usize + k) % n];
        if peer == me || comm.is_alive(peer).await {
            return Ok((peer, passed_over));
        }
        passed_over.push(peer);
    }
    Err(SwarmError::NoAggregator(round))
}

/// What came of waiting for a round that another member aggregates.
pub(super) enum Watched {
    /// It was announced: where the job stands now.
    Announced(Box<Progress>),
    /// This member would aggregate it itself, but came back and waited for whoever runs it,
    /// up to two round timeouts: it takes its turn now.
    WaitedLongEnough,
    /// Its aggregator stopped answering heartbeats: the rule picks another.
    Failover,
}

/// Waits for round `state.round`'s result, watching its aggregator `agg`.
pub(super) async fn watch_round(
    comm: &Communicator,
    cfg: &SwarmConfig,
    agg: PeerId,
    state: &Progress,
) -> Result<Watched, SwarmError> {
    let round = state.round;
    let me = comm.me();
    let mut misses = 0;
    let give_up = Instant::now() + 2 * cfg.round_timeout;
    loop {
        match comm.next_progress(Instant::now() + cfg.heartbeat).await {
            Some((from, p)) if p.round > state.round && p.round <= cfg.rounds => {
                // Each member's own news (in `run`, a member's log is its process's).
                tracing::info!(
                    job = %comm.job(),
                    round = p.round - 1,
                    aggregator = %comm.name_of(&p.aggregator),
                    from = %comm.name_of(&from),
                    "round announced"
                );
                return Ok(Watched::Announced(Box::new(p)));
            }
            Some(_) => continue,
            None if agg == me => {
                if Instant::now() >= give_up {
                    return Ok(Watched::WaitedLongEnough);
                }
            }
            None => {
                if comm.is_alive(agg).await {
                    misses = 0;
                    continue;
                }
                misses += 1;
                if misses >= MISSES {
                    let (successor, _) = aggregator(comm, cfg, round).await?;
                    tracing::warn!(
                        job = %comm.job(),
                        round,
                        dead = %comm.name_of(&agg),
                        successor = %comm.name_of(&successor),
                        "aggregator is gone; its successor takes over the round"
                    );
                    return Ok(Watched::Failover);
                }
            }
        }
    }
}
