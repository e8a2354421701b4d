//! Opening a connection to Postgres and logging in as a role, with the SCRAM keys the gateway
//! learned from the client (or the stored md5 hash, or nothing under `trust`).

use futures_lite::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use shared::auth::{md5_challenge_response, ScramClient};
use shared::io::MessageReader;
use shared::link::Credential;
use shared::protocol::backend::{self as be, Severity};
use shared::protocol::{frontend, read_i32, typed_message_len};

/// Why a login failed.
#[derive(Debug)]
pub enum LoginError {
    /// Postgres refused us: its raw `ErrorResponse` (passed to the client as is).
    Postgres(Vec<u8>),
    /// Network or protocol trouble: a message for an error of our own.
    Other(String),
    /// No backend came free within `query_wait_timeout_ms`.
    WaitTimeout,
}

impl LoginError {
    /// An `ErrorResponse` message for the client.
    pub fn to_message(&self) -> Vec<u8> {
        match self {
            LoginError::Postgres(m) => m.clone(),
            LoginError::Other(why) => {
                let mut out = Vec::new();
                be::error_response(
                    &mut out,
                    Severity::Fatal,
                    "08006",
                    &format!("could not connect to the database server: {why}"),
                );
                out
            }
            // PgBouncer's words and SQLSTATE, so that what operators grep for is the same.
            LoginError::WaitTimeout => {
                let mut out = Vec::new();
                be::error_response(&mut out, Severity::Fatal, "08P01", "query_wait_timeout");
                out
            }
        }
    }
}

pub struct LoggedIn {
    pub pid: i32,
    pub secret: i32,
    pub params: Vec<(String, String)>,
    /// Bytes read past the first `ReadyForQuery` (none in practice).
    pub leftover: Vec<u8>,
}

/// Runs the startup and authentication exchange on an open stream.
pub async fn login<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    user: &str,
    database: &str,
    credential: &Credential,
    max_message: usize,
) -> Result<LoggedIn, LoginError> {
    let io = |e: std::io::Error| LoginError::Other(e.to_string());
    let mut out = Vec::new();
    frontend::startup_message(&mut out, &[("user", user), ("database", database)]);
    stream.write_all(&out).await.map_err(io)?;
    let mut reader = MessageReader::new(1024);
    let mut scram: Option<ScramClient> = None;
    let mut result = LoggedIn {
        pid: 0,
        secret: 0,
        params: Vec::new(),
        leftover: Vec::new(),
    };
    loop {
        let n = match typed_message_len(reader.data(), max_message) {
            Ok(Some(n)) => n,
            Ok(None) => {
                if reader.fill(stream, 0).await.map_err(io)? == 0 {
                    return Err(LoginError::Other("server closed the connection".into()));
                }
                continue;
            }
            Err(e) => return Err(LoginError::Other(e.to_string())),
        };
        let msg = reader.data()[..n].to_vec();
        reader.consume(n);
        let body = &msg[5..];
        out.clear();
        match msg[0] {
            be::AUTHENTICATION => {
                let mut pos = 0;
                let code =
                    read_i32(body, &mut pos).map_err(|e| LoginError::Other(e.to_string()))?;
                match (code, credential) {
                    (be::AUTH_OK, _) => {}
                    (be::AUTH_SASL, Credential::Scram { client_key, server_key }) => {
                        let mut c = ScramClient::new(*client_key, *server_key);
                        let first = c.client_first();
                        frontend::sasl_initial_response(&mut out, "SCRAM-SHA-256", &first);
                        scram = Some(c);
                    }
                    (be::AUTH_SASL_CONTINUE, _) => {
                        let c = scram
                            .as_mut()
                            .ok_or_else(|| LoginError::Other("unexpected SASL message".into()))?;
                        let fin = c
                            .server_first(&body[4..])
                            .map_err(|e| LoginError::Other(format!("SCRAM: {e}")))?;
                        frontend::password(&mut out, &fin);
                    }
                    (be::AUTH_SASL_FINAL, _) => {
                        let c = scram
                            .as_mut()
                            .ok_or_else(|| LoginError::Other("unexpected SASL message".into()))?;
                        c.server_final(&body[4..])
                            .map_err(|e| LoginError::Other(format!("SCRAM: {e}")))?;
                    }
                    (be::AUTH_MD5, Credential::Md5 { stored }) => {
                        let salt: [u8; 4] = body
                            .get(4..8)
                            .and_then(|s| s.try_into().ok())
                            .ok_or_else(|| LoginError::Other("bad md5 request".into()))?;
                        let mut resp = md5_challenge_response(stored, salt).into_bytes();
                        resp.push(0);
                        frontend::password(&mut out, &resp);
                    }
                    (code, _) => {
                        return Err(LoginError::Other(format!(
                            "server asked for authentication method {code}, which the session's credential cannot answer"
                        )))
                    }
                }
                if !out.is_empty() {
                    stream.write_all(&out).await.map_err(io)?;
                }
            }
            be::BACKEND_KEY_DATA => {
                let mut pos = 0;
                result.pid = read_i32(body, &mut pos).unwrap_or(0);
                result.secret = read_i32(body, &mut pos).unwrap_or(0);
            }
            be::PARAMETER_STATUS => {
                if let Ok((k, v)) = be::parse_parameter_status(body) {
                    result.params.push((
                        String::from_utf8_lossy(k).into_owned(),
                        String::from_utf8_lossy(v).into_owned(),
                    ));
                }
            }
            be::ERROR_RESPONSE => return Err(LoginError::Postgres(msg)),
            be::NOTICE_RESPONSE | be::NEGOTIATE_PROTOCOL_VERSION => {}
            be::READY_FOR_QUERY => {
                result.leftover = reader.data().to_vec();
                return Ok(result);
            }
            other => {
                return Err(LoginError::Other(format!(
                    "unexpected message '{}' during login",
                    other as char
                )))
            }
        }
    }
}

/// Sends a `CancelRequest` for a backend and waits until the postmaster has handled it (it
/// closes the connection after signalling the backend).
pub async fn cancel<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, pid: i32, secret: i32) {
    let mut out = Vec::new();
    frontend::cancel_request(&mut out, pid, secret);
    if stream.write_all(&out).await.is_ok() {
        let mut b = [0u8; 16];
        let _ = stream.read(&mut b).await;
    }
}
