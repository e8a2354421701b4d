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
mod pids;
mod pool;
mod readback;
mod responses;
mod session;
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

fn main() {
    shared::logging::init("info");
    let cfg = match config::Config::load(config::Args::parse()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tidepool-pooler: {e}");
            std::process::exit(2);
        }
    };
    tracing::info!(listen = %cfg.listen, cores = cfg.cores, pg = %format!("{}:{}", cfg.pg_host, cfg.pg_port), "pooler starting");
    if let Err(e) = agent::start(&cfg) {
        eprintln!("tidepool-pooler: {e}");
        std::process::exit(2);
    }
    let cores = cfg.cores;
    let mesh = MeshBuilder::full(cores, 1024);
    let cfg = Rc::new(cfg);
    let shared_cfg = (*cfg).clone();
    let budgets = budget::Budgets::new(cfg.pool_size, cfg.max_backends, cores);
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
            async move { run_core(cfg, budgets, mesh).await }
        });
    match handles {
        Ok(h) => {
            h.join_all();
        }
        Err(e) => {
            eprintln!("tidepool-pooler: cannot start executors: {e}");
            std::process::exit(1);
        }
    }
}

async fn run_core(
    cfg: Rc<config::Config>,
    budgets: std::sync::Arc<budget::Budgets>,
    mesh: MeshBuilder<core::CoreMsg, glommio::channels::channel_mesh::Full>,
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
    *core.peers.borrow_mut() = Some(Rc::new(senders));
    glommio::spawn_local(cancel::serve_peers(core.clone(), receivers)).detach();
    let listener = match shared::io::reuseport_listener(&cfg.listen) {
        // SAFETY: the fd comes from a listener we own and hand over whole.
        Ok(l) => unsafe { TcpListener::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(l)) },
        Err(e) => {
            eprintln!("tidepool-pooler: cannot listen on {}: {e}", cfg.listen);
            std::process::exit(1);
        }
    };
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
}
