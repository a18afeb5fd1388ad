//! Property test of the HTTP stage against a model of docs/PROTOCOL.md, black-box, against the
//! real binary (docs/FUZZING.md).
//!
//! One relay (`INVALID_ROOM=refuse`, so every check of the table has a status) answers random
//! requests: methods (odd ones and a lower-case `get` included), paths (the two dialects, near
//! misses, plain endpoints, the absolute form), queries (the token right, wrong, missing, given
//! twice, percent-encoded; rooms valid, invalid, trimmed, missing, given twice) and header sets
//! (`Origin` allowed, foreign, missing, given twice; `Upgrade`, `Connection`,
//! `Sec-WebSocket-Key` and `Sec-WebSocket-Version` present, absent, garbage or given twice; names
//! in any casing; any order). Each answer must be the status the model gives — 101 only when
//! every documented check passes, with the RFC 6455 accept value — within a bounded time, and
//! the relay must still be up and healthy at the end, with no panic in its log.
//!
//! Where the contract says nothing (a header or parameter given twice with values the checks
//! judge differently; a method other than GET/POST/HEAD on `/chat` without upgrade headers; a
//! non-GET upgrade on a path of neither dialect), every answer a reading of it allows is right.
//!
//! Short seeded run in `cargo test`; long run, each property for 180 s:
//! `FUZZ_SECONDS=180 cargo test --release --test fuzz_upgrade -- --nocapture --test-threads=1`.

mod common;
mod fuzz_support;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

use common::{Relay, WS_KEY};
use fuzz_support::check;

/// Bound on one exchange: a relay that does not answer within it hangs.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Requests
// ---------------------------------------------------------------------------------------------

/// How a query value is written.
#[derive(Debug, Clone, Copy)]
enum Encoding {
    /// Unreserved characters as they are, everything else `%XX`.
    Needed,
    /// Every byte `%XX`.
    Everything,
    /// As `Needed`, but spaces as `+` (application/x-www-form-urlencoded).
    PlusForSpace,
}

#[derive(Debug, Clone)]
struct Param {
    name: &'static str,
    /// The value as the relay must read it, after decoding.
    value: String,
    encoding: Encoding,
}

impl Param {
    fn render(&self, out: &mut String) {
        out.push_str(self.name);
        out.push('=');
        for b in self.value.bytes() {
            let unreserved = b.is_ascii_alphanumeric() || b"-_.~".contains(&b);
            match self.encoding {
                Encoding::PlusForSpace if b == b' ' => out.push('+'),
                Encoding::Needed | Encoding::PlusForSpace if unreserved => out.push(b as char),
                _ => out.push_str(&format!("%{b:02X}")),
            }
        }
    }
}

#[derive(Debug, Clone)]
struct Header {
    /// The name as RFC 9110 writes it.
    name: &'static str,
    /// Which letters of the name are written upper case (bit per letter, low bit first).
    casing: u32,
    value: String,
}

impl Header {
    fn render(&self, out: &mut String) {
        for (i, c) in self.name.chars().enumerate() {
            if self.casing >> (i % 32) & 1 == 1 {
                out.push(c.to_ascii_uppercase());
            } else {
                out.push(c.to_ascii_lowercase());
            }
        }
        out.push_str(": ");
        out.push_str(&self.value);
        out.push_str("\r\n");
    }
}

#[derive(Debug, Clone)]
struct Req {
    method: &'static str,
    /// The request target in absolute form (`http://host:port/path?query`).
    absolute_form: bool,
    path: &'static str,
    /// `None`: no `?` at all.
    params: Option<Vec<Param>>,
    headers: Vec<Header>,
}

impl Req {
    fn render(&self, port: u16) -> String {
        let mut target = String::new();
        if self.absolute_form {
            target.push_str(&format!("http://127.0.0.1:{port}"));
        }
        target.push_str(self.path);
        if let Some(params) = &self.params {
            target.push('?');
            for (i, p) in params.iter().enumerate() {
                if i > 0 {
                    target.push('&');
                }
                p.render(&mut target);
            }
        }
        let mut out = format!(
            "{} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n",
            self.method
        );
        for h in &self.headers {
            h.render(&mut out);
        }
        out.push_str("\r\n");
        out
    }

    /// Values of every header named `name` (names compare case-insensitively; values are what
    /// is left after the optional white space around them, RFC 9110 §5.5).
    fn header_values(&self, name: &str) -> Vec<&str> {
        self.headers
            .iter()
            .filter(|h| h.name.eq_ignore_ascii_case(name))
            .map(|h| h.value.trim_matches([' ', '\t']))
            .collect()
    }

