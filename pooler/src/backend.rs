//! A real Postgres connection and its relay task.
//!
//! Every frontend message the pooler writes to a backend pushes an [`Entry`] saying what its
//! responses are and what to do with them: forward them to the owning session, drop them (our own
//! injected `Parse` or settings query), or emit a response ourselves at that point of the stream
//! (a `ParseComplete` for a statement the backend already has). The relay reads backend messages
//! and walks the queue, so the client sees exactly the stream Postgres would have sent it.
//! The relay keeps reading while the backend is idle, so a backend that dies or is shut down is
//! noticed and dropped at once, not handed to the next session.

use crate::core::Core;
use crate::login::{self, LoginError};
use crate::pool::{self, Pool};
use crate::session::Session;
use glommio::net::TcpStream;
use shared::io::{MessageReader, OutQueue, RcStream, Slot};
use shared::link::Credential;
use shared::protocol::backend as be;
use shared::protocol::{frontend, put_message, typed_message_len};
use shared::settings::Settings;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::Duration;

/// Bytes a session may have in flight towards its gateway before the relay stops reading.
pub const WINDOW: usize = 256 * 1024;

/// The query that reads a session's settings back from its backend.
/// `role` is not in `pg_settings` (GUC_NO_SHOW_ALL), so it is read on its own; `none` means
/// not set.
const SNAPSHOT_SQL: &str =
    "SELECT name, pg_catalog.current_setting(name) FROM pg_catalog.pg_settings \
     WHERE source = 'session' UNION ALL SELECT 'role', pg_catalog.current_setting('role') \
     WHERE pg_catalog.current_setting('role') <> 'none'";

/// The read-back query for a session: `pg_settings` and `role`, plus the custom settings
/// (placeholders, which `pg_settings` hides) it has or may have set.
fn snapshot_sql(s: &Session, channels_only: bool) -> String {
    if channels_only {
        return format!(
            "SELECT {}, c FROM pg_catalog.pg_listening_channels() AS c",
            shared::settings::literal(crate::listen::MARKER)
        );
    }
    // The gateway's watch list: custom setting names, and (as `name(`) functions the session
    // called that are not built-in, whose bodies may set custom settings by name. A body is
    // read once per session (then `name()` marks it read); the names found join the list.
    let (functions, mut names) = {
        let mut watch = s.watch.borrow_mut();
        let mut functions = Vec::new();
        let mut names = Vec::new();
        for n in watch.iter() {
            if n.ends_with("()") {
                continue;
            } else if n.ends_with('(') {
                let read = format!("{n})");
                if !watch.contains(&read) {
                    functions.push(n.clone());
                }
            } else {
                names.push(n.clone());
            }
        }
        for f in &functions {
            watch.push(format!("{f})"));
        }
        (functions, names)
    };
    for (k, _) in s.settings.borrow().iter() {
        if k.contains('.') && !names.iter().any(|n| n == k) {
            names.push(k.to_owned());
        }
    }
    // The channels the backend listens on: always with the settings (a user function may run
    // LISTEN; `pg_listening_channels()` costs next to nothing beside `pg_settings`).
    let channels = {
        format!(
            " UNION ALL SELECT {}, c FROM pg_catalog.pg_listening_channels() AS c",
            shared::settings::literal(crate::listen::MARKER)
        )
    };
    let bodies = function_bodies_sql(&functions);
    if names.is_empty() {
        return format!("{SNAPSHOT_SQL}{bodies}{channels}");
    }
    let list: Vec<String> = names.iter().map(|n| shared::settings::literal(n)).collect();
    format!(
        "{SNAPSHOT_SQL} UNION ALL SELECT n, pg_catalog.current_setting(n, true) \
         FROM pg_catalog.unnest(ARRAY[{}]::text[]) AS n \
         WHERE pg_catalog.current_setting(n, true) IS NOT NULL{bodies}{channels}",
        list.join(", ")
    )
}

/// First column of the read-back rows that carry a custom setting name found in a function
/// body (a name with a space cannot be a setting's).
const BODY_MARKER: &str = "tidepool body";

/// Custom settings (`x.y`) named in the bodies of the functions a session called, and of the
/// functions those call (by name, three levels deep): `pg_settings` hides custom settings, so
/// their names must come from text, and `set_config('app.tenant', …)` inside a function is not
/// in the calling statement's text. Each name comes back twice: as `(BODY_MARKER, name)`, to be
/// watched from then on, and with its value if it has one. Only procedural and SQL bodies
/// (`prolang` not internal 12 or C 13); the names are looked up by `pg_proc`'s name index. The
/// patterns avoid backslashes, so `standard_conforming_strings` does not matter. Costly
/// (regular expressions over bodies): once per session and function.
fn function_bodies_sql(functions: &[String]) -> String {
    if functions.is_empty() {
        return String::new();
    }
    let list: Vec<String> = functions
        .iter()
        .map(|f| shared::settings::literal(f.trim_end_matches('(')))
        .collect();
    format!(
        " UNION ALL SELECT x.k, x.v FROM (\
         WITH RECURSIVE f(src, d) AS (\
         SELECT p.prosrc, 0 FROM pg_catalog.pg_proc p \
         WHERE p.proname = ANY (ARRAY[{}]::pg_catalog.name[]) AND p.prolang NOT IN (12, 13) \
         UNION SELECT p.prosrc, f.d + 1 FROM f, \
         pg_catalog.regexp_matches(f.src, '([A-Za-z_][A-Za-z0-9_$]*)[[:space:]]*[(]', 'g') AS m(a), \
         pg_catalog.pg_proc p WHERE f.d < 3 \
         AND p.proname = pg_catalog.lower(m.a[1])::pg_catalog.name \
         AND p.pronamespace <> 'pg_catalog'::pg_catalog.regnamespace \
         AND p.prolang NOT IN (12, 13)) \
         SELECT DISTINCT pg_catalog.lower(m.a[1]) AS n FROM f, pg_catalog.regexp_matches(f.src, \
         '([A-Za-z_][A-Za-z0-9_$]*[.][A-Za-z_][A-Za-z0-9_$]*)', 'g') AS m(a)) AS b, \
         LATERAL (VALUES ({}, b.n), (b.n, pg_catalog.current_setting(b.n, true))) AS x(k, v) \
         WHERE x.v IS NOT NULL",
        list.join(", "),
        shared::settings::literal(BODY_MARKER)
    )
}

