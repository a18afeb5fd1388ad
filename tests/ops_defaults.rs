//! Secure defaults, against the real binary: with the development token the relay serves
//! loopback only (HOST defaults to 127.0.0.1, and an explicit non-loopback HOST is refused at
//! start with a message saying what to set); the start line prints a URL that works; and
//! SERVE_PAGE=false turns off the demo page.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// This machine's address on its default route, if it has one (no packet is sent).
fn non_loopback_address() -> Option<IpAddr> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test]
async fn with_the_development_token_host_defaults_to_loopback() {
    let relay = Relay::builder().unset("HOST").without_token().start();
    assert_eq!(
        relay.addr.ip().to_string(),
        "127.0.0.1",
        "{}",
        relay.startup_line
    );
    relay
        .wait_for_log(&format!("addr=127.0.0.1:{}", relay.port()))
        .await;
    // It says why, and what to set.
    relay.wait_for_log("development token").await;
    // Not reachable from this machine's network address (when it has one).
    if let Some(ip) = non_loopback_address() {
        let outside = SocketAddr::new(ip, relay.port());
        let attempt = tokio::time::timeout(
            Duration::from_secs(2),
            tokio::net::TcpStream::connect(outside),
        )
        .await;
        assert!(
            !matches!(attempt, Ok(Ok(_))),
            "a relay with the development token must not accept connections on {outside}"
        );
    }
}

#[tokio::test]
async fn with_a_token_host_defaults_to_every_address_and_the_start_line_url_works() {
    let relay = Relay::builder().unset("HOST").start();
    let line = parse_startup_line(&relay.startup_line).expect("startup line format");
    assert_eq!(
        line.addr.ip().to_string(),
        "127.0.0.1",
        "bound to 0.0.0.0, the start line shows a URL a browser can open, not http://0.0.0.0: {}",
        relay.startup_line
    );
    // With a token the relay binds every address.
    relay
        .wait_for_log(&format!("addr=0.0.0.0:{}", relay.port()))
        .await;
    // The URL it printed serves the page, and the page's Origin is allowed by default.
    let page = http_get(&relay, "/", &[]).await;
    assert_eq!(page.status, 200, "{}", page.head);
    let url_origin = format!("http://{}", line.addr);
    let mut client =
        Client::connect_with_origin(&relay, &relay.chat_query("ada", "start"), Some(&url_origin))
            .await
            .unwrap_or_else(|e| {
                panic!("an upgrade from the start line's origin {url_origin} failed: {e:?}")
            });
    client.expect_type("system").await;
    client.expect_type("history").await;
    client.publish_and_wait("hello").await;
    // Bound to every address: reachable on this machine's network address too.
    if let Some(ip) = non_loopback_address() {
        let outside = SocketAddr::new(ip, relay.port());
        let health = http_get(&outside, "/healthz", &[]).await;
        assert_eq!(health.status, 200, "{}", health.head);
    }
}

/// Run the relay with `envs` on top of a cleared environment; it must exit by itself within
/// 10 s. Returns the exit status and stderr.
fn run_until_exit(envs: &[(&str, &str)]) -> (std::process::ExitStatus, String, String) {
    let mut cmd = Command::new(relay_binary());
    for key in RELAY_ENV {
        cmd.env_remove(key);
    }
    cmd.env("PORT", "0")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_tied(cmd, libc::SIGKILL).expect("run roomcast");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let out = child.wait_with_output().expect("output");
            return (
                status,
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            );
        }
        if Instant::now() >= deadline {
            kill_and_reap(&mut child);
            panic!("{envs:?}: the relay kept running; it must refuse to start");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_non_loopback_host_with_the_development_token_is_refused_at_start() {
    for envs in [
        &[("HOST", "0.0.0.0")][..],
        &[("HOST", "::")][..],
        &[("HOST", "0.0.0.0"), ("CHAT_TOKEN", "dev-token")][..],
        &[("HOST", "192.0.2.2")][..],
    ] {
        let (status, stdout, stderr) = run_until_exit(envs);
        assert!(!status.success(), "{envs:?}: exit status {status:?}");
        assert!(
            !stdout.contains("listening"),
            "{envs:?}: no start line when refusing: {stdout}"
        );
        for hint in ["CHAT_TOKEN", "HOST=127.0.0.1", "development token"] {
            assert!(
                stderr.contains(hint),
                "{envs:?}: the refusal says what to set ({hint}):\n{stderr}"
            );
        }
    }
}

#[tokio::test]
async fn serve_page_false_turns_off_the_demo_page_but_not_the_client_module() {
    let relay = Relay::start(&[("SERVE_PAGE", "false")]);
    for path in ["/", "/index.html", "/app.js"] {
        let resp = http_get(&relay, path, &[]).await;
        assert_eq!(
            resp.status, 404,
            "{path} with SERVE_PAGE=false: {}",
            resp.head
        );
    }
    let module = http_get(&relay, "/roomcast-client.js", &[]).await;
    assert_eq!(module.status, 200, "{}", module.head);
    let (mut client, _, _) = Client::join(&relay, "ada", "nopage").await;
    client.publish_and_wait("still a relay").await;

    let with_page = Relay::start(&[("SERVE_PAGE", "true")]);
    for path in ["/", "/app.js"] {
        let resp = http_get(&with_page, path, &[]).await;
        assert_eq!(
            resp.status, 200,
            "{path} with SERVE_PAGE=true: {}",
            resp.head
        );
    }
}
