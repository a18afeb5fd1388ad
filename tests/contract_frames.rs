//! Contract: frames (RFC 6455), tested with hand-built frames over raw TCP. Binary → 1003; a
//! payload over 2048 bytes → 1009 without reading it; protocol violations → 1002; invalid UTF-8 →
//! 1007; pings are answered; a client's close is echoed; fragmented text is reassembled.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

const MASK: [u8; 4] = [0x11, 0x22, 0x33, 0x44];

/// Connect raw, wait until the relay has greeted us, send `bytes`, and return the close code.
async fn close_code_after(relay: &Relay, bytes: &[u8]) -> Option<u16> {
    let mut raw = RawClient::connect(relay, "raw", "frames").await;
    let system = raw.next_json(EVENT_TIMEOUT).await;
    assert_eq!(system["type"], "system");
    raw.send_raw(bytes).await.expect("write frame bytes");
    raw.expect_close(EVENT_TIMEOUT).await
}

fn text_message(text: &str) -> Vec<u8> {
    json!({"type": "message", "text": text})
        .to_string()
        .into_bytes()
}

#[tokio::test]
async fn binary_frame_is_closed_with_1003() {
    let relay = Relay::start(&[]);
    let mut raw = RawClient::connect(&relay, "raw", "frames").await;
    raw.next_json(EVENT_TIMEOUT).await;
    raw.send_frame(true, OP_BINARY, &text_message("as binary"))
        .await;
    assert_eq!(raw.expect_close(EVENT_TIMEOUT).await, Some(1003));
    raw.expect_eof(Duration::from_secs(5)).await;
    wait_for_metric(
        &relay,
        "roomcast_connections_closed_total",
        &[("code", "1003")],
        Duration::from_secs(5),
        |v| v >= 1.0,
    )
    .await;
}

#[tokio::test]
async fn frame_declaring_more_than_2048_bytes_is_closed_with_1009_before_its_payload_arrives() {
    let relay = Relay::start(&[]);
    // Only the header is sent: the relay must decide from the declared length alone.
    let header_2049 = build_frame(true, 0, OP_TEXT, Some(MASK), &[], Some(2049));
    assert_eq!(
        close_code_after(&relay, &header_2049).await,
        Some(1009),
        "16-bit length 2049"
    );
    let header_huge = build_frame(true, 0, OP_TEXT, Some(MASK), &[], Some(1 << 40));
    assert_eq!(
        close_code_after(&relay, &header_huge).await,
        Some(1009),
        "64-bit length 2^40"
    );
    let binary_huge = build_frame(true, 0, OP_BINARY, Some(MASK), &[], Some(100_000));
    let code = close_code_after(&relay, &binary_huge).await;
    assert!(
        code == Some(1009) || code == Some(1003),
        "oversized binary frame: {code:?}"
    );
}

#[tokio::test]
async fn frame_of_exactly_2048_bytes_is_read_not_closed() {
    let relay = Relay::start(&[]);
    let mut raw = RawClient::connect(&relay, "raw", "frames").await;
    raw.next_json(EVENT_TIMEOUT).await;
    let prefix = r#"{"type":"message","text":""#;
    let filler = "a".repeat(2048 - prefix.len() - 2);
    let payload = format!("{prefix}{filler}\"}}");
    assert_eq!(payload.len(), 2048);
    raw.send_text(&payload).await;
    let error = raw.next_json_of_type("error", EVENT_TIMEOUT).await;
    assert_eq!(
        error["code"], "too_large",
        "a 2048-byte frame is within the payload limit; its text is too long: {error}"
    );
    raw.send_text(&json!({"type": "message", "text": "after"}).to_string())
        .await;
    let m = raw.next_json_of_type("message", EVENT_TIMEOUT).await;
    assert_eq!(m["message"]["text"], "after");
}

#[tokio::test]
async fn fragmented_message_over_2048_bytes_in_total_is_closed_with_1009() {
    let relay = Relay::start(&[]);
    let mut bytes = build_frame(false, 0, OP_TEXT, Some(MASK), &[b'a'; 1500], None);
    bytes.extend(build_frame(
        true,
        0,
        OP_CONTINUATION,
        Some(MASK),
        &[b'a'; 1500],
        None,
    ));
    assert_eq!(close_code_after(&relay, &bytes).await, Some(1009));
}

#[tokio::test]
async fn unmasked_client_frame_is_closed_with_1002() {
    let relay = Relay::start(&[]);
    let frame = build_frame(true, 0, OP_TEXT, None, &text_message("unmasked"), None);
    assert_eq!(close_code_after(&relay, &frame).await, Some(1002));
}

