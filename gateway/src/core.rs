//! The state of one gateway core: its links to every pooler, which pooler is the primary, session
//! ids, TLS, the classifier.

use crate::classify::Classifier;
use crate::config::Config;
use crate::link::{self, Link};
use crate::session_ids::{SessionId, SessionIds};
use shared::agent::Role;
use shared::io::Broadcast;
use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Core {
    /// Swapped whole by a reload (SIGHUP): read it with [`Core::cfg`].
    cfg: RefCell<Rc<Config>>,
    /// `links_per_core` links per pooler, grouped by pooler (index in `cfg.poolers`). Shared
    /// (never changed after start) so a session can send a signal the server allowed without
    /// holding the core (`SessionIo::expect_signals`); indexing it costs what a `Vec` does.
    pub links: Rc<[Vec<Rc<Link>>]>,
    next_link: Cell<usize>,
    /// Session ids in use on this core.
    session_ids: SessionIds,
    /// Replaced by a reload that changes the certificate files.
    pub tls: RefCell<Option<futures_rustls::TlsAcceptor>>,
    /// Keys the mock SCRAM verifiers of unknown roles, per process.
    pub mock_secret: [u8; 32],
    pub classifier: Classifier,
    /// Clients of the whole process (all cores).
    pub clients: Arc<AtomicUsize>,
    /// Told whenever a link comes up, goes down or reports a role.
    pub changed: Rc<Broadcast>,
    /// Requests of this core now waiting for a primary (bounded by `failover_hold_max`).
    pub held: Cell<usize>,
    /// Clients of this core (sessions, logging in or not).
    pub local_clients: Rc<Cell<usize>>,
    /// SIGTERM: sessions end at their next idle moment (57P01).
    pub draining: Cell<bool>,
    /// The shutdown timeout passed: sessions end now, in a transaction or not.
    pub force: Cell<bool>,
    /// Told when `draining` or `force` is set, and every tick while draining (and when the
    /// admin console KILLs clients).
    pub drain_notify: Broadcast,
    /// The admin console's view of the whole process (registry.rs).
    pub admin: Arc<crate::registry::Shared>,
}

/// Which pooler is the primary, from each pooler's (role, primary_term) report: the one reporting
/// `Primary` at the highest term. A pooler reporting `Primary` at a lower term is an old primary
/// that came back and never takes writes; two at the same highest term (which a correct control
/// process never produces) give no primary rather than a guess.
pub fn choose_primary(reports: impl IntoIterator<Item = (Role, u64)>) -> Option<usize> {
    let mut best: Option<(usize, u64)> = None;
    let mut tie = false;
    for (i, (role, term)) in reports.into_iter().enumerate() {
        if role != Role::Primary {
            continue;
        }
        match best {
            Some((_, t)) if term < t => {}
            Some((_, t)) if term == t => tie = true,
            _ => {
                best = Some((i, term));
                tie = false;
            }
        }
    }
    if tie {
        None
    } else {
        best.map(|(i, _)| i)
    }
}

impl Core {
    pub fn new(
        cfg: Rc<Config>,
        tls: Option<futures_rustls::TlsAcceptor>,
        mock_secret: [u8; 32],
        clients: Arc<AtomicUsize>,
        admin: Arc<crate::registry::Shared>,
    ) -> Rc<Core> {
        let changed = Rc::new(Broadcast::default());
        // Executors are numbered from 1; this core's links take the slots after the previous
        // cores' (a link's slot picks its pooler core: `down::CORE`).
        let first_slot = glommio::executor().id().saturating_sub(1) * cfg.links_per_core;
        let link_tls = cfg
            .link_tls
            .as_ref()
            .map(|t| futures_rustls::TlsConnector::from(t.config.clone()));
        let links = (0..cfg.poolers.len())
            .map(|p| {
                (0..cfg.links_per_core)
                    .map(|k| {
                        let (key, tls) = (cfg.link_key.clone(), link_tls.clone());
                        Link::new(p, first_slot + k, changed.clone(), key, tls)
                    })
                    .collect()
            })
            .collect();
        Rc::new(Core {
            classifier: Classifier::new(cfg.guard_synchronous_commit),
            cfg: RefCell::new(cfg),
            links,
            next_link: Cell::new(0),
            session_ids: SessionIds::default(),
            tls: RefCell::new(tls),
            mock_secret,
            clients,
            changed,
            held: Cell::new(0),
            local_clients: Rc::new(Cell::new(0)),
            draining: Cell::new(false),
            force: Cell::new(false),
            drain_notify: Broadcast::default(),
            admin,
        })
    }

