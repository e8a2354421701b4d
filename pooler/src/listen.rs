//! `LISTEN` without pinning: one listening connection per (pooler, database) fans notifications
//! out to every session that listens, on every core.
//!
//! A session's `LISTEN`/`UNLISTEN` runs on whatever backend it borrowed, so Postgres gives its
//! own answers, errors and transaction semantics (takes effect at commit, not at all on
//! rollback). While a session that listens holds a backend, that backend listens on the
//! session's channels too (applied when it is attached), so `pg_listening_channels()`,
//! `UNLISTEN x` and `UNLISTEN *` see what they would see directly. When a transaction that ran
//! one of these ends, the pooler reads `pg_listening_channels()` back (with the settings
//! read-back) and records the session's channels in its core's [`Listener`]. A backend that
//! listened gets `UNLISTEN *` before it goes back to its pool; its own notifications are dropped
//! (the listener delivers them).
//!
//! Each database has an owner core ([`owner_core`]) that holds the listening connection and
//! knows which cores listen on which channel. Other cores send it, over the core mesh
//! (`mesh::Outbox`, ordered and reliable), the channels they start and stop listening on; it
//! forwards each `NotificationResponse` to the cores listening on its channel, which hand it to
//! their sessions. Before a session's `ReadyForQuery` goes out after its channels changed, its
//! core runs a *barrier*: an empty query on the listening connection, sent after this core's
//! changes (same mesh channel, in order), answered after the notifications received before its
//! `ReadyForQuery` (same channel back, in order). So no notification falls in a gap after a
//! `LISTEN`. A request that names new channels in `LISTEN` statements has them listened on
//! *ahead*, before it runs, and a channel new to a session delivers it only its own
//! notifications until that barrier passes ([`Listener::listen_ahead`]): `LISTEN x; NOTIFY x`
//! in one transaction hears itself.
//!
//! Postgres sends a session the notifications that arrived during a transaction just before the
//! `ReadyForQuery` that ends it, and at once while the session is idle: the same here (queued
//! while a request runs, delivered before its `ReadyForQuery 'I'`). A session that listens and
//! notifies hears its own notification before its `ReadyForQuery`, as directly: the relay holds
//! that `ReadyForQuery` for a barrier, and Postgres delivers every notification committed before
//! a query before that query's `ReadyForQuery` (`PostgresMain` calls `ProcessNotifyInterrupt`
//! before `ReadyForQuery`; the notifier signalled the listener during its commit, before we saw
//! its `ReadyForQuery`).
//!
//! See docs/decisions/2026-11-21-listen-fanout.md for what this costs and why.

use crate::config::Config;
use crate::listen_names::listen_channels;
use crate::login;
use crate::mesh::{CoreMsg, Outbox};
use glommio::net::UnixStream;
use shared::io::{MessageReader, Notify, OutQueue, RcStream, Slot};
use shared::link::Credential;
use shared::protocol::backend as be;
use shared::protocol::{frontend, read_cstr, read_i32, typed_message_len};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::{Rc, Weak};
use std::time::Duration;

/// What the listener needs of a session (session.rs implements it), so that this registry sits
/// below the session task. Called through `dyn` only to hand over a notification (per
/// notification, never per request).
pub trait Listening {
    /// The session's `LISTEN` state.
    fn listen(&self) -> &SessionListen;
    /// The pid of the backend the session holds, if it holds one.
    fn backend_pid(&self) -> Option<i32>;
    /// A notification on a channel it listens on: to its client now if idle, else held.
    fn notification(&self, msg: &[u8]);
}

/// Sessions in a registry, by address.
type Members = HashMap<usize, Weak<dyn Listening>>;

/// A session's key in a registry: its address.
fn key_of<S>(s: &Rc<S>) -> usize {
    Rc::as_ptr(s) as usize
}

/// How long a session's `ReadyForQuery` may wait for the listener: a listener that does not
/// answer must not stall sessions (the notifications may then come late or not at all).
pub const SYNC_TIMEOUT: Duration = Duration::from_secs(5);

