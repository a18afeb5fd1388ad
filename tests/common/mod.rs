//! Harness for the contract tests: start the real `roomcast` binary on an ephemeral port and talk
//! to it over real sockets.
//!
//! - [`Relay`] owns the child process (killed on drop; `stop_with_signal` for shutdown tests) and
//!   keeps its stderr so a failing test prints what the relay logged.
//! - [`Client`] is a JSON-event client over tokio-tungstenite (answers pings automatically).
//! - [`RawClient`] writes the HTTP upgrade and every frame by hand, for frame-level tests and for
//!   clients that misbehave on purpose (never read, never answer pings).
//! - [`http_get`] / [`upgrade_request`] send plain HTTP over TCP; [`metric`] scrapes `/metrics`.
//!
//! Every wait is bounded by a timeout; helpers panic with a message saying what was expected.
#![allow(dead_code)]

mod services;
#[allow(unused_imports)]
pub use services::*;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// Token every relay started by [`Relay::start`] requires (unless a test overrides CHAT_TOKEN).
pub const TOKEN: &str = "contract-test-token";
/// Default bound on waiting for one event.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Bound on the relay printing its startup line.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(20);
/// Bound on one plain HTTP exchange.
pub const HTTP_TIMEOUT: Duration = Duration::from_secs(5);

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
    "REDIS_TIMEOUT_MS",
    "REDIS_QUEUE_MAX_BYTES",
    "REDIS_KEY_TTL_SECS",
    "RUST_LOG",
];

// ---------------------------------------------------------------------------------------------
// The relay process
// ---------------------------------------------------------------------------------------------

/// Path of the relay binary cargo built for these tests.
pub fn relay_binary() -> &'static str {
    env!("CARGO_BIN_EXE_roomcast")
}

/// How to start a relay: environment variables and flags on top of `HOST=127.0.0.1 PORT=0
/// CHAT_TOKEN=TOKEN`.
#[derive(Debug, Clone, Default)]
pub struct RelayBuilder {
    envs: Vec<(String, String)>,
    args: Vec<String>,
    without_token: bool,
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

    pub fn arg(mut self, arg: impl ToString) -> Self {
        self.args.push(arg.to_string());
        self
    }

    /// Do not set CHAT_TOKEN: the relay runs with its default development token.
    pub fn without_token(mut self) -> Self {
        self.without_token = true;
        self
    }

    pub fn start(self) -> Relay {
        let mut cmd = Command::new(relay_binary());
        for key in RELAY_ENV {
            cmd.env_remove(key);
        }
        cmd.env("HOST", "127.0.0.1").env("PORT", "0");
        let mut token = if self.without_token {
            "dev-token".to_string()
        } else {
            TOKEN.to_string()
        };
        if !self.without_token {
            cmd.env("CHAT_TOKEN", TOKEN);
        }
        for (k, v) in &self.envs {
            if k == "CHAT_TOKEN" {
                token = v.clone();
            }
            cmd.env(k, v);
        }
        cmd.args(&self.args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", relay_binary()));

        let stderr_lines = Arc::new(Mutex::new(Vec::<String>::new()));
        {
            let stderr = child.stderr.take().expect("stderr is piped");
            let lines = Arc::clone(&stderr_lines);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stderr);
                let mut raw = Vec::new();
                loop {
                    raw.clear();
                    match reader.read_until(b'\n', &mut raw) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => lines
                            .lock()
                            .expect("stderr lock")
                            .push(String::from_utf8_lossy(&raw).trim_end().to_string()),
                    }
                }
            });
        }

        let stdout_rest = Arc::new(Mutex::new(Vec::<String>::new()));
        let (first_tx, first_rx) = mpsc::channel::<String>();
        {
            let stdout = child.stdout.take().expect("stdout is piped");
            let rest = Arc::clone(&stdout_rest);
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stdout);
                let mut first = true;
                let mut raw = Vec::new();
                loop {
                    raw.clear();
                    match reader.read_until(b'\n', &mut raw) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let line = String::from_utf8_lossy(&raw).trim_end().to_string();
                            if first {
                                first = false;
                                let _ = first_tx.send(line);
                            } else {
                                rest.lock().expect("stdout lock").push(line);
                            }
                        }
                    }
                }
            });
        }

        let startup_line = match first_rx.recv_timeout(STARTUP_TIMEOUT) {
            Ok(line) => line,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                std::thread::sleep(Duration::from_millis(100));
                let log = stderr_lines.lock().expect("stderr lock").join("\n");
                panic!(
                    "relay printed no startup line within {STARTUP_TIMEOUT:?} (exit status {status:?}); stderr:\n{log}"
                );
            }
        };
        let startup = parse_startup_line(&startup_line).unwrap_or_else(|| {
            let _ = child.kill();
            panic!(
                "first stdout line is not `roomcast listening on http://HOST:PORT (max connections N, open-file limit M)`: {startup_line:?}"
            )
        });
        Relay {
            child: Some(child),
            addr: startup.addr,
            startup_line,
            max_connections: startup.max_connections,
            open_file_limit: startup.open_file_limit,
            token,
            stderr: stderr_lines,
            stdout_rest,
        }
    }
}

