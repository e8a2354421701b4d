//! The parent side of the process split: starts `--processes` copies of this binary as workers
//! (hidden `--child-index`/`--epoch-ms` flags), reads their JSON lines from pipes, merges them,
//! forwards Ctrl-C, and kills a worker that overruns the run's bounds.

use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::aggregate::{Aggregator, Point};
use crate::cli::Args;
use crate::error::{Error, Result};
use crate::stats::Message;

enum Event {
    Message(usize, Message),
    Garbled(usize, String),
    /// The worker closed its stdout (it is exiting).
    Closed(usize),
}

pub struct Outcome {
    pub agg: Aggregator,
    /// Worker failures, in words; empty on a clean run.
    pub failures: Vec<String>,
    /// From the epoch until the last worker ended.
    pub elapsed: Duration,
}

/// Runs the workers; `on_second` sees each second as it becomes final (the live line).
pub async fn run_workers(
    args: &Args,
    epoch_ms: u64,
    epoch: Instant,
    mut on_second: impl FnMut(&Point),
) -> Result<Outcome> {
    let processes = args.process_count();
    let exe = std::env::current_exe().map_err(|e| Error::io("finding own executable", e))?;
    // Workers get the parent's own arguments: the same parser derives the same run. Flags a
    // worker has no use for (--init, --json, --html) are ignored in worker mode.
    let passthrough: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let threads = args.thread_count().to_string();

    let (tx, mut rx) = mpsc::channel::<Event>(1024);
    // The main loop owns the children: it alone reaps them, so a pid it signals is never one
    // that was already reaped and reused.
    let mut children = Vec::with_capacity(processes);
    for index in 0..processes {
        let mut child = Command::new(&exe)
            .args(&passthrough)
            .arg("--child-index")
            .arg(index.to_string())
            .arg("--epoch-ms")
            .arg(epoch_ms.to_string())
            .arg("--threads")
            .arg(&threads)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| Error::io(format!("starting worker process {index}"), e))?;
        let stdout = child.stdout.take();
        children.push(Some(child));
        let Some(stdout) = stdout else {
            return Err(Error::Worker {
                index,
                message: "no stdout pipe".into(),
            });
        };
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut lines = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let ev = match serde_json::from_str::<Message>(&line) {
                    Ok(m) => Event::Message(index, m),
                    Err(e) => Event::Garbled(index, e.to_string()),
                };
                if tx.send(ev).await.is_err() {
                    break;
                }
            }
            let _ = tx.send(Event::Closed(index)).await;
        });
    }
    drop(tx);

    let mut agg = Aggregator::new(processes, args.steady_window());
    let mut failures = Vec::new();
    let mut done = vec![false; processes];
    let mut exited = 0;
    // Past this a worker is stuck: every one of its loops should have ended by then.
    let overrun = args.duration() + args.grace() + args.connect_timeout() + Duration::from_secs(30);
    let kill_at = epoch + overrun;
    let mut killed = false;
    while exited < processes {
        tokio::select! {
            ev = rx.recv() => {
                let Some(ev) = ev else { break };
                let finals = match ev {
                    Event::Message(i, Message::Tick(t)) => agg.tick(i, t),
                    Event::Message(i, Message::Done { totals, errors, .. }) => {
                        if let Some(d) = done.get_mut(i) {
                            *d = true;
                        }
                        agg.finish(i, Some((&totals, &errors)))
                    }
                    Event::Message(i, Message::Failed { message }) => {
                        failures.push(format!("worker {i}: {message}"));
                        Vec::new()
                    }
                    Event::Garbled(i, e) => {
                        failures.push(format!("worker {i}: unreadable report line: {e}"));
                        Vec::new()
                    }
                    Event::Closed(i) => {
                        exited += 1;
                        let status = match children.get_mut(i).and_then(Option::take) {
                            Some(child) => reap(child).await,
                            None => "gone".into(),
                        };
                        if done.get(i).copied().unwrap_or(false) {
                            Vec::new()
                        } else {
                            failures.push(format!("worker {i} ended ({status}) without its totals"));
                            agg.finish(i, None)
                        }
                    }
                };
                finals.iter().for_each(&mut on_second);
            }
            _ = tokio::signal::ctrl_c() => {
                // Workers stop on SIGINT and still report; a terminal sends it to them too, a
                // `kill -INT <parent>` does not.
                signal_all(&children, libc::SIGINT);
            }
            _ = tokio::time::sleep_until(kill_at), if !killed => {
                failures.push(format!("workers still running {overrun:?} after the start: killed"));
                signal_all(&children, libc::SIGKILL);
                killed = true;
            }
        }
    }
    agg.flush().iter().for_each(&mut on_second);
    Ok(Outcome {
        agg,
        failures,
        elapsed: epoch.elapsed(),
    })
}

/// Waits for a worker that closed its stdout; kills it if it lingers.
async fn reap(mut child: tokio::process::Child) -> String {
    match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
        Ok(Ok(status)) => status.to_string(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => {
            let _ = child.kill().await;
            "killed: still running 10 s after closing its output".into()
        }
    }
}

fn signal_all(children: &[Option<tokio::process::Child>], sig: libc::c_int) {
    for child in children.iter().flatten() {
        // `id()` is None once tokio has reaped the child, so the pid is still ours.
        if let Some(pid) = child.id().and_then(|p| libc::pid_t::try_from(p).ok()) {
            // SAFETY: plain kill(2) on a live child of this process.
            unsafe {
                libc::kill(pid, sig);
            }
        }
    }
}
