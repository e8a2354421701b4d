//! A session's prepared statements are bounded (issue 12 §3): the pooler holds every client's
//! statements (names and texts), so one client preparing without end would grow it without
//! end. Past `--max-session-statement-bytes` a new statement gets SQLSTATE 54000, by protocol
//! `Parse` or SQL `PREPARE`; what the session has keeps working, `DEALLOCATE`/`Close` make room
//! again, a `PREPARE` refused inside a transaction fails that transaction as any failed
//! statement would, other sessions are not touched, and the pooler's memory stays flat however
//! many statements the client goes on sending. Real Postgres 15, pooler and gateway.

use std::time::Duration;

use testkit::{Event, Frontend, PgCluster, RawConn, Tidepool, TidepoolOpts, APP_DB, BOB};

const LIMIT: usize = 256 * 1024;
const WAIT: Duration = Duration::from_secs(20);

fn start(pg: &PgCluster) -> Tidepool {
    let opts = TidepoolOpts::default()
        .pool_size(4)
        .pooler_arg("--max-session-statement-bytes")
        .pooler_arg(LIMIT.to_string());
    Tidepool::start(pg, opts)
}

/// A statement of about `size` bytes of text, distinct for each `i`.
fn big_sql(i: usize, size: usize) -> String {
    format!("SELECT {i} AS n, '{}' AS pad", "x".repeat(size))
}

/// The first ErrorResponse among `events`, as (code, message).
fn error_of(events: &[Event]) -> Option<(String, String)> {
    events.iter().find_map(|e| match e {
        Event::Message(m) => m
            .error()
            .filter(|e| e.severity() == "ERROR")
            .map(|e| (e.code().to_owned(), e.message().to_owned())),
        _ => None,
    })
}

async fn roundtrip(conn: &mut RawConn, f: Frontend) -> Vec<Event> {
    conn.send(f.bytes()).await.expect("send");
    let events = conn.recv_until(b'Z', WAIT).await;
    assert!(
        matches!(events.last(), Some(Event::Message(_))),
        "no ReadyForQuery: {events:?}"
    );
    events
}

