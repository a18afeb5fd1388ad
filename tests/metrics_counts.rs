//! Drive a REAL relay through every event and check that every metric in the contract's table
//! (src/metrics.rs) moved by exactly the expected amount.
//!
//! Three relays, each with settings that make its events deterministic:
//! - the main one: connections, messages, each upgrade rejection (not_found, forbidden_origin,
//!   unauthorized, full), each error code (rate_limited, too_large, bad_json, bad_type, empty), and
//!   closes 1000 (client), 1003 (binary), 1009 (oversize), 1008 (abuse);
//! - a slow-consumer one (OUTBOX_MAX_BYTES=16384): a raw TCP client stops reading while its room
//!   is flooded and is closed with 1013;
//! - a heartbeat one (HEARTBEAT_MS=300): a raw client that never answers pings is dropped (1006)
//!   while a client that does answer stays.
//!
//! What "exactly" means, counter by counter (the contract's semantics, spelled out):
//! - `connections_opened_total`: upgrades completed (101). Rejected upgrades are not openings.
//! - `connections_closed_total{code}`: one per connection, under the code the relay closed with
//!   (1006 for a heartbeat drop); the sum over all codes equals the openings that ended.
//! - `upgrade_rejections_total{reason}`: one per upgrade request answered with an HTTP error.
//! - `messages_received_total`: text messages read in full from clients, valid or not (rate-limited
//!   and invalid ones included). Binary frames and frames refused from their header (too big) are
//!   not text messages received.
//! - `frames_delivered_total` / `bytes_sent_total`: data (text) frames queued to connections and
//!   their wire size (header + payload). Every such frame is observed by a test client, except
//!   those queued to the slow consumer before it was cut off, which the test computes. A frame
//!   refused because it would pass the outbox limit is not queued, so not counted. Control frames
//!   (ping, pong, close) are not events and are not counted.
//! - `rate_limited_total`, `invalid_messages_total{code}`: one per error event sent with that
//!   code; the message that trips the abuse limit is still a refused invalid message.
//! - `publish_recipients`: one observation per chat message broadcast, valued at the frames queued
//!   for it; so its `_sum` plus the non-broadcast frames equals `frames_delivered_total`.
//! - `socket_writes_total` and `publish_to_write_seconds` depend on how the kernel and scheduler
//!   batch writes, so they are checked against bounds: at least one write (with a latency sample)
//!   per connection that was sent anything, at most one write per frame plus control frames.
//! - Gauges (`connections`, `rooms`, `outbox_queued_bytes`, `max_connections`) are checked as
//!   values: 0 connections and 0 queued bytes once everyone has gone, rooms as joined (every room
//!   used here keeps history or is the only one), max as configured / as printed at start.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::*;

const CLOSE_CODES: [&str; 10] = [
    "1000", "1001", "1002", "1003", "1006", "1007", "1008", "1009", "1011", "1013",
];
const REASONS: [&str; 7] = [
    "not_found",
    "forbidden_origin",
    "unauthorized",
    "full",
    "bad_handshake",
    "shutting_down",
    "rooms_full",
];
const INVALID_CODES: [&str; 4] = ["too_large", "bad_json", "bad_type", "empty"];

/// The metrics of src/metrics.rs: name -> Prometheus type.
const TABLE: &[(&str, &str)] = &[
    ("roomcast_connections", "gauge"),
    ("roomcast_max_connections", "gauge"),
    ("roomcast_connections_opened_total", "counter"),
    ("roomcast_connections_closed_total", "counter"),
    ("roomcast_upgrade_rejections_total", "counter"),
    ("roomcast_messages_received_total", "counter"),
    ("roomcast_frames_delivered_total", "counter"),
    ("roomcast_bytes_sent_total", "counter"),
    ("roomcast_socket_writes_total", "counter"),
    ("roomcast_rate_limited_total", "counter"),
    ("roomcast_invalid_messages_total", "counter"),
    ("roomcast_heartbeat_terminations_total", "counter"),
    ("roomcast_slow_consumer_closes_total", "counter"),
    ("roomcast_rooms", "gauge"),
    ("roomcast_publish_recipients", "histogram"),
    ("roomcast_publish_to_write_seconds", "histogram"),
    ("roomcast_outbox_queued_bytes", "gauge"),
    ("process_resident_memory_bytes", "gauge"),
    ("process_virtual_memory_bytes", "gauge"),
    ("process_cpu_seconds_total", "counter"),
    ("process_open_fds", "gauge"),
    ("process_max_fds", "gauge"),
    ("process_start_time_seconds", "gauge"),
];

