//! One connection slot: opens a session, runs queries on it, replaces it when its (churn)
//! lifetime ends or it breaks, until the run stops. Every loop here ends on the stop signal
//! (deadline, Ctrl-C) or when the process' query/connect budget is used up.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::watch;
use tokio::time::Instant;

use crate::cli::{is_writer, Profile, QueryMode};
use crate::pacer::Pacer;
use crate::query::{Prepared, Sql};
use crate::stats::{Op, Stats};
use crate::target::{Session, Target};

/// Everything the slots of one worker process share.
pub struct Shared {
    pub target: Target,
    pub stats: Arc<Stats>,
    pub sql: Sql,
    pub profile: Profile,
    pub mode: QueryMode,
    pub write_ratio: f64,
    /// Mean session lifetime under churn (steady profile); `None` = sessions live to the end.
    pub mean_lifetime: Option<Duration>,
    pub query_timeout: Duration,
    pub read_pacer: Option<Pacer>,
    pub write_pacer: Option<Pacer>,
    /// Churn profile: target connect rate.
    pub connect_pacer: Option<Pacer>,
    pub queries_left: Budget,
    pub connects_left: Budget,
    pub stop: watch::Sender<bool>,
}

/// A count that can only go down; running out of it stops the run.
pub struct Budget(AtomicU64);

impl Budget {
    pub fn new(n: u64) -> Budget {
        Budget(AtomicU64::new(n))
    }
    pub fn take(&self) -> bool {
        self.0
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
            .is_ok()
    }
}

/// Marks one open session in the stats; closing or dropping it (also when the task is aborted
/// at the end) counts the disconnect, so connects = disconnects after every run.
struct Open<'a> {
    stats: &'a Stats,
}

impl Drop for Open<'_> {
    fn drop(&mut self) {
        self.stats.disconnected();
    }
}

/// One query in flight: a query dropped before completing (task aborted at the end of the
/// grace period) counts as an `aborted` failure, so issued = succeeded + failed always holds.
struct InFlight<'a> {
    stats: &'a Stats,
    op: Op,
    settled: bool,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.stats.failed(self.op, "aborted");
        }
    }
}

/// Connect retry delay: 50 ms doubling to 1 s, with jitter so that refused slots do not
/// retry in lockstep.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Backoff {
        Backoff {
            next: Duration::from_millis(50),
        }
    }
    fn delay(&mut self, rng: &mut impl Rng) -> Duration {
        let d = self.next.mul_f64(rng.gen_range(0.5..1.5));
        self.next = (self.next * 2).min(Duration::from_secs(1));
        d
    }
}

fn stopped(stop: &watch::Receiver<bool>) -> bool {
    *stop.borrow()
}

/// Sleeps until `at`; false when the run stopped first.
async fn sleep_until_or_stop(stop: &mut watch::Receiver<bool>, at: Instant) -> bool {
    if stopped(stop) {
        return false;
    }
    let slept = tokio::select! {
        _ = tokio::time::sleep_until(at) => true,
        _ = stop.wait_for(|s| *s) => false,
    };
    slept && !stopped(stop)
}

impl Shared {
    fn halt(&self) {
        self.stop.send_replace(true);
    }

    /// Slot `slot` (global index over all processes), starting after `delay` (ramp-up).
    pub async fn run_slot(self: Arc<Self>, slot: usize, delay: Duration) {
        let op = if is_writer(slot, self.write_ratio) {
            Op::Write
        } else {
            Op::Read
        };
        let mut stop = self.stop.subscribe();
        let mut rng = StdRng::from_entropy();
        if !sleep_until_or_stop(&mut stop, Instant::now() + delay).await {
            return;
        }
        let per_session = match self.profile {
            Profile::Steady => None,
            Profile::Churn => Some(1),
        };
        while !stopped(&stop) {
            let Some((session, prepared)) = self.open(slot, &mut stop, &mut rng).await else {
                break;
            };
            let open = Open { stats: &self.stats };
            let until = self.mean_lifetime.map(|mean| {
                // Exponential lifetime: -mean * ln(U), U in (0, 1].
                let u: f64 = 1.0 - rng.gen::<f64>();
                Instant::now() + mean.mul_f64(-u.ln())
            });
            self.serve(
                &session,
                prepared.as_ref(),
                op,
                until,
                per_session,
                &mut stop,
                &mut rng,
            )
            .await;
            session.close().await;
            drop(open);
        }
    }

