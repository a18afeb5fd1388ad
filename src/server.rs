//! The server: the accept loop, the HTTP stage of a connection, the background tasks (heartbeat,
//! outbox budget, metrics upkeep) and the shutdown drain. The state they share is in `relay.rs`.
//!
//! `run` (and `serve`, with the admin listener) takes already-bound listeners, validated
//! settings and any future as its shutdown trigger, so tests and the binary start the same
//! server. Shutdown: upgrades are refused and `/readyz` turns 503 at once; after LAME_DUCK_MS
//! (so a load balancer has stopped routing here) every WebSocket is asked to close with 1001,
//! spread over SHUTDOWN_SPREAD_MS, and the process waits at most `SHUTDOWN_DRAIN_MS` from the
//! first close for connection tasks (which hyper no longer tracks after an upgrade).
//! With direct TLS (TLS_CERT_FILE), the TLS handshake of a public connection runs here too,
//! before hyper sees it.

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
use crate::outbox::Beat;
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
    #[error("starting the connection reactors: {0}")]
    Reactors(std::io::Error),
}

/// Start the reactors that hold open connections (one per runtime worker) on the current
/// runtime, if they are not running yet. `serve` does it before it accepts; the binary does it
/// before it says it is listening, so their epoll descriptors are there from the start.
pub fn start_reactors() -> std::io::Result<()> {
    crate::connection::start_reactors()
}

/// Serve on `listener` until `shutdown` resolves, then drain (see [`serve`]; no admin listener,
/// and only LAME_DUCK_MS ends the lame-duck wait). The caller owns `audit` (the audit log it
/// opened): it flushes it with `Audit::shutdown` once this returns.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    prometheus: Option<PrometheusHandle>,
    audit: Option<Audit>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let listeners = Listeners {
        public: listener,
        admin: None,
    };
    let shutdown = Shutdown {
        begin: shutdown,
        now: std::future::pending::<()>(),
    };
    serve(listeners, settings, prometheus, audit, shutdown).await
}

/// What the relay listens on: the public listener (WebSockets, the page, probes) and, with
/// ADMIN_ADDR, the admin listener (`/metrics`, `/healthz`, `/readyz`, the server API).
pub struct Listeners {
    pub public: TcpListener,
    pub admin: Option<TcpListener>,
}

/// When to stop. `begin` starts a shutdown; `now` (which may resolve with it, later or never)
/// cuts what is left of the lame-duck wait.
pub struct Shutdown<B, N> {
    pub begin: B,
    pub now: N,
}

/// Where a shutdown is.
enum Phase {
    Serving,
    /// Upgrades are refused and `/readyz` answers 503; the open WebSockets stay until then.
    LameDuck {
        until: tokio::time::Instant,
    },
    /// The open WebSockets are being closed with 1001, spread over SHUTDOWN_SPREAD_MS; the
    /// process exits once they are gone or at `until`.
    Closing {
        started: tokio::time::Instant,
        until: tokio::time::Instant,
        open: Vec<Arc<crate::outbox::Outbox>>,
        closed: usize,
    },
}

