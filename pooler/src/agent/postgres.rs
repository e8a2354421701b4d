//! SQL against the node's own Postgres: over its Unix socket as the admin role, each call on
//! a fresh connection and bounded by the caller's deadline (a frozen Postgres accepts the
//! socket connection and then never answers: only a timer gets the agent out).

use shared::agent::{parse_lsn, Lsn, Replica, Role, Upstream};
use std::time::{Duration, Instant};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

/// One row of text values (NULL is `None`).
pub type Row = Vec<Option<String>>;

/// Where and as whom the agent logs in.
#[derive(Clone, Debug)]
pub struct Target {
    pub socket_dir: String,
    pub port: u16,
    pub user: String,
}

#[derive(Debug)]
pub enum PgError {
    /// The deadline passed: Postgres is frozen or overloaded.
    NotAnswering,
    /// Connection refused, login refused, SQL error.
    Failed(String),
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PgError::NotAnswering => f.write_str("not answering"),
            PgError::Failed(s) => f.write_str(s),
        }
    }
}

/// A connection to the local Postgres whose every call shares one deadline.
pub struct Conn {
    client: Client,
    deadline: Instant,
}

impl Target {
    /// Connects, giving up at `deadline`.
    pub async fn connect(&self, deadline: Instant) -> Result<Conn, PgError> {
        let mut config = tokio_postgres::Config::new();
        // A Unix socket directory, or (the new primary seen from a standby) a host name.
        if self.socket_dir.starts_with('/') {
            config.host_path(&self.socket_dir);
        } else {
            config.host(&self.socket_dir);
        }
        config
            .port(self.port)
            .user(&self.user)
            .dbname("postgres")
            .application_name("tidepool-agent")
            .connect_timeout(deadline.saturating_duration_since(Instant::now()));
        let fut = config.connect(NoTls);
        let (client, connection) = bounded(deadline, fut)
            .await?
            .map_err(|e| PgError::Failed(describe(&e)))?;
        // Dropped with the client: the task ends when the socket closes.
        tokio::task::spawn_local(async move {
            let _ = connection.await;
        });
        Ok(Conn { client, deadline })
    }
}

async fn bounded<T>(
    deadline: Instant,
    fut: impl std::future::Future<Output = T>,
) -> Result<T, PgError> {
    let left = deadline.saturating_duration_since(Instant::now());
    tokio::time::timeout(left, fut)
        .await
        .map_err(|_| PgError::NotAnswering)
}

/// The error with Postgres's own message when there is one.
fn describe(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} ({})", db.message(), db.code().code()),
        None => e.to_string(),
    }
}

impl Conn {
    /// Runs `sql` (simple protocol, may hold several statements); the rows of all of them.
    pub async fn rows(&self, sql: &str) -> Result<Vec<Row>, PgError> {
        let msgs = bounded(self.deadline, self.client.simple_query(sql))
            .await?
            .map_err(|e| PgError::Failed(describe(&e)))?;
        let mut out = Vec::new();
        for m in msgs {
            if let SimpleQueryMessage::Row(r) = m {
                out.push((0..r.len()).map(|i| r.get(i).map(str::to_string)).collect());
            }
        }
        Ok(out)
    }

    pub async fn exec(&self, sql: &str) -> Result<(), PgError> {
        self.rows(sql).await.map(|_| ())
    }

    /// The first column of the first row.
    pub async fn value(&self, sql: &str) -> Result<Option<String>, PgError> {
        Ok(self
            .rows(sql)
            .await?
            .into_iter()
            .next()
            .and_then(|r| r.into_iter().next().flatten()))
    }

    /// A new deadline for the calls that follow (a wait loop gives each probe its own).
    pub fn set_deadline(&mut self, deadline: Instant) {
        self.deadline = deadline;
    }

    /// `ALTER SYSTEM SET name = value` (or RESET when `None`), then a reload. One statement
    /// per query: ALTER SYSTEM refuses to run in the implicit transaction of a multi-statement
    /// query.
    pub async fn set_system(&self, settings: &[(&str, Option<&str>)]) -> Result<(), PgError> {
        for (name, value) in settings {
            let sql = match value {
                Some(v) => format!("ALTER SYSTEM SET {name} = {}", shared::settings::literal(v)),
                None => format!("ALTER SYSTEM RESET {name}"),
            };
            self.exec(&sql).await?;
        }
        self.exec("SELECT pg_reload_conf()").await
    }

