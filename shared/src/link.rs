//! The link: a compact framed protocol between a gateway core and a pooler core, multiplexing
//! many client sessions over one socket.
//!
//! Frame: `u8 kind`, `u32 session`, `u32 payload length`, payload. One socket write may carry
//! frames of many sessions. Raw Postgres messages travel inside `MSGS` / `DATA` payloads
//! untouched. Written by hand: this is the hot path and the point is owning the bytes.
//!
//! Before any other frame, both ends prove they hold the cluster's link secret ([`LinkKey`],
//! `DIR/link.key`, a file made like the agent's: see [`handshake`]). A pooler honours nothing
//! from a peer that has not proved it, and a gateway believes nothing from a pooler that has not.

use crate::protocol::{put_cstr, read_cstr, read_i32, ProtocolError};
use crate::settings::Settings;

pub const HEADER: usize = 9;
/// 2: the authenticated handshake (`CHALLENGE`, `HELLO` with a proof, `WELCOME`) and `ACK`.
pub const VERSION: u32 = 2;

/// The link secret: 32 random bytes in a file of 64 hex digits, mode 600, made and checked
/// exactly as the agent's (`crate::agent::auth`), but a different file, so that a gateway
/// (which faces clients) never holds the key that commands node agents.
pub use crate::agent::auth::AgentKey as LinkKey;

/// Gateway → pooler.
pub mod up {
    /// The gateway's answer to `CHALLENGE`: `u32 version`, its nonce `CN` (32 bytes),
    /// `HMAC(K, "tidepool-link/2 gateway" ‖ SN ‖ CN)` (32 bytes). See [`super::handshake`].
    pub const HELLO: u8 = 1;
    /// Look a role up: payload `user` NUL `database` ([`crate::role::lookup_payload`]).
    /// Answered by `AUTH_INFO` for the same session.
    pub const AUTH_LOOKUP: u8 = 2;
    /// Open a session after the gateway authenticated the client (see [`super::Open`]).
    pub const OPEN: u8 = 3;
    /// `u8 flags` + raw frontend messages.
    pub const MSGS: u8 = 4;
    /// The client went away.
    pub const CLOSE: u8 = 5;
    /// `i32 pid`, `i32 secret` (the keys the gateway gave its client): cancel that session's
    /// query. With a further `u8 1`: end that session as `pg_terminate_backend` does (FATAL
    /// 57P01), for a client that signalled the session's pid.
    pub const CANCEL: u8 = 6;
    /// `u32 bytes` the gateway has written to the client: flow control.
    pub const CREDIT: u8 = 7;
    /// Names of custom settings (`x.y`) the next `MSGS` may set, NUL-terminated: Postgres hides
    /// such placeholders from `pg_settings`, so the pooler reads them back by name. A name
    /// ending in `(` is a function the statement calls that is not built-in: the pooler looks
    /// for custom setting names in its body.
    pub const WATCH: u8 = 8;
    /// The next `MSGS` drops, renames or copies (as a template) this database: payload its
    /// name. Postgres refuses while other sessions are connected to it, and the pooler's idle
    /// backends would count: the pooler closes them first (Postgres waits up to 5 s for
    /// closing sessions to go).
    pub const RELEASE_DB: u8 = 9;
    /// Prepared-statement names in the SQL text of the next `MSGS` (SQL `PREPARE`, `EXECUTE`,
    /// `DEALLOCATE`): the pooler replaces them by its backend names, so SQL and protocol-level
    /// statements share one namespace per session. Per name: `u32` offset of the message in
    /// the batch, `u8` kind, `u32` statement index in the text, `u32` start and `u32` end of
    /// the name, `u32` end of its statement, `u32` length and the folded name.
    pub const NAMES: u8 = 10;
    /// The admin console asks for the pooler's pools (no payload; the session id is the
    /// console's). Answered by `down::POOLS` for the same session.
    pub const POOLS: u8 = 11;
    /// Look a role up as `AUTH_LOOKUP` does, past the pooler's cache (`auth_cache_seconds`):
    /// an opened session's memberships, read again when the server allowed a signal its
    /// login-time ones would not (gateway/src/signals.rs). Answered by `AUTH_INFO` for the same
    /// session.
    pub const AUTH_RECHECK: u8 = 12;
}