/// What the startup line says.
#[derive(Debug, Clone)]
pub struct StartupLine {
    pub addr: SocketAddr,
    pub max_connections: u64,
    pub open_file_limit: u64,
}

/// Parse `roomcast listening on http://127.0.0.1:PORT (max connections N, open-file limit M)`.
pub fn parse_startup_line(line: &str) -> Option<StartupLine> {
    let rest = line.strip_prefix("roomcast listening on http://")?;
    let (addr, rest) = rest.split_once(" (max connections ")?;
    let addr: SocketAddr = addr.parse().ok()?;
    let (max, rest) = rest.split_once(", open-file limit ")?;
    let limit = rest.strip_suffix(')')?;
    Some(StartupLine {
        addr,
        max_connections: max.parse().ok()?,
        open_file_limit: limit.parse().ok()?,
    })
}

/// A running relay. The child process is killed when this is dropped.
pub struct Relay {
    child: Option<Child>,
    pub addr: SocketAddr,
    pub startup_line: String,
    pub max_connections: u64,
    pub open_file_limit: u64,
    /// The token clients must present.
    pub token: String,
    stderr: Arc<Mutex<Vec<String>>>,
    stdout_rest: Arc<Mutex<Vec<String>>>,
}

impl Relay {
    /// Start a relay with `HOST=127.0.0.1 PORT=0 CHAT_TOKEN=TOKEN` plus `envs`.
    pub fn start(envs: &[(&str, &str)]) -> Relay {
        Relay::builder().envs(envs).start()
    }

    pub fn builder() -> RelayBuilder {
        RelayBuilder::default()
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// An Origin in the relay's default allow-list.
    pub fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port())
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("relay is running").id()
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

    /// Everything the relay wrote to stderr so far.
    pub fn stderr_lines(&self) -> Vec<String> {
        self.stderr.lock().expect("stderr lock").clone()
    }

    /// Stdout lines after the startup line.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout_rest.lock().expect("stdout lock").clone()
    }

    /// Send a signal to the relay process.
    #[allow(unsafe_code)]
    pub fn signal(&self, signal: libc::c_int) {
        let pid = self.pid() as libc::pid_t;
        // SAFETY: kill(2) with the pid of a child we spawned and still own (not yet reaped).
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(
            rc,
            0,
            "kill({pid}, {signal}) failed: {}",
            std::io::Error::last_os_error()
        );
    }

    /// Has the process exited? (Non-blocking.)
    pub fn try_exit_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
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
}

impl Drop for Relay {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            std::thread::sleep(Duration::from_millis(50));
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

// ---------------------------------------------------------------------------------------------
// JSON-event WebSocket client
// ---------------------------------------------------------------------------------------------

/// Why a read did not produce an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsEnd {
    Timeout,
    /// The relay sent a close frame with this code (None: no code).
    Closed(Option<u16>),
    /// The stream ended without a close frame.
    Eof,
    Error(String),
    /// A non-JSON or binary data frame arrived.
    NotJson(String),
}

/// Why a connection attempt failed.
#[derive(Debug)]
pub enum ConnectError {
    /// The relay answered the upgrade with this HTTP status.
    Status(u16),
    Other(String),
}

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A tungstenite client that reads JSON events. Pings are answered automatically while reading.
pub struct Client {
    pub ws: Ws,
    pub name: String,
    pub room: String,
    /// Pings received from the relay so far.
    pub pings_seen: usize,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("name", &self.name)
            .field("room", &self.room)
            .finish()
    }
}

impl Client {
    /// Connect with this relay's token and a good Origin; panics if the upgrade fails.
    pub async fn connect(relay: &Relay, name: &str, room: &str) -> Client {
        let mut client = Client::connect_query(relay, &relay.chat_query(name, room))
            .await
            .unwrap_or_else(|e| panic!("connect as {name:?} to room {room:?} failed: {e:?}"));
        client.name = name.to_string();
        client.room = room.to_string();
        client
    }

