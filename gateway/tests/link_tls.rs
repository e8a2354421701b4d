//! The link over TLS (issue 12 §1: encrypted when it leaves the host): a pooler with a
//! certificate accepts TLS links only, a gateway checks that certificate against its CA and
//! the address it dials, and the shared-secret handshake runs inside. Real Postgres, real pooler
//! and gateway processes, psql and pgbench; test certificates from `testkit::tls`.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use shared::link::{self, down, handshake, up, LinkKey, HEADER};
use testkit::tls::{link_tls_args, TestCa};
use testkit::{bin_dir, free_port, link_secret_args, link_secret_file, pgbench, PgCluster};
use testkit::{Tidepool, TidepoolOpts, ALICE, APP_DB};

/// A pooler whose link presents a certificate of `ca` for 127.0.0.1, and a gateway that checks
/// it against `gateway_ca` (`None`: a gateway without `--link-tls-ca`, speaking plain TCP).
fn start(pg: &PgCluster, ca: &TestCa, gateway_ca: Option<&Path>) -> Tidepool {
    let (cert, key) = ca.issue("pooler", &["127.0.0.1"]);
    let mut opts = TidepoolOpts::default();
    opts.extra_pooler_args.extend(link_tls_args(&cert, &key));
    if let Some(ca) = gateway_ca {
        opts = opts
            .gateway_arg("--link-tls-ca")
            .gateway_arg(ca.to_string_lossy());
    }
    Tidepool::start(pg, opts)
}

/// Reads one frame from `s`; `None` at end of stream or on a read error (a timeout included).
fn read_frame(s: &mut impl Read) -> Option<(u8, u32, Vec<u8>)> {
    let mut head = [0u8; HEADER];
    s.read_exact(&mut head).ok()?;
    let h = link::parse_header(&head)?;
    let mut payload = vec![0u8; h.len];
    s.read_exact(&mut payload).ok()?;
    Some((h.kind, h.session, payload))
}

/// A raw TLS connection to the pooler's link port, checked against `ca`.
fn tls_connect(port: u16, ca: &Path) -> Result<impl Read + Write, String> {
    let config: Arc<rustls::ClientConfig> = shared::tls::client_config(ca)?;
    let tcp = TcpStream::connect(("127.0.0.1", port)).map_err(|e| e.to_string())?;
    tcp.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let name = shared::tls::server_name(&format!("127.0.0.1:{port}"))?;
    let conn = rustls::ClientConnection::new(config, name).map_err(|e| e.to_string())?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    while s.conn.is_handshaking() {
        s.conn.complete_io(&mut s.sock).map_err(|e| e.to_string())?;
    }
    Ok(s)
}

/// Everything a raw TCP peer gets in `wait` (and whether the pooler closed it meanwhile).
fn plain_peer_gets(port: u16, send: &[u8], wait: Duration) -> (Vec<u8>, bool) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    let _ = s.write_all(send);
    testkit::sockets::read_until_closed(&mut s, wait)
}

/// No link frame in `bytes`: nothing at all, or a TLS alert record (content type 21).
fn no_link_frame(bytes: &[u8]) -> bool {
    bytes.is_empty() || bytes[0] == 0x15
}

