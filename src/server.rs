//! The server: the accept loop, the HTTP stage of a connection, the background tasks (heartbeat,
//! outbox budget, metrics upkeep) and the shutdown drain. The state they share is in `relay.rs`.
//!
//! `run` takes an already-bound listener, validated settings and any future as its shutdown
//! trigger, so tests and the binary start the same server. Shutdown: stop accepting, `/readyz`
//! turns 503, every WebSocket is asked to close with 1001, and the process waits at most
//! `SHUTDOWN_DRAIN_MS` for connection tasks (which hyper no longer tracks after an upgrade).
//! With direct TLS, the TLS handshake runs here too, before hyper sees the connection.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

use crate::audit::Audit;
use crate::config::Settings;
use crate::metrics::{Limit, TlsFailure};
use crate::relay::{Relay, REGISTRY_SHARDS};

/// How long a plain HTTP request to the TLS port may take to read its 400 before we close.
const PLAIN_HTTP_LINGER: Duration = Duration::from_secs(1);
/// How often the process-wide outbox budget is checked.
const OUTBOX_BUDGET_CHECK: Duration = Duration::from_millis(50);
/// Once over the budget, the largest queues are closed until the total is back under this
/// share of it, so the check does not close one connection per tick at the edge.
const OUTBOX_BUDGET_TARGET_PERCENT: usize = 90;

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listener has no local address: {0}")]
    LocalAddr(#[from] std::io::Error),
    #[error(transparent)]
    Broker(#[from] crate::broker_redis::RedisBrokerError),
}

/// Serve on `listener` until `shutdown` resolves, then drain. The caller owns `audit` (the
/// audit log it opened): it flushes it with `Audit::shutdown` once this returns.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    prometheus: Option<PrometheusHandle>,
    audit: Option<Audit>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let relay = Relay::new(settings, prometheus, audit)?;
    let stop = CancellationToken::new();
    let background = [
        tokio::spawn(heartbeat(relay.clone(), stop.clone())),
        tokio::spawn(metrics_upkeep(relay.clone(), stop.clone())),
        tokio::spawn(outbox_budget(relay.clone(), stop.clone())),
    ];

    // While draining, the listener stays open: `/readyz` answers 503 and upgrades are refused
    // with 503 (`shutting_down`) instead of connections being refused outright.
    tokio::pin!(shutdown);
    let mut drain_until: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = &mut shutdown, if drain_until.is_none() => {
                tracing::info!(connections = relay.connection_count(), "shutting down");
                relay.begin_shutdown();
                drain_until = Some(tokio::time::Instant::now() + relay.settings.shutdown_drain);
            }
            _ = tokio::time::sleep(Duration::from_millis(10)), if drain_until.is_some() => {
                let over = drain_until.is_some_and(|t| tokio::time::Instant::now() >= t);
                if relay.connection_count() == 0 || over {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    relay.tracker.spawn(serve(relay.clone(), stream, peer, stop.clone()));
                }
                Err(e) => {
                    // EMFILE and friends: log, pause, keep serving (never fatal).
                    tracing::warn!(error = %e, "accept failed; retrying shortly");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }

    drop(listener);
    stop.cancel();
    relay.tracker.close();
    // What is left: HTTP requests finishing and closing handshakes; a short, bounded wait.
    let left = drain_until.map_or(Duration::ZERO, |t| {
        t.saturating_duration_since(tokio::time::Instant::now())
    });
    let last_wait = left.clamp(Duration::from_millis(100), Duration::from_secs(1));
    if tokio::time::timeout(last_wait, relay.tracker.wait())
        .await
        .is_err()
        || relay.connection_count() > 0
    {
        tracing::warn!(
            left = relay.connection_count(),
            "drain time over; exiting with connections still open"
        );
    }
    for task in background {
        task.abort();
    }
    Ok(())
}

/// One accepted connection: with TLS_CERT_FILE, its TLS handshake first, then the HTTP stage.
/// The whole of it, TLS handshake and keep-alive included, has one deadline (twice
/// HANDSHAKE_TIMEOUT_MS; the TLS handshake alone at most HANDSHAKE_TIMEOUT_MS): a client that
/// sends requests and never reads the answers would otherwise hold hyper in a write with no
/// timeout, and a file descriptor with it. Plain HTTP here is probes, scrapes and the page;
/// clients simply reconnect.
async fn serve(relay: Arc<Relay>, stream: TcpStream, peer: SocketAddr, stop: CancellationToken) {
    let handshake_timeout = relay.settings.handshake_timeout;
    let deadline = tokio::time::Instant::now() + handshake_timeout * 2;
    let Some(tls) = relay.settings.tls.clone() else {
        return serve_http(relay, TokioIo::new(stream), peer, deadline, stop).await;
    };
    let handshake = async {
        if !starts_like_tls(&stream).await {
            return Err(if answer_plain_http(stream).await {
                TlsFailure::PlainHttp
            } else {
                TlsFailure::Handshake
            });
        }
        tls.acceptor()
            .accept(stream)
            .await
            .map_err(|_| TlsFailure::Handshake)
    };
    let accepted = tokio::select! {
        r = tokio::time::timeout(handshake_timeout, handshake) => r.unwrap_or(Err(TlsFailure::Timeout)),
        _ = stop.cancelled() => return,
    };
    match accepted {
        Ok(stream) => serve_http(relay, TokioIo::new(stream), peer, deadline, stop).await,
        Err(why) => relay.metrics.tls_handshake_failed(why),
    }
}

/// Whether the client's first byte is a TLS handshake record's (0x16). Waits for it without
/// taking it from the socket; a connection that ends first is "not TLS".
async fn starts_like_tls(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(stream.peek(&mut first).await, Ok(1) if first[0] == 0x16)
}

/// A client that spoke plain HTTP to the TLS port gets a plain answer saying so (nginx does the
/// same with its 497), rather than a TLS alert its HTTP parser cannot read; then the socket
/// closes. Anything else that is not TLS is simply closed. Returns whether it was answered.
async fn answer_plain_http(mut stream: TcpStream) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut first = [0u8; 1];
    if !matches!(stream.peek(&mut first).await, Ok(1) if first[0].is_ascii_uppercase()) {
        return false;
    }
    const BODY: &str = "this port speaks HTTPS: use https:// or wss://\n";
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{BODY}",
        BODY.len()
    );
    let _ = stream.write_all(answer.as_bytes()).await;
    let _ = stream.shutdown().await;
    // Closing with the request still unread would reset the connection, and the client could
    // lose the answer: read what it sent (a little, briefly) until it closes.
    let mut scratch = [0u8; 1024];
    let _ = tokio::time::timeout(PLAIN_HTTP_LINGER, async {
        let mut left: usize = 16 * 1024;
        while left > 0 {
            match stream.read(&mut scratch).await {
                Ok(0) | Err(_) => break,
                Ok(n) => left = left.saturating_sub(n),
            }
        }
    })
    .await;
    true
}

