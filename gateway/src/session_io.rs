//! A session's side of its conversation with a pooler: what the link delivers to it (bytes for
//! the client, followed message by message for `ReadyForQuery`), the requests in flight, the
//! statements to prepare again after a re-open, and what it owes its client when its link dies.
//! The session task (session.rs) owns it; its link (link.rs) knows it as an [`Endpoint`];
//! failover.rs answers what it owes.

use crate::classify;
use crate::link::{self, Endpoint, Link};
use crate::session_ids::SessionId;
use crate::signals;
use crate::terminate_wait;
use shared::io::{Notify, OutQueue, Slot};
use shared::link::{put_header, up};
use shared::protocol::backend::{self as be, Severity};
use shared::protocol::frontend as fe;
use shared::settings::Settings;
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::rc::{Rc, Weak};

/// What a session owes its client at its next request, after its link was lost while idle.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owed {
    Nothing,
    /// Its transaction died with the old primary; the client does not know yet.
    TxLost,
    /// A failed transaction kept here: everything but its end gets `25P02`.
    Aborted,
    /// Its backend state died with the old primary.
    StateLost,
}

pub const TX_LOST: &str = "the primary changed: the transaction was rolled back";
const OUTCOME_UNKNOWN: &str =
    "the connection to the primary was lost while this request ran: whether it committed is unknown";

/// Named statements remembered per session for a re-open, and their total size.
const MAX_REMEMBERED: usize = 1000;
const MAX_REMEMBERED_BYTES: usize = 1 << 20;

/// Statement name → its `Parse` message.
pub type Prepared = HashMap<Box<[u8]>, Box<[u8]>>;

/// What the link delivers to one session, and what the session's failover logic needs to know
/// about the conversation with the pooler.
pub struct SessionIo {
    /// Bytes for the client, drained by the session's writer task.
    pub client_out: OutQueue,
    /// Startup replies (`AUTH_INFO`, `OPENED`, `OPEN_FAILED`).
    pub control: Slot<(u8, Vec<u8>)>,
    pub settings: RefCell<Settings>,
    /// The pooler ended the session, or the link died during login.
    pub ended: Cell<bool>,
    pub ended_notify: Notify,
    /// The link the session is registered on (None while it has none).
    pub link: RefCell<Option<Rc<Link>>>,
    /// Accepted on `read_only_listen`: served by a standby when there is one.
    pub read_only: Cell<bool>,
    /// Login finished: from now on a lost link does not end the session.
    pub opened: Cell<bool>,
    /// The link died under an opened session: the next request re-opens it elsewhere.
    pub lost: Cell<bool>,
    /// Requests sent (`Query`, `Sync`, `FunctionCall`) not yet answered by `ReadyForQuery`.
    pub pending: Cell<u32>,
    /// Whether a pending request may have ended a transaction with a commit.
    pub pending_may_commit: Cell<bool>,
    /// The transaction status of the last `ReadyForQuery` (`I`, `T`, `E`).
    pub status: Cell<u8>,
    /// `ReadyForQuery` messages received (queries answered), and those with status `I`
    /// (transactions ended): read by the session loop for SHOW STATS and the metrics.
    pub readies: Cell<u64>,
    pub xacts: Cell<u64>,
    /// Told when the last request in flight is answered (a drain and the idle timeouts wait
    /// for that moment). One counter bump per answered request when nobody waits.
    pub ready_notify: Notify,
    /// A statement created state that lives on the backend (temp table, LISTEN, ...).
    pub pinned: Cell<bool>,
    /// Named statements the client prepared (name → its Parse message), for a re-open.
    pub prepared: RefCell<Prepared>,
    prepared_bytes: Cell<usize>,
    /// Replies to the gateway's own requests still to drop (see `on_data`).
    pub swallow: Cell<u32>,
    /// What the session owes its client at the next request after a lost link (see failover.rs).
    pub owed: Cell<Owed>,
    scan: Cell<Scan>,
    /// `MSGS` payload bytes sent on the current link, and taken by the pooler as it last said
    /// (`down::ACK`): the session reads no more from its client while the difference is
    /// `link::REQUEST_WINDOW` or more (see `wait_window`). Both restart with each link.
    sent: Cell<u64>,
    taken: Cell<u64>,
    window: Notify,
    /// The session's id, held for as long as anything holds the session.
    id: RefCell<Option<SessionId>>,
    /// Signals the server may allow in the requests in flight (signals.rs); boxed, and only
    /// while there are any.
    signals: RefCell<Option<Box<Expected>>>,
    /// Responses go to `Expected::held`, not to the client (one test per `on_data`).
    holding: Cell<bool>,
}

