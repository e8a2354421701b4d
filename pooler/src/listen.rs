//! `LISTEN` without pinning: one listening connection per (pooler core, database) fans
//! notifications out to every session of that core that listens.
//!
//! A session's `LISTEN`/`UNLISTEN` runs on whatever backend it borrowed, so Postgres gives its
//! own answers, errors and transaction semantics (takes effect at commit, not at all on
//! rollback). While a session that listens holds a backend, that backend listens on the
//! session's channels too (applied when it is attached), so `pg_listening_channels()`,
//! `UNLISTEN x` and `UNLISTEN *` see what they would see directly. When a transaction that ran
//! one of these ends, the pooler reads `pg_listening_channels()` back (with the settings
//! read-back), records the session's channels here and lets the core's listener `LISTEN` any new
//! one before the client sees `ReadyForQuery`, so no notification falls in a gap. A backend that
//! listened gets `UNLISTEN *` before it goes back to its pool; its own notifications are dropped
//! (the listener delivers them).
//!
//! Postgres sends a session the notifications that arrived during a transaction just before the
//! `ReadyForQuery` that ends it, and at once while the session is idle: the same here (queued
//! while a request runs, delivered before its `ReadyForQuery 'I'`). A session that listens and
//! notifies hears its own notification before its `ReadyForQuery`, as directly: the relay holds
//! that `ReadyForQuery` until an empty query on the listener returns, and Postgres delivers
//! every notification committed before a query before that query's `ReadyForQuery`
//! (`PostgresMain` calls `ProcessNotifyInterrupt` before `ReadyForQuery`; the notifier signalled
//! the listener during its commit, before we saw its `ReadyForQuery`).
//!
//! See docs/decisions/2026-11-21-listen-fanout.md for what this costs and why per core.

use crate::config::Config;
use crate::login;
use crate::session::Session;
use glommio::net::UnixStream;
use shared::io::{MessageReader, Notify, OutQueue, RcStream, Slot};
use shared::link::Credential;
use shared::protocol::backend as be;
use shared::protocol::{frontend, read_cstr, read_i32, typed_message_len};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::{Rc, Weak};
use std::time::Duration;

/// The first column of the rows the settings read-back adds for the backend's channels. Not a
/// possible setting name (Postgres allows only letters, digits, `_`, `$` and `.` in those).
pub const MARKER: &str = "tidepool listen";

/// How long a session's `ReadyForQuery` may wait for the listener: a listener that does not
/// answer must not stall sessions (the notifications may then come late or not at all).
const SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// Notifications queued for one busy session, in bytes; past it new ones are dropped (logged).
const NOTES_LIMIT: usize = 16 << 20;

/// The part of a session's state that concerns `LISTEN`.
#[derive(Default)]
pub struct SessionListen {
    /// The channels the session listens on, sorted.
    pub channels: RefCell<Vec<String>>,
    /// A statement that may change them ran: read them back when the transaction ends.
    pub dirty: Cell<bool>,
    /// Channels read back (rows of the settings read-back).
    pub read: RefCell<Vec<String>>,
    /// The pending read-back needs the channels only, not the settings (reading `pg_settings`
    /// costs far more than `pg_listening_channels()`).
    pub only: Cell<bool>,
    /// The session notified while it listens: its next `ReadyForQuery 'I'` waits for the
    /// listener, so its own notification comes first.
    pub barrier: Cell<bool>,
    /// Its channels changed: the listener must `LISTEN`/`UNLISTEN` before the next
    /// `ReadyForQuery 'I'` goes out.
    pub sync: Cell<bool>,
    ops: RefCell<(Vec<String>, Vec<String>)>,
    /// A `ReadyForQuery` is held for the listener: the session's next request waits.
    pub gated: Cell<bool>,
    pub gate_open: Notify,
    /// Notifications for the client, held while a request runs.
    notes: RefCell<Vec<u8>>,
}

impl SessionListen {
    /// Moves the queued notifications to `out` (just before a `ReadyForQuery 'I'`).
    pub fn take_notes(&self, out: &mut Vec<u8>) {
        let mut n = self.notes.borrow_mut();
        if !n.is_empty() {
            out.extend_from_slice(&n);
            n.clear();
            if n.capacity() > 64 * 1024 {
                *n = Vec::new();
            }
        }
    }

    /// Drops held notifications of channels the session no longer listens on: Postgres checks
    /// the channel when the backend reads the notification, not when it was sent
    /// (`asyncQueueProcessPageEntries` calls `IsListeningOn`).
    fn keep_listened_notes(&self) {
        let channels = self.channels.borrow();
        let mut notes = self.notes.borrow_mut();
        if notes.is_empty() {
            return;
        }
        let mut kept = Vec::with_capacity(notes.len());
        let mut rest = &notes[..];
        while let Ok(Some(n)) = typed_message_len(rest, usize::MAX) {
            let (msg, tail) = rest.split_at(n);
            rest = tail;
            if notification_channel(msg).is_some_and(|c| channels.iter().any(|l| l == c)) {
                kept.extend_from_slice(msg);
            }
        }
        *notes = kept;
    }

