//! One backup at a time per cluster:
//!
//! - on this machine, an exclusive `flock` on DIR/pgbackrest/backup.lock (held by the process,
//!   so a crash releases it), and pgBackRest's own lock in the shared lock path behind it;
//! - across machines (a cluster whose topology is in etcd), the key
//!   `/tidepool/<cluster>/backup-lock` in etcd, bound to a lease this process keeps alive
//!   while the backup runs (a crashed process's lock lapses after [`TTL`]).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::state::State;
use crate::topology::{LockAttempt, Store};

/// How long the etcd lock outlives a process that stopped keeping it alive.
pub const TTL: Duration = Duration::from_secs(10);

/// Held while a backup runs; dropping it (or the process dying) releases the lock.
pub struct BackupLock {
    _file: File,
}

impl BackupLock {
    pub fn acquire(path: &Path) -> Result<BackupLock> {
        // The control process (`postgres` under `up`) and root's `tidepool backup create` take
        // the same file, whoever made it.
        let file = crate::topology::file::open_lock_file(path)
            .map_err(Error::io(format!("opening {}", path.display())))?;
        // SAFETY: flock on a descriptor we own.
        let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if r != 0 {
            return Err(Error::Conflict(format!(
                "another backup is running in this cluster ({} is locked): one backup at a \
                 time; try again when it ends",
                path.display()
            )));
        }
        Ok(BackupLock { _file: file })
    }
}

/// The store's backup lock, kept alive by a thread of its own until dropped; nothing with the
/// file store (one machine: [`BackupLock`] covers it).
pub struct ClusterLock {
    stop: Arc<AtomicBool>,
    keeper: Option<JoinHandle<()>>,
}

impl ClusterLock {
    pub fn acquire(state: &State) -> Result<ClusterLock> {
        let none = ClusterLock {
            stop: Arc::new(AtomicBool::new(false)),
            keeper: None,
        };
        if state.settings.etcd.as_deref().is_none_or(str::is_empty) {
            return Ok(none);
        }
        let store = crate::control::store_for(&state.dir, &state.settings)?;
        let id = format!(
            "backup {} pid {}",
            hostname().unwrap_or_else(|| "?".into()),
            std::process::id()
        );
        let rt = runtime()?;
        let lock = match rt.block_on(store.lock_backup(&id, TTL)) {
            Ok(LockAttempt::Taken(l)) => l,
            Ok(LockAttempt::Local) => return Ok(none),
            Ok(LockAttempt::HeldBy(holder)) => {
                return Err(Error::Conflict(format!(
                    "another backup is running in this cluster ({holder} holds the backup lock \
                     in etcd): one backup at a time; try again when it ends"
                )))
            }
            Err(e) => {
                return Err(Error::Conflict(format!(
                    "the backup lock in etcd: {e}: no backup without it (one at a time across \
                     machines)"
                )))
            }
        };
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let keeper = std::thread::spawn(move || keep(rt, store, lock, flag));
        Ok(ClusterLock {
            stop,
            keeper: Some(keeper),
        })
    }
}

/// Renews the lock every third of its ttl until told to stop, then gives it up.
fn keep(
    rt: tokio::runtime::Runtime,
    store: Store,
    lock: crate::topology::StoreLock,
    stop: Arc<AtomicBool>,
) {
    let step = Duration::from_millis(100);
    let mut waited = Duration::ZERO;
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(step);
        waited += step;
        if waited < TTL / 3 {
            continue;
        }
        waited = Duration::ZERO;
        match rt.block_on(store.keep_backup_lock(&lock)) {
            Ok(true) => {}
            Ok(false) => tracing::error!(
                "the backup lock in etcd lapsed while the backup runs: another backup may start"
            ),
            Err(e) => tracing::warn!(error = %e, "renewing the backup lock in etcd"),
        }
    }
    if let Err(e) = rt.block_on(store.unlock_backup(lock)) {
        tracing::warn!(error = %e, "releasing the backup lock in etcd (it lapses by itself)");
    }
}

impl Drop for ClusterLock {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(k) = self.keeper.take() {
            let _ = k.join();
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("starting a runtime for the backup lock"))
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}
