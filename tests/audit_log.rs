//! The audit log (`AUDIT_LOG=PATH` or `-`): opened at start (a path that cannot be opened stops
//! the start with its reason), reopened on SIGHUP (logrotate renames, then signals), flushed on
//! shutdown, never in the way of the relay's own stdout line. One JSON line per publish, with
//! `audit:true`, the message's fields, the sender and its address.
//!
//! The publish lines are written by the brokers before a message can be delivered, for both
//! client dialects and the server API; refused auths and server-side closes are written too.

mod common;

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::{json, Value};

/// Time allowed on top of SHUTDOWN_DRAIN_MS for the process to tear down.
const MARGIN: Duration = Duration::from_millis(2500);

fn audit_log(dir: &TempDir) -> PathBuf {
    dir.path().join("audit.log")
}

fn start_with_audit_log(path: &Path) -> Relay {
    Relay::builder()
        .env("AUDIT_LOG", path.display())
        .env("SHUTDOWN_DRAIN_MS", 2000)
        .start()
}

/// Every line of an audit log, each checked to be one JSON object marked `audit:true`.
fn audit_lines(text: &str) -> Vec<Value> {
    text.lines()
        .map(|line| {
            let v: Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("audit line is not JSON ({e}): {line:?}"));
            assert_eq!(v["audit"], true, "audit line without audit:true: {line}");
            assert!(v["ts"].is_string(), "audit line without ts: {line}");
            v
        })
        .collect()
}

fn file_lines(path: &Path) -> Vec<Value> {
    audit_lines(&std::fs::read_to_string(path).unwrap_or_default())
}

