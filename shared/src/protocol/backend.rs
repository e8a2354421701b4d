//! Backend (server → client) messages that Tidepool itself builds or inspects.

use super::{put_cstr, put_message, read_cstr, ProtocolError};

pub const AUTHENTICATION: u8 = b'R';
pub const BACKEND_KEY_DATA: u8 = b'K';
pub const BIND_COMPLETE: u8 = b'2';
pub const CLOSE_COMPLETE: u8 = b'3';
pub const COMMAND_COMPLETE: u8 = b'C';
pub const COPY_IN_RESPONSE: u8 = b'G';
pub const COPY_OUT_RESPONSE: u8 = b'H';
pub const COPY_BOTH_RESPONSE: u8 = b'W';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const DATA_ROW: u8 = b'D';
pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
pub const ERROR_RESPONSE: u8 = b'E';
pub const FUNCTION_CALL_RESPONSE: u8 = b'V';
pub const NO_DATA: u8 = b'n';
pub const NOTICE_RESPONSE: u8 = b'N';
pub const NEGOTIATE_PROTOCOL_VERSION: u8 = b'v';
pub const NOTIFICATION_RESPONSE: u8 = b'A';
pub const PARAMETER_DESCRIPTION: u8 = b't';
pub const PARAMETER_STATUS: u8 = b'S';
pub const PARSE_COMPLETE: u8 = b'1';
pub const PORTAL_SUSPENDED: u8 = b's';
pub const READY_FOR_QUERY: u8 = b'Z';
pub const ROW_DESCRIPTION: u8 = b'T';

pub const AUTH_OK: i32 = 0;
pub const AUTH_CLEARTEXT: i32 = 3;
pub const AUTH_MD5: i32 = 5;
pub const AUTH_SASL: i32 = 10;
pub const AUTH_SASL_CONTINUE: i32 = 11;
pub const AUTH_SASL_FINAL: i32 = 12;

pub fn auth_ok(out: &mut Vec<u8>) {
    put_message(out, AUTHENTICATION, |b| {
        b.extend_from_slice(&AUTH_OK.to_be_bytes())
    });
}

pub fn auth_cleartext(out: &mut Vec<u8>) {
    put_message(out, AUTHENTICATION, |b| {
        b.extend_from_slice(&AUTH_CLEARTEXT.to_be_bytes())
    });
}

pub fn auth_md5(out: &mut Vec<u8>, salt: [u8; 4]) {
    put_message(out, AUTHENTICATION, |b| {
        b.extend_from_slice(&AUTH_MD5.to_be_bytes());
        b.extend_from_slice(&salt);
    });
}

pub fn auth_sasl(out: &mut Vec<u8>, mechanisms: &[&str]) {
    put_message(out, AUTHENTICATION, |b| {
        b.extend_from_slice(&AUTH_SASL.to_be_bytes());
        for m in mechanisms {
            put_cstr(b, m.as_bytes());
        }
        b.push(0);
    });
}

pub fn auth_sasl_continue(out: &mut Vec<u8>, data: &[u8]) {
    put_message(out, AUTHENTICATION, |b| {
        b.extend_from_slice(&AUTH_SASL_CONTINUE.to_be_bytes());
        b.extend_from_slice(data);
    });
}

pub fn auth_sasl_final(out: &mut Vec<u8>, data: &[u8]) {
    put_message(out, AUTHENTICATION, |b| {
        b.extend_from_slice(&AUTH_SASL_FINAL.to_be_bytes());
        b.extend_from_slice(data);
    });
}

pub fn parameter_status(out: &mut Vec<u8>, name: &str, value: &str) {
    put_message(out, PARAMETER_STATUS, |b| {
        put_cstr(b, name.as_bytes());
        put_cstr(b, value.as_bytes());
    });
}

pub fn backend_key_data(out: &mut Vec<u8>, pid: i32, secret: i32) {
    put_message(out, BACKEND_KEY_DATA, |b| {
        b.extend_from_slice(&pid.to_be_bytes());
        b.extend_from_slice(&secret.to_be_bytes());
    });
}

pub fn ready_for_query(out: &mut Vec<u8>, status: u8) {
    put_message(out, READY_FOR_QUERY, |b| b.push(status));
}

