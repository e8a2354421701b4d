//! A client connection: startup (TLS, cancel, protocol 3.0), authentication, then the request
//! loop that frames the client's messages onto the link with the classifier's flags. Responses
//! arrive from the link straight into the session's output queue; its writer task sends them and
//! returns credit to the pooler.

use crate::auth;
use crate::classify::LOWERS_SYNC_COMMIT;
use crate::core::{ClientSlot, Core, Peer};
use crate::identity;
use crate::refusal::{self, Refusal};
use crate::session_io::{self, SessionIo};
use crate::signals;
use crate::statement_names::{self, Found};
use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use glommio::net::TcpStream;
use shared::io::{MessageReader, RcStream};
use shared::link::{down, flags, up, Open};
use shared::protocol::backend::{self as be, Severity};
use shared::protocol::frontend::{self as fe, parse_startup, Startup};
use shared::protocol::{typed_message_len, ProtocolError, MAX_STARTUP_PACKET};
use shared::settings::Settings;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::Poll;
use std::time::{Duration, Instant};
use tidepool_gateway::hba::Transport;

/// Bytes an idle session's read buffer keeps: small, so tens of thousands of idle clients are
/// cheap; it grows for large messages and shrinks back after.
const IDLE_READ_BUFFER: usize = 512;

async fn write_fatal<S: AsyncWrite + Unpin>(s: &mut S, code: &str, msg: &str) {
    let mut e = Vec::new();
    be::error_response(&mut e, Severity::Fatal, code, msg);
    let _ = s.write_all(&e).await;
    let _ = s.flush().await;
}

/// Reads one untyped startup-phase packet (length word included in the count).
async fn read_startup<S: AsyncRead + Unpin>(
    s: &mut S,
    r: &mut MessageReader,
) -> Result<Option<Startup>, ProtocolError> {
    loop {
        let d = r.data();
        if d.len() >= 4 {
            let len = i32::from_be_bytes([d[0], d[1], d[2], d[3]]);
            if !(8..=MAX_STARTUP_PACKET as i32).contains(&len) {
                return Err(ProtocolError::BadLength(len as i64));
            }
            let len = len as usize;
            if d.len() >= len {
                let parsed = parse_startup(&d[4..len]);
                r.consume(len);
                return parsed.map(Some);
            }
        }
        let want = if d.len() >= 4 {
            i32::from_be_bytes([d[0], d[1], d[2], d[3]]) as usize
        } else {
            4
        };
        match r.fill(s, want).await {
            Ok(0) | Err(_) => return Ok(None),
            Ok(_) => {}
        }
    }
}

/// SQLSTATE for a bad startup packet, as Postgres (ProcessStartupPacket) gives it.
fn startup_error_code(e: &ProtocolError) -> &'static str {
    match e {
        ProtocolError::UnsupportedVersion { .. } => "0A000",
        _ => "08P01",
    }
}

fn startup_error_text(e: &ProtocolError) -> String {
    match e {
        ProtocolError::UnsupportedVersion { .. } => e.to_string(),
        _ => format!("invalid startup packet: {e}"),
    }
}

