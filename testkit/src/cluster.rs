//! A throwaway PostgreSQL 15 cluster: initdb into a fresh directory under /tmp, started on a
//! free loopback port, stopped and removed on drop. Set up per docs/CONTRACTS.md ("Test cluster
//! conventions").

use std::ffi::CString;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::endpoint::Endpoint;
use crate::ports::free_port;
use crate::process::{run_merged, Output};

pub const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The roles every cluster has (CONTRACTS.md).
pub const ALICE: (&str, &str) = ("alice", "alice-pw");
pub const BOB: (&str, &str) = ("bob", "bob-pw");
/// The database owned by alice.
pub const APP_DB: &str = "app";

/// Postgres runs as this OS user; the tests run as root.
pub(crate) const PG_OS_USER: &str = "postgres";

/// A running Postgres. Cheap to clone; stopped when the last clone (and the last [`Tidepool`]
/// started on it) is dropped.
///
/// [`Tidepool`]: crate::Tidepool
#[derive(Clone)]
pub struct PgCluster {
    pub(crate) inner: Arc<ClusterInner>,
}

pub(crate) struct ClusterInner {
    dir: PathBuf,
    port: u16,
}

fn pg_bin(name: &str) -> String {
    format!("{PG_BIN}/{name}")
}

/// uid and gid of an OS user.
fn os_user_ids(name: &str) -> (libc::uid_t, libc::gid_t) {
    let cname = CString::new(name).expect("user name without NUL");
    // SAFETY: getpwnam returns NULL or a pointer to a static record we read at once; tests
    // call it before any other thread could call getpwnam concurrently in a way that matters
    // (the record is only read for two integers).
    let pw = unsafe { libc::getpwnam(cname.as_ptr()) };
    assert!(
        !pw.is_null(),
        "no OS user {name:?}: PostgreSQL 15 must be installed"
    );
    // SAFETY: non-null pointer from getpwnam.
    unsafe { ((*pw).pw_uid, (*pw).pw_gid) }
}

pub(crate) fn chown(path: &Path, user: &str) {
    let (uid, gid) = os_user_ids(user);
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .unwrap_or_else(|e| panic!("chown {} to {user}: {e}", path.display()));
}

/// A new empty directory under /tmp, owned by postgres, readable by everyone (root writes logs
/// into it, postgres the cluster).
fn fresh_dir() -> PathBuf {
    fresh_dir_named("tidepool-test", "")
}

/// [`fresh_dir`] as `/tmp/PREFIX-PID-N-NANOS[-name]`.
pub(crate) fn fresh_dir_named(prefix: &str, name: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    loop {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let suffix = if name.is_empty() {
            String::new()
        } else {
            format!("-{name}")
        };
        let dir = PathBuf::from(format!(
            "/tmp/{prefix}-{}-{n}-{nanos:x}{suffix}",
            std::process::id()
        ));
        match fs::create_dir(&dir) {
            Ok(()) => {
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).expect("chmod");
                chown(&dir, PG_OS_USER);
                return dir;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => panic!("create {}: {e}", dir.display()),
        }
    }
}

/// Runs a command as the postgres OS user; panics with its output unless it succeeds.
fn as_postgres(program: &str, args: &[&str], timeout: Duration) -> Output {
    let mut cmd = Command::new("runuser");
    cmd.args(["-u", PG_OS_USER, "--", program])
        .args(args)
        .current_dir("/tmp");
    let out = run_merged(&mut cmd, None, timeout);
    assert!(
        out.success(),
        "{program} {args:?} failed ({:?}):\n{}",
        out.code,
        out.text
    );
    out
}

/// The last `lines` lines of a log file (or why it could not be read).
pub fn tail(path: &Path, lines: usize) -> String {
    match fs::read(path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            let all: Vec<&str> = text.lines().collect();
            all[all.len().saturating_sub(lines)..].join("\n")
        }
        Err(e) => format!("<cannot read {}: {e}>", path.display()),
    }
}

const PG_HBA: &str = "\
# TYPE  DATABASE  USER      ADDRESS        METHOD
local   all       postgres                 peer map=tidepool
local   all       all                      scram-sha-256
# bob's verifier is md5 on purpose (a client of the md5 kind); a scram-sha-256 line would refuse
# it outright, so bob gets an md5 line (which still runs SCRAM for SCRAM verifiers).
host    all       bob       127.0.0.1/32   md5
host    all       all       127.0.0.1/32   scram-sha-256
";

