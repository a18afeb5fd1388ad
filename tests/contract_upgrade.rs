//! Contract: the upgrade. Every check happens before the handshake and answers with a plain HTTP
//! status, never 101: path (404), Origin (403), token (401), capacity (503), in that order. A plain
//! GET on /chat answers 426 when the credentials are fine. Tokens never reach the logs.

mod common;

use std::time::Duration;

use common::*;

fn chat_path(relay: &Relay) -> String {
    format!("/chat?{}", relay.chat_query("alice", "lobby"))
}

#[tokio::test]
async fn valid_upgrade_is_answered_with_101_and_the_rfc_accept_key() {
    let relay = Relay::start(&[]);
    let mut raw = RawClient::connect(&relay, "alice", "lobby").await;
    assert!(
        raw.response_head.starts_with("HTTP/1.1 101"),
        "{}",
        raw.response_head
    );
    let system = raw.next_json(EVENT_TIMEOUT).await;
    assert_eq!(system["type"], "system", "{system}");
}

#[tokio::test]
async fn upgrade_on_a_path_other_than_chat_is_rejected_with_404() {
    let relay = Relay::start(&[]);
    let query = relay.chat_query("alice", "lobby");
    for path in [
        format!("/nope?{query}"),
        format!("/chat/extra?{query}"),
        format!("/chats?{query}"),
        format!("/CHAT?{query}"),
    ] {
        let resp = upgrade_request(&relay, &path, Some(&relay.origin())).await;
        assert_rejected(&resp, 404, &format!("upgrade on {path}"));
    }
}

#[tokio::test]
async fn upgrade_without_origin_is_rejected_with_403() {
    let relay = Relay::start(&[]);
    let resp = upgrade_request(&relay, &chat_path(&relay), None).await;
    assert_rejected(&resp, 403, "upgrade without Origin");
}

#[tokio::test]
async fn upgrade_from_an_origin_outside_the_allow_list_is_rejected_with_403() {
    let relay = Relay::start(&[]);
    let wrong_port = format!("http://127.0.0.1:{}", relay.port().wrapping_add(1));
    let https_same_host = format!("https://127.0.0.1:{}", relay.port());
    for origin in [
        "http://evil.example",
        "null",
        wrong_port.as_str(),
        https_same_host.as_str(),
        "",
    ] {
        let resp = upgrade_request(&relay, &chat_path(&relay), Some(origin)).await;
        assert_rejected(&resp, 403, &format!("upgrade from Origin {origin:?}"));
    }
}

#[tokio::test]
async fn upgrade_from_either_default_origin_is_accepted() {
    let relay = Relay::start(&[]);
    for origin in [
        format!("http://localhost:{}", relay.port()),
        format!("http://127.0.0.1:{}", relay.port()),
    ] {
        let resp = upgrade_request(&relay, &chat_path(&relay), Some(&origin)).await;
        assert_eq!(
            resp.status, 101,
            "default Origin {origin} must be allowed: {}",
            resp.head
        );
        assert_eq!(
            resp.header("sec-websocket-accept"),
            Some(WS_ACCEPT),
            "{}",
            resp.head
        );
    }
}

#[tokio::test]
async fn allowed_origins_setting_replaces_the_default_list() {
    let relay = Relay::start(&[(
        "ALLOWED_ORIGINS",
        "https://chat.example, https://other.example/",
    )]);
    for origin in ["https://chat.example", "https://other.example"] {
        let resp = upgrade_request(&relay, &chat_path(&relay), Some(origin)).await;
        assert_eq!(
            resp.status, 101,
            "configured Origin {origin} must be allowed: {}",
            resp.head
        );
    }
    let default_origin = relay.origin();
    let resp = upgrade_request(&relay, &chat_path(&relay), Some(&default_origin)).await;
    assert_rejected(&resp, 403, "default Origin once ALLOWED_ORIGINS is set");
}

#[tokio::test]
async fn upgrade_with_a_missing_or_wrong_token_is_rejected_with_401() {
    let relay = Relay::start(&[]);
    let cases = [
        ("missing token", "/chat?name=alice&room=lobby".to_string()),
        (
            "empty token",
            "/chat?token=&name=alice&room=lobby".to_string(),
        ),
        (
            "wrong token",
            "/chat?token=wrong&name=alice&room=lobby".to_string(),
        ),
        (
            "token prefix",
            format!("/chat?token={}&name=alice", &TOKEN[..TOKEN.len() - 1]),
        ),
        (
            "token with suffix",
            format!("/chat?token={TOKEN}x&name=alice"),
        ),
        (
            "token in another case",
            format!("/chat?token={}&name=alice", TOKEN.to_uppercase()),
        ),
        (
            "dev token when another is configured",
            "/chat?token=dev-token&name=alice".to_string(),
        ),
    ];
    for (what, path) in cases {
        let resp = upgrade_request(&relay, &path, Some(&relay.origin())).await;
        assert_rejected(&resp, 401, what);
    }
}

