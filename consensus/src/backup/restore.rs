//! `tidepool restore --to TIME|LSN|NAME|latest --into NEWDIR`: the cluster's backups restored
//! into a new state directory, recovered to the target from the archived WAL and promoted
//! (on a timeline above every archived one: the restore_command lets the promotion see the
//! archived history files), then shut down cleanly. `tidepool up --dir NEWDIR` then runs it
//! as a cluster of its own. The restored Postgres never archives: its WAL would go into the
//! source cluster's stanza.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::backup::{Backups, PgBackRest, PgHost};
use crate::cli::{GlobalArgs, RestoreArgs};
use crate::cluster::status::inspect_nodes;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::postgres::{running_postmaster, Postgres};

/// Where recovery stops.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The end of the archived WAL.
    Latest,
    /// `YYYY-MM-DD HH:MM:SS[.frac][+TZ]`: the last commit at or before it.
    Time(String),
    /// `X/Y`
    Lsn(String),
    /// A restore point made with `pg_create_restore_point(NAME)`.
    Name(String),
}

impl Target {
    pub fn parse(s: &str) -> Result<Target> {
        let s = s.trim();
        if s.is_empty() {
            return Err(Error::Conflict(
                "--to: give a time, an LSN, a restore point name or latest".into(),
            ));
        }
        if s == "latest" {
            return Ok(Target::Latest);
        }
        if let Some((a, b)) = s.split_once('/') {
            let hex = |x: &str| !x.is_empty() && x.chars().all(|c| c.is_ascii_hexdigit());
            if hex(a) && hex(b) {
                return Ok(Target::Lsn(s.to_string()));
            }
        }
        let b = s.as_bytes();
        let is_date =
            b.len() >= 10 && b[..4].iter().all(u8::is_ascii_digit) && b[4] == b'-' && b[7] == b'-';
        if is_date {
            return Ok(Target::Time(s.to_string()));
        }
        Ok(Target::Name(s.to_string()))
    }

    /// pgBackRest restore options.
    pub fn options(&self) -> Vec<String> {
        let with = |kind: &str, target: &str| {
            vec![
                format!("--type={kind}"),
                format!("--target={target}"),
                "--target-action=promote".to_string(),
            ]
        };
        match self {
            Target::Latest => vec!["--type=default".to_string()],
            Target::Time(t) => with("time", t),
            Target::Lsn(l) => with("lsn", l),
            Target::Name(n) => with("name", n),
        }
    }
}

