//! A tiny raw Postgres protocol client: log in (trust, cleartext, md5 or SCRAM-SHA-256), then
//! send hand-built frontend messages and read backend messages as (type byte, body) pairs.
//!
//! It exists to compare what Postgres and the gateway send back for the identical byte
//! sequence, message for message, including the corners a driver hides (pipelines, Flush,
//! suspended portals, errors mid-pipeline).

use std::fmt;
use std::io;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, ScramSha256, SCRAM_SHA_256};
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One backend message.
#[derive(Clone, PartialEq, Eq)]
pub struct Message {
    pub tag: u8,
    pub body: Bytes,
}

/// An ErrorResponse or NoticeResponse, as (field type, value) pairs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    pub fields: Vec<(u8, String)>,
}

impl ServerError {
    fn parse(body: &[u8]) -> ServerError {
        let mut fields = Vec::new();
        let mut rest = body;
        while let Some((&kind, tail)) = rest.split_first() {
            if kind == 0 {
                break;
            }
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            fields.push((kind, String::from_utf8_lossy(&tail[..end]).into_owned()));
            rest = tail.get(end + 1..).unwrap_or(&[]);
        }
        ServerError { fields }
    }

    pub fn field(&self, kind: u8) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, v)| v.as_str())
    }

    /// SQLSTATE.
    pub fn code(&self) -> &str {
        self.field(b'C').unwrap_or("")
    }

    pub fn message(&self) -> &str {
        self.field(b'M').unwrap_or("")
    }

    pub fn severity(&self) -> &str {
        self.field(b'V').or(self.field(b'S')).unwrap_or("")
    }

    /// All fields but F, L and R (see [`Message::render`]), for comparing.
    pub fn render(&self) -> String {
        let fields: Vec<String> = self
            .fields
            .iter()
            .filter(|(k, _)| !matches!(k, b'F' | b'L' | b'R'))
            .map(|(k, v)| format!("{}={v:?}", *k as char))
            .collect();
        fields.join(" ")
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}: {} ({})",
            self.severity(),
            self.message(),
            self.code()
        )
    }
}

/// Why a login failed.
#[derive(Debug)]
pub enum ConnectError {
    Io(io::Error),
    /// The server answered with an ErrorResponse.
    Server(ServerError),
    /// The server said something this client does not understand at that point.
    Protocol(String),
}

impl fmt::Display for ConnectError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConnectError::Io(e) => write!(f, "io: {e}"),
            ConnectError::Server(e) => write!(f, "server: {e}"),
            ConnectError::Protocol(s) => write!(f, "protocol: {s}"),
        }
    }
}

impl std::error::Error for ConnectError {}

impl From<io::Error> for ConnectError {
    fn from(e: io::Error) -> Self {
        ConnectError::Io(e)
    }
}

/// A logged-in connection.
pub struct RawConn {
    stream: TcpStream,
    rbuf: BytesMut,
    /// ParameterStatus, BackendKeyData and notices received during login, before the first
    /// ReadyForQuery.
    pub startup: Vec<Message>,
    /// The authentication requests the server made, in order (3 cleartext, 5 md5, 10 SASL,
    /// 11 SASL continue, 12 SASL final, 0 ok).
    pub auth_requests: Vec<i32>,
}

fn protocol(what: impl Into<String>) -> ConnectError {
    ConnectError::Protocol(what.into())
}

impl RawConn {
    pub async fn connect(
        host: &str,
        port: u16,
        user: &str,
        password: &str,
        db: &str,
    ) -> Result<RawConn, ConnectError> {
        Self::connect_with(host, port, &[("user", user), ("database", db)], password).await
    }

    /// Logs in with the given startup parameters (must include `user`).
    pub async fn connect_with(
        host: &str,
        port: u16,
        params: &[(&str, &str)],
        password: &str,
    ) -> Result<RawConn, ConnectError> {
        let user = params
            .iter()
            .find(|(k, _)| *k == "user")
            .map(|(_, v)| *v)
            .ok_or_else(|| protocol("startup parameters without user"))?;
        let mut buf = BytesMut::new();
        frontend::startup_message(params.iter().copied(), &mut buf)?;
        Self::connect_with_packet(host, port, &buf, user, password).await
    }

