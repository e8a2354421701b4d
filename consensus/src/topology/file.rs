//! The embedded store: the topology in a JSON file owned by the control process.
//!
//! - `PATH` holds `{"version": N, "topology": {...}}`, replaced atomically (temporary file,
//!   fsync, rename, fsync of the directory): a crash leaves the old or the new whole.
//! - `PATH.lock` is only ever `flock`ed: compare-and-swap and every change of leadership run
//!   under an exclusive lock on it, so two processes on this machine take turns.
//! - `PATH.leader` holds the lease `{"id": ..., "expires_unix_ms": ...}`; the leader renews it,
//!   and anyone may take it once it has expired. Wall-clock time is fine here: every reader
//!   is on this one machine.
//!
//! The work is blocking file I/O, so it runs on tokio's blocking pool.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{now_unix_ms, Leadership, StoreError, Topology, Version};

/// How long to wait for another process's lock before giving up (they hold it for
/// microseconds: a longer wait means that process is stuck).
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// The topology in a file (see the module documentation).
#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
}

#[derive(Serialize, Deserialize)]
struct Stored {
    version: Version,
    topology: Topology,
}

#[derive(Debug, Serialize, Deserialize)]
struct Lease {
    id: String,
    expires_unix_ms: u64,
}

impl FileStore {
    /// A store kept in `path` (created by the first `compare_and_swap`); its lock and lease
    /// files go beside it. The directory must exist.
    pub fn new(path: impl Into<PathBuf>) -> FileStore {
        FileStore { path: path.into() }
    }

    /// The topology file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn sibling(&self, suffix: &str) -> PathBuf {
        let mut name = self.path.file_name().unwrap_or_default().to_os_string();
        name.push(suffix);
        self.path.with_file_name(name)
    }

    pub(super) async fn load(&self) -> Result<Option<(Topology, Version)>, StoreError> {
        let path = self.path.clone();
        blocking(move || Ok(read_stored(&path)?.map(|s| (s.topology, s.version)))).await
    }

    pub(super) async fn compare_and_swap(
        &self,
        expected: Option<Version>,
        new: &Topology,
    ) -> Result<bool, StoreError> {
        let (path, lock) = (self.path.clone(), self.sibling(".lock"));
        let new = new.clone();
        blocking(move || {
            let _guard = lock_exclusive(&lock)?;
            let current = read_stored(&path)?.map(|s| s.version);
            if current != expected {
                tracing::debug!(path = %path.display(), ?current, ?expected, "topology changed by someone else");
                return Ok(false);
            }
            let stored = Stored {
                version: current.unwrap_or(0) + 1,
                topology: new,
            };
            let text = serde_json::to_vec_pretty(&stored).map_err(|e| StoreError::Corrupt {
                what: path.display().to_string(),
                message: e.to_string(),
            })?;
            write_atomically(&path, &text)?;
            Ok(true)
        })
        .await
    }

    pub(super) async fn campaign(
        &self,
        id: &str,
        ttl: Duration,
    ) -> Result<Option<Leadership>, StoreError> {
        let (lease_path, lock) = (self.sibling(".leader"), self.sibling(".lock"));
        let id = id.to_string();
        blocking(move || {
            let _guard = lock_exclusive(&lock)?;
            let now = now_unix_ms();
            if let Some(held) = read_lease(&lease_path)? {
                if held.id != id && held.expires_unix_ms > now {
                    return Ok(None);
                }
            }
            write_lease(&lease_path, &id, now + ttl.as_millis() as u64)?;
            tracing::info!(id = %id, ttl_ms = ttl.as_millis() as u64, "leadership taken (file store)");
            Ok(Some(Leadership { id, ttl, lease: 0 }))
        })
        .await
    }

    pub(super) async fn renew(&self, leadership: &Leadership) -> Result<bool, StoreError> {
        let (lease_path, lock) = (self.sibling(".leader"), self.sibling(".lock"));
        let l = leadership.clone();
        blocking(move || {
            let _guard = lock_exclusive(&lock)?;
            let now = now_unix_ms();
            match read_lease(&lease_path)? {
                Some(held) if held.id == l.id && held.expires_unix_ms > now => {
                    write_lease(&lease_path, &l.id, now + l.ttl.as_millis() as u64)?;
                    Ok(true)
                }
                _ => Ok(false),
            }
        })
        .await
    }

    pub(super) async fn is_leader(&self, leadership: &Leadership) -> Result<bool, StoreError> {
        let lease_path = self.sibling(".leader");
        let id = leadership.id.clone();
        blocking(move || {
            Ok(read_lease(&lease_path)?
                .is_some_and(|held| held.id == id && held.expires_unix_ms > now_unix_ms()))
        })
        .await
    }

    pub(super) async fn resign(&self, leadership: &Leadership) -> Result<(), StoreError> {
        let (lease_path, lock) = (self.sibling(".leader"), self.sibling(".lock"));
        let id = leadership.id.clone();
        blocking(move || {
            let _guard = lock_exclusive(&lock)?;
            if read_lease(&lease_path)?.is_some_and(|held| held.id == id) {
                std::fs::remove_file(&lease_path).map_err(io(&lease_path, "removing"))?;
            }
            Ok(())
        })
        .await
    }

    pub(super) async fn leader(&self) -> Result<Option<String>, StoreError> {
        let lease_path = self.sibling(".leader");
        blocking(move || {
            Ok(read_lease(&lease_path)?
                .filter(|held| held.expires_unix_ms > now_unix_ms())
                .map(|held| held.id))
        })
        .await
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| StoreError::Io {
            context: "topology file task".to_string(),
            source: std::io::Error::other(e.to_string()),
        })?
}

