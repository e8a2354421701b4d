//! pgbench through the gateway: 200 clients on a budget of 20 backends, in each query mode
//! (simple, extended, prepared), with zero failed transactions, never more than 20 backends
//! of the user in Postgres, and a pool that stays stable under that contention: once warm, no
//! backend is opened (waiting sessions queue for the next released backend instead of the pooler
//! closing and logging in backends; issue 10, point 1).

use std::sync::Mutex;
use std::thread;
use std::time::Duration;

use testkit::{pgbench, PgCluster, PgbenchSummary, Tidepool, TidepoolOpts, ALICE, APP_DB};

const CLIENTS: &str = "200";
const BUDGET: usize = 20;
/// Seconds of each run, and when in it the pool counts as warm (all clients connected, the
/// budget taken, the cores balanced).
const RUN_SECS: u64 = 12;
const WARM_SECS: u64 = 6;
/// Backends a warm pool may still open during the rest of a run: a core may move a backend to
/// another whose sessions clearly waited longer (pool.rs, `give_away_to`). Before issue 10 a
/// contended pool opened hundreds per second.
const MAX_OPENED_WARM: i64 = 4;

/// Backends Postgres started for the database so far (`pg_stat_database.sessions`: counted at
/// connection, flushed by a busy backend within a second). Read from another database, so that
/// the reading connection does not count itself.
fn sessions_started(pg: &PgCluster) -> i64 {
    pg.psql_admin_db(
        "postgres",
        &format!("SELECT sessions FROM pg_stat_database WHERE datname = '{APP_DB}'"),
    )
    .trim()
    .parse()
    .expect("sessions")
}

/// A fresh cluster with pgbench's tables (scale 1), made directly.
fn initialized_cluster() -> PgCluster {
    let pg = PgCluster::start();
    let init = pgbench(
        &pg.direct(),
        ALICE.0,
        ALICE.1,
        APP_DB,
        &["-i", "-s", "1", "-q"],
        Duration::from_secs(120),
    );
    assert!(init.success(), "pgbench -i directly:\n{}", init.text);
    pg
}

/// Runs pgbench with `args` for `RUN_SECS` through `tp`; returns its output and how many backends
/// Postgres started after `WARM_SECS`.
fn contended_run(pg: &PgCluster, tp: &Tidepool, args: &[&str]) -> (testkit::Output, i64) {
    let endpoint = tp.endpoint();
    let secs = RUN_SECS.to_string();
    let mut args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    args.extend(["-T".into(), secs, "-n".into()]);
    let bench = thread::spawn(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        // The run, the time to connect the clients, and slack for a loaded machine; past it the
        // gateway is stuck and the run is killed.
        pgbench(
            &endpoint,
            ALICE.0,
            ALICE.1,
            APP_DB,
            &args,
            Duration::from_secs(90),
        )
    });
    thread::sleep(Duration::from_secs(WARM_SECS));
    let warm = sessions_started(pg);
    let out = bench.join().expect("pgbench thread");
    // Backends opened in the last second of the run report their connection within a second.
    thread::sleep(Duration::from_millis(1500));
    let opened = sessions_started(pg) - warm;
    (out, opened)
}

/// The three runs are heavy (200 clients each on a 2-core machine): one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn run(mode: &str) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let pg = initialized_cluster();

    let tp = Tidepool::start(&pg, TidepoolOpts::default().pool_size(BUDGET));
    let watch = tp.watch_backends(ALICE.0);
    let (out, opened) = contended_run(&pg, &tp, &["-c", CLIENTS, "-j", "4", "-M", mode]);
    let (max, samples) = watch.stop();
    let summary = PgbenchSummary::parse(&out.text);
    assert!(
        out.success() && summary.is_some(),
        "pgbench -M {mode} through the gateway failed ({:?}):\n{}\n{}",
        out.code,
        out.text,
        tp.logs()
    );
    let summary = summary.expect("checked above");
    assert_eq!(
        summary.failed, 0,
        "failed transactions with -M {mode}:\n{}",
        out.text
    );
    assert!(
        summary.processed > 0,
        "no transaction processed with -M {mode}:\n{}",
        out.text
    );
    assert!(samples > 0);
    assert!(
        max <= BUDGET as i64,
        "-M {mode}: alice had {max} backends at once, over the budget of {BUDGET}\n{}",
        out.text
    );
    assert!(
        opened <= MAX_OPENED_WARM,
        "-M {mode}: the warm pool opened {opened} backends in {} s under contention\n{}",
        RUN_SECS - WARM_SECS,
        tp.logs()
    );
    // The database is consistent: every transaction's three updates and one insert landed.
    let check = pg.psql_admin_db(
        APP_DB,
        "SELECT (SELECT sum(abalance) FROM pgbench_accounts) = (SELECT sum(delta) FROM pgbench_history) \
         AND (SELECT sum(bbalance) FROM pgbench_branches) = (SELECT sum(delta) FROM pgbench_history) \
         AND (SELECT sum(tbalance) FROM pgbench_tellers) = (SELECT sum(delta) FROM pgbench_history)",
    );
    assert_eq!(
        check.trim(),
        "t",
        "balances disagree with the history after -M {mode}"
    );
    let history: u64 = pg
        .psql_admin_db(APP_DB, "SELECT count(*) FROM pgbench_history")
        .trim()
        .parse()
        .expect("count");
    assert!(
        history >= summary.processed,
        "{history} history rows for {} transactions",
        summary.processed
    );
    eprintln!(
        "pgbench -M {mode}: {} transactions, max {max} backends over {samples} samples, {opened} opened once warm",
        summary.processed
    );
}

#[test]
fn pgbench_simple() {
    run("simple");
}

#[test]
fn pgbench_extended() {
    run("extended");
}

#[test]
fn pgbench_prepared() {
    run("prepared");
}

/// The case: select-only, 40 clients on a pool of 20 (twice as many clients as
/// backends, on both pooler cores). It opened about 250 backends a second before issue 10.
#[test]
fn a_contended_pool_opens_no_backends_once_warm() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let pg = initialized_cluster();
    let tp = Tidepool::start(&pg, TidepoolOpts::default().pool_size(BUDGET));
    for mode in ["simple", "prepared"] {
        let (out, opened) = contended_run(&pg, &tp, &["-S", "-c", "40", "-j", "2", "-M", mode]);
        let summary = PgbenchSummary::parse(&out.text);
        assert!(
            out.success() && summary.is_some_and(|s| s.failed == 0 && s.processed > 0),
            "pgbench -S -M {mode}:\n{}\n{}",
            out.text,
            tp.logs()
        );
        assert!(
            opened <= MAX_OPENED_WARM,
            "-S -M {mode}, 40 clients: the warm pool opened {opened} backends in {} s\n{}",
            RUN_SECS - WARM_SECS,
            tp.logs()
        );
        eprintln!("pgbench -S -M {mode}, 40 clients: {opened} backends opened once warm");
    }
}
