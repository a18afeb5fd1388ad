//! One WebSocket connection after the upgrade: its reads, its writes, its close.
//!
//! A connection is not a task: it lives in the slab of one of the relay's reactors
//! (reactor.rs), whose epoll set holds its bare socket, and is polled when the socket reports
//! readiness or its [`Outbox`] wakes it. Reads are readiness-based: when bytes arrive they are
//! read into a buffer owned by the worker thread (`READ_BUF`), every complete frame is parsed in
//! place and only the bytes of an incomplete frame are kept. An idle connection therefore holds
//! no read buffer at all. Writes drain the outbox with vectored writes, so every frame queued
//! since the last write goes out in one system call. A frame for an idle plain connection
//! (nothing queued or half-written) does not wait for a poll at all: the fan-out writes it to
//! the socket itself (`Outbox::push_or_write`), as the heartbeat does its ping.
//!
//! Everything a connection can do wrong ends in exactly one visible outcome: an error event (the
//! connection stays open), or a close code — each counted in a metric.
//!
//! Limits that need a clock (an incomplete frame's age, a write's lack of progress) are checked
//! whenever the connection is polled, and the heartbeat wakes every connection that has such a
//! clock running once per interval, so no connection keeps a timer of its own. An idle plain
//! connection is not woken by the heartbeat: the sweeper writes its ping to the socket itself
//! (`Outbox::heartbeat`), and the pong wakes the connection like any read.
//!
//! With direct TLS the loop is the same: the connection keeps the bare socket and a boxed
//! [`Session`] (tls.rs), reads records through it and copies the plaintext into the same
//! per-thread buffer, and hands frames to it for encryption before the vectored write of the
//! records. Plain connections hold `None` there.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::task::Context;

use bytes::{Buf, Bytes};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::address::AddressSlot;
use crate::alloc::long_lived;
use crate::audit::{AuditEvent, Dialect as AuditDialect};
use crate::broker::{Publish, PublishError, Published, Reply};
use crate::frame::{self, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT, PING};
use crate::hub::{Greeting, Membership, Resume, Room, RoomReservation, Sender};
use crate::metrics::{AuthFailure, Dialect, Limit};
use crate::outbox::{Outbox, Pushed};
use crate::protocol::auth::{self as second, Command, Invalid};
use crate::protocol::{self, ClientMessage, ErrorCode};
use crate::rate::Window;
use crate::reactor::{Reactors, Source, Step};
use crate::relay::{ConnectionPermit, Credential, Registration, Relay};
use crate::socket::Socket;
use crate::ticket::Grant;
use crate::tls::{Received, Session};

/// Per worker thread read buffer. Large enough to take many frames in one read; never held
/// across an await, so it is shared by every connection the thread serves.
const READ_BUF_BYTES: usize = 64 * 1024;
/// Reads per poll before yielding to other connections (fairness under a flood): a socket that
/// is still readable after this many reads waits its turn behind its reactor's other
/// connections.
const READS_PER_WAKE: usize = 8;
/// Rounds of read, work and write per poll: an outbox that refills as fast as it drains (a
/// member of a busy room) still lets its reactor's other connections go.
const ROUNDS_PER_POLL: usize = 16;
/// Bytes a closing connection's peer may still send before we stop waiting for its close.
const CLOSE_DISCARD_BYTES: usize = 64 * 1024;
/// Frames gathered into one vectored write.
const IOV_MAX: usize = 64;

/// Read what the socket holds into `buf`. A read that leaves room in `buf` has drained the
/// socket (its epoll registration is edge-triggered), so it clears `readable` at once instead of
/// spending a second `recv` to learn it: one system call per wake instead of two, which is most
/// of a pong's cost on an idle connection. Safe against a race: bytes that arrive after the
/// read bring a new edge with them, which sets `readable` again.
fn read_draining(
    stream: &std::net::TcpStream,
    buf: &mut [u8],
    readable: &mut bool,
) -> io::Result<usize> {
    use std::io::Read;
    let r = (&*stream).read(buf);
    match &r {
        Ok(n) if *n > 0 && *n < buf.len() => *readable = false,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => *readable = false,
        _ => {}
    }
    r
}

thread_local! {
    static READ_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_BUF_BYTES].into_boxed_slice());
}

/// Who a connection is, from its upgrade request.
#[derive(Debug)]
pub struct Identity {
    /// The client's source address (the peer, or X-Forwarded-For from a trusted proxy), and
    /// its share of MAX_CONNECTIONS_PER_IP, held for the connection's life.
    pub address: AddressSlot,
    pub entry: Entry,
}

/// How the connection came in: which dialect, and what the upgrade already settled.
#[derive(Debug)]
pub enum Entry {
    /// The first dialect: `/chat?token&name&room`, token checked, room reserved.
    Query {
        name: String,
        /// Issued by the relay (or given back by the client from an earlier greeting): the key
        /// of requestId de-duplication.
        session: u128,
        room: RoomReservation,
        resume: Option<Resume>,
        /// False for a read-only ticket.
        publish: bool,
    },
    /// The second dialect: `GET /`; the token comes in the first message.
    Auth,
}

/// The rooms a connection is in.
enum Rooms {
    /// The first dialect: the one room of its upgrade URL (also who it is: `sender()`).
    One(Membership),
    /// The second dialect: boxed, so first-dialect connections do not pay for it.
    Many(Box<Chat>),
}

/// A second-dialect connection's state.
struct Chat {
    /// Set by a successful `auth`; before it, nothing joins, chats or receives.
    sender: Option<Arc<Sender>>,
    /// What a signed ticket allows (`None`: the static token, which allows everything).
    grant: Option<Box<Grant>>,
    rooms: Vec<Membership>,
}

impl Chat {
    fn room(&self, name: &str) -> Option<&Membership> {
        self.rooms.iter().find(|m| m.room().name() == name)
    }
}

/// How the read side wants the connection to go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Flow {
    Continue,
    /// We close with this code (a close frame is sent).
    Close(u16),
    /// We close with this code and reason (the second dialect's refusals).
    CloseWith(u16, &'static str),
    /// The peer sent a close frame with this code (1005: none); we echo it.
    PeerClosed(u16),
    /// The socket ended without a close frame.
    Dropped,
    /// The heartbeat found the peer silent: dropped without a close frame.
    Silent,
    /// A limit closes the connection (its code and reason come from the limit).
    Limit(Limit),
}

/// What a poll found to do (several at once, so a busy outbox never starves reading).
#[derive(Default)]
struct Ready {
    work: bool,
    readable: bool,
    writable: bool,
}

/// The close code and reason a limit closes with.
fn limit_close(limit: Limit) -> (u16, &'static str) {
    match limit {
        Limit::ControlFrames => (1008, "too many control frames"),
        Limit::IncompleteFrame => (1008, "message incomplete for too long"),
        Limit::WriteStall => (1013, "too slow: no write progress"),
        Limit::OutboxTotal => (1013, "too slow: outbound queue full"),
    }
}

