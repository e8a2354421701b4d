//! Frontend (client → server) messages: the startup packet, and the extended-protocol messages
//! whose statement names the pooler rewrites.

use super::{
    put_cstr, put_message, read_cstr, read_i16, read_i32, ProtocolError, CANCEL_REQUEST,
    GSSENC_REQUEST, PROTOCOL_3_0, SSL_REQUEST,
};

pub const BIND: u8 = b'B';
pub const CLOSE: u8 = b'C';
pub const COPY_DATA: u8 = b'd';
pub const COPY_DONE: u8 = b'c';
pub const COPY_FAIL: u8 = b'f';
pub const DESCRIBE: u8 = b'D';
pub const EXECUTE: u8 = b'E';
pub const FLUSH: u8 = b'H';
pub const FUNCTION_CALL: u8 = b'F';
pub const PARSE: u8 = b'P';
pub const PASSWORD: u8 = b'p';
pub const QUERY: u8 = b'Q';
pub const SYNC: u8 = b'S';
pub const TERMINATE: u8 = b'X';

/// Message types a client may send once logged in (PostgresMain); anything else is fatal.
pub fn is_known_after_login(tag: u8) -> bool {
    matches!(
        tag,
        BIND | CLOSE
            | COPY_DATA
            | COPY_DONE
            | COPY_FAIL
            | DESCRIBE
            | EXECUTE
            | FLUSH
            | FUNCTION_CALL
            | PARSE
            | QUERY
            | SYNC
            | TERMINATE
    )
}

/// A startup parameter as text. Postgres accepts any bytes here; non-UTF-8 bytes become `?`,
/// as `pg_clean_ascii` does for `application_name`.
fn startup_text(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.to_owned(),
        Err(_) => b
            .iter()
            .map(|&c| {
                if (32..127).contains(&c) {
                    c as char
                } else {
                    '?'
                }
            })
            .collect(),
    }
}

/// The first packet of a connection (untyped: `int32 len`, `int32 code`, ...).
#[derive(Debug, PartialEq, Eq)]
pub enum Startup {
    Ssl,
    GssEnc,
    Cancel { pid: i32, secret: i32 },
    Startup { params: Vec<(String, String)> },
}

/// Parses the body of a startup-phase packet (everything after the length word).
pub fn parse_startup(body: &[u8]) -> Result<Startup, ProtocolError> {
    let mut pos = 0;
    let code = read_i32(body, &mut pos)?;
    match code {
        SSL_REQUEST => Ok(Startup::Ssl),
        GSSENC_REQUEST => Ok(Startup::GssEnc),
        CANCEL_REQUEST => {
            let pid = read_i32(body, &mut pos)?;
            let secret = read_i32(body, &mut pos)?;
            Ok(Startup::Cancel { pid, secret })
        }
        PROTOCOL_3_0 => {
            let mut params = Vec::new();
            loop {
                let name = read_cstr(body, &mut pos)?;
                if name.is_empty() {
                    break;
                }
                let value = read_cstr(body, &mut pos)?;
                params.push((startup_text(name), startup_text(value)));
            }
            Ok(Startup::Startup { params })
        }
        v => Err(ProtocolError::UnsupportedVersion {
            major: v >> 16,
            minor: v & 0xffff,
        }),
    }
}

/// Builds a startup packet (used by the pooler to log in to Postgres).
pub fn startup_message(out: &mut Vec<u8>, params: &[(&str, &str)]) {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&PROTOCOL_3_0.to_be_bytes());
    for (k, v) in params {
        put_cstr(out, k.as_bytes());
        put_cstr(out, v.as_bytes());
    }
    out.push(0);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

pub fn cancel_request(out: &mut Vec<u8>, pid: i32, secret: i32) {
    out.extend_from_slice(&16i32.to_be_bytes());
    out.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
    out.extend_from_slice(&pid.to_be_bytes());
    out.extend_from_slice(&secret.to_be_bytes());
}

pub fn query(out: &mut Vec<u8>, sql: &str) {
    query_bytes(out, sql.as_bytes());
}