    /// Opens a session, retrying with backoff; `None` when the run stops or the connect budget
    /// is used up.
    async fn open(
        &self,
        slot: usize,
        stop: &mut watch::Receiver<bool>,
        rng: &mut StdRng,
    ) -> Option<(Session, Option<Prepared>)> {
        let mut backoff = Backoff::new();
        loop {
            if let Some(p) = &self.connect_pacer {
                if !sleep_until_or_stop(stop, p.reserve()).await {
                    return None;
                }
            }
            if stopped(stop) {
                return None;
            }
            if !self.connects_left.take() {
                self.halt();
                return None;
            }
            let started = Instant::now();
            let failure = match self.target.connect(slot).await {
                Ok(session) => {
                    let took = started.elapsed();
                    // Statements are prepared before the session counts as open, so that a
                    // failure here is a failed connect (and connects = disconnects holds).
                    if self.mode != QueryMode::Prepared {
                        self.stats.connected(took);
                        return Some((session, None));
                    }
                    match self.sql.prepare(&session.client).await {
                        Ok(p) => {
                            self.stats.connected(took);
                            return Some((session, Some(p)));
                        }
                        Err(e) => {
                            session.close().await;
                            format!("prepare:{}", e.kind())
                        }
                    }
                }
                Err(e) => e.kind(),
            };
            self.stats.connect_failed(&failure);
            let delay = backoff.delay(rng);
            if !sleep_until_or_stop(stop, Instant::now() + delay).await {
                return None;
            }
        }
    }

    /// Runs queries on one session until its lifetime ends, `limit` queries were run, the
    /// session breaks, or the run stops.
    #[allow(clippy::too_many_arguments)]
    async fn serve(
        &self,
        session: &Session,
        prepared: Option<&Prepared>,
        op: Op,
        until: Option<Instant>,
        limit: Option<u32>,
        stop: &mut watch::Receiver<bool>,
        rng: &mut StdRng,
    ) {
        let pacer = match op {
            Op::Read => self.read_pacer.as_ref(),
            Op::Write => self.write_pacer.as_ref(),
        };
        let mut ran = 0u32;
        loop {
            if stopped(stop) || until.is_some_and(|u| Instant::now() >= u) {
                return;
            }
            if limit.is_some_and(|l| ran >= l) {
                return;
            }
            if let Some(p) = pacer {
                if !sleep_until_or_stop(stop, p.reserve()).await {
                    return;
                }
            }
            if !self.queries_left.take() {
                self.halt();
                return;
            }
            ran += 1;
            self.stats.issued(op);
            let mut flight = InFlight {
                stats: &self.stats,
                op,
                settled: false,
            };
            let started = Instant::now();
            let outcome = tokio::time::timeout(
                self.query_timeout,
                self.sql.run(&session.client, self.mode, prepared, op, rng),
            )
            .await;
            flight.settled = true;
            match outcome {
                Ok(Ok(())) => self.stats.succeeded(op, started.elapsed()),
                Ok(Err(failure)) => {
                    self.stats.failed(op, &failure.kind());
                    if !failure.connection_survives() {
                        return;
                    }
                    // A statement that fails at once would otherwise spin: pause a little.
                    if !sleep_until_or_stop(stop, Instant::now() + Duration::from_millis(10)).await
                    {
                        return;
                    }
                }
                Err(_) => {
                    // The session's state is unknown after a timeout: replace it.
                    self.stats.failed(op, "timeout");
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_runs_out() {
        let b = Budget::new(2);
        assert!(b.take());
        assert!(b.take());
        assert!(!b.take());
        assert!(!b.take());
    }

    #[test]
    fn backoff_grows_to_a_second() {
        let mut rng = StdRng::seed_from_u64(1);
        let mut b = Backoff::new();
        let mut last = Duration::ZERO;
        for _ in 0..10 {
            last = b.delay(&mut rng);
        }
        assert!(last <= Duration::from_millis(1500));
        assert!(last >= Duration::from_millis(500));
    }

    #[test]
    fn dropped_flight_counts_as_aborted() {
        let stats = Stats::default();
        stats.issued(Op::Read);
        drop(InFlight {
            stats: &stats,
            op: Op::Read,
            settled: false,
        });
        let c = stats.counts();
        assert_eq!(c.reads_issued, c.reads_ok + c.reads_failed);
    }
}