/// Signals waiting for the server's word (`down::SIGNAL`), oldest first.
struct Expected {
    /// The core's links (`Core::links`), to send the signals on.
    links: Rc<[Vec<Rc<Link>>]>,
    issued: VecDeque<signals::Issued>,
    /// The session, for the end of a termination's wait.
    me: Weak<SessionIo>,
    /// Responses held back while terminations with a timeout wait (terminate_wait.rs).
    held: Option<terminate_wait::Held>,
    /// Holds so far (each its generation).
    holds: u32,
    /// The session's virtual pid (its role's memberships are read again: `recheck`).
    caller: i32,
}

/// Signals kept waiting per session at most (the oldest go first): a client that sends
/// endless signalling calls the server never reaches holds no more.
const MAX_EXPECTED: usize = 1024;

/// Where the backend message stream to the client stands: the link may cut a message anywhere,
/// so we follow message boundaries across frames (only lengths are read).
#[derive(Clone, Copy, Default)]
struct Scan {
    /// Header bytes seen of the current message (0..5).
    head: u8,
    tag: u8,
    len: [u8; 4],
    /// Body bytes still to come of the current message.
    left: u32,
}

impl SessionIo {
    pub fn new() -> Rc<SessionIo> {
        Rc::new(SessionIo {
            // A client that reads slowly makes the pooler wait (flow control), so this stays
            // around the pooler's window; give buffers above 16 KiB back when idle.
            client_out: OutQueue::new(256 * 1024, 16 * 1024),
            control: Slot::default(),
            settings: RefCell::new(Settings::default()),
            ended: Cell::new(false),
            ended_notify: Notify::default(),
            link: RefCell::new(None),
            read_only: Cell::new(false),
            opened: Cell::new(false),
            lost: Cell::new(false),
            pending: Cell::new(0),
            pending_may_commit: Cell::new(false),
            status: Cell::new(b'I'),
            readies: Cell::new(0),
            xacts: Cell::new(0),
            ready_notify: Notify::default(),
            pinned: Cell::new(false),
            owed: Cell::new(Owed::Nothing),
            prepared: RefCell::new(HashMap::new()),
            prepared_bytes: Cell::new(0),
            swallow: Cell::new(0),
            scan: Cell::new(Scan::default()),
            sent: Cell::new(0),
            taken: Cell::new(0),
            window: Notify::default(),
            id: RefCell::new(None),
            signals: RefCell::new(None),
            holding: Cell::new(false),
        })
    }

    /// Holds the session's id until the session is gone (see `Core::next_session_id`).
    pub fn hold_id(&self, id: SessionId) -> u32 {
        let n = id.id;
        *self.id.borrow_mut() = Some(id);
        n
    }

    /// A `MSGS` frame of `payload` bytes went to the current link.
    pub fn sent_request(&self, payload: usize) {
        self.sent.set(self.sent.get() + payload as u64);
    }

