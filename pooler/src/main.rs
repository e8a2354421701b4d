//! `tidepool-pooler`: one per Postgres. A small stable set of real backend connections per core,
//! shared by every session of every gateway, without locks on the request path.

mod admin;
mod agent;
mod backend;
mod budget;
mod cancel;
mod config;
mod core;
mod link;
mod listen;
mod listen_names;
mod login;
mod mesh;
mod metrics;
mod pids;
mod pool;
mod pools_report;
mod readback;
mod responses;
mod server_end;
mod server_tls;
mod servers;
mod session;
mod signal_denied;
mod sql_names;
mod statements;

use clap::Parser;
use glommio::channels::channel_mesh::MeshBuilder;
use glommio::net::TcpListener;
use glommio::{LocalExecutorPoolBuilder, PoolPlacement};
use std::future::Future;
use std::os::fd::FromRawFd;
use std::rc::Rc;
use std::time::Duration;

/// `fut`'s output, or `None` if `dur` passes first.
pub async fn with_timeout<T>(dur: Duration, fut: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        glommio::timer::sleep(dur).await;
        None
    })
    .await
}

type Lifecycle = shared::lifecycle::Lifecycle<config::Config>;

/// SIGHUP: the file read again under the same flags; what can change live is applied (the
/// budgets at once, here; the rest by each core on its next tick), the rest is logged as
/// needing a restart. A file that no longer parses changes nothing.
fn reload(
    args: &config::Args,
    now: &config::Config,
    budgets: &budget::Budgets,
) -> Option<config::Config> {
    let new = match config::Config::load(args.clone()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload: the configuration is not valid; nothing changed");
            return None;
        }
    };
    let (merged, live, restart) = now.reloaded(&new);
    budgets.set_limits(merged.limits());
    if merged.log_level != now.log_level {
        if let Err(e) = shared::logging::set_level(&merged.log_level) {
            tracing::error!(error = %e, "reload: log_level not applied");
        }
    }
    if !restart.is_empty() {
        tracing::warn!(keys = ?restart, "reload: these changed in the file but take effect only after a restart");
    }
    tracing::info!(changed = ?live, "configuration reloaded");
    Some(merged)
}

fn main() {
    shared::logging::init("info");
    let args = config::Args::parse();
    let cfg = match config::Config::load(args.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tidepool-pooler: {e}");
            std::process::exit(2);
        }
    };
    if std::env::var_os("RUST_LOG").is_none() && cfg.log_level != "info" {
        if let Err(e) = shared::logging::set_level(&cfg.log_level) {
            eprintln!("tidepool-pooler: {e}");
            std::process::exit(2);
        }
    }
    tracing::info!(listen = %cfg.listen, link_tls = cfg.link_tls.is_some(), cores = cfg.cores, pg = %format!("{}:{}", cfg.pg_host, cfg.pg_port), "pooler starting");
    if let Err(e) = agent::start(&cfg) {
        eprintln!("tidepool-pooler: {e}");
        std::process::exit(2);
    }
    let cores = cfg.cores;
    let mesh = MeshBuilder::full(cores, 1024);
    let budgets = budget::Budgets::new(cfg.limits(), cores);
    // Cores still draining: a core done early keeps its links up until all are done.
    let draining = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(cores));
    let life = Lifecycle::new(cfg.clone());
    let metrics = metrics::Metrics::new(cores);
    if let Some(addr) = &cfg.metrics_listen {
        let (budgets, metrics) = (budgets.clone(), metrics.clone());
        if let Err(e) =
            shared::metrics_http::serve(addr, move |om| metrics::render(&budgets, &metrics, om))
        {
            eprintln!("tidepool-pooler: cannot serve metrics on {addr}: {e}");
            std::process::exit(1);
        }
    }
    let reload_budgets = budgets.clone();
    if let Err(e) = life.watch_signals(move |now| reload(&args, now, &reload_budgets)) {
        eprintln!("tidepool-pooler: cannot watch signals: {e}");
        std::process::exit(1);
    }
    let shared_cfg = cfg.clone();
    // Spinning a little before parking saves the sleep/wake of the executor thread, which
    // dominated CPU per request under load (perf: finish_task_switch); 0 disables it.
    let spin = Duration::from_micros(cfg.spin_before_park_us);
    let handles = LocalExecutorPoolBuilder::new(PoolPlacement::Unbound(cores))
        .name("pooler")
        .spin_before_park(spin)
        .on_all_shards(move || {
            let cfg = Rc::new(shared_cfg.clone());
            let mesh = mesh.clone();
            let budgets = budgets.clone();
            let life = life.clone();
            let draining = draining.clone();
            let metrics = metrics.clone();
            async move {
                metrics.install(glommio::executor().id().saturating_sub(1));
                run_core(cfg, budgets, mesh, life, draining).await
            }
        });
    match handles {
        Ok(h) => {
            h.join_all();
            tracing::info!("pooler stopped");
        }
        Err(e) => {
            eprintln!("tidepool-pooler: cannot start executors: {e}");
            std::process::exit(1);
        }
    }
}

/// Until SIGTERM: applies each reload to this core. Returns when the drain starts.
async fn watch_lifecycle(core: &core::Core, life: &Lifecycle) {
    let mut seen = life.generation();
    loop {
        glommio::timer::sleep(shared::lifecycle::TICK).await;
        let g = life.generation();
        if g != seen {
            seen = g;
            core.set_live(Rc::new((*life.current()).clone()));
        }
        if life.draining() {
            return;
        }
    }
}