    /// Connect with an explicit query string (no leading `?`) and the relay's default Origin.
    pub async fn connect_query(relay: &Relay, query: &str) -> Result<Client, ConnectError> {
        Client::connect_with_origin(relay, query, Some(&relay.origin())).await
    }

    pub async fn connect_with_origin(
        relay: &Relay,
        query: &str,
        origin: Option<&str>,
    ) -> Result<Client, ConnectError> {
        let url = format!("ws://127.0.0.1:{}/chat?{}", relay.port(), query);
        let mut request = url
            .into_client_request()
            .map_err(|e| ConnectError::Other(e.to_string()))?;
        if let Some(origin) = origin {
            request.headers_mut().insert(
                "Origin",
                HeaderValue::from_str(origin).map_err(|e| ConnectError::Other(e.to_string()))?,
            );
        }
        let attempt =
            tokio::time::timeout(EVENT_TIMEOUT, tokio_tungstenite::connect_async(request)).await;
        match attempt {
            Err(_) => Err(ConnectError::Other("upgrade timed out".into())),
            Ok(Err(tungstenite::Error::Http(response))) => {
                Err(ConnectError::Status(response.status().as_u16()))
            }
            Ok(Err(e)) => Err(ConnectError::Other(e.to_string())),
            Ok(Ok((ws, _response))) => Ok(Client {
                ws,
                name: String::new(),
                room: String::new(),
                pings_seen: 0,
            }),
        }
    }

    /// Connect and read the `system` and `history` events that open every connection.
    pub async fn join(relay: &Relay, name: &str, room: &str) -> (Client, Value, Value) {
        let mut client = Client::connect(relay, name, room).await;
        client.name = name.to_string();
        client.room = room.to_string();
        let system = client.next_event(EVENT_TIMEOUT).await;
        assert_eq!(
            system["type"], "system",
            "first event must be system, got {system}"
        );
        let history = client.next_event(EVENT_TIMEOUT).await;
        assert_eq!(
            history["type"], "history",
            "second event must be history, got {history}"
        );
        (client, system, history)
    }

    /// Join and also wait for the presence event announcing this client (so later presence
    /// events are about others).
    pub async fn join_and_settle(relay: &Relay, name: &str, room: &str) -> Client {
        let (mut client, _, _) = Client::join(relay, name, room).await;
        let expected = format!("{name} joined");
        client
            .next_event_matching(EVENT_TIMEOUT, |e| {
                e["type"] == "presence"
                    && e["message"].as_str().is_some_and(|m| m.contains(&expected))
            })
            .await;
        client
    }

