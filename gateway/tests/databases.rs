//! Statements Postgres runs only while nobody else is connected to a database (`DROP
//! DATABASE`, `ALTER DATABASE ... RENAME`, `CREATE DATABASE ... TEMPLATE`) work through the
//! gateway although the pooler keeps idle backends on that database: it closes them first.
//! (Found by Django's test suite, which drops and copies its test databases; docs/app_suite.md.)

use testkit::{PgCluster, Tidepool, TidepoolOpts};

const ROLE: (&str, &str) = ("dbmaker", "dbmaker-pw");

fn psql(tp: &Tidepool, db: &str, sql: &str) -> testkit::Output {
    tp.endpoint().psql(ROLE.0, ROLE.1, db).command(sql).run()
}

#[test]
fn dropping_renaming_and_copying_a_database_the_pooler_has_backends_on() {
    let pg = PgCluster::start();
    pg.psql_admin(&format!(
        "CREATE ROLE {} LOGIN CREATEDB PASSWORD '{}'",
        ROLE.0, ROLE.1
    ));
    let tp = Tidepool::start(&pg, TidepoolOpts::default().pool_size(4));
    // Twice: the second round finds the pooler's backends of the first round's databases gone.
    for _ in 0..2 {
        let out = psql(&tp, "postgres", "CREATE DATABASE rel_a");
        assert!(out.success(), "{}", out.text);
        // A session of the database leaves an idle pooled backend behind.
        let out = psql(
            &tp,
            "rel_a",
            "CREATE TABLE t (a int); INSERT INTO t VALUES (1)",
        );
        assert!(out.success(), "{}", out.text);
        assert!(
            pg.psql_admin("SELECT count(*) FROM pg_stat_activity WHERE datname = 'rel_a'")
                .trim()
                != "0",
            "the pooler keeps a backend on rel_a"
        );
        // A copy, a rename, a drop: Postgres's answers, not 55006.
        let out = psql(&tp, "postgres", "CREATE DATABASE rel_b TEMPLATE rel_a");
        assert!(out.success(), "CREATE DATABASE ... TEMPLATE: {}", out.text);
        let out = psql(&tp, "rel_a", "SELECT 1");
        assert!(out.success(), "{}", out.text);
        let out = psql(&tp, "postgres", "ALTER DATABASE rel_a RENAME TO rel_c");
        assert!(out.success(), "ALTER DATABASE ... RENAME: {}", out.text);
        let out = psql(&tp, "rel_b", "SELECT 1");
        assert!(out.success(), "{}", out.text);
        for db in ["rel_b", "rel_c"] {
            let out = psql(&tp, "postgres", &format!("DROP DATABASE {db}"));
            assert!(out.success(), "DROP DATABASE {db}: {}", out.text);
        }
    }
    // Still refused when another client really is connected, as in Postgres.
    let out = psql(&tp, "postgres", "CREATE DATABASE rel_d");
    assert!(out.success(), "{}", out.text);
    let holder = std::thread::spawn({
        let ep = tp.endpoint();
        move || {
            ep.psql(ROLE.0, ROLE.1, "rel_d")
                .command("BEGIN; SELECT pg_sleep(8); COMMIT")
                .run()
        }
    });
    std::thread::sleep(std::time::Duration::from_secs(1));
    let out = psql(&tp, "postgres", "DROP DATABASE rel_d");
    assert!(
        !out.success() && out.text.contains("is being accessed by other users"),
        "{}",
        out.text
    );
    let _ = holder.join();
}
