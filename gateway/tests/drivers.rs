//! The drivers applications use, through the gateway and directly against Postgres: asyncpg,
//! node-postgres, pgjdbc and sqlx (psycopg 3 and tokio-postgres are in `clients.rs`).
//!
//! Each driver's check does prepared statements (named and unnamed), transactions with errors,
//! COPY both ways, LISTEN/NOTIFY, a cancel, a 100,000-row result, binary results and 100
//! concurrent sessions. It runs against Postgres first (a failure there is the check's, not
//! Tidepool's), then through Tidepool with a pool of 5 backends: both runs must pass and print
//! the same checks and the same recorded values (error texts, SQLSTATEs, digests), and alice
//! must never hold more than 5 backends meanwhile.
//!
//! The external drivers are installed by `scripts/setup.sh` (asyncpg from PyPI, pgjdbc from
//! Debian), node-postgres by `npm ci` here (`clients/node/package-lock.json`). A missing driver
//! fails the test under `CI=true` and skips it, with the reason printed, otherwise.

use std::fs;
use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use futures_util::FutureExt;
use testkit::{
    run_merged, Endpoint, Event, Frontend, Output, PgCluster, RawConn, Tidepool, TidepoolOpts,
    ALICE, APP_DB,
};

/// Backends per (user, database): few, so that 100 sessions must share them.
const POOL_SIZE: usize = 5;
/// Sessions each check opens at once.
const SESSIONS: usize = 100;
/// One run of a check program (it takes 5-20 s on an idle machine).
const RUN_LIMIT: Duration = Duration::from_secs(300);
/// Where Debian's libpostgresql-jdbc-java puts pgjdbc.
const PGJDBC_JAR: &str = "/usr/share/java/postgresql.jar";

/// One driver test at a time: each starts its own Postgres and Tidepool and opens 100 sessions
/// against each; side by side on a small machine they would only slow each other down.
fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

fn clients_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// True when the driver can run. When it cannot: a failure under CI (scripts/setup.sh must have
/// installed it), a skip with the reason otherwise.
fn available(test: &str, install: &str, probe: &Output) -> bool {
    if probe.success() {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!(
            "{test}: the driver is missing under CI ({install}):\n{}",
            probe.text
        );
    }
    eprintln!(
        "SKIPPED {test}: the driver is missing ({install}):\n{}",
        probe.text
    );
    false
}

/// Runs a program to see whether a driver is there; a program not on PATH is an unsuccessful
/// probe that says so (run_merged would panic).
fn probe(program: &str, args: &[&str], dir: Option<&Path>) -> Output {
    let on_path = std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()));
    if !on_path {
        return Output {
            text: format!("{program}: not found on PATH"),
            code: None,
            timed_out: false,
        };
    }
    let mut cmd = Command::new(program);
    cmd.args(args);
    if let Some(dir) = dir {
        cmd.current_dir(dir);
    }
    run_merged(&mut cmd, None, Duration::from_secs(600))
}

/// The lines compared between Postgres and Tidepool: "name: ok", "name = value" and the final
/// "<driver> ok". Anything else a driver prints (warnings with ports or pids in them) is not.
fn checks(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.ends_with(": ok") || l.contains(" = ") || l.ends_with(" ok"))
        .map(str::to_string)
        .collect()
}

fn start() -> (PgCluster, Tidepool) {
    let pg = PgCluster::start();
    let tp = Tidepool::start(&pg, TidepoolOpts::default().pool_size(POOL_SIZE));
    (pg, tp)
}

