//! Contract (relay addition): presence that survives join storms. Presence is coalesced per room:
//! the first change goes out at once, then at most one event per PRESENCE_INTERVAL_MS, carrying the
//! current `online` count and who joined or left (`type`, `message`, `online` kept).

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::*;
use futures_util::future::join_all;
use serde_json::Value;

const STORM: usize = 50;

fn names(event: &Value, key: &str) -> Vec<String> {
    event[key]
        .as_array()
        .unwrap_or_else(|| panic!("presence `{key}` must be an array: {event}"))
        .iter()
        .map(|n| {
            n.as_str()
                .unwrap_or_else(|| panic!("names are strings: {event}"))
                .to_string()
        })
        .collect()
}

fn check_presence_shape(event: &Value) {
    assert_eq!(event["type"], "presence", "{event}");
    assert!(
        event["message"].as_str().is_some_and(|m| !m.is_empty()),
        "presence message: {event}"
    );
    assert!(event["online"].is_u64(), "presence online: {event}");
    assert!(
        names(event, "joined").len() <= 20,
        "joined lists at most 20 names: {event}"
    );
    assert!(
        names(event, "left").len() <= 20,
        "left lists at most 20 names: {event}"
    );
}

/// Read presence events until one reports `online == target`; returns the events and when the
/// last one was read.
async fn presence_until_online(
    watcher: &mut Client,
    target: u64,
    timeout: Duration,
) -> (Vec<Value>, Instant) {
    let mut events = Vec::new();
    loop {
        let e = watcher.next_event_of_type("presence", timeout).await;
        check_presence_shape(&e);
        let online = e["online"].as_u64();
        events.push(e);
        if online == Some(target) {
            return (events, Instant::now());
        }
    }
}

/// The most presence events a room may emit in `elapsed`: one at once, then one per interval
/// (plus one for scheduling slack).
fn coalescing_bound(elapsed: Duration, interval: Duration) -> usize {
    (elapsed.as_millis() / interval.as_millis()) as usize + 2
}

#[tokio::test]
async fn join_storm_is_coalesced_into_few_presence_events() {
    let interval = Duration::from_millis(300);
    let relay = Relay::start(&[("PRESENCE_INTERVAL_MS", "300")]);
    let mut watcher = Client::join_and_settle(&relay, "watcher", "storm").await;

    let started = Instant::now();
    let joins = join_all((0..STORM).map(|i| {
        let relay = &relay;
        async move { Client::connect(relay, &format!("user{i}"), "storm").await }
    }));
    let watch = presence_until_online(&mut watcher, STORM as u64 + 1, Duration::from_secs(20));
    let (clients, (mut events, last_at)) = tokio::join!(joins, watch);
    // Anything trailing still counts.
    while let Ok(e) = watcher
        .try_next_event_of_type("presence", interval * 3)
        .await
    {
        check_presence_shape(&e);
        events.push(e);
    }

    let elapsed = last_at - started;
    let bound = coalescing_bound(elapsed, interval);
    eprintln!(
        "join storm: {} presence events for {STORM} joins in {elapsed:?} (bound {bound})",
        events.len()
    );
    assert!(
        events.len() <= bound,
        "{} presence events for {STORM} joins in {elapsed:?}: at most {bound} allowed with a {interval:?} interval\n{events:#?}",
        events.len()
    );
    assert!(
        events.len() < STORM / 2,
        "a join storm must not cost one presence event per join: {}",
        events.len()
    );
    let last = events.last().unwrap();
    assert_eq!(
        last["online"],
        STORM as u64 + 1,
        "the last presence carries the final count: {last}"
    );
    for e in &events {
        assert!(e["message"].as_str().unwrap().contains("joined"), "{e}");
        assert!(names(e, "left").is_empty(), "nobody left: {e}");
    }
    drop(clients);
}

#[tokio::test]
async fn leave_storm_is_coalesced_and_ends_with_the_right_count() {
    let interval = Duration::from_millis(300);
    let relay = Relay::start(&[("PRESENCE_INTERVAL_MS", "300")]);
    let mut watcher = Client::join_and_settle(&relay, "watcher", "storm").await;
    let clients = join_all((0..STORM).map(|i| {
        let relay = &relay;
        async move { Client::connect(relay, &format!("user{i}"), "storm").await }
    }))
    .await;
    presence_until_online(&mut watcher, STORM as u64 + 1, Duration::from_secs(20)).await;

    let started = Instant::now();
    drop(clients);
    let (mut events, last_at) =
        presence_until_online(&mut watcher, 1, Duration::from_secs(20)).await;
    while let Ok(e) = watcher
        .try_next_event_of_type("presence", interval * 3)
        .await
    {
        check_presence_shape(&e);
        events.push(e);
    }
    let elapsed = last_at - started;
    let bound = coalescing_bound(elapsed, interval);
    eprintln!(
        "leave storm: {} presence events for {STORM} leaves in {elapsed:?} (bound {bound})",
        events.len()
    );
    assert!(
        events.len() <= bound,
        "{} presence events for {STORM} leaves in {elapsed:?}, at most {bound} allowed",
        events.len()
    );
    assert!(
        events.len() < STORM / 2,
        "{} presence events for {STORM} leaves",
        events.len()
    );
    let last = events.last().unwrap();
    assert_eq!(last["online"], 1, "{last}");
    for e in &events {
        assert!(e["message"].as_str().unwrap().contains("left"), "{e}");
    }
}

