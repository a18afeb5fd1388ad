//! The WebSocket client side of the contract, written by hand so the load client stays lean:
//! it writes the upgrade request itself, parses server frames straight out of a shared read
//! buffer (many frames per read), and classifies each text event by looking at a few bytes
//! instead of parsing the whole JSON.
//!
//! It does not validate `Sec-WebSocket-Accept` beyond the status line or negotiate extensions,
//! and it sends fragmented frames only to attack (`flood`): a load client needs none of that,
//! and every byte it skips is CPU left to the relay on a 2-core machine.

use memchr::memmem;
use std::sync::OnceLock;

/// The RFC 6455 sample key. Every connection may use the same one; the server only hashes it.
const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// Builds the upgrade request for one connection.
pub fn upgrade_request(host: &str, path_and_query: &str, origin: &str) -> Vec<u8> {
    format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\
         Origin: {origin}\r\n\r\n"
    )
    .into_bytes()
}

/// Percent-encodes a query value (names may hold spaces).
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Where the end of an HTTP response head is, if it has fully arrived.
pub fn response_head_end(buf: &[u8]) -> Option<usize> {
    memmem::find(buf, b"\r\n\r\n").map(|i| i + 4)
}

/// The status code of an HTTP response head.
pub fn response_status(head: &[u8]) -> Option<u16> {
    let line_end = memchr::memchr(b'\r', head)?;
    let line = std::str::from_utf8(&head[..line_end]).ok()?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Appends one masked client frame. The mask key varies per call; masking is a cheap XOR.
pub fn push_client_frame(out: &mut Vec<u8>, opcode: u8, payload: &[u8], mask_seed: &mut u32) {
    push_client_frame_fin(out, true, opcode, payload, mask_seed);
}

/// Appends one masked client frame with FIN set or not (a non-final frame starts a fragmented
/// message; the `flood` scenario's continuation attack needs one).
pub fn push_client_frame_fin(
    out: &mut Vec<u8>,
    fin: bool,
    opcode: u8,
    payload: &[u8],
    mask_seed: &mut u32,
) {
    out.push(if fin { 0x80 } else { 0 } | opcode);
    let len = payload.len();
    if len < 126 {
        out.push(0x80 | len as u8);
    } else if len <= 0xffff {
        out.push(0x80 | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(0x80 | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    // xorshift32: unpredictable enough for a mask, and never zero.
    let mut x = *mask_seed | 1;
    x ^= x << 13;
    x ^= x >> 17;
    x ^= x << 5;
    *mask_seed = x;
    let key = x.to_ne_bytes();
    out.extend_from_slice(&key);
    let start = out.len();
    out.extend_from_slice(payload);
    for (i, b) in out[start..].iter_mut().enumerate() {
        *b ^= key[i & 3];
    }
}

pub const OP_CONT: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// One complete server frame found in a buffer.
pub struct Frame<'a> {
    pub fin: bool,
    pub opcode: u8,
    pub payload: &'a [u8],
}

/// Why a server frame could not be parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// Servers must not mask frames (RFC 6455 5.1).
    MaskedByServer,
    /// A length beyond anything the contract sends.
    TooLong,
}

/// Parses the frame at the start of `buf`: Ok(None) if it is incomplete, else the frame and the
/// number of bytes it took.
pub fn parse_frame(buf: &[u8]) -> Result<Option<(Frame<'_>, usize)>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let fin = buf[0] & 0x80 != 0;
    let opcode = buf[0] & 0x0f;
    if buf[1] & 0x80 != 0 {
        return Err(FrameError::MaskedByServer);
    }
    let (len, head) = match buf[1] & 0x7f {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            let len = u64::from_be_bytes(b);
            if len > 64 << 20 {
                return Err(FrameError::TooLong);
            }
            (len as usize, 10)
        }
        n => (n as usize, 2),
    };
    if buf.len() < head + len {
        return Ok(None);
    }
    Ok(Some((
        Frame {
            fin,
            opcode,
            payload: &buf[head..head + len],
        },
        head + len,
    )))
}

/// What kind of event a text frame carries, read from its `"type"` field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Message,
    Presence,
    System,
    History,
    Error,
    Ack,
    Other,
}

fn finders() -> &'static (
    memmem::Finder<'static>,
    memmem::Finder<'static>,
    memmem::Finder<'static>,
) {
    static F: OnceLock<(
        memmem::Finder<'static>,
        memmem::Finder<'static>,
        memmem::Finder<'static>,
    )> = OnceLock::new();
    F.get_or_init(|| {
        (
            memmem::Finder::new(b"\"type\":\""),
            memmem::Finder::new(b"\"text\":\"lt "),
            memmem::Finder::new(b"\"code\":\""),
        )
    })
}