    pub fn queue_note(&self, msg: &[u8]) {
        let mut n = self.notes.borrow_mut();
        if n.len() + msg.len() > NOTES_LIMIT {
            tracing::warn!("notification queue of a busy session is full; dropping one");
            return;
        }
        n.extend_from_slice(msg);
    }
}

/// The channel of a whole `NotificationResponse` message.
fn notification_channel(msg: &[u8]) -> Option<&str> {
    let body = msg.get(5..)?;
    let mut pos = 0;
    read_i32(body, &mut pos).ok()?;
    std::str::from_utf8(read_cstr(body, &mut pos).ok()?).ok()
}

/// `"name"` with `"` doubled: a channel name as an SQL identifier.
pub fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// `LISTEN a; LISTEN b` for a backend that must listen on the session's channels.
pub fn listen_sql(channels: &[String]) -> String {
    let mut sql = String::new();
    for c in channels {
        sql.push_str("LISTEN ");
        sql.push_str(&ident(c));
        sql.push(';');
    }
    sql
}

/// The listening connection of one database on this core, and who listens on what.
pub struct Listener {
    cfg: Rc<Config>,
    database: String,
    /// Channel → sessions listening on it (by address).
    channels: RefCell<HashMap<String, HashMap<usize, Weak<Session>>>>,
    conn: RefCell<Option<Rc<Conn>>>,
    connecting: Cell<bool>,
    connected: Notify,
    /// A reconnect loop runs.
    reviving: Cell<bool>,
}

struct Conn {
    out: OutQueue,
    /// One per query sent, in order: `true` when its `ReadyForQuery` came.
    waiters: RefCell<VecDeque<Rc<Slot<bool>>>>,
    dead: Cell<bool>,
}

impl Conn {
    /// Queues a query; the slot says when its `ReadyForQuery` came.
    fn send(&self, sql: &str) -> Rc<Slot<bool>> {
        let slot = Rc::new(Slot::default());
        if self.dead.get() {
            slot.put(false);
            return slot;
        }
        let mut q = Vec::new();
        frontend::query(&mut q, sql);
        self.waiters.borrow_mut().push_back(slot.clone());
        self.out.push(&q);
        slot
    }

    async fn query(&self, sql: &str) -> bool {
        self.send(sql).take().await
    }
}

impl Listener {
    pub fn new(cfg: Rc<Config>, database: &str) -> Rc<Listener> {
        Rc::new(Listener {
            cfg,
            database: database.to_owned(),
            channels: RefCell::new(HashMap::new()),
            conn: RefCell::new(None),
            connecting: Cell::new(false),
            connected: Notify::default(),
            reviving: Cell::new(false),
        })
    }

    /// Records that `s` now listens on `new` (sorted, deduplicated). Returns the channels the
    /// listener must start and stop listening on.
    pub fn update(&self, s: &Rc<Session>, new: Vec<String>) -> (Vec<String>, Vec<String>) {
        let old = std::mem::replace(&mut *s.listen.channels.borrow_mut(), new.clone());
        let key = Rc::as_ptr(s) as usize;
        let mut reg = self.channels.borrow_mut();
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        for c in old.iter().filter(|c| !new.contains(c)) {
            if let Some(m) = reg.get_mut(c) {
                m.remove(&key);
                if m.is_empty() {
                    reg.remove(c);
                    remove.push(c.clone());
                }
            }
        }
        for c in new.into_iter().filter(|c| !old.contains(c)) {
            let m = reg.entry(c.clone()).or_default();
            if m.is_empty() {
                add.push(c);
            }
            m.insert(key, Rc::downgrade(s));
        }
        (add, remove)
    }

    /// The session read its channels back: record them; the listener catches up before the
    /// session's `ReadyForQuery` (see [`hold_rfq`]).
    pub fn read_back(&self, s: &Rc<Session>) {
        let mut new = std::mem::take(&mut *s.listen.read.borrow_mut());
        new.sort();
        new.dedup();
        let (add, remove) = self.update(s, new);
        s.listen.keep_listened_notes();
        let mut ops = s.listen.ops.borrow_mut();
        ops.0.extend(add);
        ops.1.extend(remove);
        // Even with no change of ours the listener must be caught up: another session's LISTEN
        // of the same channel may still be on its way.
        s.listen.sync.set(true);
    }

