//! `pg_cancel_backend(pid)` and `pg_terminate_backend(pid)` of a session's own pid, as its
//! client knows it (issue 11): the pid of the `BackendKeyData` the gateway sent, which is no
//! process Postgres knows. Through Tidepool such a call must cancel that session's query or end
//! that session, and answer `true`, as it does directly. See
//! docs/decisions/2026-12-07-signals-to-virtual-pids.md.
//!
//! The pids the gateway gives out lie at or above `FIRST_VIRTUAL` (2²²): Linux's `pid_max` is at
//! most 2²², so a virtual pid is never a real process and a real pid never a session's.
//!
//! Where the pid is a constant (`pg_terminate_backend(12345678)`) or a parameter (`$1`, as
//! drivers send a pid they hold), the gateway reads it: a pid of a session of this process that
//! the caller may signal (the same role, or a superuser caller; as Postgres's
//! `pg_signal_backend()`) is sent as a cancel or a termination to that session through the
//! poolers (the cancel routing), and the server is made to answer `true` for the call: a constant
//! call becomes `(SELECT true AS pg_cancel_backend)`; a call on a parameter becomes
//! `(SELECT CASE WHEN $1 = ALLOWED THEN true ELSE pg_catalog.pg_cancel_backend($1) END AS
//! pg_cancel_backend)` and the parameter's value is replaced by `ALLOWED` in the `Bind` that
//! names the gateway's decision. Where Postgres would refuse the caller (another role's session,
//! a superuser's), the server checks the memberships and raises an error the pooler shows as
//! Postgres's own 42501 (`denied`). Every other pid is left to the server: real pids behave as
//! directly, and a pid that is nobody's (or a session of another gateway process) gets
//! Postgres's own `false` and warning. The result column keeps the call's name (a scalar
//! subquery takes its column's name).

use shared::protocol::frontend as fe;
use shared::sql::{find_ci, Kind, Lexer, Token};
use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

/// The lowest virtual pid: above any real one (`PID_MAX_LIMIT` is 2²² on 64-bit Linux).
pub const FIRST_VIRTUAL: i32 = 1 << 22;

/// The value a parameter carries when the gateway signalled its session: no pid (negative),
/// an `integer` constant as written (2147483647 is an `integer`, unary minus keeps it one).
const ALLOWED: i32 = -2147483647;
const ALLOWED_TEXT: &str = "-2147483647";

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

