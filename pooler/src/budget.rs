//! Backend budgets shared by all cores: per (user, database) and in total. A core takes a unit
//! only to connect a new backend and gives it back when the backend is gone, so the atomics are
//! touched per connection, never per request. Splitting budgets per core instead would strand a
//! session on a core whose backends are all pinned while another core has room.

use crate::pool::PoolKey;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

pub struct Budgets {
    total: AtomicUsize,
    max_total: usize,
    pool_size: usize,
    /// Looked up once per pool per core (when the pool is created), not per request.
    pools: Mutex<HashMap<PoolKey, Arc<PoolBudget>>>,
}

/// One (user, database) across all cores.
#[derive(Default)]
pub struct PoolBudget {
    /// Backends, connected or connecting.
    pub count: AtomicUsize,
    /// Sessions waiting for a backend, on all cores (touched only while waiting).
    pub waiting: AtomicUsize,
}

impl Budgets {
    pub fn new(pool_size: usize, max_total: usize) -> Arc<Budgets> {
        Arc::new(Budgets {
            total: AtomicUsize::new(0),
            max_total,
            pool_size,
            pools: Mutex::new(HashMap::new()),
        })
    }

    pub fn counter(&self, key: &PoolKey) -> Arc<PoolBudget> {
        self.pools.lock().entry(key.clone()).or_default().clone()
    }

    /// Takes a unit of both budgets, or neither.
    pub fn reserve(&self, pool: &PoolBudget) -> Reserve {
        let pool = &pool.count;
        if pool.fetch_add(1, Ordering::AcqRel) >= self.pool_size {
            pool.fetch_sub(1, Ordering::AcqRel);
            return Reserve::PoolFull;
        }
        if self.total.fetch_add(1, Ordering::AcqRel) >= self.max_total {
            self.total.fetch_sub(1, Ordering::AcqRel);
            pool.fetch_sub(1, Ordering::AcqRel);
            return Reserve::TotalFull;
        }
        Reserve::Ok
    }

    /// This (user, database) has all the backends it may have.
    pub fn pool_full(&self, pool: &PoolBudget) -> bool {
        pool.count.load(Ordering::Acquire) >= self.pool_size
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
        let b = Budgets::new(2, 3);
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
