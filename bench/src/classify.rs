//! Names a failed connect or query with a short, stable key for the error counters: the SQLSTATE
//! when the server sent an ErrorResponse, otherwise the kind of failure (`io:ECONNREFUSED`,
//! `closed`, `timeout`, `tls`, …).

use std::error::Error as _;
use std::io;

/// Whether a failure leaves the connection usable. A server error (SQLSTATE) inside a healthy
/// session does; anything else (I/O, closed, protocol) means the connection must be replaced.
pub fn connection_survives(e: &tokio_postgres::Error) -> bool {
    e.as_db_error().is_some() && !e.is_closed()
}

pub fn pg_error(e: &tokio_postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return db.code().code().to_string();
    }
    if e.is_closed() {
        return "closed".into();
    }
    let mut source = e.source();
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<io::Error>() {
            return io_error(io);
        }
        source = s.source();
    }
    // tokio-postgres keeps its error kinds private; its messages are stable enough to bucket.
    let text = e.to_string();
    let kind = if text.contains("TLS") || text.contains("tls") {
        "tls"
    } else if text.contains("password") || text.contains("authentication") {
        "auth"
    } else if text.contains("unexpected message") || text.contains("parsing") {
        "protocol"
    } else {
        "other"
    };
    kind.into()
}

pub fn io_error(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(code) => format!("io:{}", errno_name(code)),
        None => match e.kind() {
            io::ErrorKind::UnexpectedEof => "io:eof".into(),
            io::ErrorKind::TimedOut => "timeout".into(),
            kind => format!("io:{kind:?}"),
        },
    }
}

fn errno_name(code: i32) -> String {
    let name = match code {
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EMFILE => "EMFILE",
        libc::ENFILE => "ENFILE",
        libc::ENOBUFS => "ENOBUFS",
        libc::ENOMEM => "ENOMEM",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EPIPE => "EPIPE",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EAGAIN => "EAGAIN",
        _ => return format!("errno{code}"),
    };
    name.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_errors_are_named_by_errno() {
        let e = io::Error::from_raw_os_error(libc::ECONNREFUSED);
        assert_eq!(io_error(&e), "io:ECONNREFUSED");
        let e = io::Error::from_raw_os_error(9999);
        assert_eq!(io_error(&e), "io:errno9999");
        let e = io::Error::new(io::ErrorKind::UnexpectedEof, "x");
        assert_eq!(io_error(&e), "io:eof");
    }
}
