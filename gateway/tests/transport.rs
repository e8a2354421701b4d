//! Transports through the gateway: TLS (rustls, when a certificate is configured) and the Unix
//! socket in libpq's form, with real psql.

use std::process::Command;
use testkit::{PgCluster, Tidepool, TidepoolOpts};

fn psql(conninfo: &str, sql: &str) -> (bool, String) {
    let out = Command::new("psql")
        .args(["-X", "-A", "-t", conninfo, "-c", sql])
        .env("PGPASSWORD", "alice-pw")
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("run psql");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn tls_and_unix_socket() {
    let pg = PgCluster::start();
    let dir = pg.dir().join("gateway-transport");
    std::fs::create_dir_all(&dir).unwrap();
    let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("run openssl");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let mut opts = TidepoolOpts::default().pool_size(2);
    opts.extra_gateway_args = vec![
        "--tls-cert".into(),
        cert.display().to_string(),
        "--tls-key".into(),
        key.display().to_string(),
        "--unix-socket-dir".into(),
        dir.display().to_string(),
    ];
    let tp = Tidepool::start(&pg, opts);
    let port = tp.gateway_port();

    // TLS required: the connection is encrypted and works.
    let (ok, out) = psql(
        &format!("host=127.0.0.1 port={port} user=alice dbname=app sslmode=require"),
        "\\conninfo",
    );
    assert!(ok, "{out}\n{}", tp.logs());
    assert!(out.contains("SSL connection"), "not encrypted: {out}");
    let (ok, out) = psql(
        &format!("host=127.0.0.1 port={port} user=alice dbname=app sslmode=require"),
        "SELECT 40 + 2",
    );
    assert!(ok && out.trim() == "42", "{out}");

    // Plain still works when the client does not ask for TLS.
    let (ok, out) = psql(
        &format!("host=127.0.0.1 port={port} user=alice dbname=app sslmode=disable"),
        "SELECT 'plain'",
    );
    assert!(ok && out.trim() == "plain", "{out}");

    // The Unix socket, as libpq names it: DIR/.s.PGSQL.<port>.
    let (ok, out) = psql(
        &format!("host={} port={port} user=alice dbname=app", dir.display()),
        "SELECT current_user",
    );
    assert!(ok && out.trim() == "alice", "{out}\n{}", tp.logs());
    // A wrong password over the socket is refused as Postgres refuses it.
    let out = Command::new("psql")
        .args([
            "-X",
            "-A",
            "-t",
            &format!("host={} port={port} user=alice dbname=app", dir.display()),
            "-c",
            "SELECT 1",
        ])
        .env("PGPASSWORD", "wrong")
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("password authentication failed for user \"alice\""),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `openssl` with `args`, in `dir`; panics with its output when it fails.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A self-signed CA (`NAME.pem`, `NAME.key`) in `dir`.
fn make_ca(dir: &std::path::Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

fn psql_as(user: &str, password: &str, port: u16, sql: &str) -> (bool, String) {
    let out = Command::new("psql")
        .args(["-X", "-A", "-t"])
        .arg(format!(
            "host=127.0.0.1 port={port} user={user} dbname=app sslmode=disable"
        ))
        .args(["-c", sql])
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        .output()
        .expect("run psql");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// TLS from the pooler to Postgres (`server_tls_sslmode`, issue 12 §2), against a real
/// Postgres first without SSL, then with `ssl = on` and a certificate from a test CA: `require`
/// refuses a server without SSL with a clear error, `prefer` falls back to plain there, and
/// once SSL is on every backend of `require`, `prefer` and `verify-full` poolers is encrypted
/// (`pg_stat_ssl`); `verify-full` refuses a certificate from another CA; a cancel goes through
/// over TLS.
#[test]
fn pooler_to_postgres_over_tls() {
    use std::os::unix::fs::PermissionsExt;
    use testkit::{ALICE, BOB};
    let pg = PgCluster::start();
    let dir = pg.dir().join("server-tls");
    std::fs::create_dir_all(&dir).unwrap();
    make_ca(&dir, "ca");
    make_ca(&dir, "other-ca");
    openssl(
        &dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
        ],
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName = IP:127.0.0.1\nbasicConstraints = CA:FALSE\n\
         extendedKeyUsage = serverAuth\n",
    )
    .unwrap();
    openssl(
        &dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "server.ext",
            "-out",
            "server.pem",
        ],
    );
    let pooler_with = |mode: &str, ca: Option<&str>| {
        let mut opts = TidepoolOpts::default()
            .pool_size(2)
            .pooler_arg("--server-tls-sslmode")
            .pooler_arg(mode);
        if let Some(ca) = ca {
            opts = opts
                .pooler_arg("--server-tls-ca-file")
                .pooler_arg(dir.join(ca).display().to_string());
        }
        opts.cores = 1;
        Tidepool::start(&pg, opts)
    };

    // Postgres without SSL: `require` fails the login with a clear error and opens nothing.
    let require = pooler_with("require", None);
    let (ok, out) = psql_as(ALICE.0, ALICE.1, require.gateway_port(), "SELECT 1");
    assert!(!ok, "{out}");
    assert!(
        out.contains(
            "the server does not support SSL, but server_tls_sslmode = require requires it"
        ),
        "{out}\n{}",
        require.logs()
    );
    assert_eq!(pg.backend_count(ALICE.0), 0);
    // `prefer` goes plain.
    let prefer = pooler_with("prefer", None);
    let (ok, out) = psql_as(BOB.0, BOB.1, prefer.gateway_port(), "SELECT 'plain'");
    assert!(ok && out.trim() == "plain", "{out}\n{}", prefer.logs());

    // SSL on, with a certificate of `ca` for 127.0.0.1.
    let (uid, gid) = {
        let id = |flag: &str| {
            let out = Command::new("id")
                .args([flag, "postgres"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout)
                .trim()
                .parse::<u32>()
                .unwrap()
        };
        (id("-u"), id("-g"))
    };
    for f in ["server.pem", "server.key"] {
        let to = pg.data_dir().join(f);
        std::fs::copy(dir.join(f), &to).unwrap();
        std::os::unix::fs::chown(&to, Some(uid), Some(gid)).unwrap();
        std::fs::set_permissions(&to, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    pg.psql_admin(
        "ALTER SYSTEM SET ssl_cert_file = 'server.pem';\n\
         ALTER SYSTEM SET ssl_key_file = 'server.key';\n\
         ALTER SYSTEM SET ssl = on;\n\
         SELECT pg_reload_conf();\n",
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let (ok, out) = psql_as(ALICE.0, ALICE.1, require.gateway_port(), "SELECT 'tls'");
        if ok {
            assert_eq!(out.trim(), "tls");
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "require after ssl = on: {out}\n{}",
            require.logs()
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let (ok, out) = psql_as(ALICE.0, ALICE.1, prefer.gateway_port(), "SELECT 'prefer'");
    assert!(ok && out.trim() == "prefer", "{out}\n{}", prefer.logs());
    let verify = pooler_with("verify-full", Some("ca.pem"));
    let (ok, out) = psql_as(ALICE.0, ALICE.1, verify.gateway_port(), "SELECT 'verified'");
    assert!(ok && out.trim() == "verified", "{out}\n{}", verify.logs());

    // Every backend of alice (one per pooler, kept idle in its pool) is encrypted.
    let ssl = pg.psql_admin(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl AND s.version LIKE 'TLSv1._') \
         FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
         WHERE a.usename = 'alice' AND a.backend_type = 'client backend'",
    );
    let counts: Vec<u32> = ssl.trim().split('|').map(|n| n.parse().unwrap()).collect();
    assert!(
        counts.len() == 2 && counts[0] >= 3 && counts[1] == counts[0],
        "alice's backends, all and encrypted: {ssl}"
    );

    // A cancel request reaches Postgres (over TLS, as the backend connections).
    let port = verify.gateway_port();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let url = format!(
            "host=127.0.0.1 port={port} user={} password={} dbname=app",
            ALICE.0, ALICE.1
        );
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        let token = client.cancel_token();
        let started = std::time::Instant::now();
        let sleeping =
            tokio::spawn(async move { client.simple_query("SELECT pg_sleep(30)").await });
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        token.cancel_query(tokio_postgres::NoTls).await.unwrap();
        let err = sleeping.await.unwrap().expect_err("cancelled");
        assert_eq!(
            err.code(),
            Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
            "{err}"
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
    });

    // `verify-full` against a CA that did not issue the certificate: refused, with why.
    let wrong = pooler_with("verify-full", Some("other-ca.pem"));
    let (ok, out) = psql_as(ALICE.0, ALICE.1, wrong.gateway_port(), "SELECT 1");
    assert!(!ok, "{out}");
    assert!(
        out.contains("TLS handshake with the server") && out.contains("certificate"),
        "{out}\n{}",
        wrong.logs()
    );
}