/// What one scenario expects.
#[derive(Debug, Default)]
struct Expected {
    opened: f64,
    closed: BTreeMap<&'static str, f64>,
    rejections: BTreeMap<&'static str, f64>,
    messages: f64,
    frames: f64,
    bytes: f64,
    rate_limited: f64,
    invalid: BTreeMap<&'static str, f64>,
    heartbeat: f64,
    slow: f64,
    /// Frames queued for each chat message broadcast, in order.
    publishes: Vec<u64>,
    /// Gauges at the end.
    connections: f64,
    max_connections: f64,
    rooms: f64,
    /// Bounds for socket writes and publish-to-write samples.
    min_writes: f64,
    max_writes: f64,
}

/// Compare `after - before` with `exp`; returns every mismatch (empty: all good).
fn mismatches(before: &Exposition, after: &Exposition, exp: &Expected) -> Vec<String> {
    let mut bad = Vec::new();
    let counter = |name: &str, labels: &[(&str, &str)], want: f64, bad: &mut Vec<String>| {
        let shown = if labels.is_empty() {
            name.to_string()
        } else {
            format!("{name}{{{}=\"{}\"}}", labels[0].0, labels[0].1)
        };
        match after.get(name, labels) {
            None => bad.push(format!(
                "{shown}: series missing (expected it to move by {want})"
            )),
            Some(v) => {
                let got = v - before.get0(name, labels);
                if got != want {
                    bad.push(format!("{shown}: expected +{want}, got +{got}"));
                }
            }
        }
    };
    counter(
        "roomcast_connections_opened_total",
        &[],
        exp.opened,
        &mut bad,
    );
    for code in CLOSE_CODES {
        counter(
            "roomcast_connections_closed_total",
            &[("code", code)],
            exp.closed.get(code).copied().unwrap_or(0.0),
            &mut bad,
        );
    }
    let closed_all = after.sum("roomcast_connections_closed_total")
        - before.sum("roomcast_connections_closed_total");
    let closed_want: f64 = exp.closed.values().sum();
    if closed_all != closed_want {
        let labels: Vec<String> = after
            .series("roomcast_connections_closed_total")
            .iter()
            .map(|s| format!("{:?}={}", s.labels, s.value))
            .collect();
        bad.push(format!("roomcast_connections_closed_total summed over all codes: expected +{closed_want}, got +{closed_all} ({labels:?})"));
    }
    for reason in REASONS {
        counter(
            "roomcast_upgrade_rejections_total",
            &[("reason", reason)],
            exp.rejections.get(reason).copied().unwrap_or(0.0),
            &mut bad,
        );
    }
    counter(
        "roomcast_messages_received_total",
        &[],
        exp.messages,
        &mut bad,
    );
    counter("roomcast_frames_delivered_total", &[], exp.frames, &mut bad);
    counter("roomcast_bytes_sent_total", &[], exp.bytes, &mut bad);
    counter(
        "roomcast_rate_limited_total",
        &[],
        exp.rate_limited,
        &mut bad,
    );
    for code in INVALID_CODES {
        counter(
            "roomcast_invalid_messages_total",
            &[("code", code)],
            exp.invalid.get(code).copied().unwrap_or(0.0),
            &mut bad,
        );
    }
    counter(
        "roomcast_heartbeat_terminations_total",
        &[],
        exp.heartbeat,
        &mut bad,
    );
    counter(
        "roomcast_slow_consumer_closes_total",
        &[],
        exp.slow,
        &mut bad,
    );

    // Gauges.
    let gauge = |name: &str, want: f64, bad: &mut Vec<String>| match after.get(name, &[]) {
        None => bad.push(format!("{name}: gauge missing (expected {want})")),
        Some(v) if v != want => bad.push(format!("{name}: expected {want}, got {v}")),
        Some(_) => {}
    };
    gauge("roomcast_connections", exp.connections, &mut bad);
    gauge("roomcast_max_connections", exp.max_connections, &mut bad);
    gauge("roomcast_rooms", exp.rooms, &mut bad);
    gauge("roomcast_outbox_queued_bytes", 0.0, &mut bad);

    // Recipients per publish: exact buckets, sum and count.
    let name = "roomcast_publish_recipients";
    let count =
        after.get0(&format!("{name}_count"), &[]) - before.get0(&format!("{name}_count"), &[]);
    let sum = after.get0(&format!("{name}_sum"), &[]) - before.get0(&format!("{name}_sum"), &[]);
    let want_count = exp.publishes.len() as f64;
    let want_sum: f64 = exp.publishes.iter().map(|&r| r as f64).sum();
    if after.get(&format!("{name}_count"), &[]).is_none() {
        bad.push(format!(
            "{name}_count: missing (histogram not exported as a Prometheus histogram?)"
        ));
    }
    if count != want_count {
        bad.push(format!(
            "{name}_count: expected +{want_count} (one per broadcast {:?}), got +{count}",
            exp.publishes
        ));
    }
    if sum != want_sum {
        bad.push(format!(
            "{name}_sum: expected +{want_sum} (recipients {:?}), got +{sum}",
            exp.publishes
        ));
    }
    let before_b: BTreeMap<String, f64> = before
        .series(&format!("{name}_bucket"))
        .iter()
        .map(|s| (s.labels["le"].clone(), s.value))
        .collect();
    let buckets = after.buckets(name);
    if buckets.is_empty() {
        bad.push(format!("{name}_bucket: no buckets exported"));
    }
    for s in after.series(&format!("{name}_bucket")) {
        let le_txt = &s.labels["le"];
        let le: f64 = if le_txt == "+Inf" {
            f64::INFINITY
        } else {
            le_txt.parse().unwrap_or(f64::NAN)
        };
        let got = s.value - before_b.get(le_txt).copied().unwrap_or(0.0);
        let want = exp.publishes.iter().filter(|&&r| (r as f64) <= le).count() as f64;
        if got != want {
            bad.push(format!(
                "{name}_bucket{{le=\"{le_txt}\"}}: expected +{want}, got +{got}"
            ));
        }
    }

    // Socket writes and publish-to-write latency: bounds.
    let writes = after.get0("roomcast_socket_writes_total", &[])
        - before.get0("roomcast_socket_writes_total", &[]);
    if after.get("roomcast_socket_writes_total", &[]).is_none() {
        bad.push("roomcast_socket_writes_total: missing".into());
    }
    if writes < exp.min_writes || writes > exp.max_writes {
        bad.push(format!(
            "roomcast_socket_writes_total: expected between +{} and +{}, got +{writes}",
            exp.min_writes, exp.max_writes
        ));
    }
    let lat = "roomcast_publish_to_write_seconds";
    let lat_count =
        after.get0(&format!("{lat}_count"), &[]) - before.get0(&format!("{lat}_count"), &[]);
    let lat_sum = after.get0(&format!("{lat}_sum"), &[]) - before.get0(&format!("{lat}_sum"), &[]);
    if after.get(&format!("{lat}_count"), &[]).is_none() {
        bad.push(format!(
            "{lat}_count: missing (histogram not exported as a Prometheus histogram?)"
        ));
    }
    if lat_count < exp.min_writes || lat_count > writes {
        bad.push(format!("{lat}_count: expected between +{} (a write per served connection) and +{writes} (socket writes), got +{lat_count}", exp.min_writes));
    }
    if !(lat_sum >= 0.0 && lat_sum < lat_count.max(1.0) * 5.0) {
        bad.push(format!(
            "{lat}_sum: +{lat_sum}s for {lat_count} samples is not plausible on loopback"
        ));
    }
    let lb = after.buckets(lat);
    if lb.last().map(|b| b.0) != Some(f64::INFINITY)
        || lb.last().map(|b| b.1) != after.get(&format!("{lat}_count"), &[])
    {
        bad.push(format!(
            "{lat}_bucket: the +Inf bucket must equal _count ({lb:?})"
        ));
    }
    if lb.windows(2).any(|w| w[1].1 < w[0].1) {
        bad.push(format!("{lat}_bucket: buckets are not cumulative ({lb:?})"));
    }
    bad
}

