//! SQL `PREPARE`/`EXECUTE`/`DEALLOCATE` in a simple `Query`'s text, for signals (see the
//! module doc of signals.rs): a `PREPARE`d body's calls are rewritten as a `Parse`'s text is and
//! remembered under the statement's name, in the same per-session table as protocol-level
//! names (Postgres has one namespace for both); an `EXECUTE` owes their signals and has its
//! pid arguments replaced as a `Bind`'s values are. See
//! docs/decisions/2026-12-07-signals-to-virtual-pids.md ("SQL `PREPARE`/`EXECUTE`").

use super::{calls, param_value, Edit, Issued, Prepared, Statements, Wait};
use shared::sql::{Kind, Lexer, Token};

/// The text of a simple `Query` with its signalling calls rewritten (`None` if nothing is), one
/// statement after another, as the server will run them:
/// - `PREPARE name [(types)] AS body`: the body's calls are rewritten and the statement is
///   remembered under `name` (SQL and protocol-level statements share one namespace), its
///   signals owed at each `EXECUTE`, not now;
/// - `EXECUTE name (args)` of a remembered statement: its constant calls' signals are owed, and
///   each argument that is a parameter pid (a constant) is replaced as a `Bind`'s value is;
/// - `DEALLOCATE [PREPARE] name | ALL` and `DISCARD ALL` forget;
/// - `CREATE`/`ALTER` (stored bodies, run later) are left alone; anything else is rewritten
///   and its constant calls' signals owed now.
pub(super) fn rewrite_query(
    sql: &[u8],
    caller: i32,
    stmts: &mut Statements,
    constants: &mut u32,
    issued: &mut Vec<Issued>,
) -> Option<Vec<u8>> {
    let toks: Vec<Token> = Lexer::new(sql).collect();
    if toks.iter().any(|t| t.kind == Kind::Unsure) {
        return None;
    }
    let mut edit = Edit::default();
    let mut from = 0;
    while from < toks.len() {
        let to = toks[from..]
            .iter()
            .position(|t| t.kind == Kind::Punct(b';'))
            .map_or(toks.len(), |p| from + p);
        let stmt = from..to;
        from = to + 1;
        let word = |i: usize, w: &[u8]| stmt.contains(&i) && toks[i].is_word(sql, w);
        let first = stmt.start;
        if word(first, b"create") || word(first, b"alter") {
            // A SQL-standard function body holds `;`: what follows is still its body.
            if stmt.clone().any(|i| word(i, b"atomic")) {
                break;
            }
            continue;
        }
        if word(first, b"prepare") && !word(first + 1, b"transaction") {
            let Some(name) = name_at(sql, &toks, stmt.clone(), first + 1) else {
                continue;
            };
            // The body follows `AS` (after the parameter types, in parentheses).
            let mut depth = 0usize;
            let Some(body) = (first + 2..stmt.end).find(|&i| {
                match toks[i].kind {
                    Kind::Punct(b'(') => depth += 1,
                    Kind::Punct(b')') => depth = depth.saturating_sub(1),
                    _ => {}
                }
                depth == 0 && word(i, b"as")
            }) else {
                continue;
            };
            let mut prepared = Prepared::default();
            calls(
                sql,
                &toks,
                body + 1..stmt.end,
                caller,
                constants,
                &mut prepared.constants,
                &mut prepared.params,
                &mut edit,
            );
            stmts.define(name, prepared);
            continue;
        }
        if word(first, b"execute") {
            let Some(name) = name_at(sql, &toks, stmt.clone(), first + 1) else {
                continue;
            };
            let Some(prepared) = stmts.by_name.get(&name) else {
                continue;
            };
            // The arguments: token ranges between the parentheses, split at top-level commas.
            let mut args: Vec<std::ops::Range<usize>> = Vec::new();
            if stmt.contains(&(first + 2)) && toks[first + 2].kind == Kind::Punct(b'(') {
                let (mut depth, mut begin) = (0usize, first + 3);
                for (i, t) in toks.iter().enumerate().take(stmt.end).skip(first + 3) {
                    match t.kind {
                        Kind::Punct(b'(') => depth += 1,
                        Kind::Punct(b')') if depth == 0 => {
                            args.push(begin..i);
                            break;
                        }
                        Kind::Punct(b')') => depth -= 1,
                        Kind::Punct(b',') if depth == 0 => {
                            args.push(begin..i);
                            begin = i + 1;
                        }
                        _ => {}
                    }
                }
            }
            // Argument `k` as an integer constant.
            let integer = |k: usize| -> Option<(i64, usize)> {
                match &toks[args.get(k)?.clone()] {
                    [n] if n.kind == Kind::Number => {
                        let v = std::str::from_utf8(n.text(sql)).ok()?.parse().ok()?;
                        Some((v, k))
                    }
                    _ => None,
                }
            };
            let resolve = |wait: Option<Wait>| Wait::resolved(wait, |k| integer(k).map(|(v, _)| v));
            issued.extend(prepared.constants.iter().map(|x| Issued {
                wait: resolve(x.wait),
                ..*x
            }));
            let mut replace: Vec<(usize, String)> = Vec::new();
            for call in &prepared.params {
                let Some((pid, k)) = integer(call.index) else {
                    continue;
                };
                let Ok(pid) = i32::try_from(pid) else {
                    continue;
                };
                let Some(value) = param_value(caller, pid, call, &resolve, issued) else {
                    continue;
                };
                if !replace.iter().any(|(r, _)| *r == k) {
                    replace.push((k, value.to_string()));
                }
            }
            replace.sort();
            for (k, v) in replace {
                let t = toks[args[k].start];
                edit.replace(sql, t.start, t.end, v.as_bytes());
            }
            continue;
        }
        if word(first, b"deallocate") {
            let at = if word(first + 1, b"prepare") {
                first + 2
            } else {
                first + 1
            };
            if word(at, b"all") && at + 1 == stmt.end {
                stmts.by_name.clear();
            } else if let Some(name) = name_at(sql, &toks, stmt.clone(), at) {
                stmts.by_name.remove(&name);
            }
            continue;
        }
        if word(first, b"discard") && word(first + 1, b"all") {
            stmts.by_name.clear();
            continue;
        }
        let mut params = Vec::new();
        calls(
            sql,
            &toks,
            stmt,
            caller,
            constants,
            issued,
            &mut params,
            &mut edit,
        );
    }
    edit.finish(sql)
}

/// The prepared-statement name at token `i` of the statement `stmt`, as Postgres folds it.
fn name_at(sql: &[u8], toks: &[Token], stmt: std::ops::Range<usize>, i: usize) -> Option<Vec<u8>> {
    if !stmt.contains(&i) || !matches!(toks[i].kind, Kind::Word | Kind::QuotedName) {
        return None;
    }
    crate::statement_names::fold(toks[i].text(sql))
}
