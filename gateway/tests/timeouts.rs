//! PgBouncer's timeouts, with its meanings and words, against real Postgres through the real
//! pooler and gateway: `client_idle_timeout_ms` and `idle_transaction_timeout_ms` (gateway),
//! `query_wait_timeout_ms`, `server_idle_timeout_ms` and `server_lifetime_ms` (pooler). Each
//! limit is short here and each assertion leaves it a wide margin: the machine is shared.

use std::future::Future;
use std::time::{Duration, Instant};

mod common;

use common::{parts, Watched};
use testkit::{Endpoint, PgCluster, Tidepool, TidepoolOpts, ALICE, APP_DB};

async fn bounded<T>(limit: Duration, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(limit, fut)
        .await
        .unwrap_or_else(|_| panic!("test exceeded {limit:?}"))
}

/// A client whose connection's fatal error, if one ends it, is kept: (SQLSTATE, message).
fn start(opts: TidepoolOpts) -> (PgCluster, Tidepool, tokio::runtime::Runtime) {
    let pg = PgCluster::start();
    let tp = Tidepool::start(&pg, opts);
    (pg, tp, tokio::runtime::Runtime::new().unwrap())
}

fn pair(code: &str, msg: &str) -> Option<(String, String)> {
    Some((code.to_string(), msg.to_string()))
}

/// A client idle outside a transaction past `client_idle_timeout_ms` is disconnected
/// (FATAL 08P01 "client_idle_timeout"); one that keeps talking is not.
#[test]
fn client_idle_timeout() {
    let (_pg, tp, rt) = start(
        TidepoolOpts::default()
            .gateway_arg("--client-idle-timeout-ms")
            .gateway_arg("1000"),
    );
    let ep = tp.endpoint();
    rt.block_on(bounded(Duration::from_secs(60), async {
        let idle = Watched::connect(&ep).await.unwrap();
        idle.client.simple_query("select 1").await.unwrap();
        let busy = Watched::connect(&ep).await.unwrap();
        let t0 = Instant::now();
        // Busy: a request every 300 ms for 3 s, with a query running longer than the limit.
        busy.client
            .simple_query("select pg_sleep(1.5)")
            .await
            .unwrap();
        while t0.elapsed() < Duration::from_secs(3) {
            busy.client.simple_query("select 1").await.unwrap();
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
        assert_eq!(
            idle.wait_ended(Duration::from_secs(5)).await,
            pair("08P01", "client_idle_timeout"),
            "{}",
            tp.logs()
        );
        assert!(idle.client.simple_query("select 1").await.is_err());
        assert!(busy.ended().is_none(), "{:?}", busy.ended());
    }));
}

/// A client idle inside a transaction past `idle_transaction_timeout_ms` is disconnected
/// (FATAL 08P01 "idle transaction timeout") and its transaction rolled back; idle outside a
/// transaction it stays.
#[test]
fn idle_transaction_timeout() {
    let (pg, tp, rt) = start(
        TidepoolOpts::default()
            .gateway_arg("--idle-transaction-timeout-ms")
            .gateway_arg("1000"),
    );
    pg.psql_admin_db(
        APP_DB,
        "create table idle_tx (id int); grant all on idle_tx to alice;",
    );
    let ep = tp.endpoint();
    rt.block_on(bounded(Duration::from_secs(60), async {
        let in_tx = Watched::connect(&ep).await.unwrap();
        in_tx
            .client
            .batch_execute("begin; insert into idle_tx values (1)")
            .await
            .unwrap();
        let outside = Watched::connect(&ep).await.unwrap();
        outside.client.simple_query("select 1").await.unwrap();
        assert_eq!(
            in_tx.wait_ended(Duration::from_secs(5)).await,
            pair("08P01", "idle transaction timeout"),
            "{}",
            tp.logs()
        );
        tokio::time::sleep(Duration::from_millis(1500)).await;
        outside.client.simple_query("select 1").await.unwrap();
        let n: i64 = outside
            .client
            .query_one("select count(*) from idle_tx", &[])
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 0, "the abandoned transaction committed");
    }));
}

