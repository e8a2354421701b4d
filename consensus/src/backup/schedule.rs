//! Scheduled backups: `[[backup.schedule]]` entries (`type`, and a UTC `cron`: minute hour
//! day-of-month month day-of-week, with `*`, `a`, `a-b`, `*/n`, `a-b/n` and comma lists, and
//! optionally a leading seconds field as in Quartz), run by the control process that leads the
//! cluster. A backup is taken from whatever
//! node is primary (and a healthy standby) at that minute, so the schedule follows the
//! cluster through failovers. The last success and the last failure are kept in
//! DIR/pgbackrest/schedule.json, which `tidepool status` shows.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::state::State;

/// One `[[backup.schedule]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Schedule {
    /// full, diff or incr.
    #[serde(rename = "type")]
    pub kind: String,
    /// `minute hour day-of-month month day-of-week`, UTC; day-of-week 0 (or 7) is Sunday.
    pub cron: String,
}

/// A parsed cron expression: the allowed values of each field (seconds first).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cron {
    fields: [Vec<u32>; 6],
}

const RANGES: [(u32, u32); 6] = [(0, 59), (0, 59), (0, 23), (1, 31), (1, 12), (0, 7)];

impl Cron {
    pub fn parse(text: &str) -> Result<Cron> {
        let mut parts: Vec<&str> = text.split_whitespace().collect();
        match parts.len() {
            5 => parts.insert(0, "0"),
            6 => {}
            _ => return Err(bad(
                text,
                "five fields: minute hour day-of-month month day-of-week (or six, seconds first)",
            )),
        }
        let mut fields: [Vec<u32>; 6] = Default::default();
        for (i, part) in parts.iter().enumerate() {
            let (lo, hi) = RANGES[i];
            for item in part.split(',') {
                let (range, step) = match item.split_once('/') {
                    Some((r, s)) => (r, s.parse::<u32>().map_err(|_| bad(text, item))?),
                    None => (item, 1),
                };
                if step == 0 {
                    return Err(bad(text, item));
                }
                let (a, b) = if range == "*" {
                    (lo, hi)
                } else if let Some((a, b)) = range.split_once('-') {
                    (num(a, text)?, num(b, text)?)
                } else {
                    let a = num(range, text)?;
                    (a, if item.contains('/') { hi } else { a })
                };
                if a < lo || b > hi || a > b {
                    return Err(bad(text, item));
                }
                fields[i].extend((a..=b).step_by(step as usize));
            }
            // Day-of-week 7 is Sunday too.
            if i == 5 && fields[5].contains(&7) {
                fields[5].push(0);
            }
        }
        Ok(Cron { fields })
    }

    /// Whether Unix second `secs` (UTC) matches. As in cron, when both day-of-month and
    /// day-of-week are restricted, either may match.
    pub fn matches(&self, secs: i64) -> bool {
        let t = Civil::from_unix(secs);
        let has = |i: usize, v: u32| self.fields[i].contains(&v);
        let dom_any = self.fields[3].len() == 31;
        let dow_any = self.fields[5].len() >= 7;
        let day = match (dom_any, dow_any) {
            (true, true) => true,
            (false, true) => has(3, t.day),
            (true, false) => has(5, t.weekday),
            (false, false) => has(3, t.day) || has(5, t.weekday),
        };
        has(0, t.second) && has(1, t.minute) && has(2, t.hour) && has(4, t.month) && day
    }
}

fn num(s: &str, text: &str) -> Result<u32> {
    s.parse().map_err(|_| bad(text, s))
}

fn bad(text: &str, what: &str) -> Error {
    Error::Conflict(format!("backup schedule cron {text:?}: bad field {what:?}"))
}

/// A UTC calendar time (Howard Hinnant's civil-from-days).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Civil {
    pub year: i64,
    pub month: u32,
    pub day: u32,
    pub hour: u32,
    pub minute: u32,
    pub second: u32,
    /// 0 = Sunday.
    pub weekday: u32,
}

