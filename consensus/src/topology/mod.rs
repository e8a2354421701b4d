//! The topology store: who is primary at which term, the cohort, the durability policy, the
//! poolers' addresses, and which control process acts (leadership).
//!
//! Two back ends behind one `Store`: a JSON file owned by the control process (one machine,
//! the default) and etcd's v3 API (`--etcd URL`). Both offer the same three things: `load`,
//! `compare_and_swap` on a version (so two writers never overwrite each other unseen), and a
//! leadership with a time to live so that two control processes can run and only one acts.
//!
//! The store decides only WHO acts. That there are never two primaries of one term rests on
//! the nodes' persisted term pledges (docs/decisions/2026-11-21-failover.md), and nothing in
//! the store is needed for a primary to keep running: a store outage never demotes anything.

pub mod etcd;
pub mod file;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::policy::{Node, Policy, PolicyError};

pub use etcd::EtcdStore;
pub use file::FileStore;

/// The cluster's topology as the store keeps it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    /// The cluster's name (the etcd key's prefix: `/tidepool/<cluster>/`).
    pub cluster: String,
    /// The highest term the control process has used.
    pub term: u64,
    /// The node that is primary, if any.
    pub primary: Option<String>,
    /// The term `primary` was promoted at (0: the bootstrap primary).
    #[serde(default)]
    pub primary_term: u64,
    /// The cohort.
    pub nodes: Vec<NodeRecord>,
    /// The durability policy as written (`any 2`, docs/policy.md).
    pub policy: String,
    /// Every change of primary, oldest first.
    #[serde(default)]
    pub history: Vec<TermRecord>,
    /// Every time an operator forced a failover without the safety proof.
    #[serde(default)]
    pub overrides: Vec<OverrideRecord>,
}

/// One node of the cohort.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub zone: String,
    /// The pooler's link address (what gateways connect to).
    pub pooler: SocketAddr,
    /// The node agent's address (what the control process calls).
    pub agent: SocketAddr,
    pub pg_port: u16,
    pub data_dir: PathBuf,
}

/// A change of primary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TermRecord {
    pub term: u64,
    pub primary: String,
    pub at_unix_ms: u64,
    pub reason: String,
}

/// An operator's override (a failover forced without the proof that no commit is lost).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OverrideRecord {
    pub term: u64,
    pub by: String,
    pub reason: String,
    pub at_unix_ms: u64,
}

impl Topology {
    /// The durability policy, parsed.
    pub fn parsed_policy(&self) -> Result<Policy, PolicyError> {
        self.policy.parse()
    }

    /// The cohort as the policy sees it (name and zone).
    pub fn policy_nodes(&self) -> Vec<Node> {
        self.nodes
            .iter()
            .map(|n| Node::new(n.name.clone(), n.zone.clone()))
            .collect()
    }
}

/// A version of the stored topology: a counter in the file, etcd's `mod_revision` of the key.
/// Only equality means anything.
pub type Version = u64;

/// Held by the control process that leads; pass it back to `renew`, `is_leader`, `resign`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leadership {
    /// Who leads (the control process's id).
    pub id: String,
    /// How long leadership lasts without a renewal.
    pub ttl: Duration,
    /// etcd: the lease the leader key is bound to (0 for the file store).
    pub(crate) lease: i64,
}

/// What can go wrong talking to the store. None of it means the cluster is unhealthy.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    /// The stored data is not a topology (or not one this version understands).
    #[error("{what}: {message}")]
    Corrupt { what: String, message: String },
    /// etcd answered with an error or could not be reached.
    #[error("etcd {endpoint}: {message}")]
    Etcd { endpoint: String, message: String },
    /// The store did not answer in time.
    #[error("{what} did not answer within {after_ms} ms")]
    Timeout { what: String, after_ms: u64 },
}

/// The topology store: a file on this machine or etcd.
#[derive(Debug, Clone)]
pub enum Store {
    File(FileStore),
    Etcd(EtcdStore),
}

impl Store {
    /// The stored topology and its version; `None` before the first `compare_and_swap`.
    pub async fn load(&self) -> Result<Option<(Topology, Version)>, StoreError> {
        match self {
            Store::File(s) => s.load().await,
            Store::Etcd(s) => s.load().await,
        }
    }

    /// Stores `new` if the stored version is still `expected` (`None`: nothing stored yet).
    /// `Ok(false)`: someone else changed it first; load and decide again.
    pub async fn compare_and_swap(
        &self,
        expected: Option<Version>,
        new: &Topology,
    ) -> Result<bool, StoreError> {
        match self {
            Store::File(s) => s.compare_and_swap(expected, new).await,
            Store::Etcd(s) => s.compare_and_swap(expected, new).await,
        }
    }