pub fn parse_complete(out: &mut Vec<u8>) {
    put_message(out, PARSE_COMPLETE, |_| {});
}

pub fn close_complete(out: &mut Vec<u8>) {
    put_message(out, CLOSE_COMPLETE, |_| {});
}

/// Severity of an error we raise ourselves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An `ErrorResponse` shaped as Postgres shapes its own: `S`, `V`, `C`, `M` fields.
pub fn error_response(out: &mut Vec<u8>, severity: Severity, sqlstate: &str, message: &str) {
    error_with(out, severity, sqlstate, message, None);
}

/// `S`, `V`, `C`, `M` and, when given, `D` (Postgres's `errdetail`).
fn error_with(
    out: &mut Vec<u8>,
    severity: Severity,
    sqlstate: &str,
    message: &str,
    detail: Option<&str>,
) {
    put_message(out, ERROR_RESPONSE, |b| {
        b.push(b'S');
        put_cstr(b, severity.as_str().as_bytes());
        b.push(b'V');
        put_cstr(b, severity.as_str().as_bytes());
        b.push(b'C');
        put_cstr(b, sqlstate.as_bytes());
        b.push(b'M');
        put_cstr(b, message.as_bytes());
        if let Some(detail) = detail {
            b.push(b'D');
            put_cstr(b, detail.as_bytes());
        }
        b.push(0);
    });
}

/// The fields of an `ErrorResponse`/`NoticeResponse` body.
pub fn error_fields(body: &[u8]) -> Result<Vec<(u8, &[u8])>, ProtocolError> {
    let mut fields = Vec::new();
    let mut pos = 0;
    loop {
        let code = *body
            .get(pos)
            .ok_or(ProtocolError::Malformed("truncated error"))?;
        pos += 1;
        if code == 0 {
            return Ok(fields);
        }
        fields.push((code, read_cstr(body, &mut pos)?));
    }
}

/// The SQLSTATE of an `ErrorResponse` body, if present.
pub fn error_sqlstate(body: &[u8]) -> Option<&[u8]> {
    error_fields(body)
        .ok()?
        .into_iter()
        .find(|(c, _)| *c == b'C')
        .map(|(_, v)| v)
}

/// The pid of a raw `NoticeResponse` message that Postgres's `pg_signal_backend()`
/// (signalfuncs.c) sends for a pid that is no backend (`WARNING 01000 PID %d is not a
/// PostgreSQL backend process`), when that pid is negative: no process has it, so it is either
/// a marker of the gateway's (gateway/src/signals.rs) or a client's own nonsense. Read by the
/// routine's name and the number in the message, so a translated message (`lc_messages`) is
/// read too.
pub fn signal_marker(msg: &[u8]) -> Option<i32> {
    if msg.first() != Some(&NOTICE_RESPONSE) {
        return None;
    }
    let fields = error_fields(msg.get(5..)?).ok()?;
    let field = |c: u8| fields.iter().find(|(f, _)| *f == c).map(|(_, v)| *v);
    if field(b'C')? != b"01000" || field(b'R')? != b"pg_signal_backend" {
        return None;
    }
    let text = field(b'M')?;
    let at = text.iter().position(|&b| b == b'-')?;
    let digits = text[at + 1..]
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    if digits == 0 {
        return None;
    }
    std::str::from_utf8(&text[at..at + 1 + digits])
        .ok()?
        .parse()
        .ok()
}

/// An `ErrorResponse` with a `DETAIL` line (Postgres's `errdetail`).
pub fn error_response_detail(
    out: &mut Vec<u8>,
    severity: Severity,
    sqlstate: &str,
    message: &str,
    detail: &str,
) {
    error_with(out, severity, sqlstate, message, Some(detail));
}

/// Re-emits an error body with its severity raised to FATAL: an error Postgres raised while we
/// applied the startup settings must end the client's login as it would have directly.
pub fn error_as_fatal(out: &mut Vec<u8>, body: &[u8]) {
    let fields = match error_fields(body) {
        Ok(f) => f,
        Err(_) => {
            error_response(out, Severity::Fatal, "08P01", "invalid error from server");
            return;
        }
    };
    put_message(out, ERROR_RESPONSE, |b| {
        for (code, value) in fields {
            b.push(code);
            if code == b'S' || code == b'V' {
                put_cstr(b, b"FATAL");
            } else {
                put_cstr(b, value);
            }
        }
        b.push(0);
    });
}

