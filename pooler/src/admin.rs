//! The admin connection: reads a role's verifier from `pg_authid` for the gateway's
//! authentication, and the settings `ALTER ROLE|DATABASE … SET` gave a (role, database) from
//! `pg_db_role_setting` for new sessions. Over Postgres's Unix socket as a superuser role (peer
//! authentication), one per core, one query at a time, results cached briefly.
//!
//! Role lookups must survive a login storm (issue 12): a flood of logins as unknown roles, or
//! with wrong passwords, must leave valid logins served within their usual latency. So:
//! verifiers are cached (`auth_cache_seconds`) and so are absent roles (`auth_negative_cache_ms`:
//! a repeated unknown name costs no query); lookups waiting on a core are bounded in number
//! (`MAX_WAITING`, more are refused at once) and answered together, every name waiting at the
//! time in one query (`BATCH` at most), so a valid login waits for about one query whatever
//! the flood; and each lookup, waiting included, is bounded by `auth_lookup_timeout_ms`.
//! Wrong passwords for a real role cost no lookup at all once its verifier is cached.

use crate::config::Config;
use crate::login;
use futures_lite::AsyncWriteExt;
use glommio::net::UnixStream;
use shared::io::{MessageReader, Notify};
use shared::link::Credential;
use shared::protocol::backend as be;
use shared::protocol::{frontend, read_i16, read_i32, typed_message_len};
use shared::settings::{literal, Settings};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Bumped when this pooler sees a statement that may change `pg_db_role_setting` complete
/// (`ALTER ROLE`/`ALTER DATABASE`, and again when its transaction ends): every core's cached
/// role defaults older than that are stale. Process-wide: the cores share it without a message.
static ROLE_SETTINGS_GENERATION: AtomicU64 = AtomicU64::new(0);

/// `ALTER ROLE|USER|DATABASE` completed (or its transaction ended): new sessions must read the
/// role defaults again.
pub fn role_settings_changed() {
    ROLE_SETTINGS_GENERATION.fetch_add(1, Ordering::Relaxed);
}

/// `pg_settings.source` values of what Postgres applies at login from `pg_db_role_setting`.
pub const LOGIN_SOURCES: &str = "'global', 'database', 'user', 'database user'";

/// One row of a simple query's result, in text (`None`: SQL NULL).
type Row = Vec<Option<String>>;

/// The defaults a (role, database) starts with, from `pg_db_role_setting`.
struct RoleDefaults {
    at: Instant,
    generation: u64,
    settings: Rc<Settings>,
}

pub use shared::role::RoleInfo;

/// Role lookups waiting on one core at most; more are refused at once (the login fails with
/// 08006, as when Postgres is down) rather than queued without end.
const MAX_WAITING: usize = 1024;
/// Names looked up by one query at most.
const BATCH: usize = 256;
/// Entries kept per cache before it is cleared (a flood of distinct names cannot grow it).
const MAX_CACHED: usize = 10_000;

type Answer = Rc<RefCell<Option<Result<RoleInfo, String>>>>;

pub struct Admin {
    cfg: Rc<Config>,
    conn: RefCell<Option<(UnixStream, MessageReader)>>,
    busy: Cell<bool>,
    free: Notify,
    /// By lookup key (`user` NUL `database`, see [`key`]), with when it was read and the
    /// role settings generation then (an `ALTER ROLE|DATABASE` seen here makes it stale).
    cache: RefCell<HashMap<String, (Instant, u64, RoleInfo)>>,
    /// Role names found absent, and when.
    absent: RefCell<HashMap<String, Instant>>,
    /// Lookups waiting for a query, in arrival order (first come, first asked), by key: each
    /// waiter's answer slot.
    waiting: RefCell<Vec<(String, Vec<Answer>)>>,
    /// Lookups waiting, counted per waiter.
    waiters: Cell<usize>,
    defaults: RefCell<HashMap<(String, String), RoleDefaults>>,
    /// What a setting is when no role or database default applies (`postgresql.conf`, command
    /// line, built-in), by name, and when it was read.
    server: RefCell<HashMap<String, (Instant, Option<String>)>>,
}

