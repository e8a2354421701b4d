//! The gateway's end of its links to the poolers: a few per core per pooler, each shared by many
//! sessions. A link that drops is redialled. Each link carries its pooler's role reports
//! (`down::ROLE`); the sessions it carried are told it was lost and decide what that means for
//! them (see `failover.rs`).

use glommio::net::TcpStream;
use shared::agent::Role;
use shared::io::{MessageReader, Notify, OutQueue, RcStream, Slot};
use shared::link::{self, down, put_header, up, HEADER};
use shared::protocol::backend::{self as be, Severity};
use shared::settings::Settings;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

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
    /// A statement created state that lives on the backend (temp table, LISTEN, ...).
    pub pinned: Cell<bool>,
    /// Named statements the client prepared (name → its Parse message), for a re-open.
    pub prepared: RefCell<Prepared>,
    prepared_bytes: Cell<usize>,
    /// Replies to the gateway's own requests still to drop (see `on_data`).
    pub swallow: Cell<u32>,
    /// What the session owes its client at the next request after a lost link (see failover.rs).
    pub owed: Cell<crate::failover::Owed>,
    scan: Cell<Scan>,
}

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
            pinned: Cell::new(false),
            owed: Cell::new(crate::failover::Owed::Nothing),
            prepared: RefCell::new(HashMap::new()),
            prepared_bytes: Cell::new(0),
            swallow: Cell::new(0),
            scan: Cell::new(Scan::default()),
        })
    }

    pub fn end(&self, last_words: Option<&[u8]>) {
        if self.ended.replace(true) {
            return;
        }
        if let Some(m) = last_words {
            self.client_out.push(m);
        }
        self.client_out.close();
        self.ended_notify.notify();
        // A session still logging in waits on `control`: wake it with an error.
        if !self.control.is_filled() {
            self.control.put((0, Vec::new()));
        }
    }

    /// The current link, if any.
    pub fn current_link(&self) -> Option<Rc<Link>> {
        self.link.borrow().clone()
    }

    /// True while the client's byte stream stands between two backend messages.
    pub fn at_message_boundary(&self) -> bool {
        let s = self.scan.get();
        s.head == 0 && s.left == 0
    }

    /// Raw backend messages for the client: queued, and followed for `ReadyForQuery`. While
    /// `swallow` is set, the replies to the gateway's own replay of the session's prepared
    /// statements (after a re-open) are dropped up to their `ReadyForQuery`.
    fn on_data(&self, data: &[u8]) {
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
                if s.left == 0 {
                    s.head = 0;
                }
            }
        }
        self.scan.set(s);
        if keep == 0 {
            self.client_out.push(data);
        } else if keep < data.len() {
            self.client_out.push(&data[keep..]);
        }
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

    fn on_ready(&self, status: u8) {
        self.status.set(status);
        let p = self.pending.get().saturating_sub(1);
        self.pending.set(p);
        if p == 0 {
            self.pending_may_commit.set(false);
        }
    }

    /// The link under this session died.
    fn link_lost(&self, fatal: &[u8]) {
        self.link.borrow_mut().take();
        if !self.opened.get() {
            self.end(Some(fatal));
            return;
        }
        crate::failover::on_link_lost(self);
    }
}

pub struct Link {
    pub out: OutQueue,
    sessions: RefCell<HashMap<u32, Rc<SessionIo>>>,
    pub alive: Cell<bool>,
    pub up_notify: Notify,
    /// Index of the pooler in `Config::poolers`.
    pub pooler: usize,
    /// The pooler's last role report on this link (Down while the link is down).
    pub role: Cell<Role>,
    pub primary_term: Cell<u64>,
    /// The node's WAL position from its last ROLE frame (0: unknown).
    pub lsn: Cell<u64>,
    /// A ROLE frame arrived since the link came up.
    reported: Cell<bool>,
    /// The core's: told whenever a link comes up, goes down or reports a role.
    changed: Rc<Notify>,
    /// Which of the pooler's cores this link should land on: `slot % cores` (see `down::CORE`).
    slot: usize,
    /// The link landed on another core: redial it (at most `redials_left` more times).
    misplaced: Cell<bool>,
    redials_left: Cell<u32>,
}

/// Redials of one link to reach its pooler core before it settles for the one it got. With
/// `SO_REUSEPORT` each dial lands on a core by hash; 16 misses in a row on 2 cores is 1 in 65,536.
const MAX_REDIALS: u32 = 16;

impl Link {
    /// `slot`: this link's number among all links of the process to this pooler (gateway core
    /// × links per core + link), which picks the pooler core it should reach.
    pub fn new(pooler: usize, slot: usize, changed: Rc<Notify>) -> Rc<Link> {
        Rc::new(Link {
            slot,
            misplaced: Cell::new(false),
            redials_left: Cell::new(MAX_REDIALS),
            out: OutQueue::new(8 << 20, 1 << 20),
            sessions: RefCell::new(HashMap::new()),
            alive: Cell::new(false),
            up_notify: Notify::default(),
            pooler,
            role: Cell::new(Role::Down),
            primary_term: Cell::new(0),
            lsn: Cell::new(0),
            reported: Cell::new(false),
            changed,
        })
    }

    /// The pooler's (role, primary_term), once it reported on this link.
    pub fn reported_role(&self) -> Option<(Role, u64)> {
        self.reported
            .get()
            .then(|| (self.role.get(), self.primary_term.get()))
    }