/// The HTTP stage of one connection (plain or TLS); after an upgrade, hyper hands the socket over
/// to `connection::spawn` (see `http::switch`).
async fn serve_http<I>(
    relay: Arc<Relay>,
    io: TokioIo<I>,
    peer: SocketAddr,
    deadline: tokio::time::Instant,
    stop: CancellationToken,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let handshake_timeout = relay.settings.handshake_timeout;
    let deadline = tokio::time::sleep_until(deadline);
    let service_relay = relay.clone();
    let service = service_fn(move |req| crate::http::handle(service_relay.clone(), req, peer));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout)
        .max_buf_size(16 * 1024)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(conn);
    tokio::pin!(deadline);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = &mut deadline => {}
        _ = stop.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(relay.settings.close_timeout, conn).await;
        }
    }
}

/// Visit one registry shard per tick, so each connection is checked once per interval and the
/// pings of many connections are spread out rather than sent in one burst.
async fn heartbeat(relay: Arc<Relay>, stop: CancellationToken) {
    let tick =
        (relay.settings.heartbeat_interval / REGISTRY_SHARDS as u32).max(Duration::from_millis(1));
    let mut interval = tokio::time::interval(tick);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut shard = 0;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        relay.registry.for_each_in(shard, |o| o.heartbeat());
        shard = (shard + 1) % REGISTRY_SHARDS;
        if shard == 0 {
            let window_ms = relay.settings.rate_window.as_millis().min(u32::MAX as u128) as u32;
            relay.addresses.sweep(relay.now_ms(), window_ms);
        }
    }
}

/// Hold the bytes queued across all connections under OUTBOX_TOTAL_MAX_BYTES: when the sum
/// passes it, the connections with the largest queues are closed with 1013 first (a stalled
/// reader with a full queue goes before a healthy one with a few frames).
async fn outbox_budget(relay: Arc<Relay>, stop: CancellationToken) {
    let budget = relay.settings.outbox_total_max_bytes;
    let target = budget / 100 * OUTBOX_BUDGET_TARGET_PERCENT;
    let mut interval = tokio::time::interval(OUTBOX_BUDGET_CHECK);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        // The process-wide sum is one atomic load; the registry is walked only past the budget.
        if crate::outbox::total_queued_bytes() > budget {
            let closed = relay.registry.close_largest_queues(budget, target);
            for _ in 0..closed {
                relay.metrics.limit_closed(Limit::OutboxTotal);
            }
        }
    }
}

/// Histograms are buffered by the exporter until drained; drain them regularly even when
/// nobody scrapes, so that buffer stays bounded.
async fn metrics_upkeep(relay: Arc<Relay>, stop: CancellationToken) {
    let Some(handle) = relay.prometheus.clone() else {
        return;
    };
    let mut interval = tokio::time::interval(Duration::from_secs(5));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => handle.run_upkeep(),
        }
    }
}
