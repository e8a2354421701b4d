//! Backend budgets shared by all cores: per (user, database), per user, per database and in
//! total (PgBouncer's `pool_size`, `max_user_connections`, `max_db_connections`,
//! `max_client_conn`'s backend side). A core takes a unit of each only to connect a new backend
//! and gives them back when the backend is gone, so the atomics are touched per connection,
//! never per request. Splitting budgets per core instead would strand a
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
    /// The limits change on a reload (SIGHUP); lowering one closes nothing, it only stops new
    /// backends until enough have gone.
    max_total: AtomicUsize,
    pool_size: AtomicUsize,
    /// 0: no limit (as PgBouncer's `max_user_connections` and `max_db_connections`).
    per_user: AtomicUsize,
    per_database: AtomicUsize,
    /// Pooler cores: each pool has a `CoreShare` per core.
    cores: usize,
    /// Looked up once per pool per core (when the pool is created), not per request.
    pools: Mutex<HashMap<PoolKey, Arc<PoolBudget>>>,
    /// What all pools of one user, or of one database, share; looked up when a pool is first
    /// made (with `pools`' lock held).
    users: Mutex<HashMap<String, Arc<UserBudget>>>,
    databases: Mutex<HashMap<String, Arc<AtomicUsize>>>,
}

/// The limits a reload may change (config.rs keys of the same names; `max_total` is
/// `max_backends`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    pub pool_size: usize,
    pub max_total: usize,
    /// Backends of one user on all its databases; 0: no limit.
    pub per_user: usize,
    /// Backends of one database for all its users; 0: no limit.
    pub per_database: usize,
}

/// One user across its databases and all cores.
#[derive(Default)]
pub struct UserBudget {
    /// Backends, connected or connecting.
    pub backends: AtomicUsize,
    /// Bytes of prepared statements its sessions hold (`statements::Statements`, charged where
    /// a session's own bound is), bounded by `max_user_statement_bytes`.
    pub statement_bytes: AtomicUsize,
}

/// One (user, database) across all cores.
pub struct PoolBudget {
    /// Backends, connected or connecting.
    pub count: AtomicUsize,
    /// Its user's budget, shared with the user's other pools.
    pub user: Arc<UserBudget>,
    /// Its database's backends, shared with the database's other pools.
    pub database: Arc<AtomicUsize>,
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
    /// A pool whose user and database share nothing with any other (unit tests); pools get
    /// theirs from [`Budgets::counter`].
    #[cfg(test)]
    pub fn new(cores: usize) -> PoolBudget {
        PoolBudget::of(cores, Arc::default(), Arc::default())
    }

    fn of(cores: usize, user: Arc<UserBudget>, database: Arc<AtomicUsize>) -> PoolBudget {
        PoolBudget {
            count: AtomicUsize::new(0),
            user,
            database,
            waiting: AtomicUsize::new(0),
            cores: (0..cores.max(1)).map(|_| CoreShare::default()).collect(),
        }
    }
}

impl Budgets {
    pub fn new(limits: Limits, cores: usize) -> Arc<Budgets> {
        let b = Budgets {
            total: AtomicUsize::new(0),
            max_total: AtomicUsize::new(0),
            pool_size: AtomicUsize::new(0),
            per_user: AtomicUsize::new(0),
            per_database: AtomicUsize::new(0),
            cores,
            pools: Mutex::new(HashMap::new()),
            users: Mutex::new(HashMap::new()),
            databases: Mutex::new(HashMap::new()),
        };
        b.set_limits(limits);
        Arc::new(b)
    }

