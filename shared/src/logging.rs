//! Logging set-up shared by every Tidepool binary: `tracing` to stderr, filtered by `RUST_LOG`
//! (else `default_level`), with colours only when stderr is a terminal (processes started by
//! `tidepool up` log to files).

pub fn init(default_level: &str) {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}