#[tokio::test]
async fn upgrade_past_max_connections_is_rejected_with_503_until_a_slot_frees() {
    let relay = Relay::start(&[("MAX_CONNECTIONS", "2")]);
    let (first, _, _) = Client::join(&relay, "one", "lobby").await;
    let (_second, _, _) = Client::join(&relay, "two", "lobby").await;

    let resp = upgrade_request(&relay, &chat_path(&relay), Some(&relay.origin())).await;
    assert_rejected(&resp, 503, "third connection with MAX_CONNECTIONS=2");
    match Client::connect_query(&relay, &relay.chat_query("three", "lobby")).await {
        Err(ConnectError::Status(503)) => {}
        other => panic!("tungstenite client past capacity: expected HTTP 503, got {other:?}"),
    }

    first.close().await;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        match Client::connect_query(&relay, &relay.chat_query("three", "lobby")).await {
            Ok(_) => break,
            Err(ConnectError::Status(503)) if std::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("after one client left, a new connection must be accepted; got {e:?}"),
        }
    }
}

#[tokio::test]
async fn rejections_are_checked_in_order_path_origin_token_capacity() {
    let relay = Relay::start(&[("MAX_CONNECTIONS", "1")]);
    let (_holder, _, _) = Client::join(&relay, "holder", "lobby").await;
    let good = relay.chat_query("alice", "lobby");
    let bad = "token=wrong&name=alice";
    let evil = Some("http://evil.example");

    let resp = upgrade_request(&relay, &format!("/nope?{bad}"), None).await;
    assert_rejected(&resp, 404, "wrong path, no Origin, wrong token, relay full");
    let resp = upgrade_request(&relay, &format!("/chat?{bad}"), None).await;
    assert_rejected(&resp, 403, "no Origin, wrong token, relay full");
    let resp = upgrade_request(&relay, &format!("/chat?{bad}"), evil).await;
    assert_rejected(&resp, 403, "wrong Origin, wrong token, relay full");
    let resp = upgrade_request(&relay, &format!("/chat?{bad}"), Some(&relay.origin())).await;
    assert_rejected(&resp, 401, "wrong token, relay full");
    let resp = upgrade_request(&relay, &format!("/chat?{good}"), Some(&relay.origin())).await;
    assert_rejected(&resp, 503, "good request, relay full");
}

#[tokio::test]
async fn plain_get_on_chat_answers_426_with_good_credentials_401_with_a_bad_token_403_with_a_bad_origin(
) {
    let relay = Relay::start(&[]);
    let good = chat_path(&relay);
    let origin = relay.origin();

    let resp = http_get(&relay, &good, &[("Origin", &origin)]).await;
    assert_rejected(&resp, 426, "plain GET with good token and Origin");
    let resp = http_get(&relay, &good, &[]).await;
    assert_rejected(&resp, 426, "plain GET with good token and no Origin");
    let resp = http_get(
        &relay,
        "/chat?token=wrong&name=alice",
        &[("Origin", &origin)],
    )
    .await;
    assert_rejected(&resp, 401, "plain GET with wrong token");
    let resp = http_get(&relay, "/chat?name=alice", &[]).await;
    assert_rejected(&resp, 401, "plain GET without token");
    let resp = http_get(&relay, &good, &[("Origin", "http://evil.example")]).await;
    assert_rejected(&resp, 403, "plain GET with good token and a foreign Origin");
}

