//! Pooler configuration: one TOML file, every key optional, flags override it.

use clap::Parser;
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Parser, Debug, Default)]
#[command(
    name = "tidepool-pooler",
    about = "Tidepool pooler: pooled backends for one Postgres"
)]
pub struct Args {
    /// TOML configuration file (see config/pooler.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Address gateways connect their links to.
    #[arg(long)]
    pub listen: Option<String>,
    /// Executors (cores); default: all cores.
    #[arg(long)]
    pub cores: Option<usize>,
    /// Postgres host for user backends.
    #[arg(long)]
    pub pg_host: Option<String>,
    /// Postgres port.
    #[arg(long)]
    pub pg_port: Option<u16>,
    /// Directory of Postgres's Unix socket, for the admin connection (pg_authid lookups).
    #[arg(long)]
    pub admin_socket_dir: Option<String>,
    /// Role of the admin connection.
    #[arg(long)]
    pub admin_user: Option<String>,
    /// Backend budget per (user, database), whole pooler.
    #[arg(long)]
    pub pool_size: Option<usize>,
    /// Total backend budget, whole pooler.
    #[arg(long)]
    pub max_backends: Option<usize>,
    /// Largest message accepted from a client or a backend, in bytes.
    #[arg(long)]
    pub max_message_size: Option<usize>,
    /// Seconds a looked-up role verifier is reused.
    #[arg(long)]
    pub auth_cache_seconds: Option<u64>,
    /// Seconds to wait for a new backend connection.
    #[arg(long)]
    pub connect_timeout_seconds: Option<u64>,
    /// Protocol-level statements kept prepared per backend (least recently used closed beyond).
    #[arg(long)]
    pub max_prepared_statements: Option<usize>,
    /// Seconds a login Postgres accepted is reused for the same (user, database, settings)
    /// without a backend round trip (0: every login goes to a backend).
    #[arg(long)]
    pub login_cache_seconds: Option<u64>,
    /// Microseconds an idle executor spins before it sleeps (0: sleep at once).
    #[arg(long)]
    pub spin_before_park_us: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
#[serde(deny_unknown_fields)]
struct File {
    listen: Option<String>,
    cores: Option<usize>,
    pg_host: Option<String>,
    pg_port: Option<u16>,
    admin_socket_dir: Option<String>,
    admin_user: Option<String>,
    pool_size: Option<usize>,
    max_backends: Option<usize>,
    max_message_size: Option<usize>,
    auth_cache_seconds: Option<u64>,
    connect_timeout_seconds: Option<u64>,
    max_prepared_statements: Option<usize>,
    spin_before_park_us: Option<u64>,
    login_cache_seconds: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub cores: usize,
    pub pg_host: String,
    pub pg_port: u16,
    pub admin_socket_dir: String,
    pub admin_user: String,
    pub pool_size: usize,
    pub max_backends: usize,
    pub max_message_size: usize,
    pub auth_cache_seconds: u64,
    pub connect_timeout_seconds: u64,
    pub max_prepared_statements: usize,
    pub spin_before_park_us: u64,
    pub login_cache_seconds: u64,
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
        let cores = args
            .cores
            .or(file.cores)
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
            .max(1);
        let c = Config {
            spin_before_park_us: args
                .spin_before_park_us
                .or(file.spin_before_park_us)
                .unwrap_or(50),
            listen: args
                .listen
                .or(file.listen)
                .unwrap_or_else(|| "127.0.0.1:15433".into()),
            cores,
            pg_host: args
                .pg_host
                .or(file.pg_host)
                .unwrap_or_else(|| "127.0.0.1".into()),
            pg_port: args.pg_port.or(file.pg_port).unwrap_or(5432),
            admin_socket_dir: args
                .admin_socket_dir
                .or(file.admin_socket_dir)
                .unwrap_or_else(|| "/var/run/postgresql".into()),
            admin_user: args
                .admin_user
                .or(file.admin_user)
                .unwrap_or_else(|| "postgres".into()),
            pool_size: args.pool_size.or(file.pool_size).unwrap_or(20).max(1),
            max_backends: args
                .max_backends
                .or(file.max_backends)
                .unwrap_or(100)
                .max(1),
            max_message_size: args
                .max_message_size
                .or(file.max_message_size)
                .unwrap_or(64 << 20),
            auth_cache_seconds: args
                .auth_cache_seconds
                .or(file.auth_cache_seconds)
                .unwrap_or(10),
            connect_timeout_seconds: args
                .connect_timeout_seconds
                .or(file.connect_timeout_seconds)
                .unwrap_or(10),
            login_cache_seconds: args
                .login_cache_seconds
                .or(file.login_cache_seconds)
                .unwrap_or(10),
            max_prepared_statements: args
                .max_prepared_statements
                .or(file.max_prepared_statements)
                .unwrap_or(500)
                .max(1),
        };
        Ok(c)
    }
}