pub fn run(global: &GlobalArgs, args: &RestoreArgs) -> Result<bool> {
    let state = super::manage::load_state(global)?;
    let backups = Backups::of(&state)?;
    let target = Target::parse(&args.to)?;
    let into = Layout::new(&args.into)?;
    refuse_live(&into, &state)?;

    archive_current_wal(&state, &backups);

    for d in [into.dir().to_path_buf(), into.logs_dir()] {
        std::fs::create_dir_all(&d).map_err(Error::io(format!("creating {}", d.display())))?;
        crate::postgres::set_mode(&d, 0o755)?;
    }
    let own = into.dir().join("pgbackrest");
    let paths = super::Paths {
        repo: backups.paths.repo.clone(),
        log: own.join("log"),
        lock: own.join("lock"),
        spool: own.join("spool"),
    };
    for d in [&own, &paths.log, &paths.lock, &paths.spool] {
        std::fs::create_dir_all(d).map_err(Error::io(format!("creating {}", d.display())))?;
        crate::postgres::chown_to_postgres(d)?;
    }
    // `up` of NEWDIR archives into a repository of its own; this says which one it must not
    // use (the source's stanza).
    let from = super::Origin {
        repo: backups.paths.repo.clone(),
        stanza: backups.stanza.clone(),
    };
    from.write(&own)?;
    let conf = into.dir().join("pgbackrest.conf");
    let text = super::pgbackrest::render(
        &backups.settings,
        &paths,
        &backups.stanza,
        &[PgHost {
            data_dir: into.data_dir(),
            port: args.pg_port,
            socket_dir: into.socket_dir(),
        }],
        &[],
    );
    super::write_config(&conf, &text)?;
    let pb = PgBackRest::new(&conf, &backups.stanza);

    super::empty_data_dir(&into.data_dir())?;
    eprintln!(
        "restoring stanza {} into {} ({target:?})",
        backups.stanza,
        into.data_dir().display()
    );
    let mut opts = target.options();
    if let Some(set) = &args.set {
        opts.push(format!("--set={set}"));
    }
    let started = Instant::now();
    pb.run("restore", &opts)?;

    let pg = Postgres::new(
        &state.settings.pg_bin_dir,
        into.data_dir(),
        into.socket_dir(),
        args.pg_port,
        into.log("postgres"),
    )?;
    pg.prepare_dirs()?;
    keep_only_recovery_settings(&pg)?;
    // The source's replication settings: recovery refuses lower max_wal_senders & co.
    pg.configure_with(
        state.settings.pg_max_connections,
        &format!(
            "{}# restored by `tidepool restore`: never archives into the source's stanza\n\
             archive_mode = off\n",
            crate::cluster::nodes::replication_conf()
        ),
    )?;
    let timeout = Duration::from_secs(args.timeout_secs);
    eprintln!(
        "recovering on port {} (log {})",
        args.pg_port,
        pg.log.display()
    );
    pg.start(timeout)?;
    let timeline = wait_promoted(&pg, timeout);
    let stopped = pg.stop(Duration::from_secs(60));
    let timeline = timeline?;
    stopped?;
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "restored to {} on timeline {timeline} in {secs:.1}s; `tidepool up --dir {}` starts it \
         (with a pooler and a gateway, new ports if the source still runs)",
        args.to,
        into.dir().display()
    );
    println!("{}", into.dir().display());
    Ok(true)
}

/// WAL written up to now must be in the archive before a "latest" or a recent target can be
/// reached: `pgbackrest check` on the primary switches WAL and waits until the archive has
/// it (archiving goes in order, so everything before it is there too). Best effort: with no
/// primary (a failover under way, for a few seconds) the restore goes on with what the
/// archive holds, and says so.
fn archive_current_wal(state: &crate::state::State, backups: &Backups) {
    let deadline = Instant::now() + Duration::from_secs(20);
    // A single-node cluster's one Postgres is its primary while it runs.
    let single = super::nodes_of(state)
        .ok()
        .filter(|_| state.nodes.is_empty())
        .and_then(|mut n| n.pop())
        .filter(|n| running_postmaster(&n.data_dir).is_some());
    if state.nodes.is_empty() && single.is_none() {
        eprintln!(
            "Postgres of the cluster does not run: restoring what the archive holds (its WAL \
             up to the last archived segment)"
        );
        return;
    }
    loop {
        let primary = match &single {
            Some(n) => Some(n),
            None => {
                let nodes = inspect_nodes(state);
                nodes
                    .iter()
                    .filter(|n| n.role == "primary")
                    .max_by_key(|n| n.primary_term)
                    .and_then(|n| state.nodes.iter().find(|r| r.name == n.name))
            }
        };
        if let Some(p) = primary {
            match backups.node(p).run("check", &[]) {
                Ok(_) => {
                    eprintln!("the primary {} archived its current WAL", p.name);
                    return;
                }
                Err(e) if Instant::now() > deadline => {
                    eprintln!(
                        "warning: the primary {} did not archive its current WAL: {e}",
                        p.name
                    );
                    return;
                }
                Err(e) => tracing::info!(error = %e, "pgbackrest check failed; retrying"),
            }
        } else if Instant::now() > deadline {
            eprintln!(
                "warning: no primary answers: restoring what the archive holds, which may end \
                 before the last commits"
            );
            return;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A restore never lands on a running Postgres nor in a directory holding one.
fn refuse_live(into: &Layout, state: &crate::state::State) -> Result<()> {
    let data = into.data_dir();
    let nodes = super::nodes_of(state)?;
    let live_node = nodes
        .iter()
        .find(|n| same_path(&n.data_dir, &data) || same_path(&n.state_dir, into.dir()));
    if let Some(n) = live_node {
        return Err(Error::Conflict(format!(
            "refusing to restore over {} of the live cluster (node {}): restore into a new \
             directory (--into), then `tidepool up --dir` it",
            n.data_dir.display(),
            n.name
        )));
    }
    if let Some((pid, port)) = running_postmaster(&data) {
        return Err(Error::Conflict(format!(
            "refusing to restore over a live Postgres: {} runs (pid {pid}, port {port}); stop \
             it or choose another --into",
            data.display()
        )));
    }
    if data.join("PG_VERSION").exists() {
        return Err(Error::Conflict(format!(
            "{} already holds a Postgres cluster: choose a new --into directory",
            data.display()
        )));
    }
    Ok(())
}

fn same_path(a: &Path, b: &Path) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| PathBuf::from(p));
    canon(a) == canon(b)
}

/// postgresql.auto.conf came from the backup: what the agents set there with ALTER SYSTEM
/// (synchronous_standby_names would make every commit of the restored cluster wait for
/// standbys it does not have; primary_conninfo; the fence) goes, what pgBackRest added
/// (restore_command, recovery_target*) stays.
fn keep_only_recovery_settings(pg: &Postgres) -> Result<()> {
    let path = pg.data_dir.join("postgresql.auto.conf");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let new: String = old
        .lines()
        .filter(|l| {
            let k = l.trim_start();
            k.starts_with('#')
                || k.starts_with("restore_command")
                || k.starts_with("recovery_target")
        })
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&path, new).map_err(Error::io(format!("writing {}", path.display())))?;
    crate::postgres::chown_to_postgres(&path)
}

