//! Plain HTTP/1.1 over TCP, written by hand so tests control every byte: any request to any
//! [`Endpoint`] (a relay, nginx, Prometheus), responses read by Content-Length, chunked, or to EOF.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::raw::upgrade_head;
use super::relay::{Endpoint, Relay};
use super::HTTP_TIMEOUT;

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

pub(crate) fn status_of(head: &str) -> Option<u16> {
    head.split_whitespace().nth(1)?.parse().ok()
}

pub(crate) fn header_of(head: &str, name: &str) -> Option<String> {
    head.lines().skip(1).find_map(|line| {
        let (k, v) = line.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case(name)
            .then(|| v.trim().to_string())
    })
}

/// Read an HTTP response head; returns it and any bytes read past it.
pub(crate) async fn read_head(
    stream: &mut (impl AsyncRead + Unpin),
) -> std::io::Result<(String, Vec<u8>)> {
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

/// Send a raw request and read the response, within [`HTTP_TIMEOUT`].
pub async fn http_exchange(addr: SocketAddr, request: &str) -> std::io::Result<HttpResponse> {
    http_exchange_within(addr, request, HTTP_TIMEOUT).await
}

/// Send a raw request and read the response (head and body by Content-Length, chunked, or to EOF)
/// within `timeout`.
pub async fn http_exchange_within(
    addr: SocketAddr,
    request: &str,
    timeout: Duration,
) -> std::io::Result<HttpResponse> {
    let fut = async {
        let stream = TcpStream::connect(addr).await?;
        exchange_on(stream, request).await
    };
    match tokio::time::timeout(timeout, fut).await {
        Ok(r) => r,
        Err(_) => Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("HTTP exchange with {addr} timed out after {timeout:?}"),
        )),
    }
}

/// Send a raw request on an open stream (plain or TLS) and read the response.
pub(crate) async fn exchange_on(
    mut stream: impl AsyncRead + AsyncWrite + Unpin,
    request: &str,
) -> std::io::Result<HttpResponse> {
    {
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
    }
}

/// `GET path` request head with `Connection: close` and extra headers.
pub fn get_request(addr: SocketAddr, path: &str, headers: &[(&str, &str)]) -> String {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req
}

/// Plain `GET path` with `Connection: close` and extra headers.
pub async fn try_http_get(
    endpoint: &impl Endpoint,
    path: &str,
    headers: &[(&str, &str)],
) -> std::io::Result<HttpResponse> {
    let addr = endpoint.socket_addr();
    http_exchange(addr, &get_request(addr, path, headers)).await
}

/// [`try_http_get`]; panics if the exchange fails (any status is returned).
pub async fn http_get(
    endpoint: &impl Endpoint,
    path: &str,
    headers: &[(&str, &str)],
) -> HttpResponse {
    try_http_get(endpoint, path, headers)
        .await
        .unwrap_or_else(|e| panic!("GET {path} from {} failed: {e}", endpoint.socket_addr()))
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
