//! The chat protocol: the only module that knows JSON.
//!
//! Inbound: a client text payload is parsed in place (borrowed strings, one pass on the happy
//! path) into a [`ClientMessage`] or a [`ErrorCode`]. Outbound: every event is serialised once,
//! straight into a [`FrameBuilder`], so the bytes on the wire are built exactly once per event.
//! Name and room sanitising live here too, since they are part of the wire contract.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::frame::{FrameBuilder, OP_TEXT};

pub mod auth;

pub const MAX_NAME_CHARS: usize = 24;
pub const MAX_ROOM_CHARS: usize = 32;
pub const MAX_REQUEST_ID_CHARS: usize = 64;
pub const DEFAULT_NAME: &str = "guest";
pub const DEFAULT_ROOM: &str = "lobby";
/// Close code of a connection the server API disconnected (`disconnected by the server`).
pub const DISCONNECT_CODE: u16 = 4000;

/// Trim the way JavaScript's `String.prototype.trim` does (the Node contract's servers trim
/// with it): Unicode white space and line terminators plus U+FEFF, but not U+0085.
pub fn js_trim(s: &str) -> &str {
    s.trim_matches(|c: char| (c.is_whitespace() && c != '\u{85}') || c == '\u{feff}')
}

/// The error codes of the compatible contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    RateLimited,
    TooLarge,
    BadJson,
    BadType,
    /// `bad_type` because of the `requestId` (not a string of 1 to MAX_REQUEST_ID_CHARS
    /// characters): the same code, a message that says what is wrong.
    BadRequestId,
    Empty,
    /// The sender's session already used this `requestId` for a different text.
    Conflict,
    /// The broker (Redis) did not take the message: nothing was published, nothing is acked.
    Unavailable,
    /// A read-only ticket tried to publish.
    Forbidden,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::TooLarge => "too_large",
            ErrorCode::BadJson => "bad_json",
            ErrorCode::BadType | ErrorCode::BadRequestId => "bad_type",
            ErrorCode::Empty => "empty",
            ErrorCode::Conflict => "conflict",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::Forbidden => "forbidden",
        }
    }

    fn human(self) -> &'static str {
        match self {
            ErrorCode::RateLimited => "You are sending messages too fast; wait a few seconds.",
            ErrorCode::TooLarge => "Message text is too long.",
            ErrorCode::BadJson => "Message is not valid JSON.",
            ErrorCode::BadType => "Expected {\"type\":\"message\",\"text\":\"...\"}.",
            ErrorCode::BadRequestId => "requestId must be a string of 1 to 64 characters.",
            ErrorCode::Empty => "Message text is empty.",
            ErrorCode::Conflict => {
                "This requestId was already used for a different message; use a new requestId."
            }
            ErrorCode::Unavailable => {
                "The message was not published: the relay cannot reach its broker. Try again."
            }
            ErrorCode::Forbidden => "Your ticket is read-only: it does not allow publishing.",
        }
    }
}

/// A valid publish request from a client.
#[derive(Debug, PartialEq, Eq)]
pub struct ClientMessage<'a> {
    /// Trimmed text, at most `max_text_chars` characters.
    pub text: Cow<'a, str>,
    pub request_id: Option<Cow<'a, str>>,
}

