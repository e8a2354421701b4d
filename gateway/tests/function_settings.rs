//! `set_config` inside a `SELECT` or a user function (issue 4, point 5): a session-level change
//! follows its session to other backends and never reaches another session sharing the backend.
//! Pool size 1, so both sessions run on the same backend turn by turn: the backend is brought to
//! each session's settings in turn, as it would be on moving to another backend.

use std::future::Future;
use std::time::Duration;

use testkit::{PgCluster, Tidepool, TidepoolOpts, ALICE, APP_DB};

async fn bounded<T>(limit: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("test exceeded {limit:?}"))
}

const PROBE: &str = "SELECT current_setting('work_mem') || ' | ' || current_setting('TimeZone') \
     || ' | ' || coalesce(current_setting('app.tenant', true), '')";

const FUNCTIONS: &str = "
CREATE FUNCTION set_tz(z text) RETURNS text LANGUAGE plpgsql AS
  $$ BEGIN RETURN set_config('TimeZone', z, false); END $$;
CREATE FUNCTION set_wm(v text) RETURNS text LANGUAGE plpgsql AS
  $$ BEGIN RETURN set_config('work_mem', v, false); END $$;
-- search_path with a SET command in the body; the calling statement names no setting.
CREATE SCHEMA other;
GRANT USAGE ON SCHEMA other TO PUBLIC;
CREATE FUNCTION use_other() RETURNS int LANGUAGE plpgsql AS
  $$ BEGIN SET search_path = other, public; RETURN 1; END $$;
-- A custom setting named only inside the body, one level down (an SQL function calling a
-- plpgsql one).
CREATE FUNCTION tenant_inner(v text) RETURNS text LANGUAGE plpgsql AS
  $$ BEGIN RETURN set_config('app.tenant', v, false); END $$;
CREATE FUNCTION enter_tenant(v text) RETURNS text LANGUAGE sql AS $$ SELECT tenant_inner(v) $$;
-- Sets its custom setting only when asked: the body is read at the first call, which sets
-- nothing; the name found there is read back after later calls too.
CREATE FUNCTION maybe_region(v text) RETURNS void LANGUAGE plpgsql AS
  $$ BEGIN IF v <> '' THEN PERFORM set_config('app.region', v, false); END IF; END $$;
GRANT EXECUTE ON FUNCTION maybe_region(text) TO PUBLIC;
CREATE TABLE calls_log (v text);
GRANT ALL ON calls_log TO PUBLIC;
CREATE PROCEDURE wm_proc(v text) LANGUAGE plpgsql AS
  $$ BEGIN PERFORM set_config('work_mem', v, false); END $$;
GRANT EXECUTE ON FUNCTION set_tz(text), set_wm(text), use_other(), tenant_inner(text),
  enter_tenant(text) TO PUBLIC;
GRANT EXECUTE ON PROCEDURE wm_proc(text) TO PUBLIC;
CREATE FUNCTION listen_on(c text) RETURNS void LANGUAGE plpgsql AS
  $$ BEGIN EXECUTE format('LISTEN %I', c); END $$;
GRANT EXECUTE ON FUNCTION listen_on(text) TO PUBLIC;
";

fn start() -> (PgCluster, Tidepool) {
    let pg = PgCluster::start();
    pg.psql_admin_db(APP_DB, FUNCTIONS);
    let tp = Tidepool::start(&pg, TidepoolOpts::default().pool_size(1));
    (pg, tp)
}

async fn probe(c: &tokio_postgres::Client) -> String {
    c.query_one(PROBE, &[]).await.unwrap().get(0)
}

#[tokio::test]
async fn set_config_in_a_select_stays_with_its_session() {
    let (_pg, tp) = start();
    bounded(Duration::from_secs(60), async {
        let ep = tp.endpoint();
        let a = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let b = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let defaults = probe(&b).await;
        for i in 0..5 {
            a.batch_execute(&format!(
                "SELECT set_config('work_mem', '{}MB', false), \
                 set_config('app.tenant', 't{i}', false), set_config('TimeZone', 'Asia/Tokyo', false)",
                10 + i
            ))
            .await
            .unwrap();
            assert_eq!(probe(&b).await, defaults, "round {i}: b sees a's settings");
            assert_eq!(
                probe(&a).await,
                format!("{}MB | Asia/Tokyo | t{i}", 10 + i),
                "round {i}: a lost its settings"
            );
            // Transaction-local set_config ends with the transaction, as directly.
            a.batch_execute("BEGIN; SELECT set_config('work_mem', '99MB', true); COMMIT")
                .await
                .unwrap();
            assert_eq!(
                probe(&a).await,
                format!("{}MB | Asia/Tokyo | t{i}", 10 + i)
            );
            a.batch_execute("RESET ALL").await.unwrap();
        }
    })
    .await;
}

