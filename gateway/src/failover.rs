//! What a session does when the primary changes under it (issue 5): its link to the pooler died
//! or its pooler is no longer the primary.
//!
//! - An idle session (no transaction, no state on a backend) follows the primary: its next
//!   request waits for a primary (`failover_hold_ms`, at most `failover_hold_max` requests per
//!   core), the session is opened again there with the same user, database, credential and
//!   settings, and the request goes there. The client sees a pause.
//! - A request in flight outside a transaction, or one that may have committed: its outcome is
//!   unknown and it is never sent again: `08007` transaction_resolution_unknown, then
//!   `ReadyForQuery 'I'`.
//! - A transaction open on the lost primary is gone. The client hears `40001`
//!   (serialization_failure) — chosen because it says exactly what happened (the transaction
//!   was rolled back and did not commit; running it again is safe) and because drivers and
//!   frameworks already retry it, while `08xxx` codes make pools throw the connection away
//!   though the session is fine. Then the session behaves as Postgres does in a failed
//!   transaction (`ReadyForQuery 'E'`, `25P02` for anything but the end of it) until the client
//!   ends it; that end is answered here (`ROLLBACK`, `'I'`).
//! - A session with state on its backend (temporary tables, session locks, `WITH HOLD` cursors,
//!   `LISTEN`) lost it: one `08006` error says so, then the session goes on (re-opened). Here a
//!   connection-class code is right: what the application set up on the connection is gone, as
//!   if it had reconnected.
//!
//! A session in a transaction (or holding backend state) whose link is still up stays with its
//! pooler even if that pooler stopped being the primary: its backend has its state, and if that
//! Postgres can no longer serve it the pooler says so itself.

use crate::classify;
use crate::core::{Core, Held};
use crate::link::Link;
use crate::session_io::{segments, send, Owed, Prepared, SessionIo, TX_LOST};
use shared::link::{down, put_header, up, Open};
use shared::protocol::backend::{self as be, Severity};
use shared::protocol::frontend as fe;
use std::rc::Rc;
use std::time::{Duration, Instant};

const STATE_LOST: &str = "the primary changed: this session's temporary tables, session locks, \
     WITH HOLD cursors and LISTEN registrations are gone";
const ABORTED: &str =
    "current transaction is aborted, commands ignored until end of transaction block";
pub const NO_PRIMARY: &str = "no primary available: the cluster is failing over";

fn messages(seg: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i + 5 > seg.len() {
            return None;
        }
        let len = i32::from_be_bytes([seg[i + 1], seg[i + 2], seg[i + 3], seg[i + 4]]);
        let next = (i + 1 + len.max(4) as usize).min(seg.len());
        let m = (seg[i], &seg[i + 5..next]);
        i = next;
        Some(m)
    })
}

fn put(out: &mut Vec<u8>, tag: u8, body: &[u8]) {
    out.push(tag);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
}

fn ends_with_request(seg: &[u8]) -> bool {
    messages(seg)
        .last()
        .is_some_and(|(t, _)| matches!(t, fe::QUERY | fe::SYNC | fe::FUNCTION_CALL))
}

/// An error for a segment, and its `ReadyForQuery` if it has one.
fn answer_error(out: &mut Vec<u8>, seg: &[u8], code: &str, msg: &str, status: u8) {
    be::error_response(out, Severity::Error, code, msg);
    if ends_with_request(seg) {
        be::ready_for_query(out, status);
    }
}

/// If the segment only ends the transaction (`ROLLBACK`/`COMMIT`/..., simple or extended),
/// answers it as Postgres does for a transaction already rolled back and returns whether it
/// was a commit (`Some(true)`) or a rollback.
fn answer_end(out: &mut Vec<u8>, seg: &[u8], prepared: &Prepared) -> Option<bool> {
    let mut kind = None;
    let mut replies = Vec::new();
    for (tag, body) in messages(seg) {
        match tag {
            fe::QUERY => kind = Some(classify::ends_transaction(fe::query_text(body))?),
            fe::PARSE => {
                let p = fe::parse_parse(body).ok()?;
                kind = Some(classify::ends_transaction(p.query)?);
                be::parse_complete(&mut replies);
            }
            fe::BIND => {
                // A statement prepared earlier (drivers keep `ROLLBACK` as a named statement).
                let (_, stmt, _) = fe::parse_bind(body).ok()?;
                if kind.is_none() {
                    let parse = prepared.get(stmt)?;
                    let p = fe::parse_parse(parse.get(5..)?).ok()?;
                    kind = Some(classify::ends_transaction(p.query)?);
                }
                put(&mut replies, b'2', &[]);
            }
            fe::DESCRIBE => {
                if body.first() == Some(&b'S') {
                    put(&mut replies, b't', &[0, 0]);
                }
                put(&mut replies, b'n', &[]);
            }
            fe::EXECUTE => {}
            fe::CLOSE => be::close_complete(&mut replies),
            fe::SYNC | fe::FLUSH => {}
            _ => return None,
        }
        if tag == fe::QUERY || tag == fe::EXECUTE {
            put(&mut replies, b'C', b"ROLLBACK\0");
        }
    }
    let kind = kind?;
    out.extend_from_slice(&replies);
    if ends_with_request(seg) {
        be::ready_for_query(out, b'I');
    }
    Some(kind)
}