/// Inbound bytes kept between reads: an incomplete frame, or a fragmented message being
/// reassembled. Allocated only while there is such a thing.
#[derive(Default)]
struct Inbound {
    partial: Vec<u8>,
    message: Vec<u8>,
    fragmented: bool,
    /// When the incomplete frame in `partial` started arriving (relay clock, ms).
    partial_since_ms: u32,
    /// When the fragmented message's first frame arrived (relay clock, ms).
    message_since_ms: u32,
}

impl Inbound {
    /// Whether a frame or a fragmented message has been incomplete for `limit_ms` or more.
    fn incomplete_for(&self, now_ms: u32, limit_ms: u32) -> bool {
        let too_old = |since: u32| now_ms.wrapping_sub(since) >= limit_ms;
        (!self.partial.is_empty() && too_old(self.partial_since_ms))
            || (self.fragmented && too_old(self.message_since_ms))
    }
}

/// Frames taken from the outbox that the socket has not taken yet. Lives on the stack during a
/// write; boxed into the connection only while the socket is not writable.
struct Pending {
    frames: VecDeque<Bytes>,
    /// The front frame is partly written; the close frame must not cut in before its end.
    front_started: bool,
    oldest: Option<Instant>,
    /// When a frame was last written whole (or, before that, when this write began):
    /// WRITE_STALL_MS is measured from here.
    progress_at: Instant,
    /// TLS: end the TLS session (close_notify) once the last frame is encrypted.
    close_notify: bool,
}

impl Default for Pending {
    fn default() -> Self {
        Pending {
            frames: VecDeque::new(),
            front_started: false,
            oldest: None,
            progress_at: Instant::now(),
            close_notify: false,
        }
    }
}

