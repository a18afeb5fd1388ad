//! Contract (relay addition): idempotent publish. A message with `requestId` is acknowledged to the
//! sender with `{"type":"ack","requestId":..,"id":..,"seq":..}`; a repeat of the same requestId
//! with the same text from the same session in the same room (within the history window) is
//! acknowledged again, marked `duplicate:true`, and not broadcast again. The session is issued by
//! the relay in the `system` greeting and given back with `session=` on reconnect; the display
//! name is never the key. The same session, requestId and room with a different text is an
//! error event `conflict`, and nothing is broadcast.

mod common;

use common::*;
use serde_json::{json, Value};

async fn publish_with_id(client: &mut Client, text: &str, request_id: &str) {
    client
        .send_json(&json!({"type": "message", "text": text, "requestId": request_id}))
        .await;
}

/// Read the sender's events until the ack for `request_id`; returns (ack, message seen meanwhile).
async fn ack_for(client: &mut Client, request_id: &str) -> (Value, Vec<Value>) {
    let mut messages = Vec::new();
    loop {
        let e = client
            .next_event_matching(EVENT_TIMEOUT, |e| e["type"] != "presence")
            .await;
        match e["type"].as_str() {
            Some("ack") if e["requestId"] == request_id => return (e, messages),
            Some("message") => messages.push(e["message"].clone()),
            _ => panic!("[{}] expected ack for {request_id}, got {e}", client.name),
        }
    }
}

#[tokio::test]
async fn request_id_is_acknowledged_with_the_message_id_and_seq() {
    let relay = Relay::start(&[]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "acks").await;
    publish_with_id(&mut alice, "hello", "req-1").await;
    let (ack, mut messages) = ack_for(&mut alice, "req-1").await;
    if messages.is_empty() {
        messages.push(alice.next_message(EVENT_TIMEOUT).await);
    }
    let m = &messages[0];
    assert_message_shape(m, "acks", "alice", "hello");
    assert_eq!(
        ack["id"], m["id"],
        "ack carries the message id: {ack} vs {m}"
    );
    assert_eq!(
        ack["seq"], m["seq"],
        "ack carries the message seq: {ack} vs {m}"
    );
    assert_ne!(
        ack["duplicate"], true,
        "first ack is not a duplicate: {ack}"
    );
    assert!(
        m.get("requestId").is_none() || m["requestId"] == "req-1",
        "{m}"
    );
}

#[tokio::test]
async fn message_without_request_id_gets_no_ack() {
    let relay = Relay::start(&[]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "acks").await;
    alice.publish("no id").await;
    publish_with_id(&mut alice, "with id", "req-2").await;
    let first_ack = alice.next_event_of_type("ack", EVENT_TIMEOUT).await;
    assert_eq!(
        first_ack["requestId"], "req-2",
        "a message without requestId must not be acknowledged: {first_ack}"
    );
}

#[tokio::test]
async fn repeated_request_id_is_acknowledged_again_but_broadcast_once() {
    let relay = Relay::start(&[]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "dedupe").await;
    let (mut bob, _, _) = Client::join(&relay, "bob", "dedupe").await;

    publish_with_id(&mut alice, "once", "req-dup").await;
    let (first, _) = ack_for(&mut alice, "req-dup").await;
    publish_with_id(&mut alice, "once", "req-dup").await;
    let (second, _) = ack_for(&mut alice, "req-dup").await;
    assert_eq!(
        second["id"], first["id"],
        "the repeat is acknowledged with the original id: {first} {second}"
    );
    assert_eq!(
        second["seq"], first["seq"],
        "and the original seq: {first} {second}"
    );
    assert_eq!(second["duplicate"], true, "{second}");

    alice.publish("next").await;
    let m = bob.next_message(EVENT_TIMEOUT).await;
    assert_eq!(m["text"], "once", "{m}");
    assert_eq!(m["id"], first["id"], "{m}");
    let m = bob.next_message(EVENT_TIMEOUT).await;
    assert_eq!(
        m["text"], "next",
        "the repeat must not be broadcast again: {m}"
    );
    assert_eq!(
        m["seq"],
        first["seq"].as_u64().unwrap() + 1,
        "the repeat must not take a seq: {m}"
    );
}

