//! Running a client program (psql, pgbench, python) to completion with a deadline, its standard
//! output and standard error captured together in the order it wrote them.
//!
//! Both streams go to one pipe: psql writes rows to stdout and errors and notices to stderr, and
//! a differential test must see them interleaved exactly as a user at a terminal would.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

/// What a finished program printed and how it ended.
#[derive(Debug, Clone)]
pub struct Output {
    /// stdout and stderr, interleaved as written.
    pub text: String,
    /// Exit code; `None` when killed by a signal.
    pub code: Option<i32>,
    /// It ran past its deadline and was killed (the text ends with a line saying so).
    pub timed_out: bool,
}

impl Output {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// A pipe whose two ends are closed on exec unless handed to the child as stdio.
fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints; on success both are fresh descriptors that we
    // own and wrap exactly once.
    let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(rc, 0, "pipe2: {}", std::io::Error::last_os_error());
    // SAFETY: as above, each descriptor is owned by exactly one File.
    unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) }
}

/// Kills the child and everything it started (it runs in its own process group: psql's
/// `\copy ... from program` starts a shell).
pub(crate) fn kill_group(child: &mut Child) {
    if !matches!(child.try_wait(), Ok(None)) {
        // Already reaped: its pid (and so its group id) may belong to someone else by now.
        return;
    }
    let pid = child.id() as libc::pid_t;
    // SAFETY: plain syscall; a stale group id is harmless (ESRCH).
    unsafe {
        libc::kill(-pid, libc::SIGKILL);
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Runs `cmd` with `stdin` (or /dev/null), waits at most `timeout`, and returns everything it
/// printed. Past the deadline it is killed, with everything it started, and the output says so.
pub fn run_merged(cmd: &mut Command, stdin: Option<Vec<u8>>, timeout: Duration) -> Output {
    let (read_end, write_end) = pipe();
    let write_end2 = write_end.try_clone().expect("dup pipe");
    cmd.stdout(Stdio::from(write_end))
        .stderr(Stdio::from(write_end2))
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .process_group(0);
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    // Drop our copies of the write end (held inside `cmd`) so the reader sees EOF when the
    // child and its children are done.
    cmd.stdout(Stdio::null()).stderr(Stdio::null());

    let feeder = stdin.map(|bytes| {
        let mut pipe = child.stdin.take().expect("piped stdin");
        thread::spawn(move || {
            // The child may exit before reading everything (e.g. psql stops on an error): a
            // broken pipe is its business, not ours.
            let _ = pipe.write_all(&bytes);
        })
    });
    let (captured, eof_rx) = capture(read_end);

    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) if Instant::now() >= deadline => break None,
            Ok(None) => thread::sleep(Duration::from_millis(10)),
            Err(e) => panic!("wait for {cmd:?}: {e}"),
        }
    };
    if status.is_none() {
        kill_group(&mut child);
    }
    // Something the program started may still hold the pipe open; do not wait for it long.
    let _ = eof_rx.recv_timeout(Duration::from_secs(5));
    let bytes = captured.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let text = String::from_utf8_lossy(&bytes).into_owned();
    if let Some(f) = feeder {
        let _ = f.join();
    }
    match status {
        Some(status) => Output {
            text,
            code: status.code(),
            timed_out: false,
        },
        None => Output {
            text: format!("{text}\n<killed: {cmd:?} did not finish within {timeout:?}>\n"),
            code: None,
            timed_out: true,
        },
    }
}

/// A program fed by the test as it goes (a psql session kept open across a server restart,
/// or while other sessions signal it): stdout and stderr interleaved as written, as
/// `run_merged` captures them.
pub struct Live {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    captured: Arc<Mutex<Vec<u8>>>,
    eof: mpsc::Receiver<()>,
}

impl Live {
    pub fn spawn(cmd: &mut Command) -> Live {
        let (read_end, write_end) = pipe();
        let write_end2 = write_end.try_clone().expect("dup pipe");
        cmd.stdout(Stdio::from(write_end))
            .stderr(Stdio::from(write_end2))
            .stdin(Stdio::piped())
            .process_group(0);
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
        cmd.stdout(Stdio::null()).stderr(Stdio::null());
        let stdin = child.stdin.take();
        let (captured, eof) = capture(read_end);
        Live {
            child,
            stdin,
            captured,
            eof,
        }
    }

    /// Writes `text` to the program's standard input (ignored once it exited).
    pub fn send(&mut self, text: &str) {
        if let Some(p) = self.stdin.as_mut() {
            let _ = p.write_all(text.as_bytes());
            let _ = p.flush();
        }
    }

    /// What it printed so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.captured.lock().unwrap_or_else(|e| e.into_inner()))
            .into_owned()
    }

    /// Waits until a whole printed line satisfies `found`; `false` at the deadline or if the
    /// program ended first.
    pub fn wait_line(&mut self, found: impl Fn(&str) -> bool, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            let text = self.text();
            if text.lines().any(&found) {
                return true;
            }
            if Instant::now() >= deadline || !matches!(self.child.try_wait(), Ok(None)) {
                return text.lines().any(&found);
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Closes its standard input and waits at most `timeout` for it to end (then it is killed).
    pub fn finish(mut self, timeout: Duration) -> Output {
        self.stdin.take();
        let deadline = Instant::now() + timeout;
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break Some(status),
                Ok(None) if Instant::now() >= deadline => break None,
                Ok(None) => thread::sleep(Duration::from_millis(10)),
                Err(_) => break None,
            }
        };
        let timed_out = status.is_none();
        if timed_out {
            kill_group(&mut self.child);
        }
        let _ = self.eof.recv_timeout(Duration::from_secs(5));
        let mut text = self.text();
        if timed_out {
            text.push_str(&format!("\n<killed after {timeout:?}>\n"));
        }
        Output {
            text,
            code: status.and_then(|s| s.code()),
            timed_out,
        }
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        kill_group(&mut self.child);
    }
}

/// Resident memory of a process (`VmRSS`), in KiB; 0 when it cannot be read (the process gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Everything read from `pipe` until its end, gathered by a thread; the receiver hears once
/// the pipe has ended (every writer closed it).
fn capture(mut pipe: impl Read + Send + 'static) -> (Arc<Mutex<Vec<u8>>>, mpsc::Receiver<()>) {
    let captured = Arc::new(Mutex::new(Vec::new()));
    let (eof_tx, eof_rx) = mpsc::channel();
    let into = captured.clone();
    thread::spawn(move || {
        let mut chunk = [0u8; 65536];
        loop {
            match pipe.read(&mut chunk) {
                Ok(0) | Err(_) => break,
                Ok(n) => into
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&chunk[..n]),
            }
        }
        let _ = eof_tx.send(());
    });
    (captured, eof_rx)
}
