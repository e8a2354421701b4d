//! Backups with pgBackRest: one stanza per cluster (named after the cluster), one config per
//! node, WAL archived from whichever node is primary, backups taken from a standby, standbys
//! built by restoring the latest backup, point-in-time restore into a new directory.
//! docs/backups.md is the user's view; docs/decisions/2026-12-06-backups.md the why.
//!
//! ```text
//! NODE_STATE_DIR/pgbackrest.conf   the node's config: pg1 = its own Postgres (archive-push,
//!                                  archive-get, restore)   (node1: DIR/pgbackrest.conf)
//! DIR/pgbackrest/backup.conf       the backup host's: pg1 = primary, pg2 = the chosen standby
//! DIR/pgbackrest/{log,lock,spool}/ pgBackRest's own files, owned by the postgres OS user
//! DIR/pgbackrest/backup.lock       held by `tidepool backup create` (one backup at a time; with
//!                                  etcd also a lock key there, lock.rs)
//! DIR/backups/                     the repository, unless [backup] repo_path says otherwise
//! ```

pub mod create;
pub mod info;
pub mod lock;
pub mod manage;
pub mod pgbackrest;
pub mod restore;
pub mod schedule;

use std::path::{Path, PathBuf};

use crate::config::{BackupSettings, ClusterSettings};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::postgres::{chown_to_postgres, conf_quote, set_mode};
use crate::state::{NodeRecord, State};

pub use pgbackrest::{Paths, PgBackRest, PgHost};

/// The pgBackRest side of one cluster.
#[derive(Debug, Clone)]
pub struct Backups {
    pub settings: BackupSettings,
    pub stanza: String,
    pub paths: Paths,
    /// DIR/pgbackrest
    pub dir: PathBuf,
}

impl Backups {
    pub fn new(settings: &ClusterSettings, layout: &Layout) -> Backups {
        let dir = layout.dir().join("pgbackrest");
        let repo = if settings.backup.repo_path.as_os_str().is_empty() {
            layout.dir().join("backups")
        } else {
            std::path::absolute(&settings.backup.repo_path)
                .unwrap_or_else(|_| settings.backup.repo_path.clone())
        };
        Backups {
            settings: settings.backup.clone(),
            stanza: settings.cluster_name.clone(),
            paths: Paths {
                repo,
                log: dir.join("log"),
                lock: dir.join("lock"),
                spool: dir.join("spool"),
            },
            dir,
        }
    }

    /// For a command on an existing cluster; an error when the cluster has no backups.
    pub fn of(state: &State) -> Result<Backups> {
        if !state.settings.backup.enabled {
            return Err(Error::Conflict(format!(
                "the cluster in {} has no pgBackRest backups: it was brought up with [backup] \
                 enabled = false (set it to true, then `tidepool down && tidepool up`)",
                state.dir.display()
            )));
        }
        let layout = Layout::new(&state.dir)?;
        Ok(Backups::new(&state.settings, &layout))
    }

    /// For `up`: `None` with `[backup] enabled = false`; else the directories made and every
    /// node's config written before any Postgres starts (their archive_command names it).
    /// A single-node cluster passes its one node ([`nodes_of`]).
    pub fn prepare_for_up(
        settings: &ClusterSettings,
        layout: &Layout,
        nodes: &[NodeRecord],
    ) -> Result<Option<Backups>> {
        if !settings.backup.enabled {
            return Ok(None);
        }
        if !available() {
            return Err(Error::Environment(
                "pgbackrest not found: install it (scripts/setup.sh), or set [backup] enabled = \
                 false to archive nothing and take no backups (standbys are then copied with \
                 pg_basebackup)"
                    .into(),
            ));
        }
        let b = Backups::new(settings, layout);
        if let Some(from) = Origin::read(&b.dir) {
            if from.repo == b.paths.repo && from.stanza == b.stanza {
                return Err(Error::Conflict(format!(
                    "this cluster was restored from stanza {} in {}: it must not archive into \
                     its source's stanza. Give it its own repository ([backup] repo_path) or \
                     cluster_name, or set [backup] enabled = false",
                    from.stanza,
                    from.repo.display()
                )));
            }
        }
        b.prepare()?;
        for node in nodes {
            b.write_node_config(node)?;
        }
        Ok(Some(b))
    }

