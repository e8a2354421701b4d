//! `tidepool-gateway`: thread per core on io_uring (glommio). Each core owns a `SO_REUSEPORT`
//! listener and the sessions the kernel gives it, for their whole life, with no locks.

mod access;
mod admin;
mod auth;
mod config;
mod core;
mod failover;
mod identity;
mod link;
mod metrics;
mod pid_registry;
mod refusal;
mod registry;
mod session;
mod session_ids;
mod session_io;
mod signals;
mod terminate_wait;
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
use std::time::{Duration, Instant};

/// `fut`'s output, or `None` if `dur` passes first.
pub async fn with_timeout<T>(dur: Duration, fut: impl Future<Output = T>) -> Option<T> {
    futures_lite::future::or(async { Some(fut.await) }, async {
        glommio::timer::sleep(dur).await;
        None
    })
    .await
}

/// What a reload publishes to every core: the config in force and the TLS acceptor made from
/// its certificate files (read on the signal thread, not on a core).
pub struct Live {
    pub cfg: config::Config,
    pub tls: Option<futures_rustls::TlsAcceptor>,
}

type Lifecycle = shared::lifecycle::Lifecycle<Live>;

fn tls_of(cfg: &config::Config) -> Result<Option<futures_rustls::TlsAcceptor>, String> {
    match (&cfg.tls_cert, &cfg.tls_key) {
        (Some(c), Some(k)) => tls::acceptor(c, k).map(Some),
        _ => Ok(None),
    }
}

/// SIGHUP: the file read again under the same flags; what can change live is applied, the rest
/// is logged as needing a restart. A file that no longer parses changes nothing.
fn reload(args: &config::Args, now: &Live) -> Option<Live> {
    let new = match config::Config::load(args.clone()) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "reload: the configuration is not valid; nothing changed");
            return None;
        }
    };
    let (merged, live, restart) = now.cfg.reloaded(&new);
    let tls_changed = live.contains(&"tls_cert") || live.contains(&"tls_key");
    // Certificates are read again on every reload (a renewed certificate keeps its file name).
    let tls = match tls_of(&merged) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(error = %e, "reload: TLS certificate or key not usable; nothing changed");
            return None;
        }
    };
    if merged.log_level != now.cfg.log_level {
        if let Err(e) = shared::logging::set_level(&merged.log_level) {
            tracing::error!(error = %e, "reload: log_level not applied");
        }
    }
    if !restart.is_empty() {
        tracing::warn!(keys = ?restart, "reload: these changed in the file but take effect only after a restart");
    }
    tracing::info!(changed = ?live, tls_reloaded = tls.is_some() || tls_changed, "configuration reloaded");
    Some(Live { cfg: merged, tls })
}