    /// Next JSON event, or why there is none.
    pub async fn try_next_event(&mut self, timeout: Duration) -> Result<Value, WsEnd> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Err(WsEnd::Timeout),
                Ok(next) => next,
            };
            match next {
                None => return Err(WsEnd::Eof),
                Some(Err(tungstenite::Error::ConnectionClosed))
                | Some(Err(tungstenite::Error::AlreadyClosed)) => return Err(WsEnd::Eof),
                Some(Err(e)) => return Err(WsEnd::Error(e.to_string())),
                Some(Ok(Message::Text(text))) => {
                    return serde_json::from_str(text.as_str())
                        .map_err(|_| WsEnd::NotJson(text.as_str().to_string()))
                }
                Some(Ok(Message::Binary(b))) => {
                    return Err(WsEnd::NotJson(format!("binary frame of {} bytes", b.len())))
                }
                Some(Ok(Message::Ping(_))) => self.pings_seen += 1,
                Some(Ok(Message::Pong(_))) | Some(Ok(Message::Frame(_))) => {}
                Some(Ok(Message::Close(frame))) => {
                    // Drive tungstenite's automatic close reply out to the socket.
                    let _ = tokio::time::timeout(Duration::from_millis(500), self.ws.next()).await;
                    return Err(WsEnd::Closed(frame.map(|f| u16::from(f.code))));
                }
            }
        }
    }

    /// Next JSON event; panics on timeout or close.
    pub async fn next_event(&mut self, timeout: Duration) -> Value {
        match self.try_next_event(timeout).await {
            Ok(v) => v,
            Err(end) => panic!(
                "[{}] expected an event within {timeout:?}, got {end:?}",
                self.name
            ),
        }
    }

    /// Next event whose `type` is `ty`, skipping others; or why there is none.
    pub async fn try_next_event_of_type(
        &mut self,
        ty: &str,
        timeout: Duration,
    ) -> Result<Value, WsEnd> {
        self.try_next_event_matching(timeout, |e| e["type"] == ty)
            .await
    }

    /// Next event whose `type` is `ty`, skipping others; panics on timeout or close.
    pub async fn next_event_of_type(&mut self, ty: &str, timeout: Duration) -> Value {
        match self.try_next_event_of_type(ty, timeout).await {
            Ok(v) => v,
            Err(end) => panic!(
                "[{}] expected a {ty:?} event within {timeout:?}, got {end:?}",
                self.name
            ),
        }
    }

    pub async fn try_next_event_matching(
        &mut self,
        timeout: Duration,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> Result<Value, WsEnd> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let event = self.try_next_event(left).await?;
            if pred(&event) {
                return Ok(event);
            }
        }
    }

    pub async fn next_event_matching(
        &mut self,
        timeout: Duration,
        pred: impl FnMut(&Value) -> bool,
    ) -> Value {
        match self.try_next_event_matching(timeout, pred).await {
            Ok(v) => v,
            Err(end) => panic!(
                "[{}] expected a matching event within {timeout:?}, got {end:?}",
                self.name
            ),
        }
    }

    /// Next `message` event's inner `message` object.
    pub async fn next_message(&mut self, timeout: Duration) -> Value {
        let event = self.next_event_of_type("message", timeout).await;
        event["message"].clone()
    }

    /// Next `error` event; panics if another data event (message, ack) comes first.
    pub async fn next_error(&mut self, timeout: Duration) -> Value {
        let event = self
            .next_event_matching(timeout, |e| e["type"] != "presence")
            .await;
        assert_eq!(
            event["type"], "error",
            "[{}] expected an error event, got {event}",
            self.name
        );
        event
    }

    /// All events until `duration` passes; panics if the connection ends meanwhile.
    pub async fn stay_connected_for(&mut self, duration: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + duration;
        let mut events = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.try_next_event(left).await {
                Ok(e) => events.push(e),
                Err(WsEnd::Timeout) => return events,
                Err(end) => panic!(
                    "[{}] connection ended while it should stay open: {end:?}",
                    self.name
                ),
            }
        }
    }

    /// Read until the relay's close frame, skipping events; returns its code.
    pub async fn expect_close(&mut self, timeout: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.try_next_event(left).await {
                Ok(_) | Err(WsEnd::NotJson(_)) => continue,
                Err(WsEnd::Closed(code)) => return code,
                Err(end) => panic!(
                    "[{}] expected a close frame within {timeout:?}, got {end:?}",
                    self.name
                ),
            }
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text.to_string()))
            .await
            .unwrap_or_else(|e| panic!("[{}] send failed: {e}", self.name));
    }

    pub async fn send_json(&mut self, value: &Value) {
        self.send_text(&value.to_string()).await;
    }

    /// Send `{"type":"message","text":TEXT}`.
    pub async fn publish(&mut self, text: &str) {
        self.send_json(&json!({"type": "message", "text": text}))
            .await;
    }

    /// Publish and wait for our own copy; returns the inner message object.
    pub async fn publish_and_wait(&mut self, text: &str) -> Value {
        self.publish(text).await;
        let event = self
            .next_event_matching(EVENT_TIMEOUT, |e| {
                e["type"] == "message" && e["message"]["text"] == text
            })
            .await;
        event["message"].clone()
    }

    /// Graceful close with 1000.
    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

// ---------------------------------------------------------------------------------------------
// Raw TCP WebSocket client
// ---------------------------------------------------------------------------------------------

pub const OP_CONTINUATION: u8 = 0x0;
pub const OP_TEXT: u8 = 0x1;
pub const OP_BINARY: u8 = 0x2;
pub const OP_CLOSE: u8 = 0x8;
pub const OP_PING: u8 = 0x9;
pub const OP_PONG: u8 = 0xA;

/// The example key from RFC 6455 §1.3 and its accept value.
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// A frame received from the relay.
#[derive(Debug, Clone)]
pub struct RawFrame {
    pub fin: bool,
    pub rsv: u8,
    pub opcode: u8,
    pub masked: bool,
    pub payload: Vec<u8>,
}

impl RawFrame {
    pub fn close_code(&self) -> Option<u16> {
        (self.payload.len() >= 2).then(|| u16::from_be_bytes([self.payload[0], self.payload[1]]))
    }
}

/// Why a raw read produced no frame.
#[derive(Debug)]
pub enum RawEnd {
    Timeout,
    Eof,
    Error(std::io::Error),
}