#[tokio::test]
async fn rejections_are_counted_by_reason() {
    let relay = Relay::start(&[("MAX_CONNECTIONS", "1")]);
    let (_holder, _, _) = Client::join(&relay, "holder", "lobby").await;
    let good = chat_path(&relay);
    let origin = relay.origin();

    assert_rejected(
        &upgrade_request(&relay, "/nope", Some(&origin)).await,
        404,
        "wrong path",
    );
    assert_rejected(
        &upgrade_request(&relay, &good, None).await,
        403,
        "no Origin",
    );
    assert_rejected(
        &upgrade_request(&relay, &good, Some("http://evil.example")).await,
        403,
        "bad Origin",
    );
    assert_rejected(
        &upgrade_request(&relay, "/chat?token=nope", Some(&origin)).await,
        401,
        "bad token",
    );
    assert_rejected(
        &upgrade_request(&relay, &good, Some(&origin)).await,
        503,
        "full",
    );

    let text = metrics_text(&relay).await;
    let count = |reason: &str| {
        metric_in(
            &text,
            "roomcast_upgrade_rejections_total",
            &[("reason", reason)],
        )
        .unwrap_or(0.0)
    };
    assert_eq!(count("not_found"), 1.0, "not_found rejections\n{text}");
    assert_eq!(
        count("forbidden_origin"),
        2.0,
        "forbidden_origin rejections\n{text}"
    );
    assert_eq!(
        count("unauthorized"),
        1.0,
        "unauthorized rejections\n{text}"
    );
    assert_eq!(count("full"), 1.0, "full rejections\n{text}");
}

#[tokio::test]
async fn default_token_is_dev_token_and_the_relay_warns_it_is_for_development() {
    let relay = Relay::builder().without_token().start();
    let (_client, system, _) = Client::join(&relay, "alice", "lobby").await;
    assert_eq!(system["message"], "connected as alice");
    let resp = upgrade_request(
        &relay,
        "/chat?token=contract-test-token",
        Some(&relay.origin()),
    )
    .await;
    assert_rejected(&resp, 401, "another token while the default is in use");

    let lines = relay.stderr_lines();
    let warned = lines.iter().any(|l| {
        let l = l.to_lowercase();
        l.contains("warn") && l.contains("dev")
    });
    assert!(
        warned,
        "expected a WARN log line about the development token; stderr:\n{}",
        lines.join("\n")
    );
}

#[tokio::test]
async fn tokens_and_query_strings_never_appear_in_logs() {
    let secret = "s3cret-zebra-7f1d";
    let wrong = "wr0ng-giraffe-9c2e";
    let relay = Relay::builder()
        .env("CHAT_TOKEN", secret)
        .env("RUST_LOG", "debug")
        .start();

    let (mut client, _, _) = Client::join(&relay, "alice", "lobby").await;
    client.publish_and_wait("hello").await;
    let origin = relay.origin();
    assert_rejected(
        &upgrade_request(
            &relay,
            &format!("/chat?token={wrong}&name=bob"),
            Some(&origin),
        )
        .await,
        401,
        "wrong token",
    );
    assert_rejected(
        &upgrade_request(&relay, &format!("/elsewhere?token={secret}"), Some(&origin)).await,
        404,
        "wrong path",
    );
    assert_rejected(
        &upgrade_request(
            &relay,
            &format!("/chat?token={secret}"),
            Some("http://evil.example"),
        )
        .await,
        403,
        "bad origin",
    );
    assert_rejected(
        &http_get(&relay, &format!("/chat?token={secret}"), &[]).await,
        426,
        "plain GET",
    );
    client.close().await;
    wait_for_clients(&relay, 0, Duration::from_secs(5)).await;

    let logs = relay.stderr_lines().join("\n") + &relay.stdout_lines().join("\n");
    assert!(
        !logs.contains(secret),
        "the configured token appears in the logs:\n{logs}"
    );
    assert!(
        !logs.contains(wrong),
        "a presented (wrong) token appears in the logs:\n{logs}"
    );
    assert!(
        !logs.contains("token="),
        "a query string carrying a token appears in the logs:\n{logs}"
    );
}

#[tokio::test]
async fn rejections_carry_a_short_plain_text_body() {
    let relay = Relay::start(&[]);
    let good = chat_path(&relay);
    let origin = relay.origin();
    let cases = [
        (upgrade_request(&relay, "/nope", Some(&origin)).await, "404"),
        (upgrade_request(&relay, &good, None).await, "403"),
        (
            upgrade_request(&relay, "/chat?token=nope", Some(&origin)).await,
            "401",
        ),
        (http_get(&relay, &good, &[]).await, "426"),
    ];
    for (resp, what) in cases {
        assert!(
            resp.header("content-type")
                .is_some_and(|c| c.starts_with("text/plain")),
            "{what}: rejection body must be text/plain:\n{}",
            resp.head
        );
        assert!(
            !resp.body.trim().is_empty() && resp.body.len() < 200,
            "{what}: rejection body must be short text: {:?}",
            resp.body
        );
        assert!(
            !resp.body.contains(TOKEN),
            "{what}: body must not echo the token"
        );
    }
}

