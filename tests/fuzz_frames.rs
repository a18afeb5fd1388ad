//! Property tests of the frame parser against a model (docs/FUZZING.md).
//!
//! Random sequences of client frames (every opcode, reserved ones included; fin and RSV bits;
//! masked and unmasked; 7-bit, 16-bit and 64-bit lengths, minimal or not, the top bit of the
//! 64-bit length set; payloads over and under `max_payload`) and plain random bytes are fed to
//! `frame::parse_header` one byte at a time and in random chunks, the way a socket delivers
//! them. After every byte the parser's answer must be the model's: `Ok(None)` while the model
//! needs more bytes, the same close code when the model refuses, the same header (length,
//! payload length, opcode, fin, mask) when it accepts. Close payloads are checked the same way
//! against `frame::parse_close_payload`.
//!
//! The model is RFC 6455 §5.2 and §7.4 as docs/PROTOCOL.md states them, written as a table of
//! rules rather than as a parser; where one frame breaks several rules at the same point, any
//! of their close codes is a right answer (the contract does not order them).
//!
//! Short seeded run in `cargo test`; long run, each property for 150 s:
//! `FUZZ_SECONDS=150 cargo test --release --test fuzz_frames -- --nocapture --test-threads=1`.

mod fuzz_support;

use std::collections::BTreeSet;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use roomcast::frame::{parse_close_payload, parse_header, FrameError, Header};

use fuzz_support::{check, expect_eq};

const OP_CONTINUATION: u8 = 0x0;
const OP_TEXT: u8 = 0x1;
const OP_BINARY: u8 = 0x2;
const OP_CLOSE: u8 = 0x8;
const OP_PING: u8 = 0x9;
const OP_PONG: u8 = 0xA;
/// The opcodes RFC 6455 §5.2 defines; 0x3-0x7 and 0xB-0xF are reserved.
const DEFINED_OPCODES: [u8; 6] = [
    OP_CONTINUATION,
    OP_TEXT,
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
];

const PROTOCOL_ERROR: u16 = 1002;
const TOO_BIG: u16 = 1009;
const INVALID_UTF8: u16 = 1007;

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// A header as the model reads it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ModelHeader {
    fin: bool,
    opcode: u8,
    mask: [u8; 4],
    header_len: usize,
    payload_len: u64,
}

/// The model's answer for the bytes at the start of a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Answer {
    /// More bytes are needed before anything can be said.
    NeedMore,
    /// A frame the relay must refuse, closing with one of these codes.
    Refuse(BTreeSet<u16>),
    /// A header the relay must accept.
    Accept(ModelHeader),
}

