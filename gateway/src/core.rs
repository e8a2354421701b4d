//! The state of one gateway core: its links to the pooler, session ids, TLS, the classifier.

use crate::classify::Classifier;
use crate::config::Config;
use crate::link::Link;
use shared::link::up;
use std::cell::Cell;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

pub struct Core {
    pub cfg: Rc<Config>,
    pub links: Vec<Rc<Link>>,
    next_link: Cell<usize>,
    next_session: Cell<u32>,
    pub tls: Option<futures_rustls::TlsAcceptor>,
    /// Keys the mock SCRAM verifiers of unknown roles, per process.
    pub mock_secret: [u8; 32],
    pub classifier: Classifier,
    /// Clients of the whole process (all cores).
    pub clients: Arc<AtomicUsize>,
}

impl Core {
    pub fn new(
        cfg: Rc<Config>,
        tls: Option<futures_rustls::TlsAcceptor>,
        mock_secret: [u8; 32],
        clients: Arc<AtomicUsize>,
    ) -> Rc<Core> {
        let links = (0..cfg.links_per_core).map(|_| Link::new()).collect();
        Rc::new(Core {
            cfg,
            links,
            next_link: Cell::new(0),
            next_session: Cell::new(1),
            tls,
            mock_secret,
            classifier: Classifier::default(),
            clients,
        })
    }

    pub fn next_session_id(&self) -> u32 {
        let id = self.next_session.get();
        self.next_session.set(id.wrapping_add(1).max(1));
        id
    }

    /// A live link, waiting a little for one to come up.
    pub async fn link(&self) -> Option<Rc<Link>> {
        for _ in 0..50 {
            let n = self.links.len();
            for i in 0..n {
                let k = (self.next_link.get() + i) % n;
                if self.links[k].alive.get() {
                    self.next_link.set(k + 1);
                    return Some(self.links[k].clone());
                }
            }
            glommio::timer::sleep(Duration::from_millis(100)).await;
        }
        None
    }

    /// Passes a client's cancel request to the pooler, which finds the session on any core.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        if let Some(l) = self.link().await {
            let mut p = Vec::with_capacity(8);
            p.extend_from_slice(&pid.to_be_bytes());
            p.extend_from_slice(&secret.to_be_bytes());
            l.send(up::CANCEL, 0, &p);
            l.out.flushed().await;
        }
    }
}

/// Counts a client for as long as it lives.
pub struct ClientSlot(Arc<AtomicUsize>);

impl ClientSlot {
    pub fn take(core: &Core) -> Option<ClientSlot> {
        let prev = core.clients.fetch_add(1, Ordering::Relaxed);
        let slot = ClientSlot(core.clients.clone());
        (prev < core.cfg.max_clients).then_some(slot)
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}