/// PgBouncer's server_idle_timeout and server_lifetime: closes idle backends that idled or
/// lived too long. Only idle ones: a backend a session holds is never taken from it (one past
/// its lifetime is closed when it is released, `pool::release`).
async fn janitor(core: Rc<core::Core>) {
    loop {
        let cfg = core.live();
        let ms = |v: u64| (v > 0).then(|| Duration::from_millis(v));
        let (idle, lifetime) = (ms(cfg.server_idle_timeout_ms), ms(cfg.server_lifetime_ms));
        // A quarter of the shortest limit, between 50 ms and 1 s: a backend lives at most that
        // much past its limit.
        let period = [idle, lifetime]
            .into_iter()
            .flatten()
            .min()
            .map_or(Duration::from_secs(1), |d| d / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        glommio::timer::sleep(period).await;
        if idle.is_none() && lifetime.is_none() {
            continue;
        }
        for p in core.pools.all() {
            let (by_idle, by_age) = p.expire(&core.pools, idle, lifetime);
            if by_idle + by_age > 0 {
                tracing::debug!(user = %p.key.user, db = %p.key.database, by_idle, by_age, "closed idle backends (server_idle_timeout, server_lifetime)");
            }
        }
    }
}

async fn run_core(
    cfg: Rc<config::Config>,
    budgets: std::sync::Arc<budget::Budgets>,
    mesh: MeshBuilder<mesh::CoreMsg, glommio::channels::channel_mesh::Full>,
    life: std::sync::Arc<Lifecycle>,
    draining: std::sync::Arc<std::sync::atomic::AtomicUsize>,
) {
    let (senders, receivers) = match mesh.join().await {
        Ok(x) => x,
        Err(e) => {
            eprintln!("tidepool-pooler: core mesh failed: {e}");
            std::process::exit(1);
        }
    };
    let index = senders.peer_id();
    let core = core::Core::new(cfg.clone(), index, budgets);
    core.peers.connect(Rc::new(senders));
    glommio::spawn_local(cancel::serve_peers(core.clone(), receivers)).detach();
    glommio::spawn_local(janitor(core.clone())).detach();
    let listener = match shared::io::reuseport_listener(&cfg.listen) {
        // SAFETY: the fd comes from a listener we own and hand over whole.
        Ok(l) => unsafe { TcpListener::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(l)) },
        Err(e) => {
            eprintln!("tidepool-pooler: cannot listen on {}: {e}", cfg.listen);
            std::process::exit(1);
        }
    };
    let accept = async {
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    tracing::info!(core = core.index, peer = ?stream.peer_addr().ok(), "gateway link accepted");
                    glommio::spawn_local(link::serve(core.clone(), stream)).detach();
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    glommio::timer::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    };
    futures_lite::future::or(accept, watch_lifecycle(&core, &life)).await;
    drop(listener);
    drain(&core).await;
    // Until every core is done: a core that returned would take its links with it, and a
    // gateway logging a client in over one of them would see the link die rather than hear
    // 57P03 from this pooler.
    draining.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    while draining.load(std::sync::atomic::Ordering::Acquire) > 0 {
        glommio::timer::sleep(shared::lifecycle::TICK).await;
    }
}

/// SIGTERM on this core: no new links (the listener is closed) and no new sessions; sessions
/// end at their next idle moment with 57P01 (the gateway passes it to the client), the rest
/// when `shutdown_timeout_ms` has passed; then this core returns.
async fn drain(core: &Rc<core::Core>) {
    let timeout = Duration::from_millis(core.live().shutdown_timeout_ms);
    core.draining.set(true);
    tracing::info!(
        core = core.index,
        sessions = core.sessions_by_key.borrow().len(),
        ?timeout,
        "draining: link listener closed"
    );
    // The links the sessions answer on, to be flushed before the process exits.
    let mut links: Vec<Rc<shared::io::OutQueue>> = Vec::new();
    let note_links = |links: &mut Vec<Rc<shared::io::OutQueue>>| {
        for s in core
            .sessions_by_key
            .borrow()
            .values()
            .filter_map(|w| w.upgrade())
        {
            if !links.iter().any(|l| Rc::ptr_eq(l, s.link())) {
                links.push(s.link().clone());
            }
        }
    };
    let deadline = std::time::Instant::now() + timeout;
    // Sessions look again on every tick: one whose transaction ended meanwhile is idle now.
    while !core.sessions_by_key.borrow().is_empty() && std::time::Instant::now() < deadline {
        note_links(&mut links);
        core.drain_notify.notify();
        glommio::timer::sleep(shared::lifecycle::TICK).await;
    }
    if !core.sessions_by_key.borrow().is_empty() {
        tracing::warn!(
            sessions = core.sessions_by_key.borrow().len(),
            "shutdown timeout: ending the sessions still in a transaction"
        );
        note_links(&mut links);
        core.force.set(true);
        core.drain_notify.notify();
        let grace = std::time::Instant::now() + Duration::from_secs(2);
        while !core.sessions_by_key.borrow().is_empty() && std::time::Instant::now() < grace {
            core.drain_notify.notify();
            glommio::timer::sleep(shared::lifecycle::TICK).await;
        }
    }
    for l in links {
        let _ = with_timeout(Duration::from_millis(500), l.flushed()).await;
    }
}