/// The settings a new backend got at login from `ALTER ROLE|DATABASE … SET` that its role may
/// change itself (others stay as the login left them), read from the backend itself so they are
/// exactly what it has. `pg_settings` hides custom placeholders (`app.tenant`): those are read by
/// the names `pg_db_role_setting` holds for this role and database.
fn login_settings_sql() -> String {
    format!(
        "SELECT name, pg_catalog.current_setting(name) FROM pg_catalog.pg_settings \
         WHERE source IN ({}) AND (context = 'user' OR (context = 'superuser' \
           AND pg_catalog.has_parameter_privilege(name, 'SET'))) \
         UNION ALL SELECT n, pg_catalog.current_setting(n, true) FROM \
           (SELECT DISTINCT pg_catalog.lower(pg_catalog.split_part(c, '=', 1)) AS n \
            FROM pg_catalog.pg_db_role_setting s, pg_catalog.unnest(s.setconfig) AS c \
            WHERE s.setdatabase IN (0, (SELECT oid FROM pg_catalog.pg_database \
                WHERE datname = pg_catalog.current_database())) \
              AND s.setrole IN (0, (SELECT oid FROM pg_catalog.pg_roles \
                WHERE rolname = session_user))) AS x \
         WHERE n LIKE '%.%' AND pg_catalog.current_setting(n, true) IS NOT NULL",
        crate::admin::LOGIN_SOURCES
    )
}

/// The statements a backend has prepared, bounded: the least recently used is closed when a new
/// one would pass the limit.
#[derive(Default)]
pub struct Prepared {
    used: HashMap<Rc<[u8]>, u64>,
    tick: u64,
}

impl Prepared {
    /// Has it (and counts this as a use).
    pub fn touch(&mut self, name: &Rc<[u8]>) -> bool {
        self.tick += 1;
        match self.used.get_mut(name) {
            Some(t) => {
                *t = self.tick;
                true
            }
            None => false,
        }
    }

    pub fn insert(&mut self, name: Rc<[u8]>) {
        self.tick += 1;
        self.used.insert(name, self.tick);
    }

    pub fn remove(&mut self, name: &[u8]) {
        self.used.remove(name);
    }

    pub fn clear(&mut self) {
        self.used.clear();
    }

    /// Has it (not counted as a use).
    pub fn contains(&self, name: &[u8]) -> bool {
        self.used.contains_key(name)
    }

    /// The least recently used statement other than `keep`, if there are more than `limit`.
    fn over(&self, limit: usize, keep: &[u8]) -> Option<Rc<[u8]>> {
        if self.used.len() <= limit {
            return None;
        }
        self.used
            .iter()
            .filter(|(n, _)| &***n != keep)
            .min_by_key(|(_, t)| **t)
            .map(|(n, _)| n.clone())
    }
}

/// A prepared statement, named on backends by its content: made by a protocol-level `Parse` or
/// by SQL `PREPARE` (one namespace per session, as in Postgres).
pub struct Stmt {
    /// `tp_` + hash of (query, parameter types): equal statements share one name everywhere.
    pub content: Rc<[u8]>,
    /// The whole `Parse` message under the content name, ready to inject.
    pub parse: Vec<u8>,
    /// Postgres has accepted it (somewhere on this core): a client's `Parse` of it can be
    /// answered without a backend.
    pub validated: std::cell::Cell<bool>,
    /// Made by SQL `PREPARE`.
    pub sql: Option<Box<SqlDef>>,
}

/// A statement made by SQL `PREPARE`.
pub struct SqlDef {
    /// `PREPARE <content> ...`: makes it on a backend.
    pub prepare: Box<[u8]>,
    /// The client's whole query text, as `pg_prepared_statements.statement` shows it.
    pub source: Box<[u8]>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A `Parse` passed through as it is (malformed: Postgres will refuse it).
    Parse,
    Bind,
    Describe,
    Execute,
    Close,
    Sync,
    Query,
    FunctionCall,
}

pub type Done = Rc<Slot<Result<(), Vec<u8>>>>;

