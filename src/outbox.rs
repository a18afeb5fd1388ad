//! The outbox: the part of a connection that other threads may touch.
//!
//! Publishers push shared frames (`Bytes`) into a connection's outbox and wake the connection,
//! which drains it with vectored writes when its reactor polls it. Publishers never await and
//! never touch the socket (except the direct write to an idle one, below). The outbox is
//! bounded in bytes: a push that would pass `OUTBOX_MAX_BYTES` marks the connection closing with
//! 1013 and drops what it held, so a stalled reader costs at most the limit. The heartbeat
//! sweeper also works through this struct: it writes the ping itself to an idle plain socket
//! (see [`Outbox::heartbeat`]) and otherwise sets flags and wakes the connection.
//!
//! What a queued frame costs is charged, not only its payload: every frame is charged its length
//! plus [`FRAME_OVERHEAD`] (its `Bytes` slot in the queue and its share of the allocation header),
//! so a flood of tiny frames reaches the limit as fast as it grows memory. The charge stays until
//! the writer reports the frame written, so frames taken into a pending write still count. At most
//! one pong waits in the queue: a newer pong replaces it (RFC 6455 5.5.3).
//!
//! The charges of every outbox are also summed process-wide ([`total_queued_bytes`]); the server
//! holds that sum under `OUTBOX_TOTAL_MAX_BYTES` by closing the largest queues first.
//!
//! Memory: an idle outbox holds an empty `VecDeque` (no allocation), so its cost is this struct
//! inside one `Arc` — see ARCHITECTURE.md for the byte count.

use std::collections::VecDeque;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::Mutex;

use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::frame::PING;

/// What a queued frame costs beyond its bytes: its 32-byte `Bytes` slot in the queue and its
/// share of the shared allocation's header, rounded up. An empty pong is charged 66 bytes, not 2.
pub const FRAME_OVERHEAD: usize = 64;

/// Bytes charged across every outbox in the process.
static QUEUED_TOTAL: AtomicUsize = AtomicUsize::new(0);

/// Bytes charged across every outbox in the process (the `roomcast_outbox_queued_bytes` gauge).
pub fn total_queued_bytes() -> usize {
    QUEUED_TOTAL.load(Ordering::Relaxed)
}

/// `OUTBOX_TOTAL_MAX_BYTES`: a charge that takes the process-wide sum past it wakes
/// [`over_budget`]'s waiter. Unlimited until the server sets it.
static BUDGET: AtomicUsize = AtomicUsize::new(usize::MAX);
static OVER_BUDGET: Notify = Notify::const_new();

/// Sets the process-wide budget (`OUTBOX_TOTAL_MAX_BYTES`).
pub fn set_total_budget(bytes: usize) {
    BUDGET.store(bytes, Ordering::Relaxed);
}

/// Resolves once a charge has taken the process-wide sum past the budget (at once if one did
/// since the last call). The server's budget task waits here instead of polling, so an idle
/// relay has no periodic wake-up for it.
pub async fn over_budget() {
    OVER_BUDGET.notified().await
}

fn charge(frame: &Bytes) -> usize {
    frame.len() + FRAME_OVERHEAD
}

/// Flags shared with publishers and the heartbeat sweeper.
const ALIVE: u8 = 1;
const PING_DUE: u8 = 2;
const DEAD: u8 = 4;
/// Something was pushed or requested since the connection last looked.
const WORK: u8 = 8;
/// Frames were pushed without waking the connection (a room's flush window will): the next ordinary
/// push wakes it even though the queue is not empty.
const HELD: u8 = 16;
/// The connection holds the start of an incomplete frame: its age (FRAME_TIMEOUT_MS) is checked
/// when the connection is polled, so the heartbeat must wake it rather than ping on its own.
const READING_FRAME: u8 = 32;

/// What the heartbeat did to a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Beat {
    /// The ping was written to the socket by the sweeper; the connection was not woken.
    Pinged,
    /// The connection was woken to ping, to check its clocked limits, or to end a silent peer.
    Woken,
}

/// A moment as microseconds since the process's first stamp, wrapping every 71 minutes (a frame
/// waits at most WRITE_STALL_MS before its connection is closed, far less), or `NONE`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Stamp(u32);

static STAMP_EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();

impl Stamp {
    const NONE: Stamp = Stamp(0);

