//! Command-line interface (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::config::Overrides;

#[derive(Debug, Parser)]
#[command(
    name = "tidepool",
    version,
    about = "Tidepool control process: bring up, inspect and stop a local cluster"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,

    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Clone, Args)]
pub struct GlobalArgs {
    /// State directory [default: ./.tidepool, or `dir` from --config].
    #[arg(long, global = true, value_name = "DIR")]
    pub dir: Option<PathBuf>,

    /// TOML file with the control process's settings (see config/tidepool.toml).
    #[arg(long, global = true, value_name = "FILE", env = "TIDEPOOL_CONFIG")]
    pub config: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Start (or complete) a local cluster: Postgres 15, pooler, gateway. Prints a
    /// postgres:// URL as its last line.
    Up(Box<UpArgs>),
    /// Show each process, its pid, address and state. Exits non-zero if one is down.
    Status(StatusArgs),
    /// Stop what `up` started (gateway, pooler, then Postgres); keeps the data.
    Down(DownArgs),
    /// Planned change of primary, with no client-visible error.
    Switchover(SwitchoverArgs),
    /// Explicit failover when the automatic one refuses (lost majority): recorded in the
    /// topology with the reason. May lose commits the unreachable nodes acknowledged.
    Failover(FailoverArgs),
    /// The control process itself (started by `up` when there are standbys): failure
    /// detection and failover. Runs in the foreground.
    Control(ControlArgs),
    /// pgBackRest backups of a cluster with standbys: create, list, verify, expire.
    Backup(BackupArgs),
    /// Nodes of a cluster with standbys: `node add` restores a new standby from the latest
    /// backup and joins it to the cohort.
    Node(NodeArgs),
    /// Restore the cluster's backups into a new directory, to a point in time; then
    /// `tidepool up --dir NEWDIR` runs it.
    Restore(RestoreArgs),
    /// Write systemd units for the gateway, the pooler and the control process (and the
    /// example configs where none is) into a root directory; print what to enable.
    Install(InstallArgs),
}

#[derive(Debug, Clone, Args)]
pub struct InstallArgs {
    /// The root of the system to install into.
    #[arg(long, value_name = "DIR", default_value = "/")]
    pub root: PathBuf,
    /// Where tidepool, tidepool-gateway and tidepool-pooler are [default: the directory of
    /// this executable].
    #[arg(long, value_name = "DIR")]
    pub bin_dir: Option<PathBuf>,
    /// Where the units read the processes' configs (gateway.toml, pooler.toml, tidepool.toml).
    #[arg(long, value_name = "DIR", default_value = "/etc/tidepool")]
    pub config_dir: PathBuf,
    /// The cluster's state directory, for the control process (`tidepool up --dir`).
    #[arg(long, value_name = "DIR", default_value = "/var/lib/tidepool")]
    pub state_dir: PathBuf,
    /// The OS user the gateway runs as.
    #[arg(long, value_name = "NAME", default_value = "tidepool")]
    pub user: String,
    /// The OS user owning Postgres's data: the pooler and the control process run as it.
    #[arg(long, value_name = "NAME", default_value = "postgres")]
    pub pg_user: String,
    /// Also create the gateway's user (systemd-sysusers, declared in etc/sysusers.d/).
    #[arg(long)]
    pub create_user: bool,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(subcommand)]
    pub command: BackupCommand,
}

#[derive(Debug, Subcommand)]
pub enum BackupCommand {
    /// Take a backup, from a healthy standby when there is one (one at a time).
    Create(BackupCreateArgs),
    /// The backups in the repository (pgbackrest info).
    List(BackupListArgs),
    /// Check every backup file and archived WAL file against its checksum.
    Verify,
    /// Remove backups (and the WAL only they need) beyond the retention in [backup].
    Expire,
}

#[derive(Debug, Args)]
pub struct NodeArgs {
    #[command(subcommand)]
    pub command: NodeCommand,
}

#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// A new standby restored from the latest backup, with its pooler, in the cohort and the
    /// durability policy.
    Add(NodeAddArgs),
    /// Takes a standby out of the cohort: the durability policy re-checked without it, its
    /// Postgres and pooler stopped, its directory kept aside (DIR/NAME.removed-TIME).
    Remove(NodeRemoveArgs),
}

#[derive(Debug, Clone, Args)]
pub struct NodeRemoveArgs {
    /// The node to remove (as `tidepool status` names it, e.g. node3).
    #[arg(value_name = "NAME")]
    pub name: String,
}

