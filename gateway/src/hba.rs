//! Access rules by client address (`hba_file`): what Postgres's `pg_hba.conf` did before every
//! backend connected from the pooler's address. A subset of its format (hba.c `parse_hba_line`):
//!
//! ```text
//! # TYPE     DATABASE        USER            ADDRESS          METHOD
//! local      all             all                              scram-sha-256
//! hostssl    app,reports     +readers        10.0.0.0/8       scram-sha-256
//! host       all             alice           127.0.0.1 255.255.255.255  md5
//! hostnossl  all             all             all              reject
//! ```
//!
//! Types `local`, `host`, `hostssl`, `hostnossl`, `hostgssenc` (never matches: no GSSAPI
//! encryption here), `hostnogssenc`; databases `all`, `sameuser`, `samerole`/`samegroup`,
//! `replication` (matches nothing: replication is refused anyway), names; users `all`, names,
//! `+group` (member directly or not, a superuser not a member of everything, as in Postgres);
//! comma lists, double quotes (a quoted `"all"` is a name); addresses `all`, `a.b.c.d/n`,
//! IPv6 likewise, or an address and a mask; methods `trust`, `reject`, `md5`, `password`,
//! `scram-sha-256`. The first rule that matches decides; none: refused as Postgres refuses.
//! Anything else (`@file`, host names, `samehost`, `peer`, `cert`, options) is an error that
//! names the line, at start (the gateway does not start) and on reload (the old rules stay).

use std::fmt;
use std::net::IpAddr;
use std::path::Path;

/// How the client reached the gateway.
#[derive(Clone, Copy, Debug)]
pub enum Transport {
    /// The gateway's Unix socket.
    Local,
    Tcp {
        addr: IpAddr,
        tls: bool,
    },
}

impl Transport {
    /// The host as Postgres's errors name it.
    pub fn host(&self) -> String {
        match self {
            Transport::Local => "[local]".into(),
            Transport::Tcp { addr, .. } => addr.to_string(),
        }
    }

    /// The end of Postgres's "no pg_hba.conf entry" message (auth.c, PG 14+).
    pub fn encryption(&self) -> &'static str {
        match self {
            Transport::Tcp { tls: true, .. } => "SSL encryption",
            _ => "no encryption",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    Trust,
    Reject,
    Md5,
    Password,
    Scram,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Local,
    Host,
    HostSsl,
    HostNoSsl,
    HostGssEnc,
}

/// One name of a database or user list.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Name {
    All,
    SameUser,
    SameRole,
    Replication,
    Group(String),
    Literal(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Address {
    All,
    Net { addr: IpAddr, prefix: u8 },
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    line: usize,
    kind: Kind,
    databases: Vec<Name>,
    users: Vec<Name>,
    address: Option<Address>,
    method: Method,
}

/// The rules of one file, in order.
#[derive(Clone, PartialEq, Eq)]
pub struct Rules {
    rules: Vec<Rule>,
    groups: bool,
}

/// Compared by reload (changed or not), printed in logs as a count, not the rules.
impl fmt::Debug for Rules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Rules({} lines, hash {:x})", self.rules.len(), {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            format!("{:?}", self.rules).hash(&mut h);
            h.finish()
        })
    }
}

/// Who is logging in, as the rules see it.
pub struct Login<'a> {
    pub transport: Transport,
    pub user: &'a str,
    pub database: &'a str,
    /// The roles the user is a member of (itself included); `None` when not known, then a
    /// `+group` cannot match (callers look the role up first when [`Rules::uses_groups`]).
    pub member_of: Option<&'a [String]>,
}

impl Rules {
    pub fn load(path: &Path) -> Result<Rules, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("reading {}: {e}", path.display()))?;
        Rules::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }

    pub fn parse(text: &str) -> Result<Rules, String> {
        let mut rules = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let fields = fields(line).map_err(|e| format!("line {}: {e}", i + 1))?;
            if fields.is_empty() {
                continue;
            }
            rules.push(rule(i + 1, fields).map_err(|e| format!("line {}: {e}", i + 1))?);
        }
        let groups = rules
            .iter()
            .any(|r| r.users.iter().any(|u| matches!(u, Name::Group(_))));
        Ok(Rules { rules, groups })
    }

    /// Some rule names a `+group`: matching needs the role's memberships.
    pub fn uses_groups(&self) -> bool {
        self.groups
    }

    /// The method of the first rule that matches; `None`: no rule does.
    pub fn method(&self, login: &Login) -> Option<Method> {
        let rule = self.rules.iter().find(|r| r.matches(login))?;
        tracing::debug!(line = rule.line, method = ?rule.method, "access rule matched");
        Some(rule.method)
    }
}

