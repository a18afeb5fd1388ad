//! The audit log: one JSON line per published message (both client dialects and the server
//! API), per refused auth and per connection the server closed, written to a file
//! (`AUDIT_LOG=PATH`) or to standard output (`AUDIT_LOG=-`).
//!
//! Callers use [`Audit::record`], which serialises the line on the caller's thread and puts it
//! on a bounded queue without ever blocking. A full queue (`AUDIT_QUEUE_MAX` lines or
//! `AUDIT_QUEUE_MAX_BYTES` bytes) answers [`AuditFull`]: the caller refuses the publish with
//! `unavailable`, so nothing is delivered that was not audited, and the refusal is counted.
//!
//! One writer thread takes the lines in batches. It is a std thread, not a tokio task, so a
//! slow or blocked disk stalls it alone, never a runtime worker. A batch is written as soon as
//! the queue runs empty, reaches `BATCH_MAX_BYTES`, or is [`FLUSH_INTERVAL`] (100 ms) old, so no
//! line waits on purpose for longer than 100 ms. The batch buffer is ours (no `BufWriter`), so
//! after a failed write the writer knows exactly which bytes are not written yet.
//!
//! Failures never crash or stall the relay. A failed write is counted and logged (at most once
//! per 10 s) and retried every second on a freshly opened file; meanwhile the writer takes no
//! new lines, so the queue fills and publishes are refused: the log stays complete rather than
//! silently missing what was delivered. A failed reopen (SIGHUP into a directory that is gone)
//! keeps writing to the file already open and tries to open the path again every second.
//!
//! Deliberately absent: `fsync` (a written line survives a relay crash, not a power cut), log
//! rotation (logrotate renames the file, SIGHUP makes [`Audit::reopen`] open a new one), and any
//! knowledge of the wire protocol: these lines are their own format, built here with serde
//! (`protocol.rs` owns the JSON clients see).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime};

use metrics::Counter;
use serde::{Serialize, Serializer};

use crate::config::Settings;
use crate::metrics::Metrics;

/// Longest a line the writer has taken waits before it is written.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(100);
/// Longest [`Audit::shutdown`] waits for the writer to write what is queued; past it the
/// process exits without it (a disk that blocks must not keep a relay from stopping).
pub const SHUTDOWN_WAIT: Duration = Duration::from_secs(2);
/// A batch is written once it holds this many bytes, even if more lines are waiting.
const BATCH_MAX_BYTES: usize = 64 * 1024;
/// After a failed write or open, the writer tries again this often.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// At most one warning per this interval; the others are counted in the next one.
const ERROR_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// What a queued line costs beyond its buffer's capacity: the allocation's header and rounding.
/// (The queue's slots, 32 B each, are allocated once at start and not charged per line.)
const LINE_OVERHEAD_BYTES: usize = 16;
/// The audit log holds message texts and client addresses: owner read-write, group read.
const FILE_MODE: u32 = 0o640;

/// Where the audit lines go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    /// Standard output (`AUDIT_LOG=-`); reopening it does nothing.
    Stdout,
    /// A file, created if missing (mode 0640), always appended to.
    File(PathBuf),
}

impl fmt::Display for AuditTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AuditTarget::Stdout => f.write_str("standard output"),
            AuditTarget::File(path) => write!(f, "{}", path.display()),
        }
    }
}

/// The queue refused a line: it is full (or the writer has stopped). The caller must not
/// deliver what it wanted to audit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("audit queue full")]
pub struct AuditFull;

/// How a publisher reached the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    /// The first client dialect: credentials in the upgrade URL (`/chat?token=..`).
    Query,
    /// The second client dialect: an auth message first.
    Auth,
    /// The server API.
    Api,
}

impl Dialect {
    pub fn as_str(self) -> &'static str {
        match self {
            Dialect::Query => "query",
            Dialect::Auth => "auth",
            Dialect::Api => "api",
        }
    }
}

/// What is audited. Each becomes one line with `"audit":true`, its `"event"` name and a `ts`.
#[derive(Debug, Clone, Copy)]
pub enum AuditEvent<'a> {
    /// A message accepted for publishing, before it can be delivered (`"event":"publish"`).
    Publish {
        id: &'a uuid::Uuid,
        room: &'a str,
        seq: Option<u64>,
        from: &'a str,
        text: &'a str,
        request_id: Option<&'a str>,
        sent_at: &'a str,
        address: Option<IpAddr>,
        dialect: Dialect,
    },
    /// A publish that was audited but then not delivered (a networked broker refused it or
    /// found it a duplicate) (`"event":"publish_outcome"`).
    PublishOutcome {
        id: &'a uuid::Uuid,
        room: &'a str,
        outcome: &'a str,
    },
    /// An auth refused, with its HTTP status or close code (`"event":"auth_refused"`).
    AuthRefused {
        address: Option<IpAddr>,
        dialect: Dialect,
        reason: &'a str,
        status: u16,
    },
    /// The server closed a connection: API disconnect, a limit, a slow consumer...
    /// (`"event":"disconnect"`).
    Disconnect {
        name: &'a str,
        room: Option<&'a str>,
        address: Option<IpAddr>,
        code: u16,
        reason: &'a str,
    },
}

