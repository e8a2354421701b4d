//! SIGHUP (`systemctl reload tidepool-control`): the control process reads `state.json` and
//! its `--config` file again, merged as everywhere (the file over what `tidepool up`
//! remembered), and applies what can change while it runs: the failure-detection and failover
//! timers, the durability policy, the backup schedule and its log level. A key that shapes the
//! processes `up` starts (ports, pool sizes, standbys, the backup repository...) or this
//! process's own endpoints (the topology store, the metrics address) is not applied: the log
//! says which and what it needs. A file that does not parse changes nothing.
//!
//! The control process starts the same way: the live keys from the file over `state.json`, so
//! a restart and a reload agree.

use std::path::Path;

use crate::backup::schedule::Plan;
use crate::config::{ClusterSettings, Overrides};
use crate::error::{Error, Result};
use crate::state::State;

/// What the files say now: the cluster's settings (the file over `state.json`) and the log
/// filter.
pub fn read(state_file: &Path, config: Option<&Path>) -> Result<(ClusterSettings, String)> {
    let file = match config {
        Some(p) => Overrides::load(p)?,
        None => Overrides::default(),
    };
    let state = State::load(state_file)?
        .ok_or_else(|| Error::Conflict(format!("{} is gone: no cluster", state_file.display())))?;
    Ok((file.cluster(&state.settings), file.run().log_level))
}

/// Why a changed key was not applied.
const NEEDS_UP: &str = "needs `tidepool up`";
const NEEDS_RESTART: &str = "needs a restart of the control process";

/// Every key of [`ClusterSettings`] as the config file names it, rendered for comparison,
/// with whether a reload applies it (`None`) or why not.
fn keys(s: &ClusterSettings) -> Vec<(&'static str, String, Option<&'static str>)> {
    let d = |v: &dyn std::fmt::Debug| format!("{v:?}");
    let t = &s.timers;
    let b = &s.backup;
    vec![
        ("timers.probe_interval_ms", d(&t.probe_interval_ms), None),
        ("timers.agent_timeout_ms", d(&t.agent_timeout_ms), None),
        ("timers.failure_timeout_ms", d(&t.failure_timeout_ms), None),
        ("timers.standby_heard_ms", d(&t.standby_heard_ms), None),
        (
            "timers.operation_timeout_ms",
            d(&t.operation_timeout_ms),
            None,
        ),
        ("durability", d(&s.durability), None),
        ("backup.schedule", d(&b.schedule), None),
        ("port", d(&s.port), Some(NEEDS_UP)),
        ("pooler_port", d(&s.pooler_port), Some(NEEDS_UP)),
        ("pg_port", d(&s.pg_port), Some(NEEDS_UP)),
        ("cores", d(&s.cores), Some(NEEDS_UP)),
        ("pool_size", d(&s.pool_size), Some(NEEDS_UP)),
        ("max_backends", d(&s.max_backends), Some(NEEDS_UP)),
        (
            "pg_max_connections",
            d(&s.pg_max_connections),
            Some(NEEDS_UP),
        ),
        ("pg_bin_dir", d(&s.pg_bin_dir), Some(NEEDS_UP)),
        ("standbys", d(&s.standbys), Some(NEEDS_UP)),
        ("zones", d(&s.zones), Some(NEEDS_UP)),
        ("backup.enabled", d(&b.enabled), Some(NEEDS_UP)),
        ("backup.repo_path", d(&b.repo_path), Some(NEEDS_UP)),
        ("backup.compress_type", d(&b.compress_type), Some(NEEDS_UP)),
        ("backup.process_max", d(&b.process_max), Some(NEEDS_UP)),
        (
            "backup.retention_full",
            d(&b.retention_full),
            Some(NEEDS_UP),
        ),
        (
            "backup.retention_full_type",
            d(&b.retention_full_type),
            Some(NEEDS_UP),
        ),
        (
            "backup.retention_diff",
            d(&b.retention_diff),
            Some(NEEDS_UP),
        ),
        ("backup.options", d(&b.options), Some(NEEDS_UP)),
        ("etcd", d(&s.etcd), Some(NEEDS_RESTART)),
        ("cluster_name", d(&s.cluster_name), Some(NEEDS_RESTART)),
        ("metrics_listen", d(&s.metrics_listen), Some(NEEDS_RESTART)),
    ]
}

/// `running` with the live keys of `from` (the others stay as they are).
pub fn with_live(running: &ClusterSettings, from: &ClusterSettings) -> ClusterSettings {
    let mut s = running.clone();
    s.timers = from.timers;
    s.durability = from.durability.clone();
    s.backup.schedule = from.backup.schedule.clone();
    s
}

/// What a reload did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    pub applied: Vec<&'static str>,
    /// Keys changed in the files but not in force, each with why.
    pub not_applied: Vec<(&'static str, String)>,
}

impl Outcome {
    /// Logs it: what changed at info, what did not apply at warn (a line per key, so that
    /// an operator sees each).
    pub fn log(&self) {
        tracing::info!(applied = ?self.applied, "SIGHUP: config reloaded");
        for (key, why) in &self.not_applied {
            tracing::warn!(key, reason = %why, "SIGHUP: changed in the config but not applied");
        }
        if self.applied.is_empty() && self.not_applied.is_empty() {
            tracing::info!("SIGHUP: the config did not change");
        }
    }
}

