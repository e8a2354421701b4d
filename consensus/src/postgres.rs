//! The local PostgreSQL 15 cluster of a state directory: initdb, configuration, start,
//! stop, and the `tidepool` role and database.
//!
//! Postgres runs as the `postgres` OS user. When we are root, its programs run through
//! `runuser -u postgres --`; when we are the postgres user, directly. Root reaches the
//! server over the Unix socket as role `postgres` through the pg_ident map `tidepool`
//! (docs/CONTRACTS.md), the same way the pooler's admin connection does.

use std::ffi::CString;
use std::io::Write;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::error::{Error, Result};

/// The login role and database `up` creates, and the one in the printed URL.
pub const ROLE: &str = "tidepool";
pub const DATABASE: &str = "tidepool";
/// The OS user (and superuser role) Postgres runs as.
pub const OS_USER: &str = "postgres";

/// Client authentication exactly as docs/CONTRACTS.md sets it for every Tidepool cluster.
pub const PG_HBA: &str = "\
# Written by `tidepool up`; rewritten on every `up`.
# TYPE  DATABASE  USER      ADDRESS        METHOD
local   all       postgres                 peer map=tidepool
local   all       all                      scram-sha-256
host    all       all       127.0.0.1/32   scram-sha-256
";

/// Added for clusters with standbys.
pub const PG_HBA_REPLICATION: &str = "\
local   replication postgres               peer map=tidepool
";

/// root and postgres OS users may log in as role postgres over the socket (the pooler's
/// admin connection, and `tidepool` itself).
pub const PG_IDENT: &str = "\
# Written by `tidepool up`; rewritten on every `up`.
# MAPNAME   SYSTEM-USERNAME   PG-USERNAME
tidepool    root              postgres
tidepool    postgres          postgres
";

const CONF_FILE: &str = "tidepool.conf";
const INCLUDE_LINE: &str = "include_if_exists = 'tidepool.conf'\t# added by tidepool up";

/// The OS account Postgres runs under.
#[derive(Debug, Clone, Copy)]
pub struct OsUser {
    pub uid: u32,
    pub gid: u32,
}

impl OsUser {
    pub fn lookup(name: &str) -> Result<OsUser> {
        let cname = CString::new(name)
            .map_err(|_| Error::Environment(format!("bad user name {name:?}")))?;
        // SAFETY: getpwnam returns a pointer into static storage or null; we copy the two
        // fields out before anything else can call it (the CLI is single-threaded here).
        let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
        if pw.is_null() {
            return Err(Error::Environment(format!(
                "OS user {name:?} does not exist: install PostgreSQL 15 (scripts/setup.sh)"
            )));
        }
        // SAFETY: non-null pointer from getpwnam, read immediately.
        let (uid, gid) = unsafe { ((*pw).pw_uid, (*pw).pw_gid) };
        Ok(OsUser { uid, gid })
    }
}

/// How we may act as the postgres OS user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Privilege {
    Root,
    IsPostgres,
}

#[derive(Debug, Clone)]
pub struct Postgres {
    pub bin_dir: PathBuf,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    pub port: u16,
    pub log: PathBuf,
    user: OsUser,
    privilege: Privilege,
}

impl Postgres {
    pub fn new(
        bin_dir: &Path,
        data_dir: PathBuf,
        socket_dir: PathBuf,
        port: u16,
        log: PathBuf,
    ) -> Result<Postgres> {
        let user = OsUser::lookup(OS_USER)?;
        // SAFETY: geteuid cannot fail.
        let euid = unsafe { libc::geteuid() };
        let privilege = if euid == 0 {
            Privilege::Root
        } else if euid == user.uid {
            Privilege::IsPostgres
        } else {
            return Err(Error::Environment(
                "tidepool must run as root (or as the postgres OS user): it runs Postgres as \
                 the postgres user"
                    .into(),
            ));
        };
        for program in ["initdb", "pg_ctl", "psql"] {
            if !bin_dir.join(program).is_file() {
                return Err(Error::Environment(format!(
                    "{} not found: install PostgreSQL 15 (scripts/setup.sh) or set pg_bin_dir",
                    bin_dir.join(program).display()
                )));
            }
        }
        // Unix socket paths are limited to 107 bytes (sun_path).
        let socket = socket_dir.join(format!(".s.PGSQL.{port}"));
        if socket.as_os_str().len() > 107 {
            return Err(Error::Environment(format!(
                "the socket path {} is longer than 107 bytes: use a shorter --dir",
                socket.display()
            )));
        }
        Ok(Postgres {
            bin_dir: bin_dir.to_path_buf(),
            data_dir,
            socket_dir,
            port,
            log,
            user,
            privilege,
        })
    }

