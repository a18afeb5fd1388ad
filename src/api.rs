//! The server API for backends (`/api/*`, docs/API.md): publish into a room, read its history,
//! see who is there, disconnect a user, list rooms.
//!
//! Off unless `API_KEY` is set (404, as if it did not exist); every request carries
//! `Authorization: Bearer KEY` (compared in constant time; wrong or missing: 401). Bodies are
//! read up to `API_MAX_BODY_BYTES` (413 past it) and must be JSON objects (400 with a JSON
//! error otherwise). A publish goes through the same broker as a client's, so it reaches both
//! dialects, on every node, and is de-duplicated by `requestId` like a client's retry.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Deserialize;
use serde_json::json;
use subtle::ConstantTimeEq;

use crate::broker::{Publish, PublishError, Published, Reply};
use crate::hub::Sender;
use crate::metrics::ApiRoute;
use crate::protocol::{self, auth::is_room_id, js_trim, ClientMessage, DISCONNECT_CODE};
use crate::relay::Relay;

type Body = Full<Bytes>;

/// The de-duplication identity of everything published through the API: a `requestId` is
/// idempotent across API calls (and never collides with a client's, whose sessions are random).
const API_SESSION: u128 = u128::from_be_bytes(*b"roomcast-api-v1!");
/// Longest text published through the API, in characters (the second dialect's limit).
const MAX_TEXT_CHARS: usize = 1000;
/// Most names listed by the presence route.
const PRESENCE_NAMES: usize = 100;
/// Rooms per page of `GET /api/rooms` (default, and most a `limit` may ask for).
const ROOMS_PAGE: usize = 100;
const ROOMS_PAGE_MAX: usize = 1000;

fn reply(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    reply(
        status,
        json!({"error": code, "message": message}).to_string(),
    )
}

/// Route one `/api/...` request.
pub(crate) async fn handle(
    relay: &Arc<Relay>,
    req: Request<Incoming>,
    peer: IpAddr,
) -> Response<Body> {
    let Some(key) = &relay.settings.api_key else {
        return error(StatusCode::NOT_FOUND, "not_found", "the server API is off");
    };
    let presented = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    if !bool::from(presented.as_bytes().ct_eq(key.expose().as_bytes())) {
        relay.metrics.api_request(ApiRoute::Unauthorized);
        let mut r = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "Authorization: Bearer API_KEY missing or wrong",
        );
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer"),
        );
        return r;
    }
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let segments: Vec<&str> = path.trim_start_matches("/api/").split('/').collect();
    let method = req.method().clone();
    let (route, response) = match (&method, segments.as_slice()) {
        (&Method::POST, ["publish"]) => (ApiRoute::Publish, publish(relay, req, peer).await),
        (&Method::POST, ["disconnect"]) => (ApiRoute::Disconnect, disconnect(relay, req).await),
        (&Method::GET, ["rooms"]) => (ApiRoute::Rooms, rooms(relay, &query)),
        (&Method::GET, ["rooms", room, "history"]) => {
            (ApiRoute::History, history(relay, room, &query).await)
        }
        (&Method::GET, ["rooms", room, "presence"]) => {
            (ApiRoute::Presence, presence(relay, room).await)
        }
        (_, ["publish"] | ["disconnect"] | ["rooms"] | ["rooms", _, "history" | "presence"]) => (
            ApiRoute::Other,
            error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "see docs/API.md for each route's method",
            ),
        ),
        _ => (
            ApiRoute::Other,
            error(StatusCode::NOT_FOUND, "not_found", "no such API route"),
        ),
    };
    relay.metrics.api_request(route);
    response
}

/// Read a JSON object body of at most `API_MAX_BODY_BYTES`.
async fn body<T: for<'de> Deserialize<'de>>(
    relay: &Relay,
    req: Request<Incoming>,
) -> Result<T, Response<Body>> {
    let limit = relay.settings.api_max_body_bytes;
    let bytes = match Limited::new(req.into_body(), limit).collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                &format!("the body is over API_MAX_BODY_BYTES ({limit})"),
            ))
        }
        Err(_) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "bad_body",
                "the body could not be read",
            ))
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "bad_json",
            &format!("expected a JSON object as documented: {e}"),
        )
    })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody {
    room: String,
    text: String,
    from: Option<String>,
    #[serde(rename = "requestId")]
    request_id: Option<String>,
}

