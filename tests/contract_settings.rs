//! Contract: settings by flag and environment variable, documented by `roomcast --help` with
//! defaults; the startup line; the connection cap derived from the open-file limit (raised to its
//! hard limit and reported).

mod common;

use std::process::Command;

use common::*;
use serde_json::json;

#[test]
fn help_documents_every_setting_with_its_environment_variable() {
    let out = Command::new(relay_binary())
        .arg("--help")
        .output()
        .expect("run roomcast --help");
    assert!(
        out.status.success(),
        "roomcast --help exit status {:?}",
        out.status
    );
    let help = String::from_utf8_lossy(&out.stdout);
    // Every setting the relay reads (RUST_LOG is tracing's, not a flag).
    for env in common::RELAY_ENV.iter().filter(|e| **e != "RUST_LOG") {
        assert!(help.contains(env), "--help must document {env}:\n{help}");
    }
    for default in [
        "8080", "20", "10000", "50", "500", "2048", "30000", "30", "262144", "150", "5000", "2000",
    ] {
        assert!(
            help.contains(default),
            "--help must show the default {default}:\n{help}"
        );
    }
}

#[tokio::test]
async fn startup_line_reports_the_address_the_connection_cap_and_the_open_file_limit() {
    let relay = Relay::start(&[]);
    let line = parse_startup_line(&relay.startup_line).expect("startup line format");
    assert_eq!(line.addr.ip().to_string(), "127.0.0.1");
    assert_ne!(line.addr.port(), 0, "the real port is printed, not 0");
    assert_eq!(
        line.max_connections + 100,
        line.open_file_limit,
        "default max connections is the open-file limit - 100: {}",
        relay.startup_line
    );
    if let Some((_, Some(hard))) = own_open_file_limits() {
        assert_eq!(
            line.open_file_limit, hard,
            "the relay raises its open-file limit to the hard limit: {}",
            relay.startup_line
        );
    }
    assert_eq!(
        metric(&relay, "roomcast_max_connections", &[]).await,
        line.max_connections as f64
    );
}

#[tokio::test]
async fn max_connections_setting_is_reported_at_startup() {
    let relay = Relay::start(&[("MAX_CONNECTIONS", "7")]);
    assert_eq!(relay.max_connections, 7, "{}", relay.startup_line);
    assert_eq!(metric(&relay, "roomcast_max_connections", &[]).await, 7.0);
}

#[tokio::test]
async fn limits_are_read_from_environment_variables() {
    let relay = Relay::start(&[
        ("HISTORY_LIMIT", "3"),
        ("MAX_TEXT_CHARS", "10"),
        ("RATE_LIMIT", "100"),
    ]);
    let (mut alice, _, _) = Client::join(&relay, "alice", "env").await;
    for i in 1..=5 {
        alice.publish_and_wait(&format!("m{i}")).await;
    }
    let (_bob, _, history) = Client::join(&relay, "bob", "env").await;
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["m3", "m4", "m5"], "HISTORY_LIMIT=3: {history}");

    alice.publish_and_wait(&"a".repeat(10)).await;
    alice.publish(&"a".repeat(11)).await;
    let e = alice.next_error(EVENT_TIMEOUT).await;
    assert_eq!(e["code"], "too_large", "MAX_TEXT_CHARS=10: {e}");
}

#[tokio::test]
async fn limits_are_read_from_flags() {
    let relay = Relay::builder()
        .arg("--history-limit")
        .arg(2)
        .arg("--max-text-chars")
        .arg(5)
        .start();
    let (mut alice, _, _) = Client::join(&relay, "alice", "flags").await;
    for i in 1..=3 {
        alice.publish_and_wait(&format!("m{i}")).await;
    }
    let (_bob, _, history) = Client::join(&relay, "bob", "flags").await;
    let texts: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts, ["m2", "m3"], "--history-limit 2: {history}");
    alice.publish("toolong").await;
    assert_eq!(
        alice.next_error(EVENT_TIMEOUT).await["code"],
        "too_large",
        "--max-text-chars 5"
    );
}

#[tokio::test]
async fn max_payload_bytes_setting_moves_the_1009_threshold() {
    let relay = Relay::start(&[("MAX_PAYLOAD_BYTES", "256")]);
    let mut raw = RawClient::connect(&relay, "raw", "payload").await;
    let prefix = r#"{"type":"message","text":""#;
    let text = "b".repeat(256 - prefix.len() - 2);
    let exact = json!({"type": "message", "text": text}).to_string();
    assert_eq!(exact.len(), 256);
    raw.send_text(&exact).await;
    assert_eq!(
        raw.next_json_of_type("message", EVENT_TIMEOUT).await["message"]["text"],
        text.as_str()
    );
    raw.send_raw(&build_frame(
        true,
        0,
        OP_TEXT,
        Some([1, 2, 3, 4]),
        &[],
        Some(257),
    ))
    .await
    .unwrap();
    assert_eq!(raw.expect_close(EVENT_TIMEOUT).await, Some(1009));
}

#[test]
fn invalid_settings_are_refused_at_start() {
    use std::process::Stdio;
    use std::time::{Duration, Instant};
    for (key, value) in [
        ("RATE_LIMIT", "0"),
        ("MAX_PAYLOAD_BYTES", "10"),
        ("HEARTBEAT_MS", "0"),
        ("PORT", "notaport"),
    ] {
        let mut child = Command::new(relay_binary())
            .env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env(key, value)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
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
                panic!("{key}={value} must be refused at start, but the relay kept running");
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        assert!(
            !status.success(),
            "{key}={value} must be refused with a non-zero exit, got {status:?}"
        );
    }
}
