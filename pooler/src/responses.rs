//! A backend's response stream, as a state machine: bytes in, effects out.
//!
//! Every frontend message the pooler writes to a backend pushes an [`Entry`] saying what its
//! responses are and what to do with them: forward them to the owning session, drop them (our own
//! injected `Parse` or settings query), or emit a response ourselves at that point of the stream
//! (a `ParseComplete` for a statement the backend already has). [`on_message`] takes one backend
//! message and walks the queue, so the client sees exactly the stream Postgres would have sent it.
//!
//! It knows the session only as an [`Owner`]: what it forwards, what it tells the session, and
//! what it asks. The relay task around it (`backend.rs`) reads the socket and acts on the
//! [`After`] it returns; the tests below drive it with bytes and a recording owner.

use crate::statements::{Prepared, SqlQuery, Stmt, Undo};
use shared::io::{Notify, OutQueue, Slot};
use shared::protocol::backend as be;
use shared::protocol::{frontend, put_message};
use shared::settings::Settings;
use std::collections::VecDeque;
use std::rc::Rc;

/// What the response stream needs from the session that holds the backend. The session
/// implements it (`session.rs`); the state machine never sees the session's fields.
pub trait Owner {
    /// Appends a response for the client (sent at the next [`Owner::flush`]).
    fn forward(&self, msg: &[u8]);
    /// Sends what was forwarded so far.
    fn flush(&self);
    /// The session has more in flight towards its client than its window: the relay reads no
    /// more of this backend until the returned notify fires.
    fn window_full(&self) -> Option<&Notify>;
    /// Moves the notifications held during the transaction out ahead of a `ReadyForQuery 'I'`.
    fn notes_before_idle(&self);
    /// Called where a `ReadyForQuery 'I'` would go out with nothing more to come: `true` if the
    /// session holds it (`Some`) until its listener caught up; with `None` (it already went),
    /// holds the session's next request instead (listen.rs).
    fn hold_ready(self: Rc<Self>, rfq: Option<&[u8]>) -> bool;
    /// A reported setting changed under a client's statement the gateway did not flag: read
    /// the settings back when the transaction ends.
    fn settings_changed(&self);
    /// The backend delivered a notification its own transaction sent.
    fn own_notification(&self);
    /// Postgres's warning for a negative pid from `pg_signal_backend()`: a signal the gateway
    /// asked the server to check was allowed (`down::SIGNAL`, in its place among the responses).
    fn signal_marker(&self, msg: &[u8]);
    /// The settings read-back query, and whether it reads the channels only.
    fn read_back_sql(&self) -> (String, bool);
    /// A row of the read-back that is not a setting (a channel, a name found in a function
    /// body): `true` if the session took it.
    fn read_back_row(&self, name: &str, value: &str) -> bool;
    /// The read-back ended: the listener follows changed channels. `Some(listening)` if they
    /// were read (and whether the backend listens on any now).
    fn channels_read_back(self: Rc<Self>) -> Option<bool>;
    /// The read-back's settings (what was set in the session): the session keeps them, and
    /// returns the settings its backend must have.
    fn settings_read_back(&self, snapshot: &Rc<Settings>) -> Rc<Settings>;
    /// A `Parse` (or `PREPARE`) that did not happen: the client's name for it is gone.
    fn forget_statement(&self, client_name: Option<&[u8]>, stmt: &Rc<Stmt>);
    /// A `DEALLOCATE` that did not happen: the client's name is back.
    fn restore_statement(&self, client_name: Vec<u8>, stmt: Rc<Stmt>);
    /// Postgres refused the plan of the client's statement (its table changed): it must be
    /// parsed again before its next use.
    /// `made`: when the backend made the copy that went stale (`statements::clock`).
    fn statement_stale(&self, client_name: &[u8], made: Option<u64>);
    /// The result shape (`statements::result_shape`) of a client's statement: as prepared, or
    /// (`check`) as a new copy of it has it.
    fn statement_shape(&self, client_name: &[u8], shape: Option<Box<[u8]>>, check: bool);
    /// The session task is in the middle of writing a request.
    fn writing(&self) -> bool;
    /// Extended-protocol messages were written since the last `Sync`.
    fn open_batch(&self) -> bool;
    /// Its backend stays with it when a transaction ends (pinned, or leased).
    fn keeps_backend(&self) -> bool;
    /// A settings read-back is due when the transaction ends.
    fn snapshot_pending(&self) -> bool;
    /// `DEALLOCATE ALL` ran: the session forgot its statements (`true`), so must the backend.
    fn take_dealloc(&self) -> bool;
    /// `DISCARD ALL` ran: the session forgot its statements and state (`true`).
    fn take_discard(&self) -> bool;
    /// The backend leaves the session (it goes back to its pool).
    fn detach(&self);
    /// The backend died while the session held it.
    fn backend_lost(&self);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// A `Parse` passed through as it is (malformed: Postgres will refuse it).
    Parse,
    Bind,
    Describe,
    Execute,
    Close,
    Sync,
    Query,
    FunctionCall,
}

pub type Done = Rc<Slot<Result<(), Vec<u8>>>>;

pub enum Internal {
    /// Bring the backend to the owner's settings. `forward`: pass `ParameterStatus` on to the
    /// client; `then_rfq`: send the `ReadyForQuery` held back for this; `done`: tell a waiter;
    /// `to`: the backend's settings once it is done.
    Sync {
        forward: bool,
        then_rfq: bool,
        done: Option<Done>,
        to: Rc<Settings>,
    },
    /// Close statements found stale (their table changed), then Sync.
    Forget,
    /// Read the session's settings back; `held_rfq`: the client's `ReadyForQuery` waits for it.
    /// `channels_only`: only `pg_listening_channels()` was read (listen.rs).
    Snapshot { held_rfq: bool, channels_only: bool },
    /// Roll back after the owner left, then return the backend to its pool.
    Cleanup,
    /// `LISTEN` on the owner's channels, or `UNLISTEN *` before the pool (listen.rs).
    Listen,
    /// `DISCARD SEQUENCES` ahead of a session's first `currval`/`lastval`: the sequence state
    /// another session left here is not this session's.
    DiscardSequences,
    /// `PREPARE`/`DEALLOCATE` of a real-name copy (`sql_names::real_names`): answer dropped;
    /// an error (an aborted transaction, a name the backend already has) leaves it as it was.
    RealName,
    /// Our own statement made (`made`) or deallocated before a client's `Query` that needs it;
    /// if it fails, the backend's set is put right and the client's statement reports.
    Inject { content: Rc<[u8]>, made: bool },
    /// Reads the OID of `pg_catalog.pg_prepared_statements` (`State::view_oid`).
    ViewOid,
}

