//! Signals sent to the real processes: SIGTERM drains a gateway or a pooler (no new clients,
//! transactions in progress finish, idle sessions hear 57P01, exit 0), a rolling restart of
//! gateways sharing one port loses no acknowledged write, and SIGHUP reloads the config
//! without dropping a client.

use std::future::Future;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use common::Watched;
use testkit::{Endpoint, PgCluster, Tidepool, TidepoolOpts, ALICE, APP_DB};
use tokio_postgres::error::SqlState;

async fn bounded<T>(limit: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("test exceeded {limit:?}"))
}

fn report(test: &str, line: impl AsRef<str>) {
    eprintln!("[lifecycle::{test}] {}", line.as_ref());
}

/// A client whose connection's last error (an unsolicited FATAL, such as 57P01 sent to an idle
/// session) is kept for the test to read.
fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("<no SQLSTATE: {e}>"))
}

/// What the writers of the rolling restart saw.
#[derive(Default)]
struct Tally {
    acked: Mutex<Vec<i64>>,
    /// Sessions ended by 57P01 (at a request or while idle).
    shutdowns: AtomicUsize,
    /// Connection attempts that failed (no request was sent on them).
    connect_failures: AtomicUsize,
    /// A request that got an error but had run (its retry met its own row): must not happen.
    ran_despite_error: AtomicUsize,
    /// Any other error of a request.
    other_errors: Mutex<Vec<String>>,
}