/// Pooler → gateway.
pub mod down {
    /// `u8 1` then an encoded [`crate::role::RoleInfo`] (empty: no such role), or `u8 2` then
    /// why the lookup failed.
    pub const AUTH_INFO: u8 = 20;
    /// Raw `ParameterStatus` messages for the client.
    pub const OPENED: u8 = 21;
    /// A raw `ErrorResponse` (FATAL) for the client; the session is gone.
    pub const OPEN_FAILED: u8 = 22;
    /// Raw backend messages for the client.
    pub const DATA: u8 = 23;
    /// The session's settings changed: an encoded [`crate::settings::Settings`].
    pub const SETTINGS: u8 = 24;
    /// The pooler dropped the session: a raw `ErrorResponse` to send before closing.
    pub const CLOSED: u8 = 25;
    /// The pooler's node changed role (session 0): `u8 role` ([`crate::agent::Role::to_u8`]),
    /// `u64 primary_term`, `u64 lsn` (primary: flushed WAL position; streaming standby:
    /// replayed position; 0 unknown). Sent once after `HELLO` and again on every change
    /// (at most every 50 ms); gateways route writes to the primary of the highest term and
    /// read-only sessions to standbys within `max_standby_lag_bytes`.
    pub const ROLE: u8 = 26;
    /// Which pooler core serves this link (session 0): `u16 core`, `u16 cores`. Sent once, in
    /// answer to `HELLO`, before the first `ROLE`. A gateway redials a link that landed on a
    /// core its other links already use (`SO_REUSEPORT` picks the core by hash), so that its
    /// sessions, and the pooler's work, spread over every pooler core.
    pub const CORE: u8 = 27;
    /// The pooler's first frame on every connection (session 0): `u32 version`, its nonce
    /// `SN` (32 bytes). All a peer gets before it proves it holds the link secret.
    pub const CHALLENGE: u8 = 28;
    /// The pooler's proof, once the gateway's `HELLO` checked (session 0):
    /// `HMAC(K, "tidepool-link/2 pooler" ‖ SN ‖ CN)`. Then `CORE` and `ROLE`.
    pub const WELCOME: u8 = 29;
    /// Request bytes of a session the pooler has taken from its inbox (`u64`, the total of
    /// `MSGS` payload lengths since `OPEN`): per-session flow control of requests. The gateway
    /// stops reading a client whose requests the pooler has not taken beyond a window, so one
    /// session never makes the pooler stop reading the link all sessions share. Sent every
    /// `ACK_EVERY` bytes taken.
    pub const ACK: u8 = 30;
    /// Answer to `up::POOLS`: [`PoolFacts`] encoded (the pooler's pools on all its cores).
    pub const POOLS: u8 = 31;
    /// A raw `NoticeResponse` of Postgres's `pg_signal_backend()` for a negative pid
    /// ([`crate::protocol::backend::signal_marker`]), in its place among the session's `DATA`:
    /// the server allowed a signal the gateway asked it to check (gateway/src/signals.rs). The
    /// gateway sends that signal, or passes the notice on to the client if it asked for none.
    pub const SIGNAL: u8 = 32;
}

/// Request bytes (`MSGS` payloads) a gateway may have sent for a session and the pooler not
/// yet taken from that session's inbox (`down::ACK`). The pooler's inbox then holds at most
/// this plus one batch; a gateway that sends past twice this loses the session.
pub const REQUEST_WINDOW: u64 = 1 << 20;
/// The pooler acknowledges taken request bytes in steps of this (well under the window, so a
/// session that has sent a full window always has acknowledgements coming).
pub const ACK_EVERY: u64 = 64 * 1024;

/// Flags on a `MSGS` frame, decided by the gateway's statement classification.
pub mod flags {
    /// A statement here may change session settings: snapshot them when the transaction ends.
    pub const SNAPSHOT: u8 = 1;
    /// A statement here creates session state that lives on the backend (temp table, WITH HOLD
    /// cursor, advisory lock, SQL PREPARE): keep the backend for this session.
    pub const PIN: u8 = 2;
    /// `DISCARD ALL`: the session's prepared statements and settings are gone and the session
    /// is no longer pinned.
    pub const DISCARD: u8 = 4;
    /// `DEALLOCATE ALL`: the session's prepared statements are gone.
    pub const DEALLOCATE: u8 = 8;
    /// `LISTEN`/`UNLISTEN`/`DISCARD ALL` (or text that may run one): when the transaction ends,
    /// read the backend's channels back; the pooler's shared listener then serves the session
    /// (no pinning, see docs/decisions/2026-11-21-listen-fanout.md).
    pub const LISTEN: u8 = 16;
    /// `NOTIFY`/`pg_notify`: a session that listens hears its own notification before the
    /// `ReadyForQuery` that ends the transaction, as from Postgres.
    pub const NOTIFY: u8 = 32;
    /// The statement uses the backend's sequence state. With `PIN` (`currval`, `lastval`): that
    /// state lives in the backend and cannot be copied, and the first such statement clears
    /// what another session left on the backend it lands on. Alone (`nextval`, `setval`): the
    /// session keeps its backend until its next request, briefly.
    pub const SEQUENCES: u8 = 64;
}

