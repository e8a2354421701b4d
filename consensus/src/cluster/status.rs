//! `tidepool status`: each process of the cluster, its pid, address and state.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Serialize;

use crate::cli::{GlobalArgs, StatusArgs};
use crate::cluster::Context;
use crate::error::{Error, Result};
use crate::process::{accepts, liveness, Liveness};
use crate::state::{Role, State};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ProcessState {
    #[serde(rename = "running/accepting")]
    Accepting,
    #[serde(rename = "running/not accepting")]
    NotAccepting,
    #[serde(rename = "dead")]
    Dead,
}

impl ProcessState {
    pub fn as_str(self) -> &'static str {
        match self {
            ProcessState::Accepting => "running/accepting",
            ProcessState::NotAccepting => "running/not accepting",
            ProcessState::Dead => "dead",
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct ProcessStatus {
    pub name: Role,
    /// The live pid; `None` when dead.
    pub pid: Option<u32>,
    pub address: SocketAddr,
    pub state: ProcessState,
    pub running: bool,
    pub accepting: bool,
    pub log: PathBuf,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub dir: PathBuf,
    pub data_dir: PathBuf,
    pub processes: Vec<ProcessStatus>,
    /// Every process running and accepting (and, with standbys, every node answering).
    pub healthy: bool,
    /// With standbys: each node as its agent reports it.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub nodes: Vec<NodeStatus>,
    /// With standbys: the control process's term and primary (`topology.json`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topology: Option<crate::topology::Topology>,
    /// With a backup schedule: its last success and failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub backup_schedule: Option<crate::backup::schedule::Record>,
}

#[derive(Debug, Clone, Serialize)]
pub struct NodeStatus {
    pub name: String,
    pub zone: String,
    pub role: String,
    pub term: Option<u64>,
    pub primary_term: Option<u64>,
    pub timeline: Option<u32>,
    /// WAL position: the primary's flush position, a standby's replay position.
    pub lsn: Option<String>,
    /// Bytes of WAL a standby has yet to replay, against the primary.
    pub lag_bytes: Option<u64>,
    pub streaming: Option<bool>,
    pub health: String,
    pub postgres_pid: Option<u32>,
    pub pg_port: u16,
    pub pooler: SocketAddr,
    pub agent: SocketAddr,
}

/// Asks every node agent for its report (one second each at most).
pub fn inspect_nodes(state: &State) -> Vec<NodeStatus> {
    use shared::agent::{call_with, format_lsn, Request, Response, Role as NodeRole};
    let key =
        super::agent_access_with(&state.dir, &state.agent_key_path()).map_err(|e| e.to_string());
    let reports: Vec<Result<Response, String>> = state
        .nodes
        .iter()
        .map(|n| {
            let key = key.as_ref().map_err(Clone::clone)?;
            call_with(
                n.agent,
                key,
                &Request::Report,
                std::time::Duration::from_secs(1),
            )
            .map_err(|e| e.to_string())
        })
        .collect();
    let primary_lsn = reports.iter().find_map(|r| match r {
        Ok(Response::Ok { report }) if report.role == NodeRole::Primary => report.flush_lsn,
        _ => None,
    });
    state
        .nodes
        .iter()
        .zip(reports)
        .map(|(n, r)| {
            let mut s = NodeStatus {
                name: n.name.clone(),
                zone: n.zone.clone(),
                role: "unknown".into(),
                term: None,
                primary_term: None,
                timeline: None,
                lsn: None,
                lag_bytes: None,
                streaming: None,
                health: String::new(),
                postgres_pid: crate::postgres::running_postmaster(&n.data_dir).map(|(p, _)| p),
                pg_port: n.pg_port,
                pooler: n.pooler,
                agent: n.agent,
            };
            match r {
                Ok(Response::Ok { report })
                | Ok(Response::Refused {
                    report: Some(report),
                    ..
                }) => {
                    s.role = report.role.name().into();
                    s.term = Some(report.term);
                    s.primary_term = Some(report.primary_term);
                    s.timeline = Some(report.timeline);
                    let lsn = match report.role {
                        NodeRole::Primary => report.flush_lsn,
                        _ => report.replay_lsn,
                    };
                    s.lsn = lsn.map(format_lsn);
                    if report.role == NodeRole::Standby {
                        s.streaming = Some(report.streaming);
                        s.lag_bytes = primary_lsn.zip(lsn).map(|(p, l)| p.saturating_sub(l));
                    }
                    s.postgres_pid = report.postgres_pid.or(s.postgres_pid);
                    s.health = match (&report.problem, report.recruited) {
                        (Some(p), _) => p.clone(),
                        (None, true) => "recruited".into(),
                        (None, false) if report.role == NodeRole::Standby && !report.streaming => {
                            "not streaming".into()
                        }
                        (None, false) => "ok".into(),
                    };
                }
                Ok(Response::Refused { reason, .. }) => s.health = reason,
                Err(e) => s.health = format!("agent unreachable: {e}"),
            }
            s
        })
        .collect()
}

/// Looks at every process `state` knows of, and the ones it should know of but does not
/// (a failed `up`): those are dead.
pub fn inspect(state: &State) -> Report {
    let mut processes: Vec<ProcessStatus> = Role::START_ORDER
        .iter()
        .map(|&role| inspect_one(state, role))
        .collect();
    if !state.nodes.is_empty() || state.process(Role::Control).is_some() {
        processes.push(inspect_one(state, Role::Control));
    }
    let nodes = if state.nodes.is_empty() {
        Vec::new()
    } else {
        inspect_nodes(state)
    };
    let topology = if state.nodes.is_empty() {
        None
    } else {
        crate::control::load_topology(&state.dir, &state.settings)
    };
    Report {
        dir: state.dir.clone(),
        backup_schedule: crate::backup::schedule::load_record(&state.dir),
        data_dir: state.postgres.data_dir.clone(),
        healthy: processes.iter().all(|p| p.state == ProcessState::Accepting)
            && nodes.iter().all(|n| n.health == "ok"),
        processes,
        nodes,
        topology,
    }
}

fn inspect_one(state: &State, role: Role) -> ProcessStatus {
    let record = state.process(role);
    let default_port = match role {
        Role::Postgres => state.settings.pg_port,
        Role::Pooler => state.settings.pooler_port,
        Role::Gateway => state.settings.port,
        Role::Control => 0,
    };
    let mut address = record
        .map(|r| r.address)
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], default_port)));
    let log = record
        .map(|r| r.log.clone())
        .unwrap_or_else(|| state.dir.join("logs").join(format!("{}.log", role.name())));
    let pid = match role {
        // The postmaster's own pid file is fresher than our record: Postgres may have been
        // restarted by hand.
        Role::Postgres => {
            crate::postgres::running_postmaster(&state.postgres.data_dir).map(|(pid, port)| {
                address.set_port(port);
                pid
            })
        }
        _ => record
            .map(|r| r.pid)
            .filter(|&pid| liveness(pid, role.program()) == Liveness::Alive),
    };
    let running = pid.is_some();
    // The control process listens on nothing: running is all it can be.
    let accepting = running && (role == Role::Control || accepts(address));
    let state = match (running, accepting) {
        (true, true) => ProcessState::Accepting,
        (true, false) => ProcessState::NotAccepting,
        (false, _) => ProcessState::Dead,
    };
    ProcessStatus {
        name: role,
        pid,
        address,
        state,
        running,
        accepting,
        log,
    }
}

