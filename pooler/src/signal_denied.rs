//! The error a client's `pg_cancel_backend`/`pg_terminate_backend` of another session gets when
//! Postgres would refuse it (the gateway's `signals.rs` decides, the server's check reports): a
//! leaf of the response state machine (responses.rs).

use shared::protocol::backend as be;

/// A signalling call the gateway left to the server's check (`gateway/src/signals.rs`) raises,
/// where Postgres would refuse the signal, the error of reading a setting nobody has:
/// `tidepool.signal_denied_<cancel|terminate>_<superuser|member>`. This is that error as
/// Postgres 15's `pg_cancel_backend`/`pg_terminate_backend` raise it (signalfuncs.c: code,
/// message, file, line, routine), keeping the severity fields; `None` for any other error.
pub fn denied_signal(msg: &[u8]) -> Option<Vec<u8>> {
    const MARK: &[u8] = b"\"tidepool.signal_denied_";
    let fields = be::error_fields(msg.get(5..)?).ok()?;
    let field = |c: u8| fields.iter().find(|(f, _)| *f == c).map(|(_, v)| *v);
    if field(b'C')? != b"42704" {
        return None;
    }
    let text = field(b'M')?;
    let at = text.windows(MARK.len()).position(|w| w == MARK)? + MARK.len();
    let which = text[at..].split(|&b| b == b'"').next()?;
    let (message, line, routine): (&str, &str, &str) = match which {
        b"cancel_superuser" => (
            "must be a superuser to cancel superuser query",
            "127",
            "pg_cancel_backend",
        ),
        b"cancel_member" => (
            "must be a member of the role whose query is being canceled or member of \
             pg_signal_backend",
            "132",
            "pg_cancel_backend",
        ),
        b"terminate_superuser" => (
            "must be a superuser to terminate superuser process",
            "229",
            "pg_terminate_backend",
        ),
        b"terminate_member" => (
            "must be a member of the role whose process is being terminated or member of \
             pg_signal_backend",
            "234",
            "pg_terminate_backend",
        ),
        _ => return None,
    };
    let mut e = Vec::new();
    shared::protocol::put_message(&mut e, be::ERROR_RESPONSE, |b| {
        let severity = field(b'S').unwrap_or(b"ERROR");
        for (code, value) in [
            (b'S', severity),
            (b'V', field(b'V').unwrap_or(b"ERROR")),
            (b'C', b"42501"),
            (b'M', message.as_bytes()),
            (b'F', b"signalfuncs.c"),
            (b'L', line.as_bytes()),
            (b'R', routine.as_bytes()),
        ] {
            b.push(code);
            b.extend_from_slice(value);
            b.push(0);
        }
        b.push(0);
    });
    Some(e)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn error(fields: &[(u8, &str)]) -> Vec<u8> {
        let mut e = Vec::new();
        shared::protocol::put_message(&mut e, be::ERROR_RESPONSE, |b| {
            for (c, v) in fields {
                b.push(*c);
                b.extend_from_slice(v.as_bytes());
                b.push(0);
            }
            b.push(0);
        });
        e
    }

    #[test]
    fn a_denied_signal_is_shown_as_postgres_refuses_it() {
        let marker = error(&[
            (b'S', "ERROR"),
            (b'V', "ERROR"),
            (b'C', "42704"),
            (
                b'M',
                "unrecognized configuration parameter \"tidepool.signal_denied_terminate_member\"",
            ),
            (b'F', "guc.c"),
            (b'L', "5734"),
            (b'R', "find_option"),
        ]);
        let e = denied_signal(&marker).unwrap();
        assert_eq!(
            e,
            error(&[
                (b'S', "ERROR"),
                (b'V', "ERROR"),
                (b'C', "42501"),
                (
                    b'M',
                    "must be a member of the role whose process is being terminated or member \
                     of pg_signal_backend"
                ),
                (b'F', "signalfuncs.c"),
                (b'L', "234"),
                (b'R', "pg_terminate_backend"),
            ])
        );
        // Other errors, other settings, and a marker under another code: unchanged.
        let other = error(&[
            (b'S', "ERROR"),
            (b'C', "42704"),
            (b'M', "unrecognized configuration parameter \"tidepool.x\""),
        ]);
        assert_eq!(denied_signal(&other), None);
        let other = error(&[
            (b'S', "ERROR"),
            (b'C', "22023"),
            (b'M', "\"tidepool.signal_denied_cancel_member\""),
        ]);
        assert_eq!(denied_signal(&other), None);
        assert_eq!(denied_signal(b"E\0\0"), None);
    }
}
