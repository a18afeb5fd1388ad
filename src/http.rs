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
use subtle::ConstantTimeEq;
use tokio::net::TcpStream;

use crate::config::{Cidr, InvalidRoom};
use crate::connection::{self, Identity};
use crate::hub::Resume;
use crate::metrics::Rejection;
use crate::protocol;
use crate::relay::Relay;

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
    if req.uri().path() == "/chat" {
        return Ok(chat(&relay, req, is_upgrade, peer));
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
            "not found: WebSocket connections go to /chat\n",
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
        _ => return handle_admin(relay, req).await,
    })
}

/// The routes of the admin listener (ADMIN_ADDR), also answered on the public port (where
/// `/metrics` is only answered without ADMIN_ADDR).
pub(crate) async fn handle_admin(
    relay: Arc<Relay>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
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

/// `/chat`: the upgrade checks, then the handshake. A plain GET runs the same checks and answers
/// 426 when they pass, so a browser (which only ever sees close 1006 for a refused upgrade) can
/// learn why it was refused.
fn chat(
    relay: &Arc<Relay>,
    mut req: Request<Incoming>,
    is_upgrade: bool,
    peer_addr: SocketAddr,
) -> Response<Body> {
    let peer = peer_addr.ip();
    let client = client_address(&relay.settings.trusted_proxies, req.headers(), peer);
    // Every refusal is counted (upgrades only: the probe is a plain GET) and logged (both).
    let refuse_with =
        |why: Rejection, status: StatusCode, body: &'static str, detail: Option<&str>| {
            if is_upgrade {
                relay.metrics.rejected(why);
            }
            crate::log::refusal(&crate::log::Refusal {
                status: status.as_u16(),
                reason: why,
                peer: peer_addr,
                client: (client != peer).then_some(client),
                path: "/chat",
                upgrade: is_upgrade,
                detail,
            });
            text(status, body)
        };
    let refuse = |why: Rejection, status: StatusCode, body: &'static str| {
        refuse_with(why, status, body, None)
    };
    match req.headers().get(ORIGIN) {
        Some(o) if origin_allowed(relay, o.as_bytes()) => {}
        None if !is_upgrade => {} // same-origin fetches carry no Origin; the probe still checks the token
        origin => {
            let shown = origin.map(|o| String::from_utf8_lossy(o.as_bytes()).into_owned());
            return refuse_with(
                Rejection::ForbiddenOrigin,
                StatusCode::FORBIDDEN,
                "forbidden: origin not allowed\n",
                Some(shown.as_deref().unwrap_or("origin_missing")),
            );
        }
    }
    let query = parse_query(req.uri().query().unwrap_or(""));
    let token_ok = query.token.as_deref().is_some_and(|t| {
        bool::from(
            t.as_bytes()
                .ct_eq(relay.settings.chat_token.expose().as_bytes()),
        )
    });
    if !token_ok {
        let detail = if query.token.is_some() {
            "token_wrong"
        } else {
            "token_missing"
        };
        return refuse_with(
            Rejection::Unauthorized,
            StatusCode::UNAUTHORIZED,
            "unauthorized: token missing or wrong\n",
            Some(detail),
        );
    }
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
    let Some(permit) = relay.try_acquire() else {
        return refuse(
            Rejection::Full,
            StatusCode::SERVICE_UNAVAILABLE,
            "relay full: try again later\n",
        );
    };
    // The whole handshake is checked before a room is reserved: a request that cannot become a
    // WebSocket must never create a room, let alone evict another room's history for it.
    // (The answer is only built here; nothing reaches the client unless this function returns
    // it, so a refusal below still leaves the client with a plain HTTP status.)
    let (response, upgrade) = match fastwebsockets::upgrade::upgrade(&mut req) {
        Ok(pair) => pair,
        Err(_) => {
            return refuse(
                Rejection::BadHandshake,
                StatusCode::BAD_REQUEST,
                "bad WebSocket handshake\n",
            )
        }
    };
    let Ok(room) = relay.hub.reserve(&room) else {
        return refuse(
            Rejection::RoomsFull,
            StatusCode::SERVICE_UNAVAILABLE,
            "room limit reached: try again later\n",
        );
    };
    let who = Identity {
        name: protocol::sanitize_name(query.name.as_deref()),
        session: query
            .session
            .unwrap_or_else(|| uuid::Uuid::new_v4().as_u128()),
        room,
        resume: query.since.map(|since| Resume {
            since,
            epoch: query.epoch,
        }),
        address: client,
    };
    let task_relay = relay.clone();
    relay.tracker.spawn(async move {
        // fastwebsockets wraps the upgraded stream in a `WebSocket` with its own read buffer; we
        // unwrap it at once and take back the bare TCP stream (see frame.rs for why).
        let Ok(ws) = upgrade.await else { return };
        let upgraded = ws.into_inner().into_inner();
        match upgraded.downcast::<TokioIo<TcpStream>>() {
            Ok(parts) => connection::spawn(
                task_relay,
                parts.io.into_inner(),
                parts.read_buf,
                who,
                permit,
            ),
            Err(_) => tracing::error!("upgraded connection is not a TCP stream"),
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
