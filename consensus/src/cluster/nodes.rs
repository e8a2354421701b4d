//! The nodes of a cluster with standbys: where each lives, how its Postgres is configured for
//! streaming replication, and bringing up the standbys (restored from the latest pgBackRest
//! backup, or pg_basebackup when backups are off; Postgres, pooler).
//!
//! ```text
//! node1: DIR/pgdata, DIR/run       Postgres pg_port,     pooler pooler_port,     agent pooler_port+1
//! nodeK: DIR/nodeK/pgdata, .../run Postgres pg_port+K-1, pooler pooler_port+2(K-1), agent +1
//! ```
//! Names never imply roles: after a failover node2 may be the primary.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::backup::Backups;
use crate::config::ClusterSettings;
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::policy::{Node, Policy};
use crate::postgres::{conf_quote, Postgres};
use crate::state::NodeRecord;

/// `node1`, `node2`, ...
pub fn node_name(k: u32) -> String {
    format!("node{k}")
}

pub fn zone_of(settings: &ClusterSettings, k: u32) -> String {
    settings
        .zones
        .get(k as usize - 1)
        .filter(|z| !z.is_empty())
        .cloned()
        .unwrap_or_else(|| "local".to_string())
}

/// Where node `k` (1-based) lives and listens.
pub fn record(settings: &ClusterSettings, layout: &Layout, k: u32) -> NodeRecord {
    let name = node_name(k);
    let (data_dir, socket_dir, state_dir) = if k == 1 {
        (
            layout.data_dir(),
            layout.socket_dir(),
            layout.dir().to_path_buf(),
        )
    } else {
        let d = layout.dir().join(&name);
        (d.join("pgdata"), d.join("run"), d)
    };
    let pooler_port = settings.pooler_port + 2 * (k as u16 - 1);
    let (postgres_log, pooler_log) = if k == 1 {
        (layout.log("postgres"), layout.log("pooler"))
    } else {
        (
            layout.log(&format!("postgres-{name}")),
            layout.log(&format!("pooler-{name}")),
        )
    };
    NodeRecord {
        zone: zone_of(settings, k),
        name,
        data_dir,
        socket_dir,
        pg_port: settings.pg_port + (k as u16 - 1),
        postgres_log,
        pooler: loopback(pooler_port),
        agent: loopback(pooler_port + 1),
        pooler_pid: 0,
        pooler_log,
        state_dir,
    }
}

/// Every node of a new cluster, node1 first.
pub fn records(settings: &ClusterSettings, layout: &Layout) -> Vec<NodeRecord> {
    (1..=settings.standbys + 1)
        .map(|k| record(settings, layout, k))
        .collect()
}

/// `k` of `nodeK`.
pub fn number(name: &str) -> Option<u32> {
    name.strip_prefix("node")?.parse().ok().filter(|&k| k > 0)
}

/// The lowest node number `known` does not use (a removed node's number is free again: its
/// directory was moved aside).
pub fn free_number(known: &[NodeRecord]) -> u32 {
    let used: Vec<u32> = known.iter().filter_map(|n| number(&n.name)).collect();
    (1..).find(|k| !used.contains(k)).unwrap_or(1)
}

/// The nodes `up` brings up: the ones `known` (the state) records, by number (after `node
/// remove` the numbers have a gap), then free numbers up to `standbys + 1` nodes.
pub fn records_for_up(
    settings: &ClusterSettings,
    layout: &Layout,
    known: &[NodeRecord],
) -> Vec<NodeRecord> {
    let want = settings.standbys as usize + 1;
    let mut ks: Vec<u32> = known.iter().filter_map(|n| number(&n.name)).collect();
    ks.sort_unstable();
    ks.dedup();
    ks.truncate(want);
    while ks.len() < want {
        let taken: Vec<NodeRecord> = ks.iter().map(|&k| record(settings, layout, k)).collect();
        ks.push(free_number(&taken));
    }
    ks.sort_unstable();
    ks.into_iter()
        .map(|k| record(settings, layout, k))
        .collect()
}

