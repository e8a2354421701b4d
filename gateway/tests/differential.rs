//! The differential suite: each case in `tests/cases/*.sql` is a psql script run directly
//! against Postgres and through Tidepool; the outputs (rows, command tags, errors with SQLSTATE,
//! notices, notifications) must be the same.
//!
//! Every run gets a fresh database of the same name, so names in messages match. Each case is
//! run directly twice first: a case whose output is not deterministic against Postgres itself
//! is a broken case, and is reported as such rather than as a Tidepool difference.
//!
//! psql runs with `-a` (echo each statement), command tags, `VERBOSITY=verbose` (SQLSTATE and
//! every error field) and line-buffered stdout (rows and notices in the order they arrived).
//! It uses the simple query protocol throughout.

mod common;

use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use testkit::{Endpoint, PgCluster, Tidepool, TidepoolOpts, ALICE};

/// The database each case runs in; created afresh before every run.
const CASE_DB: &str = "diff";

/// Every file in tests/cases, without `.sql`; `every_case_file_is_listed` keeps this honest.
const CASES: &[&str] = &[
    "advisory_locks",
    "copy",
    "cursors",
    "encodings",
    "errors",
    "listen_notify",
    "listen_transactions",
    "multi_statement",
    "notices",
    "prepare",
    "settings",
    "temp_tables",
    "transactions",
    "types",
];

fn case_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/cases")
        .join(format!("{name}.sql"))
}

/// What legitimately differs between a direct run and a run through Tidepool, and nothing more:
/// - `LOCATION:` lines name the C source file and line of the server code that raised an error.
///   An error Tidepool raises itself for the same condition cannot know them, and no client
///   acts on them.
/// - The PID psql prints with a notification is the notifying backend's process id, which
///   pooling changes by design (and which differs between any two runs anyway).
fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.starts_with("LOCATION:  ") {
            continue;
        }
        const PID: &str = "received from server process with PID ";
        match line.find(PID) {
            Some(at) => {
                let rest = &line[at + PID.len()..];
                let digits = rest.chars().take_while(|c| c.is_ascii_digit()).count();
                out.push_str(&line[..at + PID.len()]);
                out.push_str("<pid>");
                out.push_str(&rest[digits..]);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// Runs a psql script as alice in the case database; returns its normalized output.
fn run_script(ep: &Endpoint, script: Script) -> String {
    let psql = ep
        .psql(ALICE.0, ALICE.1, CASE_DB)
        .with_command_tags()
        .line_buffered()
        .arg("-a")
        .var("VERBOSITY", "verbose")
        .timeout(Duration::from_secs(120));
    let out = match script {
        Script::File(path) => psql.file(path).run(),
        Script::Stdin(text) => psql.stdin(text).run(),
    };
    format!(
        "{}-- psql exit code: {:?}\n",
        normalize(&out.text),
        out.code
    )
}

#[derive(Clone, Copy)]
enum Script<'a> {
    File(&'a Path),
    Stdin(&'a str),
}

fn assert_same(
    case: &str,
    left_name: &str,
    left: &str,
    right_name: &str,
    right: &str,
    extra: &str,
) {
    if left != right {
        let l = common::keep(&format!("{case}.{}.out", left_name.replace(' ', "_")), left);
        let r = common::keep(
            &format!("{case}.{}.out", right_name.replace(' ', "_")),
            right,
        );
        panic!(
            "case {case}: {left_name} and {right_name} differ (full outputs: {l} {r})\n{}{extra}",
            common::diff(left_name, left, right_name, right)
        );
    }
}

/// The whole protocol for one case.
fn differential(case: &str) {
    let path = case_path(case);
    let pg = PgCluster::start();
    let direct = pg.direct();

    pg.create_database(CASE_DB, ALICE.0);
    let first = run_script(&direct, Script::File(&path));
    pg.create_database(CASE_DB, ALICE.0);
    let second = run_script(&direct, Script::File(&path));
    assert_same(
        case,
        "direct",
        &first,
        "direct again",
        &second,
        "\n(the case is not deterministic)",
    );

    pg.create_database(CASE_DB, ALICE.0);
    let tp = Tidepool::start(&pg, TidepoolOpts::default());
    let through = run_script(&tp.endpoint(), Script::File(&path));
    assert_same(
        case,
        "direct",
        &first,
        "tidepool",
        &through,
        &format!("\n{}", tp.logs()),
    );
}

macro_rules! cases {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                differential(stringify!($name));
            }
        )*
    };
}

