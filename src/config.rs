//! Settings: the one place that reads flags and environment variables.
//!
//! `Args` is what the user typed (clap, every flag also readable from an environment variable);
//! `Settings` is the validated result the rest of the relay receives. Nothing else in the crate
//! reads the environment. Every limit the relay enforces is a field here with a default.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use crate::audit::AuditTarget;

/// The token the relay accepts when none is configured. Good for a laptop, never for production;
/// the relay logs a warning when it is in use.
pub const DEV_TOKEN: &str = "dev-token";

/// The default per-address publish limit is this many connections' worth of RATE_LIMIT: a
/// household or office behind one address keeps chatting, a reconnect loop does not multiply
/// one client's allowance.
pub const PUBLISH_RATE_PER_ADDRESS_FACTOR: u32 = 10;

/// MAX_HANDSHAKES_PER_SECOND's default, per runtime worker thread. Measured on a 2-core machine
/// (docs/BENCHMARKS.md, "Reconnect storm"): with 500 per worker, a 20,000-client reconnect
/// storm left the median delivery of everyone else at 1-3 ms; without a limit it rose to
/// 0.1-1.3 s, and at 1,000 per worker to 12-25 ms.
pub const HANDSHAKES_PER_WORKER: u32 = 500;

/// The longest flush window FLUSH_DELAY_MS may set: past it a busy room's messages would wait
/// longer than anyone would call real-time.
pub const MAX_FLUSH_DELAY_MS: u64 = 1_000;
/// The largest OUTBOX_MAX_BYTES (1 GiB): a connection's charge is counted in 32 bits.
pub const MAX_OUTBOX_BYTES: usize = 1 << 30;

