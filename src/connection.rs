//! One WebSocket connection after the upgrade: its task, its reads, its writes, its close.
//!
//! Reads are readiness-based: the task waits on the bare socket and, when bytes arrive, reads
//! them into a buffer owned by the worker thread (`READ_BUF`), parses every complete frame in
//! place and keeps only the bytes of an incomplete frame. An idle connection therefore holds no
//! read buffer at all. Writes drain the connection's [`Outbox`] with vectored writes, so every
//! frame queued since the last write goes out in one system call.
//!
//! Everything a connection can do wrong ends in exactly one visible outcome: an error event (the
//! connection stays open), or a close code — each counted in a metric.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::time::Instant;

use crate::frame::{
    self, FrameError, OP_BINARY, OP_CLOSE, OP_CONTINUATION, OP_PING, OP_PONG, OP_TEXT,
};
use crate::hub::{Membership, Resume};
use crate::outbox::{Outbox, Pushed};
use crate::protocol::{self, ErrorCode};
use crate::server::{ConnectionPermit, Relay};

/// Per worker thread read buffer. Large enough to take many frames in one read; never held
/// across an await, so it is shared by every connection the thread serves.
const READ_BUF_BYTES: usize = 64 * 1024;
/// Reads per wake before yielding to other connections (fairness under a flood).
const READS_PER_WAKE: usize = 8;
/// Frames gathered into one vectored write.
const IOV_MAX: usize = 64;

thread_local! {
    static READ_BUF: RefCell<Box<[u8]>> = RefCell::new(vec![0; READ_BUF_BYTES].into_boxed_slice());
}

/// Who a connection is, from its upgrade request.
#[derive(Debug, Clone)]
pub struct Identity {
    pub name: String,
    pub room: String,
    pub resume: Option<Resume>,
}

/// How the read side wants the connection to go on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Continue,
    /// We close with this code (a close frame is sent).
    Close(u16),
    /// The peer sent a close frame with this code (1005: none); we echo it.
    PeerClosed(u16),
    /// The socket ended without a close frame.
    Dropped,
}

/// Fixed-window counter for the rate limit and the abuse limit.
struct Window {
    start: Instant,
    count: u32,
}

impl Window {
    fn new(now: Instant) -> Window {
        Window {
            start: now,
            count: 0,
        }
    }

    /// Count one event; true when the window now holds more than `limit`.
    fn over(&mut self, now: Instant, window: std::time::Duration, limit: u32) -> bool {
        if now.duration_since(self.start) >= window {
            self.start = now;
            self.count = 0;
        }
        self.count = self.count.saturating_add(1);
        self.count > limit
    }
}

struct Connection {
    relay: Arc<Relay>,
    stream: TcpStream,
    outbox: Arc<Outbox>,
    name: Arc<str>,
    membership: Membership,
    /// Bytes of an incomplete frame (empty, unallocated, while idle).
    partial: Vec<u8>,
    /// A fragmented text message being reassembled (empty while idle).
    message: Vec<u8>,
    fragmented: bool,
    rate: Window,
    abuse: Window,
    /// Frames taken from the outbox and not yet (fully) written; the front one may be partly
    /// written when `front_started` is set.
    unwritten: VecDeque<Bytes>,
    front_started: bool,
    unwritten_oldest: Option<Instant>,
}

