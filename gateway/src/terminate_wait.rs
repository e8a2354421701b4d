//! `pg_terminate_backend(pid, timeout)` of another session's pid with a timeout above 0.
//! Postgres 15 (signalfuncs.c, `pg_wait_until_termination`) then returns only once the target
//! backend has exited (`true`), or when the timeout has passed, with WARNING 01000 `backend with
//! PID n did not terminate within t milliseconds` and `false`. The server cannot see a session
//! of ours end, so the gateway waits (signals.rs issues the wait, session_io.rs holds): from the
//! server's word that it allowed the call (`down::SIGNAL`) the session's responses are held back
//! until the target session is gone or the timeout has passed. On a timeout the warning goes
//! where the call stood, and the call's `true` becomes `false` in the row that follows when the
//! call is a whole column of its statement's rows (`select_column`). See
//! docs/decisions/2026-12-07-signals-to-virtual-pids.md.

use shared::protocol::backend as be;
use shared::sql::{Kind, Token};
use std::time::{Duration, Instant};

/// How often a wait looks whether its target is gone (Postgres looks every 100 ms).
const POLL: Duration = Duration::from_millis(10);

/// The column of its statement's rows that the call spanning tokens `from..=close` is, whole:
/// an item of the select list of a plain `SELECT` that begins its statement, whose rows are sent
/// as they are computed (no `ORDER BY`, grouping, `DISTINCT`, set operation). The call's value is
/// then that column of the first row after the server's word. `None` anywhere else (inside an
/// expression, a subquery, after a `*`).
pub fn select_column(toks: &[Token], sql: &[u8], from: usize, close: usize) -> Option<u16> {
    let word = |t: &Token, w: &[u8]| t.kind == Kind::Word && t.text(sql).eq_ignore_ascii_case(w);
    const BEFORE: &[&[u8]] = &[
        b"from",
        b"where",
        b"group",
        b"having",
        b"window",
        b"order",
        b"limit",
        b"offset",
        b"distinct",
        b"union",
        b"intersect",
        b"except",
        b"into",
        b"values",
        b"returning",
        b"fetch",
        b"for",
    ];
    // The item begins with the call.
    let before = toks.get(from.checked_sub(1)?)?;
    let all_after_select = word(before, b"all") && from >= 2 && word(&toks[from - 2], b"select");
    if before.kind != Kind::Punct(b',') && !word(before, b"select") && !all_after_select {
        return None;
    }
    // Back to the statement's SELECT, counting the items before the call.
    let (mut column, mut depth, mut j) = (0u16, 0usize, from);
    loop {
        j = j.checked_sub(1)?;
        let t = &toks[j];
        match t.kind {
            Kind::Punct(b')') => depth += 1,
            Kind::Punct(b'(') if depth == 0 => return None,
            Kind::Punct(b'(') => depth -= 1,
            _ if depth > 0 => {}
            Kind::Punct(b',') => column = column.checked_add(1)?,
            Kind::Punct(b';') | Kind::Punct(b'*') => return None,
            Kind::Word if word(t, b"select") => break,
            Kind::Word if BEFORE.iter().any(|w| word(t, w)) => return None,
            _ => {}
        }
    }
    // The SELECT begins its statement, or the body of a SQL `PREPARE name [(types)] AS`.
    if j > 0 && toks[j - 1].kind != Kind::Punct(b';') {
        let start = toks[..j]
            .iter()
            .rposition(|t| t.kind == Kind::Punct(b';'))
            .map_or(0, |p| p + 1);
        if !(word(&toks[j - 1], b"as") && word(&toks[start], b"prepare")) {
            return None;
        }
    }
    // The item ends with the call.
    match toks.get(close + 1) {
        None => {}
        Some(t) if matches!(t.kind, Kind::Punct(b',') | Kind::Punct(b';')) => {}
        Some(t) if word(t, b"as") || word(t, b"from") || word(t, b"where") => {}
        _ => return None,
    }
    const AFTER: &[&[u8]] = &[
        b"group",
        b"having",
        b"window",
        b"order",
        b"union",
        b"intersect",
        b"except",
    ];
    let mut depth = 0usize;
    for t in &toks[close + 1..] {
        match t.kind {
            Kind::Punct(b'(') => depth += 1,
            Kind::Punct(b')') => depth = depth.saturating_sub(1),
            Kind::Punct(b';') if depth == 0 => break,
            Kind::Word if depth == 0 && AFTER.iter().any(|w| word(t, w)) => return None,
            _ => {}
        }
    }
    Some(column)
}

