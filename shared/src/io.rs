//! Small single-threaded async helpers shared by the thread-per-core processes. They are
//! runtime-agnostic (std `Waker` and `futures-io` traits) and lock-free: everything here lives on
//! one executor, so `Cell`/`RefCell` suffice.

use futures_lite::{AsyncRead, AsyncWrite, AsyncWriteExt};
use std::cell::{Cell, RefCell};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};

/// Wakes every task waiting on it. A waiter that registered before a `notify` is ready.
///
/// Almost every `Notify` has at most one waiter (a session's task, a link's writer): that one is
/// kept inline, and the rare others in a boxed `Vec`, so a notify is 32 bytes and an idle
/// connection's notifies hold no heap block (a gateway session has seven of them).
#[derive(Default)]
pub struct Notify {
    generation: Cell<u64>,
    first: Cell<Option<Waker>>,
    // Boxed on purpose: 8 bytes inline instead of a `Vec`'s 24, in every notify of every idle
    // session; the extra allocation happens only for a second waiter.
    #[allow(clippy::box_collection)]
    more: Cell<Option<Box<Vec<Waker>>>>,
}

impl Notify {
    pub fn notify(&self) {
        self.generation.set(self.generation.get().wrapping_add(1));
        if let Some(w) = self.first.take() {
            w.wake();
        }
        let Some(mut more) = self.more.take() else {
            return;
        };
        for w in more.drain(..) {
            w.wake();
        }
        // Keep the allocation for the next round (only notifies with several waiters get here),
        // unless a waker registered again meanwhile.
        if let Some(newer) = self.more.take() {
            more = newer;
        }
        self.more.set(Some(more));
    }

    pub fn notified(&self) -> Notified<'_> {
        Notified {
            notify: self,
            start: self.generation.get(),
        }
    }

    /// Registers `waker` unless it is registered already.
    fn register(&self, waker: &Waker) {
        match self.first.take() {
            None => self.first.set(Some(waker.clone())),
            Some(w) => {
                let same = w.will_wake(waker);
                self.first.set(Some(w));
                if !same {
                    let mut more = self.more.take().unwrap_or_default();
                    if !more.iter().any(|w| w.will_wake(waker)) {
                        more.push(waker.clone());
                    }
                    self.more.set(Some(more));
                }
            }
        }
    }
}

pub struct Notified<'a> {
    notify: &'a Notify,
    start: u64,
}

impl Future for Notified<'_> {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.notify.generation.get() != self.start {
            return Poll::Ready(());
        }
        self.notify.register(cx.waker());
        Poll::Pending
    }
}

/// Wakes every task waiting on it, for the notifies that every session of a core waits on for
/// its whole life (a drain, a KILL, a link coming up). Unlike [`Notify`], a waiter leaves when
/// its [`Listened`] future is dropped: a session that ends between two notifies takes its waker
/// with it. (With `Notify` the wakers of every session since the last drain stayed queued, each
/// keeping its ended task's memory, and each new waiter scanned them all: churn made the core's
/// drain notify grow by one waker per session, and every poll of every session walk it.)
///
/// Registering, re-polling and leaving are O(1): each waiter owns a slot of a slab, reused once
/// freed. A notify, rare, is O(slots).
#[derive(Default)]
pub struct Broadcast {
    generation: Cell<u64>,
    slots: RefCell<Vec<Option<Waker>>>,
    free: RefCell<Vec<u32>>,
}

/// A waiter's slot: none yet.
const NO_SLOT: u32 = u32::MAX;

impl Broadcast {
    pub fn notify(&self) {
        self.generation.set(self.generation.get().wrapping_add(1));
        // Taken out before waking: a waker may drop a `Listened` of this broadcast.
        let woken: Vec<Waker> = self
            .slots
            .borrow_mut()
            .iter_mut()
            .filter_map(Option::take)
            .collect();
        for w in woken {
            w.wake();
        }
    }