/// Build one client frame. `mask: None` sends it unmasked; `declared_len` claims a payload length
/// different from the bytes actually included (for oversize tests).
pub fn build_frame(
    fin: bool,
    rsv: u8,
    opcode: u8,
    mask: Option<[u8; 4]>,
    payload: &[u8],
    declared_len: Option<u64>,
) -> Vec<u8> {
    let len = declared_len.unwrap_or(payload.len() as u64);
    let mut out = Vec::with_capacity(payload.len() + 14);
    out.push((if fin { 0x80 } else { 0 }) | ((rsv & 0x7) << 4) | (opcode & 0x0F));
    let mask_bit = if mask.is_some() { 0x80 } else { 0 };
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if len <= u16::MAX as u64 {
        out.push(mask_bit | 126);
        out.extend_from_slice(&(len as u16).to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&len.to_be_bytes());
    }
    match mask {
        Some(m) => {
            out.extend_from_slice(&m);
            out.extend(payload.iter().enumerate().map(|(i, b)| b ^ m[i % 4]));
        }
        None => out.extend_from_slice(payload),
    }
    out
}

/// A masked, final client frame.
pub fn masked_frame(opcode: u8, payload: &[u8]) -> Vec<u8> {
    build_frame(true, 0, opcode, Some(MASK), payload, None)
}

/// The HTTP head of a WebSocket upgrade request.
pub fn upgrade_head(port: u16, path_and_query: &str, origin: Option<&str>) -> String {
    let mut req = format!(
        "GET {path_and_query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    if let Some(origin) = origin {
        req.push_str(&format!("Origin: {origin}\r\n"));
    }
    req.push_str("\r\n");
    req
}

pub struct RawClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
    /// The 101 response head.
    pub response_head: String,
}

impl RawClient {
    /// Upgrade with this relay's token and a good Origin; panics unless the answer is 101.
    pub async fn connect(relay: &Relay, name: &str, room: &str) -> RawClient {
        RawClient::connect_with(relay, &relay.chat_query(name, room), None).await
    }

    /// Upgrade with an explicit query and, optionally, a small kernel receive buffer (set before
    /// connecting, so a client that stops reading backs up quickly).
    pub async fn connect_with(relay: &Relay, query: &str, recv_buffer: Option<u32>) -> RawClient {
        let socket = TcpSocket::new_v4().expect("socket");
        if let Some(size) = recv_buffer {
            socket.set_recv_buffer_size(size).expect("SO_RCVBUF");
        }
        let mut stream = tokio::time::timeout(EVENT_TIMEOUT, socket.connect(relay.addr))
            .await
            .expect("TCP connect timed out")
            .expect("TCP connect failed");
        let head = upgrade_head(
            relay.port(),
            &format!("/chat?{query}"),
            Some(&relay.origin()),
        );
        stream
            .write_all(head.as_bytes())
            .await
            .expect("write upgrade");
        let (response_head, rest) = tokio::time::timeout(EVENT_TIMEOUT, read_head(&mut stream))
            .await
            .expect("upgrade response timed out")
            .expect("upgrade response");
        let status = status_of(&response_head);
        assert_eq!(
            status,
            Some(101),
            "raw upgrade not accepted: {response_head}"
        );
        let accept = header_of(&response_head, "sec-websocket-accept");
        assert_eq!(
            accept.as_deref(),
            Some(WS_ACCEPT),
            "wrong Sec-WebSocket-Accept in {response_head}"
        );
        RawClient {
            stream,
            buf: rest,
            response_head,
        }
    }