const PG_IDENT: &str = "\
# MAPNAME  SYSTEM-USERNAME  PG-USERNAME
tidepool   root             postgres
tidepool   postgres         postgres
";

impl PgCluster {
    /// initdb, configure, start, and create the roles and the `app` database.
    pub fn start() -> PgCluster {
        let dir = fresh_dir();
        let port = free_port();
        // From here on, Drop cleans up whatever a failed step leaves behind.
        let inner = Arc::new(ClusterInner {
            dir: dir.clone(),
            port,
        });
        let data = dir.join("data");
        let sock = dir.join("sock");
        fs::create_dir(&sock).expect("create socket dir");
        chown(&sock, PG_OS_USER);

        as_postgres(
            &pg_bin("initdb"),
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-U",
                "postgres",
                "--no-sync",
                "--no-instructions",
                "--encoding=UTF8",
                "--locale=C.UTF-8",
                // pg_hba.conf is replaced below, before the first start.
                "--auth=trust",
            ],
            Duration::from_secs(60),
        );

        let write_as_postgres = |name: &str, text: &str, append: bool| {
            let path = data.join(name);
            let mut f = fs::OpenOptions::new()
                .write(true)
                .create(true)
                .append(append)
                .truncate(!append)
                .open(&path)
                .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
            f.write_all(text.as_bytes()).expect("write config");
            chown(&path, PG_OS_USER);
        };
        write_as_postgres("pg_hba.conf", PG_HBA, false);
        write_as_postgres("pg_ident.conf", PG_IDENT, false);
        write_as_postgres(
            "postgresql.conf",
            &format!(
                "\n# tidepool testkit\n\
                 listen_addresses = '127.0.0.1'\n\
                 port = {port}\n\
                 unix_socket_directories = '{}'\n\
                 max_connections = 300\n\
                 shared_buffers = 64MB\n\
                 fsync = off\n\
                 synchronous_commit = off\n\
                 full_page_writes = off\n\
                 lc_messages = 'C'\n\
                 log_min_messages = warning\n\
                 log_line_prefix = '%m [%p] %u@%d '\n",
                sock.display()
            ),
            true,
        );

        let log = dir.join("postgres.log");
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", PG_OS_USER, "--", &pg_bin("pg_ctl"), "-D"])
            .arg(&data)
            .arg("-l")
            .arg(&log)
            .args(["-w", "-t", "30", "start"])
            .current_dir("/tmp");
        let out = run_merged(&mut cmd, None, Duration::from_secs(40));
        assert!(
            out.success(),
            "pg_ctl start failed:\n{}\n{}",
            out.text,
            tail(&log, 30)
        );

