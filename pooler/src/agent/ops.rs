//! What the control process asks of the node: recruit, promote, follow, set_sync. Each takes
//! the operation lock, checks the term against the pledge, persists before it acts where the
//! protocol says so, and answers with a fresh report.

use super::pgctl::Postmaster;
use super::postgres::{conninfo_quote, wait_until, Conn, PgError, Target};
use super::term::Pledge;
use super::Agent;
use shared::agent::{format_lsn, parse_lsn, Lsn, Response, Role, Upstream};
use std::time::{Duration, Instant};

/// A `synchronous_standby_names` no standby ever has: a primary with it cannot complete a
/// commit (each waits for an acknowledgement that never comes).
pub const FENCE: &str = "\"tidepool_fenced\"";

/// Where timeline `tli` ended in a timeline history file (`tli<TAB>X/Y<TAB>reason` lines).
pub(super) fn fork_point(history: &str, tli: u32) -> Option<Lsn> {
    history.lines().find_map(|l| {
        let mut f = l.split_whitespace();
        let t: u32 = f.next()?.parse().ok()?;
        let lsn = parse_lsn(f.next()?)?;
        (t == tli).then_some(lsn)
    })
}

impl Agent {
    async fn refuse(&self, reason: String) -> Response {
        tracing::warn!(%reason, "agent request refused");
        Response::Refused {
            reason,
            report: Some(self.report().await),
        }
    }

    async fn ok(&self) -> Response {
        Response::Ok {
            report: self.report().await,
        }
    }

    /// Connects and asks Postgres for its role.
    async fn role_now(&self) -> Result<(Conn, Role), PgError> {
        let c = self.connect().await?;
        let o = c.observe().await?;
        Ok((c, o.role))
    }

    pub async fn recruit(&self, term: u64) -> Response {
        let _op = self.op.lock().await;
        let p = self.pledge.get();
        if term <= p.term {
            return self
                .refuse(format!(
                    "term {term} is not above the pledged term {}",
                    p.term
                ))
                .await;
        }
        // The pledge is durable before anything else happens, and before any answer.
        if let Err(e) = self.persist(Pledge {
            term,
            recruited: true,
            ..p
        }) {
            return self.refuse(format!("cannot persist the pledge: {e}")).await;
        }
        tracing::warn!(term, "pledged to a new term");
        let done = match self.role_now().await {
            // A pledge from a node whose Postgres is down still counts for the majority
            // (it will refuse lower terms); the report says Down, so it is not promoted.
            Err(e) => {
                tracing::warn!(term, error = %e, "recruited while Postgres is down");
                Ok(())
            }
            Ok((c, Role::Standby)) => self.stop_streaming(c).await,
            Ok((c, Role::Primary)) => self.fence(c).await,
            Ok((_, Role::Down)) => Ok(()),
        };
        match done {
            Ok(()) => self.ok().await,
            Err(e) => self.refuse(format!("recruit for term {term}: {e}")).await,
        }
    }

