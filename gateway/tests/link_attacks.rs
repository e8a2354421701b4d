//! Link-level attacks by one logged-in client (issue 12 §3), each shown not to reach the other
//! sessions: a session whose requests pile up in the pooler no longer stops the link all
//! sessions share; session ids are never given to a second session while the first lives; a
//! `Parse` with 32,768 or more parameter types is still judged (the `synchronous_commit`
//! guard). Real Postgres, real pooler and gateway, real sockets.

use std::time::{Duration, Instant};
use testkit::wire::{Event, Frontend, Message};
use testkit::{PgCluster, Tidepool, TidepoolOpts, ALICE, APP_DB};

fn messages(events: &[Event]) -> Vec<&Message> {
    events
        .iter()
        .filter_map(|e| match e {
            Event::Message(m) => Some(m),
            _ => None,
        })
        .collect()
}

fn row_count(m: &[tokio_postgres::SimpleQueryMessage]) -> usize {
    m.iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::Row(_)))
        .count()
}

/// One core and one link each way: every session shares the one link.
fn one_link(pg: &PgCluster) -> Tidepool {
    Tidepool::start(
        pg,
        TidepoolOpts {
            cores: 1,
            ..TidepoolOpts::default()
        }
        .gateway_arg("--links-per-core")
        .gateway_arg("1"),
    )
}

/// Resident memory of a process, in bytes.
fn rss(pid: u32) -> u64 {
    testkit::process::rss_kib(pid) * 1024
}

const PIPELINED: usize = 24;

