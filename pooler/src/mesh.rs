//! Messages between the pooler's cores (executors): the only cross-core traffic. Best effort
//! ([`Peers::ask`]: a full channel drops the message) or ordered and reliable ([`Outbox`]). A
//! leaf: it knows the messages, not what the cores do with them (`cancel::serve_peers`).

use crate::budget::PoolKey;
use glommio::channels::channel_mesh::Senders;
use shared::io::Notify;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Messages between cores (the only cross-core traffic).
#[derive(Clone, Debug)]
pub enum CoreMsg {
    /// Cancel the query of the session with these keys, wherever it is.
    Cancel(i32, i32),
    /// End the session with these keys, wherever it is (`pg_terminate_backend` of its pid).
    Terminate(i32, i32),
    /// A core is starved of budget: shed an idle backend that gives it what it lacks.
    Shed(Want),
    /// A core gave back budget for this pool (or, `None`, total budget): waiters may retry.
    Freed { key: Option<PoolKey> },
    /// Sessions of this pool wait on a core where the pool has no backend at all, and nothing
    /// there will free one for them: give them the unit of a backend released here.
    Starving { key: PoolKey },
    /// Close every idle backend connected to this database (it is about to be dropped,
    /// renamed or copied).
    ReleaseDb(String),
    /// To the owner core of `database`'s listening connection (listen.rs): sessions of core
    /// `from` started (`add`) or stopped (`remove`) listening on these channels.
    Listen {
        database: String,
        from: usize,
        add: Vec<String>,
        remove: Vec<String>,
    },
    /// To the owner core: answer `token` once the listening connection answered a query sent
    /// after everything `from` sent before.
    ListenBarrier {
        database: String,
        from: usize,
        token: u64,
    },
    /// From the owner core: the barrier `token` passed (`ok`: the connection answered), after
    /// every notification forwarded before it.
    ListenBarrierDone {
        database: String,
        token: u64,
        ok: bool,
    },
    /// From the owner core: a raw `NotificationResponse` for the sessions of this core.
    Notification { database: String, msg: Vec<u8> },
    /// Postgres is shutting down or crashed (server_end.rs): sessions holding no backend end
    /// with these last words (the backends' FATAL or WARNING).
    ServerEnded(Vec<u8>),
}

/// Whose idle backend a core starved of budget asks the others to close (`CoreMsg::Shed`),
/// and the same core looks for among its own pools first (`pool::acquire`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Want {
    /// Any pool's: the total budget is spent.
    Any,
    /// This pool's own: it has all its backends.
    Pool(PoolKey),
    /// One of this pool's user, on any of its databases: the user has all its backends
    /// (`max_user_connections`).
    User(PoolKey),
    /// One of this pool's database, of any of its users: the database has all its backends
    /// (`max_db_connections`).
    Database(PoolKey),
}

impl Want {
    /// The pool whose sessions wait, when the want is one pool's.
    pub fn asker(&self) -> Option<&PoolKey> {
        match self {
            Want::Any => None,
            Want::Pool(k) | Want::User(k) | Want::Database(k) => Some(k),
        }
    }

    /// Whether closing a backend of `pool` gives back a unit of what the asker lacks.
    pub fn served_by(&self, pool: &PoolKey) -> bool {
        match self {
            Want::Any => true,
            Want::Pool(k) => k == pool,
            Want::User(k) => k.user == pool.user,
            Want::Database(k) => k.database == pool.database,
        }
    }
}

/// Messages to other cores that must arrive, in order: one queue per core, drained by one task
/// per core (`cancel::serve_peers`) that waits while that core's channel is full. Whoever sends
/// never waits, and the mesh handlers never wait on a send either, so the channels always drain
/// and two cores cannot block each other. ([`Peers::ask`] is the best-effort path.)
pub struct Outbox {
    queues: Vec<RefCell<VecDeque<CoreMsg>>>,
    ready: Vec<Notify>,
    /// Bytes of notifications queued per core, bounded by `NOTES_LIMIT`.
    note_bytes: Vec<Cell<usize>>,
}

