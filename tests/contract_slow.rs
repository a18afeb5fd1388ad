//! Contract (relay addition): slow consumers. Each connection has a bounded outbound queue in bytes;
//! when a write would push it past OUTBOX_MAX_BYTES the connection is closed with 1013 and counted.
//! Other members of the room must not notice.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

const BATCH: u64 = 10;
const MAX_MESSAGES: u64 = 20_000;

/// Wait until `counter` reaches `target`, bounded.
async fn wait_count(counter: &AtomicU64, target: u64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while counter.load(Ordering::SeqCst) < target {
        assert!(
            Instant::now() < deadline,
            "{what} received {} of {target} messages within 10 s",
            counter.load(Ordering::SeqCst)
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_consumer_is_closed_with_1013_while_the_room_keeps_flowing() {
    let relay = Relay::start(&[
        ("OUTBOX_MAX_BYTES", "16384"),
        ("RATE_LIMIT", "1000000"),
        ("RATE_WINDOW_MS", "1000"),
        ("ABUSE_LIMIT", "1000000"),
    ]);

    // The slow member: a tiny kernel receive buffer, and it never reads.
    let mut slow =
        RawClient::connect_with(&relay, &relay.chat_query("slow", "flood"), Some(4096)).await;

    // The healthy member reads everything and keeps it.
    let mut healthy = Client::join_and_settle(&relay, "healthy", "flood").await;
    let healthy_count = Arc::new(AtomicU64::new(0));
    let healthy_task = {
        let count = Arc::clone(&healthy_count);
        tokio::spawn(async move {
            let mut got: Vec<Value> = Vec::new();
            loop {
                let m = healthy.next_message(Duration::from_secs(15)).await;
                let done = m["text"] == "END";
                got.push(m);
                count.fetch_add(1, Ordering::SeqCst);
                if done {
                    return got;
                }
            }
        })
    };

    // The flooder publishes and drains its own copies on a separate task.
    let flooder = Client::join_and_settle(&relay, "flooder", "flood").await;
    let (mut sink, mut stream) = flooder.ws.split();
    let flooder_count = Arc::new(AtomicU64::new(0));
    let flooder_task = {
        let count = Arc::clone(&flooder_count);
        tokio::spawn(async move {
            while let Some(frame) = stream.next().await {
                match frame {
                    Ok(Message::Text(t)) => {
                        let v: Value = serde_json::from_str(t.as_str()).expect("JSON event");
                        if v["type"] == "message" {
                            count.fetch_add(1, Ordering::SeqCst);
                            if v["message"]["text"] == "END" {
                                return Ok(());
                            }
                        } else if v["type"] == "error" {
                            return Err(format!("flooder got an error event: {v}"));
                        }
                    }
                    Ok(Message::Close(f)) => return Err(format!("flooder was closed: {f:?}")),
                    Ok(_) => {}
                    Err(e) => return Err(format!("flooder read failed: {e}")),
                }
            }
            Err("flooder stream ended".to_string())
        })
    };

    let filler = "x".repeat(400);
    let mut sent = 0u64;
    let started = Instant::now();
    loop {
        for _ in 0..BATCH {
            let text = format!("f{sent} {filler}");
            sink.send(Message::text(
                json!({"type": "message", "text": text}).to_string(),
            ))
            .await
            .expect("flooder send");
            sent += 1;
        }
        // Pace the flood by the healthy readers, so only the member that stopped reading falls behind.
        wait_count(&healthy_count, sent, "the healthy member").await;
        wait_count(&flooder_count, sent, "the flooder").await;
        if sent % (BATCH * 5) == 0
            && metric(&relay, "roomcast_slow_consumer_closes_total", &[]).await >= 1.0
        {
            break;
        }
        assert!(
            sent < MAX_MESSAGES && started.elapsed() < Duration::from_secs(60),
            "no slow-consumer close after {sent} messages ({:?}) to a member that never reads",
            started.elapsed()
        );
    }
    eprintln!(
        "slow consumer closed after {sent} messages in {:?}",
        started.elapsed()
    );
    sink.send(Message::text(
        json!({"type": "message", "text": "END"}).to_string(),
    ))
    .await
    .expect("flooder send");

    // The slow member gets what was already in flight, then close 1013.
    let code = slow.expect_close(Duration::from_secs(20)).await;
    assert_eq!(
        code,
        Some(1013),
        "a consumer that stops reading is closed with 1013"
    );

    // The healthy member received every message, in order, with no gap.
    let got = tokio::time::timeout(Duration::from_secs(20), healthy_task)
        .await
        .expect("healthy member finished")
        .expect("healthy member task must not panic (it must not be disconnected)");
    assert_eq!(
        got.len() as u64,
        sent + 1,
        "healthy member must receive every message"
    );
    for (i, m) in got.iter().take(sent as usize).enumerate() {
        assert!(
            m["text"].as_str().unwrap().starts_with(&format!("f{i} ")),
            "message {i} out of order: {}",
            m["text"]
        );
    }
    for pair in got.windows(2) {
        assert_eq!(
            pair[1]["seq"].as_u64(),
            pair[0]["seq"].as_u64().map(|s| s + 1),
            "seq gap for the healthy member"
        );
    }
    tokio::time::timeout(Duration::from_secs(20), flooder_task)
        .await
        .expect("flooder finished")
        .expect("flooder task")
        .expect("the flooder must not be disconnected");

    let text = metrics_text(&relay).await;
    assert_eq!(
        metric_in(&text, "roomcast_slow_consumer_closes_total", &[]),
        Some(1.0),
        "exactly one slow-consumer close (only the member that stopped reading)\n{text}"
    );
    wait_for_metric(
        &relay,
        "roomcast_connections_closed_total",
        &[("code", "1013")],
        Duration::from_secs(10),
        |v| v >= 1.0,
    )
    .await;
}
