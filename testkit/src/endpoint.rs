//! Something a client can connect to: Postgres directly, or the gateway.

use std::time::Duration;

use crate::cli::Psql;
use crate::wire::{ConnectError, RawConn};

/// A TCP address a Postgres client logs in at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
}

impl Endpoint {
    pub fn loopback(port: u16) -> Endpoint {
        Endpoint {
            host: "127.0.0.1".to_string(),
            port,
        }
    }

    /// `postgres://user:password@host:port/db` (test passwords need no escaping).
    pub fn url(&self, user: &str, password: &str, db: &str) -> String {
        format!(
            "postgres://{user}:{password}@{}:{}/{db}",
            self.host, self.port
        )
    }

    pub fn pg_config(&self, user: &str, password: &str, db: &str) -> tokio_postgres::Config {
        let mut config = tokio_postgres::Config::new();
        config
            .host(&self.host)
            .port(self.port)
            .user(user)
            .password(password)
            .dbname(db)
            .connect_timeout(Duration::from_secs(10));
        config
    }

    /// Logs in with tokio-postgres and drives the connection on a spawned task.
    pub async fn connect(
        &self,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, connection) = self
            .pg_config(user, password, db)
            .connect(tokio_postgres::NoTls)
            .await?;
        tokio::spawn(async move {
            // The connection ends with an error when a test kills a server; that is for the
            // test to notice through the client.
            let _ = connection.await;
        });
        Ok(client)
    }

    /// Logs in with the raw protocol client.
    pub async fn raw(&self, user: &str, password: &str, db: &str) -> Result<RawConn, ConnectError> {
        RawConn::connect(&self.host, self.port, user, password, db).await
    }

    /// A TCP connection with nothing sent yet (see [`RawConn::tcp`]).
    pub async fn raw_tcp(&self) -> std::io::Result<RawConn> {
        RawConn::tcp(&self.host, self.port).await
    }

    pub fn psql(&self, user: &str, password: &str, db: &str) -> Psql {
        Psql::new(self, user, password, db)
    }
}
