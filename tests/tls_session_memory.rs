//! What one idle TLS session holds on the heap, counted exactly: this test binary has its own
//! counting allocator (per thread, so the test harness's threads do not disturb it). A rustls
//! `ServerConnection` made from the relay's own configuration (`roomcast::tls::Tls`) goes
//! through a full handshake with a rustls client, the upgrade request and its 101, and a
//! WebSocket message each way, all in memory; then it is idle, and dropping it shows what it
//! held. ARCHITECTURE.md's memory budget quotes these figures and the test keeps them honest.
//! (Requested bytes: the allocator's rounding and the RSS are measured by
//! `loadtest/tls-idle.py` against a release build.)
#![allow(unsafe_code)] // a GlobalAlloc is an unsafe impl; it only forwards to System and counts

mod common;

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::io::{Read, Write};
use std::sync::Arc;

use common::*;

struct Counting;

thread_local! {
    static LIVE_BYTES: Cell<isize> = const { Cell::new(0) };
    static LIVE_BLOCKS: Cell<isize> = const { Cell::new(0) };
    /// While set, the sizes of freed blocks are noted here (to list what a session held).
    static FREED: Cell<Option<([usize; 32], usize)>> = const { Cell::new(None) };
}

fn count(bytes: isize, blocks: isize) {
    // `try_with`: nothing to count once the thread's locals are gone.
    let _ = LIVE_BYTES.try_with(|c| c.set(c.get() + bytes));
    let _ = LIVE_BLOCKS.try_with(|c| c.set(c.get() + blocks));
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size() as isize, 1);
        System.alloc(layout)
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        count(-(layout.size() as isize), -1);
        let _ = FREED.try_with(|f| {
            if let Some((mut sizes, n)) = f.get() {
                if n < sizes.len() {
                    sizes[n] = layout.size();
                }
                f.set(Some((sizes, n + 1)));
            }
        });
        System.dealloc(ptr, layout)
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size as isize - layout.size() as isize, 0);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

fn live() -> (isize, isize) {
    (LIVE_BYTES.with(Cell::get), LIVE_BLOCKS.with(Cell::get))
}

/// Move every TLS byte `from` has queued into `to`, and let `to` process it.
fn pump(from: &mut rustls::Connection, to: &mut rustls::Connection) {
    let mut wire = Vec::new();
    while from.wants_write() {
        from.write_tls(&mut wire).expect("write to a Vec");
    }
    let mut rest = &wire[..];
    while !rest.is_empty() {
        to.read_tls(&mut rest).expect("read from a slice");
        to.process_new_packets().expect("valid TLS");
    }
}

fn read_all(conn: &mut rustls::Connection) -> Vec<u8> {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match conn.reader().read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("read: {e}"),
        }
    }
    out
}

#[test]
fn an_idle_tls_session_holds_a_bounded_few_kilobytes() {
    let dir = TempDir::new("tls-memory");
    let ca = TestCa::new(dir.path());
    let cert = ca.issue("server");
    let tls = roomcast::tls::Tls::load(&cert.cert, &cert.key).expect("load");
    let client_config: Arc<rustls::ClientConfig> = ca.client_config();
    let name = rustls::pki_types::ServerName::try_from(TLS_SERVER_NAME).unwrap();

    // Warm up once, so lazily built shared state (provider tables, the session cache's first
    // entries) is not charged to the session measured below.
    for _ in 0..2 {
        let mut server = rustls::Connection::Server(
            rustls::ServerConnection::new(tls.server_config().clone()).unwrap(),
        );
        let mut client = rustls::Connection::Client(
            rustls::ClientConnection::new(client_config.clone(), name.clone()).unwrap(),
        );
        while server.is_handshaking() || client.is_handshaking() {
            pump(&mut client, &mut server);
            pump(&mut server, &mut client);
        }
    }

    let (bytes0, blocks0) = live();
    let mut server = Box::new(rustls::Connection::Server(
        rustls::ServerConnection::new(tls.server_config().clone()).unwrap(),
    ));
    let (created, _) = live();
    let client_before = live();
    let mut client = rustls::Connection::Client(
        rustls::ClientConnection::new(client_config.clone(), name.clone()).unwrap(),
    );
    let client_created = live().0 - client_before.0;
    while server.is_handshaking() || client.is_handshaking() {
        pump(&mut client, &mut server);
        pump(&mut server, &mut client);
    }
    pump(&mut server, &mut client); // session tickets
                                    // The relay bounds what rustls buffers for the connection (tls::TLS_BUFFER_BYTES).
    server.set_buffer_limit(Some(roomcast::tls::TLS_BUFFER_BYTES));

    // The upgrade request, its 101, and a masked text frame each way (then a second round, so
    // buffers that only grow on a second use would show).
    for _ in 0..2 {
        client
            .writer()
            .write_all(&upgrade_head(443, "/chat?token=t&name=ann&room=lobby", None).into_bytes())
            .unwrap();
        pump(&mut client, &mut server);
        assert!(!read_all(&mut server).is_empty());
        server
            .writer()
            .write_all(&[b'x'; 180]) // a 101 response's size
            .unwrap();
        pump(&mut server, &mut client);
        read_all(&mut client);
        client
            .writer()
            .write_all(&masked_frame(
                OP_TEXT,
                br#"{"type":"message","text":"hello"}"#,
            ))
            .unwrap();
        pump(&mut client, &mut server);
        read_all(&mut server);
        server.writer().write_all(&[b'y'; 300]).unwrap();
        pump(&mut server, &mut client);
        read_all(&mut client);
    }

    // Idle: what the server session holds is what dropping it frees. (The client's own
    // allocations are freed by dropping the client first.)
    drop(client);
    let (idle_bytes, idle_blocks) = live();
    FREED.with(|f| f.set(Some(([0; 32], 0))));
    drop(server);
    let (sizes, freed) = FREED.with(|f| f.take()).expect("set above");
    let (after_bytes, after_blocks) = live();
    let held = idle_bytes - after_bytes;
    let blocks = idle_blocks - after_blocks;
    eprintln!(
        "idle TLS server session: {held} B requested in {blocks} allocations \
         (the boxed ServerConnection alone: {} B; at creation: {} B; a client for comparison: {client_created} B)",
        std::mem::size_of::<rustls::Connection>(),
        created - bytes0,
    );
    // What stays behind is shared, not the session's: the resumption cache in the server
    // configuration (bounded: 256 sessions per process) took this handshake's tickets.
    eprintln!(
        "blocks freed by dropping it (bytes): {:?}",
        &sizes[..freed.min(sizes.len())]
    );
    eprintln!(
        "left in shared state (session cache): {} B in {} allocations",
        after_bytes - bytes0,
        after_blocks - blocks0
    );
    // The budget ARCHITECTURE.md writes down: the 1.2 KB struct, rustls' 4 KiB receive
    // buffer (kept once used), two AEAD key schedules, the traffic-secret state and two small
    // queues. Growing past it is allowed, silently growing past it is not.
    assert!(
        held <= 8 * 1024,
        "an idle TLS session grew to {held} B; update ARCHITECTURE.md's budget"
    );
}
