//! Helpers shared by the metrics / dashboard / Prometheus integration tests.
//!
//! Everything here talks to the REAL relay binary over real sockets:
//! - [`Relay`] starts `target/.../roomcast` with `HOST=127.0.0.1 PORT=0`, reads the first stdout
//!   line (`roomcast listening on http://ADDR (...)`), keeps its stderr for failure reports, and
//!   kills it on drop.
//! - [`http_get`] is a tiny HTTP/1.1 client (Content-Length and chunked bodies).
//! - [`Exposition`] parses the Prometheus text format.
//! - [`WsClient`] is a tokio-tungstenite client that counts every text frame (and its exact size
//!   on the wire) it receives; [`RawClient`] speaks RFC 6455 by hand over a TCP socket whose
//!   receive buffer the test controls (for a client that stops reading, or never answers pings).
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// The Origin every test client sends; each test relay is started with it as the allow-list.
pub const ORIGIN: &str = "http://metrics.test";
/// The token every test relay is started with.
pub const TOKEN: &str = "metrics-test-token";

/// Default bound for any single wait in these tests.
pub const WAIT: Duration = Duration::from_secs(10);

// ------------------------------------------------------------------------------------------------
// The relay process
// ------------------------------------------------------------------------------------------------

/// A running relay child process; killed (and reaped) on drop.
pub struct Relay {
    child: Child,
    pub addr: SocketAddr,
    pub first_line: String,
    stderr: Arc<Mutex<String>>,
}