/// Prints the report; returns whether everything is up (the exit code follows it).
pub fn run(global: &GlobalArgs, args: &StatusArgs) -> Result<bool> {
    let ctx = Context::load_dir(global)?;
    let state = State::load(&ctx.layout.state_file())?
        .ok_or_else(|| Error::NoCluster(ctx.layout.dir().to_path_buf()))?;
    let report = inspect(&state);
    if args.json {
        let text = serde_json::to_string_pretty(&report).map_err(|source| Error::State {
            path: ctx.layout.state_file(),
            source,
        })?;
        println!("{text}");
    } else {
        print!("{}", table(&report));
    }
    Ok(report.healthy)
}

fn table(report: &Report) -> String {
    let mut out = format!("cluster {}\n", report.dir.display());
    out += &format!(
        "{:<9} {:>8}  {:<21}  {:<22}  {}\n",
        "PROCESS", "PID", "ADDRESS", "STATE", "LOG"
    );
    for p in &report.processes {
        let pid = p.pid.map(|p| p.to_string()).unwrap_or_else(|| "-".into());
        out += &format!(
            "{:<9} {:>8}  {:<21}  {:<22}  {}\n",
            p.name.name(),
            pid,
            p.address.to_string(),
            p.state.as_str(),
            p.log.display()
        );
    }
    if !report.nodes.is_empty() {
        if let Some(t) = &report.topology {
            out += &format!(
                "term {}, primary {}\n",
                t.term,
                t.primary.as_deref().unwrap_or("none")
            );
        }
        out += &format!(
            "{:<7} {:<8} {:>5} {:>3} {:>14} {:>10} {:>8}  {:<21}  {}\n",
            "NODE", "ROLE", "TERM", "TL", "LSN", "LAG", "PG-PID", "POOLER", "HEALTH"
        );
        let dash = || "-".to_string();
        for n in &report.nodes {
            out += &format!(
                "{:<7} {:<8} {:>5} {:>3} {:>14} {:>10} {:>8}  {:<21}  {}\n",
                n.name,
                n.role,
                n.term.map(|t| t.to_string()).unwrap_or_else(dash),
                n.timeline.map(|t| t.to_string()).unwrap_or_else(dash),
                n.lsn.clone().unwrap_or_else(dash),
                n.lag_bytes.map(|l| l.to_string()).unwrap_or_else(dash),
                n.postgres_pid.map(|p| p.to_string()).unwrap_or_else(dash),
                n.pooler.to_string(),
                n.health
            );
        }
    }
    if let Some(r) = &report.backup_schedule {
        let show = |o: &Option<crate::backup::schedule::Outcome>| match o {
            Some(o) => format!(
                "{} {} ({})",
                o.kind,
                crate::backup::info::utc(o.at),
                // A failure's pgBackRest output: its ERROR line says why.
                o.detail
                    .lines()
                    .find(|l| l.contains("ERROR"))
                    .or_else(|| o.detail.lines().next())
                    .unwrap_or_default()
                    .trim()
            ),
            None => "never".into(),
        };
        out += &format!(
            "scheduled backups: last success {}; last failure {}\n",
            show(&r.last_success),
            show(&r.last_failure)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::ClusterSettings;
    use crate::state::{PostgresRecord, ProcessRecord, FORMAT_VERSION};

    #[test]
    fn dead_and_unrecorded_processes_are_dead_and_unhealthy() {
        let state = State {
            version: FORMAT_VERSION,
            dir: "/nonexistent/tp".into(),
            postgres: PostgresRecord {
                data_dir: "/nonexistent/tp/pgdata".into(),
                port: 1,
                socket_dir: "/nonexistent/tp/run".into(),
            },
            processes: vec![ProcessRecord {
                name: Role::Pooler,
                // Our own pid, but we are not tidepool-pooler: a reused pid must read dead.
                pid: std::process::id(),
                address: "127.0.0.1:1".parse().unwrap(),
                log: "/nonexistent/tp/logs/pooler.log".into(),
            }],
            settings: ClusterSettings::default(),
            nodes: vec![],
            agent_key_file: None,
        };
        let report = inspect(&state);
        assert!(!report.healthy);
        assert!(report
            .processes
            .iter()
            .all(|p| p.state == ProcessState::Dead));
        assert_eq!(report.processes[2].address.port(), 15432);
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["processes"][1]["name"], "pooler");
        assert_eq!(json["processes"][1]["state"], "dead");
        assert!(table(&report).contains("gateway"));
    }
}