/// Raw command-line / environment input, before validation.
#[derive(Debug, Parser)]
#[command(
    name = "roomcast",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("ROOMCAST_COMMIT"), ")"),
    about = "roomcast: a WebSocket edge relay for real-time rooms"
)]
pub struct Args {
    /// Address to listen on [default: 127.0.0.1 while CHAT_TOKEN is the development token, else
    /// 0.0.0.0]. A non-loopback HOST with the development token is refused at start.
    #[arg(long, env = "HOST")]
    pub host: Option<IpAddr>,
    /// Port to listen on (0 picks a free port; the chosen one is printed at start).
    #[arg(long, env = "PORT", default_value_t = 8080)]
    pub port: u16,
    /// Shared token a client must present as `token=` in the upgrade URL [default: dev-token, for development only].
    /// A secret: `--help` never shows its value, and it is never logged.
    /// With signed tickets on (JWT_SECRET / JWT_PUBLIC_KEY_FILE), the static token is accepted
    /// only when this is set explicitly.
    #[arg(long, env = "CHAT_TOKEN", hide_env_values = true)]
    pub chat_token: Option<String>,
    /// HS256 secret for signed tickets (JWTs with exp, sub, rooms, pub) accepted wherever a
    /// token goes. A secret: never shown.
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// RS256 or ES256 public key (PEM file) for signed tickets.
    #[arg(long, env = "JWT_PUBLIC_KEY_FILE")]
    pub jwt_public_key_file: Option<std::path::PathBuf>,
    /// Comma-separated Origin allow-list [default: http://localhost:PORT,http://127.0.0.1:PORT].
    #[arg(long, env = "ALLOWED_ORIGINS")]
    pub allowed_origins: Option<String>,
    /// Messages a connection may publish per rate window.
    #[arg(long, env = "RATE_LIMIT", default_value_t = 20)]
    pub rate_limit: u32,
    /// Length of the rate window in milliseconds.
    #[arg(long, env = "RATE_WINDOW_MS", default_value_t = 10_000)]
    pub rate_window_ms: u64,
    /// Messages of history kept per room (sent to joiners, used for resume and de-duplication).
    #[arg(long, env = "HISTORY_LIMIT", default_value_t = 50)]
    pub history_limit: usize,
    /// Longest message text, in characters.
    #[arg(long, env = "MAX_TEXT_CHARS", default_value_t = 500)]
    pub max_text_chars: usize,
    /// Largest inbound WebSocket message, in bytes; larger frames are closed with 1009.
    #[arg(long, env = "MAX_PAYLOAD_BYTES", default_value_t = 2048)]
    pub max_payload_bytes: usize,
    /// Heartbeat ping interval in milliseconds; a peer silent for a whole interval is dropped.
    #[arg(long, env = "HEARTBEAT_MS", default_value_t = 30_000)]
    pub heartbeat_ms: u64,
    /// Most WebSocket connections held at once [default: open-file limit - 100]; past it: HTTP 503.
    #[arg(long, env = "MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Error events a connection may cause per abuse window before it is closed with 1008.
    #[arg(long, env = "ABUSE_LIMIT", default_value_t = 30)]
    pub abuse_limit: u32,
    /// Length of the abuse window in milliseconds.
    #[arg(long, env = "ABUSE_WINDOW_MS", default_value_t = 10_000)]
    pub abuse_window_ms: u64,
    /// Outbound bytes queued per connection before it is closed as a slow consumer (1013); at
    /// most 1 GiB.
    #[arg(long, env = "OUTBOX_MAX_BYTES", default_value_t = 256 * 1024)]
    pub outbox_max_bytes: usize,
    /// Kernel send buffer per WebSocket, in bytes (0: kernel autotuning, which lets one stalled
    /// reader hold megabytes of kernel memory before OUTBOX_MAX_BYTES is even reached).
    #[arg(long, env = "SEND_BUFFER_BYTES", default_value_t = 64 * 1024)]
    pub send_buffer_bytes: usize,
    /// Presence events per room are coalesced to at most one per this many milliseconds.
    #[arg(long, env = "PRESENCE_INTERVAL_MS", default_value_t = 150)]
    pub presence_interval_ms: u64,
    /// In a room of at least FLUSH_MIN_MEMBERS members that publishes again within this many
    /// milliseconds, members are woken to write once per window rather than once per message,
    /// so each socket write carries several frames (0: never delay). A message into a room that
    /// was quiet goes out at once; the ones behind it within the window wait at most this long.
    #[arg(long, env = "FLUSH_DELAY_MS", default_value_t = 10)]
    pub flush_delay_ms: u64,
    /// Members from which a room coalesces its writes (FLUSH_DELAY_MS).
    #[arg(long, env = "FLUSH_MIN_MEMBERS", default_value_t = 500)]
    pub flush_min_members: usize,
    /// Rooms kept in memory (with their history); past it, empty rooms are evicted, else 503.
    #[arg(long, env = "MAX_ROOMS", default_value_t = 10_000)]
    pub max_rooms: usize,
    /// Pings, pongs and empty data frames a connection may send per control-frame window before
    /// it is closed with 1008.
    #[arg(long, env = "CONTROL_FRAME_LIMIT", default_value_t = 100)]
    pub control_frame_limit: u32,
    /// Length of the control-frame window in milliseconds.
    #[arg(long, env = "CONTROL_FRAME_WINDOW_MS", default_value_t = 10_000)]
    pub control_frame_window_ms: u64,
    /// A connection with bytes to write that makes no write progress for this many milliseconds
    /// is closed as a slow consumer (1013).
    #[arg(long, env = "WRITE_STALL_MS", default_value_t = 10_000)]
    pub write_stall_ms: u64,
    /// Outbound bytes queued across all connections; past it the largest queues are closed 1013.
    #[arg(long, env = "OUTBOX_TOTAL_MAX_BYTES", default_value_t = 256 << 20)]
    pub outbox_total_max_bytes: usize,
    /// An incomplete frame or fragmented message older than this many milliseconds closes the
    /// connection with 1008.
    #[arg(long, env = "FRAME_TIMEOUT_MS", default_value_t = 10_000)]
    pub frame_timeout_ms: u64,
    /// Text messages per rate window from one source address, over all its connections and
    /// reconnects [default: 10 x RATE_LIMIT] (0: no per-address limit).
    #[arg(long, env = "PUBLISH_RATE_PER_ADDRESS")]
    pub publish_rate_per_address: Option<u32>,
    /// Comma-separated proxy addresses or CIDRs whose X-Forwarded-For names the client.
    #[arg(long, env = "TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: String,
    /// Bytes of message history kept across all rooms; past it the history of the room that
    /// published least recently goes first.
    #[arg(long, env = "HISTORY_MAX_BYTES", default_value_t = 256 << 20)]
    pub history_max_bytes: usize,
    /// What a room name that breaks the naming rule gets: `lobby` (the compatible contract's
    /// behaviour) or `refuse` (HTTP 400 before the upgrade).
    #[arg(long, env = "INVALID_ROOM", default_value = "lobby")]
    pub invalid_room: InvalidRoom,
    /// Redis URL (`redis://HOST:PORT`): switches to the Redis broker, so several nodes share their
    /// rooms. Unset: this node works alone, in memory. May carry a password, so --help and the
    /// logs never show its value.
    #[arg(long, env = "REDIS_URL", hide_env_values = true)]
    pub redis_url: Option<String>,
    /// Redis Cluster seed nodes, comma-separated `HOST:PORT` (or `redis://` URLs, which may carry
    /// a password): switches to the Redis broker on a Redis Cluster (rooms on sharded pub/sub).
    /// Not together with REDIS_URL. Never shown by --help or the logs.
    #[arg(long, env = "REDIS_CLUSTER_NODES", hide_env_values = true)]
    pub redis_cluster_nodes: Option<String>,
    /// Longest wait for Redis, in milliseconds: a publish not taken by then is answered
    /// `unavailable`.
    #[arg(long, env = "REDIS_TIMEOUT_MS", default_value_t = 2_000)]
    pub redis_timeout_ms: u64,
    /// Bytes of publishes waiting for Redis across the node; past it the sender gets `unavailable`.
    #[arg(long, env = "REDIS_QUEUE_MAX_BYTES", default_value_t = 16 << 20)]
    pub redis_queue_max_bytes: usize,
    /// How long a room's keys stay in Redis after its last publish or join, in seconds.
    #[arg(long, env = "REDIS_KEY_TTL_SECS", default_value_t = 86_400)]
    pub redis_key_ttl_secs: u64,
    /// Runtime worker threads (0: one per CPU core). On a machine shared with a load generator,
    /// fewer workers than cores wake each other less and batch more writes.
    #[arg(long, env = "WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,
    /// Longest time shutdown waits for connections to close before exiting, in milliseconds.
    #[arg(long, env = "SHUTDOWN_DRAIN_MS", default_value_t = 5_000)]
    pub shutdown_drain_ms: u64,
    /// Time a new TCP connection has to send its HTTP request head, in milliseconds.
    #[arg(long, env = "HANDSHAKE_TIMEOUT_MS", default_value_t = 10_000)]
    pub handshake_timeout_ms: u64,
    /// Connections one source address may hold (0: no limit); past it the upgrade gets 429. The
    /// source is the peer, or X-Forwarded-For from TRUSTED_PROXIES.
    #[arg(long, env = "MAX_CONNECTIONS_PER_IP", default_value_t = 0)]
    pub max_connections_per_ip: u32,
    /// WebSocket handshakes the relay starts per second (0: no limit); past it the upgrade gets
    /// 503 with Retry-After, so a reconnect storm costs bounded work per second and the
    /// connections already open keep their latency [default: 500 per runtime worker thread]
    #[arg(long, env = "MAX_HANDSHAKES_PER_SECOND")]
    pub max_handshakes_per_second: Option<u32>,
    /// Key that enables the server API (`/api/*`, `Authorization: Bearer KEY`). Unset: the API
    /// answers 404. A secret: --help and the logs never show its value.
    #[arg(long, env = "API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Largest request body the server API reads, in bytes; larger bodies get 413.
    #[arg(long, env = "API_MAX_BODY_BYTES", default_value_t = 64 * 1024)]
    pub api_max_body_bytes: usize,
    /// Second dialect (`GET /`): time a new connection has to send its `auth` message, in
    /// milliseconds; past it the connection is closed with 4401.
    #[arg(long, env = "AUTH_TIMEOUT_MS", default_value_t = 5_000)]
    pub auth_timeout_ms: u64,
    /// Second dialect: rooms one connection may be in at once; one more `join` closes it 1008.
    #[arg(long, env = "MAX_ROOMS_PER_CONNECTION", default_value_t = 16)]
    pub max_rooms_per_connection: usize,
    /// Time a closing connection has to take its close frame, in milliseconds.
    #[arg(long, env = "CLOSE_TIMEOUT_MS", default_value_t = 2_000)]
    pub close_timeout_ms: u64,
    /// Audit log: one JSON line per published message, refused auth and server-side disconnect,
    /// appended to this file (`-`: standard output). Reopened on SIGHUP. Unset: no audit log.
    #[arg(long, env = "AUDIT_LOG")]
    pub audit_log: Option<PathBuf>,
    /// Audit lines waiting for the writer; past it a publish is refused with `unavailable`.
    #[arg(long, env = "AUDIT_QUEUE_MAX", default_value_t = 65_536)]
    pub audit_queue_max: usize,
    /// Bytes of audit lines waiting for the writer; past it a publish is refused with
    /// `unavailable`.
    #[arg(long, env = "AUDIT_QUEUE_MAX_BYTES", default_value_t = 32 << 20)]
    pub audit_queue_max_bytes: usize,
    /// After SIGTERM, how long the relay keeps its open WebSockets (while /readyz answers 503 and
    /// new upgrades get 503) before it closes them with 1001, so a load balancer has stopped
    /// routing to it when the clients reconnect, in milliseconds. SIGINT skips this wait.
    #[arg(long, env = "LAME_DUCK_MS", default_value_t = 5_000)]
    pub lame_duck_ms: u64,
    /// The 1001 closes of a shutdown are spread evenly over this many milliseconds, so clients
    /// do not all reconnect at once (0: all at once). Must be shorter than SHUTDOWN_DRAIN_MS.
    #[arg(long, env = "SHUTDOWN_SPREAD_MS", default_value_t = 2_000)]
    pub shutdown_spread_ms: u64,
    /// A second listener (e.g. 127.0.0.1:9090) for /metrics, /healthz, /readyz and the server
    /// API. When set, the public port no longer answers /metrics nor /api/.
    #[arg(long, env = "ADMIN_ADDR")]
    pub admin_addr: Option<SocketAddr>,
    /// Serve the demo chat page at / (it pre-fills the token field); `false` for production
    /// (/roomcast-client.js is still served).
    #[arg(long, env = "SERVE_PAGE", default_value_t = true, action = clap::ArgAction::Set)]
    pub serve_page: bool,
    /// Log line format on stderr: `text` or `json` (one object per line).
    #[arg(long, env = "LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Log filter, tracing's syntax (e.g. `info`, `warn,roomcast::access=info`).
    #[arg(long = "log-filter", env = "RUST_LOG", default_value = "info")]
    pub log_filter: String,
    /// Set (to anything but empty) for logs without colours. Colours are only ever used when
    /// stderr is a terminal; json is never coloured. https://no-color.org
    #[arg(long = "no-color", env = "NO_COLOR", num_args = 0..=1, default_missing_value = "1", value_name = "ANY")]
    pub no_color: Option<String>,
    /// Access log lines (refused requests, closed connections) per second, each kind; past it
    /// lines are counted, and one line a second says how many were left out, by reason.
    #[arg(long, env = "LOG_LINES_PER_SECOND", default_value_t = 50)]
    pub log_lines_per_second: u32,
    /// PEM certificate chain (the server's certificate first): the listener serves HTTPS and WSS
    /// itself. Needs TLS_KEY_FILE. Both are read again on SIGHUP. Unset: plain HTTP (TLS ends at
    /// a load balancer or proxy in front).
    #[arg(long, env = "TLS_CERT_FILE")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of TLS_CERT_FILE's certificate.
    #[arg(long, env = "TLS_KEY_FILE")]
    pub tls_key_file: Option<PathBuf>,
}