    /// A recruited standby stops streaming (so the old primary loses the acknowledgement it
    /// needs to complete a commit), then replays all it received.
    async fn stop_streaming(&self, mut c: Conn) -> Result<(), String> {
        c.set_system(&[("primary_conninfo", Some(""))])
            .await
            .map_err(|e| format!("clearing primary_conninfo: {e}"))?;
        let deadline = Instant::now() + self.wait();
        let pg_timeout = self.pg_timeout();
        loop {
            c.set_deadline(Instant::now() + pg_timeout);
            let n = c.value("SELECT count(*) FROM pg_stat_wal_receiver").await;
            if matches!(n, Ok(Some(n)) if n == "0") {
                break;
            }
            if Instant::now() >= deadline {
                return Err("the WAL receiver did not stop in time".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // Replay up to what was received. A last record received only in part never replays:
        // once replay stands still for a second, what it reached is all there is.
        let mut last: Option<String> = None;
        let mut still_since = Instant::now();
        loop {
            c.set_deadline(Instant::now() + pg_timeout);
            let row = c
                .rows(
                    "SELECT (pg_last_wal_receive_lsn() IS NULL \
                     OR pg_last_wal_replay_lsn() >= pg_last_wal_receive_lsn())::text, \
                     pg_last_wal_replay_lsn()::text",
                )
                .await
                .map_err(|e| format!("replay position: {e}"))?
                .into_iter()
                .next()
                .unwrap_or_default();
            if row.first().cloned().flatten().as_deref() == Some("true") {
                break;
            }
            let replay = row.get(1).cloned().flatten();
            if replay != last {
                last = replay;
                still_since = Instant::now();
            } else if still_since.elapsed() > Duration::from_secs(1) {
                tracing::info!(replay = ?last, "replay stopped short of the received WAL (a partial record)");
                break;
            }
            if Instant::now() >= deadline {
                return Err("replay did not catch up with the received WAL in time".into());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// A recruited primary (a planned switchover) drains and stops completing commits: new
    /// transactions read-only, writers given a moment to finish, then an unsatisfiable
    /// `synchronous_standby_names` and every client backend ended.
    async fn fence(&self, mut c: Conn) -> Result<(), String> {
        // Gateways stop routing to this node first (ROLE: not a primary): they hold new
        // requests for the next primary, so nothing new starts here and a switchover shows
        // clients a pause, not an error. Requests already sent get a moment to arrive.
        super::role::node().set(Role::Down, 0);
        tokio::time::sleep(Duration::from_millis(200)).await;
        let pg_timeout = self.pg_timeout();
        let drain = Instant::now() + self.wait() / 2;
        loop {
            c.set_deadline(Instant::now() + pg_timeout);
            let writers = c
                .value(
                    "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
                     AND (backend_xid IS NOT NULL OR state NOT IN ('idle')) \
                     AND pid <> pg_backend_pid()",
                )
                .await;
            if matches!(writers, Ok(Some(n)) if n == "0") {
                break;
            }
            if Instant::now() >= drain {
                tracing::warn!("writers still running after the drain; ending them");
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        c.set_deadline(Instant::now() + pg_timeout);
        c.set_system(&[("default_transaction_read_only", Some("on"))])
            .await
            .map_err(|e| format!("making transactions read-only: {e}"))?;
        c.set_deadline(Instant::now() + pg_timeout);
        c.set_system(&[("synchronous_standby_names", Some(FENCE))])
            .await
            .map_err(|e| format!("fencing: {e}"))?;
        // pg_reload_conf only signals: give the walsenders and the checkpointer (which
        // publishes whether synchronous standbys are defined) a moment to read the file.
        tokio::time::sleep(Duration::from_millis(100)).await;
        c.set_deadline(Instant::now() + pg_timeout);
        c.exec(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
             WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()",
        )
        .await
        .map_err(|e| format!("ending client backends: {e}"))?;
        tracing::warn!("primary fenced");
        Ok(())
    }

    pub async fn promote(&self, term: u64, sync_names: &str) -> Response {
        let _op = self.op.lock().await;
        let p = self.pledge.get();
        if term != p.term {
            return self
                .refuse(format!(
                    "promote for term {term}, but pledged to term {}",
                    p.term
                ))
                .await;
        }
        let (mut c, role) = match self.role_now().await {
            Ok(x) => x,
            Err(e) => return self.refuse(format!("postgres: {e}")).await,
        };
        // Persisted first: if the agent dies right after the promotion, the node still says
        // at which term it became primary.
        if let Err(e) = self.persist(Pledge {
            term,
            primary_term: term,
            recruited: false,
        }) {
            return self.refuse(format!("cannot persist: {e}")).await;
        }
        let settings = [
            ("synchronous_standby_names", Some(sync_names)),
            ("default_transaction_read_only", None),
        ];
        if let Err(e) = c.set_system(&settings).await {
            return self.refuse(format!("setting up the primary: {e}")).await;
        }
        if role == Role::Standby {
            let secs = self.wait().as_secs().max(1);
            c.set_deadline(Instant::now() + self.wait() + self.pg_timeout());
            match c
                .value(&format!("SELECT pg_promote(true, {secs})::text"))
                .await
            {
                Ok(Some(t)) if t == "true" => {}
                Ok(other) => {
                    return self
                        .refuse(format!("pg_promote did not finish: {other:?}"))
                        .await
                }
                Err(e) => return self.refuse(format!("pg_promote: {e}")).await,
            }
            // pg_rewind reads the source's timeline from its control file, which a promotion
            // updates only at its next checkpoint: without this, an old primary told to
            // follow at once would be found "on the same timeline" and not rewound.
            c.set_deadline(Instant::now() + self.wait());
            if let Err(e) = c.exec("CHECKPOINT").await {
                tracing::warn!(error = %e, "checkpoint after promotion failed");
            }
            self.rearchive(&mut c).await;
        }
        tracing::warn!(term, sync = %sync_names, "promoted");
        self.ok().await
    }

    /// After a promotion with archiving on: the WAL this node received as a standby goes to
    /// the archiver again (super::archive), which a WAL switch wakes. Best effort: a failure
    /// is logged, the promotion stands.
    async fn rearchive(&self, c: &mut Conn) {
        let Some(pgctl) = &self.pgctl else { return };
        c.set_deadline(Instant::now() + self.wait());
        match c.value("SHOW archive_mode").await {
            Ok(Some(m)) if m != "off" => {}
            _ => return,
        }
        let tli = c
            .value("SELECT substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8)")
            .await
            .ok()
            .flatten()
            .and_then(|t| u32::from_str_radix(&t, 16).ok());
        let Some(tli) = tli else { return };
        let path = pgctl.data.join(format!("pg_wal/{tli:08X}.history"));
        let history = std::fs::read_to_string(&path).unwrap_or_default();
        match super::archive::rearchive_received(&pgctl.data, tli, &history) {
            Ok(n) => {
                tracing::info!(
                    segments = n,
                    timeline = tli,
                    "received WAL handed to the archiver"
                );
                if let Err(e) = c.exec("SELECT pg_switch_wal()").await {
                    tracing::warn!(error = %e, "WAL switch after promotion failed");
                }
            }
            Err(e) => tracing::warn!(error = %e, "received WAL not handed to the archiver"),
        }
    }

    pub async fn set_sync(&self, term: u64, sync_names: &str) -> Response {
        let _op = self.op.lock().await;
        let p = self.pledge.get();
        if term < p.term {
            return self
                .refuse(format!("term {term} is below the pledged term {}", p.term))
                .await;
        }
        if p.recruited {
            return self
                .refuse("fenced by a recruit: promote or follow first".into())
                .await;
        }
        match self.role_now().await {
            Ok((c, Role::Primary)) => {
                if let Err(e) = self.persist(Pledge { term, ..p }) {
                    return self.refuse(format!("cannot persist: {e}")).await;
                }
                match c
                    .set_system(&[("synchronous_standby_names", Some(sync_names))])
                    .await
                {
                    Ok(()) => self.ok().await,
                    Err(e) => self.refuse(format!("synchronous_standby_names: {e}")).await,
                }
            }
            Ok(_) => self.refuse("not a primary".into()).await,
            Err(e) => self.refuse(format!("postgres: {e}")).await,
        }
    }

    fn is_self(&self, u: &Upstream) -> bool {
        u.port == self.pg_port
            && self
                .own_hosts
                .iter()
                .any(|h| h.trim_end_matches('/') == u.host.trim_end_matches('/'))
    }

    pub async fn follow(&self, term: u64, primary: &Upstream) -> Response {
        let _op = self.op.lock().await;
        let p = self.pledge.get();
        if term < p.term {
            return self
                .refuse(format!("term {term} is below the pledged term {}", p.term))
                .await;
        }
        if self.is_self(primary) {
            return self
                .refuse(format!(
                    "{}:{} is this node: it cannot follow itself",
                    primary.host, primary.port
                ))
                .await;
        }
        if let Err(e) = self.persist(Pledge { term, ..p }) {
            return self.refuse(format!("cannot persist: {e}")).await;
        }
        let conninfo = format!(
            "host={} port={} user={} application_name={}",
            conninfo_quote(&primary.host),
            primary.port,
            conninfo_quote(&self.cfg.replication_user),
            conninfo_quote(&self.cfg.node_name)
        );
        let done = match self.role_now().await {
            Ok((c, Role::Standby)) => {
                match c.set_system(&[("primary_conninfo", Some(&conninfo))]).await {
                    Err(e) => Err(format!("primary_conninfo: {e}")),
                    // A standby that received WAL the new primary never had (it was ahead of
                    // the promoted one on the old timeline) cannot stream from it: its WAL
                    // receiver fails at the fork. pg_rewind finds out (and answers "no rewind
                    // required" otherwise, at the cost of one restart).
                    Ok(()) if self.pgctl.is_some() && self.diverged(&c, primary).await => {
                        tracing::warn!(
                            "ahead of the new primary's fork of our timeline; rewinding"
                        );
                        drop(c);
                        self.rewind_and_start(primary, &conninfo, true).await
                    }
                    Ok(()) => Ok(()),
                }
            }
            Ok((c, _)) => {
                drop(c);
                self.rewind_and_start(primary, &conninfo, true).await
            }
            Err(PgError::NotAnswering) => Err("postgres is not answering".into()),
            Err(e) => match self.pgctl.as_ref().map(|c| c.postmaster()) {
                Some(Postmaster::Running(_)) => Err(format!("postgres: {e}")),
                Some(_) => self.rewind_and_start(primary, &conninfo, false).await,
                None => Err(format!("postgres: {e}")),
            },
        };
        if let Err(e) = done {
            return self
                .refuse(format!("follow {}:{}: {e}", primary.host, primary.port))
                .await;
        }
        if let Err(e) = self.persist(Pledge {
            term,
            primary_term: 0,
            recruited: false,
        }) {
            return self.refuse(format!("cannot persist: {e}")).await;
        }
        // Give the WAL receiver a moment so the answer usually shows it streaming; the
        // control re-checks with reports anyway.
        self.streams_within(Duration::from_secs(3)).await;
        tracing::warn!(term, primary = %format!("{}:{}", primary.host, primary.port), "following");
        self.ok().await
    }

    /// Whether this standby holds WAL of its timeline past the point where `primary`'s history
    /// left that timeline (read from the primary's timeline history file): then it can never
    /// stream from it without a rewind. Unknown (primary unreachable, no history) is false.
    async fn diverged(&self, c: &Conn, primary: &Upstream) -> bool {
        let Ok(mine) = c.observe().await else {
            return false;
        };
        let remote = Target {
            socket_dir: primary.host.clone(),
            port: primary.port,
            user: self.cfg.replication_user.clone(),
        };
        let Ok(p) = remote.connect(Instant::now() + self.pg_timeout()).await else {
            return false;
        };
        let Ok(Some(tli)) = p
            .value("SELECT substr(pg_walfile_name(pg_current_wal_flush_lsn()), 1, 8)")
            .await
        else {
            return false;
        };
        let Ok(their_tli) = u32::from_str_radix(&tli, 16) else {
            return false;
        };
        if their_tli <= mine.timeline {
            return false;
        }
        let history = p
            .value(&format!(
                "SELECT pg_read_file('pg_wal/{their_tli:08X}.history')"
            ))
            .await;
        let Ok(Some(history)) = history else {
            return false;
        };
        let Some(fork) = fork_point(&history, mine.timeline) else {
            return false;
        };
        let held = mine.flush_lsn.max(mine.replay_lsn).unwrap_or(0);
        tracing::info!(timeline = mine.timeline, fork = %format_lsn(fork), held = %format_lsn(held), "timeline fork of the new primary");
        held > fork
    }

    /// Whether the WAL receiver streams within `d` (bounded by `agent_wait_ms` too).
    async fn streams_within(&self, d: Duration) -> bool {
        let pg_timeout = self.pg_timeout();
        wait_until(
            Instant::now() + self.wait().min(d),
            Duration::from_millis(50),
            || async move {
                match self.target.connect(Instant::now() + pg_timeout).await {
                    Ok(c) => matches!(c.observe().await, Ok(o) if o.streaming),
                    Err(_) => false,
                }
            },
        )
        .await
    }

    /// Before an old primary is stopped to be rewound: no more archiving from it. A primary
    /// that shuts down with archiving on switches to a new WAL segment first and archives the
    /// one it leaves (xlog.c, `ShutdownXLOG`): here the segment holding the new primary's
    /// timeline fork, with this node's records past the fork in it. A standby restoring that
    /// segment from the archive would replay them and never join the new timeline ("record
    /// with incorrect prev-link"). Nothing is lost: every segment before the fork is archived
    /// again by the new primary (archive.rs). Best effort; `make_standby` drops the override.
    async fn stop_archiving(&self) {
        let deadline = Instant::now() + self.pg_timeout();
        let Ok(c) = self.target.connect(deadline).await else {
            return;
        };
        // ALTER SYSTEM is allowed on a read-only (fenced) primary: it writes no WAL.
        let done = async {
            c.exec("ALTER SYSTEM SET archive_command = ''").await?;
            c.exec("SELECT pg_reload_conf()").await
        };
        match done.await {
            // The archiver reads the reload before the shutdown's last archiving round (it
            // checks for a reload first in each cycle); the pause covers the signal's delivery.
            Ok(()) => tokio::time::sleep(Duration::from_millis(200)).await,
            Err(e) => tracing::warn!(error = %e, "could not stop archiving before the rewind"),
        }
    }

    /// An old primary (running, crashed or stopped) becomes a standby of `primary`: stopped,
    /// rewound onto the new primary's history, given back its own configuration, started.
    async fn rewind_and_start(
        &self,
        primary: &Upstream,
        conninfo: &str,
        running: bool,
    ) -> Result<(), String> {
        let Some(pgctl) = &self.pgctl else {
            return Err("pg_data is not configured: cannot rewind".into());
        };
        if running {
            self.stop_archiving().await;
            tracing::warn!("stopping the old primary to rewind it");
            pgctl.stop(self.wait()).await?;
        }
        let saved = pgctl.save_config();
        let source = format!(
            "host={} port={} user={} dbname=postgres",
            conninfo_quote(&primary.host),
            primary.port,
            conninfo_quote(&self.cfg.replication_user)
        );
        tracing::warn!(source = %source, "pg_rewind");
        let rewound = pgctl.rewind(&source, self.wait() * 3).await;
        // The node's own configuration goes back even when the rewind failed half-way.
        for (path, bytes) in &saved {
            pgctl.write_owned(path, bytes)?;
        }
        let out = rewound?;
        tracing::info!(output = %out.trim(), "pg_rewind done");
        pgctl.make_standby(conninfo)?;
        tracing::warn!("starting as a standby");
        pgctl.start(self.wait()).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fork_point_from_a_history_file() {
        let h = "1\t0/4022538\tno recovery target specified\n\n2\t0/5000000\tx\n";
        assert_eq!(fork_point(h, 1), Some(0x4022538));
        assert_eq!(fork_point(h, 2), Some(0x5000000));
        assert_eq!(fork_point(h, 3), None);
        assert_eq!(fork_point("# comment\n", 1), None);
    }
}
