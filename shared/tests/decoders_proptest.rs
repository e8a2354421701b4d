//! Property tests of every decoder a peer's bytes reach (issue 12, "fuzzing"): the frontend
//! messages and the startup packet (`protocol`), the SCRAM and md5 exchanges (`auth`), the link
//! frames (`link`, `settings`) and the agent protocol (`agent`). Each decoder gets arbitrary
//! bytes and must answer without panicking; each encoder/decoder pair must round-trip; each
//! authenticator must accept the right answer and refuse every other one.
//!
//! Bounded so CI runs them on every build (`PROPTEST_CASES` raises the count); `fuzz/` holds
//! the same decoders as cargo-fuzz targets for long runs (`scripts/fuzz.sh`).

use proptest::prelude::*;
use shared::agent::auth::{AgentKey, ClientHandshake, ServerHandshake};
use shared::agent::{validate, Request};
use shared::auth::md5::{md5_challenge_response, md5_stored, md5_verify};
use shared::auth::scram::{client_key_from_password, ScramClient, ScramServer, ScramVerifier};
use shared::auth::Verifier;
use shared::link::{self, Credential, Open, HEADER};
use shared::protocol::{self, backend, frontend};
use shared::settings::Settings;
use tidepool_shared as shared;

fn config() -> ProptestConfig {
    // Cheap cases: 512 by default (a few seconds in a debug build).
    ProptestConfig {
        cases: std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(512),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

fn bytes(max: usize) -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 0..max)
}

/// A string without NUL (what a C string on the wire can carry).
fn cstring() -> impl Strategy<Value = String> {
    "[^\u{0}]{0,24}"
}