impl Relay {
    /// Start the relay with `HOST=127.0.0.1 PORT=0`, `CHAT_TOKEN=TOKEN`, `ALLOWED_ORIGINS=ORIGIN`
    /// and the given extra settings (which win over those defaults).
    pub fn start(settings: &[(&str, &str)]) -> Relay {
        let bin = env!("CARGO_BIN_EXE_roomcast");
        let mut cmd = Command::new(bin);
        cmd.env_clear();
        for keep in ["PATH", "RUST_BACKTRACE", "RUST_LOG"] {
            if let Ok(v) = std::env::var(keep) {
                cmd.env(keep, v);
            }
        }
        cmd.env("HOST", "127.0.0.1")
            .env("PORT", "0")
            .env("CHAT_TOKEN", TOKEN)
            .env("ALLOWED_ORIGINS", ORIGIN);
        for (k, v) in settings {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the relay binary {bin}: {e}"));

        let stderr = Arc::new(Mutex::new(String::new()));
        {
            let pipe = child.stderr.take().expect("stderr piped");
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut r = BufReader::new(pipe);
                let mut line = String::new();
                while matches!(r.read_line(&mut line), Ok(n) if n > 0) {
                    let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
                    s.push_str(&line);
                    if s.len() > 256 * 1024 {
                        let cut = s.len() - 128 * 1024;
                        let cut = (cut..s.len())
                            .find(|&i| s.is_char_boundary(i))
                            .unwrap_or(cut);
                        s.drain(..cut);
                    }
                    line.clear();
                }
            });
        }
        let (tx, rx) = mpsc::channel::<String>();
        {
            let pipe = child.stdout.take().expect("stdout piped");
            std::thread::spawn(move || {
                let mut r = BufReader::new(pipe);
                let mut line = String::new();
                let mut first = true;
                // Keep draining stdout after the first line so the relay never blocks on it.
                while matches!(r.read_line(&mut line), Ok(n) if n > 0) {
                    if first {
                        let _ = tx.send(line.trim_end().to_string());
                        first = false;
                    }
                    line.clear();
                }
            });
        }
        let first_line = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(l) => l,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                std::thread::sleep(Duration::from_millis(100));
                panic!(
                    "relay printed no first stdout line within 30 s (exit: {status:?}); stderr:\n{}",
                    stderr.lock().unwrap_or_else(|p| p.into_inner())
                );
            }
        };
        let addr = parse_listening_line(&first_line).unwrap_or_else(|| {
            let _ = child.kill();
            panic!("unexpected first stdout line {first_line:?}; want `roomcast listening on http://ADDR (...)`")
        });
        Relay {
            child,
            addr,
            first_line,
            stderr,
        }
    }

    /// Everything the relay has logged so far (the last 128-256 KiB).
    pub fn logs(&self) -> String {
        self.stderr
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn ws_url(&self, query: &str) -> String {
        format!("ws://{}/chat?{query}", self.addr)
    }

    /// Scrape `/metrics` and parse it (panics with the relay's logs on failure).
    pub async fn scrape(&self) -> Exposition {
        let text = self.scrape_text().await;
        Exposition::parse(&text)
            .unwrap_or_else(|e| panic!("cannot parse /metrics: {e}\n---\n{text}"))
    }

    pub async fn scrape_text(&self) -> String {
        match http_get(self.addr, "/metrics").await {
            Ok((200, _, body)) => String::from_utf8(body).expect("/metrics is UTF-8"),
            Ok((status, _, body)) => {
                panic!(
                    "/metrics answered {status}: {}",
                    String::from_utf8_lossy(&body)
                )
            }
            Err(e) => panic!("GET /metrics failed: {e}\nrelay stderr:\n{}", self.logs()),
        }
    }

    /// Poll `/metrics` until `pred` holds, at most `within`. Returns the last exposition, or
    /// panics with `what` and the last value seen.
    pub async fn wait_metrics(
        &self,
        what: &str,
        within: Duration,
        pred: impl Fn(&Exposition) -> bool,
    ) -> Exposition {
        let deadline = Instant::now() + within;
        loop {
            let e = self.scrape().await;
            if pred(&e) {
                return e;
            }
            if Instant::now() >= deadline {
                panic!("timed out after {within:?} waiting for {what}\nlast /metrics:\n{}\nrelay stderr:\n{}", e.render_roomcast(), self.logs());
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Wait until the `roomcast_connections` gauge equals `n`.
    pub async fn wait_connections(&self, n: f64) -> Exposition {
        self.wait_metrics(&format!("roomcast_connections == {n}"), WAIT, |e| {
            e.get("roomcast_connections", &[]) == Some(n)
        })
        .await
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- relay stderr (tail) ----\n{}",
                tail(&self.logs(), 8000)
            );
        }
    }
}

pub fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut i = s.len() - n;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

/// `roomcast listening on http://127.0.0.1:PORT (max connections N, open-file limit M)` -> addr.
pub fn parse_listening_line(line: &str) -> Option<SocketAddr> {
    let rest = line.strip_prefix("roomcast listening on http://")?;
    let (addr, tail) = rest.split_once(' ')?;
    if !tail.starts_with('(') || !tail.ends_with(')') {
        return None;
    }
    addr.parse().ok()
}

// ------------------------------------------------------------------------------------------------
// A tiny HTTP/1.1 client
// ------------------------------------------------------------------------------------------------

/// `GET path` on `addr` with `Connection: close`. Returns (status, headers lower-cased, body).
pub async fn http_get(
    addr: SocketAddr,
    path: &str,
) -> std::io::Result<(u16, Vec<(String, String)>, Vec<u8>)> {
    http_request(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"),
    )
    .await
}

/// Send a raw request head (and nothing else) and read the full response.
pub async fn http_request(
    addr: SocketAddr,
    head: &str,
) -> std::io::Result<(u16, Vec<(String, String)>, Vec<u8>)> {
    let fut = async {
        let mut s = TcpStream::connect(addr).await?;
        s.write_all(head.as_bytes()).await?;
        let mut raw = Vec::new();
        s.read_to_end(&mut raw).await?;
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(WAIT, fut).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("HTTP request to {addr} timed out"),
        )
    })??;
    parse_http_response(&raw)
}

/// Status, headers and body of an HTTP response.
type HttpResponse = (u16, Vec<(String, String)>, Vec<u8>);

fn parse_http_response(raw: &[u8]) -> std::io::Result<HttpResponse> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let end = find(raw, b"\r\n\r\n").ok_or_else(|| bad("no end of response head"))?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad("response head not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().ok_or_else(|| bad("empty response"))?;
    let status: u16 = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad("bad status line"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let body = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked {
        let mut out = Vec::new();
        let mut rest = body;
        loop {
            let line_end = find(rest, b"\r\n").ok_or_else(|| bad("bad chunk"))?;
            let size_txt =
                std::str::from_utf8(&rest[..line_end]).map_err(|_| bad("bad chunk size"))?;
            let size = usize::from_str_radix(size_txt.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| bad("bad chunk size"))?;
            rest = &rest[line_end + 2..];
            if size == 0 {
                break;
            }
            if rest.len() < size {
                return Err(bad("truncated chunk"));
            }
            out.extend_from_slice(&rest[..size]);
            rest = &rest[(size + 2).min(rest.len())..];
        }
        out
    } else if let Some(len) = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body[..len.min(body.len())].to_vec()
    } else {
        body.to_vec()
    };
    Ok((status, headers, body))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

// ------------------------------------------------------------------------------------------------
// Prometheus text exposition
// ------------------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// A parsed exposition: every sample, plus `# TYPE` and `# HELP` per family.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
    pub types: HashMap<String, String>,
    pub helps: HashMap<String, String>,
}

