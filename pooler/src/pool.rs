//! Per-core backend pools, one per (user, database). No locks on the request path: a pool lives on
//! one executor; the budgets it draws new backends from are shared atomics (see `budget.rs`).
//! Waiting sessions are served first come, first served, by the next backend released on their
//! core. A backend moves between cores only by being closed on one and connected on the other (a
//! login), so under contention that happens slowly and on evidence: a core gives a backend away
//! when another core's sessions wait with no backend of the pool there at all
//! (`Pool::starving_core`, and `CoreMsg::Starving` as a safety net); when another core's sessions
//! have waited, per backend, clearly longer than its own over the last `REBALANCE_EVERY`
//! (`Pool::give_away_to`); or when a backend idles here while another core waits
//! (`CoreMsg::Shed`).
//! When the total budget is spent, a core frees an idle backend of another pool on itself; when a
//! user's (`max_user_connections`) or a database's (`max_db_connections`) is, an idle backend of
//! that user's other databases (of that database's other users), here and on the other cores
//! (`Want`). A pool that waits for one of those limits is served as one waiting for the total:
//! the fair share between pools below counts only pools a released backend's unit can serve
//! (`Budgets::would_serve`).
//!
//! A core's pools are one [`Pools`], which holds what they need (budgets, the other cores, the
//! config in force) so that nothing here reaches for the core (core.rs sits above); the relays
//! of its backends give them back to it through `backend::Home`.

use crate::admin::Admin;
use crate::backend::{self, Setup};
use crate::budget::{Budgets, PoolBudget, PoolKey, Reserve};
use crate::config::{Config, Live};
use crate::listen::Listener;
use crate::login::LoginError;
use crate::mesh::{CoreMsg, Peers, Want};
use crate::responses::{Entry, Internal};
use shared::io::Slot;
use shared::link::Credential;
use std::cell::RefCell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A backend of a pool here.
pub type Backend = backend::Backend<Pool>;

/// A waiter is handed a backend, or `None` meaning "capacity freed: try again".
type Waiter = Rc<Slot<Option<Rc<Backend>>>>;

/// How long a waiter waits before it retries the shared budget on its own, doubling with each
/// retry up to `RETRY_MAX`. Budget freed on another core is signalled (`CoreMsg::Freed`), so
/// this is only a safety net: short timers on every waiter cost CPU in proportion to the
/// waiters (400 sessions queued behind one held backend cost the pooler 7 % of a core with a
/// fixed 250 ms, `sessions_waiting_for_a_backend_cost_no_cpu`).
const RETRY: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// Another core sheds only backends idle this long: true surplus, not a backend between two
/// requests (shedding those made cores trade backends back and forth, each trade a new login).
const SHED_AFTER_IDLE: Duration = Duration::from_millis(10);
/// ... and, for another core's sessions of the same pool, only if none of this core's sessions
/// waited for one of the pool's backends this recently: a core whose own sessions wait needs
/// every backend it has, even one that happens to be idle now (under contention both cores
/// wait in turn, and shedding on every lull was a login per lull).
const SURPLUS_AFTER_WAIT: Duration = Duration::from_secs(1);
/// How often at most a pool that has no backend on a core tells the other cores it is starving
/// there, and how long they remember it.
const STARVING_ASK: Duration = Duration::from_millis(100);
const OWED_FOR: Duration = Duration::from_secs(1);
/// How often at most a core considers giving one of a pool's backends to another core. Each move
/// costs a login (fork + authentication in Postgres), so moves are slow and need evidence.
const REBALANCE_EVERY: Duration = Duration::from_millis(500);
/// A core gives a backend away only if another core's sessions waited, on average over the
/// window, more than twice as many per backend as its own plus this many: the margin keeps two
/// evenly loaded cores from trading backends back and forth.
const REBALANCE_MARGIN: f64 = 0.25;

