//! pgbench through the gateway: 200 clients on a budget of 20 backends, in each query mode
//! (simple, extended, prepared), with zero failed transactions and never more than 20 backends
//! of the user in Postgres.

use std::sync::Mutex;
use std::time::Duration;

use testkit::{pgbench, PgCluster, PgbenchSummary, Tidepool, TidepoolOpts, ALICE, APP_DB};

const CLIENTS: &str = "200";
const BUDGET: usize = 20;

/// The three runs are heavy (200 clients each on a 2-core machine): one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn run(mode: &str) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
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

    let tp = Tidepool::start(&pg, TidepoolOpts::default().pool_size(BUDGET));
    let watch = tp.watch_backends(ALICE.0);
    let out = pgbench(
        &tp.endpoint(),
        ALICE.0,
        ALICE.1,
        APP_DB,
        &["-c", CLIENTS, "-j", "4", "-T", "10", "-M", mode, "-n"],
        // 10 s of run, the time to connect 200 clients, and slack for a loaded machine; past it
        // the gateway is stuck and the run is killed.
        Duration::from_secs(90),
    );
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
        "pgbench -M {mode}: {} transactions, max {max} backends over {samples} samples",
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