impl Exposition {
    pub fn parse(text: &str) -> Result<Exposition, String> {
        let mut e = Exposition::default();
        for (no, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest
                    .split_once(' ')
                    .ok_or(format!("line {}: bad TYPE", no + 1))?;
                e.types.insert(name.to_string(), kind.trim().to_string());
                continue;
            }
            if let Some(rest) = line.strip_prefix("# HELP ") {
                let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
                e.helps.insert(name.to_string(), help.to_string());
                continue;
            }
            if line.starts_with('#') {
                continue;
            }
            e.samples
                .push(parse_sample(line).map_err(|m| format!("line {}: {m}: {line:?}", no + 1))?);
        }
        Ok(e)
    }

    /// The value of the sample `name` whose label set is exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.samples
            .iter()
            .find(|s| s.name == name && s.labels == want)
            .map(|s| s.value)
    }

    /// `get`, or 0 when the series is absent.
    pub fn get0(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.get(name, labels).unwrap_or(0.0)
    }

    /// Sum of every sample called `name`, whatever its labels.
    pub fn sum(&self, name: &str) -> f64 {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .map(|s| s.value)
            .sum()
    }

    /// Every sample called `name`.
    pub fn series(&self, name: &str) -> Vec<&Sample> {
        self.samples.iter().filter(|s| s.name == name).collect()
    }

    /// Every sample name present (with `_bucket`/`_sum`/`_count` as exposed).
    pub fn sample_names(&self) -> std::collections::BTreeSet<String> {
        self.samples.iter().map(|s| s.name.clone()).collect()
    }

    /// The `(le, cumulative count)` buckets of histogram `name`, sorted by `le`.
    pub fn buckets(&self, name: &str) -> Vec<(f64, f64)> {
        let mut v: Vec<(f64, f64)> = self
            .series(&format!("{name}_bucket"))
            .into_iter()
            .filter_map(|s| {
                s.labels
                    .get("le")
                    .map(|le| (parse_value(le).unwrap_or(f64::NAN), s.value))
            })
            .collect();
        v.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap_or(std::cmp::Ordering::Equal));
        v
    }

    /// The roomcast_* samples only, one per line (for failure messages).
    pub fn render_roomcast(&self) -> String {
        let mut out = String::new();
        for s in &self.samples {
            if s.name.starts_with("roomcast_") && !s.name.ends_with("_bucket") {
                let labels: Vec<String> = s
                    .labels
                    .iter()
                    .map(|(k, v)| format!("{k}=\"{v}\""))
                    .collect();
                out.push_str(&format!("{}{{{}}} {}\n", s.name, labels.join(","), s.value));
            }
        }
        out
    }
}

