//! `tidepool up`: bring up (or complete) a local cluster — Postgres 15, one pooler, one
//! gateway — and print the URL clients use, as the last line of stdout.
//!
//! Idempotent-ish: what already runs with the asked settings is kept, what is missing is
//! started, and a process running with other settings is a conflict to resolve with
//! `tidepool down`, never silently restarted. Progress goes to stderr, so that
//! `URL=$(tidepool up)` works.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::backup::Backups;
use crate::cli::{GlobalArgs, UpArgs};
use crate::cluster::{locate_pooler_and_gateway, nodes, status, url, Context};
use crate::config::{ClusterSettings, RunSettings};
use crate::error::{Error, Result};
use crate::layout::Layout;
use crate::password;
use crate::postgres::{Postgres, OS_USER};
use crate::process::{accepts, liveness, spawn_detached_as, terminate, wait_ready, Liveness};
use crate::state::{PostgresRecord, ProcessRecord, Role, State, FORMAT_VERSION};

pub fn run(global: &GlobalArgs, args: &UpArgs) -> Result<()> {
    let ctx = Context::load(global, args.overrides(global))?;
    let layout = &ctx.layout;
    let previous = State::load(&layout.state_file())?;
    let base = previous
        .as_ref()
        .map(|s| s.settings.clone())
        .unwrap_or_default();
    let settings = ctx.overrides.cluster(&base);
    let run = ctx.overrides.run();
    check_ports(&settings)?;
    let timeout = Duration::from_secs(run.ready_timeout_secs);

    // Find the binaries before touching anything.
    let (pooler_bin, gateway_bin) = locate_pooler_and_gateway(run.bin_dir.as_deref())?;

    preflight(previous.as_ref(), &settings)?;

    create_dir(layout.dir())?;
    create_dir(&layout.logs_dir())?;
    let pg = Postgres::new(
        &settings.pg_bin_dir,
        layout.data_dir(),
        layout.socket_dir(),
        settings.pg_port,
        layout.log(Role::Postgres.name()),
    )?;

    let mut state = previous.unwrap_or_else(|| State {
        version: FORMAT_VERSION,
        dir: PathBuf::new(),
        postgres: PostgresRecord {
            data_dir: PathBuf::new(),
            port: 0,
            socket_dir: PathBuf::new(),
        },
        processes: Vec::new(),
        settings: settings.clone(),
        nodes: Vec::new(),
        agent_key_file: None,
    });
    state.dir = layout.dir().to_path_buf();
    state.settings = settings.clone();
    state.postgres = PostgresRecord {
        data_dir: layout.data_dir(),
        port: settings.pg_port,
        socket_dir: layout.socket_dir(),
    };

    if let Some(password) = password::read(&layout.password_file())? {
        if settings.standbys == 0 && already_up(&state) {
            eprintln!("Tidepool is already up in {}", layout.dir().display());
            println!("{}", url(&password, settings.port));
            return Ok(());
        }
    }

    // Postgres.
    pg.prepare_dirs()?;
    if pg.init_if_needed()? {
        eprintln!(
            "initialized a Postgres 15 cluster in {}",
            pg.data_dir.display()
        );
    }
    let ha = settings.standbys > 0;
    let nodes = if ha {
        nodes::records_for_up(&settings, layout, &state.nodes)
    } else {
        Vec::new()
    };
    let replication = if ha {
        // Checked now so a policy the nodes cannot satisfy fails before anything starts.
        nodes::sync_names(&settings, &nodes, "node1")?;
        nodes::replication_conf()
    } else {
        String::new()
    };
    // A single-node cluster archives and backs up too: its one Postgres is node1's place
    // (with no agent; a control process only for a backup schedule).
    let node1 = nodes::record(&settings, layout, 1);
    let backup_nodes = if ha {
        nodes.as_slice()
    } else {
        std::slice::from_ref(&node1)
    };
    let backups = Backups::prepare_for_up(&settings, layout, backup_nodes)?;
    let archive = match &backups {
        Some(b) => b.archive_conf(&node1),
        None => String::new(),
    };
    pg.configure_with(
        settings.pg_max_connections,
        &format!("{replication}{archive}"),
    )?;
    let pg_pid = match pg.running() {
        Some((pid, port)) if port == settings.pg_port => {
            if !wait_accepting(pg.address(), timeout) {
                return Err(not_ready("postgres", pg.address(), timeout, &pg.log));
            }
            eprintln!("postgres already running (pid {pid}) on {}", pg.address());
            pid
        }
        Some((pid, port)) => {
            return Err(Error::Conflict(format!(
                "Postgres of {} is running on port {port} (pid {pid}), not {}: run `tidepool down` first",
                layout.dir().display(),
                settings.pg_port
            )))
        }
        None => {
            ensure_port_free(Role::Postgres, pg.address())?;
            eprintln!("starting postgres on {} (as OS user {OS_USER})", pg.address());
            pg.start(timeout)?
        }
    };
    state.set_process(ProcessRecord {
        name: Role::Postgres,
        pid: pg_pid,
        address: pg.address(),
        log: pg.log.clone(),
    });
    state.save(&layout.state_file())?;

    // The login role of the printed URL. The password file is written before the role so
    // that a failure in between leaves a password the next `up` will set.
    let (password, password_is_new) = match password::read(&layout.password_file())? {
        Some(p) => (p, false),
        None => {
            let p = password::generate()?;
            password::write(&layout.password_file(), &p)?;
            (p, true)
        }
    };
    pg.ensure_role_and_database(&password, password_is_new)?;
    if let Some(b) = &backups {
        // The stanza and a first full backup, which every standby is restored from.
        b.bootstrap(&node1, &pg)?;
    }

    // The node agents' secret, before any agent starts; the link's, before pooler and gateway.
    if !nodes.is_empty() {
        super::ensure_agent_key(layout)?;
    }
    super::ensure_link_key(layout)?;
    // The cluster CA and every node's certificate, before its pooler starts: links and agents
    // speak TLS (crate::certs).
    let ca = crate::certs::ensure_ca(layout)?;
    for node in std::iter::once(&node1).chain(nodes.iter().skip(1)) {
        crate::certs::ensure_node(layout, &ca, &node.name, &crate::certs::hosts_of(node))?;
    }

    // Pooler, then gateway (the gateway's first clients need the pooler).
    let pooler_addr = loopback(settings.pooler_port);
    let gateway_addr = loopback(settings.port);
    let mut args = pooler_args(&settings, layout, &run);
    args.extend(crate::certs::pooler_args(
        layout,
        &node1.name,
        crate::certs::link_needs_tls(&pooler_addr),
        ha,
    ));
    if let Some(node1) = nodes.first() {
        args.extend(nodes::agent_args(
            &settings,
            node1,
            &layout.agent_key_file(),
        ));
    }
    ensure_tier(
        Role::Pooler,
        &pooler_bin,
        &args,
        pooler_addr,
        layout,
        &mut state,
        timeout,
    )?;
    if ha {
        let mut records = nodes.clone();
        records[0].pooler_pid = state.process(Role::Pooler).map(|p| p.pid).unwrap_or(0);
        for node in records.iter_mut().skip(1) {
            nodes::ensure_standby(
                &settings,
                node,
                &pg,
                &replication,
                backups.as_ref(),
                timeout,
            )?;
            let mut args = pooler_args(&settings, layout, &run);
            set_flag(&mut args, "--listen", node.pooler.to_string());
            set_flag(&mut args, "--pg-port", node.pg_port.to_string());
            set_flag(
                &mut args,
                "--admin-socket-dir",
                node.socket_dir.display().to_string(),
            );
            args.extend(nodes::agent_args(&settings, node, &layout.agent_key_file()));
            args.extend(crate::certs::pooler_args(
                layout,
                &node.name,
                crate::certs::link_needs_tls(&node.pooler),
                true,
            ));
            node.pooler_pid = ensure_process(
                Role::Pooler,
                &pooler_bin,
                &args,
                node.pooler,
                &node.pooler_log,
                state
                    .nodes
                    .iter()
                    .find(|n| n.name == node.name)
                    .map(|n| n.pooler_pid),
                layout,
                timeout,
            )?;
            state.nodes = merge_nodes(&state.nodes, node);
            state.save(&layout.state_file())?;
        }
        state.nodes = records;
        state.save(&layout.state_file())?;
    }
    let mut args = gateway_args(&settings, layout, &run);
    if ha {
        set_flag(&mut args, "--pooler", nodes::pooler_list(&nodes));
    }
    let poolers: Vec<std::net::SocketAddr> = if ha {
        nodes.iter().map(|n| n.pooler).collect()
    } else {
        vec![pooler_addr]
    };
    link_ca_if_needed(&mut args, layout, &poolers);
    ensure_tier(
        Role::Gateway,
        &gateway_bin,
        &args,
        gateway_addr,
        layout,
        &mut state,
        timeout,
    )?;
    if !crate::control::wanted(&state) {
        // A single node whose schedule was taken out: its old control process goes.
        if let Some(c) = state.process(Role::Control).cloned() {
            terminate(c.pid, Role::Control.program(), Duration::from_secs(10))?;
            state.processes.retain(|p| p.name != Role::Control);
        }
    } else {
        let me = std::env::current_exe().map_err(Error::io("finding the tidepool executable"))?;
        let args =
            crate::cluster::node_add::control_args(layout, global.config.as_deref(), &settings)?;
        let known = state.process(Role::Control).map(|p| p.pid);
        // With a metrics endpoint, `up` waits until it accepts and `status` shows it (only
        // with standbys: a single node's control process runs its backup schedule alone).
        let address = match settings.metrics_addr()? {
            Some(a) if ha => a,
            _ => loopback(0),
        };
        let pid = ensure_process(
            Role::Control,
            &me,
            &args,
            address,
            &layout.log(Role::Control.name()),
            known,
            layout,
            timeout,
        )?;
        state.set_process(ProcessRecord {
            name: Role::Control,
            pid,
            address,
            log: layout.log(Role::Control.name()),
        });
    }
    state.save(&layout.state_file())?;

    eprintln!(
        "Tidepool is up in {} — `tidepool status --dir {}` to check, `tidepool down --dir {}` to stop",
        layout.dir().display(),
        layout.dir().display(),
        layout.dir().display()
    );
    println!("{}", url(&password, settings.port));
    Ok(())
}

