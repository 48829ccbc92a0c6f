//! Fault injection, for `sim` and the tests: a member that plays a crash at a chosen moment,
//! so that failover can be shown on one machine (`crash_aggregator_in_round` in a swarm
//! topology). Every fault a workflow can fake is played here, in one place, and none is
//! unless the job's configuration asks for it.

use std::future::Future;

use tokio::sync::Notify;

use super::communicator::Communicator;

/// Runs `work` (round `round` of this member); when `crash` is set, this member instead
/// crashes as soon as `sent` fires (the round's tasks are out, so the others are left
/// waiting on it): its network stops, as a killed process's would, and `None` comes back.
pub(crate) async fn run_or_crash<T>(
    comm: &Communicator,
    round: u32,
    crash: bool,
    sent: &Notify,
    work: impl Future<Output = T>,
) -> Option<T> {
    if !crash {
        return Some(work.await);
    }
    tokio::select! {
        r = work => Some(r),
        _ = sent.notified() => {
            tracing::warn!(job = %comm.job(), round, "fault injection: this member crashes now");
            comm.node().net().shutdown();
            None
        }
    }
}