impl Admin {
    pub fn new(cfg: Rc<Config>) -> Self {
        Admin {
            cfg,
            conn: RefCell::new(None),
            busy: Cell::new(false),
            free: Notify::default(),
            cache: RefCell::new(HashMap::new()),
            absent: RefCell::new(HashMap::new()),
            waiting: RefCell::new(Vec::new()),
            waiters: Cell::new(0),
            defaults: RefCell::new(HashMap::new()),
            server: RefCell::new(HashMap::new()),
        }
    }

    /// The settings `ALTER ROLE|DATABASE … SET` gives a new session of `user` in `database`, in
    /// Postgres's order (postinit.c `process_settings`: `ALTER ROLE ALL`, then the database's,
    /// the role's, the role's in that database; a later one wins), keeping only those the role
    /// may change with `set_config` (Postgres applies the others at login with superuser
    /// rights: they stay what the backend logged in with). Cached for `role_settings_cache_ms`,
    /// and until this pooler sees an `ALTER ROLE|DATABASE` complete.
    pub async fn role_defaults(&self, user: &str, database: &str) -> Result<Rc<Settings>, String> {
        let ttl = Duration::from_millis(self.cfg.role_settings_cache_ms);
        let key = (user.to_owned(), database.to_owned());
        let generation = ROLE_SETTINGS_GENERATION.load(Ordering::Relaxed);
        if let Some(d) = self.defaults.borrow().get(&key) {
            if d.generation == generation && d.at.elapsed() < ttl {
                return Ok(d.settings.clone());
            }
        }
        let sql = format!(
            "SELECT x.rank, x.item, CASE WHEN p.name IS NULL OR p.context = 'user' THEN 't' \
               WHEN p.context = 'superuser' AND r.oid IS NOT NULL \
               THEN pg_catalog.has_parameter_privilege(r.oid, p.name, 'SET')::text ELSE 'f' END \
             FROM (SELECT CASE WHEN s.setdatabase = 0 AND s.setrole = 0 THEN 0 \
                     WHEN s.setrole = 0 THEN 1 WHEN s.setdatabase = 0 THEN 2 ELSE 3 END AS rank, \
                     i.item, i.n \
                   FROM pg_catalog.pg_db_role_setting s, \
                     pg_catalog.unnest(s.setconfig) WITH ORDINALITY AS i(item, n) \
                   WHERE s.setdatabase IN (0, (SELECT oid FROM pg_catalog.pg_database \
                       WHERE datname = {db})) \
                     AND s.setrole IN (0, (SELECT oid FROM pg_catalog.pg_roles \
                       WHERE rolname = {user}))) AS x \
             LEFT JOIN pg_catalog.pg_roles r ON r.rolname = {user} \
             LEFT JOIN pg_catalog.pg_settings p \
               ON pg_catalog.lower(p.name) = pg_catalog.lower(pg_catalog.split_part(x.item, '=', 1)) \
             ORDER BY x.rank, x.n",
            db = literal(database),
            user = literal(user),
        );
        let rows = self.run(&sql).await?;
        let mut settings = Settings::default();
        for row in rows {
            let (Some(item), Some(settable)) = (col(&row, 1), col(&row, 2)) else {
                continue;
            };
            let Some((name, value)) = item.split_once('=') else {
                continue;
            };
            if settable == "t" || settable == "true" {
                settings.set(name, value);
            } else {
                tracing::debug!(user, database, setting = name, "role default left to login");
            }
        }
        let settings = Rc::new(settings);
        let mut d = self.defaults.borrow_mut();
        if d.len() > 10_000 {
            d.clear();
        }
        d.insert(
            key,
            RoleDefaults {
                at: Instant::now(),
                generation,
                settings: settings.clone(),
            },
        );
        Ok(settings)
    }

