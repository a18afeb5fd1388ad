//! Contract: errors keep the connection open. `{"type":"error","code":C,"message":HUMAN}` with C in
//! rate_limited, too_large (characters, not bytes), bad_json, bad_type, empty. Errors are never
//! broadcast. More than ABUSE_LIMIT error events within ABUSE_WINDOW_MS close with 1008.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// Errors alone must not trip the abuse limit in these tests.
const PATIENT: (&str, &str) = ("ABUSE_LIMIT", "1000");

fn assert_error(event: &Value, code: &str, sent: &str) {
    assert_eq!(
        event["type"], "error",
        "sent {sent:?}: expected an error event, got {event}"
    );
    assert_eq!(
        event["code"], code,
        "sent {sent:?}: wrong error code in {event}"
    );
    assert!(
        event["message"]
            .as_str()
            .is_some_and(|m| !m.trim().is_empty()),
        "sent {sent:?}: error needs a human message: {event}"
    );
}

/// Send each raw text, expect the error code for each, then prove the connection still works.
async fn expect_errors(client: &mut Client, inputs: &[String], code: &str) {
    for input in inputs {
        client.send_text(input).await;
        let event = client.next_error(EVENT_TIMEOUT).await;
        assert_error(&event, code, input);
    }
    let m = client.publish_and_wait("still open").await;
    assert_eq!(m["text"], "still open");
}