/// Appends a frame header; the caller appends `len` payload bytes.
#[inline]
pub fn put_header(out: &mut Vec<u8>, kind: u8, session: u32, len: usize) {
    out.push(kind);
    out.extend_from_slice(&session.to_be_bytes());
    out.extend_from_slice(&(len as u32).to_be_bytes());
}

#[inline]
pub fn put_frame(out: &mut Vec<u8>, kind: u8, session: u32, payload: &[u8]) {
    put_header(out, kind, session, payload.len());
    out.extend_from_slice(payload);
}

/// Counts the frames in a byte stream of frames as it goes by in pieces of any size (what a
/// socket accepted of a write): one header read per frame, payloads skipped.
#[derive(Debug, Default)]
pub struct FrameCounter {
    /// Payload bytes of the current frame still to come.
    left: usize,
    /// A header split between two pieces: its bytes so far.
    head: [u8; HEADER],
    have: usize,
}

impl FrameCounter {
    /// Frames whose header is complete in `bytes` (the next piece of the stream).
    pub fn feed(&mut self, mut bytes: &[u8]) -> u64 {
        let mut frames = 0;
        while !bytes.is_empty() {
            if self.left > 0 {
                let skip = self.left.min(bytes.len());
                self.left -= skip;
                bytes = &bytes[skip..];
                continue;
            }
            let take = (HEADER - self.have).min(bytes.len());
            self.head[self.have..self.have + take].copy_from_slice(&bytes[..take]);
            self.have += take;
            bytes = &bytes[take..];
            if self.have == HEADER {
                self.have = 0;
                frames += 1;
                self.left = parse_header(&self.head).map_or(0, |h| h.len);
            }
        }
        frames
    }
}

/// A frame header parsed from the start of a buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: u8,
    pub session: u32,
    pub len: usize,
}

#[inline]
pub fn parse_header(buf: &[u8]) -> Option<Header> {
    if buf.len() < HEADER {
        return None;
    }
    Some(Header {
        kind: buf[0],
        session: u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]),
        len: u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) as usize,
    })
}

/// How the pooler logs in to Postgres as this session's role.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credential {
    /// `trust` (or whatever Postgres lets in without a password).
    None,
    /// SCRAM-SHA-256 with keys learned during the client's exchange.
    Scram {
        client_key: [u8; 32],
        server_key: [u8; 32],
    },
    /// md5 from the stored `md5…` hash.
    Md5 { stored: String },
}

/// `OPEN` payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    pub user: String,
    pub database: String,
    pub pid: i32,
    pub secret: i32,
    pub credential: Credential,
    /// Settings from the startup packet (and `options`): the session's baseline.
    pub settings: Settings,
}

impl Open {
    pub fn encode(&self, out: &mut Vec<u8>) {
        put_cstr(out, self.user.as_bytes());
        put_cstr(out, self.database.as_bytes());
        out.extend_from_slice(&self.pid.to_be_bytes());
        out.extend_from_slice(&self.secret.to_be_bytes());
        match &self.credential {
            Credential::None => out.push(0),
            Credential::Scram {
                client_key,
                server_key,
            } => {
                out.push(1);
                out.extend_from_slice(client_key);
                out.extend_from_slice(server_key);
            }
            Credential::Md5 { stored } => {
                out.push(2);
                put_cstr(out, stored.as_bytes());
            }
        }
        self.settings.encode(out);
    }

