//! `tidepool-gateway`: thread per core on io_uring (glommio). Each core owns a `SO_REUSEPORT`
//! listener and the sessions the kernel gives it, for their whole life, with no locks.

mod auth;
mod config;
mod core;
mod failover;
mod identity;
mod link;
mod session;
mod session_io;
mod tls;

use tidepool_gateway::{classify, statement_names};

use clap::Parser;
use glommio::net::{TcpListener, UnixListener};
use glommio::{LocalExecutorPoolBuilder, PoolPlacement};
use std::future::Future;
use std::os::fd::FromRawFd;
use std::rc::Rc;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
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
            eprintln!("tidepool-gateway: {e}");
            std::process::exit(2);
        }
    };
    let tls = match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(c), Some(k)) => match tls::acceptor(c, k) {
            Ok(a) => Some(a),
            Err(e) => {
                eprintln!("tidepool-gateway: TLS: {e}");
                std::process::exit(2);
            }
        },
        _ => None,
    };
    let mock_secret: [u8; 32] = rand::random();
    let clients = Arc::new(AtomicUsize::new(0));
    tracing::info!(listen = %cfg.listen, cores = cfg.cores, poolers = ?cfg.poolers, tls = tls.is_some(), "gateway starting");
    let cores = cfg.cores;
    // Spinning a little before parking saves the sleep/wake of the executor thread, which
    // dominated CPU per request under load (perf: finish_task_switch); 0 disables it.
    let spin = Duration::from_micros(cfg.spin_before_park_us);
    let handles = LocalExecutorPoolBuilder::new(PoolPlacement::Unbound(cores))
        .name("gateway")
        .spin_before_park(spin)
        .on_all_shards(move || {
            let cfg = Rc::new(cfg.clone());
            let tls = tls.clone();
            let clients = clients.clone();
            async move { run_core(cfg, tls, mock_secret, clients).await }
        });
    match handles {
        Ok(h) => {
            h.join_all();
        }
        Err(e) => {
            eprintln!("tidepool-gateway: cannot start executors: {e}");
            std::process::exit(1);
        }
    }
}

async fn run_core(
    cfg: Rc<config::Config>,
    tls: Option<futures_rustls::TlsAcceptor>,
    mock_secret: [u8; 32],
    clients: Arc<AtomicUsize>,
) {
    let core = core::Core::new(cfg.clone(), tls, mock_secret, clients);
    for (links, addr) in core.links.iter().zip(&cfg.poolers) {
        for l in links {
            glommio::spawn_local(l.clone().maintain(addr.clone())).detach();
        }
    }
    let listener = match shared::io::reuseport_listener(&cfg.listen) {
        // SAFETY: the fd comes from a listener we own and hand over whole.
        Ok(l) => unsafe { TcpListener::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(l)) },
        Err(e) => {
            eprintln!("tidepool-gateway: cannot listen on {}: {e}", cfg.listen);
            std::process::exit(1);
        }
    };
    // One Unix socket per process (a path cannot be shared): the first executor owns it.
    if let Some(dir) = &cfg.unix_socket_dir {
        if glommio::executor().id() == 1 {
            let port = listener.local_addr().map(|a| a.port()).unwrap_or(5432);
            let path = format!("{dir}/.s.PGSQL.{port}");
            let _ = std::fs::remove_file(&path);
            match UnixListener::bind(&path) {
                Ok(u) => {
                    use std::os::unix::fs::PermissionsExt;
                    let _ = std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777));
                    let core = core.clone();
                    glommio::spawn_local(async move {
                        loop {
                            match u.accept().await {
                                Ok(s) => glommio::spawn_local(session::serve_unix(core.clone(), s))
                                    .detach(),
                                Err(_) => {
                                    glommio::timer::sleep(Duration::from_millis(50)).await;
                                    continue;
                                }
                            };
                        }
                    })
                    .detach();
                }
                Err(e) => tracing::warn!(path = %path, error = %e, "cannot listen on Unix socket"),
            }
        }
    }
    if let Some(addr) = &cfg.read_only_listen {
        let ro = match shared::io::reuseport_listener(addr) {
            // SAFETY: the fd comes from a listener we own and hand over whole.
            Ok(l) => unsafe { TcpListener::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(l)) },
            Err(e) => {
                eprintln!("tidepool-gateway: cannot listen on {addr}: {e}");
                std::process::exit(1);
            }
        };
        let core = core.clone();
        glommio::spawn_local(async move {
            loop {
                match ro.accept().await {
                    Ok(s) => {
                        glommio::spawn_local(session::serve_tcp(core.clone(), s, true)).detach();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed (read-only listener)");
                        glommio::timer::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        })
        .detach();
    }
    // A spare descriptor, given up for a moment when we run out, so a client beyond the limit
    // hears why (53300) instead of waiting in the backlog.
    let mut spare = std::fs::File::open("/dev/null").ok();
    loop {
        match listener.accept().await {
            Ok(stream) => {
                glommio::spawn_local(session::serve_tcp(core.clone(), stream, false)).detach();
            }
            Err(e) => {
                let out_of_fds =
                    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
                        || e.to_string().contains("Too many open files");
                if out_of_fds {
                    drop(spare.take());
                    if let Ok(stream) = listener.accept().await {
                        session::refuse(stream, "sorry, too many clients already").await;
                    }
                    spare = std::fs::File::open("/dev/null").ok();
                    tracing::warn!("out of file descriptors: refusing new clients");
                } else {
                    tracing::warn!(error = %e, "accept failed");
                }
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
        }
    }
}
