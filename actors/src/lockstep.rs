//! Keeps several streams over the same chunks in step, so that what the slowest needs is still
//! in memory when it gets there, and what the fastest produced is still there when the
//! others want it.
//!
//! Two places need this: the pulls of a round's results, folded into a mean on disk through a
//! window of chunks (`job/fold.rs`, `aggregate/window.rs`), and the streams of one blob served
//! from disk to several peers, which share the chunks read lately (`blob/recent.rs`). Each
//! member says where it is; one more than a lead ahead of the slowest other member waits.
//!
//! Waiting costs nothing while the members share one bottleneck (the CPU, the disk) and saves
//! reading the same chunks from disk again. A member whose source or receiver stalls would
//! hold the others back with it, so a member that has not moved for the patience stops
//! counting until it moves again: a stalled member holds the others up once, for the
//! patience, not once per chunk. A member that ends, however it ends, stops counting.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

use crate::lock;

/// Members' positions, and when each last moved. Shared behind an `Arc`.
#[derive(Debug)]
pub(crate) struct Lockstep {
    lead: u64,
    patience: Duration,
    members: Mutex<HashMap<u64, (u64, Instant)>>,
    next: AtomicU64,
    /// Woken whenever a member moves or leaves.
    moved: Notify,
}

/// One member's place in a [`Lockstep`]; it stops counting when dropped.
#[derive(Debug)]
pub(crate) struct Member {
    step: Arc<Lockstep>,
    id: u64,
}

impl Lockstep {
    /// Members that may run `lead` chunks ahead of the slowest moving one, which stops
    /// counting after `patience` without moving.
    pub(crate) fn new(lead: u64, patience: Duration) -> Self {
        Self {
            lead: lead.max(1),
            patience,
            members: Mutex::new(HashMap::new()),
            next: AtomicU64::new(0),
            moved: Notify::new(),
        }
    }

    /// A member starting now, at position `at`.
    pub(crate) fn join(self: &Arc<Self>, at: u64) -> Member {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        lock(&self.members).insert(id, (at, Instant::now()));
        self.moved.notify_waiters();
        Member { step: self.clone(), id }
    }

    /// Members counted, moving or not.
    pub(crate) fn len(&self) -> usize {
        lock(&self.members).len()
    }
}

impl Member {
    /// This member's position.
    pub(crate) fn at(&self) -> u64 {
        lock(&self.step.members).get(&self.id).map_or(0, |m| m.0)
    }

    /// This member is now at `at` (a move, if it differs from where it was).
    pub(crate) fn move_to(&self, at: u64) {
        if let Some(m) = lock(&self.step.members).get_mut(&self.id)
            && m.0 != at
        {
            *m = (at, Instant::now());
        }
        self.step.moved.notify_waiters();
    }

    /// One step on from where this member is.
    pub(crate) fn advance(&self) {
        if let Some(m) = lock(&self.step.members).get_mut(&self.id) {
            *m = (m.0 + 1, Instant::now());
        }
        self.step.moved.notify_waiters();
    }

    /// Whether another member, moving or not, has yet to pass position `at`.
    pub(crate) fn others_before(&self, at: u64) -> bool {
        lock(&self.step.members)
            .iter()
            .any(|(id, &(pos, _))| *id != self.id && pos <= at)
    }

    /// Whether position `at` is more than the lead ahead of the slowest other member that
    /// still moves.
    pub(crate) fn too_far(&self, at: u64) -> bool {
        self.slowest_other().is_some_and(|(s, _)| at > s + self.step.lead)
    }

    /// The slowest other member still moving: its position, and when its patience runs out.
    fn slowest_other(&self) -> Option<(u64, Instant)> {
        let now = Instant::now();
        let patience = self.step.patience;
        lock(&self.step.members)
            .iter()
            .filter(|(id, _)| **id != self.id)
            .map(|(_, &(at, moved))| (at, moved + patience))
            .filter(|&(_, until)| until > now)
            .min_by_key(|&(at, _)| at)
    }

    /// Waits while this member is more than the lead ahead of the slowest other member, and
    /// that member keeps moving (see the module doc).
    pub(crate) async fn in_step(&self) {
        let step = &self.step;
        let mine = self.at();
        loop {
            let moved = step.moved.notified();
            tokio::pin!(moved);
            moved.as_mut().enable();
            match self.slowest_other() {
                Some((s, until)) if mine > s + step.lead => {
                    // Until it moves (and is looked at again) or its patience runs out.
                    if tokio::time::timeout_at(until, moved).await.is_err() {
                        tracing::debug!(
                            mine,
                            slowest = s,
                            "one ahead stopped waiting for one that does not move"
                        );
                    }
                }
                _ => return,
            }
        }
    }
}

impl Drop for Member {
    fn drop(&mut self) {
        lock(&self.step.members).remove(&self.id);
        self.step.moved.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PATIENCE: Duration = Duration::from_secs(2);

    async fn goes_on(m: &Member) {
        tokio::time::timeout(Duration::from_millis(1), m.in_step())
            .await
            .expect("went on at once");
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_alone_or_within_the_lead_goes_on() {
        let step = Arc::new(Lockstep::new(2, PATIENCE));
        let a = step.join(0);
        a.move_to(5);
        goes_on(&a).await; // alone
        let b = step.join(0);
        b.move_to(3);
        goes_on(&a).await; // 5 <= 3 + 2
        goes_on(&b).await; // behind
        assert_eq!(step.len(), 2);
        drop(b);
        assert_eq!(step.len(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_ahead_waits_until_the_slowest_catches_up_or_ends() {
        let step = Arc::new(Lockstep::new(1, PATIENCE));
        let (a, b) = (step.join(0), step.join(0));
        a.move_to(4);
        assert!(a.too_far(4) && !b.too_far(0));
        let waiting = tokio::spawn(async move {
            a.in_step().await;
            a
        });
        tokio::time::sleep(PATIENCE / 4).await;
        b.move_to(1);
        tokio::time::sleep(PATIENCE / 4).await;
        assert!(!waiting.is_finished(), "still three ahead with a lead of 1");
        b.move_to(3); // 4 <= 3 + 1
        let a = tokio::time::timeout(Duration::from_millis(1), waiting)
            .await
            .expect("caught up")
            .expect("task");
        // The slowest ending lets the one ahead go at once.
        a.move_to(14);
        drop(b);
        goes_on(&a).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_member_that_stops_holds_the_others_up_once_until_it_moves_again() {
        let step = Arc::new(Lockstep::new(1, PATIENCE));
        let (a, b) = (step.join(0), step.join(0));
        a.move_to(4);
        let t = Instant::now();
        a.in_step().await;
        assert!(
            t.elapsed() >= PATIENCE && t.elapsed() < PATIENCE * 2,
            "{:?}",
            t.elapsed()
        );
        // While it stays where it is, it holds no one up again.
        a.move_to(5);
        assert!(!a.too_far(5));
        goes_on(&a).await;
        // Once it moves, it counts again.
        b.move_to(1);
        assert!(a.too_far(5));
        let t = Instant::now();
        a.in_step().await;
        assert!(t.elapsed() >= PATIENCE, "{:?}", t.elapsed());
    }
}
