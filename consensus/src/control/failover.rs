//! Failover (the primary is gone) and switchover (planned), as DESIGN.md describes them:
//! a new term; recruits that pledged to it; the most advanced recruit by (timeline, WAL
//! position) promoted; the rest told to follow it.

use std::time::{Duration, Instant};

use shared::agent::{format_lsn, Report, Request, Role as NodeRole};

use super::{probe, Controller};
use crate::error::{Error, Result};

impl Controller {
    /// The next term: above every term any node pledged to and the one we know. Checked:
    /// reports carry terms within shared::agent::validate::MAX_TERM (probe.rs refuses others),
    /// and when even that is used up there is no next term rather than an overflow.
    fn next_term(&self, reports: &[probe::Probe]) -> Result<u64> {
        let highest = reports
            .iter()
            .filter_map(|r| r.as_ref().ok().map(|r| r.term))
            .chain([self.topo.term])
            .max()
            .unwrap_or(0);
        shared::agent::validate::next_term(highest).ok_or_else(|| {
            Error::Conflict(format!(
                "no term after {highest}: terms are used up (the highest is {})",
                shared::agent::validate::MAX_TERM
            ))
        })
    }

    /// Whether `recruited` (node names) may elect without the others: a majority of the
    /// cohort, and the rest cannot satisfy the durability policy on their own (so every
    /// acknowledged commit is on some recruit).
    /// While a reloaded policy is not yet the primary's, the one before must hold too.
    fn enough(&self, recruited: &[&str]) -> std::result::Result<(), String> {
        let cohort = crate::cluster::nodes::policy_nodes(&self.nodes);
        let chosen: Vec<&crate::policy::Node> = cohort
            .iter()
            .filter(|n| recruited.contains(&n.name.as_str()))
            .collect();
        let previous = self
            .previous_durability
            .iter()
            .map(|d| crate::config::ClusterSettings {
                durability: d.clone(),
                ..self.settings.clone()
            });
        for settings in std::iter::once(self.settings.clone()).chain(previous) {
            let policy = crate::cluster::nodes::policy(&settings).map_err(|e| e.to_string())?;
            policy
                .check_recruits(&cohort, &chosen)
                .map_err(|e| format!("durability {:?}: {e}", settings.durability))?;
        }
        Ok(())
    }

    /// Recruits every node for a new term, promotes the most advanced recruit, tells the
    /// others to follow it. `forced`: the operator's reason to go on without the proof.
    pub(super) async fn failover(
        &mut self,
        _reports: &[probe::Probe],
        forced: Option<String>,
        to: Option<&str>,
    ) -> Result<()> {
        let reports = probe::all(&self.key, &self.nodes, self.timers.agent_timeout_ms).await;
        let term = self.next_term(&reports)?;
        let old = self.primary_index();
        tracing::warn!(term, old_primary = %self.nodes[old].name, forced = forced.is_some(), "failover: recruiting");
        let started = Instant::now();
        let answers = probe::each(
            &self.key,
            &self.nodes,
            |_| Some(Request::Recruit { term }),
            self.timers.operation_timeout_ms,
        )
        .await;
        let recruits: Vec<(usize, Report)> = answers
            .into_iter()
            .enumerate()
            .filter_map(|(i, a)| match a {
                Some(Ok(r)) => Some((i, r)),
                Some(Err(e)) => {
                    tracing::warn!(node = %self.nodes[i].name, error = %e, "not recruited");
                    None
                }
                None => None,
            })
            .collect();
        // Only recruits that told us their WAL position count: a pledge from a node whose
        // Postgres is down keeps it from serving a lower term, but its data is out of reach,
        // so commits only it and the unrecruited nodes hold would be lost.
        let names: Vec<&str> = recruits
            .iter()
            .filter(|(_, r)| r.role != NodeRole::Down && r.flush_lsn.is_some())
            .map(|(i, _)| self.nodes[*i].name.as_str())
            .collect();
        if let Err(why) = self.enough(&names) {
            match &forced {
                Some(reason) => tracing::warn!(%why, %reason, "failover forced by the operator"),
                None => return Err(Error::Conflict(format!("term {term}: {why}"))),
            }
        }
        let candidate = recruits
            .iter()
            .filter(|(i, r)| {
                r.role == NodeRole::Standby
                    && *i != old
                    && to.is_none_or(|t| self.nodes[*i].name == t)
            })
            .max_by_key(|(_, r)| (r.timeline, r.flush_lsn.unwrap_or(0)));
        let Some((c, cr)) = candidate.cloned() else {
            return Err(Error::Conflict(format!(
                "term {term}: no recruited standby to promote{}",
                to.map(|t| format!(" named {t}")).unwrap_or_default()
            )));
        };
        if forced.is_none() {
            // The most advanced recruit must hold everything any recruit received.
            let best = recruits
                .iter()
                .filter_map(|(_, r)| r.flush_lsn)
                .max()
                .unwrap_or(0);
            if cr.flush_lsn.unwrap_or(0) < best
                && recruits.iter().any(|(i, r)| {
                    *i != old && r.role == NodeRole::Down && r.flush_lsn == Some(best)
                })
            {
                return Err(Error::Conflict(format!(
                    "term {term}: the most advanced recruit is down"
                )));
            }
        }
        self.promote(
            c,
            term,
            forced
                .as_deref()
                .unwrap_or("failover: the primary was lost"),
        )
        .await?;
        if let Some(reason) = &forced {
            self.record_override(term, reason).await?;
        }
        tracing::warn!(term, primary = %self.nodes[c].name, lsn = %cr.flush_lsn.map(format_lsn).unwrap_or_default(), took_ms = started.elapsed().as_millis() as u64, "failover: promoted");
        for i in 0..self.nodes.len() {
            if i != c {
                self.follow_in_background(i);
            }
        }
        Ok(())
    }