    /// The session ended: it listens on nothing.
    pub fn forget(self: &Rc<Self>, s: &Rc<Session>) {
        if s.listen.channels.borrow().is_empty() {
            return;
        }
        let (_, remove) = self.update(s, Vec::new());
        if remove.is_empty() || self.conn.borrow().is_none() {
            return;
        }
        let me = self.clone();
        glommio::spawn_local(async move {
            let _ = crate::with_timeout(SYNC_TIMEOUT, me.sync(Vec::new(), remove)).await;
        })
        .detach();
    }

    /// Runs `LISTEN`/`UNLISTEN` (or an empty query, a barrier) on the listening connection,
    /// connecting it first if needed. Returns when Postgres answered.
    pub async fn sync(
        self: &Rc<Self>,
        add: Vec<String>,
        remove: Vec<String>,
    ) -> Result<(), String> {
        let conn = self.conn().await?;
        let mut sql = listen_sql(&add);
        for c in &remove {
            sql.push_str("UNLISTEN ");
            sql.push_str(&ident(c));
            sql.push(';');
        }
        if conn.query(&sql).await {
            Ok(())
        } else {
            Err("listening connection lost".into())
        }
    }

    async fn conn(self: &Rc<Self>) -> Result<Rc<Conn>, String> {
        loop {
            if let Some(c) = self.conn.borrow().clone() {
                if !c.dead.get() {
                    return Ok(c);
                }
            }
            if self.connecting.get() {
                let n = self.connected.notified();
                if self.connecting.get() {
                    n.await;
                }
                if self.conn.borrow().as_ref().is_none_or(|c| c.dead.get()) {
                    return Err("listening connection failed".into());
                }
                continue;
            }
            self.connecting.set(true);
            let timeout = Duration::from_secs(self.cfg.connect_timeout_seconds.max(1));
            let r = crate::with_timeout(timeout, self.connect())
                .await
                .unwrap_or_else(|| Err("timed out".into()));
            self.connecting.set(false);
            match r {
                Ok(c) => {
                    *self.conn.borrow_mut() = Some(c.clone());
                    self.connected.notify();
                    return Ok(c);
                }
                Err(e) => {
                    self.connected.notify();
                    tracing::warn!(database = %self.database, error = %e, "listening connection failed");
                    return Err(e);
                }
            }
        }
    }

    /// Logs in over the Unix socket as the admin role (peer authentication, like the role
    /// look-ups), so the listener takes nothing from any user's backend budget.
    async fn connect(self: &Rc<Self>) -> Result<Rc<Conn>, String> {
        let path = format!(
            "{}/.s.PGSQL.{}",
            self.cfg.admin_socket_dir, self.cfg.pg_port
        );
        let mut stream = UnixStream::connect(&path)
            .await
            .map_err(|e| format!("{path}: {e}"))?;
        let logged = login::login(
            &mut stream,
            &self.cfg.admin_user,
            &self.database,
            &Credential::None,
            self.cfg.max_message_size,
        )
        .await
        .map_err(|e| match e {
            login::LoginError::Postgres(m) => String::from_utf8_lossy(&m).into_owned(),
            login::LoginError::Other(s) => s,
        })?;
        let conn = Rc::new(Conn {
            out: OutQueue::new(1 << 20, 16 * 1024),
            waiters: RefCell::new(VecDeque::new()),
            dead: Cell::new(false),
        });
        let stream = RcStream::new(stream);
        let writer = conn.clone();
        let wstream = stream.clone();
        glommio::spawn_local(async move {
            let _ = writer.out.run_writer(wstream).await;
        })
        .detach();
        let mut reader = MessageReader::new(8192);
        reader.push_bytes(&logged.leftover);
        glommio::spawn_local(read_loop(self.clone(), conn.clone(), stream, reader)).detach();
        // A new connection (first, or after the old one died) listens on every channel someone
        // here listens on; queued before any caller's query, so that query's answer covers it.
        let all: Vec<String> = self.channels.borrow().keys().cloned().collect();
        if !all.is_empty() {
            conn.send(&listen_sql(&all));
        }
        tracing::debug!(database = %self.database, pid = logged.pid, "listening connection up");
        Ok(conn)
    }

    fn dispatch(&self, msg: &[u8]) {
        let Some(channel) = notification_channel(msg) else {
            return;
        };
        let sessions: Vec<Rc<Session>> = match self.channels.borrow().get(channel) {
            Some(m) => m.values().filter_map(Weak::upgrade).collect(),
            None => return,
        };
        for s in sessions {
            s.notification(msg);
        }
    }

    /// After the connection died: reconnect (and re-`LISTEN`) while anyone listens.
    fn revive(self: &Rc<Self>) {
        if self.reviving.replace(true) {
            return;
        }
        let me = self.clone();
        glommio::spawn_local(async move {
            // Bounded: gives up when nobody listens any more; at most one attempt every 500 ms.
            for _ in 0..100_000u32 {
                if me.channels.borrow().is_empty() {
                    break;
                }
                glommio::timer::sleep(Duration::from_millis(500)).await;
                if me.conn().await.is_ok() {
                    break;
                }
            }
            me.reviving.set(false);
        })
        .detach();
    }
}