/// Serve until `shutdown.begin` resolves, then shut down the way a load balancer can follow:
/// refuse upgrades and answer `/readyz` with 503 at once, keep the open WebSockets for
/// LAME_DUCK_MS (none open: no wait), close them with 1001 spread over SHUTDOWN_SPREAD_MS, and
/// wait at most SHUTDOWN_DRAIN_MS from the first close for them to go. The caller owns `audit`,
/// as with [`run`].
pub async fn serve<B, N>(
    listeners: Listeners,
    settings: Settings,
    prometheus: Option<PrometheusHandle>,
    audit: Option<Audit>,
    shutdown: Shutdown<B, N>,
) -> Result<(), ServerError>
where
    B: Future<Output = ()>,
    N: Future<Output = ()>,
{
    let relay = Relay::new(settings, prometheus, audit)?;
    start_reactors().map_err(ServerError::Reactors)?;
    let stop = CancellationToken::new();
    let background = [
        tokio::spawn(heartbeat(relay.clone(), stop.clone())),
        tokio::spawn(metrics_upkeep(relay.clone(), stop.clone())),
        tokio::spawn(outbox_budget(relay.clone(), stop.clone())),
        tokio::spawn(log_upkeep(stop.clone())),
    ];
    if let Some(admin) = listeners.admin {
        tokio::spawn(accept_admin(relay.clone(), admin, stop.clone()));
    }
    let listener = listeners.public;

    // While shutting down, the listener stays open: `/readyz` answers 503 and upgrades are
    // refused with 503 (`shutting_down`) instead of connections being refused outright.
    let begin = shutdown.begin;
    let now = shutdown.now;
    tokio::pin!(begin);
    tokio::pin!(now);
    let mut now_seen = false;
    let mut phase = Phase::Serving;
    loop {
        let serving = matches!(phase, Phase::Serving);
        tokio::select! {
            _ = &mut begin, if serving => {
                relay.begin_shutdown();
                let connections = relay.connection_count();
                let wait = if connections == 0 { Duration::ZERO } else { relay.settings.lame_duck };
                tracing::info!(
                    connections,
                    lame_duck_ms = wait.as_millis() as u64,
                    "shutting down: new connections refused, /readyz answers 503"
                );
                phase = Phase::LameDuck { until: tokio::time::Instant::now() + wait };
            }
            _ = &mut now, if !serving && !now_seen => {
                now_seen = true;
                if let Phase::LameDuck { until } = &mut phase {
                    *until = tokio::time::Instant::now();
                }
            }
            _ = tokio::time::sleep(Duration::from_millis(10)), if !serving => {
                if shutdown_step(&relay, &mut phase) {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    relay.tracker.spawn(serve_public(relay.clone(), stream, peer, stop.clone()));
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
    let drain_until = match phase {
        Phase::Closing { until, .. } => Some(until),
        _ => None,
    };
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
    crate::log::flush_suppressed();
    for task in background {
        task.abort();
    }
    Ok(())
}

/// One step of a shutdown (every 10 ms): end the lame-duck wait when it is over (or when no
/// WebSocket is left), close the share of WebSockets due by now, and say whether the drain is
/// over (nothing left open, or SHUTDOWN_DRAIN_MS since the first close).
fn shutdown_step(relay: &Relay, phase: &mut Phase) -> bool {
    let now = tokio::time::Instant::now();
    if let Phase::LameDuck { until } = phase {
        if now < *until && relay.connection_count() > 0 {
            return false;
        }
        let open = relay.registry.open_outboxes();
        if !open.is_empty() {
            tracing::info!(
                connections = open.len(),
                spread_ms = relay.settings.shutdown_spread.as_millis() as u64,
                "closing every WebSocket with 1001"
            );
        }
        *phase = Phase::Closing {
            started: now,
            until: now + relay.settings.shutdown_drain,
            open,
            closed: 0,
        };
    }
    let Phase::Closing {
        started,
        until,
        open,
        closed,
    } = phase
    else {
        return false;
    };
    let due = closes_due(
        open.len(),
        now.saturating_duration_since(*started),
        relay.settings.shutdown_spread,
    );
    for outbox in &open[*closed..due.max(*closed)] {
        outbox.close(1001);
    }
    *closed = due.max(*closed);
    if *closed == open.len() {
        open.clear();
        *closed = 0;
    }
    relay.connection_count() == 0 || now >= *until
}

/// How many of `total` closes are due `elapsed` into a spread over `spread`: evenly, the first
/// one at once, all of them by the end.
fn closes_due(total: usize, elapsed: Duration, spread: Duration) -> usize {
    if spread.is_zero() || elapsed >= spread {
        return total;
    }
    let share = total as u128 * elapsed.as_micros() / spread.as_micros().max(1);
    (share as usize + 1).min(total)
}

/// Which routes a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Route {
    Public,
    Admin,
}

/// Accept on the admin listener until the server stops. Admin requests are plain HTTP: no
/// upgrade, no connection permit.
async fn accept_admin(relay: Arc<Relay>, listener: TcpListener, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let deadline = tokio::time::Instant::now() + relay.settings.handshake_timeout * 2;
                    let io = TokioIo::new(stream);
                    relay.tracker.spawn(serve_http(relay.clone(), io, peer, deadline, stop.clone(), Route::Admin));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed; retrying shortly");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
}

/// Write the count of access lines LOG_LINES_PER_SECOND left out: a second after the first one
/// was left out (the counts cover that second), and not at all while nothing is.
async fn log_upkeep(stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = crate::log::suppressing() => {}
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => crate::log::flush_suppressed(),
        }
    }
}

/// One accepted connection: with TLS_CERT_FILE, its TLS handshake first, then the HTTP stage.
/// The whole of it, TLS handshake and keep-alive included, has one deadline (twice
/// HANDSHAKE_TIMEOUT_MS; the TLS handshake alone at most HANDSHAKE_TIMEOUT_MS): a client that
/// sends requests and never reads the answers would otherwise hold hyper in a write with no
/// timeout, and a file descriptor with it. Plain HTTP here is probes, scrapes and the page;
/// clients simply reconnect.
async fn serve_public(
    relay: Arc<Relay>,
    stream: TcpStream,
    peer: SocketAddr,
    stop: CancellationToken,
) {
    let handshake_timeout = relay.settings.handshake_timeout;
    let deadline = tokio::time::Instant::now() + handshake_timeout * 2;
    let Some(tls) = relay.settings.tls.clone() else {
        return serve_http(
            relay,
            TokioIo::new(stream),
            peer,
            deadline,
            stop,
            Route::Public,
        )
        .await;
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
        Ok(stream) => {
            let io = TokioIo::new(stream);
            serve_http(relay, io, peer, deadline, stop, Route::Public).await
        }
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
    route: Route,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let handshake_timeout = relay.settings.handshake_timeout;
    let deadline = tokio::time::sleep_until(deadline);
    let service_relay = relay.clone();
    let service = service_fn(move |req| {
        let relay = service_relay.clone();
        async move {
            match route {
                Route::Public => crate::http::handle(relay, req, peer).await,
                Route::Admin => crate::http::handle_admin(relay, req, peer).await,
            }
        }
    });
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
    let mut outboxes = Vec::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => {}
        }
        // Without the shard's lock: an idle connection's ping is written from here.
        relay.registry.shard_outboxes(shard, &mut outboxes);
        let pinged = outboxes
            .drain(..)
            .filter(|o| o.heartbeat() == Beat::Pinged)
            .count();
        relay.metrics.socket_writes.increment(pinged as u64);
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
///
/// The task sleeps until a charge crosses the budget (`outbox::over_budget`), then checks every
/// OUTBOX_BUDGET_CHECK until the sum is back under it: no periodic wake-up while the relay is
/// within budget, which is always for an idle one.
async fn outbox_budget(relay: Arc<Relay>, stop: CancellationToken) {
    let budget = relay.settings.outbox_total_max_bytes;
    let target = budget / 100 * OUTBOX_BUDGET_TARGET_PERCENT;
    crate::outbox::set_total_budget(budget);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = crate::outbox::over_budget() => {}
        }
        // Bounded: each round closes queues or waits; the sum falls as closed queues drop.
        while crate::outbox::total_queued_bytes() > budget {
            let closed = relay.registry.close_largest_queues(budget, target);
            for _ in 0..closed {
                relay.metrics.limit_closed(Limit::OutboxTotal);
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(OUTBOX_BUDGET_CHECK) => {}
            }
        }
    }
}