/// RFC 6455 §5.2 for a client frame, as a table of rules over the bytes received so far.
///
/// The first two bytes carry FIN, RSV1-3, the opcode, MASK and the 7-bit length, so every rule
/// about them is decided as soon as they are there. The extended length is read whole (2 or 8
/// bytes) before any rule about it; an oversized frame is refused from its length alone (no
/// need to wait for the mask, PROTOCOL.md: "refused from the header, unread"); a header is
/// complete with its 4-byte masking key.
fn model(bytes: &[u8], max_payload: usize) -> Answer {
    let [first, second, ..] = *bytes else {
        return Answer::NeedMore;
    };
    let fin = first & 0b1000_0000 != 0;
    let rsv = (first & 0b0111_0000) >> 4;
    let opcode = first & 0b0000_1111;
    let masked = second & 0b1000_0000 != 0;
    let len7 = second & 0b0111_1111;
    let control = opcode & 0b1000 != 0;

    let mut refused = BTreeSet::new();
    let mut rule = |broken: bool, code: u16| {
        if broken {
            refused.insert(code);
        }
    };
    rule(rsv != 0, PROTOCOL_ERROR); // no extension is ever negotiated
    rule(!DEFINED_OPCODES.contains(&opcode), PROTOCOL_ERROR);
    rule(!masked, PROTOCOL_ERROR); // §5.1: a client masks every frame
    rule(control && !fin, PROTOCOL_ERROR); // §5.5: control frames are not fragmented
    rule(control && len7 > 125, PROTOCOL_ERROR); // §5.5: control payloads are at most 125
    rule(len7 <= 125 && usize::from(len7) > max_payload, TOO_BIG);
    if !refused.is_empty() {
        return Answer::Refuse(refused);
    }

    let extended = match len7 {
        126 => 2,
        127 => 8,
        _ => 0,
    };
    let Some(length_bytes) = bytes.get(2..2 + extended) else {
        return Answer::NeedMore;
    };
    let payload_len = if extended == 0 {
        u64::from(len7)
    } else {
        length_bytes
            .iter()
            .fold(0u64, |acc, &b| (acc << 8) | u64::from(b))
    };
    // "the minimal number of bytes MUST be used to encode the length"
    let minimal_extended = match payload_len {
        0..=125 => 0,
        126..=0xFFFF => 2,
        _ => 8,
    };
    let mut refused = BTreeSet::new();
    if extended == 8 && payload_len >> 63 == 1 {
        refused.insert(PROTOCOL_ERROR); // "the most significant bit MUST be 0"
    }
    if extended != minimal_extended {
        refused.insert(PROTOCOL_ERROR);
    }
    if payload_len > max_payload as u64 {
        refused.insert(TOO_BIG);
    }
    if !refused.is_empty() {
        return Answer::Refuse(refused);
    }

    let header_len = 2 + extended + 4;
    let Some(mask) = bytes.get(2 + extended..header_len) else {
        return Answer::NeedMore;
    };
    Answer::Accept(ModelHeader {
        fin,
        opcode,
        mask: mask.try_into().expect("four bytes"),
        header_len,
        payload_len,
    })
}

/// Does the parser's answer say what the model says?
fn agrees(
    got: Result<Option<Header>, FrameError>,
    want: &Answer,
    context: impl Fn() -> String,
) -> Result<(), TestCaseError> {
    match (&got, want) {
        (Ok(None), Answer::NeedMore) => Ok(()),
        (Err(e), Answer::Refuse(codes)) if codes.contains(&e.close_code()) => Ok(()),
        (Ok(Some(h)), Answer::Accept(m)) => expect_eq(
            ModelHeader {
                fin: h.fin,
                opcode: h.opcode,
                mask: h.mask,
                header_len: h.header_len,
                payload_len: h.payload_len as u64,
            },
            *m,
            context,
        ),
        _ => Err(TestCaseError::fail(format!(
            "{}\n  model: {want:?}\n  parse_header: {got:?}",
            context()
        ))),
    }
}

// ---------------------------------------------------------------------------------------------
// Frames as the generator means them
// ---------------------------------------------------------------------------------------------

/// How a frame writes its payload length.
#[derive(Debug, Clone)]
enum Length {
    /// The shortest encoding of this many bytes.
    Minimal(u64),
    /// 7-bit 126 and this 16-bit length, whatever its value (non-minimal below 126).
    Wide16(u16),
    /// 7-bit 127 and this 64-bit length, whatever its value (non-minimal up to 65535; the top
    /// bit may be set).
    Wide64(u64),
}

impl Length {
    fn declared(&self) -> u64 {
        match *self {
            Length::Minimal(n) | Length::Wide64(n) => n,
            Length::Wide16(n) => u64::from(n),
        }
    }

    fn is_minimal(&self) -> bool {
        match *self {
            Length::Minimal(_) => true,
            Length::Wide16(n) => n >= 126,
            Length::Wide64(n) => n > 0xFFFF && n >> 63 == 0,
        }
    }
}

#[derive(Debug, Clone)]
struct FrameSpec {
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    length: Length,
    /// The payload is this pattern repeated to the declared length (when the frame carries it).
    pattern: Vec<u8>,
}

/// Payloads longer than this are not written out: such a frame is only ever refused or
/// stops the stream, so its bytes after the header do not matter.
const LONGEST_WRITTEN_PAYLOAD: u64 = 70_000;

impl FrameSpec {
    /// The payload as the client means it (before masking).
    fn payload(&self) -> Vec<u8> {
        let n = self.length.declared().min(LONGEST_WRITTEN_PAYLOAD) as usize;
        self.pattern.iter().copied().cycle().take(n).collect()
    }

