//! Least privilege for what `tidepool up` starts (issue 12 §4): nothing the network reaches
//! runs as root, nor does the control process. When `up` runs as root, the gateway (which faces clients) runs as the
//! `tidepool` OS user, created if missing (`useradd --system`; if that fails, `nobody`, with a
//! warning), and every pooler as `postgres`, which owns the data directory and the socket
//! directory its admin connection uses (peer authentication maps `postgres` to the `postgres`
//! role). Each gets its own copy of the secrets it needs, owned by it, mode 600, in
//! `DIR/keys/` (a key file group or others may read is refused by both processes, so one file
//! cannot serve two users). The masters (`DIR/link.key`, `DIR/agent.key`) stay root's.
//!
//! With standbys, a pooler is also its node's agent: as `postgres` it runs `pg_ctl` and
//! `pg_rewind` and writes `standby.signal` and `postgresql.auto.conf` as the data directory's
//! owner, as it did through a uid switch when it was root, and keeps its pledge in a directory
//! of its own (`NodeRecord::agent_dir`, mode 700), not in the root-owned node directory: that
//! one holds the `pgbackrest.conf` root's backups run with, which `postgres` must not be able
//! to replace.
//!
//! The control process runs as `postgres` too (it listens only for metrics, when asked, but
//! commands every node): as the data directories' owner it runs pgBackRest without `runuser`;
//! it reads its own copy of the agent secret (`DIR/keys/agent.control.key`, given by
//! `--agent-secret-file`); and it keeps the file store's topology and answers the command
//! line's requests in a directory of its own, `DIR/control/` (mode 700;
//! `crate::control::files`), where root's commands still write and read. A control process
//! `up` finds running is kept as it is, whatever user it runs as.
//!
//! When `up` does not run as root, everything runs as the caller, as before.

use std::ffi::CString;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{Error, Result};
use crate::state::Role;

/// The gateway's OS user (as `tidepool install` names it).
pub const GATEWAY_USER: &str = "tidepool";
/// Used when the gateway's user cannot be created.
pub const FALLBACK_USER: &str = "nobody";

/// An OS account a process is started as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl Account {
    /// `None` when there is no such user.
    pub fn lookup(name: &str) -> Option<Account> {
        let cname = CString::new(name).ok()?;
        // SAFETY: getpwnam returns a pointer into static storage or null; the fields are
        // copied out at once (the CLI is single-threaded here).
        let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
        if pw.is_null() {
            return None;
        }
        // SAFETY: non-null pointer from getpwnam, read immediately.
        let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
        Some(Account {
            name: name.to_owned(),
            uid,
            gid,
        })
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Who `role` runs as when `up` starts it (`None`: as the caller).
pub fn account_for(role: Role) -> Result<Option<Account>> {
    if !is_root() {
        return Ok(None);
    }
    match role {
        Role::Gateway => gateway_account().map(Some),
        // The control process as the data directories' owner: pgBackRest and anything of
        // Postgres it runs need no `runuser`.
        Role::Pooler | Role::Control => Account::lookup(crate::postgres::OS_USER)
            .map(Some)
            .ok_or_else(|| {
                Error::Environment(format!(
                    "OS user {:?} does not exist: install PostgreSQL 15 (scripts/setup.sh)",
                    crate::postgres::OS_USER
                ))
            }),
        Role::Postgres => Ok(None),
    }
}

/// The `tidepool` user, created (system account, no home, no shell) when missing.
fn gateway_account() -> Result<Account> {
    if let Some(a) = Account::lookup(GATEWAY_USER) {
        return Ok(a);
    }
    let made = Command::new("useradd")
        .args([
            "--system",
            "--user-group",
            "--no-create-home",
            "--home-dir",
            "/nonexistent",
            "--shell",
            "/usr/sbin/nologin",
            "--comment",
            "Tidepool gateway",
            GATEWAY_USER,
        ])
        .output();
    match made {
        Ok(out) if out.status.success() => eprintln!("created OS user {GATEWAY_USER}"),
        Ok(out) => eprintln!(
            "warning: could not create OS user {GATEWAY_USER} (useradd: {})",
            String::from_utf8_lossy(&out.stderr).trim()
        ),
        Err(e) => eprintln!("warning: could not create OS user {GATEWAY_USER} (useradd: {e})"),
    }
    if let Some(a) = Account::lookup(GATEWAY_USER) {
        return Ok(a);
    }
    let fallback = Account::lookup(FALLBACK_USER).ok_or_else(|| {
        Error::Environment(format!(
            "neither OS user {GATEWAY_USER} nor {FALLBACK_USER} exists: create {GATEWAY_USER} \
             (useradd --system --no-create-home --shell /usr/sbin/nologin {GATEWAY_USER})"
        ))
    })?;
    eprintln!("warning: the gateway runs as {FALLBACK_USER}");
    Ok(fallback)
}

/// `DIR/keys/NAME`: a copy of `master` for `account` (mode 600, owned by it; by the caller
/// when `None`), rewritten when its content differs. Returns its path.
pub fn key_copy(
    master: &Path,
    keys_dir: &Path,
    name: &str,
    account: Option<&Account>,
) -> Result<PathBuf> {
    std::fs::create_dir_all(keys_dir)
        .map_err(Error::io(format!("creating {}", keys_dir.display())))?;
    // Searchable by the accounts, listable by none of them.
    std::fs::set_permissions(keys_dir, std::fs::Permissions::from_mode(0o711))
        .map_err(Error::io(format!("chmod {}", keys_dir.display())))?;
    let secret =
        std::fs::read(master).map_err(Error::io(format!("reading {}", master.display())))?;
    let path = keys_dir.join(name);
    if std::fs::read(&path).ok().as_deref() != Some(secret.as_slice()) {
        // A fresh file created 600 (never readable by others, even for a moment), then moved
        // over the old one.
        let tmp = keys_dir.join(format!(".{name}.tmp"));
        let _ = std::fs::remove_file(&tmp);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(Error::io(format!("creating {}", tmp.display())))?;
        f.write_all(&secret)
            .map_err(Error::io(format!("writing {}", tmp.display())))?;
        std::fs::rename(&tmp, &path).map_err(Error::io(format!("writing {}", path.display())))?;
    }
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io(format!("chmod {}", path.display())))?;
    if let Some(a) = account {
        std::os::unix::fs::chown(&path, Some(a.uid), Some(a.gid)).map_err(Error::io(format!(
            "chown {} {}",
            a.name,
            path.display()
        )))?;
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn key_copies_are_private_and_follow_the_master() {
        let dir = std::env::temp_dir().join(format!("tp-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let master = dir.join("link.key");
        std::fs::write(&master, "aa").unwrap();
        let keys = dir.join("keys");
        let p = key_copy(&master, &keys, "link.gateway.key", None).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"aa");
        assert_eq!(std::fs::metadata(&p).unwrap().mode() & 0o777, 0o600);
        assert_eq!(std::fs::metadata(&keys).unwrap().mode() & 0o777, 0o711);
        std::fs::write(&master, "bb").unwrap();
        key_copy(&master, &keys, "link.gateway.key", None).unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"bb");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