fn parse_value(v: &str) -> Option<f64> {
    match v {
        "+Inf" | "Inf" => Some(f64::INFINITY),
        "-Inf" => Some(f64::NEG_INFINITY),
        "NaN" => Some(f64::NAN),
        _ => v.parse().ok(),
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line.find(['{', ' ', '\t']).ok_or("no value")?;
    let name = line[..name_end].to_string();
    let mut labels = BTreeMap::new();
    let mut rest = &line[name_end..];
    if rest.starts_with('{') {
        let bytes = rest.as_bytes();
        let mut i = 1;
        loop {
            while i < bytes.len() && (bytes[i] == b' ' || bytes[i] == b',') {
                i += 1;
            }
            if i >= bytes.len() {
                return Err("unterminated labels".into());
            }
            if bytes[i] == b'}' {
                i += 1;
                break;
            }
            let key_start = i;
            while i < bytes.len() && bytes[i] != b'=' {
                i += 1;
            }
            let key = rest[key_start..i].trim().to_string();
            i += 1;
            if bytes.get(i) != Some(&b'"') {
                return Err("label value not quoted".into());
            }
            i += 1;
            let mut val = String::new();
            loop {
                match bytes.get(i) {
                    None => return Err("unterminated label value".into()),
                    Some(b'"') => {
                        i += 1;
                        break;
                    }
                    Some(b'\\') => {
                        match bytes.get(i + 1) {
                            Some(b'n') => val.push('\n'),
                            Some(b'\\') => val.push('\\'),
                            Some(b'"') => val.push('"'),
                            _ => return Err("bad escape".into()),
                        }
                        i += 2;
                    }
                    Some(_) => {
                        let ch = rest[i..].chars().next().expect("in bounds");
                        val.push(ch);
                        i += ch.len_utf8();
                    }
                }
            }
            labels.insert(key, val);
        }
        rest = &rest[i..];
    }
    let mut parts = rest.split_whitespace();
    let value = parts.next().ok_or("no value")?;
    let value = parse_value(value).ok_or("bad value")?;
    Ok(Sample {
        name,
        labels,
        value,
    })
}

// ------------------------------------------------------------------------------------------------
// WebSocket frames on the wire
// ------------------------------------------------------------------------------------------------

/// Bytes a server (unmasked) frame with `payload_len` bytes of payload takes on the wire.
pub fn server_frame_len(payload_len: usize) -> u64 {
    let header = if payload_len < 126 {
        2
    } else if payload_len <= u16::MAX as usize {
        4
    } else {
        10
    };
    (header + payload_len) as u64
}

/// What a client saw next.
#[derive(Debug)]
pub enum Event {
    /// A text frame, parsed as JSON.
    Json(Value),
    /// A close frame with its code (None: no code in the frame).
    Close(Option<u16>),
    /// The TCP connection ended without a close frame (EOF or reset).
    Gone(String),
    /// Nothing arrived in time.
    Timeout,
}

/// A tokio-tungstenite client that counts every text frame it receives and its size on the wire.
pub struct WsClient {
    pub label: String,
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Text frames received.
    pub frames: u64,
    /// Wire bytes of those text frames (header + payload).
    pub bytes: u64,
    /// Pings received.
    pub pings: u64,
    /// Every text frame received, in order.
    pub log: Vec<Value>,
    pub closed: bool,
}

/// Why an upgrade did not give a WebSocket.
#[derive(Debug)]
pub enum UpgradeError {
    Status(u16),
    Other(String),
}

/// Upgrade to `ws://addr{path_and_query}` with the given Origin (None: no Origin header).
pub async fn ws_connect(
    addr: SocketAddr,
    path_and_query: &str,
    origin: Option<&str>,
) -> Result<WebSocketStream<MaybeTlsStream<TcpStream>>, UpgradeError> {
    let mut req = format!("ws://{addr}{path_and_query}")
        .into_client_request()
        .map_err(|e| UpgradeError::Other(e.to_string()))?;
    if let Some(o) = origin {
        req.headers_mut()
            .insert("Origin", HeaderValue::from_str(o).expect("origin header"));
    }
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(req)).await {
        Err(_) => Err(UpgradeError::Other("upgrade timed out".into())),
        Ok(Ok((ws, _resp))) => Ok(ws),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
            Err(UpgradeError::Status(resp.status().as_u16()))
        }
        Ok(Err(e)) => Err(UpgradeError::Other(e.to_string())),
    }
}

impl WsClient {
    /// Connect as `name` to `room` with the test token and Origin; panics if the upgrade fails.
    pub async fn join(relay: &Relay, name: &str, room: &str) -> WsClient {
        let q = format!("/chat?token={TOKEN}&name={name}&room={room}");
        match ws_connect(relay.addr, &q, Some(ORIGIN)).await {
            Ok(ws) => WsClient {
                label: name.to_string(),
                ws,
                frames: 0,
                bytes: 0,
                pings: 0,
                log: Vec::new(),
                closed: false,
            },
            Err(e) => panic!(
                "{name}: upgrade to {q} failed: {e:?}\nrelay stderr:\n{}",
                tail(&relay.logs(), 4000)
            ),
        }
    }

