//! The gateway's end of its links to the pooler: a few per core, each shared by many sessions.
//! A link that drops is redialled; the sessions it carried are told and closed.

use glommio::net::TcpStream;
use shared::io::{MessageReader, Notify, OutQueue, RcStream, Slot};
use shared::link::{self, down, put_header, up, HEADER};
use shared::protocol::backend::{self as be, Severity};
use shared::settings::Settings;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::time::Duration;

/// What the link delivers to one session.
pub struct SessionIo {
    /// Bytes for the client, drained by the session's writer task.
    pub client_out: OutQueue,
    /// Startup replies (`AUTH_INFO`, `OPENED`, `OPEN_FAILED`).
    pub control: Slot<(u8, Vec<u8>)>,
    pub settings: RefCell<Settings>,
    /// The pooler ended the session, or the link died.
    pub ended: Cell<bool>,
    pub ended_notify: Notify,
}

impl SessionIo {
    pub fn new() -> Rc<SessionIo> {
        Rc::new(SessionIo {
            // A client that reads slowly makes the pooler wait (flow control), so this stays
            // around the pooler's window; give buffers above 16 KiB back when idle.
            client_out: OutQueue::new(256 * 1024, 16 * 1024),
            control: Slot::default(),
            settings: RefCell::new(Settings::default()),
            ended: Cell::new(false),
            ended_notify: Notify::default(),
        })
    }

    fn end(&self, last_words: Option<&[u8]>) {
        if self.ended.replace(true) {
            return;
        }
        if let Some(m) = last_words {
            self.client_out.push(m);
        }
        self.client_out.close();
        self.ended_notify.notify();
        // A session still logging in waits on `control`: wake it with an error.
        if !self.control.is_filled() {
            self.control.put((0, Vec::new()));
        }
    }
}

pub struct Link {
    pub out: OutQueue,
    sessions: RefCell<HashMap<u32, Rc<SessionIo>>>,
    pub alive: Cell<bool>,
    pub up_notify: Notify,
}

impl Link {
    pub fn new() -> Rc<Link> {
        Rc::new(Link {
            out: OutQueue::new(8 << 20, 1 << 20),
            sessions: RefCell::new(HashMap::new()),
            alive: Cell::new(false),
            up_notify: Notify::default(),
        })
    }

    pub fn register(&self, id: u32, io: Rc<SessionIo>) {
        self.sessions.borrow_mut().insert(id, io);
    }

    pub fn unregister(&self, id: u32) {
        self.sessions.borrow_mut().remove(&id);
    }

    pub fn send(&self, kind: u8, session: u32, payload: &[u8]) {
        self.out.push_with(|b| {
            put_header(b, kind, session, payload.len());
            b.extend_from_slice(payload);
        });
    }

    /// Keeps this link connected to the pooler for the life of the process.
    pub async fn maintain(self: Rc<Self>, addr: String) {
        let mut backoff = Duration::from_millis(20);
        loop {
            match TcpStream::connect(addr.as_str()).await {
                Ok(stream) => {
                    backoff = Duration::from_millis(20);
                    let _ = stream.set_nodelay(true);
                    self.serve(stream).await;
                    tracing::warn!(pooler = %addr, "link to pooler lost; redialling");
                }
                Err(e) => {
                    tracing::debug!(pooler = %addr, error = %e, "pooler not reachable");
                }
            }
            glommio::timer::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }

    async fn serve(self: &Rc<Self>, stream: TcpStream) {
        let stream = RcStream::new(stream);
        // Whatever was queued for a dead connection is meaningless to a new one.
        self.out.reset();
        let mut hello = Vec::new();
        link::put_frame(&mut hello, up::HELLO, 0, &link::VERSION.to_be_bytes());
        self.out.push(&hello);
        let me = self.clone();
        let wstream = stream.clone();
        // Dropping this task (below) cancels it, so two writers never drain one queue.
        let writer = glommio::spawn_local(async move { me.out.run_writer(wstream).await });
        self.alive.set(true);
        self.up_notify.notify();
        let mut rstream = stream;
        let mut reader = MessageReader::new(64 * 1024);
        loop {
            while let Some(h) = link::parse_header(reader.data()) {
                if reader.data().len() < HEADER + h.len {
                    break;
                }
                let payload = &reader.data()[HEADER..HEADER + h.len];
                self.on_frame(h.kind, h.session, payload);
                reader.consume(HEADER + h.len);
            }
            if self.out.is_dead() {
                break;
            }
            let want = link::parse_header(reader.data()).map_or(0, |h| HEADER + h.len);
            match reader.fill(&mut rstream, want).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
        self.alive.set(false);
        drop(writer);
        let mut e = Vec::new();
        be::error_response(
            &mut e,
            Severity::Fatal,
            "08006",
            "terminating connection: the gateway lost its link to the pooler",
        );
        let sessions: Vec<Rc<SessionIo>> =
            self.sessions.borrow_mut().drain().map(|(_, s)| s).collect();
        for s in sessions {
            s.end(Some(&e));
        }
    }

    fn on_frame(&self, kind: u8, id: u32, payload: &[u8]) {
        let Some(s) = self.sessions.borrow().get(&id).cloned() else {
            return;
        };
        match kind {
            down::DATA => s.client_out.push(payload),
            down::SETTINGS => {
                if let Ok(set) = Settings::decode(payload) {
                    *s.settings.borrow_mut() = set;
                }
            }
            down::CLOSED => {
                self.unregister(id);
                s.end(Some(payload));
            }
            down::AUTH_INFO | down::OPENED | down::OPEN_FAILED => {
                s.control.put((kind, payload.to_vec()))
            }
            _ => tracing::warn!(kind, "unknown frame from pooler"),
        }
    }
}
