//! The pooler's end of a link: frames from one gateway core in, responses out.
//!
//! Nothing is honoured before the gateway proves it holds the link secret
//! (`shared::link::handshake`): a peer that does not gets one `CHALLENGE` frame and is
//! disconnected — no verifier, no session, no role report. The reader never waits for one
//! session: requests are flow-controlled per session by the gateway (`down::ACK`).
//!
//! With `link_tls_cert` the connection is TLS first (rustls; the gateway checks the certificate
//! against the cluster's CA) and the same handshake runs inside it. The link is the hot path:
//! [`serve_stream`] is generic over the stream, so a plain link runs the code it ran before TLS
//! existed — a `TcpStream`, no dispatch per read or write — and a TLS link its own instance.

use crate::core::{Core, SessionHandle};
use crate::session::{self, Session};
use futures_lite::{AsyncRead, AsyncWrite};
use glommio::net::TcpStream;
use shared::io::{MessageReader, OutQueue, RcStream};
use shared::link::{self, down, handshake, put_header, up, Open, HEADER};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::{Rc, Weak};

pub struct Link {
    /// Frames to the gateway; each session on the link holds it too.
    pub out: Rc<OutQueue>,
    sessions: RefCell<HashMap<u32, Rc<Session>>>,
}

/// The handshake: the challenge, then the gateway's `HELLO` with its proof, within
/// `handshake::TIMEOUT`. `false`: not a gateway of this cluster (or too slow): close.
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    core: &Core,
    stream: &mut RcStream<S>,
    reader: &mut MessageReader,
) -> bool {
    use futures_lite::AsyncWriteExt;
    let hs = handshake::Pooler::new(&core.cfg.link_key);
    let exchange = async {
        stream.write_all(&hs.challenge()).await.ok()?;
        let (kind, payload) = handshake::read_frame(reader, stream, handshake::HELLO_LEN).await?;
        match hs.verify(kind, &payload) {
            Ok(welcome) => stream.write_all(&welcome).await.ok(),
            Err(e) => {
                tracing::warn!(error = %e, "link peer refused");
                None
            }
        }
    };
    let timeout = async {
        glommio::timer::sleep(handshake::TIMEOUT).await;
        tracing::warn!("link peer refused: no handshake within the timeout");
        None
    };
    futures_lite::future::or(exchange, timeout).await.is_some()
}

/// Connections still in their handshake on a core, at most: more are closed at once, so that
/// peers without the secret cannot hold an unbounded number of tasks for `TIMEOUT` each.
const MAX_HANDSHAKING: usize = 256;