/// Finds conflicts before anything is changed (so state.json keeps describing what runs):
/// a process of this cluster running on other ports than asked, or a port another program
/// holds.
fn preflight(previous: Option<&State>, settings: &ClusterSettings) -> Result<()> {
    let report = previous.map(status::inspect);
    for (i, (role, port)) in Role::START_ORDER
        .into_iter()
        .zip(ports(settings))
        .enumerate()
    {
        match report.as_ref().map(|r| &r.processes[i]) {
            Some(p) if p.running => {
                if p.address.port() != port {
                    return Err(Error::Conflict(format!(
                        "the {} of {} is running on port {} (pid {}), not {port}: run `tidepool down` first",
                        role.name(),
                        report.as_ref().map(|r| r.dir.display().to_string()).unwrap_or_default(),
                        p.address.port(),
                        p.pid.unwrap_or_default(),
                    )));
                }
            }
            _ => ensure_port_free(role, loopback(port))?,
        }
    }
    Ok(())
}

/// Ports in [`Role::START_ORDER`].
fn ports(s: &ClusterSettings) -> [u16; 3] {
    [s.pg_port, s.pooler_port, s.port]
}

fn already_up(state: &State) -> bool {
    let report = status::inspect(state);
    report.healthy
        && report
            .processes
            .iter()
            .zip(ports(&state.settings))
            .all(|(p, port)| p.address == loopback(port))
}