/// Inserts ids `first, first+stride, ...` one per request until `stop`; a transaction of two
/// rows every 5th (BEGIN, INSERT, pause, INSERT, COMMIT), so that some are in progress when a
/// drain starts. A session ended by the gateway (57P01, or the connection closed after it) is
/// reopened and the unacknowledged request sent again.
async fn writer(ep: Endpoint, first: i64, stride: i64, stop: Arc<AtomicBool>, t: Arc<Tally>) {
    let mut next = first;
    let mut conn: Option<Watched> = None;
    let mut retrying = false;
    while !stop.load(Ordering::Relaxed) {
        let c = match conn.take() {
            Some(c) => c,
            None => match Watched::connect(&ep).await {
                Ok(c) => c,
                Err(e) => {
                    t.connect_failures.fetch_add(1, Ordering::Relaxed);
                    report("rolling_restart", format!("connect failed ({})", code(&e)));
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
        };
        let ids = if (next / stride) % 5 == 0 {
            vec![next, next + 1_000_000_000]
        } else {
            vec![next]
        };
        let result = if ids.len() == 1 {
            c.client
                .execute("insert into rolling values ($1)", &[&ids[0]])
                .await
                .map(|_| ())
        } else {
            async {
                c.client.batch_execute("begin").await?;
                c.client
                    .execute("insert into rolling values ($1)", &[&ids[0]])
                    .await?;
                tokio::time::sleep(Duration::from_millis(30)).await;
                c.client
                    .execute("insert into rolling values ($1)", &[&ids[1]])
                    .await?;
                c.client.batch_execute("commit").await
            }
            .await
        };
        match result {
            Ok(()) => {
                t.acked.lock().unwrap().extend(&ids);
                next += stride;
                retrying = false;
                conn = Some(c);
            }
            Err(e) => {
                let ended = c.ended();
                let by_shutdown = e.code() == Some(&SqlState::ADMIN_SHUTDOWN)
                    || ended.as_ref().is_some_and(|(code, _)| code == "57P01");
                if e.code() == Some(&SqlState::UNIQUE_VIOLATION) && retrying {
                    t.ran_despite_error.fetch_add(1, Ordering::Relaxed);
                    next += stride;
                    retrying = false;
                } else if by_shutdown || e.is_closed() {
                    if by_shutdown {
                        t.shutdowns.fetch_add(1, Ordering::Relaxed);
                    } else {
                        t.other_errors
                            .lock()
                            .unwrap()
                            .push(format!("closed without 57P01: {e} / {ended:?}"));
                    }
                    retrying = true;
                } else {
                    t.other_errors
                        .lock()
                        .unwrap()
                        .push(format!("{}: {e}", code(&e)));
                    retrying = true;
                }
                // `c` is dropped: the next round opens a new session.
            }
        }
    }
}

/// New connections all along, each running one query: what the drains do to clients that
/// arrive while a listener closes. Allowed: 57P03 at login (accepted just before the listener
/// closed), 57P01 at the query (ended idle right after login). Anything else (a reset, a refused
/// connection while another gateway listens) is recorded.
async fn churner(ep: Endpoint, stop: Arc<AtomicBool>, t: Arc<Tally>, done: Arc<AtomicUsize>) {
    while !stop.load(Ordering::Relaxed) {
        match Watched::connect(&ep).await {
            Ok(c) => match c.client.simple_query("select 1").await {
                Ok(_) => {
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Err(e) if e.code() == Some(&SqlState::ADMIN_SHUTDOWN) => {}
                // 57P01 arrived before the query was sent: it ended the connection.
                Err(e) if e.is_closed() && c.ended().is_some_and(|(code, _)| code == "57P01") => {}
                Err(e) => t
                    .other_errors
                    .lock()
                    .unwrap()
                    .push(format!("churn query: {e} / {:?}", c.ended())),
            },
            Err(e) if e.code() == Some(&SqlState::CANNOT_CONNECT_NOW) => {
                t.connect_failures.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => t
                .other_errors
                .lock()
                .unwrap()
                .push(format!("churn connect: {e}")),
        }
    }
}

fn gateway_config(dir: &Path, name: &str, body: &str) -> String {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p.to_string_lossy().into_owned()
}

/// Gateways A, then B and C, on one port: B starts, A gets SIGTERM; C starts, B gets SIGTERM.
/// Four writers keep inserting through the port all along. Every acknowledged row must be in
/// the table, no request may fail except by 57P01 (then it did not run, and is sent again),
/// and each drained gateway exits 0.
#[test]
fn rolling_restart_loses_no_acknowledged_write() {
    let pg = PgCluster::start();
    let tp = Tidepool::start(
        &pg,
        TidepoolOpts::default()
            .gateway_arg("--shutdown-timeout-ms")
            .gateway_arg("15000"),
    );
    pg.psql_admin_db(
        APP_DB,
        "create table rolling (id bigint primary key); grant all on rolling to alice;",
    );
    let port = tp.gateway_port();
    let ep = tp.endpoint();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let tally = Arc::new(Tally::default());
    let writers: Vec<_> = (0..4)
        .map(|i| rt.spawn(writer(ep.clone(), i + 1, 4, stop.clone(), tally.clone())))
        .collect();
    let churned = Arc::new(AtomicUsize::new(0));
    let churn = rt.spawn(churner(
        ep.clone(),
        stop.clone(),
        tally.clone(),
        churned.clone(),
    ));
    let mut tp = tp;
    let count = |t: &Tally| t.acked.lock().unwrap().len();
    std::thread::sleep(Duration::from_millis(1500));
    let before = count(&tally);
    assert!(
        before > 0,
        "no write went through before the restart\n{}",
        tp.logs()
    );

    // A → B.
    let mut b = tp.start_gateway_on(port);
    let t0 = Instant::now();
    tp.signal_gateway(libc::SIGTERM);
    let status = tp
        .wait_gateway_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("gateway A still runs 30 s after SIGTERM\n{}", tp.logs()));
    report(
        "rolling_restart",
        format!("gateway A exited {status} after {:?}", t0.elapsed()),
    );
    assert!(status.success(), "gateway A: {status}\n{}", tp.logs());
    std::thread::sleep(Duration::from_millis(1500));
    let after_a = count(&tally);
    assert!(
        after_a > before,
        "no write went through gateway B\n{}",
        b.logs()
    );

    // B → C.
    let c = tp.start_gateway_on(port);
    let t0 = Instant::now();
    b.signal(libc::SIGTERM);
    let status = b
        .wait_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("gateway B still runs 30 s after SIGTERM\n{}", b.logs()));
    report(
        "rolling_restart",
        format!("gateway B exited {status} after {:?}", t0.elapsed()),
    );
    assert!(status.success(), "gateway B: {status}\n{}", b.logs());
    std::thread::sleep(Duration::from_millis(1500));
    let after_b = count(&tally);
    assert!(
        after_b > after_a,
        "no write went through gateway C\n{}",
        c.logs()
    );

    stop.store(true, Ordering::Relaxed);
    rt.block_on(async {
        for w in writers {
            bounded(Duration::from_secs(30), w).await.unwrap();
        }
        bounded(Duration::from_secs(30), churn).await.unwrap();
    });
    let acked = tally.acked.lock().unwrap().clone();
    let rows: Vec<i64> = pg
        .psql_admin_db(
            APP_DB,
            "copy (select id from rolling order by id) to stdout",
        )
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let rows: std::collections::HashSet<i64> = rows.into_iter().collect();
    let missing: Vec<i64> = acked
        .iter()
        .copied()
        .filter(|id| !rows.contains(id))
        .collect();
    let shutdowns = tally.shutdowns.load(Ordering::Relaxed);
    let others = tally.other_errors.lock().unwrap().clone();
    report(
        "rolling_restart",
        format!(
            "acknowledged {} rows, {} in the table; sessions ended by 57P01: {shutdowns}; \
             new connections served: {}; connect failures (57P03 or refused): {}; \
             other errors: {others:?}",
            acked.len(),
            rows.len(),
            churned.load(Ordering::Relaxed),
            tally.connect_failures.load(Ordering::Relaxed)
        ),
    );
    assert!(missing.is_empty(), "acknowledged but missing: {missing:?}");
    assert!(
        others.is_empty(),
        "requests failed other than by 57P01: {others:?}"
    );
    assert_eq!(
        tally.ran_despite_error.load(Ordering::Relaxed),
        0,
        "a request that failed had run"
    );
    // Each writer was on A, then on B: each drain ended its session.
    assert!(
        shutdowns >= 4,
        "only {shutdowns} sessions were ended by a drain"
    );
    let _ = c;
}

/// SIGTERM to a gateway: a new client is refused, an idle session hears 57P01 at once, a
/// transaction in progress may finish (and its session then ends), one left open past
/// `shutdown_timeout_ms` is ended (rolled back), and the gateway exits 0.
#[test]
fn gateway_sigterm_drains() {
    let pg = PgCluster::start();
    let mut tp = Tidepool::start(
        &pg,
        TidepoolOpts::default()
            .gateway_arg("--shutdown-timeout-ms")
            .gateway_arg("4000"),
    );
    pg.psql_admin_db(
        APP_DB,
        "create table drained (id int primary key); grant all on drained to alice;",
    );
    let ep = tp.endpoint();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(bounded(Duration::from_secs(60), async {
        let idle = Watched::connect(&ep).await.unwrap();
        idle.client.simple_query("select 1").await.unwrap();
        let finishing = Watched::connect(&ep).await.unwrap();
        finishing
            .client
            .batch_execute("begin; insert into drained values (1)")
            .await
            .unwrap();
        let abandoned = Watched::connect(&ep).await.unwrap();
        abandoned
            .client
            .batch_execute("begin; insert into drained values (2)")
            .await
            .unwrap();

        let t0 = Instant::now();
        tp.signal_gateway(libc::SIGTERM);
        let (code, msg) = idle
            .wait_ended(Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("the idle session was not ended\n{}", tp.logs()));
        assert_eq!(code, "57P01", "{msg}");
        assert_eq!(msg, "terminating connection due to administrator command");
        // No new clients, once every core has seen the signal (each looks every 50 ms).
        tokio::time::sleep(Duration::from_millis(500)).await;
        let refused = Watched::connect(&ep).await;
        assert!(refused.is_err(), "a new client got in during the drain");
        // The transaction goes on and commits.
        tokio::time::sleep(Duration::from_millis(300)).await;
        finishing
            .client
            .execute("insert into drained values (3)", &[])
            .await
            .unwrap();
        finishing.client.batch_execute("commit").await.unwrap();
        let (code, _) = finishing
            .wait_ended(Duration::from_secs(3))
            .await
            .expect("the session was not ended after its transaction");
        assert_eq!(code, "57P01");
        // The abandoned one is ended at the timeout.
        let (code, _) = abandoned
            .wait_ended(Duration::from_secs(10))
            .await
            .expect("the open transaction was not ended at the shutdown timeout");
        assert_eq!(code, "57P01");
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(3500),
            "ended after {waited:?}, before the timeout"
        );
        report(
            "gateway_sigterm_drains",
            format!("open transaction ended after {waited:?}"),
        );
    }));
    let status = tp
        .wait_gateway_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("gateway still runs\n{}", tp.logs()));
    assert!(status.success(), "gateway exit: {status}\n{}", tp.logs());
    let rows = pg.psql_admin_db(
        APP_DB,
        "copy (select id from drained order by id) to stdout",
    );
    assert_eq!(
        rows.split_whitespace().collect::<Vec<_>>(),
        vec!["1", "3"],
        "{rows}"
    );
}