/// Waits until `lives()` says no, at most `ms` milliseconds; whether the target is gone.
pub async fn until_gone(lives: impl Fn() -> bool, ms: i64) -> bool {
    let deadline = Instant::now() + Duration::from_millis(ms.max(0) as u64);
    loop {
        if !lives() {
            return true;
        }
        let now = Instant::now();
        if now >= deadline {
            return false;
        }
        glommio::timer::sleep(POLL.min(deadline - now)).await;
    }
}

/// A session's responses held back while terminations wait for their targets.
pub struct Held {
    bytes: Vec<u8>,
    /// Told apart from a later hold of the same session (a wait that ends after its hold was
    /// let go must not end the next one).
    pub generation: u32,
    /// Waits not ended yet.
    waits: u32,
    /// Calls whose answer changes (a target that outlived the timeout, a signal the gateway
    /// would not send: signals.rs): where the server's word came in `bytes`, the warning that
    /// goes there, the call's column (its `true` becomes `false`).
    changed: Vec<(usize, Vec<u8>, Option<u16>)>,
}

impl Held {
    pub fn new(generation: u32) -> Held {
        Held {
            bytes: Vec::new(),
            generation,
            waits: 0,
            changed: Vec::new(),
        }
    }

    /// A wait begins where the responses now stand; returns that place.
    pub fn begin(&mut self) -> usize {
        self.waits += 1;
        self.bytes.len()
    }

    pub fn push(&mut self, data: &[u8]) {
        self.bytes.extend_from_slice(data);
    }

    /// The wait begun at `at` ended; `change`: the call answers `false` after all, with this
    /// warning where the server's word stood, in the row that follows at this column. True when
    /// it was the last wait.
    pub fn ended(&mut self, at: usize, change: Option<(Vec<u8>, Option<u16>)>) -> bool {
        if let Some((warning, column)) = change {
            self.changed.push((at, warning, column));
        }
        self.waits = self.waits.saturating_sub(1);
        self.waits == 0
    }

    /// The responses as the client gets them: each changed call's warning in its place, and
    /// its value `false` where its column is known.
    pub fn into_bytes(mut self) -> Vec<u8> {
        self.changed.sort_by_key(|t| std::cmp::Reverse(t.0));
        for (at, w, column) in std::mem::take(&mut self.changed) {
            if let Some(c) = column {
                falsify_first_row(&mut self.bytes[at..], c);
            }
            self.bytes.splice(at..at, w);
        }
        self.bytes
    }

    /// The responses as they came (the session ends: no answer is changed any more).
    pub fn unchanged(self) -> Vec<u8> {
        self.bytes
    }
}

/// Postgres 15's warning when a terminated backend outlives the timeout (signalfuncs.c,
/// `pg_wait_until_termination`; `errmsg_plural` on the timeout).
pub fn warning(pid: i32, ms: i64) -> Vec<u8> {
    let unit = if ms == 1 {
        "millisecond"
    } else {
        "milliseconds"
    };
    let message = format!("backend with PID {pid} did not terminate within {ms} {unit}");
    let mut m = Vec::new();
    shared::protocol::put_message(&mut m, be::NOTICE_RESPONSE, |b| {
        for (code, value) in [
            (b'S', "WARNING"),
            (b'V', "WARNING"),
            (b'C', "01000"),
            (b'M', message.as_str()),
            (b'F', "signalfuncs.c"),
            (b'L', "192"),
            (b'R', "pg_wait_until_termination"),
        ] {
            b.push(code);
            b.extend_from_slice(value.as_bytes());
            b.push(0);
        }
        b.push(0);
    });
    m
}

