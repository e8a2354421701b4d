//! Counters and latency histograms of one worker process, and the per-second `Tick` it sends to
//! the parent. Counters are cumulative atomics; a tick carries the differences since the
//! previous tick, so the parent's per-second series adds up to the totals by construction — and
//! the `Done` message carries the cumulative totals separately so that this can be checked.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use hdrhistogram::serialization::{Deserializer, Serializer as _, V2Serializer};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Latencies are recorded in microseconds, 1 µs .. 1 h, 3 significant digits.
pub const HIST_MAX_US: u64 = 3_600_000_000;

pub fn new_histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; this cannot fail.
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).unwrap_or_else(|_| unreachable!())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Read,
    Write,
}

impl Op {
    pub fn name(self) -> &'static str {
        match self {
            Op::Read => "read",
            Op::Write => "write",
        }
    }
}

/// Cumulative counts; also the shape of a tick's deltas and of the totals.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counts {
    pub connects_ok: u64,
    pub connects_failed: u64,
    pub disconnects: u64,
    pub reads_issued: u64,
    pub reads_ok: u64,
    pub reads_failed: u64,
    pub writes_issued: u64,
    pub writes_ok: u64,
    pub writes_failed: u64,
}

impl Counts {
    pub fn add(&mut self, o: &Counts) {
        self.connects_ok += o.connects_ok;
        self.connects_failed += o.connects_failed;
        self.disconnects += o.disconnects;
        self.reads_issued += o.reads_issued;
        self.reads_ok += o.reads_ok;
        self.reads_failed += o.reads_failed;
        self.writes_issued += o.writes_issued;
        self.writes_ok += o.writes_ok;
        self.writes_failed += o.writes_failed;
    }

    fn minus(&self, o: &Counts) -> Counts {
        Counts {
            connects_ok: self.connects_ok - o.connects_ok,
            connects_failed: self.connects_failed - o.connects_failed,
            disconnects: self.disconnects - o.disconnects,
            reads_issued: self.reads_issued - o.reads_issued,
            reads_ok: self.reads_ok - o.reads_ok,
            reads_failed: self.reads_failed - o.reads_failed,
            writes_issued: self.writes_issued - o.writes_issued,
            writes_ok: self.writes_ok - o.writes_ok,
            writes_failed: self.writes_failed - o.writes_failed,
        }
    }
}

/// One second of one worker process (or, in the parent, of all of them merged).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Tick {
    /// Seconds since the run's epoch (this tick covers [t, t+1)); the last tick of a worker
    /// holds whatever happened after its last full second.
    pub t: u32,
    pub conns_open: i64,
    pub counts: Counts,
    /// Failures in this tick by `op/kind` (e.g. `connect/io:ECONNREFUSED`, `read/57P01`).
    pub errors: BTreeMap<String, u64>,
    /// V2-serialized, base64 histograms of this tick's latencies (µs).
    pub read_hist: String,
    pub write_hist: String,
    pub connect_hist: String,
}

/// What a worker process writes to its stdout, one JSON object per line.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Message {
    Tick(Tick),
    Done {
        totals: Counts,
        errors: BTreeMap<String, u64>,
        peak_conns_open: i64,
    },
    Failed {
        message: String,
    },
}

#[derive(Default)]
pub struct Stats {
    conns_open: AtomicI64,
    peak_conns_open: AtomicI64,
    connects_ok: AtomicU64,
    connects_failed: AtomicU64,
    disconnects: AtomicU64,
    reads_issued: AtomicU64,
    reads_ok: AtomicU64,
    reads_failed: AtomicU64,
    writes_issued: AtomicU64,
    writes_ok: AtomicU64,
    writes_failed: AtomicU64,
    /// Errors since the last tick and since the start. Errors are rare next to successes, so
    /// a lock here costs nothing on the hot path.
    errors: Mutex<ErrorCounts>,
    hists: Mutex<Hists>,
}

#[derive(Default)]
struct ErrorCounts {
    tick: BTreeMap<String, u64>,
    total: BTreeMap<String, u64>,
}

/// This tick's histograms. One short lock per recorded latency: uncontended it costs tens of
/// nanoseconds, far below a query round trip.
struct Hists {
    read: Histogram<u64>,
    write: Histogram<u64>,
    connect: Histogram<u64>,
}