    /// Logs in with a startup packet built by the caller (say, with parameters that are not
    /// UTF-8, see [`Frontend::raw`]); `user` is the name it carries (md5 hashes it).
    pub async fn connect_with_packet(
        host: &str,
        port: u16,
        packet: &[u8],
        user: &str,
        password: &str,
    ) -> Result<RawConn, ConnectError> {
        let stream =
            tokio::time::timeout(Duration::from_secs(10), TcpStream::connect((host, port)))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        let mut conn = RawConn {
            stream,
            rbuf: BytesMut::new(),
            startup: Vec::new(),
            auth_requests: Vec::new(),
        };
        conn.send(packet).await?;

        let mut scram: Option<ScramSha256> = None;
        loop {
            let msg = conn.recv_within(Duration::from_secs(20)).await?;
            let mut buf = BytesMut::new();
            match msg.tag {
                b'R' => {
                    let mut body = &msg.body[..];
                    if body.len() < 4 {
                        return Err(protocol("short Authentication message"));
                    }
                    let request = body.get_i32();
                    conn.auth_requests.push(request);
                    match request {
                        0 => {}
                        3 => {
                            frontend::password_message(password.as_bytes(), &mut buf)?;
                        }
                        5 => {
                            let salt: [u8; 4] = body
                                .get(..4)
                                .and_then(|s| s.try_into().ok())
                                .ok_or_else(|| protocol("md5 request without salt"))?;
                            let hash = md5_hash(user.as_bytes(), password.as_bytes(), salt);
                            frontend::password_message(hash.as_bytes(), &mut buf)?;
                        }
                        10 => {
                            let offered: Vec<&[u8]> =
                                body.split(|&b| b == 0).filter(|m| !m.is_empty()).collect();
                            if !offered.contains(&SCRAM_SHA_256.as_bytes()) {
                                return Err(protocol(format!("SASL mechanisms {offered:?}")));
                            }
                            let s = ScramSha256::new(
                                password.as_bytes(),
                                ChannelBinding::unsupported(),
                            );
                            frontend::sasl_initial_response(SCRAM_SHA_256, s.message(), &mut buf)?;
                            scram = Some(s);
                        }
                        11 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| protocol("SASLContinue before SASL"))?;
                            s.update(body)?;
                            frontend::sasl_response(s.message(), &mut buf)?;
                        }
                        12 => {
                            let s = scram
                                .as_mut()
                                .ok_or_else(|| protocol("SASLFinal before SASL"))?;
                            s.finish(body)?;
                        }
                        other => return Err(protocol(format!("authentication request {other}"))),
                    }
                    if !buf.is_empty() {
                        conn.send(&buf).await?;
                    }
                }
                b'E' => return Err(ConnectError::Server(ServerError::parse(&msg.body))),
                b'Z' => return Ok(conn),
                _ => conn.startup.push(msg),
            }
        }
    }

    /// A TCP connection on which nothing has been sent yet, for hand-made startup packets
    /// (garbage, half a packet, a CancelRequest); [`startup`](Self::startup) and
    /// [`auth_requests`](Self::auth_requests) stay empty.
    pub async fn tcp(host: &str, port: u16) -> io::Result<RawConn> {
        let stream =
            tokio::time::timeout(Duration::from_secs(10), TcpStream::connect((host, port)))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
        stream.set_nodelay(true)?;
        Ok(RawConn {
            stream,
            rbuf: BytesMut::new(),
            startup: Vec::new(),
            auth_requests: Vec::new(),
        })
    }

    /// The client's port of this connection.
    pub fn local_port(&self) -> u16 {
        self.stream.local_addr().map_or(0, |a| a.port())
    }

    /// (process id, secret key) from the BackendKeyData of the login.
    pub fn backend_key(&self) -> Option<(i32, i32)> {
        let k = self.startup.iter().find(|m| m.tag == b'K')?;
        let mut b = &k.body[..];
        (b.len() >= 8).then(|| (b.get_i32(), b.get_i32()))
    }

    /// Vanishes without a goodbye: no Terminate, and the close is a reset (SO_LINGER 0), as
    /// when a client machine dies or a process is killed with unread data.
    pub fn abort(self) {
        // Deprecated because a non-zero linger blocks the dropping thread; zero never does.
        #[allow(deprecated)]
        let _ = self.stream.set_linger(Some(Duration::ZERO));
        drop(self.stream);
    }

    /// Writes raw bytes (one or many frontend messages).
    pub async fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Writes `bytes` while reading what the server says meanwhile, up to and including a
    /// message tagged `until`, a close, or `timeout`. For a message a server may refuse
    /// before reading it whole (too large): a plain [`send`](Self::send) would block on a
    /// full socket buffer. Returns how the write ended and what was read.
    pub async fn send_while_reading(
        &mut self,
        bytes: &[u8],
        until: u8,
        timeout: Duration,
    ) -> (io::Result<()>, Vec<Event>) {
        let (mut rd, mut wr) = self.stream.split();
        let rbuf = &mut self.rbuf;
        let write = async {
            let r = wr.write_all(bytes).await;
            if r.is_err() {
                // Leave the reader to it: the server's answer may still be in our receive
                // buffer.
                std::future::pending::<()>().await;
            }
            r
        };
        let read = async {
            let mut out = Vec::new();
            loop {
                match read_message(&mut rd, rbuf).await {
                    Ok(msg) => {
                        let done = msg.tag == until;
                        out.push(Event::Message(msg));
                        if done {
                            return out;
                        }
                    }
                    Err(e) => {
                        out.push(Event::Closed(e.to_string()));
                        return out;
                    }
                }
            }
        };
        tokio::pin!(write, read);
        let mut written: Option<io::Result<()>> = None;
        let deadline = tokio::time::sleep(timeout);
        tokio::pin!(deadline);
        loop {
            tokio::select! {
                w = &mut write, if written.is_none() => written = Some(w),
                events = &mut read => {
                    let w = written.unwrap_or_else(|| {
                        Err(io::Error::new(io::ErrorKind::Interrupted, "write not finished"))
                    });
                    return (w, events);
                }
                _ = &mut deadline => {
                    let w = written.unwrap_or_else(|| {
                        Err(io::Error::new(io::ErrorKind::TimedOut, "write not finished"))
                    });
                    return (w, vec![Event::Timeout]);
                }
            }
        }
    }

    /// The next backend message.
    pub async fn recv(&mut self) -> io::Result<Message> {
        read_message(&mut self.stream, &mut self.rbuf).await
    }

    /// The next backend message, or a TimedOut error.
    pub async fn recv_within(&mut self, timeout: Duration) -> io::Result<Message> {
        tokio::time::timeout(timeout, self.recv())
            .await
            .map_err(|_| {
                io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("no message within {timeout:?}"),
                )
            })?
    }

    /// Messages up to and including the first whose tag is `until`. A timeout or a closed
    /// connection ends the list with an [`Event`] saying so rather than failing, so the caller
    /// can compare it with what the other server did.
    pub async fn recv_until(&mut self, until: u8, timeout: Duration) -> Vec<Event> {
        let mut out = Vec::new();
        loop {
            match self.recv_within(timeout).await {
                Ok(msg) => {
                    let done = msg.tag == until;
                    out.push(Event::Message(msg));
                    if done {
                        return out;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    out.push(Event::Timeout);
                    return out;
                }
                Err(e) => {
                    out.push(Event::Closed(e.to_string()));
                    return out;
                }
            }
        }
    }

    /// Messages that arrive within `quiet` of each other (to check that nothing more comes).
    pub async fn recv_idle(&mut self, quiet: Duration) -> Vec<Event> {
        let mut out = Vec::new();
        loop {
            match self.recv_within(quiet).await {
                Ok(msg) => out.push(Event::Message(msg)),
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return out,
                Err(e) => {
                    out.push(Event::Closed(e.to_string()));
                    return out;
                }
            }
        }
    }

    /// Sends Terminate and closes.
    pub async fn terminate(mut self) {
        let mut buf = BytesMut::new();
        frontend::terminate(&mut buf);
        let _ = self.send(&buf).await;
        let _ = self.stream.shutdown().await;
    }
}