/// With every backend held, a request waits `query_wait_timeout_ms` and its client is then
/// disconnected (FATAL 08P01 "query_wait_timeout"); a request that gets a backend in time runs.
#[test]
fn query_wait_timeout() {
    let (_pg, tp, rt) = start(
        TidepoolOpts::default()
            .pool_size(1)
            .pooler_arg("--query-wait-timeout-ms")
            .pooler_arg("1000"),
    );
    let ep = tp.endpoint();
    rt.block_on(bounded(Duration::from_secs(60), async {
        // Log in both first (each pooler core remembers the login), then hold the backend.
        let holder = Watched::connect(&ep).await.unwrap();
        holder.client.simple_query("select 1").await.unwrap();
        let late = Watched::connect(&ep).await.unwrap();
        late.client.simple_query("select 1").await.unwrap();
        let patient = Watched::connect(&ep).await.unwrap();
        patient.client.simple_query("select 1").await.unwrap();
        holder
            .client
            .batch_execute("begin; select 1")
            .await
            .unwrap();

        let t0 = Instant::now();
        let e = late.client.simple_query("select 2").await.unwrap_err();
        let waited = t0.elapsed();
        // The FATAL answers the request (or, had it come first, ends the idle connection).
        let got = match e.code() {
            Some(_) => Some(parts(&e)),
            None => late.wait_ended(Duration::from_secs(1)).await,
        };
        assert_eq!(got, pair("08P01", "query_wait_timeout"), "{}", tp.logs());
        assert!(
            waited >= Duration::from_millis(900),
            "gave up after {waited:?}"
        );
        // Released within the limit: the next waiter is served.
        let h = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            holder.client.batch_execute("commit").await.unwrap();
            holder
        });
        patient.client.simple_query("select 3").await.unwrap();
        h.await.unwrap();
    }));
}

