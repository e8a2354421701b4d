//! The SHOW commands: PgBouncer's column names where the idea is the same.

use super::table::{Cell, Table, Type};
use crate::config::Config;
use crate::core::Core;
use crate::registry::{state, unix_us, Client};
use shared::agent::Role;
use shared::link::server_state;
use shared::link::PoolFacts;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::SystemTime;

use Type::{Int8 as I, Text as T};

/// `YYYY-MM-DD HH:MM:SS UTC`, as PgBouncer prints times.
pub fn timestamp(unix_us: u64) -> String {
    let secs = unix_us / 1_000_000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn state_name(s: u8) -> &'static str {
    match s {
        state::ACTIVE => "active",
        state::WAITING => "waiting",
        _ => "idle",
    }
}

/// Seconds and the microseconds beyond them a waiting client has waited.
fn waited(c: &Client, now: u64) -> (u64, u64) {
    if c.state() != state::WAITING {
        return (0, 0);
    }
    let us = now.saturating_sub(c.request_time());
    (us / 1_000_000, us % 1_000_000)
}

fn addr_cells(a: Option<std::net::SocketAddr>) -> [Cell; 2] {
    match a {
        Some(a) => [a.ip().to_string().into(), i64::from(a.port()).into()],
        // A Unix-socket client, as PgBouncer shows it.
        None => ["unix".into(), 0i64.into()],
    }
}

const CLIENT_COLUMNS: &[(&str, Type)] = &[
    ("type", T),
    ("user", T),
    ("database", T),
    ("state", T),
    ("addr", T),
    ("port", I),
    ("local_addr", T),
    ("local_port", I),
    ("connect_time", T),
    ("request_time", T),
    ("wait", I),
    ("wait_us", I),
    ("close_needed", I),
    ("ptr", T),
    ("link", T),
    ("remote_pid", I),
    ("tls", T),
    ("application_name", T),
];

/// Every client of the gateway; `link` is the `ptr` of the backend (SHOW SERVERS) its session
/// holds now, if any.
pub fn clients(core: &Core, facts: &[Option<PoolFacts>]) -> Table {
    let mut t = Table::new(CLIENT_COLUMNS);
    let now = unix_us(SystemTime::now());
    let mut held: HashMap<i32, String> = HashMap::new();
    for (i, f) in facts.iter().enumerate() {
        for s in f.iter().flat_map(|f| &f.servers) {
            if s.link != 0 {
                held.insert(s.link, server_ptr(i, s.id));
            }
        }
    }
    for c in core.admin.clients() {
        let [addr, port] = addr_cells(c.addr);
        let [laddr, lport] = addr_cells(c.local);
        let (w, wus) = waited(&c, now);
        t.row(vec![
            "C".into(),
            c.user.as_str().into(),
            c.database.as_str().into(),
            state_name(c.state()).into(),
            addr,
            port,
            laddr,
            lport,
            timestamp(unix_us(c.connected)).into(),
            timestamp(c.request_time()).into(),
            w.into(),
            wus.into(),
            u64::from(c.killed()).into(),
            client_ptr(&c).into(),
            held.get(&c.pid).cloned().unwrap_or_default().into(),
            i64::from(c.pid).into(),
            "".into(),
            c.application_name.as_str().into(),
        ]);
    }
    t
}

/// Per (database, user): the gateway's clients by state and longest pause wait, and the
/// poolers' backends (summed over poolers) and sessions waiting for one.
#[derive(Default)]
struct PoolRow {
    cl_active: u64,
    cl_waiting: u64,
    sv_active: u64,
    sv_idle: u64,
    maxwait_us: u64,
    waited_us: u64,
}