/// The settings in force and the files' view they came from.
pub struct Live {
    /// In force: what `state.json` had at start with the live keys applied since.
    pub settings: ClusterSettings,
    /// The files' view (the file over `state.json`) at the last (re)load: what a change is
    /// measured against.
    pub read: ClusterSettings,
    pub log_level: String,
    pub schedule: Plan,
}

impl Live {
    /// At start: the live keys from the files, the log level unless `RUST_LOG` set one.
    pub fn start(remembered: &ClusterSettings, read: ClusterSettings, log_level: String) -> Live {
        if std::env::var_os("RUST_LOG").is_none() {
            if let Err(e) = shared::logging::set_level(&log_level) {
                tracing::warn!(error = %e, "log_level not applied");
            }
        }
        Live {
            settings: with_live(remembered, &read),
            read,
            log_level,
            schedule: Plan::default(),
        }
    }

    /// Keys the files set otherwise than what runs: changed since start and needing `tidepool
    /// up` or a restart, or refused by a reload (the gauge an alert can watch).
    pub fn not_applied(&self) -> usize {
        keys(&self.read)
            .into_iter()
            .zip(keys(&self.settings))
            .filter(|((_, a, _), (_, b, _))| a != b)
            .count()
    }

    /// Applies what changed in `new` that can change live; `check_policy` says whether a new
    /// durability policy can be compiled for the cluster (else it is not applied).
    pub fn reload(
        &mut self,
        new: ClusterSettings,
        log_level: String,
        check_policy: impl Fn(&ClusterSettings) -> std::result::Result<(), String>,
    ) -> Outcome {
        let mut out = Outcome::default();
        let before = keys(&self.read);
        let mut next = self.settings.clone();
        for ((key, old, why), (_, now, _)) in before.into_iter().zip(keys(&new)) {
            if old == now {
                continue;
            }
            if let Some(why) = why {
                out.not_applied.push((key, why.to_string()));
                continue;
            }
            match key {
                "durability" => {
                    let candidate = ClusterSettings {
                        durability: new.durability.clone(),
                        ..next.clone()
                    };
                    match check_policy(&candidate) {
                        Ok(()) => next.durability = new.durability.clone(),
                        Err(e) => {
                            out.not_applied.push((key, e));
                            continue;
                        }
                    }
                }
                "backup.schedule" => {
                    if let Err(e) = self.schedule.replace(&new.backup.schedule) {
                        out.not_applied.push((key, e.to_string()));
                        continue;
                    }
                    next.backup.schedule = new.backup.schedule.clone();
                }
                _ => {
                    // The timers: taken as a whole below, each key reported.
                    next.timers = new.timers;
                }
            }
            out.applied.push(key);
        }
        if log_level != self.log_level {
            match shared::logging::set_level(&log_level) {
                Ok(()) => {
                    out.applied.insert(0, "log_level");
                    self.log_level = log_level;
                }
                Err(e) => out.not_applied.push(("log_level", e)),
            }
        }
        self.settings = next;
        self.read = new;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_keys_apply_and_the_others_are_named() {
        let base = ClusterSettings::default();
        let mut live = Live {
            settings: base.clone(),
            read: base.clone(),
            log_level: "warn".into(),
            schedule: Plan::default(),
        };
        let mut new = base.clone();
        new.timers.failure_timeout_ms = 2500;
        new.durability = "any 3".into();
        new.pool_size = 7;
        new.metrics_listen = "127.0.0.1:1".into();
        let out = live.reload(new.clone(), "warn".into(), |_| Ok(()));
        assert_eq!(out.applied, vec!["timers.failure_timeout_ms", "durability"]);
        assert_eq!(
            out.not_applied,
            vec![
                ("pool_size", NEEDS_UP.to_string()),
                ("metrics_listen", NEEDS_RESTART.to_string())
            ]
        );
        assert_eq!(live.settings.timers.failure_timeout_ms, 2500);
        assert_eq!(live.settings.durability, "any 3");
        assert_eq!(live.settings.pool_size, base.pool_size, "not applied");
        assert_eq!(live.not_applied(), 2, "pool_size and metrics_listen");
        // Nothing changed since: nothing to report (pool_size is not reported again).
        assert_eq!(
            live.reload(new.clone(), "warn".into(), |_| Ok(())),
            Outcome::default()
        );
        // A policy that does not compile stays out; the timers still apply.
        let mut worse = new.clone();
        worse.durability = "any two".into();
        worse.timers.probe_interval_ms = 100;
        let out = live.reload(worse, "warn".into(), |s| {
            Err(format!("bad {}", s.durability))
        });
        assert_eq!(out.applied, vec!["timers.probe_interval_ms"]);
        assert_eq!(
            out.not_applied,
            vec![("durability", "bad any two".to_string())]
        );
        assert_eq!(live.settings.durability, "any 3");
        assert_eq!(live.not_applied(), 3, "and the refused policy");
        // A schedule while backups are off (no schedule thread) is refused.
        let mut sched = new.clone();
        sched.backup.schedule = vec![crate::backup::schedule::Schedule {
            kind: "full".into(),
            cron: "0 3 * * *".into(),
        }];
        let out = live.reload(sched, "warn".into(), |_| Ok(()));
        assert_eq!(out.not_applied.len(), 1, "{out:?}");
        assert_eq!(out.not_applied[0].0, "backup.schedule");
        assert!(live.settings.backup.schedule.is_empty());
    }
}
