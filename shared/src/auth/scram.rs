//! SCRAM-SHA-256 (RFC 5802, RFC 7677) as Postgres speaks it: the server side, checked against
//! a stored verifier, and a client side that logs in with keys instead of a password.
//!
//! The exchange, with the names used below:
//!
//! ```text
//! client-first   "n,,n=<user>,r=<cnonce>"           gs2 header "n,," + client-first-bare
//! server-first   "r=<cnonce><snonce>,s=<salt>,i=<iterations>"
//! client-final   "c=<b64 gs2 header>,r=<cnonce><snonce>,p=<ClientProof>"
//! server-final   "v=<ServerSignature>"
//!
//! AuthMessage     = client-first-bare "," server-first "," client-final-without-proof
//! ClientSignature = HMAC(StoredKey, AuthMessage)      ClientProof = ClientKey XOR ClientSignature
//! ServerSignature = HMAC(ServerKey, AuthMessage)      StoredKey   = SHA-256(ClientKey)
//! ```
//!
//! Postgres ignores the SCRAM user name (the startup packet's `user` counts) and libpq sends
//! `n=` empty; so do we. Only SCRAM-SHA-256 is offered, never -PLUS, so a client that asks for
//! channel binding (`p=`) is refused, and `y` ("I could bind but you did not offer it") is
//! accepted, as RFC 5802 section 6 says for a server without channel binding.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::AuthError;

/// The SASL mechanism name, as listed in AuthenticationSASL.
pub const SCRAM_SHA_256: &str = "SCRAM-SHA-256";

/// Postgres's defaults (`SCRAM_DEFAULT_ITERATIONS`, `SCRAM_DEFAULT_SALT_LEN`); the mock
/// verifier uses them so it looks like a verifier Postgres would have made.
const DEFAULT_ITERATIONS: u32 = 4096;
const DEFAULT_SALT_LEN: usize = 16;
/// Postgres's `SCRAM_RAW_NONCE_LEN`: 18 random bytes, 24 characters of base64.
const RAW_NONCE_LEN: usize = 18;
const KEY_LEN: usize = 32;

type HmacSha256 = Hmac<Sha256>;

/// A role's SCRAM-SHA-256 verifier: what `pg_authid.rolpassword` holds as
/// `SCRAM-SHA-256$<iterations>:<salt>$<StoredKey>:<ServerKey>` (base64 fields).
#[derive(Clone)]
pub struct ScramVerifier {
    pub iterations: u32,
    pub salt: Vec<u8>,
    pub stored_key: [u8; 32],
    pub server_key: [u8; 32],
}

/// The keys are redacted: with them one can pose as the server (and with the gateway's
/// ClientKey, as the client), so they must never reach a log.
impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ScramVerifier")
            .field("iterations", &self.iterations)
            .field("salt", &B64.encode(&self.salt))
            .field("stored_key", &"<redacted>")
            .field("server_key", &"<redacted>")
            .finish()
    }
}

impl ScramVerifier {
    /// Parses the `rolpassword` form; `None` if anything is off (wrong prefix, iterations not
    /// a positive integer, bad base64, keys not 32 bytes). Mirrors Postgres's
    /// `parse_scram_secret()`.
    pub fn parse(rolpassword: &str) -> Option<ScramVerifier> {
        let rest = rolpassword.strip_prefix("SCRAM-SHA-256$")?;
        let (iter_salt, keys) = rest.split_once('$')?;
        let (iterations, salt) = iter_salt.split_once(':')?;
        let (stored_key, server_key) = keys.split_once(':')?;
        let iterations: u32 = iterations.parse().ok()?;
        let salt = B64.decode(salt).ok()?;
        if iterations == 0 || salt.is_empty() {
            return None;
        }
        Some(ScramVerifier {
            iterations,
            salt,
            stored_key: decode_key(stored_key)?,
            server_key: decode_key(server_key)?,
        })
    }

    /// Formats the verifier the way Postgres stores it in `pg_authid.rolpassword`.
    pub fn to_rolpassword(&self) -> String {
        format!(
            "SCRAM-SHA-256${}:{}${}:{}",
            self.iterations,
            B64.encode(&self.salt),
            B64.encode(self.stored_key),
            B64.encode(self.server_key)
        )
    }

    /// The verifier Postgres would store for `password` with this salt and iteration count.
    ///
    /// SASLprep is skipped. For ASCII passwords that is exactly what Postgres does: SASLprep
    /// leaves printable ASCII unchanged, and Postgres falls back to the raw password when
    /// SASLprep rejects it (control characters). A non-ASCII password that SASLprep would
    /// normalise gives a different verifier here than in Postgres. Used by tests and tools,
    /// never on a login path (4096 HMACs are not free).
    pub fn from_password(password: &str, salt: &[u8], iterations: u32) -> ScramVerifier {
        let salted = salted_password(password, salt, iterations);
        ScramVerifier {
            iterations,
            salt: salt.to_vec(),
            stored_key: sha256(&hmac(&salted, &[b"Client Key"])),
            server_key: hmac(&salted, &[b"Server Key"]),
        }
    }

