//! Authentication of node-agent connections: a shared secret (`AgentKey`, 32 random bytes that
//! `tidepool up` writes into the cluster's state directory, mode 600) and an HMAC-SHA-256
//! challenge-response in both directions, then a MAC on every line.
//!
//! ```text
//! agent  → control  {"protocol":"tidepool-agent/1","nonce":SN}        (the only thing an
//!                                                                       unauthenticated peer sees)
//! control → agent   {"nonce":CN,"proof":HMAC(K, "…client" SN CN)}
//! agent  → control  {"proof":HMAC(K, "…server" SN CN)}                 (or a refusal, then close)
//! then both ways    MAC SP JSON \n   MAC = HMAC(S, direction seq JSON), S = HMAC(K, "…session" SN CN)
//! ```
//!
//! Both nonces are fresh per connection, so a recorded exchange cannot be replayed; the labels
//! differ per direction, so one side's proof is never the other's (no reflection). The line
//! MACs bind each request and answer to this connection, its direction and its place in it: an
//! attacker on the path can neither inject, reorder, replay nor alter a request after the
//! handshake. Nothing is encrypted: the agent protocol carries terms, WAL positions, host
//! names and ports, no secret (docs/security.md).

use std::fmt;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use hmac::{Hmac, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use subtle::ConstantTimeEq;

pub const PROTOCOL: &str = "tidepool-agent/1";
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 32;
const MAC_HEX: usize = 64;

/// The cluster's agent secret. Its `Debug` never shows it.
#[derive(Clone)]
pub struct AgentKey(pub(crate) [u8; KEY_LEN]);

impl fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AgentKey(…)")
    }
}

impl AgentKey {
    /// 32 bytes from the OS's CSPRNG.
    pub fn generate() -> AgentKey {
        let mut k = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut k);
        AgentKey(k)
    }

    /// 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(s: &str) -> Result<AgentKey, String> {
        let b = hex_decode(s.trim()).ok_or("not 64 hex digits")?;
        let k: [u8; KEY_LEN] = b.try_into().map_err(|_| "not 64 hex digits")?;
        Ok(AgentKey(k))
    }

    pub fn to_hex(&self) -> String {
        hex(&self.0)
    }

    /// Reads a key file. Refused when group or others may read or write it: a secret others
    /// can read protects nothing.
    pub fn load(path: &Path) -> Result<AgentKey, String> {
        let meta = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
        if meta.permissions().mode() & 0o077 != 0 {
            return Err(format!(
                "{}: mode {:o} lets others at the secret (chmod 600)",
                path.display(),
                meta.permissions().mode() & 0o777
            ));
        }
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        AgentKey::from_hex(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Writes a new key file, mode 600 from its creation; refuses to replace an existing one.
    pub fn create(path: &Path) -> Result<AgentKey, String> {
        let key = AgentKey::generate();
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
            .map_err(|e| format!("creating {}: {e}", path.display()))?;
        f.write_all(format!("{}\n", key.to_hex()).as_bytes())
            .and_then(|_| f.sync_all())
            .map_err(|e| format!("writing {}: {e}", path.display()))?;
        Ok(key)
    }

    /// The key in `path`, created there if there is none.
    pub fn load_or_create(path: &Path) -> Result<AgentKey, String> {
        match AgentKey::create(path) {
            Ok(k) => Ok(k),
            Err(_) if path.exists() => AgentKey::load(path),
            Err(e) => Err(e),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("authentication failed")]
    Failed,
    #[error("malformed handshake: {0}")]
    Malformed(String),
    #[error("refused by the agent: {0}")]
    Refused(String),
}

/// The agent's first line.
#[derive(Serialize, Deserialize)]
struct Challenge {
    protocol: String,
    nonce: String,
}

/// The control's answer to it.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientProof {
    nonce: String,
    proof: String,
}

/// The agent's proof, after it checked the control's.
#[derive(Serialize, Deserialize)]
struct ServerProof {
    proof: String,
}

pub(crate) fn mac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut m = <Hmac<Sha256>>::new_from_slice(key).expect("HMAC takes keys of any length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn label(what: &str) -> Vec<u8> {
    format!("{PROTOCOL} {what}").into_bytes()
}

pub(crate) fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    rand::rngs::OsRng.fill_bytes(&mut n);
    n
}

fn line(v: &impl Serialize) -> Vec<u8> {
    let mut out = serde_json::to_vec(v).expect("handshake messages serialize");
    out.push(b'\n');
    out
}