    /// What each of `names` is where no role or database default applies (the value a
    /// `RESET` gives on a backend whose login had no default for it), for the names this
    /// connection can tell (its own role and database have no default for them). A custom
    /// placeholder (`app.tenant`) defined nowhere has no value to go back to once a login
    /// created it: the nearest is `''`, what Postgres gives after `SET` and `RESET` of one.
    /// Cached like role defaults.
    pub async fn server_defaults(&self, names: &[String]) -> Result<Settings, String> {
        let ttl = Duration::from_millis(self.cfg.role_settings_cache_ms);
        let mut out = Settings::default();
        let mut missing = Vec::new();
        {
            let cache = self.server.borrow();
            for n in names {
                match cache.get(n) {
                    Some((at, v)) if at.elapsed() < ttl => {
                        if let Some(v) = v {
                            out.set(n, v);
                        }
                    }
                    _ => missing.push(literal(n)),
                }
            }
        }
        if missing.is_empty() {
            return Ok(out);
        }
        let sql = format!(
            "SELECT n, CASE WHEN p.name IS NULL AND n LIKE '%.%' \
               THEN COALESCE(pg_catalog.current_setting(n, true), '') \
               WHEN p.source NOT IN ({LOGIN_SOURCES}, 'client', 'session') \
               THEN pg_catalog.current_setting(p.name) END \
             FROM pg_catalog.unnest(ARRAY[{}]::text[]) AS n \
             LEFT JOIN pg_catalog.pg_settings p ON pg_catalog.lower(p.name) = n",
            missing.join(", ")
        );
        let rows = self.run(&sql).await?;
        let mut cache = self.server.borrow_mut();
        if cache.len() > 10_000 {
            cache.clear();
        }
        for row in rows {
            let Some(n) = col(&row, 0) else { continue };
            let v = col(&row, 1).map(str::to_owned);
            if let Some(v) = &v {
                out.set(n, v);
            }
            cache.insert(n.to_owned(), (Instant::now(), v));
        }
        Ok(out)
    }

    /// What `pg_authid` says of `user` and `pg_database` of `database` (see [`RoleInfo`]),
    /// from the caches when they know, else from a query shared with every other lookup
    /// waiting on this core; bounded by `auth_lookup_timeout_ms`. `cached: false`: never from
    /// the caches (a lookup not yet begun is joined: it reads the catalog after the call).
    pub async fn lookup(
        &self,
        user: &str,
        database: &str,
        cached: bool,
    ) -> Result<RoleInfo, String> {
        let user = &key(user, database);
        if let Some(known) = self.cached(user).filter(|_| cached) {
            return Ok(known);
        }
        if self.waiters.get() >= MAX_WAITING {
            return Err(format!(
                "{MAX_WAITING} role lookups already waiting on this core"
            ));
        }
        let answer: Answer = Rc::new(RefCell::new(None));
        self.wait_for(user, answer.clone());
        self.waiters.set(self.waiters.get() + 1);
        let _counted = Waiter(self);
        let timeout = Duration::from_millis(self.cfg.auth_lookup_timeout_ms);
        let got = futures_lite::future::or(
            async {
                loop {
                    if let Some(r) = answer.borrow_mut().take() {
                        return Some(r);
                    }
                    if self.busy.get() {
                        self.free.notified().await;
                    } else if !self.run_batch().await {
                        // Nothing was waiting, yet we have no answer: never spin, ask again.
                        self.wait_for(user, answer.clone());
                    }
                }
            },
            async {
                glommio::timer::sleep(timeout).await;
                None
            },
        )
        .await;
        match got {
            Some(r) => r,
            None => {
                tracing::warn!(
                    timeout_ms = timeout.as_millis() as u64,
                    "role lookup timed out"
                );
                Err(format!(
                    "role lookup took longer than {} ms",
                    timeout.as_millis()
                ))
            }
        }
    }

