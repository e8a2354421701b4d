//! The state of one pooler core (executor). Nothing here is shared between cores: the only
//! cross-core traffic is cancel requests, over a glommio channel mesh.

use crate::admin::Admin;
use crate::backend::Stmt;
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

pub type CancelMsg = (i32, i32);

pub struct Core {
    pub cfg: Rc<Config>,
    pub index: usize,
    pub pools: RefCell<HashMap<Rc<PoolKey>, Rc<Pool>>>,
    /// Backends on this core, all pools.
    pub total: Cell<usize>,
    pub max_total: usize,
    pub sessions_by_key: RefCell<HashMap<(i32, i32), Weak<Session>>>,
    statements: RefCell<HashMap<Rc<[u8]>, Weak<Stmt>>>,
    pub empty_settings: Rc<Settings>,
    next_id: Cell<u64>,
    pub admin: Admin,
    pub cancel_peers: RefCell<Option<Senders<CancelMsg>>>,
}

impl Core {
    pub fn new(cfg: Rc<Config>, index: usize) -> Rc<Core> {
        let max_total = cfg.per_core(cfg.max_backends);
        Rc::new(Core {
            admin: Admin::new(cfg.clone()),
            cfg,
            index,
            pools: RefCell::new(HashMap::new()),
            total: Cell::new(0),
            max_total,
            sessions_by_key: RefCell::new(HashMap::new()),
            statements: RefCell::new(HashMap::new()),
            empty_settings: Rc::new(Settings::default()),
            next_id: Cell::new(1),
            cancel_peers: RefCell::new(None),
        })
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
        let key = Rc::new(key);
        let pool = Rc::new(Pool::new(
            key.clone(),
            self.cfg.per_core(self.cfg.pool_size),
        ));
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
        });
        let mut map = self.statements.borrow_mut();
        if map.len() > 4096 {
            map.retain(|_, w| w.strong_count() > 0);
        }
        map.insert(content, Rc::downgrade(&stmt));
        stmt
    }
}
