//! The Redis broker (`REDIS_URL`, or `REDIS_CLUSTER_NODES` for a Redis Cluster): several nodes
//! share their rooms through Redis. The tasks below are one code path for both deployments;
//! `backend.rs` holds what differs (connections, `PUBLISH` or `SPUBLISH`, subscriptions and how a
//! cluster's failover turns into a resync of the rooms).
//!
//! **Publishing.** A connection's publish never waits for Redis: [`RedisBroker::publish`] puts a
//! job on a queue bounded in bytes (`REDIS_QUEUE_MAX_BYTES`; past it the sender gets
//! `unavailable`) and returns. The publisher task runs the publish script (`redis/publish.lua`:
//! de-duplication, `seq`, history, publish — one atomic step) for every job on ONE multiplexed
//! connection shared by all connections of the node (on a Redis Cluster, the one cluster
//! connection: a socket per cluster node), with up to `PUBLISHES_IN_FLIGHT` scripts pipelined
//! on it. The sender's ack (with its `seq`) is sent once Redis has answered; a publish
//! that Redis did not take within `REDIS_TIMEOUT_MS` gets `unavailable`, never an ack.
//!
//! **Delivering.** The message itself reaches every node, the sender's included, through the
//! room's channel, and takes the local path there: the hub builds its frame once per node and
//! queues it for the room's members ([`Hub::deliver_remote`]), in `seq` order.
//!
//! **Subscriptions and exact joins.** A node subscribes to a room's channel only while the room
//! has local members. The first join into a room the node does not follow yet waits (without a
//! greeting) while the rooms task subscribes and *then* reads the room's snapshot (epoch, last
//! `seq`, history) with `redis/read.lua`; the hub applies it, with whatever arrived on the
//! channel meanwhile, and then greets the waiting joiners from it. Everything after the snapshot
//! comes on the channel (the subscription was confirmed before the read), everything before is in
//! it: no gap, no duplicate. A `seq` jump on the channel, or a new epoch, makes the hub ask for a
//! snapshot again and fill the gap before delivering more.
//!
//! **Redis down.** Connections stay up. Publishes fail fast with `unavailable`, `/readyz`
//! answers 503, and the rooms task reconnects with backoff and jitter, resubscribes every room
//! that still has local members and re-reads their snapshots (filling what was missed).
//!
//! **A Redis Cluster master down.** Only its rooms are affected: their publishes get
//! `unavailable` (within `REDIS_TIMEOUT_MS`) until its replica is promoted, joins into them wait,
//! and `/readyz` stays 200 (the other shards serve; a load balancer must not take every node out
//! for one shard). The dropped node connection makes the rooms task subscribe and read every
//! followed room again; a room whose shard has no master yet is retried until it has one.
//!
//! **Presence across nodes.** Each node coalesces its own joins and leaves as before and hands
//! them, with its member count, to the presence task: `redis/presence.lua` keeps every node's
//! count in the room's hash with an expiry, sums the live ones and publishes the event on the
//! room's channel, so every node's members get the room-wide `online`. Each node refreshes its
//! counts every `PRESENCE_REFRESH`; a node that dies drops out within `PRESENCE_TTL`, and the
//! next refresh anywhere publishes the new count.

mod backend;
mod chain;
mod wire;

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use redis::{Script, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use self::chain::Chains;
use crate::broker::{Broker, Publish, PublishError, Published, Reply};
use crate::hub::{Follower, Hub, Room};
use crate::metrics::Metrics;
use crate::protocol;

use backend::{run_script, Backend, ClusterRooms, Connection, Incoming, Subscriber};
use wire::{PublishReply, RoomKeys};

pub use backend::RedisTarget;

/// Scripts in flight on the shared connection at once (Redis answers them in order).
const PUBLISHES_IN_FLIGHT: usize = 512;
/// Jobs waiting for the publisher task (their bytes are bounded separately).
const PUBLISH_QUEUE_JOBS: usize = 16 * 1024;
/// Room subscription requests waiting for the rooms task.
const ROOM_COMMANDS: usize = 64 * 1024;
/// Reconnect backoff: from this, doubling, up to `RECONNECT_MAX`, with up to half of it jitter.
const RECONNECT_MIN: Duration = Duration::from_millis(100);
const RECONNECT_MAX: Duration = Duration::from_secs(5);
/// Fixed bytes a queued job costs beyond its strings.
const JOB_OVERHEAD: usize = 256;
/// How often a node re-states its member count in every room it follows, in one script call
/// per `PRESENCE_BATCH` rooms on the same Redis server (`run_refresh`). Counts change between
/// refreshes through the join/leave updates; the refresh only keeps a live node's entries from
/// expiring.
const PRESENCE_REFRESH: Duration = Duration::from_secs(10);
/// How long a node's count stays in a room's total without a refresh.
const PRESENCE_TTL: Duration = Duration::from_secs(30);
/// Presence updates waiting for the presence task (one per room per interval at most).
const PRESENCE_QUEUE: usize = 16 * 1024;
/// Presence scripts in flight at once.
const PRESENCE_IN_FLIGHT: usize = 64;
/// Rooms one presence refresh call re-states at most (one script run on one Redis server).
const PRESENCE_BATCH: usize = 100;

/// Settings of the Redis broker.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    /// One Redis, or a Redis Cluster's seed nodes.
    pub target: RedisTarget,
    pub history_limit: usize,
    /// How long a room's keys live after its last publish or join.
    pub key_ttl: Duration,
    /// Longest wait for Redis before a publish is answered `unavailable`.
    pub timeout: Duration,
    /// Bytes of publishes waiting for Redis, across the node.
    pub queue_max_bytes: usize,
}

