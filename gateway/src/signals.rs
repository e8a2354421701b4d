//! `pg_cancel_backend(pid)` and `pg_terminate_backend(pid)` of a session's pid, as its client
//! knows it (issue 11): the pid of the `BackendKeyData` the gateway sent, which is no process
//! Postgres knows. Through Tidepool such a call must cancel that session's query or end that
//! session, answer `true`, or refuse with 42501, exactly where it does directly. See
//! docs/decisions/2026-12-07-signals-to-virtual-pids.md.
//!
//! The pids the gateway gives out lie at or above `FIRST_VIRTUAL` (2²²): Linux's `pid_max` is at
//! most 2²², so a virtual pid is never a real process and a real pid never a session's.
//!
//! Postgres 15's `pg_signal_backend()` (signalfuncs.c) judges the caller by its current role
//! (`GetUserId()`, which `SET ROLE` and `SET SESSION AUTHORIZATION` change) and the target by
//! the role its backend logged in as: a superuser's backend only by a superuser
//! (`superuser()`), any other by a role with the privileges of the target's role or of
//! `pg_signal_backend` (`has_privs_of_role`, which superusers pass). Only the server knows the
//! current role and the memberships, so the server decides, in the statement itself:
//! - the caller's own pid becomes `pg_catalog.pg_backend_pid()`: the backend serving the
//!   statement logged in as the session's role, so Postgres checks and signals it itself, as
//!   directly (a cancel stops the very statement, a termination ends the session with its
//!   backend's FATAL);
//! - another session's pid (of this gateway process, or of another one on the port:
//!   `pid_registry`) becomes a `CASE` on Postgres's conditions: where Postgres would refuse, an
//!   error the pooler shows as Postgres's own 42501 (`denied`); where it would signal,
//!   `pg_catalog.pg_cancel_backend(MARKER) IS NOT NULL`, whose warning for a negative pid is
//!   the server's word that it allowed the call. The pooler hands that warning to the gateway
//!   in its place (`down::SIGNAL`) and the gateway sends the signal through the poolers, as a
//!   client's `CancelRequest` goes. So nothing is signalled for a call the server did not reach
//!   (`WHERE false`, a failed transaction, an earlier error). A termination with a timeout
//!   (`pg_terminate_backend(pid, 500)`) returns only once its target is gone, or warns and
//!   answers `false`, as Postgres does (terminate_wait.rs).
//!
//! The marker is not a secret: a client may call `pg_cancel_backend(MARKER)` itself and so
//! claim the server allowed a call it never checked. The gateway therefore sends a signal only
//! to a session the caller's *login* role could signal by some role it may become (`SET ROLE`
//! to any role it is a member of: that role, `pg_signal_backend`, or a superuser among them):
//! a forged marker gains nothing a `SET ROLE` would not. The memberships are those looked up at
//! login; where they do not reach the target, the marker is `recheck`ed: the session's
//! responses wait while the gateway looks the role up again past the pooler's cache
//! (memberships granted since), and a marker it still cannot believe answers as a pid the
//! server does not know (`unknown_pid`, session_io.rs).
//!
//! SQL `PREPARE`/`EXECUTE` in a `Query` are read as `Parse`/`Bind` are (sql.rs).
//!
//! Where the pid is a constant (`pg_terminate_backend(12345678)`) the role and the marker are
//! written into the text. Where it is a parameter (`$1`, as drivers send a pid they hold), the
//! text tests the value, and each `Bind` carries the gateway's reading of it instead of a
//! session's pid: `PARAM_OWN`, `PARAM_SUPERUSER`, or `PARAM_OWN - oid` of the target's role;
//! those values are the markers too. Every other pid is left to the server: real pids behave
//! as directly, and a pid that is nobody's gets Postgres's own `false` and warning. The result
//! column keeps the call's name (a scalar subquery takes its column's name).

mod sql;

use crate::statement_names;
use shared::protocol::frontend as fe;
use shared::sql::{contains_ci, find_ci, Kind, Lexer, Token};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// The lowest virtual pid: above any real one (`PID_MAX_LIMIT` is 2²² on 64-bit Linux).
pub const FIRST_VIRTUAL: i32 = 1 << 22;

/// Markers and the values a `Bind` carries instead of a session's pid: negative, so never a
/// process's pid (Postgres answers them with its warning). For a parameter: the caller's own
/// session, a superuser's session, and `PARAM_OWN - oid` for a session of the role with that
/// oid (`2 ..= MAX_OID`). For a constant: `CONST_BASE - n`, `n` counting the session's
/// constant calls modulo 2²⁰ (each call its own marker). Both ranges are far from any pid a
/// client would write.
const PARAM_OWN: i32 = -(1 << 30) - 1;
const PARAM_SUPERUSER: i32 = PARAM_OWN - 1;
const MAX_OID: u32 = (1 << 30) - 1;
const CONST_BASE: i32 = -(1 << 29);
const CONST_SPAN: u32 = 1 << 20;
// Every parameter value fits an `integer`, and the two ranges do not meet.
const _: () = assert!(
    PARAM_OWN as i64 - MAX_OID as i64 == i32::MIN as i64
        && PARAM_SUPERUSER < CONST_BASE - CONST_SPAN as i32
);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signal {
    Cancel,
    Terminate,
}

impl Signal {
    fn function(self) -> &'static str {
        match self {
            Signal::Cancel => "pg_cancel_backend",
            Signal::Terminate => "pg_terminate_backend",
        }
    }
}

/// A session of this process: what `pg_signal_backend()` checks of it as a target, what the
/// gateway checks of it as a caller (see the module doc), and the keys to reach it.
struct Target {
    user: String,
    superuser: bool,
    secret: i32,
    /// The role's `pg_authid.oid` (0: not known).
    oid: u32,
    /// The roles the login role is a member of besides itself (`None`: none or not known).
    member_of: Option<Box<[String]>>,
    /// The login role is a superuser or a member of one: it may become one.
    can_be_superuser: bool,
}

/// The sessions of this process by virtual pid (every core's: a client may signal a session on
/// another core); those of the other gateway processes on the port are in `pid_registry`.
/// Touched at login, logout and by signalling calls only.
static SESSIONS: Mutex<Option<HashMap<i32, Target>>> = Mutex::new(None);

fn sessions() -> MutexGuard<'static, Option<HashMap<i32, Target>>> {
    // Nothing panics while holding it; a poisoned map is still a consistent map.
    SESSIONS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A session's place in the registry, for as long as it lives.
pub struct Registration {
    pub pid: i32,
    /// Also in the table shared with the other gateway processes on this port.
    shared: bool,
}

impl Registration {
    /// A new virtual pid for a session of `user` whose cancel key is `secret`: free in this
    /// process, and in the table shared with the other processes on the port while it has room.
    pub fn new(user: &str, secret: i32) -> Registration {
        let mut m = sessions();
        let m = m.get_or_insert_with(HashMap::new);
        let table = crate::pid_registry::table();
        let mut tries = 0;
        loop {
            let pid = match table {
                // Low in the shared table: the pages it keeps resident follow the sessions.
                Some(_) if tries < crate::pid_registry::TRIES => crate::pid_registry::draw(
                    crate::pid_registry::window(m.len(), tries),
                    FIRST_VIRTUAL,
                ),
                _ => {
                    let span = (i32::MAX - FIRST_VIRTUAL) as u32;
                    FIRST_VIRTUAL + (rand::random::<u32>() % span) as i32
                }
            };
            if m.contains_key(&pid) {
                continue;
            }
            let shared = match table {
                Some(t) if tries < crate::pid_registry::TRIES => {
                    tries += 1;
                    if !t.claim(pid, user, secret) {
                        continue;
                    }
                    true
                }
                _ => false,
            };
            m.insert(
                pid,
                Target {
                    user: user.to_string(),
                    superuser: false,
                    secret,
                    oid: 0,
                    member_of: None,
                    can_be_superuser: false,
                },
            );
            return Registration { pid, shared };
        }
    }