    /// Waits while the pooler has not taken a window's worth of this session's requests, so
    /// that one session's pipeline waits in its own client socket, not in the link all
    /// sessions share. Returns at once when the link is gone or the session ended.
    pub async fn wait_window(&self) {
        loop {
            let notified = self.window.notified();
            let full =
                self.sent.get().saturating_sub(self.taken.get()) >= shared::link::REQUEST_WINDOW;
            let live = self.current_link().is_some_and(|l| l.alive.get());
            if !full || !live || self.ended.get() {
                return;
            }
            notified.await;
        }
    }

    pub fn end(&self, last_words: Option<&[u8]>) {
        if self.ended.replace(true) {
            return;
        }
        self.let_go();
        if let Some(m) = last_words {
            self.client_out.push(m);
        }
        self.client_out.close();
        self.ended_notify.notify();
        self.window.notify();
        // A session still logging in waits on `control`: wake it with an error.
        if !self.control.is_filled() {
            self.control.put((0, Vec::new()));
        }
    }

    /// The current link, if any.
    pub fn current_link(&self) -> Option<Rc<Link>> {
        self.link.borrow().clone()
    }

    /// A link the session can use now without any failover work, if it has one (the hot path
    /// asks on every request; failover.rs's slow path when it answers `None`): its own link, up,
    /// and either busy with state only that pooler has or on a pooler that `serves(pooler,
    /// read_only)` (the core's view of the primary, `Core::serves`).
    pub fn usable_link(&self, serves: impl FnOnce(usize, bool) -> bool) -> Option<Rc<Link>> {
        if self.owed.get() != Owed::Nothing {
            return None;
        }
        let l = self.current_link()?;
        let stays = self.pending.get() > 0 || self.status.get() != b'I' || self.pinned.get();
        (l.alive.get() && (stays || serves(l.pooler, self.read_only.get()))).then_some(l)
    }

    /// True while the client's byte stream stands between two backend messages.
    pub fn at_message_boundary(&self) -> bool {
        let s = self.scan.get();
        s.head == 0 && s.left == 0
    }

    /// Raw backend messages for the client: queued, and followed for `ReadyForQuery`. While
    /// `swallow` is set, the replies to the gateway's own replay of the session's prepared
    /// statements (after a re-open) are dropped up to their `ReadyForQuery`.
    pub fn on_data(&self, data: &[u8]) {
        let mut s = self.scan.get();
        let mut i = 0;
        let mut keep = if self.swallow.get() > 0 {
            usize::MAX
        } else {
            0
        };
        while i < data.len() {
            if s.left > 0 {
                let n = (s.left as usize).min(data.len() - i);
                if s.tag == b'Z' && s.left == 1 {
                    if keep == usize::MAX {
                        let w = self.swallow.get().saturating_sub(1);
                        self.swallow.set(w);
                        if w == 0 {
                            keep = i + 1;
                        }
                    } else {
                        self.on_ready(data[i]);
                    }
                }
                s.left -= n as u32;
                i += n;
                if s.left == 0 {
                    s.head = 0;
                }
                continue;
            }
            // Header: tag + i32 length (which counts itself).
            if s.head == 0 {
                s.tag = data[i];
            } else {
                s.len[s.head as usize - 1] = data[i];
            }
            s.head += 1;
            i += 1;
            if s.head == 5 {
                let len = u32::from_be_bytes(s.len);
                s.left = len.saturating_sub(4);
                if s.tag == b'E' {
                    // Counted by SQLSTATE class when the body came whole in this frame (the
                    // usual case: errors are small); else as `unknown`.
                    let body = data.get(i..i + s.left as usize);
                    crate::metrics::error(body.and_then(be::error_sqlstate));
                }
                if s.left == 0 {
                    s.head = 0;
                }
            }
        }
        self.scan.set(s);
        let out = &data[keep.min(data.len())..];
        if out.is_empty() {
            return;
        }
        if self.holding.get() {
            if let Some(h) = self
                .signals
                .borrow_mut()
                .as_mut()
                .and_then(|e| e.held.as_mut())
            {
                h.push(out);
                return;
            }
        }
        self.client_out.push(out);
    }