    /// Join and read the greeting (`system`), the `history` event and the presence announcing us.
    /// Returns the history event.
    pub async fn join_and_greet(relay: &Relay, name: &str, room: &str) -> (WsClient, Value) {
        let mut c = WsClient::join(relay, name, room).await;
        c.expect_type("system").await;
        let history = c.expect_type("history").await;
        let p = c.expect_type("presence").await;
        let msg = p["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(name) && msg.contains("joined"),
            "{name}: first presence should announce its own join, got {p}"
        );
        (c, history)
    }

    /// The next thing that happens on this socket (within `within`).
    pub async fn next_event(&mut self, within: Duration) -> Event {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let next = match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Err(_) => return Event::Timeout,
                Ok(n) => n,
            };
            match next {
                None => {
                    self.closed = true;
                    return Event::Gone("stream ended".into());
                }
                Some(Err(e)) => {
                    self.closed = true;
                    return Event::Gone(e.to_string());
                }
                Some(Ok(Message::Text(t))) => {
                    self.frames += 1;
                    self.bytes += server_frame_len(t.len());
                    let v: Value = serde_json::from_str(t.as_str()).unwrap_or_else(|e| {
                        panic!("{}: text frame is not JSON ({e}): {t}", self.label)
                    });
                    self.log.push(v.clone());
                    return Event::Json(v);
                }
                Some(Ok(Message::Close(f))) => {
                    self.closed = true;
                    return Event::Close(f.map(|f| u16::from(f.code)));
                }
                Some(Ok(Message::Ping(_))) => {
                    self.pings += 1;
                }
                Some(Ok(Message::Pong(_))) => {}
                Some(Ok(Message::Binary(b))) => panic!(
                    "{}: relay sent a binary frame of {} bytes",
                    self.label,
                    b.len()
                ),
                Some(Ok(Message::Frame(_))) => {}
            }
        }
    }

    /// The next text frame must be a JSON object with `"type": ty`.
    pub async fn expect_type(&mut self, ty: &str) -> Value {
        match self.next_event(WAIT).await {
            Event::Json(v) if v["type"] == ty => v,
            other => panic!("{}: expected a {ty:?} event, got {other:?}", self.label),
        }
    }

    /// The next text frame must be an error with `code`.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let v = self.expect_type("error").await;
        assert_eq!(v["code"], code, "{}: wrong error code in {v}", self.label);
        v
    }

    /// The next text frame must be a chat message with `text`.
    pub async fn expect_message(&mut self, text: &str) -> Value {
        let v = self.expect_type("message").await;
        assert_eq!(
            v["message"]["text"], text,
            "{}: unexpected message {v}",
            self.label
        );
        v
    }

    /// The next text frame must be a presence event whose `message` contains `needle`.
    pub async fn expect_presence(&mut self, needle: &str, online: u64) -> Value {
        let v = self.expect_type("presence").await;
        let msg = v["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{}: presence {v} should mention {needle:?}",
            self.label
        );
        assert_eq!(
            v["online"], online,
            "{}: presence {v} should say online={online}",
            self.label
        );
        v
    }

    /// Nothing must arrive for `quiet`.
    pub async fn expect_silence(&mut self, quiet: Duration) {
        match self.next_event(quiet).await {
            Event::Timeout => {}
            other => panic!("{}: expected nothing, got {other:?}", self.label),
        }
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text.to_string()))
            .await
            .unwrap_or_else(|e| panic!("{}: send failed: {e}", self.label));
    }

    /// Send `{"type":"message","text":text}`.
    pub async fn say(&mut self, text: &str) {
        let frame = serde_json::json!({"type": "message", "text": text}).to_string();
        self.send_text(&frame).await;
    }

    pub async fn send_binary(&mut self, data: &[u8]) {
        self.ws
            .send(Message::binary(data.to_vec()))
            .await
            .unwrap_or_else(|e| panic!("{}: send failed: {e}", self.label));
    }

    /// Wait for the relay to end this connection: returns the close code it sent, or None when
    /// the TCP connection ended without a close frame. Text frames before it are counted and
    /// returned. Panics if nothing happens within `WAIT`.
    pub async fn expect_end(&mut self) -> (Option<u16>, Vec<Value>) {
        let mut texts = Vec::new();
        loop {
            match self.next_event(WAIT).await {
                Event::Json(v) => texts.push(v),
                Event::Close(code) => {
                    // Let tungstenite answer the close and see the TCP end.
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while let Some(Ok(_)) = self.ws.next().await {}
                    })
                    .await;
                    return (code, texts);
                }
                Event::Gone(_) => return (None, texts),
                Event::Timeout => panic!(
                    "{}: relay did not end the connection within {WAIT:?}",
                    self.label
                ),
            }
        }
    }

    /// Close with 1000 and wait for the relay's close frame (no message or error may arrive first).
    pub async fn close_normally(&mut self) {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        };
        self.ws
            .close(Some(frame))
            .await
            .unwrap_or_else(|e| panic!("{}: close failed: {e}", self.label));
        loop {
            match self.next_event(WAIT).await {
                Event::Close(code) => {
                    assert_eq!(
                        code,
                        Some(1000),
                        "{}: relay should echo close 1000",
                        self.label
                    );
                    break;
                }
                Event::Gone(_) => break,
                // Presence about others may legitimately be on the wire before the relay reads
                // our close (RFC 6455 lets the peer finish what it sent); nothing else may.
                Event::Json(v) if v["type"] == "presence" => {}
                Event::Json(v) => panic!("{}: unexpected {v} while closing", self.label),
                Event::Timeout => panic!(
                    "{}: no close frame from the relay within {WAIT:?}",
                    self.label
                ),
            }
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}

