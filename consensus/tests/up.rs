//! `tidepool up` → psql through the printed URL → `status --json` → `down` → all dead.
//!
//! Real everything: Postgres 15 run as the postgres OS user (so the test runs as root, as CI
//! does), the real pooler and gateway binaries (built by testkit if missing, or taken from
//! TIDEPOOL_BIN_DIR), real psql, on free loopback ports in a fresh state directory.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::Value;
use testkit::{free_port, run_merged, Output};

const TIDEPOOL: &str = env!("CARGO_BIN_EXE_tidepool");

/// A state directory that is brought down and removed however the test ends.
struct Cluster {
    dir: PathBuf,
}

impl Cluster {
    fn new() -> Cluster {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        // Short: the Postgres socket path inside must stay under 108 bytes.
        let dir = std::env::temp_dir().join(format!("tp-up-{}-{nanos}", std::process::id()));
        Cluster { dir }
    }

    fn tidepool(&self, args: &[&str]) -> Output {
        let mut cmd = Command::new(TIDEPOOL);
        cmd.args(args)
            .arg("--dir")
            .arg(&self.dir)
            .env_remove("TIDEPOOL_CONFIG")
            .env("TIDEPOOL_BIN_DIR", testkit::bin_dir());
        run_merged(&mut cmd, None, Duration::from_secs(180))
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join("logs").join(format!("{name}.log")))
            .unwrap_or_else(|e| format!("(no log: {e})"))
    }

    fn logs(&self) -> String {
        ["postgres", "pooler", "gateway"]
            .iter()
            .map(|n| format!("--- {n}.log ---\n{}", tail(&self.log(n), 40)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if self.dir.join("state.json").exists() {
            let _ = self.tidepool(&["down"]);
        }
        if std::env::var_os("TIDEPOOL_KEEP_TEST_DIRS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        } else {
            eprintln!("kept {}", self.dir.display());
        }
    }
}

/// uid and gid of an OS user (from `id`).
fn os_user(name: &str) -> (u32, u32) {
    let id = |flag: &str| {
        let out = Command::new("id").args([flag, name]).output().unwrap();
        assert!(out.status.success(), "no OS user {name}");
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
    };
    (id("-u"), id("-g"))
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn psql(url: &str, sql: &str) -> Output {
    let mut cmd = Command::new("psql");
    cmd.arg(url)
        .args(["-X", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .env("PGCONNECT_TIMEOUT", "10");
    run_merged(&mut cmd, None, Duration::from_secs(60))
}

fn status_json(cluster: &Cluster) -> (Output, Value) {
    let out = cluster.tidepool(&["status", "--json"]);
    let json: Value = serde_json::from_str(&out.text)
        .unwrap_or_else(|e| panic!("status --json is not JSON ({e}):\n{}", out.text));
    (out, json)
}

fn states(json: &Value) -> Vec<(String, String)> {
    json["processes"]
        .as_array()
        .expect("processes array")
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or("?").to_string(),
                p["state"].as_str().unwrap_or("?").to_string(),
            )
        })
        .collect()
}

fn url_of(out: &Output) -> String {
    out.text
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default()
        .trim()
        .to_string()
}

#[test]
fn up_psql_status_down() {
    let cluster = Cluster::new();
    let (port, pooler_port, pg_port) = (free_port(), free_port(), free_port());
    // A backup schedule (every 10 seconds): a single node then has a control process too,
    // whose least privilege is checked below.
    let conf = std::env::temp_dir().join(format!("tp-up-{}.toml", std::process::id()));
    std::fs::write(
        &conf,
        "[backup]\nschedule = [{ type = \"incr\", cron = \"*/10 * * * * *\" }]\n",
    )
    .unwrap();
    let up = cluster.tidepool(&[
        "up",
        "--config",
        conf.to_str().unwrap(),
        "--port",
        &port.to_string(),
        "--pooler-port",
        &pooler_port.to_string(),
        "--pg-port",
        &pg_port.to_string(),
        "--cores",
        "1",
        "--pool-size",
        "5",
    ]);

    // Postgres first, straight to its port with the stored password: this part does not need
    // the pooler or the gateway, so a failure further on still tells us it worked.
    let password_file = cluster.dir.join("password");
    let password = std::fs::read_to_string(&password_file).unwrap_or_else(|e| {
        panic!(
            "no {}: {e}\nup printed:\n{}",
            password_file.display(),
            up.text
        )
    });
    let mode = std::fs::metadata(&password_file).map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    assert_eq!(mode.ok(), Some(0o600), "password file mode");
    // The link secret gateway and pooler prove to each other: made by `up`, mode 600, and its
    // path (never its content) on both command lines.
    let link_key = cluster.dir.join("link.key");
    let key_mode = std::fs::metadata(&link_key).map(|m| {
        use std::os::unix::fs::PermissionsExt;
        m.permissions().mode() & 0o777
    });
    assert_eq!(
        key_mode.ok(),
        Some(0o600),
        "link.key mode
{}",
        up.text
    );
    let key = std::fs::read_to_string(&link_key).unwrap();
    let state = std::fs::read_to_string(cluster.dir.join("state.json")).unwrap_or_default();
    assert!(
        !state.contains(key.trim()),
        "the secret itself is in state.json"
    );
    let mut seen = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let ours = cmd.contains(&format!("127.0.0.1:{port}"))
            || cmd.contains(&format!("127.0.0.1:{pooler_port}"));
        if ours && (cmd.contains("tidepool-gateway") || cmd.contains("tidepool-pooler")) {
            // Least privilege (issue 12 §4): not root, each with its own copy of the key.
            let (process, user) = if cmd.contains("tidepool-gateway") {
                ("gateway", "tidepool")
            } else {
                ("pooler", "postgres")
            };
            let copy = cluster.dir.join("keys").join(format!("link.{process}.key"));
            assert!(
                cmd.contains(&format!("--link-secret-file {}", copy.display())),
                "{cmd}"
            );
            assert!(
                !cmd.contains(key.trim()),
                "the secret on a command line: {cmd}"
            );
            let status = std::fs::read_to_string(entry.path().join("status")).unwrap();
            let (uid, gid) = os_user(user);
            assert_ne!(uid, 0, "{user} is not root");
            let field = |name: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(name))
                    .unwrap_or_else(|| panic!("no {name} in {status}"))
                    .split_whitespace()
                    .map(|v| v.parse::<u32>().unwrap())
                    .collect::<Vec<_>>()
            };
            // Real, effective, saved and filesystem ids.
            assert_eq!(field("Uid:"), vec![uid; 4], "{process} runs as {user}");
            assert_eq!(field("Gid:"), vec![gid; 4], "{process}'s group");
            assert_eq!(
                field("Groups:"),
                Vec::<u32>::new(),
                "{process}: no other groups"
            );
            let meta = std::fs::metadata(&copy).unwrap();
            assert_eq!(
                (meta.mode() & 0o777, meta.uid()),
                (0o600, uid),
                "{}",
                copy.display()
            );
            assert_eq!(std::fs::read_to_string(&copy).unwrap(), key);
            seen.push(process);
        }
    }
    seen.sort();
    assert_eq!(seen, ["gateway", "pooler"], "gateway and pooler processes");
    let control = control_pid(&cluster)
        .unwrap_or_else(|| panic!("no control process in state.json\n{}", up.text));
    let (pg_uid, pg_gid) = os_user("postgres");
    assert_eq!(
        proc_ids(control, "Uid:"),
        vec![pg_uid; 4],
        "control runs as postgres"
    );
    assert_eq!(
        proc_ids(control, "Gid:"),
        vec![pg_gid; 4],
        "control's group"
    );
    assert_eq!(
        proc_ids(control, "Groups:"),
        Vec::<u32>::new(),
        "control: no other groups"
    );
    for d in ["control", "control/requests"] {
        let m = std::fs::metadata(cluster.dir.join(d)).unwrap();
        assert_eq!((m.uid(), m.mode() & 0o777), (pg_uid, 0o700), "{d}");
    }
    let _ = std::fs::remove_file(&conf);
    // Logs: Postgres's readable by its group at most, ours by root only.
    let logs = cluster.dir.join("logs");
    for (log, mode) in [
        ("postgres", 0o640),
        ("pooler", 0o600),
        ("gateway", 0o600),
        ("control", 0o600),
    ] {
        let m = std::fs::metadata(logs.join(format!("{log}.log"))).unwrap();
        assert_eq!(m.mode() & 0o777, mode, "{log}.log");
    }
    let direct = format!(
        "postgres://tidepool:{}@127.0.0.1:{pg_port}/tidepool",
        password.trim()
    );
    let out = psql(&direct, "select current_user || ' ' || current_database()");
    assert!(
        out.success() && out.text.trim() == "tidepool tidepool",
        "direct psql to Postgres:\n{}\nup printed:\n{}",
        out.text,
        up.text
    );

    // The whole cluster.
    assert!(
        up.success(),
        "tidepool up failed:\n{}\n{}",
        up.text,
        cluster.logs()
    );
    let url = url_of(&up);
    assert_eq!(
        url,
        format!(
            "postgres://tidepool:{}@127.0.0.1:{port}/tidepool",
            password.trim()
        ),
        "the last line of `up` is the URL; up printed:\n{}",
        up.text
    );
    let out = psql(&url, "select 1");
    assert!(
        out.success() && out.text.trim() == "1",
        "psql through the gateway:\n{}\n{}",
        out.text,
        cluster.logs()
    );

    certificates_made_and_a_plain_loopback_link(&cluster, pooler_port);

    let (out, json) = status_json(&cluster);
    assert!(out.success(), "status after up:\n{}", out.text);
    assert_eq!(
        states(&json),
        [
            ("postgres", "running/accepting"),
            ("pooler", "running/accepting"),
            ("gateway", "running/accepting"),
            ("control", "running/accepting")
        ]
        .map(|(a, b)| (a.to_string(), b.to_string())),
        "{}",
        out.text
    );
    assert!(json["processes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|p| p["pid"].as_u64().is_some_and(|pid| pid > 0)));
    let addresses: Vec<&str> = json["processes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["address"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        addresses,
        [
            format!("127.0.0.1:{pg_port}"),
            format!("127.0.0.1:{pooler_port}"),
            format!("127.0.0.1:{port}"),
            "127.0.0.1:0".to_string()
        ]
    );

    scheduled_backups_as_postgres_beside_roots(&cluster);

    // A second `up` changes nothing and prints the same URL.
    let again = cluster.tidepool(&["up"]);
    assert!(again.success(), "second up:\n{}", again.text);
    assert!(again.text.contains("already up"), "{}", again.text);
    assert_eq!(url_of(&again), url);

    let down = cluster.tidepool(&["down"]);
    assert!(down.success(), "down:\n{}", down.text);
    assert!(
        !Path::new(&format!("/proc/{control}")).exists()
            || !std::fs::read_to_string(format!("/proc/{control}/cmdline"))
                .unwrap_or_default()
                .contains("control"),
        "down left the control process running"
    );
    let (out, json) = status_json(&cluster);
    assert!(!out.success(), "status must fail when everything is down");
    assert!(
        states(&json).iter().all(|(_, s)| s == "dead"),
        "after down: {:?}",
        states(&json)
    );
    assert!(
        cluster.dir.join("pgdata/PG_VERSION").is_file(),
        "down keeps the data"
    );
}

/// The control process's pid, from state.json.
fn control_pid(cluster: &Cluster) -> Option<u32> {
    let state: Value =
        serde_json::from_str(&std::fs::read_to_string(cluster.dir.join("state.json")).ok()?)
            .ok()?;
    state["processes"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == "control")
        .and_then(|p| p["pid"].as_u64())
        .map(|p| p as u32)
}

/// A field of /proc/PID/status as numbers (`Uid:`: real, effective, saved, filesystem).
fn proc_ids(pid: u32, field: &str) -> Vec<u32> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .unwrap_or_else(|| panic!("no {field} in {status}"))
        .split_whitespace()
        .map(|v| v.parse().unwrap())
        .collect()
}

