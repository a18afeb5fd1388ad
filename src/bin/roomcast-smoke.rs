//! `roomcast-smoke URL`: connect, publish one message, wait for it to come back, exit 0.
//!
//! For deploy pipelines and first checks of a production relay: works against any relay of the
//! compatible contract, directly or through a proxy, over `ws://`/`http://` or
//! `wss://`/`https://` (rustls, compiled in; the system's trusted roots, plus `--ca-file`).
//! The exit code says what failed (see `--help`); a refused upgrade says whether the token or
//! the Origin is the thing to check. The token is never printed.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::Connector;

const EXIT_CODES: &str = "\
Exit codes:
  0  the message came back: the relay accepts, publishes and delivers
  1  connected, but the round trip failed (no echo in time, an error event, the connection closed)
  2  usage: a bad flag, URL or --ca-file
  3  not reachable: DNS, TCP, TLS or the upgrade timed out
  4  refused at the upgrade: 401 (token), 403 (Origin), 404 (path) or another 4xx status
  5  unavailable: 503 (relay full or shutting down) or another 5xx; try again later";

/// Connect to a roomcast relay, publish one message and wait for it to come back.
#[derive(Debug, Parser)]
#[command(name = "roomcast-smoke", version, after_help = EXIT_CODES)]
struct Args {
    /// The relay: its base URL (`http://localhost:8080`, `https://chat.example.com`, a path
    /// prefix of a proxy works too) or the full `ws[s]://HOST/chat` URL.
    url: String,
    /// Token to present [default: dev-token]. Never printed.
    #[arg(long, env = "CHAT_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Origin header to send [default: the URL's scheme, host and port, as a page served from
    /// there would send]. Must be in the relay's ALLOWED_ORIGINS.
    #[arg(long)]
    origin: Option<String>,
    /// Room to publish in.
    #[arg(long, default_value = "smoke")]
    room: String,
    /// Display name.
    #[arg(long, default_value = "smoke")]
    name: String,
    /// Extra PEM certificates to trust for wss:// (a private CA, a self-signed proxy).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Give up connecting, and give up waiting for the echo, after this many milliseconds each.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Only ask the relay's plain-HTTP `/readyz` (0: ready, 5: not ready, 3: unreachable), for
    /// a container's HEALTHCHECK on its own port; nothing is published.
    #[arg(long)]
    readyz: bool,
}

/// How the check failed; each has its exit code.
#[derive(Debug)]
enum Failure {
    RoundTrip(String),
    Usage(String),
    Unreachable(String),
    Refused(String),
    Unavailable(String),
}

impl Failure {
    fn exit_code(&self) -> u8 {
        match self {
            Failure::RoundTrip(_) => 1,
            Failure::Usage(_) => 2,
            Failure::Unreachable(_) => 3,
            Failure::Refused(_) => 4,
            Failure::Unavailable(_) => 5,
        }
    }

    fn message(&self) -> &str {
        match self {
            Failure::RoundTrip(m)
            | Failure::Usage(m)
            | Failure::Unreachable(m)
            | Failure::Refused(m)
            | Failure::Unavailable(m) => m,
        }
    }
}

/// The upgrade URL: the base URL with `/chat` appended unless it is already there, a WebSocket
/// scheme, and token, name and room set in the query (other query parameters kept).
fn chat_url(args: &Args) -> Result<url::Url, Failure> {
    let mut url = url::Url::parse(&args.url)
        .map_err(|e| Failure::Usage(format!("not a URL: {}: {e}", args.url)))?;
    let scheme = match url.scheme() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        other => {
            return Err(Failure::Usage(format!(
                "unsupported scheme {other}: use http, https, ws or wss"
            )))
        }
    };
    url.set_scheme(scheme)
        .map_err(|_| Failure::Usage("cannot use this URL's scheme".into()))?;
    if !url.path().ends_with("/chat") {
        let path = format!("{}/chat", url.path().trim_end_matches('/'));
        url.set_path(&path);
    }
    let kept: Vec<(String, String)> = url
        .query_pairs()
        .filter(|(k, _)| !matches!(&**k, "token" | "name" | "room"))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    let token_in_url = url
        .query_pairs()
        .find(|(k, _)| k == "token")
        .map(|(_, v)| v.into_owned());
    let token = args
        .token
        .clone()
        .or(token_in_url)
        .unwrap_or_else(|| "dev-token".into());
    let mut query = url.query_pairs_mut();
    query
        .clear()
        .extend_pairs(kept)
        .append_pair("token", &token)
        .append_pair("name", &args.name)
        .append_pair("room", &args.room);
    drop(query);
    Ok(url)
}

