//! Regression tests for the review's defects (issue 8): requestId identity, secrets, rooms,
//! frames, per-address publish rate, the history budget and the /metrics cache.
//!
//! Each test states the behaviour the relay has once the review's defects are fixed (setting
//! names, close codes and metric names as in the issue). The resource limits (control frames,
//! pongs, outbox, write stall, incomplete frames, heartbeat under backpressure) are in
//! `review_limits.rs`.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

async fn publish_with_id(client: &mut Client, text: &str, request_id: &str) {
    client
        .send_json(&json!({"type": "message", "text": text, "requestId": request_id}))
        .await;
}

/// The next event that is not presence.
async fn next_data_event(client: &mut Client) -> Value {
    client
        .next_event_matching(EVENT_TIMEOUT, |e| e["type"] != "presence")
        .await
}

/// Read the sender's events until the ack for `request_id` (skipping messages and presence).
async fn ack_for(client: &mut Client, request_id: &str) -> Value {
    loop {
        let e = next_data_event(client).await;
        match e["type"].as_str() {
            Some("ack") if e["requestId"] == request_id => return e,
            Some("message") => continue,
            _ => panic!(
                "[{}] expected the ack for requestId {request_id:?}, got {e}",
                client.name
            ),
        }
    }
}

/// The `session` of a `system` greeting: 32 lowercase hexadecimal digits.
fn session_of(system: &Value) -> String {
    let session = system["session"].as_str().unwrap_or_else(|| {
        panic!("the system greeting must carry \"session\":\"<32 lowercase hex>\": {system}")
    });
    assert!(
        session.len() == 32
            && session
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "session must be 32 lowercase hex digits: {system}"
    );
    session.to_string()
}

/// Connect with an explicit query and read the system and history events.
async fn join_query(relay: &Relay, name: &str, query: &str) -> (Client, Value, Value) {
    let mut client = Client::connect_query(relay, query)
        .await
        .unwrap_or_else(|e| panic!("connect with {query:?} failed: {e:?}"));
    client.name = name.to_string();
    let system = client.next_event(EVENT_TIMEOUT).await;
    assert_eq!(system["type"], "system", "first event: {system}");
    let history = client.next_event(EVENT_TIMEOUT).await;
    assert_eq!(history["type"], "history", "second event: {history}");
    (client, system, history)
}

/// Resume into `room` with `since`/`epoch`; returns the client and its history event.
async fn resume(relay: &Relay, name: &str, room: &str, since: u64, epoch: &str) -> (Client, Value) {
    let query = format!(
        "{}&since={since}&epoch={}",
        relay.chat_query(name, room),
        encode(epoch)
    );
    let (client, _, history) = join_query(relay, name, &query).await;
    (client, history)
}

/// Connect with extra request headers (e.g. X-Forwarded-For) and read system + history.
async fn join_with_headers(
    relay: &Relay,
    name: &str,
    room: &str,
    headers: &[(&str, &str)],
) -> Client {
    let path = format!("/chat?{}", relay.chat_query(name, room));
    let mut client = Client::connect_to(relay, &path, Some(&relay.origin()), headers)
        .await
        .unwrap_or_else(|e| panic!("upgrade with headers {headers:?} failed: {e:?}"));
    client.name = name.to_string();
    client.room = room.to_string();
    client.next_event_of_type("history", EVENT_TIMEOUT).await;
    client
}

/// Publish and return the next non-presence event the sender gets: its own message, or an error.
async fn publish_and_answer(client: &mut Client, text: &str) -> Value {
    client.publish(text).await;
    next_data_event(client).await
}

fn texts(messages: &Value) -> Vec<String> {
    messages
        .as_array()
        .unwrap_or_else(|| panic!("messages must be an array: {messages}"))
        .iter()
        .map(|m| m["text"].as_str().unwrap_or("?").to_string())
        .collect()
}

/// An upgrade request with everything right except that it has no Sec-WebSocket-Key.
fn upgrade_head_without_key(relay: &Relay, room: &str) -> String {
    format!(
        "GET /chat?{} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nOrigin: {}\r\n\r\n",
        relay.chat_query("nokey", room),
        relay.port(),
        relay.origin()
    )
}

