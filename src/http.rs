//! HTTP: routing, the upgrade checks, and the small plain endpoints.
//!
//! Every check on a WebSocket upgrade happens here, before the handshake, and every refusal is a
//! plain HTTP response with a counted reason — never a 101 followed by a close. Order: path (404),
//! Origin (403), token (401), room name (400, with INVALID_ROOM=refuse), shutting down (503),
//! capacity (503), handshake (400), room capacity (503); docs/PROTOCOL.md has the table. Query
//! strings carry the token, so nothing here logs a URI.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, ORIGIN};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::address::AddressSlot;
use crate::audit::Dialect as AuditDialect;
use crate::config::{Cidr, InvalidRoom};
use crate::connection::{self, Entry, Identity};
use crate::hub::Resume;
use crate::metrics::Rejection;
use crate::protocol;
use crate::relay::{Credential, Relay};
use crate::ticket::TICKET_SESSION_BIT;

type Body = Full<Bytes>;

const INDEX_HTML: &str = include_str!("web/index.html");
const CLIENT_JS: &str = include_str!("web/roomcast-client.js");
const APP_JS: &str = include_str!("web/app.js");

fn respond(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    respond(status, "text/plain; charset=utf-8", body)
}

fn json(status: StatusCode, body: String) -> Response<Body> {
    respond(status, "application/json", body)
}

/// Route one request.
pub(crate) async fn handle(
    relay: Arc<Relay>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    let is_upgrade = fastwebsockets::upgrade::is_upgrade_request(&req);
    if is_upgrade && req.method() != Method::GET {
        // RFC 6455 4.1: the opening handshake is a GET. Anything else never becomes a WebSocket.
        relay.metrics.rejected(Rejection::BadHandshake);
        crate::log::refusal(&crate::log::Refusal {
            status: StatusCode::METHOD_NOT_ALLOWED.as_u16(),
            reason: Rejection::BadHandshake,
            peer,
            client: None,
            path: req.uri().path(),
            upgrade: true,
            detail: Some("not_get"),
        });
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: a WebSocket upgrade is a GET\n",
        );
        r.headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static("GET"));
        return Ok(r);
    }
    if req.uri().path().starts_with("/api/") {
        // With ADMIN_ADDR the server API lives on the admin listener only.
        return Ok(match relay.settings.admin_addr {
            None => crate::api::handle(&relay, req, peer.ip()).await,
            Some(_) => text(StatusCode::NOT_FOUND, "not found\n"),
        });
    }
    if req.uri().path() == "/chat" {
        return Ok(chat(&relay, req, is_upgrade, peer));
    }
    if is_upgrade && req.uri().path() == "/" {
        return Ok(auth_first(&relay, req, peer));
    }
    if is_upgrade {
        relay.metrics.rejected(Rejection::NotFound);
        crate::log::refusal(&crate::log::Refusal {
            status: StatusCode::NOT_FOUND.as_u16(),
            reason: Rejection::NotFound,
            peer,
            client: None,
            path: req.uri().path(),
            upgrade: true,
            detail: None,
        });
        return Ok(text(
            StatusCode::NOT_FOUND,
            "not found: WebSocket connections go to /chat or /\n",
        ));
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"));
    }
    let page = relay.settings.serve_page;
    let public_metrics = relay.settings.admin_addr.is_none();
    Ok(match req.uri().path() {
        "/" | "/index.html" if page => {
            respond(StatusCode::OK, "text/html; charset=utf-8", INDEX_HTML)
        }
        "/roomcast-client.js" => {
            respond(StatusCode::OK, "text/javascript; charset=utf-8", CLIENT_JS)
        }
        "/app.js" if page => respond(StatusCode::OK, "text/javascript; charset=utf-8", APP_JS),
        "/metrics" if !public_metrics => text(StatusCode::NOT_FOUND, "not found\n"),
        _ => return handle_admin(relay, req, peer).await,
    })
}

