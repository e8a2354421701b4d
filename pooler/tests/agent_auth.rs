//! The node agent answers only a peer that holds the cluster's agent secret, and acts only on
//! valid requests (shared::agent::auth, shared::agent::validate), against a real pooler and a
//! real PostgreSQL 15: a peer without the secret or with a wrong one gets one refusal and
//! nothing else, a line altered after the handshake ends the connection, the maximum term and
//! injection attempts into `postgresql.auto.conf` are refused and change nothing.

use shared::agent::auth::AuthError;
use shared::agent::{call, AgentKey, CallError, Request, Response, Upstream, MAX_LINE};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;
use testkit::replication::{AgentPooler, Node};

const CALL: Duration = Duration::from_secs(30);

/// Everything the agent writes on a raw connection that sends `lines` (read to the end).
fn raw_exchange(a: &AgentPooler, lines: &[&[u8]]) -> Vec<String> {
    let mut s = TcpStream::connect(a.agent_addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    for l in lines {
        // The agent may close before reading everything (an oversized line): ignore EPIPE.
        let _ = s.write_all(l);
    }
    let mut out = String::new();
    let _ = BufReader::new(s).read_to_string(&mut out);
    out.lines().map(str::to_string).collect()
}

fn pledged_term(a: &AgentPooler) -> u64 {
    match call(a.agent_addr(), &a.key(), &Request::Report, CALL) {
        Ok(Response::Ok { report }) => report.term,
        other => panic!("report: {other:?}\n{}", a.log_tail()),
    }
}

#[test]
fn only_the_secret_holder_is_answered() {
    let n = Node::primary("auth1");
    let a = AgentPooler::start(&n, &[]);
    let auto_conf = || std::fs::read_to_string(n.data_dir().join("postgresql.auto.conf")).unwrap();
    let auto_before = auto_conf();
    assert_eq!(pledged_term(&a), 0);

    // No handshake: a request line straight away. The agent sends its challenge, then one
    // refusal, then closes: no report, no term.
    let got = raw_exchange(
        &a,
        &[b"{\"op\":\"recruit\",\"term\":18446744073709551615}\n"],
    );
    assert_eq!(got.len(), 2, "challenge and refusal only: {got:?}");
    assert!(got[0].contains("\"nonce\"") && got[0].contains("tidepool-agent/1"));
    assert!(!got[0].contains("report") && !got[0].contains("term"));
    assert_eq!(
        got[1],
        r#"{"result":"refused","reason":"authentication failed","report":null}"#
    );
    let got = raw_exchange(&a, &[b"{\"op\":\"report\"}\n"]);
    assert!(
        !got.iter().any(|l| l.contains("\"role\"")),
        "a report leaked: {got:?}"
    );

    // A proof made with the wrong secret: refused, and nothing learned.
    let wrong = AgentKey::generate();
    for req in [
        Request::Report,
        Request::Recruit { term: 5 },
        Request::Follow {
            term: 5,
            primary: Upstream {
                host: "10.0.0.1".into(),
                port: 5432,
            },
        },
    ] {
        match call(a.agent_addr(), &wrong, &req, CALL) {
            Err(CallError::Auth {
                source: AuthError::Refused(reason),
                ..
            }) => assert_eq!(reason, "authentication failed"),
            other => panic!("{req:?} with a wrong secret: {other:?}"),
        }
    }

    // An oversized line before the handshake: closed, nothing but the challenge and at most
    // the refusal (the close with unread bytes may reset the connection before the refusal
    // is read).
    let big = vec![b'x'; MAX_LINE + 10];
    let got = raw_exchange(&a, &[&big]);
    assert!((1..=2).contains(&got.len()), "{got:?}");
    assert!(
        got[1..].iter().all(|l| l.contains("authentication failed")),
        "{got:?}"
    );

    // A line altered after a good handshake: the connection ends without an answer.
    {
        let key = a.key();
        let mut s = TcpStream::connect(a.agent_addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        let mut r = BufReader::new(s.try_clone().unwrap());
        let mut challenge = Vec::new();
        r.read_until(b'\n', &mut challenge).unwrap();
        let (answer, hs) = shared::agent::auth::ClientHandshake::answer(&key, &challenge).unwrap();
        s.write_all(&answer).unwrap();
        let mut proof = Vec::new();
        r.read_until(b'\n', &mut proof).unwrap();
        let mut sealed = hs.finish(&proof).expect("the real agent proves the secret");
        let mut line = sealed.seal(br#"{"op":"recruit","term":3}"#);
        let at = line.len() - 3;
        line[at] = b'9'; // term 3 becomes term 9, the MAC no longer matches
        s.write_all(&line).unwrap();
        let mut rest = String::new();
        let _ = r.read_to_string(&mut rest);
        assert_eq!(rest, "", "an altered line got an answer");
    }
    assert_eq!(pledged_term(&a), 0, "nothing above changed the pledge");

    // Authenticated but invalid: terms out of bounds, hosts that would inject.
    let refused = |req: Request| match call(a.agent_addr(), &a.key(), &req, CALL) {
        Ok(Response::Refused { reason, .. }) => reason,
        other => panic!("{req:?}: {other:?}\n{}", a.log_tail()),
    };
    for term in [u64::MAX, shared::agent::validate::MAX_TERM + 1] {
        let why = refused(Request::Recruit { term });
        assert!(why.contains("invalid request"), "{why}");
        assert!(refused(Request::Promote {
            term,
            sync_names: String::new()
        })
        .contains("invalid request"));
    }
    for host in [
        "127.0.0.1' port=1",
        "x'\nrestore_command = 'touch /tmp/tidepool-pwned'",
        "h\\'",
        "a b",
        "",
    ] {
        let why = refused(Request::Follow {
            term: 1,
            primary: Upstream {
                host: host.into(),
                port: 5432,
            },
        });
        assert!(why.contains("invalid request"), "{host:?}: {why}");
    }
    let why = refused(Request::SetSync {
        term: 0,
        sync_names: "x'\nprimary_conninfo = 'host=evil'".into(),
    });
    assert!(why.contains("invalid request"), "{why}");
    assert_eq!(pledged_term(&a), 0, "no invalid request changed the pledge");
    assert_eq!(auto_conf(), auto_before, "postgresql.auto.conf changed");

    // The largest valid term is taken: bounds, not a refusal of everything.
    let max = shared::agent::validate::MAX_TERM;
    match call(
        a.agent_addr(),
        &a.key(),
        &Request::Recruit { term: max },
        CALL,
    ) {
        Ok(Response::Ok { report }) => assert_eq!(report.term, max),
        other => panic!("recruit at MAX_TERM: {other:?}\n{}", a.log_tail()),
    }
    let log = a.log_tail();
    assert!(log.contains("agent connection refused"), "{log}");
}

/// The agent refuses to start with a secret others can read, and without one.
#[test]
fn a_readable_or_missing_secret_stops_the_pooler() {
    use std::os::unix::fs::PermissionsExt;
    let dir = std::env::temp_dir().join(format!("tp-agent-key-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("agent.key");
    AgentKey::create(&key).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let bin = testkit::tidepool::bin_dir().join("tidepool-pooler");
    let run = |extra: &[&str]| {
        let mut args = vec![
            "--listen".to_string(),
            format!("127.0.0.1:{}", testkit::free_port()),
            "--agent-listen".into(),
            format!("127.0.0.1:{}", testkit::free_port()),
            "--state-dir".into(),
            dir.to_string_lossy().into_owned(),
            "--admin-socket-dir".into(),
            dir.to_string_lossy().into_owned(),
        ];
        args.extend(testkit::link_secret_args());
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = std::process::Command::new(&bin)
            .args(&args)
            .output()
            .expect("run tidepool-pooler");
        assert!(!out.status.success(), "started with {extra:?}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let err = run(&["--agent-secret-file", &key.to_string_lossy()]);
    assert!(err.contains("chmod 600"), "{err}");
    let err = run(&[]);
    assert!(err.contains("agent_secret_file"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// With a certificate the agent speaks TLS only: the control process's client (the cluster CA,
/// the secret inside) gets reports and acts; a plain client, even one holding the secret, gets
/// nothing at all — not even the challenge; a client trusting another CA does not get past TLS.
#[test]
fn the_agent_over_tls_answers_the_control_process_and_nobody_in_clear() {
    use shared::agent::{call_with, AgentAccess};
    use testkit::tls::TestCa;
    let n = Node::primary("tls1");
    let ca = TestCa::new(&n.dir().join("tls"), "cluster");
    let other = TestCa::new(&n.dir().join("tls"), "other");
    let (cert, key) = ca.issue("node1", &["127.0.0.1"]);
    let (cert, key) = (cert.to_string_lossy(), key.to_string_lossy());
    let a = AgentPooler::start(&n, &["--agent-tls-cert", &cert, "--agent-tls-key", &key]);
    let access = AgentAccess::with_tls(a.key(), &ca.ca_file()).unwrap();

    // The control process's way: TLS checked against the CA, the handshake, a report, an act.
    match call_with(a.agent_addr(), &access, &Request::Report, CALL) {
        Ok(Response::Ok { report }) => assert_eq!(report.term, 0),
        other => panic!("report over TLS: {other:?}\n{}", a.log_tail()),
    }
    match call_with(a.agent_addr(), &access, &Request::Recruit { term: 2 }, CALL) {
        Ok(Response::Ok { report }) => assert_eq!(report.term, 2),
        other => panic!("recruit over TLS: {other:?}\n{}", a.log_tail()),
    }

    // A plain client with the right secret: the agent waits for a TLS hello, so the client
    // never sees a challenge; its request is not read as one.
    let plain = call(
        a.agent_addr(),
        &a.key(),
        &Request::Report,
        Duration::from_secs(2),
    );
    assert!(matches!(plain, Err(CallError::Io { .. })), "{plain:?}");
    let mut s = TcpStream::connect(a.agent_addr()).unwrap();
    s.write_all(b"{\"op\":\"recruit\",\"term\":9}\n").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(8))).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    // Nothing, or a TLS alert record (content type 21): no challenge, no refusal line, no report.
    assert!(got.is_empty() || got[0] == 0x15, "a plain peer got {got:?}");

    // Another CA: TLS fails, nothing is sent.
    let wrong = AgentAccess::with_tls(a.key(), &other.ca_file()).unwrap();
    let err = call_with(a.agent_addr(), &wrong, &Request::Report, CALL).unwrap_err();
    assert!(err.to_string().contains("UnknownIssuer"), "{err}");

    // Only the recruit over TLS changed the node.
    match call_with(a.agent_addr(), &access, &Request::Report, CALL) {
        Ok(Response::Ok { report }) => assert_eq!(report.term, 2),
        other => panic!("report over TLS: {other:?}\n{}", a.log_tail()),
    }
    let log = a.log_tail();
    assert!(log.contains("tls=true"), "{log}");
    assert!(log.contains("TLS handshake"), "{log}");
}

/// Without TLS the agent does not listen where other hosts may reach it (unless told the
/// network is trusted with its reports in clear).
#[test]
fn a_plain_agent_off_loopback_is_refused() {
    let dir = std::env::temp_dir().join(format!("tp-agent-exposed-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let key = dir.join("agent.key");
    AgentKey::create(&key).unwrap();
    let mut args = vec![
        "--listen".to_string(),
        format!("127.0.0.1:{}", testkit::free_port()),
        "--agent-listen".into(),
        format!("0.0.0.0:{}", testkit::free_port()),
        "--state-dir".into(),
        dir.to_string_lossy().into_owned(),
        "--agent-secret-file".into(),
        key.to_string_lossy().into_owned(),
    ];
    args.extend(testkit::link_secret_args());
    let out = std::process::Command::new(testkit::tidepool::bin_dir().join("tidepool-pooler"))
        .args(&args)
        .output()
        .expect("run tidepool-pooler");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("without TLS") && err.contains("agent_insecure_non_loopback"),
        "{err}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