impl Civil {
    pub fn from_unix(secs: i64) -> Civil {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400);
        let z = days + 719_468;
        let era = z.div_euclid(146_097);
        let doe = z - era * 146_097;
        let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
        let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
        let mp = (5 * doy + 2) / 153;
        let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
        let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
        Civil {
            year: yoe + era * 400 + i64::from(month <= 2),
            month,
            day,
            hour: (rem / 3600) as u32,
            minute: (rem % 3600 / 60) as u32,
            second: (rem % 60) as u32,
            // 1970-01-01 was a Thursday.
            weekday: (days + 4).rem_euclid(7) as u32,
        }
    }
}

/// The last scheduled success and failure.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub last_success: Option<Outcome>,
    pub last_failure: Option<Outcome>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    #[serde(rename = "type")]
    pub kind: String,
    /// Unix seconds.
    pub at: i64,
    /// The backup's label (success) or the error (failure).
    pub detail: String,
}

pub fn record_path(dir: &Path) -> PathBuf {
    dir.join("pgbackrest").join("schedule.json")
}

pub fn load_record(dir: &Path) -> Option<Record> {
    let text = std::fs::read_to_string(record_path(dir)).ok()?;
    serde_json::from_str(&text).ok()
}

fn save_record(dir: &Path, r: &Record) -> Result<()> {
    let path = record_path(dir);
    let text = serde_json::to_string_pretty(r)
        .map_err(|e| Error::Backup(format!("encoding {}: {e}", path.display())))?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, text).map_err(Error::io(format!("writing {}", tmp.display())))?;
    std::fs::rename(&tmp, &path).map_err(Error::io(format!("writing {}", path.display())))
}

fn now_secs() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Starts the scheduler thread of a control process: while `leading`, takes the backups whose
/// cron matches the current second (a full wins over a diff over an incr when several match). Backups run on this thread, one at a time, never on the control loop.
/// The entries the schedule's thread follows; SIGHUP replaces them (`control::reload`).
#[derive(Clone, Default)]
pub struct Plan {
    entries: Arc<Mutex<Vec<(String, Cron)>>>,
    /// Whether a thread follows the plan (backups are on).
    running: bool,
}

impl Plan {
    /// Parses `schedule`; the plan changes only when every entry parses.
    pub fn replace(&self, schedule: &[Schedule]) -> Result<()> {
        let parsed = parse(schedule)?;
        if !self.running && !parsed.is_empty() {
            return Err(Error::Conflict(
                "backups are off in this cluster ([backup] enabled = false when `tidepool up` \
                 made it): no schedule runs"
                    .into(),
            ));
        }
        *self.entries.lock().unwrap_or_else(|p| p.into_inner()) = parsed;
        Ok(())
    }
}

fn parse(schedule: &[Schedule]) -> Result<Vec<(String, Cron)>> {
    let mut plan = Vec::new();
    for s in schedule {
        if !["full", "diff", "incr"].contains(&s.kind.as_str()) {
            return Err(Error::Conflict(format!(
                "backup schedule type {:?}: full, diff or incr",
                s.kind
            )));
        }
        plan.push((s.kind.clone(), Cron::parse(&s.cron)?));
    }
    Ok(plan)
}