/// The routes of the admin listener (ADMIN_ADDR), also answered on the public port (where
/// `/metrics` and the server API are only answered without ADMIN_ADDR).
pub(crate) async fn handle_admin(
    relay: Arc<Relay>,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, Infallible> {
    if req.uri().path().starts_with("/api/") {
        return Ok(crate::api::handle(&relay, req, peer.ip()).await);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return Ok(text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"));
    }
    Ok(match req.uri().path() {
        "/healthz" => json(
            StatusCode::OK,
            format!("{{\"ok\":true,\"clients\":{}}}", relay.connection_count()),
        ),
        "/readyz" if !relay.is_ready() => {
            json(StatusCode::SERVICE_UNAVAILABLE, "{\"ready\":false}".into())
        }
        "/readyz" => json(StatusCode::OK, "{\"ready\":true}".into()),
        "/metrics" => respond(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            relay.render_metrics(),
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    })
}

/// The query parameters of `/chat`.
#[derive(Default)]
struct ChatQuery {
    token: Option<String>,
    name: Option<String>,
    room: Option<String>,
    since: Option<u64>,
    epoch: Option<String>,
    session: Option<u128>,
}

fn parse_query(query: &str) -> ChatQuery {
    let mut q = ChatQuery::default();
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match &*k {
            "token" => q.token = Some(v.into_owned()),
            "name" => q.name = Some(v.into_owned()),
            "room" => q.room = Some(v.into_owned()),
            // A `since` that is not a position the relay could have issued is answered with
            // everything kept and complete:false, never taken for a fresh join.
            "since" => q.since = Some(v.parse().unwrap_or(u64::MAX)),
            "epoch" if v.len() <= 64 => q.epoch = Some(v.into_owned()),
            // A session the relay issued earlier, given back to keep requestId de-duplication
            // across a reconnect; anything malformed gets a fresh one.
            "session" => q.session = protocol::parse_session(&v),
            _ => {}
        }
    }
    q
}

/// The client's address: the peer's, unless the peer is a trusted proxy, in which case the
/// rightmost `X-Forwarded-For` entry that is not itself a trusted proxy (entries further left
/// were written by the client and prove nothing).
fn client_address(trusted: &[Cidr], headers: &hyper::HeaderMap, peer: IpAddr) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if !is_trusted(peer) {
        return peer;
    }
    let mut client = peer;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(list) = value.to_str() else {
            return client;
        };
        for entry in list.rsplit(',') {
            let Ok(ip) = entry.trim().parse::<IpAddr>() else {
                return client;
            };
            client = ip;
            if !is_trusted(ip) {
                return ip;
            }
        }
    }
    client
}

fn origin_allowed(relay: &Relay, origin: &[u8]) -> bool {
    relay
        .settings
        .allowed_origins
        .iter()
        .any(|o| o == "*" || o.as_bytes() == origin)
}

/// Where a refusal happens: what it is counted and logged with.
struct Refused<'a> {
    relay: &'a Relay,
    peer: SocketAddr,
    /// The client's address (the peer, or X-Forwarded-For from a trusted proxy).
    client: IpAddr,
    path: &'static str,
    /// An upgrade (counted in `roomcast_upgrade_rejections_total`), not a plain probe.
    upgrade: bool,
}

impl<'a> Refused<'a> {
    fn new(
        relay: &'a Relay,
        req: &Request<Incoming>,
        peer: SocketAddr,
        path: &'static str,
        upgrade: bool,
    ) -> Refused<'a> {
        let client = client_address(&relay.settings.trusted_proxies, req.headers(), peer.ip());
        Refused {
            relay,
            peer,
            client,
            path,
            upgrade,
        }
    }

    /// Count (upgrades only) and log the refusal, and answer it.
    fn answer(
        &self,
        why: Rejection,
        status: StatusCode,
        body: &'static str,
        detail: Option<&str>,
    ) -> Response<Body> {
        if self.upgrade {
            self.relay.metrics.rejected(why);
        }
        crate::log::refusal(&crate::log::Refusal {
            status: status.as_u16(),
            reason: why,
            peer: self.peer,
            client: (self.client != self.peer.ip()).then_some(self.client),
            path: self.path,
            upgrade: self.upgrade,
            detail,
        });
        text(status, body)
    }
}

