//! State Postgres keeps per backend that Tidepool cannot copy to another backend (issue 4,
//! points 1 and 5): `currval`/`lastval`, the temp schema, C libraries' statics. A session comes
//! back to the backend it held last when that one is idle; a statement naming `currval` or
//! `lastval` keeps the session on its backend and never sees another session's value; a backend
//! that held such state for a session is closed, not reused, when the session ends.

use std::future::Future;
use std::time::Duration;

use testkit::{PgCluster, Tidepool, TidepoolOpts, ALICE, APP_DB};
use tokio_postgres::Client;

async fn bounded<T>(limit: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("test exceeded {limit:?}"))
}

fn start(pool_size: usize) -> (PgCluster, Tidepool) {
    start_with(TidepoolOpts::default().pool_size(pool_size))
}

/// One core: backends belong to a core, and these tests are about which backend a session of
/// that core gets.
fn start_with(mut opts: TidepoolOpts) -> (PgCluster, Tidepool) {
    opts.cores = 1;
    let pg = PgCluster::start();
    pg.psql_admin_db(
        APP_DB,
        "CREATE SEQUENCE s OWNED BY NONE; ALTER SEQUENCE s OWNER TO alice;\n\
         CREATE ROLE carol SUPERUSER LOGIN PASSWORD 'carol-pw';",
    );
    let tp = Tidepool::start(&pg, opts);
    (pg, tp)
}