/// A WebSocket client written by hand on a plain TCP socket: it reads only when asked to, never
/// answers pings, and its receive buffer size can be set before connecting.
pub struct RawClient {
    pub label: String,
    stream: TcpStream,
    buf: Vec<u8>,
    /// Text frames read.
    pub frames: u64,
    /// Wire bytes of those text frames.
    pub bytes: u64,
    pub pings: u64,
}

/// One server frame read by [`RawClient`].
#[derive(Debug)]
pub enum RawFrame {
    Text(Value, u64),
    Ping,
    Pong,
    Close(Option<u16>),
    Other(u8),
}

impl RawClient {
    pub async fn join(
        relay: &Relay,
        name: &str,
        room: &str,
        recv_buffer: Option<u32>,
    ) -> RawClient {
        let sock = TcpSocket::new_v4().expect("socket");
        if let Some(n) = recv_buffer {
            sock.set_recv_buffer_size(n).expect("SO_RCVBUF");
        }
        let mut stream = tokio::time::timeout(WAIT, sock.connect(relay.addr))
            .await
            .expect("connect timed out")
            .expect("connect");
        let head = format!(
            "GET /chat?token={TOKEN}&name={name}&room={room} HTTP/1.1\r\nHost: {}\r\nOrigin: {ORIGIN}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            relay.addr
        );
        stream
            .write_all(head.as_bytes())
            .await
            .expect("write upgrade");
        let mut buf = Vec::new();
        let deadline = tokio::time::Instant::now() + WAIT;
        let end = loop {
            if let Some(end) = find(&buf, b"\r\n\r\n") {
                break end;
            }
            let mut chunk = [0u8; 4096];
            let n = tokio::time::timeout_at(deadline, stream.read(&mut chunk))
                .await
                .expect("upgrade response timed out")
                .expect("read");
            assert!(n > 0, "{name}: connection closed during the upgrade");
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..end]).to_string();
        assert!(
            head.starts_with("HTTP/1.1 101"),
            "{name}: upgrade refused: {head}"
        );
        assert!(
            head.to_ascii_lowercase()
                .contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "{name}: bad accept header: {head}"
        );
        buf.drain(..end + 4);
        RawClient {
            label: name.to_string(),
            stream,
            buf,
            frames: 0,
            bytes: 0,
            pings: 0,
        }
    }

    /// Read one frame. `Ok(None)`: the connection ended (EOF or reset) without a frame.
    /// `Err(())`: nothing complete arrived within `within`.
    pub async fn read_frame(&mut self, within: Duration) -> Result<Option<RawFrame>, ()> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some((opcode, payload, used)) = parse_server_frame(&self.buf) {
                self.buf.drain(..used);
                let f = match opcode {
                    0x1 => {
                        self.frames += 1;
                        self.bytes += server_frame_len(payload.len());
                        let v: Value = serde_json::from_slice(&payload)
                            .unwrap_or_else(|e| panic!("{}: text frame not JSON: {e}", self.label));
                        RawFrame::Text(v, server_frame_len(payload.len()))
                    }
                    0x8 => RawFrame::Close(
                        (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]])),
                    ),
                    0x9 => {
                        self.pings += 1;
                        RawFrame::Ping
                    }
                    0xA => RawFrame::Pong,
                    op => RawFrame::Other(op),
                };
                return Ok(Some(f));
            }
            let mut chunk = [0u8; 8192];
            match tokio::time::timeout_at(deadline, self.stream.read(&mut chunk)).await {
                Err(_) => return Err(()),
                Ok(Ok(0)) | Ok(Err(_)) => return Ok(None),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// The next frame must be a text frame with `"type": ty`.
    pub async fn expect_type(&mut self, ty: &str) -> Value {
        match self.read_frame(WAIT).await {
            Ok(Some(RawFrame::Text(v, _))) if v["type"] == ty => v,
            other => panic!("{}: expected a {ty:?} event, got {other:?}", self.label),
        }
    }
}

