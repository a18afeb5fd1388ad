//! Relay nodes sharing rooms through a real Redis Cluster (`REDIS_CLUSTER_NODES`): three masters
//! and three replicas of Debian's `redis-server`, formed by `redis-cli --cluster create` once per
//! test binary (it takes a few seconds) and shared by these tests. Rooms whose slots fall on
//! every master reach every member once, in order; the server API works across nodes; and a
//! master killed with `kill -9` fails over: its rooms' publishes get `unavailable` until its
//! replica is promoted, then flow again, every acked message is delivered, and a resume over the
//! gap is complete or says it is not. A node re-states its presence counts in one script call
//! per master, not one per room.
//!
//! The failover test holds the shared cluster's write lock (the others its read lock), so no
//! other test's traffic runs through the failover; the cluster keeps serving afterwards with
//! three masters.

mod common;

use std::collections::{BTreeMap, HashSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use serde_json::{json, Value};
use tokio::time::Instant;

/// Bound on publishes to a failed master's rooms succeeding again after its replica's promotion.
const RECOVERY_BOUND: Duration = Duration::from_secs(15);
/// How much later than the promotion the test may notice it (one poll of every node).
const PROMOTION_SEEN_SLACK: Duration = Duration::from_millis(300);
/// REDIS_TIMEOUT_MS of the relays here: a publish Redis did not take by then is `unavailable`.
const REDIS_TIMEOUT: Duration = Duration::from_millis(1000);

fn node(cluster: &RedisCluster) -> Relay {
    Relay::builder()
        .env("REDIS_CLUSTER_NODES", cluster.seeds())
        .env("RATE_LIMIT", 1000)
        .env("REDIS_TIMEOUT_MS", REDIS_TIMEOUT.as_millis())
        .env("API_KEY", "k")
        .start()
}

/// Wait until every node answers /readyz 200 (it reached the cluster).
async fn wait_ready(nodes: &[&Relay]) {
    for relay in nodes {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if http_get(relay, "/readyz", &[]).await.status == 200 {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "node on {} never became ready:\n{}",
                relay.port(),
                relay.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// `per_master` room names (`PREFIX-N`) for each master, by the slot of their `{room}` tag.
fn rooms_on_every_master(cluster: &RedisCluster, prefix: &str, per_master: usize) -> Vec<String> {
    let masters = cluster.masters();
    assert_eq!(masters.len(), 3, "three masters: {masters:?}");
    let mut by_master: BTreeMap<u16, Vec<String>> = BTreeMap::new();
    for i in 0..1000 {
        let room = format!("{prefix}-{i}");
        let slot = cluster.keyslot(&format!("{{{room}}}"));
        let owner = masters
            .iter()
            .find(|m| m.serves(slot))
            .expect("every slot is served")
            .port;
        let list = by_master.entry(owner).or_default();
        if list.len() < per_master {
            list.push(room);
        }
        if by_master.len() == 3 && by_master.values().all(|l| l.len() == per_master) {
            return by_master.into_values().flatten().collect();
        }
    }
    panic!("1000 names did not give {per_master} rooms on each master: {by_master:?}");
}

/// The port of the master serving `room`'s keys and channel now.
fn master_of_room(cluster: &RedisCluster, room: &str) -> u16 {
    cluster.master_of(cluster.keyslot(&format!("{{{room}}}")))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_rooms_on_three_masters_reach_every_member_once_in_order() {
    let _shared = RedisCluster::exclusive().read().await;
    let cluster = RedisCluster::shared();
    let (a, b) = (node(cluster), node(cluster));
    wait_ready(&[&a, &b]).await;
    let rooms = rooms_on_every_master(cluster, "spread", 10);
    assert_eq!(rooms.len(), 30);
    // One member on each node in every room.
    let mut members = Vec::new();
    for room in &rooms {
        let (on_a, _, h) = Client::join(&a, "ada", room).await;
        assert_eq!(h["complete"], true, "{h}");
        let (on_b, _, h) = Client::join(&b, "bob", room).await;
        assert_eq!(h["complete"], true, "{h}");
        members.push((on_a, on_b));
    }
    // Both publish, interleaved, without waiting: the room's seq orders them.
    const EACH: usize = 3;
    for round in 0..EACH {
        for (on_a, on_b) in members.iter_mut() {
            for c in [on_a, on_b] {
                let text = format!("{} {} m{round}", c.room, c.name);
                c.send_json(&json!({"type":"message","text":text,"requestId":format!("r{round}")}))
                    .await;
            }
        }
    }
    for (on_a, on_b) in members.iter_mut() {
        for c in [on_a, on_b] {
            let mut got = Vec::new();
            let mut acks = 0;
            let deadline = Instant::now() + WAIT;
            while got.len() < 2 * EACH || acks < EACH {
                assert!(
                    Instant::now() < deadline,
                    "{} in {}: {got:?}",
                    c.name,
                    c.room
                );
                let e = c.next_event(WAIT).await;
                match e["type"].as_str() {
                    Some("message") => got.push((
                        e["message"]["text"].as_str().unwrap_or("").to_string(),
                        e["message"]["seq"].as_u64().unwrap_or(0),
                    )),
                    Some("ack") => acks += 1,
                    Some("presence") => {}
                    _ => panic!("{} in {}: unexpected {e}", c.name, c.room),
                }
            }
            let seqs: Vec<u64> = got.iter().map(|(_, s)| *s).collect();
            let expected: Vec<u64> = (1..=(2 * EACH) as u64).collect();
            assert_eq!(
                seqs, expected,
                "{} in {}: once each, in order",
                c.name, c.room
            );
            let texts: HashSet<&String> = got.iter().map(|(t, _)| t).collect();
            assert_eq!(texts.len(), 2 * EACH, "{} in {}: {got:?}", c.name, c.room);
            for t in &texts {
                assert!(t.starts_with(&format!("{} ", c.room)), "foreign: {t}");
            }
        }
    }
    // Nothing more arrives (no duplicates trailing behind).
    for (on_a, on_b) in members.iter_mut() {
        for c in [on_a, on_b] {
            let extra = c
                .try_next_event_matching(Duration::from_millis(20), |e| e["type"] == "message")
                .await;
            assert!(extra.is_err(), "{}: a duplicate arrived: {extra:?}", c.name);
        }
    }
}

/// The server API on a cluster: a publish on node A reaches node B's members, history comes
/// from the room's shard, presence counts every node, and a disconnect (the plain control
/// channel, broadcast by the cluster) closes the user's connections on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_api_works_across_nodes_on_a_cluster() {
    let _shared = RedisCluster::exclusive().read().await;
    let cluster = RedisCluster::shared();
    let (a, b) = (node(cluster), node(cluster));
    wait_ready(&[&a, &b]).await;
    // Names of their own: a disconnect reaches every relay on the shared cluster.
    let (mut on_b, _, _) = Client::join(&b, "api-ada", "api-ops").await;
    let (mut also_on_b, _, _) = Client::join(&b, "api-bob", "api-ops").await;
    let r = api_post(
        &a,
        "/api/publish",
        json!({"room": "api-ops", "text": "from A"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(on_b.next_message(WAIT).await["text"], "from A");
    on_b.publish_and_wait("from ada on B").await;
    let h = http_get(
        &a,
        "/api/rooms/api-ops/history?since=1",
        &[("Authorization", "Bearer k")],
    )
    .await;
    assert_eq!(h.status, 200, "{}", h.body);
    let h = h.json();
    assert_eq!(h["complete"], true, "{h}");
    assert_eq!(h["messages"][0]["text"], "from ada on B", "{h}");
    let deadline = Instant::now() + WAIT;
    loop {
        let p = http_get(
            &a,
            "/api/rooms/api-ops/presence",
            &[("Authorization", "Bearer k")],
        )
        .await;
        if p.json()["online"] == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "presence: {}", p.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = api_post(&a, "/api/disconnect", json!({"name": "api-ada"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(on_b.expect_close(WAIT).await, Some(4000));
    also_on_b.publish_and_wait("bob stays").await;
}

async fn api_post(relay: &Relay, path: &str, body: Value) -> HttpResponse {
    let body = body.to_string();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer k\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    http_exchange(relay.addr, &req).await.expect("API call")
}

/// One publish's outcome, as its sender saw it.
#[derive(Debug, Clone)]
struct Outcome {
    text: String,
    sent: Instant,
    answered: Instant,
    /// `Ok(seq)`: acked; `Err(code)`: an error event.
    result: Result<u64, String>,
}

/// What one member received: message texts and seqs in arrival order, and history events that
/// arrived after the greeting (a new epoch tells members with `complete:false`).
#[derive(Debug, Default)]
struct Received {
    messages: Vec<(String, u64)>,
    notices: Vec<Value>,
}

impl Received {
    fn note(&mut self, e: &Value) {
        match e["type"].as_str() {
            Some("message") => self.messages.push((
                e["message"]["text"].as_str().unwrap_or("").to_string(),
                e["message"]["seq"].as_u64().unwrap_or(0),
            )),
            Some("history") => self.notices.push(e.clone()),
            _ => {}
        }
    }

    /// Every text it has, from message events and from later history events.
    fn texts(&self) -> HashSet<String> {
        let mut all: HashSet<String> = self.messages.iter().map(|(t, _)| t.clone()).collect();
        for h in &self.notices {
            for m in h["messages"].as_array().into_iter().flatten() {
                all.insert(m["text"].as_str().unwrap_or("").to_string());
            }
        }
        all
    }
}

/// The outcomes of one room's publishes so far, shared with the test while they run.
type Outcomes = Arc<std::sync::Mutex<Vec<Outcome>>>;

fn outcomes_of(log: &Outcomes) -> Vec<Outcome> {
    log.lock().unwrap_or_else(|p| p.into_inner()).clone()
}

/// Publish to the room every `pause` until `stop`, one at a time: each publish must be answered
/// (ack or error) within REDIS_TIMEOUT plus slack; each outcome goes to `log` as it comes. Also
/// keeps what the publisher received.
async fn publish_until(
    mut client: Client,
    stop: Arc<AtomicBool>,
    pause: Duration,
    log: Outcomes,
) -> (Client, Received) {
    let mut received = Received::default();
    // Bounded: at most this many publishes whatever happens.
    for i in 0..2000 {
        if stop.load(Ordering::Acquire) {
            break;
        }
        let text = format!("{} p{i}", client.room);
        let sent = Instant::now();
        client
            .send_json(&json!({"type":"message","text":text,"requestId":format!("r{i}")}))
            .await;
        let answer = loop {
            let e = client
                .try_next_event(REDIS_TIMEOUT + Duration::from_secs(3))
                .await
                .unwrap_or_else(|end| panic!("{text}: no answer within the bound: {end:?}"));
            received.note(&e);
            match e["type"].as_str() {
                Some("ack") => break Ok(e["seq"].as_u64().expect("ack seq")),
                Some("error") => break Err(e["code"].as_str().unwrap_or("").to_string()),
                _ => {}
            }
        };
        log.lock().unwrap_or_else(|p| p.into_inner()).push(Outcome {
            text,
            sent,
            answered: Instant::now(),
            result: answer,
        });
        tokio::time::sleep(pause).await;
    }
    // Our own last messages may come back after their acks.
    for _ in 0..1000 {
        match client.try_next_event(Duration::from_millis(700)).await {
            Ok(e) => received.note(&e),
            Err(_) => break,
        }
    }
    (client, received)
}

/// Keep what a member receives until `stop`, then until it has been quiet for a while.
async fn receive_until(mut client: Client, stop: Arc<AtomicBool>) -> (Client, Received) {
    let mut received = Received::default();
    let quiet = Duration::from_millis(700);
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        match client.try_next_event(quiet).await {
            Ok(e) => received.note(&e),
            Err(WsEnd::Timeout) if stop.load(Ordering::Acquire) => break,
            Err(WsEnd::Timeout) => {}
            Err(end) => panic!(
                "{} in {}: connection ended: {end:?}",
                client.name, client.room
            ),
        }
    }
    (client, received)
}

/// Every acked message of `outcomes` is among what the member received, and the member's
/// message events have no repeat and rise in seq (within an epoch).
fn check_member(who: &str, outcomes: &[Outcome], received: &Received) {
    let texts = received.texts();
    for o in outcomes {
        if let Ok(seq) = o.result {
            assert!(
                texts.contains(&o.text),
                "{who}: acked {:?} (seq {seq}) was never delivered; got {:?} and notices {:?}",
                o.text,
                received.messages,
                received.notices
            );
        }
    }
    let mut seen = HashSet::new();
    for (t, _) in &received.messages {
        assert!(seen.insert(t), "{who}: {t:?} delivered twice");
    }
    // Within one epoch seqs only rise; a history notice (new epoch) may restart them.
    if received.notices.is_empty() {
        let seqs: Vec<u64> = received.messages.iter().map(|(_, s)| *s).collect();
        assert!(
            seqs.windows(2).all(|w| w[0] < w[1]),
            "{who}: out of order {:?}",
            received.messages
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_fails_over_and_its_rooms_publish_again_with_nothing_acked_lost() {
    let _exclusive = RedisCluster::exclusive().write().await;
    let cluster = RedisCluster::shared();
    let (a, b) = (node(cluster), node(cluster));
    wait_ready(&[&a, &b]).await;
    // The victim serves the control channel's slot too, so the API's disconnect must survive
    // the failover as well.
    let victim = cluster.master_of(cluster.keyslot("rc:control"));
    let all = rooms_on_every_master(cluster, "failover", 4);
    let (victim_rooms, other_rooms): (Vec<String>, Vec<String>) = all
        .into_iter()
        .partition(|room| master_of_room(cluster, room) == victim);
    assert_eq!((victim_rooms.len(), other_rooms.len()), (4, 8));

    // In every room a publisher on node A and a member on node B.
    let stop_publishing = Arc::new(AtomicBool::new(false));
    let stop_receiving = Arc::new(AtomicBool::new(false));
    let mut publishers = BTreeMap::new();
    let mut logs: BTreeMap<String, Outcomes> = BTreeMap::new();
    let mut receivers = BTreeMap::new();
    let mut greetings = BTreeMap::new();
    for room in victim_rooms.iter().chain(&other_rooms) {
        let (publisher, _, _) = Client::join(&a, "pub", room).await;
        let (member, _, h) = Client::join(&b, "member", room).await;
        greetings.insert(room.clone(), h);
        let stop = stop_publishing.clone();
        let log = Outcomes::default();
        logs.insert(room.clone(), log.clone());
        publishers.insert(
            room.clone(),
            tokio::spawn(publish_until(
                publisher,
                stop,
                Duration::from_millis(150),
                log,
            )),
        );
        let stop = stop_receiving.clone();
        receivers.insert(room.clone(), tokio::spawn(receive_until(member, stop)));
    }
    // A watcher on node B for the disconnect after the failover.
    let (mut watcher, _, _) = Client::join(&b, "failover-watcher", "failover-watch").await;

    // Traffic flows before the kill.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let resume_room = victim_rooms[0].clone();
    let epoch = greetings[&resume_room]["epoch"]
        .as_str()
        .expect("epoch")
        .to_string();
    let before_kill = Instant::now();
    cluster.kill_hard(victim);
    let killed = Instant::now();
    // The promotion: the first moment any live node says a live master serves the victim's
    // slots (the promoted replica knows first).
    let slot = cluster.keyslot(&format!("{{{resume_room}}}"));
    let promoted = loop {
        let now = Instant::now();
        let served = cluster.live_ports().iter().any(|&port| {
            cluster
                .masters_seen_by(port)
                .iter()
                .any(|m| m.port != victim && m.serves(slot))
        });
        if served {
            break now;
        }
        assert!(
            now < killed + Duration::from_secs(30),
            "no replica took over within 30 s\n{}",
            cluster.logs_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let agreed = cluster.wait_until_served(Duration::from_secs(30));
    let new_master = master_of_room(cluster, &resume_room);
    eprintln!(
        "failover: master {victim} killed; replica {new_master} promoted {:?} later; every node agreed {:?} after that",
        promoted - killed,
        agreed
    );
    assert_ne!(new_master, victim);

    // Publishes to the victim's rooms succeed again within the bound after the promotion; then
    // a few more, and stop.
    let recovery_deadline = promoted + RECOVERY_BOUND;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let publishing_again = victim_rooms.iter().all(|room| {
            outcomes_of(&logs[room])
                .iter()
                .any(|o| o.sent >= promoted && o.result.is_ok())
        });
        if publishing_again {
            break;
        }
        assert!(
            Instant::now() < recovery_deadline,
            "the failed master's rooms did not publish again within {RECOVERY_BOUND:?} of the promotion\nnode A:\n{}",
            a.logs()
        );
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop_publishing.store(true, Ordering::Release);
    let mut results = BTreeMap::new();
    for (room, task) in publishers {
        let (client, own) = task.await.expect("publisher task");
        let outcomes = outcomes_of(&logs[&room]);
        results.insert(room, (client, outcomes, own));
    }
    stop_receiving.store(true, Ordering::Release);
    let mut members = BTreeMap::new();
    for (room, task) in receivers {
        members.insert(room, task.await.expect("receiver task"));
    }

    let mut first_ack_after_promotion = Vec::new();
    let mut last_unavailable_after_promotion = Vec::new();
    let mut unavailable_in_gap = 0;
    for room in &victim_rooms {
        let (_, outcomes, own) = &results[room];
        // Every error is `unavailable`, and only around the failover: sent at most a timeout
        // before the kill (in flight then), answered at most a few seconds after the promotion.
        for o in outcomes {
            if let Err(code) = &o.result {
                assert_eq!(code, "unavailable", "{room}: {o:?}");
                assert!(
                    o.sent + REDIS_TIMEOUT >= before_kill && o.sent <= promoted + REDIS_TIMEOUT * 3,
                    "{room}: unavailable outside the failover: {o:?} (killed at {killed:?}, promoted at {promoted:?})",
                );
            }
        }
        // While the slot had no master, nothing was acked, and publishes got `unavailable`.
        // (`promoted` is when the test saw the promotion: up to a poll later than it happened.)
        let gap: Vec<&Outcome> = outcomes
            .iter()
            .filter(|o| o.sent >= killed && o.answered + PROMOTION_SEEN_SLACK < promoted)
            .collect();
        assert!(
            gap.iter().all(|o| o.result.is_err()),
            "{room}: acked while the slot had no master: {gap:?}"
        );
        let unavailable = outcomes
            .iter()
            .filter(|o| o.sent >= killed && o.result.is_err())
            .count();
        assert!(
            unavailable >= 1,
            "{room}: no publish during the gap got unavailable: {outcomes:?}"
        );
        unavailable_in_gap += unavailable;
        if let Some(last) = outcomes.iter().rfind(|o| o.result.is_err()) {
            last_unavailable_after_promotion
                .push(last.answered.saturating_duration_since(promoted));
        }
        let first = outcomes
            .iter()
            .find(|o| o.sent >= promoted && o.result.is_ok())
            .unwrap_or_else(|| panic!("{room}: no ack after the promotion"));
        first_ack_after_promotion.push(first.answered - promoted);
        assert!(
            first.answered - promoted <= RECOVERY_BOUND,
            "{room}: {first:?}"
        );
        let (_, received) = &members[room];
        check_member(&format!("member of {room} on B"), outcomes, received);
        check_member(&format!("publisher of {room} on A"), outcomes, own);
    }
    for room in &other_rooms {
        let (_, outcomes, own) = &results[room];
        let failed: Vec<&Outcome> = outcomes.iter().filter(|o| o.result.is_err()).collect();
        assert!(
            failed.is_empty(),
            "{room} is on a healthy master, yet: {failed:?}"
        );
        let (_, received) = &members[room];
        check_member(&format!("member of {room} on B"), outcomes, received);
        check_member(&format!("publisher of {room} on A"), outcomes, own);
    }
    eprintln!(
        "failover: {unavailable_in_gap} publishes got unavailable; per room, the last unavailable answered {last_unavailable_after_promotion:?} after the promotion, the first ack sent after it answered {first_ack_after_promotion:?} after it"
    );

    // A client resuming over the gap, on a third node that never followed the room (its
    // history comes from the new master) and on node B (from its mirror): every acked message
    // after `since`, or complete:false.
    let (_, outcomes, _) = &results[&resume_room];
    let acked: Vec<(u64, &str)> = outcomes
        .iter()
        .filter_map(|o| o.result.as_ref().ok().map(|s| (*s, o.text.as_str())))
        .collect();
    let since = acked
        .iter()
        .filter(|(_, t)| {
            outcomes
                .iter()
                .any(|o| o.text == *t && o.answered < before_kill)
        })
        .map(|(s, _)| *s)
        .max()
        .expect("acks before the kill");
    let c = node(cluster);
    wait_ready(&[&c]).await;
    for relay in [&c, &b] {
        let query = format!(
            "{}&since={since}&epoch={epoch}",
            relay.chat_query("resumer", &resume_room)
        );
        let mut resumer = Client::connect_query(relay, &query).await.expect("upgrade");
        resumer.next_event_of_type("system", WAIT).await;
        let h = resumer.next_event_of_type("history", WAIT).await;
        if h["complete"] == true {
            assert_eq!(h["epoch"], epoch.as_str(), "{h}");
            let got: HashSet<&str> = h["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .filter_map(|m| m["text"].as_str())
                .collect();
            for (seq, text) in acked.iter().filter(|(s, _)| *s > since) {
                assert!(
                    got.contains(text),
                    "resume on {} since {since}: acked {text:?} (seq {seq}) missing from a complete history: {h}",
                    relay.port()
                );
            }
        } else {
            eprintln!("resume on {}: complete:false (allowed): {h}", relay.port());
        }
    }

    // The control channel lived on the failed master's slot: a disconnect still reaches node B.
    let r = api_post(&a, "/api/disconnect", json!({"name": "failover-watcher"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(watcher.expect_close(WAIT).await, Some(4000));
    wait_for_metric(&a, "roomcast_redis_reconnects_total", &[], WAIT, |v| {
        v >= 1.0
    })
    .await;
}

/// A shard with no node left (master and replica both killed) makes only its own rooms wait:
/// its rooms' publishes get `unavailable`, while the other rooms' messages keep arriving
/// promptly and a join into another room is greeted at once — the node's re-subscriptions to
/// the dead shard, retried until it comes back, must not hold them up. Its own cluster: the
/// shard stays dead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shard_with_no_node_left_does_not_hold_up_the_other_rooms() {
    let cluster = RedisCluster::start();
    let (a, b) = (node(&cluster), node(&cluster));
    wait_ready(&[&a, &b]).await;
    let rooms = rooms_on_every_master(&cluster, "deadshard", 3);
    let dead_master = master_of_room(&cluster, &rooms[0]);
    let replicas = cluster.replicas_of(dead_master);
    assert_eq!(replicas.len(), 1, "one replica per master");
    let dead_rooms: HashSet<String> = rooms
        .iter()
        .filter(|r| master_of_room(&cluster, r) == dead_master)
        .cloned()
        .collect();
    assert_eq!(dead_rooms.len(), 3);
    // A room nobody joined yet, on a live master, for a join after the kill.
    let fresh = rooms_on_every_master(&cluster, "deadshard-new", 1)
        .into_iter()
        .find(|r| master_of_room(&cluster, r) != dead_master)
        .expect("a new room on a live master");
    let mut members = Vec::new();
    for room in &rooms {
        let (on_a, _, _) = Client::join(&a, "ada", room).await;
        let (on_b, _, _) = Client::join(&b, "bob", room).await;
        members.push((room.clone(), on_a, on_b));
    }
    cluster.kill_hard(replicas[0]);
    cluster.kill_hard(dead_master);
    let killed = Instant::now();
    // Give the nodes time to notice and start re-subscribing (and failing) on the dead shard.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let mut worst = Duration::ZERO;
    for round in 0..4 {
        for (room, on_a, on_b) in members.iter_mut() {
            let dead = dead_rooms.contains(room.as_str());
            if dead && round > 0 {
                continue; // one `unavailable` each is enough (each takes REDIS_TIMEOUT)
            }
            let text = format!("{room} r{round}");
            on_a.send_json(&json!({"type":"message","text":text,"requestId":format!("r{round}")}))
                .await;
            let answer = on_a
                .next_event_matching(REDIS_TIMEOUT + Duration::from_secs(3), |e| {
                    e["type"] == "ack" || e["type"] == "error"
                })
                .await;
            if dead {
                assert_eq!(answer["code"], "unavailable", "{room}: {answer}");
                continue;
            }
            let sent = Instant::now();
            assert_eq!(answer["type"], "ack", "{room} is on a live shard: {answer}");
            let got = on_b
                .next_event_matching(Duration::from_secs(5), |e| {
                    e["type"] == "message" && e["message"]["text"] == text.as_str()
                })
                .await;
            assert_eq!(got["message"]["text"], text.as_str());
            worst = worst.max(sent.elapsed());
        }
    }
    // A join into a live room on node B, which follows it already, and into a new live room
    // it does not follow yet: both greeted at once.
    let live_room = rooms
        .iter()
        .find(|r| !dead_rooms.contains(r.as_str()))
        .expect("a live room");
    for room in [live_room.as_str(), fresh.as_str()] {
        let started = Instant::now();
        let (_c, _, h) = Client::join(&b, "late", room).await;
        assert_eq!(h["complete"], true, "{h}");
        worst = worst.max(started.elapsed());
    }
    eprintln!(
        "dead shard: live rooms' slowest delivery or greeting {worst:?}, {:?} after the kill",
        killed.elapsed()
    );
    assert!(
        worst < Duration::from_millis(900),
        "the dead shard held up the other rooms: {worst:?}"
    );
}

#[test]
fn redis_url_and_redis_cluster_nodes_together_refuse_to_start() {
    let mut cmd = Command::new(relay_binary());
    for key in RELAY_ENV {
        cmd.env_remove(key);
    }
    let out = cmd
        .env("REDIS_URL", "redis://127.0.0.1:6379")
        .env("REDIS_CLUSTER_NODES", "127.0.0.1:7000,127.0.0.1:7001")
        .env("PORT", "0")
        .output()
        .expect("run roomcast");
    assert!(!out.status.success(), "it started: {:?}", out.status);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        all.contains("REDIS_URL and REDIS_CLUSTER_NODES are both set") && all.contains("not both"),
        "{all}"
    );
}

/// REDIS_CLUSTER_NODES may carry a password: --help and the logs (debug included, with the
/// cluster unreachable so its errors happen) never show it.
#[tokio::test]
async fn the_cluster_nodes_password_is_never_shown() {
    let nodes = "redis://:hunter2-s3cret@127.0.0.1:1,redis://:hunter2-s3cret@127.0.0.1:2";
    let mut cmd = Command::new(relay_binary());
    for key in RELAY_ENV {
        cmd.env_remove(key);
    }
    let out = cmd
        .env("REDIS_CLUSTER_NODES", nodes)
        .arg("--help")
        .output()
        .expect("run roomcast --help");
    let help = String::from_utf8_lossy(&out.stdout);
    assert!(help.contains("REDIS_CLUSTER_NODES"), "{help}");
    assert!(
        !help.contains("hunter2"),
        "--help shows the password:\n{help}"
    );
    let mut relay = Relay::start(&[
        ("REDIS_CLUSTER_NODES", nodes),
        ("RUST_LOG", "debug"),
        ("REDIS_TIMEOUT_MS", "200"),
    ]);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(http_get(&relay, "/readyz", &[]).await.status, 503);
    relay.stop_with_sigterm(Duration::from_secs(10)).await;
    let leaks: Vec<String> = relay
        .stderr_lines()
        .into_iter()
        .filter(|l| l.contains("hunter2"))
        .collect();
    assert!(leaks.is_empty(), "log lines show the password: {leaks:?}");
}

/// Script calls run by the cluster's masters so far.
fn masters_script_calls(cluster: &RedisCluster) -> u64 {
    cluster
        .masters()
        .iter()
        .map(|m| script_calls(&cluster.command(m.port, &["INFO", "commandstats"])))
        .sum()
}

/// The expiries of a room's presence entries, read from its master.
fn room_presence_expiries(cluster: &RedisCluster, room: &str) -> Vec<u64> {
    let key = format!("rc:{{{room}}}:presence");
    presence_expiries(&cluster.command(master_of_room(cluster, room), &["HGETALL", &key]))
}

/// The presence refresh (every 10 s) keeps a node's counts from expiring. With rooms on every
/// master it must re-state them in one call per master (a script over many slots of one
/// server), not one call per room: that per-room traffic was most of an idle deployment's CPU.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restates_its_presence_in_one_call_per_master() {
    // Alone on the cluster: the script calls counted are this node's.
    let _exclusive = RedisCluster::exclusive().write().await;
    let cluster = RedisCluster::shared();
    let a = node(cluster);
    wait_ready(&[&a]).await;
    let rooms = rooms_on_every_master(cluster, "restate", 10);
    let mut members = Vec::new();
    for room in &rooms {
        members.push(Client::join(&a, "ada", room).await.0);
    }
    let expiries = || -> Vec<Vec<u64>> {
        rooms
            .iter()
            .map(|r| room_presence_expiries(cluster, r))
            .collect()
    };
    let calls =
        count_across_a_presence_refresh(expiries, || masters_script_calls(cluster), || a.logs())
            .await;
    assert!(
        calls <= 6,
        "re-stating 30 rooms on 3 masters took {calls} script calls (one per room would be 30)"
    );
    for room in &rooms {
        let key = format!("rc:{{{room}}}:presence");
        let total = cluster.command(master_of_room(cluster, room), &["HGET", &key, "_total"]);
        assert_eq!(total.as_text().as_deref(), Some("1"), "{room}");
    }
    assert_eq!(metric(&a, "roomcast_redis_errors_total", &[]).await, 0.0);
    drop(members);
}
