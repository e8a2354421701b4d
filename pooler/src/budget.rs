//! Backend budgets shared by all cores: per (user, database) and in total. A core takes a unit
//! only to connect a new backend and gives it back when the backend is gone, so the atomics are
//! touched per connection, never per request. Splitting budgets per core instead would strand a
//! session on a core whose backends are all pinned while another core has room.
//!
//! Each core also publishes its share of a pool (`CoreShare`): how many backends it holds and how
//! long its sessions waited. A core reads the others' shares at most every few hundred
//! milliseconds to decide whether one of its backends serves better on another core (see
//! `pool::Pool::give_away_to`); nothing here is read per request.

use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// A pool's identity: the (user, database) its backends log in as.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PoolKey {
    pub user: String,
    pub database: String,
}

pub struct Budgets {
    total: AtomicUsize,
    /// Both limits change on a reload (SIGHUP); lowering one closes nothing, it only stops new
    /// backends until enough have gone.
    max_total: AtomicUsize,
    pool_size: AtomicUsize,
    /// Pooler cores: each pool has a `CoreShare` per core.
    cores: usize,
    /// Looked up once per pool per core (when the pool is created), not per request.
    pools: Mutex<HashMap<PoolKey, Arc<PoolBudget>>>,
}

/// One (user, database) across all cores.
pub struct PoolBudget {
    /// Backends, connected or connecting.
    pub count: AtomicUsize,
    /// Sessions waiting for a backend, on all cores (touched only while waiting).
    pub waiting: AtomicUsize,
    /// Per core: its backends and its sessions' waits, for slow rebalancing between cores.
    pub cores: Box<[CoreShare]>,
}

/// One core's part of a pool, written only by that core.
#[derive(Default)]
pub struct CoreShare {
    /// Backends of the pool on this core (connected or connecting).
    pub backends: AtomicUsize,
    /// Sessions of the pool on this core waiting for a backend.
    pub waiting: AtomicUsize,
    /// Microseconds that sessions of the pool on this core have waited for a backend, in all.
    pub waited_us: AtomicU64,
    /// Of `backends`, those idle in the pool (read by the admin console only).
    pub idle: AtomicUsize,
}

impl PoolBudget {
    pub fn new(cores: usize) -> PoolBudget {
        PoolBudget {
            count: AtomicUsize::new(0),
            waiting: AtomicUsize::new(0),
            cores: (0..cores.max(1)).map(|_| CoreShare::default()).collect(),
        }
    }
}

impl Budgets {
    pub fn new(pool_size: usize, max_total: usize, cores: usize) -> Arc<Budgets> {
        Arc::new(Budgets {
            total: AtomicUsize::new(0),
            max_total: AtomicUsize::new(max_total),
            pool_size: AtomicUsize::new(pool_size),
            cores,
            pools: Mutex::new(HashMap::new()),
        })
    }

    pub fn counter(&self, key: &PoolKey) -> Arc<PoolBudget> {
        self.pools
            .lock()
            .entry(key.clone())
            .or_insert_with(|| Arc::new(PoolBudget::new(self.cores)))
            .clone()
    }

    /// Every pool known to any core, for the admin console (a lock per console request, not
    /// per client request).
    pub fn all(&self) -> Vec<(PoolKey, Arc<PoolBudget>)> {
        self.pools
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// Backends the pooler may have in all.
    pub fn max_total(&self) -> usize {
        self.max_total.load(Ordering::Relaxed)
    }

    /// Backends each (user, database) may have, on all cores together.
    pub fn pool_size(&self) -> usize {
        self.pool_size.load(Ordering::Relaxed)
    }

    /// A reload changed the limits.
    pub fn set_limits(&self, pool_size: usize, max_total: usize) {
        self.pool_size.store(pool_size.max(1), Ordering::Relaxed);
        self.max_total.store(max_total.max(1), Ordering::Relaxed);
    }

    /// Takes a unit of both budgets, or neither.
    pub fn reserve(&self, pool: &PoolBudget) -> Reserve {
        let pool = &pool.count;
        if pool.fetch_add(1, Ordering::AcqRel) >= self.pool_size() {
            pool.fetch_sub(1, Ordering::AcqRel);
            return Reserve::PoolFull;
        }
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total.load(Ordering::Relaxed) {
            self.total.fetch_sub(1, Ordering::AcqRel);
            pool.fetch_sub(1, Ordering::AcqRel);
            return Reserve::TotalFull;
        }
        Reserve::Ok
    }

    /// This (user, database) has all the backends it may have.
    pub fn pool_full(&self, pool: &PoolBudget) -> bool {
        pool.count.load(Ordering::Acquire) >= self.pool_size()
    }

    pub fn give_back(&self, pool: &PoolBudget) {
        pool.count.fetch_sub(1, Ordering::AcqRel);
        self.total.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Reserve {
    Ok,
    /// This (user, database) has all its backends.
    PoolFull,
    /// The pooler has all its backends.
    TotalFull,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budgets() {
        let b = Budgets::new(2, 3, 2);
        let k1 = PoolKey {
            user: "a".into(),
            database: "d".into(),
        };
        let k2 = PoolKey {
            user: "b".into(),
            database: "d".into(),
        };
        let (c1, c2) = (b.counter(&k1), b.counter(&k2));
        assert_eq!(b.reserve(&c1), Reserve::Ok);
        assert_eq!(b.reserve(&c1), Reserve::Ok);
        assert_eq!(b.reserve(&c1), Reserve::PoolFull);
        assert_eq!(b.reserve(&c2), Reserve::Ok);
        assert_eq!(b.reserve(&c2), Reserve::TotalFull);
        b.give_back(&c1);
        assert_eq!(b.reserve(&c2), Reserve::Ok);
        assert!(Arc::ptr_eq(&c1, &b.counter(&k1)));
    }
}