fn main() {
    shared::logging::init("info");
    let args = config::Args::parse();
    let cfg = match config::Config::load(args.clone()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("tidepool-gateway: {e}");
            std::process::exit(2);
        }
    };
    if std::env::var_os("RUST_LOG").is_none() && cfg.log_level != "info" {
        if let Err(e) = shared::logging::set_level(&cfg.log_level) {
            eprintln!("tidepool-gateway: {e}");
            std::process::exit(2);
        }
    }
    let tls = match tls_of(&cfg) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("tidepool-gateway: TLS: {e}");
            std::process::exit(2);
        }
    };
    let life = Lifecycle::new(Live {
        cfg: cfg.clone(),
        tls: tls.clone(),
    });
    // The admin console's RELOAD and SHUTDOWN do what SIGHUP and SIGTERM do.
    let admin = {
        let (args, for_reload, for_shutdown, for_set) =
            (args.clone(), life.clone(), life.clone(), life.clone());
        registry::Shared::new(
            cfg.cores,
            registry::Control {
                reload: Box::new(move || {
                    tracing::info!("admin console: RELOAD");
                    if let Some(next) = reload(&args, &for_reload.current()) {
                        for_reload.publish(next);
                    }
                }),
                shutdown: Box::new(move || for_shutdown.start_drain()),
                set: Box::new(move |key, value| {
                    let now = for_set.current();
                    let mut cfg = now.cfg.clone();
                    cfg.set(key, value)?;
                    tracing::info!(key, value, "admin console: SET");
                    for_set.publish(Live {
                        cfg,
                        tls: now.tls.clone(),
                    });
                    Ok(())
                }),
            },
        )
    };
    let metrics = metrics::Metrics::new(cfg.cores);
    if let Some(addr) = &cfg.metrics_listen {
        let (admin, metrics) = (admin.clone(), metrics.clone());
        if let Err(e) =
            shared::metrics_http::serve(addr, move |om| metrics::render(&admin, &metrics, om))
        {
            eprintln!("tidepool-gateway: cannot serve metrics on {addr}: {e}");
            std::process::exit(1);
        }
    }
    if let Err(e) = life.watch_signals(move |now| reload(&args, now)) {
        eprintln!("tidepool-gateway: cannot watch signals: {e}");
        std::process::exit(1);
    }
    let mock_secret: [u8; 32] = rand::random();
    let clients = Arc::new(AtomicUsize::new(0));
    tracing::info!(listen = %cfg.listen, cores = cfg.cores, poolers = ?cfg.poolers, tls = tls.is_some(), link_tls = cfg.link_tls.is_some(), "gateway starting");
    // Sessions' pids shared with the other gateway processes on this port (signals.rs).
    if let Some(port) = cfg.listen.rsplit(':').next().and_then(|p| p.parse().ok()) {
        pid_registry::open(port);
    }
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
            let life = life.clone();
            let admin = admin.clone();
            let metrics = metrics.clone();
            async move {
                metrics.install(glommio::executor().id().saturating_sub(1));
                run_core(cfg, tls, mock_secret, clients, life, admin).await
            }
        });
    match handles {
        Ok(h) => {
            h.join_all();
            tracing::info!("gateway stopped");
        }
        Err(e) => {
            eprintln!("tidepool-gateway: cannot start executors: {e}");
            std::process::exit(1);
        }
    }
}

/// Until SIGTERM: applies each reload to this core. Returns when the drain starts.
async fn watch_lifecycle(core: &core::Core, life: &Lifecycle) {
    let mut seen = life.generation();
    let mut kills = core.admin.kill_generation();
    loop {
        glommio::timer::sleep(shared::lifecycle::TICK).await;
        // The admin console KILLed clients: wake this core's sessions to look.
        let k = core.admin.kill_generation();
        if k != kills {
            kills = k;
            core.drain_notify.notify();
        }
        let g = life.generation();
        if g != seen {
            seen = g;
            let live = life.current();
            core.set_cfg(Rc::new(live.cfg.clone()));
            *core.tls.borrow_mut() = live.tls.clone();
        }
        if life.draining() {
            return;
        }
    }
}

/// Whether the kernel hands the connections queued on a closing listener to another listener
/// of its port (`net.ipv4.tcp_migrate_req = 1`, Linux 5.14+).
fn kernel_migrates() -> bool {
    std::fs::read_to_string("/proc/sys/net/ipv4/tcp_migrate_req").is_ok_and(|s| s.trim() == "1")
}

/// Takes the connections queued on the listener `fd` (without waiting).
fn take_queued(fd: std::os::fd::RawFd) -> Vec<glommio::net::TcpStream> {
    let mut out = Vec::new();
    loop {
        // SAFETY: `fd` is our listener, open until the caller drops it; accept4 with null
        // address pointers is valid and returns a new descriptor we own.
        let s = unsafe {
            libc::accept4(
                fd,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            )
        };
        if s < 0 {
            break;
        }
        // SAFETY: `s` is a connected socket we own and hand over whole.
        out.push(unsafe { glommio::net::TcpStream::from_raw_fd(s) });
    }
    out
}

