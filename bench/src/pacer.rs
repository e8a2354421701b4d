//! A shared rate limiter for many tasks: each call reserves the next free send time on a
//! schedule of one event per `interval`. Lock-free (one compare-and-swap), so 15,000 tasks can
//! share it; a small burst allowance lets a late schedule catch up a little but never by
//! flooding.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::time::Instant;

pub struct Pacer {
    start: Instant,
    interval_ns: u64,
    burst_ns: u64,
    next_ns: AtomicU64,
}

impl Pacer {
    /// `None` for a rate of 0 (unthrottled).
    pub fn new(per_second: f64) -> Option<Pacer> {
        if per_second <= 0.0 || !per_second.is_finite() {
            return None;
        }
        let interval_ns = ((1e9 / per_second) as u64).max(1);
        Some(Pacer {
            start: Instant::now(),
            interval_ns,
            // At most 10 ms (or one event) of slack after a stall.
            burst_ns: interval_ns.max(10_000_000),
            next_ns: AtomicU64::new(0),
        })
    }

    /// Reserves a slot and returns when it is due.
    pub fn reserve(&self) -> Instant {
        let now = u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX);
        let floor = now.saturating_sub(self.burst_ns);
        let mut cur = self.next_ns.load(Ordering::Relaxed);
        loop {
            let at = cur.max(floor);
            match self.next_ns.compare_exchange_weak(
                cur,
                at.saturating_add(self.interval_ns),
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return self.start + Duration::from_nanos(at),
                Err(actual) => cur = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_means_unthrottled() {
        assert!(Pacer::new(0.0).is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn slots_are_spaced_by_interval() {
        let p = Pacer::new(100.0).unwrap();
        let a = p.reserve();
        let b = p.reserve();
        let c = p.reserve();
        assert_eq!(b - a, Duration::from_millis(10));
        assert_eq!(c - b, Duration::from_millis(10));
    }

    #[tokio::test(start_paused = true)]
    async fn idle_time_is_not_banked_beyond_the_burst() {
        let p = Pacer::new(1000.0).unwrap();
        tokio::time::advance(Duration::from_secs(5)).await;
        let now = Instant::now();
        // 10 ms of burst at 1 ms per event: about 10 events are due at once, not 5000.
        let due_now = (0..100).filter(|_| p.reserve() <= now).count();
        assert!((10..=11).contains(&due_now), "{due_now}");
    }
}