/// The statement name a `Bind` of a stale plan names (session.rs): no backend has it (ours
/// are `tp_` and a hash), so Postgres refuses it with 26000, shown to the client as 0A000.
pub const STALE_PLAN: &[u8] = b"tp_stale_plan";

pub enum Entry {
    Client(Kind),
    /// Our own `Close` of an evicted statement: its `CloseComplete` is dropped.
    Evicted,
    /// A client's `Bind`/`Describe` of a statement we renamed: (backend name, client name), to
    /// put the client's name back into errors.
    Renamed(Kind, Rc<[u8]>, Rc<[u8]>),
    Parse {
        stmt: Rc<Stmt>,
        /// The client's own Parse (its ParseComplete is forwarded) or one we injected.
        injected: bool,
        /// Statement name as the client knows it (None: the unnamed statement).
        client_name: Option<Vec<u8>>,
    },
    /// A response we produce at this point of the stream.
    Synth(Vec<u8>),
    /// An error we raise at this point; Postgres would then skip to `Sync`.
    SynthError(Vec<u8>),
    Internal(Internal),
    /// A client's `Query` with statement names replaced.
    Sql(Box<SqlQuery>),
    /// Our `Describe` of a client's statement (`session.rs`): its answer is the result shape
    /// as the client prepared it, or with `check`, as a new copy on this backend has it (told
    /// to the owner, then to the waiter). Not forwarded.
    Shape {
        client_name: Rc<[u8]>,
        check: Option<Done>,
    },
}

pub struct State {
    /// The backend's id (for logs) and its process id (to tell its own notifications).
    pub id: u64,
    pub pid: i32,
    pub queue: VecDeque<Entry>,
    pub owner: Option<Rc<dyn Owner>>,
    /// The settings that differ from what the backend had before any role or database default
    /// (its login defaults, then what we or its sessions set), as `set_config` would set them.
    pub settings: Rc<Settings>,
    /// What it logged in with from `ALTER ROLE|DATABASE … SET` (see [`login_settings_sql`]):
    /// `RESET` returns to these, so a session without such a default gets the server's value
    /// (`server`) set explicitly instead.
    login: Rc<Settings>,
    /// The server's value (no role or database default) of each of `login`'s settings, where
    /// known (see `Admin::server_defaults`).
    server: Settings,
    /// An `ALTER ROLE|DATABASE` completed in the open transaction: role defaults change again
    /// for new sessions when it ends.
    roles_changed: bool,
    /// Statements this backend has, with when each was last used (for eviction).
    pub prepared: Prepared,
    pub unnamed: Option<Rc<Stmt>>,
    pub status: u8,
    pub reported: Vec<(String, String)>,
    /// After an error in an extended-protocol batch: Postgres ignores messages until `Sync`.
    pub skipping: bool,
    pub broken: bool,
    /// Statements whose plan Postgres refused (0A000 after the table changed): closed on this
    /// backend after the client's next Sync, so the next Parse really parses.
    stale: Vec<Rc<[u8]>>,
    snapshot: Settings,
    internal_error: Option<Vec<u8>>,
    /// It may listen on channels: `UNLISTEN *` before it goes back to its pool.
    pub listening: bool,
    /// The OID of `pg_catalog.pg_prepared_statements`, once read (see `fix_origins`).
    pub view_oid: Option<u32>,
    /// Copies of the owner's SQL-prepared statements under the client's own names (name, the
    /// statement's content name), for code Postgres runs itself (`sql_names::real_names`);
    /// deallocated before the backend goes back to its pool.
    pub real_names: Vec<(Vec<u8>, Rc<[u8]>)>,
}

impl State {
    /// A backend just logged in: idle, owned by nobody, with the settings its login gave it
    /// (`login`), the server's values of those (`server`) and what it reported (`reported`).
    pub fn new(
        id: u64,
        pid: i32,
        login: Rc<Settings>,
        server: Settings,
        reported: Vec<(String, String)>,
    ) -> State {
        State {
            id,
            pid,
            queue: VecDeque::new(),
            owner: None,
            settings: login.clone(),
            login,
            server,
            roles_changed: false,
            prepared: Prepared::default(),
            unnamed: None,
            status: b'I',
            reported,
            skipping: false,
            broken: false,
            stale: Vec::new(),
            snapshot: Settings::default(),
            internal_error: None,
            listening: false,
            view_oid: None,
            real_names: Vec::new(),
        }
    }
}

/// The SQL that takes a backend to a session's settings `to` (`None`: it is there), and the
/// backend's settings afterwards. A setting the backend got at login from a role or database
/// default that `to` does not have is set to the server's value: `RESET` would give the login's.
pub fn plan(st: &State, to: &Rc<Settings>) -> (Option<String>, Rc<Settings>) {
    // Allocates only for a backend whose login defaults the session does not share (role
    // defaults changed between the two logins); otherwise `to` itself, and the pointer test
    // below answers most calls.
    let uncovered = st.login.iter().any(|(k, _)| to.get(k).is_none());
    let to = if uncovered {
        let mut t = (**to).clone();
        for (k, _) in st.login.iter() {
            if to.get(k).is_none() {
                if let Some(v) = st.server.get(k) {
                    t.set(k, v);
                }
            }
        }
        Rc::new(t)
    } else {
        to.clone()
    };
    if Rc::ptr_eq(&st.settings, &to) {
        return (None, to);
    }
    (Settings::diff_sql(&st.settings, &to), to)
}

pub fn drain_synth(st: &mut State) {
    loop {
        match st.queue.front() {
            Some(Entry::Synth(_)) => {
                if let Some(Entry::Synth(m)) = st.queue.pop_front() {
                    if !st.skipping {
                        forward(st, &m);
                    }
                }
            }
            Some(Entry::SynthError(_)) => {
                if let Some(Entry::SynthError(m)) = st.queue.pop_front() {
                    if !st.skipping {
                        forward(st, &m);
                        skip_to_sync(st);
                    }
                }
            }
            _ => return,
        }
    }
}