#[tokio::test]
async fn same_request_id_from_another_name_is_not_a_duplicate() {
    let relay = Relay::start(&[]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "dedupe").await;
    let (mut carol, _, _) = Client::join(&relay, "carol", "dedupe").await;

    publish_with_id(&mut alice, "from alice", "shared").await;
    let (a, _) = ack_for(&mut alice, "shared").await;
    publish_with_id(&mut carol, "from carol", "shared").await;
    let (c, _) = ack_for(&mut carol, "shared").await;
    assert_ne!(
        c["id"], a["id"],
        "different name, same requestId is a new message: {a} {c}"
    );
    assert_ne!(c["duplicate"], true, "{c}");

    let m = alice
        .next_event_matching(EVENT_TIMEOUT, |e| {
            e["type"] == "message" && e["message"]["from"] == "carol"
        })
        .await;
    assert_eq!(m["message"]["text"], "from carol");
}

/// Connect with `session=` and read the `system` and `history` events; returns the greeting.
async fn join_with_session(
    relay: &Relay,
    name: &str,
    room: &str,
    session: &str,
) -> (Client, Value) {
    let query = format!(
        "{}&session={}",
        relay.chat_query(name, room),
        encode(session)
    );
    let mut client = Client::connect_query(relay, &query)
        .await
        .unwrap_or_else(|e| panic!("connect with session failed: {e:?}"));
    client.name = name.to_string();
    client.room = room.to_string();
    let system = client.next_event(EVENT_TIMEOUT).await;
    assert_eq!(system["type"], "system", "{system}");
    let history = client.next_event(EVENT_TIMEOUT).await;
    assert_eq!(history["type"], "history", "{history}");
    (client, system)
}

fn session_of(system: &Value) -> String {
    let session = system["session"]
        .as_str()
        .unwrap_or_else(|| panic!("the greeting carries a session: {system}"))
        .to_string();
    assert!(
        session.len() == 32
            && session
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "session is 32 lowercase hex digits: {system}"
    );
    session
}

#[tokio::test]
async fn every_connection_gets_its_own_session_unless_it_gives_one_back() {
    let relay = Relay::start(&[]);
    let (_a, system_a, _) = Client::join(&relay, "alice", "sessions").await;
    let (_b, system_b, _) = Client::join(&relay, "alice", "sessions").await;
    let a = session_of(&system_a);
    assert_ne!(a, session_of(&system_b), "same name, different sessions");
    let (_again, system) = join_with_session(&relay, "alice", "sessions", &a).await;
    assert_eq!(session_of(&system), a, "a session given back is kept");
    for bad in ["", "xyz", &a.to_uppercase(), &format!("{a}0"), &a[1..]] {
        let (_c, system) = join_with_session(&relay, "alice", "sessions", bad).await;
        let fresh = session_of(&system);
        assert_ne!(fresh, a, "malformed session {bad:?} gets a fresh one");
    }
}

#[tokio::test]
async fn same_name_and_request_id_from_two_clients_are_two_messages() {
    let relay = Relay::start(&[]);
    let (mut watcher, _, _) = Client::join(&relay, "watcher", "guests").await;
    let (mut one, _, _) = Client::join(&relay, "guest", "guests").await;
    let (mut two, _, _) = Client::join(&relay, "guest", "guests").await;
    publish_with_id(&mut one, "from one", "1").await;
    let (a, _) = ack_for(&mut one, "1").await;
    publish_with_id(&mut two, "from two", "1").await;
    let (b, _) = ack_for(&mut two, "1").await;
    assert!(a.get("duplicate").is_none(), "{a}");
    assert!(b.get("duplicate").is_none(), "{b}");
    assert_ne!(a["id"], b["id"], "{a} {b}");
    assert_ne!(a["seq"], b["seq"], "{a} {b}");
    assert_eq!(
        watcher.next_message(EVENT_TIMEOUT).await["text"],
        "from one"
    );
    assert_eq!(
        watcher.next_message(EVENT_TIMEOUT).await["text"],
        "from two"
    );
}

#[tokio::test]
async fn same_name_reconnecting_without_its_session_is_not_a_duplicate() {
    let relay = Relay::start(&[]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "no-session").await;
    publish_with_id(&mut alice, "hello", "req-1").await;
    let (first, _) = ack_for(&mut alice, "req-1").await;
    drop(alice);
    let (mut someone, _, _) = Client::join(&relay, "alice", "no-session").await;
    publish_with_id(&mut someone, "hello", "req-1").await;
    let (second, _) = ack_for(&mut someone, "req-1").await;
    assert_ne!(
        second["duplicate"], true,
        "a name is not an identity: {second}"
    );
    assert_ne!(second["id"], first["id"], "{first} {second}");
}

