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
