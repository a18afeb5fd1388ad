//! The two Redis deployments the broker talks to, behind one small interface: one Redis
//! (`REDIS_URL`) or a Redis Cluster (`REDIS_CLUSTER_NODES`). This module owns connecting, which
//! publish command a room's channel takes, subscribing, and turning what the subscriptions
//! receive into [`Incoming`] events. It deliberately knows nothing of what is sent (`wire.rs`) or
//! what the relay does with it (`mod.rs`): the publisher, rooms and presence tasks are the same
//! code for both deployments.
//!
//! **One Redis.** Every command connection is a fresh [`MultiplexedConnection`]; subscriptions
//! are a split [`redis::aio::PubSub`] connection plus a multiplexed connection for snapshot
//! reads. When either breaks, the broker makes new ones (`mod.rs` reconnects with backoff).
//!
//! **Redis Cluster.** Room channels are *sharded* channels (`SSUBSCRIBE` / `SPUBLISH`, Redis 7):
//! a room's channel has the room's `{hash tag}`, so it lives on the shard that holds the room's
//! keys, and a publish travels only within that shard rather than over the whole cluster bus.
//! The control channel (`rc:control`) stays a plain channel (`SUBSCRIBE` / `PUBLISH`): Redis
//! Cluster broadcasts a plain publish to every node, which is what a request every relay node
//! must act on needs, and it is rare (one per server API disconnect).
//!
//! Commands go through one shared [`ClusterConnection`] (redis-rs keeps a connection per cluster
//! node, follows MOVED/ASK and refreshes the slot map itself; it is never replaced, only
//! repaired). Subscriptions use a second one in RESP3 with a push sender: redis-rs resubscribes
//! what it tracked when it reconnects a node or learns a new topology, but cannot say what was
//! published meanwhile. So every event that can lose messages — a node's connection dropping
//! (`Disconnection` push), the server dropping a shard subscription (slot moved), or the bounded
//! push queue overflowing — becomes [`Incoming::Lost`], and the rooms task re-subscribes and
//! re-reads every followed room, exactly as the single-Redis path does after a reconnect. While
//! a slot's master is down, a subscription to its shard lands on the shard's replica (Redis 7
//! serves sharded subscriptions there), which keeps it when it is promoted.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionLike, MultiplexedConnection, PubSubSink, PubSubStream};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::{Cmd, ErrorKind, PushInfo, PushKind, RedisFuture, RedisResult, Script, Value};
use tokio::sync::{mpsc, Notify};

use crate::metrics::Metrics;

/// Where the broker's Redis is.
#[derive(Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One Redis server (`REDIS_URL`).
    Single(String),
    /// Seed nodes of a Redis Cluster (`REDIS_CLUSTER_NODES`), each a `redis://` URL.
    Cluster(Vec<String>),
}

impl std::fmt::Debug for RedisTarget {
    // The URLs may carry a password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RedisTarget::Single(_) => f.write_str("Single(..)"),
            RedisTarget::Cluster(nodes) => write!(f, "Cluster({} seed nodes)", nodes.len()),
        }
    }
}

/// Cluster pushes (channel messages, subscription changes, disconnections) waiting for the
/// rooms task. Past it a push is dropped and every followed room is read again (`Lost`).
const CLUSTER_PUSH_QUEUE: usize = 64 * 1024;
/// Cluster request retries (MOVED, ASK, a node being repaired): the first waits this long,
/// jittered, doubling up to `CLUSTER_RETRY_MAX_MS`; REDIS_TIMEOUT_MS bounds the whole request.
const CLUSTER_RETRY_MIN_MS: u64 = 20;
const CLUSTER_RETRY_MAX_MS: u64 = 500;
const CLUSTER_RETRIES: u32 = 32;

/// How the broker reaches Redis.
pub(super) enum Backend {
    Single(redis::Client),
    Cluster(Box<Cluster>),
}

pub(super) struct Cluster {
    /// For commands (publishes, presence, reads for the server API).
    commands_client: ClusterClient,
    commands: tokio::sync::Mutex<Option<ClusterConnection>>,
    /// RESP3, pushes to `pushes`: the subscriptions and the rooms task's snapshot reads.
    subscriptions_client: ClusterClient,
    pushes: Mutex<Option<mpsc::Receiver<PushInfo>>>,
    /// Set when a push was dropped (the queue was full); `lost` wakes the rooms task.
    overflowed: Arc<AtomicBool>,
    lost: Arc<Notify>,
}

