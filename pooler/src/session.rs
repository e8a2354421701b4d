//! A client session as the pooler sees it: its role, settings and prepared statements, and the
//! backend it holds while a transaction (or other state) requires it.
//!
//! Each session has a task that takes the gateway's frames in order, finds a backend when it has
//! none, brings the backend's settings to the session's, rewrites statement names (a client's
//! `s1` is `tp_<hash of its text>` on every backend, parsed once per backend whoever asked), and
//! writes the messages. Responses come back through the backend's relay.

use crate::core::{Core, SessionHandle};
use crate::listen::{self, Listening, SessionListen};
use crate::pool::{self, Backend, Pool};
use crate::readback;
use crate::responses::{self, Done, Entry, Internal, Kind, Owner};
use crate::sql_names::{ensure, parse_names, write_sql_query, SqlName};
use crate::statements::{Bounds, Past, Statements, Stmt};
use shared::io::{Notify, OutQueue, Slot};
use shared::link::{down, flags, put_header, Credential};
use shared::protocol::backend::{self as be, Severity};
use shared::protocol::frontend as fe;
use shared::protocol::typed_message_len;
use shared::settings::Settings;
use std::cell::{Cell, RefCell};

use std::collections::VecDeque;
use std::rc::Rc;

/// Bytes a session may have in flight towards its gateway before its backend's relay stops
/// reading.
const WINDOW: usize = 256 * 1024;

/// Notification bytes a session may have sent towards a client that has not read them (see
/// `Session::notification`).
const UNREAD_LIMIT: usize = 16 << 20;

pub struct Session {
    pub id: u32,
    /// Its link's frames to the gateway.
    pub to_gateway: Rc<OutQueue>,
    pub pool: Rc<Pool>,
    pub credential: Credential,
    pub cancel_key: (i32, i32),
    /// What `RESET` returns to: the startup packet's settings over the role and database
    /// defaults in force when the session opened (`ALTER ROLE|DATABASE … SET`, see `open`).
    pub baseline: RefCell<Rc<Settings>>,
    pub settings: RefCell<Rc<Settings>>,
    /// Custom settings (`x.y`) the session may have set: read back by name (see `up::WATCH`).
    pub watch: RefCell<Vec<String>>,
    pub statements: Statements,
    pub unnamed: RefCell<Option<Rc<Stmt>>>,
    pub backend: RefCell<Option<Rc<Backend>>>,
    /// Session state lives on the backend (temp table, cursor WITH HOLD, advisory lock…).
    pub pinned: Cell<bool>,
    /// The backend it held last: taken again when idle, so state Postgres keeps per backend
    /// and Tidepool cannot copy (`currval`, statistics not yet flushed, C statics) stays the
    /// session's as often as the pool allows.
    pub last_backend: RefCell<std::rc::Weak<Backend>>,
    /// The next backend attached gets `DISCARD SEQUENCES` first unless this session held it
    /// last (flag `SEQUENCES` with `PIN`).
    pub own_sequences_only: Cell<bool>,
    /// The session ran `nextval`/`setval`: it keeps its backend until its next request (at most
    /// `sequence_lease_ms`), so a `currval` right after finds its value (flag `SEQUENCES` alone).
    pub leased: Cell<bool>,
    lease_epoch: Cell<u64>,
    /// The session task is in the middle of writing a batch.
    pub writing: Cell<bool>,
    /// Extended-protocol messages were written since the last `Sync`.
    pub open_batch: Cell<bool>,
    pub snapshot_pending: Cell<bool>,
    pub discard_pending: Cell<bool>,
    pub dealloc_pending: Cell<bool>,
    /// We raised an error ourselves: drop the client's messages up to its `Sync`.
    skip_until_sync: Cell<bool>,
    /// Responses for the client, gathered before one `DATA` frame.
    pub out: RefCell<Vec<u8>>,
    pub inflight: Cell<usize>,
    pub credit: Notify,
    /// `MSGS` payloads as received: the flags byte, then the messages.
    inbox: RefCell<VecDeque<Vec<u8>>>,
    inbox_bytes: Cell<usize>,
    inbox_notify: Notify,
    /// `MSGS` bytes taken from the inbox since `OPEN`, and as last acknowledged (`down::ACK`).
    taken: Cell<u64>,
    acked: Cell<u64>,
    /// The client left (or its link did).
    pub gone: Cell<bool>,
    /// The session cannot go on (its backend died holding state).
    dead: Cell<bool>,
    /// A backend's FATAL was forwarded to the client: its connection ends with that.
    told_fatal: Cell<bool>,
    /// Client names of prepared statements whose result type changed since the client prepared
    /// them (Postgres said 0A000): as in Postgres's plan cache, every later execution fails the
    /// same way until the client prepares the name again (issue 11).
    stale_plans: RefCell<Vec<Vec<u8>>>,
    /// When the client prepared its recent statement names (`statements::clock`), at most
    /// `PARSED_KEPT`: a 0A000 from a backend's copy made before that is not the client's
    /// statement going stale (that copy may have been stale from the start). With the result
    /// shape it was prepared with, when known: a copy made later on another backend is checked
    /// against it before the client's `Bind` runs there.
    parsed: RefCell<VecDeque<Parsed>>,
    /// Channels it listens on, notifications held for it (see `listen.rs`).
    pub listen: SessionListen,
    /// Prepared-statement names in the SQL text of the batch being written (`up::NAMES`).
    sql_names: RefCell<Vec<SqlName>>,
}

/// Marks an inbox item that holds an `up::NAMES` payload rather than a `MSGS` one (a `MSGS`
/// flags byte never has its top bit set).
const NAMES_ITEM: u8 = 0xff;

impl Session {
    pub fn new(
        id: u32,
        to_gateway: Rc<OutQueue>,
        pool: Rc<Pool>,
        credential: Credential,
        cancel_key: (i32, i32),
        baseline: Rc<Settings>,
    ) -> Rc<Session> {
        // The user's statement count, shared with its other sessions: found once, here.
        let statements = Statements::of_user(pool.global.user.clone());
        Rc::new(Session {
            id,
            to_gateway,
            pool,
            credential,
            cancel_key,
            settings: RefCell::new(baseline.clone()),
            watch: RefCell::new(Vec::new()),
            baseline: RefCell::new(baseline),
            statements,
            unnamed: RefCell::new(None),
            backend: RefCell::new(None),
            pinned: Cell::new(false),
            last_backend: RefCell::new(std::rc::Weak::new()),
            own_sequences_only: Cell::new(false),
            leased: Cell::new(false),
            lease_epoch: Cell::new(0),
            writing: Cell::new(false),
            open_batch: Cell::new(false),
            snapshot_pending: Cell::new(false),
            discard_pending: Cell::new(false),
            dealloc_pending: Cell::new(false),
            skip_until_sync: Cell::new(false),
            out: RefCell::new(Vec::new()),
            inflight: Cell::new(0),
            credit: Notify::default(),
            inbox: RefCell::new(VecDeque::new()),
            inbox_bytes: Cell::new(0),
            inbox_notify: Notify::default(),
            taken: Cell::new(0),
            acked: Cell::new(0),
            gone: Cell::new(false),
            dead: Cell::new(false),
            told_fatal: Cell::new(false),
            stale_plans: RefCell::new(Vec::new()),
            parsed: RefCell::new(VecDeque::new()),
            listen: Default::default(),
            sql_names: RefCell::new(Vec::new()),
        })
    }

