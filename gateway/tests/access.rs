//! Access rules and login checks in the gateway (issue 12 §2), against real Postgres 15 and
//! real clients (psql and the testkit's wire client). Every backend connects to Postgres from
//! the pooler, so the gateway applies what `pg_hba.conf` and Postgres's login checks did.
//!
//! Differential: each refusal is asked of Postgres directly (its own pg_hba.conf holding the
//! same rules, the same roles and databases) and of Tidepool; SQLSTATE, message and detail
//! must be the same, and psql's FATAL line too.

mod common;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use testkit::{ConnectError, Endpoint, PgCluster, Tidepool, TidepoolOpts, ALICE, APP_DB, BOB};

/// Postgres's own rules for this test: the testkit's local lines, then the same host rules
/// the gateway gets. `erin` has no rule (no entry), `dave` is rejected, `gina` may use a
/// cleartext password at the gateway (Postgres keeps SCRAM for her: the pooler logs in as her
/// with the key the gateway learned).
const PG_LOCAL: &str = "\
local   all   postgres                 peer map=tidepool
local   all   all                      scram-sha-256
";

fn host_rules(gina: &str) -> String {
    format!(
        "# the gateway's rules\n\
         host    all       dave        127.0.0.1/32   reject\n\
         host    all       bob         127.0.0.1/32   md5\n\
         host    all       gina        127.0.0.1/32   {gina}\n\
         host    all       alice,carol,frank,lim,nolog,old,\"Quoted One\"  127.0.0.1  255.255.255.255  scram-sha-256\n"
    )
}

const PW: &str = "pw-access-1";