const SHUTTING_DOWN: &str = "the database system is shutting down";

async fn run_core(
    cfg: Rc<config::Config>,
    tls: Option<futures_rustls::TlsAcceptor>,
    mock_secret: [u8; 32],
    clients: Arc<AtomicUsize>,
    life: Arc<Lifecycle>,
    admin: Arc<registry::Shared>,
) {
    let core = core::Core::new(cfg.clone(), tls, mock_secret, clients, admin);
    for (links, addr) in core.links.iter().zip(&cfg.poolers) {
        for l in links {
            glommio::spawn_local(l.clone().maintain(addr.clone())).detach();
        }
    }
    let (listener, listener_fd) = match shared::io::reuseport_listener(&cfg.listen) {
        Ok(l) => {
            let fd = std::os::fd::IntoRawFd::into_raw_fd(l);
            // SAFETY: the fd comes from a listener we own and hand over whole.
            (unsafe { TcpListener::from_raw_fd(fd) }, fd)
        }
        Err(e) => {
            eprintln!("tidepool-gateway: cannot listen on {}: {e}", cfg.listen);
            std::process::exit(1);
        }
    };
    // The other listeners, closed when the drain starts.
    let mut others = Vec::new();
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
                    // Its inode: at the drain the path is removed only if it is still ours
                    // (a gateway started meanwhile has bound the path anew).
                    let ino = std::fs::metadata(&path)
                        .map_or(0, |m| std::os::unix::fs::MetadataExt::ino(&m));
                    let core = core.clone();
                    let task = glommio::spawn_local(async move {
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
                    others.push(Extra::Unix { task, path, ino });
                }
                Err(e) => tracing::warn!(path = %path, error = %e, "cannot listen on Unix socket"),
            }
        }
    }
    if let Some(addr) = &cfg.read_only_listen {
        let (ro, fd) = match shared::io::reuseport_listener(addr) {
            Ok(l) => {
                let fd = std::os::fd::IntoRawFd::into_raw_fd(l);
                // SAFETY: the fd comes from a listener we own and hand over whole.
                (unsafe { TcpListener::from_raw_fd(fd) }, fd)
            }
            Err(e) => {
                eprintln!("tidepool-gateway: cannot listen on {addr}: {e}");
                std::process::exit(1);
            }
        };
        let core = core.clone();
        let task = glommio::spawn_local(async move {
            loop {
                match ro.accept().await {
                    Ok(s) => {
                        glommio::spawn_local(session::serve_tcp(core.clone(), s, true)).detach();
                    }
                    Err(_) if core.draining.get() => return,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed (read-only listener)");
                        glommio::timer::sleep(Duration::from_millis(5)).await;
                    }
                }
            }
        })
        .detach();
        others.push(Extra::Tcp { task, fd });
    }
    // A spare descriptor, given up for a moment when we run out, so a client beyond the limit
    // hears why (53300) instead of waiting in the backlog.
    let accept = async {
        let mut spare = std::fs::File::open("/dev/null").ok();
        loop {
            match listener.accept().await {
                Ok(stream) => {
                    // While the drain closes the listener, serve_tcp answers 57P03.
                    glommio::spawn_local(session::serve_tcp(core.clone(), stream, false)).detach();
                }
                Err(_) if core.draining.get() => return,
                Err(e) => {
                    let out_of_fds =
                        matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
                            || e.to_string().contains("Too many open files");
                    if out_of_fds {
                        drop(spare.take());
                        if let Ok(stream) = listener.accept().await {
                            session::refuse(stream, "53300", "sorry, too many clients already")
                                .await;
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
    };
    // The accept loop runs until the listener is shut down under it (`close_listener`): an
    // accept the executor has in flight then fails and ends it, instead of being cancelled
    // (a connection such an accept took just before its cancellation would be lost).
    let closing = async {
        watch_lifecycle(&core, &life).await;
        core.draining.set(true);
        core.drain_notify.notify();
        for extra in others {
            match extra {
                // Its task ends when its accept fails, or is cancelled (migrating kernel).
                Extra::Tcp { task, fd } => {
                    if !close_listener(fd) {
                        task.cancel();
                    }
                }
                Extra::Unix { task, path, ino } => {
                    task.cancel();
                    let ours = std::fs::metadata(&path)
                        .is_ok_and(|m| std::os::unix::fs::MetadataExt::ino(&m) == ino);
                    if ours {
                        let _ = std::fs::remove_file(&path);
                    }
                }
            }
        }
        if close_listener(listener_fd) {
            // Bound: the accept loop ends on its own as soon as its accept fails.
            glommio::timer::sleep(Duration::from_secs(1)).await;
        }
    };
    futures_lite::future::or(accept, closing).await;
    drop(listener);
    drain(&core).await;
}

/// The listeners of a core besides its main one, closed when the drain starts.
enum Extra {
    /// The read-only listener and its accept task.
    Tcp {
        task: glommio::task::JoinHandle<()>,
        fd: std::os::fd::RawFd,
    },
    /// The Unix socket (first core only), its path and the inode it was bound with.
    Unix {
        task: glommio::task::JoinHandle<()>,
        path: String,
        ino: u64,
    },
}

/// Stops the kernel giving this listener connections. Where the kernel migrates queued
/// connections to another listener of the port, the caller just closes it (returns false).
/// Else the queued ones are taken and told the server is shutting down (57P03, as Postgres says
/// it) rather than reset, and the socket is shut down: that takes it out of the port's
/// `SO_REUSEPORT` group at once and fails the accept in flight, which ends the accept loop
/// (returns true). Cancelling that accept instead could lose a connection it had just taken.
fn close_listener(fd: std::os::fd::RawFd) -> bool {
    if kernel_migrates() {
        return false;
    }
    let queued = take_queued(fd);
    // SAFETY: plain syscall on our listener, open until the caller drops it. On a listening
    // socket SHUT_RD stops it listening (Linux: inet_shutdown → tcp_disconnect).
    let rc = unsafe { libc::shutdown(fd, libc::SHUT_RD) };
    if rc != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "shutting the listener down failed");
    }
    if !queued.is_empty() {
        tracing::info!(
            refused = queued.len(),
            "connections queued at the drain refused (57P03)"
        );
    }
    for s in queued {
        glommio::spawn_local(session::refuse(s, "57P03", SHUTTING_DOWN)).detach();
    }
    true
}

/// SIGTERM on this core: close the listeners, let sessions end at their next idle moment
/// (57P01), end the rest when `shutdown_timeout_ms` has passed, and return.
async fn drain(core: &Rc<core::Core>) {
    let timeout = Duration::from_millis(core.cfg().shutdown_timeout_ms);
    tracing::info!(
        core = glommio::executor().id(),
        clients = core.local_clients.get(),
        ?timeout,
        "draining: listeners closed"
    );
    let deadline = Instant::now() + timeout;
    while core.local_clients.get() > 0 && Instant::now() < deadline {
        glommio::timer::sleep(shared::lifecycle::TICK).await;
    }
    if core.local_clients.get() > 0 {
        tracing::warn!(
            clients = core.local_clients.get(),
            "shutdown timeout: ending the sessions still in a transaction"
        );
        core.force.set(true);
        core.drain_notify.notify();
        let grace = Instant::now() + Duration::from_secs(2);
        while core.local_clients.get() > 0 && Instant::now() < grace {
            glommio::timer::sleep(shared::lifecycle::TICK).await;
        }
    }
    // Let the pooler hear the sessions' CLOSE frames before the links go.
    for links in core.links.iter() {
        for l in links {
            let _ = with_timeout(Duration::from_millis(500), l.out.flushed()).await;
        }
    }
}