/// How long the listening connection stays open after the last listener left: a session that
/// listens again soon does not wait for a new login.
const LINGER: Duration = Duration::from_secs(10);

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
    /// Channels the session is joining: named in `LISTEN` by a running request (the listener
    /// listens on them ahead) or new at the last read-back. Only the session's own
    /// notifications on them are delivered (held) until the barrier after the read-back passes;
    /// then they are promoted to ordinary channels.
    ahead: RefCell<Vec<String>>,
    /// The change count ([`Listener`]'s `sent`) a barrier must cover before the session's
    /// notifications can be heard on the channels it listens on ahead.
    ahead_need: Cell<u64>,
    /// The backend that ran the session's transaction, recorded at the read-back: its
    /// notifications are the session's own while it is joining channels.
    own_pid: Cell<Option<i32>>,
    /// The pending read-back needs the channels only, not the settings (reading `pg_settings`
    /// costs far more than `pg_listening_channels()`).
    pub only: Cell<bool>,
    /// The session notified while it listens: its next `ReadyForQuery 'I'` waits for the
    /// listener, so its own notification comes first.
    pub barrier: Cell<bool>,
    /// Its channels changed: the listener must `LISTEN`/`UNLISTEN` before the next
    /// `ReadyForQuery 'I'` goes out.
    pub sync: Cell<bool>,
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

/// Removes session `key` from `channel` in a registry.
fn remove_from(reg: &mut HashMap<String, Members>, channel: &str, key: usize) {
    if let Some(m) = reg.get_mut(channel) {
        m.remove(&key);
        if m.is_empty() {
            reg.remove(channel);
        }
    }
}

/// The channel of a whole `NotificationResponse` message.
fn notification_channel(msg: &[u8]) -> Option<&str> {
    let body = msg.get(5..)?;
    let mut pos = 0;
    read_i32(body, &mut pos).ok()?;
    std::str::from_utf8(read_cstr(body, &mut pos).ok()?).ok()
}

/// The process id of the backend that sent a whole `NotificationResponse` message.
fn notification_pid(msg: &[u8]) -> Option<i32> {
    let mut pos = 0;
    read_i32(msg.get(5..)?, &mut pos).ok()
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

/// `UNLISTEN a; UNLISTEN b`.
fn unlisten_sql(channels: &[String]) -> String {
    let mut sql = String::new();
    for c in channels {
        sql.push_str("UNLISTEN ");
        sql.push_str(&ident(c));
        sql.push(';');
    }
    sql
}

/// The core that holds the listening connection of `database`: stable for the process, and
/// spreads databases over cores (FNV-1a of the name).
pub fn owner_core(database: &str, cores: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in database.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % cores.max(1) as u64) as usize
}

/// The sessions of one database on this core that listen, by channel; on the database's owner
/// core also the listening connection ([`Hub`]).
pub struct Listener {
    database: String,
    /// This core.
    core: usize,
    /// The core holding the listening connection.
    owner: usize,
    outbox: Rc<Outbox>,
    /// Channel → sessions of this core listening on it (by address).
    channels: RefCell<HashMap<String, Members>>,
    /// Channel → sessions of this core running a `LISTEN` of it, not yet read back.
    ahead: RefCell<HashMap<String, Members>>,
    /// Channel changes sent to the owner, counted; and the count covered by the last barrier
    /// that passed (every change up to it is in effect on the listening connection).
    sent: Cell<u64>,
    confirmed: Cell<u64>,
    /// Barriers asked of the owner core, by token.
    barriers: RefCell<HashMap<u64, Rc<Slot<bool>>>>,
    next_token: Cell<u64>,
    /// Logged that sessions of this core listen on this database (once).
    announced: Cell<bool>,
    /// On the owner core only.
    hub: Option<Hub>,
}