    pub async fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes).await
    }

    /// Send a masked frame; panics if the write fails.
    pub async fn send_frame(&mut self, fin: bool, opcode: u8, payload: &[u8]) {
        let frame = build_frame(fin, 0, opcode, Some(MASK), payload, None);
        self.stream.write_all(&frame).await.expect("write frame");
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(true, OP_TEXT, text.as_bytes()).await;
    }

    pub async fn send_close(&mut self, code: u16, reason: &str) {
        let mut payload = code.to_be_bytes().to_vec();
        payload.extend_from_slice(reason.as_bytes());
        self.send_frame(true, OP_CLOSE, &payload).await;
    }

    /// Read one frame from the relay.
    pub async fn read_frame(&mut self, timeout: Duration) -> Result<RawFrame, RawEnd> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if let Some((frame, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                return Ok(frame);
            }
            let mut chunk = [0u8; 16384];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(RawEnd::Timeout),
                Ok(Ok(0)) => return Err(RawEnd::Eof),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => return Err(RawEnd::Error(e)),
            }
        }
    }

    /// Read frames until the relay's close frame; returns its code. Data and ping frames before
    /// it are skipped (pings are not answered). Panics on timeout or on a connection that ends
    /// without a close frame.
    pub async fn expect_close(&mut self, timeout: Duration) -> Option<u16> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_frame(left).await {
                Ok(frame) if frame.opcode == OP_CLOSE => return frame.close_code(),
                Ok(_) => continue,
                Err(end) => panic!("expected a close frame within {timeout:?}, got {end:?}"),
            }
        }
    }

    /// After a close frame: the relay should end the TCP connection.
    pub async fn expect_eof(&mut self, timeout: Duration) {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_frame(left).await {
                Ok(_) => continue,
                Err(RawEnd::Eof) | Err(RawEnd::Error(_)) => return,
                Err(RawEnd::Timeout) => {
                    panic!("relay did not end the TCP connection within {timeout:?}")
                }
            }
        }
    }

    /// Next text frame parsed as JSON, skipping pings (not answered) and pongs.
    pub async fn next_json(&mut self, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.read_frame(left).await {
                Ok(f) if f.opcode == OP_TEXT => {
                    return serde_json::from_slice(&f.payload).unwrap_or_else(|_| {
                        panic!(
                            "relay sent a non-JSON text frame: {:?}",
                            String::from_utf8_lossy(&f.payload)
                        )
                    })
                }
                Ok(f) if f.opcode == OP_PING || f.opcode == OP_PONG => continue,
                Ok(f) => panic!(
                    "expected a text frame, got opcode {:#x} payload {:?}",
                    f.opcode, f.payload
                ),
                Err(end) => panic!("expected a text frame within {timeout:?}, got {end:?}"),
            }
        }
    }

    /// Next JSON event whose type is `ty`.
    pub async fn next_json_of_type(&mut self, ty: &str, timeout: Duration) -> Value {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let v = self.next_json(left).await;
            if v["type"] == ty {
                return v;
            }
        }
    }
}

/// Parse one unmasked (or masked) frame from the front of `buf`.
fn parse_server_frame(buf: &[u8]) -> Option<(RawFrame, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let fin = buf[0] & 0x80 != 0;
    let rsv = (buf[0] >> 4) & 0x7;
    let opcode = buf[0] & 0x0F;
    let masked = buf[1] & 0x80 != 0;
    let short = (buf[1] & 0x7F) as usize;
    let (mut pos, len) = match short {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (4, u16::from_be_bytes([buf[2], buf[3]]) as usize)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            let mut b = [0u8; 8];
            b.copy_from_slice(&buf[2..10]);
            (10, u64::from_be_bytes(b) as usize)
        }
        n => (2, n),
    };
    let mut mask = [0u8; 4];
    if masked {
        if buf.len() < pos + 4 {
            return None;
        }
        mask.copy_from_slice(&buf[pos..pos + 4]);
        pos += 4;
    }
    if buf.len() < pos + len {
        return None;
    }
    let mut payload = buf[pos..pos + len].to_vec();
    if masked {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= mask[i % 4];
        }
    }
    Some((
        RawFrame {
            fin,
            rsv,
            opcode,
            masked,
            payload,
        },
        pos + len,
    ))
}

// ---------------------------------------------------------------------------------------------
// Plain HTTP over TCP
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub head: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }
}

fn status_of(head: &str) -> Option<u16> {
    head.split_whitespace().nth(1)?.parse().ok()
}

