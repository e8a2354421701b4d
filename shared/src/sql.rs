//! The one SQL lexer of the gateway's classifiers and the pooler's `LISTEN` look-ahead: tokens
//! as Postgres's scanner (`scan.l`) cuts them, with comments and white space skipped. Written
//! by hand: it runs on every statement the gateway classifies, where owning the bytes is the
//! point (no allocation, one pass).
//!
//! It is conservative where the text could be read two ways: a `\'` in a plain string (which
//! `standard_conforming_strings = off` would end elsewhere), `U&` strings and names, a
//! backslash outside a string, and text that does not end what it opens (a string, a quoted
//! name, a dollar quote or a comment) end the tokens with one [`Kind::Unsure`] token. Callers
//! that must be sure then ask the grammar.

/// What a token is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// An unquoted identifier or keyword.
    Word,
    /// A quoted identifier `"…"` (`""` inside is one `"`).
    QuotedName,
    /// A string constant: `'…'`, or with its prefix `E'…'` (backslash escapes), `B'…'`, `X'…'`,
    /// `N'…'`.
    String,
    /// A dollar-quoted string `$tag$…$tag$`.
    DollarString,
    /// A parameter `$1`.
    Param,
    /// A numeric constant.
    Number,
    /// `::`
    Cast,
    /// Any other byte: punctuation or part of an operator.
    Punct(u8),
    /// The rest of the text, which the lexer cannot read for sure (see the module doc).
    Unsure,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    pub kind: Kind,
    /// Byte range in the text.
    pub start: usize,
    pub end: usize,
}

impl Token {
    pub fn text<'a>(&self, sql: &'a [u8]) -> &'a [u8] {
        &sql[self.start..self.end]
    }

    /// This is the unquoted word `w` (ASCII case ignored).
    pub fn is_word(&self, sql: &[u8], w: &[u8]) -> bool {
        self.kind == Kind::Word && self.text(sql).eq_ignore_ascii_case(w)
    }

    /// The contents of a plain or quoted string or name: quotes taken off, doubled quotes
    /// undone (`E''` escapes are left as written). `None` for other tokens.
    pub fn unquoted(&self, sql: &[u8]) -> Option<Vec<u8>> {
        let t = self.text(sql);
        let (q, inner) = match self.kind {
            Kind::QuotedName => (b'"', &t[1..t.len() - 1]),
            Kind::String => {
                let open = t.iter().position(|&c| c == b'\'')?;
                (b'\'', &t[open + 1..t.len() - 1])
            }
            _ => return None,
        };
        let mut out = Vec::with_capacity(inner.len());
        let mut i = 0;
        while i < inner.len() {
            out.push(inner[i]);
            i += if inner[i] == q { 2 } else { 1 };
        }
        Some(out)
    }
}

pub fn is_ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

pub fn is_ident_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80
}

/// The tokens of a SQL text, in order.
pub struct Lexer<'a> {
    sql: &'a [u8],
    i: usize,
}

impl<'a> Lexer<'a> {
    pub fn new(sql: &'a [u8]) -> Lexer<'a> {
        Lexer { sql, i: 0 }
    }

    /// Skips white space and comments; `false` if a block comment does not end.
    fn skip_blank(&mut self) -> bool {
        let sql = self.sql;
        loop {
            while self.i < sql.len() && sql[self.i].is_ascii_whitespace() {
                self.i += 1;
            }
            let rest = &sql[self.i..];
            if rest.starts_with(b"--") {
                while self.i < sql.len() && sql[self.i] != b'\n' {
                    self.i += 1;
                }
            } else if rest.starts_with(b"/*") {
                match skip_block_comment(sql, self.i) {
                    Some(end) => self.i = end,
                    None => return false,
                }
            } else {
                return true;
            }
        }
    }

    fn unsure(&mut self, start: usize) -> Option<Token> {
        self.i = usize::MAX;
        Some(Token {
            kind: Kind::Unsure,
            start,
            end: self.sql.len(),
        })
    }
}

impl Iterator for Lexer<'_> {
    type Item = Token;

