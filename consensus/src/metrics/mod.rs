//! The control process's Prometheus metrics (docs/metrics.md lists every one): what it knows
//! of the cluster — nodes by role and health, the term, failovers, replication lag, the
//! topology store, backups.
//!
//! The control loop writes plain atomics after each look at the nodes; an HTTP server on a
//! thread of its own (`http.rs`) encodes them on each scrape, so a scrape never waits for the
//! control loop and the control loop never waits for a scrape. Backup facts come from
//! `pgbackrest info`, run every [`backup::REFRESH`] on a third thread (`backup.rs`).

pub mod backup;
pub mod http;

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use shared::agent::{Report, Role as NodeRole};

/// A node's role as the control process sees it: what its agent reports, or `unreachable`
/// when the agent did not answer.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum RoleLabel {
    primary,
    standby,
    down,
    unreachable,
}

impl RoleLabel {
    pub const ALL: [RoleLabel; 4] = [
        RoleLabel::primary,
        RoleLabel::standby,
        RoleLabel::down,
        RoleLabel::unreachable,
    ];

    fn of(report: &Result<Report, String>) -> RoleLabel {
        match report {
            Ok(r) => match r.role {
                NodeRole::Primary => RoleLabel::primary,
                NodeRole::Standby => RoleLabel::standby,
                NodeRole::Down => RoleLabel::down,
            },
            Err(_) => RoleLabel::unreachable,
        }
    }
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct NodeRoleLabels {
    pub node: String,
    pub role: RoleLabel,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RoleLabels {
    pub role: RoleLabel,
}

/// How a failover came about.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum Trigger {
    /// The control process found the primary lost.
    automatic,
    /// `tidepool failover --force`.
    forced,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabels {
    pub trigger: Trigger,
}

/// How a reload (SIGHUP) went.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum ReloadResult {
    /// The files were read; what can change live was applied.
    ok,
    /// A file could not be read or parsed: nothing changed.
    error,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReloadLabels {
    pub result: ReloadResult,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    /// `file` or `etcd`.
    pub store: String,
}

/// Every metric of the control process. Cheap to clone (each metric is an `Arc` inside).
#[derive(Debug, Clone)]
pub struct ControlMetrics {
    pub leader: Gauge,
    pub term: Gauge,
    pub primary_term: Gauge,
    pub nodes: Family<RoleLabels, Gauge>,
    pub node_role: Family<NodeRoleLabels, Gauge>,
    pub node_healthy: Family<NodeLabels, Gauge>,
    pub lag_bytes: Family<NodeLabels, Gauge>,
    pub receipt_age: Family<NodeLabels, Gauge<f64, AtomicU64>>,
    pub failovers: Family<TriggerLabels, Counter>,
    pub failover_failures: Counter,
    pub switchovers: Counter,
    pub failover_duration: Histogram,
    pub store_up: Family<StoreLabels, Gauge>,
    pub store_errors: Family<StoreLabels, Counter>,
    pub config_reloads: Family<ReloadLabels, Counter>,
    pub config_not_applied: Gauge,
    store: StoreLabels,
}

impl ControlMetrics {
    /// The metrics and the registry that encodes them. `store` is `file` or `etcd`;
    /// `backups`: the backup collector, when the cluster has backups.
    pub fn new(store: &str, backups: Option<Arc<backup::BackupCollector>>) -> (Self, Registry) {
        let m = ControlMetrics {
            leader: Gauge::default(),
            term: Gauge::default(),
            primary_term: Gauge::default(),
            nodes: Family::default(),
            node_role: Family::default(),
            node_healthy: Family::default(),
            lag_bytes: Family::default(),
            receipt_age: Family::default(),
            failovers: Family::default(),
            failover_failures: Counter::default(),
            switchovers: Counter::default(),
            // From a quick kill -9 failover (~1-2 s) to one bounded by the operation timeouts.
            failover_duration: Histogram::new([0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0]),
            store_up: Family::default(),
            store_errors: Family::default(),
            config_reloads: Family::default(),
            config_not_applied: Gauge::default(),
            store: StoreLabels {
                store: store.to_string(),
            },
        };
        // Series that exist from the start, so a rate() or an alert sees a 0 before the first
        // event rather than nothing.
        for trigger in [Trigger::automatic, Trigger::forced] {
            let _ = m.failovers.get_or_create(&TriggerLabels { trigger });
        }
        let _ = m.store_errors.get_or_create(&m.store);
        for result in [ReloadResult::ok, ReloadResult::error] {
            let _ = m.config_reloads.get_or_create(&ReloadLabels { result });
        }

        let mut r = Registry::default();
        r.register(
            "tidepool_control_leader",
            "1 when this control process leads the cluster (acts on it), else 0",
            m.leader.clone(),
        );
        r.register(
            "tidepool_term",
            "The highest term the topology records",
            m.term.clone(),
        );
        r.register(
            "tidepool_primary_term",
            "The term at which the current primary was promoted (0: the bootstrap primary)",
            m.primary_term.clone(),
        );
        r.register(
            "tidepool_nodes",
            "Nodes of the cohort by the role their agent reports (unreachable: no answer)",
            m.nodes.clone(),
        );
        r.register(
            "tidepool_node_role",
            "1 for each node's current role, 0 for its other roles",
            m.node_role.clone(),
        );
        r.register(
            "tidepool_node_healthy",
            "1 when the node serves its part: the primary of the current term, or a standby \
             streaming from it and not stopped by a recruit",
            m.node_healthy.clone(),
        );
        r.register(
            "tidepool_replication_lag_bytes",
            "Bytes of WAL a standby has yet to replay behind the primary's flush position",
            m.lag_bytes.clone(),
        );
        r.register(
            "tidepool_replication_receipt_age_seconds",
            "Seconds since a standby's WAL receiver last heard from the primary",
            m.receipt_age.clone(),
        );
        // prometheus-client adds `_total` to counters.
        r.register(
            "tidepool_failovers",
            "Failovers this control process completed (a standby promoted at a new term)",
            m.failovers.clone(),
        );
        r.register(
            "tidepool_failover_failures",
            "Failover attempts that promoted nobody (no majority, policy not satisfiable, ...)",
            m.failover_failures.clone(),
        );
        r.register(
            "tidepool_switchovers",
            "Planned switchovers this control process completed",
            m.switchovers.clone(),
        );
        r.register(
            "tidepool_failover_duration_seconds",
            "Seconds from the decision to fail over to the new primary's promotion",
            m.failover_duration.clone(),
        );
        r.register(
            "tidepool_topology_store_up",
            "1 when the last call to the topology store succeeded, else 0",
            m.store_up.clone(),
        );
        r.register(
            "tidepool_topology_store_errors",
            "Calls to the topology store that failed or timed out",
            m.store_errors.clone(),
        );
        r.register(
            "tidepool_control_config_reloads",
            "Reloads (SIGHUP) of the control process's config, by result",
            m.config_reloads.clone(),
        );
        r.register(
            "tidepool_control_config_keys_not_applied",
            "Keys the config files set otherwise than what the control process runs with",
            m.config_not_applied.clone(),
        );
        if let Some(b) = backups {
            r.register_collector(Box::new(b));
        }
        (m, r)
    }

    /// After each call to the topology store.
    pub fn store_result(&self, ok: bool) {
        self.store_up.get_or_create(&self.store).set(i64::from(ok));
        if !ok {
            self.store_errors.get_or_create(&self.store).inc();
        }
    }

    /// This process does not lead: it knows nothing current of the nodes, so it says nothing
    /// of them (the leader's metrics are the ones to read).
    pub fn not_leading(&self) {
        self.leader.set(0);
        self.nodes.clear();
        self.node_role.clear();
        self.node_healthy.clear();
        self.lag_bytes.clear();
        self.receipt_age.clear();
    }

    /// After a look at every node, as the leader. `primary`: the node the topology names.
    pub fn observe(
        &self,
        names: &[String],
        reports: &[Result<Report, String>],
        primary: Option<&str>,
        term: u64,
        primary_term: u64,
    ) {
        self.leader.set(1);
        self.term.set(term as i64);
        self.primary_term.set(primary_term as i64);
        let primary_report = names
            .iter()
            .zip(reports)
            .find(|(n, _)| Some(n.as_str()) == primary)
            .and_then(|(_, r)| r.as_ref().ok());
        let primary_lsn = primary_report.and_then(|r| r.flush_lsn);
        let primary_port = primary_report.map(|r| r.pg_port);
        let mut counts = [0i64; 4];
        for (name, report) in names.iter().zip(reports) {
            let role = RoleLabel::of(report);
            for r in RoleLabel::ALL {
                self.node_role
                    .get_or_create(&NodeRoleLabels {
                        node: name.clone(),
                        role: r,
                    })
                    .set(i64::from(r == role));
            }
            if let Some(i) = RoleLabel::ALL.iter().position(|r| *r == role) {
                counts[i] += 1;
            }
            let node = NodeLabels { node: name.clone() };
            let healthy = match report {
                Ok(r) if Some(name.as_str()) == primary => {
                    r.role == NodeRole::Primary && r.primary_term >= primary_term && !r.recruited
                }
                Ok(r) => {
                    r.role == NodeRole::Standby
                        && r.streaming
                        && !r.recruited
                        && r.upstream.as_ref().map(|u| u.port) == primary_port
                }
                Err(_) => false,
            };
            self.node_healthy
                .get_or_create(&node)
                .set(i64::from(healthy));
            match report {
                Ok(r) if r.role == NodeRole::Standby => {
                    match primary_lsn.zip(r.replay_lsn) {
                        Some((p, l)) => {
                            self.lag_bytes
                                .get_or_create(&node)
                                .set(p.saturating_sub(l) as i64);
                        }
                        None => {
                            self.lag_bytes.remove(&node);
                        }
                    }
                    match r.receipt_age_ms {
                        Some(ms) => {
                            self.receipt_age
                                .get_or_create(&node)
                                .set(Duration::from_millis(ms).as_secs_f64());
                        }
                        None => {
                            self.receipt_age.remove(&node);
                        }
                    }
                }
                _ => {
                    self.lag_bytes.remove(&node);
                    self.receipt_age.remove(&node);
                }
            }
        }
        for (i, role) in RoleLabel::ALL.into_iter().enumerate() {
            self.nodes
                .get_or_create(&RoleLabels { role })
                .set(counts[i]);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use shared::agent::Upstream;

    use super::*;

    fn report(node: &str, role: NodeRole, lsn: u64, upstream_port: Option<u16>) -> Report {
        Report {
            node: node.into(),
            zone: "local".into(),
            role,
            term: 3,
            primary_term: 2,
            timeline: 2,
            flush_lsn: Some(lsn),
            replay_lsn: Some(lsn),
            streaming: upstream_port.is_some(),
            receipt_age_ms: upstream_port.map(|_| 1500),
            upstream: upstream_port.map(|port| Upstream {
                host: "/tmp".into(),
                port,
            }),
            replicas: Vec::new(),
            postgres_pid: Some(1),
            pg_port: 5433,
            sync_names: String::new(),
            recruited: false,
            problem: None,
        }
    }

    fn encoded(registry: &Registry) -> String {
        let mut out = String::new();
        prometheus_client::encoding::prometheus_text::encode(&mut out, registry).unwrap();
        out
    }

    fn sample(text: &str, series: &str) -> Option<String> {
        text.lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')
                .map(str::to_string)
        })
    }

    #[test]
    fn roles_health_and_lag_of_one_look() {
        let (m, registry) = ControlMetrics::new("file", None);
        let names: Vec<String> = ["node1", "node2", "node3"].map(String::from).into();
        let reports = vec![
            Ok(report("node1", NodeRole::Primary, 1000, None)),
            Ok(report("node2", NodeRole::Standby, 400, Some(5433))),
            Err("node3: connection refused".to_string()),
        ];
        m.observe(&names, &reports, Some("node1"), 3, 2);
        let text = encoded(&registry);
        let at = |s: &str| sample(&text, s).unwrap_or_else(|| panic!("no {s} in\n{text}"));
        assert_eq!(at("tidepool_term"), "3");
        assert_eq!(at("tidepool_nodes{role=\"unreachable\"}"), "1");
        assert_eq!(
            at("tidepool_node_role{node=\"node3\",role=\"unreachable\"}"),
            "1"
        );
        assert_eq!(at("tidepool_node_healthy{node=\"node1\"}"), "1");
        assert_eq!(at("tidepool_node_healthy{node=\"node2\"}"), "1");
        assert_eq!(at("tidepool_node_healthy{node=\"node3\"}"), "0");
        assert_eq!(at("tidepool_replication_lag_bytes{node=\"node2\"}"), "600");
        assert_eq!(
            at("tidepool_replication_receipt_age_seconds{node=\"node2\"}"),
            "1.5"
        );
        assert_eq!(
            sample(&text, "tidepool_replication_lag_bytes{node=\"node1\"}"),
            None
        );

        // A standby streaming from elsewhere is not healthy; a lost leadership says nothing
        // of the nodes.
        let reports = vec![
            Ok(report("node1", NodeRole::Primary, 1000, None)),
            Ok(report("node2", NodeRole::Standby, 1000, Some(9999))),
            Err("down".to_string()),
        ];
        m.observe(&names, &reports, Some("node1"), 3, 2);
        let text = encoded(&registry);
        assert_eq!(
            sample(&text, "tidepool_node_healthy{node=\"node2\"}").as_deref(),
            Some("0")
        );
        m.not_leading();
        let text = encoded(&registry);
        assert_eq!(
            sample(&text, "tidepool_control_leader").as_deref(),
            Some("0")
        );
        assert!(!text.contains("tidepool_node_role{"), "{text}");
    }

    #[test]
    fn docs_metrics_md_lists_exactly_the_metrics_there_are() {
        let backups = Arc::new(backup::BackupCollector::new());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        backups.set(backup::Snapshot {
            repo_up: Some(true),
            by_type: [("full".to_string(), (1, now))].into_iter().collect(),
            schedule_failure_at: Some(now),
        });
        let (m, registry) = ControlMetrics::new("file", Some(backups));
        m.store_result(true);
        m.observe(
            &["node1".to_string(), "node2".to_string()],
            &[
                Ok(report("node1", NodeRole::Primary, 10, None)),
                Ok(report("node2", NodeRole::Standby, 10, Some(5433))),
            ],
            Some("node1"),
            1,
            1,
        );
        let exposed = shared::metrics_http::exposed_names(&encoded(&registry));
        assert_eq!(exposed, documented());
    }

    fn documented() -> BTreeSet<String> {
        // The gateway's and the pooler's have their own tests (their crates).
        shared::metrics_http::documented_names(include_str!("../../../docs/metrics.md"), |n| {
            n.starts_with("tidepool_")
                && !n.starts_with("tidepool_gateway_")
                && !n.starts_with("tidepool_pooler_")
        })
    }

    #[test]
    fn the_grafana_dashboard_uses_only_documented_metrics() {
        let dashboard: serde_json::Value = serde_json::from_str(include_str!(
            "../../../config/grafana/tidepool-control.json"
        ))
        .expect("the dashboard is JSON");
        let documented = documented();
        let mut used = BTreeSet::new();
        for panel in dashboard["panels"].as_array().expect("panels") {
            for target in panel["targets"].as_array().expect("targets") {
                let expr = target["expr"].as_str().expect("expr");
                for word in expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
                    if word.starts_with("tidepool_") {
                        let name = word.strip_suffix("_bucket").unwrap_or(word);
                        assert!(documented.contains(name), "{name} in {expr}");
                        used.insert(name.to_string());
                    }
                }
            }
        }
        // Every documented metric is on the dashboard.
        assert_eq!(used, documented);
    }
}