    fn params(&self, name: &str) -> Vec<&str> {
        self.params
            .iter()
            .flatten()
            .filter(|p| p.name == name)
            .map(|p| p.value.as_str())
            .collect()
    }
}

// ---------------------------------------------------------------------------------------------
// The model
// ---------------------------------------------------------------------------------------------

/// What the relay was started with.
struct RelaySettings {
    token: String,
    allowed_origins: Vec<String>,
}

/// RFC 9110 §7.8 / RFC 6455 §4.2.1: does any of these comma-separated lists hold `token`
/// (case-insensitive)?
fn lists_token(values: &[&str], token: &str) -> bool {
    values.iter().any(|v| {
        v.split(',')
            .any(|t| t.trim_matches([' ', '\t']).eq_ignore_ascii_case(token))
    })
}

/// The different answers a check may give when a value it reads is given more than once: one
/// reader takes the first, another the last; the contract does not say which.
fn readings<T: Copy + Ord>(values: &[T]) -> BTreeSet<T> {
    match values {
        [] => BTreeSet::new(),
        [one] => BTreeSet::from([*one]),
        [first, .., last] => BTreeSet::from([*first, *last]),
    }
}

/// `room`: trimmed as JavaScript trims, then 1–32 characters of `[A-Za-z0-9_-]`.
fn room_is_valid(raw: &str) -> bool {
    let js_white_space = |c: char| {
        matches!(c, '\u{9}'..='\u{d}' | ' ' | '\u{a0}' | '\u{1680}' | '\u{2000}'..='\u{200a}')
            || matches!(
                c,
                '\u{2028}' | '\u{2029}' | '\u{202f}' | '\u{205f}' | '\u{3000}'
            )
            || c == '\u{feff}'
    };
    let room = raw.trim_matches(js_white_space);
    (1..=32).contains(&room.len())
        && room
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// The statuses PROTOCOL.md allows for `req` (several only where it leaves a choice).
fn model(req: &Req, relay: &RelaySettings) -> BTreeSet<u16> {
    let upgrade = lists_token(&req.header_values("connection"), "upgrade")
        && lists_token(&req.header_values("upgrade"), "websocket");

    // Each check, as the set of answers its readings give.
    let origins: Vec<bool> = req
        .header_values("origin")
        .iter()
        .map(|o| relay.allowed_origins.iter().any(|a| a == o))
        .collect();
    let origin_readings: BTreeSet<Option<bool>> = if origins.is_empty() {
        BTreeSet::from([None])
    } else {
        readings(&origins).into_iter().map(Some).collect()
    };
    let tokens: Vec<bool> = req
        .params("token")
        .iter()
        .map(|t| *t == relay.token)
        .collect();
    let token_readings = if tokens.is_empty() {
        BTreeSet::from([false])
    } else {
        readings(&tokens)
    };
    // A missing room is `lobby`; an invalid one is refused (INVALID_ROOM=refuse).
    let rooms: Vec<bool> = req
        .params("room")
        .iter()
        .map(|r| room_is_valid(r))
        .collect();
    let room_readings = if rooms.is_empty() {
        BTreeSet::from([true])
    } else {
        readings(&rooms)
    };
    // The handshake (RFC 6455 4.2.1): exactly one Sec-WebSocket-Key, the base64 of 16 bytes, and
    // exactly one Sec-WebSocket-Version, 13.
    let keys = req.header_values("sec-websocket-key");
    let key = keys.len() == 1 && key_is_valid(keys[0]);
    let versions = req.header_values("sec-websocket-version");
    let version_readings = BTreeSet::from([versions.len() == 1 && versions[0] == "13"]);

    let mut allowed = BTreeSet::new();
    for &origin in &origin_readings {
        for &token in &token_readings {
            for &room in &room_readings {
                for &version in &version_readings {
                    allowed.extend(status(req, upgrade, origin, token, room, key && version));
                }
            }
        }
    }
    allowed
}

/// A Sec-WebSocket-Key as RFC 6455 wants it: base64 (with padding) of exactly 16 bytes.
fn key_is_valid(key: &str) -> bool {
    const ALPHABET: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let b = key.as_bytes();
    b.len() == 24
        && key.ends_with("==")
        && key[..22].chars().all(|c| ALPHABET.contains(c))
        && ALPHABET.find(b[21] as char).is_some_and(|v| v & 0x0f == 0)
}

/// PROTOCOL.md's tables for one reading of every check. `origin`: `None` when there is no
/// Origin header, else whether it is allowed.
fn status(
    req: &Req,
    upgrade: bool,
    origin: Option<bool>,
    token: bool,
    room: bool,
    handshake: bool,
) -> Vec<u16> {
    // The `/chat` checks in contract order, then what passing them gives.
    let chat_checks = |origin_ok: bool, then: u16| {
        if !origin_ok {
            403
        } else if !token {
            401
        } else if !room {
            400
        } else {
            then
        }
    };
    let plain_route = matches!(req.path, "/" | "/index.html" | "/healthz");
    if upgrade {
        // "Any method other than GET with upgrade headers gets 405 (both dialects, RFC 6455
        // 4.1)"; on a path of neither dialect, "path is not /chat" (404) may come first.
        if req.method != "GET" {
            return match req.path {
                "/chat" | "/" => vec![405],
                _ => vec![404, 405],
            };
        }
        return match req.path {
            // Origin must be present and allowed; then token, room, handshake.
            "/chat" => vec![chat_checks(
                origin == Some(true),
                if handshake { 101 } else { 400 },
            )],
            // "An Origin that is present must be in ALLOWED_ORIGINS"; then the handshake.
            "/" if origin == Some(false) => vec![403],
            "/" => vec![if handshake { 101 } else { 400 }],
            _ => vec![404],
        };
    }
    match (req.path, req.method) {
        // "A plain GET (or POST) of the same /chat?... URL runs the same checks — Origin only
        // when the header is present — and answers 426 Upgrade Required when they pass."
        ("/chat", "GET" | "POST" | "HEAD") => vec![chat_checks(origin != Some(false), 426)],
        // Other methods: the contract says nothing; refused, or judged like a GET.
        ("/chat", _) => vec![405, chat_checks(origin != Some(false), 426)],
        (_, "GET" | "HEAD") if plain_route => vec![200],
        (_, _) if plain_route => vec![405],
        (_, "GET" | "HEAD") => vec![404],
        _ => vec![404, 405],
    }
}

// ---------------------------------------------------------------------------------------------
// Generators
// ---------------------------------------------------------------------------------------------

fn method() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        16 => Just("GET"),
        2 => Just("POST"),
        1 => prop::sample::select(vec!["HEAD", "PUT", "DELETE", "OPTIONS", "PATCH", "get", "FOO"]),
    ]
}