/// Postgres's error for a `Bind` of a statement whose plan changed result type, with the
/// fields Postgres 15 sends (drivers read them: asyncpg knows a stale plan by its routine,
/// `RevalidateCachedQuery`, and then prepares the statement again); in a failed transaction,
/// its 25P02 instead.
fn stale_plan_error(aborted: bool) -> Vec<u8> {
    // code, message, file, line, routine
    let fields: [&str; 5] = if aborted {
        [
            "25P02",
            "current transaction is aborted, commands ignored until end of transaction block",
            "postgres.c",
            "1691",
            "exec_bind_message",
        ]
    } else {
        [
            "0A000",
            "cached plan must not change result type",
            "plancache.c",
            "722",
            "RevalidateCachedQuery",
        ]
    };
    let [code, text, file, line, routine] = fields.map(str::as_bytes);
    let mut e = Vec::new();
    put_message(&mut e, be::ERROR_RESPONSE, |b| {
        for (field, value) in [
            (b'S', &b"ERROR"[..]),
            (b'V', b"ERROR"),
            (b'C', code),
            (b'M', text),
            (b'F', file),
            (b'L', line),
            (b'R', routine),
        ] {
            b.push(field);
            b.extend_from_slice(value);
            b.push(0);
        }
        b.push(0);
    });
    e
}

/// Says goodbye to Postgres: nothing more is written.
pub fn close(out: &OutQueue, st: &mut State) {
    if !st.broken {
        st.broken = true;
        let mut t = Vec::new();
        put_message(&mut t, frontend::TERMINATE, |_| {});
        out.push(&t);
        out.close();
    }
}

/// Forwards the owner's `ReadyForQuery`. Before an `'I'`, the notifications held during the
/// transaction go first, as Postgres sends them; `quiet` (nothing more to come for this owner):
/// it may be held until the listener caught up (listen.rs).
fn forward_rfq(st: &State, rfq: &[u8], quiet: bool) {
    let Some(o) = &st.owner else {
        return;
    };
    if rfq.get(5) == Some(&b'I') {
        if quiet && o.clone().hold_ready(Some(rfq)) {
            return;
        }
        o.notes_before_idle();
    }
    o.forward(rfq);
}

#[inline]
fn forward(st: &State, msg: &[u8]) {
    if let Some(o) = &st.owner {
        // A signalling call the server refused for the gateway (signal_denied.rs): one byte compared
        // per message; an error's fields are read (errors are not the hot path).
        if msg.first() == Some(&be::ERROR_RESPONSE) {
            if let Some(e) = crate::signal_denied::denied_signal(msg) {
                o.forward(&e);
                return;
            }
        }
        // A signal the server allowed (gateway/src/signals.rs): notices are not the hot path.
        if msg.first() == Some(&be::NOTICE_RESPONSE) && be::signal_marker(msg).is_some() {
            o.signal_marker(msg);
            return;
        }
        o.forward(msg);
    }
}

/// Postgres skips to the next `Sync` after an error in an extended-protocol batch: so do the
/// responses we expect (and the ones we would have made up).
fn skip_to_sync(st: &mut State) {
    st.skipping = true;
    while let Some(front) = st.queue.front() {
        if matches!(front, Entry::Client(Kind::Sync)) {
            break;
        }
        match st.queue.pop_front() {
            Some(Entry::Parse {
                stmt, client_name, ..
            }) => forget_failed_parse(st, &stmt, client_name.as_deref()),
            // Its waiter goes on: the client's own messages meet the error.
            Some(Entry::Shape { check: Some(d), .. }) => d.put(Ok(())),
            _ => {}
        }
    }
}

