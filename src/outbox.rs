//! The outbox: the part of a connection that other threads may touch.
//!
//! Publishers push shared frames (`Bytes`) into a connection's outbox and wake its task; the
//! connection's own task drains it with vectored writes. Publishers never await and never touch
//! the socket. The outbox is bounded in bytes: a push that would pass `OUTBOX_MAX_BYTES` marks the
//! connection closing with 1013 and drops what it held, so a stalled reader costs at most the
//! limit. The heartbeat sweeper also works through this struct (flags + wake).
//!
//! Memory: an idle outbox holds an empty `VecDeque` (no allocation), so its cost is this struct
//! inside one `Arc` — see ARCHITECTURE.md for the byte count.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Mutex;

use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use tokio::time::Instant;

/// Flags shared with publishers and the heartbeat sweeper.
const ALIVE: u8 = 1;
const PING_DUE: u8 = 2;
const DEAD: u8 = 4;
/// Something was pushed or requested since the connection's task last looked.
const WORK: u8 = 8;

/// What a push did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The push would have passed the byte limit: the connection is now closing with 1013.
    SlowConsumer,
    /// The connection is already closing; the frame was dropped.
    Closed,
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Bytes>,
    /// Bytes queued here plus bytes taken by the writer and not yet written.
    queued_bytes: usize,
    /// When the oldest unwritten frame was queued (for the publish-to-write histogram).
    oldest: Option<Instant>,
    /// Close code the connection's task must close with, once set.
    closing: Option<u16>,
}

/// A batch taken by the writer.
pub struct Batch {
    pub frames: VecDeque<Bytes>,
    pub oldest: Option<Instant>,
    pub closing: Option<u16>,
}

/// The wake-up is an `AtomicWaker` and a flag rather than a `tokio::sync::Notify`, because
/// waiting on a `Notify` needs a `Notified` future stored in every connection's task (tens of
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

impl Outbox {
    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        // A panic while holding this lock cannot leave the queue inconsistent (every update is a
        // single push/pop/assignment), so a poisoned lock is still usable.
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Queue a frame for this connection, enforcing the byte limit. Never blocks on I/O.
    pub fn push(&self, frame: &Bytes, max_bytes: usize) -> Pushed {
        let mut q = self.lock();
        if q.closing.is_some() {
            return Pushed::Closed;
        }
        if q.queued_bytes + frame.len() > max_bytes {
            q.closing = Some(1013);
            q.frames = VecDeque::new();
            drop(q);
            self.wake();
            return Pushed::SlowConsumer;
        }
        let was_idle = q.frames.is_empty();
        q.frames.push_back(frame.clone());
        q.queued_bytes += frame.len();
        if q.oldest.is_none() {
            q.oldest = Some(Instant::now());
        }
        drop(q);
        if was_idle {
            self.wake();
        }
        Pushed::Queued
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

    /// Take everything queued (the writer keeps it until written).
    pub fn take(&self) -> Batch {
        let mut q = self.lock();
        Batch {
            frames: std::mem::take(&mut q.frames),
            oldest: q.oldest.take(),
            closing: q.closing,
        }
    }

    /// Record that `n` bytes left the process (the close frame is written without being
    /// queued, hence the saturation).
    pub fn written(&self, n: usize) {
        let mut q = self.lock();
        q.queued_bytes = q.queued_bytes.saturating_sub(n);
    }

    /// Bytes still counted against this connection (summed for the queued-bytes gauge at scrape
    /// time, so the hot path never touches a shared gauge).
    pub fn queued_bytes(&self) -> usize {
        self.lock().queued_bytes
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
    /// since the previous sweep is marked dead; otherwise a ping is requested.
    pub fn heartbeat(&self) {
        let prev = self.flags.fetch_and(!ALIVE, Ordering::Relaxed);
        if prev & ALIVE == 0 {
            self.flags.fetch_or(DEAD, Ordering::Relaxed);
        } else {
            self.flags.fetch_or(PING_DUE, Ordering::Relaxed);
        }
        self.wake();
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
    async fn push_past_the_limit_closes_with_1013_and_frees_the_queue() {
        let o = Outbox::default();
        let f = Bytes::from_static(&[0; 100]);
        assert_eq!(o.push(&f, 250), Pushed::Queued);
        assert_eq!(o.push(&f, 250), Pushed::Queued);
        assert_eq!(o.push(&f, 250), Pushed::SlowConsumer);
        assert_eq!(o.push(&f, 250), Pushed::Closed);
        let b = o.take();
        assert!(b.frames.is_empty());
        assert_eq!(b.closing, Some(1013));
    }

    #[tokio::test]
    async fn written_bytes_free_room_in_the_limit() {
        let o = Outbox::default();
        let f = Bytes::from_static(&[0; 100]);
        o.push(&f, 150);
        let b = o.take();
        assert_eq!(b.frames.len(), 1);
        assert_eq!(
            o.push(&f, 150),
            Pushed::SlowConsumer,
            "taken but unwritten bytes still count"
        );
        let o = Outbox::default();
        o.push(&f, 150);
        o.take();
        o.written(100);
        assert_eq!(o.push(&f, 150), Pushed::Queued);
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
