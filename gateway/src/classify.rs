//! Statement classification: does a statement change session state the pooler must know about?
//!
//! A hand lexer clears the common statements by their first keyword; anything it cannot decide
//! (several statements in one string, an unusual keyword) goes to the real Postgres grammar
//! (`pg_query`) on a helper thread with a large stack, and the answer is cached by text. A
//! statement too large or too deeply nested to parse safely gets the conservative answer
//! (read the settings back afterwards); Postgres itself then judges it.

use crate::builtins::is_builtin_function;
use crate::calls;
use shared::link::flags;
use shared::sql::{contains_ci, find_ci, Kind, Lexer};
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

/// Not a link flag (the gateway masks it off): the statement would lower `synchronous_commit`,
/// which the cluster's durability policy forbids (issue 5, point 3).
pub const LOWERS_SYNC_COMMIT: u8 = 0x80;

#[derive(Default)]
pub struct Classifier {
    cache: RefCell<HashMap<Box<[u8]>, u8>>,
    /// Look for statements that lower `synchronous_commit` (config `guard_synchronous_commit`).
    pub guard_sync_commit: bool,
}

impl Classifier {
    pub fn new(guard_sync_commit: bool) -> Classifier {
        Classifier {
            cache: RefCell::default(),
            guard_sync_commit,
        }
    }

    /// The answer without waiting, if the lexer or the cache has it.
    pub fn classify_now(&self, sql: &[u8]) -> Option<u8> {
        self.classify_now_inner(sql)
            .map(|f| f | sequence_state(sql))
    }

    pub async fn classify(&self, sql: &[u8]) -> u8 {
        self.classify_inner(sql).await | sequence_state(sql)
    }

    fn classify_now_inner(&self, sql: &[u8]) -> Option<u8> {
        // A statement naming synchronous_commit goes to the grammar (once: the answer is
        // cached); the word test is the only cost the guard adds to every other statement.
        if self.guard_sync_commit && contains_ci(sql, b"synchronous_commit") {
            return self.cache.borrow().get(sql).copied();
        }
        fast(sql).or_else(|| self.cache.borrow().get(sql).copied())
    }

    async fn classify_inner(&self, sql: &[u8]) -> u8 {
        if let Some(f) = self.classify_now_inner(sql) {
            return f;
        }
        let guard = self.guard_sync_commit && contains_ci(sql, b"synchronous_commit");
        let f = if sql.len() > MAX_PARSE_LEN || depth(sql) > MAX_DEPTH {
            // Too big to parse safely: if it names synchronous_commit, refuse it.
            CONSERVATIVE | if guard { LOWERS_SYNC_COMMIT } else { 0 }
        } else {
            match std::str::from_utf8(sql) {
                Ok(text) => match parse_off_core(text.to_owned(), guard).await {
                    Some(f) => f,
                    // Not judged (every parser busy): conservative, refused if it may lower
                    // synchronous_commit, and not cached.
                    None => return CONSERVATIVE | if guard { LOWERS_SYNC_COMMIT } else { 0 },
                },
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

/// The flags of a session's protocol-level prepared statements, for their later executions: a
/// `Bind` in a batch without the `Parse` must carry what the statement does when it runs
/// (`SELECT set_wm($1)` prepared once, executed many times). Only statements with flags are
/// kept (most have none), at most `MAX_FLAGGED`; past that, an unknown name is treated
/// conservatively.
#[derive(Default)]
pub struct StatementFlags {
    named: HashMap<Box<[u8]>, u8>,
    unnamed: u8,
    overflowed: bool,
}

const MAX_FLAGGED: usize = 1000;

impl StatementFlags {
    pub fn parsed(&mut self, name: &[u8], f: u8) {
        let f = f & !LOWERS_SYNC_COMMIT;
        if name.is_empty() {
            self.unnamed = f;
        } else if f == 0 {
            self.named.remove(name);
        } else if self.named.len() < MAX_FLAGGED || self.named.contains_key(name) {
            self.named.insert(name.into(), f);
        } else {
            self.overflowed = true;
        }
    }

    pub fn bound(&self, name: &[u8]) -> u8 {
        if name.is_empty() {
            return self.unnamed;
        }
        if self.named.is_empty() && !self.overflowed {
            return 0; // most sessions: no hashing
        }
        match self.named.get(name) {
            Some(&f) => f,
            None if self.overflowed => CONSERVATIVE,
            None => 0,
        }
    }

    pub fn closed(&mut self, name: &[u8]) {
        self.named.remove(name);
    }
}

/// Threads that run the grammar for every core of the process: a deep statement may recurse
/// far, and an executor's core must not stall on it. A fixed pool, not a thread per cache miss
/// (a stream of distinct statements would otherwise start a thread each).
const PARSER_THREADS: usize = 2;
/// Statements waiting for a parser thread; past it the conservative answer is used at once, so
/// a flood of pathological SQL costs its senders a settings read-back, not a stalled core.
const PARSER_QUEUE: usize = 1024;

struct ParseJob {
    text: String,
    guard: bool,
    answer: futures_channel::oneshot::Sender<u8>,
}

fn parser_pool() -> &'static crossbeam::channel::Sender<ParseJob> {
    static POOL: std::sync::OnceLock<crossbeam::channel::Sender<ParseJob>> =
        std::sync::OnceLock::new();
    POOL.get_or_init(|| {
        let (tx, rx) = crossbeam::channel::bounded::<ParseJob>(PARSER_QUEUE);
        for i in 0..PARSER_THREADS {
            let rx = rx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("classify-{i}"))
                .stack_size(256 << 20)
                .spawn(move || {
                    for job in rx {
                        let f = std::panic::catch_unwind(|| {
                            let mut f = full(&job.text);
                            if job.guard && lowers_sync_commit(&job.text) {
                                f |= LOWERS_SYNC_COMMIT;
                            }
                            f
                        });
                        let _ = job.answer.send(f.unwrap_or(CONSERVATIVE));
                    }
                });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "starting a parser thread failed");
            }
        }
        tx
    })
}

