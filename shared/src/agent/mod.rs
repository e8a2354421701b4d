//! The node-agent protocol: what the control process asks of a pooler about its Postgres
//! (report, recruit, promote, follow, set the synchronous-replication settings).
//!
//! One JSON object per line over TCP (TLS when the agents have certificates: crate::tls), one request and one response per line, in order. Not a
//! hot path: failovers and health probes, a few per second, so serde does the bytes.
//!
//! Every connection authenticates both ends first (auth.rs: HMAC challenge-response with the
//! cluster's agent secret, then a MAC on every line); every request and report is validated
//! (validate.rs) before anyone acts on it.
//!
//! Terms: a node pledges to a term by persisting it before it answers a `Recruit`; it then
//! refuses every request carrying a lower term. A primary reports the term it was promoted at
//! (`primary_term`); gateways route writes to the primary of the highest term.

pub mod auth;
pub mod validate;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use auth::AgentKey;

/// A WAL position (`pg_lsn`) as a number: `X/Y` is `X << 32 | Y`.
pub type Lsn = u64;

/// `X/Y` → number; `None` for anything else.
pub fn parse_lsn(s: &str) -> Option<Lsn> {
    let (hi, lo) = s.trim().split_once('/')?;
    let hi = u64::from_str_radix(hi, 16).ok()?;
    let lo = u64::from_str_radix(lo, 16).ok()?;
    if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
        return None;
    }
    Some(hi << 32 | lo)
}

/// Number → `X/Y`, as Postgres prints it.
pub fn format_lsn(lsn: Lsn) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xffff_ffff)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Accepting writes (not in recovery).
    Primary,
    /// In recovery (streaming, or stopped by a recruit).
    Standby,
    /// Postgres is not answering (not running, crashed, frozen, or being rewound).
    Down,
}

impl Role {
    pub fn name(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Standby => "standby",
            Role::Down => "down",
        }
    }

    /// The byte that travels in the link's `ROLE` frame.
    pub fn to_u8(self) -> u8 {
        match self {
            Role::Primary => 1,
            Role::Standby => 2,
            Role::Down => 0,
        }
    }

    pub fn from_u8(b: u8) -> Role {
        match b {
            1 => Role::Primary,
            2 => Role::Standby,
            _ => Role::Down,
        }
    }
}

/// Where a standby streams from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    pub host: String,
    pub port: u16,
}

/// A standby as its primary sees it (`pg_stat_replication`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Replica {
    /// `application_name`: the standby's node name.
    pub name: String,
    pub state: String,
    pub flush_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    /// `sync`, `quorum`, `potential` or `async`.
    pub sync_state: String,
}

