//! Contract: publish. `{"type":"message","text":..}` reaches every connection in the sender's room,
//! sender included, and no other room. `from` and `room` come from the connection; `id` is a UUID,
//! `sentAt` ISO-8601, `seq` increases per room. Newcomers get the room's last 50 messages, oldest
//! first.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test]
async fn publish_reaches_every_member_of_the_room_including_the_sender() {
    let relay = Relay::start(&[]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "r1").await;
    let (mut bob, _, _) = Client::join(&relay, "bob", "r1").await;
    let (mut carol, _, _) = Client::join(&relay, "carol", "r1").await;

    alice.publish("hello room").await;
    for client in [&mut alice, &mut bob, &mut carol] {
        let m = client.next_message(EVENT_TIMEOUT).await;
        assert_message_shape(&m, "r1", "alice", "hello room");
    }
}

#[tokio::test]
async fn publish_does_not_reach_other_rooms() {
    let relay = Relay::start(&[]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "r1").await;
    let (mut bob, _, _) = Client::join(&relay, "bob", "r1").await;
    let (mut zed, _, _) = Client::join(&relay, "zed", "r2").await;

    let first = alice.publish_and_wait("for r1 only").await;
    assert_eq!(bob.next_message(EVENT_TIMEOUT).await["id"], first["id"]);

    // zed's next message is its own: nothing from r1 arrived before or with it.
    zed.publish("for r2 only").await;
    let m = zed.next_message(EVENT_TIMEOUT).await;
    assert_message_shape(&m, "r2", "zed", "for r2 only");

    // bob's next message is alice's second one: nothing from r2 arrived before it.
    alice.publish("second for r1").await;
    let m = bob.next_message(EVENT_TIMEOUT).await;
    assert_eq!(
        m["text"], "second for r1",
        "a message from another room reached r1: {m}"
    );

    // And nothing else shows up for zed shortly after.
    let leaked = zed
        .try_next_event_of_type("message", Duration::from_millis(500))
        .await;
    assert!(leaked.is_err(), "r1 traffic reached r2: {leaked:?}");
}

#[tokio::test]
async fn from_and_room_come_from_the_connection_not_the_payload() {
    let relay = Relay::start(&[]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "r1").await;
    let (mut mallory_room, _, _) = Client::join(&relay, "observer", "other").await;

    alice
        .send_json(&json!({
            "type": "message",
            "text": "spoof attempt",
            "from": "mallory",
            "room": "other",
            "id": "not-a-uuid",
            "sentAt": "1999-01-01T00:00:00.000Z",
            "seq": 999,
            "extra": {"nested": [1, 2, 3]}
        }))
        .await;
    let m = alice.next_message(EVENT_TIMEOUT).await;
    assert_message_shape(&m, "r1", "alice", "spoof attempt");
    assert_ne!(m["id"], "not-a-uuid", "{m}");
    assert_eq!(m["seq"], 1, "seq is the relay's, not the payload's: {m}");
    assert!(
        m.get("extra").is_none(),
        "extra payload fields must not be relayed: {m}"
    );

    // The payload's room was not used: the other room's member sees only its own message.
    mallory_room.publish("own").await;
    let own = mallory_room.next_message(EVENT_TIMEOUT).await;
    assert_eq!(
        own["text"], "own",
        "the spoofed room received a message: {own}"
    );
}

#[tokio::test]
async fn message_id_is_a_uuid_sent_at_is_iso8601_and_seq_counts_up() {
    let relay = Relay::start(&[]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "fresh").await;
    let before = unix_now();
    let first = alice.publish_and_wait("one").await;
    let second = alice.publish_and_wait("two").await;
    let after = unix_now();

    assert_message_shape(&first, "fresh", "alice", "one");
    assert_message_shape(&second, "fresh", "alice", "two");
    assert_ne!(first["id"], second["id"], "ids must be unique");
    assert_eq!(
        (first["seq"].as_u64(), second["seq"].as_u64()),
        (Some(1), Some(2)),
        "seq starts at 1 and counts up"
    );
    let t1 = parse_iso8601(first["sentAt"].as_str().unwrap()).unwrap();
    let t2 = parse_iso8601(second["sentAt"].as_str().unwrap()).unwrap();
    assert!(t1 <= t2, "sentAt must not go backwards: {first} {second}");
    assert!(
        t1 >= before - 2.0 && t2 <= after + 2.0,
        "sentAt must be the publish time: {first} {second}"
    );
}