/// Why the Redis broker could not start.
#[derive(Debug, thiserror::Error)]
pub enum RedisBrokerError {
    #[error("REDIS_URL is not a valid Redis URL: {0}")]
    Url(#[source] redis::RedisError),
    #[error("REDIS_CLUSTER_NODES does not list valid Redis Cluster nodes: {0}")]
    ClusterNodes(#[source] redis::RedisError),
}

/// One publish on its way to Redis.
struct Job {
    room: Arc<Room>,
    reply: Reply,
    request_id: Option<Box<str>>,
    id: uuid::Uuid,
    /// The message object up to its `seq`, and after it.
    json_head: String,
    json_tail: &'static str,
    dedupe_key: String,
    text_hash: String,
    charge: usize,
}

/// One node's presence update for a room.
struct PresenceJob {
    room: Arc<Room>,
    local_members: usize,
    message: String,
    joined: String,
    left: String,
}

/// What the rooms task is asked to do.
enum RoomCommand {
    /// Subscribe to the room's channel (if not yet), then read and apply its snapshot for this
    /// generation of the hub's follow request.
    Sync(Arc<Room>, u64),
    /// The room has no local members any more: unsubscribe (if it still has none).
    Release(Arc<Room>),
}

/// Shared between the broker handle and its tasks.
struct Shared {
    hub: Arc<Hub>,
    settings: RedisSettings,
    metrics: Metrics,
    /// One Redis or a Redis Cluster (see `backend.rs`).
    backend: Backend,
    publish_script: Script,
    read_script: Script,
    presence_script: Script,
    /// Its body, for `EVAL` when Redis does not know it yet.
    presence_body: String,
    /// This process, in the rooms' presence hashes.
    node_id: String,
    presence: mpsc::Sender<PresenceJob>,
    /// Both connections (publishing and subscriptions) are up.
    publisher_up: AtomicBool,
    subscriber_up: AtomicBool,
    queued_bytes: AtomicUsize,
    rooms: mpsc::Sender<RoomCommand>,
    /// Every publish is written here before it goes to Redis (`AUDIT_LOG`).
    audit: Option<crate::audit::Audit>,
    /// The subscription connection saw Redis go away: the publishing connection is stale too
    /// and is made again before the next publish, rather than failing one first.
    reset_publisher: tokio::sync::Notify,
}

/// The broker handle every connection publishes through.
pub struct RedisBroker {
    shared: Arc<Shared>,
    jobs: mpsc::Sender<Job>,
}

impl RedisBroker {
    /// Start the broker's tasks. Redis need not be up yet: the node starts, answers `/readyz`
    /// with 503 and publishes with `unavailable` until it is.
    pub fn start(
        hub: Arc<Hub>,
        settings: RedisSettings,
        metrics: Metrics,
        audit: Option<crate::audit::Audit>,
    ) -> Result<Arc<RedisBroker>, RedisBrokerError> {
        let backend =
            Backend::new(&settings.target, settings.timeout, &metrics).map_err(
                |e| match settings.target {
                    RedisTarget::Single(_) => RedisBrokerError::Url(e),
                    RedisTarget::Cluster(_) => RedisBrokerError::ClusterNodes(e),
                },
            )?;
        let (jobs, jobs_rx) = mpsc::channel(PUBLISH_QUEUE_JOBS);
        let (rooms, rooms_rx) = mpsc::channel(ROOM_COMMANDS);
        let (presence, presence_rx) = mpsc::channel(PRESENCE_QUEUE);
        let presence_body = backend.presence_script_body();
        let shared = Arc::new(Shared {
            hub,
            settings,
            metrics,
            backend,
            publish_script: Script::new(wire::PUBLISH_SCRIPT),
            read_script: Script::new(wire::READ_SCRIPT),
            presence_script: Script::new(&presence_body),
            presence_body,
            node_id: new_epoch(),
            presence,
            publisher_up: AtomicBool::new(false),
            subscriber_up: AtomicBool::new(false),
            queued_bytes: AtomicUsize::new(0),
            rooms,
            reset_publisher: tokio::sync::Notify::new(),
            audit,
        });
        tokio::spawn(publisher(shared.clone(), jobs_rx));
        tokio::spawn(rooms_task(shared.clone(), rooms_rx));
        tokio::spawn(presence_task(shared.clone(), presence_rx));
        Ok(Arc::new(RedisBroker { shared, jobs }))
    }
}

impl Broker for RedisBroker {
    fn publish(
        &self,
        publish: &Publish<'_>,
        reply: Reply,
    ) -> Result<Option<Published>, PublishError> {
        let Publish {
            room,
            from,
            message,
            ..
        } = *publish;
        let shared = &self.shared;
        if !shared.is_up() {
            return Err(PublishError::Unavailable);
        }
        let id = uuid::Uuid::new_v4();
        let sent_at = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
        let (json_head, json_tail) = protocol::message_json_parts(&protocol::MessageFields {
            id: &id,
            room: room.name(),
            from: &from.name,
            text: &message.text,
            sent_at: &sent_at,
            request_id: message.request_id.as_deref(),
            seq: 0,
        });
        let request_id = message.request_id.as_deref();
        let dedupe_key = wire::dedupe_key(from.session, request_id);
        let charge = JOB_OVERHEAD + json_head.len() + dedupe_key.len();
        let max = shared.settings.queue_max_bytes;
        if shared
            .queued_bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |q| {
                (q + charge <= max).then_some(q + charge)
            })
            .is_err()
        {
            return Err(PublishError::Unavailable);
        }
        // Audited before Redis sees it (Redis gives the seq; the line has none). A publish that
        // Redis then refuses or finds a duplicate gets a second line with its outcome.
        if let Err(e) = crate::broker::audit_publish(
            shared.audit.as_ref(),
            publish,
            &id,
            None,
            &sent_at,
            reply.dialect(),
        ) {
            shared.queued_bytes.fetch_sub(charge, Ordering::AcqRel);
            return Err(e);
        }
        let job = Job {
            room: room.clone(),
            reply,
            request_id: request_id.map(Box::from),
            id,
            json_head,
            json_tail,
            dedupe_key,
            text_hash: wire::text_hash(&message.text),
            charge,
        };
        if self.jobs.try_send(job).is_err() {
            shared.queued_bytes.fetch_sub(charge, Ordering::AcqRel);
            return Err(PublishError::Unavailable);
        }
        Ok(None)
    }

    fn is_ready(&self) -> bool {
        self.shared.is_up()
    }

    fn online(
        &self,
        room: &str,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Option<u64>> + Send + '_>> {
        let key = wire::presence_key(room);
        Box::pin(async move {
            let read = async {
                let mut c = self.shared.backend.connect().await?;
                redis::cmd("HGET")
                    .arg(&key)
                    .arg("_total")
                    .query_async::<Option<u64>>(&mut c)
                    .await
            };
            let total = self.shared.within_timeout(read).await?;
            Some(total.unwrap_or(0))
        })
    }

    fn room_snapshot(
        &self,
        room: &str,
    ) -> std::pin::Pin<
        Box<
            dyn std::future::Future<Output = Result<Option<crate::hub::RoomSnapshot>, PublishError>>
                + Send
                + '_,
        >,
    > {
        let keys = self.shared.keys(room);
        Box::pin(async move {
            let shared = &self.shared;
            let read = async {
                let mut c = shared.backend.connect().await?;
                // The server API's read: this node may not follow the room; nothing to compare.
                shared.run_read(&mut c, &keys, &Seen::default()).await
            };
            let value = shared
                .within_timeout(read)
                .await
                .ok_or(PublishError::Unavailable)?;
            match wire::parse_snapshot(&value) {
                Some(snapshot) => Ok(Some(snapshot)),
                None => {
                    shared.metrics.redis_errors.increment(1);
                    Err(PublishError::Unavailable)
                }
            }
        })
    }

    fn disconnect(&self, name: &str, room: Option<&str>) {
        let shared = self.shared.clone();
        let request = wire::disconnect_request(name, room);
        tokio::spawn(async move {
            let send = async {
                // A plain PUBLISH in both deployments: Redis Cluster broadcasts it to every
                // node, so every relay node's control subscription hears it.
                let mut c = shared.backend.connect().await?;
                redis::cmd("PUBLISH")
                    .arg(wire::CONTROL_CHANNEL)
                    .arg(&request)
                    .query_async::<i64>(&mut c)
                    .await
            };
            let _ = shared.within_timeout(send).await;
        });
    }
}

impl Follower for RedisBroker {
    fn follow(&self, room: &Arc<Room>, generation: u64) {
        self.shared
            .command(RoomCommand::Sync(room.clone(), generation));
    }

