//! The state of one pooler core (executor). Nothing here is shared between cores: the only
//! cross-core traffic is messages over a glommio channel mesh (cancel requests, budget, and the
//! LISTEN registry and notifications of listen.rs).

use crate::admin::Admin;
use crate::budget::Budgets;
use crate::budget::PoolKey;
use crate::config::Config;
use crate::pool::Pool;
use crate::session::Session;
use crate::statements::Stmt;
use glommio::channels::channel_mesh::Senders;
use sha2::{Digest, Sha256};
use shared::io::{Broadcast, Notify};
use shared::protocol::frontend;
use shared::settings::Settings;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Messages between cores (the only cross-core traffic).
#[derive(Clone, Debug)]
pub enum CoreMsg {
    /// Cancel the query of the session with these keys, wherever it is.
    Cancel(i32, i32),
    /// End the session with these keys, wherever it is (`pg_terminate_backend` of its pid).
    Terminate(i32, i32),
    /// A core is starved of budget: shed an idle backend of this pool (or of any pool).
    Shed { key: Option<PoolKey> },
    /// A core gave back budget for this pool (or, `None`, total budget): waiters may retry.
    Freed { key: Option<PoolKey> },
    /// Sessions of this pool wait on a core where the pool has no backend at all, and nothing
    /// there will free one for them: give them the unit of a backend released here.
    Starving { key: PoolKey },
    /// Close every idle backend connected to this database (it is about to be dropped,
    /// renamed or copied).
    ReleaseDb(String),
    /// To the owner core of `database`'s listening connection (listen.rs): sessions of core
    /// `from` started (`add`) or stopped (`remove`) listening on these channels.
    Listen {
        database: String,
        from: usize,
        add: Vec<String>,
        remove: Vec<String>,
    },
    /// To the owner core: answer `token` once the listening connection answered a query sent
    /// after everything `from` sent before.
    ListenBarrier {
        database: String,
        from: usize,
        token: u64,
    },
    /// From the owner core: the barrier `token` passed (`ok`: the connection answered), after
    /// every notification forwarded before it.
    ListenBarrierDone {
        database: String,
        token: u64,
        ok: bool,
    },
    /// From the owner core: a raw `NotificationResponse` for the sessions of this core.
    Notification { database: String, msg: Vec<u8> },
    /// Postgres is shutting down or crashed (server_end.rs): sessions holding no backend end
    /// with these last words (the backends' FATAL or WARNING).
    ServerEnded(Vec<u8>),
}

/// Messages to other cores that must arrive, in order: one queue per core, drained by one task
/// per core (`cancel::serve_peers`) that waits while that core's channel is full. Whoever sends
/// never waits, and the mesh handlers never wait on a send either, so the channels always drain
/// and two cores cannot block each other. (`Core::ask_peers` is the best-effort path.)
pub struct Outbox {
    queues: Vec<RefCell<VecDeque<CoreMsg>>>,
    ready: Vec<Notify>,
    /// Bytes of notifications queued per core, bounded by `NOTES_LIMIT`.
    note_bytes: Vec<Cell<usize>>,
}

/// Notifications queued for one other core, in bytes; past it new ones are dropped (logged), as
/// a session's own queue is bounded (listen.rs).
const NOTES_LIMIT: usize = 16 << 20;

impl Outbox {
    fn new(cores: usize) -> Outbox {
        Outbox {
            queues: (0..cores).map(|_| RefCell::default()).collect(),
            ready: (0..cores).map(|_| Notify::default()).collect(),
            note_bytes: (0..cores).map(|_| Cell::new(0)).collect(),
        }
    }

    /// Queues `msg` for core `to` (not this one).
    pub fn send(&self, to: usize, msg: CoreMsg) {
        let Some(q) = self.queues.get(to) else {
            tracing::warn!(core = to, "message for a core that does not exist");
            return;
        };
        if let CoreMsg::Notification { msg: m, .. } = &msg {
            let bytes = &self.note_bytes[to];
            if bytes.get() + m.len() > NOTES_LIMIT {
                tracing::warn!(
                    core = to,
                    "notification queue to a core is full; dropping one"
                );
                return;
            }
            bytes.set(bytes.get() + m.len());
        }
        q.borrow_mut().push_back(msg);
        self.ready[to].notify();
    }

    /// Sends what is queued for core `to`, in order, for as long as the mesh is up.
    pub async fn drain(&self, to: usize, senders: Rc<Senders<CoreMsg>>) {
        loop {
            let ready = self.ready[to].notified();
            let next = self.queues[to].borrow_mut().pop_front();
            let Some(msg) = next else {
                ready.await;
                continue;
            };
            if let CoreMsg::Notification { msg: m, .. } = &msg {
                let bytes = &self.note_bytes[to];
                bytes.set(bytes.get().saturating_sub(m.len()));
            }
            if senders.send_to(to, msg).await.is_err() {
                tracing::warn!(core = to, "core mesh closed");
                return;
            }
        }
    }
}

