//! The channel names of the `LISTEN` statements in a query string, found before it runs, so the
//! pooler's listening connection can listen on them ahead (listen.rs): a session that runs
//! `LISTEN x; NOTIFY x` in one transaction then hears itself, as it does directly.
//!
//! Not a parser: over the shared lexer's tokens (`shared::sql`, cut as Postgres's scanner
//! `scan.l` cuts them), it reports the name after a `LISTEN` that
//! starts a statement, folded and truncated as Postgres folds and truncates identifiers. What it
//! misses (a `LISTEN` inside a `DO` block or a function, a `U&"..."` name) only loses the
//! listen-ahead; a name it finds that the statement does not listen on only makes the listener
//! listen on it for a moment (its notifications are then dropped, as the session's channels are
//! read back from Postgres).

/// `NAMEDATALEN - 1`: Postgres truncates longer identifiers (`truncate_identifier`).
const MAX_NAME: usize = 63;

use shared::sql::{Kind, Lexer};

/// The channels named by `LISTEN` statements in `sql`, in order (duplicates kept).
pub fn listen_channels(sql: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    // The previous token: `None` at the start of a statement.
    let mut prev: Option<Kind> = None;
    let mut after_listen = false;
    for t in Lexer::new(sql) {
        if after_listen {
            let name = match t.kind {
                Kind::Word => fold(t.text(sql)),
                Kind::QuotedName => t
                    .unquoted(sql)
                    .filter(|n| !n.is_empty())
                    .and_then(|n| String::from_utf8(n).ok())
                    .map(truncate),
                _ => None,
            };
            out.extend(name);
        }
        after_listen = prev.is_none() && t.is_word(sql, b"listen");
        prev = (t.kind != Kind::Punct(b';')).then_some(t.kind);
    }
    out
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