fn pool_rows(core: &Core, facts: &[Option<PoolFacts>]) -> BTreeMap<(String, String), PoolRow> {
    let mut rows: BTreeMap<(String, String), PoolRow> = BTreeMap::new();
    let now = unix_us(SystemTime::now());
    for c in core.admin.clients() {
        let r = rows
            .entry((c.database.clone(), c.user.clone()))
            .or_default();
        if c.state() == state::WAITING {
            r.cl_waiting += 1;
            let (s, us) = waited(&c, now);
            r.maxwait_us = r.maxwait_us.max(s * 1_000_000 + us);
        } else {
            r.cl_active += 1;
        }
    }
    for f in facts.iter().flatten() {
        for p in &f.pools {
            let r = rows
                .entry((p.database.clone(), p.user.clone()))
                .or_default();
            r.sv_idle += u64::from(p.idle);
            r.sv_active += u64::from(p.backends.saturating_sub(p.idle));
            // Sessions waiting in the pooler for a backend are clients that wait.
            let w = u64::from(p.waiting);
            r.cl_active = r.cl_active.saturating_sub(w);
            r.cl_waiting += w;
            r.waited_us += p.waited_us;
        }
    }
    rows
}

pub fn pools(core: &Core, facts: &[Option<PoolFacts>]) -> Table {
    let mut t = Table::new(&[
        ("database", T),
        ("user", T),
        ("cl_active", I),
        ("cl_waiting", I),
        ("cl_active_cancel_req", I),
        ("cl_waiting_cancel_req", I),
        ("sv_active", I),
        ("sv_active_cancel", I),
        ("sv_being_canceled", I),
        ("sv_idle", I),
        ("sv_used", I),
        ("sv_tested", I),
        ("sv_login", I),
        ("maxwait", I),
        ("maxwait_us", I),
        ("pool_mode", T),
    ]);
    for ((db, user), r) in pool_rows(core, facts) {
        t.row(vec![
            db.into(),
            user.into(),
            r.cl_active.into(),
            r.cl_waiting.into(),
            0u64.into(),
            0u64.into(),
            r.sv_active.into(),
            0u64.into(),
            0u64.into(),
            r.sv_idle.into(),
            0u64.into(),
            0u64.into(),
            0u64.into(),
            (r.maxwait_us / 1_000_000).into(),
            (r.maxwait_us % 1_000_000).into(),
            // No pooling modes: a backend is pinned only while session state needs it.
            "auto".into(),
        ]);
    }
    t
}

/// A backend's `ptr`: unique over the poolers (the pooler's index in the high bits).
fn server_ptr(pooler: usize, id: u64) -> String {
    format!("{:x}", (pooler as u64) << 48 | id)
}

/// A client's `ptr` (SHOW CLIENTS) and `link` of the backend it holds.
fn client_ptr(c: &Arc<Client>) -> String {
    format!("{:x}", Arc::as_ptr(c) as usize)
}

/// One row per real backend of every pooler, as the poolers report them: `remote_pid` is the
/// backend's pid in Postgres, `link` the `ptr` of the client whose session holds it (SHOW
/// CLIENTS), `addr`/`port` Postgres's end and `local_*` the pooler's end of the connection.
/// A backend still logging in is not listed yet (SHOW POOLS counts it).
pub fn servers(core: &Core, facts: &[Option<PoolFacts>]) -> Table {
    let mut t = Table::new(CLIENT_COLUMNS);
    let by_pid: HashMap<i32, String> = core
        .admin
        .clients()
        .iter()
        .map(|c| (c.pid, client_ptr(c)))
        .collect();
    for (i, f) in facts.iter().enumerate() {
        let Some(f) = f else { continue };
        for s in &f.servers {
            let [addr, port] = addr_cells(s.addr);
            let [laddr, lport] = addr_cells(s.local);
            let link = match s.link {
                0 => String::new(),
                pid => by_pid.get(&pid).cloned().unwrap_or_default(),
            };
            t.row(vec![
                "S".into(),
                s.user.as_str().into(),
                s.database.as_str().into(),
                match s.state {
                    server_state::ACTIVE => "active",
                    _ => "idle",
                }
                .into(),
                addr,
                port,
                laddr,
                lport,
                timestamp(s.connect_time).into(),
                timestamp(s.request_time).into(),
                0u64.into(),
                0u64.into(),
                u64::from(s.close_needed).into(),
                server_ptr(i, s.id).into(),
                link.into(),
                i64::from(s.pid).into(),
                if s.tls { "yes" } else { "" }.into(),
                "".into(),
            ]);
        }
    }
    t
}

