//! The load harness (`roomcast-load`, the `loadtest/` workspace member) against real targets:
//! it refuses a target that is not on this machine unless the operator says it owns it
//! (`--i-own-the-target`), and it speaks `wss://` through a TLS-terminating nginx, trusting a
//! certificate the test makes (`--ca-file`).
//!
//! The harness binary is another package's, so cargo does not build it for these tests:
//! `cargo build -p roomcast-load` (test.sh's `cargo build --workspace --bins` does) first.

mod common;

use std::net::{IpAddr, UdpSocket};
use std::path::PathBuf;
use std::process::{Command, Output};

use common::*;
use serde_json::Value;

fn load_binary() -> PathBuf {
    let path = repo_root().join("target/debug/roomcast-load");
    assert!(
        path.exists(),
        "{} is missing: build it with `cargo build -p roomcast-load` (test.sh does)",
        path.display()
    );
    path
}

fn load(args: &[&str], token: &str) -> Output {
    Command::new(load_binary())
        .args(args)
        .env("CHAT_TOKEN", token)
        .env_remove("RUST_BACKTRACE")
        .output()
        .expect("run roomcast-load")
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The JSON line every scenario prints last.
fn result(out: &Output) -> Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .unwrap_or_else(|| panic!("no JSON result line: {}", describe(out)));
    serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

/// This machine's address on its default route, if it has one (no packet is sent).
fn non_loopback_address() -> Option<IpAddr> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[test]
fn a_target_off_this_machine_needs_i_own_the_target() {
    // TEST-NET-3: refused before any packet is sent.
    let out = load(
        &[
            "--url",
            "ws://203.0.113.9:8080/chat",
            "handshake",
            "--count",
            "1",
        ],
        "x",
    );
    assert!(!out.status.success(), "{}", describe(&out));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--i-own-the-target"),
        "the refusal names the flag: {}",
        describe(&out)
    );
}

#[test]
fn with_i_own_the_target_a_non_loopback_relay_is_loaded() {
    let Some(ip) = non_loopback_address() else {
        panic!("this test needs a non-loopback address on this machine to act as the remote relay");
    };
    let relay = Relay::builder()
        .env("HOST", "0.0.0.0")
        .env("ALLOWED_ORIGINS", "*")
        .start();
    let url = format!("ws://{ip}:{}/chat", relay.port());
    let out = load(
        &[
            "--url",
            &url,
            "--i-own-the-target",
            "handshake",
            "--count",
            "20",
            "--concurrency",
            "4",
        ],
        &relay.token,
    );
    assert!(out.status.success(), "{}", describe(&out));
    let r = result(&out);
    assert_eq!(r["handshakes_ok"], 20, "{r}");
}

#[test]
fn speaks_wss_through_a_tls_load_balancer_with_a_ca_file() {
    let relay = Relay::start(&[("ALLOWED_ORIGINS", "*"), ("RATE_LIMIT", "100000")]);
    let certs = TestCertificates::make();
    let nginx = Nginx::start_tls(&[relay.port()], &certs.certificate(), &certs.key());
    let url = format!("wss://localhost:{}/chat", nginx.tls_port());
    let ca = certs.ca().display().to_string();
    let out = load(
        &[
            "--url",
            &url,
            "--ca-file",
            &ca,
            "fanout",
            "--rooms",
            "2",
            "--members",
            "5",
            "--rate",
            "20",
            "--duration-ms",
            "2000",
        ],
        &relay.token,
    );
    assert!(out.status.success(), "{}", describe(&out));
    let r = result(&out);
    assert_eq!(r["connections_ok"], 10, "{r}");
    assert!(
        r["relay_pid"].is_null(),
        "the process on a wss:// port is the TLS proxy, not the relay: {r}"
    );
    assert_eq!(r["lost"], 0, "{r}");
    assert!(r["deliveries"].as_u64().is_some_and(|d| d >= 150), "{r}");

    // Without the CA, the proxy's certificate is not trusted: no connection joins.
    let out = load(
        &[
            "--url",
            &url,
            "handshake",
            "--count",
            "2",
            "--concurrency",
            "1",
        ],
        &relay.token,
    );
    let r = result(&out);
    assert_eq!(r["handshakes_ok"], 0, "{r}");
    assert!(
        r.to_string().contains("tls_"),
        "the failure reason names TLS: {r}"
    );
}

#[test]
fn heartbeat_pings_do_not_hold_up_a_run_and_long_phases_show_progress() {
    // Pings every 300 ms: the relay never goes a whole second without a frame, so a harness
    // that waited for "1 s without any frame" would wait its 30 s maximum before publishing.
    let started = std::time::Instant::now();
    let relay_bin = relay_binary();
    let out = load(
        &[
            "--spawn",
            "roomcast",
            "--relay-bin",
            relay_bin,
            "--relay-env",
            "HEARTBEAT_MS=300",
            "fanout",
            "--rooms",
            "2",
            "--members",
            "5",
            "--rate",
            "20",
            "--duration-ms",
            "6000",
        ],
        "unused",
    );
    let took = started.elapsed();
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        took < std::time::Duration::from_secs(25),
        "a 6 s fan-out took {took:?}: the harness waited for heartbeat pings to stop\n{}",
        describe(&out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("... publishing: 5 s of ~6 s"),
        "a phase longer than 5 s prints progress: {stderr}"
    );
    assert_eq!(result(&out)["lost"], 0);
}
