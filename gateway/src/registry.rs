//! The process's registry of clients, as the admin console (admin/) and the metrics
//! (metrics.rs) read it, and what the console asks of the whole process: the paused databases,
//! kill requests, reload and drain. Below the cores: a session registers itself here at login.
//!
//! The registry is per core: a core touches only its own map, under a mutex that nobody else
//! takes except the console when it reads (so uncontended: one lock at a client's login and one
//! at its end, never per request). Per-request facts (state, queries, bytes, times) are atomics
//! of the client's entry that only its own core writes (a relaxed load and store, no
//! read-modify-write); the console reads them whenever it likes.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Instant, SystemTime};

/// What a client is doing, as SHOW CLIENTS says it.
pub mod state {
    /// Logged in, no request in flight, no transaction open.
    pub const IDLE: u8 = 0;
    /// A request in flight or a transaction open.
    pub const ACTIVE: u8 = 1;
    /// Held by PAUSE.
    pub const WAITING: u8 = 2;
}

/// One client of the process, as the console sees it.
pub struct Client {
    pub user: String,
    pub database: String,
    pub addr: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub connected: SystemTime,
    pub pid: i32,
    pub application_name: String,
    pub core: usize,
    state: AtomicU8,
    killed: AtomicBool,
    /// Unix microseconds of the last request.
    request_time: AtomicU64,
    pub stats: Counters,
}

/// PgBouncer's SHOW STATS totals, for a client or summed over a database.
#[derive(Default)]
pub struct Counters {
    pub xacts: AtomicU64,
    pub queries: AtomicU64,
    pub received: AtomicU64,
    pub sent: AtomicU64,
    pub xact_us: AtomicU64,
    pub query_us: AtomicU64,
    pub wait_us: AtomicU64,
}

/// Adds on a counter only its own core writes: no locked instruction on the hot path.
#[inline]
pub fn bump(c: &AtomicU64, n: u64) {
    c.store(c.load(Ordering::Relaxed).wrapping_add(n), Ordering::Relaxed);
}

impl Counters {
    fn add_to(&self, into: &Counters) {
        for (a, b) in self.fields().iter().zip(into.fields()) {
            b.fetch_add(a.load(Ordering::Relaxed), Ordering::Relaxed);
        }
    }

    fn fields(&self) -> [&AtomicU64; 7] {
        [
            &self.xacts,
            &self.queries,
            &self.received,
            &self.sent,
            &self.xact_us,
            &self.query_us,
            &self.wait_us,
        ]
    }

    pub fn get(&self) -> [u64; 7] {
        self.fields().map(|f| f.load(Ordering::Relaxed))
    }
}

impl Client {
    pub fn set_state(&self, s: u8) {
        if self.state.load(Ordering::Relaxed) != s {
            self.state.store(s, Ordering::Relaxed);
        }
    }

    pub fn state(&self) -> u8 {
        self.state.load(Ordering::Relaxed)
    }

    pub fn killed(&self) -> bool {
        self.killed.load(Ordering::Relaxed)
    }

    pub fn requested(&self) {
        self.request_time
            .store(unix_us(SystemTime::now()), Ordering::Relaxed);
    }

    pub fn request_time(&self) -> u64 {
        self.request_time.load(Ordering::Relaxed)
    }
}

pub fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// What the console may do to the process: reload it, drain it.
pub struct Control {
    /// Re-reads the config file and publishes it (as SIGHUP). Runs on a thread of its own.
    pub reload: Box<dyn Fn() + Send + Sync>,
    /// Starts the drain (as SIGTERM).
    pub shutdown: Box<dyn Fn() + Send + Sync>,
    /// `SET key = value`: the config in force with one key changed, published to every core
    /// (`Config::set`; `Err` is a SQLSTATE and a message).
    pub set: SetFn,
}