pub enum Internal {
    /// Bring the backend to the owner's settings. `forward`: pass `ParameterStatus` on to the
    /// client; `then_rfq`: send the `ReadyForQuery` held back for this; `done`: tell a waiter;
    /// `to`: the backend's settings once it is done.
    Sync {
        forward: bool,
        then_rfq: bool,
        done: Option<Done>,
        to: Rc<Settings>,
    },
    /// Close statements found stale (their table changed), then Sync.
    Forget,
    /// Read the session's settings back; `held_rfq`: the client's `ReadyForQuery` waits for it.
    /// `channels_only`: only `pg_listening_channels()` was read (listen.rs).
    Snapshot { held_rfq: bool, channels_only: bool },
    /// Roll back after the owner left, then return the backend to its pool.
    Cleanup,
    /// `LISTEN` on the owner's channels, or `UNLISTEN *` before the pool (listen.rs).
    Listen,
    /// `DISCARD SEQUENCES` ahead of a session's first `currval`/`lastval`: the sequence state
    /// another session left here is not this session's.
    DiscardSequences,
    /// `PREPARE`/`DEALLOCATE` of a real-name copy (`sql_names::real_names`): answer dropped;
    /// an error (an aborted transaction, a name the backend already has) leaves it as it was.
    RealName,
    /// Our own statement made (`made`) or deallocated before a client's `Query` that needs it;
    /// if it fails, the backend's set is put right and the client's statement reports.
    Inject { content: Rc<[u8]>, made: bool },
    /// Reads the OID of `pg_catalog.pg_prepared_statements` (`State::view_oid`).
    ViewOid,
}

pub enum Entry {
    Client(Kind),
    /// Our own `Close` of an evicted statement: its `CloseComplete` is dropped.
    Evicted,
    /// A client's `Bind`/`Describe` of a statement we renamed: (backend name, client name), to
    /// put the client's name back into errors.
    Renamed(Kind, Rc<[u8]>, Rc<[u8]>),
    Parse {
        stmt: Rc<Stmt>,
        /// The client's own Parse (its ParseComplete is forwarded) or one we injected.
        injected: bool,
        /// Statement name as the client knows it (None: the unnamed statement).
        client_name: Option<Vec<u8>>,
    },
    /// A response we produce at this point of the stream.
    Synth(Vec<u8>),
    /// An error we raise at this point; Postgres would then skip to `Sync`.
    SynthError(Vec<u8>),
    Internal(Internal),
    /// A client's `Query` with statement names replaced.
    Sql(Box<crate::sql_names::SqlQuery>),
}

pub struct State {
    pub queue: VecDeque<Entry>,
    pub owner: Option<Rc<Session>>,
    /// The settings that differ from what the backend had before any role or database default
    /// (its login defaults, then what we or its sessions set), as `set_config` would set them.
    pub settings: Rc<Settings>,
    /// What it logged in with from `ALTER ROLE|DATABASE … SET` (see [`login_settings_sql`]):
    /// `RESET` returns to these, so a session without such a default gets the server's value
    /// (`server`) set explicitly instead.
    login: Rc<Settings>,
    /// The server's value (no role or database default) of each of `login`'s settings, where
    /// known (see `Admin::server_defaults`).
    server: Settings,
    /// An `ALTER ROLE|DATABASE` completed in the open transaction: role defaults change again
    /// for new sessions when it ends.
    roles_changed: bool,
    /// Statements this backend has, with when each was last used (for eviction).
    pub prepared: Prepared,
    pub unnamed: Option<Rc<Stmt>>,
    pub status: u8,
    pub reported: Vec<(String, String)>,
    /// After an error in an extended-protocol batch: Postgres ignores messages until `Sync`.
    pub skipping: bool,
    pub broken: bool,
    /// Statements whose plan Postgres refused (0A000 after the table changed): closed on this
    /// backend after the client's next Sync, so the next Parse really parses.
    stale: Vec<Rc<[u8]>>,
    snapshot: Settings,
    internal_error: Option<Vec<u8>>,
    /// It may listen on channels: `UNLISTEN *` before it goes back to its pool.
    pub listening: bool,
    /// The OID of `pg_catalog.pg_prepared_statements`, once read (see `fix_origins`).
    pub view_oid: Option<u32>,
    /// Copies of the owner's SQL-prepared statements under the client's own names (name, the
    /// statement's content name), for code Postgres runs itself (`sql_names::real_names`);
    /// deallocated before the backend goes back to its pool.
    pub real_names: Vec<(Vec<u8>, Rc<[u8]>)>,
}

pub struct Backend {
    pub id: u64,
    pub pool: Rc<Pool>,
    pub out: OutQueue,
    pub pid: i32,
    pub secret: i32,
    pub st: RefCell<State>,
    /// Its budget slot was given back.
    pub retired: std::cell::Cell<bool>,
    /// When it last went idle.
    pub idle_since: std::cell::Cell<Option<std::time::Instant>>,
    /// Closed to give its budget unit to this pool (fair share), when it ends.
    pub prefer: RefCell<Option<Rc<Pool>>>,
    /// Shed at another core's request: announce the freed unit when it ends.
    pub announce_freed: std::cell::Cell<bool>,
    /// Closed so that this pool's waiters on another core, which have no backend there, get its
    /// unit: announce it to them (and not to this core's waiters) when it ends.
    pub yield_to: RefCell<Option<crate::pool::PoolKey>>,
    /// The session that held it last: a session coming back to it finds its own state.
    pub last_owner: RefCell<std::rc::Weak<Session>>,
}

impl Backend {
    pub fn is_broken(&self) -> bool {
        self.st.borrow().broken
    }

    /// Closes the connection: nothing more is written, and the relay ends when Postgres hangs
    /// up. The caller retires the budget slot (see [`pool::retire`]).
    pub fn close(&self) {
        close_locked(self, &mut self.st.borrow_mut());
    }

    /// Writes `msg` and records how to treat its responses.
    pub fn send(&self, msg: &[u8], entry: Option<Entry>) {
        self.out.push(msg);
        if let Some(e) = entry {
            let mut st = self.st.borrow_mut();
            // After an error Postgres ignores everything up to Sync: expect nothing from it.
            if st.skipping && !matches!(e, Entry::Client(Kind::Sync)) {
                return;
            }
            st.queue.push_back(e);
        }
    }