pub struct Pool {
    pub key: Rc<PoolKey>,
    idle: RefCell<Vec<Rc<Backend>>>,
    waiters: RefCell<VecDeque<Waiter>>,
    /// This (user, database) on all cores: backends and waiters.
    pub global: Arc<PoolBudget>,
    /// Of those waiters, the ones on this core.
    local_waiting: std::cell::Cell<usize>,
    /// Backends of this pool on this core (connected or connecting).
    local: std::cell::Cell<usize>,
    /// The listening connection of this database on this core (listen.rs).
    pub listener: Rc<Listener>,
    /// When this core last told the others that this pool starves here.
    last_starving_ask: std::cell::Cell<Option<Instant>>,
    /// This core's index (its `CoreShare` in `global.cores`).
    core: usize,
    /// When a session here last waited for a backend of this pool.
    last_wait: std::cell::Cell<Option<Instant>>,
    /// When this core last weighed a move, and every core's `waited_us` then.
    rebalanced: RefCell<(Instant, Vec<u64>)>,
}

impl Pool {
    pub fn new(
        key: Rc<PoolKey>,
        global: Arc<PoolBudget>,
        listener: Rc<Listener>,
        core: usize,
    ) -> Self {
        let waited = waited_now(&global);
        Pool {
            core,
            last_wait: std::cell::Cell::new(None),
            rebalanced: RefCell::new((Instant::now(), waited)),
            key,
            idle: RefCell::new(Vec::new()),
            waiters: RefCell::new(VecDeque::new()),
            global,
            local_waiting: std::cell::Cell::new(0),
            local: std::cell::Cell::new(0),
            listener,
            last_starving_ask: std::cell::Cell::new(None),
        }
    }

    /// Publishes how many backends of this pool idle on this core, for the admin console
    /// (`pools_report.rs`): one relaxed store when the idle list changes.
    fn note_idle(&self) {
        if let Some(share) = self.global.cores.get(self.core) {
            share
                .idle
                .store(self.idle.borrow().len(), Ordering::Relaxed);
        }
    }

    /// Backends of this pool on this core went up or down by one; published for other cores.
    fn add_local(&self, up: bool) {
        let n = if up {
            self.local.get() + 1
        } else {
            self.local.get().saturating_sub(1)
        };
        self.local.set(n);
        if let Some(share) = self.global.cores.get(self.core) {
            share.backends.store(n, Ordering::Relaxed);
        }
    }

    /// Whether to leave the pool's remaining budget to other cores: this core has its even share
    /// of the budget and another core's sessions wait with less than theirs. The first split of
    /// a pool decides how many logins rebalancing costs later; first come, first served gave
    /// one core most of the budget whenever its sessions happened to arrive first.
    fn leave_to_others(&self, pools: &Pools) -> bool {
        let share = pools.budgets.pool_size().div_ceil(self.global.cores.len());
        self.local.get() >= share
            && self.global.cores.iter().enumerate().any(|(i, c)| {
                i != self.core
                    && c.waiting.load(Ordering::Relaxed) > 0
                    && c.backends.load(Ordering::Relaxed) < share
            })
    }

    /// Another core whose sessions of this pool wait with no backend of it at all: one released
    /// here goes there at once (a login is the only way they get served).
    fn starving_core(&self) -> Option<usize> {
        self.global.cores.iter().enumerate().position(|(i, c)| {
            i != self.core
                && c.waiting.load(Ordering::Relaxed) > 0
                && c.backends.load(Ordering::Relaxed) == 0
        })
    }

