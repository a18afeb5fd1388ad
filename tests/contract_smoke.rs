//! The smoke client: `roomcast-smoke URL` connects, publishes one message, waits for it to come
//! back and exits 0; otherwise it exits non-zero with a reason.

mod common;

use std::process::Output;
use std::time::Duration;

use common::*;

async fn run_smoke(url: &str, token: &str) -> Output {
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_roomcast-smoke"))
        .arg(url)
        .env("CHAT_TOKEN", token)
        .kill_on_drop(true)
        .output();
    tokio::time::timeout(Duration::from_secs(30), child)
        .await
        .expect("roomcast-smoke finished within 30 s")
        .expect("run roomcast-smoke")
}

#[tokio::test]
async fn smoke_client_exits_0_when_its_message_comes_back() {
    let relay = Relay::start(&[]);
    let out = run_smoke(&format!("http://127.0.0.1:{}", relay.port()), TOKEN).await;
    assert!(
        out.status.success(),
        "roomcast-smoke failed: {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn smoke_client_exits_non_zero_with_a_reason_when_refused() {
    let relay = Relay::start(&[]);
    let out = run_smoke(&format!("http://127.0.0.1:{}", relay.port()), "wrong-token").await;
    assert!(
        !out.status.success(),
        "wrong token must fail the smoke test"
    );
    assert!(
        !String::from_utf8_lossy(&out.stderr).trim().is_empty(),
        "a failing smoke test says why on stderr"
    );

    let port = relay.port();
    drop(relay);
    let out = run_smoke(&format!("http://127.0.0.1:{port}"), TOKEN).await;
    assert!(
        !out.status.success(),
        "no relay listening must fail the smoke test"
    );
}
