//! The control process (`tidepool control`): watches every node agent, fails over when the
//! primary is gone, carries out switchovers, and repoints and rewinds nodes that follow an
//! old primary.
//!
//! Safety does not rest here: a failover recruits a majority of nodes for a new term (each
//! persists its pledge before answering) whose complement cannot satisfy the durability
//! policy, so no commit the old primary acknowledged is missed and the old primary can no
//! longer complete one. This process only decides *when*; a second one racing it can waste
//! a term, never produce two primaries of one term.

mod failover;
pub mod files;
mod probe;
mod reload;
mod requests;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use shared::agent::{Report, Role as NodeRole, Upstream};

use crate::cli::{ControlArgs, GlobalArgs};
use crate::cluster::Context;
use crate::config::{ClusterSettings, Timers};
use crate::error::{Error, Result};
use crate::metrics::{ControlMetrics, ReloadLabels, ReloadResult, Trigger, TriggerLabels};
use crate::state::{NodeRecord, State};
use crate::topology::{
    EtcdStore, FileStore, Leadership, OverrideRecord, Store, TermRecord, Topology, Version,
};

pub use requests::{submit, RequestKind};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub struct Controller {
    dir: PathBuf,
    /// The cluster's agent secret (DIR/agent.key), which every call to an agent proves, and
    /// the CA the agents' certificates are checked against.
    key: shared::agent::AgentAccess,
    settings: ClusterSettings,
    nodes: Vec<NodeRecord>,
    timers: Timers,
    topo: Topology,
    /// Where the topology lives, and the version of it `topo` was loaded at.
    store: Store,
    version: Option<Version>,
    /// This process's id and its leadership, when it leads.
    id: String,
    leadership: Option<Leadership>,
    /// When the primary was first seen unhealthy in the current stretch.
    bad_since: Option<Instant>,
    /// Nodes a Follow is running for (background tasks).
    following: Arc<Mutex<HashSet<String>>>,
    /// Last reason a failover was held back, logged once per change.
    held_back: Option<String>,
    /// After a failover attempt that could not proceed: not before this.
    retry_at: Option<Instant>,
    /// Whether this process leads, for the backup schedule's thread.
    pub leading: Arc<std::sync::atomic::AtomicBool>,
    /// The Prometheus metrics, when `metrics_listen` is set.
    metrics: Option<ControlMetrics>,
    /// The `--config` file, read again on SIGHUP (reload.rs).
    config: Option<PathBuf>,
    /// The settings in force and the files' view they came from.
    live: Option<reload::Live>,
    /// Set by the SIGHUP handler; the control loop reloads at its next step.
    hup: Arc<std::sync::atomic::AtomicBool>,
    /// After a reload changed the durability policy, the policy before, until the primary
    /// runs the new one's synchronous standbys: a failover meanwhile must satisfy both (a
    /// commit acknowledged under the old one is on a set satisfying the old one only).
    previous_durability: Option<String>,
}