#[tokio::test]
async fn new_room_past_max_rooms_is_refused_with_503_until_an_empty_room_can_be_evicted() {
    let relay = Relay::start(&[("MAX_ROOMS", "2")]);
    let (a, _, _) = Client::join(&relay, "alice", "room-a").await;
    let (_b, _, _) = Client::join(&relay, "bob", "room-b").await;

    // Joining an existing room is fine; a third room is not while both are occupied.
    let (_a2, _, _) = Client::join(&relay, "ann", "room-a").await;
    let path = format!("/chat?{}", relay.chat_query("carol", "room-c"));
    let resp = upgrade_request(&relay, &path, Some(&relay.origin())).await;
    assert_rejected(
        &resp,
        503,
        "a third room with MAX_ROOMS=2, both rooms occupied",
    );
    assert_eq!(
        metric(
            &relay,
            "roomcast_upgrade_rejections_total",
            &[("reason", "rooms_full")]
        )
        .await,
        1.0
    );

    // Once room-a is empty it may be evicted to make space.
    drop(a);
    drop(_a2);
    wait_for_clients(&relay, 1, Duration::from_secs(5)).await;
    let (mut carol, _, _) = Client::join(&relay, "carol", "room-c").await;
    carol.publish_and_wait("room-c works").await;
}

#[tokio::test]
async fn connection_that_never_sends_its_request_head_is_dropped_after_the_handshake_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let relay = Relay::start(&[("HANDSHAKE_TIMEOUT_MS", "300")]);
    for partial in ["", "GET /chat?token=x HTTP/1.1\r\nHost: 127.0.0.1\r\n"] {
        let mut stream = tokio::net::TcpStream::connect(relay.addr)
            .await
            .expect("connect");
        stream.write_all(partial.as_bytes()).await.expect("write");
        let started = std::time::Instant::now();
        let mut buf = [0u8; 1024];
        let ended = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {} // a 408 response is fine; the connection must still end
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "a connection with partial head {partial:?} was still open 5 s after HANDSHAKE_TIMEOUT_MS=300"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(200),
            "dropped before the timeout: {:?}",
            started.elapsed()
        );
    }
}

#[tokio::test]
async fn malformed_websocket_handshake_is_rejected_with_400() {
    let relay = Relay::start(&[]);
    let path = chat_path(&relay);
    let origin = relay.origin();
    let port = relay.port();
    let no_key = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nOrigin: {origin}\r\n\r\n"
    );
    let resp = http_exchange(relay.addr, &no_key).await.expect("exchange");
    assert_rejected(&resp, 400, "upgrade without Sec-WebSocket-Key");

    let old_version = upgrade_head(port, &path, Some(&origin)).replace("Version: 13", "Version: 8");
    let resp = http_exchange(relay.addr, &old_version)
        .await
        .expect("exchange");
    assert_ne!(
        resp.status, 101,
        "Sec-WebSocket-Version 8 must not be upgraded: {}",
        resp.head
    );
    assert!(
        resp.status == 400 || resp.status == 426,
        "unsupported version: {}",
        resp.head
    );

    assert!(
        metric(
            &relay,
            "roomcast_upgrade_rejections_total",
            &[("reason", "bad_handshake")]
        )
        .await
            >= 1.0,
        "malformed handshakes are counted"
    );
}

#[tokio::test]
async fn plain_post_on_chat_runs_the_same_checks_and_answers_426() {
    let relay = Relay::start(&[]);
    let path = chat_path(&relay);
    let port = relay.port();
    let post = |origin: &str| {
        format!(
            "POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: {origin}\r\n\
             Content-Length: 0\r\nConnection: close\r\n\r\n"
        )
    };
    let resp = http_exchange(relay.addr, &post(&relay.origin()))
        .await
        .expect("POST");
    assert_rejected(&resp, 426, "POST with good token and Origin");
    let resp = http_exchange(relay.addr, &post("http://evil.example"))
        .await
        .expect("POST");
    assert_rejected(&resp, 403, "POST with a foreign Origin");
    let bad_token = format!(
        "POST /chat?token=wrong HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: {}\r\n\
         Content-Length: 0\r\nConnection: close\r\n\r\n",
        relay.origin()
    );
    let resp = http_exchange(relay.addr, &bad_token).await.expect("POST");
    assert_rejected(&resp, 401, "POST with a wrong token");
}