    /// Creates the directories pgBackRest writes into, owned by the postgres OS user.
    pub fn prepare(&self) -> Result<()> {
        for d in [
            &self.dir,
            &self.paths.log,
            &self.paths.lock,
            &self.paths.spool,
            &self.paths.repo,
        ] {
            std::fs::create_dir_all(d).map_err(Error::io(format!("creating {}", d.display())))?;
            chown_to_postgres(d)?;
            set_mode(d, 0o750)?;
        }
        Ok(())
    }

    pub fn node_config_path(node: &NodeRecord) -> PathBuf {
        node.state_dir.join("pgbackrest.conf")
    }

    /// pgBackRest for `node`'s own Postgres.
    pub fn node(&self, node: &NodeRecord) -> PgBackRest {
        PgBackRest::new(&Self::node_config_path(node), &self.stanza)
    }

    /// Writes `node`'s config (pg1 = its own Postgres).
    pub fn write_node_config(&self, node: &NodeRecord) -> Result<PgBackRest> {
        let path = Self::node_config_path(node);
        let text = pgbackrest::render(
            &self.settings,
            &self.paths,
            &self.stanza,
            &[host(node)],
            &[],
        );
        write_config(&path, &text)?;
        Ok(self.node(node))
    }

    /// Writes the backup host's config: pg1 the primary, pg2 the standby to copy from (with
    /// `backup-standby=y`), or the primary alone.
    pub fn write_backup_config(
        &self,
        primary: &NodeRecord,
        standby: Option<&NodeRecord>,
    ) -> Result<PgBackRest> {
        let path = self.dir.join("backup.conf");
        let mut hosts = vec![host(primary)];
        let mut extra = Vec::new();
        if let Some(s) = standby {
            hosts.push(host(s));
            extra.push(("backup-standby", "y".to_string()));
        }
        let text = pgbackrest::render(&self.settings, &self.paths, &self.stanza, &hosts, &extra);
        write_config(&path, &text)?;
        Ok(PgBackRest::new(&path, &self.stanza))
    }

    /// The settings `node`'s Postgres needs (in its tidepool.conf): archiving (`on`: only the
    /// primary archives; pgBackRest refuses `always`, whose copies from several nodes may
    /// differ) and a `restore_command`, which also makes a promotion look at the archived
    /// timeline history files and pick a timeline no archived history has used. WAL a
    /// promoted standby received but the old primary had not archived is handed back to the
    /// archiver by the node's agent at promotion (pooler/src/agent/archive.rs).
    pub fn archive_conf(&self, node: &NodeRecord) -> String {
        let conf = Self::node_config_path(node);
        let program = program_path();
        let base = format!(
            "{} --config={} --stanza={}",
            shell_quote(&program.display().to_string()),
            shell_quote(&conf.display().to_string()),
            shell_quote(&self.stanza)
        );
        format!(
            "# WAL archiving (pgBackRest, [backup] in the control process's config)\n\
             archive_mode = on\n\
             archive_command = {}\n\
             restore_command = {}\n",
            conf_quote(&format!("{base} archive-push %p")),
            conf_quote(&format!("{base} archive-get %f \"%p\"")),
        )
    }

    /// At bootstrap (the primary runs, archiving on): creates the stanza unless it exists and
    /// takes a full backup from the primary unless the repository holds one.
    pub fn bootstrap(&self, primary: &NodeRecord, pg: &crate::postgres::Postgres) -> Result<()> {
        let pb = self.write_node_config(primary)?;
        // A later `up` (node1 back after a failover, maybe no longer primary) finds the
        // backups and leaves the stanza alone: stanza-create needs the primary.
        if !info::backups(&pb)?.is_empty() {
            return Ok(());
        }
        // A cluster made before backups existed runs without archiving until Postgres
        // restarts (archive_mode is read at start): say so rather than fail the backup.
        if pg.psql("SHOW archive_mode;")?.trim() == "off" {
            eprintln!(
                "warning: Postgres of {} runs without WAL archiving (started before backups \
                 were configured): no stanza and no backup until `tidepool down && tidepool up`",
                primary.name
            );
            return Ok(());
        }
        pb.run("stanza-create", &[])?;
        eprintln!(
            "taking the first full backup (from the primary: there is no standby yet) into {}",
            self.paths.repo.display()
        );
        pb.run("backup", &["--type=full".to_string()])?;
        Ok(())
    }