/// The next backend message from `stream`, `rbuf` holding what was read beyond it.
async fn read_message<R: tokio::io::AsyncRead + Unpin>(
    stream: &mut R,
    rbuf: &mut BytesMut,
) -> io::Result<Message> {
    loop {
        if rbuf.len() >= 5 {
            let len = i32::from_be_bytes([rbuf[1], rbuf[2], rbuf[3], rbuf[4]]);
            if len < 4 {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("length {len}"),
                ));
            }
            let total = 1 + len as usize;
            if rbuf.len() >= total {
                let mut frame = rbuf.split_to(total);
                let tag = frame[0];
                frame.advance(5);
                return Ok(Message {
                    tag,
                    body: frame.freeze(),
                });
            }
        }
        let n = stream.read_buf(rbuf).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "server closed the connection",
            ));
        }
    }
}

/// What a read produced.
#[derive(Clone, PartialEq, Eq)]
pub enum Event {
    Message(Message),
    Timeout,
    Closed(String),
}

impl fmt::Debug for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Event::Message(m) => write!(f, "{}", m.render()),
            Event::Timeout => write!(f, "<no message within the timeout>"),
            Event::Closed(why) => write!(f, "<connection closed: {why}>"),
        }
    }
}

impl fmt::Debug for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.render())
    }
}