thread_local! {
    /// This core's connections in their handshake (one executor per thread).
    static HANDSHAKING: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Counts a connection in its handshake on this core while it lives.
struct Handshaking;

impl Handshaking {
    /// `None` when the core already has `MAX_HANDSHAKING` connections in their handshake.
    fn enter() -> Option<Handshaking> {
        if HANDSHAKING.get() >= MAX_HANDSHAKING {
            return None;
        }
        HANDSHAKING.set(HANDSHAKING.get() + 1);
        Some(Handshaking)
    }
}

impl Drop for Handshaking {
    // Counted down however the handshake ends (a dropped task included).
    fn drop(&mut self) {
        HANDSHAKING.set(HANDSHAKING.get() - 1);
    }
}

pub async fn serve(core: Rc<Core>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Some(counted) = Handshaking::enter() else {
        tracing::warn!("link peer refused: too many connections in their handshake");
        return;
    };
    let Some(tls) = &core.cfg.link_tls else {
        // The hand-written path stays plain: no TLS type anywhere on it.
        return serve_stream(core, RcStream::new(stream), counted, |s| s).await;
    };
    // TLS first, within the same timeout and under the same count as the link's handshake: a
    // peer that does not speak TLS (a plaintext gateway) gets nothing and is closed.
    let acceptor = futures_rustls::TlsAcceptor::from(tls.config.clone());
    let accepted = crate::with_timeout(handshake::TIMEOUT, acceptor.accept(stream)).await;
    let stream = match accepted {
        Some(Ok(s)) => s,
        Some(Err(e)) => {
            tracing::warn!(error = %e, "link peer refused: TLS handshake failed");
            return;
        }
        None => {
            tracing::warn!("link peer refused: no TLS handshake within the timeout");
            return;
        }
    };
    tracing::debug!("link TLS handshake done");
    // Each frame write leaves for the socket before it counts as written (`WriteThrough`).
    serve_stream(
        core,
        RcStream::new(stream),
        counted,
        shared::tls::WriteThrough::new,
    )
    .await
}

/// One authenticated link over `stream` (plain or TLS) until it drops; `writer` wraps the
/// writing half (the identity for plain TCP).
async fn serve_stream<S, W>(
    core: Rc<Core>,
    mut stream: RcStream<S>,
    counted: Handshaking,
    writer: impl FnOnce(RcStream<S>) -> W,
) where
    S: AsyncRead + AsyncWrite + Unpin + 'static,
    W: AsyncWrite + Unpin + 'static,
{
    let mut reader = MessageReader::new(64 * 1024);
    let authenticated = authenticate(&core, &mut stream, &mut reader).await;
    drop(counted);
    if !authenticated {
        return;
    }
    let l = Rc::new(Link {
        out: Rc::new(OutQueue::new(8 << 20, 1 << 20)),
        sessions: RefCell::new(HashMap::new()),
    });
    let queue = l.clone();
    let wstream = crate::metrics::CountSent::new(writer(stream.clone()));
    glommio::spawn_local(async move {
        let _ = queue.out.run_writer(wstream).await;
    })
    .detach();
    welcome(&core, &l);
    let mut rstream = stream;
    let limit = core
        .cfg
        .max_message_size
        .saturating_mul(2)
        .saturating_add(1 << 20);
    'outer: loop {
        while let Some(h) = link::parse_header(reader.data()) {
            if h.len > limit {
                tracing::warn!(len = h.len, "oversized link frame; dropping link");
                break 'outer;
            }
            if reader.data().len() < HEADER + h.len {
                break;
            }
            // One copy out of the read buffer; the session keeps this Vec as it is.
            let payload = reader.data()[HEADER..HEADER + h.len].to_vec();
            reader.consume(HEADER + h.len);
            if !on_frame(&core, &l, h.kind, h.session, payload) {
                break 'outer;
            }
        }
        let want = link::parse_header(reader.data()).map_or(0, |h| HEADER + h.len);
        match reader.fill(&mut rstream, want).await {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    // The gateway went away: so did all its sessions.
    let sessions: Vec<Rc<Session>> = l.sessions.borrow_mut().drain().map(|(_, s)| s).collect();
    for s in sessions {
        s.close();
    }
    l.out.close();
}

fn on_frame(core: &Rc<Core>, l: &Rc<Link>, kind: u8, id: u32, payload: Vec<u8>) -> bool {
    crate::metrics::link_frame(link::HEADER + payload.len());
    match kind {
        up::MSGS => {
            let s = l.sessions.borrow().get(&id).cloned();
            if let Some(s) = s {
                if !s.enqueue(payload) {
                    // The gateway ignored the window: this session goes, the link stays.
                    tracing::warn!(
                        session = id,
                        "requests past the window; closing the session"
                    );
                    l.sessions.borrow_mut().remove(&id);
                    let mut err = Vec::new();
                    shared::protocol::backend::error_response(
                        &mut err,
                        shared::protocol::backend::Severity::Fatal,
                        "08P01",
                        "terminating connection: requests sent past the link's window",
                    );
                    l.out
                        .push_with(|b| link::put_frame(b, down::CLOSED, id, &err));
                    s.close();
                }
            }
        }
        up::NAMES => {
            let s = l.sessions.borrow().get(&id).cloned();
            if let Some(s) = s {
                s.enqueue_names(payload);
            }
        }
        up::CREDIT => {
            if let (Some(s), Some(b)) = (l.sessions.borrow().get(&id), payload.get(..4)) {
                s.add_credit(u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize);
            }
        }
        up::OPEN => match Open::decode(&payload) {
            Ok(open) => {
                let pool = core.pool_for(&open.user, &open.database);
                let key = (open.pid, open.secret);
                let baseline = core.shared_baseline(open.settings);
                let s = Session::new(id, l.out.clone(), pool, open.credential, key, baseline);
                core.sessions_by_key
                    .borrow_mut()
                    .insert(key, Rc::downgrade(&s) as Weak<dyn SessionHandle>);
                if let Some(old) = l.sessions.borrow_mut().insert(id, s.clone()) {
                    old.close();
                }
                glommio::spawn_local(session::run(core.clone(), s)).detach();
            }
            Err(e) => {
                tracing::warn!(error = %e, "bad OPEN frame");
                return false;
            }
        },
        up::WATCH => {
            if let Some(s) = l.sessions.borrow().get(&id) {
                s.add_watch(&payload);
            }
        }
        up::RELEASE_DB => {
            let db = String::from_utf8_lossy(&payload).into_owned();
            core.release_database(&db);
            core.ask_peers(crate::mesh::CoreMsg::ReleaseDb(db));
        }
        up::CLOSE => {
            if let Some(s) = l.sessions.borrow_mut().remove(&id) {
                s.close();
            }
        }
        up::AUTH_LOOKUP | up::AUTH_RECHECK => {
            let (user, database) = shared::role::parse_lookup(&payload);
            let cached = kind == up::AUTH_LOOKUP;
            let core = core.clone();
            let l = l.clone();
            glommio::spawn_local(async move {
                let mut reply = Vec::new();
                match core.admin.lookup(&user, &database, cached).await {
                    Ok(info) => {
                        reply.push(1);
                        info.encode(&mut reply);
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "role lookup failed");
                        reply.push(2);
                        reply.extend_from_slice(e.as_bytes());
                    }
                }
                l.out.push_with(|b| {
                    put_header(b, down::AUTH_INFO, id, reply.len());
                    b.extend_from_slice(&reply);
                });
            })
            .detach();
        }
        up::CANCEL => {
            if let Some(b) = payload.get(..8) {
                let pid = i32::from_be_bytes([b[0], b[1], b[2], b[3]]);
                let secret = i32::from_be_bytes([b[4], b[5], b[6], b[7]]);
                crate::cancel::broadcast(core, pid, secret, payload.get(8) == Some(&1));
            }
        }
        up::POOLS => {
            let mut reply = Vec::new();
            crate::pools_report::facts(core).encode(&mut reply);
            l.out
                .push_with(|b| link::put_frame(b, down::POOLS, id, &reply));
        }
        // The one HELLO was the handshake's (`authenticate`); CORE and ROLE follow it.
        up::HELLO => return false,
        _ => {
            tracing::warn!(kind, "unknown link frame; dropping link");
            return false;
        }
    }
    true
}

/// After the handshake: which pooler core this is, then the node's role.
fn welcome(core: &Rc<Core>, l: &Rc<Link>) {
    let mut core_of = [0u8; 4];
    core_of[..2].copy_from_slice(&(core.index as u16).to_be_bytes());
    core_of[2..].copy_from_slice(&(core.cfg.cores as u16).to_be_bytes());
    l.out
        .push_with(|b| link::put_frame(b, down::CORE, 0, &core_of));
    announce_role(l)
}

/// Sends the node's role now and again on every change, for as long as the link lives.
/// A change is seen within 50 ms: one atomic load per link per tick.
fn announce_role(l: &Rc<Link>) {
    let node = crate::agent::role::node();
    let send = |l: &Link, role: u8, term: u64, lsn: u64| {
        let payload = crate::agent::role::NodeRole::payload(role, term, lsn);
        l.out
            .push_with(|b| link::put_frame(b, down::ROLE, 0, &payload));
    };
    let (mut sent, role, term, lsn) = node.get();
    send(l, role, term, lsn);
    let l = l.clone();
    glommio::spawn_local(async move {
        while !l.out.is_dead() {
            glommio::timer::sleep(std::time::Duration::from_millis(50)).await;
            let (v, role, term, lsn) = node.get();
            if v != sent {
                sent = v;
                send(&l, role, term, lsn);
            }
        }
    })
    .detach();
}
