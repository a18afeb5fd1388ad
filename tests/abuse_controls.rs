//! Abuse controls at the upgrade, both dialects: MAX_CONNECTIONS_PER_IP (429 past a source
//! address's share; the source is X-Forwarded-For only from TRUSTED_PROXIES) and
//! MAX_HANDSHAKES_PER_SECOND (503 with Retry-After, never a crash or a stall).

mod common;

use std::time::Duration;

use common::*;

async fn upgrade_with(relay: &Relay, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    let mut head = upgrade_head(relay.port(), path, Some(&relay.origin()));
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    head.insert_str(head.len() - 2, &extra);
    http_exchange(relay.addr, &head).await.expect("exchange")
}

#[tokio::test]
async fn an_address_past_its_share_gets_429_in_both_dialects_until_one_closes() {
    let relay = Relay::start(&[("MAX_CONNECTIONS_PER_IP", "2")]);
    let first = Client::join_and_settle(&relay, "a", "lobby").await;
    let (_second, _) = Client::authed(&relay, &relay.token).await;
    let chat = format!("/chat?{}", relay.chat_query("c", "lobby"));
    for path in [chat.as_str(), "/"] {
        let r = upgrade_request(&relay, path, Some(&relay.origin())).await;
        assert_rejected(&r, 429, &format!("a third connection at {path}"));
    }
    assert_eq!(
        metric(
            &relay,
            "roomcast_upgrade_rejections_total",
            &[("reason", "per_ip_limit")]
        )
        .await,
        2.0
    );
    first.close().await;
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match Client::connect_query(&relay, &relay.chat_query("d", "lobby")).await {
            Ok(_) => break,
            Err(ConnectError::Status(429)) if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("the closed connection's slot never came back: {e:?}"),
        }
    }
}

#[tokio::test]
async fn the_share_is_per_client_address_behind_a_trusted_proxy() {
    let relay = Relay::start(&[
        ("MAX_CONNECTIONS_PER_IP", "1"),
        ("TRUSTED_PROXIES", "127.0.0.1"),
    ]);
    let chat = format!("/chat?{}", relay.chat_query("a", "lobby"));
    let one = upgrade_with(&relay, &chat, &[("X-Forwarded-For", "192.0.2.1")]);
    let two = upgrade_with(&relay, &chat, &[("X-Forwarded-For", "192.0.2.2")]);
    // Each exchange keeps its socket until the relay is done; hold them by awaiting in order.
    let (one, two) = (one.await, two.await);
    assert_eq!(
        (one.status, two.status),
        (101, 101),
        "{}\n{}",
        one.head,
        two.head
    );
    // The upgraded sockets closed with the exchanges: wait for their slots to come back, then
    // hold one open and see the same client refused while another is not.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = Client::connect_to(
        &relay,
        &chat,
        Some(&relay.origin()),
        &[("X-Forwarded-For", "192.0.2.1")],
    )
    .await
    .expect("first connection of 192.0.2.1");
    let again = upgrade_with(&relay, &chat, &[("X-Forwarded-For", "192.0.2.1")]).await;
    assert_rejected(&again, 429, "a second connection of 192.0.2.1");
    let other = upgrade_with(&relay, &chat, &[("X-Forwarded-For", "192.0.2.3")]).await;
    assert_eq!(other.status, 101, "{}", other.head);
    drop(held);
}

#[tokio::test]
async fn a_handshake_storm_past_the_rate_gets_503_with_retry_after() {
    let relay = Relay::start(&[("MAX_HANDSHAKES_PER_SECOND", "5")]);
    let mut statuses = Vec::new();
    for _ in 0..20 {
        let r = upgrade_request(&relay, "/", None).await;
        if r.status == 503 {
            assert_eq!(r.header("retry-after"), Some("1"), "{}", r.head);
        }
        statuses.push(r.status);
    }
    let accepted = statuses.iter().filter(|&&s| s == 101).count();
    let refused = statuses.iter().filter(|&&s| s == 503).count();
    assert_eq!(accepted + refused, 20, "{statuses:?}");
    assert!(refused >= 10 && accepted >= 5, "{statuses:?}");
    assert_eq!(
        metric(
            &relay,
            "roomcast_upgrade_rejections_total",
            &[("reason", "handshake_rate")]
        )
        .await,
        refused as f64
    );
    // A second later there is room again, and the relay answers as ever.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (_c, ok) = Client::authed(&relay, &relay.token).await;
    assert!(ok["connectionId"].is_string());
}

/// The handshake limit is on by default, at 500 per runtime worker thread (the reconnect-storm
/// figures in docs/BENCHMARKS.md chose it); `0` turns it off. The relay says which it uses.
#[tokio::test]
async fn the_handshake_limit_defaults_to_500_per_worker_thread() {
    for (envs, expected) in [
        (vec![("WORKER_THREADS", "1")], 500),
        (vec![("WORKER_THREADS", "3")], 1500),
        (
            vec![("WORKER_THREADS", "1"), ("MAX_HANDSHAKES_PER_SECOND", "0")],
            0,
        ),
        (
            vec![("WORKER_THREADS", "1"), ("MAX_HANDSHAKES_PER_SECOND", "7")],
            7,
        ),
    ] {
        let relay = Relay::start(&envs);
        relay
            .wait_for_log(&format!("max_handshakes_per_second={expected} "))
            .await;
    }
}
