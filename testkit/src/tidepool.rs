//! The Tidepool processes under test: one `tidepool-pooler` in front of a [`PgCluster`] and one
//! `tidepool-gateway` in front of it, on free loopback ports, started with the flags of
//! docs/CONTRACTS.md and killed on drop.

use std::fs::File;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::thread;
use std::time::{Duration, Instant};

use crate::cluster::{tail, BackendWatch, PgCluster};
use crate::endpoint::Endpoint;
use crate::ports::free_port;
use crate::process::{kill_group, run_merged};

const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// How to start Tidepool.
#[derive(Debug, Clone)]
pub struct TidepoolOpts {
    /// `--pool-size`: backend budget per (user, database).
    pub pool_size: usize,
    /// `--max-backends`, when set.
    pub max_backends: Option<usize>,
    /// `--cores` of both processes.
    pub cores: usize,
    /// `--auth-method` of the gateway, when set.
    pub auth_method: Option<String>,
    pub extra_pooler_args: Vec<String>,
    pub extra_gateway_args: Vec<String>,
}

impl Default for TidepoolOpts {
    fn default() -> Self {
        TidepoolOpts {
            pool_size: 20,
            max_backends: None,
            cores: 2,
            auth_method: None,
            extra_pooler_args: Vec::new(),
            extra_gateway_args: Vec::new(),
        }
    }
}

impl TidepoolOpts {
    pub fn pool_size(mut self, n: usize) -> Self {
        self.pool_size = n;
        self
    }

    /// `--max-backends n` for the pooler.
    pub fn max_backends(mut self, n: usize) -> Self {
        self.max_backends = Some(n);
        self
    }

    /// One more flag (or flag value) for the pooler.
    pub fn pooler_arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_pooler_args.push(arg.into());
        self
    }

    /// One more flag (or flag value) for the gateway.
    pub fn gateway_arg(mut self, arg: impl Into<String>) -> Self {
        self.extra_gateway_args.push(arg.into());
        self
    }
}

/// A running pooler + gateway pair.
pub struct Tidepool {
    cluster: PgCluster,
    pooler: Child,
    gateway: Option<Child>,
    pooler_port: u16,
    gateway_port: u16,
    pooler_log: PathBuf,
    gateway_log: PathBuf,
    /// What it was started with (an extra gateway gets the same flags).
    opts: TidepoolOpts,
}

/// The link secret every pooler and gateway of this test process shares (`--link-secret-file`):
/// a file of 64 hex digits, mode 600, made once per test process in the temp directory.
pub fn link_secret_file() -> PathBuf {
    static FILE: OnceLock<PathBuf> = OnceLock::new();
    FILE.get_or_init(|| {
        let dir = std::env::temp_dir().join("tidepool-test-link-keys");
        std::fs::create_dir_all(&dir).expect("link key directory");
        let path = dir.join(format!("{}.key", std::process::id()));
        // A leftover from an earlier process with the same pid is replaced.
        let _ = std::fs::remove_file(&path);
        shared::link::LinkKey::create(&path).unwrap_or_else(|e| panic!("link secret: {e}"));
        path
    })
    .clone()
}

/// With `TIDEPOOL_TEST_LINK_TLS=1`, every pooler and gateway a test starts speak TLS on their
/// link (a test CA per cluster; `crate::tls`), so any suite can run over the TLS path. Tests
/// that set link TLS flags themselves keep theirs.
fn link_tls_from_env(cluster: &PgCluster, mut opts: TidepoolOpts) -> TidepoolOpts {
    let on = std::env::var("TIDEPOOL_TEST_LINK_TLS").is_ok_and(|v| v == "1");
    if !on
        || opts
            .extra_pooler_args
            .iter()
            .any(|a| a == "--link-tls-cert")
    {
        return opts;
    }
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let ca = crate::tls::TestCa::new(&cluster.dir().join("link-tls"), &format!("env{n}"));
    let (cert, key) = ca.issue("pooler", &["127.0.0.1"]);
    opts.extra_pooler_args
        .extend(crate::tls::link_tls_args(&cert, &key));
    opts.extra_gateway_args.extend([
        "--link-tls-ca".to_string(),
        ca.ca_file().to_string_lossy().into_owned(),
    ]);
    opts
}