/// The cluster's durability policy.
pub fn policy(settings: &ClusterSettings) -> Result<Policy> {
    settings
        .durability
        .parse()
        .map_err(|e| Error::Conflict(format!("durability {:?}: {e}", settings.durability)))
}

pub fn policy_nodes(nodes: &[NodeRecord]) -> Vec<Node> {
    nodes.iter().map(|n| Node::new(&n.name, &n.zone)).collect()
}

/// `synchronous_standby_names` for `primary` under the cluster's policy, over every other
/// node of the cluster.
pub fn sync_names(
    settings: &ClusterSettings,
    nodes: &[NodeRecord],
    primary: &str,
) -> Result<String> {
    let all = policy_nodes(nodes);
    let Some(p) = all.iter().find(|n| n.name == primary) else {
        return Err(Error::Conflict(format!("no node {primary}")));
    };
    let standbys: Vec<Node> = all.iter().filter(|n| n.name != primary).cloned().collect();
    policy(settings)?
        .sync_standby_names(p, &standbys)
        .map_err(|e| Error::Conflict(format!("durability {:?}: {e}", settings.durability)))
}

/// Settings every node of a replicated cluster shares. The receiver timeout is short so a
/// standby notices a frozen or cut-off primary within seconds (a healthy idle primary is
/// pinged at half of it), which failure detection relies on. `synchronous_standby_names` is
/// not here: the control process sets it on the primary (ALTER SYSTEM, through the agent)
/// once the standbys stream — set before they exist, the bootstrap's own commits would wait
/// forever.
pub fn replication_conf() -> String {
    "# replication (tidepool up --standbys)\n\
     wal_level = replica\n\
     wal_log_hints = on\n\
     max_wal_senders = 16\n\
     wal_keep_size = '512MB'\n\
     hot_standby = on\n\
     synchronous_commit = on\n\
     wal_receiver_timeout = '4s'\n\
     wal_receiver_status_interval = '1s'\n\
     wal_sender_timeout = '4s'\n\
     recovery_target_timeline = 'latest'\n"
        .to_string()
}

/// The Postgres of a node.
pub fn postgres(settings: &ClusterSettings, node: &NodeRecord) -> Result<Postgres> {
    Postgres::new(
        &settings.pg_bin_dir,
        node.data_dir.clone(),
        node.socket_dir.clone(),
        node.pg_port,
        node.postgres_log.clone(),
    )
}

/// Flags making a pooler the agent of `node`; `secret_file` holds the agent secret (a path:
/// the secret itself never goes on a command line, where `ps` shows it).
pub fn agent_args(
    settings: &ClusterSettings,
    node: &NodeRecord,
    secret_file: &std::path::Path,
) -> Vec<OsString> {
    let flags: [(&str, OsString); 8] = [
        ("--agent-secret-file", secret_file.into()),
        ("--node-name", node.name.clone().into()),
        ("--zone", node.zone.clone().into()),
        ("--agent-listen", node.agent.to_string().into()),
        ("--pg-data", node.data_dir.clone().into()),
        ("--pg-bin-dir", settings.pg_bin_dir.clone().into()),
        ("--state-dir", node.agent_dir().into()),
        ("--pg-log", node.postgres_log.clone().into()),
    ];
    let mut args = Vec::new();
    for (flag, value) in flags {
        args.push(OsString::from(flag));
        args.push(value);
    }
    args
}

