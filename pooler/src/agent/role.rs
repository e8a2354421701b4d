//! The node's role as the links tell gateways (`down::ROLE`): written by the agent thread,
//! read by every executor. Atomics and a change counter: a link compares the counter it last
//! sent with the current one, which costs one load per check.

use shared::agent::Role;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};

pub struct NodeRole {
    role: AtomicU8,
    primary_term: AtomicU64,
    /// Primary: its flushed WAL position; streaming standby: its replay position; 0: unknown.
    /// Gateways route reads to standbys within a lag bound with it.
    lsn: AtomicU64,
    version: AtomicU64,
}

/// Without an agent the node is what it always was: the primary of a single-node cluster,
/// at term 0.
static NODE: NodeRole = NodeRole {
    role: AtomicU8::new(1),
    primary_term: AtomicU64::new(0),
    lsn: AtomicU64::new(0),
    version: AtomicU64::new(1),
};

pub fn node() -> &'static NodeRole {
    &NODE
}

impl NodeRole {
    /// Publishes (role, primary_term); bumps the counter only on a change.
    pub fn set(&self, role: Role, primary_term: u64) {
        let r = role.to_u8();
        if self.role.load(Ordering::Acquire) == r
            && self.primary_term.load(Ordering::Acquire) == primary_term
        {
            return;
        }
        self.role.store(r, Ordering::Release);
        self.primary_term.store(primary_term, Ordering::Release);
        self.version.fetch_add(1, Ordering::AcqRel);
        tracing::info!(role = role.name(), primary_term, "node role changed");
    }

    /// Publishes the node's WAL position (see `lsn`); links send it with the role at most
    /// every 50 ms.
    pub fn set_lsn(&self, lsn: u64) {
        if self.lsn.swap(lsn, Ordering::AcqRel) != lsn {
            self.version.fetch_add(1, Ordering::AcqRel);
        }
    }

    /// (change counter, role byte, primary_term, lsn). The counter is read first: a change
    /// racing this read is seen again at the next check.
    pub fn get(&self) -> (u64, u8, u64, u64) {
        let v = self.version.load(Ordering::Acquire);
        (
            v,
            self.role.load(Ordering::Acquire),
            self.primary_term.load(Ordering::Acquire),
            self.lsn.load(Ordering::Acquire),
        )
    }

    /// The `down::ROLE` payload: `u8 role`, `u64 primary_term`, `u64 lsn`, big-endian.
    pub fn payload(role: u8, primary_term: u64, lsn: u64) -> [u8; 17] {
        let mut p = [0u8; 17];
        p[0] = role;
        p[1..9].copy_from_slice(&primary_term.to_be_bytes());
        p[9..].copy_from_slice(&lsn.to_be_bytes());
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_bump_the_counter_once() {
        let n = NodeRole {
            role: AtomicU8::new(1),
            primary_term: AtomicU64::new(0),
            lsn: AtomicU64::new(0),
            version: AtomicU64::new(1),
        };
        n.set(Role::Primary, 0);
        assert_eq!(n.get(), (1, 1, 0, 0));
        n.set(Role::Standby, 0);
        n.set(Role::Standby, 0);
        assert_eq!(n.get(), (2, 2, 0, 0));
        n.set_lsn(7);
        n.set_lsn(7);
        assert_eq!(n.get(), (3, 2, 0, 7));
        let p = NodeRole::payload(1, 3, 5);
        assert_eq!(p[..9], [1, 0, 0, 0, 0, 0, 0, 0, 3]);
        assert_eq!(p[16], 5);
    }
}
