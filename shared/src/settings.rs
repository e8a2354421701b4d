//! A session's settings (GUCs): what the gateway keeps per session and the pooler brings a
//! backend to before running that session's work there.

use crate::protocol::{put_cstr, read_cstr, ProtocolError};

/// Settings sorted by lower-cased name (GUC names are case-insensitive).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Settings(Vec<(String, String)>);

impl Settings {
    pub fn from_pairs<K: AsRef<str>, V: AsRef<str>>(
        pairs: impl IntoIterator<Item = (K, V)>,
    ) -> Self {
        let mut s = Settings::default();
        for (k, v) in pairs {
            s.set(k.as_ref(), v.as_ref());
        }
        s
    }

    pub fn set(&mut self, name: &str, value: &str) {
        let name = name.to_ascii_lowercase();
        match self.0.binary_search_by(|(k, _)| k.as_str().cmp(&name)) {
            Ok(i) => self.0[i].1 = value.to_owned(),
            Err(i) => self.0.insert(i, (name, value.to_owned())),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.0
            .binary_search_by(|(k, _)| k.as_str().cmp(&name))
            .ok()
            .map(|i| self.0[i].1.as_str())
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// `base` overlaid with `self`: what a session wants after `RESET ALL` brought the backend
    /// back to its own defaults (the startup settings are the session's reset values in Postgres).
    pub fn overlay_on(&self, base: &Settings) -> Settings {
        let mut out = base.clone();
        for (k, v) in self.iter() {
            out.set(k, v);
        }
        out
    }

    /// SQL that takes a backend whose settings are `from` to `to`, or `None` if they are equal.
    /// `set_config` parses its value as the configuration file would, so list values such as
    /// `search_path` (`"$user", public`) round-trip exactly as `current_setting` printed them.
    pub fn diff_sql(from: &Settings, to: &Settings) -> Option<String> {
        let mut sets = Vec::new();
        let mut resets = Vec::new();
        for (k, v) in to.iter() {
            if from.get(k) != Some(v) {
                sets.push(format!(
                    "pg_catalog.set_config({}, {}, false)",
                    literal(k),
                    literal(v)
                ));
            }
        }
        for (k, _) in from.iter() {
            if to.get(k).is_none() {
                resets.push(format!("RESET {}", ident(k)));
            }
        }
        if sets.is_empty() && resets.is_empty() {
            return None;
        }
        let mut sql = String::new();
        if !sets.is_empty() {
            sql.push_str("SELECT ");
            sql.push_str(&sets.join(", "));
        }
        for r in resets {
            if !sql.is_empty() {
                sql.push_str("; ");
            }
            sql.push_str(&r);
        }
        Some(sql)
    }

    pub fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&(self.0.len() as u16).to_be_bytes());
        for (k, v) in &self.0 {
            put_cstr(out, k.as_bytes());
            put_cstr(out, v.as_bytes());
        }
    }

    pub fn decode(buf: &[u8]) -> Result<Settings, ProtocolError> {
        let n = buf
            .get(..2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
            .ok_or(ProtocolError::Malformed("settings"))?;
        let mut pos = 2;
        let mut s = Settings::default();
        for _ in 0..n {
            let k = crate::link::utf8(read_cstr(buf, &mut pos)?)?;
            let v = crate::link::utf8(read_cstr(buf, &mut pos)?)?;
            s.set(&k, &v);
        }
        Ok(s)
    }
}

/// An SQL string literal that reads the same whatever `standard_conforming_strings` says.
pub fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 3);
    out.push_str("E'");
    for c in s.chars() {
        match c {
            '\'' => out.push_str("''"),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// A quoted identifier.
pub fn ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn diff() {
        let a = Settings::from_pairs([("search_path", "\"$user\", public"), ("work_mem", "4MB")]);
        let b = Settings::from_pairs([("search_path", "a"), ("TimeZone", "UTC")]);
        let sql = Settings::diff_sql(&a, &b).unwrap();
        assert_eq!(
            sql,
            "SELECT pg_catalog.set_config(E'search_path', E'a', false), \
             pg_catalog.set_config(E'timezone', E'UTC', false); RESET \"work_mem\""
        );
        assert_eq!(Settings::diff_sql(&a, &a), None);
        let only_reset = Settings::diff_sql(&a, &Settings::default()).unwrap();
        assert_eq!(only_reset, "RESET \"search_path\"; RESET \"work_mem\"");
    }

    #[test]
    fn literal_escapes() {
        assert_eq!(literal("it's \\ ok"), "E'it''s \\\\ ok'");
        assert_eq!(ident("a\"b"), "\"a\"\"b\"");
    }

    #[test]
    fn encode_decode() {
        let a = Settings::from_pairs([("b", "2"), ("A", "1")]);
        assert_eq!(a.iter().next(), Some(("a", "1")));
        let mut buf = Vec::new();
        a.encode(&mut buf);
        assert_eq!(Settings::decode(&buf).unwrap(), a);
        assert!(Settings::decode(&buf[..buf.len() - 1]).is_err());
        assert_eq!(
            a.overlay_on(&Settings::from_pairs([("c", "3"), ("a", "0")]))
                .len(),
            3
        );
    }
}
