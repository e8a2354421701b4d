//! The node agent's protocol: requests (JSON + validation), the handshake and sealed lines.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shared::agent::auth::{AgentKey, ClientHandshake, ServerHandshake};
use shared::agent::Request;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<Request>(data) {
        if req.validate().is_ok() {
            if let Request::Follow { primary, .. } = &req {
                assert!(!primary.host.contains(['\'', '\\', '\n', '\r', '\0', ' ']));
            }
        }
    }
    let key = AgentKey::from_hex(&"11".repeat(32)).unwrap();
    let s = ServerHandshake::new(&key);
    assert!(s.verify(data).is_err());
    let _ = ClientHandshake::answer(&key, data);
    let (a, _) = ClientHandshake::answer(&key, &s.challenge()).unwrap();
    let (_, mut sealed) = s.verify(&a).unwrap();
    assert!(sealed.open(data).is_err());
});
