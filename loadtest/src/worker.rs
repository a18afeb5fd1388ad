//! A load worker: one process, one thread, many connections. It opens the connections of its
//! plan, publishes on a schedule, and measures every delivery; the coordinator drives it with
//! the commands in `proto`.
//!
//! Leanness on a 2-core machine is the design constraint. Everything runs on one tokio
//! current-thread runtime; an idle connection holds only its socket and a few dozen bytes of
//! state (no read buffer: every connection reads into one buffer owned by the thread and keeps
//! only an incomplete frame's bytes); a read takes every frame queued on the socket at once; an
//! event is classified from its first bytes and only message events are looked into.

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::io::{self, BufRead, Write};
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::io::Interest;
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, Notify, Semaphore};
use tokio::task::{AbortHandle, JoinHandle};

use crate::proto::*;
use crate::sys;
use crate::tls::Io;
use crate::wire::{self, EventKind};

/// The thread's shared read buffer. Large enough for a full history event (50 messages of 500
/// characters, escaped) plus whatever else is queued behind it.
const READ_BUFFER_BYTES: usize = 256 * 1024;

/// Where a connection reports that it joined (or failed to): the connect command's channel.
type JoinTx = mpsc::UnboundedSender<(usize, Result<u64, String>)>;
/// A connection waiting for its history event: when it started, whom to tell, its index.
type Joining = Option<(Instant, JoinTx, usize)>;

pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 120_000_000, 3).expect("static histogram bounds are valid")
}

pub fn hist_pairs(h: &Histogram<u64>) -> HistPairs {
    h.iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect()
}

struct Stats {
    deliveries: u64,
    duplicates: u64,
    gaps: u64,
    late: u64,
    presence: u64,
    other_events: u64,
    frames: u64,
    /// Text, binary and continuation frames: `frames` without pings, pongs and closes.
    data_frames: u64,
    bytes_in: u64,
    reads: u64,
    errors: BTreeMap<String, u64>,
    ended: BTreeMap<String, u64>,
    latency: Histogram<u64>,
    last_delivery_ns: u64,
}

impl Stats {
    fn new() -> Self {
        Stats {
            deliveries: 0,
            duplicates: 0,
            gaps: 0,
            late: 0,
            presence: 0,
            other_events: 0,
            frames: 0,
            data_frames: 0,
            bytes_in: 0,
            reads: 0,
            last_delivery_ns: 0,
            errors: BTreeMap::new(),
            ended: BTreeMap::new(),
            latency: new_histogram(),
        }
    }
}

/// One open connection, shared between its own task (which reads) and the publisher and
/// command handlers (which queue bytes to write).
struct Conn {
    role: Role,
    publisher: Option<u32>,
    stream: TcpStream,
    /// The TLS session of a `wss://` target; None for `ws://`.
    tls: RefCell<Option<rustls::ClientConnection>>,
    /// Bytes waiting to be written because the socket would not take them at once.
    out: RefCell<Vec<u8>>,
    /// The incomplete frame left over from the last read.
    leftover: RefCell<Vec<u8>>,
    /// A fragmented message being reassembled (never seen in practice; kept for correctness).
    fragments: RefCell<Vec<u8>>,
    /// Last counter seen per publisher, for loss / duplicate / reorder detection.
    seen: RefCell<Vec<(u32, u32)>>,
    wake: Notify,
    closing: Cell<bool>,
    draining: Cell<bool>,
    /// An attacker's flood owns the socket: the connection's own task neither reads nor writes.
    paused: Cell<bool>,
    mask_seed: Cell<u32>,
    next_counter: Cell<u32>,
}

