//! `set_config` inside a `SELECT` or a user function (issue 4, point 5): a session-level change
//! follows its session to other backends and never reaches another session sharing the backend.
//! Pool size 1, so both sessions run on the same backend turn by turn.

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
GRANT EXECUTE ON FUNCTION set_tz(text), set_wm(text) TO PUBLIC;
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

/// The limit: a user function that changes only settings Postgres does not report leaves the
/// change on the backend, unseen by the pooler (README, "Differences from Postgres").
#[tokio::test]
#[ignore = "known limit: set_config of an unreported setting inside a user function is not followed (issue 4)"]
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
    })
    .await;
}