/// Starts `role` unless it already runs with the same address; waits until it accepts.
pub(crate) fn ensure_tier(
    role: Role,
    bin: &Path,
    args: &[OsString],
    addr: SocketAddr,
    layout: &Layout,
    state: &mut State,
    timeout: Duration,
) -> Result<()> {
    let name = role.name();
    let log = layout.log(name);
    if let Some(record) = state.process(role) {
        if liveness(record.pid, role.program()) == Liveness::Alive {
            if record.address != addr {
                return Err(Error::Conflict(format!(
                    "the {name} is running on {} (pid {}), not {addr}: run `tidepool down` first",
                    record.address, record.pid
                )));
            }
            if !wait_accepting(addr, timeout) {
                return Err(not_ready(name, addr, timeout, &log));
            }
            eprintln!("{name} already running (pid {}) on {addr}", record.pid);
            return Ok(());
        }
    }
    ensure_port_free(role, addr)?;
    let mut args = args.to_vec();
    let account = prepare_start(role, layout, &mut args)?;
    match &account {
        Some(a) => eprintln!("starting {name} on {addr} (as OS user {})", a.name),
        None => eprintln!("starting {name} on {addr}"),
    }
    let mut child = spawn_detached_as(bin, &args, &log, account.as_ref())?;
    state.set_process(ProcessRecord {
        name: role,
        pid: child.id(),
        address: addr,
        log: log.clone(),
    });
    state.save(&layout.state_file())?;
    if let Err(e) = wait_ready(name, &mut child, addr, timeout, &log) {
        // A process that never became ready is not left behind.
        let _ = terminate(child.id(), role.program(), Duration::from_secs(5));
        let _ = child.try_wait();
        return Err(e);
    }
    Ok(())
}