/// Poll until `path` exists.
async fn wait_for_file(path: &Path, within: Duration) {
    let deadline = Instant::now() + within;
    while !path.exists() {
        assert!(
            Instant::now() < deadline,
            "{} did not appear within {within:?}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Poll until `lines()` holds a publish line for `text`; returns it.
async fn wait_for_publish_line(
    what: &str,
    within: Duration,
    lines: impl Fn() -> Vec<Value>,
    text: &str,
) -> Value {
    let deadline = Instant::now() + within;
    loop {
        let all = lines();
        if let Some(line) = all
            .iter()
            .find(|v| v["event"] == "publish" && v["text"] == text)
        {
            return line.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no publish line for {text:?} in {what} within {within:?}; lines: {all:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn assert_no_audit_trouble(relay: &Relay) {
    let logs = relay.logs();
    for line in logs.lines() {
        assert!(
            !(line.contains("audit") && (line.contains("WARN") || line.contains("ERROR"))),
            "the audit log complained: {line}\n{logs}"
        );
    }
}

#[tokio::test]
async fn the_audit_log_is_created_at_start_and_the_relay_serves_as_usual() {
    let dir = TempDir::new("audit-start");
    let path = audit_log(&dir);
    let relay = start_with_audit_log(&path);
    assert!(
        path.exists(),
        "AUDIT_LOG={} was not created at start",
        path.display()
    );
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&path)
        .expect("stat the audit log")
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o007,
        0,
        "the audit log holds texts and addresses: nothing for others ({mode:o})"
    );

    let (mut ada, _, _) = Client::join(&relay, "ada", "lobby").await;
    ada.publish_and_wait("hello with an audit log").await;
    // Whatever is in the file is well-formed audit lines (nothing else is ever written there).
    tokio::time::sleep(Duration::from_millis(200)).await;
    file_lines(&path);
    let e = relay.scrape().await;
    assert_eq!(e.get0("roomcast_audit_queue_full_total", &[]), 0.0);
    assert_eq!(
        e.get0("roomcast_audit_errors_total", &[("op", "write")]),
        0.0
    );
    assert_eq!(
        e.get0("roomcast_audit_errors_total", &[("op", "open")]),
        0.0
    );
    assert!(e.get("roomcast_audit_queued_bytes", &[]).is_some());
    assert_no_audit_trouble(&relay);
}

#[test]
fn an_audit_log_that_cannot_be_opened_stops_the_start_with_a_clear_error() {
    let dir = TempDir::new("audit-bad-path");
    let path = dir.path().join("no-such-dir").join("audit.log");
    let mut cmd = Command::new(relay_binary());
    for key in RELAY_ENV {
        cmd.env_remove(key);
    }
    cmd.env("HOST", "127.0.0.1")
        .env("PORT", "0")
        .env("CHAT_TOKEN", TOKEN)
        .env("AUDIT_LOG", &path)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_tied(cmd, libc::SIGKILL).expect("start the relay");
    let stdout = CapturedLines::capture(child.stdout.take().expect("piped"));
    let stderr = CapturedLines::capture(child.stderr.take().expect("piped"));
    if !wait_for_child(&mut child, Duration::from_secs(10)) {
        kill_and_reap(&mut child);
        panic!(
            "the relay kept running with an audit log it cannot open; stdout:\n{}",
            stdout.text()
        );
    }
    let status = child.wait().expect("exit status");
    // The reader threads finish with the pipes.
    std::thread::sleep(Duration::from_millis(100));
    let err = stderr.text();
    assert!(!status.success(), "exit status {status:?}; stderr:\n{err}");
    assert!(
        stdout.lines().is_empty(),
        "no start line when the audit log cannot be opened: {:?}",
        stdout.lines()
    );
    for needle in [
        "AUDIT_LOG",
        path.to_str().expect("a UTF-8 temp path"),
        "No such file or directory",
    ] {
        assert!(
            err.contains(needle),
            "the error must name {needle:?}:\n{err}"
        );
    }
}

#[tokio::test]
async fn sighup_after_a_rename_makes_the_relay_write_a_new_file_at_the_path() {
    let dir = TempDir::new("audit-rotate");
    let path = audit_log(&dir);
    let rotated = dir.path().join("audit.log.1");
    let mut relay = start_with_audit_log(&path);
    std::fs::rename(&path, &rotated).expect("rotate the audit log");
    relay.signal(libc::SIGHUP);
    wait_for_file(&path, Duration::from_secs(5)).await;
    // And again: every SIGHUP reopens, none stops the relay.
    std::fs::rename(&path, dir.path().join("audit.log.2")).expect("rotate again");
    relay.signal(libc::SIGHUP);
    wait_for_file(&path, Duration::from_secs(5)).await;
    assert!(
        relay.try_exit_status().is_none(),
        "SIGHUP must not stop the relay"
    );
    let health = http_get(&relay, "/healthz", &[]).await;
    assert_eq!(health.status, 200);
    assert_eq!(
        metric(&relay, "roomcast_audit_errors_total", &[("op", "open")]).await,
        0.0
    );
    assert!(
        relay.logs().contains("reopening the audit log"),
        "{}",
        relay.logs()
    );
    assert_no_audit_trouble(&relay);
}

#[tokio::test]
async fn a_reopen_that_fails_is_counted_and_retried_and_the_relay_keeps_serving() {
    let dir = TempDir::new("audit-reopen-fails");
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).expect("mkdir logs");
    let path = logs.join("audit.log");
    let mut relay = start_with_audit_log(&path);
    // The log directory goes away, then logrotate (or someone) sends SIGHUP.
    std::fs::rename(&logs, dir.path().join("gone")).expect("move the log directory away");
    relay.signal(libc::SIGHUP);
    wait_for_metric(
        &relay,
        "roomcast_audit_errors_total",
        &[("op", "open")],
        WAIT,
        |v| v >= 1.0,
    )
    .await;
    assert!(
        relay.try_exit_status().is_none(),
        "a failed reopen must not stop the relay"
    );
    let (mut ada, _, _) = Client::join(&relay, "ada", "lobby").await;
    ada.publish_and_wait("still serving").await;
    // The directory is back: the writer opens the path again on its own (once a second).
    std::fs::create_dir(&logs).expect("mkdir logs again");
    wait_for_file(&path, Duration::from_secs(5)).await;
    let warned = relay
        .stderr_lines()
        .into_iter()
        .filter(|l| l.contains("reopening the audit log failed"))
        .count();
    assert!(
        (1..=2).contains(&warned),
        "a failing reopen is logged, but not once a second: {warned} warnings\n{}",
        relay.logs()
    );
}

#[tokio::test]
async fn sigterm_with_an_audit_log_drains_and_exits_0() {
    let dir = TempDir::new("audit-sigterm");
    let path = audit_log(&dir);
    let mut relay = start_with_audit_log(&path);
    let (mut ada, _, _) = Client::join(&relay, "ada", "lobby").await;
    ada.publish_and_wait("before the stop").await;
    let closed = tokio::spawn(async move { ada.expect_close(Duration::from_secs(15)).await });
    let drain = Duration::from_millis(2000);
    let (status, took) = relay.stop_with_sigterm(drain + MARGIN).await;
    let status = status.unwrap_or_else(|| panic!("no exit within {:?}", drain + MARGIN));
    assert!(status.success(), "exit status {status:?}\n{}", relay.logs());
    assert!(took <= drain + MARGIN, "exit took {took:?}");
    assert_eq!(closed.await.expect("close task"), Some(1001));
    file_lines(&path);
    assert_no_audit_trouble(&relay);
}

#[tokio::test]
async fn audit_log_dash_keeps_the_start_line_first_on_stdout() {
    // The harness fails the start unless the first stdout line is the start line.
    let relay = Relay::start(&[("AUDIT_LOG", "-")]);
    let (mut ada, _, _) = Client::join(&relay, "ada", "lobby").await;
    ada.publish_and_wait("to stdout").await;
    // A SIGHUP has nothing to reopen on stdout, and stops nothing.
    relay.signal(libc::SIGHUP);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let health = http_get(&relay, "/healthz", &[]).await;
    assert_eq!(health.status, 200);
    // Everything after the start line is audit lines.
    audit_lines(&relay.stdout_lines().join("\n"));
    assert_no_audit_trouble(&relay);
}

/// What a first-dialect publish looks like in the audit log.
fn assert_publish_line(line: &Value, message: &Value, request_id: Option<&str>) {
    let mut want = json!({
        "audit": true,
        "event": "publish",
        "type": "message",
        "id": message["id"],
        "room": message["room"],
        "seq": message["seq"],
        "from": message["from"],
        "userId": message["from"],
        "text": message["text"],
        "sentAt": message["sentAt"],
        "address": "127.0.0.1",
        "dialect": "query",
    });
    if let Some(r) = request_id {
        want["requestId"] = json!(r);
    }
    let mut got = line.clone();
    let ts = got
        .as_object_mut()
        .and_then(|o| o.remove("ts"))
        .expect("ts");
    assert!(
        humantime::parse_rfc3339(ts.as_str().unwrap_or_default()).is_ok(),
        "ts is RFC 3339: {ts}"
    );
    assert_eq!(got, want);
}

#[tokio::test]
async fn a_first_dialect_publish_is_written_as_one_audit_line() {
    let dir = TempDir::new("audit-publish");
    let path = audit_log(&dir);
    let relay = start_with_audit_log(&path);
    let (mut ada, _, _) = Client::join(&relay, "ada", "lobby").await;
    let message = ada.publish_and_wait("hi").await;
    let line = wait_for_publish_line(
        "the audit log",
        Duration::from_secs(1),
        || file_lines(&path),
        "hi",
    )
    .await;
    assert_publish_line(&line, &message, None);

    ada.send_json(&json!({"type": "message", "text": "with a request id", "requestId": "r1"}))
        .await;
    let message = ada
        .next_event_matching(EVENT_TIMEOUT, |e| {
            e["type"] == "message" && e["message"]["text"] == "with a request id"
        })
        .await["message"]
        .clone();
    let line = wait_for_publish_line(
        "the audit log",
        Duration::from_secs(1),
        || file_lines(&path),
        "with a request id",
    )
    .await;
    assert_publish_line(&line, &message, Some("r1"));
    assert!(
        metric(&relay, "roomcast_audit_lines_total", &[]).await >= 2.0,
        "lines written are counted"
    );
}

#[tokio::test]
async fn audit_log_dash_writes_publish_lines_to_stdout() {
    let relay = Relay::start(&[("AUDIT_LOG", "-")]);
    let (mut ada, _, _) = Client::join(&relay, "ada", "lobby").await;
    let message = ada.publish_and_wait("on stdout").await;
    let line = wait_for_publish_line(
        "stdout",
        Duration::from_secs(1),
        || audit_lines(&relay.stdout_lines().join("\n")),
        "on stdout",
    )
    .await;
    assert_publish_line(&line, &message, None);
}

#[tokio::test]
async fn sigterm_writes_every_audited_publish_before_the_exit() {
    let dir = TempDir::new("audit-flush");
    let path = audit_log(&dir);
    let mut relay = Relay::builder()
        .env("AUDIT_LOG", path.display())
        .env("SHUTDOWN_DRAIN_MS", 2000)
        .env("RATE_LIMIT", 1000)
        .start();
    let mut ada = Client::join_and_settle(&relay, "ada", "lobby").await;
    let texts: Vec<String> = (0..200).map(|i| format!("m{i}")).collect();
    for text in &texts {
        ada.publish(text).await;
    }
    // Every publish was delivered back, so every one was audited before its delivery...
    for text in &texts {
        ada.expect_message(text).await;
    }
    // ...and the stop comes at once, well within the writer's 100 ms.
    let (status, _) = relay
        .stop_with_sigterm(Duration::from_millis(2000) + MARGIN)
        .await;
    assert!(status.is_some_and(|s| s.success()), "{:?}", status);
    let published: Vec<Value> = file_lines(&path)
        .into_iter()
        .filter(|v| v["event"] == "publish")
        .map(|v| v["text"].clone())
        .collect();
    assert_eq!(published, texts, "every publish, in order, none twice");
}

/// Every source of a message is audited — a second-dialect chat and a server API publish — and
/// so are refused auths (401 in the first dialect, 4403 in the second) and server-side closes.
#[tokio::test]
async fn every_publish_refused_auth_and_server_close_is_audited() {
    let dir = TempDir::new("audit-sources");
    let path = audit_log(&dir);
    let relay = Relay::builder()
        .env("AUDIT_LOG", path.display())
        .env("API_KEY", "k")
        .start();
    let (mut chat, _) = Client::authed(&relay, &relay.token).await;
    chat.join_room("room:demo").await;
    chat.chat("room:demo", "from the second dialect", "r-2")
        .await;
    chat.expect_type("chat").await;
    let line = wait_for_publish_line(
        "the file",
        WAIT,
        || file_lines(&path),
        "from the second dialect",
    )
    .await;
    assert_eq!(line["dialect"], "auth", "{line}");
    assert_eq!(line["room"], "room:demo");
    assert_eq!(line["requestId"], "r-2");
    assert_eq!(line["seq"], 1);
    assert_eq!(line["address"], "127.0.0.1");

    let body = json!({"room": "room:demo", "text": "from the API", "from": "ci"}).to_string();
    let req = format!(
        "POST /api/publish HTTP/1.1\r\nHost: x\r\nConnection: close\r\nAuthorization: Bearer k\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let r = http_exchange(relay.addr, &req).await.expect("API call");
    assert_eq!(r.status, 200, "{}", r.body);
    let line = wait_for_publish_line("the file", WAIT, || file_lines(&path), "from the API").await;
    assert_eq!(
        (line["dialect"].as_str(), line["from"].as_str()),
        (Some("api"), Some("ci")),
        "{line}"
    );
    assert_eq!(line["id"], r.json()["id"]);

    // Refused auths: a wrong token at /chat (401) and a wrong token in the auth message (4403).
    let bad = Client::connect_query(&relay, "token=wrong&name=eve&room=lobby").await;
    assert!(matches!(bad, Err(ConnectError::Status(401))), "{bad:?}");
    let mut eve = Client::connect_root(&relay, None).await.expect("upgrade");
    eve.send_json(&json!({"type": "auth", "token": "wrong"}))
        .await;
    assert_eq!(eve.expect_close(WAIT).await, Some(4403));
    // A server-side close: an invalid message in the second dialect (1008).
    chat.send_text("{nope").await;
    assert_eq!(chat.expect_close(WAIT).await, Some(1008));

    let deadline = Instant::now() + WAIT;
    loop {
        let lines = file_lines(&path);
        let refused: Vec<(u64, &str)> = lines
            .iter()
            .filter(|l| l["event"] == "auth_refused")
            .map(|l| {
                (
                    l["status"].as_u64().unwrap_or(0),
                    l["dialect"].as_str().unwrap_or(""),
                )
            })
            .collect();
        let closed = lines.iter().any(|l| {
            l["event"] == "disconnect" && l["code"] == 1008 && l["reason"] == "invalid JSON"
        });
        if refused.contains(&(401, "query")) && refused.contains(&(4403, "auth")) && closed {
            for l in lines.iter().filter(|l| l["event"] == "auth_refused") {
                assert!(
                    !l.to_string().contains("wrong"),
                    "a token in the audit log: {l}"
                );
            }
            break;
        }
        assert!(Instant::now() < deadline, "missing audit lines: {lines:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A full audit queue refuses publishes with `unavailable`: nothing is delivered that was not
/// audited. The audit log is a FIFO that nobody reads, so the writer stalls once the pipe is
/// full and the (small) queue fills behind it.
#[tokio::test]
async fn a_full_audit_queue_refuses_publishes_and_delivers_nothing_unaudited() {
    let dir = TempDir::new("audit-full");
    let fifo = dir.path().join("audit.fifo");
    let status = Command::new("mkfifo").arg(&fifo).status().expect("mkfifo");
    assert!(status.success());
    // Hold the read end open (never reading), so the relay can open the write end.
    let _reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&fifo)
        .expect("open the FIFO's read end");
    let relay = Relay::builder()
        .env("AUDIT_LOG", fifo.display())
        .env("AUDIT_QUEUE_MAX", 4)
        .env("RATE_LIMIT", 100000)
        .env("PUBLISH_RATE_PER_ADDRESS", 0)
        .env("ABUSE_LIMIT", 100000)
        .start();
    let (mut sender, _, _) = Client::join(&relay, "ada", "lobby").await;
    let (mut watcher, _, _) = Client::join(&relay, "bob", "lobby").await;
    let text = "x".repeat(400);
    let mut accepted = 0u64;
    let mut refused = false;
    for i in 0..5000 {
        sender
            .send_json(&json!({"type": "message", "text": text, "requestId": format!("r{i}")}))
            .await;
        let answer = sender
            .next_event_matching(WAIT, |e| e["type"] == "ack" || e["type"] == "error")
            .await;
        if answer["type"] == "error" {
            assert_eq!(answer["code"], "unavailable", "{answer}");
            refused = true;
            break;
        }
        accepted += 1;
    }
    assert!(refused, "the audit queue never filled");
    assert!(
        metric(&relay, "roomcast_audit_queue_full_total", &[]).await >= 1.0,
        "the refusal is counted"
    );
    // The watcher got exactly the accepted messages: nothing unaudited was delivered.
    let mut seen = 0u64;
    while let Ok(e) = watcher.try_next_event(Duration::from_millis(500)).await {
        if e["type"] == "message" {
            seen += 1;
        }
    }
    assert_eq!(seen, accepted);
}