pub fn run(global: &GlobalArgs, args: &ControlArgs) -> Result<bool> {
    let ctx = Context::load_dir(global)?;
    let mut state = State::load(&ctx.layout.state_file())?
        .ok_or_else(|| Error::NoCluster(ctx.layout.dir().to_path_buf()))?;
    state.agent_key_file = args
        .agent_secret_file
        .as_deref()
        .map(|p| std::path::absolute(p).map_err(Error::io("resolving --agent-secret-file")))
        .transpose()?;
    if let Some(file) = &args.etcd_password_file {
        // Kept by a reload too: `etcd_access` is not a key a reload applies.
        state.settings.etcd_access.password_file = Some(file.clone());
    }
    if let Some(file) = &args.etcd_key_file {
        state.settings.etcd_access.key_file = Some(file.clone());
    }
    if state.nodes.is_empty() {
        return run_schedule_only(&state, global, &ctx.layout.state_file(), args);
    }
    if state.nodes.len() < 2 {
        return Err(Error::Conflict(
            "the cluster has no standbys: nothing to control (tidepool up --standbys N)".into(),
        ));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("starting the control runtime"))?;
    let config = absolute_config(global)?;
    let (read, log_level) = reload::read(&ctx.layout.state_file(), config.as_deref())?;
    let live = reload::Live::start(&state.settings, read, log_level);
    state.settings = live.settings.clone();
    let mut c = Controller::new(ctx.layout.dir().to_path_buf(), &state)?;
    c.config = config;
    if let Some(addr) = state.settings.metrics_addr()? {
        let store = match c.store {
            Store::File(_) => "file",
            Store::Etcd(_) => "etcd",
        };
        let (m, registry) = ControlMetrics::new(store, crate::metrics::backup::start(&state));
        crate::metrics::http::serve(addr, registry)?;
        c.metrics = Some(m);
    }
    let mut live = live;
    live.schedule = crate::backup::schedule::start(&state, c.leading.clone())?;
    if let Some(m) = &c.metrics {
        m.config_not_applied.set(live.not_applied() as i64);
    }
    c.live = Some(live);
    let deadline = args
        .exit_after_secs
        .map(|s| Instant::now() + Duration::from_secs(s));
    rt.block_on(c.run(deadline));
    Ok(true)
}

/// Whether a cluster needs a control process: one with standbys always; a single node only
/// for its backup schedule.
pub fn wanted(state: &State) -> bool {
    !state.nodes.is_empty() || schedule_only(&state.settings)
}

fn schedule_only(settings: &ClusterSettings) -> bool {
    settings.backup.enabled && !settings.backup.schedule.is_empty()
}