    /// Would a relay following RFC 6455 accept this header with this `max_payload`? Said from
    /// what the generator meant, not from the bytes (a check on the model too).
    fn is_acceptable(&self, max_payload: usize) -> bool {
        let control = self.opcode >= 8;
        self.rsv == 0
            && DEFINED_OPCODES.contains(&self.opcode)
            && self.mask.is_some()
            && !(control && (!self.fin || self.length.declared() > 125))
            && self.length.is_minimal()
            && self.length.declared() <= max_payload as u64
    }

    fn write(&self, out: &mut Vec<u8>) {
        out.push(u8::from(self.fin) << 7 | (self.rsv & 0b111) << 4 | self.opcode & 0b1111);
        let mask_bit = if self.mask.is_some() { 0x80 } else { 0 };
        match self.length {
            Length::Minimal(n) if n < 126 => out.push(mask_bit | n as u8),
            Length::Minimal(n) if n <= 0xFFFF => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            Length::Minimal(n) | Length::Wide64(n) => {
                out.push(mask_bit | 127);
                out.extend_from_slice(&n.to_be_bytes());
            }
            Length::Wide16(n) => {
                out.push(mask_bit | 126);
                out.extend_from_slice(&n.to_be_bytes());
            }
        }
        let payload = self.payload();
        match self.mask {
            Some(key) => {
                out.extend_from_slice(&key);
                out.extend(payload.iter().zip(key.iter().cycle()).map(|(b, k)| b ^ k));
            }
            None => out.extend_from_slice(&payload),
        }
    }
}

fn length() -> impl Strategy<Value = Length> {
    prop_oneof![
        12 => (0u64..=130).prop_map(Length::Minimal),
        2 => prop::sample::select(vec![0u64, 1, 124, 125, 126, 127, 128, 2047, 2048, 2049])
            .prop_map(Length::Minimal),
        2 => (0u64..4000).prop_map(Length::Minimal),
        1 => prop::sample::select(vec![0xFFFFu64, 0x1_0000, 0x1_0001]).prop_map(Length::Minimal),
        1 => (0u64..=u64::MAX >> 1).prop_map(Length::Minimal),
        2 => any::<u16>().prop_map(Length::Wide16),
        2 => (0u16..126).prop_map(Length::Wide16),
        1 => prop::sample::select(vec![0u64, 5, 125, 126, 0xFFFF, 0x1_0000, 1 << 63, u64::MAX])
            .prop_map(Length::Wide64),
        1 => (0u64..=0xFFFF).prop_map(Length::Wide64),
        1 => any::<u64>().prop_map(Length::Wide64),
    ]
}

fn frame() -> impl Strategy<Value = FrameSpec> {
    (
        prop::bool::weighted(0.85),
        prop_oneof![8 => Just(0u8), 1 => 1u8..8],
        prop_oneof![8 => prop::sample::select(DEFINED_OPCODES.to_vec()), 2 => 0u8..16],
        prop_oneof![9 => any::<[u8; 4]>().prop_map(Some), 1 => Just(None)],
        length(),
        vec(any::<u8>(), 1..8),
    )
        .prop_map(|(fin, rsv, opcode, mask, length, pattern)| FrameSpec {
            fin,
            rsv,
            opcode,
            mask,
            length,
            pattern,
        })
}

fn max_payload() -> impl Strategy<Value = usize> {
    prop_oneof![
        3 => Just(2048usize), // MAX_PAYLOAD_BYTES' default
        1 => Just(8192usize), // the second dialect's message limit
        3 => prop::sample::select(vec![
            0usize, 1, 124, 125, 126, 127, 0xFFFF, 0x1_0000, 1 << 20, usize::MAX,
        ]),
        2 => 0usize..5000,
    ]
}

/// What the stream reader saw.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Event {
    /// A whole frame: its header and unmasked payload.
    Frame {
        fin: bool,
        opcode: u8,
        payload: Vec<u8>,
    },
    /// The parser refused the frame starting at this offset of the stream, with this code.
    Refused { at: usize, code: u16 },
}