impl Backend {
    /// Check the target and build its clients (nothing connects yet).
    pub(super) fn new(
        target: &RedisTarget,
        timeout: Duration,
        metrics: &Metrics,
    ) -> RedisResult<Backend> {
        match target {
            RedisTarget::Single(url) => Ok(Backend::Single(redis::Client::open(url.as_str())?)),
            RedisTarget::Cluster(nodes) => {
                let builder = || {
                    ClusterClientBuilder::new(nodes.iter().map(String::as_str))
                        .connection_timeout(timeout)
                        .response_timeout(timeout)
                        .retries(CLUSTER_RETRIES)
                        .min_retry_wait(CLUSTER_RETRY_MIN_MS)
                        .max_retry_wait(CLUSTER_RETRY_MAX_MS)
                };
                let (push_tx, push_rx) = mpsc::channel(CLUSTER_PUSH_QUEUE);
                let overflowed = Arc::new(AtomicBool::new(false));
                let lost = Arc::new(Notify::new());
                let push_sender = {
                    let (overflowed, lost, errors) = (
                        overflowed.clone(),
                        lost.clone(),
                        metrics.redis_errors.clone(),
                    );
                    // Called on redis-rs's connection tasks: never blocks.
                    move |push: PushInfo| -> Result<(), ()> {
                        if push_tx.try_send(push).is_err()
                            && !overflowed.swap(true, Ordering::AcqRel)
                        {
                            errors.increment(1);
                            lost.notify_one();
                        }
                        Ok(())
                    }
                };
                let subscriptions_client = builder()
                    .use_protocol(redis::ProtocolVersion::RESP3)
                    .push_sender(push_sender)
                    .build()?;
                Ok(Backend::Cluster(Box::new(Cluster {
                    commands_client: builder().build()?,
                    commands: tokio::sync::Mutex::new(None),
                    subscriptions_client,
                    pushes: Mutex::new(Some(push_rx)),
                    overflowed,
                    lost,
                })))
            }
        }
    }

    /// True with Redis Cluster: a connection that failed a command repairs itself and is kept.
    pub(super) fn repairs_itself(&self) -> bool {
        matches!(self, Backend::Cluster(_))
    }

    /// How a room's channel is published to (an argument of the publish and presence scripts).
    pub(super) fn publish_command(&self) -> &'static str {
        match self {
            Backend::Single(_) => "PUBLISH",
            Backend::Cluster(_) => "SPUBLISH",
        }
    }

    /// The presence script as this deployment runs it. On Redis Cluster it carries the
    /// `allow-cross-slot-keys` flag (Redis 7): a refresh re-states many rooms on one master in
    /// one call, and their keys sit in different slots of that master (declared keys must share
    /// one slot, so the script declares the first and takes the rest as arguments; the flag lets
    /// it touch those on the same server). One Redis gets the plain body, which older servers
    /// accept too.
    pub(super) fn presence_script_body(&self) -> String {
        match self {
            Backend::Single(_) => super::wire::PRESENCE_SCRIPT.to_string(),
            Backend::Cluster(_) => format!(
                "#!lua flags=allow-cross-slot-keys\n{}",
                super::wire::PRESENCE_SCRIPT
            ),
        }
    }

    /// A connection for commands: a new one (one Redis), or the shared one (Redis Cluster,
    /// made on first success).
    pub(super) async fn connect(&self) -> RedisResult<Connection> {
        match self {
            Backend::Single(client) => Ok(Connection::Single(
                client.get_multiplexed_async_connection().await?,
            )),
            Backend::Cluster(cluster) => {
                let mut shared = cluster.commands.lock().await;
                if let Some(c) = shared.as_ref() {
                    return Ok(Connection::Cluster(c.clone()));
                }
                let c = cluster.commands_client.get_async_connection().await?;
                *shared = Some(c.clone());
                Ok(Connection::Cluster(c))
            }
        }
    }

    /// The subscriptions connection (and the connection its snapshot reads go through).
    pub(super) async fn subscribe(&self) -> RedisResult<Subscriber> {
        match self {
            Backend::Single(client) => {
                let pubsub = client.get_async_pubsub().await?;
                let reads = client.get_multiplexed_async_connection().await?;
                let (sink, stream) = pubsub.split();
                Ok(Subscriber::Single {
                    sink,
                    stream,
                    reads,
                })
            }
            Backend::Cluster(cluster) => {
                let connection = cluster.subscriptions_client.get_async_connection().await?;
                let pushes = cluster
                    .pushes
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take()
                    .ok_or_else(|| {
                        redis::RedisError::from((
                            ErrorKind::Client,
                            "the cluster subscriber was made twice",
                        ))
                    })?;
                Ok(Subscriber::Cluster(Box::new(ClusterSubscriber {
                    connection,
                    pushes,
                    overflowed: cluster.overflowed.clone(),
                    lost: cluster.lost.clone(),
                })))
            }
        }
    }

    /// Give a cluster subscriber's push queue back (the rooms task let go of it).
    pub(super) fn return_subscriber(&self, subscriber: Subscriber) {
        if let (Backend::Cluster(cluster), Subscriber::Cluster(s)) = (self, subscriber) {
            *cluster.pushes.lock().unwrap_or_else(|p| p.into_inner()) = Some(s.pushes);
        }
    }
}

