//! Hostile input: "no input may crash or stall the process" and "bad input gets a clear answer".
//!
//! Every test starts the real relay binary (`common::Relay`) and attacks it over raw TCP with
//! seeded, deterministic pseudo-random input (a tiny xorshift; the seed is in every failure
//! message, so a failure reproduces exactly). After each attack the relay must still be alive,
//! `/healthz` must answer quickly, and a fresh well-behaved client must be able to join, publish
//! and receive its own message ([`assert_healthy`]).
//!
//! The WebSocket attacks are checked against a *model* of docs/PROTOCOL.md ([`Model`]): it reads
//! the exact bytes we send, frame by frame, and predicts every answer — pong, error event (with
//! its code), message and ack, or the close code — which the test then reads off the wire in
//! order. The model is written from the protocol text, not from the relay's code.
//!
//! Where PROTOCOL.md leaves a choice open, the model accepts any documented answer (a lone
//! surrogate or a duplicated field may be `bad_json` or `bad_type`) or follows the relay's
//! contract tests (an invalid UTF-8 close reason is 1007; a binary frame is 1003 even inside a
//! fragmented text message).
//!
//! Budget: every loop is bounded in count and time; the file runs in about 10 s on two cores.
//! To reproduce a failure, the message names the test, the seed, the batch and its bytes.
//!
//! Tests named `bug_*` demonstrate defects found while reviewing the relay; they fail until the
//! defect is fixed (each one's doc comment says where and why).

mod common;

use std::collections::{HashMap, VecDeque};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};

// =============================================================================================
// Deterministic pseudo-random numbers
// =============================================================================================

/// xorshift64* seeded through splitmix64, so neighbouring seeds give unrelated streams.
#[derive(Debug, Clone)]
struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        Rng((z ^ (z >> 31)) | 1)
    }

    fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        (self.next_u64() % n as u64) as usize
    }

    /// Uniform in `lo..=hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + self.below(hi - lo + 1)
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len())].clone()
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next_u64() as u8).collect()
    }

    fn mask(&mut self) -> [u8; 4] {
        if self.chance(5) {
            [0; 4] // a zero mask is a valid mask
        } else {
            (self.next_u64() as u32).to_be_bytes()
        }
    }
}

/// Names unique within this test binary (rooms, client names).
fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("{prefix}{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

fn hex(bytes: &[u8]) -> String {
    let shown = &bytes[..bytes.len().min(160)];
    let mut s = String::new();
    for b in shown {
        let _ = write!(s, "{b:02x}");
    }
    if bytes.len() > shown.len() {
        let _ = write!(s, "…(+{} bytes)", bytes.len() - shown.len());
    }
    s
}

// =============================================================================================
// Relay health after an attack
// =============================================================================================

/// The relay survived: the process is alive, `/healthz` answers within a second, and a fresh
/// client can join, publish and receive its own message.
async fn assert_healthy(relay: &mut Relay, ctx: &str) {
    assert!(
        relay.try_exit_status().is_none(),
        "{ctx}: the relay process exited: {:?}",
        relay.try_exit_status()
    );
    let started = Instant::now();
    let health = tokio::time::timeout(Duration::from_secs(2), try_http_get(relay, "/healthz", &[]))
        .await
        .unwrap_or_else(|_| panic!("{ctx}: /healthz did not answer within 2 s"))
        .unwrap_or_else(|e| panic!("{ctx}: /healthz failed: {e}"));
    let took = started.elapsed();
    assert_eq!(health.status, 200, "{ctx}: /healthz: {}", health.head);
    assert_eq!(
        health.json()["ok"],
        true,
        "{ctx}: /healthz body {}",
        health.body
    );
    assert!(
        took < Duration::from_secs(1),
        "{ctx}: /healthz took {took:?}"
    );
    let room = unique("health-");
    let (mut client, _, _) = Client::join(relay, "checker", &room).await;
    let text = format!("still serving after {ctx}");
    let m = client.publish_and_wait(&text).await;
    assert_message_shape(&m, &room, "checker", &text);
    client.close().await;
}

/// No WebSocket is left, and every gauge that tracks them is back at zero.
async fn assert_drained(relay: &Relay, ctx: &str) {
    let deadline = Instant::now() + Duration::from_secs(6);
    loop {
        let text = metrics_text(relay).await;
        let clients = http_get(relay, "/healthz", &[]).await.json()["clients"].as_u64();
        let queued = metric_in(&text, "roomcast_outbox_queued_bytes", &[]).unwrap_or(0.0);
        let gauge = metric_in(&text, "roomcast_connections", &[]).unwrap_or(0.0);
        if clients == Some(0) && queued == 0.0 && gauge == 0.0 {
            return;
        }
        if Instant::now() >= deadline {
            panic!(
                "{ctx}: not drained: /healthz clients {clients:?}, roomcast_connections {gauge}, \
                 roomcast_outbox_queued_bytes {queued} (must be 0 once every WebSocket is gone)"
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `roomcast_connections_closed_total` by code label.
fn closes_by_code(text: &str) -> HashMap<String, f64> {
    let mut out = HashMap::new();
    for code in [
        "1000", "1001", "1002", "1003", "1005", "1006", "1007", "1008", "1009", "1011", "1013",
        "other",
    ] {
        let v =
            metric_in(text, "roomcast_connections_closed_total", &[("code", code)]).unwrap_or(0.0);
        if v != 0.0 {
            out.insert(code.to_string(), v);
        }
    }
    out
}

fn close_label(code: u16) -> String {
    const LABELLED: [u16; 11] = [
        1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1011, 1013,
    ];
    if LABELLED.contains(&code) {
        code.to_string()
    } else {
        "other".to_string()
    }
}

/// Number of file descriptors the relay process holds (Linux).
fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The relay's fd count once it has settled (the smallest of a few samples).
async fn settled_fds(pid: u32) -> usize {
    let mut least = usize::MAX;
    for _ in 0..5 {
        least = least.min(open_fds(pid));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    least
}

// =============================================================================================
// A raw WebSocket connection
// =============================================================================================

/// One frame from the relay.
#[derive(Debug, Clone)]
struct Frame {
    opcode: u8,
    payload: Vec<u8>,
}

impl Frame {
    fn close_code(&self) -> Option<u16> {
        (self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }

    fn json(&self) -> Value {
        assert_eq!(self.opcode, OP_TEXT, "expected a text frame, got {self:?}");
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "relay sent a text frame that is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.payload)
            )
        })
    }
}

#[derive(Debug)]
#[allow(dead_code)] // fields are read through Debug in failure messages
enum End {
    Timeout,
    Eof,
    Error(String),
}

/// Parse one server frame; servers never mask, never set reserved bits, never fragment.
fn parse_server_frame(buf: &[u8]) -> Option<(Frame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[0] & 0x70, 0, "relay set reserved bits: {}", hex(buf));
    assert_eq!(buf[1] & 0x80, 0, "relay masked a frame: {}", hex(buf));
    assert!(buf[0] & 0x80 != 0, "relay fragmented a frame: {}", hex(buf));
    let (start, len) = match buf[1] & 0x7F {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (4, u16::from_be_bytes([buf[2], buf[3]]) as usize)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            (
                10,
                u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
            )
        }
        n => (2, n as usize),
    };
    if buf.len() < start + len {
        return None;
    }
    Some((
        Frame {
            opcode: buf[0] & 0x0F,
            payload: buf[start..start + len].to_vec(),
        },
        start + len,
    ))
}

/// How bytes go onto the socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum WriteMode {
    /// One `write_all`.
    Whole,
    /// Random chunk sizes, with short pauses so the relay sees separate reads.
    Chunks(u64),
    /// One byte per write, with a pause after each.
    Bytewise,
}

struct Wire {
    rd: OwnedReadHalf,
    wr: Option<OwnedWriteHalf>,
    buf: Vec<u8>,
    name: String,
    room: String,
}

async fn read_response_head(rd: &mut OwnedReadHalf, buf: &mut Vec<u8>) -> String {
    let deadline = tokio::time::Instant::now() + EVENT_TIMEOUT;
    loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..pos]).to_string();
            buf.drain(..pos + 4);
            return head;
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, rd.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            other => panic!(
                "no complete response head ({other:?}); got {:?}",
                String::from_utf8_lossy(buf)
            ),
        }
    }
}

impl Wire {
    /// Upgrade as `name` into `room`; `early` is written in the same write as the request head
    /// (frames the relay finds in hyper's read buffer after the upgrade).
    async fn open(relay: &Relay, name: &str, room: &str, early: &[u8]) -> Wire {
        let stream = tokio::time::timeout(EVENT_TIMEOUT, TcpStream::connect(relay.addr))
            .await
            .expect("TCP connect timed out")
            .expect("TCP connect");
        stream.set_nodelay(true).expect("nodelay");
        let (mut rd, mut wr) = stream.into_split();
        let mut bytes = upgrade_head(
            relay.port(),
            &format!("/chat?{}", relay.chat_query(name, room)),
            Some(&relay.origin()),
        )
        .into_bytes();
        bytes.extend_from_slice(early);
        wr.write_all(&bytes).await.expect("write upgrade");
        let mut buf = Vec::new();
        let head = read_response_head(&mut rd, &mut buf).await;
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "upgrade as {name:?} into {room:?} refused: {head}"
        );
        Wire {
            rd,
            wr: Some(wr),
            buf,
            name: name.to_string(),
            room: room.to_string(),
        }
    }

    async fn read_frame(&mut self, timeout: Duration) -> Result<Frame, End> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(frame);
            }
            let mut chunk = vec![0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.rd.read(&mut chunk)).await {
                Err(_) => return Err(End::Timeout),
                Ok(Ok(0)) => return Err(End::Eof),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Err(End::Error(e.to_string())),
            }
        }
    }

    /// Next frame that is not a heartbeat ping.
    async fn next_frame(&mut self, timeout: Duration) -> Result<Frame, End> {
        loop {
            let f = self.read_frame(timeout).await?;
            if f.opcode != OP_PING {
                return Ok(f);
            }
        }
    }

    /// After the relay's close frame: nothing more, then the end of the TCP stream.
    async fn expect_eof(&mut self, ctx: &str) {
        match self.read_frame(Duration::from_secs(3)).await {
            Err(End::Eof) | Err(End::Error(_)) => {}
            Ok(f) => panic!("{ctx}: frame after the close frame: {f:?}"),
            Err(End::Timeout) => panic!("{ctx}: relay did not end the TCP stream after its close"),
        }
    }

    async fn send(&mut self, bytes: &[u8], mode: WriteMode) -> std::io::Result<()> {
        send_with(self.wr.as_mut().expect("write half is here"), bytes, mode).await
    }
}

/// Write `bytes` the way `mode` says.
async fn send_with(wr: &mut OwnedWriteHalf, bytes: &[u8], mode: WriteMode) -> std::io::Result<()> {
    match mode {
        WriteMode::Whole => wr.write_all(bytes).await,
        WriteMode::Chunks(seed) => {
            let mut rng = Rng::new(seed);
            let mut at = 0;
            while at < bytes.len() {
                let n = rng.range(1, 64).min(bytes.len() - at);
                wr.write_all(&bytes[at..at + n]).await?;
                at += n;
                if rng.chance(30) {
                    std::thread::sleep(Duration::from_micros(300));
                }
            }
            Ok(())
        }
        WriteMode::Bytewise => {
            for b in bytes {
                wr.write_all(std::slice::from_ref(b)).await?;
                // A real pause (the relay is another process), so most bytes arrive in a
                // read of their own.
                std::thread::sleep(Duration::from_micros(150));
            }
            Ok(())
        }
    }
}

// =============================================================================================
// The model of docs/PROTOCOL.md
// =============================================================================================

const ANY_ERROR: &[&str] = &["bad_json", "bad_type", "empty", "too_large"];
const BAD_JSON: &[&str] = &["bad_json"];
const BAD_TYPE: &[&str] = &["bad_type"];
/// Valid JSON grammar but not a valid Unicode string (lone surrogates), or a duplicated field:
/// PROTOCOL.md does not say which of the two, only that it is an error event.
const BAD_JSON_OR_TYPE: &[&str] = &["bad_json", "bad_type"];
const EMPTY: &[&str] = &["empty"];
const CONFLICT: &[&str] = &["conflict"];
const TOO_LARGE: &[&str] = &["too_large"];

/// What a complete text message should get (by its exact bytes).
#[derive(Debug, Clone)]
enum Label {
    /// Published as `text` (already trimmed); acked when `request_id` is present.
    Publish {
        text: String,
        request_id: Option<String>,
    },
    /// An error event with one of these codes.
    Error(&'static [&'static str]),
}

/// One thing the relay must send, in order.
#[derive(Debug, Clone)]
enum Expect {
    System,
    History,
    Presence,
    Pong(Vec<u8>),
    Error(&'static [&'static str]),
    Message(String),
    /// The ack for the message just before it.
    Ack(String),
    /// A repeated requestId with the same text (same connection, so the same session): an ack
    /// with `duplicate:true`, the original id and seq, no message. With another text it is an
    /// error event `conflict` instead.
    Duplicate(String),
}

/// How the connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Terminal {
    /// The relay closes with this code, after everything queued before it.
    Relay(u16),
    /// We closed: the relay echoes `echo` (and may drop what was still queued); the metric counts
    /// `counted` (1005 when our close carried no code).
    Peer { echo: u16, counted: u16 },
}

impl Terminal {
    fn counted(self) -> u16 {
        match self {
            Terminal::Relay(c) => c,
            Terminal::Peer { counted, .. } => counted,
        }
    }
}

