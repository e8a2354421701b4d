//! Robustness: what hostile, broken or unlucky clients and servers do to Tidepool.
//!
//! - pathological input (deep nesting, oversized and malformed messages, bad startup packets,
//!   NULs and invalid UTF-8) never crashes or stalls a core, and gets what Postgres answers;
//! - clients that vanish (before login, mid-query, mid-COPY) leave no busy backend behind;
//! - a Postgres restart under a running pooler and gateway;
//! - a CancelRequest landing on another gateway process sharing the port;
//! - backend budgets (`--pool-size`, `--max-backends`) under many sessions and two users;
//! - startup settings (`options`, `application_name`), valid and invalid.
//!
//! Where Postgres defines the answer, each case is run directly first and the gateway must say
//! the same. Every wait is bounded: a stall fails the test with the logs, never hangs it.

mod common;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use testkit::process::rss_kib;
use testkit::sockets::accepted_by;
use testkit::{
    ConnectError, Endpoint, Event, Frontend, PgCluster, RawConn, ServerError, Tidepool,
    TidepoolOpts, ALICE, APP_DB, BOB,
};
use tokio::net::TcpStream;
use tokio_postgres::NoTls;

/// Every async test body runs under a deadline.
async fn bounded<T>(limit: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("test exceeded {limit:?}"))
}

fn start(opts: TidepoolOpts) -> (PgCluster, Tidepool) {
    let pg = PgCluster::start();
    let tp = Tidepool::start(&pg, opts);
    (pg, tp)
}

fn sqlstate(e: &tokio_postgres::Error) -> String {
    e.code()
        .map(|c| c.code().to_string())
        .unwrap_or_else(|| format!("<no SQLSTATE: {e}>"))
}

/// A line of the report a run prints (`cargo test -- --nocapture` shows it).
fn report(test: &str, line: impl AsRef<str>) {
    eprintln!("[robustness::{test}] {}", line.as_ref());
}

/// The errors among `events`.
fn errors(events: &[Event]) -> Vec<ServerError> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) if m.tag == b'E' => m.error(),
            _ => None,
        })
        .collect()
}

fn ends_closed(events: &[Event]) -> bool {
    matches!(events.last(), Some(Event::Closed(_)))
}

fn rendered(events: &[Event]) -> Vec<String> {
    events.iter().map(|e| format!("{e:?}")).collect()
}

/// Tidepool is alive and serves new sessions: several at once (so that each gateway core gets
/// one, whichever the kernel picks), each logging in and running `SELECT 1` within 10 s (SCRAM
/// in a debug build on a loaded machine is slow; a stalled core never answers at all).
async fn still_serves(tp: &mut Tidepool, after: &str) {
    assert!(tp.alive(), "Tidepool died after {after}\n{}", tp.logs());
    let ep = tp.endpoint();
    let attempts: Vec<_> = (0..8)
        .map(|_| {
            let ep = ep.clone();
            tokio::spawn(async move {
                tokio::time::timeout(Duration::from_secs(10), async {
                    let c = ep.connect(ALICE.0, ALICE.1, APP_DB).await?;
                    c.query_one("SELECT 1", &[])
                        .await
                        .map(|r| r.get::<_, i32>(0))
                })
                .await
            })
        })
        .collect();
    for a in attempts {
        match a.await.expect("probe task") {
            Ok(Ok(1)) => {}
            Ok(other) => panic!(
                "after {after}: a new session fails: {other:?}\n{}",
                tp.logs()
            ),
            Err(_) => panic!(
                "after {after}: a new session got no answer within 10 s (a stalled core?)\n{}",
                tp.logs()
            ),
        }
    }
    assert!(tp.alive(), "Tidepool died after {after}\n{}", tp.logs());
}

/// Sends `msgs` on `conn` and reads up to ReadyForQuery (or a close, or `timeout`).
async fn exchange(conn: &mut RawConn, msgs: &Frontend, timeout: Duration) -> Vec<Event> {
    if let Err(e) = conn.send(msgs.bytes()).await {
        return vec![Event::Closed(format!("send: {e}"))];
    }
    conn.recv_until(b'Z', timeout).await
}

async fn login(ep: &Endpoint) -> RawConn {
    ep.raw(ALICE.0, ALICE.1, APP_DB)
        .await
        .unwrap_or_else(|e| panic!("login at {ep:?}: {e}"))
}

/// The same `SELECT` on both connections gives the same rows: the sessions go on.
async fn both_still_usable(direct: &mut RawConn, through: &mut RawConn, after: &str) {
    let q = Frontend::new().query("SELECT 'still here', 1 + 1");
    let want = rendered(&exchange(direct, &q, Duration::from_secs(10)).await);
    let got = rendered(&exchange(through, &q, Duration::from_secs(10)).await);
    assert!(
        want.iter().any(|l| l.contains("still here")),
        "direct session after {after}: {want:?}"
    );
    assert_eq!(want, got, "the session after {after}");
}

