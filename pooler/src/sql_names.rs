//! SQL `PREPARE`/`EXECUTE`/`DEALLOCATE` in the pooler's one statement namespace per session
//! (docs/decisions/2026-11-21-one-statement-namespace.md): the names the gateway found in a
//! `Query` (`up::NAMES`) become backend names, the statements a text uses are made on the
//! backend first, and the relay maps replies back (names in errors, error positions, the
//! origin of `pg_prepared_statements`' columns) and undoes what statements that did not run
//! would have changed.

use crate::backend::Backend;
use crate::responses::{Entry, Internal, Kind};
use crate::statements::{SqlDef, SqlQuery, Statements, Stmt, Undo};
use shared::protocol::frontend as fe;
use shared::protocol::{put_cstr, put_message};
use std::cell::Cell;
use std::rc::Rc;

/// A prepared-statement name in the SQL text of a `Query` (see the gateway's
/// `statement_names.rs` and `up::NAMES`).
#[derive(Debug, Clone)]
pub struct SqlName {
    /// Offset of the `Query` message in its batch.
    pub offset: u32,
    kind: u8,
    /// Which statement of the text.
    stmt: u32,
    start: usize,
    end: usize,
    stmt_end: usize,
    name: Vec<u8>,
}

/// Kinds of [`SqlName`] (the gateway's `statement_names::kind`).
const NAME_PREPARE: u8 = 1;
const NAME_USE: u8 = 2;
const NAME_DEALLOCATE: u8 = 3;
const NAME_VIEW: u8 = 4;
const NAME_VIEW_BARE: u8 = 5;

pub fn parse_names(mut p: &[u8]) -> Vec<SqlName> {
    let mut out = Vec::new();
    let u32_at = |p: &[u8], i: usize| -> Option<u32> {
        Some(u32::from_be_bytes(p.get(i..i + 4)?.try_into().ok()?))
    };
    while !p.is_empty() {
        let (Some(offset), Some(&kind), Some(stmt), Some(start), Some(end), Some(stmt_end)) = (
            u32_at(p, 0),
            p.get(4),
            u32_at(p, 5),
            u32_at(p, 9),
            u32_at(p, 13),
            u32_at(p, 17),
        ) else {
            break;
        };
        let Some(len) = u32_at(p, 21) else { break };
        let Some(name) = p.get(25..25 + len as usize) else {
            break;
        };
        out.push(SqlName {
            offset,
            kind,
            stmt,
            start: start as usize,
            end: end as usize,
            stmt_end: stmt_end as usize,
            name: name.to_vec(),
        });
        p = &p[25 + len as usize..];
    }
    out
}

/// Makes sure the backend has `stmt`, preparing it there first if not. `in_batch`: between a
/// client's extended-protocol messages (no `Sync` may be added; an error skips to the client's
/// `Sync`, as the client's own message would have); else before a simple `Query`, synced on
/// its own and its responses (errors too) dropped: the client's statement then reports.
pub fn ensure<P>(b: &Rc<Backend<P>>, stmt: &Rc<Stmt>, limit: usize, in_batch: bool) {
    if b.st.borrow_mut().prepared.touch(&stmt.content) {
        return;
    }
    b.add_prepared(stmt.content.clone(), limit);
    match (&stmt.sql, in_batch) {
        (None, true) => b.send(
            &stmt.parse,
            Some(Entry::Parse {
                stmt: stmt.clone(),
                injected: true,
                client_name: None,
            }),
        ),
        (None, false) => {
            let mut m = stmt.parse.clone();
            put_message(&mut m, fe::SYNC, |_| {});
            b.send(&m, Some(inject(stmt, true)));
        }
        (Some(def), true) => {
            let sql = &def.prepare;
            // SQL PREPARE through the unnamed statement and portal, which a Bind or Describe
            // of a named statement does not need (the client's unnamed statement is prepared
            // again if it is used later: see `statement_for`).
            let mut m = Vec::new();
            fe::write_parse(&mut m, b"", sql, &[0, 0]);
            b.send(&m, Some(Entry::Evicted));
            m.clear();
            fe::write_bind(&mut m, b"", b"", &[0, 0, 0, 0, 0, 0]);
            b.send(&m, Some(Entry::Evicted));
            m.clear();
            put_message(&mut m, fe::EXECUTE, |m| {
                m.push(0);
                m.extend_from_slice(&0i32.to_be_bytes());
            });
            b.send(&m, Some(Entry::Evicted));
            b.st.borrow_mut().unnamed = None;
        }
        (Some(def), false) => {
            let sql = &def.prepare;
            let mut m = Vec::new();
            put_message(&mut m, fe::QUERY, |m| put_cstr(m, sql));
            b.send(&m, Some(inject(stmt, true)));
        }
    }
}