/// Notifications queued for one other core, in bytes; past it new ones are dropped (logged), as
/// a session's own queue is bounded (listen.rs).
const NOTES_LIMIT: usize = 16 << 20;

impl Outbox {
    pub fn new(cores: usize) -> Outbox {
        Outbox {
            queues: (0..cores).map(|_| RefCell::default()).collect(),
            ready: (0..cores).map(|_| Notify::default()).collect(),
            note_bytes: (0..cores).map(|_| Cell::new(0)).collect(),
        }
    }

    /// Queues `msg` for core `to` (not this one).
    pub fn send(&self, to: usize, msg: CoreMsg) {
        let Some(q) = self.queues.get(to) else {
            tracing::warn!(core = to, "message for a core that does not exist");
            return;
        };
        if let CoreMsg::Notification { msg: m, .. } = &msg {
            let bytes = &self.note_bytes[to];
            if bytes.get() + m.len() > NOTES_LIMIT {
                tracing::warn!(
                    core = to,
                    "notification queue to a core is full; dropping one"
                );
                return;
            }
            bytes.set(bytes.get() + m.len());
        }
        q.borrow_mut().push_back(msg);
        self.ready[to].notify();
    }

    /// Sends what is queued for core `to`, in order, for as long as the mesh is up.
    pub async fn drain(&self, to: usize, senders: Rc<Senders<CoreMsg>>) {
        loop {
            let ready = self.ready[to].notified();
            let next = self.queues[to].borrow_mut().pop_front();
            let Some(msg) = next else {
                ready.await;
                continue;
            };
            if let CoreMsg::Notification { msg: m, .. } = &msg {
                let bytes = &self.note_bytes[to];
                bytes.set(bytes.get().saturating_sub(m.len()));
            }
            if senders.send_to(to, msg).await.is_err() {
                tracing::warn!(core = to, "core mesh closed");
                return;
            }
        }
    }
}

/// This core's end of the channel mesh, for best-effort messages to every other core.
pub struct Peers {
    /// This core's index.
    pub index: usize,
    /// Set once the mesh is joined (main.rs).
    senders: RefCell<Option<Rc<Senders<CoreMsg>>>>,
    /// When we last asked the other cores to shed (at most every few milliseconds).
    last_shed_ask: Cell<Option<Instant>>,
}

impl Peers {
    pub fn new(index: usize) -> Peers {
        Peers {
            index,
            senders: RefCell::new(None),
            last_shed_ask: Cell::new(None),
        }
    }

    pub fn connect(&self, senders: Rc<Senders<CoreMsg>>) {
        *self.senders.borrow_mut() = Some(senders);
    }

    pub fn senders(&self) -> Option<Rc<Senders<CoreMsg>>> {
        self.senders.borrow().clone()
    }

    /// Sends `msg` to every other core (best effort: a full channel drops it; senders retry).
    pub fn ask(&self, msg: CoreMsg) {
        if matches!(msg, CoreMsg::Shed(_)) {
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
        let Some(senders) = self.senders() else {
            return;
        };
        for i in 0..senders.nr_consumers() {
            if i != self.index {
                let _ = senders.try_send_to(i, msg.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outbox_bounds_notifications_not_control_messages() {
        let o = Outbox::new(2);
        let note = |n: usize| CoreMsg::Notification {
            database: "app".into(),
            msg: vec![0; n],
        };
        o.send(1, note(NOTES_LIMIT - 10));
        o.send(1, note(11)); // over the bound: dropped
        o.send(1, note(10));
        for token in 0..3 {
            o.send(
                1,
                CoreMsg::ListenBarrierDone {
                    database: "app".into(),
                    token,
                    ok: true,
                },
            );
        }
        o.send(7, note(1)); // no such core: dropped, logged
        let q = o.queues[1].borrow();
        assert_eq!(q.len(), 5);
        assert!(matches!(&q[1], CoreMsg::Notification { msg, .. } if msg.len() == 10));
        assert!(matches!(q[4], CoreMsg::ListenBarrierDone { token: 2, .. }));
        assert_eq!(o.note_bytes[1].get(), NOTES_LIMIT);
        assert!(o.queues[0].borrow().is_empty());
    }
}
