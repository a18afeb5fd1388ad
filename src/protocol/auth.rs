//! The second client dialect: `GET /` upgrade, an `auth` message first, then any number of
//! rooms over one connection (docs/PROTOCOL.md, "The second dialect").
//!
//! Inbound messages are parsed in place like the first dialect's. Every invalid input has a
//! close reason (1008) rather than an error event, as the dialect's published clients expect.
//! Outbound chat events are built from the same stored message object the first dialect uses
//! (`super::message_event`), so a message is one object in history and in Redis whichever
//! dialect sent it, and is encoded once per dialect that has members in the room.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;
use serde_json::value::RawValue;

use super::{as_string, js_trim, text_frame, write_history, write_json_str};
use crate::frame::{FrameBuilder, OP_TEXT};

/// Longest text, in characters after trimming.
pub const MAX_TEXT_CHARS: usize = 1000;
/// Longest requestId kept as given (a longer one, or one that is not a string, is replaced).
pub const MAX_REQUEST_ID_CHARS: usize = 100;
/// Longest message a client may send: past it the connection closes 1008.
pub const MAX_MESSAGE_BYTES: usize = 8192;
/// Longest room id.
pub const MAX_ROOM_CHARS: usize = 64;

/// One valid client message of the second dialect.
#[derive(Debug, PartialEq, Eq)]
pub enum Command<'a> {
    Auth {
        token: Cow<'a, str>,
    },
    Join {
        room: &'a str,
        /// `"history":true`: the join is answered with the room's history too.
        history: bool,
        /// `"since"` (and `"epoch"`): exact resume, as in the first dialect.
        since: Option<(u64, Option<String>)>,
    },
    Leave {
        room: &'a str,
    },
    Chat {
        room: &'a str,
        text: Cow<'a, str>,
        /// `None` when the client gave none (or an unusable one): the relay makes one.
        request_id: Option<Cow<'a, str>>,
    },
    Ping,
}

/// Why a message is refused: the reason of the 1008 close (short, under 123 bytes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Invalid(pub &'static str);

/// The keys a command may carry, in the order `parse` takes them apart.
const KEYS: [&str; 8] = [
    "type",
    "token",
    "roomId",
    "text",
    "requestId",
    "history",
    "since",
    "epoch",
];

/// A command's fields, raw (`Some` for a key that is present, `null` included).
struct Fields<'a> {
    kind: Option<&'a RawValue>,
    token: Option<&'a RawValue>,
    room: Option<&'a RawValue>,
    text: Option<&'a RawValue>,
    request_id: Option<&'a RawValue>,
    history: Option<&'a RawValue>,
    since: Option<&'a RawValue>,
    epoch: Option<&'a RawValue>,
}

/// A room id: `^[a-zA-Z0-9:_-]{1,64}$`, taken exactly (no trimming).
pub fn is_room_id(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_ROOM_CHARS
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b':' | b'_' | b'-'))
}

/// A room id as a borrowed string: room ids have no escapes, so one with a backslash (or any
/// character outside the rule) is invalid.
fn room_id(raw: Option<&RawValue>) -> Result<&str, Invalid> {
    let json = raw.map(RawValue::get).ok_or(Invalid("invalid roomId"))?;
    let inner = json
        .strip_prefix('"')
        .and_then(|s| s.strip_suffix('"'))
        .ok_or(Invalid("invalid roomId"))?;
    if is_room_id(inner) {
        Ok(inner)
    } else {
        Err(Invalid("invalid roomId"))
    }
}

/// Parse one text payload (already known to be UTF-8).
pub fn parse(payload: &str) -> Result<Command<'_>, Invalid> {
    if !payload.trim_start().starts_with('{') {
        return Err(
            match serde_json::from_str::<serde::de::IgnoredAny>(payload) {
                Ok(_) => Invalid("expected a JSON object"),
                Err(_) => Invalid("invalid JSON"),
            },
        );
    }
    let [kind, token, room, text, request_id, history, since, epoch] =
        super::object_fields(payload, &KEYS).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => Invalid("invalid message"),
            _ => Invalid("invalid JSON"),
        })?;
    let f = Fields {
        kind,
        token,
        room,
        text,
        request_id,
        history,
        since,
        epoch,
    };
    let kind = f.kind.and_then(as_string).ok_or(Invalid("unknown type"))?;
    match &*kind {
        "auth" => {
            // A missing or non-string token is a wrong token.
            let token = f.token.and_then(as_string).unwrap_or_default();
            Ok(Command::Auth { token })
        }
        "join" => {
            let room = room_id(f.room)?;
            let history = matches!(f.history.map(RawValue::get), Some("true"));
            let since = match f.since {
                None => None,
                Some(raw) => {
                    // A position the relay could not have issued gets everything held and
                    // complete:false, as in the first dialect.
                    let since = raw.get().parse::<u64>().unwrap_or(u64::MAX);
                    let epoch = f
                        .epoch
                        .and_then(as_string)
                        .filter(|e| e.len() <= 64)
                        .map(Cow::into_owned);
                    Some((since, epoch))
                }
            };
            Ok(Command::Join {
                room,
                history,
                since,
            })
        }
        "leave" => Ok(Command::Leave {
            room: room_id(f.room)?,
        }),
        "chat" => {
            let room = room_id(f.room)?;
            let text = f.text.and_then(as_string).ok_or(Invalid("invalid text"))?;
            let text = match text {
                Cow::Borrowed(s) => Cow::Borrowed(js_trim(s)),
                Cow::Owned(s) if js_trim(&s).len() == s.len() => Cow::Owned(s),
                Cow::Owned(s) => Cow::Owned(js_trim(&s).to_string()),
            };
            let chars = text.chars().count();
            if chars == 0 || chars > MAX_TEXT_CHARS {
                return Err(Invalid("invalid text"));
            }
            let request_id = f.request_id.and_then(as_string).filter(|r| {
                let chars = r.chars().count();
                chars > 0 && chars <= MAX_REQUEST_ID_CHARS
            });
            Ok(Command::Chat {
                room,
                text,
                request_id,
            })
        }
        "ping" => Ok(Command::Ping),
        _ => Err(Invalid("unknown type")),
    }
}