    /// Queues `answer` for `user`'s next lookup (joining a waiting lookup of the same name).
    fn wait_for(&self, user: &str, answer: Answer) {
        let mut w = self.waiting.borrow_mut();
        match w.iter_mut().find(|(n, _)| n == user) {
            Some((_, answers)) => answers.push(answer),
            None => w.push((user.to_owned(), vec![answer])),
        }
    }

    /// A cached answer for a lookup key: a role found within `auth_cache_seconds`, an absent
    /// role within `auth_negative_cache_ms` (whatever the database).
    fn cached(&self, key: &str) -> Option<RoleInfo> {
        let ttl = Duration::from_secs(self.cfg.auth_cache_seconds);
        let generation = ROLE_SETTINGS_GENERATION.load(Ordering::Relaxed);
        if let Some((at, g, v)) = self.cache.borrow().get(key) {
            if at.elapsed() < ttl && *g == generation {
                return Some(v.clone());
            }
        }
        let negative = Duration::from_millis(self.cfg.auth_negative_cache_ms);
        match self.absent.borrow().get(user_of(key)) {
            Some(at) if at.elapsed() < negative => Some(RoleInfo::default()),
            _ => None,
        }
    }

    /// Takes the connection, looks up the names waiting longest (up to `BATCH`) in one query,
    /// and answers their waiters; `false` when nothing was waiting. Only called when no query
    /// runs. A timed-out caller that drops this future drops the connection with it; the
    /// guards give back the connection's turn and queue again the names not answered.
    async fn run_batch(&self) -> bool {
        // Waiters that gave up (timed out) left their slots behind: skipped, not asked for.
        let taken: Vec<(String, Vec<Answer>)> = {
            let mut w = self.waiting.borrow_mut();
            let mut taken = Vec::new();
            while taken.is_empty() && !w.is_empty() {
                let n = w.len().min(BATCH);
                taken = w
                    .drain(..n)
                    .filter_map(|(name, mut answers)| {
                        answers.retain(|a| Rc::strong_count(a) > 1);
                        (!answers.is_empty()).then_some((name, answers))
                    })
                    .collect();
            }
            taken
        };
        if taken.is_empty() {
            return false;
        }
        let _turn = Turn::take(self);
        let mut batch = Unanswered(self, taken);
        let keys: Vec<&str> = batch.1.iter().map(|(n, _)| n.as_str()).collect();
        let generation = ROLE_SETTINGS_GENERATION.load(Ordering::Relaxed);
        let result = self.lookup_uncached(&keys).await;
        let now = Instant::now();
        for (name, answers) in std::mem::take(&mut batch.1) {
            let r = match &result {
                Ok(found) => {
                    let v = found.get(&name).cloned().unwrap_or_default();
                    if admissible(&v) {
                        let mut c = self.cache.borrow_mut();
                        if c.len() >= MAX_CACHED {
                            c.clear();
                        }
                        c.insert(name.clone(), (now, generation, v.clone()));
                    } else if !v.exists && self.cfg.auth_negative_cache_ms > 0 {
                        let mut a = self.absent.borrow_mut();
                        if a.len() >= MAX_CACHED {
                            a.clear();
                        }
                        a.insert(user_of(&name).to_owned(), now);
                    }
                    Ok(v)
                }
                Err(e) => Err(e.clone()),
            };
            for a in answers {
                *a.borrow_mut() = Some(r.clone());
            }
        }
        true
    }