#[tokio::test]
async fn seq_is_counted_per_room() {
    let relay = Relay::start(&[]);
    let (mut a, _, _) = Client::join(&relay, "a", "room-a").await;
    let (mut b, _, _) = Client::join(&relay, "b", "room-b").await;
    assert_eq!(a.publish_and_wait("a1").await["seq"], 1);
    assert_eq!(b.publish_and_wait("b1").await["seq"], 1);
    assert_eq!(a.publish_and_wait("a2").await["seq"], 2);
    assert_eq!(a.publish_and_wait("a3").await["seq"], 3);
    assert_eq!(b.publish_and_wait("b2").await["seq"], 2);
}

#[tokio::test]
async fn every_member_receives_messages_in_publish_order() {
    let relay = Relay::start(&[("RATE_LIMIT", "1000")]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "order").await;
    let (mut bob, _, _) = Client::join(&relay, "bob", "order").await;
    for i in 0..40 {
        alice.publish(&format!("n{i}")).await;
    }
    for client in [&mut alice, &mut bob] {
        for i in 0..40 {
            let m = client.next_message(EVENT_TIMEOUT).await;
            assert_eq!(
                m["text"],
                format!("n{i}"),
                "[{}] out of order: {m}",
                client.name
            );
            assert_eq!(m["seq"], i + 1, "{m}");
        }
    }
}

#[tokio::test]
async fn newcomer_gets_the_last_50_messages_oldest_first() {
    let relay = Relay::start(&[("RATE_LIMIT", "1000")]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "busy").await;
    let mut sent = Vec::new();
    for i in 1..=55 {
        alice.publish(&format!("m{i}")).await;
    }
    for i in 1..=55 {
        let m = alice.next_message(EVENT_TIMEOUT).await;
        assert_eq!(m["text"], format!("m{i}"), "{m}");
        sent.push(m);
    }

    let (_bob, _, history) = Client::join(&relay, "bob", "busy").await;
    assert_eq!(history["complete"], true, "{history}");
    let messages = history["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("messages must be an array: {history}"));
    assert_eq!(
        messages.len(),
        50,
        "history must hold exactly the last 50 messages"
    );
    for (held, original) in messages.iter().zip(&sent[5..]) {
        assert_eq!(
            held, original,
            "history entry differs from the delivered message"
        );
    }
    assert_eq!(messages[0]["text"], "m6", "oldest first");
    assert_eq!(messages[49]["text"], "m55", "newest last");
}

#[tokio::test]
async fn history_is_kept_per_room() {
    let relay = Relay::start(&[]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "one").await;
    let m = alice.publish_and_wait("in one").await;

    let (_b, _, history) = Client::join(&relay, "bob", "two").await;
    assert_eq!(
        history["messages"],
        json!([]),
        "another room's history leaked: {history}"
    );
    let (_c, _, history) = Client::join(&relay, "carol", "one").await;
    assert_eq!(history["messages"], json!([m]), "{history}");
}

#[tokio::test]
async fn text_is_relayed_unchanged() {
    let relay = Relay::start(&[]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "r").await;
    let (mut bob, _, _) = Client::join(&relay, "bob", "r").await;
    let text =
        "héllo wörld ✓ 日本語 <script>alert(1)</script> &amp; \"quotes\" \\ back\\slash\nnew line";
    alice.publish(text).await;
    let m = bob.next_message(EVENT_TIMEOUT).await;
    assert_eq!(m["text"], text, "{m}");
}

#[tokio::test]
async fn published_text_is_trimmed() {
    let relay = Relay::start(&[]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "r").await;
    alice.publish("  padded text \n\t").await;
    let m = alice.next_message(EVENT_TIMEOUT).await;
    assert_eq!(m["text"], "padded text", "{m}");
}