/// `--link-tls-ca` for a gateway when a link to one of `poolers` leaves the host (their
/// certificates are the cluster CA's: [`crate::certs::link_needs_tls`]).
pub(crate) fn link_ca_if_needed(
    args: &mut Vec<OsString>,
    layout: &Layout,
    poolers: &[std::net::SocketAddr],
) {
    if poolers.iter().any(crate::certs::link_needs_tls) {
        args.push("--link-tls-ca".into());
        args.push(crate::certs::ca_file(layout.dir()).into());
    }
}

pub(crate) fn pooler_args(
    s: &ClusterSettings,
    layout: &Layout,
    run: &RunSettings,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    if let Some(config) = &run.pooler_config {
        args.extend(["--config".into(), absolute(config)]);
    }
    let flags: [(&str, OsString); 9] = [
        ("--listen", loopback(s.pooler_port).to_string().into()),
        ("--cores", s.cores.to_string().into()),
        ("--pg-host", "127.0.0.1".into()),
        ("--pg-port", s.pg_port.to_string().into()),
        ("--admin-socket-dir", layout.socket_dir().into()),
        ("--admin-user", OS_USER.into()),
        ("--pool-size", s.pool_size.to_string().into()),
        ("--max-backends", s.max_backends.to_string().into()),
        // A path: the secret itself never goes on a command line, where `ps` shows it.
        ("--link-secret-file", layout.link_key_file().into()),
    ];
    for (flag, value) in flags {
        args.push(flag.into());
        args.push(value);
    }
    args
}

pub(crate) fn gateway_args(
    s: &ClusterSettings,
    layout: &Layout,
    run: &RunSettings,
) -> Vec<OsString> {
    let mut args: Vec<OsString> = Vec::new();
    if let Some(config) = &run.gateway_config {
        args.extend(["--config".into(), absolute(config)]);
    }
    let flags: [(&str, OsString); 4] = [
        ("--listen", loopback(s.port).to_string().into()),
        ("--cores", s.cores.to_string().into()),
        ("--pooler", loopback(s.pooler_port).to_string().into()),
        ("--link-secret-file", layout.link_key_file().into()),
    ];
    for (flag, value) in flags {
        args.push(flag.into());
        args.push(value);
    }
    args
}

/// Replaces the value of `flag` in `args` (or appends the pair).
pub(crate) fn set_flag(args: &mut Vec<OsString>, flag: &str, value: String) {
    if let Some(i) = args.iter().position(|a| a == flag) {
        if i + 1 < args.len() {
            args[i + 1] = value.into();
            return;
        }
    }
    args.push(flag.into());
    args.push(value.into());
}

fn merge_nodes(
    known: &[crate::state::NodeRecord],
    node: &crate::state::NodeRecord,
) -> Vec<crate::state::NodeRecord> {
    let mut out: Vec<_> = known
        .iter()
        .filter(|n| n.name != node.name)
        .cloned()
        .collect();
    out.push(node.clone());
    out
}

