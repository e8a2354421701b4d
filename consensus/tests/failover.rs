//! High availability with real failures: a primary and two streaming standbys
//! (`tidepool up --standbys 2`), the control process, the gateway, and a writer through the
//! gateway that records every acknowledged commit. After each failure: every acknowledged
//! commit is on the new primary, and no term ever had two primaries.

mod ha;

use std::time::{Duration, Instant};

use std::os::unix::fs::MetadataExt;

use ha::{
    assert_all_acked_on, cmdline, os_user, proc_ids, signal_group_of_postmaster, HaCluster,
    Watcher, Writer,
};
use shared::agent::Role;

#[test]
fn up_with_standbys_streams_and_reports_each_node() {
    let c = HaCluster::up(&[]);
    let out = c.tidepool(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&out.text)
        .unwrap_or_else(|e| panic!("status --json ({e}):\n{}", out.text));
    let nodes = json["nodes"].as_array().expect("nodes in status");
    assert_eq!(nodes.len(), 3, "{}", out.text);
    assert_eq!(nodes[0]["role"], "primary", "{}", out.text);
    for n in &nodes[1..] {
        assert_eq!(n["role"], "standby", "{}", out.text);
    }
    c.wait_all_streaming(&[], Duration::from_secs(30));
    let table = c.tidepool(&["status"]);
    assert!(
        table.text.contains("node3") && table.text.contains("standby"),
        "{}",
        table.text
    );

    // A commit through the gateway is on both standbys (synchronous: ANY 1 of them at once).
    let w = Writer::start(&c.url);
    w.expect_acks(&c, 0, 20, Duration::from_secs(30));
    let writes = w.finish();
    assert!(writes.errors.is_empty(), "{:?}", writes.errors);
    std::thread::sleep(Duration::from_secs(1));
    for i in 0..3 {
        assert_all_acked_on(&c, i, &writes);
    }
    // The agents take TLS only: a plain call with the right secret gets no answer.
    let plain = shared::agent::call(
        c.nodes[0].agent,
        &c.key().key,
        &shared::agent::Request::Report,
        Duration::from_secs(2),
    );
    assert!(plain.is_err(), "a plain call was answered: {plain:?}");
    // The primary requires one of the standbys per the default policy (any 2).
    let sync = c.psql_node(0, "SHOW synchronous_standby_names");
    assert!(sync.text.contains("ANY 1"), "{}", sync.text);

    // Least privilege (issue 12 §4): every node's pooler, its node agent included, runs as
    // `postgres` (real, effective, saved and filesystem ids; no other groups) with its own
    // copies of the secrets, and keeps its pledge in a directory of its own.
    let (uid, gid) = os_user("postgres");
    assert_ne!(uid, 0);
    let keys = c.dir.join("keys");
    for n in &c.nodes {
        assert_ne!(n.pooler_pid, 0, "{}'s pooler pid", n.name);
        assert_eq!(
            proc_ids(n.pooler_pid, "Uid:"),
            vec![uid; 4],
            "{}'s pooler",
            n.name
        );
        assert_eq!(
            proc_ids(n.pooler_pid, "Gid:"),
            vec![gid; 4],
            "{}'s pooler",
            n.name
        );
        assert_eq!(proc_ids(n.pooler_pid, "Groups:"), Vec::<u32>::new());
        let cmd = cmdline(n.pooler_pid);
        // The agent speaks TLS with the node's certificate from the cluster CA (its key a
        // copy of postgres's own, 600); `status` above reached every agent through it. The
        // link stays on loopback, plain (`certs::link_needs_tls`).
        let tls_key = format!("tls.{}.pooler.key", n.name);
        let cert = c.dir.join("tls").join(format!("{}.crt", n.name));
        assert!(
            cmd.contains(&format!("--agent-tls-cert {}", cert.display())),
            "{}: {cmd}",
            n.name
        );
        assert!(!cmd.contains("--link-tls-"), "{}: {cmd}", n.name);
        for (flag, copy) in [
            ("--link-secret-file", "link.pooler.key"),
            ("--agent-secret-file", "agent.pooler.key"),
            ("--agent-tls-key", tls_key.as_str()),
            ("--state-dir", ""),
        ] {
            let want = if copy.is_empty() {
                n.agent_dir.clone()
            } else {
                keys.join(copy)
            };
            assert!(
                cmd.contains(&format!("{flag} {}", want.display())),
                "{}: {cmd}",
                n.name
            );
        }
        let meta = std::fs::metadata(&n.agent_dir).unwrap();
        assert_eq!(
            (meta.uid(), meta.mode() & 0o777),
            (uid, 0o700),
            "{}",
            n.agent_dir.display()
        );
    }
    // The control process too (it commands every agent): `postgres`, with its own copy of the
    // agent secret, and its topology and requests in a directory of its own.
    let control = control_pid(&c);
    assert_eq!(
        proc_ids(control, "Uid:"),
        vec![uid; 4],
        "the control process"
    );
    assert_eq!(
        proc_ids(control, "Gid:"),
        vec![gid; 4],
        "the control process"
    );
    assert_eq!(proc_ids(control, "Groups:"), Vec::<u32>::new());
    let cmd = cmdline(control);
    assert!(
        cmd.contains(&format!(
            "--agent-secret-file {}",
            keys.join("agent.control.key").display()
        )),
        "{cmd}"
    );
    for path in ["control", "control/requests"] {
        let meta = std::fs::metadata(c.dir.join(path)).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o700), "{path}");
    }
    let meta = std::fs::metadata(c.dir.join("control/topology.json")).unwrap();
    assert_eq!(
        meta.uid(),
        uid,
        "the topology is written by the control process"
    );
    assert!(!c.dir.join("topology.json").exists());
    for (copy, master) in [
        ("agent.control.key", "agent.key"),
        ("link.pooler.key", "link.key"),
        ("agent.pooler.key", "agent.key"),
        ("tls.node1.pooler.key", "tls/node1.key"),
        ("tls.node2.pooler.key", "tls/node2.key"),
        ("tls.node3.pooler.key", "tls/node3.key"),
    ] {
        let meta = std::fs::metadata(keys.join(copy)).unwrap();
        assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o600), "{copy}");
        assert_eq!(
            std::fs::read(keys.join(copy)).unwrap(),
            std::fs::read(c.dir.join(master)).unwrap(),
            "{copy} is a copy of {master}"
        );
    }
}

