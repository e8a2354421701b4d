//! Frontend message framing and the decoders of the messages the gateway and pooler read.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shared::protocol::{self, backend, frontend};

fuzz_target!(|data: &[u8]| {
    let limit = data.first().map_or(0, |&b| b as usize * 64);
    if let Ok(Some(n)) = protocol::typed_message_len(data, limit) {
        assert!(n >= 5 && n <= data.len() && n <= limit);
    }
    let _ = protocol::pending_message_len(data);
    let body = data.get(5..).unwrap_or_default();
    if let Ok(p) = frontend::parse_parse(body) {
        assert!(p.param_types.len() >= 2);
    }
    let _ = frontend::parse_bind(body);
    let _ = frontend::parse_target(body);
    let _ = frontend::parse_sasl_initial(body);
    let _ = frontend::query_text(body);
    let _ = backend::error_fields(body);
    let _ = backend::parse_parameter_status(body);
    let mut out = Vec::new();
    backend::error_as_fatal(&mut out, body);
});
