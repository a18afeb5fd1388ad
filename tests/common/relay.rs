//! The relay process: start the real `roomcast` binary on a loopback port, read its startup line,
//! keep its stderr, signal it, restart it on the same port, kill it on drop.
//!
//! It does not speak WebSocket or HTTP (see `client`, `raw`, `http`) nor parse `/metrics` (see
//! `metrics`).

use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::process::{kill_and_reap, send_signal, spawn_tied, CapturedLines};
use super::tls::ServerCert;
use super::{STARTUP_TIMEOUT, TOKEN, WAIT};

/// Every setting the relay reads from the environment; cleared before each start so the test
/// process's own environment cannot leak into a test.
pub const RELAY_ENV: &[&str] = &[
    "HOST",
    "PORT",
    "CHAT_TOKEN",
    "ALLOWED_ORIGINS",
    "RATE_LIMIT",
    "RATE_WINDOW_MS",
    "HISTORY_LIMIT",
    "MAX_TEXT_CHARS",
    "MAX_PAYLOAD_BYTES",
    "HEARTBEAT_MS",
    "MAX_CONNECTIONS",
    "ABUSE_LIMIT",
    "ABUSE_WINDOW_MS",
    "OUTBOX_MAX_BYTES",
    "PRESENCE_INTERVAL_MS",
    "MAX_ROOMS",
    "SHUTDOWN_DRAIN_MS",
    "HANDSHAKE_TIMEOUT_MS",
    "CLOSE_TIMEOUT_MS",
    "SEND_BUFFER_BYTES",
    "WORKER_THREADS",
    "CONTROL_FRAME_LIMIT",
    "CONTROL_FRAME_WINDOW_MS",
    "WRITE_STALL_MS",
    "OUTBOX_TOTAL_MAX_BYTES",
    "FRAME_TIMEOUT_MS",
    "PUBLISH_RATE_PER_ADDRESS",
    "TRUSTED_PROXIES",
    "HISTORY_MAX_BYTES",
    "INVALID_ROOM",
    "REDIS_URL",
    "REDIS_CLUSTER_NODES",
    "REDIS_TIMEOUT_MS",
    "REDIS_QUEUE_MAX_BYTES",
    "REDIS_KEY_TTL_SECS",
    "AUTH_TIMEOUT_MS",
    "MAX_ROOMS_PER_CONNECTION",
    "API_KEY",
    "JWT_SECRET",
    "MAX_CONNECTIONS_PER_IP",
    "MAX_HANDSHAKES_PER_SECOND",
    "FLUSH_DELAY_MS",
    "FLUSH_MIN_MEMBERS",
    "JWT_PUBLIC_KEY_FILE",
    "API_MAX_BODY_BYTES",
    "AUDIT_LOG",
    "AUDIT_QUEUE_MAX",
    "AUDIT_QUEUE_MAX_BYTES",
    "LAME_DUCK_MS",
    "SHUTDOWN_SPREAD_MS",
    "ADMIN_ADDR",
    "SERVE_PAGE",
    "LOG_FORMAT",
    "NO_COLOR",
    "LOG_LINES_PER_SECOND",
    "TLS_CERT_FILE",
    "TLS_KEY_FILE",
    "RUST_LOG",
];

/// Settings every relay started by the harness gets unless a test overrides them: loopback, any
/// port, and a shutdown without the lame-duck wait or spread closes (tests of those set them),
/// so a test that stops a relay does not wait for a load balancer that is not there.
pub const RELAY_TEST_DEFAULTS: &[(&str, &str)] = &[
    ("HOST", "127.0.0.1"),
    ("PORT", "0"),
    ("LAME_DUCK_MS", "0"),
    ("SHUTDOWN_SPREAD_MS", "0"),
];

/// Something that listens on a loopback address: a relay, a proxy in front of relays, or a bare
/// address. HTTP helpers and clients take any of them.
pub trait Endpoint {
    fn socket_addr(&self) -> SocketAddr;
}