/// The pooler closes a backend idle in the pool past `server_idle_timeout_ms`.
#[test]
fn server_idle_timeout() {
    let (_pg, tp, rt) = start(
        TidepoolOpts::default()
            .pooler_arg("--server-idle-timeout-ms")
            .pooler_arg("1000"),
    );
    let ep = tp.endpoint();
    rt.block_on(bounded(Duration::from_secs(60), async {
        let c = Watched::connect(&ep).await.unwrap();
        c.client.simple_query("select 1").await.unwrap();
        assert!(tp.backend_count(ALICE.0) >= 1);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tp.backend_count(ALICE.0) > 0 {
            assert!(
                Instant::now() < deadline,
                "idle backends still open after 10 s\n{}",
                tp.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The session itself goes on, on a new backend.
        c.client.simple_query("select 1").await.unwrap();
        assert!(c.ended().is_none());
    }));
}

/// The pooler replaces a backend older than `server_lifetime_ms` once it is idle, never under
/// a session that holds it.
#[test]
fn server_lifetime() {
    let (_pg, tp, rt) = start(
        TidepoolOpts::default()
            .pool_size(1)
            .pooler_arg("--server-lifetime-ms")
            .pooler_arg("1000")
            .pooler_arg("--server-idle-timeout-ms")
            .pooler_arg("0"),
    );
    let ep = tp.endpoint();
    rt.block_on(bounded(Duration::from_secs(60), async {
        let c = Watched::connect(&ep).await.unwrap();
        let pid = |rows: Vec<tokio_postgres::SimpleQueryMessage>| -> String {
            rows.into_iter()
                .find_map(|m| match m {
                    tokio_postgres::SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
                    _ => None,
                })
                .unwrap()
        };
        // A transaction longer than the lifetime keeps its backend.
        c.client.batch_execute("begin").await.unwrap();
        let first = pid(c
            .client
            .simple_query("select pid from pg_stat_activity where pid = pg_backend_pid()")
            .await
            .unwrap());
        tokio::time::sleep(Duration::from_millis(2000)).await;
        let same = pid(c
            .client
            .simple_query("select pid from pg_stat_activity where pid = pg_backend_pid()")
            .await
            .unwrap());
        assert_eq!(first, same, "the backend changed inside a transaction");
        c.client.batch_execute("commit").await.unwrap();
        // Released past its lifetime: the next request runs on another backend.
        let next = pid(c
            .client
            .simple_query("select pid from pg_stat_activity where pid = pg_backend_pid()")
            .await
            .unwrap());
        assert_ne!(
            first,
            next,
            "the backend outlived server_lifetime_ms\n{}",
            tp.logs()
        );
        assert!(c.ended().is_none());
    }));
}

/// PgBouncer (the Debian package), run by this test as the `postgres` OS user in front of the
/// same Postgres, transaction pooling, with `settings` added; killed on drop.
struct PgBouncer {
    child: std::process::Child,
    port: u16,
    log: std::path::PathBuf,
}

impl PgBouncer {
    fn start(pg: &PgCluster, name: &str, settings: &str) -> PgBouncer {
        let dir = pg.dir().join(format!("pgbouncer-{name}"));
        std::fs::create_dir_all(&dir).unwrap();
        let port = testkit::free_port();
        let log = dir.join("pgbouncer.log");
        std::fs::write(
            dir.join("users.txt"),
            format!("\"{}\" \"{}\"\n", ALICE.0, ALICE.1),
        )
        .unwrap();
        std::fs::write(
            dir.join("pgbouncer.ini"),
            format!(
                "[databases]\n{APP_DB} = host=127.0.0.1 port={} dbname={APP_DB}\n\
                 [pgbouncer]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\n\
                 unix_socket_dir =\nauth_type = md5\nauth_file = {}\npool_mode = transaction\n\
                 logfile = {}\n{settings}\n",
                pg.port(),
                dir.join("users.txt").display(),
                log.display(),
            ),
        )
        .unwrap();
        let chown = std::process::Command::new("chown")
            .args(["-R", "postgres"])
            .arg(&dir)
            .status()
            .unwrap();
        assert!(chown.success());
        let child = std::process::Command::new("runuser")
            .args(["-u", "postgres", "--", "pgbouncer"])
            .arg(dir.join("pgbouncer.ini"))
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run pgbouncer (Debian package pgbouncer)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "pgbouncer did not listen: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        PgBouncer { child, port, log }
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        // runuser passes SIGTERM on to pgbouncer.
        // SAFETY: plain syscall on our own child.
        unsafe {
            libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

/// What a client of `ep` hears when idle (outside a transaction, then inside one) past the
/// limits, and when its request waits for the only backend past `query_wait_timeout`.
async fn timeout_errors(idle_ep: &Endpoint, wait_ep: &Endpoint) -> Vec<Option<(String, String)>> {
    let idle = Watched::connect(idle_ep).await.unwrap();
    idle.client.simple_query("select 1").await.unwrap();
    let in_tx = Watched::connect(idle_ep).await.unwrap();
    in_tx.client.batch_execute("begin; select 1").await.unwrap();
    let idle_end = idle.wait_ended(Duration::from_secs(10)).await;
    let tx_end = in_tx.wait_ended(Duration::from_secs(10)).await;

    let holder = Watched::connect(wait_ep).await.unwrap();
    holder.client.simple_query("select 1").await.unwrap();
    let late = Watched::connect(wait_ep).await.unwrap();
    late.client.simple_query("select 1").await.unwrap();
    holder
        .client
        .batch_execute("begin; select 1")
        .await
        .unwrap();
    let wait_end = match late.client.simple_query("select 2").await {
        Ok(_) => None,
        Err(e) if e.code().is_some() => Some(parts(&e)),
        Err(_) => late.wait_ended(Duration::from_secs(2)).await,
    };
    vec![idle_end, tx_end, wait_end]
}

/// Differential: the same three timeouts through PgBouncer and through Tidepool give the same
/// SQLSTATE and message.
#[test]
fn same_errors_as_pgbouncer() {
    let pg = PgCluster::start();
    let bouncer_idle = PgBouncer::start(
        &pg,
        "idle",
        "client_idle_timeout = 1\nidle_transaction_timeout = 1",
    );
    let bouncer_wait =
        PgBouncer::start(&pg, "wait", "default_pool_size = 1\nquery_wait_timeout = 1");
    let tp_idle = Tidepool::start(
        &pg,
        TidepoolOpts::default()
            .gateway_arg("--client-idle-timeout-ms")
            .gateway_arg("1000")
            .gateway_arg("--idle-transaction-timeout-ms")
            .gateway_arg("1000"),
    );
    let tp_wait = Tidepool::start(
        &pg,
        TidepoolOpts::default()
            .pool_size(1)
            .pooler_arg("--query-wait-timeout-ms")
            .pooler_arg("1000"),
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (from_bouncer, from_tidepool) = rt.block_on(bounded(Duration::from_secs(120), async {
        (
            timeout_errors(
                &Endpoint::loopback(bouncer_idle.port),
                &Endpoint::loopback(bouncer_wait.port),
            )
            .await,
            timeout_errors(&tp_idle.endpoint(), &tp_wait.endpoint()).await,
        )
    }));
    eprintln!("[timeouts::same_errors_as_pgbouncer] PgBouncer: {from_bouncer:?}");
    assert!(
        from_bouncer.iter().all(Option::is_some),
        "PgBouncer did not time out: {from_bouncer:?}\n{}",
        std::fs::read_to_string(&bouncer_wait.log).unwrap_or_default()
    );
    assert_eq!(from_tidepool, from_bouncer, "{}", tp_wait.logs());
}