/// Run a connection until it closes. `early` holds bytes the client sent right behind its
/// upgrade request. The permit is released when this returns.
pub(crate) async fn serve(
    relay: Arc<Relay>,
    stream: TcpStream,
    early: Bytes,
    who: Identity,
    _permit: ConnectionPermit,
) {
    let outbox = Arc::new(Outbox::default());
    let name: Arc<str> = who.name.into();
    let membership = match relay
        .hub
        .join(&who.room, &outbox, &name, who.resume.as_ref())
    {
        Ok(m) => m,
        Err(_) => {
            // The room map filled between the upgrade check and now. Say so and close.
            let mut stream = stream;
            let _ = stream
                .write_all(&frame::close_frame(1013, "room limit reached"))
                .await;
            relay.metrics.connection_closed(1013);
            return;
        }
    };
    let registration = relay.registry.register(&outbox);
    relay.metrics.connections_opened.increment(1);
    let now = Instant::now();
    let mut conn = Connection {
        relay: relay.clone(),
        stream,
        outbox,
        name,
        membership,
        partial: Vec::new(),
        message: Vec::new(),
        fragmented: false,
        rate: Window::new(now),
        abuse: Window::new(now),
        unwritten: VecDeque::new(),
        front_started: false,
        unwritten_oldest: None,
    };
    tracing::debug!(client_id = conn.membership.client_id, room = %conn.membership.room.name, "connected");

    let mut flow = if early.is_empty() {
        Flow::Continue
    } else {
        let mut early = early.to_vec();
        conn.on_bytes(&mut early)
    };
    if flow == Flow::Continue {
        flow = conn.run().await;
    }
    conn.finish(flow).await;
    relay.registry.unregister(registration);
    relay.hub.leave(&conn.membership, &conn.name);
    relay
        .metrics
        .outbox_queued_bytes
        .decrement(conn.outbox.queued_bytes() as f64);
}

impl Connection {
    async fn run(&mut self) -> Flow {
        loop {
            let want_write = !self.unwritten.is_empty();
            tokio::select! {
                biased;
                _ = self.outbox.woken() => {}
                ready = self.stream.readable() => {
                    if ready.is_err() {
                        return Flow::Dropped;
                    }
                    let flow = self.read_ready();
                    if flow != Flow::Continue {
                        return flow;
                    }
                }
                ready = self.stream.writable(), if want_write => {
                    if ready.is_err() {
                        return Flow::Dropped;
                    }
                }
            }
            if self.outbox.is_dead() {
                self.relay.metrics.heartbeat_terminations.increment(1);
                return Flow::Dropped;
            }
            if self.outbox.take_ping_due() {
                self.send_control(Bytes::from_static(PING));
            }
            match self.flush() {
                Ok(None) => {}
                Ok(Some(code)) => return Flow::Close(code),
                Err(_) => return Flow::Dropped,
            }
        }
    }

    /// Read what the socket has (bounded per wake) and act on every complete frame.
    fn read_ready(&mut self) -> Flow {
        for _ in 0..READS_PER_WAKE {
            let flow = READ_BUF.with(|cell| {
                let mut buf = cell.borrow_mut();
                match self.stream.try_read(&mut buf[..]) {
                    Ok(0) => Some(Flow::Dropped),
                    Ok(n) => Some(self.on_bytes(&mut buf[..n])),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
                    Err(_) => Some(Flow::Dropped),
                }
            });
            match flow {
                None => return Flow::Continue,
                Some(Flow::Continue) => {}
                Some(other) => return other,
            }
        }
        Flow::Continue
    }

    /// Parse frames out of freshly read bytes, keeping an incomplete tail.
    fn on_bytes(&mut self, data: &mut [u8]) -> Flow {
        self.outbox.mark_alive();
        if self.partial.is_empty() {
            let (used, flow) = self.on_frames(data);
            if flow == Flow::Continue && used < data.len() {
                self.partial = data[used..].to_vec();
            }
            flow
        } else {
            let mut buf = std::mem::take(&mut self.partial);
            buf.extend_from_slice(data);
            let (used, flow) = self.on_frames(&mut buf);
            if flow == Flow::Continue && used < buf.len() {
                buf.drain(..used);
                buf.shrink_to(self.relay.settings.max_payload_bytes + frame::MAX_HEADER + 4);
                self.partial = buf;
            }
            flow
        }
    }

