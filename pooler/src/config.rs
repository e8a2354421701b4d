//! Pooler configuration: one TOML file, every key optional, flags override it.

use clap::Parser;
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Parser, Debug, Default, Clone)]
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
    /// Backends one user may have over all its databases, whole pooler (PgBouncer's
    /// max_user_connections; 0: no limit).
    #[arg(long)]
    pub max_user_connections: Option<usize>,
    /// Backends one database may have over all its users, whole pooler (PgBouncer's
    /// max_db_connections; 0: no limit).
    #[arg(long)]
    pub max_db_connections: Option<usize>,
    /// Largest message accepted from a client or a backend, in bytes.
    #[arg(long)]
    pub max_message_size: Option<usize>,
    /// Seconds a looked-up role verifier is reused.
    #[arg(long)]
    pub auth_cache_seconds: Option<u64>,
    /// Milliseconds a role found absent (unknown, no password, expired) is remembered as such.
    #[arg(long)]
    pub auth_negative_cache_ms: Option<u64>,
    /// Milliseconds a role lookup may take, waiting included, before the login is refused.
    #[arg(long)]
    pub auth_lookup_timeout_ms: Option<u64>,
    /// Seconds to wait for a new backend connection.
    #[arg(long)]
    pub connect_timeout_seconds: Option<u64>,
    /// Protocol-level statements kept prepared per backend (least recently used closed beyond).
    #[arg(long)]
    pub max_prepared_statements: Option<usize>,
    /// Bytes of prepared statements one client session may hold (names, texts and about 128
    /// bytes of bookkeeping each); past it a new one gets SQLSTATE 54000.
    #[arg(long)]
    pub max_session_statement_bytes: Option<usize>,
    /// Bytes of prepared statements all sessions of one user may hold together, counted as for
    /// max_session_statement_bytes; past it a new one gets SQLSTATE 54000.
    #[arg(long)]
    pub max_user_statement_bytes: Option<usize>,
    /// Seconds a login Postgres accepted is reused for the same (user, database, settings)
    /// without a backend round trip (0: every login goes to a backend).
    #[arg(long)]
    pub login_cache_seconds: Option<u64>,
    /// Milliseconds a session keeps its backend after `nextval`/`setval`, waiting for its next
    /// request (so a `currval` right after meets its value). 0: no lease.
    #[arg(long)]
    pub sequence_lease_ms: Option<u64>,
    /// Milliseconds the role and database defaults (`ALTER ROLE|DATABASE … SET`) read for new
    /// sessions are reused: a change made other than through this pooler reaches new sessions
    /// within this time (one made through it, at once).
    #[arg(long)]
    pub role_settings_cache_ms: Option<u64>,
    /// Microseconds an idle executor spins before it sleeps (0: sleep at once).
    #[arg(long)]
    pub spin_before_park_us: Option<u64>,
    /// This node's name (standbys stream with it as application_name).
    #[arg(long)]
    pub node_name: Option<String>,
    /// This node's zone (for durability policies).
    #[arg(long)]
    pub zone: Option<String>,
    /// Address of the node agent (empty: no agent).
    #[arg(long)]
    pub agent_listen: Option<String>,
    /// Postgres data directory (supervision, rewind, postmaster.pid).
    #[arg(long)]
    pub pg_data: Option<PathBuf>,
    /// Directory of pg_ctl, pg_rewind, postgres.
    #[arg(long)]
    pub pg_bin_dir: Option<PathBuf>,
    /// Where the pledged term is kept (default: the parent of pg_data).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Restart Postgres after a crash (default: on when pg_data is set).
    #[arg(long)]
    pub supervise: Option<bool>,
    /// Role standbys stream as and pg_rewind connects as.
    #[arg(long)]
    pub replication_user: Option<String>,
    /// Bound on every SQL call the agent makes to its Postgres, in milliseconds.
    #[arg(long)]
    pub agent_pg_timeout_ms: Option<u64>,
    /// Bound on the agent's waits inside one operation (a recruit's replay catch-up, a
    /// primary's drain, pg_ctl, pg_rewind), in milliseconds.
    #[arg(long)]
    pub agent_wait_ms: Option<u64>,
    /// Log file of a Postgres the agent starts (default: postgres.log beside pg_data).
    #[arg(long)]
    pub pg_log: Option<PathBuf>,
    /// File holding the agent secret (64 hex digits, mode 600; `tidepool up` writes
    /// DIR/agent.key): the control process must prove it holds it, and so must the agent.
    /// Required with agent_listen. The secret itself is never a flag.
    #[arg(long)]
    pub agent_secret_file: Option<PathBuf>,
    /// On SIGTERM, milliseconds transactions in progress may take to finish before their
    /// sessions are ended anyway.
    #[arg(long)]
    pub shutdown_timeout_ms: Option<u64>,
    /// Milliseconds a request may wait for a backend before its session is ended with
    /// "query_wait_timeout" (PgBouncer's query_wait_timeout; 0: wait for ever).
    #[arg(long)]
    pub query_wait_timeout_ms: Option<u64>,
    /// Milliseconds after which an idle backend is closed rather than reused (PgBouncer's
    /// server_lifetime; 0: never).
    #[arg(long)]
    pub server_lifetime_ms: Option<u64>,
    /// Milliseconds a backend may stay idle in the pool before it is closed (PgBouncer's
    /// server_idle_timeout; 0: never).
    #[arg(long)]
    pub server_idle_timeout_ms: Option<u64>,
    /// Log filter (`info`, `debug`, `warn,tidepool_pooler=debug`); RUST_LOG wins at start.
    #[arg(long)]
    pub log_level: Option<String>,
    /// Address of the Prometheus/OpenMetrics endpoint (`GET /metrics`); off when unset.
    #[arg(long)]
    pub metrics_listen: Option<String>,
    /// File holding the link secret (64 hex digits, mode 600; `tidepool up` writes
    /// DIR/link.key): a gateway must prove it holds it before the link answers anything, and
    /// the pooler proves it back. Required. The secret itself is never a flag.
    #[arg(long)]
    pub link_secret_file: Option<PathBuf>,
    /// TLS on backend connections to Postgres: disable (default), prefer, require or
    /// verify-full (see server_tls.rs).
    #[arg(long)]
    pub server_tls_sslmode: Option<String>,
    /// PEM file of the CA(s) Postgres's certificate must chain to (verify-full).
    #[arg(long)]
    pub server_tls_ca_file: Option<PathBuf>,
    /// PEM certificate (chain) of the link listener, issued by the CA gateways check
    /// (`link_tls_ca`) for the address they dial. With it the link accepts TLS only.
    #[arg(long)]
    pub link_tls_cert: Option<PathBuf>,
    /// PEM private key of `link_tls_cert` (mode 600).
    #[arg(long)]
    pub link_tls_key: Option<PathBuf>,
    /// Let the link listen on an address other hosts may reach without TLS (a trusted network).
    #[arg(long)]
    pub link_insecure_non_loopback: Option<bool>,
    /// PEM certificate (chain) of the node agent, issued by the CA the control process checks.
    /// With it the agent accepts TLS only.
    #[arg(long)]
    pub agent_tls_cert: Option<PathBuf>,
    /// PEM private key of `agent_tls_cert` (mode 600).
    #[arg(long)]
    pub agent_tls_key: Option<PathBuf>,
    /// Let the agent listen on an address other hosts may reach without TLS.
    #[arg(long)]
    pub agent_insecure_non_loopback: Option<bool>,
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
    max_user_connections: Option<usize>,
    max_db_connections: Option<usize>,
    max_message_size: Option<usize>,
    auth_cache_seconds: Option<u64>,
    auth_negative_cache_ms: Option<u64>,
    auth_lookup_timeout_ms: Option<u64>,
    connect_timeout_seconds: Option<u64>,
    max_prepared_statements: Option<usize>,
    max_session_statement_bytes: Option<usize>,
    max_user_statement_bytes: Option<usize>,
    spin_before_park_us: Option<u64>,
    login_cache_seconds: Option<u64>,
    sequence_lease_ms: Option<u64>,
    role_settings_cache_ms: Option<u64>,
    node_name: Option<String>,
    zone: Option<String>,
    agent_listen: Option<String>,
    pg_data: Option<PathBuf>,
    pg_bin_dir: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    supervise: Option<bool>,
    replication_user: Option<String>,
    agent_pg_timeout_ms: Option<u64>,
    agent_wait_ms: Option<u64>,
    pg_log: Option<PathBuf>,
    agent_secret_file: Option<PathBuf>,
    shutdown_timeout_ms: Option<u64>,
    query_wait_timeout_ms: Option<u64>,
    server_lifetime_ms: Option<u64>,
    server_idle_timeout_ms: Option<u64>,
    log_level: Option<String>,
    link_secret_file: Option<PathBuf>,
    metrics_listen: Option<String>,
    server_tls_sslmode: Option<String>,
    server_tls_ca_file: Option<PathBuf>,
    link_tls_cert: Option<PathBuf>,
    link_tls_key: Option<PathBuf>,
    link_insecure_non_loopback: Option<bool>,
    agent_tls_cert: Option<PathBuf>,
    agent_tls_key: Option<PathBuf>,
    agent_insecure_non_loopback: Option<bool>,
}

