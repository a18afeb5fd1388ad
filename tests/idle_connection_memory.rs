//! What an idle first-dialect connection holds on the relay's heap, counted exactly: this test
//! binary runs the relay in-process under a counting allocator (the relay's own underneath, as in
//! the binary), opens idle connections over real sockets, 150 per room in `ROOMS` rooms (as
//! `roomcast-load idle --conns 15000 --rooms 100`), `IN_FLIGHT` upgrades at a time with the
//! presence they cause read in between (as the load harness does), lets presence settle, and
//! divides the heap's growth by the connection count. The clients are std sockets that keep
//! nothing on the heap, so every counted byte is the relay's.
//!
//! It prints the live blocks that grew, by requested size and alignment, the bytes in mimalloc's
//! size classes, the process's RSS growth, and mimalloc's pages by block size (committed against
//! used: where RSS exceeds the heap, the holes short-lived blocks left between long-lived ones). ARCHITECTURE.md's budget table quotes the release figures:
//! `cargo test --release --test idle_connection_memory -- --nocapture`. (A debug build lays some
//! tokio types out larger.) RSS, with fragmentation and the allocator's page retention, is
//! measured by `roomcast-load idle` against a release build.
#![allow(unsafe_code)] // a GlobalAlloc is an unsafe impl; it only forwards to mimalloc and counts

use std::alloc::{GlobalAlloc, Layout};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicIsize, Ordering};
use std::time::Duration;

use roomcast::alloc::RelayAlloc;

/// Connections per room, as in `roomcast-load idle --conns 15000 --rooms 100`.
const PER_ROOM: usize = 150;
/// Rooms: 4,500 connections, enough that the relay's fixed costs (a 64 KiB read buffer per
/// worker thread, say) add little per connection. `IDLE_MEMORY_ROOMS` sets another count; the
/// test holds both ends of every connection, so the open-file limit caps it.
const ROOMS: usize = 30;
/// Upgrades in flight at once (the load harness's default is 256).
const IN_FLIGHT: usize = 256;
const TOKEN: &str = "idle-memory-test-token";
const ORIGIN: &str = "http://127.0.0.1";

struct Counting;

/// Live blocks by requested size (the last slot: larger), for alignments up to 16 and above 16.
const SIZES: usize = 4097;
static LIVE: [[AtomicIsize; SIZES]; 2] = [const { [const { AtomicIsize::new(0) }; SIZES] }; 2];
static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
static LIVE_CLASS_BYTES: AtomicIsize = AtomicIsize::new(0);

/// The block mimalloc gives a request: its size class, or for an alignment the class does not
/// guarantee (only power-of-two classes up to 4 KiB are naturally aligned) a block large enough
/// to align within.
fn class_bytes(layout: Layout) -> usize {
    // SAFETY: mi_good_size is a pure function of its argument.
    let good = |n: usize| unsafe { libmimalloc_sys::mi_good_size(n) };
    let class = good(layout.size());
    if layout.align() <= 16 || (class.is_power_of_two() && class <= 4096 && layout.align() <= class)
    {
        class
    } else {
        good(layout.size() + layout.align() - 1)
    }
}