fn left(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

/// Tells a client we cannot take it (`code`: 53300, too many; 57P03, shutting down), then closes. As Postgres does, after the SSL/GSS
/// negotiation and the startup packet (answering `N` to SSL), so that drivers report the error
/// itself; bounded in time, since the refused client holds our last descriptor meanwhile.
pub async fn refuse(mut stream: TcpStream, code: &str, msg: &str) {
    let mut reader = MessageReader::new(IDLE_READ_BUFFER);
    let negotiate = async {
        for _ in 0..3 {
            match read_startup(&mut stream, &mut reader).await {
                Ok(Some(Startup::Ssl | Startup::GssEnc)) => {
                    if stream.write_all(b"N").await.is_err() {
                        return false;
                    }
                }
                Ok(Some(_)) => return true,
                _ => return false,
            }
        }
        false
    };
    if crate::with_timeout(Duration::from_secs(2), negotiate).await == Some(true) {
        write_fatal(&mut stream, code, msg).await;
    }
}

/// `read_only`: accepted on `read_only_listen` (reads go to a standby).
pub async fn serve_tcp(core: Rc<Core>, mut stream: TcpStream, read_only: bool) {
    let _ = stream.set_nodelay(true);
    keepalive(&stream);
    if core.draining.get() {
        refuse(stream, "57P03", "the database system is shutting down").await;
        return;
    }
    let Some(slot) = ClientSlot::take(&core) else {
        refuse(stream, "53300", "sorry, too many clients already").await;
        return;
    };
    let addrs = Peer {
        addr: stream.peer_addr().ok(),
        local: stream.local_addr().ok(),
    };
    // One deadline for all of startup and authentication, however many negotiation packets
    // the client sends (Postgres: authentication_timeout).
    let deadline = Instant::now() + Duration::from_secs(core.cfg().auth_timeout_seconds);
    let mut reader = MessageReader::new(IDLE_READ_BUFFER);
    let Ok(peer) = stream.peer_addr() else {
        return;
    };
    let tcp = |tls| Transport::Tcp {
        addr: peer.ip().to_canonical(),
        tls,
    };
    // SSL or GSS negotiation first, on the plain socket.
    loop {
        let first =
            crate::with_timeout(left(deadline), read_startup(&mut stream, &mut reader)).await;
        match first {
            Some(Ok(Some(Startup::Ssl))) => {
                let acceptor = core.tls.borrow().clone();
                if let Some(acceptor) = acceptor {
                    if !reader.data().is_empty() {
                        // Bytes after SSLRequest before the handshake: a buffer-stuffing attack.
                        write_fatal(
                            &mut stream,
                            "08P01",
                            "received unencrypted data after SSL request",
                        )
                        .await;
                        return;
                    }
                    if stream.write_all(b"S").await.is_err() {
                        return;
                    }
                    match crate::with_timeout(left(deadline), acceptor.accept(stream)).await {
                        Some(Ok(tls)) => {
                            let how = tcp(true);
                            return serve(
                                core, tls, reader, None, slot, addrs, deadline, read_only, how,
                            )
                            .await;
                        }
                        _ => return,
                    }
                }
                if stream.write_all(b"N").await.is_err() {
                    return;
                }
            }
            Some(Ok(Some(Startup::GssEnc))) => {
                if stream.write_all(b"N").await.is_err() {
                    return;
                }
            }
            Some(Ok(Some(other))) => {
                let how = tcp(false);
                return serve(
                    core,
                    stream,
                    reader,
                    Some(other),
                    slot,
                    addrs,
                    deadline,
                    read_only,
                    how,
                )
                .await;
            }
            Some(Err(ProtocolError::UnsupportedVersion { major, .. })) if major < 3 => return,
            Some(Err(e)) => {
                write_fatal(&mut stream, startup_error_code(&e), &startup_error_text(&e)).await;
                return;
            }
            Some(Ok(None)) | None => return,
        }
    }
}

pub async fn serve_unix(core: Rc<Core>, stream: glommio::net::UnixStream) {
    let mut stream = stream;
    let Some(slot) = ClientSlot::take(&core) else {
        write_fatal(&mut stream, "53300", "sorry, too many clients already").await;
        return;
    };
    let deadline = Instant::now() + Duration::from_secs(core.cfg().auth_timeout_seconds);
    let reader = MessageReader::new(IDLE_READ_BUFFER);
    serve(
        core,
        stream,
        reader,
        None,
        slot,
        Peer::default(),
        deadline,
        false,
        Transport::Local,
    )
    .await
}

/// TCP keepalive, so a client that vanished without a FIN (power loss, a cut cable, a NAT that
/// forgot it) is noticed and its session freed: after 60 s idle, 3 probes 10 s apart.
fn keepalive(stream: &TcpStream) {
    use std::os::fd::{AsRawFd, BorrowedFd};
    // SAFETY: the fd belongs to `stream`, which outlives this borrow.
    let fd = unsafe { BorrowedFd::borrow_raw(stream.as_raw_fd()) };
    let sock = socket2::SockRef::from(&fd);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10))
        .with_retries(3);
    let _ = sock.set_tcp_keepalive(&ka);
}