/// What the node agent needs (see config/pooler.toml, "Node agent").
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node_name: String,
    pub zone: String,
    /// `None`: no agent; the pooler reports its node as a primary at term 0.
    pub listen: Option<String>,
    pub pg_data: Option<PathBuf>,
    pub pg_bin_dir: PathBuf,
    pub state_dir: Option<PathBuf>,
    pub supervise: bool,
    pub replication_user: String,
    pub pg_timeout_ms: u64,
    pub wait_ms: u64,
    pub pg_log: Option<PathBuf>,
    /// `pg_log` was given (else it is a default the running postmaster's log replaces).
    pub pg_log_configured: bool,
    /// The agent secret's file (required with `listen`).
    pub secret_file: Option<PathBuf>,
    /// The agent's certificate (`agent_tls_cert`/`agent_tls_key`): TLS only; `None`: plain.
    pub tls: Option<shared::tls::Identity>,
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    /// The link secret (`link_secret_file`): gateways prove it before the link answers.
    pub link_key: shared::link::LinkKey,
    /// The link's certificate (`link_tls_cert`/`link_tls_key`): gateways must speak TLS;
    /// `None`: plain TCP (on loopback, or with `link_insecure_non_loopback`).
    pub link_tls: Option<shared::tls::Identity>,
    pub cores: usize,
    pub pg_host: String,
    pub pg_port: u16,
    pub admin_socket_dir: String,
    pub admin_user: String,
    pub pool_size: usize,
    pub max_backends: usize,
    /// 0: no limit.
    pub max_user_connections: usize,
    /// 0: no limit.
    pub max_db_connections: usize,
    pub max_message_size: usize,
    pub auth_cache_seconds: u64,
    pub auth_negative_cache_ms: u64,
    pub auth_lookup_timeout_ms: u64,
    pub connect_timeout_seconds: u64,
    pub max_prepared_statements: usize,
    pub max_session_statement_bytes: usize,
    pub max_user_statement_bytes: usize,
    pub spin_before_park_us: u64,
    pub login_cache_seconds: u64,
    pub sequence_lease_ms: u64,
    pub role_settings_cache_ms: u64,
    pub shutdown_timeout_ms: u64,
    /// 0: wait for ever.
    pub query_wait_timeout_ms: u64,
    /// 0: never.
    pub server_lifetime_ms: u64,
    /// 0: never.
    pub server_idle_timeout_ms: u64,
    pub log_level: String,
    pub agent: AgentConfig,
    /// Prometheus endpoint address; `None`: off.
    pub metrics_listen: Option<String>,
    /// TLS towards Postgres (`server_tls_sslmode`); `None`: disable.
    pub server_tls: Option<crate::server_tls::ServerTls>,
}

