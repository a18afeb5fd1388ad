//! `roomcast-smoke URL`: connect, publish one message, wait for it to come back, exit 0.
//!
//! Works against any relay of the compatible contract. URL is the relay's base
//! (`http://localhost:8080`) or a full `ws://.../chat?...` URL; token, room and name default to
//! `CHAT_TOKEN` (or `dev-token`), `smoke` and `smoke`. Exits non-zero with a reason otherwise.

use std::process::ExitCode;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

const TIMEOUT: Duration = Duration::from_secs(10);

fn chat_url(arg: &str) -> Result<url::Url, String> {
    let mut url = url::Url::parse(arg).map_err(|e| format!("not a URL: {arg}: {e}"))?;
    let scheme = match url.scheme() {
        "http" | "ws" => "ws",
        "https" | "wss" => "wss",
        other => return Err(format!("unsupported scheme {other}")),
    };
    url.set_scheme(scheme)
        .map_err(|_| "cannot set scheme".to_string())?;
    if url.path() != "/chat" {
        let token = std::env::var("CHAT_TOKEN").unwrap_or_else(|_| "dev-token".into());
        url.set_path("/chat");
        url.query_pairs_mut()
            .clear()
            .append_pair("token", &token)
            .append_pair("name", "smoke")
            .append_pair("room", "smoke");
    }
    Ok(url)
}

async fn smoke(arg: &str) -> Result<String, String> {
    let url = chat_url(arg)?;
    let origin = format!(
        "{}://{}",
        if url.scheme() == "wss" {
            "https"
        } else {
            "http"
        },
        url.host_str().unwrap_or("localhost")
    ) + &url.port().map(|p| format!(":{p}")).unwrap_or_default();
    let mut request = url
        .as_str()
        .into_client_request()
        .map_err(|e| e.to_string())?;
    request.headers_mut().insert(
        "Origin",
        HeaderValue::from_str(&origin).map_err(|e| e.to_string())?,
    );
    let (mut ws, _) = tokio::time::timeout(TIMEOUT, tokio_tungstenite::connect_async(request))
        .await
        .map_err(|_| "timed out connecting".to_string())?
        .map_err(|e| format!("connect refused: {e}"))?;
    let marker = format!("smoke-{}", uuid::Uuid::new_v4());
    let payload = serde_json::json!({"type": "message", "text": marker}).to_string();
    ws.send(Message::text(payload))
        .await
        .map_err(|e| format!("send failed: {e}"))?;
    let wait = async {
        while let Some(msg) = ws.next().await {
            let msg = msg.map_err(|e| format!("connection failed: {e}"))?;
            let Message::Text(text) = msg else { continue };
            let event: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| format!("relay sent non-JSON: {e}"))?;
            match event["type"].as_str() {
                Some("message") if event["message"]["text"] == marker.as_str() => return Ok(()),
                Some("error") => {
                    return Err(format!("relay refused the message: {}", event["code"]))
                }
                _ => {}
            }
        }
        Err("connection closed before the message came back".to_string())
    };
    tokio::time::timeout(TIMEOUT, wait)
        .await
        .map_err(|_| "timed out waiting for the echo".to_string())??;
    let _ = ws.close(None).await;
    Ok(format!(
        "ok: {marker} came back from {}",
        url.host_str().unwrap_or("?")
    ))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    let Some(arg) = std::env::args().nth(1) else {
        eprintln!("usage: roomcast-smoke URL   (e.g. http://localhost:8080)");
        return ExitCode::from(2);
    };
    match smoke(&arg).await {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(reason) => {
            eprintln!("roomcast-smoke: {reason}");
            ExitCode::FAILURE
        }
    }
}