/// Parse one unmasked server frame from the front of `buf`: (opcode, payload, bytes used).
fn parse_server_frame(buf: &[u8]) -> Option<(u8, Vec<u8>, usize)> {
    if buf.len() < 2 {
        return None;
    }
    let opcode = buf[0] & 0x0F;
    assert!(buf[1] & 0x80 == 0, "server frames must not be masked");
    let (len, at) = match buf[1] & 0x7F {
        126 => {
            if buf.len() < 4 {
                return None;
            }
            (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4)
        }
        127 => {
            if buf.len() < 10 {
                return None;
            }
            (u64::from_be_bytes(buf[2..10].try_into().ok()?) as usize, 10)
        }
        n => (n as usize, 2),
    };
    if buf.len() < at + len {
        return None;
    }
    Some((opcode, buf[at..at + len].to_vec(), at + len))
}

// ------------------------------------------------------------------------------------------------
// Files
// ------------------------------------------------------------------------------------------------

/// The repository root (where Cargo.toml is).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let p = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&p).expect("create temp dir");
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Read a whole child pipe in a thread (so a chatty child never blocks).
pub fn drain_pipe<R: Read + Send + 'static>(mut r: R) -> Arc<Mutex<String>> {
    let out = Arc::new(Mutex::new(String::new()));
    let sink = out.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        while let Ok(n) = r.read(&mut buf) {
            if n == 0 {
                break;
            }
            let mut s = sink.lock().unwrap_or_else(|p| p.into_inner());
            s.push_str(&String::from_utf8_lossy(&buf[..n]));
            if s.len() > 512 * 1024 {
                let keep = s.len() - 256 * 1024;
                let keep = (keep..s.len())
                    .find(|&i| s.is_char_boundary(i))
                    .unwrap_or(keep);
                s.drain(..keep);
            }
        }
    });
    out
}

// ------------------------------------------------------------------------------------------------
// PromQL in the dashboard
// ------------------------------------------------------------------------------------------------