    /// The ClientKey when `password` matches this verifier (the `password` method of access
    /// rules: a cleartext password checked as Postgres's `scram_verify_plain_password` does,
    /// with the same SASLprep caveat as [`ScramVerifier::from_password`]). Costs `iterations`
    /// HMACs on the caller's thread, as it costs Postgres's backend; only that method uses it.
    pub fn check_password(&self, password: &str) -> Option<[u8; 32]> {
        let salted = salted_password(password, &self.salt, self.iterations);
        let client_key = hmac(&salted, &[b"Client Key"]);
        bool::from(sha256(&client_key).ct_eq(&self.stored_key)).then_some(client_key)
    }

    /// A deterministic fake verifier for a role that does not exist (or has no usable
    /// verifier), so the exchange looks the same as for a real role and fails only at the
    /// proof, like Postgres's `mock_scram_secret()`. The salt is the same for every attempt
    /// on the same name within a process (a random salt per attempt would reveal the role is
    /// fake). The keys are derived from `secret` too, so no proof can match them short of
    /// finding a SHA-256 preimage.
    pub fn mock(user: &str, secret: &[u8; 32]) -> ScramVerifier {
        let salt = hmac(secret, &[b"tidepool mock salt\0", user.as_bytes()]);
        ScramVerifier {
            iterations: DEFAULT_ITERATIONS,
            salt: salt[..DEFAULT_SALT_LEN].to_vec(),
            stored_key: hmac(secret, &[b"tidepool mock stored key\0", user.as_bytes()]),
            server_key: hmac(secret, &[b"tidepool mock server key\0", user.as_bytes()]),
        }
    }
}

/// The ClientKey for `password` (same SASLprep caveat as [`ScramVerifier::from_password`]);
/// what the gateway would learn from a client that logs in with this password.
pub fn client_key_from_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    hmac(
        &salted_password(password, salt, iterations),
        &[b"Client Key"],
    )
}

/// Where a [`ScramServer`] is in the exchange.
enum ServerState {
    Initial,
    /// server-first sent; waiting for client-final.
    FirstSent {
        gs2_header: String,
        /// client nonce + server nonce.
        nonce: String,
        client_nonce_len: usize,
        /// client-first-bare "," server-first ","; the start of AuthMessage.
        auth_prefix: String,
    },
    /// Finished, successfully or not; any further message is out of turn.
    Done,
}

/// Server side of one SCRAM-SHA-256 exchange, checking a client against a stored verifier.
pub struct ScramServer {
    verifier: ScramVerifier,
    server_nonce: String,
    state: ServerState,
}

impl ScramServer {
    /// A server with a fresh random nonce (18 bytes from `thread_rng`, base64, like Postgres).
    pub fn new(verifier: ScramVerifier) -> Self {
        let nonce = random_nonce();
        Self::with_nonce(verifier, &nonce)
    }

    /// A server with a chosen nonce, for tests. The nonce must be printable and free of `,`.
    pub fn with_nonce(verifier: ScramVerifier, server_nonce: &str) -> Self {
        ScramServer {
            verifier,
            server_nonce: server_nonce.to_owned(),
            state: ServerState::Initial,
        }
    }

    /// Takes the data of SASLInitialResponse (the client-first-message) and returns the
    /// server-first-message to send in AuthenticationSASLContinue.
    pub fn client_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        if !matches!(self.state, ServerState::Initial) {
            return Err(AuthError::Malformed("client-first-message out of turn"));
        }
        // Whatever happens, this exchange cannot start over.
        self.state = ServerState::Done;
        let msg = utf8(msg)?;
        let (gs2_header, bare) = split_gs2_header(msg)?;
        let client_nonce = parse_client_first_bare(bare)?;