/// (user and database, startup settings): what a cached login was checked for.
type LoginKey = (Rc<PoolKey>, Settings);
/// When a login was checked, and the `ParameterStatus` messages it got.
type LoginEntry = (Instant, Rc<Vec<u8>>);

pub struct Core {
    /// The config the process started with: what needs a restart to change.
    pub cfg: Rc<Config>,
    /// The config in force: a reload (SIGHUP) swaps it; read it with [`Core::live`].
    live: RefCell<Rc<Config>>,
    /// SIGTERM: sessions end at their next idle moment (57P01), new ones are refused.
    pub draining: Cell<bool>,
    /// The shutdown timeout passed: sessions end now.
    pub force: Cell<bool>,
    /// Told when a drain starts, every tick while it lasts, and when it is forced.
    pub drain_notify: Broadcast,
    pub index: usize,
    pub pools: RefCell<HashMap<Rc<PoolKey>, Rc<Pool>>>,
    pub budgets: Arc<Budgets>,
    /// When we last asked the other cores to shed (at most every few milliseconds).
    last_shed_ask: Cell<Option<Instant>>,
    pub sessions_by_key: RefCell<HashMap<(i32, i32), Weak<Session>>>,
    statements: RefCell<HashMap<Rc<[u8]>, Weak<Stmt>>>,
    pub empty_settings: Rc<Settings>,
    next_id: Cell<u64>,
    pub admin: Admin,
    pub peers: RefCell<Option<Rc<Senders<CoreMsg>>>>,
    /// Ordered, reliable messages to the other cores.
    pub outbox: Rc<Outbox>,
    /// Logins Postgres accepted recently, by (user, database, startup settings): the
    /// `ParameterStatus` messages to answer with. A login found here needs no backend, so a storm
    /// of connections does not queue behind running queries.
    logins: RefCell<HashMap<LoginKey, LoginEntry>>,
    /// Sessions' baseline settings, one copy per distinct value: an application's clients all
    /// send the same startup packet, so its thousands of sessions share one (an idle
    /// session's memory, perf/idle_memory.sh).
    baselines: RefCell<std::collections::HashSet<Rc<Settings>>>,
    /// Pools starving on other cores (`CoreMsg::Starving`) and when they said so: the next
    /// backend released here that may go to them is closed so they get its unit.
    pub owed: RefCell<Vec<(PoolKey, Instant)>>,
    /// Per database: the sessions of this core that listen, and on the database's owner core its
    /// listening connection (listen.rs).
    listeners: RefCell<HashMap<String, Rc<crate::listen::Listener>>>,
}

impl Core {
    pub fn new(cfg: Rc<Config>, index: usize, budgets: Arc<Budgets>) -> Rc<Core> {
        Rc::new(Core {
            admin: Admin::new(cfg.clone()),
            outbox: Rc::new(Outbox::new(cfg.cores.max(index + 1))),
            live: RefCell::new(cfg.clone()),
            draining: Cell::new(false),
            force: Cell::new(false),
            drain_notify: Broadcast::default(),
            cfg,
            index,
            pools: RefCell::new(HashMap::new()),
            budgets,
            last_shed_ask: Cell::new(None),
            sessions_by_key: RefCell::new(HashMap::new()),
            statements: RefCell::new(HashMap::new()),
            empty_settings: Rc::new(Settings::default()),
            next_id: Cell::new(1),
            peers: RefCell::new(None),
            logins: RefCell::new(HashMap::new()),
            baselines: RefCell::default(),
            owed: RefCell::new(Vec::new()),
            listeners: RefCell::new(HashMap::new()),
        })
    }

    /// The config in force (limits, timeouts): what a reload may change.
    pub fn live(&self) -> Rc<Config> {
        self.live.borrow().clone()
    }

    pub fn set_live(&self, cfg: Rc<Config>) {
        *self.live.borrow_mut() = cfg;
    }

    /// Sends `msg` to every other core (best effort: a full channel drops it; senders retry).
    pub fn ask_peers(&self, msg: CoreMsg) {
        if matches!(msg, CoreMsg::Shed { .. }) {
            let now = Instant::now();
            if self
                .last_shed_ask
                .get()
                .is_some_and(|t| now.duration_since(t) < Duration::from_millis(5))
            {
                return;
            }
            self.last_shed_ask.set(Some(now));
        }
        let Some(senders) = self.peers.borrow().clone() else {
            return;
        };
        for i in 0..senders.nr_consumers() {
            if i != self.index {
                let _ = senders.try_send_to(i, msg.clone());
            }
        }
    }

    pub fn recent_login(&self, key: &Rc<PoolKey>, settings: &Settings) -> Option<Rc<Vec<u8>>> {
        let ttl = Duration::from_secs(self.live().login_cache_seconds);
        let logins = self.logins.borrow();
        let (at, params) = logins.get(&(key.clone(), settings.clone()))?;
        (at.elapsed() < ttl).then(|| params.clone())
    }

