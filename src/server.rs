//! The server: accept loop, shared relay state, connection registry, heartbeat, shutdown.
//!
//! `run` takes an already-bound listener, validated settings and any future as its shutdown
//! trigger, so tests and the binary start the same server. Shutdown: stop accepting, `/readyz`
//! turns 503, every WebSocket is asked to close with 1001, and the process waits at most
//! `SHUTDOWN_DRAIN_MS` for connection tasks (which hyper no longer tracks after an upgrade).

use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use metrics_exporter_prometheus::PrometheusHandle;
use slab::Slab;
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::broker::{Broker, MemoryBroker};
use crate::config::Settings;
use crate::hub::{Hub, HubSettings};
use crate::metrics::Metrics;
use crate::outbox::Outbox;

/// Registry shards; the heartbeat visits one shard per tick, so pings are spread over the
/// whole interval instead of sweeping every socket at once.
const REGISTRY_SHARDS: usize = 64;
/// Open files kept free for the listener, HTTP requests, /metrics scrapes and logs.
const RESERVED_FDS: u64 = 100;

/// The default connection limit for an open-file limit.
pub fn default_max_connections(nofile: u64) -> usize {
    nofile.saturating_sub(RESERVED_FDS).max(1) as usize
}

/// Every open WebSocket's outbox, for the heartbeat and for shutdown.
pub struct Registry {
    shards: Vec<Mutex<Slab<Arc<Outbox>>>>,
    next: AtomicUsize,
}

/// Where a connection sits in the [`Registry`].
pub struct Registration {
    shard: usize,
    key: usize,
}

impl Registry {
    fn new() -> Registry {
        Registry {
            shards: (0..REGISTRY_SHARDS)
                .map(|_| Mutex::new(Slab::new()))
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    fn shard(&self, i: usize) -> std::sync::MutexGuard<'_, Slab<Arc<Outbox>>> {
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(&self, outbox: &Arc<Outbox>) -> Registration {
        let shard = self.next.fetch_add(1, Ordering::Relaxed) % REGISTRY_SHARDS;
        let key = self.shard(shard).insert(outbox.clone());
        Registration { shard, key }
    }

    pub fn unregister(&self, r: Registration) {
        self.shard(r.shard).try_remove(r.key);
    }

    fn for_each_in(&self, shard: usize, f: impl Fn(&Outbox)) {
        for (_, o) in self.shard(shard).iter() {
            f(o);
        }
    }

    /// Bytes queued and not yet written, across every connection.
    fn queued_bytes(&self) -> usize {
        (0..REGISTRY_SHARDS)
            .map(|i| {
                self.shard(i)
                    .iter()
                    .map(|(_, o)| o.queued_bytes())
                    .sum::<usize>()
            })
            .sum()
    }

    fn close_all(&self, code: u16) {
        for i in 0..REGISTRY_SHARDS {
            self.for_each_in(i, |o| o.close(code));
        }
    }
}

/// State shared by every connection and request.
pub struct Relay {
    pub settings: Settings,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    pub metrics: Metrics,
    pub registry: Registry,
    pub tracker: TaskTracker,
    max_connections: usize,
    connections: AtomicUsize,
    started: tokio::time::Instant,
    shutting_down: AtomicBool,
    prometheus: Option<PrometheusHandle>,
}

/// One reserved connection slot; released when dropped, i.e. exactly when the connection ends.
pub struct ConnectionPermit {
    relay: Arc<Relay>,
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.relay.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Relay {
    pub fn connection_count(&self) -> usize {
        self.connections.load(Ordering::Acquire)
    }

    /// Milliseconds since the relay started: the clock of per-connection windows.
    pub fn now_ms(&self) -> u32 {
        self.started.elapsed().as_millis() as u32
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::Acquire)
    }

    /// Reserve a connection slot, or `None` when the relay is full.
    pub fn try_acquire(self: &Arc<Self>) -> Option<ConnectionPermit> {
        self.connections
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max_connections).then_some(n + 1)
            })
            .ok()?;
        Some(ConnectionPermit {
            relay: self.clone(),
        })
    }

    pub fn render_metrics(&self) -> String {
        self.metrics.rooms.set(self.hub.room_count() as f64);
        self.metrics.connections.set(self.connection_count() as f64);
        self.metrics
            .outbox_queued_bytes
            .set(self.registry.queued_bytes() as f64);
        let mut out = self
            .prometheus
            .as_ref()
            .map(|h| h.render())
            .unwrap_or_default();
        crate::metrics::render_process_metrics(&mut out);
        out
    }
}

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("listener has no local address: {0}")]
    LocalAddr(#[from] std::io::Error),
}

