//! The pooler's Prometheus metrics (docs/metrics.md lists every one).
//!
//! Backends and waiting sessions per pool are read at scrape time from the atomics each core
//! already publishes (`budget::CoreShare`). Per-core counters (link frames and bytes received,
//! the wait-time histogram) are relaxed load-and-stores of atomics only their own core writes:
//! no locked instruction on the request path, summed by the metrics thread
//! (`shared::metrics_http`) at each scrape.

use crate::budget::Budgets;
use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, EncodeMetric, MetricEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use std::cell::OnceCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Upper bounds (seconds) of the wait-time histogram's buckets; one more for the rest.
pub const WAIT_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0];

/// One core's counters, written by that core only.
#[derive(Default)]
pub struct CoreStats {
    link_frames: AtomicU64,
    link_bytes: AtomicU64,
    link_frames_sent: AtomicU64,
    link_bytes_sent: AtomicU64,
    waits: [AtomicU64; WAIT_BUCKETS.len() + 1],
    wait_us: AtomicU64,
}

thread_local! {
    static MINE: OnceCell<Arc<CoreStats>> = const { OnceCell::new() };
}

#[inline]
fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

#[inline]
fn with(f: impl FnOnce(&CoreStats)) {
    MINE.with(|m| {
        if let Some(s) = m.get() {
            f(s)
        }
    });
}

/// A link frame received from a gateway (`bytes` with its header).
#[inline]
pub fn link_frame(bytes: usize) {
    with(|s| {
        bump(&s.link_frames, 1);
        bump(&s.link_bytes, bytes as u64);
    });
}

/// A link's socket as its writer sees it: counts the frames and bytes the socket accepts
/// (per write, not per frame pushed: a frame header is read once as it goes by).
pub struct CountSent<W> {
    inner: W,
    frames: shared::link::FrameCounter,
}

impl<W> CountSent<W> {
    pub fn new(inner: W) -> Self {
        CountSent {
            inner,
            frames: shared::link::FrameCounter::default(),
        }
    }
}