impl Endpoint for SocketAddr {
    fn socket_addr(&self) -> SocketAddr {
        *self
    }
}

impl Endpoint for Relay {
    fn socket_addr(&self) -> SocketAddr {
        self.addr
    }
}

impl<T: Endpoint + ?Sized> Endpoint for &T {
    fn socket_addr(&self) -> SocketAddr {
        (**self).socket_addr()
    }
}

/// Path of the relay binary cargo built for these tests.
pub fn relay_binary() -> &'static str {
    env!("CARGO_BIN_EXE_roomcast")
}

/// How to start a relay: environment variables and flags on top of [`RELAY_TEST_DEFAULTS`] and
/// `CHAT_TOKEN=TOKEN`. A builder can start any number of relays with the same settings (nodes of
/// one cluster), and each relay keeps a copy to restart on its port.
#[derive(Debug, Clone, Default)]
pub struct RelayBuilder {
    envs: Vec<(String, String)>,
    unset: Vec<String>,
    args: Vec<String>,
    without_token: bool,
    /// Set by [`RelayBuilder::tls`]: how the harness itself reaches the relay (`/metrics`).
    tls_client: Option<Arc<rustls::ClientConfig>>,
}

impl RelayBuilder {
    pub fn env(mut self, key: &str, value: impl ToString) -> Self {
        self.envs.push((key.to_string(), value.to_string()));
        self
    }

    pub fn envs(mut self, pairs: &[(&str, &str)]) -> Self {
        for (k, v) in pairs {
            self.envs.push((k.to_string(), v.to_string()));
        }
        self
    }

    /// Leave `key` unset, even if the harness sets it by default (e.g. `HOST`).
    pub fn unset(mut self, key: &str) -> Self {
        self.unset.push(key.to_string());
        self
    }

    pub fn arg(mut self, arg: impl ToString) -> Self {
        self.args.push(arg.to_string());
        self
    }

    /// Serve TLS with this certificate (TLS_CERT_FILE, TLS_KEY_FILE); the harness reaches the
    /// relay's own endpoints (`/metrics`, `/healthz`) with `client`.
    pub fn tls(mut self, cert: &ServerCert, client: Arc<rustls::ClientConfig>) -> Self {
        self = self
            .env("TLS_CERT_FILE", cert.cert.display())
            .env("TLS_KEY_FILE", cert.key.display());
        self.tls_client = Some(client);
        self
    }

    /// Do not set CHAT_TOKEN: the relay runs with its default development token.
    pub fn without_token(mut self) -> Self {
        self.without_token = true;
        self
    }

    /// Start one relay on an ephemeral port; panics with its stderr if it does not come up.
    pub fn start(&self) -> Relay {
        match launch(self, None) {
            Ok(run) => Relay::from_run(run, self.clone()),
            Err(failure) => panic!("{failure}"),
        }
    }

    /// Start `n` relays with these settings, each on its own port.
    pub fn start_nodes(&self, n: usize) -> Vec<Relay> {
        (0..n).map(|_| self.start()).collect()
    }

    /// The token clients must present to relays started by this builder.
    fn token(&self) -> String {
        let mut token = if self.without_token {
            "dev-token".to_string()
        } else {
            TOKEN.to_string()
        };
        for (k, v) in &self.envs {
            if k == "CHAT_TOKEN" {
                token = v.clone();
            }
        }
        token
    }
}

/// What the startup line says.
#[derive(Debug, Clone)]
pub struct StartupLine {
    /// `http`, or `https` with direct TLS.
    pub scheme: String,
    pub addr: SocketAddr,
    pub max_connections: u64,
    pub open_file_limit: u64,
}