    /// A fresh session on a pooler: its replies start at a message boundary.
    pub fn restart_scan(&self) {
        self.scan.set(Scan::default());
        self.swallow.set(0);
    }

    /// Notes a named protocol-level statement the client prepared, to prepare it again after
    /// a re-open. Bounded: past the bound a failover loses the rest (the client then hears
    /// 26000 for them, as after a `DEALLOCATE`).
    pub fn remember_parse(&self, name: &[u8], message: &[u8]) {
        self.forget_parse(name);
        let mut p = self.prepared.borrow_mut();
        let size = self.prepared_bytes.get();
        if p.len() < MAX_REMEMBERED && size + message.len() <= MAX_REMEMBERED_BYTES {
            p.insert(name.into(), message.into());
            self.prepared_bytes.set(size + message.len());
        }
    }

    /// The client closed a named statement.
    pub fn forget_parse(&self, name: &[u8]) {
        if let Some(m) = self.prepared.borrow_mut().remove(name) {
            let size = self.prepared_bytes.get();
            self.prepared_bytes.set(size.saturating_sub(m.len()));
        }
    }

    /// `DISCARD ALL` / `DEALLOCATE ALL`.
    pub fn forget_all_parses(&self) {
        self.prepared.borrow_mut().clear();
        self.prepared_bytes.set(0);
    }

    /// Signals to send when the server allows them (the batch carrying their calls is about to
    /// go out).
    pub fn expect_signals(
        self: &Rc<Self>,
        links: &Rc<[Vec<Rc<Link>>]>,
        issued: Vec<signals::Issued>,
        caller: i32,
    ) {
        if issued.is_empty() {
            return;
        }
        let mut s = self.signals.borrow_mut();
        let e = s.get_or_insert_with(|| {
            Box::new(Expected {
                links: links.clone(),
                issued: VecDeque::new(),
                me: Rc::downgrade(self),
                held: None,
                holds: 0,
                caller,
            })
        });
        e.issued.extend(issued);
        while e.issued.len() > MAX_EXPECTED {
            e.issued.pop_front();
        }
    }

    /// Postgres's warning for a negative pid (`down::SIGNAL`): the server allowed the signal of
    /// that marker, the oldest waiting one (a parameter's marker names a role, not a session:
    /// calls are answered in the order they were sent). A marker nobody waits for is the
    /// client's own call: its warning goes to the client.
    ///
    /// A termination with a timeout then holds the responses that follow until its target is
    /// gone or the timeout has passed (terminate_wait.rs), as Postgres's call returns only then.
    fn on_signal(&self, msg: &[u8]) {
        let found = be::signal_marker(msg).and_then(|m| {
            let mut s = self.signals.borrow_mut();
            let e = s.as_mut()?;
            let i = e.issued.iter().position(|x| x.marker == m)?;
            let x = e.issued.remove(i)?;
            let hold = (x.recheck || x.wait_ms().is_some()).then(|| {
                if e.held.is_none() {
                    e.holds = e.holds.wrapping_add(1);
                    e.held = Some(terminate_wait::Held::new(e.holds));
                }
                let h = e.held.as_mut().expect("just made");
                (h.generation, h.begin())
            });
            Some((e.links.clone(), x, hold, e.me.clone(), e.caller))
        });
        let Some((links, x, hold, me, caller)) = found else {
            self.on_data(msg);
            return;
        };
        if hold.is_some() {
            self.holding.set(true);
        }
        // Kept only to be put back, changed, where the gateway does not believe the server.
        let notice = x.recheck.then(|| msg.to_vec());
        glommio::spawn_local(async move {
            if let Some(notice) = notice {
                if !recheck(&me, caller, x.pid).await {
                    if let (Some(io), Some((generation, at))) = (me.upgrade(), hold) {
                        let warning = signals::unknown_pid(&notice, x.marker, x.pid);
                        io.waited(generation, at, Some((warning, x.column)));
                    }
                    return;
                }
            }
            let terminate = x.signal == signals::Signal::Terminate;
            link::signal(&links, x.pid, x.secret, terminate).await;
            let Some((generation, at)) = hold else {
                return;
            };
            let change = match x.wait_ms() {
                Some((ms, column)) => {
                    let gone =
                        terminate_wait::until_gone(|| signals::lives(x.pid, x.secret), ms).await;
                    (!gone).then(|| (terminate_wait::warning(x.pid, ms), column))
                }
                None => None,
            };
            if let Some(io) = me.upgrade() {
                io.waited(generation, at, change);
            }
        })
        .detach();
    }

