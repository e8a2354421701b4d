//! Small firehose runs through Tidepool (testkit's `PgCluster` + `Tidepool`, pool budget 10
//! backends per user/database): hundreds of client sessions, churned, reading and writing, on
//! a handful of Postgres backends. The books must balance exactly as against Postgres itself
//! (tests/small.rs), a clean run has no error at all, every acknowledged write is one row (a
//! pooler that replayed or lost an INSERT would show here), and Postgres never sees more
//! backends of the user than the pool budget (pg_stat_activity sampled every 50 ms).
//!
//! Debug builds make SCRAM's client side (4096 PBKDF2 rounds, ~60 ms) the bottleneck of
//! connecting, so the big runs log in as bob (md5) and alice (SCRAM) gets the small one.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use serde_json::Value;
use testkit::{run_merged, PgCluster, Tidepool, TidepoolOpts, ALICE, APP_DB, BOB};

/// Backend budget per (user, database) given to the pooler.
const BUDGET: i64 = 10;

/// Each test runs Postgres, pooler, gateway and a few hundred clients on a 2-core machine:
/// one at a time.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("firehose-tp-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
    fn path(&self, f: &str) -> PathBuf {
        self.0.join(f)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs firehose to completion (it bounds itself; the timeout is a safety net) with `url` and
/// the whitespace-separated `flags`, writing its JSON report to `json`.
fn firehose(tp: Option<&Tidepool>, url: &str, flags: &str, json: Option<&Path>) -> String {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_firehose"));
    cmd.arg("--url").arg(url).args(flags.split_whitespace());
    if let Some(json) = json {
        cmd.arg("--json").arg(json);
    }
    let out = run_merged(&mut cmd, None, Duration::from_secs(120));
    assert!(
        out.success(),
        "firehose {flags} failed ({:?}):\n{}\n{}",
        out.code,
        out.text,
        tp.map(Tidepool::logs).unwrap_or_default()
    );
    out.text
}

fn load(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).expect("json report");
    serde_json::from_str(&text).expect("valid json")
}

fn n(v: &Value, key: &str) -> u64 {
    v[key]
        .as_u64()
        .unwrap_or_else(|| panic!("{key} missing in {v}"))
}

/// The invariants every report must satisfy (as in tests/small.rs).
fn assert_books_balance(r: &Value) {
    let t = &r["totals"];
    assert_eq!(r["worker_failures"], Value::Array(vec![]));
    assert_eq!(
        t, &r["series_totals"],
        "series does not add up to the totals"
    );
    for key in [
        "connects_ok",
        "connects_failed",
        "disconnects",
        "reads_issued",
        "reads_ok",
        "reads_failed",
        "writes_issued",
        "writes_ok",
        "writes_failed",
    ] {
        let series_sum: u64 = r["series"]
            .as_array()
            .expect("series")
            .iter()
            .map(|p| n(p, key))
            .sum();
        assert_eq!(series_sum, n(t, key), "per-second {key} sum");
    }
    assert_eq!(
        n(t, "reads_issued"),
        n(t, "reads_ok") + n(t, "reads_failed")
    );
    assert_eq!(
        n(t, "writes_issued"),
        n(t, "writes_ok") + n(t, "writes_failed")
    );
    assert_eq!(
        n(r, "queries_issued"),
        n(r, "queries_ok") + n(r, "queries_failed")
    );
    assert_eq!(
        n(t, "connects_ok"),
        n(t, "disconnects"),
        "every session closed"
    );
    assert_eq!(n(&r["latency"]["read"], "count"), n(t, "reads_ok"));
    assert_eq!(n(&r["latency"]["write"], "count"), n(t, "writes_ok"));
    assert_eq!(n(&r["latency"]["connect"], "count"), n(t, "connects_ok"));
    assert_eq!(
        r["series"]
            .as_array()
            .and_then(|s| s.last())
            .map(|p| n(p, "conns_open")),
        Some(0),
        "nothing open at the end"
    );
}

fn assert_no_errors(r: &Value, tp: &Tidepool) {
    assert_eq!(
        r["errors"],
        Value::Object(Default::default()),
        "errors: {}\n{}",
        r["errors"],
        tp.logs()
    );
    assert_eq!(n(r, "queries_failed"), 0);
    assert_eq!(n(&r["totals"], "connects_failed"), 0);
}

fn rows_written(pg: &PgCluster, table: &str, seeded: u64) -> u64 {
    pg.psql_admin_db(
        APP_DB,
        &format!("SELECT count(*) FROM {table} WHERE id > {seeded}"),
    )
    .trim()
    .parse()
    .expect("count")
}