fn header_of(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// Read an HTTP response head; returns it and any bytes read past it.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<(String, Vec<u8>)> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..pos]).to_string();
            let rest = buf[pos + 4..].to_vec();
            return Ok((head, rest));
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                format!(
                    "connection closed before a full response head; got {:?}",
                    String::from_utf8_lossy(&buf)
                ),
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Send a raw request and read the response (head and body by Content-Length, chunked, or to EOF).
pub async fn http_exchange(addr: SocketAddr, request: &str) -> std::io::Result<HttpResponse> {
    let fut = async {
        let mut stream = TcpStream::connect(addr).await?;
        stream.write_all(request.as_bytes()).await?;
        let (head, mut rest) = read_head(&mut stream).await?;
        let status = status_of(&head).unwrap_or(0);
        let headers: Vec<(String, String)> = head
            .lines()
            .skip(1)
            .filter_map(|l| {
                l.split_once(':')
                    .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
            })
            .collect();
        let find = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let mut chunk = [0u8; 8192];
        let body: Vec<u8> = if status == 101 || status == 204 || status == 304 {
            Vec::new()
        } else if let Some(len) = find("content-length").and_then(|v| v.parse::<usize>().ok()) {
            while rest.len() < len {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                rest.extend_from_slice(&chunk[..n]);
            }
            rest.truncate(len);
            rest
        } else if find("transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked")) {
            let mut body = Vec::new();
            loop {
                if let Some(pos) = rest.windows(2).position(|w| w == b"\r\n") {
                    let size_line = String::from_utf8_lossy(&rest[..pos]).to_string();
                    let size =
                        usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                            .unwrap_or(0);
                    if size == 0 {
                        break;
                    }
                    if rest.len() >= pos + 2 + size + 2 {
                        body.extend_from_slice(&rest[pos + 2..pos + 2 + size]);
                        rest.drain(..pos + 2 + size + 2);
                        continue;
                    }
                }
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                rest.extend_from_slice(&chunk[..n]);
            }
            body
        } else {
            loop {
                let n = stream.read(&mut chunk).await?;
                if n == 0 {
                    break;
                }
                rest.extend_from_slice(&chunk[..n]);
            }
            rest
        };
        Ok(HttpResponse {
            status,
            head,
            headers,
            body: String::from_utf8_lossy(&body).to_string(),
        })
    };
    match tokio::time::timeout(HTTP_TIMEOUT, fut).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "HTTP exchange timed out",
        )),
    }
}

/// Plain `GET path` with `Connection: close` and extra headers.
pub async fn try_http_get(
    relay: &Relay,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse> {
    let mut req = format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nConnection: close\r\n",
        relay.port()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    http_exchange(relay.addr, &req).await
}

pub async fn http_get(relay: &Relay, path: &str, headers: &[(&str, &str)]) -> HttpResponse {
    try_http_get(relay, path, headers)
        .await
        .unwrap_or_else(|e| panic!("GET {path} failed: {e}"))
}

/// A WebSocket upgrade request for `path_and_query`, with an optional Origin; returns the
/// relay's answer (whatever the status).
pub async fn upgrade_request(
    relay: &Relay,
    path_and_query: &str,
    origin: Option<&str>,
) -> HttpResponse {
    let req = upgrade_head(relay.port(), path_and_query, origin);
    http_exchange(relay.addr, &req)
        .await
        .unwrap_or_else(|e| panic!("upgrade request for {path_and_query} failed: {e}"))
}

/// Assert a plain HTTP rejection: the given status, and nothing that looks like a handshake.
pub fn assert_rejected(resp: &HttpResponse, status: u16, what: &str) {
    assert_eq!(
        resp.status, status,
        "{what}: expected HTTP {status}, got:\n{}\n\n{}",
        resp.head, resp.body
    );
    assert!(
        resp.header("sec-websocket-accept").is_none(),
        "{what}: a rejection must not carry Sec-WebSocket-Accept:\n{}",
        resp.head
    );
}

// ---------------------------------------------------------------------------------------------
// /metrics
// ---------------------------------------------------------------------------------------------

/// Sum of every sample of `name` whose labels include `labels`; None if there is none.
pub fn metric_in(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut found = None;
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, rest) = match line.find('{') {
            Some(brace) if line[..brace].trim() == name => {
                let close = line.rfind('}')?;
                (&line[brace + 1..close], line[close + 1..].trim())
            }
            _ => {
                let mut parts = line.split_whitespace();
                if parts.next() != Some(name) {
                    continue;
                }
                ("", line[name.len()..].trim())
            }
        };
        let sample_labels = parse_labels(series);
        if !labels
            .iter()
            .all(|(k, v)| sample_labels.get(*k).map(String::as_str) == Some(*v))
        {
            continue;
        }
        let value: f64 = match rest.split_whitespace().next().and_then(|v| v.parse().ok()) {
            Some(v) => v,
            None => continue,
        };
        *found.get_or_insert(0.0) += value;
    }
    found
}

fn parse_labels(series: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut rest = series;
    while let Some(eq) = rest.find('=') {
        let key = rest[..eq].trim().trim_start_matches(',').trim().to_string();
        let after = &rest[eq + 1..];
        let Some(stripped) = after.strip_prefix('"') else {
            break;
        };
        let mut value = String::new();
        let mut chars = stripped.char_indices();
        let mut end = stripped.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(n);
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key, value);
        rest = &stripped[end..];
    }
    out
}