    /// Records that the backend now has `content`, closing the least recently used statement if
    /// the backend has more than `limit`. Not while Postgres skips to Sync: it would ignore our
    /// Close and keep a statement we think is gone.
    pub fn add_prepared(&self, content: Rc<[u8]>, limit: usize) {
        let victim = {
            let mut st = self.st.borrow_mut();
            st.prepared.insert(content.clone());
            if st.skipping {
                return;
            }
            let v = st.prepared.over(limit, &content);
            if let Some(v) = &v {
                st.prepared.remove(v);
            }
            v
        };
        if let Some(v) = victim {
            let mut m = Vec::with_capacity(v.len() + 7);
            frontend::write_target(&mut m, frontend::CLOSE, b'S', &v);
            self.send(&m, Some(Entry::Evicted));
        }
    }

    /// Postgres is skipping to the next Sync after an error.
    pub fn skipping(&self) -> bool {
        self.st.borrow().skipping
    }

    /// Sends `SET`s that take this backend to `to`, if it is not there already.
    pub fn sync_settings(
        &self,
        to: &Rc<Settings>,
        forward: bool,
        then_rfq: bool,
        done: Option<Done>,
    ) -> bool {
        let (sql, to) = plan(&self.st.borrow(), to);
        let Some(sql) = sql else {
            self.st.borrow_mut().settings = to;
            return false;
        };
        let mut q = Vec::new();
        frontend::query(&mut q, &sql);
        self.send(
            &q,
            Some(Entry::Internal(Internal::Sync {
                forward,
                then_rfq,
                done,
                to,
            })),
        );
        true
    }

    /// Emits the synthetic responses now at the front of the queue.
    pub fn drain_synth(&self) {
        let mut st = self.st.borrow_mut();
        drain_synth(&mut st);
    }
}

/// The SQL that takes a backend to a session's settings `to` (`None`: it is there), and the
/// backend's settings afterwards. A setting the backend got at login from a role or database
/// default that `to` does not have is set to the server's value: `RESET` would give the login's.
fn plan(st: &State, to: &Rc<Settings>) -> (Option<String>, Rc<Settings>) {
    // Allocates only for a backend whose login defaults the session does not share (role
    // defaults changed between the two logins); otherwise `to` itself, and the pointer test
    // below answers most calls.
    let uncovered = st.login.iter().any(|(k, _)| to.get(k).is_none());
    let to = if uncovered {
        let mut t = (**to).clone();
        for (k, _) in st.login.iter() {
            if to.get(k).is_none() {
                if let Some(v) = st.server.get(k) {
                    t.set(k, v);
                }
            }
        }
        Rc::new(t)
    } else {
        to.clone()
    };
    if Rc::ptr_eq(&st.settings, &to) {
        return (None, to);
    }
    (Settings::diff_sql(&st.settings, &to), to)
}

fn drain_synth(st: &mut State) {
    loop {
        match st.queue.front() {
            Some(Entry::Synth(_)) => {
                if let Some(Entry::Synth(m)) = st.queue.pop_front() {
                    if !st.skipping {
                        forward(st, &m);
                    }
                }
            }
            Some(Entry::SynthError(_)) => {
                if let Some(Entry::SynthError(m)) = st.queue.pop_front() {
                    if !st.skipping {
                        forward(st, &m);
                        skip_to_sync(st);
                    }
                }
            }
            _ => return,
        }
    }
}

fn close_locked(b: &Backend, st: &mut State) {
    if !st.broken {
        st.broken = true;
        let mut t = Vec::new();
        put_message(&mut t, frontend::TERMINATE, |_| {});
        b.out.push(&t);
        b.out.close();
    }
}

/// Forwards the owner's `ReadyForQuery`. Before an `'I'`, the notifications held during the
/// transaction go first, as Postgres sends them; `quiet` (nothing more to come for this owner):
/// it may be held until the listener caught up (listen.rs).
fn forward_rfq(st: &State, rfq: &[u8], quiet: bool) {
    let Some(s) = &st.owner else {
        return;
    };
    if rfq.get(5) == Some(&b'I') {
        if quiet && crate::listen::hold_rfq(s, Some(rfq)) {
            return;
        }
        s.listen.take_notes(&mut s.out.borrow_mut());
    }
    forward(st, rfq);
}

#[inline]
fn forward(st: &State, msg: &[u8]) {
    if let Some(s) = &st.owner {
        s.out.borrow_mut().extend_from_slice(msg);
    }
}

/// Postgres skips to the next `Sync` after an error in an extended-protocol batch: so do the
/// responses we expect (and the ones we would have made up).
fn skip_to_sync(st: &mut State) {
    st.skipping = true;
    while let Some(front) = st.queue.front() {
        if matches!(front, Entry::Client(Kind::Sync)) {
            break;
        }
        if let Some(Entry::Parse {
            stmt, client_name, ..
        }) = st.queue.pop_front()
        {
            forget_failed_parse(st, &stmt, client_name.as_deref());
        }
    }
}

/// A Parse that did not happen: neither the backend nor the session has that statement.
fn forget_failed_parse(st: &mut State, stmt: &Rc<Stmt>, client_name: Option<&[u8]>) {
    st.prepared.remove(&stmt.content);
    if st.unnamed.as_ref().is_some_and(|u| Rc::ptr_eq(u, stmt)) {
        st.unnamed = None;
    }
    if let Some(s) = &st.owner {
        s.forget_statement(client_name, stmt);
    }
}

