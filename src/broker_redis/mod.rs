//! The Redis broker (`REDIS_URL`): several nodes share their rooms through one Redis.
//!
//! **Publishing.** A connection's publish never waits for Redis: [`RedisBroker::publish`] puts a
//! job on a queue bounded in bytes (`REDIS_QUEUE_MAX_BYTES`; past it the sender gets
//! `unavailable`) and returns. The publisher task runs the publish script (`redis/publish.lua`:
//! de-duplication, `seq`, history, publish — one atomic step) for every job on ONE multiplexed
//! connection shared by all connections of the node, with up to `PUBLISHES_IN_FLIGHT` scripts
//! pipelined on it. The sender's ack (with its `seq`) is sent once Redis has answered; a publish
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
//! **Presence across nodes.** Each node coalesces its own joins and leaves as before and hands
//! them, with its member count, to the presence task: `redis/presence.lua` keeps every node's
//! count in the room's hash with an expiry, sums the live ones and publishes the event on the
//! room's channel, so every node's members get the room-wide `online`. Each node refreshes its
//! counts every `PRESENCE_REFRESH`; a node that dies drops out within `PRESENCE_TTL`, and the
//! next refresh anywhere publishes the new count.

mod wire;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use redis::aio::{MultiplexedConnection, PubSubSink};
use redis::{Script, Value};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::broker::{Broker, Publish, PublishError, Published, Reply};
use crate::hub::{Follower, Hub, Room};
use crate::metrics::Metrics;
use crate::protocol;

use wire::{PublishReply, RoomKeys};

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
/// How often a node re-states its member count in every room it follows.
const PRESENCE_REFRESH: Duration = Duration::from_secs(5);
/// How long a node's count stays in a room's total without a refresh.
const PRESENCE_TTL: Duration = Duration::from_secs(15);
/// Presence updates waiting for the presence task (one per room per interval at most).
const PRESENCE_QUEUE: usize = 16 * 1024;
/// Presence scripts in flight at once.
const PRESENCE_IN_FLIGHT: usize = 64;