    /// A wait ended (`change`: see `terminate_wait::Held::ended`): the held responses go to the
    /// client once no other waits.
    fn waited(&self, generation: u32, at: usize, change: Option<(Vec<u8>, Option<u16>)>) {
        let bytes = {
            let mut s = self.signals.borrow_mut();
            let Some(e) = s.as_mut() else { return };
            let Some(h) = e.held.as_mut().filter(|h| h.generation == generation) else {
                return;
            };
            if !h.ended(at, change) {
                return;
            }
            let h = e.held.take().expect("just seen");
            if e.issued.is_empty() && self.pending.get() == 0 {
                s.take();
            }
            h.into_bytes()
        };
        self.holding.set(false);
        self.client_out.push(&bytes);
    }

    /// Held responses go to the client as they came (the session ends, or its link is lost):
    /// nothing may come after them out of order.
    fn let_go(&self) {
        if !self.holding.replace(false) {
            return;
        }
        let held = self
            .signals
            .borrow_mut()
            .as_mut()
            .and_then(|e| e.held.take());
        if let Some(h) = held {
            self.client_out.push(&h.unchanged());
        }
    }

    fn on_ready(&self, status: u8) {
        // Counted for SHOW STATS and the metrics: every ReadyForQuery answers a query; one
        // that finds the session idle ends a transaction (or an autocommit statement).
        self.readies.set(self.readies.get() + 1);
        if status == b'I' {
            self.xacts.set(self.xacts.get() + 1);
        }
        self.status.set(status);
        let p = self.pending.get().saturating_sub(1);
        self.pending.set(p);
        if p == 0 {
            // Every call sent was answered: the server allowed no more than it said (a hold
            // stays until its waits end).
            let mut s = self.signals.borrow_mut();
            match s.as_mut() {
                Some(e) if e.held.is_some() => e.issued.clear(),
                _ => drop(s.take()),
            }
            drop(s);
            self.pending_may_commit.set(false);
            self.ready_notify.notify();
        }
    }

    /// The link under this session died: a session still logging in ends; an opened one owes
    /// its client what the lost link means for it (failover.rs answers it at the next request).
    pub fn link_lost(&self, fatal: &[u8]) {
        self.link.borrow_mut().take();
        if !self.opened.get() {
            self.end(Some(fatal));
            return;
        }
        self.owe_for_lost_link();
    }

    /// What the session owes its client once its link died under it: errors for the requests
    /// in flight now, or a debt paid at its next request (`owed`).
    pub fn owe_for_lost_link(&self) {
        self.lost.set(true);
        self.let_go();
        // A reopen waiting on `control` must wake up and try again.
        self.control.put((0, Vec::new()));
        let pending = self.pending.replace(0);
        let pinned = self.pinned.replace(false);
        if pending > 0 {
            if !self.at_message_boundary() {
                // The client got half a message: nothing we can add would make sense of it.
                self.end(None);
                return;
            }
            let unknown = self.status.get() == b'I' || self.pending_may_commit.get();
            let (code, msg, status) = if unknown {
                ("08007", OUTCOME_UNKNOWN, b'I')
            } else {
                ("40001", TX_LOST, b'E')
            };
            let mut out = Vec::new();
            for _ in 0..pending {
                be::error_response(&mut out, Severity::Error, code, msg);
                be::ready_for_query(&mut out, status);
            }
            self.client_out.push(&out);
            self.status.set(status);
            self.pending_may_commit.set(false);
            self.owed.set(if status == b'E' {
                Owed::Aborted
            } else {
                Owed::Nothing
            });
            return;
        }
        self.owed.set(match self.status.get() {
            b'T' => Owed::TxLost,
            b'E' => Owed::Aborted,
            _ if pinned => Owed::StateLost,
            _ => Owed::Nothing,
        });
    }
}

