//! Password authentication without passwords: SCRAM-SHA-256 and md5, pure code, no I/O.
//!
//! Tidepool never sees a plaintext password. The gateway authenticates a client against the
//! role's stored verifier (`pg_authid.rolpassword`), and a SCRAM exchange hands it the
//! client's `ClientKey` as a by-product (RFC 5802: `ClientKey = ClientProof XOR
//! HMAC(StoredKey, AuthMessage)`). The pooler then logs in to Postgres as that role with a
//! SCRAM client that uses `ClientKey` directly, and verifies Postgres with `ServerKey`. For
//! md5 the stored hash *is* the password as far as the md5 challenge goes, so the pooler
//! answers Postgres's challenge from the stored hash.
//!
//! Messages in and out are the payloads of the SASL/password messages (no message framing
//! here): `client_first` takes the data of SASLInitialResponse, and so on.

pub mod md5;
pub mod scram;

pub use self::md5::{md5_challenge_response, md5_stored, md5_verify};
pub use self::scram::{ScramClient, ScramServer, ScramVerifier, SCRAM_SHA_256};

/// Everything that can go wrong in an exchange. The gateway maps all of these to SQLSTATE
/// 28P01 (invalid_password) or 08P01 (protocol_violation, for `Malformed`) at the edge; the
/// messages never contain secrets.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum AuthError {
    /// The peer's message does not follow RFC 5802's grammar (or arrived out of turn).
    #[error("malformed SCRAM message: {0}")]
    Malformed(&'static str),
    /// The client's proof does not match the stored key: wrong password (or unknown role).
    #[error("invalid SCRAM client proof")]
    InvalidProof,
    /// The client asked for channel binding (`p=`), i.e. SCRAM-SHA-256-PLUS, which we do not
    /// advertise.
    #[error("SCRAM channel binding is not supported")]
    ChannelBindingNotSupported,
    /// The server's signature is wrong: it does not know our role's `ServerKey`.
    #[error("SCRAM server signature mismatch")]
    ServerSignatureMismatch,
    /// The nonce in the final message is not client nonce + server nonce.
    #[error("SCRAM nonce mismatch")]
    NonceMismatch,
}

/// A role's stored password verifier, as read from `pg_authid.rolpassword`.
#[derive(Clone)]
pub enum Verifier {
    Scram(ScramVerifier),
    /// `"md5"` followed by 32 lowercase hex digits, exactly as stored.
    Md5(String),
}

impl Verifier {
    /// Parses a `rolpassword` value. `None` for plaintext passwords (which Postgres still
    /// accepts in `rolpassword` but we cannot use without a password) and for anything
    /// malformed. The md5 check mirrors Postgres's `get_password_type()`: `"md5"` + exactly
    /// 32 characters of `0-9a-f`.
    pub fn parse(rolpassword: &str) -> Option<Verifier> {
        if rolpassword.starts_with("SCRAM-SHA-256$") {
            return ScramVerifier::parse(rolpassword).map(Verifier::Scram);
        }
        md5::is_md5_hash(rolpassword).then(|| Verifier::Md5(rolpassword.to_owned()))
    }
}

