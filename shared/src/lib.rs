//! Code more than one Tidepool process needs: the Postgres wire protocol (no I/O), the link
//! protocol between gateway and pooler, and small async helpers that are runtime-agnostic.
pub mod agent;
pub mod auth;
pub mod io;
pub mod lifecycle;
pub mod link;
pub mod logging;
pub mod metrics_http;
pub mod protocol;
pub mod role;
pub mod settings;
pub mod sql;
pub mod tls;
