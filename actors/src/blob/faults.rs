//! Fault injection for the serving side, so tests can prove what the receiver does when a
//! source cuts the connection, lies, or stalls. Inert unless a plan is armed.

use std::sync::Mutex;

use crate::lock;

/// What a source should do wrong. Counts are chunks served by this node since arming.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FaultPlan {
    /// Flip a byte of this chunk index every time it is served.
    pub corrupt_chunk: Option<u64>,
    /// Close the whole connection to the receiver once this many chunks were served (once).
    pub cut_after: Option<u64>,
    /// Stop sending once this many chunks were served, until the plan is changed.
    pub stall_after: Option<u64>,
    /// Offer bulk connections at a port nobody listens on (a firewall between the peers).
    pub bulk_unreachable: bool,
    /// Stop streaming an output still being produced once this many of its chunks were
    /// sent (its producer goes on and stores it; the rest is answered absent).
    pub drop_pending_after: Option<u64>,
}

/// A node's armed fault plan (shared with its blob server).
#[derive(Debug, Default)]
pub struct ServeFaults {
    plan: Mutex<FaultPlan>,
}

impl ServeFaults {
    /// Replaces the plan.
    pub fn arm(&self, plan: FaultPlan) {
        *lock(&self.plan) = plan;
    }

    /// The plan in force.
    pub fn plan(&self) -> FaultPlan {
        lock(&self.plan).clone()
    }

    /// Whether to cut after `served` chunks; disarms the cut when it fires.
    pub(crate) fn take_cut(&self, served: u64) -> bool {
        let mut p = lock(&self.plan);
        if p.cut_after.is_some_and(|n| served >= n) {
            p.cut_after = None;
            return true;
        }
        false
    }
}