/// In the first `DataRow` of `msgs` (whole messages), column `column`'s `true` becomes `false`
/// (text `t`, binary 1: the same width).
fn falsify_first_row(msgs: &mut [u8], column: u16) {
    let mut i = 0;
    while i + 5 <= msgs.len() {
        let len = u32::from_be_bytes([msgs[i + 1], msgs[i + 2], msgs[i + 3], msgs[i + 4]]);
        let next = (i + 1 + (len as usize).max(4)).min(msgs.len());
        if msgs[i] != b'D' {
            i = next;
            continue;
        }
        let row = &mut msgs[i + 5..next];
        let mut at = 2;
        for c in 0..=column {
            let Some(n) = row.get(at..at + 4) else { return };
            let n = i32::from_be_bytes([n[0], n[1], n[2], n[3]]);
            at += 4;
            if c == column {
                match (n, row.get_mut(at)) {
                    (1, Some(v)) if *v == b't' => *v = b'f',
                    (1, Some(v)) if *v == 1 => *v = 0,
                    _ => {}
                }
                return;
            }
            at += n.max(0) as usize;
        }
        return;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared::sql::Lexer;

    /// The column of the first `pg_terminate_backend` call in `sql`.
    fn column(sql: &str) -> Option<u16> {
        let s = sql.as_bytes();
        let toks: Vec<Token> = Lexer::new(s).collect();
        let mut at = toks
            .iter()
            .position(|t| t.is_word(s, b"pg_terminate_backend"))
            .unwrap();
        let call = at;
        if at >= 2 && toks[at - 1].kind == Kind::Punct(b'.') {
            at -= 2;
        }
        let mut depth = 0;
        let mut close = call + 1;
        loop {
            match toks[close].kind {
                Kind::Punct(b'(') => depth += 1,
                Kind::Punct(b')') if depth == 1 => break,
                Kind::Punct(b')') => depth -= 1,
                _ => {}
            }
            close += 1;
        }
        select_column(&toks, s, at, close)
    }

    #[test]
    fn a_call_is_a_column_only_as_a_whole_select_item() {
        assert_eq!(column("SELECT pg_terminate_backend(5000000, 100)"), Some(0));
        assert_eq!(column("SELECT ALL pg_terminate_backend(5, 1) t"), None);
        assert_eq!(
            column("SELECT ALL pg_terminate_backend(5, 1) AS t"),
            Some(0)
        );
        assert_eq!(
            column("select 1 as a, (2), pg_catalog.pg_terminate_backend($1, $2) AS t;"),
            Some(2)
        );
        assert_eq!(
            column("SELECT 1; SELECT f(1, 2), pg_terminate_backend(5, 1) FROM t WHERE x"),
            Some(1)
        );
        assert_eq!(
            column("PREPARE p(int) AS SELECT 1, pg_terminate_backend($1, 1)"),
            Some(1)
        );
        for sql in [
            "SELECT NOT pg_terminate_backend(5, 1)",
            "SELECT pg_terminate_backend(5, 1) IS TRUE",
            "SELECT 1, 2 + pg_terminate_backend(5, 1)::int",
            "SELECT (pg_terminate_backend(5, 1))",
            "SELECT x FROM (SELECT pg_terminate_backend(5, 1)) s",
            "SELECT *, pg_terminate_backend(5, 1) FROM t",
            "SELECT DISTINCT pg_terminate_backend(5, 1)",
            "SELECT pg_terminate_backend(5, 1) FROM t ORDER BY 1",
            "SELECT pg_terminate_backend(5, 1) UNION ALL SELECT true",
            "SELECT 1 FROM t WHERE pg_terminate_backend(5, 1)",
            "WITH w AS (SELECT 1) SELECT pg_terminate_backend(5, 1)",
            "EXPLAIN ANALYZE SELECT pg_terminate_backend(5, 1)",
        ] {
            assert_eq!(column(sql), None, "{sql}");
        }
    }

    fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![tag];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// A `DataRow` of text or binary one-byte values (`None`: NULL).
    fn row(values: &[Option<u8>]) -> Vec<u8> {
        let mut b = (values.len() as u16).to_be_bytes().to_vec();
        for v in values {
            match v {
                Some(v) => {
                    b.extend_from_slice(&1i32.to_be_bytes());
                    b.push(*v);
                }
                None => b.extend_from_slice(&(-1i32).to_be_bytes()),
            }
        }
        msg(b'D', &b)
    }

    #[test]
    fn a_timed_out_call_warns_in_its_place_and_answers_false() {
        let desc = msg(b'T', b"whatever");
        let done = msg(b'C', b"SELECT 1\0");
        let ready = msg(b'Z', b"I");
        let mut h = Held::new(1);
        h.push(&desc);
        // Two calls in one row, the first in column 1 (text), the second (binary) in column 2;
        // the first target goes in time, the second does not.
        let first = h.begin();
        let second = h.begin();
        h.push(&row(&[None, Some(b't'), Some(1)]));
        h.push(&done);
        h.push(&ready);
        assert!(!h.ended(first, None));
        assert!(h.ended(second, Some((warning(5353, 1), Some(2)))));
        let want = [
            desc.clone(),
            warning(5353, 1),
            row(&[None, Some(b't'), Some(0)]),
            done.clone(),
            ready.clone(),
        ]
        .concat();
        assert_eq!(h.into_bytes(), want);
        assert!(String::from_utf8_lossy(&warning(5353, 1))
            .contains("backend with PID 5353 did not terminate within 1 millisecond\0"));
        assert!(String::from_utf8_lossy(&warning(7, 500)).contains("within 500 milliseconds\0"));

        // A column not known: the warning only.
        let mut h = Held::new(2);
        let at = h.begin();
        h.push(&row(&[Some(b't')]));
        assert!(h.ended(at, Some((warning(9, 5), None))));
        assert_eq!(h.into_bytes(), [warning(9, 5), row(&[Some(b't')])].concat());
    }
}