/// Everything after transport negotiation.
#[allow(clippy::too_many_arguments)]
async fn serve<S: AsyncRead + AsyncWrite + Unpin + 'static>(
    core: Rc<Core>,
    mut stream: S,
    mut reader: MessageReader,
    first: Option<Startup>,
    mut slot: ClientSlot,
    peer: Peer,
    deadline: Instant,
    read_only: bool,
    transport: Transport,
) {
    let mut next = first;
    let params = loop {
        let startup = match next.take() {
            Some(s) => s,
            None => {
                match crate::with_timeout(left(deadline), read_startup(&mut stream, &mut reader))
                    .await
                {
                    Some(Ok(Some(s))) => s,
                    Some(Err(e)) => {
                        write_fatal(&mut stream, startup_error_code(&e), &startup_error_text(&e))
                            .await;
                        return;
                    }
                    _ => return,
                }
            }
        };
        match startup {
            Startup::Startup { params } => break params,
            Startup::Cancel { pid, secret } => {
                core.cancel(pid, secret).await;
                return;
            }
            Startup::Ssl | Startup::GssEnc => {
                if stream.write_all(b"N").await.is_err() {
                    return;
                }
            }
        }
    };
    let mut user = None;
    let mut database = None;
    let mut settings = Settings::default();
    for (k, v) in &params {
        match k.as_str() {
            "user" => user = Some(v.clone()),
            "database" => database = Some(v.clone()),
            "replication" => {
                if v != "false" && v != "0" && v != "off" {
                    write_fatal(
                        &mut stream,
                        "0A000",
                        "replication connections are not supported through Tidepool",
                    )
                    .await;
                    return;
                }
            }
            "options" => {
                if let Err(e) = parse_options(v, &mut settings) {
                    // Postgres: 42601 for a malformed options string.
                    write_fatal(&mut stream, "42601", &e).await;
                    return;
                }
            }
            // Protocol extension options (`_pq_.*`) are not settings.
            k if k.starts_with("_pq_.") => {}
            k => settings.set(k, v),
        }
    }
    if core.cfg().guard_synchronous_commit
        && settings
            .get("synchronous_commit")
            .is_some_and(crate::classify::lowering_value)
    {
        write_fatal(&mut stream, "42501", SYNC_COMMIT_DENIED).await;
        return;
    }
    let Some(user) = user.filter(|u| !u.is_empty()) else {
        write_fatal(
            &mut stream,
            "28000",
            "no PostgreSQL user name specified in startup packet",
        )
        .await;
        return;
    };
    let database = database
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| user.clone());
    if core.draining.get() {
        // Accepted just before the listeners closed: as Postgres answers while it stops.
        write_fatal(&mut stream, "57P03", "the database system is shutting down").await;
        return;
    }
    // No primary (failing over, or the pooler not up yet): wait as a request would.
    let hold = Instant::now() + Duration::from_millis(core.cfg().failover_hold_ms);
    let Some(link) = core.wait_link(hold.min(deadline), read_only).await else {
        write_fatal(&mut stream, "57P03", crate::failover::NO_PRIMARY).await;
        return;
    };
    // The admin console's virtual database (admin/console.rs): authenticated as any client.
    // Off while no admin user is configured: a real database of that name (`tidepool up`
    // creates one called `tidepool`) is then served as any other.
    let console = !core.cfg().admin_users.is_empty() && database == core.cfg().admin_database;
    let io = SessionIo::new();
    let Some(id) = core.next_session_id().map(|id| io.hold_id(id)) else {
        write_fatal(&mut stream, "53300", "sorry, too many clients already").await;
        return;
    };
    io.read_only.set(read_only);
    link.register(id, io.clone());
    // The session's keys: its virtual pid lives in the registry for as long as the session
    // (`pg_cancel_backend`/`pg_terminate_backend` of it, signals.rs).
    let secret = rand::random::<i32>();
    let registration = signals::Registration::new(&user, secret);
    let pid = registration.pid;
    // What the client is owed but need not see yet: the exchange's last message and
    // AuthenticationOk, sent with the session's first ParameterStatus messages in one write
    // (or before the error that ends the login). Postgres sends them as one packet too.
    let mut owed = Vec::new();
    let login = crate::with_timeout(left(deadline), async {
        let client = auth::Client {
            user: &user,
            database: &database,
            transport,
        };
        let (credential, role) = auth::authenticate(
            &core,
            &mut stream,
            &mut reader,
            &io,
            &link,
            id,
            &client,
            &mut owed,
        )
        .await?;
        if console && !core.cfg().admin_users.contains(&user) {
            // PgBouncer's answer to a role that is not an admin user.
            return Err(refusal::fatal(
                "28000",
                &format!("not allowed: role \"{user}\" is not an admin user of the console"),
            ));
        }
        be::auth_ok(&mut owed);
        if console {
            stream
                .write_all(&std::mem::take(&mut owed))
                .await
                .map_err(|_| Refusal::Gone)?;
            return Ok(None);
        }
        // As Postgres: authenticated (AuthenticationOk sent), then the role and database checks.
        let admitted = crate::access::admit(&core.cfg(), &user, &database, &role)?;
        let open = Open {
            user: user.clone(),
            database: database.clone(),
            pid,
            secret,
            credential,
            settings: settings.clone(),
        };
        let mut payload = Vec::new();
        open.encode(&mut payload);
        link.send(up::OPEN, id, &payload);
        let (kind, reply) = auth::await_control(&io, &mut stream, &mut reader).await?;
        match kind {
            down::OPENED => {
                registration.logged_in(&reply, &role);
                let mut out = std::mem::take(&mut owed);
                out.extend_from_slice(&reply);
                be::backend_key_data(&mut out, pid, secret);
                be::ready_for_query(&mut out, b'I');
                stream.write_all(&out).await.map_err(|_| Refusal::Gone)?;
                Ok(Some((open, admitted)))
            }
            down::OPEN_FAILED => Err(Refusal::Fatal(reply)),
            _ => Err(refusal::fatal("08006", "the pooler closed the session")),
        }
    })
    .await;
    let mut open = match login {
        Some(Ok(Some((open, admitted)))) => {
            slot.admit(admitted);
            open
        }
        Some(Ok(None)) => {
            link.unregister(id);
            let login = crate::admin::console::Login {
                application_name: settings
                    .get("application_name")
                    .unwrap_or_default()
                    .to_owned(),
                user,
                database,
                peer,
            };
            crate::admin::console::serve(core, stream, reader, io, id, login, slot).await;
            return;
        }
        Some(Err(Refusal::Fatal(e))) => {
            link.unregister(id);
            link.send(up::CLOSE, id, &[]);
            owed.extend_from_slice(&e);
            let _ = stream.write_all(&owed).await;
            let _ = stream.flush().await;
            return;
        }
        Some(Err(Refusal::Gone)) => {
            link.unregister(id);
            link.send(up::CLOSE, id, &[]);
            return;
        }
        None => {
            link.unregister(id);
            link.send(up::CLOSE, id, &[]);
            let _ = stream.write_all(&owed).await;
            write_fatal(
                &mut stream,
                "08006",
                "canceling authentication due to timeout",
            )
            .await;
            return;
        }
    };
    // The session's settings live in `io` from now on (a re-open sends those): `open` keeps
    // no second copy for the session's whole life.
    drop(settings);
    *io.settings.borrow_mut() = std::mem::take(&mut open.settings);
    if io.ended.get() {
        return;
    }
    io.opened.set(true);
    // A task of its own: the startup and authentication state (SCRAM, buffers) is freed now,
    // so an idle session costs only what `run` keeps.
    let me = core.admin.register(crate::registry::NewClient {
        user: &open.user,
        database: &open.database,
        addr: peer.addr,
        local: peer.local,
        pid: open.pid,
        application_name: io
            .settings
            .borrow()
            .get("application_name")
            .unwrap_or_default(),
    });
    glommio::spawn_local(run(
        core,
        stream,
        reader,
        io,
        open,
        id,
        (slot, registration),
        me,
    ))
    .detach();
}