fn inject(stmt: &Rc<Stmt>, made: bool) -> Entry {
    Entry::Internal(Internal::Inject {
        content: stmt.content.clone(),
        made,
    })
}

/// What the statements a `Query` (`msg`) makes by SQL `PREPARE` under names the session does
/// not have yet would add to its bound ([`crate::statements::cost`] of each, as
/// [`sql_statement`] makes them).
pub fn new_prepare_bytes(statements: &Statements, msg: &[u8], names: &[SqlName]) -> usize {
    let sql = fe::query_text(&msg[5..]);
    names
        .iter()
        .filter(|n| n.kind == NAME_PREPARE && !statements.contains(&n.name))
        .map(|n| {
            let rest = n.stmt_end.max(n.end).min(sql.len()) - n.end.min(sql.len());
            // `SqlDef::prepare` is `PREPARE tp_<32 hex><rest>`; `source`, the whole text.
            let prepare = b"PREPARE tp_".len() + 32 + rest;
            crate::statements::cost_of(n.name.len(), prepare + sql.len())
        })
        .sum()
}

/// A statement made by SQL `PREPARE name <rest>`, named on backends by (name, rest): sessions
/// that prepare the same text under the same name share it on a backend.
fn sql_statement(name: &[u8], rest: &[u8], source: &[u8]) -> Rc<Stmt> {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"\0sql\0");
    h.update((name.len() as u64).to_be_bytes());
    h.update(name);
    h.update(rest);
    let digest = h.finalize();
    let mut content = Vec::with_capacity(3 + 32);
    content.extend_from_slice(b"tp_");
    for byte in &digest[..16] {
        content.extend_from_slice(format!("{byte:02x}").as_bytes());
    }
    let mut sql = Vec::with_capacity(8 + content.len() + rest.len());
    sql.extend_from_slice(b"PREPARE ");
    sql.extend_from_slice(&content);
    sql.extend_from_slice(rest);
    Rc::new(Stmt {
        content: Rc::from(content),
        parse: Vec::new(),
        validated: Cell::new(true),
        sql: Some(Box::new(SqlDef {
            prepare: sql.into(),
            source: source.into(),
        })),
    })
}

/// Copies of the session's SQL-prepared statements under the client's own names on `b`, before
/// a batch in which Postgres itself may look one up by that name: dynamic SQL in a function
/// (`EXECUTE name` in PL/pgSQL) or SQL inside a protocol `Parse` (psql's `\gdesc`). On
/// backends they are otherwise named by content (`tp_…`), which only the gateway's mapping of
/// the client's own text knows. The copies live while the session holds `b` (no other session
/// can see them) and are deallocated before `b` goes back to its pool (`drop_real_names`).
pub fn real_names<P>(statements: &Statements, b: &Rc<Backend<P>>) {
    let wanted: Vec<(Vec<u8>, Rc<Stmt>)> = statements
        .borrow()
        .iter()
        .filter(|(_, st)| st.sql.is_some())
        .map(|(n, st)| (n.clone(), st.clone()))
        .collect();
    for (name, stmt) in wanted {
        let Some(def) = &stmt.sql else { continue };
        let have =
            b.st.borrow()
                .real_names
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, c)| c.clone());
        if have.as_deref() == Some(&*stmt.content) {
            continue;
        }
        let mut sql = Vec::new();
        if have.is_some() {
            sql.extend_from_slice(b"DEALLOCATE ");
            quote_ident(&mut sql, &name);
            send_quiet(b, &sql);
            sql.clear();
        }
        // `PREPARE <content><rest>` → `PREPARE "<name>"<rest>`.
        let rest = def
            .prepare
            .get(8 + stmt.content.len()..)
            .unwrap_or_default();
        sql.extend_from_slice(b"PREPARE ");
        quote_ident(&mut sql, &name);
        sql.extend_from_slice(rest);
        send_quiet(b, &sql);
        let mut st = b.st.borrow_mut();
        st.real_names.retain(|(n, _)| *n != name);
        st.real_names.push((name, stmt.content.clone()));
        // A simple Query drops the backend's unnamed statement.
        st.unnamed = None;
    }
}

/// Deallocates the real-name copies on `b` (it is going back to its pool).
pub fn drop_real_names<P>(b: &Backend<P>) {
    let names = std::mem::take(&mut b.st.borrow_mut().real_names);
    for (name, _) in names {
        let mut sql = b"DEALLOCATE ".to_vec();
        quote_ident(&mut sql, &name);
        send_quiet(b, &sql);
        b.st.borrow_mut().unnamed = None;
    }
}