/// Creates the standby `node` if its data directory holds no cluster yet — restored from the
/// latest backup when the cluster has backups, copied from `primary` with pg_basebackup
/// otherwise — writes its settings, and starts it unless it runs. Returns the postmaster's pid.
pub fn ensure_standby(
    settings: &ClusterSettings,
    node: &NodeRecord,
    primary: &Postgres,
    replication: &str,
    backups: Option<&Backups>,
    timeout: Duration,
) -> Result<u32> {
    let pg = postgres(settings, node)?;
    let dir = node.state_dir.clone();
    std::fs::create_dir_all(&dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    pg.prepare_dirs()?;
    let fresh = !pg.is_initialized();
    if fresh {
        match backups {
            Some(b) => {
                b.restore_standby(node)?;
                pg.clear_copied_settings()?;
            }
            None => {
                if node.data_dir.exists() {
                    std::fs::remove_dir_all(&node.data_dir).map_err(Error::io(format!(
                        "removing a half-made {}",
                        node.data_dir.display()
                    )))?;
                }
                eprintln!(
                    "copying the primary into {} (pg_basebackup)",
                    node.data_dir.display()
                );
                pg.basebackup_from(primary)?;
            }
        }
    }
    let mut extra = replication.to_string();
    if let Some(b) = backups {
        extra += &b.archive_conf(node);
    }
    if fresh {
        // Later runs leave where the node streams from to its agent (ALTER SYSTEM).
        extra += &format!(
            "primary_conninfo = {}\n",
            conf_quote(&primary.conninfo_for(&node.name))
        );
    }
    pg.configure_with(settings.pg_max_connections, &extra)?;
    match pg.running() {
        Some((pid, _)) => Ok(pid),
        None => {
            eprintln!("starting postgres of {} on {}", node.name, pg.address());
            pg.start(timeout)
        }
    }
}

/// The pledge file of a node agent (the pooler's `agent::term::FILE_NAME`).
pub const PLEDGE_FILE: &str = "tidepool-node.json";

/// Makes `dir`, a node agent's state directory ([`NodeRecord::agent_dir`]), ready for a pooler
/// about to start as `account` (the caller when `None`): created mode 700, it and what is in
/// it owned by that account. A pledge that a pooler of an earlier version kept in the node
/// directory above it is moved in first: a node that forgot a term it pledged to could pledge
/// twice to one term. Called only while no pooler of the node runs (one that does would keep
/// writing the old file).
pub fn prepare_agent_dir(dir: &Path, account: Option<&crate::privilege::Account>) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
        .map_err(Error::io(format!("chmod {}", dir.display())))?;
    let pledge = dir.join(PLEDGE_FILE);
    if let Some(parent) = dir.parent() {
        let old = parent.join(PLEDGE_FILE);
        if old.exists() {
            if pledge.exists() {
                return Err(Error::Conflict(format!(
                    "two pledge files, {} and {}: an older pooler ran after this one; keep the \
                     one with the higher term in {} and remove the other",
                    old.display(),
                    pledge.display(),
                    dir.display()
                )));
            }
            std::fs::rename(&old, &pledge).map_err(Error::io(format!(
                "moving {} into {}",
                old.display(),
                dir.display()
            )))?;
            for d in [dir, parent] {
                std::fs::File::open(d)
                    .and_then(|f| f.sync_all())
                    .map_err(Error::io(format!("syncing {}", d.display())))?;
            }
            eprintln!(
                "moved the pledge of {} into {}",
                parent.display(),
                dir.display()
            );
        }
    }
    if let Some(a) = account {
        let chown = |p: &Path| {
            std::os::unix::fs::chown(p, Some(a.uid), Some(a.gid)).map_err(Error::io(format!(
                "chown {} {}",
                a.name,
                p.display()
            )))
        };
        chown(dir)?;
        let entries =
            std::fs::read_dir(dir).map_err(Error::io(format!("reading {}", dir.display())))?;
        for e in entries {
            let e = e.map_err(Error::io(format!("reading {}", dir.display())))?;
            chown(&e.path())?;
        }
    }
    Ok(())
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Where each node's pooler listens, for the gateway's `--pooler`.
pub fn pooler_list(nodes: &[NodeRecord]) -> String {
    nodes
        .iter()
        .map(|n| n.pooler.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

pub fn node_dirs(nodes: &[NodeRecord]) -> Vec<PathBuf> {
    nodes.iter().map(|n| n.data_dir.clone()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nodes_get_distinct_ports_and_dirs() {
        let settings = ClusterSettings {
            standbys: 2,
            zones: vec!["a".into(), "".into()],
            ..ClusterSettings::default()
        };
        let layout = Layout::new(std::path::Path::new("/tp")).unwrap();
        let n = records(&settings, &layout);
        assert_eq!(n.len(), 3);
        assert_eq!(n[0].data_dir, PathBuf::from("/tp/pgdata"));
        assert_eq!(n[2].data_dir, PathBuf::from("/tp/node3/pgdata"));
        assert_eq!(n[0].zone, "a");
        assert_eq!(n[1].zone, "local");
        let mut ports: Vec<u16> = n
            .iter()
            .flat_map(|n| [n.pg_port, n.pooler.port(), n.agent.port()])
            .collect();
        ports.push(settings.port);
        let count = ports.len();
        ports.sort();
        ports.dedup();
        assert_eq!(ports.len(), count, "{ports:?}");
        assert_eq!(
            pooler_list(&n),
            "127.0.0.1:15433,127.0.0.1:15435,127.0.0.1:15437"
        );
    }

    #[test]
    fn an_older_pledge_moves_into_the_agent_directory_once() {
        let node = std::env::temp_dir().join(format!("tp-agent-dir-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&node);
        std::fs::create_dir_all(&node).unwrap();
        let old = node.join(PLEDGE_FILE);
        std::fs::write(&old, r#"{"term":7,"primary_term":5,"recruited":false}"#).unwrap();
        let agent = node.join("agent");
        prepare_agent_dir(&agent, None).unwrap();
        assert!(!old.exists());
        assert!(std::fs::read_to_string(agent.join(PLEDGE_FILE))
            .unwrap()
            .contains(r#""term":7"#));
        let mode = std::fs::metadata(&agent).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o700);
        // Again: nothing to move, nothing changes.
        prepare_agent_dir(&agent, None).unwrap();
        assert!(agent.join(PLEDGE_FILE).exists());
        // An older pooler wrote the old file again: which term is right is not guessed.
        std::fs::write(&old, r#"{"term":8,"primary_term":0,"recruited":true}"#).unwrap();
        let e = prepare_agent_dir(&agent, None).unwrap_err().to_string();
        assert!(e.contains("two pledge files"), "{e}");
        let _ = std::fs::remove_dir_all(&node);
    }

    #[test]
    fn up_keeps_the_numbers_of_the_nodes_left_after_a_removal() {
        let settings = ClusterSettings {
            standbys: 1,
            ..ClusterSettings::default()
        };
        let layout = Layout::new(std::path::Path::new("/tp")).unwrap();
        let three = records(
            &ClusterSettings {
                standbys: 2,
                ..settings.clone()
            },
            &layout,
        );
        // node2 removed: node1 and node3 stay, with node3's ports and directory.
        let left = vec![three[0].clone(), three[2].clone()];
        let up = records_for_up(&settings, &layout, &left);
        assert_eq!(up, left);
        assert_eq!(free_number(&left), 2);
        // A new cluster, or one more node: the free numbers.
        let names = |v: Vec<NodeRecord>| v.into_iter().map(|n| n.name).collect::<Vec<_>>();
        assert_eq!(
            names(records_for_up(&settings, &layout, &[])),
            ["node1", "node2"]
        );
        let more = ClusterSettings {
            standbys: 2,
            ..settings
        };
        assert_eq!(
            names(records_for_up(&more, &layout, &left)),
            ["node1", "node2", "node3"]
        );
        assert_eq!(number("node12"), Some(12));
        assert_eq!(number("node0"), None);
        assert_eq!(number("db1"), None);
    }
}