/// Starts the schedule's thread when backups are on (with no entry it only waits: a reload
/// may add some); the plan it follows is returned.
pub fn start(state: &State, leading: Arc<AtomicBool>) -> Result<Plan> {
    let entries = parse(&state.settings.backup.schedule)?;
    if !state.settings.backup.enabled {
        return Ok(Plan::default());
    }
    if !entries.is_empty() {
        tracing::info!(entries = entries.len(), "backup schedule active");
    }
    let plan = Plan {
        entries: Arc::new(Mutex::new(entries)),
        running: true,
    };
    let shared = plan.entries.clone();
    let state = state.clone();
    std::thread::Builder::new()
        .name("backup-schedule".into())
        .spawn(move || {
            // Second by second: a backup that takes longer than the interval skips the
            // matches it overlapped, as cron does for a job still running.
            let mut last = now_secs();
            loop {
                std::thread::sleep(Duration::from_millis(250));
                let now = now_secs();
                if now == last {
                    continue;
                }
                let seconds = (last + 1)..=now;
                last = now;
                if !leading.load(Ordering::Relaxed) {
                    continue;
                }
                let due = {
                    let plan = shared.lock().unwrap_or_else(|p| p.into_inner());
                    ["full", "diff", "incr"].into_iter().find(|k| {
                        plan.iter().any(|(kind, cron)| {
                            kind == k && seconds.clone().any(|t| cron.matches(t))
                        })
                    })
                };
                if let Some(kind) = due {
                    run_one(&state, kind);
                    last = now_secs();
                }
            }
        })
        .map_err(Error::io("starting the backup schedule"))?;
    Ok(plan)
}

fn run_one(state: &State, kind: &str) {
    tracing::info!(kind, "scheduled backup starting");
    let mut record = load_record(&state.dir).unwrap_or_default();
    match super::create::create(state, kind, false) {
        Ok(c) => {
            tracing::info!(kind, label = %c.label, source = %c.source, "scheduled backup done");
            record.last_success = Some(Outcome {
                kind: kind.into(),
                at: now_secs(),
                detail: c.label,
            });
        }
        Err(e) => {
            tracing::error!(kind, error = %e, "scheduled backup FAILED");
            record.last_failure = Some(Outcome {
                kind: kind.into(),
                at: now_secs(),
                detail: e.to_string(),
            });
        }
    }
    if let Err(e) = save_record(&state.dir, &record) {
        tracing::warn!(error = %e, "backup schedule record not written");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // 2026-12-06 was a Sunday.
    const SUN_0300: i64 = 1796526000;

    #[test]
    fn civil_time() {
        let t = Civil::from_unix(SUN_0300);
        assert_eq!((t.year, t.month, t.day), (2026, 12, 6));
        assert_eq!((t.hour, t.minute, t.weekday), (3, 0, 0));
        assert_eq!(Civil::from_unix(0).weekday, 4);
    }

    #[test]
    fn weekly_daily_hourly() {
        let weekly = Cron::parse("0 3 * * 0").unwrap();
        let daily = Cron::parse("0 3 * * *").unwrap();
        let hourly = Cron::parse("0 * * * *").unwrap();
        assert!(weekly.matches(SUN_0300));
        assert!(!weekly.matches(SUN_0300 + 86_400));
        assert!(daily.matches(SUN_0300 + 86_400));
        assert!(!daily.matches(SUN_0300 + 3600));
        assert!(hourly.matches(SUN_0300 + 3600));
        assert!(!hourly.matches(SUN_0300 + 60));
        assert!(Cron::parse("0 3 * * 7").unwrap().matches(SUN_0300));
    }

    #[test]
    fn lists_ranges_steps_seconds_and_errors() {
        let c = Cron::parse("*/15 1-5/2 1,15 * *").unwrap();
        assert_eq!(c.fields[0], vec![0]);
        assert_eq!(c.fields[1], vec![0, 15, 30, 45]);
        assert_eq!(c.fields[2], vec![1, 3, 5]);
        assert_eq!(c.fields[3], vec![1, 15]);
        let every10s = Cron::parse("*/10 * * * * *").unwrap();
        assert!(every10s.matches(SUN_0300 + 20));
        assert!(!every10s.matches(SUN_0300 + 21));
        assert!(!Cron::parse("0 3 * * 0").unwrap().matches(SUN_0300 + 1));
        for bad in [
            "",
            "* * * *",
            "60 * * * *",
            "*/0 * * * *",
            "a * * * *",
            "5-1 * * * *",
            "* * * * * * *",
        ] {
            assert!(Cron::parse(bad).is_err(), "{bad:?}");
        }
    }
}