    /// What Postgres says of its state (the SQL half of a report).
    pub async fn observe(&self) -> Result<Observed, PgError> {
        let head = self
            .rows(
                "SELECT pg_is_in_recovery()::text, current_setting('synchronous_standby_names'), \
                 current_setting('primary_conninfo'), current_setting('data_directory')",
            )
            .await?;
        let head = head.into_iter().next().unwrap_or_default();
        let col = |i: usize| head.get(i).cloned().flatten().unwrap_or_default();
        let mut o = Observed {
            sync_names: col(1),
            data_directory: col(3),
            ..Observed::default()
        };
        if col(0) == "true" {
            o.role = Role::Standby;
            o.upstream = conninfo_upstream(&col(2));
            let lsn = self
                .rows(
                    "SELECT pg_last_wal_receive_lsn()::text, pg_last_wal_replay_lsn()::text, \
                     (SELECT timeline_id::text FROM pg_control_checkpoint())",
                )
                .await?;
            let lsn = lsn.into_iter().next().unwrap_or_default();
            let get = |i: usize| lsn.get(i).cloned().flatten();
            o.replay_lsn = get(1).as_deref().and_then(parse_lsn);
            // Nothing received since start: what was replayed is what it holds.
            o.flush_lsn = get(0).as_deref().and_then(parse_lsn).max(o.replay_lsn);
            o.timeline = get(2).and_then(|t| t.parse().ok()).unwrap_or(0);
            let recv = self
                .rows(
                    "SELECT status, received_tli::text, \
                     (extract(epoch FROM now() - last_msg_receipt_time) * 1000)::bigint::text \
                     FROM pg_stat_wal_receiver",
                )
                .await?;
            if let Some(r) = recv.into_iter().next() {
                let get = |i: usize| r.get(i).cloned().flatten();
                o.streaming = get(0).as_deref() == Some("streaming");
                let tli: u32 = get(1).and_then(|t| t.parse().ok()).unwrap_or(0);
                o.timeline = o.timeline.max(tli);
                o.receipt_age_ms = get(2)
                    .and_then(|t| t.parse::<i64>().ok())
                    .map(|ms| ms.max(0) as u64);
            }
        } else {
            o.role = Role::Primary;
            let lsn = self
                .rows(
                    "SELECT pg_current_wal_flush_lsn()::text, \
                     pg_walfile_name(pg_current_wal_flush_lsn())",
                )
                .await?;
            let lsn = lsn.into_iter().next().unwrap_or_default();
            o.flush_lsn = lsn
                .first()
                .cloned()
                .flatten()
                .as_deref()
                .and_then(parse_lsn);
            o.replay_lsn = o.flush_lsn;
            // The first 8 hex digits of a WAL file name are its timeline.
            o.timeline = lsn
                .get(1)
                .cloned()
                .flatten()
                .and_then(|w| u32::from_str_radix(w.get(..8)?, 16).ok())
                .unwrap_or(0);
            let reps = self
                .rows(
                    "SELECT application_name, state, flush_lsn::text, replay_lsn::text, sync_state \
                     FROM pg_stat_replication ORDER BY application_name",
                )
                .await?;
            o.replicas = reps
                .into_iter()
                .map(|r| {
                    let get = |i: usize| r.get(i).cloned().flatten();
                    Replica {
                        name: get(0).unwrap_or_default(),
                        state: get(1).unwrap_or_default(),
                        flush_lsn: get(2).as_deref().and_then(parse_lsn),
                        replay_lsn: get(3).as_deref().and_then(parse_lsn),
                        sync_state: get(4).unwrap_or_default(),
                    }
                })
                .collect();
        }
        Ok(o)
    }
}

/// The SQL half of a report.
#[derive(Debug, Clone)]
pub struct Observed {
    pub role: Role,
    pub timeline: u32,
    pub flush_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
    pub streaming: bool,
    pub receipt_age_ms: Option<u64>,
    pub upstream: Option<Upstream>,
    pub replicas: Vec<Replica>,
    pub sync_names: String,
    pub data_directory: String,
}

impl Default for Observed {
    fn default() -> Self {
        Observed {
            role: Role::Down,
            timeline: 0,
            flush_lsn: None,
            replay_lsn: None,
            streaming: false,
            receipt_age_ms: None,
            upstream: None,
            replicas: Vec::new(),
            sync_names: String::new(),
            data_directory: String::new(),
        }
    }
}

/// `host` and `port` of a libpq conninfo string (`key=value`, values optionally in single
/// quotes with `\` escapes); `None` without a host. Port defaults to 5432 as in libpq.
pub fn conninfo_upstream(conninfo: &str) -> Option<Upstream> {
    let (mut host, mut port) = (None, 5432u16);
    for (k, v) in conninfo_pairs(conninfo) {
        match k.as_str() {
            "host" => host = Some(v),
            "port" => port = v.parse().unwrap_or(5432),
            _ => {}
        }
    }
    host.filter(|h| !h.is_empty())
        .map(|host| Upstream { host, port })
}

fn conninfo_pairs(s: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut it = s.chars().peekable();
    loop {
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        let mut key = String::new();
        while let Some(&c) = it.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            it.next();
        }
        if key.is_empty() {
            return out;
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        if it.next() != Some('=') {
            return out;
        }
        while it.peek().is_some_and(|c| c.is_whitespace()) {
            it.next();
        }
        let mut val = String::new();
        if it.peek() == Some(&'\'') {
            it.next();
            while let Some(c) = it.next() {
                match c {
                    '\\' => {
                        if let Some(n) = it.next() {
                            val.push(n);
                        }
                    }
                    '\'' => break,
                    c => val.push(c),
                }
            }
        } else {
            while let Some(&c) = it.peek() {
                if c.is_whitespace() {
                    break;
                }
                val.push(c);
                it.next();
            }
        }
        out.push((key, val));
    }
}

/// A conninfo value in single quotes (libpq: `\` escapes `'` and `\`).
pub fn conninfo_quote(v: &str) -> String {
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// Bounded wait: runs `check` every `every` until it returns `Ok(true)` or `deadline` passes.
pub async fn wait_until<F, Fut>(deadline: Instant, every: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    loop {
        if check().await {
            return true;
        }
        if Instant::now() + every > deadline {
            return false;
        }
        tokio::time::sleep(every).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conninfo_host_and_port() {
        assert_eq!(
            conninfo_upstream("host=127.0.0.1 port=5433 user=postgres application_name=n2"),
            Some(Upstream {
                host: "127.0.0.1".into(),
                port: 5433
            })
        );
        assert_eq!(
            conninfo_upstream("user=postgres host = '/tmp/my dir\\'s' port='6000'"),
            Some(Upstream {
                host: "/tmp/my dir's".into(),
                port: 6000
            })
        );
        assert_eq!(conninfo_upstream(""), None);
        assert_eq!(conninfo_upstream("port=5"), None);
        let q = conninfo_quote("/a b/'c\\");
        assert_eq!(
            conninfo_upstream(&format!("host={q}")).map(|u| u.host),
            Some("/a b/'c\\".to_string())
        );
    }
}