    pub fn remember_login(&self, key: &Rc<PoolKey>, settings: &Settings, params: Vec<u8>) {
        if self.live().login_cache_seconds == 0 {
            return;
        }
        let mut logins = self.logins.borrow_mut();
        if logins.len() > 10_000 {
            logins.clear();
        }
        logins.insert(
            (key.clone(), settings.clone()),
            (Instant::now(), Rc::new(params)),
        );
    }

    /// `settings` as a shared value: the copy sessions already hold when there is one.
    pub fn shared_baseline(&self, settings: Settings) -> Rc<Settings> {
        let mut seen = self.baselines.borrow_mut();
        if let Some(rc) = seen.get(&settings) {
            return rc.clone();
        }
        // Forget the values no session holds any more each time the set reaches a power of
        // two: it stays within twice the distinct values in use.
        if seen.len() >= 64 && seen.len().is_power_of_two() {
            seen.retain(|rc| Rc::strong_count(rc) > 1);
        }
        let rc = Rc::new(settings);
        seen.insert(rc.clone());
        rc
    }

    pub fn next_id(&self) -> u64 {
        let id = self.next_id.get();
        self.next_id.set(id + 1);
        id
    }

    pub fn pool_for(&self, user: &str, database: &str) -> Rc<Pool> {
        let key = PoolKey {
            user: user.to_owned(),
            database: database.to_owned(),
        };
        if let Some(p) = self.pools.borrow().get(&key) {
            return p.clone();
        }
        let global = self.budgets.counter(&key);
        let key = Rc::new(key);
        let listener = self.listener(database);
        let pool = Rc::new(Pool::new(key.clone(), global, listener, self.index));
        self.pools.borrow_mut().insert(key, pool.clone());
        pool
    }

    /// The LISTEN registry of `database` on this core (made on first use: another core may ask
    /// for it as the database's owner before any session here uses the database).
    pub fn listener(&self, database: &str) -> Rc<crate::listen::Listener> {
        if let Some(l) = self.listeners.borrow().get(database) {
            return l.clone();
        }
        let l = crate::listen::Listener::new(
            self.cfg.clone(),
            database,
            self.index,
            self.outbox.clone(),
        );
        self.listeners
            .borrow_mut()
            .insert(database.to_owned(), l.clone());
        l
    }

    /// The database is about to be dropped, renamed or copied: close its listening connection
    /// if it is on this core and nobody listens (listen.rs).
    pub fn release_listener(&self, database: &str) {
        let l = self.listeners.borrow().get(database).cloned();
        if let Some(l) = l {
            l.release();
        }
    }

    /// The statement for (query, parameter types), named by its content: every session that
    /// prepares the same text shares it, and a backend parses it once.
    pub fn statement(&self, query: &[u8], param_types: &[u8]) -> Rc<Stmt> {
        let mut h = Sha256::new();
        h.update((query.len() as u64).to_be_bytes());
        h.update(query);
        h.update(param_types);
        let digest = h.finalize();
        let mut name = Vec::with_capacity(3 + 32);
        name.extend_from_slice(b"tp_");
        for byte in &digest[..16] {
            name.extend_from_slice(format!("{byte:02x}").as_bytes());
        }
        let content: Rc<[u8]> = Rc::from(name);
        if let Some(s) = self
            .statements
            .borrow()
            .get(&content)
            .and_then(Weak::upgrade)
        {
            return s;
        }
        let mut parse = Vec::with_capacity(query.len() + 48);
        frontend::write_parse(&mut parse, &content, query, param_types);
        let stmt = Rc::new(Stmt {
            content: content.clone(),
            parse,
            validated: Cell::new(false),
            sql: None,
        });
        let mut map = self.statements.borrow_mut();
        if map.len() > 4096 {
            map.retain(|_, w| w.strong_count() > 0);
        }
        map.insert(content, Rc::downgrade(&stmt));
        stmt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_bounds_notifications_not_control_messages() {
        let o = Outbox::new(2);
        let note = |n: usize| CoreMsg::Notification {
            database: "app".into(),
            msg: vec![0; n],
        };
        o.send(1, note(NOTES_LIMIT - 10));
        o.send(1, note(11)); // over the bound: dropped
        o.send(1, note(10));
        for token in 0..3 {
            o.send(
                1,
                CoreMsg::ListenBarrierDone {
                    database: "app".into(),
                    token,
                    ok: true,
                },
            );
        }
        o.send(7, note(1)); // no such core: dropped, logged
        let q = o.queues[1].borrow();
        assert_eq!(q.len(), 5);
        assert!(matches!(&q[1], CoreMsg::Notification { msg, .. } if msg.len() == 10));
        assert!(matches!(q[4], CoreMsg::ListenBarrierDone { token: 2, .. }));
        assert_eq!(o.note_bytes[1].get(), NOTES_LIMIT);
        assert!(o.queues[0].borrow().is_empty());
    }
}