pub fn stats(core: &Core, facts: &[Option<PoolFacts>]) -> Table {
    let mut t = Table::new(&[
        ("database", T),
        ("total_xact_count", I),
        ("total_query_count", I),
        ("total_received", I),
        ("total_sent", I),
        ("total_xact_time", I),
        ("total_query_time", I),
        ("total_wait_time", I),
        ("avg_xact_count", I),
        ("avg_query_count", I),
        ("avg_recv", I),
        ("avg_sent", I),
        ("avg_xact_time", I),
        ("avg_query_time", I),
        ("avg_wait_time", I),
    ]);
    let mut waits: BTreeMap<String, u64> = BTreeMap::new();
    for f in facts.iter().flatten() {
        for p in &f.pools {
            *waits.entry(p.database.clone()).or_default() += p.waited_us;
        }
    }
    let secs = core.admin.started.elapsed().as_secs().max(1);
    for (db, [xacts, queries, recv, sent, xact_us, query_us, pause_us]) in core.admin.totals() {
        let wait = pause_us + waits.get(&db).copied().unwrap_or(0);
        let per = |a: u64, b: u64| a.checked_div(b).unwrap_or(0);
        t.row(vec![
            db.into(),
            xacts.into(),
            queries.into(),
            recv.into(),
            sent.into(),
            xact_us.into(),
            query_us.into(),
            wait.into(),
            // Averages: counts and bytes per second since the gateway started; times per
            // transaction / query, as PgBouncer's.
            per(xacts, secs).into(),
            per(queries, secs).into(),
            per(recv, secs).into(),
            per(sent, secs).into(),
            per(xact_us, xacts).into(),
            per(query_us, queries).into(),
            per(wait, xacts).into(),
        ]);
    }
    t
}

/// Every key of the gateway's config as SHOW CONFIG prints it (the names of
/// config/gateway.toml; lists comma-separated; unset paths and addresses empty).
fn config_entries(cfg: &Config) -> Vec<(&'static str, String)> {
    let opt = |v: &Option<String>| v.clone().unwrap_or_default();
    let path = |v: &Option<std::path::PathBuf>| {
        v.as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    };
    let auth = match cfg.auth_method {
        crate::config::AuthMethod::Scram => "scram-sha-256",
        crate::config::AuthMethod::Md5 => "md5",
        crate::config::AuthMethod::Trust => "trust",
    };
    vec![
        ("listen", cfg.listen.clone()),
        ("unix_socket_dir", opt(&cfg.unix_socket_dir)),
        ("read_only_listen", opt(&cfg.read_only_listen)),
        ("cores", cfg.cores.to_string()),
        ("poolers", cfg.poolers.join(",")),
        ("links_per_core", cfg.links_per_core.to_string()),
        ("auth_method", auth.into()),
        ("hba_file", path(&cfg.hba_file)),
        ("auth_timeout_seconds", cfg.auth_timeout_seconds.to_string()),
        ("max_clients", cfg.max_clients.to_string()),
        ("max_user_clients", cfg.max_user_clients.to_string()),
        ("max_db_clients", cfg.max_db_clients.to_string()),
        ("max_message_size", cfg.max_message_size.to_string()),
        ("failover_hold_ms", cfg.failover_hold_ms.to_string()),
        ("failover_hold_max", cfg.failover_hold_max.to_string()),
        (
            "max_standby_lag_bytes",
            cfg.max_standby_lag_bytes.to_string(),
        ),
        (
            "guard_synchronous_commit",
            cfg.guard_synchronous_commit.to_string(),
        ),
        (
            "client_idle_timeout_ms",
            cfg.client_idle_timeout_ms.to_string(),
        ),
        (
            "idle_transaction_timeout_ms",
            cfg.idle_transaction_timeout_ms.to_string(),
        ),
        ("shutdown_timeout_ms", cfg.shutdown_timeout_ms.to_string()),
        ("spin_before_park_us", cfg.spin_before_park_us.to_string()),
        ("tls_cert", path(&cfg.tls_cert)),
        ("tls_key", path(&cfg.tls_key)),
        ("log_level", cfg.log_level.clone()),
        ("admin_database", cfg.admin_database.clone()),
        ("admin_users", cfg.admin_users.join(",")),
        ("metrics_listen", opt(&cfg.metrics_listen)),
    ]
}