        let cluster = PgCluster { inner };
        cluster.psql_admin(&format!(
            "CREATE ROLE alice LOGIN PASSWORD '{}';\n\
             SET password_encryption = 'md5';\n\
             CREATE ROLE bob LOGIN PASSWORD '{}';\n\
             RESET password_encryption;\n\
             CREATE DATABASE {APP_DB} OWNER alice;\n",
            ALICE.1, BOB.1
        ));
        // PG15 no longer lets everyone create in `public`; the app schema is alice's, and bob
        // is a second application user of the same database.
        cluster.psql_admin_db(APP_DB, "GRANT USAGE, CREATE ON SCHEMA public TO bob;");
        cluster
    }

    pub fn port(&self) -> u16 {
        self.inner.port
    }

    /// The temp dir holding data, sockets and logs.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn data_dir(&self) -> PathBuf {
        self.inner.dir.join("data")
    }

    pub fn socket_dir(&self) -> PathBuf {
        self.inner.dir.join("sock")
    }

    pub fn log_path(&self) -> PathBuf {
        self.inner.dir.join("postgres.log")
    }

    /// Postgres itself, over TCP.
    pub fn direct(&self) -> Endpoint {
        Endpoint::loopback(self.inner.port)
    }

    pub fn direct_url(&self, user: &str, password: &str, db: &str) -> String {
        self.direct().url(user, password, db)
    }

    /// Runs SQL as the postgres superuser (Unix socket, peer auth mapped from root) in the
    /// `postgres` database; returns unaligned tuples-only output; panics on any error.
    pub fn psql_admin(&self, sql: &str) -> String {
        self.psql_admin_db("postgres", sql)
    }

    /// [`psql_admin`](Self::psql_admin) in database `db`.
    pub fn psql_admin_db(&self, db: &str, sql: &str) -> String {
        self.inner.psql_admin_db(db, sql)
    }

    /// A superuser connection over the Unix socket, driven on a spawned task.
    pub async fn admin_client(&self) -> tokio_postgres::Client {
        let (client, connection) = self
            .admin_config("postgres")
            .connect(tokio_postgres::NoTls)
            .await
            .expect("admin connection over the Unix socket");
        tokio::spawn(async move {
            let _ = connection.await;
        });
        client
    }

    pub fn admin_config(&self, db: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host_path(self.socket_dir())
            .port(self.inner.port)
            .user("postgres")
            .dbname(db);
        config
    }

    /// `CREATE DATABASE name OWNER owner` (dropping any database of that name first).
    pub fn create_database(&self, name: &str, owner: &str) {
        self.drop_database(name);
        self.psql_admin(&format!("CREATE DATABASE \"{name}\" OWNER \"{owner}\""));
        self.psql_admin_db(name, "GRANT USAGE, CREATE ON SCHEMA public TO bob;");
    }

    /// `DROP DATABASE IF EXISTS name WITH (FORCE)`: ends the sessions still connected to it.
    pub fn drop_database(&self, name: &str) {
        self.psql_admin(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"));
    }

    /// Client backends (not background workers) currently logged in as `user`.
    pub fn backend_count(&self, user: &str) -> i64 {
        self.inner.backend_count(user)
    }

    /// Starts sampling [`backend_count`](Self::backend_count) for `user` every 50 ms on a
    /// thread, until [`BackendWatch::stop`].
    pub fn watch_backends(&self, user: &str) -> BackendWatch {
        BackendWatch::start(self.inner.clone(), user)
    }

    /// Samples the client backends of each of `users` (and their sum) every 50 ms on a thread,
    /// until [`UsersWatch::stop`].
    pub fn watch_users(&self, users: &[&str]) -> UsersWatch {
        UsersWatch::start(self.inner.clone(), users)
    }

    /// The `pg_stat_activity.state` of each client backend of `user` (`active`, `idle`,
    /// `idle in transaction`, ...), sorted, with the query of each that is not idle:
    /// `"active: SELECT pg_sleep(5)"`.
    pub fn backend_states(&self, user: &str) -> Vec<String> {
        let out = self.psql_admin(&format!(
            "SELECT coalesce(state, '?') || CASE WHEN state = 'idle' THEN '' \
             ELSE ': ' || left(regexp_replace(query, '\\s+', ' ', 'g'), 60) END \
             FROM pg_stat_activity \
             WHERE usename = '{}' AND backend_type = 'client backend' ORDER BY 1",
            user.replace('\'', "''")
        ));
        out.lines().map(str::to_string).collect()
    }

    /// `pg_ctl restart -m fast`: every backend is terminated (clients get FATAL 57P01), the
    /// cluster comes back on the same port. Returns when it accepts connections again.
    pub fn restart(&self) {
        let data = self.data_dir();
        let log = self.log_path();
        as_postgres(
            &pg_bin("pg_ctl"),
            &[
                "-D",
                data.to_str().expect("utf-8 path"),
                "-l",
                log.to_str().expect("utf-8 path"),
                "-m",
                "fast",
                "-w",
                "-t",
                "60",
                "restart",
            ],
            Duration::from_secs(90),
        );
    }
}

impl ClusterInner {
    fn psql_admin_db(&self, db: &str, sql: &str) -> String {
        let mut cmd = Command::new("psql");
        cmd.env_remove("PGPASSWORD")
            .env_remove("PGOPTIONS")
            .env_remove("PSQLRC")
            .args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h"])
            .arg(self.dir.join("sock"))
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-U", "postgres", "-d", db, "-f", "-"]);
        let out = run_merged(
            &mut cmd,
            Some(sql.as_bytes().to_vec()),
            Duration::from_secs(60),
        );
        assert!(
            out.success(),
            "admin SQL failed ({:?}):\n{sql}\n--\n{}",
            out.code,
            out.text
        );
        out.text
    }