// ---------------------------------------------------------------------------------------------
// 1. Pathological input
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deeply_nested_statements_get_the_postgres_error_and_the_session_goes_on() {
    let (pg, mut tp) = start(TidepoolOpts::default());
    let parens = format!("SELECT {}1{}", "(".repeat(100_000), ")".repeat(100_000));
    let sum = format!("SELECT 1{}", "+1".repeat(49_999));
    let cases = [
        ("100k parentheses", parens.clone()),
        ("a 50k-term sum", sum.clone()),
        (
            "100k parentheses in a multi-statement string",
            format!("SELECT 1; {parens}; SELECT 2"),
        ),
        (
            "a 50k-term sum in a multi-statement string",
            format!("SELECT 1; {sum}; SELECT 2"),
        ),
        (
            // Under the classifier's 64 KiB limit: the gateway gives this one to pg_query.
            "a 30k-term sum in a multi-statement string",
            format!("SELECT 1; SELECT 1{}; SELECT 2", "+1".repeat(29_999)),
        ),
        (
            "100k parentheses in a Parse",
            String::new(), // extended protocol, below
        ),
    ];
    bounded(Duration::from_secs(240), async {
        let mut direct = login(&pg.direct()).await;
        let mut through = login(&tp.endpoint()).await;
        for (name, sql) in &cases {
            let msgs = if sql.is_empty() {
                Frontend::new().run(&parens, &[]).sync()
            } else {
                Frontend::new().query(sql)
            };
            let t = Instant::now();
            let want = exchange(&mut direct, &msgs, Duration::from_secs(60)).await;
            let direct_took = t.elapsed();
            let t = Instant::now();
            let got = exchange(&mut through, &msgs, Duration::from_secs(60)).await;
            let through_took = t.elapsed();
            let codes = |ev: &[Event]| {
                errors(ev)
                    .iter()
                    .map(|e| e.code().to_string())
                    .collect::<Vec<_>>()
            };
            report(
                "deep",
                format!(
                    "{name}: direct {:?} in {direct_took:?}, through {:?} in {through_took:?}",
                    codes(&want),
                    codes(&got)
                ),
            );
            assert_eq!(
                rendered(&want),
                rendered(&got),
                "{name}: the gateway answers differently from Postgres\n{}",
                tp.logs()
            );
            both_still_usable(&mut direct, &mut through, name).await;
            still_serves(&mut tp, name).await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_over_max_message_size_is_refused_with_fatal_and_closed() {
    const LIMIT: usize = 1 << 20;
    let (_pg, mut tp) = start(
        TidepoolOpts::default()
            .gateway_arg("--max-message-size")
            .gateway_arg(LIMIT.to_string()),
    );
    bounded(Duration::from_secs(60), async {
        let ep = tp.endpoint();
        let bystander = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        // Just under the limit is fine.
        let near = format!("SELECT length('{}')", "x".repeat(LIMIT - 100));
        let mut conn = login(&ep).await;
        let q = Frontend::new().query(&near);
        let events = exchange(&mut conn, &q, Duration::from_secs(20)).await;
        assert!(
            rendered(&events)
                .iter()
                .any(|l| l.contains(&format!("\"{}\"", LIMIT - 100))),
            "a query of {} bytes (under the limit): {events:?}\n{}",
            near.len(),
            tp.logs()
        );
        for round in 0..3 {
            let huge = Frontend::new().query(&format!("SELECT '{}'", "y".repeat(2 << 20)));
            let mut conn = login(&ep).await;
            let t = Instant::now();
            let (sent, events) = conn
                .send_while_reading(huge.bytes(), b'Z', Duration::from_secs(10))
                .await;
            report(
                "oversized",
                format!(
                    "round {round}: write {sent:?}; read {:?} in {:?}",
                    rendered(&events),
                    t.elapsed()
                ),
            );
            assert!(
                !matches!(events.last(), Some(Event::Timeout)),
                "round {round}: 2 MiB over a 1 MiB limit: no answer within 10 s: {events:?}\n{}",
                tp.logs()
            );
            let errs = errors(&events);
            assert!(
                errs.iter()
                    .any(|e| e.severity() == "FATAL" && matches!(e.code(), "54000" | "08P01")),
                "round {round}: expected FATAL 54000 or 08P01, got {events:?}\n{}",
                tp.logs()
            );
            assert!(
                ends_closed(&events),
                "round {round}: the connection stays open: {events:?}"
            );
        }
        let n: i32 = bystander
            .query_one("SELECT 41 + 1", &[])
            .await
            .expect("another session is unaffected")
            .get(0);
        assert_eq!(n, 42);
        still_serves(&mut tp, "oversized messages").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nul_bytes_and_invalid_utf8_get_the_postgres_answer() {
    let (pg, mut tp) = start(TidepoolOpts::default());
    let cases: Vec<(&str, Frontend)> = vec![
        (
            "a NUL inside a string literal",
            Frontend::new().query_bytes(b"SELECT 'a\0b'"),
        ),
        (
            "a NUL between statements",
            Frontend::new().query_bytes(b"SELECT 1\0; SELECT 2"),
        ),
        ("only a NUL", Frontend::new().query_bytes(b"\0")),
        (
            "a Query without its terminating NUL",
            Frontend::new().message(b'Q', b"SELECT 1"),
        ),
        (
            "invalid UTF-8 in a literal",
            Frontend::new().query_bytes(b"SELECT '\xff\xfe'"),
        ),
        (
            "invalid UTF-8 in an identifier",
            Frontend::new().query_bytes(b"SELECT 1 AS \xc3\x28"),
        ),
        (
            "invalid UTF-8 in a multi-statement string",
            Frontend::new()
                .query_bytes(b"SELECT 1; SET application_name = '\xe2\x28\xa1'; SELECT 2"),
        ),
        (
            "invalid UTF-8 in a SET",
            Frontend::new().query_bytes(b"SET application_name = '\xff'"),
        ),
        (
            "invalid UTF-8 in a Parse",
            Frontend::new()
                .message(b'P', b"\0SELECT '\xff'\0\0\0")
                .bind("", "", &[])
                .execute("", 0)
                .sync(),
        ),
        (
            "invalid UTF-8 in a Bind parameter",
            Frontend::new()
                .parse("", "SELECT $1::text", &[])
                .bind("", "", &[Some(b"\xff\xfe".as_slice())])
                .execute("", 0)
                .sync(),
        ),
        (
            "a NUL in a Bind parameter",
            Frontend::new()
                .parse("", "SELECT $1::text", &[])
                .bind("", "", &[Some(b"a\0b".as_slice())])
                .execute("", 0)
                .sync(),
        ),
    ];
    bounded(Duration::from_secs(120), async {
        let mut direct = login(&pg.direct()).await;
        let mut through = login(&tp.endpoint()).await;
        for (name, msgs) in &cases {
            let want = rendered(&exchange(&mut direct, msgs, Duration::from_secs(10)).await);
            let got = rendered(&exchange(&mut through, msgs, Duration::from_secs(10)).await);
            report("encoding", format!("{name}: direct {want:?}"));
            assert_eq!(want, got, "{name}\n{}", tp.logs());
            if want.last().is_some_and(|l| l.starts_with("ReadyForQuery")) {
                both_still_usable(&mut direct, &mut through, name).await;
            } else {
                direct = login(&pg.direct()).await;
                through = login(&tp.endpoint()).await;
            }
        }
        still_serves(&mut tp, "NULs and invalid UTF-8").await;
    })
    .await;
}

/// What happens to a connection after `msgs`: messages up to ReadyForQuery or a close, or a
/// timeout after 5 s.
async fn after_sending(conn: &mut RawConn, msgs: &Frontend) -> Vec<Event> {
    let mut events = exchange(conn, msgs, Duration::from_secs(5)).await;
    if matches!(events.last(), Some(Event::Message(m)) if m.tag == b'Z') {
        // Whatever follows a ReadyForQuery (a FATAL for a later message of the batch).
        events.extend(conn.recv_idle(Duration::from_millis(500)).await);
    }
    events
}

/// The gateway's answer to a broken message: Postgres's ErrorResponse when Postgres sends one;
/// when Postgres only hangs up (it logs `invalid message length` as COMMERROR, unseen by the
/// client) a FATAL 08P01 or a plain close. Never silence on an open connection. Returns what
/// is wrong, if anything.
fn check_refusal(test: &str, name: &str, want: &[Event], got: &[Event]) -> Option<String> {
    report(test, format!("{name}: direct {want:?}"));
    report(test, format!("{name}: through {got:?}"));
    let versus = format!("\n  direct:  {want:?}\n  through: {got:?}");
    if matches!(got.last(), Some(Event::Timeout)) {
        return Some(format!(
            "{name}: the gateway neither answered nor closed within 5 s{versus}"
        ));
    }
    let want_codes: Vec<String> = errors(want).iter().map(|e| e.code().to_string()).collect();
    let got_codes: Vec<String> = errors(got).iter().map(|e| e.code().to_string()).collect();
    if want_codes.is_empty() && !got_codes.iter().all(|c| c == "08P01") {
        return Some(format!(
            "{name}: Postgres just closes; the gateway says something else{versus}"
        ));
    }
    if !want_codes.is_empty() && want_codes != got_codes {
        return Some(format!(
            "{name}: SQLSTATE {got_codes:?} where Postgres says {want_codes:?}{versus}"
        ));
    }
    if ends_closed(want) != ends_closed(got) {
        return Some(format!(
            "{name}: Postgres {} the connection, the gateway {}{versus}",
            if ends_closed(want) { "closes" } else { "keeps" },
            if ends_closed(got) {
                "closes it"
            } else {
                "keeps it"
            },
        ));
    }
    None
}

/// Problems found by a test that checks every case before failing, so that one run shows them
/// all.
#[derive(Default)]
struct Failures(Vec<String>);

impl Failures {
    fn add(&mut self, problem: Option<String>) {
        if let Some(p) = problem {
            report("FAILURE", &p);
            self.0.push(p);
        }
    }

    fn check(self, tp: &Tidepool) {
        assert!(
            self.0.is_empty(),
            "{} case(s) failed:\n- {}\n{}",
            self.0.len(),
            self.0.join("\n- "),
            tp.logs()
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_messages_after_login_are_refused_and_never_hang() {
    // One backend: a broken message must not hurt the next session that gets it.
    let (pg, mut tp) = start(TidepoolOpts::default().pool_size(1));
    let cases: Vec<(&str, Frontend)> = vec![
        (
            "a negative length",
            Frontend::new().raw(b"Q\xff\xff\xff\xf0SELECT 1\0"),
        ),
        ("length 3 (< 4)", Frontend::new().raw(b"Q\x00\x00\x00\x03")),
        ("length 0", Frontend::new().raw(b"Q\x00\x00\x00\x00")),
        (
            "an unknown message type",
            Frontend::new().message(b'z', b""),
        ),
        (
            "an unknown message type with a body",
            Frontend::new().message(b'@', b"hello\0"),
        ),
        (
            "an unknown message type after a query",
            Frontend::new().query("SELECT 1").message(b'z', b""),
        ),
        (
            "a startup packet after login",
            Frontend::new().startup(&[("user", "alice")]),
        ),
        (
            "a truncated Bind",
            Frontend::new().message(b'B', b"\0").sync(),
        ),
        (
            "a truncated Parse",
            Frontend::new().message(b'P', b"s1").sync(),
        ),
        (
            "a truncated Execute",
            Frontend::new().message(b'E', b"\0\0").sync(),
        ),
        (
            "a Describe of an unknown kind",
            Frontend::new().message(b'D', b"Xname\0").sync(),
        ),
        (
            "CopyData outside COPY",
            Frontend::new().copy_data(b"1\n").query("SELECT 1"),
        ),
        (
            "CopyDone outside COPY",
            Frontend::new().copy_done().query("SELECT 1"),
        ),
    ];
    let mut failures = Failures::default();
    bounded(Duration::from_secs(180), async {
        let ep = tp.endpoint();
        // A bystander on the only backend's pool: it must never see another session's error.
        let mut bystander = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        for (name, msgs) in &cases {
            let mut direct = login(&pg.direct()).await;
            let mut through = login(&ep).await;
            let want = after_sending(&mut direct, msgs).await;
            let got = after_sending(&mut through, msgs).await;
            let mut problem = check_refusal("malformed", name, &want, &got);
            if matches!(got.last(), Some(Event::Timeout)) {
                // What the silent session does next, for the report.
                let next = exchange(
                    &mut through,
                    &Frontend::new().query("SELECT 'next query'"),
                    Duration::from_secs(5),
                )
                .await;
                if let Some(p) = problem.as_mut() {
                    p.push_str(&format!("\n  then a query on it: {next:?}"));
                }
            }
            let usable = problem.is_none() && !ends_closed(&want);
            failures.add(problem);
            if usable {
                both_still_usable(&mut direct, &mut through, name).await;
            }
            for i in 0..5 {
                let r = tokio::time::timeout(
                    Duration::from_secs(10),
                    bystander.query_one("SELECT 'bystander'", &[]),
                )
                .await;
                if !matches!(r, Ok(Ok(_))) {
                    failures.add(Some(format!(
                        "after {name}: a bystander session's query {i} fails: {r:?}"
                    )));
                    bystander = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
                }
            }
            still_serves(&mut tp, name).await;
        }
    })
    .await;
    failures.check(&tp);
}

/// A client disappears: a plain close (FIN), or with `reset` an RST as when its process is
/// killed with unread data or its machine is gone.
fn vanish(c: RawConn, reset: bool) {
    if reset {
        c.abort()
    } else {
        drop(c)
    }
}

/// Opens a bare TCP connection, writes `bytes`, and reads until a close or 5 s pass.
async fn startup_exchange(ep: &Endpoint, bytes: &[u8]) -> Vec<Event> {
    let mut conn = ep.raw_tcp().await.expect("TCP connect");
    if let Err(e) = conn.send(bytes).await {
        return vec![Event::Closed(format!("send: {e}"))];
    }
    // 0 is never a message type: read until the server closes (or the timeout).
    conn.recv_until(0, Duration::from_secs(5)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_startup_packets_are_refused_and_closed() {
    let (pg, mut tp) = start(TidepoolOpts::default());
    let mut long_startup = Frontend::new()
        .startup(&[
            ("user", "alice"),
            ("database", "app"),
            ("application_name", &"a".repeat(10_100)),
        ])
        .bytes()
        .to_vec();
    let huge_len = long_startup.len();
    let cases: Vec<(String, Vec<u8>)> = vec![
        (
            "HTTP instead of Postgres".into(),
            b"GET / HTTP/1.1\r\nHost: db\r\n\r\n".to_vec(),
        ),
        ("a length of 4".into(), vec![0, 0, 0, 4]),
        (
            "a negative length".into(),
            vec![0xff, 0xff, 0xff, 0xff, 0, 3, 0, 0],
        ),
        (
            "an unknown protocol code".into(),
            vec![0, 0, 0, 8, 0x12, 0x34, 0x56, 0x78],
        ),
        (
            "protocol 2.0".into(),
            Frontend::new()
                .raw(&[0, 0, 0, 9, 0, 2, 0, 0, 0])
                .bytes()
                .to_vec(),
        ),
        ("protocol 4.0".into(), vec![0, 0, 0, 9, 0, 4, 0, 0, 0]),
        (
            format!("a startup packet of {huge_len} bytes (> 10000)"),
            std::mem::take(&mut long_startup),
        ),
        ("a startup packet without its final terminator".into(), {
            let mut p = vec![0, 0, 0, 0, 0, 3, 0, 0];
            p.extend_from_slice(b"user\0alice\0database\0app");
            let n = p.len() as i32;
            p[..4].copy_from_slice(&n.to_be_bytes());
            p
        }),
        (
            "a startup packet without a user".into(),
            Frontend::new()
                .startup(&[("database", "app")])
                .bytes()
                .to_vec(),
        ),
        (
            "a CancelRequest with a short body".into(),
            vec![0, 0, 0, 12, 0x04, 0xd2, 0x16, 0x2e, 0, 0, 0, 1],
        ),
        (
            "a CancelRequest with unknown keys".into(),
            Frontend::new().cancel_request(12345, 678).bytes().to_vec(),
        ),
        (
            "garbage bytes".into(),
            (0..64u8)
                .map(|i| i.wrapping_mul(37).wrapping_add(11))
                .collect(),
        ),
    ];
    let mut failures = Failures::default();
    bounded(Duration::from_secs(120), async {
        for (name, bytes) in &cases {
            let want = startup_exchange(&pg.direct(), bytes).await;
            let got = startup_exchange(&tp.endpoint(), bytes).await;
            failures.add(check_refusal("startup", name, &want, &got));
            still_serves(&mut tp, name).await;
        }
    })
    .await;
    failures.check(&tp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_vanish_before_login_leave_nothing_behind() {
    // Few client slots: a slot leaked by a vanished client would show as 53300 below.
    const MAX_CLIENTS: usize = 10;
    let (pg, mut tp) = start(
        TidepoolOpts::default()
            .gateway_arg("--max-clients")
            .gateway_arg(MAX_CLIENTS.to_string()),
    );
    bounded(Duration::from_secs(120), async {
        let ep = tp.endpoint();
        let startup = Frontend::new().startup(&[("user", "alice"), ("database", "app")]);
        for round in 0..30 {
            // Connects and sends nothing.
            let c = ep.raw_tcp().await.unwrap();
            vanish(c, round % 2 == 1);
            // Half a startup packet.
            let mut c = ep.raw_tcp().await.unwrap();
            c.send(&startup.bytes()[..startup.bytes().len() / 2])
                .await
                .unwrap();
            vanish(c, round % 2 == 1);
            // Just the length word.
            let mut c = ep.raw_tcp().await.unwrap();
            c.send(&startup.bytes()[..3]).await.unwrap();
            drop(c);
            // Mid-authentication: after the server's SASL request.
            let mut c = ep.raw_tcp().await.unwrap();
            c.send(startup.bytes()).await.unwrap();
            let m = c
                .recv_within(Duration::from_secs(5))
                .await
                .unwrap_or_else(|e| {
                    panic!(
                        "round {round}: no authentication request: {e}\n{}",
                        tp.logs()
                    )
                });
            assert_eq!(m.tag, b'R', "round {round}: {m:?}");
            vanish(c, round % 2 == 1);
        }
        // MAX_CLIENTS sessions at once still get in (slots come back as the gateway notices the
        // closes, so allow it a moment).
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut clients = Vec::new();
        while clients.len() < MAX_CLIENTS {
            match ep.connect(ALICE.0, ALICE.1, APP_DB).await {
                Ok(c) => clients.push(c),
                Err(e) if sqlstate(&e) == "53300" && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!(
                    "session {} of {MAX_CLIENTS}: {e} (slots leaked by vanished clients?)\n{}",
                    clients.len() + 1,
                    tp.logs()
                ),
            }
        }
        for c in &clients {
            c.query_one("SELECT 1", &[]).await.unwrap();
        }
        drop(clients);
        tokio::time::sleep(Duration::from_millis(300)).await;
        let states = pg.backend_states(ALICE.0);
        assert!(
            states.iter().all(|s| s == "idle"),
            "alice's backends: {states:?}"
        );
        still_serves(&mut tp, "clients vanishing before login").await;
    })
    .await;
}

/// `rounds` × `parallel` sessions, each logging in, running one query and leaving.
async fn churn(ep: &Endpoint, rounds: usize, parallel: usize) {
    let tasks: Vec<_> = (0..parallel)
        .map(|_| {
            let ep = ep.clone();
            tokio::spawn(async move {
                for _ in 0..rounds {
                    // bob's verifier is md5: logins cheap for the client, even in a debug build.
                    let mut c = ep.raw(BOB.0, BOB.1, APP_DB).await.unwrap();
                    let got = exchange(
                        &mut c,
                        &Frontend::new().query("SELECT 1"),
                        Duration::from_secs(10),
                    )
                    .await;
                    assert!(errors(&got).is_empty(), "{got:?}");
                    let _ = c.send(Frontend::new().message(b'X', &[]).bytes()).await;
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
}

/// Sessions that come and go leave nothing behind in either process. Every session used to
/// leave its waker (and with it its ended task's memory) on its core's drain notify until the
/// next drain: about 1.5 KiB per session ever served, and a longer list for every session to
/// scan (`shared::io::Broadcast`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_that_come_and_go_leave_no_memory_behind() {
    const PARALLEL: usize = 16;
    let (_pg, mut tp) = start(TidepoolOpts {
        auth_method: Some("md5".into()),
        ..TidepoolOpts::default()
    });
    bounded(Duration::from_secs(300), async {
        let ep = tp.endpoint();
        // Warm-up: buffers, pools and the allocator's arenas at their working size.
        churn(&ep, 100, PARALLEL).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let before = (rss_kib(tp.gateway_pid()), rss_kib(tp.pooler_pid()));
        churn(&ep, 400, PARALLEL).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let after = (rss_kib(tp.gateway_pid()), rss_kib(tp.pooler_pid()));
        let sessions = 400 * PARALLEL;
        let grew = (after.0.saturating_sub(before.0), after.1.saturating_sub(before.1));
        report(
            "sessions_that_come_and_go_leave_no_memory_behind",
            format!(
                "{sessions} sessions after a warm-up of {}: gateway {} → {} KiB, pooler {} → {} KiB",
                100 * PARALLEL,
                before.0,
                after.0,
                before.1,
                after.1
            ),
        );
        // Under 96 bytes a session in each (a leak of 170 bytes a session, the pooler's before,
        // is 1.1 MiB here); what the allocator keeps of its working set moves by far less
        // once warm (0.1–0.2 MiB).
        let limit = (sessions as u64 * 96) >> 10;
        assert!(
            grew.0 < limit && grew.1 < limit,
            "after {sessions} sessions came and went, the gateway grew {} KiB and the pooler {} KiB (limit {limit} KiB each)",
            grew.0,
            grew.1
        );
        still_serves(&mut tp, "sessions coming and going").await;
    })
    .await;
}

/// Waits until every backend of `user` is idle (none `active`, none `idle in transaction`)
/// and there are at most `max` of them; panics after `within` with what it saw.
async fn backends_settle(
    pg: &PgCluster,
    tp: &Tidepool,
    user: &str,
    max: usize,
    within: Duration,
    after: &str,
) -> Duration {
    let t = Instant::now();
    loop {
        let pg2 = pg.clone();
        let u = user.to_string();
        let states = tokio::task::spawn_blocking(move || pg2.backend_states(&u))
            .await
            .expect("backend states");
        if states.len() <= max && states.iter().all(|s| s == "idle") {
            return t.elapsed();
        }
        if t.elapsed() > within {
            panic!(
                "after {after}: {user}'s backends did not settle to at most {max} idle \
                 within {within:?}: {states:?}\n{}",
                tp.logs()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_for_query(pg: &PgCluster, user: &str, needle: &str) {
    wait_for_queries(pg, user, &[needle]).await
}

/// Waits until a backend of `user` runs each of `needles` at the same moment (one sample).
async fn wait_for_queries(pg: &PgCluster, user: &str, needles: &[&str]) {
    let t = Instant::now();
    loop {
        let pg2 = pg.clone();
        let u = user.to_string();
        let states = tokio::task::spawn_blocking(move || pg2.backend_states(&u))
            .await
            .expect("backend states");
        let running = |needle: &str| {
            states
                .iter()
                .any(|s| s.starts_with("active") && s.contains(needle))
        };
        if needles.iter().all(|n| running(n)) {
            return;
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{needles:?} never ran together: {states:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_gone_mid_query_or_mid_copy_leaves_no_busy_backend() {
    let (pg, mut tp) = start(TidepoolOpts::default().pool_size(1));
    bounded(Duration::from_secs(180), async {
        let ep = tp.endpoint();
        let setup = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        setup
            .batch_execute("CREATE TABLE copy_gone (x int)")
            .await
            .unwrap();
        drop(setup);
        for (round, reset) in [(0, false), (1, true)] {
            let how = if reset { "reset" } else { "close" };

            // Mid-query.
            let mut a = login(&ep).await;
            a.send(Frontend::new().query("SELECT pg_sleep(5)").bytes())
                .await
                .unwrap();
            wait_for_query(&pg, ALICE.0, "pg_sleep(5)").await;
            vanish(a, reset);
            let t = Instant::now();
            let b = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
            let r =
                tokio::time::timeout(Duration::from_secs(10), b.query_one("SELECT 1", &[])).await;
            assert!(
                matches!(r, Ok(Ok(_))),
                "round {round}: after a client gone mid-query ({how}), a new session: {r:?}\n{}",
                tp.logs()
            );
            let served = t.elapsed();
            let during = pg.backend_states(ALICE.0);
            drop(b);
            let within = Duration::from_secs(15);
            let settled =
                backends_settle(&pg, &tp, ALICE.0, 1, within, "a client gone mid-query").await;
            report(
                "vanish",
                format!(
                    "mid-query ({how}): next session served after {served:?}; \
                     backends then {during:?}; all idle after {settled:?}"
                ),
            );

            // Mid-COPY FROM STDIN, in a transaction that inserted a row first.
            let mut a = login(&ep).await;
            let events = exchange(
                &mut a,
                &Frontend::new().query("BEGIN; INSERT INTO copy_gone VALUES (100)"),
                Duration::from_secs(5),
            )
            .await;
            assert!(
                rendered(&events)
                    .last()
                    .is_some_and(|l| l == "ReadyForQuery(T)"),
                "{events:?}"
            );
            a.send(Frontend::new().query("COPY copy_gone FROM STDIN").bytes())
                .await
                .unwrap();
            let events = a.recv_until(b'G', Duration::from_secs(5)).await;
            assert!(
                matches!(events.last(), Some(Event::Message(m)) if m.tag == b'G'),
                "no CopyInResponse: {events:?}"
            );
            a.send(Frontend::new().copy_data(b"1\n2\n3\n").bytes())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(100)).await;
            vanish(a, reset);
            let settled =
                backends_settle(&pg, &tp, ALICE.0, 1, within, "a client gone mid-COPY").await;
            let b = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
            let n: i64 = tokio::time::timeout(
                Duration::from_secs(10),
                b.query_one("SELECT count(*) FROM copy_gone", &[]),
            )
            .await
            .expect("a new session is served after a client gone mid-COPY")
            .unwrap()
            .get(0);
            assert_eq!(
                n, 0,
                "round {round}: the abandoned COPY or its transaction was committed"
            );
            b.batch_execute("INSERT INTO copy_gone VALUES (1); DELETE FROM copy_gone")
                .await
                .unwrap();
            report(
                "vanish",
                format!("mid-COPY ({how}): all idle after {settled:?}"),
            );
        }
        still_serves(&mut tp, "clients gone mid-query and mid-COPY").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_queries_do_not_push_a_user_past_its_pool_size() {
    // Each client starts a long query and vanishes. Postgres does not notice a gone client
    // while a query runs, so unless the pooler cancels it, the backend keeps running (and
    // exists) for the whole query: the budget must still count it.
    const POOL: usize = 2;
    let (pg, mut tp) = start(TidepoolOpts::default().pool_size(POOL));
    bounded(Duration::from_secs(90), async {
        let ep = tp.endpoint();
        for i in 0..4 {
            let mut a = login(&ep).await;
            let sql = format!("SELECT pg_sleep(20), {i}");
            a.send(Frontend::new().query(&sql).bytes()).await.unwrap();
            wait_for_query(&pg, ALICE.0, &sql).await;
            a.abort();
        }
        let t = Instant::now();
        let c = tokio::time::timeout(Duration::from_secs(10), async {
            let c = ep.connect(ALICE.0, ALICE.1, APP_DB).await?;
            c.query_one("SELECT 1", &[]).await?;
            Ok::<_, tokio_postgres::Error>(c)
        })
        .await;
        report(
            "abandoned",
            format!(
                "4 clients gone mid pg_sleep(20): a new session {} after {:?}; \
                 alice's backends: {:?}",
                if matches!(c, Ok(Ok(_))) {
                    "served"
                } else {
                    "NOT served"
                },
                t.elapsed(),
                pg.backend_states(ALICE.0)
            ),
        );
        assert!(
            matches!(c, Ok(Ok(_))),
            "after 4 abandoned queries, a new session: {c:?}\n{}",
            tp.logs()
        );
        backends_settle(
            &pg,
            &tp,
            ALICE.0,
            POOL,
            Duration::from_secs(5),
            "4 clients gone mid-query (--pool-size 2)",
        )
        .await;
        still_serves(&mut tp, "abandoned queries").await;
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 2. Postgres restart
// ---------------------------------------------------------------------------------------------

/// What a query on an old session gives after the restart, in a few words.
async fn outcome(c: &tokio_postgres::Client) -> String {
    match tokio::time::timeout(Duration::from_secs(5), c.query_one("SELECT 1", &[])).await {
        Err(_) => "HANG (no answer within 5 s)".into(),
        Ok(Ok(_)) => "works".into(),
        Ok(Err(e)) => format!("error {} ({e})", sqlstate(&e)),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_under_a_running_tidepool() {
    let (pg, mut tp) = start(TidepoolOpts::default().pool_size(5));
    bounded(Duration::from_secs(180), async {
        let ep = tp.endpoint();
        let connect = || ep.connect(ALICE.0, ALICE.1, APP_DB);
        let direct_idle = pg.direct().connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        direct_idle.query_one("SELECT 1", &[]).await.unwrap();
        let idle = connect().await.unwrap();
        idle.query_one("SELECT 1", &[]).await.unwrap();
        let pinned = connect().await.unwrap();
        pinned
            .batch_execute("CREATE TEMP TABLE mine (x int)")
            .await
            .unwrap();
        let in_tx = connect().await.unwrap();
        in_tx.batch_execute("BEGIN; SELECT 1").await.unwrap();
        let direct_running = pg.direct().connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let running = connect().await.unwrap();
        let direct_sleep = tokio::spawn(async move {
            direct_running
                .query_one("SELECT pg_sleep(30)", &[])
                .await
                .map(|_| ())
        });
        let sleep = tokio::spawn(async move {
            running
                .query_one("SELECT pg_sleep(30)", &[])
                .await
                .map(|_| ())
        });
        wait_for_query(&pg, ALICE.0, "pg_sleep(30)").await;
        tokio::time::sleep(Duration::from_millis(300)).await;

        let t = Instant::now();
        let pg2 = pg.clone();
        tokio::task::spawn_blocking(move || pg2.restart())
            .await
            .expect("pg_ctl restart");
        report(
            "restart",
            format!("pg_ctl restart -m fast took {:?}", t.elapsed()),
        );

        // Queries running at the restart: the same error as Postgres gives its own clients.
        let want = tokio::time::timeout(Duration::from_secs(10), direct_sleep)
            .await
            .expect("the direct pg_sleep ends")
            .unwrap()
            .expect_err("the direct pg_sleep is terminated");
        let got = tokio::time::timeout(Duration::from_secs(10), sleep)
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "the pg_sleep through Tidepool hangs after the restart\n{}",
                    tp.logs()
                )
            })
            .unwrap()
            .expect_err("the pg_sleep through Tidepool is terminated");
        report(
            "restart",
            format!(
                "running query: direct {} ({want}), through {} ({got})",
                sqlstate(&want),
                sqlstate(&got)
            ),
        );
        assert_eq!(
            sqlstate(&want),
            sqlstate(&got),
            "a query running at the restart\n{}",
            tp.logs()
        );

        // New sessions through the same pooler and gateway.
        let t = Instant::now();
        let mut attempts = 0;
        loop {
            attempts += 1;
            let r = tokio::time::timeout(Duration::from_secs(5), async {
                let c = connect().await?;
                c.query_one("SELECT 1", &[]).await
            })
            .await;
            match r {
                Ok(Ok(_)) => break,
                other if t.elapsed() < Duration::from_secs(10) => {
                    report(
                        "restart",
                        format!("new session attempt {attempts}: {other:?}"),
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                other => panic!(
                    "no new session works {:?} after the restart: {other:?}\n{}",
                    t.elapsed(),
                    tp.logs()
                ),
            }
        }
        report(
            "restart",
            format!(
                "new sessions work {:?} after the restart ({attempts} attempts)",
                t.elapsed()
            ),
        );

        // A role not looked up before the restart: the pooler's admin connection (which died
        // with the restart) must come back for its verifier.
        let bob = tokio::time::timeout(Duration::from_secs(10), async {
            let c = ep.connect(BOB.0, BOB.1, APP_DB).await?;
            c.query_one("SELECT current_user::text", &[]).await
        })
        .await;
        assert!(
            matches!(&bob, Ok(Ok(row)) if row.get::<_, String>(0) == BOB.0),
            "bob's first login after the restart: {bob:?}\n{}",
            tp.logs()
        );

        // Old sessions: report what each gets; none may hang.
        let outcomes = [
            ("direct idle session", outcome(&direct_idle).await),
            ("idle session (no backend held)", outcome(&idle).await),
            ("session pinned by a temp table", outcome(&pinned).await),
            ("session idle in a transaction", outcome(&in_tx).await),
        ];
        for (who, what) in &outcomes {
            report("restart", format!("{who}: {what}"));
            assert!(!what.starts_with("HANG"), "{who}: {what}\n{}", tp.logs());
        }
        // Each old session was ended by the shutdown, as Postgres ends its own idle
        // connections (FATAL 57P01, closed): the session that held no backend included
        // (issue 11, point 2; pooler/src/server_end.rs).
        for (who, what) in &outcomes[1..] {
            assert_eq!(what, &outcomes[0].1, "{who}\n{}", tp.logs());
        }
        assert!(
            outcomes[0].1.starts_with("error"),
            "a direct idle session survives a restart: {}",
            outcomes[0].1
        );
        // Whatever the old sessions got, the pool serves new ones and keeps serving.
        still_serves(&mut tp, "a Postgres restart").await;
        let n = pg.backend_count(ALICE.0);
        assert!(
            n <= 5,
            "alice has {n} backends after the restart (budget 5)"
        );

        // A crash (a backend killed): Postgres ends every other connection with FATAL 57P02;
        // so do the sessions through Tidepool, the idle one that holds no backend included.
        let direct_idle = pg.direct().connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        direct_idle.query_one("SELECT 1", &[]).await.unwrap();
        let idle = connect().await.unwrap();
        idle.query_one("SELECT 1", &[]).await.unwrap();
        let doomed = pg.direct().connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let doomed = tokio::spawn(async move {
            doomed
                .query_one("SELECT pg_sleep(31)", &[])
                .await
                .map(|_| ())
        });
        // Queries running at the crash, on other backends: each ends as its backend does.
        let (direct_busy, busy) = (
            pg.direct().connect(ALICE.0, ALICE.1, APP_DB).await.unwrap(),
            connect().await.unwrap(),
        );
        let sleeping = |c: tokio_postgres::Client| {
            tokio::spawn(async move {
                match c.query_one("SELECT pg_sleep(32)", &[]).await {
                    Ok(_) => "no error".to_string(),
                    Err(e) => format!("error {} ({e})", sqlstate(&e)),
                }
            })
        };
        let (direct_busy, busy) = (sleeping(direct_busy), sleeping(busy));
        wait_for_query(&pg, ALICE.0, "pg_sleep(31)").await;
        let t = Instant::now();
        loop {
            let pg2 = pg.clone();
            let states = tokio::task::spawn_blocking(move || pg2.backend_states(ALICE.0))
                .await
                .expect("backend states");
            let n = states
                .iter()
                .filter(|s| s.starts_with("active") && s.contains("pg_sleep(32)"))
                .count();
            if n == 2 {
                break;
            }
            assert!(t.elapsed() < Duration::from_secs(10), "{states:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
        let pid: i32 = pg
            .psql_admin("SELECT pid FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(31)'")
            .trim()
            .parse()
            .expect("the pid of the backend to kill");
        // SAFETY: a plain kill(2) of a Postgres backend this test started.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let _ = tokio::time::timeout(Duration::from_secs(10), doomed).await;
        let t = Instant::now();
        loop {
            let r = tokio::time::timeout(Duration::from_secs(5), async {
                let c = connect().await?;
                c.query_one("SELECT 1", &[]).await
            })
            .await;
            if matches!(r, Ok(Ok(_))) {
                break;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "no new session after the crash: {r:?}\n{}",
                tp.logs()
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let ended = |t: tokio::task::JoinHandle<String>| async move {
            tokio::time::timeout(Duration::from_secs(10), t)
                .await
                .map(|r| r.expect("the sleeping task"))
                .unwrap_or_else(|_| "HANG".into())
        };
        let (direct, through) = (ended(direct_busy).await, ended(busy).await);
        report(
            "restart",
            format!("running at a crash: direct {direct}; through {through}"),
        );
        assert_eq!(direct, through, "a query running at a crash\n{}", tp.logs());
        let (direct, through) = (outcome(&direct_idle).await, outcome(&idle).await);
        report(
            "restart",
            format!("after a crash: direct idle session: {direct}; through: {through}"),
        );
        assert!(direct.starts_with("error"), "{direct}");
        assert_eq!(
            direct,
            through,
            "an idle session after a crash\n{}",
            tp.logs()
        );
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// 3. Cancel across gateway processes sharing a port
// ---------------------------------------------------------------------------------------------

/// A TCP connection to `port` that the kernel gave to process `want` (one of `pids`, all
/// listening there with SO_REUSEPORT): connects until one lands there.
async fn connect_to_process(port: u16, pids: &[u32], want: u32) -> TcpStream {
    for _ in 0..500 {
        let s = TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("connect to the shared port");
        let client_port = s.local_addr().expect("local address").port();
        let mut owner = None;
        for _ in 0..400 {
            owner = accepted_by(pids, port, client_port);
            if owner.is_some() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        if owner == Some(want) {
            return s;
        }
    }
    panic!("500 connections to port {port}, none accepted by process {want} of {pids:?}");
}

/// Logs in with tokio-postgres over a connection accepted by process `want`.
async fn session_on(
    ep: &Endpoint,
    pids: &[u32],
    want: u32,
) -> (tokio_postgres::Client, tokio_postgres::CancelToken) {
    let client = session_as_on(ep, pids, want, ALICE).await;
    let token = client.cancel_token();
    (client, token)
}

/// Logs in as `who` with tokio-postgres over a connection accepted by process `want`.
async fn session_as_on(
    ep: &Endpoint,
    pids: &[u32],
    want: u32,
    who: (&str, &str),
) -> tokio_postgres::Client {
    let stream = connect_to_process(ep.port, pids, want).await;
    let (client, connection) = ep
        .pg_config(who.0, who.1, APP_DB)
        .connect_raw(stream, NoTls)
        .await
        .expect("login over a steered connection");
    tokio::spawn(async move {
        let _ = connection.await;
    });
    client
}

/// `victim` (alice) runs `pg_sleep(30)`; bob tries to cancel and terminate it (42501), alice's
/// other session cancels it (a parameter pid) and then terminates it (a constant pid). What
/// each call answered and what the victim saw, one line each.
async fn signals_across(
    pg: &PgCluster,
    victim: tokio_postgres::Client,
    alice: tokio_postgres::Client,
    bob: tokio_postgres::Client,
) -> Vec<String> {
    let answer = common::answer;
    let pid: i32 = victim
        .query_one("SELECT pg_backend_pid()", &[])
        .await
        .unwrap()
        .get(0);
    let victim = std::sync::Arc::new(victim);
    let v = victim.clone();
    let sleep = tokio::spawn(async move { v.query("SELECT pg_sleep(30)", &[]).await });
    wait_for_query(pg, ALICE.0, "pg_sleep(30)").await;
    let mut out = Vec::new();
    for f in ["pg_cancel_backend", "pg_terminate_backend"] {
        let r = bob.query(&format!("SELECT {f}($1)"), &[&pid]).await;
        out.push(format!("bob {f}: {}", answer(r)));
    }
    let r = alice.query("SELECT pg_cancel_backend($1)", &[&pid]).await;
    out.push(format!("alice pg_cancel_backend: {}", answer(r)));
    let slept = tokio::time::timeout(Duration::from_secs(10), sleep)
        .await
        .map(|r| answer(r.expect("the victim's task")))
        .unwrap_or_else(|_| "still running after 10 s".into());
    out.push(format!("the victim's query: {slept}"));
    let r = victim.query("SELECT true", &[]).await;
    out.push(format!("the victim goes on: {}", answer(r)));
    let r = alice
        .query(&format!("SELECT pg_terminate_backend({pid})"), &[])
        .await;
    out.push(format!("alice pg_terminate_backend: {}", answer(r)));
    tokio::time::sleep(Duration::from_millis(300)).await;
    let r = victim.query("SELECT true", &[]).await;
    out.push(format!("the victim after it: {}", answer(r)));
    out
}

/// Runs `pg_sleep(30)` on `victim` and `pg_sleep(4)` on `bystander`, then `cancel`; the first
/// must end with 57014 within 10 s, the second must finish normally.
async fn cancel_round<F, Fut>(
    tp: &Tidepool,
    label: &str,
    victim: tokio_postgres::Client,
    bystander: tokio_postgres::Client,
    cancel: F,
) where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(), tokio_postgres::Error>>,
{
    let started = Instant::now();
    let sleeper = tokio::spawn(async move {
        let r = victim
            .query_one("SELECT pg_sleep(30)", &[])
            .await
            .map(|_| ());
        (victim, r)
    });
    let other = tokio::spawn(async move {
        let r = bystander
            .query_one("SELECT pg_sleep(4)::text, 'bystander finished'", &[])
            .await
            .map(|r| r.get::<_, String>(1));
        (bystander, r)
    });
    wait_for_queries(tp.cluster(), ALICE.0, &["pg_sleep(30)", "pg_sleep(4)"]).await;
    cancel()
        .await
        .unwrap_or_else(|e| panic!("{label}: sending the cancel: {e}"));
    let (victim, r) = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "{label}: pg_sleep(30) not cancelled within 10 s\n{}",
                tp.logs()
            )
        })
        .unwrap();
    let err = r.expect_err("pg_sleep(30) is cancelled");
    assert_eq!(sqlstate(&err), "57014", "{label}: {err}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{label}: cancel took {:?}",
        started.elapsed()
    );
    let (bystander, r) = tokio::time::timeout(Duration::from_secs(10), other)
        .await
        .unwrap_or_else(|_| panic!("{label}: the bystander's pg_sleep(4) hangs\n{}", tp.logs()))
        .unwrap();
    assert_eq!(
        r.unwrap_or_else(|e| panic!("{label}: the bystander's query was hit: {e}")),
        "bystander finished"
    );
    // Both sessions go on.
    victim.query_one("SELECT 1", &[]).await.unwrap();
    bystander.query_one("SELECT 1", &[]).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_lands_on_the_other_gateway_process_and_stops_the_right_query() {
    let (pg, mut tp) = start(TidepoolOpts::default());
    let mut second = tp.start_gateway_on(tp.gateway_port());
    let pids = [tp.gateway_pid(), second.pid()];
    bounded(Duration::from_secs(240), async {
        let ep = tp.endpoint();
        // Steered: the session on one process, the cancel accepted by the other (and, as a
        // control, by the same one); the bystander on either.
        for (round, (victim_on, bystander_on, cancel_on)) in
            [(0, 1, 1), (1, 0, 0), (0, 0, 1), (1, 1, 0), (0, 1, 0)]
                .into_iter()
                .enumerate()
        {
            let (victim, token) = session_on(&ep, &pids, pids[victim_on]).await;
            let (bystander, _) = session_on(&ep, &pids, pids[bystander_on]).await;
            let label = format!(
                "steered round {round}: session on gateway {victim_on}, \
                 bystander on {bystander_on}, cancel to {cancel_on}"
            );
            let port = ep.port;
            let target = pids[cancel_on];
            cancel_round(&tp, &label, victim, bystander, || async move {
                let stream = connect_to_process(port, &pids, target).await;
                token.cancel_query_raw(stream, NoTls).await
            })
            .await;
            report("cancel", format!("{label}: ok"));
        }
        // Unsteered, as a client does it: the kernel picks the process of every connection.
        for round in 0..6 {
            let victim = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
            let bystander = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
            let token = victim.cancel_token();
            let label = format!("unsteered round {round}");
            cancel_round(&tp, &label, victim, bystander, || async move {
                token.cancel_query(NoTls).await
            })
            .await;
        }

        // pg_cancel_backend/pg_terminate_backend of a pid whose session the other process
        // holds (issue 11): answered, and acted on, as directly.
        let direct = pg.direct();
        let want = signals_across(
            &pg,
            direct.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap(),
            direct.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap(),
            direct.connect(BOB.0, BOB.1, APP_DB).await.unwrap(),
        )
        .await;
        assert!(
            want.iter().any(|l| l.contains("57014")) && want.iter().any(|l| l.contains("42501")),
            "{want:#?}"
        );
        for (victim_on, caller_on) in [(0, 1), (1, 0)] {
            let (victim, _) = session_on(&ep, &pids, pids[victim_on]).await;
            let (alice, _) = session_on(&ep, &pids, pids[caller_on]).await;
            let bob = session_as_on(&ep, &pids, pids[caller_on], BOB).await;
            let got = signals_across(&pg, victim, alice, bob).await;
            assert_eq!(
                want,
                got,
                "session on gateway {victim_on}, calls from {caller_on}\n{}",
                tp.logs()
            );
            report(
                "cancel",
                format!("signals from gateway {caller_on} to {victim_on}: as directly"),
            );
        }
    })
    .await;
    assert!(second.alive(), "the second gateway died\n{}", second.logs());
    still_serves(&mut tp, "cancels across gateway processes").await;
}

// ---------------------------------------------------------------------------------------------
// 4. Backend budgets
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_sessions_never_exceed_a_pool_of_three() {
    let (pg, tp) = start(TidepoolOpts::default().pool_size(3));
    let watch = pg.watch_backends(ALICE.0);
    let t = Instant::now();
    let outcome = tokio::time::timeout(Duration::from_secs(90), async {
        let ep = tp.endpoint();
        let tasks: Vec<_> = (0..30)
            .map(|i| {
                let ep = ep.clone();
                tokio::spawn(async move {
                    let c = ep
                        .connect(ALICE.0, ALICE.1, APP_DB)
                        .await
                        .map_err(|e| format!("session {i}: login: {e}"))?;
                    for round in 0..3 {
                        c.query_one("SELECT pg_sleep(0.2)::text, $1::int", &[&(i * 10 + round)])
                            .await
                            .map_err(|e| format!("session {i} round {round}: {e}"))?;
                    }
                    Ok::<_, String>(())
                })
            })
            .collect();
        let mut failures = Vec::new();
        for task in tasks {
            if let Err(e) = task.await.expect("session task") {
                failures.push(e);
            }
        }
        failures
    })
    .await;
    let (max, samples) = watch.stop();
    report(
        "budget",
        format!(
            "30 sessions x 3 x pg_sleep(0.2) on 3 backends: {:?}, \
             at most {max} backends in {samples} samples",
            t.elapsed()
        ),
    );
    let failures =
        outcome.unwrap_or_else(|_| panic!("30 sessions did not finish within 90 s\n{}", tp.logs()));
    assert!(failures.is_empty(), "{failures:?}\n{}", tp.logs());
    assert!(samples > 10, "only {samples} samples");
    assert!(
        max <= 3,
        "alice had {max} backends at once; --pool-size is 3\n{}",
        tp.logs()
    );
    assert!(max >= 1, "the sampler saw no backend");
}

/// Waits up to `limit` for session tasks: `Err` if they did not all end by then, and the errors
/// the ones that ended returned.
async fn join_sessions(
    tasks: Vec<tokio::task::JoinHandle<Result<(), String>>>,
    limit: Duration,
) -> (Result<(), tokio::time::error::Elapsed>, Vec<String>) {
    let mut failures = Vec::new();
    let all = tokio::time::timeout(limit, async {
        for t in tasks {
            if let Ok(Err(e)) = t.await {
                failures.push(e);
            }
        }
    })
    .await;
    (all, failures)
}

/// Sessions of one user running `SELECT pg_sleep(0.2)` back to back until `stop`; each
/// completion is recorded as (user index, when). `ready` counts the sessions logged in,
/// `logins` gets how long each login took.
fn busy_sessions(
    ep: &Endpoint,
    (u, (user, password)): (usize, (&'static str, &'static str)),
    n: usize,
    ready: Arc<AtomicUsize>,
    logins: Arc<std::sync::Mutex<Vec<Duration>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    completions: Arc<std::sync::Mutex<Vec<(usize, Instant)>>>,
) -> Vec<tokio::task::JoinHandle<Result<(), String>>> {
    (0..n)
        .map(|i| {
            let (ep, ready, logins, stop, completions) = (
                ep.clone(),
                ready.clone(),
                logins.clone(),
                stop.clone(),
                completions.clone(),
            );
            tokio::spawn(async move {
                let began = Instant::now();
                let c = ep
                    .connect(user, password, APP_DB)
                    .await
                    .map_err(|e| format!("{user} session {i}: login: {e}"))?;
                logins
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(began.elapsed());
                ready.fetch_add(1, Ordering::Relaxed);
                while !stop.load(Ordering::Relaxed) {
                    c.query_one("SELECT pg_sleep(0.2)::text", &[])
                        .await
                        .map_err(|e| format!("{user} session {i}: {e}"))?;
                    completions
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((u, Instant::now()));
                }
                Ok(())
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_users_share_max_backends_fairly() {
    const MAX: usize = 4;
    const SESSIONS: usize = 10;
    let (pg, tp) = start(TidepoolOpts::default().pool_size(20).max_backends(MAX));
    let watch = pg.watch_users(&[ALICE.0, BOB.0]);
    let ep = tp.endpoint();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let completions = Arc::new(std::sync::Mutex::new(Vec::new()));
    let ready = [Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0))];
    let logins = [
        Arc::new(std::sync::Mutex::new(Vec::new())),
        Arc::new(std::sync::Mutex::new(Vec::new())),
    ];
    let count = |u: usize, from: Instant, to: Instant| {
        completions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|(w, at)| *w == u && *at >= from && *at < to)
            .count()
    };
    // alice first, until she holds every backend and keeps them busy.
    let mut tasks = busy_sessions(
        &ep,
        (0, ALICE),
        SESSIONS,
        ready[0].clone(),
        logins[0].clone(),
        stop.clone(),
        completions.clone(),
    );
    let t = Instant::now();
    while ready[0].load(Ordering::Relaxed) < SESSIONS && t.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    // Then bob: his logins need a backend too.
    let bob_start = Instant::now();
    tasks.extend(busy_sessions(
        &ep,
        (1, BOB),
        SESSIONS,
        ready[1].clone(),
        logins[1].clone(),
        stop.clone(),
        completions.clone(),
    ));
    while ready[1].load(Ordering::Relaxed) < SESSIONS
        && bob_start.elapsed() < Duration::from_secs(30)
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let bob_logins = bob_start.elapsed();
    let slowest = |u: usize| {
        logins[u]
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .max()
            .copied()
    };
    report(
        "fair",
        format!(
            "alice's slowest login {:?}; bob: {} of {SESSIONS} logged in \
             after {bob_logins:?}, slowest {:?}",
            slowest(0),
            ready[1].load(Ordering::Relaxed),
            slowest(1)
        ),
    );
    if ready[1].load(Ordering::Relaxed) < SESSIONS {
        stop.store(true, Ordering::Relaxed);
        panic!(
            "only {} of bob's {SESSIONS} sessions logged in within 30 s \
             while alice kept every backend busy\n{}",
            ready[1].load(Ordering::Relaxed),
            tp.logs()
        );
    }
    // The steady window: both users' sessions all running.
    let window_start = Instant::now() + Duration::from_secs(1);
    let window_end = window_start + Duration::from_secs(5);
    tokio::time::sleep_until(window_end.into()).await;
    stop.store(true, Ordering::Relaxed);
    let (all, failures) = join_sessions(tasks, Duration::from_secs(20)).await;
    let seen = watch.stop();
    let (a, b) = (
        count(0, window_start, window_end),
        count(1, window_start, window_end),
    );
    let bob_first = completions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .find(|(u, _)| *u == 1)
        .map(|(_, at)| at.duration_since(bob_start));
    report(
        "fair",
        format!(
            "--max-backends {MAX}, {SESSIONS} sessions each: bob's logins took {bob_logins:?}, \
             his first query done after {bob_first:?}; in a 5 s window: alice {a} queries, \
             bob {b}; at most {} backends in total, alice {}, bob {} ({} samples)",
            seen.max_total, seen.max_each[0], seen.max_each[1], seen.samples
        ),
    );
    assert!(
        all.is_ok(),
        "the sessions did not stop within 20 s\n{}",
        tp.logs()
    );
    assert!(failures.is_empty(), "{failures:?}\n{}", tp.logs());
    assert!(
        seen.max_total <= MAX as i64,
        "{} backends at once; --max-backends is {MAX}\n{}",
        seen.max_total,
        tp.logs()
    );
    let mut problems = Failures::default();
    // A fair share is half each; a third allows for the noise of a loaded machine.
    let total = (a + b).max(1);
    if a * 3 < total || b * 3 < total {
        problems.add(Some(format!(
            "unfair share of {MAX} backends between two busy users: \
             alice {a} queries, bob {b} in 5 s"
        )));
    }
    // A login needs a backend for a moment (to check the role and database): with alice's
    // sessions each holding one for 0.2 s at a time, bob's should get one within seconds.
    if let Some(slow) = slowest(1).filter(|d| *d > Duration::from_secs(10)) {
        problems.add(Some(format!(
            "a login of bob took {slow:?} while alice kept every backend busy"
        )));
    }
    problems.check(&tp);
}

// ---------------------------------------------------------------------------------------------
// 5. Startup settings
// ---------------------------------------------------------------------------------------------

const SETTINGS_PROBE: &str = "SELECT concat_ws(' | ', current_setting('search_path'), \
     current_setting('application_name'), current_setting('work_mem'), \
     current_setting('statement_timeout'), current_setting('DateStyle'))";

/// What a session with these startup parameters sees: the probe at login, after `SET`s, after
/// `RESET`s of each, after `RESET ALL`; and the ParameterStatus values reported at login.
async fn settings_seen(ep: &Endpoint, params: &[(&str, &str)]) -> Result<Vec<String>, String> {
    let mut all = vec![("user", ALICE.0), ("database", APP_DB)];
    all.extend_from_slice(params);
    let conn = RawConn::connect_with(&ep.host, ep.port, &all, ALICE.1)
        .await
        .map_err(|e| match e {
            ConnectError::Server(e) => e.render(),
            e => format!("<{e}>"),
        })?;
    let mut reported: Vec<String> = conn
        .startup
        .iter()
        .filter(|m| m.tag == b'S')
        .map(|m| m.render())
        .collect();
    reported.sort();
    conn.terminate().await;

    let mut config = ep.pg_config(ALICE.0, ALICE.1, APP_DB);
    for (k, v) in params {
        match *k {
            "options" => config.options(*v),
            "application_name" => config.application_name(*v),
            other => panic!("no tokio-postgres setter for {other}"),
        };
    }
    let (c, connection) = config.connect(NoTls).await.map_err(|e| format!("{e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut seen = reported;
    let q = |label: &'static str| (label, SETTINGS_PROBE);
    for (label, sql) in [
        q("at login"),
        (
            "after SET",
            "SET search_path = other; SET application_name = 'changed'; SET work_mem = '7MB'",
        ),
        q("after SET"),
        (
            "after RESET",
            "RESET search_path; RESET application_name; RESET work_mem",
        ),
        q("after RESET"),
        (
            "after SET again",
            "SET search_path = other; SET statement_timeout = '3s'",
        ),
        ("after RESET ALL", "RESET ALL"),
        q("after RESET ALL"),
    ] {
        if sql == SETTINGS_PROBE {
            let v: String = c
                .query_one(sql, &[])
                .await
                .map_err(|e| format!("{label}: {e}"))?
                .get(0);
            seen.push(format!("{label}: {v}"));
        } else {
            c.batch_execute(sql)
                .await
                .map_err(|e| format!("{label}: {e}"))?;
        }
    }
    Ok(seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn startup_settings_are_what_postgres_shows() {
    // One backend: the sessions below take turns on it, so a startup setting that stayed
    // behind would show in the next session.
    let (pg, mut tp) = start(TidepoolOpts::default().pool_size(1));
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("no settings", vec![]),
        (
            "options -c search_path=foo",
            vec![("options", "-c search_path=foo")],
        ),
        ("application_name", vec![("application_name", "robust app")]),
        (
            "both, and more options",
            vec![
                (
                    "options",
                    "-c search_path=foo,public -c work_mem=4MB --statement-timeout=5s \
                     -cDateStyle=German",
                ),
                ("application_name", "robust app"),
            ],
        ),
        (
            "an escaped space in options",
            vec![("options", "-c application_name=a\\ b")],
        ),
    ];
    bounded(Duration::from_secs(120), async {
        for (name, params) in &cases {
            let want = settings_seen(&pg.direct(), params).await;
            let got = settings_seen(&tp.endpoint(), params).await;
            report("settings", format!("{name}: direct {want:?}"));
            assert_eq!(want, got, "{name}\n{}", tp.logs());
            // And nothing stays behind for a session without settings on the same backend.
            let plain = settings_seen(&tp.endpoint(), &[]).await;
            let plain_direct = settings_seen(&pg.direct(), &[]).await;
            assert_eq!(plain_direct, plain, "a plain session after one with {name}");
        }
        still_serves(&mut tp, "startup settings").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_startup_settings_fail_the_login_like_postgres() {
    let (pg, mut tp) = start(TidepoolOpts::default().pool_size(1));
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "options -c work_mem=bogus",
            vec![("options", "-c work_mem=bogus")],
        ),
        (
            "an unknown parameter in options",
            vec![("options", "-c no_such_param=1")],
        ),
        ("an unknown startup parameter", vec![("no_such_param", "1")]),
        (
            "a parameter settable only at server start",
            vec![("options", "-c max_connections=5")],
        ),
        (
            "a superuser-only parameter",
            vec![("options", "-c log_min_duration_statement=0")],
        ),
        (
            "a good setting, then a bad one",
            vec![("options", "-c search_path=leaked -c work_mem=bogus")],
        ),
        ("options without -c", vec![("options", "bogus")]),
        (
            "options -c without a value",
            vec![("options", "-c search_path")],
        ),
        ("a dangling -c", vec![("options", "-c")]),
    ];
    let mut failures = Failures::default();
    bounded(Duration::from_secs(120), async {
        for (name, params) in &cases {
            let mut all = vec![("user", ALICE.0), ("database", APP_DB)];
            all.extend_from_slice(params);
            let login = |ep: Endpoint| {
                let all = all.clone();
                async move {
                    match RawConn::connect_with(&ep.host, ep.port, &all, ALICE.1).await {
                        Ok(c) => {
                            c.terminate().await;
                            Ok(())
                        }
                        Err(ConnectError::Server(e)) => Err(e),
                        Err(e) => panic!("{e}"),
                    }
                }
            };
            let want = login(pg.direct()).await;
            let got = tokio::time::timeout(Duration::from_secs(10), login(tp.endpoint()))
                .await
                .unwrap_or_else(|_| panic!("{name}: the login hangs\n{}", tp.logs()));
            let show = |r: &Result<(), ServerError>| match r {
                Ok(()) => "logged in".to_string(),
                Err(e) => e.render(),
            };
            report("bad-settings", format!("{name}: direct {}", show(&want)));
            report("bad-settings", format!("{name}: through {}", show(&got)));
            let same = match (&want, &got) {
                (Err(w), Err(g)) => (w.severity(), w.code()) == (g.severity(), g.code()),
                _ => show(&want) == show(&got),
            };
            if !same {
                failures.add(Some(format!(
                    "{name}: the login ends differently\n  direct:  {}\n  through: {}",
                    show(&want),
                    show(&got)
                )));
            }
            // The only backend carries nothing of the failed login into the next session.
            let c = tp
                .endpoint()
                .connect(ALICE.0, ALICE.1, APP_DB)
                .await
                .unwrap();
            let path: String = c
                .query_one("SELECT current_setting('search_path')", &[])
                .await
                .unwrap()
                .get(0);
            assert_eq!(path, "\"$user\", public", "after {name}");
        }
        still_serves(&mut tp, "invalid startup settings").await;
    })
    .await;
    failures.check(&tp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_startup_parameter_that_is_not_utf8_is_treated_as_postgres_does() {
    // libpq sends PGAPPNAME as the bytes of the environment: "café" from a Latin-1 terminal is
    // `caf\xe9`. Postgres takes it (and shows the non-ASCII byte as `?`).
    let (pg, mut tp) = start(TidepoolOpts::default());
    let packet = Frontend::new().startup_bytes(&[
        (b"user", ALICE.0.as_bytes()),
        (b"database", APP_DB.as_bytes()),
        (b"application_name", b"caf\xe9"),
    ]);
    bounded(Duration::from_secs(60), async {
        let seen = |ep: Endpoint| {
            let packet = packet.clone();
            async move {
                let mut conn = RawConn::connect_with_packet(
                    &ep.host,
                    ep.port,
                    packet.bytes(),
                    ALICE.0,
                    ALICE.1,
                )
                .await
                .map_err(|e| match e {
                    ConnectError::Server(e) => e.render(),
                    e => format!("<{e}>"),
                })?;
                let events = exchange(
                    &mut conn,
                    &Frontend::new().query("SELECT current_setting('application_name')"),
                    Duration::from_secs(10),
                )
                .await;
                Ok::<_, String>(rendered(&events))
            }
        };
        let want = seen(pg.direct()).await;
        let got = seen(tp.endpoint()).await;
        report("latin1", format!("direct {want:?}"));
        report("latin1", format!("through {got:?}"));
        assert_eq!(want, got, "a Latin-1 application_name\n{}", tp.logs());
        still_serves(&mut tp, "a Latin-1 application_name").await;
    })
    .await;
}

/// The pooler cores that hold a gateway link, from the pooler's log.
fn linked_pooler_cores(tp: &Tidepool) -> std::collections::BTreeSet<String> {
    tp.pooler_log()
        .lines()
        .filter(|l| l.contains("gateway link accepted"))
        .filter_map(|l| l.split("core=").nth(1))
        .filter_map(|r| r.split_whitespace().next().map(str::to_owned))
        .collect()
}

/// One user's sessions spread over both pooler cores, its pool one backend: that backend must
/// serve the sessions of both cores, logins included. A core whose sessions wait where the pool
/// has no backend says so, and the core holding the backend gives its unit up (pool.rs,
/// `CoreMsg::Starving`); before, the busy core kept it and the other core's sessions never ran.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_users_sessions_on_both_pooler_cores_all_get_served() {
    const SESSIONS: usize = 8;
    let pg = PgCluster::start();
    // Both pooler cores must hold a gateway link, or there is nothing to test: the kernel
    // spreads the links (SO_REUSEPORT) as it likes, so start again until it did.
    let mut started = None;
    for _ in 0..10 {
        let tp = Tidepool::start(&pg, TidepoolOpts::default().pool_size(1));
        let t = Instant::now();
        while linked_pooler_cores(&tp).len() < 2 && t.elapsed() < Duration::from_secs(3) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        if linked_pooler_cores(&tp).len() >= 2 {
            started = Some(tp);
            break;
        }
    }
    let tp = started.expect("in 10 starts the gateway's links never reached both pooler cores");
    let ep = tp.endpoint();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let logged_in = Arc::new(AtomicUsize::new(0));
    let done: Arc<Vec<AtomicUsize>> =
        Arc::new((0..SESSIONS).map(|_| AtomicUsize::new(0)).collect());
    let tasks: Vec<_> = (0..SESSIONS)
        .map(|i| {
            let (ep, stop, logged_in, done) =
                (ep.clone(), stop.clone(), logged_in.clone(), done.clone());
            tokio::spawn(async move {
                let c = ep
                    .connect(ALICE.0, ALICE.1, APP_DB)
                    .await
                    .map_err(|e| format!("session {i}: login: {e}"))?;
                logged_in.fetch_add(1, Ordering::Relaxed);
                while !stop.load(Ordering::Relaxed) {
                    c.query_one("SELECT pg_sleep(0.05)::text", &[])
                        .await
                        .map_err(|e| format!("session {i}: {e}"))?;
                    done[i].fetch_add(1, Ordering::Relaxed);
                }
                Ok::<(), String>(())
            })
        })
        .collect();
    let t = Instant::now();
    while logged_in.load(Ordering::Relaxed) < SESSIONS && t.elapsed() < Duration::from_secs(30) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let logins = logged_in.load(Ordering::Relaxed);
    let logins_took = t.elapsed();
    // Every session that logged in runs for 4 s from now.
    let before: Vec<usize> = done.iter().map(|d| d.load(Ordering::Relaxed)).collect();
    tokio::time::sleep(Duration::from_secs(4)).await;
    let during: Vec<usize> = done
        .iter()
        .zip(&before)
        .map(|(d, b)| d.load(Ordering::Relaxed) - b)
        .collect();
    stop.store(true, Ordering::Relaxed);
    let (all, failures) = join_sessions(tasks, Duration::from_secs(20)).await;
    report(
        "both_cores",
        format!(
            "pool of 1, {SESSIONS} sessions: {logins} logged in after {logins_took:?}; \
             queries per session in 4 s: {during:?}"
        ),
    );
    assert_eq!(
        logins,
        SESSIONS,
        "only {logins} of {SESSIONS} sessions logged in within 30 s\n{}",
        tp.logs()
    );
    assert!(
        all.is_ok(),
        "the sessions did not stop within 20 s\n{}",
        tp.logs()
    );
    assert!(failures.is_empty(), "{failures:?}\n{}", tp.logs());
    // Fair, not only alive: before, the other core's sessions got 0 or 1 queries while the
    // busy core's got 14 each.
    let (min, max) = (
        during.iter().copied().min().unwrap_or(0),
        during.iter().copied().max().unwrap_or(0),
    );
    assert!(
        min > 0 && min * 5 >= max,
        "sessions were not served alike in 4 s: {during:?}\n{}",
        tp.logs()
    );
}

/// Resumes a stopped postmaster when dropped (a failed assertion must not leave it stopped).
struct Stopped(i32);

impl Stopped {
    fn postmaster(pg: &PgCluster) -> Stopped {
        let pidfile = std::fs::read_to_string(pg.data_dir().join("postmaster.pid")).unwrap();
        let pid: i32 = pidfile.lines().next().unwrap().trim().parse().unwrap();
        assert_eq!(unsafe { libc::kill(pid, libc::SIGSTOP) }, 0);
        Stopped(pid)
    }
}

impl Drop for Stopped {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

/// A client that leaves while the pooler logs a backend in for its request: the pool's budget
/// unit comes back. Postgres is made slow to accept logins (its postmaster stopped) so that the
/// client is gone mid-login; with a pool of one, a unit kept for the backend that never came
/// left every later request of the user waiting for ever.
#[test]
fn a_client_gone_while_its_backend_logs_in_leaves_the_pool_whole() {
    let (pg, tp) = start(TidepoolOpts::default().pool_size(1));
    let ep = tp.endpoint();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(bounded(Duration::from_secs(90), async {
        let mut a = RawConn::connect(&ep.host, ep.port, ALICE.0, ALICE.1, APP_DB)
            .await
            .unwrap();
        a.send(Frontend::new().query("select 1").bytes())
            .await
            .unwrap();
        let events = a.recv_until(b'Z', Duration::from_secs(10)).await;
        assert!(errors(&events).is_empty(), "{events:?}");
        // alice's one backend ends: the pool has none, and its unit is free again.
        pg.psql_admin(
            "select pg_terminate_backend(pid) from pg_stat_activity where usename = 'alice'",
        );
        let end = Instant::now() + Duration::from_secs(10);
        while pg.backend_count(ALICE.0) > 0 && Instant::now() < end {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;

        // a's next request needs a login, which Postgres does not answer; a leaves meanwhile.
        let stopped = Stopped::postmaster(&pg);
        a.send(Frontend::new().query("select 2").bytes())
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        a.abort();
        tokio::time::sleep(Duration::from_millis(500)).await;
        drop(stopped);

        // Another session of alice's is served.
        let b = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(20), b.simple_query("select 3")).await;
        assert!(
            matches!(r, Ok(Ok(_))),
            "alice's next request was not served: {r:?}\n{}",
            tp.logs()
        );
    }));
}
