//! `tidepool down`: stop what `up` started, newest first; the data stays.

use std::time::Duration;

use crate::cli::{DownArgs, GlobalArgs};
use crate::cluster::Context;
use crate::config::Overrides;
use crate::error::Result;
use crate::postgres::Postgres;
use crate::process::{terminate, Stopped};
use crate::state::{Role, State};

pub fn run(global: &GlobalArgs, args: &DownArgs) -> Result<()> {
    let ctx = Context::load(
        global,
        Overrides {
            dir: global.dir.clone(),
            stop_timeout_secs: args.stop_timeout_secs,
            ..Overrides::default()
        },
    )?;
    let timeout = Duration::from_secs(ctx.overrides.run().stop_timeout_secs);
    let Some(state) = State::load(&ctx.layout.state_file())? else {
        eprintln!(
            "nothing to stop: no Tidepool cluster in {}",
            ctx.layout.dir().display()
        );
        return Ok(());
    };

    // Clients first, so that nothing new reaches the pooler, then the pooler, so that its
    // backends close cleanly before Postgres goes.
    for role in [Role::Control, Role::Gateway, Role::Pooler] {
        let Some(record) = state.process(role) else {
            continue;
        };
        let outcome = terminate(record.pid, role.program(), timeout)?;
        let what = match outcome {
            Stopped::NotRunning => "was not running".to_string(),
            Stopped::Terminated => format!("stopped (pid {})", record.pid),
            Stopped::Killed => format!(
                "killed (pid {}): still running {}s after SIGTERM",
                record.pid,
                timeout.as_secs()
            ),
        };
        eprintln!("{:<8} {what}", role.name());
    }

    // The standbys' poolers, then every Postgres but node1's (stopped below).
    for node in state.nodes.iter().skip(1) {
        let what = match terminate(node.pooler_pid, Role::Pooler.program(), timeout)? {
            Stopped::NotRunning => "was not running".to_string(),
            Stopped::Terminated => format!("stopped (pid {})", node.pooler_pid),
            Stopped::Killed => format!("killed (pid {})", node.pooler_pid),
        };
        eprintln!("{:<8} of {} {what}", "pooler", node.name);
    }
    for node in state.nodes.iter().skip(1) {
        let pg = crate::cluster::nodes::postgres(&state.settings, node)?;
        if pg.stop(timeout)? {
            eprintln!(
                "{:<8} of {} stopped (pg_ctl stop -m fast)",
                "postgres", node.name
            );
        }
    }

    let pg = Postgres::new(
        &state.settings.pg_bin_dir,
        state.postgres.data_dir.clone(),
        state.postgres.socket_dir.clone(),
        state.postgres.port,
        ctx.layout.log(Role::Postgres.name()),
    )?;
    if pg.stop(timeout)? {
        eprintln!("{:<8} stopped (pg_ctl stop -m fast)", "postgres");
    } else {
        eprintln!("{:<8} was not running", "postgres");
    }
    eprintln!(
        "Tidepool is down; data kept in {}",
        state.postgres.data_dir.display()
    );
    Ok(())
}
