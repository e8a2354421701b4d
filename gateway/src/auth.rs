//! Client authentication by passthrough: the client proves its password against the role's
//! own verifier from `pg_authid` (looked up by the pooler), and the SCRAM exchange leaves us the
//! client key, with which the pooler logs in to Postgres as that role. No password is stored
//! anywhere in Tidepool.

use crate::config::AuthMethod;
use crate::core::Core;
use crate::link::Link;
use crate::refusal::{fatal, Refusal};
use crate::session_io::SessionIo;
use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use shared::auth::{md5_verify, ScramServer, ScramVerifier, Verifier};
use shared::io::MessageReader;
use shared::link::{down, up, Credential};
use shared::protocol::backend as be;
use shared::protocol::frontend::{self as fe, parse_sasl_initial};
use shared::protocol::typed_message_len;
use shared::role::RoleInfo;
use tidepool_gateway::hba::{Login, Method, Transport};

fn failed(user: &str) -> Refusal {
    fatal(
        "28P01",
        &format!("password authentication failed for user \"{user}\""),
    )
}

/// Authentication messages are small; anything larger is an attack or a bug.
const MAX_AUTH_MESSAGE: usize = 16 * 1024;

/// Who logs in, to what, and how they came.
pub struct Client<'a> {
    pub user: &'a str,
    pub database: &'a str,
    pub transport: Transport,
}

/// Chooses the method (the access rules of `hba_file`, else `auth_method`), looks the role up
/// and runs the exchange. Returns what the pooler needs to log in as the role, and what
/// Postgres says of the role and database for [`crate::access::admit`]. The exchange's last
/// message (SCRAM's server signature), which the client does not answer, is left in `last` for
/// the caller to send with what follows it.
#[allow(clippy::too_many_arguments)]
pub async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    core: &Core,
    stream: &mut S,
    reader: &mut MessageReader,
    io: &SessionIo,
    link: &Link,
    id: u32,
    client: &Client<'_>,
    last: &mut Vec<u8>,
) -> Result<(Credential, RoleInfo), Refusal> {
    let cfg = core.cfg();
    let Client {
        user,
        database,
        transport,
    } = *client;
    let mut info = None;
    let method = match &cfg.hba {
        None => match cfg.auth_method {
            AuthMethod::Scram => Method::Scram,
            AuthMethod::Md5 => Method::Md5,
            AuthMethod::Trust => Method::Trust,
        },
        Some(rules) => {
            if rules.uses_groups() {
                info = Some(lookup(stream, reader, io, link, id, client).await?);
            }
            let login = Login {
                transport,
                user,
                database,
                member_of: info.as_ref().map(|i: &RoleInfo| i.member_of.as_slice()),
            };
            // Postgres's words (auth.c `ClientAuthentication`), 28000 for both.
            let Some(method) = rules.method(&login) else {
                return Err(fatal(
                    "28000",
                    &format!(
                        "no pg_hba.conf entry for host \"{}\", user \"{user}\", database \"{database}\", {}",
                        transport.host(),
                        transport.encryption()
                    ),
                ));
            };
            method
        }
    };
    if method == Method::Reject {
        return Err(fatal(
            "28000",
            &format!(
                "pg_hba.conf rejects connection for host \"{}\", user \"{user}\", database \"{database}\", {}",
                transport.host(),
                transport.encryption()
            ),
        ));
    }
    let info = match info {
        Some(i) => i,
        None => lookup(stream, reader, io, link, id, client).await?,
    };
    // An expired password is no password (Postgres's `get_role_password`).
    let verifier = match (&info.password, info.expired) {
        (Some(p), false) => Verifier::parse(p),
        _ => None,
    };
    tracing::debug!(
        user,
        found = info.exists,
        ?method,
        kind = match &verifier {
            Some(Verifier::Scram(_)) => "scram",
            Some(Verifier::Md5(_)) => "md5",
            None => "none",
        },
        "role looked up"
    );
    let credential = match (method, verifier) {
        (Method::Trust, _) => Credential::None,
        (Method::Password, v) => cleartext(stream, reader, user, v).await?,
        (_, Some(Verifier::Scram(v))) => scram(stream, reader, user, v, true, last).await?,
        (Method::Md5, Some(Verifier::Md5(stored))) => md5(stream, reader, user, &stored).await?,
        // Unknown role, no password, or md5 where SCRAM is required: go through the motions
        // with a mock verifier, as Postgres does, so the client cannot tell which.
        _ => {
            let mock = ScramVerifier::mock(user, &core.mock_secret);
            scram(stream, reader, user, mock, false, last).await?
        }
    };
    Ok((credential, info))
}

/// What the pooler's admin connection reads of the role and database (one batched query with
/// other logins', cached).
async fn lookup<S: AsyncRead + Unpin>(
    stream: &mut S,
    reader: &mut MessageReader,
    io: &SessionIo,
    link: &Link,
    id: u32,
    client: &Client<'_>,
) -> Result<RoleInfo, Refusal> {
    link.send(
        up::AUTH_LOOKUP,
        id,
        &shared::role::lookup_payload(client.user, client.database),
    );
    let (kind, info) = await_control(io, stream, reader).await?;
    if kind != down::AUTH_INFO {
        return Err(fatal("08006", "the pooler did not answer the role lookup"));
    }
    match info.first() {
        Some(1) => RoleInfo::decode(&info[1..])
            .ok_or_else(|| fatal("08006", "the pooler's role lookup answer is malformed")),
        _ => {
            tracing::warn!(reason = %String::from_utf8_lossy(info.get(1..).unwrap_or_default()), "role lookup failed");
            Err(fatal(
                "08006",
                "could not look up the role: the database server is not available",
            ))
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

/// `last`: where the server's final message goes (not sent here: see [`authenticate`]).
async fn scram<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    reader: &mut MessageReader,
    user: &str,
    verifier: ScramVerifier,
    real: bool,
    last: &mut Vec<u8>,
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
            be::auth_sasl_final(last, &fin);
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

/// The `password` method: the password in clear (only sensible over TLS), checked against the
/// role's verifier as Postgres's `CheckPasswordAuth` does. From a SCRAM verifier it yields the
/// client key the pooler logs in with, as a SCRAM exchange would.
async fn cleartext<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    reader: &mut MessageReader,
    user: &str,
    verifier: Option<Verifier>,
) -> Result<Credential, Refusal> {
    let mut out = Vec::new();
    be::auth_cleartext(&mut out);
    send(stream, &out).await?;
    let body = read_password(stream, reader).await?;
    let password = body.strip_suffix(&[0]).unwrap_or(&body);
    let Ok(password) = std::str::from_utf8(password) else {
        return Err(failed(user));
    };
    if password.is_empty() {
        return Err(failed(user));
    }
    match verifier {
        Some(Verifier::Scram(v)) => match v.check_password(password) {
            Some(client_key) => Ok(Credential::Scram {
                client_key,
                server_key: v.server_key,
            }),
            None => Err(failed(user)),
        },
        Some(Verifier::Md5(stored)) if shared::auth::md5_stored(password, user) == stored => {
            Ok(Credential::Md5 { stored })
        }
        _ => Err(failed(user)),
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
