//! What a run reports: the live line each second, the final summary on stdout, and the JSON
//! document (`--json`) with the summary, the per-second series and the HDR histograms.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::aggregate::{ms, Aggregator, Point};
use crate::cli::{Args, Profile, QueryMode};
use crate::stats::{encode_histogram, Counts};

#[derive(Debug, Serialize)]
pub struct Summary {
    pub tool: &'static str,
    pub version: &'static str,
    /// Unix ms of the run's epoch.
    pub started_unix_ms: u64,
    pub target: String,
    pub config: RunConfig,
    /// Seconds from the start until the load stopped (at most `duration`).
    pub run_s: f64,
    /// Seconds until the last worker ended (includes draining in-flight queries).
    pub elapsed_s: f64,
    /// The workers' own cumulative totals.
    pub totals: Counts,
    /// The sum of the per-second series; equal to `totals` on a healthy run.
    pub series_totals: Counts,
    pub queries_issued: u64,
    pub queries_ok: u64,
    pub queries_failed: u64,
    pub peak_conns_open: i64,
    pub connects_per_s: f64,
    pub reads_per_s: f64,
    pub writes_per_s: f64,
    /// Failures by `op/kind`, kind being a SQLSTATE or `io:…`, `timeout`, `closed`, `aborted`…
    pub errors: BTreeMap<String, u64>,
    pub error_total: u64,
    pub latency: Latencies,
    /// The run after warm-up (`--warmup`, default the ramp-up).
    pub steady: Steady,
    pub series: Vec<Point>,
    /// Worker processes that failed or lost their report; empty on a clean run.
    pub worker_failures: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct RunConfig {
    pub profile: Profile,
    pub query_mode: QueryMode,
    pub connections: usize,
    pub processes: usize,
    pub threads_per_process: usize,
    pub source_addrs: u8,
    pub write_ratio: f64,
    pub read_qps: f64,
    pub write_qps: f64,
    pub churn: f64,
    pub ramp_up_s: f64,
    pub duration_s: f64,
    pub rows: u64,
    pub table: String,
    pub tls: bool,
}

#[derive(Debug, Serialize)]
pub struct Steady {
    pub from_s: u32,
    pub to_s: u32,
    pub counts: Counts,
    pub connects_per_s: f64,
    pub reads_per_s: f64,
    pub writes_per_s: f64,
    pub latency: Latencies,
}

#[derive(Debug, Serialize)]
pub struct Latencies {
    pub read: Latency,
    pub write: Latency,
    pub connect: Latency,
}

/// Percentiles in milliseconds plus the histogram itself (microseconds, HdrHistogram V2
/// encoding, base64 — readable by any HdrHistogram implementation).
#[derive(Debug, Serialize)]
pub struct Latency {
    pub count: u64,
    pub min_ms: Option<f64>,
    pub mean_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub p999_ms: Option<f64>,
    pub max_ms: Option<f64>,
    pub hdr_v2_base64: String,
}

impl Latency {
    fn of(h: &Histogram<u64>) -> Latency {
        let some = !h.is_empty();
        let q = |q: f64| some.then(|| ms(h.value_at_quantile(q)));
        Latency {
            count: h.len(),
            min_ms: some.then(|| ms(h.min())),
            mean_ms: some.then(|| h.mean() / 1000.0),
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: some.then(|| ms(h.max())),
            hdr_v2_base64: encode_histogram(h),
        }
    }
}

pub struct RunInfo {
    pub started_unix_ms: u64,
    pub target: String,
    pub source_addrs: u8,
    pub elapsed: Duration,
    pub failures: Vec<String>,
}

pub fn summarize(args: &Args, info: RunInfo, agg: Aggregator) -> Summary {
    let totals = agg.totals.clone();
    let series_totals = agg.series_totals();
    let run_s = info.elapsed.as_secs_f64().min(args.duration).max(1e-3);
    let per_s = |n: u64| n as f64 / run_s;
    let queries_issued = totals.reads_issued + totals.writes_issued;
    let queries_ok = totals.reads_ok + totals.writes_ok;
    let queries_failed = totals.reads_failed + totals.writes_failed;
    Summary {
        tool: "firehose",
        version: env!("CARGO_PKG_VERSION"),
        started_unix_ms: info.started_unix_ms,
        target: info.target,
        config: RunConfig {
            profile: args.profile,
            query_mode: args.query_mode,
            connections: args.connections,
            processes: args.process_count(),
            threads_per_process: args.thread_count(),
            source_addrs: info.source_addrs,
            write_ratio: args.write_ratio,
            read_qps: args.read_qps,
            write_qps: args.write_qps,
            churn: args.churn,
            ramp_up_s: args.ramp_up,
            duration_s: args.duration,
            rows: args.rows,
            table: args.table.clone(),
            tls: args.tls,
        },
        run_s,
        elapsed_s: info.elapsed.as_secs_f64(),
        connects_per_s: per_s(totals.connects_ok),
        reads_per_s: per_s(totals.reads_ok),
        writes_per_s: per_s(totals.writes_ok),
        queries_issued,
        queries_ok,
        queries_failed,
        peak_conns_open: agg.series.iter().map(|p| p.conns_open).max().unwrap_or(0),
        error_total: agg.errors.values().sum(),
        errors: agg.errors.clone(),
        latency: Latencies {
            read: Latency::of(&agg.read),
            write: Latency::of(&agg.write),
            connect: Latency::of(&agg.connect),
        },
        steady: {
            let w = &agg.steady;
            // Seconds of the window the run actually reached (it may have stopped early).
            let secs = (run_s.min(f64::from(w.to)) - f64::from(w.from)).max(1e-3);
            Steady {
                from_s: w.from,
                to_s: w.to,
                connects_per_s: w.counts.connects_ok as f64 / secs,
                reads_per_s: w.counts.reads_ok as f64 / secs,
                writes_per_s: w.counts.writes_ok as f64 / secs,
                counts: w.counts.clone(),
                latency: Latencies {
                    read: Latency::of(&w.read),
                    write: Latency::of(&w.write),
                    connect: Latency::of(&w.connect),
                },
            }
        },
        totals,
        series_totals,
        series: agg.series,
        worker_failures: info.failures,
    }
}

pub fn opt_ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0}ms"),
        Some(v) => format!("{v:.2}ms"),
        None => "-".into(),
    }
}

