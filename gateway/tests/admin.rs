//! The admin console (issue 14, point 1): psql against the gateway's virtual database
//! `tidepool` as an admin role. Every SHOW prints PgBouncer's columns and facts that moved with
//! real traffic; PAUSE holds new queries until RESUME; KILL ends a database's clients; RELOAD
//! applies a changed limit; SHUTDOWN drains; a role that is not an admin user is refused.

use std::time::{Duration, Instant};

use testkit::{Endpoint, PgCluster, Psql, Tidepool, TidepoolOpts, ALICE, APP_DB, BOB};

fn opts() -> TidepoolOpts {
    TidepoolOpts::default()
        .gateway_arg("--admin-users")
        .gateway_arg(ALICE.0)
}

/// Runs one console command as `user`; psql's whole output (CSV, verbose errors).
fn console_as(ep: &Endpoint, user: (&str, &str), cmd: &str) -> String {
    let out = Psql::new(ep, user.0, user.1, "tidepool")
        .var("VERBOSITY", "verbose")
        .arg("--csv")
        .command(cmd)
        .timeout(Duration::from_secs(60))
        .run();
    out.text.clone()
}

fn console(ep: &Endpoint, cmd: &str) -> String {
    console_as(ep, ALICE, cmd)
}

/// The rows of a CSV answer as maps from column name to value.
fn rows(csv: &str) -> (Vec<String>, Vec<Vec<String>>) {
    let mut lines = csv.lines();
    let header: Vec<String> = lines
        .next()
        .unwrap_or_default()
        .split(',')
        .map(str::to_owned)
        .collect();
    let body = lines
        .map(|l| l.split(',').map(str::to_owned).collect())
        .collect();
    (header, body)
}

fn cell<'a>(header: &[String], row: &'a [String], col: &str) -> &'a str {
    let i = header
        .iter()
        .position(|h| h == col)
        .unwrap_or_else(|| panic!("no column {col} in {header:?}"));
    &row[i]
}

async fn connect(
    ep: &Endpoint,
    user: (&str, &str),
    db: &str,
) -> (
    tokio_postgres::Client,
    tokio::task::JoinHandle<Option<String>>,
) {
    let (client, conn) = ep
        .pg_config(user.0, user.1, db)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    // The SQLSTATE of the error that ended the connection, if the server sent one.
    let ended = tokio::spawn(async move {
        conn.await
            .err()
            .and_then(|e| e.code().map(|c| c.code().to_owned()))
    });
    (client, ended)
}

const SHOW_COLUMNS: &[(&str, &str)] = &[
    (
        "pools",
        "database,user,cl_active,cl_waiting,cl_active_cancel_req,cl_waiting_cancel_req,sv_active,sv_active_cancel,sv_being_canceled,sv_idle,sv_used,sv_tested,sv_login,maxwait,maxwait_us,pool_mode",
    ),
    (
        "clients",
        "type,user,database,state,addr,port,local_addr,local_port,connect_time,request_time,wait,wait_us,close_needed,ptr,link,remote_pid,tls,application_name",
    ),
    (
        "servers",
        "type,user,database,state,addr,port,local_addr,local_port,connect_time,request_time,wait,wait_us,close_needed,ptr,link,remote_pid,tls,application_name",
    ),
    (
        "stats",
        "database,total_xact_count,total_query_count,total_received,total_sent,total_xact_time,total_query_time,total_wait_time,avg_xact_count,avg_query_count,avg_recv,avg_sent,avg_xact_time,avg_query_time,avg_wait_time",
    ),
    ("config", "key,value,default,changeable"),
    ("nodes", "pooler,role,term,lsn,lag_bytes,links_up,links"),
    ("lists", "list,items"),
    ("version", "version"),
];