/// The listening connection of a database, on its owner core, and which cores listen on what.
struct Hub {
    cfg: Rc<Config>,
    /// Channel → cores whose sessions listen on it (a handful: a `Vec`).
    cores: RefCell<HashMap<String, Vec<usize>>>,
    conn: RefCell<Option<Rc<Conn>>>,
    connecting: Cell<bool>,
    connected: Notify,
    /// A reconnect loop runs.
    reviving: Cell<bool>,
    /// A task closes the connection if nobody listens after [`LINGER`].
    lingering: Cell<bool>,
}

/// Who waits for the `ReadyForQuery` of a query on the listening connection.
enum Waiter {
    /// Nobody (`LISTEN`/`UNLISTEN` of the registry: barriers sent after them wait instead).
    None,
    /// A session of the owner core.
    Local(Rc<Slot<bool>>),
    /// A session of another core: answer over the mesh.
    Peer { core: usize, token: u64 },
}

struct Conn {
    out: OutQueue,
    /// One per query sent, in order.
    waiters: RefCell<VecDeque<Waiter>>,
    dead: Cell<bool>,
    /// Closed on purpose: nobody listens.
    closing: Cell<bool>,
}

impl Conn {
    /// Ends the session (`Terminate`); the read loop sees the end.
    fn close(&self) {
        self.closing.set(true);
        let mut q = Vec::new();
        shared::protocol::put_message(&mut q, frontend::TERMINATE, |_| {});
        self.out.push(&q);
        self.out.close();
    }
}

impl Listener {
    pub fn new(cfg: Rc<Config>, database: &str, core: usize, outbox: Rc<Outbox>) -> Rc<Listener> {
        let owner = owner_core(database, cfg.cores);
        let hub = (owner == core).then(|| Hub {
            cfg,
            cores: RefCell::new(HashMap::new()),
            conn: RefCell::new(None),
            connecting: Cell::new(false),
            connected: Notify::default(),
            reviving: Cell::new(false),
            lingering: Cell::new(false),
        });
        Rc::new(Listener {
            database: database.to_owned(),
            core,
            owner,
            outbox,
            channels: RefCell::new(HashMap::new()),
            ahead: RefCell::new(HashMap::new()),
            sent: Cell::new(0),
            confirmed: Cell::new(0),
            barriers: RefCell::new(HashMap::new()),
            next_token: Cell::new(1),
            announced: Cell::new(false),
            hub,
        })
    }

    /// Whether a session of this core listens on `channel`, or is about to.
    fn core_listens(&self, channel: &str) -> bool {
        self.channels.borrow().contains_key(channel) || self.ahead.borrow().contains_key(channel)
    }

    /// Runs `change` on the registry and tells the owner core at once which of the `affected`
    /// channels this core starts and stops listening on: in order with every other change and
    /// barrier of this core, so a barrier sent later passes only after them.
    fn apply(self: &Rc<Self>, mut affected: Vec<String>, change: impl FnOnce(&Self)) {
        affected.sort();
        affected.dedup();
        let before: Vec<bool> = affected.iter().map(|c| self.core_listens(c)).collect();
        change(self);
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        for (c, was) in affected.into_iter().zip(before) {
            match (was, self.core_listens(&c)) {
                (false, true) => add.push(c),
                (true, false) => remove.push(c),
                _ => {}
            }
        }
        if add.is_empty() && remove.is_empty() {
            return;
        }
        if !add.is_empty() && !self.announced.replace(true) {
            tracing::info!(core = self.core, owner = self.owner, database = %self.database, "sessions on this core listen; the owner core's connection serves them");
        }
        self.sent.set(self.sent.get() + 1);
        if self.hub.is_some() {
            self.hub_update(self.core, add, remove);
        } else {
            self.outbox.send(
                self.owner,
                CoreMsg::Listen {
                    database: self.database.clone(),
                    from: self.core,
                    add,
                    remove,
                },
            );
        }
    }