#[derive(Debug, Clone, Default, Args)]
pub struct NodeAddArgs {
    /// The new node's zone [default: local].
    #[arg(long, value_name = "ZONE")]
    pub zone: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct BackupCreateArgs {
    /// full, diff (changes since the last full) or incr (since the last backup).
    #[arg(long = "type", value_name = "TYPE", default_value = "full",
          value_parser = ["full", "diff", "incr"])]
    pub kind: String,
    /// Print the result as JSON (and no progress bar).
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Default, Args)]
pub struct BackupListArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Clone, Args)]
pub struct RestoreArgs {
    /// Where recovery stops: a time (`2026-12-06 20:15:00+00`), an LSN (`0/3000100`), a
    /// restore point name (pg_create_restore_point), or `latest` (all archived WAL).
    #[arg(long, value_name = "TARGET")]
    pub to: String,
    /// The new state directory (its pgdata/ is restored; must not hold a cluster).
    #[arg(long, value_name = "NEWDIR")]
    pub into: PathBuf,
    /// Port the restored Postgres listens on while it recovers.
    #[arg(long, value_name = "PORT", default_value_t = 5440)]
    pub pg_port: u16,
    /// Restore from this backup label [default: the latest backup before the target].
    #[arg(long, value_name = "LABEL")]
    pub set: Option<String>,
    /// Seconds to wait for recovery to reach the target.
    #[arg(long, value_name = "SECS", default_value_t = 300)]
    pub timeout_secs: u64,
}

#[derive(Debug, Clone, Default, Args)]
pub struct SwitchoverArgs {
    /// The standby to promote [default: the most advanced].
    #[arg(long, value_name = "NODE")]
    pub to: Option<String>,
}

#[derive(Debug, Clone, Default, Args)]
pub struct FailoverArgs {
    /// Required: promote even though the policy cannot prove no acknowledged commit is lost.
    #[arg(long)]
    pub force: bool,
    /// Why (recorded in the topology's history).
    #[arg(long, value_name = "TEXT")]
    pub reason: String,
    /// The node to promote [default: the most advanced reachable standby].
    #[arg(long, value_name = "NODE")]
    pub to: Option<String>,
}

#[derive(Debug, Clone, Default, Args)]
pub struct ControlArgs {
    /// Stop after this many seconds (tests); default: run until killed.
    #[arg(long, value_name = "SECS")]
    pub exit_after_secs: Option<u64>,
    /// The agent secret's file [default: DIR/agent.key]. `tidepool up` run as root gives the
    /// control process (run as `postgres`) its own copy, DIR/keys/agent.control.key (600).
    #[arg(long, value_name = "FILE")]
    pub agent_secret_file: Option<std::path::PathBuf>,
    /// The etcd password's file [default: `[etcd_access] password_file`]. `tidepool up` run
    /// as root gives the control process its own copy, DIR/keys/etcd.control.password (600).
    #[arg(long = "etcd-password-file", value_name = "FILE")]
    pub etcd_password_file: Option<std::path::PathBuf>,
    /// The etcd client certificate's key [default: `[etcd_access] key_file`]. `tidepool up`
    /// run as root gives the control process its own copy, DIR/keys/etcd.control.key (600).
    #[arg(long = "etcd-key-file", value_name = "FILE")]
    pub etcd_key_file: Option<std::path::PathBuf>,
}

/// Flags left out fall back to --config, then to what the state directory remembers from
/// the last `up`, then to the defaults shown.
#[derive(Debug, Clone, Default, Args)]
pub struct UpArgs {
    /// Gateway port, the one clients use [default: 15432].
    #[arg(long, value_name = "PORT")]
    pub port: Option<u16>,

    /// Pooler link port [default: 15433].
    #[arg(long, value_name = "PORT")]
    pub pooler_port: Option<u16>,

    /// Postgres port on 127.0.0.1 [default: 5433].
    #[arg(long, value_name = "PORT")]
    pub pg_port: Option<u16>,

    /// Cores for the gateway and for the pooler each; 0 = a quarter of this machine's, at
    /// least one (they share it with Postgres) [default: 0].
    #[arg(long, value_name = "N")]
    pub cores: Option<usize>,

    /// Pooler backend budget per (user, database) [default: 20].
    #[arg(long, value_name = "N")]
    pub pool_size: Option<u32>,

    /// Pooler total backend budget [default: 100].
    #[arg(long, value_name = "N")]
    pub max_backends: Option<u32>,

    /// Postgres max_connections [default: 200].
    #[arg(long, value_name = "N")]
    pub pg_max_connections: Option<u32>,

    /// PostgreSQL 15 bin directory [default: /usr/lib/postgresql/15/bin].
    #[arg(long, value_name = "DIR")]
    pub pg_bin_dir: Option<PathBuf>,

    /// Directory of tidepool-gateway and tidepool-pooler [default: beside this executable].
    #[arg(long, value_name = "DIR", env = "TIDEPOOL_BIN_DIR")]
    pub bin_dir: Option<PathBuf>,

    /// Seconds to wait for each process to accept connections [default: 30].
    #[arg(long, value_name = "SECS")]
    pub ready_timeout_secs: Option<u64>,

    /// Config file passed to the gateway as --config.
    #[arg(long, value_name = "FILE")]
    pub gateway_config: Option<PathBuf>,

    /// Config file passed to the pooler as --config.
    #[arg(long, value_name = "FILE")]
    pub pooler_config: Option<PathBuf>,

