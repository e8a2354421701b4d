//! Small firehose runs against a real Postgres 15 (testkit's `PgCluster`): the books must
//! balance — queries issued = succeeded + failed, the per-second series adds up to the totals,
//! every acknowledged write is a row in the table, connects = disconnects — and a clean run has
//! no error at all.
//!
//! Debug builds make SCRAM (4096 PBKDF2 rounds, ~60 ms here) the bottleneck of connecting, so
//! the big churn run logs in as bob (md5) and alice (SCRAM) gets the small runs.

mod common;

use common::Scratch;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use testkit::{run_merged, PgCluster, ALICE, APP_DB, BOB};

/// Runs firehose to completion (it bounds itself; the timeout is a safety net) with `url`,
/// the whitespace-separated `flags` and then `paths` as `--flag path` pairs.
fn firehose(url: &str, flags: &str, paths: &[(&str, &Path)]) -> String {
    let out = try_firehose(url, flags, paths);
    assert!(
        out.success(),
        "firehose {flags} failed ({:?}):\n{}",
        out.code,
        out.text
    );
    out.text
}

fn try_firehose(url: &str, flags: &str, paths: &[(&str, &Path)]) -> testkit::Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_firehose"));
    cmd.arg("--url").arg(url).args(flags.split_whitespace());
    for (flag, path) in paths {
        cmd.arg(flag).arg(path);
    }
    run_merged(&mut cmd, None, Duration::from_secs(120))
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