/// PgBouncer's SHOW CONFIG: `key`, `value` (in force now), `default` (neither file nor flag
/// set it), `changeable` (`yes`: a reload, RELOAD or SIGHUP, applies it live:
/// `Config::LIVE_KEYS`).
pub fn config(cfg: &Config) -> Table {
    let mut t = Table::new(&[("key", T), ("value", T), ("default", T), ("changeable", T)]);
    let defaults: HashMap<&str, String> = config_entries(&cfg.defaults()).into_iter().collect();
    for (k, v) in config_entries(cfg) {
        let d = defaults.get(k).cloned().unwrap_or_default();
        let live = Config::LIVE_KEYS.contains(&k);
        t.row(vec![
            k.into(),
            v.into(),
            d.into(),
            if live { "yes" } else { "no" }.into(),
        ]);
    }
    t
}

/// Tidepool's own: each pooler (one per Postgres node) as this core's links report it.
pub fn nodes(core: &Core) -> Table {
    let mut t = Table::new(&[
        ("pooler", T),
        ("role", T),
        ("term", I),
        ("lsn", T),
        ("lag_bytes", I),
        ("links_up", I),
        ("links", I),
    ]);
    let cfg = core.cfg();
    let primary_lsn = core.primary().and_then(|p| {
        core.links[p]
            .iter()
            .filter(|l| l.alive.get())
            .map(|l| l.lsn.get())
            .max()
    });
    for (i, links) in core.links.iter().enumerate() {
        let up: Vec<_> = links.iter().filter(|l| l.alive.get()).collect();
        let report = up.iter().find_map(|l| l.reported_role());
        let role = match report.map(|r| r.0) {
            _ if up.is_empty() => "down",
            Some(Role::Primary) => "primary",
            Some(Role::Standby) => "standby",
            Some(Role::Down) => "down",
            None => "unknown",
        };
        let lsn = up.iter().map(|l| l.lsn.get()).max().unwrap_or(0);
        let lag = match (primary_lsn, lsn) {
            (Some(p), l) if p != 0 && l != 0 => Cell::from(p.saturating_sub(l)),
            _ => Cell::Null,
        };
        t.row(vec![
            cfg.poolers.get(i).cloned().unwrap_or_default().into(),
            role.into(),
            report.map_or(0, |r| r.1).into(),
            format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff).into(),
            lag,
            up.len().into(),
            links.len().into(),
        ]);
    }
    t
}

pub fn lists(core: &Core, facts: &[Option<PoolFacts>]) -> Table {
    let mut t = Table::new(&[("list", T), ("items", I)]);
    let rows = pool_rows(core, facts);
    let mut dbs: Vec<&String> = rows.keys().map(|(d, _)| d).collect();
    dbs.dedup();
    let mut users: Vec<&String> = rows.keys().map(|(_, u)| u).collect();
    users.sort();
    users.dedup();
    let clients = core.admin.clients().len();
    let (active, idle) = rows
        .values()
        .fold((0, 0), |(a, i), r| (a + r.sv_active, i + r.sv_idle));
    for (k, v) in [
        ("databases", dbs.len() as u64),
        ("users", users.len() as u64),
        ("pools", rows.len() as u64),
        ("free_clients", 0),
        ("used_clients", clients as u64),
        ("login_clients", 0),
        ("free_servers", idle),
        ("used_servers", active),
        ("dns_names", 0),
        ("dns_zones", 0),
        ("dns_queries", 0),
        ("dns_pending", 0),
    ] {
        t.row(vec![k.into(), v.into()]);
    }
    t
}