    /// Streaming standbys beside the primary, each with its own pooler; starts the control
    /// process too [default: 0].
    #[arg(long, value_name = "N")]
    pub standbys: Option<u32>,

    /// Durability policy, e.g. "any 2" or "zones 2" (docs/policy.md) [default: any 2].
    #[arg(long, value_name = "POLICY")]
    pub durability: Option<String>,

    /// Zone of each node in order, comma-separated (node1,node2,...) [default: local].
    #[arg(long, value_name = "ZONES", value_delimiter = ',')]
    pub zones: Option<Vec<String>>,

    /// Keep the topology in etcd (http://HOST:PORT or https://HOST:PORT, comma-separated)
    /// instead of the file DIR/topology.json ["" = the file].
    #[arg(long, value_name = "URLS")]
    pub etcd: Option<String>,

    /// CA certificate(s) (PEM) that https:// etcd endpoints must present a certificate of.
    #[arg(long, value_name = "FILE")]
    pub etcd_ca_file: Option<PathBuf>,

    /// Client certificate (PEM) presented to https:// etcd endpoints (etcd's
    /// --client-cert-auth) [default: none].
    #[arg(long, value_name = "FILE", requires = "etcd_key_file")]
    pub etcd_cert_file: Option<PathBuf>,

    /// Private key (PEM, mode 600) of --etcd-cert-file.
    #[arg(long, value_name = "FILE", requires = "etcd_cert_file")]
    pub etcd_key_file: Option<PathBuf>,

    /// etcd user to authenticate as (etcd's `auth enable`) [default: none].
    #[arg(long, value_name = "USER")]
    pub etcd_user: Option<String>,

    /// File holding the etcd user's password (mode 600).
    #[arg(long, value_name = "FILE")]
    pub etcd_password_file: Option<PathBuf>,

    /// The cluster's name: the etcd key prefix /tidepool/NAME/ [default: local].
    #[arg(long, value_name = "NAME")]
    pub cluster_name: Option<String>,

    /// Serve Prometheus metrics from the control process on HOST:PORT (docs/metrics.md);
    /// "" = off [default: off].
    #[arg(long, value_name = "HOST:PORT")]
    pub metrics_listen: Option<String>,
}

impl UpArgs {
    pub fn overrides(&self, global: &GlobalArgs) -> Overrides {
        Overrides {
            dir: global.dir.clone(),
            port: self.port,
            pooler_port: self.pooler_port,
            pg_port: self.pg_port,
            cores: self.cores,
            pool_size: self.pool_size,
            max_backends: self.max_backends,
            pg_max_connections: self.pg_max_connections,
            pg_bin_dir: self.pg_bin_dir.clone(),
            bin_dir: self.bin_dir.clone().filter(|p| !p.as_os_str().is_empty()),
            ready_timeout_secs: self.ready_timeout_secs,
            stop_timeout_secs: None,
            log_level: None,
            gateway_config: self.gateway_config.clone(),
            pooler_config: self.pooler_config.clone(),
            standbys: self.standbys,
            durability: self.durability.clone(),
            zones: self.zones.clone(),
            timers: None,
            etcd: self.etcd.clone(),
            // Given as flags, they replace the whole [etcd_access] table.
            etcd_access: (self.etcd_ca_file.is_some()
                || self.etcd_cert_file.is_some()
                || self.etcd_user.is_some()
                || self.etcd_password_file.is_some())
            .then(|| crate::config::EtcdAccess {
                ca_file: self.etcd_ca_file.clone(),
                cert_file: self.etcd_cert_file.clone(),
                key_file: self.etcd_key_file.clone(),
                user: self.etcd_user.clone(),
                password_file: self.etcd_password_file.clone(),
            }),
            cluster_name: self.cluster_name.clone(),
            backup: None,
            metrics_listen: self.metrics_listen.clone(),
        }
    }
}

#[derive(Debug, Clone, Default, Args)]
pub struct DownArgs {
    /// Seconds to wait after SIGTERM before SIGKILL, and for `pg_ctl stop` [default: 10].
    #[arg(long, value_name = "SECS")]
    pub stop_timeout_secs: Option<u64>,
}

#[derive(Debug, Clone, Default, Args)]
pub struct StatusArgs {
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn dir_is_accepted_before_and_after_the_subcommand() {
        let a = Cli::try_parse_from(["tidepool", "--dir", "/a", "status", "--json"]).unwrap();
        assert_eq!(a.global.dir, Some(PathBuf::from("/a")));
        let b = Cli::try_parse_from(["tidepool", "up", "--dir", "/b", "--port", "1"]).unwrap();
        assert_eq!(b.global.dir, Some(PathBuf::from("/b")));
        match b.command {
            Command::Up(up) => {
                assert_eq!(up.port, Some(1));
                assert_eq!(up.pooler_port, None);
            }
            other => panic!("{other:?}"),
        }
    }
}