/// How long a session's responses wait for a fresh role lookup before the gateway gives up on
/// believing the server (the pooler's own lookups give up after `auth_lookup_timeout_ms`).
const RECHECK_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The server allowed a signal the caller's login-time memberships would not reach (granted
/// since, or a forged marker: signals.rs): whether a lookup of its role that bypasses the
/// pooler's cache reaches the session `pid` now. The answer comes as a startup reply would
/// (`control`), which an opened session's link uses for nothing else while a request is in
/// flight.
async fn recheck(me: &Weak<SessionIo>, caller: i32, pid: i32) -> bool {
    let Some(user) = signals::login_role(caller) else {
        return false;
    };
    let asked = me.upgrade().and_then(|io| {
        let link = io.current_link()?;
        let id = io.id.borrow().as_ref()?.id;
        let _ = io.control.try_take();
        link.send(
            shared::link::up::AUTH_RECHECK,
            id,
            &shared::role::lookup_payload(&user, ""),
        );
        Some(())
    });
    if asked.is_none() {
        return false;
    }
    let answer = crate::with_timeout(RECHECK_TIMEOUT, async {
        let io = me.upgrade()?;
        Some(io.control.take().await)
    })
    .await
    .flatten();
    match answer {
        Some((shared::link::down::AUTH_INFO, info)) if info.first() == Some(&1) => {
            match shared::role::RoleInfo::decode(&info[1..]) {
                Some(role) => signals::recheck(caller, &role, pid),
                None => false,
            }
        }
        _ => false,
    }
}

/// The session as its link sees it (link.rs).
impl Endpoint for SessionIo {
    fn attach(&self, link: Option<Rc<Link>>) {
        *self.link.borrow_mut() = link;
        self.sent.set(0);
        self.taken.set(0);
        self.window.notify();
    }

    fn on_ack(&self, taken: u64) {
        self.taken.set(taken);
        self.window.notify();
    }

    fn on_data(&self, data: &[u8]) {
        SessionIo::on_data(self, data);
    }

    fn on_signal(&self, msg: &[u8]) {
        SessionIo::on_signal(self, msg);
    }

    fn on_settings(&self, settings: Settings) {
        *self.settings.borrow_mut() = settings;
    }

    fn on_control(&self, kind: u8, payload: Vec<u8>) {
        self.control.put((kind, payload));
    }

    fn closed(&self, last_words: &[u8]) {
        self.end(Some(last_words));
    }

    fn link_lost(&self, fatal: &[u8]) {
        SessionIo::link_lost(self, fatal);
        self.window.notify();
    }
}

/// Ends of the request segments of a batch of complete messages: each segment ends after a
/// `Query`, `Sync` or `FunctionCall` (which get one `ReadyForQuery` each), or at the batch's end.
pub fn segments(batch: &[u8]) -> Vec<usize> {
    let mut ends = Vec::new();
    let mut i = 0;
    while i + 5 <= batch.len() {
        let len = i32::from_be_bytes([batch[i + 1], batch[i + 2], batch[i + 3], batch[i + 4]]);
        let next = (i + 1 + len.max(4) as usize).min(batch.len());
        if matches!(batch[i], fe::QUERY | fe::SYNC | fe::FUNCTION_CALL) {
            ends.push(next);
        }
        i = next;
    }
    if ends.last() != Some(&batch.len()) {
        ends.push(batch.len());
    }
    ends
}