        let nonce = format!("{client_nonce}{}", self.server_nonce);
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&self.verifier.salt),
            self.verifier.iterations
        );
        self.state = ServerState::FirstSent {
            gs2_header: gs2_header.to_owned(),
            client_nonce_len: client_nonce.len(),
            nonce,
            auth_prefix: format!("{bare},{server_first},"),
        };
        Ok(server_first.into_bytes())
    }

    /// Takes the client-final-message (data of SASLResponse). When the proof is right,
    /// returns the server-final-message (`v=...`, for AuthenticationSASLFinal) and the
    /// client's ClientKey, with which the pooler can log in to Postgres as this role.
    /// ClientKey opens every session of the role until its password changes: treat it like
    /// the password (never logged, never sent anywhere but the pooler).
    pub fn client_final(&mut self, msg: &[u8]) -> Result<(Vec<u8>, [u8; 32]), AuthError> {
        let ServerState::FirstSent {
            gs2_header,
            nonce,
            client_nonce_len,
            auth_prefix,
        } = std::mem::replace(&mut self.state, ServerState::Done)
        else {
            return Err(AuthError::Malformed("client-final-message out of turn"));
        };
        let msg = utf8(msg)?;
        let final_msg = parse_client_final(msg)?;

        // Channel binding data for "n,," / "y,," is the gs2 header itself.
        let binding = B64
            .decode(final_msg.channel_binding)
            .map_err(|_| AuthError::Malformed("channel binding is not base64"))?;
        if binding != gs2_header.as_bytes() {
            return Err(AuthError::Malformed(
                "channel binding does not match the gs2 header",
            ));
        }
        // Checked in two steps only for a precise error; the second implies the first.
        // Nonces are public, no need for constant time.
        if !final_msg.nonce.starts_with(&nonce[..client_nonce_len]) || final_msg.nonce != nonce {
            return Err(AuthError::NonceMismatch);
        }

        let auth_message = [auth_prefix.as_bytes(), final_msg.without_proof.as_bytes()];
        let client_signature = hmac(&self.verifier.stored_key, &auth_message);
        let client_key = xor(&final_msg.proof, &client_signature);
        if !bool::from(sha256(&client_key).ct_eq(&self.verifier.stored_key)) {
            return Err(AuthError::InvalidProof);
        }
        let server_signature = hmac(&self.verifier.server_key, &auth_message);
        let server_final = format!("v={}", B64.encode(server_signature));
        Ok((server_final.into_bytes(), client_key))
    }
}

/// Where a [`ScramClient`] is in the exchange.
enum ClientState {
    Initial,
    FirstSent,
    /// client-final sent; waiting for server-final, which must carry this signature.
    FinalSent {
        server_signature: [u8; 32],
    },
    Done,
}

/// Client side of SCRAM-SHA-256 that logs in with the role's keys instead of a password:
/// the pooler's login to Postgres with the ClientKey the gateway learned.
pub struct ScramClient {
    client_key: [u8; 32],
    stored_key: [u8; 32],
    server_key: [u8; 32],
    client_nonce: String,
    /// "n=,r=<client nonce>".
    client_first_bare: String,
    state: ClientState,
}

impl ScramClient {
    /// A client with a fresh random nonce (18 bytes, base64).
    pub fn new(client_key: [u8; 32], server_key: [u8; 32]) -> Self {
        let nonce = random_nonce();
        Self::with_nonce(client_key, server_key, &nonce)
    }

    /// A client with a chosen nonce, for tests. The nonce must be printable and free of `,`.
    pub fn with_nonce(client_key: [u8; 32], server_key: [u8; 32], client_nonce: &str) -> Self {
        ScramClient {
            client_key,
            stored_key: sha256(&client_key),
            server_key,
            client_nonce: client_nonce.to_owned(),
            client_first_bare: format!("n=,r={client_nonce}"),
            state: ClientState::Initial,
        }
    }

    /// The client-first-message, for SASLInitialResponse: `n,,n=,r=<nonce>` (no channel
    /// binding; Postgres takes the user from the startup packet, not from `n=`).
    pub fn client_first(&mut self) -> Vec<u8> {
        self.state = ClientState::FirstSent;
        format!("n,,{}", self.client_first_bare).into_bytes()
    }

    /// Takes the server-first-message (data of AuthenticationSASLContinue) and returns the
    /// client-final-message for SASLResponse. Salt and iteration count are checked for form
    /// but not used: we already hold the keys they would derive.
    pub fn server_first(&mut self, msg: &[u8]) -> Result<Vec<u8>, AuthError> {
        if !matches!(self.state, ClientState::FirstSent) {
            return Err(AuthError::Malformed("server-first-message out of turn"));
        }
        self.state = ClientState::Done;
        let server_first = utf8(msg)?;
        let nonce = parse_server_first(server_first)?;
        // The server must extend our nonce with a part of its own.
        if nonce.len() <= self.client_nonce.len() || !nonce.starts_with(&self.client_nonce) {
            return Err(AuthError::NonceMismatch);
        }

        // "biws" is base64 of the gs2 header "n,,".
        let without_proof = format!("c=biws,r={nonce}");
        let auth_message = [
            self.client_first_bare.as_bytes(),
            b",",
            server_first.as_bytes(),
            b",",
            without_proof.as_bytes(),
        ];
        let proof = xor(&self.client_key, &hmac(&self.stored_key, &auth_message));
        self.state = ClientState::FinalSent {
            server_signature: hmac(&self.server_key, &auth_message),
        };
        Ok(format!("{without_proof},p={}", B64.encode(proof)).into_bytes())
    }

