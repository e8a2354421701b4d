//! The Postgres command-line clients, run against an [`Endpoint`]: psql and pgbench.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::endpoint::Endpoint;
use crate::process::{run_merged, Live, Output};

/// Libpq variables from the environment of whoever runs the tests must not change what a test
/// connects to or how.
const LIBPQ_ENV: &[&str] = &[
    "PGHOST",
    "PGHOSTADDR",
    "PGPORT",
    "PGUSER",
    "PGDATABASE",
    "PGPASSWORD",
    "PGPASSFILE",
    "PGSERVICE",
    "PGSERVICEFILE",
    "PGOPTIONS",
    "PGAPPNAME",
    "PGSSLMODE",
    "PGTZ",
    "PGDATESTYLE",
    "PGCLIENTENCODING",
    "PGTARGETSESSIONATTRS",
    "PSQLRC",
    "PSQL_HISTORY",
    "PAGER",
    "PSQL_PAGER",
];

/// `argv` (program and leading arguments) with a clean libpq environment, then `-h host -p port`.
pub(crate) fn libpq_command(argv: &[&str], ep: &Endpoint, password: &str) -> Command {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..]);
    for var in LIBPQ_ENV {
        cmd.env_remove(var);
    }
    cmd.env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "10")
        // Messages and formats must not depend on the locale of whoever runs the tests.
        .env("LC_ALL", "C.UTF-8")
        .env("LANG", "C.UTF-8")
        .arg("-h")
        .arg(&ep.host)
        .arg("-p")
        .arg(ep.port.to_string());
    cmd
}

/// A psql invocation: `psql -X -q -v ON_ERROR_STOP=0 -h .. -p .. -U user -d db`, plus what the
/// builder adds. Output is stdout and stderr interleaved.
pub struct Psql {
    endpoint: Endpoint,
    user: String,
    password: String,
    db: String,
    quiet: bool,
    line_buffered: bool,
    extra: Vec<String>,
    stdin: Option<Vec<u8>>,
    timeout: Duration,
}

impl Psql {
    pub fn new(ep: &Endpoint, user: &str, password: &str, db: &str) -> Psql {
        Psql {
            endpoint: ep.clone(),
            user: user.to_string(),
            password: password.to_string(),
            db: db.to_string(),
            quiet: true,
            line_buffered: false,
            extra: Vec::new(),
            stdin: None,
            timeout: Duration::from_secs(60),
        }
    }

    /// Keeps command tags (`INSERT 0 1`, `ROLLBACK`) in the output: psql's `-q` drops them.
    pub fn with_command_tags(mut self) -> Psql {
        self.quiet = false;
        self
    }

    /// Runs psql under `stdbuf -oL`: stdout is then written line by line, so rows land in the
    /// output exactly where they fall relative to notices and errors (stderr), instead of
    /// wherever a full stdio buffer happens to be flushed.
    pub fn line_buffered(mut self) -> Psql {
        self.line_buffered = true;
        self
    }

    pub fn arg(mut self, arg: impl Into<String>) -> Psql {
        self.extra.push(arg.into());
        self
    }

    /// `-v name=value`.
    pub fn var(self, name: &str, value: &str) -> Psql {
        self.arg("-v").arg(format!("{name}={value}"))
    }

    /// `-c sql`: sent as one simple Query, however many statements it holds.
    pub fn command(self, sql: &str) -> Psql {
        self.arg("-c").arg(sql)
    }

    /// `-f path`.
    pub fn file(self, path: &Path) -> Psql {
        self.arg("-f").arg(path.to_string_lossy().into_owned())
    }

    /// A script fed on standard input (`-f -` is implied when no `-c`/`-f` is given).
    pub fn stdin(mut self, script: impl Into<Vec<u8>>) -> Psql {
        self.stdin = Some(script.into());
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Psql {
        self.timeout = timeout;
        self
    }

    /// Starts psql reading its script from a pipe the test writes as it goes (`Live::send`):
    /// the session stays open between writes.
    pub fn live(self) -> Live {
        Live::spawn(&mut self.command_line())
    }

    pub fn run(self) -> Output {
        let (mut cmd, stdin, timeout) = (self.command_line(), self.stdin, self.timeout);
        run_merged(&mut cmd, stdin, timeout)
    }

    fn command_line(&self) -> Command {
        let argv: &[&str] = if self.line_buffered {
            &["stdbuf", "-oL", "psql"]
        } else {
            &["psql"]
        };
        let mut cmd = libpq_command(argv, &self.endpoint, &self.password);
        cmd.args([
            "-X",
            "-v",
            "ON_ERROR_STOP=0",
            "-U",
            &self.user,
            "-d",
            &self.db,
        ]);
        if self.quiet {
            cmd.arg("-q");
        }
        cmd.args(&self.extra);
        cmd
    }
}

/// Runs pgbench with `args` against `db` as `user`; panics if it runs past `timeout`.
pub fn pgbench(
    ep: &Endpoint,
    user: &str,
    password: &str,
    db: &str,
    args: &[&str],
    timeout: Duration,
) -> Output {
    let mut cmd = libpq_command(&["pgbench"], ep, password);
    cmd.args(["-U", user]).args(args).arg(db);
    run_merged(&mut cmd, None, timeout)
}

/// The end-of-run summary pgbench prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PgbenchSummary {
    /// "number of transactions actually processed: N"
    pub processed: u64,
    /// "number of failed transactions: N (x%)"
    pub failed: u64,
}

impl PgbenchSummary {
    /// Reads the summary from pgbench's output; `None` when a line is missing (pgbench aborted
    /// before printing it).
    pub fn parse(text: &str) -> Option<PgbenchSummary> {
        let number_after = |prefix: &str| -> Option<u64> {
            let line = text.lines().find(|l| l.starts_with(prefix))?;
            let rest = line[prefix.len()..].trim_start();
            let digits: String = rest.chars().take_while(|c| c.is_ascii_digit()).collect();
            digits.parse().ok()
        };
        Some(PgbenchSummary {
            processed: number_after("number of transactions actually processed:")?,
            failed: number_after("number of failed transactions:")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pgbench_summary() {
        let text = "transaction type: <builtin: TPC-B (sort of)>\n\
                    number of clients: 200\n\
                    number of transactions actually processed: 12345\n\
                    number of failed transactions: 0 (0.000%)\n\
                    latency average = 161.2 ms\n";
        assert_eq!(
            PgbenchSummary::parse(text),
            Some(PgbenchSummary {
                processed: 12345,
                failed: 0
            })
        );
        assert_eq!(
            PgbenchSummary::parse("pgbench: error: connection failed"),
            None
        );
    }
}