/// Runs the grammar on the parser threads; `None` if none could take it.
async fn parse_off_core(text: String, guard: bool) -> Option<u8> {
    let (answer, rx) = futures_channel::oneshot::channel();
    let job = ParseJob {
        text,
        guard,
        answer,
    };
    parser_pool().try_send(job).ok()?;
    rx.await.ok()
}

/// `currval`/`lastval` answer from the backend's own sequence state, which Tidepool cannot copy
/// to another backend: a statement naming them pins the session (`PIN | SEQUENCES`; the pooler
/// also clears what other sessions left there first). `nextval` does not pin: its value goes
/// to the client, and pinning every `SELECT nextval(...)` (Hibernate's id generator) would end
/// pooling for those applications.
/// `nextval`/`setval` alone get `SEQUENCES`: the session keeps its backend until its next request
/// (briefly), so a `currval` right after meets its value.
/// One pass over the text (it runs on every statement): each `val` is looked behind.
pub fn sequence_state(sql: &[u8]) -> u8 {
    let ends_with =
        |at: usize, w: &[u8]| at >= w.len() && sql[at - w.len()..at].eq_ignore_ascii_case(w);
    let mut f = 0;
    let mut from = 0;
    while let Some(found) = find_ci(&sql[from..], b"val") {
        let at = from + found;
        if ends_with(at, b"curr") || ends_with(at, b"last") {
            return flags::PIN | flags::SEQUENCES;
        }
        if ends_with(at, b"next") || ends_with(at, b"set") {
            f = flags::SEQUENCES;
        }
        from = at + 3;
    }
    f
}

/// `LANGUAGE C` (or `'c'`, `"c"`): creating such a function loads its library into the backend
/// (Postgres checks the symbol), like `LOAD`; C code may keep state per backend (regress.so's
/// `set_ttdummy`, refint's plan cache), so the session keeps that backend.
fn language_c(sql: &[u8]) -> bool {
    let mut after_language = false;
    for t in Lexer::new(sql) {
        if after_language {
            let name = match t.kind {
                Kind::Word => t.text(sql),
                Kind::String | Kind::QuotedName => &t.text(sql)[1..t.end - t.start - 1],
                _ => &[],
            };
            if name.eq_ignore_ascii_case(b"c") {
                return true;
            }
        }
        after_language = t.is_word(sql, b"language");
    }
    false
}

/// The first three tokens' words (empty where a token is not a word, and after it).
fn leading_words(sql: &[u8]) -> [&[u8]; 3] {
    let mut words: [&[u8]; 3] = [&[]; 3];
    for (slot, t) in words.iter_mut().zip(Lexer::new(sql)) {
        if t.kind != Kind::Word {
            break;
        }
        *slot = t.text(sql);
    }
    words
}

