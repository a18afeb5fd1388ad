//! What roomcast keeps in Redis and sends through it: key and channel names, the scripts, and
//! the parsing of what comes back. No I/O here.
//!
//! Every key and the channel of a room carry the room's name as a `{hash tag}`, so they fall in
//! one slot and the publish script stays atomic on Redis Cluster.

use std::borrow::Cow;

use redis::Value;

use crate::hub::RoomSnapshot;

/// The publish script: de-duplication, `seq`, history append and trim, publish — one step.
pub(super) const PUBLISH_SCRIPT: &str = include_str!("../redis/publish.lua");
/// A node's snapshot of a room (epoch, last seq, history) for a join or a gap.
pub(super) const READ_SCRIPT: &str = include_str!("../redis/read.lua");
/// A node's member count for a room, the total over live nodes, and the presence event.
pub(super) const PRESENCE_SCRIPT: &str = include_str!("../redis/presence.lua");

/// The names of one room's keys and channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct RoomKeys {
    pub epoch: String,
    pub seq: String,
    pub history: String,
    pub dedupe: String,
    pub presence: String,
    pub channel: String,
}

impl RoomKeys {
    pub fn new(room: &str) -> RoomKeys {
        RoomKeys {
            epoch: format!("rc:{{{room}}}:epoch"),
            seq: format!("rc:{{{room}}}:seq"),
            history: format!("rc:{{{room}}}:history"),
            dedupe: format!("rc:{{{room}}}:dedupe"),
            presence: presence_key(room),
            channel: channel_name(room),
        }
    }
}

/// A room's presence hash alone (presence runs once per join or leave: no other key needed).
pub(super) fn presence_key(room: &str) -> String {
    format!("rc:{{{room}}}:presence")
}

/// A room's channel alone (subscribing needs nothing else).
pub(super) fn channel_name(room: &str) -> String {
    format!("rc:{{{room}}}:channel")
}

/// The node-wide control channel: requests every node acts on (the server API's disconnect).
pub(super) const CONTROL_CHANNEL: &str = "rc:control";

/// A disconnect request on the control channel: `D\nNAME\nROOM` (ROOM empty: every room).
pub(super) fn disconnect_request(name: &str, room: Option<&str>) -> String {
    format!("D\n{name}\n{}", room.unwrap_or(""))
}

/// Parse a control message: the disconnect request's (name, room).
pub(super) fn parse_disconnect(payload: &[u8]) -> Option<(&str, Option<&str>)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut parts = text.splitn(3, '\n');
    if parts.next()? != "D" {
        return None;
    }
    let name = parts.next().filter(|n| !n.is_empty())?;
    let room = parts.next()?;
    Some((name, (!room.is_empty()).then_some(room)))
}

/// The room a channel belongs to (`rc:{ROOM}:channel`).
pub(super) fn room_of_channel(channel: &str) -> Option<&str> {
    channel.strip_prefix("rc:{")?.strip_suffix("}:channel")
}

/// One message as it travels on a room's channel: `EPOCH\nSEQ\nJSON`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ChannelMessage<'a> {
    pub epoch: &'a str,
    pub seq: u64,
    /// The inner message object, as stored in history.
    pub json: &'a [u8],
}

/// Parse a channel payload; `None` for anything roomcast did not publish.
pub(super) fn parse_channel_message(payload: &[u8]) -> Option<ChannelMessage<'_>> {
    let mut parts = payload.splitn(3, |&b| b == b'\n');
    let epoch = std::str::from_utf8(parts.next()?).ok()?;
    let seq = parse_seq(parts.next()?)?;
    let json = parts.next()?;
    if epoch.is_empty() || !is_message_object(json) {
        return None;
    }
    Some(ChannelMessage { epoch, seq, json })
}

