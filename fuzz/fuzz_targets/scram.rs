//! SCRAM-SHA-256 both ways on arbitrary messages: the gateway's server side (client-first,
//! client-final) and the pooler's client side (server-first, server-final). Nothing arbitrary
//! may ever authenticate.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shared::auth::scram::{ScramClient, ScramServer, ScramVerifier};

fuzz_target!(|data: &[u8]| {
    let cut = data.first().map_or(0, |&b| b as usize).min(data.len());
    let (first, last) = data.split_at(cut);
    let v = ScramVerifier::from_password("pw", b"salt", 2);
    let mut s = ScramServer::new(v);
    if s.client_first(first).is_ok() {
        assert!(s.client_final(last).is_err());
    }
    let mut c = ScramClient::new([1; 32], [2; 32]);
    let _ = c.client_first();
    if c.server_first(first).is_ok() {
        assert!(c.server_final(last).is_err());
    }
    let _ = shared::auth::Verifier::parse(&String::from_utf8_lossy(data));
});