/// A `Query` of a text as the client sent it: in its `client_encoding`, not always UTF-8.
pub fn query_bytes(out: &mut Vec<u8>, sql: &[u8]) {
    put_message(out, QUERY, |b| put_cstr(b, sql));
}

pub fn password(out: &mut Vec<u8>, data: &[u8]) {
    put_message(out, PASSWORD, |b| b.extend_from_slice(data));
}

pub fn sasl_initial_response(out: &mut Vec<u8>, mechanism: &str, data: &[u8]) {
    put_message(out, PASSWORD, |b| {
        put_cstr(b, mechanism.as_bytes());
        b.extend_from_slice(&(data.len() as i32).to_be_bytes());
        b.extend_from_slice(data);
    });
}

/// `SASLInitialResponse` body → (mechanism, data).
pub fn parse_sasl_initial(body: &[u8]) -> Result<(&[u8], &[u8]), ProtocolError> {
    let mut pos = 0;
    let mech = read_cstr(body, &mut pos)?;
    let len = read_i32(body, &mut pos)?;
    let rest = &body[pos..];
    if len < 0 {
        return Ok((mech, &[]));
    }
    rest.get(..len as usize)
        .map(|d| (mech, d))
        .ok_or(ProtocolError::Malformed("SASL data length"))
}

/// A `Parse` body: statement name, query, and the raw parameter-type section.
#[derive(Debug, PartialEq, Eq)]
pub struct Parse<'a> {
    pub name: &'a [u8],
    pub query: &'a [u8],
    /// `int16 n` followed by `n` × `int32 oid`, verbatim.
    pub param_types: &'a [u8],
}

pub fn parse_parse(body: &[u8]) -> Result<Parse<'_>, ProtocolError> {
    let mut pos = 0;
    let name = read_cstr(body, &mut pos)?;
    let query = read_cstr(body, &mut pos)?;
    let types_at = pos;
    // Unsigned, as Postgres reads it (`pq_getmsgint(msg, 2)` in exec_parse_message): 32,768
    // to 65,535 types is a valid Parse, and must not read as a malformed one that a caller
    // would then pass on unjudged (issue 12: it skipped the synchronous_commit guard).
    let n = read_i16(body, &mut pos)? as u16 as usize;
    if body.len() < pos + n * 4 {
        return Err(ProtocolError::Malformed("Parse parameter types"));
    }
    Ok(Parse {
        name,
        query,
        param_types: &body[types_at..pos + n * 4],
    })
}

pub fn write_parse(out: &mut Vec<u8>, name: &[u8], query: &[u8], param_types: &[u8]) {
    put_message(out, PARSE, |b| {
        put_cstr(b, name);
        put_cstr(b, query);
        b.extend_from_slice(param_types);
    });
}

/// A `Bind` body split as (portal, statement, everything after).
pub type BindParts<'a> = (&'a [u8], &'a [u8], &'a [u8]);

pub fn parse_bind(body: &[u8]) -> Result<BindParts<'_>, ProtocolError> {
    let mut pos = 0;
    let portal = read_cstr(body, &mut pos)?;
    let stmt = read_cstr(body, &mut pos)?;
    Ok((portal, stmt, &body[pos..]))
}

pub fn write_bind(out: &mut Vec<u8>, portal: &[u8], statement: &[u8], rest: &[u8]) {
    put_message(out, BIND, |b| {
        put_cstr(b, portal);
        put_cstr(b, statement);
        b.extend_from_slice(rest);
    });
}

/// A `Describe` or `Close` body: (`S` or `P`, name).
pub fn parse_target(body: &[u8]) -> Result<(u8, &[u8]), ProtocolError> {
    let kind = *body.first().ok_or(ProtocolError::Malformed("empty"))?;
    let mut pos = 1;
    let name = read_cstr(body, &mut pos)?;
    Ok((kind, name))
}

pub fn write_target(out: &mut Vec<u8>, tag: u8, kind: u8, name: &[u8]) {
    put_message(out, tag, |b| {
        b.push(kind);
        put_cstr(b, name);
    });
}