/// The values of the keys `names` in the JSON object `payload`, raw (a key that is present has
/// `Some`, `null` included); every other key is skipped, a repeated one of `names` is an error
/// of the `Data` category (as serde's derive makes it).
///
/// Keys are read as bytes, after unescaping, without requiring valid UTF-16 escapes: an extra
/// key like `"\ud800"` (a lone surrogate) is skipped like any other, as the contract's
/// JavaScript servers do, where serde's derive would refuse the whole message. Values are
/// checked as strictly as ever by whoever reads them.
pub(crate) fn object_fields<'a, const N: usize>(
    payload: &'a str,
    names: &'static [&'static str; N],
) -> Result<[Option<&'a RawValue>; N], serde_json::Error> {
    use serde::de::{DeserializeSeed, Error, IgnoredAny, MapAccess, Visitor};
    use std::fmt;

    /// A key: its index in `names`, if it is one of them.
    struct Key<const N: usize>(&'static [&'static str; N]);
    impl<'de, const N: usize> DeserializeSeed<'de> for Key<N> {
        type Value = Option<usize>;
        fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
            d.deserialize_bytes(self)
        }
    }
    impl<const N: usize> Visitor<'_> for Key<N> {
        type Value = Option<usize>;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("an object key")
        }
        fn visit_bytes<E: Error>(self, key: &[u8]) -> Result<Self::Value, E> {
            Ok(self.0.iter().position(|n| n.as_bytes() == key))
        }
        fn visit_str<E: Error>(self, key: &str) -> Result<Self::Value, E> {
            self.visit_bytes(key.as_bytes())
        }
    }

    struct Object<const N: usize>(&'static [&'static str; N]);
    impl<'de, const N: usize> Visitor<'de> for Object<N> {
        type Value = [Option<&'de RawValue>; N];
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out = [None; N];
            while let Some(key) = map.next_key_seed(Key(self.0))? {
                match key {
                    Some(i) if out[i].is_some() => {
                        return Err(A::Error::duplicate_field(self.0[i]))
                    }
                    Some(i) => out[i] = Some(map.next_value::<&'de RawValue>()?),
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(out)
        }
    }

    let mut de = serde_json::Deserializer::from_str(payload);
    let fields = serde::Deserializer::deserialize_map(&mut de, Object(names))?;
    de.end()?;
    Ok(fields)
}

/// A JSON string value, or `None` for any other JSON type (null, number, object, array, bool).
/// Borrows from the payload unless the string has escapes.
fn as_string(raw: &RawValue) -> Option<Cow<'_, str>> {
    let json = raw.get();
    if !json.starts_with('"') {
        return None;
    }
    match serde_json::from_str::<&str>(json) {
        Ok(s) => Some(Cow::Borrowed(s)),
        Err(_) => serde_json::from_str::<String>(json).ok().map(Cow::Owned),
    }
}

/// Parse and validate one client text payload (already known to be UTF-8).
pub fn parse_client_message(
    payload: &str,
    max_text_chars: usize,
) -> Result<ClientMessage<'_>, ErrorCode> {
    if !payload.trim_start().starts_with('{') {
        // Arrays would otherwise deserialize positionally into the struct; anything that is not
        // an object is bad_type when it is JSON at all, bad_json otherwise.
        return Err(
            match serde_json::from_str::<serde::de::IgnoredAny>(payload) {
                Ok(_) => ErrorCode::BadType,
                Err(_) => ErrorCode::BadJson,
            },
        );
    }
    let [kind, text, request_id] =
        object_fields(payload, &["type", "text", "requestId"]).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => ErrorCode::BadType,
            _ => ErrorCode::BadJson,
        })?;
    let kind = kind.and_then(as_string).ok_or(ErrorCode::BadType)?;
    if kind != "message" {
        return Err(ErrorCode::BadType);
    }
    let request_id = match request_id {
        None => None,
        Some(raw) => {
            let id = as_string(raw).ok_or(ErrorCode::BadRequestId)?;
            let chars = id.chars().count();
            if chars == 0 || chars > MAX_REQUEST_ID_CHARS {
                return Err(ErrorCode::BadRequestId);
            }
            Some(id)
        }
    };
    let text = match text {
        None => return Err(ErrorCode::Empty),
        Some(raw) => as_string(raw).ok_or(ErrorCode::BadType)?,
    };
    let text = match text {
        Cow::Borrowed(s) => Cow::Borrowed(js_trim(s)),
        Cow::Owned(s) if js_trim(&s).len() == s.len() => Cow::Owned(s),
        Cow::Owned(s) => Cow::Owned(js_trim(&s).to_string()),
    };
    if text.is_empty() {
        return Err(ErrorCode::Empty);
    }
    if text.chars().count() > max_text_chars {
        return Err(ErrorCode::TooLarge);
    }
    Ok(ClientMessage { text, request_id })
}

/// `name`: trimmed, 1..=24 characters of ASCII letters, digits, `_`, space, `-`; else `guest`.
pub fn sanitize_name(raw: Option<&str>) -> String {
    let name = js_trim(raw.unwrap_or(""));
    let ok = !name.is_empty()
        && name.chars().count() <= MAX_NAME_CHARS
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | ' ' | '-'));
    if ok {
        name.to_string()
    } else {
        DEFAULT_NAME.to_string()
    }
}

/// `name` when it keeps the naming rule (trimmed, 1..=24 characters of ASCII letters, digits,
/// `_`, space, `-`).
pub fn valid_name(raw: &str) -> Option<String> {
    let name = sanitize_name(Some(raw));
    (name != DEFAULT_NAME || js_trim(raw) == DEFAULT_NAME).then_some(name)
}