/// Redacted: a verifier is enough to impersonate the server to a client, keep it out of logs.
impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Verifier::Scram(v) => f.debug_tuple("Scram").field(v).finish(),
            Verifier::Md5(_) => f.write_str("Md5(<redacted>)"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Produced by PostgreSQL 15 (`CREATE ROLE alice PASSWORD 'alice-pw'`, default
    /// password_encryption = scram-sha-256) in a throwaway cluster.
    const PG15_ALICE: &str = "SCRAM-SHA-256$4096:1Bj7rPTCwuyo1QMq/Q1rtw==$\
        AUYjK+KvF15RAr+VDOTWegQcMS8F9x1QxoBvcQm8MlM=:QKG9hnYv/N90pGsQxz+kC6Adj9ftgy9O8SWB1CMErZI=";
    /// Produced by PostgreSQL 15 with `SET password_encryption = md5; CREATE ROLE bob PASSWORD
    /// 'bob-pw'`.
    const PG15_BOB: &str = "md51437cf777a4bdc5ee09d4a44200665da";

    #[test]
    fn parses_postgres_scram_verifier() {
        let Some(Verifier::Scram(v)) = Verifier::parse(PG15_ALICE) else {
            panic!("not parsed as SCRAM");
        };
        assert_eq!(v.iterations, 4096);
        assert_eq!(v.salt.len(), 16);
        // Recomputing from the password with the same salt gives the same keys, so our
        // key derivation is Postgres's.
        let ours = ScramVerifier::from_password("alice-pw", &v.salt, v.iterations);
        assert_eq!(ours.stored_key, v.stored_key);
        assert_eq!(ours.server_key, v.server_key);
        assert_eq!(ours.to_rolpassword(), PG15_ALICE);
    }

    #[test]
    fn parses_own_formatted_verifier() {
        let v = ScramVerifier::from_password("s3cret", b"0123456789abcdef", 1000);
        let text = v.to_rolpassword();
        let Some(Verifier::Scram(back)) = Verifier::parse(&text) else {
            panic!("not parsed as SCRAM: {text}");
        };
        assert_eq!(back.iterations, 1000);
        assert_eq!(back.salt, b"0123456789abcdef");
        assert_eq!(back.stored_key, v.stored_key);
        assert_eq!(back.server_key, v.server_key);
    }

    #[test]
    fn parses_postgres_md5_verifier() {
        match Verifier::parse(PG15_BOB) {
            Some(Verifier::Md5(s)) => assert_eq!(s, PG15_BOB),
            other => panic!("unexpected {other:?}"),
        }
        assert_eq!(md5_stored("bob-pw", "bob"), PG15_BOB);
    }

    #[test]
    fn rejects_plaintext_and_malformed() {
        for s in [
            "",
            "alice-pw",
            "md5",
            "md51437CF777A4BDC5EE09D4A44200665DA",  // uppercase: Postgres treats as plaintext
            "md51437cf777a4bdc5ee09d4a44200665d",   // 31 hex
            "md51437cf777a4bdc5ee09d4a44200665da0", // 33 hex
            "md51437cf777a4bdc5ee09d4a44200665dz",
            "SCRAM-SHA-256$",
            "SCRAM-SHA-256$4096:1Bj7rPTCwuyo1QMq/Q1rtw==$AUYj:QKG9",
            "SCRAM-SHA-256$0:1Bj7rPTCwuyo1QMq/Q1rtw==$AUYjK+KvF15RAr+VDOTWegQcMS8F9x1QxoBvcQm8MlM=:QKG9hnYv/N90pGsQxz+kC6Adj9ftgy9O8SWB1CMErZI=",
            "SCRAM-SHA-256$4096:$AUYjK+KvF15RAr+VDOTWegQcMS8F9x1QxoBvcQm8MlM=:QKG9hnYv/N90pGsQxz+kC6Adj9ftgy9O8SWB1CMErZI=",
            "SCRAM-SHA-256$4096:1Bj7rPTCwuyo1QMq/Q1rtw==$AUYjK+KvF15RAr+VDOTWegQcMS8F9x1QxoBvcQm8MlM=",
            "SCRAM-SHA-256$4096:1Bj7rPTCwuyo1QMq/Q1rtw==$AUYjK+KvF15RAr+VDOTWegQcMS8F9x1QxoBvcQm8MlM=:QKG9hnYv/N90pGsQxz+kC6Adj9ftgy9O8SWB1CMErZI=$",
        ] {
            assert!(Verifier::parse(s).is_none(), "accepted {s:?}");
        }
    }

    #[test]
    fn debug_redacts_secrets() {
        let Some(Verifier::Scram(v)) = Verifier::parse(PG15_ALICE) else {
            panic!("not parsed")
        };
        let text = format!("{:?}", Verifier::Scram(v.clone()));
        assert!(text.contains("redacted"), "{text}");
        assert!(!text.contains(&format!("{:?}", v.stored_key)), "{text}");
        assert!(!text.contains(&format!("{:?}", v.server_key)), "{text}");
        let text = format!("{:?}", Verifier::parse(PG15_BOB));
        assert!(!text.contains("1437cf"), "{text}");
    }
}