/// Serve on `listener` until `shutdown` resolves, then drain.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    prometheus: Option<PrometheusHandle>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    let metrics = Metrics::new();
    let max_connections = settings
        .max_connections
        .unwrap_or_else(|| default_max_connections(crate::limits::nofile_limit()));
    metrics::gauge!(crate::metrics::MAX_CONNECTIONS).set(max_connections as f64);
    let hub = Arc::new(Hub::new(
        HubSettings {
            history_limit: settings.history_limit,
            history_max_bytes: settings.history_max_bytes,
            max_rooms: settings.max_rooms,
            outbox_max_bytes: settings.outbox_max_bytes,
            presence_interval: settings.presence_interval,
        },
        metrics.clone(),
    ));
    let relay = Arc::new(Relay {
        broker: Arc::new(MemoryBroker::new(hub.clone())),
        hub,
        metrics,
        registry: Registry::new(),
        tracker: TaskTracker::new(),
        max_connections,
        connections: AtomicUsize::new(0),
        started: tokio::time::Instant::now(),
        shutting_down: AtomicBool::new(false),
        prometheus,
        settings,
    });
    let stop = CancellationToken::new();
    let background = [
        tokio::spawn(heartbeat(relay.clone(), stop.clone())),
        tokio::spawn(metrics_upkeep(relay.clone(), stop.clone())),
    ];

    // While draining, the listener stays open: `/readyz` answers 503 and upgrades are refused
    // with 503 (`shutting_down`) instead of connections being refused outright.
    tokio::pin!(shutdown);
    let mut drain_until: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = &mut shutdown, if drain_until.is_none() => {
                tracing::info!(connections = relay.connection_count(), "shutting down");
                relay.shutting_down.store(true, Ordering::Release);
                relay.registry.close_all(1001);
                drain_until = Some(tokio::time::Instant::now() + relay.settings.shutdown_drain);
            }
            _ = tokio::time::sleep(Duration::from_millis(10)), if drain_until.is_some() => {
                let over = drain_until.is_some_and(|t| tokio::time::Instant::now() >= t);
                if relay.connection_count() == 0 || over {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let _ = stream.set_nodelay(true);
                    relay.tracker.spawn(serve_http(relay.clone(), stream, stop.clone()));
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

/// One HTTP/1 connection; after an upgrade, hyper hands the socket over to `connection::spawn`.
/// The whole HTTP stage of a connection, keep-alive included, has one deadline (twice
/// HANDSHAKE_TIMEOUT_MS): a client that sends requests and never reads the answers would
/// otherwise hold hyper in a write with no timeout, and a file descriptor with it. Plain HTTP
/// here is probes, scrapes and the page; clients simply reconnect.
async fn serve_http(relay: Arc<Relay>, stream: TcpStream, stop: CancellationToken) {
    let handshake_timeout = relay.settings.handshake_timeout;
    let deadline = tokio::time::sleep(handshake_timeout * 2);
    let service_relay = relay.clone();
    let service = service_fn(move |req| crate::http::handle(service_relay.clone(), req));
    let conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(handshake_timeout)
        .max_buf_size(16 * 1024)
        .serve_connection(TokioIo::new(stream), service)
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
