//! Micro-benchmarks of the hot paths (criterion). Run: `cargo bench --bench relay`.
//!
//! - `fanout/{1000,10000}`: one publish through the in-memory broker: encode once, remember,
//!   push the same `Bytes` into every member's outbox (outboxes drained between iterations).
//! - `fanout_encode_per_recipient/1000`: the same delivery if each recipient got its own
//!   serialisation — the cost encode-once avoids.
//! - `room_lock/publish_10000`: one publish into a room of 10,000 members, timed alone (the
//!   outboxes are drained between iterations, outside the timing).
//! - `room_lock/wait_while_publishing_10000`: taking and releasing that room's lock while another
//!   thread publishes into it non-stop (and drains the outboxes): the wait every join, leave and
//!   concurrent publisher into a busy room pays, for an attempt at a random moment.
//! - `inbound/message`: a masked client frame → header → unmask → UTF-8 → JSON validation.
//! - `rate_window/over`: one rate-limit check.
//! - `history/remember+resume`: append to a full 50-entry history and find a `since` position.
//! - `presence/join_storm_1000`: 1,000 joins into one room with coalesced presence.
//! - `metrics/*`: counting a 10,000-recipient fan-out once per publish vs once per recipient,
//!   against the real Prometheus recorder.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};

use roomcast::broker::MemoryBroker;
use roomcast::frame;
use roomcast::hub::{HistoryEntry, Hub, HubSettings, Resume, Sender};
use roomcast::metrics::Metrics;
use roomcast::outbox::Outbox;
use roomcast::protocol::{self, ClientMessage};
use roomcast::rate::Window;

fn hub(metrics: Metrics) -> Arc<Hub> {
    Arc::new(Hub::new(
        HubSettings {
            history_limit: 50,
            history_max_bytes: usize::MAX,
            max_rooms: 1000,
            outbox_max_bytes: 1 << 30,
            presence_interval: Duration::from_millis(150),
            // The benchmarks time one delivery at a time: no flush window.
            flush_delay: Duration::ZERO,
            flush_min_members: usize::MAX,
        },
        metrics,
    ))
}

fn ada() -> Arc<Sender> {
    Arc::new(Sender {
        name: "ada".into(),
        session: 2,
    })
}

fn room_with_members(
    rt: &tokio::runtime::Runtime,
    hub: &Arc<Hub>,
    room: &str,
    n: usize,
) -> Vec<Arc<Outbox>> {
    let _guard = rt.enter();
    let sender = Arc::new(Sender {
        name: "member".into(),
        session: 1,
    });
    (0..n)
        .map(|_| {
            let outbox = Arc::new(Outbox::default());
            let reservation = hub.reserve(room).expect("room");
            // Forgotten: a dropped membership leaves the room.
            std::mem::forget(hub.join(
                reservation,
                &outbox,
                sender.clone(),
                None,
                roomcast::hub::Greeting::Query,
            ));
            outbox.take();
            outbox
        })
        .collect()
}

fn drain(outboxes: &[Arc<Outbox>]) {
    for o in outboxes {
        let b = o.take();
        o.written(b.frames.iter().map(|f| f.len()).sum(), b.frames.len());
    }
}

fn fanout(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let metrics = Metrics::new();
    let mut group = c.benchmark_group("fanout");
    for n in [1_000usize, 10_000] {
        let hub = hub(metrics.clone());
        let outboxes = room_with_members(&rt, &hub, "bench", n);
        let room = hub.room("bench").unwrap();
        let broker = MemoryBroker::new(hub.clone());
        let from = ada();
        let msg = ClientMessage {
            text: "deploy 4312 finished in 41 s".into(),
            request_id: None,
        };
        group.bench_with_input(BenchmarkId::from_parameter(n), &n, |b, _| {
            b.iter(|| {
                black_box(broker.publish_now(&room, &from, &msg).unwrap());
                drain(&outboxes);
            })
        });
    }
    group.finish();

    // The alternative encode-once avoids: one serialisation per recipient.
    let outboxes: Vec<Arc<Outbox>> = (0..1_000).map(|_| Arc::new(Outbox::default())).collect();
    let id = uuid::Uuid::new_v4();
    c.bench_function("fanout_encode_per_recipient/1000", |b| {
        b.iter(|| {
            for o in &outboxes {
                let frame = protocol::message_event(&protocol::MessageFields {
                    id: &id,
                    room: "bench",
                    from: "ada",
                    text: "deploy 4312 finished in 41 s",
                    sent_at: "2026-11-22T07:20:57.123Z",
                    request_id: None,
                    seq: 1,
                })
                .frame;
                o.push(&frame, usize::MAX);
            }
            drain(&outboxes);
        })
    });
}

