//! Postgres as a process: is the postmaster alive, pg_ctl start/stop, pg_rewind, and the
//! configuration files a rewind must not take from the source. Every program runs as the
//! owner of the data directory (the pooler may run as root), in its own process group (a
//! postmaster started here must outlive the pooler), and is bounded by a timeout.

use std::cell::RefCell;
use std::ffi::OsString;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub struct PgCtl {
    pub data: PathBuf,
    pub bin_dir: PathBuf,
    /// Where a Postgres started here logs (`pg_ctl -l`).
    pub log: RefCell<Option<PathBuf>>,
    /// `pg_log` was configured: never replaced by what a running postmaster uses.
    pub log_configured: bool,
}

/// What `postmaster.pid` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Postmaster {
    /// No pid file: never started, or shut down cleanly (pg_ctl stop removes it).
    Stopped,
    /// The pid file names a live process.
    Running(u32),
    /// The pid file names a process that is gone: Postgres crashed (or was killed).
    Crashed(u32),
}

impl PgCtl {
    pub fn postmaster(&self) -> Postmaster {
        let text = match std::fs::read_to_string(self.data.join("postmaster.pid")) {
            Ok(t) => t,
            Err(_) => return Postmaster::Stopped,
        };
        let Some(pid) = text
            .lines()
            .next()
            .and_then(|l| l.trim().parse::<u32>().ok())
        else {
            // Being written right now (the postmaster writes it line by line).
            return Postmaster::Running(0);
        };
        if alive(pid) {
            Postmaster::Running(pid)
        } else {
            Postmaster::Crashed(pid)
        }
    }

    /// Without a configured `pg_log`, a restart logs where the running postmaster logged
    /// (whoever started it with `pg_ctl -l`): its stderr, when that is a plain file.
    pub fn learn_log(&self, pid: u32) {
        if self.log_configured || pid == 0 {
            return;
        }
        let Ok(path) = std::fs::read_link(format!("/proc/{pid}/fd/2")) else {
            return;
        };
        if path.is_absolute() && std::fs::metadata(&path).is_ok_and(|m| m.is_file()) {
            let mut log = self.log.borrow_mut();
            if log.as_ref() != Some(&path) {
                tracing::info!(log = %path.display(), "postgres log learned from the postmaster");
                *log = Some(path);
            }
        }
    }

    /// (uid, gid) of the data directory's owner: Postgres refuses to run as anyone else.
    fn owner(&self) -> Option<(u32, u32)> {
        std::fs::metadata(&self.data)
            .ok()
            .map(|m| (m.uid(), m.gid()))
    }