fn path() -> impl Strategy<Value = &'static str> {
    prop_oneof![
        10 => Just("/chat"),
        4 => Just("/"),
        2 => prop::sample::select(vec![
            "/chat/", "/CHAT", "/chats", "/chat.html", "/nope", "//chat", "/index.html",
            "/healthz", "/chat/x",
        ]),
    ]
}

fn encoding() -> impl Strategy<Value = Encoding> + Clone {
    prop_oneof![
        4 => Just(Encoding::Needed),
        1 => Just(Encoding::Everything),
        1 => Just(Encoding::PlusForSpace),
    ]
}

/// A parameter `name` given zero, one or two times, with values from `values`.
fn param(
    name: &'static str,
    values: Vec<String>,
    weights: (u32, u32, u32),
) -> BoxedStrategy<Vec<(u16, Param)>> {
    let one = (any::<u16>(), prop::sample::select(values), encoding()).prop_map(
        move |(place, value, encoding)| {
            (
                place,
                Param {
                    name,
                    value,
                    encoding,
                },
            )
        },
    );
    prop_oneof![
        weights.0 => vec(one.clone(), 0..=0),
        weights.1 => vec(one.clone(), 1..=1),
        weights.2 => vec(one, 2..=2),
    ]
    .boxed()
}

fn params(token: &str) -> impl Strategy<Value = Option<Vec<Param>>> {
    let mut tokens = vec![token.to_string(); 12];
    tokens.extend([
        token.to_uppercase(),
        format!("{token} "),
        format!(" {token}"),
        token[..token.len() - 1].to_string(),
        format!("{token}x"),
        String::new(),
        "dev-token".into(),
    ]);
    let rooms: Vec<String> = [
        "lobby",
        "lobby",
        "lobby",
        "ops-1",
        "ops-1",
        "a",
        "A_b-9",
        " lobby ",
        "\u{a0}lobby\u{3000}",
        "lobby\u{200b}",
        "",
        "   ",
        "a room",
        "team.secret",
        "é",
        "lobby\u{85}",
        "room/1",
    ]
    .into_iter()
    .map(String::from)
    .chain(["r".repeat(32), "r".repeat(33)])
    .collect();
    let others = |values: &[&str]| values.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let all = (
        param("token", tokens, (2, 12, 2)),
        param("room", rooms, (3, 10, 1)),
        param("name", others(&["ada", " bo ", "<script>", ""]), (4, 4, 1)),
        param("since", others(&["0", "5", "-1", "x"]), (8, 1, 1)),
        param("epoch", others(&["e1", "", &"e".repeat(70)]), (8, 1, 1)),
        param(
            "session",
            others(&["0123456789abcdef0123456789abcdef", "nope"]),
            (8, 1, 1),
        ),
        param("x", others(&["1", "token"]), (8, 1, 1)),
    );
    prop_oneof![
        1 => Just(None),
        12 => all.prop_map(|(a, b, c, d, e, f, g)| {
            let mut placed: Vec<(u16, Param)> =
                [a, b, c, d, e, f, g].into_iter().flatten().collect();
            placed.sort_by_key(|(place, _)| *place);
            Some(placed.into_iter().map(|(_, p)| p).collect())
        }),
    ]
}

