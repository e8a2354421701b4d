//! Harness of the high-availability tests: a `tidepool up --standbys 2` cluster in a fresh
//! state directory on free loopback ports, a writer that records every acknowledged commit,
//! and a watcher that records every (node, role, term) the agents report.

#![allow(dead_code)]

use std::collections::{BTreeMap, BTreeSet};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;
use shared::agent::{call_with, AgentAccess, Report, Request, Response, Role};
use testkit::{run_merged, Output};

pub const TIDEPOOL: &str = env!("CARGO_BIN_EXE_tidepool");

/// Ten consecutive loopback ports, all free a moment ago, below the ephemeral range (so no
/// outgoing connection takes one meanwhile).
fn free_block() -> u16 {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos() as u64 ^ (std::process::id() as u64 * 7919))
        .unwrap_or(1);
    let mut x = seed;
    for _ in 0..500 {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let base = 20000 + ((x >> 33) % 12000) as u16;
        if (0..10).all(|i| TcpListener::bind((Ipv4Addr::LOCALHOST, base + i)).is_ok()) {
            return base;
        }
    }
    panic!("no block of 10 free ports");
}

pub struct Node {
    pub name: String,
    pub agent: SocketAddr,
    pub pooler: SocketAddr,
    pub data_dir: PathBuf,
    pub socket_dir: PathBuf,
    /// Where its agent keeps its pledge.
    pub agent_dir: PathBuf,
    pub pg_port: u16,
    pub pooler_pid: u32,
}

pub struct HaCluster {
    pub dir: PathBuf,
    pub url: String,
    pub nodes: Vec<Node>,
    pub gateway_port: u16,
}

impl HaCluster {
    /// `tidepool up --standbys 2` with `extra` flags.
    pub fn up(extra: &[&str]) -> HaCluster {
        HaCluster::up_with(2, extra)
    }

    /// `tidepool up --standbys N` with `extra` flags (N at most 2: ten ports per cluster).
    pub fn up_with(standbys: u32, extra: &[&str]) -> HaCluster {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let dir = std::env::temp_dir().join(format!("tp-ha-{}-{nanos}", std::process::id()));
        let base = free_block();
        let mut c = HaCluster {
            dir,
            url: String::new(),
            nodes: Vec::new(),
            gateway_port: base,
        };
        let (port, pooler, pg) = (
            base.to_string(),
            (base + 1).to_string(),
            (base + 7).to_string(),
        );
        let standbys = standbys.to_string();
        let mut args = vec![
            "up",
            "--standbys",
            &standbys,
            "--port",
            &port,
            "--pooler-port",
            &pooler,
            "--pg-port",
            &pg,
            "--cores",
            "1",
            "--pool-size",
            "5",
        ];
        args.extend_from_slice(extra);
        let out = c.tidepool(&args);
        assert!(
            out.success(),
            "tidepool up failed:\n{}\n{}",
            out.text,
            c.logs()
        );
        c.url = out
            .text
            .lines()
            .rev()
            .find(|l| l.starts_with("postgres://"))
            .unwrap_or_default()
            .to_string();
        c.reload_nodes();
        c
    }

    /// [`HaCluster::up`], then waits until every standby streams.
    pub fn settled(extra: &[&str]) -> HaCluster {
        let c = HaCluster::up(extra);
        c.wait_all_streaming(&[], Duration::from_secs(30));
        c
    }

