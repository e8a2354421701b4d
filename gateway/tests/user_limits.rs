//! Backends per user over all its databases (`--max-user-connections`, PgBouncer's
//! `max_user_connections`; issue 12 §3): a user with two databases never has more backends in
//! Postgres than its limit while clients of both databases run, both databases' clients are
//! served, another user is not bounded by it, and backends a user's database holds idle are
//! closed to make room for its other database rather than leaving those sessions to wait out
//! `query_wait_timeout`. Real Postgres 15, pooler, gateway, pgbench and tokio-postgres.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use testkit::{pgbench, PgCluster, PgbenchSummary, Tidepool, TidepoolOpts, ALICE, APP_DB, BOB};

const LIMIT: usize = 3;
const OTHER_DB: &str = "app2";

fn start(pg: &PgCluster, wait_ms: u64) -> Tidepool {
    let opts = TidepoolOpts::default()
        .pool_size(20)
        .pooler_arg("--max-user-connections")
        .pooler_arg(LIMIT.to_string())
        .pooler_arg("--query-wait-timeout-ms")
        .pooler_arg(wait_ms.to_string());
    Tidepool::start(pg, opts)
}

/// Sessions of `user` on `db` that run `SELECT pg_sleep(0.05)` until `stop`; each completion
/// counted in `done`.
fn busy(
    tp: &Tidepool,
    (user, password): (&'static str, &'static str),
    db: &'static str,
    sessions: usize,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
) -> Vec<tokio::task::JoinHandle<Result<(), String>>> {
    (0..sessions)
        .map(|i| {
            let (ep, stop, done) = (tp.endpoint(), stop.clone(), done.clone());
            tokio::spawn(async move {
                let c = ep
                    .connect(user, password, db)
                    .await
                    .map_err(|e| format!("{user}@{db} session {i}: login: {e}"))?;
                while !stop.load(Ordering::Relaxed) {
                    c.simple_query("SELECT pg_sleep(0.05)")
                        .await
                        .map_err(|e| format!("{user}@{db} session {i}: {e}"))?;
                    done.fetch_add(1, Ordering::Relaxed);
                }
                Ok(())
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_has_at_most_its_backends_over_its_databases() {
    let pg = PgCluster::start();
    pg.create_database(OTHER_DB, ALICE.0);
    for db in [APP_DB, OTHER_DB] {
        let init = pgbench(
            &pg.direct(),
            ALICE.0,
            ALICE.1,
            db,
            &["-i", "-s", "1", "-q"],
            Duration::from_secs(120),
        );
        assert!(init.success(), "pgbench -i {db} directly:\n{}", init.text);
    }
    let tp = start(&pg, 60_000);
    let watch = pg.watch_users(&[ALICE.0, BOB.0]);

    // bob, meanwhile, keeps more backends busy than alice may have.
    let stop = Arc::new(AtomicBool::new(false));
    let bob_done = Arc::new(AtomicUsize::new(0));
    let bob = busy(&tp, BOB, APP_DB, LIMIT + 2, stop.clone(), bob_done.clone());

    // alice: pgbench on both databases at once, more clients than her limit on each.
    let runs: Vec<_> = [APP_DB, OTHER_DB]
        .into_iter()
        .map(|db| {
            let ep = tp.endpoint();
            thread::spawn(move || {
                pgbench(
                    &ep,
                    ALICE.0,
                    ALICE.1,
                    db,
                    &["-S", "-n", "-c", "4", "-T", "8"],
                    Duration::from_secs(90),
                )
            })
        })
        .collect();
    let outs: Vec<_> = runs
        .into_iter()
        .map(|r| r.join().expect("pgbench thread"))
        .collect();
    stop.store(true, Ordering::Relaxed);
    for task in bob {
        task.await.expect("bob's task").expect("bob's session");
    }
    let seen = watch.stop();
    eprintln!("backends seen: {seen:?}; bob ran {bob_done:?}");
    eprintln!(
        "sessions started: {}",
        pg.psql_admin("SELECT datname, sessions FROM pg_stat_database WHERE datname LIKE 'app%'")
    );

    let mut processed = Vec::new();
    for (db, out) in [APP_DB, OTHER_DB].iter().zip(&outs) {
        let summary = PgbenchSummary::parse(&out.text)
            .unwrap_or_else(|| panic!("pgbench on {db}:\n{}\n{}", out.text, tp.logs()));
        assert!(out.success(), "pgbench on {db}:\n{}", out.text);
        assert_eq!(summary.failed, 0, "pgbench on {db}:\n{}", out.text);
        eprintln!("{db}: {summary:?}");
        processed.push(summary.processed);
    }
    assert!(
        seen.max_each[0] <= LIMIT as i64,
        "alice had {} backends, her limit is {LIMIT}: {seen:?}",
        seen.max_each[0]
    );
    assert!(seen.max_each[0] >= 2, "alice's clients ran on: {seen:?}");
    // Neither database starved: each got a fair part of alice's backends' work.
    let (lo, hi) = (
        processed[0].min(processed[1]),
        processed[0].max(processed[1]),
    );
    assert!(
        lo > 0 && lo * 10 >= hi,
        "transactions per database {processed:?}: one starved"
    );
    // bob has a limit of his own, not what alice leaves: he reaches it while she holds hers.
    assert_eq!(seen.max_each[1], LIMIT as i64, "{seen:?}");
    assert!(seen.max_total > LIMIT as i64, "{seen:?}");
    assert!(bob_done.load(Ordering::Relaxed) > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_backends_of_a_users_other_database_make_room() {
    let pg = PgCluster::start();
    pg.create_database(OTHER_DB, ALICE.0);
    // Short enough that a session left to wait for an idle backend to time out fails the test.
    let tp = start(&pg, 10_000);
    let ep = tp.endpoint();
    let watch = pg.watch_users(&[ALICE.0]);

    // alice's limit taken on `app`, then left idle in the pool (server_idle_timeout: 10 min).
    let mut on_app = Vec::new();
    for i in 0..LIMIT {
        on_app.push(
            ep.connect(ALICE.0, ALICE.1, APP_DB)
                .await
                .unwrap_or_else(|e| panic!("alice@app {i}: {e}")),
        );
    }
    let sleeps: Vec<_> = on_app
        .iter()
        .map(|c| c.simple_query("SELECT pg_sleep(0.5)"))
        .collect();
    for r in futures_util::future::join_all(sleeps).await {
        r.expect("pg_sleep on app");
    }
    assert_eq!(pg.backend_count(ALICE.0), LIMIT as i64);

    // Every one of them is wanted on `app2` now, at once.
    let t = Instant::now();
    let mut on_other = Vec::new();
    for i in 0..LIMIT {
        on_other.push(
            ep.connect(ALICE.0, ALICE.1, OTHER_DB)
                .await
                .unwrap_or_else(|e| panic!("alice@app2 {i} after {:?}: {e}", t.elapsed())),
        );
    }
    let sleeps: Vec<_> = on_other
        .iter()
        .map(|c| c.simple_query("SELECT pg_sleep(0.3)"))
        .collect();
    for r in futures_util::future::join_all(sleeps).await {
        r.unwrap_or_else(|e| panic!("pg_sleep on app2 after {:?}: {e}", t.elapsed()));
    }
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(5),
        "app2's sessions waited {took:?} for backends app held idle\n{}",
        tp.logs()
    );
    // And back: app's sessions get them again.
    for c in &on_app {
        c.simple_query("SELECT 1").await.expect("app again");
    }
    let seen = watch.stop();
    assert!(
        seen.max_each[0] <= LIMIT as i64,
        "alice had {} backends, her limit is {LIMIT}: {seen:?}",
        seen.max_each[0]
    );
}