impl Pending {
    /// Write as much as the socket takes now, up to `IOV_MAX` frames per system call; with TLS,
    /// through the session (frames are encrypted as rustls' bounded buffer takes them, records
    /// written as the socket takes them).
    fn write_to(
        &mut self,
        socket: Socket<'_>,
        tls: Option<&mut Session>,
        outbox: &Outbox,
        metrics: &crate::metrics::Metrics,
    ) -> io::Result<()> {
        let all_written = match tls {
            None => self.write_plain(socket, outbox, metrics)?,
            Some(session) => self.write_tls(socket, session, outbox, metrics)?,
        };
        if !all_written {
            // The socket is full: the latency is recorded by the write that finishes.
            return Ok(());
        }
        if let Some(oldest) = self.oldest.take() {
            metrics
                .publish_to_write_seconds
                .record(oldest.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// Nothing is left to write: no frame, and with TLS no record and no close_notify.
    fn is_done(&self, tls: Option<&Session>) -> bool {
        self.frames.is_empty() && !self.close_notify && !tls.is_some_and(Session::wants_write)
    }

    /// Up to `IOV_MAX` frames from the front, for one vectored call.
    fn slices(&self) -> ([IoSlice<'_>; IOV_MAX], usize) {
        let mut slices = [IoSlice::new(&[]); IOV_MAX];
        let count = self.frames.len().min(IOV_MAX);
        for (slot, frame) in slices.iter_mut().zip(self.frames.iter()) {
            *slot = IoSlice::new(frame);
        }
        (slices, count)
    }

    /// Returns whether everything was written.
    fn write_plain(
        &mut self,
        mut socket: Socket<'_>,
        outbox: &Outbox,
        metrics: &crate::metrics::Metrics,
    ) -> io::Result<bool> {
        while !self.frames.is_empty() {
            let (slices, count) = self.slices();
            let written = match socket.write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            };
            metrics.socket_writes.increment(1);
            self.consumed(written, outbox);
        }
        Ok(true)
    }

    /// Records already encrypted go first; then frames are encrypted up to rustls' buffer limit
    /// and written, until both are empty or the socket is full. A frame counts as written (for
    /// the outbox charge and WRITE_STALL_MS) once rustls took it: what rustls holds is bounded
    /// by `tls::TLS_BUFFER_BYTES`, like what the kernel holds by SEND_BUFFER_BYTES. Returns
    /// whether everything (frames and records) was written.
    fn write_tls(
        &mut self,
        socket: Socket<'_>,
        session: &mut Session,
        outbox: &Outbox,
        metrics: &crate::metrics::Metrics,
    ) -> io::Result<bool> {
        loop {
            while session.wants_write() {
                match session.write_to(socket) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(_) => metrics.socket_writes.increment(1),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                    Err(e) => return Err(e),
                }
            }
            if self.frames.is_empty() {
                if !self.close_notify {
                    return Ok(true);
                }
                self.close_notify = false;
                session.send_close_notify();
                continue;
            }
            let (slices, count) = self.slices();
            let taken = session.encrypt(&slices[..count])?;
            if taken == 0 {
                // rustls' buffer is empty here (it was just written), so it always takes some.
                return Err(io::ErrorKind::WriteZero.into());
            }
            self.consumed(taken, outbox);
        }
    }

    /// `written` bytes from the front of the frames have left (to the socket, or to rustls).
    fn consumed(&mut self, written: usize, outbox: &Outbox) {
        let mut left = written;
        let mut completed = 0;
        while left > 0 {
            let front = self
                .frames
                .front_mut()
                .expect("written bytes belong to queued frames");
            if front.len() <= left {
                left -= front.len();
                self.frames.pop_front();
                self.front_started = false;
                completed += 1;
            } else {
                front.advance(left);
                left = 0;
                self.front_started = true;
            }
        }
        outbox.written(written, completed);
        if completed > 0 {
            self.progress_at = Instant::now();
        }
    }
}

/// One open WebSocket. This struct, in its reactor's slab, is the connection's whole state while
/// it is idle, so every field is here for a reason; ARCHITECTURE.md has the byte count.
pub(crate) struct Connection {
    /// The relay, reached through this connection's slot (MAX_CONNECTIONS): one pointer for
    /// both, and the slot is released exactly when the connection is dropped.
    relay: ConnectionPermit,
    /// The bare socket, in the reactor's epoll set. Taken only by `Closing::finish`, which hands
    /// it to tokio for the close handshake.
    stream: Option<std::net::TcpStream>,
    /// The socket's readiness: set by the reactor on an epoll edge, cleared when a read or a
    /// write finds it drained or full. Nothing is written while `writable` is false.
    readable: bool,
    writable: bool,
    outbox: Arc<Outbox>,
    /// Also who this connection is; leaves every room when dropped.
    rooms: Rooms,
    registration: Option<Registration>,
    rate: Window,
    abuse: Window,
    /// Pings, pongs and empty frames (CONTROL_FRAME_LIMIT).
    control: Window,
    /// The source address, its shared publish window (PUBLISH_RATE_PER_ADDRESS) and its
    /// connection slot (MAX_CONNECTIONS_PER_IP).
    address: AddressSlot,
    /// False for a read-only ticket's connection (first dialect; the second keeps its grant).
    may_publish: bool,
    /// When the upgrade completed (relay clock, ms): the auth deadline, the connection's age.
    opened_ms: u32,
    inbound: Option<Box<Inbound>>,
    pending: Option<Box<Pending>>,
    /// Direct TLS: the session after the upgrade (tls.rs). `None` for plain TCP.
    tls: Option<Box<Session>>,
}

/// Unregistering is a guard, so a connection that panics is still forgotten by the
/// heartbeat and shutdown. (Its `Membership` leaves the room the same way.)
impl Drop for Connection {
    fn drop(&mut self) {
        // Before the socket closes with the fields below.
        self.outbox.forbid_direct_writes();
        if let Some(r) = self.registration.take() {
            self.relay.registry.unregister(r);
        }
        let (dialect, rooms) = match &self.rooms {
            Rooms::One(_) => (Dialect::Query, 1),
            Rooms::Many(chat) => (Dialect::Auth, chat.rooms.len()),
        };
        let metrics = self.relay.metrics.dialect(dialect);
        metrics.connections.decrement(1.0);
        metrics.memberships.decrement(rooms as f64);
    }
}

/// The reactors of this process, started on the runtime of the first connection (and again if
/// that runtime has gone, which only happens to tests that run relays one after another).
static REACTORS: Mutex<Option<Arc<Reactors<Connection>>>> = Mutex::new(None);

/// The running reactors, one per runtime worker.
fn reactors() -> io::Result<Arc<Reactors<Connection>>> {
    let mut slot = REACTORS.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(reactors) = slot.as_ref().filter(|r| r.is_running()) {
        return Ok(reactors.clone());
    }
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    let reactors = Arc::new(Reactors::start(workers)?);
    *slot = Some(reactors.clone());
    Ok(reactors)
}

/// Start the reactors on the current runtime (the first connection would otherwise).
pub(crate) fn start_reactors() -> io::Result<()> {
    reactors().map(drop)
}

/// Open a connection after the upgrade and hand it to a reactor. `early` holds bytes the client
/// sent right behind its upgrade request (decrypted, with TLS; rustls may hold more).
pub(crate) fn spawn(
    relay: Arc<Relay>,
    stream: TcpStream,
    tls: Option<rustls::ServerConnection>,
    early: Bytes,
    who: Identity,
    permit: ConnectionPermit,
) {
    let outbox = long_lived(|| Arc::new(Outbox::default()));
    let now_ms = relay.now_ms();
    let mut may_publish = true;
    let rooms = match who.entry {
        Entry::Query {
            name,
            session,
            room,
            resume,
            publish,
        } => {
            may_publish = publish;
            let sender = long_lived(|| {
                Arc::new(Sender {
                    name: name.into(),
                    session,
                })
            });
            let metrics = relay.metrics.dialect(Dialect::Query);
            metrics.joins.increment(1);
            metrics.memberships.increment(1.0);
            Rooms::One(
                relay
                    .hub
                    .join(room, &outbox, sender, resume.as_ref(), Greeting::Query),
            )
        }
        Entry::Auth => {
            // The auth deadline needs a wake-up of its own (the heartbeat is too coarse for it):
            // a short-lived timer task that only nudges the connection, which checks the clock.
            // Not tracked: shutdown must not wait for it (it holds only a weak handle).
            let weak = Arc::downgrade(&outbox);
            let timeout = relay.settings.auth_timeout;
            tokio::spawn(async move {
                tokio::time::sleep(timeout).await;
                if let Some(outbox) = weak.upgrade() {
                    outbox.nudge();
                }
            });
            Rooms::Many(long_lived(|| {
                Box::new(Chat {
                    sender: None,
                    grant: None,
                    rooms: Vec::new(),
                })
            }))
        }
    };
    let dialect = match rooms {
        Rooms::One(_) => Dialect::Query,
        Rooms::Many(_) => Dialect::Auth,
    };
    relay.metrics.dialect(dialect).connections.increment(1.0);
    if let Some(bytes) = relay.settings.send_buffer_bytes {
        // Bound what the kernel buffers for a reader that stalls, so OUTBOX_MAX_BYTES (and 1013)
        // is reached after kilobytes rather than megabytes of someone else's messages.
        let _ = socket2::SockRef::from(&stream).set_send_buffer_size(bytes);
    }
    let registration = Some(relay.registry.register(&outbox));
    if relay.is_shutting_down() {
        // The upgrade completed after shutdown asked every registered connection to close:
        // this one gets its 1001 too. (Registering first, then reading the flag, means either
        // this check or the shutdown's sweep of the registry sees the connection.)
        outbox.close(1001);
    }
    relay.metrics.connections_opened.increment(1);
    let address = who.address;
    // Out of tokio's reactor (which frees its registration) and into ours below.
    let stream = match stream.into_std() {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(error = %e, "socket could not leave tokio's reactor");
            return;
        }
    };
    let mut conn = Connection {
        relay: permit,
        stream: Some(stream),
        readable: false,
        // A fresh socket takes writes (its first edge will say so too).
        writable: true,
        outbox,
        rooms,
        may_publish,
        opened_ms: now_ms,
        registration,
        rate: Window::new(now_ms),
        abuse: Window::new(now_ms),
        control: Window::new(now_ms),
        address,
        inbound: None,
        pending: None,
        tls: tls.map(Session::new),
    };
    #[allow(unsafe_code)]
    if conn.tls.is_none() {
        // SAFETY: the connection owns the socket and forbids direct writes before it closes it
        // or writes its close frame (`finish`, `Drop`); everything else it writes is queued in
        // the outbox first and charged until written.
        unsafe { conn.outbox.allow_direct_writes(conn.fd()) };
    }
    tracing::debug!(client_id = conn.client_id(), "connected");
    // `early` may be a slice of hyper's whole read buffer: copy what it holds and let the
    // buffer go now, or every idle connection would pin it.
    let mut flow = if early.is_empty() {
        Flow::Continue
    } else {
        let mut bytes = early.to_vec();
        conn.on_bytes(&mut bytes)
    };
    drop(early);
    if let Some(session) = &conn.tls {
        if session.wants_write() {
            // Records rustls still holds from the HTTP stage go out on the first poll.
            conn.outbox.nudge();
        }
        if flow == Flow::Continue {
            // What rustls decrypted and hyper did not read yet: the socket will not say it is
            // readable for these bytes again.
            flow = READ_BUF.with(|cell| conn.on_plaintext(&mut cell.borrow_mut()));
        }
    }
    if flow != Flow::Continue {
        return conn.exit(flow);
    }
    match reactors() {
        Ok(reactors) => reactors.add(conn),
        Err(e) => tracing::error!(error = %e, "no reactor for the connection; dropping it"),
    }
}

impl Source for Connection {
    type Exit = Flow;

    fn fd(&self) -> RawFd {
        self.socket().as_raw_fd()
    }

