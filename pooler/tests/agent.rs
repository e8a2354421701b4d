//! The pooler as the agent of its Postgres (shared::agent), against real replicated
//! PostgreSQL 15 nodes: reports, a failover by hand (recruit, promote, follow, rewind of the old
//! primary), a switchover's fence, a frozen Postgres, a killed postmaster, and the ROLE frames
//! the links send to gateways.

use shared::agent::{call, Report, Request, Response, Role, Upstream};
use shared::link::{self, down, HEADER};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::thread;
use std::time::{Duration, Instant};
use testkit::replication::{AgentPooler, Node};

const CALL: Duration = Duration::from_secs(30);

fn ask(a: &AgentPooler, req: Request) -> Response {
    call(a.agent_addr(), &a.key(), &req, CALL)
        .unwrap_or_else(|e| panic!("agent call {req:?}: {e}\n{}", a.log_tail()))
}

fn ok(a: &AgentPooler, req: Request) -> Report {
    match ask(a, req.clone()) {
        Response::Ok { report } => report,
        Response::Refused { reason, .. } => {
            panic!("{req:?} refused: {reason}\n{}", a.log_tail())
        }
    }
}

fn refused(a: &AgentPooler, req: Request) -> String {
    match ask(a, req.clone()) {
        Response::Refused { reason, .. } => reason,
        Response::Ok { report } => panic!("{req:?} accepted: {report:?}"),
    }
}

fn report(a: &AgentPooler) -> Report {
    ok(a, Request::Report)
}

/// A raw connection past the handshake, as the control process makes it.
fn authenticated(
    a: &AgentPooler,
) -> (TcpStream, BufReader<TcpStream>, shared::agent::auth::Sealed) {
    let c = TcpStream::connect(a.agent_addr()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut w = c;
    let mut challenge = Vec::new();
    r.read_until(b'\n', &mut challenge).unwrap();
    let (answer, hs) = shared::agent::auth::ClientHandshake::answer(&a.key(), &challenge).unwrap();
    w.write_all(&answer).unwrap();
    let mut proof = Vec::new();
    r.read_until(b'\n', &mut proof).unwrap();
    let sealed = hs.finish(&proof).unwrap();
    (w, r, sealed)
}

/// Polls reports until `pred` holds (at most `timeout`).
fn report_until(a: &AgentPooler, timeout: Duration, pred: impl Fn(&Report) -> bool) -> Report {
    let deadline = Instant::now() + timeout;
    loop {
        let r = report(a);
        if pred(&r) {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "report never matched: {r:?}\n{}",
            a.log_tail()
        );
        thread::sleep(Duration::from_millis(100));
    }
}

fn at(node: &Node) -> Upstream {
    Upstream {
        host: "127.0.0.1".into(),
        port: node.port(),
    }
}

/// A raw link to a pooler, authenticated as a gateway with the test process's link secret
/// (`shared::link::handshake`): ready to read ROLE frames.
fn link_to(a: &AgentPooler) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", a.listen_port)).expect("link connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let frame = |s: &mut TcpStream| {
        let mut h = [0u8; HEADER];
        s.read_exact(&mut h).expect("handshake frame header");
        let h = link::parse_header(&h).expect("header");
        let mut payload = vec![0u8; h.len];
        s.read_exact(&mut payload).expect("handshake frame payload");
        (h.kind, payload)
    };
    let key = link::LinkKey::load(&testkit::link_secret_file()).expect("link secret");
    let (kind, challenge) = frame(&mut s);
    let (hello, hs) = link::handshake::Gateway::answer(&key, kind, &challenge).expect("CHALLENGE");
    s.write_all(&hello).expect("HELLO");
    let (kind, welcome) = frame(&mut s);
    hs.finish(kind, &welcome)
        .expect("the pooler proves the link secret");
    s
}

/// The next ROLE frame on the link: (role, primary_term).
fn next_role(s: &mut TcpStream) -> (Role, u64) {
    loop {
        let mut h = [0u8; HEADER];
        s.read_exact(&mut h)
            .expect("frame header (ROLE within 10 s)");
        let h = link::parse_header(&h).expect("header");
        let mut payload = vec![0u8; h.len];
        s.read_exact(&mut payload).expect("frame payload");
        if h.kind == down::ROLE {
            assert_eq!(h.session, 0);
            assert_eq!(
                payload.len(),
                17,
                "ROLE payload: u8 role, u64 term, u64 lsn"
            );
            let term = u64::from_be_bytes(payload[1..9].try_into().unwrap());
            return (Role::from_u8(payload[0]), term);
        }
    }
}