fn cstr(body: &mut &[u8]) -> String {
    let end = body.iter().position(|&b| b == 0).unwrap_or(body.len());
    let s = String::from_utf8_lossy(&body[..end]).into_owned();
    *body = body.get(end + 1..).unwrap_or(&[]);
    s
}

/// A value as text when it is printable UTF-8, else as hex (binary format results).
fn show_value(v: &[u8]) -> String {
    match std::str::from_utf8(v) {
        Ok(s) if s.chars().all(|c| !c.is_control() || c == '\n' || c == '\t') => format!("{s:?}"),
        _ => format!(
            "0x{}",
            v.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    }
}

impl Message {
    /// A readable, comparable rendering. Only what legitimately differs between Postgres and
    /// the gateway is left out:
    /// - ErrorResponse/NoticeResponse fields F, L, R (source file, line and routine of the
    ///   server code that raised it): a proxy that raises the same error itself cannot know
    ///   them, and no client acts on them;
    /// - the process id in NotificationResponse and the pid/key in BackendKeyData: those name
    ///   a backend process, which pooling changes by design.
    pub fn render(&self) -> String {
        let mut b = &self.body[..];
        match self.tag {
            b'1' => "ParseComplete".into(),
            b'2' => "BindComplete".into(),
            b'3' => "CloseComplete".into(),
            b'n' => "NoData".into(),
            b's' => "PortalSuspended".into(),
            b'I' => "EmptyQueryResponse".into(),
            b'c' => "CopyDone".into(),
            b'Z' => format!(
                "ReadyForQuery({})",
                b.first().map(|&c| c as char).unwrap_or('?')
            ),
            b'C' => format!("CommandComplete({:?})", cstr(&mut b)),
            b'S' => {
                let name = cstr(&mut b);
                format!("ParameterStatus({name}={:?})", cstr(&mut b))
            }
            b'K' => "BackendKeyData".into(),
            b'E' | b'N' => {
                let name = if self.tag == b'E' {
                    "ErrorResponse"
                } else {
                    "NoticeResponse"
                };
                format!("{name}({})", ServerError::parse(&self.body).render())
            }
            b'A' => {
                if b.len() < 4 {
                    return format!("NotificationResponse(<short: {}>)", show_value(b));
                }
                b.advance(4); // sending backend's pid: see above
                let channel = cstr(&mut b);
                format!("NotificationResponse({channel:?}, {:?})", cstr(&mut b))
            }
            b'T' if b.len() >= 2 => {
                let n = b.get_i16();
                let mut cols = Vec::new();
                for _ in 0..n {
                    let name = cstr(&mut b);
                    if b.len() < 18 {
                        cols.push(format!("{name}:<short>"));
                        break;
                    }
                    let (table, attnum, typ, typlen, typmod, format) = (
                        b.get_u32(),
                        b.get_i16(),
                        b.get_u32(),
                        b.get_i16(),
                        b.get_i32(),
                        b.get_i16(),
                    );
                    cols.push(format!(
                        "{name}(table={table} col={attnum} type={typ} len={typlen} mod={typmod} fmt={format})"
                    ));
                }
                format!("RowDescription[{}]", cols.join(", "))
            }
            b'D' if b.len() >= 2 => {
                let n = b.get_i16();
                let mut vals = Vec::new();
                for _ in 0..n {
                    if b.len() < 4 {
                        vals.push("<short>".to_string());
                        break;
                    }
                    let len = b.get_i32();
                    if len < 0 {
                        vals.push("NULL".into());
                    } else {
                        let len = (len as usize).min(b.len());
                        vals.push(show_value(&b[..len]));
                        b.advance(len);
                    }
                }
                format!("DataRow[{}]", vals.join(", "))
            }
            b't' if b.len() >= 2 => {
                let n = b.get_i16();
                let types: Vec<String> = (0..n)
                    .filter(|_| b.len() >= 4)
                    .map(|_| b.get_u32().to_string())
                    .collect();
                format!("ParameterDescription[{}]", types.join(", "))
            }
            b'G' | b'H' | b'W' if b.len() >= 3 => {
                let name = match self.tag {
                    b'G' => "CopyInResponse",
                    b'H' => "CopyOutResponse",
                    _ => "CopyBothResponse",
                };
                let format = b.get_i8();
                let n = b.get_i16();
                let cols: Vec<String> = (0..n)
                    .filter(|_| b.len() >= 2)
                    .map(|_| b.get_i16().to_string())
                    .collect();
                format!("{name}(format={format} cols=[{}])", cols.join(","))
            }
            b'd' => format!("CopyData({})", show_value(b)),
            tag => format!("Message({:?}, {})", tag as char, show_value(b)),
        }
    }

    /// The ErrorResponse/NoticeResponse fields, when it is one.
    pub fn error(&self) -> Option<ServerError> {
        matches!(self.tag, b'E' | b'N').then(|| ServerError::parse(&self.body))
    }
}

/// Builds a sequence of frontend messages.
#[derive(Default, Clone)]
pub struct Frontend {
    buf: BytesMut,
}

/// A Bind parameter: `None` is NULL.
pub type Param<'a> = Option<&'a [u8]>;

impl Frontend {
    pub fn new() -> Frontend {
        Frontend::default()
    }

    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    pub fn query(mut self, sql: &str) -> Self {
        frontend::query(sql, &mut self.buf).expect("query message");
        self
    }

    /// A Query whose text is any bytes (NULs inside, invalid UTF-8), NUL-terminated.
    pub fn query_bytes(self, sql: &[u8]) -> Self {
        let mut body = sql.to_vec();
        body.push(0);
        self.message(b'Q', &body)
    }

    /// Any typed message: `tag`, a correct length, `body`.
    pub fn message(mut self, tag: u8, body: &[u8]) -> Self {
        self.buf.put_u8(tag);
        self.buf.put_i32(body.len() as i32 + 4);
        self.buf.put_slice(body);
        self
    }

    /// Bytes as they are (a lying length word, half a message, garbage).
    pub fn raw(mut self, bytes: &[u8]) -> Self {
        self.buf.put_slice(bytes);
        self
    }

    /// A protocol 3.0 startup packet with these parameters.
    pub fn startup(mut self, params: &[(&str, &str)]) -> Self {
        frontend::startup_message(params.iter().copied(), &mut self.buf).expect("startup packet");
        self
    }

    /// A protocol 3.0 startup packet whose names and values are any bytes.
    pub fn startup_bytes(mut self, params: &[(&[u8], &[u8])]) -> Self {
        let mut body = Vec::new();
        body.extend_from_slice(&196_608i32.to_be_bytes());
        for (k, v) in params {
            body.extend_from_slice(k);
            body.push(0);
            body.extend_from_slice(v);
            body.push(0);
        }
        body.push(0);
        self.buf.put_i32(body.len() as i32 + 4);
        self.buf.put_slice(&body);
        self
    }

    /// A CancelRequest packet.
    pub fn cancel_request(mut self, pid: i32, secret: i32) -> Self {
        frontend::cancel_request(pid, secret, &mut self.buf);
        self
    }

    /// Parse with the given parameter type OIDs (0 = let the server infer).
    pub fn parse(mut self, name: &str, sql: &str, param_types: &[u32]) -> Self {
        frontend::parse(name, sql, param_types.iter().copied(), &mut self.buf)
            .expect("parse message");
        self
    }

    /// Bind with text-format parameters and results.
    pub fn bind(self, portal: &str, statement: &str, params: &[Param]) -> Self {
        self.bind_formats(portal, statement, &[], params, &[])
    }

    /// Bind with explicit parameter and result format codes (0 text, 1 binary).
    pub fn bind_formats(
        mut self,
        portal: &str,
        statement: &str,
        param_formats: &[i16],
        params: &[Param],
        result_formats: &[i16],
    ) -> Self {
        frontend::bind(
            portal,
            statement,
            param_formats.iter().copied(),
            params.iter().copied(),
            |value, buf| match value {
                Some(bytes) => {
                    buf.put_slice(bytes);
                    Ok(postgres_protocol::IsNull::No)
                }
                None => Ok(postgres_protocol::IsNull::Yes),
            },
            result_formats.iter().copied(),
            &mut self.buf,
        )
        .map_err(|_| ())
        .expect("bind message");
        self
    }

    pub fn describe_statement(mut self, name: &str) -> Self {
        frontend::describe(b'S', name, &mut self.buf).expect("describe message");
        self
    }

    pub fn describe_portal(mut self, name: &str) -> Self {
        frontend::describe(b'P', name, &mut self.buf).expect("describe message");
        self
    }

    /// Execute with a row limit (0 = all rows).
    pub fn execute(mut self, portal: &str, max_rows: i32) -> Self {
        frontend::execute(portal, max_rows, &mut self.buf).expect("execute message");
        self
    }

    pub fn close_statement(mut self, name: &str) -> Self {
        frontend::close(b'S', name, &mut self.buf).expect("close message");
        self
    }

    pub fn close_portal(mut self, name: &str) -> Self {
        frontend::close(b'P', name, &mut self.buf).expect("close message");
        self
    }

    pub fn sync(mut self) -> Self {
        frontend::sync(&mut self.buf);
        self
    }

    pub fn flush(mut self) -> Self {
        frontend::flush(&mut self.buf);
        self
    }

    pub fn copy_data(mut self, data: &[u8]) -> Self {
        frontend::CopyData::new(data)
            .expect("copy data")
            .write(&mut self.buf);
        self
    }

    pub fn copy_done(mut self) -> Self {
        frontend::copy_done(&mut self.buf);
        self
    }

    pub fn copy_fail(mut self, message: &str) -> Self {
        frontend::copy_fail(message, &mut self.buf).expect("copy fail message");
        self
    }

    /// Parse + Bind + Execute of the unnamed statement and portal, text format.
    pub fn run(self, sql: &str, params: &[Param]) -> Self {
        self.parse("", sql, &[]).bind("", "", params).execute("", 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_error_without_source_location() {
        let mut body = Vec::new();
        for (k, v) in [
            (b'S', "ERROR"),
            (b'C', "22012"),
            (b'M', "division by zero"),
            (b'F', "int.c"),
            (b'L', "841"),
        ] {
            body.push(k);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let m = Message {
            tag: b'E',
            body: Bytes::from(body),
        };
        assert_eq!(
            m.render(),
            r#"ErrorResponse(S="ERROR" C="22012" M="division by zero")"#
        );
        assert_eq!(
            m.error().map(|e| e.code().to_string()),
            Some("22012".into())
        );
    }

    #[test]
    fn frontend_builds_frames() {
        let f = Frontend::new().parse("s", "select 1", &[]).sync();
        assert_eq!(f.bytes()[0], b'P');
        assert_eq!(&f.bytes()[f.bytes().len() - 5..], &[b'S', 0, 0, 0, 4]);
    }
}