/// Runs a check program (built by `program` for a URL) against Postgres, then through
/// Tidepool, and compares the two.
fn run_both(driver: &str, pg: &PgCluster, tp: &Tidepool, program: &dyn Fn(&str) -> Command) {
    let started = Instant::now();
    let direct = run_merged(
        &mut program(&pg.direct_url(ALICE.0, ALICE.1, APP_DB)),
        None,
        RUN_LIMIT,
    );
    assert!(
        direct.success(),
        "{driver} check fails against Postgres itself:\n{}",
        direct.text
    );
    let direct_took = started.elapsed();

    let started = Instant::now();
    let watch = tp.watch_backends(ALICE.0);
    let through = run_merged(
        &mut program(&tp.url(ALICE.0, ALICE.1, APP_DB)),
        None,
        RUN_LIMIT,
    );
    let (max_backends, samples) = watch.stop();
    assert!(
        through.success(),
        "{driver} check passes against Postgres but fails through Tidepool:\n{}\n{}",
        through.text,
        tp.logs()
    );
    eprintln!(
        "{driver}: {:.1} s against Postgres, {:.1} s through Tidepool, at most {max_backends} backends",
        direct_took.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    compare(driver, &checks(&direct.text), &checks(&through.text), tp);
    assert!(samples > 0, "the backend sampler took no sample");
    assert!(
        max_backends <= POOL_SIZE as i64,
        "{driver}: alice had {max_backends} backends at once; the pool size is {POOL_SIZE}\n{}",
        tp.logs()
    );
}

fn compare(driver: &str, direct: &[String], through: &[String], tp: &Tidepool) {
    if direct != through {
        let (d, t) = (direct.join("\n"), through.join("\n"));
        panic!(
            "{driver}: Postgres and Tidepool answer differently\n{}\n{}",
            diff("direct", &d, "tidepool", &t),
            tp.logs()
        );
    }
    assert!(
        direct.last().is_some_and(|l| l.ends_with(" ok")),
        "{driver}: the check did not finish: {direct:?}"
    );
}

/// The first differing line of two texts, with both versions from there on (a few lines).
fn diff(left_name: &str, left: &str, right_name: &str, right: &str) -> String {
    let (l, r): (Vec<&str>, Vec<&str>) = (left.lines().collect(), right.lines().collect());
    let same = l.iter().zip(&r).take_while(|(a, b)| a == b).count();
    let from = same.saturating_sub(2);
    let show =
        |lines: &[&str]| lines[from.min(lines.len())..(same + 6).min(lines.len())].join("\n");
    format!(
        "first difference at line {}\n--- {left_name} ---\n{}\n--- {right_name} ---\n{}",
        same + 1,
        show(&l),
        show(&r)
    )
}

// ---------------------------------------------------------------------------------------------
// asyncpg

fn asyncpg_available(test: &str) -> bool {
    available(
        test,
        "pip install asyncpg",
        &probe(
            "python3",
            &["-c", "import asyncpg; print(asyncpg.__version__)"],
            None,
        ),
    )
}

fn asyncpg(part: &'static str) -> impl Fn(&str) -> Command {
    move |url| {
        let mut cmd = Command::new("python3");
        cmd.arg(clients_dir().join("asyncpg_check.py"))
            .args([url, part]);
        cmd
    }
}

#[test]
fn asyncpg_through_the_gateway() {
    let _serial = serial();
    if !asyncpg_available("asyncpg_through_the_gateway") {
        return;
    }
    let (pg, tp) = start();
    run_both("asyncpg", &pg, &tp, &asyncpg("main"));
}

// ---------------------------------------------------------------------------------------------
// node-postgres

/// `npm ci` in clients/node when node_modules is missing or older than the lockfile.
fn node_available(test: &str) -> Option<PathBuf> {
    let dir = clients_dir().join("node");
    if !available(
        test,
        "apt-get install nodejs npm",
        &probe("node", &["--version"], None),
    ) {
        return None;
    }
    let mtime = |p: &Path| fs::metadata(p).and_then(|m| m.modified()).ok();
    let installed = mtime(&dir.join("node_modules/.package-lock.json"));
    let locked = mtime(&dir.join("package-lock.json")).unwrap_or(SystemTime::now());
    if !matches!(installed, Some(i) if i >= locked) {
        let npm = probe("npm", &["ci", "--no-audit", "--no-fund"], Some(&dir));
        if !available(
            test,
            "npm ci --no-audit --no-fund in gateway/tests/clients/node",
            &npm,
        ) {
            return None;
        }
    }
    Some(dir)
}

fn node(dir: PathBuf, part: &'static str) -> impl Fn(&str) -> Command {
    move |url| {
        let mut cmd = Command::new("node");
        cmd.current_dir(&dir).args(["pg_check.js", url, part]);
        cmd
    }
}

#[test]
fn node_postgres_through_the_gateway() {
    let _serial = serial();
    let Some(dir) = node_available("node_postgres_through_the_gateway") else {
        return;
    };
    let (pg, tp) = start();
    run_both("node-postgres", &pg, &tp, &node(dir, "main"));
}

// ---------------------------------------------------------------------------------------------
// pgjdbc

/// Compiles JdbcCheck.java into a directory of its own; None (or a panic under CI) when javac or
/// the pgjdbc jar is missing.
fn jdbc_classes(test: &str) -> Option<PathBuf> {
    let jar = if Path::new(PGJDBC_JAR).is_file() {
        Output {
            text: String::new(),
            code: Some(0),
            timed_out: false,
        }
    } else {
        Output {
            text: format!("{PGJDBC_JAR}: not found"),
            code: None,
            timed_out: false,
        }
    };
    if !available(test, "apt-get install libpostgresql-jdbc-java", &jar)
        || !available(
            test,
            "apt-get install default-jdk-headless",
            &probe("javac", &["-version"], None),
        )
    {
        return None;
    }
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("jdbc-check");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out).expect("create the class directory");
    let mut javac = Command::new("javac");
    javac
        .args(["-Xlint:all", "-Werror", "-cp", PGJDBC_JAR, "-d"])
        .arg(&out)
        .arg(clients_dir().join("jdbc/JdbcCheck.java"));
    let compiled = run_merged(&mut javac, None, Duration::from_secs(300));
    assert!(
        compiled.success(),
        "javac JdbcCheck.java:\n{}",
        compiled.text
    );
    Some(out)
}