    /// Takes the server-final-message (data of AuthenticationSASLFinal) and checks the
    /// server's signature: only a server that knows the role's ServerKey can produce it.
    pub fn server_final(&mut self, msg: &[u8]) -> Result<(), AuthError> {
        let ClientState::FinalSent { server_signature } =
            std::mem::replace(&mut self.state, ClientState::Done)
        else {
            return Err(AuthError::Malformed("server-final-message out of turn"));
        };
        let msg = utf8(msg)?;
        if msg.starts_with("e=") {
            return Err(AuthError::Malformed(
                "server-final-message carries an error",
            ));
        }
        // Like libpq, nothing may follow the signature.
        let signature = msg
            .strip_prefix("v=")
            .ok_or(AuthError::Malformed("server-final-message has no verifier"))?;
        let signature = B64
            .decode(signature)
            .map_err(|_| AuthError::Malformed("server signature is not base64"))?;
        if bool::from(signature.as_slice().ct_eq(&server_signature)) {
            Ok(())
        } else {
            Err(AuthError::ServerSignatureMismatch)
        }
    }
}

/// Splits a client-first-message into gs2 header (`"n,,"` or `"y,,"`) and client-first-bare.
fn split_gs2_header(msg: &str) -> Result<(&str, &str), AuthError> {
    let (flag, rest) = msg
        .split_once(',')
        .ok_or(AuthError::Malformed("no gs2 header"))?;
    match flag {
        "n" | "y" => {}
        _ if flag.starts_with("p=") => return Err(AuthError::ChannelBindingNotSupported),
        _ => return Err(AuthError::Malformed("unknown channel binding flag")),
    }
    let (authzid, bare) = rest
        .split_once(',')
        .ok_or(AuthError::Malformed("no gs2 header"))?;
    // Postgres refuses an authorization identity too.
    if !authzid.is_empty() {
        return Err(AuthError::Malformed(
            "authorization identity is not supported",
        ));
    }
    Ok((&msg[..msg.len() - bare.len()], bare))
}

/// client-first-bare = [reserved-mext ","] username "," nonce ["," extensions]; returns the
/// nonce. The user name is not used (Postgres takes it from the startup packet).
fn parse_client_first_bare(bare: &str) -> Result<&str, AuthError> {
    let mut attrs = bare.split(',');
    let user = attrs.next().unwrap_or_default();
    if user.starts_with("m=") {
        return Err(AuthError::Malformed("mandatory extension is not supported"));
    }
    if !user.starts_with("n=") {
        return Err(AuthError::Malformed(
            "client-first-message has no user name",
        ));
    }
    let nonce = attr(attrs.next(), "r=", "client-first-message has no nonce")?;
    if !is_printable(nonce) {
        return Err(AuthError::Malformed("client nonce is not printable"));
    }
    extensions(attrs)?;
    Ok(nonce)
}

/// The parts of a client-final-message.
struct ClientFinal<'a> {
    channel_binding: &'a str,
    nonce: &'a str,
    /// client-final-message-without-proof: the last part of AuthMessage.
    without_proof: &'a str,
    proof: [u8; 32],
}

/// client-final-message = "c=" cbind "," "r=" nonce ["," extensions] "," "p=" proof.
fn parse_client_final(msg: &str) -> Result<ClientFinal<'_>, AuthError> {
    // Attribute values cannot contain ',', so the proof is whatever follows the last ",p=".
    let (without_proof, proof) = msg
        .rsplit_once(",p=")
        .ok_or(AuthError::Malformed("client-final-message has no proof"))?;
    if proof.contains(',') {
        return Err(AuthError::Malformed(
            "client proof is not the last attribute",
        ));
    }
    let mut attrs = without_proof.split(',');
    let channel_binding = attr(
        attrs.next(),
        "c=",
        "client-final-message has no channel binding",
    )?;
    let nonce = attr(attrs.next(), "r=", "client-final-message has no nonce")?;
    extensions(attrs)?;
    let proof = decode_key(proof).ok_or(AuthError::Malformed("client proof is not 32 bytes"))?;
    Ok(ClientFinal {
        channel_binding,
        nonce,
        without_proof,
        proof,
    })
}

