//! The control process's Prometheus endpoint against a real cluster (`tidepool up --standbys 2
//! --metrics-listen ADDR`): scraped over HTTP, parsed by a Prometheus text-format parser, the
//! values checked against what the cluster is; then a switchover, and the new primary is
//! killed: the term, the switchover and failover counts and the roles must follow.

mod ha;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use ha::HaCluster;
use prometheus_parse::{Scrape, Value};

/// One HTTP/1.0 GET: the status line, the headers and the body.
fn get(addr: SocketAddr, path: &str, accept: &str) -> (String, String, String) {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: {addr}\r\nAccept: {accept}\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((&raw, ""));
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_lowercase(), body.to_string())
}

fn scrape(addr: SocketAddr) -> (Scrape, String) {
    let (status, headers, body) = get(addr, "/metrics", "text/plain");
    assert!(status.contains(" 200 "), "{status}\n{body}");
    assert!(
        headers.contains("content-type: text/plain; version=0.0.4"),
        "{headers}"
    );
    let parsed = Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
        .unwrap_or_else(|e| panic!("not Prometheus text ({e}):\n{body}"));
    (parsed, body)
}

/// The value of the sample `name` whose labels include `labels`.
fn value(s: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    s.samples
        .iter()
        .find(|x| x.metric == name && labels.iter().all(|(k, v)| x.labels.get(k) == Some(*v)))
        .map(|x| match x.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

fn is_counter(s: &Scrape, name: &str) -> bool {
    s.samples
        .iter()
        .any(|x| x.metric == name && matches!(x.value, Value::Counter(_)))
}

/// Scrapes until `ok` holds (the control loop and the backup thread update on their own
/// clocks); the last scrape either way.
fn scrape_until(
    addr: SocketAddr,
    within: Duration,
    ok: impl Fn(&Scrape) -> bool,
) -> (Scrape, String, bool) {
    let start = Instant::now();
    loop {
        let (s, body) = scrape(addr);
        if ok(&s) {
            return (s, body, true);
        }
        if start.elapsed() > within {
            return (s, body, false);
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn metrics_endpoint_reports_the_cluster_and_follows_a_failover() {
    let port = testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    let addr: SocketAddr = listen.parse().unwrap();
    // The control process's config file: what `up` reads, and the control process again on
    // SIGHUP.
    let config = std::env::temp_dir().join(format!("tp-control-{}.toml", std::process::id()));
    std::fs::write(&config, "durability = \"any 2\"\n").unwrap();
    let config_arg = config.to_string_lossy().into_owned();
    let c = HaCluster::settled(&["--metrics-listen", &listen, "--config", &config_arg]);

    // `status` names the endpoint as the control process's address.
    let status = c.tidepool(&["status"]);
    assert!(status.text.contains(&listen), "{}", status.text);

    let settled = |s: &Scrape| {
        value(s, "tidepool_control_leader", &[]) == Some(1.0)
            && value(s, "tidepool_nodes", &[("role", "standby")]) == Some(2.0)
            && ["node1", "node2", "node3"]
                .iter()
                .all(|n| value(s, "tidepool_node_healthy", &[("node", n)]) == Some(1.0))
            && value(s, "tidepool_backups", &[("type", "full")]).is_some_and(|v| v >= 1.0)
    };
    let (s, body, ok) = scrape_until(addr, Duration::from_secs(60), settled);
    assert!(
        ok,
        "metrics never showed a settled cluster:\n{body}\n{}",
        c.logs()
    );
    assert_eq!(value(&s, "tidepool_term", &[]), Some(0.0), "{body}");
    assert_eq!(value(&s, "tidepool_primary_term", &[]), Some(0.0), "{body}");
    assert_eq!(
        value(&s, "tidepool_nodes", &[("role", "primary")]),
        Some(1.0)
    );
    assert_eq!(
        value(&s, "tidepool_nodes", &[("role", "unreachable")]),
        Some(0.0)
    );
    assert_eq!(
        value(
            &s,
            "tidepool_node_role",
            &[("node", "node1"), ("role", "primary")]
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(
            &s,
            "tidepool_node_role",
            &[("node", "node2"), ("role", "primary")]
        ),
        Some(0.0),
        "{body}"
    );
    for n in ["node2", "node3"] {
        let lag = value(&s, "tidepool_replication_lag_bytes", &[("node", n)]);
        assert!(lag.is_some_and(|l| l >= 0.0), "{n}: {body}");
        assert!(
            value(
                &s,
                "tidepool_replication_receipt_age_seconds",
                &[("node", n)]
            )
            .is_some(),
            "{n}: {body}"
        );
    }
    assert_eq!(
        value(&s, "tidepool_replication_lag_bytes", &[("node", "node1")]),
        None,
        "the primary has no lag: {body}"
    );
    assert!(is_counter(&s, "tidepool_failovers_total"), "{body}");
    assert_eq!(
        value(&s, "tidepool_failovers_total", &[("trigger", "automatic")]),
        Some(0.0),
        "{body}"
    );
    assert_eq!(value(&s, "tidepool_switchovers_total", &[]), Some(0.0));
    assert_eq!(
        value(&s, "tidepool_topology_store_up", &[("store", "file")]),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(
            &s,
            "tidepool_topology_store_errors_total",
            &[("store", "file")]
        ),
        Some(0.0)
    );
    assert_eq!(value(&s, "tidepool_backup_repository_up", &[]), Some(1.0));
    // `up` took the first full backup minutes ago at most.
    let age = value(&s, "tidepool_backup_age_seconds", &[]).expect("backup age");
    assert!((0.0..600.0).contains(&age), "{body}");
    let finished = value(
        &s,
        "tidepool_backup_last_success_timestamp_seconds",
        &[("type", "full")],
    )
    .expect("last full backup");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!(finished <= now && finished > now - 600.0, "{body}");

    // OpenMetrics when asked for, as Prometheus asks.
    let (status_line, headers, om) = get(
        addr,
        "/metrics",
        "application/openmetrics-text;version=1.0.0,text/plain;q=0.5",
    );
    assert!(status_line.contains(" 200 "), "{status_line}");
    assert!(
        headers.contains("content-type: application/openmetrics-text"),
        "{headers}"
    );
    assert!(om.ends_with("# EOF\n"), "{om}");
    assert!(om.contains("# TYPE tidepool_failovers counter"), "{om}");
    let (status_line, _, _) = get(addr, "/nothing", "*/*");
    assert!(status_line.contains(" 404 "), "{status_line}");

    // `systemctl reload` (SIGHUP): the control process reads its config again, applies what
    // can change live (here the policy, a timer, the log level) and names what cannot.
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.dir.join("state.json")).unwrap()).unwrap();
    let control = state["processes"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == "control"))
        .and_then(|p| p["pid"].as_u64())
        .expect("control pid in state.json") as u32;
    let sync_names = || {
        let out = c.psql_node(0, "SHOW synchronous_standby_names");
        assert!(out.success(), "{}", out.text);
        out.text.trim().to_string()
    };
    let wait_sync = |want: &dyn Fn(&str) -> bool, what: &str| {
        let start = Instant::now();
        loop {
            let now = sync_names();
            if want(&now) {
                return now;
            }
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{what}: synchronous_standby_names is still {now:?}\n{}",
                c.log("control")
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let any2 = sync_names();
    assert!(any2.starts_with("ANY 1 ("), "{any2}");
    std::fs::write(
        &config,
        "log_level = \"info\"\ndurability = \"any 3\"\npool_size = 9\n\
         [timers]\nfailure_timeout_ms = 1600\n",
    )
    .unwrap();
    ha::signal(control, libc::SIGHUP);
    let any3 = wait_sync(&|s| s != any2, "durability any 3 after SIGHUP");
    assert!(any3.starts_with("ANY 2 ("), "{any3}");
    let start = Instant::now();
    while !c
        .log("control")
        .contains("durability policy in force on the primary")
    {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{}",
            c.log("control")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let log = c.log("control");
    let reloaded = log
        .lines()
        .find(|l| l.contains("SIGHUP: config reloaded"))
        .unwrap_or_else(|| panic!("no reload line:\n{log}"));
    for key in ["log_level", "durability", "timers.failure_timeout_ms"] {
        assert!(reloaded.contains(key), "{key}: {reloaded}");
    }
    assert!(!reloaded.contains("pool_size"), "{reloaded}");
    assert!(
        log.lines().any(|l| l.contains("not applied")
            && l.contains("pool_size")
            && l.contains("needs `tidepool up`")),
        "{log}"
    );
    let (s, body) = scrape(addr);
    let reloads = |s: &Scrape, r: &str| {
        value(s, "tidepool_control_config_reloads_total", &[("result", r)]).unwrap_or(-1.0)
    };
    assert_eq!(reloads(&s, "ok"), 1.0, "{body}");
    assert_eq!(reloads(&s, "error"), 0.0, "{body}");
    assert_eq!(
        value(&s, "tidepool_control_config_keys_not_applied", &[]),
        Some(1.0),
        "pool_size: {body}"
    );
    // Back to `any 2`; a file that does not parse changes nothing and says so.
    std::fs::write(&config, "log_level = \"info\"\ndurability = \"any 2\"\n").unwrap();
    ha::signal(control, libc::SIGHUP);
    wait_sync(&|s| s == any2, "durability any 2 after SIGHUP");
    std::fs::write(&config, "durability = \n").unwrap();
    ha::signal(control, libc::SIGHUP);
    let start = Instant::now();
    while !c.log("control").contains("config not reloaded") {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{}",
            c.log("control")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(sync_names(), any2);
    let (s, body) = scrape(addr);
    assert_eq!(
        (reloads(&s, "ok"), reloads(&s, "error")),
        (2.0, 1.0),
        "{body}"
    );
    assert_eq!(
        value(&s, "tidepool_control_config_keys_not_applied", &[]),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        value(&s, "tidepool_control_leader", &[]),
        Some(1.0),
        "{body}"
    );
    std::fs::write(&config, "durability = \"any 2\"\n").unwrap();

    // A switchover to node2: counted, and the term moves.
    let out = c.tidepool(&["switchover", "--to", "node2"]);
    assert!(out.success(), "{}\n{}", out.text, c.logs());
    let (_, r) = c.wait_new_primary(0, 0, Duration::from_secs(30));
    let switch_term = r.primary_term;
    let (s, body, ok) = scrape_until(addr, Duration::from_secs(30), |s| {
        value(s, "tidepool_switchovers_total", &[]) == Some(1.0)
            && value(s, "tidepool_primary_term", &[]) == Some(switch_term as f64)
            && value(
                s,
                "tidepool_node_role",
                &[("node", "node2"), ("role", "primary")],
            ) == Some(1.0)
    });
    assert!(ok, "metrics did not follow the switchover:\n{body}");
    assert_eq!(
        value(&s, "tidepool_failovers_total", &[("trigger", "automatic")]),
        Some(0.0),
        "a switchover is no failover: {body}"
    );
    c.wait_all_streaming(&[], Duration::from_secs(60));

    // The primary (node2) dies: a failover at a new term, and the metrics say so.
    c.kill_node(1);
    let (new, r) = c.wait_new_primary(1, switch_term, Duration::from_secs(60));
    let new_name = c.nodes[new].name.clone();
    let term = r.primary_term as f64;
    let (s, body, ok) = scrape_until(addr, Duration::from_secs(30), |s| {
        value(s, "tidepool_failovers_total", &[("trigger", "automatic")]) == Some(1.0)
            && value(s, "tidepool_primary_term", &[]) == Some(term)
            && value(
                s,
                "tidepool_node_role",
                &[("node", "node2"), ("role", "unreachable")],
            ) == Some(1.0)
    });
    assert!(
        ok,
        "metrics did not follow the failover:\n{body}\n{}",
        c.logs()
    );
    assert!(
        value(&s, "tidepool_term", &[]).is_some_and(|t| t >= term),
        "{body}"
    );
    assert_eq!(
        value(
            &s,
            "tidepool_node_role",
            &[("node", &new_name), ("role", "primary")]
        ),
        Some(1.0),
        "{body}"
    );
    assert_eq!(
        value(&s, "tidepool_node_healthy", &[("node", "node2")]),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "tidepool_failovers_total", &[("trigger", "forced")]),
        Some(0.0)
    );
    assert_eq!(
        value(&s, "tidepool_failover_duration_seconds_count", &[]),
        Some(1.0),
        "{body}"
    );
}