    /// What Postgres checks at login of each (role, database) among `keys`, in one query: the
    /// role's verifier and expiry (`CheckPasswordAuth`), `rolcanlogin` and `rolconnlimit`
    /// (`InitializeSessionUserId`), `datallowconn`, the CONNECT privilege and `datconnlimit`
    /// (`CheckMyDatabase`), and the roles it is a member of for `+group` rules (following
    /// `pg_auth_members` as `is_member_of_role_nosuper` does: a superuser is not a member of
    /// everything), whether one of them is a superuser, and its oid (who may signal whom,
    /// gateway/src/signals.rs). Only existing roles get a row.
    async fn lookup_uncached(&self, keys: &[&str]) -> Result<HashMap<String, RoleInfo>, String> {
        let users: Vec<String> = keys.iter().map(|k| literal(user_of(k))).collect();
        let dbs: Vec<String> = keys.iter().map(|k| literal(database_of(k))).collect();
        let sql = format!(
            "SELECT q.u, q.d, a.rolcanlogin::text, a.rolsuper::text, \
               (a.rolvaliduntil IS NOT NULL AND a.rolvaliduntil < pg_catalog.now())::text, \
               a.rolconnlimit::text, a.rolpassword, d.datallowconn::text, \
               CASE WHEN d.oid IS NOT NULL \
                 THEN pg_catalog.has_database_privilege(a.oid, d.oid, 'CONNECT')::text END, \
               d.datconnlimit::text, \
               (WITH RECURSIVE m(id) AS (SELECT a.oid UNION \
                  SELECT am.roleid FROM pg_catalog.pg_auth_members am JOIN m ON am.member = m.id) \
                SELECT pg_catalog.string_agg(pg_catalog.octet_length(r.rolname) || ':' || r.rolname, '') \
                  || ';' || pg_catalog.bool_or(r.rolsuper)::text \
                FROM m JOIN pg_catalog.pg_authid r ON r.oid = m.id), \
               a.oid::text \
             FROM ROWS FROM (pg_catalog.unnest(ARRAY[{}]::text[]), \
               pg_catalog.unnest(ARRAY[{}]::text[])) AS q(u, d) \
             JOIN pg_catalog.pg_authid a ON a.rolname = q.u \
             LEFT JOIN pg_catalog.pg_database d ON d.datname = q.d",
            users.join(", "),
            dbs.join(", ")
        );
        let rows = self.run_unlocked(&sql).await?;
        let mut found = HashMap::new();
        let yes = |r: &Row, i| matches!(col(r, i), Some("true" | "t"));
        let int = |r: &Row, i| col(r, i).and_then(|v| v.parse().ok()).unwrap_or(-1);
        for r in &rows {
            let (Some(user), Some(db)) = (col(r, 0), col(r, 1)) else {
                continue;
            };
            let info = RoleInfo {
                exists: true,
                can_login: yes(r, 2),
                superuser: yes(r, 3),
                expired: yes(r, 4),
                conn_limit: int(r, 5),
                password: col(r, 6).map(str::to_owned),
                database: col(r, 7).map(|_| shared::role::DatabaseInfo {
                    allow_connections: yes(r, 7),
                    connect: yes(r, 8),
                    conn_limit: int(r, 9),
                }),
                // `groups;superuser-among-them` (a role name may hold `;`: the last one splits).
                member_of: col(r, 10)
                    .map(|m| names(m.rsplit_once(';').map_or(m, |(g, _)| g)))
                    .unwrap_or_default(),
                member_of_superuser: col(r, 10)
                    .and_then(|m| m.rsplit_once(';'))
                    .is_some_and(|(_, s)| matches!(s, "true" | "t")),
                oid: col(r, 11).and_then(|v| v.parse().ok()).unwrap_or(0),
            };
            found.insert(key(user, db), info);
        }
        Ok(found)
    }

    /// Runs `sql` when no other query of this core is running, waiting included within
    /// `auth_lookup_timeout_ms`: a query that blocks (a lock on a catalog) must not hold the
    /// connection's turn, and every role lookup behind it, for longer.
    async fn run(&self, sql: &str) -> Result<Vec<Row>, String> {
        let timeout = Duration::from_millis(self.cfg.auth_lookup_timeout_ms);
        futures_lite::future::or(
            async {
                while self.busy.get() {
                    self.free.notified().await;
                }
                let _turn = Turn::take(self);
                self.run_unlocked(sql).await
            },
            async {
                glommio::timer::sleep(timeout).await;
                Err(format!(
                    "admin query took longer than {} ms",
                    timeout.as_millis()
                ))
            },
        )
        .await
    }

