//! A gateway out of file descriptors refuses new clients with 53300 and keeps serving the ones it
//! has.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testkit::{bin_dir, free_port, link_secret_args, PgCluster, Tidepool, TidepoolOpts};

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn out_of_descriptors_refuses_with_53300_and_keeps_serving() {
    let pg = PgCluster::start();
    let tp = Tidepool::start(&pg, TidepoolOpts::default().pool_size(4));
    let port = free_port();
    // A second gateway, on its own port, with only 64 descriptors.
    let _gw = Killed(
        Command::new("prlimit")
            .arg("--nofile=64:64")
            .arg(bin_dir().join("tidepool-gateway"))
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--pooler", &format!("127.0.0.1:{}", tp.pooler_port())])
            .args(["--cores", "1", "--links-per-core", "1"])
            .args(link_secret_args())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start gateway under prlimit"),
    );
    let url = format!(
        "host=127.0.0.1 port={port} user=alice password=alice-pw dbname=app connect_timeout=5"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    let first = loop {
        match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                break c;
            }
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await
            }
            Err(e) => panic!("gateway never came up: {e}"),
        }
    };
    let mut held = vec![first];
    let mut refused = 0;
    let mut other = Vec::new();
    for _ in 0..100 {
        match tokio::time::timeout(
            Duration::from_secs(10),
            tokio_postgres::connect(&url, tokio_postgres::NoTls),
        )
        .await
        {
            Ok(Ok((c, conn))) => {
                tokio::spawn(conn);
                held.push(c);
            }
            Ok(Err(e)) if e.code().map(|c| c.code()) == Some("53300") => refused += 1,
            Ok(Err(e)) => other.push(e.to_string()),
            Err(_) => other.push("connect timed out".into()),
        }
    }
    assert!(
        refused > 0,
        "no client was refused with 53300 (held {}, other {other:?})",
        held.len()
    );
    assert!(other.is_empty(), "errors other than 53300: {other:?}");
    for c in &held {
        let v: i32 = c
            .query_one("SELECT 7", &[])
            .await
            .expect("a held client still works")
            .get(0);
        assert_eq!(v, 7);
    }
    // Once clients leave, new ones get in again.
    held.truncate(held.len() / 2);
    let deadline = Instant::now() + Duration::from_secs(10);
    let (c, conn) = loop {
        match tokio_postgres::connect(&url, tokio_postgres::NoTls).await {
            Ok(x) => break x,
            Err(e) if Instant::now() < deadline => {
                eprintln!("not yet: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("no new client 10 s after half the clients left: {e}"),
        }
    };
    tokio::spawn(conn);
    assert_eq!(
        c.query_one("SELECT 1", &[]).await.unwrap().get::<_, i32>(0),
        1
    );
}
