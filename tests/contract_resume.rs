//! Contract (relay addition): exact resume. Messages carry `seq` per room; the history event
//! carries the room's `epoch`. Reconnecting with `since=SEQ&epoch=E` returns exactly the messages
//! after SEQ, with `complete:false` when some were already evicted or the epoch changed.

mod common;

use common::*;
use serde_json::Value;

/// Publish `n` messages from a fresh connection to `room`; returns them as delivered and the
/// room's epoch.
async fn publish_many(relay: &Relay, room: &str, n: usize) -> (Vec<Value>, String) {
    let (mut alice, _, history) = Client::join(relay, "alice", room).await;
    let epoch = history["epoch"]
        .as_str()
        .unwrap_or_else(|| panic!("history epoch must be a string: {history}"))
        .to_string();
    for i in 1..=n {
        alice.publish(&format!("m{i}")).await;
    }
    let mut delivered = Vec::new();
    for i in 1..=n {
        let m = alice.next_message(EVENT_TIMEOUT).await;
        assert_eq!(m["text"], format!("m{i}"), "{m}");
        assert_eq!(m["seq"], i as u64, "seq counts from 1 in a new room: {m}");
        delivered.push(m);
    }
    alice.close().await;
    (delivered, epoch)
}

/// Join with `since`/`epoch` and return the history event.
async fn resume(relay: &Relay, room: &str, since: u64, epoch: &str) -> Value {
    let query = format!(
        "{}&since={since}&epoch={}",
        relay.chat_query("bob", room),
        encode(epoch)
    );
    let mut bob = Client::connect_query(relay, &query)
        .await
        .unwrap_or_else(|e| panic!("resume connect failed: {e:?}"));
    let system = bob.next_event(EVENT_TIMEOUT).await;
    assert_eq!(system["type"], "system", "{system}");
    let history = bob.next_event(EVENT_TIMEOUT).await;
    assert_eq!(history["type"], "history", "{history}");
    assert!(
        history["complete"].is_boolean(),
        "complete is always present: {history}"
    );
    history
}

fn seqs(history: &Value) -> Vec<u64> {
    history["messages"]
        .as_array()
        .unwrap_or_else(|| panic!("messages must be an array: {history}"))
        .iter()
        .map(|m| {
            m["seq"]
                .as_u64()
                .unwrap_or_else(|| panic!("message without seq: {m}"))
        })
        .collect()
}

#[tokio::test]
async fn since_returns_exactly_the_messages_after_seq_with_complete_true() {
    let relay = Relay::start(&[]);
    let (sent, epoch) = publish_many(&relay, "resume", 5).await;

    let h = resume(&relay, "resume", 3, &epoch).await;
    assert_eq!(
        h["messages"],
        serde_json::json!(sent[3..]),
        "since=3 gives exactly seq 4 and 5: {h}"
    );
    assert_eq!(h["complete"], true, "{h}");
    assert_eq!(h["epoch"], epoch.as_str(), "{h}");

    let h = resume(&relay, "resume", 5, &epoch).await;
    assert_eq!(seqs(&h), Vec::<u64>::new(), "nothing missed: {h}");
    assert_eq!(h["complete"], true, "{h}");

    let h = resume(&relay, "resume", 0, &epoch).await;
    assert_eq!(seqs(&h), vec![1, 2, 3, 4, 5], "{h}");
    assert_eq!(h["complete"], true, "{h}");
}

#[tokio::test]
async fn since_older_than_the_held_history_reports_complete_false() {
    let relay = Relay::start(&[("RATE_LIMIT", "1000")]);
    let (_sent, epoch) = publish_many(&relay, "long", 55).await;
    let held: Vec<u64> = (6..=55).collect();

    let h = resume(&relay, "long", 2, &epoch).await;
    assert_eq!(seqs(&h), held, "everything still held after seq 2: {h}");
    assert_eq!(h["complete"], false, "seq 3..5 were evicted: {h}");

    let h = resume(&relay, "long", 4, &epoch).await;
    assert_eq!(seqs(&h), held, "{h}");
    assert_eq!(h["complete"], false, "seq 5 was evicted: {h}");

    let h = resume(&relay, "long", 5, &epoch).await;
    assert_eq!(seqs(&h), held, "{h}");
    assert_eq!(h["complete"], true, "everything after seq 5 is held: {h}");

    let h = resume(&relay, "long", 50, &epoch).await;
    assert_eq!(seqs(&h), (51..=55).collect::<Vec<u64>>(), "{h}");
    assert_eq!(h["complete"], true, "{h}");
}

#[tokio::test]
async fn unknown_epoch_reports_complete_false_with_the_full_history() {
    let relay = Relay::start(&[]);
    let (sent, epoch) = publish_many(&relay, "epochs", 5).await;
    let h = resume(&relay, "epochs", 3, "not-the-epoch").await;
    assert_eq!(
        h["messages"],
        serde_json::json!(sent),
        "a foreign epoch gets the whole history: {h}"
    );
    assert_eq!(h["complete"], false, "{h}");
    assert_eq!(
        h["epoch"],
        epoch.as_str(),
        "the current epoch is reported: {h}"
    );
}

#[tokio::test]
async fn plain_connect_reports_complete_true_and_the_epoch() {
    let relay = Relay::start(&[]);
    let (_sent, epoch) = publish_many(&relay, "plain", 3).await;
    let (_c, _, h) = Client::join(&relay, "carol", "plain").await;
    assert_eq!(seqs(&h), vec![1, 2, 3], "{h}");
    assert_eq!(h["complete"], true, "{h}");
    assert_eq!(
        h["epoch"],
        epoch.as_str(),
        "the epoch is stable while the room lives: {h}"
    );
}

