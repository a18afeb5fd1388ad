//! The RFC 6455 frame codec: parse client frames from a borrowed buffer, build server frames once.
//!
//! Why not fastwebsockets' `WebSocket` for frames: it owns an 8 KiB read buffer per connection for
//! the socket's whole life (see FACTS.md), which alone is five times our idle budget. Here the
//! parser works on whatever buffer the caller has — a per-worker-thread buffer almost always — and
//! the connection keeps only the bytes of an incomplete frame. fastwebsockets still does the
//! handshake and the (SIMD) unmasking.
//!
//! Server frames are built exactly once as `Bytes` (header and payload in one allocation, the
//! header written in front of the payload after it is serialised) and shared by every recipient.

use bytes::Bytes;

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The heartbeat's server ping: an empty payload, the same two bytes for every connection.
pub const PING: &[u8] = &[0x80 | OP_PING, 0];

/// Largest server frame header: 2 bytes + 8 bytes of extended length (servers never mask).
pub const MAX_HEADER: usize = 10;

/// A parsed client frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub fin: bool,
    pub opcode: u8,
    pub mask: [u8; 4],
    pub header_len: usize,
    pub payload_len: usize,
}

/// Why a client frame cannot be accepted. Each maps to exactly one close code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    #[error("frame larger than the payload limit")]
    TooBig,
    #[error("text that is not valid UTF-8")]
    InvalidUtf8,
}

impl FrameError {
    pub fn close_code(self) -> u16 {
        match self {
            FrameError::Protocol(_) => 1002,
            FrameError::TooBig => 1009,
            FrameError::InvalidUtf8 => 1007,
        }
    }
}

/// Parse one client frame header from the front of `buf`.
///
/// Returns `Ok(None)` when more bytes are needed for the header. The payload length is checked
/// against `max_payload` from the header alone, so an oversized frame is refused before any of
/// its payload is read.
pub fn parse_header(buf: &[u8], max_payload: usize) -> Result<Option<Header>, FrameError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let (b0, b1) = (buf[0], buf[1]);
    let fin = b0 & 0x80 != 0;
    if b0 & 0x70 != 0 {
        return Err(FrameError::Protocol(
            "reserved bits set without an extension",
        ));
    }
    let opcode = b0 & 0x0F;
    let control = opcode & 0x8 != 0;
    match opcode {
        OP_CONTINUATION | OP_TEXT | OP_BINARY | OP_CLOSE | OP_PING | OP_PONG => {}
        _ => return Err(FrameError::Protocol("unknown opcode")),
    }
    if b1 & 0x80 == 0 {
        return Err(FrameError::Protocol("client frames must be masked"));
    }
    let short_len = (b1 & 0x7F) as usize;
    if control && (!fin || short_len > 125) {
        return Err(FrameError::Protocol(
            "control frames must be final and at most 125 bytes",
        ));
    }
    let (len_bytes, payload_len) = match short_len {
        126 => {
            if buf.len() < 4 {
                return Ok(None);
            }
            let len = u16::from_be_bytes([buf[2], buf[3]]) as u64;
            if len < 126 {
                return Err(FrameError::Protocol("non-minimal length encoding"));
            }
            (2, len)
        }
        127 => {
            if buf.len() < 10 {
                return Ok(None);
            }
            let len = u64::from_be_bytes(buf[2..10].try_into().expect("8 bytes"));
            if len >> 63 != 0 {
                return Err(FrameError::Protocol("most significant length bit set"));
            }
            if len <= u16::MAX as u64 {
                return Err(FrameError::Protocol("non-minimal length encoding"));
            }
            (8, len)
        }
        n => (0, n as u64),
    };
    if payload_len > max_payload as u64 {
        return Err(FrameError::TooBig);
    }
    let header_len = 2 + len_bytes + 4;
    if buf.len() < header_len {
        return Ok(None);
    }
    let mask_at = 2 + len_bytes;
    let mask = buf[mask_at..mask_at + 4].try_into().expect("4 bytes");
    Ok(Some(Header {
        fin,
        opcode,
        mask,
        header_len,
        payload_len: payload_len as usize,
    }))
}