/// A header `name` given zero, one or two times, with values from `values`.
fn header(
    name: &'static str,
    values: Vec<String>,
    weights: (u32, u32, u32),
) -> BoxedStrategy<Vec<(u16, Header)>> {
    let casing = prop_oneof![
        6 => Just(u32::MAX), // as RFC 9110 writes it (see `canonical`)
        1 => Just(0u32),
        1 => Just(u32::MAX - 1),
        2 => any::<u32>(),
    ];
    let one = (any::<u16>(), casing, prop::sample::select(values)).prop_map(
        move |(place, casing, value)| {
            let casing = if casing == u32::MAX {
                canonical(name)
            } else {
                casing
            };
            (
                place,
                Header {
                    name,
                    casing,
                    value,
                },
            )
        },
    );
    prop_oneof![
        weights.0 => vec(one.clone(), 0..=0),
        weights.1 => vec(one.clone(), 1..=1),
        weights.2 => vec(one, 2..=2),
    ]
    .boxed()
}

/// The casing bits of `Sec-WebSocket-Key`-style names: capitals where RFC 9110 writes them.
fn canonical(name: &str) -> u32 {
    name.chars()
        .take(32)
        .enumerate()
        .filter(|(_, c)| c.is_ascii_uppercase())
        .fold(0, |bits, (i, _)| bits | 1 << i)
}

fn headers(port: u16) -> impl Strategy<Value = Vec<Header>> {
    let s = |values: &[&str]| values.iter().map(|v| v.to_string()).collect::<Vec<_>>();
    let good = format!("http://127.0.0.1:{port}");
    let mut origins = vec![good.clone(); 10];
    origins.extend([
        format!("http://localhost:{port}"),
        format!("http://localhost:{port}"),
        format!(" {good}"),
        format!("{good}\t"),
        format!("{good}/"),
        good.to_uppercase(),
        format!("https://127.0.0.1:{port}"),
        format!("http://127.0.0.1:{}", port.wrapping_add(1)),
        "http://evil.example".into(),
        "null".into(),
        String::new(),
    ]);
    let all = (
        header(
            "Upgrade",
            s(&[
                "websocket",
                "websocket",
                "websocket",
                "websocket",
                "websocket",
                "websocket",
                "WebSocket",
                "h2c, websocket",
                "websocket ,h2c",
                "websockets",
                "h2c",
                "web socket",
                "",
            ]),
            (2, 16, 1),
        ),
        header(
            "Connection",
            s(&[
                "Upgrade",
                "Upgrade",
                "Upgrade",
                "Upgrade",
                "Upgrade",
                "Upgrade",
                "upgrade",
                "keep-alive, Upgrade",
                "Upgrade,keep-alive",
                "close, upgrade",
                "keep-alive",
                "close",
                "Upgradex",
                "",
            ]),
            (2, 16, 1),
        ),
        header(
            "Sec-WebSocket-Key",
            s(&[
                WS_KEY,
                WS_KEY,
                WS_KEY,
                WS_KEY,
                "AQIDBAUGBwgJCgsMDQ4PEA==",
                "",
                "not a key",
                "dGhlIHNhbXBsZSBub25jZQ",
            ]),
            (1, 16, 1),
        ),
        header(
            "Sec-WebSocket-Version",
            s(&["13", "13", "13", "8", "12", "", "13, 8", "013", " 13"]),
            (2, 16, 1),
        ),
        header("Origin", origins, (2, 16, 1)),
        header("X-Extra", s(&["1", "Upgrade", "websocket"]), (6, 1, 1)).prop_map(|hs| {
            // Other headers a client may send: none of them changes an answer.
            hs.into_iter()
                .enumerate()
                .map(|(i, (place, mut h))| {
                    h.name = [
                        "Sec-WebSocket-Protocol",
                        "Sec-WebSocket-Extensions",
                        "X-Forwarded-For",
                    ][i % 3];
                    h.value = ["chat", "permessage-deflate", "10.0.0.1"][i % 3].into();
                    (place, h)
                })
                .collect::<Vec<_>>()
        }),
    );
    all.prop_map(|(a, b, c, d, e, f)| {
        let mut placed: Vec<(u16, Header)> = [a, b, c, d, e, f].into_iter().flatten().collect();
        placed.sort_by_key(|(place, _)| *place);
        placed.into_iter().map(|(_, h)| h).collect()
    })
}

