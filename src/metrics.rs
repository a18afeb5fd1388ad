//! Every metric the relay exports: names, help texts, buckets, and cached handles.
//!
//! All names live here so the Grafana dashboard and the code cannot drift apart silently
//! (a test checks the dashboard against a live exposition). Handles are resolved once at start,
//! so recording is an atomic add, never a registry lookup. Fan-out is counted once per publish
//! (`increment(recipients)`), never once per recipient. Labels are bounded enums: close codes and
//! reasons, never room or user ids.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use metrics::{describe_counter, describe_gauge, describe_histogram, Counter, Gauge, Histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS: &str = "roomcast_connections";
pub const MAX_CONNECTIONS: &str = "roomcast_max_connections";
pub const CONNECTIONS_OPENED: &str = "roomcast_connections_opened_total";
pub const CONNECTIONS_CLOSED: &str = "roomcast_connections_closed_total";
pub const UPGRADE_REJECTIONS: &str = "roomcast_upgrade_rejections_total";
pub const MESSAGES_RECEIVED: &str = "roomcast_messages_received_total";
pub const FRAMES_DELIVERED: &str = "roomcast_frames_delivered_total";
pub const BYTES_SENT: &str = "roomcast_bytes_sent_total";
pub const SOCKET_WRITES: &str = "roomcast_socket_writes_total";
pub const RATE_LIMITED: &str = "roomcast_rate_limited_total";
pub const INVALID_MESSAGES: &str = "roomcast_invalid_messages_total";
pub const HEARTBEAT_TERMINATIONS: &str = "roomcast_heartbeat_terminations_total";
pub const SLOW_CONSUMER_CLOSES: &str = "roomcast_slow_consumer_closes_total";
pub const ROOMS: &str = "roomcast_rooms";
pub const PUBLISH_RECIPIENTS: &str = "roomcast_publish_recipients";
pub const PUBLISH_TO_WRITE_SECONDS: &str = "roomcast_publish_to_write_seconds";
pub const OUTBOX_QUEUED_BYTES: &str = "roomcast_outbox_queued_bytes";
pub const LIMIT_CLOSES: &str = "roomcast_limit_closes_total";
pub const ADDRESS_RATE_LIMITED: &str = "roomcast_address_rate_limited_total";
pub const BROKER_UP: &str = "roomcast_broker_up";
pub const PUBLISH_UNAVAILABLE: &str = "roomcast_publish_unavailable_total";
pub const REDIS_ERRORS: &str = "roomcast_redis_errors_total";
pub const REDIS_RECONNECTS: &str = "roomcast_redis_reconnects_total";
pub const REDIS_ROUND_TRIP_SECONDS: &str = "roomcast_redis_round_trip_seconds";
pub const REDIS_FOREIGN_MESSAGES: &str = "roomcast_redis_foreign_messages_total";
pub const REMOTE_GAPS: &str = "roomcast_remote_gaps_total";
pub const DIALECT_CONNECTIONS: &str = "roomcast_dialect_connections";
pub const AUTH_FAILURES: &str = "roomcast_auth_failures_total";
pub const JOINS: &str = "roomcast_joins_total";
pub const MEMBERSHIPS: &str = "roomcast_memberships";
pub const API_REQUESTS: &str = "roomcast_api_requests_total";
pub const AUDIT_LINES: &str = "roomcast_audit_lines_total";
pub const AUDIT_QUEUE_FULL: &str = "roomcast_audit_queue_full_total";
pub const AUDIT_ERRORS: &str = "roomcast_audit_errors_total";
pub const AUDIT_QUEUED_BYTES: &str = "roomcast_audit_queued_bytes";
pub const BUILD_INFO: &str = "roomcast_build_info";

/// The relay's version (Cargo.toml) and the commit it was built from (build.rs): the labels of
/// `roomcast_build_info`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("ROOMCAST_COMMIT");
pub const TLS_HANDSHAKE_FAILURES: &str = "roomcast_tls_handshake_failures_total";
pub const TLS_RELOADS: &str = "roomcast_tls_reloads_total";

