//! A real Postgres connection and its relay task.
//!
//! The relay reads backend messages and hands each to the response state machine
//! (`responses.rs`), then acts on what it says: the owner is done with the backend, or a cleanup
//! finished. It keeps reading while the backend is idle, so a backend that dies or is shut down
//! is noticed and dropped at once, not handed to the next session.
//!
//! A backend knows its pool only as a type parameter and a [`Home`] (pool.rs implements it): it
//! gives itself back there when free, and is retired there when its connection ends. Static
//! dispatch: the relay is compiled for the one pool type, nothing is looked up per request.

use crate::admin::Admin;
use crate::budget::PoolKey;
use crate::config::Config;
use crate::login::{self, LoginError};
use crate::responses::{self, After, Done, Entry, Internal, Kind, Owner, State};
use crate::server_tls::Opened;
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use shared::io::{MessageReader, OutQueue, RcStream};
use shared::link::Credential;
use shared::protocol::backend as be;
use shared::protocol::{frontend, typed_message_len};
use shared::settings::Settings;
use std::cell::{Cell, RefCell};
use std::rc::{Rc, Weak};
use std::time::Duration;

/// Where a backend belongs (its core's pools, pool.rs): told by the relay when the backend's
/// owner is done with it and when its connection ended.
pub trait Home: 'static {
    /// The pool a backend is of.
    type Pool: 'static;
    /// Nobody owns `b` any more (`ReadyForQuery 'I'` with nothing pinning it, or an orphan's
    /// cleanup finished).
    fn release(self: &Rc<Self>, b: Rc<Backend<Self::Pool>>);
    /// `b`'s connection ended: its budget unit is free again.
    fn retire(self: &Rc<Self>, b: &Rc<Backend<Self::Pool>>);
}

/// What opening a backend needs of its core, besides the pool (pool.rs holds one per core).
pub struct Setup {
    /// The config the process started with (Postgres's address, TLS, message size).
    pub cfg: Rc<Config>,
    /// For the server's defaults of the settings a login brought.
    pub admin: Rc<Admin>,
    /// Shared by every backend whose login brought no settings.
    pub empty_settings: Rc<Settings>,
    /// The next backend id on this core.
    next_id: Cell<u64>,
}

impl Setup {
    pub fn new(cfg: Rc<Config>, admin: Rc<Admin>) -> Setup {
        Setup {
            cfg,
            admin,
            empty_settings: Rc::new(Settings::default()),
            next_id: Cell::new(1),
        }
    }

    fn next_id(&self) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        id
    }
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
/// One Postgres connection of pool `P`. The fields from `retired` to `yield_to` are the pool's
/// bookkeeping (pool.rs).
pub struct Backend<P> {
    pub id: u64,
    pub pool: Rc<P>,
    pub out: OutQueue,
    pub pid: i32,
    pub secret: i32,
    pub st: RefCell<State>,
    /// Its budget slot was given back.
    pub retired: std::cell::Cell<bool>,
    /// When it last went idle.
    pub idle_since: std::cell::Cell<Option<std::time::Instant>>,
    /// When it logged in (`server_lifetime_ms` counts from here).
    pub created: std::time::Instant,
    /// Closed to give its budget unit to this pool (fair share), when it ends.
    pub prefer: RefCell<Option<Rc<P>>>,
    /// Shed at another core's request: announce the freed unit when it ends.
    pub announce_freed: std::cell::Cell<bool>,
    /// Closed so that this pool's waiters on another core, which have no backend there, get its
    /// unit: announce it to them (and not to this core's waiters) when it ends.
    pub yield_to: RefCell<Option<PoolKey>>,
    /// The session that held it last: a session coming back to it finds its own state.
    pub last_owner: RefCell<Option<Weak<dyn Owner>>>,
    /// What SHOW SERVERS shows of it, while it lives (servers.rs).
    pub shown: crate::servers::Shown,
}

impl<P> Backend<P> {
    pub fn is_broken(&self) -> bool {
        self.st.borrow().broken
    }

    /// Closes the connection: nothing more is written, and the relay ends when Postgres hangs
    /// up. The caller retires the budget slot (see `pool::retire`).
    pub fn close(&self) {
        responses::close(&self.out, &mut self.st.borrow_mut());
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
        let (sql, to) = responses::plan(&self.st.borrow(), to);
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
        responses::drain_synth(&mut st);
    }
}

/// Connects and logs in a new backend of `pool` (user and database `key`; the budget slot is
/// already taken), over TLS when `server_tls_sslmode` asks for it (server_tls.rs), within
/// `timeout` (`connect_timeout_seconds`).
pub async fn connect<H: Home>(
    home: &Rc<H>,
    setup: &Setup,
    timeout: Duration,
    pool: &Rc<H::Pool>,
    key: &PoolKey,
    credential: &Credential,
) -> Result<Rc<Backend<H::Pool>>, LoginError> {
    let cfg = &setup.cfg;
    let addr = format!("{}:{}", cfg.pg_host, cfg.pg_port);
    // One deadline for connecting, negotiating TLS and logging in.
    let deadline = std::time::Instant::now() + timeout;
    let timed_out = || LoginError::Other(format!("timed out connecting to {addr}"));
    let opening = async {
        let stream = TcpStream::connect(addr.as_str())
            .await
            .map_err(|e| LoginError::Other(format!("{addr}: {e}")))?;
        let _ = stream.set_nodelay(true);
        // For SHOW SERVERS (servers.rs), read before TLS wraps the socket.
        let addrs = (stream.peer_addr().ok(), stream.local_addr().ok());
        crate::server_tls::open(cfg.server_tls.as_ref(), stream)
            .await
            .map(|o| (o, addrs))
    };
    let (opened, addrs) = crate::with_timeout(timeout, opening)
        .await
        .ok_or_else(timed_out)??;
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    let to = Target {
        home,
        setup,
        pool,
        key,
        credential,
        addrs,
        addr: &addr,
    };
    // Two instances of what follows, each with its own relay loop: the plain one is the code
    // that ran before TLS existed.
    match opened {
        Opened::Plain(stream) => start(to, stream, left).await,
        Opened::Tls(stream) => start(to, *stream, left).await,
    }
}

