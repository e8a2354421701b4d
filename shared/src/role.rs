//! What the pooler tells a gateway of a role and a database at login (`AUTH_INFO`): the role's
//! verifier and the attributes Postgres checks when a backend starts (postinit.c
//! `InitializeSessionUserId` and `CheckMyDatabase`), which the gateway must now check itself
//! because it authenticates clients and pooled backends outlive a `REVOKE` or `NOLOGIN`.
//! One `pg_authid` row joined with one `pg_database` row, read in the same query.

/// A role as `pg_authid` describes it, with the database the client asked for.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct RoleInfo {
    /// `false`: no such role (every other field is empty).
    pub exists: bool,
    pub can_login: bool,
    pub superuser: bool,
    /// `rolvaliduntil` has passed: password authentication must fail.
    pub expired: bool,
    /// `rolconnlimit` (-1: none).
    pub conn_limit: i32,
    /// `rolpassword` (`None`: no password).
    pub password: Option<String>,
    /// The roles this one is a member of, directly or not, itself included (for `+group` in
    /// access rules; superusers are not members of everything here, as in `pg_hba`).
    pub member_of: Vec<String>,
    /// One of `member_of` (or the role itself) is a superuser: a session of this role can
    /// become one (`SET ROLE`), so it may signal any session (gateway/src/signals.rs).
    pub member_of_superuser: bool,
    /// `pg_authid.oid` (0: not known).
    pub oid: u32,
    /// The database asked for (`None`: it does not exist).
    pub database: Option<DatabaseInfo>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct DatabaseInfo {
    /// `datallowconn`.
    pub allow_connections: bool,
    /// `has_database_privilege(role, database, 'CONNECT')` (always true for superusers).
    pub connect: bool,
    /// `datconnlimit` (-1: none).
    pub conn_limit: i32,
}

const CAN_LOGIN: u8 = 1;
const SUPERUSER: u8 = 2;
const EXPIRED: u8 = 4;
const HAS_PASSWORD: u8 = 8;
const HAS_DATABASE: u8 = 16;
const ALLOW_CONNECTIONS: u8 = 32;
const CONNECT: u8 = 64;
const MEMBER_OF_SUPERUSER: u8 = 128;

impl RoleInfo {
    /// `u8 flags`, `i32 rolconnlimit`, `i32 datconnlimit`, `u32 oid`, `u16` count of groups,
    /// each `u16` length and name, then the password (the rest). No such role: the empty
    /// payload.
    pub fn encode(&self, out: &mut Vec<u8>) {
        if !self.exists {
            return;
        }
        let mut flags = 0;
        for (on, bit) in [
            (self.can_login, CAN_LOGIN),
            (self.superuser, SUPERUSER),
            (self.expired, EXPIRED),
            (self.password.is_some(), HAS_PASSWORD),
            (self.database.is_some(), HAS_DATABASE),
            (
                self.database.as_ref().is_some_and(|d| d.allow_connections),
                ALLOW_CONNECTIONS,
            ),
            (self.database.as_ref().is_some_and(|d| d.connect), CONNECT),
            (self.member_of_superuser, MEMBER_OF_SUPERUSER),
        ] {
            if on {
                flags |= bit;
            }
        }
        out.push(flags);
        out.extend_from_slice(&self.conn_limit.to_be_bytes());
        let db_limit = self.database.as_ref().map_or(-1, |d| d.conn_limit);
        out.extend_from_slice(&db_limit.to_be_bytes());
        out.extend_from_slice(&self.oid.to_be_bytes());
        let groups: Vec<&String> = self
            .member_of
            .iter()
            .filter(|g| g.len() <= u16::MAX as usize)
            .take(u16::MAX as usize)
            .collect();
        out.extend_from_slice(&(groups.len() as u16).to_be_bytes());
        for g in groups {
            out.extend_from_slice(&(g.len() as u16).to_be_bytes());
            out.extend_from_slice(g.as_bytes());
        }
        if let Some(p) = &self.password {
            out.extend_from_slice(p.as_bytes());
        }
    }

