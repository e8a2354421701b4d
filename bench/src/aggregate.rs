//! The parent's view of the run: merges the worker processes' ticks second by second into one
//! series, keeps run-wide histograms, and sums their final totals. A second is final once every
//! worker still running has reported it.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::stats::{decode_histogram, new_histogram, Counts, Tick};

/// One second of the whole run.
#[derive(Debug, Clone, Serialize)]
pub struct Point {
    pub t: u32,
    pub conns_open: i64,
    #[serde(flatten)]
    pub counts: Counts,
    pub errors: BTreeMap<String, u64>,
    pub read_p50_ms: Option<f64>,
    pub read_p99_ms: Option<f64>,
    pub write_p50_ms: Option<f64>,
    pub write_p99_ms: Option<f64>,
    pub connect_p50_ms: Option<f64>,
    pub connect_p99_ms: Option<f64>,
}

struct Pending {
    conns_open: i64,
    counts: Counts,
    errors: BTreeMap<String, u64>,
    read: Histogram<u64>,
    write: Histogram<u64>,
    connect: Histogram<u64>,
}

impl Pending {
    fn new() -> Pending {
        Pending {
            conns_open: 0,
            counts: Counts::default(),
            errors: BTreeMap::new(),
            read: new_histogram(),
            write: new_histogram(),
            connect: new_histogram(),
        }
    }
}

/// The seconds after warm-up: rates and latencies of the settled run.
pub struct Window {
    pub from: u32,
    pub to: u32,
    pub counts: Counts,
    pub read: Histogram<u64>,
    pub write: Histogram<u64>,
    pub connect: Histogram<u64>,
}

pub struct Aggregator {
    /// Per worker: last tick reported, and whether it is finished (done or gone).
    last: Vec<Option<u32>>,
    finished: Vec<bool>,
    pending: BTreeMap<u32, Pending>,
    pub series: Vec<Point>,
    pub read: Histogram<u64>,
    pub write: Histogram<u64>,
    pub connect: Histogram<u64>,
    /// Sum of the workers' own cumulative totals (from their `Done` messages).
    pub totals: Counts,
    pub errors: BTreeMap<String, u64>,
    /// Ticks whose histograms could not be decoded (should stay 0).
    pub bad_histograms: u64,
    pub steady: Window,
}

pub fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

fn quantile_ms(h: &Histogram<u64>, q: f64) -> Option<f64> {
    (!h.is_empty()).then(|| ms(h.value_at_quantile(q)))
}

impl Aggregator {
    /// `steady` = (from, to): the seconds [from, to) that form the steady window.
    pub fn new(workers: usize, steady: (u32, u32)) -> Aggregator {
        Aggregator {
            last: vec![None; workers],
            finished: vec![false; workers],
            pending: BTreeMap::new(),
            series: Vec::new(),
            read: new_histogram(),
            write: new_histogram(),
            connect: new_histogram(),
            totals: Counts::default(),
            errors: BTreeMap::new(),
            bad_histograms: 0,
            steady: Window {
                from: steady.0,
                to: steady.1,
                counts: Counts::default(),
                read: new_histogram(),
                write: new_histogram(),
                connect: new_histogram(),
            },
        }
    }

    /// Adds worker `w`'s tick; returns the seconds that became final (for the live line).
    pub fn tick(&mut self, w: usize, tick: Tick) -> Vec<Point> {
        if let Some(last) = self.last.get_mut(w) {
            *last = Some(last.map_or(tick.t, |l| l.max(tick.t)));
        }
        let p = self.pending.entry(tick.t).or_insert_with(Pending::new);
        p.conns_open += tick.conns_open;
        p.counts.add(&tick.counts);
        for (k, v) in tick.errors {
            *p.errors.entry(k).or_default() += v;
        }
        for (into, enc) in [
            (&mut p.read, &tick.read_hist),
            (&mut p.write, &tick.write_hist),
            (&mut p.connect, &tick.connect_hist),
        ] {
            match decode_histogram(enc) {
                Some(h) if into.add(&h).is_ok() => {}
                _ => self.bad_histograms += 1,
            }
        }
        self.settle()
    }

