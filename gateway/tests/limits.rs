//! The gateway's admission limits, against a real Postgres 15, pooler and gateway:
//! - `--max-clients N`: client N+1 is refused with SQLSTATE 53300 ("sorry, too many clients
//!   already", what Postgres says past max_connections) while the N it has keep working, and a
//!   slot freed by a client that leaves is given to the next one;
//! - `--auth-timeout-seconds T`: a client that connects and never finishes startup (silent,
//!   half a startup packet, no answer to the password request, endless SSLRequests) is closed
//!   within about T seconds, like Postgres' authentication_timeout, and its slot is freed;
//! - authenticated clients that stay idle for longer than T are not touched.
//!
//! Every wait is bounded; a gateway that never closes a connection fails the test with a
//! message instead of hanging it.

use std::time::{Duration, Instant};

use testkit::{ConnectError, Frontend, PgCluster, RawConn, Tidepool, TidepoolOpts, APP_DB, BOB};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const MAX_CLIENTS: usize = 3;
const AUTH_TIMEOUT_S: u64 = 2;
/// How late past the auth timeout a close may come on a loaded 2-core machine.
const SLACK: Duration = Duration::from_secs(3);

fn start(pg: &PgCluster) -> Tidepool {
    let mut opts = TidepoolOpts::default().pool_size(5);
    opts.extra_gateway_args = vec![
        "--max-clients".into(),
        MAX_CLIENTS.to_string(),
        "--auth-timeout-seconds".into(),
        AUTH_TIMEOUT_S.to_string(),
    ];
    Tidepool::start(pg, opts)
}

/// bob (md5 verifier): logging in costs no PBKDF2 in a debug build.
async fn login(tp: &Tidepool) -> Result<RawConn, ConnectError> {
    tp.endpoint().raw(BOB.0, BOB.1, APP_DB).await
}

/// Runs `SELECT n` on the connection and checks the answer.
async fn select(conn: &mut RawConn, n: u32) -> Result<(), String> {
    conn.send(Frontend::new().query(&format!("SELECT {n}")).bytes())
        .await
        .map_err(|e| format!("send: {e}"))?;
    let events = conn.recv_until(b'Z', Duration::from_secs(10)).await;
    let text = format!("{events:?}");
    if text.contains(&format!("DataRow[\"{n}\"]")) && text.ends_with("ReadyForQuery(I)]") {
        Ok(())
    } else {
        Err(text)
    }
}

/// The refusal a client gets past the limit.
fn assert_too_many(result: Result<RawConn, ConnectError>, tp: &Tidepool) {
    match result {
        Err(ConnectError::Server(e)) => {
            assert_eq!(e.code(), "53300", "{e}");
            assert_eq!(e.message(), "sorry, too many clients already");
            assert_eq!(e.severity(), "FATAL");
        }
        Err(other) => panic!("expected 53300, got {other}\n{}", tp.logs()),
        Ok(_) => panic!(
            "client {} was let in past --max-clients {MAX_CLIENTS}",
            MAX_CLIENTS + 1
        ),
    }
}

/// Waits until `limit` after `t0` for the server to close `s`; returns how long after `t0` it
/// did, or `None` if it was still open at the limit. Anything the server sends before closing is
/// read and dropped.
async fn closed_within(s: &mut TcpStream, t0: Instant, limit: Duration) -> Option<Duration> {
    let mut buf = [0u8; 1024];
    loop {
        let left = limit.checked_sub(t0.elapsed())?;
        match tokio::time::timeout(left, s.read(&mut buf)).await {
            Err(_) => return None,
            Ok(Ok(0)) | Ok(Err(_)) => return Some(t0.elapsed()),
            Ok(Ok(_)) => {}
        }
    }
}