    pub fn register(self: &Rc<Self>, id: u32, io: Rc<SessionIo>) {
        *io.link.borrow_mut() = Some(self.clone());
        self.sessions.borrow_mut().insert(id, io);
    }

    pub fn unregister(&self, id: u32) {
        if let Some(io) = self.sessions.borrow_mut().remove(&id) {
            io.link.borrow_mut().take();
        }
    }

    pub fn send(&self, kind: u8, session: u32, payload: &[u8]) {
        self.out.push_with(|b| {
            put_header(b, kind, session, payload.len());
            b.extend_from_slice(payload);
        });
    }

    /// Keeps this link connected to the pooler for the life of the process.
    pub async fn maintain(self: Rc<Self>, addr: String) {
        let mut backoff = Duration::from_millis(20);
        loop {
            match TcpStream::connect(addr.as_str()).await {
                Ok(stream) => {
                    backoff = Duration::from_millis(20);
                    let _ = stream.set_nodelay(true);
                    self.serve(stream).await;
                    if self.misplaced.replace(false) {
                        continue;
                    }
                    tracing::warn!(pooler = %addr, "link to pooler lost; redialling");
                }
                Err(e) => {
                    tracing::debug!(pooler = %addr, error = %e, "pooler not reachable");
                }
            }
            glommio::timer::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    async fn serve(self: &Rc<Self>, stream: TcpStream) {
        let stream = RcStream::new(stream);
        // Whatever was queued for a dead connection is meaningless to a new one.
        self.out.reset();
        let mut hello = Vec::new();
        link::put_frame(&mut hello, up::HELLO, 0, &link::VERSION.to_be_bytes());
        self.out.push(&hello);
        let me = self.clone();
        let wstream = stream.clone();
        // Dropping this task (below) cancels it, so two writers never drain one queue.
        let writer = glommio::spawn_local(async move { me.out.run_writer(wstream).await });
        self.alive.set(true);
        self.up_notify.notify();
        self.changed.notify();
        let mut rstream = stream;
        let mut reader = MessageReader::new(64 * 1024);
        loop {
            while let Some(h) = link::parse_header(reader.data()) {
                if reader.data().len() < HEADER + h.len {
                    break;
                }
                let payload = &reader.data()[HEADER..HEADER + h.len];
                self.on_frame(h.kind, h.session, payload);
                reader.consume(HEADER + h.len);
            }
            if self.out.is_dead() || self.misplaced.get() {
                break;
            }
            let want = link::parse_header(reader.data()).map_or(0, |h| HEADER + h.len);
            match reader.fill(&mut rstream, want).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        self.alive.set(false);
        self.role.set(Role::Down);
        self.reported.set(false);
        drop(writer);
        let mut e = Vec::new();
        be::error_response(
            &mut e,
            Severity::Fatal,
            "08006",
            "terminating connection: the gateway lost its link to the pooler",
        );
        let sessions: Vec<Rc<SessionIo>> =
            self.sessions.borrow_mut().drain().map(|(_, s)| s).collect();
        for s in sessions {
            s.link_lost(&e);
        }
        self.changed.notify();
    }

    fn on_frame(&self, kind: u8, id: u32, payload: &[u8]) {
        if kind == down::ROLE {
            self.on_role(payload);
            return;
        }
        if kind == down::CORE {
            self.on_core(payload);
            return;
        }
        let Some(s) = self.sessions.borrow().get(&id).cloned() else {
            return;
        };
        match kind {
            down::DATA => s.on_data(payload),
            down::SETTINGS => {
                if let Ok(set) = Settings::decode(payload) {
                    *s.settings.borrow_mut() = set;
                }
            }
            down::CLOSED => {
                self.unregister(id);
                s.end(Some(payload));
            }
            down::AUTH_INFO | down::OPENED | down::OPEN_FAILED => {
                s.control.put((kind, payload.to_vec()))
            }
            _ => tracing::warn!(kind, "unknown frame from pooler"),
        }
    }

    /// The pooler core this link reached: redial if it is not the one for this link's slot
    /// (only while no session uses the link yet).
    fn on_core(&self, payload: &[u8]) {
        let [a, b, c, d, ..] = *payload else {
            tracing::warn!(len = payload.len(), "malformed CORE frame from pooler");
            return;
        };
        let (core, cores) = (
            u16::from_be_bytes([a, b]) as usize,
            u16::from_be_bytes([c, d]) as usize,
        );
        if cores == 0 || core == self.slot % cores || !self.sessions.borrow().is_empty() {
            return;
        }
        let left = self.redials_left.get();
        if left > 0 {
            self.redials_left.set(left - 1);
            self.misplaced.set(true);
        }
    }

    fn on_role(&self, payload: &[u8]) {
        // `u8 role`, `u64 primary_term`, then (newer poolers) `u64 lsn`.
        let Some((&role, rest)) = payload.split_first() else {
            tracing::warn!("short ROLE frame from pooler");
            return;
        };
        let Some(Ok(term)) = rest.get(..8).map(<[u8; 8]>::try_from) else {
            tracing::warn!(len = payload.len(), "malformed ROLE frame from pooler");
            return;
        };
        let lsn = rest
            .get(8..16)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0);
        self.lsn.set(lsn);
        let role = Role::from_u8(role);
        let term = u64::from_be_bytes(term);
        if self.role.get() != role || self.primary_term.get() != term {
            tracing::info!(
                pooler = self.pooler,
                role = role.name(),
                term,
                "pooler role"
            );
        }
        self.role.set(role);
        self.primary_term.set(term);
        self.reported.set(true);
        self.changed.notify();
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