/// The format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// `TIME LEVEL target: message key=value ...`
    Text,
    /// One JSON object per line, fields at the top level.
    Json,
}

/// What happens to an upgrade whose room name breaks the naming rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum InvalidRoom {
    /// Join `lobby`, as the compatible contract's servers do.
    Lobby,
    /// Answer 400 before the upgrade.
    Refuse,
}

/// A network and prefix length, for `TRUSTED_PROXIES`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    network: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> Option<Cidr> {
        let (addr, prefix) = match s.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p.parse::<u8>().ok()?)),
            None => (s.parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Cidr {
            network: addr,
            prefix,
        })
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        match (self.network, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

/// IPv4-mapped IPv6 addresses (`::ffff:1.2.3.4`) as the IPv4 address they are.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// A secret setting: usable by the relay, never shown by `Debug` (so never logged).
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_string())
    }
}

/// Why settings were refused at start.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    #[error("MAX_PAYLOAD_BYTES must be between 125 and 1048576, got {0}")]
    PayloadOutOfRange(usize),
    #[error("CHAT_TOKEN must not be empty")]
    EmptyToken,
    #[error("JWT_SECRET must not be empty")]
    EmptyJwtSecret,
    #[error(transparent)]
    Tickets(#[from] crate::ticket::TicketSetupError),
    #[error("API_KEY must not be empty (unset it to turn the server API off)")]
    EmptyApiKey,
    #[error("ALLOWED_ORIGINS must list at least one origin")]
    NoOrigins,
    #[error("TRUSTED_PROXIES: {0:?} is not an IP address or CIDR")]
    BadProxy(String),
    #[error("REDIS_URL must start with redis:// (or rediss://)")]
    RedisUrl,
    #[error(
        "REDIS_URL and REDIS_CLUSTER_NODES are both set: set REDIS_URL for one Redis, or \
         REDIS_CLUSTER_NODES for a Redis Cluster, not both"
    )]
    RedisUrlAndClusterNodes,
    #[error(
        "REDIS_CLUSTER_NODES entry {0} is not HOST:PORT or a redis:// (rediss://) URL \
         (the list is comma-separated)"
    )]
    RedisClusterNode(usize),
    #[error("AUDIT_LOG must be a file path or - (standard output)")]
    EmptyAuditLog,
    #[error("FLUSH_DELAY_MS must be at most {MAX_FLUSH_DELAY_MS} (a busy room's message waits up to this long), got {0}")]
    FlushDelay(u64),
    #[error("OUTBOX_MAX_BYTES must be at most {MAX_OUTBOX_BYTES} (1 GiB), got {0}")]
    OutboxTooLarge(usize),
    #[error("AUDIT_QUEUE_MAX must be between 1 and {AUDIT_QUEUE_MAX_LIMIT}, got {0}")]
    AuditQueueOutOfRange(usize),
    #[error(
        "HOST={0} lets other machines connect, but CHAT_TOKEN is the published development token: \
         set CHAT_TOKEN to a secret (for example `openssl rand -hex 32`), or HOST=127.0.0.1 to stay local"
    )]
    DevTokenOnNetwork(IpAddr),
    #[error("SHUTDOWN_SPREAD_MS ({spread}) must be shorter than SHUTDOWN_DRAIN_MS ({drain}): the closes are spread inside the drain")]
    SpreadLongerThanDrain { spread: u64, drain: u64 },
    #[error("TLS_CERT_FILE and TLS_KEY_FILE go together: {0} is set without the other")]
    TlsHalf(&'static str),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
}