impl Rule {
    fn matches(&self, l: &Login) -> bool {
        let transport = match (self.kind, l.transport) {
            (Kind::Local, Transport::Local) => true,
            (Kind::Host, Transport::Tcp { .. }) => true,
            (Kind::HostSsl, Transport::Tcp { tls, .. }) => tls,
            (Kind::HostNoSsl, Transport::Tcp { tls, .. }) => !tls,
            _ => false,
        };
        if !transport {
            return false;
        }
        let address = match (&self.address, l.transport) {
            (None | Some(Address::All), _) => true,
            (Some(Address::Net { addr, prefix }), Transport::Tcp { addr: client, .. }) => {
                in_net(client, *addr, *prefix)
            }
            (Some(_), Transport::Local) => false,
        };
        let member = |role: &str| l.member_of.is_some_and(|m| m.iter().any(|g| g == role));
        let database = self.databases.iter().any(|d| match d {
            Name::All => true,
            Name::SameUser => l.database == l.user,
            Name::SameRole => member(l.database),
            Name::Replication => false,
            Name::Group(_) => false,
            Name::Literal(n) => n == l.database,
        });
        let user = self.users.iter().any(|u| match u {
            Name::All => true,
            Name::Group(g) => member(g),
            Name::Literal(n) => n == l.user,
            _ => false,
        });
        address && database && user
    }
}

fn in_net(client: IpAddr, net: IpAddr, prefix: u8) -> bool {
    match (client, net) {
        (IpAddr::V4(c), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - prefix as u32).unwrap_or(0);
            u32::from(c) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(c), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - prefix as u32).unwrap_or(0);
            u128::from(c) & mask == u128::from(n) & mask
        }
        // Postgres compares only addresses of the same family (hba.c `check_ip`).
        _ => false,
    }
}

/// One field: its comma-separated items, each with whether it was quoted.
type Field = Vec<(String, bool)>;

/// Splits a line into fields as hba.c `next_field_expand` does: blanks separate fields, a
/// comma continues the field (blanks after it allowed), `"` quotes, `#` outside quotes starts
/// a comment.
fn fields(line: &str) -> Result<Vec<Field>, String> {
    let mut out: Vec<Field> = Vec::new();
    let mut chars = line.chars().peekable();
    let mut continuing = false;
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        match chars.peek() {
            None | Some('#') => break,
            _ => {}
        }
        let mut item = String::new();
        let mut quoted = false;
        let mut in_quotes = false;
        let mut comma = false;
        while let Some(&c) = chars.peek() {
            if in_quotes {
                chars.next();
                if c == '"' {
                    in_quotes = false;
                } else {
                    item.push(c);
                }
                continue;
            }
            if c.is_whitespace() || c == '#' {
                break;
            }
            chars.next();
            match c {
                '"' => {
                    in_quotes = true;
                    quoted = true;
                }
                ',' => {
                    comma = true;
                    break;
                }
                c => item.push(c),
            }
        }
        if in_quotes {
            return Err("unterminated quoted string".into());
        }
        if continuing {
            if let Some(f) = out.last_mut() {
                f.push((item, quoted));
            }
        } else {
            out.push(vec![(item, quoted)]);
        }
        continuing = comma;
    }
    if continuing {
        return Err("a list ends with a comma".into());
    }
    Ok(out)
}