cases!(
    advisory_locks,
    copy,
    cursors,
    encodings,
    errors,
    listen_notify,
    listen_transactions,
    multi_statement,
    notices,
    prepare,
    settings,
    temp_tables,
    transactions,
    types,
);

#[test]
fn every_case_file_is_listed() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/cases");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("tests/cases")
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_suffix(".sql")
                .map(str::to_string)
        })
        .collect();
    files.sort();
    assert_eq!(
        files, CASES,
        "tests/cases and CASES (and the cases! list) must name the same cases"
    );
}

/// What one session sees of session state it never set: settings, prepared statements,
/// cursors, temp tables, advisory locks, LISTENs. Run many times while other sessions change
/// all of those on the same one or two backends, it must print the defaults every time.
fn probe_script(rounds: usize) -> String {
    let probe = "SELECT current_setting('work_mem') AS work_mem, current_setting('search_path') AS path, \
                 current_setting('TimeZone') AS tz, current_setting('DateStyle') AS ds, \
                 current_setting('statement_timeout') AS st, current_setting('application_name') AS app, \
                 current_setting('myapp.tenant', true) AS tenant, current_setting('extra_float_digits') AS efd, \
                 current_setting('bytea_output') AS bo, current_setting('IntervalStyle') AS ist, \
                 current_setting('client_min_messages') AS cmm, \
                 (SELECT count(*) FROM pg_prepared_statements WHERE from_sql) AS prepared, \
                 (SELECT count(*) FROM pg_cursors) AS cursors, \
                 to_regclass('t') AS temp_t, to_regclass('scratch') AS temp_scratch, \
                 (SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()) AS locks, \
                 (SELECT count(*) FROM pg_listening_channels()) AS listening;\n\
                 SELECT pg_sleep(0.01);\n";
    probe.repeat(rounds)
}

/// Two cases that change session state run concurrently with a probing session, all through a
/// pool of one backend per (user, database): every output must be what it is directly.
#[test]
fn sessions_do_not_leak_state_through_a_pool_of_one() {
    let pg = PgCluster::start();
    let direct = pg.direct();
    let probe = probe_script(150);
    let cases = ["settings", "temp_tables", "cursors", "advisory_locks"];

    let mut expected = Vec::new();
    for case in cases {
        pg.create_database(CASE_DB, ALICE.0);
        expected.push(run_script(&direct, Script::File(&case_path(case))));
    }
    pg.create_database(CASE_DB, ALICE.0);
    let probe_expected = run_script(&direct, Script::Stdin(&probe));

    // Fresh database for the concurrent runs; the cases' table names do not collide.
    pg.create_database(CASE_DB, ALICE.0);
    let tp = Tidepool::start(&pg, TidepoolOpts::default().pool_size(1));
    let ep = tp.endpoint();
    let (got, probe_got) = thread::scope(|s| {
        let runs: Vec<_> = cases
            .iter()
            .map(|case| {
                let ep = ep.clone();
                s.spawn(move || run_script(&ep, Script::File(&case_path(case))))
            })
            .collect();
        let probe_run = s.spawn(|| run_script(&ep, Script::Stdin(&probe)));
        let got: Vec<String> = runs
            .into_iter()
            .map(|h| h.join().expect("case thread"))
            .collect();
        (got, probe_run.join().expect("probe thread"))
    });
    let logs = format!("\n{}", tp.logs());
    assert_same(
        "probe",
        "direct",
        &probe_expected,
        "tidepool",
        &probe_got,
        &logs,
    );
    for ((case, want), got) in cases.iter().zip(&expected).zip(&got) {
        assert_same(
            &format!("concurrent-{case}"),
            "direct",
            want,
            "tidepool",
            got,
            &logs,
        );
    }
}
