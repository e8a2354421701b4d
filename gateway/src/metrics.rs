//! The gateway's Prometheus metrics (docs/metrics.md lists every one).
//!
//! Hot-path counting costs a relaxed load and store of a counter only its own core writes (a
//! plain `mov` on x86, no locked instruction, no lock): per core, link frames and bytes and
//! errors by SQLSTATE class here; per client, queries, transactions, bytes and times in the
//! client registry (`registry::Counters`). The scrape runs on the metrics thread
//! (`shared::metrics_http`) and sums the cores' counters and the registry into a fresh
//! `prometheus-client` registry; the cores never wait for it.

use crate::registry::{self, state, Shared};
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use shared::metrics_http::{class_index, class_name, CLASSES};
use std::cell::OnceCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// One core's counters, written by that core only.
pub struct CoreStats {
    errors: Box<[AtomicU64]>,
    /// Index 0: to poolers; 1: from poolers.
    link_frames: [AtomicU64; 2],
    link_bytes: [AtomicU64; 2],
}

impl Default for CoreStats {
    fn default() -> Self {
        CoreStats {
            errors: (0..CLASSES).map(|_| AtomicU64::new(0)).collect(),
            link_frames: Default::default(),
            link_bytes: Default::default(),
        }
    }
}

pub const SENT: usize = 0;
pub const RECEIVED: usize = 1;

thread_local! {
    /// This core's counters (set when the core starts; unset on other threads, which count
    /// nothing).
    static MINE: OnceCell<Arc<CoreStats>> = const { OnceCell::new() };
}

/// The process's per-core counters.
pub struct Metrics {
    cores: Vec<Arc<CoreStats>>,
}

impl Metrics {
    pub fn new(cores: usize) -> Arc<Metrics> {
        Arc::new(Metrics {
            cores: (0..cores.max(1)).map(|_| Arc::default()).collect(),
        })
    }

    /// Makes core `index`'s counters this thread's.
    pub fn install(&self, index: usize) {
        let mine = self.cores[index % self.cores.len()].clone();
        MINE.with(|m| {
            let _ = m.set(mine);
        });
    }
}

#[inline]
fn with(f: impl FnOnce(&CoreStats)) {
    MINE.with(|m| {
        if let Some(s) = m.get() {
            f(s)
        }
    });
}

/// A link frame sent (`SENT`) or received (`RECEIVED`), of `bytes` payload and header.
#[inline]
pub fn link_frame(direction: usize, bytes: usize) {
    with(|s| {
        registry::bump(&s.link_frames[direction], 1);
        registry::bump(&s.link_bytes[direction], bytes as u64);
    });
}