/// `--link-secret-file FILE` with [`link_secret_file`].
pub fn link_secret_args() -> [String; 2] {
    [
        "--link-secret-file".to_string(),
        link_secret_file().to_string_lossy().into_owned(),
    ]
}

/// The flags of a gateway listening on `gateway_port` in front of the pooler at `pooler_port`.
fn gateway_args(opts: &TidepoolOpts, gateway_port: u16, pooler_port: u16) -> Vec<String> {
    let mut args = vec![
        "--listen".to_string(),
        format!("127.0.0.1:{gateway_port}"),
        "--cores".to_string(),
        opts.cores.to_string(),
        "--pooler".to_string(),
        format!("127.0.0.1:{pooler_port}"),
    ];
    args.extend(link_secret_args());
    if let Some(method) = &opts.auth_method {
        args.extend(["--auth-method".to_string(), method.clone()]);
    }
    args.extend(opts.extra_gateway_args.iter().cloned());
    args
}

/// Where the binaries are: `TIDEPOOL_BIN_DIR`, else the target directory of this test
/// executable (target/<profile>/deps/<test> → target/<profile>/), after building them there.
///
/// `cargo test -p tidepool-gateway` builds the gateway binary but not the pooler, and a binary
/// left over from an earlier build would silently test old code; so the first start in a test
/// process runs `cargo build` for both (a no-op when they are current).
pub fn bin_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        if let Some(dir) = std::env::var_os("TIDEPOOL_BIN_DIR") {
            return PathBuf::from(dir);
        }
        let exe = std::env::current_exe().expect("path of the test executable");
        let mut dir = exe
            .parent()
            .expect("test executable has a directory")
            .to_path_buf();
        if dir.file_name().is_some_and(|n| n == "deps") {
            dir.pop();
        }
        build_binaries(&dir);
        dir
    })
    .clone()
}

fn build_binaries(profile_dir: &Path) {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root");
    let target_dir = profile_dir
        .parent()
        .expect("target dir above the profile dir");
    let profile = profile_dir
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("debug");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let mut cmd = Command::new(cargo);
    cmd.arg("build")
        .arg("--manifest-path")
        .arg(workspace.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(target_dir)
        .args(["-p", "tidepool-pooler", "-p", "tidepool-gateway"]);
    // The dev profile lives in target/debug; any other profile in a directory of its name.
    if profile != "debug" {
        cmd.args(["--profile", profile]);
    }
    let out = run_merged(&mut cmd, None, Duration::from_secs(900));
    assert!(
        out.success(),
        "building tidepool-pooler and tidepool-gateway failed:\n{}",
        out.text
    );
}

fn spawn_logged(program: &Path, args: &[String], log: &Path) -> Child {
    let file = File::create(log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
    let file2 = file.try_clone().expect("dup log file");
    let mut cmd = Command::new(program);
    // Plain text logs: they are read by people in failure messages, not by terminals.
    cmd.env("NO_COLOR", "1");
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(file2));
    // Its own process group, so a kill reaches anything it starts.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    cmd.spawn().unwrap_or_else(|e| {
        panic!(
            "start {} (set TIDEPOOL_BIN_DIR to use other binaries): {e}",
            program.display()
        )
    })
}

