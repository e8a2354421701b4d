//! The gateway's end of its links to the poolers: a few per core per pooler, each shared by many
//! sessions. A link that drops is redialled. Each link carries its pooler's role reports
//! (`down::ROLE`); the sessions it carried are told it was lost and decide what that means for
//! them (see `session_io.rs` and `failover.rs`). A link knows its sessions only as
//! [`Endpoint`]s.
//!
//! A link is used only once the pooler proved it holds the cluster's link secret and the
//! gateway proved it back (`shared::link::handshake`): sessions' SCRAM keys go only to a
//! pooler of this cluster.
//!
//! With `link_tls_ca` the link is TLS (rustls): the pooler's certificate must chain to that CA
//! and name the host or address dialled, and the handshake above runs inside. The link is the
//! hot path: [`Link::serve`] is generic over the stream, so a plain link runs the code it ran
//! before TLS existed (a `TcpStream`, no dispatch per read or write) and a TLS link its own
//! instance.

use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use shared::agent::Role;
use shared::io::{Broadcast, MessageReader, Notify, OutQueue, RcStream};
use shared::link::{self, down, handshake, put_header, up, LinkKey, HEADER};
use shared::protocol::backend::{self as be, Severity};
use shared::settings::Settings;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

/// What a link delivers to a session registered on it.
pub trait Endpoint {
    /// The session is registered on `link` (`Some`) or left it (`None`).
    fn attach(&self, link: Option<Rc<Link>>);
    /// Backend messages for the client (a frame may cut them anywhere).
    fn on_data(&self, data: &[u8]);
    /// A whole `NoticeResponse` that may be a signal the server allowed (`down::SIGNAL`).
    fn on_signal(&self, msg: &[u8]);
    /// The session's settings as the pooler last read them.
    fn on_settings(&self, settings: Settings);
    /// A startup reply: `AUTH_INFO`, `OPENED` or `OPEN_FAILED`.
    fn on_control(&self, kind: u8, payload: Vec<u8>);
    /// The pooler ended the session, with these last words for the client.
    fn closed(&self, last_words: &[u8]);
    /// The link died under the session (`fatal`: what to tell a client still logging in).
    fn link_lost(&self, fatal: &[u8]);
    /// The pooler took `taken` bytes of the session's requests so far (`down::ACK`).
    fn on_ack(&self, taken: u64);
}

pub struct Link {
    pub out: OutQueue,
    sessions: RefCell<HashMap<u32, Rc<dyn Endpoint>>>,
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
    changed: Rc<Broadcast>,
    /// Which of the pooler's cores this link should land on: `slot % cores` (see `down::CORE`).
    slot: usize,
    /// The link landed on another core: redial it (at most `redials_left` more times).
    misplaced: Cell<bool>,
    redials_left: Cell<u32>,
    /// The cluster's link secret, proved both ways before the link is used.
    key: LinkKey,
    /// TLS to the pooler (`link_tls_ca`); `None`: plain TCP.
    tls: Option<futures_rustls::TlsConnector>,
}

/// A cancel request, or with `terminate` the end of the session (`pg_terminate_backend` of its
/// pid, signals.rs), to the session with these keys wherever it lives: to every pooler, on one
/// live link of each of `links` (a core's, grouped by pooler); a pooler that does not know the
/// keys ignores them.
pub async fn signal(links: &[Vec<Rc<Link>>], pid: i32, secret: i32, terminate: bool) {
    let mut p = Vec::with_capacity(9);
    p.extend_from_slice(&pid.to_be_bytes());
    p.extend_from_slice(&secret.to_be_bytes());
    if terminate {
        p.push(1);
    }
    let mut sent = Vec::new();
    for of_pooler in links {
        if let Some(l) = of_pooler.iter().find(|l| l.alive.get()) {
            l.send(up::CANCEL, 0, &p);
            sent.push(l.clone());
        }
    }
    for l in sent {
        let _ = crate::with_timeout(Duration::from_secs(2), l.out.flushed()).await;
    }
}

/// Redials of one link to reach its pooler core before it settles for the one it got. With
/// `SO_REUSEPORT` each dial lands on a core by hash; 16 misses in a row on 2 cores is 1 in 65,536.
const MAX_REDIALS: u32 = 16;