/// Reads the event type. Both relays put `type` first, so this looks at the first bytes only.
pub fn event_kind(payload: &[u8]) -> EventKind {
    let head = &payload[..payload.len().min(64)];
    let Some(at) = finders().0.find(head) else {
        return EventKind::Other;
    };
    let rest = &payload[at + 8..];
    if rest.starts_with(b"message\"") {
        EventKind::Message
    } else if rest.starts_with(b"presence\"") {
        EventKind::Presence
    } else if rest.starts_with(b"system\"") {
        EventKind::System
    } else if rest.starts_with(b"history\"") {
        EventKind::History
    } else if rest.starts_with(b"error\"") {
        EventKind::Error
    } else if rest.starts_with(b"ack\"") {
        EventKind::Ack
    } else {
        EventKind::Other
    }
}

/// The `code` of an error event.
pub fn error_code(payload: &[u8]) -> String {
    match finders().2.find(payload) {
        Some(at) => {
            let rest = &payload[at + 8..];
            let end = memchr::memchr(b'"', rest).unwrap_or(rest.len());
            String::from_utf8_lossy(&rest[..end]).into_owned()
        }
        None => "unknown".to_owned(),
    }
}

/// A load message's marker, written into `text`: `lt PUBLISHER COUNTER SEND_NS` plus padding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marker {
    pub publisher: u32,
    pub counter: u32,
    pub sent_ns: u64,
}

/// The client frame payload for one load message of about `text_bytes` characters.
pub fn message_json(marker: Marker, text_bytes: usize) -> Vec<u8> {
    let mut text = format!(
        "lt {} {} {}",
        marker.publisher, marker.counter, marker.sent_ns
    );
    if text.len() < text_bytes {
        text.push(' ');
        while text.len() < text_bytes {
            text.push('x');
        }
    }
    format!("{{\"type\":\"message\",\"text\":\"{text}\"}}").into_bytes()
}

/// Finds the marker in a delivered message event, if it carries one.
pub fn parse_marker(payload: &[u8]) -> Option<Marker> {
    let at = finders().1.find(payload)?;
    let mut rest = &payload[at + 11..];
    let mut nums = [0u64; 3];
    for n in nums.iter_mut() {
        let mut v: u64 = 0;
        let mut digits = 0;
        while let Some((&c, tail)) = rest.split_first() {
            if c.is_ascii_digit() {
                v = v * 10 + (c - b'0') as u64;
                digits += 1;
                rest = tail;
            } else {
                break;
            }
        }
        if digits == 0 {
            return None;
        }
        *n = v;
        rest = rest.get(1..).unwrap_or(&[]);
    }
    Some(Marker {
        publisher: nums[0] as u32,
        counter: nums[1] as u32,
        sent_ns: nums[2],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marker_round_trips_through_a_delivered_event() {
        let m = Marker {
            publisher: 7,
            counter: 42,
            sent_ns: 123456789012,
        };
        let body = String::from_utf8(message_json(m, 60)).unwrap();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let text = v["text"].as_str().unwrap();
        assert!(text.len() >= 60);
        let event = format!(
            "{{\"type\":\"message\",\"message\":{{\"id\":\"x\",\"room\":\"r1\",\"from\":\"u1\",\"text\":\"{text}\",\"sentAt\":\"t\",\"seq\":3}}}}"
        );
        assert_eq!(event_kind(event.as_bytes()), EventKind::Message);
        assert_eq!(parse_marker(event.as_bytes()), Some(m));
    }

    #[test]
    fn frames_parse_across_lengths_and_partial_input() {
        let mut seed = 1;
        for len in [0usize, 5, 125, 126, 300, 70000] {
            let payload = vec![b'a'; len];
            let mut out = Vec::new();
            push_client_frame(&mut out, OP_TEXT, &payload, &mut seed);
            // Unmask into a server-style frame to test the parser.
            let mut server = vec![0x81u8];
            if len < 126 {
                server.push(len as u8);
            } else if len <= 0xffff {
                server.push(126);
                server.extend_from_slice(&(len as u16).to_be_bytes());
            } else {
                server.push(127);
                server.extend_from_slice(&(len as u64).to_be_bytes());
            }
            server.extend_from_slice(&payload);
            assert!(parse_frame(&server[..server.len() - 1]).unwrap().is_none() || len == 0);
            let (f, used) = parse_frame(&server).unwrap().unwrap();
            assert_eq!(used, server.len());
            assert_eq!(f.payload.len(), len);
            assert!(f.fin);
        }
    }

    #[test]
    fn error_code_is_read() {
        assert_eq!(
            error_code(br#"{"type":"error","code":"rate_limited","message":"x"}"#),
            "rate_limited"
        );
    }
}
