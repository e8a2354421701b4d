//! Requests to the running control process from the command line (`tidepool switchover`,
//! `tidepool failover --force`): a JSON file in `DIR/control/requests/`, answered by a `.done`
//! file beside it. One process acts on the cluster; the command line only asks and waits.
//!
//! The directory is the control process's (`files::prepare`): it removes the requests it
//! took and writes its answers there whichever user it runs as; the command line, root under
//! `up`, may write and read anywhere.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RequestKind {
    Switchover { to: Option<String> },
    Failover { to: Option<String>, reason: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Request {
    pub id: String,
    #[serde(flatten)]
    pub kind: RequestKind,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Answer {
    pub ok: bool,
    pub message: String,
}

fn dir(state_dir: &Path) -> PathBuf {
    super::files::requests_dir(state_dir)
}

/// The oldest pending request, if any.
pub fn next(state_dir: &Path) -> Option<Request> {
    let mut pending: Vec<PathBuf> = std::fs::read_dir(dir(state_dir))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "json"))
        .collect();
    pending.sort();
    for path in pending {
        let parsed = std::fs::read_to_string(&path)
            .ok()
            .and_then(|t| serde_json::from_str::<Request>(&t).ok());
        match parsed {
            Some(r) => return Some(r),
            None => {
                // Unreadable: answered as such, never retried forever.
                let _ = std::fs::rename(&path, path.with_extension("bad"));
            }
        }
    }
    None
}

pub fn answer(
    state_dir: &Path,
    req: &Request,
    outcome: &std::result::Result<(), crate::error::Error>,
) {
    let answer = match outcome {
        Ok(()) => Answer {
            ok: true,
            message: "done".into(),
        },
        Err(e) => Answer {
            ok: false,
            message: e.to_string(),
        },
    };
    let d = dir(state_dir);
    let done = d.join(format!("{}.done", req.id));
    if let Ok(text) = serde_json::to_string(&answer) {
        let _ = std::fs::write(&done, text);
    }
    let _ = std::fs::remove_file(d.join(format!("{}.json", req.id)));
}

/// Asks the control process and waits up to `timeout` for its answer.
pub fn submit(state_dir: &Path, kind: RequestKind, timeout: Duration) -> Result<Answer> {
    let d = dir(state_dir);
    // Made by `up` for the control process, owned by its user: not made here (as root, it
    // would be a directory that process cannot answer in).
    if !d.is_dir() {
        return Err(Error::Conflict(format!(
            "no control process was started in {} (no {}): `tidepool up --standbys N` starts one",
            state_dir.display(),
            d.display()
        )));
    }
    let id = format!("{:020}-{}", crate::control::now_ms(), std::process::id());
    let req = Request {
        id: id.clone(),
        kind,
    };
    let text = serde_json::to_string(&req).map_err(|source| Error::State {
        path: d.clone(),
        source,
    })?;
    let tmp = d.join(format!("{id}.tmp"));
    std::fs::write(&tmp, text).map_err(Error::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, d.join(format!("{id}.json")))
        .map_err(Error::io(format!("writing request in {}", d.display())))?;
    let done = d.join(format!("{id}.done"));
    let start = Instant::now();
    while start.elapsed() < timeout {
        if let Ok(text) = std::fs::read_to_string(&done) {
            if let Ok(a) = serde_json::from_str::<Answer>(&text) {
                let _ = std::fs::remove_file(&done);
                return Ok(a);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_file(d.join(format!("{id}.json")));
    Err(Error::Conflict(format!(
        "the control process did not answer within {} s: is it running? (tidepool status)",
        timeout.as_secs()
    )))
}