/// A startup packet for bob on `app`, protocol 3.0.
fn startup_packet() -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&196608i32.to_be_bytes());
    for (k, v) in [("user", BOB.0), ("database", APP_DB)] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_past_max_clients_gets_53300_and_the_others_keep_working() {
    let pg = PgCluster::start();
    let tp = start(&pg);

    let mut held = Vec::new();
    for i in 0..MAX_CLIENTS {
        let conn = login(&tp)
            .await
            .unwrap_or_else(|e| panic!("client {} of {MAX_CLIENTS}: {e}\n{}", i + 1, tp.logs()));
        held.push(conn);
    }
    assert_too_many(login(&tp).await, &tp);
    // A refusal takes no slot: still refused, and the clients inside are served.
    assert_too_many(login(&tp).await, &tp);
    for (i, conn) in held.iter_mut().enumerate() {
        select(conn, i as u32 + 1)
            .await
            .unwrap_or_else(|e| panic!("client {} after the refusals: {e}\n{}", i + 1, tp.logs()));
    }

    // One leaves: its slot goes to the next client (the count is released asynchronously when
    // the gateway notices the close, so allow it a moment).
    held.pop().expect("a client").terminate().await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let newcomer = loop {
        match login(&tp).await {
            Ok(conn) => break conn,
            Err(ConnectError::Server(e)) if e.code() == "53300" && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!(
                "slot of a client that left was not freed: {e}\n{}",
                tp.logs()
            ),
        }
    };
    held.push(newcomer);
    assert_too_many(login(&tp).await, &tp);
    for (i, conn) in held.iter_mut().enumerate() {
        select(conn, 10 + i as u32)
            .await
            .unwrap_or_else(|e| panic!("client {}: {e}\n{}", i + 1, tp.logs()));
    }
    for conn in held {
        conn.terminate().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_startups_are_closed_after_the_auth_timeout_and_idle_sessions_stay() {
    let pg = PgCluster::start();
    let tp = start(&pg);
    let addr = ("127.0.0.1", tp.gateway_port());
    let limit = Duration::from_secs(AUTH_TIMEOUT_S) + SLACK;

    // Two authenticated clients that will sit idle past the auth timeout.
    let mut idle = Vec::new();
    for _ in 0..MAX_CLIENTS - 1 {
        idle.push(
            login(&tp)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs())),
        );
    }

    // Round 1: a client that connects and says nothing takes the last slot …
    let t0 = Instant::now();
    let mut silent = TcpStream::connect(addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_too_many(login(&tp).await, &tp);
    // … until the gateway closes it, after the timeout and not before.
    let took = closed_within(&mut silent, t0, limit)
        .await
        .unwrap_or_else(|| {
            panic!(
                "a silent client was still connected {limit:?} after connecting \
             (--auth-timeout-seconds {AUTH_TIMEOUT_S})\n{}",
                tp.logs()
            )
        });
    assert!(
        took >= Duration::from_millis(AUTH_TIMEOUT_S * 1000 - 500),
        "closed after {took:?}, before the {AUTH_TIMEOUT_S} s timeout"
    );
    // Its slot is free again.
    let third = login(&tp).await.unwrap_or_else(|e| {
        panic!(
            "slot of the timed-out client still taken: {e}\n{}",
            tp.logs()
        )
    });
    third.terminate().await;

    // Round 2: half a startup packet (the length word says more is coming).
    let t0 = Instant::now();
    let mut partial = TcpStream::connect(addr).await.expect("connect");
    let packet = startup_packet();
    partial.write_all(&packet[..6]).await.expect("write");
    assert!(
        closed_within(&mut partial, t0, limit).await.is_some(),
        "a client stuck inside its startup packet was not closed within {limit:?}\n{}",
        tp.logs()
    );

    // Round 3: a whole startup packet, then no answer to the password request.
    let t0 = Instant::now();
    let mut mute = TcpStream::connect(addr).await.expect("connect");
    mute.write_all(&packet).await.expect("write");
    assert!(
        closed_within(&mut mute, t0, limit).await.is_some(),
        "a client that never answered the password request was not closed within {limit:?}\n{}",
        tp.logs()
    );
    let third = login(&tp).await.unwrap_or_else(|e| {
        panic!(
            "slots of the timed-out clients still taken: {e}\n{}",
            tp.logs()
        )
    });
    third.terminate().await;

    // The idle authenticated sessions, by now idle for 3 timeouts and more, are still there.
    for (i, conn) in idle.iter_mut().enumerate() {
        select(conn, 100 + i as u32).await.unwrap_or_else(|e| {
            panic!(
                "idle authenticated client {} was dropped: {e}\n{}",
                i + 1,
                tp.logs()
            )
        });
    }
    for conn in idle {
        conn.terminate().await;
    }
}

/// Sends an SSLRequest, reads the one-byte answer, waits a second, again, for at most `limit`
/// (or until the server closes the connection). Returns (closed, answers, elapsed).
async fn repeat_ssl_requests(port: u16, limit: Duration) -> (bool, usize, Duration) {
    let mut s = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect");
    let t0 = Instant::now();
    let mut answers = 0;
    while t0.elapsed() <= limit {
        if s.write_all(&SSL_REQUEST).await.is_err() {
            return (true, answers, t0.elapsed());
        }
        let mut byte = [0u8; 1];
        match tokio::time::timeout(Duration::from_secs(2), s.read(&mut byte)).await {
            Ok(Ok(1)) if byte[0] == b'N' || byte[0] == b'S' => answers += 1,
            // Closed, reset, or an ErrorResponse: the server ended it.
            Ok(_) => return (true, answers, t0.elapsed()),
            Err(_) => panic!("no answer to an SSLRequest within 2 s"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    (false, answers, t0.elapsed())
}

/// Postgres bounds the whole startup (negotiation, startup packet, authentication) by one
/// authentication_timeout, and answers a second SSLRequest on the same connection with a FATAL
/// error (postmaster.c, ProcessStartupPacket: SSL is negotiated once). A client that sends an
/// SSLRequest, reads the 'N' and sends another one every second never gets further; through
/// the gateway it must not hold its slot past the auth timeout.
///
/// Fails today: serve_tcp (gateway/src/session.rs) runs each read_startup under a fresh
/// `with_timeout(auth_timeout)` and loops after answering 'N', so every SSLRequest restarts the
/// clock (and serve() does the same for an SSLRequest or GSSENCRequest after negotiation): any
/// client can hold a --max-clients slot forever. One deadline for the whole startup, as
/// Postgres does, fixes both.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn repeated_ssl_requests_do_not_extend_the_startup_deadline() {
    let pg = PgCluster::start();
    let limit = Duration::from_secs(AUTH_TIMEOUT_S) + SLACK;
    let (closed, answers, _) = repeat_ssl_requests(pg.port(), limit).await;
    assert!(
        closed && answers == 1,
        "Postgres: closed {closed} after {answers} answers"
    );

    let tp = start(&pg);
    let (closed, answers, took) = repeat_ssl_requests(tp.gateway_port(), limit).await;
    assert!(
        closed,
        "a client repeating SSLRequest ({answers} answered) was still connected after \
         {took:?}, past --auth-timeout-seconds {AUTH_TIMEOUT_S}: each request restarts the timeout"
    );
}

/// A client that gives up while its login waits (here: for the pool's only backend, held in a
/// transaction by another session) must give its --max-clients slot back when it leaves, not
/// when --auth-timeout-seconds runs out: under load, clients time out and retry, and each
/// abandoned login would otherwise hold a slot for the whole timeout.
///
/// The gateway watches the client socket while it waits for the pooler (found by
/// perf/firehose_scale.sh: with 50,000 connections four gateways held 4 × 19,000 slots for
/// 26,078 live clients). The pooler's login cache is off here, so the login really waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_gives_up_during_login_frees_its_slot() {
    let pg = PgCluster::start();
    let mut opts = TidepoolOpts::default().pool_size(1);
    opts.extra_gateway_args = vec![
        "--max-clients".into(),
        "2".into(),
        "--auth-timeout-seconds".into(),
        "30".into(),
    ];
    opts.extra_pooler_args = vec!["--login-cache-seconds".into(), "0".into()];
    let tp = Tidepool::start(&pg, opts);
    let mut holder = login(&tp)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", tp.logs()));
    holder
        .send(Frontend::new().query("BEGIN; SELECT 1").bytes())
        .await
        .expect("send");
    let events = holder.recv_until(b'Z', Duration::from_secs(10)).await;
    assert!(
        format!("{events:?}").ends_with("ReadyForQuery(T)]"),
        "{events:?}"
    );

    // A login that cannot finish while the backend is held; the client gives up after 2 s.
    let waiting = tokio::time::timeout(Duration::from_secs(2), login(&tp)).await;
    assert!(
        waiting.is_err(),
        "the login finished while the only backend was held: this test no longer makes a login \
         wait ({:?})",
        waiting.map(|r| r.map(|_| ()))
    );
    // Dropped: its socket is closed. The slot should be free within a moment.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let next = tokio::time::timeout(Duration::from_secs(2), login(&tp)).await;
    if let Ok(Err(ConnectError::Server(e))) = &next {
        panic!(
            "the next client was refused ({e}) although the client before it left: its \
             slot stays taken until --auth-timeout-seconds"
        );
    }
    holder.terminate().await;
}
