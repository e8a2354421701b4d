//! Statement classification: does a statement change session state the pooler must know about?
//!
//! A hand lexer clears the common statements by their first keyword; anything it cannot decide
//! (several statements in one string, an unusual keyword) goes to the real Postgres grammar
//! (`pg_query`) on a helper thread with a large stack, and the answer is cached by text. A
//! statement too large or too deeply nested to parse safely gets the conservative answer
//! (read the settings back afterwards); Postgres itself then judges it.

use shared::link::flags;
use std::cell::RefCell;
use std::collections::HashMap;

/// Texts longer than this are not given to the parser (the conservative answer is used).
const MAX_PARSE_LEN: usize = 64 * 1024;
/// Parenthesis depth beyond which we do not parse.
const MAX_DEPTH: usize = 200;
const CACHE_ENTRIES: usize = 8192;
const CACHE_TEXT: usize = 4096;

/// What we answer when we cannot tell: settings are read back after it (cheap and always right).
pub const CONSERVATIVE: u8 = flags::SNAPSHOT;

#[derive(Default)]
pub struct Classifier {
    cache: RefCell<HashMap<Box<[u8]>, u8>>,
}

impl Classifier {
    /// The answer without waiting, if the lexer or the cache has it.
    pub fn classify_now(&self, sql: &[u8]) -> Option<u8> {
        fast(sql).or_else(|| self.cache.borrow().get(sql).copied())
    }

    pub async fn classify(&self, sql: &[u8]) -> u8 {
        if let Some(f) = self.classify_now(sql) {
            return f;
        }
        let f = if sql.len() > MAX_PARSE_LEN || depth(sql) > MAX_DEPTH {
            CONSERVATIVE
        } else {
            match std::str::from_utf8(sql) {
                Ok(text) => parse_off_core(text.to_owned()).await,
                // Postgres will reject it (invalid byte sequence): nothing runs.
                Err(_) => 0,
            }
        };
        if sql.len() <= CACHE_TEXT {
            let mut c = self.cache.borrow_mut();
            if c.len() >= CACHE_ENTRIES {
                c.clear();
            }
            c.insert(sql.into(), f);
        }
        f
    }
}

/// Runs the parser on a thread of its own: a deep statement may recurse far, and the executor's
/// core must not stall on it.
async fn parse_off_core(text: String) -> u8 {
    let (tx, rx) = futures_channel::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("classify".into())
        .stack_size(256 << 20)
        .spawn(move || {
            let _ = tx.send(full(&text));
        });
    if spawned.is_err() {
        return CONSERVATIVE;
    }
    rx.await.unwrap_or(CONSERVATIVE)
}

fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len())
        .any(|w| w.eq_ignore_ascii_case(needle))
}

