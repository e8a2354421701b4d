//! Prepared statements consolidated by the pooler: one Parse per statement per backend, a
//! bounded set per backend, and `SET ROLE` following the session to other backends.

use std::time::Duration;
use testkit::{PgCluster, Tidepool, TidepoolOpts};

const ALICE: (&str, &str) = ("alice", "alice-pw");

/// The first column of the first row of a simple query's answer.
fn first_cell(msgs: &[tokio_postgres::SimpleQueryMessage]) -> Option<String> {
    msgs.iter().find_map(|m| match m {
        tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
        _ => None,
    })
}

async fn bounded<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(60), fut)
        .await
        .expect("test step took more than 60 s")
}

#[tokio::test]
async fn a_backend_keeps_a_bounded_set_of_statements() {
    let pg = PgCluster::start();
    let mut opts = TidepoolOpts::default().pool_size(1);
    opts.cores = 1;
    opts.extra_pooler_args = vec!["--max-prepared-statements".into(), "5".into()];
    let tp = Tidepool::start(&pg, opts);
    bounded(async {
        let c = tp
            .endpoint()
            .connect(ALICE.0, ALICE.1, "app")
            .await
            .unwrap();
        // 30 distinct named statements, used in three rounds: evicted ones are prepared again.
        let mut stmts = Vec::new();
        for i in 0..30 {
            stmts.push(c.prepare(&format!("SELECT $1::int + {i}")).await.unwrap());
        }
        for round in 0..3 {
            for (i, s) in stmts.iter().enumerate() {
                let v: i32 = c.query_one(s, &[&round]).await.unwrap().get(0);
                assert_eq!(v, round + i as i32);
            }
        }
        let n: i64 = c
            .query_one("SELECT count(*) FROM pg_prepared_statements", &[])
            .await
            .unwrap()
            .get(0);
        assert!(
            n <= 6,
            "the backend holds {n} statements, limit 5 (+ this query)"
        );
    })
    .await;
}

#[tokio::test]
async fn equal_statements_are_parsed_once_per_backend() {
    let pg = PgCluster::start();
    let mut opts = TidepoolOpts::default().pool_size(1);
    opts.cores = 1;
    let tp = Tidepool::start(&pg, opts);
    bounded(async {
        let ep = tp.endpoint();
        let mut clients = Vec::new();
        for _ in 0..10 {
            let c = ep.connect(ALICE.0, ALICE.1, "app").await.unwrap();
            let s = c.prepare("SELECT 42::int AS answer").await.unwrap();
            let v: i32 = c.query_one(&s, &[]).await.unwrap().get(0);
            assert_eq!(v, 42);
            clients.push(c);
        }
        let c = &clients[0];
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_prepared_statements WHERE statement = 'SELECT 42::int AS answer'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "ten sessions, one backend: one statement");
    })
    .await;
}

