//! The local-cluster commands: `up`, `status`, `down`. One file per command.

pub mod down;
pub mod node_add;
pub mod node_remove;
pub mod nodes;
pub mod status;
pub mod switchover;
pub mod up;

use std::path::{Path, PathBuf};

use crate::cli::GlobalArgs;
use crate::config::Overrides;
use crate::error::Result;
use crate::layout::Layout;

/// What every command needs first: the merged flags and config file, and the state
/// directory's layout.
pub struct Context {
    pub overrides: Overrides,
    pub layout: Layout,
}

impl Context {
    /// `flags` on top of the `--config` file (if any).
    pub fn load(global: &GlobalArgs, flags: Overrides) -> Result<Context> {
        let file = match &global.config {
            Some(path) => Overrides::load(path)?,
            None => Overrides::default(),
        };
        let overrides = flags.over(file);
        let layout = Layout::new(&overrides.dir())?;
        Ok(Context { overrides, layout })
    }

    /// Only `--dir` from the flags, on top of the `--config` file: what the commands that act on
    /// an existing cluster (status, switchover, control, backup, node add) need.
    pub fn load_dir(global: &GlobalArgs) -> Result<Context> {
        Context::load(
            global,
            Overrides {
                dir: global.dir.clone(),
                ..Overrides::default()
            },
        )
    }
}

/// How the command line reaches the node agents of the cluster in `dir`: with the agent
/// secret `up` wrote (DIR/agent.key). See [`agent_access_with`].
pub fn agent_access(dir: &Path) -> Result<shared::agent::AgentAccess> {
    agent_access_with(dir, &dir.join(crate::layout::AGENT_KEY_FILE))
}

/// How the control process and the command line reach the node agents of the cluster in
/// `dir`: the agent secret in `key_file` (DIR/agent.key, or the control process's own copy:
/// [`crate::state::State::agent_key_path`]), which they prove, and TLS checked against the
/// cluster CA when `up` made one (DIR/tls/ca.crt, `crate::certs`; a cluster made before it
/// has plain agents).
pub fn agent_access_with(dir: &Path, key_file: &Path) -> Result<shared::agent::AgentAccess> {
    let key = shared::agent::AgentKey::load(key_file).map_err(|e| {
        crate::error::Error::Environment(format!(
            "the agent secret: {e} (`tidepool up` writes it; a cluster made before it existed \
             needs `tidepool down` and `tidepool up`)"
        ))
    })?;
    let ca = crate::certs::ca_file(dir);
    if !ca.exists() {
        return Ok(shared::agent::AgentAccess::plain(key));
    }
    shared::agent::AgentAccess::with_tls(key, &ca)
        .map_err(|e| crate::error::Error::Environment(format!("the cluster CA: {e}")))
}

/// The agent secret, generated (mode 600, from the OS's CSPRNG) when there is none yet.
pub fn ensure_agent_key(layout: &Layout) -> Result<shared::agent::AgentKey> {
    shared::agent::AgentKey::load_or_create(&layout.agent_key_file())
        .map_err(crate::error::Error::Environment)
}

/// The link secret (DIR/link.key: gateways and poolers prove it to each other), generated
/// (mode 600, from the OS's CSPRNG) when there is none yet. Not the agent's: a gateway faces
/// clients and must not hold the key that commands node agents.
pub fn ensure_link_key(layout: &Layout) -> Result<shared::link::LinkKey> {
    shared::link::LinkKey::load_or_create(&layout.link_key_file())
        .map_err(crate::error::Error::Environment)
}

/// `postgres://tidepool:PASSWORD@127.0.0.1:PORT/tidepool`
pub fn url(password: &str, port: u16) -> String {
    format!(
        "postgres://{role}:{password}@127.0.0.1:{port}/{db}",
        role = crate::postgres::ROLE,
        db = crate::postgres::DATABASE
    )
}

/// The pooler's and the gateway's binaries (see [`locate_binary`]), found before anything is
/// started or changed.
pub fn locate_pooler_and_gateway(bin_dir: Option<&Path>) -> Result<(PathBuf, PathBuf)> {
    use crate::state::Role;
    Ok((
        locate_binary(bin_dir, Role::Pooler.program(), "tidepool-pooler")?,
        locate_binary(bin_dir, Role::Gateway.program(), "tidepool-gateway")?,
    ))
}

/// `bin_dir/name`, or the file beside the running `tidepool` executable.
pub fn locate_binary(bin_dir: Option<&Path>, name: &str, package: &str) -> Result<PathBuf> {
    let dir = match bin_dir {
        Some(d) => d.to_path_buf(),
        None => {
            let exe = std::env::current_exe()
                .map_err(crate::error::Error::io("finding the tidepool executable"))?;
            exe.parent().map(Path::to_path_buf).unwrap_or_default()
        }
    };
    let path = dir.join(name);
    if path.is_file() {
        Ok(path)
    } else {
        Err(crate::error::Error::MissingBinary {
            name: name.to_string(),
            package: package.to_string(),
            path,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_shape() {
        assert_eq!(
            url("pw", 15432),
            "postgres://tidepool:pw@127.0.0.1:15432/tidepool"
        );
    }

    #[test]
    fn missing_binaries_say_how_to_build_them() {
        let err = locate_binary(
            Some(Path::new("/nonexistent")),
            "tidepool-gateway",
            "tidepool-gateway",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("cargo build -p tidepool-gateway"), "{err}");
    }
}