    fn backend_count(&self, user: &str) -> i64 {
        let out = self.psql_admin_db(
            "postgres",
            &format!(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE usename = '{}' AND backend_type = 'client backend'",
                user.replace('\'', "''")
            ),
        );
        out.trim()
            .parse()
            .unwrap_or_else(|_| panic!("backend count: {out:?}"))
    }
}

impl Drop for ClusterInner {
    fn drop(&mut self) {
        let data = self.dir.join("data");
        if !data.join("postmaster.pid").exists() {
            let _ = fs::remove_dir_all(&self.dir);
            return;
        }
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", PG_OS_USER, "--", &pg_bin("pg_ctl"), "-D"])
            .arg(&data)
            .args(["-m", "immediate", "-w", "-t", "20", "stop"])
            .current_dir("/tmp");
        // Never panic in drop (it may run while unwinding from a failed test).
        let stopped = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            run_merged(&mut cmd, None, Duration::from_secs(30))
        }));
        if let Ok(out) = &stopped {
            if !out.success() {
                eprintln!("testkit: pg_ctl stop: {}", out.text);
            }
        }
        if std::env::var_os("TIDEPOOL_KEEP_TEST_DIRS").is_some() {
            eprintln!("testkit: keeping {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Samples the backend count of one user on a thread; see [`PgCluster::watch_backends`].
pub struct BackendWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<thread::JoinHandle<(i64, usize)>>,
}

impl BackendWatch {
    fn start(cluster: Arc<ClusterInner>, user: &str) -> BackendWatch {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let user = user.to_string();
        let handle = thread::spawn(move || {
            let (mut max, mut samples) = (0, 0);
            while !flag.load(Ordering::Relaxed) {
                let t = Instant::now();
                max = max.max(cluster.backend_count(&user));
                samples += 1;
                thread::sleep(Duration::from_millis(50).saturating_sub(t.elapsed()));
            }
            (max, samples)
        });
        BackendWatch {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops sampling; returns (largest count seen, number of samples).
    pub fn stop(mut self) -> (i64, usize) {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .expect("joined once")
            .join()
            .expect("backend watch thread")
    }
}

impl Drop for BackendWatch {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// What a [`UsersWatch`] saw.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsersSample {
    /// The largest sum over the users in one sample.
    pub max_total: i64,
    /// The largest count of each user (in the order given), each in its own sample.
    pub max_each: Vec<i64>,
    pub samples: usize,
}

/// Samples the backend counts of several users on a thread; see [`PgCluster::watch_users`].
pub struct UsersWatch {
    stop: Arc<std::sync::atomic::AtomicBool>,
    handle: Option<thread::JoinHandle<UsersSample>>,
}

impl UsersWatch {
    fn start(cluster: Arc<ClusterInner>, users: &[&str]) -> UsersWatch {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let users: Vec<String> = users.iter().map(|u| u.to_string()).collect();
        let list = users
            .iter()
            .map(|u| format!("'{}'", u.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT usename, count(*) FROM pg_stat_activity \
             WHERE usename IN ({list}) AND backend_type = 'client backend' GROUP BY usename"
        );
        let handle = thread::spawn(move || {
            let mut seen = UsersSample {
                max_each: vec![0; users.len()],
                ..UsersSample::default()
            };
            while !flag.load(Ordering::Relaxed) {
                let t = Instant::now();
                let out = cluster.psql_admin_db("postgres", &sql);
                let mut total = 0;
                for line in out.lines() {
                    let Some((name, n)) = line.split_once('|') else {
                        continue;
                    };
                    let n: i64 = n.trim().parse().unwrap_or(0);
                    total += n;
                    if let Some(i) = users.iter().position(|u| u == name) {
                        seen.max_each[i] = seen.max_each[i].max(n);
                    }
                }
                seen.max_total = seen.max_total.max(total);
                seen.samples += 1;
                thread::sleep(Duration::from_millis(50).saturating_sub(t.elapsed()));
            }
            seen
        });
        UsersWatch {
            stop,
            handle: Some(handle),
        }
    }

    pub fn stop(mut self) -> UsersSample {
        self.stop.store(true, Ordering::Relaxed);
        self.handle
            .take()
            .expect("joined once")
            .join()
            .expect("users watch thread")
    }
}

impl Drop for UsersWatch {
    /// Stops and joins the thread: it holds the cluster, and a test that fails with the watch
    /// running must still stop its Postgres (the test process may exit right after).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
