//! Client authentication by passthrough: the client proves its password against the role's
//! own verifier from `pg_authid` (looked up by the pooler), and the SCRAM exchange leaves us the
//! client key, with which the pooler logs in to Postgres as that role. No password is stored
//! anywhere in Tidepool.

use crate::config::AuthMethod;
use crate::core::Core;
use crate::link::Link;
use crate::session_io::SessionIo;
use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use shared::auth::{md5_verify, ScramServer, ScramVerifier, Verifier};
use shared::io::MessageReader;
use shared::link::{down, up, Credential};
use shared::protocol::backend::{self as be, Severity};
use shared::protocol::frontend::{self as fe, parse_sasl_initial};
use shared::protocol::typed_message_len;

/// How a login ended early.
pub enum Refusal {
    /// Send this FATAL error, then close.
    Fatal(Vec<u8>),
    /// The client went away.
    Gone,
}

pub fn fatal(code: &str, msg: &str) -> Refusal {
    let mut e = Vec::new();
    be::error_response(&mut e, Severity::Fatal, code, msg);
    Refusal::Fatal(e)
}

fn failed(user: &str) -> Refusal {
    fatal(
        "28P01",
        &format!("password authentication failed for user \"{user}\""),
    )
}

/// Authentication messages are small; anything larger is an attack or a bug.
const MAX_AUTH_MESSAGE: usize = 16 * 1024;

#[allow(clippy::too_many_arguments)]
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    core: &Core,
    stream: &mut S,
    reader: &mut MessageReader,
    io: &SessionIo,
    link: &Link,
    id: u32,
    user: &str,
) -> Result<Credential, Refusal> {
    if core.cfg().auth_method == AuthMethod::Trust {
        return Ok(Credential::None);
    }
    link.send(up::AUTH_LOOKUP, id, user.as_bytes());
    let (kind, info) = await_control(io, stream, reader).await?;
    if kind != down::AUTH_INFO {
        return Err(fatal("08006", "the pooler did not answer the role lookup"));
    }
    let verifier = match info.first() {
        Some(1) => std::str::from_utf8(&info[1..])
            .ok()
            .and_then(Verifier::parse),
        Some(0) => None,
        _ => {
            tracing::warn!(reason = %String::from_utf8_lossy(info.get(1..).unwrap_or_default()), "role lookup failed");
            return Err(fatal(
                "08006",
                "could not look up the role: the database server is not available",
            ));
        }
    };
    tracing::debug!(
        user,
        found = info.first() == Some(&1),
        kind = match &verifier {
            Some(Verifier::Scram(_)) => "scram",
            Some(Verifier::Md5(_)) => "md5",
            None => "none",
        },
        "role looked up"
    );
    match (verifier, core.cfg().auth_method) {
        (Some(Verifier::Scram(v)), _) => scram(stream, reader, user, v, true).await,
        (Some(Verifier::Md5(stored)), AuthMethod::Md5) => md5(stream, reader, user, &stored).await,
        // Unknown role, no password, or md5 where SCRAM is required: go through the motions
        // with a mock verifier, as Postgres does, so the client cannot tell which.
        _ => {
            let mock = ScramVerifier::mock(user, &core.mock_secret);
            scram(stream, reader, user, mock, false).await
        }
    }
}

/// Waits for the pooler's reply while watching the client: a client that gives up during login
/// frees its slot at once rather than at the authentication timeout. Bytes it sends early are
/// kept for later.
pub async fn await_control<S: AsyncRead + Unpin>(
    io: &SessionIo,
    stream: &mut S,
    reader: &mut MessageReader,
) -> Result<(u8, Vec<u8>), Refusal> {
    loop {
        let got = futures_lite::future::or(async { Ok(io.control.take().await) }, async {
            Err(reader.fill(stream, 0).await)
        })
        .await;
        match got {
            Ok(reply) => return Ok(reply),
            Err(Ok(0)) | Err(Err(_)) => return Err(Refusal::Gone),
            Err(Ok(_)) if reader.data().len() > MAX_AUTH_MESSAGE * 64 => {
                return Err(fatal(
                    "08P01",
                    "too much data before authentication completed",
                ))
            }
            Err(Ok(_)) => {}
        }
    }
}

async fn read_password<S: AsyncRead + Unpin>(
    stream: &mut S,
    reader: &mut MessageReader,
) -> Result<Vec<u8>, Refusal> {
    loop {
        match typed_message_len(reader.data(), MAX_AUTH_MESSAGE) {
            Ok(Some(n)) => {
                let msg = reader.data()[..n].to_vec();
                reader.consume(n);
                if msg[0] != fe::PASSWORD {
                    return Err(fatal(
                        "08P01",
                        &format!("expected password response, got message type {}", msg[0]),
                    ));
                }
                return Ok(msg[5..].to_vec());
            }
            Ok(None) => match reader.fill(stream, 0).await {
                Ok(0) | Err(_) => return Err(Refusal::Gone),
                Ok(_) => {}
            },
            Err(_) => return Err(fatal("08P01", "invalid authentication message")),
        }
    }
}

async fn send<S: AsyncWrite + Unpin>(stream: &mut S, bytes: &[u8]) -> Result<(), Refusal> {
    stream.write_all(bytes).await.map_err(|_| Refusal::Gone)
}

async fn scram<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    reader: &mut MessageReader,
    user: &str,
    verifier: ScramVerifier,
    real: bool,
) -> Result<Credential, Refusal> {
    let server_key = verifier.server_key;
    let mut server = ScramServer::new(verifier);
    let mut out = Vec::new();
    be::auth_sasl(&mut out, &["SCRAM-SHA-256"]);
    send(stream, &out).await?;
    let body = read_password(stream, reader).await?;
    let (mech, data) =
        parse_sasl_initial(&body).map_err(|_| fatal("08P01", "malformed SASL message"))?;
    if mech != b"SCRAM-SHA-256" {
        return Err(fatal(
            "08P01",
            "client selected an invalid SASL authentication mechanism",
        ));
    }
    let first = server
        .client_first(data)
        .map_err(|_| fatal("08P01", "malformed SCRAM message"))?;
    out.clear();
    be::auth_sasl_continue(&mut out, &first);
    send(stream, &out).await?;
    let body = read_password(stream, reader).await?;
    match server.client_final(&body) {
        Ok((fin, client_key)) if real => {
            out.clear();
            be::auth_sasl_final(&mut out, &fin);
            send(stream, &out).await?;
            Ok(Credential::Scram {
                client_key,
                server_key,
            })
        }
        Ok(_) | Err(shared::auth::AuthError::InvalidProof) => Err(failed(user)),
        Err(e) => {
            tracing::debug!(user, error = %e, "SCRAM exchange failed");
            Err(fatal("08P01", "malformed SCRAM message"))
        }
    }
}

async fn md5<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    reader: &mut MessageReader,
    user: &str,
    stored: &str,
) -> Result<Credential, Refusal> {
    let salt: [u8; 4] = rand::random();
    let mut out = Vec::new();
    be::auth_md5(&mut out, salt);
    send(stream, &out).await?;
    let body = read_password(stream, reader).await?;
    let response = body.strip_suffix(&[0]).unwrap_or(&body);
    if md5_verify(stored, salt, response) {
        Ok(Credential::Md5 {
            stored: stored.to_owned(),
        })
    } else {
        Err(failed(user))
    }
}
