//! `DIR/state.json`: what `tidepool up` started, so that `status` and `down` (and a second
//! `up`) find it again.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::ClusterSettings;
use crate::error::{Error, Result};

pub const FORMAT_VERSION: u32 = 1;

/// The three processes of a local cluster, in start order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Postgres,
    Pooler,
    Gateway,
    /// The control process (`tidepool control`), when the cluster has standbys.
    Control,
}

impl Role {
    pub const START_ORDER: [Role; 3] = [Role::Postgres, Role::Pooler, Role::Gateway];
    pub const STOP_ORDER: [Role; 3] = [Role::Gateway, Role::Pooler, Role::Postgres];

    pub fn name(self) -> &'static str {
        match self {
            Role::Postgres => "postgres",
            Role::Pooler => "pooler",
            Role::Gateway => "gateway",
            Role::Control => "control",
        }
    }

    /// The executable's file name, as argv[0] shows it.
    pub fn program(self) -> &'static str {
        match self {
            Role::Postgres => "postgres",
            Role::Pooler => "tidepool-pooler",
            Role::Gateway => "tidepool-gateway",
            Role::Control => "tidepool",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessRecord {
    pub name: Role,
    pub pid: u32,
    pub address: SocketAddr,
    pub log: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PostgresRecord {
    pub data_dir: PathBuf,
    pub port: u16,
    pub socket_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct State {
    pub version: u32,
    /// The state directory, absolute.
    pub dir: PathBuf,
    pub postgres: PostgresRecord,
    pub processes: Vec<ProcessRecord>,
    pub settings: ClusterSettings,
    /// Every node of a cluster with standbys (node1 is the bootstrap primary, whose
    /// Postgres and pooler are also in `postgres` and `processes`); empty for one node.
    #[serde(default)]
    pub nodes: Vec<NodeRecord>,
    /// Where this process reads the agent secret, when not `DIR/agent.key`: the control
    /// process's own copy (`tidepool control --agent-secret-file`, `crate::privilege`). Never
    /// stored: each process says it for itself.
    #[serde(skip)]
    pub agent_key_file: Option<PathBuf>,
}

/// One node: a Postgres and its pooler (the node agent).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub zone: String,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub pg_port: u16,
    pub postgres_log: PathBuf,
    /// The pooler's link address (gateways) and agent address (control process).
    pub pooler: SocketAddr,
    pub agent: SocketAddr,
    pub pooler_pid: u32,
    pub pooler_log: PathBuf,
    /// The node's directory (its `pgbackrest.conf`; `DIR` itself for node1). The pooler keeps
    /// the node's pledged term in [`NodeRecord::agent_dir`] inside it.
    pub state_dir: PathBuf,
}

impl NodeRecord {
    /// The node agent's own directory (its pledge), owned by the OS user the pooler runs as
    /// (`crate::privilege`): not `state_dir`, which holds files root's commands read.
    pub fn agent_dir(&self) -> PathBuf {
        self.state_dir.join("agent")
    }
}

impl State {
    /// The agent secret's file for this process (see [`State::agent_key_file`]).
    pub fn agent_key_path(&self) -> PathBuf {
        self.agent_key_file
            .clone()
            .unwrap_or_else(|| self.dir.join(crate::layout::AGENT_KEY_FILE))
    }

    pub fn load(path: &Path) -> Result<Option<State>> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(Error::Io {
                    context: format!("reading {}", path.display()),
                    source: e,
                })
            }
        };
        let state: State = serde_json::from_str(&text).map_err(|source| Error::State {
            path: path.to_path_buf(),
            source,
        })?;
        if state.version != FORMAT_VERSION {
            return Err(Error::Conflict(format!(
                "{} has format version {}, this tidepool knows {FORMAT_VERSION}",
                path.display(),
                state.version
            )));
        }
        Ok(Some(state))
    }

    /// Writes to a temporary file and renames it over the old one, so a reader never sees
    /// half a file.
    pub fn save(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|source| Error::State {
            path: path.to_path_buf(),
            source,
        })?;
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, text + "\n")
            .map_err(Error::io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, path).map_err(Error::io(format!("writing {}", path.display())))
    }

    pub fn process(&self, role: Role) -> Option<&ProcessRecord> {
        self.processes.iter().find(|p| p.name == role)
    }

    /// Records (or replaces) a process, keeping start order.
    pub fn set_process(&mut self, record: ProcessRecord) {
        self.processes.retain(|p| p.name != record.name);
        self.processes.push(record);
        self.processes.sort_by_key(|p| {
            Role::START_ORDER
                .iter()
                .position(|r| *r == p.name)
                .unwrap_or(usize::MAX)
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> State {
        State {
            version: FORMAT_VERSION,
            dir: "/x".into(),
            postgres: PostgresRecord {
                data_dir: "/x/pgdata".into(),
                port: 5433,
                socket_dir: "/x/run".into(),
            },
            processes: vec![],
            settings: ClusterSettings::default(),
            nodes: vec![],
            agent_key_file: None,
        }
    }

    #[test]
    fn set_process_replaces_and_orders() {
        let mut s = sample();
        let rec = |name, pid| ProcessRecord {
            name,
            pid,
            address: "127.0.0.1:1".parse().unwrap(),
            log: "/x/logs/a.log".into(),
        };
        s.set_process(rec(Role::Gateway, 3));
        s.set_process(rec(Role::Postgres, 1));
        s.set_process(rec(Role::Gateway, 4));
        let names: Vec<_> = s.processes.iter().map(|p| (p.name, p.pid)).collect();
        assert_eq!(names, vec![(Role::Postgres, 1), (Role::Gateway, 4)]);
    }

    #[test]
    fn round_trips_through_a_file_and_names_roles_in_lowercase() {
        let dir = std::env::temp_dir().join(format!("tidepool-state-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("state.json");
        assert_eq!(State::load(&path).unwrap(), None);
        let mut s = sample();
        s.set_process(ProcessRecord {
            name: Role::Pooler,
            pid: 7,
            address: "127.0.0.1:15433".parse().unwrap(),
            log: "/x/logs/pooler.log".into(),
        });
        s.save(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.contains("\"name\": \"pooler\""), "{text}");
        assert_eq!(State::load(&path).unwrap(), Some(s));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