    /// What the login's `ParameterStatus` messages say (`is_superuser`), and what the pooler's
    /// role lookup said of the role (its oid and memberships).
    pub fn logged_in(&self, parameter_status: &[u8], role: &shared::role::RoleInfo) {
        let superuser = is_superuser(parameter_status);
        if let Some(t) = sessions().as_mut().and_then(|m| m.get_mut(&self.pid)) {
            t.superuser = superuser;
            t.oid = role.oid;
            set_memberships(t, role);
        }
        if let (true, Some(t)) = (self.shared, crate::pid_registry::table()) {
            t.set_role(self.pid, superuser, role.oid);
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(m) = sessions().as_mut() {
            m.remove(&self.pid);
        }
        if let (true, Some(t)) = (self.shared, crate::pid_registry::table()) {
            t.release(self.pid);
        }
    }
}

/// `is_superuser = on` among raw `ParameterStatus` messages.
fn is_superuser(msgs: &[u8]) -> bool {
    let mut i = 0;
    while i + 5 <= msgs.len() {
        let len = u32::from_be_bytes([msgs[i + 1], msgs[i + 2], msgs[i + 3], msgs[i + 4]]) as usize;
        let end = (i + 1 + len.max(4)).min(msgs.len());
        if msgs[i] == b'S' {
            let mut parts = msgs[i + 5..end].split(|&b| b == 0);
            if parts.next() == Some(b"is_superuser") {
                return parts.next() == Some(b"on");
            }
        }
        i = end;
    }
    false
}

/// What the gateway makes of a signalling call's pid (`None` from `decide`: the server's).
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// The caller's own session: the server signals the backend running the statement.
    Own,
    /// Another session, which the server checks the current role against.
    Other(Other),
}

#[derive(Debug, PartialEq, Eq)]
struct Other {
    pid: i32,
    secret: i32,
    user: String,
    superuser: bool,
    oid: u32,
    /// The caller's login role could signal it by some role it may become, by the memberships
    /// the gateway knows: its marker is believed without a `recheck` (see the module doc).
    reachable: bool,
}

/// The decision for signalling the session `pid` from the session `caller`; `None` for a pid
/// that is no session of this port's gateway processes (the server's to answer).
fn decide(caller: i32, pid: i32) -> Option<Decision> {
    if pid < FIRST_VIRTUAL {
        return None;
    }
    let m = sessions();
    let m = m.as_ref()?;
    let c = m.get(&caller)?;
    if pid == caller {
        return Some(Decision::Own);
    }
    // A session of this process, else of another gateway process on this port (the signal
    // reaches either through the poolers, by its keys).
    let t = match m.get(&pid) {
        Some(t) => crate::pid_registry::Entry {
            user: t.user.clone(),
            superuser: t.superuser,
            secret: t.secret,
            oid: t.oid,
        },
        None => crate::pid_registry::table()?.lookup(pid)?,
    };
    let member = |role: &str| {
        c.user == role
            || c.member_of
                .as_deref()
                .is_some_and(|g| g.iter().any(|g| g == role))
    };
    let reachable =
        c.can_be_superuser || !t.superuser && (member(&t.user) || member("pg_signal_backend"));
    Some(Decision::Other(Other {
        pid,
        secret: t.secret,
        user: t.user,
        superuser: t.superuser,
        oid: t.oid,
        reachable,
    }))
}

/// Whether the role the statement runs as is a superuser (Postgres's `superuser()`: the current
/// user, which `SET ROLE` changes).
const CURRENT_IS_SUPERUSER: &str =
    "(SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = CURRENT_USER)";

/// An expression that raises the marker error the pooler turns into Postgres's 42501 for a
/// denied `signal` (`pooler/src/cancel.rs`, `denied_signal`): reading a setting nobody has.
/// Evaluated only where the `CASE` reaches it (a stable function: not folded when planning).
fn denied(signal: Signal, superuser: bool) -> String {
    let (s, why) = (
        match signal {
            Signal::Cancel => "cancel",
            Signal::Terminate => "terminate",
        },
        if superuser { "superuser" } else { "member" },
    );
    format!("pg_catalog.current_setting('tidepool.signal_denied_{s}_{why}')::boolean")
}

/// The server's check of a call on another session, as `pg_signal_backend()` makes it, with
/// `allowed` as the allowed branch; `role` names the target's role.
fn checked(signal: Signal, superuser: bool, role: &str, allowed: &str) -> String {
    if superuser {
        format!(
            "CASE WHEN {CURRENT_IS_SUPERUSER} THEN {allowed} ELSE {} END",
            denied(signal, true)
        )
    } else {
        format!(
            "CASE WHEN pg_catalog.pg_has_role({role}, 'USAGE') \
             OR pg_catalog.pg_has_role('pg_signal_backend', 'USAGE') \
             THEN {allowed} ELSE {} END",
            denied(signal, false)
        )
    }
}

/// `s` as an SQL string constant whatever `standard_conforming_strings` says.
fn literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// A signal the gateway sends when the server's warning for `marker` arrives (`down::SIGNAL`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Issued {
    pub marker: i32,
    pub signal: Signal,
    pub pid: i32,
    pub secret: i32,
    /// A termination's timeout: the call returns once the target is gone, at most that long
    /// later (terminate_wait.rs).
    pub wait: Option<Wait>,
    /// The caller's login-time memberships could not reach the target: the gateway reads them
    /// again before it believes the server (`recheck`).
    pub recheck: bool,
    /// The column of its statement's rows the call is (`terminate_wait::select_column`).
    pub column: Option<u16>,
}

/// What a `pg_terminate_backend(pid, timeout)` waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Wait {
    pub timeout: Timeout,
    /// The column of its statement's rows the call is (`terminate_wait::select_column`).
    pub column: Option<u16>,
}

/// A termination's timeout as the call gives it: a constant, or a parameter (index from 0)
/// read in each `Bind`. Any other expression is not waited on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Timeout {
    Ms(i64),
    Param(usize),
}

impl Wait {
    /// `wait` with a timeout given by a parameter read (`value(k)`: parameter `k` as an
    /// integer); `None` where there is no wait or the value cannot be read.
    pub fn resolved(wait: Option<Wait>, value: impl Fn(usize) -> Option<i64>) -> Option<Wait> {
        let mut w = wait?;
        if let Timeout::Param(k) = w.timeout {
            w.timeout = Timeout::Ms(value(k)?);
        }
        Some(w)
    }
}

impl Issued {
    /// The wait to make when the server allows the call: its timeout in milliseconds (above 0:
    /// Postgres waits for no other) and the call's column.
    pub fn wait_ms(&self) -> Option<(i64, Option<u16>)> {
        match self.wait? {
            Wait {
                timeout: Timeout::Ms(ms),
                column,
            } if ms > 0 => Some((ms, column)),
            _ => None,
        }
    }
}

/// Whether the session `pid` with cancel key `secret` still lives (in this gateway process or
/// in another on the port): a termination with a timeout waits until it does not.
pub fn lives(pid: i32, secret: i32) -> bool {
    let here = sessions()
        .as_ref()
        .and_then(|m| m.get(&pid))
        .is_some_and(|t| t.secret == secret);
    here || crate::pid_registry::table()
        .and_then(|t| t.lookup(pid))
        .is_some_and(|e| e.secret == secret)
}

/// The role the session `caller` logged in as (for a fresh lookup of its memberships).
pub fn login_role(caller: i32) -> Option<String> {
    sessions()
        .as_ref()
        .and_then(|m| m.get(&caller))
        .map(|t| t.user.clone())
}