    /// `None` when the payload is malformed.
    pub fn decode(b: &[u8]) -> Option<RoleInfo> {
        if b.is_empty() {
            return Some(RoleInfo::default());
        }
        let flags = b[0];
        let i32_at = |at: usize| -> Option<i32> {
            Some(i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
        };
        let u16_at = |at: usize| -> Option<usize> {
            Some(u16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?) as usize)
        };
        let conn_limit = i32_at(1)?;
        let db_limit = i32_at(5)?;
        let oid = i32_at(9)? as u32;
        let n = u16_at(13)?;
        let mut at = 15;
        let mut member_of = Vec::with_capacity(n.min(64));
        for _ in 0..n {
            let len = u16_at(at)?;
            let name = b.get(at + 2..at + 2 + len)?;
            member_of.push(String::from_utf8(name.to_vec()).ok()?);
            at += 2 + len;
        }
        let rest = b.get(at..)?;
        let password = if flags & HAS_PASSWORD != 0 {
            Some(String::from_utf8(rest.to_vec()).ok()?)
        } else {
            None
        };
        Some(RoleInfo {
            exists: true,
            can_login: flags & CAN_LOGIN != 0,
            superuser: flags & SUPERUSER != 0,
            expired: flags & EXPIRED != 0,
            conn_limit,
            password,
            member_of,
            member_of_superuser: flags & MEMBER_OF_SUPERUSER != 0,
            oid,
            database: (flags & HAS_DATABASE != 0).then_some(DatabaseInfo {
                allow_connections: flags & ALLOW_CONNECTIONS != 0,
                connect: flags & CONNECT != 0,
                conn_limit: db_limit,
            }),
        })
    }
}

/// The `AUTH_LOOKUP` payload: `user`, NUL, `database`.
pub fn lookup_payload(user: &str, database: &str) -> Vec<u8> {
    let mut b = Vec::with_capacity(user.len() + database.len() + 1);
    b.extend_from_slice(user.as_bytes());
    b.push(0);
    b.extend_from_slice(database.as_bytes());
    b
}

/// `(user, database)` from an `AUTH_LOOKUP` payload (no NUL: no database).
pub fn parse_lookup(payload: &[u8]) -> (String, String) {
    let (u, d) = match payload.iter().position(|&c| c == 0) {
        Some(i) => (&payload[..i], &payload[i + 1..]),
        None => (payload, &[][..]),
    };
    (
        String::from_utf8_lossy(u).into_owned(),
        String::from_utf8_lossy(d).into_owned(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_truncations_are_refused() {
        let full = RoleInfo {
            exists: true,
            can_login: true,
            superuser: false,
            expired: true,
            conn_limit: 3,
            password: Some("SCRAM-SHA-256$4096:c2FsdA==$a:b".into()),
            member_of: vec!["alice".into(), "readers".into(), "héllo".into()],
            member_of_superuser: true,
            oid: 3_000_000_000,
            database: Some(DatabaseInfo {
                allow_connections: false,
                connect: true,
                conn_limit: -1,
            }),
        };
        for info in [
            full.clone(),
            RoleInfo::default(),
            RoleInfo {
                password: None,
                database: None,
                member_of: vec![],
                ..full.clone()
            },
            RoleInfo {
                password: Some(String::new()),
                ..full.clone()
            },
        ] {
            let mut b = Vec::new();
            info.encode(&mut b);
            assert_eq!(RoleInfo::decode(&b), Some(info.clone()));
        }
        let mut b = Vec::new();
        full.encode(&mut b);
        // Cut inside the header or a group name: refused, never a panic.
        for n in 1..30 {
            assert_eq!(RoleInfo::decode(&b[..n]), None, "{n}");
        }
        assert_eq!(
            parse_lookup(&lookup_payload("al\u{e9}", "db")),
            ("alé".into(), "db".into())
        );
        assert_eq!(parse_lookup(b"bob"), ("bob".into(), String::new()));
    }
}
