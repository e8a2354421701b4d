//! Which functions a statement calls, as far as a lexer can tell: a call of a user function may
//! change session settings (`set_config(…, false)` or `SET` in its body), so the pooler must read
//! the settings back after it; a call of a built-in function cannot (builtins.rs).
//!
//! The lexer only ever answers "built-ins and syntax only" when it is sure; anything else goes to
//! the real grammar (classify.rs, `full`), which sees the calls by name and is cached by text.

use crate::builtins::{is_builtin_function, is_keyword, is_syntax_keyword};
use shared::sql::{is_ident_char, is_ident_start, Kind, Lexer, Token};
use std::iter::Peekable;

/// The token before the one being looked at.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Prev {
    Start,
    /// A keyword (any category), lower case, at most 32 bytes.
    Keyword([u8; 32], usize),
    /// An identifier that is not a keyword, or a quoted one.
    Name,
    /// `)` or `]`: what follows a name here is an alias's column list, not a call.
    Close,
    /// `::` — a type name follows (`numeric(10, 2)`).
    Cast,
    /// Any other punctuation, operator or literal.
    Other,
}

impl Prev {
    fn is(&self, word: &[u8]) -> bool {
        matches!(self, Prev::Keyword(b, n) if &b[..*n] == word)
    }
}

/// Keywords after which `name (` is an object's name with a column or argument list, never a
/// call: `INSERT INTO t (a, b)`, `COPY t (a)`, `CREATE TABLE t (…)`, `REFERENCES t (a)`,
/// `FROM t AS x (a)`, `CREATE FUNCTION f (…)`, `CREATE TRIGGER … EXECUTE FUNCTION f ()`.
const NAMES_A_LIST: &[&[u8]] = &[
    b"into",
    b"copy",
    b"table",
    b"references",
    b"as",
    b"function",
    b"procedure",
    b"aggregate",
    b"routine",
    b"view",
    b"exists",
];

/// Whether every `name (` in one statement is SQL syntax or a call of a built-in function
/// (unqualified or `pg_catalog.`). `false` when a name is not provably built-in, or when the
/// text cannot be lexed the same way under every `standard_conforming_strings` (a `\'` in a
/// plain string) or does not end its strings and comments: the grammar then decides.
pub fn only_builtin_calls(sql: &[u8]) -> bool {
    let mut toks = Lexer::new(sql).peekable();
    let mut prev = Prev::Start;
    while let Some(t) = toks.next() {
        match t.kind {
            Kind::Unsure => return false,
            Kind::Word => {
                let word = t.text(sql);
                let mut lower = [0u8; 64];
                if word.len() > lower.len() {
                    return false;
                }
                for (d, s) in lower.iter_mut().zip(word) {
                    *d = s.to_ascii_lowercase();
                }
                let lower = &lower[..word.len()];
                match toks.peek().map(|n| n.kind) {
                    Some(Kind::Punct(b'(')) => {
                        // `name (`: a call, or syntax, or a list after a name.
                        if !(is_syntax_keyword(lower)
                            || prev == Prev::Cast
                            || prev == Prev::Name
                            || prev == Prev::Close
                            || NAMES_A_LIST.iter().any(|w| prev.is(w))
                            || (lower == b"conflict" && prev.is(b"on"))
                            || lower == b"varying"
                            || known(lower))
                        {
                            return false;
                        }
                        toks.next();
                        prev = Prev::Other;
                    }
                    Some(Kind::Punct(b'.')) => match name_chain(sql, &mut toks, t, prev) {
                        Chain::Call(false) => return false,
                        Chain::Call(true) => prev = Prev::Other,
                        Chain::Name => prev = Prev::Name,
                    },
                    _ => {
                        prev = if is_keyword(lower) && lower.len() <= 32 {
                            let mut b = [0u8; 32];
                            b[..lower.len()].copy_from_slice(lower);
                            Prev::Keyword(b, lower.len())
                        } else {
                            Prev::Name
                        }
                    }
                }
            }
            // A quoted name: `"f"(`, `"s".f(`, `"t" x(` or just a name.
            Kind::QuotedName => match name_chain(sql, &mut toks, t, prev) {
                Chain::Call(false) => return false,
                Chain::Call(true) => prev = Prev::Close,
                Chain::Name => prev = Prev::Name,
            },
            Kind::Cast => prev = Prev::Cast,
            Kind::Punct(b')' | b']') => prev = Prev::Close,
            Kind::String | Kind::DollarString | Kind::Param | Kind::Number | Kind::Punct(_) => {
                prev = Prev::Other
            }
        }
    }
    true
}