    fn readiness(&mut self, readable: bool, writable: bool) {
        self.readable |= readable;
        self.writable |= writable;
    }

    fn poll(&mut self, cx: &mut Context<'_>) -> Step<Flow> {
        self.poll_run(cx)
    }

    /// Close now; what has to wait (a full socket, the peer's answer to our close) goes on in a
    /// short-lived task of its own, which has the timers.
    fn exit(self, flow: Flow) {
        // From here the close writes its frame itself.
        self.outbox.forbid_direct_writes();
        if let Some(closing) = self.close(flow) {
            let tracker = closing.conn.relay.tracker.clone();
            tracker.spawn(closing.finish());
        }
    }
}

impl Connection {
    /// The connection's loop, polled by its reactor when the socket reports readiness or the
    /// outbox wakes it. Waits on the outbox's waker slot and the socket's readiness flags, so
    /// nothing is stored while idle. Exits with the flow that ends the connection.
    fn poll_run(&mut self, cx: &mut Context<'_>) -> Step<Flow> {
        for _ in 0..ROUNDS_PER_POLL {
            let Some(ready) = self.ready(cx) else {
                return Step::Wait;
            };
            let mut more_to_read = false;
            if ready.readable {
                let flow;
                (flow, more_to_read) = self.read_ready();
                if flow != Flow::Continue {
                    return Step::Exit(flow);
                }
            }
            if ready.work {
                if self.outbox.is_dead() {
                    if self.has_unread_bytes() {
                        // Not silent: we stopped reading it (its answers pile up), it did not
                        // stop sending. Bytes waiting in the socket are a sign of life.
                        self.outbox.revive();
                    } else {
                        self.relay.metrics.heartbeat_terminations.increment(1);
                        return Step::Exit(Flow::Silent);
                    }
                }
                if self.outbox.take_ping_due() {
                    self.send_control(Bytes::from_static(PING));
                }
            }
            if let Some(limit) = self.limit_passed() {
                return Step::Exit(Flow::Limit(limit));
            }
            if self.auth_overdue() {
                self.relay.metrics.auth_failed(AuthFailure::Timeout);
                let address = Some(self.address.ip());
                self.relay
                    .audit_auth_refused(address, AuditDialect::Auth, "timeout", 4401);
                return Step::Exit(Flow::CloseWith(4401, "auth required"));
            }
            match self.flush() {
                Ok(None) => {}
                Ok(Some(code)) => return Step::Exit(Flow::Close(code)),
                Err(_) => return Step::Exit(Flow::Dropped),
            }
            if more_to_read {
                // Still readable after READS_PER_WAKE reads: the other connections go first.
                return Step::Again;
            }
        }
        // Its outbox keeps filling as fast as it drains: the others go first.
        Step::Again
    }

    /// What there is to do: the outbox has work, the socket is readable (unless reading is
    /// paused), or a pending write can go on. `None`: nothing until readiness or a wake.
    fn ready(&mut self, cx: &mut Context<'_>) -> Option<Ready> {
        let ready = Ready {
            work: self.outbox.poll_work(cx).is_ready(),
            // A peer whose answers pile up unwritten is not read from until they drain: its own
            // requests (pings, publishes with acks) must not push it into the slow-consumer
            // limit.
            readable: self.readable && !self.reading_paused(),
            writable: self.writable && self.pending.is_some(),
        };
        (ready.work || ready.readable || ready.writable).then_some(ready)
    }

    /// The bare socket (present until `finish` takes it).
    fn socket(&self) -> &std::net::TcpStream {
        self.stream
            .as_ref()
            .expect("only a Closing takes the socket, and it owns the connection")
    }

    fn reading_paused(&self) -> bool {
        self.pending.is_some() && self.backpressured()
    }

    /// Bytes from the peer wait in the socket (without reading them). A peer we stopped reading
    /// from (its answers pile up) may still be talking: that is a sign of life, so the heartbeat
    /// does not take it for dead. (If it never drains, WRITE_STALL_MS ends it.)
    fn has_unread_bytes(&self) -> bool {
        let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
        matches!(socket2::SockRef::from(self.socket()).peek(&mut byte), Ok(n) if n > 0)
    }

    /// A first-dialect connection's id, or 0 (for logs).
    fn client_id(&self) -> u64 {
        match &self.rooms {
            Rooms::One(m) => m.client_id(),
            Rooms::Many(_) => 0,
        }
    }

    /// A second-dialect connection that has not authenticated within AUTH_TIMEOUT_MS.
    fn auth_overdue(&self) -> bool {
        let Rooms::Many(chat) = &self.rooms else {
            return false;
        };
        let waited = self.relay.now_ms().wrapping_sub(self.opened_ms);
        chat.sender.is_none() && waited >= millis(self.relay.settings.auth_timeout)
    }

    /// The largest message this connection may send (the second dialect's is fixed by its
    /// contract).
    fn max_payload(&self) -> usize {
        match self.rooms {
            Rooms::One(_) => self.relay.settings.max_payload_bytes,
            Rooms::Many(_) => second::MAX_MESSAGE_BYTES,
        }
    }

    /// The close for a message over `max_payload`: 1009 in the first dialect, 1008 in the
    /// second (its contract).
    fn too_big(&self) -> Flow {
        match self.rooms {
            Rooms::One(_) => Flow::Close(1009),
            Rooms::Many(_) => Flow::CloseWith(1008, "message too big"),
        }
    }

    /// The limits that need a clock: an incomplete frame's age and a pending write's progress.
    fn limit_passed(&self) -> Option<Limit> {
        let settings = &self.relay.settings;
        if let Some(inbound) = &self.inbound {
            if inbound.incomplete_for(self.relay.now_ms(), millis(settings.frame_timeout)) {
                return Some(Limit::IncompleteFrame);
            }
        }
        if let Some(pending) = &self.pending {
            if pending.progress_at.elapsed() >= settings.write_stall {
                return Some(Limit::WriteStall);
            }
        }
        None
    }

    /// Read what the socket has (bounded per wake) and act on every complete frame. Also says
    /// whether the socket may still hold more (every read of this wake was used).
    fn read_ready(&mut self) -> (Flow, bool) {
        for _ in 0..READS_PER_WAKE {
            let flow = READ_BUF.with(|cell| {
                let mut buf = cell.borrow_mut();
                let stream = self
                    .stream
                    .as_ref()
                    .expect("open connections keep their socket");
                let Some(session) = &mut self.tls else {
                    return match read_draining(stream, &mut buf[..], &mut self.readable) {
                        Ok(0) => Some(Flow::Dropped),
                        Ok(n) => Some(self.on_bytes(&mut buf[..n])),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                        Err(_) => Some(Flow::Dropped),
                    };
                };
                match session.read_from(Socket::Bare(stream)) {
                    Ok(Received::Records) => Some(self.on_plaintext(&mut buf)),
                    Ok(Received::Eof) => Some(Flow::Dropped),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        self.readable = false;
                        None
                    }
                    // A broken socket, or a TLS protocol error (rustls sent its alert).
                    Err(_) => Some(Flow::Dropped),
                }
            });
            match flow {
                None => return (Flow::Continue, false),
                Some(Flow::Continue) if !self.readable => return (Flow::Continue, false),
                Some(Flow::Continue) => {}
                Some(other) => return (other, false),
            }
            if self.backpressured() {
                // Write what this read produced before reading more.
                match self.flush() {
                    Ok(None) if self.backpressured() => return (Flow::Continue, false),
                    Ok(None) => {}
                    Ok(Some(code)) => return (Flow::Close(code), false),
                    Err(_) => return (Flow::Dropped, false),
                }
            }
        }
        (Flow::Continue, true)
    }

