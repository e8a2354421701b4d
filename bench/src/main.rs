//! firehose: a load generator for any Postgres endpoint, so that one profile measures Tidepool,
//! PgBouncer or Postgres alike.
//!
//! The parent checks the target (and creates the table with `--init`), then starts worker
//! processes — copies of this binary — that each hold up to 15,000 connections and report a
//! tick per second over a pipe; it merges the ticks into the live view (a dashboard on a
//! terminal, a line per second elsewhere), the summary, `--json` and `--html`.
//! `--compare A.json --compare B.json --html OUT` renders earlier reports on shared charts.

mod aggregate;
mod child;
mod classify;
mod cli;
mod dashboard;
mod error;
mod pacer;
mod procs;
mod query;
mod report;
mod report_compare;
mod report_html;
mod stats;
mod target;
mod worker;

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Parser;

use crate::cli::Args;
use crate::error::{Error, Result};
use crate::query::Sql;
use crate::target::Target;

fn main() -> ExitCode {
    let args = Args::parse();
    if let Err(e) = args.validate() {
        eprintln!("firehose: {e}");
        return ExitCode::from(2);
    }
    if !args.compare.is_empty() {
        let Some(html) = &args.html else {
            eprintln!("firehose: --compare needs --html FILE");
            return ExitCode::from(2);
        };
        return match report_compare::run(&args.compare, html) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("firehose: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let result = match (args.child_index, args.epoch_ms) {
        (Some(index), Some(epoch_ms)) => runtime(args.thread_count())
            .and_then(|rt| rt.block_on(child::run(args, index, epoch_ms)))
            .map(|()| true),
        (None, None) => runtime(1).and_then(|rt| rt.block_on(parent(args))),
        _ => Err(Error::Usage(
            "--child-index and --epoch-ms go together".into(),
        )),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("firehose: {e}");
            ExitCode::FAILURE
        }
    }
}

fn runtime(threads: usize) -> Result<tokio::runtime::Runtime> {
    let mut b = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    b.enable_all()
        .build()
        .map_err(|e| Error::io("starting the async runtime", e))
}

fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Returns false when a worker failed (the exit code is then 1); query errors alone do not
/// fail the run, they are in the report.
async fn parent(args: Args) -> Result<bool> {
    let target = Target::from_args(&args).await?;
    let sql = Sql::new(&args.table, args.rows);

    // Fail fast, with the server's words, when the target is unreachable or refuses us.
    let session = target
        .connect(0)
        .await
        .map_err(|e| Error::Config(format!("cannot connect to {}: {e}", target.describe())))?;
    if args.init {
        eprintln!("firehose: creating {} with {} rows", args.table, args.rows);
        sql.init(&session.client).await?;
    } else {
        sql.check_table(&session.client).await?;
    }
    session.close().await;
    if args.init_only {
        return Ok(true);
    }

    if target.source_addrs() == 0 && args.connections > 20_000 {
        eprintln!(
            "firehose: warning: {} connections from one source address may run out of \
             ephemeral ports; consider --source-addrs 16",
            args.connections
        );
    }
    let started_unix_ms = unix_ms();
    let epoch = tokio::time::Instant::now();
    if !args.quiet {
        eprintln!(
            "firehose: {:?} load on {} — {} connections, {} process(es), {:.0}s",
            args.profile,
            target.describe(),
            args.connections,
            args.process_count(),
            args.duration
        );
    }
    let mut live = dashboard::LiveView::new(
        args.live,
        args.quiet,
        format!(
            "{:?} load on {}, {} connections",
            args.profile,
            target.describe(),
            args.connections
        ),
        args.duration,
    );
    let outcome = procs::run_workers(&args, started_unix_ms, epoch, |p| live.second(p)).await;
    live.finish();
    let outcome = outcome?;

    let clean = outcome.failures.is_empty();
    let summary = report::summarize(
        &args,
        report::RunInfo {
            started_unix_ms,
            target: target.describe(),
            source_addrs: target.source_addrs(),
            elapsed: outcome.elapsed,
            failures: outcome.failures,
        },
        outcome.agg,
    );
    print!("{}", report::text(&summary));
    if let Some(path) = &args.json {
        let body = serde_json::to_vec_pretty(&summary)
            .map_err(|e| Error::Report(format!("encoding JSON: {e}")))?;
        std::fs::write(path, body).map_err(|e| Error::io(path.display().to_string(), e))?;
    }
    if let Some(path) = &args.html {
        std::fs::write(path, report_html::render(&summary))
            .map_err(|e| Error::io(path.display().to_string(), e))?;
    }
    Ok(clean)
}
