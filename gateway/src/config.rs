//! Gateway configuration: one TOML file, every key optional, flags override it.

use clap::Parser;
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Parser, Debug, Default, Clone)]
#[command(
    name = "tidepool-gateway",
    about = "Tidepool gateway: speaks Postgres to clients"
)]
pub struct Args {
    /// TOML configuration file (see config/gateway.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Client address (SO_REUSEPORT: several gateway processes may share it).
    #[arg(long)]
    pub listen: Option<String>,
    /// Also listen on DIR/.s.PGSQL.<port>.
    #[arg(long)]
    pub unix_socket_dir: Option<String>,
    /// Executors (cores); default: all cores.
    #[arg(long)]
    pub cores: Option<usize>,
    /// Pooler link address; repeat it or separate with commas for several poolers (one per
    /// Postgres node: the gateway sends sessions to the one reporting primary at the highest term).
    #[arg(long, value_delimiter = ',')]
    pub pooler: Vec<String>,
    /// Milliseconds a request waits for a primary while there is none.
    #[arg(long)]
    pub failover_hold_ms: Option<u64>,
    /// Requests held at once per core while there is no primary; more get SQLSTATE 57P03.
    #[arg(long)]
    pub failover_hold_max: Option<usize>,
    /// A second client address whose sessions read from a standby.
    #[arg(long)]
    pub read_only_listen: Option<String>,
    /// Bytes of WAL a standby may lag behind the primary and still serve the read-only
    /// listener (0: any standby).
    #[arg(long)]
    pub max_standby_lag_bytes: Option<u64>,
    /// Refuse statements that lower synchronous_commit (true/false).
    #[arg(long)]
    pub guard_synchronous_commit: Option<bool>,
    /// scram-sha-256, md5 or trust (as in pg_hba.conf).
    #[arg(long)]
    pub auth_method: Option<String>,
    /// Access rules by client address, pg_hba.conf's format (see gateway/src/hba.rs); they
    /// replace auth_method. Read again on reload.
    #[arg(long)]
    pub hba_file: Option<PathBuf>,
    /// Logged-in clients per role in this process (0: no limit).
    #[arg(long)]
    pub max_user_clients: Option<usize>,
    /// Logged-in clients per database in this process (0: no limit).
    #[arg(long)]
    pub max_db_clients: Option<usize>,
    /// PEM certificate chain for TLS.
    #[arg(long)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for TLS.
    #[arg(long)]
    pub tls_key: Option<PathBuf>,
    /// Client connections this process accepts at once.
    #[arg(long)]
    pub max_clients: Option<usize>,
    /// Largest message accepted from a client, in bytes.
    #[arg(long)]
    pub max_message_size: Option<usize>,
    /// Links to the pooler per core.
    #[arg(long)]
    pub links_per_core: Option<usize>,
    /// Seconds a client may take to start up and authenticate.
    #[arg(long)]
    pub auth_timeout_seconds: Option<u64>,
    /// Microseconds an idle executor spins before it sleeps (0: sleep at once).
    #[arg(long)]
    pub spin_before_park_us: Option<u64>,
    /// On SIGTERM, milliseconds transactions in progress may take to finish before their
    /// sessions are ended anyway.
    #[arg(long)]
    pub shutdown_timeout_ms: Option<u64>,
    /// Milliseconds a client may sit idle outside a transaction before it is disconnected
    /// (PgBouncer's client_idle_timeout; 0: never).
    #[arg(long)]
    pub client_idle_timeout_ms: Option<u64>,
    /// Milliseconds a client may sit idle inside a transaction before it is disconnected
    /// (PgBouncer's idle_transaction_timeout; 0: never).
    #[arg(long)]
    pub idle_transaction_timeout_ms: Option<u64>,
    /// Log filter (`info`, `debug`, `warn,tidepool_gateway=debug`); RUST_LOG wins at start.
    #[arg(long)]
    pub log_level: Option<String>,
    /// File holding the cluster's link secret (64 hex digits, mode 600; `tidepool up` writes
    /// DIR/link.key): proved to each pooler, which proves it back. Required; the secret itself
    /// is never a flag.
    #[arg(long)]
    pub link_secret_file: Option<PathBuf>,
    /// PEM file of the CA the poolers' link certificates chain to: with it every link is TLS,
    /// and a pooler must present a certificate from this CA for the host or address in
    /// `--pooler`. Without it links are plain TCP (poolers on loopback).
    #[arg(long)]
    pub link_tls_ca: Option<PathBuf>,
    /// The virtual database of the admin console (SHOW POOLS, PAUSE, RELOAD...).
    #[arg(long)]
    pub admin_database: Option<String>,
    /// Roles allowed into the admin console (comma-separated or repeated); they authenticate
    /// as any client does. Default: none, and then no console (a database of that name is
    /// served as any other).
    #[arg(long, value_delimiter = ',')]
    pub admin_users: Vec<String>,
    /// Address of the Prometheus/OpenMetrics endpoint (`GET /metrics`); off when unset.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// Session ids per core before they wrap (tests: a small number makes wrapping happen).
    #[arg(long, hide = true)]
    pub session_ids: Option<u32>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<String>,
    unix_socket_dir: Option<String>,
    cores: Option<usize>,
    pooler: Option<String>,
    poolers: Option<Vec<String>>,
    failover_hold_ms: Option<u64>,
    failover_hold_max: Option<usize>,
    read_only_listen: Option<String>,
    max_standby_lag_bytes: Option<u64>,
    guard_synchronous_commit: Option<bool>,
    auth_method: Option<String>,
    hba_file: Option<PathBuf>,
    max_user_clients: Option<usize>,
    max_db_clients: Option<usize>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    max_clients: Option<usize>,
    max_message_size: Option<usize>,
    links_per_core: Option<usize>,
    auth_timeout_seconds: Option<u64>,
    spin_before_park_us: Option<u64>,
    shutdown_timeout_ms: Option<u64>,
    client_idle_timeout_ms: Option<u64>,
    idle_transaction_timeout_ms: Option<u64>,
    log_level: Option<String>,
    link_secret_file: Option<PathBuf>,
    link_tls_ca: Option<PathBuf>,
    admin_database: Option<String>,
    admin_users: Option<Vec<String>>,
    metrics_listen: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthMethod {
    /// SCRAM only.
    Scram,
    /// SCRAM when the role has a SCRAM verifier, md5 when it has an md5 hash.
    Md5,
    Trust,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub unix_socket_dir: Option<String>,
    pub cores: usize,
    /// Link addresses of every pooler (one per Postgres node), never empty.
    pub poolers: Vec<String>,
    pub failover_hold_ms: u64,
    /// Per core.
    pub failover_hold_max: usize,
    /// Sessions accepted here read from a standby pooler (the primary when there is none).
    pub read_only_listen: Option<String>,
    /// A standby further behind the primary than this serves no read-only session (0: any).
    pub max_standby_lag_bytes: u64,
    pub guard_synchronous_commit: bool,
    pub auth_method: AuthMethod,
    pub hba_file: Option<PathBuf>,
    /// The rules of `hba_file`, read when the config is (a file that does not parse is an
    /// error: at start the gateway does not start, on reload nothing changes).
    pub hba: Option<std::sync::Arc<tidepool_gateway::hba::Rules>>,
    pub max_user_clients: usize,
    pub max_db_clients: usize,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub max_clients: usize,
    pub max_message_size: usize,
    pub links_per_core: usize,
    pub auth_timeout_seconds: u64,
    pub spin_before_park_us: u64,
    pub shutdown_timeout_ms: u64,
    /// 0: off.
    pub client_idle_timeout_ms: u64,
    /// 0: off.
    pub idle_transaction_timeout_ms: u64,
    pub log_level: String,
    /// The link secret (`link_secret_file`).
    pub link_key: shared::link::LinkKey,
    /// The CA poolers' certificates are checked against (`link_tls_ca`); `None`: plain links.
    pub link_tls: Option<shared::tls::Trust>,
    /// Session ids run 1..=this per core, then wrap, skipping ids still in use.
    pub session_ids: u32,
    /// The admin console's virtual database.
    pub admin_database: String,
    /// Roles allowed into the admin console.
    pub admin_users: Vec<String>,
    /// Prometheus endpoint address; `None`: off.
    pub metrics_listen: Option<String>,
}

impl Config {
    pub fn load(args: Args) -> Result<Config, String> {
        let file: File = match &args.config {
            Some(p) => {
                let text = std::fs::read_to_string(p)
                    .map_err(|e| format!("reading {}: {e}", p.display()))?;
                toml::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?
            }
            None => File::default(),
        };
        let link_secret_file = args
            .link_secret_file
            .clone()
            .or(file.link_secret_file.clone())
            .ok_or("link_secret_file is required: poolers answer only gateways that prove the cluster's link secret")?;
        let link_key = shared::link::LinkKey::load(&link_secret_file)
            .map_err(|e| format!("link secret: {e}"))?;
        let link_tls = shared::tls::Trust::load(
            "link_tls_ca",
            args.link_tls_ca.clone().or(file.link_tls_ca.clone()),
        )?;
        let mut c = Config::build(args, file, link_key)?;
        if link_tls.is_some() {
            // Each pooler's certificate is checked for the host in its address: one without a
            // usable name stops the gateway now rather than leaving its links down.
            for p in &c.poolers {
                shared::tls::server_name(p).map_err(|e| format!("pooler {e}"))?;
            }
        }
        c.link_tls = link_tls;
        Ok(c)
    }