/// Connects and logs in a new backend of `pool` (the budget slot is already taken).
pub async fn connect(
    core: &Rc<Core>,
    pool: &Rc<Pool>,
    credential: &Credential,
) -> Result<Rc<Backend>, LoginError> {
    let cfg = &core.cfg;
    let addr = format!("{}:{}", cfg.pg_host, cfg.pg_port);
    let timeout = Duration::from_secs(cfg.connect_timeout_seconds);
    let connecting = async {
        let stream = TcpStream::connect(addr.as_str())
            .await
            .map_err(|e| LoginError::Other(format!("{addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        let mut stream = stream;
        let mut logged = login::login(
            &mut stream,
            &pool.key.user,
            &pool.key.database,
            credential,
            cfg.max_message_size,
        )
        .await?;
        let mut reader = MessageReader::new(1024);
        reader.push_bytes(&logged.leftover);
        let rows = crate::admin::query(
            &mut stream,
            &mut reader,
            &login_settings_sql(),
            cfg.max_message_size,
        )
        .await
        .map_err(|e| LoginError::Other(format!("reading login settings: {e}")))?;
        logged.leftover = reader.data().to_vec();
        let mut login = Settings::default();
        for row in rows {
            if let [Some(k), Some(v)] = &row[..] {
                login.set(k, v);
            }
        }
        Ok::<_, LoginError>((stream, logged, login))
    };
    let (stream, logged, login) = crate::with_timeout(timeout, connecting)
        .await
        .ok_or_else(|| LoginError::Other(format!("timed out connecting to {addr}")))??;
    let (login, server) = if login.is_empty() {
        (core.empty_settings.clone(), Settings::default())
    } else {
        let names: Vec<String> = login.iter().map(|(k, _)| k.to_owned()).collect();
        let server = core
            .admin
            .server_defaults(&names)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "reading the server's defaults failed");
                Settings::default()
            });
        (Rc::new(login), server)
    };
    let b = Rc::new(Backend {
        id: core.next_id(),
        pool: pool.clone(),
        out: OutQueue::new(1 << 20, 256 * 1024),
        pid: logged.pid,
        secret: logged.secret,
        st: RefCell::new(State {
            queue: VecDeque::new(),
            owner: None,
            settings: login.clone(),
            login,
            server,
            roles_changed: false,
            prepared: Prepared::default(),
            unnamed: None,
            status: b'I',
            reported: logged.params,
            skipping: false,
            broken: false,
            stale: Vec::new(),
            snapshot: Settings::default(),
            internal_error: None,
            listening: false,
            view_oid: None,
            real_names: Vec::new(),
        }),
        retired: std::cell::Cell::new(false),
        idle_since: std::cell::Cell::new(None),
        prefer: RefCell::new(None),
        announce_freed: std::cell::Cell::new(false),
        yield_to: RefCell::new(None),
        last_owner: RefCell::new(std::rc::Weak::new()),
    });
    tracing::debug!(backend = b.id, pid = b.pid, user = %pool.key.user, db = %pool.key.database, "backend connected");
    let stream = RcStream::new(stream);
    let writer = b.clone();
    let wstream = stream.clone();
    glommio::spawn_local(async move {
        let _ = writer.out.run_writer(wstream).await;
    })
    .detach();
    let relay_b = b.clone();
    let relay_core = core.clone();
    glommio::spawn_local(async move { relay(relay_core, relay_b, stream, logged.leftover).await })
        .detach();
    Ok(b)
}

enum After {
    Nothing,
    /// The owner is done with the backend: detach and return it to the pool.
    Release,
    /// A cleanup finished: the backend (no owner) goes back to the pool.
    ReturnOrphan,
}

async fn relay(core: Rc<Core>, b: Rc<Backend>, mut stream: RcStream<TcpStream>, leftover: Vec<u8>) {
    let max = core.cfg.max_message_size;
    let mut reader = MessageReader::new(8192);
    reader.push_bytes(&leftover);
    loop {
        let mut touched: Option<Rc<Session>> = None;
        loop {
            let data = reader.data();
            let n = match typed_message_len(data, max) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(backend = b.id, error = %e, "bad message from backend");
                    return backend_lost(&core, &b, touched);
                }
            };
            let after = {
                let mut st = b.st.borrow_mut();
                if let Some(o) = &st.owner {
                    if touched.as_ref().is_none_or(|t| !Rc::ptr_eq(t, o)) {
                        if let Some(t) = touched.take() {
                            t.flush();
                        }
                        touched = Some(o.clone());
                    }
                }
                on_message(&b, &mut st, &data[..n])
            };
            reader.consume(n);
            match after {
                After::Nothing => {}
                After::Release => {
                    if let Some(t) = touched.take() {
                        t.flush();
                    }
                    let owner = b.st.borrow_mut().owner.take();
                    if let Some(s) = owner {
                        s.backend.borrow_mut().take();
                    }
                    pool::release(&core, b.clone());
                }
                After::ReturnOrphan => pool::release(&core, b.clone()),
            }
        }
        if let Some(t) = touched.take() {
            t.flush();
            // Flow control: a slow client stops us reading its results, not anyone else's.
            while t.inflight.get() > WINDOW && !t.gone.get() {
                t.credit.notified().await;
            }
        }
        let want = shared::protocol::pending_message_len(reader.data()).unwrap_or(0);
        match reader.fill(&mut stream, want).await {
            Ok(0) | Err(_) => return backend_lost(&core, &b, None),
            Ok(_) => {}
        }
    }
}