pub fn version() -> Table {
    let mut t = Table::new(&[("version", T)]);
    t.row(vec![
        format!("Tidepool {}", env!("CARGO_PKG_VERSION")).into()
    ]);
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_as_pgbouncer_prints_them() {
        assert_eq!(timestamp(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(timestamp(1_709_210_096_000_000), "2024-02-29 12:34:56 UTC");
    }

    /// SHOW CONFIG lists every key; `changeable` says what a reload applies, exactly: a
    /// config differing in every field reloads the LIVE_KEYS live and the rest at restart.
    #[test]
    fn show_config_says_what_a_reload_applies() {
        use crate::config::{Args, AuthMethod};
        use clap::Parser;
        let key = std::env::temp_dir().join(format!("tp-show-cfg-{}.key", std::process::id()));
        shared::link::LinkKey::load_or_create(&key).unwrap();
        let k = key.to_string_lossy().into_owned();
        let a = Config::load(Args::parse_from(["g", "--link-secret-file", &k])).unwrap();
        // Every field named (no `..a`): a new field does not compile until it is here.
        let b = Config {
            listen: "127.0.0.1:1".into(),
            unix_socket_dir: Some("/x".into()),
            cores: a.cores + 1,
            poolers: vec!["y:1".into()],
            failover_hold_ms: 1,
            failover_hold_max: 1,
            read_only_listen: Some("127.0.0.1:2".into()),
            max_standby_lag_bytes: 1,
            guard_synchronous_commit: !a.guard_synchronous_commit,
            auth_method: AuthMethod::Trust,
            hba_file: Some("/h".into()),
            hba: None,
            max_user_clients: 1,
            max_db_clients: 1,
            tls_cert: Some("/c".into()),
            tls_key: Some("/k".into()),
            max_clients: 1,
            max_message_size: 1,
            links_per_core: 9,
            auth_timeout_seconds: 1,
            spin_before_park_us: 1,
            shutdown_timeout_ms: 1,
            client_idle_timeout_ms: 1,
            idle_transaction_timeout_ms: 1,
            log_level: "debug".into(),
            link_key: a.link_key.clone(),
            link_tls: None,
            session_ids: a.session_ids,
            admin_database: "adm".into(),
            admin_users: vec!["z".into()],
            metrics_listen: Some("127.0.0.1:3".into()),
        };
        let (_, live, restart) = a.reloaded(&b);
        let mut live: Vec<&str> = live;
        live.sort();
        let mut want: Vec<&str> = Config::LIVE_KEYS.to_vec();
        want.sort();
        assert_eq!(live, want);
        let mut shown: Vec<&str> = config_entries(&a).into_iter().map(|(k, _)| k).collect();
        shown.sort();
        let mut all: Vec<&str> = live
            .iter()
            .chain(&restart)
            .map(|k| if *k == "pooler" { "poolers" } else { k })
            .collect();
        all.sort();
        assert_eq!(shown, all, "SHOW CONFIG lists every key a reload looks at");
        let mut keys = Config::ALL_KEYS.to_vec();
        keys.sort();
        assert_eq!(shown, keys);
        // SET: the live keys of one value; the others refused with Postgres's codes.
        let mut c = a.clone();
        c.set("max_clients", "7").unwrap();
        c.set("client_idle_timeout_ms", "250").unwrap();
        c.set("auth_method", "trust").unwrap();
        c.set("admin_users", "x, y").unwrap();
        assert_eq!(
            (c.max_clients, c.client_idle_timeout_ms, c.auth_method),
            (7, 250, AuthMethod::Trust)
        );
        assert_eq!(c.admin_users, vec!["x", "y"]);
        assert_eq!(c.set("max_clients", "many").unwrap_err().0, "22023");
        assert_eq!(c.set("admin_users", " , ").unwrap_err().0, "22023");
        assert_eq!(c.set("listen", "127.0.0.1:1").unwrap_err().0, "55P02");
        assert_eq!(c.set("tls_cert", "/x").unwrap_err().0, "55P02");
        assert_eq!(c.set("no_such_key", "1").unwrap_err().0, "42704");
        for k in Config::LIVE_KEYS {
            assert_ne!(c.set(k, "").map_err(|e| e.0), Err("42704"), "{k}");
        }
        // Values and defaults: the default is what an empty config gives.
        let mut t = Vec::new();
        config(&b).encode(&mut t);
        let text = String::from_utf8_lossy(&t);
        assert!(text.contains("max_clients"), "{text}");
        let d = a.defaults();
        assert_eq!(d.max_clients, 100_000);
        assert_eq!(d.log_level, "info");
        let _ = std::fs::remove_file(&key);
    }
}
