//! Settings of the control process: built-in defaults, what the state directory remembers
//! from the last `tidepool up`, the TOML file (`--config`), and flags, in rising precedence.
//!
//! TOML keys are the long flag names with `_` for `-` (the same rule as the gateway and the
//! pooler, see docs/CONTRACTS.md); `config/tidepool.toml` lists every key with its default.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub const DEFAULT_DIR: &str = ".tidepool";
pub const DEFAULT_PG_BIN_DIR: &str = "/usr/lib/postgresql/15/bin";

/// The shape of a cluster: what `up` resolved and `state.json` remembers, so that a second
/// `tidepool up` without flags brings back the same cluster.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterSettings {
    /// Gateway listen port: the port clients use.
    pub port: u16,
    /// Pooler link port: the port gateways use.
    pub pooler_port: u16,
    /// Postgres TCP port (loopback only).
    pub pg_port: u16,
    /// Cores given to the gateway and to the pooler (`--cores` of each).
    pub cores: usize,
    /// Pooler backend budget per (user, database).
    pub pool_size: u32,
    /// Pooler total backend budget.
    pub max_backends: u32,
    /// Postgres `max_connections`.
    pub pg_max_connections: u32,
    /// Where initdb, pg_ctl, psql of PostgreSQL 15 live.
    pub pg_bin_dir: PathBuf,
    /// Streaming standbys beside the primary (each with its own pooler); 0: a single node.
    #[serde(default)]
    pub standbys: u32,
    /// Durability policy (docs/policy.md), e.g. `any 2` or `zones 2`.
    #[serde(default = "default_durability")]
    pub durability: String,
    /// Zone of each node in order (node1, node2, ...); missing entries: `local`.
    #[serde(default)]
    pub zones: Vec<String>,
    /// The control process's timers.
    #[serde(default)]
    pub timers: Timers,
    /// etcd endpoints (`http://HOST:PORT`, comma-separated) holding the topology; `None`:
    /// the file `DIR/topology.json`.
    #[serde(default)]
    pub etcd: Option<String>,
    /// TLS and authentication towards etcd (the `[etcd_access]` table).
    #[serde(default)]
    pub etcd_access: EtcdAccess,
    /// The cluster's name: the etcd key prefix `/tidepool/<name>/`, and the pgBackRest stanza.
    #[serde(default = "default_cluster_name")]
    pub cluster_name: String,
    /// pgBackRest backups and WAL archiving (clusters with standbys).
    #[serde(default)]
    pub backup: BackupSettings,
    /// Where the control process serves Prometheus metrics (`HOST:PORT`, docs/metrics.md);
    /// empty: no metrics endpoint.
    #[serde(default)]
    pub metrics_listen: String,
}

impl ClusterSettings {
    /// `metrics_listen` parsed; `None` when it is empty (the endpoint is off).
    pub fn metrics_addr(&self) -> Result<Option<std::net::SocketAddr>> {
        let text = self.metrics_listen.trim();
        if text.is_empty() {
            return Ok(None);
        }
        text.parse().map(Some).map_err(|e| {
            Error::Conflict(format!(
                "metrics_listen {text:?} is not HOST:PORT (e.g. 127.0.0.1:9930): {e}"
            ))
        })
    }
}

/// The `[etcd_access]` table: how the etcd endpoints are reached (topology/etcd.rs).
/// config/tidepool.toml shows the defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EtcdAccess {
    /// PEM file of the CA(s) an `https://` endpoint's certificate must chain to; required by
    /// `https://` endpoints (checked against the endpoint's host name or IP address).
    pub ca_file: Option<PathBuf>,
    /// PEM certificate this process presents to `https://` endpoints (etcd's
    /// `--client-cert-auth`); `None`: no client certificate. Required with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (mode 600: refused when group or others may read it).
    pub key_file: Option<PathBuf>,
    /// etcd user (etcd's `auth enable`); `None`: no authentication.
    pub user: Option<String>,
    /// File holding that user's password (mode 600: refused when group or others may read it);
    /// required with `user`. The password itself is never a flag or a config value.
    pub password_file: Option<PathBuf>,
}

