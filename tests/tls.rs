//! Direct TLS (TLS_CERT_FILE / TLS_KEY_FILE) against the real binary, with a real TLS client
//! (rustls) and certificates made by the openssl CLI: WSS in both dialects, HTTPS for the page,
//! the probes, /metrics and the server API; plain HTTP to the TLS port; a slow TLS reader; a
//! SIGHUP reload that new handshakes see while an open WebSocket stays; a failed reload; start-up
//! errors.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA, one server certificate, and a relay serving it.
struct TlsRelay {
    relay: Relay,
    client: Arc<rustls::ClientConfig>,
    ca: TestCa,
    cert: ServerCert,
    _dir: TempDir,
}

fn tls_relay(envs: &[(&str, &str)]) -> TlsRelay {
    tls_relay_in(TempDir::new("tls"), envs)
}

fn tls_relay_in(dir: TempDir, envs: &[(&str, &str)]) -> TlsRelay {
    let ca = TestCa::new(dir.path());
    let cert = ca.issue("live");
    let client = ca.client_config();
    let relay = Relay::builder()
        .envs(envs)
        .tls(&cert, client.clone())
        .start();
    TlsRelay {
        relay,
        client,
        ca,
        cert,
        _dir: dir,
    }
}

impl TlsRelay {
    async fn join(&self, name: &str, room: &str) -> Client {
        let path = format!("/chat?{}", self.relay.chat_query(name, room));
        let mut client =
            Client::connect_tls_to(&self.relay, &self.client, &path, Some(&self.relay.origin()))
                .await
                .unwrap_or_else(|e| panic!("WSS connect as {name}: {e:?}"));
        client.name = name.to_string();
        client.room = room.to_string();
        client.expect_type("system").await;
        client.expect_type("history").await;
        client
    }

    async fn authed(&self) -> Client {
        let mut client = Client::connect_tls_to(&self.relay, &self.client, "/", None)
            .await
            .unwrap_or_else(|e| panic!("WSS connect at /: {e:?}"));
        client
            .send_json(&json!({"type": "auth", "token": self.relay.token}))
            .await;
        client.expect_type("auth_ok").await;
        client
    }

    async fn reloads(&self, result: &str) -> f64 {
        metric(
            &self.relay,
            "roomcast_tls_reloads_total",
            &[("result", result)],
        )
        .await
    }
}

