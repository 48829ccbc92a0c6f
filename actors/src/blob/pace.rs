//! A node's upload cap (`--max-upload`): every blob chunk it serves, to any peer on any
//! stream, waits for its turn on one shared schedule, so the node sends at most `rate` bytes a
//! second on average, whatever the number of receivers. Sites need it (a hospital's uplink is
//! shared), and it lets one machine show what sharing the upload between peers buys.
//!
//! The schedule is a virtual clock: each chunk is given the moment the link would be free for
//! it and the clock moves on by its length over the rate. A link idle for a while may send a
//! short burst ([`BURST`]) at once; beyond that, idle time is not saved up.

use std::sync::Mutex;
use std::time::Duration;

use tokio::time::Instant;

/// The longest burst a node that was idle may send at once.
pub const BURST: Duration = Duration::from_millis(50);

/// The shared schedule of one node's uploads.
#[derive(Debug)]
pub struct UploadPace {
    bytes_per_sec: u64,
    /// When the link is free for the next chunk.
    free_at: Mutex<Option<Instant>>,
}

impl UploadPace {
    /// A cap of `bytes_per_sec` (at least 1).
    pub fn new(bytes_per_sec: u64) -> Self {
        Self {
            bytes_per_sec: bytes_per_sec.max(1),
            free_at: Mutex::new(None),
        }
    }

    /// Waits until `len` bytes may go.
    pub async fn wait(&self, len: usize) {
        let at = self.slot(Instant::now(), len);
        tokio::time::sleep_until(at).await;
    }

    /// When `len` bytes asked for at `now` may start, booking the link for them.
    fn slot(&self, now: Instant, len: usize) -> Instant {
        let mut free_at = crate::lock(&self.free_at);
        let earliest = now.checked_sub(BURST).unwrap_or(now);
        let start = free_at.map_or(earliest, |f| f.max(earliest));
        let secs = len as f64 / self.bytes_per_sec as f64;
        *free_at = Some(start + Duration::from_secs_f64(secs));
        start
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: usize = 1 << 20;

    #[test]
    fn chunks_are_spaced_by_their_length_over_the_rate_across_all_callers() {
        let p = UploadPace::new(100 * MIB as u64);
        let t0 = Instant::now() + Duration::from_secs(1);
        // An idle link lets the first chunks go at once (a burst of at most BURST).
        let first = p.slot(t0, MIB);
        assert!(first <= t0);
        // Ten chunks asked at the same moment (ten streams) are booked one after another.
        let mut last = first;
        for _ in 0..10 {
            let s = p.slot(t0, MIB);
            let gap = s - last;
            assert!(
                gap.abs_diff(Duration::from_millis(10)) < Duration::from_micros(1),
                "{gap:?}"
            );
            last = s;
        }
        // 11 MiB at 100 MiB/s: the last starts 100 ms after the first.
        assert!((last - first).abs_diff(Duration::from_millis(100)) < Duration::from_micros(20));
    }

    #[test]
    fn idle_time_is_not_saved_up_beyond_a_burst() {
        let p = UploadPace::new(10 * MIB as u64);
        let t0 = Instant::now() + Duration::from_secs(1);
        p.slot(t0, MIB);
        // Ten seconds idle: the next chunk goes at once, but the one after waits its turn as
        // if the burst had been spent.
        let later = t0 + Duration::from_secs(10);
        let a = p.slot(later, MIB);
        let b = p.slot(later, MIB);
        assert_eq!(a, later - BURST);
        assert!((b - a).abs_diff(Duration::from_millis(100)) < Duration::from_micros(20));
        assert!(b > later, "a second chunk right after the burst waits");
    }
}