impl Conn {
    /// Run `f` on the connection's byte stream (through its TLS session, if any).
    fn with_io<R>(&self, f: impl FnOnce(&mut Io<'_>) -> R) -> R {
        let mut tls = self.tls.borrow_mut();
        f(&mut Io {
            stream: &self.stream,
            tls: tls.as_mut(),
        })
    }

    /// Bytes wait to be written: queued frames, or TLS records the socket did not take.
    fn wants_write(&self) -> bool {
        !self.out.borrow().is_empty() || self.with_io(|io| io.wants_write())
    }

    /// Queues a frame; writes it at once when nothing is waiting ahead of it.
    fn send(&self, frame: &[u8]) -> bool {
        let mut out = self.out.borrow_mut();
        if out.is_empty() {
            match self.with_io(|io| io.try_write(frame)) {
                Ok(n) if n == frame.len() => return true,
                Ok(n) => out.extend_from_slice(&frame[n..]),
                Err(_) => out.extend_from_slice(frame),
            }
        } else {
            out.extend_from_slice(frame);
        }
        drop(out);
        self.wake.notify_one();
        false
    }

    fn send_control(&self, opcode: u8, payload: &[u8]) {
        let mut frame = Vec::with_capacity(payload.len() + 8);
        let mut seed = self.mask_seed.get();
        wire::push_client_frame(&mut frame, opcode, payload, &mut seed);
        self.mask_seed.set(seed);
        self.send(&frame);
    }

    fn flush(&self) -> io::Result<()> {
        self.with_io(|io| io.flush())?;
        let mut out = self.out.borrow_mut();
        while !out.is_empty() {
            match self.with_io(|io| io.try_write(&out)) {
                Ok(n) => {
                    out.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => return Err(e),
            }
        }
        if out.is_empty() && out.capacity() > 64 * 1024 {
            *out = Vec::new();
        }
        Ok(())
    }
}

struct Worker {
    plan: WorkerPlan,
    /// The TLS configuration of a `wss://` target.
    tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    stats: RefCell<Stats>,
    conns: RefCell<Vec<Option<Rc<Conn>>>>,
    tasks: RefCell<Vec<Option<AbortHandle>>>,
    open: Cell<[u64; 4]>,
    read_buf: RefCell<Vec<u8>>,
    slow_outcomes: RefCell<BTreeMap<String, u64>>,
    slow_bytes: Cell<u64>,
    stop_publishing: Cell<bool>,
    started_cpu_us: u64,
}

fn role_index(r: Role) -> usize {
    match r {
        Role::Member => 0,
        Role::Slow => 1,
        Role::Churn => 2,
        Role::Attacker => 3,
    }
}

impl Worker {
    fn add_open(&self, role: Role, delta: i64) {
        let mut o = self.open.get();
        let i = role_index(role);
        o[i] = (o[i] as i64 + delta).max(0) as u64;
        self.open.set(o);
    }

    fn open_of(&self, roles: &[Role]) -> u64 {
        let o = self.open.get();
        roles.iter().map(|r| o[role_index(*r)]).sum()
    }
}

/// How a connection ended.
enum End {
    /// We closed it (close handshake done or EOF after our close).
    Ours,
    /// The server closed it or the socket failed: `close_CODE`, `eof`, `reset`, `error`.
    Server(String),
    /// It never joined: reason.
    JoinFailed(String),
}

/// A connected, upgraded socket: the stream, its TLS session (`wss://`), and any bytes that
/// arrived after the response head.
type Opened = (TcpStream, Option<rustls::ClientConnection>, Vec<u8>);

/// Connects, upgrades, and returns the stream with any bytes that arrived after the head.
async fn open_socket(w: &Worker, spec: &ConnSpec, source_index: usize) -> Result<Opened, String> {
    let plan = &w.plan;
    let (addr, host_header) = plan.endpoint(spec);
    let sock = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4(),
        SocketAddr::V6(_) => TcpSocket::new_v6(),
    }
    .map_err(|e| format!("socket: {}", e.kind()))?;
    if spec.role == Role::Slow {
        if let Some(bytes) = plan.slow_rcvbuf {
            let _ = sock.set_recv_buffer_size(bytes);
        }
    }
    if !plan.sources.is_empty() && addr.is_ipv4() {
        sys::set_bind_address_no_port(&sock);
        let src = plan.sources[source_index % plan.sources.len()];
        sock.bind(SocketAddr::new(src.into(), 0))
            .map_err(|e| format!("bind: {}", e.kind()))?;
    }
    let stream = sock.connect(addr).await.map_err(|e| match e.kind() {
        io::ErrorKind::ConnectionRefused => "connect_refused".to_owned(),
        io::ErrorKind::AddrNotAvailable => "no_source_port".to_owned(),
        k => format!("connect_{k}").to_lowercase().replace(' ', "_"),
    })?;
    let _ = stream.set_nodelay(true);
    let name = format!("u{}", spec.id);
    let room = format!("r{}", spec.room);
    let path = format!(
        "{}?token={}&name={}&room={}",
        plan.path,
        wire::query_escape(&plan.token),
        wire::query_escape(&name),
        wire::query_escape(&room)
    );
    let request = wire::upgrade_request(host_header, &path, &plan.origin);
    let mut tls = match (&w.tls, &plan.tls) {
        (Some(config), Some(t)) => Some(crate::tls::session(config, &t.server_name)?),
        _ => None,
    };
    let mut io = Io {
        stream: &stream,
        tls: tls.as_mut(),
    };
    io.write_all(&request).await.map_err(|e| {
        if io.tls.is_some() {
            format!("tls_{}", e.kind()).to_lowercase().replace(' ', "_")
        } else {
            "write_request".to_owned()
        }
    })?;
    let mut head = Vec::with_capacity(512);
    let mut chunk = [0u8; 2048];
    loop {
        let n = io.read(&mut chunk).await.map_err(|e| {
            if e.kind() == io::ErrorKind::InvalidData {
                // A TLS failure: the certificate, most often.
                format!("tls_{}", e.to_string().to_lowercase().replace(' ', "_"))
            } else {
                "read_response".to_owned()
            }
        })?;
        if n == 0 {
            return Err("eof_before_response".to_owned());
        }
        head.extend_from_slice(&chunk[..n]);
        if let Some(end) = wire::response_head_end(&head) {
            match wire::response_status(&head[..end]) {
                Some(101) => {
                    let early = head.split_off(end);
                    return Ok((stream, tls, early));
                }
                Some(code) => return Err(format!("http_{code}")),
                None => return Err("bad_response".to_owned()),
            }
        }
        if head.len() > 16 * 1024 {
            return Err("response_head_too_long".to_owned());
        }
    }
}

/// Handles every complete frame at the start of `data`; returns bytes consumed and, if the
/// connection must end, how.
fn process_frames(
    w: &Worker,
    conn: &Conn,
    data: &[u8],
    now_ns: u64,
    joined: &mut Joining,
) -> (usize, Option<End>) {
    let mut used = 0;
    let mut stats = w.stats.borrow_mut();
    loop {
        let parsed = match wire::parse_frame(&data[used..]) {
            Ok(Some(p)) => p,
            Ok(None) => return (used, None),
            Err(e) => {
                return (
                    used,
                    Some(End::Server(format!("protocol_{e:?}").to_lowercase())),
                )
            }
        };
        let (frame, len) = parsed;
        used += len;
        stats.frames += 1;
        if matches!(
            frame.opcode,
            wire::OP_TEXT | wire::OP_BINARY | wire::OP_CONT
        ) {
            stats.data_frames += 1;
        }
        let mut assembled;
        let payload: &[u8] = match frame.opcode {
            wire::OP_TEXT | wire::OP_CONT | wire::OP_BINARY
                if !frame.fin || frame.opcode == wire::OP_CONT =>
            {
                let mut f = conn.fragments.borrow_mut();
                f.extend_from_slice(frame.payload);
                if !frame.fin {
                    continue;
                }
                assembled = std::mem::take(&mut *f);
                assembled.shrink_to_fit();
                &assembled
            }
            _ => frame.payload,
        };
        match frame.opcode {
            wire::OP_TEXT | wire::OP_CONT => match wire::event_kind(payload) {
                EventKind::Message => {
                    if conn.role != Role::Member {
                        continue;
                    }
                    let Some(m) = wire::parse_marker(payload) else {
                        stats.other_events += 1;
                        continue;
                    };
                    stats.deliveries += 1;
                    stats.last_delivery_ns = now_ns;
                    let lat_us = now_ns.saturating_sub(m.sent_ns) / 1000;
                    stats.latency.saturating_record(lat_us.max(1));
                    let mut seen = conn.seen.borrow_mut();
                    match seen.iter_mut().find(|(p, _)| *p == m.publisher) {
                        Some((_, last)) => {
                            if m.counter == *last {
                                stats.duplicates += 1;
                            } else if m.counter < *last {
                                stats.late += 1;
                            } else {
                                if m.counter > *last + 1 {
                                    stats.gaps += 1;
                                }
                                *last = m.counter;
                            }
                        }
                        None => seen.push((m.publisher, m.counter)),
                    }
                }
                EventKind::Presence => stats.presence += 1,
                EventKind::History => {
                    stats.other_events += 1;
                    if let Some((t0, tx, idx)) = joined.take() {
                        let _ = tx.send((idx, Ok(t0.elapsed().as_micros() as u64)));
                    }
                }
                EventKind::Error => {
                    *stats.errors.entry(wire::error_code(payload)).or_default() += 1;
                }
                _ => stats.other_events += 1,
            },
            wire::OP_PING => conn.send_control(wire::OP_PONG, payload),
            wire::OP_CLOSE => {
                let code = if payload.len() >= 2 {
                    u16::from_be_bytes([payload[0], payload[1]])
                } else {
                    1005
                };
                if conn.closing.get() {
                    return (used, Some(End::Ours));
                }
                conn.send_control(wire::OP_CLOSE, &payload[..payload.len().min(2)]);
                let _ = conn.flush();
                return (used, Some(End::Server(format!("close_{code}"))));
            }
            wire::OP_PONG => {}
            _ => stats.other_events += 1,
        }
    }
}

/// Reads everything queued on the socket and handles it. Returns Some(End) when the
/// connection is over.
fn on_readable(w: &Worker, conn: &Conn, joined: &mut Joining) -> Option<End> {
    let mut buf = w.read_buf.borrow_mut();
    let mut filled = {
        let mut lo = conn.leftover.borrow_mut();
        let n = lo.len();
        buf[..n].copy_from_slice(&lo);
        lo.clear();
        if lo.capacity() > 4096 {
            *lo = Vec::new();
        }
        n
    };
    let mut end = None;
    loop {
        let space = buf.len() - filled;
        match conn.with_io(|io| io.try_read(&mut buf[filled..])) {
            Ok(0) => {
                end = Some(if conn.closing.get() {
                    End::Ours
                } else {
                    End::Server("eof".into())
                });
                break;
            }
            Ok(n) => {
                let now_ns = sys::monotonic_ns();
                {
                    let mut s = w.stats.borrow_mut();
                    s.reads += 1;
                    s.bytes_in += n as u64;
                }
                if conn.role == Role::Slow {
                    w.slow_bytes.set(w.slow_bytes.get() + n as u64);
                }
                filled += n;
                let (used, e) = process_frames(w, conn, &buf[..filled], now_ns, joined);
                if e.is_some() {
                    end = e;
                    filled = 0;
                    break;
                }
                buf.copy_within(used..filled, 0);
                filled -= used;
                if filled == buf.len() {
                    end = Some(End::Server("frame_too_large".into()));
                    filled = 0;
                    break;
                }
                if n < space && conn.tls.borrow().is_none() {
                    // A short read took everything the socket held. Clear tokio's readiness
                    // without the extra read() that would only return EAGAIN: data arriving
                    // after this point raises a new epoll edge with a newer tick, which this
                    // clear cannot erase. Saves one system call per wake-up.
                    let _ = conn.stream.try_io(Interest::READABLE, || {
                        Err::<(), _>(io::ErrorKind::WouldBlock.into())
                    });
                    break;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) => {
                end = Some(End::Server(match e.kind() {
                    io::ErrorKind::ConnectionReset => "reset".into(),
                    k => format!("error_{k:?}").to_lowercase(),
                }));
                break;
            }
        }
    }
    if filled > 0 {
        conn.leftover.borrow_mut().extend_from_slice(&buf[..filled]);
    }
    let _ = conn.flush();
    end
}

async fn run_conn(w: Rc<Worker>, index: usize, join_deadline: Instant, tx: JoinTx) {
    let spec = w.plan.conns[index].clone();
    let t0 = Instant::now();
    let opened = tokio::time::timeout_at(join_deadline.into(), open_socket(&w, &spec, index)).await;
    let (stream, tls, early) = match opened {
        Ok(Ok(s)) => s,
        Ok(Err(reason)) => {
            let _ = tx.send((index, Err(reason)));
            return;
        }
        Err(_) => {
            let _ = tx.send((index, Err("timeout_handshake".into())));
            return;
        }
    };
    let conn = Rc::new(Conn {
        role: spec.role,
        publisher: spec.publisher,
        stream,
        tls: RefCell::new(tls),
        out: RefCell::new(Vec::new()),
        leftover: RefCell::new(early),
        fragments: RefCell::new(Vec::new()),
        seen: RefCell::new(Vec::new()),
        wake: Notify::new(),
        closing: Cell::new(false),
        draining: Cell::new(false),
        paused: Cell::new(false),
        mask_seed: Cell::new(0x9e37_79b9 ^ (spec.id.wrapping_mul(2_654_435_761))),
        next_counter: Cell::new(1),
    });
    w.conns.borrow_mut()[index] = Some(conn.clone());
    w.add_open(spec.role, 1);
    let mut joined = Some((t0, tx, index));
    let has_early = !conn.leftover.borrow().is_empty();
    let mut end = if has_early {
        process_early(&w, &conn, &mut joined)
    } else {
        None
    };

    while end.is_none() {
        if (conn.role == Role::Slow || conn.paused.get())
            && joined.is_none()
            && !conn.draining.get()
        {
            conn.wake.notified().await;
            continue;
        }
        let want_write = conn.wants_write();
        let interest = if want_write {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let ready = if joined.is_some() {
            tokio::select! {
                r = conn.stream.ready(interest) => r,
                _ = conn.wake.notified() => continue,
                _ = tokio::time::sleep_until(join_deadline.into()) => {
                    end = Some(End::JoinFailed("timeout_join".into()));
                    break;
                }
            }
        } else {
            tokio::select! {
                r = conn.stream.ready(interest) => r,
                _ = conn.wake.notified() => continue,
            }
        };
        let ready = match ready {
            Ok(r) => r,
            Err(_) => {
                end = Some(End::Server("error".into()));
                break;
            }
        };
        if ready.is_writable() && conn.flush().is_err() {
            end = Some(End::Server("reset".into()));
            break;
        }
        if ready.is_readable() || ready.is_read_closed() {
            end = on_readable(&w, &conn, &mut joined);
        }
    }
    w.conns.borrow_mut()[index] = None;
    w.add_open(spec.role, -1);
    let end = end.expect("loop exits only with an end");
    if let Some((_, tx, idx)) = joined.take() {
        let reason = match &end {
            End::JoinFailed(r) | End::Server(r) => r.clone(),
            End::Ours => "closed_before_join".into(),
        };
        let _ = tx.send((idx, Err(reason)));
        return;
    }
    let outcome = match end {
        End::Ours => return,
        End::Server(r) | End::JoinFailed(r) => r,
    };
    if conn.role == Role::Slow {
        *w.slow_outcomes
            .borrow_mut()
            .entry(outcome.clone())
            .or_default() += 1;
    }
    *w.stats.borrow_mut().ended.entry(outcome).or_default() += 1;
}

/// Handles frames that arrived together with the upgrade response.
fn process_early(w: &Worker, conn: &Conn, joined: &mut Joining) -> Option<End> {
    let data = std::mem::take(&mut *conn.leftover.borrow_mut());
    let (used, end) = process_frames(w, conn, &data, sys::monotonic_ns(), joined);
    if end.is_none() {
        conn.leftover.borrow_mut().extend_from_slice(&data[used..]);
    }
    end
}

async fn connect(
    w: &Rc<Worker>,
    roles: &[Role],
    rate: f64,
    max_in_flight: usize,
    timeout_ms: u64,
) -> ConnectReply {
    let t0 = Instant::now();
    let todo: Vec<usize> = {
        let conns = w.conns.borrow();
        (0..w.plan.conns.len())
            .filter(|&i| roles.contains(&w.plan.conns[i].role) && conns[i].is_none())
            .collect()
    };
    let (tx, mut rx) = mpsc::unbounded_channel();
    let permits = Rc::new(Semaphore::new(max_in_flight.max(1)));
    let mut reply = ConnectReply::default();
    let mut hist = new_histogram();
    let interval = if rate > 0.0 {
        Duration::from_secs_f64(1.0 / rate)
    } else {
        Duration::ZERO
    };
    let mut done = 0usize;
    let record =
        |res: Result<u64, String>, reply: &mut ConnectReply, hist: &mut Histogram<u64>| match res {
            Ok(us) => {
                reply.ok += 1;
                hist.saturating_record(us.max(1));
            }
            Err(reason) => *reply.failed.entry(reason).or_default() += 1,
        };
    for (k, &index) in todo.iter().enumerate() {
        let due = t0 + interval.mul_f64(k as f64);
        tokio::time::sleep_until(due.into()).await;
        // Wait for an in-flight slot, collecting finished joins meanwhile.
        loop {
            while let Ok((_, res)) = rx.try_recv() {
                done += 1;
                permits.add_permits(1);
                record(res, &mut reply, &mut hist);
            }
            if let Ok(p) = permits.try_acquire() {
                p.forget();
                break;
            }
            if let Some((_, res)) = rx.recv().await {
                done += 1;
                permits.add_permits(1);
                record(res, &mut reply, &mut hist);
            }
        }
        let deadline = Instant::now() + Duration::from_millis(timeout_ms);
        let handle = tokio::task::spawn_local(run_conn(w.clone(), index, deadline, tx.clone()));
        w.tasks.borrow_mut()[index] = Some(handle.abort_handle());
    }
    drop(tx);
    while done < todo.len() {
        match rx.recv().await {
            Some((_, res)) => {
                done += 1;
                record(res, &mut reply, &mut hist);
            }
            None => break,
        }
    }
    reply.latency_us = hist_pairs(&hist);
    reply.elapsed_us = t0.elapsed().as_micros() as u64;
    reply
}

/// A small xorshift generator for backoff jitter (no crate needed; quality is beside the point).
struct Jitter(u64);

impl Jitter {
    fn new(seed: u64) -> Self {
        Jitter(seed | 1)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A reconnect storm: every connection of `roles` that is not open starts within `retry.base_ms`
/// and, when it fails before joining (a refusal such as 503 or 429, a timeout, a reset), tries
/// again after full-jitter exponential backoff, until it joins or `retry.deadline_ms` has passed.
/// At most `max_in_flight` upgrades are under way at once.
async fn storm(
    w: Rc<Worker>,
    roles: Vec<Role>,
    max_in_flight: usize,
    timeout_ms: u64,
    retry: Retry,
) -> ConnectReply {
    let t0 = Instant::now();
    let give_up = t0 + Duration::from_millis(retry.deadline_ms);
    let todo: Vec<usize> = {
        let conns = w.conns.borrow();
        (0..w.plan.conns.len())
            .filter(|&i| roles.contains(&w.plan.conns[i].role) && conns[i].is_none())
            .collect()
    };
    let mut rng = Jitter::new(0x2545_f491_4f6c_dd1d ^ (w.plan.worker as u64 + 1) << 32);
    let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Result<u64, String>)>();
    let (due_tx, mut due_rx) = mpsc::unbounded_channel::<usize>();
    let later = |i: usize, delay: Duration| {
        let due_tx = due_tx.clone();
        tokio::task::spawn_local(async move {
            tokio::time::sleep(delay).await;
            let _ = due_tx.send(i);
        });
    };
    for &i in &todo {
        later(i, Duration::from_millis(retry.base_ms).mul_f64(rng.unit()));
    }
    let mut reply = ConnectReply::default();
    let (mut latency, mut back) = (new_histogram(), new_histogram());
    let mut tries = vec![0u32; w.plan.conns.len()];
    let mut waiting = std::collections::VecDeque::new();
    let (mut pending, mut in_flight) = (todo.len(), 0usize);
    // Bounded: every connection finishes by `give_up` plus one attempt's timeout.
    let hard_stop = give_up + Duration::from_millis(timeout_ms) + Duration::from_secs(2);
    while pending > 0 {
        tokio::select! {
            Some(i) = due_rx.recv() => waiting.push_back(i),
            Some((i, res)) = rx.recv() => {
                in_flight -= 1;
                match res {
                    Ok(us) => {
                        reply.ok += 1;
                        latency.saturating_record(us.max(1));
                        back.saturating_record(t0.elapsed().as_micros() as u64 + 1);
                        pending -= 1;
                    }
                    Err(reason) if Instant::now() < give_up => {
                        *reply.retried.entry(reason).or_default() += 1;
                        let k = tries[i].min(20);
                        let ceiling = retry.max_ms.min(retry.base_ms.saturating_mul(1 << k));
                        later(i, Duration::from_millis(ceiling).mul_f64(rng.unit()));
                    }
                    Err(reason) => {
                        *reply.failed.entry(reason).or_default() += 1;
                        pending -= 1;
                    }
                }
            }
            _ = tokio::time::sleep_until(hard_stop.into()) => break,
        }
        while in_flight < max_in_flight.max(1) {
            let Some(i) = waiting.pop_front() else { break };
            in_flight += 1;
            tries[i] += 1;
            reply.attempts += 1;
            let deadline = Instant::now() + Duration::from_millis(timeout_ms);
            let handle = tokio::task::spawn_local(run_conn(w.clone(), i, deadline, tx.clone()));
            w.tasks.borrow_mut()[i] = Some(handle.abort_handle());
        }
    }
    if pending > 0 {
        *reply.failed.entry("storm_deadline".into()).or_default() += pending as u64;
    }
    reply.latency_us = hist_pairs(&latency);
    reply.back_us = hist_pairs(&back);
    reply.elapsed_us = t0.elapsed().as_micros() as u64;
    reply
}

/// Every open publisher sends one message, as fast as the sockets take them.
async fn broadcast(w: &Rc<Worker>, text_bytes: usize) -> PublishReply {
    let publishers: Vec<Rc<Conn>> = w
        .conns
        .borrow()
        .iter()
        .flatten()
        .filter(|c| c.publisher.is_some() && !c.closing.get())
        .cloned()
        .collect();
    let t0 = Instant::now();
    let mut reply = PublishReply {
        first_sent_ns: sys::monotonic_ns(),
        ..PublishReply::default()
    };
    let mut frame = Vec::with_capacity(text_bytes + 64);
    for conn in &publishers {
        send_one(conn, &mut frame, text_bytes);
        reply.sent += 1;
    }
    reply.elapsed_us = t0.elapsed().as_micros() as u64;
    reply
}

/// Sends the next load message from `conn`; false when it was queued behind earlier bytes.
fn send_one(conn: &Conn, frame: &mut Vec<u8>, text_bytes: usize) -> bool {
    let counter = conn.next_counter.get();
    conn.next_counter.set(counter + 1);
    let marker = wire::Marker {
        publisher: conn.publisher.expect("only publishers send"),
        counter,
        sent_ns: sys::monotonic_ns(),
    };
    let body = wire::message_json(marker, text_bytes);
    frame.clear();
    let mut seed = conn.mask_seed.get();
    wire::push_client_frame(frame, wire::OP_TEXT, &body, &mut seed);
    conn.mask_seed.set(seed);
    conn.send(frame)
}

async fn publish(w: Rc<Worker>, rate: f64, duration_ms: u64, text_bytes: usize) -> PublishReply {
    let publishers: Vec<Rc<Conn>> = w
        .conns
        .borrow()
        .iter()
        .flatten()
        .filter(|c| c.publisher.is_some())
        .cloned()
        .collect();
    let mut reply = PublishReply::default();
    let t0 = Instant::now();
    if publishers.is_empty() || rate <= 0.0 {
        return reply;
    }
    let total = (rate * duration_ms as f64 / 1000.0).round() as u64;
    let mut lag = new_histogram();
    let mut frame = Vec::with_capacity(text_bytes + 64);
    let mut since_yield = 0u32;
    w.stop_publishing.set(false);
    for k in 0..total {
        if w.stop_publishing.get() {
            break;
        }
        let due = t0 + Duration::from_secs_f64(k as f64 / rate);
        let now = Instant::now();
        if due > now {
            tokio::time::sleep_until(due.into()).await;
            since_yield = 0;
        } else {
            since_yield += 1;
            if since_yield >= 64 {
                tokio::task::yield_now().await;
                since_yield = 0;
            }
        }
        let conn = &publishers[(k % publishers.len() as u64) as usize];
        if conn.closing.get() {
            continue;
        }
        if reply.first_sent_ns == 0 {
            reply.first_sent_ns = sys::monotonic_ns();
        }
        if !send_one(conn, &mut frame, text_bytes) {
            reply.queued_sends += 1;
        }
        reply.sent += 1;
        lag.saturating_record(Instant::now().saturating_duration_since(due).as_micros() as u64 + 1);
    }
    reply.lag_us = hist_pairs(&lag);
    reply.elapsed_us = t0.elapsed().as_micros() as u64;
    reply
}

async fn close(w: &Rc<Worker>, roles: &[Role], timeout_ms: u64) -> (u64, u64) {
    let targets: Vec<(usize, Rc<Conn>)> = w
        .conns
        .borrow()
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            c.as_ref()
                .filter(|c| roles.contains(&c.role))
                .map(|c| (i, c.clone()))
        })
        .collect();
    for (_, c) in &targets {
        c.closing.set(true);
        c.draining.set(true);
        c.send_control(wire::OP_CLOSE, &1000u16.to_be_bytes());
    }
    drop(targets);
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    let before = w.open_of(roles);
    while w.open_of(roles) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut forced = 0;
    let mut tasks = w.tasks.borrow_mut();
    let mut conns = w.conns.borrow_mut();
    for i in 0..conns.len() {
        if let Some(c) = &conns[i] {
            if roles.contains(&c.role) {
                if let Some(t) = tasks[i].take() {
                    t.abort();
                }
                forced += 1;
                let role = c.role;
                conns[i] = None;
                w.add_open(role, -1);
            }
        }
    }
    (before, forced)
}

async fn drain_slow(w: &Rc<Worker>, timeout_ms: u64) -> DrainReply {
    let slow: Vec<Rc<Conn>> = w
        .conns
        .borrow()
        .iter()
        .flatten()
        .filter(|c| c.role == Role::Slow)
        .cloned()
        .collect();
    for c in &slow {
        c.draining.set(true);
        c.wake.notify_one();
    }
    drop(slow);
    let deadline = Instant::now() + Duration::from_millis(timeout_ms);
    while w.open_of(&[Role::Slow]) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let still_open = w.open_of(&[Role::Slow]);
    let mut outcomes = std::mem::take(&mut *w.slow_outcomes.borrow_mut());
    if still_open > 0 {
        *outcomes.entry("open".into()).or_default() += still_open;
        close(w, &[Role::Slow], 1000).await;
        w.slow_outcomes.borrow_mut().clear();
    }
    DrainReply {
        outcomes,
        bytes_drained: w.slow_bytes.get(),
    }
}

/// Flood frames written per `write`: about 16 KiB of them, so the attacker spends its CPU on
/// the relay rather than on system calls.
const FLOOD_BATCH_BYTES: usize = 16 * 1024;
/// `--attacker-reads slow`: one read of at most this many bytes...
const SLOW_READ_BYTES: usize = 4096;
/// ...every this many milliseconds.
const SLOW_READ_EVERY_MS: u64 = 100;
/// After the attack, how long an attacker may read to learn how the relay ended it, and how much.
const OUTCOME_READ_MS: u64 = 2000;
const OUTCOME_READ_MAX_BYTES: u64 = 64 << 20;

/// How one attacker's flood went.
struct Flooded {
    outcome: String,
    ended_after_ms: Option<u64>,
    frames: u64,
    bytes_sent: u64,
    bytes_read: u64,
}

/// How a failed read or write ended the connection.
fn io_end(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => "reset".into(),
        k => format!("error_{k:?}").to_lowercase(),
    }
}

/// Takes every complete server frame off the front of `inbox`; the code of a close frame if one
/// came (the rest is pongs and events nobody looks at).
fn take_close(inbox: &mut Vec<u8>) -> Option<String> {
    let mut used = 0;
    let mut close = None;
    loop {
        match wire::parse_frame(&inbox[used..]) {
            Ok(Some((f, len))) => {
                used += len;
                if f.opcode == wire::OP_CLOSE {
                    let code = match f.payload {
                        [a, b, ..] => u16::from_be_bytes([*a, *b]),
                        _ => 1005,
                    };
                    close = Some(format!("close_{code}"));
                    break;
                }
            }
            Ok(None) => break,
            Err(e) => {
                close = Some(format!("protocol_{e:?}").to_lowercase());
                break;
            }
        }
    }
    inbox.drain(..used);
    close
}

/// One read into `inbox`: Ok(false) when nothing was waiting, Err(how) when the stream ended.
fn read_some(conn: &Conn, inbox: &mut Vec<u8>, max: usize, read: &mut u64) -> Result<bool, String> {
    let at = inbox.len();
    inbox.resize(at + max, 0);
    let r = conn.with_io(|io| io.try_read(&mut inbox[at..]));
    let n = match &r {
        Ok(n) => *n,
        Err(_) => 0,
    };
    inbox.truncate(at + n);
    *read += n as u64;
    match r {
        Ok(0) => Err("eof".into()),
        Ok(_) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(false),
        Err(e) => Err(io_end(&e)),
    }
}

/// One attacker: writes `kind` frames as fast as the socket takes them until `deadline` or until
/// the relay ends the connection, reading as `reads` says; then reads (bounded) what the relay
/// sent to tell how it ended: its close frame, end of stream, reset, or still `open`.
async fn flood_one(
    conn: Rc<Conn>,
    kind: AttackKind,
    reads: AttackReads,
    t0: Instant,
    deadline: Instant,
) -> Flooded {
    conn.paused.set(true);
    conn.wake.notify_one();
    let mut seed = conn.mask_seed.get();
    // Whatever the connection had queued goes first, so the byte stream stays whole.
    let mut head = std::mem::take(&mut *conn.out.borrow_mut());
    let (opcode, mut frames) = match kind {
        AttackKind::Ping => (wire::OP_PING, 0),
        AttackKind::Pong => (wire::OP_PONG, 0),
        AttackKind::Continuation => {
            let start = br#"{"type":"message","text":"flood"#;
            wire::push_client_frame_fin(&mut head, false, wire::OP_TEXT, start, &mut seed);
            (wire::OP_CONT, 1)
        }
    };
    let mut batch = Vec::with_capacity(FLOOD_BATCH_BYTES + 16);
    // Continuation frames are never final: the message never ends.
    let fin = opcode != wire::OP_CONT;
    while batch.len() < FLOOD_BATCH_BYTES {
        wire::push_client_frame_fin(&mut batch, fin, opcode, &[], &mut seed);
    }
    conn.mask_seed.set(seed);
    let frame_len = 6u64; // 2 header bytes and a 4-byte mask, no payload
    let mut inbox = std::mem::take(&mut *conn.leftover.borrow_mut());
    let (mut bytes_sent, mut batch_bytes, mut bytes_read) = (0u64, 0u64, 0u64);
    let mut off = 0usize;
    let mut in_head = !head.is_empty();
    let mut ended: Option<String> = None;
    let mut ended_at: Option<Instant> = None;
    let mut next_read = Instant::now();
    let mut writes_since_yield = 0u32;
    while ended.is_none() && Instant::now() < deadline {
        if reads == AttackReads::Slow && Instant::now() >= next_read {
            next_read += Duration::from_millis(SLOW_READ_EVERY_MS);
            match read_some(&conn, &mut inbox, SLOW_READ_BYTES, &mut bytes_read) {
                Ok(_) => ended = take_close(&mut inbox),
                Err(how) => ended = Some(how),
            }
            if ended.is_some() {
                ended_at = Some(Instant::now());
                break;
            }
        }
        let buf: &[u8] = if in_head { &head[off..] } else { &batch[off..] };
        match conn.stream.try_write(buf) {
            Ok(n) => {
                bytes_sent += n as u64;
                if !in_head {
                    batch_bytes += n as u64;
                }
                off += n;
                if off == if in_head { head.len() } else { batch.len() } {
                    off = 0;
                    in_head = false;
                }
                writes_since_yield += 1;
                if writes_since_yield >= 16 {
                    // Let the other attackers and the command loop run.
                    writes_since_yield = 0;
                    tokio::task::yield_now().await;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                let until = match reads {
                    AttackReads::Slow => deadline.min(next_read),
                    AttackReads::None => deadline,
                };
                let _ = tokio::time::timeout_at(until.into(), conn.stream.writable()).await;
            }
            Err(e) => {
                ended = Some(io_end(&e));
                ended_at = Some(Instant::now());
            }
        }
    }
    frames += batch_bytes / frame_len;
    // Find out how it ended: the relay's close frame (wherever it is behind the pongs), end of
    // stream, reset. The relay gets OUTCOME_READ_MS after the flood to show it (a relay busy
    // with the flood may send its close frame only once the flood stops); a connection it has
    // not ended by then is `open`.
    let read_deadline = Instant::now() + Duration::from_millis(OUTCOME_READ_MS);
    let mut outcome: Option<String> = ended.as_ref().filter(|e| e.starts_with("close_")).cloned();
    let mut stream_end: Option<String> = None;
    while outcome.is_none()
        && stream_end.is_none()
        && bytes_read < OUTCOME_READ_MAX_BYTES
        && Instant::now() < read_deadline
    {
        match read_some(&conn, &mut inbox, 64 * 1024, &mut bytes_read) {
            Ok(true) => outcome = take_close(&mut inbox),
            Ok(false) => {
                let _ = tokio::time::timeout_at(read_deadline.into(), conn.stream.readable()).await;
            }
            Err(how) => stream_end = Some(how),
        }
    }
    let outcome = outcome.or(stream_end).or(ended).unwrap_or_else(|| {
        // Still open: the connection's own task takes the socket back.
        *conn.leftover.borrow_mut() = std::mem::take(&mut inbox);
        "open".into()
    });
    Flooded {
        ended_after_ms: (outcome != "open")
            .then(|| ended_at.map(|t| t.saturating_duration_since(t0).as_millis() as u64))
            .flatten(),
        outcome,
        frames,
        bytes_sent,
        bytes_read,
    }
}

/// Every attacker of this worker floods at once for `duration_ms`; the ones the relay ended are
/// forgotten, the others go back to reading like any client.
async fn attack(
    w: Rc<Worker>,
    kind: AttackKind,
    reads: AttackReads,
    duration_ms: u64,
) -> AttackReply {
    let cpu0 = sys::process_cpu_us();
    let t0 = Instant::now();
    let deadline = t0 + Duration::from_millis(duration_ms);
    let attackers: Vec<(usize, Rc<Conn>)> = w
        .conns
        .borrow()
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            c.as_ref()
                .filter(|c| c.role == Role::Attacker)
                .map(|c| (i, c.clone()))
        })
        .collect();
    let floods: Vec<JoinHandle<Flooded>> = attackers
        .iter()
        .map(|(_, c)| tokio::task::spawn_local(flood_one(c.clone(), kind, reads, t0, deadline)))
        .collect();
    let mut reply = AttackReply::default();
    for ((index, conn), flood) in attackers.into_iter().zip(floods) {
        let f = match flood.await {
            Ok(f) => f,
            Err(_) => Flooded {
                outcome: "attacker_panicked".into(),
                ended_after_ms: None,
                frames: 0,
                bytes_sent: 0,
                bytes_read: 0,
            },
        };
        *reply.outcomes.entry(f.outcome.clone()).or_default() += 1;
        reply.ended_after_ms.extend(f.ended_after_ms);
        reply.frames_sent += f.frames;
        reply.bytes_sent += f.bytes_sent;
        reply.bytes_read += f.bytes_read;
        conn.paused.set(false);
        if f.outcome == "open" {
            conn.wake.notify_one();
        } else {
            if let Some(t) = w.tasks.borrow_mut()[index].take() {
                t.abort();
            }
            w.conns.borrow_mut()[index] = None;
            w.add_open(Role::Attacker, -1);
        }
    }
    reply.ended_after_ms.sort_unstable();
    reply.elapsed_us = t0.elapsed().as_micros() as u64;
    reply.cpu_us = sys::process_cpu_us().saturating_sub(cpu0);
    reply
}