/// Close codes that get their own label value; anything else is counted as `other`.
pub const CLOSE_CODES: [u16; 14] = [
    1000, 1001, 1002, 1003, 1005, 1006, 1007, 1008, 1009, 1011, 1013, 4000, 4401, 4403,
];

/// Server API routes (`roomcast_api_requests_total{route}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApiRoute {
    Publish,
    History,
    Presence,
    Disconnect,
    Rooms,
    /// A wrong or missing API key (401).
    Unauthorized,
    /// No such route, or the wrong method.
    Other,
}

impl ApiRoute {
    pub const ALL: [ApiRoute; 7] = [
        ApiRoute::Publish,
        ApiRoute::History,
        ApiRoute::Presence,
        ApiRoute::Disconnect,
        ApiRoute::Rooms,
        ApiRoute::Unauthorized,
        ApiRoute::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            ApiRoute::Publish => "publish",
            ApiRoute::History => "history",
            ApiRoute::Presence => "presence",
            ApiRoute::Disconnect => "disconnect",
            ApiRoute::Rooms => "rooms",
            ApiRoute::Unauthorized => "unauthorized",
            ApiRoute::Other => "other",
        }
    }
}

/// The client dialects (labels of the per-dialect series): `query` is the first dialect
/// (`/chat?token&name&room`), `auth` the second (`GET /`, an `auth` message first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Query,
    Auth,
}

impl Dialect {
    pub const ALL: [Dialect; 2] = [Dialect::Query, Dialect::Auth];

    pub fn label(self) -> &'static str {
        match self {
            Dialect::Query => "query",
            Dialect::Auth => "auth",
        }
    }
}

/// Why a second-dialect connection failed to authenticate (`roomcast_auth_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No `auth` message within AUTH_TIMEOUT_MS (4401).
    Timeout,
    /// The first message was not an `auth` message (4403).
    NotAuth,
    /// The token was wrong (4403).
    BadToken,
}

impl AuthFailure {
    pub const ALL: [AuthFailure; 3] = [
        AuthFailure::Timeout,
        AuthFailure::NotAuth,
        AuthFailure::BadToken,
    ];

    pub fn label(self) -> &'static str {
        match self {
            AuthFailure::Timeout => "timeout",
            AuthFailure::NotAuth => "not_auth",
            AuthFailure::BadToken => "bad_token",
        }
    }
}

/// Gauges and counters kept per dialect.
#[derive(Clone)]
pub struct PerDialect {
    pub connections: Gauge,
    pub joins: Counter,
    pub memberships: Gauge,
}

/// Why an upgrade was answered with a plain HTTP status instead of 101.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    NotFound,
    ForbiddenOrigin,
    Unauthorized,
    Full,
    BadHandshake,
    ShuttingDown,
    RoomsFull,
    InvalidRoom,
    /// A valid ticket that does not cover the room (403).
    ForbiddenRoom,
    /// MAX_CONNECTIONS_PER_IP reached for the source address (429).
    PerIpLimit,
    /// MAX_HANDSHAKES_PER_SECOND reached (503 with Retry-After).
    HandshakeRate,
}

impl Rejection {
    pub const ALL: [Rejection; 11] = [
        Rejection::NotFound,
        Rejection::ForbiddenOrigin,
        Rejection::Unauthorized,
        Rejection::Full,
        Rejection::BadHandshake,
        Rejection::ShuttingDown,
        Rejection::RoomsFull,
        Rejection::InvalidRoom,
        Rejection::ForbiddenRoom,
        Rejection::PerIpLimit,
        Rejection::HandshakeRate,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Rejection::NotFound => "not_found",
            Rejection::ForbiddenOrigin => "forbidden_origin",
            Rejection::Unauthorized => "unauthorized",
            Rejection::Full => "full",
            Rejection::BadHandshake => "bad_handshake",
            Rejection::ShuttingDown => "shutting_down",
            Rejection::RoomsFull => "rooms_full",
            Rejection::InvalidRoom => "invalid_room",
            Rejection::ForbiddenRoom => "forbidden_room",
            Rejection::PerIpLimit => "per_ip_limit",
            Rejection::HandshakeRate => "handshake_rate",
        }
    }
}