    pub fn listen(&self) -> Listened<'_> {
        Listened {
            broadcast: self,
            start: self.generation.get(),
            slot: NO_SLOT,
        }
    }

    /// Slots in use (for tests and metrics).
    pub fn waiters(&self) -> usize {
        self.slots.borrow().len() - self.free.borrow().len()
    }
}

pub struct Listened<'a> {
    broadcast: &'a Broadcast,
    start: u64,
    slot: u32,
}

impl Future for Listened<'_> {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let b = self.broadcast;
        if b.generation.get() != self.start {
            return Poll::Ready(());
        }
        let mut slots = b.slots.borrow_mut();
        if self.slot == NO_SLOT {
            let slot = match b.free.borrow_mut().pop() {
                Some(i) => i,
                None => {
                    slots.push(None);
                    (slots.len() - 1) as u32
                }
            };
            self.slot = slot;
        }
        let w = &mut slots[self.slot as usize];
        if !w.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
            *w = Some(cx.waker().clone());
        }
        Poll::Pending
    }
}

impl Drop for Listened<'_> {
    fn drop(&mut self) {
        if self.slot == NO_SLOT {
            return;
        }
        let b = self.broadcast;
        if let Some(w) = b.slots.borrow_mut().get_mut(self.slot as usize) {
            *w = None;
        }
        b.free.borrow_mut().push(self.slot);
    }
}

/// A one-shot value handed from one task to another on the same thread.
pub struct Slot<T> {
    value: RefCell<Option<T>>,
    notify: Notify,
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Slot {
            value: RefCell::new(None),
            notify: Notify::default(),
        }
    }
}

impl<T> Slot<T> {
    pub fn put(&self, v: T) {
        *self.value.borrow_mut() = Some(v);
        self.notify.notify();
    }

    pub fn is_filled(&self) -> bool {
        self.value.borrow().is_some()
    }

    pub fn try_take(&self) -> Option<T> {
        self.value.borrow_mut().take()
    }

    pub async fn take(&self) -> T {
        loop {
            let notified = self.notify.notified();
            if let Some(v) = self.value.borrow_mut().take() {
                return v;
            }
            notified.await;
        }
    }
}

/// An output buffer that many tasks append whole messages or frames to, drained by one writer
/// task: frames of many sessions leave in one socket write, and ordering is the order of the
/// appends (which are synchronous).
pub struct OutQueue {
    buf: RefCell<Vec<u8>>,
    spare: RefCell<Vec<u8>>,
    closed: Cell<bool>,
    failed: Cell<bool>,
    data: Notify,
    drained: Notify,
    high_water: usize,
    keep_capacity: usize,
}

impl OutQueue {
    /// `high_water`: above this many queued bytes, producers should `wait_drain` before adding
    /// more. `keep_capacity`: buffers larger than this are given back after a write, so an idle
    /// connection holds no large buffer.
    pub fn new(high_water: usize, keep_capacity: usize) -> Self {
        OutQueue {
            buf: RefCell::new(Vec::new()),
            spare: RefCell::new(Vec::new()),
            closed: Cell::new(false),
            failed: Cell::new(false),
            data: Notify::default(),
            drained: Notify::default(),
            high_water,
            keep_capacity,
        }
    }

    #[inline]
    pub fn push_with(&self, f: impl FnOnce(&mut Vec<u8>)) {
        let mut b = self.buf.borrow_mut();
        let was_empty = b.is_empty();
        f(&mut b);
        if was_empty && !b.is_empty() {
            drop(b);
            self.data.notify();
        }
    }

    #[inline]
    pub fn push(&self, bytes: &[u8]) {
        self.push_with(|b| b.extend_from_slice(bytes));
    }

    pub fn len(&self) -> usize {
        self.buf.borrow().len()
    }

    pub fn is_empty(&self) -> bool {
        self.buf.borrow().is_empty()
    }

    pub fn is_full(&self) -> bool {
        self.buf.borrow().len() >= self.high_water
    }

    /// The writer failed or the queue was closed: appends go nowhere.
    pub fn is_dead(&self) -> bool {
        self.failed.get() || self.closed.get()
    }