/// server-first-message = [reserved-mext ","] "r=" nonce "," "s=" salt "," "i=" count
/// ["," extensions]; returns the nonce after checking salt and count for form.
fn parse_server_first(msg: &str) -> Result<&str, AuthError> {
    let mut attrs = msg.split(',');
    let first = attrs.next();
    if first.is_some_and(|a| a.starts_with("m=")) {
        return Err(AuthError::Malformed("mandatory extension is not supported"));
    }
    let nonce = attr(first, "r=", "server-first-message has no nonce")?;
    if !is_printable(nonce) {
        return Err(AuthError::Malformed("server nonce is not printable"));
    }
    let salt = attr(attrs.next(), "s=", "server-first-message has no salt")?;
    if B64.decode(salt).is_err() {
        return Err(AuthError::Malformed("salt is not base64"));
    }
    let iterations = attr(
        attrs.next(),
        "i=",
        "server-first-message has no iteration count",
    )?;
    if !matches!(iterations.parse::<u32>(), Ok(n) if n > 0) {
        return Err(AuthError::Malformed(
            "iteration count is not a positive integer",
        ));
    }
    extensions(attrs)?;
    Ok(nonce)
}

/// The value of one attribute that must be `prefix` followed by a non-empty value.
fn attr<'a>(
    attr: Option<&'a str>,
    prefix: &str,
    missing: &'static str,
) -> Result<&'a str, AuthError> {
    match attr.and_then(|a| a.strip_prefix(prefix)) {
        Some(value) if !value.is_empty() => Ok(value),
        _ => Err(AuthError::Malformed(missing)),
    }
}

/// Optional extensions are ignored (RFC 5802), but each must at least look like `x=value`.
fn extensions<'a>(attrs: impl Iterator<Item = &'a str>) -> Result<(), AuthError> {
    for a in attrs {
        let b = a.as_bytes();
        if b.len() < 2 || !b[0].is_ascii_alphabetic() || b[1] != b'=' {
            return Err(AuthError::Malformed("malformed attribute"));
        }
    }
    Ok(())
}

/// RFC 5802 `printable`: %x21-2B / %x2D-7E, i.e. visible ASCII except ','.
fn is_printable(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

fn utf8(msg: &[u8]) -> Result<&str, AuthError> {
    std::str::from_utf8(msg).map_err(|_| AuthError::Malformed("message is not UTF-8"))
}

fn decode_key(b64: &str) -> Option<[u8; KEY_LEN]> {
    B64.decode(b64).ok()?.try_into().ok()
}

fn random_nonce() -> String {
    let mut raw = [0u8; RAW_NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut raw);
    B64.encode(raw)
}

/// RFC 5802 `Hi()`: PBKDF2-HMAC-SHA-256 with a single output block.
fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    let keyed = new_hmac(password.as_bytes());
    let mut mac = keyed.clone();
    mac.update(salt);
    mac.update(&1u32.to_be_bytes());
    let mut u: [u8; 32] = mac.finalize().into_bytes().into();
    let mut result = u;
    for _ in 1..iterations {
        let mut mac = keyed.clone();
        mac.update(&u);
        u = mac.finalize().into_bytes().into();
        for (r, x) in result.iter_mut().zip(u) {
            *r ^= x;
        }
    }
    result
}

/// HMAC-SHA-256 of the concatenation of `parts`.
fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = new_hmac(key);
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

