//! The link: a compact framed protocol between a gateway core and a pooler core, multiplexing
//! many client sessions over one socket.
//!
//! Frame: `u8 kind`, `u32 session`, `u32 payload length`, payload. One socket write may carry
//! frames of many sessions. Raw Postgres messages travel inside `MSGS` / `DATA` payloads
//! untouched. Written by hand: this is the hot path and the point is owning the bytes.

use crate::protocol::{put_cstr, read_cstr, read_i32, ProtocolError};
use crate::settings::Settings;

pub const HEADER: usize = 9;
pub const VERSION: u32 = 1;

/// Gateway → pooler.
pub mod up {
    /// `u32 version`.
    pub const HELLO: u8 = 1;
    /// Look a role's verifier up: payload `user\0`. Answered by `AUTH_INFO` for the same session.
    pub const AUTH_LOOKUP: u8 = 2;
    /// Open a session after the gateway authenticated the client (see [`super::Open`]).
    pub const OPEN: u8 = 3;
    /// `u8 flags` + raw frontend messages.
    pub const MSGS: u8 = 4;
    /// The client went away.
    pub const CLOSE: u8 = 5;
    /// `i32 pid`, `i32 secret` (the keys the gateway gave its client).
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
}

/// Pooler → gateway.
pub mod down {
    /// `u8 found` then the raw `rolpassword` (may be empty when NULL).
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
}

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

pub(crate) fn utf8(b: &[u8]) -> Result<String, ProtocolError> {
    String::from_utf8(b.to_vec()).map_err(|_| ProtocolError::Malformed("not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

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