fn count(layout: Layout, sign: isize) {
    let big = usize::from(layout.align() > 16);
    LIVE[big][layout.size().min(SIZES - 1)].fetch_add(sign, Ordering::Relaxed);
    LIVE_BYTES.fetch_add(sign * layout.size() as isize, Ordering::Relaxed);
    LIVE_CLASS_BYTES.fetch_add(sign * class_bytes(layout) as isize, Ordering::Relaxed);
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout, 1);
        RelayAlloc.alloc(layout)
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout, 1);
        RelayAlloc.alloc_zeroed(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(layout, -1);
        RelayAlloc.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(layout, -1);
        count(
            Layout::from_size_align(new_size, layout.align()).expect("valid layout"),
            1,
        );
        RelayAlloc.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// The process's resident set (the test's clients hold no heap, so its growth is the relay's).
fn rss_bytes() -> isize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<isize>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn rooms() -> usize {
    let wanted = std::env::var("IDLE_MEMORY_ROOMS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(ROOMS);
    let files = roomcast::limits::raise_nofile_limit() as usize;
    wanted
        .min(files.saturating_sub(200) / (2 * PER_ROOM))
        .max(1)
}

fn snapshot() -> (isize, isize, Vec<[isize; 2]>) {
    let blocks = (0..SIZES)
        .map(|s| {
            [
                LIVE[0][s].load(Ordering::Relaxed),
                LIVE[1][s].load(Ordering::Relaxed),
            ]
        })
        .collect();
    (
        LIVE_BYTES.load(Ordering::Relaxed),
        LIVE_CLASS_BYTES.load(Ordering::Relaxed),
        blocks,
    )
}

/// Send one first-dialect upgrade request.
fn start_upgrade(port: u16, i: usize, rooms: usize) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.set_nodelay(true).expect("TCP_NODELAY");
    let room = i % rooms;
    let head = format!(
        "GET /chat?token={TOKEN}&name=user{i}&room=room{room} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\
         Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nOrigin: {ORIGIN}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).expect("write upgrade");
    s
}

/// Read the 101; the greeting stays in the socket. Leaves the socket nonblocking.
fn finish_upgrade(s: &mut TcpStream) {
    let mut got = [0u8; 12];
    s.read_exact(&mut got).expect("read status");
    assert_eq!(&got, b"HTTP/1.1 101", "upgrade refused");
    s.set_nonblocking(true).expect("nonblocking");
}

/// Open connections `range`, `IN_FLIGHT` upgrades at a time, reading what the open ones were
/// sent after each batch.
fn open(port: u16, range: std::ops::Range<usize>, rooms: usize, into: &mut Vec<TcpStream>) {
    let ids: Vec<usize> = range.collect();
    for batch in ids.chunks(IN_FLIGHT) {
        let fresh: Vec<TcpStream> = batch
            .iter()
            .map(|&i| start_upgrade(port, i, rooms))
            .collect();
        for mut s in fresh {
            finish_upgrade(&mut s);
            into.push(s);
        }
        read_available(into);
    }
}

/// Read whatever each socket holds now, without waiting.
fn read_available(sockets: &mut [TcpStream]) -> bool {
    let mut buf = [0u8; 16384];
    let mut any = false;
    for s in sockets.iter_mut() {
        while let Ok(n) = s.read(&mut buf) {
            assert!(n > 0, "the relay closed an idle connection");
            any = true;
        }
    }
    any
}

/// Read until no socket has received anything for `quiet`.
fn drain(sockets: &mut [TcpStream], quiet: Duration) {
    let mut idle_since = std::time::Instant::now();
    while idle_since.elapsed() < quiet {
        if read_available(sockets) {
            idle_since = std::time::Instant::now();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

extern "C" {
    /// mimalloc's process-wide heap (v3; not in libmimalloc-sys's v3 bindings).
    fn mi_heap_main() -> *mut libmimalloc_sys::mi_heap_t;
}

/// mimalloc's pages, as (block size, committed bytes, blocks in use) per page, gathered by
/// `visit_page` into room reserved beforehand (the visitor must not allocate).
static PAGES: std::sync::Mutex<Vec<(usize, usize, usize)>> = std::sync::Mutex::new(Vec::new());
const PAGES_MAX: usize = 1 << 16;

unsafe extern "C" fn visit_page(
    _heap: *const libmimalloc_sys::mi_heap_t,
    area: *const libmimalloc_sys::mi_heap_area_t,
    _block: *mut std::ffi::c_void,
    _block_size: usize,
    _arg: *mut std::ffi::c_void,
) -> bool {
    // SAFETY: mimalloc passes a valid area for the duration of the call.
    let area = unsafe { &*area };
    let mut pages = PAGES.lock().unwrap_or_else(|p| p.into_inner());
    if pages.len() < PAGES_MAX {
        pages.push((area.block_size, area.committed, area.used));
    }
    true
}

/// Print, per block size holding more than 256 KiB, mimalloc's committed bytes and what its
/// live blocks use of them.
fn print_pages() {
    // SAFETY: collecting only frees this thread's empty pages.
    unsafe { libmimalloc_sys::mi_collect(true) };
    PAGES
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .reserve(PAGES_MAX);
    // SAFETY: both heaps live for the process; the visitor does not allocate.
    for heap in [
        unsafe { mi_heap_main() },
        roomcast::alloc::long_lived_heap(),
    ] {
        unsafe {
            libmimalloc_sys::mi_heap_visit_blocks(
                heap,
                false,
                Some(visit_page),
                std::ptr::null_mut(),
            );
        }
    }
    let pages = std::mem::take(&mut *PAGES.lock().unwrap_or_else(|p| p.into_inner()));
    let mut by_size = std::collections::BTreeMap::<usize, (usize, usize, usize)>::new();
    for (block_size, committed, used) in pages {
        let e = by_size.entry(block_size).or_default();
        *e = (e.0 + 1, e.1 + committed, e.2 + used * block_size);
    }
    // (Blocks of a MiB and more: this function's own list.)
    let (committed, used) = by_size
        .range(..1 << 20)
        .fold((0, 0), |(c, u), (_, &(_, pc, pu))| (c + pc, u + pu));
    eprintln!(
        "mimalloc pages: {} KiB committed, {} KiB in live blocks",
        committed / 1024,
        used / 1024
    );
    eprintln!("by block size, where large or with a large hole (committed KiB / live KiB):");
    for (block_size, (pages, committed, used)) in by_size {
        let large = committed > 256 * 1024 || committed - used > 64 * 1024;
        if large && block_size < 1 << 20 {
            eprintln!(
                "  {block_size:>6} B: {pages:>3} pages, {:>6} / {:>6} KiB",
                committed / 1024,
                used / 1024
            );
        }
    }
}

#[test]
fn idle_connection_heap_bytes() {
    let settings = roomcast::config::Settings {
        chat_token: TOKEN.into(),
        allowed_origins: vec![ORIGIN.into()],
        rate_limit: 1_000_000,
        // Connections open as fast as the harness opens them (MAX_HANDSHAKES_PER_SECOND off,
        // as roomcast-load sets it).
        max_handshakes_per_second: 0,
        // The clients never answer pings: no heartbeat closes them while the test runs.
        heartbeat_interval: Duration::from_secs(3600),
        ..Default::default()
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = runtime.spawn(roomcast::server::run(
        listener,
        settings,
        None,
        None,
        async move {
            let _ = stopped.await;
        },
    ));
    // One connection per room first, so the rooms themselves are not counted per connection.
    let rooms = rooms();
    let connections = rooms * PER_ROOM;
    let mut warm = Vec::new();
    open(port, 0..rooms, rooms, &mut warm);
    drain(&mut warm, Duration::from_millis(500));
    let mut sockets: Vec<TcpStream> = Vec::with_capacity(connections);
    std::thread::sleep(Duration::from_millis(300));
    let (bytes0, class0, blocks0) = snapshot();
    let rss0 = rss_bytes();
    let started = std::time::Instant::now();
    open(port, rooms..rooms + connections, rooms, &mut sockets);
    eprintln!(
        "{connections} connections opened in {:?}",
        started.elapsed()
    );
    drain(&mut sockets, Duration::from_millis(1000));
    let (bytes1, class1, blocks1) = snapshot();
    let rss1 = rss_bytes();
    let n = connections as f64;
    eprintln!(
        "per idle connection: {:.1} B requested, {:.1} B in mimalloc's size classes, {:.0} B of RSS",
        (bytes1 - bytes0) as f64 / n,
        (class1 - class0) as f64 / n,
        (rss1 - rss0) as f64 / n,
    );
    eprintln!("live blocks that grew (per connection), by requested size:");
    for (size, (b0, b1)) in blocks0.iter().zip(&blocks1).enumerate() {
        for (big, align) in [(0, "≤16"), (1, ">16")] {
            let grew = (b1[big] - b0[big]) as f64 / n;
            if grew.abs() >= 0.01 {
                let size = if size == SIZES - 1 {
                    ">4096".to_string()
                } else {
                    size.to_string()
                };
                eprintln!("  {size:>6} B (align {align}): {grew:+.3} blocks");
            }
        }
    }
    let per_connection_class = (class1 - class0) as f64 / n;
    print_pages();
    drop(sockets);
    drop(warm);
    let _ = stop.send(());
    runtime.block_on(async {
        let _ = tokio::time::timeout(Duration::from_secs(10), server).await;
    });
    // A generous ceiling: the exact release figure is in ARCHITECTURE.md; this catches a
    // per-connection buffer coming back (fastwebsockets' 8 KiB, hyper's read buffer).
    assert!(
        per_connection_class < 2048.0,
        "an idle connection holds {per_connection_class:.0} B of heap"
    );
}
