//! [`RawClient`]: RFC 6455 written by hand over a plain TCP socket, for frame-level tests and for
//! clients that misbehave on purpose (never read, never answer pings, a tiny receive buffer).
//! Also the frame builders and the upgrade request head.

use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use super::http::{header_of, read_head, status_of};
use super::relay::Relay;
use super::{EVENT_TIMEOUT, WAIT};

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The example key from RFC 6455 §1.3 and its accept value.
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Bytes a server (unmasked) frame with `payload_len` bytes of payload takes on the wire.
pub fn server_frame_len(payload_len: usize) -> u64 {
    let header = if payload_len < 126 {
        2
    } else if payload_len <= u16::MAX as usize {
        4
    } else {
        10
    };
    (header + payload_len) as u64
}

/// A frame received from the relay.
#[derive(Debug, Clone)]
pub struct RawFrame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl RawFrame {
    pub fn close_code(&self) -> Option<u16> {
        (self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }

    /// The payload parsed as JSON; panics if it is not.
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.payload).unwrap_or_else(|e| {
            panic!(
                "relay sent a non-JSON frame ({e}): {:?}",
                String::from_utf8_lossy(&self.payload)
            )
        })
    }
}

/// Why a raw read produced no frame.
#[derive(Debug)]
pub enum RawEnd {
    Timeout,
    Eof,
    Error(std::io::Error),
}

/// Build one client frame. `mask: None` sends it unmasked; `declared_len` claims a payload length
/// different from the bytes actually included (for oversize tests).
pub fn build_frame(
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    payload: &[u8],
    declared_len: Option<u64>,
) -> Vec<u8> {
    let len = declared_len.unwrap_or(payload.len() as u64);
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push((if fin { 0x80 } else { 0 }) | ((rsv & 0x7) << 4) | (opcode & 0x0F));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= u16::MAX as u64 {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A masked, final client frame.
pub fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    build_frame(true, 0, opcode, Some(MASK), payload, None)
}

/// The HTTP head of a WebSocket upgrade request.
pub fn upgrade_head(port: u16, path_and_query: &str, origin: Option<&str>) -> String {
    let mut req = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some(origin) = origin {
        req.push_str(&format!("Origin: {origin}\r\n"));
    }
    req.push_str("\r\n");
    req
}

pub struct RawClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// The 101 response head.
    pub response_head: String,
    /// Who this is in failure messages (empty when connected by query).
    pub name: String,
    /// Text frames read so far.
    pub frames: u64,
    /// Wire bytes of those text frames.
    pub bytes: u64,
    /// Pings read so far (never answered).
    pub pings: u64,
}

impl RawClient {
    /// Upgrade with this relay's token and a good Origin; panics unless the answer is 101.
    pub async fn connect(relay: &Relay, name: &str, room: &str) -> RawClient {
        RawClient::connect_buffered(relay, name, room, None).await
    }

    /// [`RawClient::connect`] with, optionally, a small kernel receive buffer.
    pub async fn connect_buffered(
        relay: &Relay,
        name: &str,
        room: &str,
        recv_buffer: Option<u32>,
    ) -> RawClient {
        let mut client =
            RawClient::connect_with(relay, &relay.chat_query(name, room), recv_buffer).await;
        client.name = name.to_string();
        client
    }

    /// Upgrade with an explicit query and, optionally, a small kernel receive buffer (set before
    /// connecting, so a client that stops reading backs up quickly).
    pub async fn connect_with(relay: &Relay, query: &str, recv_buffer: Option<u32>) -> RawClient {
        RawClient::connect_path(relay, &format!("/chat?{query}"), recv_buffer).await
    }

    /// Upgrade at `/` (the second dialect) with a small kernel receive buffer.
    pub async fn connect_root(relay: &Relay) -> RawClient {
        RawClient::connect_path(relay, "/", Some(4096)).await
    }

    /// Upgrade at `path_and_query` with the relay's Origin; panics unless the answer is 101.
    pub async fn connect_path(
        relay: &Relay,
        path_and_query: &str,
        recv_buffer: Option<u32>,
    ) -> RawClient {
        let socket = TcpSocket::new_v4().expect("socket");
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
        }
        let mut stream = tokio::time::timeout(EVENT_TIMEOUT, socket.connect(relay.addr))
            .await
            .expect("TCP connect timed out")
            .expect("TCP connect failed");
        let head = upgrade_head(relay.port(), path_and_query, Some(&relay.origin()));
        stream
            .write_all(head.as_bytes())
            .await
            .expect("write upgrade");
        let (response_head, rest) = tokio::time::timeout(EVENT_TIMEOUT, read_head(&mut stream))
            .await
            .expect("upgrade response timed out")
            .expect("upgrade response");
        let status = status_of(&response_head);
        assert_eq!(
            status,
            Some(101),
            "raw upgrade not accepted: {response_head}"
        );
        let accept = header_of(&response_head, "sec-websocket-accept");
        assert_eq!(
            accept.as_deref(),
            Some(WS_ACCEPT),
            "wrong Sec-WebSocket-Accept in {response_head}"
        );
        RawClient {
            stream,
            buf: rest,
            response_head,
            name: String::new(),
            frames: 0,
            bytes: 0,
            pings: 0,
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Send a masked frame; panics if the write fails.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let frame = build_frame(fin, 0, opcode, Some(MASK), payload, None);
        self.stream.write_all(&frame).await.expect("write frame");
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(true, OP_TEXT, text.as_bytes()).await;
    }

