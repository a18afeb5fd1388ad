//! Real services for multi-node tests, run as plain child processes on free loopback ports:
//! [`RedisServer`] (Debian's `redis-server`, the relay's broker once `REDIS_URL` is set),
//! [`RedisCluster`] (six of them as a three-master, three-replica Redis Cluster, for
//! `REDIS_CLUSTER_NODES`) and [`Nginx`] (Debian's nginx as the WebSocket load balancer in front of
//! several relays).
//!
//! All are killed on drop and die with the test binary (see `process::spawn_tied`). All check
//! that what answers on their port is *their* process (a port picked free may be taken by someone
//! else before the server binds it; then they retry on a new port).
//!
//! nginx can also terminate TLS ([`Nginx::start_tls`]) with a certificate the test makes
//! ([`TestCertificates`], Debian's `openssl` CLI), for `wss://` clients.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use super::process::{
    free_port, kill_and_reap, send_signal, spawn_tied, wait_for_child, CapturedLines, TempDir,
};
use super::relay::Endpoint;

/// Debian's `redis-server` (package `redis-server`).
pub const REDIS_SERVER: &str = "/usr/bin/redis-server";
/// Debian's `redis-cli` (package `redis-tools`), for `--cluster create`.
pub const REDIS_CLI: &str = "/usr/bin/redis-cli";
/// Debian's nginx (package `nginx-light`, or any nginx with the proxy, map and upstream modules).
pub const NGINX: &str = "/usr/sbin/nginx";
/// Bound on a service answering after it was started.
pub const SERVICE_STARTUP_TIMEOUT: Duration = Duration::from_secs(10);
/// How many fresh ports a starter tries when the one it picked was taken meanwhile.
const PORT_ATTEMPTS: usize = 5;

fn require(binary: &str, package: &str) {
    assert!(
        Path::new(binary).exists(),
        "{binary} is missing: install the Debian package `{package}` (test.sh does)"
    );
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Why a service process did not come up on its port.
enum LaunchError {
    /// Its port was taken by another process (retry on another port).
    PortTaken(String),
    Failed(String),
}

// ---------------------------------------------------------------------------------------------
// Redis
// ---------------------------------------------------------------------------------------------

/// One reply in the Redis protocol (RESP2).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resp {
    Simple(String),
    Error(String),
    Integer(i64),
    /// None: the null bulk string (a missing key).
    Bulk(Option<Vec<u8>>),
    /// None: the null array.
    Array(Option<Vec<Resp>>),
}

impl Resp {
    /// A simple or bulk string as text.
    pub fn as_text(&self) -> Option<String> {
        match self {
            Resp::Simple(s) => Some(s.clone()),
            Resp::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).to_string()),
            _ => None,
        }
    }
}

/// Send one command to the Redis server at `addr` on a fresh connection and read its reply.
pub fn redis_command(addr: SocketAddr, args: &[&str]) -> std::io::Result<Resp> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.set_write_timeout(Some(Duration::from_secs(5)))?;
    let mut request = format!("*{}\r\n", args.len()).into_bytes();
    for arg in args {
        request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
        request.extend_from_slice(arg.as_bytes());
        request.extend_from_slice(b"\r\n");
    }
    stream.write_all(&request)?;
    read_resp(&mut BufReader::new(stream))
}

fn read_resp(reader: &mut impl BufRead) -> std::io::Result<Resp> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    let mut line = String::new();
    if reader.read_line(&mut line)? == 0 {
        return Err(std::io::ErrorKind::UnexpectedEof.into());
    }
    let line = line.trim_end_matches(['\r', '\n']);
    let (kind, rest) = line
        .split_at_checked(1)
        .ok_or_else(|| invalid("empty".into()))?;
    let number = || {
        rest.parse::<i64>()
            .map_err(|_| invalid(format!("bad number in {line:?}")))
    };
    Ok(match kind {
        "+" => Resp::Simple(rest.to_string()),
        "-" => Resp::Error(rest.to_string()),
        ":" => Resp::Integer(number()?),
        "$" => match number()? {
            n if n < 0 => Resp::Bulk(None),
            n => {
                let mut data = vec![0u8; n as usize + 2];
                reader.read_exact(&mut data)?;
                data.truncate(n as usize);
                Resp::Bulk(Some(data))
            }
        },
        "*" => match number()? {
            n if n < 0 => Resp::Array(None),
            n => Resp::Array(Some(
                (0..n)
                    .map(|_| read_resp(reader))
                    .collect::<std::io::Result<_>>()?,
            )),
        },
        _ => return Err(invalid(format!("unknown reply {line:?}"))),
    })
}