/// The queue's bounds (from `AUDIT_QUEUE_MAX` and `AUDIT_QUEUE_MAX_BYTES`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuditSettings {
    /// Lines waiting for the writer, at most.
    pub queue_max: usize,
    /// Bytes those lines hold, at most (each charged its buffer's capacity + 16 B).
    pub queue_max_bytes: usize,
}

impl AuditSettings {
    pub fn from_settings(settings: &Settings) -> AuditSettings {
        AuditSettings {
            queue_max: settings.audit_queue_max,
            queue_max_bytes: settings.audit_queue_max_bytes,
        }
    }
}

/// The audit log's handle. Cheap to clone and share; [`Audit::record`] never blocks.
#[derive(Clone)]
pub struct Audit {
    inner: Arc<Inner>,
}

struct Inner {
    tx: SyncSender<Job>,
    shared: Arc<Shared>,
    queue_max_bytes: usize,
    queue_full: Counter,
    /// The writer's exit signal (its sender is dropped when the thread ends) and its handle;
    /// taken by the first `shutdown`.
    writer: Mutex<Option<(Receiver<()>, JoinHandle<()>)>>,
}

/// What the callers and the writer both touch.
#[derive(Default)]
struct Shared {
    queued_bytes: AtomicUsize,
    /// Records between their check of `stopping` and their send: the writer waits for them
    /// before its last drain, so a line accepted during shutdown is written, not dropped.
    in_flight: AtomicUsize,
    stopping: AtomicBool,
    reopen: AtomicBool,
}

enum Job {
    Line(Vec<u8>),
    /// Look at the flags (reopen, stop) now rather than at the next poll.
    Wake,
}

impl Audit {
    /// Open the target (a file is created if missing) and start the writer thread. An error
    /// here is a start-up error: the binary reports it and exits.
    pub fn start(
        target: AuditTarget,
        settings: AuditSettings,
        metrics: &Metrics,
    ) -> io::Result<Audit> {
        let out = Output::open(&target)?;
        let (audit, rx) = Audit::queue(settings, metrics);
        let writer = Writer {
            rx,
            shared: audit.inner.shared.clone(),
            target,
            out,
            batch: Vec::with_capacity(BATCH_MAX_BYTES),
            written: 0,
            batch_lines: 0,
            retry_at: None,
            reopen_retry_at: None,
            lines: metrics.audit_lines.clone(),
            write_errors: metrics.audit_write_errors.clone(),
            open_errors: metrics.audit_open_errors.clone(),
            logged_at: None,
            suppressed: 0,
        };
        let (done_tx, done_rx) = mpsc::channel::<()>();
        let handle = std::thread::Builder::new()
            .name("audit-writer".into())
            .spawn(move || {
                // Dropped when the thread ends, however it ends: `shutdown` learns it is done.
                let _done = done_tx;
                writer.run();
            })?;
        *audit.inner.writer.lock().unwrap_or_else(|p| p.into_inner()) = Some((done_rx, handle));
        Ok(audit)
    }

    /// The handle and the receiving end of its queue, without a writer (unit tests drain or
    /// hold the queue themselves).
    fn queue(settings: AuditSettings, metrics: &Metrics) -> (Audit, Receiver<Job>) {
        let (tx, rx) = mpsc::sync_channel(settings.queue_max);
        let audit = Audit {
            inner: Arc::new(Inner {
                tx,
                shared: Arc::new(Shared::default()),
                queue_max_bytes: settings.queue_max_bytes,
                queue_full: metrics.audit_queue_full.clone(),
                writer: Mutex::new(None),
            }),
        };
        (audit, rx)
    }

    /// Serialise `event` as one line and queue it for the writer. Never blocks. `Err(AuditFull)`
    /// (counted in `roomcast_audit_queue_full_total`) when the queue is full or the writer has
    /// stopped: the caller must then not deliver the message.
    pub fn record(&self, event: &AuditEvent<'_>) -> Result<(), AuditFull> {
        let inner = &*self.inner;
        let shared = &*inner.shared;
        // SeqCst pairs with `shutdown`'s store and the writer's load of `in_flight`: either this
        // record sees the stop, or the writer sees this record in flight and waits for it.
        shared.in_flight.fetch_add(1, Ordering::SeqCst);
        let queued = if shared.stopping.load(Ordering::SeqCst) {
            Err(AuditFull)
        } else {
            self.enqueue(encode_line(event, SystemTime::now()))
        };
        shared.in_flight.fetch_sub(1, Ordering::SeqCst);
        if queued.is_err() {
            inner.queue_full.increment(1);
        }
        queued
    }

