//! sqlx against a Postgres URL: the driver features that lean on the protocol, as the check
//! programs of the other drivers beside this file do, run in the test process by
//! `gateway/tests/drivers.rs`.
//!
//! sqlx sends a query with arguments as a named statement it caches per connection (`sqlx_s_N`),
//! or as the unnamed one when it is not persistent; a query without arguments as a simple Query;
//! and asks for every result column in binary. It has no CancelRequest.
//!
//! Returns the lines "name: ok" per check and "name = value" for values compared with a run
//! against Postgres itself, then "sqlx ok"; any failure panics.

use std::fmt::Debug;
use std::str::FromStr;
use std::time::{Duration, Instant};

use futures_util::{StreamExt, TryStreamExt};
use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPoolOptions};
use sqlx::{Connection, Executor, Row, Statement};

use super::SESSIONS;

/// What a sqlx check saw: the lines compared between Postgres and Tidepool.
#[derive(Default)]
struct Report(Vec<String>);

impl Report {
    fn check<T: PartialEq + Debug>(&mut self, name: &str, got: T, want: T) {
        assert_eq!(got, want, "{name}");
        self.line(format!("{name}: ok"));
    }

    /// A value not asserted here but compared between Postgres and Tidepool.
    fn record(&mut self, name: &str, value: impl Debug) {
        self.line(format!("{name} = {value:?}"));
    }

    fn line(&mut self, line: String) {
        println!("{line}");
        self.0.push(line);
    }
}

/// SQLSTATE and message of a server error; panics on any other failure.
fn error_of<T: Debug>(r: Result<T, sqlx::Error>) -> (String, String) {
    match r {
        Err(sqlx::Error::Database(e)) => (
            e.code().unwrap_or_default().into_owned(),
            e.message().to_string(),
        ),
        other => panic!("expected a server error, got {other:?}"),
    }
}

async fn connect(url: &str) -> PgConnection {
    PgConnection::connect(url)
        .await
        .unwrap_or_else(|e| panic!("sqlx connect: {e}"))
}

