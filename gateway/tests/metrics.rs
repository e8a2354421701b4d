//! The gateway's and the pooler's Prometheus endpoints (issue 14, point 2), scraped over HTTP
//! from the real processes and parsed with `prometheus-parse`: counters move by exactly the
//! traffic psql and pgbench sent.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use prometheus_parse::{Scrape, Value};
use testkit::{free_port, pgbench, PgCluster, Psql, Tidepool, TidepoolOpts, ALICE, APP_DB};

/// GET /metrics; (status line, lower-cased headers, body).
fn get(port: u16, accept: &str) -> (String, String, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_owned(), headers.to_lowercase(), body.to_owned())
}

fn scrape(port: u16) -> (Scrape, String) {
    let (status, headers, body) = get(port, "text/plain");
    assert!(status.contains(" 200 "), "{status}\n{body}");
    assert!(
        headers.contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );
    let parsed = Scrape::parse(body.lines().map(|l| Ok(l.to_owned())))
        .unwrap_or_else(|e| panic!("not Prometheus text ({e}):\n{body}"));
    (parsed, body)
}

/// The sample `name` whose labels include `labels` (0 when absent: a counter not yet moved).
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> f64 {
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map_or(0.0, |x| match x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

#[test]
fn gateway_and_pooler_metrics_move_with_psql_and_pgbench_traffic() {
    let pg = PgCluster::start();
    let (gw_port, pl_port) = (free_port(), free_port());
    let tp = Tidepool::start(
        &pg,
        TidepoolOpts::default()
            // One backend: pgbench's four clients wait for it, which the pooler must count.
            .pool_size(1)
            .gateway_arg("--metrics-listen")
            .gateway_arg(format!("127.0.0.1:{gw_port}"))
            .pooler_arg("--metrics-listen")
            .pooler_arg(format!("127.0.0.1:{pl_port}")),
    );
    let ep = tp.endpoint();
    let db = [("database", APP_DB)];

    let (g0, _) = scrape(gw_port);
    let (p0, _) = scrape(pl_port);

    // psql: two queries that succeed, one division by zero (22012), in one session.
    let out = Psql::new(&ep, ALICE.0, ALICE.1, APP_DB)
        .command("select 1")
        .command("select 1/0")
        .command("select 2")
        .run();
    assert!(out.text.contains("division by zero"), "{}", out.text);
    std::thread::sleep(Duration::from_millis(200));
    let (g1, body) = scrape(gw_port);
    let d = |a: &Scrape, b: &Scrape, name: &str, l: &[(&str, &str)]| {
        value(b, name, l) - value(a, name, l)
    };
    assert_eq!(
        d(&g0, &g1, "tidepool_gateway_queries_total", &db),
        3.0,
        "{body}"
    );
    assert_eq!(
        d(&g0, &g1, "tidepool_gateway_transactions_total", &db),
        3.0,
        "{body}"
    );
    assert_eq!(
        d(
            &g0,
            &g1,
            "tidepool_gateway_errors_total",
            &[("class", "22")]
        ),
        1.0,
        "{body}"
    );
    // "select 1", "select 1/0", "select 2": Query messages of 14, 16 and 14 bytes.
    assert_eq!(
        d(
            &g0,
            &g1,
            "tidepool_gateway_client_received_bytes_total",
            &db
        ),
        44.0,
        "{body}"
    );
    assert!(d(&g0, &g1, "tidepool_gateway_client_sent_bytes_total", &db) > 0.0);
    assert!(d(&g0, &g1, "tidepool_gateway_query_seconds_total", &db) > 0.0);
    assert_eq!(
        value(&g1, "tidepool_gateway_clients", &[("state", "active")]),
        0.0
    );

    // pgbench: 4 clients × 50 transactions of one `select 1` each, on one backend.
    let script = pg.dir().join("select.sql");
    std::fs::write(&script, "select 1;\n").unwrap();
    let script = script.to_string_lossy().into_owned();
    let out = pgbench(
        &ep,
        ALICE.0,
        ALICE.1,
        APP_DB,
        &["-n", "-M", "simple", "-c", "4", "-t", "50", "-f", &script],
        Duration::from_secs(120),
    );
    assert_eq!(out.code, Some(0), "{}", out.text);
    std::thread::sleep(Duration::from_millis(200));
    let (g2, body) = scrape(gw_port);
    let (p2, pbody) = scrape(pl_port);
    assert_eq!(
        d(&g1, &g2, "tidepool_gateway_queries_total", &db),
        200.0,
        "{body}"
    );
    assert_eq!(
        d(&g1, &g2, "tidepool_gateway_transactions_total", &db),
        200.0,
        "{body}"
    );
    assert_eq!(
        d(
            &g1,
            &g2,
            "tidepool_gateway_errors_total",
            &[("class", "22")]
        ),
        0.0
    );
    // Every frame the gateway sent, the pooler received (one gateway, one pooler).
    let sent = d(
        &g0,
        &g2,
        "tidepool_gateway_link_frames_total",
        &[("direction", "sent")],
    );
    assert!(sent >= 203.0, "{body}");
    assert_eq!(
        value(&p2, "tidepool_pooler_link_frames_received_total", &[])
            - value(&p0, "tidepool_pooler_link_frames_received_total", &[]),
        sent,
        "{pbody}"
    );
    assert_eq!(
        value(&p2, "tidepool_pooler_link_bytes_received_total", &[])
            - value(&p0, "tidepool_pooler_link_bytes_received_total", &[]),
        d(
            &g0,
            &g2,
            "tidepool_gateway_link_bytes_total",
            &[("direction", "sent")]
        ),
        "{pbody}"
    );
    // ... and every frame the pooler sent, the gateway received: totals since both started
    // (the links' first frames may still be on their way when the baselines are taken).
    let received = value(
        &g2,
        "tidepool_gateway_link_frames_total",
        &[("direction", "received")],
    );
    assert!(
        d(
            &g0,
            &g2,
            "tidepool_gateway_link_frames_total",
            &[("direction", "received")]
        ) >= 203.0,
        "{body}"
    );
    assert_eq!(
        value(&p2, "tidepool_pooler_link_frames_sent_total", &[]),
        received,
        "{pbody}"
    );
    assert_eq!(
        value(&p2, "tidepool_pooler_link_bytes_sent_total", &[]),
        value(
            &g2,
            "tidepool_gateway_link_bytes_total",
            &[("direction", "received")]
        ),
        "{pbody}"
    );

    // The pooler: alice's one backend, idle now; sessions waited for it.
    let pool = [("database", APP_DB), ("user", ALICE.0)];
    let state = |s: &'static str| [("database", APP_DB), ("user", ALICE.0), ("state", s)];
    assert_eq!(
        value(&p2, "tidepool_pooler_backends", &state("idle")),
        1.0,
        "{pbody}"
    );
    assert_eq!(
        value(&p2, "tidepool_pooler_backends", &state("active")),
        0.0,
        "{pbody}"
    );
    assert_eq!(
        value(&p2, "tidepool_pooler_waiting_sessions", &pool),
        0.0,
        "{pbody}"
    );
    let waits = value(
        &p2,
        "tidepool_pooler_backend_wait_duration_seconds_count",
        &[],
    ) - value(
        &p0,
        "tidepool_pooler_backend_wait_duration_seconds_count",
        &[],
    );
    assert!(
        waits > 0.0,
        "four clients on one backend never waited?\n{pbody}"
    );
    assert!(
        value(&p2, "tidepool_pooler_wait_seconds_total", &pool) > 0.0,
        "{pbody}"
    );

    // OpenMetrics when asked for it; other paths are 404.
    let (status, headers, body) = get(gw_port, "application/openmetrics-text; version=1.0.0");
    assert!(status.contains(" 200 "));
    assert!(
        headers.contains("application/openmetrics-text"),
        "{headers}"
    );
    assert!(body.trim_end().ends_with("# EOF"), "{body}");
    let mut s = TcpStream::connect(("127.0.0.1", pl_port)).unwrap();
    write!(s, "GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert!(raw.starts_with("HTTP/1.1 404"), "{raw}");
}