/// What a fresh lookup says of the role of the session `caller` (memberships granted or
/// revoked since it logged in); then whether it may reach the session `pid` (see the module
/// doc: a marker is believed only for such a session).
pub fn recheck(caller: i32, role: &shared::role::RoleInfo, pid: i32) -> bool {
    if let Some(t) = sessions().as_mut().and_then(|m| m.get_mut(&caller)) {
        if !role.exists || role.oid != t.oid && t.oid != 0 {
            // Dropped, or another role of the same name: no longer the session's role.
            t.member_of = None;
            t.can_be_superuser = t.superuser;
        } else {
            set_memberships(t, role);
        }
    }
    matches!(decide(caller, pid), Some(Decision::Other(o)) if o.reachable)
}

fn set_memberships(t: &mut Target, role: &shared::role::RoleInfo) {
    let others: Box<[String]> = role
        .member_of
        .iter()
        .filter(|g| **g != t.user)
        .cloned()
        .collect();
    t.member_of = (!others.is_empty()).then_some(others);
    t.can_be_superuser = t.superuser || role.superuser || role.member_of_superuser;
}

/// The server's word for `marker` (Postgres's `PID <marker> is not a PostgreSQL backend
/// process`, in whatever language) as it reads for `pid`: the warning of a pid the server does
/// not know, for a signal the gateway does not send.
pub fn unknown_pid(notice: &[u8], marker: i32, pid: i32) -> Vec<u8> {
    use shared::protocol::backend as be;
    let Some(fields) = notice.get(5..).and_then(|b| be::error_fields(b).ok()) else {
        return notice.to_vec();
    };
    let from = marker.to_string();
    let mut m = Vec::with_capacity(notice.len() + 8);
    shared::protocol::put_message(&mut m, be::NOTICE_RESPONSE, |b| {
        for (code, value) in fields {
            b.push(code);
            match find_ci(value, from.as_bytes()).filter(|_| code == b'M') {
                Some(at) => {
                    b.extend_from_slice(&value[..at]);
                    b.extend_from_slice(pid.to_string().as_bytes());
                    b.extend_from_slice(&value[at + from.len()..]);
                }
                None => b.extend_from_slice(value),
            }
            b.push(0);
        }
        b.push(0);
    });
    m
}

/// A signalling call on a parameter pid in a prepared statement.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ParamCall {
    /// The parameter (index from 0).
    index: usize,
    signal: Signal,
    wait: Option<Wait>,
    column: Option<u16>,
}

/// Per session: the prepared statements (by name) that signal other sessions, and the count of
/// constant calls (their markers).
#[derive(Default)]
pub struct Statements {
    by_name: HashMap<Vec<u8>, Prepared>,
    constants: u32,
}

/// A prepared statement's signalling calls: the parameters (index from 0) that carry a pid,
/// and the signals its constant calls stand for (issued again at each `Bind`: the statement
/// runs then, as often as it is bound).
#[derive(Default)]
struct Prepared {
    params: Vec<ParamCall>,
    constants: Vec<Issued>,
}

impl Statements {
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// The statement `name` is (re)defined: remembered if it signals.
    fn define(&mut self, name: Vec<u8>, prepared: Prepared) {
        if prepared.params.is_empty() && prepared.constants.is_empty() {
            self.by_name.remove(&name);
        } else {
            self.by_name.insert(name, prepared);
        }
    }
}

/// The batch with the signalling calls on virtual pids rewritten as described in the module
/// doc, and the signals the server may allow; `None` when nothing changes (the common case: one
/// substring scan, and the Bind work only when the session prepared a signalling statement).
pub fn rewrite_batch(
    batch: &[u8],
    caller: i32,
    stmts: &mut Statements,
) -> Option<(Vec<u8>, Vec<Issued>)> {
    let named = names_a_signal(batch);
    if !named && stmts.is_empty() {
        return None;
    }
    let mut issued = Vec::new();
    let mut constants = stmts.constants;
    let out = fe::rewrite_each(batch, |tag, body| match tag {
        // Without the functions' names, a text matters only where it uses, drops or redefines
        // a statement the session prepared.
        fe::QUERY
            if named || {
                let sql = fe::query_text(body);
                statement_names::mentions(sql) || contains_ci(sql, b"discard")
            } =>
        {
            let sql = fe::query_text(body);
            sql::rewrite_query(sql, caller, stmts, &mut constants, &mut issued).map(|sql| {
                let mut m = Vec::with_capacity(sql.len() + 6);
                fe::query_bytes(&mut m, &sql);
                m
            })
        }
        fe::PARSE => fe::parse_parse(body).ok().and_then(|p| {
            let mut prepared = Prepared::default();
            let sql = if named {
                let (sql, params) =
                    rewrite(p.query, caller, &mut constants, &mut prepared.constants);
                prepared.params = params;
                sql
            } else {
                None
            };
            stmts.define(p.name.to_vec(), prepared);
            let sql = sql?;
            let mut m = Vec::new();
            fe::write_parse(&mut m, p.name, &sql, p.param_types);
            Some(m)
        }),
        fe::BIND if !stmts.is_empty() => bind(body, caller, stmts, &mut issued),
        fe::CLOSE if !stmts.is_empty() => {
            if let Ok((b'S', name)) = fe::parse_target(body) {
                stmts.by_name.remove(name);
            }
            None
        }
        _ => None,
    });
    stmts.constants = constants;
    match out {
        Some(out) => Some((out, issued)),
        // Binds of statements whose calls are all constants: the text is already the server's.
        None if !issued.is_empty() => Some((batch.to_vec(), issued)),
        None => None,
    }
}

/// `cancel_backend` or `terminate_backend` anywhere in `batch` (ASCII case ignored): one pass
/// over the batch for `_backend`, the common case being no hit at all.
fn names_a_signal(batch: &[u8]) -> bool {
    let mut from = 0;
    while let Some(p) = find_ci(&batch[from..], b"_backend") {
        let before = &batch[..from + p];
        let ends = |w: &[u8]| {
            before.len() >= w.len() && before[before.len() - w.len()..].eq_ignore_ascii_case(w)
        };
        if ends(b"cancel") || ends(b"terminate") {
            return true;
        }
        from += p + 8;
    }
    false
}

