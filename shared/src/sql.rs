//! Small pieces of SQL lexing that more than one process needs (hand-written: they run on
//! every statement the gateway classifies, where owning the bytes is the point).

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_comments() {
        assert_eq!(skip_block_comment(b"/* a */ x", 0), Some(7));
        assert_eq!(skip_block_comment(b"/* a /* b */ c */x", 0), Some(17));
        assert_eq!(skip_block_comment(b"/* a /* b */ c", 0), None);
        assert_eq!(skip_block_comment(b"x /**/", 2), Some(6));
    }
}