/// Parameter types for the statement that replaces a refused one: as many as the original
/// refers to (`$n`), so the client's Describe and Bind see the count they expect; types the
/// client left unspecified become `text` (a DO statement infers none).
fn param_types_for(query: &[u8], declared: &[u8]) -> Vec<u8> {
    let mut n = 0usize;
    let mut i = 0;
    while i < query.len() {
        if query[i] == b'$' && (i == 0 || !query[i - 1].is_ascii_alphanumeric()) {
            let mut j = i + 1;
            let mut v = 0usize;
            while j < query.len() && query[j].is_ascii_digit() && v < 65_535 {
                v = v * 10 + (query[j] - b'0') as usize;
                j += 1;
            }
            n = n.max(v);
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    let mut oids: Vec<u32> = declared
        .get(2..)
        .unwrap_or_default()
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    if oids.len() < n {
        oids.resize(n, 0);
    }
    let mut out = Vec::with_capacity(2 + oids.len() * 4);
    out.extend_from_slice(&(oids.len() as i16).to_be_bytes());
    for o in oids {
        // 25: text.
        out.extend_from_slice(&(if o == 0 { 25 } else { o }).to_be_bytes());
    }
    out
}

/// `options` holds `-c name=value` / `--name=value` pairs, as libpq sends them.
fn parse_options(options: &str, settings: &mut Settings) -> Result<(), String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut chars = options.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(n) = chars.next() {
                    cur.push(n);
                }
            }
            c if c.is_whitespace() => {
                if !cur.is_empty() {
                    words.push(std::mem::take(&mut cur));
                }
            }
            c => cur.push(c),
        }
    }
    if !cur.is_empty() {
        words.push(cur);
    }
    let mut it = words.into_iter();
    while let Some(w) = it.next() {
        let pair = if w == "-c" {
            it.next().ok_or("option -c needs an argument")?
        } else if let Some(rest) = w.strip_prefix("--") {
            rest.to_owned()
        } else if let Some(rest) = w.strip_prefix("-c") {
            rest.to_owned()
        } else {
            return Err(format!(
                "invalid command-line argument for server process: {w}"
            ));
        };
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("invalid command-line argument for server process: {pair}"))?;
        settings.set(&k.replace('-', "_"), v);
    }
    Ok(())
}