/// Starts a process not tracked as a [`Role`] tier (a standby's pooler, the control process)
/// unless `known` is its live pid; waits until it accepts on `addr` (port 0: only that it
/// keeps running for a moment). Returns its pid.
/// Before `role` starts: the OS account it runs as (`crate::privilege`; `None`: as the
/// caller) and, when that is not the caller, `args` pointed at the account's own copies of the
/// secrets they name (`DIR/keys/link.pooler.key`, `agent.pooler.key`, `agent.control.key`,
/// `etcd.control.password`); a
/// node agent's state directory (`--state-dir`) or the control process's (`DIR/control`)
/// made ready for it.
fn prepare_start(
    role: Role,
    layout: &Layout,
    args: &mut Vec<OsString>,
) -> Result<Option<crate::privilege::Account>> {
    let account = crate::privilege::account_for(role)?;
    if let Some(a) = &account {
        // A node's TLS key (DIR/tls/NODE.key), for the link and the agent alike.
        for flag in ["--link-tls-key", "--agent-tls-key"] {
            if let Some(master) = flag_value(args, flag) {
                let master = PathBuf::from(master);
                let stem = master
                    .file_stem()
                    .map(|s| s.to_string_lossy().into_owned())
                    .unwrap_or_default();
                let copy = crate::privilege::key_copy(
                    &master,
                    &layout.keys_dir(),
                    &format!("tls.{stem}.{}.key", role.name()),
                    Some(a),
                )?;
                set_flag(args, flag, copy.display().to_string());
            }
        }
        for (flag, master, kind) in [
            ("--link-secret-file", layout.link_key_file(), "link"),
            ("--agent-secret-file", layout.agent_key_file(), "agent"),
        ] {
            if flag_value(args, flag).is_some() {
                let copy = crate::privilege::key_copy(
                    &master,
                    &layout.keys_dir(),
                    &format!("{kind}.{}.key", role.name()),
                    Some(a),
                )?;
                set_flag(args, flag, copy.display().to_string());
            }
        }
        // The control process's etcd password and client key: the operator's files, wherever
        // they are.
        for (flag, kind) in [
            ("--etcd-password-file", "password"),
            ("--etcd-key-file", "key"),
        ] {
            if let Some(master) = flag_value(args, flag) {
                let copy = crate::privilege::key_copy(
                    Path::new(&master),
                    &layout.keys_dir(),
                    &format!("etcd.{}.{kind}", role.name()),
                    Some(a),
                )?;
                set_flag(args, flag, copy.display().to_string());
            }
        }
    }
    if let Some(dir) = flag_value(args, "--state-dir") {
        nodes::prepare_agent_dir(Path::new(&dir), account.as_ref())?;
    }
    if role == Role::Control {
        crate::control::files::prepare(layout, account.as_ref())?;
    }
    Ok(account)
}

/// The value following `flag` in `args`.
fn flag_value(args: &[OsString], flag: &str) -> Option<OsString> {
    let i = args.iter().position(|a| a == flag)?;
    args.get(i + 1).cloned()
}

#[allow(clippy::too_many_arguments)]
pub(crate) fn ensure_process(
    role: Role,
    bin: &Path,
    args: &[OsString],
    addr: SocketAddr,
    log: &Path,
    known: Option<u32>,
    layout: &Layout,
    timeout: Duration,
) -> Result<u32> {
    let name = role.name();
    if let Some(pid) = known.filter(|&p| liveness(p, role.program()) == Liveness::Alive) {
        eprintln!("{name} already running (pid {pid})");
        return Ok(pid);
    }
    if addr.port() != 0 {
        ensure_port_free(role, addr)?;
    }
    let mut args = args.to_vec();
    let account = prepare_start(role, layout, &mut args)?;
    eprintln!(
        "starting {name} {}{}",
        if addr.port() != 0 {
            addr.to_string()
        } else {
            String::new()
        },
        match &account {
            Some(a) => format!(" (as OS user {})", a.name),
            None => String::new(),
        }
    );
    let mut child = spawn_detached_as(bin, &args, log, account.as_ref())?;
    let ready = if addr.port() != 0 {
        wait_ready(name, &mut child, addr, timeout, log)
    } else {
        std::thread::sleep(Duration::from_millis(300));
        match child.try_wait() {
            Ok(None) => Ok(()),
            _ => Err(not_ready(name, addr, timeout, log)),
        }
    };
    if let Err(e) = ready {
        let _ = terminate(child.id(), role.program(), Duration::from_secs(5));
        let _ = child.try_wait();
        return Err(e);
    }
    Ok(child.id())
}