#[tokio::test]
async fn reserved_bits_without_an_extension_are_closed_with_1002() {
    let relay = Relay::start(&[]);
    for rsv in [0b100u8, 0b010, 0b001] {
        let frame = build_frame(true, rsv, OP_TEXT, Some(MASK), &text_message("rsv"), None);
        assert_eq!(
            close_code_after(&relay, &frame).await,
            Some(1002),
            "RSV bits {rsv:03b}"
        );
    }
}

#[tokio::test]
async fn unknown_opcode_is_closed_with_1002() {
    let relay = Relay::start(&[]);
    for opcode in [0x3u8, 0x7, 0xB, 0xF] {
        let frame = build_frame(true, 0, opcode, Some(MASK), b"x", None);
        assert_eq!(
            close_code_after(&relay, &frame).await,
            Some(1002),
            "opcode {opcode:#x}"
        );
    }
}

#[tokio::test]
async fn continuation_without_a_started_message_is_closed_with_1002() {
    let relay = Relay::start(&[]);
    let frame = build_frame(
        true,
        0,
        OP_CONTINUATION,
        Some(MASK),
        &text_message("orphan"),
        None,
    );
    assert_eq!(close_code_after(&relay, &frame).await, Some(1002));
}

#[tokio::test]
async fn new_data_frame_inside_a_fragmented_message_is_closed_with_1002() {
    let relay = Relay::start(&[]);
    let mut bytes = build_frame(false, 0, OP_TEXT, Some(MASK), b"{\"type\":", None);
    bytes.extend(build_frame(
        true,
        0,
        OP_TEXT,
        Some(MASK),
        &text_message("interloper"),
        None,
    ));
    assert_eq!(close_code_after(&relay, &bytes).await, Some(1002));
}

#[tokio::test]
async fn fragmented_or_oversized_control_frame_is_closed_with_1002() {
    let relay = Relay::start(&[]);
    let fragmented_ping = build_frame(false, 0, OP_PING, Some(MASK), b"x", None);
    assert_eq!(
        close_code_after(&relay, &fragmented_ping).await,
        Some(1002),
        "ping without FIN"
    );
    let long_ping = build_frame(true, 0, OP_PING, Some(MASK), &[b'p'; 126], None);
    assert_eq!(
        close_code_after(&relay, &long_ping).await,
        Some(1002),
        "ping with 126-byte payload"
    );
}

#[tokio::test]
async fn close_frame_with_an_invalid_payload_is_closed_with_1002() {
    let relay = Relay::start(&[]);
    let one_byte = build_frame(true, 0, OP_CLOSE, Some(MASK), &[0x03], None);
    assert_eq!(
        close_code_after(&relay, &one_byte).await,
        Some(1002),
        "1-byte close payload"
    );
    for code in [999u16, 1005, 1006, 2999] {
        let frame = build_frame(true, 0, OP_CLOSE, Some(MASK), &code.to_be_bytes(), None);
        assert_eq!(
            close_code_after(&relay, &frame).await,
            Some(1002),
            "close with reserved code {code}"
        );
    }
}

#[tokio::test]
async fn invalid_utf8_text_is_closed_with_1007() {
    let relay = Relay::start(&[]);
    let cases: [(&str, &[u8]); 4] = [
        ("0xFF 0xFE", &[0xff, 0xfe]),
        ("overlong encoding", &[b'{', 0xc0, 0xaf, b'}']),
        ("UTF-16 surrogate", &[0xed, 0xa0, 0x80]),
        ("truncated sequence", &[b'"', 0xe2, 0x82]),
    ];
    for (what, payload) in cases {
        let frame = build_frame(true, 0, OP_TEXT, Some(MASK), payload, None);
        assert_eq!(close_code_after(&relay, &frame).await, Some(1007), "{what}");
    }
}

#[tokio::test]
async fn invalid_utf8_across_fragments_is_closed_with_1007() {
    let relay = Relay::start(&[]);
    let mut bytes = build_frame(
        false,
        0,
        OP_TEXT,
        Some(MASK),
        b"{\"type\":\"message\",\"text\":\"",
        None,
    );
    bytes.extend(build_frame(
        true,
        0,
        OP_CONTINUATION,
        Some(MASK),
        &[0xff, b'"', b'}'],
        None,
    ));
    assert_eq!(close_code_after(&relay, &bytes).await, Some(1007));
}

#[tokio::test]
async fn invalid_utf8_in_a_close_reason_is_closed_with_1007() {
    let relay = Relay::start(&[]);
    let frame = build_frame(
        true,
        0,
        OP_CLOSE,
        Some(MASK),
        &[0x03, 0xe8, 0xff, 0xfe],
        None,
    );
    assert_eq!(close_code_after(&relay, &frame).await, Some(1007));
}

