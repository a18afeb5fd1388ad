//! What the coordinating process and its load workers say to each other: one JSON line per
//! command on the worker's stdin, one JSON line per reply on its stdout.
//!
//! Workers are separate processes (the harness re-executes itself with `worker`) so that runs
//! past one process's open-file limit work the same way as small ones, and so that client CPU is
//! each worker's own rusage.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};

/// What one connection does once it has joined its room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// Reads everything and counts message deliveries (loss, duplicates, latency).
    Member,
    /// Joins, then never reads again until told to drain (the `slow` scenario).
    Slow,
    /// Comes and goes in waves (the `churn` scenario); reads but counts nothing.
    Churn,
    /// Joins a room of its own, reads like any client, and floods the relay with control frames
    /// when told to (the `flood` scenario).
    Attacker,
}

/// What an attacker writes, as fast as it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum AttackKind {
    /// Empty masked pings (each one asks the relay for a pong).
    Ping,
    /// One non-final text frame, then empty continuation frames forever.
    Continuation,
    /// Unsolicited empty pongs.
    Pong,
}

/// How an attacker reads its socket while it floods.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum AttackReads {
    /// One read of at most 4 KiB every 100 ms (~40 KB/s).
    Slow,
    /// Not at all until the attack is over.
    None,
}

/// One connection a worker is responsible for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnSpec {
    pub room: u32,
    /// Globally unique; the connection's name is `u{id}`.
    pub id: u32,
    pub role: Role,
    /// Publisher id if this connection publishes.
    pub publisher: Option<u32>,
    /// Which of the plan's `nodes` it connects to (ignored when the plan has none).
    #[serde(default)]
    pub node: u16,
}

/// One relay node of a multi-node target: where to connect and what to send as `Host`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub host_header: String,
}

/// How a connection that failed before joining tries again (the `storm` scenario): like the
/// bundled JS client, the k-th retry waits a uniformly random time up to
/// `min(max_ms, base_ms * 2^k)` ("full jitter"), and the first attempt waits up to `base_ms`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Retry {
    pub base_ms: u64,
    pub max_ms: u64,
    /// Give up on a connection this long after the storm began.
    pub deadline_ms: u64,
}

/// Everything a worker needs to know at start.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkerPlan {
    pub worker: u32,
    pub addr: SocketAddr,
    pub host_header: String,
    pub path: String,
    pub token: String,
    pub origin: String,
    /// Source addresses to bind before connect, used round robin; empty for none.
    pub sources: Vec<Ipv4Addr>,
    /// Receive buffer for `Slow` connections, so they back up quickly.
    pub slow_rcvbuf: Option<u32>,
    /// `wss://`: speak TLS to the target.
    pub tls: Option<TlsPlan>,
    /// Several relay nodes: a connection goes to `nodes[spec.node]` instead of `addr`.
    #[serde(default)]
    pub nodes: Vec<Endpoint>,
    pub conns: Vec<ConnSpec>,
}

impl WorkerPlan {
    /// Where connection `spec` connects, and its `Host` header.
    pub fn endpoint(&self, spec: &ConnSpec) -> (SocketAddr, &str) {
        match self.nodes.get(spec.node as usize % self.nodes.len().max(1)) {
            Some(e) => (e.addr, &e.host_header),
            None => (self.addr, &self.host_header),
        }
    }
}

/// TLS for a `wss://` target.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TlsPlan {
    /// The name the certificate must carry (the URL's host).
    pub server_name: String,
    /// Extra PEM certificates to trust.
    pub ca_file: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Command {
    /// Open every connection of these roles that is not open, at most `rate_per_s` new ones per
    /// second and `max_in_flight` at once; reply when each has joined (history received) or failed.
    Connect {
        roles: Vec<Role>,
        rate_per_s: f64,
        max_in_flight: usize,
        timeout_ms: u64,
    },
    /// `Connect` as a storm (the `storm` scenario): every connection of these roles that is not
    /// open starts after a random delay up to `retry.base_ms`, with at most `max_in_flight`
    /// upgrades at once, and one that fails tries again as `retry` says. Replies at once;
    /// `StormWait` replies when every one has joined or given up.
    StormStart {
        roles: Vec<Role>,
        max_in_flight: usize,
        timeout_ms: u64,
        retry: Retry,
    },
    StormWait,
    /// Every publisher sends exactly one message now (the `cluster` scenario's broadcast).
    Broadcast {
        text_bytes: usize,
    },
    /// Zero the delivery counters and histograms.
    Reset,
    /// Start publishing from this worker's publishers: `rate_per_s` messages per second in total,
    /// round robin, for `duration_ms`. Replies at once; `PublishWait` replies when done.
    PublishStart {
        rate_per_s: f64,
        duration_ms: u64,
        text_bytes: usize,
    },
    PublishWait,
    /// End a running publish early (the next `PublishWait` returns what was sent).
    PublishStop,
    /// Counters and histograms so far.
    Report,
    /// Send close 1000 on every open connection of these roles and wait (bounded) until closed.
    Close {
        roles: Vec<Role>,
        timeout_ms: u64,
    },
    /// Let `Slow` connections read again and tell how each one ended.
    DrainSlow {
        timeout_ms: u64,
    },
    /// Every `Attacker` connection floods the relay with `kind` frames for `duration_ms`, then
    /// stops by itself and finds out how the relay ended it. Replies at once; `AttackWait`
    /// replies when every attacker is done.
    AttackStart {
        kind: AttackKind,
        reads: AttackReads,
        duration_ms: u64,
    },
    AttackWait,
    /// Connect, wait for the first event, close; `count` times with `concurrency` at once.
    Handshake {
        count: u64,
        concurrency: usize,
        timeout_ms: u64,
    },
    Exit,
}