#[test]
fn every_show_prints_pgbouncers_columns_and_moves_with_traffic() {
    let pg = PgCluster::start();
    let tp = Tidepool::start(&pg, opts());
    let ep = tp.endpoint();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // bob: 5 queries, one of them a two-statement transaction; then stays connected, idle.
    let (bob, _bob_end) = rt.block_on(async {
        let (c, end) = connect(&ep, BOB, APP_DB).await;
        for _ in 0..3 {
            c.simple_query("select 1").await.unwrap();
        }
        c.batch_execute("begin").await.unwrap();
        c.batch_execute("commit").await.unwrap();
        (c, end)
    });
    for (what, columns) in SHOW_COLUMNS {
        let out = console(&ep, &format!("SHOW {what}"));
        assert_eq!(
            out.lines().next(),
            Some(*columns),
            "SHOW {what}:\n{out}\n{}",
            tp.logs()
        );
    }
    let (h, pools) = rows(&console(&ep, "SHOW POOLS"));
    let bob_pool = pools
        .iter()
        .find(|r| cell(&h, r, "database") == APP_DB && cell(&h, r, "user") == BOB.0)
        .unwrap_or_else(|| panic!("no app/bob pool: {pools:?}"));
    assert_eq!(cell(&h, bob_pool, "cl_active"), "1", "{pools:?}");
    assert_eq!(cell(&h, bob_pool, "cl_waiting"), "0", "{pools:?}");
    // bob's one backend, idle in the pool now.
    assert_eq!(cell(&h, bob_pool, "sv_idle"), "1", "{pools:?}");
    assert_eq!(cell(&h, bob_pool, "sv_active"), "0", "{pools:?}");

    let (h, clients) = rows(&console(&ep, "SHOW CLIENTS"));
    let b = clients
        .iter()
        .find(|r| cell(&h, r, "user") == BOB.0)
        .unwrap_or_else(|| panic!("bob not in SHOW CLIENTS: {clients:?}"));
    assert_eq!(cell(&h, b, "type"), "C");
    assert_eq!(cell(&h, b, "database"), APP_DB);
    assert_eq!(cell(&h, b, "state"), "idle");
    assert_eq!(cell(&h, b, "addr"), "127.0.0.1");
    assert!(cell(&h, b, "connect_time").ends_with(" UTC"), "{b:?}");
    // The console's own session is listed too (as PgBouncer's).
    assert!(clients
        .iter()
        .any(|r| cell(&h, r, "database") == "tidepool" && cell(&h, r, "state") == "active"));

    let (h, servers) = rows(&console(&ep, "SHOW SERVERS"));
    assert_eq!(
        servers
            .iter()
            .filter(|r| cell(&h, r, "user") == BOB.0 && cell(&h, r, "state") == "idle")
            .count(),
        1,
        "{servers:?}"
    );
    // Each row is a real backend: its pid and its end of the connection are what Postgres
    // itself says in pg_stat_activity.
    let direct = pg.psql_admin(
        "SELECT pid || ',' || host(client_addr) || ',' || client_port FROM pg_stat_activity \
         WHERE usename = 'bob' AND datname = 'app' AND backend_type = 'client backend' \
         ORDER BY pid",
    );
    let mut shown: Vec<String> = servers
        .iter()
        .filter(|r| cell(&h, r, "user") == BOB.0 && cell(&h, r, "database") == APP_DB)
        .map(|r| {
            assert_eq!(cell(&h, r, "type"), "S");
            assert_eq!(cell(&h, r, "addr"), "127.0.0.1", "{r:?}");
            assert_eq!(cell(&h, r, "port"), pg.port().to_string(), "{r:?}");
            assert!(cell(&h, r, "connect_time").ends_with(" UTC"), "{r:?}");
            assert_eq!(cell(&h, r, "link"), "", "an idle backend is linked: {r:?}");
            format!(
                "{},{},{}",
                cell(&h, r, "remote_pid"),
                cell(&h, r, "local_addr"),
                cell(&h, r, "local_port")
            )
        })
        .collect();
    shown.sort();
    let mut direct: Vec<String> = direct.lines().map(str::to_owned).collect();
    direct.sort();
    assert_eq!(shown, direct, "{servers:?}");

    // A backend a transaction holds: active, linked to its client (and the client to it).
    rt.block_on(async {
        let (c, _end) = connect(&ep, BOB, "postgres").await;
        c.batch_execute("begin; select 1").await.unwrap();
        let in_xact = pg.psql_admin(
            "SELECT pid FROM pg_stat_activity WHERE usename = 'bob' \
             AND datname = 'postgres' AND state = 'idle in transaction'",
        );
        let ep2 = ep.clone();
        let (servers, clients) = tokio::task::spawn_blocking(move || {
            (
                rows(&console(&ep2, "SHOW SERVERS")),
                rows(&console(&ep2, "SHOW CLIENTS")),
            )
        })
        .await
        .unwrap();
        let (hs, servers) = servers;
        let (hc, clients) = clients;
        let s = servers
            .iter()
            .find(|r| cell(&hs, r, "user") == BOB.0 && cell(&hs, r, "database") == "postgres")
            .unwrap_or_else(|| panic!("no bob/postgres server: {servers:?}"));
        assert_eq!(cell(&hs, s, "state"), "active", "{servers:?}");
        assert_eq!(cell(&hs, s, "remote_pid"), in_xact.trim(), "{servers:?}");
        let cl = clients
            .iter()
            .find(|r| cell(&hc, r, "user") == BOB.0 && cell(&hc, r, "database") == "postgres")
            .unwrap_or_else(|| panic!("no bob/postgres client: {clients:?}"));
        assert_eq!(
            cell(&hs, s, "link"),
            cell(&hc, cl, "ptr"),
            "{servers:?} {clients:?}"
        );
        assert_eq!(
            cell(&hc, cl, "link"),
            cell(&hs, s, "ptr"),
            "{servers:?} {clients:?}"
        );
        c.batch_execute("commit").await.unwrap();
    });

    // Live clients count: bob's 5 queries (select ×3, begin, commit) and 4 transactions.
    let (h, stats) = rows(&console(&ep, "SHOW STATS"));
    let app = stats
        .iter()
        .find(|r| cell(&h, r, "database") == APP_DB)
        .unwrap_or_else(|| panic!("no app in SHOW STATS: {stats:?}"));
    assert_eq!(cell(&h, app, "total_query_count"), "5", "{stats:?}");
    assert_eq!(cell(&h, app, "total_xact_count"), "4", "{stats:?}");
    let received: u64 = cell(&h, app, "total_received").parse().unwrap();
    // Five Query messages: 5 header bytes, the text and its NUL each.
    assert_eq!(received, 3 * 14 + 11 + 12, "{stats:?}");
    assert!(cell(&h, app, "total_sent").parse::<u64>().unwrap() > 0);
    // ... and a client that left still counts.
    drop(bob);
    std::thread::sleep(Duration::from_millis(300));
    let (h, stats) = rows(&console(&ep, "SHOW STATS"));
    let app = stats
        .iter()
        .find(|r| cell(&h, r, "database") == APP_DB)
        .unwrap();
    assert_eq!(cell(&h, app, "total_query_count"), "5", "{stats:?}");

    let (h, nodes) = rows(&console(&ep, "SHOW NODES"));
    assert_eq!(nodes.len(), 1, "{nodes:?}");
    assert_eq!(cell(&h, &nodes[0], "role"), "primary");
    let (h, config) = rows(&console(&ep, "SHOW CONFIG"));
    let admins = config
        .iter()
        .find(|r| cell(&h, r, "key") == "admin_users")
        .unwrap();
    assert_eq!(cell(&h, admins, "value"), ALICE.0);
    assert_eq!(cell(&h, admins, "changeable"), "yes");
    let (h, lists) = rows(&console(&ep, "SHOW LISTS"));
    let pools_item = lists
        .iter()
        .find(|r| cell(&h, r, "list") == "pools")
        .unwrap();
    assert!(cell(&h, pools_item, "items").parse::<u64>().unwrap() >= 1);

    // Bad commands: an error with a SQLSTATE, and the console goes on.
    for bad in [
        "SHOW NOTHING",
        "FROBNICATE",
        "PAUSE a b",
        "SELECT 1; SHOW POOLS",
        "KILL \"x",
    ] {
        let out = console(&ep, bad);
        assert!(out.contains("ERROR:  42601"), "{bad}: {out}");
    }
    let out = console(&ep, "RESUME");
    assert!(out.contains("ERROR:  55000"), "{out}");
    // The extended protocol (tokio-postgres's query): refused with a FATAL, not a crash.
    rt.block_on(async {
        let (c, end) = connect(&ep, ALICE, "tidepool").await;
        let e = c.query("SHOW POOLS", &[]).await.unwrap_err();
        let code = e.code().map(|c| c.code().to_owned());
        let code = code.or(end.await.unwrap());
        assert_eq!(code.as_deref(), Some("08P01"), "{e:?}");
    });
    assert!(console(&ep, "SHOW VERSION").contains("Tidepool"));
}

