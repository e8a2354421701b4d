//! The harness against Postgres alone: a cluster starts, the roles of CONTRACTS.md log in the
//! ways the suites rely on, and it is gone after drop.

use std::time::Duration;

use tidepool_testkit::{Frontend, PgCluster, ALICE, APP_DB, BOB};

#[tokio::test]
async fn cluster_starts_logs_in_and_stops() {
    let pg = PgCluster::start();
    let dir = pg.dir().to_path_buf();
    let direct = pg.direct();

    // tokio-postgres: alice (SCRAM verifier) and bob (md5 verifier).
    for (user, password) in [ALICE, BOB] {
        let client = direct.connect(user, password, APP_DB).await.expect("login");
        let row = client
            .query_one("SELECT current_user::text, current_database()::text", &[])
            .await
            .unwrap();
        assert_eq!(row.get::<_, String>(0), user);
        assert_eq!(row.get::<_, String>(1), APP_DB);
    }
    let verifiers = pg.psql_admin(
        "SELECT rolname, left(rolpassword, 3) FROM pg_authid WHERE rolname IN ('alice','bob') ORDER BY 1",
    );
    assert_eq!(verifiers.trim(), "alice|SCR\nbob|md5");

    // Wrong password and unknown role: 28P01, as the suites expect to compare.
    let err = direct
        .connect(ALICE.0, "nope", APP_DB)
        .await
        .expect_err("wrong password fails");
    assert_eq!(err.code().map(|c| c.code()), Some("28P01"));
    let err = direct
        .connect("nobody", "x", APP_DB)
        .await
        .expect_err("unknown role fails");
    assert_eq!(err.code().map(|c| c.code()), Some("28P01"));

    // psql, with the password from the environment.
    let out = direct
        .psql(BOB.0, BOB.1, APP_DB)
        .arg("-At")
        .command("SELECT 40 + 2")
        .run();
    assert!(out.success(), "{}", out.text);
    assert_eq!(out.text.trim(), "42");

    // The raw client: SCRAM and md5 logins, a pipeline, an error.
    for (user, password) in [ALICE, BOB] {
        let mut raw = direct.raw(user, password, APP_DB).await.expect("raw login");
        assert!(
            raw.startup.iter().any(|m| m.tag == b'K'),
            "BackendKeyData at login"
        );
        raw.send(
            Frontend::new()
                .run("SELECT $1::int + 1", &[Some(b"41")])
                .run("SELECT 1/0", &[])
                .sync()
                .bytes(),
        )
        .await
        .unwrap();
        let got: Vec<String> = raw
            .recv_until(b'Z', Duration::from_secs(10))
            .await
            .iter()
            .map(|e| format!("{e:?}"))
            .collect();
        assert_eq!(
            got,
            [
                "ParseComplete",
                "BindComplete",
                "DataRow[\"42\"]",
                "CommandComplete(\"SELECT 1\")",
                "ParseComplete",
                // 1/0 is folded while planning, which happens at Bind.
                "ErrorResponse(S=\"ERROR\" V=\"ERROR\" C=\"22012\" M=\"division by zero\")",
                "ReadyForQuery(I)",
            ]
        );
        raw.terminate().await;
    }

    // Backend counting sees a session of alice.
    let client = direct.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
    let watch = pg.watch_backends(ALICE.0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (max, samples) = watch.stop();
    assert!(samples >= 1);
    assert!(max >= 1, "alice's session is counted");
    drop(client);

    drop(pg);
    assert!(!dir.exists(), "{} removed on drop", dir.display());
}

#[test]
fn clusters_run_side_by_side() {
    let a = PgCluster::start();
    let b = PgCluster::start();
    assert_ne!(a.port(), b.port());
    assert_eq!(a.psql_admin("SELECT 1").trim(), "1");
    assert_eq!(b.psql_admin("SELECT 2").trim(), "2");
    a.create_database("scratch", ALICE.0);
    let out = a
        .direct()
        .psql(ALICE.0, ALICE.1, "scratch")
        .arg("-At")
        .command("CREATE TABLE t(x int); SELECT 7")
        .run();
    assert_eq!(out.text.trim(), "7");
    a.drop_database("scratch");
}