/// A `redis-server` child on a loopback port: no persistence, data only in memory.
pub struct RedisServer {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
    log: CapturedLines,
}

impl RedisServer {
    /// Start a private redis-server on a free port; panics (with its log) if it does not answer
    /// PING within [`SERVICE_STARTUP_TIMEOUT`].
    pub fn start() -> RedisServer {
        RedisServer::start_in(TempDir::new("roomcast-redis"))
    }

    /// One redis-server for the whole test binary, started on first use. It is never dropped; it
    /// dies with the test process (parent-death signal). Tests sharing it use their own room
    /// names and key prefixes, and must not restart or kill it.
    pub fn shared() -> &'static RedisServer {
        static SHARED: OnceLock<RedisServer> = OnceLock::new();
        SHARED.get_or_init(|| {
            // Never dropped, so its (empty) directory stays behind: keep it with the build, and
            // remove those of test processes that are gone.
            let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
            remove_dirs_of_exited_processes(&root, "roomcast-redis-shared-");
            RedisServer::start_in(TempDir::new_in(&root, "roomcast-redis-shared"))
        })
    }

    fn start_in(dir: TempDir) -> RedisServer {
        require(REDIS_SERVER, "redis-server");
        let mut last = String::new();
        for _ in 0..PORT_ATTEMPTS {
            let port = free_port();
            match launch_redis(port, dir.path(), &[]) {
                Ok((child, log)) => {
                    return RedisServer {
                        port,
                        dir,
                        child: Some(child),
                        log,
                    }
                }
                Err(LaunchError::PortTaken(log)) => last = log,
                Err(LaunchError::Failed(why)) => panic!("redis-server did not start: {why}"),
            }
        }
        panic!("redis-server found its port taken {PORT_ATTEMPTS} times; last log:\n{last}")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        loopback(self.port)
    }

    /// `redis://127.0.0.1:PORT`, for the relay's `REDIS_URL`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The pid of the running server (None after `kill_hard`).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Send one command; panics if the server cannot be reached (a Redis error is a reply).
    pub fn command(&self, args: &[&str]) -> Resp {
        redis_command(self.addr(), args)
            .unwrap_or_else(|e| panic!("redis {args:?} on port {}: {e}", self.port))
    }

    /// Does the server answer PING with PONG right now?
    pub fn ping(&self) -> bool {
        matches!(redis_command(self.addr(), &["PING"]), Ok(Resp::Simple(s)) if s == "PONG")
    }

    /// The server's log so far (current process).
    pub fn log(&self) -> String {
        self.log.text()
    }

    /// SIGKILL the server, as a crash would: no shutdown, connections reset. The port stays
    /// reserved for `restart`.
    pub fn kill_hard(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// Start the server again on the same port with no data (after `kill_hard`, or kill it
    /// first). Retries for a few seconds if the port is briefly taken.
    pub fn restart(&mut self) {
        self.kill_hard();
        // No persistence is configured; remove anything that could bring data back anyway.
        for leftover in ["dump.rdb", "appendonly.aof", "appendonlydir"] {
            let path = self.dir.path().join(leftover);
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_dir_all(&path);
        }
        let deadline = Instant::now() + SERVICE_STARTUP_TIMEOUT;
        loop {
            match launch_redis(self.port, self.dir.path(), &[]) {
                Ok((child, log)) => {
                    self.child = Some(child);
                    self.log = log;
                    return;
                }
                Err(LaunchError::PortTaken(_)) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(LaunchError::PortTaken(log)) | Err(LaunchError::Failed(log)) => {
                    panic!("redis-server did not restart on port {}: {log}", self.port)
                }
            }
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill_hard();
        if std::thread::panicking() {
            eprintln!(
                "---- redis-server on port {} (log tail) ----\n{}",
                self.port,
                self.log.tail(30)
            );
        }
    }
}

/// Remove `root/PREFIX{pid}-...` directories whose process no longer runs.
fn remove_dirs_of_exited_processes(root: &Path, prefix: &str) {
    let Ok(entries) = std::fs::read_dir(root) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().to_string();
        let pid = name
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('-').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
}

fn launch_redis(
    port: u16,
    dir: &Path,
    extra_args: &[String],
) -> Result<(Child, CapturedLines), LaunchError> {
    let mut cmd = Command::new(REDIS_SERVER);
    cmd.args(["--port", &port.to_string()])
        .args(extra_args)
        .args(["--bind", "127.0.0.1"])
        .args(["--save", ""])
        .args(["--appendonly", "no"])
        .args(["--daemonize", "no"])
        .args(["--logfile", ""])
        .arg("--dir")
        .arg(dir)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = spawn_tied(cmd, libc::SIGKILL)
        .map_err(|e| LaunchError::Failed(format!("cannot start {REDIS_SERVER}: {e}")))?;
    let log = CapturedLines::capture(child.stdout.take().expect("stdout is piped"));
    let stderr = CapturedLines::capture(child.stderr.take().expect("stderr is piped"));
    let addr = loopback(port);
    let deadline = Instant::now() + SERVICE_STARTUP_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            std::thread::sleep(Duration::from_millis(50));
            let all = format!("{}\n{}", log.text(), stderr.text());
            return Err(if all.contains("Address already in use") {
                LaunchError::PortTaken(all)
            } else {
                LaunchError::Failed(format!("exited with {status}:\n{all}"))
            });
        }
        if let Ok(Resp::Simple(pong)) = redis_command(addr, &["PING"]) {
            if pong == "PONG" {
                // Make sure it is our process that answered, not another server on this port.
                let info = redis_command(addr, &["INFO", "server"])
                    .ok()
                    .and_then(|r| r.as_text())
                    .unwrap_or_default();
                let ours = format!("process_id:{}", child.id());
                if info.lines().any(|l| l.trim() == ours) {
                    return Ok((child, log));
                }
                kill_and_reap(&mut child);
                return Err(LaunchError::PortTaken(format!(
                    "another redis answers on port {port}"
                )));
            }
        }
        if Instant::now() >= deadline {
            kill_and_reap(&mut child);
            return Err(LaunchError::Failed(format!(
                "no PONG on port {port} within {SERVICE_STARTUP_TIMEOUT:?}; log:\n{}",
                log.text()
            )));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// Redis Cluster
// ---------------------------------------------------------------------------------------------

/// Redis Cluster's node timeout in these tests: a master that stops answering is marked failed
/// after about this long, and its replica takes over a second or two later.
pub const CLUSTER_NODE_TIMEOUT: Duration = Duration::from_millis(1000);
/// Bound on forming the cluster (every slot served, every replica synced).
pub const CLUSTER_FORM_TIMEOUT: Duration = Duration::from_secs(30);

/// One `redis-server --cluster-enabled yes` of a [`RedisCluster`].
struct ClusterNode {
    port: u16,
    /// None once killed. Behind a lock so a test can kill a node of the shared cluster.
    child: std::sync::Mutex<Option<Child>>,
    log: CapturedLines,
}

impl ClusterNode {
    fn is_running(&self) -> bool {
        self.child
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    fn kill(&self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|p| p.into_inner()).take() {
            kill_and_reap(&mut child);
        }
    }
}

/// A master as `CLUSTER NODES` describes it: its port and the slot ranges it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterMaster {
    pub port: u16,
    pub slots: Vec<(u16, u16)>,
}

impl ClusterMaster {
    pub fn serves(&self, slot: u16) -> bool {
        self.slots.iter().any(|&(a, b)| (a..=b).contains(&slot))
    }
}

/// Three masters and three replicas (`redis-server --cluster-enabled yes` ×6, then
/// `redis-cli --cluster create --cluster-replicas 1`), no persistence, on free loopback ports
/// (each node's cluster bus port picked free too, `--cluster-port`), everything in one temp dir.
///
/// Configured as docs/DEPLOY.md recommends, with a short node timeout for tests:
/// `cluster-require-full-coverage no` (a shard without a master does not stop the others),
/// `cluster-replica-validity-factor 0` and `repl-diskless-sync-delay 0` (a replica always takes
/// over; see FACTS.md).
pub struct RedisCluster {
    nodes: Vec<ClusterNode>,
    dir: TempDir,
}

impl RedisCluster {
    /// Start six nodes, form the cluster and wait until every slot is served and every replica
    /// has synced; panics (with the logs) past [`CLUSTER_FORM_TIMEOUT`].
    pub fn start() -> RedisCluster {
        RedisCluster::start_in(TempDir::new("roomcast-redis-cluster"))
    }

    /// One cluster for the whole test binary, started on first use, never dropped (its nodes die
    /// with the test process). Tests sharing it use their own room names and user names (a
    /// server API disconnect reaches every relay on the cluster). A test that kills a node must
    /// hold [`RedisCluster::exclusive`]'s write guard; the others its read guard.
    pub fn shared() -> &'static RedisCluster {
        static SHARED: OnceLock<RedisCluster> = OnceLock::new();
        SHARED.get_or_init(|| {
            let root = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
            remove_dirs_of_exited_processes(&root, "roomcast-redis-cluster-shared-");
            RedisCluster::start_in(TempDir::new_in(&root, "roomcast-redis-cluster-shared"))
        })
    }

    /// Orders tests on the shared cluster: a test that kills a node takes the write guard, so
    /// no other test's traffic is running through its failover.
    pub fn exclusive() -> &'static tokio::sync::RwLock<()> {
        static LOCK: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());
        &LOCK
    }

    fn start_in(dir: TempDir) -> RedisCluster {
        require(REDIS_SERVER, "redis-server");
        require(REDIS_CLI, "redis-tools");
        let mut nodes = Vec::new();
        for i in 0..6 {
            nodes.push(launch_cluster_node(dir.path(), i));
        }
        let cluster = RedisCluster { nodes, dir };
        let mut create = Command::new(REDIS_CLI);
        create.arg("--cluster").arg("create");
        for node in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", node.port));
        }
        create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null());
        let out = create
            .output()
            .unwrap_or_else(|e| panic!("cannot run {REDIS_CLI}: {e}"));
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_until_formed(CLUSTER_FORM_TIMEOUT);
        cluster
    }

    /// Every live node's `HOST:PORT`, comma-separated: the relay's `REDIS_CLUSTER_NODES`.
    pub fn seeds(&self) -> String {
        self.live_ports()
            .iter()
            .map(|p| format!("127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Ports of the nodes still running.
    pub fn live_ports(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.is_running())
            .map(|n| n.port)
            .collect()
    }

    /// Send one command to the node on `port`; panics if it cannot be reached.
    pub fn command(&self, port: u16, args: &[&str]) -> Resp {
        redis_command(loopback(port), args)
            .unwrap_or_else(|e| panic!("redis {args:?} on cluster node {port}: {e}"))
    }

    /// The hash slot of `key` (`CLUSTER KEYSLOT`).
    pub fn keyslot(&self, key: &str) -> u16 {
        let port = self.live_ports()[0];
        match self.command(port, &["CLUSTER", "KEYSLOT", key]) {
            Resp::Integer(slot) => slot as u16,
            other => panic!("CLUSTER KEYSLOT {key}: {other:?}"),
        }
    }

    /// The masters as the live node on `port` sees them (flagged failed ones left out).
    pub fn masters_seen_by(&self, port: u16) -> Vec<ClusterMaster> {
        let text = self
            .command(port, &["CLUSTER", "NODES"])
            .as_text()
            .unwrap_or_default();
        let mut masters: Vec<ClusterMaster> = text
            .lines()
            .filter_map(|line| {
                let fields: Vec<&str> = line.split_whitespace().collect();
                let flags = fields.get(2)?;
                if !flags.split(',').any(|f| f == "master") || flags.contains("fail") {
                    return None;
                }
                let port = fields[1].split(['@', ':']).nth(1)?.parse().ok()?;
                let slots = fields
                    .iter()
                    .skip(8)
                    .filter(|s| !s.starts_with('['))
                    .filter_map(|range| match range.split_once('-') {
                        Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                        None => range.parse().ok().map(|s| (s, s)),
                    })
                    .collect();
                Some(ClusterMaster { port, slots })
            })
            .filter(|m: &ClusterMaster| !m.slots.is_empty())
            .collect();
        masters.sort_by_key(|m| m.slots.first().copied());
        masters
    }

    /// The ports of the replicas of the master on `master_port`, as the first live node sees
    /// them.
    pub fn replicas_of(&self, master_port: u16) -> Vec<u16> {
        let text = self
            .command(self.live_ports()[0], &["CLUSTER", "NODES"])
            .as_text()
            .unwrap_or_default();
        let port_of = |addr: &str| addr.split(['@', ':']).nth(1)?.parse::<u16>().ok();
        let lines: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let Some(master_id) = lines
            .iter()
            .find(|f| f.len() > 3 && port_of(f[1]) == Some(master_port))
            .map(|f| f[0])
        else {
            return Vec::new();
        };
        lines
            .iter()
            .filter(|f| f.len() > 3 && f[3] == master_id)
            .filter_map(|f| port_of(f[1]))
            .collect()
    }

    /// The masters serving slots now, as the first live node sees them.
    pub fn masters(&self) -> Vec<ClusterMaster> {
        self.masters_seen_by(self.live_ports()[0])
    }

    /// The port of the master serving `slot` now.
    pub fn master_of(&self, slot: u16) -> u16 {
        self.masters()
            .iter()
            .find(|m| m.serves(slot))
            .map(|m| m.port)
            .unwrap_or_else(|| panic!("no live master serves slot {slot}"))
    }

    /// SIGKILL the node on `port`, as a crash would (it stays down).
    pub fn kill_hard(&self, port: u16) {
        self.nodes
            .iter()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no cluster node on port {port}"))
            .kill();
    }

    /// Is every slot served by a master every live node agrees on, with `cluster_state:ok`?
    pub fn all_slots_served(&self) -> bool {
        let live = self.live_ports();
        let mut views = Vec::new();
        for &port in &live {
            let info = redis_command(loopback(port), &["CLUSTER", "INFO"])
                .ok()
                .and_then(|r| r.as_text())
                .unwrap_or_default();
            if !info.lines().any(|l| l.trim() == "cluster_state:ok") {
                return false;
            }
            let masters = self.masters_seen_by(port);
            let served: u32 = masters
                .iter()
                .flat_map(|m| m.slots.iter())
                .map(|&(a, b)| u32::from(b - a) + 1)
                .sum();
            if served != 16384 || masters.iter().any(|m| !live.contains(&m.port)) {
                return false;
            }
            views.push(masters);
        }
        views.windows(2).all(|w| w[0] == w[1])
    }

    /// Wait until every slot is served by a live master (after a start or a failover); panics
    /// with the nodes' logs past `timeout`.
    pub fn wait_until_served(&self, timeout: Duration) -> Duration {
        let started = Instant::now();
        while !self.all_slots_served() {
            if started.elapsed() > timeout {
                panic!(
                    "the Redis Cluster did not serve every slot within {timeout:?}\n{}",
                    self.logs_tail(15)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        started.elapsed()
    }

    /// Wait until every slot is served and every replica's link to its master is up (a replica
    /// that has not synced cannot take over).
    fn wait_until_formed(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        self.wait_until_served(timeout);
        loop {
            let masters: Vec<u16> = self.masters().iter().map(|m| m.port).collect();
            let synced = self
                .live_ports()
                .iter()
                .filter(|p| !masters.contains(p))
                .all(|&p| {
                    redis_command(loopback(p), &["INFO", "replication"])
                        .ok()
                        .and_then(|r| r.as_text())
                        .is_some_and(|t| t.lines().any(|l| l.trim() == "master_link_status:up"))
                });
            if synced && masters.len() == 3 {
                return;
            }
            if Instant::now() > deadline {
                panic!(
                    "the Redis Cluster's replicas did not sync within {timeout:?}\n{}",
                    self.logs_tail(15)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The last `n` lines of every node's log.
    pub fn logs_tail(&self, n: usize) -> String {
        self.nodes
            .iter()
            .map(|node| format!("---- cluster node {} ----\n{}", node.port, node.log.tail(n)))
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs_tail(30));
        }
        for node in &self.nodes {
            node.kill();
        }
    }
}

/// Start cluster node number `index` on free ports (client and bus), retrying on new ports when
/// one was taken meanwhile.
fn launch_cluster_node(dir: &Path, index: usize) -> ClusterNode {
    let mut last = String::new();
    for _ in 0..PORT_ATTEMPTS {
        let (port, bus) = (free_port(), free_port());
        if port == bus {
            continue;
        }
        let node_dir = dir.join(format!("node{index}"));
        std::fs::create_dir_all(&node_dir).expect("create a cluster node's directory");
        let _ = std::fs::remove_file(node_dir.join("nodes.conf"));
        let timeout = CLUSTER_NODE_TIMEOUT.as_millis().to_string();
        let args: Vec<String> = [
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            &bus.to_string(),
            "--cluster-config-file",
            "nodes.conf",
            "--cluster-node-timeout",
            &timeout,
            "--cluster-require-full-coverage",
            "no",
            "--cluster-replica-validity-factor",
            "0",
            "--repl-diskless-sync-delay",
            "0",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        match launch_redis(port, &node_dir, &args) {
            Ok((child, log)) => {
                return ClusterNode {
                    port,
                    child: std::sync::Mutex::new(Some(child)),
                    log,
                }
            }
            Err(LaunchError::PortTaken(log)) => last = log,
            Err(LaunchError::Failed(why)) => panic!("cluster redis-server did not start: {why}"),
        }
    }
    panic!("a cluster node found its ports taken {PORT_ATTEMPTS} times; last log:\n{last}")
}

// ---------------------------------------------------------------------------------------------
// nginx
// ---------------------------------------------------------------------------------------------

/// A path nginx answers itself with `NONCE GENERATION`, so the harness knows the process on the
/// port is this one and which configuration it serves.
const GENERATION_PATH: &str = "/__harness/generation";

/// nginx in front of relays, configured as deploy/nginx.conf (WebSocket upgrades, `least_conn`,
/// X-Forwarded-For, timeouts past the heartbeat, a failed node skipped for 1 s), on a free
/// loopback port, everything (config, pid, logs, temp dirs) in its own directory.
pub struct Nginx {
    port: u16,
    dir: TempDir,
    child: Option<Child>,
    stderr: CapturedLines,
    upstreams: Vec<u16>,
    generation: u64,
    tls: Option<NginxTls>,
}

/// A second, TLS server block of [`Nginx`]: same proxying, `listen ... ssl`.
struct NginxTls {
    port: u16,
    certificate: PathBuf,
    key: PathBuf,
}

impl Nginx {
    /// Start nginx proxying to relays on `upstream_ports` (at least one); panics with its error
    /// log if it does not serve within [`SERVICE_STARTUP_TIMEOUT`].
    pub fn start(upstream_ports: &[u16]) -> Nginx {
        Nginx::launch(upstream_ports, None)
    }

    /// [`Nginx::start`], plus a TLS listener on [`Nginx::tls_port`] with `certificate` (PEM,
    /// chain) and `key`, proxying the same way: what `wss://` clients of a production relay
    /// talk to.
    pub fn start_tls(upstream_ports: &[u16], certificate: &Path, key: &Path) -> Nginx {
        Nginx::launch(
            upstream_ports,
            Some(NginxTls {
                port: 0,
                certificate: certificate.to_path_buf(),
                key: key.to_path_buf(),
            }),
        )
    }

    fn launch(upstream_ports: &[u16], tls: Option<NginxTls>) -> Nginx {
        require(NGINX, "nginx-light");
        assert!(
            !upstream_ports.is_empty(),
            "nginx needs at least one upstream"
        );
        let mut nginx = Nginx {
            port: 0,
            dir: TempDir::new("roomcast-nginx"),
            child: None,
            stderr: CapturedLines::default(),
            upstreams: upstream_ports.to_vec(),
            generation: 1,
            tls,
        };
        for _ in 0..PORT_ATTEMPTS {
            nginx.port = free_port();
            if let Some(tls) = nginx.tls.as_mut() {
                tls.port = free_port();
            }
            nginx.write_config();
            let _ = std::fs::remove_file(nginx.error_log_path());
            let mut cmd = Command::new(NGINX);
            nginx.add_paths(&mut cmd);
            cmd.stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            // SIGTERM, not SIGKILL: the master then stops its workers too.
            let mut child = spawn_tied(cmd, libc::SIGTERM)
                .unwrap_or_else(|e| panic!("cannot start {NGINX}: {e}"));
            nginx.stderr = CapturedLines::capture(child.stderr.take().expect("stderr is piped"));
            nginx.child = Some(child);
            match nginx.wait_until_serving() {
                Ok(()) => return nginx,
                Err(LaunchError::PortTaken(_)) => nginx.stop(),
                Err(LaunchError::Failed(why)) => {
                    nginx.stop();
                    panic!("nginx did not start: {why}");
                }
            }
        }
        panic!("nginx found its port taken {PORT_ATTEMPTS} times")
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn addr(&self) -> SocketAddr {
        loopback(self.port)
    }

    /// The TLS listener's port; panics unless started with [`Nginx::start_tls`].
    pub fn tls_port(&self) -> u16 {
        self.tls
            .as_ref()
            .expect("nginx was started without TLS (use Nginx::start_tls)")
            .port
    }

    /// The Origin of a page served through this proxy (nodes behind it allow it with
    /// ALLOWED_ORIGINS, since each node's default list names only its own port).
    pub fn origin(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// The relay ports nginx proxies to now.
    pub fn upstreams(&self) -> &[u16] {
        &self.upstreams
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("nginx.conf")
    }

    pub fn error_log_path(&self) -> PathBuf {
        self.dir.path().join("error.log")
    }

    /// nginx's error log and anything it printed.
    pub fn error_log(&self) -> String {
        let file = std::fs::read_to_string(self.error_log_path()).unwrap_or_default();
        format!("{file}{}", self.stderr.text())
    }

    /// Proxy to `ports` from now on: rewrite the config and `nginx -s reload`; returns once every
    /// new connection gets the new configuration (connections already proxied stay on the old
    /// workers until they close, as in production).
    pub fn reload_upstreams(&mut self, ports: &[u16]) {
        assert!(!ports.is_empty(), "nginx needs at least one upstream");
        let old_workers = self
            .child
            .as_ref()
            .map(|c| children_of(c.id()))
            .unwrap_or_default();
        self.upstreams = ports.to_vec();
        self.generation += 1;
        self.write_config();
        for action in [&["-t"][..], &["-s", "reload"][..]] {
            let mut cmd = Command::new(NGINX);
            self.add_paths(&mut cmd);
            let out = cmd
                .args(action)
                .output()
                .unwrap_or_else(|e| panic!("cannot run {NGINX} {action:?}: {e}"));
            assert!(
                out.status.success(),
                "nginx {action:?} failed ({}):\n{}{}\n--- config ---\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                std::fs::read_to_string(self.config_path()).unwrap_or_default()
            );
        }
        if let Err(LaunchError::PortTaken(why) | LaunchError::Failed(why)) =
            self.wait_until_serving()
        {
            panic!("nginx did not take the new upstreams {ports:?}: {why}");
        }
        // For a moment after the reload the old workers still accept too; nginx logs this line
        // right before an old worker closes its listening sockets.
        let deadline = Instant::now() + SERVICE_STARTUP_TIMEOUT;
        for pid in old_workers {
            let stopped_accepting = format!("{pid}#{pid}: gracefully shutting down");
            while !self.error_log().contains(&stopped_accepting)
                && Path::new(&format!("/proc/{pid}")).exists()
            {
                assert!(
                    Instant::now() < deadline,
                    "nginx's old worker {pid} still accepts {SERVICE_STARTUP_TIMEOUT:?} after the reload:\n{}",
                    self.error_log()
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }

    fn add_paths(&self, cmd: &mut Command) {
        cmd.arg("-p")
            .arg(format!("{}/", self.dir.path().display()))
            .arg("-c")
            .arg(self.config_path())
            .arg("-e")
            .arg(self.error_log_path());
    }

    fn marker(&self) -> String {
        format!("{} {}", self.dir.path().display(), self.generation)
    }

    fn write_config(&self) {
        let dir = self.dir.path().display();
        let servers: String = self
            .upstreams
            .iter()
            .map(|p| format!("        server 127.0.0.1:{p} max_fails=1 fail_timeout=1s;\n"))
            .collect();
        let proxy = r#"
            proxy_pass http://roomcast;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_set_header X-Forwarded-Proto $scheme;
            # Longer than the relay's heartbeat: the relay decides when a quiet socket is dead.
            proxy_read_timeout 75s;
            proxy_send_timeout 75s;
            # A refused upgrade (401, 403, 503) reaches the client as it is.
            proxy_next_upstream error timeout;
            proxy_buffering off;"#;
        let tls_server = self.tls.as_ref().map_or(String::new(), |tls| {
            format!(
                r#"
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {certificate};
        ssl_certificate_key {key};

        location / {{{proxy}
        }}
    }}
"#,
                port = tls.port,
                certificate = tls.certificate.display(),
                key = tls.key.display(),
            )
        });
        // As root the workers would run as `nobody`, whose group Debian does not have.
        let user = if is_root() { "user root root;\n" } else { "" };
        let config = format!(
            r#"# Written by the test harness (tests/common/services.rs); rewritten on reload.
daemon off;
master_process on;
worker_processes 1;
{user}pid {dir}/nginx.pid;
error_log {dir}/error.log notice;

events {{
    worker_connections 8192;
}}

http {{
    access_log off;
    client_body_temp_path {dir}/client_body_temp;
    proxy_temp_path {dir}/proxy_temp;
    fastcgi_temp_path {dir}/fastcgi_temp;
    uwsgi_temp_path {dir}/uwsgi_temp;
    scgi_temp_path {dir}/scgi_temp;

    map $http_upgrade $connection_upgrade {{
        default upgrade;
        ''      close;
    }}

    upstream roomcast {{
        least_conn;
{servers}    }}

    server {{
        listen 127.0.0.1:{port};

        location = {GENERATION_PATH} {{
            default_type text/plain;
            return 200 "{marker}\n";
        }}

        location / {{{proxy}
        }}
    }}
{tls_server}}}
"#,
            port = self.port,
            marker = self.marker(),
        );
        std::fs::write(self.config_path(), config).expect("write nginx.conf");
    }

    /// Poll the generation path until this process serves the current configuration.
    fn wait_until_serving(&mut self) -> Result<(), LaunchError> {
        let want = self.marker();
        let deadline = Instant::now() + SERVICE_STARTUP_TIMEOUT;
        let mut last = String::new();
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(status)) = child.try_wait() {
                    std::thread::sleep(Duration::from_millis(50));
                    let log = self.error_log();
                    return Err(if log.contains("Address already in use") {
                        LaunchError::PortTaken(log)
                    } else {
                        LaunchError::Failed(format!("nginx exited with {status}:\n{log}"))
                    });
                }
            }
            if let Some(body) = blocking_get(self.addr(), GENERATION_PATH) {
                if body.trim_end() == want {
                    return Ok(());
                }
                last = body;
            }
            if Instant::now() >= deadline {
                return Err(LaunchError::Failed(format!(
                    "port {} did not answer {want:?} within {SERVICE_STARTUP_TIMEOUT:?} (last answer {last:?}); error log:\n{}",
                    self.port,
                    self.error_log()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Fast shutdown (SIGTERM: the master stops its workers), then SIGKILL for whatever is left.
    fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        let workers = children_of(child.id());
        send_signal(child.id(), libc::SIGTERM);
        if !wait_for_child(&mut child, Duration::from_secs(3)) {
            kill_and_reap(&mut child);
            for worker in workers {
                send_signal(worker, libc::SIGKILL);
            }
        }
    }
}

impl Endpoint for Nginx {
    fn socket_addr(&self) -> SocketAddr {
        self.addr()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            let log = self.error_log();
            let lines: Vec<&str> = log.lines().collect();
            eprintln!(
                "---- nginx on port {} proxying to {:?} (error log tail) ----\n{}",
                self.port,
                self.upstreams,
                lines[lines.len().saturating_sub(30)..].join("\n")
            );
        }
    }
}

/// A certificate authority and a server certificate it signed for `localhost` and 127.0.0.1,
/// made with Debian's `openssl` CLI in a temporary directory (P-256 keys, valid two days).
pub struct TestCertificates {
    dir: TempDir,
}

impl TestCertificates {
    pub fn make() -> TestCertificates {
        require("/usr/bin/openssl", "openssl");
        let dir = TempDir::new("roomcast-certs");
        let run = |args: &[&str]| {
            let out = Command::new("/usr/bin/openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .unwrap_or_else(|e| panic!("cannot run openssl {args:?}: {e}"));
            assert!(
                out.status.success(),
                "openssl {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        let ec = [
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ];
        run(&[
            &["req", "-x509"][..],
            &ec,
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=roomcast test CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        ]
        .concat());
        run(&[
            &["req"][..],
            &ec,
            &[
                "-keyout",
                "server.key",
                "-out",
                "server.csr",
                "-subj",
                "/CN=localhost",
            ],
        ]
        .concat());
        std::fs::write(
            dir.path().join("server.ext"),
            "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\n\
             extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )
        .expect("write server.ext");
        run(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ]);
        TestCertificates { dir }
    }

    /// The CA certificate (PEM) a client must trust.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The server certificate (PEM) for localhost and 127.0.0.1.
    pub fn certificate(&self) -> PathBuf {
        self.dir.path().join("server.pem")
    }

    pub fn key(&self) -> PathBuf {
        self.dir.path().join("server.key")
    }
}

#[allow(unsafe_code)]
fn is_root() -> bool {
    // SAFETY: geteuid(2) has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Pids of the direct children of `pid` (nginx's workers).
fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// `GET path` over a blocking socket with short timeouts; the body if the answer is 200.
fn blocking_get(addr: SocketAddr, path: &str) -> Option<String> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_millis(500)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    let (head, body) = response.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

// ---------------------------------------------------------------------------------------------
// Reading the broker's presence state and Redis's command counts
// ---------------------------------------------------------------------------------------------

/// When the relay nodes' entries in a room's presence hash expire (ms since the epoch), from
/// an `HGETALL rc:{room}:presence` reply: one per node that has members there.
pub fn presence_expiries(hgetall: &Resp) -> Vec<u64> {
    let Resp::Array(Some(items)) = hgetall else {
        return Vec::new();
    };
    items
        .chunks(2)
        .filter_map(|pair| {
            let (field, value) = (pair.first()?.as_text()?, pair.get(1)?.as_text()?);
            if field == "_total" {
                return None;
            }
            value.split_once(':')?.1.parse().ok()
        })
        .collect()
}

/// Script calls (`EVALSHA` and `EVAL`) a Redis server has run, from its `INFO commandstats`.
pub fn script_calls(info: &Resp) -> u64 {
    let text = info.as_text().unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
        .filter_map(|l| {
            l.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Count something across one presence refresh of a relay node: wait until every room has the
/// node's entry (`expiries` reads one list per room, `presence_expiries`), take `count()` once
/// the joins' own updates are done, then wait until a refresh has moved every room's expiry on
/// (within 15 s: the refresh runs every 10 s). Returns how much `count()` grew meanwhile.
pub async fn count_across_a_presence_refresh(
    expiries: impl Fn() -> Vec<Vec<u64>>,
    count: impl Fn() -> u64,
    logs: impl Fn() -> String,
) -> u64 {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let first: Vec<u64> = loop {
        let e = expiries();
        if e.iter().all(|e| e.len() == 1) {
            break e.into_iter().map(|e| e[0]).collect();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "entries never written: {e:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = count();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let now = expiries();
        if now
            .iter()
            .zip(&first)
            .all(|(e, &was)| e.len() == 1 && e[0] > was)
        {
            return count() - before;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "a refresh did not re-state every room: before {first:?}, now {now:?}\n{}",
            logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