/// One statement only, that the lexer reads for sure: no `;` other than trailing ones.
fn single(sql: &[u8]) -> bool {
    let mut ended = false;
    for t in Lexer::new(sql) {
        match t.kind {
            Kind::Punct(b';') => ended = true,
            Kind::Unsure => return false,
            _ if ended => return false,
            _ => {}
        }
    }
    true
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
/// may change settings, at most 32; then, as `name(`, at most 16 functions it may call that are
/// not built-in: the pooler looks for custom settings in their bodies (`pg_proc.prosrc`), which
/// `pg_settings` cannot list. Extra names cost nothing (they read back as NULL).
pub fn custom_setting_names(sql: &[u8]) -> Vec<String> {
    let mut names = dotted_names(sql);
    let limit = names.len() + 16;
    calls::user_function_names(sql, &mut names, limit);
    names
}

fn dotted_names(sql: &[u8]) -> Vec<String> {
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

/// `Some(true)` for a statement that only commits the transaction (`COMMIT`, `END`), `Some(false)`
/// for one that only rolls it back (`ROLLBACK`, `ABORT`), `None` for anything else (including
/// `ROLLBACK TO SAVEPOINT` and the two-phase forms).
pub fn ends_transaction(sql: &[u8]) -> Option<bool> {
    if !single(sql) {
        return None;
    }
    let mut words = Lexer::new(sql).filter(|t| t.kind != Kind::Punct(b';'));
    let first = words.next()?;
    let commit = if first.is_word(sql, b"commit") || first.is_word(sql, b"end") {
        true
    } else if first.is_word(sql, b"rollback") || first.is_word(sql, b"abort") {
        false
    } else {
        return None;
    };
    // Optional WORK/TRANSACTION; AND [NO] CHAIN is refused (rare; let it fail).
    match words.next() {
        None => Some(commit),
        Some(t) if t.is_word(sql, b"work") || t.is_word(sql, b"transaction") => {
            words.next().is_none().then_some(commit)
        }
        Some(_) => None,
    }
}

/// Whether a statement sent inside a transaction might commit it (so its outcome is unknown if
/// the link dies under it). Conservative: any mention of COMMIT, or END/PREPARE first.
pub fn may_commit(sql: &[u8]) -> bool {
    let [first, ..] = leading_words(sql);
    first.eq_ignore_ascii_case(b"end")
        || first.eq_ignore_ascii_case(b"prepare")
        || contains_ci(sql, b"commit")
}

/// The lexer's answer, or `None` when only the grammar can tell.
pub fn fast(sql: &[u8]) -> Option<u8> {
    if !single(sql) {
        return None;
    }
    let [first, second, third] = leading_words(sql);
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
        if contains_ci(sql, b"notify") {
            // NOTIFY, pg_notify(): costs nothing unless the session listens.
            f |= flags::NOTIFY;
        }
        // LISTEN/UNLISTEN, also in a DO block's dynamic SQL (not in any statement that merely
        // mentions the word: each flag costs a read-back).
        if matches!(kw.as_slice(), b"listen" | b"unlisten" | b"do") && contains_ci(sql, b"listen") {
            f |= flags::LISTEN;
        }
        f
    };
    // A call of a function that is not built-in may change settings (set_config or SET in its
    // body): the settings are read back after it. The lexer clears built-in calls and syntax;
    // for anything else the grammar names the functions called (`full`), once per text.
    let calls_builtins_only = || calls::only_builtin_calls(sql);
    match kw.as_slice() {
        b"select" | b"with" => {
            if contains_ci(sql, b"into") {
                return None; // SELECT ... INTO TEMP creates a temp table
            }
            calls_builtins_only().then(functions)
        }
        // A procedure or a DO block runs code we cannot see: always read back.
        b"call" | b"do" => Some(flags::SNAPSHOT | functions()),
        b"insert" | b"update" | b"delete" | b"values" | b"table" | b"merge" | b"explain"
        | b"copy" | b"fetch" | b"move" | b"close" | b"show" | b"begin" | b"start" | b"commit"
        | b"end" | b"rollback" | b"abort" | b"savepoint" | b"release" | b"notify" | b"analyze"
        | b"vacuum" | b"truncate" | b"lock" | b"grant" | b"revoke" | b"comment" | b"reindex"
        | b"cluster" | b"refresh" | b"checkpoint" | b"unlisten" | b"alter" | b"drop"
        | b"security" | b"import" | b"reassign" => calls_builtins_only().then(functions),
        b"create" => {
            if !calls_builtins_only() {
                None
            } else if contains_ci(sql, b"temp") || language_c(sql) {
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
            if second.eq_ignore_ascii_case(b"all") {
                Some(flags::DISCARD | flags::SNAPSHOT | flags::LISTEN)
            } else {
                Some(0)
            }
        }
        // LISTEN, UNLISTEN and NOTIFY are flagged in `functions()`.
        b"listen" => Some(functions()),
        // SQL PREPARE does not pin: its name is mapped into the pooler's namespace
        // (statement_names.rs; the session pins it when it cannot be). What its body calls is
        // judged now, as for a protocol-level Parse (an advisory lock pins the session before
        // any EXECUTE). PREPARE TRANSACTION ends the transaction.
        b"prepare" => {
            if second.eq_ignore_ascii_case(b"transaction") {
                Some(flags::PIN)
            } else {
                Some(functions())
            }
        }
        b"load" => Some(flags::PIN),
        b"deallocate" => {
            // DEALLOCATE [PREPARE] ALL (the word itself contains "all").
            let what = if second.eq_ignore_ascii_case(b"prepare") {
                third
            } else {
                second
            };
            if what.eq_ignore_ascii_case(b"all") {
                Some(flags::DEALLOCATE)
            } else {
                Some(0)
            }
        }
        // The cursor's query runs at FETCH, in the same transaction (or at COMMIT, WITH HOLD):
        // a read-back when the transaction ends covers it.
        b"declare" if !calls_builtins_only() => None,
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
                    flags::DISCARD | flags::SNAPSHOT | flags::LISTEN
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
            NodeEnum::ListenStmt(_) | NodeEnum::UnlistenStmt(_) => flags::LISTEN,
            NodeEnum::DoStmt(_) if sql.to_ascii_lowercase().contains("listen") => flags::LISTEN,
            // SQL PREPARE: mapped into the pooler's namespace (statement_names.rs).
            NodeEnum::LoadStmt(_) => flags::PIN,
            NodeEnum::CreateFunctionStmt(_) if language_c(sql.as_bytes()) => flags::PIN,
            NodeEnum::DeallocateStmt(d)
                if (d.isall || d.name.is_empty()) => {
                    flags::DEALLOCATE
                }
            _ => 0,
        };
    }
    // Every call in the tree (pg_query's own walker, `nodes()`, skips some places, such as
    // `VALUES` lists): only pg_catalog's own functions are built-in; another schema, or a
    // name pg_catalog does not have (or one that runs SQL, builtins.rs), may change settings.
    let lower = sql.to_ascii_lowercase();
    let judge = |parts: &[&str]| -> u8 {
        let Some((&name, schema)) = parts.split_last() else {
            return flags::SNAPSHOT;
        };
        let mut f = 0;
        let builtin = matches!(schema, [] | ["pg_catalog"]) && is_builtin_function(name.as_bytes());
        if !builtin {
            f |= flags::SNAPSHOT;
        }
        if name == "set_config" && lower.contains("authorization") {
            f |= flags::PIN;
        }
        if name.contains("advisory_lock") {
            f |= flags::PIN;
        }
        f
    };
    match serde_json::to_value(&parsed.protobuf) {
        Ok(tree) => {
            let mut stack = vec![&tree];
            while let Some(v) = stack.pop() {
                match v {
                    serde_json::Value::Object(m) => {
                        if let Some(call) = m.get("FuncCall") {
                            let parts: Vec<&str> = call
                                .get("funcname")
                                .and_then(|n| n.as_array())
                                .map(|a| {
                                    a.iter()
                                        .filter_map(|p| p.pointer("/node/String/sval")?.as_str())
                                        .collect()
                                })
                                .unwrap_or_default();
                            f |= judge(&parts);
                        }
                        // A procedure, or a DO block: code we cannot see.
                        if m.contains_key("CallStmt") || m.contains_key("DoStmt") {
                            f |= flags::SNAPSHOT;
                        }
                        stack.extend(m.values());
                    }
                    serde_json::Value::Array(a) => stack.extend(a),
                    _ => {}
                }
            }
        }
        Err(_) => f |= CONSERVATIVE,
    }
    if contains_ci(sql.as_bytes(), b"notify") {
        // NOTIFY, pg_notify(), also in DO blocks: costs nothing unless the session listens.
        f |= flags::NOTIFY;
    }
    f
}

/// Values of `synchronous_commit` below `on` (Postgres: synchronous_commit_options in guc.c;
/// enum values match exactly, ignoring case, no prefixes). `on`, `remote_apply`, `true`, `yes`,
/// `1`, `DEFAULT` and anything Postgres itself rejects are let through.
pub fn lowering_value(v: &str) -> bool {
    matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "off" | "local" | "remote_write" | "false" | "no" | "0"
    )
}