/// Postgres, the table filled directly (so that the run through Tidepool only reads and
/// inserts), then Tidepool with the budget.
fn setup(user: (&str, &str), table: &str, rows: u64) -> (PgCluster, Tidepool) {
    let pg = PgCluster::start();
    firehose(
        None,
        &pg.direct_url(user.0, user.1, APP_DB),
        &format!("--init --init-only --rows {rows} --table {table}"),
        None,
    );
    let tp = Tidepool::start(&pg, TidepoolOpts::default().pool_size(BUDGET as usize));
    (pg, tp)
}

/// Runs firehose through `tp` while sampling the user's backends; checks the budget held.
fn run_within_budget(tp: &Tidepool, user: (&str, &str), flags: &str, json: &Path) -> Value {
    let watch = tp.watch_backends(user.0);
    firehose(Some(tp), &tp.url(user.0, user.1, APP_DB), flags, Some(json));
    let (max, samples) = watch.stop();
    let r = load(json);
    eprintln!(
        "{}: peak {} backends in {samples} samples; totals {}",
        user.0, max, r["totals"]
    );
    assert!(samples >= 10, "only {samples} samples of pg_stat_activity");
    assert!(
        max >= 1,
        "no backend of {} seen: was Postgres used at all?",
        user.0
    );
    assert!(
        max <= BUDGET,
        "{max} backends of {} in Postgres, budget {BUDGET}\n{}",
        user.0,
        tp.logs()
    );
    r
}

#[test]
fn steady_load_with_churn_over_300_sessions_on_a_pool_of_10() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (pg, mut tp) = setup(BOB, "firehose_items", 500);
    let scratch = Scratch::new("steady");
    let json = scratch.path("r.json");
    // Two worker processes and four source addresses: sessions arrive at the gateway from
    // several processes and addresses, as in the benchmarks.
    let r = run_within_budget(
        &tp,
        BOB,
        "--rows 500 --connections 300 --processes 2 --source-addrs 4 --churn 60 \
         --ramp-up 1 --duration 5 --read-qps 1500 --write-qps 400 --quiet",
        &json,
    );
    assert_books_balance(&r);
    assert_no_errors(&r, &tp);
    let t = &r["totals"];
    assert!(n(t, "connects_ok") > 300, "churn replaced sessions: {t}");
    let peak = r["peak_conns_open"].as_i64().expect("peak");
    assert!(
        (250..=300).contains(&peak),
        "peak open {peak}: 300 sessions on 10 backends"
    );
    assert!(n(t, "reads_ok") > 1000 && n(t, "writes_ok") > 200, "{t}");
    assert_eq!(
        rows_written(&pg, "firehose_items", 500),
        n(t, "writes_ok"),
        "acknowledged writes are rows, each once"
    );
    assert!(tp.alive(), "a Tidepool process died\n{}", tp.logs());
}

#[test]
fn prepared_statements_over_scram_with_churn() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (pg, mut tp) = setup(ALICE, "alice_items", 200);
    let scratch = Scratch::new("prepared");
    let json = scratch.path("r.json");
    // Each session prepares its two statements once and runs them on whichever backend the
    // pooler gives it: 40 sessions, 10 backends, sessions replaced as they go.
    let r = run_within_budget(
        &tp,
        ALICE,
        "--rows 200 --table alice_items --connections 40 --query-mode prepared --churn 10 \
         --ramp-up 1 --duration 4 --quiet",
        &json,
    );
    assert_books_balance(&r);
    assert_no_errors(&r, &tp);
    let t = &r["totals"];
    assert!(n(t, "connects_ok") > 40, "churn replaced sessions: {t}");
    assert!(n(t, "reads_ok") > 100 && n(t, "writes_ok") > 10, "{t}");
    assert_eq!(rows_written(&pg, "alice_items", 200), n(t, "writes_ok"));
    assert!(tp.alive(), "a Tidepool process died\n{}", tp.logs());
}

#[test]
fn churn_profile_connect_query_disconnect() {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner());
    let (pg, mut tp) = setup(BOB, "firehose_items", 100);
    let scratch = Scratch::new("churn");
    let json = scratch.path("r.json");
    let r = run_within_budget(
        &tp,
        BOB,
        "--rows 100 --profile churn --connections 16 --query-mode extended --duration 3 --quiet",
        &json,
    );
    assert_books_balance(&r);
    assert_no_errors(&r, &tp);
    let t = &r["totals"];
    let connects = n(t, "connects_ok");
    assert!(connects >= 50, "{t}");
    // One query per session; only a session opened as the run stopped may have none.
    let queries = n(t, "reads_issued") + n(t, "writes_issued");
    assert!(queries <= connects && queries + 16 >= connects, "{t}");
    assert_eq!(rows_written(&pg, "firehose_items", 100), n(t, "writes_ok"));
    assert!(tp.alive(), "a Tidepool process died\n{}", tp.logs());
}
