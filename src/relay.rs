//! The relay's shared state: what every connection, request and background task reaches.
//!
//! `Relay` holds the validated settings, the hub (rooms), the broker (publishing), the audit log
//! (when `AUDIT_LOG` is set), the metrics,
//! the registry of open WebSockets (for the heartbeat, shutdown and the outbox budget), the per
//! source address state and the connection count with its permits. It owns no task and no
//! socket: `server.rs` runs the loops, `http.rs` and `connection.rs` use this state. Keeping it
//! here, apart from the server loop, is what lets dependencies point one way:
//! `server → http → connection → relay → {broker, hub, outbox, address, metrics}`.

use crate::ticket::{Grant, Tickets};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use metrics_exporter_prometheus::PrometheusHandle;
use tokio_util::task::TaskTracker;

use crate::address::Addresses;
use crate::audit::Audit;
use crate::broker::{Broker, MemoryBroker};
use crate::broker_redis::{RedisBroker, RedisBrokerError, RedisSettings, RedisTarget};
use crate::config::Settings;
use crate::hub::{Follower, Hub, HubSettings};
use crate::metrics::Metrics;
use crate::outbox::Outbox;

/// Registry shards; the heartbeat visits one shard per tick, so pings are spread over the
/// whole interval instead of sweeping every socket at once.
pub(crate) const REGISTRY_SHARDS: usize = 64;
/// Open files kept free for the listener, HTTP requests, /metrics scrapes and logs.
const RESERVED_FDS: u64 = 100;
/// The process figures (/proc reads, a listing of every open file) are gathered at most this
/// often; a scrape in between reuses them. Relay counters are always current.
const PROCESS_METRICS_TTL: Duration = Duration::from_secs(1);

/// The default connection limit for an open-file limit.
pub fn default_max_connections(nofile: u64) -> usize {
    nofile.saturating_sub(RESERVED_FDS).max(1) as usize
}

/// Every open WebSocket's outbox, for the heartbeat and for shutdown.
pub struct Registry {
    shards: Vec<Mutex<Slots>>,
    next: AtomicUsize,
}

/// One registry shard: outboxes in numbered slots. An open slot is 8 bytes (`Option<Arc>` has
/// no tag), half of a `slab::Slab` entry, which keeps its free list inside vacant entries; the
/// free list here holds only the numbers of vacant slots, so a registry without churn pays for
/// nothing but the outboxes. The lowest vacant slot is taken first, so long-lived connections
/// keep the low slots, and the vacant slots at the end are cut off: after a wave of
/// connections has left, the shard shrinks back to what the ones that stayed need.
#[derive(Default)]
struct Slots {
    slots: Vec<Option<Arc<Outbox>>>,
    vacant: std::collections::BinaryHeap<std::cmp::Reverse<u32>>,
}

impl Slots {
    fn insert(&mut self, outbox: Arc<Outbox>) -> usize {
        match self.vacant.pop() {
            Some(std::cmp::Reverse(key)) => {
                self.slots[key as usize] = Some(outbox);
                key as usize
            }
            None => {
                self.slots.push(Some(outbox));
                self.slots.len() - 1
            }
        }
    }

    fn remove(&mut self, key: usize) {
        let Some(slot) = self.slots.get_mut(key) else {
            return;
        };
        if slot.take().is_none() {
            return;
        }
        if key + 1 < self.slots.len() {
            self.vacant.push(std::cmp::Reverse(key as u32));
            return;
        }
        while self.slots.last().is_some_and(Option::is_none) {
            self.slots.pop();
        }
        let len = self.slots.len();
        // No vacant number may point past the end (a later push would reuse it while taken).
        self.vacant.retain(|k| (k.0 as usize) < len);
        if self.slots.capacity() > 4 * len.max(8) {
            self.slots.shrink_to(2 * len);
            self.vacant.shrink_to(len);
        }
    }

    fn iter(&self) -> impl Iterator<Item = &Arc<Outbox>> {
        self.slots.iter().flatten()
    }
}

/// Where a connection sits in the [`Registry`].
pub struct Registration {
    shard: u32,
    /// The slot number plus one: never zero, so `Option<Registration>` costs no tag (a
    /// connection keeps one; see ARCHITECTURE.md's budget).
    key_plus_one: std::num::NonZeroU32,
}