    async fn promote(&mut self, c: usize, term: u64, reason: &str) -> Result<()> {
        let sync_names =
            crate::cluster::nodes::sync_names(&self.settings, &self.nodes, &self.nodes[c].name)?;
        probe::call(
            &self.key,
            &self.nodes[c],
            Request::Promote { term, sync_names },
            self.timers.operation_timeout_ms * 4,
        )
        .await
        .map_err(|e| Error::Conflict(format!("promoting {}: {e}", self.nodes[c].name)))?;
        self.topo.term = self.topo.term.max(term);
        self.set_primary(self.nodes[c].name.clone(), term, reason)
            .await
    }

    /// Planned: fence the primary, let the target catch up with it, recruit the standbys,
    /// promote the target, the old primary follows. No acknowledged commit can be lost and
    /// in-flight transactions finish first (the agent drains before it fences).
    pub(super) async fn switchover(
        &mut self,
        reports: &[probe::Probe],
        to: Option<&str>,
    ) -> Result<()> {
        let old = self.primary_index();
        if !self.primary_healthy(&reports[old]) {
            return Err(Error::Conflict(format!(
                "primary {} is not healthy: no switchover (failover handles a lost primary)",
                self.nodes[old].name
            )));
        }
        let target = match to {
            Some(name) => self
                .node_index(name)
                .ok_or_else(|| Error::Conflict(format!("no node named {name}")))?,
            None => reports
                .iter()
                .enumerate()
                .filter(|(i, r)| {
                    *i != old && matches!(r, Ok(r) if r.role == NodeRole::Standby && r.streaming)
                })
                .max_by_key(|(_, r)| r.as_ref().ok().and_then(|r| r.replay_lsn).unwrap_or(0))
                .map(|(i, _)| i)
                .ok_or_else(|| Error::Conflict("no streaming standby to switch over to".into()))?,
        };
        if target == old {
            return Err(Error::Conflict(format!(
                "{} is already the primary",
                self.nodes[old].name
            )));
        }
        let term = self.next_term(reports)?;
        tracing::warn!(term, from = %self.nodes[old].name, to = %self.nodes[target].name, "switchover");
        // 1. Fence the primary: it drains, stops completing commits, reports its last WAL.
        let fenced = probe::call(
            &self.key,
            &self.nodes[old],
            Request::Recruit { term },
            self.timers.operation_timeout_ms,
        )
        .await
        .map_err(|e| Error::Conflict(format!("fencing {}: {e}", self.nodes[old].name)))?;
        let last = fenced.flush_lsn.unwrap_or(0);
        // 2. The target catches up with everything the primary wrote.
        let deadline = Instant::now() + Duration::from_millis(self.timers.operation_timeout_ms);
        loop {
            let r = probe::call(
                &self.key,
                &self.nodes[target],
                Request::Report,
                self.timers.agent_timeout_ms,
            )
            .await;
            if matches!(&r, Ok(r) if r.replay_lsn.unwrap_or(0) >= last) {
                break;
            }
            if Instant::now() >= deadline {
                // Give the primary back its role at the new term: nothing changed.
                let _ = self
                    .promote(
                        old,
                        term,
                        "switchover abandoned: the target did not catch up",
                    )
                    .await;
                return Err(Error::Conflict(format!(
                    "{} did not replay up to {} in time: switchover abandoned",
                    self.nodes[target].name,
                    format_lsn(last)
                )));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        // 3. The standbys pledge (and stop streaming), 4. the target is promoted.
        let answers = probe::each(
            &self.key,
            &self.nodes,
            |n| (n.name != self.nodes[old].name).then_some(Request::Recruit { term }),
            self.timers.operation_timeout_ms,
        )
        .await;
        if !matches!(answers[target], Some(Ok(_))) {
            let _ = self
                .promote(old, term, "switchover abandoned: the target did not pledge")
                .await;
            return Err(Error::Conflict(format!(
                "{} did not pledge to term {term}",
                self.nodes[target].name
            )));
        }
        self.promote(target, term, "switchover").await?;
        // 5. Everyone else follows.
        for i in 0..self.nodes.len() {
            if i != target {
                self.follow_in_background(i);
            }
        }
        Ok(())
    }
}