/// The request loop.
#[allow(clippy::too_many_arguments)] // each is a distinct part of the session handed over whole
/// The session's request loop, once logged in. Not an `async fn`: an async fn keeps each of its
/// arguments twice in its future (the argument and the local it is moved into, rust-lang/rust
/// #62958), and what is only set up (the writer task, the client stream's wrapper) needs no
/// place in it at all; here that is done before the future exists, which then captures each
/// value once. The future is what every idle session costs (`size_tests`).
fn run<S: AsyncRead + AsyncWrite + Unpin + 'static>(
    core: Rc<Core>,
    stream: S,
    mut reader: MessageReader,
    io: Rc<SessionIo>,
    open: Open,
    id: u32,
    // The client's place, and its pid's in the registry of signallable sessions (signals.rs):
    // both held until the session's last bytes are written.
    held: (ClientSlot, signals::Registration),
    me: crate::registry::Registered,
) -> impl std::future::Future<Output = ()> + 'static {
    let stream = RcStream::new(stream);
    let writer_io = io.clone();
    let me_writer = me.client.clone();
    let wstream = stream.clone();
    glommio::spawn_local(async move {
        // Credit goes to whichever pooler serves the session now, in batches: a frame per client
        // write doubled the link's frames for small results. The pooler stops only past its
        // window (`WINDOW`, 256 KiB), so credit held back here (under `CREDIT_BATCH`) never
        // stalls it: whatever it waits for beyond that is still to be written, and writing it
        // crosses the batch.
        let owed = std::cell::Cell::new(0usize);
        let credit = |n: usize| {
            crate::registry::bump(&me_writer.stats.sent, n as u64);
            let total = owed.get() + n;
            if total < CREDIT_BATCH {
                owed.set(total);
                return;
            }
            owed.set(0);
            if let Some(l) = writer_io.current_link() {
                l.send(up::CREDIT, id, &(total as u32).to_be_bytes());
            }
        };
        let _ = writer_io.client_out.run_writer_with(wstream, credit).await;
        // The client counts (for a drain) until its last bytes are written. Dropped here, not
        // moved into a local at the start: that would keep it twice in the task.
        drop(held);
    })
    .detach();
    let mut rstream = stream;
    let max = core.cfg().max_message_size;
    let mut statement_flags = crate::classify::StatementFlags::default();
    // For SHOW STATS: since when the session has had a request in flight / a transaction open.
    let mut busy_since: Option<Instant> = None;
    let mut xact_since: Option<Instant> = None;
    let mut signal_stmts = signals::Statements::default();
    async move {
        'session: loop {
            // Frame every complete message we have into one MSGS frame.
            let mut flags = 0u8;
            let mut end = 0;
            let mut terminate = false;
            // Inside a transaction (or possibly, behind pipelined requests not answered yet),
            // whether a request here may commit it (see failover.rs): a COMMIT whose outcome is
            // unknown must never be reported as rolled back.
            let in_tx = io.status.get() != b'I' || io.pending.get() > 0;
            let mut may_commit = false;
            // Offsets of messages that would lower synchronous_commit (rare): rewritten below.
            let mut denied: Vec<usize> = Vec::new();
            // Prepared-statement names in SQL text, for the pooler (`up::NAMES`); whether one of
            // them is a PREPARE (pinned instead if the names cannot go with the batch).
            let mut names: Vec<u8> = Vec::new();
            let mut names_prepare = false;
            loop {
                let data = &reader.data()[end..];
                // The type byte is judged as soon as it arrives, as Postgres does, before any length.
                let bad_type = data.first().is_some_and(|&t| !fe::is_known_after_login(t));
                match typed_message_len(data, max) {
                    _ if bad_type => {
                        let tag = data[0];
                        let mut err = Vec::new();
                        be::error_response(
                            &mut err,
                            Severity::Fatal,
                            "08P01",
                            &format!("invalid frontend message type {tag}"),
                        );
                        if end > 0 {
                            send_partial(&io, id, flags, &reader.data()[..end]);
                        }
                        io.client_out.push(&err);
                        break 'session;
                    }
                    Ok(Some(n)) => {
                        let tag = data[0];
                        let body = &data[5..n];
                        match tag {
                            fe::TERMINATE => {
                                terminate = true;
                                break;
                            }
                            fe::QUERY => {
                                let sql = fe::query_text(body);
                                let f = match core.classifier.classify_now(sql) {
                                    Some(f) => f,
                                    // Boxed: the slow path's state is not part of every session.
                                    None => Box::pin(core.classifier.classify(sql)).await,
                                };
                                watch_custom_settings(&io, id, f, sql);
                                release_databases(&io, id, sql);
                                if f & LOWERS_SYNC_COMMIT != 0 {
                                    denied.push(end);
                                }
                                may_commit |= in_tx && crate::classify::may_commit(sql);
                                flags |= f;
                                match statement_names::find(sql) {
                                    Found::Names(v) => {
                                        names_prepare |= v
                                            .iter()
                                            .any(|n| n.kind == statement_names::kind::PREPARE);
                                        statement_names::encode(&mut names, end, &v);
                                    }
                                    Found::Unmapped { prepares: true } => flags |= flags::PIN,
                                    _ => {}
                                }
                            }
                            fe::PARSE => {
                                if let Ok(p) = fe::parse_parse(body) {
                                    let f = match core.classifier.classify_now(p.query) {
                                        Some(f) => f,
                                        None => Box::pin(core.classifier.classify(p.query)).await,
                                    };
                                    watch_custom_settings(&io, id, f, p.query);
                                    release_databases(&io, id, p.query);
                                    if f & LOWERS_SYNC_COMMIT != 0 {
                                        denied.push(end);
                                    } else if !p.name.is_empty() {
                                        // For a re-open on another pooler (failover.rs).
                                        io.remember_parse(p.name, &data[..n]);
                                    }
                                    may_commit |= in_tx && crate::classify::may_commit(p.query);
                                    flags |= f;
                                    // A PREPARE run through the extended protocol keeps the
                                    // client's name on a pinned backend (not mapped).
                                    let prepares = match statement_names::find(p.query) {
                                        Found::Names(v) => v
                                            .iter()
                                            .any(|n| n.kind == statement_names::kind::PREPARE),
                                        Found::Unmapped { prepares } => prepares,
                                        Found::Nothing => false,
                                    };
                                    if prepares {
                                        flags |= flags::PIN;
                                    }
                                    statement_flags.parsed(p.name, f);
                                }
                            }
                            fe::BIND => {
                                // What the statement does when it runs, also when it was parsed
                                // in an earlier batch.
                                if let Ok((_, stmt, _)) = fe::parse_bind(body) {
                                    flags |= statement_flags.bound(stmt);
                                }
                            }
                            fe::CLOSE => {
                                if let Ok((b'S', name)) = fe::parse_target(body) {
                                    io.forget_parse(name);
                                    statement_flags.closed(name);
                                }
                            }
                            _ => {}
                        }
                        end += n;
                    }
                    Ok(None) => break,
                    Err(e) => {
                        let (code, msg) = match e {
                            ProtocolError::TooLarge { .. } => ("54000", e.to_string()),
                            _ => ("08P01", format!("invalid message: {e}")),
                        };
                        let mut err = Vec::new();
                        be::error_response(&mut err, Severity::Fatal, code, &msg);
                        if end > 0 {
                            send_partial(&io, id, flags, &reader.data()[..end]);
                        }
                        io.client_out.push(&err);
                        break 'session;
                    }
                }
            }
            if end > 0 {
                // PAUSE (admin console): a request outside a transaction waits (one relaxed load
                // when nothing is paused).
                if io.status.get() == b'I'
                    && io.pending.get() == 0
                    && core.admin.paused(&open.database)
                {
                    let since = Instant::now();
                    me.client.set_state(crate::registry::state::WAITING);
                    me.client.requested();
                    // Woken by the core's lifecycle tick after a RESUME or KILL (or a drain); the
                    // timer only bounds a missed wake.
                    loop {
                        // Taken before the check, so a wake between the two is not lost.
                        let woken = core.drain_notify.listen();
                        let held = core.admin.paused(&open.database)
                            && !me.client.killed()
                            && !core.force.get();
                        if !held {
                            break;
                        }
                        let _ = crate::with_timeout(Duration::from_secs(1), woken).await;
                    }
                    crate::registry::bump(
                        &me.client.stats.wait_us,
                        since.elapsed().as_micros() as u64,
                    );
                    if me.client.killed() {
                        io.client_out.push(&fatal(SHUTDOWN_CODE, SHUTDOWN));
                        break 'session;
                    }
                }
                me.client.set_state(crate::registry::state::ACTIVE);
                crate::registry::bump(&me.client.stats.received, end as u64);
                let now = Instant::now();
                busy_since.get_or_insert(now);
                if io.status.get() == b'I' {
                    xact_since.get_or_insert(now);
                }
                // The hot path: the session's pooler is the primary (or holds its transaction).
                match io
                    .usable_link(|pooler, read_only| core.serves(pooler, read_only))
                    .filter(|_| denied.is_empty())
                {
                    Some(l) => {
                        let batch = &reader.data()[..end];
                        let own_pid = identity::virtual_backend_pid(batch, open.pid);
                        let b = own_pid.as_deref().unwrap_or(batch);
                        let signalled = signal_calls(&io, b, open.pid, &mut signal_stmts);
                        let rewritten = own_pid.is_some() || signalled.is_some();
                        let (sent, issued) = match signalled {
                            Some((ref b, issued)) => (&b[..], issued),
                            None => (own_pid.as_deref().unwrap_or(batch), Vec::new()),
                        };
                        let mut flags = flags;
                        if !names.is_empty() {
                            // `NAMES` carry offsets into the batch as it is sent: found again
                            // in a rewritten one (rare: SQL statement names and signals or
                            // pg_backend_pid() in one batch).
                            if rewritten {
                                let (again, pin) = statement_names::of_batch(sent);
                                names = again;
                                if pin {
                                    flags |= flags::PIN;
                                }
                            }
                            if !names.is_empty() {
                                l.send(up::NAMES, id, &names);
                            }
                        }
                        io.expect_signals(&core.links, issued, open.pid);
                        session_io::send(&l, &io, id, flags, sent, may_commit);
                        reader.consume(end);
                    }
                    None => {
                        let mut batch = reader.data()[..end].to_vec();
                        reader.consume(end);
                        if !denied.is_empty() {
                            batch = deny_sync_commit(&batch, &denied);
                        }
                        if let Some(b) = identity::virtual_backend_pid(&batch, open.pid) {
                            batch = b;
                        }
                        if let Some((b, issued)) =
                            signal_calls(&io, &batch, open.pid, &mut signal_stmts)
                        {
                            batch = b;
                            io.expect_signals(&core.links, issued, open.pid);
                        }
                        // The slow path may change poolers: names are not sent; a PREPARE
                        // then keeps the client's name on a pinned backend.
                        let flags = if names_prepare {
                            flags | flags::PIN
                        } else {
                            flags
                        };
                        // Boxed: a re-open's state (waits for a primary, the login on the new
                        // pooler) exists only during a failover, not in every idle session's task.
                        let r = Box::pin(crate::failover::forward_slow(
                            &core, &io, id, &open, &batch, flags, may_commit,
                        ))
                        .await;
                        if r.is_err() {
                            break;
                        }
                    }
                }
            }
            if terminate || io.ended.get() {
                break;
            }
            if let Some(l) = io.current_link() {
                if l.out.is_full() {
                    l.out.wait_drain().await;
                }
            }
            // Per-session flow control of requests (`down::ACK`).
            io.wait_window().await;
            let want = shared::protocol::pending_message_len(reader.data()).unwrap_or(0);
            let ended = io.ended_notify.notified();
            let drain = core.drain_notify.listen();
            let ready = io.ready_notify.notified();
            if io.ended.get() {
                break;
            }
            // Idle: every request answered, no half-read message. A drain ends an idle session
            // outside a transaction at once, any session when the shutdown timeout passed; what
            // the client may have sent meanwhile is left unread, so it never ran.
            let idle = io.pending.get() == 0 && reader.data().is_empty();
            // What SHOW CLIENTS and SHOW STATS read (stores only this core makes).
            let stats = &me.client.stats;
            stats
                .queries
                .store(io.readies.get(), std::sync::atomic::Ordering::Relaxed);
            stats
                .xacts
                .store(io.xacts.get(), std::sync::atomic::Ordering::Relaxed);
            if idle {
                if let Some(t) = busy_since.take() {
                    crate::registry::bump(&stats.query_us, t.elapsed().as_micros() as u64);
                }
                if io.status.get() == b'I' {
                    if let Some(t) = xact_since.take() {
                        crate::registry::bump(&stats.xact_us, t.elapsed().as_micros() as u64);
                    }
                    me.client.set_state(crate::registry::state::IDLE);
                }
            }
            // KILL (admin console): at once, in a transaction or not.
            if me.client.killed() {
                io.client_out.push(&fatal(SHUTDOWN_CODE, SHUTDOWN));
                break;
            }
            if core.force.get() || (core.draining.get() && idle && io.status.get() == b'I') {
                io.client_out.push(&fatal(SHUTDOWN_CODE, SHUTDOWN));
                break;
            }
            // PgBouncer's client_idle_timeout and idle_transaction_timeout, timed from the moment
            // the session went idle (`ready` wakes the loop when the last answer arrives).
            let limit = match (idle, io.status.get()) {
                (false, _) => 0,
                (true, b'I') => core.cfg().client_idle_timeout_ms,
                (true, _) => core.cfg().idle_transaction_timeout_ms,
            };
            // One poll for every event the idle session waits on: the client, the pooler ending the
            // session, a drain, the last answer (when not idle) and the idle timeout. Hand-written
            // rather than a chain of `or` futures, which kept each branch's future (about 300 bytes)
            // in every idle session's task.
            let (mut ended, mut drain, mut ready) = (ended, drain, ready);
            let mut timer =
                (limit > 0).then(|| glommio::timer::Timer::new(Duration::from_millis(limit)));
            let wake = std::future::poll_fn(|cx| {
                if let Poll::Ready(r) = reader.poll_fill(cx, &mut rstream, want) {
                    return Poll::Ready(Wake::Read(r));
                }
                // The read buffer only matters while the read is polled: an idle session
                // keeps none (512 bytes of every idle client, perf/idle_memory.sh).
                reader.release_if_empty();
                if Pin::new(&mut ended).poll(cx).is_ready() {
                    return Poll::Ready(Wake::Ended);
                }
                if Pin::new(&mut drain).poll(cx).is_ready()
                    || (!idle && Pin::new(&mut ready).poll(cx).is_ready())
                {
                    return Poll::Ready(Wake::Again);
                }
                if let Some(t) = timer.as_mut() {
                    if Pin::new(t).poll(cx).is_ready() {
                        return Poll::Ready(Wake::Timeout);
                    }
                }
                Poll::Pending
            })
            .await;
            match wake {
                Wake::Read(Ok(n)) if n > 0 => {}
                Wake::Again => {}
                Wake::Timeout => {
                    let why = if io.status.get() == b'I' {
                        CLIENT_IDLE_TIMEOUT
                    } else {
                        IDLE_TRANSACTION_TIMEOUT
                    };
                    tracing::info!(session = id, reason = why, "disconnecting an idle client");
                    io.client_out.push(&fatal(TIMEOUT_CODE, why));
                    break;
                }
                _ => break,
            }
        }
        if let Some(l) = io.current_link() {
            l.unregister(id);
            if !io.ended.get() {
                l.send(up::CLOSE, id, &[]);
            }
        }
        io.client_out.close();
    }
}