    /// Runs `program` from the bin dir with `args`; its output, or why it failed.
    pub async fn run(
        &self,
        program: &str,
        args: &[OsString],
        timeout: Duration,
    ) -> Result<String, String> {
        let mut cmd = tokio::process::Command::new(self.bin_dir.join(program));
        cmd.args(args)
            .current_dir("/")
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true)
            .process_group(0);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            if let Some((uid, gid)) = self.owner().filter(|(uid, _)| *uid != 0) {
                cmd.uid(uid).gid(gid);
            }
        }
        let out = tokio::time::timeout(timeout, cmd.output())
            .await
            .map_err(|_| format!("{program} did not finish within {timeout:?}"))?
            .map_err(|e| format!("{program}: {e}"))?;
        let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
        text += &String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!(
                "{program} failed ({}): {}",
                out.status,
                text.trim()
            ))
        }
    }

    fn data_arg(&self) -> OsString {
        self.data.clone().into_os_string()
    }

    /// `pg_ctl start -w`: returns once Postgres accepts connections (or has failed).
    pub async fn start(&self, timeout: Duration) -> Result<(), String> {
        let secs = timeout.as_secs().max(1);
        let mut args: Vec<OsString> = vec!["-D".into(), self.data_arg()];
        if let Some(log) = self.log.borrow().clone() {
            args.push("-l".into());
            args.push(log.into_os_string());
        }
        args.extend([
            "-w".into(),
            "-t".into(),
            secs.to_string().into(),
            "start".into(),
        ]);
        self.run("pg_ctl", &args, timeout + Duration::from_secs(5))
            .await
            .map(|_| ())
    }

    /// `pg_ctl stop -m fast -w`.
    pub async fn stop(&self, timeout: Duration) -> Result<(), String> {
        // Planned: the sessions are the gateways' to move, not to end (server_end.rs).
        let _planned = crate::server_end::Planned::begin();
        let secs = timeout.as_secs().max(1);
        let args: Vec<OsString> = vec![
            "-D".into(),
            self.data_arg(),
            "-m".into(),
            "fast".into(),
            "-w".into(),
            "-t".into(),
            secs.to_string().into(),
            "stop".into(),
        ];
        self.run("pg_ctl", &args, timeout + Duration::from_secs(5))
            .await
            .map(|_| ())
    }

    /// `pg_rewind` from `source` (a conninfo). A target that was not shut down cleanly is
    /// first taken through crash recovery by pg_rewind itself, in single-user mode
    /// (`postgres --single`, PG13+): no client can connect to it meanwhile, so the old
    /// primary never serves a write after it lost its role.
    pub async fn rewind(&self, source: &str, timeout: Duration) -> Result<String, String> {
        let args: Vec<OsString> = vec![
            format!("--target-pgdata={}", self.data.display()).into(),
            format!("--source-server={source}").into(),
        ];
        self.run("pg_rewind", &args, timeout).await
    }

    /// Reads the node's own configuration files, to be put back after a rewind copied the
    /// source's over them (a rewind copies every file, the port and paths included).
    pub fn save_config(&self) -> Vec<(PathBuf, Vec<u8>)> {
        [
            "postgresql.conf",
            "postgresql.auto.conf",
            "pg_hba.conf",
            "pg_ident.conf",
            // What `tidepool up` writes (port, socket directory, replication settings).
            "tidepool.conf",
        ]
        .iter()
        .filter_map(|n| {
            let p = self.data.join(n);
            std::fs::read(&p).ok().map(|b| (p, b))
        })
        .collect()
    }

    /// Writes a file in the data directory, owned like the directory.
    pub fn write_owned(&self, path: &Path, bytes: &[u8]) -> Result<(), String> {
        std::fs::write(path, bytes).map_err(|e| format!("writing {}: {e}", path.display()))?;
        if let Some((uid, gid)) = self.owner() {
            std::os::unix::fs::chown(path, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", path.display()))?;
        }
        Ok(())
    }

    /// Makes the (stopped) node a standby of `conninfo`: `standby.signal`, and in
    /// `postgresql.auto.conf` this `primary_conninfo` instead of the old one (and no fence
    /// left over from its time as a primary).
    pub fn make_standby(&self, conninfo: &str) -> Result<(), String> {
        // The line is written by hand, not by ALTER SYSTEM: nothing in it may end the line or
        // escape (the configuration parser reads backslash escapes inside quotes). Requests are
        // validated before they get here (shared::agent::validate); this is the last guard.
        if conninfo.chars().any(|c| c.is_control() || c == '\\') {
            return Err(format!(
                "refusing to write a primary_conninfo with a control character or a backslash: {conninfo:?}"
            ));
        }
        let auto = self.data.join("postgresql.auto.conf");
        let old = std::fs::read_to_string(&auto).unwrap_or_default();
        let mut new = String::new();
        for line in old.lines() {
            let key = line.trim_start();
            if [
                "primary_conninfo",
                "synchronous_standby_names",
                "default_transaction_read_only",
                // Set empty before a rewind (ops.rs, `stop_archiving`); tidepool.conf's applies.
                "archive_command",
            ]
            .iter()
            .any(|k| key.starts_with(k))
            {
                continue;
            }
            new += line;
            new.push('\n');
        }
        new += &format!("primary_conninfo = '{}'\n", conninfo.replace('\'', "''"));
        self.write_owned(&auto, new.as_bytes())?;
        self.write_owned(&self.data.join("standby.signal"), b"")
    }
}

/// The process exists and is not a zombie.
pub fn alive(pid: u32) -> bool {
    if pid == 0 || pid > i32::MAX as u32 {
        return false;
    }
    // SAFETY: signal 0 only checks that the process exists.
    let r = unsafe { libc::kill(pid as libc::pid_t, 0) };
    if r != 0 && std::io::Error::last_os_error().raw_os_error() != Some(libc::EPERM) {
        return false;
    }
    // A killed postmaster whose parent has not reaped it yet is still in the table.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_none_or(|state| state != "Z" && state != "X"),
        Err(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_alive_and_pid_zero_is_not() {
        assert!(alive(std::process::id()));
        assert!(!alive(0));
    }

    #[test]
    fn a_missing_pid_file_is_stopped() {
        let c = PgCtl {
            data: PathBuf::from("/nonexistent/tidepool"),
            bin_dir: PathBuf::from("/usr/lib/postgresql/15/bin"),
            log: RefCell::new(None),
            log_configured: false,
        };
        assert_eq!(c.postmaster(), Postmaster::Stopped);
    }
}
