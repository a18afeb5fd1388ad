//! Logs that say what happened: every refused request is one info line (status, reason, peer;
//! never the token or the query string), in text or JSON (LOG_FORMAT), without ANSI escapes when
//! stderr is not a terminal or NO_COLOR is set, and a refusal flood is held to
//! LOG_LINES_PER_SECOND lines a second plus a count of the rest.

mod common;

use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::Value;

/// The refusals every format test makes: 401 (a wrong token that looks like a secret), 403 (a
/// foreign Origin, with the right token), 404 (an upgrade elsewhere, with the right token in the
/// query) and 503 (the relay is full, MAX_CONNECTIONS=1).
async fn refuse_four_ways(relay: &Relay) -> Client {
    let origin = relay.origin();
    let wrong = "/chat?token=wrong-s3cret-value&name=eve&room=r";
    assert_rejected(
        &upgrade_request(relay, wrong, Some(&origin)).await,
        401,
        "token",
    );
    let right = format!("/chat?{}", relay.chat_query("eve", "r"));
    let foreign = upgrade_request(relay, &right, Some("https://evil.example")).await;
    assert_rejected(&foreign, 403, "origin");
    let elsewhere = format!("/nope?{}", relay.chat_query("eve", "r"));
    assert_rejected(
        &upgrade_request(relay, &elsewhere, Some(&origin)).await,
        404,
        "path",
    );
    let (holder, _, _) = Client::join(relay, "holder", "r").await;
    assert_rejected(
        &upgrade_request(relay, &right, Some(&origin)).await,
        503,
        "full",
    );
    holder
}

/// Wait until the relay's stderr has `n` lines containing `needle`; returns every line.
async fn wait_for_lines(relay: &Relay, needle: &str, n: usize) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let lines = relay.stderr_lines();
        if lines.iter().filter(|l| l.contains(needle)).count() >= n {
            return lines;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} lines with {needle:?}; stderr:\n{}",
            lines.join("\n")
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_no_secrets(relay: &Relay, lines: &[String]) {
    for line in lines {
        for secret in [
            relay.token.as_str(),
            "wrong-s3cret-value",
            "token=",
            "name=eve",
        ] {
            assert!(
                !line.contains(secret),
                "a log line shows {secret:?}: {line}"
            );
        }
        assert!(
            !line.contains('\u{1b}'),
            "ANSI escape in a log line on a pipe: {line:?}"
        );
    }
}

#[tokio::test]
async fn text_logs_have_one_line_per_refusal_with_status_reason_and_peer_and_no_secrets() {
    let relay = Relay::start(&[("MAX_CONNECTIONS", "1"), ("LOG_FORMAT", "text")]);
    let _holder = refuse_four_ways(&relay).await;
    let lines = wait_for_lines(&relay, " refused ", 4).await;
    let refused: Vec<&String> = lines.iter().filter(|l| l.contains(" refused ")).collect();
    assert_eq!(refused.len(), 4, "{refused:#?}");
    for (status, reason, detail) in [
        ("401", "unauthorized", Some("detail=token_wrong")),
        (
            "403",
            "forbidden_origin",
            Some("detail=https://evil.example"),
        ),
        ("404", "not_found", Some("path=/nope")),
        ("503", "full", None),
    ] {
        let line = refused
            .iter()
            .find(|l| l.contains(&format!("status={status} ")))
            .unwrap_or_else(|| panic!("no refusal line with status {status}: {refused:#?}"));
        assert!(line.contains("INFO"), "{line}");
        assert!(line.contains("roomcast::access"), "{line}");
        assert!(line.contains(&format!("reason={reason}")), "{line}");
        assert!(line.contains("peer=127.0.0.1:"), "{line}");
        if let Some(detail) = detail {
            assert!(line.contains(detail), "{detail} in {line}");
        }
    }
    assert_no_secrets(&relay, &lines);
}