    /// The core that one of this pool's backends here should go to, if any: one whose sessions
    /// waited, per backend, more than twice as long as ours (plus a margin) since the last look.
    /// Looks at most every `REBALANCE_EVERY`, and never gives away this core's last backend
    /// (a core with none is served by `starving_core`).
    fn give_away_to(&self) -> Option<usize> {
        let now = Instant::now();
        let mut last = self.rebalanced.borrow_mut();
        let window = now.duration_since(last.0);
        if window < REBALANCE_EVERY {
            return None;
        }
        let waited = waited_now(&self.global);
        let window_us = window.as_micros().max(1) as f64;
        // Average number of sessions waiting per backend over the window, on core `i`.
        let pressure = |i: usize| {
            let d = waited[i].saturating_sub(*last.1.get(i).unwrap_or(&0));
            let backends = self.global.cores[i].backends.load(Ordering::Relaxed).max(1);
            d as f64 / window_us / backends as f64
        };
        let mine = pressure(self.core);
        let target = (0..waited.len())
            .filter(|&i| i != self.core)
            .map(|i| (i, pressure(i)))
            .filter(|&(_, p)| p > 2.0 * mine + REBALANCE_MARGIN)
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .map(|(i, _)| i);
        *last = (now, waited);
        target.filter(|_| self.local.get() >= 2)
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

    /// Closes the idle backends idle for `idle_for` or older than `lifetime` (PgBouncer's
    /// server_idle_timeout and server_lifetime); returns how many for each reason.
    pub fn expire(
        &self,
        pools: &Rc<Pools>,
        idle_for: Option<Duration>,
        lifetime: Option<Duration>,
    ) -> (usize, usize) {
        let now = Instant::now();
        let old = |b: &Backend| lifetime.is_some_and(|d| now.duration_since(b.created) >= d);
        let idled = |b: &Backend| {
            idle_for.is_some_and(|d| {
                b.idle_since
                    .get()
                    .is_some_and(|t| now.duration_since(t) >= d)
            })
        };
        let victims: Vec<Rc<Backend>> = {
            let mut idle = self.idle.borrow_mut();
            let (gone, keep): (Vec<_>, Vec<_>) = idle.drain(..).partition(|b| old(b) || idled(b));
            *idle = keep;
            gone
        };
        self.note_idle();
        let by_age = victims.iter().filter(|b| old(b)).count();
        for b in &victims {
            close_for(pools, b, None);
        }
        (victims.len() - by_age, by_age)
    }

    /// Closes one idle backend that has been idle at least `min_idle`, if there is one; its
    /// unit goes to a waiter of `prefer` first when it comes back.
    fn shed_one(&self, pools: &Rc<Pools>, min_idle: Duration, prefer: Option<Rc<Pool>>) -> bool {
        let now = Instant::now();
        let victim = {
            let mut idle = self.idle.borrow_mut();
            // The bottom of the (LIFO) idle list has been idle longest.
            match idle.first() {
                Some(b)
                    if b.idle_since
                        .get()
                        .is_some_and(|t| now.duration_since(t) >= min_idle) =>
                {
                    Some(idle.remove(0))
                }
                _ => None,
            }
        };
        self.note_idle();
        match victim {
            Some(b) => {
                tracing::debug!(user = %self.key.user, db = %self.key.database, core = self.core, "closing an idle backend (shed)");
                b.announce_freed.set(true);
                close_for(pools, &b, prefer);
                true
            }
            None => false,
        }
    }
}

/// A budget unit reserved for a backend being connected: given back on drop, unless the
/// backend came (then its relay gives it back when the backend ends: `retire`).
struct Unit<'a> {
    pools: &'a Rc<Pools>,
    pool: &'a Rc<Pool>,
}

impl Drop for Unit<'_> {
    fn drop(&mut self) {
        self.pool.add_local(false);
        self.pools.budgets.give_back(&self.pool.global);
        self.pools.capacity_freed(self.pool);
    }
}

/// A place in a pool's queue: on drop it leaves the queue and gives back a backend it was
/// handed but never took.
struct WaiterGuard<'a> {
    pools: &'a Rc<Pools>,
    pool: &'a Rc<Pool>,
    slot: Waiter,
    since: Instant,
}