fn rule(line: usize, fields: Vec<Field>) -> Result<Rule, String> {
    let mut it = fields.into_iter();
    let mut single = |what: &str| -> Result<(String, bool), String> {
        let f = it
            .next()
            .ok_or(format!("end of line before the {what} field"))?;
        match <[(String, bool); 1]>::try_from(f) {
            Ok([one]) => Ok(one),
            Err(_) => Err(format!("the {what} field takes one value, not a list")),
        }
    };
    let kind = match single("connection type")?.0.as_str() {
        "local" => Kind::Local,
        "host" | "hostnogssenc" => Kind::Host,
        "hostssl" => Kind::HostSsl,
        "hostnossl" => Kind::HostNoSsl,
        "hostgssenc" => Kind::HostGssEnc,
        other => return Err(format!("invalid connection type {other:?}")),
    };
    let databases = names(it.next(), "database", false)?;
    let users = names(it.next(), "user", true)?;
    let rest: Vec<Field> = it.collect();
    let mut rest = rest.into_iter();
    let mut take = |what: &str| -> Result<String, String> {
        let f = rest
            .next()
            .ok_or(format!("end of line before the {what} field"))?;
        match <[(String, bool); 1]>::try_from(f) {
            Ok([(v, _)]) => Ok(v),
            Err(_) => Err(format!("the {what} field takes one value, not a list")),
        }
    };
    let address = if kind == Kind::Local {
        None
    } else {
        let a = take("address")?;
        Some(match a.as_str() {
            "all" => Address::All,
            "samehost" | "samenet" => {
                return Err(format!("{a} is not supported here; write the address"))
            }
            _ => match a.split_once('/') {
                Some((ip, len)) => {
                    let addr: IpAddr = ip.parse().map_err(|_| {
                        format!("invalid IP address {ip:?} (host names are not supported)")
                    })?;
                    let max = if addr.is_ipv4() { 32 } else { 128 };
                    let prefix = len
                        .parse::<u8>()
                        .ok()
                        .filter(|p| *p <= max)
                        .ok_or(format!("invalid CIDR mask in address {a:?}"))?;
                    Address::Net { addr, prefix }
                }
                None => {
                    let addr: IpAddr = a.parse().map_err(|_| {
                        format!("invalid IP address {a:?} (host names are not supported)")
                    })?;
                    let mask = take("IP mask")?;
                    let mask: IpAddr = mask
                        .parse()
                        .map_err(|_| format!("invalid IP mask {mask:?}"))?;
                    Address::Net {
                        addr,
                        prefix: prefix_of(addr, mask)?,
                    }
                }
            },
        })
    };
    let method = match take("authentication method")?.as_str() {
        "trust" => Method::Trust,
        "reject" => Method::Reject,
        "md5" => Method::Md5,
        "password" => Method::Password,
        "scram-sha-256" => Method::Scram,
        other => {
            return Err(format!(
                "authentication method {other:?} is not supported (trust, reject, md5, password, scram-sha-256)"
            ))
        }
    };
    if let Some(extra) = rest.next() {
        return Err(format!(
            "authentication options are not supported ({:?})",
            extra.first().map(|(v, _)| v.as_str()).unwrap_or("")
        ));
    }
    Ok(Rule {
        line,
        kind,
        databases,
        users,
        address,
        method,
    })
}

fn names(field: Option<Field>, what: &str, user: bool) -> Result<Vec<Name>, String> {
    let field = field.ok_or(format!("end of line before the {what} field"))?;
    field
        .into_iter()
        .map(|(v, quoted)| {
            if v.is_empty() {
                return Err(format!("empty {what} name"));
            }
            if quoted {
                return Ok(Name::Literal(v));
            }
            Ok(match v.as_str() {
                "all" => Name::All,
                "sameuser" if !user => Name::SameUser,
                "samerole" | "samegroup" if !user => Name::SameRole,
                "replication" if !user => Name::Replication,
                _ if v.starts_with('@') => {
                    return Err(format!("{what} list files ({v}) are not supported"))
                }
                _ if user && v.starts_with('+') => Name::Group(v[1..].to_owned()),
                _ => Name::Literal(v),
            })
        })
        .collect()
}

