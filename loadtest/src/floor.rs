//! The `floor` scenario: what a small send over loopback TCP costs this machine, measured in the
//! same run as the relays, so every relay figure can be read against it.
//!
//! A sender thread writes relay-sized frames to many loopback sockets at a paced rate, first
//! one frame per `write` (what a relay that never batches does), then `batch` frames per
//! `writev` (what draining a queue in one vectored write does). Its CPU time (user + system,
//! RUSAGE_THREAD) divided by frames is the floor; a reader thread on an epoll runtime, like a
//! load worker, drains the other ends, and its CPU is shown too.

use std::io::{IoSlice, Write};
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};

use clap::Args;
use tokio::io::Interest;

use crate::report::Report;
use crate::sys;

#[derive(Debug, Clone, Args)]
pub struct FloorArgs {
    /// Receiving sockets, written round robin.
    #[arg(long, default_value_t = 100)]
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
}

pub struct FloorResult {
    pub frames: u64,
    pub writes: u64,
    pub sender_cpu_us: u64,
    pub reader_cpu_us: u64,
    pub elapsed_s: f64,
}

fn run_mode(a: &FloorArgs, batch: usize) -> anyhow::Result<FloorResult> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let mut senders = Vec::with_capacity(a.sockets);
    let mut receivers = Vec::with_capacity(a.sockets);
    for _ in 0..a.sockets {
        let c = TcpStream::connect(addr)?;
        let (s, _) = listener.accept()?;
        s.set_nodelay(true)?;
        c.set_nonblocking(true)?;
        senders.push(s);
        receivers.push(c);
    }
    // Reader: one current-thread runtime draining every socket, as a load worker does.
    let reader = std::thread::spawn(move || -> u64 {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let local = tokio::task::LocalSet::new();
        let cpu0 = sys::thread_cpu_us();
        local.block_on(&rt, async move {
            let mut tasks = Vec::new();
            for r in receivers {
                tasks.push(tokio::task::spawn_local(async move {
                    let s = tokio::net::TcpStream::from_std(r).expect("registering a socket");
                    let mut buf = vec![0u8; 64 * 1024];
                    loop {
                        if s.ready(Interest::READABLE).await.is_err() {
                            break;
                        }
                        match s.try_read(&mut buf) {
                            Ok(0) => break,
                            Ok(_) => {}
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
        sys::thread_cpu_us() - cpu0
    });
    let a2 = a.clone();
    let sender = std::thread::spawn(move || -> (u64, u64, u64, f64) {
        let frame = server_frame(a2.frame_bytes);
        let slices: Vec<IoSlice<'_>> = (0..batch).map(|_| IoSlice::new(&frame)).collect();
        let total = (a2.rate * a2.duration_ms as f64 / 1000.0) as u64 / batch as u64 * batch as u64;
        let cpu0 = sys::thread_cpu_us();
        let t0 = Instant::now();
        let (mut sent, mut writes, mut next) = (0u64, 0u64, 0usize);
        // Bounded by `total` frames and by twice the planned duration.
        let hard_stop = Duration::from_millis(a2.duration_ms * 2 + 1000);
        while sent < total && t0.elapsed() < hard_stop {
            let due = ((t0.elapsed().as_secs_f64() * a2.rate) as u64).min(total);
            while sent + batch as u64 <= due {
                let count = senders.len();
                let s = &mut senders[next];
                next = (next + 1) % count;
                let ok = if batch == 1 { s.write_all(&frame).is_ok() } else { write_all_vectored(s, &slices, frame.len() * batch) };
                if !ok {
                    return (sent, writes, sys::thread_cpu_us() - cpu0, t0.elapsed().as_secs_f64());
                }
                sent += batch as u64;
                writes += 1;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
        let cpu = sys::thread_cpu_us() - cpu0;
        let el = t0.elapsed().as_secs_f64();
        drop(senders);
        (sent, writes, cpu, el)
    });
    let (frames, writes, sender_cpu_us, elapsed_s) = sender.join().map_err(|_| anyhow::anyhow!("sender panicked"))?;
    let reader_cpu_us = reader.join().map_err(|_| anyhow::anyhow!("reader panicked"))?;
    Ok(FloorResult { frames, writes, sender_cpu_us, reader_cpu_us, elapsed_s })
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
    let mut r = Report::bare("floor");
    r.put("relay", "relay", serde_json::json!("none (raw loopback TCP)"));
    r.int("sockets", "sockets", a.sockets as u64);
    r.num("rate_frames_per_s", "frames/s offered", a.rate);
    r.int("frame_bytes", "bytes per frame", server_frame(a.frame_bytes).len() as u64);
    eprintln!("floor: one frame per write, {} frames/s for {} ms", a.rate, a.duration_ms);
    let one = run_mode(a, 1)?;
    eprintln!("floor: {} frames per writev", a.batch);
    let many = run_mode(a, a.batch.max(2))?;
    let per = |cpu: u64, n: u64| cpu as f64 / n.max(1) as f64;
    r.int("single_frames", "1/write: frames sent", one.frames);
    r.num("single_frames_per_s", "1/write: frames/s achieved", one.frames as f64 / one.elapsed_s.max(1e-9));
    r.num("floor_us_per_send", "1/write: sender CPU per send (us)", per(one.sender_cpu_us, one.writes));
    r.num("single_reader_us_per_frame", "1/write: reader CPU per frame (us)", per(one.reader_cpu_us, one.frames));
    r.int("batched_frames", "batched: frames sent", many.frames);
    r.num("batched_frames_per_s", "batched: frames/s achieved", many.frames as f64 / many.elapsed_s.max(1e-9));
    r.num("batched_us_per_write", "batched: sender CPU per writev (us)", per(many.sender_cpu_us, many.writes));
    r.num("floor_us_per_frame_batched", "batched: sender CPU per frame (us)", per(many.sender_cpu_us, many.frames));
    r.num("batched_reader_us_per_frame", "batched: reader CPU per frame (us)", per(many.reader_cpu_us, many.frames));
    Ok(r)
}