    /// Queues a `MSGS` payload. Never waits: the link's reader serves every session on the
    /// link. The gateway keeps each session's requests within `link::REQUEST_WINDOW` of what
    /// the session took (`down::ACK`); `false` when it went past twice that (the session is
    /// then dropped, not the link).
    pub fn enqueue(&self, payload: Vec<u8>) -> bool {
        if self.inbox_bytes.get() > 2 * shared::link::REQUEST_WINDOW as usize {
            return false;
        }
        if payload.is_empty() {
            return true;
        }
        self.inbox_bytes.set(self.inbox_bytes.get() + payload.len());
        self.inbox.borrow_mut().push_back(payload);
        self.inbox_notify.notify();
        true
    }

    /// Queues an `up::NAMES` payload: it belongs to the `MSGS` that follows it (its size
    /// follows that `MSGS`'s, so it is not counted against the window).
    pub fn enqueue_names(&self, payload: Vec<u8>) {
        let mut item = Vec::with_capacity(payload.len() + 1);
        item.push(NAMES_ITEM);
        item.extend_from_slice(&payload);
        self.inbox.borrow_mut().push_back(item);
        self.inbox_notify.notify();
    }

    /// The session took a `MSGS` payload of `n` bytes from its inbox: acknowledged to the
    /// gateway every `ACK_EVERY` bytes (one small frame per 64 KiB of requests).
    fn taken(&self, n: usize) {
        self.inbox_bytes.set(self.inbox_bytes.get() - n);
        let total = self.taken.get() + n as u64;
        self.taken.set(total);
        if total - self.acked.get() >= shared::link::ACK_EVERY && !self.gone.get() {
            self.acked.set(total);
            self.to_gateway.push_with(|b| {
                shared::link::put_frame(b, down::ACK, self.id, &total.to_be_bytes())
            });
        }
    }

    pub fn close(&self) {
        self.gone.set(true);
        self.inbox_notify.notify();
        self.credit.notify();
    }

    /// Sends what the relay gathered for the client as one `DATA` frame.
    pub fn flush(&self) {
        let mut out = self.out.borrow_mut();
        if out.is_empty() {
            return;
        }
        if !self.gone.get() {
            self.to_gateway.push_with(|b| {
                put_header(b, down::DATA, self.id, out.len());
                b.extend_from_slice(&out);
            });
            self.inflight.set(self.inflight.get() + out.len());
        }
        out.clear();
        if out.capacity() > 64 * 1024 {
            *out = Vec::new();
        }
    }

    pub fn add_credit(&self, n: usize) {
        self.inflight.set(self.inflight.get().saturating_sub(n));
        self.credit.notify();
    }

    pub fn forget_statement(&self, client_name: Option<&[u8]>, stmt: &Rc<Stmt>) {
        match client_name {
            Some(name) => {
                self.statements.remove_if_same(name, stmt);
            }
            None => {
                let mut u = self.unnamed.borrow_mut();
                if u.as_ref().is_some_and(|s| Rc::ptr_eq(s, stmt)) {
                    *u = None;
                }
            }
        }
    }

    pub fn add_watch(&self, payload: &[u8]) {
        let mut w = self.watch.borrow_mut();
        for name in payload.split(|&b| b == 0).filter(|n| !n.is_empty()) {
            let name = String::from_utf8_lossy(name).into_owned();
            if w.len() < 256 && !w.contains(&name) {
                w.push(name);
            }
        }
    }

    pub fn clear_statements(&self) {
        self.statements.clear();
        self.stale_plans.borrow_mut().clear();
        *self.unnamed.borrow_mut() = None;
    }

    /// The session's settings changed: remember them and tell the gateway, which keeps them.
    pub fn set_settings(&self, s: Rc<Settings>) {
        let mut payload = Vec::new();
        s.encode(&mut payload);
        *self.settings.borrow_mut() = s;
        if !self.gone.get() {
            self.to_gateway.push_with(|b| {
                put_header(b, down::SETTINGS, self.id, payload.len());
                b.extend_from_slice(&payload);
            });
        }
    }

    /// Its backend stays with it when a transaction ends (pinned, or leased after `nextval`).
    pub fn keeps_backend(&self) -> bool {
        self.pinned.get() || self.leased.get()
    }

    /// A client's `pg_terminate_backend` of this session's pid (cancel.rs): the client hears
    /// what a terminated backend says, and the session ends; `finish` then stops what its
    /// backend runs (cancel, and the connection closed: Postgres rolls back) or rolls back an
    /// idle transaction, as the end of a terminated backend does.
    pub fn terminate(&self) {
        self.end_with(&fatal(
            "57P01",
            "terminating connection due to administrator command",
        ));
    }

    /// Ends the session with `err`, a FATAL `ErrorResponse`, as its last word (server_end.rs:
    /// the one Postgres ends its connections with at a shutdown or after a crash).
    pub fn end_with(&self, err: &[u8]) {
        if self.gone.get() || self.dead.get() {
            return;
        }
        self.flush();
        self.send_closed(err);
        self.close();
    }

    /// The client prepares `name` (again): a stale plan of that name is forgotten, and the
    /// moment is noted (before any backend makes a copy for it).
    fn prepared_anew(&self, name: &[u8]) {
        let mut stale = self.stale_plans.borrow_mut();
        if !stale.is_empty() {
            stale.retain(|n| n != name);
        }
        let mut parsed = self.parsed.borrow_mut();
        parsed.retain(|p| &p.name[..] != name);
        if parsed.len() >= PARSED_KEPT {
            parsed.pop_front();
        }
        parsed.push_back(Parsed {
            name: name.into(),
            at: crate::statements::clock(),
            shape: None,
        });
    }

    /// Marks `client_name` stale (its plan changed result type).
    fn mark_stale(&self, client_name: &[u8]) {
        let mut stale = self.stale_plans.borrow_mut();
        if !stale.iter().any(|n| n == client_name) {
            stale.push(client_name.to_vec());
        }
    }

    /// Our backend died while we held it.
    pub fn backend_lost(&self) {
        let needs_close = self.pinned.get() || self.out.borrow().is_empty();
        self.flush();
        if needs_close || !self.gone.get() {
            // Postgres would have closed this client's connection: so do we. When the backend
            // said why (its FATAL: 57P01 from pg_terminate_backend or a shutdown, 57P02 after
            // a crash), that, already on its way, is the client's last message, as directly:
            // nothing of ours follows it (issue 11). A backend gone without a word (killed)
            // leaves the client our 08006.
            let mut e = Vec::new();
            if !self.told_fatal.get() {
                be::error_response(
                    &mut e,
                    Severity::Fatal,
                    "08006",
                    "server connection lost: the backend serving this session terminated",
                );
            }
            self.send_closed(&e);
        }
        self.dead.set(true);
        self.inbox_notify.notify();
    }