/// `{"type":"auth_ok","connectionId":"<uuid>","userId":U}`
pub fn auth_ok(connection_id: &uuid::Uuid, user_id: &str) -> Bytes {
    text_frame(|out| {
        out.extend_from_slice(b"{\"type\":\"auth_ok\",\"connectionId\":\"");
        out.extend_from_slice(
            connection_id
                .hyphenated()
                .encode_lower(&mut uuid::Uuid::encode_buffer())
                .as_bytes(),
        );
        out.extend_from_slice(b"\",\"userId\":");
        write_json_str(out, user_id);
        out.push(b'}');
    })
}

/// `{"type":"joined","roomId":R}`
pub fn joined(room: &str) -> Bytes {
    text_frame(|out| {
        out.extend_from_slice(b"{\"type\":\"joined\",\"roomId\":");
        write_json_str(out, room);
        out.push(b'}');
    })
}

/// `{"type":"pong","sentAt":"<RFC 3339>"}`
pub fn pong(sent_at: &str) -> Bytes {
    text_frame(|out| {
        out.extend_from_slice(b"{\"type\":\"pong\",\"sentAt\":");
        write_json_str(out, sent_at);
        out.push(b'}');
    })
}

/// The stored message object (`super::message_event`'s inner object), read back.
#[derive(Deserialize)]
struct Stored<'a> {
    #[serde(borrow)]
    id: Cow<'a, str>,
    #[serde(borrow)]
    room: Cow<'a, str>,
    #[serde(borrow)]
    from: Cow<'a, str>,
    #[serde(borrow)]
    text: Cow<'a, str>,
    #[serde(rename = "sentAt", borrow)]
    sent_at: Cow<'a, str>,
    #[serde(rename = "requestId", borrow, default)]
    request_id: Option<Cow<'a, str>>,
    seq: u64,
}

/// `{"type":"chat","id","requestId","roomId","userId","text","sentAt","seq"}` from a stored
/// message object. A message published without a requestId (the first dialect allows that)
/// carries its id there. `None` when `inner` is not a message object (it always is, unless a
/// networked broker's data was tampered with).
fn write_chat(out: &mut Vec<u8>, inner: &[u8]) -> Option<()> {
    let m: Stored<'_> = serde_json::from_slice(inner).ok()?;
    out.extend_from_slice(b"{\"type\":\"chat\",\"id\":");
    write_json_str(out, &m.id);
    out.extend_from_slice(b",\"requestId\":");
    write_json_str(out, m.request_id.as_deref().unwrap_or(&m.id));
    out.extend_from_slice(b",\"roomId\":");
    write_json_str(out, &m.room);
    out.extend_from_slice(b",\"userId\":");
    write_json_str(out, &m.from);
    out.extend_from_slice(b",\"text\":");
    write_json_str(out, &m.text);
    out.extend_from_slice(b",\"sentAt\":");
    write_json_str(out, &m.sent_at);
    out.extend_from_slice(b",\"seq\":");
    out.extend_from_slice(m.seq.to_string().as_bytes());
    out.push(b'}');
    Some(())
}

/// The chat event for a stored message object, built once for every second-dialect member.
pub fn chat_event(inner: &[u8]) -> Option<Bytes> {
    let mut b = FrameBuilder::with_capacity(inner.len() + 64);
    write_chat(b.payload(), inner)?;
    Some(b.finish(OP_TEXT).0)
}