impl Drop for WaiterGuard<'_> {
    fn drop(&mut self) {
        if let Some(share) = self.pool.global.cores.get(self.pool.core) {
            let us = self.since.elapsed().as_micros() as u64;
            share.waited_us.fetch_add(us, Ordering::Relaxed);
            crate::metrics::waited(us);
            share.waiting.fetch_sub(1, Ordering::Relaxed);
        }
        self.pool.last_wait.set(Some(Instant::now()));
        self.pool.global.waiting.fetch_sub(1, Ordering::Relaxed);
        self.pool
            .local_waiting
            .set(self.pool.local_waiting.get() - 1);
        self.pool
            .waiters
            .borrow_mut()
            .retain(|w| !Rc::ptr_eq(w, &self.slot));
        if let Some(Some(b)) = self.slot.try_take() {
            release(self.pools, b);
        }
    }
}

/// A backend for `pool`, connecting a new one within budget, else waiting for one. A waiter
/// keeps its place in the queue while it also retries the shared budget now and then.
pub async fn acquire(
    pools: &Rc<Pools>,
    pool: &Rc<Pool>,
    credential: &Credential,
    prefer: &RefCell<std::rc::Weak<Backend>>,
) -> Result<Rc<Backend>, LoginError> {
    let mut guard: Option<WaiterGuard<'_>> = None;
    // PgBouncer's query_wait_timeout: how long a request may wait for a backend in all.
    let wait_ms = pools.live.get().query_wait_timeout_ms;
    let give_up = (wait_ms > 0).then(|| Instant::now() + Duration::from_millis(wait_ms));
    let mut retries = 0u32;
    loop {
        let popped = {
            // The backend this session held last, if idle; else the one idle the shortest.
            let mut idle = pool.idle.borrow_mut();
            let last = prefer.borrow().upgrade();
            match last.and_then(|l| idle.iter().position(|b| Rc::ptr_eq(b, &l))) {
                Some(i) => Some(idle.remove(i)),
                None => idle.pop(),
            }
        };
        pool.note_idle();
        if let Some(b) = popped {
            if b.is_broken() {
                continue;
            }
            return Ok(b);
        }
        let mut reserved = if pool.leave_to_others(pools) {
            Reserve::PoolFull
        } else {
            pools.budgets.reserve(&pool.global)
        };
        // Spent by other pools' backends: one of them idle here gives its unit back (when
        // Postgres has ended it; this session waits for it in the queue below).
        let shed = match reserved {
            Reserve::TotalFull => Some(Want::Any),
            Reserve::UserFull => Some(Want::User((*pool.key).clone())),
            Reserve::DatabaseFull => Some(Want::Database((*pool.key).clone())),
            Reserve::Ok | Reserve::PoolFull => None,
        };
        if shed.is_some_and(|want| pools.shed_idle_here(&want, pool)) {
            reserved = pools.budgets.reserve(&pool.global);
        }
        let ask = match reserved {
            Reserve::Ok => {
                drop(guard.take());
                pool.add_local(true);
                // Given back if the login fails, and if this future is dropped before it ends
                // (the session's client left meanwhile: `ensure_backend`): a unit kept for a
                // backend that never came would shrink the pool for good.
                let unit = Unit { pools, pool };
                let timeout = Duration::from_secs(pools.live.get().connect_timeout_seconds);
                let connecting =
                    backend::connect(pools, &pools.setup, timeout, pool, &pool.key, credential);
                let b = connecting.await?;
                std::mem::forget(unit);
                return Ok(b);
            }
            // Other cores shed only backends idle for a while (true surplus), and say so.
            Reserve::PoolFull => CoreMsg::Shed(Want::Pool((*pool.key).clone())),
            Reserve::UserFull => CoreMsg::Shed(Want::User((*pool.key).clone())),
            Reserve::DatabaseFull => CoreMsg::Shed(Want::Database((*pool.key).clone())),
            Reserve::TotalFull => CoreMsg::Shed(Want::Any),
        };
        // In the queue (and counted as waiting on this core) before the other cores hear of
        // it: they give a backend at once to a core whose sessions wait with none.
        let g = guard.get_or_insert_with(|| {
            let slot: Waiter = Rc::new(Slot::default());
            pool.waiters.borrow_mut().push_back(slot.clone());
            pool.global.waiting.fetch_add(1, Ordering::Relaxed);
            if let Some(share) = pool.global.cores.get(pool.core) {
                share.waiting.fetch_add(1, Ordering::Relaxed);
            }
            pool.local_waiting.set(pool.local_waiting.get() + 1);
            WaiterGuard {
                pools,
                pool,
                slot,
                since: Instant::now(),
            }
        });
        pools.peers.ask(ask);
        let retry = RETRY.saturating_mul(1 << retries.min(3)).min(RETRY_MAX);
        retries += 1;
        let left = give_up.map_or(retry, |t| t.saturating_duration_since(Instant::now()));
        if left.is_zero() {
            tracing::info!(user = %pool.key.user, db = %pool.key.database, wait_ms, "query_wait_timeout: no backend in time");
            return Err(LoginError::WaitTimeout);
        }
        let got = crate::with_timeout(retry.min(left), g.slot.take()).await;
        match got {
            Some(Some(b)) if !b.is_broken() => {
                drop(guard.take());
                return Ok(b);
            }
            Some(_) => {
                // Handed capacity (or a dead backend): try the budget again at once.
                drop(guard.take());
            }
            None if pool.local.get() == 0 => pools.say_starving(pool),
            None => {}
        }
    }
}