/// A limit that closed a connection (besides the per-connection outbox, which has its own
/// counter): labels of `roomcast_limit_closes_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// CONTROL_FRAME_LIMIT: too many pings, pongs or empty frames (1008).
    ControlFrames,
    /// WRITE_STALL_MS: bytes to write and no write progress (1013).
    WriteStall,
    /// FRAME_TIMEOUT_MS: a frame or fragmented message incomplete for too long (1008).
    IncompleteFrame,
    /// OUTBOX_TOTAL_MAX_BYTES: one of the largest queues when the process-wide budget ran out (1013).
    OutboxTotal,
}

impl Limit {
    pub const ALL: [Limit; 4] = [
        Limit::ControlFrames,
        Limit::WriteStall,
        Limit::IncompleteFrame,
        Limit::OutboxTotal,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Limit::ControlFrames => "control_frames",
            Limit::WriteStall => "write_stall",
            Limit::IncompleteFrame => "incomplete_frame",
            Limit::OutboxTotal => "outbox_total",
        }
    }
}

/// Why a connection to a TLS listener never reached HTTP (`roomcast_tls_handshake_failures_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsFailure {
    /// The client spoke plain HTTP (answered 400, then closed).
    PlainHttp,
    /// No finished handshake within HANDSHAKE_TIMEOUT_MS.
    Timeout,
    /// The handshake failed: not TLS (nor HTTP), no common version or cipher, a bad record, the
    /// client refused our certificate.
    Handshake,
}

impl TlsFailure {
    pub const ALL: [TlsFailure; 3] = [
        TlsFailure::PlainHttp,
        TlsFailure::Timeout,
        TlsFailure::Handshake,
    ];

    pub fn label(self) -> &'static str {
        match self {
            TlsFailure::PlainHttp => "plain_http",
            TlsFailure::Timeout => "timeout",
            TlsFailure::Handshake => "handshake",
        }
    }
}

/// The error codes a client can be sent; `rate_limited` has its own counter as well.
pub const INVALID_CODES: [&str; 6] = [
    "too_large",
    "bad_json",
    "bad_type",
    "empty",
    "conflict",
    "forbidden",
];

/// Cached handles for everything recorded on a hot or warm path.
#[derive(Clone)]
pub struct Metrics {
    pub connections: Gauge,
    pub connections_opened: Counter,
    closed_by_code: Arc<[Counter; CLOSE_CODES.len()]>,
    closed_other: Counter,
    rejections: Arc<[Counter; Rejection::ALL.len()]>,
    pub messages_received: Counter,
    pub frames_delivered: Counter,
    pub bytes_sent: Counter,
    pub socket_writes: Counter,
    pub rate_limited: Counter,
    pub address_rate_limited: Counter,
    pub broker_up: Gauge,
    pub publish_unavailable: Counter,
    pub redis_errors: Counter,
    pub redis_reconnects: Counter,
    pub redis_round_trip_seconds: Histogram,
    pub redis_foreign_messages: Counter,
    pub remote_gaps: Counter,
    pub audit_lines: Counter,
    pub audit_queue_full: Counter,
    pub audit_write_errors: Counter,
    pub audit_open_errors: Counter,
    pub audit_queued_bytes: Gauge,
    /// SIGHUP reloads of TLS_CERT_FILE / TLS_KEY_FILE that took effect.
    pub tls_reloads: Counter,
    /// SIGHUP reloads that failed (the certificate served before stays).
    pub tls_reload_failures: Counter,
    tls_handshake_failures: Arc<[Counter; TlsFailure::ALL.len()]>,
    limit_closes: Arc<[Counter; Limit::ALL.len()]>,
    invalid: Arc<[Counter; INVALID_CODES.len()]>,
    pub heartbeat_terminations: Counter,
    pub slow_consumer_closes: Counter,
    pub rooms: Gauge,
    pub publish_recipients: Histogram,
    pub publish_to_write_seconds: Arc<LatencyHistogram>,
    pub outbox_queued_bytes: Gauge,
    dialects: Arc<[PerDialect; Dialect::ALL.len()]>,
    auth_failures: Arc<[Counter; AuthFailure::ALL.len()]>,
    api_requests: Arc<[Counter; ApiRoute::ALL.len()]>,
}

