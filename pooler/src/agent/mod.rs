//! The node agent: the pooler as the agent of its Postgres for the control process
//! (shared::agent: report, recruit, promote, follow, set_sync), the supervisor that restarts a
//! crashed Postgres, and the node's role as the links announce it to gateways.
//!
//! All of it runs on one plain thread (DESIGN.md: "one plain thread for node management"),
//! never on an executor: a current-thread tokio runtime whose timers bound every call to
//! Postgres and every pg_ctl/pg_rewind. Operations that change the node (everything but a
//! report) take `op` in turn; reports and the supervisor's probes do not wait for them.

mod archive;
mod ops;
mod pgctl;
mod postgres;
pub mod role;
mod server;
mod supervise;
mod term;

use crate::config::{AgentConfig, Config};
use pgctl::PgCtl;
use postgres::{PgError, Target};
use shared::agent::{AgentKey, Report, Role};
use std::cell::Cell;
use std::rc::Rc;
use std::time::{Duration, Instant};
use term::{Pledge, PledgeFile};

pub struct Agent {
    cfg: AgentConfig,
    /// The cluster's agent secret: whoever connects proves it first (server.rs).
    key: AgentKey,
    pg_port: u16,
    /// Addresses that are this node (a `Follow` to one of them is refused).
    own_hosts: Vec<String>,
    target: Target,
    pgctl: Option<PgCtl>,
    pledge_file: PledgeFile,
    pledge: Cell<Pledge>,
    /// Held by every operation that changes the node; the supervisor stays away meanwhile.
    op: tokio::sync::Mutex<()>,
}