/// `/chat`: the upgrade checks, then the handshake. A plain GET runs the same checks and answers
/// 426 when they pass, so a browser (which only ever sees close 1006 for a refused upgrade) can
/// learn why it was refused.
fn chat(
    relay: &Arc<Relay>,
    mut req: Request<Incoming>,
    is_upgrade: bool,
    peer_addr: SocketAddr,
) -> Response<Body> {
    // Every refusal is counted (upgrades only: the probe is a plain GET) and logged (both).
    let at = Refused::new(relay, &req, peer_addr, "/chat", is_upgrade);
    let client = at.client;
    let refuse =
        |why: Rejection, status: StatusCode, body: &'static str| at.answer(why, status, body, None);
    match req.headers().get(ORIGIN) {
        Some(o) if origin_allowed(relay, o.as_bytes()) => {}
        None if !is_upgrade => {} // same-origin fetches carry no Origin; the probe still checks the token
        origin => {
            let shown = origin.map(|o| String::from_utf8_lossy(o.as_bytes()).into_owned());
            return at.answer(
                Rejection::ForbiddenOrigin,
                StatusCode::FORBIDDEN,
                "forbidden: origin not allowed\n",
                Some(shown.as_deref().unwrap_or("origin_missing")),
            );
        }
    }
    let query = parse_query(req.uri().query().unwrap_or(""));
    let Some(credential) = query.token.as_deref().and_then(|t| relay.authenticate(t)) else {
        if is_upgrade {
            relay.audit_auth_refused(Some(client), AuditDialect::Query, "unauthorized", 401);
        }
        let detail = if query.token.is_some() {
            "token_wrong"
        } else {
            "token_missing"
        };
        return at.answer(
            Rejection::Unauthorized,
            StatusCode::UNAUTHORIZED,
            "unauthorized: token (or ticket) missing, wrong or expired\n",
            Some(detail),
        );
    };
    let room = match (
        protocol::room_name(query.room.as_deref()),
        relay.settings.invalid_room,
    ) {
        (Some(room), _) => room,
        (None, InvalidRoom::Lobby) => protocol::DEFAULT_ROOM.to_string(),
        (None, InvalidRoom::Refuse) if query.room.is_none() => protocol::DEFAULT_ROOM.to_string(),
        (None, InvalidRoom::Refuse) => {
            return refuse(
                Rejection::InvalidRoom,
                StatusCode::BAD_REQUEST,
                "invalid room name: 1-32 characters of A-Z a-z 0-9 _ -\n",
            )
        }
    };
    if !credential.allows_room(&room) {
        if is_upgrade {
            relay.audit_auth_refused(Some(client), AuditDialect::Query, "forbidden_room", 403);
        }
        return refuse(
            Rejection::ForbiddenRoom,
            StatusCode::FORBIDDEN,
            "forbidden: the ticket does not cover this room\n",
        );
    }
    if relay.is_shutting_down() {
        return refuse(
            Rejection::ShuttingDown,
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n",
        );
    }
    if !is_upgrade {
        let mut r = text(
            StatusCode::UPGRADE_REQUIRED,
            "upgrade required: credentials accepted, connect with WebSocket\n",
        );
        r.headers_mut().insert(
            hyper::header::UPGRADE,
            HeaderValue::from_static("websocket"),
        );
        return r;
    }
    // The whole handshake is checked before a room is reserved: a request that cannot become a
    // WebSocket must never create a room, let alone evict another room's history for it.
    // (The answer is only built here; nothing reaches the client unless this function returns
    // it, so a refusal below still leaves the client with a plain HTTP status.)
    let admitted = match admit(relay, &mut req, client, refuse) {
        Ok(admitted) => admitted,
        Err(refusal) => return *refusal,
    };
    let Ok(room) = relay.hub.reserve(&room) else {
        return refuse(
            Rejection::RoomsFull,
            StatusCode::SERVICE_UNAVAILABLE,
            "room limit reached: try again later\n",
        );
    };
    let entry = Entry::Query {
        name: match &credential {
            Credential::Static => protocol::sanitize_name(query.name.as_deref()),
            Credential::Ticket(grant) => grant.user.clone(),
        },
        publish: credential.may_publish(),
        session: match &credential {
            Credential::Ticket(grant) => grant.session(),
            Credential::Static => query
                .session
                .filter(|s| s & TICKET_SESSION_BIT == 0)
                .unwrap_or_else(|| uuid::Uuid::new_v4().as_u128() & !TICKET_SESSION_BIT),
        },
        room,
        resume: query.since.map(|since| Resume {
            since,
            epoch: query.epoch,
        }),
    };
    switch(relay, admitted, entry)
}