/// A presence event as it travels on a room's channel: `P\nTOTAL\nMESSAGE\nJOINED\nLEFT`.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct ChannelPresence<'a> {
    /// Members of the room on every live node.
    pub online: u64,
    pub message: &'a str,
    pub joined: Vec<Cow<'a, str>>,
    pub left: Vec<Cow<'a, str>>,
}

pub(super) fn parse_channel_presence(payload: &[u8]) -> Option<ChannelPresence<'_>> {
    let text = std::str::from_utf8(payload.strip_prefix(b"P\n")?).ok()?;
    let mut parts = text.splitn(4, '\n');
    let online = parts.next()?.parse().ok()?;
    let message = parts.next()?;
    let joined = crate::protocol::parse_names(parts.next()?)?;
    let left = crate::protocol::parse_names(parts.next()?)?;
    Some(ChannelPresence {
        online,
        message,
        joined,
        left,
    })
}

/// One history entry (`SEQ\nJSON\nDEDUPE-KEY`): its seq and inner message object.
pub(super) fn parse_history_entry(entry: &[u8]) -> Option<(u64, &[u8])> {
    let mut parts = entry.splitn(3, |&b| b == b'\n');
    let seq = parse_seq(parts.next()?)?;
    let json = parts.next()?;
    is_message_object(json).then_some((seq, json))
}

fn parse_seq(digits: &[u8]) -> Option<u64> {
    std::str::from_utf8(digits)
        .ok()?
        .parse()
        .ok()
        .filter(|&s| s > 0)
}

/// A cheap shape check: the relay builds these objects itself, so anything else on a channel
/// (a foreign publisher, garbage) is refused before it could reach a client.
fn is_message_object(json: &[u8]) -> bool {
    json.first() == Some(&b'{')
        && json.last() == Some(&b'}')
        && serde_json::from_slice::<serde::de::IgnoredAny>(json).is_ok()
}

/// What the publish script answered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum PublishReply {
    /// Published as `seq` in `epoch`.
    New { seq: u64, epoch: String },
    /// The same session already published this requestId with the same text.
    Duplicate { seq: u64, id: uuid::Uuid },
    /// The same session already published this requestId with another text.
    Conflict,
}

pub(super) fn parse_publish_reply(value: &Value) -> Option<PublishReply> {
    let Value::Array(items) = value else {
        return None;
    };
    match items.as_slice() {
        [Value::Int(1), Value::Int(seq), epoch] => Some(PublishReply::New {
            seq: u64::try_from(*seq).ok()?,
            epoch: string(epoch)?,
        }),
        [Value::Int(2), Value::Int(seq), id, _epoch] => Some(PublishReply::Duplicate {
            seq: u64::try_from(*seq).ok()?,
            id: string(id)?.parse().ok()?,
        }),
        [Value::Int(3)] => Some(PublishReply::Conflict),
        _ => None,
    }
}

/// A room as the read script saw it.
pub(super) fn parse_snapshot(value: &Value) -> Option<RoomSnapshot> {
    let Value::Array(items) = value else {
        return None;
    };
    let [epoch, Value::Int(seq), Value::Array(entries)] = items.as_slice() else {
        return None;
    };
    let history = entries
        .iter()
        .filter_map(|e| match e {
            Value::BulkString(b) => parse_history_entry(b).map(|(s, j)| (s, j.to_vec())),
            _ => None,
        })
        .collect();
    Some(RoomSnapshot {
        epoch: string(epoch)?,
        seq: u64::try_from(*seq).ok()?,
        history,
    })
}

fn string(v: &Value) -> Option<String> {
    match v {
        Value::BulkString(b) => String::from_utf8(b.clone()).ok(),
        Value::SimpleString(s) => Some(s.clone()),
        _ => None,
    }
}