    /// Tries once to become the leader as `id` for `ttl`. `Some` when `id` leads now (also
    /// when it already did), `None` when another id holds an unexpired leadership.
    pub async fn campaign(
        &self,
        id: &str,
        ttl: Duration,
    ) -> Result<Option<Leadership>, StoreError> {
        match self {
            Store::File(s) => s.campaign(id, ttl).await,
            Store::Etcd(s) => s.campaign(id, ttl).await,
        }
    }

    /// Extends the leadership by its ttl; call well within the ttl. `Ok(false)`: it lapsed
    /// or another id took over, so stop acting (and `campaign` again).
    pub async fn renew(&self, leadership: &Leadership) -> Result<bool, StoreError> {
        match self {
            Store::File(s) => s.renew(leadership).await,
            Store::Etcd(s) => s.renew(leadership).await,
        }
    }

    /// Whether `leadership` is still the current, unexpired one.
    pub async fn is_leader(&self, leadership: &Leadership) -> Result<bool, StoreError> {
        match self {
            Store::File(s) => s.is_leader(leadership).await,
            Store::Etcd(s) => s.is_leader(leadership).await,
        }
    }

    /// Gives leadership up at once (if still held), so another process need not wait out
    /// the ttl.
    pub async fn resign(&self, leadership: Leadership) -> Result<(), StoreError> {
        match self {
            Store::File(s) => s.resign(&leadership).await,
            Store::Etcd(s) => s.resign(&leadership).await,
        }
    }

    /// The id of the current leader, if any (for status output).
    pub async fn leader(&self) -> Result<Option<String>, StoreError> {
        match self {
            Store::File(s) => s.leader().await,
            Store::Etcd(s) => s.leader().await,
        }
    }
}

/// The backup lock as held in the store (see [`Store::lock_backup`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreLock {
    pub id: String,
    /// etcd: the lease the lock key is bound to.
    pub(crate) lease: i64,
}

/// What [`Store::lock_backup`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LockAttempt {
    /// Taken: keep it alive with [`Store::keep_backup_lock`], give it up with
    /// [`Store::unlock_backup`].
    Taken(StoreLock),
    /// Another process holds it (its id).
    HeldBy(String),
    /// The file store: the cluster is on one machine, where the backup lock file is enough.
    Local,
}

impl Store {
    /// One backup at a time across machines: takes the store's backup lock as `id` for `ttl`.
    pub async fn lock_backup(&self, id: &str, ttl: Duration) -> Result<LockAttempt, StoreError> {
        match self {
            Store::File(_) => Ok(LockAttempt::Local),
            Store::Etcd(s) => Ok(match s.lock_backup(id, ttl).await? {
                Ok(lease) => LockAttempt::Taken(StoreLock {
                    id: id.to_string(),
                    lease,
                }),
                Err(holder) => LockAttempt::HeldBy(holder),
            }),
        }
    }

    /// Extends the lock by its ttl; `false` when it lapsed.
    pub async fn keep_backup_lock(&self, lock: &StoreLock) -> Result<bool, StoreError> {
        match self {
            Store::File(_) => Ok(true),
            Store::Etcd(s) => s.keep_lease(lock.lease).await,
        }
    }

    /// Gives the lock up at once.
    pub async fn unlock_backup(&self, lock: StoreLock) -> Result<(), StoreError> {
        match self {
            Store::File(_) => Ok(()),
            Store::Etcd(s) => s.unlock_backup(lock.lease).await,
        }
    }
}

pub(crate) fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_round_trips_through_json_and_gives_policy_nodes() {
        let t = Topology {
            cluster: "c".into(),
            term: 3,
            primary: Some("node1".into()),
            primary_term: 2,
            nodes: vec![NodeRecord {
                name: "node1".into(),
                zone: "z1".into(),
                pooler: "127.0.0.1:15433".parse().unwrap(),
                agent: "127.0.0.1:15434".parse().unwrap(),
                pg_port: 5432,
                data_dir: "/tmp/d".into(),
            }],
            policy: "any 2".into(),
            history: vec![TermRecord {
                term: 2,
                primary: "node1".into(),
                at_unix_ms: 1,
                reason: "bootstrap".into(),
            }],
            overrides: vec![],
        };
        let back: Topology = serde_json::from_str(&serde_json::to_string(&t).unwrap()).unwrap();
        assert_eq!(back, t);
        assert_eq!(t.policy_nodes(), vec![Node::new("node1", "z1")]);
        assert_eq!(t.parsed_policy().unwrap().to_string(), "any 2");
    }
}