fn request(port: u16, token: &str) -> impl Strategy<Value = Req> {
    (
        method(),
        prop::bool::weighted(0.05),
        path(),
        params(token),
        headers(port),
    )
        .prop_map(|(method, absolute_form, path, params, headers)| Req {
            method,
            absolute_form,
            path,
            params,
            headers,
        })
}

// ---------------------------------------------------------------------------------------------
// The exchange
// ---------------------------------------------------------------------------------------------

/// A response head.
#[derive(Debug)]
struct Answer {
    status: u16,
    head: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.head.lines().skip(1).find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
        })
    }
}

/// Send `request` on a new connection and read the response head, all within
/// [`ANSWER_TIMEOUT`]; then reset the connection (no TIME_WAIT left behind, however many cases
/// run). Only the head is read: a HEAD answer has no body, and no check here needs one.
fn exchange(addr: SocketAddr, request: &str) -> Result<Answer, String> {
    let deadline = Instant::now() + ANSWER_TIMEOUT;
    let mut stream =
        TcpStream::connect_timeout(&addr, ANSWER_TIMEOUT).map_err(|e| format!("connect: {e}"))?;
    socket2::SockRef::from(&stream)
        .set_linger(Some(Duration::ZERO))
        .map_err(|e| format!("SO_LINGER: {e}"))?;
    stream
        .set_write_timeout(Some(ANSWER_TIMEOUT))
        .map_err(|e| e.to_string())?;
    stream
        .write_all(request.as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("no status in {head:?}"))?;
            return Ok(Answer { status, head });
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!(
                "no whole response head within {ANSWER_TIMEOUT:?} (a hang); got {:?}",
                String::from_utf8_lossy(&buf)
            ));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        match stream.read(&mut chunk) {
            Ok(0) => {
                return Err(format!(
                    "connection closed without a response head; got {:?}",
                    String::from_utf8_lossy(&buf)
                ))
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(format!(
                    "read: {e}; got {:?}",
                    String::from_utf8_lossy(&buf)
                ))
            }
        }
    }
}

/// A relay for the property, with INVALID_ROOM=refuse so that the room check has a status too.
fn start_relay() -> (Relay, RelaySettings) {
    let relay = Relay::builder().env("INVALID_ROOM", "refuse").start();
    let model = RelaySettings {
        token: relay.token.clone(),
        allowed_origins: vec![
            format!("http://localhost:{}", relay.port()),
            format!("http://127.0.0.1:{}", relay.port()),
        ],
    };
    (relay, model)
}

/// After the property: the process is up, `/healthz` answers 200, and nothing panicked.
fn assert_still_healthy(relay: &mut Relay) {
    assert!(
        relay.try_exit_status().is_none(),
        "the relay exited: {:?}",
        relay.try_exit_status()
    );
    let health = exchange(
        relay.addr,
        &format!(
            "GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{}\r\n\r\n",
            relay.port()
        ),
    )
    .unwrap_or_else(|e| panic!("GET /healthz after the property: {e}"));
    assert_eq!(health.status, 200, "GET /healthz: {}", health.head);
    let logs = relay.logs();
    assert!(
        !logs.contains("panicked"),
        "the relay logged a panic:\n{logs}"
    );
}

