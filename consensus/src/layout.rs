//! Where things live inside a state directory.
//!
//! ```text
//! DIR/state.json   what `up` started (pids, addresses, logs) and the cluster settings
//! DIR/password     password of the `tidepool` login role, mode 600
//! DIR/agent.key    the node agents' shared secret (shared::agent::auth), mode 600
//! DIR/link.key     the gateway ↔ pooler link's shared secret (shared::link::handshake), mode 600
//! DIR/tls/         the cluster CA (ca.crt, ca.key 600) and each node's link and agent
//!                  certificate (NODE.crt, NODE.key 600): crate::certs
//! DIR/keys/        copies of link.key, agent.key, the nodes' TLS keys and the etcd password
//!                  file for the users the gateway, poolers and control process run as (mode
//!                  600 each, owned by that user; crate::privilege), the directory 711
//! DIR/agent/       node1's agent: its pledge (tidepool-node.json), owned by the pooler's user,
//!                  mode 700 (nodeK's: DIR/nodeK/agent/)
//! DIR/control/     the control process's own: the file store's topology.json (with its
//!                  .lock and .leader) and requests/ from the command line; owned by the
//!                  control process's user, mode 700 (crate::control::files)
//! DIR/pgdata/      Postgres data directory, owned by the postgres OS user
//! DIR/run/         Postgres Unix socket directory, owned by the postgres OS user
//! DIR/logs/        one log per process: postgres.log, pooler.log, gateway.log
//! ```

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The agent secret's file name in a state directory.
pub const AGENT_KEY_FILE: &str = "agent.key";
/// The link secret's file name in a state directory.
pub const LINK_KEY_FILE: &str = "link.key";
/// The control process's own directory's name in a state directory.
pub const CONTROL_DIR: &str = "control";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    dir: PathBuf,
}

impl Layout {
    /// `dir` made absolute against the current directory (not canonicalized: it may not
    /// exist yet, and a symlinked path is what the user asked for).
    pub fn new(dir: &Path) -> Result<Layout> {
        let dir = std::path::absolute(dir).map_err(Error::io(format!(
            "resolving state directory {}",
            dir.display()
        )))?;
        Ok(Layout { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn state_file(&self) -> PathBuf {
        self.dir.join("state.json")
    }

    pub fn password_file(&self) -> PathBuf {
        self.dir.join("password")
    }

    pub fn agent_key_file(&self) -> PathBuf {
        self.dir.join(AGENT_KEY_FILE)
    }

    pub fn link_key_file(&self) -> PathBuf {
        self.dir.join(LINK_KEY_FILE)
    }

    /// Per-user copies of the secrets (see `crate::privilege`).
    pub fn keys_dir(&self) -> PathBuf {
        self.dir.join("keys")
    }

    /// The control process's own directory (see `crate::control::files`).
    pub fn control_dir(&self) -> PathBuf {
        self.dir.join(CONTROL_DIR)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("pgdata")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.dir.join("run")
    }

    pub fn logs_dir(&self) -> PathBuf {
        self.dir.join("logs")
    }

    pub fn log(&self, process: &str) -> PathBuf {
        self.logs_dir().join(format!("{process}.log"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_dirs_become_absolute() {
        let l = Layout::new(Path::new(".tidepool")).unwrap();
        assert!(l.dir().is_absolute());
        assert!(l.dir().ends_with(".tidepool"));
        assert_eq!(l.log("gateway"), l.dir().join("logs/gateway.log"));
    }
}