    /// The config in force (a reload swaps it; a session reads it where it needs a value).
    pub fn cfg(&self) -> Rc<Config> {
        self.cfg.borrow().clone()
    }

    pub fn set_cfg(&self, cfg: Rc<Config>) {
        *self.cfg.borrow_mut() = cfg;
    }

    /// A session id no live session of this core holds (ids wrap after `session_ids`); held
    /// until the returned claim is dropped. `None` when every id is taken.
    pub fn next_session_id(&self) -> Option<SessionId> {
        self.session_ids.claim(self.cfg().session_ids)
    }

    /// A pooler's role as its live links report it (Down when none is up). A live link that has
    /// not reported yet counts as Primary when there is only one pooler (a pooler that sends no
    /// role reports is then used as before), as Down otherwise.
    fn report(&self, pooler: usize) -> (Role, u64) {
        let single = self.links.len() == 1;
        let mut best = (Role::Down, 0);
        for l in &self.links[pooler] {
            if !l.alive.get() {
                continue;
            }
            match l.reported_role() {
                Some(r) if r.0 != Role::Down => return r,
                None if single => best = (Role::Primary, 0),
                _ => {}
            }
        }
        best
    }

    /// The primary's pooler now, if there is one. A few `Cell` reads per link: cheap enough to
    /// ask on every request.
    pub fn primary(&self) -> Option<usize> {
        if self.links.len() == 1 {
            return (self.report(0).0 == Role::Primary).then_some(0);
        }
        // No allocation: this runs for every request of a session that is not pinned.
        choose_primary((0..self.links.len()).map(|p| self.report(p)))
    }

    /// A live link to the primary's pooler, now.
    pub fn primary_link(&self) -> Option<Rc<Link>> {
        let p = self.primary()?;
        let single = self.links.len() == 1;
        let links = &self.links[p];
        let n = links.len();
        for i in 0..n {
            let k = (self.next_link.get() + i) % n;
            let l = &links[k];
            let usable = l.alive.get()
                && match l.reported_role() {
                    Some((r, _)) => r == Role::Primary,
                    None => single,
                };
            if usable {
                self.next_link.set(k + 1);
                return Some(l.clone());
            }
        }
        None
    }

    /// Whether a read-only session may stay on this pooler: it serves reads (primary or standby).
    pub fn readable(&self, pooler: usize) -> bool {
        matches!(self.report(pooler).0, Role::Primary | Role::Standby)
    }

    /// Whether `pooler` serves a session now: the primary's, or any readable one for a
    /// read-only session (`SessionIo::usable_link` asks on every request).
    pub fn serves(&self, pooler: usize, read_only: bool) -> bool {
        if read_only {
            self.readable(pooler)
        } else {
            self.primary() == Some(pooler)
        }
    }

    /// A live link for a read-only session: a standby's (spread over standbys), else the
    /// primary's. Standbys report no lag on the link, so any streaming-or-not standby will do.
    pub fn read_link(&self) -> Option<Rc<Link>> {
        // The primary's WAL position, to measure each standby's lag against.
        let primary_lsn = self.primary().and_then(|p| {
            self.links[p]
                .iter()
                .filter(|l| l.alive.get())
                .map(|l| l.lsn.get())
                .max()
        });
        let max_lag = self.cfg().max_standby_lag_bytes;
        let within = |l: &Link| {
            if max_lag == 0 {
                return true;
            }
            let lsn = l.lsn.get();
            match primary_lsn {
                Some(p) if p != 0 && lsn != 0 => p.saturating_sub(lsn) <= max_lag,
                _ => false,
            }
        };
        let n = self.links.len();
        let start = self.next_link.get();
        for i in 0..n {
            let p = (start + i) % n;
            if let Some(l) = self.links[p].iter().find(|l| {
                l.alive.get()
                    && l.reported_role().is_some_and(|r| r.0 == Role::Standby)
                    && within(l)
            }) {
                self.next_link.set(p + 1);
                return Some(l.clone());
            }
        }
        self.primary_link()
    }