/// A user function that changes a setting Postgres reports to clients (`TimeZone`, `DateStyle`,
/// `IntervalStyle`, `application_name`, ...): the pooler sees the `ParameterStatus` and reads the
/// settings back, so the change follows the session and stays off the other one.
#[tokio::test]
async fn set_config_in_a_function_of_a_reported_setting() {
    let (_pg, tp) = start();
    bounded(Duration::from_secs(60), async {
        let ep = tp.endpoint();
        let a = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let b = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let defaults = probe(&b).await;
        for (i, zone) in ["Asia/Tokyo", "America/Lima", "Europe/Paris"]
            .iter()
            .enumerate()
        {
            a.query_one("SELECT set_tz($1)", &[zone]).await.unwrap();
            assert_eq!(probe(&b).await, defaults, "round {i}: b sees a's TimeZone");
            let got = probe(&a).await;
            assert!(got.contains(zone), "round {i}: a lost its TimeZone: {got}");
        }
        // Everything the function's statement changed is read back, not only the reported
        // setting.
        a.batch_execute("SELECT set_tz('Asia/Tokyo'), set_wm('12MB')")
            .await
            .unwrap();
        assert_eq!(probe(&b).await, defaults);
        assert_eq!(probe(&a).await, "12MB | Asia/Tokyo | ");
    })
    .await;
}

/// A user function that changes only settings Postgres does not report: the statement calls a
/// function that is not built-in, so the pooler reads the settings back after it. Prepared once
/// and executed in later batches (the `Bind` carries the statement's flags), and by the simple
/// protocol.
#[tokio::test]
async fn set_config_in_a_function_of_an_unreported_setting() {
    let (_pg, tp) = start();
    bounded(Duration::from_secs(60), async {
        let ep = tp.endpoint();
        let a = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let b = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let defaults = probe(&b).await;
        a.query_one("SELECT set_wm($1)", &[&"12MB"]).await.unwrap();
        assert_eq!(probe(&b).await, defaults, "b sees a's work_mem");
        assert!(probe(&a).await.starts_with("12MB"), "a lost its work_mem");
        let rest = defaults.split_once(" | ").unwrap().1;
        let stmt = a.prepare("SELECT set_wm($1)").await.unwrap();
        for i in 1..=3 {
            let v = format!("{i}3MB");
            a.query_one(&stmt, &[&v]).await.unwrap();
            assert_eq!(probe(&b).await, defaults, "round {i}: b sees a's work_mem");
            assert_eq!(probe(&a).await, format!("{v} | {rest}"), "round {i}");
        }
        a.batch_execute("SELECT set_wm('14MB')").await.unwrap();
        assert_eq!(probe(&b).await, defaults);
        assert_eq!(probe(&a).await, format!("14MB | {rest}"));
    })
    .await;
}

/// Two sessions over one backend: `change` runs on `a`, then `b` must still see its own
/// settings and `a` must see `want` from `show`, also after `b` used the backend again.
async fn follows_only_its_session(
    a: &tokio_postgres::Client,
    b: &tokio_postgres::Client,
    change: &str,
    show: &str,
    want: &str,
) {
    let b_before: String = b.query_one(show, &[]).await.unwrap().get(0);
    assert_ne!(b_before, want, "{change}: the test would prove nothing");
    a.batch_execute(change).await.unwrap();
    for round in 0..2 {
        let got: String = b.query_one(show, &[]).await.unwrap().get(0);
        assert_eq!(got, b_before, "{change}: round {round}: b sees a's change");
        let got: String = a.query_one(show, &[]).await.unwrap().get(0);
        assert_eq!(got, want, "{change}: round {round}: a lost its change");
    }
}

