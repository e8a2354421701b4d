//! The admin console session: after the client authenticated (as any client) as one of
//! `admin_users` to `admin_database`, simple-query commands as PgBouncer's console takes them.
//! Nothing here runs on a client's request path.

use super::show;
use super::table::{command_complete, message};
use crate::core::{ClientSlot, Core};
use crate::registry::{state, NewClient, Registered};
use crate::session_io::SessionIo;
use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use shared::io::MessageReader;
use shared::link::{down, up, PoolFacts};
use shared::protocol::backend::{self as be, Severity};
use shared::protocol::frontend as fe;
use shared::protocol::typed_message_len;
use std::rc::Rc;
use std::time::{Duration, Instant};

/// Longest command text the console reads.
const MAX_COMMAND: usize = 64 * 1024;

/// Who logged in, and the keys it was given.
pub struct Login {
    pub user: String,
    pub database: String,
    pub application_name: String,
    pub peer: crate::core::Peer,
}

/// Runs the console until the client leaves, SHUTDOWN, or the process drains.
#[allow(clippy::too_many_arguments)]
pub async fn serve<S: AsyncRead + AsyncWrite + Unpin>(
    core: Rc<Core>,
    mut stream: S,
    mut reader: MessageReader,
    io: Rc<SessionIo>,
    id: u32,
    login: Login,
    // Counts the client for as long as the console serves it.
    _slot: ClientSlot,
) {
    let pid = (rand::random::<u32>() >> 1) as i32;
    let me: Registered = core.admin.register(NewClient {
        user: &login.user,
        database: &login.database,
        addr: login.peer.addr,
        local: login.peer.local,
        pid,
        application_name: &login.application_name,
    });
    let mut out = Vec::new();
    for (k, v) in [
        ("server_version", "15.0"),
        ("server_encoding", "UTF8"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO"),
        ("integer_datetimes", "on"),
        ("standard_conforming_strings", "on"),
        ("application_name", login.application_name.as_str()),
    ] {
        be::parameter_status(&mut out, k, v);
    }
    be::backend_key_data(&mut out, pid, rand::random());
    be::ready_for_query(&mut out, b'I');
    if stream.write_all(&out).await.is_err() {
        return;
    }
    tracing::info!(user = %login.user, "admin console session");
    loop {
        let data = reader.data();
        match typed_message_len(data, MAX_COMMAND) {
            Ok(Some(n)) => {
                let tag = data[0];
                let body = data[5..n].to_vec();
                reader.consume(n);
                let mut out = Vec::new();
                let end = match tag {
                    fe::TERMINATE => return,
                    fe::QUERY => {
                        me.client.set_state(state::ACTIVE);
                        me.client.requested();
                        let text = String::from_utf8_lossy(fe::query_text(&body)).into_owned();
                        let end = run(&core, &io, id, &text, &mut out).await;
                        be::ready_for_query(&mut out, b'I');
                        me.client.set_state(state::IDLE);
                        end
                    }
                    other => {
                        // PgBouncer's console speaks the simple protocol only.
                        be::error_response(
                            &mut out,
                            Severity::Fatal,
                            "08P01",
                            &format!(
                                "unsupported message type {:?} in the admin console (simple queries only)",
                                other as char
                            ),
                        );
                        true
                    }
                };
                if stream.write_all(&out).await.is_err() || end {
                    let _ = stream.flush().await;
                    return;
                }
            }
            Ok(None) => {
                let want = shared::protocol::pending_message_len(reader.data()).unwrap_or(0);
                let drain = core.drain_notify.listen();
                if core.draining.get() {
                    let mut e = Vec::new();
                    be::error_response(
                        &mut e,
                        Severity::Fatal,
                        "57P01",
                        "terminating connection due to administrator command",
                    );
                    let _ = stream.write_all(&e).await;
                    return;
                }
                let read = futures_lite::future::or(
                    async { Some(reader.fill(&mut stream, want).await) },
                    async {
                        drain.await;
                        None
                    },
                )
                .await;
                match read {
                    Some(Ok(n)) if n > 0 => {}
                    Some(_) => return,
                    None => {}
                }
            }
            Err(e) => {
                let mut out = Vec::new();
                be::error_response(
                    &mut out,
                    Severity::Fatal,
                    "08P01",
                    &format!("invalid message: {e}"),
                );
                let _ = stream.write_all(&out).await;
                return;
            }
        }
    }
}

/// A command as the console reads it: words, upper-cased but for the argument, which keeps
/// its case (a quoted name keeps everything between its quotes).
#[derive(Debug, PartialEq, Eq)]
pub struct Command {
    pub verb: String,
    pub arg: Option<String>,
}

/// Parses one command; `Err` is the message of a 42601.
pub fn parse(text: &str) -> Result<Option<Command>, String> {
    let t = text.trim().trim_end_matches(';').trim();
    if t.is_empty() {
        return Ok(None);
    }
    if t.contains(';') {
        return Err("the admin console takes one command at a time".into());
    }
    let mut words = t.split_whitespace();
    let verb = words.next().unwrap_or_default().to_ascii_uppercase();
    let rest: Vec<&str> = words.collect();
    let arg = match rest.as_slice() {
        [] => None,
        [one] => Some(name(one)?),
        _ => return Err(format!("invalid command '{t}', use SHOW HELP;")),
    };
    Ok(Some(Command { verb, arg }))
}

/// An identifier as Postgres reads one: folded to lower case unless double-quoted.
fn name(word: &str) -> Result<String, String> {
    if let Some(inner) = word.strip_prefix('"') {
        match inner.strip_suffix('"') {
            Some(n) if !n.is_empty() => Ok(n.replace("\"\"", "\"")),
            _ => Err(format!("unterminated or empty quoted name: {word}")),
        }
    } else if word
        .chars()
        .all(|c| c.is_alphanumeric() || c == '_' || c == '$' || c == '-' || c == '.')
    {
        Ok(word.to_lowercase())
    } else {
        Err(format!("invalid name: {word}"))
    }
}

fn error(out: &mut Vec<u8>, code: &str, msg: &str) {
    be::error_response(out, Severity::Error, code, msg);
}

fn notice(out: &mut Vec<u8>, msg: &str) {
    let mut b = Vec::new();
    for (f, v) in [
        (b'S', "NOTICE"),
        (b'V', "NOTICE"),
        (b'C', "00000"),
        (b'M', msg),
    ] {
        b.push(f);
        shared::protocol::put_cstr(&mut b, v.as_bytes());
    }
    b.push(0);
    message(out, b'N', &b);
}

pub const HELP: &str = "Console usage
\tSHOW HELP|POOLS|CLIENTS|SERVERS|STATS|CONFIG|NODES|LISTS|VERSION
\tSET key = arg
\tPAUSE [<db>]
\tSUSPEND
\tRESUME [<db>]
\tKILL [<db>]
\tWAIT_CLOSE [<db>]
\tRELOAD
\tSHUTDOWN";

/// Runs one command, appending its answer to `out`; true when the console should end.
async fn run(core: &Rc<Core>, io: &Rc<SessionIo>, id: u32, text: &str, out: &mut Vec<u8>) -> bool {
    if let Some(set) = super::set::parse(text) {
        match set {
            Err(e) => error(out, "42601", &e),
            Ok((key, value)) => match (core.admin.control.set)(&key, &value) {
                Ok(()) => {
                    // Every core takes the new config at its next lifecycle tick.
                    glommio::timer::sleep(shared::lifecycle::TICK * 2).await;
                    command_complete(out, "SET");
                }
                Err((code, msg)) => error(out, code, &msg),
            },
        }
        return false;
    }
    let cmd = match parse(text) {
        Ok(Some(c)) => c,
        Ok(None) => {
            message(out, b'I', &[]);
            return false;
        }
        Err(e) => {
            error(out, "42601", &e);
            return false;
        }
    };
    let admin_db = core.cfg().admin_database.clone();
    match (cmd.verb.as_str(), cmd.arg.as_deref()) {
        ("SHOW", Some(what)) => match what {
            "help" => {
                notice(out, HELP);
                command_complete(out, "SHOW");
            }
            "pools" | "servers" | "lists" | "stats" | "clients" => {
                let facts = pooler_facts(core, io, id).await;
                let t = match what {
                    "pools" => show::pools(core, &facts),
                    "servers" => show::servers(core, &facts),
                    "lists" => show::lists(core, &facts),
                    "clients" => show::clients(core, &facts),
                    _ => show::stats(core, &facts),
                };
                t.encode(out);
            }
            "config" => show::config(&core.cfg()).encode(out),
            "nodes" => show::nodes(core).encode(out),
            "version" => show::version().encode(out),
            other => error(
                out,
                "42601",
                &format!("unknown SHOW item '{other}', use SHOW HELP;"),
            ),
        },
        ("PAUSE", db) => {
            if db == Some(admin_db.as_str()) {
                error(out, "42601", "cannot pause the admin console's database");
            } else if !core.admin.pause(db) {
                error(out, "55000", "already paused");
            } else {
                settle(core, db, &admin_db, out).await;
                command_complete(out, "PAUSE");
            }
        }
        // PgBouncer's SUSPEND readies an online restart by handing its sockets over; gateways
        // restart one by one on a shared port instead (docs/operations.md). What is left of
        // it: every database paused, and the answer once nothing runs; RESUME lifts it.
        ("SUSPEND", None) => {
            if !core.admin.pause(None) {
                error(out, "55000", "already suspended or paused");
            } else {
                settle(core, None, &admin_db, out).await;
                command_complete(out, "SUSPEND");
            }
        }
        ("WAIT_CLOSE", db) => {
            // Until no backend (of `db`) is due to close (`close_needed` in SHOW SERVERS: past
            // server_lifetime, closed when its session gives it back), bounded by
            // shutdown_timeout_ms.
            let limit = Instant::now() + Duration::from_millis(core.cfg().shutdown_timeout_ms);
            loop {
                let facts = pooler_facts(core, io, id).await;
                let due = facts
                    .iter()
                    .flatten()
                    .flat_map(|f| &f.servers)
                    .filter(|s| s.close_needed && db.is_none_or(|d| d == s.database))
                    .count();
                if due == 0 {
                    command_complete(out, "WAIT_CLOSE");
                    break;
                }
                if Instant::now() >= limit {
                    error(
                        out,
                        "57014",
                        &format!("{due} backends still due to close after shutdown_timeout_ms"),
                    );
                    break;
                }
                glommio::timer::sleep(Duration::from_millis(100)).await;
            }
        }
        ("RESUME", db) => {
            if core.admin.resume(db) {
                command_complete(out, "RESUME");
            } else {
                error(out, "55000", "not paused");
            }
        }
        ("KILL", db) => {
            if db == Some(admin_db.as_str()) {
                error(out, "42601", "cannot kill the admin console's database");
            } else {
                let n = core.admin.kill(db, &admin_db);
                // Idle backends of the database go too (PgBouncer drops its servers).
                if let Some(d) = db {
                    for links in core.links.iter() {
                        if let Some(l) = links.iter().find(|l| l.alive.get()) {
                            l.send(up::RELEASE_DB, 0, d.as_bytes());
                        }
                    }
                }
                tracing::info!(database = ?db, clients = n, "admin console: KILL");
                command_complete(out, "KILL");
            }
        }
        ("RELOAD", None) => {
            let shared = core.admin.clone();
            let t = std::thread::spawn(move || (shared.control.reload)());
            while !t.is_finished() {
                glommio::timer::sleep(Duration::from_millis(5)).await;
            }
            let _ = t.join();
            // Every core takes a new config at its next lifecycle tick.
            glommio::timer::sleep(shared::lifecycle::TICK * 2).await;
            command_complete(out, "RELOAD");
        }
        ("SHUTDOWN", None) => {
            tracing::info!("admin console: SHUTDOWN");
            (core.admin.control.shutdown)();
            command_complete(out, "SHUTDOWN");
            return true;
        }
        _ => error(
            out,
            "42601",
            &format!("invalid command '{}', use SHOW HELP;", text.trim()),
        ),
    }
    false
}

/// Waits until no client of the paused databases (`None`: all) has a request in flight or a
/// transaction open, as PgBouncer's PAUSE returns, bounded by shutdown_timeout_ms (a NOTICE
/// then says some still run).
async fn settle(core: &Rc<Core>, db: Option<&str>, admin_db: &str, out: &mut Vec<u8>) {
    let limit = Instant::now() + Duration::from_millis(core.cfg().shutdown_timeout_ms);
    loop {
        let busy = core.admin.clients().iter().any(|c| {
            c.state() == state::ACTIVE
                && c.database != admin_db
                && db.is_none_or(|d| d == c.database)
        });
        if !busy {
            return;
        }
        if Instant::now() >= limit {
            notice(
                out,
                "transactions still running after shutdown_timeout_ms; new ones wait",
            );
            return;
        }
        glommio::timer::sleep(Duration::from_millis(10)).await;
    }
}

/// Every pooler's pools (`None` for a pooler with no live link or no answer in 2 s), asked
/// over the link with the console's session id.
async fn pooler_facts(core: &Core, io: &Rc<SessionIo>, id: u32) -> Vec<Option<PoolFacts>> {
    let mut all = Vec::new();
    for links in core.links.iter() {
        let Some(l) = links.iter().find(|l| l.alive.get()).cloned() else {
            all.push(None);
            continue;
        };
        while io.control.try_take().is_some() {}
        l.register(id, io.clone());
        l.send(up::POOLS, id, &[]);
        let reply = crate::with_timeout(Duration::from_secs(2), io.control.take()).await;
        l.unregister(id);
        all.push(match reply {
            Some((down::POOLS, payload)) => PoolFacts::decode(&payload).ok(),
            _ => None,
        });
    }
    all
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands() {
        let c = |s: &str| parse(s).unwrap().unwrap();
        assert_eq!(c("show pools;").verb, "SHOW");
        assert_eq!(c("  SHOW   Pools ").arg.as_deref(), Some("pools"));
        assert_eq!(c("PAUSE \"App\"").arg.as_deref(), Some("App"));
        assert_eq!(c("pause app").arg.as_deref(), Some("app"));
        assert_eq!(c("RELOAD").arg, None);
        assert_eq!(parse("  ;").unwrap(), None);
        assert!(parse("show pools; show clients").is_err());
        assert!(parse("kill a b").is_err());
        assert!(parse("kill a'b").is_err());
        assert!(parse("pause \"\"").is_err());
    }
}