/// Histograms are buffered by the exporter until drained; drain them regularly even when
/// nobody scrapes, so that buffer stays bounded.
/// How often histogram samples are folded into their buckets. Until then the exporter keeps
/// every sample (8 B each): a fan-out of 100,000 deliveries/s records 100,000 a second, so the
/// interval bounds that memory.
const METRICS_UPKEEP: Duration = Duration::from_secs(1);

async fn metrics_upkeep(relay: Arc<Relay>, stop: CancellationToken) {
    let Some(handle) = relay.prometheus.clone() else {
        return;
    };
    let mut interval = tokio::time::interval(METRICS_UPKEEP);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = interval.tick() => crate::metrics::upkeep(&handle),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closes_are_spread_evenly_the_first_at_once_all_by_the_end() {
        let spread = Duration::from_millis(1000);
        let due = |ms: u64| closes_due(100, Duration::from_millis(ms), spread);
        assert_eq!(due(0), 1);
        assert_eq!(due(250), 26);
        assert_eq!(due(500), 51);
        assert_eq!(due(999), 100);
        assert_eq!(due(1000), 100);
        assert_eq!(closes_due(100, Duration::ZERO, Duration::ZERO), 100);
        assert_eq!(closes_due(0, Duration::from_millis(10), spread), 0);
        assert_eq!(closes_due(3, Duration::from_millis(10), spread), 1);
    }
}
