//! Contract: what a connection sees when it opens and what the room sees when members come and go.
//! On connect: system, then history, then the room gets presence "NAME joined" with the online
//! count; likewise "NAME left". `name` and `room` are sanitised (trimmed; bad → guest / lobby).

mod common;

use common::*;
use serde_json::Value;

#[tokio::test]
async fn connect_sends_system_then_history_then_presence_joined() {
    let relay = Relay::start(&[]);
    let mut alice = Client::connect(&relay, "alice", "r1").await;

    let system = alice.next_event(EVENT_TIMEOUT).await;
    assert_eq!(system["type"], "system", "first event: {system}");
    assert_eq!(system["message"], "connected as alice", "{system}");
    assert!(
        system["clientId"].is_number(),
        "clientId must be a number: {system}"
    );

    let history = alice.next_event(EVENT_TIMEOUT).await;
    assert_eq!(history["type"], "history", "second event: {history}");
    assert_eq!(
        history["messages"],
        serde_json::json!([]),
        "a new room has no history: {history}"
    );
    assert_eq!(history["room"], "r1", "{history}");
    assert!(
        history["epoch"].is_string(),
        "epoch must be a string: {history}"
    );
    assert_eq!(history["complete"], true, "{history}");

    let presence = alice.next_event(EVENT_TIMEOUT).await;
    assert_eq!(presence["type"], "presence", "third event: {presence}");
    assert_eq!(presence["message"], "alice joined", "{presence}");
    assert_eq!(presence["online"], 1, "{presence}");

    let mut bob = Client::connect(&relay, "bob", "r1").await;
    let system = bob.next_event(EVENT_TIMEOUT).await;
    assert_eq!(system["type"], "system", "{system}");
    assert_eq!(system["message"], "connected as bob", "{system}");
    let history = bob.next_event(EVENT_TIMEOUT).await;
    assert_eq!(history["type"], "history", "{history}");
    let presence = bob.next_event(EVENT_TIMEOUT).await;
    assert_eq!(presence["type"], "presence", "{presence}");
    assert_eq!(presence["message"], "bob joined", "{presence}");
    assert_eq!(presence["online"], 2, "{presence}");

    let seen_by_alice = alice.next_event(EVENT_TIMEOUT).await;
    assert_eq!(seen_by_alice["type"], "presence", "{seen_by_alice}");
    assert_eq!(seen_by_alice["message"], "bob joined", "{seen_by_alice}");
    assert_eq!(seen_by_alice["online"], 2, "{seen_by_alice}");
    assert_eq!(
        seen_by_alice["joined"],
        serde_json::json!(["bob"]),
        "{seen_by_alice}"
    );
    assert_eq!(
        seen_by_alice["left"],
        serde_json::json!([]),
        "{seen_by_alice}"
    );
}

#[tokio::test]
async fn client_ids_are_distinct_numbers() {
    let relay = Relay::start(&[]);
    let mut ids = Vec::new();
    let mut keep = Vec::new();
    for i in 0..5 {
        let (client, system, _) = Client::join(&relay, &format!("user{i}"), "lobby").await;
        ids.push(
            system["clientId"]
                .as_u64()
                .unwrap_or_else(|| panic!("clientId must be a non-negative integer: {system}")),
        );
        keep.push(client);
    }
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    sorted.dedup();
    assert_eq!(sorted.len(), ids.len(), "clientIds repeat: {ids:?}");
}

#[tokio::test]
async fn leaving_announces_presence_left_with_the_online_count() {
    let relay = Relay::start(&[]);
    let mut alice = Client::join_and_settle(&relay, "alice", "r1").await;

    // Graceful close.
    let bob = Client::join_and_settle(&relay, "bob", "r1").await;
    let joined = alice.next_event_of_type("presence", EVENT_TIMEOUT).await;
    assert_eq!(
        (joined["message"].as_str(), joined["online"].as_u64()),
        (Some("bob joined"), Some(2)),
        "{joined}"
    );
    bob.close().await;
    let left = alice.next_event_of_type("presence", EVENT_TIMEOUT).await;
    assert_eq!(left["message"], "bob left", "{left}");
    assert_eq!(left["online"], 1, "{left}");
    assert_eq!(left["left"], serde_json::json!(["bob"]), "{left}");
    assert_eq!(left["joined"], serde_json::json!([]), "{left}");

    // Dropped TCP connection, no close frame.
    let carol = Client::join_and_settle(&relay, "carol", "r1").await;
    let joined = alice.next_event_of_type("presence", EVENT_TIMEOUT).await;
    assert_eq!(
        (joined["message"].as_str(), joined["online"].as_u64()),
        (Some("carol joined"), Some(2)),
        "{joined}"
    );
    drop(carol);
    let left = alice.next_event_of_type("presence", EVENT_TIMEOUT).await;
    assert_eq!(left["message"], "carol left", "{left}");
    assert_eq!(left["online"], 1, "{left}");
}

#[tokio::test]
async fn presence_is_only_sent_to_the_room_of_the_member() {
    let relay = Relay::start(&[]);
    let mut watcher = Client::join_and_settle(&relay, "watcher", "quiet").await;
    let _other = Client::join_and_settle(&relay, "other", "busy").await;
    // A message from the watcher's own room is the first thing it sees after its own join.
    let mut friend = Client::join_and_settle(&relay, "friend", "quiet").await;
    friend.publish_and_wait("marker").await;
    loop {
        let event = watcher.next_event(EVENT_TIMEOUT).await;
        if event["type"] == "message" {
            assert_eq!(event["message"]["text"], "marker", "{event}");
            break;
        }
        assert_eq!(event["type"], "presence", "{event}");
        assert!(
            !event["message"].as_str().unwrap_or("").contains("other"),
            "presence from another room leaked: {event}"
        );
    }
}