async fn read_loop(
    l: Rc<Listener>,
    conn: Rc<Conn>,
    mut stream: RcStream<UnixStream>,
    mut reader: MessageReader,
) {
    let max = l.cfg.max_message_size;
    'outer: loop {
        loop {
            let n = match typed_message_len(reader.data(), max) {
                Ok(Some(n)) => n,
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "bad message on the listening connection");
                    break 'outer;
                }
            };
            let msg = &reader.data()[..n];
            match msg[0] {
                be::NOTIFICATION_RESPONSE => l.dispatch(msg),
                be::ERROR_RESPONSE => {
                    let code = be::error_sqlstate(&msg[5..]).unwrap_or_default();
                    tracing::warn!(database = %l.database, sqlstate = %String::from_utf8_lossy(code), "error on the listening connection");
                }
                be::READY_FOR_QUERY => {
                    let w = conn.waiters.borrow_mut().pop_front();
                    if let Some(w) = w {
                        w.put(true);
                    }
                }
                _ => {}
            }
            reader.consume(n);
        }
        let want = shared::protocol::pending_message_len(reader.data()).unwrap_or(0);
        match reader.fill(&mut stream, want).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    conn.dead.set(true);
    conn.out.close();
    for w in conn.waiters.borrow_mut().drain(..) {
        w.put(false);
    }
    tracing::warn!(database = %l.database, "listening connection lost; reconnecting while sessions listen");
    l.revive();
}

/// Called where a `ReadyForQuery 'I'` for `s` would go out with nothing more to come: when the
/// session's channels changed or it notified itself, hold it (`Some`) or hold its next request
/// (`None`: it already went) until the listener caught up. `true`: held, do not forward it.
pub fn hold_rfq(s: &Rc<Session>, rfq: Option<&[u8]>) -> bool {
    let l = &s.listen;
    let barrier = l.barrier.replace(false) && !l.channels.borrow().is_empty();
    let sync = l.sync.replace(false);
    if !(barrier || sync) || s.gone.get() || l.gated.get() {
        return false;
    }
    l.gated.set(true);
    let (add, remove) = std::mem::take(&mut *l.ops.borrow_mut());
    let s = s.clone();
    let rfq = rfq.map(|r| r.to_vec());
    let held = rfq.is_some();
    let listener = s.pool.listener.clone();
    glommio::spawn_local(async move {
        match crate::with_timeout(SYNC_TIMEOUT, listener.sync(add, remove)).await {
            Some(Ok(())) => {}
            Some(Err(e)) => tracing::warn!(error = %e, "listener not caught up"),
            None => tracing::warn!("listener did not answer in time"),
        }
        s.listen.gated.set(false);
        {
            let mut out = s.out.borrow_mut();
            s.listen.take_notes(&mut out);
            if let Some(r) = &rfq {
                out.extend_from_slice(r);
            }
        }
        s.flush();
        s.listen.gate_open.notify();
    })
    .detach();
    held
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting() {
        assert_eq!(ident("chan"), "\"chan\"");
        assert_eq!(ident("Mixed \"q\""), "\"Mixed \"\"q\"\"\"");
        assert_eq!(
            listen_sql(&["a".into(), "B c".into()]),
            "LISTEN \"a\";LISTEN \"B c\";"
        );
        assert_eq!(listen_sql(&[]), "");
    }

    fn note(channel: &str, payload: &str) -> Vec<u8> {
        let mut m = Vec::new();
        shared::protocol::put_message(&mut m, be::NOTIFICATION_RESPONSE, |b| {
            b.extend_from_slice(&7i32.to_be_bytes());
            shared::protocol::put_cstr(b, channel.as_bytes());
            shared::protocol::put_cstr(b, payload.as_bytes());
        });
        m
    }

    #[test]
    fn held_notes_follow_the_channels() {
        let l = SessionListen::default();
        *l.channels.borrow_mut() = vec!["a".into(), "c".into()];
        for (c, p) in [("a", "1"), ("b", "2"), ("c", "3"), ("a", "4")] {
            l.queue_note(&note(c, p));
        }
        *l.channels.borrow_mut() = vec!["a".into()];
        l.keep_listened_notes();
        let mut out = Vec::new();
        l.take_notes(&mut out);
        assert_eq!(out, [note("a", "1"), note("a", "4")].concat());
        assert_eq!(notification_channel(&note("x y", "")), Some("x y"));
        assert_eq!(notification_channel(b"A\0\0"), None);
    }
}