#[tokio::test]
async fn reconnect_with_since_gets_exactly_what_was_missed() {
    let relay = Relay::start(&[]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "gap").await;
    let (mut bob, _, history) = Client::join(&relay, "bob", "gap").await;
    let epoch = history["epoch"].as_str().unwrap().to_string();
    alice.publish("before 1").await;
    alice.publish("before 2").await;
    let _ = bob.next_message(EVENT_TIMEOUT).await;
    let last_seen = bob.next_message(EVENT_TIMEOUT).await;
    let last_seq = last_seen["seq"].as_u64().unwrap();
    drop(bob);

    let mut missed = Vec::new();
    for text in ["while away 1", "while away 2", "while away 3"] {
        missed.push(alice.publish_and_wait(text).await);
    }
    let h = resume(&relay, "gap", last_seq, &epoch).await;
    assert_eq!(
        h["messages"],
        serde_json::json!(missed),
        "no duplicate, no gap: {h}"
    );
    assert_eq!(h["complete"], true, "{h}");
}

#[tokio::test]
async fn a_restarted_relay_has_a_new_epoch_and_resume_reports_complete_false() {
    let relay = Relay::start(&[]);
    let (_sent, old_epoch) = publish_many(&relay, "restart", 3).await;
    drop(relay);

    let relay = Relay::start(&[]);
    let h = resume(&relay, "restart", 3, &old_epoch).await;
    assert_ne!(
        h["epoch"],
        old_epoch.as_str(),
        "a restarted relay lost the history, so the epoch must change: {h}"
    );
    assert_eq!(h["complete"], false, "{h}");
    assert_eq!(seqs(&h), Vec::<u64>::new(), "{h}");
    let (mut alice, _, _) = Client::join(&relay, "alice", "restart").await;
    assert_eq!(
        alice.publish_and_wait("first again").await["seq"],
        1,
        "seq restarts with the new epoch"
    );
}

#[tokio::test]
async fn since_without_epoch_gets_everything_kept_with_complete_false() {
    let relay = Relay::start(&[]);
    let (sent, _epoch) = publish_many(&relay, "noepoch", 4).await;
    let query = format!("{}&since=2", relay.chat_query("bob", "noepoch"));
    let mut bob = Client::connect_query(&relay, &query)
        .await
        .expect("connect");
    let history = bob.next_event_of_type("history", EVENT_TIMEOUT).await;
    assert_eq!(history["messages"], serde_json::json!(sent), "{history}");
    assert_eq!(history["complete"], false, "{history}");
}

#[tokio::test]
async fn since_beyond_the_latest_seq_gets_everything_kept_with_complete_false() {
    let relay = Relay::start(&[]);
    let (sent, epoch) = publish_many(&relay, "future", 3).await;
    let h = resume(&relay, "future", 99, &epoch).await;
    assert_eq!(
        h["messages"],
        serde_json::json!(sent),
        "an unknown position gets everything kept: {h}"
    );
    assert_eq!(h["complete"], false, "{h}");
}

#[tokio::test]
async fn an_evicted_room_comes_back_with_a_new_epoch() {
    let relay = Relay::start(&[("MAX_ROOMS", "1")]);
    let (_sent, old_epoch) = publish_many(&relay, "evicted", 2).await;
    wait_for_clients(&relay, 0, std::time::Duration::from_secs(5)).await;
    // The only room slot goes to another room, evicting the empty one.
    let (other, _, _) = Client::join(&relay, "zed", "other").await;
    other.close().await;
    wait_for_clients(&relay, 0, std::time::Duration::from_secs(5)).await;

    let h = resume(&relay, "evicted", 2, &old_epoch).await;
    assert_ne!(
        h["epoch"],
        old_epoch.as_str(),
        "eviction lost the history, so the epoch changes: {h}"
    );
    assert_eq!(h["complete"], false, "{h}");
    assert_eq!(seqs(&h), Vec::<u64>::new(), "{h}");
}

#[tokio::test]
async fn past_history_max_bytes_the_least_recently_published_room_loses_its_history_first() {
    // A message is charged a few hundred bytes: 20 of them fit in 8,000, 40 do not.
    let relay = Relay::start(&[("HISTORY_MAX_BYTES", "8000")]);
    let (_, old_epoch) = publish_many(&relay, "quiet", 20).await;
    let (_, new_epoch) = publish_many(&relay, "busy", 20).await;

    let h = resume(&relay, "quiet", 10, &old_epoch).await;
    assert_eq!(
        h["epoch"],
        old_epoch.as_str(),
        "the room and its epoch stay: {h}"
    );
    assert_eq!(h["complete"], false, "its history was dropped: {h}");
    assert_eq!(seqs(&h), Vec::<u64>::new(), "{h}");

    let h = resume(&relay, "busy", 10, &new_epoch).await;
    assert_eq!(h["complete"], true, "{h}");
    assert_eq!(seqs(&h), (11..=20).collect::<Vec<u64>>(), "{h}");

    // The quiet room keeps counting: its next message is seq 21.
    let (mut alice, _, _) = Client::join(&relay, "alice", "quiet").await;
    alice.publish("back").await;
    assert_eq!(alice.next_message(EVENT_TIMEOUT).await["seq"], 21);
}