/// A single-node cluster's control process: its backup schedule and nothing else (no node
/// to fail over to; the one Postgres is always the primary, so the schedule always "leads").
fn run_schedule_only(
    state: &State,
    global: &GlobalArgs,
    state_file: &std::path::Path,
    args: &ControlArgs,
) -> Result<bool> {
    if !schedule_only(&state.settings) {
        return Err(Error::Conflict(
            "a single-node cluster without a backup schedule: nothing to control (tidepool up \
             --standbys N, or a [backup] schedule)"
                .into(),
        ));
    }
    let config = absolute_config(global)?;
    let (read, log_level) = reload::read(state_file, config.as_deref())?;
    let mut live = reload::Live::start(&state.settings, read, log_level);
    let mut state = state.clone();
    state.settings = live.settings.clone();
    live.schedule =
        crate::backup::schedule::start(&state, Arc::new(std::sync::atomic::AtomicBool::new(true)))?;
    tracing::info!("control process running: the backup schedule of a single-node cluster");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("starting the control runtime"))?;
    rt.block_on(async {
        // `systemctl reload` sends SIGHUP, whose default action would end the process.
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .map_err(Error::io("installing a SIGHUP handler"))?;
        let until = args.exit_after_secs.map(Duration::from_secs);
        let wait = async {
            match until {
                Some(d) => tokio::time::sleep(d).await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(wait);
        loop {
            tokio::select! {
                _ = &mut wait => return Ok(true),
                _ = hup.recv() => match reload::read(state_file, config.as_deref()) {
                    // A single node has no failover: any policy that parses will do.
                    Ok((new, level)) => live
                        .reload(new, level, |s| {
                            crate::cluster::nodes::policy(s).map(|_| ()).map_err(|e| e.to_string())
                        })
                        .log(),
                    Err(e) => tracing::error!(error = %e, "SIGHUP: config not reloaded; the settings in force stay"),
                },
            }
        }
    })
}

impl Controller {
    pub fn new(dir: PathBuf, state: &State) -> Result<Controller> {
        let store = store_for(&dir, &state.settings)?;
        let key = crate::cluster::agent_access_with(&dir, &state.agent_key_path())?;
        Ok(Controller {
            key,
            dir,
            settings: state.settings.clone(),
            nodes: state.nodes.clone(),
            timers: state.settings.timers,
            topo: bootstrap_topology(state),
            store,
            version: None,
            id: format!("control-{}-{}", std::process::id(), now_ms()),
            leadership: None,
            bad_since: None,
            following: Arc::new(Mutex::new(HashSet::new())),
            held_back: None,
            retry_at: None,
            leading: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            metrics: None,
            config: None,
            live: None,
            hup: Arc::new(std::sync::atomic::AtomicBool::new(false)),
            previous_durability: None,
        })
    }

    /// Leads (campaigning or renewing) and loads the topology; `false`: do nothing this
    /// tick (another control process leads, or the store cannot be reached — which never
    /// demotes anything: the primary keeps running, only failover waits for the store).
    async fn lead(&mut self) -> bool {
        let ttl = Duration::from_millis((self.timers.failure_timeout_ms * 2).max(2000));
        let leading = match &self.leadership {
            Some(l) => self.store.renew(l).await,
            None => match self.store.campaign(&self.id, ttl).await {
                Ok(Some(l)) => {
                    tracing::info!(id = %self.id, "leading the cluster");
                    self.leadership = Some(l);
                    Ok(true)
                }
                Ok(None) => Ok(false),
                Err(e) => Err(e),
            },
        };
        self.store_result(leading.is_ok());
        match leading {
            Ok(true) => {}
            Ok(false) => {
                if self.leadership.take().is_some() {
                    tracing::warn!(id = %self.id, "leadership lost");
                }
                return false;
            }
            Err(e) => {
                self.hold_back(format!("topology store: {e}"));
                return false;
            }
        }
        let loaded = self.store.load().await;
        self.store_result(loaded.is_ok());
        match loaded {
            Ok(Some((topo, version))) => {
                self.topo = topo;
                self.version = Some(version);
                true
            }
            Ok(None) => {
                // First leader of a new cluster: store the bootstrap topology.
                match self.store.compare_and_swap(None, &self.topo).await {
                    Ok(true) => match self.store.load().await {
                        Ok(Some((topo, version))) => {
                            self.topo = topo;
                            self.version = Some(version);
                            true
                        }
                        _ => false,
                    },
                    Ok(false) => false,
                    Err(e) => {
                        self.hold_back(format!("topology store: {e}"));
                        false
                    }
                }
            }
            Err(e) => {
                self.hold_back(format!("topology store: {e}"));
                false
            }
        }
    }

    /// Stores `self.topo` over the version it was loaded at.
    async fn save(&mut self) -> Result<()> {
        match self.store.compare_and_swap(self.version, &self.topo).await {
            Ok(true) => {
                if let Ok(Some((_, v))) = self.store.load().await {
                    self.version = Some(v);
                }
                Ok(())
            }
            Ok(false) => Err(Error::Conflict(
                "the topology changed under this control process".into(),
            )),
            Err(e) => Err(Error::Conflict(format!("topology store: {e}"))),
        }
    }

    async fn run(&mut self, deadline: Option<Instant>) {
        tracing::info!(id = %self.id, nodes = self.nodes.len(), "control process running");
        // `systemctl reload` sends SIGHUP, whose default action would end the process.
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(mut hup) => {
                let flag = self.hup.clone();
                tokio::spawn(async move {
                    while hup.recv().await.is_some() {
                        flag.store(true, std::sync::atomic::Ordering::Relaxed);
                    }
                });
            }
            Err(e) => tracing::warn!(error = %e, "no SIGHUP handler"),
        }
        loop {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                return;
            }
            if self.hup.swap(false, std::sync::atomic::Ordering::Relaxed) {
                self.reload();
            }
            let interval = Duration::from_millis(self.timers.probe_interval_ms.max(10));
            let started = Instant::now();
            if let Err(e) = self.tick().await {
                tracing::warn!(error = %e, "control step failed");
            }
            self.leading.store(
                self.leadership.is_some(),
                std::sync::atomic::Ordering::Relaxed,
            );
            if let Some(m) = self.metrics.as_ref().filter(|_| self.leadership.is_none()) {
                m.not_leading();
            }
            let spent = started.elapsed();
            if spent < interval {
                tokio::time::sleep(interval - spent).await;
            }
        }
    }

    /// One look at every node and whatever that calls for.
    async fn tick(&mut self) -> Result<()> {
        if !self.lead().await {
            return Ok(());
        }
        self.grow_cohort().await?;
        let reports = probe::all(&self.key, &self.nodes, self.timers.agent_timeout_ms).await;
        self.learn(&reports).await?;
        self.observe(&reports);
        if let Some(req) = requests::next(&self.dir) {
            let outcome = match req.kind.clone() {
                RequestKind::Switchover { to } => {
                    let outcome = self.switchover(&reports, to.as_deref()).await;
                    if let (Some(m), Ok(())) = (&self.metrics, &outcome) {
                        m.switchovers.inc();
                    }
                    outcome
                }
                RequestKind::Failover { to, reason } => {
                    let started = Instant::now();
                    let outcome = self.failover(&reports, Some(reason), to.as_deref()).await;
                    self.count_failover(Trigger::forced, &outcome, started);
                    outcome
                }
            };
            requests::answer(&self.dir, &req, &outcome);
            return Ok(());
        }
        let p = self.primary_index();
        if self.primary_healthy(&reports[p]) {
            self.bad_since = None;
            self.held_back = None;
            self.repair(&reports).await;
            return Ok(());
        }
        let since = *self.bad_since.get_or_insert_with(Instant::now);
        if since.elapsed() < Duration::from_millis(self.timers.failure_timeout_ms) {
            return Ok(());
        }
        if let Some(witness) = self.standby_still_hears_primary(&reports) {
            self.hold_back(format!(
                "the control process cannot reach primary {} but standby {witness} still streams from it",
                self.primary_name()
            ));
            return Ok(());
        }
        if self.retry_at.is_some_and(|t| Instant::now() < t) {
            return Ok(());
        }
        let started = Instant::now();
        let outcome = self.failover(&reports, None, None).await;
        self.count_failover(Trigger::automatic, &outcome, started);
        if let Err(e) = outcome {
            self.hold_back(e.to_string());
            // A failed attempt used a term; the next waits a little (nodes coming back, an
            // operator) instead of burning a term every probe.
            self.retry_at = Some(
                Instant::now() + Duration::from_millis(self.timers.failure_timeout_ms.max(500)),
            );
        } else {
            self.retry_at = None;
        }
        Ok(())
    }

    /// Nodes added since the topology was stored (`tidepool node add`, then this process
    /// restarted) join its node list. Only ever grows, one node per `node add`.
    async fn grow_cohort(&mut self) -> Result<()> {
        let missing: Vec<crate::topology::NodeRecord> = bootstrap_topology_nodes(&self.nodes)
            .into_iter()
            .filter(|n| !self.topo.nodes.iter().any(|t| t.name == n.name))
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        for n in &missing {
            tracing::warn!(node = %n.name, "node joins the cohort");
        }
        self.topo.nodes.extend(missing);
        self.save().await
    }

    fn store_result(&self, ok: bool) {
        if let Some(m) = &self.metrics {
            m.store_result(ok);
        }
    }

    /// The nodes, the term and the primary as this look found them, for the metrics.
    fn observe(&self, reports: &[probe::Probe]) {
        if let Some(m) = &self.metrics {
            let names: Vec<String> = self.nodes.iter().map(|n| n.name.clone()).collect();
            m.observe(
                &names,
                reports,
                self.topo.primary.as_deref(),
                self.topo.term,
                self.topo.primary_term,
            );
        }
    }

    fn count_failover(&self, trigger: Trigger, outcome: &Result<()>, started: Instant) {
        let Some(m) = &self.metrics else { return };
        match outcome {
            Ok(()) => {
                m.failovers.get_or_create(&TriggerLabels { trigger }).inc();
                m.failover_duration.observe(started.elapsed().as_secs_f64());
            }
            Err(_) => {
                m.failover_failures.inc();
            }
        }
    }

    fn hold_back(&mut self, why: String) {
        if self.held_back.as_deref() != Some(why.as_str()) {
            tracing::warn!(reason = %why, "no failover");
            self.held_back = Some(why);
        }
    }

    fn primary_index(&self) -> usize {
        self.nodes
            .iter()
            .position(|n| Some(&n.name) == self.topo.primary.as_ref())
            .unwrap_or(0)
    }

    fn primary_name(&self) -> String {
        self.topo.primary.clone().unwrap_or_default()
    }

    fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.iter().position(|n| n.name == name)
    }

    fn primary_healthy(&self, report: &probe::Probe) -> bool {
        matches!(report, Ok(r) if r.role == NodeRole::Primary && r.primary_term >= self.topo.primary_term)
    }

    /// A node that was promoted at a higher term than we know (a control process that died
    /// between promote and save, or another control process) is the primary.
    async fn learn(&mut self, reports: &[probe::Probe]) -> Result<()> {
        // Pledges above our term come from a failover that did not finish (this process died
        // between recruit and promote, or another one is at work): the term moves past them,
        // so that a primary still healthy can take its recruited standbys back (repair).
        let pledged = reports
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|r| r.term))
            .max()
            .unwrap_or(0);
        if pledged > self.topo.term {
            tracing::info!(
                from = self.topo.term,
                to = pledged,
                "term moves to the highest pledge"
            );
            self.topo.term = pledged;
            self.save().await?;
        }
        let newest = reports
            .iter()
            .zip(&self.nodes)
            .filter_map(|(r, n)| r.as_ref().ok().map(|r| (r, n)))
            .filter(|(r, _)| r.role == NodeRole::Primary && r.primary_term > self.topo.primary_term)
            .max_by_key(|(r, _)| r.primary_term);
        if let Some((r, n)) = newest {
            tracing::warn!(node = %n.name, term = r.primary_term, "adopting a primary of a newer term");
            self.topo.term = self.topo.term.max(r.primary_term);
            self.set_primary(
                n.name.clone(),
                r.primary_term,
                "adopted: promoted at a newer term",
            )
            .await?;
        }
        Ok(())
    }

    async fn set_primary(&mut self, name: String, term: u64, reason: &str) -> Result<()> {
        self.topo.primary = Some(name.clone());
        self.topo.primary_term = term;
        self.topo.term = self.topo.term.max(term);
        self.topo.history.push(TermRecord {
            term,
            primary: name,
            at_unix_ms: now_ms(),
            reason: reason.to_string(),
        });
        self.bad_since = None;
        self.save().await
    }

    async fn record_override(&mut self, term: u64, reason: &str) -> Result<()> {
        self.topo.overrides.push(OverrideRecord {
            term,
            by: "tidepool failover --force".into(),
            reason: reason.to_string(),
            at_unix_ms: now_ms(),
        });
        self.save().await
    }

    /// A standby streaming from the primary that heard from it recently: the primary lives,
    /// only our view of it is lost.
    fn standby_still_hears_primary(&self, reports: &[probe::Probe]) -> Option<String> {
        let primary = &self.nodes[self.primary_index()];
        reports.iter().zip(&self.nodes).find_map(|(r, n)| {
            let r = r.as_ref().ok()?;
            let hears = r.role == NodeRole::Standby
                && r.streaming
                && r.receipt_age_ms
                    .is_some_and(|age| age < self.timers.standby_heard_ms)
                && r.upstream
                    .as_ref()
                    .is_some_and(|u| u.port == primary.pg_port);
            (n.name != primary.name && hears).then(|| n.name.clone())
        })
    }

    /// Where standbys of `node` stream from: its Unix socket directory (peer auth).
    fn upstream(&self, i: usize) -> Upstream {
        Upstream {
            host: self.nodes[i].socket_dir.display().to_string(),
            port: self.nodes[i].pg_port,
        }
    }

    /// With a healthy primary: nodes that do not stream from it (an old primary back, a
    /// standby stopped by a recruit, one pointed elsewhere) are told to follow it, and the
    /// primary's synchronous standbys are kept to the policy.
    async fn repair(&mut self, reports: &[probe::Probe]) {
        let p = self.primary_index();
        let primary_port = self.nodes[p].pg_port;
        for (i, r) in reports.iter().enumerate() {
            let Ok(r) = r else { continue };
            if i == p {
                match crate::cluster::nodes::sync_names(
                    &self.settings,
                    &self.nodes,
                    &self.nodes[p].name,
                ) {
                    Ok(want) if want != r.sync_names && !r.recruited => {
                        tracing::info!(node = %self.nodes[p].name, sync = %want, "setting synchronous standbys");
                        let req = shared::agent::Request::SetSync {
                            term: self.topo.term,
                            sync_names: want,
                        };
                        if let Err(e) = probe::call(
                            &self.key,
                            &self.nodes[p],
                            req,
                            self.timers.operation_timeout_ms,
                        )
                        .await
                        {
                            tracing::warn!(error = %e, "set_sync failed");
                        }
                    }
                    Ok(want) if want == r.sync_names => {
                        if let Some(old) = self.previous_durability.take() {
                            tracing::info!(from = %old, to = %self.settings.durability, sync = %want, "durability policy in force on the primary");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "durability policy"),
                }
                continue;
            }
            let needs = match r.role {
                NodeRole::Primary => r.primary_term < self.topo.primary_term || r.recruited,
                NodeRole::Standby => {
                    r.recruited || r.upstream.as_ref().map(|u| u.port) != Some(primary_port)
                }
                NodeRole::Down => false,
            };
            if needs && r.term <= self.topo.term {
                self.follow_in_background(i);
            }
        }
    }

    /// SIGHUP: the files again, and what can change live applied (reload.rs).
    fn reload(&mut self) {
        let state_file = crate::layout::Layout::new(&self.dir).map(|l| l.state_file());
        let read = state_file.and_then(|f| reload::read(&f, self.config.as_deref()));
        let (new, level) = match read {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "SIGHUP: config not reloaded; the settings in force stay");
                if let Some(m) = &self.metrics {
                    m.config_reloads
                        .get_or_create(&ReloadLabels {
                            result: ReloadResult::error,
                        })
                        .inc();
                }
                return;
            }
        };
        let primary = self.nodes[self.primary_index()].name.clone();
        let nodes = &self.nodes;
        let Some(live) = self.live.as_mut() else {
            return;
        };
        let out = live.reload(new, level, |s| {
            crate::cluster::nodes::sync_names(s, nodes, &primary)
                .map(|_| ())
                .map_err(|e| e.to_string())
        });
        out.log();
        if let Some(m) = &self.metrics {
            m.config_reloads
                .get_or_create(&ReloadLabels {
                    result: ReloadResult::ok,
                })
                .inc();
            m.config_not_applied.set(live.not_applied() as i64);
        }
        let now = live.settings.clone();
        if now.durability != self.settings.durability {
            // The first change since the primary last ran the policy in force: the old one is
            // what acknowledged commits satisfy.
            if self.previous_durability.is_none() {
                self.previous_durability = Some(self.settings.durability.clone());
            }
            tracing::warn!(from = %self.settings.durability, to = %now.durability, "durability policy changing: failovers satisfy both until the primary runs the new one");
        }
        self.timers = now.timers;
        self.settings = now;
    }

    fn follow_in_background(&self, i: usize) {
        let name = self.nodes[i].name.clone();
        {
            let Ok(mut set) = self.following.lock() else {
                return;
            };
            if !set.insert(name.clone()) {
                return;
            }
        }
        let node = self.nodes[i].clone();
        let req = shared::agent::Request::Follow {
            term: self.topo.term,
            primary: self.upstream(self.primary_index()),
        };
        let following = self.following.clone();
        let key = self.key.clone();
        let timeout = self.timers.operation_timeout_ms * 4;
        tracing::info!(node = %name, primary = %self.primary_name(), term = self.topo.term, "telling node to follow the primary");
        tokio::spawn(async move {
            match probe::call(&key, &node, req, timeout).await {
                Ok(_) => tracing::info!(node = %node.name, "follows the primary"),
                Err(e) => tracing::warn!(node = %node.name, error = %e, "follow failed"),
            }
            if let Ok(mut set) = following.lock() {
                set.remove(&node.name);
            }
        });
    }
}