/// What woke the request loop while it waited for the client.
enum Wake {
    Read(std::io::Result<usize>),
    /// The pooler ended the session.
    Ended,
    /// A drain started, or the session's last request was answered: look again.
    Again,
    /// The client stayed idle past its timeout.
    Timeout,
}

/// What Postgres says to its sessions when it shuts down (ProcessInterrupts, SIGTERM): drivers
/// and poolers know it means "reconnect".
const SHUTDOWN_CODE: &str = "57P01";
const SHUTDOWN: &str = "terminating connection due to administrator command";

/// PgBouncer's words and SQLSTATE (08P01) when it disconnects an idle client, so that what
/// operators grep for and drivers see is the same.
const TIMEOUT_CODE: &str = "08P01";
const CLIENT_IDLE_TIMEOUT: &str = "client_idle_timeout";
const IDLE_TRANSACTION_TIMEOUT: &str = "idle transaction timeout";

fn fatal(code: &str, msg: &str) -> Vec<u8> {
    let mut e = Vec::new();
    be::error_response(&mut e, Severity::Fatal, code, msg);
    e
}

/// Bytes written to a client before the gateway returns them to the pooler as credit: a quarter
/// of the pooler's per-session window (`pooler::backend::WINDOW`, 256 KiB).
const CREDIT_BATCH: usize = 64 * 1024;