/// One handshake: connect, upgrade, wait for the first event, close. Returns microseconds to
/// the first event.
async fn one_handshake(w: &Worker, seq: u64, room: u32) -> Result<u64, String> {
    let t0 = Instant::now();
    let spec = ConnSpec {
        room,
        id: 1_000_000 + seq as u32,
        role: Role::Churn,
        publisher: None,
        node: (seq % w.plan.nodes.len().max(1) as u64) as u16,
    };
    let (stream, mut tls, mut early) = open_socket(w, &spec, seq as usize).await?;
    let mut io = Io {
        stream: &stream,
        tls: tls.as_mut(),
    };
    let mut chunk = [0u8; 4096];
    loop {
        if let Ok(Some(_)) = wire::parse_frame(&early) {
            break;
        }
        let n = io
            .read(&mut chunk)
            .await
            .map_err(|_| "read_event".to_owned())?;
        if n == 0 {
            return Err("eof_before_event".into());
        }
        early.extend_from_slice(&chunk[..n]);
    }
    let us = t0.elapsed().as_micros() as u64;
    let mut close = Vec::new();
    let mut seed = seq as u32 | 1;
    wire::push_client_frame(
        &mut close,
        wire::OP_CLOSE,
        &1000u16.to_be_bytes(),
        &mut seed,
    );
    let _ = io.write_all(&close).await;
    // Wait (bounded) for the server to finish the close handshake so the server, not the
    // client, holds TIME_WAIT.
    let _ = tokio::time::timeout(Duration::from_millis(1000), async {
        loop {
            match io.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
        }
    })
    .await;
    Ok(us)
}