/// What a node agent knows of its node, answered to `Report` and after every state change.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Report {
    pub node: String,
    pub zone: String,
    pub role: Role,
    /// The highest term this node pledged to (persisted).
    pub term: u64,
    /// The term at which this node was promoted, while it is primary (0: the bootstrap
    /// primary, or not a primary).
    pub primary_term: u64,
    /// Postgres's timeline.
    pub timeline: u32,
    /// Primary: `pg_current_wal_flush_lsn()`; standby: `pg_last_wal_receive_lsn()` (or the
    /// replay position when nothing was received since start).
    pub flush_lsn: Option<Lsn>,
    /// Standby: `pg_last_wal_replay_lsn()`; primary: same as `flush_lsn`.
    pub replay_lsn: Option<Lsn>,
    /// Standby: its WAL receiver is streaming.
    pub streaming: bool,
    /// Standby: milliseconds since its WAL receiver last heard from the primary.
    pub receipt_age_ms: Option<u64>,
    /// Standby: the primary it is configured to stream from.
    pub upstream: Option<Upstream>,
    /// Primary: its standbys.
    pub replicas: Vec<Replica>,
    /// The postmaster's pid, when running.
    pub postgres_pid: Option<u32>,
    /// Postgres's port (user connections and replication).
    pub pg_port: u16,
    /// `synchronous_standby_names` in effect.
    pub sync_names: String,
    /// A recruit stopped this node (standby: no longer streaming; primary: fenced, commits
    /// wait forever) until a `Promote` or `Follow` for a term at least as high.
    pub recruited: bool,
    /// Why the node is `Down` or unhealthy, for humans.
    pub problem: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Report,
    /// Pledge to `term` (persisted before the answer), then stop: a standby stops streaming and
    /// waits until its replay has caught up with what it received; a primary stops completing
    /// commits. Refused when `term` is not above the pledged term.
    Recruit {
        term: u64,
    },
    /// Become primary for `term` (pledged to it), with these synchronous standbys.
    Promote {
        term: u64,
        sync_names: String,
    },
    /// Stream from `primary` for `term`; an old primary is rewound (`pg_rewind`) first.
    Follow {
        term: u64,
        primary: Upstream,
    },
    /// Set `synchronous_standby_names` (a primary at `term`).
    SetSync {
        term: u64,
        sync_names: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Ok {
        report: Report,
    },
    /// The request was not carried out (stale term, wrong role, Postgres down, ...).
    Refused {
        reason: String,
        report: Option<Report>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    #[error("agent {addr}: {source}")]
    Io {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("agent {addr}: bad answer: {detail}")]
    Protocol { addr: SocketAddr, detail: String },
    #[error("agent {addr}: {source}")]
    Auth {
        addr: SocketAddr,
        source: auth::AuthError,
    },
}

/// What a caller needs to reach the agents of a cluster: the agent secret, and the CA their
/// certificates chain to when the agents speak TLS (`None`: plain TCP, the secret's handshake
/// and line MACs alone).
#[derive(Clone)]
pub struct AgentAccess {
    pub key: AgentKey,
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
}

impl AgentAccess {
    /// Plain TCP: agents on this host (or a network trusted with reports in clear).
    pub fn plain(key: AgentKey) -> AgentAccess {
        AgentAccess { key, tls: None }
    }

    /// TLS, the agents' certificates checked against the CA(s) in `ca_file` (PEM) and the
    /// address dialled.
    pub fn with_tls(key: AgentKey, ca_file: &std::path::Path) -> Result<AgentAccess, String> {
        Ok(AgentAccess {
            key,
            tls: Some(crate::tls::client_config(ca_file)?),
        })
    }
}

/// The connection to an agent, plain or TLS: not a hot path (a few calls per second), so one
/// boxed stream.
trait Conn: Read + Write + Send {}
impl<T: Read + Write + Send> Conn for T {}

/// One request to the agent at `addr`, blocking, every step bounded by `timeout` (connect,
/// the TLS handshake when `access.tls` is set, the secret's handshake, write, and the answer,
/// which for `Recruit`, `Promote` and `Follow` includes the work). Both ends prove they hold
/// the key before the request is sent; an answer that is not the authenticated agent's, or
/// whose terms are out of bounds, is an error.
pub fn call_with(
    addr: SocketAddr,
    access: &AgentAccess,
    req: &Request,
    timeout: Duration,
) -> Result<Response, CallError> {
    let io = |source| CallError::Io { addr, source };
    let protocol = |detail: String| CallError::Protocol { addr, detail };
    let auth = |source| CallError::Auth { addr, source };
    let stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let _ = stream.set_nodelay(true);
    let conn: Box<dyn Conn> = match &access.tls {
        None => Box::new(stream),
        Some(config) => {
            let name = rustls::pki_types::ServerName::IpAddress(addr.ip().into());
            let tls = rustls::ClientConnection::new(config.clone(), name)
                .map_err(|e| protocol(format!("TLS: {e}")))?;
            let mut s = rustls::StreamOwned::new(tls, stream);
            // The handshake now, so a certificate the CA did not issue is named as such.
            while s.conn.is_handshaking() {
                s.conn
                    .complete_io(&mut s.sock)
                    .map_err(|e| protocol(format!("TLS handshake: {e}")))?;
            }
            Box::new(s)
        }
    };
    let mut r = BufReader::new(conn);
    let challenge = read_line(&mut r).map_err(io)?;
    let (answer, hs) = auth::ClientHandshake::answer(&access.key, &challenge).map_err(auth)?;
    send(r.get_mut(), &answer).map_err(io)?;
    let proof = read_line(&mut r).map_err(io)?;
    let mut sealed = hs.finish(&proof).map_err(auth)?;
    let body = serde_json::to_vec(req).map_err(|e| protocol(e.to_string()))?;
    send(r.get_mut(), &sealed.seal(&body)).map_err(io)?;
    let line = read_line(&mut r).map_err(io)?;
    let json = sealed.open(&line).map_err(auth)?;
    let response: Response = serde_json::from_slice(json).map_err(|e| protocol(e.to_string()))?;
    let report = match &response {
        Response::Ok { report } => Some(report),
        Response::Refused { report, .. } => report.as_ref(),
    };
    if let Some(r) = report {
        r.validate().map_err(protocol)?;
    }
    Ok(response)
}

/// [`call_with`] over plain TCP.
pub fn call(
    addr: SocketAddr,
    key: &AgentKey,
    req: &Request,
    timeout: Duration,
) -> Result<Response, CallError> {
    call_with(addr, &AgentAccess::plain(key.clone()), req, timeout)
}

fn send(w: &mut dyn Conn, bytes: &[u8]) -> std::io::Result<()> {
    w.write_all(bytes)?;
    w.flush()
}

/// One line of at most `MAX_LINE` bytes; a closed connection or a longer line is an error.
fn read_line(r: &mut impl BufRead) -> std::io::Result<Vec<u8>> {
    let mut line = Vec::new();
    r.take(MAX_LINE as u64 + 1).read_until(b'\n', &mut line)?;
    if line.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "connection closed without an answer",
        ));
    }
    if line.len() > MAX_LINE || !line.ends_with(b"\n") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a line longer than {MAX_LINE} bytes, or cut short"),
        ));
    }
    Ok(line)
}

/// Largest request line an agent reads.
pub const MAX_LINE: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trip() {
        assert_eq!(parse_lsn("0/3000060"), Some(0x3000060));
        assert_eq!(parse_lsn("16/B374D848"), Some(0x16_B374_D848));
        assert_eq!(format_lsn(0x16_B374_D848), "16/B374D848");
        assert_eq!(parse_lsn("nope"), None);
        assert_eq!(parse_lsn("1/"), None);
    }

    #[test]
    fn requests_are_one_json_line() {
        let r = Request::Follow {
            term: 3,
            primary: Upstream {
                host: "127.0.0.1".into(),
                port: 5433,
            },
        };
        let s = serde_json::to_string(&r).unwrap();
        assert!(!s.contains('\n'));
        assert_eq!(serde_json::from_str::<Request>(&s).unwrap(), r);
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"report"}"#).unwrap(),
            Request::Report
        );
    }
}