    fn enqueue(&self, line: Vec<u8>) -> Result<(), AuditFull> {
        let inner = &*self.inner;
        let charge = charge(&line);
        inner
            .shared
            .queued_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |queued| {
                (queued + charge <= inner.queue_max_bytes).then_some(queued + charge)
            })
            .map_err(|_| AuditFull)?;
        inner.tx.try_send(Job::Line(line)).map_err(|_| {
            // Full, or the writer is gone: give the bytes back.
            inner
                .shared
                .queued_bytes
                .fetch_sub(charge, Ordering::AcqRel);
            AuditFull
        })
    }

    /// Bytes of lines waiting for the writer (each charged its capacity + 16 B).
    pub fn queued_bytes(&self) -> usize {
        self.inner.shared.queued_bytes.load(Ordering::Acquire)
    }

    /// Ask the writer to open the file at the path again (after logrotate renamed it). Lines
    /// taken before are written to the old file. Never blocks.
    pub fn reopen(&self) {
        self.inner.shared.reopen.store(true, Ordering::Release);
        let _ = self.inner.tx.try_send(Job::Wake);
    }

    /// Refuse new lines, write everything queued, and stop the writer. Waits at most
    /// [`SHUTDOWN_WAIT`]; later calls return at once.
    pub fn shutdown(&self) {
        let inner = &*self.inner;
        inner.shared.stopping.store(true, Ordering::SeqCst);
        let _ = inner.tx.try_send(Job::Wake);
        let writer = inner
            .writer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let Some((done, handle)) = writer else {
            return;
        };
        match done.recv_timeout(SHUTDOWN_WAIT) {
            Err(RecvTimeoutError::Timeout) => tracing::error!(
                queued_bytes = self.queued_bytes(),
                "the audit log writer did not finish within {SHUTDOWN_WAIT:?} (a blocked disk?); exiting without it"
            ),
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                let _ = handle.join();
            }
        }
    }
}

/// What a queued line is charged against `AUDIT_QUEUE_MAX_BYTES`: the memory it pins.
fn charge(line: &Vec<u8>) -> usize {
    line.capacity() + LINE_OVERHEAD_BYTES
}

// ---------------------------------------------------------------------------------------------
// The line format
// ---------------------------------------------------------------------------------------------

/// One line: `{"audit":true,"event":..,"ts":..,<the event's fields>}` and a newline. serde_json
/// escapes every control character, so a text cannot break a line or forge another.
fn encode_line(event: &AuditEvent<'_>, now: SystemTime) -> Vec<u8> {
    let mut out = Vec::with_capacity(estimated_len(event));
    let ts = Timestamp(now);
    let written = match *event {
        AuditEvent::Publish {
            id,
            room,
            seq,
            from,
            text,
            request_id,
            sent_at,
            address,
            dialect,
        } => serde_json::to_writer(
            &mut out,
            &Line {
                audit: true,
                event: "publish",
                ts,
                fields: PublishFields {
                    kind: "message",
                    id: Hyphenated(id),
                    room,
                    seq,
                    from,
                    user_id: from,
                    text,
                    request_id,
                    sent_at,
                    address: address.map(crate::config::canonical),
                    dialect: dialect.as_str(),
                },
            },
        ),
        AuditEvent::PublishOutcome { id, room, outcome } => serde_json::to_writer(
            &mut out,
            &Line {
                audit: true,
                event: "publish_outcome",
                ts,
                fields: OutcomeFields {
                    id: Hyphenated(id),
                    room,
                    outcome,
                },
            },
        ),
        AuditEvent::AuthRefused {
            address,
            dialect,
            reason,
            status,
        } => serde_json::to_writer(
            &mut out,
            &Line {
                audit: true,
                event: "auth_refused",
                ts,
                fields: AuthRefusedFields {
                    address: address.map(crate::config::canonical),
                    dialect: dialect.as_str(),
                    reason,
                    status,
                },
            },
        ),
        AuditEvent::Disconnect {
            name,
            room,
            address,
            code,
            reason,
        } => serde_json::to_writer(
            &mut out,
            &Line {
                audit: true,
                event: "disconnect",
                ts,
                fields: DisconnectFields {
                    name,
                    user_id: name,
                    room,
                    address: address.map(crate::config::canonical),
                    code,
                    reason,
                },
            },
        ),
    };
    written.expect("serialising plain strings and numbers into a Vec cannot fail");
    out.push(b'\n');
    out
}

/// Enough room for the usual line in one allocation: the fixed part plus the strings (texts
/// are mostly plain; escapes grow the buffer once).
fn estimated_len(event: &AuditEvent<'_>) -> usize {
    let strings = match event {
        AuditEvent::Publish {
            room,
            from,
            text,
            request_id,
            ..
        } => room.len() + 2 * from.len() + text.len() + request_id.map_or(0, str::len),
        AuditEvent::PublishOutcome { room, outcome, .. } => room.len() + outcome.len(),
        AuditEvent::AuthRefused { reason, .. } => reason.len(),
        AuditEvent::Disconnect {
            name, room, reason, ..
        } => 2 * name.len() + room.map_or(0, str::len) + reason.len(),
    };
    256 + strings
}