/// A session sleeps in Postgres with 24 MiB of requests pipelined behind it (1 MiB queries:
/// far past what the pooler queues per session). Before, the pooler's link reader waited for
/// that session's inbox, so every other session on the link froze until the sleep ended, and
/// so did cancels. Now the gateway stops reading that one client (per-session window, acked
/// by the pooler): another session's queries answer at once, the cancel arrives, and the
/// pipeline then completes in order.
#[tokio::test]
async fn a_session_with_a_full_inbox_does_not_stall_its_link() {
    let pg = PgCluster::start();
    let tp = one_link(&pg);
    tokio::time::timeout(Duration::from_secs(120), async {
        let mut a = tp.endpoint().raw(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let (pid, secret) = a.backend_key().unwrap();
        let b = tp
            .endpoint()
            .connect(ALICE.0, ALICE.1, APP_DB)
            .await
            .unwrap();
        b.simple_query("select 1").await.unwrap();

        let filler = format!("select 1 as x -- {}", "x".repeat(1 << 20));
        let mut pipeline = Frontend::new().query("select pg_sleep(20)");
        for _ in 0..PIPELINED {
            pipeline = pipeline.query(&filler);
        }
        let before = (rss(tp.gateway_pid()), rss(tp.pooler_pid()));
        let bytes = pipeline.bytes().to_vec();
        let started = Instant::now();
        let a_task = tokio::spawn(async move {
            a.send(&bytes).await.unwrap();
            let mut events = Vec::new();
            for _ in 0..PIPELINED + 1 {
                events.extend(a.recv_until(b'Z', Duration::from_secs(60)).await);
            }
            events
        });
        // Let the pipeline reach the pooler and pile up there.
        tokio::time::sleep(Duration::from_millis(1500)).await;
        // Memory stays bounded: the requests wait in the client's socket, not in our processes
        // (before, the gateway read all of them into the link).
        let during = (rss(tp.gateway_pid()), rss(tp.pooler_pid()));
        let grew = (
            during.0.saturating_sub(before.0) >> 20,
            during.1.saturating_sub(before.1) >> 20,
        );
        println!(
            "memory growth while {PIPELINED} MiB wait: gateway {} MiB, pooler {} MiB",
            grew.0, grew.1
        );
        assert!(
            grew.0 < 12 && grew.1 < 12,
            "gateway grew {} MiB, pooler {} MiB with {PIPELINED} MiB pipelined",
            grew.0,
            grew.1
        );

        let mut worst = Duration::ZERO;
        let mut each = Vec::new();
        for i in 0..5 {
            let t = Instant::now();
            let rows = tokio::time::timeout(
                Duration::from_secs(10),
                b.simple_query(&format!("select {i} + 1")),
            )
            .await
            .expect("another session's query on the same link answered")
            .unwrap();
            worst = worst.max(t.elapsed());
            each.push(t.elapsed());
            assert_eq!(row_count(&rows), 1);
        }
        println!("other session during the stall: {each:?}");
        assert!(
            worst < Duration::from_secs(2),
            "other session waited {worst:?}: the link stalled"
        );

        // The cancel travels the same link: it must arrive while pg_sleep(20) runs.
        let mut c = tp.endpoint().raw_tcp().await.unwrap();
        c.send(Frontend::new().cancel_request(pid, secret).bytes())
            .await
            .unwrap();
        let events = a_task.await.unwrap();
        let took = started.elapsed();
        let msgs = messages(&events);
        let errors: Vec<String> = msgs
            .iter()
            .filter_map(|m| m.error())
            .map(|e| e.code().to_string())
            .collect();
        // The sleep is cancelled. Seen once in about ten runs here: the first 1 MiB query after
        // it got 57014 too. Likely Postgres's own race: the postmaster sends SIGINT to the
        // backend and then to its process group (postmaster.c, signal_child), and a second
        // signal handled after the first query's error cancels the next one. Allowed, as long
        // as every other query answers.
        assert!(
            !errors.is_empty() && errors.len() <= 2 && errors.iter().all(|c| c == "57014"),
            "{errors:?}"
        );
        let first = msgs.iter().position(|m| m.error().is_some()).unwrap();
        assert!(
            msgs[..first].iter().all(|m| m.tag == b'T'),
            "the sleep is what the cancel stopped"
        );
        let rows = msgs.iter().filter(|m| m.tag == b'D').count();
        let ready = msgs.iter().filter(|m| m.tag == b'Z').count();
        assert_eq!(
            (rows + errors.len() - 1, ready),
            (PIPELINED, PIPELINED + 1),
            "the pipeline completes in order"
        );
        println!("cancel + {PIPELINED} MiB pipeline done after {took:?}");
        assert!(
            took < Duration::from_secs(15),
            "the cancel did not get through while the session slept ({took:?})"
        );
        // And the other session is still fine.
        b.simple_query("select 1").await.unwrap();
    })
    .await
    .expect("test took more than 120 s");
}

/// With 4 session ids per core (a hidden test flag; normally 2³²−1), a session that stays
/// open keeps its id while 20 others come and go: before, the counter wrapped onto it, the
/// new session replaced it in the gateway's link and in the pooler, and the first session
/// lost its transaction. When every id is in use, a new client is refused (53300).
#[tokio::test]
async fn session_ids_are_never_reused_while_live() {
    let pg = PgCluster::start();
    let tp = Tidepool::start(
        &pg,
        TidepoolOpts {
            cores: 1,
            ..TidepoolOpts::default()
        }
        .gateway_arg("--session-ids")
        .gateway_arg("4"),
    );
    tokio::time::timeout(Duration::from_secs(120), async {
        let a = tp
            .endpoint()
            .connect(ALICE.0, ALICE.1, APP_DB)
            .await
            .unwrap();
        a.batch_execute("begin; create temp table kept (v int); insert into kept values (7)")
            .await
            .unwrap();
        for i in 0..20 {
            let c = tp
                .endpoint()
                .connect(ALICE.0, ALICE.1, APP_DB)
                .await
                .unwrap();
            let rows = c.simple_query(&format!("select {i}")).await.unwrap();
            assert_eq!(row_count(&rows), 1);
            drop(c);
            // The gateway frees an id when the session is gone, a moment after the client.
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        let v: i32 = tokio::time::timeout(
            Duration::from_secs(10),
            a.query_one("select v from kept", &[]),
        )
        .await
        .expect("the first session still answers")
        .unwrap()
        .get(0);
        assert_eq!(v, 7, "the first session kept its transaction");
        a.batch_execute("commit").await.unwrap();

        // Four ids: a and three more hold them all; the fifth client is refused.
        let mut held = Vec::new();
        for _ in 0..3 {
            held.push(
                tp.endpoint()
                    .connect(ALICE.0, ALICE.1, APP_DB)
                    .await
                    .unwrap(),
            );
        }
        let Err(e) = tp.endpoint().connect(ALICE.0, ALICE.1, APP_DB).await else {
            panic!("a fifth session got an id: only 4 exist");
        };
        assert_eq!(e.code().map(|c| c.code()), Some("53300"), "{e}");
        for c in &held {
            c.simple_query("select 1").await.unwrap();
        }
        a.simple_query("select 1").await.unwrap();
    })
    .await
    .expect("test took more than 120 s");
}

/// A `Parse` declaring 40,000 parameter types (negative when read as an i16) of `SET
/// synchronous_commit = off`, bound and run: refused with 42501 as any other form, and the
/// setting stays `on`. Before, the gateway could not decode it, passed it on unjudged, and
/// Postgres (which reads the count unsigned) ran it.
#[tokio::test]
async fn a_parse_with_40000_parameters_is_still_judged() {
    let pg = PgCluster::start();
    pg.psql_admin("ALTER SYSTEM SET synchronous_commit = on");
    pg.psql_admin("SELECT pg_reload_conf()");
    let tp = Tidepool::start(&pg, TidepoolOpts::default());
    tokio::time::timeout(Duration::from_secs(60), async {
        let mut a = tp.endpoint().raw(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let n: u16 = 40_000;
        let mut parse = b"\0set synchronous_commit = off\0".to_vec();
        parse.extend_from_slice(&n.to_be_bytes());
        for _ in 0..n {
            parse.extend_from_slice(&23u32.to_be_bytes());
        }
        let mut bind = b"\0\0".to_vec();
        bind.extend_from_slice(&0u16.to_be_bytes());
        bind.extend_from_slice(&n.to_be_bytes());
        for _ in 0..n {
            bind.extend_from_slice(&(-1i32).to_be_bytes());
        }
        bind.extend_from_slice(&0u16.to_be_bytes());
        let msgs = Frontend::new()
            .message(b'P', &parse)
            .message(b'B', &bind)
            .execute("", 0)
            .sync()
            .query("show synchronous_commit");
        a.send(msgs.bytes()).await.unwrap();
        let mut events = a.recv_until(b'Z', Duration::from_secs(20)).await;
        events.extend(a.recv_until(b'Z', Duration::from_secs(20)).await);
        let msgs = messages(&events);
        let errors: Vec<String> = msgs
            .iter()
            .filter_map(|m| m.error())
            .map(|e| e.code().to_string())
            .collect();
        assert_eq!(errors, vec!["42501".to_string()], "{events:?}");
        let shown = msgs
            .iter()
            .find(|m| m.tag == b'D')
            .map(|m| m.render())
            .unwrap_or_default();
        assert!(shown.contains("on"), "synchronous_commit now {shown}");
        assert!(!shown.contains("off"), "synchronous_commit now {shown}");
    })
    .await
    .expect("test took more than 60 s");
}

/// The request window in the other direction of use: 32 MiB of COPY data from one client (32
/// windows, so it completes only if the pooler's acknowledgements keep coming) while another
/// session on the same link keeps answering.
#[tokio::test]
async fn a_large_copy_in_flows_through_the_window() {
    let pg = PgCluster::start();
    let tp = one_link(&pg);
    tokio::time::timeout(Duration::from_secs(180), async {
        let mut a = tp.endpoint().raw(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let b = tp
            .endpoint()
            .connect(ALICE.0, ALICE.1, APP_DB)
            .await
            .unwrap();
        let line = format!("{}\n", "y".repeat(1023));
        let chunk = line.repeat(64); // 64 KiB
        let mut msgs = Frontend::new()
            .query("create temp table big (t text)")
            .query("copy big from stdin");
        for _ in 0..512 {
            msgs = msgs.copy_data(chunk.as_bytes());
        }
        let msgs = msgs.copy_done().query("select count(*) from big");
        let bytes = msgs.bytes().to_vec();
        let task = tokio::spawn(async move {
            a.send(&bytes).await.unwrap();
            let mut events = Vec::new();
            for _ in 0..3 {
                events.extend(a.recv_until(b'Z', Duration::from_secs(120)).await);
            }
            events
        });
        while !task.is_finished() {
            let t = Instant::now();
            let rows = b.simple_query("select 1").await.unwrap();
            assert_eq!(row_count(&rows), 1);
            assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let events = task.await.unwrap();
        let msgs = messages(&events);
        assert!(msgs.iter().all(|m| m.error().is_none()), "{events:?}");
        let count = msgs
            .iter()
            .find(|m| m.tag == b'D')
            .map(|m| m.render())
            .unwrap_or_default();
        assert!(count.contains(&(512 * 64).to_string()), "{count}");
    })
    .await
    .expect("test took more than 180 s");
}

/// The pooler's own guard: a peer that holds the link secret but ignores the window (sends
/// past twice it without waiting for `ACK`) loses that session (`CLOSED`, 08P01), not the link:
/// a second session on the same connection opens and answers, and the pooler never stopped
/// reading.
#[test]
fn a_gateway_past_the_window_loses_the_session_not_the_link() {
    use shared::link::{self, down, handshake, up, Credential, LinkKey, Open, HEADER};
    use std::io::{Read, Write};
    use std::net::TcpStream;

    fn read_frame(s: &mut TcpStream) -> (u8, u32, Vec<u8>) {
        let mut h = [0u8; HEADER];
        s.read_exact(&mut h).expect("a frame within 10 s");
        let h = link::parse_header(&h).unwrap();
        let mut p = vec![0u8; h.len];
        s.read_exact(&mut p).expect("frame payload");
        (h.kind, h.session, p)
    }
    /// Frames until one of `kind` for `session`; the others (DATA, ROLE, ACK...) are collected.
    fn until(s: &mut TcpStream, kind: u8, session: u32) -> (Vec<u8>, Vec<(u8, u32)>) {
        let mut seen = Vec::new();
        loop {
            let mut h = [0u8; HEADER];
            if let Err(e) = s.read_exact(&mut h) {
                panic!("no frame {kind} for session {session} within 10 s ({e}); saw {seen:?}");
            }
            let h = link::parse_header(&h).unwrap();
            let mut p = vec![0u8; h.len];
            s.read_exact(&mut p).expect("frame payload");
            let (k, id) = (h.kind, h.session);
            if k == kind && id == session {
                return (p, seen);
            }
            seen.push((k, id));
        }
    }
    fn frame(kind: u8, session: u32, payload: &[u8]) -> Vec<u8> {
        let mut b = Vec::new();
        link::put_frame(&mut b, kind, session, payload);
        b
    }
    fn query(sql: &str) -> Vec<u8> {
        let mut m = vec![0u8, b'Q'];
        m.extend_from_slice(&(sql.len() as u32 + 5).to_be_bytes());
        m.extend_from_slice(sql.as_bytes());
        m.push(0);
        m
    }

    let pg = PgCluster::start();
    let tp = one_link(&pg);
    let mut s = TcpStream::connect(("127.0.0.1", tp.pooler_port())).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let key = LinkKey::load(&testkit::link_secret_file()).unwrap();
    let (kind, _, challenge) = read_frame(&mut s);
    let (hello, hs) = handshake::Gateway::answer(&key, kind, &challenge).unwrap();
    s.write_all(&hello).unwrap();
    let (kind, _, welcome) = read_frame(&mut s);
    hs.finish(kind, &welcome).unwrap();

    // bob's md5 verifier, as a gateway gets it, then two sessions as bob.
    s.write_all(&frame(up::AUTH_LOOKUP, 1, testkit::BOB.0.as_bytes()))
        .unwrap();
    let (info, _) = until(&mut s, down::AUTH_INFO, 1);
    assert_eq!(info[0], 1, "bob's verifier");
    let stored = shared::role::RoleInfo::decode(&info[1..])
        .and_then(|r| r.password)
        .expect("bob has a password");
    let open = |id: u32, s: &mut TcpStream| {
        let o = Open {
            user: testkit::BOB.0.into(),
            database: APP_DB.into(),
            pid: id as i32,
            secret: 7,
            credential: Credential::Md5 {
                stored: stored.clone(),
            },
            settings: Default::default(),
        };
        let mut p = Vec::new();
        o.encode(&mut p);
        s.write_all(&frame(up::OPEN, id, &p)).unwrap();
        until(s, down::OPENED, id);
    };
    open(1, &mut s);

    // A sleep, then 24 MiB at once: past twice the 1 MiB window, and past what the backend's
    // queue (1 MiB) and the kernel's socket buffers to Postgres absorb while it sleeps.
    let mut burst = frame(up::MSGS, 1, &query("select pg_sleep(5)"));
    let filler = query(&format!("select 1 -- {}", "x".repeat(1 << 20)));
    for _ in 0..24 {
        burst.extend(frame(up::MSGS, 1, &filler));
    }
    let started = Instant::now();
    s.write_all(&burst).unwrap();
    let (last_words, _) = until(&mut s, down::CLOSED, 1);
    let text = String::from_utf8_lossy(&last_words).into_owned();
    assert!(text.contains("08P01") && text.contains("window"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "closed only after {:?}: the reader waited for the session",
        started.elapsed()
    );

    // The link is fine: another session opens and answers.
    open(2, &mut s);
    s.write_all(&frame(up::MSGS, 2, &query("select 40 + 2")))
        .unwrap();
    let mut data = Vec::new();
    while !data.windows(2).any(|w| w == b"42") {
        let (k, id, p) = read_frame(&mut s);
        if k == down::DATA && id == 2 {
            data.extend(p);
        }
    }
}