pub type SetFn = Box<dyn Fn(&str, &str) -> Result<(), (&'static str, String)> + Send + Sync>;

/// The console's view of the whole process, shared by every core.
pub struct Shared {
    cores: Vec<Mutex<HashMap<u64, Arc<Client>>>>,
    next_id: AtomicU64,
    /// Totals of clients that ended, per database.
    closed: Mutex<HashMap<String, Counters>>,
    /// PAUSE: databases paused (`None` in the list: all of them).
    paused: Mutex<Vec<Option<String>>>,
    any_paused: AtomicBool,
    /// Bumped by KILL and RESUME: each core wakes its sessions (`Core::drain_notify`) so the
    /// killed ones end and the held ones go on at once, without polling.
    kills: AtomicU64,
    pub control: Control,
    pub started: Instant,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A registered client; leaving the registry (and adding its totals to its database's) when
/// dropped.
pub struct Registered {
    pub client: Arc<Client>,
    id: u64,
    shared: Arc<Shared>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let core = self.client.core;
        lock(&self.shared.cores[core]).remove(&self.id);
        let mut closed = lock(&self.shared.closed);
        let into = closed.entry(self.client.database.clone()).or_default();
        self.client.stats.add_to(into);
    }
}

/// What a new client tells the registry.
pub struct NewClient<'a> {
    pub user: &'a str,
    pub database: &'a str,
    pub addr: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub pid: i32,
    pub application_name: &'a str,
}

impl Shared {
    pub fn new(cores: usize, control: Control) -> Arc<Shared> {
        Arc::new(Shared {
            cores: (0..cores.max(1)).map(|_| Mutex::default()).collect(),
            next_id: AtomicU64::new(1),
            closed: Mutex::default(),
            paused: Mutex::default(),
            any_paused: AtomicBool::new(false),
            kills: AtomicU64::new(0),
            control,
            started: Instant::now(),
        })
    }

    /// This executor's slot (executors are numbered from 1).
    fn core_index(&self) -> usize {
        glommio::executor().id().saturating_sub(1) % self.cores.len()
    }

    pub fn register(self: &Arc<Self>, c: NewClient<'_>) -> Registered {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let core = self.core_index();
        let client = Arc::new(Client {
            user: c.user.to_owned(),
            database: c.database.to_owned(),
            addr: c.addr,
            local: c.local,
            connected: SystemTime::now(),
            pid: c.pid,
            application_name: c.application_name.to_owned(),
            core,
            state: AtomicU8::new(state::IDLE),
            killed: AtomicBool::new(false),
            request_time: AtomicU64::new(unix_us(SystemTime::now())),
            stats: Counters::default(),
        });
        lock(&self.cores[core]).insert(id, client.clone());
        Registered {
            client,
            id,
            shared: self.clone(),
        }
    }

    /// Every client now, in login order.
    pub fn clients(&self) -> Vec<Arc<Client>> {
        let mut all: Vec<(u64, Arc<Client>)> = Vec::new();
        for c in &self.cores {
            all.extend(lock(c).iter().map(|(k, v)| (*k, v.clone())));
        }
        all.sort_by_key(|(k, _)| *k);
        all.into_iter().map(|(_, c)| c).collect()
    }

    /// Totals per database: ended clients plus live ones.
    pub fn totals(&self) -> Vec<(String, [u64; 7])> {
        let mut by_db: HashMap<String, [u64; 7]> = HashMap::new();
        for (db, c) in lock(&self.closed).iter() {
            by_db.insert(db.clone(), c.get());
        }
        for c in self.clients() {
            let e = by_db.entry(c.database.clone()).or_default();
            for (a, b) in e.iter_mut().zip(c.stats.get()) {
                *a += b;
            }
        }
        let mut v: Vec<_> = by_db.into_iter().collect();
        v.sort();
        v
    }

    /// Whether requests to `database` wait now. One relaxed load when nothing is paused.
    #[inline]
    pub fn paused(&self, database: &str) -> bool {
        if !self.any_paused.load(Ordering::Relaxed) {
            return false;
        }
        lock(&self.paused)
            .iter()
            .any(|p| p.as_deref().is_none_or(|d| d == database))
    }

    /// `None`: every database. False when it was already paused.
    pub fn pause(&self, database: Option<&str>) -> bool {
        let mut p = lock(&self.paused);
        let key = database.map(str::to_owned);
        if p.contains(&key) {
            return false;
        }
        p.push(key);
        self.any_paused.store(true, Ordering::Relaxed);
        true
    }

    /// False when it was not paused.
    pub fn resume(&self, database: Option<&str>) -> bool {
        let mut p = lock(&self.paused);
        let before = p.len();
        match database {
            // RESUME alone lifts every pause.
            None => p.clear(),
            Some(d) => p.retain(|x| x.as_deref() != Some(d)),
        }
        self.any_paused.store(!p.is_empty(), Ordering::Relaxed);
        self.kills.fetch_add(1, Ordering::Release);
        p.len() != before
    }

    /// Marks the clients of `database` (`None`: all but the console's) to end; returns how many.
    pub fn kill(&self, database: Option<&str>, console_db: &str) -> usize {
        let mut n = 0;
        for c in self.clients() {
            let hit = match database {
                Some(d) => c.database == d,
                None => c.database != console_db,
            };
            if hit {
                c.killed.store(true, Ordering::Relaxed);
                n += 1;
            }
        }
        self.kills.fetch_add(1, Ordering::Release);
        n
    }

    /// Tests: a database's totals as if a client with one query had ended.
    #[cfg(test)]
    pub fn add_ended_for_test(&self, database: &str) {
        let mut closed = lock(&self.closed);
        let c = closed.entry(database.to_owned()).or_default();
        for f in c.fields() {
            f.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Bumped by every KILL and RESUME: a core that sees it change wakes its sessions.
    pub fn kill_generation(&self) -> u64 {
        self.kills.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pause_and_resume() {
        let s = Shared::new(
            1,
            Control {
                reload: Box::new(|| {}),
                shutdown: Box::new(|| {}),
                set: Box::new(|_, _| Ok(())),
            },
        );
        assert!(!s.paused("app"));
        assert!(s.pause(Some("app")));
        assert!(!s.pause(Some("app")), "already paused");
        assert!(s.paused("app"));
        assert!(!s.paused("other"));
        assert!(s.pause(None));
        assert!(s.paused("other"));
        assert!(s.resume(Some("app")));
        assert!(s.paused("app"), "still under the pause of all");
        assert!(s.resume(None));
        assert!(!s.paused("app"));
        assert!(!s.resume(None));
    }
}