fn setup(pg: &PgCluster) {
    pg.psql_admin(&format!(
        "CREATE ROLE carol LOGIN PASSWORD '{PW}';\n\
         CREATE ROLE dave LOGIN PASSWORD '{PW}';\n\
         CREATE ROLE erin LOGIN PASSWORD '{PW}';\n\
         CREATE ROLE frank LOGIN PASSWORD '{PW}';\n\
         CREATE ROLE gina LOGIN PASSWORD '{PW}';\n\
         CREATE ROLE lim LOGIN PASSWORD '{PW}' CONNECTION LIMIT 1;\n\
         CREATE ROLE nolog NOLOGIN PASSWORD '{PW}';\n\
         CREATE ROLE old LOGIN PASSWORD '{PW}' VALID UNTIL '2001-01-01';\n\
         CREATE ROLE \"Quoted One\" LOGIN PASSWORD '{PW}';\n\
         CREATE DATABASE private OWNER alice;\n\
         REVOKE CONNECT ON DATABASE private FROM PUBLIC;\n\
         CREATE DATABASE closed OWNER alice ALLOW_CONNECTIONS false;\n\
         CREATE DATABASE small OWNER alice CONNECTION LIMIT 1;\n\
         CREATE DATABASE later OWNER alice;\n"
    ));
    let hba = pg.data_dir().join("pg_hba.conf");
    // Written as root into postgres's file (its owner and mode stay).
    fs::write(&hba, format!("{PG_LOCAL}{}", host_rules("scram-sha-256"))).unwrap();
    pg.psql_admin("SELECT pg_reload_conf();");
    // The reload is asynchronous; erin (no rule) refused says it is in force.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let out = pg
            .direct()
            .psql("erin", PW, APP_DB)
            .command("select 1")
            .run();
        if out.text.contains("no pg_hba.conf entry") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "pg_hba.conf not reloaded: {}",
            out.text
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn write_rules(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    fs::write(&p, text).unwrap();
    p
}

/// SQLSTATE, message and detail of a refused login (panics if it was not refused).
async fn refusal(ep: &Endpoint, user: &str, pw: &str, db: &str) -> (String, String, String) {
    match ep.raw(user, pw, db).await {
        Ok(_) => panic!("{user}@{db} logged in"),
        Err(ConnectError::Server(e)) => (
            e.code().to_owned(),
            e.message().to_owned(),
            e.field(b'D').unwrap_or_default().to_owned(),
        ),
        Err(e) => panic!("{user}@{db}: {e}"),
    }
}

/// psql's FATAL line (the part after the server address, which differs).
fn psql_fatal(ep: &Endpoint, user: &str, pw: &str, db: &str) -> String {
    let out = ep.psql(user, pw, db).command("select 1").run();
    assert!(!out.success(), "{user}@{db}: {}", out.text);
    let at = out
        .text
        .find("FATAL:")
        .unwrap_or_else(|| panic!("{user}@{db}: no FATAL in {}", out.text));
    out.text[at..].trim_end().to_owned()
}

async fn logs_in(ep: &Endpoint, user: &str, pw: &str, db: &str) -> testkit::RawConn {
    ep.raw(user, pw, db)
        .await
        .unwrap_or_else(|e| panic!("{user}@{db} refused: {e}"))
}

fn start(pg: &PgCluster, hba: &Path, extra: &[&str]) -> Tidepool {
    let mut opts = TidepoolOpts::default()
        .pool_size(4)
        .pooler_arg("--auth-cache-seconds")
        .pooler_arg("0")
        .gateway_arg("--hba-file")
        .gateway_arg(hba.to_string_lossy());
    for a in extra {
        opts = opts.gateway_arg(*a);
    }
    Tidepool::start(pg, opts)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_refusals_as_postgres() {
    let pg = PgCluster::start();
    setup(&pg);
    let hba = write_rules(pg.dir(), "gateway-hba.conf", &host_rules("scram-sha-256"));
    let tp = start(&pg, &hba, &[]);
    let (direct, through) = (pg.direct(), tp.endpoint());

    // Allowed by a rule: the md5 one (bob), the list with a quoted name and an address with a
    // mask (alice, "Quoted One").
    for (user, pw) in [ALICE, BOB, ("Quoted One", PW)] {
        for ep in [&direct, &through] {
            logs_in(ep, user, pw, APP_DB).await.terminate().await;
        }
    }

    // Each case: the same refusal directly and through Tidepool.
    let cases: &[(&str, &str, &str, &str)] = &[
        // No rule matches erin.
        ("erin", PW, APP_DB, "28000"),
        // A reject rule.
        ("dave", PW, APP_DB, "28000"),
        // NOLOGIN, with the right password.
        ("nolog", PW, APP_DB, "28000"),
        // VALID UNTIL in the past: the password no longer works.
        ("old", PW, APP_DB, "28P01"),
        // CONNECT revoked from PUBLIC.
        ("carol", PW, "private", "42501"),
        // ALLOW_CONNECTIONS false.
        ("carol", PW, "closed", "55000"),
        // No such database.
        ("carol", PW, "nowhere", "3D000"),
        // A wrong password still reads as one.
        ("carol", "wrong", APP_DB, "28P01"),
    ];
    for &(user, pw, db, code) in cases {
        let want = refusal(&direct, user, pw, db).await;
        let got = refusal(&through, user, pw, db).await;
        assert_eq!(want.0, code, "{user}@{db} directly: {want:?}");
        assert_eq!(got, want, "{user}@{db}: through Tidepool vs directly");
        assert_eq!(
            psql_fatal(&through, user, pw, db),
            psql_fatal(&direct, user, pw, db),
            "{user}@{db}: psql"
        );
    }
    let (_, msg, _) = refusal(&through, "erin", PW, APP_DB).await;
    assert_eq!(
        msg,
        "no pg_hba.conf entry for host \"127.0.0.1\", user \"erin\", database \"app\", no encryption"
    );
    // The detail of the CONNECT refusal is there (the comparison above covers it).
    let (_, _, detail) = refusal(&through, "carol", PW, "private").await;
    assert_eq!(detail, "User does not have CONNECT privilege.");

    // Role and database connection limits: one session held, the next refused the same way.
    for (user, pw, db) in [("lim", PW, APP_DB), (ALICE.0, ALICE.1, "small")] {
        for ep in [&direct, &through] {
            let held = logs_in(ep, user, pw, db).await;
            let got = refusal(ep, user, pw, db).await;
            assert_eq!(got.0, "53300", "{user}@{db}: {got:?}");
            let other = if ep.port == direct.port {
                "directly"
            } else {
                "through Tidepool"
            };
            let expected = if user == "lim" {
                "too many connections for role \"lim\"".to_string()
            } else {
                "too many connections for database \"small\"".to_string()
            };
            assert_eq!(got.1, expected, "{other}");
            held.terminate().await;
            // Postgres counts a session until its process is gone (the pooler's backend would
            // be refused while the direct one lingers); the gateway until its task ends.
            let deadline = Instant::now() + Duration::from_secs(10);
            while pg
                .psql_admin(&format!(
                    "SELECT count(*) FROM pg_stat_activity WHERE usename = '{user}' AND datname = '{db}'"
                ))
                .trim()
                != "0"
                && ep.port == direct.port
            {
                assert!(Instant::now() < deadline, "{user}@{db} still connected");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        // Once the holder left, the next one gets in (the counts went down: the gateway's
        // when the session ended, Postgres's when a backend the pooler closed is gone).
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match through.raw(user, pw, db).await {
                Ok(c) => break c.terminate().await,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "{user}@{db} after the holder left: {e}\n{}",
                    tp.logs()
                ),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// What Postgres checks at login is checked for every new client, even while the pooler holds
/// backends that logged in before the change.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revocations_apply_to_new_clients_while_backends_are_pooled() {
    let pg = PgCluster::start();
    setup(&pg);
    let hba = write_rules(pg.dir(), "gateway-hba.conf", &host_rules("scram-sha-256"));
    let tp = start(&pg, &hba, &[]);
    let (direct, through) = (pg.direct(), tp.endpoint());

    let mut frank = logs_in(&through, "frank", PW, "later").await;
    frank
        .send(testkit::Frontend::new().query("SELECT 1").bytes())
        .await
        .unwrap();
    frank.recv_until(b'Z', Duration::from_secs(10)).await;
    assert!(tp.backend_count("frank") >= 1, "frank has a pooled backend");

    pg.psql_admin("REVOKE CONNECT ON DATABASE later FROM PUBLIC;");
    let want = refusal(&direct, "frank", PW, "later").await;
    assert_eq!(want.0, "42501");
    assert_eq!(refusal(&through, "frank", PW, "later").await, want);

    pg.psql_admin("GRANT CONNECT ON DATABASE later TO PUBLIC; ALTER ROLE frank NOLOGIN;");
    let want = refusal(&direct, "frank", PW, "later").await;
    assert_eq!(want.0, "28000");
    assert_eq!(refusal(&through, "frank", PW, "later").await, want);

    pg.psql_admin("ALTER ROLE frank LOGIN VALID UNTIL '2001-01-01';");
    let want = refusal(&direct, "frank", PW, "later").await;
    assert_eq!(want.0, "28P01");
    assert_eq!(refusal(&through, "frank", PW, "later").await, want);

    // The session that logged in before keeps working (as in Postgres).
    frank
        .send(testkit::Frontend::new().query("SELECT 2").bytes())
        .await
        .unwrap();
    let events = frank.recv_until(b'Z', Duration::from_secs(10)).await;
    assert!(
        format!("{events:?}").contains("DataRow[\"2\"]"),
        "{events:?}"
    );

    pg.psql_admin("ALTER ROLE frank VALID UNTIL 'infinity';");
    logs_in(&through, "frank", PW, "later")
        .await
        .terminate()
        .await;
}

/// `password` (cleartext) at the gateway, `+group` and `samerole`, per-user and per-database
/// client limits of the gateway's own, and the rule file's reload and errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_groups_limits_and_reload() {
    let pg = PgCluster::start();
    setup(&pg);
    pg.psql_admin(
        "CREATE ROLE readers NOLOGIN; GRANT readers TO carol; CREATE DATABASE readers OWNER alice;",
    );
    let rules = format!(
        "host readers +readers 127.0.0.1/32 reject\n\
         host samerole all 127.0.0.1/32 scram-sha-256\n{}",
        host_rules("password")
    );
    let hba = write_rules(pg.dir(), "gateway-hba.conf", &rules);
    let tp = start(
        &pg,
        &hba,
        &["--max-user-clients", "2", "--max-db-clients", "3"],
    );
    let through = tp.endpoint();

    // gina: the gateway asks for the password in clear (AuthenticationCleartextPassword), then
    // logs in to Postgres as her with SCRAM (the key derived from that password).
    let mut raw = through.raw_tcp().await.unwrap();
    raw.send(
        testkit::Frontend::new()
            .startup(&[("user", "gina"), ("database", APP_DB)])
            .bytes(),
    )
    .await
    .unwrap();
    let m = raw.recv_within(Duration::from_secs(10)).await.unwrap();
    assert_eq!((m.tag, &m.body[..4]), (b'R', &3i32.to_be_bytes()[..]));
    let out = through
        .psql("gina", PW, APP_DB)
        .command("select current_user")
        .run();
    assert!(out.success() && out.text.contains("gina"), "{}", out.text);
    assert_eq!(refusal(&through, "gina", "nope", APP_DB).await.0, "28P01");

    // +readers: carol is a member, rejected in database readers; alice (a member of nothing)
    // falls through to samerole, which needs membership of a role named as the database: no.
    let (code, msg, _) = refusal(&through, "carol", PW, "readers").await;
    assert_eq!(code, "28000");
    assert!(msg.starts_with("pg_hba.conf rejects connection for host \"127.0.0.1\", user \"carol\", database \"readers\""), "{msg}");
    logs_in(&through, ALICE.0, ALICE.1, "readers")
        .await
        .terminate()
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // max_user_clients 2: a third alice is refused; max_db_clients 3: the fourth client of app.
    let a1 = logs_in(&through, ALICE.0, ALICE.1, APP_DB).await;
    let a2 = logs_in(&through, ALICE.0, ALICE.1, APP_DB).await;
    let (code, msg, _) = refusal(&through, ALICE.0, ALICE.1, "small").await;
    assert_eq!(
        (code.as_str(), msg.as_str()),
        (
            "53300",
            "too many client connections for role \"alice\" (max_user_clients)"
        )
    );
    let b1 = logs_in(&through, BOB.0, BOB.1, APP_DB).await;
    let (code, msg, _) = refusal(&through, BOB.0, BOB.1, APP_DB).await;
    assert_eq!(
        (code.as_str(), msg.as_str()),
        (
            "53300",
            "too many client connections for database \"app\" (max_db_clients)"
        )
    );
    a1.terminate().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    logs_in(&through, BOB.0, BOB.1, APP_DB)
        .await
        .terminate()
        .await;
    drop((a2, b1));

    // Reload: alice rejected from now on.
    fs::write(&hba, format!("host all alice 127.0.0.1/32 reject\n{rules}")).unwrap();
    tp.signal_gateway(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match through.raw(ALICE.0, ALICE.1, APP_DB).await {
            Err(ConnectError::Server(e)) if e.code() == "28000" => break,
            _ => {}
        }
        assert!(
            Instant::now() < deadline,
            "reload not applied\n{}",
            tp.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A broken file on reload: logged, the rules in force stay.
    fs::write(&hba, "host all all 10.0.0.0/99 md5\n").unwrap();
    tp.signal_gateway(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !tp.gateway_log().contains("invalid CIDR mask") {
        assert!(Instant::now() < deadline, "no error logged\n{}", tp.logs());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(refusal(&through, ALICE.0, ALICE.1, APP_DB).await.0, "28000");
    logs_in(&through, BOB.0, BOB.1, APP_DB)
        .await
        .terminate()
        .await;

    // At start, a broken file stops the gateway with the line at fault.
    let out = Command::new(testkit::bin_dir().join("tidepool-gateway"))
        .args(["--hba-file"])
        .arg(&hba)
        .args(["--listen", &format!("127.0.0.1:{}", testkit::free_port())])
        .args(testkit::link_secret_args())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("hba_file") && err.contains("line 1: invalid CIDR mask"),
        "{err}"
    );
}

/// `hostssl` and `hostnossl`: which rule applies depends on TLS between client and gateway.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostssl_rules_follow_the_clients_tls() {
    let pg = PgCluster::start();
    let dir = pg.dir();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = testkit::run_merged(
        Command::new("openssl")
            .args([
                "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
            ])
            .args(["-subj", "/CN=localhost", "-keyout"])
            .arg(&key)
            .arg("-out")
            .arg(&cert),
        None,
        Duration::from_secs(60),
    );
    assert!(made.success(), "{}", made.text);
    let hba = write_rules(
        dir,
        "gateway-hba.conf",
        "hostssl   all  alice  127.0.0.1/32  scram-sha-256\n\
         hostnossl all  alice  127.0.0.1/32  reject\n\
         hostnossl all  bob    127.0.0.1/32  md5\n",
    );
    let tp = start(
        &pg,
        &hba,
        &[
            "--tls-cert",
            &cert.to_string_lossy(),
            "--tls-key",
            &key.to_string_lossy(),
        ],
    );
    let ep = tp.endpoint();
    let psql = |user: &str, pw: &str, sslmode: &str| {
        ep.psql(user, pw, &format!("dbname={APP_DB} sslmode={sslmode}"))
            .command("select 'in as ' || current_user")
            .run()
    };
    let out = psql(ALICE.0, ALICE.1, "require");
    assert!(
        out.success() && out.text.contains("in as alice"),
        "{}",
        out.text
    );
    let out = psql(ALICE.0, ALICE.1, "disable");
    assert!(
        out.text.contains(
            "FATAL:  pg_hba.conf rejects connection for host \"127.0.0.1\", user \"alice\", database \"app\", no encryption"
        ),
        "{}",
        out.text
    );
    let out = psql(BOB.0, BOB.1, "disable");
    assert!(
        out.success() && out.text.contains("in as bob"),
        "{}",
        out.text
    );
    let out = psql(BOB.0, BOB.1, "require");
    assert!(
        out.text.contains(
            "FATAL:  no pg_hba.conf entry for host \"127.0.0.1\", user \"bob\", database \"app\", SSL encryption"
        ),
        "{}",
        out.text
    );
}
