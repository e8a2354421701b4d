//! Prepared statements as the pooler names them on backends, and what the relay needs to map a
//! rewritten `Query`'s replies back to the client: data only, used by the response state
//! machine (`responses.rs`) below and the writers (`session.rs`, `sql_names.rs`) above.

use crate::budget::UserBudget;
use shared::protocol::backend as be;
use shared::protocol::put_message;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// A session's prepared statements by the name its client gave them (one namespace for
/// protocol-level and SQL `PREPARE`, as in Postgres), and the bytes they hold: bounded by the
/// pooler's `max_session_statement_bytes` where a client makes one (session.rs), so that one
/// session preparing without end cannot grow the pooler without end, and, with the other
/// sessions of its user, by `max_user_statement_bytes`, so that many sessions cannot either
/// (issue 12 §3).
///
/// The user's count is one atomic shared by the user's sessions on every core (its
/// `UserBudget`, found when the session opened), moved by what a session's count moves, where
/// it moves: a `Parse` or SQL `PREPARE`/`DEALLOCATE`, never a `Bind` or `Execute`. What a
/// session holds is given back when it ends (`Drop`). Checked before a statement is made and
/// charged after, so sessions of one user on several cores preparing at the same instant may
/// pass the user's bound by a statement each.
#[derive(Default)]
pub struct Statements {
    map: RefCell<HashMap<Vec<u8>, Rc<Stmt>>>,
    bytes: Cell<usize>,
    user: Arc<UserBudget>,
}

/// The bounds on a session's statements, in bytes ([`cost`]): its own and its user's.
#[derive(Clone, Copy, Debug)]
pub struct Bounds {
    pub session: usize,
    pub user: usize,
}

/// The bound a new statement would pass, and its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Past {
    Session(usize),
    User(usize),
}

/// What a statement is counted for in its session's bound: its name, its text (the `Parse`
/// message, and a SQL `PREPARE`'s two texts) and the bookkeeping around them (map entry,
/// `Stmt`), so that many tiny statements are bounded too. Counted whole in every session that
/// names it, though sessions share one `Stmt` per text: an upper bound.
pub fn cost(name: &[u8], stmt: &Stmt) -> usize {
    let sql = stmt
        .sql
        .as_ref()
        .map_or(0, |d| d.prepare.len() + d.source.len());
    cost_of(name.len(), stmt.parse.len() + sql)
}

/// [`cost`] of a statement named `name_len` bytes whose texts take `texts` bytes.
pub fn cost_of(name_len: usize, texts: usize) -> usize {
    const OVERHEAD: usize = 128;
    OVERHEAD + name_len + texts
}

impl Statements {
    /// A session's statements, counted also in `user`'s (shared with its other sessions).
    pub fn of_user(user: Arc<UserBudget>) -> Statements {
        Statements {
            map: RefCell::default(),
            bytes: Cell::new(0),
            user,
        }
    }