    pub fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// A command running `program` (from the Postgres bin dir) as the postgres OS user.
    fn as_postgres(&self, program: &str) -> Command {
        let path = self.bin_dir.join(program);
        let mut cmd = match self.privilege {
            Privilege::Root => {
                let mut c = Command::new("runuser");
                c.args(["-u", OS_USER, "--"]).arg(path);
                c
            }
            Privilege::IsPostgres => Command::new(path),
        };
        // The postgres user may not be allowed into the caller's directory.
        cmd.current_dir("/");
        cmd
    }

    /// Creates the directories Postgres writes into, owned by the postgres user. The state
    /// directory itself must be reachable by that user: refuse early with a clear message
    /// rather than let initdb fail obscurely.
    pub fn prepare_dirs(&self) -> Result<()> {
        let dir = &self.socket_dir;
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
        self.chown(dir)?;
        set_mode(dir, 0o755)?;
        if !self.log.exists() {
            std::fs::write(&self.log, b"")
                .map_err(Error::io(format!("creating {}", self.log.display())))?;
        }
        self.chown(&self.log)?;
        // The log holds statements, role names and client addresses: not for other users
        // (issue 12 §4). Postgres's group may read it; so may root.
        set_mode(&self.log, 0o640)?;
        if self.privilege == Privilege::Root {
            let out = self
                .as_postgres_plain("test")
                .args(["-w"])
                .arg(&self.socket_dir)
                .output()
                .map_err(Error::io("running runuser"))?;
            if !out.status.success() {
                return Err(Error::Environment(format!(
                    "the postgres OS user cannot write to {}: make every parent directory \
                     searchable (chmod o+x) or choose another --dir",
                    self.socket_dir.display()
                )));
            }
        }
        Ok(())
    }

    /// A plain system program (not from the Postgres bin dir) as the postgres user.
    fn as_postgres_plain(&self, program: &str) -> Command {
        let mut cmd = match self.privilege {
            Privilege::Root => {
                let mut c = Command::new("runuser");
                c.args(["-u", OS_USER, "--", program]);
                c
            }
            Privilege::IsPostgres => Command::new(program),
        };
        cmd.current_dir("/");
        cmd
    }

    fn chown(&self, path: &Path) -> Result<()> {
        std::os::unix::fs::chown(path, Some(self.user.uid), Some(self.user.gid))
            .map_err(Error::io(format!("chown postgres {}", path.display())))
    }

    pub fn is_initialized(&self) -> bool {
        self.data_dir.join("PG_VERSION").is_file()
    }

    /// Runs initdb unless the data directory already holds a cluster. Returns whether it ran.
    pub fn init_if_needed(&self) -> Result<bool> {
        if self.is_initialized() {
            return Ok(false);
        }
        if self.data_dir.exists() {
            let empty = std::fs::read_dir(&self.data_dir)
                .map_err(Error::io(format!("reading {}", self.data_dir.display())))?
                .next()
                .is_none();
            if !empty {
                return Err(Error::Conflict(format!(
                    "{} exists, is not empty and holds no Postgres cluster (no PG_VERSION): \
                     move it away",
                    self.data_dir.display()
                )));
            }
        } else {
            std::fs::create_dir(&self.data_dir)
                .map_err(Error::io(format!("creating {}", self.data_dir.display())))?;
        }
        self.chown(&self.data_dir)?;
        set_mode(&self.data_dir, 0o700)?;
        let mut cmd = self.as_postgres("initdb");
        cmd.arg("-D").arg(&self.data_dir).args([
            "-U",
            OS_USER,
            "--auth-local=peer",
            "--auth-host=scram-sha-256",
            "-E",
            "UTF8",
            "--locale=C",
        ]);
        run(cmd, "initdb")?;
        Ok(true)
    }