/// `POST /api/publish {"room","text","from"?,"requestId"?}` → `{"id","seq","duplicate"}`.
async fn publish(relay: &Arc<Relay>, req: Request<Incoming>, peer: IpAddr) -> Response<Body> {
    let b: PublishBody = match body(relay, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if !is_room_id(&b.room) {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_room",
            "room must be 1-64 characters of A-Z a-z 0-9 : _ -",
        );
    }
    let text = js_trim(&b.text);
    let chars = text.chars().count();
    if chars == 0 || chars > MAX_TEXT_CHARS {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_text",
            "text must be 1-1000 characters after trimming",
        );
    }
    if let Some(rid) = &b.request_id {
        let chars = rid.chars().count();
        if chars == 0 || chars > protocol::auth::MAX_REQUEST_ID_CHARS {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request_id",
                "requestId must be 1-100 characters",
            );
        }
    }
    let from = match &b.from {
        None => "api".to_string(),
        Some(name) => match protocol::valid_name(name) {
            Some(name) => name,
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_from",
                    "from must be 1-24 characters of A-Z a-z 0-9 _ - and space",
                )
            }
        },
    };
    let Ok(room) = relay.hub.room(&b.room) else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "rooms_full",
            "every room is in use (MAX_ROOMS)",
        );
    };
    let sender = Sender {
        name: from.into(),
        session: API_SESSION,
    };
    let message = ClientMessage {
        text: text.into(),
        request_id: b.request_id.as_deref().map(Into::into),
    };
    let (tx, rx) = tokio::sync::oneshot::channel();
    let publish = Publish {
        room: &room,
        from: &sender,
        message: &message,
        address: Some(peer),
    };
    let outcome = match relay.broker.publish(&publish, Reply::Api(tx)) {
        Ok(Some(published)) => Ok(published),
        Ok(None) => {
            let wait = relay.settings.redis_timeout + Duration::from_secs(1);
            match tokio::time::timeout(wait, rx).await {
                Ok(Ok(outcome)) => outcome,
                _ => Err(PublishError::Unavailable),
            }
        }
        Err(e) => Err(e),
    };
    match outcome {
        Ok(Published { id, seq, duplicate }) => reply(
            StatusCode::OK,
            json!({"id": id.to_string(), "seq": seq, "duplicate": duplicate}).to_string(),
        ),
        Err(PublishError::Conflict) => error(
            StatusCode::CONFLICT,
            "conflict",
            "this requestId was already used for a different text",
        ),
        Err(PublishError::Busy) => error(
            StatusCode::TOO_MANY_REQUESTS,
            "busy",
            "the room's delivery queue is full; retry shortly",
        ),
        Err(PublishError::Unavailable) => {
            relay.metrics.publish_unavailable.increment(1);
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the broker did not take the message; nothing was published",
            )
        }
    }
}

fn query_param(query: &str, key: &str) -> Option<String> {
    url::form_urlencoded::parse(query.as_bytes())
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.into_owned())
}

/// `GET /api/rooms/{room}/history?since=N` → `{"room","epoch","complete","messages":[…]}`.
async fn history(relay: &Relay, room: &str, query: &str) -> Response<Body> {
    if !is_room_id(room) {
        return error(StatusCode::BAD_REQUEST, "bad_room", "invalid room name");
    }
    let since = match query_param(query, "since") {
        None => 0,
        Some(s) => match s.parse::<u64>() {
            Ok(n) => n,
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "bad_since",
                    "since must be a non-negative integer",
                )
            }
        },
    };
    let (epoch, complete, messages) = match relay.broker.room_snapshot(room).await {
        // A networked broker holds the truth (this node may not follow the room).
        Ok(Some(snap)) => slice(snap, since),
        Ok(None) => relay
            .hub
            .history_after(room, since)
            .unwrap_or_else(|| (String::new(), since == 0, Vec::new())),
        Err(_) => {
            relay.metrics.publish_unavailable.increment(1);
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "the broker did not answer",
            );
        }
    };
    let mut out = Vec::with_capacity(64 + messages.iter().map(|m| m.len() + 1).sum::<usize>());
    out.extend_from_slice(
        format!(
            "{{\"room\":{},\"epoch\":{},\"complete\":{complete},\"messages\":[",
            serde_json::Value::from(room),
            serde_json::Value::from(epoch)
        )
        .as_bytes(),
    );
    for (i, m) in messages.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(m);
    }
    out.extend_from_slice(b"]}");
    reply(
        StatusCode::OK,
        String::from_utf8(out).expect("message objects are UTF-8 JSON"),
    )
}