/// The message the guard answers with (issue 5, point 3).
const SYNC_COMMIT_DENIED: &str =
    "permission denied to lower synchronous_commit: the cluster's durability policy requires it";

/// Replaces each statement that would lower synchronous_commit by one that fails on the backend
/// with 42501, so the error does to the transaction exactly what a Postgres error does (an
/// open transaction is aborted; in a multi-statement query nothing commits). Extended protocol:
/// the Parse keeps its name and parameter types, so Bind/Execute/Sync behave as for any failed
/// statement.
/// The batch with its `pg_cancel_backend`/`pg_terminate_backend` calls on sessions' pids
/// rewritten (signals.rs), and the signals the server may then allow. Not in a failed
/// transaction: the server refuses the statement, so nothing may be signalled.
fn signal_calls(
    io: &SessionIo,
    batch: &[u8],
    pid: i32,
    stmts: &mut signals::Statements,
) -> Option<(Vec<u8>, Vec<signals::Issued>)> {
    if io.status.get() == b'E' {
        return None;
    }
    signals::rewrite_batch(batch, pid, stmts)
}

fn deny_sync_commit(batch: &[u8], denied: &[usize]) -> Vec<u8> {
    let raise = format!(
        "DO $tidepool$BEGIN RAISE EXCEPTION USING ERRCODE = '42501', MESSAGE = '{}'; END$tidepool$",
        SYNC_COMMIT_DENIED.replace('\'', "''")
    );
    let mut out = Vec::with_capacity(batch.len() + raise.len());
    let mut i = 0;
    while i + 5 <= batch.len() {
        let len = i32::from_be_bytes([batch[i + 1], batch[i + 2], batch[i + 3], batch[i + 4]]);
        let next = (i + 1 + len.max(4) as usize).min(batch.len());
        let body = &batch[i + 5..next];
        if denied.contains(&i) {
            match batch[i] {
                fe::QUERY => {
                    let mut q = raise.as_bytes().to_vec();
                    q.push(0);
                    out.push(fe::QUERY);
                    out.extend_from_slice(&(q.len() as u32 + 4).to_be_bytes());
                    out.extend_from_slice(&q);
                }
                fe::PARSE => match fe::parse_parse(body) {
                    Ok(p) => {
                        let types = param_types_for(p.query, p.param_types);
                        fe::write_parse(&mut out, p.name, raise.as_bytes(), &types)
                    }
                    Err(_) => out.extend_from_slice(&batch[i..next]),
                },
                _ => out.extend_from_slice(&batch[i..next]),
            }
        } else {
            out.extend_from_slice(&batch[i..next]);
        }
        i = next;
    }
    out
}