// ---------------------------------------------------------------------------------------------
// requestId identity: (room, session, requestId), never the display name
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn same_request_id_from_two_guests_is_broadcast_twice() {
    let relay = Relay::start(&[]);
    let (mut watcher, _, _) = Client::join(&relay, "watcher", "guests").await;
    let (mut first, _, _) = Client::join(&relay, "guest", "guests").await;
    let (mut second, _, _) = Client::join(&relay, "guest", "guests").await;

    publish_with_id(&mut first, "from the first guest", "1").await;
    let a = ack_for(&mut first, "1").await;
    publish_with_id(&mut second, "from the second guest", "1").await;
    let b = ack_for(&mut second, "1").await;
    assert!(
        a.get("duplicate").is_none() && b.get("duplicate").is_none(),
        "two different connections that are both named guest are two senders; neither ack is a \
         duplicate: {a} / {b}"
    );
    assert_ne!(a["id"], b["id"], "two messages, two ids: {a} / {b}");
    assert_ne!(a["seq"], b["seq"], "two messages, two seqs: {a} / {b}");

    let m1 = watcher.next_message(EVENT_TIMEOUT).await;
    let m2 = watcher.next_message(EVENT_TIMEOUT).await;
    assert_eq!(
        (m1["text"].as_str(), m2["text"].as_str()),
        (Some("from the first guest"), Some("from the second guest")),
        "both messages are broadcast: {m1} / {m2}"
    );
}

#[tokio::test]
async fn retry_after_reconnect_with_the_same_session_is_a_duplicate() {
    let relay = Relay::start(&[]);
    let (mut watcher, _, _) = Client::join(&relay, "watcher", "retry").await;
    let (mut ada, system, _) = Client::join(&relay, "ada", "retry").await;
    let session = session_of(&system);

    publish_with_id(&mut ada, "hello once", "r1").await;
    let first = ack_for(&mut ada, "r1").await;
    let m = watcher.next_message(EVENT_TIMEOUT).await;
    assert_eq!(m["text"], "hello once", "{m}");
    ada.close().await;

    // The network dropped before the ack arrived: the client reconnects and retries.
    let query = format!("{}&session={session}", relay.chat_query("ada", "retry"));
    let (mut again, system2, _) = join_query(&relay, "ada", &query).await;
    assert_eq!(
        system2["session"], session,
        "connecting with session=<value> keeps that session: {system2}"
    );
    publish_with_id(&mut again, "hello once", "r1").await;
    let retry = ack_for(&mut again, "r1").await;
    assert_eq!(
        retry["duplicate"], true,
        "same session, same requestId, same text: the retry is a duplicate: {retry}"
    );
    assert_eq!(retry["id"], first["id"], "{first} / {retry}");
    assert_eq!(retry["seq"], first["seq"], "{first} / {retry}");

    again.publish("after the retry").await;
    let next = watcher.next_message(EVENT_TIMEOUT).await;
    assert_eq!(
        next["text"], "after the retry",
        "the retry must not be broadcast a second time: {next}"
    );
}

#[tokio::test]
async fn missing_or_malformed_session_gets_a_fresh_one() {
    let relay = Relay::start(&[]);
    let (_a, sys_a, _) = Client::join(&relay, "ada", "sessions").await;
    let (_b, sys_b, _) = Client::join(&relay, "ada", "sessions").await;
    let (sa, sb) = (session_of(&sys_a), session_of(&sys_b));
    assert_ne!(
        sa, sb,
        "each connection without session= gets its own session"
    );
    for bad in [
        "not-a-session".to_string(),
        "abc123".to_string(),
        format!("{sa}0"),
        "g".repeat(32),
    ] {
        let query = format!(
            "{}&session={}",
            relay.chat_query("ada", "sessions"),
            encode(&bad)
        );
        let (_c, sys, _) = join_query(&relay, "ada", &query).await;
        let s = session_of(&sys);
        assert!(
            s != bad && s != sa && s != sb,
            "malformed session={bad:?} must get a fresh session, got {sys}"
        );
    }
}