/// A batch of frontend messages with some of them replaced: `f(tag, body)` returns the whole
/// new message (tag and length included) or `None` to keep it. `None` when no message was
/// replaced. A message cut short at the end of the batch is copied as it is.
pub fn rewrite_each(
    batch: &[u8],
    mut f: impl FnMut(u8, &[u8]) -> Option<Vec<u8>>,
) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(batch.len() + 64);
    let mut changed = false;
    let mut i = 0;
    while i + 5 <= batch.len() {
        let len = u32::from_be_bytes([batch[i + 1], batch[i + 2], batch[i + 3], batch[i + 4]]);
        let end = (i + 1 + len as usize).min(batch.len());
        let (tag, body) = (batch[i], &batch[(i + 5).min(end)..end]);
        match f(tag, body) {
            Some(m) => {
                changed = true;
                out.extend_from_slice(&m);
            }
            None => out.extend_from_slice(&batch[i..end]),
        }
        if len < 4 {
            out.extend_from_slice(&batch[end..]);
            break;
        }
        i = end;
    }
    if i < batch.len() && i + 5 > batch.len() {
        out.extend_from_slice(&batch[i..]);
    }
    changed.then_some(out)
}

/// The SQL text of a `Query` body, without its terminator (a Query may carry embedded NULs;
/// Postgres reads up to the first one, so do we).
pub fn query_text(body: &[u8]) -> &[u8] {
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    &body[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn startup_round_trip() {
        let mut m = Vec::new();
        startup_message(&mut m, &[("user", "alice"), ("database", "app")]);
        match parse_startup(&m[4..]).unwrap() {
            Startup::Startup { params } => {
                assert_eq!(params[0], ("user".into(), "alice".into()));
                assert_eq!(params[1], ("database".into(), "app".into()));
            }
            other => panic!("{other:?}"),
        }
        let mut c = Vec::new();
        cancel_request(&mut c, 7, -9);
        assert_eq!(
            parse_startup(&c[4..]).unwrap(),
            Startup::Cancel { pid: 7, secret: -9 }
        );
        assert!(matches!(
            parse_startup(&(4i32 << 16).to_be_bytes()),
            Err(ProtocolError::UnsupportedVersion { major: 4, .. })
        ));
        assert!(parse_startup(&[0, 3]).is_err());
    }

    #[test]
    fn parse_and_bind() {
        let mut m = Vec::new();
        write_parse(&mut m, b"s1", b"select $1", &[0, 1, 0, 0, 0, 23]);
        let p = parse_parse(&m[5..]).unwrap();
        assert_eq!(p.name, b"s1");
        assert_eq!(p.query, b"select $1");
        assert_eq!(p.param_types, &[0, 1, 0, 0, 0, 23]);
        assert!(parse_parse(&m[5..m.len() - 1]).is_err());
        // 40,000 parameter types (0x9c40: negative as an i16) is a valid Parse.
        let mut section = 40_000u16.to_be_bytes().to_vec();
        section.extend(std::iter::repeat_n([0, 0, 0, 23], 40_000).flatten());
        let mut m = Vec::new();
        write_parse(&mut m, b"", b"set synchronous_commit = off", &section);
        let p = parse_parse(&m[5..]).unwrap();
        assert_eq!(p.query, b"set synchronous_commit = off");
        assert_eq!(p.param_types.len(), 2 + 160_000);
        let mut b = Vec::new();
        write_bind(&mut b, b"", b"s1", &[0, 0, 0, 0, 0, 0]);
        assert_eq!(
            parse_bind(&b[5..]).unwrap(),
            (&b""[..], &b"s1"[..], &[0u8, 0, 0, 0, 0, 0][..])
        );
    }

    #[test]
    fn sasl_initial() {
        let mut m = Vec::new();
        sasl_initial_response(&mut m, "SCRAM-SHA-256", b"n,,n=,r=abc");
        let (mech, data) = parse_sasl_initial(&m[5..]).unwrap();
        assert_eq!(mech, b"SCRAM-SHA-256");
        assert_eq!(data, b"n,,n=,r=abc");
        assert!(parse_sasl_initial(b"X\0\0\0\0\x09ab").is_err());
    }
}