fn new_hmac(key: &[u8]) -> HmacSha256 {
    // HMAC takes keys of any length (RFC 2104: longer ones are hashed, shorter ones padded);
    // `new_from_slice` returns a Result only because it shares the trait of fixed-key MACs.
    HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length")
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

fn xor(a: &[u8; 32], b: &[u8; 32]) -> [u8; 32] {
    std::array::from_fn(|i| a[i] ^ b[i])
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    // RFC 7677 section 3.
    const RFC_CLIENT_NONCE: &str = "rOprNGfwEbeRWgbNEkqO";
    const RFC_SERVER_NONCE: &str = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0";
    const RFC_SALT: &str = "W22ZaJ0SNY7soEsUEjb6gQ==";
    const RFC_CLIENT_FIRST: &str = "n,,n=user,r=rOprNGfwEbeRWgbNEkqO";
    const RFC_SERVER_FIRST: &str =
        "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096";
    const RFC_CLIENT_FINAL: &str = "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,\
        p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
    const RFC_SERVER_FINAL: &str = "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";

    fn rfc_salt() -> Vec<u8> {
        B64.decode(RFC_SALT).unwrap()
    }

    fn rfc_verifier() -> ScramVerifier {
        ScramVerifier::from_password("pencil", &rfc_salt(), 4096)
    }

    /// A server that has seen a client-first with `gs2` and is waiting for client-final.
    fn server_after_first(verifier: ScramVerifier, gs2: &str) -> ScramServer {
        let mut server = ScramServer::with_nonce(verifier, RFC_SERVER_NONCE);
        let first = format!("{gs2}n=user,r={RFC_CLIENT_NONCE}");
        server.client_first(first.as_bytes()).unwrap();
        server
    }

    #[test]
    fn a_cleartext_password_is_checked_against_the_verifier() {
        let v = ScramVerifier::from_password("s3cret", b"0123456789abcdef", 4096);
        let key = v.check_password("s3cret").expect("right password");
        assert_eq!(
            key,
            client_key_from_password("s3cret", b"0123456789abcdef", 4096)
        );
        assert!(v.check_password("s3cret ").is_none());
        assert!(v.check_password("").is_none());
    }

    #[test]
    fn rfc7677_server() {
        let verifier = rfc_verifier();
        let mut server = ScramServer::with_nonce(verifier.clone(), RFC_SERVER_NONCE);
        let server_first = server.client_first(RFC_CLIENT_FIRST.as_bytes()).unwrap();
        assert_eq!(server_first, RFC_SERVER_FIRST.as_bytes());
        let (server_final, client_key) = server.client_final(RFC_CLIENT_FINAL.as_bytes()).unwrap();
        assert_eq!(server_final, RFC_SERVER_FINAL.as_bytes());
        assert_eq!(
            client_key,
            client_key_from_password("pencil", &rfc_salt(), 4096)
        );
        assert_eq!(sha256(&client_key), verifier.stored_key);
        // The exchange is over.
        assert!(server.client_final(RFC_CLIENT_FINAL.as_bytes()).is_err());
        assert!(server.client_first(RFC_CLIENT_FIRST.as_bytes()).is_err());
    }

    #[test]
    fn rfc7677_client() {
        let verifier = rfc_verifier();
        let client_key = client_key_from_password("pencil", &rfc_salt(), 4096);
        let mut client = ScramClient::with_nonce(client_key, verifier.server_key, RFC_CLIENT_NONCE);
        assert_eq!(client.client_first(), b"n,,n=,r=rOprNGfwEbeRWgbNEkqO");
        // The RFC's client sent "n=user"; make ours say the same to reproduce its proof.
        client.client_first_bare = "n=user,r=rOprNGfwEbeRWgbNEkqO".to_owned();
        let client_final = client.server_first(RFC_SERVER_FIRST.as_bytes()).unwrap();
        assert_eq!(client_final, RFC_CLIENT_FINAL.as_bytes());
        client.server_final(RFC_SERVER_FINAL.as_bytes()).unwrap();
    }

    #[test]
    fn round_trip_with_keys() {
        let salt = b"some salt bytes!";
        let verifier = ScramVerifier::from_password("alice-pw", salt, 4096);
        let client_key = client_key_from_password("alice-pw", salt, 4096);

        // As the pooler does: log in with keys only, against a server holding the verifier.
        let mut client = ScramClient::new(client_key, verifier.server_key);
        let mut server = ScramServer::new(verifier.clone());
        let server_first = server.client_first(&client.client_first()).unwrap();
        let client_final = client.server_first(&server_first).unwrap();
        let (server_final, learned) = server.client_final(&client_final).unwrap();
        assert_eq!(learned, client_key);
        client.server_final(&server_final).unwrap();

        // And a second hop with the key the server learned, as gateway then pooler do.
        let mut client = ScramClient::new(learned, verifier.server_key);
        let mut server = ScramServer::new(verifier);
        let server_first = server.client_first(&client.client_first()).unwrap();
        let client_final = client.server_first(&server_first).unwrap();
        let (server_final, again) = server.client_final(&client_final).unwrap();
        assert_eq!(again, client_key);
        client.server_final(&server_final).unwrap();
    }

    #[test]
    fn random_nonces_differ() {
        let v = rfc_verifier();
        let mut a = ScramServer::new(v.clone());
        let mut b = ScramServer::new(v);
        let first = RFC_CLIENT_FIRST.as_bytes();
        let (a, b) = (
            a.client_first(first).unwrap(),
            b.client_first(first).unwrap(),
        );
        assert_ne!(a, b);
        // 20 client bytes + 24 server bytes of base64, then ",s=".
        assert_eq!(a.iter().position(|&c| c == b','), Some(2 + 20 + 24));
    }

    #[test]
    fn wrong_password_is_invalid_proof() {
        let salt = rfc_salt();
        let verifier = ScramVerifier::from_password("pencil", &salt, 4096);
        let wrong_key = client_key_from_password("pencil!", &salt, 4096);
        let mut client = ScramClient::new(wrong_key, verifier.server_key);
        let mut server = ScramServer::new(verifier);
        let server_first = server.client_first(&client.client_first()).unwrap();
        let client_final = client.server_first(&server_first).unwrap();
        assert_eq!(
            server.client_final(&client_final),
            Err(AuthError::InvalidProof)
        );
    }

    #[test]
    fn mock_verifier_fails_at_the_proof() {
        let secret = [7u8; 32];
        let mock = ScramVerifier::mock("nobody", &secret);
        assert_eq!(mock.iterations, 4096);
        assert_eq!(mock.salt.len(), 16);
        // Deterministic per (user, secret), different across users and secrets.
        assert_eq!(mock.salt, ScramVerifier::mock("nobody", &secret).salt);
        assert_ne!(mock.salt, ScramVerifier::mock("nobody2", &secret).salt);
        assert_ne!(mock.salt, ScramVerifier::mock("nobody", &[8u8; 32]).salt);

        let client_key = client_key_from_password("guess", &mock.salt, mock.iterations);
        let mut client = ScramClient::new(client_key, [0; 32]);
        let mut server = ScramServer::new(mock);
        let server_first = server.client_first(&client.client_first()).unwrap();
        let client_final = client.server_first(&server_first).unwrap();
        assert_eq!(
            server.client_final(&client_final),
            Err(AuthError::InvalidProof)
        );
    }

    #[test]
    fn gs2_headers() {
        let first = |gs2: &str| {
            let mut server = ScramServer::with_nonce(rfc_verifier(), RFC_SERVER_NONCE);
            server.client_first(format!("{gs2}n=user,r={RFC_CLIENT_NONCE}").as_bytes())
        };
        assert!(first("n,,").is_ok());
        assert!(first("y,,").is_ok());
        assert_eq!(
            first("p=tls-server-end-point,,"),
            Err(AuthError::ChannelBindingNotSupported)
        );
        assert!(matches!(first("n,a=admin,"), Err(AuthError::Malformed(_))));
        assert!(matches!(first("x,,"), Err(AuthError::Malformed(_))));
        assert!(matches!(first("n,,m=ext,"), Err(AuthError::Malformed(_))));

        // With "y,,", the channel binding must be base64("y,,") = "eSws".
        let final_msg = |cbind: &str| {
            let proof = RFC_CLIENT_FINAL.rsplit_once(",p=").unwrap().1;
            format!("c={cbind},r={RFC_CLIENT_NONCE}{RFC_SERVER_NONCE},p={proof}")
        };
        let mut server = server_after_first(rfc_verifier(), "y,,");
        // The proof was made over another AuthMessage, but the binding is checked first.
        assert_eq!(
            server.client_final(final_msg("eSws").as_bytes()),
            Err(AuthError::InvalidProof)
        );
        let mut server = server_after_first(rfc_verifier(), "y,,");
        assert!(matches!(
            server.client_final(final_msg("biws").as_bytes()),
            Err(AuthError::Malformed(_))
        ));
        let mut server = server_after_first(rfc_verifier(), "n,,");
        assert!(matches!(
            server.client_final(final_msg("eSws").as_bytes()),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn client_final_nonce_checks() {
        let proof = "dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=";
        for nonce in [
            "rOprNGfwEbeRWgbNEkqO".to_owned(),
            format!("{RFC_CLIENT_NONCE}{RFC_SERVER_NONCE}x"),
            format!("{RFC_CLIENT_NONCE}x{RFC_SERVER_NONCE}"),
            format!("x{RFC_CLIENT_NONCE}{RFC_SERVER_NONCE}"),
            RFC_SERVER_NONCE.to_owned(),
        ] {
            let mut server = server_after_first(rfc_verifier(), "n,,");
            let msg = format!("c=biws,r={nonce},p={proof}");
            assert_eq!(
                server.client_final(msg.as_bytes()),
                Err(AuthError::NonceMismatch),
                "{nonce}"
            );
        }
    }

    #[test]
    fn client_final_extensions_are_part_of_auth_message() {
        // An extension before the proof is ignored but signed; the RFC proof no longer fits.
        let mut server = server_after_first(rfc_verifier(), "n,,");
        let msg = RFC_CLIENT_FINAL.replace(",p=", ",x=ext,p=");
        assert_eq!(
            server.client_final(msg.as_bytes()),
            Err(AuthError::InvalidProof)
        );
    }

    #[test]
    fn client_checks_server() {
        let verifier = rfc_verifier();
        let client_key = client_key_from_password("pencil", &rfc_salt(), 4096);
        let start = || {
            let mut client =
                ScramClient::with_nonce(client_key, verifier.server_key, RFC_CLIENT_NONCE);
            client.client_first();
            client
        };

        let mut client = start();
        client.server_first(RFC_SERVER_FIRST.as_bytes()).unwrap();
        let bad = "v=7rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=";
        assert_eq!(
            client.server_final(bad.as_bytes()),
            Err(AuthError::ServerSignatureMismatch)
        );

        // A server that does not extend our nonce, or changes it.
        for server_first in [
            "r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "r=xOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        ] {
            let mut client = start();
            assert_eq!(
                client.server_first(server_first.as_bytes()),
                Err(AuthError::NonceMismatch)
            );
        }

        for server_first in [
            "m=ext,r=rOprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0",
            "r=rOprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=-1",
            "r=rOprNGfwEbeRWgbNEkqOabc,s=***,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOabc,i=4096",
            "r=rOprNGfwEbeRWgbNEkqOabc,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096,junk",
        ] {
            let mut client = start();
            assert!(
                matches!(
                    client.server_first(server_first.as_bytes()),
                    Err(AuthError::Malformed(_))
                ),
                "{server_first}"
            );
        }

        for server_final in [
            "e=invalid-proof",
            "",
            "v=",
            "v=***",
            &format!("{RFC_SERVER_FINAL},x=1"),
        ] {
            let mut client = start();
            client.server_first(RFC_SERVER_FIRST.as_bytes()).unwrap();
            assert!(
                client.server_final(server_final.as_bytes()).is_err(),
                "{server_final}"
            );
        }

        // Out of turn.
        let mut client = ScramClient::new(client_key, verifier.server_key);
        assert!(client.server_first(RFC_SERVER_FIRST.as_bytes()).is_err());
        assert!(client.server_final(RFC_SERVER_FINAL.as_bytes()).is_err());
    }

    #[test]
    fn verifier_debug_is_redacted() {
        let v = rfc_verifier();
        let text = format!("{v:?}");
        assert!(text.contains("<redacted>"), "{text}");
        assert!(!text.contains(&format!("{:?}", v.stored_key)), "{text}");
        assert!(!text.contains(&B64.encode(v.server_key)), "{text}");
    }

    /// Garbage, truncations and byte flips of valid messages into every parser: errors are
    /// fine, panics are not.
    #[test]
    fn garbage_never_panics() {
        let mut rng = StdRng::seed_from_u64(0x5c7a);
        let valid: [&[u8]; 5] = [
            RFC_CLIENT_FIRST.as_bytes(),
            RFC_SERVER_FIRST.as_bytes(),
            RFC_CLIENT_FINAL.as_bytes(),
            RFC_SERVER_FINAL.as_bytes(),
            b"SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$\
              AUYjK+KvF15RAr+VDOTWegQcMS8F9x1QxoBvcQm8MlM=:QKG9hnYv/N90pGsQxz+kC6Adj9ftgy9O8SWB1CMErZI=",
        ];
        let alphabet = b"nyp=,rcsiv$:mxa\0\xff\xc3+/=0123456789ABCabc";
        let mut inputs: Vec<Vec<u8>> = Vec::new();
        for msg in valid {
            for cut in 0..=msg.len() {
                inputs.push(msg[..cut].to_vec());
                inputs.push(msg[cut..].to_vec());
            }
            for _ in 0..200 {
                let mut m = msg.to_vec();
                for _ in 0..rng.gen_range(1..4) {
                    let i = rng.gen_range(0..m.len());
                    match rng.gen_range(0..3) {
                        0 => m[i] = alphabet[rng.gen_range(0..alphabet.len())],
                        1 => {
                            m.remove(i);
                        }
                        _ => m.insert(i, alphabet[rng.gen_range(0..alphabet.len())]),
                    }
                }
                inputs.push(m);
            }
        }
        for _ in 0..500 {
            let len = rng.gen_range(0..80);
            inputs.push(
                (0..len)
                    .map(|_| alphabet[rng.gen_range(0..alphabet.len())])
                    .collect(),
            );
        }

        let verifier = rfc_verifier();
        let client_key = client_key_from_password("pencil", &rfc_salt(), 4096);
        for input in &inputs {
            let _ = ScramServer::with_nonce(verifier.clone(), RFC_SERVER_NONCE).client_first(input);
            let _ = server_after_first(verifier.clone(), "n,,").client_final(input);

            let mut client =
                ScramClient::with_nonce(client_key, verifier.server_key, RFC_CLIENT_NONCE);
            client.client_first();
            let _ = client.server_first(input);
            let mut client =
                ScramClient::with_nonce(client_key, verifier.server_key, RFC_CLIENT_NONCE);
            client.client_first();
            client.server_first(RFC_SERVER_FIRST.as_bytes()).unwrap();
            let _ = client.server_final(input);

            let text = String::from_utf8_lossy(input);
            let _ = super::super::Verifier::parse(&text);
            let _ = super::super::md5_verify(&text, [1, 2, 3, 4], input);
            let _ = super::super::md5_challenge_response(&text, [1, 2, 3, 4]);
        }
    }
}
