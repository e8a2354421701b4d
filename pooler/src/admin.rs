//! The admin connection: reads a role's verifier from `pg_authid` for the gateway's
//! authentication. Over Postgres's Unix socket as a superuser role (peer authentication), one
//! per core, one lookup at a time, results cached for a few seconds.

use crate::config::Config;
use crate::login;
use futures_lite::AsyncWriteExt;
use glommio::net::UnixStream;
use shared::io::{MessageReader, Notify};
use shared::link::Credential;
use shared::protocol::backend as be;
use shared::protocol::{frontend, read_i16, read_i32, typed_message_len};
use shared::settings::literal;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// What `pg_authid` says of a role.
#[derive(Clone, Debug)]
pub enum RoleSecret {
    /// No such role, no password, or the password expired: authentication must fail.
    Absent,
    Verifier(String),
}

pub struct Admin {
    cfg: Rc<Config>,
    conn: RefCell<Option<(UnixStream, MessageReader)>>,
    busy: Cell<bool>,
    free: Notify,
    cache: RefCell<HashMap<String, (Instant, RoleSecret)>>,
}

impl Admin {
    pub fn new(cfg: Rc<Config>) -> Self {
        Admin {
            cfg,
            conn: RefCell::new(None),
            busy: Cell::new(false),
            free: Notify::default(),
            cache: RefCell::new(HashMap::new()),
        }
    }

    pub async fn lookup(&self, user: &str) -> Result<RoleSecret, String> {
        let ttl = Duration::from_secs(self.cfg.auth_cache_seconds);
        if let Some((at, v)) = self.cache.borrow().get(user) {
            if at.elapsed() < ttl {
                return Ok(v.clone());
            }
        }
        while self.busy.get() {
            self.free.notified().await;
        }
        self.busy.set(true);
        let r = self.lookup_uncached(user).await;
        self.busy.set(false);
        self.free.notify();
        // Only verifiers are cached: a role created a moment ago must be able to log in now.
        if let Ok(v @ RoleSecret::Verifier(_)) = &r {
            let mut c = self.cache.borrow_mut();
            if c.len() > 10_000 {
                c.clear();
            }
            c.insert(user.to_owned(), (Instant::now(), v.clone()));
        }
        r
    }

    async fn lookup_uncached(&self, user: &str) -> Result<RoleSecret, String> {
        let sql = format!(
            "SELECT rolpassword, (rolvaliduntil IS NOT NULL AND rolvaliduntil < now())::text \
             FROM pg_catalog.pg_authid WHERE rolname = {}",
            literal(user)
        );
        // One retry on a fresh connection: the old one may have died with a Postgres restart.
        for attempt in 0..2 {
            if self.conn.borrow().is_none() {
                *self.conn.borrow_mut() = Some(self.connect().await?);
            }
            let Some((mut stream, mut reader)) = self.conn.borrow_mut().take() else {
                continue;
            };
            match query(&mut stream, &mut reader, &sql, self.cfg.max_message_size).await {
                Ok(r) => {
                    *self.conn.borrow_mut() = Some((stream, reader));
                    return Ok(r);
                }
                Err(e) if attempt == 1 => return Err(e),
                Err(_) => {}
            }
        }
        Err("admin connection failed".into())
    }

    async fn connect(&self) -> Result<(UnixStream, MessageReader), String> {
        let path = format!(
            "{}/.s.PGSQL.{}",
            self.cfg.admin_socket_dir, self.cfg.pg_port
        );
        let mut stream = UnixStream::connect(&path)
            .await
            .map_err(|e| format!("admin connection to {path}: {e}"))?;
        let logged = login::login(
            &mut stream,
            &self.cfg.admin_user,
            "postgres",
            &Credential::None,
            self.cfg.max_message_size,
        )
        .await
        .map_err(|e| match e {
            login::LoginError::Postgres(m) => format!(
                "admin login as {} refused: {}",
                self.cfg.admin_user,
                String::from_utf8_lossy(&m)
            ),
            login::LoginError::Other(s) => s,
        })?;
        let mut reader = MessageReader::new(1024);
        reader.push_bytes(&logged.leftover);
        Ok((stream, reader))
    }
}

async fn query(
    stream: &mut UnixStream,
    reader: &mut MessageReader,
    sql: &str,
    max: usize,
) -> Result<RoleSecret, String> {
    let mut q = Vec::new();
    frontend::query(&mut q, sql);
    stream.write_all(&q).await.map_err(|e| e.to_string())?;
    let mut result = RoleSecret::Absent;
    let mut error = None;
    loop {
        let n = match typed_message_len(reader.data(), max) {
            Ok(Some(n)) => n,
            Ok(None) => {
                if reader.fill(stream, 0).await.map_err(|e| e.to_string())? == 0 {
                    return Err("admin connection closed".into());
                }
                continue;
            }
            Err(e) => return Err(e.to_string()),
        };
        let msg = reader.data()[..n].to_vec();
        reader.consume(n);
        match msg[0] {
            be::DATA_ROW => result = role_row(&msg[5..]).unwrap_or(RoleSecret::Absent),
            be::ERROR_RESPONSE => error = Some(String::from_utf8_lossy(&msg[5..]).into_owned()),
            be::READY_FOR_QUERY => {
                return match error {
                    Some(e) => Err(e),
                    None => Ok(result),
                }
            }
            _ => {}
        }
    }
}

fn role_row(body: &[u8]) -> Option<RoleSecret> {
    let mut pos = 0;
    if read_i16(body, &mut pos).ok()? != 2 {
        return None;
    }
    let mut col = || -> Option<Option<Vec<u8>>> {
        let len = read_i32(body, &mut pos).ok()?;
        if len < 0 {
            return Some(None);
        }
        let v = body.get(pos..pos + len as usize)?.to_vec();
        pos += len as usize;
        Some(Some(v))
    };
    let password = col()?;
    let expired = col()?;
    match (password, expired.as_deref()) {
        (Some(p), Some(b"false")) => Some(RoleSecret::Verifier(String::from_utf8(p).ok()?)),
        _ => Some(RoleSecret::Absent),
    }
}