impl Registry {
    fn new() -> Registry {
        Registry {
            shards: (0..REGISTRY_SHARDS)
                .map(|_| Mutex::new(Slots::default()))
                .collect(),
            next: AtomicUsize::new(0),
        }
    }

    fn shard(&self, i: usize) -> std::sync::MutexGuard<'_, Slots> {
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(&self, outbox: &Arc<Outbox>) -> Registration {
        let shard = self.next.fetch_add(1, Ordering::Relaxed) % REGISTRY_SHARDS;
        let key = self.shard(shard).insert(outbox.clone());
        // A shard holds at most MAX_CONNECTIONS entries, far below u32::MAX.
        Registration {
            shard: shard as u32,
            key_plus_one: std::num::NonZeroU32::new(key as u32 + 1).expect("key + 1 > 0"),
        }
    }

    pub fn unregister(&self, r: Registration) {
        self.shard(r.shard as usize)
            .remove(r.key_plus_one.get() as usize - 1);
    }

    /// The outboxes registered in `shard`, into `into` (emptied first): the caller works on
    /// them without holding the shard's lock, which registering and leaving connections take.
    pub(crate) fn shard_outboxes(&self, shard: usize, into: &mut Vec<Arc<Outbox>>) {
        into.clear();
        into.extend(self.shard(shard).iter().cloned());
    }

    /// When the queues of the live connections hold more than `budget`, close the largest ones
    /// until they hold at most `target`. Returns how many were closed. Connections already
    /// closing are left out of the sum: their bytes are on their way out (a closed stalled
    /// reader keeps its charge until its close handshake ends), and counting them again would
    /// close a second, innocent connection for the same excess.
    pub(crate) fn close_largest_queues(&self, budget: usize, target: usize) -> usize {
        let mut queues: Vec<(usize, Arc<Outbox>)> = Vec::new();
        for i in 0..REGISTRY_SHARDS {
            queues.extend(
                self.shard(i)
                    .iter()
                    .filter(|o| !o.is_closing())
                    .map(|o| (o.queued_bytes(), o.clone()))
                    .filter(|(queued, _)| *queued > 0),
            );
        }
        let mut total: usize = queues.iter().map(|q| q.0).sum();
        if total <= budget {
            return 0;
        }
        queues.sort_unstable_by_key(|q| std::cmp::Reverse(q.0));
        let mut closed = 0;
        for (queued, outbox) in queues {
            if total <= target {
                break;
            }
            outbox.close_discarding(1013);
            total = total.saturating_sub(queued);
            closed += 1;
        }
        closed
    }

    /// Every open WebSocket's outbox, for a shutdown that closes them a few at a time.
    pub(crate) fn open_outboxes(&self) -> Vec<Arc<Outbox>> {
        let mut all = Vec::new();
        for i in 0..REGISTRY_SHARDS {
            all.extend(self.shard(i).iter().cloned());
        }
        all
    }
}

/// State shared by every connection and request.
pub struct Relay {
    pub settings: Settings,
    pub hub: Arc<Hub>,
    pub broker: Arc<dyn Broker>,
    /// `None` when `AUDIT_LOG` is unset. Record a publish here before it can be delivered; a
    /// refusal (`AuditFull`) means the publish is answered `unavailable`.
    pub audit: Option<Audit>,
    /// This second's handshakes (MAX_HANDSHAKES_PER_SECOND).
    handshakes: Mutex<crate::rate::Window>,
    pub metrics: Metrics,
    pub registry: Registry,
    pub addresses: Addresses,
    pub tracker: TaskTracker,
    max_connections: usize,
    connections: AtomicUsize,
    started: tokio::time::Instant,
    shutting_down: AtomicBool,
    pub(crate) prometheus: Option<PrometheusHandle>,
    process_metrics: Mutex<Option<(tokio::time::Instant, String)>>,
}

/// One reserved connection slot; released when dropped, i.e. exactly when the connection ends.
pub struct ConnectionPermit {
    relay: Arc<Relay>,
}

/// A permit is also its holder's handle on the relay, so a connection keeps one pointer for both.
impl std::ops::Deref for ConnectionPermit {
    type Target = Arc<Relay>;