async fn one_i64(c: &Client, sql: &str) -> i64 {
    c.query_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

async fn pid(c: &Client) -> i32 {
    // The backend's own pid: `pg_backend_pid()` in a select list answers the client's
    // (issue 11); in a WHERE clause it names the backend.
    c.query_one(
        "SELECT pid FROM pg_stat_activity WHERE pid = pg_backend_pid()",
        &[],
    )
    .await
    .expect("pg_backend_pid")
    .get(0)
}

/// Two backends, two sessions taking turns: each session's `nextval` and then `currval` give the
/// same number, because each comes back to the backend it held last (LIFO alone would hand
/// each the other's backend here).
#[tokio::test]
async fn a_session_comes_back_to_its_backend_for_currval() {
    let (_pg, tp) = start(2);
    bounded(Duration::from_secs(60), async {
        let ep = tp.endpoint();
        let a = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let c = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        for round in 0..5 {
            // Both backends in use, then both idle: a's released first, c's on top.
            a.batch_execute("BEGIN").await.unwrap();
            c.batch_execute("BEGIN").await.unwrap();
            let (pa, pc) = (pid(&a).await, pid(&c).await);
            assert_ne!(pa, pc, "two open transactions on one backend");
            a.batch_execute("COMMIT").await.unwrap();
            c.batch_execute("COMMIT").await.unwrap();
            let va = one_i64(&a, "SELECT nextval('s')").await;
            let vc = one_i64(&c, "SELECT nextval('s')").await;
            assert_eq!(
                one_i64(&a, "SELECT currval('s')").await,
                va,
                "round {round}: a's currval"
            );
            assert_eq!(
                one_i64(&c, "SELECT currval('s')").await,
                vc,
                "round {round}: c's currval"
            );
            assert_eq!(
                pid(&a).await,
                pa,
                "round {round}: a moved to another backend"
            );
        }
    })
    .await;
}

/// When a session's backend was used by another session since its `nextval`, its `currval`
/// must not answer with the other session's value: Tidepool clears that backend's sequence
/// state first, so the answer is Postgres's "not yet defined in this session" (55000).
/// Directly the session would get its own value; that one is gone with the other backend's
/// state (README, "Differences from Postgres").
#[tokio::test]
async fn currval_never_answers_with_another_sessions_value() {
    // No lease: b's nextval takes the backend a's nextval ran on.
    let (_pg, tp) = start_with(
        TidepoolOpts::default()
            .pool_size(2)
            .pooler_arg("--sequence-lease-ms")
            .pooler_arg("0"),
    );
    bounded(Duration::from_secs(60), async {
        let ep = tp.endpoint();
        let a = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let b = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        // One backend so far: a uses it, then b (a's last backend is idle; b has none).
        let va = one_i64(&a, "SELECT nextval('s')").await;
        let pa = pid(&a).await;
        let vb = one_i64(&b, "SELECT nextval('s')").await;
        assert_eq!(pid(&b).await, pa, "b did not reuse the only backend");
        assert_ne!(va, vb);
        match a.query_one("SELECT currval('s')", &[]).await {
            Ok(row) => {
                let got: i64 = row.get(0);
                assert_eq!(got, va, "a's currval is b's value {vb}");
            }
            Err(e) => assert_eq!(
                e.code().map(|c| c.code()),
                Some("55000"),
                "a's currval: {e}"
            ),
        }
        // From here a keeps its backend: its next nextval/currval agree, while b goes on.
        let va2 = one_i64(&a, "SELECT nextval('s')").await;
        let vb2 = one_i64(&b, "SELECT nextval('s')").await;
        assert_eq!(one_i64(&a, "SELECT currval('s')").await, va2);
        assert_eq!(one_i64(&a, "SELECT lastval()").await, va2);
        assert_eq!(one_i64(&b, "SELECT currval('s')").await, vb2);
    })
    .await;
}

/// `SELECT nextval(...)` then `SELECT currval(...)` as two requests, with another session
/// waiting for the only backend in between: the first session keeps its backend until its next
/// request (the lease, long here so that a slow machine cannot end it first), so its `currval`
/// is its `nextval`.
#[tokio::test]
async fn nextval_then_currval_meet_while_others_wait() {
    let (_pg, tp) = start_with(
        TidepoolOpts::default()
            .pool_size(1)
            .pooler_arg("--sequence-lease-ms")
            .pooler_arg("10000"),
    );
    bounded(Duration::from_secs(60), async {
        let ep = tp.endpoint();
        let a = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let b = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let va = one_i64(&a, "SELECT nextval('s')").await;
        let waiting = tokio::spawn(async move {
            let v = one_i64(&b, "SELECT nextval('s')").await;
            (b, v)
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !waiting.is_finished(),
            "b took a's backend during a's lease"
        );
        assert_eq!(one_i64(&a, "SELECT currval('s')").await, va);
        // a is pinned from its currval on; when it leaves, b runs.
        drop(a);
        let (_b, vb) = tokio::time::timeout(Duration::from_secs(20), waiting)
            .await
            .expect("b never ran after a left")
            .expect("task");
        assert!(vb > va);
    })
    .await;
}

/// The lease is short by default and ends by itself: a session that ran `nextval` and then
/// nothing does not keep the only backend from others.
#[tokio::test]
async fn the_nextval_lease_ends_by_itself() {
    let (_pg, tp) = start(1);
    bounded(Duration::from_secs(60), async {
        let ep = tp.endpoint();
        let a = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let b = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        one_i64(&a, "SELECT nextval('s')").await;
        let t = std::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(10), b.query_one("SELECT 1", &[]))
            .await
            .expect("b waited 10 s for the backend a leased")
            .expect("SELECT 1");
        eprintln!(
            "[backend_state] b waited {:?} for a's leased backend",
            t.elapsed()
        );
        // a is not pinned: it goes on, on whatever backend.
        one_i64(&a, "SELECT nextval('s')").await;
    })
    .await;
}

/// A session that made temp tables leaves; the next session must get a backend without a temp
/// schema, as a new connection to Postgres has (`PREPARE TRANSACTION` and `pg_my_temp_schema()`
/// depend on it): the pinned backend is closed rather than cleaned with `DISCARD ALL`.
#[tokio::test]
async fn the_next_session_never_inherits_a_temp_schema() {
    let (pg, tp) = start(1);
    bounded(Duration::from_secs(60), async {
        let ep = tp.endpoint();
        let direct = pg.direct();
        let d = direct.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        assert_eq!(
            one_i64(&d, "SELECT pg_my_temp_schema()::oid::int8").await,
            0
        );
        for round in 0..3 {
            let a = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
            a.batch_execute("CREATE TEMP TABLE t (x int); INSERT INTO t VALUES (1)")
                .await
                .unwrap();
            assert_ne!(
                one_i64(&a, "SELECT pg_my_temp_schema()::oid::int8").await,
                0
            );
            let pa = pid(&a).await;
            drop(a);
            let b = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
            assert_eq!(
                one_i64(&b, "SELECT pg_my_temp_schema()::oid::int8").await,
                0,
                "round {round}: the new session has the old session's temp schema"
            );
            assert_ne!(
                pid(&b).await,
                pa,
                "round {round}: the pinned backend was reused"
            );
            assert!(
                b.query("SELECT * FROM t", &[]).await.is_err(),
                "round {round}: the old temp table is visible"
            );
        }
    })
    .await;
}

/// `CREATE FUNCTION ... LANGUAGE C` loads the library into the backend, and C code may keep
/// per-backend state: the session keeps its backend (a second session waits for the pool of one
/// until the first leaves) and that backend is not reused after.
#[tokio::test]
async fn creating_a_c_function_keeps_the_backend() {
    let (_pg, tp) = start(1);
    bounded(Duration::from_secs(60), async {
        let ep = tp.endpoint();
        // Both log in first: with the only backend pinned, a new login would wait for it too.
        let a = ep.connect("carol", "carol-pw", APP_DB).await.unwrap();
        let b = ep.connect("carol", "carol-pw", APP_DB).await.unwrap();
        a.batch_execute(
            "CREATE FUNCTION my_handler() RETURNS language_handler \
             AS '$libdir/plpgsql', 'plpgsql_call_handler' LANGUAGE C",
        )
        .await
        .unwrap();
        let pa = pid(&a).await;
        let waiting = tokio::spawn(async move {
            let p = pid(&b).await;
            (b, p)
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            !waiting.is_finished(),
            "the second session ran on the first one's backend"
        );
        assert_eq!(pid(&a).await, pa);
        drop(a);
        let (_b, pb) = tokio::time::timeout(Duration::from_secs(20), waiting)
            .await
            .expect("the second session never got a backend after the first left")
            .expect("task");
        assert_ne!(pb, pa, "the C function's backend was reused");
    })
    .await;
}