/// Settings of the Redis broker.
#[derive(Debug, Clone)]
pub struct RedisSettings {
    pub url: String,
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
    client: redis::Client,
    publish_script: Script,
    read_script: Script,
    presence_script: Script,
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
        let client = redis::Client::open(settings.url.as_str()).map_err(RedisBrokerError::Url)?;
        let (jobs, jobs_rx) = mpsc::channel(PUBLISH_QUEUE_JOBS);
        let (rooms, rooms_rx) = mpsc::channel(ROOM_COMMANDS);
        let (presence, presence_rx) = mpsc::channel(PRESENCE_QUEUE);
        let shared = Arc::new(Shared {
            hub,
            settings,
            metrics,
            client,
            publish_script: Script::new(wire::PUBLISH_SCRIPT),
            read_script: Script::new(wire::READ_SCRIPT),
            presence_script: Script::new(wire::PRESENCE_SCRIPT),
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
        let key = self.shared.keys(room).presence;
        Box::pin(async move {
            let read = async {
                let mut c = self
                    .shared
                    .client
                    .get_multiplexed_async_connection()
                    .await?;
                redis::cmd("HGET")
                    .arg(&key)
                    .arg("_total")
                    .query_async::<Option<u64>>(&mut c)
                    .await
            };
            match tokio::time::timeout(self.shared.settings.timeout, read).await {
                Ok(Ok(total)) => Some(total.unwrap_or(0)),
                _ => {
                    self.shared.metrics.redis_errors.increment(1);
                    None
                }
            }
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
                let mut c = shared.client.get_multiplexed_async_connection().await?;
                let mut invocation = shared.read_script.prepare_invoke();
                invocation
                    .key(&keys.epoch)
                    .key(&keys.seq)
                    .key(&keys.history)
                    .key(&keys.dedupe)
                    .arg(new_epoch())
                    .arg(shared.key_ttl_secs());
                invocation.invoke_async::<Value>(&mut c).await
            };
            match tokio::time::timeout(shared.settings.timeout, read).await {
                Ok(Ok(value)) => match wire::parse_snapshot(&value) {
                    Some(snapshot) => Ok(Some(snapshot)),
                    None => {
                        shared.metrics.redis_errors.increment(1);
                        Err(PublishError::Unavailable)
                    }
                },
                _ => {
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
                let mut c = shared.client.get_multiplexed_async_connection().await?;
                redis::cmd("PUBLISH")
                    .arg(wire::CONTROL_CHANNEL)
                    .arg(&request)
                    .query_async::<i64>(&mut c)
                    .await
            };
            if !matches!(
                tokio::time::timeout(shared.settings.timeout, send).await,
                Ok(Ok(_))
            ) {
                shared.metrics.redis_errors.increment(1);
            }
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
}

/// Run every publish job on one multiplexed connection, many in flight, and answer each sender.
async fn publisher(shared: Arc<Shared>, mut jobs: mpsc::Receiver<Job>) {
    let mut connection: Option<MultiplexedConnection> = None;
    let mut next_attempt = Instant::now();
    let mut backoff = RECONNECT_MIN;
    let mut in_flight = FuturesUnordered::new();
    loop {
        if connection.is_none() && Instant::now() >= next_attempt {
            match tokio::time::timeout(
                shared.settings.timeout,
                shared.client.get_multiplexed_async_connection(),
            )
            .await
            {
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
                if !ok && connection.is_some() {
                    // The connection failed (not just one script): make a new one.
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
async fn run_publish(shared: Arc<Shared>, mut connection: MultiplexedConnection, job: Job) -> bool {
    let keys = shared.keys(job.room.name());
    let epoch = new_epoch();
    let mut invocation = shared.publish_script.prepare_invoke();
    invocation
        .key(&keys.epoch)
        .key(&keys.seq)
        .key(&keys.history)
        .key(&keys.dedupe)
        .arg(shared.settings.history_limit)
        .arg(&epoch)
        .arg(&job.json_head)
        .arg(job.json_tail)
        .arg(&job.dedupe_key)
        .arg(job.id.to_string())
        .arg(&job.text_hash)
        .arg(&keys.channel)
        .arg("PUBLISH")
        .arg(shared.key_ttl_secs());
    let started = Instant::now();
    let result = tokio::time::timeout(
        shared.settings.timeout,
        invocation.invoke_async::<Value>(&mut connection),
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
/// jitter; after a reconnect every followed room is subscribed and read again.
async fn rooms_task(shared: Arc<Shared>, mut commands: mpsc::Receiver<RoomCommand>) {
    let mut backoff = RECONNECT_MIN;
    let mut first = true;
    loop {
        // The subscriptions, and one multiplexed connection for every snapshot read.
        let connect = async {
            let pubsub = shared.client.get_async_pubsub().await?;
            let reads = shared.client.get_multiplexed_async_connection().await?;
            Ok::<_, redis::RedisError>((pubsub, reads))
        };
        let (pubsub, reads) = match tokio::time::timeout(shared.settings.timeout, connect).await {
            Ok(Ok(pair)) => pair,
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
        let (mut sink, mut stream) = pubsub.split();
        let control = sink.subscribe(wire::CONTROL_CHANNEL);
        if !matches!(
            tokio::time::timeout(shared.settings.timeout, control).await,
            Ok(Ok(()))
        ) {
            shared.metrics.redis_errors.increment(1);
            tokio::time::sleep(jittered(backoff)).await;
            continue;
        }
        shared.subscriber_up.store(true, Ordering::Release);
        // Whatever happened while we were away: every room with local members reads its
        // snapshot again (and is subscribed first).
        let mut pending: VecDeque<RoomCommand> = shared
            .hub
            .rooms_to_follow()
            .into_iter()
            .map(|(room, generation)| RoomCommand::Sync(room, generation))
            .collect();
        loop {
            if let Some(command) = pending.pop_front() {
                if handle_command(&shared, &mut sink, &reads, command)
                    .await
                    .is_err()
                {
                    break;
                }
                continue;
            }
            tokio::select! {
                message = stream.next() => match message {
                    Some(message) => on_message(&shared, &message),
                    None => break,
                },
                command = commands.recv() => match command {
                    Some(command) => pending.push_back(command),
                    None => return,
                },
            }
        }
        shared.subscriber_up.store(false, Ordering::Release);
        shared.metrics.redis_errors.increment(1);
        shared.reset_publisher.notify_one();
    }
}

/// Subscribe/unsubscribe in order (so a release and a new join of the same room cannot cross),
/// and read snapshots in tasks of their own.
async fn handle_command(
    shared: &Arc<Shared>,
    sink: &mut PubSubSink,
    reads: &MultiplexedConnection,
    command: RoomCommand,
) -> Result<(), ()> {
    match command {
        RoomCommand::Sync(room, generation) => {
            let channel = shared.keys(room.name()).channel;
            match tokio::time::timeout(shared.settings.timeout, sink.subscribe(&channel)).await {
                Ok(Ok(())) => {
                    tokio::spawn(read_snapshot(
                        shared.clone(),
                        reads.clone(),
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
                let channel = shared.keys(room.name()).channel;
                let _ =
                    tokio::time::timeout(shared.settings.timeout, sink.unsubscribe(&channel)).await;
            }
            Ok(())
        }
    }
}

async fn read_snapshot(
    shared: Arc<Shared>,
    mut connection: MultiplexedConnection,
    room: Arc<Room>,
    generation: u64,
) {
    let keys = shared.keys(room.name());
    let mut invocation = shared.read_script.prepare_invoke();
    invocation
        .key(&keys.epoch)
        .key(&keys.seq)
        .key(&keys.history)
        .key(&keys.dedupe)
        .arg(new_epoch())
        .arg(shared.key_ttl_secs());
    let read = invocation.invoke_async::<Value>(&mut connection);
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

/// Run presence updates (this node's joins/leaves and count per room) and re-state every
/// followed room's count each `PRESENCE_REFRESH`, on a connection of its own.
async fn presence_task(shared: Arc<Shared>, mut jobs: mpsc::Receiver<PresenceJob>) {
    let mut connection: Option<MultiplexedConnection> = None;
    let mut in_flight = FuturesUnordered::new();
    let mut refresh = tokio::time::interval(PRESENCE_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backlog: VecDeque<PresenceJob> = VecDeque::new();
    loop {
        tokio::select! {
            job = jobs.recv() => match job {
                Some(job) => backlog.push_back(job),
                None => return,
            },
            _ = refresh.tick() => {
                for (room, count) in shared.hub.followed_member_counts() {
                    if backlog.len() < PRESENCE_QUEUE {
                        backlog.push_back(PresenceJob {
                            room,
                            local_members: count,
                            message: String::new(),
                            joined: "[]".into(),
                            left: "[]".into(),
                        });
                    }
                }
            }
            Some(ok) = in_flight.next(), if !in_flight.is_empty() => {
                let ok: bool = ok;
                if !ok {
                    connection = None;
                }
            }
        }
        if connection.is_none() && !backlog.is_empty() {
            match tokio::time::timeout(
                shared.settings.timeout,
                shared.client.get_multiplexed_async_connection(),
            )
            .await
            {
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
            let (Some(job), Some(c)) = (backlog.pop_front(), connection.as_ref()) else {
                break;
            };
            in_flight.push(run_presence(shared.clone(), c.clone(), job));
        }
    }
}

/// One presence update. False when the connection looks broken.
async fn run_presence(
    shared: Arc<Shared>,
    mut connection: MultiplexedConnection,
    job: PresenceJob,
) -> bool {
    let keys = shared.keys(job.room.name());
    let mut invocation = shared.presence_script.prepare_invoke();
    invocation
        .key(&keys.presence)
        .arg(&shared.node_id)
        .arg(job.local_members)
        .arg(PRESENCE_TTL.as_millis() as u64)
        .arg(&keys.channel)
        .arg("PUBLISH")
        .arg(&job.message)
        .arg(&job.joined)
        .arg(&job.left);
    match tokio::time::timeout(
        shared.settings.timeout,
        invocation.invoke_async::<Value>(&mut connection),
    )
    .await
    {
        Ok(Ok(_)) => true,
        Ok(Err(e)) => {
            shared.metrics.redis_errors.increment(1);
            !(e.is_io_error() || e.is_connection_dropped())
        }
        Err(_) => {
            shared.metrics.redis_errors.increment(1);
            false
        }
    }
}

fn new_epoch() -> String {
    format!("{:016x}", uuid::Uuid::new_v4().as_u64_pair().0)
}

fn jittered(d: Duration) -> Duration {
    let jitter = uuid::Uuid::new_v4().as_u64_pair().0 % (d.as_millis() as u64 / 2 + 1);
    d + Duration::from_millis(jitter)
}