    /// A link to the primary (or, `read_only`, to a standby), waiting until `deadline` for one.
    pub async fn wait_link(&self, deadline: Instant, read_only: bool) -> Option<Rc<Link>> {
        loop {
            let changed = self.changed.listen();
            let found = if read_only {
                self.read_link()
            } else {
                self.primary_link()
            };
            if let Some(l) = found {
                return Some(l);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            // A notify wakes us on every change; the timer also bounds a missed one.
            let _ = crate::with_timeout(left.min(Duration::from_millis(500)), changed).await;
        }
    }

    /// Passes a client's cancel request to every pooler (one link each): the session may live
    /// on any of them, and a pooler that does not know the keys ignores them.
    pub async fn cancel(&self, pid: i32, secret: i32) {
        link::signal(&self.links, pid, secret, false).await
    }
}

/// Counts a client (in the process and on its core) for as long as it lives, and once logged
/// in holds its place in the role and database limits (`access`).
pub struct ClientSlot {
    process: Arc<AtomicUsize>,
    core: Rc<Cell<usize>>,
    admitted: Option<crate::access::Admitted>,
}

/// A client's addresses, for the admin console (`None`: a Unix socket). Kept by the console's
/// registry only, not by every session's task.
#[derive(Clone, Copy, Default)]
pub struct Peer {
    pub addr: Option<std::net::SocketAddr>,
    pub local: Option<std::net::SocketAddr>,
}

impl ClientSlot {
    pub fn take(core: &Core) -> Option<ClientSlot> {
        let prev = core.clients.fetch_add(1, Ordering::Relaxed);
        core.local_clients.set(core.local_clients.get() + 1);
        let slot = ClientSlot {
            process: core.clients.clone(),
            core: core.local_clients.clone(),
            admitted: None,
        };
        (prev < core.cfg().max_clients).then_some(slot)
    }

    /// The client logged in: counted for its role and database (`access`) while it lives.
    pub fn admit(&mut self, admitted: crate::access::Admitted) {
        self.admitted = Some(admitted);
    }
}

impl Drop for ClientSlot {
    fn drop(&mut self) {
        self.process.fetch_sub(1, Ordering::Relaxed);
        self.core.set(self.core.get().saturating_sub(1));
    }
}

/// A request waiting for a primary, counted in `Core::held` while it lives.
pub struct Held<'a>(&'a Core);

impl<'a> Held<'a> {
    /// `None` when this core already holds `failover_hold_max` requests.
    pub fn take(core: &'a Core) -> Option<Held<'a>> {
        if core.held.get() >= core.cfg().failover_hold_max {
            return None;
        }
        core.held.set(core.held.get() + 1);
        Some(Held(core))
    }
}

impl Drop for Held<'_> {
    fn drop(&mut self) {
        self.0.held.set(self.0.held.get().saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn primary_is_highest_term() {
        use Role::*;
        assert_eq!(choose_primary([(Primary, 0)]), Some(0));
        assert_eq!(choose_primary([(Down, 0), (Standby, 0)]), None);
        assert_eq!(choose_primary([(Down, 0), (Primary, 3)]), Some(1));
        // The old primary came back at its old term: the new one keeps the writes.
        assert_eq!(choose_primary([(Primary, 2), (Primary, 3)]), Some(1));
        assert_eq!(choose_primary([(Primary, 5), (Primary, 3)]), Some(0));
        assert_eq!(choose_primary([(Primary, 3), (Standby, 9)]), Some(0));
        // Two at the same term: refuse to guess.
        assert_eq!(choose_primary([(Primary, 3), (Primary, 3)]), None);
        assert_eq!(
            choose_primary([(Primary, 3), (Primary, 3), (Primary, 4)]),
            Some(2)
        );
    }
}