/// The config in force on a core: a reload (SIGHUP) swaps it. Shared by the parts of a core that
/// read limits and timeouts (core.rs, pool.rs).
pub struct Live(std::cell::RefCell<std::rc::Rc<Config>>);

impl Live {
    pub fn new(cfg: std::rc::Rc<Config>) -> Live {
        Live(std::cell::RefCell::new(cfg))
    }

    pub fn get(&self) -> std::rc::Rc<Config> {
        self.0.borrow().clone()
    }

    pub fn set(&self, cfg: std::rc::Rc<Config>) {
        *self.0.borrow_mut() = cfg;
    }
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
        let pg_data = args.pg_data.or(file.pg_data);
        let state_dir = args
            .state_dir
            .or(file.state_dir)
            .or_else(|| pg_data.as_ref().and_then(|d| d.parent().map(PathBuf::from)));
        let pg_log = args.pg_log.or(file.pg_log);
        let pg_log_configured = pg_log.is_some();
        let pg_log = pg_log.or_else(|| {
            pg_data
                .as_ref()
                .and_then(|d| d.parent().map(|p| p.join("postgres.log")))
        });
        let agent = AgentConfig {
            node_name: args
                .node_name
                .or(file.node_name)
                .unwrap_or_else(|| "node1".into()),
            zone: args.zone.or(file.zone).unwrap_or_else(|| "default".into()),
            listen: args
                .agent_listen
                .or(file.agent_listen)
                .filter(|a| !a.trim().is_empty()),
            supervise: args
                .supervise
                .or(file.supervise)
                .unwrap_or(pg_data.is_some()),
            pg_data,
            pg_bin_dir: args
                .pg_bin_dir
                .or(file.pg_bin_dir)
                .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin")),
            state_dir,
            replication_user: args
                .replication_user
                .or(file.replication_user)
                .unwrap_or_else(|| "postgres".into()),
            pg_timeout_ms: args
                .agent_pg_timeout_ms
                .or(file.agent_pg_timeout_ms)
                .unwrap_or(1000)
                .max(1),
            wait_ms: args
                .agent_wait_ms
                .or(file.agent_wait_ms)
                .unwrap_or(10_000)
                .max(1),
            pg_log,
            pg_log_configured,
            secret_file: args.agent_secret_file.or(file.agent_secret_file),
            tls: shared::tls::Identity::load(
                "agent_tls",
                args.agent_tls_cert.or(file.agent_tls_cert),
                args.agent_tls_key.or(file.agent_tls_key),
            )?,
        };
        if let Some(listen) = &agent.listen {
            shared::tls::check_exposure(
                "agent",
                listen,
                agent.tls.is_some(),
                args.agent_insecure_non_loopback
                    .or(file.agent_insecure_non_loopback)
                    .unwrap_or(false),
            )?;
        }
        if agent.listen.is_some() && agent.state_dir.is_none() {
            return Err(
                "agent_listen needs state_dir or pg_data (where the pledged term is kept)".into(),
            );
        }
        if agent.listen.is_some() && agent.secret_file.is_none() {
            return Err(
                "agent_listen needs agent_secret_file: the agent answers only to whoever holds \
                 the cluster's agent secret"
                    .into(),
            );
        }
        let link_secret_file = args.link_secret_file.or(file.link_secret_file).ok_or(
            "link_secret_file is required: gateways must prove they hold the cluster's link secret",
        )?;
        let link_key = shared::link::LinkKey::load(&link_secret_file)
            .map_err(|e| format!("link secret: {e}"))?;
        let pg_host = args
            .pg_host
            .or(file.pg_host)
            .unwrap_or_else(|| "127.0.0.1".into());
        let server_tls = crate::server_tls::ServerTls::new(
            args.server_tls_sslmode
                .or(file.server_tls_sslmode)
                .as_deref()
                .unwrap_or("disable")
                .parse()?,
            args.server_tls_ca_file
                .or(file.server_tls_ca_file)
                .as_deref(),
            &pg_host,
        )?;
        let listen = args
            .listen
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:15433".into());
        let link_tls = shared::tls::Identity::load(
            "link_tls",
            args.link_tls_cert.or(file.link_tls_cert),
            args.link_tls_key.or(file.link_tls_key),
        )?;
        shared::tls::check_exposure(
            "link",
            &listen,
            link_tls.is_some(),
            args.link_insecure_non_loopback
                .or(file.link_insecure_non_loopback)
                .unwrap_or(false),
        )?;
        let c = Config {
            server_tls,
            link_key,
            link_tls,
            agent,
            spin_before_park_us: args
                .spin_before_park_us
                .or(file.spin_before_park_us)
                .unwrap_or(50),
            listen,
            cores,
            pg_host,
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
            max_user_connections: args
                .max_user_connections
                .or(file.max_user_connections)
                .unwrap_or(0),
            max_db_connections: args
                .max_db_connections
                .or(file.max_db_connections)
                .unwrap_or(0),
            max_message_size: args
                .max_message_size
                .or(file.max_message_size)
                .unwrap_or(64 << 20),
            auth_cache_seconds: args
                .auth_cache_seconds
                .or(file.auth_cache_seconds)
                .unwrap_or(10),
            auth_negative_cache_ms: args
                .auth_negative_cache_ms
                .or(file.auth_negative_cache_ms)
                .unwrap_or(1000),
            auth_lookup_timeout_ms: args
                .auth_lookup_timeout_ms
                .or(file.auth_lookup_timeout_ms)
                .unwrap_or(5000)
                .max(1),
            connect_timeout_seconds: args
                .connect_timeout_seconds
                .or(file.connect_timeout_seconds)
                .unwrap_or(10),
            login_cache_seconds: args
                .login_cache_seconds
                .or(file.login_cache_seconds)
                .unwrap_or(10),
            sequence_lease_ms: args
                .sequence_lease_ms
                .or(file.sequence_lease_ms)
                .unwrap_or(100),
            role_settings_cache_ms: args
                .role_settings_cache_ms
                .or(file.role_settings_cache_ms)
                .unwrap_or(1000),
            max_prepared_statements: args
                .max_prepared_statements
                .or(file.max_prepared_statements)
                .unwrap_or(500)
                .max(1),
            max_session_statement_bytes: args
                .max_session_statement_bytes
                .or(file.max_session_statement_bytes)
                .unwrap_or(64 << 20)
                .max(1024),
            // Four sessions at their own bound, or (counted per session, as each session pays
            // for every statement it names even where sessions share one text) about 2,000
            // sessions of one user holding 100 statements of 1 KiB each: what the pooler may
            // spend on one user's statements before a runaway client of that user is refused
            // rather than the pooler's memory grown for it.
            max_user_statement_bytes: args
                .max_user_statement_bytes
                .or(file.max_user_statement_bytes)
                .unwrap_or(256 << 20)
                .max(1024),
            shutdown_timeout_ms: args
                .shutdown_timeout_ms
                .or(file.shutdown_timeout_ms)
                .unwrap_or(30_000),
            query_wait_timeout_ms: args
                .query_wait_timeout_ms
                .or(file.query_wait_timeout_ms)
                .unwrap_or(120_000),
            server_lifetime_ms: args
                .server_lifetime_ms
                .or(file.server_lifetime_ms)
                .unwrap_or(3_600_000),
            server_idle_timeout_ms: args
                .server_idle_timeout_ms
                .or(file.server_idle_timeout_ms)
                .unwrap_or(600_000),
            log_level: args
                .log_level
                .or(file.log_level)
                .unwrap_or_else(|| "info".into()),
            metrics_listen: args.metrics_listen.or(file.metrics_listen),
        };
        Ok(c)
    }

    /// The backend budgets (budget.rs) this config sets.
    pub fn limits(&self) -> crate::budget::Limits {
        crate::budget::Limits {
            pool_size: self.pool_size,
            max_total: self.max_backends,
            per_user: self.max_user_connections,
            per_database: self.max_db_connections,
        }
    }

    /// The config in force after a reload: `new` (the file read again, under the same flags)
    /// for what can change live, `self` for the rest. Returns it with the keys that changed
    /// live and those that changed in the file but need a restart.
    pub fn reloaded(&self, new: &Config) -> (Config, Vec<&'static str>, Vec<&'static str>) {
        let s = |v: &dyn std::fmt::Debug| format!("{v:?}");
        let live = shared::lifecycle::changes(&[
            ("pool_size", s(&self.pool_size), s(&new.pool_size)),
            ("max_backends", s(&self.max_backends), s(&new.max_backends)),
            (
                "max_user_connections",
                s(&self.max_user_connections),
                s(&new.max_user_connections),
            ),
            (
                "max_db_connections",
                s(&self.max_db_connections),
                s(&new.max_db_connections),
            ),
            (
                "connect_timeout_seconds",
                s(&self.connect_timeout_seconds),
                s(&new.connect_timeout_seconds),
            ),
            (
                "max_prepared_statements",
                s(&self.max_prepared_statements),
                s(&new.max_prepared_statements),
            ),
            (
                "max_session_statement_bytes",
                s(&self.max_session_statement_bytes),
                s(&new.max_session_statement_bytes),
            ),
            (
                "max_user_statement_bytes",
                s(&self.max_user_statement_bytes),
                s(&new.max_user_statement_bytes),
            ),
            (
                "login_cache_seconds",
                s(&self.login_cache_seconds),
                s(&new.login_cache_seconds),
            ),
            (
                "sequence_lease_ms",
                s(&self.sequence_lease_ms),
                s(&new.sequence_lease_ms),
            ),
            (
                "shutdown_timeout_ms",
                s(&self.shutdown_timeout_ms),
                s(&new.shutdown_timeout_ms),
            ),
            (
                "query_wait_timeout_ms",
                s(&self.query_wait_timeout_ms),
                s(&new.query_wait_timeout_ms),
            ),
            (
                "server_lifetime_ms",
                s(&self.server_lifetime_ms),
                s(&new.server_lifetime_ms),
            ),
            (
                "server_idle_timeout_ms",
                s(&self.server_idle_timeout_ms),
                s(&new.server_idle_timeout_ms),
            ),
            ("log_level", s(&self.log_level), s(&new.log_level)),
        ]);
        let restart = shared::lifecycle::changes(&[
            ("listen", s(&self.listen), s(&new.listen)),
            ("link_tls", s(&self.link_tls), s(&new.link_tls)),
            (
                "metrics_listen",
                s(&self.metrics_listen),
                s(&new.metrics_listen),
            ),
            ("cores", s(&self.cores), s(&new.cores)),
            ("pg_host", s(&self.pg_host), s(&new.pg_host)),
            ("server_tls", s(&self.server_tls), s(&new.server_tls)),
            ("pg_port", s(&self.pg_port), s(&new.pg_port)),
            (
                "admin_socket_dir",
                s(&self.admin_socket_dir),
                s(&new.admin_socket_dir),
            ),
            ("admin_user", s(&self.admin_user), s(&new.admin_user)),
            (
                "max_message_size",
                s(&self.max_message_size),
                s(&new.max_message_size),
            ),
            (
                "auth_cache_seconds",
                s(&self.auth_cache_seconds),
                s(&new.auth_cache_seconds),
            ),
            (
                "auth_negative_cache_ms",
                s(&self.auth_negative_cache_ms),
                s(&new.auth_negative_cache_ms),
            ),
            (
                "auth_lookup_timeout_ms",
                s(&self.auth_lookup_timeout_ms),
                s(&new.auth_lookup_timeout_ms),
            ),
            (
                "role_settings_cache_ms",
                s(&self.role_settings_cache_ms),
                s(&new.role_settings_cache_ms),
            ),
            (
                "spin_before_park_us",
                s(&self.spin_before_park_us),
                s(&new.spin_before_park_us),
            ),
            ("agent", s(&self.agent), s(&new.agent)),
        ]);
        let merged = Config {
            pool_size: new.pool_size,
            max_backends: new.max_backends,
            max_user_connections: new.max_user_connections,
            max_db_connections: new.max_db_connections,
            connect_timeout_seconds: new.connect_timeout_seconds,
            max_prepared_statements: new.max_prepared_statements,
            max_session_statement_bytes: new.max_session_statement_bytes,
            max_user_statement_bytes: new.max_user_statement_bytes,
            login_cache_seconds: new.login_cache_seconds,
            sequence_lease_ms: new.sequence_lease_ms,
            shutdown_timeout_ms: new.shutdown_timeout_ms,
            query_wait_timeout_ms: new.query_wait_timeout_ms,
            server_lifetime_ms: new.server_lifetime_ms,
            server_idle_timeout_ms: new.server_idle_timeout_ms,
            log_level: new.log_level.clone(),
            ..self.clone()
        };
        (merged, live, restart)
    }
}