    /// Makes `node`'s (absent or half-made) data directory a standby restored from the latest
    /// backup (`restore --type=standby`). The caller writes its settings and starts it.
    pub fn restore_standby(&self, node: &NodeRecord) -> Result<()> {
        let pb = self.write_node_config(node)?;
        empty_data_dir(&node.data_dir)?;
        eprintln!(
            "restoring the latest backup into {} (pgbackrest restore --type=standby)",
            node.data_dir.display()
        );
        pb.run("restore", &["--type=standby".to_string()])?;
        Ok(())
    }
}

/// Where a restored cluster's backups came from (DIR/pgbackrest/restored-from, written by
/// `tidepool restore`): its own `up` must archive elsewhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub repo: PathBuf,
    pub stanza: String,
}

impl Origin {
    const FILE: &'static str = "restored-from";

    /// Two lines: the repository, the stanza.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let path = dir.join(Self::FILE);
        let text = format!("{}\n{}\n", self.repo.display(), self.stanza);
        std::fs::write(&path, text).map_err(Error::io(format!("writing {}", path.display())))
    }

    pub fn read(dir: &Path) -> Option<Origin> {
        let text = std::fs::read_to_string(dir.join(Self::FILE)).ok()?;
        let mut lines = text.lines();
        Some(Origin {
            repo: PathBuf::from(lines.next()?),
            stanza: lines.next()?.to_string(),
        })
    }
}

/// The nodes whose Postgres pgBackRest works with: a cluster with standbys records them; a
/// single-node cluster (`up` without `--standbys`) records none, and its one Postgres is
/// node1's place (DIR/pgdata, DIR/run, `pg_port`, config DIR/pgbackrest.conf).
pub fn nodes_of(state: &State) -> Result<Vec<NodeRecord>> {
    if !state.nodes.is_empty() {
        return Ok(state.nodes.clone());
    }
    let layout = Layout::new(&state.dir)?;
    Ok(vec![crate::cluster::nodes::record(
        &state.settings,
        &layout,
        1,
    )])
}

/// A word for /bin/sh (Postgres runs archive_command and restore_command through it): plain
/// when it has nothing the shell would read, single-quoted otherwise.
fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "/._-+=:,@".contains(c))
    {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// A fresh data directory for a restore: created (or emptied when a previous attempt left
/// files), owned by postgres, mode 700.
pub fn empty_data_dir(dir: &Path) -> Result<()> {
    if dir.exists() {
        std::fs::remove_dir_all(dir)
            .map_err(Error::io(format!("removing a half-made {}", dir.display())))?;
    }
    std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    chown_to_postgres(dir)?;
    set_mode(dir, 0o700)
}

fn host(node: &NodeRecord) -> PgHost {
    PgHost {
        data_dir: node.data_dir.clone(),
        port: node.pg_port,
        socket_dir: node.socket_dir.clone(),
    }
}

/// Config files may name S3 credentials: postgres alone reads them.
pub fn write_config(path: &Path, text: &str) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    }
    std::fs::write(path, text).map_err(Error::io(format!("writing {}", path.display())))?;
    chown_to_postgres(path)?;
    set_mode(path, 0o600)
}

/// pgbackrest's absolute path (Postgres runs archive_command with its own PATH), or the bare
/// name when it is not on ours.
pub fn program_path() -> PathBuf {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin")])
        .map(|d| d.join(pgbackrest::PROGRAM))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(pgbackrest::PROGRAM))
}

/// Whether pgbackrest can be run at all (checked before `up` relies on it).
pub fn available() -> bool {
    program_path().is_file()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_words() {
        assert_eq!(shell_quote("/a/b.conf"), "/a/b.conf");
        assert_eq!(shell_quote("/a b/c"), "'/a b/c'");
        assert_eq!(shell_quote("it's"), "'it'\\''s'");
        assert_eq!(shell_quote(""), "''");
    }
}