#[test]
fn a_role_that_is_not_an_admin_user_is_refused() {
    let pg = PgCluster::start();
    let tp = Tidepool::start(&pg, opts());
    let ep = tp.endpoint();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let e = ep
            .pg_config(BOB.0, BOB.1, "tidepool")
            .connect(tokio_postgres::NoTls)
            .await
            .err()
            .expect("bob got into the console");
        assert_eq!(e.code().map(|c| c.code()), Some("28000"), "{e:?}");
        let msg = e
            .as_db_error()
            .map(|d| d.message().to_owned())
            .unwrap_or_default();
        assert!(msg.starts_with("not allowed"), "{msg}");
        // A wrong password of an admin user: the usual authentication failure.
        let e = ep
            .pg_config(ALICE.0, "wrong", "tidepool")
            .connect(tokio_postgres::NoTls)
            .await
            .err()
            .expect("a wrong password got into the console");
        assert_eq!(e.code().map(|c| c.code()), Some("28P01"), "{e:?}");
    });
    // And alice still can.
    assert!(console(&ep, "SHOW VERSION").contains("Tidepool"));
}

#[test]
fn pause_holds_new_queries_until_resume_and_kill_ends_the_databases_clients() {
    let pg = PgCluster::start();
    let mut tp = Tidepool::start(&pg, opts());
    let ep = tp.endpoint();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let (bob, _) = connect(&ep, BOB, APP_DB).await;
        bob.simple_query("select 1").await.unwrap();
        let ep2 = ep.clone();
        let out = tokio::task::spawn_blocking(move || console(&ep2, "PAUSE app"))
            .await
            .unwrap();
        assert!(!out.contains("ERROR"), "{out}");
        let started = Instant::now();
        let held = tokio::spawn(async move {
            bob.simple_query("select 2").await.unwrap();
            (bob, started.elapsed())
        });
        tokio::time::sleep(Duration::from_millis(800)).await;
        assert!(!held.is_finished(), "a query ran on a paused database");
        // Another database is not paused.
        let (other, _) = connect(&ep, BOB, "postgres").await;
        other.simple_query("select 1").await.unwrap();
        let ep2 = ep.clone();
        let (h, pools) = tokio::task::spawn_blocking(move || rows(&console(&ep2, "SHOW POOLS")))
            .await
            .unwrap();
        let p = pools
            .iter()
            .find(|r| cell(&h, r, "database") == APP_DB && cell(&h, r, "user") == BOB.0)
            .unwrap();
        assert_eq!(cell(&h, p, "cl_waiting"), "1", "{pools:?}");
        let ep2 = ep.clone();
        let out = tokio::task::spawn_blocking(move || console(&ep2, "RESUME app"))
            .await
            .unwrap();
        assert!(!out.contains("ERROR"), "{out}");
        let (bob, waited) = tokio::time::timeout(Duration::from_secs(5), held)
            .await
            .expect("RESUME did not release the query")
            .unwrap();
        assert!(waited >= Duration::from_millis(800), "{waited:?}");
        bob.simple_query("select 3").await.unwrap();

        // SUSPEND: every database waits until RESUME.
        let ep2 = ep.clone();
        let out = tokio::task::spawn_blocking(move || console(&ep2, "SUSPEND"))
            .await
            .unwrap();
        assert!(!out.contains("ERROR"), "{out}");
        let held = tokio::spawn(async move {
            other.simple_query("select 6").await.unwrap();
            other
        });
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert!(!held.is_finished(), "a query ran while suspended");
        let ep2 = ep.clone();
        let out = tokio::task::spawn_blocking(move || console(&ep2, "RESUME"))
            .await
            .unwrap();
        assert!(!out.contains("ERROR"), "{out}");
        let other = tokio::time::timeout(Duration::from_secs(5), held)
            .await
            .expect("RESUME did not end the SUSPEND")
            .unwrap();

        // KILL app: bob's app sessions end with 57P01, the one on postgres goes on.
        let (bob2, bob2_end) = connect(&ep, BOB, APP_DB).await;
        bob2.batch_execute("begin").await.unwrap();
        let ep2 = ep.clone();
        let out = tokio::task::spawn_blocking(move || console(&ep2, "KILL app"))
            .await
            .unwrap();
        assert!(!out.contains("ERROR"), "{out}");
        let code = tokio::time::timeout(Duration::from_secs(5), bob2_end)
            .await
            .expect("KILL did not end the session")
            .unwrap();
        assert_eq!(code.as_deref(), Some("57P01"));
        assert!(bob.simple_query("select 4").await.is_err());
        other.simple_query("select 5").await.unwrap();
    });
    // SHUTDOWN: the gateway drains and exits 0.
    let out = console(&ep, "SHUTDOWN");
    assert!(!out.contains("ERROR"), "{out}");
    let status = tp
        .wait_gateway_exit(Duration::from_secs(20))
        .unwrap_or_else(|| panic!("still running after SHUTDOWN\n{}", tp.logs()));
    assert!(status.success(), "{status}");
}

