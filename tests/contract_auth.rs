//! Contract: the second dialect. `GET /` with upgrade headers, an `auth` message first, then
//! `join`, `chat`, `leave` and `ping` over one connection in any number of rooms (up to
//! MAX_ROOMS_PER_CONNECTION). Invalid input closes 1008 with a short reason; auth failures close
//! 4401 (silence) or 4403 (anything else). One room space with the first dialect.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

/// The relay's token, as the tests' relays are started with it.
fn token(relay: &Relay) -> String {
    relay.token.clone()
}

async fn authed(relay: &Relay) -> Client {
    Client::authed(relay, &token(relay)).await.0
}

#[tokio::test]
async fn a_plain_get_of_the_root_still_serves_the_page() {
    let relay = Relay::start(&[]);
    let resp = http_get(&relay, "/", &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert!(
        resp.header("content-type")
            .unwrap_or("")
            .starts_with("text/html"),
        "{}",
        resp.head
    );
}

#[tokio::test]
async fn the_upgrade_at_root_takes_no_token_and_checks_only_an_origin_that_is_present() {
    let relay = Relay::start(&[]);
    // No Origin (a backend or a native client): accepted, the credentials come in-band.
    let none = upgrade_request(&relay, "/", None).await;
    assert_eq!(none.status, 101, "{}", none.head);
    let good = upgrade_request(&relay, "/", Some(&relay.origin())).await;
    assert_eq!(good.status, 101, "{}", good.head);
    for origin in ["http://evil.example", "null"] {
        let bad = upgrade_request(&relay, "/", Some(origin)).await;
        assert_rejected(&bad, 403, &format!("upgrade at / from {origin}"));
    }
    let rejected = metric(
        &relay,
        "roomcast_upgrade_rejections_total",
        &[("reason", "forbidden_origin")],
    )
    .await;
    assert_eq!(rejected, 2.0);
}

#[tokio::test]
async fn an_upgrade_that_is_not_a_get_is_refused_in_both_dialects() {
    let relay = Relay::start(&[]);
    let chat = format!("/chat?{}", relay.chat_query("alice", "lobby"));
    for (method, path) in [
        ("POST", chat.as_str()),
        ("PUT", chat.as_str()),
        ("POST", "/"),
        ("DELETE", "/"),
    ] {
        let head = upgrade_head(relay.port(), path, Some(&relay.origin()));
        let head = head.replacen("GET ", &format!("{method} "), 1);
        let resp = http_exchange(relay.addr, &head).await.expect("exchange");
        assert_rejected(&resp, 405, &format!("{method} {path} with upgrade headers"));
        assert_eq!(resp.header("allow"), Some("GET"), "{}", resp.head);
    }
}

#[tokio::test]
async fn auth_answers_auth_ok_with_a_connection_id_and_a_user_id() {
    let relay = Relay::start(&[]);
    let (_a, ok_a) = Client::authed(&relay, &token(&relay)).await;
    let (_b, ok_b) = Client::authed(&relay, &token(&relay)).await;
    for ok in [&ok_a, &ok_b] {
        let id = ok["connectionId"]
            .as_str()
            .expect("connectionId is a string");
        assert_eq!(id.len(), 36, "a UUID: {ok}");
        assert!(ok["userId"].is_string(), "{ok}");
    }
    assert_ne!(ok_a["connectionId"], ok_b["connectionId"]);
}

#[tokio::test]
async fn silence_until_the_auth_timeout_closes_4401() {
    let relay = Relay::start(&[("AUTH_TIMEOUT_MS", "300")]);
    let mut c = Client::connect_root(&relay, None).await.expect("upgrade");
    let started = std::time::Instant::now();
    assert_eq!(c.expect_close_with().await, (4401, "auth required".into()));
    assert!(
        started.elapsed() >= Duration::from_millis(250),
        "closed before the timeout: {:?}",
        started.elapsed()
    );
    relay
        .wait_metrics("auth timeout counted", WAIT, |m| {
            m.get("roomcast_auth_failures_total", &[("reason", "timeout")]) == Some(1.0)
                && m.get("roomcast_connections_closed_total", &[("code", "4401")]) == Some(1.0)
        })
        .await;
}

#[tokio::test]
async fn any_other_first_message_or_a_bad_token_closes_4403() {
    let relay = Relay::start(&[]);
    for first in [
        json!({"type": "auth", "token": "wrong"}).to_string(),
        json!({"type": "auth"}).to_string(),
        json!({"type": "join", "roomId": "lobby"}).to_string(),
        json!({"type": "chat", "roomId": "lobby", "text": "hi"}).to_string(),
        json!({"type": "ping"}).to_string(),
        "not json".to_string(),
    ] {
        let mut c = Client::connect_root(&relay, None).await.expect("upgrade");
        c.send_text(&first).await;
        assert_eq!(
            c.expect_close_with().await,
            (4403, "auth failed".into()),
            "first message {first}"
        );
    }
    relay
        .wait_metrics("auth failures counted", WAIT, |m| {
            m.get("roomcast_auth_failures_total", &[("reason", "bad_token")]) == Some(2.0)
                && m.get("roomcast_auth_failures_total", &[("reason", "not_auth")]) == Some(4.0)
        })
        .await;
}

#[tokio::test]
async fn before_auth_nothing_is_received() {
    let relay = Relay::start(&[]);
    let mut waiting = Client::connect_root(&relay, None).await.expect("upgrade");
    let mut first = Client::join_and_settle(&relay, "ada", "lobby").await;
    first.publish_and_wait("anyone there?").await;
    waiting.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn join_chat_and_every_member_gets_the_chat_event_with_its_seq() {
    let relay = Relay::start(&[]);
    let mut a = authed(&relay).await;
    let mut b = authed(&relay).await;
    a.join_room("room:demo").await;
    b.join_room("room:demo").await;
    // A plain join gets no history event: the next thing is the chat.
    a.chat("room:demo", "  hello  ", "req-1").await;
    for c in [&mut a, &mut b] {
        let chat = c.expect_type("chat").await;
        assert_eq!(chat["roomId"], "room:demo", "{chat}");
        assert_eq!(chat["text"], "hello", "trimmed: {chat}");
        assert_eq!(chat["requestId"], "req-1", "{chat}");
        assert_eq!(chat["seq"], 1, "{chat}");
        assert!(
            chat["id"].as_str().is_some_and(|id| id.len() == 36),
            "{chat}"
        );
        assert!(
            chat["userId"].is_string() && chat["sentAt"].is_string(),
            "{chat}"
        );
    }
    a.chat("room:demo", "second", "req-2").await;
    assert_eq!(b.expect_type("chat").await["seq"], 2);
}

#[tokio::test]
async fn a_request_id_that_is_not_a_usable_string_is_replaced_by_a_uuid() {
    let relay = Relay::start(&[]);
    let mut a = authed(&relay).await;
    a.join_room("r").await;
    let long = "x".repeat(101);
    let kept = "k".repeat(100);
    for rid in [json!(7), json!(null), json!(""), json!(long), json!(kept)] {
        a.send_json(&json!({"type": "chat", "roomId": "r", "text": "t", "requestId": rid}))
            .await;
        let chat = a.expect_type("chat").await;
        let got = chat["requestId"].as_str().expect("a string");
        if rid == json!(kept) {
            assert_eq!(got, kept);
        } else {
            assert_eq!(got.len(), 36, "a UUID for {rid}: {chat}");
        }
    }
    a.send_json(&json!({"type": "chat", "roomId": "r", "text": "no id"}))
        .await;
    assert_eq!(
        a.expect_type("chat").await["requestId"]
            .as_str()
            .unwrap()
            .len(),
        36
    );
}

#[tokio::test]
async fn history_comes_only_when_the_join_asks_for_it_and_resume_is_exact() {
    let relay = Relay::start(&[]);
    let mut writer = authed(&relay).await;
    writer.join_room("ops").await;
    for i in 1..=5 {
        writer.chat("ops", &format!("m{i}"), &format!("r{i}")).await;
        writer.expect_type("chat").await;
    }
    // A plain seed client: joined, then nothing it does not know.
    let mut plain = authed(&relay).await;
    plain.join_room("ops").await;
    plain.expect_silence(Duration::from_millis(300)).await;

    let mut reader = authed(&relay).await;
    reader
        .send_json(&json!({"type": "join", "roomId": "ops", "history": true}))
        .await;
    reader.expect_type("joined").await;
    let history = reader.expect_type("history").await;
    assert_eq!(history["roomId"], "ops");
    assert_eq!(history["complete"], true);
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["m1", "m2", "m3", "m4", "m5"]);
    assert_eq!(history["messages"][0]["type"], "chat");
    let epoch = history["epoch"].as_str().unwrap().to_string();

    let mut resumed = authed(&relay).await;
    resumed
        .send_json(&json!({"type": "join", "roomId": "ops", "since": 3, "epoch": epoch}))
        .await;
    resumed.expect_type("joined").await;
    let tail = resumed.expect_type("history").await;
    assert_eq!(tail["complete"], true);
    let seqs: Vec<u64> = tail["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["seq"].as_u64().unwrap())
        .collect();
    assert_eq!(seqs, [4, 5]);

    let mut stale = authed(&relay).await;
    stale
        .send_json(&json!({"type": "join", "roomId": "ops", "since": 3, "epoch": "other"}))
        .await;
    stale.expect_type("joined").await;
    assert_eq!(stale.expect_type("history").await["complete"], false);
}

#[tokio::test]
async fn one_connection_is_in_many_rooms_up_to_the_limit() {
    let relay = Relay::start(&[("MAX_ROOMS_PER_CONNECTION", "3")]);
    let mut a = authed(&relay).await;
    let mut b = authed(&relay).await;
    for room in ["r1", "r2", "r3"] {
        a.join_room(room).await;
        b.join_room(room).await;
    }
    // Joining a room again is answered, and costs no second membership.
    a.join_room("r2").await;
    for room in ["r1", "r2", "r3"] {
        b.chat(room, &format!("to {room}"), room).await;
    }
    for room in ["r1", "r2", "r3"] {
        let chat = a.expect_type("chat").await;
        assert_eq!(
            (chat["roomId"].as_str(), chat["seq"].as_u64()),
            (Some(room), Some(1))
        );
    }
    relay
        .wait_metrics("memberships and joins", WAIT, |m| {
            m.get("roomcast_memberships", &[("dialect", "auth")]) == Some(6.0)
                && m.get("roomcast_joins_total", &[("dialect", "auth")]) == Some(6.0)
                && m.get("roomcast_dialect_connections", &[("dialect", "auth")]) == Some(2.0)
        })
        .await;
    a.send_json(&json!({"type": "join", "roomId": "r4"})).await;
    assert_eq!(a.expect_close_with().await, (1008, "too many rooms".into()));
    relay
        .wait_metrics("memberships follow the close", WAIT, |m| {
            m.get("roomcast_memberships", &[("dialect", "auth")]) == Some(3.0)
                && m.get("roomcast_dialect_connections", &[("dialect", "auth")]) == Some(1.0)
        })
        .await;
}

#[tokio::test]
async fn leave_stops_a_rooms_messages() {
    let relay = Relay::start(&[]);
    let mut a = authed(&relay).await;
    let mut b = authed(&relay).await;
    for room in ["stay", "go"] {
        a.join_room(room).await;
        b.join_room(room).await;
    }
    a.send_json(&json!({"type": "leave", "roomId": "go"})).await;
    // Leaving a room never joined is harmless.
    a.send_json(&json!({"type": "leave", "roomId": "never"}))
        .await;
    a.send_json(&json!({"type": "ping"})).await;
    a.expect_type("pong").await; // the leave is done once this arrives
    b.chat("go", "gone", "g").await;
    b.chat("stay", "here", "s").await;
    let next = a.expect_type("chat").await;
    assert_eq!(
        next["text"], "here",
        "nothing from the room it left: {next}"
    );
    a.chat("go", "x", "x").await;
    assert_eq!(
        a.expect_close_with().await,
        (1008, "join room before chat".into())
    );
}

#[tokio::test]
async fn ping_is_answered_with_pong_and_its_time() {
    let relay = Relay::start(&[]);
    let mut a = authed(&relay).await;
    a.send_json(&json!({"type": "ping"})).await;
    let pong = a.expect_type("pong").await;
    let sent_at = pong["sentAt"].as_str().expect("sentAt");
    assert!(sent_at.ends_with('Z') && sent_at.contains('T'), "{pong}");
}

#[tokio::test]
async fn chat_to_a_room_not_joined_closes_1008() {
    let relay = Relay::start(&[]);
    let mut a = authed(&relay).await;
    a.chat("lobby", "hi", "r").await;
    assert_eq!(
        a.expect_close_with().await,
        (1008, "join room before chat".into())
    );
}

#[tokio::test]
async fn invalid_input_closes_1008_with_a_short_reason() {
    let relay = Relay::start(&[]);
    let long_room = "r".repeat(65);
    let long_text = "é".repeat(1001);
    let cases: Vec<(String, &str)> = vec![
        ("{nope".into(), "invalid JSON"),
        ("[1,2]".into(), "expected a JSON object"),
        ("\"text\"".into(), "expected a JSON object"),
        (json!({"type": "dance"}).to_string(), "unknown type"),
        (json!({"roomId": "a"}).to_string(), "unknown type"),
        (
            json!({"type": "join", "roomId": "a b"}).to_string(),
            "invalid roomId",
        ),
        (
            json!({"type": "join", "roomId": long_room}).to_string(),
            "invalid roomId",
        ),
        (json!({"type": "join"}).to_string(), "invalid roomId"),
        (
            json!({"type": "chat", "roomId": "lobby", "text": "   "}).to_string(),
            "invalid text",
        ),
        (
            json!({"type": "chat", "roomId": "lobby", "text": long_text}).to_string(),
            "invalid text",
        ),
        (
            json!({"type": "chat", "roomId": "lobby", "text": 5}).to_string(),
            "invalid text",
        ),
        (
            json!({"type": "auth", "token": "again"}).to_string(),
            "already authenticated",
        ),
    ];
    for (input, reason) in cases {
        let mut a = authed(&relay).await;
        a.join_room("lobby").await;
        a.send_text(&input).await;
        assert_eq!(
            a.expect_close_with().await,
            (1008, reason.into()),
            "{input}"
        );
    }
    // 1,000 characters after trimming are fine.
    let mut a = authed(&relay).await;
    a.join_room("lobby").await;
    a.chat("lobby", &"é".repeat(1000), "max").await;
    assert_eq!(
        a.expect_type("chat").await["text"]
            .as_str()
            .unwrap()
            .chars()
            .count(),
        1000
    );
}

#[tokio::test]
async fn a_message_over_8192_bytes_closes_1008() {
    let relay = Relay::start(&[]);
    let mut a = authed(&relay).await;
    a.join_room("lobby").await;
    // Fits: 8,192 bytes exactly (padding in a field the relay ignores).
    let base = json!({"type": "ping", "pad": ""}).to_string();
    let fits = json!({"type": "ping", "pad": "p".repeat(8192 - base.len())}).to_string();
    assert_eq!(fits.len(), 8192);
    a.send_text(&fits).await;
    a.expect_type("pong").await;
    let over = json!({"type": "ping", "pad": "p".repeat(8193 - base.len())}).to_string();
    a.send_text(&over).await;
    assert_eq!(
        a.expect_close_with().await,
        (1008, "message too big".into())
    );
}

#[tokio::test]
async fn rate_limits_apply_per_connection() {
    let relay = Relay::start(&[("RATE_LIMIT", "3"), ("RATE_WINDOW_MS", "60000")]);
    let mut a = authed(&relay).await;
    a.join_room("lobby").await;
    for i in 0..3 {
        a.chat("lobby", &format!("m{i}"), &format!("r{i}")).await;
        a.expect_type("chat").await;
    }
    a.chat("lobby", "one too many", "r3").await;
    let error = a.expect_type("error").await;
    assert_eq!(error["code"], "rate_limited", "{error}");
}

#[tokio::test]
async fn both_dialects_share_one_room_space() {
    let relay = Relay::start(&[]);
    let (mut first, _, _) = Client::join(&relay, "ada", "lobby").await;
    let mut second = authed(&relay).await;
    second.join_room("lobby").await;
    // The second dialect counts in `online`.
    first
        .next_event_matching(WAIT, |e| e["type"] == "presence" && e["online"] == 2)
        .await;

    first.publish("from the first dialect").await;
    let chat = second.expect_type("chat").await;
    assert_eq!(chat["text"], "from the first dialect");
    assert_eq!(chat["userId"], "ada");
    assert_eq!(chat["roomId"], "lobby");
    let mine = first.expect_type("message").await;
    assert_eq!(chat["id"], mine["message"]["id"]);
    assert_eq!(chat["seq"], mine["message"]["seq"]);

    second.chat("lobby", "from the second dialect", "s-1").await;
    let message = first.next_message(WAIT).await;
    assert_eq!(message["text"], "from the second dialect");
    assert_eq!(message["room"], "lobby");
    assert_eq!(message["requestId"], "s-1");
    let echo = second.expect_type("chat").await;
    assert_eq!(echo["seq"], message["seq"]);
    // The second dialect gets no presence events.
    second.expect_silence(Duration::from_millis(300)).await;
}

/// The second variant's own test client: auth, join, then a chat every few seconds, each seen
/// back with its requestId.
#[tokio::test]
async fn the_seed_test_client_flow() {
    let relay = Relay::start(&[]);
    let mut client = Client::connect_root(&relay, Some(&relay.origin()))
        .await
        .expect("upgrade");
    client
        .send_json(&json!({"type": "auth", "token": token(&relay)}))
        .await;
    client.expect_type("auth_ok").await;
    client
        .send_json(&json!({"type": "join", "roomId": "room:demo"}))
        .await;
    client.expect_type("joined").await;
    for i in 0..3 {
        let request_id = format!("seed-{i}");
        client
            .send_json(&json!({"type": "chat", "roomId": "room:demo", "requestId": request_id, "text": format!("tick {i}")}))
            .await;
        let chat: Value = client.expect_type("chat").await;
        assert_eq!(chat["requestId"], request_id);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    client.close_normally().await;
}

#[tokio::test]
async fn a_second_dialect_reader_that_stops_reading_is_closed_1013() {
    let relay = Relay::start(&[
        ("OUTBOX_MAX_BYTES", "16384"),
        ("SEND_BUFFER_BYTES", "4096"),
        ("RATE_LIMIT", "1000"),
        ("PUBLISH_RATE_PER_ADDRESS", "0"),
    ]);
    let mut stalled = RawClient::connect_root(&relay).await;
    stalled
        .send_text(&json!({"type": "auth", "token": token(&relay)}).to_string())
        .await;
    stalled
        .send_text(&json!({"type": "join", "roomId": "busy"}).to_string())
        .await;
    // Wait for the join to land before flooding the room.
    let mut writer = authed(&relay).await;
    writer.join_room("busy").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let text = "x".repeat(900);
    let mut sent = 0;
    while sent < 400 {
        writer.chat("busy", &text, &format!("f{sent}")).await;
        writer.expect_type("chat").await; // the writer reads its own, the stalled one does not
        sent += 1;
        if metric(&relay, "roomcast_slow_consumer_closes_total", &[]).await >= 1.0 {
            break;
        }
    }
    relay
        .wait_metrics("the stalled reader closed 1013", WAIT, |m| {
            m.get("roomcast_slow_consumer_closes_total", &[]) == Some(1.0)
        })
        .await;
}

/// Joins, leaves and pings publish nothing, so they leave the chat rate alone, but they share
/// the control-frame budget: a join/leave flood ends like a ping flood (1008).
#[tokio::test]
async fn a_join_leave_flood_is_closed_like_a_ping_flood() {
    let relay = Relay::start(&[("CONTROL_FRAME_LIMIT", "10"), ("RATE_LIMIT", "3")]);
    let mut a = authed(&relay).await;
    // Four joins: more than RATE_LIMIT, and the chats after them still go through.
    for room in ["r1", "r2", "r3", "r4"] {
        a.join_room(room).await;
    }
    a.chat("r1", "still allowed", "c1").await;
    a.expect_type("chat").await;
    for i in 0..20 {
        let msg = if i % 2 == 0 {
            json!({"type": "leave", "roomId": "r1"})
        } else {
            json!({"type": "join", "roomId": "r1"})
        };
        a.send_json(&msg).await;
    }
    let (code, reason) = a.expect_close_with().await;
    assert_eq!((code, reason.as_str()), (1008, "too many control frames"));
    assert_eq!(
        metric(
            &relay,
            "roomcast_limit_closes_total",
            &[("limit", "control_frames")]
        )
        .await,
        1.0
    );
}