enum Chain {
    /// A qualified or quoted name called (its `(` taken): whether it is a built-in.
    Call(bool),
    /// A (qualified) name not followed by `(`.
    Name,
}

/// Reads `a.b.c` (parts plain or quoted) from its first part `tok`; if `(` follows, judges the
/// call. No allocation: this runs for every qualified column name (`t.a`) on the fast path.
fn name_chain(sql: &[u8], toks: &mut Peekable<Lexer>, mut tok: Token, prev: Prev) -> Chain {
    // (text, quoted) of the first and the last part, and how many parts.
    let mut first: (&[u8], bool) = (&[], false);
    let mut count = 0usize;
    loop {
        let (part, quoted) = match tok.kind {
            Kind::QuotedName => (&sql[tok.start + 1..tok.end - 1], true),
            Kind::Word => (tok.text(sql), false),
            // `t.*`
            Kind::Punct(b'*') if count > 0 => return Chain::Name,
            // `x.` followed by something else: not a name we understand.
            _ => return Chain::Call(false),
        };
        count += 1;
        if count == 1 {
            first = (part, quoted);
        }
        match toks.peek().map(|t| t.kind) {
            Some(Kind::Punct(b'.')) => {
                toks.next();
                match toks.next() {
                    Some(t) => tok = t,
                    None => return Chain::Call(false),
                }
            }
            Some(Kind::Punct(b'(')) => {
                toks.next();
                if prev == Prev::Cast || NAMES_A_LIST.iter().any(|w| prev.is(w)) {
                    return Chain::Call(true);
                }
                if count == 1 && (prev == Prev::Name || prev == Prev::Close) {
                    return Chain::Call(true); // `"t" x(…)`-like alias list
                }
                let schema_ok = match count {
                    1 => true,
                    2 => {
                        let (s, q) = first;
                        if q {
                            s == b"pg_catalog"
                        } else {
                            s.eq_ignore_ascii_case(b"pg_catalog")
                        }
                    }
                    _ => false,
                };
                let builtin = if quoted {
                    known(part)
                } else {
                    let mut buf = [0u8; 64];
                    part.len() <= buf.len() && {
                        for (d, c) in buf.iter_mut().zip(part) {
                            *d = c.to_ascii_lowercase();
                        }
                        known(&buf[..part.len()])
                    }
                };
                return Chain::Call(schema_ok && builtin);
            }
            _ => return Chain::Name,
        }
    }
}

/// A built-in function, or `set_config`, which classify.rs flags by name (`SNAPSHOT`).
fn known(name: &[u8]) -> bool {
    is_builtin_function(name) || name == b"set_config"
}