/// What `start` logs in to, and for whom.
struct Target<'a, H: Home> {
    home: &'a Rc<H>,
    setup: &'a Setup,
    pool: &'a Rc<H::Pool>,
    key: &'a PoolKey,
    credential: &'a Credential,
    addrs: (Option<std::net::SocketAddr>, Option<std::net::SocketAddr>),
    addr: &'a str,
}

/// Logs in on `stream` within `timeout`, then starts the backend's writer and relay.
async fn start<H: Home, S: AsyncRead + AsyncWrite + Unpin + 'static>(
    to: Target<'_, H>,
    mut stream: S,
    timeout: Duration,
) -> Result<Rc<Backend<H::Pool>>, LoginError> {
    let Target {
        home,
        setup,
        pool,
        key,
        credential,
        addrs,
        addr,
    } = to;
    let cfg = &setup.cfg;
    let connecting = async {
        let mut logged = login::login(
            &mut stream,
            &key.user,
            &key.database,
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
        let shown =
            crate::servers::register(&key.user, &key.database, addrs.0, addrs.1, logged.pid);
        Ok::<_, LoginError>((logged, login, shown))
    };
    let (logged, login, shown) = crate::with_timeout(timeout, connecting)
        .await
        .ok_or_else(|| LoginError::Other(format!("timed out connecting to {addr}")))??;
    let (login, server) = if login.is_empty() {
        (setup.empty_settings.clone(), Settings::default())
    } else {
        let names: Vec<String> = login.iter().map(|(k, _)| k.to_owned()).collect();
        let server = setup
            .admin
            .server_defaults(&names)
            .await
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "reading the server's defaults failed");
                Settings::default()
            });
        (Rc::new(login), server)
    };
    let id = setup.next_id();
    let b = Rc::new(Backend {
        id,
        pool: pool.clone(),
        out: OutQueue::new(1 << 20, 256 * 1024),
        pid: logged.pid,
        secret: logged.secret,
        st: RefCell::new(State::new(id, logged.pid, login, server, logged.params)),
        retired: std::cell::Cell::new(false),
        idle_since: std::cell::Cell::new(None),
        created: std::time::Instant::now(),
        prefer: RefCell::new(None),
        announce_freed: std::cell::Cell::new(false),
        yield_to: RefCell::new(None),
        last_owner: RefCell::new(None),
        shown,
    });
    tracing::debug!(backend = b.id, pid = b.pid, user = %key.user, db = %key.database, "backend connected");
    let stream = RcStream::new(stream);
    let writer = b.clone();
    let wstream = stream.clone();
    glommio::spawn_local(async move {
        let _ = writer.out.run_writer(wstream).await;
    })
    .detach();
    let relay_b = b.clone();
    let relay_home = home.clone();
    let max = cfg.max_message_size;
    glommio::spawn_local(
        async move { relay(relay_home, relay_b, stream, logged.leftover, max).await },
    )
    .detach();
    Ok(b)
}

async fn relay<H: Home, S: AsyncRead + Unpin>(
    home: Rc<H>,
    b: Rc<Backend<H::Pool>>,
    mut stream: RcStream<S>,
    leftover: Vec<u8>,
    max: usize,
) {
    let mut reader = MessageReader::new(8192);
    reader.push_bytes(&leftover);
    loop {
        let mut touched: Option<Rc<dyn Owner>> = None;
        loop {
            let data = reader.data();
            let n = match typed_message_len(data, max) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(backend = b.id, error = %e, "bad message from backend");
                    return backend_lost(&home, &b, touched);
                }
            };
            let after = {
                let mut st = b.st.borrow_mut();
                if let Some(o) = &st.owner {
                    if touched.as_ref().is_none_or(|t| !same_owner(t, o)) {
                        if let Some(t) = touched.take() {
                            t.flush();
                        }
                        touched = Some(o.clone());
                    }
                }
                responses::on_message(&b.out, &mut st, &data[..n])
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
                        s.detach();
                    }
                    home.release(b.clone());
                }
                After::ReturnOrphan => home.release(b.clone()),
            }
        }
        if let Some(t) = touched.take() {
            t.flush();
            // Flow control: a slow client stops us reading its results, not anyone else's.
            while let Some(credit) = t.window_full() {
                credit.notified().await;
            }
        }
        let want = shared::protocol::pending_message_len(reader.data()).unwrap_or(0);
        match reader.fill(&mut stream, want).await {
            Ok(0) | Err(_) => return backend_lost(&home, &b, None),
            Ok(_) => {}
        }
    }
}

fn backend_lost<H: Home>(home: &Rc<H>, b: &Rc<Backend<H::Pool>>, touched: Option<Rc<dyn Owner>>) {
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
                Entry::Shape { check: Some(d), .. } => Some(d),
                _ => None,
            })
            .collect();
        (st.owner.take(), waiting)
    };
    b.out.close();
    crate::pids::ended(b.pid);
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
        s.detach();
        s.backend_lost();
    }
    home.retire(b);
}

/// The same session (the vtable part of the pointers may differ between codegen units).
fn same_owner(a: &Rc<dyn Owner>, b: &Rc<dyn Owner>) -> bool {
    std::ptr::addr_eq(Rc::as_ptr(a), Rc::as_ptr(b))
}
