//! Replicated PostgreSQL 15 nodes for high-availability tests: a primary set up for streaming
//! replication and pg_rewind (wal_level replica, wal_log_hints, full_page_writes), standbys
//! made from it with pg_basebackup, each on its own free loopback port in its own temp dir
//! (`data/`, `sock/`, `postgres.log`), and a pooler acting as a node's agent.
//!
//! Authentication is kept out of the way: the postgres role over the Unix socket (peer, mapped
//! from root) and anyone over loopback (trust), for replication too. Dropped nodes are stopped
//! (immediate) and their directory removed unless `TIDEPOOL_KEEP_TEST_DIRS` is set.

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::cluster::{tail, PG_BIN};
use crate::ports::free_port;
use crate::process::{run_merged, Output};

const PG_OS_USER: &str = "postgres";

const PG_HBA: &str = "\
# TYPE  DATABASE     USER      ADDRESS        METHOD
local   all          postgres                 peer map=tidepool
local   replication  postgres                 peer map=tidepool
host    all          all       127.0.0.1/32   trust
host    replication  all       127.0.0.1/32   trust
";

const PG_IDENT: &str = "\
# MAPNAME  SYSTEM-USERNAME  PG-USERNAME
tidepool   root             postgres
tidepool   postgres         postgres
";

/// One Postgres of a replicated set.
pub struct Node {
    name: String,
    dir: PathBuf,
    port: u16,
}

fn pg_bin(name: &str) -> String {
    format!("{PG_BIN}/{name}")
}

