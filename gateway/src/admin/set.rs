//! `SET key = value`: PgBouncer's form read, and one key of the gateway's config changed in
//! place (published to every core by the caller, `main.rs`).

use crate::config::{AuthMethod, Config};

/// `SET key = value` (or `TO`), PgBouncer's form: the key as a name, the value a bare word or
/// a single-quoted string. `None`: not a SET; `Err`: the message of a 42601.
pub fn parse(text: &str) -> Option<Result<(String, String), String>> {
    let t = text.trim().trim_end_matches(';').trim();
    let rest = t
        .get(..3)
        .filter(|v| v.eq_ignore_ascii_case("set"))
        .and_then(|_| t.get(3..))
        .filter(|r| r.starts_with(char::is_whitespace))?;
    let rest = rest.trim_start();
    let key_end = rest
        .find(|c: char| c.is_whitespace() || c == '=')
        .unwrap_or(rest.len());
    let key = rest[..key_end].to_ascii_lowercase();
    let mut value = rest[key_end..].trim_start();
    if let Some(v) = value.strip_prefix('=') {
        value = v;
    } else if value.len() >= 2 && value[..2].eq_ignore_ascii_case("to") {
        value = &value[2..];
    } else {
        return Some(Err(format!("invalid command '{t}': SET key = value")));
    }
    let value = value.trim();
    if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Some(Err(format!("invalid configuration key in '{t}'")));
    }
    let value = if let Some(inner) = value.strip_prefix('\'') {
        match inner.strip_suffix('\'') {
            Some(v) if !v.replace("''", "").contains('\'') => v.replace("''", "'"),
            _ => return Some(Err(format!("unterminated quoted value in '{t}'"))),
        }
    } else if !value.is_empty() && !value.contains(char::is_whitespace) && !value.contains('\'') {
        value.to_owned()
    } else {
        return Some(Err(format!("invalid value in '{t}': quote it ('...')")));
    };
    Some(Ok((key, value)))
}

impl Config {
    /// The admin console's `SET key = value`: `key` changed in place, for the keys a reload
    /// applies that are a single value (the files behind `hba_file` and `tls_*` are read by a
    /// RELOAD). `Err` is (SQLSTATE, message). The file is not written: the next reload puts
    /// the file's value back, as in PgBouncer.
    pub fn set(&mut self, key: &str, value: &str) -> Result<(), (&'static str, String)> {
        fn num<T: std::str::FromStr>(key: &str, v: &str) -> Result<T, (&'static str, String)> {
            v.parse()
                .map_err(|_| ("22023", format!("invalid value for {key}: {v:?}")))
        }
        match key {
            "max_clients" => self.max_clients = num(key, value)?,
            "max_message_size" => self.max_message_size = num(key, value)?,
            "failover_hold_ms" => self.failover_hold_ms = num(key, value)?,
            "failover_hold_max" => self.failover_hold_max = num(key, value)?,
            "max_standby_lag_bytes" => self.max_standby_lag_bytes = num(key, value)?,
            "max_user_clients" => self.max_user_clients = num(key, value)?,
            "max_db_clients" => self.max_db_clients = num(key, value)?,
            "auth_timeout_seconds" => self.auth_timeout_seconds = num(key, value)?,
            "shutdown_timeout_ms" => self.shutdown_timeout_ms = num(key, value)?,
            "client_idle_timeout_ms" => self.client_idle_timeout_ms = num(key, value)?,
            "idle_transaction_timeout_ms" => self.idle_transaction_timeout_ms = num(key, value)?,
            "auth_method" => {
                self.auth_method = match value {
                    "scram-sha-256" => AuthMethod::Scram,
                    "md5" => AuthMethod::Md5,
                    "trust" => AuthMethod::Trust,
                    other => {
                        return Err((
                            "22023",
                            format!(
                            "invalid value for auth_method: {other:?} (scram-sha-256, md5, trust)"
                        ),
                        ))
                    }
                }
            }
            "log_level" => {
                shared::logging::set_level(value).map_err(|e| ("22023", e))?;
                self.log_level = value.to_owned();
            }
            "admin_users" => {
                let users: Vec<String> = value
                    .split(',')
                    .map(|u| u.trim().to_owned())
                    .filter(|u| !u.is_empty())
                    .collect();
                if users.is_empty() {
                    // The console would lock everyone out, this session's user included.
                    return Err(("22023", "admin_users cannot be empty".into()));
                }
                self.admin_users = users;
            }
            k if Config::LIVE_KEYS.contains(&k) => {
                return Err((
                    "55P02",
                    format!("{k} is changed by RELOAD (its file is read then)"),
                ))
            }
            k if Config::ALL_KEYS.contains(&k) => {
                return Err(("55P02", format!("{k} cannot be changed without a restart")))
            }
            k => {
                return Err((
                    "42704",
                    format!("unrecognized configuration parameter \"{k}\""),
                ))
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set_commands() {
        let s = |t: &str| parse(t).unwrap();
        assert_eq!(
            s("SET max_clients = 5").unwrap(),
            ("max_clients".into(), "5".into())
        );
        assert_eq!(
            s("set Log_Level='debug';").unwrap(),
            ("log_level".into(), "debug".into())
        );
        assert_eq!(
            s("SET admin_users TO 'a,b'").unwrap(),
            ("admin_users".into(), "a,b".into())
        );
        assert_eq!(s("SET x = 'it''s'").unwrap().1, "it's");
        assert!(parse("SHOW POOLS").is_none());
        assert!(parse("SETTINGS").is_none());
        for bad in [
            "SET",
            "SET x",
            "SET x = ",
            "SET x = a b",
            "SET x = 'a",
            "SET x-y = 1",
            "SET x = 'a'b'",
        ] {
            assert!(parse(bad).is_none_or(|r| r.is_err()), "{bad}");
        }
    }
}
