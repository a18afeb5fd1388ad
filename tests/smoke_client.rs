//! `roomcast-smoke` against a real relay: exit 0 when its message comes back, non-zero with a
//! reason when the relay refuses it.

mod common;

use std::process::Command;

use common::Relay;

fn smoke(args: &[&str], token: &str) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_roomcast-smoke"))
        .args(args)
        .env("CHAT_TOKEN", token)
        .output()
        .expect("run roomcast-smoke")
}

#[test]
fn smoke_client_exits_0_when_its_message_comes_back() {
    let relay = Relay::start(&[]);
    let out = smoke(
        &[&format!("http://127.0.0.1:{}", relay.port())],
        &relay.token,
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "stdout {stdout} stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.starts_with("ok: smoke-"), "{stdout}");
}

#[test]
fn smoke_client_exits_non_zero_with_a_reason_when_refused() {
    let relay = Relay::start(&[]);
    let out = smoke(
        &[&format!("http://127.0.0.1:{}", relay.port())],
        "wrong-token",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("401"),
        "the reason names the refusal: {stderr}"
    );
}

#[test]
fn smoke_client_without_a_url_prints_usage_and_exits_2() {
    let out = smoke(&[], "unused");
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("usage"));
}
