//! Keeps the pulls of a round's results in step, so that every contribution to a chunk of a
//! mean on disk arrives while that chunk is in the mean's window in memory (see
//! `aggregate/window.rs`): a pull that has folded more than a lead of chunks beyond the
//! slowest other pull waits, before it grants its source the next credit, until the
//! others catch up.
//!
//! Waiting costs the round nothing while the pulls are bound by the controller's CPU (they
//! share it either way) and saves rereading the mean. A pull whose source stalls would hold
//! the others back with it, so a wait ends once the slowest pull has not moved for
//! [`PATIENCE`]; a pull that ends, however it ends, stops counting.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::aggregate::Accumulator;
use crate::lock;

/// How long a pull ahead waits for a slowest pull that does not move.
pub const PATIENCE: Duration = Duration::from_secs(2);

/// The pulls being folded into one mean, by chunks folded so far.
#[derive(Debug)]
pub(crate) struct Lockstep {
    lead: u64,
    folded: Mutex<BTreeMap<u64, u64>>,
    next: AtomicU64,
    moved: Notify,
}

/// One pull's place in a [`Lockstep`]; it stops counting when dropped.
#[derive(Debug)]
pub(crate) struct Pull {
    step: Arc<Lockstep>,
    id: u64,
}

impl Lockstep {
    /// Pulls that may run `lead` chunks ahead of the slowest.
    pub(crate) fn new(lead: u64) -> Self {
        Self {
            lead: lead.max(1),
            folded: Mutex::new(BTreeMap::new()),
            next: AtomicU64::new(0),
            moved: Notify::new(),
        }
    }

    /// The lockstep a mean needs: pulls within a quarter of its window of each other, so
    /// that the chunks of the slowest are still in the window when the fastest adds to them
    /// (each pull also has a few chunks in flight); `None` for a mean in memory, which any
    /// order suits.
    pub(crate) fn for_mean(acc: &Accumulator) -> Option<Self> {
        acc.window_chunks().map(|w| Self::new((w as u64 / 4).max(1)))
    }

    /// A pull starting now, at no chunk folded.
    pub(crate) fn join(self: &Arc<Self>) -> Pull {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.folded).insert(id, 0);
        self.moved.notify_waiters();
        Pull { step: self.clone(), id }
    }

    /// Chunks folded by the slowest pull other than `id`; `None` when `id` runs alone.
    fn slowest_other(&self, id: u64) -> Option<u64> {
        lock(&self.folded)
            .iter()
            .filter(|(k, _)| **k != id)
            .map(|(_, n)| *n)
            .min()
    }
}

impl Pull {
    /// One more chunk of this pull folded.
    pub(crate) fn folded_one(&self) {
        if let Some(n) = lock(&self.step.folded).get_mut(&self.id) {
            *n += 1;
        }
        self.step.moved.notify_waiters();
    }

    /// Waits while this pull is more than the lead ahead of the slowest other pull, and that
    /// pull keeps moving (see the module doc).
    pub(crate) async fn in_step(&self) {
        let step = &self.step;
        let mine = lock(&step.folded).get(&self.id).copied().unwrap_or(0);
        let mut last = None;
        let mut since = Instant::now();
        loop {
            let moved = step.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            let Some(slowest) = step.slowest_other(self.id) else {
                return;
            };
            if mine <= slowest + step.lead {
                return;
            }
            if last != Some(slowest) {
                (last, since) = (Some(slowest), Instant::now());
            }
            let left = PATIENCE.saturating_sub(since.elapsed());
            if left.is_zero() {
                tracing::debug!(mine, slowest, "a pull ahead stopped waiting for one that does not move");
                return;
            }
            let _ = tokio::time::timeout(left, moved).await;
        }
    }
}

impl Drop for Pull {
    fn drop(&mut self) {
        lock(&self.step.folded).remove(&self.id);
        self.step.moved.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pull_alone_or_within_the_lead_goes_on() {
        let step = Arc::new(Lockstep::new(2));
        let a = step.join();
        for _ in 0..5 {
            a.folded_one();
        }
        a.in_step().await; // alone
        let b = step.join();
        b.folded_one();
        b.folded_one();
        b.folded_one();
        a.in_step().await; // 5 <= 3 + 2
        b.in_step().await; // behind
    }

    #[tokio::test(start_paused = true)]
    async fn a_pull_ahead_waits_until_the_slowest_catches_up_or_ends() {
        let step = Arc::new(Lockstep::new(1));
        let a = step.join();
        let b = step.join();
        for _ in 0..4 {
            a.folded_one();
        }
        let waited = {
            let wait = a.in_step();
            tokio::pin!(wait);
            // Still waiting after the slowest moved once (it is still three behind).
            tokio::select! {
                _ = &mut wait => panic!("went on 4 ahead with a lead of 1"),
                _ = async { b.folded_one(); tokio::time::sleep(Duration::from_millis(500)).await } => {}
            }
            b.folded_one();
            b.folded_one(); // 4 <= 3 + 1
            let t = Instant::now();
            wait.await;
            t.elapsed()
        };
        assert!(waited < Duration::from_millis(10), "{waited:?}");
        // The slowest ending lets the one ahead go at once.
        for _ in 0..10 {
            a.folded_one();
        }
        drop(b);
        a.in_step().await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_pull_ahead_gives_up_on_one_that_does_not_move() {
        let step = Arc::new(Lockstep::new(1));
        let a = step.join();
        let _b = step.join();
        for _ in 0..4 {
            a.folded_one();
        }
        let t = Instant::now();
        a.in_step().await;
        assert!(t.elapsed() >= PATIENCE, "{:?}", t.elapsed());
    }
}