async fn handshakes(
    w: &Rc<Worker>,
    count: u64,
    concurrency: usize,
    timeout_ms: u64,
) -> HandshakeReply {
    let t0 = Instant::now();
    let next = Rc::new(Cell::new(0u64));
    let results = Rc::new(RefCell::new((
        new_histogram(),
        BTreeMap::<String, u64>::new(),
        0u64,
    )));
    let mut loops = Vec::new();
    for lane in 0..concurrency.max(1) {
        let (w, next, results) = (w.clone(), next.clone(), results.clone());
        loops.push(tokio::task::spawn_local(async move {
            loop {
                let seq = next.get();
                if seq >= count {
                    break;
                }
                next.set(seq + 1);
                let room = 900_000 + w.plan.worker * 10_000 + lane as u32;
                let res = tokio::time::timeout(
                    Duration::from_millis(timeout_ms),
                    one_handshake(&w, seq, room),
                )
                .await;
                let mut r = results.borrow_mut();
                match res {
                    Ok(Ok(us)) => {
                        r.0.saturating_record(us.max(1));
                        r.2 += 1;
                    }
                    Ok(Err(reason)) => *r.1.entry(reason).or_default() += 1,
                    Err(_) => *r.1.entry("timeout".into()).or_default() += 1,
                }
            }
        }));
    }
    for l in loops {
        let _ = l.await;
    }
    let r = results.borrow();
    HandshakeReply {
        ok: r.2,
        failed: r.1.clone(),
        latency_us: hist_pairs(&r.0),
        elapsed_us: t0.elapsed().as_micros() as u64,
    }
}