/// Feed `stream` to the parser in chunks of the given sizes (the last chunk takes the rest) the
/// way the connection reads a socket, asking the parser and the model about the bytes after the
/// last whole frame after every chunk. Returns what was read.
fn read_stream(
    stream: &[u8],
    chunks: &mut dyn Iterator<Item = usize>,
    max_payload: usize,
) -> Result<Vec<Event>, TestCaseError> {
    let mut events = Vec::new();
    let mut received = 0;
    let mut frame_start = 0;
    while received < stream.len() {
        received = received
            .saturating_add(chunks.next().unwrap_or(usize::MAX).max(1))
            .min(stream.len());
        loop {
            let buf = &stream[frame_start..received];
            let want = model(buf, max_payload);
            agrees(parse_header(buf, max_payload), &want, || {
                format!(
                    "frame at stream offset {frame_start}, {} bytes of it received: {:02x?}",
                    buf.len(),
                    &buf[..buf.len().min(16)]
                )
            })?;
            match want {
                Answer::NeedMore => break,
                Answer::Refuse(_) => {
                    let code = parse_header(buf, max_payload)
                        .expect_err("checked above")
                        .close_code();
                    events.push(Event::Refused {
                        at: frame_start,
                        code,
                    });
                    return Ok(events);
                }
                Answer::Accept(h) => {
                    let end = frame_start as u64 + h.header_len as u64 + h.payload_len;
                    if end > received as u64 {
                        break;
                    }
                    let end = end as usize;
                    let payload = stream[frame_start + h.header_len..end]
                        .iter()
                        .zip(h.mask.iter().cycle())
                        .map(|(b, k)| b ^ k)
                        .collect();
                    events.push(Event::Frame {
                        fin: h.fin,
                        opcode: h.opcode,
                        payload,
                    });
                    frame_start = end;
                }
            }
        }
    }
    Ok(events)
}

/// How a stream of frames ends for a relay following RFC 6455.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    /// Every frame read whole (the trailing bytes may start one more, or be refused).
    Complete,
    /// A frame announces more payload than the stream carries: nothing after its header is read.
    Incomplete,
    /// The frame at this offset must be refused.
    Refused(usize),
}

/// The frames a relay following RFC 6455 must read from `frames`, in order, and how the stream
/// ends for it.
fn expected_events(frames: &[FrameSpec], max_payload: usize) -> (Vec<Event>, End) {
    let mut events = Vec::new();
    let mut offset = 0;
    for f in frames {
        if !f.is_acceptable(max_payload) {
            return (events, End::Refused(offset));
        }
        if f.length.declared() > LONGEST_WRITTEN_PAYLOAD {
            return (events, End::Incomplete);
        }
        events.push(Event::Frame {
            fin: f.fin,
            opcode: f.opcode,
            payload: f.payload(),
        });
        let mut bytes = Vec::new();
        f.write(&mut bytes);
        offset += bytes.len();
    }
    (events, End::Complete)
}