/// Before a statement that may change settings, tells the pooler which custom settings it may
/// touch (see `up::WATCH`). Sent ahead of the MSGS frame that carries the statement.
fn watch_custom_settings(io: &SessionIo, id: u32, flags: u8, sql: &[u8]) {
    if flags & shared::link::flags::SNAPSHOT == 0 {
        return;
    }
    let Some(link) = io.current_link() else {
        return;
    };
    let names = crate::classify::custom_setting_names(sql);
    if names.is_empty() {
        return;
    }
    let mut payload = Vec::new();
    for n in names {
        shared::protocol::put_cstr(&mut payload, n.as_bytes());
    }
    link.send(up::WATCH, id, &payload);
}

/// Before a statement that drops, renames or copies a database: the pooler closes its idle
/// backends connected to it (see `classify::databases_to_release`).
fn release_databases(io: &SessionIo, id: u32, sql: &[u8]) {
    let dbs = crate::classify::databases_to_release(sql);
    if dbs.is_empty() {
        return;
    }
    let Some(link) = io.current_link() else {
        return;
    };
    for db in dbs {
        link.send(up::RELEASE_DB, id, db.as_bytes());
    }
}

/// The complete messages before a fatal protocol error still go to the pooler, as Postgres
/// would have run them before it read the bad one.
fn send_partial(io: &SessionIo, id: u32, flags: u8, msgs: &[u8]) {
    if let Some(l) = io.current_link().filter(|l| l.alive.get()) {
        session_io::send(&l, io, id, flags, msgs, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options() {
        let mut s = Settings::default();
        parse_options(
            "-c search_path=a,b --work-mem=4MB -cstatement_timeout=5s",
            &mut s,
        )
        .unwrap();
        assert_eq!(s.get("search_path"), Some("a,b"));
        assert_eq!(s.get("work_mem"), Some("4MB"));
        assert_eq!(s.get("statement_timeout"), Some("5s"));
        let mut s = Settings::default();
        parse_options("-c application_name=a\\ b", &mut s).unwrap();
        assert_eq!(s.get("application_name"), Some("a b"));
        assert!(parse_options("bogus", &mut Settings::default()).is_err());
        assert!(parse_options("-c", &mut Settings::default()).is_err());
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    /// The size of what calling `f` returns (a future), without calling it.
    #[allow(clippy::too_many_arguments)]
    fn output_size<F, A, B, C, D, E, G, H, I, R>(_: F) -> usize
    where
        F: FnOnce(A, B, C, D, E, G, H, I) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// What every idle session keeps on the heap besides its socket: the request loop's task
    /// and its `SessionIo` (perf/idle_memory.sh measures the whole). Sizes of a debug build,
    /// as the tests run; a release build's are no larger.
    #[test]
    fn an_idle_sessions_state_is_small() {
        let task = output_size(run::<glommio::net::TcpStream>);
        let io = std::mem::size_of::<SessionIo>();
        eprintln!("request loop {task} B, SessionIo {io} B");
        assert!(
            task <= 704,
            "the request loop's future grew to {task} bytes: box what it awaits rarely"
        );
        assert!(io <= 544, "SessionIo grew to {io} bytes");
    }
}