    /// What every key is when neither the file nor a flag sets it (SHOW CONFIG's `default`).
    pub fn defaults(&self) -> Config {
        Config::build(Args::default(), File::default(), self.link_key.clone())
            .unwrap_or_else(|_| self.clone())
    }

    /// The config from the flags, the file's keys (flags win) and the link key.
    fn build(args: Args, file: File, link_key: shared::link::LinkKey) -> Result<Config, String> {
        let auth = args
            .auth_method
            .or(file.auth_method)
            .unwrap_or_else(|| "md5".into());
        let auth_method = match auth.as_str() {
            "scram-sha-256" => AuthMethod::Scram,
            "md5" => AuthMethod::Md5,
            "trust" => AuthMethod::Trust,
            other => {
                return Err(format!(
                    "unknown auth_method {other:?} (scram-sha-256, md5, trust)"
                ))
            }
        };
        let hba_file = args.hba_file.or(file.hba_file);
        let hba = match &hba_file {
            Some(p) => Some(std::sync::Arc::new(
                tidepool_gateway::hba::Rules::load(p).map_err(|e| format!("hba_file {e}"))?,
            )),
            None => None,
        };
        let tls_cert = args.tls_cert.or(file.tls_cert);
        let tls_key = args.tls_key.or(file.tls_key);
        if tls_cert.is_some() != tls_key.is_some() {
            return Err("tls_cert and tls_key go together".into());
        }
        // Flags beat the file; in the file `pooler` (one) and `poolers` (a list) add up.
        let mut poolers: Vec<String> = args
            .pooler
            .iter()
            .map(|p| p.trim().to_owned())
            .filter(|p| !p.is_empty())
            .collect();
        if poolers.is_empty() {
            poolers.extend(file.pooler);
            poolers.extend(file.poolers.unwrap_or_default());
        }
        if poolers.is_empty() {
            poolers.push("127.0.0.1:15433".into());
        }
        poolers.dedup();
        let admin_users: Vec<String> = if args.admin_users.is_empty() {
            file.admin_users.unwrap_or_default()
        } else {
            args.admin_users
        };
        Ok(Config {
            link_key,
            link_tls: None,
            admin_database: args
                .admin_database
                .or(file.admin_database)
                .unwrap_or_else(|| "tidepool".into()),
            admin_users: admin_users
                .into_iter()
                .map(|u| u.trim().to_owned())
                .filter(|u| !u.is_empty())
                .collect(),
            metrics_listen: args.metrics_listen.or(file.metrics_listen),
            session_ids: args.session_ids.unwrap_or(u32::MAX).max(1),
            spin_before_park_us: args
                .spin_before_park_us
                .or(file.spin_before_park_us)
                .unwrap_or(50),
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:15432".into()),
            unix_socket_dir: args.unix_socket_dir.or(file.unix_socket_dir),
            cores: args
                .cores
                .or(file.cores)
                .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
                .max(1),
            poolers,
            failover_hold_ms: args
                .failover_hold_ms
                .or(file.failover_hold_ms)
                .unwrap_or(10_000),
            failover_hold_max: args
                .failover_hold_max
                .or(file.failover_hold_max)
                .unwrap_or(10_000),
            read_only_listen: args.read_only_listen.or(file.read_only_listen),
            max_standby_lag_bytes: args
                .max_standby_lag_bytes
                .or(file.max_standby_lag_bytes)
                .unwrap_or(16 << 20),
            guard_synchronous_commit: args
                .guard_synchronous_commit
                .or(file.guard_synchronous_commit)
                .unwrap_or(true),
            auth_method,
            hba_file,
            hba,
            max_user_clients: args.max_user_clients.or(file.max_user_clients).unwrap_or(0),
            max_db_clients: args.max_db_clients.or(file.max_db_clients).unwrap_or(0),
            tls_cert,
            tls_key,
            max_clients: args.max_clients.or(file.max_clients).unwrap_or(100_000),
            max_message_size: args
                .max_message_size
                .or(file.max_message_size)
                .unwrap_or(64 << 20),
            links_per_core: args
                .links_per_core
                .or(file.links_per_core)
                .unwrap_or(2)
                .max(1),
            auth_timeout_seconds: args
                .auth_timeout_seconds
                .or(file.auth_timeout_seconds)
                .unwrap_or(60),
            shutdown_timeout_ms: args
                .shutdown_timeout_ms
                .or(file.shutdown_timeout_ms)
                .unwrap_or(30_000),
            client_idle_timeout_ms: args
                .client_idle_timeout_ms
                .or(file.client_idle_timeout_ms)
                .unwrap_or(0),
            idle_transaction_timeout_ms: args
                .idle_transaction_timeout_ms
                .or(file.idle_transaction_timeout_ms)
                .unwrap_or(0),
            log_level: args
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
        })
    }