/// `{"type":"history","roomId":R,"epoch":E,"complete":B,"messages":[chat events]}`, oldest
/// first (a stored object that does not read back is left out).
pub fn history_event<'a>(
    room: &str,
    epoch: &str,
    complete: bool,
    messages: impl Iterator<Item = &'a Bytes> + Clone,
) -> Bytes {
    write_history("roomId", room, epoch, complete, messages, 64, |out, m| {
        write_chat(out, m).is_some()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{message_event, MessageFields};

    fn payload(frame: &Bytes) -> serde_json::Value {
        let body = match frame[1] & 0x7f {
            126 => &frame[4..],
            127 => &frame[10..],
            _ => &frame[2..],
        };
        serde_json::from_slice(body).unwrap()
    }

    #[test]
    fn the_four_published_messages_parse() {
        assert_eq!(
            parse(r#"{"type":"auth","token":"t"}"#),
            Ok(Command::Auth { token: "t".into() })
        );
        assert_eq!(
            parse(r#"{"type":"join","roomId":"room:demo"}"#),
            Ok(Command::Join {
                room: "room:demo",
                history: false,
                since: None
            })
        );
        assert_eq!(
            parse(r#"{"type":"join","roomId":"a","history":true,"since":3,"epoch":"e"}"#),
            Ok(Command::Join {
                room: "a",
                history: true,
                since: Some((3, Some("e".into())))
            })
        );
        assert_eq!(
            parse(r#"{"type":"chat","roomId":"room:demo","requestId":"r1","text":" hi "}"#),
            Ok(Command::Chat {
                room: "room:demo",
                text: "hi".into(),
                request_id: Some("r1".into())
            })
        );
        assert_eq!(parse(r#"{"type":"ping"}"#), Ok(Command::Ping));
        assert_eq!(
            parse(r#"{"type":"leave","roomId":"x"}"#),
            Ok(Command::Leave { room: "x" })
        );
    }

    #[test]
    fn invalid_input_has_a_reason() {
        for (input, reason) in [
            ("nope", "invalid JSON"),
            ("[1]", "expected a JSON object"),
            ("42", "expected a JSON object"),
            (r#"{"type":"dance"}"#, "unknown type"),
            (r#"{"text":"x"}"#, "unknown type"),
            (r#"{"type":"join"}"#, "invalid roomId"),
            (r#"{"type":"join","roomId":"a b"}"#, "invalid roomId"),
            (r#"{"type":"join","roomId":"a\u0062"}"#, "invalid roomId"),
            (r#"{"type":"join","roomId":7}"#, "invalid roomId"),
            (
                r#"{"type":"chat","roomId":"a","text":"  "}"#,
                "invalid text",
            ),
            (r#"{"type":"chat","roomId":"a","text":5}"#, "invalid text"),
            (r#"{"type":"chat","roomId":"a"}"#, "invalid text"),
        ] {
            assert_eq!(parse(input), Err(Invalid(reason)), "{input}");
        }
        let long_room = format!(r#"{{"type":"join","roomId":"{}"}}"#, "r".repeat(65));
        assert_eq!(parse(&long_room), Err(Invalid("invalid roomId")));
        let ok_room = format!(r#"{{"type":"join","roomId":"{}"}}"#, "r".repeat(64));
        assert!(parse(&ok_room).is_ok());
        let long = format!(
            r#"{{"type":"chat","roomId":"a","text":"{}"}}"#,
            "é".repeat(1001)
        );
        assert_eq!(parse(&long), Err(Invalid("invalid text")));
        let ok = format!(
            r#"{{"type":"chat","roomId":"a","text":"{}"}}"#,
            "é".repeat(1000)
        );
        assert!(parse(&ok).is_ok());
    }

    #[test]
    fn an_unusable_request_id_is_replaced() {
        for rid in ["7", "null", "\"\"", &format!("\"{}\"", "x".repeat(101))] {
            let input = format!(r#"{{"type":"chat","roomId":"a","text":"hi","requestId":{rid}}}"#);
            let Ok(Command::Chat { request_id, .. }) = parse(&input) else {
                panic!("{input}")
            };
            assert_eq!(request_id, None, "{input}");
        }
    }

    #[test]
    fn chat_events_are_built_from_the_stored_message() {
        let id = uuid::Uuid::new_v4();
        let fields = MessageFields {
            id: &id,
            room: "room:demo",
            from: "ada",
            text: "hé \"x\"",
            sent_at: "2026-01-01T00:00:00.000Z",
            request_id: Some("r1"),
            seq: 5,
        };
        let e = message_event(&fields);
        let v = payload(&chat_event(&e.inner).unwrap());
        assert_eq!(v["type"], "chat");
        assert_eq!(v["id"], id.to_string());
        assert_eq!(v["requestId"], "r1");
        assert_eq!(v["roomId"], "room:demo");
        assert_eq!(v["userId"], "ada");
        assert_eq!(v["text"], "hé \"x\"");
        assert_eq!(v["seq"], 5);
        let without = message_event(&MessageFields {
            request_id: None,
            ..fields
        });
        let v = payload(&chat_event(&without.inner).unwrap());
        assert_eq!(v["requestId"], id.to_string(), "the id stands in");
        let h = payload(&history_event(
            "room:demo",
            "ep",
            true,
            [e.inner.clone(), Bytes::from_static(b"junk"), without.inner].iter(),
        ));
        assert_eq!(h["roomId"], "room:demo");
        assert_eq!(h["messages"].as_array().unwrap().len(), 2);
        assert_eq!(h["messages"][0]["type"], "chat");
        assert_eq!(chat_event(b"junk"), None);
    }
}