#[tokio::test]
async fn fragmented_text_is_reassembled_even_when_a_character_is_split() {
    let relay = Relay::start(&[]);
    let (mut bob, _, _) = Client::join(&relay, "bob", "frames").await;
    let mut raw = RawClient::connect(&relay, "raw", "frames").await;
    raw.next_json(EVENT_TIMEOUT).await;

    let whole = json!({"type": "message", "text": "fragmented é message"})
        .to_string()
        .into_bytes();
    let e_acute = whole
        .iter()
        .position(|&b| b == 0xc3)
        .expect("é is in the payload");
    // Three fragments, the second boundary splitting the two bytes of "é", with a ping between.
    let (a, rest) = whole.split_at(10);
    let (b, c) = rest.split_at(e_acute + 1 - 10);
    raw.send_raw(&build_frame(false, 0, OP_TEXT, Some(MASK), a, None))
        .await
        .unwrap();
    raw.send_raw(&build_frame(false, 0, OP_CONTINUATION, Some(MASK), b, None))
        .await
        .unwrap();
    raw.send_raw(&build_frame(true, 0, OP_PING, Some(MASK), b"mid", None))
        .await
        .unwrap();
    raw.send_raw(&build_frame(true, 0, OP_CONTINUATION, Some(MASK), c, None))
        .await
        .unwrap();

    let mut pong = None;
    let mut message = None;
    while pong.is_none() || message.is_none() {
        let frame = raw
            .read_frame(EVENT_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("waiting for pong and message: {e:?}"));
        match frame.opcode {
            OP_PONG => pong = Some(frame.payload),
            OP_TEXT => {
                let v: serde_json::Value = serde_json::from_slice(&frame.payload).unwrap();
                if v["type"] == "message" {
                    message = Some(v);
                }
            }
            OP_CLOSE => panic!(
                "relay closed with {:?} during a valid fragmented message",
                frame.close_code()
            ),
            _ => {}
        }
    }
    assert_eq!(
        pong.as_deref(),
        Some(&b"mid"[..]),
        "a ping between fragments is answered"
    );
    assert_eq!(message.unwrap()["message"]["text"], "fragmented é message");
    assert_eq!(
        bob.next_message(EVENT_TIMEOUT).await["text"],
        "fragmented é message"
    );
}

#[tokio::test]
async fn ping_is_answered_with_a_pong_carrying_the_same_payload() {
    let relay = Relay::start(&[]);
    let mut raw = RawClient::connect(&relay, "raw", "frames").await;
    raw.send_frame(true, OP_PING, b"are you there?").await;
    loop {
        let frame = raw
            .read_frame(EVENT_TIMEOUT)
            .await
            .unwrap_or_else(|e| panic!("expected a pong: {e:?}"));
        if frame.opcode == OP_PONG {
            assert_eq!(frame.payload, b"are you there?");
            assert!(!frame.masked, "server frames must not be masked");
            break;
        }
        assert_ne!(
            frame.opcode, OP_CLOSE,
            "relay closed instead of answering the ping"
        );
    }
    // Still usable afterwards.
    raw.send_text(&json!({"type": "message", "text": "after ping"}).to_string())
        .await;
    assert_eq!(
        raw.next_json_of_type("message", EVENT_TIMEOUT).await["message"]["text"],
        "after ping"
    );
}

#[tokio::test]
async fn client_close_is_echoed_and_the_connection_ends() {
    let relay = Relay::start(&[]);
    let mut raw = RawClient::connect(&relay, "raw", "frames").await;
    raw.next_json(EVENT_TIMEOUT).await;
    raw.send_close(1000, "bye").await;
    assert_eq!(
        raw.expect_close(EVENT_TIMEOUT).await,
        Some(1000),
        "the relay echoes the client's close code"
    );
    raw.expect_eof(Duration::from_secs(5)).await;

    let (mut client, _, _) = Client::join(&relay, "polite", "frames").await;
    let _ = client.ws.close(None).await;
    // Events already in flight may still arrive; then the relay's close reply, then the end.
    let end = loop {
        match client.try_next_event(EVENT_TIMEOUT).await {
            Ok(_) => continue,
            Err(end) => break end,
        }
    };
    assert!(
        matches!(end, WsEnd::Closed(_) | WsEnd::Eof),
        "tungstenite close handshake: {end:?}"
    );
}

#[tokio::test]
async fn server_frames_are_unmasked_and_text() {
    let relay = Relay::start(&[]);
    let mut raw = RawClient::connect(&relay, "raw", "frames").await;
    for _ in 0..3 {
        let frame = raw
            .read_frame(EVENT_TIMEOUT)
            .await
            .expect("greeting frames");
        assert_eq!(frame.opcode, OP_TEXT, "events are text frames");
        assert!(frame.fin, "events fit in one frame");
        assert!(!frame.masked, "server frames must not be masked");
        assert_eq!(frame.rsv, 0);
    }
}