    /// A notification from the core's listener: to the client now if the session is idle, else
    /// before its next `ReadyForQuery 'I'` (Postgres delivers only between transactions).
    ///
    /// Notifications bypass the relay's flow control (nothing stops a listener's senders), so a
    /// client that listens and stops reading would grow the gateway's queue without end. Postgres
    /// keeps a slow listener's notifications in its shared queue and fails `NOTIFY` when that is
    /// full; here each session has its own bound: past `UNREAD_LIMIT` bytes sent and not yet
    /// written to the client, the session is ended with an error (the other sessions, and the
    /// senders, go on).
    pub fn notification(&self, msg: &[u8]) {
        if self.gone.get() || self.dead.get() {
            return;
        }
        if self.busy() {
            self.listen.queue_note(msg);
            return;
        }
        if self.inflight.get() + msg.len() > UNREAD_LIMIT {
            tracing::warn!(
                session = self.id,
                unread = self.inflight.get(),
                "the client does not read its notifications; ending the session"
            );
            let mut e = Vec::new();
            be::error_response(
                &mut e,
                Severity::Fatal,
                "53200",
                "terminating connection: the client is not reading its notifications",
            );
            self.send_closed(&e);
            self.dead.set(true);
            self.inbox_notify.notify();
            return;
        }
        self.out.borrow_mut().extend_from_slice(msg);
        self.flush();
    }

    /// A request runs, a transaction is open, or a `ReadyForQuery` is held.
    fn busy(&self) -> bool {
        self.listen.gated.get()
            || self.writing.get()
            || self.open_batch.get()
            || self.backend.borrow().as_ref().is_some_and(|b| {
                let st = b.st.borrow();
                !st.queue.is_empty() || st.status != b'I'
            })
    }

    fn send_closed(&self, err: &[u8]) {
        if self.gone.get() {
            return;
        }
        self.to_gateway.push_with(|b| {
            put_header(b, down::CLOSED, self.id, err.len());
            b.extend_from_slice(err);
        });
    }
}

/// The session as its backend's response stream sees it (responses.rs).
impl Owner for Session {
    fn forward(&self, msg: &[u8]) {
        if msg.first() == Some(&be::ERROR_RESPONSE) && is_fatal(msg)
            || msg.first() == Some(&be::NOTICE_RESPONSE) && crate::server_end::last_warning(msg)
        {
            self.told_fatal.set(true);
        }
        self.out.borrow_mut().extend_from_slice(msg);
    }

    fn flush(&self) {
        Session::flush(self);
    }

    fn signal_marker(&self, msg: &[u8]) {
        // After what was forwarded before it: the gateway may pass it on to the client.
        Session::flush(self);
        if !self.gone.get() {
            self.to_gateway.push_with(|b| {
                put_header(b, down::SIGNAL, self.id, msg.len());
                b.extend_from_slice(msg);
            });
        }
    }

    fn window_full(&self) -> Option<&Notify> {
        (self.inflight.get() > WINDOW && !self.gone.get()).then_some(&self.credit)
    }

    fn notes_before_idle(&self) {
        self.listen.take_notes(&mut self.out.borrow_mut());
    }

    fn hold_ready(self: Rc<Self>, rfq: Option<&[u8]>) -> bool {
        hold_rfq(&self, rfq)
    }

    fn settings_changed(&self) {
        self.snapshot_pending.set(true);
        self.listen.only.set(false);
    }

    fn own_notification(&self) {
        self.listen.barrier.set(true);
        // A notification the statement did not announce (a trigger's): its next ones show the
        // session's pid too.
        if let Some(b) = self.backend.borrow().as_ref() {
            crate::pids::notifying(b.pid, self.cancel_key.0);
        }
    }

    fn read_back_sql(&self) -> (String, bool) {
        self.snapshot_pending.set(false);
        self.listen.read.borrow_mut().clear();
        let channels_only = self.listen.only.replace(false);
        let sql = readback::snapshot_sql(
            &mut self.watch.borrow_mut(),
            &self.settings.borrow(),
            channels_only,
        );
        (sql, channels_only)
    }

    fn read_back_row(&self, name: &str, value: &str) -> bool {
        if name == readback::MARKER {
            self.listen.read.borrow_mut().push(value.to_owned());
        } else if name == readback::BODY_MARKER {
            let mut w = self.watch.borrow_mut();
            if w.len() < 512 && !w.iter().any(|n| n == value) {
                w.push(value.to_owned());
            }
        } else {
            return false;
        }
        true
    }

    fn channels_read_back(self: Rc<Self>) -> Option<bool> {
        // A flagged LISTEN/UNLISTEN, or channels that changed under a statement that was not
        // flagged (LISTEN inside a user function): the listener follows.
        let changed = {
            let mut read = self.listen.read.borrow_mut();
            read.sort();
            read.dedup();
            *read != *self.listen.channels.borrow()
        };
        if !(self.listen.dirty.replace(false) || changed) {
            return None;
        }
        self.pool.listener.read_back(&self);
        Some(!self.listen.channels.borrow().is_empty())
    }

    fn settings_read_back(&self, snapshot: &Rc<Settings>) -> Rc<Settings> {
        let desired = snapshot.overlay_on(&self.baseline.borrow());
        let target = if desired == **snapshot {
            snapshot.clone()
        } else {
            Rc::new(desired)
        };
        self.set_settings(target.clone());
        target
    }

    fn forget_statement(&self, client_name: Option<&[u8]>, stmt: &Rc<Stmt>) {
        Session::forget_statement(self, client_name, stmt);
    }

    fn restore_statement(&self, client_name: Vec<u8>, stmt: Rc<Stmt>) {
        self.statements.insert_if_absent(client_name, stmt);
    }

    fn statement_shape(&self, client_name: &[u8], shape: Option<Box<[u8]>>, check: bool) {
        let mut parsed = self.parsed.borrow_mut();
        let Some(p) = parsed.iter_mut().find(|p| &p.name[..] == client_name) else {
            return;
        };
        match (&p.shape, check) {
            (None, false) => p.shape = shape,
            // A copy made after a change the client's statement predates: Postgres would
            // refuse the client's plan (0A000), so do we (`stale_plans`).
            (Some(was), true) if shape.as_ref() != Some(was) => {
                drop(parsed);
                self.mark_stale(client_name);
            }
            _ => {}
        }
    }

    fn statement_stale(&self, client_name: &[u8], made: Option<u64>) {
        if let Some(stmt) = self.statements.borrow().get(client_name) {
            stmt.validated.set(false);
            let parsed = self.parsed.borrow();
            let at = parsed.iter().find(|p| &p.name[..] == client_name);
            if !matches!((made, at), (Some(m), Some(p)) if m > p.at) {
                return;
            }
            let mut stale = self.stale_plans.borrow_mut();
            if !stale.iter().any(|n| n == client_name) {
                stale.push(client_name.to_vec());
            }
        }
    }

    fn writing(&self) -> bool {
        self.writing.get()
    }

    fn open_batch(&self) -> bool {
        self.open_batch.get()
    }

    fn keeps_backend(&self) -> bool {
        Session::keeps_backend(self)
    }

    fn snapshot_pending(&self) -> bool {
        self.snapshot_pending.get()
    }

    fn take_dealloc(&self) -> bool {
        let dealloc = self.dealloc_pending.replace(false);
        if dealloc {
            self.clear_statements();
        }
        dealloc
    }

    fn take_discard(&self) -> bool {
        let discard = self.discard_pending.replace(false);
        if discard {
            self.clear_statements();
            self.pinned.set(false);
        }
        discard
    }

    fn detach(&self) {
        self.backend.borrow_mut().take();
    }