#[test]
fn a_link_over_tls_serves_psql_and_pgbench() {
    let pg = PgCluster::start();
    let ca = TestCa::new(&pg.dir().join("tls"), "cluster");
    let tp = start(&pg, &ca, Some(&ca.ca_file()));
    let out = tp
        .endpoint()
        .psql(ALICE.0, ALICE.1, APP_DB)
        .command("select 41 + 1 as answer")
        .run();
    assert!(out.text.contains("42"), "{}\n{}", out.text, tp.logs());

    // pgbench: its tables made and a short run with several clients, all through the link.
    let init = pgbench(
        &tp.endpoint(),
        ALICE.0,
        ALICE.1,
        APP_DB,
        &["-i", "-s", "1", "-q"],
        Duration::from_secs(120),
    );
    assert!(init.success(), "pgbench -i:\n{}\n{}", init.text, tp.logs());
    let run = pgbench(
        &tp.endpoint(),
        ALICE.0,
        ALICE.1,
        APP_DB,
        &["-c", "4", "-j", "2", "-t", "50", "-n"],
        Duration::from_secs(120),
    );
    assert!(run.success(), "pgbench:\n{}\n{}", run.text, tp.logs());
    assert!(
        run.text
            .contains("number of transactions actually processed: 200/200"),
        "{}",
        run.text
    );

    // Inside TLS the pooler still challenges first, and answers only after the secret's
    // handshake: the handshake is not replaced by TLS.
    let mut s = tls_connect(tp.pooler_port(), &ca.ca_file()).expect("TLS to the pooler");
    let (kind, _, c) = read_frame(&mut s).expect("the challenge, inside TLS");
    assert_eq!(kind, down::CHALLENGE);
    let key = LinkKey::load(&link_secret_file()).unwrap();
    let (hello, hs) = handshake::Gateway::answer(&key, kind, &c).unwrap();
    s.write_all(&hello).unwrap();
    let (kind, _, w) = read_frame(&mut s).expect("WELCOME");
    hs.finish(kind, &w).expect("the pooler proves the key back");
    let mut lookup = Vec::new();
    link::put_frame(&mut lookup, up::AUTH_LOOKUP, 7, ALICE.0.as_bytes());
    s.write_all(&lookup).unwrap();
    let mut kinds = Vec::new();
    while let Some((kind, _, _)) = read_frame(&mut s) {
        kinds.push(kind);
        if kind == down::AUTH_INFO {
            break;
        }
    }
    assert!(
        kinds.contains(&down::ROLE) && kinds.contains(&down::AUTH_INFO),
        "{kinds:?}"
    );

    // And a plaintext peer gets nothing: the pooler waits for a TLS hello, not a HELLO frame.
    let (got, _) = plain_peer_gets(tp.pooler_port(), b"", Duration::from_secs(1));
    assert!(got.is_empty(), "a plain peer was sent {got:?}");
    let log = tp.gateway_log();
    assert!(log.contains("link_tls=true"), "{log}");
    assert!(tp.pooler_log().contains("link_tls=true"));
}

