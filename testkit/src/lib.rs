//! Test harness of Tidepool: a real PostgreSQL 15 cluster, the pooler and the gateway on free
//! loopback ports, the real clients (psql, pgbench) and a raw protocol client to compare
//! Postgres and the gateway message for message. No mock of Postgres anywhere.
//!
//! ```no_run
//! use tidepool_testkit::{PgCluster, Tidepool, TidepoolOpts, ALICE, APP_DB};
//! let pg = PgCluster::start();
//! let tp = Tidepool::start(&pg, TidepoolOpts::default());
//! let direct = pg.direct().psql(ALICE.0, ALICE.1, APP_DB).command("select 1").run();
//! let through = tp.endpoint().psql(ALICE.0, ALICE.1, APP_DB).command("select 1").run();
//! assert_eq!(direct.text, through.text);
//! ```
//!
//! Environment: `TIDEPOOL_BIN_DIR` (use these binaries, build nothing),
//! `TIDEPOOL_KEEP_TEST_DIRS` (keep each cluster's temp dir with its logs),
//! `TIDEPOOL_TEST_LINK_TLS=1` (every pooler–gateway link over TLS, test certificates).

pub mod cli;
pub mod cluster;
pub mod endpoint;
pub mod etcd;
pub mod ports;
pub mod process;
pub mod replication;
pub mod sockets;
pub mod tidepool;
pub mod tls;
pub mod wire;

pub use cli::{pgbench, PgbenchSummary, Psql};
pub use cluster::{BackendWatch, PgCluster, UsersSample, UsersWatch, ALICE, APP_DB, BOB};
pub use endpoint::Endpoint;
pub use etcd::Etcd;
pub use ports::free_port;
pub use process::{run_merged, Live, Output};
pub use tidepool::{bin_dir, link_secret_args, link_secret_file, Gateway, Tidepool, TidepoolOpts};
pub use wire::{ConnectError, Event, Frontend, Message, Param, RawConn, ServerError};