/// Returns a backend that no session owns any more.
pub fn release(pools: &Rc<Pools>, b: Rc<Backend>) {
    b.shown.released();
    let pool = b.pool.clone();
    if b.is_broken() {
        // Closed: its unit comes back when Postgres has ended it (the relay sees the socket end).
        return;
    }
    let lifetime = pools.live.get().server_lifetime_ms;
    if lifetime > 0 && b.created.elapsed() >= Duration::from_millis(lifetime) {
        // PgBouncer's server_lifetime: lived long enough; a waiter gets its unit and logs in anew.
        tracing::debug!(backend = b.id, "closing a backend past server_lifetime");
        close_for(pools, &b, None);
        return;
    }
    if std::mem::take(&mut b.st.borrow_mut().listening) {
        // The next session must not inherit its channels; queued ahead of that session's work.
        let mut q = Vec::new();
        shared::protocol::frontend::query(&mut q, "UNLISTEN *");
        b.send(&q, Some(Entry::Internal(Internal::Listen)));
    }
    if !b.st.borrow().real_names.is_empty() {
        // Copies of a session's SQL-prepared statements under its names: not for the next one.
        crate::sql_names::drop_real_names(&b);
    }
    if let Some(key) = pools.owed_to(&pool) {
        // This pool, or a poorer one, starves on another core: nothing there would ever free a
        // backend for its sessions, so this backend's unit goes to them.
        *b.yield_to.borrow_mut() = Some(key);
        close_for(pools, &b, None);
        return;
    }
    if let Some(other) = pools.poorer_pool_waiting(&pool) {
        // Fair share between pools: another pool here waits with fewer backends than this one
        // has, and only what this backend holds stops it (the total budget, or the user's or
        // the database's they share); this backend's unit goes to it.
        close_for(pools, &b, Some(other));
        return;
    }
    if pool.global.waiting.load(Ordering::Relaxed) > pool.local_waiting.get() {
        // Sessions of this pool wait on another core too. A backend cannot move between cores,
        // so giving it there costs a login: at once when that core has none at all, else only
        // when it has clearly waited more.
        if let Some(to) = pool.starving_core().or_else(|| pool.give_away_to()) {
            tracing::debug!(user = %pool.key.user, db = %pool.key.database, from = pools.peers.index, to, "moving a backend to another core");
            *b.yield_to.borrow_mut() = Some((*pool.key).clone());
            close_for(pools, &b, None);
            return;
        }
    }
    if pool.has_waiters() {
        if let Some(Some(b)) = pool.hand_to_waiter(Some(b)) {
            b.idle_since.set(Some(Instant::now()));
            pool.idle.borrow_mut().push(b);
            pool.note_idle();
        }
        return;
    }
    if pools.someone_else_waits(&pool) {
        // Another pool here is starved of a budget this backend holds (the total, or its
        // user's or database's): this backend's unit serves it better.
        close_for(pools, &b, None);
        return;
    }
    b.idle_since.set(Some(Instant::now()));
    pool.idle.borrow_mut().push(b);
    pool.note_idle();
}