/// A gateway holding the link secret but trusting another CA never gets past TLS: no
/// challenge, no role, no session; its clients are refused (no primary) and it says why.
#[tokio::test(flavor = "multi_thread")]
async fn a_gateway_with_another_ca_gets_nothing() {
    let pg = PgCluster::start();
    let ca = TestCa::new(&pg.dir().join("tls"), "cluster");
    let other = TestCa::new(&pg.dir().join("tls"), "other");
    let tp = start(&pg, &ca, Some(&ca.ca_file()));
    let (mut gw, port, log) = gateway(&tp, Some(&other.ca_file()));
    let url = format!("host=127.0.0.1 port={port} user=alice password=alice-pw dbname=app");
    let Err(err) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
        panic!("a session through a pooler whose certificate the gateway cannot check");
    };
    let code = err.as_db_error().map(|e| e.code().code().to_string());
    assert_eq!(code.as_deref(), Some("57P03"), "{err}");
    let _ = gw.kill();
    let _ = gw.wait();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("link not authenticated: TLS handshake failed")
            && text.contains("UnknownIssuer"),
        "{text}"
    );
    assert!(
        !text.contains("pooler role"),
        "a ROLE frame arrived: {text}"
    );
    // The same raw client, with the right CA, passes TLS (so the refusal was the CA's doing).
    assert!(tls_connect(tp.pooler_port(), &other.ca_file()).is_err());
    assert!(tls_connect(tp.pooler_port(), &ca.ca_file()).is_ok());
    // A certificate of the right CA for another address is refused too (the name is checked).
    let (cert, key) = ca.issue("elsewhere", &["10.9.9.9"]);
    let elsewhere = Tidepool::start(
        &pg,
        TidepoolOpts {
            extra_pooler_args: link_tls_args(&cert, &key),
            ..TidepoolOpts::default()
        }
        .gateway_arg("--link-tls-ca")
        .gateway_arg(ca.ca_file().to_string_lossy()),
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !elsewhere
        .gateway_log()
        .contains("certificate not valid for name")
    {
        assert!(
            Instant::now() < deadline,
            "no name error:\n{}",
            elsewhere.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(&log);
}

/// A gateway without `--link-tls-ca` against a TLS pooler: the pooler waits for a TLS hello and
/// never sends its challenge; the gateway gets nothing and refuses its clients. A raw plain peer
/// sending an attacker's frames gets nothing either (at most a TLS alert).
#[tokio::test(flavor = "multi_thread")]
async fn a_plaintext_gateway_gets_nothing_from_a_tls_pooler() {
    let pg = PgCluster::start();
    let ca = TestCa::new(&pg.dir().join("tls"), "cluster");
    let tp = start(&pg, &ca, Some(&ca.ca_file()));
    let (mut gw, port, log) = gateway(&tp, None);
    let url = format!("host=127.0.0.1 port={port} user=alice password=alice-pw dbname=app");
    let Err(err) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await else {
        panic!("a session through a plaintext link to a TLS pooler");
    };
    let code = err.as_db_error().map(|e| e.code().code().to_string());
    assert_eq!(code.as_deref(), Some("57P03"), "{err}");

    let mut attack = Vec::new();
    link::put_frame(&mut attack, up::AUTH_LOOKUP, 7, b"alice");
    let (got, closed) = plain_peer_gets(tp.pooler_port(), &attack, Duration::from_secs(3));
    assert!(no_link_frame(&got), "a plain peer was sent {got:?}");
    assert!(
        closed,
        "the pooler kept a peer that sent frames instead of TLS"
    );

    // The gateway's links get no challenge within 5 s: it logs that and redials.
    let deadline = Instant::now() + Duration::from_secs(15);
    while !std::fs::read_to_string(&log)
        .unwrap_or_default()
        .contains("link not authenticated")
    {
        assert!(Instant::now() < deadline, "{}", tp.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = gw.kill();
    let _ = gw.wait();
    let pooler = tp.pooler_log();
    // The raw peer's frames are not a TLS hello; the gateway's links end without one (it gives
    // up waiting for a challenge, or the pooler for a hello, whichever comes first).
    assert!(
        pooler.contains("TLS handshake failed error=received corrupt message"),
        "{pooler}"
    );
    assert!(
        pooler.contains("TLS handshake failed error=tls handshake eof")
            || pooler.contains("no TLS handshake within the timeout"),
        "{pooler}"
    );
    assert!(!pooler.contains("AUTH_LOOKUP"), "{pooler}");
    let _ = std::fs::remove_file(&log);
}

/// Without TLS a pooler does not listen where other hosts may reach it, unless told the
/// network is trusted; the gateway does not start with a CA file that is not one.
#[test]
fn a_plain_link_off_loopback_is_refused() {
    let out = Command::new(bin_dir().join("tidepool-pooler"))
        .args(["--listen", &format!("0.0.0.0:{}", free_port())])
        .args(link_secret_args())
        .output()
        .expect("run tidepool-pooler");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without TLS") && err.contains("link_insecure_non_loopback"),
        "{err}"
    );
    let out = Command::new(bin_dir().join("tidepool-gateway"))
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--link-tls-ca", "/nonexistent/ca.crt"])
        .args(link_secret_args())
        .output()
        .expect("run tidepool-gateway");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("link_tls_ca"), "{err}");
}

/// A second gateway in front of `tp`'s pooler, with `ca` as its `--link-tls-ca` (or none).
fn gateway(tp: &Tidepool, ca: Option<&Path>) -> (Child, u16, std::path::PathBuf) {
    let port = free_port();
    let log = tp.cluster().dir().join(format!("gateway-tls-{port}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let mut cmd = Command::new(bin_dir().join("tidepool-gateway"));
    cmd.args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--pooler", &format!("127.0.0.1:{}", tp.pooler_port())])
        .args(["--cores", "1", "--failover-hold-ms", "1500"])
        .args(link_secret_args())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file));
    if let Some(ca) = ca {
        cmd.arg("--link-tls-ca").arg(ca);
    }
    let gw = cmd.spawn().expect("start tidepool-gateway");
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "gateway did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    (gw, port, log)
}
