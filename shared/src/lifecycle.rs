//! SIGTERM (drain) and SIGHUP (reload) for the thread-per-core processes.
//!
//! A plain thread waits for the signals (signal-hook) and publishes them through atomics that
//! every core reads on a short tick (`TICK`): no executor blocks in a signal handler, and reading
//! the config file again (file I/O) happens on that thread, never on a core. A reload publishes
//! a whole new value (the process's config, with what can change live already merged in); a
//! core that sees a new generation takes it once and swaps its own copy.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How often a core looks at the lifecycle (a few atomic loads).
pub const TICK: Duration = Duration::from_millis(50);

pub struct Lifecycle<C> {
    draining: AtomicBool,
    generation: AtomicU64,
    current: Mutex<Arc<C>>,
}

impl<C: Send + Sync + 'static> Lifecycle<C> {
    pub fn new(initial: C) -> Arc<Self> {
        Arc::new(Lifecycle {
            draining: AtomicBool::new(false),
            generation: AtomicU64::new(0),
            current: Mutex::new(Arc::new(initial)),
        })
    }

    /// SIGTERM or SIGINT arrived: stop accepting, finish what runs, exit.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    pub fn start_drain(&self) {
        self.draining.store(true, Ordering::Release);
    }

    /// Bumped by every published reload.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The value of the last reload (or the initial one).
    pub fn current(&self) -> Arc<C> {
        match self.current.lock() {
            Ok(c) => c.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    pub fn publish(&self, value: C) {
        let mut c = match self.current.lock() {
            Ok(c) => c,
            Err(p) => p.into_inner(),
        };
        *c = Arc::new(value);
        drop(c);
        self.generation.fetch_add(1, Ordering::AcqRel);
    }

    /// Starts the thread that waits for SIGTERM, SIGINT and SIGHUP. On SIGHUP it calls
    /// `reload` with the value in force, and publishes what it returns (`None`: nothing to
    /// apply; it logged why). The first SIGTERM/SIGINT starts the drain; a second one ends the
    /// process at once (exit code 1), for an operator who will not wait.
    pub fn watch_signals(
        self: &Arc<Self>,
        mut reload: impl FnMut(&C) -> Option<C> + Send + 'static,
    ) -> std::io::Result<()> {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
        let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGHUP])?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    match sig {
                        SIGHUP => {
                            tracing::info!("SIGHUP: reloading the configuration");
                            let now = me.current();
                            if let Some(next) = reload(&now) {
                                me.publish(next);
                            }
                        }
                        _ if me.draining() => {
                            tracing::warn!(signal = sig, "asked again to stop: exiting now");
                            std::process::exit(1);
                        }
                        _ => {
                            tracing::info!(
                                signal = sig,
                                "shutting down: no new clients, transactions in progress may finish"
                            );
                            me.start_drain();
                        }
                    }
                }
            })?;
        Ok(())
    }
}

/// One line per changed key, for the reload log: `(key, old, new)` where old != new.
pub fn changes<'a>(pairs: &[(&'a str, String, String)]) -> Vec<&'a str> {
    pairs
        .iter()
        .filter(|(_, a, b)| a != b)
        .map(|(k, _, _)| *k)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_bumps_generation() {
        let l = Lifecycle::new(1u32);
        assert_eq!(l.generation(), 0);
        assert_eq!(*l.current(), 1);
        l.publish(2);
        assert_eq!(l.generation(), 1);
        assert_eq!(*l.current(), 2);
        assert!(!l.draining());
        l.start_drain();
        assert!(l.draining());
    }

    #[test]
    fn only_changed_keys() {
        let c = changes(&[("a", "1".into(), "1".into()), ("b", "1".into(), "2".into())]);
        assert_eq!(c, vec!["b"]);
    }
}