#[tokio::test]
async fn presence_goes_out_at_once_then_at_most_once_per_interval() {
    let interval = Duration::from_millis(1500);
    let relay = Relay::start(&[("PRESENCE_INTERVAL_MS", "1500")]);
    let mut watcher = Client::join_and_settle(&relay, "watcher", "edge").await;
    // Let the room go quiet for a whole interval.
    tokio::time::sleep(interval + Duration::from_millis(300)).await;

    let before_bob = Instant::now();
    let _bob = Client::connect(&relay, "bob", "edge").await;
    let e = watcher.next_event_of_type("presence", EVENT_TIMEOUT).await;
    let bob_at = Instant::now();
    assert_eq!(e["message"], "bob joined", "{e}");
    assert!(
        bob_at - before_bob < interval / 2,
        "after a quiet interval the first change must go out at once, took {:?}",
        bob_at - before_bob
    );

    let _carol = Client::connect(&relay, "carol", "edge").await;
    let e = watcher.next_event_of_type("presence", EVENT_TIMEOUT).await;
    let carol_at = Instant::now();
    assert_eq!(e["message"], "carol joined", "{e}");
    assert_eq!(e["online"], 3, "{e}");
    assert!(
        carol_at - bob_at >= interval * 8 / 10,
        "a second change within the interval must wait for it: came {:?} after the first",
        carol_at - bob_at
    );
}

#[tokio::test]
async fn coalesced_presence_lists_who_joined_and_who_left() {
    let relay = Relay::start(&[("PRESENCE_INTERVAL_MS", "1000")]);
    let mut watcher = Client::join_and_settle(&relay, "watcher", "lists").await;

    let (bob, carol) = tokio::join!(
        Client::connect(&relay, "bob", "lists"),
        Client::connect(&relay, "carol", "lists")
    );
    let (events, _) = presence_until_online(&mut watcher, 3, Duration::from_secs(10)).await;
    let joined: BTreeSet<String> = events.iter().flat_map(|e| names(e, "joined")).collect();
    assert_eq!(
        joined,
        BTreeSet::from(["bob".to_string(), "carol".to_string()]),
        "{events:#?}"
    );
    for e in &events {
        let message = e["message"].as_str().unwrap();
        for name in names(e, "joined") {
            assert!(message.contains(&name), "message names who joined: {e}");
        }
    }

    drop(bob);
    drop(carol);
    let (events, _) = presence_until_online(&mut watcher, 1, Duration::from_secs(10)).await;
    let left: BTreeSet<String> = events.iter().flat_map(|e| names(e, "left")).collect();
    assert_eq!(
        left,
        BTreeSet::from(["bob".to_string(), "carol".to_string()]),
        "{events:#?}"
    );
    for e in &events {
        let message = e["message"].as_str().unwrap();
        assert!(message.contains("left"), "{e}");
        for name in names(e, "left") {
            assert!(message.contains(&name), "message names who left: {e}");
        }
    }
}

#[tokio::test]
async fn sustained_joins_emit_at_most_one_presence_event_per_interval() {
    let interval = Duration::from_millis(200);
    let joiners = 30;
    let relay = Relay::start(&[("PRESENCE_INTERVAL_MS", "200")]);
    let mut watcher = Client::join_and_settle(&relay, "watcher", "steady").await;

    let started = Instant::now();
    let joins = async {
        let mut clients = Vec::new();
        for i in 0..joiners {
            clients.push(Client::connect(&relay, &format!("user{i}"), "steady").await);
            // Pace the joins over several intervals (workload shaping, not a wait for an event).
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        clients
    };
    let watch = presence_until_online(&mut watcher, joiners as u64 + 1, Duration::from_secs(20));
    let (clients, (mut events, last_at)) = tokio::join!(joins, watch);
    while let Ok(e) = watcher
        .try_next_event_of_type("presence", interval * 3)
        .await
    {
        check_presence_shape(&e);
        events.push(e);
    }
    let elapsed = last_at - started;
    let bound = coalescing_bound(elapsed, interval);
    eprintln!(
        "sustained joins: {} presence events for {joiners} joins in {elapsed:?} (bound {bound})",
        events.len()
    );
    assert!(
        events.len() <= bound,
        "{} presence events for {joiners} joins over {elapsed:?}: at most one per {interval:?} allowed ({bound})\n{events:#?}",
        events.len()
    );
    assert!(
        events.len() >= 2,
        "joins spread over several intervals produce several updates"
    );
    let joined: BTreeSet<String> = events.iter().flat_map(|e| names(e, "joined")).collect();
    assert_eq!(
        joined.len(),
        joiners,
        "every joiner is named in some presence event (each event lists up to 20)"
    );
    assert_eq!(events.last().unwrap()["online"], joiners as u64 + 1);
    drop(clients);
}