/// Every `expr` of every target of every panel (rows and nested panels included), with the
/// panel title it belongs to.
pub fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    fn walk(panels: &Value, out: &mut Vec<(String, String)>) {
        let Some(list) = panels.as_array() else {
            return;
        };
        for p in list {
            let title = p["title"].as_str().unwrap_or("?").to_string();
            if let Some(targets) = p["targets"].as_array() {
                for t in targets {
                    if let Some(e) = t["expr"].as_str() {
                        out.push((title.clone(), e.to_string()));
                    }
                }
            }
            // Rows keep collapsed panels in `panels`; some schemas nest panels further.
            walk(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    // Old-style dashboards keep panels under rows[].panels.
    if let Some(rows) = dashboard["rows"].as_array() {
        for r in rows {
            walk(&r["panels"], &mut out);
        }
    }
    out
}

/// PromQL functions and aggregation operators (Prometheus 2.x), and keywords.
const PROMQL_WORDS: &[&str] = &[
    // aggregation operators
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    // keywords and binary operators spelled as words
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "atan2",
    "start",
    "end",
    // functions
    "abs",
    "absent",
    "absent_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "delta",
    "deriv",
    "exp",
    "floor",
    "histogram_avg",
    "histogram_count",
    "histogram_sum",
    "histogram_fraction",
    "histogram_quantile",
    "histogram_stddev",
    "histogram_stdvar",
    "holt_winters",
    "double_exponential_smoothing",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "ln",
    "log2",
    "log10",
    "minute",
    "month",
    "predict_linear",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sort",
    "sort_desc",
    "sort_by_label",
    "sort_by_label_desc",
    "sqrt",
    "time",
    "timestamp",
    "vector",
    "year",
    "avg_over_time",
    "min_over_time",
    "max_over_time",
    "sum_over_time",
    "count_over_time",
    "quantile_over_time",
    "stddev_over_time",
    "stdvar_over_time",
    "last_over_time",
    "present_over_time",
    "mad_over_time",
    "acos",
    "acosh",
    "asin",
    "asinh",
    "atan",
    "atanh",
    "cos",
    "cosh",
    "sin",
    "sinh",
    "tan",
    "tanh",
    "deg",
    "rad",
    "pi",
    "info",
    "inf",
    "nan",
];

/// The metric names an expression selects. Label matchers (`{...}`), range/subquery durations
/// (`[...]`), string literals, numbers, Grafana variables (`$x`, `${x}`), functions, aggregation
/// operators, keywords, and the label lists after `by`/`without`/`on`/`ignoring`/`group_left`/
/// `group_right` are all skipped; what is left are metric names (bare selectors, or selectors
/// followed by `{` or `[`, or function arguments).
pub fn promql_metric_names(expr: &str) -> Result<Vec<String>, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut names = Vec::new();
    let mut i = 0;
    let is_start = |c: char| c.is_ascii_alphabetic() || c == '_' || c == ':';
    let is_cont = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    // Skip to the character after the matching `close`, honouring quotes.
    let skip_group = |mut i: usize, open: char, close: char| -> Result<usize, String> {
        let mut depth = 0;
        while i < chars.len() {
            let c = chars[i];
            if c == '"' || c == '\'' || c == '`' {
                i = skip_string(&chars, i)?;
                continue;
            }
            if c == open {
                depth += 1;
            } else if c == close {
                depth -= 1;
                if depth == 0 {
                    return Ok(i + 1);
                }
            }
            i += 1;
        }
        Err(format!("unbalanced {open}{close} in {expr:?}"))
    };
    let mut expect_label_list = false;
    while i < chars.len() {
        let c = chars[i];
        if c == '"' || c == '\'' || c == '`' {
            i = skip_string(&chars, i)?;
        } else if c == '#' {
            // comment to end of line
            while i < chars.len() && chars[i] != '\n' {
                i += 1;
            }
        } else if c == '{' {
            i = skip_group(i, '{', '}')?;
        } else if c == '[' {
            i = skip_group(i, '[', ']')?;
        } else if c == '(' && expect_label_list {
            i = skip_group(i, '(', ')')?;
            expect_label_list = false;
        } else if c == '$' {
            // Grafana variable: $name, ${name}, ${name:fmt}, [[name]]
            i += 1;
            if i < chars.len() && chars[i] == '{' {
                i = skip_group(i, '{', '}')?;
            } else {
                while i < chars.len() && is_cont(chars[i]) {
                    i += 1;
                }
            }
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()))
        {
            // number or duration (1e-3, 0x1f, 5m, 1h30m)
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || chars[i] == '.' || chars[i] == '_')
            {
                i += 1;
            }
        } else if is_start(c) {
            let start = i;
            while i < chars.len() && is_cont(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            let lower = word.to_ascii_lowercase();
            let mut j = i;
            while j < chars.len() && chars[j].is_whitespace() {
                j += 1;
            }
            let next = chars.get(j).copied();
            if [
                "by",
                "without",
                "on",
                "ignoring",
                "group_left",
                "group_right",
            ]
            .contains(&lower.as_str())
            {
                // `group_left` may stand without a label list; only skip one if it follows.
                expect_label_list = next == Some('(');
                continue;
            }
            if PROMQL_WORDS.contains(&lower.as_str()) {
                continue;
            }
            if next == Some('(') {
                return Err(format!("unknown PromQL function {word:?} in {expr:?}"));
            }
            names.push(word);
        } else {
            i += 1;
        }
    }
    Ok(names)
}

fn skip_string(chars: &[char], start: usize) -> Result<usize, String> {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        if chars[i] == '\\' && quote != '`' {
            i += 2;
            continue;
        }
        if chars[i] == quote {
            return Ok(i + 1);
        }
        i += 1;
    }
    Err("unterminated string literal".into())
}
