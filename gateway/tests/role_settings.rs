//! `ALTER ROLE … SET` / `ALTER DATABASE … SET` (issue 4, point 5): as in Postgres, they change
//! the defaults of sessions that start afterwards, and sessions already running keep theirs,
//! even though every session here runs on the one pooled backend (pool size 1) turn by turn.
//! `RESET` in a session returns to that session's own defaults.

use std::future::Future;
use std::time::{Duration, Instant};

use testkit::{PgCluster, Tidepool, TidepoolOpts, ALICE, APP_DB, BOB};

async fn bounded<T>(limit: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("test exceeded {limit:?}"))
}

fn start() -> (PgCluster, Tidepool) {
    let pg = PgCluster::start();
    let tp = Tidepool::start(&pg, TidepoolOpts::default().pool_size(1));
    (pg, tp)
}

async fn setting(c: &tokio_postgres::Client, name: &str) -> String {
    c.query_one("SELECT current_setting($1)", &[&name])
        .await
        .unwrap()
        .get(0)
}

/// Makes the pool log in a new backend: a session that creates a temporary table pins its
/// backend, and a pinned backend is closed when its session ends (never reused).
async fn replace_backend(tp: &Tidepool) {
    let ep = tp.endpoint();
    let p = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
    p.batch_execute("CREATE TEMP TABLE pin_me (x int)")
        .await
        .unwrap();
    let pid: i32 = p
        .query_one(
            "SELECT pid FROM pg_stat_activity WHERE pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    drop(p);
    // Wait (bounded) until Postgres has ended that backend.
    let admin = tp.cluster().admin_client().await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE pid = $1",
                &[&pid],
            )
            .await
            .unwrap()
            .get(0);
        if n == 0 {
            return;
        }
        assert!(Instant::now() < deadline, "pinned backend {pid} not closed");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn alter_role_set_takes_effect_for_new_sessions_only() {
    let (pg, tp) = start();
    bounded(Duration::from_secs(120), async {
        let ep = tp.endpoint();
        let direct = pg.direct();
        let server_default = {
            let d = direct.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
            setting(&d, "work_mem").await
        };
        assert_ne!(server_default, "8MB");
        let old = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        assert_eq!(setting(&old, "work_mem").await, server_default);

        // Through the gateway: alice may set her own defaults.
        old.batch_execute("ALTER ROLE alice SET work_mem = '8MB'")
            .await
            .unwrap();
        let new = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let new_direct = direct.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        assert_eq!(setting(&new_direct, "work_mem").await, "8MB");

        for round in 0..3 {
            assert_eq!(setting(&new, "work_mem").await, "8MB", "round {round}");
            assert_eq!(
                setting(&old, "work_mem").await,
                server_default,
                "round {round}: the old session sees the new role default"
            );
            old.batch_execute("SET work_mem = '16MB'").await.unwrap();
            new.batch_execute("SET work_mem = '32MB'").await.unwrap();
            assert_eq!(setting(&old, "work_mem").await, "16MB");
            assert_eq!(setting(&new, "work_mem").await, "32MB");
            let reset = if round % 2 == 0 {
                "RESET work_mem"
            } else {
                "RESET ALL"
            };
            new.batch_execute(reset).await.unwrap();
            old.batch_execute(reset).await.unwrap();
            assert_eq!(setting(&new, "work_mem").await, "8MB", "{reset} in new");
            assert_eq!(
                setting(&old, "work_mem").await,
                server_default,
                "{reset} in old"
            );
            // Now the one backend logs in again, after the ALTER: the old session still has
            // the default it started with (the new login's role default is not its own).
            replace_backend(&tp).await;
        }
        old.batch_execute("RESET work_mem").await.unwrap();
        assert_eq!(setting(&old, "work_mem").await, server_default);

        // ALTER ROLE … RESET: new sessions lose the default, running ones keep theirs.
        old.batch_execute("ALTER ROLE alice RESET work_mem")
            .await
            .unwrap();
        let newest = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        assert_eq!(setting(&newest, "work_mem").await, server_default);
        assert_eq!(setting(&new, "work_mem").await, "8MB");
        new.batch_execute("RESET ALL").await.unwrap();
        assert_eq!(setting(&new, "work_mem").await, "8MB");
        assert_eq!(setting(&newest, "work_mem").await, server_default);
        assert_eq!(setting(&old, "work_mem").await, server_default);
    })
    .await;
}

/// New sessions of alice and bob in `app`, directly and through Tidepool, start with these
/// defaults (`path` for alice, the database's for bob), and `RESET ALL` returns to them.
async fn expect_path(ep: &testkit::Endpoint, direct: &testkit::Endpoint, path: &str) {
    for (name, user) in [("alice", ALICE), ("bob", BOB)] {
        let want = if name == "alice" { path } else { "d1, public" };
        let t = ep.connect(user.0, user.1, APP_DB).await.unwrap();
        let d = direct.connect(user.0, user.1, APP_DB).await.unwrap();
        assert_eq!(setting(&d, "search_path").await, want, "direct, {name}");
        assert_eq!(setting(&t, "search_path").await, want, "tidepool, {name}");
        assert_eq!(setting(&t, "TimeZone").await, "Asia/Tokyo", "{name}");
        t.batch_execute("SET search_path = elsewhere; SET TimeZone = 'UTC'; RESET ALL")
            .await
            .unwrap();
        assert_eq!(setting(&t, "search_path").await, want, "{name} after RESET");
        assert_eq!(setting(&t, "TimeZone").await, "Asia/Tokyo");
    }
}

#[tokio::test]
async fn database_role_and_role_in_database_precedence() {
    let (pg, tp) = start();
    bounded(Duration::from_secs(120), async {
        let ep = tp.endpoint();
        let direct = pg.direct();
        let alice = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        // alice owns `app`: she may set its defaults, and her own.
        alice
            .batch_execute(
                "ALTER DATABASE app SET search_path = d1, public;\
                 ALTER DATABASE app SET TimeZone = 'Asia/Tokyo';\
                 ALTER ROLE alice SET search_path = r1, public;\
                 ALTER ROLE alice IN DATABASE app SET search_path = rd, public;",
            )
            .await
            .unwrap();
        expect_path(&ep, &direct, "rd, public").await;
        alice
            .batch_execute("ALTER ROLE alice IN DATABASE app RESET search_path")
            .await
            .unwrap();
        expect_path(&ep, &direct, "r1, public").await;
        alice
            .batch_execute("ALTER ROLE alice RESET search_path")
            .await
            .unwrap();
        expect_path(&ep, &direct, "d1, public").await;
        // The first session kept the defaults it started with.
        assert_eq!(setting(&alice, "search_path").await, "\"$user\", public");
        assert_ne!(setting(&alice, "TimeZone").await, "Asia/Tokyo");
    })
    .await;
}

#[tokio::test]
async fn startup_settings_override_role_defaults() {
    let (pg, tp) = start();
    bounded(Duration::from_secs(60), async {
        pg.psql_admin("ALTER ROLE alice SET work_mem = '8MB'");
        for ep in [pg.direct(), tp.endpoint()] {
            let mut config = ep.pg_config(ALICE.0, ALICE.1, APP_DB);
            config
                .options("-c work_mem=3MB")
                .application_name("role-settings-test");
            let (c, conn) = config.connect(tokio_postgres::NoTls).await.unwrap();
            tokio::spawn(conn);
            assert_eq!(setting(&c, "work_mem").await, "3MB", "{ep:?}");
            c.batch_execute("SET work_mem = '1MB'; RESET work_mem")
                .await
                .unwrap();
            assert_eq!(setting(&c, "work_mem").await, "3MB", "{ep:?} after RESET");
            // application_name from the startup packet: the session's, and what
            // pg_stat_activity shows for the backend serving it.
            let row = c
                .query_one(
                    "SELECT current_setting('application_name'), application_name \
                     FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap();
            assert_eq!(row.get::<_, String>(0), "role-settings-test", "{ep:?}");
            assert_eq!(row.get::<_, String>(1), "role-settings-test", "{ep:?}");
        }
        let plain = tp
            .endpoint()
            .connect(ALICE.0, ALICE.1, APP_DB)
            .await
            .unwrap();
        assert_eq!(setting(&plain, "work_mem").await, "8MB");
    })
    .await;
}

/// A change made directly on Postgres (not through a gateway) reaches new sessions within the
/// pooler's `role_settings_cache_ms`.
#[tokio::test]
async fn direct_changes_reach_new_sessions_within_the_cache_bound() {
    let (pg, tp) = start();
    bounded(Duration::from_secs(60), async {
        let ep = tp.endpoint();
        let first = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let before = setting(&first, "work_mem").await;
        pg.psql_admin("ALTER ROLE alice SET work_mem = '5MB'");
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let c = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
            if setting(&c, "work_mem").await == "5MB" {
                break;
            }
            assert!(Instant::now() < deadline, "the role default never arrived");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(setting(&first, "work_mem").await, before);
    })
    .await;
}

/// A superuser-only setting that a superuser set on the role (Postgres applies it at login with
/// superuser rights; the role itself could not `SET` it): sessions still work, and a backend that logs in after the change
/// has it, as Postgres applies it at login.
#[tokio::test]
async fn superuser_only_role_settings_do_not_break_sessions() {
    let (pg, tp) = start();
    bounded(Duration::from_secs(60), async {
        let ep = tp.endpoint();
        let old = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        setting(&old, "log_statement").await;
        pg.psql_admin(
            "ALTER ROLE alice SET log_statement = 'all';\
             ALTER ROLE alice SET work_mem = '6MB';",
        );
        replace_backend(&tp).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let c = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
            if setting(&c, "work_mem").await == "6MB" {
                assert_eq!(setting(&c, "log_statement").await, "all");
                c.batch_execute("RESET ALL").await.unwrap();
                assert_eq!(setting(&c, "work_mem").await, "6MB");
                break;
            }
            assert!(Instant::now() < deadline, "the role default never arrived");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_ne!(setting(&old, "work_mem").await, "6MB");
        old.batch_execute("RESET ALL").await.unwrap();
        assert_ne!(setting(&old, "work_mem").await, "6MB");
    })
    .await;
}

async fn get(c: &tokio_postgres::Client) -> String {
    let tenant = "SELECT coalesce(current_setting('app.tenant', true), '<none>')";
    c.query_one(tenant, &[]).await.unwrap().get(0)
}

/// Sets `app.tenant = 't1'` on alice through Tidepool, as a superuser (Postgres 15 lets only a
/// superuser set a placeholder on a role): sessions opened afterwards, on any pooler core, get it.
async fn set_tenant_default(pg: &PgCluster, ep: &testkit::Endpoint) {
    pg.psql_admin("CREATE ROLE root SUPERUSER LOGIN PASSWORD 'root-pw'");
    let root = ep.connect("root", "root-pw", APP_DB).await.unwrap();
    root.batch_execute("ALTER ROLE alice SET app.tenant = 't1'")
        .await
        .unwrap();
}

/// A custom setting (`app.tenant`, a placeholder Postgres hides from `pg_settings`) as a role
/// default: the row-level-security pattern. New sessions get it; a session opened before never
/// sees it (Postgres: NULL; through Tidepool NULL, or `''` on a backend that logged in with it:
/// a placeholder, once created, cannot be removed).
#[tokio::test]
async fn custom_role_default() {
    let (pg, tp) = start();
    bounded(Duration::from_secs(60), async {
        let ep = tp.endpoint();
        let old = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        assert_eq!(get(&old).await, "<none>");
        set_tenant_default(&pg, &ep).await;
        for round in 0..2 {
            for ep in [pg.direct(), ep.clone()] {
                let c = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
                assert_eq!(get(&c).await, "t1", "round {round}, {ep:?}");
                c.batch_execute("SET app.tenant = 't2'").await.unwrap();
                assert_eq!(get(&c).await, "t2", "{ep:?}");
                let o = get(&old).await;
                assert!(o == "<none>" || o.is_empty(), "round {round}: old sees {o}");
            }
            replace_backend(&tp).await;
        }
    })
    .await;
}

/// The limit: `RESET` of a custom role default returns to it only on a backend that logged in
/// with it; on one that did not, Postgres's reset value for the placeholder is `''` and the
/// read-back cannot tell that from a `SET` (README, "Differences from Postgres").
#[tokio::test]
#[ignore = "known limit: RESET of a custom (x.y) role default on a backend that logged in without it gives ''"]
async fn reset_custom_role_default() {
    let (pg, tp) = start();
    bounded(Duration::from_secs(60), async {
        let ep = tp.endpoint();
        // This session's backend logs in before the default exists.
        let before = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        get(&before).await;
        set_tenant_default(&pg, &ep).await;
        let c = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        c.batch_execute("SET app.tenant = 't2'; RESET app.tenant")
            .await
            .unwrap();
        assert_eq!(get(&c).await, "t1");
    })
    .await;
}

/// A role default Postgres can no longer apply (its text search configuration is gone): the
/// login only warns in Postgres, so through Tidepool the session opens too.
#[tokio::test]
async fn a_role_default_postgres_refuses_does_not_block_logins() {
    let (pg, tp) = start();
    bounded(Duration::from_secs(60), async {
        let ep = tp.endpoint();
        pg.psql_admin_db(
            APP_DB,
            "CREATE ROLE root SUPERUSER LOGIN PASSWORD 'root-pw';\
             CREATE TEXT SEARCH CONFIGURATION public.doomed (COPY = pg_catalog.simple);",
        );
        let root = ep.connect("root", "root-pw", APP_DB).await.unwrap();
        root.batch_execute(
            "ALTER ROLE alice SET default_text_search_config = 'public.doomed';\
             DROP TEXT SEARCH CONFIGURATION public.doomed",
        )
        .await
        .unwrap();
        let direct = pg.direct().connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        assert_eq!(setting(&direct, "work_mem").await, "4MB");
        let c = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        assert_eq!(setting(&c, "work_mem").await, "4MB");
        assert!(
            tp.pooler_log()
                .contains("a role or database default was refused"),
            "the pooler did not try the role default"
        );
    })
    .await;
}
