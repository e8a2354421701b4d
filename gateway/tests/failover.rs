//! Issue 5, point 6: sessions through the gateway when the node under them goes away and another
//! takes over. Real Postgres, real pooler and gateway, tokio-postgres clients.
//!
//! The pooler in front of the node is killed and a new one started on the same address (what a
//! restarted pooler, or a new primary at the address, looks like to the gateway); the gateway
//! must hold requests while there is none, re-open idle sessions transparently, and give the
//! documented errors to what could not survive: 40001 for a transaction across the switch,
//! 08007 for a request whose outcome is unknown, 08006 once for lost backend state, 57P03 when
//! no primary appears within `failover_hold_ms`.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use testkit::{bin_dir, link_secret_args, PgCluster, Tidepool, TidepoolOpts};
use tokio_postgres::SimpleQueryMessage;

const ALICE: (&str, &str) = ("alice", "alice-pw");

/// A pooler this test started; killed on drop.
struct Pooler(Child);

impl Drop for Pooler {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start_pooler(pg: &PgCluster, port: u16) -> Pooler {
    let log = pg.dir().join(format!("pooler-restarted-{port}.log"));
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(bin_dir().join("tidepool-pooler"))
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--cores",
            "1",
            "--pg-host",
            "127.0.0.1",
            "--pg-port",
            &pg.port().to_string(),
            "--admin-socket-dir",
            &pg.socket_dir().to_string_lossy(),
            "--admin-user",
            "postgres",
            "--pool-size",
            "20",
        ])
        .args(link_secret_args())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::from(file.try_clone().unwrap()))
        .stderr(Stdio::from(file))
        .spawn()
        .expect("start tidepool-pooler");
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "restarted pooler did not listen");
        std::thread::sleep(Duration::from_millis(20));
    }
    Pooler(child)
}