fn parse<'a, T: Deserialize<'a>>(l: &'a [u8], what: &str) -> Result<T, AuthError> {
    serde_json::from_slice(l).map_err(|_| AuthError::Malformed(format!("not a {what}")))
}

fn nonce_from(hex_str: &str) -> Result<[u8; NONCE_LEN], AuthError> {
    hex_decode(hex_str)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| AuthError::Malformed("a nonce is not 64 hex digits".into()))
}

pub(crate) fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// The agent's half of the handshake.
pub struct ServerHandshake {
    key: AgentKey,
    nonce: [u8; NONCE_LEN],
}

impl ServerHandshake {
    pub fn new(key: &AgentKey) -> ServerHandshake {
        ServerHandshake {
            key: key.clone(),
            nonce: nonce(),
        }
    }

    /// The line sent on accept.
    pub fn challenge(&self) -> Vec<u8> {
        line(&Challenge {
            protocol: PROTOCOL.into(),
            nonce: hex(&self.nonce),
        })
    }

    /// Checks the control's proof (constant time); on success the line to send back and
    /// the sealed channel for the rest of the connection.
    pub fn verify(&self, answer: &[u8]) -> Result<(Vec<u8>, Sealed), AuthError> {
        let p: ClientProof = parse(answer, "client proof")?;
        let cn = nonce_from(&p.nonce)?;
        let want = mac(&self.key.0, &[&label("client"), &self.nonce, &cn]);
        let got = hex_decode(&p.proof).ok_or(AuthError::Failed)?;
        if !same(&want, &got) {
            return Err(AuthError::Failed);
        }
        let proof = mac(&self.key.0, &[&label("server"), &self.nonce, &cn]);
        let session = mac(&self.key.0, &[&label("session"), &self.nonce, &cn]);
        Ok((
            line(&ServerProof { proof: hex(&proof) }),
            Sealed::new(session, b'S', b'C'),
        ))
    }
}

/// The control's half, after it answered a challenge.
pub struct ClientHandshake {
    key: AgentKey,
    server_nonce: [u8; NONCE_LEN],
    nonce: [u8; NONCE_LEN],
}

impl ClientHandshake {
    /// The answer to the agent's challenge line.
    pub fn answer(
        key: &AgentKey,
        challenge: &[u8],
    ) -> Result<(Vec<u8>, ClientHandshake), AuthError> {
        let c: Challenge = parse(challenge, "challenge")?;
        if c.protocol != PROTOCOL {
            return Err(AuthError::Malformed(format!(
                "protocol {:?}, expected {PROTOCOL}",
                c.protocol
            )));
        }
        let h = ClientHandshake {
            key: key.clone(),
            server_nonce: nonce_from(&c.nonce)?,
            nonce: nonce(),
        };
        let proof = mac(&h.key.0, &[&label("client"), &h.server_nonce, &h.nonce]);
        Ok((
            line(&ClientProof {
                nonce: hex(&h.nonce),
                proof: hex(&proof),
            }),
            h,
        ))
    }

    /// Checks the agent's proof: an agent that does not hold the key is not believed.
    pub fn finish(self, answer: &[u8]) -> Result<Sealed, AuthError> {
        if let Ok(crate::agent::Response::Refused { reason, .. }) = serde_json::from_slice(answer) {
            return Err(AuthError::Refused(reason));
        }
        let p: ServerProof = parse(answer, "server proof")?;
        let want = mac(
            &self.key.0,
            &[&label("server"), &self.server_nonce, &self.nonce],
        );
        let got = hex_decode(&p.proof).ok_or(AuthError::Failed)?;
        if !same(&want, &got) {
            return Err(AuthError::Failed);
        }
        let session = mac(
            &self.key.0,
            &[&label("session"), &self.server_nonce, &self.nonce],
        );
        Ok(Sealed::new(session, b'C', b'S'))
    }
}

/// The connection after the handshake: every line carries a MAC over its direction, its
/// sequence number and its JSON.
pub struct Sealed {
    key: [u8; 32],
    send_dir: u8,
    recv_dir: u8,
    send_seq: u64,
    recv_seq: u64,
}

impl Sealed {
    fn new(key: [u8; 32], send_dir: u8, recv_dir: u8) -> Sealed {
        Sealed {
            key,
            send_dir,
            recv_dir,
            send_seq: 0,
            recv_seq: 0,
        }
    }