/// Skips white space and comments.
fn skip_blank(sql: &[u8], mut i: usize) -> usize {
    loop {
        while i < sql.len() && sql[i].is_ascii_whitespace() {
            i += 1;
        }
        if sql[i..].starts_with(b"--") {
            while i < sql.len() && sql[i] != b'\n' {
                i += 1;
            }
        } else if sql[i..].starts_with(b"/*") {
            let mut depth = 0usize;
            while i < sql.len() {
                if sql[i..].starts_with(b"/*") {
                    depth += 1;
                    i += 2;
                } else if sql[i..].starts_with(b"*/") {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
        } else {
            return i;
        }
    }
}

fn word(sql: &[u8], i: usize) -> (&[u8], usize) {
    let start = skip_blank(sql, i);
    let mut end = start;
    while end < sql.len() && (sql[end].is_ascii_alphabetic() || sql[end] == b'_') {
        end += 1;
    }
    (&sql[start..end], end)
}

/// One statement only: no `;` other than trailing ones.
fn single(sql: &[u8]) -> bool {
    match sql.iter().position(|&b| b == b';') {
        None => true,
        Some(p) => sql[p..]
            .iter()
            .all(|&b| b == b';' || b.is_ascii_whitespace()),
    }
}

fn depth(sql: &[u8]) -> usize {
    let (mut d, mut max) = (0usize, 0usize);
    for &b in sql {
        match b {
            b'(' | b'[' => {
                d += 1;
                max = max.max(d);
            }
            b')' | b']' => d = d.saturating_sub(1),
            _ => {}
        }
    }
    max
}

/// Names that may be custom settings (`ident.ident`, bare or inside quotes) in a statement that
/// may change settings. Extra names cost nothing (they read back as NULL); at most 32.
pub fn custom_setting_names(sql: &[u8]) -> Vec<String> {
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b'$';
    let mut names = Vec::new();
    let mut i = 0;
    while i < sql.len() && names.len() < 32 {
        if (sql[i].is_ascii_alphabetic() || sql[i] == b'_') && (i == 0 || !ident(sql[i - 1])) {
            let start = i;
            while i < sql.len() && ident(sql[i]) {
                i += 1;
            }
            if i + 1 < sql.len()
                && sql[i] == b'.'
                && (sql[i + 1].is_ascii_alphabetic() || sql[i + 1] == b'_')
            {
                i += 1;
                while i < sql.len() && (ident(sql[i]) || sql[i] == b'.') {
                    i += 1;
                }
                if i - start <= 63 {
                    let n = String::from_utf8_lossy(&sql[start..i]).to_ascii_lowercase();
                    if !names.contains(&n) {
                        names.push(n);
                    }
                }
            }
        } else {
            i += 1;
        }
    }
    names
}

/// The lexer's answer, or `None` when only the grammar can tell.
pub fn fast(sql: &[u8]) -> Option<u8> {
    if !single(sql) {
        return None;
    }
    let (first, after) = word(sql, 0);
    let kw = first.to_ascii_lowercase();
    let functions = || {
        let mut f = 0;
        if contains_ci(sql, b"set_config") {
            f |= flags::SNAPSHOT;
            if contains_ci(sql, b"authorization") {
                f |= flags::PIN;
            }
        }
        if contains_ci(sql, b"advisory_lock") {
            f |= flags::PIN;
        }
        f
    };
    match kw.as_slice() {
        b"select" | b"with" => {
            if contains_ci(sql, b"into") {
                return None; // SELECT ... INTO TEMP creates a temp table
            }
            Some(functions())
        }
        b"insert" | b"update" | b"delete" | b"values" | b"table" | b"merge" | b"explain"
        | b"copy" | b"fetch" | b"move" | b"close" | b"show" | b"begin" | b"start" | b"commit"
        | b"end" | b"rollback" | b"abort" | b"savepoint" | b"release" | b"notify" | b"analyze"
        | b"vacuum" | b"truncate" | b"lock" | b"call" | b"do" | b"grant" | b"revoke"
        | b"comment" | b"reindex" | b"cluster" | b"refresh" | b"checkpoint" | b"unlisten"
        | b"alter" | b"drop" | b"security" | b"import" | b"reassign" => Some(functions()),
        b"create" => {
            if contains_ci(sql, b"temp") {
                Some(flags::PIN | functions())
            } else {
                Some(functions())
            }
        }
        b"set" | b"reset" if contains_ci(sql, b"authorization") => {
            // SET SESSION AUTHORIZATION changes who the backend's session user is: that
            // backend stays with this session, and DISCARD ALL (which includes SET SESSION
            // AUTHORIZATION DEFAULT) cleans it when the session ends. Never shared meanwhile.
            Some(flags::PIN | flags::SNAPSHOT)
        }
        b"set" => {
            let (second, _) = word(sql, after);
            if second.eq_ignore_ascii_case(b"local")
                || second.eq_ignore_ascii_case(b"transaction")
                || second.eq_ignore_ascii_case(b"constraints")
            {
                Some(0)
            } else {
                Some(flags::SNAPSHOT)
            }
        }
        b"reset" => Some(flags::SNAPSHOT),
        b"discard" => {
            let (second, _) = word(sql, after);
            if second.eq_ignore_ascii_case(b"all") {
                Some(flags::DISCARD | flags::SNAPSHOT)
            } else {
                Some(0)
            }
        }
        b"listen" | b"prepare" | b"load" => Some(flags::PIN),
        b"deallocate" => {
            if contains_ci(sql, b"all") {
                Some(flags::DEALLOCATE)
            } else {
                Some(0)
            }
        }
        b"declare" => {
            if contains_ci(sql, b"hold") {
                Some(flags::PIN)
            } else {
                Some(0)
            }
        }
        _ => None,
    }
}

/// The grammar's answer: every statement in the text, and the functions it calls.
pub fn full(sql: &str) -> u8 {
    use pg_query::NodeEnum;
    let parsed = match pg_query::parse(sql) {
        Ok(p) => p,
        // Postgres parses the whole string before running any of it: nothing will run.
        Err(_) => return 0,
    };
    let mut f = 0;
    for raw in &parsed.protobuf.stmts {
        let Some(node) = raw.stmt.as_ref().and_then(|n| n.node.as_ref()) else {
            continue;
        };
        f |= match node {
            NodeEnum::VariableSetStmt(s) => {
                if s.name == "session_authorization" {
                    flags::PIN | flags::SNAPSHOT
                } else if s.is_local || s.name.starts_with("transaction") {
                    0
                } else {
                    flags::SNAPSHOT
                }
            }
            NodeEnum::DiscardStmt(d)
                if d.target == pg_query::protobuf::DiscardMode::DiscardAll as i32 => {
                    flags::DISCARD | flags::SNAPSHOT
                }
            NodeEnum::CreateStmt(c) => temp(c.relation.as_ref()),
            NodeEnum::CreateTableAsStmt(c) => temp(c.into.as_ref().and_then(|i| i.rel.as_ref())),
            NodeEnum::SelectStmt(s) => temp(s.into_clause.as_ref().and_then(|i| i.rel.as_ref())),
            NodeEnum::ViewStmt(v) => temp(v.view.as_ref()),
            NodeEnum::CreateSeqStmt(s) => temp(s.sequence.as_ref()),
            NodeEnum::DeclareCursorStmt(d)
                // CURSOR_OPT_HOLD (src/include/nodes/parsenodes.h)
                if d.options & 0x0020 != 0 => {
                    flags::PIN
                }
            NodeEnum::ListenStmt(_) | NodeEnum::PrepareStmt(_) | NodeEnum::LoadStmt(_) => {
                flags::PIN
            }
            NodeEnum::DeallocateStmt(d)
                if (d.isall || d.name.is_empty()) => {
                    flags::DEALLOCATE
                }
            _ => 0,
        };
    }
    for (name, _) in &parsed.functions {
        let name = name.rsplit('.').next().unwrap_or(name);
        if name == "set_config" {
            f |= flags::SNAPSHOT;
            if sql.to_ascii_lowercase().contains("authorization") {
                f |= flags::PIN;
            }
        }
        if name.contains("advisory_lock") {
            f |= flags::PIN;
        }
    }
    f
}

fn temp(rel: Option<&pg_query::protobuf::RangeVar>) -> u8 {
    match rel {
        Some(r) if r.relpersistence == "t" => flags::PIN,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_names() {
        assert_eq!(
            custom_setting_names(
                b"SET myapp.tenant = 'x'; select set_config('Other.Key', '1', false)"
            ),
            vec!["myapp.tenant".to_string(), "other.key".to_string()]
        );
        assert!(custom_setting_names(b"SET work_mem = '1MB'").is_empty());
        assert!(custom_setting_names(b"select 1.5").is_empty());
    }

    #[test]
    fn lexer() {
        assert_eq!(fast(b"SELECT 1"), Some(0));
        assert_eq!(fast(b"  /* c */ -- x\n select 1;"), Some(0));
        assert_eq!(
            fast(b"select set_config('a.b','1',false)"),
            Some(flags::SNAPSHOT)
        );
        assert_eq!(fast(b"select pg_advisory_lock(1)"), Some(flags::PIN));
        assert_eq!(fast(b"select pg_advisory_xact_lock(1)"), Some(0));
        assert_eq!(fast(b"SET search_path = a"), Some(flags::SNAPSHOT));
        assert_eq!(fast(b"SET LOCAL work_mem = '1MB'"), Some(0));
        assert_eq!(
            fast(b"SET SESSION AUTHORIZATION u1"),
            Some(flags::PIN | flags::SNAPSHOT)
        );
        assert_eq!(
            fast(b"reset session authorization"),
            Some(flags::PIN | flags::SNAPSHOT)
        );
        assert_eq!(
            fast(b"select set_config('session_authorization', 'u1', false)"),
            Some(flags::PIN | flags::SNAPSHOT)
        );
        assert_eq!(fast(b"create temp table t(a int)"), Some(flags::PIN));
        assert_eq!(fast(b"discard all"), Some(flags::DISCARD | flags::SNAPSHOT));
        assert_eq!(fast(b"select 1; set a = 1"), None);
        assert_eq!(fast(b"select 1 into temp t"), None);
        assert_eq!(fast(b"frobnicate"), None);
    }

    #[test]
    fn grammar() {
        assert_eq!(full("select 1; set work_mem = '2MB'"), flags::SNAPSHOT);
        assert_eq!(full("select 1 into temp t"), flags::PIN);
        assert_eq!(
            full("begin; declare c cursor with hold for select 1; commit"),
            flags::PIN
        );
        assert_eq!(
            full("select 1; select pg_catalog.set_config('x.y', '1', false)"),
            flags::SNAPSHOT
        );
        assert_eq!(full("deallocate all"), flags::DEALLOCATE);
        assert_eq!(
            full("select 1; set session authorization u1"),
            flags::PIN | flags::SNAPSHOT
        );
        assert_eq!(full("select (("), 0);
    }

    #[test]
    fn pathological() {
        let deep = format!("select {}1{}", "(".repeat(100_000), ")".repeat(100_000));
        assert!(depth(deep.as_bytes()) > MAX_DEPTH);
        let c = Classifier::default();
        let f = futures_lite::future::block_on(c.classify(format!("{deep}; select 1").as_bytes()));
        assert_eq!(f, CONSERVATIVE);
        let long_sum = format!("select 1{}; select 2", "+1".repeat(30_000));
        let f = futures_lite::future::block_on(c.classify(long_sum.as_bytes()));
        assert_eq!(f, 0);
        assert_eq!(fast(b""), None);
        let _ = futures_lite::future::block_on(c.classify(b"select \xff\xfe; x"));
        let _ = futures_lite::future::block_on(c.classify(b"/* unterminated"));
    }
}