/// An `ErrorResponse` went to a client, with this SQLSTATE (`None`: not readable here).
pub fn error(code: Option<&[u8]>) {
    with(|s| registry::bump(&s.errors[class_index(code.unwrap_or_default())], 1));
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum ClientState {
    idle,
    active,
    waiting,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: ClientState,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DatabaseLabels {
    database: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ClassLabels {
    class: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum Direction {
    sent,
    received,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: Direction,
}

/// The registry of one scrape.
pub fn registry(admin: &Shared, m: &Metrics) -> Registry {
    let mut r = Registry::default();
    let clients = Family::<StateLabels, Gauge>::default();
    for s in [ClientState::idle, ClientState::active, ClientState::waiting] {
        let _ = clients.get_or_create(&StateLabels { state: s });
    }
    for c in admin.clients() {
        let s = match c.state() {
            state::ACTIVE => ClientState::active,
            state::WAITING => ClientState::waiting,
            _ => ClientState::idle,
        };
        clients.get_or_create(&StateLabels { state: s }).inc();
    }
    r.register(
        "tidepool_gateway_clients",
        "Clients logged in, by state: idle, active (a request in flight or a transaction open), waiting (held by PAUSE)",
        clients,
    );
    let per_db = |name: &str, help: &str, r: &mut Registry, pick: &dyn Fn(&[u64; 7]) -> u64| {
        let f = Family::<DatabaseLabels, Counter>::default();
        for (db, t) in admin.totals() {
            f.get_or_create(&DatabaseLabels { database: db })
                .inc_by(pick(&t));
        }
        r.register(name, help, f);
    };
    let seconds = |name: &str, help: &str, r: &mut Registry, pick: &dyn Fn(&[u64; 7]) -> u64| {
        let f = Family::<DatabaseLabels, Counter<f64>>::default();
        for (db, t) in admin.totals() {
            f.get_or_create(&DatabaseLabels { database: db })
                .inc_by(pick(&t) as f64 / 1e6);
        }
        r.register(name, help, f);
    };
    per_db(
        "tidepool_gateway_transactions",
        "Transactions (and statements outside one) that ended, by database",
        &mut r,
        &|t| t[0],
    );
    per_db(
        "tidepool_gateway_queries",
        "Queries answered (ReadyForQuery), by database",
        &mut r,
        &|t| t[1],
    );
    per_db(
        "tidepool_gateway_client_received_bytes",
        "Bytes of requests read from clients, by database",
        &mut r,
        &|t| t[2],
    );
    per_db(
        "tidepool_gateway_client_sent_bytes",
        "Bytes written to clients, by database",
        &mut r,
        &|t| t[3],
    );
    seconds(
        "tidepool_gateway_transaction_seconds",
        "Seconds transactions took, from their first request to the ReadyForQuery that ended them",
        &mut r,
        &|t| t[4],
    );
    seconds(
        "tidepool_gateway_query_seconds",
        "Seconds sessions had requests in flight",
        &mut r,
        &|t| t[5],
    );
    seconds(
        "tidepool_gateway_pause_wait_seconds",
        "Seconds requests waited for a PAUSE to be lifted",
        &mut r,
        &|t| t[6],
    );
    let errors = Family::<ClassLabels, Counter>::default();
    for i in 0..CLASSES {
        let n: u64 = m
            .cores
            .iter()
            .map(|c| c.errors[i].load(Ordering::Relaxed))
            .sum();
        if n > 0 {
            errors
                .get_or_create(&ClassLabels {
                    class: class_name(i),
                })
                .inc_by(n);
        }
    }
    r.register(
        "tidepool_gateway_errors",
        "ErrorResponses sent to clients, by SQLSTATE class (its first two characters)",
        errors,
    );
    let frames = Family::<DirectionLabels, Counter>::default();
    let bytes = Family::<DirectionLabels, Counter>::default();
    for (d, label) in [(SENT, Direction::sent), (RECEIVED, Direction::received)] {
        let sum = |a: &dyn Fn(&CoreStats) -> &AtomicU64| -> u64 {
            m.cores.iter().map(|c| a(c).load(Ordering::Relaxed)).sum()
        };
        let l = DirectionLabels { direction: label };
        frames.get_or_create(&l).inc_by(sum(&|c| &c.link_frames[d]));
        bytes.get_or_create(&l).inc_by(sum(&|c| &c.link_bytes[d]));
    }
    r.register(
        "tidepool_gateway_link_frames",
        "Link frames to (sent) and from (received) the poolers",
        frames,
    );
    r.register(
        "tidepool_gateway_link_bytes",
        "Link bytes (headers and payloads) to (sent) and from (received) the poolers",
        bytes,
    );
    r
}

/// The page of one scrape.
pub fn render(admin: &Shared, m: &Metrics, openmetrics: bool) -> String {
    shared::metrics_http::encode(&registry(admin, m), openmetrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_metrics_md_lists_exactly_the_gateways_metrics() {
        let admin = Shared::new(
            1,
            registry::Control {
                reload: Box::new(|| {}),
                shutdown: Box::new(|| {}),
                set: Box::new(|_, _| Ok(())),
            },
        );
        let m = Metrics::new(1);
        m.install(0);
        admin.add_ended_for_test("app");
        error(Some(b"42601"));
        error(Some(b"42P01"));
        error(None);
        let text = render(&admin, &m, false);
        assert!(
            text.contains("tidepool_gateway_errors_total{class=\"42\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("tidepool_gateway_errors_total{class=\"unknown\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("tidepool_gateway_queries_total{database=\"app\"} 1"),
            "{text}"
        );
        let exposed = shared::metrics_http::exposed_names(&text);
        let documented =
            shared::metrics_http::documented_names(include_str!("../../docs/metrics.md"), |n| {
                n.starts_with("tidepool_gateway_")
            });
        assert_eq!(exposed, documented);
        // The dashboard shows them all.
        let dashboard = include_str!("../../config/grafana/tidepool-gateway-pooler.json");
        for name in &documented {
            assert!(
                dashboard.contains(name.as_str()),
                "{name} not on the dashboard"
            );
        }
    }
}
