//! The link's frame header, `OPEN` and settings decoders (what a pooler reads from a gateway).
#![no_main]
use libfuzzer_sys::fuzz_target;
use shared::link::{parse_header, Open, HEADER};

fuzz_target!(|data: &[u8]| {
    if let Some(h) = parse_header(data) {
        let payload = data.get(HEADER..).unwrap_or_default();
        let payload = &payload[..h.len.min(payload.len())];
        if let Ok(open) = Open::decode(payload) {
            // What decodes encodes back to something that decodes the same.
            let mut again = Vec::new();
            open.encode(&mut again);
            assert_eq!(Open::decode(&again).as_ref(), Ok(&open));
        }
    }
    let _ = shared::settings::Settings::decode(data);
});