#[tokio::test]
async fn same_request_id_with_different_text_on_one_session_is_a_conflict() {
    let relay = Relay::start(&[]);
    let (mut watcher, _, _) = Client::join(&relay, "watcher", "conflict").await;
    let (mut ada, system, _) = Client::join(&relay, "ada", "conflict").await;

    publish_with_id(&mut ada, "the original", "r1").await;
    let first = ack_for(&mut ada, "r1").await;
    let m = watcher.next_message(EVENT_TIMEOUT).await;
    assert_eq!(m["text"], "the original", "{m}");

    publish_with_id(&mut ada, "something else", "r1").await;
    let e = next_data_event(&mut ada).await;
    assert!(
        e["type"] == "error" && e["code"] == "conflict",
        "same session and requestId with a different text must get error code \"conflict\", got {e}"
    );

    // The connection stays open and nothing was broadcast.
    ada.publish("still here").await;
    let next = watcher.next_message(EVENT_TIMEOUT).await;
    assert_eq!(
        next["text"], "still here",
        "the conflicting message must not be broadcast: {next}"
    );
    assert_eq!(
        next["seq"].as_u64(),
        first["seq"].as_u64().map(|s| s + 1),
        "the conflict takes no seq: {next}"
    );

    // Same session on a new connection (the first one closed): still a conflict.
    let session = session_of(&system);
    ada.close().await;
    let query = format!("{}&session={session}", relay.chat_query("ada", "conflict"));
    let (mut again, _, _) = join_query(&relay, "ada", &query).await;
    publish_with_id(&mut again, "a third text", "r1").await;
    let e = next_data_event(&mut again).await;
    assert!(
        e["type"] == "error" && e["code"] == "conflict",
        "after a reconnect on the same session, a different text is still a conflict: {e}"
    );
}

// ---------------------------------------------------------------------------------------------
// Secrets
// ---------------------------------------------------------------------------------------------

#[test]
fn help_and_setting_errors_never_show_the_chat_token() {
    for args in [
        &["--help"][..],
        &["--port", "not-a-port"][..],
        &["--invalid-room", "bogus"][..],
        &["--trusted-proxies", "not-an-address"][..],
        &["--heartbeat-ms", "0"][..],
    ] {
        let all = run_once(("CHAT_TOKEN", "supersecret"), args);
        assert!(
            !all.contains("supersecret"),
            "CHAT_TOKEN=supersecret roomcast {args:?} shows the token:\n{all}"
        );
    }
}