fn send_quiet<P>(b: &Backend<P>, sql: &[u8]) {
    let mut m = Vec::new();
    put_message(&mut m, fe::QUERY, |m| put_cstr(m, sql));
    b.send(&m, Some(Entry::Internal(Internal::RealName)));
}

fn quote_ident(out: &mut Vec<u8>, name: &[u8]) {
    out.push(b'"');
    for &c in name {
        if c == b'"' {
            out.push(b'"');
        }
        out.push(c);
    }
    out.push(b'"');
}

/// A string literal of `text` that no setting changes the meaning of (dollar quoted).
fn dollar_literal(out: &mut Vec<u8>, text: &[u8]) {
    let mut tag = b"$tp$".to_vec();
    let mut n = 0u32;
    while text.windows(tag.len()).any(|w| w == tag.as_slice()) {
        n += 1;
        tag = format!("$tp{n}$").into_bytes();
    }
    out.extend_from_slice(&tag);
    out.extend_from_slice(text);
    out.extend_from_slice(&tag);
}

/// What replaces `pg_prepared_statements` in a client's query: the session's statements under
/// its own names (made on this backend first: parameter types and plan counts are the
/// backend's), and statements the backend has under client names (a pinned session's).
fn prepared_view<P>(
    statements: &Statements,
    b: &Rc<Backend<P>>,
    limit: usize,
    in_batch: bool,
    bare: bool,
) -> Vec<u8> {
    let mut stmts: Vec<(Vec<u8>, Rc<Stmt>)> = statements
        .borrow()
        .iter()
        .map(|(n, st)| (n.clone(), st.clone()))
        .collect();
    stmts.sort_by(|a, b| a.0.cmp(&b.0));
    if b.st.borrow().view_oid.is_none() {
        let mut m = Vec::new();
        fe::query(
            &mut m,
            "SELECT 'pg_catalog.pg_prepared_statements'::pg_catalog.regclass::pg_catalog.oid",
        );
        b.send(&m, Some(Entry::Internal(Internal::ViewOid)));
    }
    // More than the backend keeps: the rest show no parameter types, time or plan counts.
    let room = limit.saturating_sub(1);
    let mut v = b"(SELECT * FROM pg_catalog.pg_prepared_statements \
        WHERE name OPERATOR(pg_catalog.!~) '^tp_[0-9a-f]{32}$'"
        .to_vec();
    // Not the copies under client names (`real_names`): the session's statements follow.
    for (name, _) in &b.st.borrow().real_names {
        v.extend_from_slice(b" AND name OPERATOR(pg_catalog.<>) ");
        dollar_literal(&mut v, name);
    }
    if !stmts.is_empty() {
        v.extend_from_slice(
            b" UNION ALL (SELECT v.n, v.s, p.prepare_time, p.parameter_types, v.f, \
            p.generic_plans, p.custom_plans FROM (VALUES ",
        );
        for (i, (name, st)) in stmts.iter().enumerate() {
            if i < room {
                ensure(b, st, limit, in_batch);
            }
            if i > 0 {
                v.push(b',');
            }
            v.push(b'(');
            dollar_literal(&mut v, name);
            v.extend_from_slice(b"::text, ");
            match &st.sql {
                Some(def) => dollar_literal(&mut v, &def.source),
                None => {
                    let q = fe::parse_parse(st.parse.get(5..).unwrap_or_default())
                        .map(|p| p.query)
                        .unwrap_or_default();
                    dollar_literal(&mut v, q)
                }
            }
            v.extend_from_slice(b"::text, ");
            v.extend_from_slice(if st.sql.is_some() {
                b"true, "
            } else {
                b"false, "
            });
            dollar_literal(&mut v, &st.content);
            v.extend_from_slice(format!("::text, {i})").as_bytes());
        }
        // In name order, whatever join the planner picks (the backend's own order is that of
        // its hash table: not something to reproduce, but a stable one reads better).
        v.extend_from_slice(
            b") AS v(n, s, f, c, i) LEFT JOIN pg_catalog.pg_prepared_statements p ON p.name = v.c \
            ORDER BY v.i)",
        );
    }
    v.push(b')');
    if bare {
        v.extend_from_slice(b" AS pg_prepared_statements");
    }
    v
}

/// Number of characters (Postgres error positions count characters) in UTF-8 text.
fn chars(b: &[u8]) -> u32 {
    b.iter().filter(|&&c| c & 0xc0 != 0x80).count() as u32
}