/// ROLE frames until one equals `want` (bounded).
fn role_until(s: &mut TcpStream, want: (Role, u64)) {
    for _ in 0..20 {
        if next_role(s) == want {
            return;
        }
    }
    panic!("no ROLE frame {want:?}");
}

#[test]
fn reports_of_a_primary_and_a_standby_and_role_frames() {
    let p = Node::primary("n1");
    let s = Node::standby_of(&p, "n2");
    let ap = AgentPooler::start(&p, &["--zone", "z1"]);
    let as_ = AgentPooler::start(&s, &[]);
    p.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (1)");

    let rp = report_until(&ap, Duration::from_secs(20), |r| {
        r.replicas
            .iter()
            .any(|x| x.name == "n2" && x.state == "streaming")
    });
    assert_eq!(rp.role, Role::Primary);
    assert_eq!((rp.node.as_str(), rp.zone.as_str()), ("n1", "z1"));
    assert_eq!(rp.timeline, 1);
    assert_eq!(rp.term, 0);
    assert_eq!(rp.pg_port, p.port());
    assert!(rp.flush_lsn.is_some() && rp.replay_lsn == rp.flush_lsn);
    assert_eq!(rp.postgres_pid, p.postmaster_pid());
    assert_eq!(rp.replicas[0].sync_state, "async");
    assert!(rp.problem.is_none() && !rp.recruited);

    let rs = report_until(&as_, Duration::from_secs(20), |r| {
        r.streaming && r.replay_lsn >= rp.flush_lsn
    });
    assert_eq!(rs.role, Role::Standby);
    assert_eq!(rs.upstream, Some(at(&p)));
    assert_eq!(rs.timeline, 1);
    assert!(rs.receipt_age_ms.is_some_and(|ms| ms < 10_000), "{rs:?}");
    assert!(rs.flush_lsn >= rs.replay_lsn);

    // The links tell gateways the role: the primary at term 0, a standby.
    assert_eq!(next_role(&mut link_to(&ap)), (Role::Primary, 0));
    assert_eq!(next_role(&mut link_to(&as_)), (Role::Standby, 0));

    // Garbage (from a peer that holds the secret) gets a refusal on the same connection,
    // which still serves the next line. agent_auth.rs: a peer without it gets nothing.
    let (mut c, mut r, mut sealed) = authenticated(&ap);
    for l in [
        &b"{\"op\":\"explode\"}"[..],
        b"not json",
        b"{\"op\":\"report\"}",
    ] {
        let line = sealed.seal(l);
        c.write_all(&line).unwrap();
    }
    let mut answer = |r: &mut BufReader<TcpStream>| {
        let mut line = Vec::new();
        r.read_until(b'\n', &mut line).unwrap();
        serde_json::from_slice::<Response>(sealed.open(&line).expect("sealed answer")).unwrap()
    };
    for _ in 0..2 {
        match answer(&mut r) {
            Response::Refused { reason, .. } => {
                assert!(reason.contains("not a request"), "{reason}")
            }
            r => panic!("{r:?}"),
        }
    }
    assert!(matches!(answer(&mut r), Response::Ok { .. }));
    // A line longer than MAX_LINE is refused, not buffered without end.
    let (mut c, r, _) = authenticated(&ap);
    let _ = c.write_all(&vec![b'x'; shared::agent::MAX_LINE + 10]);
    let mut line = String::new();
    BufReader::new(r.into_inner()).read_line(&mut line).unwrap();
    assert!(line.contains("longer than"), "{line}");
}