    pub fn decode(buf: &[u8]) -> Result<Open, ProtocolError> {
        let mut pos = 0;
        let user = utf8(read_cstr(buf, &mut pos)?)?;
        let database = utf8(read_cstr(buf, &mut pos)?)?;
        let pid = read_i32(buf, &mut pos)?;
        let secret = read_i32(buf, &mut pos)?;
        let kind = *buf.get(pos).ok_or(ProtocolError::Malformed("open"))?;
        pos += 1;
        let credential = match kind {
            0 => Credential::None,
            1 => {
                let keys = buf
                    .get(pos..pos + 64)
                    .ok_or(ProtocolError::Malformed("open keys"))?;
                pos += 64;
                let mut client_key = [0; 32];
                let mut server_key = [0; 32];
                client_key.copy_from_slice(&keys[..32]);
                server_key.copy_from_slice(&keys[32..]);
                Credential::Scram {
                    client_key,
                    server_key,
                }
            }
            2 => Credential::Md5 {
                stored: utf8(read_cstr(buf, &mut pos)?)?,
            },
            _ => return Err(ProtocolError::Malformed("open credential")),
        };
        let settings = Settings::decode(&buf[pos..])?;
        Ok(Open {
            user,
            database,
            pid,
            secret,
            credential,
            settings,
        })
    }
}

/// What a pooler knows of its pools (all cores), for the gateway's admin console: `down::POOLS`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolFacts {
    /// Backends each (user, database) may have, and all of them together.
    pub pool_size: u32,
    pub max_backends: u32,
    pub pools: Vec<PoolFact>,
    /// Every backend, for SHOW SERVERS. Encoded after the pools: a payload that ends before
    /// them (an older pooler's) decodes with none.
    pub servers: Vec<ServerFact>,
}

/// One real backend of a pooler, as SHOW SERVERS lists it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServerFact {
    /// Unique within the pooler while the backend lives.
    pub id: u64,
    pub user: String,
    pub database: String,
    /// [`server_state`].
    pub state: u8,
    /// Postgres's address and the pooler's end of the connection (`None`: a Unix socket).
    pub addr: Option<std::net::SocketAddr>,
    pub local: Option<std::net::SocketAddr>,
    /// Unix microseconds: login, and when a session last took it.
    pub connect_time: u64,
    pub request_time: u64,
    /// The pid of the backend in Postgres (`pg_stat_activity.pid`).
    pub pid: i32,
    /// The pid (as its client knows it: `BackendKeyData`) of the session holding it; 0: none.
    pub link: i32,
    /// Past `server_lifetime`: closed when it is next released.
    pub close_needed: bool,
    pub tls: bool,
}

/// A backend's state in [`ServerFact::state`], PgBouncer's words.
pub mod server_state {
    /// Held by a session.
    pub const ACTIVE: u8 = 0;
    /// In the pool, free.
    pub const IDLE: u8 = 1;
}

/// One (user, database) on a pooler.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PoolFact {
    pub user: String,
    pub database: String,
    /// Backends connected or connecting.
    pub backends: u32,
    /// Of those, idle in the pool (the rest serve a session or are logging in).
    pub idle: u32,
    /// Sessions waiting for a backend now.
    pub waiting: u32,
    /// Microseconds sessions have waited for a backend, in all.
    pub waited_us: u64,
}

