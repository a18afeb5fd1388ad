//! Contract: graceful shutdown on SIGTERM/SIGINT. Stop accepting, /readyz turns 503, every
//! WebSocket gets close 1001, and the process exits 0 within SHUTDOWN_DRAIN_MS (plus a margin for
//! process teardown).

mod common;

use std::time::Duration;

use common::*;
use serde_json::json;

/// Time allowed on top of SHUTDOWN_DRAIN_MS for the process to tear down.
const MARGIN: Duration = Duration::from_millis(2500);

async fn graceful_shutdown_closes_everyone_with_1001(signal: libc::c_int) {
    let drain = Duration::from_millis(2000);
    let mut relay = Relay::start(&[("SHUTDOWN_DRAIN_MS", "2000")]);
    let (mut a, _, _) = Client::join(&relay, "alice", "one").await;
    let (mut b, _, _) = Client::join(&relay, "bob", "two").await;
    let mut raw = RawClient::connect(&relay, "raw", "one").await;
    wait_for_clients(&relay, 3, Duration::from_secs(5)).await;

    let ta = tokio::spawn(async move { a.expect_close(Duration::from_secs(15)).await });
    let tb = tokio::spawn(async move { b.expect_close(Duration::from_secs(15)).await });
    let tr = tokio::spawn(async move {
        let code = raw.expect_close(Duration::from_secs(15)).await;
        // Answer like a well-behaved client so the relay can finish the close handshake.
        let _ = raw
            .send_raw(&masked_frame(OP_CLOSE, &1001u16.to_be_bytes()))
            .await;
        code
    });

    let (status, took) = relay.stop_with_signal(signal, drain + MARGIN).await;
    let status = status.unwrap_or_else(|| {
        panic!(
            "relay did not exit within {:?} after signal {signal}",
            drain + MARGIN
        )
    });
    assert!(
        status.success(),
        "relay must exit 0 after signal {signal}, got {status:?}"
    );
    assert!(took <= drain + MARGIN, "exit took {took:?}");

    for (who, task) in [("alice", ta), ("bob", tb), ("raw", tr)] {
        let code = task
            .await
            .unwrap_or_else(|e| panic!("{who} did not receive a close frame: {e}"));
        assert_eq!(
            code,
            Some(1001),
            "{who} must receive close 1001 on shutdown"
        );
    }
}

#[tokio::test]
async fn sigterm_closes_every_websocket_with_1001_and_exits_0_within_the_drain_time() {
    graceful_shutdown_closes_everyone_with_1001(libc::SIGTERM).await;
}

#[tokio::test]
async fn sigint_closes_every_websocket_with_1001_and_exits_0_within_the_drain_time() {
    graceful_shutdown_closes_everyone_with_1001(libc::SIGINT).await;
}

#[tokio::test]
async fn sigterm_with_no_connections_exits_0_promptly() {
    let mut relay = Relay::start(&[("SHUTDOWN_DRAIN_MS", "5000")]);
    let (status, took) = relay
        .stop_with_sigterm(Duration::from_secs(5) + MARGIN)
        .await;
    let status = status.expect("relay exits after SIGTERM");
    assert!(status.success(), "exit status {status:?}");
    assert!(
        took < Duration::from_secs(2),
        "with nothing to drain, exit should not wait for the drain time: {took:?}"
    );
}

/// Make the relay hold undeliverable bytes for `stuck`: it never reads and its receive buffer is
/// tiny, so once the kernel buffers are full the relay's close frame cannot be delivered either.
async fn back_up(relay: &Relay, room: &str) -> RawClient {
    let stuck = RawClient::connect_with(relay, &relay.chat_query("stuck", room), Some(4096)).await;
    let (mut publisher, _, _) = Client::join(relay, "publisher", room).await;
    let filler = "z".repeat(480);
    // Enough to overflow the largest kernel send buffer (tcp_wmem max, 4 MiB by default) and more.
    let total = 10_000;
    for batch in 0..(total / 100) {
        for i in 0..100 {
            publisher.publish(&format!("{batch}.{i} {filler}")).await;
        }
        for _ in 0..100 {
            publisher.next_message(EVENT_TIMEOUT).await;
        }
        if batch % 10 == 9 && metric(relay, "roomcast_outbox_queued_bytes", &[]).await > 100_000.0 {
            break;
        }
    }
    drop(publisher);
    stuck
}

