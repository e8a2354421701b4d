//! The admin console (PgBouncer's `pgbouncer` database, here `admin_database`): a session of
//! simple-query commands (console.rs), what SHOW says (show.rs), SET (set.rs). What it reads
//! of the process, the clients and the paused databases, is the registry (registry.rs), which
//! the sessions and the metrics use too.

pub mod console;
mod set;
mod show;
mod table;
