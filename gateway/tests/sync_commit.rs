//! Issue 5, point 3: users cannot lower synchronous_commit through the gateway. Every form that
//! would (SET, SET LOCAL, set_config, ALTER ... SET, the startup packet) gets SQLSTATE 42501 and
//! leaves the setting at `on`; `on` and `remote_apply` work; inside a transaction the refusal
//! aborts it as a Postgres error does. Real Postgres, real pooler and gateway, psql.

use std::time::Duration;
use testkit::{PgCluster, Psql, Tidepool, TidepoolOpts};

const ALICE: (&str, &str) = ("alice", "alice-pw");

/// A test cluster runs with synchronous_commit = off (speed); these tests need the durable
/// default a real cluster has.
fn durable_cluster() -> PgCluster {
    let pg = PgCluster::start();
    pg.psql_admin("ALTER SYSTEM SET synchronous_commit = on");
    pg.psql_admin("SELECT pg_reload_conf()");
    pg
}

fn psql(tp: &Tidepool, script: &str) -> String {
    let out = Psql::new(&tp.endpoint(), ALICE.0, ALICE.1, "app")
        .var("VERBOSITY", "verbose")
        .with_command_tags()
        .line_buffered()
        .stdin(script)
        .timeout(Duration::from_secs(60))
        .run();
    assert!(!out.timed_out, "psql timed out:\n{}", out.text);
    out.text
}

fn count(hay: &str, needle: &str) -> usize {
    hay.matches(needle).count()
}

#[test]
fn lowering_forms_are_refused_and_the_setting_stays_on() {
    let pg = durable_cluster();
    let tp = Tidepool::start(&pg, TidepoolOpts::default());
    let out = psql(
        &tp,
        "SET synchronous_commit TO off;\n\
         SET SESSION synchronous_commit = 'local';\n\
         SET synchronous_commit = remote_write;\n\
         SET synchronous_commit = 0;\n\
         SELECT set_config('synchronous_commit', 'off', false);\n\
         SELECT 1 AS one \\; SET synchronous_commit = false;\n\
         ALTER ROLE alice SET synchronous_commit = off;\n\
         SHOW synchronous_commit;\n",
    );
    assert_eq!(
        count(
            &out,
            "ERROR:  42501: permission denied to lower synchronous_commit"
        ),
        7,
        "{out}"
    );
    // Nothing ran of the multi-statement query, and the setting is still on.
    assert!(!out.contains(" one"), "{out}");
    assert!(out.contains("\n on\n"), "{out}");
    // The role's defaults were not touched either.
    let roleconfig = pg.psql_admin(
        "SELECT coalesce(rolconfig::text, 'none') FROM pg_roles WHERE rolname = 'alice'",
    );
    assert!(!roleconfig.contains("synchronous_commit"), "{roleconfig}");
    // Nothing else is affected: the session goes on.
    let out2 = psql(&tp, "SELECT 40 + 2 AS answer;\n");
    assert!(out2.contains("42"), "{out2}");
}

#[test]
fn raising_forms_work() {
    let pg = durable_cluster();
    let tp = Tidepool::start(&pg, TidepoolOpts::default());
    let out = psql(
        &tp,
        "SET synchronous_commit TO remote_apply;\n\
         SHOW synchronous_commit;\n\
         SELECT set_config('synchronous_commit', 'on', false);\n\
         SHOW synchronous_commit;\n\
         SET synchronous_commit TO DEFAULT;\n\
         SELECT current_setting('synchronous_commit') AS now;\n",
    );
    assert!(!out.contains("ERROR"), "{out}");
    assert!(out.contains("remote_apply"), "{out}");
    assert_eq!(count(&out, "\n on\n"), 3, "{out}");
}

#[test]
fn refusal_inside_a_transaction_aborts_it() {
    let pg = durable_cluster();
    pg.psql_admin_db(
        "app",
        "CREATE TABLE sc_t (a int); GRANT ALL ON sc_t TO alice;",
    );
    let tp = Tidepool::start(&pg, TidepoolOpts::default());
    let out = psql(
        &tp,
        "BEGIN;\n\
         INSERT INTO sc_t VALUES (1);\n\
         SET LOCAL synchronous_commit TO off;\n\
         INSERT INTO sc_t VALUES (2);\n\
         COMMIT;\n\
         SELECT count(*) AS n FROM sc_t;\n\
         SHOW synchronous_commit;\n",
    );
    assert_eq!(count(&out, "ERROR:  42501"), 1, "{out}");
    // Like any error: the next statement is refused, COMMIT rolls back.
    assert_eq!(count(&out, "ERROR:  25P02"), 1, "{out}");
    assert!(out.contains("ROLLBACK"), "{out}");
    let n = pg.psql_admin_db("app", "SELECT count(*) FROM sc_t");
    assert_eq!(n.trim(), "0", "{out}");
    assert!(out.contains("\n on\n"), "{out}");
}

#[test]
fn startup_options_cannot_lower_it() {
    let pg = durable_cluster();
    let tp = Tidepool::start(&pg, TidepoolOpts::default());
    let ep = tp.endpoint();
    let out = Psql::new(
        &ep,
        ALICE.0,
        ALICE.1,
        "dbname=app options='-c synchronous_commit=off'",
    )
    .command("SELECT 1")
    .run();
    assert!(!out.success(), "{}", out.text);
    assert!(
        out.text
            .contains("permission denied to lower synchronous_commit"),
        "{}",
        out.text
    );
    let out = Psql::new(
        &ep,
        ALICE.0,
        ALICE.1,
        "dbname=app options='-c synchronous_commit=remote_apply'",
    )
    .command("SHOW synchronous_commit")
    .run();
    assert!(
        out.success() && out.text.contains("remote_apply"),
        "{}",
        out.text
    );
}

#[tokio::test]
async fn extended_protocol_and_parameters() {
    let pg = durable_cluster();
    let tp = Tidepool::start(&pg, TidepoolOpts::default());
    tokio::time::timeout(Duration::from_secs(60), async {
        let c = tp
            .endpoint()
            .connect(ALICE.0, ALICE.1, "app")
            .await
            .unwrap();
        // A parameter could be anything: refused.
        let e = c
            .query(
                "SELECT set_config('synchronous_commit', $1, false)",
                &[&"off"],
            )
            .await
            .unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{e}");
        let e = c
            .query("SET synchronous_commit = off", &[])
            .await
            .unwrap_err();
        assert_eq!(e.code().map(|c| c.code()), Some("42501"), "{e}");
        let v: String = c
            .query_one("SHOW synchronous_commit", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, "on");
        c.execute("SET synchronous_commit = remote_apply", &[])
            .await
            .unwrap();
        let v: String = c
            .query_one("SHOW synchronous_commit", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(v, "remote_apply");
    })
    .await
    .expect("test took more than 60 s");
}

#[test]
fn the_guard_can_be_turned_off() {
    let pg = durable_cluster();
    let tp = Tidepool::start(
        &pg,
        TidepoolOpts::default()
            .gateway_arg("--guard-synchronous-commit")
            .gateway_arg("false"),
    );
    let out = psql(
        &tp,
        "SET synchronous_commit TO off;\nSHOW synchronous_commit;\n",
    );
    assert!(!out.contains("ERROR"), "{out}");
    assert!(out.contains("\n off\n"), "{out}");
}