fn backend_lost(core: &Rc<Core>, b: &Rc<Backend>, touched: Option<Rc<Session>>) {
    if let Some(t) = touched {
        t.flush();
    }
    let (owner, waiting) = {
        let mut st = b.st.borrow_mut();
        st.broken = true;
        // Whoever waits on one of our internal queries learns it failed.
        let waiting: Vec<Done> = st
            .queue
            .drain(..)
            .filter_map(|e| match e {
                Entry::Internal(Internal::Sync { done: Some(d), .. }) => Some(d),
                _ => None,
            })
            .collect();
        (st.owner.take(), waiting)
    };
    b.out.close();
    tracing::debug!(backend = b.id, "backend connection ended");
    for d in waiting {
        let mut e = Vec::new();
        be::error_response(
            &mut e,
            be::Severity::Fatal,
            "08006",
            "server closed the connection unexpectedly",
        );
        d.put(Err(e));
    }
    if let Some(s) = owner {
        s.backend.borrow_mut().take();
        s.backend_lost();
    }
    pool::retire(core, b);
}

/// Handles one backend message according to the front of the queue.
fn on_message(b: &Backend, st: &mut State, msg: &[u8]) -> After {
    let tag = msg[0];
    let body = &msg[5..];
    drain_synth(st);
    // Asynchronous messages can come at any time.
    match tag {
        be::PARAMETER_STATUS => {
            if let Ok((k, v)) = be::parse_parameter_status(body) {
                let (k, v) = (String::from_utf8_lossy(k), String::from_utf8_lossy(v));
                match st.reported.iter_mut().find(|(n, _)| *n == k) {
                    Some(e) => e.1 = v.into_owned(),
                    None => st.reported.push((k.into_owned(), v.into_owned())),
                }
            }
            let pass = match st.queue.front() {
                Some(Entry::Internal(Internal::Sync { forward, .. })) => *forward,
                Some(Entry::Internal(_)) => false,
                _ => true,
            };
            if let (Some(o), Some(front)) = (&st.owner, st.queue.front()) {
                if !matches!(front, Entry::Internal(_)) {
                    // A reported setting changed under a client's statement the gateway did not
                    // flag (set_config in a user function): read the settings back when the
                    // transaction ends, so they follow the session and stay off other sessions.
                    o.snapshot_pending.set(true);
                    o.listen.only.set(false);
                }
            }
            if pass {
                forward(st, msg);
            }
            return After::Nothing;
        }
        be::NOTICE_RESPONSE => {
            if !matches!(st.queue.front(), Some(Entry::Internal(_))) {
                forward(st, msg);
            }
            return After::Nothing;
        }
        be::NOTIFICATION_RESPONSE => {
            // Sessions hear notifications from the pooler's listener (listen.rs); a backend
            // listens only to mirror its owner's channels. One its owner's own transaction sent
            // (a trigger's pg_notify: nothing in the statement's text says so) must reach the
            // client before this transaction's ReadyForQuery, as directly: hold that for the
            // listener, as for a NOTIFY the gateway flagged.
            let mut pos = 0;
            if shared::protocol::read_i32(body, &mut pos).is_ok_and(|pid| pid == b.pid) {
                if let Some(o) = &st.owner {
                    o.listen.barrier.set(true);
                }
            }
            return After::Nothing;
        }
        _ => {}
    }
    let Some(front) = st.queue.front_mut() else {
        // Nothing expected: an idle backend being shut down (FATAL) or a protocol surprise.
        if tag == be::ERROR_RESPONSE {
            tracing::info!(backend = b.id, "idle backend got an error; closing it");
        }
        close_locked(b, st);
        return After::Nothing;
    };
    match front {
        Entry::Internal(internal) => {
            match tag {
                be::ERROR_RESPONSE => st.internal_error = Some(msg.to_vec()),
                be::DATA_ROW if matches!(internal, Internal::ViewOid) => {
                    let mut pos = 2;
                    let oid = shared::protocol::read_i32(body, &mut pos)
                        .ok()
                        .and_then(|len| body.get(pos..pos + len.max(0) as usize))
                        .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u32>().ok());
                    st.view_oid = oid;
                }
                be::DATA_ROW => {
                    if matches!(internal, Internal::Snapshot { .. }) {
                        if let Some((k, v)) = two_text_columns(body) {
                            match &st.owner {
                                Some(o) if k == crate::listen::MARKER => {
                                    o.listen.read.borrow_mut().push(v)
                                }
                                Some(o) if k == BODY_MARKER => {
                                    let mut w = o.watch.borrow_mut();
                                    if w.len() < 512 && !w.contains(&v) {
                                        w.push(v);
                                    }
                                }
                                _ => st.snapshot.set(&k, &v),
                            }
                        }
                    }
                }
                be::READY_FOR_QUERY => {
                    st.status = body.first().copied().unwrap_or(b'I');
                    let Some(Entry::Internal(internal)) = st.queue.pop_front() else {
                        return After::Nothing;
                    };
                    return internal_done(b, st, internal);
                }
                _ => {}
            }
            After::Nothing
        }
        Entry::Parse { injected, .. } => {
            let injected = *injected;
            match tag {
                be::PARSE_COMPLETE => {
                    if let Some(Entry::Parse { stmt, .. }) = st.queue.pop_front() {
                        stmt.validated.set(true);
                    }
                    if !injected {
                        forward(st, msg);
                    }
                }
                be::ERROR_RESPONSE => {
                    if let Some(Entry::Parse {
                        stmt, client_name, ..
                    }) = st.queue.pop_front()
                    {
                        forget_failed_parse(st, &stmt, client_name.as_deref());
                    }
                    forward(st, msg);
                    skip_to_sync(st);
                }
                _ => forward(st, msg),
            }
            drain_synth(st);
            After::Nothing
        }
        Entry::Evicted => {
            st.queue.pop_front();
            if tag == be::ERROR_RESPONSE {
                forward(st, msg);
                skip_to_sync(st);
            }
            drain_synth(st);
            After::Nothing
        }
        Entry::Renamed(_, from, to) if tag == be::ERROR_RESPONSE => {
            if be::error_sqlstate(body) == Some(&b"0A000"[..]) {
                // "cached plan must not change result type": this backend's statement is stale.
                let stale = from.clone();
                st.prepared.remove(&stale);
                if let Some(o) = &st.owner {
                    if let Some(stmt) = o.statements.borrow().get(&to[..]) {
                        stmt.validated.set(false);
                    }
                }
                if !st.stale.contains(&stale) {
                    st.stale.push(stale);
                }
            }
            let (from, to) = match st.queue.front() {
                Some(Entry::Renamed(_, f, t)) => (f.clone(), t.clone()),
                _ => return After::Nothing,
            };
            let mut renamed = Vec::with_capacity(msg.len());
            be::rename_in_error(&mut renamed, tag, body, &from, &to);
            st.queue.pop_front();
            forward(st, &renamed);
            skip_to_sync(st);
            drain_synth(st);
            After::Nothing
        }
        Entry::Sql(q) => {
            match tag {
                be::COMMAND_COMPLETE => {
                    q.completed += 1;
                    forward(st, msg);
                }
                be::ROW_DESCRIPTION if q.view => {
                    match st
                        .view_oid
                        .and_then(|oid| crate::sql_names::fix_origins(msg, oid))
                    {
                        Some(m) => forward(st, &m),
                        None => forward(st, msg),
                    }
                }
                be::ERROR_RESPONSE => {
                    let m = q.client_error(tag, body);
                    forward(st, &m);
                }
                be::READY_FOR_QUERY => {
                    if let Some(Entry::Sql(q)) = st.queue.pop_front() {
                        q.undo_incomplete(st);
                    }
                    st.status = body.first().copied().unwrap_or(b'I');
                    st.skipping = false;
                    return after_ready(b, st, msg);
                }
                _ => forward(st, msg),
            }
            After::Nothing
        }
        Entry::Client(kind) | Entry::Renamed(kind, ..) => {
            let kind = *kind;
            if tag == be::COMMAND_COMPLETE
                && (body.starts_with(b"ALTER ROLE") || body.starts_with(b"ALTER DATABASE"))
            {
                // Role or database defaults may have changed: sessions opened from now on read
                // them again (and again when the transaction ends, as it may commit then).
                crate::admin::role_settings_changed();
                st.roles_changed = true;
            }
            let done = match (kind, tag) {
                (Kind::Sync | Kind::Query | Kind::FunctionCall, be::READY_FOR_QUERY) => {
                    st.queue.pop_front();
                    st.status = body.first().copied().unwrap_or(b'I');
                    if st.roles_changed && st.status == b'I' {
                        st.roles_changed = false;
                        crate::admin::role_settings_changed();
                    }
                    st.skipping = false;
                    return after_ready(b, st, msg);
                }
                (Kind::Sync | Kind::Query | Kind::FunctionCall, _) => false,
                (_, be::ERROR_RESPONSE) => {
                    st.queue.pop_front();
                    forward(st, msg);
                    skip_to_sync(st);
                    drain_synth(st);
                    return After::Nothing;
                }
                (Kind::Bind, be::BIND_COMPLETE)
                | (Kind::Close, be::CLOSE_COMPLETE)
                | (Kind::Parse, be::PARSE_COMPLETE) => true,
                (Kind::Describe, be::ROW_DESCRIPTION | be::NO_DATA) => true,
                (
                    Kind::Execute,
                    be::COMMAND_COMPLETE | be::EMPTY_QUERY_RESPONSE | be::PORTAL_SUSPENDED,
                ) => true,
                _ => false,
            };
            if done {
                st.queue.pop_front();
            }
            forward(st, msg);
            if done {
                drain_synth(st);
            }
            After::Nothing
        }
        Entry::Synth(_) | Entry::SynthError(_) => After::Nothing,
    }
}