/// The `[backup]` table: pgBackRest's repository, compression, parallelism and retention.
/// docs/backups.md says what each does; config/tidepool.toml shows the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BackupSettings {
    /// Archive WAL and take backups with pgBackRest (clusters with standbys only, today).
    pub enabled: bool,
    /// The repository (`repo1-path`); empty: `DIR/backups`.
    pub repo_path: PathBuf,
    /// `compress-type`: zst, lz4, gz, bz2 or none.
    pub compress_type: String,
    /// `process-max`: processes copying files in a backup or a restore.
    pub process_max: u32,
    /// `repo1-retention-full`: full backups kept (count) or days they are kept (time).
    pub retention_full: u32,
    /// `repo1-retention-full-type`: `count` or `time`.
    pub retention_full_type: String,
    /// `repo1-retention-diff`: differential backups kept; 0: pgBackRest's default.
    pub retention_diff: u32,
    /// More pgBackRest options for every config Tidepool writes (`[global]`), e.g. an
    /// S3-compatible repository: `repo1-type = "s3"`, `repo1-s3-bucket`, ...
    pub options: std::collections::BTreeMap<String, String>,
    /// Backups the control process takes on its own (`[[backup.schedule]]`: `type`, `cron`).
    pub schedule: Vec<crate::backup::schedule::Schedule>,
}

impl Default for BackupSettings {
    fn default() -> Self {
        BackupSettings {
            enabled: true,
            repo_path: PathBuf::new(),
            compress_type: "zst".into(),
            process_max: 1,
            retention_full: 2,
            retention_full_type: "count".into(),
            retention_diff: 0,
            options: Default::default(),
            schedule: Vec::new(),
        }
    }
}

pub fn default_cluster_name() -> String {
    "local".to_string()
}

pub fn default_durability() -> String {
    "any 2".to_string()
}

/// Every timer of failure detection and failover, in milliseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Timers {
    /// How often the control process asks every node agent for its report.
    pub probe_interval_ms: u64,
    /// How long one agent call may take before the node counts as unreachable.
    pub agent_timeout_ms: u64,
    /// How long the primary must stay unreachable or down (and unseen by its standbys)
    /// before a failover starts.
    pub failure_timeout_ms: u64,
    /// A standby that heard from the primary within this long proves the primary alive.
    pub standby_heard_ms: u64,
    /// Bound on recruit / promote / follow calls (they include the node's work).
    pub operation_timeout_ms: u64,
}

impl Default for Timers {
    fn default() -> Self {
        Timers {
            probe_interval_ms: 250,
            agent_timeout_ms: 1000,
            failure_timeout_ms: 1500,
            standby_heard_ms: 4000,
            operation_timeout_ms: 15000,
        }
    }
}

impl Default for ClusterSettings {
    fn default() -> Self {
        ClusterSettings {
            port: 15432,
            pooler_port: 15433,
            pg_port: 5433,
            cores: 0,
            pool_size: 20,
            max_backends: 100,
            pg_max_connections: 200,
            pg_bin_dir: PathBuf::from(DEFAULT_PG_BIN_DIR),
            standbys: 0,
            durability: default_durability(),
            zones: Vec::new(),
            timers: Timers::default(),
            etcd: None,
            etcd_access: EtcdAccess::default(),
            cluster_name: default_cluster_name(),
            backup: BackupSettings::default(),
            metrics_listen: String::new(),
        }
    }
}

/// Settings that are looked up afresh on every run, never remembered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunSettings {
    /// Directory holding tidepool-gateway and tidepool-pooler; `None`: beside `tidepool`.
    pub bin_dir: Option<PathBuf>,
    pub ready_timeout_secs: u64,
    pub stop_timeout_secs: u64,
    pub gateway_config: Option<PathBuf>,
    pub pooler_config: Option<PathBuf>,
    /// The control process's log filter (`RUST_LOG` wins at start); SIGHUP applies a change.
    pub log_level: String,
}

pub const DEFAULT_LOG_LEVEL: &str = "warn";

impl Default for RunSettings {
    fn default() -> Self {
        RunSettings {
            bin_dir: None,
            ready_timeout_secs: 30,
            stop_timeout_secs: 10,
            gateway_config: None,
            pooler_config: None,
            log_level: DEFAULT_LOG_LEVEL.into(),
        }
    }
}