    fn deref(&self) -> &Arc<Relay> {
        &self.relay
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.relay.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What a token proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// The static `CHAT_TOKEN`: any name, any room, may publish.
    Static,
    /// A signed ticket: its user, rooms and publish flag.
    Ticket(Grant),
}

impl Credential {
    pub fn allows_room(&self, room: &str) -> bool {
        match self {
            Credential::Static => true,
            Credential::Ticket(g) => g.allows(room),
        }
    }

    pub fn may_publish(&self) -> bool {
        match self {
            Credential::Static => true,
            Credential::Ticket(g) => g.publish,
        }
    }
}

impl Relay {
    /// The relay's shared state for `settings`; `prometheus` renders `/metrics` (none in tests
    /// that do not scrape); `audit` is the audit log the binary opened for `AUDIT_LOG` (it keeps
    /// a handle to reopen it on SIGHUP and flush it after the drain).
    pub fn new(
        settings: Settings,
        prometheus: Option<PrometheusHandle>,
        audit: Option<Audit>,
    ) -> Result<Arc<Relay>, RedisBrokerError> {
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
                flush_delay: settings.flush_delay,
                flush_min_members: settings.flush_min_members,
            },
            metrics.clone(),
        ));
        // Settings never carry both (a start-up error).
        let redis_target = match (&settings.redis_url, &settings.redis_cluster_nodes) {
            (Some(url), _) => Some(RedisTarget::Single(url.expose().to_string())),
            (None, Some(nodes)) => Some(RedisTarget::Cluster(
                nodes.iter().map(|n| n.expose().to_string()).collect(),
            )),
            (None, None) => None,
        };
        let broker: Arc<dyn Broker> = match redis_target {
            None => Arc::new(MemoryBroker::new(hub.clone()).with_audit(audit.clone())),
            Some(target) => {
                let redis = RedisBroker::start(
                    hub.clone(),
                    RedisSettings {
                        target,
                        history_limit: settings.history_limit,
                        key_ttl: settings.redis_key_ttl,
                        timeout: settings.redis_timeout,
                        queue_max_bytes: settings.redis_queue_max_bytes,
                    },
                    metrics.clone(),
                    audit.clone(),
                )?;
                // Before any room exists: every room is then a mirror of Redis.
                let follower: Arc<dyn Follower> = redis.clone();
                hub.set_follower(Arc::downgrade(&follower));
                redis
            }
        };
        Ok(Arc::new(Relay {
            broker,
            audit,
            hub,
            metrics,
            registry: Registry::new(),
            addresses: Addresses::default(),
            tracker: TaskTracker::new(),
            max_connections,
            connections: AtomicUsize::new(0),
            started: tokio::time::Instant::now(),
            shutting_down: AtomicBool::new(false),
            prometheus,
            handshakes: Mutex::new(crate::rate::Window::new(0)),
            process_metrics: Mutex::new(None),
            settings,
        }))
    }

    /// Refuse new upgrades from now on (503) and answer `/readyz` with 503. The open WebSockets
    /// stay until the server closes them (after LAME_DUCK_MS, spread over SHUTDOWN_SPREAD_MS);
    /// a connection that registers after this sees the flag and is closed with 1001 at once
    /// (see `connection::spawn`).
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::Release);
    }

    /// Count one handshake against MAX_HANDSHAKES_PER_SECOND; false when this second's are
    /// used up.
    pub fn allow_handshake(&self) -> bool {
        let max = self.settings.max_handshakes_per_second;
        if max == 0 {
            return true;
        }
        let now_ms = self.now_ms();
        let mut w = self.handshakes.lock().unwrap_or_else(|p| p.into_inner());
        !w.over(now_ms, 1000, max)
    }

    /// Write a refused auth to the audit log (when it is on). Best effort: the refusal stands
    /// either way.
    pub fn audit_auth_refused(
        &self,
        address: Option<std::net::IpAddr>,
        dialect: crate::audit::Dialect,
        reason: &str,
        status: u16,
    ) {
        if let Some(audit) = &self.audit {
            let _ = audit.record(&crate::audit::AuditEvent::AuthRefused {
                address,
                dialect,
                reason,
                status,
            });
        }
    }

    /// Who `token` makes its holder: a valid signed ticket's grant, or anyone with the static
    /// token (compared in constant time; refused when tickets are on and CHAT_TOKEN was not set
    /// explicitly). `None`: refused.
    pub fn authenticate(&self, token: &str) -> Option<Credential> {
        use subtle::ConstantTimeEq;
        if let Some(tickets) = &self.settings.tickets {
            if Tickets::looks_like_ticket(token) {
                if let Some(grant) = tickets.verify(token) {
                    return Some(Credential::Ticket(grant));
                }
            }
        }
        let matches = token
            .as_bytes()
            .ct_eq(self.settings.chat_token.expose().as_bytes());
        (self.settings.static_token && bool::from(matches)).then_some(Credential::Static)
    }

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

    /// Ready for traffic: not draining, and the broker can publish.
    pub fn is_ready(&self) -> bool {
        !self.is_shutting_down() && self.broker.is_ready()
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
            .broker_up
            .set(if self.broker.is_ready() { 1.0 } else { 0.0 });
        self.metrics
            .outbox_queued_bytes
            .set(crate::outbox::total_queued_bytes() as f64);
        self.metrics
            .audit_queued_bytes
            .set(self.audit.as_ref().map_or(0, Audit::queued_bytes) as f64);
        let mut out = self
            .prometheus
            .as_ref()
            .map(|h| h.render())
            .unwrap_or_default();
        self.metrics.publish_to_write_seconds.render(&mut out);
        let mut cache = self
            .process_metrics
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let fresh = cache
            .as_ref()
            .is_some_and(|(at, _)| at.elapsed() < PROCESS_METRICS_TTL);
        if !fresh {
            let mut process = String::new();
            crate::metrics::render_process_metrics(&mut process);
            *cache = Some((tokio::time::Instant::now(), process));
        }
        if let Some((_, process)) = cache.as_ref() {
            out.push_str(process);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registry_slots_are_reused_and_listed_once() {
        let mut slots = Slots::default();
        let (a, b, c) = (
            Arc::new(Outbox::default()),
            Arc::new(Outbox::default()),
            Arc::new(Outbox::default()),
        );
        let ka = slots.insert(a.clone());
        let kb = slots.insert(b.clone());
        slots.remove(ka);
        slots.remove(ka); // a second removal is harmless
        assert_eq!(slots.iter().count(), 1);
        assert_eq!(slots.insert(c.clone()), ka, "a vacant slot is reused");
        assert_eq!(slots.slots.len(), 2);
        let listed: Vec<_> = slots.iter().collect();
        assert!(Arc::ptr_eq(listed[0], &c) && Arc::ptr_eq(listed[1], &b));
        slots.remove(kb);
        assert_eq!(Arc::strong_count(&b), 1, "a removed outbox is let go");
    }

    /// The defect: a shard kept the length and capacity a wave of connections grew it to
    /// (64 shards: ~90 KiB after 5,000 connections came and went, a third of the live heap a
    /// churn left behind).
    #[test]
    fn a_shard_shrinks_back_when_a_wave_leaves_and_reuses_the_lowest_slots() {
        let mut slots = Slots::default();
        let outbox = Arc::new(Outbox::default());
        let steady: Vec<usize> = (0..10).map(|_| slots.insert(outbox.clone())).collect();
        let wave: Vec<usize> = (0..1000).map(|_| slots.insert(outbox.clone())).collect();
        slots.remove(steady[3]);
        slots.remove(steady[7]);
        // The wave leaves in no particular order.
        for key in wave.iter().skip(1).step_by(2) {
            slots.remove(*key);
        }
        for key in wave.iter().step_by(2).rev() {
            slots.remove(*key);
        }
        assert_eq!(slots.slots.len(), 10, "the vacant end is cut off");
        assert!(slots.slots.capacity() <= 40, "{}", slots.slots.capacity());
        assert_eq!(slots.iter().count(), 8);
        // The holes are filled lowest first, then the shard grows again.
        assert_eq!(slots.insert(outbox.clone()), steady[3]);
        assert_eq!(slots.insert(outbox.clone()), steady[7]);
        assert_eq!(slots.insert(outbox.clone()), 10);
        assert_eq!(slots.iter().count(), 11);
        assert_eq!(Arc::strong_count(&outbox), 12);
    }
}
