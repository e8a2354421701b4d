//! Cancel routing. A gateway forwards a client's `CancelRequest` (its own keys) over any link; the
//! pooler core that gets it asks every core, and the core whose session holds those keys cancels
//! the query running on that session's backend, and nothing else.

use crate::core::{CancelMsg, Core};
use glommio::channels::channel_mesh::Receivers;
use glommio::net::TcpStream;
use std::rc::Rc;

pub async fn broadcast(core: &Rc<Core>, pid: i32, secret: i32) {
    local(core, pid, secret);
    let peers = core
        .cancel_peers
        .borrow()
        .as_ref()
        .map(|s| s.nr_consumers());
    if let Some(n) = peers {
        for i in 0..n {
            if i == core.index {
                continue;
            }
            let sent = {
                let senders = core.cancel_peers.borrow();
                senders.as_ref().map(|s| s.try_send_to(i, (pid, secret)))
            };
            if let Some(Err(e)) = sent {
                tracing::warn!(peer = i, error = ?e, "cancel could not reach a core");
            }
        }
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
    let addr = format!("{}:{}", core.cfg.pg_host, core.cfg.pg_port);
    let (bpid, bsecret) = (b.pid, b.secret);
    tracing::debug!(backend = b.id, "cancelling the running query");
    glommio::spawn_local(async move {
        if let Ok(mut stream) = TcpStream::connect(addr.as_str()).await {
            crate::login::cancel(&mut stream, bpid, bsecret).await;
        }
    })
    .detach();
}

pub async fn serve_peers(core: Rc<Core>, mut receivers: Receivers<CancelMsg>) {
    for (_, stream) in receivers.streams() {
        let core = core.clone();
        glommio::spawn_local(async move {
            while let Some((pid, secret)) = stream.recv().await {
                local(&core, pid, secret);
            }
        })
        .detach();
    }
}