    pub async fn send_close(&mut self, code: u16, reason: &str) {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason.as_bytes());
        self.send_frame(true, OP_CLOSE, &payload).await;
    }

    /// Read one frame from the relay (counting text frames, their wire bytes, and pings).
    pub async fn read_frame(&mut self, timeout: Duration) -> Result<RawFrame, RawEnd> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                match frame.opcode {
                    OP_TEXT => {
                        self.frames += 1;
                        self.bytes += server_frame_len(frame.payload.len());
                    }
                    OP_PING => self.pings += 1,
                    _ => {}
                }
                return Ok(frame);
            }
            let mut chunk = [0u8; 16384];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(RawEnd::Timeout),
                Ok(Ok(0)) => return Err(RawEnd::Eof),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Err(RawEnd::Error(e)),
            }
        }
    }

    /// Read frames until the relay's close frame; returns its code. Data and ping frames before
    /// it are skipped (pings are not answered). Panics on timeout or on a connection that ends
    /// without a close frame.
    pub async fn expect_close(&mut self, timeout: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_frame(left).await {
                Ok(frame) if frame.opcode == OP_CLOSE => return frame.close_code(),
                Ok(_) => continue,
                Err(end) => panic!("expected a close frame within {timeout:?}, got {end:?}"),
            }
        }
    }

    /// After a close frame: the relay should end the TCP connection.
    pub async fn expect_eof(&mut self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_frame(left).await {
                Ok(_) => continue,
                Err(RawEnd::Eof) | Err(RawEnd::Error(_)) => return,
                Err(RawEnd::Timeout) => {
                    panic!("relay did not end the TCP connection within {timeout:?}")
                }
            }
        }
    }

    /// Next text frame parsed as JSON, skipping pings (not answered) and pongs.
    pub async fn next_json(&mut self, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_frame(left).await {
                Ok(f) if f.opcode == OP_TEXT => {
                    return serde_json::from_slice(&f.payload).unwrap_or_else(|_| {
                        panic!(
                            "relay sent a non-JSON text frame: {:?}",
                            String::from_utf8_lossy(&f.payload)
                        )
                    })
                }
                Ok(f) if f.opcode == OP_PING || f.opcode == OP_PONG => continue,
                Ok(f) => panic!(
                    "expected a text frame, got opcode {:#x} payload {:?}",
                    f.opcode, f.payload
                ),
                Err(end) => panic!("expected a text frame within {timeout:?}, got {end:?}"),
            }
        }
    }

    /// Next JSON event whose type is `ty`.
    pub async fn next_json_of_type(&mut self, ty: &str, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let v = self.next_json(left).await;
            if v["type"] == ty {
                return v;
            }
        }
    }

    /// The very next frame (within [`WAIT`]) must be a text frame with `"type": ty`; a ping or
    /// anything else first is a failure.
    pub async fn expect_type(&mut self, ty: &str) -> Value {
        match self.read_frame(WAIT).await {
            Ok(f) if f.opcode == OP_TEXT && f.json()["type"] == ty => f.json(),
            Ok(f) if f.opcode == OP_TEXT => {
                panic!("{}: expected a {ty:?} event, got {}", self.name, f.json())
            }
            other => panic!("{}: expected a {ty:?} event, got {other:?}", self.name),
        }
    }
}

/// Parse one unmasked (or masked) frame from the front of `buf`.
fn parse_server_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let rsv = (buf[0] >> 4) & 0x7;
    let opcode = buf[0] & 0x0F;
    let masked = buf[1] & 0x80 != 0;
    let short = (buf[1] & 0x7F) as usize;
    let (mut pos, len) = match short {
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
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (10, u64::from_be_bytes(b) as usize)
        }
        n => (2, n),
    };
    let mut mask = [0u8; 4];
    if masked {
        if buf.len() < pos + 4 {
            return None;
        }
        mask.copy_from_slice(&buf[pos..pos + 4]);
        pos += 4;
    }
    if buf.len() < pos + len {
        return None;
    }
    let mut payload = buf[pos..pos + len].to_vec();
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Some((
        RawFrame {
            fin,
            rsv,
            opcode,
            masked,
            payload,
        },
        pos + len,
    ))
}