/// Does this text (which names synchronous_commit) lower it? By the grammar:
/// - `SET [SESSION|LOCAL] synchronous_commit ...` and the same inside `ALTER ROLE|DATABASE|SYSTEM
///   ... SET` with a lowering value;
/// - `set_config('synchronous_commit', v, ...)` anywhere, when `v` is a lowering constant or not
///   a constant at all (a parameter or an expression could be `off`: refused, to be safe);
/// - a `DO` block naming synchronous_commit (its body is not SQL we can see into).
///
/// A `set_config` whose *name* is not a constant is let through: it cannot be judged before it
/// runs, and refusing every such call would break applications that set their own settings
/// that way. Functions stored in the database are not seen either. The guard closes the
/// doors a client can open by accident or habit; the policy itself lives in Postgres.
pub fn lowers_sync_commit(sql: &str) -> bool {
    use pg_query::protobuf::a_const::Val;
    use pg_query::{NodeEnum, NodeRef};
    let Ok(parsed) = pg_query::parse(sql) else {
        return false; // Postgres rejects it: nothing runs.
    };
    let set_lowers = |s: &pg_query::protobuf::VariableSetStmt| {
        s.name.eq_ignore_ascii_case("synchronous_commit")
            && s.args
                .first()
                .and_then(|a| a.node.as_ref())
                .is_some_and(|a| match a {
                    NodeEnum::AConst(c) => const_lowers(c),
                    _ => false,
                })
    };
    fn const_lowers(c: &pg_query::protobuf::AConst) -> bool {
        match &c.val {
            Some(Val::Sval(s)) => lowering_value(&s.sval),
            Some(Val::Ival(i)) => i.ival == 0,
            Some(Val::Boolval(b)) => !b.boolval,
            _ => false,
        }
    }
    fn const_str(n: &pg_query::protobuf::Node) -> Option<&str> {
        match n.node.as_ref()? {
            NodeEnum::AConst(c) => match &c.val {
                Some(Val::Sval(s)) => Some(&s.sval),
                _ => None,
            },
            NodeEnum::TypeCast(t) => const_str(t.arg.as_ref()?),
            _ => None,
        }
    }
    for (node, _, _, _) in parsed.protobuf.nodes() {
        let bad = match node {
            NodeRef::VariableSetStmt(s) => set_lowers(s),
            NodeRef::AlterRoleSetStmt(s) => s.setstmt.as_ref().is_some_and(set_lowers),
            NodeRef::AlterDatabaseSetStmt(s) => s.setstmt.as_ref().is_some_and(set_lowers),
            NodeRef::AlterSystemStmt(s) => s.setstmt.as_ref().is_some_and(set_lowers),
            NodeRef::DoStmt(_) => true, // the caller saw the word in the text
            NodeRef::FuncCall(f) => {
                let name = f.funcname.last().and_then(|n| match n.node.as_ref() {
                    Some(NodeEnum::String(s)) => Some(s.sval.as_str()),
                    _ => None,
                });
                name.is_some_and(|n| n.eq_ignore_ascii_case("set_config"))
                    && f.args
                        .first()
                        .and_then(const_str)
                        .is_some_and(|n| n.trim().eq_ignore_ascii_case("synchronous_commit"))
                    && f.args.get(1).is_none_or(|v| match v.node.as_ref() {
                        Some(NodeEnum::AConst(c)) => c.isnull || const_lowers(c),
                        Some(NodeEnum::TypeCast(t)) => t
                            .arg
                            .as_ref()
                            .and_then(|a| a.node.as_ref())
                            .is_none_or(|a| match a {
                                NodeEnum::AConst(c) => c.isnull || const_lowers(c),
                                _ => true,
                            }),
                        _ => true,
                    })
            }
            _ => false,
        };
        if bad {
            return true;
        }
    }
    // pg_query's `nodes()` skips some places (`VALUES` lists): the same set_config check over
    // the whole tree.
    serde_json::to_value(&parsed.protobuf).is_ok_and(|tree| json_set_config_lowers(&tree))
}

