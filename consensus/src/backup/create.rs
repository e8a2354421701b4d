//! `tidepool backup create [--type full|diff|incr] [--json]`: one backup, copied from a
//! healthy standby when there is one (pgBackRest `backup-standby=y`: only the start and stop
//! calls and the WAL switch run on the primary), from the primary otherwise, and said so.
//!
//! One backup at a time: see `lock.rs`.

use std::time::Instant;

use serde::Serialize;

use crate::backup::lock::{BackupLock, ClusterLock};
use crate::backup::{info, Backups};
use crate::cli::{BackupCreateArgs, GlobalArgs};
use crate::cluster::status::{inspect_nodes, NodeStatus};
use crate::error::{Error, Result};
use crate::state::{NodeRecord, State};

/// What `--json` prints (and the schedule logs).
#[derive(Debug, Clone, Serialize)]
pub struct Created {
    pub label: String,
    #[serde(rename = "type")]
    pub kind: String,
    /// The node the files were copied from.
    pub source: String,
    /// `standby`, or `primary` when no standby was healthy.
    pub source_role: String,
    pub seconds: f64,
    pub backup: Option<info::BackupInfo>,
}

/// The primary, and the standby to copy from: streaming, healthy, least behind.
pub fn choose<'a>(
    state: &'a State,
    nodes: &[NodeStatus],
) -> Result<(&'a NodeRecord, Option<&'a NodeRecord>)> {
    let record = |name: &str| state.nodes.iter().find(|n| n.name == name);
    let primary = nodes
        .iter()
        .filter(|n| n.role == "primary")
        .max_by_key(|n| n.primary_term)
        .and_then(|n| record(&n.name))
        .ok_or_else(|| {
            Error::Conflict(
                "no node reports itself primary: a backup needs the primary (it starts and \
                 stops the backup and switches the WAL); see `tidepool status`"
                    .into(),
            )
        })?;
    let standby = nodes
        .iter()
        .filter(|n| n.role == "standby" && n.streaming == Some(true) && n.health == "ok")
        .min_by_key(|n| n.lag_bytes.unwrap_or(u64::MAX))
        .and_then(|n| record(&n.name));
    Ok((primary, standby))
}

/// The one Postgres of a single-node cluster, which must run (a backup starts and stops on
/// it).
fn single_node(state: &State) -> Result<NodeRecord> {
    let node = super::nodes_of(state)?.remove(0);
    if crate::postgres::running_postmaster(&node.data_dir).is_none() {
        return Err(Error::Conflict(format!(
            "Postgres of the cluster in {} does not run ({}): a backup needs it; `tidepool up` \
             first",
            state.dir.display(),
            node.data_dir.display()
        )));
    }
    Ok(node)
}

pub fn run(global: &GlobalArgs, args: &BackupCreateArgs) -> Result<bool> {
    let state = super::manage::load_state(global)?;
    let created = create(&state, &args.kind, !args.json)?;
    if args.json {
        println!("{}", to_json(&created)?);
    } else {
        let size = created
            .backup
            .as_ref()
            .map(|b| format!(", {} of database", info::human(b.database_size)))
            .unwrap_or_default();
        eprintln!(
            "backup {} ({}) taken from {} ({}) in {:.1}s{size}",
            created.label, created.kind, created.source, created.source_role, created.seconds
        );
    }
    Ok(true)
}

/// Takes one backup of `kind` (full, diff, incr); `bar`: show a progress bar on stderr.
pub fn create(state: &State, kind: &str, bar: bool) -> Result<Created> {
    if !["full", "diff", "incr"].contains(&kind) {
        return Err(Error::Conflict(format!(
            "backup type {kind:?}: use full, diff or incr"
        )));
    }
    let backups = Backups::of(state)?;
    backups.prepare()?;
    let _lock = BackupLock::acquire(&backups.dir.join("backup.lock"))?;
    let _cluster_lock = ClusterLock::acquire(state)?;
    let single;
    let (primary, standby) = if state.nodes.is_empty() {
        single = single_node(state)?;
        (&single, None)
    } else {
        choose(state, &inspect_nodes(state))?
    };
    let (source, source_role) = match standby {
        Some(s) => (s.name.clone(), "standby"),
        None if state.nodes.is_empty() => {
            eprintln!(
                "single-node cluster: taking the backup from the primary {} (there is no \
                 standby to copy from)",
                primary.name
            );
            (primary.name.clone(), "primary")
        }
        None => {
            eprintln!(
                "no healthy standby: taking the backup from the primary {}",
                primary.name
            );
            (primary.name.clone(), "primary")
        }
    };
    tracing::info!(kind, primary = %primary.name, source = %source, "backup starting");
    let pb = backups.write_backup_config(primary, standby)?;
    let progress = if bar {
        let p = indicatif::ProgressBar::new(10_000);
        p.set_style(
            indicatif::ProgressStyle::with_template(
                "{spinner} {msg} [{bar:40}] {percent:>3}% {elapsed}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        p.set_message(format!("{kind} backup from {source}"));
        p
    } else {
        indicatif::ProgressBar::hidden()
    };
    let started = Instant::now();
    let result = pb.run_with_progress("backup", &[format!("--type={kind}")], |pct, _| {
        progress.set_position((pct * 100.0) as u64);
    });
    progress.finish_and_clear();
    if let Err(e) = result {
        tracing::error!(kind, source = %source, error = %e, "backup failed");
        return Err(e);
    }
    let seconds = started.elapsed().as_secs_f64();
    let latest = info::backups(&pb)?.into_iter().last();
    let created = Created {
        label: latest.as_ref().map(|b| b.label.clone()).unwrap_or_default(),
        kind: kind.to_string(),
        source,
        source_role: source_role.to_string(),
        seconds,
        backup: latest,
    };
    tracing::info!(label = %created.label, kind, seconds, "backup done");
    Ok(created)
}

pub fn to_json<T: Serialize>(v: &T) -> Result<String> {
    serde_json::to_string_pretty(v).map_err(|e| Error::Backup(format!("encoding JSON: {e}")))
}