/// Write a server (unmasked) frame header for `payload_len` into the end of `head`, returning
/// how many bytes it took.
fn write_header(head: &mut [u8; MAX_HEADER], opcode: u8, payload_len: usize) -> usize {
    let first = 0x80 | opcode;
    if payload_len < 126 {
        head[MAX_HEADER - 2] = first;
        head[MAX_HEADER - 1] = payload_len as u8;
        2
    } else if payload_len <= u16::MAX as usize {
        head[MAX_HEADER - 4] = first;
        head[MAX_HEADER - 3] = 126;
        head[MAX_HEADER - 2..].copy_from_slice(&(payload_len as u16).to_be_bytes());
        4
    } else {
        head[0] = first;
        head[1] = 127;
        head[2..].copy_from_slice(&(payload_len as u64).to_be_bytes());
        10
    }
}

/// Builds one server frame in a single allocation: the payload is written after a reserved
/// header gap, and `finish` fills the gap from the back, so nothing is copied twice.
pub struct FrameBuilder {
    buf: Vec<u8>,
}

impl FrameBuilder {
    pub fn with_capacity(payload_capacity: usize) -> FrameBuilder {
        let mut buf = Vec::with_capacity(MAX_HEADER + payload_capacity);
        buf.extend_from_slice(&[0; MAX_HEADER]);
        FrameBuilder { buf }
    }

    /// The payload written so far (writers append to it).
    pub fn payload(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }

    /// Offset of the payload written so far, for slicing parts of it out of the finished frame.
    pub fn payload_len(&self) -> usize {
        self.buf.len() - MAX_HEADER
    }

    /// Finish as a frame with `opcode`. Returns the frame and the offset at which its payload
    /// starts inside it.
    pub fn finish(mut self, opcode: u8) -> (Bytes, usize) {
        let payload_len = self.buf.len() - MAX_HEADER;
        let mut head = [0u8; MAX_HEADER];
        let used = write_header(&mut head, opcode, payload_len);
        let start = MAX_HEADER - used;
        self.buf[start..MAX_HEADER].copy_from_slice(&head[start..]);
        (Bytes::from(self.buf).slice(start..), used)
    }
}

/// A complete server frame with `payload` (copied once).
pub fn server_frame(opcode: u8, payload: &[u8]) -> Bytes {
    let mut b = FrameBuilder::with_capacity(payload.len());
    b.payload().extend_from_slice(payload);
    b.finish(opcode).0
}

/// A close frame carrying `code` and a short reason.
pub fn close_frame(code: u16, reason: &str) -> Bytes {
    let mut payload = Vec::with_capacity(2 + reason.len());
    payload.extend_from_slice(&code.to_be_bytes());
    payload.extend_from_slice(&reason.as_bytes()[..reason.len().min(123)]);
    server_frame(OP_CLOSE, &payload)
}

