//! The PostgreSQL v3 wire protocol: framing, the startup packet, and the few messages Tidepool
//! builds or rewrites. No sockets here: bytes in, bytes out (as `postgres-protocol` does).
//!
//! Written by hand on purpose: this is the per-request path, and we want to slice raw messages
//! without decoding them (`Bytes` views into the read buffer), which the general-purpose
//! parsers do not offer.

pub mod backend;
pub mod frontend;

use thiserror::Error;

/// `SSLRequest` code (PostgreSQL `NEGOTIATE_SSL_CODE`).
pub const SSL_REQUEST: i32 = 80_877_103;
/// `GSSENCRequest` code.
pub const GSSENC_REQUEST: i32 = 80_877_104;
/// `CancelRequest` code.
pub const CANCEL_REQUEST: i32 = 80_877_102;
/// Protocol 3.0.
pub const PROTOCOL_3_0: i32 = 196_608;

/// Postgres rejects startup packets longer than this (`MAX_STARTUP_PACKET_LENGTH`).
pub const MAX_STARTUP_PACKET: usize = 10_000;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("invalid message length {0}")]
    BadLength(i64),
    #[error("message of {size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { size: usize, limit: usize },
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0")]
    UnsupportedVersion { major: i32, minor: i32 },
}

/// If `buf` starts with a complete typed message (`type`, `int32 len`, body), its total length.
/// `Ok(None)` when more bytes are needed. `limit` bounds the whole message.
#[inline]
pub fn typed_message_len(buf: &[u8], limit: usize) -> Result<Option<usize>, ProtocolError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(ProtocolError::BadLength(len as i64));
    }
    let total = len as usize + 1;
    if total > limit {
        return Err(ProtocolError::TooLarge { size: total, limit });
    }
    Ok(if buf.len() >= total {
        Some(total)
    } else {
        None
    })
}

/// The length an incomplete message at the start of `buf` will have, if its header is there.
#[inline]
pub fn pending_message_len(buf: &[u8]) -> Option<usize> {
    if buf.len() < 5 {
        return None;
    }
    let len = i32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    // `then`, not `then_some`: the sum must not be computed for a negative length (-1 as usize
    // + 1 overflows: a panic in a build with overflow checks). Found by fuzz/ (frontend).
    (len >= 4).then(|| len as usize + 1)
}

/// Reads a NUL-terminated string at `*pos`, advancing past the NUL.
#[inline]
pub fn read_cstr<'a>(buf: &'a [u8], pos: &mut usize) -> Result<&'a [u8], ProtocolError> {
    let rest = buf
        .get(*pos..)
        .ok_or(ProtocolError::Malformed("truncated"))?;
    let nul = rest
        .iter()
        .position(|&b| b == 0)
        .ok_or(ProtocolError::Malformed("missing string terminator"))?;
    *pos += nul + 1;
    Ok(&rest[..nul])
}

#[inline]
pub fn read_i16(buf: &[u8], pos: &mut usize) -> Result<i16, ProtocolError> {
    let b = buf
        .get(*pos..*pos + 2)
        .ok_or(ProtocolError::Malformed("truncated"))?;
    *pos += 2;
    Ok(i16::from_be_bytes([b[0], b[1]]))
}

#[inline]
pub fn read_i32(buf: &[u8], pos: &mut usize) -> Result<i32, ProtocolError> {
    let b = buf
        .get(*pos..*pos + 4)
        .ok_or(ProtocolError::Malformed("truncated"))?;
    *pos += 4;
    Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
}

/// Appends a typed message: the type byte, a length placeholder, then whatever `body` writes.
#[inline]
pub fn put_message(out: &mut Vec<u8>, tag: u8, body: impl FnOnce(&mut Vec<u8>)) {
    out.push(tag);
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    body(out);
    let len = (out.len() - at) as i32;
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

#[inline]
pub fn put_cstr(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(s);
    out.push(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Regression (cargo-fuzz, target `frontend`): a length word of -1 panicked on overflow.
    #[test]
    fn negative_lengths_are_no_pending_length() {
        assert_eq!(pending_message_len(&[b'Q', 0xff, 0xff, 0xff, 0xff]), None);
        assert_eq!(pending_message_len(&[b'Q', 0x80, 0, 0, 0]), None);
        assert_eq!(pending_message_len(&[b'Q', 0, 0, 0, 3]), None);
        assert_eq!(pending_message_len(&[b'Q', 0, 0, 0, 4]), Some(5));
        assert_eq!(
            typed_message_len(&[b'Q', 0xff, 0xff, 0xff, 0xff], usize::MAX),
            Err(ProtocolError::BadLength(-1))
        );
    }

    #[test]
    fn framing() {
        let mut m = Vec::new();
        put_message(&mut m, b'Q', |b| put_cstr(b, b"select 1"));
        assert_eq!(typed_message_len(&m, 1 << 20), Ok(Some(m.len())));
        assert_eq!(typed_message_len(&m[..m.len() - 1], 1 << 20), Ok(None));
        assert_eq!(typed_message_len(&m[..3], 1 << 20), Ok(None));
        assert!(matches!(
            typed_message_len(&m, 4),
            Err(ProtocolError::TooLarge { .. })
        ));
        let bad = [b'Q', 0, 0, 0, 3];
        assert_eq!(
            typed_message_len(&bad, 100),
            Err(ProtocolError::BadLength(3))
        );
        let neg = [b'Q', 0xff, 0xff, 0xff, 0xff];
        assert!(typed_message_len(&neg, 100).is_err());
    }

    #[test]
    fn cstr() {
        let b = b"ab\0c\0";
        let mut p = 0;
        assert_eq!(read_cstr(b, &mut p).unwrap(), b"ab");
        assert_eq!(read_cstr(b, &mut p).unwrap(), b"c");
        assert!(read_cstr(b, &mut p).is_err());
        let mut p = 0;
        assert!(read_cstr(b"abc", &mut p).is_err());
    }
}
