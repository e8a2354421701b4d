//! `tidepool node remove NAME`: takes a standby out of the cohort.
//!
//! Refused for the primary (a switchover first moves the role away), for node1 (its places
//! are the cluster's own: DIR/pgdata, the first pooler, `state.postgres`), for the last
//! standby, and when the nodes left cannot satisfy the durability policy. Otherwise, in this
//! order, so that no commit ever waits for the node going away and no control process acts
//! on a cohort that still names it:
//!
//! 1. the control process is stopped (it would put the node back into the primary's
//!    synchronous standbys, or tell it to follow);
//! 2. the primary's `synchronous_standby_names` is recomputed over the nodes left (through
//!    its agent, at its own pledged term);
//! 3. the node leaves the stored topology's cohort (compare-and-swap) and `state.json`;
//! 4. its pooler (the agent, which would restart Postgres) and then its Postgres stop; its
//!    directory is moved aside to DIR/NAME.removed-UNIXTIME (kept: nothing is deleted);
//! 5. the control process starts again with the smaller cohort.
//!
//! One node at a time, like `node add`: any majority of the old cohort and any majority of
//! the new one share a node. Gateways keep the removed pooler's address until they restart
//! (it no longer answers, so nothing is routed there).

use std::time::Duration;

use shared::agent::{call_with, Request, Response};

use crate::cli::{GlobalArgs, NodeRemoveArgs};
use crate::cluster::node_add::start_control;
use crate::cluster::status::inspect_nodes;
use crate::cluster::{nodes, Context};
use crate::error::{Error, Result};
use crate::process::terminate;
use crate::state::{NodeRecord, Role, State};

pub fn run(global: &GlobalArgs, args: &NodeRemoveArgs) -> Result<bool> {
    let ctx = Context::load_dir(global)?;
    let layout = &ctx.layout;
    let mut state = State::load(&layout.state_file())?
        .ok_or_else(|| Error::NoCluster(layout.dir().to_path_buf()))?;
    let timeout = Duration::from_secs(ctx.overrides.run().ready_timeout_secs);
    let name = args.name.as_str();

    let plan = check(&state, name)?;
    let node = plan.node.clone();
    eprintln!(
        "removing {name}: the primary {} keeps the durability policy {:?} with {}",
        plan.primary.name,
        state.settings.durability,
        names(&plan.left)
    );

    // 1. No control process acts while the cohort changes.
    let control = state.process(Role::Control).cloned();
    if let Some(c) = &control {
        terminate(c.pid, Role::Control.program(), Duration::from_secs(10))?;
    }
    let result = remove(&mut state, layout, &plan);
    // 5. Restarted whatever happened: the cluster must not stay without one.
    if let Some(c) = control {
        start_control(layout, global.config.as_deref(), &mut state, c, timeout)?;
    }
    result?;
    eprintln!(
        "{name} removed: the cohort is {}; its data is kept in {} (delete it when no longer \
         needed)",
        names(&state.nodes),
        aside_path(&node).display()
    );
    Ok(true)
}

/// What a removal needs, once the checks pass.
struct Plan {
    node: NodeRecord,
    primary: NodeRecord,
    /// The primary's pledged term (what its agent accepts a SetSync at).
    primary_term: u64,
    left: Vec<NodeRecord>,
    sync_names: String,
}

