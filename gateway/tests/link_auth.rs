//! The link between gateway and pooler is authenticated both ways (issue 12 §1): a peer that
//! does not hold the cluster's link secret gets the pooler's challenge and nothing else (no
//! verifier, no session, no role report), and a gateway hands nothing to a pooler that cannot
//! prove the secret. Real Postgres, real pooler and gateway processes; the peers are raw sockets.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shared::link::{self, down, handshake, up, LinkKey, HEADER};
use testkit::{bin_dir, free_port, link_secret_args, link_secret_file, PgCluster, Tidepool};
use testkit::{TidepoolOpts, ALICE, APP_DB};

/// Reads one frame (kind, session, payload); `None` at end of stream or after `timeout`.
fn read_frame(s: &mut TcpStream, timeout: Duration) -> Option<(u8, u32, Vec<u8>)> {
    s.set_read_timeout(Some(timeout)).unwrap();
    let mut head = [0u8; HEADER];
    s.read_exact(&mut head).ok()?;
    let h = link::parse_header(&head).unwrap();
    let mut payload = vec![0u8; h.len];
    s.read_exact(&mut payload).ok()?;
    Some((h.kind, h.session, payload))
}

/// Everything the peer sends until it closes (or 3 s pass: then `closed` is false).
fn rest(s: &mut TcpStream) -> (Vec<u8>, bool) {
    testkit::sockets::read_until_closed(s, Duration::from_secs(3))
}

fn frame(kind: u8, session: u32, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    link::put_frame(&mut b, kind, session, payload);
    b
}

/// What an attacker would send at once: a lookup of a verifier and a session as `postgres`.
fn attack() -> Vec<u8> {
    let mut b = frame(up::AUTH_LOOKUP, 7, b"alice");
    let open = link::Open {
        user: "postgres".into(),
        database: "postgres".into(),
        pid: 1,
        secret: 2,
        credential: link::Credential::None,
        settings: Default::default(),
    };
    let mut p = Vec::new();
    open.encode(&mut p);
    b.extend(frame(up::OPEN, 8, &p));
    let mut q = vec![0u8];
    q.extend_from_slice(b"Q\0\0\0\x0dselect 1\0");
    b.extend(frame(up::MSGS, 8, &q));
    b
}

/// The pooler's challenge: the first and, for a peer without the key, only frame.
fn challenge(s: &mut TcpStream) -> Vec<u8> {
    let (kind, session, payload) =
        read_frame(s, Duration::from_secs(5)).expect("the pooler's challenge");
    assert_eq!((kind, session), (down::CHALLENGE, 0));
    assert_eq!(payload.len(), handshake::CHALLENGE_LEN);
    assert_eq!(&payload[..4], &link::VERSION.to_be_bytes());
    payload
}

#[test]
fn a_peer_without_the_link_secret_gets_nothing() {
    let pg = PgCluster::start();
    let tp = Tidepool::start(&pg, TidepoolOpts::default());
    let addr = ("127.0.0.1", tp.pooler_port());

    // 1. The old protocol: HELLO version 1, then a lookup and a session.
    let mut s = TcpStream::connect(addr).unwrap();
    let mut b = frame(up::HELLO, 0, &1u32.to_be_bytes());
    b.extend(attack());
    s.write_all(&b).unwrap();
    challenge(&mut s);
    let (after, closed) = rest(&mut s);
    assert!(
        after.is_empty(),
        "old-protocol peer got {} bytes",
        after.len()
    );
    assert!(closed, "old-protocol peer not disconnected");

    // 2. A proof made with another key.
    let mut s = TcpStream::connect(addr).unwrap();
    let c = challenge(&mut s);
    let (hello, _) = handshake::Gateway::answer(&LinkKey::generate(), down::CHALLENGE, &c).unwrap();
    let mut b = hello;
    b.extend(attack());
    s.write_all(&b).unwrap();
    let (after, closed) = rest(&mut s);
    assert!(after.is_empty(), "wrong-key peer got {} bytes", after.len());
    assert!(closed, "wrong-key peer not disconnected");

    // 3. No HELLO at all: the attack frames first.
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&attack()).unwrap();
    challenge(&mut s);
    let (after, closed) = rest(&mut s);
    assert!(
        after.is_empty(),
        "peer without HELLO got {} bytes",
        after.len()
    );
    assert!(closed, "peer without HELLO not disconnected");

    // 4. Silence: disconnected after the handshake timeout.
    let mut s = TcpStream::connect(addr).unwrap();
    challenge(&mut s);
    let start = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut buf = [0u8; 16];
    assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    let waited = start.elapsed();
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(9),
        "silent peer closed after {waited:?}"
    );

    // The control: the same attack with the cluster's key is answered (so the refusals above
    // are the handshake's doing, not a broken frame).
    let key = LinkKey::load(&link_secret_file()).unwrap();
    let mut s = TcpStream::connect(addr).unwrap();
    let c = challenge(&mut s);
    let (hello, hs) = handshake::Gateway::answer(&key, down::CHALLENGE, &c).unwrap();
    s.write_all(&hello).unwrap();
    let (kind, _, w) = read_frame(&mut s, Duration::from_secs(5)).expect("WELCOME");
    hs.finish(kind, &w).expect("the pooler proves the key back");
    s.write_all(&frame(up::AUTH_LOOKUP, 7, ALICE.0.as_bytes()))
        .unwrap();
    let mut kinds = Vec::new();
    let found = loop {
        let (kind, session, payload) =
            read_frame(&mut s, Duration::from_secs(5)).expect("answers with the key");
        kinds.push(kind);
        if kind == down::AUTH_INFO {
            assert_eq!(session, 7);
            break payload[0];
        }
    };
    assert_eq!(found, 1, "alice's verifier, with the key");
    assert!(
        kinds.contains(&down::CORE) && kinds.contains(&down::ROLE),
        "{kinds:?}"
    );

    // The gateway (which holds the key) still serves clients.
    let out = tp
        .endpoint()
        .psql(ALICE.0, ALICE.1, APP_DB)
        .command("select 41 + 1")
        .run();
    assert!(out.text.contains("42"), "{}", out.text);
    let log = tp.pooler_log();
    assert!(log.contains("link peer refused"), "{log}");
}