#[test]
fn failover_by_hand_recruit_promote_follow_and_rewind() {
    let p = Node::primary("n1");
    let s1 = Node::standby_of(&p, "n2");
    let s2 = Node::standby_of(&p, "n3");
    let ap = AgentPooler::start(&p, &[]);
    let mut a1 = AgentPooler::start(&s1, &[]);
    let a2 = AgentPooler::start(&s2, &[]);
    p.psql("CREATE TABLE t (x text); INSERT INTO t VALUES ('before')");
    let lsn = report(&ap).flush_lsn;
    for a in [&a1, &a2] {
        report_until(a, Duration::from_secs(20), |r| {
            r.streaming && r.replay_lsn >= lsn
        });
    }

    // Recruits stop streaming and have replayed all they received.
    for a in [&a1, &a2] {
        let r = ok(a, Request::Recruit { term: 1 });
        assert_eq!(
            (r.role, r.term, r.recruited, r.streaming),
            (Role::Standby, 1, true, false)
        );
        assert!(r.replay_lsn >= r.flush_lsn, "{r:?}");
        assert!(r.upstream.is_none(), "{r:?}");
    }
    // The old primary commits what no recruit will ever see, then crashes.
    p.psql("INSERT INTO t VALUES ('lost')");
    thread::sleep(Duration::from_millis(300));
    assert_eq!(s1.psql("SELECT count(*) FROM t WHERE x = 'lost'"), "0");
    p.stop("immediate");
    // A node whose Postgres is down still pledges (and says it is down).
    let rp = ok(&ap, Request::Recruit { term: 1 });
    assert_eq!((rp.role, rp.term), (Role::Down, 1));
    assert!(rp.problem.is_some());

    // The pledge is durable: a restarted agent remembers it and refuses the same term.
    let pledge = std::fs::read_to_string(s1.dir().join("tidepool-node.json")).unwrap();
    assert!(pledge.contains("\"term\":1"), "{pledge}");
    let (lp, ag) = (a1.listen_port, a1.agent_port);
    a1.kill();
    drop(a1);
    a1 = AgentPooler::start_on(&s1, lp, ag, &[]);
    assert_eq!(report(&a1).term, 1);
    assert!(refused(&a1, Request::Recruit { term: 1 }).contains("not above"));
    assert!(refused(
        &a1,
        Request::Promote {
            term: 2,
            sync_names: String::new()
        }
    )
    .contains("pledged"));

    // Promote n2: a gateway's link sees it become the primary of term 1.
    let mut link = link_to(&a1);
    assert_eq!(next_role(&mut link), (Role::Standby, 0));
    let r = ok(
        &a1,
        Request::Promote {
            term: 1,
            sync_names: String::new(),
        },
    );
    assert_eq!(
        (r.role, r.primary_term, r.recruited),
        (Role::Primary, 1, false)
    );
    assert_eq!(r.timeline, 2);
    role_until(&mut link, (Role::Primary, 1));
    s1.psql("INSERT INTO t VALUES ('after')");

    // n3 follows n2 across the timeline switch.
    assert!(refused(
        &a2,
        Request::Follow {
            term: 0,
            primary: at(&s1)
        }
    )
    .contains("below"));
    let r = ok(
        &a2,
        Request::Follow {
            term: 1,
            primary: at(&s1),
        },
    );
    assert_eq!((r.role, r.recruited), (Role::Standby, false));
    assert_eq!(r.upstream, Some(at(&s1)));
    s2.wait_for(
        "SELECT string_agg(x, ',' ORDER BY x) FROM t",
        "after,before",
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", a2.log_tail()));

    // The crashed old primary is rewound (its 'lost' commit is gone) and streams from n2.
    assert!(refused(
        &ap,
        Request::Follow {
            term: 1,
            primary: at(&p)
        }
    )
    .contains("itself"));
    let r = ok(
        &ap,
        Request::Follow {
            term: 1,
            primary: at(&s1),
        },
    );
    assert_eq!(r.role, Role::Standby, "{r:?}");
    p.wait_for(
        "SELECT string_agg(x, ',' ORDER BY x) FROM t",
        "after,before",
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", ap.log_tail()));
    report_until(&ap, Duration::from_secs(20), |r| {
        r.streaming && r.timeline == 2
    });
    // It kept its own port (a rewind copies the source's configuration files).
    assert_eq!(p.psql("SHOW port"), p.port().to_string());

    // n2 makes n3 synchronous: a commit on n2 now needs n3.
    let r = ok(
        &a1,
        Request::SetSync {
            term: 1,
            sync_names: "FIRST 1 (n3)".into(),
        },
    );
    assert_eq!(r.sync_names, "FIRST 1 (n3)");
    report_until(&a1, Duration::from_secs(20), |r| {
        r.replicas
            .iter()
            .any(|x| x.name == "n3" && x.sync_state == "sync")
            && r.replicas.iter().any(|x| x.name == "n1")
    });
    s1.psql("INSERT INTO t VALUES ('sync')");
    assert_eq!(s2.psql("SELECT count(*) FROM t WHERE x = 'sync'"), "1");
    assert!(refused(
        &a2,
        Request::SetSync {
            term: 1,
            sync_names: String::new()
        }
    )
    .contains("not a primary"));
}

#[test]
fn switchover_fence_then_cancelled() {
    let p = Node::primary("n1");
    let s = Node::standby_of(&p, "n2");
    let ap = AgentPooler::start(&p, &["--agent-wait-ms", "2000"]);
    let _as = AgentPooler::start(&s, &[]);
    p.psql("CREATE TABLE t (x int)");

    let r = ok(&ap, Request::Recruit { term: 1 });
    assert_eq!((r.role, r.recruited, r.term), (Role::Primary, true, 1));
    assert_eq!(r.sync_names, "\"tidepool_fenced\"");
    // New transactions are read-only; one that insists cannot complete its commit.
    let out = p.try_psql("INSERT INTO t VALUES (1)");
    assert!(out.text.contains("read-only transaction"), "{}", out.text);
    // (statement_timeout does not cover a COMMIT's wait: the test cancels it once it waits.)
    let out = thread::scope(|scope| {
        let writer =
            scope.spawn(|| p.try_psql("BEGIN READ WRITE; INSERT INTO t VALUES (2); COMMIT;"));
        p.wait_for(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event = 'SyncRep'",
            "1",
            Duration::from_secs(15),
        )
        .expect("the commit waits for a standby that does not exist");
        p.psql("SELECT pg_cancel_backend(pid) FROM pg_stat_activity WHERE wait_event = 'SyncRep'");
        writer.join().unwrap()
    });
    assert!(
        out.text
            .contains("canceling wait for synchronous replication"),
        "{}",
        out.text
    );
    // Not a primary for SetSync while fenced.
    assert!(refused(
        &ap,
        Request::SetSync {
            term: 1,
            sync_names: String::new()
        }
    )
    .contains("fenced"));
    // Cancelled: the old primary is promoted at the new term; it takes writes again.
    let r = ok(
        &ap,
        Request::Promote {
            term: 1,
            sync_names: String::new(),
        },
    );
    assert_eq!(
        (r.role, r.primary_term, r.recruited),
        (Role::Primary, 1, false)
    );
    assert_eq!(r.sync_names, "");
    p.psql("INSERT INTO t VALUES (3)");
}

#[test]
fn a_frozen_postgres_is_down_within_the_timeout() {
    let p = Node::primary("n1");
    let ap = AgentPooler::start(&p, &["--agent-pg-timeout-ms", "500"]);
    assert_eq!(report(&ap).role, Role::Primary);
    let mut link = link_to(&ap);
    assert_eq!(next_role(&mut link), (Role::Primary, 0));
    p.signal_postmaster(libc::SIGSTOP);
    let t = Instant::now();
    let r = report(&ap);
    let took = t.elapsed();
    p.signal_postmaster(libc::SIGCONT);
    assert_eq!(r.role, Role::Down, "{r:?}");
    assert_eq!(r.problem.as_deref(), Some("not answering"));
    assert!(took < Duration::from_secs(3), "report took {took:?}");
    report_until(&ap, Duration::from_secs(20), |r| r.role == Role::Primary);
    // Frozen again long enough for the supervisor to publish it to the links.
    p.signal_postmaster(libc::SIGSTOP);
    let mut seen = None;
    for _ in 0..5 {
        let r = next_role(&mut link);
        if r.0 == Role::Down {
            seen = Some(r);
            break;
        }
    }
    p.signal_postmaster(libc::SIGCONT);
    assert_eq!(seen, Some((Role::Down, 0)));
    role_until(&mut link, (Role::Primary, 0));
}

#[test]
fn supervision_restarts_a_killed_postmaster_not_a_stopped_one() {
    let p = Node::primary("n1");
    let ap = AgentPooler::start(&p, &[]);
    let before = p.postmaster_pid().unwrap();
    p.signal_postmaster(libc::SIGKILL);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if p.postmaster_pid().is_some_and(|pid| pid != before) && p.try_psql("SELECT 1").success() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not restarted\n{}",
            ap.log_tail()
        );
        thread::sleep(Duration::from_millis(200));
    }
    report_until(&ap, Duration::from_secs(10), |r| r.role == Role::Primary);
    // A clean stop is somebody's decision: left alone.
    p.stop("fast");
    let r = report_until(&ap, Duration::from_secs(10), |r| r.role == Role::Down);
    assert!(r.problem.unwrap_or_default().contains("not running"));
    thread::sleep(Duration::from_secs(2));
    assert!(p.postmaster_pid().is_none());
}