/// The `--config` file as an absolute path (the process may change directory; a reload reads
/// the same file).
fn absolute_config(global: &GlobalArgs) -> Result<Option<PathBuf>> {
    global
        .config
        .as_deref()
        .map(|p| std::path::absolute(p).map_err(Error::io("resolving --config")))
        .transpose()
}

/// The store a cluster's settings name: etcd with `etcd`, else `DIR/control/topology.json`
/// (in the control process's own directory: `files`).
pub fn store_for(dir: &std::path::Path, settings: &ClusterSettings) -> Result<Store> {
    match settings.etcd.as_deref().filter(|e| !e.is_empty()) {
        Some(urls) => EtcdStore::new(urls, &settings.cluster_name, Duration::from_secs(2))
            .and_then(|s| s.with_access(&settings.etcd_access))
            .map(Store::Etcd)
            .map_err(|e| Error::Conflict(format!("--etcd: {e}"))),
        None => Ok(Store::File(FileStore::new(
            dir.join(crate::layout::CONTROL_DIR).join("topology.json"),
        ))),
    }
}

/// The topology's records of `nodes`.
fn bootstrap_topology_nodes(
    nodes: &[crate::state::NodeRecord],
) -> Vec<crate::topology::NodeRecord> {
    nodes
        .iter()
        .map(|n| crate::topology::NodeRecord {
            name: n.name.clone(),
            zone: n.zone.clone(),
            pooler: n.pooler,
            agent: n.agent,
            pg_port: n.pg_port,
            data_dir: n.data_dir.clone(),
        })
        .collect()
}

