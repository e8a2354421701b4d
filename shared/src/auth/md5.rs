//! Postgres's md5 password scheme.
//!
//! The stored hash is `"md5" + hex(md5(password + user))`; the challenge is
//! AuthenticationMD5Password with a 4-byte salt, and the answer is
//! `"md5" + hex(md5(hex(md5(password + user)) + salt))`. Since the answer needs only the
//! stored hash, the pooler can answer Postgres's challenge from `pg_authid` alone (which is
//! also why md5 is weak: the stored hash is as good as the password).

use ::md5::{Digest, Md5};
use subtle::ConstantTimeEq;

/// The answer to an md5 challenge with `salt`, computed from the stored hash
/// (`"md5"` + 32 hex). A `stored` without the `"md5"` prefix (which [`super::Verifier::parse`]
/// never yields) is hashed whole, giving an answer no server accepts.
pub fn md5_challenge_response(stored: &str, salt: [u8; 4]) -> String {
    let hex = stored.strip_prefix("md5").unwrap_or(stored);
    md5_hex(&[hex.as_bytes(), &salt])
}

/// Checks a client's answer (the PasswordMessage string, with or without its terminating
/// NUL) to our md5 challenge with `salt`. Constant time in the answer's content.
pub fn md5_verify(stored: &str, salt: [u8; 4], client_response: &[u8]) -> bool {
    let response = client_response
        .strip_suffix(b"\0")
        .unwrap_or(client_response);
    let expected = md5_challenge_response(stored, salt);
    let matches = bool::from(expected.as_bytes().ct_eq(response));
    // Only a well-formed stored hash can be answered (a malformed one might be e.g. a
    // plaintext password, whose "hash" a client could compute).
    matches && is_md5_hash(stored)
}

/// What Postgres stores for `password` with `password_encryption = md5`.
pub fn md5_stored(password: &str, user: &str) -> String {
    md5_hex(&[password.as_bytes(), user.as_bytes()])
}

/// `"md5"` + 32 lowercase hex digits, as Postgres's `get_password_type()` requires.
pub(super) fn is_md5_hash(s: &str) -> bool {
    s.strip_prefix("md5").is_some_and(|hex| {
        hex.len() == 32 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    })
}

/// `"md5"` + lowercase hex of md5 over the concatenation of `parts`.
fn md5_hex(parts: &[&[u8]]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut hasher = Md5::new();
    for part in parts {
        hasher.update(part);
    }
    let mut out = String::with_capacity(35);
    out.push_str("md5");
    for byte in hasher.finalize() {
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What PostgreSQL 15 stored for `SET password_encryption = md5; CREATE ROLE bob
    /// PASSWORD 'bob-pw'`.
    const PG15_BOB: &str = "md51437cf777a4bdc5ee09d4a44200665da";

    #[test]
    fn stored_hash_matches_postgres() {
        assert_eq!(md5_stored("bob-pw", "bob"), PG15_BOB);
    }

    #[test]
    fn challenge_response_matches_libpq() {
        // libpq's pg_md5_encrypt twice: md5(md5(password + user) hex + salt). Computed
        // independently: python3 -c "import hashlib; print('md5' + hashlib.md5(
        //   b'1437cf777a4bdc5ee09d4a44200665da' + bytes([1, 2, 3, 4])).hexdigest())"
        let salt = [1, 2, 3, 4];
        let answer = md5_challenge_response(PG15_BOB, salt);
        assert_eq!(answer, "md5358b05ad8721609a31b55963a47a7991");
        assert!(md5_verify(PG15_BOB, salt, answer.as_bytes()));
        let mut with_nul = answer.clone().into_bytes();
        with_nul.push(0);
        assert!(md5_verify(PG15_BOB, salt, &with_nul));
    }

    #[test]
    fn rejects_wrong_answers() {
        let salt = [9, 8, 7, 6];
        let right = md5_challenge_response(PG15_BOB, salt);
        assert!(!md5_verify(PG15_BOB, [9, 8, 7, 5], right.as_bytes()));
        let wrong = md5_challenge_response(&md5_stored("bob-pW", "bob"), salt);
        assert!(!md5_verify(PG15_BOB, salt, wrong.as_bytes()));
        assert!(!md5_verify(PG15_BOB, salt, right.to_uppercase().as_bytes()));
        assert!(!md5_verify(PG15_BOB, salt, &right.as_bytes()[..34]));
        assert!(!md5_verify(PG15_BOB, salt, b""));
        assert!(!md5_verify(PG15_BOB, salt, b"\0"));
        // A stored value that is not an md5 hash never verifies, even against its own answer.
        for stored in [
            "",
            "md5",
            "bob-pw",
            "md51437CF777A4BDC5EE09D4A44200665DA",
            "é",
        ] {
            let answer = md5_challenge_response(stored, salt);
            assert!(!md5_verify(stored, salt, answer.as_bytes()), "{stored:?}");
        }
    }
}