/// Every key is optional: a key left out keeps the value from the layer below. Also used
/// for the flags, so that the file and the command line merge the same way.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Overrides {
    pub dir: Option<PathBuf>,
    pub port: Option<u16>,
    pub pooler_port: Option<u16>,
    pub pg_port: Option<u16>,
    pub cores: Option<usize>,
    pub pool_size: Option<u32>,
    pub max_backends: Option<u32>,
    pub pg_max_connections: Option<u32>,
    pub pg_bin_dir: Option<PathBuf>,
    pub bin_dir: Option<PathBuf>,
    pub ready_timeout_secs: Option<u64>,
    pub stop_timeout_secs: Option<u64>,
    pub gateway_config: Option<PathBuf>,
    pub pooler_config: Option<PathBuf>,
    pub standbys: Option<u32>,
    pub durability: Option<String>,
    pub zones: Option<Vec<String>>,
    pub timers: Option<Timers>,
    pub etcd: Option<String>,
    pub etcd_access: Option<EtcdAccess>,
    pub cluster_name: Option<String>,
    pub backup: Option<BackupSettings>,
    pub metrics_listen: Option<String>,
    pub log_level: Option<String>,
}

impl Overrides {
    /// Reads a TOML file. An empty path string in the file means "not set".
    pub fn load(path: &Path) -> Result<Overrides> {
        let text = std::fs::read_to_string(path)
            .map_err(Error::io(format!("reading config file {}", path.display())))?;
        Overrides::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Overrides> {
        let mut o: Overrides = toml::from_str(text).map_err(|source| Error::Config {
            path: path.to_path_buf(),
            source,
        })?;
        for p in [
            &mut o.dir,
            &mut o.pg_bin_dir,
            &mut o.bin_dir,
            &mut o.gateway_config,
            &mut o.pooler_config,
        ] {
            if p.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                *p = None;
            }
        }
        Ok(o)
    }

    /// `self` on top of `below`.
    pub fn over(self, below: Overrides) -> Overrides {
        Overrides {
            dir: self.dir.or(below.dir),
            port: self.port.or(below.port),
            pooler_port: self.pooler_port.or(below.pooler_port),
            pg_port: self.pg_port.or(below.pg_port),
            cores: self.cores.or(below.cores),
            pool_size: self.pool_size.or(below.pool_size),
            max_backends: self.max_backends.or(below.max_backends),
            pg_max_connections: self.pg_max_connections.or(below.pg_max_connections),
            pg_bin_dir: self.pg_bin_dir.or(below.pg_bin_dir),
            bin_dir: self.bin_dir.or(below.bin_dir),
            ready_timeout_secs: self.ready_timeout_secs.or(below.ready_timeout_secs),
            stop_timeout_secs: self.stop_timeout_secs.or(below.stop_timeout_secs),
            gateway_config: self.gateway_config.or(below.gateway_config),
            pooler_config: self.pooler_config.or(below.pooler_config),
            standbys: self.standbys.or(below.standbys),
            durability: self.durability.or(below.durability),
            zones: self.zones.or(below.zones),
            timers: self.timers.or(below.timers),
            etcd: self.etcd.or(below.etcd),
            etcd_access: self.etcd_access.or(below.etcd_access),
            cluster_name: self.cluster_name.or(below.cluster_name),
            backup: self.backup.or(below.backup),
            metrics_listen: self.metrics_listen.or(below.metrics_listen),
            log_level: self.log_level.or(below.log_level),
        }
    }

    /// The state directory: `dir` if set, else `./.tidepool`.
    pub fn dir(&self) -> PathBuf {
        self.dir
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
    }

    /// Cluster settings: these overrides on top of `base` (what the state directory
    /// remembers, or the defaults). `cores = 0` means [`default_cores`].
    pub fn cluster(&self, base: &ClusterSettings) -> ClusterSettings {
        let cores = self.cores.unwrap_or(base.cores);
        ClusterSettings {
            port: self.port.unwrap_or(base.port),
            pooler_port: self.pooler_port.unwrap_or(base.pooler_port),
            pg_port: self.pg_port.unwrap_or(base.pg_port),
            cores: if cores == 0 { default_cores() } else { cores },
            pool_size: self.pool_size.unwrap_or(base.pool_size),
            max_backends: self.max_backends.unwrap_or(base.max_backends),
            pg_max_connections: self.pg_max_connections.unwrap_or(base.pg_max_connections),
            pg_bin_dir: self
                .pg_bin_dir
                .clone()
                .unwrap_or_else(|| base.pg_bin_dir.clone()),
            standbys: self.standbys.unwrap_or(base.standbys),
            durability: self
                .durability
                .clone()
                .unwrap_or_else(|| base.durability.clone()),
            zones: self.zones.clone().unwrap_or_else(|| base.zones.clone()),
            timers: self.timers.unwrap_or(base.timers),
            etcd: match &self.etcd {
                Some(e) if e.is_empty() => None,
                Some(e) => Some(e.clone()),
                None => base.etcd.clone(),
            },
            etcd_access: self
                .etcd_access
                .clone()
                .unwrap_or_else(|| base.etcd_access.clone()),
            cluster_name: self
                .cluster_name
                .clone()
                .unwrap_or_else(|| base.cluster_name.clone()),
            backup: self.backup.clone().unwrap_or_else(|| base.backup.clone()),
            metrics_listen: self
                .metrics_listen
                .clone()
                .unwrap_or_else(|| base.metrics_listen.clone()),
        }
    }

