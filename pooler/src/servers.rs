//! Every real backend of the process, for the gateway admin console's SHOW SERVERS (answered
//! with `up::POOLS`, see `pools_report.rs`). A backend lives on one core as an `Rc`; what the
//! console shows of it is an `Arc<Server>` registered here at login and gone when the backend
//! is dropped. Its changing facts are atomics only its own core writes (a relaxed store when a
//! session takes it or gives it back, no locked instruction); the registry's lock is taken at a
//! backend's login and end (each a round trip to Postgres anyway) and by the console.

use parking_lot::Mutex;
use shared::link::{server_state, ServerFact};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicI32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime};

static SERVERS: Mutex<BTreeMap<u64, Arc<Server>>> = Mutex::new(BTreeMap::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One backend as the console sees it.
pub struct Server {
    pub user: String,
    pub database: String,
    pub addr: Option<SocketAddr>,
    pub local: Option<SocketAddr>,
    pub pid: i32,
    connected: SystemTime,
    created: Instant,
    state: AtomicU8,
    /// Unix microseconds of when a session last took it.
    request_time: AtomicU64,
    /// The client pid of the session holding it (0: none).
    link: AtomicI32,
}

/// A registered backend; leaves the registry when dropped (with its `Backend`).
pub struct Shown {
    id: u64,
    server: Arc<Server>,
}

impl Drop for Shown {
    fn drop(&mut self) {
        SERVERS.lock().remove(&self.id);
    }
}

fn unix_us(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// A backend that just logged in (taken by the session that asked for it: active).
pub fn register(
    user: &str,
    database: &str,
    addr: Option<SocketAddr>,
    local: Option<SocketAddr>,
    pid: i32,
) -> Shown {
    let now = SystemTime::now();
    let server = Arc::new(Server {
        user: user.to_owned(),
        database: database.to_owned(),
        addr,
        local,
        pid,
        connected: now,
        created: Instant::now(),
        state: AtomicU8::new(server_state::ACTIVE),
        request_time: AtomicU64::new(unix_us(now)),
        link: AtomicI32::new(0),
    });
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    SERVERS.lock().insert(id, server.clone());
    Shown { id, server }
}

impl Shown {
    /// A session (known to its client by `client_pid`) took the backend.
    #[inline]
    pub fn taken(&self, client_pid: i32) {
        let s = &self.server;
        s.state.store(server_state::ACTIVE, Ordering::Relaxed);
        s.link.store(client_pid, Ordering::Relaxed);
        s.request_time
            .store(unix_us(SystemTime::now()), Ordering::Relaxed);
    }

    /// Given back to its pool.
    #[inline]
    pub fn released(&self) {
        let s = &self.server;
        s.state.store(server_state::IDLE, Ordering::Relaxed);
        s.link.store(0, Ordering::Relaxed);
    }
}

/// Every backend now, in login order; `lifetime_ms` (server_lifetime, 0: none) says which
/// are due to close.
pub fn facts(lifetime_ms: u64) -> Vec<ServerFact> {
    let all: Vec<(u64, Arc<Server>)> = SERVERS
        .lock()
        .iter()
        .map(|(k, v)| (*k, v.clone()))
        .collect();
    all.into_iter()
        .map(|(id, s)| ServerFact {
            id,
            user: s.user.clone(),
            database: s.database.clone(),
            state: s.state.load(Ordering::Relaxed),
            addr: s.addr,
            local: s.local,
            connect_time: unix_us(s.connected),
            request_time: s.request_time.load(Ordering::Relaxed),
            pid: s.pid,
            link: s.link.load(Ordering::Relaxed),
            close_needed: lifetime_ms > 0 && s.created.elapsed().as_millis() >= lifetime_ms as u128,
            // Backends connect without TLS (Postgres on this node, over loopback).
            tls: false,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_while_alive_and_states_follow() {
        let a = register("u1", "d", None, None, 101);
        let b = register(
            "u2",
            "d",
            Some("127.0.0.1:5432".parse().unwrap()),
            None,
            102,
        );
        let mine = |f: &[ServerFact]| -> Vec<(i32, u8, i32)> {
            f.iter()
                .filter(|s| s.pid == 101 || s.pid == 102)
                .map(|s| (s.pid, s.state, s.link))
                .collect()
        };
        b.released();
        a.taken(77);
        assert_eq!(
            mine(&facts(0)),
            vec![
                (101, server_state::ACTIVE, 77),
                (102, server_state::IDLE, 0)
            ]
        );
        assert!(facts(0).iter().all(|s| !s.close_needed));
        drop(a);
        assert_eq!(mine(&facts(0)), vec![(102, server_state::IDLE, 0)]);
        drop(b);
        assert!(mine(&facts(0)).is_empty());
    }
}