/// A session of this process: what `pg_signal_backend()` checks, and the keys to reach it.
struct Target {
    user: String,
    superuser: bool,
    secret: i32,
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
            let span = (i32::MAX - FIRST_VIRTUAL) as u32;
            let pid = FIRST_VIRTUAL + (rand::random::<u32>() % span) as i32;
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
                },
            );
            return Registration { pid, shared };
        }
    }

    /// What the login's `ParameterStatus` messages say (`is_superuser`).
    pub fn logged_in(&self, parameter_status: &[u8]) {
        let superuser = is_superuser(parameter_status);
        if let Some(t) = sessions().as_mut().and_then(|m| m.get_mut(&self.pid)) {
            t.superuser = superuser;
        }
        if let (true, Some(t)) = (self.shared, crate::pid_registry::table()) {
            t.set_superuser(self.pid, superuser);
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

/// What Postgres's `pg_signal_backend()` (signalfuncs.c) decides for a session of this process,
/// as far as the gateway can tell.
#[derive(Debug, PartialEq, Eq)]
enum Decision {
    /// The caller may signal it: the session's (pid, secret). A superuser caller, or the same
    /// role for a session that is not a superuser's.
    Allowed(i32, i32),
    /// A superuser's session, a caller who is not one: Postgres's 42501, unless the role the
    /// caller runs as now is a superuser (the server checks).
    Superuser,
    /// Another role's session: Postgres's 42501 unless the caller has the privileges of that
    /// role or of `pg_signal_backend`, which only the catalog knows (the server checks).
    OtherRole(String),
}

/// The decision for signalling the session `pid` from the session `caller`; `None` for a pid
/// that is no session of this process (the server's to answer).
fn decide(caller: i32, pid: i32) -> Option<Decision> {
    if pid < FIRST_VIRTUAL {
        return None;
    }
    let m = sessions();
    let m = m.as_ref()?;
    let c = m.get(&caller)?;
    // A session of this process, else of another gateway process on this port (the signal
    // reaches either through the poolers, by its keys).
    let t = match m.get(&pid) {
        Some(t) => crate::pid_registry::Entry {
            user: t.user.clone(),
            superuser: t.superuser,
            secret: t.secret,
        },
        None => crate::pid_registry::table()?.lookup(pid)?,
    };
    Some(if t.superuser && !c.superuser {
        Decision::Superuser
    } else if c.superuser || c.user == t.user {
        Decision::Allowed(pid, t.secret)
    } else {
        Decision::OtherRole(t.user)
    })
}

/// The value a parameter carries for a superuser's session the caller is not allowed to
/// signal, and for another role's session (see `ALLOWED`).
const SUPERUSER_DENIED: i32 = i32::MIN;
const SUPERUSER_DENIED_TEXT: &str = "-2147483648";
const ROLE_DENIED: i32 = -2147483646;
const ROLE_DENIED_TEXT: &str = "-2147483646";

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

/// `s` as an SQL string constant whatever `standard_conforming_strings` says.
fn literal(s: &str) -> String {
    format!("E'{}'", s.replace('\\', "\\\\").replace('\'', "''"))
}

/// A signal the gateway owes once the batch is sent: (kind, pid, secret).
pub type Owed = (Signal, i32, i32);

/// Per session: the prepared statements (by name) whose parameters are signalled pids.
#[derive(Default)]
pub struct Statements(HashMap<Vec<u8>, Vec<(usize, Signal)>>);

impl Statements {
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The batch with the signalling calls on virtual pids answered as described in the module
/// doc, and the signals owed; `None` when nothing changes (the common case: one substring scan,
/// and the Bind work only when the session prepared a signalling statement).
pub fn rewrite_batch(
    batch: &[u8],
    caller: i32,
    stmts: &mut Statements,
) -> Option<(Vec<u8>, Vec<Owed>)> {
    let named = names_a_signal(batch);
    if !named && stmts.is_empty() {
        return None;
    }
    let mut owed = Vec::new();
    let out = fe::rewrite_each(batch, |tag, body| match tag {
        fe::QUERY if named => rewrite(fe::query_text(body), caller, &mut owed)
            .0
            .map(|sql| {
                let mut m = Vec::with_capacity(sql.len() + 6);
                fe::query(&mut m, &String::from_utf8_lossy(&sql));
                m
            }),
        fe::PARSE => fe::parse_parse(body).ok().and_then(|p| {
            let (sql, params) = if named {
                rewrite(p.query, caller, &mut owed)
            } else {
                (None, Vec::new())
            };
            if params.is_empty() {
                stmts.0.remove(p.name);
            } else {
                stmts.0.insert(p.name.to_vec(), params);
            }
            let sql = sql?;
            let mut m = Vec::new();
            fe::write_parse(&mut m, p.name, &sql, p.param_types);
            Some(m)
        }),
        fe::BIND if !stmts.is_empty() => bind(body, caller, stmts, &mut owed),
        _ => None,
    })?;
    Some((out, owed))
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

/// A `Bind` of a signalling statement with its signalled pids replaced by `ALLOWED`.
fn bind(body: &[u8], caller: i32, stmts: &Statements, owed: &mut Vec<Owed>) -> Option<Vec<u8>> {
    let (portal, stmt, rest) = fe::parse_bind(body).ok()?;
    let slots = stmts.0.get(stmt)?;
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
    let mut replace: Vec<(usize, Vec<u8>)> = Vec::new();
    for &(k, signal) in slots {
        let Some(&(s, e, true)) = values.get(k) else {
            continue;
        };
        let raw = &rest[s..e];
        // The pid, and how a value of the same format and width is written.
        let (pid, width) = match format(k)? {
            0 => (
                std::str::from_utf8(raw).ok()?.trim().parse::<i64>().ok()?,
                0,
            ),
            1 if raw.len() == 4 => (i32::from_be_bytes(raw.try_into().ok()?) as i64, 4),
            1 if raw.len() == 8 => (i64::from_be_bytes(raw.try_into().ok()?), 8),
            _ => continue,
        };
        let Ok(pid) = i32::try_from(pid) else {
            continue;
        };
        let value = match decide(caller, pid) {
            Some(Decision::Allowed(pid, secret)) => {
                owed.push((signal, pid, secret));
                ALLOWED
            }
            Some(Decision::Superuser) => SUPERUSER_DENIED,
            Some(Decision::OtherRole(_)) => ROLE_DENIED,
            None => continue,
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

/// `sql` with its signalling calls rewritten (`None` if none is), and the parameters (index
/// from 0) that carry a signalled pid. Signals owed for constant pids go to `owed`.
fn rewrite(
    sql: &[u8],
    caller: i32,
    owed: &mut Vec<Owed>,
) -> (Option<Vec<u8>>, Vec<(usize, Signal)>) {
    let toks: Vec<Token> = Lexer::new(sql).collect();
    let mut params = Vec::new();
    if toks.iter().any(|t| t.kind == Kind::Unsure) {
        return (None, params);
    }
    // Stored bodies (a view, a default, a SQL PREPARE) run later: left alone.
    if let Some(first) = toks.iter().find(|t| t.kind == Kind::Word) {
        let w = first.text(sql);
        if [&b"create"[..], b"alter", b"prepare"]
            .iter()
            .any(|s| w.eq_ignore_ascii_case(s))
        {
            return (None, params);
        }
    }
    let is = |i: usize, k: Kind| toks.get(i).is_some_and(|t| t.kind == k);
    let mut out = Vec::new();
    let mut copied = 0;
    for i in 0..toks.len() {
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
        if start < copied {
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
        let replacement = match arg {
            [n] if n.kind == Kind::Number => {
                let Some(pid) = std::str::from_utf8(n.text(sql))
                    .ok()
                    .and_then(|s| s.parse::<i32>().ok())
                else {
                    continue;
                };
                // Where the server must decide, it runs the call itself when it would not
                // refuse it (then the pid is unknown to it: `false` and its warning).
                match decide(caller, pid) {
                    None => continue,
                    Some(Decision::Allowed(pid, secret)) => {
                        owed.push((signal, pid, secret));
                        format!("(SELECT true AS {name})")
                    }
                    Some(Decision::Superuser) => format!(
                        "(SELECT CASE WHEN {CURRENT_IS_SUPERUSER} THEN pg_catalog.{name}({args}) \
                         ELSE {} END AS {name})",
                        denied(signal, true)
                    ),
                    Some(Decision::OtherRole(role)) => format!(
                        "(SELECT CASE WHEN pg_catalog.pg_has_role({}, 'USAGE') \
                         OR pg_catalog.pg_has_role('pg_signal_backend', 'USAGE') \
                         THEN pg_catalog.{name}({args}) ELSE {} END AS {name})",
                        literal(&role),
                        denied(signal, false)
                    ),
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
                params.push((k - 1, signal));
                let a = String::from_utf8_lossy(&sql[arg[0].start..arg[arg.len() - 1].end]);
                // The Bind says which (`bind`); membership of the signalled session's role is
                // not in its value: only `pg_signal_backend`'s is checked there.
                format!(
                    "(SELECT CASE WHEN ({a}) = {ALLOWED_TEXT} THEN true \
                     WHEN ({a}) = {SUPERUSER_DENIED_TEXT} AND NOT {CURRENT_IS_SUPERUSER} THEN {} \
                     WHEN ({a}) = {ROLE_DENIED_TEXT} \
                     AND NOT pg_catalog.pg_has_role('pg_signal_backend', 'USAGE') THEN {} \
                     ELSE pg_catalog.{name}({args}) END AS {name})",
                    denied(signal, true),
                    denied(signal, false)
                )
            }
            _ => continue,
        };
        out.extend_from_slice(&sql[copied..start]);
        out.extend_from_slice(replacement.as_bytes());
        copied = toks[close].end;
    }
    if copied == 0 {
        return (None, params);
    }
    out.extend_from_slice(&sql[copied..]);
    (Some(out), params)
}

#[cfg(test)]
mod tests {
    use super::*;

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

    fn r(sql: &str, caller: i32) -> (Option<String>, Vec<(usize, Signal)>, Vec<Owed>) {
        let mut owed = Vec::new();
        let (s, p) = rewrite(sql.as_bytes(), caller, &mut owed);
        (s.map(|s| String::from_utf8(s).unwrap()), p, owed)
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
    fn who_may_signal_whom() {
        let alice = Registration::new("alice", 11);
        let alice2 = Registration::new("alice", 12);
        let bob = Registration::new("bob", 13);
        let root = Registration::new("root", 14);
        root.logged_in(&[status("server_version", "15"), status("is_superuser", "on")].concat());
        alice.logged_in(&status("is_superuser", "off"));
        let allowed = |caller, pid| decide(caller, pid);
        assert_eq!(
            allowed(alice.pid, alice2.pid),
            Some(Decision::Allowed(alice2.pid, 12))
        );
        assert_eq!(
            allowed(alice.pid, alice.pid),
            Some(Decision::Allowed(alice.pid, 11))
        );
        assert_eq!(
            allowed(alice.pid, bob.pid),
            Some(Decision::OtherRole("bob".into()))
        );
        assert_eq!(allowed(alice.pid, root.pid), Some(Decision::Superuser));
        assert_eq!(
            allowed(root.pid, bob.pid),
            Some(Decision::Allowed(bob.pid, 13))
        );
        // Real pids and pids of nobody are the server's to answer.
        assert_eq!(allowed(root.pid, 4242), None);
        let gone = alice2.pid;
        drop(alice2);
        assert_eq!(allowed(alice.pid, gone), None);
    }

    #[test]
    fn denied_calls_are_left_to_the_servers_check() {
        let a = Registration::new("erin", 41);
        let b = Registration::new("o'\\hara", 42);
        let root = Registration::new("root2", 43);
        root.logged_in(&status("is_superuser", "on"));
        let (sql, _, owed) = r(&format!("SELECT pg_cancel_backend({})", b.pid), a.pid);
        assert!(owed.is_empty());
        assert_eq!(
            sql.unwrap(),
            format!(
                "SELECT (SELECT CASE WHEN pg_catalog.pg_has_role(E'o''\\\\hara', 'USAGE') \
                 OR pg_catalog.pg_has_role('pg_signal_backend', 'USAGE') \
                 THEN pg_catalog.pg_cancel_backend({}) ELSE pg_catalog.current_setting(\
                 'tidepool.signal_denied_cancel_member')::boolean END AS pg_cancel_backend)",
                b.pid
            )
        );
        let (sql, _, owed) = r(
            &format!("SELECT pg_terminate_backend({}, 10)", root.pid),
            a.pid,
        );
        assert!(owed.is_empty());
        assert_eq!(
            sql.unwrap(),
            format!(
                "SELECT (SELECT CASE WHEN {CURRENT_IS_SUPERUSER} \
                 THEN pg_catalog.pg_terminate_backend({}, 10) ELSE pg_catalog.current_setting(\
                 'tidepool.signal_denied_terminate_superuser')::boolean \
                 END AS pg_terminate_backend)",
                root.pid
            )
        );
        // In a Bind: the decision's value, in the parameter's format and width.
        let mut stmts = Statements::default();
        let mut parse = Vec::new();
        fe::write_parse(
            &mut parse,
            b"t",
            b"SELECT pg_terminate_backend($1)",
            &[0, 0],
        );
        rewrite_batch(&parse, a.pid, &mut stmts).unwrap();
        for (pid, value) in [(b.pid, ROLE_DENIED), (root.pid, SUPERUSER_DENIED)] {
            let mut rest = vec![0, 1, 0, 1, 0, 1, 0, 0, 0, 8];
            rest.extend_from_slice(&(pid as i64).to_be_bytes());
            rest.extend_from_slice(&[0, 0]);
            let mut bind_msg = Vec::new();
            fe::write_bind(&mut bind_msg, b"", b"t", &rest);
            let (out, owed) = rewrite_batch(&bind_msg, a.pid, &mut stmts).unwrap();
            assert!(owed.is_empty());
            assert!(out.ends_with(&[&(value as i64).to_be_bytes()[..], &[0, 0]].concat()));
            let text = pid.to_string();
            let mut rest = vec![0, 0, 0, 1];
            rest.extend_from_slice(&(text.len() as i32).to_be_bytes());
            rest.extend_from_slice(text.as_bytes());
            rest.extend_from_slice(&[0, 0]);
            let mut bind_msg = Vec::new();
            fe::write_bind(&mut bind_msg, b"", b"t", &rest);
            let (out, _) = rewrite_batch(&bind_msg, a.pid, &mut stmts).unwrap();
            let text = value.to_string();
            assert!(out.ends_with(&[text.as_bytes(), &[0, 0]].concat()));
        }
    }

    #[test]
    fn constant_and_parameter_calls_are_rewritten() {
        let a = Registration::new("carol", 21);
        let b = Registration::new("carol", 22);
        let (sql, params, owed) = r(&format!("SELECT pg_terminate_backend({})", b.pid), a.pid);
        assert_eq!(
            sql.as_deref(),
            Some("SELECT (SELECT true AS pg_terminate_backend)")
        );
        assert!(params.is_empty());
        assert_eq!(owed, vec![(Signal::Terminate, b.pid, 22)]);
        let (sql, _, owed) = r(
            &format!("select PG_CATALOG.pg_cancel_backend ( {} );", b.pid),
            a.pid,
        );
        assert_eq!(
            sql.as_deref(),
            Some("select (SELECT true AS pg_cancel_backend);")
        );
        assert_eq!(owed, vec![(Signal::Cancel, b.pid, 22)]);
        // A real pid, nobody's pid, an expression: the server's.
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
        let (sql, params, owed) = r("SELECT pg_terminate_backend($1::int, 500)", a.pid);
        assert_eq!(
            sql.as_deref(),
            Some(
                "SELECT (SELECT CASE WHEN ($1::int) = -2147483647 THEN true \
                 WHEN ($1::int) = -2147483648 AND NOT (SELECT r.rolsuper FROM \
                 pg_catalog.pg_roles r WHERE r.rolname = CURRENT_USER) THEN \
                 pg_catalog.current_setting('tidepool.signal_denied_terminate_superuser')::boolean \
                 WHEN ($1::int) = -2147483646 AND NOT pg_catalog.pg_has_role('pg_signal_backend', \
                 'USAGE') THEN \
                 pg_catalog.current_setting('tidepool.signal_denied_terminate_member')::boolean \
                 ELSE pg_catalog.pg_terminate_backend($1::int, 500) END AS pg_terminate_backend)"
            )
        );
        assert_eq!(params, vec![(0, Signal::Terminate)]);
        assert!(owed.is_empty());
        assert_eq!(
            r("CREATE VIEW v AS SELECT pg_cancel_backend($1)", a.pid).0,
            None
        );
    }

    #[test]
    fn a_bind_carries_the_decision() {
        let a = Registration::new("dave", 31);
        let b = Registration::new("dave", 32);
        let mut stmts = Statements::default();
        let mut batch = Vec::new();
        fe::write_parse(&mut batch, b"s", b"SELECT pg_cancel_backend($1)", &[0, 0]);
        let (out, owed) = rewrite_batch(&batch, a.pid, &mut stmts).unwrap();
        assert!(owed.is_empty());
        assert!(String::from_utf8_lossy(&out).contains("CASE WHEN ($1) = -2147483647"));
        // Bind with a binary int4 of b's pid, in a later batch.
        let mut rest = vec![0, 1, 0, 1, 0, 1, 0, 0, 0, 4];
        rest.extend_from_slice(&b.pid.to_be_bytes());
        rest.extend_from_slice(&[0, 0]);
        let mut bind_msg = Vec::new();
        fe::write_bind(&mut bind_msg, b"", b"s", &rest);
        let (out, owed) = rewrite_batch(&bind_msg, a.pid, &mut stmts).unwrap();
        assert_eq!(owed, vec![(Signal::Cancel, b.pid, 32)]);
        let mut expect_rest = vec![0, 1, 0, 1, 0, 1, 0, 0, 0, 4];
        expect_rest.extend_from_slice(&ALLOWED.to_be_bytes());
        expect_rest.extend_from_slice(&[0, 0]);
        let mut expect = Vec::new();
        fe::write_bind(&mut expect, b"", b"s", &expect_rest);
        assert_eq!(out, expect);
        // A text value of a real pid: unchanged.
        let mut rest = vec![0, 0, 0, 1, 0, 0, 0, 4];
        rest.extend_from_slice(b"4242");
        rest.extend_from_slice(&[0, 0]);
        let mut bind_msg = Vec::new();
        fe::write_bind(&mut bind_msg, b"", b"s", &rest);
        assert!(rewrite_batch(&bind_msg, a.pid, &mut stmts).is_none());
        // Re-parsed as something else: forgotten.
        let mut parse = Vec::new();
        fe::write_parse(&mut parse, b"s", b"SELECT $1", &[0, 0]);
        assert!(rewrite_batch(&parse, a.pid, &mut stmts).is_none());
        assert!(stmts.is_empty());
    }
}