#[tokio::test]
async fn wss_serves_both_dialects_and_https_serves_the_page_probes_metrics_and_api() {
    const KEY: &str = "tls-api-key";
    let t = tls_relay(&[
        ("API_KEY", KEY),
        ("PRESENCE_INTERVAL_MS", "20"),
        ("RATE_LIMIT", "1000"),
    ]);
    assert!(
        t.relay.startup_line.contains("listening on https://"),
        "the start line names the scheme: {}",
        t.relay.startup_line
    );

    let health = https_get(&t.relay, &t.client, "/healthz").await;
    assert_eq!(health.status, 200, "{}", health.head);
    assert_eq!(health.json()["ok"], true);
    let page = https_get(&t.relay, &t.client, "/").await;
    assert_eq!(page.status, 200);
    assert!(page.body.contains("<html") || page.body.contains("<!doctype html"));
    let ready = https_get(&t.relay, &t.client, "/readyz").await;
    assert_eq!(ready.status, 200);
    assert!(metrics_text(&t.relay)
        .await
        .contains("roomcast_tls_handshake_failures_total"));

    // The first dialect, Origin checked against the https:// page origin.
    let mut ann = t.join("ann", "tls").await;
    // The second dialect in the same room.
    let mut bob = t.authed().await;
    bob.join_room("tls").await;

    ann.publish("hello over tls").await;
    ann.next_event_matching(WAIT, |v| {
        v["type"] == "message" && v["message"]["text"] == "hello over tls"
    })
    .await;
    let chat = bob.next_event_of_type("chat", WAIT).await;
    assert_eq!(chat["text"], "hello over tls");
    bob.chat("tls", "and back", "r-1").await;
    ann.next_event_matching(WAIT, |v| {
        v["type"] == "message" && v["message"]["text"] == "and back"
    })
    .await;

    // An http:// Origin is not the page's origin when the page is served over https.
    let path = format!("/chat?{}", t.relay.chat_query("eve", "tls"));
    let plain_origin = format!("http://127.0.0.1:{}", t.relay.port());
    match Client::connect_tls_to(&t.relay, &t.client, &path, Some(&plain_origin)).await {
        Err(ConnectError::Status(403)) => {}
        other => panic!(
            "an http:// Origin should get 403, got {:?}",
            other.map(|_| "101")
        ),
    }

    // The server API over HTTPS.
    let body = json!({"room": "tls", "text": "from the api", "from": "ci"}).to_string();
    let request = format!(
        "POST /api/publish HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nAuthorization: Bearer {KEY}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let stream = tls_connect(t.relay.addr, &t.client).await.expect("TLS");
    let published = exchange_on(stream, &request).await.expect("POST over TLS");
    assert_eq!(
        published.status, 200,
        "{}\n{}",
        published.head, published.body
    );
    ann.next_event_matching(WAIT, |v| {
        v["type"] == "message" && v["message"]["text"] == "from the api"
    })
    .await;
    bob.next_event_matching(WAIT, |v| v["type"] == "chat" && v["text"] == "from the api")
        .await;

    // A message larger than one read of rustls (4 KiB) and than one TLS record's worth of
    // frames queued at once: many publishes in a burst arrive whole and in order.
    for i in 0..40 {
        ann.publish(&format!("{i:03} {}", "x".repeat(400))).await;
    }
    for i in 0..40 {
        let want = format!("{i:03} ");
        let v = bob.next_event_of_type("chat", WAIT).await;
        assert!(
            v["text"].as_str().is_some_and(|s| s.starts_with(&want)),
            "chat {i} out of order or cut: {v}"
        );
        let v = ann.next_event_of_type("message", WAIT).await;
        assert!(
            v["message"]["text"]
                .as_str()
                .is_some_and(|s| s.starts_with(&want) && s.len() == 404),
            "message {i} out of order or cut: {v}"
        );
    }

    ann.close_normally().await;
    bob.close_normally().await;
    t.relay.wait_connections(0.0).await;
    let after = t.relay.scrape().await;
    assert_eq!(
        after.get0("roomcast_connections_closed_total", &[("code", "1000")]),
        2.0,
        "both TLS clients closed with 1000:\n{}",
        after.render_roomcast()
    );
}

#[tokio::test]
async fn plain_http_to_the_tls_port_is_answered_400_and_the_relay_keeps_serving() {
    let t = tls_relay(&[("HANDSHAKE_TIMEOUT_MS", "400")]);
    let resp = http_get(&t.relay, "/healthz", &[]).await;
    assert_eq!(resp.status, 400, "{}\n{}", resp.head, resp.body);
    assert!(resp.body.contains("HTTPS"), "{}", resp.body);
    // A plain WebSocket upgrade gets the same answer, never a 101.
    let upgrade = upgrade_request(&t.relay, "/chat?token=x", None).await;
    assert_rejected(&upgrade, 400, "plain upgrade to the TLS port");

    // Bytes that are neither TLS nor HTTP: closed at once.
    let mut junk = tokio::net::TcpStream::connect(t.relay.addr).await.unwrap();
    junk.write_all(b"\x00\x01\x02 not tls").await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(WAIT, junk.read(&mut buf))
        .await
        .expect("the relay closes a non-TLS connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "nothing is answered to junk");

    // A TLS record that is not a valid ClientHello: the handshake fails.
    let mut bad = tokio::net::TcpStream::connect(t.relay.addr).await.unwrap();
    bad.write_all(b"\x16\x03\x01\x00\x05hello").await.unwrap();
    let _ = tokio::time::timeout(WAIT, bad.read_to_end(&mut Vec::new())).await;

    // A client that connects and says nothing is dropped after HANDSHAKE_TIMEOUT_MS.
    let mut silent = tokio::net::TcpStream::connect(t.relay.addr).await.unwrap();
    let started = Instant::now();
    let _ = tokio::time::timeout(WAIT, silent.read(&mut buf)).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "a silent client must be dropped by the handshake timeout"
    );

    // Still serving TLS, and every failure was counted.
    assert_eq!(https_get(&t.relay, &t.client, "/healthz").await.status, 200);
    let e = t
        .relay
        .wait_metrics("TLS handshake failures counted", WAIT, |e| {
            let reason = |r| e.get0("roomcast_tls_handshake_failures_total", &[("reason", r)]);
            reason("plain_http") == 2.0 && reason("handshake") == 2.0 && reason("timeout") == 1.0
        })
        .await;
    assert_eq!(e.get0("roomcast_upgrade_rejections_total", &[]), 0.0);
}

#[tokio::test]
async fn sighup_reloads_the_certificate_for_new_handshakes_while_open_websockets_stay() {
    // With an audit log too: one SIGHUP reloads the certificate and reopens the log.
    let dir = TempDir::new("tls-reload");
    let audit = dir.path().join("audit.log");
    let audit_env = audit.display().to_string();
    let mut t = tls_relay_in(
        dir,
        &[("PRESENCE_INTERVAL_MS", "20"), ("AUDIT_LOG", &audit_env)],
    );
    let first = t.cert.der();
    assert_eq!(presented_certificate(&t.relay, &t.client).await, first);
    let mut old = t.join("old", "reload").await;

    // A renewal: new files in place, then SIGHUP (logrotate renamed the audit log meanwhile).
    let renewed = t.ca.issue("renewed");
    renewed.install_as(&t.cert);
    std::fs::rename(&audit, audit.with_extension("log.1")).expect("rotate the audit log");
    t.relay.signal(libc::SIGHUP);
    wait_for_metric(
        &t.relay,
        "roomcast_tls_reloads_total",
        &[("result", "ok")],
        WAIT,
        |v| v == 1.0,
    )
    .await;
    let seen = presented_certificate(&t.relay, &t.client).await;
    assert_ne!(seen, first, "a new handshake must get the new certificate");
    assert_eq!(seen, renewed.der());

    // The WebSocket opened before the reload stays open, receives and sends.
    let mut new = t.join("new", "reload").await;
    new.publish("after the reload").await;
    old.next_event_matching(WAIT, |v| {
        v["type"] == "message" && v["message"]["text"] == "after the reload"
    })
    .await;
    old.publish("still here").await;
    new.next_event_matching(WAIT, |v| {
        v["type"] == "message" && v["message"]["text"] == "still here"
    })
    .await;
    let deadline = Instant::now() + WAIT;
    while !std::fs::read_to_string(&audit).is_ok_and(|text| text.contains("still here")) {
        assert!(
            Instant::now() < deadline,
            "the same SIGHUP must reopen the audit log at {}",
            audit.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A broken renewal (the key file is garbage): the previous certificate stays, and the
    // failure is counted and logged.
    std::fs::write(&t.cert.key, "-----BEGIN PRIVATE KEY-----\nnot base64!\n").unwrap();
    t.relay.signal(libc::SIGHUP);
    wait_for_metric(
        &t.relay,
        "roomcast_tls_reloads_total",
        &[("result", "error")],
        WAIT,
        |v| v == 1.0,
    )
    .await;
    assert_eq!(t.reloads("ok").await, 1.0);
    assert_eq!(
        presented_certificate(&t.relay, &t.client).await,
        renewed.der()
    );
    assert!(
        t.relay.logs().contains("reload failed"),
        "a failed reload is logged:\n{}",
        t.relay.logs()
    );
    // A key that does not belong to the certificate is refused the same way.
    let other = t.ca.issue("other");
    std::fs::copy(&renewed.cert, &t.cert.cert).unwrap();
    std::fs::copy(&other.key, &t.cert.key).unwrap();
    t.relay.signal(libc::SIGHUP);
    wait_for_metric(
        &t.relay,
        "roomcast_tls_reloads_total",
        &[("result", "error")],
        WAIT,
        |v| v == 2.0,
    )
    .await;
    assert_eq!(
        presented_certificate(&t.relay, &t.client).await,
        renewed.der()
    );

    new.publish("after the failed reloads").await;
    for client in [&mut old, &mut new] {
        client
            .next_event_matching(WAIT, |v| {
                v["type"] == "message" && v["message"]["text"] == "after the failed reloads"
            })
            .await;
    }
    old.close_normally().await;
    new.close_normally().await;
    assert!(
        t.relay.try_exit_status().is_none(),
        "SIGHUP must not stop the relay"
    );
}

#[tokio::test]
async fn heartbeat_pings_go_through_tls_and_a_silent_tls_peer_is_dropped() {
    let t = tls_relay(&[("HEARTBEAT_MS", "300")]);
    let mut alive = t.join("alive", "beat").await;
    // tungstenite answers pings while reading.
    alive.stay_connected_for(Duration::from_millis(1500)).await;
    assert!(alive.pings_seen >= 2, "pings seen: {}", alive.pings_seen);

    // A WSS client that upgrades and then never reads or answers is dropped by the heartbeat.
    let mut silent = tls_connect(t.relay.addr, &t.client).await.expect("TLS");
    let head = upgrade_head(
        t.relay.port(),
        &format!("/chat?{}", t.relay.chat_query("silent", "beat")),
        Some(&t.relay.origin()),
    );
    silent.write_all(head.as_bytes()).await.unwrap();
    silent.flush().await.unwrap();
    // Meanwhile the reading client keeps answering, and stays.
    tokio::join!(
        alive.stay_connected_for(Duration::from_millis(2000)),
        t.relay
            .wait_metrics("the silent TLS peer dropped by the heartbeat", WAIT, |e| {
                e.get0("roomcast_heartbeat_terminations_total", &[]) >= 1.0
            })
    );
    // Its socket is closed (end of stream or a TLS error, never a wait).
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(WAIT, silent.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the silent peer's socket was not closed");
    assert_eq!(
        metric(&t.relay, "roomcast_heartbeat_terminations_total", &[]).await,
        1.0,
        "only the silent peer was dropped"
    );
    alive.close_normally().await;
}

#[tokio::test]
async fn a_tls_reader_that_stops_reading_is_closed_as_a_slow_consumer() {
    let t = tls_relay(&[
        ("OUTBOX_MAX_BYTES", "65536"),
        ("SEND_BUFFER_BYTES", "8192"),
        ("WRITE_STALL_MS", "3000"),
        ("RATE_LIMIT", "100000"),
        ("MAX_TEXT_CHARS", "2000"),
        ("MAX_PAYLOAD_BYTES", "4096"),
    ]);
    // A WSS client with a small receive buffer that upgrades and then never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let tcp = socket.connect(t.relay.addr).await.unwrap();
    let connector = tokio_rustls::TlsConnector::from(t.client.clone());
    let name = rustls::pki_types::ServerName::try_from(TLS_SERVER_NAME).unwrap();
    let mut stalled = connector.connect(name, tcp).await.expect("TLS handshake");
    let head = upgrade_head(
        t.relay.port(),
        &format!("/chat?{}", t.relay.chat_query("stalled", "slow")),
        Some(&t.relay.origin()),
    );
    stalled.write_all(head.as_bytes()).await.unwrap();
    stalled.flush().await.unwrap();
    let mut byte = [0u8; 1];
    let mut response = Vec::new();
    while !response.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, stalled.read(&mut byte))
            .await
            .expect("101 in time")
            .unwrap();
        assert_eq!(n, 1, "upgrade answered");
        response.push(byte[0]);
    }
    assert!(response.starts_with(b"HTTP/1.1 101"), "{response:?}");

    let mut publisher = t.join("publisher", "slow").await;
    let text = "y".repeat(1500);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for _ in 0..20 {
            publisher.publish(&text).await;
        }
        let e = t.relay.scrape().await;
        let closed = e.get0("roomcast_slow_consumer_closes_total", &[])
            + e.get0("roomcast_limit_closes_total", &[("limit", "write_stall")]);
        if closed >= 1.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "a TLS reader that stopped reading was never closed:\n{}",
            e.render_roomcast()
        );
        // Let the publisher's own frames drain so it stays healthy.
        let _ = publisher.try_next_event(Duration::from_millis(50)).await;
    }
    t.relay
        .wait_metrics("the stalled connection is gone", WAIT, |e| {
            e.get0("roomcast_dialect_connections", &[("dialect", "query")]) == 1.0
        })
        .await;
    drop(stalled);
}