/// The messages of a broker's snapshot after `since`, as the hub slices its own history: all
/// held and `complete:false` when some after `since` are gone (or `since` is past the end).
fn slice(snap: crate::hub::RoomSnapshot, since: u64) -> (String, bool, Vec<Bytes>) {
    let next_seq = snap.seq + 1;
    let first_held = snap.history.first().map_or(next_seq, |(seq, _)| *seq);
    let complete = since < next_seq && since + 1 >= first_held;
    let messages = snap
        .history
        .into_iter()
        .filter(|(seq, _)| !complete || *seq > since)
        .map(|(_, json)| Bytes::from(json))
        .collect();
    (snap.epoch, complete, messages)
}

/// `GET /api/rooms/{room}/presence` → `{"online":N,"names":[…]}`: `online` across every node
/// with Redis; `names` (at most 100) of this node's members.
async fn presence(relay: &Relay, room: &str) -> Response<Body> {
    if !is_room_id(room) {
        return error(StatusCode::BAD_REQUEST, "bad_room", "invalid room name");
    }
    let (local, names) = relay.hub.local_presence(room, PRESENCE_NAMES);
    let online = relay.broker.online(room).await.unwrap_or(local as u64);
    let names: Vec<&str> = names.iter().map(|n| &**n).collect();
    reply(
        StatusCode::OK,
        json!({"room": room, "online": online, "names": names}).to_string(),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    name: String,
    room: Option<String>,
}

/// `POST /api/disconnect {"name","room"?}` → `{"disconnected":N}` (this node's count); with
/// Redis every other node closes its own.
async fn disconnect(relay: &Relay, req: Request<Incoming>) -> Response<Body> {
    let b: DisconnectBody = match body(relay, req).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if b.name.is_empty() || b.name.chars().count() > protocol::MAX_NAME_CHARS {
        return error(
            StatusCode::BAD_REQUEST,
            "bad_name",
            "name must be 1-24 characters",
        );
    }
    if b.room.as_deref().is_some_and(|r| !is_room_id(r)) {
        return error(StatusCode::BAD_REQUEST, "bad_room", "invalid room name");
    }
    let local = relay
        .hub
        .disconnect(&b.name, b.room.as_deref(), DISCONNECT_CODE);
    relay.broker.disconnect(&b.name, b.room.as_deref());
    reply(
        StatusCode::OK,
        json!({"disconnected": local, "code": DISCONNECT_CODE}).to_string(),
    )
}

/// `GET /api/rooms?after=NAME&limit=N` → `{"rooms":[{"room","online"}…],"next":NAME|null}`:
/// rooms with members on this node, by name.
fn rooms(relay: &Relay, query: &str) -> Response<Body> {
    let limit = match query_param(query, "limit") {
        None => ROOMS_PAGE,
        Some(s) => match s.parse::<usize>() {
            Ok(n) if (1..=ROOMS_PAGE_MAX).contains(&n) => n,
            _ => return error(StatusCode::BAD_REQUEST, "bad_limit", "limit must be 1-1000"),
        },
    };
    let after = query_param(query, "after");
    let page = relay.hub.rooms_page(after.as_deref(), limit + 1);
    let more = page.len() > limit;
    let rooms: Vec<serde_json::Value> = page
        .iter()
        .take(limit)
        .map(|(name, online)| json!({"room": &**name, "online": online}))
        .collect();
    let next = more.then(|| page[limit - 1].0.to_string());
    reply(
        StatusCode::OK,
        json!({"rooms": rooms, "next": next}).to_string(),
    )
}