#[derive(Serialize)]
struct Line<F> {
    audit: bool,
    event: &'static str,
    ts: Timestamp,
    #[serde(flatten)]
    fields: F,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct PublishFields<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    id: Hyphenated<'a>,
    room: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    seq: Option<u64>,
    from: &'a str,
    user_id: &'a str,
    text: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    request_id: Option<&'a str>,
    sent_at: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<IpAddr>,
    dialect: &'static str,
}

#[derive(Serialize)]
struct OutcomeFields<'a> {
    id: Hyphenated<'a>,
    room: &'a str,
    outcome: &'a str,
}

#[derive(Serialize)]
struct AuthRefusedFields<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<IpAddr>,
    dialect: &'static str,
    reason: &'a str,
    status: u16,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct DisconnectFields<'a> {
    name: &'a str,
    /// The same as `name` today; there so one `userId` filter finds a user's publishes and
    /// disconnects alike.
    user_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    room: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    address: Option<IpAddr>,
    code: u16,
    reason: &'a str,
}

/// RFC 3339 UTC with milliseconds, written straight into the line (no intermediate String).
#[derive(Clone, Copy)]
struct Timestamp(SystemTime);

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&humantime::format_rfc3339_millis(self.0))
    }
}

/// A UUID in its usual lower-case hyphenated form, written straight into the line.
struct Hyphenated<'a>(&'a uuid::Uuid);

impl Serialize for Hyphenated<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0.hyphenated())
    }
}

// ---------------------------------------------------------------------------------------------
// The writer
// ---------------------------------------------------------------------------------------------

enum Output {
    Stdout(io::Stdout),
    File(File),
}

impl Output {
    fn open(target: &AuditTarget) -> io::Result<Output> {
        match target {
            AuditTarget::Stdout => Ok(Output::Stdout(io::stdout())),
            AuditTarget::File(path) => OpenOptions::new()
                .append(true)
                .create(true)
                .mode(FILE_MODE)
                .open(path)
                .map(Output::File),
        }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            // The lock keeps our lines whole next to anything else printing to stdout.
            Output::Stdout(out) => out.lock().write(bytes),
            Output::File(file) => file.write(bytes),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Output::Stdout(out) => out.lock().flush(),
            Output::File(_) => Ok(()),
        }
    }
}

struct Writer {
    rx: Receiver<Job>,
    shared: Arc<Shared>,
    target: AuditTarget,
    out: Output,
    /// Lines taken and not yet written, whole lines only.
    batch: Vec<u8>,
    /// Bytes of `batch` already written (a write may take part of it, then fail).
    written: usize,
    batch_lines: u64,
    /// A write failed: take no new lines, try again then.
    retry_at: Option<Instant>,
    /// A reopen failed: keep the old file, try opening the path again then.
    reopen_retry_at: Option<Instant>,
    lines: Counter,
    write_errors: Counter,
    open_errors: Counter,
    logged_at: Option<Instant>,
    suppressed: u64,
}

impl Writer {
    fn run(mut self) {
        loop {
            if self.shared.reopen.swap(false, Ordering::AcqRel) {
                // What was taken before the signal belongs to the old file.
                self.write_out();
                self.reopen(true);
            } else if self.reopen_retry_at.is_some_and(|at| Instant::now() >= at) {
                self.reopen(false);
            }
            if self.shared.stopping.load(Ordering::SeqCst) {
                return self.finish();
            }
            if let Some(at) = self.retry_at {
                // The last write failed. Taking no new lines lets the queue fill, so callers
                // are refused instead of delivering what may never be written.
                let now = Instant::now();
                if now < at {
                    std::thread::sleep((at - now).min(FLUSH_INTERVAL));
                } else {
                    self.reopen(false);
                    self.write_out();
                }
                continue;
            }
            match self.rx.recv_timeout(FLUSH_INTERVAL) {
                Ok(Job::Line(line)) => {
                    self.take(line);
                    self.take_ready();
                    self.write_out();
                }
                Ok(Job::Wake) | Err(RecvTimeoutError::Timeout) => {}
                // Every handle is gone (the relay was dropped without a shutdown).
                Err(RecvTimeoutError::Disconnected) => return self.finish(),
            }
        }
    }

    fn take(&mut self, line: Vec<u8>) {
        self.shared
            .queued_bytes
            .fetch_sub(charge(&line), Ordering::AcqRel);
        self.batch.extend_from_slice(&line);
        self.batch_lines += 1;
    }

    /// Take the lines already waiting, until the batch is full or has waited long enough.
    fn take_ready(&mut self) {
        let started = Instant::now();
        while self.batch.len() < BATCH_MAX_BYTES && started.elapsed() < FLUSH_INTERVAL {
            match self.rx.try_recv() {
                Ok(Job::Line(line)) => self.take(line),
                Ok(Job::Wake) => {}
                Err(TryRecvError::Empty | TryRecvError::Disconnected) => return,
            }
        }
    }