    pub fn run(&self) -> RunSettings {
        let d = RunSettings::default();
        RunSettings {
            bin_dir: self.bin_dir.clone(),
            ready_timeout_secs: self.ready_timeout_secs.unwrap_or(d.ready_timeout_secs),
            stop_timeout_secs: self.stop_timeout_secs.unwrap_or(d.stop_timeout_secs),
            gateway_config: self.gateway_config.clone(),
            pooler_config: self.pooler_config.clone(),
            log_level: self
                .log_level
                .clone()
                .filter(|l| !l.trim().is_empty())
                .unwrap_or(d.log_level),
        }
    }
}

fn available_cores() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}

/// Executors `up` gives the gateway and the pooler each when none are named: a quarter of the
/// cores this process may use, at least one. Under `up` both share the machine with Postgres
/// (and often with the clients); a gateway or pooler of its own machine is given `--cores`
/// (its own default: every core). On two cores, one executor each cost about a third less CPU
/// per transaction than two each, at more TPS (perf/RESULTS.md, 2026-12-07 20:10).
pub fn default_cores() -> usize {
    available_cores().div_ceil(4).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXAMPLE: &str = include_str!("../../config/tidepool.toml");

    #[test]
    fn example_file_parses_and_shows_the_defaults() {
        let o = Overrides::parse(EXAMPLE, Path::new("config/tidepool.toml")).unwrap();
        assert_eq!(o.dir(), PathBuf::from(DEFAULT_DIR));
        let from_file = o.cluster(&ClusterSettings::default());
        let defaults = Overrides::default().cluster(&ClusterSettings::default());
        assert_eq!(from_file, defaults);
        assert_eq!(o.run(), RunSettings::default());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Overrides::parse("prot = 1\n", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("prot"), "{err}");
    }

    #[test]
    fn flags_beat_file_beat_remembered_beat_defaults() {
        let remembered = ClusterSettings {
            port: 1000,
            pooler_port: 1001,
            pg_port: 1002,
            ..ClusterSettings::default()
        };
        let file =
            Overrides::parse("pooler_port = 2001\npg_port = 2002\n", Path::new("f")).unwrap();
        let flags = Overrides {
            pg_port: Some(3002),
            ..Overrides::default()
        };
        let s = flags.over(file).cluster(&remembered);
        assert_eq!((s.port, s.pooler_port, s.pg_port), (1000, 2001, 3002));
        assert_eq!(s.pool_size, 20);
    }

    #[test]
    fn zero_cores_means_a_quarter_of_the_cores() {
        let s = Overrides::default().cluster(&ClusterSettings::default());
        assert_eq!(s.cores, available_cores().div_ceil(4).max(1));
        assert!(s.cores >= 1);
        let s = Overrides {
            cores: Some(3),
            ..Overrides::default()
        }
        .cluster(&ClusterSettings::default());
        assert_eq!(s.cores, 3);
    }

    #[test]
    fn metrics_listen_is_off_when_empty_and_checked_when_set() {
        let mut s = ClusterSettings::default();
        assert_eq!(s.metrics_addr().unwrap(), None);
        s.metrics_listen = "127.0.0.1:9930".into();
        assert_eq!(
            s.metrics_addr().unwrap(),
            Some("127.0.0.1:9930".parse().unwrap())
        );
        s.metrics_listen = "localhost".into();
        assert!(s.metrics_addr().is_err());
    }

    #[test]
    fn empty_paths_mean_unset() {
        let o = Overrides::parse("bin_dir = \"\"\ndir = \"\"\n", Path::new("f")).unwrap();
        assert_eq!(o.bin_dir, None);
        assert_eq!(o.dir(), PathBuf::from(DEFAULT_DIR));
    }
}