/// Every core's `waited_us` of a pool, now.
fn waited_now(global: &PoolBudget) -> Vec<u64> {
    global
        .cores
        .iter()
        .map(|c| c.waited_us.load(Ordering::Relaxed))
        .collect()
}

/// Closes a backend we no longer want. Its budget unit is given back only when Postgres has
/// really ended it (see [`retire`]), so a pool never has more live backends than its budget;
/// `prefer`: the pool whose waiter gets the unit then.
pub fn close_for(pools: &Rc<Pools>, b: &Rc<Backend>, prefer: Option<Rc<Pool>>) {
    pools.forget_idle(b);
    *b.prefer.borrow_mut() = prefer;
    b.close();
}

/// A backend is gone (its connection ended): its budget unit is free again. Idempotent. Called
/// by the relay when the socket ends, and when a connection attempt fails.
pub fn retire(pools: &Rc<Pools>, b: &Rc<Backend>) {
    let prefer = b
        .prefer
        .borrow_mut()
        .take()
        .unwrap_or_else(|| b.pool.clone());
    if b.retired.replace(true) {
        return;
    }
    pools.forget_idle(b);
    b.pool.add_local(false);
    pools.budgets.give_back(&b.pool.global);
    if let Some(key) = b.yield_to.borrow_mut().take() {
        // Not to this core's waiters: they would take it before the starving core can.
        pools.peers.ask(CoreMsg::Freed { key: Some(key) });
        return;
    }
    pools.capacity_freed(&prefer);
    if b.announce_freed.get() {
        // Shed because another core asked: its waiters may take the unit now.
        pools.peers.ask(CoreMsg::Freed { key: None });
    }
    let pool = &b.pool;
    if pool.global.waiting.load(Ordering::Relaxed) > pool.local_waiting.get() {
        pools.peers.ask(CoreMsg::Freed {
            key: Some((*pool.key).clone()),
        });
    }
}

/// The pools of one core, and what they need to open backends and to share the budget with the
/// other cores. The core holds it (core.rs); the relays of its backends give them back here.
pub struct Pools {
    map: RefCell<HashMap<Rc<PoolKey>, Rc<Pool>>>,
    pub budgets: Arc<Budgets>,
    /// The other cores (budget messages).
    peers: Rc<Peers>,
    /// The config in force (timeouts, `server_lifetime_ms`).
    live: Rc<Live>,
    setup: Setup,
    /// Pools starving on other cores (`CoreMsg::Starving`) and when they said so: the next
    /// backend released here that may go to them is closed so they get its unit.
    owed: RefCell<Vec<(PoolKey, Instant)>>,
}

/// A backend's relay gives it back to its core's pools.
impl backend::Home for Pools {
    type Pool = Pool;

    fn release(self: &Rc<Self>, b: Rc<Backend>) {
        release(self, b);
    }

    fn retire(self: &Rc<Self>, b: &Rc<Backend>) {
        retire(self, b);
    }
}

impl Pools {
    pub fn new(
        cfg: Rc<Config>,
        live: Rc<Live>,
        admin: Rc<Admin>,
        budgets: Arc<Budgets>,
        peers: Rc<Peers>,
    ) -> Pools {
        Pools {
            map: RefCell::new(HashMap::new()),
            budgets,
            peers,
            live,
            setup: Setup::new(cfg, admin),
            owed: RefCell::new(Vec::new()),
        }
    }