    /// Worker `w` sent its totals (or ended without them: then `totals` is `None`).
    pub fn finish(
        &mut self,
        w: usize,
        totals: Option<(&Counts, &BTreeMap<String, u64>)>,
    ) -> Vec<Point> {
        if let Some(f) = self.finished.get_mut(w) {
            *f = true;
        }
        if let Some((counts, errors)) = totals {
            self.totals.add(counts);
            for (k, v) in errors {
                *self.errors.entry(k.clone()).or_default() += v;
            }
        }
        self.settle()
    }

    /// Finalizes everything still pending (after all workers ended).
    pub fn flush(&mut self) -> Vec<Point> {
        self.finished.iter_mut().for_each(|f| *f = true);
        self.settle()
    }

    fn settle(&mut self) -> Vec<Point> {
        // The latest second every running worker has reported (all of them when none runs).
        let horizon = self
            .last
            .iter()
            .zip(&self.finished)
            .filter(|(_, done)| !**done)
            .map(|(last, _)| *last)
            .min();
        let mut out = Vec::new();
        while let Some(entry) = self.pending.first_entry() {
            let t = *entry.key();
            let ready = match horizon {
                None => true,
                Some(None) => false,
                Some(Some(h)) => t <= h,
            };
            if !ready {
                break;
            }
            let p = entry.remove();
            // Same bounds on both sides, so `add` cannot fail. The run-wide histograms are
            // built from the same ticks as the series, so they match it exactly.
            let _ = self.read.add(&p.read);
            let _ = self.write.add(&p.write);
            let _ = self.connect.add(&p.connect);
            let w = &mut self.steady;
            if (w.from..w.to).contains(&t) {
                w.counts.add(&p.counts);
                let _ = w.read.add(&p.read);
                let _ = w.write.add(&p.write);
                let _ = w.connect.add(&p.connect);
            }
            let point = Point {
                t,
                conns_open: p.conns_open,
                counts: p.counts,
                errors: p.errors,
                read_p50_ms: quantile_ms(&p.read, 0.5),
                read_p99_ms: quantile_ms(&p.read, 0.99),
                write_p50_ms: quantile_ms(&p.write, 0.5),
                write_p99_ms: quantile_ms(&p.write, 0.99),
                connect_p50_ms: quantile_ms(&p.connect, 0.5),
                connect_p99_ms: quantile_ms(&p.connect, 0.99),
            };
            self.series.push(point.clone());
            out.push(point);
        }
        out
    }

    /// Sum of the per-second series (to compare with `totals`).
    pub fn series_totals(&self) -> Counts {
        let mut c = Counts::default();
        for p in &self.series {
            c.add(&p.counts);
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::encode_histogram;

    fn tick(t: u32, reads: u64) -> Tick {
        let mut h = new_histogram();
        for _ in 0..reads {
            h.record(500).unwrap();
        }
        Tick {
            t,
            conns_open: 10,
            counts: Counts {
                reads_issued: reads,
                reads_ok: reads,
                ..Counts::default()
            },
            read_hist: encode_histogram(&h),
            ..Tick::default()
        }
    }

    #[test]
    fn a_second_is_final_when_all_running_workers_reported_it() {
        let mut a = Aggregator::new(2, (1, 2));
        assert!(a.tick(0, tick(0, 5)).is_empty());
        assert!(a.tick(0, tick(1, 5)).is_empty());
        let done = a.tick(1, tick(0, 7));
        assert_eq!(done.len(), 1);
        assert_eq!(done[0].counts.reads_ok, 12);
        assert_eq!(done[0].conns_open, 20);
        assert_eq!(done[0].read_p50_ms, Some(0.5));
        // Worker 1 finishes: second 1 no longer waits for it.
        let done = a.finish(1, None);
        assert_eq!(done.len(), 1);
        assert_eq!(a.series_totals().reads_ok, 17);
        assert_eq!(a.read.len(), 17);
        assert_eq!(a.steady.counts.reads_ok, 5, "only second 1 is steady");
        assert_eq!(a.steady.read.len(), 5);
        assert_eq!(a.bad_histograms, 0);
    }
}