/// REDIS_CLUSTER_NODES as `redis://` URLs: `HOST:PORT` entries get the scheme, URLs are kept.
/// An error names the entry by its position only (a URL may carry a password).
fn cluster_node_urls(list: &str) -> Result<Vec<Secret>, ConfigError> {
    let entries: Vec<&str> = list.split(',').map(str::trim).collect();
    if entries.iter().all(|e| e.is_empty()) {
        return Err(ConfigError::RedisClusterNode(1));
    }
    entries
        .iter()
        .enumerate()
        .filter(|(_, e)| !e.is_empty())
        .map(|(i, entry)| {
            if entry.starts_with("redis://") || entry.starts_with("rediss://") {
                return Ok(Secret(entry.to_string()));
            }
            let host_port = entry
                .rsplit_once(':')
                .filter(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0))
                .filter(|_| !entry.contains(['/', '@', ' ']));
            match host_port {
                Some(_) => Ok(Secret(format!("redis://{entry}"))),
                None => Err(ConfigError::RedisClusterNode(i + 1)),
            }
        })
        .collect()
}

/// The audit queue's slots (32 B each) are allocated at start: 4 Mi lines is 128 MiB already.
pub const AUDIT_QUEUE_MAX_LIMIT: usize = 1 << 22;

/// Validated settings. Built by [`Settings::from_args`]; tests may build one from
/// [`Settings::default`] and override fields.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen_addr: SocketAddr,
    pub chat_token: Secret,
    /// Whether the static `chat_token` is accepted (always, unless tickets are on and
    /// CHAT_TOKEN was not set explicitly).
    pub static_token: bool,
    /// Signed tickets (`None`: off).
    pub tickets: Option<std::sync::Arc<crate::ticket::Tickets>>,
    pub allowed_origins: Vec<String>,
    pub rate_limit: u32,
    pub rate_window: Duration,
    pub history_limit: usize,
    pub max_text_chars: usize,
    pub max_payload_bytes: usize,
    pub heartbeat_interval: Duration,
    /// `None` means "derive from the open-file limit at start".
    pub max_connections: Option<usize>,
    pub abuse_limit: u32,
    pub abuse_window: Duration,
    pub outbox_max_bytes: usize,
    /// `None`: leave the kernel's autotuning alone.
    pub send_buffer_bytes: Option<usize>,
    pub presence_interval: Duration,
    pub flush_delay: Duration,
    pub flush_min_members: usize,
    pub max_rooms: usize,
    pub control_frame_limit: u32,
    pub control_frame_window: Duration,
    pub write_stall: Duration,
    pub outbox_total_max_bytes: usize,
    pub frame_timeout: Duration,
    /// `None`: no per-address publish limit.
    pub publish_rate_per_address: Option<u32>,
    pub trusted_proxies: Vec<Cidr>,
    pub history_max_bytes: usize,
    pub invalid_room: InvalidRoom,
    /// `None`: the in-memory broker (one node alone), or Redis Cluster.
    pub redis_url: Option<Secret>,
    /// Redis Cluster seed nodes as `redis://` URLs (`None`: no cluster). Never set together
    /// with `redis_url`.
    pub redis_cluster_nodes: Option<Vec<Secret>>,
    pub redis_timeout: Duration,
    pub redis_queue_max_bytes: usize,
    pub redis_key_ttl: Duration,
    /// `None`: one per CPU core.
    pub worker_threads: Option<usize>,
    pub shutdown_drain: Duration,
    pub handshake_timeout: Duration,
    pub close_timeout: Duration,
    pub auth_timeout: Duration,
    pub max_rooms_per_connection: usize,
    pub max_connections_per_ip: u32,
    pub max_handshakes_per_second: u32,
    /// `None`: the server API is off (404).
    pub api_key: Option<Secret>,
    pub api_max_body_bytes: usize,
    /// `None`: no audit log.
    pub audit_log: Option<AuditTarget>,
    pub audit_queue_max: usize,
    pub audit_queue_max_bytes: usize,
    pub lame_duck: Duration,
    pub shutdown_spread: Duration,
    /// `None`: /metrics and the server API are on the public port.
    pub admin_addr: Option<SocketAddr>,
    pub serve_page: bool,
    pub log: LogSettings,
    /// `None`: plain HTTP. Loaded (and checked) at start; reloaded on SIGHUP.
    pub tls: Option<std::sync::Arc<crate::tls::Tls>>,
}