impl Metrics {
    /// Resolve every handle against the installed recorder (or the no-op one when none is
    /// installed, as in unit tests). Every labelled series is created up front so dashboards and
    /// alerts see a zero rather than a missing series.
    pub fn new() -> Metrics {
        describe();
        metrics::gauge!(BUILD_INFO, "version" => VERSION, "commit" => COMMIT).set(1.0);
        Metrics {
            connections: metrics::gauge!(CONNECTIONS),
            connections_opened: metrics::counter!(CONNECTIONS_OPENED),
            closed_by_code: Arc::new(
                CLOSE_CODES.map(|c| metrics::counter!(CONNECTIONS_CLOSED, "code" => c.to_string())),
            ),
            closed_other: metrics::counter!(CONNECTIONS_CLOSED, "code" => "other"),
            rejections: Arc::new(
                Rejection::ALL
                    .map(|r| metrics::counter!(UPGRADE_REJECTIONS, "reason" => r.label())),
            ),
            messages_received: metrics::counter!(MESSAGES_RECEIVED),
            frames_delivered: metrics::counter!(FRAMES_DELIVERED),
            bytes_sent: metrics::counter!(BYTES_SENT),
            socket_writes: metrics::counter!(SOCKET_WRITES),
            rate_limited: metrics::counter!(RATE_LIMITED),
            address_rate_limited: metrics::counter!(ADDRESS_RATE_LIMITED),
            broker_up: metrics::gauge!(BROKER_UP),
            publish_unavailable: metrics::counter!(PUBLISH_UNAVAILABLE),
            redis_errors: metrics::counter!(REDIS_ERRORS),
            redis_reconnects: metrics::counter!(REDIS_RECONNECTS),
            redis_round_trip_seconds: metrics::histogram!(REDIS_ROUND_TRIP_SECONDS),
            redis_foreign_messages: metrics::counter!(REDIS_FOREIGN_MESSAGES),
            remote_gaps: metrics::counter!(REMOTE_GAPS),
            audit_lines: metrics::counter!(AUDIT_LINES),
            audit_queue_full: metrics::counter!(AUDIT_QUEUE_FULL),
            audit_write_errors: metrics::counter!(AUDIT_ERRORS, "op" => "write"),
            audit_open_errors: metrics::counter!(AUDIT_ERRORS, "op" => "open"),
            audit_queued_bytes: metrics::gauge!(AUDIT_QUEUED_BYTES),
            tls_reloads: metrics::counter!(TLS_RELOADS, "result" => "ok"),
            tls_reload_failures: metrics::counter!(TLS_RELOADS, "result" => "error"),
            tls_handshake_failures: Arc::new(
                TlsFailure::ALL
                    .map(|f| metrics::counter!(TLS_HANDSHAKE_FAILURES, "reason" => f.label())),
            ),
            limit_closes: Arc::new(
                Limit::ALL.map(|l| metrics::counter!(LIMIT_CLOSES, "limit" => l.label())),
            ),
            invalid: Arc::new(
                INVALID_CODES.map(|c| metrics::counter!(INVALID_MESSAGES, "code" => c)),
            ),
            heartbeat_terminations: metrics::counter!(HEARTBEAT_TERMINATIONS),
            slow_consumer_closes: metrics::counter!(SLOW_CONSUMER_CLOSES),
            rooms: metrics::gauge!(ROOMS),
            publish_recipients: metrics::histogram!(PUBLISH_RECIPIENTS),
            publish_to_write_seconds: Arc::new(LatencyHistogram::default()),
            outbox_queued_bytes: metrics::gauge!(OUTBOX_QUEUED_BYTES),
            dialects: Arc::new(Dialect::ALL.map(|d| PerDialect {
                connections: metrics::gauge!(DIALECT_CONNECTIONS, "dialect" => d.label()),
                joins: metrics::counter!(JOINS, "dialect" => d.label()),
                memberships: metrics::gauge!(MEMBERSHIPS, "dialect" => d.label()),
            })),
            auth_failures: Arc::new(
                AuthFailure::ALL.map(|f| metrics::counter!(AUTH_FAILURES, "reason" => f.label())),
            ),
            api_requests: Arc::new(
                ApiRoute::ALL.map(|r| metrics::counter!(API_REQUESTS, "route" => r.label())),
            ),
        }
    }