fn schedule_record(cluster: &Cluster) -> Value {
    std::fs::read_to_string(cluster.dir.join("pgbackrest/schedule.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null)
}

/// A backup from the command line (root) and scheduled ones from the control process
/// (`postgres`) share the backup lock: one root made still serves the control process, and
/// both land in the repository.
fn scheduled_backups_as_postgres_beside_roots(cluster: &Cluster) {
    let start = std::time::Instant::now();
    let label = loop {
        let out = cluster.tidepool(&["backup", "create", "--type", "incr", "--json"]);
        if out.success() {
            // stdout's JSON, with whatever went to stderr around it.
            let label = out
                .text
                .split_once("\"label\": \"")
                .and_then(|(_, rest)| rest.split_once('"'))
                .map(|(label, _)| label.to_string());
            break label.unwrap_or_else(|| panic!("no label:\n{}", out.text));
        }
        // A scheduled backup held the lock: that is the lock working; again.
        assert!(
            out.text.contains("another backup is running")
                && start.elapsed() < Duration::from_secs(90),
            "backup create:\n{}\n{}",
            out.text,
            tail(&cluster.log("control"), 40)
        );
        std::thread::sleep(Duration::from_secs(1));
    };
    assert!(!label.is_empty());
    let lock = cluster.dir.join("pgbackrest/backup.lock");
    std::os::unix::fs::chown(&lock, Some(0), Some(0)).unwrap();
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let start = std::time::Instant::now();
    let ok = loop {
        let r = schedule_record(cluster);
        if r["last_success"]["at"]
            .as_i64()
            .is_some_and(|at| at >= since)
        {
            break r["last_success"].clone();
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "no scheduled backup since {since}: {r}\n{}",
            tail(&cluster.log("control"), 40)
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        ok["detail"].as_str().unwrap_or_default() > label.as_str(),
        "{ok} after {label}"
    );
    let list = cluster.tidepool(&["backup", "list", "--json"]);
    assert!(list.success(), "{}", list.text);
    for l in [label.as_str(), ok["detail"].as_str().unwrap_or_default()] {
        assert!(list.text.contains(l), "{l} not in:\n{}", list.text);
    }
}

/// The cluster's CA and node1's certificate are made (600 keys, root's), for nodes added
/// later; the link itself stays plain on loopback (`certs::link_needs_tls`: TLS there would
/// cost every request and hide nothing from anyone who could not read the processes), so the
/// link port answers a plain peer with its challenge, and both processes log `link_tls=false`.
fn certificates_made_and_a_plain_loopback_link(cluster: &Cluster, pooler_port: u16) {
    use std::io::Read;
    let tls = cluster.dir.join("tls");
    for (file, mode) in [
        ("ca.crt", 0o644),
        ("ca.key", 0o600),
        ("node1.crt", 0o644),
        ("node1.key", 0o600),
    ] {
        let m = std::fs::metadata(tls.join(file))
            .unwrap_or_else(|e| panic!("{}: {e}", tls.join(file).display()));
        assert_eq!((m.mode() & 0o777, m.uid()), (mode, 0), "{file}");
    }
    let logs = cluster.dir.join("logs");
    for log in ["pooler", "gateway"] {
        let text = std::fs::read_to_string(logs.join(format!("{log}.log"))).unwrap();
        assert!(text.contains("link_tls=false"), "{log}.log:\n{text}");
    }
    let addr = format!("127.0.0.1:{pooler_port}");
    let mut plain = std::net::TcpStream::connect(&addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut head = [0u8; shared::link::HEADER];
    plain
        .read_exact(&mut head)
        .expect("the link's challenge, in plain TCP on loopback");
    let h = shared::link::parse_header(&head).unwrap();
    assert_eq!(h.kind, shared::link::down::CHALLENGE);
}

/// `status` of a directory with no cluster fails and says why.
#[test]
fn status_without_a_cluster_fails() {
    let dir = std::env::temp_dir().join(format!("tp-none-{}", std::process::id()));
    let mut cmd = Command::new(TIDEPOOL);
    cmd.args(["status", "--dir"]).arg(&dir);
    let out = run_merged(&mut cmd, None, Duration::from_secs(30));
    assert!(!out.success());
    assert!(out.text.contains("tidepool up"), "{}", out.text);
    assert!(
        !Path::new(&dir).exists(),
        "status must not create the directory"
    );
}
