//! Backups with real pgBackRest 2.45 and real Postgres 15: the bootstrap's stanza, full backup
//! and standbys restored from it; `tidepool backup create/list/verify/expire`; point-in-time
//! restores into a new directory, each brought up as a cluster of its own and read through
//! its gateway; a failover during a backup; the archive behind at a failover.

mod ha;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use ha::{signal, HaCluster, Writer, Writes};
use serde_json::Value;
use testkit::{free_port, run_merged};

fn json(c: &HaCluster, args: &[&str]) -> Value {
    let out = c.tidepool(args);
    assert!(
        out.success(),
        "tidepool {args:?}:\n{}\n{}",
        out.text,
        c.logs()
    );
    // Progress and notes go to stderr (merged here); the JSON is the block from the first
    // line that opens one.
    let start = out
        .text
        .lines()
        .position(|l| l.starts_with('{') || l.starts_with('['))
        .unwrap_or(0);
    let text: Vec<&str> = out.text.lines().skip(start).collect();
    let end = text
        .iter()
        .rposition(|l| l.starts_with('}') || l.starts_with(']'))
        .unwrap_or(text.len().saturating_sub(1));
    serde_json::from_str(&text[..=end].join("\n"))
        .unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", out.text))
}

fn backups(c: &HaCluster) -> Vec<Value> {
    json(c, &["backup", "list", "--json"])["backups"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// A restored directory brought up with `tidepool up`; down and removed on drop.
struct Restored {
    dir: PathBuf,
    url: String,
    /// The timeline the restored cluster was promoted to.
    timeline: u32,
}

impl Restored {
    fn tidepool(&self, args: &[&str]) -> testkit::Output {
        let mut cmd = Command::new(ha::TIDEPOOL);
        cmd.args(args)
            .arg("--dir")
            .arg(&self.dir)
            .env_remove("TIDEPOOL_CONFIG")
            .env("TIDEPOOL_BIN_DIR", testkit::bin_dir());
        run_merged(&mut cmd, None, Duration::from_secs(240))
    }

    fn ids(&self) -> BTreeSet<i64> {
        let mut cmd = Command::new("psql");
        cmd.arg(&self.url)
            .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1"])
            .args(["-c", "SELECT id FROM acked ORDER BY id"])
            .env("PGCONNECT_TIMEOUT", "10");
        let out = run_merged(&mut cmd, None, Duration::from_secs(60));
        assert!(out.success(), "reading the restored cluster: {}", out.text);
        out.text
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        let _ = self.tidepool(&["down", "--stop-timeout-secs", "5"]);
        if std::env::var_os("TIDEPOOL_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// `tidepool restore --to TARGET` into a new directory, then `tidepool up` there.
fn restore(c: &HaCluster, target: &str) -> Restored {
    let mut r = restore_only(c, target);
    r.up(&[]);
    r
}

/// `tidepool restore --to TARGET` into a new directory.
fn restore_only(c: &HaCluster, target: &str) -> Restored {
    let dir = PathBuf::from(format!(
        "{}-r{}",
        c.dir.display(),
        target.len() + free_port() as usize
    ));
    let pg_port = free_port().to_string();
    let out = c.tidepool(&[
        "restore",
        "--to",
        target,
        "--into",
        dir.to_str().unwrap_or_default(),
        "--pg-port",
        &pg_port,
        "--timeout-secs",
        "120",
    ]);
    let timeline = out
        .text
        .split("on timeline ")
        .nth(1)
        .and_then(|t| t.split_whitespace().next())
        .and_then(|t| t.parse().ok())
        .unwrap_or(0);
    let r = Restored {
        dir,
        url: String::new(),
        timeline,
    };
    assert!(out.success(), "restore --to {target}:\n{}", out.text);
    eprintln!("restore --to {target}:\n{}", out.text);
    assert!(out.text.contains("on timeline"), "{}", out.text);
    r
}

impl Restored {
    /// `tidepool [GLOBAL] up` of the restored directory on free ports; its output.
    fn try_up(&self, global: &[&str]) -> testkit::Output {
        let (port, pooler, pg) = (
            free_port().to_string(),
            free_port().to_string(),
            free_port().to_string(),
        );
        let mut args = global.to_vec();
        args.extend([
            "up",
            "--port",
            &port,
            "--pooler-port",
            &pooler,
            "--pg-port",
            &pg,
            "--cores",
            "1",
            "--pool-size",
            "2",
        ]);
        self.tidepool(&args)
    }

    fn up(&mut self, global: &[&str]) {
        let up = self.try_up(global);
        assert!(up.success(), "up of the restored cluster:\n{}", up.text);
        self.url = up
            .text
            .lines()
            .rev()
            .find(|l| l.starts_with("postgres://"))
            .unwrap_or_default()
            .to_string();
    }
}

/// Every id acknowledged before the target was made is there; nothing written after it.
fn assert_cut(got: &BTreeSet<i64>, before: &Writes, after: &Writes, what: &str) {
    let missing: Vec<i64> = before
        .acked
        .iter()
        .copied()
        .filter(|id| !got.contains(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{what}: {} commits acknowledged before the target are missing, first {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    // The id in flight when the target was made may land on either side; every later one
    // started after it.
    let limit = after.acked.iter().max().copied().unwrap_or(0) + 1;
    let late: Vec<i64> = got.iter().copied().filter(|&id| id > limit).collect();
    assert!(
        late.is_empty(),
        "{what}: {} commits made after the target were restored, first {:?}",
        late.len(),
        &late[..late.len().min(10)]
    );
    assert!(!got.is_empty(), "{what}: nothing restored");
}

fn sql(c: &HaCluster, node: usize, text: &str) -> String {
    let out = c.psql_node(node, text);
    assert!(out.success(), "{text}: {}", out.text);
    out.text.trim().to_string()
}

#[test]
fn bootstrap_backup_under_a_writer_and_point_in_time_restores() {
    let c = HaCluster::settled(&[]);

    // The bootstrap: one full backup, every standby restored from it.
    let first = backups(&c);
    assert_eq!(first.len(), 1, "{first:?}");
    assert_eq!(first[0]["type"], "full");
    let restore_log = c.dir.join("pgbackrest/log/local-restore.log");
    let log = std::fs::read_to_string(&restore_log).unwrap_or_default();
    assert_eq!(
        log.matches("restore command end: completed successfully")
            .count(),
        2,
        "both standbys restored by pgBackRest:\n{log}"
    );

    // A backup under a writer, from a standby.
    let w = Writer::start(&c.url);
    w.expect_acks(&c, 0, 50, Duration::from_secs(30));
    let b = json(&c, &["backup", "create", "--type", "full", "--json"]);
    assert_eq!(b["source_role"], "standby", "{b}");
    assert_ne!(b["source"], "node1", "{b}");
    // One backup at a time: a second one while the first runs is refused.
    let first_running = {
        let dir = c.dir.clone();
        std::thread::spawn(move || {
            let mut cmd = Command::new(ha::TIDEPOOL);
            cmd.args(["backup", "create", "--type", "diff", "--dir"])
                .arg(&dir)
                .env_remove("TIDEPOOL_CONFIG");
            run_merged(&mut cmd, None, Duration::from_secs(240))
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    let second = c.tidepool(&["backup", "create", "--type", "diff"]);
    let first_out = first_running.join().expect("backup thread");
    assert!(first_out.success(), "{}", first_out.text);
    assert!(
        !second.success() && second.text.contains("another backup is running"),
        "{}",
        second.text
    );
    let b2 = json(&c, &["backup", "create", "--type", "incr", "--json"]);
    assert_eq!(b2["type"], "incr", "{b2}");
    assert!(
        b2["backup"]["prior"]
            .as_str()
            .is_some_and(|p| p.starts_with(b["label"].as_str().unwrap_or("?"))),
        "{b2}"
    );

    // A named restore point, then a time, each with writes on both sides.
    let before_name = w.snapshot();
    sql(&c, 0, "SELECT pg_create_restore_point('tp_before')");
    let after_name = w.snapshot();
    w.expect_acks(&c, after_name.acked.len(), 30, Duration::from_secs(30));
    let before_time = w.snapshot();
    let time = sql(&c, 0, "SELECT clock_timestamp()::text");
    let after_time = w.snapshot();
    w.expect_acks(&c, after_time.acked.len(), 30, Duration::from_secs(30));
    let all = w.finish();

    let r = restore(&c, "tp_before");
    assert_cut(&r.ids(), &before_name, &after_name, "restore point");
    drop(r);
    let r = restore(&c, &time);
    assert_cut(&r.ids(), &before_time, &after_time, "time");
    drop(r);
    let r = restore(&c, "latest");
    let got = r.ids();
    let missing: Vec<&i64> = all.acked.iter().filter(|id| !got.contains(id)).collect();
    assert!(missing.is_empty(), "latest: missing {missing:?}");
    drop(r);

    // Restoring over the live cluster is refused.
    let out = c.tidepool(&[
        "restore",
        "--to",
        "latest",
        "--into",
        c.dir.to_str().unwrap_or_default(),
    ]);
    assert!(
        !out.success() && out.text.contains("refusing to restore over"),
        "{}",
        out.text
    );

    // Retention from the config file: keep 1 full, so the bootstrap's goes.
    let conf = PathBuf::from(format!("{}-retention.toml", c.dir.display()));
    std::fs::write(&conf, "[backup]\nretention_full = 1\n").expect("writing a config");
    let out = c.tidepool(&[
        "--config",
        conf.to_str().unwrap_or_default(),
        "backup",
        "expire",
    ]);
    let _ = std::fs::remove_file(&conf);
    assert!(out.success(), "{}", out.text);
    let left = backups(&c);
    assert!(
        !left.iter().any(|x| x["label"] == first[0]["label"]),
        "{}\n{left:?}",
        out.text
    );

    // A lost standby is rebuilt from the latest backup by `up` and streams again.
    let pm = c.postgres_pid(2);
    c.kill_node(2);
    // The killed postmaster must be gone before a new one takes its socket (its lock file
    // names it while it lingers).
    let start = std::time::Instant::now();
    while pm.is_some_and(|p| std::path::Path::new(&format!("/proc/{p}")).exists())
        && start.elapsed() < Duration::from_secs(20)
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    std::fs::remove_dir_all(&c.nodes[2].data_dir).expect("removing node3's data");
    let out = c.tidepool(&["up"]);
    assert!(out.success(), "{}\n{}", out.text, c.logs());
    assert!(
        out.text.contains("restoring the latest backup into"),
        "{}",
        out.text
    );
    let mut c = c;
    c.reload_nodes();
    c.wait_all_streaming(&[], Duration::from_secs(60));

    // A corrupted backup file is caught.
    let out = c.tidepool(&["backup", "verify"]);
    assert!(out.success(), "{}", out.text);
    let label = b["label"].as_str().unwrap_or_default();
    let file = c.dir.join(format!(
        "backups/backup/local/{label}/pg_data/PG_VERSION.zst"
    ));
    let mut bytes = std::fs::read(&file).expect("a backup file");
    let n = bytes.len();
    bytes[n / 2] ^= 0xff;
    std::fs::write(&file, bytes).expect("corrupting it");
    let out = c.tidepool(&["backup", "verify"]);
    assert!(!out.success(), "{}", out.text);
    assert!(out.text.contains(label), "{}", out.text);
}

/// A child of `postmaster` whose title contains `what` (e.g. "archiver").
fn child_named(postmaster: u32, what: &str) -> Option<u32> {
    for e in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if ppid == Some(postmaster) && cmdline.contains(what) {
            return Some(pid);
        }
    }
    None
}

#[test]
fn failover_during_a_backup_and_an_archive_behind_at_failover_lose_nothing() {
    let c = HaCluster::settled(&[]);
    // Enough data that the backup is still copying when the primary dies.
    sql(
        &c,
        0,
        "CREATE TABLE filler AS SELECT g, repeat(md5(g::text), 16) AS pad \
         FROM generate_series(1, 120000) g",
    );
    let w = Writer::start(&c.url);
    w.expect_acks(&c, 0, 30, Duration::from_secs(30));

    // The primary dies during a backup: it fails with a message or completes.
    let during = {
        let dir = c.dir.clone();
        std::thread::spawn(move || {
            let mut cmd = Command::new(ha::TIDEPOOL);
            cmd.args(["backup", "create", "--type", "full", "--json", "--dir"])
                .arg(&dir)
                .env_remove("TIDEPOOL_CONFIG");
            run_merged(&mut cmd, None, Duration::from_secs(240))
        })
    };
    std::thread::sleep(Duration::from_millis(1500));
    c.kill_node(0);
    let (p2, r2) = c.wait_new_primary(0, 0, Duration::from_secs(30));
    let out = during.join().expect("backup thread");
    eprintln!(
        "backup during the failover: {}",
        if out.success() { "completed" } else { "failed" }
    );
    assert!(
        out.success() || out.text.contains("tidepool: error"),
        "{}",
        out.text
    );
    let acked = w.acked_count();
    w.expect_acks(&c, acked, 20, Duration::from_secs(30));

    // The next backup works (from the standby left, or the new primary).
    let b = json(&c, &["backup", "create", "--type", "full", "--json"]);
    assert_eq!(b["type"], "full", "{b}");

    // node1 comes back as a standby; then the new primary's archiver stalls while WAL is
    // written and switched, and the node dies with segments it never archived.
    let out = c.tidepool(&["up"]);
    assert!(out.success(), "{}\n{}", out.text, c.logs());
    let mut c = c;
    c.reload_nodes();
    c.wait_all_streaming(&[], Duration::from_secs(90));
    let pm = c.postgres_pid(p2).expect("the primary's postmaster");
    let archiver = child_named(pm, "archiver").expect("the primary's archiver");
    signal(archiver, libc::SIGSTOP);
    for _ in 0..3 {
        let acked = w.acked_count();
        w.expect_acks(&c, acked, 10, Duration::from_secs(30));
        sql(&c, p2, "SELECT pg_switch_wal()");
    }
    let behind = sql(
        &c,
        p2,
        "SELECT count(*) FROM pg_ls_archive_statusdir() WHERE name LIKE '%.ready'",
    );
    assert!(behind.parse::<u32>().unwrap_or(0) >= 3, "ready: {behind}");
    c.kill_node(p2);
    let (p3, _) = c.wait_new_primary(p2, r2.primary_term, Duration::from_secs(30));
    let acked = w.acked_count();
    w.expect_acks(&c, acked, 20, Duration::from_secs(30));
    let all = w.finish();
    eprintln!("primary now {}", c.nodes[p3].name);

    // Everything acknowledged, on both sides of both failovers, comes back from the archive;
    // the restored cluster's promotion saw the archived history files and took a timeline
    // above every one of them (two failovers: timelines 2 and 3 are archived).
    let r = restore(&c, "latest");
    assert!(r.timeline > 3, "restored onto timeline {}", r.timeline);
    let got = r.ids();
    let missing: Vec<&i64> = all.acked.iter().filter(|id| !got.contains(id)).collect();
    assert!(
        missing.is_empty(),
        "{} of {} acknowledged commits missing after restore --to latest: {:?}\n\
         --- restored postgres.log ---\n{}\n{}",
        missing.len(),
        all.acked.len(),
        &missing[..missing.len().min(10)],
        std::fs::read_to_string(r.dir.join("logs/postgres.log")).unwrap_or_default(),
        c.logs()
    );
}

fn schedule_record(c: &HaCluster) -> Value {
    std::fs::read_to_string(c.dir.join("pgbackrest/schedule.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

/// Waits until the schedule's record has `key` at or after Unix second `since`.
fn wait_schedule(c: &HaCluster, key: &str, since: i64, within: Duration) -> Value {
    let start = std::time::Instant::now();
    loop {
        let r = schedule_record(c);
        if r[key]["at"].as_i64().is_some_and(|at| at >= since) {
            return r[key].clone();
        }
        assert!(
            start.elapsed() < within,
            "no scheduled {key} since {since} within {within:?}: {r}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

#[test]
fn scheduled_backups_report_failures_and_follow_the_cluster_through_a_failover() {
    // Every 10 seconds (a leading seconds field), so that the test does not wait minutes.
    let conf = std::env::temp_dir().join(format!("tp-schedule-{}.toml", std::process::id()));
    std::fs::write(
        &conf,
        "[backup]\nschedule = [{ type = \"incr\", cron = \"*/10 * * * * *\" }]\n",
    )
    .expect("writing the config");
    let c = HaCluster::settled(&["--config", conf.to_str().unwrap_or_default()]);
    let _ = std::fs::remove_file(&conf);

    let first = wait_schedule(&c, "last_success", 0, Duration::from_secs(40));
    eprintln!("first scheduled backup: {first}");

    // The repository's backup directory closed to postgres: the next one fails, recorded and
    // logged. (Not the repository itself: every backup re-creates it with its mode.)
    let repo = c.dir.join("backups/backup");
    let broke_at = unix_now();
    set_mode(&repo, 0o000);
    let failure = wait_schedule(&c, "last_failure", broke_at, Duration::from_secs(40));
    set_mode(&repo, 0o750);
    eprintln!("scheduled failure: {failure}");
    assert!(
        c.log("control").contains("scheduled backup FAILED"),
        "{}",
        c.log("control")
    );
    let status = c.tidepool(&["status"]);
    assert!(
        status.text.contains("scheduled backups: last success incr"),
        "{}",
        status.text
    );

    // The primary dies: the schedule goes on against the new one.
    c.kill_node(0);
    let (p, _) = c.wait_new_primary(0, 0, Duration::from_secs(30));
    let after = unix_now();
    let ok = wait_schedule(&c, "last_success", after, Duration::from_secs(60));
    eprintln!("after the failover to {}: {ok}", c.nodes[p].name);
    let list = backups(&c);
    let label = ok["detail"].as_str().unwrap_or_default();
    assert!(
        list.iter()
            .any(|b| b["label"] == label && b["type"] == "incr"),
        "{label} not in {list:?}"
    );
    // `status` shows the success taken after the failover (the schedule's record follows the
    // cluster, not node1).
    // (A later one may have run meanwhile: labels sort by time.)
    let status = c.tidepool(&["status"]);
    let shown = status
        .text
        .lines()
        .find(|l| l.contains("scheduled backups: last success incr"))
        .and_then(|l| l.split_once('(').and_then(|(_, r)| r.split_once(')')))
        .map(|(label, _)| label.to_string())
        .unwrap_or_default();
    assert!(
        shown.as_str() >= label,
        "status shows {shown:?}, not {label} or later:\n{}",
        status.text
    );
}

#[test]
fn node_add_restores_a_standby_that_joins_the_cohort_and_can_be_promoted() {
    let mut c = HaCluster::up_with(1, &[]);
    c.wait_all_streaming(&[], Duration::from_secs(30));
    let w = Writer::start(&c.url);
    w.expect_acks(&c, 0, 30, Duration::from_secs(30));

    let out = c.tidepool(&["node", "add", "--zone", "local"]);
    assert!(out.success(), "{}\n{}", out.text, c.logs());
    assert!(
        out.text.contains("restoring the latest backup into"),
        "{}",
        out.text
    );
    c.reload_nodes();
    assert_eq!(c.nodes.len(), 3);
    c.wait_all_streaming(&[], Duration::from_secs(60));

    // In the durability policy: the primary's synchronous standbys name node3 ...
    let start = std::time::Instant::now();
    loop {
        let names = sql(&c, 0, "SHOW synchronous_standby_names");
        if names.contains("node3") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "node3 not in {names}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // ... and in the cohort: with node2 gone too, node3 alone with the dead primary is no
    // majority, but node2 + node3 are: kill the primary, one of them takes over with every
    // acknowledged commit.
    let topo = c.topology();
    assert!(topo["nodes"].to_string().contains("node3"), "{topo}");
    let acked = w.acked_count();
    w.expect_acks(&c, acked, 20, Duration::from_secs(30));
    c.kill_node(0);
    let (p, _) = c.wait_new_primary(0, 0, Duration::from_secs(30));
    let acked = w.acked_count();
    w.expect_acks(&c, acked, 20, Duration::from_secs(30));
    let writes = w.finish();
    ha::assert_all_acked_on(&c, p, &writes);
}

/// Whether `pid` is a live process (not gone, not a zombie).
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(|x| x != "Z"))
        })
        .unwrap_or(false)
}

#[test]
fn single_node_cluster_archives_backs_up_and_restores_to_a_point_in_time() {
    // `up` without standbys: no agent, no control process, still a stanza and a backup.
    let mut c = HaCluster::up_with(0, &[]);
    assert!(c.nodes.is_empty(), "a single node records no nodes");
    let pg_port = {
        let state: Value = serde_json::from_str(
            &std::fs::read_to_string(c.dir.join("state.json")).expect("state.json"),
        )
        .expect("state.json is JSON");
        state["postgres"]["port"].as_u64().unwrap_or_default() as u16
    };
    // For psql_node(0): the one Postgres, over its socket.
    c.nodes.push(ha::Node {
        name: "node1".into(),
        agent: "127.0.0.1:1".parse().expect("an address"),
        pooler: "127.0.0.1:1".parse().expect("an address"),
        data_dir: c.dir.join("pgdata"),
        socket_dir: c.dir.join("run"),
        agent_dir: c.dir.join("agent"),
        pg_port,
        pooler_pid: 0,
    });

    let first = backups(&c);
    assert_eq!(first.len(), 1, "the bootstrap's full backup: {first:?}");
    assert_eq!(first[0]["type"], "full");

    let w = Writer::start(&c.url);
    w.expect_acks(&c, 0, 30, Duration::from_secs(30));
    let out = c.tidepool(&["backup", "create", "--type", "incr"]);
    assert!(out.success(), "{}\n{}", out.text, c.logs());
    assert!(
        out.text
            .contains("single-node cluster: taking the backup from the primary node1"),
        "{}",
        out.text
    );
    let list = backups(&c);
    assert_eq!(list.len(), 2, "{list:?}");
    assert_eq!(list[1]["type"], "incr");

    // An LSN target with writes on both sides, then the latest.
    let before = w.snapshot();
    let lsn = sql(&c, 0, "SELECT pg_current_wal_insert_lsn()");
    let after = w.snapshot();
    w.expect_acks(&c, after.acked.len(), 30, Duration::from_secs(30));
    let all = w.finish();
    let archived = sql(
        &c,
        0,
        "SELECT archived_count > 0 AND failed_count = 0 FROM pg_stat_archiver",
    );
    assert_eq!(archived, "t", "the single node archives its WAL");

    let r = restore(&c, &lsn);
    assert_cut(&r.ids(), &before, &after, "LSN");
    drop(r);
    // The restored cluster archives too, but never into its source's stanza: `up` with the
    // source's repository is refused; with its own (the default) it runs.
    let mut r = restore_only(&c, "latest");
    let conf = PathBuf::from(format!("{}-shared-repo.toml", c.dir.display()));
    std::fs::write(
        &conf,
        format!("[backup]\nrepo_path = {:?}\n", c.dir.join("backups")),
    )
    .expect("writing a config");
    let out = r.try_up(&["--config", conf.to_str().unwrap_or_default()]);
    let _ = std::fs::remove_file(&conf);
    assert!(
        !out.success()
            && out
                .text
                .contains("must not archive into its source's stanza"),
        "{}",
        out.text
    );
    r.up(&[]);
    let got = r.ids();
    let missing: Vec<&i64> = all.acked.iter().filter(|id| !got.contains(id)).collect();
    assert!(missing.is_empty(), "latest: missing {missing:?}");
    let own = r.tidepool(&["backup", "list", "--json"]);
    assert!(
        own.success() && own.text.contains("\"full\""),
        "the restored cluster's own first backup:\n{}",
        own.text
    );
    drop(r);

    let out = c.tidepool(&["backup", "verify"]);
    assert!(out.success(), "{}", out.text);
    let out = c.tidepool(&[
        "restore",
        "--to",
        "latest",
        "--into",
        c.dir.to_str().unwrap_or_default(),
    ]);
    assert!(
        !out.success() && out.text.contains("refusing to restore over"),
        "{}",
        out.text
    );
    let out = c.tidepool(&["node", "add"]);
    assert!(
        !out.success() && out.text.contains("single node"),
        "{}",
        out.text
    );
}

#[test]
fn node_remove_refuses_the_primary_and_a_policy_left_unsatisfied_and_stops_a_standby() {
    let mut c = HaCluster::settled(&[]);
    let w = Writer::start(&c.url);
    w.expect_acks(&c, 0, 20, Duration::from_secs(30));
    let (p, _) = c.primary().expect("a primary");
    assert_eq!(p, 0, "node1 is the bootstrap primary");

    let out = c.tidepool(&["node", "remove", "node1"]);
    assert!(
        !out.success()
            && out.text.contains("node1 is the primary")
            && out.text.contains("tidepool switchover"),
        "{}",
        out.text
    );
    let out = c.tidepool(&["node", "remove", "node9"]);
    assert!(
        !out.success() && out.text.contains("no node \"node9\""),
        "{}",
        out.text
    );

    // node2 goes (a gap in the numbers: node1 and node3 stay).
    let pooler = c.nodes[1].pooler_pid;
    let postmaster = c.postgres_pid(1).expect("node2's postmaster");
    let out = c.tidepool(&["node", "remove", "node2"]);
    assert!(out.success(), "{}\n{}", out.text, c.logs());
    assert!(!alive(pooler), "node2's pooler still runs\n{}", out.text);
    assert!(
        !alive(postmaster),
        "node2's Postgres still runs\n{}",
        out.text
    );
    let sync = sql(&c, 0, "SHOW synchronous_standby_names");
    assert!(
        !sync.contains("node2") && sync.contains("node3"),
        "synchronous standbys {sync}"
    );
    let topo = c.topology();
    let cohort = topo["nodes"].to_string();
    assert!(
        !cohort.contains("node2") && cohort.contains("node3"),
        "{topo}"
    );
    c.reload_nodes();
    let names: Vec<&str> = c.nodes.iter().map(|n| n.name.as_str()).collect();
    assert_eq!(names, ["node1", "node3"]);
    // Writes go on through the gateway, synchronously acknowledged by node3.
    let acked = w.acked_count();
    w.expect_acks(&c, acked, 20, Duration::from_secs(30));
    c.wait_all_streaming(&[], Duration::from_secs(30));

    // The last standby: `any 2` cannot be met by node1 alone.
    let out = c.tidepool(&["node", "remove", "node3"]);
    assert!(
        !out.success() && out.text.contains("cannot satisfy the durability policy"),
        "{}",
        out.text
    );
    assert!(c.postgres_pid(1).is_some_and(alive), "node3 was stopped");

    // `up` again brings up the cohort as it is, not node2.
    let out = c.tidepool(&["up"]);
    assert!(out.success(), "{}\n{}", out.text, c.logs());
    assert!(!out.text.contains("restoring"), "{}", out.text);
    c.reload_nodes();
    assert_eq!(c.nodes.len(), 2);
    let acked = w.acked_count();
    w.expect_acks(&c, acked, 20, Duration::from_secs(30));
    let writes = w.finish();
    ha::assert_all_acked_on(&c, 0, &writes);
}

#[test]
fn single_node_scheduled_backups_run_in_a_control_process_of_their_own() {
    let conf = std::env::temp_dir().join(format!("tp-schedule1-{}.toml", std::process::id()));
    std::fs::write(
        &conf,
        "[backup]\nschedule = [{ type = \"incr\", cron = \"*/10 * * * * *\" }]\n",
    )
    .expect("writing the config");
    let c = HaCluster::up_with(0, &["--config", conf.to_str().unwrap_or_default()]);
    let _ = std::fs::remove_file(&conf);

    let ok = wait_schedule(&c, "last_success", 0, Duration::from_secs(40));
    let label = ok["detail"].as_str().unwrap_or_default().to_string();
    let list = backups(&c);
    assert!(
        list.iter()
            .any(|b| b["label"] == label.as_str() && b["type"] == "incr"),
        "{label} not in {list:?}"
    );
    let status = c.tidepool(&["status", "--json"]);
    assert!(status.success(), "{}\n{}", status.text, c.logs());
    let json: Value = serde_json::from_str(&status.text).unwrap_or_default();
    let control = json["processes"]
        .as_array()
        .and_then(|p| p.iter().find(|p| p["name"] == "control").cloned())
        .unwrap_or_default();
    assert_eq!(control["state"], "running/accepting", "{}", status.text);
    assert!(
        json["backup_schedule"]["last_success"]["detail"]
            .as_str()
            .is_some_and(|l| l >= label.as_str()),
        "{}",
        status.text
    );
    let pid = control["pid"].as_u64().unwrap_or_default() as u32;
    let out = c.tidepool(&["down"]);
    assert!(out.success(), "{}", out.text);
    assert!(!alive(pid), "down left the control process running");
}