    fn now() -> Stamp {
        let epoch = *STAMP_EPOCH.get_or_init(Instant::now);
        // (0 is `NONE`: the one microsecond in 71 minutes that maps there is taken as the next.)
        Stamp((epoch.elapsed().as_micros() as u32).max(1))
    }

    /// The moment again (`None` for `NONE`).
    fn instant(self) -> Option<Instant> {
        if self == Stamp::NONE {
            return None;
        }
        let age = Stamp::now().0.wrapping_sub(self.0);
        let now = Instant::now();
        Some(
            now.checked_sub(std::time::Duration::from_micros(age.into()))
                .unwrap_or(now),
        )
    }
}

/// `Queue::pong_at` when no pong waits (a plain `u32`, not an `Option`: it keeps the outbox
/// in its size class).
const NO_PONG: u32 = u32::MAX;

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// Written to the idle socket at once, without waking the connection
    /// ([`Outbox::push_or_write`]).
    Written,
    /// The push would have passed the byte limit: the connection is now closing with 1013.
    SlowConsumer,
    /// The connection is already closing; the frame was dropped.
    Closed,
}

#[derive(Debug)]
struct Queue {
    frames: VecDeque<Bytes>,
    /// Charges of the frames queued here plus those taken by the writer and not yet written.
    /// (`u32`: OUTBOX_MAX_BYTES is at most 1 GiB, and a push past the limit is refused.)
    queued_bytes: u32,
    /// Index in `frames` of the queued pong, or `NO_PONG`. Frames are only appended until
    /// `take` empties the queue, and the pong is re-queued at the back when replaced, so the
    /// index stays right.
    pong_at: u32,
    /// When the oldest unwritten frame was queued (for the publish-to-write histogram), as a
    /// [`Stamp`]: 4 bytes instead of an `Option<Instant>`'s 16 keep the outbox in the 112-byte
    /// class.
    oldest: Stamp,
    /// Close code the connection must close with, once set.
    closing: Option<u16>,
    /// `frames[0]` is the rest of a frame a direct write began: it is never dropped (a close
    /// must not cut into it), only taken by the writer.
    begun: bool,
    /// The plain socket that pings and frames may be written to directly while the connection
    /// is idle, or -1 (TLS, closing, or not allowed). Set and cleared under this lock, and direct
    /// writes happen under it, so the socket cannot be closed (and its number reused) meanwhile.
    direct_fd: RawFd,
}

impl Default for Queue {
    fn default() -> Self {
        Queue {
            frames: VecDeque::new(),
            queued_bytes: 0,
            pong_at: NO_PONG,
            oldest: Stamp::NONE,
            closing: None,
            begun: false,
            direct_fd: -1,
        }
    }
}

/// A batch taken by the writer.
pub struct Batch {
    pub frames: VecDeque<Bytes>,
    pub oldest: Option<Instant>,
    pub closing: Option<u16>,
    /// The first frame is the rest of a frame already begun on the wire (a direct write the
    /// socket took only part of): it must be written before anything else, a close included.
    pub begun: bool,
}

/// The wake-up is an `AtomicWaker` and a flag rather than a `tokio::sync::Notify`, because
/// waiting on a `Notify` needs a `Notified` future stored for every connection (tens of
/// bytes per idle connection); a waker slot is polled without storing anything.
#[derive(Debug)]
pub struct Outbox {
    queue: Mutex<Queue>,
    waker: AtomicWaker,
    flags: AtomicU8,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            queue: Mutex::default(),
            waker: AtomicWaker::new(),
            flags: AtomicU8::new(ALIVE),
        }
    }
}

/// A hint to load the cache line holding `p`; it reads nothing and cannot fault.
#[inline(always)]
#[allow(unsafe_code)]
fn prefetch_line(p: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: the intrinsic needs SSE, which every x86-64 CPU has; `prefetcht0` only hints,
    // so any address is allowed.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(p.cast())
    };
    #[cfg(not(target_arch = "x86_64"))]
    let _ = p;
}

impl Queue {
    fn add(&mut self, charged: usize) {
        self.queued_bytes = self.queued_bytes.saturating_add(charged as u32);
        let before = QUEUED_TOTAL.fetch_add(charged, Ordering::Relaxed);
        let budget = BUDGET.load(Ordering::Relaxed);
        if before <= budget && before + charged > budget {
            // Crossing the budget, not every charge above it: one wake per excursion (the
            // budget task re-checks on its own while the sum stays above).
            OVER_BUDGET.notify_one();
        }
    }