fn room_lock(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let hub = hub(Metrics::new());
    let outboxes = Arc::new(room_with_members(&rt, &hub, "busy", 10_000));
    let room = hub.room("busy").unwrap();
    let broker = Arc::new(MemoryBroker::new(hub.clone()));
    let from = ada();
    let mut group = c.benchmark_group("room_lock");
    group.bench_function("publish_10000", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let msg = ClientMessage {
                    text: "deploy 4312 finished in 41 s".into(),
                    request_id: None,
                };
                let start = std::time::Instant::now();
                black_box(broker.publish_now(&room, &from, &msg).unwrap());
                total += start.elapsed();
                drain(&outboxes);
            }
            total
        })
    });
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (stop, broker, room, from, outboxes) = (
            stop.clone(),
            broker.clone(),
            room.clone(),
            from.clone(),
            outboxes.clone(),
        );
        std::thread::spawn(move || {
            let msg = ClientMessage {
                text: "deploy 4312 finished in 41 s".into(),
                request_id: None,
            };
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                black_box(broker.publish_now(&room, &from, &msg).unwrap());
                drain(&outboxes);
            }
        })
    };
    // Each lock is taken after a pseudo-random pause of 0–2 ms without it, so the attempts land
    // anywhere in the publisher's cycle: the mean is then (share of time the lock is held) ×
    // (mean rest of a hold). A tight lock/unlock loop would instead starve the publisher (std's
    // Mutex is not fair) or sample each hold only once.
    group.bench_function("wait_while_publishing_10000", |b| {
        let mut rng = 0x9E37_79B9_7F4A_7C15u64;
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let pause = Duration::from_nanos(rng % 2_000_000);
                let paused = std::time::Instant::now();
                while paused.elapsed() < pause {
                    std::hint::spin_loop();
                }
                let start = std::time::Instant::now();
                drop(black_box(room.lock()));
                total += start.elapsed();
            }
            total
        })
    });
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    publisher.join().unwrap();
    group.finish();
}

fn masked_text_frame(payload: &[u8]) -> Vec<u8> {
    let mask = [0x11, 0x22, 0x33, 0x44];
    let mut out = vec![0x81, 0x80 | payload.len() as u8];
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

fn inbound(c: &mut Criterion) {
    let wire =
        masked_text_frame(br#"{"type":"message","text":"is the build green?","requestId":"r-17"}"#);
    c.bench_function("inbound/message", |b| {
        b.iter(|| {
            let mut buf = wire.clone();
            let h = frame::parse_header(&buf, 2048).unwrap().unwrap();
            let payload = &mut buf[h.header_len..h.header_len + h.payload_len];
            fastwebsockets::unmask(payload, h.mask);
            let text = std::str::from_utf8(payload).unwrap();
            black_box(protocol::parse_client_message(text, 500).is_ok())
        })
    });
}

fn rate_window(c: &mut Criterion) {
    let mut w = Window::new(0);
    let mut now = 0u32;
    c.bench_function("rate_window/over", |b| {
        b.iter(|| {
            now = now.wrapping_add(7);
            black_box(w.over(now, 10_000, 20))
        })
    });
}

fn history(c: &mut Criterion) {
    let hub = hub(Metrics::new());
    let room = hub.room("h").unwrap();
    let json =
        Bytes::from_static(br#"{"id":"x","room":"h","from":"a","text":"t","sentAt":"s","seq":1}"#);
    c.bench_function("history/remember+resume", |b| {
        b.iter(|| {
            let mut st = room.lock();
            let seq = st.take_seq();
            let entry =
                HistoryEntry::new(seq, uuid::Uuid::nil(), 1, None, json.clone(), json.len());
            hub.remember(&room, &mut st, entry);
            let epoch = Some(st.epoch().to_string());
            black_box(st.history_for(Some(&Resume {
                since: seq.saturating_sub(10),
                epoch,
            })))
        })
    });
}

fn presence(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    c.bench_function("presence/join_storm_1000", |b| {
        b.iter(|| {
            let hub = hub(Metrics::new());
            let outboxes = room_with_members(&rt, &hub, "storm", 1_000);
            // Frames queued to the first member: greeting, history, and O(1) presence events.
            black_box(outboxes[0].take().frames.len())
        })
    });
}

fn metrics_cost(c: &mut Criterion) {
    let _ = roomcast::metrics::install_recorder();
    let metrics = Metrics::new();
    let mut group = c.benchmark_group("metrics");
    group.bench_function("count_fanout_10000_once_per_publish", |b| {
        b.iter(|| metrics.frames_delivered.increment(black_box(10_000)))
    });
    group.bench_function("count_fanout_10000_once_per_recipient", |b| {
        b.iter(|| {
            for _ in 0..10_000 {
                metrics.frames_delivered.increment(black_box(1));
            }
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = metrics_cost, fanout, room_lock, inbound, rate_window, history, presence
}
criterion_main!(benches);