    pub fn counter(&self, key: &PoolKey) -> Arc<PoolBudget> {
        let mut pools = self.pools.lock();
        if let Some(p) = pools.get(key) {
            return p.clone();
        }
        let user = self
            .users
            .lock()
            .entry(key.user.clone())
            .or_default()
            .clone();
        let database = self
            .databases
            .lock()
            .entry(key.database.clone())
            .or_default()
            .clone();
        let p = Arc::new(PoolBudget::of(self.cores, user, database));
        pools.insert(key.clone(), p.clone());
        p
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
    pub fn set_limits(&self, l: Limits) {
        self.pool_size.store(l.pool_size.max(1), Ordering::Relaxed);
        self.max_total.store(l.max_total.max(1), Ordering::Relaxed);
        self.per_user.store(l.per_user, Ordering::Relaxed);
        self.per_database.store(l.per_database, Ordering::Relaxed);
    }

    /// Takes a unit of every budget `pool` draws from (its own, its user's, its database's,
    /// the total), or of none. Limits are checked in that order, so the outcome names the
    /// narrowest one that is spent.
    pub fn reserve(&self, pool: &PoolBudget) -> Reserve {
        let per = |n: &AtomicUsize| match n.load(Ordering::Relaxed) {
            0 => usize::MAX,
            n => n,
        };
        let steps: [(&AtomicUsize, usize, Reserve); 4] = [
            (&pool.count, self.pool_size(), Reserve::PoolFull),
            (&pool.user.backends, per(&self.per_user), Reserve::UserFull),
            (
                &*pool.database,
                per(&self.per_database),
                Reserve::DatabaseFull,
            ),
            (&self.total, self.max_total(), Reserve::TotalFull),
        ];
        for (i, (n, limit, full)) in steps.iter().enumerate() {
            if n.fetch_add(1, Ordering::AcqRel) >= *limit {
                for (taken, _, _) in &steps[..=i] {
                    taken.fetch_sub(1, Ordering::AcqRel);
                }
                return *full;
            }
        }
        Reserve::Ok
    }

    /// This (user, database) has all the backends it may have.
    pub fn pool_full(&self, pool: &PoolBudget) -> bool {
        pool.count.load(Ordering::Acquire) >= self.pool_size()
    }

    /// Whether the unit of a backend of `from`, once given back, lets `to` have one more (the
    /// total budget aside): `to` is short of nothing but what `from` gives back. A backend
    /// closed for another pool that its user's or database's limit still stops would be a
    /// login lost for nothing.
    pub fn would_serve(&self, from: &PoolBudget, to: &PoolBudget) -> bool {
        let full = |n: &AtomicUsize, limit: usize| limit > 0 && n.load(Ordering::Acquire) >= limit;
        let same_user = Arc::ptr_eq(&from.user, &to.user);
        let same_db = Arc::ptr_eq(&from.database, &to.database);
        !self.pool_full(to)
            && (same_user || !full(&to.user.backends, self.per_user.load(Ordering::Relaxed)))
            && (same_db || !full(&to.database, self.per_database.load(Ordering::Relaxed)))
    }

    pub fn give_back(&self, pool: &PoolBudget) {
        pool.count.fetch_sub(1, Ordering::AcqRel);
        pool.user.backends.fetch_sub(1, Ordering::AcqRel);
        pool.database.fetch_sub(1, Ordering::AcqRel);
        self.total.fetch_sub(1, Ordering::AcqRel);
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reserve {
    Ok,
    /// This (user, database) has all its backends.
    PoolFull,
    /// Its user has all its backends (`max_user_connections`), over its databases.
    UserFull,
    /// Its database has all its backends (`max_db_connections`), over its users.
    DatabaseFull,
    /// The pooler has all its backends.
    TotalFull,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(user: &str, database: &str) -> PoolKey {
        PoolKey {
            user: user.into(),
            database: database.into(),
        }
    }

    fn limits(pool_size: usize, max_total: usize) -> Limits {
        Limits {
            pool_size,
            max_total,
            per_user: 0,
            per_database: 0,
        }
    }

    #[test]
    fn budgets() {
        let b = Budgets::new(limits(2, 3), 2);
        let (k1, k2) = (key("a", "d"), key("b", "d"));
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

    #[test]
    fn a_user_is_bounded_over_its_databases() {
        let b = Budgets::new(
            Limits {
                per_user: 3,
                ..limits(10, 100)
            },
            2,
        );
        let (a1, a2, other) = (
            b.counter(&key("a", "d1")),
            b.counter(&key("a", "d2")),
            b.counter(&key("b", "d1")),
        );
        assert!(Arc::ptr_eq(&a1.user, &a2.user));
        assert!(!Arc::ptr_eq(&a1.user, &other.user));
        assert_eq!(b.reserve(&a1), Reserve::Ok);
        assert_eq!(b.reserve(&a1), Reserve::Ok);
        assert_eq!(b.reserve(&a2), Reserve::Ok);
        assert_eq!(b.reserve(&a2), Reserve::UserFull);
        assert_eq!(b.reserve(&a1), Reserve::UserFull);
        // Refused without keeping anything: the pool's, the database's and the total units
        // taken before the user's came back.
        assert_eq!(a2.count.load(Ordering::Relaxed), 1);
        assert_eq!(a1.database.load(Ordering::Relaxed), 2);
        assert_eq!(b.total.load(Ordering::Relaxed), 3);
        // Another user has a limit of its own, not what is left of a's.
        for _ in 0..3 {
            assert_eq!(b.reserve(&other), Reserve::Ok);
        }
        assert_eq!(b.reserve(&other), Reserve::UserFull);
        // A backend of d1 gone: d2 may have one more; one of user b gone: nothing for a.
        assert!(b.would_serve(&a1, &a2));
        assert!(!b.would_serve(&other, &a2));
        b.give_back(&other);
        assert_eq!(b.reserve(&a2), Reserve::UserFull);
        b.give_back(&a1);
        assert_eq!(b.reserve(&a2), Reserve::Ok);
        assert_eq!(a1.user.backends.load(Ordering::Relaxed), 3);
        // 0 is no limit, and a reload applies at once.
        b.set_limits(limits(10, 100));
        assert_eq!(b.reserve(&a2), Reserve::Ok);
        assert!(b.would_serve(&other, &a2));
    }

    #[test]
    fn a_database_is_bounded_over_its_users() {
        let b = Budgets::new(
            Limits {
                per_database: 2,
                ..limits(10, 100)
            },
            1,
        );
        let (a, bb, elsewhere) = (
            b.counter(&key("a", "d")),
            b.counter(&key("b", "d")),
            b.counter(&key("a", "e")),
        );
        assert_eq!(b.reserve(&a), Reserve::Ok);
        assert_eq!(b.reserve(&bb), Reserve::Ok);
        assert_eq!(b.reserve(&a), Reserve::DatabaseFull);
        assert_eq!(b.reserve(&elsewhere), Reserve::Ok);
        assert_eq!(a.user.backends.load(Ordering::Relaxed), 2);
        assert!(b.would_serve(&bb, &a));
        assert!(!b.would_serve(&elsewhere, &a));
        b.give_back(&bb);
        assert_eq!(b.reserve(&a), Reserve::Ok);
    }

    #[test]
    fn the_narrowest_spent_limit_is_named() {
        let b = Budgets::new(
            Limits {
                per_user: 1,
                per_database: 1,
                ..limits(1, 1)
            },
            1,
        );
        let a = b.counter(&key("a", "d"));
        assert_eq!(b.reserve(&a), Reserve::Ok);
        assert_eq!(b.reserve(&a), Reserve::PoolFull);
        assert_eq!(b.reserve(&b.counter(&key("a", "e"))), Reserve::UserFull);
        assert_eq!(b.reserve(&b.counter(&key("b", "d"))), Reserve::DatabaseFull);
        assert_eq!(b.reserve(&b.counter(&key("b", "e"))), Reserve::TotalFull);
        b.give_back(&a);
        assert_eq!(b.total.load(Ordering::Relaxed), 0);
        assert_eq!(b.reserve(&b.counter(&key("b", "e"))), Reserve::Ok);
    }
}