async fn select_one(conn: &mut RawConn) -> String {
    format!(
        "{:?}",
        roundtrip(conn, Frontend::new().query("SELECT 1")).await
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sessions_statements_are_bounded_and_the_rest_goes_on() {
    let pg = PgCluster::start();
    let tp = start(&pg);
    let mut a = tp
        .endpoint()
        .raw(BOB.0, BOB.1, APP_DB)
        .await
        .expect("login a");
    let mut other = tp
        .endpoint()
        .raw(BOB.0, BOB.1, APP_DB)
        .await
        .expect("login b");

    // Protocol-level statements of about 4 KiB each until the bound refuses one.
    let mut made = 0;
    let refused = loop {
        assert!(made < 200, "no statement was refused after {made} of 4 KiB");
        let f = Frontend::new()
            .parse(&format!("s{made}"), &big_sql(made, 4000), &[])
            .sync();
        let events = roundtrip(&mut a, f).await;
        if let Some(e) = error_of(&events) {
            break e;
        }
        made += 1;
    };
    assert_eq!(refused.0, "54000", "{refused:?}");
    assert!(
        refused.1.contains("max_session_statement_bytes"),
        "{refused:?}"
    );
    // About LIMIT / 4 KiB of them fit: the bound counts what they hold, not more, not less.
    assert!(
        (40..=64).contains(&made),
        "{made} statements of 4 KiB fit in {LIMIT} bytes"
    );

    // What the session made still works, and so does the session.
    let run = Frontend::new().bind("", "s0", &[]).execute("", 0).sync();
    let events = format!("{:?}", roundtrip(&mut a, run).await);
    assert!(events.contains("DataRow[\"0\""), "{events}");
    assert!(select_one(&mut a).await.contains("DataRow[\"1\"]"));

    // Closing some makes room again.
    let mut close = Frontend::new();
    for i in 0..8 {
        close = close.close_statement(&format!("s{i}"));
    }
    let events = roundtrip(&mut a, close.sync()).await;
    assert_eq!(error_of(&events), None, "{events:?}");
    let events = roundtrip(
        &mut a,
        Frontend::new()
            .parse("again", &big_sql(1000, 4000), &[])
            .sync(),
    )
    .await;
    assert_eq!(error_of(&events), None, "{events:?}");

    // SQL PREPARE meets the same bound; refused inside a transaction, the transaction fails
    // as with any failed statement (25P02 after it), and ROLLBACK ends it.
    let mut sql_made = 0;
    let sql_refused = loop {
        assert!(sql_made < 200, "no PREPARE was refused");
        let q = format!("PREPARE p{sql_made} AS {}", big_sql(sql_made, 4000));
        let events = roundtrip(&mut a, Frontend::new().query(&q)).await;
        if let Some(e) = error_of(&events) {
            break e;
        }
        sql_made += 1;
    };
    assert_eq!(sql_refused.0, "54000", "{sql_refused:?}");
    let events = roundtrip(&mut a, Frontend::new().query("BEGIN")).await;
    assert_eq!(error_of(&events), None, "{events:?}");
    let q = format!("PREPARE intx AS {}", big_sql(1, 4000));
    let events = roundtrip(&mut a, Frontend::new().query(&q)).await;
    assert_eq!(error_of(&events).map(|e| e.0), Some("54000".into()));
    assert!(
        format!("{events:?}").ends_with("ReadyForQuery(E)]"),
        "{events:?}"
    );
    let events = roundtrip(&mut a, Frontend::new().query("SELECT 1")).await;
    assert_eq!(error_of(&events).map(|e| e.0), Some("25P02".into()));
    let events = format!(
        "{:?}",
        roundtrip(&mut a, Frontend::new().query("ROLLBACK")).await
    );
    assert!(events.ends_with("ReadyForQuery(I)]"), "{events}");
    // DEALLOCATE makes room for SQL PREPARE too.
    roundtrip(&mut a, Frontend::new().query("DEALLOCATE p0")).await;
    let q = format!("PREPARE p0 AS {}", big_sql(0, 100));
    let events = roundtrip(&mut a, Frontend::new().query(&q)).await;
    assert_eq!(error_of(&events), None, "{events:?}");

    // The other session is untouched: it prepares and runs as usual.
    let f = Frontend::new()
        .parse("mine", "SELECT $1::int + 1", &[23])
        .bind("", "mine", &[Some(b"41")])
        .execute("", 0)
        .sync();
    let events = format!("{:?}", roundtrip(&mut other, f).await);
    assert!(events.contains("DataRow[\"42\"]"), "{events}");

    // However many more the client sends, the pooler does not grow with them: 32 MiB of
    // statements refused in batches (without the bound it would keep them all).
    let pooler = tp.pooler_pid();
    let before = testkit::process::rss_kib(pooler);
    for batch in 0..32 {
        let mut f = Frontend::new();
        for i in 0..32 {
            let n = 10_000 + batch * 32 + i;
            f = f
                .parse(&format!("flood{n}"), &big_sql(n, 32 * 1024), &[])
                .sync();
        }
        a.send(f.bytes()).await.expect("send flood");
        for _ in 0..32 {
            let events = a.recv_until(b'Z', WAIT).await;
            assert_eq!(
                error_of(&events).map(|e| e.0),
                Some("54000".into()),
                "{events:?}"
            );
        }
    }
    let grown = testkit::process::rss_kib(pooler).saturating_sub(before);
    assert!(
        grown < 12 * 1024,
        "the pooler grew {grown} KiB while 32 MiB of statements were refused"
    );
    assert!(select_one(&mut a).await.contains("DataRow[\"1\"]"));
    assert!(select_one(&mut other).await.contains("DataRow[\"1\"]"));
}