/// The invariants every report must satisfy.
fn assert_books_balance(r: &Value) {
    let t = &r["totals"];
    assert_eq!(
        r["worker_failures"],
        Value::Array(vec![]),
        "{}",
        r["worker_failures"]
    );
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
    // Histograms hold exactly the successes.
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

fn assert_no_errors(r: &Value) {
    assert_eq!(
        r["errors"],
        Value::Object(Default::default()),
        "errors: {}",
        r["errors"]
    );
    assert_eq!(n(r, "queries_failed"), 0);
    assert_eq!(n(&r["totals"], "connects_failed"), 0);
}

fn rows_written(pg: &PgCluster, seeded: u64) -> u64 {
    pg.psql_admin_db(
        APP_DB,
        &format!("SELECT count(*) FROM firehose_items WHERE id > {seeded}"),
    )
    .trim()
    .parse()
    .expect("count")
}

#[test]
fn steady_load_with_churn_over_several_processes_and_source_addresses() {
    let pg = PgCluster::start();
    // Sources 127.0.0.1..4 must be admitted: testkit's pg_hba only lists 127.0.0.1/32.
    let hba = pg.data_dir().join("pg_hba.conf");
    let mut text = std::fs::read_to_string(&hba).expect("pg_hba.conf");
    text.push_str("host all bob 127.0.0.0/8 md5\n");
    std::fs::write(&hba, text).expect("pg_hba.conf");
    pg.psql_admin("SELECT pg_reload_conf()");

    let scratch = Scratch::new("steady");
    let (json, html) = (scratch.path("r.json"), scratch.path("r.html"));
    let url = pg.direct_url(BOB.0, BOB.1, APP_DB);
    firehose(
        &url,
        "--init --rows 500 --connections 200 --processes 2 --source-addrs 4 \
         --churn 60 --ramp-up 1 --duration 4 --quiet",
        &[("--json", &json), ("--html", &html)],
    );
    let r = load(&json);
    assert_books_balance(&r);
    assert_no_errors(&r);
    let t = &r["totals"];
    assert!(n(t, "connects_ok") > 200, "churn replaced connections: {t}");
    let peak = r["peak_conns_open"].as_i64().expect("peak");
    assert!((150..=200).contains(&peak), "peak open {peak}");
    assert!(n(t, "reads_ok") > 0 && n(t, "writes_ok") > 0, "{t}");
    assert_eq!(
        rows_written(&pg, 500),
        n(t, "writes_ok"),
        "acknowledged writes are rows"
    );
    assert_eq!(r["config"]["processes"], 2);
    // The steady window starts after the ramp-up and is part of the run.
    let steady = &r["steady"];
    assert_eq!((n(steady, "from_s"), n(steady, "to_s")), (1, 4));
    let steady_reads = n(&steady["counts"], "reads_ok");
    assert!(
        steady_reads > 0 && steady_reads <= n(t, "reads_ok"),
        "{steady}"
    );
    assert_eq!(n(&steady["latency"]["read"], "count"), steady_reads);

    let page = std::fs::read_to_string(&html).expect("html report");
    assert!(page.contains("<svg") && page.contains("Open connections"));
    // Self-contained: nothing loaded from elsewhere (the SVG namespace URI is only a name).
    for outside in ["<script", "src=", "<link", "@import", "url("] {
        assert!(!page.contains(outside), "html has {outside}");
    }
}

#[test]
fn churn_profile_over_scram_with_prepared_statements() {
    let pg = PgCluster::start();
    let scratch = Scratch::new("churn");
    let json = scratch.path("r.json");
    let url = pg.direct_url(ALICE.0, ALICE.1, APP_DB);
    let out = firehose(
        &url,
        "--init --rows 100 --profile churn --connections 4 --duration 2 --query-mode prepared",
        &[("--json", &json)],
    );
    assert!(out.contains("connects"), "{out}");
    let r = load(&json);
    assert_books_balance(&r);
    assert_no_errors(&r);
    let t = &r["totals"];
    assert!(n(t, "connects_ok") >= 4, "{t}");
    // One query per session; only a session opened as the run stopped may have none.
    let queries = n(t, "reads_issued") + n(t, "writes_issued");
    let connects = n(t, "connects_ok");
    assert!(queries <= connects && queries + 4 >= connects, "{t}");
    assert_eq!(rows_written(&pg, 100), n(t, "writes_ok"));
}

#[test]
fn target_rates_are_met_and_a_missing_table_is_reported() {
    let pg = PgCluster::start();
    let url = pg.direct_url(BOB.0, BOB.1, APP_DB);

    // Without --init on a fresh database: a clear refusal, not a run full of errors.
    let out = try_firehose(&url, "--duration 1 -c 1", &[]);
    assert!(
        !out.success() && out.text.contains("--init"),
        "{}",
        out.text
    );

    let scratch = Scratch::new("rates");
    let json = scratch.path("r.json");
    firehose(
        &url,
        "--init --rows 100 --connections 20 --query-mode extended \
         --read-qps 200 --write-qps 50 --duration 3 --quiet",
        &[("--json", &json)],
    );
    let r = load(&json);
    assert_books_balance(&r);
    assert_no_errors(&r);
    let (reads, writes) = (n(&r["totals"], "reads_ok"), n(&r["totals"], "writes_ok"));
    assert!((480..=720).contains(&reads), "reads {reads}, target 600");
    assert!((110..=190).contains(&writes), "writes {writes}, target 150");
}

/// Runs a command as the postgres OS user (so that Postgres may read what it writes).
fn as_postgres(args: &[&str]) {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", "postgres", "--"]).args(args);
    let out = run_merged(&mut cmd, None, Duration::from_secs(60));
    assert!(out.success(), "{args:?}: {}", out.text);
}

/// A certificate authority `name.crt`/`name.key` in `dir`.
fn make_ca(dir: &Path, name: &str) -> PathBuf {
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    as_postgres(&[
        "openssl",
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-days",
        "2",
        "-subj",
        &format!("/CN=firehose test {name}"),
        "-keyout",
        key.to_str().expect("utf-8"),
        "-out",
        crt.to_str().expect("utf-8"),
    ]);
    crt
}

/// Postgres' `server.crt`/`server.key` in `dir`, for 127.0.0.1, signed by CA `ca`.
fn make_server_cert(dir: &Path, ca: &str) {
    let path = |f: &str| dir.join(f).to_str().expect("utf-8").to_string();
    as_postgres(&[
        "openssl",
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-subj",
        "/CN=127.0.0.1",
        "-addext",
        "subjectAltName=IP:127.0.0.1",
        "-keyout",
        &path("server.key"),
        "-out",
        &path("server.csr"),
    ]);
    as_postgres(&[
        "openssl",
        "x509",
        "-req",
        "-in",
        &path("server.csr"),
        "-days",
        "2",
        "-CA",
        &path(&format!("{ca}.crt")),
        "-CAkey",
        &path(&format!("{ca}.key")),
        "-CAcreateserial",
        "-copy_extensions",
        "copy",
        "-out",
        &path("server.crt"),
    ]);
    as_postgres(&["chmod", "600", &path("server.key")]);
}

#[test]
fn tls_verified_by_ca_or_accepted_as_is_and_refused_for_a_wrong_ca() {
    let pg = PgCluster::start();
    let data = pg.data_dir();
    let crt = make_ca(&data, "ca");
    let other = make_ca(&data, "other-ca");
    make_server_cert(&data, "ca");
    // Only TLS sessions are admitted, so a clean run proves TLS was used.
    let hba = data.join("pg_hba.conf");
    let text = std::fs::read_to_string(&hba).expect("pg_hba.conf");
    std::fs::write(&hba, format!("hostnossl all all 0.0.0.0/0 reject\n{text}")).expect("hba");
    pg.psql_admin("ALTER SYSTEM SET ssl = on");
    pg.psql_admin("SELECT pg_reload_conf()");
    for _ in 0..50 {
        if pg.psql_admin("SHOW ssl").trim() == "on" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    let scratch = Scratch::new("tls");
    let json = scratch.path("r.json");
    // md5 user, certificate checked against its CA.
    let bob = pg.direct_url(BOB.0, BOB.1, APP_DB);
    firehose(
        &bob,
        "--init --rows 100 -c 4 --duration 2 --tls --quiet",
        &[("--tls-ca", &crt), ("--json", &json)],
    );
    let r = load(&json);
    assert_books_balance(&r);
    assert_no_errors(&r);
    assert!(n(&r["totals"], "reads_ok") > 0);
    assert_eq!(r["config"]["tls"], true);

    // SCRAM over TLS (channel binding offered), any certificate accepted.
    let alice = pg.direct_url(ALICE.0, ALICE.1, APP_DB);
    firehose(
        &alice,
        "--init --table alice_items -c 2 --duration 1 --tls --tls-insecure --quiet",
        &[("--json", &json)],
    );
    let r = load(&json);
    assert_no_errors(&r);

    // Without TLS: refused by pg_hba.
    let out = try_firehose(&bob, "-c 1 --duration 1", &[]);
    assert!(!out.success() && out.text.contains("28000"), "{}", out.text);

    // The wrong CA: refused before any load, with the reason.
    let out = try_firehose(&bob, "-c 1 --duration 1 --tls", &[("--tls-ca", &other)]);
    assert!(!out.success(), "{}", out.text);
    assert!(
        out.text.contains("cannot connect") && out.text.contains("UnknownIssuer"),
        "{}",
        out.text
    );
}