const BACKED_UP: &[(&str, &str)] = &[
    ("RATE_LIMIT", "1000000"),
    ("ABUSE_LIMIT", "1000000"),
    ("OUTBOX_MAX_BYTES", "67108864"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_is_bounded_by_the_drain_time_when_a_client_never_reads() {
    let drain = Duration::from_millis(1500);
    let mut relay = Relay::builder()
        .envs(BACKED_UP)
        .env("SHUTDOWN_DRAIN_MS", 1500)
        .env("CLOSE_TIMEOUT_MS", 30000)
        .start();
    let _stuck = back_up(&relay, "jam").await;

    let (status, took) = relay.stop_with_sigterm(drain + MARGIN).await;
    let status = status.unwrap_or_else(|| {
        panic!(
            "relay still running {:?} after SIGTERM with SHUTDOWN_DRAIN_MS=1500",
            drain + MARGIN
        )
    });
    assert!(
        status.success(),
        "exit status after a bounded drain: {status:?}"
    );
    assert!(took <= drain + MARGIN, "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_turns_503_and_upgrades_are_refused_while_draining() {
    let mut relay = Relay::builder()
        .envs(BACKED_UP)
        .env("SHUTDOWN_DRAIN_MS", 4000)
        .env("CLOSE_TIMEOUT_MS", 4000)
        .start();
    let ready = http_get(&relay, "/readyz", &[]).await;
    assert_eq!(ready.status, 200, "{}", ready.head);
    assert_eq!(ready.json(), json!({"ready": true}));

    // A member that cannot take its close frame keeps the relay draining.
    let _stuck = back_up(&relay, "jam").await;
    relay.signal(libc::SIGTERM);

    // Signal delivery is asynchronous: poll until /readyz stops answering 200 (bounded).
    let signalled = std::time::Instant::now();
    let resp = loop {
        let resp = try_http_get(&relay, "/readyz", &[]).await;
        let still_running = relay.try_exit_status().is_none();
        let resp = resp.unwrap_or_else(|e| {
            panic!(
                "GET /readyz {:?} after SIGTERM failed ({e}); relay still running: {still_running}. \
                 While draining the relay must answer /readyz with 503",
                signalled.elapsed()
            )
        });
        if resp.status != 200 || signalled.elapsed() > Duration::from_secs(1) {
            break resp;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        resp.status,
        503,
        "/readyz while draining ({:?} after SIGTERM): {}\n{}",
        signalled.elapsed(),
        resp.head,
        resp.body
    );
    assert_eq!(resp.json(), json!({"ready": false}), "{}", resp.body);

    // New WebSocket connections are not accepted while draining.
    let path = format!("/chat?{}", relay.chat_query("late", "lobby"));
    let req = upgrade_head(relay.port(), &path, Some(&relay.origin()));
    // A refused TCP connection (listener already closed) is also "not accepted".
    if let Ok(resp) = http_exchange(relay.addr, &req).await {
        assert_rejected(&resp, 503, "upgrade while draining");
    }

    let status = relay
        .wait_for_exit(Duration::from_secs(4) + MARGIN)
        .await
        .expect("relay exits after the drain");
    assert!(status.success(), "{status:?}");
}

/// Regression: the second dialect's auth deadline timer must not hold up shutdown. It was a
/// tracked task, so a relay with a freshly authenticated connection waited for the timer and
/// exited with "drain time over" although every connection had closed.
#[tokio::test]
async fn an_auth_deadline_timer_does_not_hold_up_shutdown() {
    let mut relay = Relay::start(&[("AUTH_TIMEOUT_MS", "60000"), ("SHUTDOWN_DRAIN_MS", "5000")]);
    let (mut c, _) = Client::authed(&relay, &relay.token.clone()).await;
    c.join_room("r").await;
    let closed = tokio::spawn(async move { c.expect_close(Duration::from_secs(15)).await });
    let (status, _took) = relay
        .stop_with_signal(libc::SIGTERM, Duration::from_secs(10))
        .await;
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert_eq!(closed.await.expect("client task"), Some(1001));
    let logs = relay.logs();
    assert!(
        !logs.contains("drain time over"),
        "shutdown waited for a timer:\n{logs}"
    );
}