#[test]
fn kill_9_of_the_primary_node_fails_over_and_loses_no_acknowledged_commit() {
    let c = HaCluster::settled(&[]);
    let watcher = Watcher::start(&c);
    let w = Writer::start(&c.url);
    w.expect_acks(&c, 0, 50, Duration::from_secs(30));

    let killed_at = Instant::now();
    let before = w.acked_count();
    c.kill_node(0);
    let (new, r) = c.wait_new_primary(0, 0, Duration::from_secs(30));
    w.expect_acks(&c, before, 20, Duration::from_secs(30));
    let writes = w.finish();
    let first_after = writes.ack_times[before..]
        .iter()
        .map(|t| t.duration_since(killed_at))
        .next();
    eprintln!(
        "failover: {} promoted at term {}; first write {:?} after the kill; errors {:?}",
        c.nodes[new].name, r.primary_term, first_after, writes.errors
    );
    assert_all_acked_on(&c, new, &writes);
    let terms = watcher.finish();
    assert!(terms.contains_key(&r.primary_term), "{terms:?}");
    let history = c.topology();
    assert!(
        history["history"].to_string().contains("failover"),
        "{history}"
    );
    // The promoted node's agent (unprivileged: `postgres`) kept its pledge in its own directory.
    let pledge = c.nodes[new].agent_dir.join("tidepool-node.json");
    let meta = std::fs::metadata(&pledge).unwrap_or_else(|e| panic!("{}: {e}", pledge.display()));
    assert_eq!(meta.uid(), os_user("postgres").0, "{}", pledge.display());
}