    pub fn dialect(&self, dialect: Dialect) -> &PerDialect {
        &self.dialects[dialect as usize]
    }

    pub fn api_request(&self, route: ApiRoute) {
        self.api_requests[route as usize].increment(1);
    }

    pub fn auth_failed(&self, why: AuthFailure) {
        self.auth_failures[why as usize].increment(1);
    }

    pub fn connection_closed(&self, code: u16) {
        match CLOSE_CODES.iter().position(|&c| c == code) {
            Some(i) => self.closed_by_code[i].increment(1),
            None => self.closed_other.increment(1),
        }
    }

    pub fn rejected(&self, why: Rejection) {
        let i = Rejection::ALL
            .iter()
            .position(|&r| r == why)
            .expect("ALL lists every variant");
        self.rejections[i].increment(1);
    }

    pub fn tls_handshake_failed(&self, why: TlsFailure) {
        self.tls_handshake_failures[why as usize].increment(1);
    }

    pub fn limit_closed(&self, limit: Limit) {
        let i = Limit::ALL
            .iter()
            .position(|&l| l == limit)
            .expect("ALL lists every variant");
        self.limit_closes[i].increment(1);
    }

    pub fn invalid_message(&self, code: &str) {
        if let Some(i) = INVALID_CODES.iter().position(|&c| c == code) {
            self.invalid[i].increment(1);
        }
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

fn describe() {
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the labels say which roomcast runs: version (Cargo.toml) and commit (git, at build time)."
    );
    describe_gauge!(CONNECTIONS, "WebSocket connections currently open.");
    describe_gauge!(
        MAX_CONNECTIONS,
        "Most WebSocket connections this relay accepts before answering 503."
    );
    describe_counter!(
        CONNECTIONS_OPENED,
        "WebSocket connections opened (upgrades completed)."
    );
    describe_counter!(
        CONNECTIONS_CLOSED,
        "WebSocket connections closed, by close code (1006: dropped without a close frame)."
    );
    describe_counter!(
        UPGRADE_REJECTIONS,
        "Upgrade requests answered with an HTTP error instead of 101, by reason."
    );
    describe_counter!(
        MESSAGES_RECEIVED,
        "Text messages received from clients in valid UTF-8 (valid JSON or not; invalid UTF-8 is a 1007 close)."
    );
    describe_counter!(
        FRAMES_DELIVERED,
        "Frames queued to connections, one per recipient of each event (queued, not yet written; pings and pongs not counted)."
    );
    describe_counter!(
        BYTES_SENT,
        "Bytes of the frames counted in roomcast_frames_delivered_total: queued to connections, not necessarily written yet (a connection closed first never sends them)."
    );
    describe_counter!(
        SOCKET_WRITES,
        "Write system calls that sent bytes on WebSocket sockets (frames per write = frames delivered / writes)."
    );
    describe_counter!(
        RATE_LIMITED,
        "Messages refused with rate_limited: per connection, per source address, or the room's delivery queue full."
    );
    describe_counter!(
        ADDRESS_RATE_LIMITED,
        "Messages refused with rate_limited because their source address passed PUBLISH_RATE_PER_ADDRESS."
    );
    describe_gauge!(
        BROKER_UP,
        "1 while the broker can publish (always with the in-memory broker; with Redis, both connections up)."
    );
    describe_counter!(
        PUBLISH_UNAVAILABLE,
        "Publishes answered with unavailable: the broker was down, too slow, or its queue (REDIS_QUEUE_MAX_BYTES) full."
    );
    describe_counter!(
        REDIS_ERRORS,
        "Redis failures: connects, scripts and snapshot reads that failed or timed out, lost subscriptions."
    );
    describe_counter!(
        REDIS_RECONNECTS,
        "Times the subscription connection to Redis was made again after it was lost (Redis Cluster: a node's connection or a shard subscription was lost); every followed room is read again after each."
    );
    describe_histogram!(
        REDIS_ROUND_TRIP_SECONDS,
        "Time from sending a publish script to Redis to its answer."
    );
    describe_counter!(
        REDIS_FOREIGN_MESSAGES,
        "Messages on a room channel that roomcast did not publish (malformed or foreign): dropped."
    );
    describe_counter!(
        REMOTE_GAPS,
        "Times a room's channel skipped a seq or changed epoch and the room was read again from Redis."
    );
    describe_counter!(
        AUDIT_LINES,
        "Lines written to the audit log (AUDIT_LOG): publishes, publish outcomes, refused auths, server-side disconnects."
    );
    describe_counter!(
        AUDIT_QUEUE_FULL,
        "Audit records refused because the audit queue (AUDIT_QUEUE_MAX lines, AUDIT_QUEUE_MAX_BYTES) was full or the writer had stopped; such a publish is answered unavailable."
    );
    describe_counter!(
        AUDIT_ERRORS,
        "Audit log failures, by op: write (a failed write or flush, retried every second; lines are kept) and open (a failed reopen; the file open before stays in use)."
    );
    describe_gauge!(
        AUDIT_QUEUED_BYTES,
        "Bytes of audit lines waiting for the writer (each charged its buffer capacity plus 16 B)."
    );
    describe_counter!(
        TLS_HANDSHAKE_FAILURES,
        "Connections to the TLS listener (TLS_CERT_FILE) that never reached HTTP, by reason (plain_http: answered 400; timeout: HANDSHAKE_TIMEOUT_MS; handshake: a failed TLS handshake)."
    );
    describe_counter!(
        TLS_RELOADS,
        "Reloads of TLS_CERT_FILE and TLS_KEY_FILE on SIGHUP, by result (ok: new handshakes get the new certificate; error: the previous certificate stays in use)."
    );
    describe_counter!(
        LIMIT_CLOSES,
        "Connections closed by a limit other than OUTBOX_MAX_BYTES, by limit (control_frames and incomplete_frame: 1008; write_stall and outbox_total: 1013)."
    );
    describe_counter!(
        INVALID_MESSAGES,
        "Messages refused as invalid, by error code."
    );
    describe_counter!(
        HEARTBEAT_TERMINATIONS,
        "Connections dropped because they stayed silent for a heartbeat interval (their close is counted as 1006)."
    );
    describe_counter!(
        SLOW_CONSUMER_CLOSES,
        "Connections closed with 1013 because their outbound queue passed OUTBOX_MAX_BYTES."
    );
    describe_gauge!(ROOMS, "Rooms held in memory (with members or history).");
    describe_gauge!(
        DIALECT_CONNECTIONS,
        "WebSocket connections currently open, by client dialect (query: /chat?token..., auth: GET / with an auth message first)."
    );
    describe_counter!(
        AUTH_FAILURES,
        "Second-dialect connections closed for failing to authenticate, by reason (timeout: 4401; not_auth, bad_token: 4403)."
    );
    describe_counter!(JOINS, "Rooms joined, by client dialect.");
    describe_counter!(
        API_REQUESTS,
        "Server API requests, by route (unauthorized: a wrong or missing API_KEY; other: no such route or method)."
    );
    describe_gauge!(
        MEMBERSHIPS,
        "Room memberships currently held, by client dialect (rooms per connection = memberships / connections)."
    );
    describe_histogram!(
        PUBLISH_RECIPIENTS,
        "Members on this relay whose queue took each published message."
    );
    describe_gauge!(
        OUTBOX_QUEUED_BYTES,
        "Outbound bytes queued and not yet written, across all connections, each frame charged its length plus a fixed per-frame overhead."
    );
}

/// Upper bounds of `roomcast_publish_to_write_seconds`' buckets, in seconds.
const PUBLISH_TO_WRITE_BUCKETS: [f64; 13] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];

