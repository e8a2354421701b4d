//! Cross-core messages (what each core does with the other cores' `mesh::CoreMsg`), cancel
//! routing, and ending sessions when Postgres goes down (server_end.rs finds out). A gateway
//! forwards a client's `CancelRequest` (its own keys) over any link; the pooler core that gets
//! it asks every core, and the core whose session holds those keys cancels the query running on
//! that session's backend, and nothing else.

use crate::core::Core;
use crate::mesh::CoreMsg;
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
            session = s.session_id(),
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
    let Some(b) = s.held_backend() else {
        return;
    };
    if b.st.borrow().queue.is_empty() {
        return; // nothing running: Postgres would ignore it too
    }
    backend(core, &b);
}

/// Cancels whatever query `b` is running (a separate connection to the postmaster).
pub fn backend(core: &Rc<Core>, b: &crate::pool::Backend) {
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
/// (`mesh::Outbox`). One task per other core each way, so messages from one core are handled
/// in the order it sent them; no handler waits (listen.rs relies on both).
pub async fn serve_peers(core: Rc<Core>, mut receivers: Receivers<CoreMsg>) {
    let weak = Rc::downgrade(&core);
    crate::server_end::register(core.cfg.clone(), move |fatal| {
        if let Some(core) = weak.upgrade() {
            end_sessions(&core, &fatal);
            core.ask_peers(CoreMsg::ServerEnded(fatal));
        }
    });
    if let Some(senders) = core.peers.senders() {
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
                    CoreMsg::Shed(want) => core.pools.on_shed(want),
                    CoreMsg::Freed { key } => core.pools.on_freed(key),
                    CoreMsg::Starving { key } => core.pools.on_starving(key),
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
                    CoreMsg::ServerEnded(fatal) => end_sessions(&core, &fatal),
                }
            }
        })
        .detach();
    }
}

/// Ends this core's sessions that hold no backend with `fatal`, the last words Postgres ended
/// its backends' connections with, and closes them.
pub fn end_sessions(core: &Rc<Core>, fatal: &[u8]) {
    let sessions: Vec<_> = core
        .sessions_by_key
        .borrow()
        .values()
        .filter_map(|w| w.upgrade())
        .collect();
    for s in sessions {
        if s.held_backend().is_none() {
            s.end_with(fatal);
        }
    }
}