    /// Writes pg_hba.conf, pg_ident.conf and our settings file, and makes postgresql.conf
    /// include the latter. Runs on every `up`, so a changed port takes effect on restart.
    pub fn configure(&self, max_connections: u32) -> Result<()> {
        self.configure_with(max_connections, "")
    }

    /// [`Postgres::configure`] with `extra` lines appended to our settings file; with any
    /// extra lines (a replicated cluster) pg_hba.conf also lets the postgres OS user stream
    /// over the Unix socket (standbys, pg_rewind, pg_basebackup: peer, never a password).
    pub fn configure_with(&self, max_connections: u32, extra: &str) -> Result<()> {
        let mut settings = format!(
            "# Written by `tidepool up` on every run; edit config/tidepool.toml or flags instead.\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = {socket}\n\
             max_connections = {max_connections}\n\
             password_encryption = 'scram-sha-256'\n\
             logging_collector = off\n",
            port = self.port,
            socket = conf_quote(&self.socket_dir.to_string_lossy()),
        );
        settings.push_str(extra);
        self.write_owned(&self.data_dir.join(CONF_FILE), &settings)?;
        let mut hba = PG_HBA.to_string();
        if !extra.is_empty() {
            hba.push_str(PG_HBA_REPLICATION);
        }
        self.write_owned(&self.data_dir.join("pg_hba.conf"), &hba)?;
        self.write_owned(&self.data_dir.join("pg_ident.conf"), PG_IDENT)?;

        let main = self.data_dir.join("postgresql.conf");
        let text = std::fs::read_to_string(&main)
            .map_err(Error::io(format!("reading {}", main.display())))?;
        if !text.lines().any(|l| {
            l.trim_start()
                .starts_with("include_if_exists = 'tidepool.conf'")
        }) {
            let mut f = std::fs::OpenOptions::new()
                .append(true)
                .open(&main)
                .map_err(Error::io(format!("writing {}", main.display())))?;
            writeln!(f, "\n{INCLUDE_LINE}")
                .map_err(Error::io(format!("writing {}", main.display())))?;
        }
        Ok(())
    }

    fn write_owned(&self, path: &Path, contents: &str) -> Result<()> {
        std::fs::write(path, contents).map_err(Error::io(format!("writing {}", path.display())))?;
        self.chown(path)?;
        set_mode(path, 0o600)
    }

    /// Makes this (empty or absent) data directory a copy of `primary` with `pg_basebackup`
    /// over the primary's Unix socket, then clears the copied `postgresql.auto.conf` (what
    /// the primary's agent set with ALTER SYSTEM is not this node's) and marks it a standby.
    pub fn basebackup_from(&self, primary: &Postgres) -> Result<()> {
        if !self.data_dir.exists() {
            std::fs::create_dir_all(&self.data_dir)
                .map_err(Error::io(format!("creating {}", self.data_dir.display())))?;
        }
        self.chown(&self.data_dir)?;
        set_mode(&self.data_dir, 0o700)?;
        let mut cmd = self.as_postgres("pg_basebackup");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-h")
            .arg(&primary.socket_dir)
            .args([
                "-p",
                &primary.port.to_string(),
                "-U",
                OS_USER,
                "-X",
                "stream",
                "-c",
                "fast",
            ]);
        run(cmd, "pg_basebackup")?;
        self.clear_copied_settings()
    }

    /// After a copy of another node (pg_basebackup, or a restore): an empty
    /// `postgresql.auto.conf` (what that node's agent set with ALTER SYSTEM is not this
    /// node's, and pgBackRest's restore_command there would shadow ours), and `standby.signal`.
    pub fn clear_copied_settings(&self) -> Result<()> {
        self.write_owned(
            &self.data_dir.join("postgresql.auto.conf"),
            "# Do not edit this file manually!\n# It will be overwritten by the ALTER SYSTEM command.\n",
        )?;
        self.write_owned(&self.data_dir.join("standby.signal"), "")
    }

