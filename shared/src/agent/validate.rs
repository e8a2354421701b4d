//! Every value that crosses the agent protocol, checked before anyone acts on it: an
//! authenticated peer can still be buggy, and a term or a host name ends up in a persisted
//! pledge, in `postgresql.auto.conf` and in a conninfo string.

use super::{Report, Request, Upstream};

/// The highest term either side accepts. A term is taken once per failover: four billion is
/// beyond any cluster's life, and far enough from `u64::MAX` that no sum overflows.
pub const MAX_TERM: u64 = u32::MAX as u64;

/// Longest `synchronous_standby_names` accepted (a policy over dozens of nodes fits).
pub const MAX_SYNC_NAMES: usize = 4096;

/// Longest host accepted: a DNS name (253) or a Unix socket directory (`sun_path` is 108).
pub const MAX_HOST: usize = 253;

pub fn term(t: u64) -> Result<(), String> {
    if t > MAX_TERM {
        return Err(format!("term {t} is above the highest term {MAX_TERM}"));
    }
    Ok(())
}

/// The term after `highest` (the highest seen anywhere), or `None` when terms are used up.
pub fn next_term(highest: u64) -> Option<u64> {
    highest.checked_add(1).filter(|t| *t <= MAX_TERM)
}

/// An IP address, a DNS name (letters, digits, `-`, `.`), or an absolute Unix socket
/// directory of plain characters: nothing that can close a quote, start a new line or
/// escape in a conninfo string or a configuration file.
pub fn host(h: &str) -> Result<(), String> {
    let bad = || {
        Err(format!(
            "{h:?} is not a host name, an IP address or a socket directory"
        ))
    };
    if h.is_empty() || h.len() > MAX_HOST {
        return bad();
    }
    if h.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    if let Some(path) = h.strip_prefix('/') {
        let plain = path
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'.' | b'_' | b'-'));
        return if plain && h.len() < 108 && !path.split('/').any(|c| c == "..") {
            Ok(())
        } else {
            bad()
        };
    }
    let labels_ok = h.trim_end_matches('.').split('.').all(|l| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    });
    if labels_ok {
        Ok(())
    } else {
        bad()
    }
}

pub fn upstream(u: &Upstream) -> Result<(), String> {
    host(&u.host)?;
    if u.port == 0 {
        return Err("port 0".into());
    }
    Ok(())
}

/// Postgres checks the syntax itself (ALTER SYSTEM runs its check hook); this keeps out
/// what must never reach a configuration file at all.
pub fn sync_names(s: &str) -> Result<(), String> {
    if s.len() > MAX_SYNC_NAMES {
        return Err(format!(
            "synchronous_standby_names longer than {MAX_SYNC_NAMES} bytes"
        ));
    }
    if let Some(c) = s
        .chars()
        .find(|c| c.is_control() || matches!(c, '\'' | '\\'))
    {
        return Err(format!(
            "synchronous_standby_names holds {c:?} (no quote, backslash or control character)"
        ));
    }
    Ok(())
}

impl Request {
    /// Whether every value in the request is one the agent may act on.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Request::Report => Ok(()),
            Request::Recruit { term: t } => term(*t),
            Request::Promote {
                term: t,
                sync_names: s,
            }
            | Request::SetSync {
                term: t,
                sync_names: s,
            } => term(*t).and_then(|_| sync_names(s)),
            Request::Follow {
                term: t,
                primary: u,
            } => term(*t).and_then(|_| upstream(u)),
        }
    }
}

impl Report {
    /// What the control relies on in a report: terms it may add to.
    pub fn validate(&self) -> Result<(), String> {
        term(self.term)?;
        term(self.primary_term)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts() {
        for ok in [
            "127.0.0.1",
            "::1",
            "db-1.example.com",
            "localhost",
            "/tmp/tidepool-x/run",
            "node2.",
        ] {
            assert!(host(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "x' port=1",
            "x\nrestore_command='rm -rf /'",
            "a\\b",
            "-lead",
            "/tmp/../etc",
            "/tmp/with space",
            "h\"",
            "a..b",
            &"a".repeat(300),
        ] {
            assert!(host(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn terms_and_next_term() {
        assert!(term(MAX_TERM).is_ok());
        assert!(term(MAX_TERM + 1).is_err());
        assert!(term(u64::MAX).is_err());
        assert_eq!(next_term(0), Some(1));
        assert_eq!(next_term(MAX_TERM), None);
        assert_eq!(next_term(u64::MAX), None);
    }

    #[test]
    fn sync_names_keep_out_quotes_and_newlines() {
        assert!(sync_names(r#"ANY 1 ("b", "c")"#).is_ok());
        assert!(sync_names("\"tidepool_fenced\"").is_ok());
        assert!(sync_names("").is_ok());
        assert!(sync_names("a'\nprimary_conninfo='host=evil'").is_err());
        assert!(sync_names("a\\").is_err());
        assert!(sync_names(&"a".repeat(MAX_SYNC_NAMES + 1)).is_err());
    }

    #[test]
    fn requests() {
        let follow = |h: &str, port| Request::Follow {
            term: 2,
            primary: Upstream {
                host: h.into(),
                port,
            },
        };
        assert!(follow("127.0.0.1", 5433).validate().is_ok());
        assert!(follow("127.0.0.1", 0).validate().is_err());
        assert!(follow("evil'\n", 5433).validate().is_err());
        assert!(Request::Recruit { term: u64::MAX }.validate().is_err());
    }
}
