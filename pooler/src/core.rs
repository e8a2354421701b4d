//! The state of one pooler core (executor). Nothing here is shared between cores: the only
//! cross-core traffic is cancel requests, over a glommio channel mesh.

use crate::admin::Admin;
use crate::backend::Stmt;
use crate::budget::Budgets;
use crate::config::Config;
use crate::pool::{Pool, PoolKey};
use crate::session::Session;
use glommio::channels::channel_mesh::Senders;
use sha2::{Digest, Sha256};
use shared::protocol::frontend;
use shared::settings::Settings;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Messages between cores (the only cross-core traffic).
#[derive(Clone, Debug)]
pub enum CoreMsg {
    /// Cancel the query of the session with these keys, wherever it is.
    Cancel(i32, i32),
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
}

/// (user and database, startup settings): what a cached login was checked for.
type LoginKey = (Rc<PoolKey>, Settings);
/// When a login was checked, and the `ParameterStatus` messages it got.
type LoginEntry = (Instant, Rc<Vec<u8>>);

pub struct Core {
    pub cfg: Rc<Config>,
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
    pub peers: RefCell<Option<Senders<CoreMsg>>>,
    /// Logins Postgres accepted recently, by (user, database, startup settings): the
    /// `ParameterStatus` messages to answer with. A login found here needs no backend, so a storm
    /// of connections does not queue behind running queries.
    logins: RefCell<HashMap<LoginKey, LoginEntry>>,
    /// Pools starving on other cores (`CoreMsg::Starving`) and when they said so: the next
    /// backend released here that may go to them is closed so they get its unit.
    pub owed: RefCell<Vec<(PoolKey, Instant)>>,
    /// One listening connection per database on this core (listen.rs).
    listeners: RefCell<HashMap<String, Rc<crate::listen::Listener>>>,
}

impl Core {
    pub fn new(cfg: Rc<Config>, index: usize, budgets: Arc<Budgets>) -> Rc<Core> {
        Rc::new(Core {
            admin: Admin::new(cfg.clone()),
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
            owed: RefCell::new(Vec::new()),
            listeners: RefCell::new(HashMap::new()),
        })
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
        let peers = self.peers.borrow();
        let Some(senders) = peers.as_ref() else {
            return;
        };
        for i in 0..senders.nr_consumers() {
            if i != self.index {
                let _ = senders.try_send_to(i, msg.clone());
            }
        }
    }

    pub fn recent_login(&self, key: &Rc<PoolKey>, settings: &Settings) -> Option<Rc<Vec<u8>>> {
        let ttl = Duration::from_secs(self.cfg.login_cache_seconds);
        let logins = self.logins.borrow();
        let (at, params) = logins.get(&(key.clone(), settings.clone()))?;
        (at.elapsed() < ttl).then(|| params.clone())
    }

    pub fn remember_login(&self, key: &Rc<PoolKey>, settings: &Settings, params: Vec<u8>) {
        if self.cfg.login_cache_seconds == 0 {
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
        let listener = self
            .listeners
            .borrow_mut()
            .entry(database.to_owned())
            .or_insert_with(|| crate::listen::Listener::new(self.cfg.clone(), database))
            .clone();
        let pool = Rc::new(Pool::new(key.clone(), global, listener));
        self.pools.borrow_mut().insert(key, pool.clone());
        pool
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