pub fn errors_inline(errors: &BTreeMap<String, u64>, limit: usize) -> String {
    let mut s = String::new();
    for (k, v) in errors.iter().take(limit) {
        let _ = write!(s, " {k}={v}");
    }
    if errors.len() > limit {
        let _ = write!(s, " (+{} kinds)", errors.len() - limit);
    }
    s
}

/// One line per second, e.g.
/// `[  12s] conns 2000 | +48/s conn, 0 fail | read 9120/s p50 0.41ms p99 2.10ms | write ...`
pub fn live_line(p: &Point) -> String {
    let c = &p.counts;
    let errs: u64 = p.errors.values().sum();
    let mut s = format!(
        "[{:>5}s] conns {:>6} | conn {:>5}/s fail {:>4} | read {:>7}/s p50 {:>7} p99 {:>7} | write {:>6}/s p50 {:>7} p99 {:>7} | errors {}",
        p.t + 1,
        p.conns_open,
        c.connects_ok,
        c.connects_failed,
        c.reads_ok,
        opt_ms(p.read_p50_ms),
        opt_ms(p.read_p99_ms),
        c.writes_ok,
        opt_ms(p.write_p50_ms),
        opt_ms(p.write_p99_ms),
        errs
    );
    if errs > 0 {
        s.push_str(&errors_inline(&p.errors, 4));
    }
    s
}

pub fn text(s: &Summary) -> String {
    let c = &s.config;
    let t = &s.totals;
    let mut o = String::new();
    let _ = writeln!(
        o,
        "firehose {} -> {}\n  profile {:?}, {} connections in {} process(es) x {} thread(s), query mode {:?}, {:.1}s run ({:.1}s with drain)",
        s.version, s.target, c.profile, c.connections, c.processes, c.threads_per_process,
        c.query_mode, s.run_s, s.elapsed_s
    );
    let _ = writeln!(
        o,
        "  connections  peak {} open | {} connects ({:.1}/s), {} failed | {} disconnects",
        s.peak_conns_open, t.connects_ok, s.connects_per_s, t.connects_failed, t.disconnects
    );
    for (name, issued, ok, failed, rate, l) in [
        (
            "reads ",
            t.reads_issued,
            t.reads_ok,
            t.reads_failed,
            s.reads_per_s,
            &s.latency.read,
        ),
        (
            "writes",
            t.writes_issued,
            t.writes_ok,
            t.writes_failed,
            s.writes_per_s,
            &s.latency.write,
        ),
    ] {
        let _ = writeln!(
            o,
            "  {name}       {ok} ok + {failed} failed = {issued} issued ({rate:.1}/s) | p50 {} p90 {} p99 {} p99.9 {} max {}",
            opt_ms(l.p50_ms), opt_ms(l.p90_ms), opt_ms(l.p99_ms), opt_ms(l.p999_ms), opt_ms(l.max_ms)
        );
    }
    let l = &s.latency.connect;
    let _ = writeln!(
        o,
        "  connect      p50 {} p90 {} p99 {} max {}",
        opt_ms(l.p50_ms),
        opt_ms(l.p90_ms),
        opt_ms(l.p99_ms),
        opt_ms(l.max_ms)
    );
    let w = &s.steady;
    let _ = writeln!(
        o,
        "  steady       seconds {}..{}: read {:.1}/s p50 {} p99 {} | write {:.1}/s p50 {} p99 {} | {:.1} connects/s",
        w.from_s,
        w.to_s,
        w.reads_per_s,
        opt_ms(w.latency.read.p50_ms),
        opt_ms(w.latency.read.p99_ms),
        w.writes_per_s,
        opt_ms(w.latency.write.p50_ms),
        opt_ms(w.latency.write.p99_ms),
        w.connects_per_s
    );
    if s.errors.is_empty() {
        let _ = writeln!(o, "  errors       none");
    } else {
        let _ = writeln!(
            o,
            "  errors       {} total:{}",
            s.error_total,
            errors_inline(&s.errors, 20)
        );
    }
    if s.totals != s.series_totals {
        let _ = writeln!(
            o,
            "  WARNING: per-second series does not add up to the totals: {:?} vs {:?}",
            s.series_totals, s.totals
        );
    }
    for f in &s.worker_failures {
        let _ = writeln!(o, "  WORKER FAILURE: {f}");
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_line_shows_errors_by_kind() {
        let mut p = Point {
            t: 4,
            conns_open: 10,
            counts: Counts::default(),
            errors: BTreeMap::new(),
            read_p50_ms: Some(0.5),
            read_p99_ms: None,
            write_p50_ms: None,
            write_p99_ms: None,
            connect_p50_ms: None,
            connect_p99_ms: None,
        };
        p.errors.insert("read/57P01".into(), 3);
        let line = live_line(&p);
        assert!(line.starts_with("[    5s] conns     10"), "{line}");
        assert!(line.contains("errors 3 read/57P01=3"), "{line}");
        assert!(line.contains("p50  0.50ms"), "{line}");
    }
}