/// A simple `Query` whose SQL names prepared statements: each name becomes its backend name,
/// the statements it uses are made on this backend first, and the session's namespace changes
/// as `PREPARE`/`DEALLOCATE` would change it (undone for statements that do not complete).
/// `statements`: the session's; `limit`: statements a backend may hold; `in_batch`: the `Query`
/// comes inside the client's unsynced extended-protocol messages (no `Sync` of ours).
pub fn write_sql_query<P>(
    statements: &Statements,
    limit: usize,
    in_batch: bool,
    b: &Rc<Backend<P>>,
    msg: &[u8],
    names: &[SqlName],
) {
    let sql = fe::query_text(&msg[5..]);
    let mut q = SqlQuery::default();
    let mut text = Vec::with_capacity(sql.len() + 64);
    let mut pos = 0;
    for n in names {
        if n.start < pos || n.end > sql.len() || n.start >= n.end || n.stmt_end > sql.len() {
            continue;
        }
        if n.kind == NAME_VIEW || n.kind == NAME_VIEW_BARE {
            let view = prepared_view(statements, b, limit, in_batch, n.kind == NAME_VIEW_BARE);
            q.view = true;
            text.extend_from_slice(&sql[pos..n.start]);
            text.extend_from_slice(&view);
            q.edits.push((
                chars(&sql[..n.start]),
                chars(&sql[n.start..n.end]),
                chars(&view),
            ));
            pos = n.end;
            continue;
        }
        let existing = statements.borrow().get(&n.name).cloned();
        let content = match (n.kind, existing) {
            // The name exists: the backend reports 42P05 for its statement, renamed back.
            (NAME_PREPARE, Some(st)) => {
                ensure(b, &st, limit, in_batch);
                st.content.clone()
            }
            (NAME_PREPARE, None) => {
                let st = sql_statement(&n.name, &sql[n.end..n.stmt_end.max(n.end)], sql);
                if b.st.borrow().prepared.contains(&st.content) {
                    // Another session made it here: made again by this PREPARE.
                    let mut m = Vec::new();
                    let mut d = b"DEALLOCATE ".to_vec();
                    d.extend_from_slice(&st.content);
                    put_message(&mut m, fe::QUERY, |m| put_cstr(m, &d));
                    b.st.borrow_mut().prepared.remove(&st.content);
                    b.send(&m, Some(inject(&st, false)));
                }
                statements.insert(n.name.clone(), st.clone());
                b.add_prepared(st.content.clone(), limit);
                q.undo
                    .push((n.stmt, Undo::Unname(n.name.clone(), st.clone())));
                q.undo.push((n.stmt, Undo::Absent(st.content.clone())));
                st.content.clone()
            }
            (NAME_USE, Some(st)) => {
                ensure(b, &st, limit, in_batch);
                st.content.clone()
            }
            (NAME_DEALLOCATE, Some(st)) => {
                ensure(b, &st, limit, in_batch);
                statements.remove(&n.name);
                b.st.borrow_mut().prepared.remove(&st.content);
                q.undo
                    .push((n.stmt, Undo::Rename(n.name.clone(), st.clone())));
                q.undo.push((n.stmt, Undo::Present(st.content.clone())));
                st.content.clone()
            }
            // Not a statement of ours: Postgres reports it under the client's name.
            _ => continue,
        };
        text.extend_from_slice(&sql[pos..n.start]);
        text.extend_from_slice(&content);
        q.edits.push((
            chars(&sql[..n.start]),
            chars(&sql[n.start..n.end]),
            content.len() as u32,
        ));
        if !q.renames.iter().any(|(c, _)| *c == content) {
            q.renames.push((content, n.name.clone()));
        }
        pos = n.end;
    }
    if q.edits.is_empty() && q.undo.is_empty() {
        b.send(msg, Some(Entry::Client(Kind::Query)));
        return;
    }
    text.extend_from_slice(&sql[pos..]);
    let mut m = Vec::with_capacity(text.len() + 6);
    put_message(&mut m, fe::QUERY, |m| put_cstr(m, &text));
    b.send(&m, Some(Entry::Sql(Box::new(q))));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_payload() {
        let mut p = 7u32.to_be_bytes().to_vec();
        p.push(NAME_USE);
        for v in [1u32, 8, 11, 20, 3] {
            p.extend_from_slice(&v.to_be_bytes());
        }
        p.extend_from_slice(b"foo");
        let n = parse_names(&p);
        assert_eq!(n.len(), 1);
        assert_eq!(
            (
                n[0].offset,
                n[0].kind,
                n[0].stmt,
                n[0].start,
                n[0].end,
                n[0].stmt_end
            ),
            (7, NAME_USE, 1, 8, 11, 20)
        );
        assert_eq!(n[0].name, b"foo");
        for cut in 0..p.len() {
            assert!(parse_names(&p[..cut]).is_empty());
        }
    }
}
