//! Logging set-up shared by every Tidepool binary: `tracing` to stderr, filtered by `RUST_LOG`
//! (else `default_level`), with colours only when stderr is a terminal (processes started by
//! `tidepool up` log to files). The gateway and the pooler change the level on a reload
//! ([`set_level`]).

use std::sync::OnceLock;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

static HANDLE: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

pub fn init(default_level: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    let (filter, handle) = reload::Layer::new(filter);
    let _ = HANDLE.set(handle);
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    tracing_subscriber::registry().with(filter).with(fmt).init();
}

/// Replaces the filter (a `RUST_LOG`-style directive such as `info` or `warn,tidepool=debug`).
pub fn set_level(directive: &str) -> Result<(), String> {
    let filter =
        EnvFilter::try_new(directive).map_err(|e| format!("log_level {directive:?}: {e}"))?;
    let handle = HANDLE.get().ok_or("logging is not initialised")?;
    handle.reload(filter).map_err(|e| e.to_string())
}