#[tokio::test]
async fn set_role_follows_the_session_and_not_others() {
    let pg = PgCluster::start();
    pg.psql_admin("CREATE ROLE reader NOLOGIN; GRANT reader TO alice;");
    let tp = Tidepool::start(&pg, TidepoolOpts::default().pool_size(2));
    bounded(async {
        let ep = tp.endpoint();
        let a = ep.connect(ALICE.0, ALICE.1, "app").await.unwrap();
        let b = ep.connect(ALICE.0, ALICE.1, "app").await.unwrap();
        a.batch_execute("SET ROLE reader").await.unwrap();
        for _ in 0..10 {
            let who: String = a
                .query_one("SELECT current_user::text", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(who, "reader");
            let who: String = b
                .query_one("SELECT current_user::text", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(who, "alice");
        }
        a.batch_execute("RESET ROLE").await.unwrap();
        let who: String = a
            .query_one("SELECT current_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, "alice");
    })
    .await;
}

#[tokio::test]
async fn set_session_authorization_never_reaches_another_session() {
    let pg = PgCluster::start();
    pg.psql_admin("CREATE ROLE su SUPERUSER LOGIN PASSWORD 'su-pw';");
    let mut opts = TidepoolOpts::default().pool_size(1);
    opts.cores = 1;
    let tp = Tidepool::start(&pg, opts);
    bounded(async {
        let ep = tp.endpoint();
        let a = ep.connect("su", "su-pw", "app").await.unwrap();
        a.batch_execute("SET SESSION AUTHORIZATION alice")
            .await
            .unwrap();
        let who: String = a
            .query_one("SELECT session_user::text", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(who, "alice");
        drop(a);
        // The next session (the pool has one backend) logs in as su and is su.
        for _ in 0..3 {
            let b = ep.connect("su", "su-pw", "app").await.unwrap();
            let who: String = b
                .query_one("SELECT session_user::text", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(
                who, "su",
                "a later session runs as another session's authorization"
            );
        }
    })
    .await;
}

/// The single value of a simple query's first row.
async fn value(c: &tokio_postgres::Client, sql: &str) -> String {
    let rows = c
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter()
        .find_map(|m| match m {
            tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .unwrap_or_else(|| panic!("{sql}: no row"))
}

/// SQL `PREPARE` no longer pins: the session's next `EXECUTE` runs on another backend (forced:
/// two other sessions hold both backends, and the one it did not use is freed first), and the
/// statement is made there. Names never clash between sessions.
#[tokio::test]
async fn sql_prepared_statements_follow_the_session_to_other_backends() {
    let pg = PgCluster::start();
    let mut opts = TidepoolOpts::default().pool_size(2);
    opts.cores = 1;
    let tp = Tidepool::start(&pg, opts);
    bounded(async {
        let ep = tp.endpoint();
        let a = ep.connect(ALICE.0, ALICE.1, "app").await.unwrap();
        let holders = [
            ep.connect(ALICE.0, ALICE.1, "app").await.unwrap(),
            ep.connect(ALICE.0, ALICE.1, "app").await.unwrap(),
        ];
        // The backend's own pid (a `pg_backend_pid()` whose value goes to the client answers the
        // session's virtual pid, in a prepared body too).
        a.batch_execute(
            "PREPARE \"Where\" (int) AS SELECT (SELECT pid FROM pg_stat_activity \
             WHERE pid = pg_backend_pid()) + 0 * $1",
        )
        .await
        .unwrap();
        let mut last = value(&a, "EXECUTE \"Where\"(1)").await;
        for round in 0..3 {
            // Both backends held by the other two sessions...
            let mut pids = Vec::new();
            for h in &holders {
                h.batch_execute("BEGIN").await.unwrap();
                pids.push(
                    value(
                        h,
                        "SELECT pid FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                    )
                    .await,
                );
            }
            assert_ne!(pids[0], pids[1]);
            // ...and the one this session did not use is freed first.
            let (free, other) = if pids[0] == last { (1, 0) } else { (0, 1) };
            let run = a.simple_query("EXECUTE \"Where\"(2)");
            let commit = holders[free].batch_execute("COMMIT");
            let (rows, committed) = tokio::join!(run, commit);
            committed.unwrap();
            let now = rows
                .unwrap()
                .iter()
                .find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                    _ => None,
                })
                .unwrap();
            assert_eq!(now, pids[free], "round {round}: ran on the freed backend");
            assert_ne!(now, last, "round {round}: the session moved");
            holders[other].batch_execute("COMMIT").await.unwrap();
            last = now;
        }
        // Deallocated on whichever backend it now runs: gone everywhere for this session.
        a.batch_execute("DEALLOCATE \"Where\"").await.unwrap();
        for _ in 0..3 {
            let e = a.simple_query("EXECUTE \"Where\"(1)").await.unwrap_err();
            assert_eq!(
                e.code(),
                Some(&tokio_postgres::error::SqlState::INVALID_SQL_STATEMENT_NAME)
            );
        }
        // Another session never sees this session's names.
        a.batch_execute("PREPARE only_a AS SELECT 1").await.unwrap();
        let e = holders[0].simple_query("EXECUTE only_a").await;
        assert!(
            e.is_err(),
            "another session reached this session's statement"
        );
        // A name each session prepares with different text stays each session's own.
        a.batch_execute("PREPARE mine AS SELECT 'a'").await.unwrap();
        holders[0]
            .batch_execute("PREPARE mine AS SELECT 'b'")
            .await
            .unwrap();
        for _ in 0..5 {
            assert_eq!(value(&a, "EXECUTE mine").await, "a");
            assert_eq!(value(&holders[0], "EXECUTE mine").await, "b");
        }
    })
    .await;
}

/// What a SQL-prepared statement's body calls is judged at PREPARE, as for a protocol-level
/// Parse: a session that prepares an advisory lock keeps its backend, so the lock never ends up
/// on a pooled backend another session then runs on.
#[tokio::test]
async fn a_prepared_advisory_lock_keeps_the_backend() {
    let pg = PgCluster::start();
    let mut opts = TidepoolOpts::default().pool_size(2);
    opts.cores = 1;
    let tp = Tidepool::start(&pg, opts);
    bounded(async {
        let ep = tp.endpoint();
        let a = ep.connect(ALICE.0, ALICE.1, "app").await.unwrap();
        let b = ep.connect(ALICE.0, ALICE.1, "app").await.unwrap();
        a.batch_execute("PREPARE lock_it AS SELECT pg_advisory_lock(4242)")
            .await
            .unwrap();
        a.batch_execute("EXECUTE lock_it").await.unwrap();
        for _ in 0..10 {
            // Re-entrant on the backend that holds it: true would mean b runs there.
            assert_eq!(value(&b, "SELECT pg_try_advisory_lock(4242)").await, "f");
            assert_eq!(
                value(
                    &a,
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' \
                     AND pid = pg_backend_pid()"
                )
                .await,
                "1"
            );
        }
        assert_eq!(value(&a, "SELECT pg_advisory_unlock(4242)").await, "t");
    })
    .await;
}

/// Code Postgres runs itself finds a session's SQL-prepared statement by the client's name: a
/// PL/pgSQL function's dynamic `EXECUTE` (pg_regress partition_prune). On backends the statement
/// is named by content; for a batch that calls a user function the pooler makes copies under the
/// client's names, and drops them before the backend serves another session.
#[tokio::test]
async fn dynamic_sql_in_a_function_finds_the_sessions_prepared_statement() {
    let pg = PgCluster::start();
    pg.psql_admin_db(
        "app",
        "CREATE FUNCTION run_prepared(call text) RETURNS int LANGUAGE plpgsql AS \
         $$ DECLARE r int; BEGIN EXECUTE 'EXECUTE ' || call INTO r; RETURN r; END $$;",
    );
    let mut opts = TidepoolOpts::default().pool_size(1);
    opts.cores = 1;
    let tp = Tidepool::start(&pg, opts);
    bounded(async {
        let ep = tp.endpoint();
        let a = ep.connect(ALICE.0, ALICE.1, "app").await.unwrap();
        let b = ep.connect(ALICE.0, ALICE.1, "app").await.unwrap();
        a.batch_execute("PREPARE twice(int) AS SELECT $1 * 2")
            .await
            .unwrap();
        for round in 0..3 {
            let v = a
                .simple_query(&format!("SELECT run_prepared('twice({round})')"))
                .await
                .unwrap();
            let got = first_cell(&v);
            assert_eq!(got.as_deref(), Some((round * 2).to_string().as_str()));
            // b, on the same (only) backend in between, has no statement of that name.
            let e = b
                .simple_query("SELECT run_prepared('twice(1)')")
                .await
                .expect_err("b found a's statement");
            assert_eq!(e.code().map(|c| c.code()), Some("26000"), "{e}");
        }
        // While the copy exists (a transaction keeps the backend), the view shows the
        // statement once.
        a.batch_execute("BEGIN").await.unwrap();
        a.simple_query("SELECT run_prepared('twice(5)')")
            .await
            .unwrap();
        let rows = a
            .simple_query("SELECT count(*) FROM pg_prepared_statements WHERE name = 'twice'")
            .await
            .unwrap();
        let n = first_cell(&rows);
        assert_eq!(n.as_deref(), Some("1"));
        a.batch_execute("COMMIT").await.unwrap();
    })
    .await;
}