    fn next(&mut self) -> Option<Token> {
        if self.i >= self.sql.len() {
            return None;
        }
        let sql = self.sql;
        let start = self.i;
        if !self.skip_blank() {
            return self.unsure(start);
        }
        let start = self.i;
        let &c = sql.get(start)?;
        let (kind, end) = match c {
            b'\'' => match string_end(sql, start, false) {
                Some(e) => (Kind::String, e),
                None => return self.unsure(start),
            },
            b'"' => match quoted_end(sql, start) {
                Some(e) => (Kind::QuotedName, e),
                None => return self.unsure(start),
            },
            b'$' if sql.get(start + 1).is_some_and(|d| d.is_ascii_digit()) => {
                let mut e = start + 1;
                while e < sql.len() && sql[e].is_ascii_digit() {
                    e += 1;
                }
                (Kind::Param, e)
            }
            b'$' => match dollar_end(sql, start) {
                Some(e) => (Kind::DollarString, e),
                None => return self.unsure(start),
            },
            b'0'..=b'9' => {
                let mut e = start;
                while e < sql.len()
                    && (sql[e].is_ascii_alphanumeric() || sql[e] == b'_' || sql[e] == b'.')
                {
                    e += 1;
                }
                (Kind::Number, e)
            }
            b':' if sql.get(start + 1) == Some(&b':') => (Kind::Cast, start + 2),
            b'\\' => return self.unsure(start),
            c if is_ident_start(c) => {
                let mut e = start;
                while e < sql.len() && is_ident_char(sql[e]) {
                    e += 1;
                }
                let word = &sql[start..e];
                match sql.get(e) {
                    // A string's prefix: E'…' (backslash escapes), B'…', X'…', N'…'.
                    Some(b'\'')
                        if word.len() == 1
                            && matches!(
                                word[0].to_ascii_lowercase(),
                                b'e' | b'b' | b'x' | b'n'
                            ) =>
                    {
                        match string_end(sql, e, word[0].eq_ignore_ascii_case(&b'e')) {
                            Some(end) => (Kind::String, end),
                            None => return self.unsure(start),
                        }
                    }
                    // U&'…' and U&"…": Unicode escapes with a settable escape character.
                    Some(b'&')
                        if word.eq_ignore_ascii_case(b"u")
                            && matches!(sql.get(e + 1), Some(b'\'' | b'"')) =>
                    {
                        return self.unsure(start)
                    }
                    _ => (Kind::Word, e),
                }
            }
            c => (Kind::Punct(c), start + 1),
        };
        self.i = end;
        Some(Token { kind, start, end })
    }
}

/// Past the `/* ... */` comment that starts at `i` (`sql[i..]` starts with `/*`), nested as
/// Postgres nests them; `None` if it does not end.
pub fn skip_block_comment(sql: &[u8], mut i: usize) -> Option<usize> {
    let mut depth = 0usize;
    while i < sql.len() {
        if sql[i..].starts_with(b"/*") {
            depth += 1;
            i += 2;
        } else if sql[i..].starts_with(b"*/") {
            depth = depth.saturating_sub(1);
            i += 2;
            if depth == 0 {
                return Some(i);
            }
        } else {
            i += 1;
        }
    }
    None
}

/// Past the string whose quote is at `at`; `None` if it does not end, or if it holds `\'`
/// outside an `E''` string (`escapes`), where `standard_conforming_strings = off` would end it
/// elsewhere.
fn string_end(sql: &[u8], at: usize, escapes: bool) -> Option<usize> {
    let mut i = at + 1;
    while i < sql.len() {
        match sql[i] {
            b'\\' if escapes => i += 2,
            b'\\' if sql.get(i + 1) == Some(&b'\'') => return None,
            b'\'' if sql.get(i + 1) == Some(&b'\'') => i += 2,
            b'\'' => return Some(i + 1),
            _ => i += 1,
        }
    }
    None
}

fn quoted_end(sql: &[u8], at: usize) -> Option<usize> {
    let mut i = at + 1;
    while i < sql.len() {
        if sql[i] == b'"' {
            if sql.get(i + 1) == Some(&b'"') {
                i += 2;
                continue;
            }
            return Some(i + 1);
        }
        i += 1;
    }
    None
}

/// Past `$tag$ … $tag$` from its first `$`; `None` for a lone `$` or one that does not end.
fn dollar_end(sql: &[u8], at: usize) -> Option<usize> {
    let mut e = at + 1;
    while e < sql.len() && is_ident_char(sql[e]) && sql[e] != b'$' {
        e += 1;
    }
    if sql.get(e) != Some(&b'$') {
        return None;
    }
    let tag = &sql[at..=e];
    let body = e + 1;
    sql[body..]
        .windows(tag.len())
        .position(|w| w == tag)
        .map(|p| body + p + tag.len())
}

