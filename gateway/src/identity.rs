//! The session's process id, as its client knows it (issue 11): the `BackendKeyData` the gateway
//! sent at login carries a pid of its own (any backend may serve the session), so a
//! `pg_backend_pid()` whose value goes to the client must answer that pid, not the pid of
//! whichever backend runs the statement. Drivers compare the two (to ignore their own
//! notifications, to log, to cancel).
//!
//! The call is replaced in the text of `Query` and `Parse` messages by a scalar subquery,
//! `(SELECT <pid> AS pg_backend_pid)`: an `integer`, and a result column named
//! `pg_backend_pid` as the call's is. Only where the value goes to the client: at the top level
//! of a `SELECT` list or a `RETURNING` list. Where it identifies the backend to the server
//! (`... FROM pg_stat_activity WHERE pid = pg_backend_pid()`, `pg_locks`,
//! `pg_terminate_backend(pg_backend_pid())`), the backend's own pid is what the statement
//! means, and it stays. Never inside strings or dollar quotes (function bodies run later, on
//! whatever backend), nor in `CREATE`/`ALTER` statements (a view or a default stays a call; a
//! SQL `PREPARE`d body runs in this session only, by `EXECUTE`, so it answers the session's pid
//! too), nor in a text the shared lexer cannot read for sure. An error
//! position after the replacement is off by the difference in length.

use shared::protocol::frontend as fe;
use shared::sql::{find_ci, Kind, Lexer, Token};

/// The batch with every `pg_backend_pid()` in its `Query` and `Parse` texts answering `pid`, or
/// `None` if no text names it (the common case: one substring scan).
pub fn virtual_backend_pid(batch: &[u8], pid: i32) -> Option<Vec<u8>> {
    find_ci(batch, b"pg_backend_pid")?;
    fe::rewrite_each(batch, |tag, body| match tag {
        fe::QUERY => rewrite(fe::query_text(body), pid).map(|sql| {
            let mut m = Vec::with_capacity(sql.len() + 6);
            fe::query_bytes(&mut m, &sql);
            m
        }),
        fe::PARSE => fe::parse_parse(body).ok().and_then(|p| {
            let sql = rewrite(p.query, pid)?;
            let mut m = Vec::new();
            fe::write_parse(&mut m, p.name, &sql, p.param_types);
            Some(m)
        }),
        _ => None,
    })
}

/// Words that end a `SELECT` or `RETURNING` list at its own level.
const LIST_ENDS: &[&[u8]] = &[
    b"from",
    b"into",
    b"where",
    b"group",
    b"having",
    b"window",
    b"order",
    b"limit",
    b"offset",
    b"fetch",
    b"for",
    b"union",
    b"intersect",
    b"except",
];