    fn unfollow(&self, room: &Arc<Room>) {
        self.shared.command(RoomCommand::Release(room.clone()));
    }

    fn presence(
        &self,
        room: &Arc<Room>,
        local_members: usize,
        message: String,
        joined: &[Arc<str>],
        left: &[Arc<str>],
    ) {
        let job = PresenceJob {
            room: room.clone(),
            local_members,
            message,
            joined: protocol::names_json(joined),
            left: protocol::names_json(left),
        };
        if self.shared.presence.try_send(job).is_err() {
            self.shared.metrics.redis_errors.increment(1);
        }
    }
}

impl Shared {
    /// One request of the server API to Redis: its answer within REDIS_TIMEOUT_MS, or `None`
    /// (a failure or a timeout, counted in `roomcast_redis_errors_total`).
    async fn within_timeout<T>(
        &self,
        request: impl std::future::Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        match tokio::time::timeout(self.settings.timeout, request).await {
            Ok(Ok(value)) => Some(value),
            _ => {
                self.metrics.redis_errors.increment(1);
                None
            }
        }
    }

    fn is_up(&self) -> bool {
        self.publisher_up.load(Ordering::Acquire) && self.subscriber_up.load(Ordering::Acquire)
    }

    fn command(&self, command: RoomCommand) {
        if self.rooms.try_send(command).is_err() {
            // Bounded by the rooms a node can hold; a full queue means the rooms task is stuck
            // behind a dead Redis, and the reconnect resyncs every room anyway.
            self.metrics.redis_errors.increment(1);
        }
    }