/// `needle` anywhere in `hay`, ASCII case ignored (a raw test over the text, strings included).
pub fn find_ci(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
}

pub fn contains_ci(hay: &[u8], needle: &[u8]) -> bool {
    find_ci(hay, needle).is_some()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lex(sql: &str) -> Vec<(Kind, String)> {
        Lexer::new(sql.as_bytes())
            .map(|t| {
                let text = String::from_utf8_lossy(t.text(sql.as_bytes())).into_owned();
                (t.kind, text)
            })
            .collect()
    }

    fn kinds(sql: &str) -> Vec<Kind> {
        lex(sql).into_iter().map(|(k, _)| k).collect()
    }

    #[test]
    fn block_comments() {
        assert_eq!(skip_block_comment(b"/* a */ x", 0), Some(7));
        assert_eq!(skip_block_comment(b"/* a /* b */ c */x", 0), Some(17));
        assert_eq!(skip_block_comment(b"/* a /* b */ c", 0), None);
        assert_eq!(skip_block_comment(b"x /**/", 2), Some(6));
    }

    #[test]
    fn tokens_as_postgres_cuts_them() {
        use Kind::*;
        assert_eq!(
            lex("SELECT a.b, \"Q\"\"x\"::text FROM t WHERE c = $1 -- no\n/* a /* b */ */;"),
            [
                (Word, "SELECT".into()),
                (Word, "a".into()),
                (Punct(b'.'), ".".into()),
                (Word, "b".into()),
                (Punct(b','), ",".into()),
                (QuotedName, "\"Q\"\"x\"".into()),
                (Cast, "::".into()),
                (Word, "text".into()),
                (Word, "FROM".into()),
                (Word, "t".into()),
                (Word, "WHERE".into()),
                (Word, "c".into()),
                (Punct(b'='), "=".into()),
                (Param, "$1".into()),
                (Punct(b';'), ";".into()),
            ]
        );
        assert_eq!(
            kinds("'it''s' E'\\'' B'01' x'ff' n'x' $$ ; $$ $f$ $$ $f$ 1.5e3 a$b"),
            [
                String,
                String,
                String,
                String,
                String,
                DollarString,
                DollarString,
                Number,
                Word
            ]
        );
        // A word right before a quote that is no prefix: a name, then a string.
        assert_eq!(kinds("date'2020-01-01'"), [Word, String]);
        assert_eq!(kinds("élan"), [Word]);
    }

    #[test]
    fn what_cannot_be_read_for_sure_ends_the_tokens() {
        use Kind::*;
        assert_eq!(kinds("SELECT 'a\\'b'"), [Word, Unsure]);
        assert_eq!(kinds("SELECT 'open"), [Word, Unsure]);
        assert_eq!(kinds("SELECT \"open"), [Word, Unsure]);
        assert_eq!(kinds("SELECT $$ open"), [Word, Unsure]);
        assert_eq!(kinds("SELECT $ 1"), [Word, Unsure]);
        assert_eq!(kinds("SELECT 1 /* open"), [Word, Number, Unsure]);
        assert_eq!(kinds("SELECT U&'d\\0061t'"), [Word, Unsure]);
        assert_eq!(kinds("SELECT u&\"x\""), [Word, Unsure]);
        assert_eq!(kinds("\\d t"), [Unsure]);
        // `u` is a name like any other elsewhere, and `&` an operator.
        assert_eq!(kinds("u & 1"), [Word, Punct(b'&'), Number]);
        assert_eq!(kinds(""), []);
        assert_eq!(kinds("  -- only a comment"), []);
    }

    #[test]
    fn unquoting() {
        let sql = b"\"a\"\"b\" 'it''s' E'x' word";
        let t: Vec<Token> = Lexer::new(sql).collect();
        assert_eq!(t[0].unquoted(sql).unwrap(), b"a\"b");
        assert_eq!(t[1].unquoted(sql).unwrap(), b"it's");
        assert_eq!(t[2].unquoted(sql).unwrap(), b"x");
        assert_eq!(t[3].unquoted(sql), None);
        assert!(t[3].is_word(sql, b"WORD"));
    }
}