fn two_text_columns(body: &[u8]) -> Option<(String, String)> {
    let mut pos = 0;
    let n = shared::protocol::read_i16(body, &mut pos).ok()?;
    if n != 2 {
        return None;
    }
    let mut col = || -> Option<String> {
        let len = shared::protocol::read_i32(body, &mut pos).ok()?;
        if len < 0 {
            return None;
        }
        let v = body.get(pos..pos + len as usize)?;
        pos += len as usize;
        Some(String::from_utf8_lossy(v).into_owned())
    };
    Some((col()?, col()?))
}

/// The owner's `ReadyForQuery` arrived: forward it, or first read back settings it changed.
fn after_ready(b: &Backend, st: &mut State, rfq: &[u8]) -> After {
    let Some(s) = st.owner.clone() else {
        return After::Nothing;
    };
    if !st.stale.is_empty() {
        forward_rfq(st, rfq, false);
        let mut m = Vec::new();
        for name in std::mem::take(&mut st.stale) {
            frontend::write_target(&mut m, frontend::CLOSE, b'S', &name);
        }
        put_message(&mut m, frontend::SYNC, |_| {});
        b.out.push(&m);
        st.queue.push_back(Entry::Internal(Internal::Forget));
        return After::Nothing;
    }
    if !st.queue.is_empty() || s.writing.get() {
        forward_rfq(st, rfq, false);
        return After::Nothing;
    }
    if s.dealloc_pending.replace(false) {
        s.clear_statements();
        st.prepared.clear();
        st.unnamed = None;
    }
    let quiet = !s.open_batch.get() && st.status == b'I';
    if quiet && (s.snapshot_pending.get() || s.discard_pending.get()) {
        if s.discard_pending.replace(false) {
            // DISCARD ALL: prepared statements, temp tables, locks, LISTENs are gone.
            s.clear_statements();
            st.prepared.clear();
            st.unnamed = None;
            s.pinned.set(false);
        }
        // Hold the ReadyForQuery back until the settings are known, so the client's next
        // request cannot run before a RESET ALL's baseline is restored.
        start_snapshot(b, st, &s, true);
        return After::Nothing;
    }
    forward_rfq(st, rfq, quiet);
    if quiet && !s.keeps_backend() {
        After::Release
    } else {
        After::Nothing
    }
}