    /// The pool of (`user`, `database`) on this core, made on first use with the database's
    /// `listener`.
    pub fn pool_for(
        &self,
        user: &str,
        database: &str,
        listener: impl FnOnce() -> Rc<Listener>,
    ) -> Rc<Pool> {
        let key = PoolKey {
            user: user.to_owned(),
            database: database.to_owned(),
        };
        if let Some(p) = self.map.borrow().get(&key) {
            return p.clone();
        }
        let global = self.budgets.counter(&key);
        let key = Rc::new(key);
        let pool = Rc::new(Pool::new(key.clone(), global, listener(), self.peers.index));
        self.map.borrow_mut().insert(key, pool.clone());
        pool
    }

    /// Every pool of this core.
    pub fn all(&self) -> Vec<Rc<Pool>> {
        self.map.borrow().values().cloned().collect()
    }

    /// Wakes one waiter that could now connect a backend.
    pub fn capacity_freed(&self, preferred: &Rc<Pool>) {
        if preferred.has_waiters() {
            preferred.hand_to_waiter(None);
            return;
        }
        let pools: Vec<Rc<Pool>> = self.map.borrow().values().cloned().collect();
        for p in pools {
            if p.has_waiters() {
                p.hand_to_waiter(None);
                return;
            }
        }
    }

    /// A pool here, other than `pool`, whose sessions wait with fewer backends than `pool` has:
    /// here, or (when it has none here) on all cores.
    fn poorer_pool_waiting(&self, pool: &Rc<Pool>) -> Option<Rc<Pool>> {
        let total = |p: &Pool| p.global.count.load(Ordering::Relaxed);
        self.map
            .borrow()
            .values()
            .filter(|p| {
                *p.key != *pool.key
                    && p.has_waiters()
                    && self.budgets.would_serve(&pool.global, &p.global)
                    && (p.local.get() + 1 < pool.local.get()
                        || (p.local.get() == 0 && total(p) + 1 < total(pool)))
            })
            .min_by_key(|p| p.local.get())
            .cloned()
    }

    /// Sessions of `pool` wait here, where it has no backend: tell the other cores (see
    /// `owed_to`), at most every `STARVING_ASK`.
    fn say_starving(&self, pool: &Pool) {
        let now = Instant::now();
        if pool
            .last_starving_ask
            .get()
            .is_some_and(|t| now.duration_since(t) < STARVING_ASK)
        {
            return;
        }
        pool.last_starving_ask.set(Some(now));
        tracing::debug!(user = %pool.key.user, db = %pool.key.database, core = self.peers.index, "pool starving on this core");
        self.peers.ask(CoreMsg::Starving {
            key: (*pool.key).clone(),
        });
    }

    /// Another core says `key` starves there.
    pub fn on_starving(&self, key: PoolKey) {
        let now = Instant::now();
        let mut owed = self.owed.borrow_mut();
        match owed.iter_mut().find(|(k, _)| *k == key) {
            Some(e) => e.1 = now,
            None => owed.push((key, now)),
        }
    }

    /// A pool starving on another core that a backend of `pool` released here should go to:
    /// `pool` itself (its backends are all here), or one with fewer backends in all that may
    /// still have more. Taken off the list.
    fn owed_to(&self, pool: &Pool) -> Option<PoolKey> {
        let mut owed = self.owed.borrow_mut();
        if owed.is_empty() {
            return None;
        }
        let now = Instant::now();
        owed.retain(|(_, at)| now.duration_since(*at) < OWED_FOR);
        let mine = pool.global.count.load(Ordering::Relaxed);
        let i = owed.iter().position(|(k, _)| {
            if *k == *pool.key {
                return true;
            }
            let other = self.budgets.counter(k);
            self.budgets.would_serve(&pool.global, &other)
                && other.count.load(Ordering::Relaxed) + 1 < mine
        })?;
        Some(owed.swap_remove(i).0)
    }

