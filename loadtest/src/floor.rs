//! The `floor` scenario: what a small send over loopback TCP costs this machine, measured in the
//! same run as the relays, so every relay figure can be read against it.
//!
//! A sender thread writes relay-sized frames to many loopback sockets at a paced rate, first
//! one frame per `write` (what a relay that never batches does), then `batch` frames per
//! `writev` (what draining a queue in one vectored write does). Its CPU time (user + system,
//! RUSAGE_THREAD) divided by frames is the floor.
//!
//! The kernel's cost per send grows with the number of sockets (socket lookup, cache misses), so
//! the floor is taken at the connection count of the relay scenario it is read against: 10,000
//! for the full fan-out. This machine allows 20,000 open files per process, so the receiving ends
//! live in another process: this binary re-executed as `floor-receiver`, which connects to the
//! sender's loopback listener and drains every socket on one current-thread runtime, as a load
//! worker does. The sender process holds only the listener and the sending (accepted) ends. The
//! receiver reports its own CPU time (RUSAGE_SELF) on its stdout when the sender asks, which the
//! sender does before each mode and again once everything sent has been read. Before measuring,
//! every socket carries `--warm-up-frames` unmeasured frames (see `warm_up`).

use std::cell::RefCell;
use std::io::{BufRead, BufReader, IoSlice, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command as Process, Stdio};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use tokio::io::Interest;

use crate::report::Report;
use crate::sys;

/// The socket count of the reference floor that `compare` reports next to the matched one.
pub const REFERENCE_SOCKETS: usize = 100;
/// Source addresses the receiver connects from, round robin (127.0.0.2, 127.0.0.3, ...), so no
/// source runs short of ephemeral ports.
const RECEIVER_SOURCES: u32 = 4;
/// Descriptors each process keeps aside for its runtime, pipes and listener.
const SPARE_FDS: u64 = 100;
/// The receiver's one read buffer, shared by every socket (all reads happen on one thread).
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// Longest wait for the receiver to open every socket.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for one reply from the receiver.
const REPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest wait, after a mode's last send, for the receiver to have read everything.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Args)]
pub struct FloorArgs {
    /// Receiving sockets, written round robin. Match the relay scenario read against it: the
    /// default is the default fan-out's 20 x 50; the full fan-out (100 x 100) wants 10000.
    #[arg(long, default_value_t = 1000)]
    pub sockets: usize,
    /// Frames per second, in both modes.
    #[arg(long, default_value_t = 100_000.0)]
    pub rate: f64,
    /// Length of each mode (ms).
    #[arg(long, default_value_t = 3000)]
    pub duration_ms: u64,
    /// Bytes per frame (a delivered chat message event is about 180-250 bytes).
    #[arg(long, default_value_t = 200)]
    pub frame_bytes: usize,
    /// Frames per write in the batched mode.
    #[arg(long, default_value_t = 4)]
    pub batch: usize,
    /// Frames written to every socket before measuring (unmeasured), so that each connection is
    /// past its first sends and its receiver's quick-ACK start, as a relay's connections are.
    #[arg(long, default_value_t = 20)]
    pub warm_up_frames: usize,
    /// Order the sockets are written in: 1 writes them in the order they were opened; N visits
    /// every Nth first (0, N, 2N, ..., then 1, N+1, ...), the order in which a relay delivering
    /// room by room reaches its members when `fanout` opened them round robin over N rooms.
    #[arg(long, default_value_t = 1)]
    pub stride: usize,
}

/// (internal) The receiving process: where to connect, how many sockets, and how long it may
/// live at most.
#[derive(Debug, Clone, Args)]
pub struct ReceiverArgs {
    #[arg(long)]
    pub addr: SocketAddr,
    #[arg(long)]
    pub sockets: usize,
    #[arg(long)]
    pub max_ms: u64,
}

pub struct FloorResult {
    pub frames: u64,
    pub writes: u64,
    pub sender_cpu_us: u64,
    pub reader_cpu_us: u64,
    pub elapsed_s: f64,
    /// Bytes sent, and bytes the receiver had read when its CPU was taken.
    pub bytes_sent: u64,
    pub bytes_read: u64,
}

/// The receiving process, seen from the sender: its stdin for requests, its stdout lines.
struct Receiver {
    child: Child,
    stdin: ChildStdin,
    lines: mpsc::Receiver<String>,
}

