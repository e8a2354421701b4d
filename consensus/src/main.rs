use std::process::ExitCode;

use clap::Parser;
use tidepool::backup;
use tidepool::cli::{BackupCommand, Cli, Command, NodeCommand};
use tidepool::cluster;

fn main() -> ExitCode {
    let cli = Cli::parse();
    shared::logging::init("warn");

    let result = match &cli.command {
        Command::Up(args) => cluster::up::run(&cli.global, args).map(|()| true),
        Command::Status(args) => cluster::status::run(&cli.global, args),
        Command::Down(args) => cluster::down::run(&cli.global, args).map(|()| true),
        Command::Switchover(args) => cluster::switchover::run(&cli.global, args),
        Command::Failover(args) => cluster::switchover::run_failover(&cli.global, args),
        Command::Control(args) => tidepool::control::run(&cli.global, args),
        Command::Backup(b) => match &b.command {
            BackupCommand::Create(args) => backup::create::run(&cli.global, args),
            BackupCommand::List(args) => backup::manage::list(&cli.global, args),
            BackupCommand::Verify => backup::manage::verify(&cli.global),
            BackupCommand::Expire => backup::manage::expire(&cli.global),
        },
        Command::Restore(args) => backup::restore::run(&cli.global, args),
        Command::Install(args) => tidepool::install::run(args),
        Command::Node(n) => match &n.command {
            NodeCommand::Add(args) => cluster::node_add::run(&cli.global, args),
            NodeCommand::Remove(args) => cluster::node_remove::run(&cli.global, args),
        },
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