/// A short, stable hash of a message text (FNV-1a, 64 bits, hex): enough to tell a retry of the
/// same text from another text under the same requestId, without storing the text twice.
pub(super) fn text_hash(text: &str) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in text.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// The de-duplication key of a publish: session and requestId (the requestId may hold any
/// character, so it comes last).
pub(super) fn dedupe_key(session: u128, request_id: Option<&str>) -> String {
    match request_id {
        Some(rid) => format!("{session:032x}:{rid}"),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_channel_share_the_room_hash_tag() {
        let k = RoomKeys::new("ops-1");
        for key in [
            &k.epoch,
            &k.seq,
            &k.history,
            &k.dedupe,
            &k.presence,
            &k.channel,
        ] {
            assert!(key.contains("{ops-1}"), "{key}");
        }
        assert_eq!(room_of_channel(&k.channel), Some("ops-1"));
        assert_eq!(room_of_channel("other"), None);
    }

    #[test]
    fn channel_messages_parse_and_garbage_does_not() {
        let m = parse_channel_message(b"e1\n42\n{\"seq\":42}").expect("valid");
        assert_eq!((m.epoch, m.seq, m.json), ("e1", 42, &b"{\"seq\":42}"[..]));
        for garbage in [
            &b""[..],
            b"hello",
            b"e1\nx\n{}",
            b"e1\n0\n{}",
            b"e1\n5\nnot json",
            b"e1\n5\n{\"a\":",
            b"\n5\n{}",
            b"e1\n5\n[1]",
        ] {
            assert_eq!(parse_channel_message(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn presence_on_the_channel_parses() {
        let p = parse_channel_presence(b"P\n7\nada joined\n[\"ada\"]\n[]").expect("valid");
        assert_eq!(p.online, 7);
        assert_eq!(p.message, "ada joined");
        assert_eq!(p.joined, ["ada"]);
        assert!(p.left.is_empty());
        assert_eq!(parse_channel_presence(b"P\nx\n\n[]\n[]"), None);
        assert_eq!(parse_channel_presence(b"P\n1\nm\nnot json\n[]"), None);
        assert_eq!(parse_channel_presence(b"e1\n1\n{}"), None);
    }

    #[test]
    fn history_entries_keep_any_dedupe_key() {
        assert_eq!(
            parse_history_entry(b"7\n{\"a\":1}\nsess:rid\nwith newline"),
            Some((7, &b"{\"a\":1}"[..]))
        );
        assert_eq!(
            parse_history_entry(b"7\n{\"a\":1}\n"),
            Some((7, &b"{\"a\":1}"[..]))
        );
        assert_eq!(parse_history_entry(b"7"), None);
    }

    #[test]
    fn publish_replies_parse() {
        let new = Value::Array(vec![
            Value::Int(1),
            Value::Int(9),
            Value::BulkString(b"ep".to_vec()),
        ]);
        assert_eq!(
            parse_publish_reply(&new),
            Some(PublishReply::New {
                seq: 9,
                epoch: "ep".into()
            })
        );
        let id = uuid::Uuid::new_v4();
        let dup = Value::Array(vec![
            Value::Int(2),
            Value::Int(3),
            Value::BulkString(id.to_string().into_bytes()),
            Value::BulkString(b"ep".to_vec()),
        ]);
        assert_eq!(
            parse_publish_reply(&dup),
            Some(PublishReply::Duplicate { seq: 3, id })
        );
        assert_eq!(
            parse_publish_reply(&Value::Array(vec![Value::Int(3)])),
            Some(PublishReply::Conflict)
        );
        assert_eq!(parse_publish_reply(&Value::Nil), None);
    }

    #[test]
    fn text_hashes_differ_for_different_texts() {
        assert_eq!(text_hash("hi"), text_hash("hi"));
        assert_ne!(text_hash("hi"), text_hash("hj"));
        assert_eq!(text_hash("").len(), 16);
        assert_eq!(dedupe_key(1, None), "");
        assert_eq!(
            dedupe_key(0xab, Some("r:1")),
            "000000000000000000000000000000ab:r:1"
        );
    }
}
