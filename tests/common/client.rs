//! [`Client`]: a JSON-event WebSocket client over tokio-tungstenite. It answers pings while
//! reading, and counts every text frame it receives and its size on the wire (for tests that
//! check the relay's delivery counters against what clients saw).
//!
//! Two styles of reading, on purpose: `next_event_*` skip what they are not looking for, while
//! `expect_*` insist that the very next event is the one named (strict scripts, where any extra
//! frame is a failure).

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderName, HeaderValue};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use super::raw::server_frame_len;
use super::relay::{Endpoint, Relay};
use super::{EVENT_TIMEOUT, WAIT};

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
    /// Text frames received so far.
    pub frames: u64,
    /// Wire bytes of those text frames (header + payload).
    pub bytes: u64,
    /// The reason of the relay's close frame, once one arrived.
    pub close_reason: Option<String>,
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
    /// Wrap an upgraded stream.
    pub fn from_ws(ws: Ws, name: &str, room: &str) -> Client {
        Client {
            ws,
            name: name.to_string(),
            room: room.to_string(),
            pings_seen: 0,
            frames: 0,
            bytes: 0,
            close_reason: None,
        }
    }

    /// Upgrade to `ws://ENDPOINT{path_and_query}` with the given Origin (None: no Origin header)
    /// and extra request headers. Works for a relay, a proxy in front of relays, or an address.
    pub async fn connect_to(
        endpoint: &impl Endpoint,
        path_and_query: &str,
        origin: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Result<Client, ConnectError> {
        let url = format!("ws://{}{path_and_query}", endpoint.socket_addr());
        let mut request = url
            .into_client_request()
            .map_err(|e| ConnectError::Other(e.to_string()))?;
        if let Some(origin) = origin {
            request.headers_mut().insert(
                "Origin",
                HeaderValue::from_str(origin).map_err(|e| ConnectError::Other(e.to_string()))?,
            );
        }
        for (k, v) in headers {
            let name = HeaderName::from_bytes(k.as_bytes())
                .map_err(|e| ConnectError::Other(e.to_string()))?;
            let value = HeaderValue::from_str(v).map_err(|e| ConnectError::Other(e.to_string()))?;
            request.headers_mut().insert(name, value);
        }
        let attempt =
            tokio::time::timeout(EVENT_TIMEOUT, tokio_tungstenite::connect_async(request)).await;
        match attempt {
            Err(_) => Err(ConnectError::Other("upgrade timed out".into())),
            Ok(Err(tungstenite::Error::Http(response))) => {
                Err(ConnectError::Status(response.status().as_u16()))
            }
            Ok(Err(e)) => Err(ConnectError::Other(e.to_string())),
            Ok(Ok((ws, _response))) => Ok(Client::from_ws(ws, "", "")),
        }
    }

    /// Connect with this relay's token and a good Origin; panics if the upgrade fails.
    pub async fn connect(relay: &Relay, name: &str, room: &str) -> Client {
        Client::connect_via(relay, relay, name, room).await
    }

    /// Connect through `via` (e.g. nginx in front of the relay) with this relay's token and
    /// Origin; panics if the upgrade fails.
    pub async fn connect_via(via: &impl Endpoint, relay: &Relay, name: &str, room: &str) -> Client {
        let path = format!("/chat?{}", relay.chat_query(name, room));
        let mut client = Client::connect_to(via, &path, Some(&relay.origin()), &[])
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "connect as {name:?} to room {room:?} via {} failed: {e:?}",
                    via.socket_addr()
                )
            });
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
        Client::connect_to(relay, &format!("/chat?{query}"), origin, &[]).await
    }

    // --- the second dialect: `GET /`, an `auth` message first, rooms joined by message ------

    /// Upgrade at `/` (the second dialect) with this Origin (None: no Origin header).
    pub async fn connect_root(
        endpoint: &impl Endpoint,
        origin: Option<&str>,
    ) -> Result<Client, ConnectError> {
        Client::connect_to(endpoint, "/", origin, &[]).await
    }

    /// Upgrade at `/` and authenticate with `token`; returns the client and its `auth_ok`.
    pub async fn authed(endpoint: &impl Endpoint, token: &str) -> (Client, Value) {
        let mut client = Client::connect_root(endpoint, None)
            .await
            .unwrap_or_else(|e| panic!("upgrade at / failed: {e:?}"));
        client
            .send_json(&json!({"type": "auth", "token": token}))
            .await;
        let ok = client.expect_type("auth_ok").await;
        (client, ok)
    }

    /// Send `join` and expect `joined` for that room next.
    pub async fn join_room(&mut self, room: &str) -> Value {
        self.send_json(&json!({"type": "join", "roomId": room}))
            .await;
        let joined = self.expect_type("joined").await;
        assert_eq!(joined["roomId"], room, "joined answers the room asked for");
        joined
    }

    /// Send a `chat` message.
    pub async fn chat(&mut self, room: &str, text: &str, request_id: &str) {
        self.send_json(
            &json!({"type": "chat", "roomId": room, "text": text, "requestId": request_id}),
        )
        .await;
    }

    /// Read until the relay closes; returns the close code and reason (panics on anything
    /// else ending the connection, or after [`WAIT`]).
    pub async fn expect_close_with(&mut self) -> (u16, String) {
        let code = self.expect_close(WAIT).await;
        let code = code.unwrap_or_else(|| panic!("[{}] close frame without a code", self.name));
        (code, self.close_reason.clone().unwrap_or_default())
    }

    /// Connect and read the `system` and `history` events that open every connection.
    pub async fn join(relay: &Relay, name: &str, room: &str) -> (Client, Value, Value) {
        Client::join_via(relay, relay, name, room).await
    }

    /// [`Client::join`] through `via` (e.g. nginx in front of the relay).
    pub async fn join_via(
        via: &impl Endpoint,
        relay: &Relay,
        name: &str,
        room: &str,
    ) -> (Client, Value, Value) {
        let mut client = Client::connect_via(via, relay, name, room).await;
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

    /// Join strictly: the first three events must be `system`, `history` and the presence event
    /// announcing this client, in that order. Returns the history event.
    pub async fn join_and_greet(relay: &Relay, name: &str, room: &str) -> (Client, Value) {
        let mut client = Client::connect(relay, name, room).await;
        client.expect_type("system").await;
        let history = client.expect_type("history").await;
        let presence = client.expect_type("presence").await;
        let message = presence["message"].as_str().unwrap_or_default();
        assert!(
            message.contains(name) && message.contains("joined"),
            "{name}: first presence should announce its own join, got {presence}"
        );
        (client, history)
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
                    self.frames += 1;
                    self.bytes += server_frame_len(text.len());
                    return serde_json::from_str(text.as_str())
                        .map_err(|_| WsEnd::NotJson(text.as_str().to_string()));
                }
                Some(Ok(Message::Binary(b))) => {
                    return Err(WsEnd::NotJson(format!("binary frame of {} bytes", b.len())))
                }
                Some(Ok(Message::Ping(_))) => self.pings_seen += 1,
                Some(Ok(Message::Pong(_))) | Some(Ok(Message::Frame(_))) => {}
                Some(Ok(Message::Close(frame))) => {
                    // Drive tungstenite's automatic close reply out to the socket.
                    let _ = tokio::time::timeout(Duration::from_millis(500), self.ws.next()).await;
                    self.close_reason = frame.as_ref().map(|f| f.reason.to_string());
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

    /// The very next event (within [`WAIT`]) must have `"type": ty`.
    pub async fn expect_type(&mut self, ty: &str) -> Value {
        match self.try_next_event(WAIT).await {
            Ok(v) if v["type"] == ty => v,
            other => panic!("{}: expected a {ty:?} event, got {other:?}", self.name),
        }
    }

    /// The very next event must be an error with `code`.
    pub async fn expect_error(&mut self, code: &str) -> Value {
        let v = self.expect_type("error").await;
        assert_eq!(v["code"], code, "{}: wrong error code in {v}", self.name);
        v
    }

    /// The very next event must be a chat message with `text`.
    pub async fn expect_message(&mut self, text: &str) -> Value {
        let v = self.expect_type("message").await;
        assert_eq!(
            v["message"]["text"], text,
            "{}: unexpected message {v}",
            self.name
        );
        v
    }

    /// The very next event must be a presence event whose `message` contains `needle` and whose
    /// `online` is `online`.
    pub async fn expect_presence(&mut self, needle: &str, online: u64) -> Value {
        let v = self.expect_type("presence").await;
        let msg = v["message"].as_str().unwrap_or_default();
        assert!(
            msg.contains(needle),
            "{}: presence {v} should mention {needle:?}",
            self.name
        );
        assert_eq!(
            v["online"], online,
            "{}: presence {v} should say online={online}",
            self.name
        );
        v
    }

    /// Nothing may arrive for `quiet` (pings are answered and allowed).
    pub async fn expect_silence(&mut self, quiet: Duration) {
        match self.try_next_event(quiet).await {
            Err(WsEnd::Timeout) => {}
            other => panic!("{}: expected nothing, got {other:?}", self.name),
        }
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

    /// Wait for the relay to end this connection: returns the close code it sent, or None when
    /// the TCP connection ended without a close frame, and the JSON events that came before it.
    /// Panics on a non-JSON frame, or if nothing ends the connection within [`WAIT`].
    pub async fn expect_end(&mut self) -> (Option<u16>, Vec<Value>) {
        let mut texts = Vec::new();
        loop {
            match self.try_next_event(WAIT).await {
                Ok(v) => texts.push(v),
                Err(WsEnd::Closed(code)) => {
                    // Let tungstenite answer the close and see the TCP end.
                    self.drain(Duration::from_secs(2)).await;
                    return (code, texts);
                }
                Err(WsEnd::Eof) | Err(WsEnd::Error(_)) => return (None, texts),
                Err(WsEnd::Timeout) => panic!(
                    "{}: relay did not end the connection within {WAIT:?}",
                    self.name
                ),
                Err(WsEnd::NotJson(frame)) => {
                    panic!("{}: relay sent a non-JSON frame: {frame}", self.name)
                }
            }
        }
    }

    /// Close with 1000 and wait for the relay's close frame, which must echo 1000. Presence
    /// events may come first (the relay may have sent them before it read our close); any other
    /// event is a failure.
    pub async fn close_normally(&mut self) {
        let frame = CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        };
        self.ws
            .close(Some(frame))
            .await
            .unwrap_or_else(|e| panic!("{}: close failed: {e}", self.name));
        loop {
            match self.try_next_event(WAIT).await {
                Err(WsEnd::Closed(code)) => {
                    assert_eq!(
                        code,
                        Some(1000),
                        "{}: relay should echo close 1000",
                        self.name
                    );
                    break;
                }
                Err(WsEnd::Eof) | Err(WsEnd::Error(_)) => break,
                Ok(v) if v["type"] == "presence" => {}
                Ok(v) => panic!("{}: unexpected {v} while closing", self.name),
                Err(WsEnd::Timeout) => panic!(
                    "{}: no close frame from the relay within {WAIT:?}",
                    self.name
                ),
                Err(WsEnd::NotJson(frame)) => {
                    panic!("{}: relay sent a non-JSON frame: {frame}", self.name)
                }
            }
        }
        self.drain(Duration::from_secs(2)).await;
    }

    /// Read (and drop) whatever comes until the stream ends, at most `within`.
    async fn drain(&mut self, within: Duration) {
        let _ = tokio::time::timeout(within, async {
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws
            .send(Message::text(text.to_string()))
            .await
            .unwrap_or_else(|e| panic!("[{}] send failed: {e}", self.name));
    }

    pub async fn send_binary(&mut self, data: &[u8]) {
        self.ws
            .send(Message::binary(data.to_vec()))
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

    /// Graceful close with 1000, without checking the relay's answer.
    pub async fn close(mut self) {
        let _ = self
            .ws
            .close(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "bye".into(),
            }))
            .await;
        self.drain(Duration::from_secs(2)).await;
    }
}