/// The Origin a page served from the relay's own address would send.
fn default_origin(url: &url::Url) -> String {
    let scheme = if url.scheme() == "wss" {
        "https"
    } else {
        "http"
    };
    let host = url.host_str().unwrap_or("localhost");
    match url.port() {
        Some(port) => format!("{scheme}://{host}:{port}"),
        None => format!("{scheme}://{host}"),
    }
}

/// rustls with the system's trusted roots and `ca_file`'s certificates.
fn tls_connector(ca_file: Option<&PathBuf>) -> Result<Connector, Failure> {
    use rustls_pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    let native = rustls_native_certs::load_native_certs();
    roots.add_parsable_certificates(native.certs);
    if let Some(path) = ca_file {
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(path)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| Failure::Usage(format!("--ca-file {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(Failure::Usage(format!(
                "--ca-file {}: no PEM certificate in it",
                path.display()
            )));
        }
        for cert in certs {
            roots
                .add(cert)
                .map_err(|e| Failure::Usage(format!("--ca-file {}: {e}", path.display())))?;
        }
    }
    if roots.is_empty() {
        return Err(Failure::Usage(
            "no trusted root certificates: install ca-certificates or pass --ca-file".into(),
        ));
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Failure::Usage(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Connector::Rustls(Arc::new(config)))
}

/// What a refused upgrade means and what to check.
fn explain_refusal(status: u16, origin: &str, body: &str) -> Failure {
    let said = body.trim();
    let said = if said.is_empty() {
        String::new()
    } else {
        format!(" (the relay said: {said})")
    };
    match status {
        401 => Failure::Refused(format!(
            "HTTP 401: the relay refused the token{said}. Check that --token (or CHAT_TOKEN) \
             is the relay's CHAT_TOKEN."
        )),
        403 => Failure::Refused(format!(
            "HTTP 403: the relay refused the Origin {origin}{said}. Pass --origin with an origin \
             in the relay's ALLOWED_ORIGINS (the token was not checked yet)."
        )),
        404 => Failure::Refused(format!(
            "HTTP 404: nothing upgrades at this path{said}. Give the relay's base URL or its \
             /chat URL; behind a proxy, check that it forwards /chat."
        )),
        503 => Failure::Unavailable(format!(
            "HTTP 503: the relay is full or shutting down{said}; try again later"
        )),
        s if s >= 500 => Failure::Unavailable(format!("HTTP {s}{said}")),
        s => Failure::Refused(format!("HTTP {s}: the upgrade was refused{said}")),
    }
}

/// `GET /readyz` over plain HTTP/1.0 at the URL's host and port.
async fn readyz(args: &Args) -> Result<String, Failure> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let url = url::Url::parse(&args.url)
        .map_err(|e| Failure::Usage(format!("not a URL: {}: {e}", args.url)))?;
    if !matches!(url.scheme(), "http" | "ws") {
        return Err(Failure::Usage(
            "--readyz speaks plain HTTP to the relay's own port: use an http:// URL".into(),
        ));
    }
    let host = url.host_str().unwrap_or("localhost").to_string();
    let port = url.port().unwrap_or(80);
    let timeout = Duration::from_millis(args.timeout_ms);
    let exchange = async {
        let mut stream = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| Failure::Unreachable(format!("cannot connect to {host}:{port}: {e}")))?;
        let request = format!("GET /readyz HTTP/1.0\r\nHost: {host}:{port}\r\n\r\n");
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| Failure::Unreachable(format!("{host}:{port}: {e}")))?;
        let mut answer = Vec::new();
        stream
            .take(64 * 1024)
            .read_to_end(&mut answer)
            .await
            .map_err(|e| Failure::Unreachable(format!("{host}:{port}: {e}")))?;
        Ok::<_, Failure>(String::from_utf8_lossy(&answer).into_owned())
    };
    let answer = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| {
            Failure::Unreachable(format!("no answer from {host}:{port} in {timeout:?}"))
        })??;
    let status = answer.split_whitespace().nth(1).unwrap_or("?");
    if status == "200" {
        Ok(format!("ready: {host}:{port}"))
    } else {
        Err(Failure::Unavailable(format!(
            "not ready: /readyz answered {status} (shutting down, or its broker is down)"
        )))
    }
}

