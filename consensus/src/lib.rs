//! Tidepool's control process and command line (`tidepool`).
//!
//! Today: bootstrapping a local cluster (`up`), inspecting it (`status`) and stopping it
//! (`down`). Topology, failover by consensus, switchover and backups will live here too
//! (see ../shared/DESIGN.md); nothing of them is pretended yet.

pub mod backup;
pub mod certs;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod control;
pub mod error;
pub mod install;
pub mod layout;
pub mod metrics;
pub mod password;
pub mod policy;
pub mod postgres;
pub mod privilege;
pub mod process;
pub mod state;
pub mod topology;

pub use error::{Error, Result};
