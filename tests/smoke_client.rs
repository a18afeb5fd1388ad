//! `roomcast-smoke` against a real relay: exit 0 when its message comes back; otherwise the
//! documented exit code (1 round trip, 2 usage, 3 unreachable, 4 refused, 5 unavailable) and a
//! reason that says what to check; its flags; and `wss://` through nginx terminating TLS with a
//! certificate the test makes.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::*;

/// Run the smoke client with `args`, and CHAT_TOKEN set to `token` unless it is None.
fn smoke(args: &[&str], token: Option<&str>) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_roomcast-smoke"));
    cmd.args(args).env_remove("CHAT_TOKEN");
    if let Some(token) = token {
        cmd.env("CHAT_TOKEN", token);
    }
    cmd.output().expect("run roomcast-smoke")
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn base(relay: &Relay) -> String {
    format!("http://127.0.0.1:{}", relay.port())
}

#[tokio::test]
async fn exits_0_when_its_message_comes_back_in_the_room_it_was_given() {
    let relay = Relay::start(&[]);
    let (mut watcher, _, _) = Client::join(&relay, "watcher", "deploy-check").await;
    let out = smoke(
        &[
            &base(&relay),
            "--token",
            &relay.token,
            "--room",
            "deploy-check",
            "--name",
            "pipeline",
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.starts_with("ok: smoke-"), "{stdout}");
    let seen = watcher.next_message(EVENT_TIMEOUT).await;
    assert_eq!(seen["from"], "pipeline", "{seen}");
    assert_eq!(seen["room"], "deploy-check", "{seen}");
    assert!(
        !describe(&out).contains(&relay.token),
        "the token is never printed"
    );
}

#[test]
fn takes_the_token_from_chat_token_when_no_flag_is_given() {
    let relay = Relay::start(&[]);
    let out = smoke(&[&base(&relay)], Some(&relay.token));
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let out = smoke(
        &[&format!("ws://127.0.0.1:{}/chat", relay.port())],
        Some(&relay.token),
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "a full /chat URL: {}",
        describe(&out)
    );
}

#[test]
fn a_401_says_to_check_the_token_and_exits_4() {
    let relay = Relay::start(&[]);
    let out = smoke(&[&base(&relay), "--token", "not-the-s3cret"], None);
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("401"), "{stderr}");
    assert!(
        stderr.contains("token") && stderr.contains("CHAT_TOKEN"),
        "a 401 explains that the token is what to check: {stderr}"
    );
    assert!(
        !stderr.contains("not-the-s3cret"),
        "the token is never printed: {stderr}"
    );
}

#[test]
fn a_403_says_to_check_the_origin_and_origin_sets_it() {
    let relay = Relay::start(&[("ALLOWED_ORIGINS", "https://app.example")]);
    let out = smoke(&[&base(&relay)], Some(&relay.token));
    assert_eq!(out.status.code(), Some(4), "{}", describe(&out));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for hint in [
        "403",
        "Origin",
        &format!("http://127.0.0.1:{}", relay.port()),
        "--origin",
        "ALLOWED_ORIGINS",
    ] {
        assert!(
            stderr.contains(hint),
            "a 403 explanation names {hint}: {stderr}"
        );
    }
    let out = smoke(
        &[&base(&relay), "--origin", "https://app.example"],
        Some(&relay.token),
    );
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
}

#[tokio::test]
async fn a_full_relay_is_unavailable_and_exits_5() {
    let relay = Relay::start(&[("MAX_CONNECTIONS", "1")]);
    let (_holder, _, _) = Client::join(&relay, "holder", "full").await;
    let out = smoke(&[&base(&relay)], Some(&relay.token));
    assert_eq!(out.status.code(), Some(5), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("503"),
        "{}",
        describe(&out)
    );
}

#[test]
fn a_round_trip_that_fails_exits_1_with_the_relays_answer() {
    // The smoke message (a 42-character marker) is longer than MAX_TEXT_CHARS: `too_large`.
    let relay = Relay::start(&[("MAX_TEXT_CHARS", "10")]);
    let out = smoke(&[&base(&relay)], Some(&relay.token));
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("too_large"),
        "{}",
        describe(&out)
    );
}

#[test]
fn nothing_listening_exits_3() {
    let port = {
        let relay = Relay::start(&[]);
        relay.port()
    };
    let out = smoke(
        &[&format!("http://127.0.0.1:{port}"), "--timeout-ms", "3000"],
        Some("x"),
    );
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
}

#[test]
fn usage_errors_exit_2_and_help_documents_flags_and_exit_codes() {
    let out = smoke(&[], None);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let out = smoke(&["ftp://example.com"], None);
    assert_eq!(out.status.code(), Some(2), "{}", describe(&out));
    let out = smoke(&["--help"], None);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let help = String::from_utf8_lossy(&out.stdout);
    for part in [
        "--token",
        "CHAT_TOKEN",
        "--origin",
        "--room",
        "--name",
        "--ca-file",
        "--timeout-ms",
        "Exit codes",
        "0 ",
        "1 ",
        "2 ",
        "3 ",
        "4 ",
        "5 ",
    ] {
        assert!(help.contains(part), "--help documents {part:?}:\n{help}");
    }
}

#[tokio::test]
async fn speaks_wss_through_a_tls_proxy_trusting_a_ca_file() {
    let relay = Relay::start(&[("ALLOWED_ORIGINS", "*")]);
    let certs = TestCertificates::make();
    let nginx = Nginx::start_tls(&[relay.port()], &certs.certificate(), &certs.key());
    let ca = certs.ca().display().to_string();
    let (mut watcher, _, _) = Client::join(&relay, "watcher", "tls").await;
    for url in [
        format!("https://localhost:{}", nginx.tls_port()),
        format!("wss://127.0.0.1:{}/chat", nginx.tls_port()),
    ] {
        let out = smoke(
            &[&url, "--ca-file", &ca, "--room", "tls"],
            Some(&relay.token),
        );
        assert_eq!(out.status.code(), Some(0), "{url}: {}", describe(&out));
        let seen = watcher.next_message(Duration::from_secs(5)).await;
        assert_eq!(seen["from"], "smoke", "{seen}");
    }
    // Without the CA the proxy's certificate is not trusted: unreachable, and it says why.
    let url = format!("https://localhost:{}", nginx.tls_port());
    let out = smoke(&[&url, "--room", "tls"], Some(&relay.token));
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("certificate"),
        "{}",
        describe(&out)
    );
}

#[tokio::test]
async fn readyz_mode_is_0_while_ready_5_while_shutting_down_and_3_when_gone() {
    let mut relay = Relay::start(&[("LAME_DUCK_MS", "2000")]);
    let out = smoke(&[&base(&relay), "--readyz"], None);
    assert_eq!(out.status.code(), Some(0), "{}", describe(&out));
    let (_ada, _, _) = Client::join(&relay, "ada", "ready").await;
    relay.signal(libc::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    let out = loop {
        let out = smoke(&[&base(&relay), "--readyz"], None);
        if out.status.code() != Some(0) || std::time::Instant::now() >= deadline {
            break out;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        out.status.code(),
        Some(5),
        "while draining: {}",
        describe(&out)
    );
    let port = relay.port();
    relay
        .wait_for_exit(Duration::from_secs(15))
        .await
        .expect("exits");
    let out = smoke(&[&format!("http://127.0.0.1:{port}"), "--readyz"], None);
    assert_eq!(out.status.code(), Some(3), "{}", describe(&out));
}