/// The topology of a cluster just brought up: term 0, node1 primary.
pub fn bootstrap_topology(state: &State) -> Topology {
    let first = state
        .nodes
        .first()
        .map(|n| n.name.clone())
        .unwrap_or_default();
    Topology {
        cluster: state.settings.cluster_name.clone(),
        term: 0,
        primary: Some(first.clone()),
        primary_term: 0,
        nodes: bootstrap_topology_nodes(&state.nodes),
        policy: state.settings.durability.clone(),
        history: vec![TermRecord {
            term: 0,
            primary: first,
            at_unix_ms: now_ms(),
            reason: "bootstrap".into(),
        }],
        overrides: Vec::new(),
    }
}

/// The stored topology (for `status`), loaded on a throwaway runtime.
pub fn load_topology(dir: &std::path::Path, settings: &ClusterSettings) -> Option<Topology> {
    let store = store_for(dir, settings).ok()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .ok()?;
    rt.block_on(store.load()).ok().flatten().map(|(t, _)| t)
}

/// Takes `name` out of the stored topology's cohort (`tidepool node remove`, while no control
/// process runs), by compare-and-swap over the version loaded. `false`: no stored topology
/// named it.
pub fn remove_from_topology(
    dir: &std::path::Path,
    settings: &ClusterSettings,
    name: &str,
) -> Result<bool> {
    let store = store_for(dir, settings)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(Error::io("starting a runtime for the topology store"))?;
    rt.block_on(async {
        for _ in 0..5 {
            let Some((mut topo, version)) = store
                .load()
                .await
                .map_err(|e| Error::Conflict(format!("topology store: {e}")))?
            else {
                return Ok(false);
            };
            if !topo.nodes.iter().any(|n| n.name == name) {
                return Ok(false);
            }
            topo.nodes.retain(|n| n.name != name);
            match store.compare_and_swap(Some(version), &topo).await {
                Ok(true) => return Ok(true),
                Ok(false) => tokio::time::sleep(Duration::from_millis(200)).await,
                Err(e) => return Err(Error::Conflict(format!("topology store: {e}"))),
            }
        }
        Err(Error::Conflict(
            "the topology kept changing while removing a node from it: is another control \
             process running?"
                .into(),
        ))
    })
}

/// `Report` with a name, for status output.
pub fn describe(r: &Report) -> String {
    format!("{} term {} timeline {}", r.role.name(), r.term, r.timeline)
}