/// Reads the owner's settings back from the backend after a statement that may have changed them.
pub fn start_snapshot(b: &Backend, st: &mut State, s: &Rc<Session>, held_rfq: bool) {
    s.snapshot_pending.set(false);
    s.listen.read.borrow_mut().clear();
    let channels_only = s.listen.only.replace(false);
    let mut q = Vec::new();
    frontend::query(&mut q, &snapshot_sql(s, channels_only));
    st.snapshot = Settings::default();
    b.out.push(&q);
    st.queue.push_back(Entry::Internal(Internal::Snapshot {
        held_rfq,
        channels_only,
    }));
}

fn internal_done(b: &Backend, st: &mut State, internal: Internal) -> After {
    let error = st.internal_error.take();
    match internal {
        Internal::Snapshot {
            held_rfq,
            channels_only,
        } => {
            let Some(s) = st.owner.clone() else {
                return After::Nothing;
            };
            if let Some(e) = error {
                tracing::warn!(backend = b.id, "reading settings back failed");
                forward(st, &e);
                return release_held_rfq(st, &s, held_rfq);
            }
            // A flagged LISTEN/UNLISTEN, or channels that changed under a statement that was
            // not flagged (LISTEN inside a user function): the listener follows.
            let changed = {
                let mut read = s.listen.read.borrow_mut();
                read.sort();
                read.dedup();
                *read != *s.listen.channels.borrow()
            };
            if s.listen.dirty.replace(false) || changed {
                b.pool.listener.read_back(&s);
                // What the backend listens on now is known: no UNLISTEN * needed if nothing.
                st.listening = !s.listen.channels.borrow().is_empty();
            }
            if channels_only {
                return release_held_rfq(st, &s, held_rfq);
            }
            // The snapshot holds what was set in the session (source `session`); a setting it
            // reset is back at the backend's login value.
            let snap = Rc::new(std::mem::take(&mut st.snapshot));
            let desired = snap.overlay_on(&s.baseline.borrow());
            let target = if desired == *snap {
                snap.clone()
            } else {
                Rc::new(desired)
            };
            st.settings = if st.login.is_empty() {
                snap
            } else {
                Rc::new(snap.overlay_on(&st.login))
            };
            s.set_settings(target.clone());
            let (sql, to) = plan(st, &target);
            if let Some(sql) = sql {
                let mut q = Vec::new();
                frontend::query(&mut q, &sql);
                b.out.push(&q);
                st.queue.push_back(Entry::Internal(Internal::Sync {
                    forward: true,
                    then_rfq: held_rfq,
                    done: None,
                    to,
                }));
                return After::Nothing;
            }
            st.settings = to;
            release_held_rfq(st, &s, held_rfq)
        }
        Internal::Sync {
            then_rfq, done, to, ..
        } => {
            let owner = st.owner.clone();
            match error {
                Some(e) => match done {
                    Some(d) => d.put(Err(e)),
                    None => forward(st, &e),
                },
                None => {
                    st.settings = to;
                    if let Some(d) = done {
                        d.put(Ok(()));
                    }
                }
            }
            match owner {
                Some(s) => release_held_rfq(st, &s, then_rfq),
                None => After::Nothing,
            }
        }
        Internal::Forget => match st.owner.clone() {
            Some(s) => release_held_rfq(st, &s, false),
            None => After::Nothing,
        },
        Internal::Inject { content, made } => {
            if error.is_some() {
                if made {
                    st.prepared.remove(&content);
                } else {
                    st.prepared.insert(content);
                }
            }
            After::Nothing
        }
        Internal::ViewOid => After::Nothing,
        Internal::Listen => {
            if error.is_some() {
                tracing::warn!(backend = b.id, "LISTEN/UNLISTEN on a backend failed");
            }
            After::Nothing
        }
        Internal::RealName => {
            if error.is_some() {
                tracing::debug!(
                    backend = b.id,
                    "a real-name copy of a prepared statement failed"
                );
            }
            After::Nothing
        }
        Internal::DiscardSequences => {
            if error.is_some() {
                tracing::warn!(backend = b.id, "DISCARD SEQUENCES on a backend failed");
            }
            After::Nothing
        }
        Internal::Cleanup => {
            if error.is_some() {
                close_locked(b, st);
            }
            After::ReturnOrphan
        }
    }
}

fn release_held_rfq(st: &mut State, s: &Rc<Session>, held: bool) -> After {
    let quiet = st.queue.is_empty() && !s.writing.get() && !s.open_batch.get() && st.status == b'I';
    if held {
        let mut rfq = Vec::new();
        be::ready_for_query(&mut rfq, st.status);
        forward_rfq(st, &rfq, quiet);
    } else if quiet {
        crate::listen::hold_rfq(s, None);
    }
    if quiet && !s.keeps_backend() && !s.snapshot_pending.get() {
        After::Release
    } else {
        After::Nothing
    }
}