/// SIGTERM to a pooler: idle sessions hear 57P01 through the gateway, a transaction in progress
/// commits, and the pooler exits 0.
#[test]
fn pooler_sigterm_drains() {
    let pg = PgCluster::start();
    let mut tp = Tidepool::start(
        &pg,
        TidepoolOpts::default()
            .pooler_arg("--shutdown-timeout-ms")
            .pooler_arg("10000"),
    );
    pg.psql_admin_db(
        APP_DB,
        "create table pooler_drained (id int primary key); grant all on pooler_drained to alice;",
    );
    let ep = tp.endpoint();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(bounded(Duration::from_secs(60), async {
        let idle = Watched::connect(&ep).await.unwrap();
        idle.client.simple_query("select 1").await.unwrap();
        let busy = Watched::connect(&ep).await.unwrap();
        busy.client
            .batch_execute("begin; insert into pooler_drained values (1)")
            .await
            .unwrap();
        tp.signal_pooler(libc::SIGTERM);
        tokio::time::sleep(Duration::from_millis(300)).await;
        // A new session is refused by the draining pooler, through the gateway.
        match Watched::connect(&ep).await {
            Ok(_) => panic!("a new session opened on a draining pooler"),
            Err(e) => assert_eq!(code(&e), "57P03", "{e:?}\n{}", tp.logs()),
        }
        let (code, msg) = idle
            .wait_ended(Duration::from_secs(3))
            .await
            .unwrap_or_else(|| panic!("the idle session was not ended\n{}", tp.logs()));
        assert_eq!(code, "57P01", "{msg}");
        tokio::time::sleep(Duration::from_millis(300)).await;
        busy.client
            .execute("insert into pooler_drained values (2)", &[])
            .await
            .unwrap();
        busy.client.batch_execute("commit").await.unwrap();
        let (code, _) = busy
            .wait_ended(Duration::from_secs(3))
            .await
            .expect("the session was not ended after its transaction");
        assert_eq!(code, "57P01");
    }));
    let status = tp
        .wait_pooler_exit(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("pooler still runs\n{}", tp.logs()));
    assert!(status.success(), "pooler exit: {status}\n{}", tp.logs());
    let rows = pg.psql_admin_db(
        APP_DB,
        "copy (select id from pooler_drained order by id) to stdout",
    );
    assert_eq!(
        rows.split_whitespace().collect::<Vec<_>>(),
        vec!["1", "2"],
        "{rows}"
    );
}