/// Close codes a client may send (RFC 6455 7.4: registered, or 3000–4999).
fn valid_peer_close_code(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// A complete client frame: fin, opcode, unmasked payload.
type ClientFrame = (bool, u8, Vec<u8>);

/// The protocol, applied to the exact bytes a client sends.
struct Model {
    max_payload: usize,
    history_limit: usize,
    /// Labels of generated text messages, by their exact (reassembled) bytes.
    labels: HashMap<Vec<u8>, Label>,
    /// Bytes of an incomplete frame.
    pending: Vec<u8>,
    /// A fragmented text message being reassembled.
    fragment: Option<Vec<u8>>,
    /// (requestId, text) of the messages the room's history still holds (oldest first). One
    /// connection per room, so all of them share one session.
    window: VecDeque<Option<(String, String)>>,
    terminal: Option<Terminal>,
    /// Text messages that reached the JSON stage (valid UTF-8).
    texts: u64,
    errors: u64,
}

impl Model {
    fn new(max_payload: usize, history_limit: usize) -> Model {
        Model {
            max_payload,
            history_limit,
            labels: HashMap::new(),
            pending: Vec::new(),
            fragment: None,
            window: VecDeque::new(),
            terminal: None,
            texts: 0,
            errors: 0,
        }
    }

    /// A new connection (labels and tallies carry over).
    fn reset_connection(&mut self) {
        self.pending.clear();
        self.fragment = None;
        self.window.clear();
        self.terminal = None;
    }

    fn at_frame_boundary(&self) -> bool {
        self.pending.is_empty()
    }

    /// Feed bytes as the relay would read them; returns what the relay must answer.
    fn feed(&mut self, bytes: &[u8]) -> Vec<Expect> {
        let mut out = Vec::new();
        if self.terminal.is_some() {
            return out;
        }
        self.pending.extend_from_slice(bytes);
        loop {
            match self.next_frame() {
                None => break,
                Some(Err(code)) => {
                    self.terminal = Some(Terminal::Relay(code));
                    break;
                }
                Some(Ok((fin, opcode, payload))) => {
                    if let Some(t) = self.frame(fin, opcode, payload, &mut out) {
                        self.terminal = Some(t);
                        break;
                    }
                }
            }
        }
        if self.terminal.is_some() {
            self.pending.clear();
        }
        out
    }

    /// Header checks (RFC 6455 5.2 as PROTOCOL.md lists them): reserved bits, opcode, mask,
    /// control frame rules → 1002; declared length over MAX_PAYLOAD_BYTES → 1009 from the header.
    fn next_frame(&mut self) -> Option<Result<ClientFrame, u16>> {
        let b = &self.pending;
        if b.len() < 2 {
            return None;
        }
        let fin = b[0] & 0x80 != 0;
        if b[0] & 0x70 != 0 {
            return Some(Err(1002));
        }
        let opcode = b[0] & 0x0F;
        if !matches!(opcode, 0x0 | 0x1 | 0x2 | 0x8 | 0x9 | 0xA) {
            return Some(Err(1002));
        }
        if b[1] & 0x80 == 0 {
            return Some(Err(1002));
        }
        let short = (b[1] & 0x7F) as u64;
        if opcode >= 0x8 && (!fin || short > 125) {
            return Some(Err(1002));
        }
        let (ext, len) = match short {
            126 => {
                if b.len() < 4 {
                    return None;
                }
                (2, u16::from_be_bytes([b[2], b[3]]) as u64)
            }
            127 => {
                if b.len() < 10 {
                    return None;
                }
                let len = u64::from_be_bytes(b[2..10].try_into().unwrap());
                if len >> 63 != 0 {
                    return Some(Err(1002));
                }
                (8, len)
            }
            n => (0, n),
        };
        if len > self.max_payload as u64 {
            return Some(Err(1009));
        }
        let header = 2 + ext + 4;
        let total = header + len as usize;
        if b.len() < total {
            return None;
        }
        let mask = [b[2 + ext], b[3 + ext], b[4 + ext], b[5 + ext]];
        let payload: Vec<u8> = b[header..total]
            .iter()
            .enumerate()
            .map(|(i, x)| x ^ mask[i % 4])
            .collect();
        self.pending.drain(..total);
        Some(Ok((fin, opcode, payload)))
    }

    fn frame(
        &mut self,
        fin: bool,
        opcode: u8,
        payload: Vec<u8>,
        out: &mut Vec<Expect>,
    ) -> Option<Terminal> {
        match opcode {
            OP_TEXT if self.fragment.is_some() => Some(Terminal::Relay(1002)),
            OP_TEXT if fin => self.text(&payload, out),
            OP_TEXT => {
                self.fragment = Some(payload);
                None
            }
            OP_BINARY => Some(Terminal::Relay(1003)),
            OP_CONTINUATION => {
                let Some(message) = self.fragment.as_mut() else {
                    return Some(Terminal::Relay(1002));
                };
                message.extend_from_slice(&payload);
                if message.len() > self.max_payload {
                    return Some(Terminal::Relay(1009));
                }
                if !fin {
                    return None;
                }
                let message = self.fragment.take().unwrap();
                self.text(&message, out)
            }
            OP_CLOSE => Some(match payload.len() {
                0 => Terminal::Peer {
                    echo: 1000,
                    counted: 1005,
                },
                1 => Terminal::Relay(1002),
                _ => {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    if !valid_peer_close_code(code) {
                        Terminal::Relay(1002)
                    } else if std::str::from_utf8(&payload[2..]).is_err() {
                        Terminal::Relay(1007)
                    } else {
                        Terminal::Peer {
                            echo: code,
                            counted: code,
                        }
                    }
                }
            }),
            OP_PING => {
                out.push(Expect::Pong(payload));
                None
            }
            _ => None, // pong
        }
    }

    fn text(&mut self, payload: &[u8], out: &mut Vec<Expect>) -> Option<Terminal> {
        if std::str::from_utf8(payload).is_err() {
            return Some(Terminal::Relay(1007));
        }
        self.texts += 1;
        match self.labels.get(payload).cloned() {
            Some(Label::Publish { text, request_id }) => {
                let original = request_id.as_ref().and_then(|r| {
                    self.window
                        .iter()
                        .flatten()
                        .find(|(rid, _)| rid == r)
                        .map(|(_, t)| t.clone())
                });
                match (original, request_id.clone()) {
                    (Some(t), Some(r)) if t == text => {
                        out.push(Expect::Duplicate(r));
                        return None;
                    }
                    (Some(_), Some(_)) => {
                        self.errors += 1;
                        out.push(Expect::Error(CONFLICT));
                        return None;
                    }
                    _ => {}
                }
                out.push(Expect::Message(text.clone()));
                if let Some(r) = &request_id {
                    out.push(Expect::Ack(r.clone()));
                }
                self.window.push_back(request_id.map(|r| (r, text)));
                while self.window.len() > self.history_limit {
                    self.window.pop_front();
                }
            }
            Some(Label::Error(codes)) => {
                self.errors += 1;
                out.push(Expect::Error(codes));
            }
            None => {
                // Bytes we did not construct (random garbage): some error event.
                self.errors += 1;
                out.push(Expect::Error(ANY_ERROR));
            }
        }
        None
    }
}

/// What the verifier saw so far on one connection (to check acks against messages).
#[derive(Default)]
struct Seen {
    last_message: Option<(String, u64)>,
    acks: HashMap<String, (String, u64)>,
}

fn check_one(f: &Frame, e: &Expect, wire: &Wire, seen: &mut Seen, ctx: &str) {
    if let Expect::Pong(p) = e {
        assert_eq!(f.opcode, OP_PONG, "{ctx}: expected a pong, got {f:?}");
        assert_eq!(&f.payload, p, "{ctx}: pong must echo the ping's payload");
        return;
    }
    assert_eq!(
        f.opcode,
        OP_TEXT,
        "{ctx}: expected {e:?}, got opcode {:#x} payload {:?}",
        f.opcode,
        String::from_utf8_lossy(&f.payload)
    );
    let v = f.json();
    match e {
        Expect::System => {
            assert_eq!(v["type"], "system", "{ctx}: {v}");
            assert_eq!(
                v["message"],
                format!("connected as {}", wire.name),
                "{ctx}: {v}"
            );
        }
        Expect::History => {
            assert_eq!(v["type"], "history", "{ctx}: {v}");
            assert_eq!(v["room"], wire.room.as_str(), "{ctx}: {v}");
            assert_eq!(v["complete"], true, "{ctx}: {v}");
            assert!(v["messages"].is_array(), "{ctx}: {v}");
        }
        Expect::Presence => {
            assert_eq!(v["type"], "presence", "{ctx}: {v}");
            assert_eq!(v["message"], format!("{} joined", wire.name), "{ctx}: {v}");
        }
        Expect::Error(codes) => {
            assert_eq!(
                v["type"], "error",
                "{ctx}: expected an error in {codes:?}, got {v}"
            );
            let code = v["code"].as_str().unwrap_or("");
            assert!(
                codes.contains(&code),
                "{ctx}: expected an error code in {codes:?}, got {v}"
            );
            assert!(
                v["message"].as_str().is_some_and(|m| !m.is_empty()),
                "{ctx}: an error event carries a human message: {v}"
            );
        }
        Expect::Message(text) => {
            assert_eq!(
                v["type"], "message",
                "{ctx}: expected message {text:?}, got {v}"
            );
            let m = &v["message"];
            assert_eq!(m["text"].as_str(), Some(text.as_str()), "{ctx}: {v}");
            assert_eq!(
                m["from"],
                wire.name.as_str(),
                "{ctx}: from comes from the connection: {v}"
            );
            assert_eq!(
                m["room"],
                wire.room.as_str(),
                "{ctx}: room comes from the connection: {v}"
            );
            let id = m["id"].as_str().unwrap_or_else(|| panic!("{ctx}: id: {v}"));
            let seq = m["seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("{ctx}: seq: {v}"));
            if let Some((_, last)) = &seen.last_message {
                assert_eq!(seq, last + 1, "{ctx}: seq increases by one per room: {v}");
            }
            seen.last_message = Some((id.to_string(), seq));
        }
        Expect::Ack(rid) => {
            assert_eq!(v["type"], "ack", "{ctx}: expected ack for {rid:?}, got {v}");
            assert_eq!(v["requestId"].as_str(), Some(rid.as_str()), "{ctx}: {v}");
            assert!(
                v.get("duplicate").is_none(),
                "{ctx}: first ack is not a duplicate: {v}"
            );
            let (id, seq) = seen
                .last_message
                .clone()
                .expect("an ack follows its message");
            assert_eq!(
                v["id"].as_str(),
                Some(id.as_str()),
                "{ctx}: ack id = message id: {v}"
            );
            assert_eq!(
                v["seq"].as_u64(),
                Some(seq),
                "{ctx}: ack seq = message seq: {v}"
            );
            seen.acks.insert(rid.clone(), (id, seq));
        }
        Expect::Duplicate(rid) => {
            assert_eq!(
                v["type"], "ack",
                "{ctx}: expected a duplicate ack for {rid:?}, got {v}"
            );
            assert_eq!(v["requestId"].as_str(), Some(rid.as_str()), "{ctx}: {v}");
            assert_eq!(v["duplicate"], true, "{ctx}: {v}");
            let (id, seq) = seen.acks.get(rid).cloned().expect("original ack seen");
            assert_eq!(
                v["id"].as_str(),
                Some(id.as_str()),
                "{ctx}: original id: {v}"
            );
            assert_eq!(v["seq"].as_u64(), Some(seq), "{ctx}: original seq: {v}");
        }
        Expect::Pong(_) => unreachable!(),
    }
}

/// Read exactly what the model predicted: `expected` in order, then the close (if any) and the
/// end of the stream, or else the pong for `probe`.
async fn verify(
    wire: &mut Wire,
    expected: &[Expect],
    terminal: Option<Terminal>,
    probe: Option<&[u8]>,
    seen: &mut Seen,
    ctx: &str,
) {
    // A pong still queued when a later ping arrives is replaced by that ping's pong (RFC 6455
    // 5.5.3; PROTOCOL.md): an expected pong may be skipped when a later pong is expected too
    // (the probe is a ping sent right behind the batch).
    let mut carried: Option<Frame> = None;
    for (i, e) in expected.iter().enumerate() {
        if let Expect::Pong(p) = e {
            let later_pong = probe.is_some()
                || expected[i + 1..]
                    .iter()
                    .any(|e| matches!(e, Expect::Pong(_)));
            if later_pong {
                if carried.is_none() {
                    carried = Some(wire.next_frame(EVENT_TIMEOUT).await.unwrap_or_else(|end| {
                        panic!(
                            "{ctx}: expected {e:?} (answer {} of {}), got {end:?}",
                            i + 1,
                            expected.len()
                        )
                    }));
                }
                let f = carried.as_ref().expect("just read");
                if !(f.opcode == OP_PONG && &f.payload == p) {
                    continue; // replaced by a later ping's pong, which comes further on
                }
            }
        }
        let f = match carried.take() {
            Some(f) => Ok(f),
            None => wire.next_frame(EVENT_TIMEOUT).await,
        };
        let f = f.unwrap_or_else(|end| {
            panic!(
                "{ctx}: expected {e:?} (answer {} of {}), got {end:?}",
                i + 1,
                expected.len()
            )
        });
        if f.opcode == OP_CLOSE {
            if let Some(Terminal::Peer { echo, .. }) = terminal {
                // Our close may overtake what was still queued (PROTOCOL.md: echo of the client's
                // close, sent as soon as practical).
                assert_eq!(f.close_code(), Some(echo), "{ctx}: close echo");
                wire.expect_eof(ctx).await;
                return;
            }
            panic!(
                "{ctx}: expected {e:?} (answer {} of {}), got close {:?} {:?}",
                i + 1,
                expected.len(),
                f.close_code(),
                String::from_utf8_lossy(&f.payload)
            );
        }
        check_one(&f, e, wire, seen, ctx);
    }
    match terminal {
        Some(t) => {
            let code = match t {
                Terminal::Relay(c) => c,
                Terminal::Peer { echo, .. } => echo,
            };
            let f = match carried.take() {
                Some(f) => Ok(f),
                None => wire.next_frame(EVENT_TIMEOUT).await,
            };
            let f = f.unwrap_or_else(|end| panic!("{ctx}: expected close {code}, got {end:?}"));
            assert_eq!(
                f.opcode,
                OP_CLOSE,
                "{ctx}: expected close {code}, got {f:?} {:?}",
                String::from_utf8_lossy(&f.payload)
            );
            assert_eq!(
                f.close_code(),
                Some(code),
                "{ctx}: close code (reason {:?})",
                String::from_utf8_lossy(f.payload.get(2..).unwrap_or(&[]))
            );
            wire.expect_eof(ctx).await;
        }
        None => {
            if let Some(p) = probe {
                let f = match carried.take() {
                    Some(f) => Ok(f),
                    None => wire.next_frame(EVENT_TIMEOUT).await,
                };
                let f =
                    f.unwrap_or_else(|end| panic!("{ctx}: expected the probe's pong, got {end:?}"));
                assert!(
                    f.opcode == OP_PONG && f.payload == p,
                    "{ctx}: expected the probe's pong, got {f:?} {:?}",
                    String::from_utf8_lossy(&f.payload)
                );
            }
        }
    }
}

// =============================================================================================
// Generators
// =============================================================================================

/// Characters JSON must or may escape, every UTF-8 length, marks, joiners, astral planes.
const TEXT_CHARS: &[char] = &[
    '"',
    '\\',
    '/',
    '<',
    '>',
    '&',
    '\'',
    '{',
    '}',
    '[',
    ']',
    ':',
    ',',
    '\u{0}',
    '\u{1}',
    '\u{8}',
    '\u{1F}',
    '\u{7F}',
    'é',
    'ß',
    'Ω',
    '中',
    '文',
    '\u{301}',
    '\u{200B}',
    '\u{200D}',
    '\u{E000}',
    '\u{FFFD}',
    '\u{FFFF}',
    '😀',
    '🏳',
    '\u{10FFFF}',
    '\u{2028}',
    ' ',
    '\t',
    '\n',
];
/// Whitespace that "trimmed" removes (Unicode White_Space).
const WS_CHARS: &[char] = &[
    ' ', '\t', '\n', '\r', '\u{B}', '\u{C}', '\u{A0}', '\u{1680}', '\u{2000}', '\u{200A}',
    '\u{2028}', '\u{2029}', '\u{202F}', '\u{205F}', '\u{3000}',
];

#[derive(Debug, Clone, Copy)]
struct GenConfig {
    max_payload: usize,
    max_text_chars: usize,
    /// Longest generated text, in characters (before trimming).
    text_chars: usize,
    /// Deep nesting, long padding: big payloads.
    big: bool,
    /// Percent of frames that break the protocol (and end the connection).
    violations: usize,
}

fn gen_text(rng: &mut Rng, n: usize) -> String {
    (0..n)
        .map(|_| {
            if rng.chance(60) {
                rng.pick(&['a', 'b', 'Z', 'q', '0', '7', ' ', '.', '-', '!'])
            } else {
                rng.pick(TEXT_CHARS)
            }
        })
        .collect()
}

fn gen_ws(rng: &mut Rng) -> &'static str {
    if rng.chance(80) {
        ""
    } else {
        rng.pick(&[" ", "\t", "\n", "\r\n", "  "])
    }
}

fn push_u_escape(rng: &mut Rng, out: &mut String, c: char) {
    let mut units = [0u16; 2];
    for unit in c.encode_utf16(&mut units) {
        if rng.chance(50) {
            let _ = write!(out, "\\u{unit:04x}");
        } else {
            let _ = write!(out, "\\u{unit:04X}");
        }
    }
}

/// A JSON string literal for `s`, escaping what must be escaped and randomly more.
fn enc_str(rng: &mut Rng, s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' if rng.chance(50) => out.push_str("\\n"),
            '\t' if rng.chance(50) => out.push_str("\\t"),
            '\r' if rng.chance(50) => out.push_str("\\r"),
            '\u{8}' if rng.chance(50) => out.push_str("\\b"),
            '\u{C}' if rng.chance(50) => out.push_str("\\f"),
            c if (c as u32) < 0x20 => push_u_escape(rng, &mut out, c),
            '/' if rng.chance(30) => out.push_str("\\/"),
            c if rng.chance(12) => push_u_escape(rng, &mut out, c),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// A JSON value the relay must ignore (an unknown field's value).
fn gen_noise(rng: &mut Rng, cfg: &GenConfig, depth: usize) -> String {
    match rng.below(if depth > 2 { 4 } else { 7 }) {
        0 => rng
            .pick(&[
                "0",
                "-0",
                "1e999999",
                "-1E-99999",
                "123456789012345678901234567890123456789",
                "1.7976931348623157e309",
                "-9223372036854775809",
                "18446744073709551616",
                "0.0000000000000000000000000001",
                "1E+2",
            ])
            .to_string(),
        1 => {
            let n = rng.below(12);
            let body = gen_text(rng, n);
            let mut s = enc_str(rng, &body);
            if rng.chance(40) {
                // Lone surrogates and NUL escapes are fine where nobody reads them.
                let bad = rng.pick(&[
                    "\\ud800",
                    "\\udfff",
                    "\\ud800\\ud800",
                    "\\u0000",
                    "\\udc00x",
                ]);
                s.insert_str(1, bad);
            }
            s
        }
        2 => rng.pick(&["true", "false", "null", "[]", "{}"]).to_string(),
        3 if cfg.big && rng.chance(30) => {
            let budget = (cfg.max_payload.saturating_sub(600)) / 2;
            let depth = rng.range(100, 10_000).min(budget.max(1));
            let (open, close) = if rng.chance(50) {
                ("[", "]")
            } else {
                ("{\"a\":", "}")
            };
            let depth = if open.len() > 1 { depth / 6 } else { depth };
            let mut s = open.repeat(depth);
            s.push('0');
            s.push_str(&close.repeat(depth));
            s
        }
        3 => format!("{}0{}", "[".repeat(32), "]".repeat(32)),
        4 | 5 => {
            let n = rng.below(4);
            let items: Vec<String> = (0..n).map(|_| gen_noise(rng, cfg, depth + 1)).collect();
            format!("[{}]", items.join(","))
        }
        _ => {
            let n = rng.below(4);
            let items: Vec<String> = (0..n)
                .map(|_| {
                    let key = rng.pick(&["k", "a", "", "type", "text"]);
                    let key = enc_str(rng, key);
                    format!("{key}:{}", gen_noise(rng, cfg, depth + 1))
                })
                .collect();
            format!("{{{}}}", items.join(","))
        }
    }
}

/// An object from already-encoded `(key, value)` members, in random order and spacing.
fn object(rng: &mut Rng, mut members: Vec<(String, String)>) -> String {
    for i in (1..members.len()).rev() {
        let j = rng.below(i + 1);
        members.swap(i, j);
    }
    let mut s = String::from("{");
    s.push_str(gen_ws(rng));
    for (i, (k, v)) in members.iter().enumerate() {
        if i > 0 {
            s.push_str(gen_ws(rng));
            s.push(',');
            s.push_str(gen_ws(rng));
        }
        s.push_str(k);
        s.push_str(gen_ws(rng));
        s.push(':');
        s.push_str(gen_ws(rng));
        s.push_str(v);
    }
    s.push_str(gen_ws(rng));
    s.push('}');
    s
}

/// Unknown members (the relay must ignore them, including `from` and `room`).
fn noise_members(rng: &mut Rng, cfg: &GenConfig) -> Vec<(String, String)> {
    let n = if rng.chance(50) { 0 } else { rng.range(1, 3) };
    (0..n)
        .map(|_| {
            let key = rng.pick(&[
                "from",
                "room",
                "id",
                "seq",
                "x",
                "__proto__",
                "Type",
                "TEXT",
                "requestid",
                "",
            ]);
            let key = enc_str(rng, key);
            (key, gen_noise(rng, cfg, 0))
        })
        .collect()
}

struct JsonGen {
    /// requestIds used so far (repeats exercise de-duplication).
    rids: Vec<String>,
    tag: String,
}

impl JsonGen {
    fn new(tag: String) -> JsonGen {
        JsonGen {
            rids: Vec::new(),
            tag,
        }
    }

    fn rid(&mut self, rng: &mut Rng) -> String {
        if !self.rids.is_empty() && rng.chance(15) {
            return rng.pick(&self.rids);
        }
        let mut r = format!("{}-{}", self.tag, self.rids.len());
        if rng.chance(30) {
            let n = rng.below(8);
            r.push_str(&gen_text(rng, n).replace('\u{0}', "0"));
        }
        let r: String = r.chars().take(64).collect();
        self.rids.push(r.clone());
        r
    }

    /// A valid `{"type":"message",...}` with the given raw text and request id; the label
    /// follows PROTOCOL.md: requestId (1–64 chars) → text missing/blank → too long.
    fn message(
        &mut self,
        rng: &mut Rng,
        cfg: &GenConfig,
        raw_text: Option<&str>,
        rid: Option<&str>,
    ) -> (String, Label) {
        let mut members = vec![(enc_str(rng, "type"), enc_str(rng, "message"))];
        if let Some(t) = raw_text {
            members.push((enc_str(rng, "text"), enc_str(rng, t)));
        }
        if let Some(r) = rid {
            members.push((enc_str(rng, "requestId"), enc_str(rng, r)));
        }
        members.extend(noise_members(rng, cfg));
        let json = object(rng, members);
        let label = match (raw_text, rid) {
            (_, Some(r)) if r.is_empty() || r.chars().count() > 64 => Label::Error(BAD_TYPE),
            (None, _) => Label::Error(EMPTY),
            (Some(t), _) if t.trim().is_empty() => Label::Error(EMPTY),
            (Some(t), _) if t.trim().chars().count() > cfg.max_text_chars => {
                Label::Error(TOO_LARGE)
            }
            (Some(t), r) => Label::Publish {
                text: t.trim().to_string(),
                request_id: r.map(str::to_string),
            },
        };
        (json, label)
    }

    fn valid_text(&mut self, rng: &mut Rng, cfg: &GenConfig) -> String {
        let n = rng.range(1, cfg.text_chars);
        let mut t = String::new();
        if rng.chance(20) {
            t.push(rng.pick(WS_CHARS));
        }
        t.push_str(&gen_text(rng, n));
        if rng.chance(20) {
            t.push(rng.pick(WS_CHARS));
        }
        t
    }

    /// One text payload and what it must get.
    fn payload(&mut self, rng: &mut Rng, cfg: &GenConfig) -> (Vec<u8>, Label) {
        let (json, label) = match rng.below(100) {
            0..=44 => {
                let text = self.valid_text(rng, cfg);
                let rid = rng.chance(40).then(|| self.rid(rng));
                self.message(rng, cfg, Some(&text), rid.as_deref())
            }
            45..=50 => {
                // Truncated: any proper prefix of an object is not JSON.
                let text = self.valid_text(rng, cfg);
                let (json, _) = self.message(rng, cfg, Some(&text), None);
                let cuts: Vec<usize> = json
                    .char_indices()
                    .map(|(i, _)| i)
                    .filter(|&i| i < json.len() - 1)
                    .collect();
                let cut = rng.pick(&cuts);
                (json[..cut].to_string(), Label::Error(BAD_JSON))
            }
            51..=54 => {
                let (json, _) = self.message(rng, cfg, Some("x"), None);
                let tail = rng.pick(&[" x", "}", "{}", ",", " \"a\"", "\u{0}", " 1"]);
                (format!("{json}{tail}"), Label::Error(BAD_JSON))
            }
            55..=60 => {
                let v = match rng.below(6) {
                    0 => gen_noise(rng, cfg, 0),
                    1 => enc_str(rng, "message"),
                    2 => "[\"message\",\"hi\"]".to_string(),
                    3 => "null".to_string(),
                    4 => {
                        let d = rng.range(1, 300);
                        format!("{}{}", "[".repeat(d), "]".repeat(d))
                    }
                    _ => "123456789012345678901234567890e99999".to_string(),
                };
                // Any JSON that is not a message object is bad_type (a noise object has no
                // "type":"message"); what is not JSON at all is bad_json.
                if serde_json::from_str::<serde::de::IgnoredAny>(&v).is_ok() {
                    (
                        format!("{}{v}{}", gen_ws(rng), gen_ws(rng)),
                        Label::Error(BAD_TYPE),
                    )
                } else {
                    (v, Label::Error(BAD_JSON))
                }
            }
            61..=63 => {
                let depth = if cfg.big {
                    rng.range(1, 10_000.min(cfg.max_payload - 10))
                } else {
                    rng.range(1, 60)
                };
                let unit = rng.pick(&["[", "{", "{\"a\":", "[1,"]);
                let reps = (depth / unit.len()).max(1);
                (unit.repeat(reps), Label::Error(BAD_JSON))
            }
            64..=69 => {
                let ty = match rng.below(9) {
                    0 => "1".to_string(),
                    1 => "null".to_string(),
                    2 => "[\"message\"]".to_string(),
                    3 => "{\"message\":1}".to_string(),
                    4 => "true".to_string(),
                    _ => {
                        let s = rng.pick(&[
                            "Message",
                            "message ",
                            " message",
                            "",
                            "messages",
                            "chat",
                            "message\u{0}",
                        ]);
                        enc_str(rng, s)
                    }
                };
                let mut members = vec![(enc_str(rng, "text"), enc_str(rng, "hi"))];
                if !rng.chance(20) {
                    members.push((enc_str(rng, "type"), ty));
                }
                members.extend(noise_members(rng, cfg));
                (object(rng, members), Label::Error(BAD_TYPE))
            }
            70..=73 => {
                let v = rng.pick(&["1", "null", "true", "[\"a\"]", "{\"a\":1}", "-0.5e3", "[]"]);
                let members = vec![
                    (enc_str(rng, "type"), enc_str(rng, "message")),
                    (enc_str(rng, "text"), v.to_string()),
                ];
                (object(rng, members), Label::Error(BAD_TYPE))
            }
            74..=77 => {
                let blank: String = (0..rng.below(6)).map(|_| rng.pick(WS_CHARS)).collect();
                let text = if rng.chance(30) { None } else { Some(blank) };
                self.message(rng, cfg, text.as_deref(), None)
            }
            78..=80 => {
                let n = cfg.max_text_chars + rng.range(1, 20);
                let text: String = (0..n)
                    .map(|_| rng.pick(&['a', 'é', '中', '😀', '\u{0}']))
                    .collect();
                self.message(rng, cfg, Some(&text), None)
            }
            81..=83 => {
                let key = rng.pick(&["type", "text", "requestId"]);
                let mut members = vec![
                    (enc_str(rng, "type"), enc_str(rng, "message")),
                    (enc_str(rng, "text"), enc_str(rng, "dup")),
                ];
                let value = match key {
                    "type" => enc_str(rng, "message"),
                    "text" => enc_str(rng, "again"),
                    _ => enc_str(rng, "r"),
                };
                if key == "requestId" {
                    members.push((enc_str(rng, "requestId"), enc_str(rng, "r")));
                }
                members.push((enc_str(rng, key), value));
                (object(rng, members), Label::Error(BAD_JSON_OR_TYPE))
            }
            84..=86 => {
                let lone = rng.pick(&[
                    "\\ud800",
                    "\\udfff",
                    "a\\udc00b",
                    "\\ud800\\ud800",
                    "\\ud83d x",
                ]);
                let at = rng.pick(&["type", "text", "requestId"]);
                let mut members = vec![
                    (
                        enc_str(rng, "type"),
                        if at == "type" {
                            format!("\"{lone}message\"")
                        } else {
                            enc_str(rng, "message")
                        },
                    ),
                    (
                        enc_str(rng, "text"),
                        if at == "text" {
                            format!("\"{lone}\"")
                        } else {
                            enc_str(rng, "t")
                        },
                    ),
                ];
                if at == "requestId" {
                    members.push((enc_str(rng, "requestId"), format!("\"{lone}\"")));
                }
                (object(rng, members), Label::Error(BAD_JSON_OR_TYPE))
            }
            87..=90 => {
                // Raw control characters (NUL included) inside a string, or between tokens.
                let c = rng.pick(&['\u{0}', '\u{1}', '\u{1F}', '\n', '\u{B}']);
                let json = if rng.chance(60) || c == '\n' {
                    format!("{{\"type\":\"message\",\"text\":\"a{c}b\"}}")
                } else {
                    format!("{{\"type\":\"message\",{c}\"text\":\"ab\"}}")
                };
                (json, Label::Error(BAD_JSON))
            }
            91..=93 => {
                let esc = rng.pick(&["\\x41", "\\u12", "\\uZZZZ", "\\", "\\U0041", "\\'"]);
                (
                    format!("{{\"type\":\"message\",\"text\":\"{esc}\"}}"),
                    Label::Error(BAD_JSON),
                )
            }
            94..=96 => {
                let pre = rng.pick(&["\u{FEFF}", "\u{A0}", "\u{2028}", "\u{3000}", "x"]);
                (
                    format!("{pre}{{\"type\":\"message\",\"text\":\"hi\"}}"),
                    Label::Error(BAD_JSON),
                )
            }
            _ => {
                // Invalid or missing requestId.
                let v = rng.pick(&["7", "null", "\"\"", "[]", "{}", "true"]);
                let v = if rng.chance(30) {
                    enc_str(rng, &"r".repeat(65))
                } else {
                    v.to_string()
                };
                let members = vec![
                    (enc_str(rng, "type"), enc_str(rng, "message")),
                    (enc_str(rng, "text"), enc_str(rng, "hi")),
                    (enc_str(rng, "requestId"), v),
                ];
                (object(rng, members), Label::Error(BAD_TYPE))
            }
        };
        (json.into_bytes(), label)
    }
}

/// Bytes that are not UTF-8, in every way a decoder must reject.
fn invalid_utf8(rng: &mut Rng) -> Vec<u8> {
    let bad: &[&[u8]] = &[
        &[0xFF],
        &[0xFE, 0xFF],
        &[0xC0, 0x80],             // overlong NUL
        &[0xE0, 0x80, 0x80],       // overlong
        &[0xED, 0xA0, 0x80],       // UTF-16 surrogate as UTF-8
        &[0xF4, 0x90, 0x80, 0x80], // above U+10FFFF
        &[0xE2, 0x82],             // truncated
        &[0x80],                   // lone continuation
        &[0xF8, 0x88, 0x80, 0x80, 0x80],
    ];
    let mut out = br#"{"type":"message","text":"ok "#.to_vec();
    let at = rng.below(out.len() + 1);
    let b = rng.pick(bad);
    let mut v = out.split_off(at);
    out.extend_from_slice(b);
    out.append(&mut v);
    out.extend_from_slice(b"\"}");
    out
}

/// Frames, one step at a time, for one connection.
struct FrameGen {
    cfg: GenConfig,
    json: JsonGen,
    /// Continuation frames of a fragmented message not sent yet.
    fragments: VecDeque<Vec<u8>>,
}

fn frame_bytes(rng: &mut Rng, fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    build_frame(fin, 0, opcode, Some(rng.mask()), payload, None)
}

impl FrameGen {
    fn new(cfg: GenConfig, tag: String) -> FrameGen {
        FrameGen {
            cfg,
            json: JsonGen::new(tag),
            fragments: VecDeque::new(),
        }
    }

    /// A labelled text payload (the label goes into the model).
    fn text_payload(&mut self, rng: &mut Rng, model: &mut Model) -> Vec<u8> {
        let (payload, label) = self.json.payload(rng, &self.cfg);
        model.labels.entry(payload.clone()).or_insert(label);
        payload
    }

    /// Split `payload` into a fragmented message: the first frame is returned, the rest queued.
    fn fragment(&mut self, rng: &mut Rng, payload: &[u8]) -> Vec<u8> {
        let pieces = rng.range(2, 5);
        let mut cuts: Vec<usize> = (0..pieces - 1)
            .map(|_| rng.below(payload.len() + 1))
            .collect();
        cuts.sort_unstable();
        let mut bounds = vec![0];
        bounds.extend(cuts);
        bounds.push(payload.len());
        let mut frames: Vec<Vec<u8>> = bounds
            .windows(2)
            .enumerate()
            .map(|(i, w)| {
                let last = i == pieces - 1;
                let op = if i == 0 { OP_TEXT } else { OP_CONTINUATION };
                frame_bytes(rng, last, op, &payload[w[0]..w[1]])
            })
            .collect();
        let first = frames.remove(0);
        self.fragments.extend(frames);
        first
    }

    /// The bytes of one step: usually one frame, sometimes a fragment of a message.
    fn step(&mut self, rng: &mut Rng, model: &mut Model) -> Vec<u8> {
        if !self.fragments.is_empty() && rng.chance(60) {
            return self.fragments.pop_front().unwrap();
        }
        let fragment_open = !self.fragments.is_empty() || model.fragment.is_some();
        if rng.chance(self.cfg.violations) {
            return self.violation(rng, model);
        }
        match rng.below(100) {
            _ if fragment_open && (self.cfg.violations == 0 || rng.chance(70)) => {
                // Only control frames may come between fragments.
                let n = rng.below(126);
                let payload = rng.bytes(n);
                let op = if rng.chance(80) { OP_PING } else { OP_PONG };
                frame_bytes(rng, true, op, &payload)
            }
            _ if fragment_open && self.cfg.violations > 0 => {
                let mut payload = b"bye".to_vec();
                if rng.chance(50) {
                    payload = 1000u16.to_be_bytes().to_vec();
                }
                frame_bytes(rng, true, OP_CLOSE, &payload)
            }
            0..=57 => {
                let payload = self.text_payload(rng, model);
                frame_bytes(rng, true, OP_TEXT, &payload)
            }
            58..=67 => {
                let payload = self.text_payload(rng, model);
                self.fragment(rng, &payload)
            }
            68..=84 => {
                let n = if rng.chance(50) {
                    rng.below(126)
                } else {
                    rng.below(8)
                };
                let payload = rng.bytes(n);
                frame_bytes(rng, true, OP_PING, &payload)
            }
            85..=89 => {
                let n = rng.below(126);
                let payload = rng.bytes(n);
                frame_bytes(rng, true, OP_PONG, &payload)
            }
            90..=95 => {
                // Valid UTF-8 garbage: some error event.
                let n = rng.below(40);
                let text = gen_text(rng, n);
                frame_bytes(rng, true, OP_TEXT, text.as_bytes())
            }
            _ => frame_bytes(rng, true, OP_TEXT, b""),
        }
    }

    /// A frame that ends the connection (or opens a fragment the next frames may break).
    fn violation(&mut self, rng: &mut Rng, model: &mut Model) -> Vec<u8> {
        let max = self.cfg.max_payload;
        match rng.below(13) {
            0 => {
                // Close frames of every shape: empty, one byte, valid and invalid codes, bad UTF-8.
                let payload = match rng.below(5) {
                    0 => Vec::new(),
                    1 => vec![0x03],
                    2 => {
                        let code = rng.pick(&[
                            1000u16, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013,
                            1014, 3000, 3999, 4000, 4999,
                        ]);
                        let mut p = code.to_be_bytes().to_vec();
                        let n = rng.below(20);
                        p.extend_from_slice(gen_text(rng, n).as_bytes());
                        p.truncate(125);
                        while std::str::from_utf8(&p[2..]).is_err() {
                            p.pop();
                        }
                        p
                    }
                    3 => {
                        let code = rng.pick(&[
                            0u16, 999, 1004, 1005, 1006, 1015, 1016, 2000, 2999, 5000, 65535,
                        ]);
                        code.to_be_bytes().to_vec()
                    }
                    _ => {
                        let mut p = 1000u16.to_be_bytes().to_vec();
                        p.extend_from_slice(&[b'a', 0xFF, 0xFE]);
                        p
                    }
                };
                frame_bytes(rng, true, OP_CLOSE, &payload)
            }
            1 => {
                let n = rng.below(200);
                let payload = rng.bytes(n);
                let fin = rng.chance(80);
                frame_bytes(rng, fin, OP_BINARY, &payload)
            }
            2 => {
                let n = rng.below(50);
                let payload = rng.bytes(n);
                let fin = rng.chance(50);
                frame_bytes(rng, fin, OP_CONTINUATION, &payload)
            }
            3 => {
                let payload = invalid_utf8(rng);
                if rng.chance(30) {
                    self.fragment(rng, &payload)
                } else {
                    frame_bytes(rng, true, OP_TEXT, &payload)
                }
            }
            4 => {
                let op = rng.pick(&[0x3u8, 0x4, 0x5, 0x6, 0x7, 0xB, 0xC, 0xD, 0xE, 0xF]);
                let n = rng.below(10);
                let payload = rng.bytes(n);
                frame_bytes(rng, true, op, &payload)
            }
            5 => {
                let rsv = rng.range(1, 7) as u8;
                build_frame(true, rsv, OP_TEXT, Some(rng.mask()), b"{}", None)
            }
            6 => {
                let op = rng.pick(&[OP_TEXT, OP_PING, OP_CLOSE, OP_BINARY]);
                build_frame(true, 0, op, None, b"unmasked", None)
            }
            7 => {
                // Control frames: fragmented, or longer than 125 bytes.
                let op = rng.pick(&[OP_PING, OP_PONG, OP_CLOSE]);
                if rng.chance(50) {
                    frame_bytes(rng, false, op, b"x")
                } else {
                    let n = rng.range(126, 300);
                    let payload = rng.bytes(n);
                    frame_bytes(rng, true, op, &payload)
                }
            }
            8 => {
                // Declared length over the limit: only the header is sent.
                let len = match rng.below(4) {
                    0 => max as u64 + 1,
                    1 => rng.range(max + 1, 65_535) as u64,
                    2 => 1u64 << rng.range(17, 62),
                    _ => (1u64 << 63) | rng.next_u64() >> 1, // MSB set: 1002
                };
                let op = rng.pick(&[OP_TEXT, OP_BINARY, OP_CONTINUATION]);
                build_frame(true, 0, op, Some(rng.mask()), &[], Some(len))
            }
            9 if self.cfg.big => {
                // A fragmented message that grows past the limit.
                let first = rng.range(max / 2, max);
                let mut out = frame_bytes(rng, false, OP_TEXT, &vec![b'a'; first]);
                let fin = rng.chance(50);
                out.extend(frame_bytes(
                    rng,
                    fin,
                    OP_CONTINUATION,
                    &vec![b'b'; max - first + 1],
                ));
                out
            }
            10 => {
                // A new text message while a fragmented one is open (or the start of one).
                let payload = self.text_payload(rng, model);
                let mut out = frame_bytes(rng, false, OP_TEXT, &payload);
                if rng.chance(50) {
                    out.extend(frame_bytes(rng, true, OP_TEXT, b"{}"));
                }
                out
            }
            11 => {
                let len = rng.below(64);
                rng.bytes(len)
            }
            _ => {
                // A well-formed header in front of random bytes.
                let mut out = vec![0x81, 0x80 | rng.below(126) as u8];
                let n = 4 + rng.below(40);
                out.extend(rng.bytes(n));
                out
            }
        }
    }
}

/// A ping with a unique payload: its pong proves every earlier frame was answered.
fn probe(n: u64) -> Vec<u8> {
    format!("probe-{n}").into_bytes()
}

/// Run one connection of seeded frames against the model, batch by batch.
#[allow(clippy::too_many_arguments)]
async fn fuzz_connection(
    relay: &Relay,
    model: &mut Model,
    closes: &mut HashMap<String, f64>,
    cfg: GenConfig,
    seed: u64,
    batches: usize,
    mode: WriteMode,
    early: bool,
    test: &str,
) {
    let mut rng = Rng::new(seed);
    let name = format!("fz{seed}");
    let room = unique(&format!("{test}-"));
    let mut gen = FrameGen::new(cfg, format!("s{seed}"));
    model.reset_connection();
    let mut seen = Seen::default();

    let first_batch = |rng: &mut Rng, gen: &mut FrameGen, model: &mut Model| {
        let n = rng.range(1, 4);
        let mut bytes = Vec::new();
        for _ in 0..n {
            bytes.extend(gen.step(rng, model));
        }
        bytes
    };

    let mut pending_early = Vec::new();
    let mut expected = vec![Expect::System, Expect::History, Expect::Presence];
    if early {
        pending_early = first_batch(&mut rng, &mut gen, model);
        expected.extend(model.feed(&pending_early));
    }
    let mut wire = Wire::open(relay, &name, &room, &pending_early).await;
    let ctx0 = format!("[{test} seed {seed} early batch {}]", hex(&pending_early));
    let terminal = model.terminal;
    verify(&mut wire, &expected, terminal, None, &mut seen, &ctx0).await;
    if let Some(t) = terminal {
        *closes.entry(close_label(t.counted())).or_default() += 1.0;
        return;
    }

    for batch in 0..batches {
        let mut bytes = first_batch(&mut rng, &mut gen, model);
        let expected = model.feed(&bytes);
        let terminal = model.terminal;
        let probe_payload = probe(seed * 1000 + batch as u64);
        let probing = terminal.is_none() && model.at_frame_boundary();
        if probing {
            bytes.extend(frame_bytes(&mut rng, true, OP_PING, &probe_payload));
        }
        let ctx = format!(
            "[{test} seed {seed} batch {batch} mode {mode:?}: sent {}]",
            hex(&bytes)
        );
        // A write may fail once the relay has closed on an earlier frame of this batch.
        let _ = wire.send(&bytes, mode).await;
        verify(
            &mut wire,
            &expected,
            terminal,
            probing.then_some(&probe_payload[..]),
            &mut seen,
            &ctx,
        )
        .await;
        if let Some(t) = terminal {
            *closes.entry(close_label(t.counted())).or_default() += 1.0;
            return;
        }
        if !probing {
            // Mid-frame: nothing may arrive, and the connection must stay open.
            match wire.next_frame(Duration::from_millis(100)).await {
                Err(End::Timeout) => {}
                other => panic!("{ctx}: mid-frame, expected silence, got {other:?}"),
            }
            drop(wire);
            *closes.entry(close_label(1006)).or_default() += 1.0;
            return;
        }
    }
    // Budget spent: close politely and expect the echo.
    let mut rng2 = Rng::new(seed ^ 0xC105E);
    let bytes = frame_bytes(&mut rng2, true, OP_CLOSE, &1000u16.to_be_bytes());
    let expected = model.feed(&bytes);
    let t = model.terminal.expect("a close ends the model's connection");
    let _ = wire.send(&bytes, WriteMode::Whole).await;
    verify(
        &mut wire,
        &expected,
        Some(t),
        None,
        &mut seen,
        &format!("[{test} seed {seed} final close]"),
    )
    .await;
    *closes.entry(close_label(t.counted())).or_default() += 1.0;
}

/// A relay for frame fuzzing: limits that would end a session early are lifted (rate, abuse and
/// control-frame limits are tested on their own), everything else is the default.
fn fuzz_relay(max_payload: usize, outbox: usize) -> Relay {
    Relay::start(&[
        ("RATE_LIMIT", "1000000"),
        ("ABUSE_LIMIT", "1000000"),
        ("CONTROL_FRAME_LIMIT", "1000000"),
        ("MAX_PAYLOAD_BYTES", &max_payload.to_string()),
        ("OUTBOX_MAX_BYTES", &outbox.to_string()),
        ("CLOSE_TIMEOUT_MS", "500"),
        ("RUST_LOG", "warn"),
    ])
}

/// After fuzzing: the relay's close and error counters agree with the model, exactly.
async fn assert_counters(relay: &Relay, model: &Model, closes: &HashMap<String, f64>, ctx: &str) {
    wait_for_clients(relay, 0, Duration::from_secs(5)).await;
    let text = metrics_text(relay).await;
    assert_eq!(
        &closes_by_code(&text),
        closes,
        "{ctx}: roomcast_connections_closed_total by code differs from the model"
    );
    let invalid = metric_in(&text, "roomcast_invalid_messages_total", &[]).unwrap_or(0.0);
    assert_eq!(
        invalid, model.errors as f64,
        "{ctx}: roomcast_invalid_messages_total"
    );
    let received = metric_in(&text, "roomcast_messages_received_total", &[]).unwrap_or(0.0);
    assert_eq!(
        received, model.texts as f64,
        "{ctx}: roomcast_messages_received_total"
    );
    assert_eq!(
        metric_in(&text, "roomcast_rate_limited_total", &[]).unwrap_or(0.0),
        0.0,
        "{ctx}: nothing was rate limited"
    );
}

// =============================================================================================
// WebSocket attacks
// =============================================================================================

/// Random well-formed-header frames: every opcode, flag, length encoding and mask; text payloads
/// that are JSON fuzz (deep nesting, huge numbers, duplicate keys, escapes, lone surrogates, NUL),
/// invalid UTF-8, fragments interleaved with control frames; some sessions start with frames in
/// the same write as the upgrade request, some are written in random chunks or byte by byte.
#[tokio::test]
async fn seeded_frames_get_exactly_the_documented_answers() {
    let mut relay = fuzz_relay(32 * 1024, 4 << 20);
    let mut model = Model::new(32 * 1024, 50);
    let mut closes = HashMap::new();
    let big = GenConfig {
        max_payload: 32 * 1024,
        max_text_chars: 500,
        text_chars: 520,
        big: true,
        violations: 7,
    };
    let small = GenConfig {
        text_chars: 24,
        big: false,
        ..big
    };
    let started = Instant::now();
    for seed in 1..=90u64 {
        let (cfg, mode, batches) = match seed % 10 {
            0 | 5 => (small, WriteMode::Bytewise, 6),
            3 | 7 | 9 => (big, WriteMode::Chunks(seed), 20),
            _ => (big, WriteMode::Whole, 25),
        };
        fuzz_connection(
            &relay,
            &mut model,
            &mut closes,
            cfg,
            seed,
            batches,
            mode,
            seed % 4 == 0,
            "frames",
        )
        .await;
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "fuzzing is taking too long (seed {seed})"
        );
    }
    eprintln!(
        "seeded frames: {} texts at the JSON stage, {} error events, closes {closes:?}, {:?}",
        model.texts,
        model.errors,
        started.elapsed()
    );
    assert!(
        model.texts > 300,
        "the fuzz reached the JSON stage {} times",
        model.texts
    );
    assert!(
        closes.len() >= 6,
        "the fuzz ended connections in too few ways: {closes:?}"
    );
    assert_counters(&relay, &model, &closes, "frames").await;
    assert_drained(&relay, "frames").await;
    assert_healthy(&mut relay, "seeded frames").await;
}

/// Random bytes right after a valid handshake (and, for some seeds, in the same write as the
/// upgrade request). The model parses them as the relay must; an incomplete frame must leave the
/// connection open and silent.
#[tokio::test]
async fn random_bytes_after_the_handshake() {
    let mut relay = fuzz_relay(2048, 256 * 1024);
    let mut model = Model::new(2048, 50);
    let mut closes = HashMap::new();
    for seed in 1..=150u64 {
        let mut rng = Rng::new(seed.wrapping_mul(7919));
        let n = rng.range(1, 3000);
        let mut bytes = rng.bytes(n);
        // Bias some seeds towards things that get past the first header byte.
        match seed % 5 {
            1 => bytes[0] = rng.pick(&[0x81, 0x01, 0x89, 0x88, 0x8A, 0x80, 0x82]),
            2 => {
                bytes[0] = 0x81;
                if bytes.len() > 1 {
                    bytes[1] |= 0x80;
                }
            }
            _ => {}
        }
        model.reset_connection();
        let early = seed % 3 == 0;
        let name = format!("rb{seed}");
        let room = unique("rb-");
        let mut expected = vec![Expect::System, Expect::History, Expect::Presence];
        let mode = if seed % 2 == 0 {
            WriteMode::Chunks(seed)
        } else {
            WriteMode::Whole
        };
        let mut wire = if early {
            expected.extend(model.feed(&bytes));
            Wire::open(&relay, &name, &room, &bytes).await
        } else {
            let mut w = Wire::open(&relay, &name, &room, &[]).await;
            expected.extend(model.feed(&bytes));
            let _ = w.send(&bytes, mode).await;
            w
        };
        let ctx = format!("[random bytes seed {seed} early {early}: {}]", hex(&bytes));
        let terminal = model.terminal;
        let mut seen = Seen::default();
        let probe_payload = probe(seed);
        let probing = terminal.is_none() && model.at_frame_boundary();
        if probing {
            let p = build_frame(true, 0, OP_PING, Some([1, 2, 3, 4]), &probe_payload, None);
            let _ = wire.send(&p, WriteMode::Whole).await;
        }
        verify(
            &mut wire,
            &expected,
            terminal,
            probing.then_some(&probe_payload[..]),
            &mut seen,
            &ctx,
        )
        .await;
        let counted = match terminal {
            Some(t) => t.counted(),
            None => {
                if !probing {
                    match wire.next_frame(Duration::from_millis(60)).await {
                        Err(End::Timeout) => {}
                        other => panic!("{ctx}: mid-frame, expected silence, got {other:?}"),
                    }
                }
                drop(wire);
                1006
            }
        };
        *closes.entry(close_label(counted)).or_default() += 1.0;
    }
    assert_counters(&relay, &model, &closes, "random bytes").await;
    assert_drained(&relay, "random bytes").await;
    assert_healthy(&mut relay, "random bytes").await;
}

/// One script of frames — a message with a requestId, a ping, a message fragmented in three
/// around a ping, a bad message — written in two writes split at every byte boundary, then the
/// same script one byte per write. Every split must give the same answers; the repeated
/// requestId is acknowledged as a duplicate until the original leaves the 50-message history.
#[tokio::test]
async fn frames_split_at_every_byte_boundary() {
    let mut relay = fuzz_relay(2048, 256 * 1024);
    let mut model = Model::new(2048, 50);
    let mut rng = Rng::new(42);
    let mut script = Vec::new();
    let with_rid = br#"{"type":"message","text":" split \u00e9 ","requestId":"cut"}"#.to_vec();
    model.labels.insert(
        with_rid.clone(),
        Label::Publish {
            text: "split é".into(),
            request_id: Some("cut".into()),
        },
    );
    script.extend(frame_bytes(&mut rng, true, OP_TEXT, &with_rid));
    script.extend(frame_bytes(&mut rng, true, OP_PING, b"mid"));
    let fragmented = "{\"type\":\"message\",\"text\":\"f😀r\u{301}ag\"}"
        .as_bytes()
        .to_vec();
    model.labels.insert(
        fragmented.clone(),
        Label::Publish {
            text: "f😀r\u{301}ag".into(),
            request_id: None,
        },
    );
    // Cut inside the emoji: UTF-8 is only checked on the whole message.
    let cut1 = 28;
    let cut2 = 33;
    script.extend(frame_bytes(&mut rng, false, OP_TEXT, &fragmented[..cut1]));
    script.extend(frame_bytes(
        &mut rng,
        false,
        OP_CONTINUATION,
        &fragmented[cut1..cut2],
    ));
    script.extend(frame_bytes(&mut rng, true, OP_PING, b""));
    script.extend(frame_bytes(
        &mut rng,
        true,
        OP_CONTINUATION,
        &fragmented[cut2..],
    ));
    let bad = br#"{"type":"message","text":}"#.to_vec();
    model.labels.insert(bad.clone(), Label::Error(BAD_JSON));
    script.extend(frame_bytes(&mut rng, true, OP_TEXT, &bad));

    let room = unique("split-");
    let mut wire = Wire::open(&relay, "splitter", &room, &[]).await;
    let mut seen = Seen::default();
    verify(
        &mut wire,
        &[Expect::System, Expect::History, Expect::Presence],
        None,
        None,
        &mut seen,
        "split greeting",
    )
    .await;
    model.reset_connection();
    for k in 1..script.len() {
        let expected = model.feed(&script);
        let probe_payload = probe(k as u64);
        let mut tail = script[k..].to_vec();
        tail.extend(frame_bytes(&mut rng, true, OP_PING, &probe_payload));
        let w = wire.wr.as_mut().unwrap();
        w.write_all(&script[..k]).await.expect("first part");
        std::thread::sleep(Duration::from_micros(400));
        w.write_all(&tail).await.expect("second part");
        let ctx = format!("[split at byte {k} of {}]", script.len());
        verify(
            &mut wire,
            &expected,
            None,
            Some(&probe_payload),
            &mut seen,
            &ctx,
        )
        .await;
    }
    let expected = model.feed(&script);
    let probe_payload = probe(999_999);
    let mut bytes = script.clone();
    bytes.extend(frame_bytes(&mut rng, true, OP_PING, &probe_payload));
    wire.send(&bytes, WriteMode::Bytewise)
        .await
        .expect("bytewise");
    verify(
        &mut wire,
        &expected,
        None,
        Some(&probe_payload),
        &mut seen,
        "[one byte per write]",
    )
    .await;
    drop(wire);
    assert_healthy(&mut relay, "split frames").await;
}

/// Thousands of frames in one write (far more than one 64 KiB read), while we read concurrently:
/// every answer arrives, in order.
#[tokio::test]
async fn many_frames_in_one_write() {
    let mut relay = fuzz_relay(4096, 64 << 20);
    let mut model = Model::new(4096, 50);
    let cfg = GenConfig {
        max_payload: 4096,
        max_text_chars: 500,
        text_chars: 60,
        big: false,
        violations: 0,
    };
    let mut rng = Rng::new(2024);
    let mut gen = FrameGen::new(cfg, "many".into());
    let room = unique("many-");
    let mut wire = Wire::open(&relay, "many", &room, &[]).await;
    model.reset_connection();
    let mut bytes = Vec::new();
    while bytes.len() < 400 * 1024 {
        bytes.extend(gen.step(&mut rng, &mut model));
    }
    while let Some(f) = gen.fragments.pop_front() {
        bytes.extend(f);
    }
    let mut expected = vec![Expect::System, Expect::History, Expect::Presence];
    expected.extend(model.feed(&bytes));
    assert!(model.terminal.is_none() && model.at_frame_boundary());
    let probe_payload = probe(77);
    bytes.extend(frame_bytes(&mut rng, true, OP_PING, &probe_payload));
    let total = bytes.len();
    let mut wr = wire.wr.take().unwrap();
    let writer = tokio::spawn(async move {
        wr.write_all(&bytes).await.expect("one big write");
        wr
    });
    let mut seen = Seen::default();
    let ctx = format!("[{} bytes in one write, {} answers]", total, expected.len());
    verify(
        &mut wire,
        &expected,
        None,
        Some(&probe_payload),
        &mut seen,
        &ctx,
    )
    .await;
    wire.wr = Some(writer.await.expect("writer"));
    assert!(expected.len() > 2000, "{ctx}");
    drop(wire);
    assert_drained(&relay, "many frames").await;
    assert_healthy(&mut relay, "many frames in one write").await;
}

/// The JSON cases the brief names, each with its exact answer. MAX_PAYLOAD_BYTES is raised so
/// that 10,000 brackets fit in one frame.
#[tokio::test]
async fn nasty_json_gets_a_clear_answer() {
    const MAX: usize = 65_536;
    let mut relay = fuzz_relay(MAX, 4 << 20);
    let deep_open = "[".repeat(10_000);
    let deep_closed = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let deep_objects = format!("{}0{}", "{\"a\":".repeat(5_000), "}".repeat(5_000));
    let pad_to = |target: usize| {
        let base = r#"{"type":"message","text":"exactly at the limit","pad":""}"#;
        let mut s = base.to_string();
        s.insert_str(base.len() - 2, &"p".repeat(target - base.len()));
        s
    };
    let publish = |t: &str| Label::Publish {
        text: t.to_string(),
        request_id: None,
    };
    let cases: Vec<(&str, String, Label)> = vec![
        (
            "10,000 unclosed [",
            deep_open.clone(),
            Label::Error(BAD_JSON),
        ),
        (
            "10,000 balanced []",
            deep_closed.clone(),
            Label::Error(BAD_TYPE),
        ),
        (
            "10,000 unclosed {",
            "{".repeat(10_000),
            Label::Error(BAD_JSON),
        ),
        (
            "10,000 [] in an ignored field",
            format!(r#"{{"type":"message","text":"deep","x":{deep_closed}}}"#),
            publish("deep"),
        ),
        (
            "5,000 nested objects in an ignored field",
            format!(r#"{{"type":"message","x":{deep_objects},"text":"objects"}}"#),
            publish("objects"),
        ),
        (
            "10,000 [] as text",
            format!(r#"{{"type":"message","text":{deep_closed}}}"#),
            Label::Error(BAD_TYPE),
        ),
        (
            "10,000 unclosed [ in a field",
            format!(r#"{{"type":"message","text":"x","x":{deep_open}}}"#),
            Label::Error(BAD_JSON),
        ),
        (
            "huge exponent, ignored",
            r#"{"type":"message","text":"n","n":1e999999}"#.into(),
            publish("n"),
        ),
        (
            "huge integer, ignored",
            r#"{"type":"message","n":-123456789012345678901234567890123456789,"text":"big"}"#
                .into(),
            publish("big"),
        ),
        (
            "huge number as text",
            r#"{"type":"message","text":123456789012345678901234567890}"#.into(),
            Label::Error(BAD_TYPE),
        ),
        (
            "huge number alone",
            "1e999999".into(),
            Label::Error(BAD_TYPE),
        ),
        (
            "huge integer alone",
            "123456789012345678901234567890123456789".into(),
            Label::Error(BAD_TYPE),
        ),
        (
            "duplicate text",
            r#"{"type":"message","text":"a","text":"b"}"#.into(),
            Label::Error(BAD_JSON_OR_TYPE),
        ),
        (
            "duplicate type",
            r#"{"type":"message","type":"message","text":"a"}"#.into(),
            Label::Error(BAD_JSON_OR_TYPE),
        ),
        (
            "duplicate requestId",
            r#"{"type":"message","text":"a","requestId":"1","requestId":"2"}"#.into(),
            Label::Error(BAD_JSON_OR_TYPE),
        ),
        (
            "duplicate unknown key",
            r#"{"type":"message","text":"dupx","x":1,"x":2}"#.into(),
            publish("dupx"),
        ),
        (
            "lone high surrogate text",
            r#"{"type":"message","text":"\ud800"}"#.into(),
            Label::Error(BAD_JSON_OR_TYPE),
        ),
        (
            "lone low surrogate text",
            r#"{"type":"message","text":"a\udc00b"}"#.into(),
            Label::Error(BAD_JSON_OR_TYPE),
        ),
        (
            "two high surrogates",
            r#"{"type":"message","text":"\ud800\ud800"}"#.into(),
            Label::Error(BAD_JSON_OR_TYPE),
        ),
        (
            "lone surrogate in type",
            r#"{"type":"\ud800","text":"x"}"#.into(),
            Label::Error(BAD_JSON_OR_TYPE),
        ),
        (
            "lone surrogate in requestId",
            r#"{"type":"message","text":"x","requestId":"\udfff"}"#.into(),
            Label::Error(BAD_JSON_OR_TYPE),
        ),
        (
            "lone surrogate, ignored field",
            r#"{"type":"message","text":"ok","x":"\ud800"}"#.into(),
            publish("ok"),
        ),
        (
            "surrogate pair",
            r#"{"type":"message","text":"\ud83d\ude00 \uD83C\uDFF3"}"#.into(),
            publish("😀 🏳"),
        ),
        (
            "escaped type",
            r#"{"\u0074ype":"mess\u0061ge","text":"esc"}"#.into(),
            publish("esc"),
        ),
        (
            "raw NUL in text",
            "{\"type\":\"message\",\"text\":\"a\u{0}b\"}".into(),
            Label::Error(BAD_JSON),
        ),
        (
            "raw NUL between tokens",
            "{\"type\":\"message\",\u{0}\"text\":\"a\"}".into(),
            Label::Error(BAD_JSON),
        ),
        (
            "NUL after the object",
            "{\"type\":\"message\",\"text\":\"a\"}\u{0}".into(),
            Label::Error(BAD_JSON),
        ),
        ("only NUL", "\u{0}".into(), Label::Error(BAD_JSON)),
        (
            "escaped NUL in text",
            r#"{"type":"message","text":"a\u0000b"}"#.into(),
            publish("a\u{0}b"),
        ),
        (
            "escaped NUL in type",
            r#"{"type":"message\u0000","text":"a"}"#.into(),
            Label::Error(BAD_TYPE),
        ),
        (
            "BOM first",
            "\u{FEFF}{\"type\":\"message\",\"text\":\"a\"}".into(),
            Label::Error(BAD_JSON),
        ),
        ("empty payload", "".into(), Label::Error(BAD_JSON)),
        ("blank payload", " \t\r\n".into(), Label::Error(BAD_JSON)),
        ("null", "null".into(), Label::Error(BAD_TYPE)),
        ("empty object", "{}".into(), Label::Error(BAD_TYPE)),
        (
            "no text",
            r#"{"type":"message"}"#.into(),
            Label::Error(EMPTY),
        ),
        (
            "unicode blank text",
            r#"{"type":"message","text":"\u00a0\u2028 \t\u3000"}"#.into(),
            Label::Error(EMPTY),
        ),
        (
            "501 characters",
            format!(r#"{{"type":"message","text":"{}"}}"#, "é".repeat(501)),
            Label::Error(TOO_LARGE),
        ),
        (
            "500 four-byte characters",
            format!(r#"{{"type":"message","text":"{}"}}"#, "😀".repeat(500)),
            publish(&"😀".repeat(500)),
        ),
        (
            "trailing garbage",
            r#"{"type":"message","text":"x"} x"#.into(),
            Label::Error(BAD_JSON),
        ),
        (
            "trailing whitespace",
            "{\"type\":\"message\",\"text\":\"tw\"} \n\t".into(),
            publish("tw"),
        ),
        (
            "65-char requestId",
            format!(
                r#"{{"type":"message","text":"x","requestId":"{}"}}"#,
                "r".repeat(65)
            ),
            Label::Error(BAD_TYPE),
        ),
        (
            "empty requestId",
            r#"{"type":"message","text":"x","requestId":""}"#.into(),
            Label::Error(BAD_TYPE),
        ),
        (
            "null requestId",
            r#"{"type":"message","text":"x","requestId":null}"#.into(),
            Label::Error(BAD_TYPE),
        ),
        (
            "from and room are ignored",
            r#"{"type":"message","text":"me","from":"admin","room":"other"}"#.into(),
            publish("me"),
        ),
        (
            "payload of exactly MAX_PAYLOAD_BYTES",
            pad_to(MAX),
            publish("exactly at the limit"),
        ),
    ];
    let mut model = Model::new(MAX, 50);
    for (_, payload, label) in &cases {
        model
            .labels
            .insert(payload.clone().into_bytes(), label.clone());
    }
    let room = unique("json-");
    let mut wire = Wire::open(&relay, "jsonista", &room, &[]).await;
    let mut seen = Seen::default();
    verify(
        &mut wire,
        &[Expect::System, Expect::History, Expect::Presence],
        None,
        None,
        &mut seen,
        "json greeting",
    )
    .await;
    let mut rng = Rng::new(7);
    for (i, (what, payload, _)) in cases.iter().enumerate() {
        let frame = frame_bytes(&mut rng, true, OP_TEXT, payload.as_bytes());
        let expected = model.feed(&frame);
        let probe_payload = probe(i as u64);
        let mut bytes = frame;
        bytes.extend(frame_bytes(&mut rng, true, OP_PING, &probe_payload));
        wire.send(&bytes, WriteMode::Whole).await.expect("send");
        let ctx = format!("[nasty JSON: {what}]");
        verify(
            &mut wire,
            &expected,
            None,
            Some(&probe_payload),
            &mut seen,
            &ctx,
        )
        .await;
    }
    // One byte over the limit: refused from the header with 1009.
    let over = pad_to(MAX + 1);
    let frame = frame_bytes(&mut rng, true, OP_TEXT, over.as_bytes());
    let expected = model.feed(&frame);
    assert_eq!(model.terminal, Some(Terminal::Relay(1009)));
    let _ = wire.send(&frame, WriteMode::Whole).await;
    verify(
        &mut wire,
        &expected,
        Some(Terminal::Relay(1009)),
        None,
        &mut seen,
        "[MAX+1 bytes]",
    )
    .await;
    drop(wire);
    let invalid = metric(&relay, "roomcast_invalid_messages_total", &[]).await;
    assert_eq!(
        invalid, model.errors as f64,
        "every error event is counted once"
    );
    assert_drained(&relay, "nasty JSON").await;
    assert_healthy(&mut relay, "nasty JSON").await;
}

/// With the default limits, a flood of bad messages gets clear answers and then a clear end:
/// 20 `bad_json` (the rate limit's 20), 10 `rate_limited` (30 error events: the abuse limit),
/// then close 1008 — all from one write.
#[tokio::test]
async fn a_flood_of_bad_messages_gets_errors_then_1008() {
    let mut relay = Relay::start(&[]);
    let room = unique("abuse-");
    let mut wire = Wire::open(&relay, "flooder", &room, &[]).await;
    let mut seen = Seen::default();
    let mut expected = vec![Expect::System, Expect::History, Expect::Presence];
    expected.extend(std::iter::repeat_n(Expect::Error(BAD_JSON), 20));
    expected.extend(std::iter::repeat_n(Expect::Error(&["rate_limited"]), 10));
    let mut rng = Rng::new(99);
    let mut bytes = Vec::new();
    for _ in 0..200 {
        bytes.extend(frame_bytes(&mut rng, true, OP_TEXT, b"not json"));
    }
    wire.send(&bytes, WriteMode::Whole).await.expect("flood");
    verify(
        &mut wire,
        &expected,
        Some(Terminal::Relay(1008)),
        None,
        &mut seen,
        "[abuse flood]",
    )
    .await;
    wait_for_metric(
        &relay,
        "roomcast_connections_closed_total",
        &[("code", "1008")],
        Duration::from_secs(3),
        |v| v == 1.0,
    )
    .await;
    assert_drained(&relay, "abuse flood").await;
    assert_healthy(&mut relay, "abuse flood").await;
}

/// Peers that vanish: FIN right after the upgrade, FIN in the middle of a frame, RST, a peer that
/// goes silent (heartbeat), a peer that sends its close but never ends TCP or reads, and one
/// whose request head is followed by FIN before the 101. None may outlive its bound.
#[tokio::test]
async fn half_open_and_vanishing_peers_are_released() {
    let mut relay = Relay::start(&[
        ("HEARTBEAT_MS", "400"),
        ("CLOSE_TIMEOUT_MS", "300"),
        ("RUST_LOG", "warn"),
    ]);
    let baseline_fds = settled_fds(relay.pid()).await;
    let mut rng = Rng::new(5);

    // 1. FIN right after the greeting, without a close frame: dropped (1006), no answer needed.
    let mut fin = Wire::open(&relay, "fin", &unique("ho-"), &[]).await;
    fin.wr.take().unwrap().shutdown().await.ok();
    // 2. FIN in the middle of a frame header.
    let mut mid = Wire::open(&relay, "mid", &unique("ho-"), &[]).await;
    let partial = frame_bytes(
        &mut rng,
        true,
        OP_TEXT,
        b"{\"type\":\"message\",\"text\":\"x\"}",
    );
    let mut w = mid.wr.take().unwrap();
    w.write_all(&partial[..4]).await.unwrap();
    w.shutdown().await.ok();
    // 3. RST (SO_LINGER 0) after a message.
    {
        let raw = RawClient::connect(&relay, "rst", &unique("ho-")).await;
        raw.stream.set_zero_linger().expect("SO_LINGER 0");
        drop(raw);
    }
    // 4. Silent peer: never reads, never writes, never closes.
    let silent = Wire::open(&relay, "silent", &unique("ho-"), &[]).await;
    // 5. Close frame, then nothing: no reading, no FIN.
    let mut closer = Wire::open(&relay, "closer", &unique("ho-"), &[]).await;
    closer
        .send(
            &frame_bytes(&mut rng, true, OP_CLOSE, &1000u16.to_be_bytes()),
            WriteMode::Whole,
        )
        .await
        .unwrap();
    // 6. Relay-initiated close (binary → 1003) to a peer that never answers it.
    let mut binary = Wire::open(&relay, "binary", &unique("ho-"), &[]).await;
    binary
        .send(
            &frame_bytes(&mut rng, true, OP_BINARY, b"\x00\x01"),
            WriteMode::Whole,
        )
        .await
        .unwrap();
    // 7. Upgrade request, then FIN before reading the 101.
    {
        let mut s = TcpStream::connect(relay.addr).await.unwrap();
        let head = upgrade_head(
            relay.port(),
            &format!("/chat?{}", relay.chat_query("early-fin", &unique("ho-"))),
            Some(&relay.origin()),
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.shutdown().await.ok();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // FIN peers: the relay ends the stream promptly.
    for (what, wire) in [("FIN after upgrade", &mut fin), ("FIN mid-frame", &mut mid)] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match wire.read_frame(left).await {
                Ok(f) if f.opcode == OP_TEXT || f.opcode == OP_PING => continue,
                Ok(f) if f.opcode == OP_CLOSE => continue,
                Ok(f) => panic!("{what}: unexpected {f:?}"),
                Err(End::Eof) | Err(End::Error(_)) => break,
                Err(End::Timeout) => panic!("{what}: relay kept the half-closed connection"),
            }
        }
    }
    // Everything is released within a heartbeat's two intervals plus the close timeout.
    let started = Instant::now();
    wait_for_clients(&relay, 0, Duration::from_secs(3)).await;
    assert!(started.elapsed() < Duration::from_secs(3));
    let heartbeat_kills = metric(&relay, "roomcast_heartbeat_terminations_total", &[]).await;
    assert!(
        heartbeat_kills >= 1.0,
        "the silent peer is a heartbeat termination"
    );
    drop((silent, closer, binary, fin, mid));
    let text = metrics_text(&relay).await;
    let closes = closes_by_code(&text);
    assert_eq!(closes.get("1003"), Some(&1.0), "{closes:?}");
    assert_eq!(closes.get("1000"), Some(&1.0), "{closes:?}");
    assert!(
        closes.get("1006").copied().unwrap_or(0.0) >= 4.0,
        "{closes:?}"
    );
    assert_drained(&relay, "vanishing peers").await;
    let deadline = Instant::now() + Duration::from_secs(2);
    while open_fds(relay.pid()) > baseline_fds && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        open_fds(relay.pid()) <= baseline_fds,
        "the relay still holds {} fds (baseline {baseline_fds})",
        open_fds(relay.pid())
    );
    assert_healthy(&mut relay, "vanishing peers").await;
}

/// 200 concurrent connect/disconnect cycles, ending in every way a client can end: clean close,
/// abrupt drop, RST, TCP without a byte, half a request head, a head then gone before the 101,
/// half a frame, and a close frame with its echo. Afterwards nothing is left and every counter
/// and gauge adds up.
#[tokio::test]
async fn two_hundred_concurrent_connect_disconnect_cycles() {
    let mut relay = Relay::start(&[
        ("HANDSHAKE_TIMEOUT_MS", "1000"),
        ("CLOSE_TIMEOUT_MS", "500"),
        ("RUST_LOG", "warn"),
    ]);
    let baseline_fds = settled_fds(relay.pid()).await;
    let addr = relay.addr;
    let port = relay.port();
    let origin = relay.origin();
    let mut tasks = Vec::new();
    for i in 0..200u64 {
        let query = relay.chat_query(&format!("c{i}"), &format!("storm{}", i % 5));
        let origin = origin.clone();
        tasks.push(tokio::spawn(async move {
            let mut rng = Rng::new(i);
            tokio::time::sleep(Duration::from_millis(rng.below(150) as u64)).await;
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.set_nodelay(true).ok();
            let head = upgrade_head(port, &format!("/chat?{query}"), Some(&origin));
            let style = i % 8;
            match style {
                3 => return style, // TCP, not a byte
                4 => {
                    s.write_all(&head.as_bytes()[..head.len() / 2]).await.ok();
                    return style;
                }
                5 => {
                    s.write_all(head.as_bytes()).await.ok();
                    return style;
                }
                _ => {}
            }
            s.write_all(head.as_bytes()).await.expect("head");
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = tokio::time::timeout(EVENT_TIMEOUT, s.read(&mut chunk))
                    .await
                    .expect("101 in time")
                    .expect("read");
                assert!(n > 0, "relay closed during the upgrade");
                buf.extend_from_slice(&chunk[..n]);
            }
            assert!(
                buf.starts_with(b"HTTP/1.1 101"),
                "{}",
                String::from_utf8_lossy(&buf)
            );
            let msg = format!("{{\"type\":\"message\",\"text\":\"storm {i}\"}}");
            match style {
                0 => {
                    s.write_all(&masked_frame(OP_TEXT, msg.as_bytes()))
                        .await
                        .ok();
                    s.write_all(&masked_frame(OP_CLOSE, &1000u16.to_be_bytes()))
                        .await
                        .ok();
                    // Read until the relay ends the stream (its close echo first).
                    let _ = tokio::time::timeout(Duration::from_secs(3), async {
                        while let Ok(n) = s.read(&mut chunk).await {
                            if n == 0 {
                                break;
                            }
                        }
                    })
                    .await;
                }
                1 => drop(s),
                2 => {
                    s.write_all(&masked_frame(OP_TEXT, msg.as_bytes()))
                        .await
                        .ok();
                    s.set_zero_linger().ok();
                    drop(s);
                }
                6 => {
                    let f = masked_frame(OP_TEXT, msg.as_bytes());
                    s.write_all(&f[..f.len() / 2]).await.ok();
                }
                _ => {
                    s.write_all(&masked_frame(OP_CLOSE, &[])).await.ok();
                    let _ =
                        tokio::time::timeout(Duration::from_millis(500), s.read(&mut chunk)).await;
                }
            }
            style
        }));
    }
    for t in tasks {
        t.await.expect("a storm task panicked");
    }
    assert_drained(&relay, "storm").await;
    let text = metrics_text(&relay).await;
    let opened = metric_in(&text, "roomcast_connections_opened_total", &[]).unwrap_or(0.0);
    let closed: f64 = closes_by_code(&text).values().sum();
    assert_eq!(
        opened,
        closed,
        "every opened connection was closed exactly once: {:?}",
        closes_by_code(&text)
    );
    assert!(
        opened >= 125.0,
        "five of every eight cycles upgrade: opened {opened}"
    );
    // The HTTP-only connections (no byte, half a head) are gone too.
    let deadline = Instant::now() + Duration::from_secs(3);
    while open_fds(relay.pid()) > baseline_fds && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        open_fds(relay.pid()) <= baseline_fds,
        "fds: {} after the storm, {baseline_fds} before",
        open_fds(relay.pid())
    );
    assert_healthy(&mut relay, "connect/disconnect storm").await;
}

// =============================================================================================
// HTTP attacks
// =============================================================================================

/// What a raw HTTP attempt got back.
#[derive(Debug)]
struct RawHttp {
    bytes: Vec<u8>,
    /// The relay ended the connection (EOF or reset) within the time allowed.
    closed: bool,
    after: Duration,
}

impl RawHttp {
    fn status(&self) -> Option<u16> {
        let s = String::from_utf8_lossy(&self.bytes);
        let line = s.lines().next()?;
        line.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok()
    }
}

/// Send `bytes` (as given) on a fresh connection, then read until the relay ends it or `wait`.
async fn raw_http(relay: &Relay, bytes: &[u8], mode: WriteMode, wait: Duration) -> RawHttp {
    let started = Instant::now();
    let s = TcpStream::connect(relay.addr).await.expect("connect");
    s.set_nodelay(true).ok();
    let (mut rd, mut wr) = s.into_split();
    let _ = send_with(&mut wr, bytes, mode).await;
    let mut out = Vec::new();
    let mut chunk = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + wait;
    let closed = loop {
        match tokio::time::timeout_at(deadline, rd.read(&mut chunk)).await {
            Err(_) => break false,
            Ok(Ok(0)) | Ok(Err(_)) => break true,
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
        }
    };
    drop(wr);
    RawHttp {
        bytes: out,
        closed,
        after: started.elapsed(),
    }
}

/// Garbage instead of HTTP (seeded random bytes and a list of classics) gets a 4xx or 505, or
/// just a closed connection — never a 101, never a 2xx, never a hang.
#[tokio::test]
async fn garbage_instead_of_http() {
    let mut relay = Relay::start(&[("HANDSHAKE_TIMEOUT_MS", "500"), ("RUST_LOG", "warn")]);
    let q = relay.chat_query("g", "garbage");
    let port = relay.port();
    let up = |extra: &str, path: &str| {
        format!(
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}\r\n"
        )
    };
    let mut cases: Vec<(String, Vec<u8>)> = vec![
        ("CRLFs".into(), b"\r\n\r\n\r\n\r\n".to_vec()),
        ("NULs".into(), vec![0; 64]),
        ("TLS ClientHello".into(), vec![0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03]),
        ("HTTP/2 preface".into(), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec()),
        ("header without colon".into(), b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n".to_vec()),
        ("non-UTF-8 path".into(), b"GET /\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n".to_vec()),
        ("HTTP/9.9".into(), b"GET / HTTP/9.9\r\nHost: x\r\n\r\n".to_vec()),
        ("bad Content-Length".into(), b"POST /chat HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".to_vec()),
        ("CL and TE".into(), b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".to_vec()),
        ("bad chunk".into(), b"POST /chat HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec()),
        ("space before colon".into(), b"GET / HTTP/1.1\r\nHost : x\r\n\r\n".to_vec()),
        ("LF only, NUL in header".into(), b"GET / HTTP/1.1\nHost: a\0b\n\n".to_vec()),
        ("200 headers".into(), {
            let mut s = String::from("GET /healthz HTTP/1.1\r\nHost: x\r\n");
            for i in 0..200 {
                s.push_str(&format!("X-{i}: {i}\r\n"));
            }
            s.push_str("\r\n");
            s.into_bytes()
        }),
        ("upgrade, no key".into(), up(&format!("Origin: {}\r\nSec-WebSocket-Version: 13\r\n", relay.origin()), &format!("/chat?{q}")).into_bytes()),
        ("upgrade, version 8".into(), up(&format!("Origin: {}\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 8\r\n", relay.origin()), &format!("/chat?{q}")).into_bytes()),
    ];
    for seed in 0..40u64 {
        let mut rng = Rng::new(seed + 1000);
        let n = rng.range(1, 600);
        let mut bytes = rng.bytes(n);
        if seed % 4 == 0 {
            // Plausible start, then garbage.
            let mut v = b"GET /chat?".to_vec();
            v.extend(bytes);
            bytes = v;
        }
        cases.push((format!("random seed {seed}"), bytes));
    }
    for (i, (what, bytes)) in cases.iter().enumerate() {
        let mode = if i % 3 == 0 {
            WriteMode::Chunks(i as u64)
        } else {
            WriteMode::Whole
        };
        let r = raw_http(&relay, bytes, mode, Duration::from_secs(3)).await;
        let status = r.status();
        let ctx = format!(
            "[garbage {what}: {}] answered {:?}",
            hex(bytes),
            String::from_utf8_lossy(&r.bytes[..r.bytes.len().min(200)])
        );
        match status {
            None => assert!(
                r.bytes.is_empty(),
                "{ctx}: bytes that are not an HTTP response"
            ),
            Some(s) => assert!(
                (400..500).contains(&s) || s == 505,
                "{ctx}: status {s} for garbage"
            ),
        }
        assert!(r.closed, "{ctx}: connection still open after {:?}", r.after);
        if what.starts_with("upgrade, ") {
            assert_eq!(
                status,
                Some(400),
                "{ctx}: PROTOCOL.md: malformed WebSocket handshake → 400"
            );
        }
    }
    // Hostile but well-formed query values get a clear, sanitised answer.
    let hostile = format!(
        "/chat?token={}&name=%FF%00%E2%82%3Cscript%3E&room=..%2F..%2F%00&since=&epoch=%FF",
        encode(&relay.token)
    );
    let raw = RawClient::connect_with(&relay, hostile.trim_start_matches("/chat?"), None).await;
    let mut raw = raw;
    let system = raw.next_json(EVENT_TIMEOUT).await;
    assert_eq!(system["message"], "connected as guest", "{system}");
    let history = raw.next_json(EVENT_TIMEOUT).await;
    assert_eq!(history["room"], "lobby", "{history}");
    drop(raw);
    assert_healthy(&mut relay, "garbage instead of HTTP").await;
}

/// A request head over 16 KiB is refused (431) and the connection closed; one a bit under the
/// limit is still served.
#[tokio::test]
async fn oversized_request_head() {
    let mut relay = Relay::start(&[("RUST_LOG", "warn")]);
    let origin = relay.origin();
    let q = relay.chat_query("big", "bighead");
    let with_header = |size: usize| {
        upgrade_head(relay.port(), &format!("/chat?{q}"), Some(&origin)).replacen(
            "\r\n\r\n",
            &format!("\r\nX-Pad: {}\r\n\r\n", "p".repeat(size)),
            1,
        )
    };
    for (what, req) in [
        ("20 KiB header", with_header(20 * 1024)),
        ("64 KiB header", with_header(64 * 1024)),
        (
            "17 KiB request line",
            format!(
                "GET /healthz?{} HTTP/1.1\r\nHost: x\r\n\r\n",
                "a".repeat(17 * 1024)
            ),
        ),
        ("1 MiB of header lines", {
            let mut s = String::from("GET / HTTP/1.1\r\n");
            while s.len() < 1 << 20 {
                s.push_str("X-A: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n");
            }
            s
        }),
    ] {
        let r = raw_http(
            &relay,
            req.as_bytes(),
            WriteMode::Whole,
            Duration::from_secs(3),
        )
        .await;
        let ctx = format!(
            "[{what}] answered {:?}",
            String::from_utf8_lossy(&r.bytes[..r.bytes.len().min(200)])
        );
        assert!(
            matches!(r.status(), Some(431) | Some(414) | Some(400))
                || (r.status().is_none() && r.bytes.is_empty()),
            "{ctx}"
        );
        assert!(r.closed, "{ctx}: connection still open");
    }
    let r = raw_http(
        &relay,
        with_header(12 * 1024).as_bytes(),
        WriteMode::Whole,
        Duration::from_millis(500),
    )
    .await;
    assert_eq!(
        r.status(),
        Some(101),
        "a 12 KiB head is within the 16 KiB limit: {:?}",
        String::from_utf8_lossy(&r.bytes)
    );
    assert_healthy(&mut relay, "oversized heads").await;
}

/// Slowloris: connections that send nothing, half a request line, headers without the blank
/// line, or trickle a byte at a time, and a keep-alive connection that goes idle after one
/// request — all dropped once HANDSHAKE_TIMEOUT_MS has passed, while /healthz stays fast.
#[tokio::test]
async fn stalled_request_heads_are_dropped_after_the_handshake_timeout() {
    const TIMEOUT_MS: u64 = 400;
    let mut relay = Relay::start(&[
        ("HANDSHAKE_TIMEOUT_MS", &TIMEOUT_MS.to_string()),
        ("RUST_LOG", "warn"),
    ]);
    let baseline_fds = settled_fds(relay.pid()).await;
    let addr = relay.addr;
    let head = upgrade_head(
        relay.port(),
        &format!("/chat?{}", relay.chat_query("slow", "slowloris")),
        Some(&relay.origin()),
    );
    let mut tasks = Vec::new();
    for i in 0..40usize {
        let head = head.clone();
        tasks.push(tokio::spawn(async move {
            let started = Instant::now();
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.set_nodelay(true).ok();
            let style = i % 5;
            match style {
                0 => {}
                1 => s
                    .write_all(&head.as_bytes()[..7])
                    .await
                    .expect("partial line"),
                2 => s
                    .write_all(&head.as_bytes()[..head.len() - 2])
                    .await
                    .expect("no blank line"),
                3 => {
                    // Trickle: one byte every 50 ms, for longer than the timeout.
                    let bytes = head.as_bytes().to_vec();
                    let (mut rd, mut wr) = s.into_split();
                    let trickle = tokio::spawn(async move {
                        for b in bytes.iter().take(60) {
                            if wr.write_all(std::slice::from_ref(b)).await.is_err() {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                        wr
                    });
                    let mut buf = [0u8; 1024];
                    let ended = tokio::time::timeout(Duration::from_secs(4), async {
                        loop {
                            match rd.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(_) => {}
                            }
                        }
                    })
                    .await
                    .is_ok();
                    trickle.abort();
                    return (style, ended, started.elapsed());
                }
                _ => {
                    let req = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
                    s.write_all(req.as_bytes())
                        .await
                        .expect("keep-alive request");
                }
            }
            let mut buf = [0u8; 4096];
            let ended = tokio::time::timeout(Duration::from_secs(4), async {
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await
            .is_ok();
            (style, ended, started.elapsed())
        }));
    }
    // While 40 stallers hold connections, the relay answers at once.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = Instant::now();
    let h = http_get(&relay, "/healthz", &[]).await;
    assert_eq!(h.status, 200);
    assert!(
        t.elapsed() < Duration::from_millis(500),
        "/healthz took {:?} under slowloris",
        t.elapsed()
    );
    for task in tasks {
        let (style, ended, after) = task.await.expect("staller");
        assert!(ended, "staller style {style}: still connected after {after:?} (HANDSHAKE_TIMEOUT_MS={TIMEOUT_MS})");
        assert!(
            after >= Duration::from_millis(TIMEOUT_MS * 9 / 10),
            "staller style {style}: dropped after {after:?}, before HANDSHAKE_TIMEOUT_MS={TIMEOUT_MS}"
        );
        assert!(
            after < Duration::from_millis(TIMEOUT_MS + 1_500),
            "staller style {style}: dropped only after {after:?}"
        );
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while open_fds(relay.pid()) > baseline_fds && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        open_fds(relay.pid()) <= baseline_fds,
        "fds left behind by stallers"
    );
    assert_healthy(&mut relay, "slowloris").await;
}

// =============================================================================================
// Defects found in review (each fails until fixed)
// =============================================================================================

/// src/server.rs `serve_http`: HANDSHAKE_TIMEOUT_MS bounds only the *reading* of a request head.
/// A client that pipelines requests and never reads the responses stalls hyper in a write with
/// no timeout at all, so the connection (its fd, its task, kernel buffers) is held until the
/// relay shuts down. No token is needed; enough of them exhaust the open-file limit and every
/// later client (WebSocket included) is refused at accept.
#[tokio::test]
async fn bug_http_client_that_never_reads_is_held_forever() {
    const TIMEOUT_MS: u64 = 300;
    let mut relay = Relay::start(&[
        ("HANDSHAKE_TIMEOUT_MS", &TIMEOUT_MS.to_string()),
        ("CLOSE_TIMEOUT_MS", "300"),
        ("RUST_LOG", "warn"),
    ]);
    let baseline = settled_fds(relay.pid()).await;
    let mut held = Vec::new();
    for _ in 0..6 {
        let socket = TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut s = socket.connect(relay.addr).await.unwrap();
        let req = "GET /roomcast-client.js HTTP/1.1\r\nHost: x\r\n\r\n".repeat(300);
        s.write_all(req.as_bytes()).await.unwrap();
        held.push(s); // never read
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        open_fds(relay.pid()) >= baseline + 6,
        "the relay holds the readers' connections"
    );
    let bound = Duration::from_millis(TIMEOUT_MS + 300 + 2_500);
    let started = Instant::now();
    while open_fds(relay.pid()) > baseline && started.elapsed() < bound {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let left = open_fds(relay.pid()).saturating_sub(baseline);
    drop(held);
    assert_eq!(
        left, 0,
        "{left} HTTP connections whose client stopped reading are still held {bound:?} later \
         (HANDSHAKE_TIMEOUT_MS={TIMEOUT_MS}): a write that makes no progress has no bound"
    );
    assert_healthy(&mut relay, "non-reading HTTP clients").await;
}

/// src/http.rs `chat` checks MAX_ROOMS with `hub.room(&room)` and answers 101; src/connection.rs
/// `spawn` joins later. In between, another upgrade can evict the still-empty room, and the join
/// then fails: the client gets **101 followed by close 1013** ("room limit reached") — which
/// PROTOCOL.md rules out ("answered with a plain HTTP status (never 101 followed by a close)",
/// 503 for MAX_ROOMS; 1013 means slow consumer). The metrics also drift: that path counts a
/// close (1013) for a connection that was never counted as opened.
#[tokio::test]
async fn bug_room_limit_race_answers_101_then_close_instead_of_503() {
    let mut relay = Relay::start(&[("MAX_ROOMS", "1"), ("RUST_LOG", "warn")]);
    let mut outcomes: HashMap<String, usize> = HashMap::new();
    let mut violation = None;
    for round in 0..25 {
        let mut tasks = Vec::new();
        for i in 0..6 {
            let addr = relay.addr;
            let head = upgrade_head(
                relay.port(),
                &format!(
                    "/chat?{}",
                    relay.chat_query("racer", &format!("race{round}x{i}"))
                ),
                Some(&relay.origin()),
            );
            tasks.push(tokio::spawn(async move {
                let s = TcpStream::connect(addr).await.expect("connect");
                let (mut rd, mut wr) = s.into_split();
                wr.write_all(head.as_bytes()).await.expect("head");
                let mut buf = Vec::new();
                let head = read_response_head(&mut rd, &mut buf).await;
                let status = head.get(9..12).unwrap_or("?").to_string();
                if status != "101" {
                    return (status, None, (rd, wr));
                }
                let mut wire = Wire {
                    rd,
                    wr: Some(wr),
                    buf,
                    name: String::new(),
                    room: String::new(),
                };
                let first = wire.next_frame(Duration::from_secs(2)).await.ok();
                let Wire { rd, wr, .. } = wire;
                (status, first, (rd, wr.unwrap()))
            }));
        }
        let mut keep = Vec::new();
        for t in tasks {
            let (status, first, conn) = t.await.expect("racer");
            keep.push(conn);
            let what = match (&status[..], &first) {
                ("101", Some(f)) if f.opcode == OP_CLOSE => {
                    violation = Some(format!(
                        "101 then close {:?} {:?}",
                        f.close_code(),
                        String::from_utf8_lossy(f.payload.get(2..).unwrap_or(&[]))
                    ));
                    "101 then close".to_string()
                }
                ("101", Some(f)) => format!("101 then {}", f.json()["type"]),
                ("101", None) => "101 then nothing".to_string(),
                (s, _) => s.to_string(),
            };
            *outcomes.entry(what).or_default() += 1;
        }
        drop(keep);
        wait_for_clients(&relay, 0, Duration::from_secs(5)).await;
        if violation.is_some() {
            break;
        }
    }
    let text = metrics_text(&relay).await;
    let opened = metric_in(&text, "roomcast_connections_opened_total", &[]).unwrap_or(0.0);
    let closed: f64 = closes_by_code(&text).values().sum();
    assert!(
        violation.is_none() && opened == closed,
        "MAX_ROOMS=1 with concurrent upgrades: {violation:?}; outcomes {outcomes:?}; \
         connections opened {opened} vs closed {closed}"
    );
    assert_healthy(&mut relay, "room limit race").await;
}

/// src/http.rs `parse_query`: `since` that is not a number (`abc`, `-1`, a value past u64) is
/// silently dropped, so the join is treated as a fresh one and the history event says
/// `"complete":true`. PROTOCOL.md: when "`since` is not a position the relay knows, the history
/// event holds everything kept and `"complete":false`".
#[tokio::test]
async fn bug_unparseable_since_is_answered_complete_true() {
    let mut relay = Relay::start(&[("RUST_LOG", "warn")]);
    let room = unique("since-");
    let (mut ada, _, history) = Client::join(&relay, "ada", &room).await;
    let epoch = history["epoch"].as_str().expect("epoch").to_string();
    for t in ["one", "two", "three"] {
        ada.publish_and_wait(t).await;
    }
    let mut wrong = Vec::new();
    for since in ["abc", "-1", "18446744073709551616", "2.0", "0x2"] {
        let q = format!(
            "{}&since={}&epoch={}",
            relay.chat_query("bob", &room),
            encode(since),
            encode(&epoch)
        );
        let mut bob = Client::connect_query(&relay, &q).await.expect("connect");
        let h = bob.next_event_of_type("history", EVENT_TIMEOUT).await;
        assert_eq!(h["messages"].as_array().map(Vec::len), Some(3), "{h}");
        if h["complete"] != false {
            wrong.push(since);
        }
        bob.close().await;
    }
    ada.close().await;
    assert!(
        wrong.is_empty(),
        "since={wrong:?} with the right epoch is not a position the relay knows, yet the history \
         event says complete:true"
    );
    assert_healthy(&mut relay, "unparseable since").await;
}

/// src/connection.rs `read_ready` handles up to READS_PER_WAKE (8) reads of READ_BUF_BYTES
/// (64 KiB) before the loop flushes the outbox once. A client that sends a burst of pings in one
/// write and reads as fast as it can still has every pong queued at once; past OUTBOX_MAX_BYTES
/// (256 KiB) it is closed with 1013 "too slow" although the relay never tried to write to it.
/// PROTOCOL.md: 1013 is for a slow consumer. (Since the second review, a queued pong is replaced
/// by the next one and pings have a budget: such a burst is closed with 1008.)
#[tokio::test]
async fn bug_reading_client_is_closed_as_slow_consumer_before_any_write() {
    let mut relay = Relay::start(&[("RUST_LOG", "warn")]);
    let room = unique("pings-");
    let mut wire = Wire::open(&relay, "pinger", &room, &[]).await;
    let mut seen = Seen::default();
    verify(
        &mut wire,
        &[Expect::System, Expect::History, Expect::Presence],
        None,
        None,
        &mut seen,
        "ping greeting",
    )
    .await;
    let mut rng = Rng::new(3);
    const PINGS: usize = 2_500; // 327 KiB of pings, 317 KiB of pongs
    let payload_of = |i: usize| {
        let mut payload = format!("{i:06}").into_bytes();
        payload.resize(125, b'.');
        payload
    };
    let mut bytes = Vec::new();
    for i in 0..PINGS {
        bytes.extend(frame_bytes(&mut rng, true, OP_PING, &payload_of(i)));
    }
    let mut wr = wire.wr.take().unwrap();
    let writer = tokio::spawn(async move {
        let _ = wr.write_all(&bytes).await;
        wr
    });
    // We read concurrently, as fast as the relay writes. Pongs answer only the latest ping
    // that had arrived (a queued pong is replaced), so they are a rising subsequence; the burst
    // passes CONTROL_FRAME_LIMIT (100 per window) and ends in 1008, never in 1013.
    let mut last_pong: Option<Vec<u8>> = None;
    let mut pongs = 0;
    let outcome = loop {
        match wire.next_frame(EVENT_TIMEOUT).await {
            Ok(f) if f.opcode == OP_PONG => {
                if let Some(last) = &last_pong {
                    assert!(f.payload > *last, "pongs come in order");
                }
                last_pong = Some(f.payload);
                pongs += 1;
            }
            Ok(f) if f.opcode == OP_CLOSE => break f.close_code(),
            Ok(f) => panic!(
                "unexpected {f:?} {:?} after {pongs} pongs",
                String::from_utf8_lossy(&f.payload)
            ),
            Err(end) => panic!("{end:?} after {pongs} pongs"),
        }
    };
    let _ = writer.await;
    assert_eq!(
        outcome,
        Some(1008),
        "a ping burst is closed by the control-frame limit, not as a slow consumer"
    );
    assert!(
        (1..=101).contains(&pongs),
        "at most one pong per ping within the limit: {pongs}"
    );
    drop(wire);
    assert_healthy(&mut relay, "ping burst").await;
}

/// ARCHITECTURE.md: "Every failure ends in exactly one visible outcome, each counted". The error
/// that trips the abuse limit is not sent (the connection is closed with 1008 instead), yet
/// src/connection.rs `on_text` has already counted it in `roomcast_rate_limited_total` (or
/// `roomcast_invalid_messages_total`) — it is counted twice, once as an event nobody received.
#[tokio::test]
async fn bug_abuse_close_is_also_counted_as_an_error_event() {
    let mut relay = Relay::start(&[("RUST_LOG", "warn")]);
    let room = unique("abuse-count-");
    let mut wire = Wire::open(&relay, "flooder", &room, &[]).await;
    let mut seen = Seen::default();
    let mut expected = vec![Expect::System, Expect::History, Expect::Presence];
    expected.extend(std::iter::repeat_n(Expect::Error(BAD_JSON), 20));
    expected.extend(std::iter::repeat_n(Expect::Error(&["rate_limited"]), 10));
    let mut rng = Rng::new(98);
    let mut bytes = Vec::new();
    for _ in 0..31 {
        bytes.extend(frame_bytes(&mut rng, true, OP_TEXT, b"not json"));
    }
    wire.send(&bytes, WriteMode::Whole).await.expect("flood");
    verify(
        &mut wire,
        &expected,
        Some(Terminal::Relay(1008)),
        None,
        &mut seen,
        "[31 bad messages]",
    )
    .await;
    drop(wire);
    wait_for_clients(&relay, 0, Duration::from_secs(5)).await;
    let text = metrics_text(&relay).await;
    let counted = (
        metric_in(
            &text,
            "roomcast_invalid_messages_total",
            &[("code", "bad_json")],
        )
        .unwrap_or(0.0),
        metric_in(&text, "roomcast_rate_limited_total", &[]).unwrap_or(0.0),
        metric_in(
            &text,
            "roomcast_connections_closed_total",
            &[("code", "1008")],
        )
        .unwrap_or(0.0),
    );
    assert_eq!(
        counted,
        (20.0, 10.0, 1.0),
        "20 bad_json events, 10 rate_limited events and one close 1008 were sent; \
         (bad_json, rate_limited, 1008) counters"
    );
    assert_healthy(&mut relay, "abuse accounting").await;
}

/// The generator's labels agree with an independent JSON parser on what is JSON at all: a
/// payload labelled for publishing or `bad_type` is valid JSON, one labelled `bad_json` is not.
#[test]
fn generator_labels_agree_with_a_json_parser() {
    let cfg = GenConfig {
        max_payload: 32 * 1024,
        max_text_chars: 500,
        text_chars: 520,
        big: true,
        violations: 0,
    };
    let mut rng = Rng::new(1);
    let mut gen = JsonGen::new("self-check".into());
    for i in 0..3000 {
        let (payload, label) = gen.payload(&mut rng, &cfg);
        let is_json = serde_json::from_slice::<serde::de::IgnoredAny>(&payload).is_ok();
        let should_be_json = match &label {
            Label::Publish { .. } => Some(true),
            Label::Error(c) if *c == BAD_JSON => Some(false),
            Label::Error(c) if *c == BAD_TYPE || *c == EMPTY || *c == TOO_LARGE => Some(true),
            Label::Error(_) => None,
        };
        if let Some(expected) = should_be_json {
            assert_eq!(
                is_json,
                expected,
                "payload {i} labelled {label:?}: {:?}",
                String::from_utf8_lossy(&payload[..payload.len().min(400)])
            );
        }
    }
}