/// `sql` with the `pg_backend_pid()` calls whose value goes to the client replaced, or `None`
/// if it has none.
pub fn rewrite(sql: &[u8], pid: i32) -> Option<Vec<u8>> {
    let toks: Vec<Token> = Lexer::new(sql).collect();
    if toks.iter().any(|t| t.kind == Kind::Unsure) {
        return None;
    }
    let is = |i: usize, k: Kind| toks.get(i).is_some_and(|t| t.kind == k);
    let mut out = Vec::new();
    let mut copied = 0;
    // Per statement: DDL whose expressions are stored, not run now; where a top-level select
    // or returning list is being read; parenthesis depth.
    let (mut stored, mut first, mut in_list, mut depth) = (false, true, false, 0usize);
    for i in 0..toks.len() {
        let t = toks[i];
        match t.kind {
            Kind::Punct(b';') => {
                (stored, first, in_list, depth) = (false, true, false, 0);
                continue;
            }
            Kind::Punct(b'(') => depth += 1,
            Kind::Punct(b')') => depth = depth.saturating_sub(1),
            Kind::Word if depth == 0 => {
                let w = t.text(sql);
                if first {
                    // A SQL PREPARE's body runs in this session only (`EXECUTE`): its value is
                    // the session's pid too.
                    stored = w.eq_ignore_ascii_case(b"create") || w.eq_ignore_ascii_case(b"alter");
                }
                if w.eq_ignore_ascii_case(b"select") || w.eq_ignore_ascii_case(b"returning") {
                    in_list = true;
                } else if LIST_ENDS.iter().any(|e| w.eq_ignore_ascii_case(e)) {
                    in_list = false;
                }
            }
            _ => {}
        }
        first = false;
        if stored
            || !in_list
            || depth != 0
            || !t.is_word(sql, b"pg_backend_pid")
            || !is(i + 1, Kind::Punct(b'('))
            || !is(i + 2, Kind::Punct(b')'))
        {
            continue;
        }
        // `pg_catalog.pg_backend_pid()` is the same function; `other.pg_backend_pid()` is not.
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
        out.extend_from_slice(&sql[copied..start]);
        out.extend_from_slice(format!("(SELECT {pid} AS pg_backend_pid)").as_bytes());
        copied = toks[i + 2].end;
    }
    if copied == 0 {
        return None;
    }
    out.extend_from_slice(&sql[copied..]);
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::protocol::put_message;

    fn message(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        put_message(&mut m, tag, |b| b.extend_from_slice(body));
        m
    }

    fn r(sql: &str) -> Option<String> {
        rewrite(sql.as_bytes(), 4242).map(|s| String::from_utf8(s).unwrap())
    }

    #[test]
    fn calls_answer_the_sessions_pid() {
        assert_eq!(
            r("SELECT pg_backend_pid()").as_deref(),
            Some("SELECT (SELECT 4242 AS pg_backend_pid)")
        );
        assert_eq!(
            r("select PG_CATALOG.Pg_Backend_Pid ( ), 1; SELECT 2, pg_backend_pid() AS p").as_deref(),
            Some(
                "select (SELECT 4242 AS pg_backend_pid), 1; SELECT 2, (SELECT 4242 AS pg_backend_pid) AS p"
            )
        );
        assert_eq!(
            r("WITH x AS (SELECT 1) SELECT pg_backend_pid() = 5 FROM x").as_deref(),
            Some("WITH x AS (SELECT 1) SELECT (SELECT 4242 AS pg_backend_pid) = 5 FROM x")
        );
        assert_eq!(
            r("INSERT INTO t VALUES (1) RETURNING pg_backend_pid()").as_deref(),
            Some("INSERT INTO t VALUES (1) RETURNING (SELECT 4242 AS pg_backend_pid)")
        );
        // Where it names the backend to the server, it stays the backend's.
        assert_eq!(
            r("SELECT application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"),
            None
        );
        assert_eq!(r("SELECT pg_terminate_backend(pg_backend_pid())"), None);
        assert_eq!(
            r("SELECT * FROM pg_locks WHERE pid = pg_backend_pid()"),
            None
        );
        // Stored expressions, strings, other schemas, quoted names and unsure text: left alone.
        assert_eq!(r("CREATE VIEW v AS SELECT pg_backend_pid()"), None);
        // A SQL PREPARE's body runs in this session only (by EXECUTE): the session's pid.
        assert_eq!(
            r("PREPARE p AS SELECT pg_backend_pid()").as_deref(),
            Some("PREPARE p AS SELECT (SELECT 4242 AS pg_backend_pid)")
        );
        assert_eq!(
            r("CREATE TABLE t (p int DEFAULT pg_backend_pid()); SELECT pg_backend_pid()")
                .as_deref(),
            Some(
                "CREATE TABLE t (p int DEFAULT pg_backend_pid()); SELECT (SELECT 4242 AS pg_backend_pid)"
            )
        );
        assert_eq!(r("SELECT 'pg_backend_pid()', $$pg_backend_pid()$$"), None);
        assert_eq!(r("SELECT s.pg_backend_pid(), \"pg_backend_pid\"()"), None);
        assert_eq!(r("SELECT pg_backend_pid(), 'a\\'b'"), None);
        assert_eq!(r("SELECT pg_backend_pid"), None);
    }

    #[test]
    fn batches_are_rebuilt_around_the_rewritten_messages() {
        let mut parse = Vec::new();
        fe::write_parse(
            &mut parse,
            b"s1",
            b"SELECT pg_backend_pid() WHERE $1",
            &[0, 0],
        );
        let mut rest = message(b'B', b"\0s1\0\0\0\0\0\0\0");
        rest.extend_from_slice(&message(b'S', b""));
        fe::query(&mut rest, "SELECT 1");
        let out = virtual_backend_pid(&[parse, rest.clone()].concat(), 7).unwrap();
        let mut expect = Vec::new();
        fe::write_parse(
            &mut expect,
            b"s1",
            b"SELECT (SELECT 7 AS pg_backend_pid) WHERE $1",
            &[0, 0],
        );
        expect.extend_from_slice(&rest);
        assert_eq!(out, expect);
        assert_eq!(virtual_backend_pid(b"Q\0\0\0\x0dSELECT 1\0", 7), None);
        // A cut message at the end is kept as it is.
        let mut cut = Vec::new();
        fe::query(&mut cut, "SELECT pg_backend_pid()");
        cut.extend_from_slice(b"Q\0\0");
        let out = virtual_backend_pid(&cut, 7).unwrap();
        assert!(out.ends_with(b"Q\0\0"));
    }

    #[test]
    fn a_text_in_another_encoding_keeps_its_bytes() {
        // 'café' in LATIN1 (client_encoding): é is the byte 0xE9, which is not UTF-8.
        let mut q = Vec::new();
        fe::query_bytes(&mut q, b"SELECT pg_backend_pid(), 'caf\xe9'");
        let mut expect = Vec::new();
        fe::query_bytes(
            &mut expect,
            b"SELECT (SELECT 7 AS pg_backend_pid), 'caf\xe9'",
        );
        assert_eq!(virtual_backend_pid(&q, 7), Some(expect));
    }
}