    pub fn borrow(&self) -> std::cell::Ref<'_, HashMap<Vec<u8>, Rc<Stmt>>> {
        self.map.borrow()
    }

    /// Bytes held (see [`cost`]).
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes.get()
    }

    /// The bound that naming `stmt` as `name` (new, or replacing what has that name) would
    /// pass, if any.
    pub fn past(&self, name: &[u8], stmt: &Stmt, bounds: Bounds) -> Option<Past> {
        let freed = self.map.borrow().get(name).map_or(0, |old| cost(name, old));
        self.past_adding(cost(name, stmt), freed, bounds)
    }

    /// The bound that statements of `more` bytes, made where statements of `freed` bytes go,
    /// would pass, if any.
    pub fn past_adding(&self, more: usize, freed: usize, bounds: Bounds) -> Option<Past> {
        if self.bytes.get() - freed + more > bounds.session {
            return Some(Past::Session(bounds.session));
        }
        let user = self.user.statement_bytes.load(Ordering::Relaxed);
        (more > freed && user.saturating_sub(freed) + more > bounds.user)
            .then_some(Past::User(bounds.user))
    }

    /// The session's count is now `bytes`: the user's moves as much.
    fn set_bytes(&self, bytes: usize) {
        let was = self.bytes.replace(bytes);
        let user = &self.user.statement_bytes;
        if bytes > was {
            user.fetch_add(bytes - was, Ordering::Relaxed);
        } else if was > bytes {
            user.fetch_sub(was - bytes, Ordering::Relaxed);
        }
    }

    pub fn contains(&self, name: &[u8]) -> bool {
        self.map.borrow().contains_key(name)
    }

    pub fn insert(&self, name: Vec<u8>, stmt: Rc<Stmt>) {
        let add = cost(&name, &stmt);
        let freed = self.map.borrow().get(&name).map_or(0, |o| cost(&name, o));
        self.map.borrow_mut().insert(name, stmt);
        self.set_bytes(self.bytes.get() - freed + add);
    }

    /// Names `stmt` as `name` unless the name is taken.
    pub fn insert_if_absent(&self, name: Vec<u8>, stmt: Rc<Stmt>) {
        if !self.contains(&name) {
            self.insert(name, stmt);
        }
    }

    pub fn remove(&self, name: &[u8]) -> Option<Rc<Stmt>> {
        let old = self.map.borrow_mut().remove(name)?;
        self.set_bytes(self.bytes.get().saturating_sub(cost(name, &old)));
        Some(old)
    }

    /// Removes `name` if it names `stmt` itself.
    pub fn remove_if_same(&self, name: &[u8], stmt: &Rc<Stmt>) {
        let same = self
            .map
            .borrow()
            .get(name)
            .is_some_and(|s| Rc::ptr_eq(s, stmt));
        if same {
            self.remove(name);
        }
    }

    pub fn clear(&self) {
        self.map.borrow_mut().clear();
        self.set_bytes(0);
    }
}

/// The session ended: its statements no longer count for its user.
impl Drop for Statements {
    fn drop(&mut self) {
        self.set_bytes(0);
    }
}

/// The statements a backend has prepared, bounded: the least recently used is closed when a new
/// one would pass the limit.
#[derive(Default)]
pub struct Prepared {
    /// (last use, by `tick`; when the backend made it, by [`clock`]).
    used: HashMap<Rc<[u8]>, (u64, u64)>,
    tick: u64,
}