/// `room`: trimmed, 1..=32 characters of `[A-Za-z0-9_-]`; else `lobby`.
pub fn sanitize_room(raw: Option<&str>) -> String {
    room_name(raw).unwrap_or_else(|| DEFAULT_ROOM.to_string())
}

/// `room` when it keeps the naming rule (trimmed, 1..=32 characters of `[A-Za-z0-9_-]`).
pub fn room_name(raw: Option<&str>) -> Option<String> {
    let room = js_trim(raw?);
    let ok = !room.is_empty()
        && room.len() <= MAX_ROOM_CHARS
        && room
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'));
    ok.then(|| room.to_string())
}

fn write_json_str(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("writing a string to a Vec cannot fail");
}

fn text_frame(build: impl FnOnce(&mut Vec<u8>)) -> Bytes {
    let mut b = FrameBuilder::with_capacity(128);
    build(b.payload());
    b.finish(OP_TEXT).0
}

/// `{"type":"system","message":"connected as NAME","clientId":ID,"session":"<32 hex>"}`
pub fn system_connected(name: &str, client_id: u64, session: u128) -> Bytes {
    text_frame(|out| {
        out.extend_from_slice(b"{\"type\":\"system\",\"message\":");
        write_json_str(out, &format!("connected as {name}"));
        out.extend_from_slice(b",\"clientId\":");
        out.extend_from_slice(client_id.to_string().as_bytes());
        out.extend_from_slice(b",\"session\":\"");
        out.extend_from_slice(format_session(session).as_bytes());
        out.extend_from_slice(b"\"}");
    })
}

/// A session as it travels: 32 lowercase hex digits.
pub fn format_session(session: u128) -> String {
    format!("{session:032x}")
}

/// A session given back by a client: exactly 32 lowercase hex digits, else `None`.
pub fn parse_session(s: &str) -> Option<u128> {
    let ok = s.len() == 32 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    ok.then(|| u128::from_str_radix(s, 16).ok()).flatten()
}

/// `{"type":"error","code":C,"message":HUMAN}`
pub fn error_event(code: ErrorCode) -> Bytes {
    text_frame(|out| {
        out.extend_from_slice(b"{\"type\":\"error\",\"code\":\"");
        out.extend_from_slice(code.as_str().as_bytes());
        out.extend_from_slice(b"\",\"message\":");
        write_json_str(out, code.human());
        out.push(b'}');
    })
}

/// `{"type":"ack","requestId":..,"id":..,"seq":..[,"duplicate":true]}`
pub fn ack_event(request_id: &str, id: &uuid::Uuid, seq: u64, duplicate: bool) -> Bytes {
    text_frame(|out| {
        out.extend_from_slice(b"{\"type\":\"ack\",\"requestId\":");
        write_json_str(out, request_id);
        out.extend_from_slice(b",\"id\":\"");
        out.extend_from_slice(
            id.hyphenated()
                .encode_lower(&mut uuid::Uuid::encode_buffer())
                .as_bytes(),
        );
        out.extend_from_slice(b"\",\"seq\":");
        out.extend_from_slice(seq.to_string().as_bytes());
        if duplicate {
            out.extend_from_slice(b",\"duplicate\":true");
        }
        out.push(b'}');
    })
}

/// One chat message, as published.
pub struct MessageFields<'a> {
    pub id: &'a uuid::Uuid,
    pub room: &'a str,
    pub from: &'a str,
    pub text: &'a str,
    pub sent_at: &'a str,
    /// The publisher's requestId, when it gave one (the second dialect always has one): part of
    /// the message object, so every dialect and every node sees it.
    pub request_id: Option<&'a str>,
    pub seq: u64,
}

/// A built message event.
pub struct MessageEvent {
    /// The broadcast frame `{"type":"message","message":{...}}`, allocated at its exact size
    /// (history keeps a slice of it, so any spare capacity would be pinned for as long).
    pub frame: Bytes,
    /// The inner `{...}` object, a slice of `frame` (kept in history without a second copy).
    pub inner: Bytes,
}

/// Bytes `s` takes as a JSON string, quotes included, written the way serde_json writes it:
/// `"`, `\` and the five short control escapes take two bytes, other control characters six
/// (`\u00XX`), everything else (non-ASCII included) as is.
fn json_str_len(s: &str) -> usize {
    2 + s
        .bytes()
        .map(|b| match b {
            b'"' | b'\\' | 0x08 | b'\t' | b'\n' | 0x0C | b'\r' => 2,
            0..=0x1F => 6,
            _ => 1,
        })
        .sum::<usize>()
}