/// `GET /` with upgrade headers: the second dialect. The token comes in the first message, so
/// the only checks here are the Origin (when there is one: without ambient credentials a
/// missing Origin proves nothing and costs nothing), shutdown, capacity and the handshake.
fn auth_first(
    relay: &Arc<Relay>,
    mut req: Request<Incoming>,
    peer_addr: SocketAddr,
) -> Response<Body> {
    let at = Refused::new(relay, &req, peer_addr, "/", true);
    let client = at.client;
    let refuse =
        |why: Rejection, status: StatusCode, body: &'static str| at.answer(why, status, body, None);
    match req.headers().get(ORIGIN) {
        Some(o) if !origin_allowed(relay, o.as_bytes()) => {
            let shown = String::from_utf8_lossy(o.as_bytes());
            return at.answer(
                Rejection::ForbiddenOrigin,
                StatusCode::FORBIDDEN,
                "forbidden: origin not allowed\n",
                Some(&shown),
            );
        }
        _ => {}
    }
    if relay.is_shutting_down() {
        return refuse(
            Rejection::ShuttingDown,
            StatusCode::SERVICE_UNAVAILABLE,
            "shutting down\n",
        );
    }
    let admitted = match admit(relay, &mut req, client, refuse) {
        Ok(admitted) => admitted,
        Err(refusal) => return *refusal,
    };
    switch(relay, admitted, Entry::Auth)
}

/// An upgrade that passed every check shared by both dialects: what `switch` needs.
struct Admitted {
    /// The source address's share (`MAX_CONNECTIONS_PER_IP`), held for the connection's life.
    slot: AddressSlot,
    permit: crate::relay::ConnectionPermit,
    response: Response<http_body_util::Empty<Bytes>>,
    upgrade: fastwebsockets::upgrade::UpgradeFut,
}

