//! What the repository holds, from `pgbackrest info --output=json`.

use serde::Serialize;
use serde_json::Value;

use crate::backup::PgBackRest;
use crate::error::{Error, Result};

/// One backup, as `tidepool backup list` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BackupInfo {
    pub label: String,
    /// full, diff or incr.
    #[serde(rename = "type")]
    pub kind: String,
    /// Unix seconds.
    pub start: i64,
    pub stop: i64,
    /// Bytes of the database when it was taken.
    pub database_size: u64,
    /// Bytes this backup stored in the repository (after compression, without what it
    /// references from earlier backups).
    pub repo_size: u64,
    /// First and last WAL segment the backup needs.
    pub wal_start: String,
    pub wal_stop: String,
    pub lsn_start: String,
    pub lsn_stop: String,
    /// The backup it depends on (diff, incr).
    pub prior: Option<String>,
    /// pgBackRest found an error while taking it (a page checksum, ...).
    pub error: bool,
}

/// The stanza's status and the WAL the archive holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StanzaInfo {
    pub status: String,
    pub wal_min: Option<String>,
    pub wal_max: Option<String>,
    /// A backup is running (pgBackRest's lock is held).
    pub backup_running: bool,
    pub backups: Vec<BackupInfo>,
}

pub fn stanza(pb: &PgBackRest) -> Result<StanzaInfo> {
    let text = pb.run("info", &["--output=json".to_string()])?;
    parse(&text, &pb.stanza)
}

pub fn backups(pb: &PgBackRest) -> Result<Vec<BackupInfo>> {
    Ok(stanza(pb)?.backups)
}

pub fn parse(text: &str, name: &str) -> Result<StanzaInfo> {
    let v: Value = serde_json::from_str(text)
        .map_err(|e| Error::Backup(format!("pgbackrest info is not JSON: {e}")))?;
    let Some(st) = v
        .as_array()
        .and_then(|a| a.iter().find(|s| s["name"] == name))
    else {
        return Ok(StanzaInfo::default());
    };
    let s = |v: &Value| v.as_str().map(str::to_string);
    let archives = st["archive"].as_array().cloned().unwrap_or_default();
    let backups = st["backup"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|b| BackupInfo {
                    label: s(&b["label"]).unwrap_or_default(),
                    kind: s(&b["type"]).unwrap_or_default(),
                    start: b["timestamp"]["start"].as_i64().unwrap_or(0),
                    stop: b["timestamp"]["stop"].as_i64().unwrap_or(0),
                    database_size: b["info"]["size"].as_u64().unwrap_or(0),
                    repo_size: b["info"]["repository"]["delta"].as_u64().unwrap_or(0),
                    wal_start: s(&b["archive"]["start"]).unwrap_or_default(),
                    wal_stop: s(&b["archive"]["stop"]).unwrap_or_default(),
                    lsn_start: s(&b["lsn"]["start"]).unwrap_or_default(),
                    lsn_stop: s(&b["lsn"]["stop"]).unwrap_or_default(),
                    prior: s(&b["prior"]),
                    error: b["error"].as_bool().unwrap_or(false),
                })
                .collect()
        })
        .unwrap_or_default();
    Ok(StanzaInfo {
        status: s(&st["status"]["message"]).unwrap_or_default(),
        wal_min: archives.iter().filter_map(|a| s(&a["min"])).min(),
        wal_max: archives.iter().filter_map(|a| s(&a["max"])).max(),
        backup_running: st["status"]["lock"]["backup"]["held"]
            .as_bool()
            .unwrap_or(false),
        backups,
    })
}

/// `2026-12-06 20:09:37 UTC` from Unix seconds.
pub fn utc(secs: i64) -> String {
    let t = super::schedule::Civil::from_unix(secs);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02} UTC",
        t.year, t.month, t.day, t.hour, t.minute, t.second
    )
}

/// `12.3 MB`
pub fn human(bytes: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = bytes as f64;
    let mut i = 0;
    while v >= 1000.0 && i + 1 < units.len() {
        v /= 1000.0;
        i += 1;
    }
    if i == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", units[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"[{"archive":[{"database":{"id":1,"repo-key":1},"id":"15-1",
      "max":"000000010000000000000003","min":"000000010000000000000001"}],
      "backup":[{"archive":{"start":"000000010000000000000003","stop":"000000010000000000000003"},
      "backrest":{"format":5,"version":"2.45"},"database":{"id":1,"repo-key":1},"error":false,
      "info":{"delta":22992543,"repository":{"delta":2811755,"size":2811755},"size":22992543},
      "label":"20261206-200937F","lsn":{"start":"0/3000028","stop":"0/3000100"},"prior":null,
      "reference":null,"timestamp":{"start":1796587786,"stop":1796587789},"type":"full"}],
      "cipher":"none","name":"local","repo":[],"status":{"code":0,"lock":{"backup":{"held":false}},
      "message":"ok"}}]"#;

    #[test]
    fn parses_what_pgbackrest_2_45_prints() {
        let s = parse(SAMPLE, "local").unwrap();
        assert_eq!(s.status, "ok");
        assert_eq!(s.wal_max.as_deref(), Some("000000010000000000000003"));
        assert!(!s.backup_running);
        let b = &s.backups[0];
        assert_eq!(b.label, "20261206-200937F");
        assert_eq!(b.kind, "full");
        assert_eq!((b.start, b.stop), (1796587786, 1796587789));
        assert_eq!(b.database_size, 22992543);
        assert_eq!(b.repo_size, 2811755);
        assert_eq!(b.lsn_stop, "0/3000100");
        assert_eq!(b.prior, None);
        assert!(parse(SAMPLE, "other").unwrap().backups.is_empty());
        assert!(parse("nope", "local").is_err());
    }

    #[test]
    fn formats() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(1796587786), "2026-12-06 20:09:46 UTC");
        assert_eq!(human(999), "999 B");
        assert_eq!(human(22992543), "23.0 MB");
    }
}