    fn sub(&mut self, charged: usize) {
        let charged = charged.min(self.queued_bytes as usize);
        self.queued_bytes -= charged as u32;
        QUEUED_TOTAL.fetch_sub(charged, Ordering::Relaxed);
    }

    /// Drop every frame still queued (the connection is closing as a slow consumer), except
    /// the rest of a frame already begun on the wire.
    fn discard(&mut self) {
        let keep = usize::from(self.begun && !self.frames.is_empty());
        let freed: usize = self.frames.iter().skip(keep).map(charge).sum();
        self.frames.truncate(keep);
        if keep == 0 {
            self.frames = VecDeque::new();
        }
        self.pong_at = NO_PONG;
        self.sub(freed);
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        // Frames a closing connection never wrote are still charged: give the charge back.
        let q = self.queue.get_mut().unwrap_or_else(|p| p.into_inner());
        let left = q.queued_bytes as usize;
        q.sub(left);
    }
}

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue inconsistent (every update is a
        // single push/pop/assignment), so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue a frame for this connection, enforcing the byte limit. Never blocks on I/O.
    pub fn push(&self, frame: &Bytes, max_bytes: usize) -> Pushed {
        self.queue_and_wake(self.lock(), frame, max_bytes)
    }

    /// `push` with the lock taken: queue, then wake the connection if it has not been woken for
    /// what is queued (or a flush window held frames back from it).
    fn queue_and_wake(
        &self,
        mut q: std::sync::MutexGuard<'_, Queue>,
        frame: &Bytes,
        max_bytes: usize,
    ) -> Pushed {
        let (pushed, wake) = Self::push_locked(&mut q, frame, max_bytes);
        drop(q);
        if wake || self.flags.load(Ordering::Relaxed) & HELD != 0 {
            self.wake();
        }
        pushed
    }

    /// `push`, but a frame for an idle connection is written to its socket here and then,
    /// without waking the connection: when nothing is queued or half-written (so nothing can be
    /// overtaken or split), no close is under way and the socket allows it
    /// ([`Outbox::allow_direct_writes`]). A fan-out then costs one `send` per member rather than
    /// a wake-up, a poll and a `writev` of the member's task. A socket that takes part of the
    /// frame gets the rest through the queue (and the connection is woken for it); a full one gets
    /// the whole frame queued, as by `push`.
    pub fn push_or_write(&self, frame: &Bytes, max_bytes: usize) -> Pushed {
        let q = self.lock();
        if Self::may_write_directly(&q) {
            match Self::write_directly(&q, frame) {
                Some(n) if n == frame.len() => return Pushed::Written,
                Some(n) => {
                    self.push_rest(q, frame.slice(n..));
                    return Pushed::Written;
                }
                None => {}
            }
        }
        self.queue_and_wake(q, frame, max_bytes)
    }

    /// Ask the CPU to start loading the lines of this outbox's queue (its lock and what
    /// `push_or_write` reads under it) without waiting for them. A fan-out calls it for the next
    /// member while the current member's `send` runs: each outbox is touched once per
    /// delivery, long after the cache last saw it, and that load was 80 % of `push_or_write`'s
    /// samples in a profile of 10,000 members at 100,000 deliveries/s.
    #[inline]
    pub fn prefetch(&self) {
        // The queue spans at most two cache lines: its first and last byte name both.
        const _: () = assert!(std::mem::size_of::<Mutex<Queue>>() <= 64);
        let start = std::ptr::from_ref(&self.queue).cast::<u8>();
        let end = start.wrapping_add(std::mem::size_of::<Mutex<Queue>>() - 1);
        prefetch_line(start);
        prefetch_line(end);
    }

    /// `push`, without waking the connection unless the push closed it (a slow
    /// consumer): a room's flush window wakes it later (`hub::FlushWindow`).
    pub fn push_quietly(&self, frame: &Bytes, max_bytes: usize) -> Pushed {
        let mut q = self.lock();
        let (pushed, _) = Self::push_locked(&mut q, frame, max_bytes);
        if pushed == Pushed::Queued {
            self.flags.fetch_or(HELD, Ordering::Relaxed);
        }
        drop(q);
        if pushed == Pushed::SlowConsumer {
            self.wake();
        }
        pushed
    }

    /// `push` under the lock; also says whether the connection needs waking.
    fn push_locked(q: &mut Queue, frame: &Bytes, max_bytes: usize) -> (Pushed, bool) {
        if q.closing.is_some() {
            return (Pushed::Closed, false);
        }
        if q.queued_bytes as usize + charge(frame) > max_bytes {
            q.closing = Some(1013);
            q.discard();
            return (Pushed::SlowConsumer, true);
        }
        let was_idle = q.frames.is_empty();
        if q.frames.capacity() == 0 {
            // Room for one frame, not the four a `VecDeque` takes by default: most pushes to an
            // idle connection are one frame that the connection writes and drops at once, and four
            // `Bytes` are 128 B, the size class of every connection's own outbox. When thousands
            // join at once, presence puts one such queue on every member, and the holes those
            // leave between long-lived outboxes kept about 100 B per connection resident
            // (`tests/idle_connection_memory.rs` shows the class's pages).
            q.frames.reserve_exact(1);
        }
        q.frames.push_back(frame.clone());
        q.add(charge(frame));
        if q.oldest == Stamp::NONE {
            q.oldest = Stamp::now();
        }
        (Pushed::Queued, was_idle)
    }

    /// Queue a pong for the peer's latest ping. A pong for an earlier ping that still waits in
    /// the queue is dropped (RFC 6455 5.5.3 allows answering only the most recent ping), so a
    /// peer that pings faster than it reads has one pong queued, not one per ping.
    pub fn push_pong(&self, frame: Bytes, max_bytes: usize) -> Pushed {
        let mut q = self.lock();
        let at = std::mem::replace(&mut q.pong_at, NO_PONG);
        if at != NO_PONG {
            if let Some(old) = q.frames.remove(at as usize) {
                q.sub(charge(&old));
            }
        }
        let at = q.frames.len() as u32;
        let (pushed, wake) = Self::push_locked(&mut q, &frame, max_bytes);
        if pushed == Pushed::Queued {
            q.pong_at = at;
        }
        drop(q);
        if wake {
            self.wake();
        }
        pushed
    }

    /// Close with `code` at once, dropping what is queued (the process-wide budget is spent).
    pub fn close_discarding(&self, code: u16) {
        let mut q = self.lock();
        if q.closing.is_none() {
            q.closing = Some(code);
        }
        q.discard();
        drop(q);
        self.wake();
    }

    /// Ask the connection to close with `code` after what is already queued (1001 at shutdown,
    /// 1008 for abuse, ...). The first close request wins.
    pub fn close(&self, code: u16) {
        let mut q = self.lock();
        if q.closing.is_none() {
            q.closing = Some(code);
        }
        drop(q);
        self.wake();
    }

    fn wake(&self) {
        self.flags.fetch_or(WORK, Ordering::Release);
        self.waker.wake();
    }

    /// Wake the connection so it checks its clocked limits (an auth deadline) or writes
    /// what its TLS session holds, with nothing queued.
    pub fn nudge(&self) {
        self.wake();
    }

    /// Take everything queued (the writer keeps it until written).
    pub fn take(&self) -> Batch {
        let mut q = self.lock();
        q.pong_at = NO_PONG;
        self.flags.fetch_and(!HELD, Ordering::Relaxed);
        Batch {
            frames: std::mem::take(&mut q.frames),
            oldest: std::mem::replace(&mut q.oldest, Stamp::NONE).instant(),
            closing: q.closing,
            begun: std::mem::take(&mut q.begun),
        }
    }

    /// Record that `bytes` left the process and `frames` frames were completely written (the
    /// close frame is written without being queued, hence the saturation).
    pub fn written(&self, bytes: usize, frames: usize) {
        self.lock().sub(bytes + frames * FRAME_OVERHEAD);
    }

    /// Bytes still counted against this connection (summed for the queued-bytes gauge at scrape
    /// time, so the hot path never touches a shared gauge).
    pub fn queued_bytes(&self) -> usize {
        self.lock().queued_bytes as usize
    }

    /// Ready once something was pushed, a close was requested or the heartbeat wants attention
    /// since the last time this returned ready. Only the connection's own task polls this.
    pub fn poll_work(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.flags.load(Ordering::Acquire) & WORK == 0 {
            self.waker.register(cx.waker());
            if self.flags.load(Ordering::Acquire) & WORK == 0 {
                return Poll::Pending;
            }
        }
        self.flags.fetch_and(!WORK, Ordering::AcqRel);
        Poll::Ready(())
    }

    // --- heartbeat ---------------------------------------------------------------------------

    /// The peer sent something: it is alive.
    pub fn mark_alive(&self) {
        if self.flags.load(Ordering::Relaxed) & ALIVE == 0 {
            self.flags.fetch_or(ALIVE, Ordering::Relaxed);
        }
    }

    /// Called by the heartbeat sweeper once per interval. A peer that has not been heard from
    /// since the previous sweep is marked dead (and the connection woken to end it); otherwise
    /// it is pinged.
    ///
    /// An idle plain connection is pinged by the sweeper itself: when nothing is queued or
    /// being written (so no frame can be split), no close is under way and no incomplete frame
    /// waits for its deadline, the two ping bytes go straight to the socket and the connection
    /// sleeps on. Waking a connection only for it to write two bytes was most of an idle relay's
    /// CPU. The peer's pong wakes the connection as any read does. Otherwise (TLS, a busy or full
    /// socket) the connection is asked to queue the ping.
    pub fn heartbeat(&self) -> Beat {
        let prev = self.flags.fetch_and(!ALIVE, Ordering::Relaxed);
        if prev & ALIVE == 0 {
            self.flags.fetch_or(DEAD, Ordering::Relaxed);
        } else if prev & READING_FRAME == 0 && self.ping_directly() {
            return Beat::Pinged;
        } else {
            self.flags.fetch_or(PING_DUE, Ordering::Relaxed);
        }
        self.wake();
        Beat::Woken
    }

    /// Write the ping to the idle socket (see [`Outbox::heartbeat`]). False when the connection
    /// must send it.
    fn ping_directly(&self) -> bool {
        let q = self.lock();
        if !Self::may_write_directly(&q) {
            return false;
        }
        match Self::write_directly(&q, PING) {
            Some(n) if n == PING.len() => true,
            Some(n) => {
                // The socket took one byte (it had almost no room).
                self.push_rest(q, Bytes::from_static(&PING[n..]));
                true
            }
            None => false,
        }
    }

    /// Queue the rest of a frame a direct write began (the queue is empty: it goes first) and
    /// wake the connection to write it. It is marked `begun`: a close never drops or cuts into it.
    fn push_rest(&self, mut q: std::sync::MutexGuard<'_, Queue>, rest: Bytes) {
        Self::push_locked(&mut q, &rest, usize::MAX);
        q.begun = true;
        drop(q);
        self.wake();
    }

    /// Whether bytes may go straight to the socket now: it allows it, no close is under way,
    /// and nothing is queued or taken but not completely written (whose bytes would be
    /// overtaken or split).
    fn may_write_directly(q: &Queue) -> bool {
        q.direct_fd >= 0 && q.closing.is_none() && q.queued_bytes == 0
    }

    /// One non-blocking `send` of `bytes` to the socket, under the queue's lock (the caller's
    /// guard; `may_write_directly` said yes). How many bytes it took, or `None` when it took
    /// none (full, or broken: the connection's own write finds out which).
    ///
    /// The system call is made directly rather than through libc's `send`, which is a thread
    /// cancellation point and wraps every call in two atomic updates of the thread's
    /// cancellation state; a fan-out makes one such call per member.
    #[allow(unsafe_code)]
    fn write_directly(q: &Queue, bytes: &[u8]) -> Option<usize> {
        // SAFETY: `allow_direct_writes`'s contract keeps the socket open while `direct_fd` is set,
        // and clearing it takes the lock our caller holds until the write is done; `sendto`
        // with no address is `send`, and only reads `bytes.len()` bytes at `bytes`.
        let n = unsafe {
            libc::syscall(
                libc::SYS_sendto,
                libc::c_long::from(q.direct_fd),
                bytes.as_ptr(),
                bytes.len(),
                libc::c_long::from(libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT),
                std::ptr::null::<libc::sockaddr>(),
                0 as libc::c_long,
            )
        };
        (n > 0).then_some(n as usize)
    }

    /// Let the heartbeat's ping and fan-out frames go straight to this connection's plain socket
    /// `fd` while the connection is idle (see [`Outbox::heartbeat`], [`Outbox::push_or_write`]).
    ///
    /// # Safety
    /// `fd` must stay open until [`Outbox::forbid_direct_writes`] has returned, and until then
    /// everything written to it must go through this outbox (charged until written).
    #[allow(unsafe_code)]
    pub unsafe fn allow_direct_writes(&self, fd: RawFd) {
        self.lock().direct_fd = fd;
    }

    /// Stop direct writes to the socket (before the connection writes a close frame of its own
    /// or closes the socket). Once this returns, none is under way.
    pub fn forbid_direct_writes(&self) {
        self.lock().direct_fd = -1;
    }

    /// Whether the connection holds the start of an incomplete frame (see `READING_FRAME`).
    pub fn set_reading_frame(&self, reading: bool) {
        let set = self.flags.load(Ordering::Relaxed) & READING_FRAME != 0;
        if reading && !set {
            self.flags.fetch_or(READING_FRAME, Ordering::Relaxed);
        } else if !reading && set {
            self.flags.fetch_and(!READING_FRAME, Ordering::Relaxed);
        }
    }

    /// The peer was declared dead but turned out to be talking (its bytes wait unread): alive.
    pub fn revive(&self) {
        self.flags.fetch_and(!DEAD, Ordering::Relaxed);
        self.flags.fetch_or(ALIVE, Ordering::Relaxed);
    }

    /// Whether a close was requested (the connection is on its way out).
    pub fn is_closing(&self) -> bool {
        self.lock().closing.is_some()
    }

    /// Whether the heartbeat declared this peer dead.
    pub fn is_dead(&self) -> bool {
        self.flags.load(Ordering::Relaxed) & DEAD != 0
    }

    /// Whether a ping is due (clears the request).
    pub fn take_ping_due(&self) -> bool {
        self.flags.fetch_and(!PING_DUE, Ordering::Relaxed) & PING_DUE != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_charge_crossing_the_process_budget_wakes_the_budget_task() {
        let o = Outbox::default();
        // Far above what the other tests running beside this one ever charge.
        const MARGIN: usize = 256 << 20;
        set_total_budget(total_queued_bytes() + MARGIN);
        let waiter = tokio::spawn(over_budget());
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished(), "nothing crossed the budget yet");
        // Zeroed pages nobody touches: no real memory.
        let big = Bytes::from(vec![0u8; MARGIN + 1]);
        assert_eq!(o.push(&big, 2 * MARGIN), Pushed::Queued);
        let woke = tokio::time::timeout(std::time::Duration::from_secs(5), waiter).await;
        set_total_budget(usize::MAX);
        assert!(woke.is_ok(), "the crossing charge woke the budget task");
    }

    /// A connected pair of plain sockets: (the relay's end, the peer's, non-blocking).
    fn socket_pair() -> (std::net::TcpStream, std::net::TcpStream) {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let peer =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (relay_end, _) = listener.accept().expect("accept");
        // As tokio keeps the relay's sockets: a send never blocks.
        relay_end.set_nonblocking(true).expect("non-blocking");
        peer.set_nonblocking(true).expect("non-blocking");
        (relay_end, peer)
    }

    /// What the peer has received so far.
    fn received(peer: &mut std::net::TcpStream) -> Vec<u8> {
        use std::io::Read;
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut buf = [0u8; 64];
        match peer.read(&mut buf) {
            Ok(n) => buf[..n].to_vec(),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Vec::new(),
            Err(e) => panic!("read: {e}"),
        }
    }

    fn woken(o: &Outbox) -> bool {
        let mut cx = Context::from_waker(futures_util::task::noop_waker_ref());
        o.poll_work(&mut cx).is_ready()
    }

    #[allow(unsafe_code)]
    fn allow(o: &Outbox, socket: &std::net::TcpStream) {
        use std::os::fd::AsRawFd;
        // SAFETY: every test forbids direct writes (or drops the outbox) before the socket.
        unsafe { o.allow_direct_writes(socket.as_raw_fd()) };
    }

    #[test]
    fn the_heartbeat_pings_an_idle_plain_socket_itself_without_waking_the_task() {
        let (relay_end, mut peer) = socket_pair();
        let o = Outbox::default();
        allow(&o, &relay_end);
        assert_eq!(o.heartbeat(), Beat::Pinged);
        assert_eq!(received(&mut peer), PING, "the ping went out");
        assert!(!woken(&o), "the task was not woken");
        assert!(!o.take_ping_due(), "and has no ping to send");
        // No pong came back: the next sweep wakes the task to end the peer.
        assert_eq!(o.heartbeat(), Beat::Woken);
        assert!(woken(&o) && o.is_dead());
        assert!(received(&mut peer).is_empty());
        o.forbid_direct_writes();
    }

    #[test]
    fn a_frame_for_an_idle_socket_is_written_at_once_and_never_overtakes_a_queued_one() {
        let (relay_end, mut peer) = socket_pair();
        let o = Outbox::default();
        let max = 1 << 20;
        let (first, second) = (Bytes::from_static(b"first"), Bytes::from_static(b"second"));
        // Without a socket to write to (TLS), it is queued like any push.
        assert_eq!(o.push_or_write(&first, max), Pushed::Queued);
        assert!(woken(&o));
        o.written(first.len(), o.take().frames.len());
        allow(&o, &relay_end);
        assert_eq!(o.push_or_write(&first, max), Pushed::Written);
        assert_eq!(received(&mut peer), b"first");
        assert!(!woken(&o), "the task was not woken");
        assert_eq!(o.queued_bytes(), 0, "nothing is charged for it");
        // Something queued first (a greeting, a pong): the frame queues behind it.
        o.push(&first, max);
        assert_eq!(o.push_or_write(&second, max), Pushed::Queued);
        assert!(received(&mut peer).is_empty());
        let batch = o.take();
        assert_eq!(batch.frames, [first.clone(), second.clone()]);
        // Taken by the writer but not written yet: still queued behind it.
        assert_eq!(o.push_or_write(&second, max), Pushed::Queued);
        o.written(first.len() + second.len(), 2);
        o.take();
        o.written(second.len(), 1);
        // Closing: nothing more goes out.
        o.close(1000);
        assert_eq!(o.push_or_write(&first, max), Pushed::Closed);
        assert!(received(&mut peer).is_empty());
        o.forbid_direct_writes();
    }

    #[test]
    fn the_rest_of_a_frame_the_socket_took_part_of_survives_a_slow_consumer_close() {
        let (relay_end, peer) = socket_pair();
        // Small kernel buffers, and the peer never reads: a big frame goes out only in part.
        socket2::SockRef::from(&relay_end)
            .set_send_buffer_size(4096)
            .expect("SO_SNDBUF");
        socket2::SockRef::from(&peer)
            .set_recv_buffer_size(4096)
            .expect("SO_RCVBUF");
        let o = Outbox::default();
        allow(&o, &relay_end);
        let big = Bytes::from(vec![b'x'; 1 << 20]);
        let max = (1 << 20) + 2 * FRAME_OVERHEAD;
        assert_eq!(o.push_or_write(&big, max), Pushed::Written);
        assert!(woken(&o), "the task is woken for the rest");
        let rest = o.queued_bytes() - FRAME_OVERHEAD;
        assert!(
            rest > 0 && rest < big.len(),
            "the socket took part: {rest} left"
        );
        // The next frame passes the limit: the queue is dropped, but not the rest of the
        // frame already begun (a close frame cutting into it would corrupt the stream).
        assert_eq!(o.push_or_write(&big, max), Pushed::SlowConsumer);
        let batch = o.take();
        assert_eq!(batch.closing, Some(1013));
        assert!(batch.begun);
        assert_eq!(batch.frames.len(), 1);
        assert_eq!(batch.frames[0].len(), rest);
        o.forbid_direct_writes();
        drop(peer);
    }

    #[test]
    fn the_heartbeat_leaves_the_ping_to_the_task_when_the_socket_is_not_idle() {
        let (relay_end, mut peer) = socket_pair();
        let o = Outbox::default();
        let max = 1 << 20;
        let beat = |o: &Outbox| {
            o.mark_alive();
            let beat = o.heartbeat();
            (beat, woken(o), o.take_ping_due())
        };
        // Never allowed (a TLS connection).
        assert_eq!(beat(&o), (Beat::Woken, true, true));
        allow(&o, &relay_end);
        // A frame queued: the ping must not go ahead of it.
        o.push(&Bytes::from_static(b"frame"), max);
        assert_eq!(beat(&o), (Beat::Woken, true, true));
        // Taken by the writer but not yet (completely) written: the ping could split it.
        let batch = o.take();
        assert_eq!(beat(&o), (Beat::Woken, true, true));
        o.written(batch.frames[0].len(), 1);
        assert_eq!(beat(&o), (Beat::Pinged, false, false));
        // An incomplete frame is being read: the task must wake to check its deadline.
        o.set_reading_frame(true);
        assert_eq!(beat(&o), (Beat::Woken, true, true));
        o.set_reading_frame(false);
        // Closing.
        o.close(1001);
        assert_eq!(beat(&o), (Beat::Woken, true, true));
        let o = Outbox::default();
        allow(&o, &relay_end);
        o.forbid_direct_writes();
        assert_eq!(beat(&o), (Beat::Woken, true, true));
        assert_eq!(
            received(&mut peer),
            PING,
            "only the one ping went out directly"
        );
    }

    #[tokio::test]
    async fn push_past_the_limit_closes_with_1013_and_frees_the_queue() {
        let o = Outbox::default();
        let f = Bytes::from_static(&[0; 100]);
        let max = 2 * (100 + FRAME_OVERHEAD) + 10;
        assert_eq!(o.push(&f, max), Pushed::Queued);
        assert_eq!(o.push(&f, max), Pushed::Queued);
        assert_eq!(o.push(&f, max), Pushed::SlowConsumer);
        assert_eq!(o.push(&f, max), Pushed::Closed);
        let b = o.take();
        assert!(b.frames.is_empty());
        assert_eq!(b.closing, Some(1013));
    }

    #[tokio::test]
    async fn written_bytes_free_room_in_the_limit() {
        let o = Outbox::default();
        let f = Bytes::from_static(&[0; 100]);
        let max = 100 + FRAME_OVERHEAD + 50;
        o.push(&f, max);
        let b = o.take();
        assert_eq!(b.frames.len(), 1);
        assert_eq!(
            o.push(&f, max),
            Pushed::SlowConsumer,
            "taken but unwritten bytes still count"
        );
        let o = Outbox::default();
        o.push(&f, max);
        o.take();
        o.written(60, 0);
        assert_eq!(
            o.queued_bytes(),
            40 + FRAME_OVERHEAD,
            "a partial write keeps the rest"
        );
        o.written(40, 1);
        assert_eq!(o.queued_bytes(), 0);
        assert_eq!(o.push(&f, max), Pushed::Queued);
    }

    #[test]
    fn tiny_frames_are_charged_what_they_cost() {
        let o = Outbox::default();
        let empty = Bytes::from_static(&[0x8A, 0]);
        let mut queued = 0;
        while o.push(&empty, 4096) == Pushed::Queued {
            queued += 1;
        }
        assert_eq!(queued, 4096 / (2 + FRAME_OVERHEAD));
    }

    #[test]
    fn at_most_one_pong_waits() {
        let o = Outbox::default();
        let data = Bytes::from_static(b"data");
        let pong = |i: u32| crate::frame::server_frame(crate::frame::OP_PONG, &i.to_be_bytes());
        o.push(&data, 1 << 20);
        for i in 0..500u32 {
            assert_eq!(o.push_pong(pong(i), 1 << 20), Pushed::Queued);
        }
        o.push(&data, 1 << 20);
        for i in 500..1000u32 {
            assert_eq!(o.push_pong(pong(i), 1 << 20), Pushed::Queued);
        }
        let b = o.take();
        assert_eq!(b.frames.len(), 3);
        assert_eq!(
            b.frames[1], data,
            "the pong moved behind what was queued before its ping"
        );
        assert_eq!(
            &b.frames[2][2..],
            &999u32.to_be_bytes(),
            "the latest ping is answered"
        );
        assert_eq!(o.queued_bytes(), 4 + 4 + 6 + 3 * FRAME_OVERHEAD);
        // Once taken, the next pong queues anew.
        o.push_pong(pong(1), 1 << 20);
        assert_eq!(o.take().frames.len(), 1);
    }

    #[test]
    fn silent_peer_is_dead_on_the_second_sweep() {
        let o = Outbox::default();
        o.heartbeat();
        assert!(o.take_ping_due());
        assert!(!o.is_dead());
        o.heartbeat();
        assert!(o.is_dead());
        let o = Outbox::default();
        o.heartbeat();
        o.mark_alive();
        o.heartbeat();
        assert!(!o.is_dead());
    }
}