/// A connection commands are sent on.
#[derive(Clone)]
pub(super) enum Connection {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Connection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Connection::Single(c) => c.req_packed_command(cmd),
            Connection::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Connection::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Connection::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Connection::Single(c) => c.get_db(),
            Connection::Cluster(c) => c.get_db(),
        }
    }
}

/// Run one of the broker's scripts: `EVALSHA`, and `EVAL` with the body when the server does
/// not know it yet (a fresh or restarted Redis, a replica just promoted). `EVAL` is routed by
/// the script's first key like `EVALSHA`, so on Redis Cluster it reaches the room's shard only;
/// `SCRIPT LOAD` would have to reach every node and fails while one is down.
pub(super) async fn run_script(
    connection: &mut Connection,
    script: &Script,
    body: &str,
    keys: &[&str],
    args: impl Fn(&mut Cmd),
) -> RedisResult<Value> {
    let call = |name: &str, first: &str| {
        let mut cmd = redis::cmd(name);
        cmd.arg(first).arg(keys.len()).arg(keys);
        args(&mut cmd);
        cmd
    };
    match call("EVALSHA", script.get_hash())
        .query_async::<Value>(connection)
        .await
    {
        Err(e) if e.kind() == ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
            call("EVAL", body).query_async(connection).await
        }
        other => other,
    }
}

/// Which master holds each hash slot of a Redis Cluster, from `CLUSTER SLOTS`: ranges of
/// slots and an index per master (its address), to group keys by the server that holds them.
pub(super) struct SlotOwners {
    ranges: Vec<(u16, u16, usize)>,
}

impl SlotOwners {
    /// The index of the master holding `key`'s slot, if one does.
    pub(super) fn server_of(&self, key: &str) -> Option<usize> {
        let slot = key_slot(key.as_bytes());
        self.ranges
            .iter()
            .find(|(start, end, _)| (*start..=*end).contains(&slot))
            .map(|&(_, _, server)| server)
    }

    fn parse(reply: &Value) -> Option<SlotOwners> {
        let Value::Array(entries) = reply else {
            return None;
        };
        let mut masters: Vec<(Vec<u8>, i64)> = Vec::new();
        let mut ranges = Vec::with_capacity(entries.len());
        for entry in entries {
            let Value::Array(fields) = entry else {
                return None;
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return None;
            };
            let host = match master.first() {
                Some(Value::BulkString(b)) => b.clone(),
                Some(Value::SimpleString(s)) => s.clone().into_bytes(),
                _ => return None,
            };
            let Some(Value::Int(port)) = master.get(1) else {
                return None;
            };
            let address = (host, *port);
            let server = match masters.iter().position(|m| *m == address) {
                Some(i) => i,
                None => {
                    masters.push(address);
                    masters.len() - 1
                }
            };
            ranges.push((
                u16::try_from(*start).ok()?,
                u16::try_from(*end).ok()?,
                server,
            ));
        }
        Some(SlotOwners { ranges })
    }
}

/// A key's hash slot as Redis Cluster computes it: CRC16 (XMODEM) of the key, or of its
/// `{hash tag}` when it has a non-empty one, modulo 16,384.
fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    let mut crc: u16 = 0;
    for &byte in tagged.unwrap_or(key) {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}

/// Who holds which slots now (Redis Cluster), asked of any node.
pub(super) async fn slot_owners(connection: &mut Connection) -> RedisResult<SlotOwners> {
    let reply: Value = redis::cmd("CLUSTER")
        .arg("SLOTS")
        .query_async(connection)
        .await?;
    SlotOwners::parse(&reply).ok_or_else(|| {
        redis::RedisError::from((
            ErrorKind::Parse,
            "CLUSTER SLOTS answered in an unexpected shape",
        ))
    })
}