#[test]
fn frame_streams_parse_as_the_rfc6455_model_says_at_every_byte_boundary() {
    let input = (
        vec(frame(), 1..6),
        max_payload(),
        vec(1usize..40, 1..30),
        vec(any::<u8>(), 0..8),
    );
    check(
        "frame_streams",
        512,
        input,
        |(frames, max_payload, chunk_sizes, trailing)| {
            let mut stream = Vec::new();
            for f in &frames {
                f.write(&mut stream);
            }
            // Bytes of a next frame (or garbage) after the last one: never read past a refusal.
            stream.extend_from_slice(&trailing);

            // Every byte boundary: one byte at a time.
            let by_byte = read_stream(&stream, &mut std::iter::repeat(1), max_payload)?;
            // Random boundaries, as a socket delivers: the same events.
            let by_chunk = read_stream(
                &stream,
                &mut chunk_sizes.iter().copied().cycle(),
                max_payload,
            )?;
            expect_eq(&by_chunk, &by_byte, || {
                "reading in chunks and byte by byte differ".into()
            })?;

            // What the generator meant: every acceptable frame whole, in order; then the first
            // frame it must refuse refused, at its offset.
            let (frames_expected, end) = expected_events(&frames, max_payload);
            let frames_read: Vec<Event> = by_byte
                .iter()
                .filter(|e| matches!(e, Event::Frame { .. }))
                .cloned()
                .collect();
            let read_count = frames_expected.len().min(frames_read.len());
            expect_eq(
                &frames_read[..read_count],
                &frames_expected[..read_count],
                || "frames read differ from frames written".into(),
            )?;
            match end {
                End::Refused(at) => {
                    expect_eq(frames_read.len(), frames_expected.len(), || {
                        "frames read before the refused one".into()
                    })?;
                    let last = by_byte.last().cloned();
                    prop_assert!(
                        matches!(last, Some(Event::Refused { at: a, .. }) if a == at),
                        "the frame at offset {at} must be refused; read {by_byte:?}"
                    );
                }
                End::Incomplete => {
                    expect_eq(by_byte.clone(), frames_expected.clone(), || {
                        "a frame longer than the stream: nothing after it is read".into()
                    })?;
                }
                End::Complete => {
                    // The trailing bytes start a frame that is incomplete, refused, or (rarely)
                    // whole: every written frame is read either way.
                    prop_assert!(frames_read.len() >= frames_expected.len());
                }
            }
            Ok(())
        },
    );
}

#[test]
fn random_bytes_parse_as_the_rfc6455_model_says() {
    check(
        "random_bytes",
        1024,
        (vec(any::<u8>(), 0..48), max_payload()),
        |(bytes, max_payload)| {
            read_stream(&bytes, &mut std::iter::repeat(1), max_payload)?;
            Ok(())
        },
    );
}

// ---------------------------------------------------------------------------------------------
// Close payloads
// ---------------------------------------------------------------------------------------------

/// RFC 3629 UTF-8, written out: no overlong forms, no surrogates, nothing past U+10FFFF.
fn is_utf8(bytes: &[u8]) -> bool {
    let mut i = 0;
    while i < bytes.len() {
        let lead = bytes[i];
        let (continuations, smallest, bits) = match lead {
            0x00..=0x7F => (0, 0, u32::from(lead)),
            0xC0..=0xDF => (1, 0x80, u32::from(lead & 0x1F)),
            0xE0..=0xEF => (2, 0x800, u32::from(lead & 0x0F)),
            0xF0..=0xF7 => (3, 0x1_0000, u32::from(lead & 0x07)),
            _ => return false,
        };
        let Some(rest) = bytes.get(i + 1..i + 1 + continuations) else {
            return false;
        };
        let mut scalar = bits;
        for &b in rest {
            if b & 0xC0 != 0x80 {
                return false;
            }
            scalar = (scalar << 6) | u32::from(b & 0x3F);
        }
        if scalar < smallest || (0xD800..=0xDFFF).contains(&scalar) || scalar > 0x10_FFFF {
            return false;
        }
        i += 1 + continuations;
    }
    true
}

/// RFC 6455 §7.4 and the IANA registry: may a peer send this code in a close frame?
fn close_code_may_be_sent(code: u16) -> bool {
    match code {
        0..=999 => false,     // §7.4.2: not used
        1000..=1003 => true,  // normal, going away, protocol error, unsupported data
        1004 => false,        // reserved
        1005 | 1006 => false, // MUST NOT be set in a close frame
        1007..=1011 => true,  // invalid data, policy, too big, extension, unexpected condition
        1012..=1014 => true,  // registered: service restart, try again later, bad gateway
        1015 => false,        // TLS handshake: MUST NOT be set
        1016..=2999 => false, // reserved for this and future RFCs
        3000..=4999 => true,  // libraries, frameworks, applications
        _ => false,
    }
}