/// Answers what the session owes before anything more goes to a pooler; returns where the part
/// of the batch that may be forwarded starts.
fn answer_owed(io: &SessionIo, batch: &[u8]) -> usize {
    if io.owed.get() == Owed::Nothing {
        return 0;
    }
    let mut out = Vec::new();
    let mut start = 0;
    for end in segments(batch) {
        if io.owed.get() == Owed::Nothing {
            break;
        }
        let seg = &batch[start..end];
        match io.owed.get() {
            Owed::TxLost => {
                let mut reply = Vec::new();
                match answer_end(&mut reply, seg, &io.prepared.borrow()) {
                    // ROLLBACK: what the client asked for already happened.
                    Some(false) => {
                        out.extend_from_slice(&reply);
                        io.owed.set(Owed::Nothing);
                    }
                    // COMMIT: failed, and the transaction is over (as a failed COMMIT is).
                    Some(true) => {
                        answer_error(&mut out, seg, "40001", TX_LOST, b'I');
                        io.owed.set(Owed::Nothing);
                    }
                    None => {
                        answer_error(&mut out, seg, "40001", TX_LOST, b'E');
                        io.owed.set(Owed::Aborted);
                    }
                }
            }
            Owed::Aborted => {
                if answer_end(&mut out, seg, &io.prepared.borrow()).is_some() {
                    io.owed.set(Owed::Nothing);
                } else {
                    answer_error(&mut out, seg, "25P02", ABORTED, b'E');
                }
            }
            Owed::StateLost => {
                answer_error(&mut out, seg, "08006", STATE_LOST, b'I');
                io.owed.set(Owed::Nothing);
            }
            Owed::Nothing => {}
        }
        start = end;
    }
    io.status.set(if io.owed.get() == Owed::Aborted {
        b'E'
    } else {
        b'I'
    });
    if !out.is_empty() {
        io.client_out.push(&out);
    }
    start
}

pub enum Reopen {
    /// No primary within the hold, or too many requests held.
    NoPrimary,
    /// The new primary's pooler refused the session: a raw FATAL `ErrorResponse`.
    Refused(Vec<u8>),
}

/// Opens the session again on the primary's pooler (waiting for one, bounded).
pub async fn reopen(
    core: &Core,
    io: &Rc<SessionIo>,
    id: u32,
    open: &Open,
    next: &[u8],
) -> Result<Rc<Link>, Reopen> {
    let deadline = Instant::now() + Duration::from_millis(core.cfg().failover_hold_ms);
    // Counted against failover_hold_max only while it waits for a primary.
    let mut held = None;
    loop {
        let now = if io.read_only.get() {
            core.read_link()
        } else {
            core.primary_link()
        };
        let link = match now {
            Some(l) => l,
            None => {
                if held.is_none() {
                    held = Some(Held::take(core).ok_or(Reopen::NoPrimary)?);
                }
                core.wait_link(deadline, io.read_only.get())
                    .await
                    .ok_or(Reopen::NoPrimary)?
            }
        };
        let _ = io.control.try_take();
        link.register(id, io.clone());
        let mut o = open.clone();
        o.settings = io.settings.borrow().clone();
        let mut payload = Vec::new();
        o.encode(&mut payload);
        link.send(up::OPEN, id, &payload);
        let left = deadline.saturating_duration_since(Instant::now());
        match crate::with_timeout(left.max(Duration::from_millis(100)), io.control.take()).await {
            Some((down::OPENED, _)) => {
                // The client has its ParameterStatus messages from its first login.
                io.lost.set(false);
                io.status.set(b'I');
                io.restart_scan();
                replay_prepared(&link, io, id, next);
                tracing::debug!(session = id, pooler = link.pooler, "session re-opened");
                return Ok(link);
            }
            Some((down::OPEN_FAILED, fatal)) => {
                link.unregister(id);
                return Err(Reopen::Refused(fatal));
            }
            // The link died meanwhile: try again while the hold lasts.
            Some(_) => {
                link.unregister(id);
                if Instant::now() >= deadline {
                    return Err(Reopen::NoPrimary);
                }
            }
            None => {
                link.unregister(id);
                link.send(up::CLOSE, id, &[]);
                return Err(Reopen::NoPrimary);
            }
        }
    }
}

