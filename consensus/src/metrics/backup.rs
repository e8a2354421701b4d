//! Backup metrics: what `pgbackrest info` says of the repository, asked every [`REFRESH`] on
//! a thread of its own (it is a subprocess reading the repository: never on a scrape, never on
//! the control loop), and the schedule's last failure (DIR/pgbackrest/schedule.json). Ages
//! are computed at scrape time from the stored timestamps, so they grow between refreshes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

use crate::backup::{info, manage, PgBackRest};
use crate::state::State;

/// How often the repository is asked.
pub const REFRESH: Duration = Duration::from_secs(30);

/// The last answer of the repository.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Snapshot {
    /// `None` before the first refresh; then whether `pgbackrest info` answered.
    pub repo_up: Option<bool>,
    /// Per type (full, diff, incr): how many backups, and the newest one's stop (Unix s).
    pub by_type: BTreeMap<String, (u64, i64)>,
    /// The backup schedule's last failure (Unix s), if any.
    pub schedule_failure_at: Option<i64>,
}

#[derive(Debug)]
pub struct BackupCollector {
    snapshot: Mutex<Snapshot>,
}

impl BackupCollector {
    pub fn new() -> BackupCollector {
        BackupCollector {
            snapshot: Mutex::new(Snapshot::default()),
        }
    }

    pub fn set(&self, s: Snapshot) {
        if let Ok(mut g) = self.snapshot.lock() {
            *g = s;
        }
    }

    fn get(&self) -> Snapshot {
        self.snapshot.lock().map(|g| g.clone()).unwrap_or_default()
    }
}

impl Default for BackupCollector {
    fn default() -> Self {
        BackupCollector::new()
    }
}

fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

impl Collector for BackupCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = self.get();
        if let Some(up) = s.repo_up {
            let g = ConstGauge::new(i64::from(up));
            g.encode(encoder.encode_descriptor(
                "tidepool_backup_repository_up",
                "1 when the last `pgbackrest info` of the repository succeeded, else 0",
                None,
                g.metric_type(),
            )?)?;
        }
        if s.repo_up == Some(true) {
            let mut family = encoder.encode_descriptor(
                "tidepool_backups",
                "Backups in the repository, by type (full, diff, incr)",
                None,
                MetricType::Gauge,
            )?;
            for kind in ["full", "diff", "incr"] {
                let count = s.by_type.get(kind).map(|(n, _)| *n).unwrap_or(0);
                let labels = [("type", kind)];
                ConstGauge::new(count as i64).encode(family.encode_family(&labels)?)?;
            }
            let mut family = encoder.encode_descriptor(
                "tidepool_backup_last_success_timestamp_seconds",
                "When the newest backup of each type finished (Unix seconds)",
                None,
                MetricType::Gauge,
            )?;
            for (kind, (_, stop)) in &s.by_type {
                let labels = [("type", kind.as_str())];
                ConstGauge::new(*stop).encode(family.encode_family(&labels)?)?;
            }
            if let Some(newest) = s.by_type.values().map(|(_, stop)| *stop).max() {
                let g = ConstGauge::new((now_secs() - newest).max(0));
                g.encode(encoder.encode_descriptor(
                    "tidepool_backup_age_seconds",
                    "Seconds since the newest backup of any type finished",
                    None,
                    g.metric_type(),
                )?)?;
            }
        }
        if let Some(at) = s.schedule_failure_at {
            let g = ConstGauge::new(at);
            g.encode(encoder.encode_descriptor(
                "tidepool_backup_schedule_last_failure_timestamp_seconds",
                "When a scheduled backup last failed (Unix seconds)",
                None,
                g.metric_type(),
            )?)?;
        }
        Ok(())
    }
}

/// The snapshot a `pgbackrest info` answer gives.
pub fn snapshot_of(info: &info::StanzaInfo, schedule_failure_at: Option<i64>) -> Snapshot {
    let mut by_type: BTreeMap<String, (u64, i64)> = BTreeMap::new();
    for b in &info.backups {
        let e = by_type.entry(b.kind.clone()).or_insert((0, 0));
        e.0 += 1;
        e.1 = e.1.max(b.stop);
    }
    Snapshot {
        repo_up: Some(true),
        by_type,
        schedule_failure_at,
    }
}

/// The collector of a cluster with backups, refreshed on a thread named `backup-metrics`;
/// `None` when the cluster has none.
pub fn start(state: &State) -> Option<Arc<BackupCollector>> {
    if !state.settings.backup.enabled || state.nodes.is_empty() {
        return None;
    }
    let collector = Arc::new(BackupCollector::new());
    let c = collector.clone();
    let state = state.clone();
    let spawned = std::thread::Builder::new()
        .name("backup-metrics".into())
        .spawn(move || {
            let mut pb: Option<PgBackRest> = None;
            loop {
                refresh(&state, &mut pb, &c);
                std::thread::sleep(REFRESH);
            }
        });
    match spawned {
        Ok(_) => Some(collector),
        Err(e) => {
            tracing::warn!(error = %e, "no backup metrics");
            None
        }
    }
}

fn refresh(state: &State, pb: &mut Option<PgBackRest>, c: &BackupCollector) {
    let failure = crate::backup::schedule::load_record(&state.dir)
        .and_then(|r| r.last_failure)
        .map(|f| f.at);
    if pb.is_none() {
        match manage::repo(state) {
            Ok((_, p)) => *pb = Some(p),
            Err(e) => {
                tracing::warn!(error = %e, "backup metrics: repository config");
            }
        }
    }
    let answer = pb.as_ref().map(info::stanza);
    match answer {
        Some(Ok(info)) => c.set(snapshot_of(&info, failure)),
        Some(Err(e)) => {
            tracing::warn!(error = %e, "backup metrics: pgbackrest info");
            c.set(Snapshot {
                repo_up: Some(false),
                schedule_failure_at: failure,
                ..Snapshot::default()
            });
        }
        None => c.set(Snapshot {
            repo_up: Some(false),
            schedule_failure_at: failure,
            ..Snapshot::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus_client::registry::Registry;

    fn encoded(s: Snapshot) -> String {
        let c = Arc::new(BackupCollector::new());
        c.set(s);
        let mut r = Registry::default();
        r.register_collector(Box::new(c));
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, &r).unwrap();
        out
    }

    #[test]
    fn nothing_before_the_first_refresh_and_ages_after() {
        assert_eq!(encoded(Snapshot::default()), "");
        let now = now_secs();
        let mut by_type = BTreeMap::new();
        by_type.insert("full".to_string(), (2, now - 100));
        by_type.insert("incr".to_string(), (1, now - 10));
        let text = encoded(Snapshot {
            repo_up: Some(true),
            by_type,
            schedule_failure_at: Some(7),
        });
        assert!(text.contains("tidepool_backup_repository_up 1\n"), "{text}");
        assert!(
            text.contains("tidepool_backups{type=\"full\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("tidepool_backups{type=\"diff\"} 0\n"),
            "{text}"
        );
        let age: i64 = text
            .lines()
            .find_map(|l| l.strip_prefix("tidepool_backup_age_seconds "))
            .and_then(|v| v.parse().ok())
            .expect(&text);
        assert!((10..20).contains(&age), "{text}");
        assert!(
            text.contains("tidepool_backup_schedule_last_failure_timestamp_seconds 7\n"),
            "{text}"
        );
        let down = encoded(Snapshot {
            repo_up: Some(false),
            ..Snapshot::default()
        });
        assert_eq!(
            down.lines().filter(|l| !l.starts_with('#')).count(),
            1,
            "{down}"
        );
    }
}