    /// TLS: act on every byte the session has decrypted, copying it into the per-thread buffer
    /// `buf` (the caller's `READ_BUF`) in as many pieces as needed.
    fn on_plaintext(&mut self, buf: &mut [u8]) -> Flow {
        self.outbox.mark_alive();
        loop {
            let Some(session) = self.tls.as_mut() else {
                return Flow::Continue;
            };
            match session.take_plaintext(buf) {
                // The peer ended the TLS session (close_notify) without a close frame.
                Ok(0) => return Flow::Dropped,
                Ok(n) => {
                    let flow = self.on_bytes(&mut buf[..n]);
                    if flow != Flow::Continue {
                        return flow;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Flow::Continue,
                Err(_) => return Flow::Dropped,
            }
        }
    }

    /// Half the outbox limit is queued: stop taking more input from this peer for now.
    fn backpressured(&self) -> bool {
        self.outbox.queued_bytes() > self.relay.settings.outbox_max_bytes / 2
    }

    /// Parse frames out of freshly read bytes, keeping an incomplete tail.
    fn on_bytes(&mut self, data: &mut [u8]) -> Flow {
        self.outbox.mark_alive();
        let carried = self
            .inbound
            .as_mut()
            .map(|i| std::mem::take(&mut i.partial))
            .unwrap_or_default();
        let flow = if carried.is_empty() {
            let (used, flow) = self.on_frames(data);
            if flow == Flow::Continue && used < data.len() {
                let now_ms = self.relay.now_ms();
                let inbound = self.inbound.get_or_insert_with(Default::default);
                inbound.partial = data[used..].to_vec();
                inbound.partial_since_ms = now_ms;
            }
            flow
        } else {
            let mut buf = carried;
            buf.extend_from_slice(data);
            let (used, flow) = self.on_frames(&mut buf);
            if flow == Flow::Continue && used < buf.len() {
                buf.drain(..used);
                buf.shrink_to(self.max_payload() + frame::MAX_HEADER + 4);
                let now_ms = self.relay.now_ms();
                let inbound = self.inbound.get_or_insert_with(Default::default);
                inbound.partial = buf;
                if used > 0 {
                    // The carried frame completed; what is left is a new frame's start.
                    inbound.partial_since_ms = now_ms;
                }
            }
            flow
        };
        if self
            .inbound
            .as_ref()
            .is_some_and(|i| i.partial.is_empty() && !i.fragmented)
        {
            self.inbound = None;
        }
        self.outbox.set_reading_frame(self.inbound.is_some());
        flow
    }

    /// Act on every complete frame at the front of `buf`; returns the bytes consumed.
    fn on_frames(&mut self, buf: &mut [u8]) -> (usize, Flow) {
        let max = self.max_payload();
        let mut at = 0;
        loop {
            let header = match frame::parse_header(&buf[at..], max) {
                Ok(Some(h)) => h,
                Ok(None) => return (at, Flow::Continue),
                Err(e) if e.close_code() == 1009 => return (at, self.too_big()),
                Err(e) => return (at, Flow::Close(e.close_code())),
            };
            let end = at + header.header_len + header.payload_len;
            if end > buf.len() {
                return (at, Flow::Continue);
            }
            let payload = &mut buf[at + header.header_len..end];
            fastwebsockets::unmask(payload, header.mask);
            at = end;
            let flow = self.on_frame(header.fin, header.opcode, payload);
            if flow != Flow::Continue {
                return (at, flow);
            }
        }
    }

    fn on_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) -> Flow {
        let max = self.max_payload();
        let settings = &self.relay.settings;
        // Frames that carry nothing cost the relay as much as any other: they have a budget.
        let costs_budget = matches!(opcode, OP_PING | OP_PONG)
            || (payload.is_empty() && matches!(opcode, OP_TEXT | OP_CONTINUATION));
        if costs_budget {
            let now_ms = self.relay.now_ms();
            let window_ms = millis(settings.control_frame_window);
            if self
                .control
                .over(now_ms, window_ms, settings.control_frame_limit)
            {
                return Flow::Limit(Limit::ControlFrames);
            }
        }
        let fragmented = self.inbound.as_ref().is_some_and(|i| i.fragmented);
        match opcode {
            OP_TEXT if fragmented => Flow::Close(1002),
            OP_TEXT if fin => self.on_text(payload),
            OP_TEXT => {
                let now_ms = self.relay.now_ms();
                let inbound = self.inbound.get_or_insert_with(Default::default);
                inbound.fragmented = true;
                inbound.message = payload.to_vec();
                inbound.message_since_ms = now_ms;
                Flow::Continue
            }
            OP_BINARY if fragmented => Flow::Close(1002), // a new message inside a fragmented one
            OP_BINARY => Flow::Close(1003),
            OP_CONTINUATION if !fragmented => Flow::Close(1002),
            OP_CONTINUATION => {
                let inbound = self
                    .inbound
                    .as_mut()
                    .expect("fragmented implies inbound state");
                if inbound.message.len() + payload.len() > max {
                    return self.too_big();
                }
                inbound.message.extend_from_slice(payload);
                if !fin {
                    return Flow::Continue;
                }
                inbound.fragmented = false;
                let message = std::mem::take(&mut inbound.message);
                self.on_text(&message)
            }
            OP_CLOSE => match frame::parse_close_payload(payload) {
                Ok(code) => Flow::PeerClosed(code),
                Err(e) => Flow::Close(e.close_code()),
            },
            OP_PING => {
                let pong = frame::server_frame(OP_PONG, payload);
                match self
                    .outbox
                    .push_pong(pong, self.relay.settings.outbox_max_bytes)
                {
                    Pushed::SlowConsumer => self.relay.metrics.slow_consumer_closes.increment(1),
                    Pushed::Queued | Pushed::Written | Pushed::Closed => {}
                }
                Flow::Continue
            }
            _ => Flow::Continue, // pong: liveness was already noted
        }
    }

    fn on_text(&mut self, payload: &[u8]) -> Flow {
        let Ok(text) = std::str::from_utf8(payload) else {
            return Flow::Close(1007);
        };
        self.relay.metrics.messages_received.increment(1);
        match &self.rooms {
            Rooms::One(m) => {
                let room = m.room().clone();
                if let Some(flow) = self.over_rate(&room) {
                    return flow;
                }
                match protocol::parse_client_message(text, self.relay.settings.max_text_chars) {
                    Ok(_) if !self.may_publish => self.refuse(ErrorCode::Forbidden, Some(&room)),
                    Ok(message) => self.publish(&room, &message, false),
                    Err(code) => self.refuse(code, Some(&room)),
                }
            }
            Rooms::Many(_) => self.on_command(text),
        }
    }

    /// Count a message against the connection's and its address's rate windows; past either,
    /// the `rate_limited` answer (or the abuse close).
    fn over_rate(&mut self, room: &Arc<Room>) -> Option<Flow> {
        let relay = self.relay.clone();
        let settings = &relay.settings;
        let now_ms = relay.now_ms();
        if self
            .rate
            .over(now_ms, millis(settings.rate_window), settings.rate_limit)
        {
            return Some(self.refuse(ErrorCode::RateLimited, Some(room)));
        }
        if let Some(limit) = settings.publish_rate_per_address {
            if !self
                .address
                .allow_publish(now_ms, millis(settings.rate_window), limit)
            {
                relay.metrics.address_rate_limited.increment(1);
                return Some(self.refuse(ErrorCode::RateLimited, Some(room)));
            }
        }
        None
    }

    /// Publish into `room` and answer what is known now (a networked broker answers later).
    /// `chat`: the second dialect, which sees its own message and gets no ack.
    fn publish(&mut self, room: &Arc<Room>, message: &ClientMessage<'_>, chat: bool) -> Flow {
        let relay = self.relay.clone();
        let sender = match &self.rooms {
            Rooms::One(m) => m.sender().clone(),
            Rooms::Many(c) => match &c.sender {
                Some(s) => s.clone(),
                None => return Flow::Continue, // not reachable: commands wait for auth
            },
        };
        let publish = Publish {
            room,
            from: &sender,
            message,
            address: Some(self.address.ip()),
        };
        let reply = if chat {
            Reply::Chat(self.outbox.clone())
        } else {
            Reply::Ack(self.outbox.clone())
        };
        let published = match relay.broker.publish(&publish, reply) {
            Ok(Some(published)) => published,
            // A networked broker answers (ack or error) once Redis has.
            Ok(None) => return Flow::Continue,
            // Not the client's doing: told, counted, but not held against it.
            Err(PublishError::Unavailable) => {
                relay.metrics.publish_unavailable.increment(1);
                self.send_own(Some(room), &protocol::error_event(ErrorCode::Unavailable));
                return Flow::Continue;
            }
            Err(e) => return self.refuse(e.code(), Some(room)),
        };
        let Published { id, seq, duplicate } = published;
        match message.request_id.as_deref() {
            Some(request_id) if !chat => {
                let ack = protocol::ack_event(request_id, &id, seq, duplicate);
                self.send_own(Some(room), &ack);
            }
            _ => {}
        }
        Flow::Continue
    }

    /// One message of the second dialect.
    fn on_command(&mut self, text: &str) -> Flow {
        let relay = self.relay.clone();
        let settings = &relay.settings;
        let Rooms::Many(chat) = &mut self.rooms else {
            unreachable!("the second dialect's connections hold Rooms::Many");
        };
        let command = second::parse(text);
        if chat.sender.is_none() {
            // Before auth only `auth` is accepted; anything else (invalid input included) fails.
            let address = Some(self.address.ip());
            let Ok(Command::Auth { token }) = command else {
                relay.metrics.auth_failed(AuthFailure::NotAuth);
                relay.audit_auth_refused(address, AuditDialect::Auth, "not_auth", 4403);
                return Flow::CloseWith(4403, "auth failed");
            };
            let Some(credential) = relay.authenticate(&token) else {
                relay.metrics.auth_failed(AuthFailure::BadToken);
                relay.audit_auth_refused(address, AuditDialect::Auth, "bad_token", 4403);
                return Flow::CloseWith(4403, "auth failed");
            };
            let connection_id = uuid::Uuid::new_v4();
            // A ticket's user keeps one de-duplication session everywhere; a static-token
            // connection is nobody in particular, so its session is the connection's.
            let (name, session): (Arc<str>, u128) = match &credential {
                Credential::Static => (
                    protocol::DEFAULT_NAME.into(),
                    connection_id.as_u128() & !crate::ticket::TICKET_SESSION_BIT,
                ),
                Credential::Ticket(grant) => {
                    (long_lived(|| grant.user.as_str().into()), grant.session())
                }
            };
            let sender = long_lived(|| Arc::new(Sender { name, session }));
            let hello = second::auth_ok(&connection_id, &sender.name);
            chat.sender = Some(sender);
            if let Credential::Ticket(grant) = credential {
                chat.grant = Some(Box::new(grant));
            }
            self.send_own(None, &hello);
            return Flow::Continue;
        }
        let command = match command {
            Ok(c) => c,
            Err(Invalid(reason)) => {
                relay.metrics.invalid_message("bad_type");
                return Flow::CloseWith(1008, reason);
            }
        };
        // Pings, joins and leaves publish nothing, so they do not spend the chat rate; they cost
        // what control frames cost and share that budget (CONTROL_FRAME_LIMIT), so a join/leave
        // or ping flood ends like a WebSocket ping flood.
        if matches!(
            command,
            Command::Ping | Command::Join { .. } | Command::Leave { .. }
        ) {
            let window_ms = millis(settings.control_frame_window);
            if self
                .control
                .over(relay.now_ms(), window_ms, settings.control_frame_limit)
            {
                return Flow::Limit(Limit::ControlFrames);
            }
        }
        match command {
            Command::Auth { .. } => Flow::CloseWith(1008, "already authenticated"),
            Command::Ping => {
                let sent_at =
                    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
                self.send_own(None, &second::pong(&sent_at));
                Flow::Continue
            }
            Command::Leave { room } => {
                if let Some(at) = chat.rooms.iter().position(|m| m.room().name() == room) {
                    chat.rooms.swap_remove(at); // dropping the membership leaves the room
                    relay
                        .metrics
                        .dialect(Dialect::Auth)
                        .memberships
                        .decrement(1.0);
                }
                Flow::Continue
            }
            Command::Join {
                room,
                history,
                since,
            } => {
                if chat.room(room).is_some() {
                    self.send_own(None, &second::joined(room));
                    return Flow::Continue;
                }
                if chat.rooms.len() >= settings.max_rooms_per_connection {
                    return Flow::CloseWith(1008, "too many rooms");
                }
                if chat.grant.as_ref().is_some_and(|g| !g.allows(room)) {
                    relay.metrics.invalid_message(ErrorCode::Forbidden.as_str());
                    return Flow::CloseWith(1008, "room not allowed");
                }
                let Ok(reservation) = relay.hub.reserve(room) else {
                    // Every room is in use on this relay: not the client's doing.
                    self.send_own(None, &protocol::error_event(ErrorCode::Unavailable));
                    return Flow::Continue;
                };
                let sender = chat.sender.clone().expect("authenticated above");
                let resume = since.map(|(since, epoch)| Resume { since, epoch });
                let membership = relay.hub.join(
                    reservation,
                    &self.outbox,
                    sender,
                    resume.as_ref(),
                    Greeting::Auth { history },
                );
                chat.rooms.push(membership);
                let metrics = relay.metrics.dialect(Dialect::Auth);
                metrics.joins.increment(1);
                metrics.memberships.increment(1.0);
                Flow::Continue
            }
            Command::Chat {
                room,
                text,
                request_id,
            } => {
                let Some(room) = chat.room(room).map(|m| m.room().clone()) else {
                    return Flow::CloseWith(1008, "join room before chat");
                };
                if chat.grant.as_ref().is_some_and(|g| !g.publish) {
                    relay.metrics.invalid_message(ErrorCode::Forbidden.as_str());
                    return Flow::CloseWith(1008, "forbidden");
                }
                if let Some(flow) = self.over_rate(&room) {
                    return flow;
                }
                let request_id =
                    request_id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string().into());
                let message = ClientMessage {
                    text,
                    request_id: Some(request_id),
                };
                self.publish(&room, &message, true)
            }
        }
    }