/// Parse `roomcast listening on http://127.0.0.1:PORT (max connections N, open-file limit M)`
/// (`https://` with direct TLS).
pub fn parse_startup_line(line: &str) -> Option<StartupLine> {
    let rest = line.strip_prefix("roomcast listening on ")?;
    let (scheme, rest) = rest.split_once("://")?;
    if scheme != "http" && scheme != "https" {
        return None;
    }
    let (addr, rest) = rest.split_once(" (max connections ")?;
    let addr: SocketAddr = addr.parse().ok()?;
    let (max, rest) = rest.split_once(", open-file limit ")?;
    let limit = rest.strip_suffix(')')?;
    Some(StartupLine {
        scheme: scheme.to_string(),
        addr,
        max_connections: max.parse().ok()?,
        open_file_limit: limit.parse().ok()?,
    })
}

/// One process of a relay (a restart makes a new one).
struct Run {
    child: Child,
    startup_line: String,
    startup: StartupLine,
    /// Every stdout line, the startup line first.
    stdout: CapturedLines,
    stderr: CapturedLines,
}

/// Why a relay did not come up; its Display says everything a failing test needs.
struct LaunchFailure {
    /// Set when the relay exited by itself (a setting error, a port it could not bind).
    exited: Option<ExitStatus>,
    message: String,
    stderr: String,
}

impl std::fmt::Display for LaunchFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} (exit status {:?}); stderr:\n{}",
            self.message, self.exited, self.stderr
        )
    }
}

/// Start one relay process with `builder`'s settings, on `port` if given (else an ephemeral one).
fn launch(builder: &RelayBuilder, port: Option<u16>) -> Result<Run, LaunchFailure> {
    let mut cmd = Command::new(relay_binary());
    for key in RELAY_ENV {
        cmd.env_remove(key);
    }
    cmd.envs(RELAY_TEST_DEFAULTS.iter().copied());
    if !builder.without_token {
        cmd.env("CHAT_TOKEN", TOKEN);
    }
    for (k, v) in &builder.envs {
        cmd.env(k, v);
    }
    for k in &builder.unset {
        cmd.env_remove(k);
    }
    if let Some(port) = port {
        cmd.env("PORT", port.to_string());
    }
    cmd.args(&builder.args);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_tied(cmd, libc::SIGKILL)
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", relay_binary()));
    let stderr = CapturedLines::capture(child.stderr.take().expect("stderr is piped"));
    let stdout = CapturedLines::capture(child.stdout.take().expect("stdout is piped"));

    // The relay is running but wrong: kill it (its exit status then says nothing).
    let fail = |child: &mut Child, message: String| {
        kill_and_reap(child);
        // Give the reader thread a moment to collect the last lines.
        std::thread::sleep(Duration::from_millis(100));
        LaunchFailure {
            exited: None,
            message: format!("{message}; killed it"),
            stderr: stderr.text(),
        }
    };
    // The first stdout line, or the process exiting first (then no line will come).
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    let startup_line = loop {
        if let Some(line) = stdout.wait_for_line(0, Duration::from_millis(50)) {
            break line;
        }
        if let Ok(Some(status)) = child.try_wait() {
            // It may have printed the line just before exiting.
            if let Some(line) = stdout.wait_for_line(0, Duration::from_millis(100)) {
                break line;
            }
            std::thread::sleep(Duration::from_millis(100));
            return Err(LaunchFailure {
                exited: Some(status),
                message: "relay exited before printing its startup line".into(),
                stderr: stderr.text(),
            });
        }
        if Instant::now() >= deadline {
            return Err(fail(
                &mut child,
                format!("relay printed no startup line within {STARTUP_TIMEOUT:?}"),
            ));
        }
    };
    let Some(startup) = parse_startup_line(&startup_line) else {
        return Err(fail(
            &mut child,
            format!(
                "first stdout line is not `roomcast listening on http[s]://HOST:PORT (max connections N, open-file limit M)`: {startup_line:?}"
            ),
        ));
    };
    Ok(Run {
        child,
        startup_line,
        startup,
        stdout,
        stderr,
    })
}