    /// Answer a publish's sender (ack or error event) behind the room's queued frames.
    fn answer(&self, job: Job, outcome: Result<Published, PublishError>) {
        if let Some(audit) = &self.audit {
            let not_delivered = match &outcome {
                Ok(p) if p.duplicate => Some("duplicate"),
                Ok(_) => None,
                Err(PublishError::Conflict) => Some("conflict"),
                Err(PublishError::Busy) => Some("busy"),
                Err(PublishError::Unavailable) => Some("unavailable"),
            };
            if let Some(outcome) = not_delivered {
                // Best effort: the publish was not delivered, so a full queue loses nothing
                // that reached anyone.
                let _ = audit.record(&crate::audit::AuditEvent::PublishOutcome {
                    id: &job.id,
                    room: job.room.name(),
                    outcome,
                });
            }
        }
        let request_id = job.request_id.as_deref();
        job.reply.answer(&self.hub, &job.room, request_id, outcome);
    }

    fn keys(&self, room: &str) -> RoomKeys {
        RoomKeys::new(room)
    }

    fn key_ttl_secs(&self) -> u64 {
        self.settings.key_ttl.as_secs().max(1)
    }

    /// Run the read script (a room's epoch, last seq and history) on `connection`. `seen` is
    /// what this node has of the room (see [`seen`]).
    async fn run_read(
        &self,
        connection: &mut Connection,
        keys: &RoomKeys,
        seen: &Seen,
    ) -> redis::RedisResult<Value> {
        let (epoch, ttl) = (new_epoch(), self.key_ttl_secs());
        run_script(
            connection,
            &self.read_script,
            wire::READ_SCRIPT,
            &[&keys.epoch, &keys.seq, &keys.history, &keys.dedupe],
            |cmd| {
                cmd.arg(&epoch).arg(ttl).arg(&seen.epoch).arg(seen.last_seq);
            },
        )
        .await
    }
}

/// What this node has seen of a room: its epoch and last `seq`. The scripts compare it with
/// Redis: a seq behind it in the same epoch means Redis lost acknowledged messages (a Redis
/// Cluster replica was promoted before they reached it), and the room starts a new epoch rather
/// than hand out those seqs again — the members are told their history is incomplete instead of
/// silently missing the messages that reuse them.
#[derive(Debug, Default)]
struct Seen {
    epoch: String,
    last_seq: u64,
}

fn seen(room: &Room) -> Seen {
    let st = room.lock();
    Seen {
        epoch: st.epoch().to_string(),
        last_seq: st.next_seq().saturating_sub(1),
    }
}

/// Run every publish job on one connection (one multiplexed connection, or the shared cluster
/// connection), many in flight, and answer each sender.
async fn publisher(shared: Arc<Shared>, mut jobs: mpsc::Receiver<Job>) {
    let mut connection: Option<Connection> = None;
    let mut next_attempt = Instant::now();
    let mut backoff = RECONNECT_MIN;
    let mut in_flight = FuturesUnordered::new();
    loop {
        if connection.is_none() && Instant::now() >= next_attempt {
            match tokio::time::timeout(shared.settings.timeout, shared.backend.connect()).await {
                Ok(Ok(c)) => {
                    connection = Some(c);
                    backoff = RECONNECT_MIN;
                    shared.publisher_up.store(true, Ordering::Release);
                }
                _ => {
                    shared.metrics.redis_errors.increment(1);
                    next_attempt = Instant::now() + jittered(backoff);
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                }
            }
        }
        tokio::select! {
            job = jobs.recv(), if in_flight.len() < PUBLISHES_IN_FLIGHT => {
                let Some(job) = job else { return };
                match &connection {
                    Some(c) => in_flight.push(run_publish(shared.clone(), c.clone(), job)),
                    None => {
                        shared.queued_bytes.fetch_sub(job.charge, Ordering::AcqRel);
                        shared.answer(job, Err(PublishError::Unavailable));
                    }
                }
            }
            Some(ok) = in_flight.next(), if !in_flight.is_empty() => {
                // The connection failed (not just one script): make a new one. A cluster
                // connection repairs its node connections itself and is kept.
                if !ok && connection.is_some() && !shared.backend.repairs_itself() {
                    connection = None;
                    shared.publisher_up.store(false, Ordering::Release);
                    next_attempt = Instant::now() + jittered(backoff);
                }
            }
            _ = tokio::time::sleep_until(next_attempt), if connection.is_none() => {}
            _ = shared.reset_publisher.notified() => {
                connection = None;
                shared.publisher_up.store(false, Ordering::Release);
                next_attempt = Instant::now();
            }
        }
    }
}

/// One publish: run the script, answer the sender. False when the connection looks broken.
async fn run_publish(shared: Arc<Shared>, mut connection: Connection, job: Job) -> bool {
    let keys = shared.keys(job.room.name());
    let epoch = new_epoch();
    let id = job.id.to_string();
    let seen = seen(&job.room);
    let started = Instant::now();
    let result = tokio::time::timeout(
        shared.settings.timeout,
        run_script(
            &mut connection,
            &shared.publish_script,
            wire::PUBLISH_SCRIPT,
            &[&keys.epoch, &keys.seq, &keys.history, &keys.dedupe],
            |cmd| {
                cmd.arg(shared.settings.history_limit)
                    .arg(&epoch)
                    .arg(&job.json_head)
                    .arg(job.json_tail)
                    .arg(&job.dedupe_key)
                    .arg(&id)
                    .arg(&job.text_hash)
                    .arg(&keys.channel)
                    .arg(shared.backend.publish_command())
                    .arg(shared.key_ttl_secs())
                    .arg(&seen.epoch)
                    .arg(seen.last_seq);
            },
        ),
    )
    .await;
    shared.queued_bytes.fetch_sub(job.charge, Ordering::AcqRel);
    let reply = match result {
        Ok(Ok(value)) => {
            shared
                .metrics
                .redis_round_trip_seconds
                .record(started.elapsed().as_secs_f64());
            wire::parse_publish_reply(&value)
        }
        Ok(Err(e)) => {
            shared.metrics.redis_errors.increment(1);
            shared.answer(job, Err(PublishError::Unavailable));
            return !(e.is_io_error() || e.is_connection_dropped());
        }
        Err(_) => {
            shared.metrics.redis_errors.increment(1);
            shared.answer(job, Err(PublishError::Unavailable));
            return false;
        }
    };
    let outcome = match reply {
        Some(PublishReply::New { seq, .. }) => Ok(Published {
            id: job.id,
            seq,
            duplicate: false,
        }),
        Some(PublishReply::Duplicate { seq, id }) => Ok(Published {
            id,
            seq,
            duplicate: true,
        }),
        Some(PublishReply::Conflict) => Err(PublishError::Conflict),
        None => {
            shared.metrics.redis_errors.increment(1);
            Err(PublishError::Unavailable)
        }
    };
    shared.answer(job, outcome);
    true
}

/// Keep the node's subscriptions: one per room with local members. Reconnects with backoff and
/// jitter; after a reconnect — or, on Redis Cluster, after anything that may have lost messages
/// ([`Incoming::Lost`]) — every followed room is subscribed and read again.
async fn rooms_task(shared: Arc<Shared>, mut commands: mpsc::Receiver<RoomCommand>) {
    let mut backoff = RECONNECT_MIN;
    let mut first = true;
    loop {
        let mut subscriber =
            match tokio::time::timeout(shared.settings.timeout, shared.backend.subscribe()).await {
                Ok(Ok(subscriber)) => subscriber,
                _ => {
                    shared.metrics.redis_errors.increment(1);
                    tokio::time::sleep(jittered(backoff)).await;
                    backoff = (backoff * 2).min(RECONNECT_MAX);
                    continue;
                }
            };
        backoff = RECONNECT_MIN;
        if !first {
            shared.metrics.redis_reconnects.increment(1);
        }
        first = false;
        let control = subscriber.subscribe_control(wire::CONTROL_CHANNEL);
        if !matches!(
            tokio::time::timeout(shared.settings.timeout, control).await,
            Ok(Ok(()))
        ) {
            shared.metrics.redis_errors.increment(1);
            shared.backend.return_subscriber(subscriber);
            tokio::time::sleep(jittered(backoff)).await;
            continue;
        }
        shared.subscriber_up.store(true, Ordering::Release);
        // Whatever happened while we were away: every room with local members reads its
        // snapshot again (and is subscribed first).
        let mut pending = resync_all(&shared);
        // Redis Cluster: subscription changes off this task (see `ClusterOps`).
        let mut cluster = subscriber.cluster_rooms().map(ClusterOps::new);
        loop {
            if let Some(command) = pending.pop_front() {
                if let Some(cluster) = cluster.as_mut() {
                    cluster.run(&shared, command);
                } else if handle_command(&shared, &mut subscriber, command)
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
            tokio::select! {
                incoming = subscriber.next() => match incoming {
                    Incoming::Message(message) => on_message(&shared, &message),
                    Incoming::Lost => {
                        // A cluster node's connection (or pushes) were lost: redis-rs
                        // resubscribes on its own, but what was published meanwhile is only
                        // in the rooms' history.
                        shared.metrics.redis_reconnects.increment(1);
                        pending = resync_all(&shared);
                        if let Some(cluster) = cluster.as_mut() {
                            cluster.resubscribe_control(&shared);
                        }
                    }
                    Incoming::Unsubscribed(channel) => {
                        let ours = cluster
                            .as_ref()
                            .is_some_and(|c| c.took_own_unsubscribe(&channel));
                        if !ours {
                            // The server ended a shard subscription (its slot moved to
                            // another shard): follow every room again.
                            shared.metrics.redis_reconnects.increment(1);
                            pending = resync_all(&shared);
                        }
                    }
                    Incoming::Other => {}
                    Incoming::Closed => break,
                },
                command = commands.recv() => match command {
                    Some(command) => pending.push_back(command),
                    None => return,
                },
            }
        }
        shared.backend.return_subscriber(subscriber);
        shared.subscriber_up.store(false, Ordering::Release);
        shared.metrics.redis_errors.increment(1);
        shared.reset_publisher.notify_one();
    }
}

/// Every room with local members, marked for a fresh snapshot: subscribe and read each.
fn resync_all(shared: &Shared) -> VecDeque<RoomCommand> {
    shared
        .hub
        .rooms_to_follow()
        .into_iter()
        .map(|(room, generation)| RoomCommand::Sync(room, generation))
        .collect()
}

/// Redis Cluster: subscription changes run in tasks of their own, concurrently across rooms — a
/// shard without any reachable node makes its rooms' changes wait up to `REDIS_TIMEOUT_MS`,
/// which must not hold up the other rooms' changes or the channel messages — and in order within
/// a room (a release and a new join of the same room cannot cross). A subscription that fails is
/// retried for its room alone, through the hub, the other shards being fine.
struct ClusterOps {
    rooms: ClusterRooms,
    /// Each channel's unfinished change; the next one waits for it.
    chains: Chains,
    /// Unsubscribes we sent whose confirmation has not come back yet, by channel: any other end
    /// of a shard subscription is the server's (its slot moved).
    own_unsubscribes: Arc<std::sync::Mutex<HashMap<String, usize>>>,
    control: Option<tokio::task::JoinHandle<()>>,
}

impl ClusterOps {
    fn new(rooms: ClusterRooms) -> ClusterOps {
        ClusterOps {
            rooms,
            chains: Chains::default(),
            own_unsubscribes: Arc::default(),
            control: None,
        }
    }

    fn run(&mut self, shared: &Arc<Shared>, command: RoomCommand) {
        let (shared, mut rooms) = (shared.clone(), self.rooms.clone());
        match command {
            RoomCommand::Sync(room, generation) => {
                let channel = wire::channel_name(room.name());
                self.chains.run(channel.clone(), async move {
                    let subscribe = rooms.subscribe_room(&channel);
                    match tokio::time::timeout(shared.settings.timeout, subscribe).await {
                        Ok(Ok(())) => read_snapshot(shared, rooms.reads(), room, generation).await,
                        _ => {
                            // The room's shard has no reachable node right now (a failover):
                            // the hub asks again shortly.
                            shared.metrics.redis_errors.increment(1);
                            shared.hub.snapshot_failed(&room, generation);
                        }
                    }
                });
            }
            RoomCommand::Release(room) => {
                let channel = wire::channel_name(room.name());
                let own = self.own_unsubscribes.clone();
                self.chains.run(channel.clone(), async move {
                    if shared.hub.wants_following(&room) {
                        return;
                    }
                    // Counted before it is sent: its confirmation may be read before this
                    // task runs again.
                    *lock(&own).entry(channel.clone()).or_default() += 1;
                    let unsubscribe = rooms.unsubscribe_room(&channel);
                    if !matches!(
                        tokio::time::timeout(shared.settings.timeout, unsubscribe).await,
                        Ok(Ok(()))
                    ) {
                        take_one(&mut lock(&own), &channel);
                    }
                });
            }
        }
    }

    /// Subscribe to the control channel again (after a lost node), until it works.
    fn resubscribe_control(&mut self, shared: &Arc<Shared>) {
        if self.control.as_ref().is_some_and(|c| !c.is_finished()) {
            return; // already at it
        }
        let (shared, mut rooms) = (shared.clone(), self.rooms.clone());
        self.control = Some(tokio::spawn(async move {
            let mut backoff = RECONNECT_MIN;
            loop {
                let control = rooms.subscribe_control(wire::CONTROL_CHANNEL);
                if let Ok(Ok(())) = tokio::time::timeout(shared.settings.timeout, control).await {
                    return;
                }
                shared.metrics.redis_errors.increment(1);
                tokio::time::sleep(jittered(backoff)).await;
                backoff = (backoff * 2).min(RECONNECT_MAX);
            }
        }));
    }

    /// Was this end of a shard subscription the confirmation of our own unsubscribe?
    fn took_own_unsubscribe(&self, channel: &[u8]) -> bool {
        let channel = String::from_utf8_lossy(channel);
        take_one(&mut lock(&self.own_unsubscribes), &channel)
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Take one count of `key`; false if there was none.
fn take_one(counts: &mut HashMap<String, usize>, key: &str) -> bool {
    match counts.get_mut(key) {
        Some(n) if *n > 1 => {
            *n -= 1;
            true
        }
        Some(_) => {
            counts.remove(key);
            true
        }
        None => false,
    }
}

/// One Redis: subscribe/unsubscribe in order on the one connection (so a release and a new join
/// of the same room cannot cross), and read snapshots in tasks of their own. An error means the
/// subscriptions connection is broken and must be made again.
async fn handle_command(
    shared: &Arc<Shared>,
    subscriber: &mut Subscriber,
    command: RoomCommand,
) -> Result<(), ()> {
    match command {
        RoomCommand::Sync(room, generation) => {
            let channel = wire::channel_name(room.name());
            let subscribe = subscriber.subscribe_room(&channel);
            match tokio::time::timeout(shared.settings.timeout, subscribe).await {
                Ok(Ok(())) => {
                    tokio::spawn(read_snapshot(
                        shared.clone(),
                        subscriber.reads(),
                        room,
                        generation,
                    ));
                    Ok(())
                }
                _ => {
                    // The subscription connection is in trouble: reconnecting follows every
                    // room with members again.
                    Err(())
                }
            }
        }
        RoomCommand::Release(room) => {
            if !shared.hub.wants_following(&room) {
                let channel = wire::channel_name(room.name());
                let _ = tokio::time::timeout(
                    shared.settings.timeout,
                    subscriber.unsubscribe_room(&channel),
                )
                .await;
            }
            Ok(())
        }
    }
}

async fn read_snapshot(
    shared: Arc<Shared>,
    mut connection: Connection,
    room: Arc<Room>,
    generation: u64,
) {
    let keys = shared.keys(room.name());
    let seen = seen(&room);
    let read = shared.run_read(&mut connection, &keys, &seen);
    match tokio::time::timeout(shared.settings.timeout, read).await {
        Ok(Ok(value)) => match wire::parse_snapshot(&value) {
            Some(snapshot) => shared.hub.apply_snapshot(&room, generation, snapshot),
            None => {
                shared.metrics.redis_errors.increment(1);
                shared.hub.snapshot_failed(&room, generation);
            }
        },
        _ => {
            shared.metrics.redis_errors.increment(1);
            shared.hub.snapshot_failed(&room, generation);
        }
    }
}

/// A message on a room channel: to the hub, which orders it (or a presence event, to the
/// room's members here); anything roomcast did not publish is counted and dropped.
fn on_message(shared: &Shared, message: &redis::Msg) {
    if message.get_channel_name() == wire::CONTROL_CHANNEL {
        match wire::parse_disconnect(message.get_payload_bytes()) {
            Some((name, room)) => {
                shared.hub.disconnect(name, room, protocol::DISCONNECT_CODE);
            }
            None => shared.metrics.redis_foreign_messages.increment(1),
        }
        return;
    }
    let Some(room) = wire::room_of_channel(message.get_channel_name()) else {
        shared.metrics.redis_foreign_messages.increment(1);
        return;
    };
    let payload = message.get_payload_bytes();
    if let Some(m) = wire::parse_channel_message(payload) {
        shared.hub.deliver_remote(room, m.epoch, m.seq, m.json);
    } else if let Some(p) = wire::parse_channel_presence(payload) {
        shared
            .hub
            .deliver_remote_presence(room, p.online, p.message, &p.joined, &p.left);
    } else {
        shared.metrics.redis_foreign_messages.increment(1);
    }
}

/// What the presence task runs.
enum PresenceWork {
    /// One room's members changed.
    Update(PresenceJob),
    /// Re-state this node's count in every room it follows.
    Refresh(Vec<(Arc<Room>, usize)>),
}

/// How a presence call ended: whether the connection still looks usable, and whether it was
/// the refresh.
struct PresenceDone {
    ok: bool,
    refresh: bool,
}

/// Run presence updates (this node's joins/leaves and count per room) and re-state every
/// followed room's count each `PRESENCE_REFRESH`, on a connection of its own. At most
/// `PRESENCE_QUEUE` updates wait here (then the hub's sends fail, counted as Redis errors) and
/// one refresh runs at a time.
async fn presence_task(shared: Arc<Shared>, mut jobs: mpsc::Receiver<PresenceJob>) {
    let mut connection: Option<Connection> = None;
    let mut in_flight = FuturesUnordered::new();
    let mut refresh = tokio::time::interval(PRESENCE_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backlog: VecDeque<PresenceWork> = VecDeque::new();
    let mut refreshing = false;
    loop {
        tokio::select! {
            job = jobs.recv(), if backlog.len() < PRESENCE_QUEUE => match job {
                Some(job) => backlog.push_back(PresenceWork::Update(job)),
                None => return,
            },
            _ = refresh.tick() => {
                let queued = backlog.iter().any(|w| matches!(w, PresenceWork::Refresh(_)));
                if !refreshing && !queued {
                    backlog.push_back(PresenceWork::Refresh(shared.hub.followed_member_counts()));
                }
            }
            Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                let done: PresenceDone = done;
                refreshing &= !done.refresh;
                if !done.ok {
                    connection = None;
                }
            }
        }
        if connection.is_none() && !backlog.is_empty() {
            match tokio::time::timeout(shared.settings.timeout, shared.backend.connect()).await {
                Ok(Ok(c)) => connection = Some(c),
                _ => {
                    // Redis is away: these updates are stale by the time it is back, and the
                    // refresh re-states every count then.
                    shared.metrics.redis_errors.increment(1);
                    backlog.clear();
                    continue;
                }
            }
        }
        while in_flight.len() < PRESENCE_IN_FLIGHT {
            let (Some(work), Some(c)) = (backlog.pop_front(), connection.as_ref()) else {
                break;
            };
            let (shared, c) = (shared.clone(), c.clone());
            let call: futures_util::future::BoxFuture<'static, PresenceDone> = match work {
                PresenceWork::Update(job) => Box::pin(async move {
                    PresenceDone {
                        ok: run_presence_batch(&shared, c, vec![job]).await,
                        refresh: false,
                    }
                }),
                PresenceWork::Refresh(rooms) => {
                    refreshing = true;
                    Box::pin(async move {
                        PresenceDone {
                            ok: run_refresh(shared, c, rooms).await,
                            refresh: true,
                        }
                    })
                }
            };
            in_flight.push(call);
        }
    }
}

/// Re-state this node's count in every room it follows, in few calls: one script run per
/// `PRESENCE_BATCH` rooms held by the same Redis server (on Redis Cluster, grouped by the
/// master `CLUSTER SLOTS` names for each room's slot). With 1,000 rooms on six nodes that is
/// tens of calls per interval rather than 6,000, which is most of what an idle deployment
/// spends. False when the connection looks broken.
async fn run_refresh(
    shared: Arc<Shared>,
    mut connection: Connection,
    rooms: Vec<(Arc<Room>, usize)>,
) -> bool {
    let jobs = rooms.into_iter().map(|(room, local_members)| PresenceJob {
        room,
        local_members,
        message: String::new(),
        joined: "[]".into(),
        left: "[]".into(),
    });
    let mut batches: Vec<Vec<PresenceJob>> = Vec::new();
    if matches!(connection, Connection::Single(_)) {
        let jobs: Vec<PresenceJob> = jobs.collect();
        batches.extend(batch_up(jobs));
    } else {
        let owners = tokio::time::timeout(
            shared.settings.timeout,
            backend::slot_owners(&mut connection),
        )
        .await;
        let Ok(Ok(owners)) = owners else {
            shared.metrics.redis_errors.increment(1);
            return false;
        };
        let mut by_server: HashMap<Option<usize>, Vec<PresenceJob>> = HashMap::new();
        for job in jobs {
            let server = owners.server_of(&wire::presence_key(job.room.name()));
            by_server.entry(server).or_default().push(job);
        }
        for (server, jobs) in by_server {
            match server {
                Some(_) => batches.extend(batch_up(jobs)),
                // A slot without a master (a failover under way): one call per room, which
                // fails alone.
                None => batches.extend(jobs.into_iter().map(|job| vec![job])),
            }
        }
    }
    futures_util::stream::iter(batches)
        .map(|batch| run_presence_batch(&shared, connection.clone(), batch))
        .buffer_unordered(PRESENCE_IN_FLIGHT)
        .fold(true, |all, ok| async move { all && ok })
        .await
}

/// Split `jobs` into calls of at most `PRESENCE_BATCH` rooms.
fn batch_up(mut jobs: Vec<PresenceJob>) -> Vec<Vec<PresenceJob>> {
    let mut batches = Vec::with_capacity(jobs.len().div_ceil(PRESENCE_BATCH));
    while jobs.len() > PRESENCE_BATCH {
        let rest = jobs.split_off(PRESENCE_BATCH);
        batches.push(std::mem::replace(&mut jobs, rest));
    }
    if !jobs.is_empty() {
        batches.push(jobs);
    }
    batches
}

/// One presence script call for `jobs` (rooms on one Redis server). A batch that Redis refuses
/// as a whole (a slot moved since `CLUSTER SLOTS` answered) is retried one room at a time.
/// False when the connection looks broken.
async fn run_presence_batch(
    shared: &Shared,
    mut connection: Connection,
    jobs: Vec<PresenceJob>,
) -> bool {
    match run_presence(shared, &mut connection, &jobs).await {
        Ok(()) => true,
        Err(broken) if broken || jobs.len() == 1 => !broken,
        Err(_) => {
            let mut ok = true;
            for job in jobs {
                ok &= run_presence(shared, &mut connection, std::slice::from_ref(&job))
                    .await
                    .map_or_else(|broken| !broken, |()| true);
            }
            ok
        }
    }
}

/// Run the presence script once for `jobs`, within REDIS_TIMEOUT_MS. On failure (counted),
/// says whether the connection looks broken.
async fn run_presence(
    shared: &Shared,
    connection: &mut Connection,
    jobs: &[PresenceJob],
) -> Result<(), bool> {
    let keys: Vec<(String, String)> = jobs
        .iter()
        .map(|j| {
            let room = j.room.name();
            (wire::presence_key(room), wire::channel_name(room))
        })
        .collect();
    let Some((first, _)) = keys.first() else {
        return Ok(());
    };
    let routing_key = [first.as_str()];
    let update = run_script(
        connection,
        &shared.presence_script,
        &shared.presence_body,
        &routing_key,
        |cmd| {
            cmd.arg(&shared.node_id)
                .arg(PRESENCE_TTL.as_millis() as u64)
                .arg(shared.backend.publish_command());
            for (job, (presence, channel)) in jobs.iter().zip(&keys) {
                cmd.arg(presence)
                    .arg(job.local_members)
                    .arg(channel)
                    .arg(&job.message)
                    .arg(&job.joined)
                    .arg(&job.left);
            }
        },
    );
    let outcome = tokio::time::timeout(shared.settings.timeout, update).await;
    if let Ok(Ok(_)) = outcome {
        return Ok(());
    }
    shared.metrics.redis_errors.increment(1);
    match outcome {
        Ok(Err(e)) => Err(e.is_io_error() || e.is_connection_dropped()),
        _ => Err(true),
    }
}

fn new_epoch() -> String {
    format!("{:016x}", uuid::Uuid::new_v4().as_u64_pair().0)
}

fn jittered(d: Duration) -> Duration {
    let jitter = uuid::Uuid::new_v4().as_u64_pair().0 % (d.as_millis() as u64 / 2 + 1);
    d + Duration::from_millis(jitter)
}
