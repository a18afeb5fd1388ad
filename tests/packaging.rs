//! The packaging in `deploy/` and the `Dockerfile`, checked with what runs here: the systemd
//! unit passes `systemd-analyze verify` and gives a stop more time than the relay takes; the
//! Dockerfile's HEALTHCHECK command, as written, tells a ready relay from a draining or gone one.
//! (Docker itself does not run on the machines this was written on: docs/DEPLOY.md says what
//! was and was not checked.)

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn read(path: &str) -> String {
    std::fs::read_to_string(repo_root().join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// `KEY=VALUE` of a unit file (the last one wins, as in systemd).
fn unit_value<'a>(unit: &'a str, key: &str) -> Option<&'a str> {
    unit.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.strip_prefix('='))
        .next_back()
}

#[test]
fn the_systemd_unit_verifies_and_outlasts_a_stop() {
    let analyze = "/usr/bin/systemd-analyze";
    assert!(
        std::path::Path::new(analyze).exists(),
        "{analyze} is missing: install the Debian package `systemd` (test.sh does)"
    );
    let unit = read("deploy/roomcast.service");
    // The unit names the installed path; verify runs against the binary these tests built.
    assert_eq!(
        unit_value(&unit, "ExecStart"),
        Some("/usr/local/bin/roomcast")
    );
    let dir = TempDir::new("roomcast-unit");
    let copy = dir.path().join("roomcast.service");
    std::fs::write(
        &copy,
        unit.replace(
            "ExecStart=/usr/local/bin/roomcast",
            &format!("ExecStart={}", relay_binary()),
        ),
    )
    .expect("write the unit");
    let out = Command::new(analyze)
        .arg("verify")
        .arg(&copy)
        .output()
        .expect("run systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "systemd-analyze verify: {said}");
    assert!(
        said.trim().is_empty(),
        "systemd-analyze verify has remarks: {said}"
    );

    let nofile: u64 = unit_value(&unit, "LimitNOFILE")
        .and_then(|v| v.parse().ok())
        .expect("LimitNOFILE=N");
    assert!(nofile >= 65_536, "LimitNOFILE={nofile}");
    let stop_secs: u64 = unit_value(&unit, "TimeoutStopSec")
        .and_then(|v| v.parse().ok())
        .expect("TimeoutStopSec=N");
    // LAME_DUCK_MS + SHUTDOWN_DRAIN_MS by default, from the relay's own --help.
    let help = String::from_utf8_lossy(
        &Command::new(relay_binary())
            .arg("--help")
            .output()
            .expect("roomcast --help")
            .stdout,
    )
    .into_owned();
    let default_of = |flag: &str| -> u64 {
        let at = help
            .find(flag)
            .unwrap_or_else(|| panic!("{flag} in --help"));
        help[at..]
            .split("[default: ")
            .nth(1)
            .and_then(|rest| rest.split(']').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("a default for {flag} in --help"))
    };
    let stop_ms = default_of("--lame-duck-ms") + default_of("--shutdown-drain-ms");
    assert!(
        stop_secs * 1000 > stop_ms,
        "TimeoutStopSec={stop_secs} must outlast a stop (LAME_DUCK_MS + SHUTDOWN_DRAIN_MS = {stop_ms} ms)"
    );
}

/// The shell command of the Dockerfile's HEALTHCHECK (`CMD ["/bin/sh", "-c", "..."]`).
fn healthcheck_command() -> String {
    let dockerfile = read("Dockerfile");
    let at = dockerfile
        .find("HEALTHCHECK")
        .expect("the Dockerfile has a HEALTHCHECK");
    let json = dockerfile[at..]
        .split("CMD ")
        .nth(1)
        .and_then(|rest| rest.lines().next())
        .expect("HEALTHCHECK ... CMD [...]");
    let argv: Vec<String> = serde_json::from_str(json).expect("CMD in JSON form");
    assert_eq!(&argv[..2], ["/bin/sh", "-c"], "{argv:?}");
    argv[2].clone()
}

#[tokio::test]
async fn the_dockerfile_healthcheck_is_healthy_only_while_the_relay_is_ready() {
    let command = healthcheck_command();
    assert!(
        command.contains("/readyz") || command.contains("--readyz"),
        "{command}"
    );
    let bin_dir = std::path::Path::new(relay_binary())
        .parent()
        .expect("target dir")
        .to_path_buf();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let check = |port: u16| {
        Command::new("/bin/sh")
            .args(["-c", &command])
            .env("PATH", &path)
            .env("PORT", port.to_string())
            .output()
            .expect("run the HEALTHCHECK command")
            .status
            .code()
    };
    let mut relay = Relay::start(&[("LAME_DUCK_MS", "3000")]);
    let port = relay.port();
    assert_eq!(check(port), Some(0), "healthy while ready");
    let (_ada, _, _) = Client::join(&relay, "ada", "docker").await;
    relay.signal(libc::SIGTERM);
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while check(port) == Some(0) {
        assert!(
            std::time::Instant::now() < deadline,
            "still healthy after SIGTERM"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        check(port),
        Some(1),
        "unhealthy (1, as docker expects) while draining"
    );
    relay
        .wait_for_exit(Duration::from_secs(15))
        .await
        .expect("the relay exits");
    assert_eq!(check(port), Some(1), "unhealthy once gone");
}
