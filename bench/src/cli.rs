//! Command line of `firehose`. The parent and its worker processes parse the same flags: a
//! worker is the parent's own binary started with the hidden `--child-index`/`--epoch-ms`.

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, ValueEnum};

use crate::error::{Error, Result};

/// Connections one worker process holds at most by default: the hard open-file limit here is
/// 20,000 and each connection is one descriptor, so 15,000 leaves room for the rest.
pub const CONNECTIONS_PER_PROCESS: usize = 15_000;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "firehose",
    version,
    about = "Load generator for any Postgres endpoint (Tidepool, PgBouncer or Postgres itself)",
    after_help = "Every run is bounded: it stops after --duration seconds, or earlier when \
                  --max-queries or --max-connects is used up, or on Ctrl-C."
)]
pub struct Args {
    /// Connection URL, e.g. postgres://alice:secret@127.0.0.1:5432/app (libpq key=value works too).
    /// The host/port/user/password/dbname flags override its parts.
    #[arg(long, env = "FIREHOSE_URL")]
    pub url: Option<String>,
    #[arg(long)]
    pub host: Option<String>,
    #[arg(long)]
    pub port: Option<u16>,
    #[arg(long)]
    pub user: Option<String>,
    #[arg(long, env = "PGPASSWORD", hide_env_values = true)]
    pub password: Option<String>,
    #[arg(long)]
    pub dbname: Option<String>,

    /// What each connection does: `steady` keeps connections open and queries in a loop;
    /// `churn` connects, runs one query and disconnects, as fast as it can.
    #[arg(long, value_enum, default_value_t = Profile::Steady)]
    pub profile: Profile,
    /// Concurrent client connections (across all worker processes).
    #[arg(short = 'c', long, default_value_t = 100)]
    pub connections: usize,
    /// Share of connections that are writers (INSERT ... RETURNING id); the rest read by key.
    #[arg(long, default_value_t = 0.2)]
    pub write_ratio: f64,
    /// Target reads per second over all readers (0 = as fast as they go).
    #[arg(long, default_value_t = 0.0)]
    pub read_qps: f64,
    /// Target writes per second over all writers (0 = as fast as they go).
    #[arg(long, default_value_t = 0.0)]
    pub write_qps: f64,
    /// Steady profile: connections closed and replaced per second; each connection lives an
    /// exponentially distributed time averaging connections/churn seconds (0 = no churn).
    /// Churn profile: target connects per second (0 = as fast as possible).
    #[arg(long, default_value_t = 0.0)]
    pub churn: f64,
    /// Seconds over which the connections are opened, evenly.
    #[arg(long, default_value_t = 0.0)]
    pub ramp_up: f64,
    /// Length of the run in seconds (ramp-up included).
    #[arg(long, default_value_t = 30.0)]
    pub duration: f64,
    /// Seconds excluded from the `steady` section of the report, which describes the run
    /// after connecting settled (default: the ramp-up). Totals always cover the whole run.
    #[arg(long)]
    pub warmup: Option<f64>,
    /// How queries go on the wire: `simple` (Query message, literal values; works everywhere),
    /// `extended` (unnamed statement, Parse/Bind/Execute in one round trip) or `prepared`
    /// (named statements prepared once per connection).
    #[arg(long, value_enum, default_value_t = QueryMode::Simple)]
    pub query_mode: QueryMode,

    /// Create (drop and recreate) the table and fill it with --rows rows before the run.
    #[arg(long)]
    pub init: bool,
    /// Only run --init, then exit.
    #[arg(long, requires = "init")]
    pub init_only: bool,
    /// Rows pre-filled by --init; readers pick keys uniformly in 1..=rows.
    #[arg(long, default_value_t = 10_000)]
    pub rows: u64,
    /// Table used by readers and writers.
    #[arg(long, default_value = "firehose_items", value_parser = parse_ident)]
    pub table: String,

    /// Worker processes (default: enough that each holds at most 15,000 connections).
    #[arg(long)]
    pub processes: Option<usize>,
    /// Runtime threads per worker process (default: cores / processes, at least 1).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Bind client sockets to 127.0.0.1 .. 127.0.0.N round-robin so that ephemeral ports do not
    /// run out past ~28,000 connections (or fewer under heavy churn, with sockets in TIME_WAIT).
    /// Only when the target is on 127.0.0.0/8; its pg_hba must then admit 127.0.0.0/8.
    /// 0 = let the kernel choose (every connection from 127.0.0.1).
    #[arg(long, default_value_t = 0)]
    pub source_addrs: u8,