    fn someone_else_waits(&self, pool: &Pool) -> bool {
        self.map.borrow().values().any(|p| {
            *p.key != *pool.key
                && p.has_waiters()
                && self.budgets.would_serve(&pool.global, &p.global)
        })
    }

    /// Frees the budget unit of an idle backend of another pool on this core that `want`s of
    /// `pool`, for a waiter of `pool`.
    fn shed_idle_here(self: &Rc<Self>, want: &Want, pool: &Rc<Pool>) -> bool {
        let victim = self
            .map
            .borrow()
            .values()
            .find(|p| *p.key != *pool.key && want.served_by(&p.key) && !p.idle.borrow().is_empty())
            .cloned();
        victim.is_some_and(|p| p.shed_one(self, Duration::ZERO, Some(pool.clone())))
    }

    /// Another core freed budget for this pool: let a waiter here try again now.
    pub fn on_freed(&self, key: Option<PoolKey>) {
        let pools: Vec<Rc<Pool>> = match &key {
            Some(k) => self.map.borrow().get(k).cloned().into_iter().collect(),
            None => self.map.borrow().values().cloned().collect(),
        };
        for p in pools {
            if p.has_waiters() {
                p.hand_to_waiter(None);
            }
        }
    }

    /// Another core is starved: close an idle backend here that gives it what it `want`s.
    pub fn on_shed(self: &Rc<Self>, want: Want) {
        if self.shed_now(&want) {
            return;
        }
        // Nothing idle long enough yet: look once more a little later rather than leave the
        // other core's sessions to their safety-net retry.
        let pools = self.clone();
        glommio::spawn_local(async move {
            glommio::timer::sleep(SHED_AFTER_IDLE).await;
            pools.shed_now(&want);
        })
        .detach();
    }

    fn shed_now(self: &Rc<Self>, want: &Want) -> bool {
        let pools: Vec<Rc<Pool>> = self.map.borrow().values().cloned().collect();
        let now = Instant::now();
        // Asked for a pool that has no backend at all: whatever serves it is surplus here.
        let asker_has_none = want
            .asker()
            .is_some_and(|k| self.budgets.counter(k).count.load(Ordering::Relaxed) == 0);
        for p in pools {
            // Asked for one pool (its own backends, or its user's or database's): only surplus,
            // not a backend this core's sessions need, unless the asking core has none at all
            // (then it is the only way it is served).
            let starving = if want.asker() == Some(&*p.key) {
                p.starving_core().is_some()
            } else {
                asker_has_none
            };
            let needed_here = want.asker().is_some()
                && p.last_wait
                    .get()
                    .is_some_and(|t| now.duration_since(t) < SURPLUS_AFTER_WAIT)
                && !starving;
            if want.served_by(&p.key)
                && !p.has_waiters()
                && !needed_here
                && p.shed_one(self, SHED_AFTER_IDLE, None)
            {
                return true;
            }
        }
        false
    }

    /// Closes every idle backend of every pool on this core connected to `database` (the core
    /// also closes its listening connection: `Core::release_database`).
    pub fn release_database(self: &Rc<Self>, database: &str) {
        let pools: Vec<Rc<Pool>> = self
            .map
            .borrow()
            .values()
            .filter(|p| p.key.database == database)
            .cloned()
            .collect();
        let mut closed = 0;
        for pool in pools {
            while pool.shed_one(self, Duration::ZERO, None) {
                closed += 1;
            }
        }
        if closed > 0 {
            tracing::info!(
                database,
                closed,
                "closed idle backends of a database being dropped or copied"
            );
        }
    }

    /// Drops a backend from the idle list (it died, or was shed).
    pub fn forget_idle(&self, b: &Rc<Backend>) {
        {
            let mut idle = b.pool.idle.borrow_mut();
            if let Some(i) = idle.iter().position(|x| Rc::ptr_eq(x, b)) {
                idle.swap_remove(i);
            }
        }
        b.pool.note_idle();
    }
}
