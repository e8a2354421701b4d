//! How a login ends early, whichever check refused it: authentication (auth.rs), the checks
//! Postgres makes at backend start (access.rs), or the pooler's answer (session.rs).

use shared::protocol::backend::{self as be, Severity};

/// How a login ended early.
pub enum Refusal {
    /// Send this FATAL error, then close.
    Fatal(Vec<u8>),
    /// The client went away.
    Gone,
}

/// A FATAL `ErrorResponse` with this SQLSTATE and message.
pub fn fatal(code: &str, msg: &str) -> Refusal {
    let mut e = Vec::new();
    be::error_response(&mut e, Severity::Fatal, code, msg);
    Refusal::Fatal(e)
}