/// Requests (messages answered by one `ReadyForQuery`) in a batch.
pub fn requests(batch: &[u8]) -> u32 {
    let mut n = 0;
    let mut i = 0;
    while i + 5 <= batch.len() {
        let len = i32::from_be_bytes([batch[i + 1], batch[i + 2], batch[i + 3], batch[i + 4]]);
        if matches!(batch[i], fe::QUERY | fe::SYNC | fe::FUNCTION_CALL) {
            n += 1;
        }
        i += 1 + len.max(4) as usize;
    }
    n
}

/// Sends a batch on a link and notes what the session now waits for.
pub fn send(link: &Link, io: &SessionIo, id: u32, flags: u8, msgs: &[u8], may_commit: bool) {
    let flags = flags & !classify::LOWERS_SYNC_COMMIT;
    crate::metrics::link_frame(crate::metrics::SENT, shared::link::HEADER + msgs.len() + 1);
    link.out.push_with(|b| {
        put_header(b, up::MSGS, id, msgs.len() + 1);
        b.push(flags);
        b.extend_from_slice(msgs);
    });
    io.sent_request(msgs.len() + 1);
    io.pending.set(io.pending.get() + requests(msgs));
    if may_commit {
        io.pending_may_commit.set(true);
    }
    // LISTEN no longer pins a backend, but its registrations live on this pooler: a session
    // that listened is told they are gone if its pooler changes (conservative: also after an
    // UNLISTEN, which carries the same flag).
    if flags & (shared::link::flags::PIN | shared::link::flags::LISTEN) != 0 {
        io.pinned.set(true);
    }
    if flags & shared::link::flags::DISCARD != 0 {
        io.pinned.set(false);
        io.forget_all_parses();
    }
    if flags & shared::link::flags::DEALLOCATE != 0 {
        io.forget_all_parses();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn ready_for_query_followed_across_any_cut() {
        let mut stream = msg(b'C', b"SELECT 1\0");
        stream.extend(msg(b'Z', b"T"));
        stream.extend(msg(b'D', &[0, 1, 0, 0, 0, 1, b'x']));
        stream.extend(msg(b'Z', b"I"));
        for cut in 0..stream.len() {
            for cut2 in cut..stream.len() {
                let io = SessionIo::new();
                io.pending.set(2);
                io.on_data(&stream[..cut]);
                io.on_data(&stream[cut..cut2]);
                let first_z = 20;
                if cut2 >= first_z && cut2 < stream.len() {
                    assert_eq!(io.status.get(), b'T');
                    assert_eq!(io.pending.get(), 1);
                }
                io.on_data(&stream[cut2..]);
                assert_eq!(io.status.get(), b'I');
                assert_eq!(io.pending.get(), 0);
                assert!(io.at_message_boundary());
            }
        }
        let io = SessionIo::new();
        io.on_data(&stream[..3]);
        assert!(!io.at_message_boundary());
    }

    #[test]
    fn replies_to_a_replay_are_dropped() {
        let mut replay = msg(b'1', b"");
        replay.extend(msg(b'1', b""));
        replay.extend(msg(b'Z', b"I"));
        let mut client = msg(b'C', b"SELECT 1\0");
        client.extend(msg(b'Z', b"I"));
        let all = [replay.clone(), client.clone()].concat();
        for cut in 0..all.len() {
            let io = SessionIo::new();
            io.swallow.set(1);
            io.pending.set(1);
            io.on_data(&all[..cut]);
            io.on_data(&all[cut..]);
            assert_eq!(io.swallow.get(), 0);
            assert_eq!(io.pending.get(), 0);
            io.client_out.close();
            let got = futures_lite::future::block_on(async {
                let mut sink = Vec::new();
                let _ = io.client_out.run_writer(&mut sink).await;
                sink
            });
            assert_eq!(got, client, "cut {cut}");
        }
    }
}