thread_local! {
    static CLOCK: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The order of statement events on this core (one thread): when a backend made its copy of a
/// statement, when a client prepared one. A copy made before the client prepared its statement
/// may have been stale from the start; one made after can only go stale by a later change.
pub fn clock() -> u64 {
    CLOCK.with(|c| {
        let t = c.get() + 1;
        c.set(t);
        t
    })
}

impl Prepared {
    /// Has it (and counts this as a use).
    pub fn touch(&mut self, name: &Rc<[u8]>) -> bool {
        self.tick += 1;
        match self.used.get_mut(name) {
            Some(t) => {
                t.0 = self.tick;
                true
            }
            None => false,
        }
    }

    pub fn insert(&mut self, name: Rc<[u8]>) {
        self.tick += 1;
        let tick = self.tick;
        self.used
            .entry(name)
            .and_modify(|t| t.0 = tick)
            .or_insert_with(|| (tick, clock()));
    }

    /// When this backend made its copy ([`clock`]).
    pub fn made(&self, name: &[u8]) -> Option<u64> {
        self.used.get(name).map(|t| t.1)
    }

    pub fn remove(&mut self, name: &[u8]) {
        self.used.remove(name);
    }

    pub fn clear(&mut self) {
        self.used.clear();
    }

    /// Has it (not counted as a use).
    pub fn contains(&self, name: &[u8]) -> bool {
        self.used.contains_key(name)
    }

    /// The least recently used statement other than `keep`, if there are more than `limit`.
    pub fn over(&self, limit: usize, keep: &[u8]) -> Option<Rc<[u8]>> {
        if self.used.len() <= limit {
            return None;
        }
        self.used
            .iter()
            .filter(|(n, _)| &***n != keep)
            .min_by_key(|(_, t)| t.0)
            .map(|(n, _)| n.clone())
    }
}

/// What Postgres compares when it checks a prepared statement's result type
/// (`equalTupleDescs` in `RevalidateCachedQuery`): per column its name, type and modifier, from
/// a `RowDescription` (its origin table and column are not compared); `NoData` is no column.
/// `None` for another message.
pub fn result_shape(msg: &[u8]) -> Option<Box<[u8]>> {
    match *msg.first()? {
        be::NO_DATA => return Some(Box::default()),
        be::ROW_DESCRIPTION => {}
        _ => return None,
    }
    let body = msg.get(5..)?;
    let n = u16::from_be_bytes([*body.first()?, *body.get(1)?]) as usize;
    let mut out = Vec::with_capacity(n * 24);
    let mut pos = 2;
    for _ in 0..n {
        let end = pos + body.get(pos..)?.iter().position(|&c| c == 0)?;
        // name NUL, table oid (4), column (2), type oid (4), size (2), modifier (4), format (2)
        let field = body.get(end + 1..end + 19)?;
        out.extend_from_slice(&body[pos..=end]);
        out.extend_from_slice(&field[6..10]);
        out.extend_from_slice(&field[12..16]);
        pos = end + 19;
    }
    Some(out.into_boxed_slice())
}

/// A prepared statement, named on backends by its content: made by a protocol-level `Parse` or
/// by SQL `PREPARE` (one namespace per session, as in Postgres).
pub struct Stmt {
    /// `tp_` + hash of (query, parameter types): equal statements share one name everywhere.
    pub content: Rc<[u8]>,
    /// The whole `Parse` message under the content name, ready to inject.
    pub parse: Vec<u8>,
    /// Postgres has accepted it (somewhere on this core): a client's `Parse` of it can be
    /// answered without a backend.
    pub validated: std::cell::Cell<bool>,
    /// Made by SQL `PREPARE`.
    pub sql: Option<Box<SqlDef>>,
}

/// A statement made by SQL `PREPARE`.
pub struct SqlDef {
    /// `PREPARE <content> ...`: makes it on a backend.
    pub prepare: Box<[u8]>,
    /// The client's whole query text, as `pg_prepared_statements.statement` shows it.
    pub source: Box<[u8]>,
}

/// A client's simple `Query` whose prepared-statement names were replaced by backend names
/// (session.rs, `write_sql_query`).
#[derive(Default)]
pub struct SqlQuery {
    /// (backend name, client name): put back into error texts.
    pub renames: Vec<(Rc<[u8]>, Vec<u8>)>,
    /// Each replacement, in order: (character offset in the client's text, characters
    /// replaced, characters put in): error positions are mapped back.
    pub edits: Vec<(u32, u32, u32)>,
    /// What to undo if statement `.0` of the text does not complete.
    pub undo: Vec<(u32, Undo)>,
    /// Statements of the text completed so far (one `CommandComplete` each).
    pub completed: u32,
    /// `pg_prepared_statements` was replaced: its columns get their origin back in
    /// `RowDescription` (see `fix_origins`).
    pub view: bool,
}

/// Columns of `pg_prepared_statements` (Postgres 15): name and type OID.
const VIEW_COLUMNS: [(&[u8], u32); 7] = [
    (b"name", 25),
    (b"statement", 25),
    (b"prepare_time", 1184),
    (b"parameter_types", 2211),
    (b"from_sql", 16),
    (b"generic_plans", 20),
    (b"custom_plans", 20),
];

/// A `RowDescription` whose columns taken from our replacement of `pg_prepared_statements`
/// (which has no single origin: a UNION) name the view as their origin again, as a column of
/// the view itself does: a field without origin whose name and type are a view column's.
pub fn fix_origins(msg: &[u8], view_oid: u32) -> Option<Vec<u8>> {
    let body = msg.get(5..)?;
    let n = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    let mut out = Vec::with_capacity(msg.len());
    let mut pos = 2;
    put_message(&mut out, be::ROW_DESCRIPTION, |m| {
        m.extend_from_slice(&body[..2]);
        for _ in 0..n.max(0) {
            let Some(nul) = body.get(pos..).and_then(|b| b.iter().position(|&c| c == 0)) else {
                return;
            };
            let name = &body[pos..pos + nul];
            let Some(f) = body.get(pos + nul + 1..pos + nul + 19) else {
                return;
            };
            let table = u32::from_be_bytes([f[0], f[1], f[2], f[3]]);
            let ty = u32::from_be_bytes([f[6], f[7], f[8], f[9]]);
            m.extend_from_slice(&body[pos..pos + nul + 1]);
            match VIEW_COLUMNS
                .iter()
                .position(|(c, t)| *c == name && *t == ty)
                .filter(|_| table == 0)
            {
                Some(i) => {
                    m.extend_from_slice(&view_oid.to_be_bytes());
                    m.extend_from_slice(&(i as i16 + 1).to_be_bytes());
                    m.extend_from_slice(&f[6..]);
                }
                None => m.extend_from_slice(f),
            }
            pos += nul + 19;
        }
    });
    (pos == body.len()).then_some(out)
}

pub enum Undo {
    /// PREPARE gave the session this name.
    Unname(Vec<u8>, Rc<Stmt>),
    /// DEALLOCATE took this name.
    Rename(Vec<u8>, Rc<Stmt>),
    /// PREPARE made this on the backend.
    Absent(Rc<[u8]>),
    /// DEALLOCATE removed this from the backend.
    Present(Rc<[u8]>),
}

impl SqlQuery {
    /// A client position (1-based characters) for a position in the rewritten text.
    fn client_position(&self, p: u32) -> u32 {
        let at = p.saturating_sub(1);
        let mut shift: i64 = 0;
        for &(start, old, new) in &self.edits {
            let here = (start as i64 + shift) as u32;
            if at < here {
                break;
            }
            if at < here + new {
                return start + 1;
            }
            shift += new as i64 - old as i64;
        }
        (p as i64 - shift).max(1) as u32
    }

    /// The error with client names and client positions.
    pub fn client_error(&self, tag: u8, body: &[u8]) -> Vec<u8> {
        let mut msg = Vec::with_capacity(body.len() + 5);
        put_message(&mut msg, tag, |m| m.extend_from_slice(body));
        for (from, to) in &self.renames {
            let mut out = Vec::with_capacity(msg.len());
            be::rename_in_error(&mut out, tag, &msg[5..], from, to);
            msg = out;
        }
        let Ok(fields) = be::error_fields(&msg[5..]) else {
            return msg;
        };
        let mut out = Vec::with_capacity(msg.len());
        put_message(&mut out, tag, |m| {
            for (code, value) in fields {
                m.push(code);
                let p = (code == b'P')
                    .then(|| std::str::from_utf8(value).ok()?.parse::<u32>().ok())
                    .flatten();
                match p {
                    Some(p) => shared::protocol::put_cstr(
                        m,
                        self.client_position(p).to_string().as_bytes(),
                    ),
                    None => shared::protocol::put_cstr(m, value),
                }
            }
            m.push(0);
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::protocol::put_cstr;

    fn stmt(text: &str) -> Rc<Stmt> {
        Rc::new(Stmt {
            content: Rc::from(&b"tp_x"[..]),
            parse: text.as_bytes().to_vec(),
            validated: std::cell::Cell::new(false),
            sql: None,
        })
    }

    #[test]
    fn a_sessions_statements_count_what_they_hold() {
        let s = Statements::default();
        let (a, b) = (stmt("SELECT 1"), stmt(&"x".repeat(1000)));
        let session = |n| Bounds {
            session: n,
            user: usize::MAX,
        };
        assert_eq!(s.past(b"a", &a, session(cost(b"a", &a))), None);
        let less = cost(b"a", &a) - 1;
        assert_eq!(s.past(b"a", &a, session(less)), Some(Past::Session(less)));
        s.insert(b"a".to_vec(), a.clone());
        assert_eq!(s.bytes(), cost(b"a", &a));
        // Replacing a name counts the new statement instead of the old one.
        assert_eq!(s.past(b"a", &b, session(cost(b"a", &b))), None);
        s.insert(b"a".to_vec(), b.clone());
        assert_eq!(s.bytes(), cost(b"a", &b));
        s.insert_if_absent(b"a".to_vec(), a.clone());
        s.insert_if_absent(b"c".to_vec(), a.clone());
        assert_eq!(s.bytes(), cost(b"a", &b) + cost(b"c", &a));
        s.remove_if_same(b"c", &b);
        assert!(s.contains(b"c"));
        s.remove_if_same(b"c", &a);
        assert_eq!(s.remove(b"c").map(|_| ()), None);
        assert_eq!(s.bytes(), cost(b"a", &b));
        s.clear();
        assert_eq!(s.bytes(), 0);
        assert!(!s.contains(b"a"));
    }

    #[test]
    fn a_users_sessions_count_together_until_they_end() {
        let user = Arc::new(UserBudget::default());
        let (s1, s2) = (
            Statements::of_user(user.clone()),
            Statements::of_user(user.clone()),
        );
        let other = Statements::default();
        let a = stmt(&"x".repeat(1000));
        let one = cost(b"a", &a);
        let bounds = Bounds {
            session: 2 * one,
            user: 3 * one,
        };
        s1.insert(b"a".to_vec(), a.clone());
        s1.insert(b"b".to_vec(), stmt(&"y".repeat(1000)));
        assert_eq!(s2.past(b"a", &a, bounds), None);
        s2.insert(b"a".to_vec(), a.clone());
        assert_eq!(user.statement_bytes.load(Ordering::Relaxed), 3 * one);
        // Within its own bound, past its user's.
        assert_eq!(s2.past(b"b", &a, bounds), Some(Past::User(3 * one)));
        // Replacing what a name holds adds nothing.
        assert_eq!(s2.past(b"a", &a, bounds), None);
        assert_eq!(other.past(b"a", &a, bounds), None);
        // Freed by a Close, by DISCARD ALL, and by the session's end.
        s1.remove(b"b");
        assert_eq!(s2.past(b"b", &a, bounds), None);
        s1.clear();
        assert_eq!(user.statement_bytes.load(Ordering::Relaxed), one);
        s1.insert(b"a".to_vec(), a.clone());
        drop(s1);
        assert_eq!(user.statement_bytes.load(Ordering::Relaxed), one);
        drop(s2);
        assert_eq!(user.statement_bytes.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn positions_map_back_to_the_clients_text() {
        // "EXECUTE foo('x')" became "EXECUTE tp_<32 hex>('x')": foo (3 chars at 8) → 35 chars.
        let q = SqlQuery {
            edits: vec![(8, 3, 35), (20, 1, 35)],
            ..Default::default()
        };
        assert_eq!(q.client_position(1), 1);
        assert_eq!(q.client_position(8), 8);
        // Inside the replacement: the start of the client's name.
        assert_eq!(q.client_position(9), 9);
        assert_eq!(q.client_position(43), 9);
        // After it: shifted back by 32.
        assert_eq!(q.client_position(44), 12);
        assert_eq!(q.client_position(52), 20);
        // After the second one too.
        assert_eq!(q.client_position(53 + 35), 22);
    }

    #[test]
    fn view_columns_get_their_origin_back() {
        let mut rd = Vec::new();
        put_message(&mut rd, be::ROW_DESCRIPTION, |m| {
            m.extend_from_slice(&2i16.to_be_bytes());
            for (name, table, ty) in [(&b"name"[..], 0u32, 25u32), (b"other", 0, 25)] {
                put_cstr(m, name);
                m.extend_from_slice(&table.to_be_bytes());
                m.extend_from_slice(&0i16.to_be_bytes());
                m.extend_from_slice(&ty.to_be_bytes());
                m.extend_from_slice(&(-1i16).to_be_bytes());
                m.extend_from_slice(&(-1i32).to_be_bytes());
                m.extend_from_slice(&0i16.to_be_bytes());
            }
        });
        let fixed = fix_origins(&rd, 12095).unwrap();
        assert_eq!(fixed.len(), rd.len());
        // "name": table 12095, column 1; "other" untouched.
        assert_eq!(&fixed[12..18], &[0, 0, 0x2f, 0x3f, 0, 1]);
        assert_eq!(&fixed[37..], &rd[37..]);
        assert!(fix_origins(&rd[..rd.len() - 3], 1).is_none());
    }

    #[test]
    fn a_copy_knows_when_it_was_made_and_use_does_not_change_it() {
        let mut p = Prepared::default();
        let (a, b): (Rc<[u8]>, Rc<[u8]>) = (Rc::from(&b"tp_a"[..]), Rc::from(&b"tp_b"[..]));
        p.insert(a.clone());
        let client_prepared = clock();
        p.insert(b.clone());
        let (made_a, made_b) = (p.made(&a).unwrap(), p.made(&b).unwrap());
        assert!(made_a < client_prepared && client_prepared < made_b);
        assert!(p.touch(&a));
        p.insert(a.clone());
        assert_eq!(p.made(&a), Some(made_a));
        // Least recently used is still by use: b now.
        assert_eq!(p.over(1, b"tp_a").as_deref(), Some(&b"tp_b"[..]));
        p.remove(&b);
        assert_eq!(p.made(&b), None);
    }

    #[test]
    fn a_result_shape_is_names_types_and_modifiers() {
        let rd = |cols: &[(&[u8], u32, u32, i32)]| {
            let mut m = Vec::new();
            put_message(&mut m, be::ROW_DESCRIPTION, |b| {
                b.extend_from_slice(&(cols.len() as i16).to_be_bytes());
                for &(name, table, ty, typmod) in cols {
                    put_cstr(b, name);
                    b.extend_from_slice(&table.to_be_bytes());
                    b.extend_from_slice(&1i16.to_be_bytes());
                    b.extend_from_slice(&ty.to_be_bytes());
                    b.extend_from_slice(&4i16.to_be_bytes());
                    b.extend_from_slice(&typmod.to_be_bytes());
                    b.extend_from_slice(&0i16.to_be_bytes());
                }
            });
            result_shape(&m).unwrap()
        };
        let a = rd(&[(b"a", 100, 23, -1)]);
        // Another table of the same shape: the same result type, as Postgres compares.
        assert_eq!(a, rd(&[(b"a", 200, 23, -1)]));
        assert_ne!(a, rd(&[(b"a", 100, 20, -1)]));
        assert_ne!(a, rd(&[(b"b", 100, 23, -1)]));
        assert_ne!(a, rd(&[(b"a", 100, 23, -1), (b"b", 100, 25, -1)]));
        assert_ne!(rd(&[(b"v", 1, 1043, 14)]), rd(&[(b"v", 1, 1043, 24)]));
        let mut no_data = Vec::new();
        put_message(&mut no_data, be::NO_DATA, |_| {});
        assert_eq!(result_shape(&no_data).as_deref(), Some(&[][..]));
        assert_eq!(result_shape(b"Z\0\0\0\x05I"), None);
        assert_eq!(result_shape(&[b'T', 0, 0, 0, 8, 0, 1, b'a']), None);
    }
}