    /// Require TLS (rustls).
    #[arg(long)]
    pub tls: bool,
    /// Accept any server certificate (loopback testing only).
    #[arg(long)]
    pub tls_insecure: bool,
    /// PEM file with the CA certificate(s) that sign the server's certificate.
    #[arg(long)]
    pub tls_ca: Option<PathBuf>,

    /// Seconds allowed for connect + TLS + authentication.
    #[arg(long, default_value_t = 10.0)]
    pub connect_timeout: f64,
    /// Seconds allowed for one query; a query past it counts as a `timeout` error and its
    /// connection is replaced.
    #[arg(long, default_value_t = 30.0)]
    pub query_timeout: f64,
    /// Seconds the queries in flight at the end may take before they are abandoned (counted as
    /// `aborted` errors).
    #[arg(long, default_value_t = 5.0)]
    pub grace: f64,
    /// Upper bound on queries issued by the whole run.
    #[arg(long, default_value_t = 200_000_000)]
    pub max_queries: u64,
    /// Upper bound on connection attempts by the whole run.
    #[arg(long, default_value_t = 20_000_000)]
    pub max_connects: u64,

    /// Write the summary, per-second series and HDR histograms as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write a self-contained HTML report with SVG charts.
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// No live view at all.
    #[arg(short, long)]
    pub quiet: bool,
    /// The live view on stderr: `auto` redraws a dashboard in place each second when stdout and
    /// stderr are terminals, else prints a plain line per second; `dashboard` whenever stderr
    /// is a terminal; `plain` always the lines.
    #[arg(long, value_enum, default_value_t = Live::Auto)]
    pub live: Live,
    /// Render two (or one) earlier `--json` reports into the `--html` page, on shared charts,
    /// instead of running: `--compare tidepool.json --compare pgbouncer.json --html cmp.html`.
    /// Each run is named after its file (without `.json`).
    #[arg(long, value_name = "REPORT.json", requires = "html")]
    pub compare: Vec<PathBuf>,

    /// Internal: this process is worker number N.
    #[arg(long, hide = true)]
    pub child_index: Option<usize>,
    /// Internal: the parent's start, Unix milliseconds; ticks and deadline count from it.
    #[arg(long, hide = true)]
    pub epoch_ms: Option<u64>,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Live {
    Auto,
    Dashboard,
    Plain,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    Steady,
    Churn,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum QueryMode {
    Simple,
    Extended,
    Prepared,
}

fn parse_ident(s: &str) -> std::result::Result<String, String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(s.to_string())
    } else {
        Err("expected a plain identifier: [A-Za-z_][A-Za-z0-9_]*".into())
    }
}