/// What the subscriptions connection received.
pub(super) enum Incoming {
    /// A message on a subscribed channel (a room's, or the control channel).
    Message(redis::Msg),
    /// Messages may have been missed (Redis Cluster: a node's connection dropped, a shard
    /// subscription was dropped, or pushes overflowed): every followed room is subscribed and
    /// read again.
    Lost,
    /// The server ended a shard subscription of this channel, or confirmed our unsubscribe.
    Unsubscribed(Vec<u8>),
    /// Nothing the broker acts on (a subscribe confirmation).
    Other,
    /// The subscriptions connection is gone: make a new one.
    Closed,
}

/// The subscriptions of one node.
pub(super) enum Subscriber {
    Single {
        sink: PubSubSink,
        stream: PubSubStream,
        reads: MultiplexedConnection,
    },
    Cluster(Box<ClusterSubscriber>),
}

pub(super) struct ClusterSubscriber {
    connection: ClusterConnection,
    pushes: mpsc::Receiver<PushInfo>,
    overflowed: Arc<AtomicBool>,
    lost: Arc<Notify>,
}

impl Subscriber {
    /// Subscribe to a room's channel; returns once Redis confirmed it.
    pub(super) async fn subscribe_room(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Subscriber::Single { sink, .. } => sink.subscribe(channel).await,
            Subscriber::Cluster(c) => c.connection.ssubscribe(channel).await,
        }
    }

    pub(super) async fn unsubscribe_room(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Subscriber::Single { sink, .. } => sink.unsubscribe(channel).await,
            Subscriber::Cluster(c) => c.connection.sunsubscribe(channel).await,
        }
    }

    /// Subscribe to the control channel (a plain channel in both deployments).
    pub(super) async fn subscribe_control(&mut self, channel: &str) -> RedisResult<()> {
        match self {
            Subscriber::Single { sink, .. } => sink.subscribe(channel).await,
            Subscriber::Cluster(c) => c.connection.subscribe(channel).await,
        }
    }

    /// Redis Cluster: a handle whose subscription changes may run in tasks of their own (one
    /// shard without a master must not hold up the others). None with one Redis, whose
    /// subscriptions are changed in order on the one connection.
    pub(super) fn cluster_rooms(&self) -> Option<ClusterRooms> {
        match self {
            Subscriber::Single { .. } => None,
            Subscriber::Cluster(c) => Some(ClusterRooms(c.connection.clone())),
        }
    }

    /// The connection snapshot reads go through.
    pub(super) fn reads(&self) -> Connection {
        match self {
            Subscriber::Single { reads, .. } => Connection::Single(reads.clone()),
            Subscriber::Cluster(c) => Connection::Cluster(c.connection.clone()),
        }
    }

    /// The next thing received. Cancel-safe (the rooms task selects on it).
    pub(super) async fn next(&mut self) -> Incoming {
        match self {
            Subscriber::Single { stream, .. } => match stream.next().await {
                Some(message) => Incoming::Message(message),
                None => Incoming::Closed,
            },
            Subscriber::Cluster(c) => {
                if c.overflowed.swap(false, Ordering::AcqRel) {
                    return Incoming::Lost;
                }
                tokio::select! {
                    push = c.pushes.recv() => match push {
                        Some(push) => classify(push),
                        None => Incoming::Closed,
                    },
                    _ = c.lost.notified() => {
                        if c.overflowed.swap(false, Ordering::AcqRel) {
                            Incoming::Lost
                        } else {
                            Incoming::Other
                        }
                    }
                }
            }
        }
    }
}

/// The subscriptions connection of a Redis Cluster, for changes made off the rooms task. What
/// arrives still comes through [`Subscriber::next`].
#[derive(Clone)]
pub(super) struct ClusterRooms(ClusterConnection);

impl ClusterRooms {
    pub(super) async fn subscribe_room(&mut self, channel: &str) -> RedisResult<()> {
        self.0.ssubscribe(channel).await
    }

    pub(super) async fn unsubscribe_room(&mut self, channel: &str) -> RedisResult<()> {
        self.0.sunsubscribe(channel).await
    }

    pub(super) async fn subscribe_control(&mut self, channel: &str) -> RedisResult<()> {
        self.0.subscribe(channel).await
    }

