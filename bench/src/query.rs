//! The two statements firehose runs — a primary-key read and an `INSERT ... RETURNING id` — in
//! each of the three wire forms (`--query-mode`), and the table they use (`--init`).

use rand::Rng;
use tokio_postgres::types::Type;
use tokio_postgres::{Client, SimpleQueryMessage, Statement};

use crate::classify;
use crate::cli::QueryMode;
use crate::error::{Error, Result};
use crate::stats::Op;

/// Payload of every inserted row (constant: no allocation per write).
const PAYLOAD: &str = "firehose";

/// SQL text for one table, built once per process.
pub struct Sql {
    table: String,
    rows: u64,
    read: String,
    read_simple_prefix: String,
    write: String,
    write_simple: String,
}

/// Statements prepared on one connection (`--query-mode prepared`).
pub struct Prepared {
    read: Statement,
    write: Statement,
}

/// A query that did not succeed.
pub enum QueryFailure {
    Pg(tokio_postgres::Error),
    /// The INSERT completed without returning its row: not an acknowledged write.
    NoRow,
}

impl QueryFailure {
    pub fn kind(&self) -> String {
        match self {
            QueryFailure::Pg(e) => classify::pg_error(e),
            QueryFailure::NoRow => "norow".into(),
        }
    }
    pub fn connection_survives(&self) -> bool {
        match self {
            QueryFailure::Pg(e) => classify::connection_survives(e),
            QueryFailure::NoRow => true,
        }
    }
}

impl From<tokio_postgres::Error> for QueryFailure {
    fn from(e: tokio_postgres::Error) -> Self {
        QueryFailure::Pg(e)
    }
}

impl Sql {
    /// `table` was checked to be a plain identifier by the command line parser.
    pub fn new(table: &str, rows: u64) -> Sql {
        Sql {
            table: table.to_string(),
            rows,
            read: format!("SELECT id, payload FROM {table} WHERE id = $1"),
            read_simple_prefix: format!("SELECT id, payload FROM {table} WHERE id = "),
            write: format!("INSERT INTO {table} (payload) VALUES ($1) RETURNING id"),
            write_simple: format!(
                "INSERT INTO {table} (payload) VALUES ('{PAYLOAD}') RETURNING id"
            ),
        }
    }

    pub async fn prepare(&self, client: &Client) -> std::result::Result<Prepared, QueryFailure> {
        Ok(Prepared {
            read: client.prepare_typed(&self.read, &[Type::INT8]).await?,
            write: client.prepare_typed(&self.write, &[Type::TEXT]).await?,
        })
    }

    /// Runs one query of kind `op`. This is the hot path: one allocation for the simple-mode
    /// read text (the key is part of it), none otherwise beyond tokio-postgres' own.
    pub async fn run(
        &self,
        client: &Client,
        mode: QueryMode,
        prepared: Option<&Prepared>,
        op: Op,
        rng: &mut impl Rng,
    ) -> std::result::Result<(), QueryFailure> {
        match op {
            Op::Read => {
                let id: i64 = rng.gen_range(1..=self.rows as i64);
                match (mode, prepared) {
                    (QueryMode::Prepared, Some(p)) => {
                        client.query_opt(&p.read, &[&id]).await?;
                    }
                    (QueryMode::Extended, _) | (QueryMode::Prepared, None) => {
                        client
                            .query_typed_opt(&self.read, &[(&id, Type::INT8)])
                            .await?;
                    }
                    (QueryMode::Simple, _) => {
                        let text = format!("{}{id}", self.read_simple_prefix);
                        client.simple_query(&text).await?;
                    }
                }
                Ok(())
            }
            Op::Write => {
                let acknowledged = match (mode, prepared) {
                    (QueryMode::Prepared, Some(p)) => {
                        client.query_opt(&p.write, &[&PAYLOAD]).await?.is_some()
                    }
                    (QueryMode::Extended, _) | (QueryMode::Prepared, None) => client
                        .query_typed_opt(&self.write, &[(&PAYLOAD, Type::TEXT)])
                        .await?
                        .is_some(),
                    (QueryMode::Simple, _) => client
                        .simple_query(&self.write_simple)
                        .await?
                        .iter()
                        .any(|m| matches!(m, SimpleQueryMessage::Row(_))),
                };
                if acknowledged {
                    Ok(())
                } else {
                    Err(QueryFailure::NoRow)
                }
            }
        }
    }

    /// `--init`: drops and recreates the table with `rows` rows (ids 1..=rows). Simple-protocol
    /// statements only, so it works through a transaction-pooling proxy too.
    pub async fn init(&self, client: &Client) -> Result<()> {
        let t = &self.table;
        let rows = self.rows;
        let ddl = format!(
            "DROP TABLE IF EXISTS {t};
             CREATE TABLE {t} (id bigserial PRIMARY KEY, payload text NOT NULL);
             INSERT INTO {t} (payload)
                 SELECT 'seed-' || g FROM generate_series(1, {rows}) AS g;
             ANALYZE {t};"
        );
        client
            .batch_execute(&ddl)
            .await
            .map_err(|e| Error::pg(format!("--init of table {t}"), e))
    }

    /// Fails clearly when the table is missing (a run without `--init` on a fresh database).
    pub async fn check_table(&self, client: &Client) -> Result<()> {
        let t = &self.table;
        let rows = client
            .simple_query(&format!("SELECT to_regclass('{t}') IS NOT NULL"))
            .await
            .map_err(|e| Error::pg("checking the table", e))?;
        let exists = rows.iter().any(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0) == Some("t"),
            _ => false,
        });
        if exists {
            Ok(())
        } else {
            Err(Error::Usage(format!(
                "table {t} does not exist: run once with --init"
            )))
        }
    }
}