impl Args {
    /// Checks ranges that clap cannot express; every bound here keeps a run finite.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: &str| Err(Error::Usage(m.to_string()));
        if self.connections == 0 || self.connections > 1_000_000 {
            return bad("--connections must be in 1..=1000000");
        }
        if !(0.0..=1.0).contains(&self.write_ratio) {
            return bad("--write-ratio must be in 0..=1");
        }
        if !(self.duration > 0.0 && self.duration <= 86_400.0) {
            return bad("--duration must be in (0, 86400] seconds");
        }
        if !(0.0..=self.duration).contains(&self.ramp_up) {
            return bad("--ramp-up must be in 0..=duration");
        }
        if !(0.0..self.duration).contains(&self.warmup()) {
            return bad("--warmup must be in 0..duration");
        }
        for (name, v) in [
            ("--read-qps", self.read_qps),
            ("--write-qps", self.write_qps),
            ("--churn", self.churn),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return bad(&format!("{name} must be a finite number >= 0"));
            }
        }
        for (name, v) in [
            ("--connect-timeout", self.connect_timeout),
            ("--query-timeout", self.query_timeout),
            ("--grace", self.grace),
        ] {
            if !(v > 0.0 && v <= 3600.0) {
                return bad(&format!("{name} must be in (0, 3600] seconds"));
            }
        }
        if self.rows == 0 {
            return bad("--rows must be at least 1");
        }
        if let Some(p) = self.processes {
            if p == 0 || p > 256 || p > self.connections {
                return bad("--processes must be in 1..=min(256, connections)");
            }
        }
        if self.threads == Some(0) {
            return bad("--threads must be at least 1");
        }
        if self.tls && !self.tls_insecure && self.tls_ca.is_none() {
            return bad("--tls needs --tls-ca FILE or --tls-insecure");
        }
        if self.compare.len() > 2 {
            return bad("--compare takes one or two reports");
        }
        Ok(())
    }

    pub fn process_count(&self) -> usize {
        self.processes
            .unwrap_or_else(|| self.connections.div_ceil(CONNECTIONS_PER_PROCESS))
            .max(1)
    }

    pub fn thread_count(&self) -> usize {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        self.threads
            .unwrap_or_else(|| (cores / self.process_count()).max(1))
    }

    pub fn duration(&self) -> Duration {
        Duration::from_secs_f64(self.duration)
    }
    pub fn ramp_up(&self) -> Duration {
        Duration::from_secs_f64(self.ramp_up)
    }
    pub fn warmup(&self) -> f64 {
        self.warmup.unwrap_or(self.ramp_up)
    }
    /// The whole seconds of the run that the `steady` report covers: [from, to).
    pub fn steady_window(&self) -> (u32, u32) {
        let to = self.duration.floor() as u32;
        (self.warmup().ceil().min(f64::from(to)) as u32, to)
    }
    pub fn connect_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.connect_timeout)
    }
    pub fn query_timeout(&self) -> Duration {
        Duration::from_secs_f64(self.query_timeout)
    }
    pub fn grace(&self) -> Duration {
        Duration::from_secs_f64(self.grace)
    }
}

/// The part of the whole run that worker process `index` of `count` carries: every `count`-th
/// global connection slot starting at `index` (so that ramp-up, roles and source addresses
/// interleave over the processes instead of filling one after the other) and a share of the
/// rates and bounds in proportion to its slots.
#[derive(Debug, Clone, PartialEq)]
pub struct Share {
    pub index: usize,
    pub stride: usize,
    pub slots: usize,
    pub fraction: f64,
}

impl Share {
    /// Global index of this process' `i`-th slot.
    pub fn slot(&self, i: usize) -> usize {
        self.index + i * self.stride
    }
}

pub fn share(connections: usize, count: usize, index: usize) -> Share {
    let slots = connections / count + usize::from(index < connections % count);
    Share {
        index,
        stride: count,
        slots,
        fraction: slots as f64 / connections as f64,
    }
}

/// Whether global slot `slot` is a writer: writers are spread evenly, `ratio` of all slots.
pub fn is_writer(slot: usize, ratio: f64) -> bool {
    let at = |i: usize| (i as f64 * ratio).floor() as u64;
    at(slot + 1) > at(slot)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_cover_all_slots_once() {
        for (n, p) in [(1, 1), (10, 3), (50_000, 4), (7, 7)] {
            let mut seen = vec![false; n];
            let mut total = 0.0;
            for i in 0..p {
                let s = share(n, p, i);
                for j in 0..s.slots {
                    assert!(!std::mem::replace(&mut seen[s.slot(j)], true));
                }
                total += s.fraction;
            }
            assert!(seen.iter().all(|&x| x));
            assert!((total - 1.0).abs() < 1e-9);
        }
    }

    #[test]
    fn writers_follow_ratio() {
        let w = (0..1000).filter(|&i| is_writer(i, 0.2)).count();
        assert_eq!(w, 200);
        assert_eq!((0..10).filter(|&i| is_writer(i, 0.0)).count(), 0);
        assert_eq!((0..10).filter(|&i| is_writer(i, 1.0)).count(), 10);
    }

    #[test]
    fn default_processes_hold_at_most_15000() {
        let mut a = Args::parse_from(["firehose", "-c", "50000"]);
        assert_eq!(a.process_count(), 4);
        a.connections = 15_000;
        assert_eq!(a.process_count(), 1);
        assert!(a.validate().is_ok());
    }

    #[test]
    fn rejects_unbounded_or_odd_values() {
        let a = Args::parse_from(["firehose", "--duration", "0"]);
        assert!(a.validate().is_err());
        let a = Args::parse_from(["firehose", "--write-ratio", "1.5"]);
        assert!(a.validate().is_err());
        assert!(Args::try_parse_from(["firehose", "--table", "x; drop"]).is_err());
    }
}