/// The checks every upgrade passes last, in both dialects and in this order: the source
/// address's share (`MAX_CONNECTIONS_PER_IP`, 429), the relay's handshake rate
/// (`MAX_HANDSHAKES_PER_SECOND`, 503 with `Retry-After`), capacity (`MAX_CONNECTIONS`, 503), and
/// the handshake itself (400). Each refusal goes through `refuse` (counted and logged).
fn admit(
    relay: &Arc<Relay>,
    req: &mut Request<Incoming>,
    client: IpAddr,
    refuse: impl Fn(Rejection, StatusCode, &'static str) -> Response<Body> + Copy,
) -> Result<Admitted, Box<Response<Body>>> {
    let state = relay.addresses.get(client, relay.now_ms());
    let Some(slot) = AddressSlot::take(state, relay.settings.max_connections_per_ip) else {
        return Err(Box::new(refuse(
            Rejection::PerIpLimit,
            StatusCode::TOO_MANY_REQUESTS,
            "too many connections from your address\n",
        )));
    };
    if !relay.allow_handshake() {
        let mut r = refuse(
            Rejection::HandshakeRate,
            StatusCode::SERVICE_UNAVAILABLE,
            "too many connections opening at once: retry in a second\n",
        );
        r.headers_mut()
            .insert(hyper::header::RETRY_AFTER, HeaderValue::from_static("1"));
        return Err(Box::new(r));
    }
    let Some(permit) = relay.try_acquire() else {
        return Err(Box::new(refuse(
            Rejection::Full,
            StatusCode::SERVICE_UNAVAILABLE,
            "relay full: try again later\n",
        )));
    };
    check_handshake(req.headers(), refuse)?;
    let Ok((response, upgrade)) = fastwebsockets::upgrade::upgrade(req) else {
        return Err(Box::new(refuse(
            Rejection::BadHandshake,
            StatusCode::BAD_REQUEST,
            "bad WebSocket handshake\n",
        )));
    };
    Ok(Admitted {
        slot,
        permit,
        response,
        upgrade,
    })
}

/// What fastwebsockets does not check (RFC 6455 4.2.1): exactly one `Sec-WebSocket-Key`, the
/// base64 of 16 bytes (400 otherwise), and `Sec-WebSocket-Version: 13` (otherwise 400 with the
/// version the relay speaks, 4.4).
fn check_handshake(
    headers: &hyper::HeaderMap,
    refuse: impl Fn(Rejection, StatusCode, &'static str) -> Response<Body>,
) -> Result<(), Box<Response<Body>>> {
    let mut keys = headers.get_all("sec-websocket-key").iter();
    let key_ok = match (keys.next(), keys.next()) {
        (Some(key), None) => is_websocket_key(key.as_bytes()),
        _ => false,
    };
    if !key_ok {
        return Err(Box::new(refuse(
            Rejection::BadHandshake,
            StatusCode::BAD_REQUEST,
            "bad WebSocket handshake: Sec-WebSocket-Key must be the base64 of 16 bytes, once\n",
        )));
    }
    let mut versions = headers.get_all("sec-websocket-version").iter();
    if !matches!((versions.next(), versions.next()), (Some(v), None) if v.as_bytes() == b"13") {
        let mut r = refuse(
            Rejection::BadHandshake,
            StatusCode::BAD_REQUEST,
            "bad WebSocket handshake: this relay speaks Sec-WebSocket-Version 13\n",
        );
        r.headers_mut().insert(
            hyper::header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        return Err(Box::new(r));
    }
    Ok(())
}

/// The base64 of exactly 16 bytes: 22 characters of the alphabet, the last carrying no bits
/// past the 128th, then `==`.
fn is_websocket_key(key: &[u8]) -> bool {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let value = |c: u8| ALPHABET.iter().position(|&a| a == c);
    key.len() == 24
        && key.ends_with(b"==")
        && key[..22].iter().all(|&c| value(c).is_some())
        && value(key[21]).is_some_and(|v| v & 0x0f == 0)
}

/// Answer 101 and, once hyper hands the connection over, start its WebSocket task.
fn switch(relay: &Arc<Relay>, admitted: Admitted, entry: Entry) -> Response<Body> {
    let Admitted {
        slot,
        permit,
        response,
        upgrade,
    } = admitted;
    let who = Identity {
        address: slot,
        entry,
    };
    let task_relay = relay.clone();
    relay.tracker.spawn(async move {
        // fastwebsockets wraps the upgraded stream in a `WebSocket` with its own read buffer; we
        // unwrap it at once and take back the bare TCP stream (see frame.rs for why), and with
        // TLS the rustls session too: the connection drives it from its own loop (tls.rs).
        let Ok(ws) = upgrade.await else { return };
        let upgraded = match ws
            .into_inner()
            .into_inner()
            .downcast::<TokioIo<TcpStream>>()
        {
            Ok(parts) => {
                let stream = parts.io.into_inner();
                return connection::spawn(task_relay, stream, None, parts.read_buf, who, permit);
            }
            Err(upgraded) => upgraded,
        };
        match upgraded.downcast::<TokioIo<tokio_rustls::server::TlsStream<TcpStream>>>() {
            Ok(parts) => {
                let (stream, session) = parts.io.into_inner().into_inner();
                let early = parts.read_buf;
                connection::spawn(task_relay, stream, Some(session), early, who, permit);
            }
            Err(_) => tracing::error!("upgraded connection is neither TCP nor TLS over TCP"),
        }
    });
    let (mut parts, _) = response.into_parts();
    parts
        .headers
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Response::from_parts(parts, Full::new(Bytes::new()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn websocket_keys_are_the_base64_of_16_bytes() {
        assert!(is_websocket_key(b"dGhlIHNhbXBsZSBub25jZQ=="));
        assert!(is_websocket_key(b"AQIDBAUGBwgJCgsMDQ4PEA=="));
        for bad in [
            &b""[..],
            b"not a key",
            b"dGhlIHNhbXBsZSBub25jZQ",
            b"AQIDBAUGBwgJCgsMDQ4P",
            b"AQIDBAUGBwgJCgsMDQ4PEBES",
            b"dGhlIHNhbXBsZSBub25jZR==",
            b"dGhlIHNhbXBsZSBub25jZ!==",
        ] {
            assert!(!is_websocket_key(bad), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn the_client_address_is_the_rightmost_untrusted_forwarded_one() {
        let trusted = [Cidr::parse("127.0.0.1").expect("valid")];
        let ip = |s: &str| s.parse::<IpAddr>().expect("valid");
        let mut headers = hyper::HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("192.0.2.99, 10.0.0.1"),
        );
        assert_eq!(
            client_address(&trusted, &headers, ip("127.0.0.1")),
            ip("10.0.0.1")
        );
        assert_eq!(
            client_address(&trusted, &headers, ip("192.0.2.7")),
            ip("192.0.2.7"),
            "an untrusted peer's header is ignored"
        );
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("10.0.0.9, 127.0.0.1"),
        );
        assert_eq!(
            client_address(&trusted, &headers, ip("127.0.0.1")),
            ip("10.0.0.9")
        );
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("junk, 10.0.0.3"),
        );
        assert_eq!(
            client_address(&trusted, &headers, ip("127.0.0.1")),
            ip("10.0.0.3")
        );
    }
}