fn io(path: &Path, doing: &str) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = format!("{doing} {}", path.display());
    move |source| StoreError::Io { context, source }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<Option<T>, StoreError> {
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io(path, "reading")(e)),
    };
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| StoreError::Corrupt {
            what: path.display().to_string(),
            message: e.to_string(),
        })
}

fn read_stored(path: &Path) -> Result<Option<Stored>, StoreError> {
    read_json(path)
}

fn read_lease(path: &Path) -> Result<Option<Lease>, StoreError> {
    read_json(path)
}

fn write_lease(path: &Path, id: &str, expires_unix_ms: u64) -> Result<(), StoreError> {
    let lease = Lease {
        id: id.to_string(),
        expires_unix_ms,
    };
    let text = serde_json::to_vec(&lease).map_err(|e| StoreError::Corrupt {
        what: path.display().to_string(),
        message: e.to_string(),
    })?;
    write_atomically(path, &text)
}

/// Temporary file, fsync, rename over `path`, fsync of the directory.
fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let mut f = File::create(&tmp).map_err(io(&tmp, "creating"))?;
    f.write_all(bytes)
        .and_then(|()| f.sync_all())
        .map_err(io(&tmp, "writing"))?;
    std::fs::rename(&tmp, path).map_err(io(path, "renaming into"))?;
    if let Some(dir) = path.parent() {
        let dir = if dir.as_os_str().is_empty() {
            Path::new(".")
        } else {
            dir
        };
        File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io(dir, "syncing directory"))?;
    }
    Ok(())
}

/// A file only ever `flock`ed, opened read-only when it exists (`flock` needs no write
/// access): a lock file another user made stays usable, as when root's command line and a
/// control process running as `postgres` (under `up`) take the same one.
pub(crate) fn open_lock_file(path: &Path) -> std::io::Result<File> {
    match File::open(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path),
        other => other,
    }
}

/// An exclusive `flock` on `path`, released when the returned file is dropped (closing the
/// descriptor releases it, also when the process dies).
fn lock_exclusive(path: &Path) -> Result<File, StoreError> {
    let f = open_lock_file(path).map_err(io(path, "opening lock file"))?;
    let started = Instant::now();
    loop {
        // SAFETY: flock on a descriptor we own; no memory is passed.
        let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(f);
        }
        let err = std::io::Error::last_os_error();
        if err.kind() != std::io::ErrorKind::WouldBlock
            && err.kind() != std::io::ErrorKind::Interrupted
        {
            return Err(io(path, "locking")(err));
        }
        if started.elapsed() > LOCK_WAIT {
            return Err(StoreError::Timeout {
                what: format!("lock {}", path.display()),
                after_ms: LOCK_WAIT.as_millis() as u64,
            });
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}
