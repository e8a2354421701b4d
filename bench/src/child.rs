//! A worker process: runs its share of the connection slots and reports a `Tick` on stdout every
//! second of the run's clock, then one last tick and `Done`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cli::{self, Args, Profile};
use crate::error::{Error, Result};
use crate::pacer::Pacer;
use crate::query::Sql;
use crate::stats::{Counts, Message, Stats};
use crate::target::Target;
use crate::worker::{Budget, Shared};

/// Where `epoch_ms` (Unix ms) lies on tokio's clock.
fn epoch_instant(epoch_ms: u64) -> Instant {
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let now = Instant::now();
    match now_ms.checked_sub(epoch_ms) {
        Some(ago) => now.checked_sub(Duration::from_millis(ago)).unwrap_or(now),
        None => now + Duration::from_millis(epoch_ms - now_ms),
    }
}

pub async fn run(args: Args, index: usize, epoch_ms: u64) -> Result<()> {
    let mut out = tokio::io::stdout();
    match run_inner(&args, index, epoch_ms, &mut out).await {
        Ok(()) => Ok(()),
        Err(e) => {
            // Tell the parent why; it shows the message and fails the run.
            emit(
                &mut out,
                &Message::Failed {
                    message: e.to_string(),
                },
            )
            .await;
            Err(e)
        }
    }
}

async fn run_inner(
    args: &Args,
    index: usize,
    epoch_ms: u64,
    out: &mut tokio::io::Stdout,
) -> Result<()> {
    let processes = args.process_count();
    let share = cli::share(args.connections, processes, index);
    raise_open_file_limit(share.slots)?;

    let epoch = epoch_instant(epoch_ms);
    let deadline = epoch + args.duration();
    let target = Target::from_args(args).await?;
    let stats = Arc::new(Stats::default());
    let (stop_tx, _) = watch::channel(false);
    let f = share.fraction;
    let shared = Arc::new(Shared {
        target,
        stats: stats.clone(),
        sql: Sql::new(&args.table, args.rows),
        profile: args.profile,
        mode: args.query_mode,
        write_ratio: args.write_ratio,
        mean_lifetime: match args.profile {
            Profile::Steady if args.churn > 0.0 => Some(Duration::from_secs_f64(
                args.connections as f64 / args.churn,
            )),
            _ => None,
        },
        query_timeout: args.query_timeout(),
        read_pacer: Pacer::new(args.read_qps * f),
        write_pacer: Pacer::new(args.write_qps * f),
        connect_pacer: match args.profile {
            Profile::Churn => Pacer::new(args.churn * f),
            Profile::Steady => None,
        },
        queries_left: Budget::new(((args.max_queries as f64) * f).ceil() as u64),
        connects_left: Budget::new(((args.max_connects as f64) * f).ceil() as u64),
        stop: stop_tx,
    });

    let mut slots = JoinSet::new();
    let ramp = args.ramp_up();
    let now = Instant::now();
    for i in 0..share.slots {
        let slot = share.slot(i);
        let at = epoch + ramp.mul_f64(slot as f64 / args.connections as f64);
        let delay = at.saturating_duration_since(now);
        slots.spawn(shared.clone().run_slot(slot, delay));
    }

    // Stop at the deadline or on Ctrl-C, whichever comes first.
    let stopper = {
        let shared = shared.clone();
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::time::sleep_until(deadline) => {}
                _ = tokio::signal::ctrl_c() => {}
            }
            shared.stop.send_replace(true);
        })
    };

    // Ticks every second of the run's clock while the slots run.
    let mut prev = Counts::default();
    let mut t: u32 = 0;
    let mut stop = shared.stop.subscribe();
    let mut drain_until: Option<Instant> = None;
    loop {
        let due = epoch + Duration::from_secs(u64::from(t) + 1);
        let drain_at = drain_until.unwrap_or(due);
        tokio::select! {
            _ = tokio::time::sleep_until(drain_at), if drain_until.is_some() => {}
            _ = tokio::time::sleep_until(due) => {
                let tick = stats.tick(t, &mut prev);
                if !emit(out, &Message::Tick(tick)).await {
                    // The parent is gone: nobody to report to.
                    shared.stop.send_replace(true);
                }
                t += 1;
            }
            done = slots.join_next(), if !slots.is_empty() => {
                if let Some(Err(e)) = done {
                    if e.is_panic() {
                        return Err(Error::Worker { index, message: format!("slot task panicked: {e}") });
                    }
                }
            }
            _ = stop.wait_for(|s| *s), if drain_until.is_none() => {
                drain_until = Some(Instant::now() + args.grace());
            }
        }
        if slots.is_empty() {
            break;
        }
        if drain_until.is_some_and(|d| Instant::now() >= d) {
            // Past the grace period: abandon what is left. Dropping a task counts its query
            // as aborted and its session as closed (see worker::InFlight, worker::Open).
            slots.abort_all();
            while slots.join_next().await.is_some() {}
            break;
        }
    }
    stopper.abort();

    let tick = stats.tick(t, &mut prev);
    emit(out, &Message::Tick(tick)).await;
    emit(out, &stats.done_message()).await;
    Ok(())
}

/// Writes one message as a JSON line; false when stdout is closed.
async fn emit(out: &mut tokio::io::Stdout, msg: &Message) -> bool {
    let Ok(mut line) = serde_json::to_vec(msg) else {
        return false;
    };
    line.push(b'\n');
    out.write_all(&line).await.is_ok() && out.flush().await.is_ok()
}

/// Raises the soft open-file limit to the hard one: each connection is a descriptor.
fn raise_open_file_limit(slots: usize) -> Result<()> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid, initialized struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        }
    }
    // Headroom for the runtime, stdio and sockets still closing.
    let need = slots as u64 + 64;
    if lim.rlim_cur != libc::RLIM_INFINITY && need > lim.rlim_cur {
        return Err(Error::Usage(format!(
            "a worker process would hold {slots} connections but may open only {} files: \
             use more --processes",
            lim.rlim_cur
        )));
    }
    Ok(())
}
