//! Postgres shutting down or crashing under idle sessions (issue 11, point 2). Directly, a fast
//! or smart shutdown (`pg_ctl stop`/`restart -m fast`) ends every client connection with FATAL
//! 57P01 `terminating connection due to administrator command`, and a crash of any backend ends
//! them all with FATAL 57P02 `terminating connection because of crash of another server
//! process`, idle ones included: drivers see a broken connection, pools' checks fail, scripts
//! stop. Through Tidepool a session holds a
//! backend only while its state needs one, so the sessions that hold none would never hear of
//! it and would go on, after the restart, on new backends.
//!
//! When an idle backend gets such a FATAL (responses.rs), this module asks the postmaster
//! whether it is going down: a new connection answered `57P03` (shutting down, in crash
//! recovery, or already starting up again) or refused. `pg_terminate_backend` of one pooled backend gets an answer from a
//! running postmaster instead, and then nothing happens (the pool replaces the backend; the
//! sessions go on). If it is going down, every session of this pooler that holds no backend
//! ends as directly: the backend's own last words and its connection closed (the sessions holding one
//! hear it from their own backend). The core that learns it tells the others. This module only
//! detects and probes; ending the sessions is the core's (`cancel::end_sessions`, registered
//! with [`register`]), so the response state machine that reports the FATAL stays below the
//! core.
//!
//! A stop the node agent makes itself (a switchover, a rewind: `agent/pgctl.rs`) is planned:
//! the gateways move the sessions, which must not end. See
//! docs/decisions/2026-12-07-server-shutdown-ends-idle-sessions.md.

use crate::config::Config;
use glommio::net::TcpStream;
use shared::protocol::backend as be;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// How long the postmaster has to answer the probe; no answer: nothing is concluded.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// What a core does when its probe finds Postgres going down.
struct Hook {
    /// Where the postmaster is, and who the probe logs in as.
    cfg: Rc<Config>,
    /// Ends the sessions holding no backend with these last words, here and on the other cores.
    going_down: Box<dyn Fn(Vec<u8>)>,
}

thread_local! {
    /// This core's hook (one executor per thread), for the sessions a probe may end.
    static HOOK: RefCell<Option<Rc<Hook>>> = const { RefCell::new(None) };
    /// A probe is running on this core: the other backends' FATALs of the same shutdown wait
    /// for its answer.
    static PROBING: Cell<bool> = const { Cell::new(false) };
}

/// Stops of Postgres the node agent is making right now (another thread).
static PLANNED: AtomicUsize = AtomicUsize::new(0);

/// A stop of Postgres the agent makes on purpose, for as long as it lives.
pub struct Planned;

impl Planned {
    pub fn begin() -> Planned {
        PLANNED.fetch_add(1, Ordering::SeqCst);
        Planned
    }
}

impl Drop for Planned {
    fn drop(&mut self) {
        PLANNED.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Called once per core when it starts: `going_down` is called with the FATAL (or WARNING) that
/// made a probe find Postgres going down, unless the agent is stopping it on purpose.
pub fn register(cfg: Rc<Config>, going_down: impl Fn(Vec<u8>) + 'static) {
    let hook = Hook {
        cfg,
        going_down: Box::new(going_down),
    };
    HOOK.with(|h| *h.borrow_mut() = Some(Rc::new(hook)));
}

/// `msg`, a `NoticeResponse`, is the WARNING Postgres sends a client before it closes the
/// connection after a crash or at an immediate shutdown (57P02, 57P01): the backend's last word,
/// after which nothing of ours is said (session.rs).
pub fn last_warning(msg: &[u8]) -> bool {
    matches!(
        msg.get(5..).and_then(be::error_sqlstate),
        Some(b"57P01" | b"57P02")
    )
}

/// An idle backend of this core got `msg`, an `ErrorResponse` (it is being closed) or a
/// `NoticeResponse`. What Postgres says to every client as it goes down: FATAL 57P01 at a
/// fast or smart shutdown; a WARNING before it closes the connection after a crash (57P02) or at
/// an immediate shutdown (57P01) (`quickdie`, postgres.c: a FATAL before Postgres 14).
pub fn idle_backend_said(msg: &[u8]) {
    let code = msg.get(5..).and_then(be::error_sqlstate);
    let going_down = matches!(
        msg.first(),
        Some(&(be::ERROR_RESPONSE | be::NOTICE_RESPONSE))
    ) && matches!(code, Some(b"57P01" | b"57P02"));
    if !going_down || PROBING.get() {
        return;
    }
    let fatal = msg.to_vec();
    let Some(hook) = HOOK.with(|h| h.borrow().clone()) else {
        return;
    };
    PROBING.set(true);
    glommio::spawn_local(async move {
        let down = shutting_down(&hook.cfg).await;
        if down && PLANNED.load(Ordering::SeqCst) == 0 {
            tracing::info!("postgres is shutting down or crashed: sessions holding no backend end");
            (hook.going_down)(fatal);
        }
        PROBING.set(false);
    })
    .detach();
}

/// Whether the postmaster refuses new connections because it is shutting down (or is starting
/// up again after it): a startup packet answered with `57P03`, or no listener at all.
async fn shutting_down(cfg: &Config) -> bool {
    let addr = format!("{}:{}", cfg.pg_host, cfg.pg_port);
    let user = cfg.admin_user.clone();
    let probe = async move {
        let mut stream = match TcpStream::connect(addr.as_str()).await {
            Ok(s) => s,
            Err(_) => return true,
        };
        first_answer_is_57p03(&mut stream, &user).await
    };
    crate::with_timeout(PROBE_TIMEOUT, probe)
        .await
        .unwrap_or(false)
}

/// Sends a startup packet; true if the server's first answer is `ErrorResponse` 57P03 (or the
/// connection is closed unanswered). Anything else (an authentication request) is a server
/// taking connections; the probe hangs up then, which Postgres does not log.
async fn first_answer_is_57p03(stream: &mut TcpStream, user: &str) -> bool {
    use futures_lite::{AsyncReadExt, AsyncWriteExt};
    let mut body = Vec::new();
    body.extend_from_slice(&196608i32.to_be_bytes());
    for (k, v) in [("user", user), ("database", "postgres")] {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as i32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    if stream.write_all(&packet).await.is_err() {
        return true;
    }
    let mut head = [0u8; 5];
    if stream.read_exact(&mut head).await.is_err() {
        return true;
    }
    if head[0] != be::ERROR_RESPONSE {
        return false;
    }
    let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if !(4..=8192).contains(&len) {
        return false;
    }
    let mut rest = vec![0u8; len - 4];
    if stream.read_exact(&mut rest).await.is_err() {
        return false;
    }
    be::error_sqlstate(&rest) == Some(&b"57P03"[..])
}