fn jdbc(classes: PathBuf, part: &'static str) -> impl Fn(&str) -> Command {
    move |url| {
        let mut cmd = Command::new("java");
        cmd.arg("-cp")
            .arg(format!("{}:{PGJDBC_JAR}", classes.display()))
            .args(["JdbcCheck", url, part]);
        cmd
    }
}

#[test]
fn jdbc_through_the_gateway() {
    let _serial = serial();
    let Some(classes) = jdbc_classes("jdbc_through_the_gateway") else {
        return;
    };
    let (pg, tp) = start();
    run_both("pgjdbc", &pg, &tp, &jdbc(classes, "main"));
}

// ---------------------------------------------------------------------------------------------
// sqlx, in this process

#[path = "clients/sqlx_check.rs"]
mod sqlx_check;

/// Runs the sqlx check with a limit; a failure comes back as a value.
async fn run_sqlx(url: String) -> Result<Vec<String>, String> {
    let check = AssertUnwindSafe(sqlx_check::sqlx_check(url)).catch_unwind();
    match tokio::time::timeout(RUN_LIMIT, check).await {
        Err(_) => Err(format!("did not finish within {RUN_LIMIT:?}")),
        Ok(Err(p)) => Err(panic_text(p)),
        Ok(Ok(lines)) => Ok(lines),
    }
}

#[test]
fn sqlx_through_the_gateway() {
    // The lock is taken outside the runtime: it is held for the whole test, across its awaits.
    let _serial = serial();
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime")
        .block_on(sqlx_both());
}