fn decimal_len(n: u64) -> usize {
    n.checked_ilog10().map_or(1, |d| d as usize + 1)
}

const MESSAGE_OPEN: &[u8] = b"{\"type\":\"message\",\"message\":";

/// The inner message object `{"id":..,"room":..,"from":..,"text":..,"sentAt":..[,"requestId":..],"seq":` up to
/// its `seq`, and what follows the `seq`: a networked broker fills in the `seq` it assigns.
pub fn message_json_parts(m: &MessageFields<'_>) -> (String, &'static str) {
    let mut out = Vec::with_capacity(96 + m.text.len());
    write_message_head(&mut out, m);
    let head = String::from_utf8(out).expect("JSON written from str is UTF-8");
    (head, "}")
}

/// `{"id":"..","room":..,"from":..,"text":..,"sentAt":"..",["requestId":..,]"seq":` — every field of a message
/// object but the `seq` value, written once for the local and the networked broker alike.
fn write_message_head(out: &mut Vec<u8>, m: &MessageFields<'_>) {
    out.extend_from_slice(b"{\"id\":\"");
    out.extend_from_slice(
        m.id.hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer())
            .as_bytes(),
    );
    out.extend_from_slice(b"\",\"room\":");
    write_json_str(out, m.room);
    out.extend_from_slice(b",\"from\":");
    write_json_str(out, m.from);
    out.extend_from_slice(b",\"text\":");
    write_json_str(out, m.text);
    out.extend_from_slice(b",\"sentAt\":\"");
    out.extend_from_slice(m.sent_at.as_bytes());
    out.push(b'"');
    if let Some(rid) = m.request_id {
        out.extend_from_slice(b",\"requestId\":");
        write_json_str(out, rid);
    }
    out.extend_from_slice(b",\"seq\":");
}

/// The message event around an inner message object that came from a networked broker (built
/// by [`message_json_parts`] on some node), built once at its exact size.
pub fn message_event_from_json(inner_json: &[u8]) -> MessageEvent {
    let payload_len = MESSAGE_OPEN.len() + inner_json.len() + 1;
    let mut b = FrameBuilder::with_capacity(payload_len);
    b.payload().extend_from_slice(MESSAGE_OPEN);
    let inner_start = b.payload_len();
    b.payload().extend_from_slice(inner_json);
    let inner_end = b.payload_len();
    b.payload().push(b'}');
    let (frame, header_len) = b.finish(OP_TEXT);
    let inner = frame.slice(header_len + inner_start..header_len + inner_end);
    MessageEvent { frame, inner }
}

/// The message event, built once at its exact size.
pub fn message_event(m: &MessageFields<'_>) -> MessageEvent {
    let inner_len = "{\"id\":\"".len()
        + uuid::fmt::Hyphenated::LENGTH
        + "\",\"room\":".len()
        + json_str_len(m.room)
        + ",\"from\":".len()
        + json_str_len(m.from)
        + ",\"text\":".len()
        + json_str_len(m.text)
        + ",\"sentAt\":\"".len()
        + m.sent_at.len()
        + m.request_id
            .map_or(0, |r| ",\"requestId\":".len() + json_str_len(r))
        + "\",\"seq\":".len()
        + decimal_len(m.seq)
        + "}".len();
    let payload_len = MESSAGE_OPEN.len() + inner_len + 1;
    let mut b = FrameBuilder::with_capacity(payload_len);
    let out = b.payload();
    out.extend_from_slice(MESSAGE_OPEN);
    let inner_start = b.payload_len();
    let out = b.payload();
    write_message_head(out, m);
    out.extend_from_slice(m.seq.to_string().as_bytes());
    out.push(b'}');
    let inner_end = b.payload_len();
    b.payload().push(b'}');
    debug_assert_eq!(
        b.payload_len(),
        payload_len,
        "message size computed up front"
    );
    // A no-op when the size above is right; if it ever is not, the frame still pins no spare.
    b.payload().shrink_to_fit();
    let (frame, header_len) = b.finish(OP_TEXT);
    let inner = frame.slice(header_len + inner_start..header_len + inner_end);
    MessageEvent { frame, inner }
}

