//! pgBackRest as a program: the config files Tidepool writes for it, and running it as the
//! postgres OS user (it reads the data directories and the repository, both that user's).
//!
//! Every invocation names its config file and stanza explicitly (`--config`, `--stanza`), so
//! nothing depends on /etc/pgbackrest.conf or on the environment of whoever runs `tidepool`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::config::BackupSettings;
use crate::error::{Error, Result};
use crate::postgres::{command_as_postgres, OS_USER};

pub const PROGRAM: &str = "pgbackrest";

/// One Postgres a config names (`pgN-path`, `pgN-port`, `pgN-socket-path`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgHost {
    pub data_dir: PathBuf,
    pub port: u16,
    pub socket_dir: PathBuf,
}

/// Where pgBackRest keeps its repository, logs, locks and spool for one cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub repo: PathBuf,
    pub log: PathBuf,
    /// Shared by every config of the cluster: pgBackRest's own backup lock then holds
    /// across nodes on this machine.
    pub lock: PathBuf,
    pub spool: PathBuf,
}

/// The text of a config: `[global]` from the settings (the settings' `options` win over
/// what Tidepool derives), then `[stanza]` with each Postgres as pg1, pg2, ...
pub fn render(
    settings: &BackupSettings,
    paths: &Paths,
    stanza: &str,
    hosts: &[PgHost],
    extra_global: &[(&str, String)],
) -> String {
    let mut global: BTreeMap<String, String> = BTreeMap::new();
    let mut put = |k: &str, v: String| {
        global.insert(k.to_string(), v);
    };
    put("repo1-path", paths.repo.display().to_string());
    put("log-path", paths.log.display().to_string());
    put("lock-path", paths.lock.display().to_string());
    put("spool-path", paths.spool.display().to_string());
    put("compress-type", settings.compress_type.clone());
    put("process-max", settings.process_max.max(1).to_string());
    // An immediate checkpoint: a backup starts at once instead of at the next timed one.
    put("start-fast", "y".into());
    put(
        "repo1-retention-full",
        settings.retention_full.max(1).to_string(),
    );
    put(
        "repo1-retention-full-type",
        settings.retention_full_type.clone(),
    );
    if settings.retention_diff > 0 {
        put("repo1-retention-diff", settings.retention_diff.to_string());
    }
    put("log-level-file", "info".into());
    for (k, v) in extra_global {
        put(k, v.clone());
    }
    for (k, v) in &settings.options {
        put(k, v.clone());
    }
    let mut text =
        String::from("# Written by tidepool; rewritten on every `tidepool up`.\n[global]\n");
    for (k, v) in &global {
        text += &format!("{k}={v}\n");
    }
    text += &format!("\n[{stanza}]\n");
    for (i, h) in hosts.iter().enumerate() {
        let n = i + 1;
        text += &format!(
            "pg{n}-path={}\npg{n}-port={}\npg{n}-socket-path={}\npg{n}-user={OS_USER}\n",
            h.data_dir.display(),
            h.port,
            h.socket_dir.display()
        );
    }
    text
}

/// pgBackRest with one config file and stanza.
#[derive(Debug, Clone)]
pub struct PgBackRest {
    pub config: PathBuf,
    pub stanza: String,
}

impl PgBackRest {
    pub fn new(config: &Path, stanza: &str) -> PgBackRest {
        PgBackRest {
            config: config.to_path_buf(),
            stanza: stanza.to_string(),
        }
    }

    /// `pgbackrest --config=... --stanza=... COMMAND ARGS`, as the postgres OS user.
    pub fn command(&self, command: &str, args: &[String]) -> Result<Command> {
        let mut cmd = command_as_postgres(PROGRAM)?;
        cmd.arg(format!("--config={}", self.config.display()))
            .arg(format!("--stanza={}", self.stanza))
            .args(args)
            .arg(command);
        Ok(cmd)
    }

    /// Runs a command to completion; its stdout, or an error with its output.
    pub fn run(&self, command: &str, args: &[String]) -> Result<String> {
        let cmd = self.command(command, args)?;
        tracing::debug!(command, config = %self.config.display(), "pgbackrest");
        crate::postgres::run(cmd, &format!("pgbackrest {command}"))
    }

