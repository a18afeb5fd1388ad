//! Several relay nodes sharing rooms through a real `redis-server` (Debian's package, started
//! on a free port by these tests and stopped with them): cross-node delivery in `seq` order,
//! history and exact resume from any node, requestId de-duplication across nodes, a seq gap
//! filled from history, garbage on a room channel, and Redis restarting underneath. A node
//! re-states its presence counts in batches of rooms, not one call per room.

mod common;

use std::time::Duration;

use common::*;
use serde_json::{json, Value};

fn node(redis: &RedisServer) -> Relay {
    Relay::builder()
        .env("REDIS_URL", redis.url())
        .env("RATE_LIMIT", 1000)
        .env("REDIS_TIMEOUT_MS", 1000)
        .start()
}

/// Wait until every node answers /readyz 200 (its Redis connections are up).
async fn wait_ready(nodes: &[&Relay]) {
    for relay in nodes {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let r = http_get(relay, "/readyz", &[]).await;
            if r.status == 200 {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "node on {} never became ready",
                relay.port()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// The next `message` events' (text, seq), skipping presence and acks.
async fn messages(client: &mut Client, n: usize) -> Vec<(String, u64)> {
    let mut out = Vec::new();
    while out.len() < n {
        let e = client.next_event(EVENT_TIMEOUT).await;
        if e["type"] == "message" {
            out.push((
                e["message"]["text"].as_str().unwrap_or("").to_string(),
                e["message"]["seq"].as_u64().unwrap_or(0),
            ));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_on_three_nodes_share_a_room_once_each_in_seq_order() {
    let redis = RedisServer::start();
    let nodes = [node(&redis), node(&redis), node(&redis)];
    wait_ready(&nodes.iter().collect::<Vec<_>>()).await;
    let mut clients = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let (c, _, history) = Client::join(n, &format!("user{i}"), "shared").await;
        assert_eq!(history["complete"], true);
        clients.push(c);
    }
    // Every node agrees on the room's epoch (it lives in Redis).
    const EACH: usize = 10;
    for round in 0..EACH {
        for (i, c) in clients.iter_mut().enumerate() {
            c.publish(&format!("n{i} m{round}")).await;
        }
    }
    for c in clients.iter_mut() {
        let got = messages(c, 3 * EACH).await;
        let seqs: Vec<u64> = got.iter().map(|(_, s)| *s).collect();
        let expected: Vec<u64> = (1..=(3 * EACH) as u64).collect();
        assert_eq!(
            seqs, expected,
            "{}: every message once, in seq order",
            c.name
        );
        let mut texts: Vec<&String> = got.iter().map(|(t, _)| t).collect();
        texts.sort();
        texts.dedup();
        assert_eq!(texts.len(), 3 * EACH, "{}: {got:?}", c.name);
    }
    // Nothing more arrives (no duplicates trailing behind).
    for c in clients.iter_mut() {
        let extra = c
            .try_next_event_matching(Duration::from_millis(300), |e| e["type"] == "message")
            .await;
        assert!(extra.is_err(), "{}: a duplicate arrived: {extra:?}", c.name);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_and_exact_resume_work_from_any_node() {
    let redis = RedisServer::start();
    let (a, b, c) = (node(&redis), node(&redis), node(&redis));
    wait_ready(&[&a, &b, &c]).await;
    let (mut ada, _, h) = Client::join(&a, "ada", "hist").await;
    let epoch = h["epoch"].as_str().expect("epoch").to_string();
    for i in 1..=5 {
        ada.publish_and_wait(&format!("m{i}")).await;
    }
    // A joiner on another node gets the history kept in Redis.
    let (_bob, _, h) = Client::join(&b, "bob", "hist").await;
    assert_eq!(
        h["epoch"],
        epoch.as_str(),
        "one epoch for the room on every node"
    );
    let texts: Vec<&str> = h["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["text"].as_str().unwrap_or(""))
        .collect();
    assert_eq!(texts, ["m1", "m2", "m3", "m4", "m5"]);
    // A client that saw up to seq 3 resumes on a third node: exactly 4 and 5.
    let query = format!("{}&since=3&epoch={epoch}", c.chat_query("cy", "hist"));
    let mut cy = Client::connect_query(&c, &query).await.expect("upgrade");
    cy.next_event_of_type("system", EVENT_TIMEOUT).await;
    let h = cy.next_event_of_type("history", EVENT_TIMEOUT).await;
    assert_eq!(h["complete"], true, "{h}");
    let seqs: Vec<u64> = h["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["seq"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(seqs, [4, 5]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_id_retried_on_another_node_is_acked_as_a_duplicate() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis), node(&redis));
    wait_ready(&[&a, &b]).await;
    let (mut watcher, _, _) = Client::join(&b, "watcher", "dedupe").await;
    let (mut ada, system, _) = Client::join(&a, "ada", "dedupe").await;
    let session = system["session"].as_str().expect("session").to_string();
    ada.send_json(&json!({"type":"message","text":"once","requestId":"r1"}))
        .await;
    let ack = ada.next_event_of_type("ack", EVENT_TIMEOUT).await;
    assert!(ack.get("duplicate").is_none(), "{ack}");
    ada.close().await;
    // The same session retries on the other node.
    let query = format!("{}&session={session}", b.chat_query("ada", "dedupe"));
    let mut again = Client::connect_query(&b, &query).await.expect("upgrade");
    again
        .send_json(&json!({"type":"message","text":"once","requestId":"r1"}))
        .await;
    let dup = again.next_event_of_type("ack", EVENT_TIMEOUT).await;
    assert_eq!(dup["duplicate"], true, "{dup}");
    assert_eq!(dup["seq"], ack["seq"]);
    assert_eq!(dup["id"], ack["id"]);
    // Another text under the same requestId is a conflict, not an ack.
    again
        .send_json(&json!({"type":"message","text":"other","requestId":"r1"}))
        .await;
    let e = again.next_event_of_type("error", EVENT_TIMEOUT).await;
    assert_eq!(e["code"], "conflict");
    // The watcher saw the message exactly once.
    let first = watcher
        .next_event_matching(EVENT_TIMEOUT, |e| e["type"] == "message")
        .await;
    assert_eq!(first["message"]["text"], "once");
    let more = watcher
        .try_next_event_matching(Duration::from_millis(500), |e| e["type"] == "message")
        .await;
    assert!(more.is_err(), "broadcast twice: {more:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_seq_gap_on_the_channel_is_filled_from_history_before_delivering() {
    let redis = RedisServer::start();
    let a = node(&redis);
    wait_ready(&[&a]).await;
    let (mut ada, _, h) = Client::join(&a, "ada", "gap").await;
    let epoch = h["epoch"].as_str().expect("epoch").to_string();
    ada.publish_and_wait("one").await; // seq 1, through the relay
                                       // Two messages this node never heard on the channel (as if published while its
                                       // subscription was down): in Redis's history, and only the second is published.
    let entry = |seq: u64, text: &str| {
        let json = json!({"id": uuid_like(seq), "room": "gap", "from": "elsewhere",
            "text": text, "sentAt": "2026-12-01T00:00:00.000Z", "seq": seq});
        format!("{seq}\n{json}\n")
    };
    redis.command(&[
        "rpush",
        "rc:{gap}:history",
        &entry(2, "two"),
        &entry(3, "three"),
    ]);
    redis.command(&["set", "rc:{gap}:seq", "3"]);
    let three = entry(3, "three");
    let json3 = three.split('\n').nth(1).expect("json");
    redis.command(&[
        "publish",
        "rc:{gap}:channel",
        &format!("{epoch}\n3\n{json3}"),
    ]);
    let got = messages(&mut ada, 2).await;
    assert_eq!(
        got,
        [("two".to_string(), 2), ("three".to_string(), 3)],
        "the gap is filled from history, in order"
    );
    wait_for_metric(&a, "roomcast_remote_gaps_total", &[], EVENT_TIMEOUT, |v| {
        v >= 1.0
    })
    .await;
}

fn uuid_like(n: u64) -> String {
    format!("00000000-0000-4000-8000-{n:012}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_on_a_room_channel_is_dropped_and_counted() {
    let redis = RedisServer::start();
    let a = node(&redis);
    wait_ready(&[&a]).await;
    let (mut ada, _, h) = Client::join(&a, "ada", "junk").await;
    let epoch = h["epoch"].as_str().expect("epoch").to_string();
    for garbage in [
        "hello".to_string(),
        format!("{epoch}\nnot-a-seq\n{{}}"),
        format!("{epoch}\n1\nnot json"),
        format!("{epoch}\n1\n{{\"unterminated\":"),
        String::new(),
    ] {
        redis.command(&["publish", "rc:{junk}:channel", &garbage]);
    }
    wait_for_metric(
        &a,
        "roomcast_redis_foreign_messages_total",
        &[],
        EVENT_TIMEOUT,
        |v| v >= 5.0,
    )
    .await;
    // Nothing reached the client, and the room still works.
    let sent = ada.publish_and_wait("still here").await;
    assert_eq!(sent["seq"], 1, "{sent}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_restarting_underneath_gives_unavailable_then_a_new_epoch() {
    let mut redis = RedisServer::start();
    let (a, b) = (node(&redis), node(&redis));
    wait_ready(&[&a, &b]).await;
    let (mut ada, _, h) = Client::join(&a, "ada", "outage").await;
    let (mut bob, _, _) = Client::join(&b, "bob", "outage").await;
    let old_epoch = h["epoch"].as_str().expect("epoch").to_string();
    ada.publish_and_wait("before").await;
    messages(&mut bob, 1).await;

    redis.kill_hard();
    // Publishes are answered within REDIS_TIMEOUT_MS (1 s here) with unavailable, never acked.
    let mut unavailable = 0;
    for i in 0..3 {
        ada.send_json(
            &json!({"type":"message","text":format!("during {i}"),"requestId":format!("d{i}")}),
        )
        .await;
        let answer = ada
            .next_event_matching(Duration::from_secs(3), |e| {
                e["type"] == "error" || e["type"] == "ack"
            })
            .await;
        assert_eq!(
            answer["type"], "error",
            "no ack while Redis is down: {answer}"
        );
        assert_eq!(answer["code"], "unavailable");
        unavailable += 1;
    }
    assert_eq!(unavailable, 3);
    let r = http_get(&a, "/readyz", &[]).await;
    assert_eq!(r.status, 503, "readyz while the broker is down");

    redis.restart();
    wait_ready(&[&a, &b]).await;
    // Connected members learn that the room's history restarted (complete:false, new epoch).
    let notice = ada
        .next_event_of_type("history", Duration::from_secs(5))
        .await;
    assert_eq!(notice["complete"], false, "{notice}");
    assert_ne!(notice["epoch"], old_epoch.as_str());
    // Publishes flow across nodes again.
    let sent = ada.publish_and_wait("after").await;
    let got: Value = bob
        .next_event_matching(EVENT_TIMEOUT, |e| {
            e["type"] == "message" && e["message"]["text"] == "after"
        })
        .await;
    assert_eq!(got["message"]["seq"], sent["seq"]);
    // A client resuming with the old epoch is told it is incomplete.
    let query = format!("{}&since=1&epoch={old_epoch}", b.chat_query("cy", "outage"));
    let mut cy = Client::connect_query(&b, &query).await.expect("upgrade");
    let h = cy.next_event_of_type("history", EVENT_TIMEOUT).await;
    assert_eq!(h["complete"], false, "{h}");
    assert_ne!(h["epoch"], old_epoch.as_str());
    wait_for_metric(
        &a,
        "roomcast_redis_reconnects_total",
        &[],
        EVENT_TIMEOUT,
        |v| v >= 1.0,
    )
    .await;
    wait_for_metric(
        &a,
        "roomcast_publish_unavailable_total",
        &[],
        EVENT_TIMEOUT,
        |v| v >= 3.0,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_counts_members_on_every_node() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis), node(&redis));
    wait_ready(&[&a, &b]).await;
    let (mut ada, _, _) = Client::join(&a, "ada", "crowd").await;
    let own = ada.next_event_of_type("presence", EVENT_TIMEOUT).await;
    assert_eq!(own["online"], 1, "{own}");
    let (mut bob, _, _) = Client::join(&b, "bob", "crowd").await;
    // Both see bob's join with the room's count across the two nodes.
    for c in [&mut ada, &mut bob] {
        let p = c
            .next_event_matching(EVENT_TIMEOUT, |e| {
                e["type"] == "presence" && e["joined"] == json!(["bob"])
            })
            .await;
        assert_eq!(p["online"], 2, "{}: {p}", c.name);
    }
    bob.close().await;
    let p = ada
        .next_event_matching(EVENT_TIMEOUT, |e| {
            e["type"] == "presence" && e["left"] == json!(["bob"])
        })
        .await;
    assert_eq!(p["online"], 1, "{p}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publishes_past_the_redis_queue_bound_get_unavailable() {
    let redis = RedisServer::start();
    // Smaller than one queued publish: every publish finds the queue full.
    let a = Relay::builder()
        .env("REDIS_URL", redis.url())
        .env("REDIS_QUEUE_MAX_BYTES", 100)
        .start();
    wait_ready(&[&a]).await;
    let (mut ada, _, _) = Client::join(&a, "ada", "bounded").await;
    ada.send_json(&json!({"type":"message","text":"too much","requestId":"b1"}))
        .await;
    let e = ada
        .next_event_matching(EVENT_TIMEOUT, |e| {
            e["type"] == "error" || e["type"] == "ack"
        })
        .await;
    assert_eq!(e["code"], "unavailable", "{e}");
    wait_for_metric(
        &a,
        "roomcast_publish_unavailable_total",
        &[],
        EVENT_TIMEOUT,
        |v| v >= 1.0,
    )
    .await;
}

/// Both client dialects in one room across two nodes: a second-dialect chat on node A reaches a
/// first-dialect client on node B as a `message`, and the other way round, with one `seq`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_dialects_share_a_room_across_nodes() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis), node(&redis));
    wait_ready(&[&a, &b]).await;
    let (mut second, _) = Client::authed(&a, &a.token).await;
    second.join_room("mixed").await;
    let (mut first, _, _) = Client::join(&b, "ada", "mixed").await;

    second.chat("mixed", "from A, second dialect", "a-1").await;
    let echo = second.expect_type("chat").await;
    let got = first.next_message(WAIT).await;
    assert_eq!(got["text"], "from A, second dialect");
    assert_eq!(got["requestId"], "a-1");
    assert_eq!(got["seq"], echo["seq"]);

    first.publish("from B, first dialect").await;
    let chat = second.expect_type("chat").await;
    assert_eq!(chat["text"], "from B, first dialect");
    assert_eq!(chat["userId"], "ada");
    assert_eq!(chat["roomId"], "mixed");
    assert_eq!(chat["seq"], echo["seq"].as_u64().unwrap() + 1);

    // A second-dialect joiner on node B asking for history gets both, in order.
    let (mut late, _) = Client::authed(&b, &b.token).await;
    late.send_json(&json!({"type": "join", "roomId": "mixed", "history": true}))
        .await;
    late.expect_type("joined").await;
    let history = late.expect_type("history").await;
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["from A, second dialect", "from B, first dialect"]);
}

/// The server API with Redis: a publish on node A reaches node B's members, presence counts
/// every node, and a disconnect closes the user's connections on every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_server_api_works_across_nodes() {
    let redis = RedisServer::start();
    let api = |b: RelayBuilder| b.env("API_KEY", "k");
    let a = api(Relay::builder().env("REDIS_URL", redis.url())).start();
    let b = api(Relay::builder().env("REDIS_URL", redis.url())).start();
    wait_ready(&[&a, &b]).await;
    let (mut on_b, _, _) = Client::join(&b, "ada", "ops").await;
    let (mut also_on_b, _, _) = Client::join(&b, "bob", "ops").await;
    let post = |relay: &Relay, path: &str, body: Value| {
        let body = body.to_string();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer k\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        let addr = relay.addr;
        async move { http_exchange(addr, &req).await.expect("API call") }
    };
    let r = post(
        &a,
        "/api/publish",
        json!({"room": "ops", "text": "from the API on A"}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(on_b.next_message(WAIT).await["text"], "from the API on A");
    on_b.publish_and_wait("from ada on B").await;
    // History from Redis, on a node that follows nothing of the room.
    let h = http_get(
        &a,
        "/api/rooms/ops/history?since=1",
        &[("Authorization", "Bearer k")],
    )
    .await;
    assert_eq!(h.status, 200, "{}", h.body);
    let h = h.json();
    assert_eq!(h["complete"], true, "{h}");
    let texts: Vec<&str> = h["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["from ada on B"]);

    // Presence: node A has nobody in the room, yet counts node B's two members.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let p = http_get(
            &a,
            "/api/rooms/ops/presence",
            &[("Authorization", "Bearer k")],
        )
        .await;
        if p.json()["online"] == 2 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence never counted node B: {}",
            p.body
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }

    let r = post(&a, "/api/disconnect", json!({"name": "ada"})).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(on_b.expect_close(WAIT).await, Some(4000));
    also_on_b.publish_and_wait("bob stays").await;
}

/// Redis Cluster may promote a replica that never received the last acknowledged messages of a
/// room. Simulated on one Redis by rolling the room's seq and history back under two nodes that
/// delivered them: the next publish starts a new epoch rather than hand those seqs out again
/// (which the nodes would drop as already delivered — a silent hole), and the members are told
/// their history is incomplete.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_redis_lost_start_a_new_epoch_on_the_next_publish() {
    let redis = RedisServer::start();
    let (a, b) = (node(&redis), node(&redis));
    wait_ready(&[&a, &b]).await;
    let (mut ada, _, h) = Client::join(&a, "ada", "rollback").await;
    let (mut bob, _, _) = Client::join(&b, "bob", "rollback").await;
    let old_epoch = h["epoch"].as_str().expect("epoch").to_string();
    for i in 1..=3 {
        ada.publish_and_wait(&format!("m{i}")).await;
    }
    assert_eq!(messages(&mut bob, 3).await.len(), 3);
    // The promoted replica had m1 only.
    redis.command(&["set", "rc:{rollback}:seq", "1"]);
    redis.command(&["ltrim", "rc:{rollback}:history", "0", "0"]);
    bob.send_json(&json!({"type":"message","text":"after","requestId":"x1"}))
        .await;
    let ack = bob.next_event_of_type("ack", EVENT_TIMEOUT).await;
    assert_eq!(ack["seq"], 2, "{ack}");
    for c in [&mut ada, &mut bob] {
        let notice = c.next_event_of_type("history", EVENT_TIMEOUT).await;
        assert_eq!(notice["complete"], false, "{}: {notice}", c.name);
        assert_ne!(notice["epoch"], old_epoch.as_str(), "{}: {notice}", c.name);
        let held: Vec<&str> = notice["messages"]
            .as_array()
            .expect("messages")
            .iter()
            .filter_map(|m| m["text"].as_str())
            .collect();
        if !held.contains(&"after") {
            let m = c.next_message(EVENT_TIMEOUT).await;
            assert_eq!(m["text"], "after", "{}", c.name);
        }
    }
    // A client resuming in the old epoch is told it is incomplete.
    let query = format!(
        "{}&since=3&epoch={old_epoch}",
        a.chat_query("cy", "rollback")
    );
    let mut cy = Client::connect_query(&a, &query).await.expect("upgrade");
    let h = cy.next_event_of_type("history", EVENT_TIMEOUT).await;
    assert_eq!(h["complete"], false, "{h}");
}

/// The same loss seen when a node re-reads the room (after its subscription connection broke,
/// as after a failover): the read starts the new epoch, so members learn of it before anyone
/// publishes again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acked_messages_redis_lost_start_a_new_epoch_on_the_next_resync() {
    let redis = RedisServer::start();
    let a = node(&redis);
    wait_ready(&[&a]).await;
    let (mut ada, _, h) = Client::join(&a, "ada", "rollback2").await;
    let old_epoch = h["epoch"].as_str().expect("epoch").to_string();
    for i in 1..=3 {
        ada.publish_and_wait(&format!("m{i}")).await;
    }
    redis.command(&["set", "rc:{rollback2}:seq", "1"]);
    redis.command(&["ltrim", "rc:{rollback2}:history", "0", "0"]);
    // Break the node's subscription connection: it reconnects and re-reads every room.
    let killed = redis.command(&["client", "kill", "type", "pubsub"]);
    assert_eq!(killed, Resp::Integer(1), "one subscription connection");
    let notice = ada
        .next_event_of_type("history", Duration::from_secs(10))
        .await;
    assert_eq!(notice["complete"], false, "{notice}");
    assert_ne!(notice["epoch"], old_epoch.as_str(), "{notice}");
    // And the room goes on in the new epoch.
    let sent = ada.publish_and_wait("after").await;
    assert_eq!(sent["seq"], 2, "{sent}");
    let stored = redis.command(&["get", "rc:{rollback2}:epoch"]);
    assert_eq!(stored.as_text().as_deref(), notice["epoch"].as_str());
}

/// The presence refresh (every 10 s) keeps a node's counts from expiring, re-stating up to 100
/// rooms per script call. On a Redis of its own, so the calls counted are this node's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_restates_its_presence_in_batches_of_rooms() {
    let redis = RedisServer::start();
    let a = node(&redis);
    wait_ready(&[&a]).await;
    let rooms: Vec<String> = (0..150).map(|i| format!("restate-{i}")).collect();
    let mut members = Vec::new();
    for room in &rooms {
        members.push(Client::join(&a, "ada", room).await.0);
    }
    let expiries = |redis: &RedisServer| -> Vec<Vec<u64>> {
        rooms
            .iter()
            .map(|r| {
                presence_expiries(&redis.command(&["HGETALL", &format!("rc:{{{r}}}:presence")]))
            })
            .collect()
    };
    let calls = count_across_a_presence_refresh(
        || expiries(&redis),
        || script_calls(&redis.command(&["INFO", "commandstats"])),
        || a.logs(),
    )
    .await;
    assert!(
        calls <= 4,
        "re-stating 150 rooms took {calls} script calls (one per room would be 150)"
    );
    assert_eq!(metric(&a, "roomcast_redis_errors_total", &[]).await, 0.0);
    drop(members);
}
