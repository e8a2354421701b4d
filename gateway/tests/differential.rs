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
//!
//! Some cases need more than one session: the other sessions a case signals or watches
//! (`others`) are opened before it runs, the case knows their pids as psql variables, and what
//! they saw afterwards is part of its output. A line `--@ restart` in a case restarts Postgres
//! (`pg_ctl restart -m fast`) at that point, the case's session staying open across it.

mod common;

use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use testkit::{Endpoint, PgCluster, Tidepool, TidepoolOpts, ALICE, BOB};

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
    "server_restart",
    "settings",
    "signals_other",
    "signals_own",
    "temp_tables",
    "transactions",
    "types",
];

/// Roles the signal cases use, made once per cluster (roles belong to the cluster, not to the
/// case's database): alice reaches a member of bob, a holder of `pg_signal_backend` and a role
/// without privileges only by `SET ROLE` (through a NOINHERIT role in between), and a
/// superuser logs in with a password.
const CASE_ROLES: &str = "CREATE ROLE tp_root LOGIN SUPERUSER PASSWORD 'tp-root-pw'; \
     CREATE ROLE tp_gate NOLOGIN NOINHERIT; GRANT tp_gate TO alice; \
     CREATE ROLE tp_bobs NOLOGIN; GRANT bob TO tp_bobs; GRANT tp_bobs TO tp_gate; \
     CREATE ROLE tp_signaller NOLOGIN; GRANT pg_signal_backend TO tp_signaller; \
     GRANT tp_signaller TO tp_gate; \
     CREATE ROLE tp_nobody NOLOGIN; GRANT tp_nobody TO tp_gate;";
const ROOT: (&str, &str) = ("tp_root", "tp-root-pw");

/// Another session of a case, opened before the case runs, as `login`. It runs `start` (still
/// running when the case starts if `running`); the case knows its pid as the psql variable
/// `var`. After the case it is asked one more statement, and what it saw (`psql -qAt`) is
/// part of the case's output.
struct Other {
    var: &'static str,
    login: (&'static str, &'static str),
    start: &'static str,
    running: bool,
}

const fn other(var: &'static str, login: (&'static str, &'static str)) -> Other {
    Other {
        var,
        login,
        start: "",
        running: false,
    }
}

const SLEEP: &str = "SELECT pg_sleep(20);";

static SIGNALS_OTHER: [Other; 4] = [
    other("alice_idle", ALICE),
    Other {
        start: SLEEP,
        running: true,
        ..other("alice_busy", ALICE)
    },
    other("bob_idle", BOB),
    other("root_idle", ROOT),
];

static SERVER_RESTART: [Other; 3] = [
    other("idle", ALICE),
    Other {
        start: "BEGIN; SELECT 'in a transaction';",
        ..other("in_transaction", ALICE)
    },
    Other {
        start: SLEEP,
        running: true,
        ..other("busy", BOB)
    },
];

fn others(case: &str) -> &'static [Other] {
    match case {
        "signals_other" => &SIGNALS_OTHER,
        "server_restart" => &SERVER_RESTART,
        _ => &[],
    }
}

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

/// psql as alice in the case database, as every case runs.
fn case_psql(ep: &Endpoint) -> testkit::Psql {
    ep.psql(ALICE.0, ALICE.1, CASE_DB)
        .with_command_tags()
        .line_buffered()
        .arg("-a")
        .var("VERBOSITY", "verbose")
        .timeout(Duration::from_secs(120))
}

/// Runs a psql script as alice in the case database; returns its normalized output.
fn run_script(ep: &Endpoint, script: Script) -> String {
    let psql = case_psql(ep);
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

/// Runs `case` at `ep` with its other sessions and restarts (see the module doc); returns its
/// normalized output, the other sessions' included.
fn run_case(pg: &PgCluster, ep: &Endpoint, case: &str) -> String {
    let path = case_path(case);
    let text = std::fs::read_to_string(&path).expect("case file");
    let mut opened = Vec::new();
    let mut psql = case_psql(ep);
    for o in others(case) {
        let mut live = ep.psql(o.login.0, o.login.1, CASE_DB).arg("-At").live();
        live.send("SELECT 'pid ' || pg_backend_pid();\n");
        let pid_line = |l: &str| l.starts_with("pid ");
        assert!(
            live.wait_line(pid_line, Duration::from_secs(30)),
            "{case}: session {} did not start: {}",
            o.var,
            live.text()
        );
        let out = live.text();
        let pid = out.lines().find(|l| pid_line(l)).unwrap_or_default()[4..].to_string();
        if o.running {
            live.send(&format!("{}\n", o.start));
            wait_running(pg, o.start);
        } else if !o.start.is_empty() {
            live.send(&format!("{}\n\\echo started\n", o.start));
            assert!(
                live.wait_line(|l| l == "started", Duration::from_secs(30)),
                "{case}: session {}: {}",
                o.var,
                live.text()
            );
        }
        psql = psql.var(o.var, &pid);
        opened.push((o.var, live));
    }
    let out = match text.split_once("\n--@ restart\n") {
        None => psql.file(&path).run(),
        Some((before, after)) => {
            let mut live = psql.live();
            live.send(before);
            live.send("\n\\echo --@ sync\n");
            assert!(
                live.wait_line(|l| l == "--@ sync", Duration::from_secs(60)),
                "{case}: the part before the restart did not finish: {}",
                live.text()
            );
            pg.restart();
            live.send(after);
            live.finish(Duration::from_secs(120))
        }
    };
    let mut result = format!(
        "{}-- psql exit code: {:?}\n",
        normalize(&out.text),
        out.code
    );
    for (var, mut live) in opened {
        live.send("SELECT 'after';\n");
        let out = live.finish(Duration::from_secs(30));
        let seen = out.text.split_once('\n').map_or("", |(_, rest)| rest);
        result.push_str(&format!(
            "-- session {var} then saw:\n{}-- exit code: {:?}\n",
            normalize(seen),
            out.code
        ));
    }
    result
}

/// Waits until `query` runs (on any backend: directly or through Tidepool).
fn wait_running(pg: &PgCluster, query: &str) {
    let sql = format!(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = '{}' \
         AND pid <> pg_backend_pid()",
        query.replace('\'', "''")
    );
    for _ in 0..300 {
        if pg.psql_admin(&sql).trim() != "0" {
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("{query} is not running");
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
    let pg = PgCluster::start();
    let direct = pg.direct();
    pg.psql_admin(CASE_ROLES);

    pg.create_database(CASE_DB, ALICE.0);
    let first = run_case(&pg, &direct, case);
    pg.create_database(CASE_DB, ALICE.0);
    let second = run_case(&pg, &direct, case);
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
    let through = run_case(&pg, &tp.endpoint(), case);
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
    server_restart,
    settings,
    signals_other,
    signals_own,
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