/// A config as unit tests need one: `args` as flags, with a link key made for the test process.
#[cfg(test)]
pub fn for_tests(args: &[&str]) -> Result<Config, String> {
    let key = std::env::temp_dir().join(format!("tp-pooler-cfg-{}.key", std::process::id()));
    let _ = shared::link::LinkKey::load_or_create(&key);
    let key = key.to_string_lossy().into_owned();
    let mut all = vec!["tidepool-pooler", "--link-secret-file", &key];
    all.extend_from_slice(args);
    Config::load(Args::try_parse_from(all).map_err(|e| e.to_string())?)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(args: &[&str]) -> Result<Config, String> {
        for_tests(args)
    }

    #[test]
    fn example_file_is_the_defaults_and_reload_splits_keys() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../config/pooler.toml");
        let c = load(&["--config", path]).unwrap();
        let d = load(&[]).unwrap();
        for (a, b) in [
            (c.query_wait_timeout_ms, d.query_wait_timeout_ms),
            (c.server_lifetime_ms, d.server_lifetime_ms),
            (c.server_idle_timeout_ms, d.server_idle_timeout_ms),
            (c.shutdown_timeout_ms, d.shutdown_timeout_ms),
        ] {
            assert_eq!(a, b);
        }
        for (a, b) in [
            (c.max_user_connections, d.max_user_connections),
            (c.max_db_connections, d.max_db_connections),
            (c.max_user_statement_bytes, d.max_user_statement_bytes),
        ] {
            assert_eq!(a, b);
        }
        let mut new = c.clone();
        new.pool_size = 3;
        new.pg_port = 1;
        let (merged, live, restart) = c.reloaded(&new);
        assert_eq!(live, vec!["pool_size"]);
        assert_eq!(restart, vec!["pg_port"]);
        assert_eq!(merged.pool_size, 3);
        assert_eq!(merged.pg_port, c.pg_port);

        let mut new = c.clone();
        new.max_user_connections = 3;
        new.max_db_connections = 4;
        new.max_user_statement_bytes = 1 << 20;
        let (merged, live, restart) = c.reloaded(&new);
        assert_eq!(
            live,
            vec![
                "max_user_connections",
                "max_db_connections",
                "max_user_statement_bytes"
            ]
        );
        assert!(restart.is_empty());
        assert_eq!(
            (merged.limits().per_user, merged.limits().per_database),
            (3, 4)
        );
        assert_eq!(merged.max_user_statement_bytes, 1 << 20);
    }

    #[test]
    fn agent_defaults_and_flags() {
        let c = load(&[]).unwrap();
        assert!(c.agent.listen.is_none());
        assert!(!c.agent.supervise);
        assert_eq!(c.agent.node_name, "node1");
        assert_eq!(c.agent.zone, "default");
        assert_eq!(c.agent.replication_user, "postgres");
        assert_eq!(c.agent.pg_timeout_ms, 1000);

        let c = load(&[
            "--agent-listen",
            "127.0.0.1:9",
            "--pg-data",
            "/srv/n1/data",
            "--agent-secret-file",
            "/srv/agent.key",
        ])
        .unwrap();
        assert!(c.agent.supervise, "on by default with pg_data");
        assert_eq!(c.agent.state_dir, Some(PathBuf::from("/srv/n1")));
        assert_eq!(c.agent.pg_log, Some(PathBuf::from("/srv/n1/postgres.log")));
        assert!(!c.agent.pg_log_configured);

        let c = load(&[
            "--agent-listen",
            "127.0.0.1:9",
            "--pg-data",
            "/srv/n1/data",
            "--supervise",
            "false",
            "--state-dir",
            "/var/tp",
            "--agent-secret-file",
            "/srv/agent.key",
        ])
        .unwrap();
        assert!(!c.agent.supervise);
        assert_eq!(c.agent.state_dir, Some(PathBuf::from("/var/tp")));

        // An agent needs somewhere to keep its pledge, and the secret.
        assert!(load(&["--agent-listen", "127.0.0.1:9", "--agent-secret-file", "/k"]).is_err());
        assert!(
            load(&["--agent-listen", "127.0.0.1:9", "--pg-data", "/srv/n1/data"])
                .unwrap_err()
                .contains("agent_secret_file")
        );
        // No link secret: no pooler.
        assert!(
            Config::load(Args::try_parse_from(["tidepool-pooler"]).unwrap())
                .unwrap_err()
                .contains("link_secret_file")
        );
        // Off loopback without TLS: refused, unless the network is declared trusted.
        let err = load(&["--listen", "0.0.0.0:15433"]).unwrap_err();
        assert!(err.contains("link_insecure_non_loopback"), "{err}");
        assert!(load(&[
            "--listen",
            "0.0.0.0:15433",
            "--link-insecure-non-loopback",
            "true"
        ])
        .is_ok());
        let err = load(&[
            "--agent-listen",
            "[::]:9",
            "--pg-data",
            "/srv/n1/data",
            "--agent-secret-file",
            "/srv/agent.key",
        ])
        .unwrap_err();
        assert!(err.contains("agent_insecure_non_loopback"), "{err}");
        assert!(load(&["--link-tls-cert", "/c.pem"])
            .unwrap_err()
            .contains("link_tls_cert and link_tls_key go together"));
        // Empty address: no agent.
        assert!(load(&["--agent-listen", ""])
            .unwrap()
            .agent
            .listen
            .is_none());
    }
}