    async fn run_unlocked(&self, sql: &str) -> Result<Vec<Row>, String> {
        // One retry on a fresh connection: the old one may have died with a Postgres restart.
        for attempt in 0..2 {
            if self.conn.borrow().is_none() {
                *self.conn.borrow_mut() = Some(self.connect().await?);
            }
            let Some((mut stream, mut reader)) = self.conn.borrow_mut().take() else {
                continue;
            };
            match query(&mut stream, &mut reader, sql, self.cfg.max_message_size).await {
                Ok(r) => {
                    *self.conn.borrow_mut() = Some((stream, reader));
                    return Ok(r);
                }
                Err(e) if attempt == 1 => return Err(e),
                Err(_) => {}
            }
        }
        Err("admin connection failed".into())
    }

    async fn connect(&self) -> Result<(UnixStream, MessageReader), String> {
        let path = format!(
            "{}/.s.PGSQL.{}",
            self.cfg.admin_socket_dir, self.cfg.pg_port
        );
        let mut stream = UnixStream::connect(&path)
            .await
            .map_err(|e| format!("admin connection to {path}: {e}"))?;
        let logged = login::login(
            &mut stream,
            &self.cfg.admin_user,
            "postgres",
            &Credential::None,
            self.cfg.max_message_size,
        )
        .await
        .map_err(|e| match e {
            login::LoginError::Postgres(m) => format!(
                "admin login as {} refused: {}",
                self.cfg.admin_user,
                String::from_utf8_lossy(&m)
            ),
            login::LoginError::Other(s) => s,
            login::LoginError::WaitTimeout => "query_wait_timeout".into(),
        })?;
        let mut reader = MessageReader::new(1024);
        reader.push_bytes(&logged.leftover);
        Ok((stream, reader))
    }
}

/// The admin connection's turn, held while a query runs; given back when dropped, also when
/// the query's future is dropped half-way (a timed-out lookup), so no waiter waits forever.
struct Turn<'a>(&'a Admin);

impl<'a> Turn<'a> {
    fn take(admin: &'a Admin) -> Turn<'a> {
        debug_assert!(!admin.busy.get());
        admin.busy.set(true);
        Turn(admin)
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        self.0.busy.set(false);
        self.0.free.notify();
    }
}

/// Names taken for a query that did not finish (its future was dropped): queued again for
/// the waiters still there, so none of them waits for an answer that never comes.
struct Unanswered<'a>(&'a Admin, Vec<(String, Vec<Answer>)>);

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        for (name, answers) in std::mem::take(&mut self.1) {
            for a in answers {
                // Held elsewhere: a waiter is still there.
                if Rc::strong_count(&a) > 1 {
                    self.0.wait_for(&name, a);
                }
            }
        }
    }
}

/// Counts a waiting lookup for `MAX_WAITING` until it ends, however it ends.
struct Waiter<'a>(&'a Admin);

impl Drop for Waiter<'_> {
    fn drop(&mut self) {
        self.0.waiters.set(self.0.waiters.get().saturating_sub(1));
    }
}

/// Only answers that let the client in are cached: a refusal (no such database yet, NOLOGIN,
/// no CONNECT) is asked again at the next login, so a `CREATE DATABASE` or a `GRANT` takes
/// effect at once; a revocation within `auth_cache_seconds` (at once when this pooler saw the
/// `ALTER ROLE|DATABASE`).
fn admissible(v: &RoleInfo) -> bool {
    v.exists
        && v.can_login
        && v.database
            .as_ref()
            .is_some_and(|d| d.allow_connections && d.connect)
}