impl<W: futures_lite::AsyncWrite + Unpin> futures_lite::AsyncWrite for CountSent<W> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = &mut *self;
        let r = std::pin::Pin::new(&mut this.inner).poll_write(cx, buf);
        if let std::task::Poll::Ready(Ok(n)) = &r {
            let frames = this.frames.feed(&buf[..*n]);
            with(|s| {
                bump(&s.link_frames_sent, frames);
                bump(&s.link_bytes_sent, *n as u64);
            });
        }
        r
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_close(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// A session waited `us` microseconds for a backend.
pub fn waited(us: u64) {
    let secs = us as f64 / 1e6;
    let i = WAIT_BUCKETS
        .iter()
        .position(|b| secs <= *b)
        .unwrap_or(WAIT_BUCKETS.len());
    with(|s| {
        bump(&s.waits[i], 1);
        bump(&s.wait_us, us);
    });
}

pub struct Metrics {
    cores: Vec<Arc<CoreStats>>,
}

impl Metrics {
    pub fn new(cores: usize) -> Arc<Metrics> {
        Arc::new(Metrics {
            cores: (0..cores.max(1)).map(|_| Arc::default()).collect(),
        })
    }

    pub fn install(&self, index: usize) {
        let mine = self.cores[index % self.cores.len()].clone();
        MINE.with(|m| {
            let _ = m.set(mine);
        });
    }

    fn sum(&self, f: impl Fn(&CoreStats) -> &AtomicU64) -> u64 {
        self.cores
            .iter()
            .map(|c| f(c).load(Ordering::Relaxed))
            .sum()
    }
}

/// A histogram whose buckets were counted elsewhere (per core), encoded as one.
#[derive(Debug)]
struct Summed {
    sum: f64,
    count: u64,
    /// (upper bound, count in this bucket alone).
    buckets: Vec<(f64, u64)>,
}

impl EncodeMetric for Summed {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        encoder.encode_histogram::<Vec<(String, String)>>(self.sum, self.count, &self.buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
enum BackendState {
    active,
    idle,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolStateLabels {
    database: String,
    user: String,
    state: BackendState,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    database: String,
    user: String,
}

pub fn registry(budgets: &Budgets, m: &Metrics) -> Registry {
    let mut r = Registry::default();
    let backends = Family::<PoolStateLabels, Gauge>::default();
    let waiting = Family::<PoolLabels, Gauge>::default();
    let waited = Family::<PoolLabels, Counter<f64>>::default();
    for (key, b) in budgets.all() {
        let all = b.count.load(Ordering::Relaxed) as i64;
        let idle: i64 = b
            .cores
            .iter()
            .map(|c| c.idle.load(Ordering::Relaxed) as i64)
            .sum();
        let labels = |state| PoolStateLabels {
            database: key.database.clone(),
            user: key.user.clone(),
            state,
        };
        backends
            .get_or_create(&labels(BackendState::idle))
            .set(idle);
        backends
            .get_or_create(&labels(BackendState::active))
            .set((all - idle).max(0));
        let pl = PoolLabels {
            database: key.database.clone(),
            user: key.user.clone(),
        };
        waiting
            .get_or_create(&pl)
            .set(b.waiting.load(Ordering::Relaxed) as i64);
        let us: u64 = b
            .cores
            .iter()
            .map(|c| c.waited_us.load(Ordering::Relaxed))
            .sum();
        waited.get_or_create(&pl).inc_by(us as f64 / 1e6);
    }
    r.register(
        "tidepool_pooler_backends",
        "Backends by pool and state: active (serving a session, or logging in) or idle in the pool",
        backends,
    );
    r.register(
        "tidepool_pooler_waiting_sessions",
        "Sessions waiting for a backend now, by pool",
        waiting,
    );
    r.register(
        "tidepool_pooler_wait_seconds",
        "Seconds sessions waited for a backend, by pool",
        waited,
    );
    let mut buckets: Vec<(f64, u64)> = WAIT_BUCKETS
        .iter()
        .enumerate()
        .map(|(i, b)| (*b, m.sum(|c| &c.waits[i])))
        .collect();
    buckets.push((f64::INFINITY, m.sum(|c| &c.waits[WAIT_BUCKETS.len()])));
    let count = buckets.iter().map(|(_, n)| n).sum();
    r.register(
        "tidepool_pooler_backend_wait_duration_seconds",
        "How long each wait of a session for a backend lasted",
        Summed {
            sum: m.sum(|c| &c.wait_us) as f64 / 1e6,
            count,
            buckets,
        },
    );
    let frames = Counter::<u64>::default();
    frames.inc_by(m.sum(|c| &c.link_frames));
    r.register(
        "tidepool_pooler_link_frames_received",
        "Link frames received from gateways",
        frames,
    );
    let sent = Counter::<u64>::default();
    sent.inc_by(m.sum(|c| &c.link_frames_sent));
    r.register(
        "tidepool_pooler_link_frames_sent",
        "Link frames sent to gateways",
        sent,
    );
    let sent = Counter::<u64>::default();
    sent.inc_by(m.sum(|c| &c.link_bytes_sent));
    r.register(
        "tidepool_pooler_link_bytes_sent",
        "Link bytes (headers and payloads) sent to gateways",
        sent,
    );
    let bytes = Counter::<u64>::default();
    bytes.inc_by(m.sum(|c| &c.link_bytes));
    r.register(
        "tidepool_pooler_link_bytes_received",
        "Link bytes (headers and payloads) received from gateways",
        bytes,
    );
    r
}

pub fn render(budgets: &Budgets, m: &Metrics, openmetrics: bool) -> String {
    shared::metrics_http::encode(&registry(budgets, m), openmetrics)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_metrics_md_lists_exactly_the_poolers_metrics() {
        let budgets = Budgets::new(
            crate::budget::Limits {
                pool_size: 2,
                max_total: 4,
                per_user: 0,
                per_database: 0,
            },
            1,
        );
        let _pool = budgets.counter(&crate::budget::PoolKey {
            user: "alice".into(),
            database: "app".into(),
        });
        let m = Metrics::new(1);
        m.install(0);
        waited(2_000);
        waited(50_000_000);
        let text = render(&budgets, &m, false);
        assert!(
            text.contains("tidepool_pooler_backend_wait_duration_seconds_count 2"),
            "{text}"
        );
        assert!(
            text.contains("tidepool_pooler_backend_wait_duration_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        let exposed = shared::metrics_http::exposed_names(&text);
        let documented =
            shared::metrics_http::documented_names(include_str!("../../docs/metrics.md"), |n| {
                n.starts_with("tidepool_pooler_")
            });
        assert_eq!(exposed, documented);
        let dashboard = include_str!("../../config/grafana/tidepool-gateway-pooler.json");
        for name in &documented {
            assert!(
                dashboard.contains(name.as_str()),
                "{name} not on the dashboard"
            );
        }
    }
}