fn assert_counts(relay: &Relay, before: &Exposition, after: &Exposition, exp: &Expected) {
    let bad = mismatches(before, after, exp);
    assert!(
        bad.is_empty(),
        "{} metric(s) did not move as expected:\n  {}\n--- expected ---\n{exp:#?}\n--- /metrics (roomcast_*) ---\n{}\n--- relay stderr (tail) ---\n{}",
        bad.len(),
        bad.join("\n  "),
        after.render_roomcast(),
        tail(&relay.logs(), 4000)
    );
}

/// `N` from `roomcast listening on http://ADDR (max connections N, open-file limit M)`.
fn printed_max_connections(relay: &Relay) -> f64 {
    relay.max_connections as f64
}

async fn expect_status(relay: &Relay, path_and_query: &str, origin: Option<&str>, status: u16) {
    match Client::connect_to(relay, path_and_query, origin, &[]).await {
        Err(ConnectError::Status(s)) if s == status => {}
        Err(e) => panic!(
            "upgrade {path_and_query} (Origin {origin:?}): expected HTTP {status}, got {e:?}"
        ),
        Ok(_) => {
            panic!("upgrade {path_and_query} (Origin {origin:?}): expected HTTP {status}, got 101")
        }
    }
}

fn sum_frames(clients: &[&Client]) -> (f64, f64) {
    (
        clients.iter().map(|c| c.frames as f64).sum(),
        clients.iter().map(|c| c.bytes as f64).sum(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_messages_rejections_errors_and_closes_are_counted_exactly() {
    const ABUSE_LIMIT: usize = 3;
    let relay = Relay::start(&[
        ("RATE_LIMIT", "6"),
        ("RATE_WINDOW_MS", "600000"),
        ("ABUSE_LIMIT", "3"),
        ("ABUSE_WINDOW_MS", "600000"),
        ("MAX_CONNECTIONS", "3"),
        ("MAX_TEXT_CHARS", "500"),
        ("MAX_PAYLOAD_BYTES", "2048"),
        ("PRESENCE_INTERVAL_MS", "30"),
        ("HEARTBEAT_MS", "600000"),
    ]);
    let before = relay.scrape().await;
    for (name, kind) in TABLE {
        assert_eq!(
            before.types.get(*name).map(String::as_str),
            Some(*kind),
            "# TYPE of {name} (exported before any traffic)"
        );
        assert!(
            before
                .helps
                .get(*name)
                .is_some_and(|h| !h.trim().is_empty()),
            "{name} has no # HELP text"
        );
    }
    let mut publishes = Vec::new();

    // Rejections, each once, while there is room (path, Origin, token are checked before capacity).
    let q = format!("token={TOKEN}&name=mallory&room=main");
    expect_status(&relay, &format!("/nope?{q}"), Some(&relay.origin()), 404).await;
    expect_status(&relay, &format!("/chat?{q}"), Some("http://evil.test"), 403).await;
    expect_status(
        &relay,
        "/chat?token=wrong-token&name=mallory&room=main",
        Some(&relay.origin()),
        401,
    )
    .await;

    // alice and bob in "main"; three messages reach both.
    let (mut alice, _) = Client::join_and_greet(&relay, "alice", "main").await;
    let (mut bob, _) = Client::join_and_greet(&relay, "bob", "main").await;
    alice.expect_presence("bob joined", 2).await;
    for i in 1..=3 {
        let t = format!("hello {i}");
        alice.publish(&t).await;
        alice.expect_message(&t).await;
        bob.expect_message(&t).await;
        publishes.push(2);
    }
    // carol makes three: the relay is full, a fourth upgrade gets 503.
    let (mut carol, history) = Client::join_and_greet(&relay, "carol", "main").await;
    assert_eq!(
        history["messages"].as_array().map(Vec::len),
        Some(3),
        "carol's history: {history}"
    );
    alice.expect_presence("carol joined", 3).await;
    bob.expect_presence("carol joined", 3).await;
    relay.wait_connections(3.0).await;
    expect_status(
        &relay,
        &format!("/chat?token={TOKEN}&name=dan&room=main"),
        Some(&relay.origin()),
        503,
    )
    .await;
    for i in 4..=6 {
        let t = format!("hello {i}");
        alice.publish(&t).await;
        for c in [&mut alice, &mut bob, &mut carol] {
            c.expect_message(&t).await;
        }
        publishes.push(3);
    }
    // alice has used her 6 messages: two more are rate limited (and reach nobody else).
    for _ in 0..2 {
        alice.publish("too fast").await;
        alice.expect_error("rate_limited").await;
    }
    // The invalid codes, spread so nobody passes ABUSE_LIMIT=3 error events or RATE_LIMIT=6
    // messages (whether refused messages use up the rate budget is not part of the contract).
    bob.publish(&"a".repeat(501)).await;
    bob.expect_error("too_large").await;
    bob.send_text("{not json").await;
    bob.expect_error("bad_json").await;
    bob.send_text("[1,2]").await;
    bob.expect_error("bad_type").await;
    carol.send_text(r#"{"type":"nope","text":"x"}"#).await;
    carol.expect_error("bad_type").await;
    carol.send_text(r#"{"type":"message","text":"   "}"#).await;
    carol.expect_error("empty").await;
    alice.expect_silence(Duration::from_millis(100)).await;
    bob.expect_silence(Duration::from_millis(10)).await;

    // 1000: bob leaves normally.
    bob.close_normally().await;
    alice.expect_presence("bob left", 2).await;
    carol.expect_presence("bob left", 2).await;
    relay.wait_connections(2.0).await;

    // 1003: dave, alone in his room, sends a binary frame.
    let (mut dave, _) = Client::join_and_greet(&relay, "dave", "r1003").await;
    dave.publish("dave here").await;
    dave.expect_message("dave here").await;
    publishes.push(1);
    dave.send_binary(&[1, 2, 3]).await;
    let (code, texts) = dave.expect_end().await;
    assert!(texts.is_empty(), "dave got {texts:?} before the close");
    assert!(
        matches!(code, Some(1003) | None),
        "binary frame: close code {code:?}, want 1003"
    );
    relay.wait_connections(2.0).await;

    // 1009: erin sends a text frame over MAX_PAYLOAD_BYTES.
    let (mut erin, _) = Client::join_and_greet(&relay, "erin", "r1009").await;
    erin.publish("erin here").await;
    erin.expect_message("erin here").await;
    publishes.push(1);
    erin.send_text(&format!(
        "{{\"type\":\"message\",\"text\":\"{}\"}}",
        "x".repeat(3000)
    ))
    .await;
    let (code, texts) = erin.expect_end().await;
    assert!(texts.is_empty(), "erin got {texts:?} before the close");
    assert!(
        matches!(code, Some(1009) | None),
        "oversize frame: close code {code:?}, want 1009"
    );
    relay.wait_connections(2.0).await;

    // 1008: frank sends invalid messages; more than ABUSE_LIMIT error events end the connection.
    let (mut frank, _) = Client::join_and_greet(&relay, "frank", "r1008").await;
    frank.publish("frank here").await;
    frank.expect_message("frank here").await;
    publishes.push(1);
    for i in 1..=ABUSE_LIMIT {
        frank.send_text("{bad").await;
        match frank.try_next_event(WAIT).await {
            Ok(v) if v["type"] == "error" && v["code"] == "bad_json" => {}
            other => panic!("frank: error event {i} of ABUSE_LIMIT={ABUSE_LIMIT} should only be answered with bad_json (the contract closes after MORE than the limit), got {other:?}"),
        }
    }
    frank.send_text("{bad").await;
    let (code, texts) = frank.expect_end().await;
    assert!(
        texts.len() <= 1 && texts.iter().all(|v| v["code"] == "bad_json"),
        "frank got {texts:?} before the close"
    );
    assert!(
        matches!(code, Some(1008) | None),
        "abuse: close code {code:?}, want 1008"
    );
    relay.wait_connections(2.0).await;

    // alice then carol leave normally.
    alice.close_normally().await;
    carol.expect_presence("alice left", 1).await;
    carol.close_normally().await;
    relay.wait_connections(0.0).await;
    let after = relay
        .wait_metrics("outbox drained", WAIT, |e| {
            e.get("roomcast_outbox_queued_bytes", &[]) == Some(0.0)
        })
        .await;

    // What the clients saw, frame by frame (a check on the script itself).
    let seen = [
        ("alice", alice.frames, 14),
        ("bob", bob.frames, 13),
        ("carol", carol.frames, 10),
        ("dave", dave.frames, 4),
        ("erin", erin.frames, 4),
    ];
    for (who, got, want) in seen {
        assert_eq!(
            got, want,
            "{who} received {got} text frames, the script expects {want}"
        );
    }
    let frank_want = 3 + 1 + ABUSE_LIMIT as u64;
    assert!(
        frank.frames == frank_want || frank.frames == frank_want + 1,
        "frank received {} text frames",
        frank.frames
    );

    let all = [&alice, &bob, &carol, &dave, &erin, &frank];
    let (frames, bytes) = sum_frames(&all);
    let exp = Expected {
        opened: 6.0,
        closed: [("1000", 3.0), ("1003", 1.0), ("1009", 1.0), ("1008", 1.0)].into(),
        rejections: [
            ("not_found", 1.0),
            ("forbidden_origin", 1.0),
            ("unauthorized", 1.0),
            ("full", 1.0),
        ]
        .into(),
        // alice 6 + 2 rate limited, bob 3 invalid, carol 2 invalid, dave 1, erin 1 (the oversize
        // frame is refused from its header, not received), frank 1 + ABUSE_LIMIT + 1 invalid.
        messages: (8 + 3 + 2 + 1 + 1 + 1 + ABUSE_LIMIT + 1) as f64,
        frames,
        bytes,
        rate_limited: 2.0,
        invalid: [
            ("too_large", 1.0),
            // frank's last invalid message trips the abuse limit: it is answered (and counted)
            // as a 1008 close, not as a bad_json error event.
            ("bad_json", 1.0 + ABUSE_LIMIT as f64),
            ("bad_type", 2.0),
            ("empty", 1.0),
        ]
        .into(),
        heartbeat: 0.0,
        slow: 0.0,
        publishes,
        connections: 0.0,
        max_connections: 3.0,
        rooms: 4.0,
        min_writes: 6.0,
        max_writes: frames + 6.0,
    };
    assert_eq!(
        printed_max_connections(&relay),
        3.0,
        "startup line: {}",
        relay.startup_line
    );
    assert_counts(&relay, &before, &after, &exp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_close_is_counted_and_frames_queued_to_it_are_exact() {
    let relay = Relay::start(&[
        ("OUTBOX_MAX_BYTES", "16384"),
        ("RATE_LIMIT", "1000000"),
        ("RATE_WINDOW_MS", "1000"),
        ("ABUSE_LIMIT", "1000000"),
        ("PRESENCE_INTERVAL_MS", "30"),
        ("HEARTBEAT_MS", "600000"),
        ("CLOSE_TIMEOUT_MS", "300"),
    ]);
    let before = relay.scrape().await;

    let (mut flooder, _) = Client::join_and_greet(&relay, "flooder", "flood").await;
    // The slow consumer: a tiny receive buffer, reads its greeting, then stops reading.
    let mut slow = RawClient::connect_buffered(&relay, "slow", "flood", Some(2048)).await;
    slow.expect_type("system").await;
    slow.expect_type("history").await;
    let p = slow.expect_type("presence").await;
    assert!(
        p["message"].as_str().unwrap_or("").contains("slow joined"),
        "slow's presence: {p}"
    );
    let (slow_greet_frames, slow_greet_bytes) = (slow.frames, slow.bytes);
    flooder.expect_presence("slow joined", 2).await;
    relay.wait_connections(2.0).await;

    // Flood: one message at a time; after each echo, look at the counter.
    let text = "x".repeat(480);
    let mut sizes: Vec<u64> = Vec::new();
    let mut left_seen = 0;
    let started = Instant::now();
    loop {
        flooder.publish(&text).await;
        loop {
            let bytes_before = flooder.bytes;
            match flooder.try_next_event(WAIT).await {
                Ok(v) if v["type"] == "message" => {
                    assert_eq!(v["message"]["text"], text.as_str());
                    assert_eq!(
                        v["message"]["seq"],
                        sizes.len() as u64 + 1,
                        "echo out of order: {v}"
                    );
                    sizes.push(flooder.bytes - bytes_before);
                    break;
                }
                Ok(v)
                    if v["type"] == "presence"
                        && v["message"].as_str().unwrap_or("").contains("slow left") =>
                {
                    left_seen += 1
                }
                other => panic!("flooder: expected its echo, got {other:?}"),
            }
        }
        let e = relay.scrape().await;
        if e.get0("roomcast_slow_consumer_closes_total", &[]) >= 1.0 {
            break;
        }
        assert!(
            sizes.len() < 20_000 && started.elapsed() < Duration::from_secs(90),
            "the reader that stopped reading was never closed as a slow consumer after {} messages (~{} bytes each, OUTBOX_MAX_BYTES=16384)\n{}",
            sizes.len(),
            sizes.last().copied().unwrap_or(0),
            e.render_roomcast()
        );
    }
    // The K-th publish overflowed the slow outbox: K-1 frames were queued to it before that.
    let k = sizes.len();
    if left_seen == 0 {
        flooder.expect_presence("slow left", 1).await;
    }
    relay.wait_connections(1.0).await;

    // What reached the slow reader before the cut-off is a prefix of the flood; if a close frame
    // made it through, it says 1013.
    let mut slow_messages = 0u64;
    loop {
        match slow.read_frame(WAIT).await {
            Ok(f) if f.opcode == OP_TEXT => {
                let v = f.json();
                assert_eq!(v["type"], "message", "slow consumer got {v}");
                slow_messages += 1;
                assert_eq!(
                    v["message"]["seq"], slow_messages,
                    "slow consumer's frames are not a prefix of the flood"
                );
            }
            Ok(f) if f.opcode == OP_CLOSE => {
                assert_eq!(f.close_code(), Some(1013), "slow consumer's close code")
            }
            Ok(_) => {}
            Err(RawEnd::Eof) | Err(RawEnd::Error(_)) => break,
            Err(RawEnd::Timeout) => {
                panic!("slow consumer's socket was neither closed nor reset within {WAIT:?}")
            }
        }
    }
    assert!(
        slow_messages < k as u64,
        "slow consumer received {slow_messages} of {k} messages, yet was closed as slow"
    );

    flooder.close_normally().await;
    relay.wait_connections(0.0).await;
    let after = relay
        .wait_metrics("outbox drained", WAIT, |e| {
            e.get("roomcast_outbox_queued_bytes", &[]) == Some(0.0)
        })
        .await;

    let queued_to_slow_frames = slow_greet_frames as f64 + (k - 1) as f64;
    let queued_to_slow_bytes = slow_greet_bytes as f64 + sizes[..k - 1].iter().sum::<u64>() as f64;
    let mut publishes = vec![2u64; k - 1];
    publishes.push(1);
    let frames = flooder.frames as f64 + queued_to_slow_frames;
    let exp = Expected {
        opened: 2.0,
        closed: [("1013", 1.0), ("1000", 1.0)].into(),
        messages: k as f64,
        frames,
        bytes: flooder.bytes as f64 + queued_to_slow_bytes,
        slow: 1.0,
        publishes,
        connections: 0.0,
        max_connections: printed_max_connections(&relay),
        rooms: 1.0,
        min_writes: 2.0,
        // Partial writes to the stalled socket may take more than one write per frame.
        max_writes: 2.0 * frames + 10.0,
        ..Default::default()
    };
    assert_counts(&relay, &before, &after, &exp);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heartbeat_termination_is_counted_and_a_live_client_is_not_terminated() {
    let relay = Relay::start(&[("HEARTBEAT_MS", "300"), ("PRESENCE_INTERVAL_MS", "30")]);
    let before = relay.scrape().await;

    // ghost never answers pings (nor sends anything); alive is read continuously, so tungstenite
    // answers every ping with a pong.
    let mut ghost = RawClient::connect(&relay, "ghost", "hb").await;
    ghost.expect_type("system").await;
    ghost.expect_type("history").await;
    ghost.expect_type("presence").await;
    let (mut alive, _) = Client::join_and_greet(&relay, "alive", "hb-alive").await;

    let ghost_end = async {
        let started = Instant::now();
        loop {
            match ghost.read_frame(Duration::from_secs(5)).await {
                Ok(f) if f.opcode == OP_PING => {}
                Ok(f) if f.opcode == OP_CLOSE => {
                    let code = f.close_code();
                    panic!("heartbeat termination should drop the TCP connection without a close frame (client sees 1006), got close {code:?}")
                }
                Ok(other) => panic!("ghost: unexpected {other:?}"),
                Err(RawEnd::Eof) | Err(RawEnd::Error(_)) => return started.elapsed(),
                Err(RawEnd::Timeout) => panic!("a client silent for many HEARTBEAT_MS=300 intervals was not terminated within 5 s"),
            }
        }
    };
    let alive_quiet = async {
        match alive.try_next_event(Duration::from_millis(2000)).await {
            Err(WsEnd::Timeout) => {}
            other => panic!("alive: expected only pings for 2 s, got {other:?}"),
        }
    };
    let (took, ()) = tokio::join!(ghost_end, alive_quiet);
    assert!(
        ghost.pings >= 1,
        "the silent client was terminated without being pinged first (after {took:?})"
    );
    assert!(
        alive.pings_seen >= 2,
        "alive got {} pings in 2 s with HEARTBEAT_MS=300",
        alive.pings_seen
    );
    relay.wait_connections(1.0).await;
    alive.close_normally().await;
    relay.wait_connections(0.0).await;
    let after = relay
        .wait_metrics("outbox drained", WAIT, |e| {
            e.get("roomcast_outbox_queued_bytes", &[]) == Some(0.0)
        })
        .await;

    let (frames, bytes) = (
        ghost.frames as f64 + alive.frames as f64,
        ghost.bytes as f64 + alive.bytes as f64,
    );
    assert_eq!(
        frames, 6.0,
        "each client should have had exactly system, history and its presence"
    );
    let exp = Expected {
        opened: 2.0,
        closed: [("1006", 1.0), ("1000", 1.0)].into(),
        frames,
        bytes,
        heartbeat: 1.0,
        connections: 0.0,
        max_connections: printed_max_connections(&relay),
        rooms: 2.0,
        min_writes: 2.0,
        max_writes: frames + (ghost.pings + alive.pings_seen as u64) as f64 + 2.0,
        ..Default::default()
    };
    assert_counts(&relay, &before, &after, &exp);
}