/// A Parse that did not happen: neither the backend nor the session has that statement.
fn forget_failed_parse(st: &mut State, stmt: &Rc<Stmt>, client_name: Option<&[u8]>) {
    st.prepared.remove(&stmt.content);
    if st.unnamed.as_ref().is_some_and(|u| Rc::ptr_eq(u, stmt)) {
        st.unnamed = None;
    }
    if let Some(s) = &st.owner {
        s.forget_statement(client_name, stmt);
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum After {
    Nothing,
    /// The owner is done with the backend: detach and return it to the pool.
    Release,
    /// A cleanup finished: the backend (no owner) goes back to the pool.
    ReturnOrphan,
}

/// Handles one backend message according to the front of the queue.
pub fn on_message(out: &OutQueue, st: &mut State, msg: &[u8]) -> After {
    let tag = msg[0];
    let body = &msg[5..];
    drain_synth(st);
    // Asynchronous messages can come at any time.
    match tag {
        be::PARAMETER_STATUS => {
            if let Ok((k, v)) = be::parse_parameter_status(body) {
                let (k, v) = (String::from_utf8_lossy(k), String::from_utf8_lossy(v));
                match st.reported.iter_mut().find(|(n, _)| *n == k) {
                    Some(e) => e.1 = v.into_owned(),
                    None => st.reported.push((k.into_owned(), v.into_owned())),
                }
            }
            let pass = match st.queue.front() {
                Some(Entry::Internal(Internal::Sync { forward, .. })) => *forward,
                Some(Entry::Internal(_)) => false,
                _ => true,
            };
            if let (Some(o), Some(front)) = (&st.owner, st.queue.front()) {
                if !matches!(front, Entry::Internal(_)) {
                    // A reported setting changed under a client's statement the gateway did not
                    // flag (set_config in a user function): read the settings back when the
                    // transaction ends, so they follow the session and stay off other sessions.
                    o.settings_changed();
                }
            }
            if pass {
                forward(st, msg);
            }
            return After::Nothing;
        }
        be::NOTICE_RESPONSE => {
            if st.queue.is_empty() {
                // A crash or an immediate shutdown: Postgres 15 warns every backend's client
                // (57P02, 57P01) as it ends them.
                crate::server_end::idle_backend_said(msg);
            }
            if !matches!(st.queue.front(), Some(Entry::Internal(_))) {
                forward(st, msg);
            }
            return After::Nothing;
        }
        be::NOTIFICATION_RESPONSE => {
            // Sessions hear notifications from the pooler's listener (listen.rs); a backend
            // listens only to mirror its owner's channels. One its owner's own transaction sent
            // (a trigger's pg_notify: nothing in the statement's text says so) must reach the
            // client before this transaction's ReadyForQuery, as directly: hold that for the
            // listener, as for a NOTIFY the gateway flagged.
            let mut pos = 0;
            if shared::protocol::read_i32(body, &mut pos).is_ok_and(|pid| pid == st.pid) {
                if let Some(o) = &st.owner {
                    o.own_notification();
                }
            }
            return After::Nothing;
        }
        _ => {}
    }
    let Some(front) = st.queue.front_mut() else {
        // Nothing expected: an idle backend being shut down (FATAL) or a protocol surprise.
        if tag == be::ERROR_RESPONSE {
            tracing::info!(backend = st.id, "idle backend got an error; closing it");
            // Postgres shutting down ends the sessions that hold no backend too.
            crate::server_end::idle_backend_said(msg);
            // A session holds it between requests (a transaction open, or pinned): its client
            // hears the FATAL, as it would directly, before its connection ends.
            if let Some(o) = &st.owner {
                o.forward(msg);
                o.flush();
            }
        }
        close(out, st);
        return After::Nothing;
    };
    match front {
        Entry::Internal(internal) => {
            match tag {
                be::ERROR_RESPONSE => st.internal_error = Some(msg.to_vec()),
                be::DATA_ROW if matches!(internal, Internal::ViewOid) => {
                    let mut pos = 2;
                    let oid = shared::protocol::read_i32(body, &mut pos)
                        .ok()
                        .and_then(|len| body.get(pos..pos + len.max(0) as usize))
                        .and_then(|v| std::str::from_utf8(v).ok()?.parse::<u32>().ok());
                    st.view_oid = oid;
                }
                be::DATA_ROW => {
                    if matches!(internal, Internal::Snapshot { .. }) {
                        if let Some((k, v)) = two_text_columns(body) {
                            let taken = st.owner.as_ref().is_some_and(|o| o.read_back_row(&k, &v));
                            if !taken {
                                st.snapshot.set(&k, &v);
                            }
                        }
                    }
                }
                be::READY_FOR_QUERY => {
                    st.status = body.first().copied().unwrap_or(b'I');
                    let Some(Entry::Internal(internal)) = st.queue.pop_front() else {
                        return After::Nothing;
                    };
                    return internal_done(out, st, internal);
                }
                _ => {}
            }
            After::Nothing
        }
        Entry::Parse { injected, .. } => {
            let injected = *injected;
            match tag {
                be::PARSE_COMPLETE => {
                    if let Some(Entry::Parse { stmt, .. }) = st.queue.pop_front() {
                        stmt.validated.set(true);
                    }
                    if !injected {
                        forward(st, msg);
                    }
                }
                be::ERROR_RESPONSE => {
                    if let Some(Entry::Parse {
                        stmt, client_name, ..
                    }) = st.queue.pop_front()
                    {
                        forget_failed_parse(st, &stmt, client_name.as_deref());
                    }
                    forward(st, msg);
                    skip_to_sync(st);
                }
                _ => forward(st, msg),
            }
            drain_synth(st);
            After::Nothing
        }
        Entry::Evicted => {
            st.queue.pop_front();
            if tag == be::ERROR_RESPONSE {
                forward(st, msg);
                skip_to_sync(st);
            }
            drain_synth(st);
            After::Nothing
        }
        Entry::Renamed(_, from, _) if tag == be::ERROR_RESPONSE && **from == *STALE_PLAN => {
            // A Bind of a statement whose plan changed result type (session.rs): Postgres's
            // error for it. Postgres looks the name up before it checks for a failed
            // transaction; for a statement it has, it says 25P02 there (the transaction's state
            // is the last ReadyForQuery's: after an error in this batch it skips our Bind).
            let e = if be::error_sqlstate(body) == Some(&b"26000"[..]) {
                stale_plan_error(st.status == b'E')
            } else {
                msg.to_vec()
            };
            st.queue.pop_front();
            forward(st, &e);
            skip_to_sync(st);
            drain_synth(st);
            After::Nothing
        }
        Entry::Renamed(_, from, to) if tag == be::ERROR_RESPONSE => {
            if be::error_sqlstate(body) == Some(&b"0A000"[..]) {
                // "cached plan must not change result type": this backend's statement is stale.
                let stale = from.clone();
                let made = st.prepared.made(&stale);
                st.prepared.remove(&stale);
                if let Some(o) = &st.owner {
                    o.statement_stale(&to[..], made);
                }
                if !st.stale.contains(&stale) {
                    st.stale.push(stale);
                }
            }
            let (from, to) = match st.queue.front() {
                Some(Entry::Renamed(_, f, t)) => (f.clone(), t.clone()),
                _ => return After::Nothing,
            };
            let mut renamed = Vec::with_capacity(msg.len());
            be::rename_in_error(&mut renamed, tag, body, &from, &to);
            st.queue.pop_front();
            forward(st, &renamed);
            skip_to_sync(st);
            drain_synth(st);
            After::Nothing
        }
        Entry::Sql(q) => {
            match tag {
                be::COMMAND_COMPLETE => {
                    q.completed += 1;
                    forward(st, msg);
                }
                be::ROW_DESCRIPTION if q.view => {
                    match st
                        .view_oid
                        .and_then(|oid| crate::statements::fix_origins(msg, oid))
                    {
                        Some(m) => forward(st, &m),
                        None => forward(st, msg),
                    }
                }
                be::ERROR_RESPONSE => {
                    let m = q.client_error(tag, body);
                    forward(st, &m);
                }
                be::READY_FOR_QUERY => {
                    if let Some(Entry::Sql(q)) = st.queue.pop_front() {
                        undo_incomplete(*q, st);
                    }
                    st.status = body.first().copied().unwrap_or(b'I');
                    st.skipping = false;
                    return after_ready(out, st, msg);
                }
                _ => forward(st, msg),
            }
            After::Nothing
        }
        Entry::Client(kind) | Entry::Renamed(kind, ..) => {
            let kind = *kind;
            if tag == be::COMMAND_COMPLETE
                && (body.starts_with(b"ALTER ROLE") || body.starts_with(b"ALTER DATABASE"))
            {
                // Role or database defaults may have changed: sessions opened from now on read
                // them again (and again when the transaction ends, as it may commit then).
                crate::admin::role_settings_changed();
                st.roles_changed = true;
            }
            let done = match (kind, tag) {
                (Kind::Sync | Kind::Query | Kind::FunctionCall, be::READY_FOR_QUERY) => {
                    st.queue.pop_front();
                    st.status = body.first().copied().unwrap_or(b'I');
                    if st.roles_changed && st.status == b'I' {
                        st.roles_changed = false;
                        crate::admin::role_settings_changed();
                    }
                    st.skipping = false;
                    return after_ready(out, st, msg);
                }
                (Kind::Sync | Kind::Query | Kind::FunctionCall, _) => false,
                (_, be::ERROR_RESPONSE) => {
                    st.queue.pop_front();
                    forward(st, msg);
                    skip_to_sync(st);
                    drain_synth(st);
                    return After::Nothing;
                }
                (Kind::Bind, be::BIND_COMPLETE)
                | (Kind::Close, be::CLOSE_COMPLETE)
                | (Kind::Parse, be::PARSE_COMPLETE) => true,
                (Kind::Describe, be::ROW_DESCRIPTION | be::NO_DATA) => true,
                (
                    Kind::Execute,
                    be::COMMAND_COMPLETE | be::EMPTY_QUERY_RESPONSE | be::PORTAL_SUSPENDED,
                ) => true,
                _ => false,
            };
            if done {
                if let (Some(Entry::Renamed(Kind::Describe, _, to)), Some(o)) =
                    (st.queue.pop_front(), &st.owner)
                {
                    // The client's own Describe of its statement: the shape it prepared it
                    // with, if ours did not learn it (a Parse answered by an existing copy).
                    o.statement_shape(&to, crate::statements::result_shape(msg), false);
                }
            }
            forward(st, msg);
            if done {
                drain_synth(st);
            }
            After::Nothing
        }
        Entry::Synth(_) | Entry::SynthError(_) => After::Nothing,
        Entry::Shape { .. } => {
            match tag {
                be::PARAMETER_DESCRIPTION => {}
                be::ROW_DESCRIPTION | be::NO_DATA => {
                    if let Some(Entry::Shape { client_name, check }) = st.queue.pop_front() {
                        if let Some(o) = &st.owner {
                            let shape = crate::statements::result_shape(msg);
                            o.statement_shape(&client_name, shape, check.is_some());
                        }
                        if let Some(d) = check {
                            d.put(Ok(()));
                        }
                    }
                    drain_synth(st);
                }
                be::ERROR_RESPONSE => {
                    if let Some(Entry::Shape { check: Some(d), .. }) = st.queue.pop_front() {
                        d.put(Ok(()));
                    }
                    forward(st, msg);
                    skip_to_sync(st);
                    drain_synth(st);
                }
                _ => forward(st, msg),
            }
            After::Nothing
        }
    }
}

fn two_text_columns(body: &[u8]) -> Option<(String, String)> {
    let mut pos = 0;
    let n = shared::protocol::read_i16(body, &mut pos).ok()?;
    if n != 2 {
        return None;
    }
    let mut col = || -> Option<String> {
        let len = shared::protocol::read_i32(body, &mut pos).ok()?;
        if len < 0 {
            return None;
        }
        let v = body.get(pos..pos + len as usize)?;
        pos += len as usize;
        Some(String::from_utf8_lossy(v).into_owned())
    };
    Some((col()?, col()?))
}

/// The owner's `ReadyForQuery` arrived: forward it, or first read back settings it changed.
fn after_ready(out: &OutQueue, st: &mut State, rfq: &[u8]) -> After {
    let Some(s) = st.owner.clone() else {
        return After::Nothing;
    };
    if !st.stale.is_empty() {
        forward_rfq(st, rfq, false);
        let mut m = Vec::new();
        for name in std::mem::take(&mut st.stale) {
            frontend::write_target(&mut m, frontend::CLOSE, b'S', &name);
        }
        put_message(&mut m, frontend::SYNC, |_| {});
        out.push(&m);
        st.queue.push_back(Entry::Internal(Internal::Forget));
        return After::Nothing;
    }
    if !st.queue.is_empty() || s.writing() {
        forward_rfq(st, rfq, false);
        return After::Nothing;
    }
    if s.take_dealloc() {
        st.prepared.clear();
        st.unnamed = None;
    }
    let quiet = !s.open_batch() && st.status == b'I';
    if quiet {
        // DISCARD ALL: prepared statements, temp tables, locks, LISTENs are gone.
        let discarded = s.take_discard();
        if discarded {
            st.prepared.clear();
            st.unnamed = None;
        }
        if discarded || s.snapshot_pending() {
            // Hold the ReadyForQuery back until the settings are known, so the client's next
            // request cannot run before a RESET ALL's baseline is restored.
            start_snapshot(out, st, true);
            return After::Nothing;
        }
    }
    forward_rfq(st, rfq, quiet);
    if quiet && !s.keeps_backend() {
        After::Release
    } else {
        After::Nothing
    }
}

/// Reads the owner's settings back from the backend after a statement that may have changed them.
pub fn start_snapshot(out: &OutQueue, st: &mut State, held_rfq: bool) {
    let Some(o) = &st.owner else {
        return;
    };
    let (sql, channels_only) = o.read_back_sql();
    let mut q = Vec::new();
    frontend::query(&mut q, &sql);
    st.snapshot = Settings::default();
    out.push(&q);
    st.queue.push_back(Entry::Internal(Internal::Snapshot {
        held_rfq,
        channels_only,
    }));
}

fn internal_done(out: &OutQueue, st: &mut State, internal: Internal) -> After {
    let error = st.internal_error.take();
    match internal {
        Internal::Snapshot {
            held_rfq,
            channels_only,
        } => {
            let Some(s) = st.owner.clone() else {
                return After::Nothing;
            };
            if let Some(e) = error {
                tracing::warn!(backend = st.id, "reading settings back failed");
                forward(st, &e);
                return release_held_rfq(st, held_rfq);
            }
            if let Some(listening) = s.clone().channels_read_back() {
                // What the backend listens on now is known: no UNLISTEN * needed if nothing.
                st.listening = listening;
            }
            if channels_only {
                return release_held_rfq(st, held_rfq);
            }
            // The snapshot holds what was set in the session (source `session`); a setting it
            // reset is back at the backend's login value.
            let snap = Rc::new(std::mem::take(&mut st.snapshot));
            let target = s.settings_read_back(&snap);
            st.settings = if st.login.is_empty() {
                snap
            } else {
                Rc::new(snap.overlay_on(&st.login))
            };
            let (sql, to) = plan(st, &target);
            if let Some(sql) = sql {
                let mut q = Vec::new();
                frontend::query(&mut q, &sql);
                out.push(&q);
                st.queue.push_back(Entry::Internal(Internal::Sync {
                    forward: true,
                    then_rfq: held_rfq,
                    done: None,
                    to,
                }));
                return After::Nothing;
            }
            st.settings = to;
            release_held_rfq(st, held_rfq)
        }
        Internal::Sync {
            then_rfq, done, to, ..
        } => {
            match error {
                Some(e) => match done {
                    Some(d) => d.put(Err(e)),
                    None => forward(st, &e),
                },
                None => {
                    st.settings = to;
                    if let Some(d) = done {
                        d.put(Ok(()));
                    }
                }
            }
            release_held_rfq(st, then_rfq)
        }
        Internal::Forget => release_held_rfq(st, false),
        Internal::Inject { content, made } => {
            if error.is_some() {
                if made {
                    st.prepared.remove(&content);
                } else {
                    st.prepared.insert(content);
                }
            }
            After::Nothing
        }
        Internal::ViewOid => After::Nothing,
        Internal::Listen => {
            if error.is_some() {
                tracing::warn!(backend = st.id, "LISTEN/UNLISTEN on a backend failed");
            }
            After::Nothing
        }
        Internal::RealName => {
            if error.is_some() {
                tracing::debug!(
                    backend = st.id,
                    "a real-name copy of a prepared statement failed"
                );
            }
            After::Nothing
        }
        Internal::DiscardSequences => {
            if error.is_some() {
                tracing::warn!(backend = st.id, "DISCARD SEQUENCES on a backend failed");
            }
            After::Nothing
        }
        Internal::Cleanup => {
            if error.is_some() {
                close(out, st);
            }
            After::ReturnOrphan
        }
    }
}

fn release_held_rfq(st: &mut State, held: bool) -> After {
    let Some(s) = st.owner.clone() else {
        return After::Nothing;
    };
    let quiet = st.queue.is_empty() && !s.writing() && !s.open_batch() && st.status == b'I';
    if held {
        let mut rfq = Vec::new();
        be::ready_for_query(&mut rfq, st.status);
        forward_rfq(st, &rfq, quiet);
    } else if quiet {
        s.clone().hold_ready(None);
    }
    if quiet && !s.keeps_backend() && !s.snapshot_pending() {
        After::Release
    } else {
        After::Nothing
    }
}

/// Puts back what statements that did not complete would have changed.
fn undo_incomplete(q: SqlQuery, st: &mut State) {
    let owner = st.owner.clone();
    for (i, undo) in q.undo {
        if i < q.completed {
            continue;
        }
        match undo {
            Undo::Unname(name, stmt) => {
                if let Some(o) = &owner {
                    o.forget_statement(Some(&name), &stmt);
                }
            }
            Undo::Rename(name, stmt) => {
                if let Some(o) = &owner {
                    o.restore_statement(name, stmt);
                }
            }
            Undo::Absent(content) => st.prepared.remove(&content),
            Undo::Present(content) => st.prepared.insert(content),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Bytes in, effects out: backend messages go in; what the owner is told, what is written
    //! to the backend and what the relay must do come out.
    use super::*;
    use shared::protocol::backend::{error_response, ready_for_query, Severity};
    use std::cell::{Cell, RefCell};

    /// An owner that records what it is told.
    #[derive(Default)]
    struct Recorder {
        client: RefCell<Vec<u8>>,
        events: RefCell<Vec<String>>,
        writing: Cell<bool>,
        keeps: Cell<bool>,
        snapshot_pending: Cell<bool>,
        discard: Cell<bool>,
        held: Cell<bool>,
    }

    impl Recorder {
        fn event(&self, e: impl Into<String>) {
            self.events.borrow_mut().push(e.into());
        }
        fn events(&self) -> Vec<String> {
            self.events.borrow().clone()
        }
    }

    impl Owner for Recorder {
        fn forward(&self, msg: &[u8]) {
            self.client.borrow_mut().extend_from_slice(msg);
        }
        fn flush(&self) {}
        fn window_full(&self) -> Option<&Notify> {
            None
        }
        fn notes_before_idle(&self) {
            self.event("notes");
        }
        fn hold_ready(self: Rc<Self>, rfq: Option<&[u8]>) -> bool {
            self.event(if rfq.is_some() {
                "hold rfq"
            } else {
                "hold next"
            });
            self.held.get()
        }
        fn settings_changed(&self) {
            self.event("settings changed");
        }
        fn own_notification(&self) {
            self.event("own notification");
        }
        fn signal_marker(&self, _msg: &[u8]) {
            self.event("signal marker");
        }
        fn read_back_sql(&self) -> (String, bool) {
            self.snapshot_pending.set(false);
            ("SELECT read_back".into(), false)
        }
        fn read_back_row(&self, name: &str, value: &str) -> bool {
            if name == "channel" {
                self.event(format!("channel {value}"));
                return true;
            }
            false
        }
        fn channels_read_back(self: Rc<Self>) -> Option<bool> {
            None
        }
        fn settings_read_back(&self, snapshot: &Rc<Settings>) -> Rc<Settings> {
            let mut names: Vec<String> = snapshot.iter().map(|(k, v)| format!("{k}={v}")).collect();
            names.sort();
            self.event(format!("settings {}", names.join(",")));
            snapshot.clone()
        }
        fn forget_statement(&self, client_name: Option<&[u8]>, _: &Rc<Stmt>) {
            let name = client_name.map(|n| String::from_utf8_lossy(n).into_owned());
            self.event(format!("forget {}", name.unwrap_or_default()));
        }
        fn restore_statement(&self, client_name: Vec<u8>, _: Rc<Stmt>) {
            self.event(format!("restore {}", String::from_utf8_lossy(&client_name)));
        }
        fn statement_shape(&self, name: &[u8], shape: Option<Box<[u8]>>, check: bool) {
            self.event(format!(
                "shape {} {:?} {check}",
                String::from_utf8_lossy(name),
                shape.map(|s| s.len())
            ));
        }

        fn statement_stale(&self, client_name: &[u8], _made: Option<u64>) {
            self.event(format!("stale {}", String::from_utf8_lossy(client_name)));
        }
        fn writing(&self) -> bool {
            self.writing.get()
        }
        fn open_batch(&self) -> bool {
            false
        }
        fn keeps_backend(&self) -> bool {
            self.keeps.get()
        }
        fn snapshot_pending(&self) -> bool {
            self.snapshot_pending.get()
        }
        fn take_dealloc(&self) -> bool {
            false
        }
        fn take_discard(&self) -> bool {
            self.discard.replace(false)
        }
        fn detach(&self) {
            self.event("detach");
        }
        fn backend_lost(&self) {
            self.event("lost");
        }
    }

    /// A backend state owned by a fresh recorder, and its outgoing queue.
    fn owned() -> (State, OutQueue, Rc<Recorder>) {
        let mut st = State::new(
            1,
            4242,
            Rc::new(Settings::default()),
            Settings::default(),
            vec![],
        );
        let rec = Rc::new(Recorder::default());
        st.owner = Some(rec.clone());
        (st, OutQueue::new(1 << 20, 1 << 16), rec)
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        put_message(&mut m, tag, |b| b.extend_from_slice(body));
        m
    }

    fn rfq(status: u8) -> Vec<u8> {
        let mut m = Vec::new();
        ready_for_query(&mut m, status);
        m
    }

    fn error(code: &str, text: &str) -> Vec<u8> {
        let mut m = Vec::new();
        error_response(&mut m, Severity::Error, code, text);
        m
    }

    fn data_row(cols: &[&str]) -> Vec<u8> {
        let mut body = (cols.len() as i16).to_be_bytes().to_vec();
        for c in cols {
            body.extend_from_slice(&(c.len() as i32).to_be_bytes());
            body.extend_from_slice(c.as_bytes());
        }
        msg(be::DATA_ROW, &body)
    }

    /// Everything written to the backend (closes the queue).
    fn written(out: &OutQueue) -> Vec<u8> {
        let mut w = Vec::new();
        out.close();
        futures_lite::future::block_on(out.run_writer(&mut w)).unwrap();
        w
    }

    fn stmt(content: &str) -> Rc<Stmt> {
        Rc::new(Stmt {
            content: Rc::from(content.as_bytes()),
            parse: Vec::new(),
            validated: Cell::new(false),
            sql: None,
        })
    }

    fn feed(out: &OutQueue, st: &mut State, msgs: &[Vec<u8>]) -> Vec<After> {
        msgs.iter().map(|m| on_message(out, st, m)).collect()
    }

    #[test]
    fn a_batch_is_forwarded_in_order_and_the_backend_released_at_idle() {
        let (mut st, out, rec) = owned();
        for k in [Kind::Bind, Kind::Execute, Kind::Sync] {
            st.queue.push_back(Entry::Client(k));
        }
        let stream = [
            msg(be::BIND_COMPLETE, b""),
            data_row(&["1"]),
            msg(be::COMMAND_COMPLETE, b"SELECT 1\0"),
            rfq(b'I'),
        ];
        let after = feed(&out, &mut st, &stream);
        assert_eq!(after.last(), Some(&After::Release));
        assert_eq!(*rec.client.borrow(), stream.concat());
        assert!(st.queue.is_empty());
        assert_eq!(rec.events(), ["hold rfq", "notes"]);
    }

    #[test]
    fn a_session_that_keeps_its_backend_or_is_in_a_transaction_is_not_released() {
        let (mut st, out, rec) = owned();
        rec.keeps.set(true);
        st.queue.push_back(Entry::Client(Kind::Query));
        assert_eq!(on_message(&out, &mut st, &rfq(b'I')), After::Nothing);
        rec.keeps.set(false);
        st.queue.push_back(Entry::Client(Kind::Query));
        assert_eq!(on_message(&out, &mut st, &rfq(b'T')), After::Nothing);
        assert_eq!(st.status, b'T');
        // A ReadyForQuery the listener holds is not forwarded.
        rec.held.set(true);
        rec.client.borrow_mut().clear();
        st.queue.push_back(Entry::Client(Kind::Query));
        assert_eq!(on_message(&out, &mut st, &rfq(b'I')), After::Release);
        assert!(rec.client.borrow().is_empty());
    }

    #[test]
    fn an_injected_parse_is_answered_silently_and_marks_the_statement_valid() {
        let (mut st, out, rec) = owned();
        let s = stmt("tp_a");
        st.queue.push_back(Entry::Parse {
            stmt: s.clone(),
            injected: true,
            client_name: None,
        });
        st.queue.push_back(Entry::Client(Kind::Bind));
        st.queue.push_back(Entry::Synth(msg(be::NO_DATA, b"")));
        feed(
            &out,
            &mut st,
            &[msg(be::PARSE_COMPLETE, b""), msg(be::BIND_COMPLETE, b"")],
        );
        assert!(s.validated.get());
        // The client sees its BindComplete and, right after it, the response we made up.
        assert_eq!(
            *rec.client.borrow(),
            [msg(be::BIND_COMPLETE, b""), msg(be::NO_DATA, b"")].concat()
        );
    }

    #[test]
    fn an_error_skips_to_sync_and_a_failed_parse_is_forgotten() {
        let (mut st, out, rec) = owned();
        let s = stmt("tp_b");
        st.prepared.insert(s.content.clone());
        st.queue.push_back(Entry::Parse {
            stmt: s.clone(),
            injected: false,
            client_name: Some(b"s1".to_vec()),
        });
        st.queue.push_back(Entry::Client(Kind::Bind));
        st.queue.push_back(Entry::Synth(msg(be::NO_DATA, b"")));
        st.queue.push_back(Entry::Client(Kind::Execute));
        st.queue.push_back(Entry::Client(Kind::Sync));
        let e = error("42601", "syntax error");
        let after = feed(&out, &mut st, &[e.clone(), rfq(b'I')]);
        assert_eq!(after, [After::Nothing, After::Release]);
        // Nothing we would have made up after the error reaches the client.
        assert_eq!(*rec.client.borrow(), [e, rfq(b'I')].concat());
        assert!(!st.prepared.contains(b"tp_b"));
        assert!(!st.skipping);
        assert_eq!(rec.events()[0], "forget s1");
    }

    #[test]
    fn a_stale_plan_reports_the_clients_name_and_the_statement_is_closed_after_sync() {
        let (mut st, out, rec) = owned();
        st.prepared.insert(Rc::from(&b"tp_c"[..]));
        st.queue.push_back(Entry::Renamed(
            Kind::Bind,
            Rc::from(&b"tp_c"[..]),
            Rc::from(&b"s1"[..]),
        ));
        st.queue.push_back(Entry::Client(Kind::Sync));
        let e = error(
            "0A000",
            "cached plan must not change result type in \"tp_c\"",
        );
        let after = feed(&out, &mut st, &[e, rfq(b'I')]);
        assert_eq!(after, [After::Nothing, After::Nothing]);
        assert_eq!(rec.events()[0], "stale s1");
        assert!(!st.prepared.contains(b"tp_c"));
        let client = rec.client.borrow().clone();
        let text = String::from_utf8_lossy(&client);
        assert!(text.contains("\"s1\"") && !text.contains("tp_c"), "{text}");
        // Close of the stale statement and a Sync went to the backend; their answer is ours.
        let mut close = Vec::new();
        frontend::write_target(&mut close, frontend::CLOSE, b'S', b"tp_c");
        put_message(&mut close, frontend::SYNC, |_| {});
        assert!(matches!(
            st.queue.front(),
            Some(Entry::Internal(Internal::Forget))
        ));
        let after = feed(&out, &mut st, &[msg(be::CLOSE_COMPLETE, b""), rfq(b'I')]);
        assert_eq!(after.last(), Some(&After::Release));
        assert_eq!(
            rec.client.borrow().len(),
            client.len(),
            "nothing more forwarded"
        );
        assert_eq!(written(&out), close);
    }

    #[test]
    fn a_bind_of_a_stale_plan_gets_postgres_error_and_a_describe_of_ours_is_not_forwarded() {
        let (mut st, out, rec) = owned();
        let stale = |st: &mut State| {
            st.queue.push_back(Entry::Renamed(
                Kind::Bind,
                Rc::from(STALE_PLAN),
                Rc::from(&b"s1"[..]),
            ));
            st.queue.push_back(Entry::Client(Kind::Execute));
            st.queue.push_back(Entry::Client(Kind::Sync));
        };
        stale(&mut st);
        let missing = error(
            "26000",
            "prepared statement \"tp_stale_plan\" does not exist",
        );
        feed(&out, &mut st, &[missing.clone(), rfq(b'I')]);
        let client = rec.client.borrow().clone();
        let fields = be::error_fields(&client[5..]).unwrap();
        let get = |f: u8| fields.iter().find(|x| x.0 == f).map(|x| x.1.to_vec());
        assert_eq!(get(b'C').as_deref(), Some(&b"0A000"[..]));
        assert_eq!(
            get(b'M').as_deref(),
            Some(&b"cached plan must not change result type"[..])
        );
        // asyncpg tells a stale plan by the routine.
        assert_eq!(get(b'R').as_deref(), Some(&b"RevalidateCachedQuery"[..]));
        assert!(client.ends_with(&rfq(b'I')));
        // In a failed transaction, Postgres's 25P02 (it looks the name up first).
        rec.client.borrow_mut().clear();
        st.status = b'E';
        stale(&mut st);
        feed(&out, &mut st, &[missing, rfq(b'E')]);
        let client = rec.client.borrow().clone();
        assert!(String::from_utf8_lossy(&client).contains("25P02"));

        // Our Describe of a client's statement: its answer goes to the owner, not the client.
        rec.client.borrow_mut().clear();
        let done: Done = Rc::new(Slot::default());
        st.queue.push_back(Entry::Shape {
            client_name: Rc::from(&b"s2"[..]),
            check: Some(done.clone()),
        });
        st.queue.push_back(Entry::Client(Kind::Bind));
        let mut rd = 1i16.to_be_bytes().to_vec();
        rd.extend_from_slice(b"a\0");
        rd.extend_from_slice(&[0; 18]);
        feed(
            &out,
            &mut st,
            &[
                msg(be::PARAMETER_DESCRIPTION, &[0, 0]),
                msg(be::ROW_DESCRIPTION, &rd),
            ],
        );
        assert!(rec.client.borrow().is_empty());
        assert!(done.is_filled());
        assert_eq!(rec.events().last().unwrap(), "shape s2 Some(10) true");
        assert!(matches!(st.queue.front(), Some(Entry::Client(Kind::Bind))));
    }

    #[test]
    fn settings_changed_under_a_statement_are_read_back_before_the_ready_for_query() {
        let (mut st, out, rec) = owned();
        st.queue.push_back(Entry::Client(Kind::Query));
        let ps = msg(be::PARAMETER_STATUS, b"TimeZone\0UTC\0");
        rec.snapshot_pending.set(true);
        assert_eq!(on_message(&out, &mut st, &ps), After::Nothing);
        assert_eq!(rec.events(), ["settings changed"]);
        // The ReadyForQuery is held while the settings are read back.
        assert_eq!(on_message(&out, &mut st, &rfq(b'I')), After::Nothing);
        assert_eq!(*rec.client.borrow(), ps);
        let mut q = Vec::new();
        frontend::query(&mut q, "SELECT read_back");
        assert!(matches!(
            st.queue.front(),
            Some(Entry::Internal(Internal::Snapshot { held_rfq: true, .. }))
        ));
        let after = feed(
            &out,
            &mut st,
            &[
                data_row(&["TimeZone", "UTC"]),
                data_row(&["channel", "jobs"]),
                msg(be::COMMAND_COMPLETE, b"SELECT 2\0"),
                rfq(b'I'),
            ],
        );
        assert_eq!(after.last(), Some(&After::Release));
        assert_eq!(
            rec.events()[1..],
            ["channel jobs", "settings timezone=UTC", "hold rfq", "notes"]
        );
        // The held ReadyForQuery went out last; the backend's settings are the session's.
        assert!(rec.client.borrow().ends_with(&rfq(b'I')));
        assert_eq!(st.settings.get("TimeZone"), Some("UTC"));
        assert_eq!(written(&out), q);
    }

    #[test]
    fn its_own_notification_is_told_and_an_idle_backends_error_closes_it() {
        let (mut st, out, rec) = owned();
        let mut body = 4242i32.to_be_bytes().to_vec();
        body.extend_from_slice(b"jobs\0x\0");
        on_message(&out, &mut st, &msg(be::NOTIFICATION_RESPONSE, &body));
        let mut other = 7i32.to_be_bytes().to_vec();
        other.extend_from_slice(b"jobs\0x\0");
        on_message(&out, &mut st, &msg(be::NOTIFICATION_RESPONSE, &other));
        assert_eq!(rec.events(), ["own notification"]);
        // Nothing expected: an administrator's FATAL to an idle backend closes it; the
        // session holding it hears it.
        let fatal = error("57P01", "terminating connection");
        on_message(&out, &mut st, &fatal);
        assert!(st.broken);
        assert!(rec.client.borrow().ends_with(&fatal));
        let mut terminate = Vec::new();
        put_message(&mut terminate, frontend::TERMINATE, |_| {});
        assert_eq!(written(&out), terminate);
    }

    #[test]
    fn a_refused_signal_is_worded_as_postgres_and_other_errors_pass() {
        let (mut st, out, rec) = owned();
        // The server's check refused a pg_cancel_backend for the gateway (signal_denied.rs):
        // the client sees Postgres's own refusal, not the marker.
        st.queue.push_back(Entry::Client(Kind::Query));
        let marker = error(
            "42704",
            "unrecognized configuration parameter \"tidepool.signal_denied_cancel_member\"",
        );
        feed(&out, &mut st, &[marker.clone(), rfq(b'I')]);
        let client = rec.client.borrow().clone();
        let refusal = crate::signal_denied::denied_signal(&marker).unwrap();
        assert_eq!(client, [refusal, rfq(b'I')].concat());
        assert_eq!(be::error_sqlstate(&client[5..]), Some(&b"42501"[..]));
        // Any other error passes unchanged.
        rec.client.borrow_mut().clear();
        st.queue.push_back(Entry::Client(Kind::Query));
        let other = error("42P01", "relation \"x\" does not exist");
        feed(&out, &mut st, &[other.clone(), rfq(b'I')]);
        assert_eq!(*rec.client.borrow(), [other, rfq(b'I')].concat());
    }
}