/// Prepares the client's named statements again on the new pooler (one batch ending in Sync);
/// the replies are dropped (`SessionIo::swallow`). One that fails now fails again at its Bind.
/// Statements the held request `next` parses itself are left to it (they were remembered when
/// it was read; preparing them here too would make its Parse fail with 42P05).
fn replay_prepared(link: &Link, io: &SessionIo, id: u32, next: &[u8]) {
    let prepared = io.prepared.borrow();
    let mut parsed_next: Vec<&[u8]> = Vec::new();
    let mut i = 0;
    while i + 5 <= next.len() {
        let len = u32::from_be_bytes([next[i + 1], next[i + 2], next[i + 3], next[i + 4]]) as usize;
        let end = (i + 1 + len).min(next.len());
        if next[i] == fe::PARSE {
            if let Ok(p) = fe::parse_parse(&next[i + 5..end]) {
                parsed_next.push(p.name);
            }
        }
        if len < 4 {
            break;
        }
        i = end;
    }
    let replay: Vec<&[u8]> = prepared
        .iter()
        .filter(|(name, _)| !parsed_next.iter().any(|n| *n == &name[..]))
        .map(|(_, m)| &m[..])
        .collect();
    if replay.is_empty() {
        return;
    }
    let size: usize = replay.iter().map(|m| m.len()).sum();
    link.out.push_with(|b| {
        put_header(b, up::MSGS, id, size + 5 + 1);
        b.push(0);
        for m in &replay {
            b.extend_from_slice(m);
        }
        b.extend_from_slice(&[fe::SYNC, 0, 0, 0, 4]);
    });
    io.sent_request(size + 5 + 1);
    io.swallow.set(io.swallow.get() + 1);
}

