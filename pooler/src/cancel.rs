//! Cross-core messages, and cancel routing. A gateway forwards a client's `CancelRequest` (its
//! own keys) over any link; the
//! pooler core that gets it asks every core, and the core whose session holds those keys cancels
//! the query running on that session's backend, and nothing else.

use crate::core::{Core, CoreMsg};
use crate::server_tls::Opened;
use glommio::channels::channel_mesh::Receivers;
use glommio::net::TcpStream;
use std::rc::Rc;

pub fn broadcast(core: &Rc<Core>, pid: i32, secret: i32, terminate: bool) {
    if terminate {
        terminate_local(core, pid, secret);
        core.ask_peers(CoreMsg::Terminate(pid, secret));
    } else {
        local(core, pid, secret);
        core.ask_peers(CoreMsg::Cancel(pid, secret));
    }
}

/// Ends the session with these keys as Postgres ends a terminated backend's: FATAL 57P01 to
/// its client, what it was running stopped, its transaction rolled back (the session's end
/// cancels a running query and closes that backend, or rolls an idle transaction back).
pub fn terminate_local(core: &Rc<Core>, pid: i32, secret: i32) {
    let session = core
        .sessions_by_key
        .borrow()
        .get(&(pid, secret))
        .and_then(|w| w.upgrade());
    if let Some(s) = session {
        tracing::debug!(
            session = s.id,
            "session terminated by a client's pg_terminate_backend"
        );
        s.terminate();
    }
}

pub fn local(core: &Rc<Core>, pid: i32, secret: i32) {
    let session = core
        .sessions_by_key
        .borrow()
        .get(&(pid, secret))
        .and_then(|w| w.upgrade());
    let Some(s) = session else { return };
    let Some(b) = s.backend.borrow().clone() else {
        return;
    };
    if b.st.borrow().queue.is_empty() {
        return; // nothing running: Postgres would ignore it too
    }
    backend(core, &b);
}

/// Cancels whatever query `b` is running (a separate connection to the postmaster).
pub fn backend(core: &Rc<Core>, b: &crate::backend::Backend) {
    let addr = format!("{}:{}", core.cfg.pg_host, core.cfg.pg_port);
    let (bpid, bsecret) = (b.pid, b.secret);
    tracing::debug!(backend = b.id, "cancelling the running query");
    // Over TLS too when backends use it: the key in a CancelRequest lets whoever reads it
    // cancel that backend's queries.
    let tls = core.cfg.server_tls.clone();
    glommio::spawn_local(async move {
        let Ok(stream) = TcpStream::connect(addr.as_str()).await else {
            return;
        };
        match crate::server_tls::open(tls.as_ref(), stream).await {
            Ok(Opened::Plain(mut s)) => crate::login::cancel(&mut s, bpid, bsecret).await,
            Ok(Opened::Tls(mut s)) => crate::login::cancel(&mut *s, bpid, bsecret).await,
            Err(e) => tracing::warn!(error = ?e, "cancel request not sent"),
        }
    })
    .detach();
}

/// Handles what the other cores ask of this one, and sends this core's ordered messages
/// (`core::Outbox`). One task per other core each way, so messages from one core are handled
/// in the order it sent them; no handler waits (listen.rs relies on both).
pub async fn serve_peers(core: Rc<Core>, mut receivers: Receivers<CoreMsg>) {
    crate::server_end::register(&core);
    if let Some(senders) = core.peers.borrow().clone() {
        for to in (0..senders.nr_consumers()).filter(|&i| i != core.index) {
            let outbox = core.outbox.clone();
            let senders = senders.clone();
            glommio::spawn_local(async move { outbox.drain(to, senders).await }).detach();
        }
    }
    for (_, stream) in receivers.streams() {
        let core = core.clone();
        glommio::spawn_local(async move {
            while let Some(msg) = stream.recv().await {
                match msg {
                    CoreMsg::Cancel(pid, secret) => local(&core, pid, secret),
                    CoreMsg::Terminate(pid, secret) => terminate_local(&core, pid, secret),
                    CoreMsg::Shed { key } => core.on_shed(key),
                    CoreMsg::Freed { key } => core.on_freed(key),
                    CoreMsg::Starving { key } => core.on_starving(key),
                    CoreMsg::ReleaseDb(db) => core.release_database(&db),
                    CoreMsg::Listen {
                        database,
                        from,
                        add,
                        remove,
                    } => core.listener(&database).hub_update(from, add, remove),
                    CoreMsg::ListenBarrier {
                        database,
                        from,
                        token,
                    } => core.listener(&database).hub_barrier(from, token),
                    CoreMsg::ListenBarrierDone {
                        database,
                        token,
                        ok,
                    } => core.listener(&database).barrier_done(token, ok),
                    CoreMsg::Notification { database, msg } => {
                        core.listener(&database).dispatch(&msg)
                    }
                    CoreMsg::ServerEnded(fatal) => crate::server_end::end_sessions(&core, &fatal),
                }
            }
        })
        .detach();
    }
}