    /// Records that `s` now listens on `new` (sorted, deduplicated). The channels new to it are
    /// *joining* until [`Listener::promote`]: a notification that reaches this core after the
    /// read-back may have been committed before the session's `LISTEN` was, and Postgres would
    /// not deliver that one (`Exec_ListenPreCommit` starts a new listener past the notifications
    /// other listeners of the database already read); the session's own ones it would.
    fn update<S: Listening + 'static>(self: &Rc<Self>, s: &Rc<S>, new: Vec<String>) {
        let old = std::mem::replace(&mut *s.listen().channels.borrow_mut(), new.clone());
        let before = std::mem::take(&mut *s.listen().ahead.borrow_mut());
        let joining: Vec<String> = new.iter().filter(|c| !old.contains(c)).cloned().collect();
        let key = key_of(s);
        let affected = old.iter().chain(&new).chain(&before).cloned().collect();
        self.apply(affected, |l| {
            let mut reg = l.channels.borrow_mut();
            for c in old.iter().filter(|c| !new.contains(c)) {
                remove_from(&mut reg, c, key);
            }
            let mut pending = l.ahead.borrow_mut();
            for c in &before {
                remove_from(&mut pending, c, key);
            }
            for c in &joining {
                pending
                    .entry(c.clone())
                    .or_default()
                    .insert(key, Rc::downgrade(s) as Weak<dyn Listening>);
            }
        });
        *s.listen().ahead.borrow_mut() = joining;
    }

    /// The barrier after the read-back passed: the channels `s` was joining are ordinary now.
    pub fn promote<S: Listening + 'static>(self: &Rc<Self>, s: &Rc<S>) {
        s.listen().own_pid.set(None);
        let joining = std::mem::take(&mut *s.listen().ahead.borrow_mut());
        if joining.is_empty() {
            return;
        }
        let key = key_of(s);
        let channels = s.listen().channels.borrow().clone();
        self.apply(joining.clone(), |l| {
            let mut pending = l.ahead.borrow_mut();
            let mut reg = l.channels.borrow_mut();
            for c in joining {
                remove_from(&mut pending, &c, key);
                if channels.contains(&c) {
                    reg.entry(c)
                        .or_default()
                        .insert(key, Rc::downgrade(s) as Weak<dyn Listening>);
                }
            }
        });
    }

    /// Before a request that may `LISTEN` runs: the listening connection listens on the channels
    /// its `LISTEN` statements name (`listen_names.rs`) that the session does not listen on yet,
    /// and the session's own notifications on them are held for it until its channels are read
    /// back. So a `LISTEN x; NOTIFY x` in one transaction hears itself, as directly (Postgres
    /// makes the session a listener before it queues its notifications at commit). A request of
    /// the transaction that notifies waits for the listener first ([`Listener::ahead_ready`]).
    pub fn listen_ahead<S: Listening + 'static>(
        self: &Rc<Self>,
        s: &Rc<S>,
        msgs: &[u8],
        max: usize,
    ) {
        let mut names = Vec::new();
        let mut rest = msgs;
        while let Ok(Some(n)) = typed_message_len(rest, max) {
            let (msg, tail) = rest.split_at(n);
            rest = tail;
            match msg[0] {
                frontend::QUERY => names.extend(listen_channels(frontend::query_text(&msg[5..]))),
                frontend::PARSE => {
                    if let Ok(p) = frontend::parse_parse(&msg[5..]) {
                        names.extend(listen_channels(p.query));
                    }
                }
                _ => {}
            }
        }
        {
            let (mine, ahead) = (s.listen().channels.borrow(), s.listen().ahead.borrow());
            names.retain(|c| !mine.contains(c) && !ahead.contains(c));
        }
        names.sort();
        names.dedup();
        if names.is_empty() {
            return;
        }
        let all_known =
            names.iter().all(|c| self.core_listens(c)) && self.confirmed.get() >= self.sent.get();
        s.listen().ahead.borrow_mut().extend(names.iter().cloned());
        let key = key_of(s);
        self.apply(names.clone(), |l| {
            let mut pending = l.ahead.borrow_mut();
            for c in names {
                pending
                    .entry(c)
                    .or_default()
                    .insert(key, Rc::downgrade(s) as Weak<dyn Listening>);
            }
        });
        // The listening connection already listens on all of them if this core asked before and
        // a barrier has passed since; else once a barrier covers the change just sent.
        let need = if all_known {
            s.listen().ahead_need.get()
        } else {
            self.sent.get()
        };
        s.listen()
            .ahead_need
            .set(need.max(s.listen().ahead_need.get()));
    }

    /// Before a request that notifies runs: if the session is joining channels, waits until the
    /// listening connection listens on them (a barrier), so the session's own notifications at
    /// commit reach it. A request that only `LISTEN`s does not wait.
    pub async fn ahead_ready<S: Listening + 'static>(self: &Rc<Self>, s: &Rc<S>) {
        if s.listen().ahead.borrow().is_empty()
            || self.confirmed.get() >= s.listen().ahead_need.get()
        {
            return;
        }
        match crate::with_timeout(SYNC_TIMEOUT, self.barrier()).await {
            Some(Ok(())) => {}
            Some(Err(e)) => tracing::warn!(error = %e, "listener did not listen ahead"),
            None => tracing::warn!("listener did not answer in time"),
        }
    }

    /// The session read its channels back: record them; the listener catches up before the
    /// session's `ReadyForQuery` (see [`hold_rfq`]).
    pub fn read_back<S: Listening + 'static>(self: &Rc<Self>, s: &Rc<S>) {
        s.listen().own_pid.set(s.backend_pid());
        let mut new = std::mem::take(&mut *s.listen().read.borrow_mut());
        new.sort();
        new.dedup();
        self.update(s, new);
        s.listen().keep_listened_notes();
        // Even with no change of ours the listener must be caught up: another session's LISTEN
        // of the same channel may still be on its way.
        s.listen().sync.set(true);
    }

    /// The session ended: it listens on nothing.
    pub fn forget<S: Listening + 'static>(self: &Rc<Self>, s: &Rc<S>) {
        if !s.listen().channels.borrow().is_empty() || !s.listen().ahead.borrow().is_empty() {
            self.update(s, Vec::new());
        }
    }

    /// Returns when the listening connection has answered a query sent after every change this
    /// core sent, and every notification it received before that answer has been handed to this
    /// core's sessions. On another core the answer comes over the same ordered mesh channel as
    /// the notifications, after them.
    pub async fn barrier(self: &Rc<Self>) -> Result<(), String> {
        let covers = self.sent.get();
        let ok = if self.hub.is_some() {
            let slot = Rc::new(Slot::default());
            self.hub_send_barrier(Waiter::Local(slot.clone()));
            slot.take().await
        } else {
            let token = self.next_token.get();
            self.next_token.set(token + 1);
            let slot = Rc::new(Slot::default());
            self.barriers.borrow_mut().insert(token, slot.clone());
            // Forget the token if the caller gives up waiting.
            struct Pending<'a>(&'a Listener, u64);
            impl Drop for Pending<'_> {
                fn drop(&mut self) {
                    self.0.barriers.borrow_mut().remove(&self.1);
                }
            }
            let _pending = Pending(self, token);
            self.outbox.send(
                self.owner,
                CoreMsg::ListenBarrier {
                    database: self.database.clone(),
                    from: self.core,
                    token,
                },
            );
            slot.take().await
        };
        if ok {
            self.confirmed.set(self.confirmed.get().max(covers));
            Ok(())
        } else {
            Err("listening connection lost".into())
        }
    }

    /// The owner core answered a barrier of this core.
    pub fn barrier_done(&self, token: u64, ok: bool) {
        let slot = self.barriers.borrow_mut().remove(&token);
        if let Some(slot) = slot {
            slot.put(ok);
        }
    }

    /// A notification for this core's sessions: each session listening on its channel gets it
    /// once.
    pub fn dispatch(&self, msg: &[u8]) {
        let Some(channel) = notification_channel(msg) else {
            return;
        };
        let sessions: Vec<Rc<dyn Listening>> = match self.channels.borrow().get(channel) {
            Some(m) => m.values().filter_map(Weak::upgrade).collect(),
            None => Vec::new(),
        };
        // Clients see the sending session's pid (pids.rs); the backend's is compared below.
        let shown = crate::pids::shown(msg);
        for s in sessions {
            s.notification(&shown);
        }
        // A session joining the channel hears only its own notifications (sent by the backend
        // that runs its transaction): held, never sent at once, kept at the read-back only if
        // it does listen (see `update`).
        let ahead: Vec<Rc<dyn Listening>> = match self.ahead.borrow().get(channel) {
            Some(m) => m.values().filter_map(Weak::upgrade).collect(),
            None => return,
        };
        let Some(sender) = notification_pid(msg) else {
            return;
        };
        for s in ahead {
            let own = s.listen().own_pid.get() == Some(sender) || s.backend_pid() == Some(sender);
            if own {
                s.listen().queue_note(&shown);
            }
        }
    }

    /// On the owner core: core `from` starts/stops listening on channels; the connection
    /// `LISTEN`s a channel when the first core listens on it and `UNLISTEN`s it after the last.
    pub fn hub_update(self: &Rc<Self>, from: usize, add: Vec<String>, remove: Vec<String>) {
        let Some(hub) = &self.hub else {
            tracing::warn!(database = %self.database, core = self.core, "LISTEN registry update for a core that does not own the database");
            return;
        };
        let (mut listen, mut unlisten) = (Vec::new(), Vec::new());
        {
            let mut reg = hub.cores.borrow_mut();
            for c in remove {
                if let Some(v) = reg.get_mut(&c) {
                    v.retain(|&x| x != from);
                    if v.is_empty() {
                        reg.remove(&c);
                        unlisten.push(c);
                    }
                }
            }
            for c in add {
                let v = reg.entry(c.clone()).or_default();
                if v.is_empty() {
                    listen.push(c);
                }
                if !v.contains(&from) {
                    v.push(from);
                }
            }
        }
        if listen.is_empty() && unlisten.is_empty() {
            return;
        }
        if hub.cores.borrow().is_empty() && !hub.lingering.replace(true) {
            let me = self.clone();
            glommio::spawn_local(async move {
                glommio::timer::sleep(LINGER).await;
                if let Some(hub) = &me.hub {
                    hub.lingering.set(false);
                }
                me.release();
            })
            .detach();
        }
        let live = hub.conn.borrow().clone().filter(|c| !c.dead.get());
        match live {
            Some(c) => {
                let sql = listen_sql(&listen) + &unlisten_sql(&unlisten);
                self.hub_send(&c, &sql, Waiter::None);
            }
            // Connecting, or to connect: the new connection LISTENs on the whole registry.
            None if !listen.is_empty() => {
                let me = self.clone();
                glommio::spawn_local(async move {
                    let _ = me.conn().await;
                })
                .detach();
            }
            None => {}
        }
    }

    /// Closes the listening connection if no core listens on anything (and no query is waiting
    /// on it): after [`LINGER`], and when the database is about to be dropped, renamed or copied,
    /// which Postgres refuses while anyone is connected to it.
    pub fn release(&self) {
        let Some(hub) = &self.hub else { return };
        if !hub.cores.borrow().is_empty() {
            return;
        }
        let idle = hub
            .conn
            .borrow()
            .as_ref()
            .is_some_and(|c| c.waiters.borrow().is_empty());
        if idle {
            if let Some(c) = hub.conn.borrow_mut().take() {
                tracing::debug!(database = %self.database, "nobody listens: closing the listening connection");
                c.close();
            }
        }
    }

    /// On the owner core: a barrier asked by core `from`.
    pub fn hub_barrier(self: &Rc<Self>, from: usize, token: u64) {
        if self.hub.is_none() {
            self.answer(Waiter::Peer { core: from, token }, false);
            return;
        }
        self.hub_send_barrier(Waiter::Peer { core: from, token });
    }

    /// An empty query on the listening connection (connecting it first if needed); `w` learns
    /// when it was answered. Sent at once when the connection is up, so it follows every
    /// `LISTEN` sent before.
    fn hub_send_barrier(self: &Rc<Self>, w: Waiter) {
        let live = self
            .hub
            .as_ref()
            .and_then(|h| h.conn.borrow().clone())
            .filter(|c| !c.dead.get());
        if let Some(c) = live {
            self.hub_send(&c, "", w);
            return;
        }
        let me = self.clone();
        glommio::spawn_local(async move {
            match me.conn().await {
                Ok(c) => me.hub_send(&c, "", w),
                Err(_) => me.answer(w, false),
            }
        })
        .detach();
    }

    /// Queues a query on the listening connection; `w` is answered at its `ReadyForQuery`.
    fn hub_send(&self, conn: &Conn, sql: &str, w: Waiter) {
        if conn.dead.get() {
            self.answer(w, false);
            return;
        }
        let mut q = Vec::new();
        frontend::query(&mut q, sql);
        conn.waiters.borrow_mut().push_back(w);
        conn.out.push(&q);
    }

    fn answer(&self, w: Waiter, ok: bool) {
        match w {
            Waiter::None => {}
            Waiter::Local(slot) => slot.put(ok),
            Waiter::Peer { core, token } if core == self.core => self.barrier_done(token, ok),
            Waiter::Peer { core, token } => self.outbox.send(
                core,
                CoreMsg::ListenBarrierDone {
                    database: self.database.clone(),
                    token,
                    ok,
                },
            ),
        }
    }

    /// On the owner core: a notification from Postgres goes to every core listening on its
    /// channel, this one directly, the others over the mesh (in order with barrier answers).
    fn fan_out(&self, msg: &[u8]) {
        let Some(hub) = &self.hub else { return };
        let Some(channel) = notification_channel(msg) else {
            return;
        };
        // Copied out: dispatching must not hold the registry borrowed.
        let cores = match hub.cores.borrow().get(channel) {
            Some(v) => v.clone(),
            None => return,
        };
        for c in cores {
            if c == self.core {
                self.dispatch(msg);
            } else {
                self.outbox.send(
                    c,
                    CoreMsg::Notification {
                        database: self.database.clone(),
                        msg: msg.to_vec(),
                    },
                );
            }
        }
    }

    /// The listening connection, connecting it if needed (owner core only).
    async fn conn(self: &Rc<Self>) -> Result<Rc<Conn>, String> {
        let Some(hub) = &self.hub else {
            return Err("not the owner core of this database".into());
        };
        loop {
            if let Some(c) = hub.conn.borrow().clone() {
                if !c.dead.get() {
                    return Ok(c);
                }
            }
            if hub.connecting.get() {
                let n = hub.connected.notified();
                if hub.connecting.get() {
                    n.await;
                }
                if hub.conn.borrow().as_ref().is_none_or(|c| c.dead.get()) {
                    return Err("listening connection failed".into());
                }
                continue;
            }
            hub.connecting.set(true);
            let timeout = Duration::from_secs(hub.cfg.connect_timeout_seconds.max(1));
            let r = crate::with_timeout(timeout, self.connect(hub))
                .await
                .unwrap_or_else(|| Err("timed out".into()));
            hub.connecting.set(false);
            match r {
                Ok(c) => {
                    *hub.conn.borrow_mut() = Some(c.clone());
                    hub.connected.notify();
                    return Ok(c);
                }
                Err(e) => {
                    hub.connected.notify();
                    tracing::warn!(database = %self.database, error = %e, "listening connection failed");
                    return Err(e);
                }
            }
        }
    }

    /// Logs in over the Unix socket as the admin role (peer authentication, like the role
    /// look-ups), so the listener takes nothing from any user's backend budget. Named
    /// `tidepool listener` in `pg_stat_activity`.
    async fn connect(self: &Rc<Self>, hub: &Hub) -> Result<Rc<Conn>, String> {
        let path = format!("{}/.s.PGSQL.{}", hub.cfg.admin_socket_dir, hub.cfg.pg_port);
        let mut stream = UnixStream::connect(&path)
            .await
            .map_err(|e| format!("{path}: {e}"))?;
        let logged = login::login(
            &mut stream,
            &hub.cfg.admin_user,
            &self.database,
            &Credential::None,
            hub.cfg.max_message_size,
        )
        .await
        .map_err(|e| match e {
            login::LoginError::Postgres(m) => String::from_utf8_lossy(&m).into_owned(),
            login::LoginError::Other(s) => s,
            login::LoginError::WaitTimeout => "query_wait_timeout".into(),
        })?;
        let conn = Rc::new(Conn {
            out: OutQueue::new(1 << 20, 16 * 1024),
            waiters: RefCell::new(VecDeque::new()),
            dead: Cell::new(false),
            closing: Cell::new(false),
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
        // A new connection (first, or after the old one died) listens on every channel some
        // core listens on; queued before any caller's query, so that query's answer covers it.
        // Nothing awaits between here and the caller storing the connection, so no registry
        // change falls between.
        let all: Vec<String> = hub.cores.borrow().keys().cloned().collect();
        let sql = format!(
            "SET application_name = 'tidepool listener';{}",
            listen_sql(&all)
        );
        self.hub_send(&conn, &sql, Waiter::None);
        tracing::debug!(database = %self.database, pid = logged.pid, "listening connection up");
        Ok(conn)
    }

    /// After the connection died: reconnect (and re-`LISTEN`) while any core listens.
    fn revive(self: &Rc<Self>) {
        let Some(hub) = &self.hub else { return };
        if hub.reviving.replace(true) {
            return;
        }
        let me = self.clone();
        glommio::spawn_local(async move {
            let Some(hub) = &me.hub else { return };
            // Bounded: gives up when nobody listens any more; at most one attempt every 500 ms.
            for _ in 0..100_000u32 {
                if hub.cores.borrow().is_empty() {
                    break;
                }
                glommio::timer::sleep(Duration::from_millis(500)).await;
                if me.conn().await.is_ok() {
                    break;
                }
            }
            hub.reviving.set(false);
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
    let max = l.hub.as_ref().map_or(1 << 20, |h| h.cfg.max_message_size);
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
                be::NOTIFICATION_RESPONSE => l.fan_out(msg),
                be::ERROR_RESPONSE => {
                    let code = be::error_sqlstate(&msg[5..]).unwrap_or_default();
                    tracing::warn!(database = %l.database, sqlstate = %String::from_utf8_lossy(code), "error on the listening connection");
                }
                be::READY_FOR_QUERY => {
                    // After every notification that came before it (fanned out above), so a
                    // barrier's answer follows them on each mesh channel.
                    let w = conn.waiters.borrow_mut().pop_front();
                    if let Some(w) = w {
                        l.answer(w, true);
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
    let waiters: Vec<Waiter> = conn.waiters.borrow_mut().drain(..).collect();
    for w in waiters {
        l.answer(w, false);
    }
    if !conn.closing.get() {
        tracing::warn!(database = %l.database, "listening connection lost; reconnecting while sessions listen");
        l.revive();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_is_stable_and_in_range() {
        for cores in 1..8 {
            for db in ["app", "postgres", "diff", "x"] {
                let o = owner_core(db, cores);
                assert!(o < cores);
                assert_eq!(o, owner_core(db, cores));
            }
        }
        assert_eq!(owner_core("app", 0), 0);
        // Databases spread over cores.
        let owners: std::collections::HashSet<usize> =
            (0..32).map(|i| owner_core(&format!("db{i}"), 4)).collect();
        assert!(owners.len() > 1);
        assert_eq!(
            unlisten_sql(&["a".into(), "b".into()]),
            "UNLISTEN \"a\";UNLISTEN \"b\";"
        );
    }

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
        assert_eq!(notification_pid(&note("x", "")), Some(7));
        assert_eq!(notification_pid(b"A\0\0"), None);
    }
}