fn kill_pooler(tp: &Tidepool) {
    // SAFETY: plain syscall on a child of this process (Tidepool reaps it on drop).
    unsafe {
        libc::kill(tp.pooler_pid() as libc::pid_t, libc::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", tp.pooler_port())).is_ok() {
        assert!(
            Instant::now() < deadline,
            "pooler still accepting after SIGKILL"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // The gateway hears the link close a moment later; a request sent before that is in
    // flight (08007), which these tests check separately.
    std::thread::sleep(Duration::from_millis(300));
}

fn start(pg: &PgCluster, hold_ms: u64) -> Tidepool {
    let mut opts = TidepoolOpts::default()
        .gateway_arg("--failover-hold-ms")
        .gateway_arg(hold_ms.to_string());
    opts.cores = 1;
    Tidepool::start(pg, opts)
}

async fn bounded<T>(fut: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(90), fut)
        .await
        .expect("test step took more than 90 s")
}

async fn one(c: &tokio_postgres::Client, sql: &str) -> Result<String, tokio_postgres::Error> {
    for m in c.simple_query(sql).await? {
        if let SimpleQueryMessage::Row(r) = m {
            return Ok(r.get(0).unwrap_or("NULL").to_string());
        }
    }
    Ok(String::new())
}

fn code(e: &tokio_postgres::Error) -> String {
    e.code()
        .map_or_else(|| format!("no SQLSTATE: {e}"), |c| c.code().to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_session_follows_the_new_pooler_with_its_settings() {
    let pg = PgCluster::start();
    let tp = start(&pg, 10_000);
    bounded(async {
        let c = tp
            .endpoint()
            .connect(ALICE.0, ALICE.1, "app")
            .await
            .unwrap();
        c.batch_execute("SET search_path = 'follow_me', public")
            .await
            .unwrap();
        // A named statement prepared before the switch is prepared again after it.
        let doubled = c.prepare("SELECT $1::int * 2").await.unwrap();
        assert_eq!(one(&c, "SELECT 1").await.unwrap(), "1");
        kill_pooler(&tp);
        // The new pooler comes up a second after the client's next request: held, not failed.
        let port = tp.pooler_port();
        let pg2 = pg.clone();
        let restart = tokio::task::spawn_blocking(move || {
            std::thread::sleep(Duration::from_millis(1000));
            start_pooler(&pg2, port)
        });
        let t = Instant::now();
        let v = one(&c, "SHOW search_path").await;
        let _pooler = restart.await.unwrap();
        assert_eq!(v.unwrap(), "follow_me, public", "{}", tp.logs());
        assert!(
            t.elapsed() >= Duration::from_millis(500),
            "no pause: {:?}",
            t.elapsed()
        );
        let n: i32 = c.query_one(&doubled, &[&21]).await.unwrap().get(0);
        assert_eq!(n, 42);
        // Extended protocol too, and again.
        let n: i32 = c
            .query_one("SELECT $1::int + 1", &[&41])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 42);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transaction_across_the_switch_is_rolled_back_with_40001() {
    let pg = PgCluster::start();
    pg.psql_admin_db(
        "app",
        "CREATE TABLE fo_t (a int); GRANT ALL ON fo_t TO alice;",
    );
    let tp = start(&pg, 10_000);
    bounded(async {
        let c = tp
            .endpoint()
            .connect(ALICE.0, ALICE.1, "app")
            .await
            .unwrap();
        c.batch_execute("BEGIN; INSERT INTO fo_t VALUES (1)")
            .await
            .unwrap();
        kill_pooler(&tp);
        let pooler = start_pooler(&pg, tp.pooler_port());
        let e = c
            .batch_execute("INSERT INTO fo_t VALUES (2)")
            .await
            .unwrap_err();
        assert_eq!(code(&e), "40001", "{e}");
        // A failed transaction, as Postgres has it, until the client ends it.
        let e = c.batch_execute("SELECT 1").await.unwrap_err();
        assert_eq!(code(&e), "25P02", "{e}");
        let tags = c.simple_query("ROLLBACK").await.unwrap();
        assert!(matches!(
            tags.last(),
            Some(SimpleQueryMessage::CommandComplete(_))
        ));
        // Then the session works (on the new pooler), and nothing of the transaction is left.
        assert_eq!(one(&c, "SELECT count(*) FROM fo_t").await.unwrap(), "0");
        // COMMIT of a transaction lost while idle: an error, and the transaction is over.
        c.batch_execute("BEGIN; INSERT INTO fo_t VALUES (3)")
            .await
            .unwrap();
        drop(pooler);
        // Lost while idle: give the gateway a moment to see the link close before COMMIT (a
        // COMMIT that races the close is in flight, and gets 08007 instead).
        tokio::time::sleep(Duration::from_millis(300)).await;
        let _pooler = start_pooler(&pg, tp.pooler_port());
        let e = c.batch_execute("COMMIT").await.unwrap_err();
        assert_eq!(code(&e), "40001", "{e}");
        assert_eq!(one(&c, "SELECT count(*) FROM fo_t").await.unwrap(), "0");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_in_flight_gets_08007_and_the_session_goes_on() {
    let pg = PgCluster::start();
    let tp = start(&pg, 10_000);
    bounded(async {
        let c = tp
            .endpoint()
            .connect(ALICE.0, ALICE.1, "app")
            .await
            .unwrap();
        let c2 = tp
            .endpoint()
            .connect(ALICE.0, ALICE.1, "app")
            .await
            .unwrap();
        c2.batch_execute("BEGIN").await.unwrap();
        let sleeper = tokio::spawn(async move {
            let r = c.simple_query("SELECT pg_sleep(30)").await.map(|_| ());
            (c, r)
        });
        let sleeper2 = tokio::spawn(async move {
            let r = c2.simple_query("SELECT pg_sleep(30)").await.map(|_| ());
            (c2, r)
        });
        tokio::time::sleep(Duration::from_millis(1500)).await;
        kill_pooler(&tp);
        let (c, r) = sleeper.await.unwrap();
        let e = r.unwrap_err();
        assert_eq!(code(&e), "08007", "{e}");
        let (c2, r) = sleeper2.await.unwrap();
        let e = r.unwrap_err();
        assert_eq!(code(&e), "40001", "{e}");
        let _pooler = start_pooler(&pg, tp.pooler_port());
        assert_eq!(one(&c, "SELECT 7").await.unwrap(), "7");
        let e = c2.batch_execute("SELECT 1").await.unwrap_err();
        assert_eq!(code(&e), "25P02", "{e}");
        c2.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(one(&c2, "SELECT 8").await.unwrap(), "8");
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_primary_beyond_the_hold_gets_57p03_then_works_again() {
    let pg = PgCluster::start();
    let tp = start(&pg, 1500);
    bounded(async {
        let c = tp
            .endpoint()
            .connect(ALICE.0, ALICE.1, "app")
            .await
            .unwrap();
        c.batch_execute("CREATE TEMP TABLE scratch (a int)")
            .await
            .unwrap();
        kill_pooler(&tp);
        // The temp table died with the old backend: said once, at the next request.
        let e = c.batch_execute("SELECT * FROM scratch").await.unwrap_err();
        assert_eq!(code(&e), "08006", "{e}");
        let t = Instant::now();
        let e = c.batch_execute("SELECT 1").await.unwrap_err();
        assert_eq!(code(&e), "57P03", "{e}");
        assert!(
            t.elapsed() >= Duration::from_millis(1400),
            "{:?}",
            t.elapsed()
        );
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
        let _pooler = start_pooler(&pg, tp.pooler_port());
        assert_eq!(one(&c, "SELECT 5").await.unwrap(), "5");
        let e = c.batch_execute("SELECT * FROM scratch").await.unwrap_err();
        assert_eq!(code(&e), "42P01", "{e}");
    })
    .await;
}

/// A gateway of the two-node tests (one core, trust), its output in `log`; killed on drop.
struct GatewayProcess(Child);

impl GatewayProcess {
    fn start(log: &std::path::Path, args: &[&str]) -> GatewayProcess {
        let file = std::fs::File::create(log).unwrap();
        let child = Command::new(bin_dir().join("tidepool-gateway"))
            .args(["--cores", "1", "--auth-method", "trust"])
            .args(link_secret_args())
            .args(args)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::from(file.try_clone().unwrap()))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start tidepool-gateway");
        GatewayProcess(child)
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Two nodes, each with a pooler acting as its agent (testkit::replication); the gateway knows
/// both. The primary's pooler and Postgres go away; while there is no primary an idle session's
/// request is held; the standby is promoted through the agent protocol (recruit, promote at
/// term 1); the held request then runs — a write, so on the new primary — and the session
/// goes on there; a transaction open across the switch gets 40001 and the session recovers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_follow_a_promoted_standby() {
    use shared::agent::{call, Request, Response};
    use testkit::replication::{AgentPooler, Node};

    let n1 = Node::primary("fo-n1");
    n1.psql("CREATE TABLE fo_ha (a int)");
    let n2 = Node::standby_of(&n1, "fo-n2");
    let mut p1 = AgentPooler::start(&n1, &[]);
    let p2 = AgentPooler::start(&n2, &[]);
    let gw_port = testkit::free_port();
    let ro_port = testkit::free_port();
    let log = n1.dir().join("gateway-ha.log");
    let _gw = GatewayProcess::start(
        &log,
        &[
            "--listen",
            &format!("127.0.0.1:{gw_port}"),
            "--pooler",
            &format!("127.0.0.1:{},127.0.0.1:{}", p1.listen_port, p2.listen_port),
            "--failover-hold-ms",
            "20000",
            "--read-only-listen",
            &format!("127.0.0.1:{ro_port}"),
        ],
    );
    let logs = || {
        format!(
            "{}\n--- gateway ---\n{}",
            p2.log_tail(),
            std::fs::read_to_string(&log).unwrap_or_default()
        )
    };
    let ep = testkit::Endpoint::loopback(gw_port);
    bounded(async {
        // The gateway may need a moment to hear both poolers' roles.
        let deadline = Instant::now() + Duration::from_secs(20);
        let c = loop {
            match ep.connect("postgres", "", "postgres").await {
                Ok(c) => break c,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => panic!("connect: {e}\n{}", logs()),
            }
        };
        c.batch_execute("INSERT INTO fo_ha VALUES (1)")
            .await
            .unwrap();
        let in_standby = one(&c, "SELECT pg_is_in_recovery()").await.unwrap();
        assert_eq!(in_standby, "f", "the session must start on the primary");
        let c2 = ep.connect("postgres", "", "postgres").await.unwrap();
        c2.batch_execute("BEGIN; INSERT INTO fo_ha VALUES (2)")
            .await
            .unwrap();
        // The read-only listener reads from the standby.
        let ro = testkit::Endpoint::loopback(ro_port)
            .connect("postgres", "", "postgres")
            .await
            .unwrap();
        assert_eq!(one(&ro, "SELECT pg_is_in_recovery()").await.unwrap(), "t");
        let e = ro
            .batch_execute("INSERT INTO fo_ha VALUES (9)")
            .await
            .unwrap_err();
        assert_eq!(code(&e), "25006", "{e}");
        n2.wait_for("SELECT count(*) FROM fo_ha", "1", Duration::from_secs(20))
            .unwrap();

        // The primary node goes away: its pooler and its Postgres.
        p1.kill();
        n1.stop("immediate");
        // An idle session's next request waits for a primary...
        let held = tokio::spawn(async move {
            let r = c
                .simple_query("INSERT INTO fo_ha VALUES (3); SELECT count(*) FROM fo_ha")
                .await;
            (c, r)
        });
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            !held.is_finished(),
            "the request did not wait for a primary"
        );
        // ... while the standby is promoted at term 1 through its agent.
        let agent = p2.agent_addr();
        let key = p2.key();
        let promoted = tokio::task::spawn_blocking(move || {
            let t = Duration::from_secs(30);
            let r = call(agent, &key, &Request::Recruit { term: 1 }, t);
            assert!(matches!(r, Ok(Response::Ok { .. })), "recruit: {r:?}");
            call(
                agent,
                &key,
                &Request::Promote {
                    term: 1,
                    sync_names: String::new(),
                },
                t,
            )
        })
        .await
        .unwrap();
        assert!(
            matches!(promoted, Ok(Response::Ok { .. })),
            "promote: {promoted:?}"
        );
        let (c, r) = held.await.unwrap();
        let rows = r.unwrap_or_else(|e| panic!("held request failed: {e}\n{}", logs()));
        let count = rows.iter().find_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_string),
            _ => None,
        });
        assert_eq!(count.as_deref(), Some("2"), "{}", logs());
        assert_eq!(one(&c, "SELECT pg_is_in_recovery()").await.unwrap(), "f");
        // The transaction that was open on the old primary is gone, and says so.
        let e = c2
            .batch_execute("INSERT INTO fo_ha VALUES (4)")
            .await
            .unwrap_err();
        assert_eq!(code(&e), "40001", "{e}");
        c2.batch_execute("ROLLBACK").await.unwrap();
        assert_eq!(one(&c2, "SELECT count(*) FROM fo_ha").await.unwrap(), "2");

        // The old primary comes back as it was (primary at term 0, below the new primary's
        // term 1): it never takes a session.
        n1.start();
        let _p1 = AgentPooler::start_on(&n1, p1.listen_port, p1.agent_port, &[]);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let n2_port = n2.port().to_string();
        for _ in 0..4 {
            let c = ep.connect("postgres", "", "postgres").await.unwrap();
            assert_eq!(
                one(&c, "SELECT inet_server_port()").await.unwrap(),
                n2_port,
                "{}",
                logs()
            );
        }
        assert_eq!(one(&c, "SELECT inet_server_port()").await.unwrap(), n2_port);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beyond_failover_hold_max_requests_are_not_held() {
    let pg = PgCluster::start();
    let mut opts = TidepoolOpts::default()
        .gateway_arg("--failover-hold-ms")
        .gateway_arg("20000")
        .gateway_arg("--failover-hold-max")
        .gateway_arg("0");
    opts.cores = 1;
    let tp = Tidepool::start(&pg, opts);
    bounded(async {
        let c = tp
            .endpoint()
            .connect(ALICE.0, ALICE.1, "app")
            .await
            .unwrap();
        kill_pooler(&tp);
        let t = Instant::now();
        let e = c.batch_execute("SELECT 1").await.unwrap_err();
        assert_eq!(code(&e), "57P03", "{e}");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "held: {:?}",
            t.elapsed()
        );
        let _pooler = start_pooler(&pg, tp.pooler_port());
        // Nothing is held, so the session re-opens only once a primary is there: retry a
        // bounded number of times while the gateway's link comes back.
        let mut ok = false;
        for _ in 0..50 {
            if one(&c, "SELECT 3").await.is_ok_and(|v| v == "3") {
                ok = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(ok, "the session never worked again\n{}", tp.logs());
    })
    .await;
}

/// The read-only listener serves a standby only while it is within `max_standby_lag_bytes` of
/// the primary (the poolers report WAL positions on the link); beyond, reads go to the primary.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_only_sessions_skip_a_standby_that_lags() {
    use testkit::replication::{AgentPooler, Node};
    let n1 = Node::primary("lag-n1");
    n1.psql("CREATE TABLE lag_t (a int, pad text)");
    let n2 = Node::standby_of(&n1, "lag-n2");
    let p1 = AgentPooler::start(&n1, &[]);
    let p2 = AgentPooler::start(&n2, &[]);
    let ro_port = testkit::free_port();
    let log = n1.dir().join("gateway-lag.log");
    let _gw = GatewayProcess::start(
        &log,
        &[
            "--listen",
            &format!("127.0.0.1:{}", testkit::free_port()),
            "--pooler",
            &format!("127.0.0.1:{},127.0.0.1:{}", p1.listen_port, p2.listen_port),
            "--read-only-listen",
            &format!("127.0.0.1:{ro_port}"),
            "--max-standby-lag-bytes",
            "65536",
        ],
    );
    let ro = testkit::Endpoint::loopback(ro_port);
    // Where a new read-only session lands, once the reports have settled.
    let lands_on_standby = |want: bool| {
        let ro = ro.clone();
        let log = log.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(c) = ro.connect("postgres", "", "postgres").await {
                    if let Ok(v) = one(&c, "SELECT pg_is_in_recovery()").await {
                        if (v == "t") == want {
                            return;
                        }
                    }
                }
                assert!(
                    Instant::now() < deadline,
                    "read-only sessions never landed on the {}\n{}",
                    if want { "standby" } else { "primary" },
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    bounded(async {
        lands_on_standby(true).await;
        // The standby stops replaying; the primary writes well past the bound.
        n2.psql("SELECT pg_wal_replay_pause()");
        n1.psql("INSERT INTO lag_t SELECT g, repeat('x', 200) FROM generate_series(1, 5000) g");
        lands_on_standby(false).await;
        // Caught up again: back to the standby.
        n2.psql("SELECT pg_wal_replay_resume()");
        lands_on_standby(true).await;
    })
    .await;
}
