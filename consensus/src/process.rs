//! Starting, watching and stopping the long-running processes `up` leaves behind.
//!
//! They are plain Unix processes: detached with `setsid`, output appended to a log file,
//! known by pid. A pid alone is not trusted: pids are reused, and a process that exited
//! after its parent went away may linger as a zombie when nothing reaps it (in containers
//! pid 1 often does not), so "alive" means: exists, is not a zombie, and its argv[0] is the
//! program we started.

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};

/// How often waits poll.
const POLL: Duration = Duration::from_millis(100);

/// Starts `program` in a new session (no controlling terminal, its own process group, so a
/// Ctrl-C or a closing terminal of the caller does not reach it), stdin from /dev/null,
/// stdout and stderr appended to `log`.
pub fn spawn_detached(program: &Path, args: &[OsString], log: &Path) -> Result<Child> {
    spawn_detached_as(program, args, log, None)
}

/// [`spawn_detached`] as `account` (uid, gid, no supplementary groups) when given. The log is
/// opened here, by the caller, and private to its owner (mode 600: it names roles, databases
/// and addresses); the child writes to it through the inherited descriptor.
pub fn spawn_detached_as(
    program: &Path,
    args: &[OsString],
    log: &Path,
    account: Option<&crate::privilege::Account>,
) -> Result<Child> {
    let mut out = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(log)
        .map_err(Error::io(format!("opening log {}", log.display())))?;
    // A log made before this change (0644) is made private too.
    std::fs::set_permissions(log, std::fs::Permissions::from_mode(0o600))
        .map_err(Error::io(format!("chmod {}", log.display())))?;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    writeln!(
        out,
        "--- tidepool: starting {} at unix time {now} ---",
        program.display()
    )
    .map_err(Error::io(format!("writing log {}", log.display())))?;
    let err = out
        .try_clone()
        .map_err(Error::io(format!("opening log {}", log.display())))?;

    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        // The log is a file: no terminal colour codes in it (tracing-subscriber honours this).
        .env("NO_COLOR", "1")
        .current_dir("/");
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent; it is the
    // only thing run between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    if let Some(a) = account {
        // std drops the supplementary groups (setgroups(0)) before setuid when run as root.
        cmd.uid(a.uid)
            .gid(a.gid)
            .env("USER", &a.name)
            .env("HOME", "/");
    }
    cmd.spawn()
        .map_err(Error::io(format!("starting {}", program.display())))
}

/// What `/proc` says about a pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Liveness {
    /// Running, and argv[0] is the expected program.
    Alive,
    /// No such process, a zombie, or a process of another program under a reused pid.
    Gone,
}

/// Whether `pid` is a live process whose argv[0] file name is `program`.
pub fn liveness(pid: u32, program: &str) -> Liveness {
    if pid == 0 {
        return Liveness::Gone;
    }
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Liveness::Gone;
    };
    if matches!(proc_state(&stat), Some('Z') | Some('X') | None) {
        return Liveness::Gone;
    }
    let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
        return Liveness::Gone;
    };
    if argv0_is(&cmdline, program) {
        Liveness::Alive
    } else {
        Liveness::Gone
    }
}

/// The state letter of a `/proc/PID/stat` line. The command name in parentheses may itself
/// hold spaces and parentheses, so look after the last `)`.
fn proc_state(stat: &str) -> Option<char> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().next()?.chars().next()
}

fn argv0_is(cmdline: &[u8], program: &str) -> bool {
    let argv0 = cmdline.split(|&b| b == 0).next().unwrap_or_default();
    let argv0 = String::from_utf8_lossy(argv0);
    // Postgres rewrites its process title ("postgres: checkpointer"); the postmaster keeps
    // its path. Compare the file name of the first word.
    let first = argv0.split_whitespace().next().unwrap_or_default();
    Path::new(first).file_name().is_some_and(|n| n == program)
}

/// Whether something accepts TCP connections on `addr` right now.
pub fn accepts(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(500)).is_ok()
}

/// Waits until `addr` accepts, failing early if `child` exits, and with the log's tail if
/// time runs out.
pub fn wait_ready(
    name: &str,
    child: &mut Child,
    addr: SocketAddr,
    timeout: Duration,
    log: &Path,
) -> Result<()> {
    let start = Instant::now();
    loop {
        if let Some(status) = child
            .try_wait()
            .map_err(Error::io(format!("waiting for {name}")))?
        {
            return Err(Error::Exited {
                name: name.to_string(),
                status: status.to_string(),
                log: log.to_path_buf(),
                tail: log_tail(log, 30),
            });
        }
        if accepts(addr) {
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(Error::NotReady {
                name: name.to_string(),
                address: addr.to_string(),
                waited_secs: timeout.as_secs(),
                log: log.to_path_buf(),
                tail: log_tail(log, 30),
            });
        }
        std::thread::sleep(POLL);
    }
}

