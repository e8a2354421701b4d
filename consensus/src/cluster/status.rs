//! `tidepool status`: each process of the cluster, its pid, address and state.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::Serialize;

use crate::cli::{GlobalArgs, StatusArgs};
use crate::cluster::Context;
use crate::config::Overrides;
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
    /// Every process running and accepting.
    pub healthy: bool,
}

/// Looks at every process `state` knows of, and the ones it should know of but does not
/// (a failed `up`): those are dead.
pub fn inspect(state: &State) -> Report {
    let processes: Vec<ProcessStatus> = Role::START_ORDER
        .iter()
        .map(|&role| inspect_one(state, role))
        .collect();
    Report {
        dir: state.dir.clone(),
        data_dir: state.postgres.data_dir.clone(),
        healthy: processes.iter().all(|p| p.state == ProcessState::Accepting),
        processes,
    }
}

fn inspect_one(state: &State, role: Role) -> ProcessStatus {
    let record = state.process(role);
    let default_port = match role {
        Role::Postgres => state.settings.pg_port,
        Role::Pooler => state.settings.pooler_port,
        Role::Gateway => state.settings.port,
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
    let accepting = running && accepts(address);
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
    let ctx = Context::load(
        global,
        Overrides {
            dir: global.dir.clone(),
            ..Overrides::default()
        },
    )?;
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