impl PoolFacts {
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.pool_size.to_be_bytes());
        out.extend_from_slice(&self.max_backends.to_be_bytes());
        out.extend_from_slice(&(self.pools.len() as u32).to_be_bytes());
        for p in &self.pools {
            put_cstr(out, p.user.as_bytes());
            put_cstr(out, p.database.as_bytes());
            out.extend_from_slice(&p.backends.to_be_bytes());
            out.extend_from_slice(&p.idle.to_be_bytes());
            out.extend_from_slice(&p.waiting.to_be_bytes());
            out.extend_from_slice(&p.waited_us.to_be_bytes());
        }
        out.extend_from_slice(&(self.servers.len() as u32).to_be_bytes());
        for s in &self.servers {
            out.extend_from_slice(&s.id.to_be_bytes());
            put_cstr(out, s.user.as_bytes());
            put_cstr(out, s.database.as_bytes());
            out.push(s.state);
            put_addr(out, s.addr);
            put_addr(out, s.local);
            out.extend_from_slice(&s.connect_time.to_be_bytes());
            out.extend_from_slice(&s.request_time.to_be_bytes());
            out.extend_from_slice(&s.pid.to_be_bytes());
            out.extend_from_slice(&s.link.to_be_bytes());
            out.push(u8::from(s.close_needed) | u8::from(s.tls) << 1);
        }
    }

    pub fn decode(buf: &[u8]) -> Result<PoolFacts, ProtocolError> {
        let mut pos = 0;
        let u32_at = |pos: &mut usize| -> Result<u32, ProtocolError> {
            read_i32(buf, pos).map(|v| v as u32)
        };
        let pool_size = u32_at(&mut pos)?;
        let max_backends = u32_at(&mut pos)?;
        let n = u32_at(&mut pos)?;
        // Each pool takes at least 26 bytes: a count larger than the payload is a lie.
        if n as usize > buf.len() / 26 + 1 {
            return Err(ProtocolError::Malformed("pool facts count"));
        }
        let mut pools = Vec::with_capacity(n as usize);
        for _ in 0..n {
            let user = utf8(read_cstr(buf, &mut pos)?)?;
            let database = utf8(read_cstr(buf, &mut pos)?)?;
            let backends = u32_at(&mut pos)?;
            let idle = u32_at(&mut pos)?;
            let waiting = u32_at(&mut pos)?;
            let hi = u32_at(&mut pos)? as u64;
            let lo = u32_at(&mut pos)? as u64;
            pools.push(PoolFact {
                user,
                database,
                backends,
                idle,
                waiting,
                waited_us: hi << 32 | lo,
            });
        }
        let mut servers = Vec::new();
        if pos < buf.len() {
            let n = u32_at(&mut pos)?;
            // Each server takes at least 38 bytes: a count larger than the payload is a lie.
            if n as usize > buf.len() / 38 + 1 {
                return Err(ProtocolError::Malformed("server facts count"));
            }
            servers.reserve(n as usize);
            let u64_at = |pos: &mut usize| -> Result<u64, ProtocolError> {
                Ok((u32_at(pos)? as u64) << 32 | u32_at(pos)? as u64)
            };
            let byte = |pos: &mut usize| -> Result<u8, ProtocolError> {
                let b = *buf
                    .get(*pos)
                    .ok_or(ProtocolError::Malformed("server facts"))?;
                *pos += 1;
                Ok(b)
            };
            for _ in 0..n {
                let id = u64_at(&mut pos)?;
                let user = utf8(read_cstr(buf, &mut pos)?)?;
                let database = utf8(read_cstr(buf, &mut pos)?)?;
                let state = byte(&mut pos)?;
                let addr = read_addr(buf, &mut pos)?;
                let local = read_addr(buf, &mut pos)?;
                let connect_time = u64_at(&mut pos)?;
                let request_time = u64_at(&mut pos)?;
                let pid = read_i32(buf, &mut pos)?;
                let link = read_i32(buf, &mut pos)?;
                let flags = byte(&mut pos)?;
                servers.push(ServerFact {
                    id,
                    user,
                    database,
                    state,
                    addr,
                    local,
                    connect_time,
                    request_time,
                    pid,
                    link,
                    close_needed: flags & 1 != 0,
                    tls: flags & 2 != 0,
                });
            }
        }
        if pos != buf.len() {
            return Err(ProtocolError::Malformed("pool facts: trailing bytes"));
        }
        Ok(PoolFacts {
            pool_size,
            max_backends,
            pools,
            servers,
        })
    }
}