async fn connected_as(relay: &Relay, query: &str) -> String {
    let mut client = Client::connect_query(relay, query)
        .await
        .unwrap_or_else(|e| panic!("connect with query {query:?} failed: {e:?}"));
    let system = client.next_event(EVENT_TIMEOUT).await;
    assert_eq!(system["type"], "system", "{system}");
    let message = system["message"]
        .as_str()
        .unwrap_or_else(|| panic!("system message must be a string: {system}"));
    let name = message
        .strip_prefix("connected as ")
        .unwrap_or_else(|| panic!("system message must read `connected as NAME`: {system}"))
        .to_string();
    client.close().await;
    name
}

#[tokio::test]
async fn name_is_trimmed_and_an_invalid_name_becomes_guest() {
    let relay = Relay::start(&[]);
    let t = &relay.token;
    let name24 = "abcdefghijklmnopqrstuvwx";
    let name25 = "abcdefghijklmnopqrstuvwxy";
    let cases: Vec<(String, &str)> = vec![
        (encode("  alice  "), "alice"),
        (encode("Ann-Marie_2 x"), "Ann-Marie_2 x"),
        (encode(name24), name24),
        (encode(&format!("  {name24}  ")), name24),
        (encode(name25), "guest"),
        (encode("bob!"), "guest"),
        (encode("<b>x</b>"), "guest"),
        (encode("a.b"), "guest"),
        (encode("tab\there"), "guest"),
        (encode("\"quoted\""), "guest"),
        (encode(""), "guest"),
        (encode("    "), "guest"),
    ];
    for (encoded, expected) in cases {
        let got = connected_as(&relay, &format!("token={t}&name={encoded}&room=names")).await;
        assert_eq!(
            got, expected,
            "name {encoded:?} (percent-encoded) should connect as {expected:?}"
        );
    }
    let got = connected_as(&relay, &format!("token={t}&room=names")).await;
    assert_eq!(got, "guest", "a missing name connects as guest");
}

#[tokio::test]
async fn sanitised_name_is_the_from_of_published_messages() {
    let relay = Relay::start(&[]);
    let (mut trimmed, _, _) = Client::join(&relay, "  spaced out  ", "r").await;
    let m = trimmed.publish_and_wait("one").await;
    assert_eq!(m["from"], "spaced out", "{m}");
    let (mut bad, _, _) = Client::join(&relay, "<script>", "r").await;
    let m = bad.publish_and_wait("two").await;
    assert_eq!(m["from"], "guest", "{m}");
}

async fn room_of(relay: &Relay, query: &str) -> (String, Value) {
    let mut client = Client::connect_query(relay, query)
        .await
        .unwrap_or_else(|e| panic!("connect with query {query:?} failed: {e:?}"));
    client.name = format!("query {query}");
    let history = client.next_event_of_type("history", EVENT_TIMEOUT).await;
    let text = format!("probe {query}");
    let message = client.publish_and_wait(&text).await;
    client.close().await;
    (
        message["room"]
            .as_str()
            .unwrap_or_else(|| panic!("room must be a string: {message}"))
            .to_string(),
        history,
    )
}

#[tokio::test]
async fn room_is_trimmed_and_an_invalid_room_becomes_lobby() {
    let relay = Relay::start(&[]);
    let t = &relay.token;
    let room32 = "abcdefghijklmnopqrstuvwxyz_-0123";
    let room33 = "abcdefghijklmnopqrstuvwxyz_-01234";
    let cases: Vec<(String, &str)> = vec![
        (encode("  dev-room_1 "), "dev-room_1"),
        (encode(room32), room32),
        (encode(&format!(" {room32} ")), room32),
        (encode(room33), "lobby"),
        (encode("a b"), "lobby"),
        (encode("room!"), "lobby"),
        (encode("über"), "lobby"),
        (encode("../etc"), "lobby"),
        (encode(""), "lobby"),
        (encode("   "), "lobby"),
    ];
    for (encoded, expected) in cases {
        let (room, history) =
            room_of(&relay, &format!("token={t}&name=alice&room={encoded}")).await;
        assert_eq!(
            room, expected,
            "room {encoded:?} (percent-encoded) should be {expected:?}"
        );
        assert_eq!(
            history["room"], expected,
            "history event room for {encoded:?}: {history}"
        );
    }
    let (room, _) = room_of(&relay, &format!("token={t}&name=alice")).await;
    assert_eq!(room, "lobby", "a missing room is the lobby");
}

#[tokio::test]
async fn a_trimmed_room_is_the_same_room_as_its_clean_spelling() {
    let relay = Relay::start(&[]);
    let (mut clean, _, _) = Client::join(&relay, "clean", "dev-room").await;
    let (mut spaced, _, _) = Client::join(&relay, "spaced", "  dev-room  ").await;
    spaced.publish("hello from spaced").await;
    let m = clean.next_message(EVENT_TIMEOUT).await;
    assert_eq!(m["text"], "hello from spaced", "{m}");
    assert_eq!(m["room"], "dev-room", "{m}");
    assert_eq!(m["from"], "spaced", "{m}");
}