    /// `MAC SP JSON \n`. `json` must hold no newline (serde_json's compact output has none).
    pub fn seal(&mut self, json: &[u8]) -> Vec<u8> {
        let m = mac(
            &self.key,
            &[&[self.send_dir], &self.send_seq.to_be_bytes(), json],
        );
        self.send_seq = self.send_seq.wrapping_add(1);
        let mut out = Vec::with_capacity(MAC_HEX + 2 + json.len());
        out.extend_from_slice(hex(&m).as_bytes());
        out.push(b' ');
        out.extend_from_slice(json);
        out.push(b'\n');
        out
    }

    /// The JSON of a received line (its newline may be there or not), once its MAC checks.
    pub fn open<'a>(&mut self, line: &'a [u8]) -> Result<&'a [u8], AuthError> {
        let line = line.strip_suffix(b"\n").unwrap_or(line);
        if line.len() < MAC_HEX + 1 || line[MAC_HEX] != b' ' {
            return Err(AuthError::Malformed("a line without its MAC".into()));
        }
        let (tag, json) = (&line[..MAC_HEX], &line[MAC_HEX + 1..]);
        let got = std::str::from_utf8(tag)
            .ok()
            .and_then(hex_decode)
            .ok_or(AuthError::Failed)?;
        let want = mac(
            &self.key,
            &[&[self.recv_dir], &self.recv_seq.to_be_bytes(), json],
        );
        if !same(&want, &got) {
            return Err(AuthError::Failed);
        }
        self.recv_seq = self.recv_seq.wrapping_add(1);
        Ok(json)
    }
}

fn hex(b: &[u8]) -> String {
    const D: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(b.len() * 2);
    for &x in b {
        s.push(D[(x >> 4) as usize] as char);
        s.push(D[(x & 15) as usize] as char);
    }
    s
}

fn hex_decode(s: &str) -> Option<Vec<u8>> {
    if s.len() & 1 == 1 {
        return None;
    }
    let digit = |c: u8| (c as char).to_digit(16).map(|d| d as u8);
    s.as_bytes()
        .chunks(2)
        .map(|p| Some(digit(p[0])? << 4 | digit(p[1])?))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(server_key: &AgentKey, client_key: &AgentKey) -> Result<(Sealed, Sealed), AuthError> {
        let s = ServerHandshake::new(server_key);
        let (answer, c) = ClientHandshake::answer(client_key, &s.challenge())?;
        let (proof, server) = s.verify(&answer)?;
        let client = c.finish(&proof)?;
        Ok((client, server))
    }

    #[test]
    fn same_key_both_ways_then_sealed_lines() {
        let k = AgentKey::generate();
        let (mut c, mut s) = pair(&k, &k).unwrap();
        let l = c.seal(br#"{"op":"report"}"#);
        assert_eq!(s.open(&l).unwrap(), br#"{"op":"report"}"#);
        // Replayed, or sent back the other way: refused.
        assert_eq!(s.open(&l), Err(AuthError::Failed));
        let back = s.seal(b"{}");
        assert_eq!(c.open(&back).unwrap(), b"{}");
        let mut tampered = c.seal(br#"{"op":"report"}"#);
        let n = tampered.len();
        tampered[n - 3] = b'X';
        assert_eq!(s.open(&tampered), Err(AuthError::Failed));
    }

    #[test]
    fn wrong_key_fails_at_the_agent() {
        let s = ServerHandshake::new(&AgentKey::generate());
        let (answer, _) = ClientHandshake::answer(&AgentKey::generate(), &s.challenge()).unwrap();
        assert_eq!(s.verify(&answer).err(), Some(AuthError::Failed));
    }

    #[test]
    fn an_agent_without_the_key_is_not_believed() {
        let k = AgentKey::generate();
        let fake = ServerHandshake::new(&AgentKey::generate());
        let (answer, c) = ClientHandshake::answer(&k, &fake.challenge()).unwrap();
        // The fake agent cannot check the proof; it answers with its own key's proof.
        let forged = mac(&fake.key.0, &[&label("server"), &fake.nonce, &[0u8; 32]]);
        let _ = answer;
        assert!(c
            .finish(&line(&ServerProof {
                proof: hex(&forged)
            }))
            .is_err());
    }

    #[test]
    fn key_files_are_600_and_loaded_back() {
        let dir = std::env::temp_dir().join(format!("tidepool-agent-key-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("agent.key");
        let k = AgentKey::load_or_create(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(AgentKey::load_or_create(&p).unwrap().0, k.0);
        assert!(
            AgentKey::create(&p).is_err(),
            "an existing key is never replaced"
        );
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(AgentKey::load(&p).unwrap_err().contains("chmod 600"));
        assert_eq!(format!("{k:?}"), "AgentKey(…)");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
