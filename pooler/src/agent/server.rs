//! The agent's listener: one JSON request per line, one JSON response per line, in order.
//! Lines are bounded (shared::agent::MAX_LINE); a line that is not a request is answered with
//! `Refused`, never a panic; an idle connection is closed after a minute.

use super::Agent;
use shared::agent::{Request, Response, MAX_LINE};
use std::cell::Cell;
use std::rc::Rc;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// Connections served at once; more are closed at once (the control uses a handful).
const MAX_CONNECTIONS: usize = 64;
const IDLE: Duration = Duration::from_secs(60);

pub async fn serve(agent: Rc<Agent>, listener: std::net::TcpListener) {
    let listener = match tokio::net::TcpListener::from_std(listener) {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "agent listener; no node agent");
            return;
        }
    };
    let open = Rc::new(Cell::new(0usize));
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
                tokio::task::spawn_local(async move {
                    if let Err(e) = connection(&agent, stream).await {
                        tracing::debug!(%peer, error = %e, "agent connection ended");
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

async fn connection(agent: &Agent, stream: TcpStream) -> std::io::Result<()> {
    let _ = stream.set_nodelay(true);
    let (r, mut w) = stream.into_split();
    let mut r = BufReader::new(r);
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = match tokio::time::timeout(
            IDLE,
            (&mut r)
                .take(MAX_LINE as u64 + 1)
                .read_until(b'\n', &mut line),
        )
        .await
        {
            Ok(n) => n?,
            Err(_) => return Ok(()),
        };
        if n == 0 {
            return Ok(());
        }
        let too_long = line.len() > MAX_LINE || !line.ends_with(b"\n");
        let response = if too_long && line.len() > MAX_LINE {
            Response::Refused {
                reason: format!("request longer than {MAX_LINE} bytes"),
                report: None,
            }
        } else {
            match serde_json::from_slice::<Request>(&line) {
                Ok(req) => handle(agent, req).await,
                Err(e) => Response::Refused {
                    reason: format!("not a request: {e}"),
                    report: None,
                },
            }
        };
        let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
        out.push(b'\n');
        w.write_all(&out).await?;
        if too_long {
            // The rest of an oversized line cannot be told from the next request.
            return Ok(());
        }
    }
}

pub async fn handle(agent: &Agent, req: Request) -> Response {
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