#[test]
fn reload_applies_a_changed_limit() {
    let pg = PgCluster::start();
    let file = pg.dir().join("gateway.toml");
    std::fs::write(&file, "max_clients = 100\n").unwrap();
    let tp = Tidepool::start(
        &pg,
        opts()
            .gateway_arg("--config")
            .gateway_arg(file.to_string_lossy().into_owned())
            .pooler_arg("--server-lifetime-ms")
            .pooler_arg("1000"),
    );
    let ep = tp.endpoint();
    let (h, config) = rows(&console(&ep, "SHOW CONFIG"));
    let v = |config: &[Vec<String>], h: &[String]| {
        let r = config
            .iter()
            .find(|r| cell(h, r, "key") == "max_clients")
            .unwrap()
            .clone();
        cell(h, &r, "value").to_owned()
    };
    assert_eq!(v(&config, &h), "100");
    // PgBouncer's columns: what is in force, what it would be unset, whether a reload applies it.
    let row = |config: &[Vec<String>], key: &str| {
        config
            .iter()
            .find(|r| cell(&h, r, "key") == key)
            .unwrap_or_else(|| panic!("no {key} in SHOW CONFIG: {config:?}"))
            .clone()
    };
    let m = row(&config, "max_clients");
    assert_eq!(
        (cell(&h, &m, "default"), cell(&h, &m, "changeable")),
        ("100000", "yes")
    );
    let l = row(&config, "listen");
    assert_eq!(
        cell(&h, &l, "value"),
        format!("127.0.0.1:{}", tp.gateway_port())
    );
    assert_eq!(
        (cell(&h, &l, "default"), cell(&h, &l, "changeable")),
        ("127.0.0.1:15432", "no")
    );
    std::fs::write(&file, "max_clients = 2\n").unwrap();
    let out = console(&ep, "RELOAD");
    assert!(!out.contains("ERROR"), "{out}");
    let (h, config) = rows(&console(&ep, "SHOW CONFIG"));
    assert_eq!(v(&config, &h), "2", "{}", tp.logs());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let _a = connect(&ep, BOB, APP_DB).await;
        let _b = connect(&ep, BOB, APP_DB).await;
        let e = ep
            .pg_config(BOB.0, BOB.1, APP_DB)
            .connect(tokio_postgres::NoTls)
            .await
            .err()
            .expect("a third client got in past max_clients = 2");
        assert_eq!(e.code().map(|c| c.code()), Some("53300"), "{e}");
    });

    // SET changes a live key at once (until the next RELOAD reads the file again).
    let out = console(&ep, "SET max_clients = 3");
    assert!(!out.contains("ERROR"), "{out}");
    let (h, config) = rows(&console(&ep, "SHOW CONFIG"));
    assert_eq!(v(&config, &h), "3", "{}", tp.logs());
    rt.block_on(async {
        let _a = connect(&ep, BOB, APP_DB).await;
        let _b = connect(&ep, BOB, APP_DB).await;
        // A third: max_clients is 3 now.
        let (c, _) = connect(&ep, BOB, APP_DB).await;
        c.simple_query("select 1").await.unwrap();
    });
    for (cmd, code) in [
        ("SET listen = '127.0.0.1:1'", "55P02"),
        ("SET no_such_key = 1", "42704"),
        ("SET max_clients = lots", "22023"),
        ("SET max_clients", "42601"),
    ] {
        let out = console(&ep, cmd);
        assert!(out.contains(&format!("ERROR:  {code}")), "{cmd}: {out}");
    }

    // WAIT_CLOSE: a backend past server_lifetime (1 s here) that a transaction holds is due
    // to close (close_needed in SHOW SERVERS); WAIT_CLOSE returns once it has gone.
    rt.block_on(async {
        let (c, _) = connect(&ep, BOB, APP_DB).await;
        c.batch_execute("begin; select 1").await.unwrap();
        tokio::time::sleep(Duration::from_millis(1300)).await;
        let ep2 = ep.clone();
        let (h, servers) =
            tokio::task::spawn_blocking(move || rows(&console(&ep2, "SHOW SERVERS")))
                .await
                .unwrap();
        let held = servers
            .iter()
            .find(|r| cell(&h, r, "user") == BOB.0 && cell(&h, r, "state") == "active")
            .unwrap_or_else(|| panic!("no active bob backend: {servers:?}"))
            .clone();
        assert_eq!(cell(&h, &held, "close_needed"), "1", "{servers:?}");
        let pid = cell(&h, &held, "remote_pid").to_owned();
        let ep2 = ep.clone();
        let waiting = tokio::task::spawn_blocking(move || console(&ep2, "WAIT_CLOSE app"));
        tokio::time::sleep(Duration::from_millis(700)).await;
        assert!(
            !waiting.is_finished(),
            "WAIT_CLOSE returned with a backend due"
        );
        c.batch_execute("commit").await.unwrap();
        let out = tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("WAIT_CLOSE did not return")
            .unwrap();
        assert!(!out.contains("ERROR"), "{out}");
        let left = pg.psql_admin(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = {pid}"
        ));
        assert_eq!(
            left.trim(),
            "0",
            "the backend past its lifetime is still there"
        );
    });
}
