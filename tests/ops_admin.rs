//! ADMIN_ADDR: a second listener for `/metrics`, `/healthz` and `/readyz`; with it set, the
//! public port answers 404 for `/metrics` (and keeps its probes and WebSockets).

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn admin_addr_serves_metrics_and_probes_and_the_public_port_stops_answering_metrics() {
    let relay = Relay::start(&[("ADMIN_ADDR", "127.0.0.1:0")]);
    let admin = relay.admin_addr();
    assert_ne!(admin.port(), 0, "the real admin port is printed");
    assert_ne!(admin.port(), relay.port());

    // Traffic on the public port shows up in the admin listener's /metrics.
    let (mut ada, _, _) = Client::join(&relay, "ada", "adm").await;
    ada.publish_and_wait("counted").await;
    let scrape = http_get(&admin, "/metrics", &[]).await;
    assert_eq!(scrape.status, 200, "{}", scrape.head);
    assert!(
        scrape
            .header("content-type")
            .is_some_and(|c| c.starts_with("text/plain")),
        "{}",
        scrape.head
    );
    let metrics = parse_exposition(&scrape.body);
    assert_eq!(
        metrics.get("roomcast_connections", &[]),
        Some(1.0),
        "{}",
        scrape.body
    );
    assert!(metrics.get0("roomcast_messages_received_total", &[]) >= 1.0);

    let health = http_get(&admin, "/healthz", &[]).await;
    assert_eq!(health.json(), json!({"ok": true, "clients": 1}));
    let ready = http_get(&admin, "/readyz", &[]).await;
    assert_eq!((ready.status, ready.json()), (200, json!({"ready": true})));

    // The public port: no /metrics, probes still there.
    let public = http_get(&relay, "/metrics", &[]).await;
    assert_eq!(
        public.status, 404,
        "public /metrics with ADMIN_ADDR: {}",
        public.head
    );
    assert!(!public.body.contains("roomcast_"), "{}", public.body);
    assert_eq!(http_get(&relay, "/healthz", &[]).await.status, 200);
    assert_eq!(http_get(&relay, "/readyz", &[]).await.status, 200);

    // The admin listener serves nothing else: no page, no WebSockets.
    assert_eq!(http_get(&admin, "/", &[]).await.status, 404);
    let upgrade = Client::connect_to(
        &admin,
        &format!("/chat?{}", relay.chat_query("eve", "adm")),
        Some(&relay.origin()),
        &[],
    )
    .await;
    assert!(
        matches!(upgrade, Err(ConnectError::Status(404))),
        "an upgrade on the admin listener: {upgrade:?}"
    );
}

#[tokio::test]
async fn without_admin_addr_metrics_stay_on_the_public_port() {
    let relay = Relay::start(&[]);
    let scrape = http_get(&relay, "/metrics", &[]).await;
    assert_eq!(scrape.status, 200, "{}", scrape.head);
    assert!(
        relay.stdout_lines().is_empty(),
        "no admin line: {:?}",
        relay.stdout_lines()
    );
}

#[tokio::test]
async fn the_admin_readyz_turns_503_during_a_shutdown() {
    let mut relay = Relay::start(&[
        ("ADMIN_ADDR", "127.0.0.1:0"),
        ("LAME_DUCK_MS", "3000"),
        ("SHUTDOWN_SPREAD_MS", "0"),
    ]);
    let admin = relay.admin_addr();
    let (_ada, _, _) = Client::join(&relay, "ada", "adm").await;
    relay.signal(libc::SIGTERM);
    let started = std::time::Instant::now();
    loop {
        let ready = http_get(&admin, "/readyz", &[]).await;
        if ready.status == 503 {
            assert_eq!(ready.json(), json!({"ready": false}));
            break;
        }
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "admin /readyz still {} after SIGTERM",
            ready.status
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // Scrapes keep working while the relay drains.
    assert_eq!(http_get(&admin, "/metrics", &[]).await.status, 200);
    let status = relay
        .wait_for_exit(std::time::Duration::from_secs(10))
        .await
        .expect("the relay exits after its lame-duck wait and drain");
    assert!(status.success(), "{status:?}");
}

/// The commit the binary under test was built from, as build.rs finds it.
fn expected_commit() -> String {
    if let Ok(commit) = std::env::var("ROOMCAST_COMMIT") {
        if !commit.is_empty() {
            return commit;
        }
    }
    std::process::Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(repo_root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

#[tokio::test]
async fn build_info_names_the_version_and_the_commit() {
    let relay = Relay::start(&[]);
    let metrics = parse_exposition(&http_get(&relay, "/metrics", &[]).await.body);
    let commit = expected_commit();
    assert_eq!(
        metrics.get(
            "roomcast_build_info",
            &[("version", env!("CARGO_PKG_VERSION")), ("commit", &commit)]
        ),
        Some(1.0),
        "roomcast_build_info{{version, commit={commit}}}: {:?}",
        metrics.series("roomcast_build_info")
    );
    let version = std::process::Command::new(relay_binary())
        .arg("--version")
        .output()
        .expect("roomcast --version");
    let version = String::from_utf8_lossy(&version.stdout);
    assert!(
        version.contains(env!("CARGO_PKG_VERSION")) && version.contains(&commit),
        "--version names both: {version}"
    );
}

/// With ADMIN_ADDR the server API lives on the admin listener only: the public port answers
/// 404 for `/api/*`, whatever the key.
#[tokio::test]
async fn with_admin_addr_the_server_api_is_on_the_admin_listener_only() {
    let relay = Relay::start(&[("ADMIN_ADDR", "127.0.0.1:0"), ("API_KEY", "k")]);
    let admin = relay.admin_addr();
    let (mut ada, _, _) = Client::join(&relay, "ada", "ops").await;
    let body = json!({"room": "ops", "text": "via the admin port"}).to_string();
    let post = |addr: std::net::SocketAddr| {
        let req = format!(
            "POST /api/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer k\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        async move { http_exchange(addr, &req).await.expect("exchange") }
    };
    let public = post(relay.addr).await;
    assert_eq!(public.status, 404, "{}", public.head);
    let private = post(admin).await;
    assert_eq!(private.status, 200, "{}", private.body);
    assert_eq!(ada.next_message(WAIT).await["text"], "via the admin port");
}