impl Command {
    /// What the coordinator is waiting for while the workers carry this out (progress lines).
    pub fn activity(&self) -> &'static str {
        match self {
            Command::Connect { .. } => "connecting",
            Command::PublishWait => "publishing",
            Command::Close { .. } => "closing",
            Command::DrainSlow { .. } => "draining the slow readers",
            Command::AttackWait => "flooding",
            Command::Handshake { .. } => "handshakes",
            Command::StormWait => "waiting for the storm to reconnect",
            _ => "waiting for the load workers",
        }
    }
}

/// A histogram as (value, count) pairs, microseconds.
pub type HistPairs = Vec<(u64, u64)>;

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ConnectReply {
    pub ok: u64,
    pub failed: BTreeMap<String, u64>,
    pub latency_us: HistPairs,
    pub elapsed_us: u64,
    /// With retries: attempts made in all, and why the retried ones failed.
    #[serde(default)]
    pub attempts: u64,
    #[serde(default)]
    pub retried: BTreeMap<String, u64>,
    /// With retries: from the start of the storm until each connection had joined.
    #[serde(default)]
    pub back_us: HistPairs,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PublishReply {
    pub sent: u64,
    /// When the first message was sent (`sys::monotonic_ns`), 0 if none.
    #[serde(default)]
    pub first_sent_ns: u64,
    /// Sends that could not be written at once and were queued behind earlier bytes.
    pub queued_sends: u64,
    /// How late sends were against their schedule (microseconds).
    pub lag_us: HistPairs,
    pub elapsed_us: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct StatsReply {
    /// Message events received by `Member` connections that carried a load marker.
    pub deliveries: u64,
    pub duplicates: u64,
    /// A counter that skipped ahead of the next expected one (lost or reordered messages).
    pub gaps: u64,
    /// A counter older than one already seen, not a duplicate of the last (reordering).
    pub late: u64,
    pub presence: u64,
    pub other_events: u64,
    pub frames: u64,
    /// Frames that carry data (text, binary, continuation): what `settle` waits on, since the
    /// relay's heartbeat pings keep arriving on a quiet connection.
    pub data_frames: u64,
    pub bytes_in: u64,
    pub reads: u64,
    pub errors: BTreeMap<String, u64>,
    /// Connections the server ended, by how: `close_1013`, `eof`, `reset`, ...
    pub ended: BTreeMap<String, u64>,
    pub latency_us: HistPairs,
    pub open: u64,
    /// This worker's CPU time since it started (microseconds).
    pub cpu_us: u64,
    /// When the last counted delivery arrived (`sys::monotonic_ns`, shared by every process on
    /// the machine), 0 before any.
    #[serde(default)]
    pub last_delivery_ns: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct DrainReply {
    /// How each slow connection ended: `close_1013`, `eof`, `reset`, `open` (still open).
    pub outcomes: BTreeMap<String, u64>,
    pub bytes_drained: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AttackReply {
    /// How each attacker ended: `close_1008` (the relay's close frame), `eof`, `reset`, `open`.
    pub outcomes: BTreeMap<String, u64>,
    /// Milliseconds from the start of the attack to the first sign, seen while flooding, that
    /// the relay ended an attacker (a failed write; with slow reads also its close frame or end
    /// of stream). Attackers found ended only afterwards have no entry.
    pub ended_after_ms: Vec<u64>,
    /// Flood frames written (the first, non-final text frame of `continuation` included).
    pub frames_sent: u64,
    pub bytes_sent: u64,
    /// Bytes the attackers read from the relay, during the attack and when finding the outcome.
    pub bytes_read: u64,
    pub elapsed_us: u64,
    /// This worker's CPU time during the attack (microseconds).
    pub cpu_us: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HandshakeReply {
    pub ok: u64,
    pub failed: BTreeMap<String, u64>,
    pub latency_us: HistPairs,
    pub elapsed_us: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "reply", rename_all = "snake_case")]
pub enum Reply {
    Connected(ConnectReply),
    Done,
    Published(PublishReply),
    Stats(StatsReply),
    Closed { closed: u64, forced: u64 },
    Drained(DrainReply),
    Attacked(AttackReply),
    Handshakes(HandshakeReply),
    Failed { error: String },
}