/// How the relay logs (`crate::log`).
#[derive(Debug, Clone)]
pub struct LogSettings {
    pub format: LogFormat,
    pub filter: String,
    /// NO_COLOR was set: never colour, even on a terminal.
    pub no_color: bool,
    pub lines_per_second: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Settings::from_args(Args::parse_from(["roomcast"])).expect("defaults are valid")
    }
}

impl Settings {
    pub fn from_args(args: Args) -> Result<Settings, ConfigError> {
        let nonzero = |v: u64, name: &'static str| {
            if v == 0 {
                Err(ConfigError::Zero(name))
            } else {
                Ok(v)
            }
        };
        nonzero(args.rate_limit.into(), "RATE_LIMIT")?;
        nonzero(args.rate_window_ms, "RATE_WINDOW_MS")?;
        nonzero(args.heartbeat_ms, "HEARTBEAT_MS")?;
        if args.flush_delay_ms > MAX_FLUSH_DELAY_MS {
            return Err(ConfigError::FlushDelay(args.flush_delay_ms));
        }
        nonzero(args.abuse_limit.into(), "ABUSE_LIMIT")?;
        nonzero(args.abuse_window_ms, "ABUSE_WINDOW_MS")?;
        nonzero(args.outbox_max_bytes as u64, "OUTBOX_MAX_BYTES")?;
        if args.outbox_max_bytes > MAX_OUTBOX_BYTES {
            return Err(ConfigError::OutboxTooLarge(args.outbox_max_bytes));
        }
        nonzero(args.presence_interval_ms, "PRESENCE_INTERVAL_MS")?;
        nonzero(args.max_rooms as u64, "MAX_ROOMS")?;
        nonzero(args.max_text_chars as u64, "MAX_TEXT_CHARS")?;
        nonzero(args.handshake_timeout_ms, "HANDSHAKE_TIMEOUT_MS")?;
        nonzero(args.close_timeout_ms, "CLOSE_TIMEOUT_MS")?;
        nonzero(args.shutdown_drain_ms, "SHUTDOWN_DRAIN_MS")?;
        nonzero(args.control_frame_limit.into(), "CONTROL_FRAME_LIMIT")?;
        nonzero(args.control_frame_window_ms, "CONTROL_FRAME_WINDOW_MS")?;
        nonzero(args.write_stall_ms, "WRITE_STALL_MS")?;
        nonzero(args.outbox_total_max_bytes as u64, "OUTBOX_TOTAL_MAX_BYTES")?;
        nonzero(args.frame_timeout_ms, "FRAME_TIMEOUT_MS")?;
        nonzero(args.history_max_bytes as u64, "HISTORY_MAX_BYTES")?;
        nonzero(args.redis_timeout_ms, "REDIS_TIMEOUT_MS")?;
        nonzero(args.redis_queue_max_bytes as u64, "REDIS_QUEUE_MAX_BYTES")?;
        nonzero(args.redis_key_ttl_secs, "REDIS_KEY_TTL_SECS")?;
        nonzero(args.auth_timeout_ms, "AUTH_TIMEOUT_MS")?;
        nonzero(args.api_max_body_bytes as u64, "API_MAX_BODY_BYTES")?;
        if args.api_key.as_deref() == Some("") {
            return Err(ConfigError::EmptyApiKey);
        }
        nonzero(
            args.max_rooms_per_connection as u64,
            "MAX_ROOMS_PER_CONNECTION",
        )?;
        if let Some(url) = &args.redis_url {
            if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
                return Err(ConfigError::RedisUrl);
            }
        }
        let redis_cluster_nodes = match &args.redis_cluster_nodes {
            None => None,
            Some(_) if args.redis_url.is_some() => {
                return Err(ConfigError::RedisUrlAndClusterNodes)
            }
            Some(list) => Some(cluster_node_urls(list)?),
        };
        nonzero(args.audit_queue_max_bytes as u64, "AUDIT_QUEUE_MAX_BYTES")?;
        if !(1..=AUDIT_QUEUE_MAX_LIMIT).contains(&args.audit_queue_max) {
            return Err(ConfigError::AuditQueueOutOfRange(args.audit_queue_max));
        }
        let audit_log = match args.audit_log {
            None => None,
            Some(path) if path.as_os_str().is_empty() => return Err(ConfigError::EmptyAuditLog),
            Some(path) if path.as_os_str() == "-" => Some(AuditTarget::Stdout),
            Some(path) => Some(AuditTarget::File(path)),
        };
        if let Some(max) = args.max_connections {
            nonzero(max as u64, "MAX_CONNECTIONS")?;
        }
        if !(125..=1 << 20).contains(&args.max_payload_bytes) {
            return Err(ConfigError::PayloadOutOfRange(args.max_payload_bytes));
        }
        if args.chat_token.as_deref() == Some("") {
            return Err(ConfigError::EmptyToken);
        }
        if args.jwt_secret.as_deref() == Some("") {
            return Err(ConfigError::EmptyJwtSecret);
        }
        let jwt_secret = args.jwt_secret.as_deref().map(Secret::from);
        let tickets =
            crate::ticket::Tickets::load(jwt_secret.as_ref(), args.jwt_public_key_file.as_deref())?
                .map(std::sync::Arc::new);
        // The development token is accepted when CHAT_TOKEN is unset and no tickets are set up,
        // or when CHAT_TOKEN is set to it: then the relay serves loopback only.
        let static_token = tickets.is_none() || args.chat_token.is_some();
        let dev_token =
            static_token && args.chat_token.as_deref().unwrap_or(DEV_TOKEN) == DEV_TOKEN;
        let host = match args.host {
            Some(host) if dev_token && !canonical(host).is_loopback() => {
                return Err(ConfigError::DevTokenOnNetwork(host))
            }
            Some(host) => host,
            None if dev_token => IpAddr::from([127, 0, 0, 1]),
            None => IpAddr::from([0, 0, 0, 0]),
        };
        if args.shutdown_spread_ms > 0 && args.shutdown_spread_ms >= args.shutdown_drain_ms {
            return Err(ConfigError::SpreadLongerThanDrain {
                spread: args.shutdown_spread_ms,
                drain: args.shutdown_drain_ms,
            });
        }
        let tls = match (&args.tls_cert_file, &args.tls_key_file) {
            (None, None) => None,
            (Some(cert), Some(key)) => Some(std::sync::Arc::new(crate::tls::Tls::load(cert, key)?)),
            (Some(_), None) => return Err(ConfigError::TlsHalf("TLS_CERT_FILE")),
            (None, Some(_)) => return Err(ConfigError::TlsHalf("TLS_KEY_FILE")),
        };
        let allowed_origins: Vec<String> = match &args.allowed_origins {
            Some(list) => list
                .split(',')
                .map(|o| o.trim().trim_end_matches('/').to_string())
                .filter(|o| !o.is_empty())
                .collect(),
            None => default_origins(tls.is_some(), args.port),
        };
        if allowed_origins.is_empty() {
            return Err(ConfigError::NoOrigins);
        }
        let trusted_proxies = args
            .trusted_proxies
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| Cidr::parse(p).ok_or_else(|| ConfigError::BadProxy(p.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Settings {
            listen_addr: SocketAddr::new(host, args.port),
            static_token,
            tickets,
            chat_token: Secret(args.chat_token.unwrap_or_else(|| DEV_TOKEN.to_string())),
            allowed_origins,
            rate_limit: args.rate_limit,
            rate_window: Duration::from_millis(args.rate_window_ms),
            history_limit: args.history_limit,
            max_text_chars: args.max_text_chars,
            max_payload_bytes: args.max_payload_bytes,
            heartbeat_interval: Duration::from_millis(args.heartbeat_ms),
            max_connections: args.max_connections,
            abuse_limit: args.abuse_limit,
            abuse_window: Duration::from_millis(args.abuse_window_ms),
            outbox_max_bytes: args.outbox_max_bytes,
            send_buffer_bytes: (args.send_buffer_bytes > 0).then_some(args.send_buffer_bytes),
            presence_interval: Duration::from_millis(args.presence_interval_ms),
            flush_delay: Duration::from_millis(args.flush_delay_ms),
            flush_min_members: args.flush_min_members.max(1),
            max_rooms: args.max_rooms,
            control_frame_limit: args.control_frame_limit,
            control_frame_window: Duration::from_millis(args.control_frame_window_ms),
            write_stall: Duration::from_millis(args.write_stall_ms),
            outbox_total_max_bytes: args.outbox_total_max_bytes,
            frame_timeout: Duration::from_millis(args.frame_timeout_ms),
            publish_rate_per_address: match args.publish_rate_per_address {
                None => Some(
                    args.rate_limit
                        .saturating_mul(PUBLISH_RATE_PER_ADDRESS_FACTOR),
                ),
                Some(0) => None,
                Some(limit) => Some(limit),
            },
            trusted_proxies,
            history_max_bytes: args.history_max_bytes,
            invalid_room: args.invalid_room,
            redis_url: args.redis_url.as_deref().map(Secret::from),
            redis_cluster_nodes,
            redis_timeout: Duration::from_millis(args.redis_timeout_ms),
            redis_queue_max_bytes: args.redis_queue_max_bytes,
            redis_key_ttl: Duration::from_secs(args.redis_key_ttl_secs),
            worker_threads: (args.worker_threads > 0).then_some(args.worker_threads),
            shutdown_drain: Duration::from_millis(args.shutdown_drain_ms),
            handshake_timeout: Duration::from_millis(args.handshake_timeout_ms),
            close_timeout: Duration::from_millis(args.close_timeout_ms),
            auth_timeout: Duration::from_millis(args.auth_timeout_ms),
            max_rooms_per_connection: args.max_rooms_per_connection,
            api_key: args.api_key.as_deref().map(Secret::from),
            api_max_body_bytes: args.api_max_body_bytes,
            max_connections_per_ip: args.max_connections_per_ip,
            max_handshakes_per_second: args.max_handshakes_per_second.unwrap_or_else(|| {
                let workers = match args.worker_threads {
                    0 => std::thread::available_parallelism().map_or(1, usize::from),
                    n => n,
                };
                HANDSHAKES_PER_WORKER.saturating_mul(workers.min(u32::MAX as usize) as u32)
            }),
            audit_log,
            audit_queue_max: args.audit_queue_max,
            audit_queue_max_bytes: args.audit_queue_max_bytes,
            lame_duck: Duration::from_millis(args.lame_duck_ms),
            shutdown_spread: Duration::from_millis(args.shutdown_spread_ms),
            admin_addr: args.admin_addr,
            serve_page: args.serve_page,
            log: LogSettings {
                format: args.log_format,
                filter: args.log_filter,
                no_color: args.no_color.is_some_and(|v| !v.is_empty()),
                lines_per_second: args.log_lines_per_second,
            },
            tls,
        })
    }

    /// True when the relay accepts the published development token.
    pub fn uses_dev_token(&self) -> bool {
        self.static_token && self.chat_token.expose() == DEV_TOKEN
    }

    /// When the listening port is chosen by the OS (port 0), the default allow-list must follow
    /// the real port. Called once the listener is bound; explicit lists are left alone. A relay
    /// bound to one specific address also allows the page it serves there.
    pub fn fix_default_origins(&mut self, args_had_origins: bool, bound_port: u16) {
        if !args_had_origins {
            self.allowed_origins = default_origins(self.tls.is_some(), bound_port);
            let ip = self.listen_addr.ip();
            if !ip.is_unspecified() && !canonical(ip).is_loopback() {
                let scheme = if self.tls.is_some() { "https" } else { "http" };
                self.allowed_origins
                    .push(format!("{scheme}://{}", SocketAddr::new(ip, bound_port)));
            }
        }
    }

    /// `https` with direct TLS, else `http`.
    pub fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// The page's own origins: what a browser that loaded it from this relay sends.