/// A running relay. The child process is killed when this is dropped; on a failing test its
/// stderr is printed.
pub struct Relay {
    /// The address from the startup line (the same across restarts).
    pub addr: SocketAddr,
    /// The startup line of the current process, as printed.
    pub startup_line: String,
    /// The connection cap the startup line reports.
    pub max_connections: u64,
    /// The open-file limit the startup line reports.
    pub open_file_limit: u64,
    /// `http`, or `https` when the relay serves TLS itself (TLS_CERT_FILE).
    pub scheme: String,
    /// The token clients must present.
    pub token: String,
    run: Run,
    builder: RelayBuilder,
    /// Stderr of the processes this relay ran before its last restart, oldest first.
    earlier_stderr: Vec<Vec<String>>,
}

impl Relay {
    /// Start a relay with [`RELAY_TEST_DEFAULTS`] and `CHAT_TOKEN=TOKEN` plus `envs`.
    pub fn start(envs: &[(&str, &str)]) -> Relay {
        Relay::builder().envs(envs).start()
    }

    pub fn builder() -> RelayBuilder {
        RelayBuilder::default()
    }

    fn from_run(run: Run, builder: RelayBuilder) -> Relay {
        Relay {
            addr: run.startup.addr,
            startup_line: run.startup_line.clone(),
            max_connections: run.startup.max_connections,
            open_file_limit: run.startup.open_file_limit,
            scheme: run.startup.scheme.clone(),
            token: builder.token(),
            run,
            builder,
            earlier_stderr: Vec::new(),
        }
    }

    /// The client configuration that reaches this relay over TLS (`None`: plain HTTP).
    pub fn tls_client(&self) -> Option<&Arc<rustls::ClientConfig>> {
        self.builder.tls_client.as_ref()
    }

    /// The settings this relay was started with (start more nodes like it).
    pub fn settings(&self) -> &RelayBuilder {
        &self.builder
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// An Origin in the relay's default allow-list (whatever ALLOWED_ORIGINS says): the page's
    /// own origin, `https://` for a relay that serves TLS.
    pub fn origin(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme, self.port())
    }

    pub fn pid(&self) -> u32 {
        self.run.child.id()
    }

    /// Query string for `/chat` with this relay's token.
    pub fn chat_query(&self, name: &str, room: &str) -> String {
        format!(
            "token={}&name={}&room={}",
            encode(&self.token),
            encode(name),
            encode(room)
        )
    }