    /// Waits until the queue is below its high-water mark (or dead).
    pub async fn wait_drain(&self) {
        loop {
            let n = self.drained.notified();
            if !self.is_full() || self.is_dead() {
                return;
            }
            n.await;
        }
    }

    /// Waits until everything queued so far was written (or the writer died).
    pub async fn flushed(&self) {
        loop {
            let n = self.drained.notified();
            if self.is_empty() || self.is_dead() {
                return;
            }
            n.await;
        }
    }

    /// Empties the queue and clears its closed/failed state, for a new connection.
    pub fn reset(&self) {
        self.buf.borrow_mut().clear();
        self.closed.set(false);
        self.failed.set(false);
    }

    /// Ends the writer once what is queued has been written.
    pub fn close(&self) {
        self.closed.set(true);
        self.data.notify();
    }

    /// Drains the queue into `w` until closed or a write fails.
    pub async fn run_writer<W: AsyncWrite + Unpin>(&self, w: W) -> io::Result<()> {
        self.run_writer_with(w, |_| {}).await
    }

    /// As [`OutQueue::run_writer`], calling `written(n)` after each write of `n` bytes.
    pub async fn run_writer_with<W: AsyncWrite + Unpin>(
        &self,
        mut w: W,
        written: impl Fn(usize),
    ) -> io::Result<()> {
        let result = async {
            loop {
                let n = self.data.notified();
                if self.buf.borrow().is_empty() {
                    if self.closed.get() {
                        let _ = w.close().await;
                        return Ok(());
                    }
                    n.await;
                    continue;
                }
                let mut out = std::mem::take(&mut *self.spare.borrow_mut());
                std::mem::swap(&mut out, &mut *self.buf.borrow_mut());
                w.write_all(&out).await?;
                written(out.len());
                out.clear();
                if out.capacity() > self.keep_capacity {
                    out = Vec::new();
                }
                *self.spare.borrow_mut() = out;
                self.drained.notify();
            }
        }
        .await;
        if result.is_err() {
            self.failed.set(true);
            self.buf.borrow_mut().clear();
            self.drained.notify();
        }
        result
    }
}

/// A stream shared by a reading task and a writing task on the same thread. Neither holds the
/// borrow across an await, so the `RefCell` never conflicts; reads and writes register their own
/// wakers in the stream.
pub struct RcStream<S>(pub Rc<RefCell<S>>);

impl<S> Clone for RcStream<S> {
    fn clone(&self) -> Self {
        RcStream(self.0.clone())
    }
}

impl<S> RcStream<S> {
    pub fn new(s: S) -> Self {
        RcStream(Rc::new(RefCell::new(s)))
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for RcStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for RcStream<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_flush(cx)
    }
    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0.borrow_mut()).poll_close(cx)
    }
}

/// Reads whole messages from a stream into a buffer that starts small and shrinks back after a
/// burst, so an idle connection costs a few hundred bytes, not a 16 KiB buffer.
///
/// The buffer stays initialised up to its length (`buf.len()` is its capacity in use); `start..end`
/// holds unconsumed bytes. Reads go straight into `end..`, with no zero-filling per read.
pub struct MessageReader {
    buf: Vec<u8>,
    start: usize,
    end: usize,
    idle_capacity: usize,
}

impl MessageReader {
    pub fn new(idle_capacity: usize) -> Self {
        MessageReader {
            buf: Vec::new(),
            start: 0,
            end: 0,
            idle_capacity,
        }
    }

    /// Gives the buffer back when it holds nothing: for a connection that waits far longer
    /// than it reads (an idle client), whose reads need the buffer only while they are polled.
    /// The next read allocates it again (one small allocation per wait, from the allocator's
    /// thread cache).
    pub fn release_if_empty(&mut self) {
        if self.start == self.end && !self.buf.is_empty() {
            self.buf = Vec::new();
            self.start = 0;
            self.end = 0;
        }
    }