/// Run the relay with `envs`, expect it to exit non-zero quickly, and return its stderr.
fn refused_at_start(envs: &[(&str, String)]) -> String {
    use std::process::{Command, Stdio};
    let mut cmd = Command::new(relay_binary());
    for key in RELAY_ENV {
        cmd.env_remove(key);
    }
    cmd.env("HOST", "127.0.0.1").env("PORT", "0");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run roomcast");
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            break status;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{envs:?} must be refused at start, but the relay kept running");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!status.success(), "{envs:?}: exit {status:?}");
    stderr
}

#[test]
fn tls_files_that_are_missing_half_or_invalid_stop_the_start_with_a_reason() {
    let dir = TempDir::new("tls-start");
    let ca = TestCa::new(dir.path());
    let good = ca.issue("good");
    let cert = good.cert.display().to_string();
    let key = good.key.display().to_string();

    let err = refused_at_start(&[("TLS_CERT_FILE", cert.clone())]);
    assert!(err.contains("TLS_KEY_FILE"), "{err}");
    let err = refused_at_start(&[("TLS_KEY_FILE", key.clone())]);
    assert!(err.contains("TLS_CERT_FILE"), "{err}");

    let missing = dir.path().join("missing.pem").display().to_string();
    let err = refused_at_start(&[
        ("TLS_CERT_FILE", missing.clone()),
        ("TLS_KEY_FILE", key.clone()),
    ]);
    assert!(
        err.contains(&missing),
        "the unreadable file is named: {err}"
    );

    let junk = dir.path().join("junk.pem");
    std::fs::write(&junk, "hello\n").unwrap();
    let junk = junk.display().to_string();
    let err = refused_at_start(&[("TLS_CERT_FILE", junk.clone()), ("TLS_KEY_FILE", key)]);
    assert!(
        err.contains(&junk) && err.contains("no CERTIFICATE"),
        "{err}"
    );
    let err = refused_at_start(&[("TLS_CERT_FILE", cert.clone()), ("TLS_KEY_FILE", junk)]);
    assert!(err.contains("no private key"), "{err}");

    // A key that is not the certificate's.
    let other = ca.issue("other");
    let err = refused_at_start(&[
        ("TLS_CERT_FILE", cert),
        ("TLS_KEY_FILE", other.key.display().to_string()),
    ]);
    assert!(err.contains("cannot be used together"), "{err}");
}