#[tokio::test]
async fn over_the_rate_limit_answers_rate_limited_and_keeps_the_connection_open() {
    let window = Duration::from_millis(2000);
    let relay = Relay::start(&[("RATE_LIMIT", "3"), ("RATE_WINDOW_MS", "2000"), PATIENT]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "r").await;
    let (mut bob, _, _) = Client::join(&relay, "bob", "r").await;

    let first_send = tokio::time::Instant::now();
    for i in 1..=4 {
        alice.publish(&format!("burst {i}")).await;
    }
    let mut messages = Vec::new();
    let mut errors = Vec::new();
    while messages.len() + errors.len() < 4 {
        let e = alice
            .next_event_matching(EVENT_TIMEOUT, |e| e["type"] != "presence")
            .await;
        match e["type"].as_str() {
            Some("message") => messages.push(e["message"]["text"].clone()),
            Some("error") => errors.push(e),
            _ => panic!("unexpected event {e}"),
        }
    }
    assert_eq!(
        messages,
        vec![json!("burst 1"), json!("burst 2"), json!("burst 3")],
        "the first 3 go through"
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
    assert_error(&errors[0], "rate_limited", "burst 4");

    // The connection stays open; once the window has passed, publishing works again.
    tokio::time::sleep_until(first_send + window + Duration::from_millis(300)).await;
    let m = alice.publish_and_wait("after the window").await;
    assert_eq!(m["from"], "alice");

    // bob saw the three allowed messages and then the post-window one: burst 4 was never relayed.
    for expected in ["burst 1", "burst 2", "burst 3", "after the window"] {
        let m = bob.next_message(EVENT_TIMEOUT).await;
        assert_eq!(m["text"], expected, "{m}");
    }
    assert!(
        metric(&relay, "roomcast_rate_limited_total", &[]).await >= 1.0,
        "rate limiting must be counted"
    );
}

#[tokio::test]
async fn text_over_500_characters_is_too_large_counted_in_characters_not_bytes() {
    let relay = Relay::start(&[PATIENT]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "r").await;

    for (what, text) in [
        ("500 ASCII characters", "a".repeat(500)),
        ("500 two-byte characters (1000 bytes)", "é".repeat(500)),
        ("500 three-byte characters (1500 bytes)", "€".repeat(500)),
        // 2000 bytes of text, a 2028-byte frame: within both limits.
        ("500 four-byte characters (2000 bytes)", "😀".repeat(500)),
    ] {
        alice.publish(&text).await;
        let event = alice
            .next_event_matching(EVENT_TIMEOUT, |e| e["type"] != "presence")
            .await;
        assert_eq!(
            event["type"], "message",
            "{what} must be accepted, got {event}"
        );
        assert_eq!(
            event["message"]["text"],
            text.as_str(),
            "{what} must be relayed unchanged"
        );
    }

    let inputs: Vec<String> = ["a".repeat(501), "é".repeat(501), "€".repeat(501)]
        .iter()
        .map(|t| json!({"type": "message", "text": t}).to_string())
        .collect();
    expect_errors(&mut alice, &inputs, "too_large").await;
}

#[tokio::test]
async fn malformed_json_is_bad_json_and_keeps_the_connection_open() {
    let relay = Relay::start(&[PATIENT]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "r").await;
    let inputs: Vec<String> = [
        "not json",
        "{",
        "{\"type\":\"message\",\"text\":\"unterminated\"",
        "[1,2",
        "{'type':'message','text':'single quotes'}",
        "nul",
        "{\"type\":\"message\",\"text\":\"x\"} trailing",
        "",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    expect_errors(&mut alice, &inputs, "bad_json").await;
}

#[tokio::test]
async fn json_that_is_not_an_object_is_bad_type() {
    let relay = Relay::start(&[PATIENT]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "r").await;
    let inputs: Vec<String> = [
        "null",
        "[]",
        "[{\"type\":\"message\",\"text\":\"x\"}]",
        "42",
        "-1.5",
        "\"message\"",
        "true",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    expect_errors(&mut alice, &inputs, "bad_type").await;
}

#[tokio::test]
async fn type_other_than_message_is_bad_type() {
    let relay = Relay::start(&[PATIENT]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "r").await;
    let inputs: Vec<String> = [
        json!({"type": "chat", "text": "x"}),
        json!({"text": "x"}),
        json!({"type": null, "text": "x"}),
        json!({"type": 1, "text": "x"}),
        json!({"type": ["message"], "text": "x"}),
        json!({"type": "MESSAGE", "text": "x"}),
        json!({"type": "system", "text": "x"}),
        json!({}),
    ]
    .iter()
    .map(|v| v.to_string())
    .collect();
    expect_errors(&mut alice, &inputs, "bad_type").await;
}

#[tokio::test]
async fn text_that_is_present_but_not_a_string_is_bad_type() {
    let relay = Relay::start(&[PATIENT]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "r").await;
    let inputs: Vec<String> = [
        json!({"type": "message", "text": 42}),
        json!({"type": "message", "text": 1.5}),
        json!({"type": "message", "text": {"a": 1}}),
        json!({"type": "message", "text": ["x"]}),
        json!({"type": "message", "text": true}),
    ]
    .iter()
    .map(|v| v.to_string())
    .collect();
    expect_errors(&mut alice, &inputs, "bad_type").await;
}

#[tokio::test]
async fn missing_or_blank_text_is_empty() {
    let relay = Relay::start(&[PATIENT]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "r").await;
    let inputs: Vec<String> = [
        json!({"type": "message"}),
        json!({"type": "message", "text": ""}),
        json!({"type": "message", "text": "   "}),
        json!({"type": "message", "text": "\t\n \r\n"}),
    ]
    .iter()
    .map(|v| v.to_string())
    .collect();
    expect_errors(&mut alice, &inputs, "empty").await;
}

#[tokio::test]
async fn errors_go_only_to_the_sender_and_are_never_broadcast() {
    let relay = Relay::start(&[PATIENT]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "r").await;
    let mut bob = Client::join_and_settle(&relay, "bob", "r").await;

    let bad = [
        "not json".to_string(),
        "null".to_string(),
        json!({"type": "message", "text": ""}).to_string(),
        json!({"type": "message", "text": "x".repeat(501)}).to_string(),
    ];
    for input in &bad {
        alice.send_text(input).await;
        assert_eq!(alice.next_error(EVENT_TIMEOUT).await["type"], "error");
    }
    alice.publish_and_wait("good").await;

    let first = bob
        .next_event_matching(EVENT_TIMEOUT, |e| e["type"] != "presence")
        .await;
    assert_eq!(
        first["type"], "message",
        "bob must see nothing of alice's errors: {first}"
    );
    assert_eq!(first["message"]["text"], "good", "{first}");
}

#[tokio::test]
async fn each_error_code_is_counted_by_code() {
    let relay = Relay::start(&[PATIENT]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "r").await;
    for input in [
        "nope".to_string(),
        "[]".to_string(),
        json!({"type": "message", "text": " "}).to_string(),
        json!({"type": "message", "text": "y".repeat(501)}).to_string(),
    ] {
        alice.send_text(&input).await;
        alice.next_error(EVENT_TIMEOUT).await;
    }
    let text = metrics_text(&relay).await;
    for code in ["bad_json", "bad_type", "empty", "too_large"] {
        let v =
            metric_in(&text, "roomcast_invalid_messages_total", &[("code", code)]).unwrap_or(0.0);
        assert_eq!(
            v, 1.0,
            "roomcast_invalid_messages_total{{code=\"{code}\"}}\n{text}"
        );
    }
}

#[tokio::test]
async fn more_than_abuse_limit_errors_within_the_window_close_with_1008() {
    let relay = Relay::start(&[("ABUSE_LIMIT", "5"), ("ABUSE_WINDOW_MS", "10000")]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "r").await;
    let (mut bob, _, _) = Client::join(&relay, "bob", "r").await;

    for i in 0..5 {
        alice.send_text(&format!("garbage {i}")).await;
        let event = alice.next_error(EVENT_TIMEOUT).await;
        assert_error(&event, "bad_json", "garbage");
    }
    // At the limit, not over it: still open.
    alice.publish_and_wait("still here").await;

    alice.send_text("one too many").await;
    let mut errors_after = 0;
    let code = loop {
        match alice.try_next_event(EVENT_TIMEOUT).await {
            Ok(e) if e["type"] == "error" => errors_after += 1,
            Ok(e) if e["type"] == "presence" => {}
            Ok(e) => panic!("expected close 1008, got event {e}"),
            Err(WsEnd::Closed(code)) => break code,
            Err(end) => panic!("expected close 1008, got {end:?}"),
        }
    };
    assert_eq!(code, Some(1008), "abuse must close with 1008");
    assert!(
        errors_after <= 1,
        "at most one error event before the close, got {errors_after}"
    );

    // The room goes on.
    bob.publish_and_wait("room unaffected").await;
    wait_for_metric(
        &relay,
        "roomcast_connections_closed_total",
        &[("code", "1008")],
        Duration::from_secs(5),
        |v| v >= 1.0,
    )
    .await;
}

#[tokio::test]
async fn errors_spread_over_separate_windows_do_not_close_the_connection() {
    let relay = Relay::start(&[("ABUSE_LIMIT", "3"), ("ABUSE_WINDOW_MS", "1000")]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "r").await;
    for round in 0..2 {
        for i in 0..3 {
            alice.send_text(&format!("garbage {round}.{i}")).await;
            assert_error(
                &alice.next_error(EVENT_TIMEOUT).await,
                "bad_json",
                "garbage",
            );
        }
        // Let the abuse window pass before the next burst.
        tokio::time::sleep(Duration::from_millis(1300)).await;
    }
    alice.publish_and_wait("never closed").await;
}

#[tokio::test]
async fn default_rate_limit_is_20_messages_per_window() {
    let relay = Relay::start(&[]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "r").await;
    for i in 1..=21 {
        alice.publish(&format!("n{i}")).await;
    }
    for i in 1..=20 {
        let e = alice
            .next_event_matching(EVENT_TIMEOUT, |e| e["type"] != "presence")
            .await;
        assert_eq!(
            e["type"], "message",
            "message {i} of 20 must be accepted: {e}"
        );
    }
    let e = alice.next_error(EVENT_TIMEOUT).await;
    assert_error(&e, "rate_limited", "the 21st message");
}

#[tokio::test]
async fn default_abuse_limit_closes_on_the_31st_error_within_10_seconds() {
    // Every frame counts against the rate limit, so lift it to isolate the abuse limit.
    let relay = Relay::start(&[("RATE_LIMIT", "1000")]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "r").await;
    for i in 1..=30 {
        alice.send_text("garbage").await;
        let e = alice.next_error(EVENT_TIMEOUT).await;
        assert_error(&e, "bad_json", &format!("garbage #{i}"));
    }
    alice.publish_and_wait("30 errors are tolerated").await;
    alice.send_text("garbage").await;
    assert_eq!(alice.expect_close(EVENT_TIMEOUT).await, Some(1008));
}

#[tokio::test]
async fn request_id_that_is_not_a_string_is_bad_type() {
    let relay = Relay::start(&[PATIENT]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "r").await;
    let inputs: Vec<String> = [
        json!({"type": "message", "text": "x", "requestId": 5}),
        json!({"type": "message", "text": "x", "requestId": {"id": "r1"}}),
        json!({"type": "message", "text": "x", "requestId": ["r1"]}),
        json!({"type": "message", "text": "x", "requestId": true}),
    ]
    .iter()
    .map(|v| v.to_string())
    .collect();
    expect_errors(&mut alice, &inputs, "bad_type").await;
}
