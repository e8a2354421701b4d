//! `tidepool node add [--zone ZONE]`: one more standby, restored from the latest backup
//! (`pgbackrest restore --type=standby`), streaming from the current primary, with its own
//! pooler (the node's agent); then the gateway is restarted with every node's pooler (it
//! reads them at start: its clients reconnect) and the control process too, so that the node
//! joins the cohort and the durability policy (the primary's synchronous standbys are
//! recomputed over every node, and the topology's node list grows).
//!
//! Adding one node at a time keeps failover safe while control processes disagree on the
//! cohort for a moment: any majority of the old cohort and any majority of the new one share a
//! node (the single-server membership change of Raft).

use std::ffi::OsString;
use std::time::Duration;

use crate::backup::Backups;
use crate::cli::{GlobalArgs, NodeAddArgs};
use crate::cluster::status::inspect_nodes;
use crate::cluster::up::{
    ensure_port_free, ensure_process, ensure_tier, gateway_args, pooler_args, set_flag,
};
use crate::cluster::{locate_pooler_and_gateway, nodes, Context};
use crate::error::{Error, Result};
use crate::process::terminate;
use crate::state::{ProcessRecord, Role, State};

pub fn run(global: &GlobalArgs, args: &NodeAddArgs) -> Result<bool> {
    let ctx = Context::load_dir(global)?;
    let layout = &ctx.layout;
    let mut state = State::load(&layout.state_file())?
        .ok_or_else(|| Error::NoCluster(layout.dir().to_path_buf()))?;
    if state.nodes.is_empty() {
        return Err(Error::Conflict(format!(
            "the cluster in {} is a single node (brought up without --standbys): `node add` \
             needs a cluster with standbys (`tidepool up --standbys N`)",
            layout.dir().display()
        )));
    }
    let backups = Backups::of(&state)?;
    let run = ctx.overrides.run();
    let timeout = Duration::from_secs(run.ready_timeout_secs);
    let (pooler_bin, gateway_bin) = locate_pooler_and_gateway(run.bin_dir.as_deref())?;

    // The lowest free number: after `node remove`, the removed node's (its directory was
    // moved aside), so the new node takes its ports.
    let k = nodes::free_number(&state.nodes);
    let mut settings = state.settings.clone();
    settings.standbys = state.nodes.len() as u32;
    if let Some(zone) = &args.zone {
        // Zones are listed by node number; the others keep theirs.
        let top = state
            .nodes
            .iter()
            .filter_map(|n| nodes::number(&n.name))
            .max()
            .unwrap_or(1)
            .max(k);
        settings.zones = (1..=top)
            .map(|i| {
                if i == k {
                    return zone.clone();
                }
                state
                    .nodes
                    .iter()
                    .find(|n| nodes::number(&n.name) == Some(i))
                    .map(|n| n.zone.clone())
                    .unwrap_or_else(|| nodes::zone_of(&state.settings, i))
            })
            .collect();
    }
    let node = nodes::record(&settings, layout, k);
    // The policy must still be satisfiable, and the new node's ports free.
    nodes::sync_names(&settings, &with(&state, &node), &state.nodes[0].name)?;
    for (role, addr) in [
        (Role::Postgres, nodes::loopback(node.pg_port)),
        (Role::Pooler, node.pooler),
        (Role::Pooler, node.agent),
    ] {
        ensure_port_free(role, addr)?;
    }

    let statuses = inspect_nodes(&state);
    let primary = statuses
        .iter()
        .filter(|n| n.role == "primary")
        .max_by_key(|n| n.primary_term)
        .and_then(|n| state.nodes.iter().find(|r| r.name == n.name))
        .ok_or_else(|| {
            Error::Conflict("no node reports itself primary: a new standby needs one".into())
        })?;
    let primary_pg = nodes::postgres(&settings, primary)?;
    eprintln!(
        "adding {} (zone {}), streaming from {}",
        node.name, node.zone, primary.name
    );
    backups.write_node_config(&node)?;
    nodes::ensure_standby(
        &settings,
        &node,
        &primary_pg,
        &nodes::replication_conf(),
        Some(&backups),
        timeout,
    )?;

    let mut pooler = pooler_args(&settings, layout, &run);
    set_flag(&mut pooler, "--listen", node.pooler.to_string());
    set_flag(&mut pooler, "--pg-port", node.pg_port.to_string());
    set_flag(
        &mut pooler,
        "--admin-socket-dir",
        node.socket_dir.display().to_string(),
    );
    pooler.extend(nodes::agent_args(
        &settings,
        &node,
        &layout.agent_key_file(),
    ));
    // Its certificate from the cluster CA, when the cluster has one (made by `up`).
    if crate::certs::ca_file(layout.dir()).exists() {
        let ca = crate::certs::ensure_ca(layout)?;
        crate::certs::ensure_node(layout, &ca, &node.name, &crate::certs::hosts_of(&node))?;
        pooler.extend(crate::certs::pooler_args(
            layout,
            &node.name,
            crate::certs::link_needs_tls(&node.pooler),
            true,
        ));
    }
    let mut node = node;
    node.pooler_pid = ensure_process(
        Role::Pooler,
        &pooler_bin,
        &pooler,
        node.pooler,
        &node.pooler_log,
        None,
        layout,
        timeout,
    )?;
    let name = node.name.clone();
    state.nodes.push(node);
    state
        .nodes
        .sort_by_key(|n| nodes::number(&n.name).unwrap_or(u32::MAX));
    state.settings = settings;
    state.save(&layout.state_file())?;

    // The gateway must be able to route to the new node should it become primary, and it
    // reads its poolers from --pooler when it starts: restarted, its clients reconnect.
    if let Some(g) = state.process(Role::Gateway).cloned() {
        eprintln!("restarting the gateway so that it knows {name}'s pooler (clients reconnect)");
        terminate(g.pid, Role::Gateway.program(), Duration::from_secs(10))?;
        // Its listening socket may outlive the pid by a moment.
        let addr = nodes::loopback(state.settings.port);
        let start = std::time::Instant::now();
        while crate::process::accepts(addr) && start.elapsed() < timeout {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let mut gateway = gateway_args(&state.settings, layout, &run);
    set_flag(&mut gateway, "--pooler", nodes::pooler_list(&state.nodes));
    if crate::certs::ca_file(layout.dir()).exists() {
        // A cluster made before TLS has no CA: its poolers' links are plain.
        let poolers: Vec<std::net::SocketAddr> = state.nodes.iter().map(|n| n.pooler).collect();
        crate::cluster::up::link_ca_if_needed(&mut gateway, layout, &poolers);
    }
    ensure_tier(
        Role::Gateway,
        &gateway_bin,
        &gateway,
        nodes::loopback(state.settings.port),
        layout,
        &mut state,
        timeout,
    )?;
    state.save(&layout.state_file())?;

    // The control process reads the nodes when it starts.
    if let Some(control) = state.process(Role::Control).cloned() {
        terminate(
            control.pid,
            Role::Control.program(),
            Duration::from_secs(10),
        )?;
        start_control(
            layout,
            global.config.as_deref(),
            &mut state,
            control,
            timeout,
        )?;
    }
    eprintln!(
        "{name} restored from the latest backup and started; it joins the cohort and the \
         durability policy"
    );
    Ok(true)
}

/// Starts the control process recorded as `control` again (it was stopped) and records its
/// new pid.
/// `tidepool control`'s arguments: the state directory, and the `--config` file the command
/// was given (as an absolute path), which the control process reads again on SIGHUP.
pub(crate) fn control_args(
    layout: &crate::layout::Layout,
    config: Option<&std::path::Path>,
    settings: &crate::config::ClusterSettings,
) -> Result<Vec<OsString>> {
    let mut args: Vec<OsString> = vec!["--dir".into(), layout.dir().as_os_str().to_owned()];
    if let Some(c) = config {
        let c = std::path::absolute(c).map_err(Error::io("resolving --config"))?;
        args.push("--config".into());
        args.push(c.into_os_string());
    }
    args.push("control".into());
    // Named even when it is the default: `up` points it at the control process's own copy
    // when that process runs as another user (`prepare_start`). A single node has no agents
    // and no secret.
    let key = layout.agent_key_file();
    if key.exists() {
        args.push("--agent-secret-file".into());
        args.push(key.into_os_string());
    }
    // The same for the etcd password's file, a secret the operator's (`[etcd_access]`).
    if let Some(file) = &settings.etcd_access.password_file {
        let file =
            std::path::absolute(file).map_err(Error::io("resolving the etcd password file"))?;
        args.push("--etcd-password-file".into());
        args.push(file.into_os_string());
    }
    // And the etcd client certificate's key (its certificate is not a secret: read in place).
    if let Some(file) = &settings.etcd_access.key_file {
        let file = std::path::absolute(file).map_err(Error::io("resolving the etcd key file"))?;
        args.push("--etcd-key-file".into());
        args.push(file.into_os_string());
    }
    Ok(args)
}

pub(crate) fn start_control(
    layout: &crate::layout::Layout,
    config: Option<&std::path::Path>,
    state: &mut State,
    control: ProcessRecord,
    timeout: Duration,
) -> Result<()> {
    let me = std::env::current_exe().map_err(Error::io("finding the tidepool executable"))?;
    let args = control_args(layout, config, &state.settings)?;
    let pid = ensure_process(
        Role::Control,
        &me,
        &args,
        control.address,
        &control.log,
        None,
        layout,
        timeout,
    )?;
    state.set_process(ProcessRecord { pid, ..control });
    state.save(&layout.state_file())
}

fn with(state: &State, node: &crate::state::NodeRecord) -> Vec<crate::state::NodeRecord> {
    let mut all = state.nodes.clone();
    all.push(node.clone());
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_control_process_is_given_its_secrets_by_path() {
        let dir = std::env::temp_dir().join(format!("tp-control-args-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let layout = crate::layout::Layout::new(&dir).unwrap();
        let text = |args: Vec<OsString>| {
            args.into_iter()
                .map(|a| a.into_string().unwrap())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let mut settings = crate::config::ClusterSettings::default();
        // A single node: no agents, no agent secret.
        let args = control_args(&layout, None, &settings).unwrap();
        assert_eq!(text(args), format!("--dir {} control", dir.display()));
        std::fs::write(layout.agent_key_file(), "k").unwrap();
        settings.etcd_access.password_file = Some("/etc/tidepool/etcd.password".into());
        settings.etcd_access.key_file = Some("/etc/tidepool/etcd.key".into());
        let args = control_args(
            &layout,
            Some(std::path::Path::new("/etc/tp.toml")),
            &settings,
        )
        .unwrap();
        assert_eq!(
            text(args),
            format!(
                "--dir {d} --config /etc/tp.toml control --agent-secret-file {d}/agent.key \
                 --etcd-password-file /etc/tidepool/etcd.password \
                 --etcd-key-file /etc/tidepool/etcd.key",
                d = dir.display()
            )
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
