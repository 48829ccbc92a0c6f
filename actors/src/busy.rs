//! Waiting on a busy peer. A source at its stream limit or a node whose control queues are
//! full answers `Busy`; the asker waits and asks again ([`Backoff`]) until its patience is
//! spent, and a busy peer is never mistaken for a gone one. What waits is logged at most
//! once per [`LOG_PERIOD`] for the whole process ([`Tally`]), not once per refusal: a `sim`
//! of a thousand members would otherwise print a line for each.

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use crate::lock;

/// Least time between two log lines of one [`Tally`].
pub const LOG_PERIOD: Duration = Duration::from_secs(5);

/// Longest pause between two tries.
const MAX_PAUSE: Duration = Duration::from_secs(2);

/// How long to keep asking a busy peer before giving up on it (a round's own timeout
/// usually ends the wait first).
pub const BUSY_PATIENCE: Duration = Duration::from_secs(600);

/// The pauses between tries at a busy peer: the peer's hint, doubling with each try up to
/// [`MAX_PAUSE`], with random jitter so that the peers refused together do not come back
/// together. From the first pause on, the wait is counted in its [`Tally`].
pub struct Backoff {
    tries: u32,
    patience: Duration,
    tally: &'static Tally,
    /// Set at the first pause: when the patience ends, and this wait's place in the tally.
    waiting: Option<(Instant, Waiting)>,
}

impl Backoff {
    /// Pauses of at most `patience` in all, from the first, counted in `tally`.
    pub fn new(patience: Duration, tally: &'static Tally) -> Self {
        Self {
            tries: 0,
            patience,
            tally,
            waiting: None,
        }
    }

    /// Sleeps before the next try, at least `hint`; `false` (at once) when the patience
    /// would be spent first.
    pub async fn wait(&mut self, hint: Duration) -> bool {
        let (patience, tally) = (self.patience, self.tally);
        let until = self
            .waiting
            .get_or_insert_with(|| (Instant::now() + patience, tally.waiting()))
            .0;
        let grown = hint.max(Duration::from_millis(10)) * 2u32.saturating_pow(self.tries.min(8));
        let base = grown.min(MAX_PAUSE).max(hint);
        // Up to half again, at random.
        let jitter = base.mul_f64(rand::random_range(0.0..0.5));
        let pause = base + jitter;
        if Instant::now() + pause > until {
            return false;
        }
        self.tries += 1;
        tokio::time::sleep(pause).await;
        true
    }

    /// Tries so far.
    pub fn tries(&self) -> u32 {
        self.tries
    }
}

/// A process-wide count of one kind of wait, logged at most once per [`LOG_PERIOD`].
pub struct Tally {
    what: &'static str,
    /// Waits under way now.
    waiting: AtomicU64,
    /// Events since the last line.
    events: AtomicU64,
    last: Mutex<Option<Instant>>,
    /// A line is due at the end of the current period.
    flush_queued: AtomicBool,
}

impl Tally {
    /// A tally whose lines say `what` (e.g. "blob pulls wait for a busy source").
    pub const fn new(what: &'static str) -> Self {
        Self {
            what,
            waiting: AtomicU64::new(0),
            events: AtomicU64::new(0),
            last: Mutex::new(None),
            flush_queued: AtomicBool::new(false),
        }
    }

    /// Counts one event (a refusal, a pause) and logs the tally if a period has passed.
    pub fn event(&'static self) {
        self.events.fetch_add(1, Ordering::Relaxed);
        self.maybe_log();
    }

    /// Counts a wait under way until the guard is dropped.
    pub fn waiting(&'static self) -> Waiting {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        self.event();
        Waiting(self)
    }

    /// Logs now if a period has passed since the last line; otherwise makes sure one line
    /// comes at the end of this period, so the tally of a burst is not lost.
    fn maybe_log(&'static self) {
        let now = Instant::now();
        let due = {
            let mut last = lock(&self.last);
            match *last {
                Some(t) if now.duration_since(t) < LOG_PERIOD => Some(t + LOG_PERIOD),
                _ => {
                    *last = Some(now);
                    None
                }
            }
        };
        match due {
            None => self.log(),
            Some(at) => {
                if !self.flush_queued.swap(true, Ordering::AcqRel)
                    && let Ok(rt) = tokio::runtime::Handle::try_current()
                {
                    rt.spawn(async move {
                        tokio::time::sleep_until(at).await;
                        self.flush_queued.store(false, Ordering::Release);
                        *lock(&self.last) = Some(Instant::now());
                        self.log();
                    });
                }
            }
        }
    }

    fn log(&self) {
        let events = self.events.swap(0, Ordering::Relaxed);
        if events == 0 {
            return;
        }
        let waiting = self.waiting.load(Ordering::Relaxed);
        tracing::info!(waiting, events, period_secs = LOG_PERIOD.as_secs(), "{}", self.what);
    }
}

/// One wait counted by a [`Tally`] while it lives.
pub struct Waiting(&'static Tally);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Blob pulls pausing because their source was busy.
pub static BUSY_PULLS: Tally = Tally::new("blob pulls wait for a busy source");
/// Blob streams this process's sources answered busy.
pub static BUSY_STREAMS: Tally = Tally::new("blob streams answered busy: at the stream limit");
/// Control requests pausing because their peer was busy.
pub static BUSY_REQUESTS: Tally = Tally::new("control requests wait for a busy peer");
/// Control requests this process's nodes answered busy.
pub static BUSY_ANSWERS: Tally = Tally::new("control requests answered busy: queue full");

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn backoff_grows_honours_the_hint_and_ends_with_the_patience() {
        static WAITS: Tally = Tally::new("test waits");
        let mut b = Backoff::new(Duration::from_secs(10), &WAITS);
        let t0 = Instant::now();
        assert!(b.wait(Duration::from_millis(100)).await);
        let first = t0.elapsed();
        assert!(
            first >= Duration::from_millis(100) && first <= Duration::from_millis(150),
            "{first:?}"
        );
        let mut tries = 1;
        while b.wait(Duration::from_millis(100)).await {
            tries += 1;
            assert!(tries < 100, "the patience must end the waits");
        }
        assert!(t0.elapsed() <= Duration::from_secs(10));
        // Pauses grow to MAX_PAUSE (at most 3 s with jitter), so 10 s takes a handful of tries.
        assert!((4..=12).contains(&tries), "{tries}");
        assert_eq!(b.tries(), tries);
    }
}