    /// `ws://ADDR/chat?query`.
    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/chat?{query}", self.addr)
    }

    /// Everything the current relay process wrote to stderr so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.run.stderr.lines()
    }

    /// The current process's stderr as one string.
    pub fn logs(&self) -> String {
        self.run.stderr.text()
    }

    /// The admin listener's address from the relay's second stdout line (`roomcast admin
    /// listening on http://ADDR (...)`, printed with ADMIN_ADDR); panics if it does not come.
    pub fn admin_addr(&self) -> SocketAddr {
        let line = self
            .run
            .stdout
            .wait_for_line(1, STARTUP_TIMEOUT)
            .unwrap_or_else(|| {
                panic!(
                    "no second stdout line (ADMIN_ADDR set?); stderr:\n{}",
                    self.logs()
                )
            });
        line.strip_prefix("roomcast admin listening on http://")
            .and_then(|rest| rest.split(' ').next())
            .and_then(|addr| addr.parse().ok())
            .unwrap_or_else(|| panic!("not an admin listening line: {line:?}"))
    }

    /// Wait (without blocking other tasks) for a stderr line of the current process that
    /// contains `needle`, and return it; panics with the stderr after [`WAIT`].
    pub async fn wait_for_log(&self, needle: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(line) = self.stderr_lines().into_iter().find(|l| l.contains(needle)) {
                return line;
            }
            assert!(
                Instant::now() < deadline,
                "no stderr line with {needle:?} within {WAIT:?}; stderr:\n{}",
                self.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Stdout lines after the startup line.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.run.stdout.lines().into_iter().skip(1).collect()
    }

    /// Send a signal to the relay process; panics if it is gone.
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.pid();
        assert!(
            send_signal(pid, signal),
            "kill({pid}, {signal}) failed: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Has the process exited? (Non-blocking.)
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.run.child.try_wait().ok().flatten()
    }

    /// Wait (asynchronously, so other tasks keep running) for the process to exit.
    pub async fn wait_for_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Send SIGTERM and wait up to `timeout` for exit. Returns the exit status (None if it did not
    /// exit in time) and how long the exit took.
    pub async fn stop_with_sigterm(&mut self, timeout: Duration) -> (Option<ExitStatus>, Duration) {
        self.stop_with_signal(libc::SIGTERM, timeout).await
    }

    pub async fn stop_with_signal(
        &mut self,
        signal: libc::c_int,
        timeout: Duration,
    ) -> (Option<ExitStatus>, Duration) {
        let started = Instant::now();
        self.signal(signal);
        let status = self.wait_for_exit(timeout).await;
        (status, started.elapsed())
    }

    /// Start the relay again on the port it had, with the same settings, after its process exited
    /// (`stop_with_sigterm`, a crash). Retries for a few seconds if the port is briefly taken.
    /// Panics if the process is still running.
    pub fn start_again(&mut self) {
        assert!(
            self.try_exit_status().is_some(),
            "start_again: relay pid {} on port {} is still running; stop it first",
            self.pid(),
            self.port()
        );
        let port = self.port();
        let deadline = Instant::now() + Duration::from_secs(10);
        let run = loop {
            match launch(&self.builder, Some(port)) {
                Ok(run) => break run,
                Err(failure) if Instant::now() < deadline && failure.exited.is_some() => {
                    // Most likely the port is held for a moment (an outgoing connection using it as
                    // its local port); try again.
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(failure) => panic!("restarting the relay on port {port}: {failure}"),
            }
        };
        self.startup_line = run.startup_line.clone();
        self.max_connections = run.startup.max_connections;
        self.open_file_limit = run.startup.open_file_limit;
        let old = std::mem::replace(&mut self.run, run);
        self.earlier_stderr.push(old.stderr.lines());
    }

    /// Rolling restart of one node: SIGTERM, wait up to `drain_timeout` for the relay to drain
    /// and exit, then start it again on the same port. Returns how the old process exited.
    pub async fn restart(&mut self, drain_timeout: Duration) -> ExitStatus {
        let (status, took) = self.stop_with_sigterm(drain_timeout).await;
        let status = status.unwrap_or_else(|| {
            panic!(
                "relay on port {} did not exit within {took:?} of SIGTERM",
                self.port()
            )
        });
        self.start_again();
        status
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        kill_and_reap(&mut self.run.child);
        if std::thread::panicking() {
            std::thread::sleep(Duration::from_millis(50));
            for (i, earlier) in self.earlier_stderr.iter().enumerate() {
                let tail = &earlier[earlier.len().saturating_sub(30)..];
                eprintln!(
                    "---- relay stderr before restart {} (last {} of {} lines) ----",
                    i + 1,
                    tail.len(),
                    earlier.len()
                );
                for line in tail {
                    eprintln!("{line}");
                }
            }
            let lines = self.stderr_lines();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!("---- relay startup line: {}", self.startup_line);
            eprintln!(
                "---- relay stderr (last {} of {} lines) ----",
                tail.len(),
                lines.len()
            );
            for line in tail {
                eprintln!("{line}");
            }
            eprintln!("---- end of relay stderr ----");
        }
    }
}

/// Percent-encode a query value (everything except unreserved characters).
pub fn encode(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}