    /// Send an error event; too many of them in the abuse window end the connection with 1008.
    fn refuse(&mut self, code: ErrorCode, room: Option<&Arc<Room>>) -> Flow {
        let now_ms = self.relay.now_ms();
        let settings = &self.relay.settings;
        if self
            .abuse
            .over(now_ms, millis(settings.abuse_window), settings.abuse_limit)
        {
            return Flow::Close(1008);
        }
        // Counted here, once the error event is really sent: the refusal that trips the abuse
        // limit is counted as a 1008 close instead.
        match code {
            ErrorCode::RateLimited => self.relay.metrics.rate_limited.increment(1),
            other => self.relay.metrics.invalid_message(other.as_str()),
        }
        self.send_own(room, &protocol::error_event(code));
        Flow::Continue
    }

    /// Queue a frame for this connection only (an ack, an error event). About a room: behind
    /// that room's frames still waiting for delivery, so it never overtakes the message it
    /// answers (the hub counts it like any delivered frame). Otherwise (auth_ok, pong) at once.
    fn send_own(&self, room: Option<&Arc<Room>>, frame: &Bytes) {
        match room {
            Some(room) => self
                .relay
                .hub
                .send_in_order(room, &self.outbox, frame.clone()),
            None => self.send_control(frame.clone()),
        }
    }