/// `set_config('synchronous_commit', <lowering or unknown value>, …)` anywhere in a parse tree
/// serialized to JSON (the check of `lowers_sync_commit`, for the places `nodes()` misses).
fn json_set_config_lowers(tree: &serde_json::Value) -> bool {
    use serde_json::Value;
    fn const_str(n: &Value) -> Option<&str> {
        if let Some(s) = n.pointer("/node/AConst/val/Sval/sval") {
            return s.as_str();
        }
        const_str(n.pointer("/node/TypeCast/arg")?)
    }
    fn aconst_lowers(c: &Value) -> bool {
        if c.get("isnull").and_then(Value::as_bool) == Some(true) {
            return true;
        }
        if let Some(s) = c.pointer("/val/Sval/sval").and_then(Value::as_str) {
            return lowering_value(s);
        }
        if let Some(i) = c.pointer("/val/Ival/ival") {
            return i.as_i64().unwrap_or(0) == 0;
        }
        if let Some(b) = c.pointer("/val/Boolval/boolval") {
            return !b.as_bool().unwrap_or(false);
        }
        false
    }
    fn value_lowers(v: &Value) -> bool {
        if let Some(c) = v.pointer("/node/AConst") {
            return aconst_lowers(c);
        }
        if let Some(t) = v.pointer("/node/TypeCast") {
            return match t.pointer("/arg/node/AConst") {
                Some(c) => aconst_lowers(c),
                None => true,
            };
        }
        true
    }
    let mut stack = vec![tree];
    while let Some(v) = stack.pop() {
        match v {
            Value::Object(m) => {
                if let Some(call) = m.get("FuncCall") {
                    let name = call
                        .get("funcname")
                        .and_then(Value::as_array)
                        .and_then(|a| a.last())
                        .and_then(|n| n.pointer("/node/String/sval"))
                        .and_then(Value::as_str);
                    let args = call.get("args").and_then(Value::as_array);
                    let names_it = args
                        .and_then(|a| a.first())
                        .and_then(const_str)
                        .is_some_and(|n| n.trim().eq_ignore_ascii_case("synchronous_commit"));
                    if name.is_some_and(|n| n.eq_ignore_ascii_case("set_config"))
                        && names_it
                        && args.and_then(|a| a.get(1)).is_none_or(value_lowers)
                    {
                        return true;
                    }
                }
                stack.extend(m.values());
            }
            Value::Array(a) => stack.extend(a),
            _ => {}
        }
    }
    false
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
        assert_eq!(
            custom_setting_names(b"select set_tenant('t1'), lower(x), app.set_x(1)"),
            vec![
                "app.set_x".to_string(),
                "set_tenant(".into(),
                "set_x(".into()
            ]
        );
    }

    #[test]
    fn statement_flags_follow_bind() {
        let mut s = StatementFlags::default();
        s.parsed(b"s1", flags::SNAPSHOT | LOWERS_SYNC_COMMIT);
        s.parsed(b"s2", 0);
        s.parsed(b"", flags::PIN);
        assert_eq!(s.bound(b"s1"), flags::SNAPSHOT);
        assert_eq!(s.bound(b"s2"), 0);
        assert_eq!(s.bound(b""), flags::PIN);
        assert_eq!(s.bound(b"never"), 0);
        s.closed(b"s1");
        assert_eq!(s.bound(b"s1"), 0);
        for i in 0..MAX_FLAGGED + 1 {
            s.parsed(format!("n{i}").as_bytes(), flags::SNAPSHOT);
        }
        assert_eq!(
            s.bound(b"unknown"),
            CONSERVATIVE,
            "past the bound: conservative"
        );
    }

    /// Issue 4, point 5: a statement that calls a function that is not built-in reads the
    /// settings back afterwards; built-in calls stay on the fast path (no read-back).
    #[test]
    fn user_function_calls_read_settings_back() {
        let c = Classifier::default();
        let classify = |sql: &str| {
            let f = futures_lite::future::block_on(c.classify(sql.as_bytes()));
            assert_eq!(c.classify_now(sql.as_bytes()), Some(f), "cached: {sql}");
            f
        };
        for sql in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2",
            "INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) \
             VALUES ($1, $2, $3, $4, CURRENT_TIMESTAMP)",
            "SELECT now()",
            "SELECT count(*) FROM pgbench_branches",
            "SELECT lower(x) FROM t WHERE upper(y) = $1",
            "SELECT pg_catalog.length('x')",
            "WITH RECURSIVE r(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM r WHERE n < 3) \
             SELECT * FROM r",
            "INSERT INTO t (a) VALUES (1) ON CONFLICT (a) DO UPDATE SET (a) = (2)",
            "SELECT x FROM t GROUP BY ROLLUP (x)",
            "CREATE INDEX ON t (lower(x))",
        ] {
            assert_eq!(classify(sql), 0, "{sql}");
        }
        for sql in [
            "SELECT set_wm('12MB')",
            "SELECT * FROM set_wm('12MB')",
            "select app.set_tenant($1)",
            "SELECT public.lower('X')",
            "INSERT INTO t VALUES (f())",
            "UPDATE t SET x = f(x) WHERE id = 1",
            "DELETE FROM t WHERE f(x)",
            "SELECT query_to_xml('select 1', true, true, '')",
            "select 1; select f()",
            "DECLARE c CURSOR FOR SELECT f()",
            "EXPLAIN ANALYZE SELECT f()",
            "CALL p()",
            "call s.p(1)",
            "DO $$ BEGIN PERFORM 1; END $$",
            "select 1; call p()",
            "select 1; do $$ begin end $$",
        ] {
            assert_ne!(classify(sql) & flags::SNAPSHOT, 0, "{sql}");
        }
    }

    #[test]
    fn lexer() {
        assert_eq!(fast(b"SELECT 1"), Some(0));
        // One statement though a string holds a `;`; two statements go to the grammar.
        assert_eq!(fast(b"SELECT ';'"), Some(0));
        assert_eq!(fast(b"SELECT 1; SELECT 2"), None);
        // Text read two ways under standard_conforming_strings: the grammar decides.
        assert_eq!(fast(b"SELECT 'a\\'; SET x = 1 --'"), None);
        assert_eq!(ends_transaction(b"COMMIT /* x */ ;"), Some(true));
        assert_eq!(ends_transaction(b"ROLLBACK TO SAVEPOINT s"), None);
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
        for c in [
            "CREATE FUNCTION f() RETURNS trigger AS 'regress.so' LANGUAGE C",
            "create function f(int) returns int as '$libdir/x', 'f' language 'c' strict",
            "CREATE OR REPLACE FUNCTION f() RETURNS int LANGUAGE \"C\" AS 'x.so'",
        ] {
            assert_eq!(fast(c.as_bytes()), Some(flags::PIN), "{c}");
        }
        for c in [
            "CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'select 1'",
            "create table language_c (a int)",
        ] {
            assert_eq!(fast(c.as_bytes()), Some(0), "{c}");
        }
        assert_eq!(
            full("CREATE FUNCTION f() RETURNS int LANGUAGE plpgsql AS $$begin return 1; end$$"),
            0
        );
        assert_eq!(
            full("CREATE FUNCTION f() RETURNS trigger AS 'r.so' LANGUAGE C; SELECT 1") & flags::PIN,
            flags::PIN
        );
        assert_eq!(
            sequence_state(b"select currval('s')"),
            flags::PIN | flags::SEQUENCES
        );
        assert_eq!(
            sequence_state(b"SELECT LASTVAL()"),
            flags::PIN | flags::SEQUENCES
        );
        assert_eq!(sequence_state(b"select nextval('s')"), flags::SEQUENCES);
        assert_eq!(sequence_state(b"select 1"), 0);
        assert_eq!(sequence_state(b"select interval '1 day', eval(x)"), 0);
        assert_eq!(
            sequence_state(b"select setval('s', 1), CurrVal('s')"),
            flags::PIN | flags::SEQUENCES
        );
        assert_eq!(sequence_state(b"SELECT SETVAL('s', 5)"), flags::SEQUENCES);
        assert_eq!(
            fast(b"discard all"),
            Some(flags::DISCARD | flags::SNAPSHOT | flags::LISTEN)
        );
        assert_eq!(fast(b"LISTEN chan"), Some(flags::LISTEN));
        assert_eq!(fast(b"select * from listeners"), Some(0));
        assert_eq!(fast(b"unlisten *"), Some(flags::LISTEN));
        assert_eq!(fast(b"NOTIFY chan, 'x'"), Some(flags::NOTIFY));
        assert_eq!(
            fast(b"select pg_catalog.pg_notify('chan', 'x')"),
            Some(flags::NOTIFY)
        );
        assert_eq!(
            fast(b"do $$ begin perform pg_notify('a', 'b') end $$"),
            Some(flags::SNAPSHOT | flags::NOTIFY)
        );
        assert_eq!(fast(b"DEALLOCATE ALL"), Some(flags::DEALLOCATE));
        assert_eq!(fast(b"deallocate prepare all;"), Some(flags::DEALLOCATE));
        assert_eq!(fast(b"deallocate stmt_all"), Some(0));
        assert_eq!(fast(b"DEALLOCATE foo"), Some(0));
        assert_eq!(fast(b"prepare p as select 1"), Some(0));
        assert_eq!(
            fast(b"prepare l as select pg_advisory_lock(1)"),
            Some(flags::PIN)
        );
        assert_eq!(fast(b"prepare transaction 'x'"), Some(flags::PIN));
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
        assert_eq!(full("select 1; listen a"), flags::LISTEN);
        assert_eq!(full("select * from listeners; select 1"), 0);
        assert_eq!(
            full("do $$ begin execute 'listen x'; end $$"),
            flags::SNAPSHOT | flags::LISTEN
        );
        assert_eq!(full("unlisten a; notify b"), flags::LISTEN | flags::NOTIFY);
    }

    #[test]
    fn transaction_ends() {
        assert_eq!(ends_transaction(b"ROLLBACK"), Some(false));
        assert_eq!(ends_transaction(b" abort work ;"), Some(false));
        assert_eq!(ends_transaction(b"commit"), Some(true));
        assert_eq!(ends_transaction(b"END TRANSACTION"), Some(true));
        assert_eq!(ends_transaction(b"rollback to savepoint a"), None);
        assert_eq!(ends_transaction(b"rollback prepared 'x'"), None);
        assert_eq!(ends_transaction(b"commit; select 1"), None);
        assert_eq!(ends_transaction(b"select 1"), None);
        assert!(may_commit(b"COMMIT"));
        assert!(may_commit(b"end"));
        assert!(!may_commit(b"insert into t values (1)"));
    }

    #[test]
    fn sync_commit_guard() {
        for bad in [
            "SET synchronous_commit TO off",
            "set synchronous_commit = 'OFF'",
            "SET SESSION synchronous_commit = local",
            "SET LOCAL synchronous_commit TO remote_write",
            "set synchronous_commit = 0",
            "set synchronous_commit = false",
            "set synchronous_commit = no",
            "select 1; set synchronous_commit = off",
            "select set_config('synchronous_commit', 'off', false)",
            "select pg_catalog.set_config('synchronous_commit'::text, 'local'::text, true)",
            "select set_config('synchronous_commit', $1, false)",
            "select set_config('synchronous_commit', x, false) from t",
            "alter role alice set synchronous_commit = off",
            "alter database app set synchronous_commit = off",
            "alter system set synchronous_commit = off",
            "do $$begin perform set_config('synchronous_commit','off',false); end$$",
            "values (set_config('synchronous_commit', 'off', false))",
            "insert into t values (set_config('synchronous_commit', 'local'::text, false))",
            "insert into t values (set_config('synchronous_commit', $1, false))",
        ] {
            assert!(lowers_sync_commit(bad), "{bad}");
        }
        for ok in [
            "SET synchronous_commit TO on",
            "set synchronous_commit = remote_apply",
            "set synchronous_commit = 1",
            "set synchronous_commit = true",
            "set synchronous_commit to default",
            "reset synchronous_commit",
            "show synchronous_commit",
            "select set_config('synchronous_commit', 'on', false)",
            "select current_setting('synchronous_commit')",
            "select 'synchronous_commit off'",
            "set work_mem = 0",
            "insert into t values (set_config('synchronous_commit', 'on', false))",
        ] {
            assert!(!lowers_sync_commit(ok), "{ok}");
        }
        let c = Classifier::new(true);
        assert_eq!(c.classify_now(b"set synchronous_commit = off"), None);
        let f = futures_lite::future::block_on(c.classify(b"set synchronous_commit = off"));
        assert_eq!(f, flags::SNAPSHOT | LOWERS_SYNC_COMMIT);
        assert_eq!(
            c.classify_now(b"set synchronous_commit = off"),
            Some(flags::SNAPSHOT | LOWERS_SYNC_COMMIT)
        );
        assert_eq!(c.classify_now(b"select 1"), Some(0));
        let c = Classifier::new(false);
        assert_eq!(
            c.classify_now(b"set synchronous_commit = off"),
            Some(flags::SNAPSHOT)
        );
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

/// Databases a statement drops, renames or copies as a template (`DROP DATABASE x`,
/// `ALTER DATABASE x RENAME TO y`, `CREATE DATABASE y ... TEMPLATE x`): Postgres refuses these
/// while other sessions are connected to `x`, and the pooler's idle backends would count, so
/// the gateway tells the pooler to close them first. Cheap for everything else: one scan for
/// the word `database`. Written by hand (a few keywords, no parse tree needed).
pub fn databases_to_release(sql: &[u8]) -> Vec<String> {
    if !contains_ci(sql, b"database") {
        return Vec::new();
    }
    let mut out = Vec::new();
    for stmt in db_tokens(sql).split(|t| t == ";") {
        let word = |i: usize| stmt.get(i).map(String::as_str).unwrap_or("");
        match (word(0), word(1)) {
            ("drop", "database") => {
                let mut i = 2;
                if word(i) == "if" && word(i + 1) == "exists" {
                    i += 2;
                }
                if !word(i).is_empty() {
                    out.push(word(i).to_string());
                }
            }
            ("alter", "database") if stmt.iter().any(|t| t == "rename") && !word(2).is_empty() => {
                out.push(word(2).to_string());
            }
            ("create", "database") => {
                if let Some(i) = stmt.iter().position(|t| t == "template") {
                    let mut j = i + 1;
                    if word(j) == "=" {
                        j += 1;
                    }
                    if !word(j).is_empty() {
                        out.push(word(j).to_string());
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// Words (unquoted ones lower-cased, quoted ones as written), string literals' contents,
/// `;` and `=`, and other tokens as written; comments, `(`, `)` and `,` skipped.
fn db_tokens(sql: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    for t in Lexer::new(sql) {
        let text = match t.kind {
            Kind::Unsure => break,
            Kind::Punct(b'(' | b')' | b',') => continue,
            Kind::Word => t.text(sql).to_ascii_lowercase(),
            Kind::QuotedName | Kind::String => t.unquoted(sql).unwrap_or_default(),
            _ => t.text(sql).to_vec(),
        };
        out.push(String::from_utf8_lossy(&text).into_owned());
    }
    out
}

#[cfg(test)]
mod release_tests {
    use super::databases_to_release as r;

    #[test]
    fn finds_the_databases_postgres_needs_alone() {
        assert_eq!(r(b"DROP DATABASE t1"), vec!["t1"]);
        assert_eq!(r(b"drop database if exists \"Test DB\";"), vec!["Test DB"]);
        assert_eq!(r(b"DROP DATABASE t1 WITH (FORCE)"), vec!["t1"]);
        // Comments nest as in Postgres; a `;` in a string ends no statement.
        assert_eq!(r(b"DROP /* a /* b */ ; */ DATABASE t1"), vec!["t1"]);
        assert_eq!(
            r(b"SELECT ';DROP DATABASE no'; DROP DATABASE t1"),
            vec!["t1"]
        );
        assert_eq!(r(b"ALTER DATABASE t1 RENAME TO t3"), vec!["t1"]);
        assert_eq!(r(b"CREATE DATABASE t2 TEMPLATE t1"), vec!["t1"]);
        assert_eq!(
            r(b"CREATE DATABASE \"t2\" WITH OWNER a TEMPLATE = \"t1\" ENCODING 'UTF8'"),
            vec!["t1"]
        );
        assert_eq!(
            r(b"/* x */ DROP DATABASE a; DROP DATABASE b"),
            vec!["a", "b"]
        );
        assert!(r(b"CREATE DATABASE t2").is_empty());
        assert!(r(b"ALTER DATABASE t1 SET work_mem = '1MB'").is_empty());
        assert!(r(b"SELECT 'drop database x'").is_empty());
        assert!(r(b"SELECT 1").is_empty());
    }
}