/// The slow path of a request: settles what is owed, finds the primary (re-opening the session
/// there), and forwards the rest of the batch. `Err` ends the session.
pub async fn forward_slow(
    core: &Core,
    io: &Rc<SessionIo>,
    id: u32,
    open: &Open,
    batch: &[u8],
    flags: u8,
    may_commit: bool,
) -> Result<(), ()> {
    let start = answer_owed(io, batch);
    let rest = &batch[start..];
    if rest.is_empty() {
        return Ok(());
    }
    let link = match io.usable_link(|pooler, read_only| core.serves(pooler, read_only)) {
        Some(l) => l,
        None => {
            if let Some(old) = io.current_link() {
                // Idle on a pooler that is no longer the primary: leave it.
                old.unregister(id);
                old.send(up::CLOSE, id, &[]);
            }
            match reopen(core, io, id, open, rest).await {
                Ok(l) => l,
                Err(Reopen::NoPrimary) => {
                    tracing::info!(session = id, "no primary within the hold: 57P03");
                    let mut out = Vec::new();
                    let mut s = 0;
                    for end in segments(rest) {
                        answer_error(&mut out, &rest[s..end], "57P03", NO_PRIMARY, b'I');
                        s = end;
                    }
                    io.client_out.push(&out);
                    return Ok(());
                }
                Err(Reopen::Refused(fatal)) => {
                    io.client_out.push(&fatal);
                    return Err(());
                }
            }
        }
    };
    send(&link, io, id, flags, rest, may_commit);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session_io::requests;

    fn q(sql: &str) -> Vec<u8> {
        let mut m = Vec::new();
        let mut body = sql.as_bytes().to_vec();
        body.push(0);
        put(&mut m, fe::QUERY, &body);
        m
    }

    fn replies(io: &SessionIo) -> Vec<(u8, Vec<u8>)> {
        // Drain what the session queued for its client.
        let mut got = Vec::new();
        let w = futures_lite::future::block_on(async {
            let mut sink = Vec::new();
            io.client_out.close();
            let _ = io.client_out.run_writer(&mut sink).await;
            sink
        });
        for (t, b) in messages(&w) {
            got.push((t, b.to_vec()));
        }
        got
    }

    fn codes(r: &[(u8, Vec<u8>)]) -> Vec<String> {
        r.iter()
            .map(|(t, b)| match t {
                b'E' => {
                    String::from_utf8_lossy(be::error_sqlstate(b).unwrap_or_default()).into_owned()
                }
                b'Z' => format!("Z{}", b[0] as char),
                b'C' => String::from_utf8_lossy(&b[..b.len() - 1]).into_owned(),
                t => (*t as char).to_string(),
            })
            .collect()
    }

    #[test]
    fn in_flight_outside_a_transaction_is_unknown() {
        let io = SessionIo::new();
        io.opened.set(true);
        io.pending.set(1);
        io.owe_for_lost_link();
        assert_eq!(io.owed.get(), Owed::Nothing);
        assert!(io.lost.get());
        assert_eq!(codes(&replies(&io)), vec!["08007", "ZI"]);
    }

    #[test]
    fn in_flight_commit_is_unknown() {
        let io = SessionIo::new();
        io.status.set(b'T');
        io.pending.set(1);
        io.pending_may_commit.set(true);
        io.owe_for_lost_link();
        assert_eq!(codes(&replies(&io)), vec!["08007", "ZI"]);
    }

    #[test]
    fn in_flight_in_a_transaction_aborts_it() {
        let io = SessionIo::new();
        io.status.set(b'T');
        io.pending.set(1);
        io.owe_for_lost_link();
        assert_eq!(io.owed.get(), Owed::Aborted);
        let b = [q("select 1"), q("rollback"), q("select 2")].concat();
        let start = answer_owed(&io, &b);
        assert_eq!(&b[start..], &q("select 2")[..]);
        assert_eq!(
            codes(&replies(&io)),
            vec!["40001", "ZE", "25P02", "ZE", "ROLLBACK", "ZI"]
        );
        assert_eq!(io.status.get(), b'I');
    }

    #[test]
    fn idle_transaction_hears_at_its_next_request() {
        for (req, want) in [
            ("insert into t values (1)", vec!["40001", "ZE"]),
            ("ROLLBACK", vec!["ROLLBACK", "ZI"]),
            ("commit", vec!["40001", "ZI"]),
        ] {
            let io = SessionIo::new();
            io.status.set(b'T');
            io.owe_for_lost_link();
            assert_eq!(io.owed.get(), Owed::TxLost);
            let b = q(req);
            assert_eq!(answer_owed(&io, &b), b.len());
            assert_eq!(codes(&replies(&io)), want, "{req}");
        }
    }

    #[test]
    fn extended_rollback_in_a_failed_transaction() {
        let io = SessionIo::new();
        io.owed.set(Owed::Aborted);
        let mut b = Vec::new();
        be_parse(&mut b, "ROLLBACK");
        put(&mut b, fe::BIND, b"\0\0\0\0\0\0\0\0");
        put(&mut b, fe::DESCRIBE, b"P\0");
        put(&mut b, fe::EXECUTE, b"\0\0\0\0\0");
        put(&mut b, fe::SYNC, b"");
        assert_eq!(answer_owed(&io, &b), b.len());
        assert_eq!(codes(&replies(&io)), vec!["1", "2", "n", "ROLLBACK", "ZI"]);
    }

    #[test]
    fn rollback_as_a_named_statement_prepared_earlier() {
        let io = SessionIo::new();
        let mut parse = Vec::new();
        let mut body = b"S_1\0ROLLBACK\0".to_vec();
        body.extend_from_slice(&[0, 0]);
        put(&mut parse, fe::PARSE, &body);
        io.remember_parse(b"S_1", &parse);
        io.owed.set(Owed::Aborted);
        let mut b = Vec::new();
        put(&mut b, fe::BIND, b"\0S_1\0\0\0\0\0\0\0");
        put(&mut b, fe::EXECUTE, b"\0\0\0\0\0");
        put(&mut b, fe::SYNC, b"");
        assert_eq!(answer_owed(&io, &b), b.len());
        assert_eq!(codes(&replies(&io)), vec!["2", "ROLLBACK", "ZI"]);
        // Any other statement is refused as in a failed transaction.
        let io = SessionIo::new();
        io.owed.set(Owed::Aborted);
        assert_eq!(answer_owed(&io, &b), b.len());
        assert_eq!(codes(&replies(&io)), vec!["25P02", "ZE"]);
    }

    fn be_parse(out: &mut Vec<u8>, sql: &str) {
        let mut body = vec![0];
        body.extend_from_slice(sql.as_bytes());
        body.extend_from_slice(&[0, 0, 0]);
        put(out, fe::PARSE, &body);
    }

    #[test]
    fn pinned_idle_session_hears_once() {
        let io = SessionIo::new();
        io.pinned.set(true);
        io.owe_for_lost_link();
        assert_eq!(io.owed.get(), Owed::StateLost);
        let b = [q("select * from tmp"), q("select 1")].concat();
        let start = answer_owed(&io, &b);
        assert_eq!(&b[start..], &q("select 1")[..]);
        assert_eq!(codes(&replies(&io)), vec!["08006", "ZI"]);
    }

    #[test]
    fn counts_requests() {
        let mut b = q("select 1");
        be_parse(&mut b, "select 2");
        put(&mut b, fe::SYNC, b"");
        put(&mut b, fe::FLUSH, b"");
        assert_eq!(requests(&b), 2);
        assert_eq!(segments(&b).len(), 3);
    }
}