async fn scalar<T>(conn: &mut PgConnection, sql: &str) -> T
where
    T: for<'r> sqlx::Decode<'r, sqlx::Postgres> + sqlx::Type<sqlx::Postgres> + Send + Unpin,
{
    sqlx::query_scalar(sql)
        .fetch_one(conn)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn exec(conn: &mut PgConnection, sql: &str) {
    conn.execute(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn sqlx_prepared(r: &mut Report, c: &mut PgConnection) {
    // A query with arguments is a named, cached statement (sqlx_s_N) ...
    for i in 0..3i32 {
        let v: i32 = sqlx::query_scalar("SELECT $1::int4 + $2::int4")
            .bind(i)
            .bind(40i32)
            .fetch_one(&mut *c)
            .await
            .unwrap();
        r.check(&format!("named {i}"), v, i + 40);
    }
    // ... unless it is not persistent: the unnamed statement.
    for i in 0..3i32 {
        let v: String = sqlx::query_scalar("SELECT name FROM sx WHERE id = $1")
            .bind(i + 1)
            .persistent(false)
            .fetch_one(&mut *c)
            .await
            .unwrap();
        r.check(&format!("unnamed {i}"), v, format!("n{}", i + 1));
    }
    // An explicitly prepared statement, used after other work.
    let stmt = c
        .prepare("SELECT name FROM sx WHERE id = $1")
        .await
        .unwrap();
    exec(c, "SELECT pg_sleep(0.01)").await;
    for id in [7i32, 50] {
        let v: String = stmt
            .query()
            .bind(id)
            .fetch_one(&mut *c)
            .await
            .unwrap()
            .get(0);
        r.check(&format!("prepared {id}"), v, format!("n{id}"));
    }
    // No arguments: a simple Query, several statements in one.
    let rows = sqlx::raw_sql("SELECT 1; SELECT 2 UNION ALL SELECT 3")
        .fetch_all(&mut *c)
        .await
        .unwrap();
    r.check("multi-statement", rows.len(), 3);
    r.record(
        "parse error",
        error_of(
            sqlx::query("SELECT nosuchcolumn FROM sx")
                .fetch_all(&mut *c)
                .await,
        ),
    );
    r.record(
        "bind error",
        error_of(
            sqlx::query("SELECT $1::text::int4")
                .bind("not a number")
                .fetch_all(&mut *c)
                .await,
        ),
    );
    r.check("after errors", scalar::<i32>(c, "SELECT 3").await, 3);
}

async fn sqlx_binary(r: &mut Report, c: &mut PgConnection) {
    // sqlx asks for every result column in binary.
    let row = sqlx::query(
        "SELECT $1::int2, $2::int4, $3::int8, $4::float8, $5::text, $6::bool, $7::bytea, \
         ARRAY[1, NULL, 3]::int4[], ARRAY['a', 'b']::text[], NULL::int8, \
         '2024-01-02 03:04:05.006+00'::timestamptz::text, 12345.678901::numeric::text",
    )
    .bind(7i16)
    .bind(123456i32)
    .bind(1i64 << 40)
    .bind(1.25f64)
    .bind("text ü")
    .bind(true)
    .bind(vec![0u8, 1, 255])
    .fetch_one(&mut *c)
    .await
    .unwrap();
    r.check("binary int2", row.get::<i16, _>(0), 7);
    r.check("binary int4", row.get::<i32, _>(1), 123456);
    r.check("binary int8", row.get::<i64, _>(2), 1 << 40);
    r.check("binary float8", row.get::<f64, _>(3), 1.25);
    r.check("binary text", row.get::<String, _>(4), "text ü".to_string());
    r.check("binary bool", row.get::<bool, _>(5), true);
    r.check("binary bytea", row.get::<Vec<u8>, _>(6), vec![0, 1, 255]);
    r.check(
        "binary int4[]",
        row.get::<Vec<Option<i32>>, _>(7),
        vec![Some(1), None, Some(3)],
    );
    r.check(
        "binary text[]",
        row.get::<Vec<String>, _>(8),
        vec!["a".to_string(), "b".to_string()],
    );
    r.check("binary null", row.get::<Option<i64>, _>(9), None);
    r.record("timestamptz as text", row.get::<String, _>(10));
    r.record("numeric as text", row.get::<String, _>(11));
}

async fn sqlx_transactions(r: &mut Report, c: &mut PgConnection) {
    let mut tx = c.begin().await.unwrap();
    sqlx::query("INSERT INTO sx VALUES ($1, $2)")
        .bind(100i32)
        .bind("tx")
        .execute(&mut *tx)
        .await
        .unwrap();
    {
        // A nested transaction is a savepoint.
        let mut sp = Connection::begin(&mut *tx).await.unwrap();
        let dup = sqlx::query("INSERT INTO sx VALUES ($1, $2)")
            .bind(1i32)
            .bind("dup")
            .execute(&mut *sp)
            .await;
        r.record("unique violation", error_of(dup));
        r.record(
            "in failed transaction",
            error_of(sqlx::query("SELECT 1").fetch_all(&mut *sp).await),
        );
        sp.rollback().await.unwrap();
    }
    let kept: String = sqlx::query_scalar("SELECT name FROM sx WHERE id = 100")
        .fetch_one(&mut *tx)
        .await
        .unwrap();
    r.check("savepoint kept outer work", kept, "tx".to_string());
    tx.commit().await.unwrap();

    {
        let mut tx = c.begin().await.unwrap();
        exec(&mut tx, "INSERT INTO sx VALUES (101, 'dropped')").await;
        r.record(
            "division by zero",
            error_of(sqlx::query("SELECT 1 / 0").fetch_all(&mut *tx).await),
        );
        // Dropped without commit: sqlx rolls back on the next use of the connection.
    }
    r.check(
        "dropped transaction rolled back",
        scalar::<i64>(c, "SELECT count(*) FROM sx WHERE id = 101").await,
        0,
    );
    // An error in a multi-statement simple query rolls back its implicit transaction.
    r.record(
        "multi-statement error",
        error_of(
            sqlx::raw_sql("INSERT INTO sx VALUES (102, 'implicit'); SELECT 1 / 0")
                .execute(&mut *c)
                .await,
        ),
    );
    r.check(
        "implicit transaction rolled back",
        scalar::<i64>(c, "SELECT count(*) FROM sx WHERE id = 102").await,
        0,
    );
}

async fn sqlx_copy(r: &mut Report, c: &mut PgConnection) {
    let data: String = (1000..3000).map(|i| format!("{i}\tcopied {i}\n")).collect();
    let mut copy = c
        .copy_in_raw("COPY sx (id, name) FROM STDIN")
        .await
        .unwrap();
    // In pieces that cut rows, as a driver streaming a file does.
    for piece in data.as_bytes().chunks(1000) {
        copy.send(piece).await.unwrap();
    }
    r.check("copy in", copy.finish().await.unwrap(), 2000);
    let out: Vec<u8> = c
        .copy_out_raw(
            "COPY (SELECT id, name FROM sx WHERE id BETWEEN 1000 AND 1004 ORDER BY id) TO STDOUT",
        )
        .await
        .unwrap()
        .try_fold(Vec::new(), |mut acc, chunk| async move {
            acc.extend_from_slice(&chunk);
            Ok(acc)
        })
        .await
        .unwrap();
    let want: String = (1000..1005).map(|i| format!("{i}\tcopied {i}\n")).collect();
    r.check("copy out", String::from_utf8(out).unwrap(), want);
    let mut lines = 0;
    let mut bytes = 0;
    let mut stream = c
        .copy_out_raw("COPY (SELECT g, md5(g::text) FROM generate_series(1, 100000) g) TO STDOUT (FORMAT csv)")
        .await
        .unwrap();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        lines += chunk.iter().filter(|&&b| b == b'\n').count();
        bytes += chunk.len();
    }
    drop(stream);
    r.check("copy out 100k", lines, 100000);
    r.record("copy out 100k bytes", bytes);
    let mut copy = c
        .copy_in_raw("COPY sx (id, name) FROM STDIN")
        .await
        .unwrap();
    copy.send(&b"1\tdup\n"[..]).await.unwrap();
    r.record("copy error", error_of(copy.finish().await));
    // COPY aborted by the client.
    let mut copy = c
        .copy_in_raw("COPY sx (id, name) FROM STDIN")
        .await
        .unwrap();
    copy.send(&b"5000\tabort\n"[..]).await.unwrap();
    // sqlx reads the 57014 that answers a CopyFail and returns Ok.
    r.check(
        "copy abort",
        copy.abort("changed my mind").await.is_ok(),
        true,
    );
    r.check(
        "after copy errors",
        scalar::<i64>(c, "SELECT count(*) FROM sx WHERE id >= 3000").await,
        0,
    );
}

async fn sqlx_listen_notify(r: &mut Report, url: &str) {
    let mut listener = PgListener::connect(url).await.unwrap();
    let mut b = connect(url).await;
    listener.listen("sx_news").await.unwrap();
    exec(&mut b, "NOTIFY sx_news, 'first'").await;
    let mut tx = b.begin().await.unwrap();
    exec(&mut tx, "SELECT pg_notify('sx_news', 'in tx')").await;
    tx.commit().await.unwrap();
    let mut tx = b.begin().await.unwrap();
    exec(&mut tx, "NOTIFY sx_news, 'rolled back'").await;
    tx.rollback().await.unwrap();
    exec(&mut b, "NOTIFY sx_news, 'last'").await;
    let mut got = Vec::new();
    for _ in 0..3 {
        let n = tokio::time::timeout(Duration::from_secs(10), listener.recv())
            .await
            .expect("a notification within 10 s")
            .unwrap();
        got.push(format!("{}:{}", n.channel(), n.payload()));
    }
    r.check(
        "notifications",
        got,
        vec![
            "sx_news:first".to_string(),
            "sx_news:in tx".into(),
            "sx_news:last".into(),
        ],
    );
    let v: i32 = sqlx::query_scalar("SELECT 6")
        .fetch_one(&mut listener)
        .await
        .unwrap();
    r.check("listener queries", v, 6);
    listener.unlisten("sx_news").await.unwrap();
    exec(&mut b, "NOTIFY sx_news, 'after unlisten'").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let late = tokio::time::timeout(Duration::from_millis(300), listener.try_recv()).await;
    r.check(
        "nothing after unlisten",
        matches!(late, Err(_) | Ok(Ok(None))),
        true,
    );
    b.close().await.unwrap();
}

async fn sqlx_cancel(r: &mut Report, c: &mut PgConnection) {
    // sqlx has no CancelRequest: a query future dropped mid-way leaves its answer on the wire,
    // which the next query reads past (to the ReadyForQuery) before its own.
    let started = Instant::now();
    let abandoned = tokio::time::timeout(
        Duration::from_millis(300),
        sqlx::query("SELECT pg_sleep(1.5)").execute(&mut *c),
    )
    .await;
    r.check("query abandoned", abandoned.is_err(), true);
    r.check(
        "usable after abandoning",
        scalar::<String>(c, "SELECT 'after'").await,
        "after".to_string(),
    );
    r.check(
        "drained within 10 s",
        started.elapsed() < Duration::from_secs(10),
        true,
    );
    // statement_timeout: the server cancels itself.
    exec(c, "SET statement_timeout = '200ms'").await;
    r.record(
        "statement timeout",
        error_of(sqlx::query("SELECT pg_sleep(5)").execute(&mut *c).await),
    );
    exec(c, "RESET statement_timeout").await;
}

async fn sqlx_large_result(r: &mut Report, c: &mut PgConnection) {
    let mut rows =
        sqlx::query("SELECT g, md5(g::text) FROM generate_series(1, 100000) g").fetch(&mut *c);
    let (mut n, mut sum, mut last) = (0i64, 0i64, String::new());
    while let Some(row) = rows.try_next().await.unwrap() {
        n += 1;
        sum += i64::from(row.get::<i32, _>(0));
        last = row.get(1);
    }
    drop(rows);
    r.check("large result", (n, sum), (100000, 100000 * 100001 / 2));
    r.record("large result last", last);
    let all = sqlx::query("SELECT g FROM generate_series(1, $1) g")
        .bind(100000i32)
        .fetch_all(&mut *c)
        .await
        .unwrap();
    r.check("large result, all at once", all.len(), 100000);
    r.check(
        "10 MB value",
        scalar::<String>(c, "SELECT repeat('x', 10000000)")
            .await
            .len(),
        10_000_000,
    );
}

async fn sqlx_session(url: String, i: usize) -> String {
    let opts = PgConnectOptions::from_str(&url)
        .unwrap()
        .application_name(&format!("sx-{i}"));
    let mut c = PgConnection::connect_with(&opts).await.unwrap();
    // Every session names its statements sqlx_s_1, ...: the same names, other texts.
    let factor = i % 3 + 2;
    let sql = format!("SELECT $1::int8 * {factor}, current_setting('application_name')");
    for round in 0..5 {
        let x = (i * 10 + round) as i64;
        let row = sqlx::query(&sql).bind(x).fetch_one(&mut c).await.unwrap();
        assert_eq!(
            (row.get::<i64, _>(0), row.get::<String, _>(1)),
            (x * factor as i64, format!("sx-{i}")),
            "session {i} round {round}"
        );
        let mut tx = c.begin().await.unwrap();
        sqlx::query("UPDATE sx_counter SET n = n + 1 WHERE id = $1")
            .bind(1i32)
            .execute(&mut *tx)
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    let name = scalar::<String>(&mut c, "SHOW application_name").await;
    c.close().await.unwrap();
    name
}

async fn sqlx_many_sessions(r: &mut Report, url: &str) {
    let mut admin = connect(url).await;
    exec(&mut admin, "DROP TABLE IF EXISTS sx_counter").await;
    exec(
        &mut admin,
        "CREATE TABLE sx_counter (id int PRIMARY KEY, n int)",
    )
    .await;
    exec(&mut admin, "INSERT INTO sx_counter VALUES (1, 0)").await;
    let tasks: Vec<_> = (0..SESSIONS)
        .map(|i| tokio::spawn(sqlx_session(url.to_string(), i)))
        .collect();
    let mut names = Vec::new();
    for t in tasks {
        names.push(t.await.expect("session task"));
    }
    let want: Vec<String> = (0..SESSIONS).map(|i| format!("sx-{i}")).collect();
    r.check(
        &format!("{SESSIONS} sessions kept their settings"),
        names,
        want,
    );
    r.check(
        &format!("{SESSIONS} sessions counted"),
        scalar::<i32>(&mut admin, "SELECT n FROM sx_counter").await,
        SESSIONS as i32 * 5,
    );
    // A pool, as applications use it.
    let pool = PgPoolOptions::new()
        .max_connections(20)
        .connect(url)
        .await
        .unwrap();
    let queries: Vec<_> = (0..200i32)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move {
                sqlx::query_scalar::<_, i32>("SELECT $1::int4 + 1")
                    .bind(i)
                    .fetch_one(&pool)
                    .await
                    .unwrap()
            })
        })
        .collect();
    let mut got = Vec::new();
    for q in queries {
        got.push(q.await.expect("pool task"));
    }
    r.check("pool", got, (1..=200).collect::<Vec<i32>>());
    pool.close().await;
    exec(&mut admin, "DROP TABLE sx_counter").await;
    admin.close().await.unwrap();
}