/// `roomcast_publish_to_write_seconds`, kept in fixed buckets of atomic counts rather than by
/// the exporter. The exporter keeps every sample (16 B, with a timestamp read per sample) until
/// its upkeep folds them into buckets once a second, and a fan-out records one sample per
/// member it wrote to at once: at 100,000 deliveries/s that was 1.6 MB of samples a second and
/// ~0.5 % of the relay's CPU. Here a fan-out's `record_many(0.0, n)` is one addition, and the
/// histogram's memory is fixed. The relay appends it to `/metrics` (`render`).
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Observations per bucket (not cumulative); the last counts those above every bound. Their
    /// total is the count: `+Inf` and `_count` cannot disagree in a scrape.
    buckets: [AtomicU64; PUBLISH_TO_WRITE_BUCKETS.len() + 1],
    /// The observations' sum, in nanoseconds.
    sum_nanos: AtomicU64,
}

impl LatencyHistogram {
    /// One observation of `seconds`.
    pub fn record(&self, seconds: f64) {
        self.record_many(seconds, 1);
    }

    /// `count` observations of `seconds`.
    pub fn record_many(&self, seconds: f64, count: usize) {
        if count == 0 {
            return;
        }
        let count = count as u64;
        let bucket = PUBLISH_TO_WRITE_BUCKETS
            .iter()
            .position(|&bound| seconds <= bound)
            .unwrap_or(PUBLISH_TO_WRITE_BUCKETS.len());
        self.buckets[bucket].fetch_add(count, Ordering::Relaxed);
        // `as` saturates: a negative or NaN latency adds nothing, an absurd one at most u64::MAX.
        let nanos = (seconds.max(0.0) * 1e9) as u64;
        if nanos > 0 {
            self.sum_nanos
                .fetch_add(nanos.saturating_mul(count), Ordering::Relaxed);
        }
    }