#[tokio::test]
async fn json_logs_are_one_object_per_line_with_the_refusal_fields() {
    let relay = Relay::start(&[("MAX_CONNECTIONS", "1"), ("LOG_FORMAT", "json")]);
    let _holder = refuse_four_ways(&relay).await;
    let lines = wait_for_lines(&relay, "\"refused\"", 4).await;
    assert_no_secrets(&relay, &lines);
    let objects: Vec<Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l}")))
        .collect();
    assert!(
        objects.iter().any(|o| o["message"] == "ready"),
        "the start is logged as JSON too: {lines:#?}"
    );
    for o in &objects {
        assert!(o["timestamp"].is_string() && o["level"].is_string(), "{o}");
    }
    let refused: Vec<&Value> = objects
        .iter()
        .filter(|o| o["message"] == "refused")
        .collect();
    let mut statuses: Vec<u64> = refused
        .iter()
        .filter_map(|o| o["status"].as_u64())
        .collect();
    statuses.sort();
    assert_eq!(statuses, [401, 403, 404, 503], "{refused:#?}");
    let forbidden = refused.iter().find(|o| o["status"] == 403).expect("403");
    assert_eq!(forbidden["reason"], "forbidden_origin");
    assert_eq!(forbidden["detail"], "https://evil.example");
    assert_eq!(forbidden["target"], "roomcast::access");
    assert!(forbidden["peer"]
        .as_str()
        .is_some_and(|p| p.starts_with("127.0.0.1:")));
    assert_eq!(forbidden["upgrade"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refusal_flood_is_held_to_log_lines_per_second_and_the_rest_are_counted() {
    const FLOOD: usize = 300;
    let relay = Relay::start(&[("LOG_LINES_PER_SECOND", "5")]);
    let started = Instant::now();
    let mut batch = Vec::new();
    for _ in 0..FLOOD {
        let relay_addr = relay.addr;
        let port = relay.port();
        let origin = relay.origin();
        batch.push(tokio::spawn(async move {
            let req = upgrade_head(port, "/chat?token=nope&name=x&room=r", Some(&origin));
            http_exchange(relay_addr, &req).await.map(|r| r.status)
        }));
        if batch.len() == 30 {
            for t in batch.drain(..) {
                assert_eq!(t.await.expect("task").expect("exchange"), 401);
            }
        }
    }
    for t in batch.drain(..) {
        assert_eq!(t.await.expect("task").expect("exchange"), 401);
    }
    let flood_secs = started.elapsed().as_secs();
    // Every refusal is either a line or counted in a summary line (written once a second).
    let deadline = Instant::now() + WAIT;
    let (lines, suppressed) = loop {
        let all = relay.stderr_lines();
        let lines = all.iter().filter(|l| l.contains(" refused ")).count();
        let suppressed: u64 = all
            .iter()
            .filter(|l| l.contains("access lines suppressed") && l.contains("kind=refused"))
            .map(|l| {
                l.split("suppressed=")
                    .nth(1)
                    .and_then(|rest| rest.split(' ').next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .unwrap_or_else(|| panic!("a summary line without a count: {l}"))
            })
            .sum();
        if lines as u64 + suppressed >= FLOOD as u64 || Instant::now() >= deadline {
            break (lines, suppressed);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        lines as u64 + suppressed,
        FLOOD as u64,
        "{lines} refusal lines + {suppressed} counted in summaries:\n{}",
        relay.logs()
    );
    assert!(
        lines as u64 <= 5 * (flood_secs + 2),
        "{lines} refusal lines for a flood of {FLOOD} over {flood_secs} s with LOG_LINES_PER_SECOND=5"
    );
    assert!(
        relay.logs().contains("by=unauthorized="),
        "the summary says what was refused:\n{}",
        relay.logs()
    );
}

#[tokio::test]
async fn limit_refusals_are_logged_with_their_reason_429_per_address_and_503_handshake_rate() {
    let relay = Relay::start(&[("MAX_CONNECTIONS_PER_IP", "1")]);
    let (_holder, _, _) = Client::join(&relay, "holder", "r").await;
    let path = format!("/chat?{}", relay.chat_query("second", "r"));
    assert_rejected(
        &upgrade_request(&relay, &path, Some(&relay.origin())).await,
        429,
        "per address",
    );
    let line = relay.wait_for_log("status=429").await;
    assert!(
        line.contains("reason=per_ip_limit") && line.contains("path=/chat"),
        "{line}"
    );

    let rate = Relay::start(&[("MAX_HANDSHAKES_PER_SECOND", "1")]);
    let path = format!("/chat?{}", rate.chat_query("a", "r"));
    let mut statuses = Vec::new();
    for _ in 0..5 {
        statuses.push(
            upgrade_request(&rate, &path, Some(&rate.origin()))
                .await
                .status,
        );
    }
    assert!(statuses.contains(&503), "{statuses:?}");
    let line = rate.wait_for_log("status=503").await;
    assert!(line.contains("reason=handshake_rate"), "{line}");
    assert_no_secrets(&rate, &rate.stderr_lines());
}

#[tokio::test]
async fn second_dialect_and_non_get_upgrade_refusals_are_logged_too() {
    let relay = Relay::start(&[]);
    // The second dialect's upgrade (GET /) from a foreign Origin: 403.
    let foreign = upgrade_head(relay.port(), "/", Some("https://evil.example"));
    let resp = http_exchange(relay.addr, &foreign).await.expect("exchange");
    assert_rejected(&resp, 403, "GET / from a foreign origin");
    let line = relay.wait_for_log("status=403").await;
    for part in [
        "reason=forbidden_origin",
        "path=/ ",
        "detail=https://evil.example",
    ] {
        assert!(line.contains(part), "{part} in {line}");
    }
    // An upgrade that is not a GET: 405.
    let post = upgrade_head(
        relay.port(),
        "/chat?token=s3cret-in-query",
        Some(&relay.origin()),
    )
    .replacen("GET ", "POST ", 1);
    let resp = http_exchange(relay.addr, &post).await.expect("exchange");
    assert_eq!(resp.status, 405, "{}", resp.head);
    let line = relay.wait_for_log("status=405").await;
    assert!(
        line.contains("reason=bad_handshake") && line.contains("detail=not_get"),
        "{line}"
    );
    assert_no_secrets(&relay, &relay.stderr_lines());
    assert!(
        !relay.logs().contains("s3cret-in-query"),
        "{}",
        relay.logs()
    );
}

/// A pseudo-terminal: (controller, device) file descriptors.
#[allow(unsafe_code)]
fn pty() -> (OwnedFd, OwnedFd) {
    let (mut controller, mut device) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the given pointers; the name, termios and
    // window size arguments may be null.
    let rc = unsafe {
        libc::openpty(
            &mut controller,
            &mut device,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(rc, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: openpty succeeded, so both are open descriptors that nothing else owns.
    unsafe {
        (
            OwnedFd::from_raw_fd(controller),
            OwnedFd::from_raw_fd(device),
        )
    }
}

/// Start the relay with stderr on a terminal and `envs`; what it wrote there by its ready line.
fn stderr_on_a_terminal(envs: &[(&str, &str)]) -> String {
    let (controller, device) = pty();
    let mut cmd = Command::new(relay_binary());
    for key in RELAY_ENV {
        cmd.env_remove(key);
    }
    cmd.envs(RELAY_TEST_DEFAULTS.iter().copied())
        .env("CHAT_TOKEN", TOKEN)
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(device));
    let mut child = spawn_tied(cmd, libc::SIGKILL).expect("start roomcast");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut terminal = std::fs::File::from(controller);
        let mut seen = Vec::new();
        let mut chunk = [0u8; 4096];
        while let Ok(n) = terminal.read(&mut chunk) {
            if n == 0 {
                break;
            }
            seen.extend_from_slice(&chunk[..n]);
            if String::from_utf8_lossy(&seen).contains("ready") {
                break;
            }
        }
        let _ = tx.send(String::from_utf8_lossy(&seen).into_owned());
    });
    let seen = rx.recv_timeout(STARTUP_TIMEOUT);
    kill_and_reap(&mut child);
    seen.unwrap_or_else(|_| panic!("no ready line on the terminal with {envs:?}"))
}

#[test]
fn colours_only_on_a_terminal_and_never_with_no_color() {
    let coloured = stderr_on_a_terminal(&[]);
    assert!(
        coloured.contains("\u{1b}["),
        "on a terminal the text format is coloured (so NO_COLOR has something to turn off): {coloured:?}"
    );
    for envs in [&[("NO_COLOR", "1")][..], &[("LOG_FORMAT", "json")][..]] {
        let plain = stderr_on_a_terminal(envs);
        assert!(plain.contains("ready"), "{plain:?}");
        assert!(
            !plain.contains('\u{1b}'),
            "{envs:?} on a terminal: {plain:?}"
        );
    }
}

/// Closes are logged from `connection.rs` (`roomcast::log::connection_closed`), once per
/// connection, when its close code is counted.
#[tokio::test]
async fn every_close_is_one_line_with_code_reason_room_age_and_peer() {
    let relay = Relay::start(&[]);
    let (ada, _, _) = Client::join(&relay, "ada", "closing-room").await;
    ada.close().await;
    let lines = wait_for_lines(&relay, " closed ", 1).await;
    let line = lines
        .iter()
        .find(|l| l.contains(" closed "))
        .expect("a close line");
    for part in [
        "code=1000",
        "reason=peer_closed",
        "by=peer",
        "room=closing-room",
        "age_ms=",
        "peer=127.0.0.1",
        "client_id=",
    ] {
        assert!(line.contains(part), "{part} in {line}");
    }
    assert_no_secrets(&relay, &lines);
}