fn reply(r: &Reply) {
    let line = serde_json::to_string(r).expect("replies always serialise");
    let mut out = io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Entry point of `roomcast-load worker`: reads the plan and then commands from stdin.
pub fn main() -> anyhow::Result<()> {
    sys::raise_nofile_limit();
    let mut plan_line = String::new();
    io::stdin().lock().read_line(&mut plan_line)?;
    let plan: WorkerPlan = serde_json::from_str(&plan_line)?;
    // Commands arrive on a plain thread so the runtime thread never blocks on stdin.
    let (cmd_tx, mut cmd_rx) = mpsc::unbounded_channel::<Command>();
    std::thread::spawn(move || {
        for line in io::stdin().lock().lines() {
            let Ok(line) = line else { break };
            match serde_json::from_str::<Command>(&line) {
                Ok(c) => {
                    if cmd_tx.send(c).is_err() {
                        break;
                    }
                }
                Err(e) => reply(&Reply::Failed {
                    error: format!("bad command: {e}"),
                }),
            }
        }
        let _ = cmd_tx.send(Command::Exit);
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let n = plan.conns.len();
    let tls = match &plan.tls {
        Some(t) => Some(crate::tls::client_config(t.ca_file.as_deref())?),
        None => None,
    };
    let w = Rc::new(Worker {
        tls,
        plan,
        stats: RefCell::new(Stats::new()),
        conns: RefCell::new(vec![None; n]),
        tasks: RefCell::new(vec![None; n]),
        open: Cell::new([0; 4]),
        read_buf: RefCell::new(vec![0u8; READ_BUFFER_BYTES]),
        slow_outcomes: RefCell::new(BTreeMap::new()),
        slow_bytes: Cell::new(0),
        stop_publishing: Cell::new(false),
        started_cpu_us: sys::process_cpu_us(),
    });
    local.block_on(&rt, async move {
        let mut publishing: Option<JoinHandle<PublishReply>> = None;
        let mut attacking: Option<JoinHandle<AttackReply>> = None;
        let mut storming: Option<JoinHandle<ConnectReply>> = None;
        while let Some(cmd) = cmd_rx.recv().await {
            match cmd {
                Command::Connect {
                    roles,
                    rate_per_s,
                    max_in_flight,
                    timeout_ms,
                } => {
                    let r = connect(&w, &roles, rate_per_s, max_in_flight, timeout_ms).await;
                    reply(&Reply::Connected(r));
                }
                Command::StormStart {
                    roles,
                    max_in_flight,
                    timeout_ms,
                    retry,
                } => {
                    storming = Some(tokio::task::spawn_local(storm(
                        w.clone(),
                        roles,
                        max_in_flight,
                        timeout_ms,
                        retry,
                    )));
                    reply(&Reply::Done);
                }
                Command::StormWait => {
                    let r = match storming.take() {
                        Some(h) => h.await.unwrap_or_default(),
                        None => ConnectReply::default(),
                    };
                    reply(&Reply::Connected(r));
                }
                Command::Broadcast { text_bytes } => {
                    let r = broadcast(&w, text_bytes).await;
                    reply(&Reply::Published(r));
                }
                Command::Reset => {
                    *w.stats.borrow_mut() = Stats::new();
                    reply(&Reply::Done);
                }
                Command::PublishStart {
                    rate_per_s,
                    duration_ms,
                    text_bytes,
                } => {
                    publishing = Some(tokio::task::spawn_local(publish(
                        w.clone(),
                        rate_per_s,
                        duration_ms,
                        text_bytes,
                    )));
                    reply(&Reply::Done);
                }
                Command::PublishWait => {
                    let r = match publishing.take() {
                        Some(h) => h.await.unwrap_or_default(),
                        None => PublishReply::default(),
                    };
                    reply(&Reply::Published(r));
                }
                Command::PublishStop => {
                    w.stop_publishing.set(true);
                    reply(&Reply::Done);
                }
                Command::Report => {
                    let s = w.stats.borrow();
                    let o = w.open.get();
                    reply(&Reply::Stats(StatsReply {
                        deliveries: s.deliveries,
                        duplicates: s.duplicates,
                        gaps: s.gaps,
                        late: s.late,
                        presence: s.presence,
                        other_events: s.other_events,
                        frames: s.frames,
                        data_frames: s.data_frames,
                        bytes_in: s.bytes_in,
                        reads: s.reads,
                        errors: s.errors.clone(),
                        ended: s.ended.clone(),
                        latency_us: hist_pairs(&s.latency),
                        open: o.iter().sum(),
                        cpu_us: sys::process_cpu_us() - w.started_cpu_us,
                        last_delivery_ns: s.last_delivery_ns,
                    }));
                }
                Command::Close { roles, timeout_ms } => {
                    let (closed, forced) = close(&w, &roles, timeout_ms).await;
                    reply(&Reply::Closed { closed, forced });
                }
                Command::DrainSlow { timeout_ms } => {
                    let r = drain_slow(&w, timeout_ms).await;
                    reply(&Reply::Drained(r));
                }
                Command::AttackStart {
                    kind,
                    reads,
                    duration_ms,
                } => {
                    attacking = Some(tokio::task::spawn_local(attack(
                        w.clone(),
                        kind,
                        reads,
                        duration_ms,
                    )));
                    reply(&Reply::Done);
                }
                Command::AttackWait => {
                    let r = match attacking.take() {
                        Some(h) => h.await.unwrap_or_default(),
                        None => AttackReply::default(),
                    };
                    reply(&Reply::Attacked(r));
                }
                Command::Handshake {
                    count,
                    concurrency,
                    timeout_ms,
                } => {
                    let r = handshakes(&w, count, concurrency, timeout_ms).await;
                    reply(&Reply::Handshakes(r));
                }
                Command::Exit => break,
            }
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_close_frame_is_found_behind_pongs_and_split_reads() {
        let mut stream = Vec::new();
        for _ in 0..1000 {
            stream.extend_from_slice(&[0x80 | wire::OP_PONG, 0]);
        }
        stream.extend_from_slice(&[0x80 | wire::OP_CLOSE, 4, 0x03, 0xf0, b'n', b'o']);
        let mut inbox = Vec::new();
        let mut found = None;
        for chunk in stream.chunks(7) {
            inbox.extend_from_slice(chunk);
            if let Some(c) = take_close(&mut inbox) {
                found = Some(c);
                break;
            }
        }
        assert_eq!(found.as_deref(), Some("close_1008"));
    }

    #[test]
    fn a_continuation_flood_starts_a_message_it_never_ends() {
        let mut seed = 7;
        let mut out = Vec::new();
        wire::push_client_frame_fin(&mut out, false, wire::OP_TEXT, b"{", &mut seed);
        wire::push_client_frame_fin(&mut out, false, wire::OP_CONT, &[], &mut seed);
        assert_eq!(out[0], wire::OP_TEXT, "first frame: text, FIN clear");
        assert_eq!(out[1], 0x80 | 1, "masked, one byte");
        assert_eq!(
            &out[7..9],
            &[wire::OP_CONT, 0x80],
            "then an empty masked continuation"
        );
        assert_eq!(out.len(), 7 + 6);
    }
}
