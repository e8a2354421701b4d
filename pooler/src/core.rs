//! The state of one pooler core (executor). Nothing here is shared between cores: the only
//! cross-core traffic is messages over a glommio channel mesh (mesh.rs: cancel requests, budget,
//! and the LISTEN registry and notifications of listen.rs).

use crate::admin::Admin;
use crate::budget::Budgets;
use crate::budget::PoolKey;
use crate::config::{Config, Live};
use crate::mesh::{CoreMsg, Outbox, Peers};
use crate::pool::{Backend, Pool, Pools};
use crate::statements::Stmt;
use sha2::{Digest, Sha256};
use shared::io::{Broadcast, OutQueue};
use shared::protocol::frontend;
use shared::settings::Settings;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the core's registry of sessions, and what the other cores ask of them, need of a session
/// (session.rs implements it), so the core sits below the session task. Called through `dyn`
/// only on a cancel, a terminate, a server going down or a drain: never per request.
pub trait SessionHandle {
    fn session_id(&self) -> u32;
    /// The backend it holds, if it holds one.
    fn held_backend(&self) -> Option<Rc<Backend>>;
    /// A client's `pg_terminate_backend` of it: ends it as a terminated backend's ends.
    fn terminate(&self);
    /// Ends it with `err`, a FATAL `ErrorResponse`, as its last word.
    fn end_with(&self, err: &[u8]);
    /// Its link's frames to the gateway.
    fn link(&self) -> &Rc<OutQueue>;
}

/// (user and database, startup settings): what a cached login was checked for.
type LoginKey = (Rc<PoolKey>, Settings);
/// When a login was checked, and the `ParameterStatus` messages it got.
type LoginEntry = (Instant, Rc<Vec<u8>>);

pub struct Core {
    /// The config the process started with: what needs a restart to change.
    pub cfg: Rc<Config>,
    /// The config in force: a reload (SIGHUP) swaps it; read it with [`Core::live`].
    live: Rc<Live>,
    /// SIGTERM: sessions end at their next idle moment (57P01), new ones are refused.
    pub draining: Cell<bool>,
    /// The shutdown timeout passed: sessions end now.
    pub force: Cell<bool>,
    /// Told when a drain starts, every tick while it lasts, and when it is forced.
    pub drain_notify: Broadcast,
    pub index: usize,
    /// The backend pools of this core.
    pub pools: Rc<Pools>,
    pub budgets: Arc<Budgets>,
    /// The sessions of this core, by cancel key.
    pub sessions_by_key: RefCell<HashMap<(i32, i32), Weak<dyn SessionHandle>>>,
    statements: RefCell<HashMap<Rc<[u8]>, Weak<Stmt>>>,
    pub admin: Rc<Admin>,
    /// The other cores, for best-effort messages.
    pub peers: Rc<Peers>,
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
    /// Per database: the sessions of this core that listen, and on the database's owner core its
    /// listening connection (listen.rs).
    listeners: RefCell<HashMap<String, Rc<crate::listen::Listener>>>,
}

impl Core {
    pub fn new(cfg: Rc<Config>, index: usize, budgets: Arc<Budgets>) -> Rc<Core> {
        let admin = Rc::new(Admin::new(cfg.clone()));
        let live = Rc::new(Live::new(cfg.clone()));
        let peers = Rc::new(Peers::new(index));
        let pools = Pools::new(
            cfg.clone(),
            live.clone(),
            admin.clone(),
            budgets.clone(),
            peers.clone(),
        );
        Rc::new(Core {
            admin,
            outbox: Rc::new(Outbox::new(cfg.cores.max(index + 1))),
            live,
            draining: Cell::new(false),
            force: Cell::new(false),
            drain_notify: Broadcast::default(),
            cfg,
            index,
            pools: Rc::new(pools),
            budgets,
            sessions_by_key: RefCell::new(HashMap::new()),
            statements: RefCell::new(HashMap::new()),
            peers,
            logins: RefCell::new(HashMap::new()),
            baselines: RefCell::default(),
            listeners: RefCell::new(HashMap::new()),
        })
    }

    /// The config in force (limits, timeouts): what a reload may change.
    pub fn live(&self) -> Rc<Config> {
        self.live.get()
    }

    pub fn set_live(&self, cfg: Rc<Config>) {
        self.live.set(cfg);
    }

    /// Sends `msg` to every other core (best effort: a full channel drops it; senders retry).
    pub fn ask_peers(&self, msg: CoreMsg) {
        self.peers.ask(msg);
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

    pub fn pool_for(&self, user: &str, database: &str) -> Rc<Pool> {
        self.pools
            .pool_for(user, database, || self.listener(database))
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

    /// The database is about to be dropped, renamed or copied: close the idle backends of this
    /// core connected to it, and its listening connection if it is on this core and nobody
    /// listens (listen.rs).
    pub fn release_database(&self, database: &str) {
        self.release_listener(database);
        self.pools.release_database(database);
    }

    fn release_listener(&self, database: &str) {
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