impl Default for Hists {
    fn default() -> Self {
        Hists {
            read: new_histogram(),
            write: new_histogram(),
            connect: new_histogram(),
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}

impl Stats {
    pub fn connected(&self, took: Duration) {
        let open = self.conns_open.fetch_add(1, Relaxed) + 1;
        self.peak_conns_open.fetch_max(open, Relaxed);
        // Counted under the histogram lock, like successes: see `tick`.
        let mut h = self.lock_hists();
        self.connects_ok.fetch_add(1, Relaxed);
        h.connect.saturating_record(micros(took));
    }

    pub fn connect_failed(&self, kind: &str) {
        self.error(&self.connects_failed, format!("connect/{kind}"), 1);
    }

    pub fn disconnected(&self) {
        self.disconnects.fetch_add(1, Relaxed);
        self.conns_open.fetch_sub(1, Relaxed);
    }

    pub fn issued(&self, op: Op) {
        match op {
            Op::Read => &self.reads_issued,
            Op::Write => &self.writes_issued,
        }
        .fetch_add(1, Relaxed);
    }

    pub fn succeeded(&self, op: Op, took: Duration) {
        let mut h = self.lock_hists();
        match op {
            Op::Read => {
                self.reads_ok.fetch_add(1, Relaxed);
                h.read.saturating_record(micros(took));
            }
            Op::Write => {
                self.writes_ok.fetch_add(1, Relaxed);
                h.write.saturating_record(micros(took));
            }
        }
    }

    pub fn failed(&self, op: Op, kind: &str) {
        let counter = match op {
            Op::Read => &self.reads_failed,
            Op::Write => &self.writes_failed,
        };
        self.error(counter, format!("{}/{kind}", op.name()), 1);
    }

    /// Counts a failure under the error lock, so that a tick's error map matches its counts.
    fn error(&self, counter: &AtomicU64, key: String, n: u64) {
        let mut e = self.lock_errors();
        counter.fetch_add(n, Relaxed);
        *e.tick.entry(key.clone()).or_default() += n;
        *e.total.entry(key).or_default() += n;
    }

    pub fn counts(&self) -> Counts {
        Counts {
            connects_ok: self.connects_ok.load(Relaxed),
            connects_failed: self.connects_failed.load(Relaxed),
            disconnects: self.disconnects.load(Relaxed),
            reads_issued: self.reads_issued.load(Relaxed),
            reads_ok: self.reads_ok.load(Relaxed),
            reads_failed: self.reads_failed.load(Relaxed),
            writes_issued: self.writes_issued.load(Relaxed),
            writes_ok: self.writes_ok.load(Relaxed),
            writes_failed: self.writes_failed.load(Relaxed),
        }
    }

    pub fn conns_open(&self) -> i64 {
        self.conns_open.load(Relaxed)
    }

    pub fn done_message(&self) -> Message {
        Message::Done {
            totals: self.counts(),
            errors: self.lock_errors().total.clone(),
            peak_conns_open: self.peak_conns_open.load(Relaxed),
        }
    }

    /// Takes this tick's deltas (relative to `prev`, which it then updates) and histograms.
    pub fn tick(&self, t: u32, prev: &mut Counts) -> Tick {
        // Successes and connects are counted under the histogram lock, so reading the counters
        // while holding it makes each tick's histograms hold exactly its ok-counts.
        // Failures likewise under the error lock. Lock order: histograms, then errors (no
        // other path holds both).
        let (hists, errors, now) = {
            let mut h = self.lock_hists();
            let mut e = self.lock_errors();
            (
                std::mem::take(&mut *h),
                std::mem::take(&mut e.tick),
                self.counts(),
            )
        };
        let delta = now.minus(prev);
        *prev = now;
        Tick {
            t,
            conns_open: self.conns_open(),
            counts: delta,
            errors,
            read_hist: encode_histogram(&hists.read),
            write_hist: encode_histogram(&hists.write),
            connect_hist: encode_histogram(&hists.connect),
        }
    }

    fn lock_hists(&self) -> std::sync::MutexGuard<'_, Hists> {
        // A panic while holding the lock cannot leave a histogram half-updated in a way that
        // matters for a benchmark, so a poisoned lock is simply taken over.
        self.hists.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_errors(&self) -> std::sync::MutexGuard<'_, ErrorCounts> {
        self.errors.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub fn encode_histogram(h: &Histogram<u64>) -> String {
    let mut buf = Vec::new();
    // Serializing into a Vec only fails on a histogram that cannot be encoded at all.
    if V2Serializer::new().serialize(h, &mut buf).is_err() {
        return String::new();
    }
    base64::engine::general_purpose::STANDARD.encode(buf)
}

pub fn decode_histogram(s: &str) -> Option<Histogram<u64>> {
    if s.is_empty() {
        return Some(new_histogram());
    }
    let bytes = base64::engine::general_purpose::STANDARD.decode(s).ok()?;
    Deserializer::new().deserialize(&mut bytes.as_slice()).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_roundtrips_through_base64_v2() {
        let mut h = new_histogram();
        for v in [1, 10, 100, 1000, 123_456] {
            h.record(v).unwrap();
        }
        let back = decode_histogram(&encode_histogram(&h)).unwrap();
        assert_eq!(back.len(), 5);
        assert_eq!(back.max(), h.max());
        assert_eq!(back.value_at_quantile(0.5), h.value_at_quantile(0.5));
    }

    #[test]
    fn ticks_are_deltas_that_sum_to_totals() {
        let s = Stats::default();
        let mut prev = Counts::default();
        s.connected(Duration::from_millis(1));
        s.issued(Op::Read);
        s.succeeded(Op::Read, Duration::from_micros(300));
        let t0 = s.tick(0, &mut prev);
        s.issued(Op::Write);
        s.issued(Op::Write);
        s.failed(Op::Write, "23505");
        s.failed(Op::Write, "aborted");
        s.disconnected();
        let t1 = s.tick(1, &mut prev);
        let mut sum = t0.counts.clone();
        sum.add(&t1.counts);
        assert_eq!(sum, s.counts());
        assert_eq!(t1.errors.get("write/aborted"), Some(&1));
        assert_eq!(t1.errors.get("write/23505"), Some(&1));
        assert_eq!(t1.conns_open, 0);
        assert_eq!(decode_histogram(&t0.read_hist).unwrap().len(), 1);
        assert_eq!(decode_histogram(&t1.read_hist).unwrap().len(), 0);
    }

    #[test]
    fn messages_are_one_json_line() {
        let line = serde_json::to_string(&Message::Failed {
            message: "x\ny".into(),
        })
        .unwrap();
        assert!(!line.contains('\n'));
        let back: Message = serde_json::from_str(&line).unwrap();
        assert!(matches!(back, Message::Failed { .. }));
    }
}