    /// Appends bytes already read elsewhere.
    pub fn push_bytes(&mut self, b: &[u8]) {
        self.make_room(b.len());
        self.buf[self.end..self.end + b.len()].copy_from_slice(b);
        self.end += b.len();
    }

    /// Unconsumed bytes.
    #[inline]
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    #[inline]
    pub fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.end {
            self.start = 0;
            self.end = 0;
            // After a large message, give the memory back.
            if self.buf.len() > self.idle_capacity * 16 {
                self.buf = Vec::new();
            }
        }
    }

    /// Ensures at least `n` bytes of room after `end`, moving unconsumed bytes to the front or
    /// growing the buffer as needed.
    fn make_room(&mut self, n: usize) {
        if self.buf.len() - self.end >= n {
            return;
        }
        if self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
            if self.buf.len() - self.end >= n {
                return;
            }
        }
        let want = (self.end + n).max(self.idle_capacity).next_power_of_two();
        self.buf.resize(want, 0);
    }

    /// Reads more bytes; `want` is how many bytes the caller needs in total (a hint for a large
    /// message). Returns 0 at end of stream.
    pub async fn fill<R: AsyncRead + Unpin>(
        &mut self,
        r: &mut R,
        want: usize,
    ) -> io::Result<usize> {
        std::future::poll_fn(|cx| self.poll_fill(cx, r, want)).await
    }

    /// `fill` as a poll, for a task that waits on the client and on other events at once
    /// without a future per wait in its state.
    pub fn poll_fill<R: AsyncRead + Unpin>(
        &mut self,
        cx: &mut Context<'_>,
        r: &mut R,
        want: usize,
    ) -> Poll<io::Result<usize>> {
        let have = self.end - self.start;
        let need = want.saturating_sub(have).clamp(1, 1 << 20);
        self.make_room(need.max(self.idle_capacity.min(4096)));
        let n = std::task::ready!(Pin::new(r).poll_read(cx, &mut self.buf[self.end..]))?;
        self.end += n;
        Poll::Ready(Ok(n))
    }
}