    /// Keys a reload (SIGHUP, RELOAD) applies live, as SHOW CONFIG names them; the others
    /// need a restart. The same split as [`Config::reloaded`] (a test holds them together).
    pub const LIVE_KEYS: &'static [&'static str] = &[
        "max_clients",
        "max_message_size",
        "failover_hold_ms",
        "failover_hold_max",
        "max_standby_lag_bytes",
        "auth_method",
        "hba_file",
        "max_user_clients",
        "max_db_clients",
        "auth_timeout_seconds",
        "shutdown_timeout_ms",
        "client_idle_timeout_ms",
        "idle_transaction_timeout_ms",
        "log_level",
        "admin_users",
        "tls_cert",
        "tls_key",
    ];

    /// Every key SHOW CONFIG lists (config/gateway.toml's names).
    pub const ALL_KEYS: &'static [&'static str] = &[
        "listen",
        "unix_socket_dir",
        "read_only_listen",
        "cores",
        "poolers",
        "links_per_core",
        "auth_method",
        "hba_file",
        "auth_timeout_seconds",
        "max_clients",
        "max_user_clients",
        "max_db_clients",
        "max_message_size",
        "failover_hold_ms",
        "failover_hold_max",
        "max_standby_lag_bytes",
        "guard_synchronous_commit",
        "client_idle_timeout_ms",
        "idle_transaction_timeout_ms",
        "shutdown_timeout_ms",
        "spin_before_park_us",
        "tls_cert",
        "tls_key",
        "log_level",
        "admin_database",
        "admin_users",
        "metrics_listen",
    ];

    /// The config in force after a reload: `new` (the file read again, under the same flags)
    /// for what can change live, `self` for the rest. Returns it with the keys that changed
    /// live and those that changed in the file but need a restart.
    pub fn reloaded(&self, new: &Config) -> (Config, Vec<&'static str>, Vec<&'static str>) {
        let s = |v: &dyn std::fmt::Debug| format!("{v:?}");
        let live = shared::lifecycle::changes(&[
            ("max_clients", s(&self.max_clients), s(&new.max_clients)),
            (
                "max_message_size",
                s(&self.max_message_size),
                s(&new.max_message_size),
            ),
            (
                "failover_hold_ms",
                s(&self.failover_hold_ms),
                s(&new.failover_hold_ms),
            ),
            (
                "failover_hold_max",
                s(&self.failover_hold_max),
                s(&new.failover_hold_max),
            ),
            (
                "max_standby_lag_bytes",
                s(&self.max_standby_lag_bytes),
                s(&new.max_standby_lag_bytes),
            ),
            ("auth_method", s(&self.auth_method), s(&new.auth_method)),
            (
                "hba_file",
                s(&(&self.hba_file, &self.hba)),
                s(&(&new.hba_file, &new.hba)),
            ),
            (
                "max_user_clients",
                s(&self.max_user_clients),
                s(&new.max_user_clients),
            ),
            (
                "max_db_clients",
                s(&self.max_db_clients),
                s(&new.max_db_clients),
            ),
            (
                "auth_timeout_seconds",
                s(&self.auth_timeout_seconds),
                s(&new.auth_timeout_seconds),
            ),
            (
                "shutdown_timeout_ms",
                s(&self.shutdown_timeout_ms),
                s(&new.shutdown_timeout_ms),
            ),
            (
                "client_idle_timeout_ms",
                s(&self.client_idle_timeout_ms),
                s(&new.client_idle_timeout_ms),
            ),
            (
                "idle_transaction_timeout_ms",
                s(&self.idle_transaction_timeout_ms),
                s(&new.idle_transaction_timeout_ms),
            ),
            ("log_level", s(&self.log_level), s(&new.log_level)),
            ("admin_users", s(&self.admin_users), s(&new.admin_users)),
            ("tls_cert", s(&self.tls_cert), s(&new.tls_cert)),
            ("tls_key", s(&self.tls_key), s(&new.tls_key)),
        ]);
        let restart = shared::lifecycle::changes(&[
            ("listen", s(&self.listen), s(&new.listen)),
            (
                "unix_socket_dir",
                s(&self.unix_socket_dir),
                s(&new.unix_socket_dir),
            ),
            ("cores", s(&self.cores), s(&new.cores)),
            ("pooler", s(&self.poolers), s(&new.poolers)),
            (
                "read_only_listen",
                s(&self.read_only_listen),
                s(&new.read_only_listen),
            ),
            (
                "guard_synchronous_commit",
                s(&self.guard_synchronous_commit),
                s(&new.guard_synchronous_commit),
            ),
            (
                "links_per_core",
                s(&self.links_per_core),
                s(&new.links_per_core),
            ),
            (
                "spin_before_park_us",
                s(&self.spin_before_park_us),
                s(&new.spin_before_park_us),
            ),
            (
                "admin_database",
                s(&self.admin_database),
                s(&new.admin_database),
            ),
            (
                "metrics_listen",
                s(&self.metrics_listen),
                s(&new.metrics_listen),
            ),
        ]);
        let merged = Config {
            max_clients: new.max_clients,
            max_message_size: new.max_message_size,
            failover_hold_ms: new.failover_hold_ms,
            failover_hold_max: new.failover_hold_max,
            max_standby_lag_bytes: new.max_standby_lag_bytes,
            auth_method: new.auth_method,
            hba_file: new.hba_file.clone(),
            hba: new.hba.clone(),
            max_user_clients: new.max_user_clients,
            max_db_clients: new.max_db_clients,
            auth_timeout_seconds: new.auth_timeout_seconds,
            shutdown_timeout_ms: new.shutdown_timeout_ms,
            client_idle_timeout_ms: new.client_idle_timeout_ms,
            idle_transaction_timeout_ms: new.idle_transaction_timeout_ms,
            log_level: new.log_level.clone(),
            tls_cert: new.tls_cert.clone(),
            tls_key: new.tls_key.clone(),
            admin_users: new.admin_users.clone(),
            ..self.clone()
        };
        (merged, live, restart)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// One key file per test process, made once: tests run in parallel, and one reading the
    /// file while another was still writing it failed now and then.
    fn key_file() -> String {
        static KEY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        KEY.get_or_init(|| {
            let key = std::env::temp_dir().join(format!("tp-gw-cfg-{}.key", std::process::id()));
            shared::link::LinkKey::load_or_create(&key).expect("test link key");
            key.to_string_lossy().into_owned()
        })
        .clone()
    }

    #[test]
    fn example_file_is_the_defaults_and_reload_splits_keys() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/gateway.toml");
        // The example names /var/lib/tidepool/link.key; a flag wins over the file.
        let k = key_file();
        let c = Config::load(Args::parse_from([
            "g",
            "--config",
            path,
            "--link-secret-file",
            &k,
        ]))
        .unwrap();
        let d = Config::load(Args::parse_from(["g", "--link-secret-file", &k])).unwrap();
        assert_eq!(c.shutdown_timeout_ms, d.shutdown_timeout_ms);
        assert_eq!(c.client_idle_timeout_ms, 0);
        assert_eq!(c.idle_transaction_timeout_ms, 0);
        assert_eq!(c.log_level, "info");
        let mut new = c.clone();
        new.max_clients = 7;
        new.links_per_core = 9;
        new.client_idle_timeout_ms = 5;
        let (merged, live, restart) = c.reloaded(&new);
        assert_eq!(live, vec!["max_clients", "client_idle_timeout_ms"]);
        assert_eq!(restart, vec!["links_per_core"]);
        assert_eq!(merged.max_clients, 7);
        assert_eq!(merged.links_per_core, c.links_per_core, "needs a restart");
    }

    #[test]
    fn poolers_from_flags_and_file() {
        let k = key_file();
        let args = Args::parse_from([
            "g",
            "--link-secret-file",
            &k,
            "--pooler",
            "a:1,b:2",
            "--pooler",
            "c:3",
        ]);
        let c = Config::load(args).unwrap();
        assert_eq!(c.poolers, vec!["a:1", "b:2", "c:3"]);
        assert_eq!(c.failover_hold_ms, 10_000);
        assert_eq!(c.failover_hold_max, 10_000);
        assert!(c.guard_synchronous_commit);
        assert!(Config::load(Args::parse_from(["g"]))
            .unwrap_err()
            .contains("link_secret_file"));
        let c = Config::load(Args::parse_from(["g", "--link-secret-file", &k])).unwrap();
        assert_eq!(c.poolers, vec!["127.0.0.1:15433"]);
        let dir = std::env::temp_dir().join(format!("gw-cfg-{}", std::process::id()));
        std::fs::write(
            &dir,
            "pooler = \"x:1\"\npoolers = [\"y:2\"]\nguard_synchronous_commit = false\n",
        )
        .unwrap();
        let c = Config::load(Args::parse_from([
            "g",
            "--link-secret-file",
            &k,
            "--config",
            dir.to_str().unwrap(),
        ]))
        .unwrap();
        let _ = std::fs::remove_file(&dir);
        assert_eq!(c.poolers, vec!["x:1", "y:2"]);
        assert!(!c.guard_synchronous_commit);
    }
}
