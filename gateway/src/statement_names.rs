//! Prepared-statement names in SQL text, for the pooler to map into its one namespace.
//!
//! In Postgres, SQL `PREPARE`/`EXECUTE`/`DEALLOCATE` and protocol `Parse`/`Bind`/`Close` share
//! one namespace per session. The pooler names statements by content on its backends
//! (docs/decisions/2026-11-21-statements-named-by-content.md), so a name in SQL text must be
//! replaced by the backend's name. This finds where those names are, with Postgres's own lexer
//! (`pg_query::scan`: quoting, dollar quotes, comments, `E''` strings; unlike the shared lexer
//! of the classifiers, `shared::sql`, it knows each keyword's category, which tells a name
//! from syntax here), and folds them as
//! Postgres does (unquoted: ASCII lower case; quoted: as written, `""` is `"`). The pooler does
//! the replacing, since only it knows the session's statements.
//!
//! Only texts naming one of the commands are scanned (a word test first); the common statement
//! pays one pass over its bytes.

use pg_query::protobuf::{KeywordKind, Token};
use shared::sql::contains_ci;

/// Longest text scanned; a longer one keeps the old behaviour (a `PREPARE` pins the session).
const MAX_SCAN: usize = 64 * 1024;
/// Postgres truncates longer identifiers (NAMEDATALEN - 1), with a notice we could not repeat.
const MAX_NAME: usize = 63;

