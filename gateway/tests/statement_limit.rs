//! A session's prepared statements are bounded (issue 12 §3): the pooler holds every client's
//! statements (names and texts), so one client preparing without end would grow it without
//! end. Past `--max-session-statement-bytes` a new statement gets SQLSTATE 54000, by protocol
//! `Parse` or SQL `PREPARE`; what the session has keeps working, `DEALLOCATE`/`Close` make room
//! again, a `PREPARE` refused inside a transaction fails that transaction as any failed
//! statement would, other sessions are not touched, and the pooler's memory stays flat however
//! many statements the client goes on sending. All sessions of one user together are bounded
//! too (`--max-user-statement-bytes`), with the same error naming that bound, freed when a
//! session ends. Real Postgres 15, pooler and gateway.

use std::time::{Duration, Instant};

use testkit::{Event, Frontend, PgCluster, RawConn, Tidepool, TidepoolOpts, ALICE, APP_DB, BOB};

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

/// Prepares statements of about 4 KiB in `conn` named `{prefix}{i}` until one is refused or
/// `up_to` are made; returns how many were made and the refusal.
async fn prepare_until_refused(
    conn: &mut RawConn,
    prefix: &str,
    up_to: usize,
) -> (usize, Option<(String, String)>) {
    for made in 0..up_to {
        let f = Frontend::new()
            .parse(&format!("{prefix}{made}"), &big_sql(made, 4000), &[])
            .sync();
        if let Some(e) = error_of(&roundtrip(conn, f).await) {
            return (made, Some(e));
        }
    }
    (up_to, None)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_sessions_are_bounded_together() {
    const USER_LIMIT: usize = 192 * 1024;
    let pg = PgCluster::start();
    let opts = TidepoolOpts::default()
        .pool_size(4)
        .pooler_arg("--max-session-statement-bytes")
        .pooler_arg(LIMIT.to_string())
        .pooler_arg("--max-user-statement-bytes")
        .pooler_arg(USER_LIMIT.to_string());
    let tp = Tidepool::start(&pg, opts);
    let ep = tp.endpoint();
    let mut a = ep.raw(BOB.0, BOB.1, APP_DB).await.expect("login a");
    let mut b = ep.raw(BOB.0, BOB.1, APP_DB).await.expect("login b");
    let mut alice = ep.raw(ALICE.0, ALICE.1, APP_DB).await.expect("login alice");

    // Half the session bound in the first session: all made.
    let (made, refused) = prepare_until_refused(&mut a, "a", 30).await;
    assert_eq!((made, &refused), (30, &None));
    // The second session of the same user stops at the user's bound, well inside its own.
    let (made, refused) = prepare_until_refused(&mut b, "b", 60).await;
    let refused = refused.unwrap_or_else(|| panic!("60 more statements of 4 KiB fit"));
    assert_eq!(refused.0, "54000", "{refused:?}");
    assert!(
        refused.1.contains("max_user_statement_bytes"),
        "{refused:?}"
    );
    assert!(
        (40..=50).contains(&(30 + made)),
        "{} statements of 4 KiB fit in the user's {USER_LIMIT} bytes",
        30 + made
    );
    // SQL PREPARE meets the same bound, and the session goes on.
    let q = format!("PREPARE over AS {}", big_sql(1, 4000));
    let events = roundtrip(&mut b, Frontend::new().query(&q)).await;
    let e = error_of(&events).expect("PREPARE past the user's bound refused");
    assert_eq!(e.0, "54000", "{e:?}");
    assert!(e.1.contains("max_user_statement_bytes"), "{e:?}");
    assert!(select_one(&mut b).await.contains("DataRow[\"1\"]"));

    // Another user is not touched by bob's bound.
    let (made, refused) = prepare_until_refused(&mut alice, "c", 40).await;
    assert_eq!((made, &refused), (40, &None));

    // The first session ends: its statements no longer count, and the second prepares again.
    drop(a);
    let t = Instant::now();
    loop {
        let f = Frontend::new()
            .parse("after", &big_sql(7, 4000), &[])
            .sync();
        match error_of(&roundtrip(&mut b, f).await) {
            None => break,
            Some(e) if t.elapsed() < WAIT => {
                assert_eq!(e.0, "54000", "{e:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Some(e) => panic!(
                "still refused {:?} after the other session ended: {e:?}",
                t.elapsed()
            ),
        }
    }
    let (made, refused) = prepare_until_refused(&mut b, "more", 20).await;
    assert_eq!((made, &refused), (20, &None));
}