/// A signalling call the gateway left to the server's check (`gateway/src/signals.rs`) raises,
/// where Postgres would refuse the signal, the error of reading a setting nobody has:
/// `tidepool.signal_denied_<cancel|terminate>_<superuser|member>`. This is that error as
/// Postgres 15's `pg_cancel_backend`/`pg_terminate_backend` raise it (signalfuncs.c: code,
/// message, file, line, routine), keeping the severity fields; `None` for any other error.
pub fn denied_signal(msg: &[u8]) -> Option<Vec<u8>> {
    use shared::protocol::backend as be;
    const MARK: &[u8] = b"\"tidepool.signal_denied_";
    let fields = be::error_fields(msg.get(5..)?).ok()?;
    let field = |c: u8| fields.iter().find(|(f, _)| *f == c).map(|(_, v)| *v);
    if field(b'C')? != b"42704" {
        return None;
    }
    let text = field(b'M')?;
    let at = text.windows(MARK.len()).position(|w| w == MARK)? + MARK.len();
    let which = text[at..].split(|&b| b == b'"').next()?;
    let (message, line, routine): (&str, &str, &str) = match which {
        b"cancel_superuser" => (
            "must be a superuser to cancel superuser query",
            "127",
            "pg_cancel_backend",
        ),
        b"cancel_member" => (
            "must be a member of the role whose query is being canceled or member of \
             pg_signal_backend",
            "132",
            "pg_cancel_backend",
        ),
        b"terminate_superuser" => (
            "must be a superuser to terminate superuser process",
            "229",
            "pg_terminate_backend",
        ),
        b"terminate_member" => (
            "must be a member of the role whose process is being terminated or member of \
             pg_signal_backend",
            "234",
            "pg_terminate_backend",
        ),
        _ => return None,
    };
    let mut e = Vec::new();
    shared::protocol::put_message(&mut e, be::ERROR_RESPONSE, |b| {
        let severity = field(b'S').unwrap_or(b"ERROR");
        for (code, value) in [
            (b'S', severity),
            (b'V', field(b'V').unwrap_or(b"ERROR")),
            (b'C', b"42501"),
            (b'M', message.as_bytes()),
            (b'F', b"signalfuncs.c"),
            (b'L', line.as_bytes()),
            (b'R', routine.as_bytes()),
        ] {
            b.push(code);
            b.extend_from_slice(value);
            b.push(0);
        }
        b.push(0);
    });
    Some(e)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::protocol::backend as be;

    fn error(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut e = Vec::new();
        shared::protocol::put_message(&mut e, be::ERROR_RESPONSE, |b| {
            for (c, v) in fields {
                b.push(*c);
                b.extend_from_slice(v.as_bytes());
                b.push(0);
            }
            b.push(0);
        });
        e
    }

    #[test]
    fn a_denied_signal_is_shown_as_postgres_refuses_it() {
        let marker = error(&[
            (b'S', "ERROR"),
            (b'V', "ERROR"),
            (b'C', "42704"),
            (
                b'M',
                "unrecognized configuration parameter \"tidepool.signal_denied_terminate_member\"",
            ),
            (b'F', "guc.c"),
            (b'L', "5734"),
            (b'R', "find_option"),
        ]);
        let e = denied_signal(&marker).unwrap();
        assert_eq!(
            e,
            error(&[
                (b'S', "ERROR"),
                (b'V', "ERROR"),
                (b'C', "42501"),
                (
                    b'M',
                    "must be a member of the role whose process is being terminated or member \
                     of pg_signal_backend"
                ),
                (b'F', "signalfuncs.c"),
                (b'L', "234"),
                (b'R', "pg_terminate_backend"),
            ])
        );
        // Other errors, other settings, and a marker under another code: unchanged.
        let other = error(&[
            (b'S', "ERROR"),
            (b'C', "42704"),
            (b'M', "unrecognized configuration parameter \"tidepool.x\""),
        ]);
        assert_eq!(denied_signal(&other), None);
        let other = error(&[
            (b'S', "ERROR"),
            (b'C', "22023"),
            (b'M', "\"tidepool.signal_denied_cancel_member\""),
        ]);
        assert_eq!(denied_signal(&other), None);
        assert_eq!(denied_signal(b"E\0\0"), None);
    }
}