impl Tidepool {
    /// Starts the pooler, then the gateway; returns when the gateway port accepts connections.
    /// Panics after 20 s with the tail of both logs.
    pub fn start(cluster: &PgCluster, opts: TidepoolOpts) -> Tidepool {
        let opts = link_tls_from_env(cluster, opts);
        let bin = bin_dir();
        let pooler_port = free_port();
        let gateway_port = free_port();
        let pooler_log = cluster.dir().join(format!("pooler-{gateway_port}.log"));
        let gateway_log = cluster.dir().join(format!("gateway-{gateway_port}.log"));

        let mut pooler_args = vec![
            "--listen".to_string(),
            format!("127.0.0.1:{pooler_port}"),
            "--cores".to_string(),
            opts.cores.to_string(),
            "--pg-host".to_string(),
            "127.0.0.1".to_string(),
            "--pg-port".to_string(),
            cluster.port().to_string(),
            "--admin-socket-dir".to_string(),
            cluster.socket_dir().to_string_lossy().into_owned(),
            "--admin-user".to_string(),
            "postgres".to_string(),
            "--pool-size".to_string(),
            opts.pool_size.to_string(),
        ];
        pooler_args.extend(link_secret_args());
        if let Some(max) = opts.max_backends {
            pooler_args.extend(["--max-backends".to_string(), max.to_string()]);
        }
        pooler_args.extend(opts.extra_pooler_args.iter().cloned());

        let gateway_args = gateway_args(&opts, gateway_port, pooler_port);

        let pooler = spawn_logged(&bin.join("tidepool-pooler"), &pooler_args, &pooler_log);
        // Build the value at once so that Drop kills whatever was started if a wait panics.
        let mut tp = Tidepool {
            cluster: cluster.clone(),
            pooler,
            gateway: None,
            pooler_port,
            gateway_port,
            pooler_log,
            gateway_log,
            opts,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        tp.wait_accepting(pooler_port, deadline, "pooler");
        tp.gateway = Some(spawn_logged(
            &bin.join("tidepool-gateway"),
            &gateway_args,
            &tp.gateway_log,
        ));
        tp.wait_accepting(gateway_port, deadline, "gateway");
        tp
    }

    fn wait_accepting(&mut self, port: u16, deadline: Instant, what: &str) {
        loop {
            if TcpStream::connect_timeout(
                &([127, 0, 0, 1], port).into(),
                Duration::from_millis(200),
            )
            .is_ok()
            {
                return;
            }
            let exited = match (what, self.gateway.as_mut()) {
                ("gateway", Some(gateway)) => gateway.try_wait(),
                _ => self.pooler.try_wait(),
            };
            if let Ok(Some(status)) = exited {
                panic!(
                    "tidepool-{what} exited ({status}) before accepting\n{}",
                    self.logs()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "tidepool-{what} did not accept on 127.0.0.1:{port} within {READY_TIMEOUT:?}\n{}",
                    self.logs()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// The pooler's whole log so far.
    pub fn pooler_log(&self) -> String {
        std::fs::read_to_string(&self.pooler_log).unwrap_or_default()
    }

    /// The last lines of both logs, for failure messages.
    pub fn logs(&self) -> String {
        format!(
            "--- {} ---\n{}\n--- {} ---\n{}",
            self.pooler_log.display(),
            tail(&self.pooler_log, 40),
            self.gateway_log.display(),
            tail(&self.gateway_log, 40)
        )
    }

    /// The gateway, where clients connect.
    pub fn endpoint(&self) -> Endpoint {
        Endpoint::loopback(self.gateway_port)
    }

    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        self.endpoint().url(user, password, db)
    }

    pub fn gateway_port(&self) -> u16 {
        self.gateway_port
    }

    pub fn pooler_port(&self) -> u16 {
        self.pooler_port
    }

    pub fn cluster(&self) -> &PgCluster {
        &self.cluster
    }

    /// Postgres client backends of `user` right now.
    pub fn backend_count(&self, user: &str) -> i64 {
        self.cluster.backend_count(user)
    }

    pub fn watch_backends(&self, user: &str) -> BackendWatch {
        self.cluster.watch_backends(user)
    }

    /// Process id of the gateway.
    pub fn gateway_pid(&self) -> u32 {
        self.gateway.as_ref().map_or(0, Child::id)
    }

    /// Process id of the pooler.
    pub fn pooler_pid(&self) -> u32 {
        self.pooler.id()
    }

    /// True while the gateway process is running.
    pub fn gateway_alive(&mut self) -> bool {
        self.gateway
            .as_mut()
            .is_some_and(|g| matches!(g.try_wait(), Ok(None)))
    }

    /// Starts one more gateway process, with this one's flags, in front of this pooler,
    /// listening on `port`: the port of this gateway (both then share it with SO_REUSEPORT, the
    /// kernel choosing a process for each connection) or any other. Returns when it holds one
    /// listener per core on that port; panics after 20 s with its log.
    pub fn start_gateway_on(&self, port: u16) -> Gateway {
        static EXTRA: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(1);
        let n = EXTRA.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let log = self
            .cluster
            .dir()
            .join(format!("gateway-{port}-extra-{n}.log"));
        let args = gateway_args(&self.opts, port, self.pooler_port);
        let child = spawn_logged(&bin_dir().join("tidepool-gateway"), &args, &log);
        let mut gw = Gateway { child, port, log };
        let deadline = Instant::now() + READY_TIMEOUT;
        let cores = self.opts.cores;
        while crate::sockets::listeners_of(gw.pid(), port) < cores {
            if !gw.alive() {
                panic!(
                    "extra tidepool-gateway exited before listening on {port}\n{}",
                    gw.logs()
                );
            }
            if Instant::now() >= deadline {
                panic!(
                    "extra tidepool-gateway did not listen on {port} within {READY_TIMEOUT:?}\n{}",
                    gw.logs()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
        gw
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`, `libc::SIGHUP`) to the gateway process.
    pub fn signal_gateway(&self, signal: i32) {
        send_signal(self.gateway_pid(), signal);
    }

    /// Sends `signal` to the pooler process.
    pub fn signal_pooler(&self, signal: i32) {
        send_signal(self.pooler_pid(), signal);
    }

    /// Waits up to `limit` for the gateway to exit; its status, or `None` if it still runs.
    pub fn wait_gateway_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        wait_exit(self.gateway.as_mut()?, limit)
    }

    /// Waits up to `limit` for the pooler to exit; its status, or `None` if it still runs.
    pub fn wait_pooler_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        wait_exit(&mut self.pooler, limit)
    }

    /// The gateway's whole log so far.
    pub fn gateway_log(&self) -> String {
        std::fs::read_to_string(&self.gateway_log).unwrap_or_default()
    }

    /// True while both processes are running.
    pub fn alive(&mut self) -> bool {
        matches!(self.pooler.try_wait(), Ok(None))
            && self
                .gateway
                .as_mut()
                .is_some_and(|g| matches!(g.try_wait(), Ok(None)))
    }
}

impl Drop for Tidepool {
    fn drop(&mut self) {
        if let Some(gateway) = self.gateway.as_mut() {
            kill_group(gateway);
        }
        kill_group(&mut self.pooler);
    }
}

/// A gateway process started by [`Tidepool::start_gateway_on`]; killed on drop.
pub struct Gateway {
    child: Child,
    port: u16,
    log: PathBuf,
}

impl Gateway {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::loopback(self.port)
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The last lines of its log.
    pub fn logs(&self) -> String {
        format!("--- {} ---\n{}", self.log.display(), tail(&self.log, 40))
    }

    /// Its whole log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` (e.g. `libc::SIGTERM`) to it.
    pub fn signal(&self, signal: i32) {
        send_signal(self.pid(), signal);
    }

    /// Waits up to `limit` for it to exit; its status, or `None` if it still runs.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        wait_exit(&mut self.child, limit)
    }
}

fn send_signal(pid: u32, signal: i32) {
    assert!(pid > 0, "no such process");
    // SAFETY: plain syscall on a child we started and have not reaped.
    let rc = unsafe { libc::kill(pid as libc::pid_t, signal) };
    assert_eq!(
        rc,
        0,
        "kill({pid}, {signal}): {}",
        std::io::Error::last_os_error()
    );
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}