/// Issue 4, point 5: settings changed inside user functions, procedures and DO blocks, called
/// from every kind of statement, follow their session and never reach the other one.
#[tokio::test]
async fn settings_changed_by_user_code_follow_the_session() {
    let (_pg, tp) = start();
    bounded(Duration::from_secs(120), async {
        let ep = tp.endpoint();
        let a = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let b = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        let tenant = "SELECT coalesce(current_setting('app.tenant', true), '')";
        let work_mem = "SELECT current_setting('work_mem')";
        // search_path, by a SET in the body.
        follows_only_its_session(
            &a,
            &b,
            "SELECT use_other()",
            "SELECT current_setting('search_path')",
            "other, public",
        )
        .await;
        // A custom setting the statement does not name, two functions down, from a SELECT.
        follows_only_its_session(&a, &b, "SELECT enter_tenant('t1')", tenant, "t1").await;
        // ... from INSERT ... VALUES (f()).
        follows_only_its_session(
            &a,
            &b,
            "INSERT INTO calls_log VALUES (enter_tenant('t2'))",
            tenant,
            "t2",
        )
        .await;
        // ... from UPDATE ... SET x = f() and from FROM f().
        follows_only_its_session(
            &a,
            &b,
            "UPDATE calls_log SET v = enter_tenant('t3') WHERE v = 't2'",
            tenant,
            "t3",
        )
        .await;
        follows_only_its_session(&a, &b, "SELECT * FROM enter_tenant('t4')", tenant, "t4").await;
        // A custom setting set only by a later call than the one that read the body.
        let region = "SELECT coalesce(current_setting('app.region', true), '')";
        a.batch_execute("SELECT maybe_region('')").await.unwrap();
        follows_only_its_session(&a, &b, "SELECT maybe_region('r1')", region, "r1").await;
        // A procedure.
        follows_only_its_session(&a, &b, "CALL wm_proc('21MB')", work_mem, "21MB").await;
        // A DO block calling a user function.
        follows_only_its_session(
            &a,
            &b,
            "DO $$ BEGIN PERFORM set_wm('22MB'); END $$",
            work_mem,
            "22MB",
        )
        .await;
        // Schema-qualified.
        follows_only_its_session(&a, &b, "SELECT public.set_wm('23MB')", work_mem, "23MB").await;
        // RESET ALL brings a back to its defaults, and b never moved.
        a.batch_execute("RESET ALL").await.unwrap();
        assert_eq!(probe(&a).await, probe(&b).await);
    })
    .await;
}

/// A `LISTEN` run by a user function: the settings read-back also reads the channels back, so
/// the session hears the channel (from the shared listener) and the other session sharing the
/// backend does not listen on it.
#[tokio::test]
async fn listen_inside_a_function_is_followed() {
    let (_pg, tp) = start();
    bounded(Duration::from_secs(60), async {
        let ep = tp.endpoint();
        let (a, connection) = ep
            .pg_config(ALICE.0, ALICE.1, APP_DB)
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap();
        let (tx, mut heard) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut connection = connection;
            while let Some(Ok(m)) = std::future::poll_fn(|cx| connection.poll_message(cx)).await {
                if let tokio_postgres::AsyncMessage::Notification(n) = m {
                    let _ = tx.send(format!("{}:{}", n.channel(), n.payload()));
                }
            }
        });
        let b = ep.connect(ALICE.0, ALICE.1, APP_DB).await.unwrap();
        a.batch_execute("SELECT listen_on('fn_chan')")
            .await
            .unwrap();
        let listening = |rows: Vec<tokio_postgres::Row>| -> Vec<String> {
            rows.iter().map(|r| r.get(0)).collect()
        };
        let q = "SELECT c FROM pg_listening_channels() AS c ORDER BY 1";
        assert!(
            listening(b.query(q, &[]).await.unwrap()).is_empty(),
            "b listens"
        );
        assert_eq!(listening(a.query(q, &[]).await.unwrap()), vec!["fn_chan"]);
        b.batch_execute("NOTIFY fn_chan, 'one'").await.unwrap();
        let got = tokio::time::timeout(Duration::from_secs(10), heard.recv()).await;
        assert_eq!(got.ok().flatten().as_deref(), Some("fn_chan:one"));
    })
    .await;
}