fn skip_blank(sql: &[u8], mut i: usize) -> usize {
    while i < sql.len() && sql[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// Names of functions a statement may call that are not built-in (lower case, unqualified),
/// for the pooler to look for custom settings in their bodies (`WATCH`, as `name(`). Reads the
/// raw text, strings included (a `DO` block's body is a string): extra names cost nothing.
pub fn user_function_names(sql: &[u8], out: &mut Vec<String>, limit: usize) {
    let n = sql.len();
    let mut i = 0;
    while i < n && out.len() < limit {
        if is_ident_start(sql[i]) && (i == 0 || !is_ident_char(sql[i - 1])) {
            let start = i;
            while i < n && is_ident_char(sql[i]) {
                i += 1;
            }
            let next = skip_blank(sql, i);
            if sql.get(next) != Some(&b'(') || i - start > 63 {
                continue;
            }
            let name = sql[start..i].to_ascii_lowercase();
            if known(&name) || is_keyword(&name) {
                continue;
            }
            let mut entry = String::from_utf8_lossy(&name).into_owned();
            entry.push('(');
            if !out.contains(&entry) {
                out.push(entry);
            }
        } else {
            i += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtins_and_syntax_are_cleared() {
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) \
             VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
            "SELECT now()",
            "select count(*) from t",
            "SELECT lower(x) FROM t",
            "SELECT pg_catalog.lower(x), \"lower\"(y), pg_catalog.\"upper\"(z) FROM s.t",
            "SELECT coalesce(a, 1), nullif(b, 2), greatest(1, 2) FROM t WHERE x IN (1, 2) \
             AND EXISTS (SELECT 1) AND y = ANY($1)",
            "SELECT 1.5::numeric(10, 2), CAST(x AS varchar(20)), x::character varying(3), \
             x::pg_catalog.numeric(4, 1)",
            "SELECT count(*) FILTER (WHERE a > 1), row_number() OVER (PARTITION BY b) FROM t",
            "SELECT * FROM generate_series(1, 3) AS g (x), t u (a)",
            "SELECT 'f(x)', $$ g(y) $$, $q$ h() $q$, E'it\\'s', \"my col\" FROM t -- k()\n",
            "/* f() */ SELECT t.a, t.* FROM s.t",
            "INSERT INTO t (a, b) VALUES (1, 2) ON CONFLICT (a) DO NOTHING",
            "COPY t (a, b) FROM STDIN",
            "CREATE TABLE t (a numeric(10, 2) DEFAULT nextval('s'), b text CHECK (length(b) > 0))",
            "CREATE FUNCTION f(a int) RETURNS int LANGUAGE sql AS $$ select set_wm() $$",
            "DROP FUNCTION f(int)",
            "SELECT date_trunc('day', now()) - interval '1 day'",
            "SELECT pg_catalog.set_config('work_mem', '1MB', false)",
            "SELECT pg_catalog . lower ( x ), 'a''b', e'\\'' FROM \"T\" WHERE y = $12",
            "SELECT größe, lower(größe) FROM t",
        ] {
            assert!(only_builtin_calls(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn user_calls_are_not_cleared() {
        for sql in [
            "SELECT set_wm($1)",
            "SELECT * FROM my_func()",
            "SELECT app.set_tenant('x')",
            "SELECT pg_catalog.lower(x), public.lower(y)",
            "SELECT \"Lower\"(x)",
            "INSERT INTO t VALUES (f())",
            "INSERT INTO t (a) SELECT f(1)",
            "UPDATE t SET x = f(x)",
            "DELETE FROM t WHERE g(x)",
            "WITH c AS (SELECT f()) SELECT * FROM c",
            "SELECT query_to_xml('select 1', true, true, '')",
            "SELECT uuid_generate_v4()",
            "SELECT 'a\\'' , f() , ''",
            "SELECT 'unterminated",
            "SELECT x FROM t WHERE lower(x) = f(y)",
            "SELECT \"s\".\"lower\"(x)",
            "SELECT a.b.lower(x)",
            "SELECT 1 /* unterminated",
            "SELECT $q$ unterminated",
            "SELECT fünf(1)",
        ] {
            assert!(!only_builtin_calls(sql.as_bytes()), "{sql}");
        }
    }

    #[test]
    fn names_to_watch() {
        let mut out = Vec::new();
        user_function_names(
            b"select set_tenant('x'), lower(y), app.other (1) from t where x in (1)",
            &mut out,
            8,
        );
        assert_eq!(out, vec!["set_tenant(".to_string(), "other(".to_string()]);
        let mut out = Vec::new();
        user_function_names(b"do $$ begin perform Set_It(); end $$", &mut out, 8);
        assert_eq!(out, vec!["set_it(".to_string()]);
    }
}
