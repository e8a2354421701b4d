//! The agent's listener: first the handshake (shared::agent::auth: the peer proves it holds
//! the cluster's agent secret, then the agent proves it), then one JSON request per line, one
//! JSON response per line, in order, each line with its MAC.
//!
//! A peer that fails the handshake gets one refusal ("authentication failed") and the
//! connection is closed: no report, no term, nothing else. The handshake must finish within
//! `HANDSHAKE` (a silent peer does not hold one of the few connection slots for long). Lines
//! are bounded (shared::agent::MAX_LINE); a line that is not a valid request is answered with
//! `Refused`, never a panic; an idle connection is closed after a minute.
//!
//! With `agent_tls_cert` every connection is TLS first (the control process checks the
//! certificate against the cluster's CA), within the same `HANDSHAKE` bound; a peer that does
//! not speak TLS gets nothing at all. The secret's handshake and line MACs run inside as before.

use super::Agent;
use shared::agent::auth::{AuthError, ServerHandshake};
use shared::agent::{Request, Response, MAX_LINE};
use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Connections served at once; more are closed at once (the control uses a handful).
const MAX_CONNECTIONS: usize = 64;
const IDLE: Duration = Duration::from_secs(60);
const HANDSHAKE: Duration = Duration::from_secs(5);

pub async fn serve(agent: Rc<Agent>, listener: std::net::TcpListener) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "agent listener; no node agent");
            return;
        }
    };
    let open = Rc::new(Cell::new(0usize));
    let tls = agent
        .cfg
        .tls
        .as_ref()
        .map(|t| tokio_rustls::TlsAcceptor::from(t.config.clone()));
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                if open.get() >= MAX_CONNECTIONS {
                    tracing::warn!(%peer, "too many agent connections; closing one");
                    continue;
                }
                open.set(open.get() + 1);
                let agent = agent.clone();
                let open = open.clone();
                let tls = tls.clone();
                tokio::task::spawn_local(async move {
                    if let Err(e) = accept(&agent, tls, stream).await {
                        if e.kind() == std::io::ErrorKind::PermissionDenied {
                            tracing::warn!(%peer, error = %e, "agent connection refused");
                        } else {
                            tracing::debug!(%peer, error = %e, "agent connection ended");
                        }
                    }
                    open.set(open.get() - 1);
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "agent accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// One line of at most MAX_LINE bytes (with its newline); `None` at the end of the stream.
/// A longer line is an error: its rest cannot be told from the next request.
async fn read_line(
    r: &mut (impl tokio::io::AsyncBufRead + Unpin),
    line: &mut Vec<u8>,
) -> std::io::Result<Option<()>> {
    line.clear();
    let n = (&mut *r)
        .take(MAX_LINE as u64 + 1)
        .read_until(b'\n', line)
        .await?;
    if n == 0 {
        return Ok(None);
    }
    if line.len() > MAX_LINE || !line.ends_with(b"\n") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("a line longer than {MAX_LINE} bytes, or cut short"),
        ));
    }
    Ok(Some(()))
}

fn refusal(reason: &str) -> Vec<u8> {
    let mut out = serde_json::to_vec(&Response::Refused {
        reason: reason.into(),
        report: None,
    })
    .unwrap_or_default();
    out.push(b'\n');
    out
}

/// TLS first when the agent has a certificate, then the connection.
async fn accept(
    agent: &Agent,
    tls: Option<tokio_rustls::TlsAcceptor>,
    stream: TcpStream,
) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let Some(tls) = tls else {
        return connection(agent, stream).await;
    };
    match tokio::time::timeout(HANDSHAKE, tls.accept(stream)).await {
        Ok(Ok(s)) => connection(agent, s).await,
        Ok(Err(e)) => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("TLS handshake: {e}"),
        )),
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            "no TLS handshake within the timeout",
        )),
    }
}

async fn connection<S: AsyncRead + AsyncWrite>(agent: &Agent, stream: S) -> std::io::Result<()> {
    let (r, w) = tokio::io::split(stream);
    // Each line is flushed: a TLS stream holds written records until flushed.
    let mut w = Flushing(w);
    let mut r = BufReader::new(r);
    let mut line = Vec::new();

    // The handshake. Before it succeeds nothing but the challenge and a refusal is written.
    let hs = ServerHandshake::new(&agent.key);
    w.send(&hs.challenge()).await?;
    let got = tokio::time::timeout(HANDSHAKE, read_line(&mut r, &mut line)).await;
    let verified = match got {
        Ok(Ok(Some(()))) => hs.verify(&line),
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(_)) => Err(AuthError::Malformed("line too long".into())),
        Err(_) => Err(AuthError::Malformed("no answer to the challenge".into())),
    };
    let mut sealed = match verified {
        Ok((proof, sealed)) => {
            w.send(&proof).await?;
            sealed
        }
        Err(e) => {
            let _ = w.send(&refusal("authentication failed")).await;
            return Err(std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!("handshake: {e}"),
            ));
        }
    };

    loop {
        match tokio::time::timeout(IDLE, read_line(&mut r, &mut line)).await {
            Err(_) | Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => {
                let too_long = Response::Refused {
                    reason: format!("request longer than {MAX_LINE} bytes"),
                    report: None,
                };
                let out = serde_json::to_vec(&too_long).map_err(std::io::Error::other)?;
                w.send(&sealed.seal(&out)).await?;
                return Err(e);
            }
            Ok(Ok(Some(()))) => {}
        }
        // A line whose MAC does not check is not from the peer that authenticated (or was
        // altered on the way): the connection ends without an answer.
        let json = sealed.open(&line).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::PermissionDenied, format!("line: {e}"))
        })?;
        let response = match serde_json::from_slice::<Request>(json) {
            Ok(req) => handle(agent, req).await,
            Err(e) => Response::Refused {
                reason: format!("not a request: {e}"),
                report: None,
            },
        };
        let out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
        w.send(&sealed.seal(&out)).await?;
    }
}

/// A request, validated first (shared::agent::validate): an invalid one changes nothing.
pub async fn handle(agent: &Agent, req: Request) -> Response {
    if let Err(reason) = req.validate() {
        tracing::warn!(%reason, "agent request refused: invalid");
        return Response::Refused {
            reason: format!("invalid request: {reason}"),
            report: None,
        };
    }
    if matches!(req, Request::Report) {
        return Response::Ok {
            report: agent.report().await,
        };
    }
    let started = std::time::Instant::now();
    let op = format!("{req:?}");
    let response = operation(agent, req).await;
    let result = match &response {
        Response::Ok { .. } => "ok",
        Response::Refused { .. } => "refused",
    };
    tracing::info!(%op, result, took_ms = started.elapsed().as_millis() as u64, "agent operation answered");
    response
}

async fn operation(agent: &Agent, req: Request) -> Response {
    match req {
        Request::Report => Response::Ok {
            report: agent.report().await,
        },
        Request::Recruit { term } => agent.recruit(term).await,
        Request::Promote { term, sync_names } => agent.promote(term, &sync_names).await,
        Request::Follow { term, primary } => agent.follow(term, &primary).await,
        Request::SetSync { term, sync_names } => agent.set_sync(term, &sync_names).await,
    }
}

/// The writing half; every line goes out at once (`flush` after each: the TLS stream keeps
/// records in its buffer until then; for plain TCP it is a no-op).
struct Flushing<W>(W);

impl<W: AsyncWrite + Unpin> Flushing<W> {
    async fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.0.write_all(bytes).await?;
        self.0.flush().await
    }
}