/// The prefix length of a netmask written as an address (`255.255.0.0` → 16).
fn prefix_of(addr: IpAddr, mask: IpAddr) -> Result<u8, String> {
    let (bits, width) = match (addr, mask) {
        (IpAddr::V4(_), IpAddr::V4(m)) => (u32::from(m) as u128, 32),
        (IpAddr::V6(_), IpAddr::V6(m)) => (u128::from(m), 128),
        _ => return Err("IP address and mask do not match".into()),
    };
    let ones = if width == 32 {
        (bits as u32).leading_ones()
    } else {
        bits.leading_ones()
    };
    let canonical = if ones == 0 {
        0
    } else if width == 32 {
        (u32::MAX << (32 - ones)) as u128
    } else {
        u128::MAX << (128 - ones)
    };
    if bits != canonical {
        return Err(format!("invalid IP mask {mask}"));
    }
    Ok(ones as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tcp(ip: &str, tls: bool) -> Transport {
        Transport::Tcp {
            addr: ip.parse().unwrap(),
            tls,
        }
    }

    fn login<'a>(t: Transport, user: &'a str, db: &'a str, m: &'a [String]) -> Login<'a> {
        Login {
            transport: t,
            user,
            database: db,
            member_of: Some(m),
        }
    }

    #[test]
    fn first_match_wins_over_types_addresses_names_and_groups() {
        let rules = Rules::parse(
            "# comment\n\
             \n\
             local   all   all   trust\n\
             hostssl app,\"all\"  +readers  10.0.0.0/8  scram-sha-256 # trailing\n\
             host    sameuser  alice, bob  127.0.0.1 255.255.255.255  password\n\
             hostnossl all  all  10.1.0.0/16  reject\n\
             host    all   all   ::1/128   md5\n\
             host    samerole  all  0.0.0.0/0  md5\n",
        )
        .unwrap();
        let none: Vec<String> = vec![];
        let readers = vec!["carol".to_string(), "readers".to_string()];
        let m = |t, u, d, g| rules.method(&login(t, u, d, g));
        assert_eq!(m(Transport::Local, "x", "y", &none), Some(Method::Trust));
        assert_eq!(
            m(tcp("10.1.2.3", true), "carol", "app", &readers),
            Some(Method::Scram)
        );
        // Quoted "all" is a database named all, not every database.
        assert_eq!(
            m(tcp("10.1.2.3", true), "carol", "all", &readers),
            Some(Method::Scram)
        );
        assert_eq!(m(tcp("10.1.2.3", true), "carol", "other", &readers), None);
        // Not over TLS: hostnossl reject.
        assert_eq!(
            m(tcp("10.1.2.3", false), "carol", "app", &readers),
            Some(Method::Reject)
        );
        assert_eq!(m(tcp("10.2.0.1", true), "dave", "app", &none), None);
        assert_eq!(
            m(tcp("127.0.0.1", false), "bob", "bob", &none),
            Some(Method::Password)
        );
        assert_eq!(m(tcp("127.0.0.1", false), "bob", "app", &none), None);
        assert_eq!(m(tcp("127.0.0.2", false), "bob", "bob", &none), None);
        assert_eq!(m(tcp("::1", false), "x", "y", &none), Some(Method::Md5));
        assert_eq!(
            m(tcp("192.168.1.1", false), "carol", "readers", &readers),
            Some(Method::Md5)
        );
        // Group unknown (role not looked up): a +group does not match.
        let unknown = Login {
            transport: tcp("10.1.2.3", true),
            user: "carol",
            database: "app",
            member_of: None,
        };
        assert_eq!(rules.method(&unknown), None);
        assert!(rules.uses_groups());
        assert!(!Rules::parse("host all all all md5").unwrap().uses_groups());
    }

    #[test]
    fn malformed_files_name_their_line() {
        for (text, want) in [
            (
                "host all all",
                "line 1: end of line before the address field",
            ),
            (
                "local all all\n",
                "line 1: end of line before the authentication method",
            ),
            (
                "\nhost all all 10.0.0.0/33 md5",
                "line 2: invalid CIDR mask",
            ),
            ("host all all example.com md5", "line 1: invalid IP address"),
            (
                "host all all 10.0.0.1 255.0.255.0 md5",
                "line 1: invalid IP mask",
            ),
            (
                "host all all all peer",
                "line 1: authentication method \"peer\"",
            ),
            (
                "hostssl all all all md5 clientcert=verify-full",
                "line 1: authentication options",
            ),
            ("hots all all all md5", "line 1: invalid connection type"),
            ("host all @admins all md5", "line 1: user list files"),
            ("host all \"alice all all md5", "line 1: unterminated"),
            ("host all alice, all md5", "line 1: "),
            (
                "host all all samenet md5",
                "line 1: samenet is not supported",
            ),
        ] {
            let e = Rules::parse(text).unwrap_err();
            assert!(e.starts_with(want), "{text:?}: {e}");
        }
        assert_eq!(
            prefix_of("10.0.0.0".parse().unwrap(), "255.255.0.0".parse().unwrap()),
            Ok(16)
        );
        assert_eq!(
            prefix_of("10.0.0.0".parse().unwrap(), "0.0.0.0".parse().unwrap()),
            Ok(0)
        );
    }
}