/// uid and gid of the postgres OS user.
pub fn postgres_ids() -> (u32, u32) {
    let cname = CString::new(PG_OS_USER).expect("no NUL");
    // SAFETY: getpwnam returns NULL or a pointer to a static record, read at once.
    let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
    assert!(!pw.is_null(), "no OS user postgres: install PostgreSQL 15");
    // SAFETY: non-null pointer from getpwnam.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

fn chown_pg(path: &Path) {
    crate::cluster::chown(path, crate::cluster::PG_OS_USER);
}

fn fresh_dir(name: &str) -> PathBuf {
    crate::cluster::fresh_dir_named("tidepool-repl", name)
}

/// Runs a program as the postgres OS user; its output (check `success()`).
pub fn run_as_postgres(program: &str, args: &[&str], timeout: Duration) -> Output {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", PG_OS_USER, "--", program])
        .args(args)
        .current_dir("/tmp");
    run_merged(&mut cmd, None, timeout)
}

fn must(out: Output, what: &str) -> Output {
    assert!(
        out.success(),
        "{what} failed ({:?}):\n{}",
        out.code,
        out.text
    );
    out
}

impl Node {
    /// A new primary: initdb, replication settings, started.
    pub fn primary(name: &str) -> Node {
        let node = Node::empty(name);
        let data = node.data_dir();
        must(
            run_as_postgres(
                &pg_bin("initdb"),
                &[
                    "-D",
                    data.to_str().expect("utf-8"),
                    "-U",
                    "postgres",
                    "--no-sync",
                    "--no-instructions",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                    "--auth=trust",
                ],
                Duration::from_secs(60),
            ),
            "initdb",
        );
        node.write("pg_hba.conf", PG_HBA, false);
        node.write("pg_ident.conf", PG_IDENT, false);
        node.write(
            "postgresql.conf",
            "\n# tidepool testkit: replication\n\
             max_connections = 60\n\
             shared_buffers = 16MB\n\
             fsync = off\n\
             full_page_writes = on\n\
             wal_level = replica\n\
             wal_log_hints = on\n\
             max_wal_senders = 10\n\
             wal_keep_size = '256MB'\n\
             hot_standby = on\n\
             synchronous_commit = on\n\
             wal_receiver_timeout = '4s'\n\
             wal_receiver_status_interval = '1s'\n\
             wal_sender_timeout = '4s'\n\
             recovery_target_timeline = 'latest'\n\
             lc_messages = 'C'\n\
             log_min_messages = warning\n\
             log_line_prefix = '%m [%p] %b '\n",
            true,
        );
        node.write_own_address();
        node.start();
        node
    }

    /// A streaming standby of `primary` (pg_basebackup), `application_name = name`, started.
    pub fn standby_of(primary: &Node, name: &str) -> Node {
        let node = Node::empty(name);
        let data = node.data_dir();
        let port = primary.port.to_string();
        must(
            run_as_postgres(
                &pg_bin("pg_basebackup"),
                &[
                    "-D",
                    data.to_str().expect("utf-8"),
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-U",
                    "postgres",
                    "-X",
                    "stream",
                    "--no-sync",
                    "-c",
                    "fast",
                ],
                Duration::from_secs(120),
            ),
            "pg_basebackup",
        );
        node.write_own_address();
        node.write("standby.signal", "", false);
        node.write(
            "postgresql.auto.conf",
            &format!(
                "primary_conninfo = 'host=127.0.0.1 port={} user=postgres application_name={name}'\n",
                primary.port
            ),
            true,
        );
        node.start();
        node
    }

    fn empty(name: &str) -> Node {
        let dir = fresh_dir(name);
        let node = Node {
            name: name.to_string(),
            dir,
            port: free_port(),
        };
        let sock = node.socket_dir();
        fs::create_dir(&sock).expect("socket dir");
        chown_pg(&sock);
        node
    }

    /// Its port and socket directory, last in postgresql.conf (so they win over a copy).
    fn write_own_address(&self) {
        self.write(
            "postgresql.conf",
            &format!(
                "\n# this node\nlisten_addresses = '127.0.0.1'\nport = {}\nunix_socket_directories = '{}'\n",
                self.port,
                self.socket_dir().display()
            ),
            true,
        );
    }

    /// Writes (or appends to) a file of the data directory, owned by postgres.
    pub fn write(&self, file: &str, text: &str, append: bool) {
        let path = self.data_dir().join(file);
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create(true)
            .append(append)
            .truncate(!append)
            .open(&path)
            .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
        f.write_all(text.as_bytes()).expect("write");
        chown_pg(&path);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.dir.join("sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// `pg_ctl start -w`; panics with the log's tail on failure.
    pub fn start(&self) {
        let out = self.pg_ctl(&[
            "-l",
            self.log_path().to_str().expect("utf-8"),
            "-w",
            "-t",
            "60",
            "start",
        ]);
        assert!(
            out.success(),
            "pg_ctl start {}:\n{}\n{}",
            self.name,
            out.text,
            tail(&self.log_path(), 30)
        );
    }

    /// `pg_ctl stop -m mode` (`fast`, `immediate`: a crash as far as WAL is concerned).
    pub fn stop(&self, mode: &str) {
        must(
            self.pg_ctl(&["-m", mode, "-w", "-t", "60", "stop"]),
            "pg_ctl stop",
        );
    }

    pub fn pg_ctl(&self, args: &[&str]) -> Output {
        let data = self.data_dir();
        let mut all = vec!["-D", data.to_str().expect("utf-8")];
        all.extend_from_slice(args);
        run_as_postgres(&pg_bin("pg_ctl"), &all, Duration::from_secs(90))
    }

    /// The postmaster's pid from postmaster.pid, if the file is there.
    pub fn postmaster_pid(&self) -> Option<u32> {
        fs::read_to_string(self.data_dir().join("postmaster.pid"))
            .ok()
            .and_then(|t| t.lines().next().and_then(|l| l.trim().parse().ok()))
    }

    /// Sends `signal` to the postmaster.
    pub fn signal_postmaster(&self, signal: libc::c_int) {
        let pid = self.postmaster_pid().expect("postmaster.pid") as libc::pid_t;
        // SAFETY: plain syscall on a pid we read from the node's own pid file.
        let r = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            r,
            0,
            "kill({pid}, {signal}): {}",
            std::io::Error::last_os_error()
        );
    }

    /// Runs SQL as postgres over the Unix socket in database `postgres`; unaligned tuples.
    pub fn try_psql(&self, sql: &str) -> Output {
        let mut cmd = Command::new("psql");
        cmd.env_remove("PGPASSWORD")
            .env_remove("PGOPTIONS")
            .env_remove("PSQLRC")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.socket_dir())
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", "postgres", "-f", "-"]);
        run_merged(
            &mut cmd,
            Some(sql.as_bytes().to_vec()),
            Duration::from_secs(30),
        )
    }

    /// [`try_psql`](Self::try_psql), panicking on any error; the output trimmed.
    pub fn psql(&self, sql: &str) -> String {
        let out = self.try_psql(sql);
        assert!(
            out.success(),
            "SQL on {} failed:\n{sql}\n--\n{}",
            self.name,
            out.text
        );
        out.text.trim().to_string()
    }

    /// Polls `sql` until its trimmed output is `want` or `timeout` passes; the last output.
    pub fn wait_for(&self, sql: &str, want: &str, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.try_psql(sql);
            let got = out.text.trim().to_string();
            if out.success() && got == want {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{}: {sql} gave {got:?}, wanted {want:?}",
                    self.name
                ));
            }
            thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        if self.data_dir().join("postmaster.pid").exists() {
            // A frozen postmaster would never stop.
            if let Some(pid) = self.postmaster_pid() {
                // SAFETY: plain syscall; a stale pid gets ESRCH.
                unsafe {
                    libc::kill(pid as libc::pid_t, libc::SIGCONT);
                }
            }
            let out = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                self.pg_ctl(&["-m", "immediate", "-w", "-t", "20", "stop"])
            }));
            if let Ok(out) = out {
                if !out.success() {
                    eprintln!("testkit: pg_ctl stop {}: {}", self.name, out.text);
                }
            }
        }
        if std::env::var_os("TIDEPOOL_KEEP_TEST_DIRS").is_some() {
            eprintln!("testkit: keeping {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// A pooler acting as the agent of a [`Node`], killed (with its process group) on drop. The
/// Postgres it may have started runs in a group of its own and outlives it.
pub struct AgentPooler {
    child: Child,
    pub listen_port: u16,
    pub agent_port: u16,
    log: PathBuf,
    /// The agent secret's file (the node directory's `agent.key`, mode 600, made at the
    /// first start and kept across restarts).
    pub secret_file: PathBuf,
}

impl AgentPooler {
    /// Starts `tidepool-pooler` for `node` with the agent flags, and `extra` flags; returns
    /// once both its link port and its agent port accept. A new log file per start.
    pub fn start(node: &Node, extra: &[&str]) -> AgentPooler {
        Self::start_on(node, free_port(), free_port(), extra)
    }

    /// As [`start`](Self::start) on given ports (a restart keeps its addresses).
    pub fn start_on(node: &Node, listen_port: u16, agent_port: u16, extra: &[&str]) -> AgentPooler {
        static N: AtomicU64 = AtomicU64::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let log = node.dir().join(format!("pooler-{n}.log"));
        let secret_file = node.dir().join("agent.key");
        shared::agent::AgentKey::load_or_create(&secret_file)
            .unwrap_or_else(|e| panic!("agent secret: {e}"));
        let mut args: Vec<String> = vec![
            "--agent-secret-file".into(),
            secret_file.to_string_lossy().into_owned(),
            "--link-secret-file".into(),
            crate::tidepool::link_secret_file()
                .to_string_lossy()
                .into_owned(),
            "--listen".into(),
            format!("127.0.0.1:{listen_port}"),
            "--cores".into(),
            "1".into(),
            "--pg-host".into(),
            "127.0.0.1".into(),
            "--pg-port".into(),
            node.port().to_string(),
            "--admin-socket-dir".into(),
            node.socket_dir().to_string_lossy().into_owned(),
            "--admin-user".into(),
            "postgres".into(),
            "--node-name".into(),
            node.name().to_string(),
            "--agent-listen".into(),
            format!("127.0.0.1:{agent_port}"),
            "--pg-data".into(),
            node.data_dir().to_string_lossy().into_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let file =
            fs::File::create(&log).unwrap_or_else(|e| panic!("create {}: {e}", log.display()));
        let file2 = file.try_clone().expect("dup");
        let mut cmd = Command::new(crate::tidepool::bin_dir().join("tidepool-pooler"));
        cmd.env("NO_COLOR", "1")
            .env("RUST_LOG", "info")
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(file2));
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let child = cmd.spawn().expect("start tidepool-pooler");
        let mut p = AgentPooler {
            child,
            listen_port,
            agent_port,
            log,
            secret_file,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        for port in [listen_port, agent_port] {
            loop {
                if TcpStream::connect_timeout(
                    &([127, 0, 0, 1], port).into(),
                    Duration::from_millis(200),
                )
                .is_ok()
                {
                    break;
                }
                if let Ok(Some(status)) = p.child.try_wait() {
                    panic!("tidepool-pooler exited ({status}):\n{}", p.log_tail());
                }
                assert!(
                    Instant::now() < deadline,
                    "pooler not accepting on {port}:\n{}",
                    p.log_tail()
                );
                thread::sleep(Duration::from_millis(50));
            }
        }
        p
    }

    /// The agent secret this pooler answers to.
    pub fn key(&self) -> shared::agent::AgentKey {
        shared::agent::AgentKey::load(&self.secret_file)
            .unwrap_or_else(|e| panic!("agent secret: {e}"))
    }

    pub fn agent_addr(&self) -> std::net::SocketAddr {
        ([127, 0, 0, 1], self.agent_port).into()
    }

    pub fn log_tail(&self) -> String {
        format!("--- {} ---\n{}", self.log.display(), tail(&self.log, 60))
    }

    /// Kills the pooler (SIGKILL to its group) and waits for it.
    pub fn kill(&mut self) {
        crate::process::kill_group(&mut self.child);
    }
}

impl Drop for AgentPooler {
    fn drop(&mut self) {
        crate::process::kill_group(&mut self.child);
    }
}