/// Re-emits an error or notice with `from` replaced by `to` in its text fields (message, detail,
/// hint): the pooler renames statements on backends and must not show its names to the client.
pub fn rename_in_error(out: &mut Vec<u8>, tag: u8, body: &[u8], from: &[u8], to: &[u8]) {
    let Ok(fields) = error_fields(body) else {
        out.push(tag);
        out.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
        out.extend_from_slice(body);
        return;
    };
    put_message(out, tag, |b| {
        for (code, value) in fields {
            b.push(code);
            if matches!(code, b'M' | b'D' | b'H') && !from.is_empty() {
                let mut v = Vec::with_capacity(value.len());
                let mut i = 0;
                while i < value.len() {
                    if value[i..].starts_with(from) {
                        v.extend_from_slice(to);
                        i += from.len();
                    } else {
                        v.push(value[i]);
                        i += 1;
                    }
                }
                put_cstr(b, &v);
            } else {
                put_cstr(b, value);
            }
        }
        b.push(0);
    });
}

/// The `(name, value)` of a `ParameterStatus` body.
pub fn parse_parameter_status(body: &[u8]) -> Result<(&[u8], &[u8]), ProtocolError> {
    let mut pos = 0;
    let name = read_cstr(body, &mut pos)?;
    let value = read_cstr(body, &mut pos)?;
    Ok((name, value))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_round_trip() {
        let mut out = Vec::new();
        error_response(
            &mut out,
            Severity::Error,
            "28P01",
            "password authentication failed",
        );
        let body = &out[5..];
        assert_eq!(error_sqlstate(body), Some(&b"28P01"[..]));
        let mut fatal = Vec::new();
        error_as_fatal(&mut fatal, body);
        let f = error_fields(&fatal[5..]).unwrap();
        assert_eq!(f[0], (b'S', &b"FATAL"[..]));
        assert_eq!(f[2], (b'C', &b"28P01"[..]));
    }

    #[test]
    fn signal_markers_are_read_from_pg_signal_backends_warning() {
        let notice = |code: &str, msg: &str, routine: &str| {
            let mut m = Vec::new();
            put_message(&mut m, NOTICE_RESPONSE, |b| {
                for (c, v) in [
                    (b'S', "WARNING"),
                    (b'V', "WARNING"),
                    (b'C', code),
                    (b'M', msg),
                    (b'F', "signalfuncs.c"),
                    (b'L', "81"),
                    (b'R', routine),
                ] {
                    b.push(c);
                    put_cstr(b, v.as_bytes());
                }
                b.push(0);
            });
            m
        };
        let pg = |pid: &str| {
            notice(
                "01000",
                &format!("PID {pid} is not a PostgreSQL backend process"),
                "pg_signal_backend",
            )
        };
        assert_eq!(signal_marker(&pg("-1073741825")), Some(-1073741825));
        assert_eq!(signal_marker(&pg("-2147483648")), Some(i32::MIN));
        // Translated (lc_messages = de).
        let de = notice(
            "01000",
            "PID -536870913 ist kein PostgreSQL-Backend-Prozess",
            "pg_signal_backend",
        );
        assert_eq!(signal_marker(&de), Some(-536870913));
        // Positive pids, other routines and codes, errors: not markers.
        assert_eq!(signal_marker(&pg("4242")), None);
        assert_eq!(signal_marker(&pg("-99999999999")), None);
        assert_eq!(signal_marker(&notice("01000", "PID -5 x", "other")), None);
        assert_eq!(
            signal_marker(&notice("42501", "PID -5 x", "pg_signal_backend")),
            None
        );
        let mut e = pg("-5");
        e[0] = ERROR_RESPONSE;
        assert_eq!(signal_marker(&e), None);
        assert_eq!(signal_marker(b"N\0\0\0\x04"), None);
    }

    #[test]
    fn garbage_error_body() {
        assert!(error_fields(b"Sabc").is_err());
        assert_eq!(error_sqlstate(b""), None);
    }
}