/// A "pooler" that does not hold the key: the gateway never sends it a lookup or a session,
/// and its clients are refused (no primary) rather than handed to it.
#[tokio::test]
async fn a_gateway_does_not_believe_a_pooler_without_the_secret() {
    let fake = TcpListener::bind("127.0.0.1:0").unwrap();
    let fake_port = fake.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<u8>::new()));
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for conn in fake.incoming() {
            let Ok(mut s) = conn else { return };
            let seen = seen2.clone();
            std::thread::spawn(move || {
                let hs = handshake::Pooler::new(&LinkKey::generate());
                let _ = s.write_all(&hs.challenge());
                let Some((kind, _, _)) = read_frame(&mut s, Duration::from_secs(5)) else {
                    return;
                };
                seen.lock().unwrap().push(kind);
                // A forged WELCOME, then what a pooler says to a gateway it accepted.
                let mut b = frame(down::WELCOME, 0, &[0u8; 32]);
                b.extend(frame(down::CORE, 0, &[0, 0, 0, 1]));
                b.extend(frame(down::ROLE, 0, &[1, 0, 0, 0, 0, 0, 0, 0, 9]));
                let _ = s.write_all(&b);
                let (after, _) = rest(&mut s);
                let mut k = 0;
                while k + HEADER <= after.len() {
                    let h = link::parse_header(&after[k..]).unwrap();
                    seen.lock().unwrap().push(h.kind);
                    k += HEADER + h.len;
                }
            });
        }
    });
    let port = free_port();
    let log = std::env::temp_dir().join(format!("tp-link-auth-gw-{port}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let mut gw = Command::new(bin_dir().join("tidepool-gateway"))
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--pooler", &format!("127.0.0.1:{fake_port}")])
        .args(["--cores", "1", "--failover-hold-ms", "1500"])
        .args(link_secret_args())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .spawn()
        .expect("start tidepool-gateway");
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "gateway did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    let url = format!("host=127.0.0.1 port={port} user=alice password=alice-pw dbname=app");
    let Err(err) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
        panic!("a session through a pooler that cannot prove the secret");
    };
    let code = err.as_db_error().map(|e| e.code().code().to_string());
    assert_eq!(code.as_deref(), Some("57P03"), "{err}");
    std::thread::sleep(Duration::from_millis(500));
    let _ = gw.kill();
    let _ = gw.wait();
    let kinds = seen.lock().unwrap().clone();
    assert!(
        !kinds.is_empty(),
        "the gateway never dialled the fake pooler"
    );
    assert!(
        kinds.iter().all(|&k| k == up::HELLO),
        "the gateway sent more than its HELLO to a pooler without the key: {kinds:?}"
    );
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(text.contains("link not authenticated"), "{text}");
    let _ = std::fs::remove_file(&log);
}

/// Without a link secret, or with one others can read, neither process starts.
#[test]
fn a_missing_or_readable_link_secret_stops_both_processes() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("tp-link-key-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let readable = dir.join("link.key");
    LinkKey::create(&readable).unwrap();
    std::fs::set_permissions(&readable, std::fs::Permissions::from_mode(0o644)).unwrap();
    for program in ["tidepool-pooler", "tidepool-gateway"] {
        let run = |extra: &[&str]| {
            let out = Command::new(bin_dir().join(program))
                .args(["--listen", &format!("127.0.0.1:{}", free_port())])
                .args(extra)
                .output()
                .expect("run");
            assert!(!out.status.success(), "{program} started with {extra:?}");
            String::from_utf8_lossy(&out.stderr).into_owned()
        };
        let err = run(&[]);
        assert!(err.contains("link_secret_file"), "{program}: {err}");
        let err = run(&["--link-secret-file", &readable.to_string_lossy()]);
        assert!(err.contains("chmod 600"), "{program}: {err}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Peers that connect and say nothing hold at most 256 handshakes per pooler core: the rest
/// are closed at once (not even challenged), and the gateway's clients are served meanwhile.
#[test]
fn silent_peers_hold_a_bounded_number_of_handshakes() {
    let pg = PgCluster::start();
    let tp = Tidepool::start(
        &pg,
        TidepoolOpts {
            cores: 1,
            ..TidepoolOpts::default()
        },
    );
    let mut peers = Vec::new();
    for _ in 0..300 {
        peers.push(TcpStream::connect(("127.0.0.1", tp.pooler_port())).unwrap());
    }
    let (mut challenged, mut closed) = (0, 0);
    for s in &mut peers {
        match read_frame(s, Duration::from_secs(2)) {
            Some((kind, _, _)) if kind == down::CHALLENGE => challenged += 1,
            Some(other) => panic!("unexpected frame {other:?}"),
            None => closed += 1,
        }
    }
    println!("300 silent peers: {challenged} challenged, {closed} closed at once");
    assert_eq!((challenged, closed), (256, 44));
    let out = tp
        .endpoint()
        .psql(ALICE.0, ALICE.1, APP_DB)
        .command("select 41 + 1")
        .run();
    assert!(out.text.contains("42"), "{}", out.text);
}