/// What `parse_close_payload` must answer: the code to echo (1005 for "no code"), or the codes
/// it may close with.
fn close_model(payload: &[u8]) -> Result<u16, BTreeSet<u16>> {
    match payload {
        [] => Ok(1005),
        [_] => Err(BTreeSet::from([PROTOCOL_ERROR])),
        [hi, lo, reason @ ..] => {
            let code = u16::from_be_bytes([*hi, *lo]);
            let mut refused = BTreeSet::new();
            if !close_code_may_be_sent(code) {
                refused.insert(PROTOCOL_ERROR);
            }
            if !is_utf8(reason) {
                refused.insert(INVALID_UTF8);
            }
            if refused.is_empty() {
                Ok(code)
            } else {
                Err(refused)
            }
        }
    }
}

/// Byte sequences that are not UTF-8: overlong forms, surrogates, past U+10FFFF, truncated
/// sequences, stray continuation bytes, bytes that never occur.
const NOT_UTF8: &[&[u8]] = &[
    &[0xC0, 0x80],
    &[0xC1, 0xBF],
    &[0xE0, 0x80, 0x80],
    &[0xE0, 0x9F, 0xBF],
    &[0xF0, 0x80, 0x80, 0x80],
    &[0xF0, 0x8F, 0xBF, 0xBF],
    &[0xED, 0xA0, 0x80],
    &[0xED, 0xBF, 0xBF],
    &[0xF4, 0x90, 0x80, 0x80],
    &[0xF5, 0x80, 0x80, 0x80],
    &[0xC3],
    &[0xE2, 0x82],
    &[0xF0, 0x9F, 0x98],
    &[0x80],
    &[0xBF],
    &[0xFE],
    &[0xFF],
];

fn close_payload() -> impl Strategy<Value = Vec<u8>> {
    let code = prop_oneof![
        3 => prop::sample::select(vec![
            0u16, 999, 1000, 1001, 1002, 1003, 1004, 1005, 1006, 1007, 1008, 1009, 1010, 1011,
            1012, 1013, 1014, 1015, 1016, 2999, 3000, 3999, 4000, 4401, 4403, 4999, 5000,
            u16::MAX,
        ]),
        1 => any::<u16>(),
    ];
    let reason = prop_oneof![
        // Valid UTF-8, one to four bytes per character, up to a control frame's 123 bytes.
        4 => "[a-z ]{0,20}|[\\x{0}-\\x{10FFFF}]{0,30}".prop_map(String::into_bytes),
        // Valid text with one bad sequence spliced in.
        3 => ("[a-zé€😀]{0,10}", prop::sample::select(NOT_UTF8.to_vec()), "[a-zé€😀]{0,10}")
            .prop_map(|(a, bad, b)| [a.as_bytes(), bad, b.as_bytes()].concat()),
        2 => vec(any::<u8>(), 0..20),
    ];
    prop_oneof![
        1 => Just(Vec::new()),
        1 => any::<u8>().prop_map(|b| vec![b]),
        8 => (code, reason).prop_map(|(code, reason)| [&code.to_be_bytes()[..], &reason].concat()),
    ]
}

#[test]
fn close_payloads_are_judged_as_rfc6455_says() {
    check("close_payloads", 2048, close_payload(), |payload| {
        let got = parse_close_payload(&payload).map_err(FrameError::close_code);
        match (close_model(&payload), got) {
            (Ok(want), Ok(got)) if want == got => Ok(()),
            (Err(codes), Err(got)) if codes.contains(&got) => Ok(()),
            (want, got) => Err(TestCaseError::fail(format!(
                "close payload {payload:02x?}\n  model: {want:?}\n  parse_close_payload: {got:?}"
            ))),
        }
    });
}

/// The model's UTF-8 rules are RFC 3629's: checked against the standard library, so the close
/// payload property is not checking one mistake against another.
#[test]
fn the_models_utf8_check_is_rfc3629() {
    check(
        "model_utf8",
        2048,
        prop_oneof![
            vec(any::<u8>(), 0..12),
            ("[a-zé€😀]{0,4}", prop::sample::select(NOT_UTF8.to_vec())).prop_map(|(a, bad)| [
                a.as_bytes(),
                bad
            ]
            .concat()),
        ],
        |bytes| {
            prop_assert_eq!(is_utf8(&bytes), std::str::from_utf8(&bytes).is_ok());
            Ok(())
        },
    );
}