    fn backend_lost(&self) {
        Session::backend_lost(self);
    }
}

/// The session as its core's registry and the other cores see it (core.rs, cancel.rs).
impl SessionHandle for Session {
    fn session_id(&self) -> u32 {
        self.id
    }

    fn held_backend(&self) -> Option<Rc<Backend>> {
        self.backend.borrow().clone()
    }

    fn terminate(&self) {
        Session::terminate(self);
    }

    fn end_with(&self, err: &[u8]) {
        Session::end_with(self, err);
    }

    fn link(&self) -> &Rc<OutQueue> {
        &self.to_gateway
    }
}

/// The session as its core's LISTEN registry sees it (listen.rs).
impl Listening for Session {
    fn listen(&self) -> &SessionListen {
        &self.listen
    }

    fn backend_pid(&self) -> Option<i32> {
        self.backend.borrow().as_ref().map(|b| b.pid)
    }

    fn notification(&self, msg: &[u8]) {
        Session::notification(self, msg);
    }
}

/// Called where a `ReadyForQuery 'I'` for `s` would go out (listen.rs) with nothing more to come: when the
/// session's channels changed or it notified itself, hold it (`Some`) or hold its next request
/// (`None`: it already went) until the listener caught up (a barrier on the owner core's
/// listening connection). `true`: held, do not forward it.
fn hold_rfq(s: &Rc<Session>, rfq: Option<&[u8]>) -> bool {
    let l = &s.listen;
    let barrier = l.barrier.replace(false) && !l.channels.borrow().is_empty();
    let sync = l.sync.replace(false);
    if !(barrier || sync) || s.gone.get() || l.gated.get() {
        return false;
    }
    l.gated.set(true);
    let s = s.clone();
    let rfq = rfq.map(|r| r.to_vec());
    let held = rfq.is_some();
    let listener = s.pool.listener.clone();
    glommio::spawn_local(async move {
        match crate::with_timeout(listen::SYNC_TIMEOUT, listener.barrier()).await {
            Some(Ok(())) => {}
            Some(Err(e)) => tracing::warn!(error = %e, "listener not caught up"),
            None => tracing::warn!("listener did not answer in time"),
        }
        listener.promote(&s);
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

fn attach(s: &Rc<Session>, b: &Rc<Backend>) {
    b.st.borrow_mut().owner = Some(s.clone());
    b.shown.taken(s.cancel_key.0);
    *s.backend.borrow_mut() = Some(b.clone());
    *s.last_backend.borrow_mut() = Rc::downgrade(b);
    let me: Rc<dyn Owner> = s.clone();
    let before = b.last_owner.replace(Some(Rc::downgrade(&me)));
    let was_mine = before.is_some_and(|w| std::ptr::addr_eq(w.as_ptr(), Rc::as_ptr(s)));
    if s.own_sequences_only.replace(false) && !was_mine {
        // Another session used this backend since: its currval/lastval state is not ours.
        let mut q = Vec::new();
        fe::query(&mut q, "DISCARD SEQUENCES");
        b.send(&q, Some(Entry::Internal(Internal::DiscardSequences)));
    }
}

/// Gives the backend back if nothing needs it: no transaction, no pending responses, no state.
fn maybe_release(core: &Rc<Core>, s: &Rc<Session>) {
    let Some(b) = s.backend.borrow().clone() else {
        return;
    };
    {
        let mut st = b.st.borrow_mut();
        let quiet =
            st.queue.is_empty() && !s.open_batch.get() && st.status == b'I' && !s.writing.get();
        if !quiet {
            return;
        }
        if s.snapshot_pending.get() || s.discard_pending.get() {
            if s.discard_pending.replace(false) {
                s.clear_statements();
                st.prepared.clear();
                st.unnamed = None;
                s.pinned.set(false);
            }
            responses::start_snapshot(&b.out, &mut st, false);
            return;
        }
        if s.keeps_backend() {
            return;
        }
        st.owner = None;
    }
    s.backend.borrow_mut().take();
    pool::release(&core.pools, b);
}

/// The session's task: open, then process the gateway's frames in order until the client leaves.
pub async fn run(core: Rc<Core>, s: Rc<Session>) {
    if core.draining.get() {
        let err = fatal("57P03", "the database system is shutting down");
        s.to_gateway.push_with(|b| {
            put_header(b, down::OPEN_FAILED, s.id, err.len());
            b.extend_from_slice(&err);
        });
        finish(&core, &s);
        return;
    }
    // Boxed: login state (a backend connecting, role defaults read) is freed once the session
    // is open, so an idle session's task holds only the loop below.
    match Box::pin(open(&core, &s)).await {
        Ok(params) => s.to_gateway.push_with(|b| {
            put_header(b, down::OPENED, s.id, params.len());
            b.extend_from_slice(&params);
        }),
        Err(err) => {
            s.to_gateway.push_with(|b| {
                put_header(b, down::OPEN_FAILED, s.id, err.len());
                b.extend_from_slice(&err);
            });
            finish(&core, &s);
            return;
        }
    }
    loop {
        // A ReadyForQuery held for the listener (listen.rs): the next request waits for it.
        let gate = s.listen.gate_open.notified();
        if s.listen.gated.get() && !s.gone.get() {
            gate.await;
            continue;
        }
        let notified = s.inbox_notify.notified();
        let drain = core.drain_notify.listen();
        if s.gone.get() || s.dead.get() {
            break;
        }
        // SIGTERM: an idle session ends now (what Postgres says at shutdown, 57P01: drivers
        // reconnect), one in a transaction when it ends or the shutdown timeout passes.
        if core.draining.get() && (core.force.get() || (s.inbox.borrow().is_empty() && !s.busy())) {
            s.flush();
            s.send_closed(&fatal(
                "57P01",
                "terminating connection due to administrator command",
            ));
            break;
        }
        let item = s.inbox.borrow_mut().pop_front();
        let Some(payload) = item else {
            futures_lite::future::or(notified, drain).await;
            continue;
        };
        if payload[0] == NAMES_ITEM {
            *s.sql_names.borrow_mut() = parse_names(&payload[1..]);
            continue;
        }
        s.taken(payload.len());
        // Boxed: the batch's state (backend acquisition, waits) exists only while it runs, so
        // an idle session's task stays small.
        let result = Box::pin(process(&core, &s, payload[0], &payload[1..])).await;
        s.sql_names.borrow_mut().clear();
        if let Err(err) = result {
            s.flush();
            s.send_closed(&err);
            break;
        }
    }
    finish(&core, &s);
}

/// Checks the role can log in to the database (a backend exists or connects) and applies the
/// startup settings, returning the `ParameterStatus` messages the client should see.
///
/// The session's defaults are those of a login now: the role and database defaults in force
/// (`pg_db_role_setting`, cached briefly) under the startup packet's settings, as Postgres
/// orders them. They become the session's baseline, so any backend, whenever it logged in, is
/// brought to them, and `RESET` returns to them.
async fn open(core: &Rc<Core>, s: &Rc<Session>) -> Result<Vec<u8>, Vec<u8>> {
    let startup = s.baseline.borrow().clone();
    let key = &s.pool.key;
    let mut candidates = Vec::with_capacity(2);
    match core.admin.role_defaults(&key.user, &key.database).await {
        Ok(d) if !d.is_empty() => candidates.push(core.shared_baseline(startup.overlay_on(&d))),
        Ok(_) => {}
        Err(e) => tracing::warn!(
            user = %key.user, db = %key.database, error = %e,
            "reading role defaults failed: the session starts with its backend's"
        ),
    }
    candidates.push(startup);
    let last = candidates.len() - 1;
    for (i, baseline) in candidates.into_iter().enumerate() {
        *s.baseline.borrow_mut() = baseline.clone();
        *s.settings.borrow_mut() = baseline.clone();
        match open_with(core, s, &baseline).await? {
            Ok(params) => return Ok(params),
            Err(e) if i < last => {
                // Postgres only warns about a role or database default it cannot apply at
                // login: the session starts without them rather than failing.
                tracing::warn!(
                    user = %key.user, db = %key.database,
                    error = %String::from_utf8_lossy(e.get(5..).unwrap_or_default()),
                    "a role or database default was refused: the session starts without them"
                );
            }
            Err(e) => {
                // An invalid startup setting ends the login, as in Postgres (which says FATAL).
                let mut fatal = Vec::new();
                be::error_as_fatal(&mut fatal, e.get(5..).unwrap_or_default());
                return Err(fatal);
            }
        }
    }
    Err(protocol_violation("no settings to open the session with"))
}

/// Applies `baseline` on a backend (or finds a recent login that did): the `ParameterStatus`
/// messages, or the error Postgres gave for the settings.
async fn open_with(
    core: &Rc<Core>,
    s: &Rc<Session>,
    baseline: &Rc<Settings>,
) -> Result<Result<Vec<u8>, Vec<u8>>, Vec<u8>> {
    if let Some(params) = core.recent_login(&s.pool.key, baseline) {
        return Ok(Ok((*params).clone()));
    }
    let b = pool::acquire(&core.pools, &s.pool, &s.credential, &s.last_backend)
        .await
        .map_err(|e| e.to_message())?;
    attach(s, &b);
    s.writing.set(true);
    let done = Rc::new(Slot::default());
    let applied = if b.sync_settings(baseline, false, false, Some(done.clone())) {
        done.take().await
    } else {
        Ok(())
    };
    s.writing.set(false);
    let mut params = Vec::new();
    for (k, v) in b.st.borrow().reported.iter() {
        be::parameter_status(&mut params, k, v);
    }
    maybe_release(core, s);
    if applied.is_ok() {
        core.remember_login(&s.pool.key, baseline, params.clone());
    }
    Ok(applied.map(|()| params))
}

/// The session's backend, acquiring one if it has none. `None` if the client left meanwhile.
async fn ensure_backend(core: &Rc<Core>, s: &Rc<Session>) -> Result<Option<Rc<Backend>>, Vec<u8>> {
    if let Some(b) = s.backend.borrow().clone() {
        return Ok(Some(b));
    }
    let acquired = futures_lite::future::or(
        async { Some(pool::acquire(&core.pools, &s.pool, &s.credential, &s.last_backend).await) },
        async {
            loop {
                let n = s.inbox_notify.notified();
                if s.gone.get() || s.dead.get() {
                    return None;
                }
                n.await;
            }
        },
    )
    .await;
    let b = match acquired {
        None => return Ok(None),
        Some(r) => r.map_err(|e| e.to_message())?,
    };
    attach(s, &b);
    let target = s.settings.borrow().clone();
    b.sync_settings(&target, false, false, None);
    // While the session holds it, the backend listens on the session's channels, so that
    // pg_listening_channels() and UNLISTEN see them (listen.rs).
    let channels = s.listen.channels.borrow();
    if !channels.is_empty() {
        b.st.borrow_mut().listening = true;
        let mut q = Vec::new();
        fe::query(&mut q, &listen::listen_sql(&channels));
        b.send(&q, Some(Entry::Internal(Internal::Listen)));
    }
    drop(channels);
    Ok(Some(b))
}

/// Answers a batch that only prepares (already validated) statements, closes statements and
/// syncs, without a backend: a driver preparing a statement outside a transaction must not wait
/// for a backend (pgbench's synchronous PQprepare would otherwise deadlock against its own
/// clients holding every backend mid-transaction).
fn answer_locally(core: &Rc<Core>, s: &Rc<Session>, msgs: &[u8]) -> bool {
    if s.backend.borrow().is_some() || s.skip_until_sync.get() || s.open_batch.get() {
        return false;
    }
    let max = core.cfg.max_message_size.saturating_add(5);
    let mut rest = msgs;
    let mut plan = Vec::new();
    let mut planned = 0;
    while !rest.is_empty() {
        let Ok(Some(n)) = typed_message_len(rest, max) else {
            return false;
        };
        let (msg, tail) = rest.split_at(n);
        rest = tail;
        let body = &msg[5..];
        match msg[0] {
            fe::PARSE => {
                let Ok(p) = fe::parse_parse(body) else {
                    return false;
                };
                if p.name.is_empty() || s.statements.borrow().contains_key(p.name) {
                    return false;
                }
                let stmt = core.statement(p.query, p.param_types);
                if !stmt.validated.get() {
                    return false;
                }
                // Past the session's bound: the backend path answers with the error.
                planned += crate::statements::cost(p.name, &stmt);
                if past_statement_limit(core, s, planned).is_some() {
                    return false;
                }
                plan.push((fe::PARSE, p.name.to_vec(), Some(stmt)));
            }
            fe::CLOSE => match fe::parse_target(body) {
                Ok((b'S', name)) if !name.is_empty() => plan.push((fe::CLOSE, name.to_vec(), None)),
                _ => return false,
            },
            fe::SYNC => plan.push((fe::SYNC, Vec::new(), None)),
            _ => return false,
        }
    }
    if plan.last().map(|p| p.0) != Some(fe::SYNC) {
        return false;
    }
    let mut out = s.out.borrow_mut();
    for (tag, name, stmt) in plan {
        match (tag, stmt) {
            (fe::PARSE, Some(stmt)) => {
                s.prepared_anew(&name);
                s.statements.insert(name, stmt);
                be::parse_complete(&mut out);
            }
            (fe::CLOSE, _) => {
                s.statements.remove(&name);
                be::close_complete(&mut out);
            }
            _ => {
                s.listen.take_notes(&mut out);
                be::ready_for_query(&mut out, b'I')
            }
        }
    }
    true
}

/// Whether a batch has a `Query` or a `Parse` (the flags come from their texts).
fn carries_sql(msgs: &[u8]) -> bool {
    has_message(msgs, fe::QUERY) || has_message(msgs, fe::PARSE)
}

/// Whether a batch has a message of type `tag`.
fn has_message(mut msgs: &[u8], tag: u8) -> bool {
    while msgs.len() >= 5 {
        if msgs[0] == tag {
            return true;
        }
        let len = u32::from_be_bytes([msgs[1], msgs[2], msgs[3], msgs[4]]) as usize;
        match msgs.get(1 + len..) {
            Some(rest) if len >= 4 => msgs = rest,
            _ => return false,
        }
    }
    false
}

/// `nextval`/`setval` leave state in the backend that `currval`/`lastval` read: the session
/// keeps the backend until its next request arrives, or `sequence_lease_ms` passes. Applications
/// that fetch ids with `SELECT nextval(...)` usually do it inside the transaction that uses
/// them, where the backend is theirs anyway; for `nextval` then `currval` in two requests this
/// is what makes them meet.
fn lease(core: &Rc<Core>, s: &Rc<Session>) {
    let ms = core.live().sequence_lease_ms;
    if ms == 0 {
        s.leased.set(false);
        return;
    }
    s.leased.set(true);
    let epoch = s.lease_epoch.get() + 1;
    s.lease_epoch.set(epoch);
    let (core, s) = (core.clone(), s.clone());
    glommio::spawn_local(async move {
        glommio::timer::sleep(std::time::Duration::from_millis(ms)).await;
        if s.lease_epoch.get() == epoch && s.leased.replace(false) && !s.gone.get() {
            maybe_release(&core, &s);
        }
    })
    .detach();
}

/// Writes one batch of the client's messages to a backend.
async fn process(core: &Rc<Core>, s: &Rc<Session>, fl: u8, msgs: &[u8]) -> Result<(), Vec<u8>> {
    if fl & flags::SEQUENCES != 0 && !s.pinned.get() && s.backend.borrow().is_none() {
        s.own_sequences_only.set(true);
    }
    if fl & flags::SEQUENCES != 0 && fl & flags::PIN == 0 {
        lease(core, s);
    } else if carries_sql(msgs) {
        // A new statement (not the Bind/Execute of the one just parsed): the lease has done
        // its work.
        s.leased.set(false);
    }
    if fl & flags::PIN != 0 {
        s.pinned.set(true);
    }
    if fl & flags::SNAPSHOT != 0 {
        s.snapshot_pending.set(true);
        s.listen.only.set(false);
    }
    if fl & flags::DISCARD != 0 {
        s.discard_pending.set(true);
    }
    if fl & flags::DEALLOCATE != 0 {
        s.dealloc_pending.set(true);
    }
    if fl & flags::LISTEN != 0 {
        // Read the backend's channels back (with the settings, if they may have changed too)
        // when the transaction ends.
        s.listen.dirty.set(true);
        if !s.snapshot_pending.replace(true) {
            s.listen.only.set(true);
        }
    }
    if fl & flags::NOTIFY != 0 && !s.listen.channels.borrow().is_empty() {
        s.listen.barrier.set(true);
    }
    if fl & flags::LISTEN != 0 {
        // The listener listens ahead on the channels it names (listen.rs).
        let max = core.cfg.max_message_size.saturating_add(5);
        s.pool.listener.listen_ahead(s, msgs, max);
    }
    if fl & flags::NOTIFY != 0 {
        // ... and before the session notifies, the listener listens on them.
        s.pool.listener.clone().ahead_ready(s).await;
    }
    if answer_locally(core, s, msgs) {
        s.flush();
        return Ok(());
    }
    // Postgres itself may look a SQL-prepared statement up by the client's name in this batch:
    // a function's dynamic SQL (a call the gateway flagged) or SQL inside a `Parse`.
    let real_names = (fl & flags::SNAPSHOT != 0
        || has_message(msgs, fe::PARSE)
        || has_message(msgs, fe::DESCRIBE))
        && !s.open_batch.get()
        && s.statements.borrow().values().any(|st| st.sql.is_some());
    s.writing.set(true);
    let result = write_batch(core, s, msgs, real_names, fl & flags::NOTIFY != 0).await;
    s.writing.set(false);
    s.flush();
    if result.is_ok() && !s.dead.get() {
        maybe_release(core, s);
        if !s.busy() {
            // Held notifications normally go out before the ReadyForQuery; this catches a
            // ReadyForQuery that went out while the batch was still being written.
            s.listen.take_notes(&mut s.out.borrow_mut());
            s.flush();
        }
    }
    result
}

async fn write_batch(
    core: &Rc<Core>,
    s: &Rc<Session>,
    mut msgs: &[u8],
    mut real_names: bool,
    notifies: bool,
) -> Result<(), Vec<u8>> {
    let max = core.cfg.max_message_size.saturating_add(5);
    let total = msgs.len();
    while !msgs.is_empty() {
        let offset = total - msgs.len();
        let n = match typed_message_len(msgs, max) {
            Ok(Some(n)) => n,
            _ => return Err(protocol_violation("malformed message from gateway")),
        };
        let (msg, rest) = msgs.split_at(n);
        msgs = rest;
        if s.dead.get() || s.gone.get() {
            return Ok(());
        }
        let tag = msg[0];
        if s.skip_until_sync.get() {
            if tag != fe::SYNC {
                continue;
            }
            s.skip_until_sync.set(false);
        }
        let Some(b) = ensure_backend(core, s).await? else {
            return Ok(());
        };
        if notifies {
            // Its notifications show the session's pid, as its client knows it (pids.rs).
            crate::pids::notifying(b.pid, s.cancel_key.0);
        }
        if std::mem::take(&mut real_names) {
            crate::sql_names::real_names(&s.statements, &b);
        }
        if s.listen.dirty.get() {
            // It may LISTEN: UNLISTEN * before it goes back to the pool.
            b.st.borrow_mut().listening = true;
        }
        if b.skipping() && tag != fe::SYNC {
            b.send(msg, None);
        } else {
            if tag == fe::BIND {
                if let Some(done) = check_shape(core, s, &b, msg) {
                    // One round trip, once per statement and backend, for statements whose
                    // shape is known: bounded, as a lost backend answers it too.
                    s.flush();
                    let _ =
                        crate::with_timeout(std::time::Duration::from_secs(30), done.take()).await;
                }
            }
            if b.skipping() && tag != fe::SYNC {
                // The copy could not be made (its Parse failed): Postgres skips to Sync.
                b.send(msg, None);
            } else {
                write_message(core, s, &b, tag, msg, offset)?;
            }
        }
        b.drain_synth();
        if b.out.is_full() {
            s.flush();
            b.out.wait_drain().await;
        }
    }
    Ok(())
}

fn write_message(
    core: &Rc<Core>,
    s: &Rc<Session>,
    b: &Rc<Backend>,
    tag: u8,
    msg: &[u8],
    offset: usize,
) -> Result<(), Vec<u8>> {
    let body = &msg[5..];
    // A malformed message goes to Postgres as it is: it answers with its own ERROR (08P01
    // "invalid string in message") and the session goes on, as it would directly.
    let malformed = |kind: Kind| {
        s.open_batch.set(true);
        b.send(msg, Some(Entry::Client(kind)));
        Ok(())
    };
    match tag {
        fe::PARSE => {
            s.open_batch.set(true);
            let Ok(p) = fe::parse_parse(body) else {
                return malformed(Kind::Parse);
            };
            if p.name.is_empty() {
                let stmt = Rc::new(Stmt {
                    content: Rc::from(&b""[..]),
                    parse: msg.to_vec(),
                    validated: Cell::new(false),
                    sql: None,
                });
                *s.unnamed.borrow_mut() = Some(stmt.clone());
                b.st.borrow_mut().unnamed = Some(stmt.clone());
                b.send(
                    msg,
                    Some(Entry::Parse {
                        stmt,
                        injected: false,
                        client_name: None,
                    }),
                );
                return Ok(());
            }
            if s.statements.borrow().contains_key(p.name) {
                let mut e = Vec::new();
                be::error_response(
                    &mut e,
                    Severity::Error,
                    "42P05",
                    &format!(
                        "prepared statement \"{}\" already exists",
                        String::from_utf8_lossy(p.name)
                    ),
                );
                s.skip_until_sync.set(true);
                b.send(&[], Some(Entry::SynthError(e)));
                return Ok(());
            }
            let stmt = core.statement(p.query, p.param_types);
            if let Some(past) = s.statements.past(p.name, &stmt, statement_bounds(core)) {
                s.skip_until_sync.set(true);
                b.send(&[], Some(Entry::SynthError(statement_limit(past))));
                return Ok(());
            }
            s.prepared_anew(p.name);
            s.statements.insert(p.name.to_vec(), stmt.clone());
            let have = b.st.borrow_mut().prepared.touch(&stmt.content);
            if have {
                let mut pc = Vec::new();
                be::parse_complete(&mut pc);
                b.send(&[], Some(Entry::Synth(pc)));
            } else {
                b.add_prepared(stmt.content.clone(), core.live().max_prepared_statements);
                b.send(
                    &stmt.parse,
                    Some(Entry::Parse {
                        stmt: stmt.clone(),
                        injected: false,
                        client_name: Some(p.name.to_vec()),
                    }),
                );
                // The result shape the client prepared it with (answer dropped): a copy of it
                // made later on another backend must have the same (`check_shape`).
                let mut d = Vec::with_capacity(stmt.content.len() + 7);
                fe::write_target(&mut d, fe::DESCRIBE, b'S', &stmt.content);
                b.send(
                    &d,
                    Some(Entry::Shape {
                        client_name: Rc::from(p.name),
                        check: None,
                    }),
                );
            }
        }
        fe::BIND => {
            s.open_batch.set(true);
            let Ok((portal, name, rest)) = fe::parse_bind(body) else {
                return malformed(Kind::Bind);
            };
            // (A name closed since is no statement at all: Postgres's 26000 for it stands.)
            if !name.is_empty()
                && s.stale_plans.borrow().iter().any(|n| n == name)
                && s.statements.borrow().contains_key(name)
            {
                // Its plan changed result type: a Bind of a name no backend has, whose error
                // responses.rs turns into Postgres's 0A000. Postgres answers it in order and
                // skips to Sync (or says 25P02 in a failed transaction), as it would directly.
                let mut m = Vec::with_capacity(msg.len() + 16);
                fe::write_bind(&mut m, portal, responses::STALE_PLAN, rest);
                let stale: Rc<[u8]> = Rc::from(responses::STALE_PLAN);
                b.send(&m, Some(Entry::Renamed(Kind::Bind, stale, Rc::from(name))));
                return Ok(());
            }
            match statement_for(s, b, name, core.live().max_prepared_statements) {
                Some(content) => {
                    let mut m = Vec::with_capacity(msg.len() + 32);
                    fe::write_bind(&mut m, portal, &content, rest);
                    b.send(
                        &m,
                        Some(Entry::Renamed(Kind::Bind, content, Rc::from(name))),
                    );
                }
                None => b.send(msg, Some(Entry::Client(Kind::Bind))),
            }
        }
        fe::DESCRIBE => {
            s.open_batch.set(true);
            let Ok((kind, name)) = fe::parse_target(body) else {
                return malformed(Kind::Describe);
            };
            match (
                kind,
                statement_for(s, b, name, core.live().max_prepared_statements),
            ) {
                (b'S', Some(content)) => {
                    let mut m = Vec::new();
                    fe::write_target(&mut m, fe::DESCRIBE, b'S', &content);
                    b.send(
                        &m,
                        Some(Entry::Renamed(Kind::Describe, content, Rc::from(name))),
                    );
                }
                _ => b.send(msg, Some(Entry::Client(Kind::Describe))),
            }
        }
        fe::CLOSE => {
            s.open_batch.set(true);
            let Ok((kind, name)) = fe::parse_target(body) else {
                return malformed(Kind::Close);
            };
            if kind == b'S' && !name.is_empty() {
                // Other sessions may use the same statement on this backend: it stays there;
                // only this session forgets its name (Postgres answers CloseComplete even for a
                // name that does not exist).
                s.statements.remove(name);
                let mut cc = Vec::new();
                be::close_complete(&mut cc);
                b.send(&[], Some(Entry::Synth(cc)));
            } else {
                if kind == b'S' {
                    *s.unnamed.borrow_mut() = None;
                    b.st.borrow_mut().unnamed = None;
                }
                b.send(msg, Some(Entry::Client(Kind::Close)));
            }
        }
        fe::EXECUTE => {
            s.open_batch.set(true);
            b.send(msg, Some(Entry::Client(Kind::Execute)));
        }
        fe::SYNC => {
            s.open_batch.set(false);
            b.send(msg, Some(Entry::Client(Kind::Sync)));
        }
        fe::QUERY => {
            // A simple query destroys the unnamed statement (exec_simple_query).
            *s.unnamed.borrow_mut() = None;
            b.st.borrow_mut().unnamed = None;
            let names: Vec<SqlName> = s
                .sql_names
                .borrow()
                .iter()
                .filter(|n| n.offset as usize == offset)
                .cloned()
                .collect();
            if names.is_empty() {
                b.send(msg, Some(Entry::Client(Kind::Query)));
            } else if let Some(past) = past_statement_limit(
                core,
                s,
                crate::sql_names::new_prepare_bytes(&s.statements, msg, &names),
            ) {
                // Failed by the backend itself, so that a transaction it ran in fails there as
                // it would directly (an error made up here would leave the backend's open).
                b.send(
                    &raise_query(STATEMENT_LIMIT_CODE, &statement_limit_message(past)),
                    Some(Entry::Client(Kind::Query)),
                );
            } else {
                write_sql_query(
                    &s.statements,
                    core.live().max_prepared_statements,
                    s.open_batch.get(),
                    b,
                    msg,
                    &names,
                );
            }
        }
        fe::FUNCTION_CALL => b.send(msg, Some(Entry::Client(Kind::FunctionCall))),
        _ => b.send(msg, None),
    }
    Ok(())
}

/// The backend name for a client's statement, preparing it there first if needed. `None`: not
/// one of ours (unknown name, passed through so Postgres reports it) or the unnamed statement.
/// Before a client's `Bind` of a statement this backend has no copy of, whose result shape as
/// the client prepared it is known: the copy is made here and described, and the waiter told
/// when the answer is in (`Session::statement_shape` marks the statement stale if the shape
/// differs: the schema changed since the client prepared it, and Postgres would say 0A000).
fn check_shape(core: &Rc<Core>, s: &Rc<Session>, b: &Rc<Backend>, msg: &[u8]) -> Option<Done> {
    let (_, name, _) = fe::parse_bind(&msg[5..]).ok()?;
    if name.is_empty()
        || s.skip_until_sync.get()
        || s.stale_plans.borrow().iter().any(|n| n == name)
    {
        return None;
    }
    if !s
        .parsed
        .borrow()
        .iter()
        .any(|p| &p.name[..] == name && p.shape.is_some())
    {
        return None;
    }
    let stmt = s.statements.borrow().get(name).cloned()?;
    if stmt.sql.is_some() || b.st.borrow().prepared.contains(&stmt.content) {
        return None;
    }
    ensure(b, &stmt, core.live().max_prepared_statements, true);
    let done: Done = Rc::new(Slot::default());
    let mut m = Vec::with_capacity(stmt.content.len() + 12);
    fe::write_target(&mut m, fe::DESCRIBE, b'S', &stmt.content);
    b.send(
        &m,
        Some(Entry::Shape {
            client_name: Rc::from(name),
            check: Some(done.clone()),
        }),
    );
    m.clear();
    shared::protocol::put_message(&mut m, fe::FLUSH, |_| {});
    b.send(&m, None);
    Some(done)
}

fn statement_for(s: &Rc<Session>, b: &Rc<Backend>, name: &[u8], limit: usize) -> Option<Rc<[u8]>> {
    if name.is_empty() {
        let unnamed = s.unnamed.borrow().clone();
        if let Some(u) = unnamed {
            let here =
                b.st.borrow()
                    .unnamed
                    .as_ref()
                    .is_some_and(|x| Rc::ptr_eq(x, &u));
            if !here {
                b.st.borrow_mut().unnamed = Some(u.clone());
                b.send(
                    &u.parse.clone(),
                    Some(Entry::Parse {
                        stmt: u,
                        injected: true,
                        client_name: None,
                    }),
                );
            }
        }
        return None;
    }
    let stmt = s.statements.borrow().get(name).cloned()?;
    ensure(b, &stmt, limit, true);
    Some(stmt.content.clone())
}

/// An `ErrorResponse` of severity FATAL or PANIC (the backend ends after it).
fn is_fatal(msg: &[u8]) -> bool {
    be::error_fields(msg.get(5..).unwrap_or_default()).is_ok_and(|fields| {
        fields
            .iter()
            .any(|&(f, v)| (f == b'V' || f == b'S') && (v == b"FATAL" || v == b"PANIC"))
    })
}

/// Statement names whose preparation time a session keeps (`Session::parsed`).
const PARSED_KEPT: usize = 256;

/// A statement name the client prepared: when (`statements::clock`), and its result shape then.
struct Parsed {
    name: Box<[u8]>,
    at: u64,
    shape: Option<Box<[u8]>>,
}

fn fatal(code: &str, msg: &str) -> Vec<u8> {
    let mut e = Vec::new();
    be::error_response(&mut e, Severity::Fatal, code, msg);
    e
}

/// Postgres bounds a session's prepared statements by its backend's memory only; here they
/// live in the pooler, shared by every session, so each session has a bound
/// (`max_session_statement_bytes`), and all sessions of a user together another
/// (`max_user_statement_bytes`). `54000`: program_limit_exceeded.
const STATEMENT_LIMIT_CODE: &str = "54000";

/// The bounds in force.
fn statement_bounds(core: &Core) -> Bounds {
    let live = core.live();
    Bounds {
        session: live.max_session_statement_bytes,
        user: live.max_user_statement_bytes,
    }
}

/// The bound `more` bytes of new statements in `s` would pass, if any.
fn past_statement_limit(core: &Core, s: &Session, more: usize) -> Option<Past> {
    s.statements.past_adding(more, 0, statement_bounds(core))
}

fn statement_limit_message(past: Past) -> String {
    match past {
        Past::Session(limit) => format!(
            "too many prepared statements in this session: they would hold more than {limit} \
             bytes (the pooler's max_session_statement_bytes); DEALLOCATE some"
        ),
        // Not the user's name: it goes into a `DO` block's text (`raise_query`).
        Past::User(limit) => format!(
            "too many prepared statements in this user's sessions: together they would hold \
             more than {limit} bytes (the pooler's max_user_statement_bytes); DEALLOCATE some"
        ),
    }
}

/// The error a `Parse` past a bound gets.
fn statement_limit(past: Past) -> Vec<u8> {
    let mut e = Vec::new();
    be::error_response(
        &mut e,
        Severity::Error,
        STATEMENT_LIMIT_CODE,
        &statement_limit_message(past),
    );
    e
}

/// A `Query` that makes the backend raise `code` with `message` (which has no `$`-quote of
/// ours in it): the error happens where the client's statement would have run.
fn raise_query(code: &str, message: &str) -> Vec<u8> {
    let message = message.replace('\'', "''");
    let sql = format!(
        "DO $tidepool$BEGIN RAISE EXCEPTION USING ERRCODE = '{code}', MESSAGE = '{message}'; END$tidepool$"
    );
    let mut m = Vec::new();
    fe::query(&mut m, &sql);
    m
}

fn protocol_violation(msg: &str) -> Vec<u8> {
    let mut e = Vec::new();
    be::error_response(&mut e, Severity::Fatal, "08P01", msg);
    e
}

/// The client left: give the backend back clean, or close it.
fn finish(core: &Rc<Core>, s: &Rc<Session>) {
    s.gone.set(true);
    core.sessions_by_key.borrow_mut().remove(&s.cancel_key);
    s.pool.listener.forget(s);
    let Some(b) = s.backend.borrow_mut().take() else {
        return;
    };
    let mut st = b.st.borrow_mut();
    st.owner = None;
    if st.broken {
        return;
    }
    if !st.queue.is_empty() || s.open_batch.get() {
        // Mid-query or mid-COPY: cancel what runs and close the connection (Postgres rolls
        // back). The budget unit comes back only when Postgres has really ended this backend
        // (the relay sees the socket close), so abandoned queries never push a pool past its
        // budget.
        drop(st);
        crate::cancel::backend(core, &b);
        b.close();
        return;
    }
    if s.pinned.get() {
        // The session made state that lives in its backend (temp tables, session
        // authorization, loaded C code, advisory locks, ...). DISCARD ALL removes most of it,
        // not all: the backend keeps its `pg_temp_N` schema (so a later `PREPARE TRANSACTION`
        // after `SET search_path TO pg_temp` would succeed where a fresh backend refuses), and
        // loaded libraries keep their static state. A new login later is cheaper than another
        // session seeing any of it; Postgres rolls back what is open.
        drop(st);
        pool::close_for(&core.pools, &b, None);
        return;
    }
    let open = st.status != b'I';
    drop(st);
    if !open {
        pool::release(&core.pools, b);
        return;
    }
    let mut q = Vec::new();
    fe::query(&mut q, "ROLLBACK");
    b.send(&q, Some(Entry::Internal(Internal::Cleanup)));
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An idle session's task holds only its request loop: login state and a batch's state are
    /// boxed while they exist (perf/idle_memory.sh measures what a session costs in all).
    #[test]
    fn an_idle_sessions_task_is_small() {
        let cfg = crate::config::for_tests(&[]).unwrap();
        let budgets = crate::budget::Budgets::new(cfg.limits(), 2);
        let core = Core::new(Rc::new(cfg), 0, budgets);
        let key = crate::budget::PoolKey {
            user: "u".into(),
            database: "d".into(),
        };
        let global = std::sync::Arc::new(crate::budget::PoolBudget::new(2));
        let pool = Rc::new(Pool::new(Rc::new(key), global, core.listener("d"), 0));
        let s = Session::new(
            1,
            Rc::new(OutQueue::new(1, 1)),
            pool,
            Credential::None,
            (1, 1),
            Rc::new(Settings::default()),
        );
        let task = run(core.clone(), s.clone());
        let (task, session) = (std::mem::size_of_val(&task), std::mem::size_of::<Session>());
        eprintln!("session task {task} B, Session {session} B");
        assert!(
            task <= 256,
            "the session task grew to {task} bytes: box what it awaits"
        );
    }
}