/// A socket address: 0 (none), 4 + IPv4 + port, or 6 + IPv6 + port.
fn put_addr(out: &mut Vec<u8>, a: Option<std::net::SocketAddr>) {
    match a {
        None => out.push(0),
        Some(std::net::SocketAddr::V4(a)) => {
            out.push(4);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
        Some(std::net::SocketAddr::V6(a)) => {
            out.push(6);
            out.extend_from_slice(&a.ip().octets());
            out.extend_from_slice(&a.port().to_be_bytes());
        }
    }
}

fn read_addr(buf: &[u8], pos: &mut usize) -> Result<Option<std::net::SocketAddr>, ProtocolError> {
    let bad = || ProtocolError::Malformed("socket address");
    let kind = *buf.get(*pos).ok_or_else(bad)?;
    let len = match kind {
        0 => 0,
        4 => 4,
        6 => 16,
        _ => return Err(bad()),
    };
    let b = buf
        .get(*pos + 1..*pos + 1 + len + 2 * usize::from(len > 0))
        .ok_or_else(bad)?;
    *pos += 1 + b.len();
    Ok(match kind {
        4 => {
            let ip: [u8; 4] = [b[0], b[1], b[2], b[3]];
            Some((ip, u16::from_be_bytes([b[4], b[5]])).into())
        }
        6 => {
            let mut ip = [0u8; 16];
            ip.copy_from_slice(&b[..16]);
            Some((ip, u16::from_be_bytes([b[16], b[17]])).into())
        }
        _ => None,
    })
}

/// The link's mutual authentication: a challenge-response with HMAC-SHA-256 under the link
/// secret, in both directions, before any other frame.
///
/// ```text
/// pooler  → gateway  CHALLENGE  version, SN                      (all an unauthenticated peer gets)
/// gateway → pooler   HELLO      version, CN, HMAC(K, "…gateway" SN CN)
/// pooler  → gateway  WELCOME    HMAC(K, "…pooler" SN CN)          (or the connection closes)
/// ```
///
/// Fresh nonces on both sides: a recorded exchange cannot be replayed. Distinct labels per
/// direction (and from the agent's): one side's proof is never the other's. The pooler checks
/// the gateway's proof before it answers anything else (`AUTH_LOOKUP`, `OPEN`, `ROLE`...); the
/// gateway checks the pooler's before it sends a session over the link (a pooler without the
/// key would otherwise be handed SCRAM client keys in `OPEN`). Frames after the handshake
/// carry no MAC and nothing is encrypted: see docs/security.md.
pub mod handshake {
    use super::{down, put_frame, up, LinkKey, VERSION};
    use crate::agent::auth::{mac, nonce, same};

    pub const NONCE: usize = 32;
    pub const CHALLENGE_LEN: usize = 4 + NONCE;
    pub const HELLO_LEN: usize = 4 + NONCE + 32;
    pub const WELCOME_LEN: usize = 32;
    /// The whole handshake must be done within this, or the connection is closed.
    pub const TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

    const GATEWAY: &[u8] = b"tidepool-link/2 gateway";
    const POOLER: &[u8] = b"tidepool-link/2 pooler";

    #[derive(Debug, thiserror::Error, PartialEq, Eq)]
    pub enum Error {
        #[error("link authentication failed (not the cluster's link secret)")]
        Failed,
        #[error("link protocol version {0}, expected {VERSION}")]
        Version(u32),
        #[error("malformed link handshake frame")]
        Malformed,
    }

    /// Reads one whole frame of at most `max` payload bytes during the handshake (`None`: end
    /// of stream, an error, or a larger frame).
    pub async fn read_frame<R: futures_lite::AsyncRead + Unpin>(
        reader: &mut crate::io::MessageReader,
        r: &mut R,
        max: usize,
    ) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some(h) = super::parse_header(reader.data()) {
                if h.len > max {
                    return None;
                }
                if reader.data().len() >= super::HEADER + h.len {
                    let payload = reader.data()[super::HEADER..super::HEADER + h.len].to_vec();
                    reader.consume(super::HEADER + h.len);
                    return Some((h.kind, payload));
                }
            }
            match reader.fill(r, 0).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    fn version(p: &[u8]) -> Result<u32, Error> {
        let v = u32::from_be_bytes(p.get(..4).ok_or(Error::Malformed)?.try_into().unwrap());
        if v != VERSION {
            return Err(Error::Version(v));
        }
        Ok(v)
    }

    /// The pooler's half.
    pub struct Pooler {
        key: LinkKey,
        nonce: [u8; NONCE],
    }

    impl Pooler {
        pub fn new(key: &LinkKey) -> Pooler {
            Pooler {
                key: key.clone(),
                nonce: nonce(),
            }
        }

        /// The `CHALLENGE` frame, sent on accept.
        pub fn challenge(&self) -> Vec<u8> {
            let mut p = Vec::with_capacity(CHALLENGE_LEN);
            p.extend_from_slice(&VERSION.to_be_bytes());
            p.extend_from_slice(&self.nonce);
            let mut out = Vec::new();
            put_frame(&mut out, down::CHALLENGE, 0, &p);
            out
        }

        /// Checks a `HELLO` (kind and payload of the first frame received), in constant time;
        /// on success the `WELCOME` frame to send.
        pub fn verify(&self, kind: u8, payload: &[u8]) -> Result<Vec<u8>, Error> {
            if kind != up::HELLO || payload.len() != HELLO_LEN {
                return Err(Error::Malformed);
            }
            version(payload)?;
            let cn = &payload[4..4 + NONCE];
            let want = mac(&self.key.0, &[GATEWAY, &self.nonce, cn]);
            if !same(&want, &payload[4 + NONCE..]) {
                return Err(Error::Failed);
            }
            let proof = mac(&self.key.0, &[POOLER, &self.nonce, cn]);
            let mut out = Vec::new();
            put_frame(&mut out, down::WELCOME, 0, &proof);
            Ok(out)
        }
    }

    /// The gateway's half, once it answered a challenge.
    pub struct Gateway {
        key: LinkKey,
        pooler_nonce: [u8; NONCE],
        nonce: [u8; NONCE],
    }

    impl Gateway {
        /// The `HELLO` frame answering a `CHALLENGE` (kind and payload of the first frame).
        pub fn answer(
            key: &LinkKey,
            kind: u8,
            challenge: &[u8],
        ) -> Result<(Vec<u8>, Gateway), Error> {
            if kind != down::CHALLENGE {
                return Err(Error::Malformed);
            }
            version(challenge)?;
            let sn: [u8; NONCE] = challenge
                .get(4..)
                .and_then(|n| n.try_into().ok())
                .ok_or(Error::Malformed)?;
            let g = Gateway {
                key: key.clone(),
                pooler_nonce: sn,
                nonce: nonce(),
            };
            let proof = mac(&g.key.0, &[GATEWAY, &g.pooler_nonce, &g.nonce]);
            let mut p = Vec::with_capacity(HELLO_LEN);
            p.extend_from_slice(&VERSION.to_be_bytes());
            p.extend_from_slice(&g.nonce);
            p.extend_from_slice(&proof);
            let mut out = Vec::new();
            put_frame(&mut out, up::HELLO, 0, &p);
            Ok((out, g))
        }

        /// Checks the pooler's `WELCOME`: a pooler without the key is not believed.
        pub fn finish(&self, kind: u8, payload: &[u8]) -> Result<(), Error> {
            if kind != down::WELCOME || payload.len() != WELCOME_LEN {
                return Err(Error::Malformed);
            }
            let want = mac(&self.key.0, &[POOLER, &self.pooler_nonce, &self.nonce]);
            if !same(&want, payload) {
                return Err(Error::Failed);
            }
            Ok(())
        }
    }
}

pub(crate) fn utf8(b: &[u8]) -> Result<String, ProtocolError> {
    String::from_utf8(b.to_vec()).map_err(|_| ProtocolError::Malformed("not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_counted_across_pieces_of_any_size() {
        let mut stream = Vec::new();
        put_frame(&mut stream, down::DATA, 1, b"hello");
        put_frame(&mut stream, down::ACK, 2, &[]);
        put_frame(&mut stream, down::DATA, 3, &[7; 300]);
        for piece in [1, 2, 5, 9, 10, 64, stream.len()] {
            let mut c = FrameCounter::default();
            let n: u64 = stream.chunks(piece).map(|p| c.feed(p)).sum();
            assert_eq!(n, 3, "pieces of {piece}");
            assert_eq!((c.left, c.have), (0, 0));
        }
        let mut c = FrameCounter::default();
        assert_eq!(c.feed(&stream[..HEADER + 2]), 1);
        assert_eq!(c.feed(&stream[HEADER + 2..]), 2);
    }

    #[test]
    fn pool_facts_round_trip_and_lies_refused() {
        let facts = PoolFacts {
            pool_size: 20,
            max_backends: 100,
            pools: vec![PoolFact {
                user: "alice".into(),
                database: "app".into(),
                backends: 3,
                idle: 1,
                waiting: 2,
                waited_us: (7 << 32) + 5,
            }],
            servers: vec![
                ServerFact {
                    id: 1 << 40 | 3,
                    user: "alice".into(),
                    database: "app".into(),
                    state: server_state::IDLE,
                    addr: Some("127.0.0.1:5432".parse().unwrap()),
                    local: Some("[::1]:40000".parse().unwrap()),
                    connect_time: 1_700_000_000_000_000,
                    request_time: 1_700_000_000_000_001,
                    pid: 4242,
                    link: -7,
                    close_needed: true,
                    tls: false,
                },
                ServerFact {
                    addr: None,
                    local: None,
                    tls: true,
                    ..ServerFact::default()
                },
            ],
        };
        let mut b = Vec::new();
        facts.encode(&mut b);
        assert_eq!(PoolFacts::decode(&b).unwrap(), facts);
        // An older pooler's payload: the pools alone, no servers.
        let old = PoolFacts {
            servers: vec![],
            ..facts.clone()
        };
        let mut pools_only = Vec::new();
        old.encode(&mut pools_only);
        pools_only.truncate(pools_only.len() - 4);
        assert_eq!(PoolFacts::decode(&pools_only).unwrap(), old);
        // Any other truncation is refused, and so is a byte more.
        for end in 12..b.len() {
            if end != pools_only.len() {
                assert!(PoolFacts::decode(&b[..end]).is_err(), "cut at {end}");
            }
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(PoolFacts::decode(&longer).is_err());
        let mut lie = b.clone();
        lie[8..12].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(PoolFacts::decode(&lie).is_err());
        let mut lie = b.clone();
        lie[pools_only.len()..pools_only.len() + 4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(PoolFacts::decode(&lie).is_err());
    }

    #[test]
    fn open_round_trip() {
        let open = Open {
            user: "alice".into(),
            database: "app".into(),
            pid: 42,
            secret: -7,
            credential: Credential::Scram {
                client_key: [1; 32],
                server_key: [2; 32],
            },
            settings: Settings::from_pairs([("application_name", "x"), ("TimeZone", "UTC")]),
        };
        let mut buf = Vec::new();
        open.encode(&mut buf);
        assert_eq!(Open::decode(&buf).unwrap(), open);
        for cut in 0..buf.len() {
            let _ = Open::decode(&buf[..cut]);
        }
    }

    fn frame(b: &[u8]) -> (u8, &[u8]) {
        let h = parse_header(b).unwrap();
        assert_eq!(b.len(), HEADER + h.len);
        (h.kind, &b[HEADER..])
    }

    #[test]
    fn handshake_both_ways() {
        let k = LinkKey::generate();
        let p = handshake::Pooler::new(&k);
        let ch = p.challenge();
        let (kind, pl) = frame(&ch);
        let (hello, g) = handshake::Gateway::answer(&k, kind, pl).unwrap();
        let (kind, pl) = frame(&hello);
        let welcome = p.verify(kind, pl).unwrap();
        let (kind, pl) = frame(&welcome);
        g.finish(kind, pl).unwrap();
        // Replayed to another pooler (another nonce): refused.
        let p2 = handshake::Pooler::new(&k);
        let (kind, pl) = frame(&hello);
        assert_eq!(p2.verify(kind, pl), Err(handshake::Error::Failed));
        // The pooler's proof sent back as the gateway's: refused (distinct labels).
        let mut reflected = hello.clone();
        let n = reflected.len();
        reflected[n - 32..].copy_from_slice(&welcome[HEADER..]);
        let (kind, pl) = frame(&reflected);
        assert_eq!(p.verify(kind, pl), Err(handshake::Error::Failed));
    }

    #[test]
    fn handshake_refuses_wrong_keys_and_versions() {
        let p = handshake::Pooler::new(&LinkKey::generate());
        let ch = p.challenge();
        let (kind, pl) = frame(&ch);
        let (hello, _) = handshake::Gateway::answer(&LinkKey::generate(), kind, pl).unwrap();
        let (kind, pl) = frame(&hello);
        assert_eq!(p.verify(kind, pl), Err(handshake::Error::Failed));
        // A version 1 HELLO (just `u32 1`), or anything else first: refused.
        assert!(p.verify(up::HELLO, &1u32.to_be_bytes()).is_err());
        assert!(p.verify(up::AUTH_LOOKUP, b"postgres\0").is_err());
        // A pooler without the key is not believed by the gateway.
        let k = LinkKey::generate();
        let fake = handshake::Pooler::new(&LinkKey::generate());
        let ch = fake.challenge();
        let (kind, pl) = frame(&ch);
        let (_, g) = handshake::Gateway::answer(&k, kind, pl).unwrap();
        assert_eq!(
            g.finish(down::WELCOME, &[7; 32]),
            Err(handshake::Error::Failed)
        );
        assert!(g.finish(down::CORE, &[0, 0, 0, 1]).is_err());
        let mut v1 = ch.clone();
        v1[HEADER + 3] = 1;
        let (kind, pl) = frame(&v1);
        assert_eq!(
            handshake::Gateway::answer(&k, kind, pl).err(),
            Some(handshake::Error::Version(1))
        );
    }

    #[test]
    fn header_round_trip() {
        let mut b = Vec::new();
        put_frame(&mut b, up::MSGS, 9, b"abc");
        let h = parse_header(&b).unwrap();
        assert_eq!(
            h,
            Header {
                kind: up::MSGS,
                session: 9,
                len: 3
            }
        );
        assert_eq!(&b[HEADER..], b"abc");
        assert!(parse_header(&b[..8]).is_none());
    }
}
