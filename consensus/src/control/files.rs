//! The control process's own directory, `DIR/control/`: the file store's `topology.json`
//! (with `.lock` and `.leader` beside it) and `requests/` from the command line.
//!
//! A directory of its own because the control process may run as another user than the one
//! that owns the state directory: `up` run as root starts it as `postgres`
//! (`crate::privilege`), and `DIR` itself stays root's (it holds `state.json` and the
//! `pgbackrest.conf` root's commands run with, which `postgres` must not be able to replace).
//! Under systemd (`tidepool install`) the cluster is made as `postgres`, so `DIR` and this
//! directory are both that user's: one layout for both.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::layout::{Layout, CONTROL_DIR};
use crate::privilege::Account;

/// The file store's topology file's name (`control::store_for`).
pub const TOPOLOGY_FILE: &str = "topology.json";

/// `DIR/control/requests`.
pub fn requests_dir(state_dir: &Path) -> PathBuf {
    state_dir.join(CONTROL_DIR).join("requests")
}

/// Makes `DIR/control/` ready for a control process about to start as `account` (the caller
/// when `None`): it and `requests/` mode 700, they and what is in them owned by that account
/// (a lock file root's command line made is then the control process's too). Called only while
/// no control process of the cluster runs.
///
/// A cluster made before this directory kept its topology in `DIR/topology.json` and its
/// requests in `DIR/requests/`: the topology is moved in (its term history is the cluster's
/// record of failovers); if both files exist, nothing is guessed. Old requests are dropped:
/// whoever asked has stopped waiting.
pub fn prepare(layout: &Layout, account: Option<&Account>) -> Result<()> {
    let dir = layout.control_dir();
    let requests = requests_dir(layout.dir());
    for d in [&dir, &requests] {
        std::fs::create_dir_all(d).map_err(Error::io(format!("creating {}", d.display())))?;
        std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o700))
            .map_err(Error::io(format!("chmod {}", d.display())))?;
    }
    let old = layout.dir().join(TOPOLOGY_FILE);
    let new = dir.join(TOPOLOGY_FILE);
    if old.exists() {
        if new.exists() {
            return Err(Error::Conflict(format!(
                "two topology files, {} and {}: a control process of an earlier version ran \
                 after this one; keep the one with the higher term in {} and remove the other",
                old.display(),
                new.display(),
                dir.display()
            )));
        }
        std::fs::rename(&old, &new).map_err(Error::io(format!(
            "moving {} into {}",
            old.display(),
            dir.display()
        )))?;
        for d in [dir.as_path(), layout.dir()] {
            std::fs::File::open(d)
                .and_then(|f| f.sync_all())
                .map_err(Error::io(format!("syncing {}", d.display())))?;
        }
        eprintln!("moved {} into {}", old.display(), dir.display());
    }
    // The old lease and lock (no control process runs), and requests nobody waits for.
    for stale in [".leader", ".lock", ".tmp"] {
        let _ = std::fs::remove_file(layout.dir().join(format!("{TOPOLOGY_FILE}{stale}")));
    }
    let _ = std::fs::remove_dir_all(layout.dir().join("requests"));
    if let Some(a) = account {
        for d in [&dir, &requests] {
            chown(d, a)?;
            let entries =
                std::fs::read_dir(d).map_err(Error::io(format!("reading {}", d.display())))?;
            for e in entries {
                let e = e.map_err(Error::io(format!("reading {}", d.display())))?;
                chown(&e.path(), a)?;
            }
        }
    }
    Ok(())
}

fn chown(path: &Path, a: &Account) -> Result<()> {
    std::os::unix::fs::chown(path, Some(a.uid), Some(a.gid)).map_err(Error::io(format!(
        "chown {} {}",
        a.name,
        path.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_older_topology_moves_in_once_and_two_are_refused() {
        let root = std::env::temp_dir().join(format!("tp-control-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        std::fs::create_dir_all(root.join("requests")).unwrap();
        let layout = Layout::new(&root).unwrap();
        let old = root.join(TOPOLOGY_FILE);
        std::fs::write(&old, r#"{"version":3}"#).unwrap();
        std::fs::write(root.join("topology.json.leader"), "{}").unwrap();
        prepare(&layout, None).unwrap();
        let new = layout.control_dir().join(TOPOLOGY_FILE);
        assert_eq!(std::fs::read_to_string(&new).unwrap(), r#"{"version":3}"#);
        assert!(!old.exists() && !root.join("topology.json.leader").exists());
        assert!(!root.join("requests").exists());
        for d in [layout.control_dir(), requests_dir(&root)] {
            let mode = std::fs::metadata(&d).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o700, "{}", d.display());
        }
        // Again: nothing to move, nothing changes.
        prepare(&layout, None).unwrap();
        assert!(new.exists());
        // An older control process wrote the old file again: not guessed.
        std::fs::write(&old, r#"{"version":9}"#).unwrap();
        let e = prepare(&layout, None).unwrap_err().to_string();
        assert!(e.contains("two topology files"), "{e}");
        let _ = std::fs::remove_dir_all(&root);
    }
}