/// A `Bind` of a signalling statement with its sessions' pids replaced by the gateway's
/// reading of them (`PARAM_OWN`, `PARAM_SUPERUSER`, `PARAM_OWN - oid`).
fn bind(body: &[u8], caller: i32, stmts: &Statements, issued: &mut Vec<Issued>) -> Option<Vec<u8>> {
    let (portal, stmt, rest) = fe::parse_bind(body).ok()?;
    let prepared = stmts.by_name.get(stmt)?;
    let rd = |at: usize| -> Option<i16> {
        Some(i16::from_be_bytes([*rest.get(at)?, *rest.get(at + 1)?]))
    };
    let nformats = rd(0)?.max(0) as usize;
    let format = |k: usize| -> Option<i16> {
        match nformats {
            0 => Some(0),
            1 => rd(2),
            _ if k < nformats => rd(2 + 2 * k),
            _ => None,
        }
    };
    let params_at = 2 + 2 * nformats;
    let nparams = rd(params_at)?.max(0) as usize;
    // (start, end) of each value (end = start for NULL).
    let mut values = Vec::with_capacity(nparams);
    let mut pos = params_at + 2;
    for _ in 0..nparams {
        let len = i32::from_be_bytes(rest.get(pos..pos + 4)?.try_into().ok()?);
        pos += 4;
        let n = len.max(0) as usize;
        rest.get(pos..pos + n)?;
        values.push((pos, pos + n, len >= 0));
        pos += n;
    }
    // Parameter `k` as an integer, and how a value of the same format and width is written.
    let integer = |k: usize| -> Option<(i64, usize)> {
        let &(s, e, true) = values.get(k)? else {
            return None;
        };
        let raw = &rest[s..e];
        match format(k)? {
            0 => Some((
                std::str::from_utf8(raw).ok()?.trim().parse::<i64>().ok()?,
                0,
            )),
            1 if raw.len() == 2 => Some((i16::from_be_bytes(raw.try_into().ok()?) as i64, 2)),
            1 if raw.len() == 4 => Some((i32::from_be_bytes(raw.try_into().ok()?) as i64, 4)),
            1 if raw.len() == 8 => Some((i64::from_be_bytes(raw.try_into().ok()?), 8)),
            _ => None,
        }
    };
    // A timeout given by a parameter is read in this Bind.
    let resolve = |wait: Option<Wait>| Wait::resolved(wait, |k| integer(k).map(|(v, _)| v));
    issued.extend(prepared.constants.iter().map(|x| Issued {
        wait: resolve(x.wait),
        ..*x
    }));
    let mut replace: Vec<(usize, Vec<u8>)> = Vec::new();
    for call in &prepared.params {
        let k = call.index;
        let Some((pid, width)) = integer(k) else {
            continue;
        };
        if width == 2 {
            // No session's pid fits an int2.
            continue;
        }
        let Ok(pid) = i32::try_from(pid) else {
            continue;
        };
        let Some(value) = param_value(caller, pid, call, &resolve, issued) else {
            continue;
        };
        let new = match width {
            0 => value.to_string().into_bytes(),
            4 => value.to_be_bytes().to_vec(),
            _ => (value as i64).to_be_bytes().to_vec(),
        };
        replace.push((k, new));
    }
    if replace.is_empty() {
        return None;
    }
    let mut new_rest = rest[..params_at + 2].to_vec();
    for (k, &(s, e, present)) in values.iter().enumerate() {
        match replace.iter().find(|(r, _)| *r == k) {
            Some((_, v)) => {
                new_rest.extend_from_slice(&(v.len() as i32).to_be_bytes());
                new_rest.extend_from_slice(v);
            }
            None if present => {
                new_rest.extend_from_slice(&((e - s) as i32).to_be_bytes());
                new_rest.extend_from_slice(&rest[s..e]);
            }
            None => new_rest.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    new_rest.extend_from_slice(&rest[pos..]);
    let mut m = Vec::with_capacity(body.len() + 16);
    fe::write_bind(&mut m, portal, stmt, &new_rest);
    Some(m)
}

/// `sql` with its signalling calls rewritten (`None` if none is), and the calls whose pid is a
/// parameter: the text of a `Parse`, whose statement runs at each `Bind`. Markers of constant
/// calls count on from `constants`, and the signals they stand for go to `issued`.
fn rewrite(
    sql: &[u8],
    caller: i32,
    constants: &mut u32,
    issued: &mut Vec<Issued>,
) -> (Option<Vec<u8>>, Vec<ParamCall>) {
    let toks: Vec<Token> = Lexer::new(sql).collect();
    let mut params = Vec::new();
    if toks.iter().any(|t| t.kind == Kind::Unsure) {
        return (None, params);
    }
    // Stored bodies (a view, a default) run later: left alone. A SQL PREPARE through the
    // extended protocol keeps the client's name on a pinned backend: left alone too.
    if let Some(first) = toks.iter().find(|t| t.kind == Kind::Word) {
        let w = first.text(sql);
        if [&b"create"[..], b"alter", b"prepare"]
            .iter()
            .any(|s| w.eq_ignore_ascii_case(s))
        {
            return (None, params);
        }
    }
    let mut edit = Edit::default();
    let all = 0..toks.len();
    calls(
        sql,
        &toks,
        all,
        caller,
        constants,
        issued,
        &mut params,
        &mut edit,
    );
    (edit.finish(sql), params)
}

/// A text being rewritten: the new text so far, made of the old one up to `copied`.
#[derive(Default)]
struct Edit {
    out: Vec<u8>,
    copied: usize,
}

impl Edit {
    /// `sql[start..end]` becomes `with` (ranges come in order).
    fn replace(&mut self, sql: &[u8], start: usize, end: usize, with: &[u8]) {
        self.out.extend_from_slice(&sql[self.copied..start]);
        self.out.extend_from_slice(with);
        self.copied = end;
    }

    /// The new text, `None` if nothing was replaced.
    fn finish(mut self, sql: &[u8]) -> Option<Vec<u8>> {
        if self.copied == 0 {
            return None;
        }
        self.out.extend_from_slice(&sql[self.copied..]);
        Some(self.out)
    }
}

/// The signalling calls among the tokens `range` of `sql` rewritten into `edit` (see the
/// module doc); the calls whose pid is a parameter go to `params`, the signals constant calls
/// stand for to `issued` (their markers counting on from `constants`).
#[allow(clippy::too_many_arguments)]
fn calls(
    sql: &[u8],
    toks: &[Token],
    range: std::ops::Range<usize>,
    caller: i32,
    constants: &mut u32,
    issued: &mut Vec<Issued>,
    params: &mut Vec<ParamCall>,
    edit: &mut Edit,
) {
    let is = |i: usize, k: Kind| toks.get(i).is_some_and(|t| t.kind == k);
    for i in range {
        let t = toks[i];
        let signal = if t.is_word(sql, b"pg_cancel_backend") {
            Signal::Cancel
        } else if t.is_word(sql, b"pg_terminate_backend") {
            Signal::Terminate
        } else {
            continue;
        };
        if !is(i + 1, Kind::Punct(b'(')) {
            continue;
        }
        // `pg_catalog.f` is the same function; `other.f` is not.
        let start = if i >= 2 && is(i - 1, Kind::Punct(b'.')) {
            if !toks[i - 2].is_word(sql, b"pg_catalog") {
                continue;
            }
            toks[i - 2].start
        } else {
            t.start
        };
        if start < edit.copied {
            continue;
        }
        // The first argument's tokens, up to a comma or the closing parenthesis.
        let mut depth = 0usize;
        let mut j = i + 2;
        let mut first_end = None;
        let close = loop {
            match toks.get(j).map(|t| t.kind) {
                None => break None,
                Some(Kind::Punct(b'(')) => depth += 1,
                Some(Kind::Punct(b')')) if depth == 0 => break Some(j),
                Some(Kind::Punct(b')')) => depth -= 1,
                Some(Kind::Punct(b',')) if depth == 0 && first_end.is_none() => first_end = Some(j),
                _ => {}
            }
            j += 1;
        };
        let Some(close) = close else { continue };
        let arg = &toks[i + 2..first_end.unwrap_or(close)];
        let name = signal.function();
        let args = String::from_utf8_lossy(&sql[toks[i + 2].start..toks[close].start]);
        // What follows the pid (`, 500`: a terminate's timeout), for the caller's own backend.
        let more = first_end.map_or(std::borrow::Cow::Borrowed(""), |f| {
            String::from_utf8_lossy(&sql[toks[f].start..toks[close].start])
        });
        let own = format!("pg_catalog.{name}(pg_catalog.pg_backend_pid(){more})");
        // The server's word that it allowed the call on `marker`: Postgres's warning for a pid
        // that is no backend's. A termination's timeout goes with it, so that a negative one
        // raises Postgres's own error (22003) before anything is signalled.
        let word = |marker: &str| match (signal, first_end) {
            (Signal::Terminate, Some(_)) => {
                format!("pg_catalog.pg_terminate_backend({marker}{more}) IS NOT NULL")
            }
            _ => format!("pg_catalog.pg_cancel_backend({marker}) IS NOT NULL"),
        };
        // A termination with a timeout waits for its target (terminate_wait.rs).
        let column = crate::terminate_wait::select_column(
            toks,
            sql,
            if start < t.start { i - 2 } else { i },
            close,
        );
        let wait = match (signal, first_end) {
            (Signal::Terminate, Some(f)) => {
                timeout(sql, &toks[f + 1..close]).map(|timeout| Wait { timeout, column })
            }
            _ => None,
        };
        let replacement = match arg {
            [n] if n.kind == Kind::Number => {
                let Some(pid) = std::str::from_utf8(n.text(sql))
                    .ok()
                    .and_then(|s| s.parse::<i32>().ok())
                else {
                    continue;
                };
                match decide(caller, pid) {
                    None => continue,
                    Some(Decision::Own) => format!("(SELECT {own} AS {name})"),
                    Some(Decision::Other(o)) => {
                        let role = match o.oid {
                            0 => literal(&o.user),
                            oid => format!("{oid}::pg_catalog.oid"),
                        };
                        // Where the login-time memberships do not reach the target, the gateway
                        // reads them again when the server's word comes (`recheck`).
                        let marker = CONST_BASE - (*constants % CONST_SPAN) as i32;
                        *constants = constants.wrapping_add(1);
                        issued.push(Issued {
                            marker,
                            signal,
                            pid: o.pid,
                            secret: o.secret,
                            wait,
                            recheck: !o.reachable,
                            column,
                        });
                        let allowed = word(&marker.to_string());
                        format!(
                            "(SELECT {} AS {name})",
                            checked(signal, o.superuser, &role, &allowed)
                        )
                    }
                }
            }
            [p]
            | [p, Token {
                kind: Kind::Cast, ..
            }, Token {
                kind: Kind::Word, ..
            }] if p.kind == Kind::Param => {
                let Some(k) = std::str::from_utf8(&p.text(sql)[1..])
                    .ok()
                    .and_then(|s| s.parse::<usize>().ok())
                    .filter(|&k| k >= 1)
                else {
                    continue;
                };
                params.push(ParamCall {
                    index: k - 1,
                    signal,
                    wait,
                    column,
                });
                let a = String::from_utf8_lossy(&sql[arg[0].start..arg[arg.len() - 1].end]);
                let a = format!("({a})");
                // The Bind says which (`bind`); the value is the allowed branch's marker.
                let role = format!("({PARAM_OWN} - {a})::pg_catalog.oid");
                let marker = word(&a);
                format!(
                    "(SELECT CASE WHEN {a} = {PARAM_OWN} THEN {own} \
                     WHEN {a} = {PARAM_SUPERUSER} THEN {} \
                     WHEN {a} < {PARAM_SUPERUSER} THEN {} \
                     ELSE pg_catalog.{name}({args}) END AS {name})",
                    checked(signal, true, "", &marker),
                    checked(signal, false, &role, &marker),
                )
            }
            _ => continue,
        };
        edit.replace(sql, start, toks[close].end, replacement.as_bytes());
    }
}

/// What a parameter pid of `call` is replaced by (`PARAM_OWN`, `PARAM_SUPERUSER`, `PARAM_OWN -
/// oid`), the signal owed for it going to `issued`; `None`: the server's to answer.
fn param_value(
    caller: i32,
    pid: i32,
    call: &ParamCall,
    resolve: &dyn Fn(Option<Wait>) -> Option<Wait>,
    issued: &mut Vec<Issued>,
) -> Option<i32> {
    match decide(caller, pid)? {
        Decision::Own => Some(PARAM_OWN),
        Decision::Other(o) => {
            let value = if o.superuser {
                PARAM_SUPERUSER
            } else if (2..=MAX_OID).contains(&o.oid) {
                PARAM_OWN - o.oid as i32
            } else {
                // The role's oid is not known or too large to carry: the server's (a pid it
                // does not know).
                return None;
            };
            issued.push(Issued {
                marker: value,
                signal: call.signal,
                pid: o.pid,
                secret: o.secret,
                wait: resolve(call.wait),
                recheck: !o.reachable,
                column: call.column,
            });
            Some(value)
        }
    }
}

/// A termination's timeout argument (its tokens) as the gateway can know it before the server
/// runs the call: a constant or a parameter (possibly cast).
fn timeout(sql: &[u8], arg: &[Token]) -> Option<Timeout> {
    match arg {
        [n] if n.kind == Kind::Number => std::str::from_utf8(n.text(sql))
            .ok()?
            .parse()
            .ok()
            .map(Timeout::Ms),
        [p]
        | [p, Token {
            kind: Kind::Cast, ..
        }, Token {
            kind: Kind::Word, ..
        }] if p.kind == Kind::Param => std::str::from_utf8(&p.text(sql)[1..])
            .ok()?
            .parse::<usize>()
            .ok()
            .filter(|&k| k >= 1)
            .map(|k| Timeout::Param(k - 1)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::role::RoleInfo;

    fn status(name: &str, value: &str) -> Vec<u8> {
        let mut m = Vec::new();
        shared::protocol::put_message(&mut m, b'S', |b| {
            b.extend_from_slice(name.as_bytes());
            b.push(0);
            b.extend_from_slice(value.as_bytes());
            b.push(0);
        });
        m
    }

    /// A logged-in session of `user` (oid, memberships besides itself, superuser).
    fn session(user: &str, secret: i32, oid: u32, member_of: &[&str], su: bool) -> Registration {
        let r = Registration::new(user, secret);
        let mut groups: Vec<String> = vec![user.into()];
        groups.extend(member_of.iter().map(|g| g.to_string()));
        r.logged_in(
            &[
                status("server_version", "15"),
                status("is_superuser", if su { "on" } else { "off" }),
            ]
            .concat(),
            &RoleInfo {
                exists: true,
                superuser: su,
                oid,
                member_of: groups,
                ..RoleInfo::default()
            },
        );
        r
    }

    fn r(sql: &str, caller: i32) -> (Option<String>, Vec<(usize, Signal)>, Vec<Issued>) {
        let (mut issued, mut n) = (Vec::new(), 0);
        let (s, p) = rewrite(sql.as_bytes(), caller, &mut n, &mut issued);
        let p = p.iter().map(|c| (c.index, c.signal)).collect();
        (s.map(|s| String::from_utf8(s).unwrap()), p, issued)
    }

    fn other(d: Option<Decision>) -> Other {
        match d {
            Some(Decision::Other(o)) => o,
            d => panic!("{d:?}"),
        }
    }

    #[test]
    fn a_batch_names_a_signal_only_with_the_functions_names() {
        assert!(names_a_signal(b"Q....SELECT PG_Cancel_Backend(1)"));
        assert!(names_a_signal(
            b"select pg_backend_pid(); select pg_terminate_backend($1)"
        ));
        assert!(!names_a_signal(b"SELECT pg_backend_pid(), 'x_backend'"));
        assert!(!names_a_signal(b"_backend"));
    }

    #[test]
    fn virtual_pids_are_never_real_ones() {
        let regs: Vec<_> = (0..100).map(|_| Registration::new("u", 1)).collect();
        assert!(regs.iter().all(|r| r.pid >= FIRST_VIRTUAL));
        let mut pids: Vec<_> = regs.iter().map(|r| r.pid).collect();
        pids.dedup();
        assert_eq!(pids.len(), 100);
    }

    #[test]
    fn markers_are_issued_for_what_the_login_role_could_signal() {
        let alice = session("alice", 11, 16401, &[], false);
        let alice2 = session("alice", 12, 16401, &[], false);
        let bob = session("bob", 13, 16402, &["staff"], false);
        let root = session("root", 14, 10, &[], true);
        let carol = session("carol", 15, 16404, &["alice"], false);
        let killer = session("killer", 16, 16405, &["pg_signal_backend"], false);
        let admin = session("admin", 17, 16406, &["root_group"], false);
        // admin's groups hold a superuser: it may become one.
        sessions()
            .as_mut()
            .unwrap()
            .get_mut(&admin.pid)
            .unwrap()
            .can_be_superuser = true;
        assert_eq!(decide(alice.pid, alice.pid), Some(Decision::Own));
        let o = other(decide(alice.pid, alice2.pid));
        assert_eq!(
            (
                o.pid,
                o.secret,
                o.user.as_str(),
                o.oid,
                o.superuser,
                o.reachable
            ),
            (alice2.pid, 12, "alice", 16401, false, true)
        );
        assert!(!other(decide(alice.pid, bob.pid)).reachable);
        assert!(!other(decide(alice.pid, root.pid)).reachable);
        assert!(other(decide(root.pid, bob.pid)).reachable);
        assert!(other(decide(carol.pid, alice.pid)).reachable);
        assert!(!other(decide(carol.pid, bob.pid)).reachable);
        assert!(other(decide(killer.pid, bob.pid)).reachable);
        assert!(!other(decide(killer.pid, root.pid)).reachable);
        assert!(other(decide(admin.pid, root.pid)).reachable);
        // Real pids and pids of nobody are the server's to answer.
        assert_eq!(decide(root.pid, 4242), None);
        let gone = alice2.pid;
        drop(alice2);
        assert_eq!(decide(alice.pid, gone), None);
    }

    #[test]
    fn calls_on_other_sessions_are_checked_by_the_server() {
        let a = session("erin", 41, 16411, &[], false);
        let a2 = session("erin", 44, 16411, &[], false);
        let b = session("o'\\hara", 42, 0, &[], false);
        let root = session("root2", 43, 10, &[], true);
        let (sql, _, issued) = r(&format!("SELECT pg_cancel_backend({})", b.pid), a.pid);
        // erin could not become o'hara at login: the gateway reads its memberships again
        // before it believes the server.
        assert_eq!(
            issued,
            vec![Issued {
                marker: -536870912,
                signal: Signal::Cancel,
                pid: b.pid,
                secret: 42,
                wait: None,
                recheck: true,
                column: Some(0),
            }]
        );
        assert_eq!(
            sql.unwrap(),
            "SELECT (SELECT CASE WHEN pg_catalog.pg_has_role(E'o''\\\\hara', 'USAGE') \
             OR pg_catalog.pg_has_role('pg_signal_backend', 'USAGE') \
             THEN pg_catalog.pg_cancel_backend(-536870912) IS NOT NULL ELSE \
             pg_catalog.current_setting('tidepool.signal_denied_cancel_member')::boolean \
             END AS pg_cancel_backend)"
        );
        let (sql, _, issued) = r(
            &format!("SELECT pg_terminate_backend({}, 10)", root.pid),
            a.pid,
        );
        assert!(issued[0].recheck);
        assert_eq!(
            sql.unwrap(),
            format!(
                "SELECT (SELECT CASE WHEN {CURRENT_IS_SUPERUSER} \
                 THEN pg_catalog.pg_terminate_backend(-536870912, 10) IS NOT NULL \
                 ELSE pg_catalog.current_setting(\
                 'tidepool.signal_denied_terminate_superuser')::boolean \
                 END AS pg_terminate_backend)"
            )
        );
        // The same role, by oid; each constant call its own marker.
        let (sql, _, issued) = r(
            &format!(
                "select PG_CATALOG.pg_cancel_backend ( {0} ); select pg_terminate_backend({0})",
                a2.pid
            ),
            a.pid,
        );
        assert_eq!(
            sql.unwrap(),
            "select (SELECT CASE WHEN pg_catalog.pg_has_role(16411::pg_catalog.oid, 'USAGE') \
             OR pg_catalog.pg_has_role('pg_signal_backend', 'USAGE') \
             THEN pg_catalog.pg_cancel_backend(-536870912) IS NOT NULL ELSE \
             pg_catalog.current_setting('tidepool.signal_denied_cancel_member')::boolean \
             END AS pg_cancel_backend); select (SELECT CASE WHEN \
             pg_catalog.pg_has_role(16411::pg_catalog.oid, 'USAGE') \
             OR pg_catalog.pg_has_role('pg_signal_backend', 'USAGE') \
             THEN pg_catalog.pg_cancel_backend(-536870913) IS NOT NULL ELSE \
             pg_catalog.current_setting('tidepool.signal_denied_terminate_member')::boolean \
             END AS pg_terminate_backend)"
        );
        assert_eq!(
            issued,
            vec![
                Issued {
                    marker: -536870912,
                    signal: Signal::Cancel,
                    pid: a2.pid,
                    secret: 44,
                    wait: None,
                    recheck: false,
                    column: Some(0),
                },
                Issued {
                    marker: -536870913,
                    signal: Signal::Terminate,
                    pid: a2.pid,
                    secret: 44,
                    wait: None,
                    recheck: false,
                    column: Some(0),
                }
            ]
        );
    }

    #[test]
    fn a_prepared_constant_call_is_issued_at_each_bind() {
        let a = session("gina", 61, 16451, &[], false);
        let b = session("gina", 62, 16451, &[], false);
        let mut stmts = Statements::default();
        let mut parse = Vec::new();
        let sql = format!("SELECT pg_terminate_backend({})", b.pid);
        fe::write_parse(&mut parse, b"", sql.as_bytes(), &[0, 0]);
        let (out, issued) = rewrite_batch(&parse, a.pid, &mut stmts).unwrap();
        assert!(issued.is_empty(), "the Parse runs nothing");
        assert!(String::from_utf8_lossy(&out).contains("pg_cancel_backend(-536870912)"));
        let mut bind_msg = Vec::new();
        fe::write_bind(&mut bind_msg, b"", b"", &[0, 0, 0, 0, 0, 0]);
        let want = Issued {
            marker: -536870912,
            signal: Signal::Terminate,
            pid: b.pid,
            secret: 62,
            wait: None,
            recheck: false,
            column: Some(0),
        };
        for _ in 0..2 {
            let (out, issued) = rewrite_batch(&bind_msg, a.pid, &mut stmts).unwrap();
            assert_eq!(out, bind_msg);
            assert_eq!(issued, vec![want]);
        }
    }

    /// A simple `Query` of `sql` through `rewrite_batch`: the new text, the signals owed.
    fn q(sql: &str, caller: i32, stmts: &mut Statements) -> (Option<String>, Vec<Issued>) {
        let mut m = Vec::new();
        fe::query(&mut m, sql);
        match rewrite_batch(&m, caller, stmts) {
            Some((out, issued)) => {
                let text = (out != m)
                    .then(|| String::from_utf8(fe::query_text(&out[5..]).to_vec()).unwrap());
                (text, issued)
            }
            None => (None, Vec::new()),
        }
    }

    #[test]
    fn sql_prepared_statements_signal_at_each_execute() {
        let a = session("ivy", 81, 16481, &[], false);
        let b = session("ivy", 82, 16481, &[], false);
        let mut stmts = Statements::default();
        // A parameter: the body tests it; the EXECUTE argument is replaced as a Bind's value.
        let (sql, issued) = q(
            &format!(
                "PREPARE s(int) AS SELECT pg_cancel_backend($1); EXECUTE s ({}, 7); \
                 EXECUTE S(4242)",
                b.pid
            ),
            a.pid,
            &mut stmts,
        );
        let sql = sql.unwrap();
        assert!(
            sql.starts_with("PREPARE s(int) AS SELECT (SELECT CASE WHEN ($1) = -1073741825"),
            "{sql}"
        );
        let marker = PARAM_OWN - 16481;
        assert!(
            sql.ends_with(&format!(
                "END AS pg_cancel_backend); EXECUTE s ({marker}, 7); EXECUTE S(4242)"
            )),
            "{sql}"
        );
        let want = Issued {
            marker,
            signal: Signal::Cancel,
            pid: b.pid,
            secret: 82,
            wait: None,
            recheck: false,
            column: Some(0),
        };
        assert_eq!(issued, vec![want]);
        // In a later batch, with no function named in it.
        let (sql, issued) = q(&format!("execute \"s\"({})", b.pid), a.pid, &mut stmts);
        assert_eq!(sql.unwrap(), format!("execute \"s\"({marker})"));
        assert_eq!(issued, vec![want]);

        // A constant: owed at each EXECUTE, not at the PREPARE.
        let (sql, issued) = q(
            &format!("PREPARE t AS SELECT pg_terminate_backend({}, 100)", b.pid),
            a.pid,
            &mut stmts,
        );
        assert!(issued.is_empty());
        assert!(sql
            .unwrap()
            .contains("pg_terminate_backend(-536870912, 100) IS NOT NULL"));
        for _ in 0..2 {
            let (sql, issued) = q("EXECUTE t; SELECT 1", a.pid, &mut stmts);
            assert_eq!(sql, None);
            assert_eq!(issued.len(), 1);
            assert_eq!(issued[0].marker, -536870912);
            assert_eq!(issued[0].wait_ms(), Some((100, Some(0))));
        }
        // Forgotten by DEALLOCATE, then DEALLOCATE ALL / DISCARD ALL; a new definition that
        // does not signal replaces one that did.
        q("DEALLOCATE PREPARE t", a.pid, &mut stmts);
        assert_eq!(q("EXECUTE t", a.pid, &mut stmts), (None, Vec::new()));
        assert!(!stmts.is_empty());
        q(
            "deallocate all; PREPARE u AS SELECT pg_cancel_backend($1)",
            a.pid,
            &mut stmts,
        );
        assert_eq!(
            stmts.by_name.keys().collect::<Vec<_>>(),
            vec![&b"u".to_vec()]
        );
        q("DISCARD ALL", a.pid, &mut stmts);
        assert!(stmts.is_empty());
        q(
            "PREPARE s AS SELECT pg_cancel_backend($1)",
            a.pid,
            &mut stmts,
        );
        q("PREPARE s AS SELECT $1", a.pid, &mut stmts);
        assert!(stmts.is_empty());
        // A protocol Close of the name forgets it too.
        q(
            "PREPARE s AS SELECT pg_cancel_backend($1)",
            a.pid,
            &mut stmts,
        );
        let mut close = Vec::new();
        shared::protocol::put_message(&mut close, fe::CLOSE, |b| b.extend_from_slice(b"Ss\0"));
        assert!(rewrite_batch(&close, a.pid, &mut stmts).is_none());
        assert!(stmts.is_empty());
        // Stored bodies stay as they are, the statements after them are rewritten.
        let (sql, issued) = q(
            &format!(
                "CREATE VIEW v AS SELECT pg_cancel_backend({0}); SELECT pg_cancel_backend({0})",
                b.pid
            ),
            a.pid,
            &mut stmts,
        );
        let sql = sql.unwrap();
        assert!(sql.starts_with(&format!(
            "CREATE VIEW v AS SELECT pg_cancel_backend({}); SELECT (SELECT CASE",
            b.pid
        )));
        assert_eq!(issued.len(), 1);
        let atomic = format!(
            "CREATE FUNCTION f() RETURNS bool BEGIN ATOMIC SELECT 1; \
             SELECT pg_cancel_backend({}); END",
            b.pid
        );
        assert_eq!(q(&atomic, a.pid, &mut stmts), (None, Vec::new()));
    }

    #[test]
    fn a_refused_recheck_answers_as_for_a_pid_nobody_has() {
        let a = session("jack", 91, 16491, &[], false);
        let b = session("kate", 92, 16492, &[], false);
        let mut notice = Vec::new();
        shared::protocol::put_message(&mut notice, b'N', |m| {
            for (c, v) in [
                (b'S', "WARNING"),
                (b'C', "01000"),
                (b'M', "PID -536870912 is not a PostgreSQL backend process"),
                (b'R', "pg_signal_backend"),
            ] {
                m.push(c);
                m.extend_from_slice(v.as_bytes());
                m.push(0);
            }
            m.push(0);
        });
        let changed = unknown_pid(&notice, -536870912, b.pid);
        assert!(String::from_utf8_lossy(&changed).contains(&format!(
            "MPID {} is not a PostgreSQL backend process\0",
            b.pid
        )));
        assert_eq!(
            shared::protocol::backend::signal_marker(&changed),
            None,
            "no longer a marker"
        );
        // jack was granted kate after it logged in: a fresh lookup says so.
        assert!(!other(decide(a.pid, b.pid)).reachable);
        let fresh = |member_of: &[&str]| RoleInfo {
            exists: true,
            oid: 16491,
            member_of: member_of.iter().map(|s| s.to_string()).collect(),
            ..RoleInfo::default()
        };
        assert!(!recheck(a.pid, &fresh(&["jack"]), b.pid));
        assert!(recheck(a.pid, &fresh(&["jack", "kate"]), b.pid));
        assert!(other(decide(a.pid, b.pid)).reachable);
        // And revoked again.
        assert!(!recheck(a.pid, &fresh(&["jack"]), b.pid));
        // Another role of the same name (dropped and made again): not the session's.
        let mut other_role = fresh(&["jack", "kate"]);
        other_role.oid = 17000;
        assert!(!recheck(a.pid, &other_role, b.pid));
    }

    #[test]
    fn a_terminations_timeout_is_waited_on() {
        let a = session("hank", 71, 16461, &[], false);
        let b = session("hank", 72, 16461, &[], false);
        let (sql, _, issued) = r(
            &format!("SELECT pg_terminate_backend({}, 500) AS t", b.pid),
            a.pid,
        );
        // The timeout goes to the server with the marker (its own 22003 for a negative one).
        assert!(sql
            .unwrap()
            .contains("pg_catalog.pg_terminate_backend(-536870912, 500) IS NOT NULL"));
        let wait = Wait {
            timeout: Timeout::Ms(500),
            column: Some(0),
        };
        assert_eq!(issued[0].wait, Some(wait));
        assert_eq!(issued[0].wait_ms(), Some((500, Some(0))));
        // Inside an expression: waited on, its column not known; a timeout of 0 or an
        // expression: not waited on.
        let (_, _, issued) = r(
            &format!(
                "SELECT NOT pg_terminate_backend({0}, 1), pg_terminate_backend({0}, 0), \
                 pg_terminate_backend({0}, 2 * 3)",
                b.pid
            ),
            a.pid,
        );
        let waits: Vec<_> = issued.iter().map(|x| x.wait_ms()).collect();
        assert_eq!(waits, vec![Some((1, None)), None, None]);

        // A parameter timeout is read in each Bind (text, int2, int8).
        let mut stmts = Statements::default();
        let mut parse = Vec::new();
        fe::write_parse(
            &mut parse,
            b"",
            b"SELECT pg_terminate_backend($1, $2)",
            &[0, 0],
        );
        rewrite_batch(&parse, a.pid, &mut stmts).unwrap();
        for (format, timeout, ms) in [
            (0u8, b"250".to_vec(), 250),
            (1, 7i16.to_be_bytes().to_vec(), 7),
            (1, 9000i64.to_be_bytes().to_vec(), 9000),
        ] {
            let pid = if format == 0 {
                b.pid.to_string().into_bytes()
            } else {
                b.pid.to_be_bytes().to_vec()
            };
            let mut rest = vec![0, 1, 0, format, 0, 2];
            for v in [&pid, &timeout] {
                rest.extend_from_slice(&(v.len() as i32).to_be_bytes());
                rest.extend_from_slice(v);
            }
            rest.extend_from_slice(&[0, 0]);
            let mut bind_msg = Vec::new();
            fe::write_bind(&mut bind_msg, b"", b"", &rest);
            let (_, issued) = rewrite_batch(&bind_msg, a.pid, &mut stmts).unwrap();
            assert_eq!(issued.len(), 1);
            assert_eq!(issued[0].wait_ms(), Some((ms, Some(0))));
        }
    }

    #[test]
    fn the_callers_own_pid_is_its_backends() {
        let a = session("frank", 51, 16421, &[], false);
        let (sql, params, issued) = r(
            &format!(
                "SELECT pg_terminate_backend({0}, 500), pg_cancel_backend({0})",
                a.pid
            ),
            a.pid,
        );
        assert_eq!(
            sql.as_deref(),
            Some(
                "SELECT (SELECT pg_catalog.pg_terminate_backend(pg_catalog.pg_backend_pid(), 500) \
                 AS pg_terminate_backend), (SELECT pg_catalog.pg_cancel_backend(\
                 pg_catalog.pg_backend_pid()) AS pg_cancel_backend)"
            )
        );
        assert!(params.is_empty() && issued.is_empty());
    }

    #[test]
    fn other_pids_and_texts_are_the_servers() {
        let a = session("carol2", 21, 16431, &[], false);
        let b = session("carol2", 22, 16431, &[], false);
        assert_eq!(r("SELECT pg_terminate_backend(4242)", a.pid).0, None);
        assert_eq!(r("SELECT pg_cancel_backend(2000000000)", a.pid).0, None);
        assert_eq!(
            r(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity",
                a.pid
            )
            .0,
            None
        );
        assert_eq!(
            r(&format!("SELECT other.pg_cancel_backend({})", b.pid), a.pid).0,
            None
        );
        assert_eq!(
            r(&format!("SELECT 'pg_cancel_backend({})'", b.pid), a.pid).0,
            None
        );
        assert_eq!(
            r("CREATE VIEW v AS SELECT pg_cancel_backend($1)", a.pid).0,
            None
        );
    }

    #[test]
    fn a_parameter_is_tested_by_the_text_and_read_in_each_bind() {
        let a = session("dave", 31, 16441, &[], false);
        let b = session("dave", 32, 16441, &[], false);
        let c = session("eve", 33, 16442, &[], false);
        let root = session("root3", 34, 10, &[], true);
        let unknown = session("ghost", 35, 0, &[], false);
        let (sql, params, issued) = r("SELECT pg_terminate_backend($1::int, 500)", a.pid);
        assert_eq!(
            sql.as_deref(),
            Some(
                "SELECT (SELECT CASE WHEN ($1::int) = -1073741825 THEN \
                 pg_catalog.pg_terminate_backend(pg_catalog.pg_backend_pid(), 500) \
                 WHEN ($1::int) = -1073741826 THEN CASE WHEN (SELECT r.rolsuper FROM \
                 pg_catalog.pg_roles r WHERE r.rolname = CURRENT_USER) THEN \
                 pg_catalog.pg_terminate_backend(($1::int), 500) IS NOT NULL ELSE \
                 pg_catalog.current_setting('tidepool.signal_denied_terminate_superuser')::boolean \
                 END WHEN ($1::int) < -1073741826 THEN CASE WHEN pg_catalog.pg_has_role(\
                 (-1073741825 - ($1::int))::pg_catalog.oid, 'USAGE') OR pg_catalog.pg_has_role(\
                 'pg_signal_backend', 'USAGE') THEN pg_catalog.pg_terminate_backend(($1::int), \
                 500) IS NOT NULL ELSE \
                 pg_catalog.current_setting('tidepool.signal_denied_terminate_member')::boolean \
                 END ELSE pg_catalog.pg_terminate_backend($1::int, 500) END \
                 AS pg_terminate_backend)"
            )
        );
        assert_eq!(params, vec![(0, Signal::Terminate)]);
        assert!(issued.is_empty());

        let mut stmts = Statements::default();
        let mut batch = Vec::new();
        fe::write_parse(&mut batch, b"s", b"SELECT pg_cancel_backend($1)", &[0, 0]);
        let (out, issued) = rewrite_batch(&batch, a.pid, &mut stmts).unwrap();
        assert!(issued.is_empty());
        assert!(String::from_utf8_lossy(&out).contains("CASE WHEN ($1) = -1073741825"));
        // Binds with a binary int4, an int8 and a text value: each pid as the gateway reads it.
        let binary4 = |pid: i32| {
            let mut rest = vec![0, 1, 0, 1, 0, 1, 0, 0, 0, 4];
            rest.extend_from_slice(&pid.to_be_bytes());
            rest.extend_from_slice(&[0, 0]);
            rest
        };
        let binary8 = |pid: i64| {
            let mut rest = vec![0, 1, 0, 1, 0, 1, 0, 0, 0, 8];
            rest.extend_from_slice(&pid.to_be_bytes());
            rest.extend_from_slice(&[0, 0]);
            rest
        };
        let text = |pid: i64| {
            let t = pid.to_string();
            let mut rest = vec![0, 0, 0, 1];
            rest.extend_from_slice(&(t.len() as i32).to_be_bytes());
            rest.extend_from_slice(t.as_bytes());
            rest.extend_from_slice(&[0, 0]);
            rest
        };
        let bind_of = |rest: &[u8]| {
            let mut m = Vec::new();
            fe::write_bind(&mut m, b"", b"s", rest);
            m
        };
        for (pid, value, expect) in [
            (a.pid, PARAM_OWN, None),
            (
                b.pid,
                PARAM_OWN - 16441,
                Some(Issued {
                    marker: PARAM_OWN - 16441,
                    signal: Signal::Cancel,
                    pid: b.pid,
                    secret: 32,
                    wait: None,
                    recheck: false,
                    column: Some(0),
                }),
            ),
            (
                c.pid,
                PARAM_OWN - 16442,
                Some(Issued {
                    marker: PARAM_OWN - 16442,
                    signal: Signal::Cancel,
                    pid: c.pid,
                    secret: 33,
                    wait: None,
                    recheck: true,
                    column: Some(0),
                }),
            ),
            (
                root.pid,
                PARAM_SUPERUSER,
                Some(Issued {
                    marker: PARAM_SUPERUSER,
                    signal: Signal::Cancel,
                    pid: root.pid,
                    secret: 34,
                    wait: None,
                    recheck: true,
                    column: Some(0),
                }),
            ),
        ] {
            for (rest, want) in [
                (binary4(pid), binary4(value)),
                (binary8(pid as i64), binary8(value as i64)),
                (text(pid as i64), text(value as i64)),
            ] {
                let (out, issued) = rewrite_batch(&bind_of(&rest), a.pid, &mut stmts).unwrap();
                assert_eq!(out, bind_of(&want));
                assert_eq!(issued, expect.into_iter().collect::<Vec<_>>());
            }
        }
        // A real pid, and a session whose role's oid is not known: unchanged.
        assert!(rewrite_batch(&bind_of(&text(4242)), a.pid, &mut stmts).is_none());
        assert!(rewrite_batch(&bind_of(&binary4(unknown.pid)), a.pid, &mut stmts).is_none());
        // Re-parsed as something else: forgotten.
        let mut parse = Vec::new();
        fe::write_parse(&mut parse, b"s", b"SELECT $1", &[0, 0]);
        assert!(rewrite_batch(&parse, a.pid, &mut stmts).is_none());
        assert!(stmts.is_empty());
    }
}