/// Every refusal, before anything changes.
fn check(state: &State, name: &str) -> Result<Plan> {
    if state.nodes.is_empty() {
        return Err(Error::Conflict(format!(
            "the cluster in {} is a single node (brought up without --standbys): no node to \
             remove",
            state.dir.display()
        )));
    }
    let Some(node) = state.nodes.iter().find(|n| n.name == name).cloned() else {
        return Err(Error::Conflict(format!(
            "no node {name:?} in the cluster in {} (its nodes: {})",
            state.dir.display(),
            names(&state.nodes)
        )));
    };
    let statuses = inspect_nodes(state);
    let reported = statuses
        .iter()
        .filter(|n| n.role == "primary")
        .max_by_key(|n| n.primary_term);
    let stored = crate::control::load_topology(&state.dir, &state.settings)
        .and_then(|t| t.primary)
        .filter(|p| p == name);
    if reported.is_some_and(|p| p.name == name) || stored.is_some() {
        let other = state
            .nodes
            .iter()
            .find(|n| n.name != name)
            .map(|n| n.name.as_str())
            .unwrap_or("NODE");
        return Err(Error::Conflict(format!(
            "{name} is the primary: a primary is never removed. Move the role first with \
             `tidepool switchover` (or `--to {other}`), then `tidepool node remove {name}`"
        )));
    }
    if state.nodes.first().is_some_and(|n| n.name == name) {
        return Err(Error::Conflict(format!(
            "{name} cannot be removed yet: it holds the cluster's own places (DIR/pgdata, the \
             first pooler); remove another node"
        )));
    }
    let Some(reported) = reported else {
        return Err(Error::Conflict(
            "no node reports itself primary: a removal recomputes the primary's synchronous \
             standbys, so it waits for one (see `tidepool status`)"
                .into(),
        ));
    };
    let primary = state
        .nodes
        .iter()
        .find(|n| n.name == reported.name)
        .cloned()
        .ok_or_else(|| Error::Conflict(format!("no node {} in state.json", reported.name)))?;
    let left: Vec<NodeRecord> = state
        .nodes
        .iter()
        .filter(|n| n.name != name)
        .cloned()
        .collect();
    let sync_names = nodes::sync_names(&state.settings, &left, &primary.name).map_err(|e| {
        Error::Conflict(format!(
            "refusing to remove {name}: the nodes left ({}) cannot satisfy the durability \
             policy — {e}. Add a node first (`tidepool node add`) or relax the policy",
            names(&left)
        ))
    })?;
    if left.len() < 2 {
        return Err(Error::Conflict(format!(
            "refusing to remove {name}: it is the last standby, and a cluster with standbys \
             keeps at least one (failover needs somewhere to go)"
        )));
    }
    Ok(Plan {
        node,
        primary_term: reported.term.unwrap_or(0),
        primary,
        left,
        sync_names,
    })
}

/// Steps 2 to 4 (see the module's comment).
fn remove(state: &mut State, layout: &crate::layout::Layout, plan: &Plan) -> Result<()> {
    let name = plan.node.name.as_str();
    // 2. No commit waits for the node from now on.
    let key = super::agent_access(&state.dir)?;
    let req = Request::SetSync {
        term: plan.primary_term,
        sync_names: plan.sync_names.clone(),
    };
    match call_with(plan.primary.agent, &key, &req, Duration::from_secs(10)) {
        Ok(Response::Ok { .. }) => eprintln!(
            "synchronous standbys of {} now {:?}",
            plan.primary.name, plan.sync_names
        ),
        Ok(Response::Refused { reason, .. }) => {
            return Err(Error::Conflict(format!(
                "the primary {} refused its new synchronous standbys: {reason}; {name} was \
                 not removed",
                plan.primary.name
            )))
        }
        Err(e) => {
            return Err(Error::Conflict(format!(
                "the primary {}'s agent: {e}; {name} was not removed",
                plan.primary.name
            )))
        }
    }

    // 3. Out of the cohort.
    crate::control::remove_from_topology(&state.dir, &state.settings, name)?;
    state.nodes.retain(|n| n.name != name);
    state.settings.standbys = state.nodes.len() as u32 - 1;
    state.save(&layout.state_file())?;

    // 4. Stopped, its directory kept aside (a later `node add` may take its number).
    let timeout = Duration::from_secs(30);
    terminate(plan.node.pooler_pid, Role::Pooler.program(), timeout)?;
    let pg = nodes::postgres(&state.settings, &plan.node)?;
    pg.stop(timeout)?;
    if crate::postgres::running_postmaster(&plan.node.data_dir).is_some() {
        return Err(Error::Conflict(format!(
            "{name} left the cohort but its Postgres still runs ({}): stop it by hand",
            plan.node.data_dir.display()
        )));
    }
    eprintln!("{name}: pooler and Postgres stopped");
    let aside = aside_path(&plan.node);
    if plan.node.state_dir.is_dir() {
        std::fs::rename(&plan.node.state_dir, &aside).map_err(Error::io(format!(
            "moving {} aside to {}",
            plan.node.state_dir.display(),
            aside.display()
        )))?;
    }
    Ok(())
}

/// DIR/NAME.removed-UNIXTIME (computed once per process: the same path in every message).
fn aside_path(node: &NodeRecord) -> std::path::PathBuf {
    static AT: std::sync::OnceLock<u64> = std::sync::OnceLock::new();
    let at = *AT.get_or_init(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    });
    let mut name = node.state_dir.as_os_str().to_owned();
    name.push(format!(".removed-{at}"));
    name.into()
}

fn names(nodes: &[NodeRecord]) -> String {
    nodes
        .iter()
        .map(|n| n.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