    pub fn reload_nodes(&mut self) {
        let state: Value = serde_json::from_str(
            &std::fs::read_to_string(self.dir.join("state.json")).expect("state.json"),
        )
        .expect("state.json is JSON");
        self.nodes = state["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| Node {
                name: n["name"].as_str().unwrap_or_default().to_string(),
                agent: n["agent"]
                    .as_str()
                    .unwrap_or_default()
                    .parse()
                    .expect("agent addr"),
                pooler: n["pooler"]
                    .as_str()
                    .unwrap_or_default()
                    .parse()
                    .expect("pooler addr"),
                data_dir: n["data_dir"].as_str().unwrap_or_default().into(),
                socket_dir: n["socket_dir"].as_str().unwrap_or_default().into(),
                agent_dir: PathBuf::from(n["state_dir"].as_str().unwrap_or_default()).join("agent"),
                pg_port: n["pg_port"].as_u64().unwrap_or_default() as u16,
                pooler_pid: n["pooler_pid"].as_u64().unwrap_or_default() as u32,
            })
            .collect();
        // node1's pooler is a tier process.
        if let Some(p) = state["processes"]
            .as_array()
            .and_then(|a| a.iter().find(|p| p["name"] == "pooler"))
        {
            if let Some(n) = self.nodes.first_mut() {
                n.pooler_pid = p["pid"].as_u64().unwrap_or_default() as u32;
            }
        }
    }

    pub fn tidepool(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(TIDEPOOL);
        cmd.args(args)
            .arg("--dir")
            .arg(&self.dir)
            .env_remove("TIDEPOOL_CONFIG")
            .env("TIDEPOOL_BIN_DIR", testkit::bin_dir());
        run_merged(&mut cmd, None, Duration::from_secs(240))
    }

    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join("logs").join(format!("{name}.log")))
            .unwrap_or_else(|e| format!("(no log: {e})"))
    }

    pub fn logs(&self) -> String {
        let mut names: Vec<String> = std::fs::read_dir(self.dir.join("logs"))
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .filter_map(|e| {
                        e.file_name()
                            .to_str()
                            .map(|s| s.trim_end_matches(".log").to_string())
                    })
                    .collect()
            })
            .unwrap_or_default();
        names.sort();
        names
            .iter()
            .map(|n| {
                let text = self.log(n);
                let lines: Vec<&str> = text.lines().collect();
                format!(
                    "--- {n}.log ---\n{}",
                    lines[lines.len().saturating_sub(25)..].join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// How the control process reaches the agents: the cluster's agent secret (DIR/agent.key)
    /// and, over TLS, the cluster CA (DIR/tls/ca.crt), both written by `up`.
    pub fn key(&self) -> AgentAccess {
        tidepool::cluster::agent_access(&self.dir).unwrap_or_else(|e| panic!("agent access: {e}"))
    }

    pub fn report(&self, i: usize) -> Option<Report> {
        match call_with(
            self.nodes[i].agent,
            &self.key(),
            &Request::Report,
            Duration::from_secs(2),
        ) {
            Ok(Response::Ok { report }) => Some(report),
            _ => None,
        }
    }

    /// The node reporting Primary at the highest term.
    pub fn primary(&self) -> Option<(usize, Report)> {
        (0..self.nodes.len())
            .filter_map(|i| self.report(i).map(|r| (i, r)))
            .filter(|(_, r)| r.role == Role::Primary)
            .max_by_key(|(_, r)| r.primary_term)
    }

    /// Waits until a node other than `not` is primary at a term above `above`.
    pub fn wait_new_primary(&self, not: usize, above: u64, within: Duration) -> (usize, Report) {
        let start = Instant::now();
        loop {
            if let Some((i, r)) = self.primary() {
                if i != not && r.primary_term > above {
                    return (i, r);
                }
            }
            assert!(
                start.elapsed() < within,
                "no new primary within {within:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits until every node but `except` streams from the primary.
    pub fn wait_all_streaming(&self, except: &[usize], within: Duration) {
        let start = Instant::now();
        loop {
            let reports: Vec<Option<Report>> = (0..self.nodes.len())
                .filter(|i| !except.contains(i))
                .map(|i| self.report(i))
                .collect();
            // One primary (an old primary back but not yet rewound is a second one: not
            // settled), every other node a standby streaming from somewhere.
            let primaries = reports
                .iter()
                .filter(|r| r.as_ref().is_some_and(|r| r.role == Role::Primary))
                .count();
            let ok = primaries == 1
                && reports.iter().all(|r| {
                    r.as_ref().is_some_and(|r| {
                        r.role == Role::Primary
                            || (r.role == Role::Standby && r.streaming && !r.recruited)
                    })
                });
            if ok {
                return;
            }
            assert!(
                start.elapsed() < within,
                "nodes not all streaming within {within:?}\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The postmaster pid of node `i`.
    pub fn postgres_pid(&self, i: usize) -> Option<u32> {
        let text = std::fs::read_to_string(self.nodes[i].data_dir.join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// The whole node dies: its pooler (the agent, which would restart Postgres) and every
    /// Postgres process, with SIGKILL.
    pub fn kill_node(&self, i: usize) {
        signal(self.nodes[i].pooler_pid, libc::SIGKILL);
        if let Some(pid) = self.postgres_pid(i) {
            signal_group_of_postmaster(pid, libc::SIGKILL);
        }
    }

    /// SQL as role postgres on node `i` directly (Unix socket, peer), database tidepool.
    pub fn psql_node(&self, i: usize, sql: &str) -> Output {
        let mut cmd = Command::new("/usr/lib/postgresql/15/bin/psql");
        cmd.arg("-h")
            .arg(&self.nodes[i].socket_dir)
            .args([
                "-p",
                &self.nodes[i].pg_port.to_string(),
                "-U",
                "postgres",
                "-d",
                "tidepool",
            ])
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql]);
        run_merged(&mut cmd, None, Duration::from_secs(30))
    }

    /// The stored topology (the file store's `{"version", "topology"}`, in the control
    /// process's directory).
    pub fn topology(&self) -> Value {
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(self.dir.join("control/topology.json")).unwrap_or_default(),
        )
        .unwrap_or(Value::Null);
        v["topology"].clone()
    }
}

impl Drop for HaCluster {
    fn drop(&mut self) {
        // Thawed first: a stopped process ignores SIGTERM.
        for i in 0..self.nodes.len() {
            if let Some(pid) = self.postgres_pid(i) {
                signal_group_of_postmaster(pid, libc::SIGCONT);
            }
        }
        if self.dir.join("state.json").exists() {
            let _ = self.tidepool(&["down", "--stop-timeout-secs", "5"]);
        }
        // Whatever `down` did not know of (a node whose pooler was restarted by the test).
        for i in 0..self.nodes.len() {
            if let Some(pid) = self.postgres_pid(i) {
                signal_group_of_postmaster(pid, libc::SIGKILL);
            }
        }
        if std::env::var_os("TIDEPOOL_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("kept {}", self.dir.display());
        }
    }
}

/// uid and gid of an OS user (from `id`).
pub fn os_user(name: &str) -> (u32, u32) {
    let id = |flag: &str| {
        let out = Command::new("id").args([flag, name]).output().unwrap();
        assert!(out.status.success(), "no OS user {name}");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    (id("-u"), id("-g"))
}

/// A line of `/proc/PID/status` (`Uid:`, `Gid:`, `Groups:`) as numbers.
pub fn proc_ids(pid: u32, field: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("/proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in {status}"))
        .split_whitespace()
        .map(|v| v.parse::<u32>().unwrap())
        .collect()
}

/// The command line of `pid`, arguments separated by spaces.
pub fn cmdline(pid: u32) -> String {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&raw).replace('\0', " ")
}

pub fn signal(pid: u32, sig: i32) {
    if pid > 1 {
        // SAFETY: kill(2) on a pid this test started.
        unsafe {
            libc::kill(pid as i32, sig);
        }
    }
}

/// The postmaster and its children (Postgres backends are children of the postmaster; they
/// share no process group with it when started by pg_ctl, so walk /proc).
pub fn signal_group_of_postmaster(postmaster: u32, sig: i32) {
    let mut pids = vec![postmaster];
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            // Field 4 (after the parenthesised command) is the parent pid.
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            if ppid == Some(postmaster) {
                pids.push(pid);
            }
        }
    }
    // The postmaster first for SIGSTOP (it must not notice its children stopping), last for
    // SIGKILL does not matter.
    for pid in pids {
        signal(pid, sig);
    }
}

/// Records every (node, role, primary term) the agents report, to check afterwards that no
/// term ever had two primaries.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<BTreeMap<u64, BTreeSet<String>>>>,
    handle: Option<JoinHandle<()>>,
}

impl Watcher {
    pub fn start(cluster: &HaCluster) -> Watcher {
        let nodes: Vec<(String, SocketAddr)> = cluster
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.agent))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(BTreeMap::<u64, BTreeSet<String>>::new()));
        let (s, k) = (stop.clone(), seen.clone());
        let key = cluster.key();
        let handle = std::thread::spawn(move || {
            let start = Instant::now();
            while !s.load(Ordering::Relaxed) && start.elapsed() < Duration::from_secs(600) {
                for (name, addr) in &nodes {
                    if let Ok(Response::Ok { report }) =
                        call_with(*addr, &key, &Request::Report, Duration::from_millis(500))
                    {
                        if report.role == Role::Primary {
                            if let Ok(mut m) = k.lock() {
                                m.entry(report.primary_term)
                                    .or_default()
                                    .insert(name.clone());
                            }
                        }
                    }
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Watcher {
            stop,
            seen,
            handle: Some(handle),
        }
    }

    /// Stops watching; panics if a term had two primaries. Returns the terms seen.
    pub fn finish(mut self) -> BTreeMap<u64, BTreeSet<String>> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        let seen = self.seen.lock().map(|m| m.clone()).unwrap_or_default();
        for (term, nodes) in &seen {
            assert!(nodes.len() <= 1, "term {term} had two primaries: {nodes:?}");
        }
        seen
    }
}

/// What the writer saw.
#[derive(Debug, Default, Clone)]
pub struct Writes {
    /// Ids whose INSERT (autocommit) was acknowledged.
    pub acked: Vec<i64>,
    /// Errors by SQLSTATE (or "connect" / "io").
    pub errors: BTreeMap<String, usize>,
    /// Instants of acknowledged writes, for "writes succeed again within ...".
    pub ack_times: Vec<Instant>,
}

/// A client through the gateway inserting ids 1, 2, ... one at a time until stopped, each its
/// own transaction; reconnects when its connection breaks.
pub struct Writer {
    stop: Arc<AtomicBool>,
    writes: Arc<Mutex<Writes>>,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    pub fn start(url: &str) -> Writer {
        let url = url.to_string();
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(Mutex::new(Writes::default()));
        let (s, w) = (stop.clone(), writes.clone());
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async move {
                let started = Instant::now();
                let mut next = 1i64;
                let bump = |key: &str| {
                    if let Ok(mut w) = w.lock() {
                        *w.errors.entry(key.to_string()).or_default() += 1;
                    }
                };
                'outer: while !s.load(Ordering::Relaxed)
                    && started.elapsed() < Duration::from_secs(600)
                {
                    let client = match tokio::time::timeout(
                        Duration::from_secs(10),
                        tokio_postgres::connect(&url, tokio_postgres::NoTls),
                    )
                    .await
                    {
                        Ok(Ok((client, conn))) => {
                            tokio::spawn(conn);
                            client
                        }
                        _ => {
                            bump("connect");
                            tokio::time::sleep(Duration::from_millis(100)).await;
                            continue;
                        }
                    };
                    let _ = client
                        .batch_execute("CREATE TABLE IF NOT EXISTS acked (id bigint PRIMARY KEY)")
                        .await;
                    while !s.load(Ordering::Relaxed) {
                        let id = next;
                        next += 1;
                        let r = tokio::time::timeout(
                            Duration::from_secs(30),
                            client.execute("INSERT INTO acked (id) VALUES ($1)", &[&id]),
                        )
                        .await;
                        match r {
                            Ok(Ok(_)) => {
                                if let Ok(mut w) = w.lock() {
                                    w.acked.push(id);
                                    w.ack_times.push(Instant::now());
                                }
                                tokio::time::sleep(Duration::from_millis(5)).await;
                            }
                            Ok(Err(e)) => {
                                let key = e
                                    .code()
                                    .map(|c| c.code().to_string())
                                    .unwrap_or_else(|| "io".into());
                                bump(&key);
                                if client.is_closed() {
                                    continue 'outer;
                                }
                                tokio::time::sleep(Duration::from_millis(20)).await;
                            }
                            Err(_) => {
                                bump("timeout");
                                continue 'outer;
                            }
                        }
                    }
                }
            });
        });
        Writer {
            stop,
            writes,
            handle: Some(handle),
        }
    }

    pub fn snapshot(&self) -> Writes {
        self.writes.lock().map(|w| w.clone()).unwrap_or_default()
    }

    pub fn acked_count(&self) -> usize {
        self.writes.lock().map(|w| w.acked.len()).unwrap_or(0)
    }

    pub fn finish(mut self) -> Writes {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
        self.snapshot()
    }

    /// Panics (with the cluster's logs) unless `n` more writes than `since` are acknowledged
    /// within `within`.
    pub fn expect_acks(&self, c: &HaCluster, since: usize, n: usize, within: Duration) {
        assert!(
            self.wait_acks(since, n, within),
            "{n} more writes were not acknowledged within {within:?} ({} so far)\n{}",
            self.acked_count(),
            c.logs()
        );
    }

    /// Waits until `n` more writes were acknowledged than `since`.
    pub fn wait_acks(&self, since: usize, n: usize, within: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < within {
            if self.acked_count() >= since + n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }
}

/// Every acknowledged id is on node `i`.
pub fn assert_all_acked_on(cluster: &HaCluster, i: usize, writes: &Writes) {
    let out = cluster.psql_node(i, "SELECT id FROM acked ORDER BY id");
    assert!(
        out.success(),
        "reading acked on {}: {}",
        cluster.nodes[i].name,
        out.text
    );
    let have: BTreeSet<i64> = out
        .text
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect();
    let missing: Vec<i64> = writes
        .acked
        .iter()
        .copied()
        .filter(|id| !have.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged commits missing on {} (of {}): first {:?}",
        missing.len(),
        cluster.nodes[i].name,
        writes.acked.len(),
        &missing[..missing.len().min(10)]
    );
}

/// A firewall rule dropping every packet to a loopback TCP port, removed on drop.
pub struct Cut {
    port: u16,
}

impl Cut {
    pub fn port(port: u16) -> Cut {
        let out = iptables("-I", port);
        assert!(out.success(), "iptables: {}", out.text);
        Cut { port }
    }
}

fn iptables(op: &str, port: u16) -> Output {
    let mut cmd = Command::new("iptables");
    cmd.args([
        op,
        "OUTPUT",
        "-o",
        "lo",
        "-p",
        "tcp",
        "--dport",
        &port.to_string(),
        "-j",
        "DROP",
    ]);
    run_merged(&mut cmd, None, Duration::from_secs(10))
}

impl Drop for Cut {
    fn drop(&mut self) {
        let _ = iptables("-D", self.port);
    }
}

/// The primary's WAL senders, stopped: the standbys hear nothing more from it (as if the
/// network between them were cut) while its client backends keep working.
pub fn walsenders_of(postmaster: u32) -> Vec<u32> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir("/proc") {
        for e in entries.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
                continue;
            };
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let ppid = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().nth(1))
                .and_then(|p| p.parse::<u32>().ok());
            let cmdline =
                std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if ppid == Some(postmaster) && cmdline.contains("walsender") {
                out.push(pid);
            }
        }
    }
    out
}