impl Receiver {
    fn start(addr: SocketAddr, sockets: usize, max_ms: u64) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("locating this executable")?;
        let mut child = Process::new(exe)
            .arg("floor-receiver")
            .arg("--addr")
            .arg(addr.to_string())
            .arg("--sockets")
            .arg(sockets.to_string())
            .arg("--max-ms")
            .arg(max_ms.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting the floor receiver")?;
        let stdin = child.stdin.take().expect("stdin was piped");
        let stdout = child.stdout.take().expect("stdout was piped");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Receiver {
            child,
            stdin,
            lines,
        })
    }

    /// The next line, or an error if the receiver reported one, exited or said nothing in time.
    fn line(&self, timeout: Duration) -> anyhow::Result<String> {
        match self.lines.recv_timeout(timeout) {
            Ok(l) => match l.strip_prefix("error ") {
                Some(e) => bail!("floor receiver: {e}"),
                None => Ok(l),
            },
            Err(mpsc::RecvTimeoutError::Timeout) => {
                bail!("floor receiver said nothing for {} s", timeout.as_secs())
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => bail!("floor receiver exited"),
        }
    }

    /// Asks for the receiver's CPU time so far (us) and the bytes it has read so far.
    fn mark(&mut self, request: &str) -> anyhow::Result<(u64, u64)> {
        writeln!(self.stdin, "{request}").context("asking the floor receiver")?;
        self.stdin.flush()?;
        let l = self.line(REPLY_TIMEOUT)?;
        let mut f = l.split_whitespace();
        match (f.next(), f.next(), f.next()) {
            (Some("mark"), Some(cpu), Some(bytes)) => Ok((cpu.parse()?, bytes.parse()?)),
            _ => bail!("floor receiver: unexpected reply {l:?}"),
        }
    }

    /// Tells the receiver to exit and waits for it (bounded).
    fn stop(&mut self) {
        let _ = self.mark("stop");
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Accepts the receiver's `n` connections; the accepted ends are the sending sockets.
fn accept_all(
    listener: &TcpListener,
    n: usize,
    rx: &mut Receiver,
) -> anyhow::Result<Vec<TcpStream>> {
    listener.set_nonblocking(true)?;
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                out.push(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if let Ok(Some(status)) = rx.child.try_wait() {
                    // Its last words, if any, say why.
                    let why = rx.line(Duration::from_millis(100)).err();
                    bail!(
                        "the floor receiver exited ({status}) after {} of {n} connections{}",
                        out.len(),
                        why.map(|e| format!(": {e:#}")).unwrap_or_default()
                    );
                }
                if Instant::now() >= deadline {
                    bail!(
                        "only {} of {n} receiving sockets connected in {} s",
                        out.len(),
                        SETUP_TIMEOUT.as_secs()
                    );
                }
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(e) => return Err(e).context("accepting a receiving socket"),
        }
    }
    Ok(out)
}

/// `warm_up_frames` frames to every socket, unmeasured, then waits until the receiver has read
/// them all. A fresh connection is not in its steady state: its first sends allocate and touch
/// cold memory, and its receiver ACKs each of the first (up to 16) segments at once ("quick ACK"
/// mode) instead of delaying ACKs. A relay's connections are long past that when measured; at
/// 10,000 sockets and 100,000 frames/s, each socket gets only 10 frames a second, so without the
/// warm-up most of a short run would be spent there (measured here at 10,000 sockets: 8.5-10.6 us
/// per send without it, about 7 with it).
fn warm_up(a: &FloorArgs, senders: &mut [TcpStream], rx: &mut Receiver) -> anyhow::Result<()> {
    let frame = server_frame(a.frame_bytes);
    let (_, read0) = rx.mark("mark")?;
    let rounds = a.warm_up_frames as u64;
    for _ in 0..rounds {
        for s in senders.iter_mut() {
            s.write_all(&frame).context("warming up a sending socket")?;
        }
    }
    let want = rounds * frame.len() as u64 * senders.len() as u64;
    // Up to ~400,000 frames at the largest size: allow 25 us each on top of the usual wait.
    let allowed = DRAIN_TIMEOUT + Duration::from_micros(25 * rounds * senders.len() as u64);
    let deadline = Instant::now() + allowed;
    while rx.mark("mark")?.1 - read0 < want {
        if Instant::now() >= deadline {
            bail!(
                "floor receiver read too little of the warm-up in {:.0} s",
                allowed.as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    Ok(())
}

fn run_mode(
    a: &FloorArgs,
    batch: usize,
    senders: &mut [TcpStream],
    rx: &mut Receiver,
) -> anyhow::Result<FloorResult> {
    let (reader_cpu0, read0) = rx.mark("mark")?;
    let order = visiting_order(senders.len(), a.stride);
    let sender = move || -> (u64, u64, u64, f64, u64) {
        let frame = server_frame(a.frame_bytes);
        let slices: Vec<IoSlice<'_>> = (0..batch).map(|_| IoSlice::new(&frame)).collect();
        let total = (a.rate * a.duration_ms as f64 / 1000.0) as u64 / batch as u64 * batch as u64;
        let cpu0 = sys::thread_cpu_us();
        let t0 = Instant::now();
        let (mut sent, mut writes, mut next) = (0u64, 0u64, 0usize);
        // Bounded by `total` frames and by twice the planned duration.
        let hard_stop = Duration::from_millis(a.duration_ms * 2 + 1000);
        while sent < total && t0.elapsed() < hard_stop {
            let due = ((t0.elapsed().as_secs_f64() * a.rate) as u64).min(total);
            while sent + batch as u64 <= due {
                let s = &mut senders[order[next]];
                next = (next + 1) % order.len();
                let ok = if batch == 1 {
                    s.write_all(&frame).is_ok()
                } else {
                    write_all_vectored(s, &slices, frame.len() * batch)
                };
                if !ok {
                    return (
                        sent,
                        writes,
                        sys::thread_cpu_us() - cpu0,
                        t0.elapsed().as_secs_f64(),
                        sent * frame.len() as u64,
                    );
                }
                sent += batch as u64;
                writes += 1;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        let cpu = sys::thread_cpu_us() - cpu0;
        let el = t0.elapsed().as_secs_f64();
        (sent, writes, cpu, el, sent * frame.len() as u64)
    };
    // A thread of its own, so RUSAGE_THREAD holds the sends and nothing else.
    let (frames, writes, sender_cpu_us, elapsed_s, bytes_sent) = std::thread::scope(|s| {
        s.spawn(sender)
            .join()
            .map_err(|_| anyhow::anyhow!("sender panicked"))
    })?;
    // The receiver's CPU counts once it has read everything sent (or after DRAIN_TIMEOUT).
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let (reader_cpu1, read1) = loop {
        let (cpu, read) = rx.mark("mark")?;
        if read - read0 >= bytes_sent || Instant::now() >= deadline {
            break (cpu, read);
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Ok(FloorResult {
        frames,
        writes,
        sender_cpu_us,
        reader_cpu_us: reader_cpu1 - reader_cpu0,
        elapsed_s,
        bytes_sent,
        bytes_read: read1 - read0,
    })
}

/// The order `run_mode` writes `n` sockets in: every `stride`th from 0, then from 1, and so on.
fn visiting_order(n: usize, stride: usize) -> Vec<usize> {
    let stride = stride.clamp(1, n.max(1));
    (0..stride)
        .flat_map(|start| (start..n).step_by(stride))
        .collect()
}

fn write_all_vectored(s: &mut TcpStream, slices: &[IoSlice<'_>], total: usize) -> bool {
    match s.write_vectored(slices) {
        Ok(n) if n == total => true,
        Ok(n) => {
            // Rare partial write: finish the rest plainly.
            let flat: Vec<u8> = slices.iter().flat_map(|x| x.iter().copied()).collect();
            s.write_all(&flat[n..]).is_ok()
        }
        Err(_) => false,
    }
}

/// An unmasked server text frame of `len` payload bytes shaped like a message event.
fn server_frame(len: usize) -> Vec<u8> {
    let mut payload = br#"{"type":"message","message":{"id":"00000000-0000-4000-8000-000000000000","room":"r1","from":"u1","text":""#.to_vec();
    while payload.len() + 40 < len {
        payload.push(b'x');
    }
    payload.extend_from_slice(br#"","sentAt":"2026-01-01T00:00:00.000Z"}}"#);
    let mut f = vec![0x81];
    if payload.len() < 126 {
        f.push(payload.len() as u8);
    } else {
        f.push(126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    f.extend_from_slice(&payload);
    f
}

pub fn floor(a: &FloorArgs) -> anyhow::Result<Report> {
    anyhow::ensure!(a.sockets >= 1, "--sockets must be at least 1");
    anyhow::ensure!(a.rate > 0.0, "--rate must be above 0");
    anyhow::ensure!(a.batch >= 1, "--batch must be at least 1");
    let limit = sys::raise_nofile_limit();
    if a.sockets as u64 + SPARE_FDS > limit {
        bail!(
            "--sockets {} is more than one process may hold here: the sender and the receiver \
             each hold one end of every socket, and the open-file limit is {limit} per process \
             (at most {} sockets)",
            a.sockets,
            limit.saturating_sub(SPARE_FDS)
        );
    }
    let mut r = Report::bare("floor");
    r.put(
        "relay",
        "relay",
        serde_json::json!("none (raw loopback TCP)"),
    );
    r.int("sockets", "sockets", a.sockets as u64);
    r.int(
        "warm_up_frames",
        "warm-up frames per socket",
        a.warm_up_frames as u64,
    );
    r.int("stride", "visiting order: stride", a.stride as u64);
    r.num("rate_frames_per_s", "frames/s offered", a.rate);
    r.int(
        "frame_bytes",
        "bytes per frame",
        server_frame(a.frame_bytes).len() as u64,
    );
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the floor listener")?;
    sys::set_listen_backlog(&listener, 4096);
    let addr = listener.local_addr()?;
    // The receiver exits by itself if this process is gone or stuck well past the plan.
    let max_ms = 4 * a.duration_ms + 2 * SETUP_TIMEOUT.as_millis() as u64 + 60_000;
    let t_setup = Instant::now();
    let mut rx = Receiver::start(addr, a.sockets, max_ms)?;
    let mut senders = accept_all(&listener, a.sockets, &mut rx)?;
    drop(listener);
    match rx.line(SETUP_TIMEOUT)?.as_str() {
        l if l == format!("connected {}", a.sockets) => {}
        l => bail!("floor receiver: unexpected reply {l:?}"),
    }
    warm_up(a, &mut senders, &mut rx)?;
    let setup_s = t_setup.elapsed().as_secs_f64();
    eprintln!(
        "floor: {} sockets open and warmed up in {:.2} s (receiving ends in process {})",
        a.sockets,
        setup_s,
        rx.child.id()
    );
    eprintln!(
        "floor: one frame per write, {} frames/s for {} ms",
        a.rate, a.duration_ms
    );
    let one = run_mode(a, 1, &mut senders, &mut rx)?;
    eprintln!("floor: {} frames per writev", a.batch.max(2));
    let many = run_mode(a, a.batch.max(2), &mut senders, &mut rx)?;
    rx.stop();
    drop(senders);
    r.put(
        "receiver",
        "receiving ends",
        serde_json::json!("separate process"),
    );
    r.num("setup_s", "opening and warming the sockets (s)", setup_s);
    let per = |cpu: u64, n: u64| cpu as f64 / n.max(1) as f64;
    r.int("single_frames", "1/write: frames sent", one.frames);
    r.num(
        "single_frames_per_s",
        "1/write: frames/s achieved",
        one.frames as f64 / one.elapsed_s.max(1e-9),
    );
    r.num(
        "floor_us_per_send",
        "1/write: sender CPU per send (us)",
        per(one.sender_cpu_us, one.writes),
    );
    r.num(
        "single_reader_us_per_frame",
        "1/write: receiver CPU per frame (us)",
        per(one.reader_cpu_us, one.frames),
    );
    r.int("batched_frames", "batched: frames sent", many.frames);
    r.num(
        "batched_frames_per_s",
        "batched: frames/s achieved",
        many.frames as f64 / many.elapsed_s.max(1e-9),
    );
    r.num(
        "batched_us_per_write",
        "batched: sender CPU per writev (us)",
        per(many.sender_cpu_us, many.writes),
    );
    r.num(
        "floor_us_per_frame_batched",
        "batched: sender CPU per frame (us)",
        per(many.sender_cpu_us, many.frames),
    );
    r.num(
        "batched_reader_us_per_frame",
        "batched: receiver CPU per frame (us)",
        per(many.reader_cpu_us, many.frames),
    );
    for (mode, m) in [("1/write", &one), ("batched", &many)] {
        if m.bytes_read < m.bytes_sent {
            r.note(format!(
                "{mode}: the receiver had read {} of {} bytes {} s after the last send; its CPU per frame is understated",
                m.bytes_read,
                m.bytes_sent,
                DRAIN_TIMEOUT.as_secs()
            ));
        }
    }
    Ok(r)
}

/// Writes one line to the sender; if the sender is gone, so is the point of this process.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
        std::process::exit(0);
    }
}

/// One receiving socket, from the `k`-th source address.
async fn connect_one(addr: SocketAddr, k: usize) -> Result<tokio::net::TcpStream, String> {
    let sock = tokio::net::TcpSocket::new_v4().map_err(|e| format!("socket: {e}"))?;
    sys::set_bind_address_no_port(&sock);
    let src = sys::source_address(k as u32 % RECEIVER_SOURCES);
    sock.bind(SocketAddr::new(src.into(), 0))
        .map_err(|e| format!("bind {src}: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(10), sock.connect(addr)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(format!("connect: {e}")),
        Err(_) => Err("connect: timed out after 10 s".into()),
    }
}

/// The `floor-receiver` process: opens `sockets` connections to the sender's listener, then
/// drains them all on one current-thread runtime until told to stop. On stdin it takes `mark`
/// (answered with `mark CPU_US BYTES_READ`) and `stop` (the same answer, then exit); on stdout
/// it says `connected N` once every socket is open, or `error ...`.
pub fn receiver_main(a: &ReceiverArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        a.addr.ip().is_loopback(),
        "the floor receiver connects to loopback only"
    );
    sys::raise_nofile_limit();
    let max = Duration::from_millis(a.max_ms);
    std::thread::spawn(move || {
        std::thread::sleep(max);
        eprintln!("floor-receiver: {} ms passed, exiting", max.as_millis());
        std::process::exit(2);
    });
    let read = Arc::new(AtomicU64::new(0));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    let (addr, n) = (a.addr, a.sockets);
    local.block_on(&rt, async move {
        let mut streams = Vec::with_capacity(n);
        for k in 0..n {
            match connect_one(addr, k).await {
                Ok(s) => streams.push(s),
                Err(e) => {
                    say(&format!("error socket {} of {n}: {e}", k + 1));
                    std::process::exit(1);
                }
            }
        }
        let read2 = read.clone();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { break };
                let answer = format!(
                    "mark {} {}",
                    sys::process_cpu_us(),
                    read2.load(Ordering::Relaxed)
                );
                match line.trim() {
                    "mark" => say(&answer),
                    "stop" => {
                        say(&answer);
                        std::process::exit(0);
                    }
                    other => say(&format!("error unknown request {other:?}")),
                }
            }
            // The sender is gone.
            std::process::exit(0);
        });
        say(&format!("connected {n}"));
        // One runtime draining every socket, as a load worker does, into one shared buffer.
        let buf = Rc::new(RefCell::new(vec![0u8; READ_BUFFER_BYTES]));
        let mut tasks = Vec::with_capacity(n);
        for s in streams {
            let buf = buf.clone();
            let read = read.clone();
            tasks.push(tokio::task::spawn_local(async move {
                loop {
                    if s.ready(Interest::READABLE).await.is_err() {
                        break;
                    }
                    let r = s.try_read(&mut buf.borrow_mut());
                    match r {
                        Ok(0) => break,
                        Ok(got) => {
                            read.fetch_add(got as u64, Ordering::Relaxed);
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(_) => break,
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::visiting_order;

    #[test]
    fn the_visiting_order_takes_every_socket_once_stride_by_stride() {
        assert_eq!(visiting_order(5, 1), [0, 1, 2, 3, 4]);
        assert_eq!(visiting_order(7, 3), [0, 3, 6, 1, 4, 2, 5]);
        // A stride past the count is the plain order.
        assert_eq!(visiting_order(3, 10), [0, 1, 2]);
        let mut all = visiting_order(10_000, 100);
        assert_eq!(all[..3], [0, 100, 200]);
        all.sort_unstable();
        assert_eq!(all, (0..10_000).collect::<Vec<_>>());
    }
}