fn default_origins(tls: bool, port: u16) -> Vec<String> {
    let scheme = if tls { "https" } else { "http" };
    vec![
        format!("{scheme}://localhost:{port}"),
        format!("{scheme}://127.0.0.1:{port}"),
    ]
}

/// The URL to print at start for a relay bound to `bound`: one a browser on this machine can
/// open and whose Origin the default allow-list accepts (an unspecified address such as 0.0.0.0
/// is not something to open in a browser).
pub fn start_url(bound: SocketAddr, tls: bool) -> String {
    let scheme = if tls { "https" } else { "http" };
    match bound.ip() {
        IpAddr::V4(v4) if v4.is_unspecified() => format!("{scheme}://127.0.0.1:{}", bound.port()),
        IpAddr::V6(v6) if v6.is_unspecified() => format!("{scheme}://localhost:{}", bound.port()),
        _ => format!("{scheme}://{bound}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_compatible_contract() {
        let s = Settings::default();
        assert_eq!(s.listen_addr.port(), 8080);
        assert_eq!(s.chat_token.expose(), "dev-token");
        assert_eq!(
            s.allowed_origins,
            ["http://localhost:8080", "http://127.0.0.1:8080"]
        );
        assert_eq!((s.rate_limit, s.rate_window), (20, Duration::from_secs(10)));
        assert_eq!(
            (s.history_limit, s.max_text_chars, s.max_payload_bytes),
            (50, 500, 2048)
        );
        assert_eq!(s.heartbeat_interval, Duration::from_secs(30));
        assert_eq!(s.listen_addr.ip().to_string(), "127.0.0.1");
        assert!(s.serve_page && s.admin_addr.is_none());
        assert_eq!(s.log.format, LogFormat::Text);
    }

    #[test]
    fn the_flush_window_is_bounded() {
        let parse =
            |args: &[&str]| Settings::from_args(Args::parse_from([&["roomcast"], args].concat()));
        let delay = |args: &[&str]| parse(args).map(|s| s.flush_delay);
        assert_eq!(delay(&[]).ok(), Some(Duration::from_millis(10)));
        assert_eq!(delay(&["--flush-delay-ms", "0"]).ok(), Some(Duration::ZERO));
        assert!(delay(&["--flush-delay-ms", "1000"]).is_ok());
        assert!(matches!(
            delay(&["--flush-delay-ms", "1001"]),
            Err(ConfigError::FlushDelay(1001))
        ));
    }

    #[test]
    fn outbox_max_bytes_is_at_most_a_gibibyte() {
        let max = |v: &str| {
            Settings::from_args(Args::parse_from(["roomcast", "--outbox-max-bytes", v]))
                .map(|s| s.outbox_max_bytes)
        };
        assert_eq!(max("1073741824").ok(), Some(1 << 30));
        assert!(matches!(
            max("1073741825"),
            Err(ConfigError::OutboxTooLarge(1_073_741_825))
        ));
    }

    #[test]
    fn host_defaults_to_loopback_only_with_the_development_token() {
        let parse =
            |args: &[&str]| Settings::from_args(Args::parse_from([&["roomcast"], args].concat()));
        let host = |args: &[&str]| parse(args).expect("valid").listen_addr.ip().to_string();
        assert_eq!(host(&[]), "127.0.0.1");
        assert_eq!(host(&["--chat-token", "s3cret"]), "0.0.0.0");
        assert_eq!(host(&["--host", "::1"]), "::1");
        assert_eq!(host(&["--host", "127.0.0.2"]), "127.0.0.2");
        for public in ["0.0.0.0", "::", "192.0.2.1"] {
            assert!(
                matches!(
                    parse(&["--host", public]),
                    Err(ConfigError::DevTokenOnNetwork(_))
                ),
                "{public} with the development token"
            );
            assert!(matches!(
                parse(&["--host", public, "--chat-token", DEV_TOKEN]),
                Err(ConfigError::DevTokenOnNetwork(_))
            ));
        }
        // Tickets without CHAT_TOKEN: the development token is not accepted, so nothing limits
        // the relay to this machine.
        assert_eq!(host(&["--jwt-secret", "s3cret"]), "0.0.0.0");
        assert_eq!(
            host(&["--jwt-secret", "s3cret", "--host", "192.0.2.1"]),
            "192.0.2.1"
        );
        let message = parse(&["--host", "0.0.0.0"]).unwrap_err().to_string();
        assert!(
            message.contains("CHAT_TOKEN") && message.contains("HOST=127.0.0.1"),
            "{message}"
        );
    }

    #[test]
    fn the_shutdown_spread_must_fit_in_the_drain() {
        let args = Args::parse_from(["roomcast", "--shutdown-spread-ms", "5000"]);
        assert!(matches!(
            Settings::from_args(args),
            Err(ConfigError::SpreadLongerThanDrain { .. })
        ));
        let args = Args::parse_from([
            "roomcast",
            "--shutdown-spread-ms",
            "0",
            "--shutdown-drain-ms",
            "1",
        ]);
        assert!(Settings::from_args(args).is_ok());
    }

    #[test]
    fn the_start_url_is_one_a_browser_can_open() {
        let url = |s: &str| start_url(s.parse().expect("socket address"), false);
        assert_eq!(url("0.0.0.0:8080"), "http://127.0.0.1:8080");
        assert_eq!(url("[::]:8080"), "http://localhost:8080");
        assert_eq!(url("127.0.0.1:8080"), "http://127.0.0.1:8080");
        assert_eq!(url("10.1.2.3:80"), "http://10.1.2.3:80");
    }

    #[test]
    fn a_relay_bound_to_one_address_allows_its_own_page() {
        let args = Args::parse_from(["roomcast", "--host", "10.1.2.3", "--chat-token", "s"]);
        let mut s = Settings::from_args(args).expect("valid");
        s.fix_default_origins(false, 9000);
        assert_eq!(
            s.allowed_origins,
            [
                "http://localhost:9000",
                "http://127.0.0.1:9000",
                "http://10.1.2.3:9000"
            ]
        );
    }

    #[test]
    fn no_color_counts_only_when_not_empty() {
        let no_color = |args: &[&str]| {
            Settings::from_args(Args::parse_from([&["roomcast"], args].concat()))
                .expect("valid")
                .log
                .no_color
        };
        assert!(!no_color(&[]));
        assert!(no_color(&["--no-color"]));
        assert!(no_color(&["--no-color", "1"]));
        assert!(!no_color(&["--no-color", ""]));
    }

    #[test]
    fn zero_limits_are_refused() {
        let args = Args::parse_from(["roomcast", "--rate-limit", "0"]);
        assert!(matches!(
            Settings::from_args(args),
            Err(ConfigError::Zero("RATE_LIMIT"))
        ));
    }

    #[test]
    fn trusted_proxies_take_addresses_and_cidrs() {
        let args = Args::parse_from(["roomcast", "--trusted-proxies", "10.0.0.0/8, ::1"]);
        let s = Settings::from_args(args).unwrap();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(s.trusted_proxies[0].contains(ip("10.20.30.40")));
        assert!(s.trusted_proxies[0].contains(ip("::ffff:10.1.1.1")));
        assert!(!s.trusted_proxies[0].contains(ip("11.0.0.1")));
        assert!(s.trusted_proxies[1].contains(ip("::1")));
        let args = Args::parse_from(["roomcast", "--trusted-proxies", "10.0.0.0/33"]);
        assert!(matches!(
            Settings::from_args(args),
            Err(ConfigError::BadProxy(_))
        ));
    }

    #[test]
    fn secrets_are_not_shown_by_debug() {
        let args = Args::parse_from(["roomcast", "--chat-token", "supersecret"]);
        let s = Settings::from_args(args).unwrap();
        assert!(!format!("{s:?}").contains("supersecret"));
    }

    #[test]
    fn audit_log_takes_a_path_or_a_dash() {
        assert_eq!(Settings::default().audit_log, None);
        let s = Settings::from_args(Args::parse_from(["roomcast", "--audit-log", "-"])).unwrap();
        assert_eq!(s.audit_log, Some(AuditTarget::Stdout));
        let args = Args::parse_from(["roomcast", "--audit-log", "/var/log/roomcast/audit.log"]);
        let s = Settings::from_args(args).unwrap();
        assert_eq!(
            s.audit_log,
            Some(AuditTarget::File("/var/log/roomcast/audit.log".into()))
        );
        assert_eq!(
            (s.audit_queue_max, s.audit_queue_max_bytes),
            (65_536, 32 << 20)
        );
        // An empty path is refused, by clap or by validation.
        if let Ok(args) = Args::try_parse_from(["roomcast", "--audit-log", ""]) {
            assert!(matches!(
                Settings::from_args(args),
                Err(ConfigError::EmptyAuditLog)
            ));
        }
        let args = Args::parse_from(["roomcast", "--audit-queue-max", "0"]);
        assert!(matches!(
            Settings::from_args(args),
            Err(ConfigError::AuditQueueOutOfRange(0))
        ));
    }

    #[test]
    fn redis_cluster_nodes_take_host_port_or_urls_and_not_with_redis_url() {
        let s = Settings::from_args(Args::parse_from([
            "roomcast",
            "--redis-cluster-nodes",
            "127.0.0.1:7000, redis://:pw@10.0.0.2:7001,",
        ]))
        .unwrap();
        let nodes: Vec<&str> = s
            .redis_cluster_nodes
            .as_ref()
            .unwrap()
            .iter()
            .map(Secret::expose)
            .collect();
        assert_eq!(
            nodes,
            ["redis://127.0.0.1:7000", "redis://:pw@10.0.0.2:7001"]
        );
        assert_eq!(s.redis_url, None);
        assert!(!format!("{s:?}").contains("pw@"));
        let args = Args::parse_from([
            "roomcast",
            "--redis-url",
            "redis://127.0.0.1:6379",
            "--redis-cluster-nodes",
            "127.0.0.1:7000",
        ]);
        let e = Settings::from_args(args).unwrap_err();
        assert!(matches!(e, ConfigError::RedisUrlAndClusterNodes));
        assert!(e.to_string().contains("not both"), "{e}");
        for (bad, entry) in [
            ("127.0.0.1", 1),
            ("127.0.0.1:7000,:7001", 2),
            ("h:0", 1),
            ("h:70000", 1),
            ("", 1),
            ("user:pw@h:1", 1),
        ] {
            let args = Args::parse_from(["roomcast", "--redis-cluster-nodes", bad]);
            match Settings::from_args(args) {
                Err(ConfigError::RedisClusterNode(n)) => assert_eq!(n, entry, "{bad:?}"),
                other => panic!("{bad:?}: {other:?}"),
            }
        }
        assert_eq!(Settings::default().redis_cluster_nodes, None);
    }

    #[test]
    fn tls_files_come_in_pairs() {
        let args = Args::parse_from(["roomcast", "--tls-cert-file", "/nonexistent/cert.pem"]);
        assert!(matches!(
            Settings::from_args(args),
            Err(ConfigError::TlsHalf("TLS_CERT_FILE"))
        ));
        let args = Args::parse_from(["roomcast", "--tls-key-file", "/nonexistent/key.pem"]);
        assert!(matches!(
            Settings::from_args(args),
            Err(ConfigError::TlsHalf("TLS_KEY_FILE"))
        ));
        let args = Args::parse_from([
            "roomcast",
            "--tls-cert-file",
            "/nonexistent/cert.pem",
            "--tls-key-file",
            "/nonexistent/key.pem",
        ]);
        let err = Settings::from_args(args).expect_err("unreadable files");
        assert!(err.to_string().contains("/nonexistent/cert.pem"), "{err}");
    }

    #[test]
    fn origin_list_is_trimmed() {
        let args = Args::parse_from([
            "roomcast",
            "--allowed-origins",
            " https://a.example/ ,https://b.example",
        ]);
        let s = Settings::from_args(args).unwrap();
        assert_eq!(
            s.allowed_origins,
            ["https://a.example", "https://b.example"]
        );
    }
}