async fn sqlx_both() {
    let (pg, tp) = start();
    let started = Instant::now();
    let direct = run_sqlx(pg.direct_url(ALICE.0, ALICE.1, APP_DB))
        .await
        .unwrap_or_else(|e| panic!("sqlx check fails against Postgres itself: {e}"));
    let direct_took = started.elapsed();
    let started = Instant::now();
    let watch = tp.watch_backends(ALICE.0);
    let through = run_sqlx(tp.url(ALICE.0, ALICE.1, APP_DB)).await;
    let (max_backends, _) = watch.stop();
    let through = through.unwrap_or_else(|e| {
        panic!(
            "sqlx check passes against Postgres but fails through Tidepool: {e}\n{}",
            tp.logs()
        )
    });
    eprintln!(
        "sqlx: {:.1} s against Postgres, {:.1} s through Tidepool, at most {max_backends} backends",
        direct_took.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    compare("sqlx", &direct, &through, &tp);
    assert!(
        max_backends <= POOL_SIZE as i64,
        "sqlx: alice had {max_backends} backends at once; the pool size is {POOL_SIZE}\n{}",
        tp.logs()
    );
}

// ---------------------------------------------------------------------------------------------
// A known difference: a statement prepared again after its table changed shape.

/// pgjdbc and asyncpg both heal "cached plan must not change result type" (0A000) by preparing
/// the same text again under a new name, which works against Postgres; through Tidepool the
/// new statement fails the same way.
#[test]
fn drivers_reprepare_after_table_changed() {
    let _serial = serial();
    let (pg, tp) = start();
    let mut failed = Vec::new();
    let mut run = |driver: &str, program: &dyn Fn(&str) -> Command| {
        let outcome =
            std::panic::catch_unwind(AssertUnwindSafe(|| run_both(driver, &pg, &tp, program)));
        if let Err(p) = outcome {
            failed.push(panic_text(p));
        }
    };
    if asyncpg_available("drivers_reprepare_after_table_changed") {
        run("asyncpg", &asyncpg("table-changed"));
    }
    if let Some(classes) = jdbc_classes("drivers_reprepare_after_table_changed") {
        run("pgjdbc", &jdbc(classes, "table-changed"));
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
}

fn panic_text(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panicked".to_string())
}

/// Sends one batch of messages and reads to the ReadyForQuery.
async fn exchange(c: &mut RawConn, label: &str, f: Frontend) -> Vec<String> {
    c.send(f.bytes()).await.expect("send");
    let events = c.recv_until(b'Z', Duration::from_secs(10)).await;
    std::iter::once(format!("-- {label}"))
        .chain(
            events
                .iter()
                .map(|e: &Event| without_table_oid(&format!("{e:?}"))),
        )
        .collect()
}

/// A rendered message without the table OIDs of its RowDescription: each run creates its table
/// anew.
fn without_table_oid(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut rest = line;
    while let Some(at) = rest.find("table=") {
        out.push_str(&rest[..at + "table=".len()]);
        rest = rest[at + "table=".len()..].trim_start_matches(|c: char| c.is_ascii_digit());
        out.push('…');
    }
    out.push_str(rest);
    out
}

/// What the drivers do, in protocol messages, on one connection.
async fn table_changed_transcript(ep: &Endpoint) -> Vec<String> {
    let mut c: RawConn = ep.raw(ALICE.0, ALICE.1, APP_DB).await.expect("login");
    let f = Frontend::new;
    let mut t = Vec::new();
    t.extend(
        exchange(
            &mut c,
            "setup",
            f().query("DROP TABLE IF EXISTS shape; CREATE TABLE shape (a int); INSERT INTO shape VALUES (1)"),
        )
        .await,
    );
    t.extend(
        exchange(
            &mut c,
            "prepare S_1 and run it",
            f().parse("S_1", "SELECT * FROM shape", &[])
                .bind("", "S_1", &[])
                .describe_portal("")
                .execute("", 0)
                .sync(),
        )
        .await,
    );
    t.extend(
        exchange(
            &mut c,
            "change the table",
            f().query("ALTER TABLE shape ADD COLUMN b text DEFAULT 'b'"),
        )
        .await,
    );
    t.extend(
        exchange(
            &mut c,
            "run S_1 again: 0A000, as Postgres says",
            f().bind("", "S_1", &[])
                .describe_portal("")
                .execute("", 0)
                .sync(),
        )
        .await,
    );
    t.extend(
        exchange(
            &mut c,
            "close S_1, prepare the same text as S_2, run it",
            f().close_statement("S_1")
                .parse("S_2", "SELECT * FROM shape", &[])
                .bind("", "S_2", &[])
                .describe_portal("")
                .execute("", 0)
                .sync(),
        )
        .await,
    );
    // Another session (on the same backend, with a pool of one) prepares the same text.
    let mut other: RawConn = ep.raw(ALICE.0, ALICE.1, APP_DB).await.expect("login");
    t.extend(
        exchange(
            &mut other,
            "another session prepares the same text",
            f().parse("other", "SELECT * FROM shape", &[])
                .bind("", "other", &[])
                .describe_portal("")
                .execute("", 0)
                .sync(),
        )
        .await,
    );
    other.terminate().await;
    t.extend(
        exchange(
            &mut c,
            "the same text as the unnamed statement",
            f().parse("", "SELECT * FROM shape", &[])
                .bind("", "", &[])
                .describe_portal("")
                .execute("", 0)
                .sync(),
        )
        .await,
    );
    t.extend(exchange(&mut c, "clean up", f().query("DROP TABLE shape")).await);
    c.terminate().await;
    t
}

#[tokio::test]
async fn raw_statement_prepared_again_after_table_changed() {
    let pg = PgCluster::start();
    let direct = table_changed_transcript(&pg.direct()).await.join("\n");
    let tp = Tidepool::start(&pg, TidepoolOpts::default().pool_size(1));
    let through = table_changed_transcript(&tp.endpoint()).await.join("\n");
    assert!(
        direct == through,
        "Postgres and Tidepool differ\n{}\n--- whole tidepool transcript ---\n{through}\n{}",
        diff("direct", &direct, "tidepool", &through),
        tp.logs()
    );
}