    pub(super) fn reads(&self) -> Connection {
        Connection::Cluster(self.0.clone())
    }
}

/// What a cluster push means to the broker.
fn classify(push: PushInfo) -> Incoming {
    match push.kind {
        PushKind::Message | PushKind::SMessage => match redis::Msg::from_push_info(push) {
            Some(message) => Incoming::Message(message),
            None => Incoming::Other,
        },
        PushKind::Disconnection => Incoming::Lost,
        PushKind::SUnsubscribe => match push.data.first() {
            Some(Value::BulkString(channel)) => Incoming::Unsubscribed(channel.clone()),
            _ => Incoming::Other,
        },
        _ => Incoming::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_slots_match_redis_cluster() {
        // CLUSTER KEYSLOT answers of a Redis 7 server.
        assert_eq!(key_slot(b"foo"), 12182);
        assert_eq!(key_slot(b"bar"), 5061);
        assert_eq!(key_slot(b"hello"), 866);
        assert_eq!(key_slot(b"test"), 6918);
        // A hash tag decides; an empty or unclosed one does not.
        assert_eq!(key_slot(b"rc:{foo}:presence"), 12182);
        assert_eq!(key_slot(b"{}foo"), 9500);
        assert_eq!(key_slot(b"{foo"), 13308);
    }

    #[test]
    fn slot_owners_group_keys_by_master() {
        let node = |host: &str, port| {
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ])
        };
        let range = |start, end, master| {
            Value::Array(vec![
                Value::Int(start),
                Value::Int(end),
                master,
                node("127.0.0.1", 9999),
            ])
        };
        let reply = Value::Array(vec![
            range(0, 5460, node("127.0.0.1", 7000)),
            range(5461, 10922, node("127.0.0.1", 7001)),
            range(10923, 16000, node("127.0.0.1", 7002)),
            range(16001, 16383, node("127.0.0.1", 7000)),
        ]);
        let owners = SlotOwners::parse(&reply).expect("parses");
        // Slots 5061, 6918, 12182 and 866 (key_slots_match_redis_cluster).
        assert_eq!(owners.server_of("rc:{bar}:presence"), Some(0));
        assert_eq!(owners.server_of("rc:{test}:presence"), Some(1));
        assert_eq!(owners.server_of("rc:{foo}:presence"), Some(2));
        assert_eq!(owners.server_of("rc:{hello}:presence"), Some(0));
        let last = SlotOwners::parse(&Value::Array(vec![range(16001, 16383, node("h", 1))]))
            .expect("parses");
        assert_eq!(last.server_of("{}foo"), None);
        let uncovered =
            SlotOwners::parse(&Value::Array(vec![range(0, 100, node("h", 1))])).expect("parses");
        assert_eq!(uncovered.server_of("foo"), None, "a slot nobody holds");
        assert!(SlotOwners::parse(&Value::Int(1)).is_none());
    }

    #[test]
    fn cluster_pushes_are_classified() {
        let message = PushInfo {
            kind: PushKind::SMessage,
            data: vec![
                Value::BulkString(b"rc:{a}:channel".to_vec()),
                Value::BulkString(b"payload".to_vec()),
            ],
        };
        match classify(message) {
            Incoming::Message(m) => {
                assert_eq!(m.get_channel_name(), "rc:{a}:channel");
                assert_eq!(m.get_payload_bytes(), b"payload");
            }
            _ => panic!("a sharded message is a message"),
        }
        assert!(matches!(
            classify(PushInfo {
                kind: PushKind::Disconnection,
                data: vec![]
            }),
            Incoming::Lost
        ));
        assert!(matches!(
            classify(PushInfo {
                kind: PushKind::SUnsubscribe,
                data: vec![Value::BulkString(b"rc:{a}:channel".to_vec()), Value::Int(0)]
            }),
            Incoming::Unsubscribed(c) if c == b"rc:{a}:channel"
        ));
        assert!(matches!(
            classify(PushInfo {
                kind: PushKind::SSubscribe,
                data: vec![Value::BulkString(b"rc:{a}:channel".to_vec()), Value::Int(1)]
            }),
            Incoming::Other
        ));
    }

    #[test]
    fn targets_do_not_show_their_urls() {
        let t = RedisTarget::Cluster(vec!["redis://:secret@h:1".into()]);
        assert!(!format!("{t:?}").contains("secret"));
        let t = RedisTarget::Single("redis://:secret@h:1".into());
        assert!(!format!("{t:?}").contains("secret"));
    }
}