#[test]
fn a_primary_frozen_by_sigstop_is_replaced_and_rewound_when_it_thaws() {
    let freeze = Duration::from_secs(
        std::env::var("TIDEPOOL_FREEZE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    let c = HaCluster::settled(&[]);
    let watcher = Watcher::start(&c);
    let w = Writer::start(&c.url);
    w.expect_acks(&c, 0, 50, Duration::from_secs(30));
    let pid = c.postgres_pid(0).expect("primary pid");
    let before = w.acked_count();
    signal_group_of_postmaster(pid, libc::SIGSTOP);
    let (new, r) = c.wait_new_primary(0, 0, Duration::from_secs(40));
    w.expect_acks(&c, before, 20, Duration::from_secs(30));
    let left = freeze.saturating_sub(Duration::from_secs(1));
    std::thread::sleep(left.min(freeze));
    signal_group_of_postmaster(pid, libc::SIGCONT);
    // The old primary comes back, is rewound, and streams from the new one.
    let start = Instant::now();
    loop {
        let back = c
            .report(0)
            .is_some_and(|r0| r0.role == Role::Standby && r0.streaming);
        if back {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(90),
            "node1 did not follow after thawing\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(300));
    }
    let writes = w.finish();
    assert_all_acked_on(&c, new, &writes);
    std::thread::sleep(Duration::from_secs(2));
    assert_all_acked_on(&c, 0, &writes);
    let terms = watcher.finish();
    assert!(terms.contains_key(&r.primary_term), "{terms:?}");
}

#[test]
fn losing_the_primary_and_a_standby_needs_an_explicit_recorded_override() {
    let c = HaCluster::settled(&[]);
    let w = Writer::start(&c.url);
    w.expect_acks(&c, 0, 20, Duration::from_secs(30));
    let writes = w.finish();
    c.kill_node(0);
    c.kill_node(1);
    // The control process must not promote node3 on its own: node2 may hold commits node3
    // lacks, and one node of three is no majority.
    std::thread::sleep(Duration::from_secs(8));
    assert!(
        c.report(2).is_some_and(|r| r.role == Role::Standby),
        "node3 was promoted without a majority\n{}",
        c.logs()
    );
    let out = c.tidepool(&[
        "failover",
        "--force",
        "--reason",
        "test: node1 and node2 lost",
        "--to",
        "node3",
    ]);
    assert!(out.success(), "{}\n{}", out.text, c.logs());
    let (new, _) = c.wait_new_primary(0, 0, Duration::from_secs(30));
    assert_eq!(new, 2);
    let topo = c.topology();
    assert!(
        topo["history"]
            .to_string()
            .contains("test: node1 and node2 lost"),
        "{topo}"
    );
    // Synchronous replication: node2 or node3 acknowledged each commit; here node3 has them
    // all because it streamed to the end.
    assert_all_acked_on(&c, 2, &writes);
}

#[test]
fn switchover_moves_the_primary_without_client_errors() {
    let c = HaCluster::settled(&[]);
    let watcher = Watcher::start(&c);
    let w = Writer::start(&c.url);
    w.expect_acks(&c, 0, 50, Duration::from_secs(30));
    let out = c.tidepool(&["switchover", "--to", "node2"]);
    assert!(out.success(), "{}\n{}", out.text, c.logs());
    let (new, _) = c.wait_new_primary(0, 0, Duration::from_secs(30));
    assert_eq!(new, 1);
    let before = w.acked_count();
    w.expect_acks(&c, before, 20, Duration::from_secs(30));
    c.wait_all_streaming(&[], Duration::from_secs(60));
    let writes = w.finish();
    assert!(
        writes.errors.is_empty(),
        "client-visible errors in a switchover: {:?}",
        writes.errors
    );
    assert_all_acked_on(&c, 1, &writes);
    watcher.finish();
}

#[test]
fn losing_only_the_control_processs_view_of_the_primary_is_no_failover() {
    let c = HaCluster::settled(&[]);
    let w = Writer::start(&c.url);
    w.expect_acks(&c, 0, 20, Duration::from_secs(30));
    {
        let _cut = ha::Cut::port(c.nodes[0].agent.port());
        std::thread::sleep(Duration::from_secs(10));
        // Writes go on: the primary serves clients and its standbys still stream from it.
        let before = w.acked_count();
        assert!(
            w.wait_acks(before, 20, Duration::from_secs(10)),
            "writes stopped\n{}",
            c.logs()
        );
    }
    let writes = w.finish();
    assert!(writes.errors.is_empty(), "{:?}", writes.errors);
    assert_eq!(
        c.topology()["term"],
        0,
        "a failover happened: {}",
        c.topology()
    );
    assert!(
        c.log("control").contains("still streams"),
        "{}",
        c.log("control")
    );
    assert_all_acked_on(&c, 0, &writes);
}

#[test]
fn a_primary_cut_off_from_its_standbys_and_the_control_process_is_replaced() {
    let c = HaCluster::settled(&[]);
    let watcher = Watcher::start(&c);
    let w = Writer::start(&c.url);
    w.expect_acks(&c, 0, 20, Duration::from_secs(30));
    let postmaster = c.postgres_pid(0).expect("primary pid");
    let senders = ha::walsenders_of(postmaster);
    assert_eq!(senders.len(), 2, "two WAL senders");
    let cut = ha::Cut::port(c.nodes[0].agent.port());
    // Standbys stream over the primary's Unix socket as the postgres OS user: closing the
    // socket file to that user keeps them from reconnecting (root — the pooler's admin
    // connection — and TCP clients are unaffected), and the WAL senders they have freeze.
    let socket = c.nodes[0]
        .socket_dir
        .join(format!(".s.PGSQL.{}", c.nodes[0].pg_port));
    set_mode(&socket, 0o000);
    for &pid in &senders {
        ha::signal(pid, libc::SIGSTOP);
    }
    // Clients still reach the old primary, but it can complete no commit: its synchronous
    // standbys are gone. The control process fails over.
    let (new, r) = c.wait_new_primary(0, 0, Duration::from_secs(40));
    let before = w.acked_count();
    w.expect_acks(&c, before, 20, Duration::from_secs(40));
    set_mode(&socket, 0o777);
    for &pid in &senders {
        ha::signal(pid, libc::SIGCONT);
    }
    drop(cut);
    let writes = w.finish();
    assert_all_acked_on(&c, new, &writes);
    let terms = watcher.finish();
    assert!(terms.contains_key(&r.primary_term), "{terms:?}");
}

/// The control process's pid from state.json.
fn control_pid(c: &HaCluster) -> u32 {
    let state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(c.dir.join("state.json")).expect("state"))
            .expect("json");
    state["processes"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["name"] == "control"))
        .and_then(|p| p["pid"].as_u64())
        .expect("control pid") as u32
}

/// A second control process, in the foreground of this test, killed when dropped.
struct Control(std::process::Child);

impl Control {
    fn start(c: &HaCluster) -> Control {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(c.dir.join("logs").join("control.log"))
            .expect("control log");
        let child = std::process::Command::new(ha::TIDEPOOL)
            .arg("--dir")
            .arg(&c.dir)
            .arg("control")
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start tidepool control");
        Control(child)
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn killing_the_control_process_during_a_failover_leaves_no_harm_and_a_new_one_finishes() {
    let c = HaCluster::settled(&[]);
    let watcher = Watcher::start(&c);
    let w = Writer::start(&c.url);
    w.expect_acks(&c, 0, 30, Duration::from_secs(30));
    let control = control_pid(&c);
    c.kill_node(0);
    // Kill the control process as soon as it starts recruiting.
    let start = Instant::now();
    while !c.log("control").contains("failover: recruiting") {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no failover started\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    ha::signal(control, libc::SIGKILL);
    std::thread::sleep(Duration::from_secs(2));
    // A new control process takes over from whatever state the nodes are in.
    let _second = Control::start(&c);
    let (new, r) = c.wait_new_primary(0, 0, Duration::from_secs(40));
    let before = w.acked_count();
    w.expect_acks(&c, before, 20, Duration::from_secs(30));
    let writes = w.finish();
    assert_all_acked_on(&c, new, &writes);
    let terms = watcher.finish();
    assert!(terms.contains_key(&r.primary_term), "{terms:?}");
}

#[test]
fn two_failovers_in_a_row() {
    let c = HaCluster::settled(&[]);
    let watcher = Watcher::start(&c);
    let w = Writer::start(&c.url);
    w.expect_acks(&c, 0, 30, Duration::from_secs(30));
    c.kill_node(0);
    let (first, r1) = c.wait_new_primary(0, 0, Duration::from_secs(30));
    let before = w.acked_count();
    w.expect_acks(&c, before, 20, Duration::from_secs(30));
    // node1 comes back (its pooler restarted by `up`), is rewound and follows: then the new
    // primary dies too.
    let out = c.tidepool(&["up"]);
    assert!(out.success(), "{}\n{}", out.text, c.logs());
    let mut c = c;
    c.reload_nodes();
    c.wait_all_streaming(&[], Duration::from_secs(90));
    c.kill_node(first);
    let (second, r2) = c.wait_new_primary(first, r1.primary_term, Duration::from_secs(30));
    let before = w.acked_count();
    w.expect_acks(&c, before, 20, Duration::from_secs(30));
    let writes = w.finish();
    assert_all_acked_on(&c, second, &writes);
    let terms = watcher.finish();
    assert!(
        terms.contains_key(&r2.primary_term) && r2.primary_term > r1.primary_term,
        "{terms:?}"
    );
}

#[test]
fn a_lagging_standby_is_not_promoted_over_one_that_has_everything() {
    let c = HaCluster::settled(&[]);
    // node3 receives WAL but replays nothing: it lags.
    let out = c.psql_node(2, "SELECT pg_wal_replay_pause()");
    assert!(out.success(), "{}", out.text);
    let w = Writer::start(&c.url);
    w.expect_acks(&c, 0, 100, Duration::from_secs(30));
    c.kill_node(0);
    let (new, _) = c.wait_new_primary(0, 0, Duration::from_secs(40));
    let before = w.acked_count();
    w.expect_acks(&c, before, 20, Duration::from_secs(30));
    let writes = w.finish();
    assert_all_acked_on(&c, new, &writes);
}

#[test]
fn with_etcd_two_control_processes_never_make_two_primaries_and_an_etcd_outage_demotes_nothing() {
    let etcd = testkit::Etcd::start();
    let c = HaCluster::up(&["--etcd", &etcd.url]);
    c.wait_all_streaming(&[], Duration::from_secs(30));
    // One backup at a time across machines: a backup lock held in etcd (by a `backup create`
    // elsewhere) refuses one here; released, the backup runs.
    let store = tidepool::topology::Store::Etcd(
        tidepool::topology::EtcdStore::new(&etcd.url, "local", Duration::from_secs(5))
            .expect("etcd url"),
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let held = match rt
        .block_on(store.lock_backup("backup elsewhere pid 7", Duration::from_secs(30)))
        .expect("etcd")
    {
        tidepool::topology::LockAttempt::Taken(l) => l,
        other => panic!("the backup lock: {other:?}"),
    };
    let out = c.tidepool(&["backup", "create", "--type", "incr"]);
    assert!(
        !out.success()
            && out
                .text
                .contains("backup elsewhere pid 7 holds the backup lock"),
        "{}",
        out.text
    );
    rt.block_on(store.unlock_backup(held)).expect("unlock");
    let out = c.tidepool(&["backup", "create", "--type", "incr"]);
    assert!(out.success(), "{}\n{}", out.text, c.logs());
    // A second control process beside the one `up` started: one leads, one waits.
    let _second = Control::start(&c);
    let watcher = Watcher::start(&c);
    let w = Writer::start(&c.url);
    w.expect_acks(&c, 0, 30, Duration::from_secs(30));

    // etcd frozen: the primary keeps serving, nobody demotes it.
    etcd.signal("STOP");
    let before = w.acked_count();
    assert!(
        w.wait_acks(before, 50, Duration::from_secs(20)),
        "writes stopped while etcd was down\n{}",
        c.logs()
    );
    assert_eq!(c.primary().map(|(i, _)| i), Some(0));
    etcd.signal("CONT");
    std::thread::sleep(Duration::from_secs(2));

    c.kill_node(0);
    let (new, r) = c.wait_new_primary(0, 0, Duration::from_secs(40));
    let before = w.acked_count();
    w.expect_acks(&c, before, 20, Duration::from_secs(30));
    let writes = w.finish();
    assert_all_acked_on(&c, new, &writes);
    let terms = watcher.finish();
    assert!(terms.contains_key(&r.primary_term), "{terms:?}");
    // The topology is in etcd, not in the state directory.
    assert!(!c.dir.join("control/topology.json").exists());
    assert!(!c.dir.join("topology.json").exists());
    let status = c.tidepool(&["status", "--json"]);
    let json: serde_json::Value = serde_json::from_str(&status.text).unwrap_or_default();
    assert_eq!(
        json["topology"]["primary"],
        c.nodes[new].name.as_str(),
        "{}",
        status.text
    );
}

#[test]
fn with_etcd_auth_the_unprivileged_control_process_reads_its_own_copy_of_the_password() {
    let etcd = testkit::Etcd::start();
    etcd.enable_auth("tp", "tp-pw");
    // The operator's file: root's, 600, which `postgres` cannot read.
    let password = std::env::temp_dir().join(format!("tp-etcd-pw-{}.password", std::process::id()));
    std::fs::write(&password, "tp-pw\n").expect("password file");
    set_mode(&password, 0o600);
    let c = HaCluster::up_with(
        1,
        &[
            "--etcd",
            &etcd.url,
            "--etcd-user",
            "tp",
            "--etcd-password-file",
            password.to_str().unwrap_or_default(),
        ],
    );
    let control = control_pid(&c);
    let (uid, _) = os_user("postgres");
    assert_eq!(
        proc_ids(control, "Uid:"),
        vec![uid; 4],
        "the control process"
    );
    let copy = c.dir.join("keys/etcd.control.password");
    let cmd = cmdline(control);
    assert!(
        cmd.contains(&format!("--etcd-password-file {}", copy.display())),
        "{cmd}"
    );
    let meta = std::fs::metadata(&copy).expect("the control process's copy");
    assert_eq!((meta.uid(), meta.mode() & 0o777), (uid, 0o600));
    assert_eq!(std::fs::read(&copy).ok(), std::fs::read(&password).ok());
    // Only the control process stores the topology: there it is, through etcd's auth.
    let start = Instant::now();
    loop {
        let status = c.tidepool(&["status", "--json"]);
        let json: serde_json::Value = serde_json::from_str(&status.text).unwrap_or_default();
        if json["topology"]["primary"] == "node1" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no topology in etcd:\n{}\n{}",
            status.text,
            c.log("control")
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = std::fs::remove_file(&password);
}

fn set_mode(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .unwrap_or_else(|e| panic!("chmod {mode:o} {}: {e}", path.display()));
}