/// The detached processes run from `/`, so relative paths must be resolved here.
fn absolute(p: &Path) -> OsString {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .into_os_string()
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

fn check_ports(s: &ClusterSettings) -> Result<()> {
    let ports = [
        ("--port", s.port),
        ("--pooler-port", s.pooler_port),
        ("--pg-port", s.pg_port),
    ];
    s.metrics_addr()?;
    for (i, (a, pa)) in ports.iter().enumerate() {
        if *pa == 0 {
            return Err(Error::Conflict(format!("{a} must not be 0")));
        }
        for (b, pb) in &ports[i + 1..] {
            if pa == pb {
                return Err(Error::Conflict(format!(
                    "{a} and {b} are both {pa}: they must differ"
                )));
            }
        }
    }
    Ok(())
}

pub(crate) fn ensure_port_free(role: Role, addr: SocketAddr) -> Result<()> {
    if accepts(addr) {
        let flag = match role {
            Role::Postgres => "--pg-port",
            Role::Pooler => "--pooler-port",
            Role::Control => "--metrics-listen",
            Role::Gateway => "--port",
        };
        return Err(Error::Conflict(format!(
            "port {} (for the {}) is already in use by another program: free it or choose another with {flag}",
            addr.port(),
            role.name()
        )));
    }
    Ok(())
}

fn wait_accepting(addr: SocketAddr, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        if accepts(addr) {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn not_ready(name: &str, addr: SocketAddr, timeout: Duration, log: &Path) -> Error {
    Error::NotReady {
        name: name.to_string(),
        address: addr.to_string(),
        waited_secs: timeout.as_secs(),
        log: log.to_path_buf(),
        tail: crate::process::log_tail(log, 30),
    }
}

fn create_dir(dir: &Path) -> Result<()> {
    if dir.is_dir() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(Error::io(format!("creating {}", dir.display())))?;
    // Postgres runs as another OS user and must be able to pass through.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(Error::io(format!("chmod 755 {}", dir.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s() -> ClusterSettings {
        ClusterSettings {
            cores: 2,
            ..ClusterSettings::default()
        }
    }

    #[test]
    fn ports_must_differ_and_be_set() {
        assert!(check_ports(&s()).is_ok());
        let same = ClusterSettings {
            pooler_port: 15432,
            ..s()
        };
        assert!(check_ports(&same)
            .unwrap_err()
            .to_string()
            .contains("--port and --pooler-port"));
        let zero = ClusterSettings { pg_port: 0, ..s() };
        assert!(check_ports(&zero).is_err());
    }

    #[test]
    fn tier_flags_follow_the_contract() {
        let layout = Layout::new(Path::new("/tp")).unwrap();
        let run = RunSettings::default();
        let p: Vec<String> = pooler_args(&s(), &layout, &run)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            p.join(" "),
            "--listen 127.0.0.1:15433 --cores 2 --pg-host 127.0.0.1 --pg-port 5433 \
             --admin-socket-dir /tp/run --admin-user postgres --pool-size 20 --max-backends 100 \
             --link-secret-file /tp/link.key"
        );
        let run = RunSettings {
            gateway_config: Some("/etc/gw.toml".into()),
            ..RunSettings::default()
        };
        let g: Vec<String> = gateway_args(&s(), &layout, &run)
            .into_iter()
            .map(|a| a.into_string().unwrap())
            .collect();
        assert_eq!(
            g.join(" "),
            "--config /etc/gw.toml --listen 127.0.0.1:15432 --cores 2 --pooler 127.0.0.1:15433 \
             --link-secret-file /tp/link.key"
        );
    }
}