/// A lookup's key: `user` NUL `database` (neither holds a NUL: Postgres names cannot).
fn key(user: &str, database: &str) -> String {
    format!("{user}\0{database}")
}

fn user_of(key: &str) -> &str {
    key.split('\0').next().unwrap_or(key)
}

fn database_of(key: &str) -> &str {
    key.split_once('\0').map_or("", |(_, d)| d)
}

/// Names from `string_agg(octet_length(n) || ':' || n, '')`.
fn names(mut s: &str) -> Vec<String> {
    let mut out = Vec::new();
    while let Some((len, rest)) = s.split_once(':') {
        let Some(name) = len.parse().ok().and_then(|n: usize| rest.get(..n)) else {
            break;
        };
        out.push(name.to_owned());
        s = &rest[name.len()..];
    }
    out
}

fn col(row: &Row, i: usize) -> Option<&str> {
    row.get(i).and_then(|c| c.as_deref())
}

/// Runs a simple query on a connection that is idle and returns its rows as text.
pub async fn query<S>(
    stream: &mut S,
    reader: &mut MessageReader,
    sql: &str,
    max: usize,
) -> Result<Vec<Row>, String>
where
    S: futures_lite::AsyncRead + futures_lite::AsyncWrite + Unpin,
{
    let mut q = Vec::new();
    frontend::query(&mut q, sql);
    stream.write_all(&q).await.map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    let mut error = None;
    loop {
        let n = match typed_message_len(reader.data(), max) {
            Ok(Some(n)) => n,
            Ok(None) => {
                if reader.fill(stream, 0).await.map_err(|e| e.to_string())? == 0 {
                    return Err("connection closed".into());
                }
                continue;
            }
            Err(e) => return Err(e.to_string()),
        };
        let msg = reader.data()[..n].to_vec();
        reader.consume(n);
        match msg[0] {
            be::DATA_ROW => rows.push(data_row(&msg[5..]).ok_or("malformed data row")?),
            be::ERROR_RESPONSE => error = Some(String::from_utf8_lossy(&msg[5..]).into_owned()),
            be::READY_FOR_QUERY => {
                return match error {
                    Some(e) => Err(e),
                    None => Ok(rows),
                }
            }
            _ => {}
        }
    }
}

fn data_row(body: &[u8]) -> Option<Row> {
    let mut pos = 0;
    let n = read_i16(body, &mut pos).ok()?;
    let mut row = Vec::with_capacity(n.max(0) as usize);
    for _ in 0..n {
        let len = read_i32(body, &mut pos).ok()?;
        if len < 0 {
            row.push(None);
            continue;
        }
        let v = body.get(pos..pos + len as usize)?;
        pos += len as usize;
        row.push(Some(String::from_utf8_lossy(v).into_owned()));
    }
    Some(row)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_rows() {
        // Two columns: 'a=1' and NULL.
        let mut body = 2i16.to_be_bytes().to_vec();
        body.extend_from_slice(&3i32.to_be_bytes());
        body.extend_from_slice(b"a=1");
        body.extend_from_slice(&(-1i32).to_be_bytes());
        let row = data_row(&body).unwrap();
        assert_eq!(row, vec![Some("a=1".to_owned()), None]);
        assert_eq!(col(&row, 0), Some("a=1"));
        assert_eq!(col(&row, 1), None);
        assert_eq!(col(&row, 2), None);
        // Truncated: a column longer than the message.
        assert!(data_row(&body[..8]).is_none());
    }

    #[test]
    fn member_names_and_keys() {
        assert_eq!(names("5:alice7:rea:ers0:"), vec!["alice", "rea:ers", ""]);
        assert_eq!(names("6:h\u{e9}llo"), vec!["h\u{e9}llo"]);
        assert_eq!(names("9:short"), Vec::<String>::new());
        let k = key("bob", "app");
        assert_eq!((user_of(&k), database_of(&k)), ("bob", "app"));
    }
}