    /// Act on every complete frame at the front of `buf`; returns the bytes consumed.
    fn on_frames(&mut self, buf: &mut [u8]) -> (usize, Flow) {
        let max = self.relay.settings.max_payload_bytes;
        let mut at = 0;
        loop {
            let header = match frame::parse_header(&buf[at..], max) {
                Ok(Some(h)) => h,
                Ok(None) => return (at, Flow::Continue),
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
        let max = self.relay.settings.max_payload_bytes;
        match opcode {
            OP_TEXT if self.fragmented => Flow::Close(
                FrameError::Protocol("new message inside a fragmented one").close_code(),
            ),
            OP_TEXT if fin => self.on_text(payload),
            OP_TEXT => {
                self.fragmented = true;
                self.message = payload.to_vec();
                Flow::Continue
            }
            OP_BINARY => Flow::Close(1003),
            OP_CONTINUATION if !self.fragmented => Flow::Close(1002),
            OP_CONTINUATION => {
                if self.message.len() + payload.len() > max {
                    return Flow::Close(1009);
                }
                self.message.extend_from_slice(payload);
                if !fin {
                    return Flow::Continue;
                }
                self.fragmented = false;
                let message = std::mem::take(&mut self.message);
                self.on_text(&message)
            }
            OP_CLOSE => match frame::parse_close_payload(payload) {
                Ok(code) => Flow::PeerClosed(code),
                Err(e) => Flow::Close(e.close_code()),
            },
            OP_PING => {
                self.send_control(frame::server_frame(OP_PONG, payload));
                Flow::Continue
            }
            _ => Flow::Continue, // pong: liveness was already noted
        }
    }

    fn on_text(&mut self, payload: &[u8]) -> Flow {
        let Ok(text) = std::str::from_utf8(payload) else {
            return Flow::Close(1007);
        };
        let relay = self.relay.clone();
        let settings = &relay.settings;
        relay.metrics.messages_received.increment(1);
        let now = Instant::now();
        if self
            .rate
            .over(now, settings.rate_window, settings.rate_limit)
        {
            relay.metrics.rate_limited.increment(1);
            return self.refuse(ErrorCode::RateLimited, now);
        }
        match protocol::parse_client_message(text, settings.max_text_chars) {
            Ok(message) => {
                let published = relay
                    .broker
                    .publish(&self.membership.room, &self.name, &message);
                if let Some(request_id) = message.request_id.as_deref() {
                    let ack = protocol::ack_event(
                        request_id,
                        &published.id,
                        published.seq,
                        published.duplicate,
                    );
                    self.send_own(&ack);
                }
                Flow::Continue
            }
            Err(code) => {
                relay.metrics.invalid_message(code.as_str());
                self.refuse(code, now)
            }
        }
    }

    /// Send an error event; too many of them in the abuse window end the connection with 1008.
    fn refuse(&mut self, code: ErrorCode, now: Instant) -> Flow {
        let settings = &self.relay.settings;
        if self
            .abuse
            .over(now, settings.abuse_window, settings.abuse_limit)
        {
            return Flow::Close(1008);
        }
        self.send_own(&protocol::error_event(code));
        Flow::Continue
    }

    /// Queue a frame for this connection only, under the same byte limit as broadcasts.
    fn send_own(&self, frame: &Bytes) {
        let metrics = &self.relay.metrics;
        match self
            .outbox
            .push(frame, self.relay.settings.outbox_max_bytes)
        {
            Pushed::Queued => {
                metrics.frames_delivered.increment(1);
                metrics.bytes_sent.increment(frame.len() as u64);
                metrics.outbox_queued_bytes.increment(frame.len() as f64);
            }
            Pushed::SlowConsumer => metrics.slow_consumer_closes.increment(1),
            Pushed::Closed => {}
        }
    }

    /// Queue a control frame (ping, pong): same byte limit, not counted as a delivered frame.
    fn send_control(&self, frame: Bytes) {
        match self
            .outbox
            .push(&frame, self.relay.settings.outbox_max_bytes)
        {
            Pushed::Queued => self
                .relay
                .metrics
                .outbox_queued_bytes
                .increment(frame.len() as f64),
            Pushed::SlowConsumer => self.relay.metrics.slow_consumer_closes.increment(1),
            Pushed::Closed => {}
        }
    }

    /// Move queued frames to the socket without waiting. Returns the close code once a close
    /// was requested through the outbox.
    fn flush(&mut self) -> io::Result<Option<u16>> {
        let mut batch = self.outbox.take();
        if !batch.frames.is_empty() {
            self.unwritten.append(&mut batch.frames);
            self.unwritten_oldest = self.unwritten_oldest.or(batch.oldest);
        }
        if let Some(code) = batch.closing {
            return Ok(Some(code));
        }
        self.write_some()?;
        Ok(None)
    }

    /// Write as much of `unwritten` as the socket takes now, several frames per system call.
    fn write_some(&mut self) -> io::Result<()> {
        let metrics = &self.relay.metrics;
        while !self.unwritten.is_empty() {
            let mut slices = [IoSlice::new(&[]); IOV_MAX];
            let count = self.unwritten.len().min(IOV_MAX);
            for (slot, frame) in slices.iter_mut().zip(self.unwritten.iter()) {
                *slot = IoSlice::new(frame);
            }
            let written = match self.stream.try_write_vectored(&slices[..count]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            };
            metrics.socket_writes.increment(1);
            let accounted = self.outbox.written(written);
            metrics.outbox_queued_bytes.decrement(accounted as f64);
            let mut left = written;
            while left > 0 {
                let front = self
                    .unwritten
                    .front_mut()
                    .expect("written bytes belong to queued frames");
                if front.len() <= left {
                    left -= front.len();
                    self.unwritten.pop_front();
                    self.front_started = false;
                } else {
                    front.advance(left);
                    left = 0;
                    self.front_started = true;
                }
            }
        }
        if let Some(oldest) = self.unwritten_oldest.take() {
            metrics
                .publish_to_write_seconds
                .record(oldest.elapsed().as_secs_f64());
        }
        // Give the deque's buffer back: an idle connection holds no queue memory.
        self.unwritten = VecDeque::new();
        Ok(())
    }

    /// End the connection: send our close frame (or echo the peer's), then let the peer close,
    /// all within CLOSE_TIMEOUT_MS. Counts the close code.
    async fn finish(&mut self, flow: Flow) {
        let metrics = self.relay.metrics.clone();
        let (code, send) = match flow {
            Flow::Continue => unreachable!("finish is only called with a terminal flow"),
            Flow::Dropped => (1006, None),
            Flow::PeerClosed(code) => (code, Some(if code == 1005 { 1000 } else { code })),
            Flow::Close(code) => (code, Some(code)),
        };
        metrics.connection_closed(code);
        tracing::debug!(client_id = self.membership.client_id, code, "closing");
        let Some(send) = send else { return };
        if send == 1013 {
            // A slow consumer's queue is dropped; only a partly written frame must be finished
            // so the close frame starts on a frame boundary.
            let keep = usize::from(self.front_started && !self.unwritten.is_empty());
            self.unwritten.truncate(keep);
        } else {
            let batch = self.outbox.take();
            self.unwritten.extend(batch.frames);
        }
        self.unwritten
            .push_back(frame::close_frame(send, close_reason(send)));
        let timeout = self.relay.settings.close_timeout;
        let _ = tokio::time::timeout(timeout, async {
            while !self.unwritten.is_empty() {
                self.write_some()?;
                if !self.unwritten.is_empty() {
                    self.stream.writable().await?;
                }
            }
            self.stream.shutdown().await?;
            // Wait for the peer's close or EOF, discarding what it still sends.
            let mut scratch = [0u8; 512];
            loop {
                self.stream.readable().await?;
                match self.stream.try_read(&mut scratch) {
                    Ok(0) => return Ok::<(), io::Error>(()),
                    Ok(_) => {}
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
        })
        .await;
    }
}

/// A server ping with an empty payload, shared by every connection.
const PING: &[u8] = &[0x80 | OP_PING, 0];

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
        _ => "",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn window_allows_the_limit_then_refuses_until_it_rolls() {
        let t0 = Instant::now();
        let mut w = Window::new(t0);
        let win = Duration::from_secs(10);
        for _ in 0..20 {
            assert!(!w.over(t0, win, 20));
        }
        assert!(w.over(t0 + Duration::from_secs(1), win, 20));
        assert!(!w.over(t0 + Duration::from_secs(11), win, 20));
    }
}