    /// Write the rest of the batch. On failure the unwritten bytes stay and `retry_at` is set.
    fn write_out(&mut self) {
        while self.written < self.batch.len() {
            match self.out.write(&self.batch[self.written..]) {
                Ok(0) => return self.write_failed(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.written += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return self.write_failed(e),
            }
        }
        if let Err(e) = self.out.flush() {
            return self.write_failed(e);
        }
        if self.retry_at.take().is_some() {
            tracing::info!(target = %self.target, "audit log writes work again");
        }
        self.lines.increment(self.batch_lines);
        self.batch.clear();
        self.written = 0;
        self.batch_lines = 0;
        // One very long line must not pin a large buffer for good.
        if self.batch.capacity() > 2 * BATCH_MAX_BYTES {
            self.batch = Vec::with_capacity(BATCH_MAX_BYTES);
        }
    }

    fn write_failed(&mut self, e: io::Error) {
        self.write_errors.increment(1);
        self.retry_at = Some(Instant::now() + RETRY_INTERVAL);
        self.warn(
            &e,
            "writing the audit log failed; the lines are kept and retried every second (publishes are refused once the queue is full)",
        );
    }

    /// Open the path again. On failure the file already open stays in use and the open is
    /// retried every second.
    fn reopen(&mut self, asked: bool) {
        let AuditTarget::File(_) = &self.target else {
            return;
        };
        match Output::open(&self.target) {
            Ok(out) => {
                self.out = out;
                if asked || self.reopen_retry_at.is_some() {
                    tracing::info!(target = %self.target, "audit log reopened");
                }
                self.reopen_retry_at = None;
            }
            Err(e) => {
                self.open_errors.increment(1);
                self.reopen_retry_at = Some(Instant::now() + RETRY_INTERVAL);
                self.warn(
                    &e,
                    "reopening the audit log failed; still writing to the file open before, retrying every second",
                );
            }
        }
    }

    /// A warning at most once per `ERROR_LOG_INTERVAL`, saying how many were left out.
    fn warn(&mut self, e: &io::Error, what: &str) {
        let now = Instant::now();
        if self
            .logged_at
            .is_some_and(|at| now.duration_since(at) < ERROR_LOG_INTERVAL)
        {
            self.suppressed += 1;
            return;
        }
        tracing::warn!(target = %self.target, error = %e, errors_not_logged = self.suppressed, "{what}");
        self.logged_at = Some(now);
        self.suppressed = 0;
    }

    /// Write everything queued before the stop, then end. One attempt: a failing disk does not
    /// hold the exit (and `shutdown` stops waiting after `SHUTDOWN_WAIT` anyway).
    fn finish(mut self) {
        // A record that saw no stop yet is about to send; wait for it so its line is drained.
        while self.shared.in_flight.load(Ordering::SeqCst) > 0 {
            std::thread::yield_now();
        }
        loop {
            match self.rx.try_recv() {
                Ok(Job::Line(line)) => {
                    self.take(line);
                    if self.batch.len() >= BATCH_MAX_BYTES {
                        self.write_out();
                        if self.retry_at.is_some() {
                            break;
                        }
                    }
                }
                Ok(Job::Wake) => {}
                Err(_) => break,
            }
        }
        self.write_out();
        if self.retry_at.is_some() {
            let mut lost = self.batch_lines;
            while let Ok(job) = self.rx.try_recv() {
                if let Job::Line(line) = job {
                    self.shared
                        .queued_bytes
                        .fetch_sub(charge(&line), Ordering::AcqRel);
                    lost += 1;
                }
            }
            tracing::error!(target = %self.target, lost, "audit lines could not be written at shutdown");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
    use serde_json::Value;
    use std::path::Path;

    /// Metrics bound to a recorder of the test's own, so counters can be read back.
    fn metrics() -> (Metrics, PrometheusHandle) {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        (
            metrics::with_local_recorder(&recorder, Metrics::new),
            handle,
        )
    }

    fn counter(handle: &PrometheusHandle, series: &str) -> f64 {
        handle
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }

    struct TempDir(PathBuf);

    impl TempDir {
        fn new(name: &str) -> TempDir {
            let nanos = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            let dir = std::env::temp_dir().join(format!(
                "roomcast-audit-{name}-{}-{nanos}",
                std::process::id()
            ));
            std::fs::create_dir_all(&dir).expect("create a temp dir");
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    const SETTINGS: AuditSettings = AuditSettings {
        queue_max: 1024,
        queue_max_bytes: 1 << 20,
    };

    fn publish<'a>(id: &'a uuid::Uuid, text: &'a str) -> AuditEvent<'a> {
        AuditEvent::Publish {
            id,
            room: "lobby",
            seq: Some(3),
            from: "ada",
            text,
            request_id: Some("r1"),
            sent_at: "2026-01-01T00:00:00.000Z",
            address: Some("127.0.0.1".parse().expect("an address")),
            dialect: Dialect::Query,
        }
    }

    fn parse(line: &[u8]) -> Value {
        assert_eq!(line.last(), Some(&b'\n'), "a line ends with a newline");
        assert_eq!(
            line.iter().filter(|&&b| b == b'\n').count(),
            1,
            "one line: {}",
            String::from_utf8_lossy(line)
        );
        serde_json::from_slice(line).expect("a line is JSON")
    }

    fn lines_of(path: &Path) -> Vec<Value> {
        std::fs::read(path)
            .unwrap_or_default()
            .split_inclusive(|&b| b == b'\n')
            .map(parse)
            .collect()
    }

    /// Poll `path` until it holds `n` lines; the lines, or a panic after `within`.
    fn wait_for_lines(path: &Path, n: usize, within: Duration) -> Vec<Value> {
        let deadline = Instant::now() + within;
        loop {
            let lines = lines_of(path);
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "{} has {} lines, expected {n} within {within:?}",
                path.display(),
                lines.len()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn a_publish_line_holds_every_field_and_parses_back() {
        let id = uuid::Uuid::new_v4();
        let line = encode_line(&publish(&id, "hi"), SystemTime::UNIX_EPOCH);
        let v = parse(&line);
        assert_eq!(
            v,
            serde_json::json!({
                "audit": true, "event": "publish", "ts": "1970-01-01T00:00:00.000Z",
                "type": "message", "id": id.to_string(), "room": "lobby", "seq": 3,
                "from": "ada", "userId": "ada", "text": "hi", "requestId": "r1",
                "sentAt": "2026-01-01T00:00:00.000Z", "address": "127.0.0.1", "dialect": "query"
            })
        );
        // The fixed fields come first, in this order, so a line is readable by eye.
        let text = String::from_utf8(line).expect("UTF-8");
        assert!(
            text.starts_with(r#"{"audit":true,"event":"publish","ts":"#),
            "{text}"
        );
    }

    #[test]
    fn absent_optional_fields_are_left_out() {
        let id = uuid::Uuid::new_v4();
        let event = AuditEvent::Publish {
            id: &id,
            room: "lobby",
            seq: None,
            from: "ada",
            text: "hi",
            request_id: None,
            sent_at: "2026-01-01T00:00:00.000Z",
            address: None,
            dialect: Dialect::Api,
        };
        let v = parse(&encode_line(&event, SystemTime::now()));
        for absent in ["seq", "requestId", "address"] {
            assert!(v.get(absent).is_none(), "{absent} must be omitted: {v}");
        }
        assert_eq!(v["dialect"], "api");
        let ts = v["ts"].as_str().expect("ts");
        assert!(
            humantime::parse_rfc3339(ts).is_ok() && ts.len() == 24,
            "RFC 3339 with ms: {ts}"
        );
    }

    #[test]
    fn a_text_cannot_break_the_line_or_forge_fields() {
        let id = uuid::Uuid::new_v4();
        let text = "evil\n{\"audit\":true,\"event\":\"publish\"}\r\u{0}\"é";
        let v = parse(&encode_line(&publish(&id, text), SystemTime::now()));
        assert_eq!(v["text"], text);
        assert_eq!(v["from"], "ada");
    }

    #[test]
    fn the_other_events_have_their_own_names_and_fields() {
        let id = uuid::Uuid::new_v4();
        let mapped: IpAddr = "::ffff:10.0.0.7".parse().expect("an address");
        let cases = [
            (
                AuditEvent::PublishOutcome {
                    id: &id,
                    room: "lobby",
                    outcome: "duplicate",
                },
                serde_json::json!({"event": "publish_outcome", "id": id.to_string(), "room": "lobby", "outcome": "duplicate"}),
            ),
            (
                AuditEvent::AuthRefused {
                    address: Some(mapped),
                    dialect: Dialect::Auth,
                    reason: "bad_token",
                    status: 4001,
                },
                serde_json::json!({"event": "auth_refused", "address": "10.0.0.7", "dialect": "auth", "reason": "bad_token", "status": 4001}),
            ),
            (
                AuditEvent::Disconnect {
                    name: "bob",
                    room: Some("lobby"),
                    address: None,
                    code: 1013,
                    reason: "slow_consumer",
                },
                serde_json::json!({"event": "disconnect", "name": "bob", "userId": "bob", "room": "lobby", "code": 1013, "reason": "slow_consumer"}),
            ),
        ];
        for (event, want) in cases {
            let mut v = parse(&encode_line(&event, SystemTime::now()));
            assert_eq!(v["audit"], true, "{v}");
            let obj = v.as_object_mut().expect("an object");
            assert!(obj.remove("ts").is_some());
            obj.remove("audit");
            assert_eq!(v, want);
        }
    }

    #[test]
    fn a_full_queue_refuses_and_counts_and_never_blocks() {
        let (metrics, handle) = metrics();
        let (audit, rx) = Audit::queue(
            AuditSettings {
                queue_max: 3,
                queue_max_bytes: 1 << 20,
            },
            &metrics,
        );
        let id = uuid::Uuid::new_v4();
        for _ in 0..3 {
            assert_eq!(audit.record(&publish(&id, "hi")), Ok(()));
        }
        let started = Instant::now();
        assert_eq!(audit.record(&publish(&id, "hi")), Err(AuditFull));
        assert!(
            started.elapsed() < Duration::from_millis(50),
            "record blocked"
        );
        assert_eq!(counter(&handle, "roomcast_audit_queue_full_total"), 1.0);
        // Bytes given back on refusal: only the three queued lines are charged.
        let charged = audit.queued_bytes();
        let mut taken = 0;
        while let Ok(Job::Line(line)) = rx.try_recv() {
            taken += charge(&line);
        }
        assert_eq!(charged, taken);
        // Room again once the writer takes lines (here: the test took them).
        assert_eq!(audit.record(&publish(&id, "hi")), Ok(()));
    }

    #[test]
    fn the_queue_is_bounded_in_bytes_too() {
        let (metrics, handle) = metrics();
        let (audit, _rx) = Audit::queue(
            AuditSettings {
                queue_max: 1000,
                queue_max_bytes: 2048,
            },
            &metrics,
        );
        let id = uuid::Uuid::new_v4();
        let text = "x".repeat(600);
        let mut accepted = 0;
        while audit.record(&publish(&id, &text)).is_ok() {
            accepted += 1;
            assert!(accepted < 10, "the byte bound never refused");
        }
        assert!(accepted >= 1, "at least one line fits in 2 KiB");
        assert!(audit.queued_bytes() <= 2048, "{}", audit.queued_bytes());
        assert_eq!(counter(&handle, "roomcast_audit_queue_full_total"), 1.0);
    }

    #[test]
    fn a_line_is_written_within_the_flush_interval() {
        let dir = TempDir::new("flush");
        let path = dir.0.join("audit.log");
        let (metrics, handle) = metrics();
        let audit = Audit::start(AuditTarget::File(path.clone()), SETTINGS, &metrics)
            .expect("open the audit log");
        let id = uuid::Uuid::new_v4();
        for i in 0..3 {
            let recorded = Instant::now();
            audit
                .record(&publish(&id, &format!("line {i}")))
                .expect("queued");
            // The writer writes as soon as its queue is empty, so this is usually well under a
            // millisecond; the contract is 100 ms, plus scheduling slack for a loaded machine.
            let lines = wait_for_lines(&path, i + 1, FLUSH_INTERVAL + Duration::from_millis(150));
            assert_eq!(lines[i]["text"], format!("line {i}"));
            assert!(recorded.elapsed() < FLUSH_INTERVAL + Duration::from_millis(150));
        }
        audit.shutdown();
        assert_eq!(counter(&handle, "roomcast_audit_lines_total"), 3.0);
        assert_eq!(audit.queued_bytes(), 0);
    }

    #[test]
    fn shutdown_writes_everything_queued_then_refuses() {
        let dir = TempDir::new("shutdown");
        let path = dir.0.join("audit.log");
        let (metrics, _handle) = metrics();
        let audit = Audit::start(
            AuditTarget::File(path.clone()),
            AuditSettings {
                queue_max: 10_000,
                queue_max_bytes: 64 << 20,
            },
            &metrics,
        )
        .expect("open the audit log");
        let id = uuid::Uuid::new_v4();
        for i in 0..5000 {
            audit
                .record(&publish(&id, &format!("m{i}")))
                .expect("queued");
        }
        audit.shutdown();
        let lines = lines_of(&path);
        assert_eq!(lines.len(), 5000);
        assert_eq!(lines[4999]["text"], "m4999", "in order");
        assert_eq!(audit.record(&publish(&id, "late")), Err(AuditFull));
        audit.shutdown(); // a second call returns at once
    }

    #[test]
    fn reopen_after_a_rename_writes_a_new_file_at_the_path() {
        let dir = TempDir::new("reopen");
        let path = dir.0.join("audit.log");
        let rotated = dir.0.join("audit.log.1");
        let (metrics, _handle) = metrics();
        let audit = Audit::start(AuditTarget::File(path.clone()), SETTINGS, &metrics)
            .expect("open the audit log");
        let id = uuid::Uuid::new_v4();
        audit.record(&publish(&id, "before")).expect("queued");
        wait_for_lines(&path, 1, Duration::from_secs(5));
        std::fs::rename(&path, &rotated).expect("rename");
        // Until the reopen, lines follow the renamed file (what logrotate expects).
        audit.record(&publish(&id, "between")).expect("queued");
        wait_for_lines(&rotated, 2, Duration::from_secs(5));
        audit.reopen();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !path.exists() {
            assert!(Instant::now() < deadline, "no new file after reopen");
            std::thread::sleep(Duration::from_millis(2));
        }
        audit.record(&publish(&id, "after")).expect("queued");
        let new = wait_for_lines(&path, 1, Duration::from_secs(5));
        assert_eq!(new[0]["text"], "after");
        let old = lines_of(&rotated);
        assert_eq!(
            old.iter().map(|v| v["text"].clone()).collect::<Vec<_>>(),
            ["before", "between"]
        );
        audit.shutdown();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).expect("stat").permissions().mode();
        assert_eq!(
            mode & 0o027,
            0,
            "not writable by group, nothing for others: {mode:o}"
        );
    }

    #[test]
    fn a_failed_reopen_keeps_the_old_file_counts_and_retries() {
        let dir = TempDir::new("reopen-fails");
        let logs = dir.0.join("logs");
        std::fs::create_dir(&logs).expect("mkdir");
        let path = logs.join("audit.log");
        let (metrics, handle) = metrics();
        let audit = Audit::start(AuditTarget::File(path.clone()), SETTINGS, &metrics)
            .expect("open the audit log");
        let id = uuid::Uuid::new_v4();
        // The directory goes away (renamed: the open file moves with it).
        let moved = dir.0.join("moved");
        std::fs::rename(&logs, &moved).expect("rename the directory");
        audit.reopen();
        let deadline = Instant::now() + Duration::from_secs(5);
        while counter(&handle, r#"roomcast_audit_errors_total{op="open"}"#) < 1.0 {
            assert!(Instant::now() < deadline, "the failed open was not counted");
            std::thread::sleep(Duration::from_millis(5));
        }
        audit
            .record(&publish(&id, "still written"))
            .expect("queued");
        let old = wait_for_lines(&moved.join("audit.log"), 1, Duration::from_secs(5));
        assert_eq!(old[0]["text"], "still written");
        // The directory comes back: within about a second the path is opened again.
        std::fs::create_dir(&logs).expect("mkdir again");
        let deadline = Instant::now() + Duration::from_secs(5);
        while !path.exists() {
            assert!(Instant::now() < deadline, "the open was not retried");
            std::thread::sleep(Duration::from_millis(10));
        }
        audit.record(&publish(&id, "new file")).expect("queued");
        let new = wait_for_lines(&path, 1, Duration::from_secs(5));
        assert_eq!(new[0]["text"], "new file");
        audit.shutdown();
    }

    #[test]
    fn write_errors_are_counted_and_fill_the_queue_without_blocking() {
        // /dev/full answers every write with ENOSPC: a full disk.
        let (metrics, handle) = metrics();
        let audit = Audit::start(
            AuditTarget::File(PathBuf::from("/dev/full")),
            AuditSettings {
                queue_max: 8,
                queue_max_bytes: 1 << 20,
            },
            &metrics,
        )
        .expect("open /dev/full");
        let id = uuid::Uuid::new_v4();
        audit.record(&publish(&id, "lost?")).expect("queued");
        let deadline = Instant::now() + Duration::from_secs(5);
        while counter(&handle, r#"roomcast_audit_errors_total{op="write"}"#) < 1.0 {
            assert!(
                Instant::now() < deadline,
                "the failed write was not counted"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        // The writer keeps the failed line and takes no more: the queue's 8 slots fill, then
        // records are refused at once.
        let started = Instant::now();
        let mut accepted = 0;
        while audit.record(&publish(&id, "lost?")).is_ok() {
            accepted += 1;
            assert!(accepted <= 100, "a failing writer kept taking lines");
        }
        assert!(started.elapsed() < Duration::from_secs(1), "record blocked");
        assert_eq!(accepted, 8);
        assert_eq!(counter(&handle, "roomcast_audit_lines_total"), 0.0);
        let started = Instant::now();
        audit.shutdown();
        assert!(started.elapsed() < SHUTDOWN_WAIT + Duration::from_millis(500));
    }

    #[test]
    fn shutdown_does_not_wait_forever_for_a_blocked_writer() {
        // A FIFO nobody reads from: once its buffer is full, every write blocks.
        let dir = TempDir::new("blocked");
        let fifo = dir.0.join("fifo");
        let made = std::process::Command::new("mkfifo")
            .arg(&fifo)
            .status()
            .expect("run mkfifo");
        assert!(made.success());
        let reader_path = fifo.clone();
        // Opening a FIFO for writing waits for a reader; this one opens and never reads.
        let reader = std::thread::spawn(move || File::open(reader_path).expect("open the FIFO"));
        let (metrics, _handle) = metrics();
        let audit = Audit::start(
            AuditTarget::File(fifo),
            AuditSettings {
                queue_max: 10_000,
                queue_max_bytes: 64 << 20,
            },
            &metrics,
        )
        .expect("open the FIFO for writing");
        let _reader = reader.join().expect("reader thread");
        let id = uuid::Uuid::new_v4();
        let text = "y".repeat(400);
        for _ in 0..1000 {
            let _ = audit.record(&publish(&id, &text)); // ~500 KB, far over a pipe's 64 KiB
        }
        let started = Instant::now();
        audit.shutdown();
        let took = started.elapsed();
        assert!(
            took >= SHUTDOWN_WAIT - Duration::from_millis(100)
                && took < SHUTDOWN_WAIT + Duration::from_secs(1),
            "shutdown took {took:?}"
        );
    }
}
