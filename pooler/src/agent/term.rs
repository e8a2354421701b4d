//! The node's pledge, kept in `state_dir/tidepool-node.json`: the highest term it pledged to,
//! the term it was promoted at, and whether a recruit stopped it.
//!
//! Written to a temporary file, synced, renamed over the old one and the directory synced,
//! all before the agent answers: a pledge the control counted must survive a crash of this
//! machine, or two leaders could each count it for a majority.

use serde::{Deserialize, Serialize};
use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pledge {
    /// Highest term pledged to.
    pub term: u64,
    /// Term at which this node was promoted (0: bootstrap primary, or not a primary).
    pub primary_term: u64,
    /// A recruit stopped this node until a promote or follow.
    pub recruited: bool,
}

pub struct PledgeFile {
    path: PathBuf,
}

pub const FILE_NAME: &str = "tidepool-node.json";

impl PledgeFile {
    pub fn new(dir: &Path) -> PledgeFile {
        PledgeFile {
            path: dir.join(FILE_NAME),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The stored pledge; a missing file is term 0. A file that does not parse is an error:
    /// guessing 0 could let this node pledge twice to one term.
    pub fn load(&self) -> Result<Pledge, String> {
        match fs::read_to_string(&self.path) {
            Ok(text) => {
                serde_json::from_str(&text).map_err(|e| format!("{}: {e}", self.path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Pledge::default()),
            Err(e) => Err(format!("reading {}: {e}", self.path.display())),
        }
    }

    /// Durably replaces the stored pledge (temp file, fsync, rename, fsync of the directory).
    pub fn store(&self, p: &Pledge) -> Result<(), String> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let ctx = |what: &str, e: std::io::Error| format!("{what} {}: {e}", self.path.display());
        fs::create_dir_all(dir).map_err(|e| ctx("creating the directory of", e))?;
        let tmp = self.path.with_extension("json.tmp");
        let body = serde_json::to_vec(p).map_err(|e| e.to_string())?;
        {
            let mut f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(&tmp)
                .map_err(|e| ctx("creating a temporary file for", e))?;
            f.write_all(&body).map_err(|e| ctx("writing", e))?;
            f.sync_all().map_err(|e| ctx("syncing", e))?;
        }
        fs::rename(&tmp, &self.path).map_err(|e| ctx("renaming over", e))?;
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| ctx("syncing the directory of", e))?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_missing_file() {
        let dir = std::env::temp_dir().join(format!("tidepool-pledge-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let f = PledgeFile::new(&dir);
        assert_eq!(f.load().unwrap(), Pledge::default());
        let p = Pledge {
            term: 7,
            primary_term: 5,
            recruited: true,
        };
        f.store(&p).unwrap();
        assert_eq!(f.load().unwrap(), p);
        fs::write(f.path(), b"{not json").unwrap();
        assert!(f.load().is_err());
        let _ = fs::remove_dir_all(&dir);
    }
}