/// The sqlx check against one URL; panics on a failure.
pub async fn sqlx_check(url: String) -> Vec<String> {
    let mut r = Report::default();
    let mut c = connect(&url).await;
    exec(&mut c, "DROP TABLE IF EXISTS sx").await;
    exec(&mut c, "CREATE TABLE sx (id int PRIMARY KEY, name text)").await;
    exec(
        &mut c,
        "INSERT INTO sx SELECT g, 'n' || g FROM generate_series(1, 50) g",
    )
    .await;
    sqlx_prepared(&mut r, &mut c).await;
    sqlx_binary(&mut r, &mut c).await;
    sqlx_transactions(&mut r, &mut c).await;
    sqlx_copy(&mut r, &mut c).await;
    sqlx_listen_notify(&mut r, &url).await;
    sqlx_cancel(&mut r, &mut c).await;
    sqlx_large_result(&mut r, &mut c).await;
    sqlx_many_sessions(&mut r, &url).await;
    exec(&mut c, "SET TimeZone = 'Asia/Tokyo'").await;
    r.check(
        "setting kept",
        scalar::<String>(&mut c, "SHOW TimeZone").await,
        "Asia/Tokyo".to_string(),
    );
    exec(&mut c, "DROP TABLE sx").await;
    c.close().await.unwrap();
    r.line("sqlx ok".to_string());
    r.0
}