/// Whether a stored inner message object (from [`message_event`]) carries exactly `text`.
/// Used only when a requestId repeats, so parsing it again costs nothing on the hot path.
pub fn message_text_is(inner: &[u8], text: &str) -> bool {
    #[derive(Deserialize)]
    struct Stored<'a> {
        #[serde(borrow)]
        text: Cow<'a, str>,
    }
    serde_json::from_slice::<Stored<'_>>(inner).is_ok_and(|m| m.text == text)
}

/// `{"type":"history","room":R,"epoch":E,"complete":B,"messages":[...]}` from stored inner
/// message objects, oldest first.
pub fn history_event<'a>(
    room: &str,
    epoch: &str,
    complete: bool,
    messages: impl Iterator<Item = &'a Bytes> + Clone,
) -> Bytes {
    write_history("room", room, epoch, complete, messages, 1, |out, m| {
        out.extend_from_slice(m);
        true
    })
}

/// A history event, `{"type":"history","<room_key>":R,"epoch":E,"complete":B,"messages":[..]}`,
/// with each stored message written by `write_one` (which may decline one: false). Both
/// dialects' history events are this shape; `extra` is the bytes each message may add.
fn write_history<'a>(
    room_key: &str,
    room: &str,
    epoch: &str,
    complete: bool,
    messages: impl Iterator<Item = &'a Bytes> + Clone,
    extra: usize,
    mut write_one: impl FnMut(&mut Vec<u8>, &Bytes) -> bool,
) -> Bytes {
    let size: usize = messages.clone().map(|m| m.len() + extra).sum();
    let mut b = FrameBuilder::with_capacity(80 + room.len() + epoch.len() + size);
    let out = b.payload();
    out.extend_from_slice(b"{\"type\":\"history\",\"");
    out.extend_from_slice(room_key.as_bytes());
    out.extend_from_slice(b"\":");
    write_json_str(out, room);
    out.extend_from_slice(b",\"epoch\":");
    write_json_str(out, epoch);
    out.extend_from_slice(if complete {
        b",\"complete\":true"
    } else {
        b",\"complete\":false"
    });
    out.extend_from_slice(b",\"messages\":[");
    let mut first = true;
    for m in messages {
        let mark = out.len();
        if !first {
            out.push(b',');
        }
        if write_one(out, m) {
            first = false;
        } else {
            out.truncate(mark);
        }
    }
    out.extend_from_slice(b"]}");
    b.finish(OP_TEXT).0
}

/// Display names as a JSON array (presence crossing nodes).
pub fn names_json(names: &[std::sync::Arc<str>]) -> String {
    let names: Vec<&str> = names.iter().map(|n| &**n).collect();
    serde_json::to_string(&names).expect("strings serialise")
}

/// A JSON array of names from another node; `None` unless it is one (at most 20 kept).
pub fn parse_names(json: &str) -> Option<Vec<Cow<'_, str>>> {
    // Borrowed from `json` unless a name holds an escape: a presence event from another node
    // allocates nothing per name.
    // (serde borrows a `Cow` only as a field of its own, not inside a `Vec`.)
    #[derive(Deserialize)]
    struct Name<'a>(#[serde(borrow)] Cow<'a, str>);
    let names: Vec<Name<'_>> = serde_json::from_str(json).ok()?;
    Some(names.into_iter().take(20).map(|n| n.0).collect())
}

