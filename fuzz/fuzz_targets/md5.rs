//! md5 answers: only the right one is accepted, a non-md5 stored value never is.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shared::auth::md5::{md5_challenge_response, md5_verify};

fuzz_target!(|data: &[u8]| {
    let stored = "md5f3ff2a5a4e2a6b7bbd4bd2cf4bd56e2e";
    let salt = [1, 2, 3, 4];
    let right = md5_challenge_response(stored, salt);
    let answer = data.strip_suffix(b"\0").unwrap_or(data);
    assert_eq!(md5_verify(stored, salt, data), answer == right.as_bytes());
    // A stored value that is not an md5 hash (a plaintext password) is never answerable.
    assert!(!md5_verify("plaintext-password", salt, data));
});