/// Starts the agent thread when `agent_listen` is set; without it the node stays the
/// primary at term 0 (role::node's default) and nothing else runs.
pub fn start(cfg: &Config) -> Result<(), String> {
    let Some(listen) = cfg.agent.listen.clone() else {
        return Ok(());
    };
    let agent = Agent::new(cfg)?;
    // Bind now, so a bad address stops the pooler at start instead of leaving it agentless.
    let listener = std::net::TcpListener::bind(&listen)
        .map_err(|e| format!("agent cannot listen on {listen}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("agent listener: {e}"))?;
    std::thread::Builder::new()
        .name("pooler-agent".into())
        .spawn(move || {
            let rt = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(rt) => rt,
                Err(e) => {
                    tracing::error!(error = %e, "agent runtime failed; no node agent");
                    return;
                }
            };
            let local = tokio::task::LocalSet::new();
            local.block_on(&rt, async move {
                let agent = Rc::new(agent);
                tokio::task::spawn_local(supervise::run(agent.clone()));
                server::serve(agent, listener).await;
            });
        })
        .map_err(|e| format!("agent thread: {e}"))?;
    tracing::info!(listen = %listen, tls = cfg.agent.tls.is_some(), node = %cfg.agent.node_name, "node agent listening");
    Ok(())
}

impl Agent {
    fn new(cfg: &Config) -> Result<Agent, String> {
        let a = &cfg.agent;
        let state_dir = a
            .state_dir
            .clone()
            .ok_or("agent_listen needs state_dir or pg_data")?;
        let secret_file = a
            .secret_file
            .as_deref()
            .ok_or("agent_listen needs agent_secret_file")?;
        let key = AgentKey::load(secret_file).map_err(|e| format!("agent secret: {e}"))?;
        let pledge_file = PledgeFile::new(&state_dir);
        let pledge = pledge_file.load()?;
        tracing::info!(term = pledge.term, primary_term = pledge.primary_term, recruited = pledge.recruited, file = %pledge_file.path().display(), "pledge loaded");
        let mut own_hosts = vec![
            cfg.admin_socket_dir.clone(),
            cfg.pg_host.clone(),
            "127.0.0.1".into(),
            "localhost".into(),
            "::1".into(),
        ];
        own_hosts.dedup();
        Ok(Agent {
            key,
            cfg: a.clone(),
            pg_port: cfg.pg_port,
            own_hosts,
            target: Target {
                socket_dir: cfg.admin_socket_dir.clone(),
                port: cfg.pg_port,
                user: cfg.admin_user.clone(),
            },
            pgctl: a.pg_data.clone().map(|data| PgCtl {
                data,
                bin_dir: a.pg_bin_dir.clone(),
                log: std::cell::RefCell::new(a.pg_log.clone()),
                log_configured: a.pg_log_configured,
            }),
            pledge_file,
            pledge: Cell::new(pledge),
            op: tokio::sync::Mutex::new(()),
        })
    }

    fn pg_timeout(&self) -> Duration {
        Duration::from_millis(self.cfg.pg_timeout_ms)
    }

    fn wait(&self) -> Duration {
        Duration::from_millis(self.cfg.wait_ms)
    }

    /// A connection whose calls share one `agent_pg_timeout_ms` deadline from now.
    async fn connect(&self) -> Result<postgres::Conn, PgError> {
        self.target
            .connect(Instant::now() + self.pg_timeout())
            .await
    }

    /// Persists `p` before anything is answered; then it is the pledge in effect.
    fn persist(&self, p: Pledge) -> Result<(), String> {
        if p != self.pledge.get() {
            self.pledge_file.store(&p)?;
            self.pledge.set(p);
        }
        Ok(())
    }

    /// The node now: Postgres's own view within `agent_pg_timeout_ms`, or `Down` with why.
    /// Publishes the role to the links.
    async fn report(&self) -> Report {
        let observed = match self.connect().await {
            Ok(c) => c.observe().await,
            Err(e) => Err(e),
        };
        let pledge = self.pledge.get();
        let postgres_pid = match self.pgctl.as_ref().map(|c| c.postmaster()) {
            Some(pgctl::Postmaster::Running(pid)) if pid != 0 => Some(pid),
            _ => None,
        };
        let (o, problem) = match observed {
            Ok(o) => (o, None),
            Err(e) => {
                let why = match (&e, self.pgctl.as_ref().map(|c| c.postmaster())) {
                    (PgError::NotAnswering, _) => "not answering".to_string(),
                    (_, Some(pgctl::Postmaster::Stopped)) => format!("not running: {e}"),
                    (_, Some(pgctl::Postmaster::Crashed(pid))) => {
                        format!("crashed (postmaster {pid} is gone): {e}")
                    }
                    _ => e.to_string(),
                };
                (postgres::Observed::default(), Some(why))
            }
        };
        let postgres_pid = postgres_pid.or_else(|| {
            if o.data_directory.is_empty() {
                return None;
            }
            std::fs::read_to_string(std::path::Path::new(&o.data_directory).join("postmaster.pid"))
                .ok()
                .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
        });
        let primary_term = if o.role == Role::Primary {
            pledge.primary_term
        } else {
            0
        };
        // A fenced primary (recruited for a switchover) is no target for gateways.
        let routed = if o.role == Role::Primary && pledge.recruited {
            Role::Down
        } else {
            o.role
        };
        role::node().set(routed, primary_term);
        role::node().set_lsn(match routed {
            Role::Primary => o.flush_lsn.unwrap_or(0),
            Role::Standby if o.streaming => o.replay_lsn.unwrap_or(0),
            _ => 0,
        });
        Report {
            node: self.cfg.node_name.clone(),
            zone: self.cfg.zone.clone(),
            role: o.role,
            term: pledge.term,
            primary_term,
            timeline: o.timeline,
            flush_lsn: o.flush_lsn,
            replay_lsn: o.replay_lsn,
            streaming: o.streaming,
            receipt_age_ms: o.receipt_age_ms,
            upstream: o.upstream,
            replicas: o.replicas,
            postgres_pid,
            pg_port: self.pg_port,
            sync_names: o.sync_names,
            recruited: pledge.recruited,
            problem,
        }
    }
}