#[test]
fn a_standby_ahead_of_the_new_primary_is_rewound_by_follow() {
    let p = Node::primary("n1");
    let s1 = Node::standby_of(&p, "n2");
    let s2 = Node::standby_of(&p, "n3");
    let a1 = AgentPooler::start(&s1, &[]);
    let a2 = AgentPooler::start(&s2, &[]);
    p.psql("CREATE TABLE t (x text); INSERT INTO t VALUES ('before')");
    let lsn = Some(p.psql("SELECT pg_current_wal_flush_lsn()"))
        .as_deref()
        .and_then(shared::agent::parse_lsn);
    for a in [&a1, &a2] {
        report_until(a, Duration::from_secs(20), |r| {
            r.streaming && r.replay_lsn >= lsn
        });
    }
    // n2 stops first; n3 still receives a commit n2 never sees.
    ok(&a1, Request::Recruit { term: 1 });
    p.psql("INSERT INTO t VALUES ('only-n3')");
    s2.wait_for(
        "SELECT count(*) FROM t WHERE x = 'only-n3'",
        "1",
        Duration::from_secs(20),
    )
    .unwrap();
    ok(&a2, Request::Recruit { term: 1 });
    p.stop("immediate");
    ok(
        &a1,
        Request::Promote {
            term: 1,
            sync_names: String::new(),
        },
    );
    s1.psql("INSERT INTO t VALUES ('after')");
    // n3 is past the fork of timeline 2: it cannot stream until rewound.
    let r = ok(
        &a2,
        Request::Follow {
            term: 1,
            primary: at(&s1),
        },
    );
    assert_eq!(r.role, Role::Standby, "{r:?}");
    s2.wait_for(
        "SELECT string_agg(x, ',' ORDER BY x) FROM t",
        "after,before",
        Duration::from_secs(30),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", a2.log_tail()));
    report_until(&a2, Duration::from_secs(20), |r| {
        r.streaming && r.timeline == 2
    });
    assert_eq!(s2.psql("SHOW port"), s2.port().to_string());
}

/// Sends `sig` to the process group of `node`'s postmaster (its backends and WAL senders too).
fn signal_group(node: &Node, sig: libc::c_int) {
    let pid = node.postmaster_pid().expect("postmaster.pid") as libc::pid_t;
    // SAFETY: plain syscalls on the node's own postmaster.
    unsafe {
        let pgid = libc::getpgid(pid);
        assert!(pgid > 1, "process group of {pid}");
        libc::killpg(pgid, sig);
    }
}

#[test]
fn recruiting_a_standby_of_a_frozen_primary_answers_in_time() {
    let p = Node::primary("n1");
    let s = Node::standby_of(&p, "n2");
    let a = AgentPooler::start(&s, &[]);
    p.psql("CREATE TABLE t (x int); INSERT INTO t VALUES (1)");
    report_until(&a, Duration::from_secs(20), |r| r.streaming);
    signal_group(&p, libc::SIGSTOP);
    let t = Instant::now();
    let r = ask(&a, Request::Recruit { term: 1 });
    let took = t.elapsed();
    signal_group(&p, libc::SIGCONT);
    let Response::Ok { report } = r else {
        panic!("{r:?}\n{}", a.log_tail())
    };
    assert_eq!((report.role, report.streaming), (Role::Standby, false));
    assert!(report.flush_lsn.is_some());
    assert!(
        took < Duration::from_secs(12),
        "recruit took {took:?}\n{}",
        a.log_tail()
    );
}