    /// The histogram in the Prometheus text format, as the exporter writes its own.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write;
        let name = PUBLISH_TO_WRITE_SECONDS;
        let _ = writeln!(
            out,
            "# HELP {name} Time from a frame being queued to the write that sent it (oldest frame \
             of each write; 0 for a frame written at once to an idle connection).\n\
             # TYPE {name} histogram"
        );
        let mut cumulative = 0;
        for (i, bucket) in self.buckets.iter().enumerate() {
            cumulative += bucket.load(Ordering::Relaxed);
            let le = PUBLISH_TO_WRITE_BUCKETS
                .get(i)
                .map_or_else(|| "+Inf".to_owned(), f64::to_string);
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let sum = self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cumulative}");
    }
}

/// Install the Prometheus recorder for this process and return the handle that renders it.
/// Call once, from the binary; tests that run the relay in-process share one recorder.
pub fn install_recorder() -> Result<PrometheusHandle, metrics_exporter_prometheus::BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(PUBLISH_RECIPIENTS.to_string()),
            &[
                1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0,
                10000.0,
            ],
        )?
        .set_buckets_for_metric(
            Matcher::Full(REDIS_ROUND_TRIP_SECONDS.to_string()),
            &[
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.0,
            ],
        )?
        .install_recorder()
}

/// The exporter's upkeep (`server.rs` runs it every second): fold the histograms' samples into
/// their buckets, then free the blocks that held them.
pub fn upkeep(handle: &PrometheusHandle) {
    handle.run_upkeep();
    release_drained_samples();
}

/// Pins (and flushes) per upkeep: each tries to advance crossbeam's global epoch once and runs
/// up to eight sealed bags of deferred frees.
const RELEASE_STEPS: usize = 8;