#[test]
fn upgrade_requests_are_answered_as_protocol_md_says() {
    let (mut relay, settings) = start_relay();
    let (addr, port) = (relay.addr, relay.port());
    check(
        "upgrade_requests",
        256,
        request(port, &settings.token),
        |req| {
            let text = req.render(port);
            let allowed = model(&req, &settings);
            let answer = exchange(addr, &text)
                .map_err(|e| TestCaseError::fail(format!("request {text:?}: {e}")))?;
            prop_assert!(
                allowed.contains(&answer.status),
                "request {:?}\n  model: one of {:?}\n  relay: {}",
                text,
                allowed,
                answer.head
            );
            let accept = answer.header("sec-websocket-accept");
            if answer.status == 101 {
                let key = req.header_values("sec-websocket-key")[0];
                let expected = derive_accept_key(key.as_bytes());
                prop_assert_eq!(
                    accept,
                    Some(expected.as_str()),
                    "request {:?}: the accept value of {:?}",
                    text,
                    key
                );
            } else {
                prop_assert!(
                    accept.is_none(),
                    "request {:?}: a refusal carries no Sec-WebSocket-Accept: {}",
                    text,
                    answer.head
                );
            }
            Ok(())
        },
    );
    assert_still_healthy(&mut relay);
}

/// Found while writing the model (docs/FUZZING.md, "Findings"). RFC 6455 §4.2.1: the key is
/// "a base64-encoded value that, when decoded, is 16 bytes in length", and §11.3.1: it "MUST
/// NOT appear more than once in an HTTP request"; a handshake that does not match "MUST" be
/// refused ("such as 400 Bad Request"). PROTOCOL.md: malformed WebSocket handshake → 400.
#[test]
fn a_malformed_sec_websocket_key_is_refused_with_400() {
    let (mut relay, _) = start_relay();
    let port = relay.port();
    let request = |keys: &[&str]| {
        let mut r = format!(
            "GET /chat?{} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nOrigin: {}\r\n",
            relay.chat_query("ada", "lobby"),
            relay.origin()
        );
        for k in keys {
            r.push_str(&format!("Sec-WebSocket-Key: {k}\r\n"));
        }
        r.push_str("\r\n");
        r
    };
    let good = exchange(relay.addr, &request(&[WS_KEY])).expect("answer");
    assert_eq!(good.status, 101, "the well-formed request: {}", good.head);
    let mut accepted = Vec::new();
    for keys in [
        &[""][..],
        &["not a key"],
        &["dGhlIHNhbXBsZSBub25jZQ"],   // 16 bytes, padding missing
        &["AQIDBAUGBwgJCgsMDQ4P"],     // 15 bytes
        &["AQIDBAUGBwgJCgsMDQ4PEBES"], // 18 bytes
        &[WS_KEY, "AQIDBAUGBwgJCgsMDQ4PEA=="],
    ] {
        let answer = exchange(relay.addr, &request(keys)).expect("answer");
        if answer.status != 400 {
            accepted.push(format!("{keys:?} → {}", answer.status));
        }
    }
    assert_still_healthy(&mut relay);
    assert!(
        accepted.is_empty(),
        "malformed keys not refused with 400: {accepted:#?}"
    );
}

/// Found while writing the model (docs/FUZZING.md, "Findings"). RFC 6455 §4.4: "If the server
/// doesn't support the requested version, it MUST respond with a |Sec-WebSocket-Version| header
/// field … containing all versions it is willing to use" (§4.2.2 suggests 426). PROTOCOL.md
/// answers a malformed handshake with 400, which stays right; the header is what is missing.
#[test]
fn an_unsupported_version_is_refused_with_the_version_the_relay_speaks() {
    let (mut relay, _) = start_relay();
    let port = relay.port();
    let mut wrong = Vec::new();
    for version in ["8", "12", "14", ""] {
        let request = format!(
            "GET /chat?{} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\n\
             Sec-WebSocket-Version: {version}\r\nOrigin: {}\r\n\r\n",
            relay.chat_query("ada", "lobby"),
            relay.origin()
        );
        let answer = exchange(relay.addr, &request).expect("answer");
        let advertised = answer
            .header("sec-websocket-version")
            .is_some_and(|v| lists_token(&[v], "13"));
        if !matches!(answer.status, 400 | 426) || !advertised {
            wrong.push(format!("version {version:?} → {}", answer.head));
        }
    }
    assert_still_healthy(&mut relay);
    assert!(
        wrong.is_empty(),
        "refusals without Sec-WebSocket-Version: 13: {wrong:#?}"
    );
}