/// The `/metrics` text.
pub async fn metrics_text(relay: &Relay) -> String {
    let resp = http_get(relay, "/metrics", &[]).await;
    assert_eq!(resp.status, 200, "/metrics answered {}", resp.head);
    resp.body
}

/// A metric's value (summed over matching label sets; 0 when absent).
pub async fn metric(relay: &Relay, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_in(&metrics_text(relay).await, name, labels).unwrap_or(0.0)
}

/// Poll `/metrics` until `pred(value)` holds; returns the value. Panics after `timeout`.
pub async fn wait_for_metric(
    relay: &Relay,
    name: &str,
    labels: &[(&str, &str)],
    timeout: Duration,
    pred: impl Fn(f64) -> bool,
) -> f64 {
    let deadline = Instant::now() + timeout;
    loop {
        let v = metric(relay, name, labels).await;
        if pred(v) {
            return v;
        }
        if Instant::now() >= deadline {
            panic!("metric {name}{labels:?} is {v}, condition not met within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Poll `/healthz` until `clients == n`.
pub async fn wait_for_clients(relay: &Relay, n: u64, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let body = http_get(relay, "/healthz", &[]).await.json();
        if body["clients"].as_u64() == Some(n) {
            return;
        }
        if Instant::now() >= deadline {
            panic!("/healthz clients did not reach {n} within {timeout:?}; last: {body}");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Value checks
// ---------------------------------------------------------------------------------------------

/// `8-4-4-4-12` hexadecimal digits.
pub fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

/// Parse an ISO-8601 / RFC 3339 timestamp (`YYYY-MM-DDTHH:MM:SS[.fff](Z|±HH:MM)`) to Unix seconds.
pub fn parse_iso8601(s: &str) -> Option<f64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !(b[10] == b'T' || b[10] == b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.chars()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())
            .flatten()
    };
    let (y, mo, d, h, mi, se) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    let mut frac = 0.0;
    if let Some(r) = rest.strip_prefix('.') {
        let digits: String = r.chars().take_while(|c| c.is_ascii_digit()).collect();
        if digits.is_empty() {
            return None;
        }
        frac = format!("0.{digits}").parse().ok()?;
        rest = &r[digits.len()..];
    }
    let offset_secs = match rest {
        "Z" | "z" => 0,
        _ if rest.len() == 6
            && (rest.starts_with('+') || rest.starts_with('-'))
            && &rest[3..4] == ":" =>
        {
            let sign = if rest.starts_with('-') { -1 } else { 1 };
            let oh: i64 = rest[1..3].parse().ok()?;
            let om: i64 = rest[4..6].parse().ok()?;
            sign * (oh * 3600 + om * 60)
        }
        _ => return None,
    };
    let days = days_from_civil(y, mo, d);
    Some((days * 86400 + h * 3600 + mi * 60 + se - offset_secs) as f64 + frac)
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs_f64()
}

/// Assert the shape of a delivered message object.
pub fn assert_message_shape(m: &Value, room: &str, from: &str, text: &str) {
    assert_eq!(m["room"], room, "message room: {m}");
    assert_eq!(m["from"], from, "message from: {m}");
    assert_eq!(m["text"], text, "message text: {m}");
    let id = m["id"]
        .as_str()
        .unwrap_or_else(|| panic!("message id must be a string: {m}"));
    assert!(is_uuid(id), "message id must be a UUID: {m}");
    let sent_at = m["sentAt"]
        .as_str()
        .unwrap_or_else(|| panic!("sentAt must be a string: {m}"));
    let t = parse_iso8601(sent_at).unwrap_or_else(|| panic!("sentAt must be ISO-8601: {m}"));
    assert!(
        (t - unix_now()).abs() < 120.0,
        "sentAt must be about now: {m}"
    );
    assert!(
        m["seq"].as_u64().is_some_and(|s| s >= 1),
        "seq must be a positive integer: {m}"
    );
}

/// Read a file of the test process's resource limits: (soft, hard) max open files.
pub fn own_open_file_limits() -> Option<(Option<u64>, Option<u64>)> {
    let mut s = String::new();
    std::fs::File::open("/proc/self/limits")
        .ok()?
        .read_to_string(&mut s)
        .ok()?;
    let line = s.lines().find(|l| l.starts_with("Max open files"))?;
    let fields: Vec<&str> = line["Max open files".len()..].split_whitespace().collect();
    let parse = |f: &str| f.parse::<u64>().ok();
    Some((parse(fields.first()?), parse(fields.get(1)?)))
}
