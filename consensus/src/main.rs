use std::process::ExitCode;

use clap::Parser;
use tidepool::cli::{Cli, Command};
use tidepool::cluster;

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();

    let result = match &cli.command {
        Command::Up(args) => cluster::up::run(&cli.global, args).map(|()| true),
        Command::Status(args) => cluster::status::run(&cli.global, args),
        Command::Down(args) => cluster::down::run(&cli.global, args).map(|()| true),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        // `status` found a process down.
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("tidepool: error: {e}");
            ExitCode::FAILURE
        }
    }
}