    /// `primary_conninfo` for a standby of this Postgres named `application_name` (the
    /// node name, which `synchronous_standby_names` lists): over the Unix socket, peer auth.
    pub fn conninfo_for(&self, application_name: &str) -> String {
        format!(
            "host={} port={} user={OS_USER} application_name={application_name}",
            self.socket_dir.display(),
            self.port
        )
    }

    /// The postmaster's pid and port, if it is alive.
    pub fn running(&self) -> Option<(u32, u16)> {
        running_postmaster(&self.data_dir)
    }

    /// `pg_ctl start`, waiting until the server accepts connections.
    pub fn start(&self, timeout: Duration) -> Result<u32> {
        let mut cmd = self.as_postgres("pg_ctl");
        cmd.arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log)
            .args(["-w", "-t", &timeout.as_secs().max(1).to_string(), "start"]);
        if let Err(e) = run(cmd, "pg_ctl start") {
            let tail = crate::process::log_tail(&self.log, 30);
            return Err(Error::Conflict(format!(
                "{e}\n--- last lines of {} ---\n{tail}",
                self.log.display()
            )));
        }
        self.running().map(|(pid, _)| pid).ok_or_else(|| {
            Error::Conflict(format!(
                "pg_ctl reported a start but no live postmaster is in {}",
                self.data_dir.display()
            ))
        })
    }

    /// `pg_ctl stop -m fast`. Returns false if it was not running.
    pub fn stop(&self, timeout: Duration) -> Result<bool> {
        if self.running().is_none() {
            return Ok(false);
        }
        let mut cmd = self.as_postgres("pg_ctl");
        cmd.arg("-D").arg(&self.data_dir).args([
            "-m",
            "fast",
            "-w",
            "-t",
            &timeout.as_secs().max(1).to_string(),
            "stop",
        ]);
        run(cmd, "pg_ctl stop")?;
        Ok(true)
    }

    /// Runs SQL as role postgres over the Unix socket; the SQL goes through stdin so that
    /// nothing in it (a password) shows in the process list. Returns psql's stdout.
    pub fn psql(&self, sql: &str) -> Result<String> {
        let mut cmd = Command::new(self.bin_dir.join("psql"));
        cmd.arg("-h")
            .arg(&self.socket_dir)
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                OS_USER,
                "-d",
                "postgres",
            ])
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .current_dir("/")
            .env_remove("PGSERVICE")
            .env_remove("PGOPTIONS")
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().map_err(Error::io("starting psql"))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(sql.as_bytes())
                .map_err(Error::io("writing to psql"))?;
        }
        let out = child
            .wait_with_output()
            .map_err(Error::io("running psql"))?;
        check(out, "psql")
    }

    /// Makes sure role `tidepool` can log in with `password` and owns database `tidepool`.
    /// `password_is_new`: the password was just generated, so an existing role must take it.
    pub fn ensure_role_and_database(&self, password: &str, password_is_new: bool) -> Result<()> {
        let exists = self.psql(&format!(
            "SELECT 1 FROM pg_roles WHERE rolname = {};",
            sql_literal(ROLE)
        ))?;
        let verb = if exists.trim().is_empty() {
            Some("CREATE")
        } else if password_is_new {
            Some("ALTER")
        } else {
            None
        };
        if let Some(verb) = verb {
            // Postgres hashes the password into a SCRAM verifier; the plain text is not kept.
            self.psql(&format!(
                "SET password_encryption = 'scram-sha-256';\n\
                 {verb} ROLE {ROLE} LOGIN PASSWORD {};\n",
                sql_literal(password)
            ))?;
        }
        self.psql(&format!(
            "SELECT 'CREATE DATABASE {DATABASE} OWNER {ROLE}' \
             WHERE NOT EXISTS (SELECT 1 FROM pg_database WHERE datname = {}) \\gexec\n",
            sql_literal(DATABASE)
        ))?;
        Ok(())
    }
}