async fn smoke(args: &Args) -> Result<String, Failure> {
    let url = chat_url(args)?;
    let origin = args.origin.clone().unwrap_or_else(|| default_origin(&url));
    let connector = if url.scheme() == "wss" {
        Some(tls_connector(args.ca_file.as_ref())?)
    } else {
        None
    };
    let timeout = Duration::from_millis(args.timeout_ms);
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| Failure::Usage(e.to_string()))?;
    request.headers_mut().insert(
        "Origin",
        HeaderValue::from_str(&origin)
            .map_err(|e| Failure::Usage(format!("--origin {origin}: {e}")))?,
    );
    let host = url.host_str().unwrap_or("?").to_string();
    let connect = tokio_tungstenite::connect_async_tls_with_config(request, None, false, connector);
    let (mut ws, _) = match tokio::time::timeout(timeout, connect).await {
        Err(_) => {
            return Err(Failure::Unreachable(format!(
                "timed out after {timeout:?} connecting to {host}"
            )))
        }
        Ok(Err(tungstenite::Error::Http(response))) => {
            let body = response
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            return Err(explain_refusal(response.status().as_u16(), &origin, &body));
        }
        Ok(Err(e)) => {
            return Err(Failure::Unreachable(format!(
                "cannot connect to {host}: {e}"
            )))
        }
        Ok(Ok(pair)) => pair,
    };
    let marker = format!("smoke-{}", uuid::Uuid::new_v4());
    let payload = serde_json::json!({"type": "message", "text": marker}).to_string();
    ws.send(Message::text(payload))
        .await
        .map_err(|e| Failure::RoundTrip(format!("send failed: {e}")))?;
    let wait = async {
        while let Some(msg) = ws.next().await {
            let msg = msg.map_err(|e| Failure::RoundTrip(format!("connection failed: {e}")))?;
            let text = match msg {
                Message::Text(text) => text,
                Message::Close(frame) => {
                    let why = frame
                        .map(|f| format!("{} {}", u16::from(f.code), f.reason))
                        .unwrap_or_else(|| "no code".into());
                    return Err(Failure::RoundTrip(format!(
                        "the relay closed the connection ({why}) before the message came back"
                    )));
                }
                _ => continue,
            };
            let event: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Failure::RoundTrip(format!("the relay sent non-JSON: {e}")))?;
            match event["type"].as_str() {
                Some("message") if event["message"]["text"] == marker.as_str() => return Ok(()),
                Some("error") => {
                    return Err(Failure::RoundTrip(format!(
                        "the relay refused the message: {}",
                        event["code"]
                    )))
                }
                _ => {}
            }
        }
        Err(Failure::RoundTrip(
            "the connection ended before the message came back".into(),
        ))
    };
    tokio::time::timeout(timeout, wait).await.map_err(|_| {
        Failure::RoundTrip(format!("timed out after {timeout:?} waiting for the echo"))
    })??;
    let _ = ws.close(None).await;
    Ok(format!(
        "ok: {marker} came back from {host} (room {})",
        args.room
    ))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => {
            let usage = e.use_stderr();
            let _ = e.print();
            // --help and --version are not failures.
            return if usage {
                ExitCode::from(2)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    let outcome = if args.readyz {
        readyz(&args).await
    } else {
        smoke(&args).await
    };
    match outcome {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(failure) => {
            eprintln!("roomcast-smoke: {}", failure.message());
            ExitCode::from(failure.exit_code())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Args {
        Args::try_parse_from([&["roomcast-smoke"], list].concat()).expect("valid arguments")
    }

    #[test]
    fn base_urls_get_chat_a_websocket_scheme_and_the_query() {
        let url = chat_url(&args(&[
            "https://chat.example.com/rc/",
            "--token",
            "t&x",
            "--room",
            "ops",
        ]))
        .expect("valid");
        assert_eq!(
            url.as_str(),
            "wss://chat.example.com/rc/chat?token=t%26x&name=smoke&room=ops"
        );
        assert_eq!(default_origin(&url), "https://chat.example.com");
        let url = chat_url(&args(&["ws://127.0.0.1:9/chat?token=fromurl&x=1"])).expect("valid");
        assert_eq!(
            url.as_str(),
            "ws://127.0.0.1:9/chat?x=1&token=fromurl&name=smoke&room=smoke"
        );
        assert_eq!(default_origin(&url), "http://127.0.0.1:9");
        assert!(matches!(
            chat_url(&args(&["ftp://x"])),
            Err(Failure::Usage(_))
        ));
    }
}
