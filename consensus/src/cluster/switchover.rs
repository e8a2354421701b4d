//! `tidepool switchover` and `tidepool failover --force`: asks the running control process
//! (which alone acts on the nodes) and waits for its answer.

use std::time::Duration;

use crate::cli::{FailoverArgs, GlobalArgs, SwitchoverArgs};
use crate::cluster::Context;
use crate::control::{submit, RequestKind};
use crate::error::{Error, Result};

const WAIT: Duration = Duration::from_secs(120);

fn dir(global: &GlobalArgs) -> Result<std::path::PathBuf> {
    let ctx = Context::load_dir(global)?;
    Ok(ctx.layout.dir().to_path_buf())
}

pub fn run(global: &GlobalArgs, args: &SwitchoverArgs) -> Result<bool> {
    let answer = submit(
        &dir(global)?,
        RequestKind::Switchover {
            to: args.to.clone(),
        },
        WAIT,
    )?;
    if answer.ok {
        eprintln!("switchover done");
        Ok(true)
    } else {
        Err(Error::Conflict(format!(
            "switchover failed: {}",
            answer.message
        )))
    }
}

pub fn run_failover(global: &GlobalArgs, args: &FailoverArgs) -> Result<bool> {
    if !args.force || args.reason.trim().is_empty() {
        return Err(Error::Conflict(
            "an explicit failover may lose acknowledged commits: pass --force and --reason TEXT (recorded)".into(),
        ));
    }
    let kind = RequestKind::Failover {
        to: args.to.clone(),
        reason: format!("forced by the operator: {}", args.reason),
    };
    let answer = submit(&dir(global)?, kind, WAIT)?;
    if answer.ok {
        eprintln!("failover done");
        Ok(true)
    } else {
        Err(Error::Conflict(format!(
            "failover failed: {}",
            answer.message
        )))
    }
}
