//! The startup packet: the first bytes any client sends the gateway.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shared::protocol::frontend::{parse_startup, Startup};

fuzz_target!(|data: &[u8]| {
    // The gateway strips the length word and bounds the packet (MAX_STARTUP_PACKET).
    let body = data.get(4..).unwrap_or_default();
    if body.len() > shared::protocol::MAX_STARTUP_PACKET {
        return;
    }
    if let Ok(Startup::Startup { params }) = parse_startup(body) {
        assert!(params.iter().all(|(k, _)| !k.is_empty()));
    }
});