    /// Queue a control frame (a ping): same byte limit, not counted as a delivered frame.
    fn send_control(&self, frame: Bytes) {
        match self
            .outbox
            .push(&frame, self.relay.settings.outbox_max_bytes)
        {
            Pushed::Queued | Pushed::Written | Pushed::Closed => {}
            Pushed::SlowConsumer => self.relay.metrics.slow_consumer_closes.increment(1),
        }
    }

    /// Move queued frames to the socket without waiting. Returns the close code once a close
    /// was requested through the outbox.
    fn flush(&mut self) -> io::Result<Option<u16>> {
        let batch = self.outbox.take();
        // TLS records of its own (a key update's answer, an alert) go out like frames do.
        let tls_wants_write = self.tls.as_ref().is_some_and(|s| s.wants_write());
        let mut pending = match self.pending.take() {
            Some(mut p) => {
                // (`begun` needs an empty queue and nothing unwritten, so `p` holds no frame.)
                p.front_started |= p.frames.is_empty() && batch.begun;
                p.frames.extend(batch.frames);
                p.oldest = p.oldest.or(batch.oldest);
                p
            }
            None if batch.frames.is_empty() && !tls_wants_write => return Ok(batch.closing),
            None => Box::new(Pending {
                frames: batch.frames,
                front_started: batch.begun,
                oldest: batch.oldest,
                ..Pending::default()
            }),
        };
        // A socket known to be full is not tried again before its next edge (no system call
        // per wake for a slow reader, as tokio's readiness would spare it).
        if batch.closing.is_none() && self.writable {
            let tls = self.tls.as_deref_mut();
            let stream = self.stream.as_ref();
            let socket = Socket::Bare(stream.expect("open connections keep their socket"));
            pending.write_to(socket, tls, &self.outbox, &self.relay.metrics)?;
        }
        if !pending.is_done(self.tls.as_deref()) {
            if batch.closing.is_none() {
                // Only a full socket leaves anything unwritten: wait for its next edge.
                self.writable = false;
            }
            self.pending = Some(pending);
        }
        Ok(batch.closing)
    }