proptest! {
    #![proptest_config(config())]

    // ---------------------------------------------------------------- protocol (frontend)

    /// Length words at the edges (-1, i32::MIN, 0..8, i32::MAX) as well as at random: random
    /// bytes alone almost never make -1, which once overflowed `pending_message_len`.
    #[test]
    fn message_framing_at_edge_lengths(tag in any::<u8>(), len in prop_oneof![
        Just(-1i32), Just(i32::MIN), Just(i32::MAX), -8i32..8, any::<i32>()
    ], rest in bytes(16), limit in any::<usize>()) {
        let mut buf = vec![tag];
        buf.extend_from_slice(&len.to_be_bytes());
        buf.extend_from_slice(&rest);
        let pending = protocol::pending_message_len(&buf);
        prop_assert_eq!(pending, (len >= 4).then(|| len as usize + 1));
        match protocol::typed_message_len(&buf, limit) {
            Ok(Some(n)) => prop_assert!(Some(n) == pending && n <= buf.len() && n <= limit),
            Ok(None) => prop_assert!(pending.is_some_and(|p| p > buf.len())),
            Err(_) => prop_assert!(len < 4 || pending.is_some_and(|p| p > limit)),
        }
    }

    #[test]
    fn message_framing_never_panics_and_stays_in_bounds(buf in bytes(64), limit in 0usize..100) {
        match protocol::typed_message_len(&buf, limit) {
            Ok(Some(n)) => prop_assert!(n >= 5 && n <= buf.len() && n <= limit),
            Ok(None) => {}
            Err(_) => {}
        }
        if let Some(n) = protocol::pending_message_len(&buf) {
            prop_assert!(n >= 5);
        }
    }

    #[test]
    fn frontend_decoders_never_panic(body in bytes(96)) {
        let _ = frontend::parse_startup(&body);
        let _ = frontend::parse_sasl_initial(&body);
        if let Ok(p) = frontend::parse_parse(&body) {
            // The parameter-type section is `int16 n` + n × int32, inside the body.
            prop_assert!(p.param_types.len() >= 2);
            let n = u16::from_be_bytes([p.param_types[0], p.param_types[1]]);
            prop_assert!(p.param_types.len() == 2 + 4 * n as usize);
        }
        let _ = frontend::parse_bind(&body);
        let _ = frontend::parse_target(&body);
        prop_assert!(frontend::query_text(&body).len() <= body.len());
        let _ = backend::error_fields(&body);
        let _ = backend::error_sqlstate(&body);
        let _ = backend::parse_parameter_status(&body);
        let mut out = Vec::new();
        backend::error_as_fatal(&mut out, &body);
    }

    #[test]
    fn startup_packet_round_trips(params in proptest::collection::vec((cstring(), cstring()), 0..6)) {
        // An empty name ends the list on the wire: keep names non-empty.
        let params: Vec<(String, String)> = params
            .into_iter()
            .map(|(k, v)| (format!("k{k}"), v))
            .collect();
        let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let mut out = Vec::new();
        frontend::startup_message(&mut out, &refs);
        let len = i32::from_be_bytes([out[0], out[1], out[2], out[3]]) as usize;
        prop_assert_eq!(len, out.len());
        prop_assert_eq!(
            frontend::parse_startup(&out[4..]),
            Ok(frontend::Startup::Startup { params })
        );
    }

    #[test]
    fn parse_message_round_trips(name in bytes(16), query in bytes(64), types in proptest::collection::vec(any::<u32>(), 0..8)) {
        let name: Vec<u8> = name.into_iter().filter(|&b| b != 0).collect();
        let query: Vec<u8> = query.into_iter().filter(|&b| b != 0).collect();
        let mut section = (types.len() as u16).to_be_bytes().to_vec();
        for t in &types {
            section.extend_from_slice(&t.to_be_bytes());
        }
        let mut out = Vec::new();
        frontend::write_parse(&mut out, &name, &query, &section);
        prop_assert_eq!(protocol::typed_message_len(&out, usize::MAX), Ok(Some(out.len())));
        let p = frontend::parse_parse(&out[5..]).unwrap();
        prop_assert_eq!(p.name, &name[..]);
        prop_assert_eq!(p.query, &query[..]);
        prop_assert_eq!(p.param_types, &section[..]);
    }

    // ---------------------------------------------------------------- auth

    #[test]
    fn scram_server_refuses_arbitrary_messages(first in bytes(80), last in bytes(160)) {
        let v = ScramVerifier::from_password("pw", b"salt", 16);
        let mut s = ScramServer::new(v.clone());
        if s.client_first(&first).is_ok() {
            // Whatever came first, an arbitrary final message never proves the password.
            prop_assert!(s.client_final(&last).is_err());
        }
        let mut s = ScramServer::new(v);
        prop_assert!(s.client_final(&last).is_err(), "a final message before the first");
        let _ = Verifier::parse(&String::from_utf8_lossy(&first));
        let _ = ScramVerifier::parse(&String::from_utf8_lossy(&last));
    }

    #[test]
    fn scram_client_survives_arbitrary_server_messages(first in bytes(120), last in bytes(80)) {
        let mut c = ScramClient::new([7; 32], [9; 32]);
        let _ = c.client_first();
        if c.server_first(&first).is_ok() {
            prop_assert!(c.server_final(&last).is_err(), "a forged server signature");
        }
    }

    #[test]
    fn scram_exchange_accepts_the_password_and_nothing_else(
        password in "[ -~]{0,16}",
        other in "[ -~]{0,16}",
        salt in proptest::collection::vec(any::<u8>(), 1..20),
        iterations in 1u32..8,
        flip in any::<usize>(),
    ) {
        let v = ScramVerifier::from_password(&password, &salt, iterations);
        let exchange = |client_key: [u8; 32], tamper: Option<usize>| {
            let mut c = ScramClient::new(client_key, v.server_key);
            let mut s = ScramServer::new(v.clone());
            let sf = s.client_first(&c.client_first()).unwrap();
            let mut cf = c.server_first(&sf).unwrap();
            if let Some(i) = tamper {
                let i = i % cf.len();
                cf[i] ^= 1;
            }
            s.client_final(&cf).map(|(server_final, key)| (server_final, key, c))
        };
        let right = client_key_from_password(&password, &salt, iterations);
        let (server_final, learned, mut c) = exchange(right, None).unwrap();
        prop_assert_eq!(learned, right);
        prop_assert!(c.server_final(&server_final).is_ok());
        if other != password {
            let wrong = client_key_from_password(&other, &salt, iterations);
            prop_assert!(exchange(wrong, None).is_err());
        }
        prop_assert!(exchange(right, Some(flip)).is_err(), "a tampered client-final");
    }

    #[test]
    fn md5_accepts_the_answer_and_nothing_else(
        password in "[ -~]{0,16}",
        user in "[a-z]{1,8}",
        salt in any::<[u8; 4]>(),
        answer in bytes(40),
    ) {
        let stored = md5_stored(&password, &user);
        let stored = format!("md5{}", stored.strip_prefix("md5").unwrap_or(&stored));
        let right = md5_challenge_response(&stored, salt);
        prop_assert!(md5_verify(&stored, salt, right.as_bytes()));
        let mut with_nul = right.clone().into_bytes();
        with_nul.push(0);
        prop_assert!(md5_verify(&stored, salt, &with_nul));
        if answer != right.as_bytes() && answer.strip_suffix(b"\0") != Some(right.as_bytes()) {
            prop_assert!(!md5_verify(&stored, salt, &answer));
        }
        // A stored value that is not an md5 hash is never answerable.
        prop_assert!(!md5_verify(&password, salt, &answer));
    }

    // ---------------------------------------------------------------- link (read-only here)

    #[test]
    fn link_decoders_never_panic(buf in bytes(160)) {
        if let Some(h) = link::parse_header(&buf) {
            prop_assert!(buf.len() >= HEADER && h.len <= u32::MAX as usize);
        }
        let _ = Open::decode(&buf);
        let _ = Settings::decode(&buf);
    }

    #[test]
    fn open_round_trips(
        user in cstring(),
        database in cstring(),
        pid in any::<i32>(),
        secret in any::<i32>(),
        kind in 0u8..3,
        keys in any::<([u8; 32], [u8; 32])>(),
        stored in cstring(),
        settings in proptest::collection::vec(("[a-z_.]{1,12}", cstring()), 0..6),
    ) {
        let credential = match kind {
            0 => Credential::None,
            1 => Credential::Scram { client_key: keys.0, server_key: keys.1 },
            _ => Credential::Md5 { stored },
        };
        let open = Open {
            user,
            database,
            pid,
            secret,
            credential,
            settings: Settings::from_pairs(settings),
        };
        let mut buf = Vec::new();
        open.encode(&mut buf);
        prop_assert_eq!(Open::decode(&buf), Ok(open));
        for cut in 0..buf.len() {
            let _ = Open::decode(&buf[..cut]);
        }
        let mut framed = Vec::new();
        link::put_frame(&mut framed, link::up::OPEN, 7, &buf);
        let h = link::parse_header(&framed).unwrap();
        prop_assert_eq!((h.kind, h.session, h.len), (link::up::OPEN, 7, buf.len()));
    }

    // ---------------------------------------------------------------- agent

    #[test]
    fn agent_requests_never_panic_and_valid_hosts_are_inert(line in bytes(200), host in "\\PC{0,40}") {
        if let Ok(req) = serde_json::from_slice::<Request>(&line) {
            let _ = req.validate();
        }
        if validate::host(&host).is_ok() {
            prop_assert!(!host.contains(['\'', '\\', '"', ' ', '=', '\n', '\r', '\0']), "{host:?}");
        }
        let _ = validate::sync_names(&host);
    }

    #[test]
    fn agent_terms_are_bounded(t in any::<u64>()) {
        prop_assert_eq!(validate::term(t).is_ok(), t <= validate::MAX_TERM);
        if let Some(n) = validate::next_term(t) {
            prop_assert!(n == t + 1 && n <= validate::MAX_TERM);
        }
        let json = format!(r#"{{"op":"recruit","term":{t}}}"#);
        let req: Request = serde_json::from_str(&json).unwrap();
        prop_assert_eq!(req.validate().is_ok(), t <= validate::MAX_TERM);
    }

    #[test]
    fn agent_handshake_refuses_arbitrary_answers(answer in bytes(200), line in bytes(200)) {
        let key = AgentKey::generate();
        let s = ServerHandshake::new(&key);
        prop_assert!(s.verify(&answer).is_err());
        let _ = ClientHandshake::answer(&key, &answer);
        // A genuine handshake, then an arbitrary line: never taken as sealed.
        let (a, c) = ClientHandshake::answer(&key, &s.challenge()).unwrap();
        let (proof, mut sealed) = s.verify(&a).unwrap();
        prop_assert!(c.finish(&proof).is_ok());
        prop_assert!(sealed.open(&line).is_err());
    }

    #[test]
    fn link_handshake_refuses_arbitrary_frames(kind in any::<u8>(), payload in bytes(100)) {
        let key = link::LinkKey::generate();
        let p = link::handshake::Pooler::new(&key);
        // Any first frame but a genuine HELLO is refused, whatever its kind and bytes.
        prop_assert!(p.verify(kind, &payload).is_err());
        let _ = link::handshake::Gateway::answer(&key, kind, &payload);
        // A genuine challenge answered, then an arbitrary WELCOME: never believed.
        let c = p.challenge();
        let (_, g) = link::handshake::Gateway::answer(&key, c[0], &c[HEADER..]).unwrap();
        prop_assert!(g.finish(kind, &payload).is_err());
    }
}