/// Waits until recovery has reached its target and the server has promoted; its timeline.
fn wait_promoted(pg: &Postgres, timeout: Duration) -> Result<u32> {
    let start = Instant::now();
    loop {
        if let Ok(out) = pg.psql(
            "SELECT pg_is_in_recovery()::text || ' ' || \
             substr(pg_walfile_name(pg_last_wal_replay_lsn()), 1, 8);",
        ) {
            let out = out.trim().to_string();
            if out.starts_with("false") {
                let tli = pg.psql("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8);")?;
                return u32::from_str_radix(tli.trim(), 16)
                    .map_err(|_| Error::Backup(format!("unexpected timeline {:?}", tli.trim())));
            }
        }
        if pg.running().is_none() {
            return Err(Error::Backup(format!(
                "Postgres stopped during recovery (target not reached?)\n--- last lines of {} ---\n{}",
                pg.log.display(),
                crate::process::log_tail(&pg.log, 20)
            )));
        }
        if start.elapsed() > timeout {
            return Err(Error::Backup(format!(
                "recovery did not finish within {}s; see {}",
                timeout.as_secs(),
                pg.log.display()
            )));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_are_told_apart() {
        assert_eq!(Target::parse("latest").unwrap(), Target::Latest);
        assert_eq!(
            Target::parse("0/3000100").unwrap(),
            Target::Lsn("0/3000100".into())
        );
        assert_eq!(
            Target::parse("2026-12-06 20:09:46.5+00").unwrap(),
            Target::Time("2026-12-06 20:09:46.5+00".into())
        );
        assert_eq!(
            Target::parse("before_migration").unwrap(),
            Target::Name("before_migration".into())
        );
        assert!(Target::parse("  ").is_err());
        assert_eq!(
            Target::parse("rp1").unwrap().options(),
            vec!["--type=name", "--target=rp1", "--target-action=promote"]
        );
        assert_eq!(Target::Latest.options(), vec!["--type=default"]);
    }
}