/// Run the relay binary once with one setting and `args` (it exits: --help or a bad setting);
/// everything it printed.
fn run_once(setting: (&str, &str), args: &[&str]) -> String {
    let mut cmd = Command::new(relay_binary());
    for key in RELAY_ENV {
        cmd.env_remove(key);
    }
    let out = cmd
        .env(setting.0, setting.1)
        .args(args)
        .output()
        .expect("run roomcast");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// REDIS_URL may carry a password: --help, setting errors and logs (debug included, with Redis
/// unreachable so its errors happen) never show it.
#[tokio::test]
async fn the_redis_url_password_is_never_shown() {
    let url = "redis://:hunter2-s3cret@127.0.0.1:1";
    for args in [&["--help"][..], &["--redis-timeout-ms", "0"][..]] {
        let all = run_once(("REDIS_URL", url), args);
        assert!(
            !all.contains("hunter2"),
            "roomcast {args:?} shows REDIS_URL:\n{all}"
        );
    }
    let mut relay = Relay::start(&[
        ("REDIS_URL", url),
        ("RUST_LOG", "debug"),
        ("REDIS_TIMEOUT_MS", "200"),
    ]);
    // Unreachable Redis: not ready, and publishing is refused, for a while.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(http_get(&relay, "/readyz", &[]).await.status, 503);
    relay.stop_with_sigterm(Duration::from_secs(10)).await;
    let lines = relay.stderr_lines();
    let leaks: Vec<&String> = lines.iter().filter(|l| l.contains("hunter2")).collect();
    assert!(
        leaks.is_empty(),
        "log lines contain the Redis password: {leaks:?}"
    );
}

#[tokio::test]
async fn debug_logs_never_contain_the_chat_token() {
    let token = "supersecret-d3bug-t0ken";
    let mut relay = Relay::start(&[("CHAT_TOKEN", token), ("RUST_LOG", "debug")]);
    let (mut ada, _, _) = Client::join(&relay, "ada", "logs").await;
    ada.publish_and_wait("hello").await;
    // A probe, a wrong token that starts with the right one, and a bad handshake.
    http_get(
        &relay,
        &format!("/chat?{}", relay.chat_query("probe", "logs")),
        &[],
    )
    .await;
    let wrong = format!("/chat?token={token}x&name=eve&room=logs");
    upgrade_request(&relay, &wrong, Some(&relay.origin())).await;
    http_exchange(relay.addr, &upgrade_head_without_key(&relay, "logs"))
        .await
        .expect("bad handshake answered");
    ada.close().await;
    relay.stop_with_sigterm(Duration::from_secs(10)).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    let lines = relay.stderr_lines();
    assert!(
        lines.iter().any(|l| l.contains("DEBUG")),
        "RUST_LOG=debug should produce debug lines; stderr:\n{}",
        lines.join("\n")
    );
    let leaks: Vec<&String> = lines.iter().filter(|l| l.contains(token)).collect();
    assert!(
        leaks.is_empty(),
        "log lines contain CHAT_TOKEN:\n{}",
        leaks
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>()
            .join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Rooms
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn upgrades_without_a_websocket_key_never_create_or_evict_a_room() {
    let relay = Relay::start(&[("MAX_ROOMS", "3")]);
    let (mut ada, _, history) = Client::join(&relay, "ada", "keep").await;
    let epoch = history["epoch"].as_str().expect("epoch").to_string();
    let first = ada.publish_and_wait("one").await;
    ada.publish_and_wait("two").await;
    ada.publish_and_wait("three").await;
    ada.close().await;
    wait_for_clients(&relay, 0, EVENT_TIMEOUT).await;

    for i in 0..20 {
        let resp = http_exchange(
            relay.addr,
            &upgrade_head_without_key(&relay, &format!("new{i}")),
        )
        .await
        .expect("answer to an upgrade without a key");
        assert_rejected(&resp, 400, "upgrade without Sec-WebSocket-Key");
    }

    let (_bob, h) = resume(
        &relay,
        "bob",
        "keep",
        first["seq"].as_u64().unwrap(),
        &epoch,
    )
    .await;
    let text = metrics_text(&relay).await;
    let rooms = metric_in(&text, "roomcast_rooms", &[]);
    assert!(
        h["epoch"] == epoch.as_str()
            && h["complete"] == true
            && texts(&h["messages"]) == ["two", "three"],
        "20 refused upgrades (400, no Sec-WebSocket-Key) into new rooms must leave room 'keep' \
         intact (MAX_ROOMS=3): resume got {h} (epoch before: {epoch}); roomcast_rooms = {rooms:?}"
    );
    assert_eq!(rooms, Some(1.0), "refused upgrades must not create rooms");
}

#[tokio::test]
async fn full_room_map_evicts_the_empty_room_idle_longest() {
    // Ten rounds with fresh room names: a relay that evicts in map order instead of
    // least-recently-idle order keeps the right room in a round only by chance (about 1 in 2
    // per round), so it passes all rounds with a probability of about 1 in 1000.
    let relay = Relay::start(&[("MAX_ROOMS", "2"), ("PRESENCE_INTERVAL_MS", "1")]);
    let mut held: Vec<Client> = Vec::new();
    for round in 0..10 {
        for c in held.drain(..) {
            c.close().await;
        }
        wait_for_clients(&relay, 0, EVENT_TIMEOUT).await;
        let older = format!("older{round}");
        let newer = format!("newer{round}");
        // Both rooms get history. `older` is held open while `newer` is created, so creating
        // `newer` evicts the previous round's leftovers, never `older`.
        let (mut p, _, _) = Client::join(&relay, "p", &older).await;
        p.publish_and_wait("in the older room").await;
        let (mut q, _, qh) = Client::join(&relay, "q", &newer).await;
        let epoch = qh["epoch"].as_str().expect("epoch").to_string();
        let m = q.publish_and_wait("in the newer room").await;
        // Empty `older` first, then `newer`: `older` is the room idle longest.
        p.close().await;
        wait_for_clients(&relay, 1, EVENT_TIMEOUT).await;
        tokio::time::sleep(Duration::from_millis(20)).await;
        q.close().await;
        wait_for_clients(&relay, 0, EVENT_TIMEOUT).await;
        tokio::time::sleep(Duration::from_millis(20)).await;

        // A third room needs a slot: `older` must go.
        let (z, _, _) = Client::join(&relay, "z", &format!("third{round}")).await;
        let (qq, h) = resume(&relay, "q", &newer, m["seq"].as_u64().unwrap(), &epoch).await;
        assert!(
            h["epoch"] == epoch.as_str() && h["complete"] == true,
            "round {round}: at MAX_ROOMS=2 a join into a new room must evict {older:?} (emptied \
             first, idle longest), not {newer:?}; resume into {newer:?} got {h}"
        );
        held = vec![z, qq];
    }
}

#[tokio::test]
async fn invalid_room_refuse_answers_400_before_the_upgrade() {
    let relay = Relay::start(&[("INVALID_ROOM", "refuse")]);
    for room in ["team.secret", "abcdefghijklmnopqrstuvwxyz_-01234", "room!"] {
        let path = format!("/chat?{}", relay.chat_query("ada", room));
        let resp = upgrade_request(&relay, &path, Some(&relay.origin())).await;
        assert_rejected(&resp, 400, &format!("INVALID_ROOM=refuse, room {room:?}"));
        assert!(
            resp.body.contains("invalid room name"),
            "400 body should say \"invalid room name\": {:?}",
            resp.body
        );
    }
    assert_eq!(
        metric(
            &relay,
            "roomcast_upgrade_rejections_total",
            &[("reason", "invalid_room")]
        )
        .await,
        3.0
    );
    // A valid (trimmed) name still connects.
    let (_ok, _, h) = Client::join(&relay, "ada", " team-secret ").await;
    assert_eq!(h["room"], "team-secret", "{h}");

    // The default is still today's behaviour: the lobby.
    let lobby = Relay::start(&[]);
    let (_c, _, h) = Client::join(&lobby, "ada", "team.secret").await;
    assert_eq!(h["room"], "lobby", "INVALID_ROOM defaults to lobby: {h}");
}

// ---------------------------------------------------------------------------------------------
// Frames
// ---------------------------------------------------------------------------------------------

/// A masked final text frame whose length uses the 2-byte (126) or 8-byte (127) form.
fn long_form_text_frame(payload: &[u8], eight_bytes: bool) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut out = vec![0x80 | OP_TEXT];
    if eight_bytes {
        out.push(0x80 | 127);
        out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    } else {
        out.push(0x80 | 126);
        out.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Read until a close frame (Ok(code)) or say what happened instead.
async fn close_code_within(raw: &mut RawClient, timeout: Duration) -> Result<Option<u16>, String> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        match raw.read_frame(left).await {
            Ok(f) if f.opcode == OP_CLOSE => return Ok(f.close_code()),
            Ok(f) if f.opcode == OP_TEXT => {
                let v: Value = serde_json::from_slice(&f.payload).unwrap_or(Value::Null);
                seen.push(
                    v["type"].as_str().unwrap_or("?").to_string()
                        + v["code"]
                            .as_str()
                            .map(|c| format!("({c})"))
                            .as_deref()
                            .unwrap_or(""),
                );
            }
            Ok(f) => seen.push(format!("opcode {:#x}", f.opcode)),
            Err(end) => return Err(format!("{end:?} after frames {seen:?}")),
        }
    }
}

#[tokio::test]
async fn non_minimal_length_encodings_are_closed_1002() {
    let relay = Relay::start(&[]);
    let message = json!({"type": "message", "text": "long form"}).to_string();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("126 with length 5", long_form_text_frame(b"hello", false)),
        (
            "126 with a JSON message under 126 bytes",
            long_form_text_frame(message.as_bytes(), false),
        ),
        ("127 with length 5", long_form_text_frame(b"hello", true)),
        (
            "127 with length 300",
            long_form_text_frame(&[b' '; 300], true),
        ),
    ];
    // One connection per case, all sent first, then all read: the cases wait concurrently.
    let mut raws = Vec::new();
    for (what, frame) in cases {
        let mut raw = RawClient::connect(&relay, "lengths", "lengths").await;
        raw.send_raw(&frame).await.expect("write frame");
        raws.push((what, raw));
    }
    let outcomes = futures_util::future::join_all(
        raws.iter_mut()
            .map(|(_, raw)| close_code_within(raw, Duration::from_secs(2))),
    )
    .await;
    let mut wrong = Vec::new();
    for ((what, _), outcome) in raws.iter().zip(outcomes) {
        if outcome != Ok(Some(1002)) {
            wrong.push(format!("{what}: {outcome:?}"));
        }
    }
    assert!(
        wrong.is_empty(),
        "a client frame with a non-minimal length encoding must be closed with 1002; instead:\n{}",
        wrong.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Per-address publish rate
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn publish_rate_per_address_counts_across_reconnects() {
    let relay = Relay::start(&[
        ("PUBLISH_RATE_PER_ADDRESS", "5"),
        ("RATE_LIMIT", "1000"),
        ("RATE_WINDOW_MS", "60000"),
    ]);
    for i in 1..=5 {
        let (mut c, _, _) = Client::join(&relay, "hopper", "hops").await;
        let e = publish_and_answer(&mut c, &format!("message {i}")).await;
        assert_eq!(
            e["type"], "message",
            "message {i} of 5 is within the limit: {e}"
        );
        c.close().await;
    }
    let (mut c, _, _) = Client::join(&relay, "hopper", "hops").await;
    let e = publish_and_answer(&mut c, "message 6").await;
    assert!(
        e["type"] == "error" && e["code"] == "rate_limited",
        "the 6th message from one address within the window (PUBLISH_RATE_PER_ADDRESS=5), on a \
         fresh connection, must get rate_limited; got {e}"
    );
    let text = metrics_text(&relay).await;
    assert!(
        metric_in(&text, "roomcast_address_rate_limited_total", &[]).unwrap_or(0.0) >= 1.0
            && metric_in(&text, "roomcast_rate_limited_total", &[]).unwrap_or(0.0) >= 1.0,
        "counted in roomcast_rate_limited_total and roomcast_address_rate_limited_total:\n{text}"
    );
}

#[tokio::test]
async fn x_forwarded_for_names_the_client_only_behind_a_trusted_proxy() {
    let limits = [
        ("PUBLISH_RATE_PER_ADDRESS", "3"),
        ("RATE_LIMIT", "1000"),
        ("RATE_WINDOW_MS", "60000"),
    ];
    // No trusted proxy: X-Forwarded-For from 127.0.0.1 is ignored; every connection is 127.0.0.1.
    let relay = Relay::start(&limits);
    let mut answers = Vec::new();
    for i in 1..=4 {
        let xff = format!("10.0.0.{i}");
        let mut c = join_with_headers(&relay, "spoof", "xff", &[("X-Forwarded-For", &xff)]).await;
        answers.push(publish_and_answer(&mut c, &format!("spoofed {i}")).await);
        c.close().await;
    }
    assert!(
        answers[3]["code"] == "rate_limited",
        "without TRUSTED_PROXIES, X-Forwarded-For must not give a client a fresh budget; the 4th \
         message from 127.0.0.1 (limit 3) got {}",
        answers[3]
    );

    // 127.0.0.1 trusted: each forwarded address has its own budget; the rightmost untrusted
    // address counts, whatever the client wrote to its left.
    let mut trusted = limits.to_vec();
    trusted.push(("TRUSTED_PROXIES", "127.0.0.1"));
    let relay = Relay::start(&trusted);
    let mut one = join_with_headers(&relay, "one", "xff", &[("X-Forwarded-For", "10.0.0.1")]).await;
    let mut two = join_with_headers(&relay, "two", "xff", &[("X-Forwarded-For", "10.0.0.2")]).await;
    for i in 1..=3 {
        for c in [&mut one, &mut two] {
            let text = format!("{} {i}", c.name);
            c.publish(&text).await;
            // Both clients are in the room: wait for this client's own message (or its error),
            // not the other's, so no publish is still in flight when the next one is judged.
            let e = c
                .next_event_matching(EVENT_TIMEOUT, |e| {
                    e["type"] == "error" || e["message"]["text"] == text.as_str()
                })
                .await;
            assert_eq!(
                e["type"], "message",
                "behind a trusted proxy, {} has its own budget of 3: {e}",
                c.name
            );
        }
    }
    let mut spoofing = join_with_headers(
        &relay,
        "spoofing",
        "xff",
        &[("X-Forwarded-For", "192.0.2.99, 10.0.0.1")],
    )
    .await;
    let e = publish_and_answer(&mut spoofing, "fourth from 10.0.0.1").await;
    assert!(
        e["type"] == "error" && e["code"] == "rate_limited",
        "\"192.0.2.99, 10.0.0.1\" via a trusted proxy is 10.0.0.1 (rightmost untrusted), which \
         used its 3: expected rate_limited, got {e}"
    );
}

// ---------------------------------------------------------------------------------------------
// History budget
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn history_budget_drops_the_least_recently_published_room_first() {
    // Each stored message is about 550 bytes: room A holds ~2.2 KB, room B ~4.4 KB; together
    // they pass HISTORY_MAX_BYTES=6000, B alone does not.
    let relay = Relay::start(&[
        ("HISTORY_MAX_BYTES", "6000"),
        ("RATE_LIMIT", "1000"),
        ("PUBLISH_RATE_PER_ADDRESS", "0"),
    ]);
    let filler = "h".repeat(400);
    let (mut a, _, ha) = Client::join(&relay, "a", "hist-a").await;
    let epoch_a = ha["epoch"].as_str().unwrap().to_string();
    let first_a = a.publish_and_wait(&format!("a1 {filler}")).await;
    for i in 2..=4 {
        a.publish_and_wait(&format!("a{i} {filler}")).await;
    }
    a.close().await;
    let (mut b, _, hb) = Client::join(&relay, "b", "hist-b").await;
    let epoch_b = hb["epoch"].as_str().unwrap().to_string();
    for i in 1..=8 {
        b.publish_and_wait(&format!("b{i} {filler}")).await;
    }
    b.close().await;

    let (_ra, ra) = resume(
        &relay,
        "ra",
        "hist-a",
        first_a["seq"].as_u64().unwrap(),
        &epoch_a,
    )
    .await;
    let (_rb, rb) = resume(&relay, "rb", "hist-b", 0, &epoch_b).await;
    let kept_b = texts(&rb["messages"]).len();
    assert!(
        ra["complete"] == false,
        "room B's publishing passed HISTORY_MAX_BYTES=6000: the history of room A (published \
         least recently) must be dropped, so a resume into A gets complete:false; got {} \
         messages, complete {}",
        texts(&ra["messages"]).len(),
        ra["complete"]
    );
    assert!(
        rb["complete"] == true && rb["epoch"] == epoch_b.as_str() && kept_b == 8,
        "room B's own history (under the budget) is kept: complete {}, {kept_b} messages",
        rb["complete"]
    );
}

// ---------------------------------------------------------------------------------------------
// /metrics cache (P2)
// ---------------------------------------------------------------------------------------------

/// The expensive part of a scrape (reading /proc and listing every open file: ~18 ms at 19,900
/// connections) is gathered at most once a second; the relay's own counters stay current, so a
/// scrape right after an event shows it.
#[tokio::test]
async fn metrics_process_figures_are_cached_for_about_a_second_and_counters_stay_fresh() {
    let relay = Relay::start(&[]);
    let fds = |text: &str| metric_in(text, "process_open_fds", &[]).expect("process_open_fds");
    let opened = |text: &str| metric_in(text, "roomcast_connections_opened_total", &[]);
    let t0 = Instant::now();
    let first = metrics_text(&relay).await;
    let mut clients = Vec::new();
    for i in 0..5 {
        let (c, _, _) = Client::join(&relay, &format!("c{i}"), "cache").await;
        clients.push(c);
    }
    let soon = metrics_text(&relay).await;
    let gap = t0.elapsed();
    assert_eq!(
        opened(&soon).unwrap_or(0.0),
        opened(&first).unwrap_or(0.0) + 5.0,
        "relay counters are current in every scrape"
    );
    if gap < Duration::from_millis(800) {
        assert_eq!(
            fds(&soon),
            fds(&first),
            "a scrape {gap:?} after the previous one reuses the process figures (5 more sockets \
             are open)"
        );
    } else {
        eprintln!("scrapes {gap:?} apart: too slow to check the cache here");
    }
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let later = metrics_text(&relay).await;
    assert!(
        fds(&later) >= fds(&first) + 5.0,
        "after a second the process figures are gathered afresh: {} then {}",
        fds(&first),
        fds(&later)
    );
}