/// What a name in the text does.
pub mod kind {
    /// `PREPARE name ... AS ...`: the range is the name; `stmt_end` ends the statement.
    pub const PREPARE: u8 = 1;
    /// `EXECUTE name`, also under `EXPLAIN` and in `CREATE TABLE ... AS EXECUTE name`.
    pub const USE: u8 = 2;
    /// `DEALLOCATE [PREPARE] name`.
    pub const DEALLOCATE: u8 = 3;
    /// `[pg_catalog.]pg_prepared_statements` used as a relation, an alias after it: the range
    /// is the reference, replaced by the session's statements.
    pub const VIEW: u8 = 4;
    /// The same without an alias (the replacement brings one).
    pub const VIEW_BARE: u8 = 5;
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Name {
    pub kind: u8,
    /// Which statement of the text (0-based, empty statements not counted).
    pub stmt: u32,
    /// Byte range of the name token in the text.
    pub start: u32,
    pub end: u32,
    /// End of the statement (PREPARE: the rest after the name is the statement's definition).
    pub stmt_end: u32,
    /// The name as Postgres folds it.
    pub name: Vec<u8>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// No prepared-statement command in the text.
    Nothing,
    Names(Vec<Name>),
    /// Commands we cannot map (too long, a name we do not fold, a SQL function body): the text
    /// goes as it is; `prepares`: it may `PREPARE` (the session is then pinned, as before).
    Unmapped {
        prepares: bool,
    },
}

/// Cheap test: could the text hold one of the commands?
pub fn mentions(sql: &[u8]) -> bool {
    contains_ci(sql, b"prepare") || contains_ci(sql, b"execute") || contains_ci(sql, b"dealloc")
}

struct Tok {
    token: i32,
    kind: i32,
    start: usize,
    end: usize,
}

impl Tok {
    fn is(&self, t: Token) -> bool {
        self.token == t as i32
    }
    /// A `ColId`: an identifier, or an unreserved or column-name keyword used as one.
    fn col_id(&self) -> bool {
        self.is(Token::Ident)
            || self.is(Token::Uident)
            || self.kind == KeywordKind::UnreservedKeyword as i32
            || self.kind == KeywordKind::ColNameKeyword as i32
    }
}

/// The names in `sql` that refer to prepared statements.
pub fn find(sql: &[u8]) -> Found {
    if !mentions(sql) {
        return Found::Nothing;
    }
    let prepares_guess = contains_ci(sql, b"prepare");
    let unmapped = Found::Unmapped {
        prepares: prepares_guess,
    };
    if sql.len() > MAX_SCAN {
        return unmapped;
    }
    let Ok(text) = std::str::from_utf8(sql) else {
        return unmapped;
    };
    let Ok(scan) = pg_query::scan(text) else {
        // Postgres will reject the text (unterminated quote...): nothing runs.
        return Found::Nothing;
    };
    let toks: Vec<Tok> = scan
        .tokens
        .iter()
        .filter(|t| t.token != Token::SqlComment as i32 && t.token != Token::CComment as i32)
        .map(|t| Tok {
            token: t.token,
            kind: t.keyword_kind,
            start: t.start.max(0) as usize,
            end: (t.end.max(0) as usize).min(sql.len()),
        })
        .collect();
    // A SQL-standard function body holds `;` inside one statement: statements cannot be
    // counted by `;` there.
    if toks.iter().any(|t| t.is(Token::Atomic)) {
        return unmapped;
    }
    let mut names = Vec::new();
    let mut index = 0u32;
    for stmt in toks.split(|t| t.is(Token::Ascii59)) {
        if stmt.is_empty() {
            continue;
        }
        let stmt_end = stmt[stmt.len() - 1].end as u32;
        let mut push = |kind: u8, t: &Tok| -> bool {
            match fold(&sql[t.start..t.end]) {
                Some(name) => {
                    names.push(Name {
                        kind,
                        stmt: index,
                        start: t.start as u32,
                        end: t.end as u32,
                        stmt_end,
                        name,
                    });
                    true
                }
                None => false,
            }
        };
        let at = |i: usize| stmt.get(i);
        let ok = match at(0) {
            Some(t) if t.is(Token::Prepare) => match at(1) {
                Some(n) if n.is(Token::Transaction) => true,
                Some(n) if n.col_id() => push(kind::PREPARE, n),
                _ => true, // a syntax error: nothing runs
            },
            Some(t) if t.is(Token::Deallocate) => {
                let i = if at(1).is_some_and(|t| t.is(Token::Prepare)) {
                    2
                } else {
                    1
                };
                match at(i) {
                    // DEALLOCATE ALL: the link flag says it.
                    Some(n) if n.is(Token::All) => true,
                    Some(n) if n.col_id() => push(kind::DEALLOCATE, n),
                    _ => true,
                }
            }
            Some(t) if t.is(Token::Execute) || t.is(Token::Explain) || t.is(Token::Create) => {
                match executed(stmt) {
                    Some(n) => push(kind::USE, n),
                    None => true,
                }
            }
            _ => true,
        };
        if !ok {
            return unmapped;
        }
        for (k, t) in stmt.iter().enumerate() {
            if !t.is(Token::Ident)
                || fold(&sql[t.start..t.end]).as_deref() != Some(b"pg_prepared_statements")
                || stmt.get(k + 1).is_some_and(|n| n.is(Token::Ascii46))
            {
                continue;
            }
            let mut start = t.start;
            if k >= 1 && stmt[k - 1].is(Token::Ascii46) {
                match k.checked_sub(2).map(|j| &stmt[j]) {
                    Some(schema)
                        if fold(&sql[schema.start..schema.end]).as_deref()
                            == Some(b"pg_catalog") =>
                    {
                        start = schema.start
                    }
                    _ => continue,
                }
            }
            let alias = stmt
                .get(k + 1)
                .is_some_and(|n| n.is(Token::As) || n.col_id());
            names.push(Name {
                kind: if alias { kind::VIEW } else { kind::VIEW_BARE },
                stmt: index,
                start: start as u32,
                end: t.end as u32,
                stmt_end,
                name: Vec::new(),
            });
        }
        index += 1;
    }
    if names.is_empty() {
        Found::Nothing
    } else {
        Found::Names(names)
    }
}

/// The name token of `EXECUTE name`, `EXPLAIN [ANALYZE] [VERBOSE] [(...)] EXECUTE name`,
/// `CREATE [TEMP] TABLE ... AS EXECUTE name` (gram.y: ExecuteStmt, ExplainStmt, CreateAsStmt).
fn executed(stmt: &[Tok]) -> Option<&Tok> {
    let mut i = 0;
    if stmt.first()?.is(Token::Explain) {
        i = 1;
        loop {
            let t = stmt.get(i)?;
            if t.is(Token::Analyze) || t.is(Token::Analyse) || t.is(Token::Verbose) {
                i += 1;
            } else if t.is(Token::Ascii40) {
                let mut depth = 0usize;
                while let Some(t) = stmt.get(i) {
                    if t.is(Token::Ascii40) {
                        depth += 1;
                    } else if t.is(Token::Ascii41) {
                        depth -= 1;
                        if depth == 0 {
                            break;
                        }
                    }
                    i += 1;
                }
                i += 1;
            } else {
                break;
            }
        }
    }
    let first = stmt.get(i)?;
    if first.is(Token::Execute) {
        return stmt.get(i + 1).filter(|n| n.col_id());
    }
    if !first.is(Token::Create) {
        return None;
    }
    // CREATE [GLOBAL|LOCAL] [TEMP|TEMPORARY|UNLOGGED] TABLE ... AS EXECUTE name
    let mut j = i + 1;
    while stmt.get(j).is_some_and(|t| {
        t.is(Token::Global)
            || t.is(Token::Local)
            || t.is(Token::Temp)
            || t.is(Token::Temporary)
            || t.is(Token::Unlogged)
    }) {
        j += 1;
    }
    if !stmt.get(j)?.is(Token::Table) {
        return None;
    }
    let mut depth = 0usize;
    for k in j + 1..stmt.len() {
        let t = &stmt[k];
        if t.is(Token::Ascii40) {
            depth += 1;
        } else if t.is(Token::Ascii41) {
            depth = depth.saturating_sub(1);
        } else if depth == 0
            && t.is(Token::As)
            && stmt.get(k + 1).is_some_and(|t| t.is(Token::Execute))
        {
            return stmt.get(k + 2).filter(|n| n.col_id());
        }
    }
    None
}

/// An identifier as Postgres stores it (scan.l, downcase_identifier): quoted as written with
/// `""` as `"`, unquoted in ASCII lower case. `None` for what we do not fold (`U&"..."`, names
/// Postgres would truncate).
pub fn fold(tok: &[u8]) -> Option<Vec<u8>> {
    if tok.get(1) == Some(&b'&') {
        return None; // U&"..." (Unicode escapes)
    }
    let name = if tok.first() == Some(&b'"') {
        let inner = tok.get(1..tok.len().checked_sub(1)?)?;
        let mut v = Vec::with_capacity(inner.len());
        let mut i = 0;
        while i < inner.len() {
            v.push(inner[i]);
            i += if inner[i] == b'"' { 2 } else { 1 };
        }
        v
    } else if tok
        .first()
        .is_some_and(|b| b.is_ascii_alphabetic() || *b == b'_' || *b >= 0x80)
    {
        tok.to_ascii_lowercase()
    } else {
        return None;
    };
    (!name.is_empty() && name.len() <= MAX_NAME).then_some(name)
}

/// The `up::NAMES` payload for the names of the message at `offset` of the next `MSGS` batch.
pub fn encode(out: &mut Vec<u8>, offset: usize, names: &[Name]) {
    for n in names {
        out.extend_from_slice(&(offset as u32).to_be_bytes());
        out.push(n.kind);
        out.extend_from_slice(&n.stmt.to_be_bytes());
        out.extend_from_slice(&n.start.to_be_bytes());
        out.extend_from_slice(&n.end.to_be_bytes());
        out.extend_from_slice(&n.stmt_end.to_be_bytes());
        out.extend_from_slice(&(n.name.len() as u32).to_be_bytes());
        out.extend_from_slice(&n.name);
    }
}

/// The `up::NAMES` payload for a whole batch of complete messages (the names of its `Query`
/// texts), and whether a text that could not be mapped may `PREPARE` (the session is then
/// pinned instead). For a batch the gateway rewrote (signals.rs, identity.rs): its names are
/// found again where the new text has them. The rewrites add no `;` and no name, so the texts
/// hold the same statements and names as the client's.
pub fn of_batch(batch: &[u8]) -> (Vec<u8>, bool) {
    let (mut out, mut pin) = (Vec::new(), false);
    let mut i = 0;
    while i + 5 <= batch.len() {
        let len = u32::from_be_bytes([batch[i + 1], batch[i + 2], batch[i + 3], batch[i + 4]]);
        let next = (i + 1 + (len as usize).max(4)).min(batch.len());
        if batch[i] == shared::protocol::frontend::QUERY {
            match find(shared::protocol::frontend::query_text(&batch[i + 5..next])) {
                Found::Names(v) => encode(&mut out, i, &v),
                Found::Unmapped { prepares } => pin |= prepares,
                Found::Nothing => {}
            }
        }
        i = next;
    }
    (out, pin)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(sql: &str) -> Vec<(u8, u32, String, String)> {
        match find(sql.as_bytes()) {
            Found::Names(v) => v
                .into_iter()
                .map(|n| {
                    (
                        n.kind,
                        n.stmt,
                        String::from_utf8(n.name).unwrap(),
                        sql[n.start as usize..n.end as usize].to_string(),
                    )
                })
                .collect(),
            Found::Nothing => vec![],
            other => panic!("{sql}: {other:?}"),
        }
    }

    #[test]
    fn finds_and_folds_names() {
        assert_eq!(
            names("PREPARE Foo (int) AS SELECT $1"),
            vec![(kind::PREPARE, 0, "foo".into(), "Foo".into())]
        );
        assert_eq!(
            names("execute \"Mixed\"\"Q\" (1, 'execute x')"),
            vec![(kind::USE, 0, "Mixed\"Q".into(), "\"Mixed\"\"Q\"".into())]
        );
        assert_eq!(
            names("/* prepare x */ select 1; -- execute y\n DEALLOCATE PREPARE data"),
            vec![(kind::DEALLOCATE, 1, "data".into(), "data".into())]
        );
        assert_eq!(
            names("explain (analyze, costs off) execute s(2); explain verbose execute t"),
            vec![
                (kind::USE, 0, "s".into(), "s".into()),
                (kind::USE, 1, "t".into(), "t".into())
            ]
        );
        assert_eq!(
            names("create temp table x (a) as execute q (1) with no data"),
            vec![(kind::USE, 0, "q".into(), "q".into())]
        );
        assert_eq!(names("deallocate all"), vec![]);
        assert_eq!(names("prepare transaction 'x'"), vec![]);
        assert_eq!(names("grant execute on function f() to public"), vec![]);
        assert_eq!(
            names("select 'prepare a as select 1'; select $$execute b$$"),
            vec![]
        );
        assert_eq!(find(b"select 1"), Found::Nothing);
        assert_eq!(
            names("select p.name from pg_catalog.pg_prepared_statements p; table x"),
            vec![(
                kind::VIEW,
                0,
                "".into(),
                "pg_catalog.pg_prepared_statements".into()
            )]
        );
        assert_eq!(
            names("select pg_prepared_statements.name from \"pg_prepared_statements\" where true"),
            vec![(
                kind::VIEW_BARE,
                0,
                "".into(),
                "\"pg_prepared_statements\"".into()
            )]
        );
        assert_eq!(names("select * from other.pg_prepared_statements"), vec![]);
    }

    #[test]
    fn a_batchs_names_at_their_messages_offsets() {
        use shared::protocol::frontend as fe;
        let mut batch = Vec::new();
        fe::query(&mut batch, "SELECT 1");
        let second = batch.len();
        fe::query(&mut batch, "PREPARE s AS SELECT (SELECT 7 AS x); EXECUTE s");
        let third = batch.len();
        fe::write_parse(&mut batch, b"", b"EXECUTE t", &[0, 0]);
        fe::query(
            &mut batch,
            &format!("PREPARE {} AS SELECT 1", "a".repeat(64)),
        );
        let (payload, pin) = of_batch(&batch);
        assert!(pin, "the unmapped PREPARE pins");
        let mut want = Vec::new();
        let Found::Names(v) = find(b"PREPARE s AS SELECT (SELECT 7 AS x); EXECUTE s") else {
            panic!()
        };
        encode(&mut want, second, &v);
        assert_eq!(payload, want);
        assert!(third > second);
    }

    #[test]
    fn unmapped() {
        let long = format!("prepare {} as select 1", "a".repeat(64));
        assert_eq!(find(long.as_bytes()), Found::Unmapped { prepares: true });
        assert_eq!(
            find(b"execute U&\"d\\0061t\\+000061\""),
            Found::Unmapped { prepares: false }
        );
        assert_eq!(
            find(b"create function f() returns int begin atomic select 1; end; execute a"),
            Found::Unmapped { prepares: false }
        );
    }
}