/// A system program (pgbackrest, ...) run as the postgres OS user: through `runuser` when we
/// are root, directly when we are that user; from `/`, which that user can always enter.
pub fn command_as_postgres(program: &str) -> Result<Command> {
    let user = OsUser::lookup(OS_USER)?;
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    let mut cmd = if euid == 0 {
        let mut c = Command::new("runuser");
        c.args(["-u", OS_USER, "--", program]);
        c
    } else if euid == user.uid {
        Command::new(program)
    } else {
        return Err(Error::Environment(format!(
            "{program} must run as the postgres OS user: run tidepool as root or as postgres"
        )));
    };
    cmd.current_dir("/");
    Ok(cmd)
}

/// `chown postgres:postgres` (root only; a no-op for the postgres user itself).
pub fn chown_to_postgres(path: &Path) -> Result<()> {
    let user = OsUser::lookup(OS_USER)?;
    std::os::unix::fs::chown(path, Some(user.uid), Some(user.gid))
        .map_err(Error::io(format!("chown postgres {}", path.display())))
}

pub fn set_mode(path: &Path, mode: u32) -> Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(Error::io(format!("chmod {mode:o} {}", path.display())))
}

/// Runs a command to completion, turning a failure into an error with its output.
pub fn run(mut cmd: Command, name: &str) -> Result<String> {
    tracing::debug!(command = ?cmd, "running");
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(Error::io(format!("starting {name}")))?;
    check(out, name)
}

fn check(out: Output, name: &str) -> Result<String> {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        return Ok(stdout);
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    Err(Error::Command {
        program: name.to_string(),
        status: out.status.to_string(),
        output: format!("{}{}", stdout, stderr).trim().to_string(),
    })
}

/// A postgresql.conf string value.
pub fn conf_quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// A SQL string literal (standard_conforming_strings is on in every supported Postgres).
fn sql_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The pid and port of the postmaster of `data_dir` from its `postmaster.pid`, if that
/// process is alive. Needs no privilege beyond reading the file (root, or postgres).
pub fn running_postmaster(data_dir: &Path) -> Option<(u32, u16)> {
    let text = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let (pid, port) = parse_postmaster_pid(&text)?;
    (crate::process::liveness(pid, "postgres") == crate::process::Liveness::Alive)
        .then_some((pid, port))
}

/// Line 1 of postmaster.pid is the pid, line 4 the port (Postgres `pidfile.h`).
fn parse_postmaster_pid(text: &str) -> Option<(u32, u16)> {
    let mut lines = text.lines();
    let pid = lines.next()?.trim().parse().ok()?;
    let port = lines.nth(2)?.trim().parse().ok()?;
    Some((pid, port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn postmaster_pid_gives_pid_and_port() {
        let text = "4242\n/x/pgdata\n1700000000\n5433\n/x/run\n127.0.0.1\n  5433001  1\nready   \n";
        assert_eq!(parse_postmaster_pid(text), Some((4242, 5433)));
        assert_eq!(parse_postmaster_pid("4242\n"), None);
        assert_eq!(parse_postmaster_pid(""), None);
    }

    #[test]
    fn quoting() {
        assert_eq!(conf_quote("/a/b"), "'/a/b'");
        assert_eq!(conf_quote("it's"), "'it''s'");
        assert_eq!(sql_literal("o'k"), "'o''k'");
    }

    #[test]
    fn hba_and_ident_match_the_contract() {
        let rules: Vec<Vec<&str>> = PG_HBA
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            rules,
            vec![
                vec!["local", "all", "postgres", "peer", "map=tidepool"],
                vec!["local", "all", "all", "scram-sha-256"],
                vec!["host", "all", "all", "127.0.0.1/32", "scram-sha-256"],
            ]
        );
        let maps: Vec<Vec<&str>> = PG_IDENT
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| l.split_whitespace().collect())
            .collect();
        assert_eq!(
            maps,
            vec![
                vec!["tidepool", "root", "postgres"],
                vec!["tidepool", "postgres", "postgres"]
            ]
        );
    }
}