    /// Runs a command with `--log-level-console=detail`, calling `progress` with each percent
    /// pgBackRest reports ("backup file ... (16MB, 44.46%)"). Returns stdout's other lines.
    pub fn run_with_progress(
        &self,
        command: &str,
        args: &[String],
        mut progress: impl FnMut(f64, &str),
    ) -> Result<String> {
        let mut all = args.to_vec();
        all.push("--log-level-console=detail".into());
        let mut cmd = self.command(command, &all)?;
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(Error::io(format!("starting {PROGRAM} {command}")))?;
        let stderr = child.stderr.take();
        let err_reader = std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut e) = stderr {
                let _ = e.read_to_string(&mut text);
            }
            text
        });
        let mut kept = String::new();
        if let Some(out) = child.stdout.take() {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                match percent(&line) {
                    Some(p) => progress(p, &line),
                    None => {
                        kept += &line;
                        kept.push('\n');
                    }
                }
            }
        }
        let status = child
            .wait()
            .map_err(Error::io(format!("running {PROGRAM} {command}")))?;
        let err = err_reader.join().unwrap_or_default();
        if status.success() {
            return Ok(kept);
        }
        Err(Error::Command {
            program: format!("{PROGRAM} {command}"),
            status: status.to_string(),
            output: format!("{}{}", last_lines(&kept, 15), err)
                .trim()
                .to_string(),
        })
    }
}

/// The percentage of a `DETAIL: backup file /x (16MB, 44.46%) checksum ...` (or `restore
/// file`) line.
pub fn percent(line: &str) -> Option<f64> {
    if !(line.contains("backup file") || line.contains("restore file")) {
        return None;
    }
    let end = line.find("%)")?;
    let start = line[..end].rfind(", ")? + 2;
    line[start..end].trim().parse().ok()
}

fn last_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    let mut s = lines[lines.len().saturating_sub(n)..].join("\n");
    if !s.is_empty() {
        s.push('\n');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines_give_their_percent() {
        let l = "2026-12-06 20:09:38.123 P01 DETAIL: backup file /d/base/5/1255 (768KB, 3.42%) checksum adb7";
        assert_eq!(percent(l), Some(3.42));
        let r = "P01 DETAIL: restore file /d/base/1/2 (8KB, 100.00%) checksum x";
        assert_eq!(percent(r), Some(100.0));
        assert_eq!(percent("P00 INFO: backup start archive = 0001"), None);
    }

    #[test]
    fn config_lists_hosts_in_order_and_options_win() {
        let mut settings = BackupSettings::default();
        settings.options.insert("repo1-type".into(), "s3".into());
        settings
            .options
            .insert("compress-type".into(), "lz4".into());
        let paths = Paths {
            repo: "/r".into(),
            log: "/l".into(),
            lock: "/k".into(),
            spool: "/s".into(),
        };
        let hosts = [
            PgHost {
                data_dir: "/a".into(),
                port: 1,
                socket_dir: "/ra".into(),
            },
            PgHost {
                data_dir: "/b".into(),
                port: 2,
                socket_dir: "/rb".into(),
            },
        ];
        let text = render(
            &settings,
            &paths,
            "local",
            &hosts,
            &[("backup-standby", "y".into())],
        );
        assert!(text.contains("repo1-path=/r\n"), "{text}");
        assert!(text.contains("compress-type=lz4\n"), "{text}");
        assert!(!text.contains("compress-type=zst"), "{text}");
        assert!(text.contains("repo1-type=s3\n"), "{text}");
        assert!(text.contains("backup-standby=y\n"), "{text}");
        let stanza = text.split("[local]\n").nth(1).unwrap();
        assert!(stanza.starts_with("pg1-path=/a\npg1-port=1\n"), "{stanza}");
        assert!(stanza.contains("pg2-path=/b\npg2-port=2\npg2-socket-path=/rb\n"));
    }
}
