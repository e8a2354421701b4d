//! The channel names of the `LISTEN` statements in a query string, found before it runs, so the
//! pooler's listening connection can listen on them ahead (listen.rs): a session that runs
//! `LISTEN x; NOTIFY x` in one transaction then hears itself, as it does directly.
//!
//! A small lexer, not a parser: it skips comments, string constants, dollar quotes and quoted
//! identifiers as Postgres's scanner (`scan.l`) does, and reports the name after a `LISTEN` that
//! starts a statement, folded and truncated as Postgres folds and truncates identifiers. What it
//! misses (a `LISTEN` inside a `DO` block or a function, a `U&"..."` name) only loses the
//! listen-ahead; a name it finds that the statement does not listen on only makes the listener
//! listen on it for a moment (its notifications are then dropped, as the session's channels are
//! read back from Postgres).

/// `NAMEDATALEN - 1`: Postgres truncates longer identifiers (`truncate_identifier`).
const MAX_NAME: usize = 63;

#[derive(Clone, Copy, PartialEq)]
enum State {
    /// At the start of a statement.
    Start,
    /// After `LISTEN`: the next token is the channel.
    Listen,
    /// Elsewhere in a statement.
    Other,
}

/// The channels named by `LISTEN` statements in `sql`, in order (duplicates kept).
pub fn listen_channels(sql: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut state = State::Start;
    let n = sql.len();
    let mut i = 0;
    while i < n {
        let c = sql[i];
        match c {
            b' ' | b'\t' | b'\n' | b'\r' | 0x0c => i += 1,
            b'-' if sql.get(i + 1) == Some(&b'-') => {
                while i < n && sql[i] != b'\n' {
                    i += 1;
                }
            }
            b'/' if sql.get(i + 1) == Some(&b'*') => {
                i = shared::sql::skip_block_comment(sql, i).unwrap_or(sql.len())
            }
            b';' => {
                state = State::Start;
                i += 1;
            }
            b'\'' => {
                i = skip_string(sql, i, false);
                state = State::Other;
            }
            b'"' => {
                let (name, end) = quoted_ident(sql, i);
                if state == State::Listen {
                    out.extend(name);
                }
                state = State::Other;
                i = end;
            }
            b'$' => {
                i = dollar_quote_end(sql, i).unwrap_or(i + 1);
                state = State::Other;
            }
            c if is_ident_start(c) => {
                let start = i;
                while i < n && is_ident_cont(sql[i]) {
                    i += 1;
                }
                let word = &sql[start..i];
                if sql.get(i) == Some(&b'\'') && word.len() == 1 {
                    // E'...' (backslash escapes), B'...', X'...', N'...'.
                    i = skip_string(sql, i, word.eq_ignore_ascii_case(b"e"));
                    state = State::Other;
                    continue;
                }
                state = match state {
                    State::Start if word.eq_ignore_ascii_case(b"listen") => State::Listen,
                    State::Listen => {
                        // U&"..." is not followed: `u` then `&` is no name.
                        if sql.get(i) != Some(&b'&') {
                            out.extend(fold(word));
                        }
                        State::Other
                    }
                    _ => State::Other,
                };
            }
            _ => {
                state = State::Other;
                i += 1;
            }
        }
    }
    out
}

fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn is_ident_cont(c: u8) -> bool {
    is_ident_start(c) || c.is_ascii_digit() || c == b'$'
}

/// An unquoted identifier: ASCII letters folded to lower case (`downcase_identifier`).
fn fold(word: &[u8]) -> Option<String> {
    let s = std::str::from_utf8(word).ok()?;
    Some(truncate(s.to_ascii_lowercase()))
}

fn truncate(mut s: String) -> String {
    if s.len() > MAX_NAME {
        let mut end = MAX_NAME;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}

/// A string constant starting at the quote at `i`; returns the index after it (or the end).
fn skip_string(sql: &[u8], i: usize, backslash: bool) -> usize {
    let mut j = i + 1;
    while j < sql.len() {
        match sql[j] {
            b'\\' if backslash => j += 2,
            b'\'' if sql.get(j + 1) == Some(&b'\'') => j += 2,
            b'\'' => return j + 1,
            _ => j += 1,
        }
    }
    sql.len()
}

/// A quoted identifier at `i`: its name (`""` is `"`; empty is not a name) and the index after.
fn quoted_ident(sql: &[u8], i: usize) -> (Option<String>, usize) {
    let mut name = Vec::new();
    let mut j = i + 1;
    while j < sql.len() {
        if sql[j] == b'"' {
            if sql.get(j + 1) == Some(&b'"') {
                name.push(b'"');
                j += 2;
                continue;
            }
            let name = (!name.is_empty())
                .then(|| String::from_utf8(name).ok().map(truncate))
                .flatten();
            return (name, j + 1);
        }
        name.push(sql[j]);
        j += 1;
    }
    (None, sql.len())
}

/// A dollar-quoted string (`$tag$ ... $tag$`) at `i`: the index after it, or `None` if `$` does
/// not open one here (a parameter `$1`).
fn dollar_quote_end(sql: &[u8], i: usize) -> Option<usize> {
    let mut j = i + 1;
    if sql.get(j).is_some_and(|c| c.is_ascii_digit()) {
        return None;
    }
    while j < sql.len() && is_ident_cont(sql[j]) && sql[j] != b'$' {
        j += 1;
    }
    if sql.get(j) != Some(&b'$') {
        return None;
    }
    let delim = &sql[i..=j];
    let body = j + 1;
    Some(
        sql[body..]
            .windows(delim.len())
            .position(|w| w == delim)
            .map_or(sql.len(), |p| body + p + delim.len()),
    )
}

#[cfg(test)]
mod tests {
    use super::listen_channels;

    fn names(sql: &str) -> Vec<String> {
        listen_channels(sql.as_bytes())
    }

    #[test]
    fn finds_listen_statements() {
        assert_eq!(names("LISTEN x; NOTIFY x"), ["x"]);
        assert_eq!(names("listen Foo;Listen \"Bar\"\"q\""), ["foo", "Bar\"q"]);
        assert_eq!(
            names("BEGIN; /* c /* nested */ LISTEN no */ LISTEN a -- LISTEN b\n; LISTEN c"),
            ["a", "c"]
        );
        assert_eq!(names("  \n\tLISTEN\n  spaced  ;"), ["spaced"]);
        assert_eq!(names("LISTEN élan"), ["élan"]);
        assert_eq!(
            names(&format!("LISTEN {}", "a".repeat(70))),
            ["a".repeat(63)]
        );
    }

    #[test]
    fn ignores_what_is_not_a_listen_statement() {
        assert!(names("SELECT 'LISTEN x'; SELECT 1").is_empty());
        assert!(names("SELECT E'it\\'s; LISTEN y'").is_empty());
        assert!(names("DO $$BEGIN EXECUTE 'LISTEN z'; END$$").is_empty());
        assert!(names("DO $f$ ; LISTEN z $f$").is_empty());
        assert!(names("SELECT listen FROM t; UNLISTEN x; NOTIFY listen").is_empty());
        assert!(names("SELECT \"LISTEN\"; LISTEN \"\"").is_empty());
        assert!(names("LISTEN U&\"d\\0061t\"").is_empty());
        assert_eq!(names("SELECT $1; LISTEN after_param"), ["after_param"]);
        assert_eq!(
            names("SELECT 'unterminated; LISTEN x"),
            Vec::<String>::new()
        );
        assert!(names("").is_empty());
        assert!(names("LISTEN").is_empty());
    }
}