    /// End the connection: count the close code, leave the rooms, send our close frame (or echo
    /// the peer's). Returns what still has to wait: the rest of the close frame, and when we
    /// started the close, the peer's answer (`Closing`, within CLOSE_TIMEOUT_MS). Done at once in
    /// the common cases (a peer that closed and gets its echo, a dropped socket), so a wave of
    /// thousands of closes does not become thousands of tasks.
    fn close(mut self, flow: Flow) -> Option<Closing> {
        let relay = self.relay.clone();
        let (code, send) = match flow {
            Flow::Continue => unreachable!("finish is only called with a terminal flow"),
            Flow::Dropped | Flow::Silent => (1006, None),
            Flow::PeerClosed(code) => {
                let echo = if code == 1005 { 1000 } else { code };
                (code, Some((echo, close_reason(echo))))
            }
            Flow::Close(code) => (code, Some((code, close_reason(code)))),
            Flow::CloseWith(code, reason) => (code, Some((code, reason))),
            Flow::Limit(limit) => {
                relay.metrics.limit_closed(limit);
                let (code, reason) = limit_close(limit);
                (code, Some((code, reason)))
            }
        };
        relay.metrics.connection_closed(code);
        let (by, why) = match flow {
            Flow::Continue => unreachable!("checked above"),
            Flow::Dropped => ("none", "dropped"),
            Flow::Silent => ("none", "heartbeat"),
            Flow::PeerClosed(_) => ("peer", "peer_closed"),
            Flow::Limit(limit) => ("relay", limit.label()),
            Flow::Close(code) | Flow::CloseWith(code, _) => ("relay", close_label(code)),
        };
        let room = match &self.rooms {
            Rooms::One(m) => m.room().name().to_string(),
            Rooms::Many(chat) => chat
                .rooms
                .iter()
                .map(|m| m.room().name())
                .collect::<Vec<_>>()
                .join(","),
        };
        crate::log::connection_closed(&crate::log::Closed {
            code,
            reason: why,
            by,
            room: &room,
            age: std::time::Duration::from_millis(
                relay.now_ms().wrapping_sub(self.opened_ms).into(),
            ),
            peer: self.address.ip(),
            client_id: self.client_id(),
        });
        let by_server = matches!(flow, Flow::Close(_) | Flow::CloseWith(..) | Flow::Limit(_));
        if let (Some(audit), true) = (&relay.audit, by_server && code != 1001) {
            let (name, room) = match &self.rooms {
                Rooms::One(m) => (m.sender().name.clone(), Some(m.room().name())),
                Rooms::Many(chat) => (
                    chat.sender
                        .as_ref()
                        .map_or_else(|| "".into(), |s| s.name.clone()),
                    None,
                ),
            };
            let reason = send.map_or("", |(_, reason)| reason);
            // Best effort: the connection closes either way.
            let _ = audit.record(&AuditEvent::Disconnect {
                name: &name,
                room,
                address: Some(self.address.ip()),
                code,
                reason,
            });
        }
        tracing::debug!(client_id = self.client_id(), code, "closing");
        // Leave first: the room stops queueing to a connection that is on its way out.
        if let Some(r) = self.registration.take() {
            relay.registry.unregister(r);
        }
        // Idempotent; dropping the memberships would leave too.
        match &self.rooms {
            Rooms::One(m) => m.leave(),
            Rooms::Many(chat) => chat.rooms.iter().for_each(Membership::leave),
        }
        if let Some((send, reason)) = send {
            let mut pending = self.pending.take().map(|p| *p).unwrap_or_default();
            let queued = self.outbox.take();
            if pending.frames.is_empty() && queued.begun {
                // The rest of a frame a direct write began (`Outbox::push_or_write`).
                pending.front_started = true;
            }
            pending.frames.extend(queued.frames);
            if send == 1013 || matches!(flow, Flow::PeerClosed(_)) {
                // A slow consumer's queue is dropped, and a peer that closed gets our close as
                // soon as practical (RFC 6455 5.5.1) rather than after what was still queued.
                // Only a partly written frame is finished, so the close starts on a boundary.
                let keep = usize::from(pending.front_started && !pending.frames.is_empty());
                pending.frames.truncate(keep);
            }
            pending.frames.push_back(frame::close_frame(send, reason));
            // With TLS, the TLS session ends right behind the close frame.
            pending.close_notify = self.tls.is_some();
            // The peer closed first: once our echo is written we close the TCP connection at once
            // (RFC 6455 7.1.1: the server closes first), with no timer and no wait for its FIN.
            let peer_closed = matches!(flow, Flow::PeerClosed(_));
            let tls = self.tls.as_deref_mut();
            let socket = Socket::Bare(self.stream.as_ref().expect("closing takes it only later"));
            let done = pending
                .write_to(socket, tls, &self.outbox, &relay.metrics)
                .is_err()
                || (peer_closed && pending.is_done(self.tls.as_deref()));
            if !done {
                return Some(Closing {
                    conn: self,
                    pending,
                    wait_for_peer: !peer_closed,
                });
            }
        }
        None
    }

    /// Write the remaining frames and the close frame; when we started the close, shut our side
    /// and wait for the peer to close (discarding what it still sends).
    async fn close_handshake(
        &mut self,
        mut stream: TcpStream,
        mut pending: Pending,
        wait_for_peer: bool,
    ) -> io::Result<()> {
        while !pending.is_done(self.tls.as_deref()) {
            let tls = self.tls.as_deref_mut();
            pending.write_to(
                Socket::Tokio(&stream),
                tls,
                &self.outbox,
                &self.relay.metrics,
            )?;
            if !pending.is_done(self.tls.as_deref()) {
                stream.writable().await?;
            }
        }
        if !wait_for_peer {
            return Ok(());
        }
        stream.shutdown().await?;
        // A peer that answers our close sends a few bytes more at most; one that keeps flooding
        // is dropped after CLOSE_DISCARD_BYTES. Each read spends tokio's cooperative budget, so a
        // flooding peer cannot keep this task on its worker (readiness and `try_read` alone do
        // not), and CLOSE_TIMEOUT_MS is checked whenever the budget runs out.
        let mut discarded = 0;
        while discarded < CLOSE_DISCARD_BYTES {
            tokio::task::coop::consume_budget().await;
            stream.readable().await?;
            // Into the thread's read buffer, between awaits: the task keeps no buffer.
            let read = READ_BUF.with(|cell| stream.try_read(&mut cell.borrow_mut()));
            match read {
                Ok(0) => return Ok(()),
                Ok(n) => discarded += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// A close that has to wait, in a task of its own: for the socket to take the close frame, and
/// when we started the close, for the peer's answer. The socket goes back to tokio for it.
struct Closing {
    conn: Connection,
    pending: Pending,
    wait_for_peer: bool,
}

impl Closing {
    async fn finish(mut self) {
        let Some(Ok(stream)) = self.conn.stream.take().map(TcpStream::from_std) else {
            return;
        };
        let timeout = self.conn.relay.settings.close_timeout;
        let handshake = self
            .conn
            .close_handshake(stream, self.pending, self.wait_for_peer);
        let _ = tokio::time::timeout(timeout, handshake).await;
    }
}

fn millis(d: std::time::Duration) -> u32 {
    d.as_millis().min(u32::MAX as u128 / 2) as u32
}

/// A close code as a log label (no spaces), for the access log's closed lines.
fn close_label(code: u16) -> &'static str {
    match code {
        1001 => "shutdown",
        1002 | 1003 | 1007 | 1009 => "protocol",
        1008 => "abuse_or_invalid",
        1013 => "slow_consumer",
        4000 => "disconnected",
        4401 => "auth_timeout",
        4403 => "auth_failed",
        _ => "other",
    }
}

fn close_reason(code: u16) -> &'static str {
    match code {
        1000 => "bye",
        1001 => "server going away",
        1002 => "protocol error",
        1003 => "binary frames are not accepted",
        1007 => "invalid UTF-8",
        1008 => "too many invalid messages",
        1009 => "message too big",
        1013 => "too slow: outbound queue full",
        4000 => "disconnected by the server",
        4401 => "auth required",
        4403 => "auth failed",
        _ => "",
    }
}

#[cfg(test)]
mod budget {
    /// The per-connection memory budget (ARCHITECTURE.md): these structs are what an idle
    /// connection holds. Growing them is allowed, silently growing them is not.
    #[test]
    fn idle_connection_state_stays_within_budget() {
        let conn = std::mem::size_of::<super::Connection>();
        let slot = std::mem::size_of::<Option<super::Connection>>();
        let outbox = std::mem::size_of::<crate::outbox::Outbox>();
        eprintln!("Connection = {conn} B, slab slot = {slot} B, Outbox = {outbox} B");
        // The connection lives in its reactor's slab, inline: no task, no tokio registration.
        assert!(
            slot <= 120,
            "a slab slot grew to {slot} B; update ARCHITECTURE.md's budget"
        );
        // In its `Arc` (16 B of counts) the outbox is a 112-byte block; 97 B would take it to
        // mimalloc's 128-byte class.
        assert!(
            outbox <= 96,
            "Outbox grew to {outbox} B; update ARCHITECTURE.md's budget"
        );
    }
}