/// Waits until `log()` has `needle` at least `n` times.
fn wait_log(log: impl Fn() -> String, needle: &str, n: usize, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while log().matches(needle).count() < n {
        assert!(
            Instant::now() < deadline,
            "{what}: no {needle:?} in the log\n{}",
            log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// SIGHUP re-reads the config files: a connected client keeps working; the gateway's lowered
/// `max_clients` refuses the next client (53300); the pooler's raised `max_backends` lets a
/// request through that waited out `query_wait_timeout_ms` before; a key that needs a restart
/// is logged as such; a broken file changes nothing.
#[test]
fn sighup_reloads_without_dropping_clients() {
    let pg = PgCluster::start();
    let dir = pg.dir().to_path_buf();
    let gw = gateway_config(&dir, "gateway.toml", "max_clients = 100\n");
    let pl = gateway_config(
        &dir,
        "pooler.toml",
        "max_backends = 1\nquery_wait_timeout_ms = 1500\n",
    );
    let mut tp = Tidepool::start(
        &pg,
        TidepoolOpts::default()
            .gateway_arg("--config")
            .gateway_arg(&gw)
            .pooler_arg("--config")
            .pooler_arg(&pl),
    );
    let ep = tp.endpoint();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(bounded(Duration::from_secs(90), async {
        let kept = Watched::connect(&ep).await.unwrap();
        kept.client.simple_query("select 1").await.unwrap();
        // One backend in all: a transaction holds it, another request waits and times out.
        let holder = Watched::connect(&ep).await.unwrap();
        holder
            .client
            .batch_execute("begin; select 1")
            .await
            .unwrap();
        // (At its login, when its pooler core has not seen this login yet, or at its query.)
        let waited = match Watched::connect(&ep).await {
            Err(e) => (code(&e), e.as_db_error().map(|d| d.message().to_string())),
            Ok(w) => {
                let e = w.client.simple_query("select 2").await.unwrap_err();
                // The FATAL answers the query (or, had it come first, ended the connection).
                match (e.code(), w.wait_ended(Duration::from_secs(1)).await) {
                    (None, Some((c, m))) => (c, Some(m)),
                    _ => (code(&e), e.as_db_error().map(|d| d.message().to_string())),
                }
            }
        };
        assert_eq!(
            waited,
            ("08P01".to_string(), Some("query_wait_timeout".to_string())),
            "{}",
            tp.logs()
        );

        std::fs::write(&gw, "max_clients = 3\nlinks_per_core = 3\n").unwrap();
        std::fs::write(
            &pl,
            "max_backends = 2\nquery_wait_timeout_ms = 1500\nlog_level = \"info,tidepool_pooler::backend=debug\"\n",
        )
        .unwrap();
        tp.signal_gateway(libc::SIGHUP);
        tp.signal_pooler(libc::SIGHUP);
        wait_log(|| tp.gateway_log(), "configuration reloaded", 1, "gateway");
        wait_log(|| tp.pooler_log(), "configuration reloaded", 1, "pooler");
        assert!(tp.gateway_log().contains("max_clients"), "{}", tp.logs());
        assert!(
            tp.gateway_log().contains("only after a restart"),
            "links_per_core: {}",
            tp.logs()
        );
        assert!(tp.pooler_log().contains("max_backends"), "{}", tp.logs());
        // Give every core its tick.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(tp.alive(), "a process died of SIGHUP\n{}", tp.logs());

        // Clients connected before are still served.
        kept.client.simple_query("select 1").await.unwrap();
        holder.client.simple_query("select 1").await.unwrap();
        // A second backend is allowed now: this one does not wait.
        let second = Watched::connect(&ep).await.unwrap();
        second.client.simple_query("select 3").await.unwrap();
        // ... and its login is logged at the level the reload set.
        let log = tp.pooler_log();
        let at = log.find("configuration reloaded").unwrap();
        assert!(log[at..].contains("backend connected"), "log_level not applied\n{log}");
        if std::env::var_os("RUST_LOG").is_none() {
            assert!(!log[..at].contains("backend connected"), "{log}");
        }
        // kept, holder, second: three clients, the new limit.
        match Watched::connect(&ep).await {
            Ok(_) => panic!("a fourth client got in past max_clients = 3\n{}", tp.logs()),
            Err(e) => assert_eq!(code(&e), "53300", "{e}"),
        }
        holder.client.batch_execute("commit").await.unwrap();

        // A file that does not parse changes nothing, and the process stays.
        std::fs::write(&gw, "max_clients = \"many\"\n").unwrap();
        tp.signal_gateway(libc::SIGHUP);
        wait_log(|| tp.gateway_log(), "nothing changed", 1, "gateway");
        kept.client.simple_query("select 1").await.unwrap();
        assert!(
            Watched::connect(&ep).await.is_err(),
            "the broken file was applied"
        );
    }));
    assert!(tp.alive(), "{}", tp.logs());
}

/// A self-signed certificate for `cn` written to `cert.pem` and `key.pem` in `dir`.
fn make_cert(dir: &Path, cn: &str) -> (String, String) {
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let out = testkit::run_merged(
        std::process::Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .arg("-subj")
            .arg(format!("/CN={cn}"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        None,
        Duration::from_secs(60),
    );
    assert!(out.success(), "{}", out.text);
    (
        cert.to_string_lossy().into_owned(),
        key.to_string_lossy().into_owned(),
    )
}

/// The subject of the certificate the gateway on `port` serves (openssl's Postgres STARTTLS).
fn served_subject(port: u16) -> String {
    let out = testkit::run_merged(
        std::process::Command::new("openssl").args([
            "s_client",
            "-starttls",
            "postgres",
            "-connect",
            &format!("127.0.0.1:{port}"),
        ]),
        Some(Vec::new()),
        Duration::from_secs(30),
    );
    out.text
        .lines()
        .find(|l| l.starts_with("subject="))
        .unwrap_or_else(|| panic!("no certificate served:\n{}", out.text))
        .to_string()
}

/// SIGHUP reads the TLS certificate again: a renewed certificate in the same files is served
/// to the next TLS client, and a session opened before goes on.
#[test]
fn sighup_reloads_tls_certificate() {
    let pg = PgCluster::start();
    let dir = pg.dir().join("tls-reload");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = make_cert(&dir, "first");
    let gw = gateway_config(
        &dir,
        "gateway.toml",
        &format!("tls_cert = {cert:?}\ntls_key = {key:?}\n"),
    );
    let mut tp = Tidepool::start(
        &pg,
        TidepoolOpts::default()
            .gateway_arg("--config")
            .gateway_arg(&gw),
    );
    assert!(served_subject(tp.gateway_port()).contains("first"));
    let ep = tp.endpoint();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let kept = rt.block_on(async { Watched::connect(&ep).await.unwrap() });
    make_cert(&dir, "second");
    tp.signal_gateway(libc::SIGHUP);
    wait_log(|| tp.gateway_log(), "configuration reloaded", 1, "gateway");
    std::thread::sleep(Duration::from_millis(300));
    let subject = served_subject(tp.gateway_port());
    assert!(subject.contains("second"), "{subject}\n{}", tp.logs());
    rt.block_on(async { kept.client.simple_query("select 1").await.unwrap() });
    assert!(tp.alive(), "{}", tp.logs());
}

/// A rolling restart with the Unix socket and the read-only listener: the old gateway's drain
/// leaves the socket path the new gateway bound (it removes only its own), closes its read-only
/// listener too (a client there is served by the new one), and exits 0.
#[test]
fn rolling_restart_keeps_unix_socket_and_read_only_listener() {
    let pg = PgCluster::start();
    let dir = pg.dir().join("unix");
    std::fs::create_dir_all(&dir).unwrap();
    let ro_port = testkit::free_port();
    let mut tp = Tidepool::start(
        &pg,
        TidepoolOpts::default()
            .gateway_arg("--unix-socket-dir")
            .gateway_arg(dir.to_string_lossy())
            .gateway_arg("--read-only-listen")
            .gateway_arg(format!("127.0.0.1:{ro_port}")),
    );
    let port = tp.gateway_port();
    let unix = format!("host={} port={port} user=alice dbname=app", dir.display());
    let ro = format!("host=127.0.0.1 port={ro_port} user=alice dbname=app");
    let psql = |conninfo: &str| {
        testkit::run_merged(
            std::process::Command::new("psql")
                .args(["-X", "-A", "-t", conninfo, "-c", "select 7"])
                .env("PGPASSWORD", ALICE.1)
                .env("PGCONNECT_TIMEOUT", "10"),
            None,
            Duration::from_secs(30),
        )
    };
    assert!(psql(&unix).text.contains('7'), "{}", tp.logs());
    let mut b = tp.start_gateway_on(port);
    // B binds the socket path anew; wait until A's drain could have removed it.
    std::thread::sleep(Duration::from_millis(500));
    tp.signal_gateway(libc::SIGTERM);
    let status = tp
        .wait_gateway_exit(Duration::from_secs(30))
        .unwrap_or_else(|| panic!("gateway A still runs\n{}", tp.logs()));
    assert!(status.success(), "{status}\n{}", tp.logs());
    let out = psql(&unix);
    assert!(
        out.success() && out.text.contains('7'),
        "the Unix socket is gone after the old gateway's drain: {}\n{}",
        out.text,
        b.logs()
    );
    let out = psql(&ro);
    assert!(
        out.success() && out.text.contains('7'),
        "{}\n{}",
        out.text,
        b.logs()
    );
    assert!(b.alive());
}