#[tokio::test]
async fn same_session_and_request_id_with_other_text_is_a_conflict() {
    let relay = Relay::start(&[]);
    let (mut watcher, _, _) = Client::join(&relay, "watcher", "conflict").await;
    let (mut alice, _, _) = Client::join(&relay, "alice", "conflict").await;
    publish_with_id(&mut alice, "original", "req-c").await;
    let (first, _) = ack_for(&mut alice, "req-c").await;
    publish_with_id(&mut alice, "something else", "req-c").await;
    let error = alice.next_error(EVENT_TIMEOUT).await;
    assert_eq!(error["code"], "conflict", "{error}");
    assert!(error["message"].is_string(), "{error}");

    // The connection stays open, nothing was broadcast and no seq was used.
    alice.publish("after").await;
    assert_eq!(
        watcher.next_message(EVENT_TIMEOUT).await["text"],
        "original"
    );
    let m = watcher.next_message(EVENT_TIMEOUT).await;
    assert_eq!(
        m["text"], "after",
        "the conflicting text was broadcast: {m}"
    );
    assert_eq!(m["seq"], first["seq"].as_u64().unwrap() + 1, "{m}");
}

#[tokio::test]
async fn same_session_and_request_id_after_reconnect_is_a_duplicate() {
    let relay = Relay::start(&[]);
    let (mut watcher, _, _) = Client::join(&relay, "watcher", "retry").await;
    let (mut alice, system, _) = Client::join(&relay, "alice", "retry").await;
    let session = session_of(&system);
    publish_with_id(&mut alice, "retry me", "req-retry").await;
    let (first, _) = ack_for(&mut alice, "req-retry").await;
    drop(alice);

    let (mut alice_again, _) = join_with_session(&relay, "alice", "retry", &session).await;
    publish_with_id(&mut alice_again, "retry me", "req-retry").await;
    let (second, _) = ack_for(&mut alice_again, "req-retry").await;
    assert_eq!(second["id"], first["id"], "{first} {second}");
    assert_eq!(second["duplicate"], true, "{second}");

    alice_again.publish("after retry").await;
    assert_eq!(
        watcher.next_message(EVENT_TIMEOUT).await["text"],
        "retry me"
    );
    assert_eq!(
        watcher.next_message(EVENT_TIMEOUT).await["text"],
        "after retry",
        "the retried message was broadcast twice"
    );
}

#[tokio::test]
async fn same_request_id_in_another_room_is_not_a_duplicate() {
    let relay = Relay::start(&[]);
    let (mut one, _, _) = Client::join(&relay, "alice", "room-one").await;
    let (mut two, _, _) = Client::join(&relay, "alice", "room-two").await;
    publish_with_id(&mut one, "in one", "req-x").await;
    let (a, _) = ack_for(&mut one, "req-x").await;
    publish_with_id(&mut two, "in two", "req-x").await;
    let (b, msgs) = ack_for(&mut two, "req-x").await;
    assert_ne!(a["id"], b["id"], "{a} {b}");
    assert_ne!(b["duplicate"], true, "{b}");
    let m = if msgs.is_empty() {
        two.next_message(EVENT_TIMEOUT).await
    } else {
        msgs[0].clone()
    };
    assert_eq!(m["text"], "in two");
    assert_eq!(m["room"], "room-two");
}

#[tokio::test]
async fn request_id_is_forgotten_once_the_original_leaves_the_history() {
    let relay = Relay::start(&[("HISTORY_LIMIT", "3")]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "short").await;
    publish_with_id(&mut alice, "original", "req-old").await;
    let (first, _) = ack_for(&mut alice, "req-old").await;
    for i in 0..3 {
        alice.publish_and_wait(&format!("filler {i}")).await;
    }
    publish_with_id(&mut alice, "original", "req-old").await;
    let (again, _) = ack_for(&mut alice, "req-old").await;
    assert_ne!(
        again["duplicate"], true,
        "the original was evicted, so this is new: {again}"
    );
    assert_ne!(again["id"], first["id"], "{first} {again}");
}