/// `{"type":"presence","message":M,"online":N,"joined":[..],"left":[..]}`
pub fn presence_event<N: AsRef<str>>(
    message: &str,
    online: usize,
    joined: &[N],
    left: &[N],
) -> Bytes {
    text_frame(|out| {
        out.extend_from_slice(b"{\"type\":\"presence\",\"message\":");
        write_json_str(out, message);
        out.extend_from_slice(b",\"online\":");
        out.extend_from_slice(online.to_string().as_bytes());
        for (key, names) in [(&b",\"joined\":["[..], joined), (&b",\"left\":["[..], left)] {
            out.extend_from_slice(key);
            for (i, n) in names.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_json_str(out, n.as_ref());
            }
            out.push(b']');
        }
        out.push(b'}');
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<ClientMessage<'_>, ErrorCode> {
        parse_client_message(s, 500)
    }

    /// The payload of a server frame (servers never mask).
    fn payload(frame: &Bytes) -> &[u8] {
        match frame[1] {
            126 => &frame[4..],
            127 => &frame[10..],
            _ => &frame[2..],
        }
    }

    #[test]
    fn valid_messages_borrow_their_text() {
        let m = parse(r#"{"type":"message","text":"  hi  ","from":"mallory","room":"x"}"#).unwrap();
        assert!(matches!(m.text, Cow::Borrowed("hi")));
        assert_eq!(m.request_id, None);
        let m = parse(r#"{"type":"message","text":"a\nb","requestId":"r1"}"#).unwrap();
        assert_eq!(
            (m.text.as_ref(), m.request_id.as_deref()),
            ("a\nb", Some("r1"))
        );
    }

    #[test]
    fn every_error_code_is_reachable() {
        assert_eq!(parse("nope"), Err(ErrorCode::BadJson));
        assert_eq!(parse("{\"type\":"), Err(ErrorCode::BadJson));
        assert_eq!(parse("{} trailing"), Err(ErrorCode::BadJson));
        for bad_type in [
            "null",
            "[1,2]",
            "[\"message\",\"hi\"]",
            "42",
            "\"text\"",
            r#"{"text":"hi"}"#,
            r#"{"type":"chat","text":"hi"}"#,
            r#"{"type":null,"text":"hi"}"#,
            r#"{"type":"message","text":null}"#,
            r#"{"type":"message","text":42}"#,
            r#"{"type":"message","text":{"a":1}}"#,
            r#"{"type":"message","text":["a"]}"#,
            r#"{"type":"message","type":"message","text":"hi"}"#,
        ] {
            assert_eq!(parse(bad_type), Err(ErrorCode::BadType), "{bad_type}");
        }
        let long_id = format!(
            r#"{{"type":"message","text":"hi","requestId":"{}"}}"#,
            "r".repeat(65)
        );
        for bad_id in [
            r#"{"type":"message","text":"hi","requestId":7}"#,
            r#"{"type":"message","text":"hi","requestId":""}"#,
            r#"{"type":"message","text":"hi","requestId":null}"#,
            &long_id,
        ] {
            assert_eq!(parse(bad_id), Err(ErrorCode::BadRequestId), "{bad_id}");
        }
        assert_eq!(ErrorCode::BadRequestId.as_str(), "bad_type");
        let event = error_event(ErrorCode::BadRequestId);
        let json = std::str::from_utf8(&event[2..]).expect("a short text frame of UTF-8");
        assert!(
            json.contains("\"code\":\"bad_type\"") && json.contains("requestId must be"),
            "{json}"
        );
        assert_eq!(parse(r#"{"type":"message"}"#), Err(ErrorCode::Empty));
        assert_eq!(
            parse(r#"{"type":"message","text":"   "}"#),
            Err(ErrorCode::Empty)
        );
        let long = format!(r#"{{"type":"message","text":"{}"}}"#, "é".repeat(501));
        assert_eq!(parse(&long), Err(ErrorCode::TooLarge));
        let ok = format!(r#"{{"type":"message","text":"{}"}}"#, "é".repeat(500));
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn trimming_follows_javascript() {
        assert_eq!(js_trim("\u{feff} hi \u{2028}"), "hi");
        assert_eq!(js_trim("\u{85}hi"), "\u{85}hi");
    }

    #[test]
    fn names_and_rooms_are_sanitised() {
        assert_eq!(sanitize_name(Some("  Ada L-1_ ")), "Ada L-1_");
        assert_eq!(sanitize_name(Some("<script>")), "guest");
        assert_eq!(sanitize_name(Some(&"a".repeat(25))), "guest");
        assert_eq!(sanitize_name(None), "guest");
        assert_eq!(sanitize_room(Some(" ops-1 ")), "ops-1");
        assert_eq!(sanitize_room(Some("a room")), "lobby");
        assert_eq!(sanitize_room(Some(&"r".repeat(33))), "lobby");
    }

    #[test]
    fn message_event_shares_its_inner_object_with_history() {
        let id = uuid::Uuid::new_v4();
        let m = MessageFields {
            id: &id,
            room: "r",
            from: "a\"b",
            text: "<b>",
            sent_at: "2026-01-01T00:00:00.000Z",
            request_id: Some("r\"1"),
            seq: 7,
        };
        let MessageEvent { frame, inner } = message_event(&m);
        let v: serde_json::Value = serde_json::from_slice(payload(&frame)).unwrap();
        assert_eq!(v["message"]["from"], "a\"b");
        assert_eq!(v["message"]["seq"], 7);
        let inner_v: serde_json::Value = serde_json::from_slice(&inner).unwrap();
        assert_eq!(inner_v, v["message"]);
        let h = history_event("r", "e1", false, [inner.clone(), inner.clone()].iter());
        let hv: serde_json::Value = serde_json::from_slice(payload(&h)).unwrap();
        assert_eq!(hv["messages"].as_array().unwrap().len(), 2);
        assert_eq!(hv["complete"], false);
        assert!(message_text_is(&inner, "<b>"));
        assert!(!message_text_is(&inner, "<b> "));
    }

    #[test]
    fn json_string_sizes_match_serde_json() {
        for c in (0u32..0x80)
            .filter_map(char::from_u32)
            .chain(['é', '€', '😀', '\u{2028}'])
        {
            let s = format!("a{c}b");
            assert_eq!(
                json_str_len(&s),
                serde_json::to_string(&s).unwrap().len(),
                "{c:?}"
            );
        }
    }

    #[test]
    fn message_frames_are_allocated_at_their_exact_size() {
        let id = uuid::Uuid::new_v4();
        for (text, seq) in [
            ("hi", 1),
            ("a\"\\\n\u{1}b", 9),
            (&*"😀".repeat(500), 1234567),
        ] {
            let m = MessageFields {
                id: &id,
                room: "room-1",
                from: "ada",
                text,
                sent_at: "2026-01-01T00:00:00.000Z",
                request_id: (seq == 9).then_some("r-9"),
                seq,
            };
            // message_event asserts (in debug builds) that the size it reserved is the size
            // it wrote; here the frame must also parse back to the same text.
            let MessageEvent { frame, inner } = message_event(&m);
            let v: serde_json::Value = serde_json::from_slice(payload(&frame)).unwrap();
            assert_eq!(v["message"]["text"], text);
            assert!(message_text_is(&inner, text));
        }
    }

    #[test]
    fn sessions_are_32_lowercase_hex_digits() {
        let s = 0x0123_4567_89ab_cdef_0011_2233_4455_6677u128;
        assert_eq!(format_session(s), "0123456789abcdef0011223344556677");
        assert_eq!(parse_session(&format_session(s)), Some(s));
        assert_eq!(parse_session(&format_session(1)), Some(1));
        for bad in [
            "",
            "0123456789ABCDEF0011223344556677",
            "0123456789abcdef001122334455667",
            "0123456789abcdef00112233445566778",
            "+123456789abcdef0011223344556677",
            "0123456789abcdef001122334455667g",
        ] {
            assert_eq!(parse_session(bad), None, "{bad}");
        }
        let greeting = system_connected("ada", 7, s);
        let v: serde_json::Value = serde_json::from_slice(payload(&greeting)).unwrap();
        assert_eq!(v["session"], "0123456789abcdef0011223344556677");
        assert_eq!(v["clientId"], 7);
    }

    #[test]
    fn a_networked_broker_builds_the_same_message_object() {
        let id = uuid::Uuid::new_v4();
        let m = MessageFields {
            id: &id,
            room: "r",
            from: "ada \"the\" first",
            text: "héllo\n<b>",
            sent_at: "2026-01-01T00:00:00.000Z",
            request_id: Some("req-1"),
            seq: 0,
        };
        let (head, tail) = message_json_parts(&m);
        let inner = format!("{head}42{tail}");
        let local = message_event(&MessageFields { seq: 42, ..m });
        assert_eq!(inner.as_bytes(), &local.inner[..]);
        let remote = message_event_from_json(inner.as_bytes());
        assert_eq!(
            remote.frame, local.frame,
            "the frame is byte-identical on every node"
        );
    }

    #[test]
    fn names_from_another_node_are_borrowed_unless_escaped() {
        let json = names_json(&["ada".into(), "zoë \"z\"".into()]);
        let names = parse_names(&json).expect("an array of names");
        assert_eq!(names, ["ada", "zoë \"z\""]);
        assert!(
            matches!(names[0], Cow::Borrowed(_)),
            "a plain name is not copied"
        );
        assert!(
            matches!(names[1], Cow::Owned(_)),
            "an escaped one is unescaped"
        );
        let many = names_json(&(0..30).map(|i| format!("u{i}").into()).collect::<Vec<_>>());
        assert_eq!(parse_names(&many).expect("array").len(), 20);
        assert_eq!(parse_names("{}"), None);
    }
}