impl Link {
    /// `slot`: this link's number among all links of the process to this pooler (gateway core
    /// × links per core + link), which picks the pooler core it should reach.
    pub fn new(
        pooler: usize,
        slot: usize,
        changed: Rc<Broadcast>,
        key: LinkKey,
        tls: Option<futures_rustls::TlsConnector>,
    ) -> Rc<Link> {
        Rc::new(Link {
            key,
            tls,
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

    pub fn register(self: &Rc<Self>, id: u32, io: Rc<dyn Endpoint>) {
        io.attach(Some(self.clone()));
        self.sessions.borrow_mut().insert(id, io);
    }

    pub fn unregister(&self, id: u32) {
        let io = self.sessions.borrow_mut().remove(&id);
        if let Some(io) = io {
            io.attach(None);
        }
    }

    pub fn send(&self, kind: u8, session: u32, payload: &[u8]) {
        crate::metrics::link_frame(crate::metrics::SENT, shared::link::HEADER + payload.len());
        self.out.push_with(|b| {
            put_header(b, kind, session, payload.len());
            b.extend_from_slice(payload);
        });
    }

    /// Keeps this link connected to the pooler for the life of the process.
    pub async fn maintain(self: Rc<Self>, addr: String) {
        let mut backoff = Duration::from_millis(20);
        // The name the pooler's certificate must carry: the host or address dialled.
        let name = match (&self.tls, shared::tls::server_name(&addr)) {
            (Some(_), Ok(n)) => Some(n),
            (Some(_), Err(e)) => {
                tracing::error!(pooler = %addr, error = %e, "link TLS: no name to check; this link stays down");
                return;
            }
            (None, _) => None,
        };
        loop {
            match TcpStream::connect(addr.as_str()).await {
                Ok(stream) => {
                    let _ = stream.set_nodelay(true);
                    // Not authenticated: retried with growing backoff (and an error each time).
                    let served = match (&self.tls, &name) {
                        (Some(tls), Some(name)) => {
                            self.serve_tls(tls.clone(), name.clone(), stream, &addr)
                                .await
                        }
                        // The hand-written path stays plain: no TLS type anywhere on it.
                        _ => self.serve(RcStream::new(stream), |s| s).await,
                    };
                    if served {
                        backoff = Duration::from_millis(20);
                        if self.misplaced.replace(false) {
                            continue;
                        }
                        tracing::warn!(pooler = %addr, "link to pooler lost; redialling");
                    }
                }
                Err(e) => {
                    tracing::debug!(pooler = %addr, error = %e, "pooler not reachable");
                }
            }
            glommio::timer::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    /// The handshake, within `handshake::TIMEOUT`: the pooler's challenge, our proof, its proof.
    async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
        &self,
        stream: &mut RcStream<S>,
        reader: &mut MessageReader,
    ) -> Result<(), String> {
        use futures_lite::AsyncWriteExt;
        let exchange = async {
            let (kind, challenge) = handshake::read_frame(reader, stream, handshake::CHALLENGE_LEN)
                .await
                .ok_or("no challenge from the pooler")?;
            let (hello, hs) = handshake::Gateway::answer(&self.key, kind, &challenge)
                .map_err(|e| e.to_string())?;
            stream.write_all(&hello).await.map_err(|e| e.to_string())?;
            let (kind, welcome) = handshake::read_frame(reader, stream, handshake::WELCOME_LEN)
                .await
                .ok_or("the pooler refused this gateway's link secret")?;
            hs.finish(kind, &welcome).map_err(|e| e.to_string())
        };
        let timeout = async {
            glommio::timer::sleep(handshake::TIMEOUT).await;
            Err("no handshake within the timeout".to_string())
        };
        futures_lite::future::or(exchange, timeout).await
    }

    /// TLS to the pooler, within the handshake's timeout, then [`Link::serve`]; `false` when
    /// TLS failed (the certificate is not from the CA or not for `name`: logged, nothing sent).
    async fn serve_tls(
        self: &Rc<Self>,
        tls: futures_rustls::TlsConnector,
        name: futures_rustls::rustls::pki_types::ServerName<'static>,
        stream: TcpStream,
        addr: &str,
    ) -> bool {
        let connecting = async { Some(tls.connect(name, stream).await) };
        let timeout = async {
            glommio::timer::sleep(handshake::TIMEOUT).await;
            None
        };
        match futures_lite::future::or(connecting, timeout).await {
            Some(Ok(s)) => {
                // Each frame write leaves for the socket before it counts as written.
                self.serve(RcStream::new(s), shared::tls::WriteThrough::new)
                    .await
            }
            Some(Err(e)) => {
                tracing::error!(pooler = %addr, error = %e, "link not authenticated: TLS handshake failed");
                false
            }
            None => {
                tracing::error!(pooler = %addr, "link not authenticated: no TLS handshake within the timeout");
                false
            }
        }
    }

    /// Serves one connection until it drops; `false` when the handshake failed. `writer` wraps
    /// the writing half (the identity for plain TCP).
    async fn serve<S, W>(
        self: &Rc<Self>,
        mut stream: RcStream<S>,
        writer: impl FnOnce(RcStream<S>) -> W,
    ) -> bool
    where
        S: AsyncRead + AsyncWrite + Unpin + 'static,
        W: AsyncWrite + Unpin + 'static,
    {
        let mut reader = MessageReader::new(64 * 1024);
        if let Err(e) = self.authenticate(&mut stream, &mut reader).await {
            tracing::error!(pooler = self.pooler, error = %e, "link not authenticated");
            return false;
        }
        // Whatever was queued for a dead connection is meaningless to a new one.
        self.out.reset();
        let me = self.clone();
        let wstream = writer(stream.clone());
        // Dropping this task (below) cancels it, so two writers never drain one queue.
        let writer = glommio::spawn_local(async move { me.out.run_writer(wstream).await });
        self.alive.set(true);
        self.up_notify.notify();
        self.changed.notify();
        let mut rstream = stream;
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
        let sessions: Vec<Rc<dyn Endpoint>> =
            self.sessions.borrow_mut().drain().map(|(_, s)| s).collect();
        for s in sessions {
            s.link_lost(&e);
        }
        self.changed.notify();
        true
    }

    fn on_frame(&self, kind: u8, id: u32, payload: &[u8]) {
        crate::metrics::link_frame(
            crate::metrics::RECEIVED,
            shared::link::HEADER + payload.len(),
        );
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
            down::SIGNAL => s.on_signal(payload),
            down::ACK => {
                if let Some(Ok(b)) = payload.get(..8).map(<[u8; 8]>::try_from) {
                    s.on_ack(u64::from_be_bytes(b));
                }
            }
            down::SETTINGS => {
                if let Ok(set) = Settings::decode(payload) {
                    s.on_settings(set);
                }
            }
            down::CLOSED => {
                self.unregister(id);
                s.closed(payload);
            }
            down::AUTH_INFO | down::OPENED | down::OPEN_FAILED | down::POOLS => {
                s.on_control(kind, payload.to_vec())
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
