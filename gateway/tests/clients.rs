//! Real clients through the gateway: tokio-postgres (prepared statements, transactions, 200
//! sessions over a budget of 20 backends, cancel, isolation between sessions), psql, psycopg 3,
//! and logins (SCRAM, md5, and the errors of wrong passwords, unknown roles and databases).

mod common;

use std::future::Future;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use testkit::{
    run_merged, ConnectError, Endpoint, PgCluster, Tidepool, TidepoolOpts, ALICE, APP_DB, BOB,
};
use tokio_postgres::{AsyncMessage, NoTls};

/// Every async test body runs under this deadline.
async fn bounded<T>(limit: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("test exceeded {limit:?}"))
}

fn start(pool_size: usize) -> (PgCluster, Tidepool) {
    let pg = PgCluster::start();
    let tp = Tidepool::start(&pg, TidepoolOpts::default().pool_size(pool_size));
    (pg, tp)
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("<no SQLSTATE: {e}>"))
}

#[tokio::test]
async fn tokio_postgres_prepared_statements_and_transactions() {
    let (_pg, tp) = start(20);
    bounded(Duration::from_secs(60), async {
        let c = tp
            .endpoint()
            .connect(ALICE.0, ALICE.1, APP_DB)
            .await
            .expect("login through the gateway");
        c.batch_execute("CREATE TABLE kv (k int PRIMARY KEY, v text, f float8, arr int[])")
            .await
            .unwrap();

        let ins = c
            .prepare("INSERT INTO kv VALUES ($1, $2, $3, $4)")
            .await
            .unwrap();
        for k in 0..100i32 {
            let v = format!("v{k}");
            let arr = vec![k, k + 1];
            c.execute(&ins, &[&k, &v, &(k as f64 / 2.0), &arr])
                .await
                .unwrap();
        }
        let get = c
            .prepare("SELECT v, f, arr FROM kv WHERE k = $1")
            .await
            .unwrap();
        for k in [0i32, 42, 99] {
            let row = c.query_one(&get, &[&k]).await.unwrap();
            assert_eq!(row.get::<_, String>(0), format!("v{k}"));
            assert_eq!(row.get::<_, f64>(1), k as f64 / 2.0);
            assert_eq!(row.get::<_, Vec<i32>>(2), vec![k, k + 1]);
        }
        let none: Option<String> = c.query_one("SELECT NULL::text", &[]).await.unwrap().get(0);
        assert_eq!(none, None);

        // Statements prepared long ago, after other work, still work (the pooler may run them
        // on any backend).
        for _ in 0..20 {
            c.batch_execute("SELECT pg_sleep(0.005)").await.unwrap();
            assert_eq!(
                c.query_one(&get, &[&7i32])
                    .await
                    .unwrap()
                    .get::<_, String>(0),
                "v7"
            );
        }

        // Transactions: commit, rollback, error.
        let mut c = c;
        let tx = c.transaction().await.unwrap();
        tx.execute("UPDATE kv SET v = 'committed' WHERE k = 1", &[])
            .await
            .unwrap();
        tx.commit().await.unwrap();
        let tx = c.transaction().await.unwrap();
        tx.execute("UPDATE kv SET v = 'rolled back' WHERE k = 2", &[])
            .await
            .unwrap();
        tx.rollback().await.unwrap();
        let tx = c.transaction().await.unwrap();
        let err = tx
            .execute(&ins, &[&1i32, &"dup", &0.0f64, &Vec::<i32>::new()])
            .await
            .unwrap_err();
        assert_eq!(sqlstate(&err), "23505");
        let err = tx.query("SELECT 1", &[]).await.unwrap_err();
        assert_eq!(sqlstate(&err), "25P02");
        tx.rollback().await.unwrap();
        let rows = c
            .query("SELECT k, v FROM kv WHERE k IN (1, 2) ORDER BY k", &[])
            .await
            .unwrap();
        let got: Vec<(i32, String)> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        assert_eq!(
            got,
            vec![(1, "committed".to_string()), (2, "v2".to_string())]
        );

        // Nested savepoints through the driver.
        let mut tx = c.transaction().await.unwrap();
        let sp = tx.savepoint("sp").await.unwrap();
        sp.execute("DELETE FROM kv", &[]).await.unwrap();
        sp.rollback().await.unwrap();
        assert_eq!(
            tx.query_one("SELECT count(*) FROM kv", &[])
                .await
                .unwrap()
                .get::<_, i64>(0),
            100
        );
        tx.commit().await.unwrap();
        c.batch_execute("DROP TABLE kv").await.unwrap();
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_sessions_share_twenty_backends() {
    let (pg, tp) = start(20);
    pg.psql_admin_db(APP_DB, "CREATE TABLE counter (id int PRIMARY KEY, n int); INSERT INTO counter VALUES (1, 0); ALTER TABLE counter OWNER TO alice;");
    let watch = tp.watch_backends(ALICE.0);
    let done = Arc::new(AtomicUsize::new(0));
    bounded(Duration::from_secs(120), async {
        let ep = tp.endpoint();
        let mut tasks = Vec::new();
        for i in 0..200 {
            let ep = ep.clone();
            let done = done.clone();
            tasks.push(tokio::spawn(async move {
                let c = ep
                    .connect(ALICE.0, ALICE.1, APP_DB)
                    .await
                    .unwrap_or_else(|e| panic!("session {i}: login: {e}"));
                let stmt = c
                    .prepare("SELECT $1::int + 1, pg_sleep(0.01)::text")
                    .await
                    .unwrap();
                let mut c = c;
                for round in 0..5 {
                    let row = c.query_one(&stmt, &[&(i * 10 + round)]).await.unwrap();
                    assert_eq!(row.get::<_, i32>(0), i * 10 + round + 1);
                    let tx = c.transaction().await.unwrap();
                    tx.execute("UPDATE counter SET n = n + 1 WHERE id = 1", &[])
                        .await
                        .unwrap();
                    tx.commit().await.unwrap();
                }
                done.fetch_add(1, Ordering::Relaxed);
                c
            }));
        }
        let mut clients = Vec::new();
        for t in tasks {
            clients.push(t.await.expect("session task"));
        }
        // All 200 sessions are still open here.
        let n: i32 = clients[0]
            .query_one("SELECT n FROM counter WHERE id = 1", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1000);
    })
    .await;
    let (max, samples) = watch.stop();
    assert_eq!(done.load(Ordering::Relaxed), 200);
    assert!(samples > 0);
    assert!(
        max <= 20,
        "alice had {max} backends at once; the budget is 20\n{}",
        tp.logs()
    );
    assert!(max >= 1, "the sampler saw no backend at all");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_stops_only_its_own_query() {
    let (pg, tp) = start(20);
    bounded(Duration::from_secs(60), async {
        // What Postgres says, for comparison.
        let direct = pg.direct().connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let token = direct.cancel_token();
        let sleeper =
            tokio::spawn(async move { direct.query("SELECT pg_sleep(30)", &[]).await.map(|_| ()) });
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(NoTls).await.unwrap();
        let want = sleeper.await.unwrap().unwrap_err();
        let want = want.as_db_error().expect("a server error").clone();

        let ep = tp.endpoint();
        let a = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let b = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let token = a.cancel_token();
        let a = Arc::new(a);
        let a2 = a.clone();
        let started = Instant::now();
        let sleeper =
            tokio::spawn(async move { a2.query("SELECT pg_sleep(30)", &[]).await.map(|_| ()) });
        let other = tokio::spawn(async move {
            let r = b
                .query_one("SELECT pg_sleep(2)::text, 'b finished'", &[])
                .await
                .map(|r| r.get::<_, String>(1));
            (b, r)
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        token
            .cancel_query(NoTls)
            .await
            .expect("cancel request to the gateway");
        let err = sleeper
            .await
            .unwrap()
            .expect_err("pg_sleep(30) was cancelled");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "cancel took {:?}",
            started.elapsed()
        );
        let got = err
            .as_db_error()
            .unwrap_or_else(|| panic!("not a server error: {err}"));
        assert_eq!(got.code().code(), "57014");
        assert_eq!(got.message(), want.message());
        let (b, r) = other.await.unwrap();
        assert_eq!(
            r.expect("the other session's query is not cancelled"),
            "b finished"
        );
        // Both sessions go on.
        assert_eq!(
            a.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
            1
        );
        assert_eq!(
            b.query_one("SELECT 2", &[]).await.unwrap().get::<_, i32>(0),
            2
        );
        // A cancel with no query running does nothing.
        b.cancel_token().cancel_query(NoTls).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            b.query_one("SELECT 3", &[]).await.unwrap().get::<_, i32>(0),
            3
        );
    })
    .await;
}

/// The settings of a session, as one string.
const SETTINGS_PROBE: &str =
    "SELECT concat_ws(' | ', current_setting('work_mem'), current_setting('search_path'), \
    current_setting('TimeZone'), current_setting('application_name'), \
    coalesce(current_setting('myapp.tenant', true), ''), current_setting('statement_timeout'))";

#[tokio::test]
async fn settings_do_not_leak_between_sessions_on_one_backend() {
    let (_pg, tp) = start(1);
    bounded(Duration::from_secs(60), async {
        let ep = tp.endpoint();
        let a = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let b = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let defaults: String = b.query_one(SETTINGS_PROBE, &[]).await.unwrap().get(0);
        for i in 0..20 {
            let a_settings = format!("{}MB | public, pg_catalog | UTC | app-a-{i} | tenant{i} | 5s", 10 + i);
            a.batch_execute(&format!(
                "SET work_mem = '{}MB'; SET search_path = public, pg_catalog; SET TimeZone = 'UTC'; \
                 SET application_name = 'app-a-{i}'; SELECT set_config('myapp.tenant', 'tenant{i}', false); \
                 SET statement_timeout = '5s'",
                10 + i
            ))
            .await
            .unwrap();
            let got_b: String = b.query_one(SETTINGS_PROBE, &[]).await.unwrap().get(0);
            assert_eq!(got_b, defaults, "round {i}: session b sees a's settings");
            let got_a: String = a.query_one(SETTINGS_PROBE, &[]).await.unwrap().get(0);
            assert_eq!(got_a, a_settings, "round {i}: session a lost its settings");
            b.batch_execute("SET work_mem = '1MB'").await.unwrap();
            let got_a: String = a.query_one(SETTINGS_PROBE, &[]).await.unwrap().get(0);
            assert_eq!(got_a, a_settings, "round {i}: session a sees b's work_mem");
            b.batch_execute("RESET work_mem").await.unwrap();
            a.batch_execute("RESET ALL").await.unwrap();
            let got_a: String = a.query_one(SETTINGS_PROBE, &[]).await.unwrap().get(0);
            assert_eq!(got_a, defaults, "round {i}: RESET ALL in a");
        }
    })
    .await;
}

/// One step of a test, bounded on its own so a hang names the step.
async fn step<T>(tp: &Tidepool, label: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("step {label:?} did not finish within 10 s\n{}", tp.logs()))
}

#[tokio::test]
async fn session_state_stays_with_its_session() {
    let (_pg, tp) = start(2);
    let ep = tp.endpoint();
    let a = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
    let b = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
    // A temp table (a keeps its backend; b gets the other one).
    step(
        &tp,
        "a creates a temp table",
        a.batch_execute("CREATE TEMP TABLE mine (x int); INSERT INTO mine VALUES (1)"),
    )
    .await
    .unwrap();
    let seen: Option<String> = step(
        &tp,
        "b looks for it",
        b.query_one("SELECT to_regclass('mine')::text", &[]),
    )
    .await
    .unwrap()
    .get(0);
    assert_eq!(seen, None, "b sees a's temp table");
    let n: i64 = step(
        &tp,
        "a reads it",
        a.query_one("SELECT count(*) FROM mine", &[]),
    )
    .await
    .unwrap()
    .get(0);
    assert_eq!(n, 1);
    // A session advisory lock of a blocks b.
    step(
        &tp,
        "a locks",
        a.batch_execute("SELECT pg_advisory_lock(77)"),
    )
    .await
    .unwrap();
    let got: bool = step(
        &tp,
        "b tries the lock",
        b.query_one("SELECT pg_try_advisory_lock(77)", &[]),
    )
    .await
    .unwrap()
    .get(0);
    assert!(!got, "b got a's advisory lock");
    step(
        &tp,
        "a unlocks",
        a.batch_execute("SELECT pg_advisory_unlock(77)"),
    )
    .await
    .unwrap();
    let got: bool = step(
        &tp,
        "b locks",
        b.query_one("SELECT pg_try_advisory_lock(77)", &[]),
    )
    .await
    .unwrap()
    .get(0);
    assert!(got);
    let got: bool = step(
        &tp,
        "b unlocks",
        b.query_one("SELECT pg_advisory_unlock(77)", &[]),
    )
    .await
    .unwrap()
    .get(0);
    assert!(got);
    // SQL prepared statements are per session.
    step(
        &tp,
        "a prepares",
        a.batch_execute("PREPARE only_a AS SELECT 'a'"),
    )
    .await
    .unwrap();
    let err = step(
        &tp,
        "b executes a's statement",
        b.batch_execute("EXECUTE only_a"),
    )
    .await
    .unwrap_err();
    assert_eq!(sqlstate(&err), "26000");
    step(&tp, "a executes", a.batch_execute("EXECUTE only_a"))
        .await
        .unwrap();
    step(&tp, "a discards all", a.batch_execute("DISCARD ALL"))
        .await
        .unwrap();
    // Uncommitted work is invisible to the other session.
    step(
        &tp,
        "create shared_t",
        a.batch_execute("CREATE TABLE shared_t (x int)"),
    )
    .await
    .unwrap();
    step(
        &tp,
        "a begins and inserts",
        a.batch_execute("BEGIN; INSERT INTO shared_t VALUES (1)"),
    )
    .await
    .unwrap();
    let n: i64 = step(
        &tp,
        "b counts before commit",
        b.query_one("SELECT count(*) FROM shared_t", &[]),
    )
    .await
    .unwrap()
    .get(0);
    assert_eq!(n, 0);
    step(&tp, "a commits", a.batch_execute("COMMIT"))
        .await
        .unwrap();
    let n: i64 = step(
        &tp,
        "b counts after commit",
        b.query_one("SELECT count(*) FROM shared_t", &[]),
    )
    .await
    .unwrap()
    .get(0);
    assert_eq!(n, 1);
}

#[tokio::test]
async fn a_client_gone_mid_transaction_frees_its_backend() {
    let (_pg, tp) = start(1);
    bounded(Duration::from_secs(60), async {
        let ep = tp.endpoint();
        let setup = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        setup
            .batch_execute("CREATE TABLE gone (x int)")
            .await
            .unwrap();
        drop(setup);
        for i in 0..3 {
            let a = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
            a.batch_execute("BEGIN; INSERT INTO gone VALUES (1); SELECT pg_advisory_xact_lock(5)")
                .await
                .unwrap();
            drop(a); // closes the socket with the transaction open
            let b = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
            let n: i64 = tokio::time::timeout(
                Duration::from_secs(10),
                b.query_one("SELECT count(*) FROM gone", &[]),
            )
            .await
            .unwrap_or_else(|_| panic!("round {i}: the only backend was not given back"))
            .unwrap()
            .get(0);
            assert_eq!(n, 0, "round {i}: the abandoned transaction was committed");
            assert!(b
                .query_one("SELECT pg_try_advisory_lock(5)", &[])
                .await
                .unwrap()
                .get::<_, bool>(0));
            b.batch_execute("SELECT pg_advisory_unlock_all()")
                .await
                .unwrap();
        }
    })
    .await;
}

type Notifications = tokio::sync::mpsc::UnboundedReceiver<(String, String)>;

async fn recv(rx: &mut Notifications) -> Option<(String, String)> {
    tokio::time::timeout(Duration::from_secs(5), rx.recv())
        .await
        .ok()
        .flatten()
}

/// Connects and forwards notifications to a channel.
async fn listener(ep: &Endpoint) -> (tokio_postgres::Client, Notifications) {
    let (client, mut connection) = ep
        .pg_config(ALICE.0, ALICE.1, APP_DB)
        .connect(NoTls)
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(Ok(msg)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
            if let AsyncMessage::Notification(n) = msg {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    (client, rx)
}

#[tokio::test]
async fn listen_notify_between_sessions() {
    let (_pg, tp) = start(20);
    bounded(Duration::from_secs(60), async {
        let ep = tp.endpoint();
        let (a, mut a_rx) = listener(&ep).await;
        let (c, mut c_rx) = listener(&ep).await;
        let b = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        a.batch_execute("LISTEN news").await.unwrap();
        c.batch_execute("LISTEN news; LISTEN other").await.unwrap();
        b.batch_execute("NOTIFY news, 'first'").await.unwrap();
        b.batch_execute("BEGIN; NOTIFY news, 'in tx'; NOTIFY other, 'o'; COMMIT")
            .await
            .unwrap();
        b.batch_execute("BEGIN; NOTIFY news, 'rolled back'; ROLLBACK")
            .await
            .unwrap();
        b.batch_execute("SELECT pg_notify('news', 'last')")
            .await
            .unwrap();
        let mut got_a = Vec::new();
        for _ in 0..3 {
            got_a.push(recv(&mut a_rx).await.expect("a notification for a"));
        }
        let want = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(c, p)| (c.to_string(), p.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            got_a,
            want(&[("news", "first"), ("news", "in tx"), ("news", "last")])
        );
        let mut got_c = Vec::new();
        for _ in 0..4 {
            got_c.push(recv(&mut c_rx).await.expect("a notification for c"));
        }
        assert_eq!(
            got_c,
            want(&[
                ("news", "first"),
                ("news", "in tx"),
                ("other", "o"),
                ("news", "last")
            ])
        );
        // After UNLISTEN nothing more arrives, while the listener keeps working.
        a.batch_execute("UNLISTEN news").await.unwrap();
        b.batch_execute("NOTIFY news, 'after unlisten'")
            .await
            .unwrap();
        assert_eq!(
            recv(&mut c_rx).await,
            Some(("news".to_string(), "after unlisten".to_string()))
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            a_rx.try_recv().is_err(),
            "a got a notification after UNLISTEN"
        );
    })
    .await;
}

#[test]
fn psql_through_the_gateway() {
    let (pg, tp) = start(20);
    for (user, password) in [ALICE, BOB] {
        let sql = "SELECT current_user, current_database(); SELECT 1 / 0; SELECT 'after error'";
        let direct = pg
            .direct()
            .psql(user, password, APP_DB)
            .arg("-At")
            .command(sql)
            .run();
        let through = tp
            .endpoint()
            .psql(user, password, APP_DB)
            .arg("-At")
            .command(sql)
            .run();
        assert_eq!(direct.code, through.code, "{}", through.text);
        assert_eq!(
            direct.text,
            through.text,
            "{user}: psql output differs\n{}",
            tp.logs()
        );
        assert!(
            through.text.contains(&format!("{user}|{APP_DB}")),
            "{}",
            through.text
        );
    }
    // Wrong password: psql's message as with Postgres.
    let direct = pg
        .direct()
        .psql(ALICE.0, "wrong", APP_DB)
        .command("SELECT 1")
        .run();
    let through = tp
        .endpoint()
        .psql(ALICE.0, "wrong", APP_DB)
        .command("SELECT 1")
        .run();
    assert_eq!(through.code, Some(2), "{}", through.text);
    let strip = |s: &str, port: u16| s.replace(&port.to_string(), "<port>");
    assert_eq!(
        strip(&direct.text, pg.port()),
        strip(&through.text, tp.gateway_port())
    );
}

/// psycopg 3 is importable; under CI it must be (setup.sh installs it), elsewhere the test is
/// skipped with a message.
fn psycopg_available(test: &str) -> bool {
    let import = run_merged(
        Command::new("python3").args(["-c", "import psycopg; print(psycopg.__version__)"]),
        None,
        Duration::from_secs(30),
    );
    if import.success() {
        return true;
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "psycopg 3 is not importable under CI (pip install 'psycopg[binary]'):\n{}",
        import.text
    );
    eprintln!(
        "SKIPPED {test}: psycopg 3 is not installed (pip install 'psycopg[binary]'):\n{}",
        import.text
    );
    false
}

/// Runs `tests/clients/<script> URL` with python3.
fn run_python(script: &str, url: String) -> testkit::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/clients")
        .join(script);
    let mut cmd = Command::new("python3");
    cmd.arg(&script).arg(url);
    run_merged(&mut cmd, None, Duration::from_secs(120))
}

/// The checks a script passed (its `name: ok [what happened]` lines): psycopg's own log lines (e.g. "error
/// ignored terminating <Pipeline ...>", printed or not depending on timing, with the port in
/// it) are not compared.
fn checks_passed(text: &str) -> Vec<String> {
    text.lines()
        .filter(|l| l.contains(": ok") || l.ends_with(" ok") && !l.contains(':'))
        .map(str::to_string)
        .collect()
}

/// Runs `script` against Postgres itself, then through `tp`: both runs must succeed and pass the
/// same checks, and the direct run's checks must show what the script is about (`saw`, else the
/// test fails with `missing`: a script that exercised nothing proves nothing). Returns the checks.
fn same_checks_directly_and_through(
    pg: &PgCluster,
    tp: &Tidepool,
    script: &str,
    saw: impl Fn(&[String]) -> bool,
    missing: &str,
) -> Vec<String> {
    let direct = run_python(script, pg.direct_url(ALICE.0, ALICE.1, APP_DB));
    assert!(
        direct.success(),
        "against Postgres itself:\n{}",
        direct.text
    );
    let checks = checks_passed(&direct.text);
    assert!(saw(&checks), "{missing}:\n{}", direct.text);
    let through = run_python(script, tp.url(ALICE.0, ALICE.1, APP_DB));
    assert!(
        through.success(),
        "through the gateway:\n{}\n{}",
        through.text,
        tp.logs()
    );
    assert_eq!(checks, checks_passed(&through.text));
    checks
}

#[test]
fn psycopg3_through_the_gateway() {
    if !psycopg_available("psycopg3_through_the_gateway") {
        return;
    }
    let (pg, tp) = start(20);
    let run = |url: String| run_python("psycopg_check.py", url);
    // Against Postgres first: a failure there is the script's, not Tidepool's.
    let direct = run(pg.direct_url(ALICE.0, ALICE.1, APP_DB));
    assert!(
        direct.success(),
        "psycopg check fails against Postgres itself:\n{}",
        direct.text
    );
    let through = run(tp.url(ALICE.0, ALICE.1, APP_DB));
    assert!(
        through.success(),
        "psycopg check through the gateway:\n{}\n{}",
        through.text,
        tp.logs()
    );
    assert_eq!(checks_passed(&direct.text), checks_passed(&through.text));
    let bob = run(tp.url(BOB.0, BOB.1, APP_DB));
    assert!(
        bob.success(),
        "psycopg check as bob (md5) through the gateway:\n{}\n{}",
        bob.text,
        tp.logs()
    );
}

/// Logs in with the raw client at both places; the results (the authentication requests made,
/// or the error) must be the same.
async fn same_login(
    pg: &PgCluster,
    tp: &Tidepool,
    user: &str,
    password: &str,
    db: &str,
) -> Result<Vec<i32>, String> {
    let render = |r: Result<testkit::RawConn, ConnectError>| match r {
        Ok(conn) => Ok(conn.auth_requests),
        Err(ConnectError::Server(e)) => Err(e.render()),
        Err(e) => Err(format!("<{e}>")),
    };
    let direct = render(pg.direct().raw(user, password, db).await);
    let through = render(tp.endpoint().raw(user, password, db).await);
    assert_eq!(
        direct,
        through,
        "login as {user:?} to {db:?} with password {password:?}\n{}",
        tp.logs()
    );
    through
}

#[tokio::test]
async fn logins_and_their_errors_match_postgres() {
    let (pg, tp) = start(20);
    bounded(Duration::from_secs(60), async {
        // alice has a SCRAM verifier: SASL (10, 11, 12) then ok; bob an md5 one: md5 (5).
        assert_eq!(
            same_login(&pg, &tp, ALICE.0, ALICE.1, APP_DB).await,
            Ok(vec![10, 11, 12, 0])
        );
        assert_eq!(
            same_login(&pg, &tp, BOB.0, BOB.1, APP_DB).await,
            Ok(vec![5, 0])
        );
        // tokio-postgres logs in both ways too.
        for (user, password) in [ALICE, BOB] {
            let c = tp
                .endpoint()
                .connect(user, password, APP_DB)
                .await
                .unwrap_or_else(|e| panic!("{user}: {e}"));
            assert_eq!(
                c.query_one("SELECT current_user::text", &[])
                    .await
                    .unwrap()
                    .get::<_, String>(0),
                user
            );
        }
        // Errors: wrong passwords, unknown role, unknown database.
        let err = same_login(&pg, &tp, ALICE.0, "wrong", APP_DB)
            .await
            .unwrap_err();
        assert!(err.contains("C=\"28P01\""), "{err}");
        let err = same_login(&pg, &tp, BOB.0, "wrong", APP_DB)
            .await
            .unwrap_err();
        assert!(err.contains("C=\"28P01\""), "{err}");
        let err = same_login(&pg, &tp, "nobody", "x", APP_DB)
            .await
            .unwrap_err();
        assert!(err.contains("C=\"28P01\""), "{err}");
        let err = same_login(&pg, &tp, ALICE.0, ALICE.1, "no_such_db")
            .await
            .unwrap_err();
        assert!(err.contains("C=\"3D000\""), "{err}");
        // The same through tokio-postgres.
        let e = tp
            .endpoint()
            .connect(ALICE.0, "wrong", APP_DB)
            .await
            .expect_err("wrong password fails");
        assert_eq!(sqlstate(&e), "28P01");
        let e = tp
            .endpoint()
            .connect(ALICE.0, ALICE.1, "no_such_db")
            .await
            .expect_err("unknown db fails");
        assert_eq!(sqlstate(&e), "3D000");
        // After failures, logins still work.
        assert!(same_login(&pg, &tp, ALICE.0, ALICE.1, APP_DB).await.is_ok());
    })
    .await;
}

/// `pg_backend_pid()` answers the pid of the client's `BackendKeyData`, whichever backend runs
/// the statement (issue 11): psycopg 3 in each protocol path, against Postgres first.
#[test]
fn backend_pid_is_the_one_the_client_knows() {
    if !psycopg_available("backend_pid_is_the_one_the_client_knows") {
        return;
    }
    // A pool of 2 for 4 busy sessions: the checked session's statements run on several backends.
    let (pg, tp) = start(2);
    let run = |url: String| run_python("identity_check.py", url);
    let direct = run(pg.direct_url(ALICE.0, ALICE.1, APP_DB));
    assert!(
        direct.success(),
        "against Postgres itself:\n{}",
        direct.text
    );
    let busy: Vec<_> = (0..3)
        .map(|_| {
            let mut c = Command::new("psql");
            c.arg(tp.url(BOB.0, BOB.1, APP_DB))
                .args([
                    "-qAt",
                    "-c",
                    "SELECT count(*) FROM generate_series(1, 3000000)",
                ])
                .stdout(std::process::Stdio::null());
            c.spawn().expect("psql")
        })
        .collect();
    let through = run(tp.url(ALICE.0, ALICE.1, APP_DB));
    for mut b in busy {
        let _ = b.wait();
    }
    assert!(
        through.success(),
        "through the gateway:\n{}\n{}",
        through.text,
        tp.logs()
    );
    assert_eq!(checks_passed(&direct.text), checks_passed(&through.text));
}

/// Writes the server fails midway (a duplicate key in an `executemany` and in an explicit
/// pipeline, in and out of a transaction) report the same error and keep the same rows as
/// directly (issue 11): psycopg 3, against Postgres first.
#[test]
fn failed_pipelined_writes_report_as_directly() {
    if !psycopg_available("failed_pipelined_writes_report_as_directly") {
        return;
    }
    let (pg, tp) = start(2);
    same_checks_directly_and_through(
        &pg,
        &tp,
        "pipeline_check.py",
        |checks| checks.iter().any(|l| l.contains("23505")),
        "the script did not see the duplicate key",
    );
}

/// `pg_cancel_backend`/`pg_terminate_backend` of a session's pid as its client knows it (issue
/// 11): the query cancelled, idle and busy sessions ended with FATAL 57P01 and closed, `true`
/// answered, a pid that is nobody's answered `false` with Postgres's warning, nothing signalled
/// from a failed transaction, a session ending itself; psycopg 3 with parameter and constant
/// pids, against Postgres first. Then who may signal whom (`signal_permissions`), directly and
/// through Tidepool.
#[test]
fn signals_to_a_sessions_pid_act_as_directly() {
    if !psycopg_available("signals_to_a_sessions_pid_act_as_directly") {
        return;
    }
    let pg = PgCluster::start();
    // The console for alice: a hang shows the pooler's servers.
    let tp = Tidepool::start(
        &pg,
        TidepoolOpts::default()
            .pool_size(2)
            .gateway_arg("--admin-users")
            .gateway_arg(ALICE.0),
    );
    same_checks_directly_and_through(
        &pg,
        &tp,
        "signal_check.py",
        |checks| {
            checks.iter().any(|l| l.contains("57014")) && checks.iter().any(|l| l.contains("57P01"))
        },
        "the script saw no cancel or termination",
    );

    pg.psql_admin(&format!(
        "CREATE ROLE {} LOGIN SUPERUSER PASSWORD '{}'",
        ROOT.0, ROOT.1
    ));
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(bounded(Duration::from_secs(60), async {
        let direct = signal_permissions(&pg.direct()).await;
        assert!(
            direct.iter().filter(|l| l.contains("42501")).count() >= 8
                && direct.iter().any(|l| l.contains("true")),
            "{direct:#?}"
        );
        let through = signal_permissions(&tp.endpoint()).await;
        assert_eq!(direct, through, "{}", tp.logs());
    }));

    // Members of the target's role, holders of pg_signal_backend, SET ROLE and SET SESSION
    // AUTHORIZATION: Postgres judges the current role.
    pg.psql_admin(&format!(
        "CREATE ROLE {carol} LOGIN PASSWORD '{carol_pw}'; GRANT alice TO {carol}; \
         CREATE ROLE {dan} LOGIN PASSWORD '{dan_pw}'; GRANT pg_signal_backend TO {dan}; \
         CREATE ROLE {erin} LOGIN NOINHERIT PASSWORD '{erin_pw}'; \
         CREATE ROLE tp_gate NOLOGIN NOINHERIT; GRANT tp_gate TO {erin}; \
         CREATE ROLE tp_alices NOLOGIN; GRANT alice TO tp_alices; GRANT tp_alices TO tp_gate; \
         CREATE ROLE tp_signaller NOLOGIN; GRANT pg_signal_backend TO tp_signaller; \
         GRANT tp_signaller TO tp_gate;",
        carol = CAROL.0,
        carol_pw = CAROL.1,
        dan = DAN.0,
        dan_pw = DAN.1,
        erin = ERIN.0,
        erin_pw = ERIN.1,
    ));
    // Where a call hangs, if one does: the step it was at, and the proxies' logs.
    let at = std::sync::Mutex::new(String::new());
    let hung = |side: &str| {
        let console = |cmd: &str| {
            testkit::Psql::new(&tp.endpoint(), ALICE.0, ALICE.1, "tidepool")
                .arg("--csv")
                .command(cmd)
                .timeout(Duration::from_secs(10))
                .run()
                .text
        };
        format!(
            "{side}: no answer in 60 s at step {:?}\n--- pg_stat_activity ---\n{}\n\
             --- SHOW CLIENTS ---\n{}\n--- SHOW SERVERS ---\n{}\n--- SHOW POOLS ---\n{}\n{}",
            at.lock().unwrap(),
            pg.psql_admin(
                "select pid, usename, state, wait_event, backend_xid, left(query, 80) \
                 from pg_stat_activity where backend_type = 'client backend'"
            ),
            console("SHOW CLIENTS"),
            console("SHOW SERVERS"),
            console("SHOW POOLS"),
            tp.logs()
        )
    };
    rt.block_on(async {
        let direct = tokio::time::timeout(
            Duration::from_secs(60),
            signal_permissions_by_role(&pg.direct(), &at),
        )
        .await
        .unwrap_or_else(|_| panic!("{}", hung("directly")));
        let count = |what: &str| direct.iter().filter(|l| l.contains(what)).count();
        assert!(
            count("[true]") >= 10
                && count("must be a superuser") >= 4
                && count("must be a member") >= 6
                && count("the victim <connection closed>") >= 3
                && count("goes on") >= 1,
            "{direct:#?}"
        );
        let through = tokio::time::timeout(
            Duration::from_secs(60),
            signal_permissions_by_role(&tp.endpoint(), &at),
        )
        .await
        .unwrap_or_else(|_| panic!("{}", hung("through Tidepool")));
        assert_eq!(direct, through, "{}", tp.logs());
    });

    // Memberships granted and revoked while the caller is logged in.
    pg.psql_admin(&format!(
        "CREATE ROLE {fred} LOGIN PASSWORD '{fred_pw}'",
        fred = FRED.0,
        fred_pw = FRED.1
    ));
    rt.block_on(bounded(Duration::from_secs(60), async {
        let direct = signals_after_grants(&pg, &pg.direct()).await;
        let count = |what: &str| direct.iter().filter(|l| l.contains(what)).count();
        assert!(
            count("[true]") >= 3
                && count("57014") >= 2
                && count("57P01") >= 1
                && count("42501") >= 2,
            "{direct:#?}"
        );
        let through = signals_after_grants(&pg, &tp.endpoint()).await;
        assert_eq!(direct, through, "{}", tp.logs());
    }));
}

/// A role that logs in before it is granted alice, then `pg_signal_backend`.
const FRED: (&str, &str) = ("fred", "fred-pw");

/// fred, logged in before each change, signals alice's sessions: after `GRANT alice TO fred` it
/// cancels a running query (constant and parameter pid: `true`, the victim's 57014); after the
/// revocation it is refused (42501: the victim's query runs on until its owner cancels it);
/// after `GRANT pg_signal_backend TO fred` it terminates (the victim's FATAL 57P01). One line
/// per answer and per victim's outcome.
async fn signals_after_grants(pg: &PgCluster, ep: &Endpoint) -> Vec<String> {
    let fred = ep.connect(FRED.0, FRED.1, APP_DB).await.unwrap();
    let watcher = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
    let mut out = Vec::new();
    let said = common::answer;
    let grants = [
        ("GRANT alice TO fred", "pg_cancel_backend"),
        ("REVOKE alice FROM fred", "pg_cancel_backend"),
        ("GRANT pg_signal_backend TO fred", "pg_terminate_backend"),
    ];
    for (change, f) in grants {
        pg.psql_admin(change);
        for param in [false, true] {
            let victim = Arc::new(ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap());
            let pid = pid_of(&victim).await;
            let sleep = format!("SELECT pg_sleep(20) -- {change} {param}");
            let running = {
                let (victim, sleep) = (victim.clone(), sleep.clone());
                tokio::spawn(async move { victim.batch_execute(&sleep).await })
            };
            let end = Instant::now() + Duration::from_secs(10);
            while Instant::now() < end {
                let row = watcher
                    .query_one(
                        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query = $1",
                        &[&sleep],
                    )
                    .await
                    .unwrap();
                if row.get::<_, i64>(0) > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let r = if param {
                fred.query(&format!("SELECT {f}($1)"), &[&pid]).await
            } else {
                fred.query(&format!("SELECT {f}({pid})"), &[]).await
            };
            let label = format!(
                "{change}: {f} {}",
                if param { "parameter" } else { "constant" }
            );
            out.push(format!("{label}: {}", said(r)));
            // A signal arrives in milliseconds; a query still running after 3 s (a loaded CI
            // machine) was not signalled: its owner cancels it (and it says so).
            let mut running = running;
            let outcome = match tokio::time::timeout(Duration::from_secs(3), &mut running).await {
                Ok(r) => r,
                Err(_) => {
                    watcher
                        .query_one("SELECT pg_cancel_backend($1)", &[&pid])
                        .await
                        .unwrap();
                    out.push(format!("{label}: the victim's query was not signalled"));
                    running.await
                }
            };
            let seen = match outcome {
                Ok(Ok(())) => "finished".to_string(),
                Ok(Err(e)) => match e.as_db_error() {
                    Some(d) => format!("{} {}", d.severity(), d.code().code()),
                    None => format!("<{e}>"),
                },
                Err(e) => format!("<{e}>"),
            };
            out.push(format!("{label}: the victim's query {seen}"));
        }
    }
    pg.psql_admin("REVOKE pg_signal_backend FROM fred");
    out
}

async fn pid_of(c: &tokio_postgres::Client) -> i32 {
    let row = c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap();
    row.get::<_, i32>(0)
}

/// Roles the signal test makes: a member of alice, and a holder of pg_signal_backend.
const CAROL: (&str, &str) = ("carol", "carol-pw");
const DAN: (&str, &str) = ("dan", "dan-pw");
/// A role that reaches alice and pg_signal_backend only by `SET ROLE` (a NOINHERIT role
/// between them).
const ERIN: (&str, &str) = ("erin", "erin-pw");

/// Who may signal whom once roles change (`signal_permissions_by_role` makes them): carol, a
/// member of alice, and dan, who holds `pg_signal_backend`, signal alice's and bob's sessions
/// and a superuser's; erin, through a NOINHERIT role, only after `SET ROLE` to a member of
/// alice or of `pg_signal_backend`; the superuser after `SET ROLE bob` and `SET SESSION AUTHORIZATION
/// bob` as bob, its own session included. Each call with a constant and a parameter pid, one
/// line per answer; terminations of fresh alice sessions, and what those sessions see next.
/// `at` names the step under way, for a test that hangs.
async fn signal_permissions_by_role(ep: &Endpoint, at: &std::sync::Mutex<String>) -> Vec<String> {
    let step = |what: &str| *at.lock().unwrap() = what.to_string();
    let connect = |(u, p): (&'static str, &'static str)| async move {
        *at.lock().unwrap() = format!("{u} connects");
        ep.connect(u, p, APP_DB).await.unwrap()
    };
    let alice = connect(ALICE).await;
    let bob = connect(BOB).await;
    let root = connect(ROOT).await;
    let carol = connect(CAROL).await;
    let dan = connect(DAN).await;
    let erin = connect(ERIN).await;
    step("their pids");
    let (alice_pid, bob_pid, root_pid) = (
        pid_of(&alice).await,
        pid_of(&bob).await,
        pid_of(&root).await,
    );
    let answer = common::answer;
    let mut out = Vec::new();
    // Both functions, a constant and a parameter pid, from `client` as it is now.
    async fn calls(
        out: &mut Vec<String>,
        answer: &impl Fn(Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>) -> String,
        label: &str,
        client: &tokio_postgres::Client,
        pid: i32,
        functions: &[&str],
    ) {
        for f in functions {
            let constant = client.query(&format!("SELECT {f}({pid})"), &[]).await;
            out.push(format!("{label} {f} constant: {}", answer(constant)));
            let param = client.query(&format!("SELECT {f}($1)"), &[&pid]).await;
            out.push(format!("{label} {f} parameter: {}", answer(param)));
        }
    }
    const CANCEL: &[&str] = &["pg_cancel_backend"];
    const BOTH: &[&str] = &["pg_cancel_backend", "pg_terminate_backend"];
    // (what the caller runs first, label, caller, target pid, functions)
    type Step<'a> = (
        &'a str,
        &'a str,
        &'a tokio_postgres::Client,
        i32,
        &'a [&'a str],
    );
    let steps: Vec<Step> = vec![
        ("", "carol->alice", &carol, alice_pid, CANCEL),
        ("", "carol->bob", &carol, bob_pid, BOTH),
        ("", "carol->root", &carol, root_pid, BOTH),
        ("", "dan->alice", &dan, alice_pid, CANCEL),
        ("", "dan->bob", &dan, bob_pid, CANCEL),
        ("", "dan->root", &dan, root_pid, BOTH),
        ("", "bob->alice", &bob, alice_pid, CANCEL),
        ("", "erin->alice", &erin, alice_pid, CANCEL),
        (
            "SET ROLE tp_alices",
            "erin as tp_alices->alice",
            &erin,
            alice_pid,
            CANCEL,
        ),
        ("", "erin as tp_alices->bob", &erin, bob_pid, CANCEL),
        ("", "erin as tp_alices->root", &erin, root_pid, CANCEL),
        (
            "SET ROLE tp_signaller",
            "erin as tp_signaller->bob",
            &erin,
            bob_pid,
            CANCEL,
        ),
        ("RESET ROLE", "erin reset->alice", &erin, alice_pid, CANCEL),
        ("SET ROLE bob", "root as bob->alice", &root, alice_pid, BOTH),
        ("", "root as bob->itself", &root, root_pid, BOTH),
        (
            "RESET ROLE; SET SESSION AUTHORIZATION bob",
            "root as session bob->alice",
            &root,
            alice_pid,
            CANCEL,
        ),
        ("", "root as session bob->itself", &root, root_pid, CANCEL),
        (
            "RESET SESSION AUTHORIZATION",
            "root reset->alice",
            &root,
            alice_pid,
            CANCEL,
        ),
    ];
    for (first, label, client, pid, functions) in steps {
        step(label);
        if !first.is_empty() {
            client.batch_execute(first).await.unwrap();
        }
        calls(&mut out, &answer, label, client, pid, functions).await;
    }

    // Terminations that happen, and one that does not: what the victim sees next.
    let victims: [(&str, &tokio_postgres::Client, bool); 4] = [
        ("carol terminates alice", &carol, false),
        ("dan terminates alice (parameter)", &dan, true),
        ("erin terminates alice", &erin, false),
        (
            "erin as tp_alices terminates alice (parameter)",
            &erin,
            true,
        ),
    ];
    for (label, killer, param) in victims {
        if label.contains("tp_alices") {
            killer.batch_execute("SET ROLE tp_alices").await.unwrap();
        }
        let victim = connect(ALICE).await;
        step(&format!("{label}: the victim's pid"));
        let pid = pid_of(&victim).await;
        step(label);
        let r = if param {
            killer
                .query("SELECT pg_terminate_backend($1)", &[&pid])
                .await
        } else {
            killer
                .query(&format!("SELECT pg_terminate_backend({pid})"), &[])
                .await
        };
        let said = answer(r);
        // A terminated victim's connection closes when its FATAL arrives: waited for (a
        // loaded machine takes longer than a fixed sleep); a refused call gets 300 ms.
        let end = Instant::now() + Duration::from_millis(if said == "[true]" { 5000 } else { 300 });
        while !victim.is_closed() && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        out.push(format!("{label}: {said}"));
        step(&format!("{label}: the victim's next query"));
        let next = match victim.query("SELECT 1", &[]).await {
            Ok(_) => "goes on".to_string(),
            Err(e) => match e.as_db_error() {
                Some(d) => format!("{} {} {}", d.severity(), d.code().code(), d.message()),
                None => format!("<{e}>"),
            },
        };
        out.push(format!("{label}: the victim {next}"));
    }
    out
}

/// A superuser role the signal test makes.
const ROOT: (&str, &str) = ("root_signaller", "root-pw");

/// Who may signal whom, as Postgres 15's `pg_signal_backend()` decides, at `ep`: bob signals
/// alice's session and a superuser's (ERROR 42501, each function its own message, with a
/// constant and a parameter pid, in and out of a transaction), alice a superuser's; the
/// superuser cancels alice's idle session (`true`), and alice's session goes on. One line per
/// call: what it answered.
async fn signal_permissions(ep: &Endpoint) -> Vec<String> {
    let alice = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
    let bob = ep.connect(BOB.0, BOB.1, APP_DB).await.unwrap();
    let root = ep.connect(ROOT.0, ROOT.1, APP_DB).await.unwrap();
    let mut pids = Vec::new();
    for c in [&alice, &root] {
        let row = c.query_one("SELECT pg_backend_pid()", &[]).await.unwrap();
        pids.push(row.get::<_, i32>(0));
    }
    let (alice_pid, root_pid) = (pids[0], pids[1]);
    let answer = common::answer;
    let mut out = Vec::new();
    let calls = [
        ("bob", "alice", &bob, alice_pid),
        ("bob", "root", &bob, root_pid),
        ("alice", "root", &alice, root_pid),
    ];
    for (who, whom, client, pid) in calls {
        for f in ["pg_cancel_backend", "pg_terminate_backend"] {
            let constant = client.query(&format!("SELECT {f}({pid})"), &[]).await;
            out.push(format!("{who} {f}({whom}) constant: {}", answer(constant)));
            let param = client.query(&format!("SELECT {f}($1)"), &[&pid]).await;
            out.push(format!("{who} {f}({whom}) parameter: {}", answer(param)));
        }
    }
    // In a transaction: the error aborts it, as directly.
    bob.batch_execute("BEGIN").await.unwrap();
    let r = bob
        .query(&format!("SELECT pg_cancel_backend({alice_pid})"), &[])
        .await;
    out.push(format!("bob in a transaction: {}", answer(r)));
    let r = bob.query("SELECT true", &[]).await;
    out.push(format!("bob's next statement: {}", answer(r)));
    bob.batch_execute("ROLLBACK").await.unwrap();
    let r = root
        .query(&format!("SELECT pg_cancel_backend({alice_pid})"), &[])
        .await;
    out.push(format!("superuser cancels alice: {}", answer(r)));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let r = alice.query("SELECT true", &[]).await;
    out.push(format!("alice goes on: {}", answer(r)));
    out
}

/// A session ended by the server (issue 11): the backend running a client's query or holding
/// its open transaction is terminated from another connection; psycopg 3 and psql see Postgres's
/// FATAL 57P01 as their last word and a closed connection, as directly (before, an 08006 of ours
/// followed it, or replaced it for an idle transaction). Then, through Tidepool only: the pooled
/// backends no session holds are terminated, and an idle client goes on (the pooler replaces
/// them; directly that client's own backend would have been terminated).
#[test]
fn a_session_ended_by_the_server_ends_as_directly() {
    if !psycopg_available("a_session_ended_by_the_server_ends_as_directly") {
        return;
    }
    let (pg, tp) = start(2);
    same_checks_directly_and_through(
        &pg,
        &tp,
        "server_end_check.py",
        |checks| checks.iter().filter(|l| l.contains("57P01")).count() >= 2,
        "the script saw no termination",
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(bounded(Duration::from_secs(30), async {
        let alice = tp
            .endpoint()
            .connect(ALICE.0, ALICE.1, APP_DB)
            .await
            .unwrap();
        let one: i32 = alice.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(one, 1);
        // The session is idle and holds no backend by now.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let ended = pg.psql_admin(
            "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM (SELECT pid \
             FROM pg_stat_activity WHERE usename = 'alice' AND state = 'idle' OFFSET 0) s",
        );
        assert_ne!(ended.trim(), "0", "no idle pooled backend was terminated");
        tokio::time::sleep(Duration::from_millis(300)).await;
        let two: i32 = alice.query_one("SELECT 2", &[]).await.unwrap().get(0);
        assert_eq!(two, 2, "the idle client goes on");
    }));
}

/// Prepared statements after the schema changed under them (issue 11): ALTER TABLE, ALTER
/// COLUMN TYPE, a dropped and re-created enum type, in and out of a transaction; psycopg 3
/// preparing every statement and asyncpg with its statement cache and retry. Postgres's
/// `cached plan must not change result type` (0A000) comes on the same executions as directly,
/// and keeps coming for a statement the client does not prepare again (before, the pooler's
/// re-prepared statement answered from the second execution on). Then through a pooler whose
/// backends live 300 ms, pausing after each change: the statements run on backends that never
/// had them, and still fail as directly (before, the new copy answered with the new type;
/// asyncpg then failed to decode its rows).
#[test]
fn prepared_statements_after_a_schema_change_behave_as_directly() {
    if !psycopg_available("prepared_statements_after_a_schema_change_behave_as_directly") {
        return;
    }
    let (pg, tp) = start(2);
    let checks = same_checks_directly_and_through(
        &pg,
        &tp,
        "cache_check.py",
        |checks| {
            checks.iter().filter(|l| l.contains("0A000")).count() >= 3
                && checks
                    .iter()
                    .any(|l| l.contains("InvalidCachedStatementError"))
        },
        "the script saw no stale plan",
    );
    drop(tp);

    let tp = Tidepool::start(
        &pg,
        TidepoolOpts::default()
            .pool_size(2)
            .pooler_arg("--server-lifetime-ms")
            .pooler_arg("300"),
    );
    let url = tp.url(ALICE.0, ALICE.1, APP_DB);
    let mut cmd = Command::new("python3");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/cache_check.py"))
        .arg(url)
        .arg("--fresh-backends");
    let fresh = run_merged(&mut cmd, None, Duration::from_secs(120));
    assert!(
        fresh.success(),
        "through the gateway, fresh backends:\n{}\n{}",
        fresh.text,
        tp.logs()
    );
    assert_eq!(checks, checks_passed(&fresh.text), "on fresh backends");
}

/// `client_encoding` in the startup packet on its own (issue 11): EUC_JP, SJIS, LATIN1 and UTF8
/// reported, shown, applied to what the server sends (and 22P05 for a character the encoding
/// lacks), kept as the session's value by RESET; an unknown name refused. psycopg 3, against
/// Postgres first.
#[test]
fn client_encoding_in_the_startup_packet_as_directly() {
    if !psycopg_available("client_encoding_in_the_startup_packet_as_directly") {
        return;
    }
    let (pg, tp) = start(2);
    same_checks_directly_and_through(
        &pg,
        &tp,
        "startup_encoding_check.py",
        |checks| {
            checks
                .iter()
                .any(|l| l == "EUC_JP: reported after RESET: ok b'EUC_JP'")
                && checks.iter().any(|l| l.contains("22P05"))
        },
        "the script did not see the encodings applied",
    );
}
