//! WAL a standby received but nobody archived yet, handed to the archiver at promotion.
//!
//! With `archive_mode = on` a standby marks every segment its WAL receiver completes as
//! already archived (`archive_status/X.done`, Postgres `walreceiver.c`, XLogWalRcvClose), on
//! the assumption that the primary archives it. When the primary dies with its archiver
//! behind, the promoted standby would then never archive those segments, and the archive
//! would have a hole that no point-in-time restore could cross. So at promotion the agent
//! turns the `.done` of every segment of an earlier timeline that lies wholly before that
//! timeline's end (from the timeline history file) back into `.ready`, and gives a `.ready` to
//! such a segment that has no status at all (the last one the receiver completed, when the
//! timeline ended on a segment boundary): the new primary's
//! archiver pushes them again. pgBackRest accepts a second push of a segment it already holds
//! with the same checksum, and such a segment received by streaming is byte for byte the
//! primary's. The segment holding a timeline's end is not: the receiver closed it half full
//! at the switch, while the old primary may have archived its own, longer version; its WAL up
//! to the switch is in the next timeline's segment of the same number, which the promotion
//! archives. (`archive_mode = always` would avoid this, but pgBackRest
//! refuses it for backups: copies pushed by several nodes may differ.)

use std::path::Path;

/// Marks for archiving the segments (24 hex digits) of timelines below `timeline` that end
/// before the segment where their timeline ended, per `history` (the current timeline's
/// history file): `.done` becomes `.ready`, and a segment with no status at all gets a
/// `.ready` (the WAL receiver marks a segment only when it moves on to the next: the last one
/// it completed before the primary died, when the switch fell on a segment boundary, has
/// none). Returns how many.
pub fn rearchive_received(data: &Path, timeline: u32, history: &str) -> Result<usize, String> {
    let wal = data.join("pg_wal");
    let status = wal.join("archive_status");
    let entries = std::fs::read_dir(&wal).map_err(|e| format!("reading {}: {e}", wal.display()))?;
    let owner = std::fs::metadata(&status)
        .map(|m| {
            use std::os::unix::fs::MetadataExt;
            (m.uid(), m.gid())
        })
        .ok();
    let mut n = 0;
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(segment) = earlier_segment(name, timeline, history) else {
            continue;
        };
        let (done, ready) = (
            status.join(format!("{segment}.done")),
            status.join(format!("{segment}.ready")),
        );
        if ready.exists() {
            continue;
        }
        if done.exists() {
            std::fs::rename(&done, &ready)
                .map_err(|err| format!("renaming {segment}.done to .ready: {err}"))?;
        } else {
            std::fs::write(&ready, b"").map_err(|err| format!("writing {segment}.ready: {err}"))?;
            if let Some((uid, gid)) = owner {
                let _ = std::os::unix::fs::chown(&ready, Some(uid), Some(gid));
            }
        }
        n += 1;
    }
    Ok(n)
}

/// Bytes per WAL segment: the default Tidepool's initdb keeps.
const SEGMENT: u64 = 16 * 1024 * 1024;

/// `file` when it names a segment of a timeline below `timeline` wholly before that
/// timeline's end.
fn earlier_segment<'a>(file: &'a str, timeline: u32, history: &str) -> Option<&'a str> {
    if file.len() != 24 || !file.chars().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let tli = u32::from_str_radix(&file[..8], 16).ok()?;
    let hi = u64::from_str_radix(&file[8..16], 16).ok()?;
    let lo = u64::from_str_radix(&file[16..], 16).ok()?;
    let segno = hi * (0x1_0000_0000 / SEGMENT) + lo;
    let end = super::ops::fork_point(history, tli)?;
    (tli < timeline && segno < end / SEGMENT).then_some(file)
}

#[cfg(test)]
mod tests {
    use super::*;

    const HISTORY: &str = "1\t0/7000A28\tno recovery target specified\n";

    #[test]
    fn only_segments_before_an_earlier_timelines_end() {
        assert_eq!(
            earlier_segment("000000010000000000000003", 2, HISTORY),
            Some("000000010000000000000003")
        );
        // The segment holding the switch (0/7000A28 is in segment 7) stays as it is.
        assert_eq!(
            earlier_segment("000000010000000000000007", 2, HISTORY),
            None
        );
        assert_eq!(
            earlier_segment("000000020000000000000003", 2, HISTORY),
            None
        );
        assert_eq!(
            earlier_segment("000000010000000000000003.partial", 2, HISTORY),
            None
        );
        assert_eq!(earlier_segment("00000002.history", 3, HISTORY), None);
        // A timeline the history does not know: left alone.
        assert_eq!(earlier_segment("000000010000000000000003", 2, ""), None);
        let h = "1\t1/2000000\tx\n";
        assert_eq!(earlier_segment("0000000100000001000000FF", 2, h), None);
        assert!(earlier_segment("000000010000000100000001", 2, h).is_some());
    }

    #[test]
    fn marks_done_and_unmarked_segments_ready() {
        let data = std::env::temp_dir().join(format!("tp-rearchive-{}", std::process::id()));
        let wal = data.join("pg_wal");
        let status = wal.join("archive_status");
        std::fs::create_dir_all(&status).unwrap();
        for f in [
            "000000010000000000000001", // .done: archived again
            "000000010000000000000002", // no status: the last the receiver completed
            "000000010000000000000003", // already .ready
            "000000010000000000000007", // holds the switch
            "000000020000000000000007", // the current timeline
            "00000002.history",
        ] {
            std::fs::write(wal.join(f), b"").unwrap();
        }
        for f in [
            "000000010000000000000001.done",
            "000000010000000000000003.ready",
            "000000010000000000000007.done",
            "000000020000000000000007.done",
            "00000002.history.done",
        ] {
            std::fs::write(status.join(f), b"").unwrap();
        }
        assert_eq!(rearchive_received(&data, 2, HISTORY).unwrap(), 2);
        assert!(status.join("000000010000000000000001.ready").exists());
        assert!(!status.join("000000010000000000000001.done").exists());
        assert!(status.join("000000010000000000000002.ready").exists());
        assert!(status.join("000000010000000000000007.done").exists());
        assert!(status.join("000000020000000000000007.done").exists());
        assert!(status.join("00000002.history.done").exists());
        std::fs::remove_dir_all(&data).unwrap();
    }
}
