//! After authentication, the checks Postgres makes when a backend starts (postinit.c), which the
//! gateway makes itself: its clients are served by pooled backends that logged in before a
//! `REVOKE CONNECT`, an `ALTER ROLE … NOLOGIN` or a connection limit, or as another client.
//! Same order, SQLSTATEs and words as Postgres 15:
//!
//! 1. `InitializeSessionUserId`: no such role (only under `trust`: password methods fail
//!    earlier), `NOLOGIN`, `rolconnlimit`;
//! 2. `CheckMyDatabase`: no such database, `datallowconn`, the CONNECT privilege,
//!    `datconnlimit`;
//! 3. then the gateway's own `max_user_clients` / `max_db_clients` (PgBouncer's
//!    `max_user_client_connections` / `max_db_client_connections`).
//!
//! Connection limits count this gateway process's logged-in clients (all its cores), not every
//! backend on the server as Postgres does: with several gateways, each allows the limit.

use crate::config::Config;
use crate::refusal::{fatal, Refusal};
use shared::protocol::backend::{self as be, Severity};
use shared::role::RoleInfo;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

/// Logged-in clients of this process by role and by database. A lock taken twice per client
/// life (login, logout), never per request.
/// Keyed by shared names: a client's `Admitted` holds the map's own key, so a session costs no
/// copy of its role's and database's names here.
#[derive(Default)]
struct Counts {
    roles: HashMap<Arc<str>, usize>,
    databases: HashMap<Arc<str>, usize>,
}

fn counts() -> MutexGuard<'static, Counts> {
    static COUNTS: OnceLock<Mutex<Counts>> = OnceLock::new();
    COUNTS
        .get_or_init(Mutex::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner())
}

/// A client admitted: counted for its role and database until dropped (the session ends).
pub struct Admitted {
    user: Arc<str>,
    database: Arc<str>,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut guard = counts();
        let c = &mut *guard;
        for (map, name) in [
            (&mut c.roles, &self.user),
            (&mut c.databases, &self.database),
        ] {
            if let Some(n) = map.get_mut(name) {
                *n -= 1;
                if *n == 0 {
                    map.remove(name);
                }
            }
        }
    }
}

/// Whether `user` (described by `info`) may start a session in `database`.
pub fn admit(
    cfg: &Config,
    user: &str,
    database: &str,
    info: &RoleInfo,
) -> Result<Admitted, Refusal> {
    if !info.exists {
        return Err(fatal("28000", &format!("role \"{user}\" does not exist")));
    }
    if !info.can_login {
        return Err(fatal(
            "28000",
            &format!("role \"{user}\" is not permitted to log in"),
        ));
    }
    let mut c = counts();
    let of_role = c.roles.get(user).copied().unwrap_or(0);
    let of_db = c.databases.get(database).copied().unwrap_or(0);
    // Postgres counts the new backend too (`CountUserBackends(roleid) > rolconnlimit`): with a
    // limit of n, n sessions are there and this one would be n + 1.
    if info.conn_limit >= 0 && !info.superuser && of_role >= info.conn_limit as usize {
        return Err(fatal(
            "53300",
            &format!("too many connections for role \"{user}\""),
        ));
    }
    let Some(db) = &info.database else {
        return Err(fatal(
            "3D000",
            &format!("database \"{database}\" does not exist"),
        ));
    };
    if !db.allow_connections {
        return Err(fatal(
            "55000",
            &format!("database \"{database}\" is not currently accepting connections"),
        ));
    }
    if !info.superuser && !db.connect {
        let mut e = Vec::new();
        be::error_response_detail(
            &mut e,
            Severity::Fatal,
            "42501",
            &format!("permission denied for database \"{database}\""),
            "User does not have CONNECT privilege.",
        );
        return Err(Refusal::Fatal(e));
    }
    if db.conn_limit >= 0 && !info.superuser && of_db >= db.conn_limit as usize {
        return Err(fatal(
            "53300",
            &format!("too many connections for database \"{database}\""),
        ));
    }
    if cfg.max_user_clients > 0 && of_role >= cfg.max_user_clients {
        return Err(fatal(
            "53300",
            &format!("too many client connections for role \"{user}\" (max_user_clients)"),
        ));
    }
    if cfg.max_db_clients > 0 && of_db >= cfg.max_db_clients {
        return Err(fatal(
            "53300",
            &format!("too many client connections for database \"{database}\" (max_db_clients)"),
        ));
    }
    Ok(Admitted {
        user: count_in(&mut c.roles, user),
        database: count_in(&mut c.databases, database),
    })
}

/// Counts one more client under `name`, and returns the map's key for it.
fn count_in(map: &mut HashMap<Arc<str>, usize>, name: &str) -> Arc<str> {
    if let Some((k, n)) = map.get_key_value(name) {
        let k = k.clone();
        let n = *n;
        map.insert(k.clone(), n + 1);
        return k;
    }
    let k: Arc<str> = Arc::from(name);
    map.insert(k.clone(), 1);
    k
}
