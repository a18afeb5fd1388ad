//! Contract: the plain HTTP endpoints. `GET /healthz` → `{"ok":true,"clients":N}`; `GET /readyz` →
//! 200 `{"ready":true}` while running; `GET /metrics` → Prometheus text with the contract's
//! counters, never room or user ids as labels; `GET /` serves the chat page.

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

#[tokio::test]
async fn healthz_reports_ok_and_the_current_client_count() {
    let relay = Relay::start(&[]);
    let resp = http_get(&relay, "/healthz", &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert_eq!(resp.json(), json!({"ok": true, "clients": 0}));

    let (a, _, _) = Client::join(&relay, "alice", "r1").await;
    let (_b, _, _) = Client::join(&relay, "bob", "r2").await;
    assert_eq!(
        http_get(&relay, "/healthz", &[]).await.json(),
        json!({"ok": true, "clients": 2})
    );

    a.close().await;
    wait_for_clients(&relay, 1, Duration::from_secs(5)).await;
    assert_eq!(
        http_get(&relay, "/healthz", &[]).await.json(),
        json!({"ok": true, "clients": 1})
    );
}

#[tokio::test]
async fn healthz_counts_dropped_connections_out() {
    let relay = Relay::start(&[]);
    let (a, _, _) = Client::join(&relay, "alice", "r1").await;
    let raw = RawClient::connect(&relay, "raw", "r1").await;
    wait_for_clients(&relay, 2, Duration::from_secs(5)).await;
    drop(a);
    drop(raw);
    wait_for_clients(&relay, 0, Duration::from_secs(5)).await;
}

#[tokio::test]
async fn readyz_is_200_ready_true_while_running() {
    let relay = Relay::start(&[]);
    let resp = http_get(&relay, "/readyz", &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert_eq!(resp.json(), json!({"ready": true}));
}

#[tokio::test]
async fn metrics_count_connections_messages_deliveries_and_rejections() {
    let relay = Relay::start(&[]);
    let (mut alice, _, _) = Client::join(&relay, "metricsuser", "metricsroom").await;
    let (mut bob, _, _) = Client::join(&relay, "otheruser", "metricsroom").await;
    alice.publish_and_wait("counted").await;
    bob.next_message(EVENT_TIMEOUT).await;
    alice.send_text("not json").await;
    alice.next_error(EVENT_TIMEOUT).await;
    assert_rejected(
        &upgrade_request(&relay, "/chat?token=wrong", Some(&relay.origin())).await,
        401,
        "bad token",
    );

    let resp = http_get(&relay, "/metrics", &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert!(
        resp.header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "Prometheus text format: {}",
        resp.head
    );
    let text = resp.body;
    let value = |name: &str, labels: &[(&str, &str)]| metric_in(&text, name, labels);

    assert_eq!(
        value("roomcast_connections", &[]),
        Some(2.0),
        "current connections\n{text}"
    );
    assert!(
        value("roomcast_connections_opened_total", &[]) >= Some(2.0),
        "connections opened\n{text}"
    );
    assert!(
        value("roomcast_messages_received_total", &[]) >= Some(1.0),
        "messages received\n{text}"
    );
    assert!(
        value("roomcast_frames_delivered_total", &[]) >= Some(2.0),
        "frames delivered\n{text}"
    );
    assert_eq!(
        value("roomcast_invalid_messages_total", &[("code", "bad_json")]),
        Some(1.0),
        "invalid by code\n{text}"
    );
    assert_eq!(
        value(
            "roomcast_upgrade_rejections_total",
            &[("reason", "unauthorized")]
        ),
        Some(1.0),
        "rejections by reason\n{text}"
    );
    assert!(value("roomcast_rooms", &[]) >= Some(1.0), "rooms\n{text}");
    assert!(
        value("roomcast_publish_recipients_count", &[]) >= Some(1.0),
        "recipients-per-publish histogram\n{text}"
    );
    assert!(
        value("roomcast_publish_to_write_seconds_count", &[]) >= Some(1.0),
        "publish-to-write latency histogram\n{text}"
    );
    for name in [
        "roomcast_max_connections",
        "roomcast_rate_limited_total",
        "roomcast_heartbeat_terminations_total",
        "roomcast_slow_consumer_closes_total",
    ] {
        assert!(
            value(name, &[]).is_some(),
            "{name} must be exported (0 until it happens)\n{text}"
        );
    }

    for id in ["metricsuser", "otheruser", "metricsroom"] {
        assert!(
            !text.contains(id),
            "room and user ids must never be metric labels; found {id:?}\n{text}"
        );
    }

    alice.close().await;
    wait_for_metric(
        &relay,
        "roomcast_connections_closed_total",
        &[("code", "1000")],
        Duration::from_secs(5),
        |v| v >= 1.0,
    )
    .await;
    wait_for_metric(
        &relay,
        "roomcast_connections",
        &[],
        Duration::from_secs(5),
        |v| v == 1.0,
    )
    .await;
}

#[tokio::test]
async fn chat_page_is_served_at_the_root() {
    let relay = Relay::start(&[]);
    let resp = http_get(&relay, "/", &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.head);
    assert!(
        resp.header("content-type")
            .is_some_and(|c| c.starts_with("text/html")),
        "{}",
        resp.head
    );
    assert!(resp.body.to_lowercase().contains("<html"), "an HTML page");
}

#[tokio::test]
async fn unknown_plain_path_is_404() {
    let relay = Relay::start(&[]);
    let resp = http_get(&relay, "/definitely-not-here", &[]).await;
    assert_eq!(resp.status, 404, "{}", resp.head);
}