/// How a process ended under [`terminate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    /// It was not running.
    NotRunning,
    /// It exited after SIGTERM.
    Terminated,
    /// It outlived the timeout and got SIGKILL.
    Killed,
}

/// SIGTERM, then SIGKILL if `pid` is still alive after `timeout`.
pub fn terminate(pid: u32, program: &str, timeout: Duration) -> Result<Stopped> {
    if liveness(pid, program) == Liveness::Gone {
        return Ok(Stopped::NotRunning);
    }
    signal(pid, libc::SIGTERM)?;
    if wait_gone(pid, program, timeout) {
        return Ok(Stopped::Terminated);
    }
    signal(pid, libc::SIGKILL)?;
    if wait_gone(pid, program, Duration::from_secs(5)) {
        return Ok(Stopped::Killed);
    }
    Err(Error::Conflict(format!(
        "{program} (pid {pid}) survived SIGKILL for 5s"
    )))
}

fn wait_gone(pid: u32, program: &str, timeout: Duration) -> bool {
    let start = Instant::now();
    loop {
        if liveness(pid, program) == Liveness::Gone {
            return true;
        }
        if start.elapsed() >= timeout {
            return false;
        }
        std::thread::sleep(POLL);
    }
}

fn signal(pid: u32, sig: libc::c_int) -> Result<()> {
    let pid = libc::pid_t::try_from(pid)
        .map_err(|_| Error::Conflict(format!("pid {pid} out of range")))?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid, sig) } == -1 {
        let e = std::io::Error::last_os_error();
        // Gone between the check and the signal: that is what we wanted.
        if e.raw_os_error() != Some(libc::ESRCH) {
            return Err(Error::Io {
                context: format!("sending signal {sig} to pid {pid}"),
                source: e,
            });
        }
    }
    Ok(())
}

/// The last `lines` lines of a log file (reads at most its last 64 KiB); empty if unreadable.
pub fn log_tail(path: &Path, lines: usize) -> String {
    const MAX: u64 = 64 * 1024;
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    if len > MAX && f.seek(SeekFrom::Start(len - MAX)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    if f.read_to_end(&mut buf).is_err() {
        return String::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_state_looks_after_the_last_paren() {
        assert_eq!(proc_state("123 (a b) c) S 1 2"), Some('S'));
        assert_eq!(proc_state("123 (x) Z 1"), Some('Z'));
        assert_eq!(proc_state("garbage"), None);
    }

    #[test]
    fn argv0_matches_file_name_only() {
        assert!(argv0_is(
            b"/usr/lib/postgresql/15/bin/postgres\0-D\0/x\0",
            "postgres"
        ));
        // Children of the postmaster retitle themselves; only the postmaster is checked.
        assert!(!argv0_is(b"postgres: checkpointer \0", "postgres"));
        assert!(argv0_is(
            b"/x/target/debug/tidepool-gateway\0--listen\0",
            "tidepool-gateway"
        ));
        assert!(!argv0_is(b"/x/tidepool-gateway-old\0", "tidepool-gateway"));
        assert!(!argv0_is(b"", "postgres"));
    }

    #[test]
    fn this_process_is_alive_and_a_wrong_name_is_not() {
        let me = std::process::id();
        let cmdline = std::fs::read(format!("/proc/{me}/cmdline")).unwrap();
        let argv0 = String::from_utf8_lossy(cmdline.split(|&b| b == 0).next().unwrap()).to_string();
        let name = Path::new(&argv0)
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert_eq!(liveness(me, &name), Liveness::Alive);
        assert_eq!(liveness(me, "surely-not-this"), Liveness::Gone);
        assert_eq!(liveness(0, &name), Liveness::Gone);
    }

    #[test]
    fn a_reaped_child_is_gone_and_terminate_stops_a_sleeper() {
        let mut child = Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        // Until exec, the child's cmdline is still ours.
        let start = Instant::now();
        while liveness(pid, "sleep") != Liveness::Alive {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "sleep never showed up"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        // terminate only signals; the child stays a zombie until reaped, which must count
        // as gone.
        assert_eq!(
            terminate(pid, "sleep", Duration::from_secs(5)).unwrap(),
            Stopped::Terminated
        );
        child.wait().unwrap();
        assert_eq!(liveness(pid, "sleep"), Liveness::Gone);
        assert_eq!(
            terminate(pid, "sleep", Duration::from_secs(1)).unwrap(),
            Stopped::NotRunning
        );
    }

    #[test]
    fn log_tail_keeps_the_last_lines() {
        let dir = std::env::temp_dir().join(format!("tidepool-logtail-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("x.log");
        std::fs::write(&p, "a\nb\nc\nd\n").unwrap();
        assert_eq!(log_tail(&p, 2), "c\nd");
        assert_eq!(log_tail(&p, 10), "a\nb\nc\nd");
        assert_eq!(log_tail(&dir.join("missing.log"), 3), "");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn accepts_sees_a_listener() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        assert!(accepts(addr));
        drop(l);
        assert!(!accepts(addr));
    }
}