/// A listening socket with `SO_REUSEADDR` (restarts are not blocked by TIME_WAIT) and
/// `SO_REUSEPORT` (one listener per core, and several processes, on one port), non-blocking.
pub fn reuseport_listener(addr: &str) -> io::Result<std::net::TcpListener> {
    use std::net::ToSocketAddrs;
    let addr = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "empty address"))?;
    let domain = if addr.is_ipv6() {
        socket2::Domain::IPV6
    } else {
        socket2::Domain::IPV4
    };
    let s = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(4096)?;
    Ok(s.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_reads_grows_and_shrinks() {
        let data: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let mut src = futures_lite::io::Cursor::new(data.clone());
        let mut r = MessageReader::new(512);
        let mut got = Vec::new();
        futures_lite::future::block_on(async {
            loop {
                let n = r.fill(&mut src, 70_000).await.unwrap();
                if n == 0 {
                    break;
                }
                let take = r.data().len() / 2 + 1;
                got.extend_from_slice(&r.data()[..take]);
                r.consume(take);
            }
        });
        got.extend_from_slice(r.data());
        let rest = r.data().len();
        r.consume(rest);
        assert_eq!(got, data);
        assert!(r.buf.is_empty(), "large buffer given back when empty");
        r.push_bytes(b"abc");
        assert_eq!(r.data(), b"abc");
    }

    /// A waker that counts its wakes.
    struct Count(std::sync::atomic::AtomicUsize);

    impl std::task::Wake for Count {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    fn counter() -> (std::sync::Arc<Count>, Waker) {
        let c = std::sync::Arc::new(Count(Default::default()));
        (c.clone(), Waker::from(c))
    }

    fn wakes(c: &Count) -> usize {
        c.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    #[test]
    fn an_empty_reader_gives_its_buffer_back() {
        let mut r = MessageReader::new(512);
        r.push_bytes(b"Q\0\0\0\x05x");
        r.release_if_empty();
        assert_eq!(r.data(), b"Q\0\0\0\x05x", "unread bytes are kept");
        r.consume(4);
        r.release_if_empty();
        assert_eq!(r.data(), b"\x05x");
        r.consume(2);
        r.release_if_empty();
        assert_eq!(r.buf.capacity(), 0, "nothing unread: no buffer");
        let mut src = futures_lite::io::Cursor::new(b"abc".to_vec());
        let n = futures_lite::future::block_on(r.fill(&mut src, 0)).unwrap();
        assert_eq!(
            (n, r.data()),
            (3, &b"abc"[..]),
            "the next read allocates again"
        );
    }

    /// The waiters past the first.
    fn more(n: &Notify) -> Vec<Waker> {
        let v = n.more.take();
        let out = v.as_deref().cloned().unwrap_or_default();
        n.more.set(v);
        out
    }

    #[test]
    fn a_broadcast_waiter_leaves_with_its_future_and_its_slot_is_reused() {
        let b = Broadcast::default();
        let (ca, a) = counter();
        let (cb, w) = counter();
        let mut fa = Box::pin(b.listen());
        for _ in 0..3 {
            assert!(fa.as_mut().poll(&mut Context::from_waker(&a)).is_pending());
        }
        assert_eq!(b.waiters(), 1, "polled again and again: one slot");
        // A thousand sessions come and go between two notifies: nothing stays behind.
        for _ in 0..1000 {
            let mut f = Box::pin(b.listen());
            assert!(f.as_mut().poll(&mut Context::from_waker(&w)).is_pending());
        }
        assert_eq!(b.waiters(), 1);
        assert_eq!(b.slots.borrow().len(), 2, "one slot reused by all of them");
        b.notify();
        assert_eq!((wakes(&ca), wakes(&cb)), (1, 0));
        assert!(fa.as_mut().poll(&mut Context::from_waker(&a)).is_ready());
        drop(fa);
        assert_eq!(b.waiters(), 0);
        // Registered after the notify: waits for the next one; never polled: never counted.
        let mut fc = Box::pin(b.listen());
        let _unpolled = b.listen();
        assert!(fc.as_mut().poll(&mut Context::from_waker(&a)).is_pending());
        assert_eq!(b.waiters(), 1);
        b.notify();
        assert_eq!(wakes(&ca), 2);
        assert!(fc.as_mut().poll(&mut Context::from_waker(&a)).is_ready());
    }

    #[test]
    fn notify_is_small() {
        assert!(std::mem::size_of::<Notify>() <= 32);
    }

    #[test]
    fn notify_wakes_every_waiter_once_and_keeps_one_inline() {
        let n = Notify::default();
        let (ca, a) = counter();
        let (cb, b) = counter();
        let mut fa = Box::pin(n.notified());
        let mut fb = Box::pin(n.notified());
        for _ in 0..3 {
            // Polled again and again: registered once.
            assert!(fa.as_mut().poll(&mut Context::from_waker(&a)).is_pending());
        }
        assert!(more(&n).is_empty(), "one waiter: inline, no Vec");
        assert!(fb.as_mut().poll(&mut Context::from_waker(&b)).is_pending());
        assert!(fb.as_mut().poll(&mut Context::from_waker(&b)).is_pending());
        assert_eq!(more(&n).len(), 1);
        n.notify();
        assert_eq!((wakes(&ca), wakes(&cb)), (1, 1));
        assert!(fa.as_mut().poll(&mut Context::from_waker(&a)).is_ready());
        assert!(fb.as_mut().poll(&mut Context::from_waker(&b)).is_ready());
        // A waiter that registers after the notify waits for the next one.
        let mut fc = Box::pin(n.notified());
        assert!(fc.as_mut().poll(&mut Context::from_waker(&a)).is_pending());
        n.notify();
        assert_eq!(wakes(&ca), 2);
        assert!(fc.as_mut().poll(&mut Context::from_waker(&a)).is_ready());
        // Nothing registered: a notify wakes nobody.
        n.notify();
        assert_eq!((wakes(&ca), wakes(&cb)), (2, 1));
    }
}
