//! Per-core backend pools, one per (user, database), with a budget per pool and per core. No
//! locks: every pool lives on one executor. Waiting sessions are served first come, first served;
//! when a core is at its total budget, an idle backend of another pool is closed so that a
//! waiting pool gets its share.

use crate::backend::{self, Backend};
use crate::core::Core;
use crate::login::LoginError;
use shared::io::Slot;
use shared::link::Credential;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub user: String,
    pub database: String,
}

/// A waiter is handed a backend, or `None` meaning "capacity freed: try again".
type Waiter = Rc<Slot<Option<Rc<Backend>>>>;

pub struct Pool {
    pub key: Rc<PoolKey>,
    idle: RefCell<Vec<Rc<Backend>>>,
    /// Backends of this pool on this core: idle, busy, or being connected.
    total: Cell<usize>,
    waiters: RefCell<VecDeque<Waiter>>,
    budget: usize,
}

impl Pool {
    pub fn new(key: Rc<PoolKey>, budget: usize) -> Self {
        Pool {
            key,
            idle: RefCell::new(Vec::new()),
            total: Cell::new(0),
            waiters: RefCell::new(VecDeque::new()),
            budget,
        }
    }

    fn has_waiters(&self) -> bool {
        self.waiters
            .borrow()
            .iter()
            .any(|w| Rc::strong_count(w) > 1)
    }

    /// Hands `b` (or a retry signal) to the oldest live waiter; gives it back if none.
    fn hand_to_waiter(&self, b: Option<Rc<Backend>>) -> Option<Option<Rc<Backend>>> {
        let mut waiters = self.waiters.borrow_mut();
        while let Some(w) = waiters.pop_front() {
            if Rc::strong_count(&w) > 1 && !w.is_filled() {
                w.put(b);
                return None;
            }
        }
        Some(b)
    }
}

/// Removes a waiter's slot on drop, giving back a backend it was handed but never took.
struct WaiterGuard<'a> {
    core: &'a Rc<Core>,
    slot: Waiter,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        if let Some(Some(b)) = self.slot.try_take() {
            release(self.core, b);
        }
    }
}

/// A backend for `pool`, connecting a new one within budget, else waiting for one.
pub async fn acquire(
    core: &Rc<Core>,
    pool: &Rc<Pool>,
    credential: &Credential,
) -> Result<Rc<Backend>, LoginError> {
    loop {
        let popped = pool.idle.borrow_mut().pop();
        if let Some(b) = popped {
            if b.is_broken() {
                continue;
            }
            return Ok(b);
        }
        if pool.total.get() < pool.budget {
            if core.total.get() >= core.max_total {
                core.evict_idle_other_than(&pool.key);
            }
            if core.total.get() < core.max_total {
                pool.total.set(pool.total.get() + 1);
                core.total.set(core.total.get() + 1);
                match backend::connect(core, pool, credential).await {
                    Ok(b) => return Ok(b),
                    Err(e) => {
                        pool.total.set(pool.total.get() - 1);
                        core.total.set(core.total.get() - 1);
                        core.capacity_freed(pool);
                        return Err(e);
                    }
                }
            }
        }
        let slot: Waiter = Rc::new(Slot::default());
        pool.waiters.borrow_mut().push_back(slot.clone());
        let guard = WaiterGuard { core, slot };
        let got = guard.slot.take().await;
        drop(guard);
        if let Some(b) = got {
            if !b.is_broken() {
                return Ok(b);
            }
        }
    }
}

/// Returns a backend that no session owns any more.
pub fn release(core: &Rc<Core>, b: Rc<Backend>) {
    let pool = b.pool.clone();
    if b.is_broken() {
        retire(core, &b);
        return;
    }
    if pool.has_waiters() {
        if let Some(Some(b)) = pool.hand_to_waiter(Some(b)) {
            pool.idle.borrow_mut().push(b);
        }
        return;
    }
    if core.total.get() >= core.max_total && core.someone_else_waits(&pool.key) {
        b.close();
        retire(core, &b);
        return;
    }
    pool.idle.borrow_mut().push(b);
}

/// A backend is gone (closed, broken or evicted): its budget slot is free again. Idempotent,
/// so whoever notices first (the relay, a cleanup, an eviction) may call it.
pub fn retire(core: &Rc<Core>, b: &Rc<Backend>) {
    if b.retired.replace(true) {
        return;
    }
    core.forget_idle(b);
    let pool = &b.pool;
    pool.total.set(pool.total.get().saturating_sub(1));
    core.total.set(core.total.get().saturating_sub(1));
    core.capacity_freed(pool);
}

impl Core {
    /// Wakes one waiter that could now connect a backend.
    pub fn capacity_freed(&self, preferred: &Rc<Pool>) {
        if preferred.has_waiters() {
            preferred.hand_to_waiter(None);
            return;
        }
        let pools: Vec<Rc<Pool>> = self.pools.borrow().values().cloned().collect();
        for p in pools {
            if p.has_waiters() && p.total.get() < p.budget {
                p.hand_to_waiter(None);
                return;
            }
        }
    }

    fn someone_else_waits(&self, key: &PoolKey) -> bool {
        self.pools
            .borrow()
            .values()
            .any(|p| *p.key != *key && p.has_waiters() && p.total.get() < p.budget)
    }

    fn evict_idle_other_than(&self, key: &PoolKey) {
        let victim = self
            .pools
            .borrow()
            .values()
            .find(|p| *p.key != *key && !p.idle.borrow().is_empty())
            .cloned();
        if let Some(p) = victim {
            let popped = p.idle.borrow_mut().pop();
            if let Some(b) = popped {
                b.close();
                if !b.retired.replace(true) {
                    p.total.set(p.total.get().saturating_sub(1));
                    self.total.set(self.total.get().saturating_sub(1));
                }
            }
        }
    }

    /// Drops an idle backend that died (its relay noticed): it leaves the idle list.
    pub fn forget_idle(&self, b: &Rc<Backend>) {
        let mut idle = b.pool.idle.borrow_mut();
        if let Some(i) = idle.iter().position(|x| Rc::ptr_eq(x, b)) {
            idle.swap_remove(i);
        }
    }
}