/// Validate a client close payload: empty, or a valid code followed by UTF-8.
/// Returns the code to echo back (1000 when the client sent none).
pub fn parse_close_payload(payload: &[u8]) -> Result<u16, FrameError> {
    match payload.len() {
        0 => Ok(1005),
        1 => Err(FrameError::Protocol("close payload of one byte")),
        _ => {
            let code = u16::from_be_bytes([payload[0], payload[1]]);
            let valid = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            if !valid {
                return Err(FrameError::Protocol("invalid close code"));
            }
            if std::str::from_utf8(&payload[2..]).is_err() {
                return Err(FrameError::InvalidUtf8);
            }
            Ok(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn masked(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let mask = [1, 2, 3, 4];
        let mut out = vec![(if fin { 0x80 } else { 0 }) | opcode];
        match payload.len() {
            n if n < 126 => out.push(0x80 | n as u8),
            n if n <= 0xFFFF => {
                out.push(0x80 | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            n => {
                out.push(0x80 | 127);
                out.extend_from_slice(&(n as u64).to_be_bytes());
            }
        }
        out.extend_from_slice(&mask);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
        out
    }

    #[test]
    fn parses_a_masked_text_frame() {
        let f = masked(OP_TEXT, true, b"hello");
        let h = parse_header(&f, 2048).unwrap().unwrap();
        assert_eq!(
            (h.fin, h.opcode, h.header_len, h.payload_len),
            (true, OP_TEXT, 6, 5)
        );
        let mut p = f[h.header_len..].to_vec();
        fastwebsockets::unmask(&mut p, h.mask);
        assert_eq!(p, b"hello");
    }

    #[test]
    fn needs_more_bytes_for_partial_headers() {
        let f = masked(OP_TEXT, true, &[b'a'; 300]);
        for cut in 0..8 {
            assert_eq!(parse_header(&f[..cut], 2048), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn oversize_is_refused_from_the_header_alone() {
        let f = masked(OP_TEXT, true, &[b'a'; 3000]);
        assert_eq!(parse_header(&f[..4], 2048), Err(FrameError::TooBig));
    }

    #[test]
    fn protocol_violations_are_refused() {
        let mut unmasked = masked(OP_TEXT, true, b"x");
        unmasked[1] &= 0x7F;
        assert!(matches!(
            parse_header(&unmasked, 2048),
            Err(FrameError::Protocol(_))
        ));
        let mut rsv = masked(OP_TEXT, true, b"x");
        rsv[0] |= 0x40;
        assert!(matches!(
            parse_header(&rsv, 2048),
            Err(FrameError::Protocol(_))
        ));
        let fragmented_ping = masked(OP_PING, false, b"x");
        assert!(matches!(
            parse_header(&fragmented_ping, 2048),
            Err(FrameError::Protocol(_))
        ));
        let bad_opcode = masked(0x3, true, b"x");
        assert!(matches!(
            parse_header(&bad_opcode, 2048),
            Err(FrameError::Protocol(_))
        ));
    }

    #[test]
    fn non_minimal_length_encodings_are_refused() {
        // 126 announcing 5 bytes, and 127 announcing 200 bytes: RFC 6455 5.2 requires the
        // minimal number of bytes.
        let short_in_16 = [0x81, 0x80 | 126, 0, 5, 1, 2, 3, 4];
        assert_eq!(
            parse_header(&short_in_16, 2048),
            Err(FrameError::Protocol("non-minimal length encoding"))
        );
        let mut mid_in_64 = vec![0x81, 0x80 | 127];
        mid_in_64.extend_from_slice(&200u64.to_be_bytes());
        mid_in_64.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(
            parse_header(&mid_in_64, 1 << 20),
            Err(FrameError::Protocol("non-minimal length encoding"))
        );
        let minimal = masked(OP_TEXT, true, &[b'a'; 126]);
        assert_eq!(
            parse_header(&minimal, 2048).unwrap().unwrap().payload_len,
            126
        );
    }

    #[test]
    fn server_frames_use_the_shortest_length_encoding() {
        assert_eq!(&server_frame(OP_TEXT, b"hi")[..], &[0x81, 2, b'h', b'i']);
        let mid = server_frame(OP_TEXT, &[b'a'; 200]);
        assert_eq!(&mid[..4], &[0x81, 126, 0, 200]);
        assert_eq!(mid.len(), 204);
        let big = server_frame(OP_BINARY, &vec![0; 70_000]);
        assert_eq!(big[1], 127);
        assert_eq!(big.len(), 70_010);
    }

    #[test]
    fn close_payloads_are_validated() {
        assert_eq!(parse_close_payload(&[]), Ok(1005));
        assert_eq!(parse_close_payload(&[0x03, 0xE8]), Ok(1000));
        assert!(parse_close_payload(&[0x03]).is_err());
        assert!(parse_close_payload(&[0x03, 0xED]).is_err()); // 1005 is never sent on the wire
        assert_eq!(
            parse_close_payload(&[0x03, 0xE8, 0xFF]),
            Err(FrameError::InvalidUtf8)
        );
    }
}
