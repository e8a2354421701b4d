//! The one error type of the `tidepool` crate.

use std::io;
use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O failure, with what we were doing when it happened.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },

    #[error("config file {path}: {source}")]
    Config {
        path: PathBuf,
        #[source]
        source: toml::de::Error,
    },

    #[error("state file {path}: {source}")]
    State {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },

    /// A helper program (initdb, pg_ctl, psql, …) exited unsuccessfully.
    #[error("{program} failed ({status}){}", if output.is_empty() { String::new() } else { format!(":\n{output}") })]
    Command {
        program: String,
        status: String,
        output: String,
    },

    /// A process we started did not become ready.
    #[error(
        "{name} is not accepting connections on {address} after {waited_secs}s{}",
        log_section(log, tail)
    )]
    NotReady {
        name: String,
        address: String,
        waited_secs: u64,
        log: PathBuf,
        tail: String,
    },

    /// A process we started exited while we waited for it.
    #[error("{name} exited during start-up ({status}){}", log_section(log, tail))]
    Exited {
        name: String,
        status: String,
        log: PathBuf,
        tail: String,
    },

    /// The machine is not in a state where the command can go on (port taken, process on
    /// other ports, …). The message says what to do.
    #[error("{0}")]
    Conflict(String),

    #[error("no Tidepool cluster in {0} (no state.json): run `tidepool up` first")]
    NoCluster(PathBuf),

    #[error(
        "{name} not found at {path}: build it (`cargo build -p {package}`) or set TIDEPOOL_BIN_DIR"
    )]
    MissingBinary {
        name: String,
        package: String,
        path: PathBuf,
    },

    #[error("{0}")]
    Environment(String),

    /// A backup, restore or verify found something wrong (the message says what).
    #[error("{0}")]
    Backup(String),
}

fn log_section(log: &std::path::Path, tail: &str) -> String {
    if tail.is_empty() {
        format!(" (log {} is empty)", log.display())
    } else {
        format!(
            "\n--- last lines of {} ---\n{}",
            log.display(),
            tail.trim_end()
        )
    }
}

impl Error {
    pub fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let context = context.into();
        move |source| Error::Io { context, source }
    }
}