/// The exporter keeps each histogram sample (16 B, in blocks of 64: a 1,280-B allocation) until
/// the upkeep, then hands the drained blocks to crossbeam's epoch-based collector, which frees
/// them only once its global epoch has advanced twice, a step per so many pins. An idle relay
/// pins rarely, so drained blocks stayed resident for tens of seconds: when the exporter still
/// kept `roomcast_publish_to_write_seconds` (a sample per presence delivery of a join burst),
/// ~125 B per connection at the idle point after 15,000 joined. The exporter's histograms left
/// (Redis round trips, publish recipients) take a sample per publish; a few pins and flushes
/// here let the collector free their blocks now.
fn release_drained_samples() {
    for _ in 0..RELEASE_STEPS {
        crossbeam_epoch::pin().flush();
    }
}

/// The Prometheus process collector's standard series, read from /proc at scrape time.
/// metrics' counters are integers, so these are rendered as text and appended to the exposition.
pub fn render_process_metrics(out: &mut String) {
    use std::fmt::Write;
    let page = 4096.0; // sysconf(_SC_PAGESIZE) on every Linux this relay targets
    let ticks = 100.0; // USER_HZ
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the parenthesised command name; utime is field 14, stime 15, starttime 22,
    // vsize 23, rss 24 (1-based, as in proc(5)).
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let f: Vec<&str> = after.split_whitespace().collect();
    let field = |n: usize| {
        f.get(n - 3)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let cpu = (field(14) + field(15)) / ticks;
    let vsize = field(23);
    let rss = field(24) * page;
    let boot_time = std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("btime ")
                    .and_then(|v| v.trim().parse::<f64>().ok())
            })
        })
        .unwrap_or(0.0);
    let start = boot_time + field(22) / ticks;
    let open_fds = std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0);
    let max_fds = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map(|(soft, _)| soft)
        .unwrap_or(0);
    let mut series = |name: &str, kind: &str, help: &str, value: f64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
        );
    };
    series(
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        cpu,
    );
    series(
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        rss,
    );
    series(
        "process_virtual_memory_bytes",
        "gauge",
        "Virtual memory size in bytes.",
        vsize,
    );
    series(
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        open_fds as f64,
    );
    series(
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        max_fds as f64,
    );
    series(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        start,
    );
}

#[cfg(test)]
mod tests {
    use super::LatencyHistogram;

    /// The rendered series, `(name with labels, value)`, in order.
    fn series(h: &LatencyHistogram) -> Vec<(String, f64)> {
        let mut out = String::new();
        h.render(&mut out);
        out.lines()
            .filter(|l| !l.starts_with('#'))
            .map(|l| {
                let (name, value) = l.rsplit_once(' ').expect("name value");
                (name.to_owned(), value.parse().expect("a number"))
            })
            .collect()
    }

    fn get(s: &[(String, f64)], name: &str) -> f64 {
        s.iter().find(|(n, _)| n == name).expect(name).1
    }

    #[test]
    fn the_latency_histogram_renders_cumulative_buckets_its_sum_and_count() {
        let h = LatencyHistogram::default();
        h.record_many(0.0, 100); // a fan-out's direct writes
        h.record(0.002); // a queued write, 2 ms
        h.record(3.0); // above every bound
        h.record_many(0.5, 0); // nothing
        h.record(f64::NAN); // counted above every bound, adds nothing to the sum
        let s = series(&h);
        let name = super::PUBLISH_TO_WRITE_SECONDS;
        assert_eq!(get(&s, &format!("{name}_bucket{{le=\"0.0001\"}}")), 100.0);
        assert_eq!(get(&s, &format!("{name}_bucket{{le=\"0.001\"}}")), 100.0);
        assert_eq!(get(&s, &format!("{name}_bucket{{le=\"0.0025\"}}")), 101.0);
        assert_eq!(get(&s, &format!("{name}_bucket{{le=\"1\"}}")), 101.0);
        assert_eq!(get(&s, &format!("{name}_bucket{{le=\"+Inf\"}}")), 103.0);
        assert_eq!(get(&s, &format!("{name}_count")), 103.0);
        assert!((get(&s, &format!("{name}_sum")) - 3.002).abs() < 1e-9);
        let buckets: Vec<f64> = s
            .iter()
            .filter(|(n, _)| n.contains("_bucket"))
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(buckets.len(), 14);
        assert!(buckets.windows(2).all(|w| w[0] <= w[1]), "{buckets:?}");
    }
}
